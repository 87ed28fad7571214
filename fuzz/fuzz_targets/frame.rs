//! The varint length prefix of every peer message (`shoal_protocol::frame::LengthPrefix`):
//! any byte sequence under any limit gives an error or a length within the limit, never a
//! panic or a wrapped value.
#![no_main]

use std::hint::black_box;

use libfuzzer_sys::fuzz_target;
use shoal_protocol::frame::{FrameError, LengthPrefix};

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    // `black_box`: the decoder's result must be computed, not proven unused and dropped.
    let limit = black_box(u32::from_le_bytes(*head) as usize);
    let mut prefix = LengthPrefix::new(limit);
    for &b in rest {
        match black_box(prefix.push(black_box(b))) {
            Ok(None) => {}
            Ok(Some(len)) => {
                assert!(black_box(len) <= limit, "{len} over the limit {limit}");
                return;
            }
            Err(FrameError::TooLarge { len, limit: l }) => {
                assert!(len > l as u64 && l == limit);
                return;
            }
            Err(e) => {
                black_box(e);
                return;
            }
        }
    }
});
