//! `shoal-sim`: the deterministic swarm simulator (`shoal_node::sim`), run by hand on a
//! release build for `docs/benchmarks.md`.
//!
//! For each N and each degree, it simulates N nodes fetching one file over a LAN behind a
//! slow origin link and prints origin copies, the median and last completion against the
//! physical limit, pieces rejected, bans, events and the wall time the simulation took.
//! `--calibrate` first measures this machine's CPU costs per byte (BLAKE3 piece check,
//! SHA-256, AES-128-GCM as the peer connections use it) and simulates with them.
//!
//! ```sh
//! cargo build --release -p shoal-tests --bin shoal-sim
//! target/release/shoal-sim --nodes 10,100,1000 --degrees 6,full --size 1073741824 --calibrate
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use shoal_node::sim::{Behaviour, CpuCosts, Ended, Rates, Scenario, run};

/// mimalloc instead of the system allocator: a simulation makes and drops many small buffers
/// (answers' member lists, bitfields, scheduler lists). glibc's malloc and free took about a
/// tenth of the 1,000-node run, which takes about a fifth less wall time with mimalloc
/// (decision 0015). The node's own binaries keep the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Simulates a swarm of Shoal download cores in virtual time")]
struct Args {
    /// Numbers of nodes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    nodes: Vec<usize>,
    /// Degrees: a number of peers per node, or `full` for a full mesh; comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "6,full")]
    degrees: Vec<String>,
    /// The file's length, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    size: u64,
    /// The origin link, in bytes per second.
    #[arg(long, default_value_t = 12.5e6)]
    origin_rate: f64,
    /// Every node's uplink and downlink, in bytes per second.
    #[arg(long, default_value_t = 125e6)]
    lan_rate: f64,
    /// Scripted peers: flip,false,busy,flood (comma-separated, repeats allowed).
    #[arg(long, value_delimiter = ',')]
    adversaries: Vec<String>,
    /// Measure this machine's CPU costs per byte and simulate with them.
    #[arg(long)]
    calibrate: bool,
    /// The seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop each simulation at this virtual time, in seconds (nodes not done by then count as
    /// not done).
    #[arg(long, default_value_t = 3600.0)]
    limit: f64,
    /// Skip cells with more than this many nodes in a full mesh.
    #[arg(long, default_value_t = 1000)]
    max_full_mesh: usize,
}

/// Nanoseconds per byte of `f` over `bytes` bytes, the median of 5 runs.
fn ns_per_byte(bytes: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_nanos() as f64 / bytes as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

/// This machine's CPU costs per byte, on 64 pieces of 1 MiB.
fn calibrate() -> Result<CpuCosts, String> {
    use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    const PIECE: usize = 1 << 20;
    const PIECES: usize = 64;
    let data: Vec<u8> = (0..PIECE).map(|i| (i * 31 + i / 1024) as u8).collect();
    let cv = shoal_validator::piece_chaining_value(0, &data);
    let verify = ns_per_byte(PIECE * PIECES, || {
        for _ in 0..PIECES {
            assert_eq!(shoal_validator::piece_chaining_value(0, &data), cv);
        }
    });
    let sha = ns_per_byte(PIECE * PIECES, || {
        let mut s = shoal_validator::Sha256Stream::new();
        for _ in 0..PIECES {
            s.update(&data);
        }
        std::hint::black_box(s.finish());
    });
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_128_GCM, &[7; 16]).map_err(|e| format!("AES key: {e}"))?,
    );
    let mut buf = data.clone();
    let encrypt = ns_per_byte(PIECE * PIECES, || {
        for i in 0..PIECES {
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            // TLS records are at most 16 KiB: one seal per record.
            for record in buf.chunks_mut(16 << 10) {
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::empty(),
                        record,
                    )
                    .expect("sealing in memory does not fail");
                let _ = std::hint::black_box(tag);
            }
        }
    });
    Ok(CpuCosts {
        verify_ns_per_byte: verify,
        encrypt_ns_per_byte: encrypt,
        sha256_ns_per_byte: sha,
    })
}

fn behaviour(name: &str) -> Result<Behaviour, String> {
    Ok(match name {
        "flip" => Behaviour::FlipsBytes,
        "false" => Behaviour::FalseHaves,
        "busy" => Behaviour::BusyForever,
        "flood" => Behaviour::MemberFlood,
        other => return Err(format!("--adversaries: unknown behaviour {other:?}")),
    })
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let cpu = if args.calibrate {
        let c = calibrate()?;
        println!(
            "CPU per byte on this machine: BLAKE3 piece check {:.3} ns, SHA-256 {:.3} ns, AES-128-GCM {:.3} ns",
            c.verify_ns_per_byte, c.sha256_ns_per_byte, c.encrypt_ns_per_byte
        );
        c
    } else {
        CpuCosts::FREE
    };
    let adversaries = args
        .adversaries
        .iter()
        .map(|a| behaviour(a))
        .collect::<Result<Vec<_>, _>>()?;
    println!(
        "file {} bytes, origin {:.1} MB/s, LAN {:.1} MB/s up and down, seed {}",
        args.size,
        args.origin_rate / 1e6,
        args.lan_rate / 1e6,
        args.seed
    );
    println!(
        "| N | degree | origin copies | median s | last s | limit s | last / limit | rejected | bans | events | wall s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &args.nodes {
        for d in &args.degrees {
            let degree = match d.as_str() {
                "full" if n > args.max_full_mesh => continue,
                "full" => None,
                d => Some(
                    d.parse()
                        .map_err(|_| format!("--degrees: {d:?} is not a number or `full`"))?,
                ),
            };
            let mut sc = Scenario::lan(n, args.size);
            sc.degree = degree;
            sc.origin_rate = args.origin_rate;
            sc.lan = Rates {
                up: args.lan_rate,
                down: args.lan_rate,
            };
            sc.cpu = cpu;
            sc.seed = args.seed;
            sc.limit = Duration::try_from_secs_f64(args.limit)
                .map_err(|e| format!("--limit {}: {e}", args.limit))?;
            sc.adversaries.clone_from(&adversaries);
            let start = Instant::now();
            let r = run(&sc);
            let wall = start.elapsed();
            let done = r.completions();
            let failed = r
                .nodes
                .iter()
                .filter(|e| !matches!(e, Ended::Completed(_)))
                .count();
            let (median, last) = (done.get(done.len() / 2), done.last());
            println!(
                "| {n} | {} | {:.3} | {} | {}{} | {} | {:.2} | {} | {} | {} | {:.1} |",
                degree.map_or("full".to_string(), |d| d.to_string()),
                r.origin_copies(),
                median.map_or("-".into(), |t| secs(*t)),
                last.map_or("-".into(), |t| secs(*t)),
                if failed > 0 {
                    format!(" ({failed} not done)")
                } else {
                    String::new()
                },
                secs(r.limit),
                last.map_or(f64::NAN, |t| t.as_secs_f64() / r.limit.as_secs_f64()),
                r.rejected,
                r.bans.len(),
                r.events,
                wall.as_secs_f64()
            );
        }
    }
    Ok(())
}
