//! `shoal-wan-bench`: N machines behind one WAN link, run by hand as root on a release build
//! (issue 13).
//!
//! Two network namespaces this benchmark creates (`shoal_tests::netns`), joined through a
//! router namespace by a link shaped with `tc tbf` to `--mbit` in each direction: the origin,
//! nginx, on one side; on the other, N separate processes that talk to each other over their
//! namespace's loopback. Nothing leaves the namespaces, and they are removed at the end. For
//! every cell (file size × link rate × N × digests), in the same run:
//!
//! - `curl` × N, each downloading the file from the origin;
//! - libtorrent × N (`tests/bench/libtorrent_node.py`, Debian's python3-libtorrent 2.0), a v1
//!   torrent with the origin as its web seed and every node told of every other; DHT, LSD and
//!   PEX off;
//! - `shoal get` × N, every node listing every other (`--peer`), mDNS off, with the SHA-256
//!   and the BLAKE3 hash (`blake3`) or the SHA-256 alone (`sha256`);
//! - with `--contenders seed`, the same `shoal get` × N with a `shoal seed` of the file in the
//!   host listed too (`--nodes 1`: one seed to one leecher, the baseline of CPU per byte). The
//!   seed's CPU counts from when it is ready to serve: its hashing of the file at start (a
//!   SHA-256 and a BLAKE3 pass, done once whatever the number of leechers) is left out.
//!
//! Reported per contender: origin copies (the origin's `eth0` TX bytes over those of one
//! `curl` of the file, headers included),
//! every node's completion time from the common start, the last one's ratio to one copy over
//! the link (the file's bits over the link's rate), and the CPU seconds of all N processes
//! (user + system, read from `/proc` when the last node is done). Before the cells, the day's
//! baselines: one `curl` over the link, and `dd` with `conv=fsync` to `--dir`.
//!
//! ```sh
//! cargo build --release -p shoal-node -p shoal-tests
//! target/release/shoal-wan-bench --nodes 2,4,8,16 --sizes 268435456,1073741824 \
//!     --mbit 200,50 --digests blake3,sha256 --runs 3 --dir /work/benchtmp
//! ```

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use shoal_tests::bench::{
    Guard, digest_line, list, lt_script, make_torrent, median, nginx_conf, start_nginx, tempdir_in,
    write_payload,
};
use shoal_tests::netns::{self, Lan};

struct Args {
    nodes: Vec<usize>,
    sizes: Vec<u64>,
    mbit: Vec<u32>,
    digests: Vec<String>,
    contenders: Vec<String>,
    runs: usize,
    dir: PathBuf,
    shoal: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        nodes: vec![2, 4, 8],
        sizes: vec![256 << 20],
        mbit: vec![200],
        digests: vec!["blake3".into(), "sha256".into()],
        contenders: vec!["curl".into(), "libtorrent".into(), "shoal".into()],
        runs: 1,
        dir: std::env::temp_dir(),
        shoal: std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("shoal"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => args.nodes = list(&flag, &value()?)?,
            "--sizes" => args.sizes = list(&flag, &value()?)?,
            "--mbit" => args.mbit = list(&flag, &value()?)?,
            "--digests" => args.digests = list(&flag, &value()?)?,
            "--contenders" => args.contenders = list(&flag, &value()?)?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--dir" => args.dir = value()?.into(),
            "--shoal" => args.shoal = value()?.into(),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.runs == 0 || args.nodes.contains(&0) || args.mbit.contains(&0) {
        return Err("--runs, --nodes and --mbit must be above 0".into());
    }
    if let Some(d) = args
        .digests
        .iter()
        .find(|d| !["blake3", "sha256"].contains(&d.as_str()))
    {
        return Err(format!("--digests: {d:?} is neither blake3 nor sha256"));
    }
    if let Some(c) = args
        .contenders
        .iter()
        .find(|c| !["curl", "libtorrent", "shoal", "seed"].contains(&c.as_str()))
    {
        return Err(format!(
            "--contenders: {c:?} is not curl, libtorrent, shoal or seed"
        ));
    }
    Ok(args)
}

/// What one cell needs to start its contenders.
struct Cell<'a> {
    lan: &'a Lan,
    size: u64,
    url: String,
    sha256: String,
    blake3: String,
    torrent: PathBuf,
    /// The file itself, for `shoal seed`.
    payload: PathBuf,
    shoal: &'a Path,
    work: &'a Path,
}

