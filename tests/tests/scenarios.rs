//! Multi-node scenarios on 127.0.0.1 with mDNS off. Each test bounds its own duration and uses
//! its own temporary directory.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use sha2::Digest as _;
use shoal_node::daemon::control as pb;
use shoal_node::{
    Callback, CallbackError, Error, Expected, FileSpec, JobId, JobInfo, Node, Priority, State,
    TransferredFile, ValidationState, job::ErrorContext,
};
use shoal_tests::{
    BadPeer, Misbehaviour, TestDaemon, TestOrigin, content, stateful_node, test_node,
    test_node_with,
};
use shoal_validator::Sha256Digest;

mod apt;
mod bandwidth;
mod cache;
mod cluster;
mod dayone;
mod fuzz;
mod hostile;
mod http;
mod lan;
mod security;
mod tidy;
mod upload;

/// Upper bound of any single scenario.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

fn sha256_of(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest(sha2::Sha256::digest(bytes).into())
}

fn blake3_of(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// Expects `bytes` by BLAKE3 alone, the case where pieces verify from the first byte.
fn blake3_only(bytes: &[u8]) -> Expected {
    Expected {
        blake3: Some(blake3_of(bytes)),
        sha256: None,
    }
}

/// Records what the node called, answers validation with queued verdicts, and fails
/// JobTransferred a set number of times.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
    verdicts: Mutex<Vec<ValidationState>>,
    fail_transferred: AtomicU32,
    transferred_calls: AtomicU32,
}

impl Recorder {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Callback for Recorder {
    fn file_transferred(
        &self,
        _job: JobInfo,
        file: TransferredFile,
    ) -> BoxFuture<'static, ValidationState> {
        self.log.lock().unwrap().push(format!(
            "FileTransferred {} peers={}",
            file.index, file.from_peers
        ));
        let v = {
            let mut q = self.verdicts.lock().unwrap();
            if q.is_empty() {
                ValidationState::Valid
            } else {
                q.remove(0)
            }
        };
        Box::pin(async move { v })
    }

    fn job_transferred(&self, _job: JobInfo) -> BoxFuture<'static, Result<(), CallbackError>> {
        self.transferred_calls.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push("JobTransferred".into());
        let fail = self
            .fail_transferred
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            if fail {
                Err(CallbackError("not yet".into()))
            } else {
                Ok(())
            }
        })
    }

    fn job_error(
        &self,
        _job: JobInfo,
        error: shoal_node::job::JobError,
    ) -> BoxFuture<'static, Result<(), CallbackError>> {
        self.log
            .lock()
            .unwrap()
            .push(format!("JobError {:?}", error.context));
        Box::pin(async { Ok(()) })
    }
}

/// Waits until `cond` holds, failing after the scenario timeout.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(node: &Node, job: JobId, want: &[State]) -> JobInfo {
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    loop {
        let info = node.info(job).unwrap();
        if want.contains(&info.state) {
            return info;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job stuck in {:?} (error {:?}), wanted {want:?}",
            info.state,
            info.error
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spec(url: url::Url, local: &Path, expected: Expected) -> FileSpec {
    FileSpec {
        url,
        local_name: local.to_owned(),
        expected,
        ranges: Vec::new(),
    }
}

/// Creates a one-file job with `rec` as callback and resumes it.
async fn start_job(node: &Node, file: FileSpec, rec: &Arc<Recorder>) -> JobId {
    let job = node.create_job("test", Priority::Normal).await.unwrap();
    node.set_callback(job, rec.clone()).await.unwrap();
    node.set_retry_delay(job, Duration::from_millis(100))
        .await
        .unwrap();
    node.add_file(job, file).await.unwrap();
    node.resume(job).await.unwrap();
    job
}

/// Runs a one-file job of `url` into `local` to Acknowledged and returns its final snapshot.
async fn fetch(node: &Node, url: url::Url, local: &Path, data: &[u8]) -> JobInfo {
    let rec = Arc::new(Recorder::default());
    let job = start_job(node, spec(url, local, blake3_only(data)), &rec).await;
    let info = wait_for(node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(local).unwrap(), data, "{}", local.display());
    info
}

async fn seed_node(dir: &Path, name: &str, bytes: &[u8]) -> Node {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let node = test_node(&[]).await;
    node.seed(&path).await.unwrap();
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_on_hearing_the_job_transferred_still_finds_the_callback_called_once() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(1_000_000, 5);
    origin.put("t.bin", data.clone());
    let node = test_node(&[]).await;
    let mut events = node.subscribe();
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("t.bin");
    let job = start_job(
        &node,
        spec(origin.url("t.bin"), &dest, blake3_only(&data)),
        &rec,
    )
    .await;
    // Complete at the very moment the job is heard to be Transferred, before its runner
    // could go on: the JobTransferred it was due still reaches the callback, once.
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        loop {
            if let Ok(shoal_node::Event::JobModification {
                job: j,
                state: State::Transferred,
            }) = events.recv().await
                && j == job
            {
                return;
            }
        }
    })
    .await
    .expect("the job became Transferred");
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    while rec.transferred_calls.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "JobTransferred never came"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rec.transferred_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn origin_only_job_transfers_verifies_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(3_000_000, 1);
    origin.put("a.bin", data.clone());
    let node = test_node(&[]).await;
    let mut events = node.subscribe();
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("a.bin");
    let expected = Expected {
        blake3: None,
        sha256: Some(sha256_of(&data)),
    };
    let job = start_job(&node, spec(origin.url("a.bin"), &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    // The file does not exist under its name before Complete; the temporary file does.
    assert!(!dest.exists());
    assert!(info.files[0].temp_name.exists());
    assert_eq!(info.files[0].bytes_from.origin, data.len() as u64);
    assert_eq!(info.files[0].bytes_from.peers(), 0);
    assert_eq!(info.files[0].content_id.unwrap().hash(), &blake3_of(&data));
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert!(!info.files[0].temp_name.exists());
    assert_eq!(node.info(job).unwrap().state, State::Acknowledged);
    assert_eq!(
        rec.log(),
        vec!["FileTransferred 0 peers=false", "JobTransferred"]
    );
    // Events come in BITS order: Queued, Connecting, Transferring, FileTransferred,
    // Transferred, JobTransferred, Acknowledged.
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(match e {
            shoal_node::Event::JobModification { state, .. } => format!("{state}"),
            shoal_node::Event::FileTransferred { .. } => "FileTransferred".into(),
            shoal_node::Event::JobTransferred { .. } => "JobTransferred".into(),
            shoal_node::Event::JobError { .. } => "JobError".into(),
        });
    }
    assert_eq!(
        seen,
        vec![
            "Queued",
            "Connecting",
            "Transferring",
            "FileTransferred",
            "Transferred",
            "JobTransferred",
            "Acknowledged"
        ]
    );
    // Complete on an Acknowledged job is InvalidState.
    assert!(matches!(
        node.complete(job).await,
        Err(Error::InvalidState(_))
    ));
    node.shutdown().await;
}

/// A node that stops after its download (`shoal get`) does not compute a SHA-256 nobody
/// expects; a node that stays (the default) does, and answers SHA-256 lookups with it.
#[tokio::test]
async fn an_unexpected_sha256_is_computed_only_by_nodes_that_serve_it_afterwards() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(3_000_000, 21);
        origin.put("a.bin", data.clone());
        let stays = test_node(&[]).await;
        let info = fetch(&stays, origin.url("a.bin"), &dir.path().join("a1"), &data).await;
        assert_eq!(info.files[0].sha256, Some(sha256_of(&data)));
        let one_shot = shoal_tests::test_builder(&[])
            .await
            .sha256_only_when_expected(true)
            .build()
            .await
            .unwrap();
        let info = fetch(
            &one_shot,
            origin.url("a.bin"),
            &dir.path().join("a2"),
            &data,
        )
        .await;
        assert_eq!(info.files[0].sha256, None, "not expected, not computed");
        // Expected: computed and checked all the same.
        let rec = Arc::new(Recorder::default());
        let expected = Expected {
            blake3: None,
            sha256: Some(sha256_of(&data)),
        };
        let dest = dir.path().join("a3");
        let job = start_job(&one_shot, spec(origin.url("a.bin"), &dest, expected), &rec).await;
        let info = wait_for(&one_shot, job, &[State::Transferred]).await;
        assert_eq!(info.files[0].sha256, Some(sha256_of(&data)));
        // A client that knows only the SHA-256 finds the file at the node that stayed.
        let served = origin.bytes_served();
        let asker = test_node(std::slice::from_ref(&stays)).await;
        let rec = Arc::new(Recorder::default());
        let dest = dir.path().join("a4");
        let job = start_job(&asker, spec(origin.url("a.bin"), &dest, expected), &rec).await;
        let info = wait_for(&asker, job, &[State::Transferred]).await;
        assert_eq!(info.files[0].bytes_from.peers(), data.len() as u64);
        asker.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert!(origin.bytes_served() - served < data.len() as u64 / 2);
        for n in [stays, one_shot, asker] {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario within its bound");
}

#[tokio::test]
async fn one_seed_three_leechers_take_most_pieces_from_peers() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(8 << 20, 2);
    origin.put("big.bin", data.clone());
    let seed = seed_node(dir.path(), "seed.bin", &data).await;
    let expected = blake3_only(&data);
    let mut leechers = Vec::new();
    for _ in 0..3 {
        leechers.push(test_node(std::slice::from_ref(&seed)).await);
    }
    let mut jobs = Vec::new();
    for (i, node) in leechers.iter().enumerate() {
        let rec = Arc::new(Recorder::default());
        let dest = dir.path().join(format!("out{i}.bin"));
        let job = start_job(node, spec(origin.url("big.bin"), &dest, expected), &rec).await;
        jobs.push((node, job, dest, rec));
    }
    let mut from_peers = 0;
    for (node, job, dest, rec) in &jobs {
        let info = wait_for(node, *job, &[State::Transferred]).await;
        from_peers += info.bytes_from().peers();
        // Listed peers and the leechers that connected to each other on 127.0.0.1 are LAN
        // peers; the node-wide figures add up to the job's.
        assert_eq!(info.bytes_from().lan_peers, info.bytes_from().peers());
        let stats = node.stats();
        assert_eq!(stats.bytes_from.peers(), info.bytes_from().peers());
        assert_eq!(stats.bytes_from.origin, info.bytes_from().origin);
        let pct = 100.0 * info.bytes_from().peers() as f64 / data.len() as f64;
        assert!((info.percent_peer_caching() - pct).abs() < 1e-9);
        node.complete(*job).await.unwrap();
        assert_eq!(std::fs::read(dest).unwrap(), data);
        assert_eq!(rec.transferred_calls.load(Ordering::SeqCst), 1);
    }
    // Most pieces came from peers: the origin served less than one copy in all.
    assert!(
        origin.bytes_served() < data.len() as u64,
        "origin served {} bytes for 3 × {} bytes",
        origin.bytes_served(),
        data.len()
    );
    assert!(from_peers > 2 * data.len() as u64);
    for (node, ..) in &jobs {
        node.shutdown().await;
    }
    seed.shutdown().await;
}

