//! `shoal-swarm-bench`: the LAN-cluster benchmark, run by hand on a release build.
//!
//! Everything runs on 127.0.0.1 with mDNS off: an in-process HTTP origin whose bodies share one
//! throttled link (like a WAN link in front of a LAN), and Shoal nodes in this process.
//!
//! **Swarm** (default): for each file size and each N, N independent `curl` downloads from the
//! throttled origin at once, then N Shoal nodes (a full mesh of listed peers) starting one job
//! of the same file at once, in the same run. Reported: bytes the origin sent (in copies of
//! the file), the time until the last node has the file, and PercentPeerCaching.
//!
//! **Simulation** (`--simulate 10,25,50,100`): N nodes in this process, each listing `--degree`
//! random earlier nodes as peers (a connected graph, not a full mesh), all starting one job of
//! the same file at once; reported as N grows: origin copies, time until the last and median
//! node finished, and PercentPeerCaching.
//!
//! ```sh
//! cargo build --release -p shoal-tests --bin shoal-swarm-bench
//! target/release/shoal-swarm-bench --nodes 2,4,8 --sizes 268435456,1073741824 \
//!     --wan 67108864 --dir /work/benchtmp
//! target/release/shoal-swarm-bench --simulate 10,25,50,100 --sizes 16777216 --wan 8388608
//! ```

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use shoal_node::{Expected, FileSpec, JobId, Node, Priority, State};
use shoal_tests::{TestOrigin, bench::list, content, test_builder};

struct Args {
    nodes: Vec<usize>,
    sizes: Vec<u64>,
    wan: u64,
    dir: PathBuf,
    simulate: Option<Vec<usize>>,
    degree: usize,
    runs: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        nodes: vec![2, 4, 8],
        sizes: vec![256 << 20, 1 << 30],
        wan: 64 << 20,
        dir: std::env::temp_dir(),
        simulate: None,
        degree: 6,
        runs: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => args.nodes = list(&flag, &value()?)?,
            "--sizes" => args.sizes = list(&flag, &value()?)?,
            "--wan" => args.wan = value()?.parse().map_err(|e| format!("--wan: {e}"))?,
            "--dir" => args.dir = value()?.into(),
            "--simulate" => args.simulate = Some(list(&flag, &value()?)?),
            "--degree" => args.degree = value()?.parse().map_err(|e| format!("--degree: {e}"))?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.wan == 0 || args.nodes.contains(&0) || args.degree == 0 || args.runs == 0 {
        return Err("--wan, --nodes, --degree and --runs must be above 0".into());
    }
    Ok(args)
}