/// One contender's run: bytes the origin sent, completion seconds per node (sorted), CPU
/// seconds.
struct Outcome {
    origin_bytes: u64,
    done: Vec<f64>,
    cpu: f64,
    /// The largest peak resident set of the N processes, MiB.
    peak_rss_mib: f64,
}

/// The peak resident set of a live process (`VmHWM` in `/proc/PID/status`), MiB; 0 when
/// unknown.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) a live process has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) and its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Starts `n` processes of `contender` at once in the LAN host and waits until each printed
/// its completion line (or the bound passed); then kills them all.
fn run_contender(cell: &Cell, contender: &str, digest: &str, n: usize) -> Result<Outcome, String> {
    let ns = cell.lan.host_ns(0);
    let tx0 = cell.lan.origin_tx_bytes().map_err(|e| e.to_string())?;
    let ports: Vec<u16> = (0..n)
        .map(|i| 21000 + u16::try_from(i).unwrap_or(0))
        .collect();
    let all_ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (tx, rx) = mpsc::channel();
    let mut children = Vec::new();
    // `seed`: one `shoal seed` of the file in the host, which every node lists; its CPU counts
    // from when it is ready (its start-up hashing of the file is not delivery).
    let seed_port = 22000;
    let mut seed_ready_cpu = 0.0;
    if contender == "seed" {
        let mut seed = Guard(
            netns::exec(ns, cell.shoal)
                .arg("seed")
                .arg(&cell.payload)
                .args(["--no-mdns", "--listen"])
                .arg(format!("/ip4/127.0.0.1/tcp/{seed_port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start shoal seed: {e}"))?,
        );
        let stdout = seed.0.stdout.take().ok_or("no seed stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // Ready once it prints the file's content id.
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains(&cell.blake3) => break,
                Some(Ok(_)) => {}
                _ => return Err("shoal seed ended before serving".into()),
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        seed_ready_cpu = cpu_seconds(seed.0.id());
        children.push(seed);
    }
    let start = Instant::now();
    for i in 0..n {
        let out = cell.work.join(format!("node{i}"));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        let file = out.join("payload.bin");
        let mut cmd;
        let marker;
        match contender {
            "curl" => {
                cmd = netns::exec(ns, "curl");
                cmd.args(["-sS", "-o"])
                    .arg(&file)
                    .args(["-w", "done %{time_total}\n", &cell.url]);
                marker = "done ";
            }
            "libtorrent" => {
                cmd = netns::exec(ns, "/usr/bin/python3");
                cmd.arg(lt_script())
                    .arg("run")
                    .arg(&cell.torrent)
                    .arg(&out)
                    .arg(ports[i].to_string())
                    .arg(&all_ports);
                marker = "done ";
            }
            _ => {
                cmd = netns::exec(ns, cell.shoal);
                cmd.args(["get", &cell.url, "-o"])
                    .arg(&file)
                    .args(["--sha256", &cell.sha256]);
                if digest == "blake3" {
                    cmd.args(["--blake3", &cell.blake3]);
                }
                cmd.args(["--no-mdns", "--seed-for", "3600", "--listen"])
                    .arg(format!("/ip4/127.0.0.1/tcp/{}", ports[i]));
                for (j, p) in ports.iter().enumerate() {
                    if j != i {
                        cmd.arg("--peer").arg(format!("/ip4/127.0.0.1/tcp/{p}"));
                    }
                }
                if contender == "seed" {
                    cmd.arg("--peer")
                        .arg(format!("/ip4/127.0.0.1/tcp/{seed_port}"));
                }
                marker = " file(s), ";
            }
        }
        let mut child = Guard(
            cmd.current_dir(&out)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(
                    std::fs::File::create(cell.work.join(format!("node{i}.stderr")))
                        .map_err(|e| e.to_string())?,
                )
                .spawn()
                .map_err(|e| format!("cannot start {contender}: {e}"))?,
        );
        let stdout = child.0.stdout.take().ok_or("no stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(marker) {
                    if marker == " file(s), " {
                        // What the node got from where: bytes from peers beyond the file's
                        // size were fetched twice.
                        eprintln!("    node {i}: {line}");
                    }
                    let _ = tx.send((i, Some(start.elapsed())));
                    return;
                }
            }
            let _ = tx.send((i, None));
        });
        children.push(child);
    }
    drop(tx);
    let one_copy = cell.size as f64 * 8.0 / f64::from(mbit_of(cell)) / 1e6;
    let bound = Duration::from_secs_f64(one_copy * (n as f64 + 2.0) * 1.5 + 60.0);
    let mut done = Vec::new();
    let mut cpu = 0.0;
    let mut peak = 0.0f64;
    while done.len() < n {
        match rx.recv_timeout(bound.saturating_sub(start.elapsed())) {
            Ok((_, Some(t))) => {
                done.push(t.as_secs_f64());
                if done.len() == n {
                    cpu = children.iter().map(|c| cpu_seconds(c.0.id())).sum::<f64>()
                        - seed_ready_cpu;
                    // The seed (the first child, with `seed`) is not a leecher.
                    let skip = usize::from(contender == "seed");
                    peak = children
                        .iter()
                        .skip(skip)
                        .map(|c| peak_rss_mib(c.0.id()))
                        .fold(0.0, f64::max);
                }
            }
            Ok((i, None)) => {
                let log = std::fs::read_to_string(cell.work.join(format!("node{i}.stderr")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                return Err(format!(
                    "{contender} node {i} ended without finishing; the end of its stderr:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            Err(_) => {
                return Err(format!(
                    "{contender}: {} of {n} nodes done after {bound:?}",
                    done.len()
                ));
            }
        }
    }
    drop(children);
    let tx1 = cell.lan.origin_tx_bytes().map_err(|e| e.to_string())?;
    for i in 0..n {
        let file = cell.work.join(format!("node{i}/payload.bin"));
        let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        if len != cell.size {
            return Err(format!(
                "{contender} node {i}: {len} bytes, not {}",
                cell.size
            ));
        }
        let _ = std::fs::remove_dir_all(cell.work.join(format!("node{i}")));
    }
    done.sort_by(f64::total_cmp);
    Ok(Outcome {
        origin_bytes: tx1 - tx0,
        done,
        cpu,
        peak_rss_mib: peak,
    })
}

/// The link rate of the cell's LAN, Mbit/s (kept in the LAN's tag).
fn mbit_of(cell: &Cell) -> u32 {
    cell.lan.wan_mbit().unwrap_or(1)
}

/// Bytes free for an unprivileged writer on the file system of `dir` (`statvfs`).
fn free_bytes(dir: &Path) -> Result<u64, String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a zeroed statvfs is valid; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(format!(
            "{}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(st.f_bavail * st.f_frsize)
}

/// Seconds `dd` takes to write `size` bytes of zeros to `dir` with `conv=fsync`.
fn dd_seconds(dir: &Path, size: u64) -> Result<f64, String> {
    let f = dir.join("dd.bin");
    let t = Instant::now();
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", f.display()))
        .args(["bs=1M", &format!("count={}", size >> 20), "conv=fsync"])
        .output()
        .map_err(|e| format!("dd: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&f);
    if !out.status.success() {
        return Err(format!("dd: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(secs)
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    if !netns::available() {
        return Err("needs root and iproute2 (ip, tc) to create network namespaces".into());
    }
    // Every node of the largest cell writes the file; a full disk would fail the nodes (as
    // it should) and the benchmark with them.
    let need = args.sizes.iter().max().copied().unwrap_or(0)
        * (args.nodes.iter().max().copied().unwrap_or(1) as u64 + 2);
    let free = free_bytes(&args.dir)?;
    if free < need {
        return Err(format!(
            "{} has {} MiB free; the largest cell needs {} MiB",
            args.dir.display(),
            free >> 20,
            need >> 20
        ));
    }
    let work = tempdir_in(&args.dir)?;
    let root = work.join("www");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    println!(
        "| size | Mbit/s | N | contender | origin copies | last node (s) | last / one copy | median node (s) | CPU s (all nodes) | CPU s per GiB delivered |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &size in &args.sizes {
        let payload = root.join("payload.bin");
        write_payload(&payload, size).map_err(|e| e.to_string())?;
        let sha256 = digest_line(&args.shoal, &payload, "sha256")?;
        let blake3 = digest_line(&args.shoal, &payload, "blake3")?;
        let dd = dd_seconds(&args.dir, size)?;
        for &mbit in &args.mbit {
            let lan = Lan::new("wan", 1)
                .and_then(|l| l.with_wan(mbit))
                .map_err(|e| e.to_string())?;
            let origin_ns = lan.origin_ns().ok_or("no origin host")?.to_owned();
            let listen = format!("{}:8080", lan.origin_ip());
            let conf = nginx_conf(&work, &root, &listen)?;
            let _nginx = start_nginx(netns::exec(&origin_ns, "nginx"), &conf, &work)?;
            let url = format!("http://{listen}/payload.bin");
            let torrent = work.join("payload.torrent");
            if args.contenders.iter().any(|c| c == "libtorrent") {
                make_torrent(
                    &torrent,
                    &payload,
                    &url,
                    shoal_protocol::piece_size_for(size),
                )?;
            }
            let cell = Cell {
                lan: &lan,
                size,
                url,
                sha256: sha256.clone(),
                blake3: blake3.clone(),
                torrent,
                payload: payload.clone(),
                shoal: &args.shoal,
                work: &work,
            };
            let one_copy = size as f64 * 8.0 / f64::from(mbit) / 1e6;
            // One copy as the origin's link counts it (the file plus HTTP, TCP and IP headers):
            // the unit of the copies reported.
            let base = run_contender(&cell, "curl", "", 1)?;
            let unit = base.origin_bytes.max(1) as f64;
            eprintln!(
                "{} MiB at {mbit} Mbit/s: one copy {one_copy:.1} s at the link's rate, curl x 1 {:.1} s; dd conv=fsync {:.1} s ({:.0} MiB/s)",
                size >> 20,
                base.done[0],
                dd,
                (size >> 20) as f64 / dd
            );
            for &n in &args.nodes {
                for contender in &args.contenders {
                    let digests: Vec<&str> = if contender == "shoal" || contender == "seed" {
                        args.digests.iter().map(String::as_str).collect()
                    } else {
                        vec![""]
                    };
                    for digest in digests {
                        let (mut copies, mut last, mut mid, mut cpu) =
                            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                        for run in 0..args.runs {
                            let o = run_contender(&cell, contender, digest, n)?;
                            eprintln!(
                                "  N={n} {contender} {digest} run {run}: {:.3} copies, done {:?}, CPU {:.2} s, peak RSS {:.1} MiB",
                                o.origin_bytes as f64 / unit,
                                o.done
                                    .iter()
                                    .map(|t| (t * 10.0).round() / 10.0)
                                    .collect::<Vec<_>>(),
                                o.cpu,
                                o.peak_rss_mib
                            );
                            copies.push(o.origin_bytes as f64 / unit);
                            last.push(o.done[n - 1]);
                            mid.push(o.done[n / 2]);
                            cpu.push(o.cpu);
                        }
                        let range = |v: &[f64]| {
                            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                            let hi = v.iter().copied().fold(0.0, f64::max);
                            (lo, hi)
                        };
                        let (lo, hi) = range(&last);
                        let name = if digest.is_empty() {
                            contender.clone()
                        } else {
                            format!("{contender} ({digest})")
                        };
                        let l = median(&mut last);
                        let cpu = median(&mut cpu);
                        // Bytes delivered: one copy to each of the N nodes.
                        let gib = (n as u64 * size) as f64 / f64::from(1u32 << 30);
                        println!(
                            "| {} MiB | {mbit} | {n} | {name} | {:.3} | {l:.1} ({lo:.1}-{hi:.1}) | {:.2}x | {:.1} | {cpu:.2} | {:.2} |",
                            size >> 20,
                            median(&mut copies),
                            l / one_copy,
                            median(&mut mid),
                            cpu / gib
                        );
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("shoal-wan-bench: {e}");
        std::process::exit(1);
    }
}
