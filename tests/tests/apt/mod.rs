//! apt's acquire method (`shoal_node::apt::method`, issue 14), driven over pipes the way apt
//! drives it: a `601 Configuration`, then `600 URI Acquire`s, some at once, and the answers
//! read back as apt reads them. The origin is a [`TestOrigin`] on 127.0.0.1; the daemon a
//! [`TestDaemon`] on a socket in the test's directory.

mod real;

use std::path::{Path, PathBuf};

use sha2::Digest as _;
use shoal_node::apt::{Message, MessageReader, method};
use shoal_tests::{LAST_MODIFIED, TestDaemon, TestOrigin, content};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};

use super::{SCENARIO_TIMEOUT, sha256_of};

/// apt's end of a running method.
struct Apt {
    to: DuplexStream,
    from: Lines<BufReader<DuplexStream>>,
    reader: MessageReader,
    method: tokio::task::JoinHandle<Result<(), shoal_node::apt::AptError>>,
}

impl Apt {
    /// Starts the method and sends it `config` as a `601 Configuration`; the method's `100
    /// Capabilities` is checked and read.
    async fn start(config: &[(&str, String)]) -> Self {
        let (to, input) = tokio::io::duplex(1 << 16);
        let (output, from) = tokio::io::duplex(1 << 16);
        let method = tokio::spawn(method::run(BufReader::new(input), output));
        let mut apt = Self {
            to,
            from: BufReader::new(from).lines(),
            reader: MessageReader::new(),
            method,
        };
        let caps = apt.next().await;
        assert_eq!((caps.code, caps.get("Pipeline")), (100, Some("true")));
        assert_eq!(caps.get("Send-URI-Encoded"), Some("true"));
        let mut m = Message::new(601, "Configuration");
        for (k, v) in config {
            m = m.with("Config-Item", format!("{k}={v}"));
        }
        apt.send(&m).await;
        apt
    }

    async fn send(&mut self, m: &Message) {
        self.to.write_all(m.encode().as_bytes()).await.unwrap();
    }

    /// The method's next message.
    async fn next(&mut self) -> Message {
        loop {
            let line = tokio::time::timeout(SCENARIO_TIMEOUT, self.from.next_line())
                .await
                .expect("the method answers in time")
                .unwrap()
                .expect("the method is still running");
            if let Some(m) = self.reader.push_line(&line).unwrap() {
                return m;
            }
        }
    }

    /// The final answer (`201` or `400`) for each of `uris`, by URI, and every warning seen.
    async fn answers(&mut self, uris: &[&str]) -> (Vec<Message>, Vec<Message>) {
        let mut done: Vec<Option<Message>> = vec![None; uris.len()];
        let mut warnings = Vec::new();
        while done.iter().any(Option::is_none) {
            let m = self.next().await;
            match m.code {
                201 | 400 => {
                    let i = uris
                        .iter()
                        .position(|u| Some(*u) == m.get("URI"))
                        .unwrap_or_else(|| panic!("an answer for a URI never asked: {m:?}"));
                    assert!(done[i].is_none(), "two answers for {}", uris[i]);
                    done[i] = Some(m);
                }
                104 => warnings.push(m),
                200 | 102 => assert!(uris.contains(&m.get("URI").unwrap_or(""))),
                _ => panic!("unexpected message {m:?}"),
            }
        }
        (done.into_iter().map(Option::unwrap).collect(), warnings)
    }

    /// Closes apt's end; the method ends.
    async fn close(self) -> Result<(), shoal_node::apt::AptError> {
        drop(self.to);
        tokio::time::timeout(SCENARIO_TIMEOUT, self.method)
            .await
            .expect("the method ends when apt closes its input")
            .unwrap()
    }
}

/// A `600 URI Acquire` for `name` on `origin`, to `filename`, with `fields`.
fn acquire(origin: &TestOrigin, name: &str, filename: &Path, fields: &[(&str, String)]) -> Message {
    let uri = origin
        .url(name)
        .to_string()
        .replacen("http://", "shoal+http://", 1);
    let mut m = Message::new(600, "URI Acquire")
        .with("URI", uri)
        .with("Filename", filename.display());
    for (k, v) in fields {
        m = m.with(k, v);
    }
    m
}

/// The settings of every test: the method stays root (the test cannot be `_apt`), and a node
/// in the method listens on loopback only with mDNS off.
fn settings(dir: &Path, socket: &Path) -> Vec<(&'static str, String)> {
    let config = dir.join("shoal.toml");
    std::fs::write(
        &config,
        "[node]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n",
    )
    .unwrap();
    vec![
        ("APT::Sandbox::User", "root".into()),
        ("Acquire::shoal::Socket", socket.display().to_string()),
        ("Acquire::shoal::Config", config.display().to_string()),
        ("Acquire::http::Timeout", "20".into()),
    ]
}