#[tokio::test]
async fn rogue_peers_are_banned_and_the_bytes_are_right_anyway() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(4 << 20, 3);
    origin.put("f.bin", data.clone());
    let flip = BadPeer::start(Misbehaviour::FlipBytes, &data).await;
    // Claims every piece, answers NotFound for half of them: it loses score, it is not banned.
    let layer = BadPeer::start(Misbehaviour::FalseHave, &data).await;
    let honest = seed_node(dir.path(), "h.bin", &data).await;
    let node = test_node_with(std::slice::from_ref(&honest), &[&flip, &layer]).await;
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("out.bin");
    let expected = blake3_only(&data);
    // All three peers are connected before the job asks around.
    eventually("all three peers connected", async || {
        node.connected_peers().await.len() == 3
    })
    .await;
    let job = start_job(&node, spec(origin.url("f.bin"), &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert!(
        info.peer_stats.pieces_rejected >= 1,
        "{:?}",
        info.peer_stats
    );
    assert_eq!(info.peer_stats.peers_banned, 1, "{:?}", info.peer_stats);
    assert_eq!(rec.transferred_calls.load(Ordering::SeqCst), 1);
    for n in [node, honest] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn a_wrong_piece_layer_bans_the_peer_and_the_origin_fills_in() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(1 << 20, 12);
    origin.put("f.bin", data.clone());
    let rogue = BadPeer::start(Misbehaviour::WrongLayer, &data).await;
    let node = test_node_with(&[], &[&rogue]).await;
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("out.bin");
    let expected = blake3_only(&data);
    let job = start_job(&node, spec(origin.url("f.bin"), &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(info.peer_stats.peers_banned, 1);
    assert_eq!(info.files[0].bytes_from.peers(), 0);
    assert_eq!(origin.bytes_served(), data.len() as u64 + 1);
    node.shutdown().await;
}

#[tokio::test]
async fn a_lying_sha256_claim_is_refetched_from_the_origin_and_banned() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(2 << 20, 4);
    let other = content(2 << 20, 5);
    origin.put("f.bin", data.clone());
    // The liar holds other content and claims it is what the SHA-256 names.
    let liar = BadPeer::start(Misbehaviour::LyingSha256(sha256_of(&data)), &other).await;
    let node = test_node_with(&[], &[&liar]).await;
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("out.bin");
    let expected = Expected {
        blake3: None,
        sha256: Some(sha256_of(&data)),
    };
    let job = start_job(&node, spec(origin.url("f.bin"), &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(info.files[0].bytes_from.peers(), 0);
    assert_eq!(info.files[0].bytes_from.origin, data.len() as u64);
    assert_eq!(info.peer_stats.peers_banned, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn invalid_verdicts_refetch_peer_content_and_fail_on_origin_content() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(1 << 20, 6);
    origin.put("f.bin", data.clone());
    let seed = seed_node(dir.path(), "s.bin", &data).await;
    let node = test_node(std::slice::from_ref(&seed)).await;
    let expected = blake3_only(&data);
    // Invalid on peer content: the file comes again, from the origin alone.
    let rec = Arc::new(Recorder::default());
    rec.verdicts.lock().unwrap().push(ValidationState::Invalid);
    let dest = dir.path().join("a.bin");
    let job = start_job(&node, spec(origin.url("f.bin"), &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    assert_eq!(
        rec.log(),
        vec![
            "FileTransferred 0 peers=true",
            "FileTransferred 0 peers=false",
            "JobTransferred"
        ]
    );
    assert_eq!(info.files[0].bytes_from.origin, data.len() as u64);
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    // Invalid on origin content: the job goes to Error.
    let rec = Arc::new(Recorder::default());
    rec.verdicts.lock().unwrap().push(ValidationState::Invalid);
    let dest = dir.path().join("b.bin");
    let job = start_job(
        &node,
        spec(origin.url("f.bin"), &dest, Expected::default()),
        &rec,
    )
    .await;
    let info = wait_for(&node, job, &[State::Error]).await;
    assert_eq!(info.error.unwrap().context, ErrorContext::Validation);
    assert_eq!(
        rec.log(),
        vec!["FileTransferred 0 peers=false", "JobError Validation"]
    );
    assert!(!dest.exists());
    node.shutdown().await;
    seed.shutdown().await;
}

#[tokio::test]
async fn complete_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let small = content(100_000, 7);
    origin.put("small.bin", small.clone());
    let node = test_node(&[]).await;
    // A job whose second file cannot arrive: Complete keeps only the first.
    let job = node.create_job("early", Priority::Normal).await.unwrap();
    let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
    node.add_file(job, spec(origin.url("small.bin"), &a, Expected::default()))
        .await
        .unwrap();
    node.add_file(
        job,
        spec(origin.url("missing.bin"), &b, Expected::default()),
    )
    .await
    .unwrap();
    node.set_retry_delay(job, Duration::from_secs(3600))
        .await
        .unwrap();
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error]).await;
    assert!(info.files[0].transferred && !info.files[1].transferred);
    let err = info.error.unwrap();
    assert_eq!(err.context, ErrorContext::RemoteFile);
    assert!(err.description.contains("missing.bin"), "{err}");
    assert!(!a.exists() && !b.exists());
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), small);
    assert!(!b.exists());
    assert!(!info.files[1].temp_name.exists());
    // Complete after Cancel is InvalidState, and Cancel deletes the temporary files.
    let job = node.create_job("cancelled", Priority::Low).await.unwrap();
    let c = dir.path().join("c.bin");
    node.add_file(job, spec(origin.url("small.bin"), &c, Expected::default()))
        .await
        .unwrap();
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Transferred]).await;
    node.cancel(job).await.unwrap();
    assert!(!info.files[0].temp_name.exists());
    assert!(matches!(
        node.complete(job).await,
        Err(Error::InvalidState(_))
    ));
    assert!(!c.exists());
    node.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = test_node(&[]).await;
    let job = node.create_job("bad", Priority::Normal).await.unwrap();
    assert!(matches!(node.resume(job).await, Err(Error::Empty(_))));
    let url: url::Url = "http://127.0.0.1:9/x".parse().unwrap();
    let escape = dir.path().join("sub/../../x.bin");
    assert!(matches!(
        node.add_file(job, spec(url.clone(), &escape, Expected::default()))
            .await,
        Err(Error::BadLocalName { .. })
    ));
    assert!(matches!(
        node.add_file(job, spec(url.clone(), dir.path(), Expected::default()))
            .await,
        Err(Error::BadLocalName { .. })
    ));
    let ftp: url::Url = "ftp://127.0.0.1/x".parse().unwrap();
    assert!(matches!(
        node.add_file(job, spec(ftp, &dir.path().join("y"), Expected::default()))
            .await,
        Err(Error::BadUrl { .. })
    ));
    let ok = dir.path().join("ok.bin");
    node.add_file(job, spec(url.clone(), &ok, Expected::default()))
        .await
        .unwrap();
    assert!(matches!(
        node.add_file(job, spec(url, &ok, Expected::default()))
            .await,
        Err(Error::DuplicateLocalName(_))
    ));
    assert!(matches!(node.info(JobId::new()), Err(Error::UnknownJob(_))));
    node.shutdown().await;
}

