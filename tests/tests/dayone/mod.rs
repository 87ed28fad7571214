//! What a new user hits on day one with the `shoal` binary (issue 15): Ctrl-C on `shoal get`,
//! the no-progress timeout, `get` through the daemon. Each runs the real binary against
//! origins on 127.0.0.1 and stops the processes it started.

use std::sync::atomic::Ordering;

use super::*;

/// Files in `dir` whose names end in `.shoal-part`.
fn parts(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".shoal-part"))
        .collect()
}

/// `shoal get` of `url` into `dir/name` with `extra` arguments, stdout and stderr piped.
fn get(dir: &Path, name: &str, url: &url::Url, extra: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(shoal_tests::node_bin("shoal"))
        .args(["get", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0", "-o"])
        .arg(dir.join(name))
        .args(extra)
        .arg(url.as_str())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Sends SIGINT (Ctrl-C) to `child`.
fn ctrl_c(child: &tokio::process::Child) {
    let pid = child.id().expect("still running") as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
}

async fn output(child: tokio::process::Child) -> std::process::Output {
    tokio::time::timeout(SCENARIO_TIMEOUT, child.wait_with_output())
        .await
        .expect("shoal get ends in time")
        .unwrap()
}

#[tokio::test]
async fn ctrl_c_on_an_embedded_get_cancels_the_job_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(8 << 20, 161);
    origin.put("big.bin", data.clone());
    origin
        .state
        .throttle_bytes_per_sec
        .store(1 << 20, Ordering::SeqCst);
    let sha = sha256_of(&data).to_string();
    let child = get(
        dir.path(),
        "big.bin",
        &origin.url("big.bin"),
        &["--no-daemon", "--sha256", &sha],
    );
    eventually("the temporary file appears", async || {
        !parts(dir.path()).is_empty()
    })
    .await;
    ctrl_c(&child);
    let out = output(child).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("interrupted") && err.contains("cancelled"),
        "{err}"
    );
    assert!(parts(dir.path()).is_empty(), "{:?}", parts(dir.path()));
    assert!(!dir.path().join("big.bin").exists());
}

#[tokio::test]
async fn a_get_whose_reader_went_away_still_completes_and_exits_cleanly() {
    // A script that takes the line it wants and closes the pipe (`shoal get ... | head -1`):
    // the lines after find no reader. Before, the first of them panicked the process
    // ("failed printing to stdout") after the job completed, with status 101.
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(1 << 20, 163);
    origin.put("small.bin", data.clone());
    let sha = sha256_of(&data).to_string();
    let mut child = get(
        dir.path(),
        "small.bin",
        &origin.url("small.bin"),
        &["--no-daemon", "--sha256", &sha],
    );
    drop(child.stdout.take());
    let out = output(child).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("small.bin")).unwrap(), data);
}

#[tokio::test]
async fn the_no_progress_timeout_counts_from_the_last_byte_even_while_connecting() {
    let dir = tempfile::tempdir().unwrap();
    // An origin that accepts connections and never answers: the job stays in Connecting (its
    // requests wait for a response), never TransientError, so a timer that started at the
    // first transient error would never fire, and this test would hit its own bound.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let url: url::Url = format!("http://{addr}/never.bin").parse().unwrap();
    let child = get(
        dir.path(),
        "never.bin",
        &url,
        &["--no-daemon", "--no-progress-timeout", "3"],
    );
    let out = output(child).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no progress for 3 s"), "{err}");
    assert!(parts(dir.path()).is_empty());
    hold.abort();
}

#[tokio::test]
async fn ctrl_c_on_a_get_through_the_daemon_cancels_the_daemons_job() {
    let dir = shared_dir();
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig::default(),
    )
    .await;
    let origin = TestOrigin::start().await;
    let data = content(8 << 20, 162);
    origin.put("d.bin", data.clone());
    origin
        .state
        .throttle_bytes_per_sec
        .store(1 << 20, Ordering::SeqCst);
    let sha = sha256_of(&data).to_string();
    let socket = daemon.socket.display().to_string();
    let child = get(
        dir.path(),
        "d.bin",
        &origin.url("d.bin"),
        &["--socket", &socket, "--sha256", &sha],
    );
    eventually("the daemon's job transfers", async || {
        daemon.node.jobs().iter().any(|j| j.bytes_transferred() > 0)
    })
    .await;
    ctrl_c(&child);
    let out = output(child).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("cancelled in the daemon"), "{err}");
    let jobs = daemon.node.jobs();
    assert!(
        jobs.iter().all(|j| j.state == State::Cancelled),
        "{:?}",
        jobs.iter().map(|j| j.state).collect::<Vec<_>>()
    );
    assert!(parts(dir.path()).is_empty());
    daemon.stop().await;
}

