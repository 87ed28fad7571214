//! `hash_locality`: what the piece work costs when a piece's bytes are in the CPU's cache and
//! when they come from main memory, per GiB, on a release build:
//!
//! ```sh
//! cargo run --release -p shoal-tests --example hash_locality
//! ```
//!
//! Each row hashes or copies 1 MiB pieces (Shoal's piece size) either all from one buffer of
//! 512 MiB, read once after another buffer as large was walked ("from memory"), or one 1 MiB
//! piece over and over, so that it stays in the core's cache ("in cache"); the figures are
//! medians of five runs, scaled to seconds per GiB. It explains part of why one byte costs
//! more in a swarm of eight nodes on two cores than from one seed to one leecher: there a
//! piece waits in memory, behind seven other processes, before it is hashed and served
//! (`docs/benchmarks.md`, session 29). `Sha256Stream` hashes in 1 KiB steps with prefetches
//! 4 KiB ahead since session 31 (as fast from memory as from the cache here); the row with
//! 16 KiB steps is what it did before.

use std::{hint::black_box, time::Instant};

use shoal_validator::{Sha256Stream, piece_chaining_value};

/// Bytes of the buffer the "from memory" rows read once.
const BUF: usize = 512 << 20;
/// Shoal's piece size, bytes.
const PIECE: usize = 1 << 20;
/// Runs of each row; the median is reported.
const RUNS: usize = 5;

/// SHA-256 of `pieces` in `step`-byte updates, each after a prefetch of the step `lead` bytes
/// ahead ([`Sha256Stream::update_in_steps`]): with 16 KiB steps 16 KiB ahead, what
/// `Sha256Stream` did before session 31 (which did not also prefetch the first 16 KiB of each
/// piece, one prefetch in 64 per piece).
fn sha_stepped<'a>(pieces: impl Iterator<Item = &'a [u8]>, step: usize, lead: usize) {
    let mut h = Sha256Stream::new();
    for p in pieces {
        h.update_in_steps(p, step, lead);
    }
    black_box(h.finish());
}

/// SHA-256 of `pieces` with the `sha2` crate alone, no prefetch.
fn sha_plain<'a>(pieces: impl Iterator<Item = &'a [u8]>) {
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    for p in pieces {
        sha2::Digest::update(&mut h, p);
    }
    black_box(sha2::Digest::finalize(h));
}

/// Seconds per GiB of `f`, the median of [`RUNS`] runs, each after `setup` (not timed); `f`
/// handles [`BUF`] bytes.
fn per_gib(mut setup: impl FnMut(), mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..RUNS)
        .map(|_| {
            setup();
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * (1 << 30) as f64 / BUF as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[RUNS / 2]
}

fn main() {
    let big: Vec<u8> = (0..BUF).map(|i| (i % 251) as u8).collect();
    let mut other = vec![7u8; BUF];
    // Before each "from memory" run, another buffer is walked, so nothing of `big` stays
    // cached.
    let mut evict = || {
        for b in other.iter_mut().step_by(64) {
            *b = b.wrapping_add(1);
        }
        black_box(&other);
    };
    let pieces = BUF / PIECE;
    let sha = |bytes: &mut dyn Iterator<Item = &[u8]>| {
        let mut s = Sha256Stream::new();
        for p in bytes {
            s.update(p);
        }
        black_box(s.finish());
    };
    let rows: Vec<(&str, f64, f64)> = vec![
        (
            "SHA-256 (Sha256Stream: 1 KiB steps, prefetch 4 KiB ahead)",
            per_gib(&mut evict, || {
                sha(&mut big.chunks(PIECE));
            }),
            per_gib(
                || {},
                || sha(&mut std::iter::repeat_n(&big[..PIECE], pieces)),
            ),
        ),
        (
            "SHA-256, 16 KiB steps, prefetch the next (before session 31)",
            per_gib(&mut evict, || {
                sha_stepped(big.chunks(PIECE), 16 << 10, 16 << 10);
            }),
            per_gib(
                || {},
                || {
                    sha_stepped(
                        std::iter::repeat_n(&big[..PIECE], pieces),
                        16 << 10,
                        16 << 10,
                    )
                },
            ),
        ),
        (
            "SHA-256 (sha2, no prefetch)",
            per_gib(&mut evict, || sha_plain(big.chunks(PIECE))),
            per_gib(
                || {},
                || sha_plain(std::iter::repeat_n(&big[..PIECE], pieces)),
            ),
        ),
        (
            "BLAKE3 piece chaining value",
            per_gib(&mut evict, || {
                for (i, p) in big.chunks(PIECE).enumerate() {
                    black_box(piece_chaining_value((i * PIECE) as u64, p));
                }
            }),
            per_gib(
                || {},
                || {
                    for i in 0..pieces {
                        black_box(piece_chaining_value((i * PIECE) as u64, &big[..PIECE]));
                    }
                },
            ),
        ),
    ];
    let mut dst = vec![0u8; PIECE];
    let copy_mem = per_gib(&mut evict, || {
        for p in big.chunks(PIECE) {
            dst.copy_from_slice(p);
            black_box(&dst);
        }
    });
    let copy_hot = per_gib(
        || {},
        || {
            for _ in 0..pieces {
                dst.copy_from_slice(&big[..PIECE]);
                black_box(&dst);
            }
        },
    );
    println!("| work per 1 MiB piece | from memory (s/GiB) | in cache (s/GiB) | ratio |");
    println!("| --- | --- | --- | --- |");
    for (name, mem, hot) in rows.into_iter().chain(std::iter::once((
        "copy into a 1 MiB buffer",
        copy_mem,
        copy_hot,
    ))) {
        println!("| {name} | {mem:.3} | {hot:.3} | {:.2}x |", mem / hot);
    }
}