#[tokio::test]
async fn origin_misbehaviour_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(1_500_000, 8);
    origin.put("f.bin", data.clone());
    let node = test_node(&[]).await;
    let expected = Expected {
        blake3: Some(blake3_of(&data)),
        sha256: Some(sha256_of(&data)),
    };
    let run = async |name: &str| -> (JobInfo, PathBuf) {
        let rec = Arc::new(Recorder::default());
        let dest = dir.path().join(name);
        let job = start_job(&node, spec(origin.url("f.bin"), &dest, expected), &rec).await;
        let info = wait_for(&node, job, &[State::Transferred, State::Error]).await;
        if info.state == State::Transferred {
            node.complete(job).await.unwrap();
        }
        (info, dest)
    };
    // A redirect is followed.
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("redirected.bin");
    let url = format!("http://{}/redirect/f.bin", origin.addr)
        .parse()
        .unwrap();
    let job = start_job(&node, spec(url, &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred, State::Error]).await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    // An empty file transfers too.
    origin.put("empty.bin", Vec::new());
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("empty.bin");
    let empty = Expected {
        blake3: Some(blake3_of(&[])),
        sha256: Some(sha256_of(&[])),
    };
    let job = start_job(&node, spec(origin.url("empty.bin"), &dest, empty), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred, State::Error]).await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), Vec::<u8>::new());
    // No Range support: a 200 with the whole body still works.
    origin.state.no_range.store(true, Ordering::SeqCst);
    let (info, dest) = run("norange.bin").await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    origin.state.no_range.store(false, Ordering::SeqCst);
    // 500 twice, then 200: retried.
    origin.state.fail_next.store(2, Ordering::SeqCst);
    let (info, dest) = run("retry.bin").await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    // A body cut midway is resumed with a Range request. The probe is the first request;
    // the body of the second is cut, armed before the job starts.
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("cut.bin");
    let job = node.create_job("cut", Priority::Normal).await.unwrap();
    node.set_callback(job, rec).await.unwrap();
    node.add_file(job, spec(origin.url("f.bin"), &dest, expected))
        .await
        .unwrap();
    let cut_at = origin.requests() + 2;
    origin.cut_request(2, 700_000);
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Transferred, State::Error]).await;
    assert_eq!(info.state, State::Transferred, "{:?}", info.error);
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let log = origin.requests_with_range();
    let cut_start = log
        .iter()
        .find(|(n, _)| *n == cut_at)
        .and_then(|(_, r)| *r)
        .map(|(start, _)| start)
        .unwrap_or_else(|| panic!("request {cut_at} was cut and asked for a range: {log:?}"));
    // After the cut, a request resumed inside what the cut one had received, not from its
    // start again.
    assert!(
        log.iter().any(|(n, r)| *n > cut_at
            && r.is_some_and(|(start, _)| start > cut_start && start <= cut_start + 700_000)),
        "no request resumed the cut body at {cut_start}: {log:?}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn content_changed_midway_is_an_error_not_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(1 << 20, 9);
    origin.put("f.bin", data.clone());
    let node = test_node(&[]).await;
    // The content changes right after the probe (armed before the job starts): every range
    // request then fails If-Range.
    let job = node.create_job("changing", Priority::Normal).await.unwrap();
    let dest = dir.path().join("out.bin");
    node.add_file(job, spec(origin.url("f.bin"), &dest, Expected::default()))
        .await
        .unwrap();
    origin.replace_after_request(1, "f.bin", content(1 << 20, 10));
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error, State::Transferred]).await;
    assert_eq!(info.state, State::Error, "{info:?}");
    let e = info.error.unwrap();
    assert!(e.description.contains("changed"), "{e}");
    assert!(!dest.exists());
    node.shutdown().await;
}

#[tokio::test]
async fn a_failing_job_transferred_handler_is_called_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    origin.put("f.bin", content(50_000, 11));
    let node = test_node(&[]).await;
    let rec = Arc::new(Recorder::default());
    rec.fail_transferred.store(2, Ordering::SeqCst);
    let job = start_job(
        &node,
        spec(
            origin.url("f.bin"),
            &dir.path().join("f.bin"),
            Expected::default(),
        ),
        &rec,
    )
    .await;
    wait_for(&node, job, &[State::Transferred]).await;
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    while rec.transferred_calls.load(Ordering::SeqCst) < 3 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once the node has nothing left to do, the handler was called three times: a fourth
    // call would keep the job's runner at work until it was made.
    node.wait_idle().await;
    assert_eq!(rec.transferred_calls.load(Ordering::SeqCst), 3);
    node.shutdown().await;
}

#[tokio::test]
async fn a_missing_file_is_an_error_naming_the_url() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let node = test_node(&[]).await;
    let rec = Arc::new(Recorder::default());
    let job = start_job(
        &node,
        spec(
            origin.url("nope.bin"),
            &dir.path().join("n.bin"),
            Expected::default(),
        ),
        &rec,
    )
    .await;
    let info = wait_for(&node, job, &[State::Error]).await;
    let e = info.error.unwrap();
    assert!(e.description.contains("/nope.bin"), "{e}");
    assert!(e.description.contains("404"), "{e}");
    assert_eq!(rec.log(), vec!["JobError RemoteFile"]);
    node.shutdown().await;
}

#[tokio::test]
async fn suspend_and_resume_finish_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(2_000_000, 13);
    origin.put("f.bin", data.clone());
    let node = test_node(&[]).await;
    let job = node.create_job("pausing", Priority::High).await.unwrap();
    let dest = dir.path().join("f.bin");
    node.add_file(job, spec(origin.url("f.bin"), &dest, Expected::default()))
        .await
        .unwrap();
    node.resume(job).await.unwrap();
    node.suspend(job).await.unwrap();
    assert_eq!(node.info(job).unwrap().state, State::Suspended);
    // Suspended stays suspended: nothing moves it on its own, once the stopped runner ended.
    node.wait_idle().await;
    assert_eq!(node.info(job).unwrap().state, State::Suspended);
    node.resume(job).await.unwrap();
    wait_for(&node, job, &[State::Transferred]).await;
    assert!(matches!(
        node.suspend(job).await,
        Err(Error::InvalidState(_))
    ));
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    node.shutdown().await;
}