/// N `curl` processes fetching `url` at once; returns the seconds until the last finished.
fn curls(url: &str, dir: &Path, n: usize, size: u64) -> Result<f64, String> {
    let start = Instant::now();
    let mut children = Vec::new();
    for i in 0..n {
        let out = dir.join(format!("curl-{i}"));
        children.push((
            Command::new("curl")
                .args(["-sS", "-o"])
                .arg(&out)
                .arg(url)
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("curl: {e}"))?,
            out,
        ));
    }
    for (mut c, out) in children {
        let status = c.wait().map_err(|e| e.to_string())?;
        let len = std::fs::metadata(&out).map_or(0, |m| m.len());
        let _ = std::fs::remove_file(&out);
        if !status.success() || len != size {
            return Err(format!("curl failed ({status}, {len} bytes)"));
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// One run of N nodes: what the report needs.
struct Outcome {
    last: f64,
    median: f64,
    /// The nodes' bytes by source, summed.
    bytes_from: shoal_node::BytesBySource,
}

impl Outcome {
    fn percent_peer_caching(&self) -> f64 {
        self.bytes_from.percent_peer_caching()
    }
}

/// Builds `n` nodes; node i lists `peers(i)` of the earlier ones.
async fn nodes(n: usize, peers: impl Fn(usize) -> Vec<usize>) -> Result<Vec<Node>, String> {
    let mut all: Vec<Node> = Vec::with_capacity(n);
    for i in 0..n {
        let listed: Vec<Node> = peers(i).into_iter().map(|j| all[j].clone()).collect();
        let node = test_builder(&listed)
            .await
            .build()
            .await
            .map_err(|e| e.to_string())?;
        all.push(node);
    }
    Ok(all)
}

/// Starts one job of `url` on every node at once and waits until all transferred; completes
/// them and checks the first file's bytes against `expected`.
async fn run_jobs(
    nodes: &[Node],
    url: &url::Url,
    dir: &Path,
    expected: [u8; 32],
) -> Result<Outcome, String> {
    let mut jobs: Vec<(JobId, PathBuf)> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let local = dir.join(format!("node-{i}.bin"));
        let job = node
            .create_job("bench", Priority::Foreground)
            .await
            .map_err(|e| e.to_string())?;
        node.add_file(
            job,
            FileSpec {
                url: url.clone(),
                local_name: local.clone(),
                expected: Expected {
                    blake3: Some(expected),
                    sha256: None,
                },
                ranges: Vec::new(),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        jobs.push((job, local));
    }
    let start = Instant::now();
    for (node, (job, _)) in nodes.iter().zip(&jobs) {
        node.resume(*job).await.map_err(|e| e.to_string())?;
    }
    let mut done: Vec<Option<f64>> = vec![None; nodes.len()];
    let deadline = start + Duration::from_secs(3600);
    while done.iter().any(Option::is_none) {
        for (i, (node, (job, _))) in nodes.iter().zip(&jobs).enumerate() {
            if done[i].is_none() {
                let info = node.info(*job).map_err(|e| e.to_string())?;
                match info.state {
                    State::Transferred => done[i] = Some(start.elapsed().as_secs_f64()),
                    State::Error => return Err(format!("node {i}: {:?}", info.error)),
                    _ => {}
                }
            }
        }
        if Instant::now() > deadline {
            return Err("not done within an hour".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut bytes_from = shoal_node::BytesBySource::default();
    for (node, (job, _)) in nodes.iter().zip(&jobs) {
        let info = node.info(*job).map_err(|e| e.to_string())?;
        bytes_from += info.bytes_from();
        node.complete(*job).await.map_err(|e| e.to_string())?;
    }
    let first = &jobs[0].1;
    let file = std::fs::File::open(first).map_err(|e| e.to_string())?;
    let got = blake3::Hasher::new()
        .update_reader(file)
        .map_err(|e| e.to_string())?
        .finalize();
    if *got.as_bytes() != expected {
        return Err(format!(
            "{} differs from the origin's file",
            first.display()
        ));
    }
    for (_, local) in &jobs {
        let _ = std::fs::remove_file(local);
    }
    let mut times: Vec<f64> = done.into_iter().flatten().collect();
    times.sort_by(f64::total_cmp);
    Ok(Outcome {
        last: times[times.len() - 1],
        median: times[times.len() / 2],
        bytes_from,
    })
}

/// An origin serving a `size`-byte file (content `seed`) through one link of `wan` bytes per
/// second; returns it, the file's URL and its BLAKE3.
async fn throttled_origin(
    size: u64,
    seed: u8,
    wan: u64,
) -> Result<(TestOrigin, url::Url, [u8; 32]), String> {
    let data = content(usize::try_from(size).map_err(|e| e.to_string())?, seed);
    let expected = *blake3::hash(&data).as_bytes();
    let origin = TestOrigin::start().await;
    origin.put("f.bin", data);
    origin.state.wan_bytes_per_sec.store(wan, Ordering::SeqCst);
    let url = origin.url("f.bin");
    Ok((origin, url, expected))
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// The median of `v` (the upper one of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `median` of the values, and with more than one, their range: `1.000 (0.998–1.004)`.
fn spread(v: &[f64], digits: usize) -> String {
    let m = median(v.to_vec());
    if v.len() < 2 {
        return format!("{m:.digits$}");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

async fn swarm(args: &Args) -> Result<(), String> {
    println!(
        "| file | N | origin copies, curl | origin copies, Shoal | last done, curl (s) | last done, Shoal (s) | PercentPeerCaching, Shoal |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &size in &args.sizes {
        let (origin, url, expected) = throttled_origin(size, 7, args.wan).await?;
        for &n in &args.nodes {
            let mut cells: [Vec<f64>; 5] = Default::default();
            // Runs alternate curl and Shoal, so that both see the same machine over time.
            for _ in 0..args.runs {
                let before = origin.bytes_served();
                let (u, d) = (url.to_string(), args.dir.clone());
                let curl_time = tokio::task::spawn_blocking(move || curls(&u, &d, n, size))
                    .await
                    .map_err(|e| e.to_string())??;
                let curl_copies = (origin.bytes_served() - before) as f64 / size as f64;
                let mesh = nodes(n, |i| (0..i).collect()).await?;
                let before = origin.bytes_served();
                let out = run_jobs(&mesh, &url, &args.dir, expected).await?;
                let shoal_copies = (origin.bytes_served() - before) as f64 / size as f64;
                for node in &mesh {
                    node.shutdown().await;
                }
                let values = [
                    curl_copies,
                    shoal_copies,
                    curl_time,
                    out.last,
                    out.percent_peer_caching(),
                ];
                for (cell, v) in cells.iter_mut().zip(values) {
                    cell.push(v);
                }
            }
            println!(
                "| {} | {n} | {} | {} | {} | {} | {} |",
                mib(size),
                spread(&cells[0], 2),
                spread(&cells[1], 3),
                spread(&cells[2], 1),
                spread(&cells[3], 1),
                spread(&cells[4], 1),
            );
        }
    }
    Ok(())
}

async fn simulate(args: &Args, counts: &[usize]) -> Result<(), String> {
    println!(
        "| N | file | origin copies | last done (s) | median done (s) | one copy over the link (s) | PercentPeerCaching |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &size in &args.sizes {
        let (origin, url, expected) = throttled_origin(size, 9, args.wan).await?;
        for &n in counts {
            let mut cells: [Vec<f64>; 4] = Default::default();
            for _ in 0..args.runs {
                // Node i lists up to `degree` earlier nodes, picked by a fixed stride so that
                // runs are repeatable: a connected graph of bounded degree. Fresh nodes each
                // run (nothing held, nothing cached).
                let degree = args.degree;
                let graph = nodes(n, |i| {
                    if degree >= i {
                        return (0..i).collect();
                    }
                    let mut p: Vec<usize> =
                        (0..degree).map(|k| (i * 7919 + k * 104_729) % i).collect();
                    p.sort_unstable();
                    p.dedup();
                    p
                })
                .await?;
                let before = origin.bytes_served();
                let out = run_jobs(&graph, &url, &args.dir, expected).await?;
                let copies = (origin.bytes_served() - before) as f64 / size as f64;
                for node in &graph {
                    node.shutdown().await;
                }
                let values = [copies, out.last, out.median, out.percent_peer_caching()];
                for (cell, v) in cells.iter_mut().zip(values) {
                    cell.push(v);
                }
            }
            println!(
                "| {n} | {} | {} | {} | {} | {:.1} | {} |",
                mib(size),
                spread(&cells[0], 3),
                spread(&cells[1], 1),
                spread(&cells[2], 1),
                size as f64 / args.wan as f64,
                spread(&cells[3], 1),
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let result = async {
        let args = parse_args()?;
        std::fs::create_dir_all(&args.dir).map_err(|e| e.to_string())?;
        match &args.simulate {
            Some(counts) => simulate(&args, counts).await,
            None => swarm(&args).await,
        }
    }
    .await;
    if let Err(e) = result {
        eprintln!("shoal-swarm-bench: {e}");
        std::process::exit(1);
    }
}
