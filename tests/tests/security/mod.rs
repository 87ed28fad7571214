//! Trust boundaries of a daemon running as root for mutually distrusting users (issue 11,
//! `docs/security.md`): what a user plants at the paths of their own jobs never makes the
//! daemon read, serve or rename anything but the bytes that verified. These tests act for a
//! real second Unix user ([`shoal_tests::test_user`]) and need root; CI runs as root.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use shoal_node::{FileSpec, Priority, State, job::ErrorContext};
use shoal_tests::{Client, TestDaemon, TestOrigin, content, test_node, test_user};

use super::{SCENARIO_TIMEOUT, blake3_only, create, job_with_file, jref, pb, shared_dir, wait_for};

/// A root-only file of `len` bytes: what a user must never read through the daemon.
fn root_secret(dir: &Path, len: usize) -> PathBuf {
    let private = dir.join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = private.join("secret");
    std::fs::write(&secret, vec![0x5a; len]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    secret
}

/// Replaces `path` with a symlink to `target`.
fn plant_symlink(path: &Path, target: &Path) {
    std::fs::remove_file(path).unwrap();
    std::os::unix::fs::symlink(target, path).unwrap();
}

/// A leecher that asks `seed` (and no origin that has the file) for `data` and waits up to
/// `wait`; returns its bytes from peers and the pieces it rejected.
async fn leech(
    seed: &shoal_node::Node,
    data: &[u8],
    dir: &Path,
    name: &str,
    wait: Duration,
) -> (u64, u64) {
    let leecher = test_node(std::slice::from_ref(seed)).await;
    // The origin has nothing under this name: every byte must come from the seed.
    let origin = TestOrigin::start().await;
    let job = leecher
        .create_job(name, Priority::Foreground)
        .await
        .unwrap();
    leecher
        .add_file(
            job,
            FileSpec {
                url: origin.url(name),
                local_name: dir.join(name),
                expected: blake3_only(data),
                ranges: Vec::new(),
            },
        )
        .await
        .unwrap();
    leecher.resume(job).await.unwrap();
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline
        && leecher.info(job).unwrap().state != State::Transferred
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = leecher.info(job).unwrap();
    if info.state == State::Transferred {
        leecher.complete(job).await.unwrap();
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), data);
    }
    let got = info.files[0].bytes_from.peers();
    let rejected = info.peer_stats.pieces_rejected;
    leecher.shutdown().await;
    (got, rejected)
}

/// A one-file job of the caller of `c` that downloads `url` to `dest` (expecting `data`) and
/// reaches Transferred: the job's id as the API gives it, as a `JobId`, and its temporary file.
async fn transferred(
    c: &mut Client,
    d: &TestDaemon,
    name: &str,
    url: &url::Url,
    dest: &Path,
    data: &[u8],
) -> (String, shoal_node::JobId, PathBuf) {
    let job = job_with_file(c, name, url, dest, data).await;
    let id: shoal_node::JobId = job.id.parse().unwrap();
    c.resume(jref(&job.id)).await.unwrap();
    wait_for(&d.node, id, &[State::Transferred]).await;
    (job.id.clone(), id, PathBuf::from(&job.files[0].temp_name))
}

