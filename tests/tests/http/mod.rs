//! A job's HTTP options (issue 15): headers and credentials, TLS client certificates and extra
//! CAs, proxies (through a real tinyproxy), SetRemoteName and ReplaceRemotePrefix, and the
//! maximum download time. Origins and the proxy listen on 127.0.0.1.

use std::sync::atomic::Ordering;

use shoal_node::job::{ClientCertificate, Credentials, HttpOptions, ProxyUsage};
use shoal_tests::{proxy, tls::TestPki};

use super::*;

/// `Basic base64(user:password)`, as RFC 7617 spells it.
fn basic(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in raw.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

/// A Suspended one-file job of `url` into `local`, expecting `data` by SHA-256 only (what apt
/// and dnf give), with a short retry delay.
async fn suspended_job(node: &Node, url: url::Url, local: &Path, data: &[u8]) -> JobId {
    let job = node.create_job("http", Priority::Normal).await.unwrap();
    node.set_retry_delay(job, Duration::from_millis(100))
        .await
        .unwrap();
    let expected = Expected {
        blake3: None,
        sha256: Some(sha256_of(data)),
    };
    node.add_file(job, spec(url, local, expected))
        .await
        .unwrap();
    job
}

/// Resumes `job`, waits for Transferred, completes it and checks the bytes.
async fn finish(node: &Node, job: JobId, local: &Path, data: &[u8]) -> JobInfo {
    node.resume(job).await.unwrap();
    let info = wait_for(node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(local).unwrap(), data);
    info
}

#[tokio::test]
async fn headers_and_credentials_reach_the_origin_and_never_show_in_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(300_000, 151);
    origin.put("private.bin", data.clone());
    *origin.state.require_authorization.lock().unwrap() = Some(basic("ann", "s3cret"));
    let node = test_node(&[]).await;
    let local = dir.path().join("private.bin");

    // Without credentials the origin says 401: an Error naming the URL, not a retry loop.
    let job = suspended_job(&node, origin.url("private.bin"), &local, &data).await;
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error]).await;
    let e = info.error.unwrap();
    assert_eq!(e.context, ErrorContext::RemoteFile);
    assert!(e.description.contains("401"), "{}", e.description);

    // A reserved header is refused by name, and the job keeps its options.
    let bad = HttpOptions {
        headers: vec![("Range".into(), "bytes=0-".into())],
        ..HttpOptions::default()
    };
    let err = node.set_http_options(job, bad).await.unwrap_err();
    assert!(matches!(err, Error::BadHttpOption { .. }), "{err}");

    let options = HttpOptions {
        headers: vec![
            ("X-Api-Key".into(), "k3y".into()),
            ("X-Fleet".into(), "lab".into()),
        ],
        credentials: Some(Credentials::Basic {
            user: "ann".into(),
            password: "s3cret".into(),
        }),
        ..HttpOptions::default()
    };
    node.set_http_options(job, options.clone()).await.unwrap();
    let before = origin.requests();
    finish(&node, job, &local, &data).await;
    let seen = origin.state.request_headers.lock().unwrap().clone();
    let after: Vec<_> = seen.iter().skip(before as usize).collect();
    assert!(!after.is_empty());
    for h in after {
        assert_eq!(h["x-api-key"], "k3y");
        assert_eq!(h["x-fleet"], "lab");
        assert_eq!(h["authorization"], basic("ann", "s3cret").as_str());
    }

    // What others may see of the options: names, never values or secrets.
    let shown = format!("{:?}", options.redacted());
    assert!(
        !shown.contains("k3y") && !shown.contains("s3cret"),
        "{shown}"
    );
    assert!(!format!("{:?}", node.info(job).unwrap()).contains("s3cret"));
}

