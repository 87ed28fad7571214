//! `shoal-bench`: the core performance benchmark, run by hand on a release build.
//!
//! On 127.0.0.1 only, it measures side by side in one run:
//! 1. origin-only download of one file from nginx: `curl -o FILE` against `shoal get` (fully
//!    verified, SHA-256 and BLAKE3 given, written and completed), wall time and peak RSS;
//! 2. one seed to one leecher over libp2p (TCP, noise, yamux): `shoal seed` against
//!    `shoal get --peer`, with the origin still there but not needed.
//!
//! Runs alternate between the contenders and the report gives medians. Needs `nginx`, `curl`
//! and GNU `time` (Debian packages nginx-light, curl, time) and a release `shoal` binary:
//!
//! ```sh
//! cargo build --release -p shoal-node -p shoal-tests
//! target/release/shoal-bench --size 1073741824 --runs 5
//! ```

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
};

use shoal_tests::bench::{
    Guard, digest_line, median, nginx_conf, start_nginx, tempdir_in, write_payload,
};

struct Args {
    size: u64,
    runs: usize,
    shoal: PathBuf,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        size: 1 << 30,
        runs: 5,
        shoal: std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("shoal"),
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => args.size = value()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--shoal" => args.shoal = value()?.into(),
            "--dir" => args.dir = Some(value()?.into()),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(args)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs `cmd` under GNU time; returns (seconds, peak RSS in KiB, stdout). Dirty pages of the
/// previous run are written back first (`sync`, not timed), so no run pays for another's.
fn timed(cmd: &[&str]) -> Result<(f64, u64, String), String> {
    let _ = Command::new("sync").status();
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("BENCH %e %M")
        .args(cmd)
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("{cmd:?} failed: {stderr}"));
    }
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("BENCH "))
        .ok_or("no timing line")?;
    let mut parts = line.split_whitespace().skip(1);
    let secs = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad time")?;
    let rss = parts.next().and_then(|s| s.parse().ok()).ok_or("bad rss")?;
    Ok((secs, rss, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let work = match &args.dir {
        Some(d) => tempdir_in(d)?,
        None => tempdir_in(&std::env::temp_dir())?,
    };
    let root = work.join("www");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let payload = root.join("payload.bin");
    write_payload(&payload, args.size).map_err(|e| e.to_string())?;
    let sha256 = digest_line(&args.shoal, &payload, "sha256")?;
    let blake3 = digest_line(&args.shoal, &payload, "blake3")?;
    let port = free_port();
    let conf = nginx_conf(&work, &root, &format!("127.0.0.1:{port}"))?;
    let _nginx = start_nginx(Command::new("nginx"), &conf, &work)?;
    let url = format!("http://127.0.0.1:{port}/payload.bin");
    let out = work.join("out.bin");
    let out_s = out.to_string_lossy().into_owned();
    let shoal = args.shoal.to_string_lossy().into_owned();
    let mib = args.size as f64 / (1024.0 * 1024.0);
    eprintln!("payload {} bytes, {} runs each", args.size, args.runs);

    // 1. Origin only: curl against shoal get, alternating.
    let (mut curl_t, mut shoal_t, mut shoal_rss) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let (t, _, _) = timed(&["curl", "-sS", "-o", &out_s, &url])?;
        curl_t.push(t);
        let _ = std::fs::remove_file(&out);
        let (t, rss, stdout) = timed(&[
            &shoal,
            "get",
            &url,
            "-o",
            &out_s,
            "--sha256",
            &sha256,
            "--blake3",
            &blake3,
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])?;
        if !stdout.contains(&format!("{} from the origin", args.size)) {
            return Err(format!("unexpected shoal get summary: {stdout}"));
        }
        shoal_t.push(t);
        shoal_rss.push(rss as f64 / 1024.0);
        let _ = std::fs::remove_file(&out);
        eprintln!(
            "run {run}: curl {:.2} s, shoal get {t:.2} s, {rss} KiB",
            curl_t[run]
        );
    }
    let (c, s, r) = (
        median(&mut curl_t),
        median(&mut shoal_t),
        median(&mut shoal_rss),
    );

    // 2. One seed, one leecher.
    let mut seed = Guard(
        Command::new(&args.shoal)
            .args([
                "seed",
                &payload.to_string_lossy(),
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start shoal seed: {e}"))?,
    );
    let stdout = seed.0.stdout.take().ok_or("no seed stdout")?;
    let mut peer = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(a) = line.strip_prefix("listening ") {
            peer = Some(a.to_owned());
        }
        if line.contains(&blake3) {
            break;
        }
    }
    let peer = peer.ok_or("the seed printed no address")?;
    let (mut p2p_t, mut p2p_rss) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let (t, rss, stdout) = timed(&[
            &shoal,
            "get",
            &url,
            "-o",
            &out_s,
            "--blake3",
            &blake3,
            "--peer",
            &peer,
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])?;
        if !stdout.contains(&format!("{} from peers", args.size)) {
            return Err(format!(
                "leecher did not get everything from the seed: {stdout}"
            ));
        }
        p2p_t.push(t);
        p2p_rss.push(rss as f64 / 1024.0);
        let _ = std::fs::remove_file(&out);
        eprintln!("run {run}: seed to leecher {t:.2} s, {rss} KiB");
    }
    let (p, pr) = (median(&mut p2p_t), median(&mut p2p_rss));
    println!("| measurement | median time (s) | throughput (MiB/s) | peak RSS (MiB) |");
    println!("| --- | --- | --- | --- |");
    println!("| curl -o from nginx | {c:.2} | {:.0} | |", mib / c);
    println!(
        "| shoal get, origin only, verified | {s:.2} | {:.0} | {r:.1} |",
        mib / s
    );
    println!(
        "| shoal get, one seed over libp2p | {p:.2} | {:.0} | {pr:.1} |",
        mib / p
    );
    println!();
    println!(
        "origin-only throughput ratio shoal/curl: {:.2} (target >= 0.90)",
        c / s
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("shoal-bench: {e}");
        std::process::exit(1);
    }
}
