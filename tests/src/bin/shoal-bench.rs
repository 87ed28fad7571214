//! `shoal-bench`: the core performance benchmark, run by hand on a release build.
//!
//! On 127.0.0.1 only, it measures side by side in one run:
//! 1. origin-only download of one file from nginx: `curl -o FILE`, `curl -o FILE && sync`, and
//!    `shoal get` (fully verified, SHA-256 and BLAKE3 given, written and completed), wall time
//!    and peak RSS;
//! 2. one seed to one leecher: `shoal seed` against `shoal get --peer` over libp2p (TCP, TLS,
//!    yamux), given the BLAKE3 content id and, separately, only the SHA-256 (what apt and dnf
//!    catalogs give), with the origin still there but not needed, and libtorrent (Debian's
//!    python3-libtorrent, `tests/bench/libtorrent_node.py`, a v1 torrent with Shoal's piece size
//!    and no web seed) from a libtorrent seed to a libtorrent leecher, on the same storage.
//!
//! Runs alternate between the contenders and the report gives medians. Needs `nginx`, `curl`
//! and GNU `time` (Debian packages nginx-light, curl, time) and a release `shoal` binary; the
//! libtorrent rows need `/usr/bin/python3` with python3-libtorrent and are left out without it:
//!
//! ```sh
//! cargo build --release -p shoal-node -p shoal-tests
//! target/release/shoal-bench --size 1073741824 --runs 5 --dir /dev/shm
//! ```

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Command, Stdio},
};

use shoal_tests::bench::{
    Guard, digest_line, lt_script, make_torrent, median, nginx_conf, start_nginx, tempdir_in,
    write_payload,
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

/// What both parts of the bench share.
struct Setup {
    args: Args,
    work: PathBuf,
    payload: PathBuf,
    url: String,
    out: PathBuf,
    sha256: String,
    blake3: String,
}

/// Median (seconds, peak RSS in MiB) of each origin-only contender: curl, curl && sync, shoal.
fn origin_only(st: &Setup) -> Result<[Medians; 3], String> {
    let out_s = st.out.to_string_lossy().into_owned();
    let shoal = st.args.shoal.to_string_lossy().into_owned();
    let curl_sync = format!("curl -sS -o '{out_s}' '{}' && sync", st.url);
    let mut t: [Vec<f64>; 3] = Default::default();
    let mut rss: [Vec<f64>; 3] = Default::default();
    for run in 0..st.args.runs {
        let contenders: [Vec<&str>; 3] = [
            vec!["curl", "-sS", "-o", &out_s, &st.url],
            vec!["sh", "-c", &curl_sync],
            vec![
                &shoal,
                "get",
                &st.url,
                "-o",
                &out_s,
                "--sha256",
                &st.sha256,
                "--blake3",
                &st.blake3,
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ],
        ];
        for (i, cmd) in contenders.iter().enumerate() {
            let (secs, kib, stdout) = timed(cmd)?;
            if i == 2 && !stdout.contains(&format!("{} from the origin", st.args.size)) {
                return Err(format!("unexpected shoal get summary: {stdout}"));
            }
            t[i].push(secs);
            rss[i].push(kib as f64 / 1024.0);
            let _ = std::fs::remove_file(&st.out);
        }
        eprintln!(
            "run {run}: curl {:.2} s, curl && sync {:.2} s, shoal get {:.2} s, {:.1} MiB",
            t[0][run], t[1][run], t[2][run], rss[2][run]
        );
    }
    Ok([0, 1, 2].map(|i| (median(&mut t[i]), median(&mut rss[i]))))
}

/// Starts `shoal seed` on the payload; returns it and the address it listens on.
fn start_shoal_seed(st: &Setup) -> Result<(Guard, String), String> {
    let mut seed = Guard(
        Command::new(&st.args.shoal)
            .args([
                "seed",
                &st.payload.to_string_lossy(),
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
        if line.contains(&st.blake3) {
            break;
        }
    }
    Ok((seed, peer.ok_or("the seed printed no address")?))
}

/// The libtorrent side of seed to leecher: a torrent of the payload with no web seed, and a
/// libtorrent seed that has checked it; `None` when python3-libtorrent is not installed.
fn start_libtorrent_seed(st: &Setup) -> Result<Option<(Guard, PathBuf, u16)>, String> {
    let probe = Command::new("/usr/bin/python3")
        .args(["-c", "import libtorrent"])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "no /usr/bin/python3 with libtorrent (Debian python3-libtorrent): libtorrent rows left out"
        );
        return Ok(None);
    }
    let torrent = st.work.join("payload.torrent");
    make_torrent(
        &torrent,
        &st.payload,
        "-",
        shoal_protocol::piece_size_for(st.args.size),
    )?;
    let port = free_port();
    let dir = st.payload.parent().ok_or("payload has no directory")?;
    let mut seed = Guard(
        Command::new("/usr/bin/python3")
            .arg(lt_script())
            .arg("run")
            .arg(&torrent)
            .arg(dir)
            .arg(port.to_string())
            .arg("")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the libtorrent seed: {e}"))?,
    );
    let stdout = seed.0.stdout.take().ok_or("no libtorrent seed stdout")?;
    let checked = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("done "));
    if !checked {
        return Err("the libtorrent seed ended before it had checked the payload".into());
    }
    Ok(Some((seed, torrent, port)))
}