#[tokio::test]
async fn a_leecher_fetches_from_a_seed_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(3 << 20, 14);
    origin.put("f.bin", data.clone());
    let path = dir.path().join("seed.bin");
    std::fs::write(&path, &data).unwrap();
    let seed = Node::builder()
        .listen(vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()])
        .mdns(false)
        .build()
        .await
        .unwrap();
    seed.seed(&path).await.unwrap();
    let addrs = seed.listen_addrs().await;
    assert!(addrs.iter().all(|a| a.to_string().contains("/quic-v1/")));
    let node = test_node(std::slice::from_ref(&seed)).await;
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("out.bin");
    let expected = blake3_only(&data);
    let job = start_job(&node, spec(origin.url("f.bin"), &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(info.files[0].bytes_from.peers(), data.len() as u64);
    // With the content id known and a seed holding every piece, the origin is never contacted.
    assert_eq!(origin.bytes_served(), 0);
    node.shutdown().await;
    seed.shutdown().await;
}

#[tokio::test]
async fn uploads_beyond_the_bound_are_answered_busy_and_the_download_still_completes() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(2 << 20, 15);
    origin.put("f.bin", data.clone());
    let path = dir.path().join("seed.bin");
    std::fs::write(&path, &data).unwrap();
    let seed = Node::builder()
        .listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
        .mdns(false)
        .max_concurrent_uploads(1)
        // 1 MiB/s after a burst of 1 MiB: past the burst, the one slot is held about 16 ms
        // a piece, so the leecher's other requests in flight find it taken however loaded
        // the machine is (without a limit, a piece can be served before the next request is
        // read, and nothing is ever busy).
        .bandwidth(shoal_node::config::BandwidthLimits {
            upload: Some(1 << 20),
            ..Default::default()
        })
        .build()
        .await
        .unwrap();
    seed.seed(&path).await.unwrap();
    let node = test_node(std::slice::from_ref(&seed)).await;
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("out.bin");
    let expected = blake3_only(&data);
    let job = start_job(&node, spec(origin.url("f.bin"), &dest, expected), &rec).await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    let served = seed.upload_stats();
    // The leecher keeps several requests in flight; the seed takes one at a time.
    assert!(served.busy > 0, "{served:?}");
    // Every byte counted from peers was served by the seed; beyond them, at most the second
    // copies of the endgame (pieces also in flight from the origin), whole pieces each.
    let piece = shoal_node::ContentId::new([0; 32], data.len() as u64)
        .unwrap()
        .piece_size();
    let extra = served.bytes - info.files[0].bytes_from.peers();
    assert!(
        extra.is_multiple_of(piece) && extra <= 48 * piece,
        "{served:?} {extra}"
    );
    // Busy is not bad faith: nobody was banned.
    assert_eq!(info.peer_stats.peers_banned, 0);
    node.shutdown().await;
    seed.shutdown().await;
}

/// A seed of `data` (`setup` runs on it before it seeds) and a node that fetches `data` from
/// it with its BLAKE3 given: the seed, the node, and the job at Transferred, completed, with
/// every byte from the seed and none from the origin.
async fn fetch_from_one_seed(data: &[u8], setup: impl FnOnce(&Node)) -> (Node, Node, JobInfo) {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    origin.put("f.bin", data.to_vec());
    let path = dir.path().join("seed.bin");
    std::fs::write(&path, data).unwrap();
    let seed = test_node(&[]).await;
    setup(&seed);
    seed.seed(&path).await.unwrap();
    let node = test_node(std::slice::from_ref(&seed)).await;
    let rec = Arc::new(Recorder::default());
    let dest = dir.path().join("out.bin");
    let job = start_job(
        &node,
        spec(origin.url("f.bin"), &dest, blake3_only(data)),
        &rec,
    )
    .await;
    let info = wait_for(&node, job, &[State::Transferred]).await;
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(info.files[0].bytes_from.peers(), data.len() as u64);
    assert_eq!(origin.state.bytes_served.load(Ordering::SeqCst), 0);
    (seed, node, info)
}

#[tokio::test]
async fn piece_requests_to_one_peer_share_a_few_long_lived_streams() {
    // 4 MiB in 16 KiB pieces: 256 piece requests, all to the one seed.
    let (seed, node, _) = fetch_from_one_seed(&content(4 << 20, 17), |_| {}).await;
    let served = seed.upload_stats();
    assert!(served.pieces >= 256, "{served:?}");
    // One stream per request would be 256 streams; a leecher's pipeline to one peer is at
    // most 16 deep, and the streams carry one request after another.
    assert!(
        served.streams >= 1 && served.streams <= 32,
        "piece streams opened: {served:?}"
    );
    node.shutdown().await;
    seed.shutdown().await;
}

#[tokio::test]
async fn have_queries_to_one_peer_share_one_long_lived_stream() {
    // 3 MiB from a seed that uploads 1 MiB/s: the download spans several have rounds (one
    // every 250 ms).
    let (seed, node, _) = fetch_from_one_seed(&content(3 << 20, 18), |seed| {
        seed.set_bandwidth(shoal_node::config::BandwidthLimits {
            upload: Some(1 << 20),
            ..Default::default()
        });
    })
    .await;
    let served = seed.upload_stats();
    // Every query came on a have stream, one after another on the same one or two.
    assert_eq!(served.have_requests, 0, "{served:?}");
    assert!(
        (1..=2).contains(&served.have_streams) && served.have_on_streams >= 4,
        "{served:?}"
    );
    node.shutdown().await;
    seed.shutdown().await;
}

#[tokio::test]
async fn a_node_serves_verified_pieces_of_a_file_it_is_still_downloading() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(2 << 20, 16);
    origin.put("f.bin", data.clone());
    // The origin is slow (A's odd pieces take 16 s, until B has had pieces from A), and the
    // only seed serves the even pieces alone (it claims all).
    origin
        .state
        .throttle_bytes_per_sec
        .store(64 * 1024, Ordering::SeqCst);
    let half = BadPeer::start(Misbehaviour::FalseHave, &data).await;
    let a = test_node_with(&[], &[&half]).await;
    let expected = blake3_only(&data);
    let rec_a = Arc::new(Recorder::default());
    let job_a = start_job(
        &a,
        spec(origin.url("f.bin"), &dir.path().join("a.bin"), expected),
        &rec_a,
    )
    .await;
    // Once A holds some verified pieces, B starts; B knows only A.
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    while a.info(job_a).unwrap().bytes_from().peers() == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = test_node(std::slice::from_ref(&a)).await;
    let rec_b = Arc::new(Recorder::default());
    let dest_b = dir.path().join("b.bin");
    let job_b = start_job(&b, spec(origin.url("f.bin"), &dest_b, expected), &rec_b).await;
    while b.info(job_b).unwrap().bytes_from().peers() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B got nothing from A"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // B received verified pieces from A while A was still transferring.
    assert_ne!(a.info(job_a).unwrap().state, State::Transferred);
    assert!(a.upload_stats().pieces > 0);
    origin
        .state
        .throttle_bytes_per_sec
        .store(0, Ordering::SeqCst);
    wait_for(&b, job_b, &[State::Transferred]).await;
    b.complete(job_b).await.unwrap();
    assert_eq!(std::fs::read(&dest_b).unwrap(), data);
    wait_for(&a, job_a, &[State::Transferred]).await;
    for n in [a, b] {
        n.shutdown().await;
    }
    drop(half);
}