fn sha512_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha512::digest(bytes))
}

fn partial(dir: &Path) -> PathBuf {
    let p = dir.join("partial");
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[tokio::test]
async fn an_index_comes_from_the_origin_with_its_hashes_and_the_second_time_as_an_ims_hit() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(50_000, 3);
    origin.put("InRelease", data.clone());
    let mut apt = Apt::start(&settings(dir.path(), &dir.path().join("none.sock"))).await;
    let file = partial(dir.path()).join("InRelease");
    let m = acquire(
        &origin,
        "InRelease",
        &file,
        &[
            ("Index-File", "true".into()),
            ("Maximum-Size", "10000000".into()),
        ],
    );
    let uri = m.get("URI").unwrap().to_owned();
    apt.send(&m).await;
    let (answers, warnings) = apt.answers(&[&uri]).await;
    let d = &answers[0];
    assert_eq!(d.code, 201, "{d:?}");
    assert!(
        warnings.is_empty(),
        "no daemon is needed for a file without a hash"
    );
    assert_eq!(std::fs::read(&file).unwrap(), data);
    assert_eq!(d.get("Filename"), Some(file.to_str().unwrap()));
    assert_eq!(d.get("Size"), Some("50000"));
    assert_eq!(
        d.get("SHA256-Hash"),
        Some(sha256_of(&data).to_string().as_str())
    );
    assert_eq!(d.get("SHA512-Hash"), Some(sha512_hex(&data).as_str()));
    assert_eq!(d.get("Last-Modified"), Some(LAST_MODIFIED));
    // apt asks again with the date it has: a 304, and the copy it has stands.
    let served = origin.bytes_served();
    apt.send(&acquire(
        &origin,
        "InRelease",
        &file,
        &[
            ("Index-File", "true".into()),
            ("Last-Modified", LAST_MODIFIED.into()),
        ],
    ))
    .await;
    let (answers, _) = apt.answers(&[&uri]).await;
    assert_eq!(answers[0].code, 201, "{:?}", answers[0]);
    assert_eq!(answers[0].get("IMS-Hit"), Some("true"));
    assert_eq!(origin.bytes_served(), served, "no body for a 304");
    assert_eq!(std::fs::read(&file).unwrap(), data);
    apt.close().await.unwrap();
}

#[tokio::test]
async fn a_file_over_apts_maximum_size_or_missing_fails_and_nothing_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    origin.put("InRelease", content(50_000, 4));
    let mut apt = Apt::start(&settings(dir.path(), &dir.path().join("none.sock"))).await;
    let big = partial(dir.path()).join("InRelease");
    let gone = partial(dir.path()).join("Release");
    let m1 = acquire(
        &origin,
        "InRelease",
        &big,
        &[("Maximum-Size", "40000".into())],
    );
    let m2 = acquire(&origin, "Release", &gone, &[]);
    let uris = [
        m1.get("URI").unwrap().to_owned(),
        m2.get("URI").unwrap().to_owned(),
    ];
    apt.send(&m1).await;
    apt.send(&m2).await;
    let (a, _) = apt.answers(&[&uris[0], &uris[1]]).await;
    assert_eq!(
        (a[0].code, a[0].get("FailReason")),
        (400, Some("MaximumSizeExceeded"))
    );
    assert_eq!(a[0].get("Transient-Failure"), None);
    assert!(!big.exists(), "nothing over the limit is left at Filename");
    assert_eq!(
        (a[1].code, a[1].get("FailReason")),
        (400, Some("HttpError404"))
    );
    assert!(!gone.exists());
    apt.close().await.unwrap();
}

