//! Upload and upload-reply jobs (issue 15) against the BITS upload server of the test kit
//! (`tests/src/bits_server.rs`, written from the BITS Upload Protocol pages), on 127.0.0.1.

use std::sync::atomic::Ordering;

use shoal_tests::bits_server::BitsServer;

use super::*;

/// An upload job of `local` to `url`, Suspended, with a short retry delay.
async fn upload_job(node: &Node, url: url::Url, local: &Path, reply: bool) -> JobId {
    let job = node
        .create_upload_job("up", Priority::Normal, None, reply)
        .await
        .unwrap();
    node.set_retry_delay(job, Duration::from_millis(100))
        .await
        .unwrap();
    node.add_file(job, spec(url, local, Expected::default()))
        .await
        .unwrap();
    job
}

#[tokio::test]
async fn an_upload_job_commits_its_file_and_complete_waits_for_transferred() {
    let dir = tempfile::tempdir().unwrap();
    let server = BitsServer::start().await;
    let data = content(2_500_000, 171);
    let local = dir.path().join("report.bin");
    std::fs::write(&local, &data).unwrap();
    let node = test_node(&[]).await;
    let rec = Arc::new(Recorder::default());
    let job = upload_job(&node, server.url("report.bin"), &local, false).await;
    node.set_callback(job, rec.clone()).await.unwrap();

    // A second file is refused (BITS: one file per upload job), and so is Complete before
    // the job is Transferred.
    let err = node
        .add_file(
            job,
            spec(server.url("x"), &dir.path().join("x"), Expected::default()),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UploadFiles(_)), "{err}");
    assert!(matches!(
        node.complete(job).await,
        Err(Error::InvalidState(_))
    ));

    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Transferred, State::Error]).await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    // Committed before JobTransferred (BITS: cancelling afterwards does not undo it).
    assert_eq!(server.state.committed("/up/report.bin").unwrap(), data);
    assert_eq!(info.files[0].bytes_transferred, data.len() as u64);
    let packets = server.state.packets();
    assert_eq!(packets.first().unwrap(), "Create-Session");
    assert_eq!(packets.last().unwrap(), "Close-Session");
    assert_eq!(packets.iter().filter(|p| *p == "Fragment").count(), 3);
    eventually("JobTransferred", async || {
        rec.log().iter().any(|l| l.starts_with("JobTransferred"))
    })
    .await;
    node.complete(job).await.unwrap();
    assert_eq!(node.info(job).unwrap().state, State::Acknowledged);
    // The local file is left as it was.
    assert_eq!(std::fs::read(&local).unwrap(), data);
}

#[tokio::test]
async fn an_upload_reply_job_fetches_the_reply_and_complete_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = BitsServer::start().await;
    let answer = content(1_500_000, 172);
    *server.state.reply.lock().unwrap() = Some(answer.clone());
    let data = content(300_000, 173);
    let local = dir.path().join("form.bin");
    std::fs::write(&local, &data).unwrap();
    let node = test_node(&[]).await;
    let job = upload_job(&node, server.url("form.bin"), &local, true).await;
    let reply_name = node.info(job).unwrap().reply_file_name.unwrap();
    assert_eq!(reply_name, dir.path().join("form.bin.reply"));
    assert!(node.reply_data(job).await.unwrap().is_empty());
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Transferred, State::Error]).await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    // The reply arrived before Close-Session (the server drops it then).
    let packets = server.state.packets();
    assert_eq!(packets.last().unwrap(), "Close-Session");
    assert_eq!(node.reply_data(job).await.unwrap(), answer[..1 << 20]);
    assert!(!reply_name.exists(), "the reply appears only on Complete");
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&reply_name).unwrap(), answer);
    assert_eq!(node.reply_data(job).await.unwrap(), answer[..1 << 20]);
}

#[tokio::test]
async fn a_refused_session_or_a_failing_reply_url_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = BitsServer::start().await;
    let local = dir.path().join("f.bin");
    std::fs::write(&local, content(10_000, 174)).unwrap();
    let node = test_node(&[]).await;

    server.state.create_status.store(403, Ordering::SeqCst);
    let job = upload_job(&node, server.url("f.bin"), &local, false).await;
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error, State::Transferred]).await;
    let e = info.error.unwrap();
    assert_eq!(e.context, ErrorContext::RemoteFile);
    assert!(
        e.description.contains("403") && e.description.contains("Create-Session"),
        "{}",
        e.description
    );

    server.state.create_status.store(0, Ordering::SeqCst);
    *server.state.reply.lock().unwrap() = Some(b"ok".to_vec());
    server.state.reply_status.store(404, Ordering::SeqCst);
    let job = upload_job(&node, server.url("g.bin"), &local, true).await;
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error, State::Transferred]).await;
    assert_eq!(info.state, State::Error);
    assert!(
        info.error.unwrap().description.contains("reply"),
        "the error names the reply"
    );
    // Not committed: Close-Session never went out.
    assert_eq!(server.state.committed("/up/g.bin"), None);
}