/// Starts a job on a stateful node against a slow origin and waits until at least `part` of
/// its bytes are verified on disk. Returns the job and the bytes verified by then.
async fn part_way(
    node: &Node,
    url: url::Url,
    dest: &Path,
    expected: Expected,
    part: u64,
) -> (JobId, u64) {
    let job = node.create_job("restart", Priority::Normal).await.unwrap();
    node.set_retry_delay(job, Duration::from_millis(100))
        .await
        .unwrap();
    node.add_file(job, spec(url, dest, expected)).await.unwrap();
    node.resume(job).await.unwrap();
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    loop {
        let done = node.info(job).unwrap().bytes_transferred();
        if done >= part {
            return (job, done);
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_job_survives_a_restart_and_keeps_the_pieces_it_verified() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let origin = TestOrigin::start().await;
    // 4 MiB: 256 pieces of 16 KiB, sent at 2 MiB/s.
    let data = content(4 << 20, 21);
    origin.put("r.bin", data.clone());
    origin
        .state
        .throttle_bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let dest = dir.path().join("r.bin");
    let expected = Expected {
        blake3: Some(blake3_of(&data)),
        sha256: Some(sha256_of(&data)),
    };
    let first = stateful_node(&state).await;
    let first_peer = first.peer_id();
    let (job, before) = part_way(&first, origin.url("r.bin"), &dest, expected, 1 << 20).await;
    first.shutdown().await;
    drop(first);

    let second = stateful_node(&state).await;
    // Same identity, same job, and the verified pieces are still counted.
    assert_eq!(second.peer_id(), first_peer);
    let info = second.info(job).unwrap();
    assert_eq!(info.display_name, "restart");
    assert!(
        info.files[0].bytes_transferred >= before,
        "{} bytes kept, {before} were verified before the stop",
        info.files[0].bytes_transferred
    );
    let info = wait_for(&second, job, &[State::Transferred]).await;
    assert_eq!(info.files[0].bytes_transferred, data.len() as u64);
    second.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    // The origin sent the file once, plus at most what was in flight at the stop: one origin
    // run of 16 pieces and the queues behind it (4 + 4 pieces), plus the probes.
    let piece = 16 * 1024;
    let refetched = origin.bytes_served().saturating_sub(data.len() as u64);
    assert!(
        refetched <= 24 * piece + 16,
        "{refetched} bytes fetched twice"
    );
    // A completed job leaves the state database.
    second.shutdown().await;
    drop(second);
    let third = stateful_node(&state).await;
    assert!(third.jobs().is_empty());
    third.shutdown().await;
}

#[tokio::test]
async fn a_job_whose_temporary_file_vanished_is_an_error_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let origin = TestOrigin::start().await;
    let data = content(4 << 20, 22);
    origin.put("v.bin", data.clone());
    origin
        .state
        .throttle_bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let dest = dir.path().join("v.bin");
    let first = stateful_node(&state).await;
    let (job, _) = part_way(
        &first,
        origin.url("v.bin"),
        &dest,
        blake3_only(&data),
        1 << 20,
    )
    .await;
    let temp = first.info(job).unwrap().files[0].temp_name.clone();
    first.shutdown().await;
    drop(first);
    std::fs::remove_file(&temp).unwrap();

    let second = stateful_node(&state).await;
    let info = wait_for(&second, job, &[State::Error]).await;
    let error = info.error.unwrap();
    assert_eq!(error.context, ErrorContext::LocalFile);
    assert!(error.description.contains("vanished"), "{error}");
    // The node runs on: the job can still be cancelled.
    second.cancel(job).await.unwrap();
    second.shutdown().await;
}

#[tokio::test]
async fn a_suspended_job_stays_suspended_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let origin = TestOrigin::start().await;
    let data = content(4 << 20, 23);
    origin.put("s.bin", data.clone());
    origin
        .state
        .throttle_bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let dest = dir.path().join("s.bin");
    let first = stateful_node(&state).await;
    let (job, _) = part_way(
        &first,
        origin.url("s.bin"),
        &dest,
        blake3_only(&data),
        512 << 10,
    )
    .await;
    first.suspend(job).await.unwrap();
    first.shutdown().await;
    drop(first);

    // The stopped node makes no request any more: any later one is the second node's.
    let requests = origin.requests();
    let second = stateful_node(&state).await;
    second.wait_idle().await;
    let info = second.info(job).unwrap();
    assert_eq!(info.state, State::Suspended);
    assert_eq!(origin.requests(), requests, "a suspended job fetched bytes");
    second.resume(job).await.unwrap();
    wait_for(&second, job, &[State::Transferred]).await;
    second.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    second.shutdown().await;
}

// ---- The daemon's control API (in-process daemon; callers named by the x-test-uid header).

/// A temporary directory any user may create files in (the test's callers are made-up uids,
/// and the daemon lets a user add files only where that user may write).
fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

fn create(name: &str) -> pb::CreateJobRequest {
    pb::CreateJobRequest {
        display_name: name.into(),
        priority: pb::Priority::Normal as i32,
        r#type: pb::JobType::Download as i32,
    }
}

fn jref(job: &str) -> pb::JobRef {
    pb::JobRef { job: job.into() }
}

fn add(job: &str, url: &url::Url, local: &Path, data: &[u8]) -> pb::AddFileRequest {
    pb::AddFileRequest {
        job: job.into(),
        url: url.to_string(),
        local_name: local.display().to_string(),
        blake3: hex::encode(blake3_of(data)),
        sha256: String::new(),
        ranges: Vec::new(),
    }
}

/// Creates job `name` over the API with one file, `url` to `local`, expected as `data` (as
/// [`add`] states it), and returns the job as the daemon answers the file's addition.
async fn job_with_file(
    c: &mut shoal_tests::Client,
    name: &str,
    url: &url::Url,
    local: &Path,
    data: &[u8],
) -> pb::Job {
    let job = c.create_job(create(name)).await.unwrap().into_inner();
    c.add_file(add(&job.id, url, local, data))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn api_jobs_belong_to_their_user_and_limits_hold() {
    let dir = shared_dir();
    let config = shoal_node::daemon::DaemonConfig {
        limits: shoal_node::daemon::Limits {
            jobs_per_user: 2,
            jobs_per_machine: 3,
            files_per_job: 1,
        },
        ..Default::default()
    };
    let d = TestDaemon::start(dir.path(), config).await;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    }
    let (mut alice, mut bob, mut root) = (
        d.client(1000).await,
        d.client(1001).await,
        d.client(0).await,
    );
    let a = alice
        .create_job(create("alice"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.owner, 1000);
    // Bob can neither see nor change Alice's job; it answers like an unknown job.
    for status in [
        bob.get_job(jref(&a.id)).await.unwrap_err(),
        bob.cancel(jref(&a.id)).await.unwrap_err(),
        bob.resume(jref(&a.id)).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    let listed = bob
        .list_jobs(pb::ListJobsRequest { owner: None })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty());
    assert_eq!(
        bob.list_jobs(pb::ListJobsRequest { owner: Some(1000) })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );
    // Root sees and changes every job.
    let all = root
        .list_jobs(pb::ListJobsRequest { owner: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.jobs.len(), 1);
    root.get_job(jref(&a.id)).await.unwrap();

    // Limits: two jobs per user, three per machine, one file per job.
    alice.create_job(create("alice 2")).await.unwrap();
    let e = alice.create_job(create("alice 3")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("jobs_per_user"), "{e:?}");
    bob.create_job(create("bob")).await.unwrap();
    let e = root.create_job(create("root")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("jobs_per_machine"), "{e:?}");
    let url: url::Url = "http://127.0.0.1:9/x".parse().unwrap();
    let local = dir.path().join("x");
    alice
        .add_file(add(&a.id, &url, &local, b"x"))
        .await
        .unwrap();
    let e = alice
        .add_file(add(&a.id, &url, &dir.path().join("y"), b"y"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    // A cancelled job no longer counts.
    alice.cancel(jref(&a.id)).await.unwrap();
    alice.create_job(create("alice 3")).await.unwrap();
    d.stop().await;
}

#[tokio::test]
async fn api_bad_input_gets_a_clear_status_and_the_daemon_runs_on() {
    let dir = shared_dir();
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(1000).await;
    let job = c.create_job(create("bad")).await.unwrap().into_inner().id;
    let url: url::Url = "http://127.0.0.1:9/x".parse().unwrap();
    let cases: Vec<(tonic::Status, tonic::Code, &str)> = vec![
        (
            c.get_job(jref("7d2f6c9e-0000-4000-8000-000000000000"))
                .await
                .unwrap_err(),
            tonic::Code::NotFound,
            "no job",
        ),
        (
            c.get_job(jref("not-a-uuid")).await.unwrap_err(),
            tonic::Code::InvalidArgument,
            "not a job id",
        ),
        (
            c.add_file(pb::AddFileRequest {
                url: "ftp://example.org/x".into(),
                ..add(&job, &url, &dir.path().join("a"), b"a")
            })
            .await
            .unwrap_err(),
            tonic::Code::InvalidArgument,
            "ftp://example.org/x",
        ),
        (
            c.add_file(pb::AddFileRequest {
                local_name: format!("{}/../escape", dir.path().display()),
                ..add(&job, &url, &dir.path().join("a"), b"a")
            })
            .await
            .unwrap_err(),
            tonic::Code::InvalidArgument,
            "..",
        ),
        (
            c.add_file(pb::AddFileRequest {
                local_name: "relative/name".into(),
                ..add(&job, &url, &dir.path().join("a"), b"a")
            })
            .await
            .unwrap_err(),
            tonic::Code::InvalidArgument,
            "absolute",
        ),
        (
            c.add_file(pb::AddFileRequest {
                blake3: "xyz".into(),
                ..add(&job, &url, &dir.path().join("a"), b"a")
            })
            .await
            .unwrap_err(),
            tonic::Code::InvalidArgument,
            "blake3",
        ),
        (
            c.resume(jref(&job)).await.unwrap_err(),
            tonic::Code::FailedPrecondition,
            "no files",
        ),
        (
            c.create_job(pb::CreateJobRequest {
                r#type: 7,
                ..create("up")
            })
            .await
            .unwrap_err(),
            tonic::Code::InvalidArgument,
            "not one of download, upload, upload-reply",
        ),
    ];
    for (status, code, needle) in cases {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{status:?} should mention {needle:?}"
        );
    }
    c.add_file(add(&job, &url, &dir.path().join("a"), b"a"))
        .await
        .unwrap();
    let dup = c
        .add_file(add(&job, &url, &dir.path().join("a"), b"a"))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists, "{dup:?}");
    let e = c
        .set_properties(pb::SetPropertiesRequest {
            job: job.clone(),
            retry_delay_seconds: Some(1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Still serving.
    c.status(pb::StatusRequest {}).await.unwrap();
    let info = c.get_job(jref(&job)).await.unwrap().into_inner();
    assert_eq!(info.files.len(), 1);
    d.stop().await;
}

/// Reads the stream until an event of `job` matching `pick` arrives (bounded wait).
async fn next_event<T>(
    stream: &mut tonic::Streaming<pb::Event>,
    job: &str,
    wait: Duration,
    pick: impl Fn(&pb::event::Kind) -> Option<T>,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(ev))) if ev.job == job => {
                if let Some(t) = ev.kind.as_ref().and_then(&pick) {
                    return Some(t);
                }
            }
            Ok(Ok(Some(_))) => {}
            _ => return None,
        }
    }
}

#[tokio::test]
async fn api_job_transferred_is_delivered_until_acknowledged_and_then_no_more() {
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(200_000, 41);
    origin.put("n.bin", data.clone());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(1000).await;
    let job = job_with_file(
        &mut c,
        "notify",
        &origin.url("n.bin"),
        &dir.path().join("n.bin"),
        &data,
    )
    .await
    .id;
    // The node's retry delay for new jobs is 200 ms in tests (below the API's 5 s minimum).
    let mut stream = c
        .watch(pb::WatchRequest {
            job: job.clone(),
            progress: false,
        })
        .await
        .unwrap()
        .into_inner();
    c.resume(jref(&job)).await.unwrap();
    let transferred = |k: &pb::event::Kind| match k {
        pb::event::Kind::JobTransferred(t) => Some(t.delivery),
        _ => None,
    };
    let first = next_event(&mut stream, &job, SCENARIO_TIMEOUT, transferred)
        .await
        .expect("JobTransferred");
    // Not acknowledged: delivered again after the retry delay, with a new delivery id.
    let second = next_event(&mut stream, &job, Duration::from_secs(10), transferred)
        .await
        .expect("JobTransferred again");
    assert_ne!(first, second);
    assert!(
        !c.acknowledge(pb::AcknowledgeRequest { delivery: first })
            .await
            .unwrap()
            .into_inner()
            .accepted
    );
    assert!(
        c.acknowledge(pb::AcknowledgeRequest { delivery: second })
            .await
            .unwrap()
            .into_inner()
            .accepted
    );
    // Acknowledged: no more deliveries, however long we wait (five retry delays).
    assert_eq!(
        next_event(&mut stream, &job, Duration::from_secs(1), transferred).await,
        None
    );
    c.complete(jref(&job)).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("n.bin")).unwrap(), data);
    // A daemon running as root gives the file to the job's owner (user 1000 here).
    {
        use std::os::unix::fs::MetadataExt;
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        let me = std::fs::metadata(&probe).unwrap().uid();
        let owner = std::fs::metadata(dir.path().join("n.bin")).unwrap().uid();
        assert_eq!(owner, if me == 0 { 1000 } else { me });
    }
    d.stop().await;
}