#[tokio::test]
async fn a_user_cannot_make_the_root_daemon_serve_a_root_file_through_a_symlink() {
    let user = test_user();
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    // Under the cache's minimum size, so the daemon serves the user's own files.
    let data = content(100_000, 11);
    origin.put("s.bin", data.clone());
    let secret = root_secret(dir.path(), data.len());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(user.uid).await;
    let dest = dir.path().join("s.bin");
    let (job, id, temp) =
        transferred(&mut c, &d, "serve", &origin.url("s.bin"), &dest, &data).await;
    // The daemon serves the verified file: the check below can tell serving from not.
    let leechers = tempfile::tempdir().unwrap();
    let (got, rejected) = leech(&d.node, &data, leechers.path(), "a.bin", SCENARIO_TIMEOUT).await;
    assert_eq!((got, rejected), (data.len() as u64, 0));
    let served = d.node.upload_stats().pieces;
    assert!(served > 0);

    // 1. The transferred temporary file becomes a symlink to a root-only file.
    plant_symlink(&temp, &secret);
    let (got, rejected) = leech(
        &d.node,
        &data,
        leechers.path(),
        "b.bin",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        (got, rejected),
        (0, 0),
        "the daemon served through the symlink"
    );
    assert_eq!(d.node.upload_stats().pieces, served);

    // 2. The same after Complete, at the final name. (The symlink made Complete refuse the
    // file: download it again first.)
    let refused = c.complete(jref(&job)).await;
    assert!(refused.is_err(), "Complete renamed a symlink");
    assert!(std::fs::symlink_metadata(&dest).is_err());
    c.resume(jref(&job)).await.unwrap();
    wait_for(&d.node, id, &[State::Transferred]).await;
    c.complete(jref(&job)).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let (got, _) = leech(&d.node, &data, leechers.path(), "c.bin", SCENARIO_TIMEOUT).await;
    assert_eq!(
        got,
        data.len() as u64,
        "the final file is served while it is the one"
    );
    let served = d.node.upload_stats().pieces;
    plant_symlink(&dest, &secret);
    let (got, rejected) = leech(
        &d.node,
        &data,
        leechers.path(),
        "d.bin",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        (got, rejected),
        (0, 0),
        "the daemon served the final name's symlink"
    );
    assert_eq!(d.node.upload_stats().pieces, served);
    d.stop().await;
}

#[tokio::test]
async fn complete_renames_only_the_file_that_verified_with_the_owners_mode() {
    let user = test_user();
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(200_000, 12);
    origin.put("c.bin", data.clone());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(user.uid).await;

    // A normal job: the file is the user's, 0644 whatever the daemon's umask.
    // SAFETY: umask has no preconditions; 0007 is what the shipped unit sets.
    let old = unsafe { libc::umask(0o007) };
    let ok = dir.path().join("ok.bin");
    let job = job_with_file(&mut c, "mode", &origin.url("c.bin"), &ok, &data).await;
    c.resume(jref(&job.id)).await.unwrap();
    wait_for(&d.node, job.id.parse().unwrap(), &[State::Transferred]).await;
    c.complete(jref(&job.id)).await.unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let m = std::fs::metadata(&ok).unwrap();
    assert_eq!(std::fs::read(&ok).unwrap(), data);
    assert_eq!((m.uid(), m.gid()), (user.uid, user.gid));
    assert_eq!(m.mode() & 0o777, 0o644);

    // Another user swaps the verified temporary file for a regular file of the same length
    // in the shared (0777, not sticky) directory before Complete.
    let dest = dir.path().join("swapped.bin");
    let (job, id, temp) = transferred(&mut c, &d, "swap", &origin.url("c.bin"), &dest, &data).await;
    assert_eq!(std::fs::metadata(&temp).unwrap().mode() & 0o022, 0);
    let forged = dir.path().join("forged");
    std::fs::write(&forged, vec![0xee; data.len()]).unwrap();
    std::fs::rename(&forged, &temp).unwrap();
    let err = c.complete(jref(&job)).await.unwrap_err();
    assert!(
        err.message().contains("no longer the file that verified"),
        "{err:?}"
    );
    assert!(
        std::fs::symlink_metadata(&dest).is_err(),
        "the forged file was renamed"
    );
    let info = d.node.info(id).unwrap();
    assert_eq!(info.state, State::Error);
    let e = info.error.unwrap();
    assert_eq!((e.context, e.file), (ErrorContext::LocalFile, Some(0)));
    assert!(!info.files[0].transferred);
    // Resume downloads it again; Complete then gives the verified bytes.
    c.resume(jref(&job)).await.unwrap();
    wait_for(&d.node, id, &[State::Transferred]).await;
    c.complete(jref(&job)).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);

    // The owner changes the file in place (same inode, same length) before Complete: the
    // change is seen and the file hashed again.
    let dest = dir.path().join("edited.bin");
    let (job, _, temp) = transferred(&mut c, &d, "edit", &origin.url("c.bin"), &dest, &data).await;
    {
        use std::os::unix::fs::FileExt as _;
        // Past the next clock tick, so the status change time moves.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let f = std::fs::OpenOptions::new().write(true).open(&temp).unwrap();
        f.write_all_at(b"edited", 1000).unwrap();
    }
    assert!(c.complete(jref(&job)).await.is_err());
    assert!(std::fs::symlink_metadata(&dest).is_err());
    d.stop().await;
}