#[tokio::test]
async fn a_bearer_token_is_sent_and_a_failing_proxy_is_not_used_for_direct_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(200_000, 152);
    origin.put("t.bin", data.clone());
    *origin.state.require_authorization.lock().unwrap() = Some("Bearer tok-123".into());
    // The node's own proxy is a dead port: a NoProxy job must not go near it.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let node = shoal_tests::test_builder(&[])
        .await
        .origin(shoal_node::config::OriginConfig {
            retries: 1,
            backoff: Duration::from_millis(20),
            proxy: shoal_node::config::OriginProxy::Proxy {
                url: format!("http://127.0.0.1:{dead}").parse().unwrap(),
                bypass: Vec::new(),
            },
            ..shoal_node::config::OriginConfig::default()
        })
        .build()
        .await
        .unwrap();
    let local = dir.path().join("t.bin");
    let job = suspended_job(&node, origin.url("t.bin"), &local, &data).await;
    node.set_http_options(
        job,
        HttpOptions {
            credentials: Some(Credentials::Bearer {
                token: "tok-123".into(),
            }),
            proxy: ProxyUsage::NoProxy,
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    finish(&node, job, &local, &data).await;
}

#[tokio::test]
async fn proxies_relay_the_requests_they_should_and_a_dead_proxy_falls_over_to_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = proxy::TinyProxy::start().await;
    let origin = TestOrigin::start().await;
    let data = content(400_000, 153);
    origin.put("p.bin", data.clone());
    let relayed = |from: usize| -> (usize, usize) {
        let seen = origin.state.request_headers.lock().unwrap();
        let all = &seen[from..];
        (all.iter().filter(|h| proxy::relayed(h)).count(), all.len())
    };

    // Override, with a dead proxy first: the job goes on through the second, tinyproxy.
    let node = test_node(&[]).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let local = dir.path().join("p1.bin");
    let job = suspended_job(&node, origin.url("p.bin"), &local, &data).await;
    node.set_http_options(
        job,
        HttpOptions {
            proxy: ProxyUsage::Override {
                proxies: vec![
                    format!("http://127.0.0.1:{dead}").parse().unwrap(),
                    tiny.url.clone(),
                ],
                bypass: vec!["example.invalid".into()],
            },
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    finish(&node, job, &local, &data).await;
    let (via, all) = relayed(0);
    assert!(
        all > 0 && via == all,
        "{via} of {all} requests came through tinyproxy"
    );

    // NoProxy: straight to the origin.
    let mark = origin.state.request_headers.lock().unwrap().len();
    let local = dir.path().join("p2.bin");
    let job = suspended_job(&node, origin.url("p.bin"), &local, &data).await;
    node.set_http_options(
        job,
        HttpOptions {
            proxy: ProxyUsage::NoProxy,
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    finish(&node, job, &local, &data).await;
    let (via, all) = relayed(mark);
    assert!(
        all > 0 && via == 0,
        "{via} of {all} requests came through tinyproxy"
    );

    // Preconfig: the node's `[origin] proxy`, unless the host is in its bypass list.
    let proxied_node = shoal_tests::test_builder(&[])
        .await
        .origin(shoal_node::config::OriginConfig {
            retries: 2,
            backoff: Duration::from_millis(20),
            proxy: shoal_node::config::OriginProxy::Proxy {
                url: tiny.url.clone(),
                bypass: Vec::new(),
            },
            ..shoal_node::config::OriginConfig::default()
        })
        .build()
        .await
        .unwrap();
    let mark = origin.state.request_headers.lock().unwrap().len();
    let local = dir.path().join("p3.bin");
    let job = suspended_job(&proxied_node, origin.url("p.bin"), &local, &data).await;
    finish(&proxied_node, job, &local, &data).await;
    let (via, all) = relayed(mark);
    assert!(
        all > 0 && via == all,
        "{via} of {all} requests came through tinyproxy"
    );

    // Override with the origin's address in the bypass list: direct.
    let mark = origin.state.request_headers.lock().unwrap().len();
    let local = dir.path().join("p4.bin");
    let job = suspended_job(&node, origin.url("p.bin"), &local, &data).await;
    node.set_http_options(
        job,
        HttpOptions {
            proxy: ProxyUsage::Override {
                proxies: vec![tiny.url.clone()],
                bypass: vec!["127.0.0.1".into()],
            },
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    finish(&node, job, &local, &data).await;
    let (via, all) = relayed(mark);
    assert!(
        all > 0 && via == 0,
        "{via} of {all} requests came through tinyproxy"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_an_error_at_once_and_a_given_ca_makes_it_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (ca, _, _) = pki.write(dir.path());
    let origin = TestOrigin::start_tls(&pki, false).await;
    let data = content(250_000, 154);
    origin.put("s.bin", data.clone());
    let node = test_node(&[]).await;
    let local = dir.path().join("s.bin");
    let job = suspended_job(&node, origin.url("s.bin"), &local, &data).await;
    node.resume(job).await.unwrap();
    // Error, not TransientError: retrying cannot make the certificate verify.
    let info = wait_for(&node, job, &[State::Error, State::TransientError]).await;
    assert_eq!(info.state, State::Error, "{:?}", info.error);
    let e = info.error.unwrap();
    assert_eq!(
        e.context,
        ErrorContext::ServerCertificate,
        "{}",
        e.description
    );
    assert_eq!(origin.requests(), 0, "no request passed the handshake");

    node.set_http_options(
        job,
        HttpOptions {
            ca_certificates: vec![ca],
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    finish(&node, job, &local, &data).await;
}

#[tokio::test]
async fn a_client_certificate_is_presented_and_read_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let (ca, cert, key) = pki.write(dir.path());
    let origin = TestOrigin::start_tls(&pki, true).await;
    let data = content(250_000, 155);
    origin.put("c.bin", data.clone());
    let node = test_node(&[]).await;
    let local = dir.path().join("c.bin");
    let job = suspended_job(&node, origin.url("c.bin"), &local, &data).await;

    // A certificate file that does not exist is refused when it is set, naming it.
    let missing = HttpOptions {
        client_certificate: Some(ClientCertificate {
            certificate: dir.path().join("nope.pem"),
            key: key.clone(),
        }),
        ..HttpOptions::default()
    };
    let err = node.set_http_options(job, missing).await.unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");

    // Without one, the server refuses the handshake: an Error at once.
    node.set_http_options(
        job,
        HttpOptions {
            ca_certificates: vec![ca.clone()],
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error, State::TransientError]).await;
    assert_eq!(info.state, State::Error, "{:?}", info.error);
    assert!(
        info.error.as_ref().unwrap().description.contains("TLS"),
        "{:?}",
        info.error
    );

    node.set_http_options(
        job,
        HttpOptions {
            ca_certificates: vec![ca],
            client_certificate: Some(ClientCertificate {
                certificate: cert,
                key,
            }),
            ..HttpOptions::default()
        },
    )
    .await
    .unwrap();
    finish(&node, job, &local, &data).await;
}

#[tokio::test]
async fn http_options_and_the_maximum_download_time_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let origin = TestOrigin::start().await;
    let data = content(300_000, 156);
    origin.put("r.bin", data.clone());
    *origin.state.require_authorization.lock().unwrap() = Some(basic("bob", "pw"));
    let local = dir.path().join("r.bin");
    let first = stateful_node(&state).await;
    let job = suspended_job(&first, origin.url("r.bin"), &local, &data).await;
    let options = HttpOptions {
        headers: vec![("X-Run".into(), "1".into())],
        credentials: Some(Credentials::Basic {
            user: "bob".into(),
            password: "pw".into(),
        }),
        proxy: ProxyUsage::NoProxy,
        ..HttpOptions::default()
    };
    first.set_http_options(job, options.clone()).await.unwrap();
    first
        .set_maximum_download_time(job, Duration::from_secs(3600))
        .await
        .unwrap();
    first.shutdown().await;
    drop(first);

    let second = stateful_node(&state).await;
    let info = second.info(job).unwrap();
    assert_eq!(info.properties.http, options);
    assert_eq!(info.properties.max_download_time, Duration::from_secs(3600));
    finish(&second, job, &local, &data).await;
    second.shutdown().await;
}

#[tokio::test]
async fn a_job_past_its_maximum_download_time_is_an_error_and_resume_restarts_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(2 << 20, 157);
    origin.put("slow.bin", data.clone());
    // 2 MiB at 256 KiB/s: 8 s, well past a 1 s limit.
    origin
        .state
        .throttle_bytes_per_sec
        .store(256 << 10, Ordering::SeqCst);
    let node = test_node(&[]).await;
    let local = dir.path().join("slow.bin");
    let job = suspended_job(&node, origin.url("slow.bin"), &local, &data).await;
    node.set_maximum_download_time(job, Duration::from_secs(1))
        .await
        .unwrap();
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error, State::Transferred]).await;
    assert_eq!(info.state, State::Error);
    let e = info.error.clone().unwrap();
    assert!(
        e.description.contains("maximum download time"),
        "{}",
        e.description
    );
    assert!(info.active_time >= Duration::from_secs(1));
    assert!(info.bytes_transferred() < data.len() as u64);

    // Resume starts the count again; with the limit lifted the job finishes from where it was.
    node.set_maximum_download_time(job, Duration::ZERO)
        .await
        .unwrap();
    origin
        .state
        .throttle_bytes_per_sec
        .store(0, Ordering::SeqCst);
    let info = finish(&node, job, &local, &data).await;
    assert!(info.active_time < Duration::from_secs(60));
}

#[tokio::test]
async fn a_new_remote_name_keeps_pieces_pinned_by_a_digest_and_discards_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let old = TestOrigin::start().await;
    let new = TestOrigin::start().await;
    let data = content(4 << 20, 158);
    for o in [&old, &new] {
        o.put("m.bin", data.clone());
    }
    old.state
        .throttle_bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let node = test_node(&[]).await;
    let mut events = node.subscribe();

    // With a SHA-256 expected: the pieces verified from the old mirror stay.
    let local = dir.path().join("pinned.bin");
    let job = suspended_job(&node, old.url("m.bin"), &local, &data).await;
    node.resume(job).await.unwrap();
    eventually("a quarter from the old mirror", async || {
        node.info(job).unwrap().bytes_transferred() >= 1 << 20
    })
    .await;
    let discarded = node
        .set_remote_name(job, 0, new.url("m.bin"))
        .await
        .unwrap();
    assert!(!discarded);
    let info = finish(&node, job, &local, &data).await;
    assert_eq!(info.files[0].url, new.url("m.bin"));
    assert!(
        new.bytes_served() < data.len() as u64 - (512 << 10),
        "the new mirror sent {} of {} bytes",
        new.bytes_served(),
        data.len()
    );

    // Without a digest: the pieces go, a JobModification says so, the new mirror sends all.
    let served_before = new.bytes_served();
    let local = dir.path().join("loose.bin");
    let job = node.create_job("loose", Priority::Normal).await.unwrap();
    node.add_file(job, spec(old.url("m.bin"), &local, Expected::default()))
        .await
        .unwrap();
    node.resume(job).await.unwrap();
    eventually("a quarter from the old mirror", async || {
        node.info(job).unwrap().bytes_transferred() >= 1 << 20
    })
    .await;
    while events.try_recv().is_ok() {}
    // ReplaceRemotePrefix, as a roaming client moves to the nearest mirror.
    let old_prefix = format!("http://{}/", old.addr);
    let new_prefix = format!("http://{}/", new.addr);
    let n = node
        .replace_remote_prefix(job, &old_prefix, &new_prefix)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let mut modified = false;
    while let Ok(e) = events.try_recv() {
        modified |= matches!(e, shoal_node::Event::JobModification { job: j, .. } if j == job);
    }
    assert!(modified, "no JobModification for the discarded pieces");
    finish(&node, job, &local, &data).await;
    assert!(new.bytes_served() - served_before >= data.len() as u64);

    // An empty prefix and a non-HTTP result are refused.
    let job = node.create_job("bad", Priority::Normal).await.unwrap();
    node.add_file(
        job,
        spec(
            old.url("m.bin"),
            &dir.path().join("b.bin"),
            Expected::default(),
        ),
    )
    .await
    .unwrap();
    assert!(node.replace_remote_prefix(job, "", "x").await.is_err());
    assert!(matches!(
        node.replace_remote_prefix(job, "http://", "ftp://").await,
        Err(Error::BadUrl { .. })
    ));
    assert!(matches!(
        node.set_remote_name(job, 7, new.url("m.bin")).await,
        Err(Error::UnknownFile { .. })
    ));
}

/// Runs `shoal job --socket SOCKET ARGS...` with `stdin` and answers its stdout; the command
/// must succeed.
async fn shoal_job(socket: &Path, args: &[&str], stdin: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(shoal_tests::node_bin("shoal"))
        .arg("job")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(SCENARIO_TIMEOUT, child.wait_with_output())
        .await
        .expect("shoal job ends in time")
        .unwrap();
    assert!(
        out.status.success(),
        "shoal job {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_cli_sets_credentials_from_stdin_and_a_new_url_and_job_info_shows_no_secret() {
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(300_000, 159);
    origin.put("cli.bin", data.clone());
    *origin.state.require_authorization.lock().unwrap() = Some(basic("ann", "s3cret"));
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig::default(),
    )
    .await;
    let mut c = daemon.client(0).await;
    let local = dir.path().join("cli.bin");
    // First at a URL that does not exist; `set-url` points the file at the right one.
    let job = job_with_file(&mut c, "cli", &origin.url("missing.bin"), &local, &data).await;
    let socket = daemon.socket.clone();
    shoal_job(
        &socket,
        &[
            "set",
            &job.id,
            "--header",
            "X-Api-Key: k3y",
            "--credentials",
            "basic:ann",
            "--proxy-usage",
            "no-proxy",
            "--max-download-time",
            "600",
        ],
        "s3cret\n",
    )
    .await;
    shoal_job(
        &socket,
        &["set-url", &job.id, "0", origin.url("cli.bin").as_str()],
        "",
    )
    .await;
    for args in [vec!["info", &job.id], vec!["info", &job.id, "--json"]] {
        let shown = shoal_job(&socket, &args, "").await;
        assert!(shown.contains("X-Api-Key"), "{shown}");
        assert!(shown.contains("ann"), "{shown}");
        assert!(
            shown.contains("no_proxy") || shown.contains("no-proxy"),
            "{shown}"
        );
        assert!(shown.contains("600"), "{shown}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("k3y"),
            "{shown}"
        );
    }
    let text = shoal_job(&socket, &["info", &job.id], "").await;
    assert!(text.contains("created") && text.contains("GMT"), "{text}");
    shoal_job(&socket, &["resume", &job.id], "").await;
    eventually("the job is transferred", async || {
        c.get_job(jref(&job.id)).await.unwrap().into_inner().state
            == pb::JobState::Transferred as i32
    })
    .await;
    shoal_job(&socket, &["complete", &job.id], "").await;
    assert_eq!(std::fs::read(&local).unwrap(), data);
    let seen = origin.state.request_headers.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|h| h.get("x-api-key").is_some_and(|v| v == "k3y"))
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_user_cannot_make_the_daemon_present_a_key_only_root_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let user = shoal_tests::test_user();
    let dir = shared_dir();
    let pki = TestPki::new();
    // Root's client key, readable by root alone.
    let secret = tempfile::tempdir().unwrap();
    let (_, cert, key) = pki.write(secret.path());
    std::fs::set_permissions(secret.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig {
            socket_mode: 0o666,
            ..shoal_node::daemon::DaemonConfig::default()
        },
    )
    .await;
    let socket = daemon.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| shoal_tests::shoal_job_as(&user, &socket, args);
        let created = run(&["create", "k"]);
        assert!(created.status.success(), "{created:?}");
        let job = String::from_utf8(created.stdout).unwrap().trim().to_owned();
        run(&[
            "set",
            &job,
            "--client-cert",
            &cert.display().to_string(),
            "--client-key",
            &key.display().to_string(),
        ])
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the daemon took root's key for a user"
    );
    assert!(err.contains("ermission denied"), "{err}");
    daemon.stop().await;
}