#[tokio::test]
async fn api_notify_command_line_runs_and_is_retried_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(100_000, 42);
    origin.put("m.bin", data.clone());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(0).await;
    let job = job_with_file(
        &mut c,
        "cmdline",
        &origin.url("m.bin"),
        &dir.path().join("m.bin"),
        &data,
    )
    .await
    .id;
    // The program logs its last argument (the job id) and fails on its first run.
    let log = dir.path().join("notified");
    let script = format!(
        "echo \"$0\" >> {0}; test $(wc -l < {0}) -ge 2",
        log.display()
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
    loop {
        let lines = std::fs::read_to_string(&log).unwrap_or_default();
        if lines.lines().count() >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "notify command ran {} times",
            lines.lines().count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It succeeded on its second run: not run again (a third run would keep the job's
    // runner at work until it was made).
    d.node.wait_idle().await;
    let lines = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        vec![job.as_str(), job.as_str()]
    );
    d.stop().await;
}

#[tokio::test]
async fn api_validation_verdicts_come_from_the_client_or_the_timeout() {
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(150_000, 43);
    origin.put("v.bin", data.clone());
    let config = shoal_node::daemon::DaemonConfig {
        notify: shoal_node::daemon::NotifyConfig {
            // Long enough for case 1's verdict on a loaded machine; case 2 waits it out.
            validation_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        ..Default::default()
    };
    let d = TestDaemon::start(dir.path(), config).await;
    let mut c = d.client(1000).await;
    let flags = shoal_node::job::notify::DEFAULT | shoal_node::job::notify::FILE_TRANSFERRED;
    let verdict_asked = |k: &pb::event::Kind| match k {
        pb::event::Kind::FileTransferred(f) if f.awaits_verdict => Some(f.file),
        _ => None,
    };
    // A job with FileTransferred notifications, watched, resumed.
    let url = origin.url("v.bin");
    let start = |c: &mut shoal_tests::Client, name: &'static str| {
        let (mut c, url, dest, data) =
            (c.clone(), url.clone(), dir.path().join(name), data.clone());
        async move {
            let job = job_with_file(&mut c, name, &url, &dest, &data).await.id;
            c.set_properties(pb::SetPropertiesRequest {
                job: job.clone(),
                notify_flags: Some(flags),
                ..Default::default()
            })
            .await
            .unwrap();
            let stream = c
                .watch(pb::WatchRequest {
                    job: job.clone(),
                    progress: false,
                })
                .await
                .unwrap()
                .into_inner();
            c.resume(jref(&job)).await.unwrap();
            (job, stream)
        }
    };
    // 1. The client says Invalid on origin content: the job goes to Error (Validation).
    let (job, mut stream) = start(&mut c, "v1.bin").await;
    let file = next_event(&mut stream, &job, SCENARIO_TIMEOUT, verdict_asked)
        .await
        .expect("FileTransferred");
    c.set_validation_state(pb::SetValidationStateRequest {
        job: job.clone(),
        file,
        state: pb::ValidationState::Invalid as i32,
    })
    .await
    .unwrap();
    let info = wait_for(&d.node, job.parse().unwrap(), &[State::Error]).await;
    assert_eq!(info.error.unwrap().context, ErrorContext::Validation);
    // 2. Nobody answers: after the validation timeout the file counts as Valid.
    let (job, mut stream) = start(&mut c, "v2.bin").await;
    next_event(&mut stream, &job, SCENARIO_TIMEOUT, verdict_asked)
        .await
        .expect("FileTransferred");
    let info = wait_for(&d.node, job.parse().unwrap(), &[State::Transferred]).await;
    assert_eq!(info.files[0].validation_state, ValidationState::Valid);
    // A verdict nobody asked for is refused.
    let e = c
        .set_validation_state(pb::SetValidationStateRequest {
            job: job.clone(),
            file: 0,
            state: pb::ValidationState::Valid as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    d.stop().await;
}

#[tokio::test(start_paused = true)]
async fn timeouts_fire_no_progress_then_inactivity() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::builder()
        .listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
        .mdns(false)
        .retry_delay(Duration::from_secs(30))
        .inactivity_timeout(Duration::from_secs(3600))
        .origin(shoal_node::config::OriginConfig {
            retries: 0,
            backoff: Duration::from_millis(10),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            proxy: shoal_node::config::OriginProxy::Direct,
        })
        .build()
        .await
        .unwrap();
    // Nothing listens on port 9 of 127.0.0.1: every attempt is a transient error.
    let url: url::Url = "http://127.0.0.1:9/nothing".parse().unwrap();
    let job = node.create_job("stalled", Priority::Normal).await.unwrap();
    node.modify(job, |i| {
        i.properties.no_progress_timeout = Duration::from_secs(300);
        Ok(())
    })
    .await
    .unwrap();
    node.add_file(
        job,
        spec(url.clone(), &dir.path().join("s"), Expected::default()),
    )
    .await
    .unwrap();
    node.resume(job).await.unwrap();
    // Within the timeout it stays in TransientError (retried every 30 s)...
    tokio::time::sleep(Duration::from_secs(200)).await;
    let info = node.info(job).unwrap();
    assert_eq!(info.state, State::TransientError, "{:?}", info.error);
    // ...and moves to Error once 300 s passed without progress.
    tokio::time::sleep(Duration::from_secs(200)).await;
    let info = node.info(job).unwrap();
    assert_eq!(info.state, State::Error);
    assert!(
        info.error
            .unwrap()
            .description
            .contains("no-progress timeout")
    );
    // A timeout of 0 fails at the first transient error.
    let quick = node.create_job("quick", Priority::Normal).await.unwrap();
    node.modify(quick, |i| {
        i.properties.no_progress_timeout = Duration::ZERO;
        Ok(())
    })
    .await
    .unwrap();
    node.add_file(quick, spec(url, &dir.path().join("q"), Expected::default()))
        .await
        .unwrap();
    node.resume(quick).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(node.info(quick).unwrap().state, State::Error);
    // Inactivity: a job nobody touches for an hour is cancelled.
    let idle = node.create_job("idle", Priority::Low).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1800)).await;
    assert_eq!(node.info(idle).unwrap().state, State::Suspended);
    // The sweep runs every tenth of the timeout, so within 3600 + 360 s.
    tokio::time::sleep(Duration::from_secs(2400)).await;
    assert_eq!(node.info(idle).unwrap().state, State::Cancelled);
    node.shutdown().await;
}

