//! The `config` fuzz target inside the test suite (issue 11, `docs/security.md`): CI builds
//! and runs the peer-input targets under libFuzzer, but the configuration target needs the
//! node's whole dependency tree built a second time with coverage, which CI's 30 minutes do
//! not hold. Here the same body ([`shoal_tests::fuzz::config`]) takes every input of the
//! committed corpus, then mutations of them (bytes flipped, inserted, deleted, repeated, TOML
//! punctuation inserted, two inputs spliced) from a fixed seed, so a failure repeats.

use std::path::{Path, PathBuf};

/// The committed corpus of `target`: each input with its path, which a failure names.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

/// xorshift64*: a fixed sequence of pseudo-random numbers, enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One to four mutations of `input`, with `other` for splicing.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"[",
        b"]",
        b"[[",
        b"]]",
        b"=",
        b"\"",
        b"'",
        b"\n",
        b",",
        b"{",
        b"}",
        b".",
        b"-1",
        b"18446744073709551616",
        b"1e400",
        b"true",
        b"\"\\u0000\"",
        b"[origin]",
        b"[cache]",
        b"[daemon]",
        b"[scheduler]",
        b"[swarm]",
        b"[bandwidth]",
        b"0",
        b"\"/\"",
        b"\"..\"",
    ];
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 => out.insert(at, rng.next() as u8),
            2 if at < out.len() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            3 if at < out.len() => {
                let end = (at + 1 + rng.below(32)).min(out.len());
                let piece = out[at..end].to_vec();
                out.splice(at..at, piece);
            }
            4 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            _ => {
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
        }
    }
    out
}

/// Runs `target` on `input`; a panic fails the test with the input that caused it.
fn run(target: fn(&[u8]), input: &[u8], what: &str) {
    if std::panic::catch_unwind(|| target(input)).is_err() {
        panic!(
            "the config target panicked on {what}: {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn the_config_targets_corpus_and_mutations_of_it_never_panic() {
    let inputs = corpus("config");
    assert!(
        inputs.len() > 1000,
        "the committed corpus has {} inputs",
        inputs.len()
    );
    for (path, bytes) in &inputs {
        run(
            shoal_tests::fuzz::config,
            bytes,
            &path.display().to_string(),
        );
    }
    let mut rng = Rng(0x5eed_0fc0_ff1e);
    for round in 0..40_000 {
        let a = &inputs[rng.below(inputs.len())].1;
        let b = &inputs[rng.below(inputs.len())].1;
        let input = mutate(&mut rng, a, b);
        run(
            shoal_tests::fuzz::config,
            &input,
            &format!("mutation {round}"),
        );
    }
}

#[test]
fn a_mutation_changes_its_input_and_repeats_from_the_same_seed() {
    let input = b"[origin]\nproxy = \"direct\"\n";
    let (mut r1, mut r2) = (Rng(7), Rng(7));
    let changed = (0..100)
        .filter(|_| {
            let m = mutate(&mut r1, input, b"[cache]\n");
            assert_eq!(m, mutate(&mut r2, input, b"[cache]\n"));
            m != input
        })
        .count();
    assert!(changed > 90, "{changed} of 100 mutations changed the input");
}
