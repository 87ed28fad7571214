//! One hostile peer against honest nodes (issue 11, `docs/security.md`): a [`BadPeer`] built on
//! the public codecs claims, refuses, floods and hoards; the honest nodes still finish within
//! a stated bound, taking from the origin only what no honest peer has. The patience
//! (`scheduler::Config::coming_patience`) is 3 s here, so the bounds below are short; each is
//! stated in terms of it.

use std::time::Instant;

use shoal_node::config::{BandwidthLimits, SchedulerConfig};
use shoal_tests::{BadPeer, Misbehaviour, test_builder};

use super::*;

const MIB: usize = 1 << 20;
/// The patience of the nodes in these tests.
const PATIENCE: Duration = Duration::from_secs(3);

/// An honest node with a short patience, dialing `peers` and the bad peers `bad`.
async fn honest(peers: &[Node], bad: &[&BadPeer]) -> Node {
    let mut b = test_builder(peers).await.scheduler(SchedulerConfig {
        peer_backoff: Duration::from_millis(50),
        coming_patience: PATIENCE,
        ..SchedulerConfig::default()
    });
    for p in bad {
        b = b.peer(p.addr.clone());
    }
    b.build().await.expect("node starts on 127.0.0.1")
}

/// Waits until `node` is connected to `n` peers (bounded).
async fn connected(node: &Node, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.connected_peers().await.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "peers never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs one job for `data` at `url` on each node, all at once; checks each file's bytes once
/// it is Transferred and completed; returns each node's job info and the time the last one
/// took.
async fn fetch_all(
    nodes: &[Node],
    url: url::Url,
    data: &[u8],
    dir: &Path,
    expected: Expected,
    bound: Duration,
) -> (Vec<JobInfo>, Duration) {
    let start = Instant::now();
    let mut jobs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let local = dir.join(format!("n{i}.bin"));
        let rec = Arc::new(Recorder::default());
        jobs.push((
            start_job(node, spec(url.clone(), &local, expected), &rec).await,
            local,
        ));
    }
    let mut infos = Vec::new();
    for (node, (job, local)) in nodes.iter().zip(&jobs) {
        let left = bound.saturating_sub(start.elapsed());
        let info = tokio::time::timeout(left, wait_for(node, *job, &[State::Transferred]))
            .await
            .unwrap_or_else(|_| panic!("not Transferred within {bound:?}"));
        node.complete(*job).await.unwrap();
        assert_eq!(std::fs::read(local).unwrap(), data);
        infos.push(info);
    }
    (infos, start.elapsed())
}

