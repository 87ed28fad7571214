//! `shoal-demo`: a verified swarm download on 127.0.0.1 with rogue peers (see
//! `shoal_tests::demo`). The rogue peers are the test kit's [`shoal_tests::BadPeer`]s, so the
//! shipped `shoal` binary carries no rogue behaviour.
//!
//! ```sh
//! cargo run --release -p shoal-tests --bin shoal-demo -- [--nodes N] [--rogue K] [--size BYTES] [--dir DIR]
//! ```

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use shoal_tests::demo;

/// Runs a self-contained swarm on 127.0.0.1: an HTTP origin, a seed, honest nodes and rogue
/// peers that serve every piece with a flipped byte. Exits non-zero if any final file differs.
#[derive(Parser)]
#[command(name = "shoal-demo", version)]
struct Args {
    /// Peers besides the seed, rogue ones included.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Size in bytes of the generated file.
    #[arg(long, default_value_t = 64 << 20)]
    size: u64,
    /// Serve the real files of this directory instead of a generated one (their SHA-256 is
    /// the only expected digest, as apt publishes).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How many of the peers serve corrupt pieces.
    #[arg(long, default_value_t = 1)]
    rogue: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.rogue > args.nodes {
        eprintln!(
            "error: --rogue {} exceeds --nodes {}",
            args.rogue, args.nodes
        );
        return ExitCode::from(2);
    }
    if args.rogue == args.nodes {
        eprintln!("error: --rogue {} leaves no node to download", args.rogue);
        return ExitCode::from(2);
    }
    let report = match demo::run(
        demo::Config {
            nodes: args.nodes,
            rogue: args.rogue,
            size: args.size,
            dir: args.dir,
        },
        |line| eprintln!("{line}"),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, len) in &report.files {
        println!("file {name}: {len} bytes");
    }
    print!("{report}");
    if report.all_verified() {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: a final file differs from the origin's");
        ExitCode::FAILURE
    }
}