/// Waits until `cond` holds of the job's snapshot.
async fn until(node: &Node, job: JobId, what: &str, cond: impl Fn(&JobInfo) -> bool) -> JobInfo {
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    loop {
        let info = node.info(job).unwrap();
        if cond(&info) {
            return info;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: job in {:?} with {} bytes",
            info.state,
            info.bytes_transferred()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn foreground_goes_first_a_priority_shares_round_robin_and_pieces_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    origin
        .state
        .throttle_bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let files: Vec<Vec<u8>> = (0..4).map(|i| content(2 << 20, 50 + i)).collect();
    for (i, f) in files.iter().enumerate() {
        origin.put(&format!("{i}.bin"), f.clone());
    }
    // One transfer slot; a job yields to one of its priority after 300 ms.
    let node = Node::builder()
        .listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
        .mdns(false)
        .max_active_jobs(1)
        .time_slice(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let start = async |i: usize, priority: Priority| {
        let job = node
            .create_job(&format!("job {i}"), priority)
            .await
            .unwrap();
        let url = origin.url(&format!("{i}.bin"));
        node.add_file(
            job,
            spec(
                url,
                &dir.path().join(format!("{i}.bin")),
                blake3_only(&files[i]),
            ),
        )
        .await
        .unwrap();
        node.resume(job).await.unwrap();
        job
    };
    // A Low job runs alone; then a Foreground job arrives and takes the slot at once.
    let low = start(0, Priority::Low).await;
    until(&node, low, "Low job starts", |i| i.bytes_transferred() > 0).await;
    let fg = start(1, Priority::Foreground).await;
    until(&node, low, "Low job yields", |i| i.state == State::Queued).await;
    let at_yield = node.info(low).unwrap().bytes_transferred();
    wait_for(&node, fg, &[State::Transferred]).await;
    assert_ne!(node.info(low).unwrap().state, State::Transferred);
    // The Low job goes on from where it stopped: its verified pieces are kept.
    wait_for(&node, low, &[State::Transferred]).await;
    let piece = 16 * 1024;
    let refetched = origin.bytes_served() - (4 << 20);
    assert!(
        refetched <= 24 * piece + 16,
        "{refetched} bytes fetched twice (the Low job had {at_yield} verified when it yielded)"
    );
    // Two Normal jobs share the slot: both make progress before either is done.
    let a = start(2, Priority::Normal).await;
    let b = start(3, Priority::Normal).await;
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    let first_done = loop {
        let (ia, ib) = (node.info(a).unwrap(), node.info(b).unwrap());
        if ia.state == State::Transferred || ib.state == State::Transferred {
            break (ia, ib);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither Normal job was transferred: {:?} and {:?}",
            ia.state,
            ib.state
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        first_done.0.bytes_transferred() > 0 && first_done.1.bytes_transferred() > 0,
        "one job waited for the other to finish: {} and {} bytes",
        first_done.0.bytes_transferred(),
        first_done.1.bytes_transferred()
    );
    for job in [low, fg, a, b] {
        wait_for(&node, job, &[State::Transferred]).await;
        node.complete(job).await.unwrap();
    }
    for (i, f) in files.iter().enumerate() {
        assert_eq!(
            &std::fs::read(dir.path().join(format!("{i}.bin"))).unwrap(),
            f
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn api_on_loopback_tcp_needs_the_bearer_token() {
    let dir = shared_dir();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-of-the-daemon\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let config = shoal_node::daemon::DaemonConfig {
        tcp: Some(addr),
        token_file: Some(token_file),
        ..Default::default()
    };
    let d = TestDaemon::start(dir.path(), config).await;
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let call = |token: Option<&'static str>| {
        let channel = channel.clone();
        async move {
            let mut c = pb::control_client::ControlClient::with_interceptor(
                channel,
                move |mut req: tonic::Request<()>| {
                    req.metadata_mut()
                        .insert("x-test-uid", "0".parse().unwrap());
                    if let Some(t) = token {
                        req.metadata_mut()
                            .insert("authorization", format!("Bearer {t}").parse().unwrap());
                    }
                    Ok(req)
                },
            );
            c.status(pb::StatusRequest {}).await
        }
    };
    assert_eq!(
        call(None).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        call(Some("s3cret-token-of-the-daemom"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        call(Some("s3cret-token")).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let status = call(Some("s3cret-token-of-the-daemon"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.peer_id, d.node.peer_id().to_string());
    d.stop().await;
}

#[tokio::test]
async fn api_at_most_four_notifications_per_user_are_in_flight() {
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(1000).await;
    // Six jobs of one user finish; each notify command logs its start and end and takes a
    // while, so at most four may overlap.
    let log = dir.path().join("runs");
    let script = format!("echo + >> {0}; sleep 0.3; echo - >> {0}", log.display());
    let mut jobs = Vec::new();
    for i in 0..6u8 {
        let data = content(20_000, 60 + i);
        origin.put(&format!("{i}.bin"), data.clone());
        let job = job_with_file(
            &mut c,
            &format!("n{i}"),
            &origin.url(&format!("{i}.bin")),
            &dir.path().join(format!("{i}.bin")),
            &data,
        )
        .await
        .id;
        c.set_properties(pb::SetPropertiesRequest {
            job: job.clone(),
            notify_cmdline: Some(pb::CommandLine {
                argv: vec!["/bin/sh".into(), "-c".into(), script.clone()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        jobs.push(job);
    }
    for job in &jobs {
        c.resume(jref(job)).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    let runs = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches('-').count() >= 6 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "notifications ran: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (mut running, mut most) = (0i32, 0i32);
    for line in runs.lines() {
        running += if line == "+" { 1 } else { -1 };
        most = most.max(running);
    }
    assert!(most <= 4, "{most} notifications of one user ran at once");
    assert!(
        most >= 2,
        "the notifications did not overlap at all ({most}); the test shows nothing"
    );
    d.stop().await;
}

#[tokio::test]
async fn ranged_files_hold_their_ranges_in_the_order_given() {
    use shoal_node::ByteRange;
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(100_000, 70);
    origin.put("r.bin", data.clone());
    let node = test_node(&[]).await;
    let range = |offset, length| ByteRange { offset, length };
    // BITS's own example: 100-199, 900-999, 400-499 give 300 bytes in that order; and the
    // last 1000 bytes, "to the end".
    let ranges = vec![
        range(100, Some(100)),
        range(900, Some(100)),
        range(400, Some(100)),
        range(99_000, None),
    ];
    let mut want = Vec::new();
    for (a, b) in [(100, 200), (900, 1000), (400, 500), (99_000, 100_000)] {
        want.extend_from_slice(&data[a..b]);
    }
    let dest = dir.path().join("r.part");
    let job = node.create_job("ranges", Priority::Normal).await.unwrap();
    node.add_file(
        job,
        FileSpec {
            ranges: ranges.clone(),
            ..spec(
                origin.url("r.bin"),
                &dest,
                Expected {
                    blake3: None,
                    sha256: Some(sha256_of(&want)),
                },
            )
        },
    )
    .await
    .unwrap();
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Transferred]).await;
    assert_eq!(info.files[0].bytes_total, Some(want.len() as u64));
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), want);
    // The origin sent the ranges, not the file (plus the one-byte probe).
    assert_eq!(origin.bytes_served(), want.len() as u64 + 1);

    // Overlapping or empty ranges are refused when the file is added.
    let job = node
        .create_job("bad ranges", Priority::Normal)
        .await
        .unwrap();
    for bad in [
        vec![range(0, Some(100)), range(50, Some(10))],
        vec![range(10, None), range(500, Some(1))],
        vec![range(7, Some(0))],
    ] {
        let e = node
            .add_file(
                job,
                FileSpec {
                    ranges: bad,
                    ..spec(
                        origin.url("r.bin"),
                        &dir.path().join("x"),
                        Expected::default(),
                    )
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::BadRange(_)), "{e}");
    }
    // A range beyond the end of the file is a job error naming it.
    node.add_file(
        job,
        FileSpec {
            ranges: vec![range(99_990, Some(20))],
            ..spec(
                origin.url("r.bin"),
                &dir.path().join("y"),
                Expected::default(),
            )
        },
    )
    .await
    .unwrap();
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error]).await;
    let error = info.error.unwrap();
    assert_eq!(error.context, ErrorContext::RemoteFile);
    assert!(error.description.contains("beyond the end"), "{error}");
    // A server without Range support cannot serve ranges.
    origin.state.no_range.store(true, Ordering::SeqCst);
    let job = node
        .create_job("no range support", Priority::Normal)
        .await
        .unwrap();
    node.add_file(
        job,
        FileSpec {
            ranges: vec![range(10, Some(20))],
            ..spec(
                origin.url("r.bin"),
                &dir.path().join("z"),
                Expected::default(),
            )
        },
    )
    .await
    .unwrap();
    node.resume(job).await.unwrap();
    let info = wait_for(&node, job, &[State::Error]).await;
    assert!(
        info.error
            .unwrap()
            .description
            .contains("does not support ranges")
    );
    node.shutdown().await;
}

#[tokio::test]
async fn api_events_come_in_order_and_progress_at_a_bounded_rate() {
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    origin
        .state
        .throttle_bytes_per_sec
        .store(1 << 20, Ordering::SeqCst);
    let data = content(2 << 20, 90);
    origin.put("e.bin", data.clone());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(1000).await;
    let job = job_with_file(
        &mut c,
        "events",
        &origin.url("e.bin"),
        &dir.path().join("e.bin"),
        &data,
    )
    .await
    .id;
    let mut stream = c
        .watch(pb::WatchRequest {
            job: job.clone(),
            progress: true,
        })
        .await
        .unwrap()
        .into_inner();
    let started = tokio::time::Instant::now();
    c.resume(jref(&job)).await.unwrap();
    let (mut states, mut progress, mut seen) = (Vec::new(), Vec::new(), Vec::new());
    let deadline = started + SCENARIO_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = tokio::time::timeout(left, stream.message())
            .await
            .expect("events stop before JobTransferred")
            .unwrap()
            .unwrap();
        match ev.kind.unwrap() {
            pb::event::Kind::JobModification(m) => states.push(m.state),
            pb::event::Kind::Progress(p) => progress.push(p.bytes_transferred),
            pb::event::Kind::FileTransferred(f) => seen.push(format!("file {}", f.file)),
            pb::event::Kind::JobTransferred(t) => {
                seen.push("transferred".into());
                c.acknowledge(pb::AcknowledgeRequest {
                    delivery: t.delivery,
                })
                .await
                .unwrap();
                break;
            }
            pb::event::Kind::JobError(e) => panic!("JobError {e:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let want = [
        pb::JobState::Queued,
        pb::JobState::Connecting,
        pb::JobState::Transferring,
        pb::JobState::Transferred,
    ]
    .map(|s| s as i32);
    assert_eq!(states, want, "state changes out of order");
    assert_eq!(seen, ["file 0", "transferred"]);
    // At most two Progress events per second, and the bytes only grow.
    assert!(
        progress.len() >= 2,
        "{} progress events in {elapsed:.1} s",
        progress.len()
    );
    assert!(
        (progress.len() as f64) <= 2.0 * elapsed + 2.0,
        "{} progress events in {elapsed:.1} s",
        progress.len()
    );
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    d.stop().await;
}

#[tokio::test]
async fn resume_during_a_retry_delay_runs_the_job_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(300_000, 95);
    origin.put("t.bin", data.clone());
    // The test node's origin client tries 4 times; all of them fail.
    origin.state.fail_next.store(4, Ordering::SeqCst);
    let node = test_node(&[]).await;
    let job = node.create_job("retry", Priority::Normal).await.unwrap();
    node.set_retry_delay(job, Duration::from_secs(600))
        .await
        .unwrap();
    let dest = dir.path().join("t.bin");
    node.add_file(job, spec(origin.url("t.bin"), &dest, blake3_only(&data)))
        .await
        .unwrap();
    node.resume(job).await.unwrap();
    wait_for(&node, job, &[State::TransientError]).await;
    // BITS: Resume in TransientError retries now, not after the 600 s delay.
    node.resume(job).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while node.info(job).unwrap().state != State::Transferred {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {:?}",
            node.info(job).unwrap().state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    node.shutdown().await;
}

#[tokio::test]
async fn api_a_symlink_or_a_swapped_directory_does_not_redirect_writes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = shared_dir();
    let origin = TestOrigin::start().await;
    let data = content(200_000, 96);
    origin.put("s.bin", data.clone());
    let d = TestDaemon::start(dir.path(), Default::default()).await;
    let mut c = d.client(1000).await;
    let me = {
        let probe = dir.path().join("probe");
        std::fs::write(&probe, b"").unwrap();
        std::fs::metadata(&probe).unwrap().uid()
    };
    // A file the caller must not touch.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"secret").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    // 1. A symlink planted at the temporary file's path is replaced, never followed.
    let dest = dir.path().join("s.bin");
    let job = job_with_file(&mut c, "symlink", &origin.url("s.bin"), &dest, &data).await;
    let temp = PathBuf::from(&job.files[0].temp_name);
    std::os::unix::fs::symlink(&victim, &temp).unwrap();
    c.resume(jref(&job.id)).await.unwrap();
    wait_for(&d.node, job.id.parse().unwrap(), &[State::Transferred]).await;
    c.complete(jref(&job.id)).await.unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
    assert_eq!(std::fs::metadata(&victim).unwrap().uid(), me);
    // 2. A directory swapped for a symlink to one the caller may not write (only checkable
    // when the daemon runs as root and so acts as the caller).
    if me == 0 {
        let private = tempfile::tempdir().unwrap();
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        let job = job_with_file(
            &mut c,
            "swap",
            &origin.url("s.bin"),
            &sub.join("x.bin"),
            &data,
        )
        .await;
        std::fs::remove_dir(&sub).unwrap();
        std::os::unix::fs::symlink(private.path(), &sub).unwrap();
        c.resume(jref(&job.id)).await.unwrap();
        let info = wait_for(&d.node, job.id.parse().unwrap(), &[State::Error]).await;
        assert_eq!(info.error.unwrap().context, ErrorContext::LocalFile);
        assert_eq!(std::fs::read_dir(private.path()).unwrap().count(), 0);
    }
    d.stop().await;
}

#[tokio::test]
async fn a_complete_cut_short_after_its_rename_is_not_an_error_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let origin = TestOrigin::start().await;
    let data = content(500_000, 97);
    origin.put("c.bin", data.clone());
    let dest = dir.path().join("c.bin");
    let first = stateful_node(&state).await;
    let job = first
        .create_job("complete", Priority::Normal)
        .await
        .unwrap();
    first
        .add_file(job, spec(origin.url("c.bin"), &dest, blake3_only(&data)))
        .await
        .unwrap();
    first.resume(job).await.unwrap();
    let info = wait_for(&first, job, &[State::Transferred]).await;
    first.shutdown().await;
    drop(first);
    // What a Complete stopped between its rename and its record leaves behind.
    std::fs::rename(&info.files[0].temp_name, &dest).unwrap();
    let second = stateful_node(&state).await;
    second.wait_idle().await;
    assert_eq!(second.info(job).unwrap().state, State::Transferred);
    second.complete(job).await.unwrap();
    assert_eq!(second.info(job).unwrap().state, State::Acknowledged);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    second.shutdown().await;
}

#[tokio::test]
async fn the_binarys_logs_are_plain_text_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(100_000, 98);
    origin.put("l.bin", data.clone());
    let out = tokio::time::timeout(
        SCENARIO_TIMEOUT,
        tokio::process::Command::new(shoal_tests::node_bin("shoal"))
            .args([
                "get",
                "--no-daemon",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "-o",
            ])
            .arg(dir.path().join("l.bin"))
            .args(["--sha256", &sha256_of(&data).to_string()])
            .arg(origin.url("l.bin").as_str())
            .env("SHOAL_LOG", "shoal_node=debug")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("shoal get ends in time")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("DEBUG"), "no log lines: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a piped log: {log:?}"
    );
    assert_eq!(std::fs::read(dir.path().join("l.bin")).unwrap(), data);
}
