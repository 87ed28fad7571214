//! The TOML configuration (`shoal_node::config::Config`): any text parses or is refused with
//! an error naming what was wrong, and a parsed configuration applies to a builder, or is
//! refused, the same way; never a panic.
#![no_main]

use std::hint::black_box;

use libfuzzer_sys::fuzz_target;
use shoal_node::{Node, config::Config};

fuzz_target!(|data: &[u8]| {
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
});
