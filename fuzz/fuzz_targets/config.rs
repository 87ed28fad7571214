//! The TOML configuration (`shoal_node::config::Config`): any text parses or is refused with
//! an error naming what was wrong, and a parsed configuration applies to a builder, or is
//! refused, the same way; never a panic. The body is `shoal_tests::fuzz::config`, which the
//! test suite also runs over this target's corpus and mutations of it (CI does not build this
//! target: it needs the node's whole dependency tree; run it with `--features config`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_tests::fuzz::config(data));
