//! The bodies of fuzz targets that CI runs inside the test suite rather than under libFuzzer
//! (`fuzz/`, `docs/security.md`): the same function is the cargo-fuzz target and the test's.

use std::hint::black_box;

use shoal_node::{Node, config::Config};

/// The `config` target: `data` as the TOML configuration, then every conversion of it
/// (builder, cache, cache node role, daemon, state directory). Any text parses or is refused
/// with an error naming what was wrong, and a parsed configuration converts or is refused the
/// same way; a panic is the failure the fuzzer looks for.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, "fuzz.toml") else {
        return;
    };
    // `black_box`: every conversion must run, not be proven unused and dropped.
    black_box(config.apply(Node::builder(), "fuzz.toml").is_ok());
    black_box(config.cache("fuzz.toml").is_ok());
    black_box(config.cache_node_role("fuzz.toml").is_ok());
    black_box(config.daemon("fuzz.toml").is_ok());
    black_box(config.state_dir());
}