/// A contender's median time in seconds and median peak RSS in MiB.
type Medians = (f64, f64);

/// Medians of the shoal leecher given the BLAKE3 content id, of the shoal leecher given only
/// the SHA-256 (apt's case: it hashes the whole file in order besides the pieces), and of the
/// libtorrent leecher when libtorrent is there.
fn seed_to_leecher(st: &Setup) -> Result<(Medians, Medians, Option<Medians>), String> {
    let (_seed, peer) = start_shoal_seed(st)?;
    let lt = start_libtorrent_seed(st)?;
    let out_s = st.out.to_string_lossy().into_owned();
    let shoal = st.args.shoal.to_string_lossy().into_owned();
    let lt_out = st.work.join("lt-out");
    let (mut t, mut rss): ([Vec<f64>; 3], [Vec<f64>; 3]) = Default::default();
    let digests = [("--blake3", &st.blake3), ("--sha256", &st.sha256)];
    for run in 0..st.args.runs {
        eprint!("run {run}: shoal seed to leecher");
        for (i, (flag, digest)) in digests.iter().enumerate() {
            let (secs, kib, stdout) = timed(&[
                &shoal,
                "get",
                &st.url,
                "-o",
                &out_s,
                flag,
                digest,
                "--peer",
                &peer,
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ])?;
            if !stdout.contains(&format!("{} from peers", st.args.size)) {
                return Err(format!(
                    "leecher given {flag} did not get everything from the seed: {stdout}"
                ));
            }
            t[i].push(secs);
            rss[i].push(kib as f64 / 1024.0);
            let _ = std::fs::remove_file(&st.out);
            eprint!(" {flag} {secs:.2} s, {kib} KiB;");
        }
        if let Some((_, torrent, seed_port)) = &lt {
            std::fs::create_dir_all(&lt_out).map_err(|e| e.to_string())?;
            let (secs, kib, stdout) = timed(&[
                "/usr/bin/python3",
                &lt_script().to_string_lossy(),
                "get",
                &torrent.to_string_lossy(),
                &lt_out.to_string_lossy(),
                &free_port().to_string(),
                &seed_port.to_string(),
            ])?;
            if !stdout.starts_with("done ") {
                return Err(format!("libtorrent leecher: {stdout}"));
            }
            let got = std::fs::metadata(lt_out.join("payload.bin")).map(|m| m.len());
            if got.as_ref().ok() != Some(&st.args.size) {
                return Err(format!("libtorrent leecher wrote {got:?} bytes"));
            }
            t[2].push(secs);
            rss[2].push(kib as f64 / 1024.0);
            let _ = std::fs::remove_dir_all(&lt_out);
            eprint!(" libtorrent {secs:.2} s, {kib} KiB");
        }
        eprintln!();
    }
    let [b3, sha, lib] = [0, 1, 2].map(|i| (median(&mut t[i]), median(&mut rss[i])));
    Ok((b3, sha, lt.map(|_| lib)))
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
    let st = Setup {
        url: format!("http://127.0.0.1:{port}/payload.bin"),
        out: work.join("out.bin"),
        args,
        work,
        payload,
        sha256,
        blake3,
    };
    let mib = st.args.size as f64 / (1024.0 * 1024.0);
    eprintln!(
        "payload {} bytes in {}, {} runs each",
        st.args.size,
        st.work.display(),
        st.args.runs
    );
    let [(c, _), (cs, _), (s, r)] = origin_only(&st)?;
    let ((p, pr), (ps, psr), lt) = seed_to_leecher(&st)?;
    println!("| measurement | median time (s) | throughput (MiB/s) | peak RSS (MiB) |");
    println!("| --- | --- | --- | --- |");
    println!("| curl -o from nginx | {c:.2} | {:.0} | |", mib / c);
    println!("| curl -o && sync | {cs:.2} | {:.0} | |", mib / cs);
    println!(
        "| shoal get, origin only, verified | {s:.2} | {:.0} | {r:.1} |",
        mib / s
    );
    println!(
        "| shoal get, one seed over libp2p | {p:.2} | {:.0} | {pr:.1} |",
        mib / p
    );
    println!(
        "| shoal get, one seed over libp2p, only the SHA-256 given | {ps:.2} | {:.0} | {psr:.1} |",
        mib / ps
    );
    if let Some((l, lr)) = lt {
        println!(
            "| libtorrent, one seed to one leecher | {l:.2} | {:.0} | {lr:.1} |",
            mib / l
        );
    }
    println!();
    println!("origin only, shoal/curl throughput: {:.2}", c / s);
    println!(
        "origin only, shoal/(curl && sync) throughput: {:.2}",
        cs / s
    );
    if let Some((l, _)) = lt {
        println!("seed to leecher, shoal/libtorrent throughput: {:.2}", l / p);
        println!(
            "seed to leecher with only the SHA-256, shoal/libtorrent throughput: {:.2}",
            l / ps
        );
    }
    let _ = std::fs::remove_dir_all(&st.work);
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("shoal-bench: {e}");
        std::process::exit(1);
    }
}
