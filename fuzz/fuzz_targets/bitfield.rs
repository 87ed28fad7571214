//! `shoal_protocol::Bitfield::from_bytes`: any bytes for any claimed length give a bitfield of
//! exactly that length with no bit past it, or nothing; never a panic.
#![no_main]

use std::hint::black_box;

use libfuzzer_sys::fuzz_target;
use shoal_protocol::Bitfield;

fuzz_target!(|data: &[u8]| {
    let Some((head, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    // Lengths up to the largest piece count (1 TiB in 16 MiB pieces is 65 536; more for the
    // decoder to refuse).
    let len = black_box(u32::from_le_bytes(*head) % (1 << 20));
    if let Some(b) = black_box(Bitfield::from_bytes(rest, len)) {
        assert_eq!(b.len(), len);
        assert!(b.ones().all(|i| i < len));
        assert_eq!(b.as_bytes(), rest);
    }
});