#[tokio::test]
async fn a_get_through_the_daemon_shows_progress_lines_when_not_on_a_terminal() {
    let dir = shared_dir();
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig::default(),
    )
    .await;
    let origin = TestOrigin::start().await;
    let data = content(3 << 20, 163);
    origin.put("p.bin", data.clone());
    origin
        .state
        .throttle_bytes_per_sec
        .store(1 << 20, Ordering::SeqCst);
    let sha = sha256_of(&data).to_string();
    let socket = daemon.socket.display().to_string();
    let out = output(get(
        dir.path(),
        "p.bin",
        &origin.url("p.bin"),
        &["--socket", &socket, "--sha256", &sha],
    ))
    .await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("Transferring ") && l.contains("bytes")),
        "no progress lines: {err}"
    );
    assert_eq!(std::fs::read(dir.path().join("p.bin")).unwrap(), data);
    daemon.stop().await;
}

#[tokio::test]
async fn a_user_without_access_to_the_socket_gets_one_line_naming_the_group() {
    let user = shoal_tests::test_user();
    let dir = shared_dir();
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig::default(),
    )
    .await;
    let socket = daemon.socket.clone();
    let out =
        tokio::task::spawn_blocking(move || shoal_tests::shoal_job_as(&user, &socket, &["list"]))
            .await
            .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("permission denied on") && err.contains("add yourself to group "),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
    daemon.stop().await;
}

#[tokio::test]
async fn byte_counts_by_source_survive_a_kill_9_of_the_daemon() {
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(16 << 20, 164);
    origin.put("k.bin", data.clone());
    origin
        .state
        .throttle_bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let socket = dir.path().join("shoal.sock");
    let config = dir.path().join("shoal.toml");
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
    let start = || {
        tokio::process::Command::new(shoal_tests::node_bin("shoal"))
            .arg("daemon")
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let info = async |job: &str| -> serde_json::Value {
        let out = tokio::process::Command::new(shoal_tests::node_bin("shoal"))
            .args(["job", "info", job, "--json", "--socket"])
            .arg(&socket)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let mut daemon = start();
    eventually("the daemon listens", async || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    let mut c = shoal_tests::client_at(&socket, 0).await;
    let job = job_with_file(
        &mut c,
        "k",
        &origin.url("k.bin"),
        &dir.path().join("k.bin"),
        &data,
    )
    .await
    .id;
    c.resume(jref(&job)).await.unwrap();
    eventually("4 MiB verified", async || {
        info(&job).await["bytes_transferred"].as_u64().unwrap() >= 4 << 20
    })
    .await;
    // Two more seconds of progress, then no goodbye: SIGKILL.
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.start_kill().unwrap();
    daemon.wait().await.unwrap();
    drop(c);

    let _daemon = start();
    eventually("the daemon listens again", async || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    let after = info(&job).await;
    let origin_bytes = after["bytes_from_origin"].as_u64().unwrap();
    // The counts stored at most a second before the kill: at least the 4 MiB seen before the
    // two seconds, which a record stored only at the start would have lost.
    assert!(origin_bytes >= 4 << 20, "{after}");
}

#[tokio::test]
async fn a_directory_given_as_a_local_name_is_named_as_such_for_a_user_of_the_daemon() {
    let user = shoal_tests::test_user();
    let dir = shared_dir();
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig {
            socket_mode: 0o666,
            ..shoal_node::daemon::DaemonConfig::default()
        },
    )
    .await;
    let socket = daemon.socket.clone();
    let home = user.home.clone();
    let out = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| shoal_tests::shoal_job_as(&user, &socket, args);
        let created = run(&["create", "d"]);
        assert!(created.status.success(), "{created:?}");
        let job = String::from_utf8(created.stdout).unwrap().trim().to_owned();
        // The user's own home directory, and a directory the user may not write.
        [home.display().to_string(), "/home".to_owned()]
            .map(|local| run(&["add", &job, "http://127.0.0.1:9/a.bin", &local]))
    })
    .await
    .unwrap();
    for o in out {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains("it is an existing directory"), "{err}");
        assert!(!err.contains("may not create files"), "{err}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn job_list_names_each_jobs_owner_and_a_second_daemon_on_the_socket_stops_at_once() {
    let dir = shared_dir();
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig::default(),
    )
    .await;
    let mut c = daemon.client(0).await;
    c.create_job(create("mine")).await.unwrap();
    let out = tokio::process::Command::new(shoal_tests::node_bin("shoal"))
        .args(["job", "list", "--socket"])
        .arg(&daemon.socket)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap_or_default();
    assert!(header.contains("OWNER"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("mine") && l.contains("root")),
        "{text}"
    );
    // A second daemon on the same socket: refused before it builds a node or serves.
    let second = shoal_node::daemon::Daemon::start(
        shoal_tests::test_builder(&[])
            .await
            .state_dir(dir.path().join("state2")),
        shoal_node::daemon::DaemonConfig {
            socket: daemon.socket.clone(),
            ..shoal_node::daemon::DaemonConfig::default()
        },
    )
    .await;
    let Err(err) = second else {
        panic!("a second daemon on a busy socket started");
    };
    let err = err.to_string();
    assert!(err.contains("another Shoal daemon"), "{err}");
    daemon.stop().await;
}
