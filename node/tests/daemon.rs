//! Tests of the real `shoal` binary as a daemon.
//!
//! The crash test: the real `shoal daemon` binary, several concurrent jobs (from the origin and
//! from a peer), killed with SIGKILL at random moments and restarted each time.
//!
//! It checks that every job reaches Transferred with the origin's bytes, that a suspended job
//! stays suspended, that progress the API reported before a kill is never lost, and that the
//! bytes fetched again after the crashes stay within the pieces that can be in flight at a
//! kill. It prints the seed of the kill moments; `SHOAL_CRASH_SEED=N` replays a run, and
//! `SHOAL_CRASH_TRIALS=N` sets the number of kills (default 10).
//!
//! Everything runs on 127.0.0.1 with mDNS off; the daemon is killed by its pid when the test
//! ends, whatever happens.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use sha2::Digest as _;
use shoal_node::daemon::control::{self as pb, control_client::ControlClient};
use shoal_tests::{TestOrigin, content, test_node};
use tonic::transport::Channel;

/// Upper bound of the whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// Kills the daemon by its pid when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(config: &Path, log: &Path) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("daemon log");
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["daemon", "--config"])
            .arg(config)
            .env("SHOAL_LOG", "shoal_node=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start shoal daemon"),
    )
}

async fn connect(socket: &Path, deadline: Instant) -> ControlClient<Channel> {
    loop {
        if socket.exists()
            && let Ok(ep) =
                tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))
            && let Ok(ch) = ep.connect().await
        {
            let mut c = ControlClient::new(ch);
            if c.status(pb::StatusRequest {}).await.is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not answer on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small xorshift generator: the kill moments are replayable from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct FileCase {
    name: &'static str,
    data: Vec<u8>,
    dest: PathBuf,
}

fn hex_sha256(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// The pieces that can be in flight for one file at a kill: the peer requests (32), one origin
/// run (16), the origin and verifier queues (4 + 4), and the batch being flushed (4 + 1).
fn in_flight_bound(len: u64) -> u64 {
    let piece = shoal_node::ContentId::new([0; 32], len)
        .unwrap()
        .piece_size();
    (32 + 16 + 4 + 4 + 5) * piece
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_survives_kill_9_and_keeps_what_it_acknowledged() {
    let deadline = Instant::now() + TEST_TIMEOUT;
    let seed: u64 = std::env::var("SHOAL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let trials: usize = std::env::var("SHOAL_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    eprintln!("crash test seed {seed} (replay with SHOAL_CRASH_SEED={seed}), {trials} kills");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // The origin: three files at 1 MiB/s per response.
    let origin = TestOrigin::start().await;
    origin
        .state
        .throttle_bytes_per_sec
        .store(1 << 20, Ordering::SeqCst);
    let mut files = vec![
        FileCase {
            name: "a1.bin",
            data: content(6 << 20, 31),
            dest: out.join("a1.bin"),
        },
        FileCase {
            name: "a2.bin",
            data: content(3 << 20, 32),
            dest: out.join("a2.bin"),
        },
        FileCase {
            name: "c.bin",
            data: content(5 << 20, 33),
            dest: out.join("c.bin"),
        },
        FileCase {
            name: "p.bin",
            data: content(96 << 20, 34),
            dest: out.join("p.bin"),
        },
    ];
    for f in &files {
        origin.put(f.name, f.data.clone());
    }
    // The peer: a seed of p.bin (the job gives its BLAKE3, so pieces come from the peer).
    let seed_dir = dir.path().join("seed");
    std::fs::create_dir(&seed_dir).unwrap();
    std::fs::write(seed_dir.join("p.bin"), &files[3].data).unwrap();
    let peer = test_node(&[]).await;
    peer.seed(seed_dir.join("p.bin")).await.unwrap();
    let peer_addr = peer.listen_addrs().await.remove(0);

    let state = dir.path().join("state");
    let socket = dir.path().join("shoal.sock");
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\npeers = [\"{peer_addr}\"]\nmdns = false\n\
             [origin]\nbackoff_seconds = 0.05\n\
             [jobs]\nretry_delay_seconds = 1.0\ndiscovery_wait_seconds = 2.0\n\
             [daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\n",
            state.display(),
            socket.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let mut daemon = start_daemon(&config, &log);
    let mut c = connect(&socket, deadline).await;

    // Job A: two origin files by SHA-256. Job B: the peer's file by BLAKE3. Job C: an origin
    // file by both digests. Job D: suspended, must stay so.
    let create = |name: &str| pb::CreateJobRequest {
        display_name: name.into(),
        priority: pb::Priority::Normal as i32,
        r#type: pb::JobType::Download as i32,
    };
    let mut jobs = Vec::new();
    for (name, which) in [("A", vec![0, 1]), ("B", vec![3]), ("C", vec![2])] {
        let job = c.create_job(create(name)).await.unwrap().into_inner().id;
        for i in which {
            let f = &files[i];
            c.add_file(pb::AddFileRequest {
                job: job.clone(),
                url: origin.url(f.name).to_string(),
                local_name: f.dest.display().to_string(),
                blake3: if name == "A" {
                    String::new()
                } else {
                    blake3::hash(&f.data).to_hex().to_string()
                },
                sha256: if name == "B" {
                    String::new()
                } else {
                    hex_sha256(&f.data)
                },
                ranges: Vec::new(),
            })
            .await
            .unwrap();
        }
        c.resume(pb::JobRef { job: job.clone() }).await.unwrap();
        jobs.push(job);
    }
    let suspended = c.create_job(create("D")).await.unwrap().into_inner().id;
    c.add_file(pb::AddFileRequest {
        job: suspended.clone(),
        url: origin.url("a2.bin").to_string(),
        local_name: out.join("d.bin").display().to_string(),
        ..Default::default()
    })
    .await
    .unwrap();

    let fetched = |origin: &TestOrigin, peer: &shoal_node::Node| {
        origin.bytes_served() + peer.upload_stats().bytes
    };
    let mut kills = 0;
    let mut bound = 0u64;
    let mut kept_report = Vec::new();
    for trial in 0..trials {
        let wait = Duration::from_millis(100 + rng.next() % 500);
        tokio::time::sleep(wait).await;
        // What the API acknowledged just before the kill.
        let mut acknowledged = Vec::new();
        let mut active_files = Vec::new();
        for job in &jobs {
            let j = c
                .get_job(pb::JobRef { job: job.clone() })
                .await
                .unwrap()
                .into_inner();
            for f in &j.files {
                acknowledged.push(f.bytes_transferred);
                if !f.transferred {
                    active_files.push(f.bytes_total.unwrap_or(0));
                }
            }
        }
        if active_files.is_empty() {
            eprintln!("trial {trial}: every file already transferred; no more kills");
            break;
        }
        // SIGKILL by pid.
        let pid = daemon.0.id();
        daemon.0.kill().unwrap();
        daemon.0.wait().unwrap();
        kills += 1;
        bound += active_files
            .iter()
            .map(|&len| in_flight_bound(len.max(1)))
            .sum::<u64>();
        let at_kill = fetched(&origin, &peer);
        daemon = start_daemon(&config, &log);
        c = connect(&socket, deadline).await;
        let mut kept = Vec::new();
        for job in &jobs {
            let j = c
                .get_job(pb::JobRef { job: job.clone() })
                .await
                .unwrap()
                .into_inner();
            for f in &j.files {
                kept.push(f.bytes_transferred);
            }
        }
        for (i, (k, a)) in kept.iter().zip(&acknowledged).enumerate() {
            assert!(
                k >= a,
                "trial {trial} (seed {seed}): file {i} had {a} bytes acknowledged before kill -9 of pid {pid}, {k} after"
            );
        }
        let d = c
            .get_job(pb::JobRef {
                job: suspended.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            d.state,
            pb::JobState::Suspended as i32,
            "trial {trial}: job D left Suspended"
        );
        eprintln!(
            "trial {trial}: killed after {} ms, {} bytes fetched so far, kept {kept:?}",
            wait.as_millis(),
            at_kill
        );
        kept_report.push(kept);
    }
    assert!(
        kills >= trials.min(3),
        "only {kills} kills happened; the jobs finished too fast"
    );

    // Every job reaches Transferred, and completes with the origin's bytes.
    for job in &jobs {
        loop {
            let j = c
                .get_job(pb::JobRef { job: job.clone() })
                .await
                .unwrap()
                .into_inner();
            if j.state == pb::JobState::Transferred as i32 {
                break;
            }
            assert!(
                j.state != pb::JobState::Error as i32,
                "job {} went to Error: {:?} (seed {seed})",
                j.display_name,
                j.error
            );
            assert!(
                Instant::now() < deadline,
                "job {} stuck in {} (seed {seed})",
                j.display_name,
                j.state
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.complete(pb::JobRef { job: job.clone() }).await.unwrap();
    }
    for f in &mut files {
        let got = std::fs::read(&f.dest).unwrap();
        assert!(
            got == f.data,
            "{} differs from the origin's (seed {seed})",
            f.name
        );
    }
    let total: u64 = files.iter().map(|f| f.data.len() as u64).sum();
    // The probes (a byte each) and the layer requests are not pieces; allow a little for them.
    let refetched = fetched(&origin, &peer).saturating_sub(total);
    eprintln!(
        "crash test: {kills} kills, {refetched} bytes fetched twice in all ({} per kill), bound {bound} (seed {seed})",
        refetched / kills.max(1) as u64
    );
    assert!(
        refetched <= bound + 64 * 1024,
        "{refetched} bytes fetched twice after {kills} kills, more than the {bound} bytes that can be in flight (seed {seed})"
    );
    let d = c
        .get_job(pb::JobRef {
            job: suspended.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.state, pb::JobState::Suspended as i32);
    drop(daemon);
    peer.shutdown().await;
}

/// Runs `shoal ARGS...`; returns the exit success, stdout and stderr.
fn shoal(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run shoal");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_commands_drive_the_daemon() {
    let deadline = Instant::now() + TEST_TIMEOUT;
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(3 << 20, 80);
    origin.put("f.bin", data.clone());
    let socket = dir.path().join("shoal.sock");
    let config = dir.path().join("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n\
             [daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\n",
            dir.path().join("state").display(),
            socket.display()
        ),
    )
    .unwrap();
    let _daemon = start_daemon(&config, &dir.path().join("daemon.log"));
    connect(&socket, deadline).await;
    let s = socket.to_str().unwrap();
    let url = origin.url("f.bin").to_string();
    let dest = dir.path().join("f.bin");
    let sha = hex_sha256(&data);

    let (ok, out, err) = shoal(&[
        "job",
        "create",
        "cli test",
        "--priority",
        "high",
        "--socket",
        s,
    ]);
    assert!(ok, "{err}");
    let job = out.trim().to_owned();
    let (ok, _, err) = shoal(&[
        "job",
        "add",
        &job,
        &url,
        dest.to_str().unwrap(),
        "--sha256",
        &sha,
        "--socket",
        s,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = shoal(&["job", "resume", &job, "--socket", s]);
    assert!(ok, "{err}");
    let (ok, out, err) = shoal(&["job", "monitor", &job, "--socket", s]);
    assert!(ok, "{err}");
    assert!(out.contains("Transferred"), "{out}");
    let (ok, out, err) = shoal(&["job", "info", &job, "--json", "--socket", s]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["state"], "Transferred");
    assert_eq!(info["priority"], "High");
    assert_eq!(info["bytes_transferred"], data.len() as u64);
    assert_eq!(info["files"][0]["sha256"], sha.as_str());
    let (ok, out, _) = shoal(&["job", "list", "--json", "--socket", s]);
    assert!(ok);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(!dest.exists(), "the file appeared before Complete");
    let (ok, _, err) = shoal(&["job", "complete", &job, "--socket", s]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let (ok, out, _) = shoal(&["status", "--json", "--socket", s]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["bytes_from_origin"], data.len() as u64);
    // The node-wide figures, after DO's performance snapshot.
    assert_eq!(status["node"]["bytes_from_origin"], data.len() as u64);
    assert_eq!(status["node"]["percent_peer_caching"], 0.0);
    assert_eq!(status["peer_mode"], "lan");
    // The daemon keeps a cache by default: the 3 MiB file is in it.
    assert_eq!(status["cache"]["entries"], 1);
    assert_eq!(status["cache"]["bytes"], data.len() as u64);
    let (ok, out, err) = shoal(&["cache", "list", "--json", "--socket", s]);
    if unsafe { libc::geteuid() } == 0 {
        assert!(ok, "{err}");
        let cache: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(cache["entries"][0]["sha256"], sha.as_str());
        assert_eq!(cache["entries"][0]["pinned"], false);
        let (ok, out, err) = shoal(&["cache", "pin", &format!("sha256:{sha}"), "--socket", s]);
        assert!(ok, "{err}");
        assert!(out.trim_end().ends_with("pinned"), "{out}");
        let (ok, _, err) = shoal(&["cache", "evict", "sha256:00", "--socket", s]);
        assert!(!ok);
        assert!(err.contains("must be 64 hexadecimal digits"), "{err}");
    } else {
        // Only root manages the cache.
        assert!(!ok);
        assert!(err.contains("only root"), "{err}");
    }
    let (ok, out, _) = shoal(&["status", "--socket", s]);
    assert!(ok);
    assert!(
        out.lines()
            .any(|l| l.starts_with("BytesFromHttp") && l.ends_with(&format!(": {}", data.len()))),
        "{out}"
    );
    // Why: the job's file came from the origin, with no peer around.
    let (ok, out, err) = shoal(&["why", &job, "--socket", s]);
    assert!(ok, "{err}");
    assert!(out.contains("no peer is connected"), "{out}");
    let (ok, out, _) = shoal(&["diagnose", &job, "--json", "--socket", s]);
    assert!(ok);
    let why: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(why["peer_mode"], "lan");
    // Errors: one line naming what was wrong, exit code 1.
    let (ok, _, err) = shoal(&["job", "info", "bogus", "--socket", s]);
    assert!(!ok);
    assert_eq!(err.trim(), "shoal: \"bogus\" is not a job id (a UUID)");
    let (ok, _, err) = shoal(&["job", "set", &job, "--retry-delay", "1", "--socket", s]);
    assert!(!ok);
    assert!(err.contains("minimum of 5 s"), "{err}");
    // Bandwidth: shown to anyone, changed by root while the daemon runs.
    let (ok, out, err) = shoal(&["bandwidth", "--json", "--socket", s]);
    assert!(ok, "{err}");
    let bw: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(bw["upload_bytes_per_sec"], 0);
    assert_eq!(bw["max_upload_peers"], 16);
    let (ok, out, err) = shoal(&[
        "bandwidth",
        "--upload",
        "1000000",
        "--max-upload-peers",
        "4",
        "--socket",
        s,
    ]);
    if unsafe { libc::geteuid() } == 0 {
        assert!(ok, "{err}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("UploadBytesPerSec") && l.ends_with(": 1000000")),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with("MaxUploadPeers") && l.ends_with(": 4"))
        );
        let (ok, _, err) = shoal(&["bandwidth", "--max-upload-peers", "0", "--socket", s]);
        assert!(!ok);
        assert!(err.contains("at least 1"), "{err}");
        let (ok, _, err) = shoal(&["bandwidth", "--upload", "0", "--socket", s]);
        assert!(ok, "{err}");
    } else {
        assert!(!ok);
        assert!(err.contains("only root"), "{err}");
    }
    // `shoal get` hands its job to the running daemon, which fills it from its cache.
    let served = origin.bytes_served();
    let got = dir.path().join("got.bin");
    let (ok, out, err) = shoal(&[
        "get",
        &url,
        "-o",
        got.to_str().unwrap(),
        "--sha256",
        &sha,
        "--socket",
        s,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("in the daemon"), "{err}");
    assert!(out.contains(&format!("{} bytes", data.len())), "{out}");
    assert_eq!(std::fs::read(&got).unwrap(), data);
    assert_eq!(
        origin.bytes_served(),
        served,
        "the origin was not asked again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_with_an_embedded_node_completes_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(2 << 20, 81);
    origin.put("g.bin", data.clone());
    let url = origin.url("g.bin").to_string();
    // Three times: the hang this guards against (a callback dropped as it completed the job)
    // was a race that one run catches half the time.
    for run in 0..3 {
        let out = dir.path().join(format!("g{run}.bin"));
        let started = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args([
                "get",
                &url,
                "-o",
                out.to_str().unwrap(),
                "--sha256",
                &hex_sha256(&data),
            ])
            .args([
                "--no-daemon",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut guard = Daemon(child);
        // Bounded: `get` must exit on its own once the job is complete.
        let status = loop {
            if let Some(s) = guard.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "shoal get did not exit"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut stdout = String::new();
        std::io::Read::read_to_string(guard.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        assert!(status.success(), "{stdout}");
        assert!(
            stdout.contains(&format!("{} bytes", data.len())),
            "{stdout}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }
}