#[tokio::test]
async fn a_fifo_at_a_local_name_does_not_delay_the_daemon_start() {
    let user = test_user();
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(100_000, 13);
    origin.put("f.bin", data.clone());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(user.uid).await;
    let dest = dir.path().join("f.bin");
    let (_, id, temp) = transferred(&mut c, &d, "fifo", &origin.url("f.bin"), &dest, &data).await;
    d.stop().await;
    // The user deletes the temporary file and puts a FIFO at the local name.
    std::fs::remove_file(&temp).unwrap();
    let name = std::ffi::CString::new(dest.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o666) }, 0);
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        TestDaemon::start(dir.path(), Default::default()),
    )
    .await
    .expect("the daemon starts although a FIFO sits at a local name");
    let info = d.node.info(id).unwrap();
    assert_eq!(info.state, State::Error);
    assert_eq!(info.error.unwrap().context, ErrorContext::LocalFile);
    d.stop().await;
}

#[tokio::test]
async fn the_notify_command_runs_as_the_user_in_its_own_session_with_a_clean_environment() {
    let user = test_user();
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(50_000, 14);
    origin.put("n.bin", data.clone());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(user.uid).await;
    let job = job_with_file(
        &mut c,
        "notify",
        &origin.url("n.bin"),
        &dir.path().join("n.bin"),
        &data,
    )
    .await
    .id;
    let out = dir.path().join("notified");
    // What the command sees: its standard streams, its session, its ids, its environment
    // and its working directory, one per line.
    let script = format!(
        "F={out}; I=$(readlink /proc/$$/fd/0); O=$(readlink /proc/$$/fd/1); \
         echo $I > $F; echo $O >> $F; \
         cut -d' ' -f6 /proc/$$/stat >> $F; echo $$ >> $F; id -u >> $F; id -G >> $F; \
         pwd >> $F; env | sort >> $F",
        out = out.display()
    );
    c.set_properties(pb::SetPropertiesRequest {
        job: job.clone(),
        notify_cmdline: Some(pb::CommandLine {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    c.resume(jref(&job)).await.unwrap();
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    let text = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.contains("PATH=") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the notify command did not run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "/dev/null");
    assert!(lines[1].starts_with("pipe:"), "stdout is {}", lines[1]);
    assert_eq!(lines[2], lines[3], "not a session leader");
    assert_eq!(lines[4], user.uid.to_string());
    let groups: Vec<u32> = lines[5].split(' ').map(|g| g.parse().unwrap()).collect();
    assert!(
        groups.contains(&user.gid) && groups.contains(&user.extra_gid),
        "{groups:?}"
    );
    assert!(!groups.contains(&0), "{groups:?}");
    assert_eq!(PathBuf::from(lines[6]), user.home);
    let env: Vec<&str> = lines[7..].to_vec();
    for want in [
        format!("HOME={}", user.home.display()),
        format!("USER={}", user.name),
        format!("LOGNAME={}", user.name),
        "SHELL=/bin/sh".to_owned(),
    ] {
        assert!(env.contains(&want.as_str()), "{want} missing from {env:?}");
    }
    // Nothing of the daemon's own environment (sh adds PWD, SHLVL and `_`).
    for var in &env {
        let name = var.split('=').next().unwrap();
        assert!(
            [
                "HOME", "USER", "LOGNAME", "SHELL", "PATH", "PWD", "SHLVL", "_"
            ]
            .contains(&name),
            "{var} leaked into the notify command"
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn final_jobs_leave_memory_and_api_strings_and_watch_streams_are_bounded() {
    let dir = shared_dir();
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(1000).await;
    // Create and cancel, over and over: the node keeps a bounded number of final jobs.
    let name = "x".repeat(256);
    for _ in 0..300 {
        let job = c
            .create_job(pb::CreateJobRequest {
                display_name: name.clone(),
                ..create("")
            })
            .await
            .unwrap()
            .into_inner();
        c.cancel(jref(&job.id)).await.unwrap();
    }
    let held = d.node.jobs().len();
    assert!(held <= 256, "{held} final jobs held in memory");
    // Over-long fields are refused, naming the field.
    let e = c
        .create_job(pb::CreateJobRequest {
            display_name: "x".repeat(257),
            ..create("")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("display_name"), "{e:?}");
    let job = c.create_job(create("bounds")).await.unwrap().into_inner();
    let long_url = format!("http://127.0.0.1:1/{}", "a".repeat(9000));
    let e = c
        .add_file(pb::AddFileRequest {
            job: job.id.clone(),
            url: long_url,
            local_name: dir.path().join("a").display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("url"), "{e:?}");
    let e = c
        .add_file(pb::AddFileRequest {
            job: job.id.clone(),
            url: "http://127.0.0.1:1/a".into(),
            local_name: format!("/{}", "b".repeat(5000)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("local_name"), "{e:?}");
    // Watch streams: 16 per user, then RESOURCE_EXHAUSTED; another user still may watch.
    let mut streams = Vec::new();
    for _ in 0..16 {
        streams.push(c.watch(pb::WatchRequest::default()).await.unwrap());
    }
    let e = c.watch(pb::WatchRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    let mut other = d.client(1001).await;
    assert!(other.watch(pb::WatchRequest::default()).await.is_ok());
    // A closed stream frees its place.
    drop(streams.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while c.watch(pb::WatchRequest::default()).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed stream kept its place"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.stop().await;
}

#[tokio::test]
async fn status_and_diagnose_are_rate_limited_per_user() {
    let dir = shared_dir();
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(1000).await;
    // A burst of 10 goes through; more in the same moment do not.
    let mut refused = None;
    let started = std::time::Instant::now();
    for i in 0..20 {
        if let Err(e) = c.status(pb::StatusRequest {}).await {
            refused = Some((i, e.code()));
            break;
        }
    }
    // One call a second comes back: on a loaded machine, as many more as whole seconds
    // passed may go through.
    let refill = started.elapsed().as_secs() as usize;
    let Some((at, code)) = refused else {
        panic!("no call refused in 20 ({refill} s)")
    };
    assert_eq!(code, tonic::Code::ResourceExhausted);
    assert!(
        (10..=10 + refill).contains(&at),
        "refused at {at} after {refill} s"
    );
    // Another user is not held back by the first.
    let mut other = d.client(1001).await;
    assert!(other.status(pb::StatusRequest {}).await.is_ok());
    // A second later, one more call.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(c.status(pb::StatusRequest {}).await.is_ok());
    d.stop().await;
}

#[tokio::test]
async fn add_file_checks_the_directory_as_the_caller() {
    let user = test_user();
    let dir = shared_dir();
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(user.uid).await;
    let job = c.create_job(create("dirs")).await.unwrap().into_inner();
    let add_in = |sub: &Path| pb::AddFileRequest {
        job: job.id.clone(),
        url: "http://127.0.0.1:1/x".into(),
        local_name: sub.join("x").display().to_string(),
        ..Default::default()
    };
    // Root's 0755 directory: refused, as the user would be.
    let root_dir = dir.path().join("root-dir");
    std::fs::create_dir(&root_dir).unwrap();
    std::fs::set_permissions(&root_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = c.add_file(add_in(&root_dir)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A directory of a group the user is in, writable by the group: taken.
    let group_dir = dir.path().join("group-dir");
    std::fs::create_dir(&group_dir).unwrap();
    std::os::unix::fs::chown(&group_dir, Some(0), Some(user.extra_gid)).unwrap();
    std::fs::set_permissions(&group_dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    c.add_file(add_in(&group_dir)).await.unwrap();
    d.stop().await;
}

#[tokio::test]
async fn the_socket_belongs_to_the_configured_group_so_its_members_can_call() {
    let user = test_user();
    let dir = tempfile::tempdir().unwrap();
    let config = shoal_node::daemon::DaemonConfig {
        socket_group: Some(user.extra_gid),
        ..Default::default()
    };
    let d = TestDaemon::start(dir.path(), config).await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.gid(), user.extra_gid);
    assert_eq!(meta.mode() & 0o777, 0o660);
    // A member of the group (and not the owner) may connect.
    // (perl-base, which every Debian has, connects to a Unix socket.)
    let connect = |user: &str| {
        std::process::Command::new("runuser")
            .args(["-u", user, "--", "perl", "-MIO::Socket::UNIX", "-e"])
            .arg("IO::Socket::UNIX->new(Peer => $ARGV[0]) or exit 1")
            .arg(&d.socket)
            .status()
            .unwrap()
    };
    let status = connect("shoal-test");
    assert!(
        status.success(),
        "a member of the socket's group cannot connect"
    );
    // Someone outside the group cannot.
    assert!(!connect("nobody").success());
    d.stop().await;
}