#[tokio::test]
async fn an_upload_resumes_in_its_session_after_a_restart_and_cancel_sends_cancel_session() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = BitsServer::start().await;
    // 8 fragments, each acknowledged after 150 ms.
    server.state.fragment_delay_ms.store(150, Ordering::SeqCst);
    let data = content(8 << 20, 175);
    let local = dir.path().join("big.bin");
    std::fs::write(&local, &data).unwrap();
    let first = stateful_node(&state).await;
    let job = upload_job(&first, server.url("big.bin"), &local, false).await;
    first.resume(job).await.unwrap();
    eventually("two fragments acknowledged", async || {
        first.info(job).unwrap().bytes_transferred() >= 2 << 20
    })
    .await;
    first.shutdown().await;
    drop(first);

    server.state.fragment_delay_ms.store(0, Ordering::SeqCst);
    // (The restored job runs at once: what it kept shows in the packets the server saw.)
    let second = stateful_node(&state).await;
    let info = wait_for(&second, job, &[State::Transferred, State::Error]).await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    assert_eq!(server.state.committed("/up/big.bin").unwrap(), data);
    let packets = server.state.packets();
    assert_eq!(
        packets.iter().filter(|p| *p == "Create-Session").count(),
        1,
        "one session, resumed: {packets:?}"
    );
    // Fewer fragments than two full passes: the restart went on from the acknowledged bytes.
    assert!(
        packets.iter().filter(|p| *p == "Fragment").count() < 12,
        "{packets:?}"
    );

    // Cancel of an upload in progress cancels its session on the server.
    server.state.fragment_delay_ms.store(150, Ordering::SeqCst);
    let job = upload_job(&second, server.url("c.bin"), &local, false).await;
    second.resume(job).await.unwrap();
    eventually("a fragment acknowledged", async || {
        second.info(job).unwrap().bytes_transferred() > 0
    })
    .await;
    second.cancel(job).await.unwrap();
    assert_eq!(server.state.packets().last().unwrap(), "Cancel-Session");
    assert_eq!(server.state.committed("/up/c.bin"), None);
    second.shutdown().await;
}

#[tokio::test]
async fn an_upload_reply_job_through_the_api_and_the_cli() {
    let dir = shared_dir();
    let server = BitsServer::start().await;
    *server.state.reply.lock().unwrap() = Some(b"receipt 42".to_vec());
    let daemon = TestDaemon::start_with_peer_credentials(
        dir.path(),
        shoal_node::daemon::DaemonConfig::default(),
    )
    .await;
    let local = dir.path().join("r.bin");
    std::fs::write(&local, content(50_000, 176)).unwrap();
    let socket = daemon.socket.display().to_string();
    let shoal = |args: Vec<String>| {
        let socket = socket.clone();
        async move {
            let out = tokio::process::Command::new(shoal_tests::node_bin("shoal"))
                .arg("job")
                .arg("--socket")
                .arg(&socket)
                .args(&args)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "shoal job {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        }
    };
    let id = String::from_utf8(
        shoal(vec![
            "create".into(),
            "r".into(),
            "--type".into(),
            "upload-reply".into(),
        ])
        .await,
    )
    .unwrap()
    .trim()
    .to_owned();
    shoal(vec![
        "add".into(),
        id.clone(),
        server.url("r.bin").to_string(),
        local.display().to_string(),
    ])
    .await;
    shoal(vec!["resume".into(), id.clone()]).await;
    let mut c = daemon.client(0).await;
    eventually("Transferred", async || {
        c.get_job(jref(&id)).await.unwrap().into_inner().state == pb::JobState::Transferred as i32
    })
    .await;
    assert_eq!(shoal(vec!["reply".into(), id.clone()]).await, b"receipt 42");
    let info = String::from_utf8(shoal(vec!["info".into(), id.clone()]).await).unwrap();
    assert!(
        info.contains("upload-reply") && info.contains("r.bin.reply"),
        "{info}"
    );
    shoal(vec!["complete".into(), id.clone()]).await;
    assert_eq!(
        std::fs::read(dir.path().join("r.bin.reply")).unwrap(),
        b"receipt 42"
    );
    daemon.stop().await;
}