#[tokio::test]
async fn debs_come_through_the_daemon_and_a_corrupt_one_never_reaches_filename() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_peer_credentials(dir.path(), Default::default()).await;
    let origin = TestOrigin::start().await;
    let good = content(3 << 20, 5);
    let bad_expected = content(1 << 20, 6);
    let mut corrupt = bad_expected.clone();
    corrupt[1000] ^= 1;
    origin.put("good.deb", good.clone());
    origin.put("bad.deb", corrupt);
    let mut apt = Apt::start(&settings(dir.path(), &daemon.socket)).await;
    let files = [
        partial(dir.path()).join("good.deb"),
        partial(dir.path()).join("bad.deb"),
    ];
    let msgs = [
        acquire(
            &origin,
            "good.deb",
            &files[0],
            &[
                ("Expected-SHA256", sha256_of(&good).to_string()),
                ("Expected-SHA512", sha512_hex(&good)),
                ("Expected-Checksum-FileSize", good.len().to_string()),
            ],
        ),
        acquire(
            &origin,
            "bad.deb",
            &files[1],
            &[
                ("Expected-SHA256", sha256_of(&bad_expected).to_string()),
                ("Expected-Checksum-FileSize", bad_expected.len().to_string()),
            ],
        ),
    ];
    let uris: Vec<String> = msgs
        .iter()
        .map(|m| m.get("URI").unwrap().to_owned())
        .collect();
    for m in &msgs {
        apt.send(m).await;
    }
    let (a, warnings) = apt.answers(&[&uris[0], &uris[1]]).await;
    assert!(warnings.is_empty(), "the daemon answers: {warnings:?}");
    assert_eq!(a[0].code, 201, "{:?}", a[0]);
    assert_eq!(std::fs::read(&files[0]).unwrap(), good);
    assert_eq!(
        a[0].get("SHA256-Hash"),
        Some(sha256_of(&good).to_string().as_str())
    );
    assert_eq!(a[0].get("SHA512-Hash"), Some(sha512_hex(&good).as_str()));
    assert_eq!(
        (a[1].code, a[1].get("FailReason")),
        (400, Some("HashSumMismatch")),
        "{:?}",
        a[1]
    );
    assert!(!files[1].exists(), "no corrupt file at Filename");
    // The daemon did the work: its node fetched the good file, and holds no job open.
    let jobs = daemon.node.jobs();
    assert!(jobs.iter().all(|j| j.state.is_final()), "{jobs:?}");
    apt.close().await.unwrap();
}

#[tokio::test]
async fn without_a_daemon_the_method_fetches_itself_after_one_warning_unless_told_to_fail() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let a = content(1 << 20, 7);
    let b = content(300_000, 8);
    origin.put("a.deb", a.clone());
    origin.put("b.deb", b.clone());
    let socket = dir.path().join("none.sock");
    let mut apt = Apt::start(&settings(dir.path(), &socket)).await;
    let files = [
        partial(dir.path()).join("a.deb"),
        partial(dir.path()).join("b.deb"),
    ];
    let msgs = [
        acquire(
            &origin,
            "a.deb",
            &files[0],
            &[("Expected-SHA256", sha256_of(&a).to_string())],
        ),
        acquire(
            &origin,
            "b.deb",
            &files[1],
            &[("Expected-SHA256", sha256_of(&b).to_string())],
        ),
    ];
    let uris: Vec<String> = msgs
        .iter()
        .map(|m| m.get("URI").unwrap().to_owned())
        .collect();
    for m in &msgs {
        apt.send(m).await;
    }
    let (answers, warnings) = apt.answers(&[&uris[0], &uris[1]]).await;
    assert_eq!(warnings.len(), 1, "one warning for the run: {warnings:?}");
    assert!(
        warnings[0]
            .get("Message")
            .unwrap()
            .contains(socket.to_str().unwrap())
    );
    assert!(answers.iter().all(|m| m.code == 201), "{answers:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), a);
    assert_eq!(std::fs::read(&files[1]).unwrap(), b);
    apt.close().await.unwrap();

    // `Acquire::shoal::Fallback "fail"`: a transient failure naming the socket, no file.
    let mut config = settings(dir.path(), &socket);
    config.push(("Acquire::shoal::Fallback", "fail".into()));
    let mut apt = Apt::start(&config).await;
    std::fs::remove_file(&files[0]).unwrap();
    apt.send(&msgs[0]).await;
    let (answers, _) = apt.answers(&[&uris[0]]).await;
    assert_eq!(answers[0].code, 400);
    assert_eq!(answers[0].get("Transient-Failure"), Some("true"));
    assert!(
        answers[0]
            .get("Message")
            .unwrap()
            .contains(socket.to_str().unwrap())
    );
    assert!(!files[0].exists());
    apt.close().await.unwrap();
}

#[tokio::test]
async fn garbage_from_apt_gets_a_general_failure_and_ends_the_method() {
    let mut apt = Apt::start(&[]).await;
    apt.to
        .write_all(b"this is not a message\n\n")
        .await
        .unwrap();
    let m = apt.next().await;
    assert_eq!(m.code, 401, "{m:?}");
    assert!(m.get("Message").unwrap().contains("this is not a message"));
    assert!(apt.close().await.is_err());
}