#[tokio::test]
async fn a_peer_that_claims_everything_and_answers_busy_forever_delays_a_download_by_the_patience()
{
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(4 * MIB, 81);
    origin.put("b.bin", data.clone());
    let bad = BadPeer::start(Misbehaviour::AlwaysBusy, &data).await;
    let leecher = honest(&[], &[&bad]).await;
    connected(&leecher, 1).await;
    // Bound: the patience, then the origin at its speed: 2 × patience + 10 s.
    let bound = 2 * PATIENCE + Duration::from_secs(10);
    let (files, took) = fetch_all(
        std::slice::from_ref(&leecher),
        origin.url("b.bin"),
        &data,
        dir.path(),
        blake3_only(&data),
        bound,
    )
    .await;
    eprintln!(
        "AlwaysBusy: done in {took:?}, {} bytes from the origin",
        origin.bytes_served()
    );
    assert_eq!(files[0].files[0].bytes_from.origin, data.len() as u64);
    assert!(bad.stats.answers.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(origin.bytes_served() <= data.len() as u64 + 1);
    leecher.shutdown().await;
}

#[tokio::test]
async fn a_lying_member_of_a_sha256_swarm_cannot_corrupt_a_file_and_costs_one_origin_copy_per_victim()
 {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(4 * MIB, 86);
    origin.put("l.bin", data.clone());
    // A member of the swarm that claims every piece as fetched from the origin and serves
    // each with a byte flipped; three honest nodes that know the file only by its SHA-256.
    let bad = BadPeer::start(Misbehaviour::SwarmLiar, &data).await;
    let a = honest(&[], &[&bad]).await;
    let b = honest(std::slice::from_ref(&a), &[&bad]).await;
    let c = honest(&[a.clone(), b.clone()], &[&bad]).await;
    for n in [&a, &b, &c] {
        connected(n, 3).await;
    }
    let expected = Expected {
        blake3: None,
        sha256: Some(sha256_of(&data)),
    };
    // Bound: a first attempt that takes pieces from the liar (its shares lapse after the
    // patience at worst), then the file from the origin alone: 2 × patience + 20 s.
    let bound = 2 * PATIENCE + Duration::from_secs(20);
    let (jobs, took) = fetch_all(
        &[a.clone(), b.clone(), c.clone()],
        origin.url("l.bin"),
        &data,
        dir.path(),
        expected,
        bound,
    )
    .await;
    let banned: u64 = jobs.iter().map(|j| j.peer_stats.peers_banned).sum();
    let copies = origin.bytes_served() as f64 / data.len() as f64;
    eprintln!("SwarmLiar: done in {took:?}, {copies:.3} origin copies, {banned} bans");
    // Every file is the origin's (`fetch_all` compares the bytes). A node that took a piece
    // from the liar failed its SHA-256 and fetched the file again from the origin alone:
    // at most one copy for the swarm's first attempt and one per node.
    assert!(copies <= 4.0 + 1e-3, "{copies} origin copies");
    let served = bad.stats.answers.load(std::sync::atomic::Ordering::SeqCst);
    assert!(served > 0, "the liar was asked for pieces");
    // Each victim banned the liar (and the other peers it took unverified pieces from).
    assert!(banned >= 1, "nobody banned the liar");
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn a_peer_that_claims_every_piece_and_tells_nothing_does_not_stall_a_cold_start() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(4 * MIB, 82);
    origin.put("c.bin", data.clone());
    let bad = BadPeer::start(Misbehaviour::ClaimAllTellNothing, &data).await;
    let a = honest(&[], &[&bad]).await;
    let b = honest(std::slice::from_ref(&a), &[&bad]).await;
    connected(&a, 2).await;
    connected(&b, 2).await;
    // Bound: patience + 10 s. Origin: at most 2 copies (each leecher once).
    let bound = PATIENCE + Duration::from_secs(10);
    let (_, took) = fetch_all(
        &[a.clone(), b.clone()],
        origin.url("c.bin"),
        &data,
        dir.path(),
        blake3_only(&data),
        bound,
    )
    .await;
    let copies = origin.bytes_served() as f64 / data.len() as f64;
    eprintln!("ClaimAllTellNothing: done in {took:?}, {copies:.3} origin copies");
    assert!(copies <= 2.0 + 1e-3, "{copies}");
    assert!(
        bad.stats
            .have_answers
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_peer_that_floods_made_up_members_costs_at_most_one_lapse() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(8 * MIB, 83);
    origin.put("m.bin", data.clone());
    origin
        .state
        .wan_bytes_per_sec
        .store(4 << 20, std::sync::atomic::Ordering::SeqCst);
    let bad = BadPeer::start(Misbehaviour::MemberFlood, &data).await;
    let a = honest(&[], &[&bad]).await;
    let b = honest(std::slice::from_ref(&a), &[&bad]).await;
    let c = honest(&[a.clone(), b.clone()], &[&bad]).await;
    for n in [&a, &b, &c] {
        connected(n, 3).await;
    }
    // Bound: 2 × patience + 10 s; the origin link alone needs 2 s per copy.
    let bound = 2 * PATIENCE + Duration::from_secs(10);
    let (files, took) = fetch_all(
        &[a.clone(), b.clone(), c.clone()],
        origin.url("m.bin"),
        &data,
        dir.path(),
        blake3_only(&data),
        bound,
    )
    .await;
    let copies = origin.bytes_served() as f64 / data.len() as f64;
    eprintln!("MemberFlood: done in {took:?}, {copies:.3} origin copies");
    assert!(
        files
            .iter()
            .all(|j| j.files[0].bytes_from.origin < data.len() as u64)
    );
    assert!(copies <= 1.5, "{copies}");
    assert!(
        bad.stats
            .have_answers
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    );
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn a_peer_that_hoards_upload_slots_leaves_room_for_others() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(4 * MIB, 84);
    origin.put("h.bin", data.clone());
    let file = dir.path().join("seed.bin");
    std::fs::write(&file, &data).unwrap();
    // A seed whose uploads take time (1 MiB/s), so requests stay in flight.
    let seed = test_builder(&[])
        .await
        .bandwidth(BandwidthLimits {
            upload: Some(MIB as u64),
            ..BandwidthLimits::default()
        })
        .build()
        .await
        .unwrap();
    seed.seed(&file).await.unwrap();
    let hoarder = BadPeer::start(Misbehaviour::HoldSlots(96), &data).await;
    seed.dial(hoarder.addr.clone()).await;
    // Let the hoarder fill what it can.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seed.upload_stats().busy == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hoarder never hit the per-peer cap"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Of its 96 piece streams, the seed takes 64 (a peer's most), none lost on the way in; the
    // others are reset.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seed.upload_stats().streams < 64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the seed took {} of the hoarder's 96 streams",
            seed.upload_stats().streams
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(seed.upload_stats().streams, 64, "{:?}", seed.upload_stats());
    // An honest leecher still gets pieces from the seed within 10 s.
    let leecher = honest(std::slice::from_ref(&seed), &[]).await;
    connected(&leecher, 1).await;
    let local = dir.path().join("l.bin");
    let rec = Arc::new(Recorder::default());
    let job = start_job(
        &leecher,
        spec(origin.url("h.bin"), &local, blake3_only(&data)),
        &rec,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = leecher.info(job).unwrap();
        if info.files[0].bytes_from.peers() > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no piece from the seed in 10 s while a hoarder holds its slots"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    leecher.cancel(job).await.unwrap();
    leecher.shutdown().await;
    seed.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_layer_requests_is_paid_from_the_upload_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    // 16 MiB in 16 KiB pieces: a layer of 32 KiB.
    let data = content(16 * MIB, 85);
    let file = dir.path().join("seed.bin");
    std::fs::write(&file, &data).unwrap();
    // Two small files honest leechers fetch from the same seed, before and during the flood.
    let small: Vec<Vec<u8>> = (0..2).map(|i| content(2 * MIB, 90 + i)).collect();
    let rate = MIB as u64;
    let seed = test_builder(&[])
        .await
        .bandwidth(BandwidthLimits {
            upload: Some(rate),
            ..BandwidthLimits::default()
        })
        .build()
        .await
        .unwrap();
    seed.seed(&file).await.unwrap();
    for (i, d) in small.iter().enumerate() {
        let f = dir.path().join(format!("small{i}.bin"));
        std::fs::write(&f, d).unwrap();
        seed.seed(&f).await.unwrap();
        origin.put(&format!("small{i}.bin"), d.clone());
    }
    // An honest leecher's time for one small file from the seed alone.
    let leech = |i: usize| {
        let (seed, origin, small, dir) = (&seed, &origin, &small, dir.path());
        async move {
            let node = honest(std::slice::from_ref(seed), &[]).await;
            connected(&node, 1).await;
            let (infos, took) = fetch_all(
                std::slice::from_ref(&node),
                origin.url(&format!("small{i}.bin")),
                &small[i],
                &dir.join(format!("leech{i}")),
                blake3_only(&small[i]),
                SCENARIO_TIMEOUT,
            )
            .await;
            node.shutdown().await;
            (infos[0].files[0].bytes_from.peers(), took)
        }
    };
    std::fs::create_dir_all(dir.path().join("leech0")).unwrap();
    std::fs::create_dir_all(dir.path().join("leech1")).unwrap();
    let (_, quiet) = leech(0).await;
    let flood = BadPeer::start(Misbehaviour::LayerFlood(64), &data).await;
    seed.dial(flood.addr.clone()).await;
    let before = flood.total_received();
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let got = flood.total_received() - before;
    // Rate × time, plus the bucket's burst (one second), a second of slack for a slow
    // machine, and what the per-peer slots held. Unmetered, the loopback carries hundreds of
    // MiB in that time.
    let bound = rate * (window.as_secs() + 2) + 16 * 32 * 1024;
    eprintln!("LayerFlood: {got} bytes of layers in {window:?} (bound {bound})");
    assert!(got > 0, "no layer was served at all");
    assert!(got <= bound, "{got} bytes of layers, more than {bound}");
    // While the flood goes on, an honest leecher still gets its file from the seed: the flood
    // holds at most half the upload slots, so the leecher gets at least a share of the rate.
    // Bound: its 2 MiB at half the rate, the patience, and 10 s.
    let served_before = origin.bytes_served();
    let (from_peers, flooded) = leech(1).await;
    let leech_bound =
        Duration::from_secs(2 * 2 * MIB as u64 / rate) + PATIENCE + Duration::from_secs(10);
    eprintln!(
        "LayerFlood: a 2 MiB leecher took {quiet:?} without the flood, {flooded:?} during it (bound {leech_bound:?})"
    );
    assert!(
        flooded <= leech_bound,
        "the leecher took {flooded:?} during the flood"
    );
    assert_eq!(
        from_peers,
        2 * MIB as u64,
        "the leecher fell back to the origin"
    );
    assert_eq!(origin.bytes_served(), served_before);
    seed.shutdown().await;
}

#[tokio::test]
async fn claims_of_another_length_for_a_sha256_are_not_weighed_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let origin = TestOrigin::start().await;
    let data = content(MIB, 86);
    origin.put("s.bin", data.clone());
    // Three peers claim an 8 MiB content for the 1 MiB file's SHA-256, each with a layer that
    // verifies against their claim.
    let other = content(8 * MIB, 87);
    let mut liars = Vec::new();
    for _ in 0..3 {
        liars.push(BadPeer::start(Misbehaviour::LyingSha256(sha256_of(&data)), &other).await);
    }
    let node = honest(&[], &liars.iter().collect::<Vec<_>>()).await;
    connected(&node, 3).await;
    let local = dir.path().join("s.bin");
    let rec = Arc::new(Recorder::default());
    let expected = Expected {
        blake3: None,
        sha256: Some(sha256_of(&data)),
    };
    let job = start_job(&node, spec(origin.url("s.bin"), &local, expected), &rec).await;
    let temp = node.info(job).unwrap().files[0].temp_name.clone();
    // The temporary file never grows past the origin's length.
    let mut largest = 0;
    let deadline = tokio::time::Instant::now() + SCENARIO_TIMEOUT;
    while node.info(job).unwrap().state != State::Transferred {
        assert!(tokio::time::Instant::now() < deadline, "not Transferred");
        if let Ok(m) = std::fs::metadata(&temp) {
            largest = largest.max(m.len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let info = node.info(job).unwrap();
    node.complete(job).await.unwrap();
    assert_eq!(std::fs::read(&local).unwrap(), data);
    assert!(
        largest <= data.len() as u64,
        "the temporary file grew to {largest} bytes"
    );
    assert_eq!(info.files[0].bytes_from.peers(), 0);
    assert_eq!(
        info.peer_stats.peers_banned, 0,
        "the claims were not even tried"
    );
    node.shutdown().await;
}