#[tokio::test]
async fn started_as_root_the_method_runs_as_the_sandbox_user_before_it_writes_anything() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Stdio;
    let user = shoal_tests::test_user();
    let dir = super::shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(20_000, 9);
    origin.put("InRelease", data.clone());
    // apt's partial directory belongs to its sandbox user; a root-only one next to it.
    let part = partial(dir.path());
    std::os::unix::fs::chown(&part, Some(user.uid), Some(user.gid)).unwrap();
    let private = dir.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut child = tokio::process::Command::new(shoal_tests::node_bin("shoal-apt"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut config = settings(dir.path(), &dir.path().join("none.sock"));
    config[0].1 = "shoal-test".into();
    let mut m = Message::new(601, "Configuration");
    for (k, v) in config {
        m = m.with("Config-Item", format!("{k}={v}"));
    }
    let ok = acquire(&origin, "InRelease", &part.join("InRelease"), &[]);
    let denied = acquire(&origin, "InRelease", &private.join("InRelease"), &[]);
    let mut stdin = child.stdin.take().unwrap();
    let text = [m.encode(), ok.encode()].concat();
    stdin.write_all(text.as_bytes()).await.unwrap();
    // One at a time: the second names the same URI.
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut reader = MessageReader::new();
    let mut next = async || loop {
        let line = tokio::time::timeout(SCENARIO_TIMEOUT, out.next_line())
            .await
            .expect("the method answers in time")
            .unwrap()
            .expect("the method runs");
        if let Some(m) = reader.push_line(&line).unwrap()
            && (m.code == 201 || m.code == 400)
        {
            return m;
        }
    };
    let first = next().await;
    assert_eq!(first.code, 201, "{first:?}");
    let meta = std::fs::metadata(part.join("InRelease")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (user.uid, user.gid),
        "written as the sandbox user"
    );
    assert_eq!(std::fs::read(part.join("InRelease")).unwrap(), data);
    stdin.write_all(denied.encode().as_bytes()).await.unwrap();
    let second = next().await;
    assert_eq!(second.code, 400, "{second:?}");
    assert!(
        second.get("Message").unwrap().contains("Permission denied"),
        "{second:?}"
    );
    assert!(!private.join("InRelease").exists());
    drop(stdin);
    let status = tokio::time::timeout(SCENARIO_TIMEOUT, child.wait())
        .await
        .expect("the method ends when apt closes its input")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn apts_proxy_carries_the_daemons_requests_for_debs_and_direct_means_none() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = TestDaemon::start_with_peer_credentials(dir.path(), Default::default()).await;
    let tiny = shoal_tests::proxy::TinyProxy::start().await;
    let origin = TestOrigin::start().await;
    let deb = content(1 << 20, 8);
    let direct = content(1 << 20, 9);
    origin.put("p.deb", deb.clone());
    origin.put("d.deb", direct.clone());
    let mut config = settings(dir.path(), &daemon.socket);
    config.push(("Acquire::http::Proxy", tiny.url.to_string()));
    // The per-host form wins over the general one: DIRECT for this one host.
    let host = origin.url("d.deb").host_str().unwrap().to_owned();
    let mut apt = Apt::start(&config).await;
    let file = partial(dir.path()).join("p.deb");
    let m = acquire(
        &origin,
        "p.deb",
        &file,
        &[("Expected-SHA256", sha256_of(&deb).to_string())],
    );
    let uri = m.get("URI").unwrap().to_owned();
    apt.send(&m).await;
    let (a, _) = apt.answers(&[&uri]).await;
    assert_eq!(a[0].code, 201, "{:?}", a[0]);
    assert_eq!(std::fs::read(&file).unwrap(), deb);
    let relayed = |from: usize| {
        let seen = origin.state.request_headers.lock().unwrap();
        let all = &seen[from..];
        (
            all.iter()
                .filter(|h| shoal_tests::proxy::relayed(h))
                .count(),
            all.len(),
        )
    };
    let (via, all) = relayed(0);
    assert!(
        all > 0 && via == all,
        "{via} of {all} requests through the proxy"
    );
    apt.close().await.unwrap();

    // `Acquire::http::Proxy::HOST "DIRECT"`: the daemon's job goes straight to the origin.
    config.push((
        Box::leak(format!("Acquire::http::Proxy::{host}").into_boxed_str()),
        "DIRECT".into(),
    ));
    let mark = origin.state.request_headers.lock().unwrap().len();
    let mut apt = Apt::start(&config).await;
    let file = partial(dir.path()).join("d.deb");
    let m = acquire(
        &origin,
        "d.deb",
        &file,
        &[("Expected-SHA256", sha256_of(&direct).to_string())],
    );
    let uri = m.get("URI").unwrap().to_owned();
    apt.send(&m).await;
    let (a, _) = apt.answers(&[&uri]).await;
    assert_eq!(a[0].code, 201, "{:?}", a[0]);
    assert_eq!(std::fs::read(&file).unwrap(), direct);
    let (via, all) = relayed(mark);
    assert!(
        all > 0 && via == 0,
        "{via} of {all} requests through the proxy"
    );
    apt.close().await.unwrap();
}
