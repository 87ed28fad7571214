//! Swarm and LAN-cluster scenarios (issue 4): DHT discovery, groups, peer modes. Like the rest,
//! on 127.0.0.1 with mDNS off.

use super::*;
use shoal_node::{
    HaveKey, Multiaddr, PeerId, PeerSource,
    config::{Group, PeerMode, SourcePolicy},
};
use shoal_tests::test_builder;

const SECRET: &[u8] = b"a group secret of some length";

/// Bytes of the origin probe (`Range: bytes=0-0`) that learns a file's length and validator
/// when no peer told the length.
const PROBE: u64 = 1;

/// The first listen address of `node` (with `/p2p/ID`).
async fn addr_of(node: &Node) -> Multiaddr {
    node.listen_addrs().await.remove(0)
}

/// Starts a one-file job on `node` fetching `url` (expected by BLAKE3) into `local`, making
/// its directory.
async fn one_file_job(node: &Node, local: PathBuf, url: url::Url, data: &[u8]) -> (PathBuf, JobId) {
    std::fs::create_dir_all(local.parent().unwrap()).unwrap();
    let rec = Arc::new(Recorder::default());
    let job = start_job(node, spec(url, &local, blake3_only(data)), &rec).await;
    (local, job)
}

#[tokio::test]
async fn dht_only_discovery_finds_the_seed_through_a_bootstrap_node() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(600_000, 41);
        origin.put("d.bin", data.clone());
        let internet = |b: shoal_node::Builder| b.mode(PeerMode::Internet);
        // A bootstrap node that holds nothing.
        let boot = internet(test_builder(&[]).await).build().await.unwrap();
        let boot_addr = addr_of(&boot).await;
        let seed = internet(test_builder(&[]).await)
            .bootstrap(boot_addr.clone())
            .build()
            .await
            .unwrap();
        std::fs::write(dir.path().join("seed.bin"), &data).unwrap();
        let id = seed.seed(dir.path().join("seed.bin")).await.unwrap();
        // The seed's provider record reaches the bootstrap node.
        eventually("the seed is found in the DHT", async || {
            boot.find_providers(HaveKey::Blake3(*id.hash()), Duration::from_secs(1))
                .await
                .contains(&seed.peer_id())
        })
        .await;
        // The leecher knows only the bootstrap node, which does not have the file.
        let leech = internet(test_builder(&[]).await)
            .bootstrap(boot_addr)
            .build()
            .await
            .unwrap();
        let (local, job) = one_file_job(
            &leech,
            dir.path().join("out/d.bin"),
            origin.url("d.bin"),
            &data,
        )
        .await;
        let info = wait_for(&leech, job, &[State::Transferred]).await;
        leech.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), data);
        // Every byte came from the seed, found through the DHT.
        assert_eq!(origin.bytes_served(), 0);
        assert_eq!(info.bytes_from().peers(), data.len() as u64);
        assert_eq!(info.bytes_from().group_peers, data.len() as u64);
        assert_eq!(leech.peer_source(&seed.peer_id()), PeerSource::Dht);
        let dht = leech.dht_status().await;
        assert!(
            dht.enabled && dht.lookups >= 1 && dht.providers_found >= 1,
            "{dht:?}"
        );
        assert_eq!(dht.protocol, "/shoal/kad/1.0.0");
        // The leecher announces what it now holds.
        assert!(leech.dht_status().await.provided_keys >= 1);
        for n in [&boot, &seed, &leech] {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn a_group_keeps_foreign_nodes_out_and_shares_within() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(400_000, 42);
        origin.put("g.bin", data.clone());
        let lab = Group::new("lab", SECRET).unwrap();
        let seed = test_builder(&[])
            .await
            .group(lab.clone())
            .build()
            .await
            .unwrap();
        std::fs::write(dir.path().join("seed.bin"), &data).unwrap();
        seed.seed(dir.path().join("seed.bin")).await.unwrap();
        let seed_addr = addr_of(&seed).await;
        // Same name, other secret; other name, same secret; no group at all.
        let foreigners = [
            Some(Group::new("lab", b"another secret, also long").unwrap()),
            Some(Group::new("lab2", SECRET).unwrap()),
            None,
        ];
        for (i, g) in foreigners.into_iter().enumerate() {
            let mut b = test_builder(&[]).await.peer(seed_addr.clone());
            if let Some(g) = g {
                b = b.group(g);
            }
            let node = b.build().await.unwrap();
            let served = origin.bytes_served();
            let (_, job) = one_file_job(
                &node,
                dir.path().join(format!("f{i}/g.bin")),
                origin.url("g.bin"),
                &data,
            )
            .await;
            let info = wait_for(&node, job, &[State::Transferred]).await;
            // Refused: everything from the origin, and never connected.
            assert_eq!(info.bytes_from().peers(), 0, "foreigner {i}");
            assert_eq!(origin.bytes_served() - served, data.len() as u64 + PROBE);
            assert!(node.connected_peers().await.is_empty(), "foreigner {i}");
            assert!(!seed.connected_peers().await.contains(&node.peer_id()));
            node.shutdown().await;
        }
        assert_eq!(seed.upload_stats().pieces, 0);
        // A member connects and gets the file from the seed.
        let member = test_builder(&[])
            .await
            .group(lab)
            .peer(seed_addr)
            .build()
            .await
            .unwrap();
        let served = origin.bytes_served();
        let (local, job) = one_file_job(
            &member,
            dir.path().join("m/g.bin"),
            origin.url("g.bin"),
            &data,
        )
        .await;
        let info = wait_for(&member, job, &[State::Transferred]).await;
        member.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), data);
        assert_eq!(info.bytes_from().peers(), data.len() as u64);
        assert_eq!(origin.bytes_served(), served);
        assert!(seed.connected_peers().await.contains(&member.peer_id()));
        member.shutdown().await;
        seed.shutdown().await;
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn a_grouped_node_finds_its_group_in_the_group_dht() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(300_000, 43);
        origin.put("h.bin", data.clone());
        let lab = Group::new("lab", SECRET).unwrap();
        let grouped = async |boot: Option<Multiaddr>| {
            let mut b = test_builder(&[])
                .await
                .group(lab.clone())
                .mode(PeerMode::Group);
            if let Some(a) = boot {
                b = b.bootstrap(a);
            }
            b.build().await.unwrap()
        };
        let boot = grouped(None).await;
        let boot_addr = addr_of(&boot).await;
        let seed = grouped(Some(boot_addr.clone())).await;
        std::fs::write(dir.path().join("seed.bin"), &data).unwrap();
        let id = seed.seed(dir.path().join("seed.bin")).await.unwrap();
        eventually("the seed is found in the group DHT", async || {
            boot.find_providers(HaveKey::Blake3(*id.hash()), Duration::from_secs(1))
                .await
                .contains(&seed.peer_id())
        })
        .await;
        let leech = grouped(Some(boot_addr)).await;
        let (local, job) = one_file_job(
            &leech,
            dir.path().join("out/h.bin"),
            origin.url("h.bin"),
            &data,
        )
        .await;
        let info = wait_for(&leech, job, &[State::Transferred]).await;
        leech.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), data);
        assert_eq!(info.bytes_from().group_peers, data.len() as u64);
        assert_eq!(origin.bytes_served(), 0);
        assert_eq!(leech.dht_status().await.protocol, "/shoal/kad/lab/1.0.0");
        for n in [&boot, &seed, &leech] {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn origin_only_mode_contacts_no_peer() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(500_000, 44);
        origin.put("o.bin", data.clone());
        let seed = seed_node(dir.path(), "seed.bin", &data).await;
        let node = test_builder(std::slice::from_ref(&seed))
            .await
            .mode(PeerMode::Origin)
            .build()
            .await
            .unwrap();
        assert!(node.listen_addrs().await.is_empty());
        let (local, job) = one_file_job(
            &node,
            dir.path().join("out/o.bin"),
            origin.url("o.bin"),
            &data,
        )
        .await;
        let info = wait_for(&node, job, &[State::Transferred]).await;
        node.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), data);
        assert_eq!(info.bytes_from().origin, data.len() as u64);
        assert_eq!(origin.bytes_served(), data.len() as u64 + PROBE);
        // The seed, listed as a peer, never heard from it.
        assert!(seed.connected_peers().await.is_empty());
        assert!(node.connected_peers().await.is_empty());
        assert_eq!(seed.upload_stats(), Default::default());
        node.shutdown().await;
        seed.shutdown().await;
    })
    .await
    .expect("scenario timed out");
}

/// Starts `n` nodes on 127.0.0.1, each listing all the nodes before it, and waits until every
/// node is connected to every other.
async fn mesh(n: usize) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    for _ in 0..n {
        let node = test_node(&nodes).await;
        nodes.push(node);
    }
    for node in &nodes {
        eventually("a full mesh", async || {
            node.connected_peers().await.len() == n - 1
        })
        .await;
    }
    nodes
}

/// An origin serving `data` as `name` through one 4 MiB/s link shared by all its clients.
async fn wan_origin(name: &str, data: &[u8]) -> TestOrigin {
    let origin = TestOrigin::start().await;
    origin.put(name, data.to_vec());
    origin
        .state
        .wan_bytes_per_sec
        .store(4 << 20, std::sync::atomic::Ordering::SeqCst);
    origin
}

/// Starts one job of `name` from `origin` on every node at once, into `dir/n{i}/name`,
/// expecting the BLAKE3 hash of `data`.
async fn start_everywhere(
    nodes: &[Node],
    dir: &Path,
    origin: &TestOrigin,
    name: &str,
    data: &[u8],
) -> Vec<(PathBuf, JobId)> {
    start_everywhere_expecting(nodes, dir, origin, name, blake3_only(data)).await
}

/// [`start_everywhere`] with `expected` digests.
async fn start_everywhere_expecting(
    nodes: &[Node],
    dir: &Path,
    origin: &TestOrigin,
    name: &str,
    expected: Expected,
) -> Vec<(PathBuf, JobId)> {
    let mut jobs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let local = dir.join(format!("n{i}/{name}"));
        std::fs::create_dir_all(local.parent().unwrap()).unwrap();
        let rec = Arc::new(Recorder::default());
        let job = start_job(node, spec(origin.url(name), &local, expected), &rec).await;
        jobs.push((local, job));
    }
    jobs
}

/// Expects `bytes` by SHA-256 alone, as apt and dnf give them.
fn sha256_only(bytes: &[u8]) -> Expected {
    Expected {
        blake3: None,
        sha256: Some(sha256_of(bytes)),
    }
}

/// Waits for every job to transfer, completes it, and checks the file and that every byte
/// came from the origin or a peer; returns the bytes from peers and from the origin in all.
async fn finish_everywhere(nodes: &[Node], jobs: &[(PathBuf, JobId)], data: &[u8]) -> (u64, u64) {
    let (mut from_peers, mut from_origin) = (0, 0);
    for (node, (local, job)) in nodes.iter().zip(jobs) {
        let info = wait_for(node, *job, &[State::Transferred]).await;
        node.complete(*job).await.unwrap();
        assert_eq!(std::fs::read(local).unwrap(), data);
        assert_eq!(
            info.bytes_from().peers() + info.bytes_from().origin,
            data.len() as u64
        );
        from_peers += info.bytes_from().peers();
        from_origin += info.bytes_from().origin;
    }
    (from_peers, from_origin)
}

#[tokio::test]
async fn eight_nodes_starting_together_pull_about_one_copy_from_the_origin() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let data = content(6 << 20, 45);
        // A 4 MiB/s link shared by all eight: the file needs 1.5 s to cross it once.
        let origin = wan_origin("u.bin", &data).await;
        let nodes = mesh(8).await;
        let jobs = start_everywhere(&nodes, dir.path(), &origin, "u.bin", &data).await;
        let (from_peers, from_origin) = finish_everywhere(&nodes, &jobs, &data).await;
        let served = origin.bytes_served();
        let ratio = served as f64 / data.len() as f64;
        eprintln!("origin sent {ratio:.3} copies; {from_peers} bytes came from peers");
        assert!(
            ratio <= 1.25,
            "the origin sent {ratio:.3} copies of the file"
        );
        // What the origin sent beyond what the nodes kept: pieces fetched twice, and probes.
        assert!(served >= from_origin && from_peers >= 6 * data.len() as u64);
        for n in &nodes {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn eight_nodes_that_know_only_the_sha256_pull_about_one_copy_from_the_origin() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let data = content(6 << 20, 48);
        let origin = wan_origin("s.bin", &data).await;
        let nodes = mesh(8).await;
        // Nobody holds the file, and the catalog gives only its SHA-256 (decision 0016): the
        // members share what each fetches from the origin, unverified, and every node checks
        // the whole file's SHA-256 before it is Transferred.
        let jobs =
            start_everywhere_expecting(&nodes, dir.path(), &origin, "s.bin", sha256_only(&data))
                .await;
        let (from_peers, _) = finish_everywhere(&nodes, &jobs, &data).await;
        let ratio = origin.bytes_served() as f64 / data.len() as f64;
        eprintln!("origin sent {ratio:.3} copies; {from_peers} bytes came from peers");
        // Each node fetching the whole file itself sends eight copies.
        assert!(
            ratio <= 1.25,
            "the origin sent {ratio:.3} copies of the file"
        );
        assert!(from_peers >= 6 * data.len() as u64);
        for (node, (_, job)) in nodes.iter().zip(&jobs) {
            let info = node.info(*job).unwrap();
            assert_eq!(info.peer_stats.peers_banned, 0, "nobody lied");
        }
        for n in &nodes {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn a_line_of_nodes_that_each_see_two_others_pulls_one_copy_from_the_origin() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let data = content(6 << 20, 47);
        let origin = wan_origin("l.bin", &data).await;
        // n0 - n1 - ... - n7: each node lists only the one before it, so the ends are seven
        // hops apart and no node sees more than two others. Nobody holds a piece layer yet.
        let mut nodes: Vec<Node> = Vec::new();
        for i in 0..8 {
            let peers = if i == 0 {
                &nodes[..0]
            } else {
                &nodes[i - 1..i]
            };
            let node = test_node(peers).await;
            nodes.push(node);
        }
        for (i, node) in nodes.iter().enumerate() {
            let want = if i == 0 || i == 7 { 1 } else { 2 };
            eventually("a line", async || {
                node.connected_peers().await.len() == want
            })
            .await;
        }
        let jobs = start_everywhere(&nodes, dir.path(), &origin, "l.bin", &data).await;
        // The end of the line learns of every other node through gossip, and shares the
        // origin with those that use it.
        let (_, job0) = &jobs[0];
        eventually("n0 knows all seven others", async || {
            let d = nodes[0].diagnose(*job0).await.unwrap();
            d.files[0]
                .members
                .is_some_and(|m| m.alive == 7 && m.fetchers >= 2)
        })
        .await;
        finish_everywhere(&nodes, &jobs, &data).await;
        let ratio = origin.bytes_served() as f64 / data.len() as f64;
        eprintln!("origin sent {ratio:.3} copies along a line of eight");
        // Shares computed from neighbours alone send about one copy per two or three nodes;
        // without relayed chaining values no node could assemble the layer before the shares
        // lapse (20 s) and everyone fetched the rest itself.
        assert!(
            ratio <= 1.05,
            "the origin sent {ratio:.3} copies of the file"
        );
        for n in &nodes {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn never_origin_leaves_the_job_in_transient_error_until_a_peer_has_it() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(300_000, 46);
        origin.put("a.bin", data.clone());
        let node = test_builder(&[])
            .await
            .source_policy(SourcePolicy {
                never_origin: true,
                ..SourcePolicy::default()
            })
            .build()
            .await
            .unwrap();
        let (local, job) = one_file_job(
            &node,
            dir.path().join("out/a.bin"),
            origin.url("a.bin"),
            &data,
        )
        .await;
        let info = wait_for(&node, job, &[State::TransientError]).await;
        assert_eq!(
            info.error.map(|e| e.context),
            Some(shoal_node::job::ErrorContext::Transport)
        );
        // A peer that claims every piece but serves only the even ones: the odd ones cannot
        // be had, TransientError again, with the even pieces kept.
        let liar = BadPeer::start(Misbehaviour::FalseHave, &data).await;
        node.dial(liar.addr.clone()).await;
        eventually(
            "the even pieces arrive and the job stops again",
            async || {
                let i = node.info(job).unwrap();
                i.state == State::TransientError && i.bytes_from().peers() > 0
            },
        )
        .await;
        // An honest seed shows up: the job goes on from it, never from the origin.
        let seed = seed_node(dir.path(), "seed.bin", &data).await;
        node.dial(addr_of(&seed).await).await;
        let info = wait_for(&node, job, &[State::Transferred]).await;
        node.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), data);
        assert_eq!(info.bytes_from().peers(), data.len() as u64);
        assert_eq!(origin.requests(), 0);
        for n in [&node, &seed] {
            n.shutdown().await;
        }
        drop(liar);
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn a_background_job_waits_for_peers_before_the_origin_and_a_foreground_one_does_not() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(300_000, 47);
        origin.put("b.bin", data.clone());
        // A peer that does not have the file yet.
        let peer = test_node(&[]).await;
        let node = test_builder(std::slice::from_ref(&peer))
            .await
            .source_policy(SourcePolicy {
                origin_delay: [
                    Duration::ZERO,
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                    Duration::from_secs(30),
                ],
                ..SourcePolicy::default()
            })
            .build()
            .await
            .unwrap();
        eventually("connected", async || {
            !node.connected_peers().await.is_empty()
        })
        .await;
        let (local, job) = one_file_job(
            &node,
            dir.path().join("out/b.bin"),
            origin.url("b.bin"),
            &data,
        )
        .await;
        // A second later the peer gets the file; the background job has not touched the origin.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(node.info(job).unwrap().state, State::Connecting);
        std::fs::write(dir.path().join("p.bin"), &data).unwrap();
        peer.seed(dir.path().join("p.bin")).await.unwrap();
        let info = wait_for(&node, job, &[State::Transferred]).await;
        node.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), data);
        assert_eq!(info.bytes_from().peers(), data.len() as u64);
        assert_eq!(origin.requests(), 0);
        // A foreground job of another file goes to the origin at once.
        let other = content(200_000, 48);
        origin.put("c.bin", other.clone());
        let fg = node.create_job("fg", Priority::Foreground).await.unwrap();
        let local = dir.path().join("out/c.bin");
        node.add_file(fg, spec(origin.url("c.bin"), &local, blake3_only(&other)))
            .await
            .unwrap();
        node.resume(fg).await.unwrap();
        let info = wait_for(&node, fg, &[State::Transferred]).await;
        assert_eq!(info.bytes_from().origin, other.len() as u64);
        node.shutdown().await;
        peer.shutdown().await;
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn why_explains_bans_missing_digests_and_the_origin_mode() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(400_000, 49);
        origin.put("w.bin", data.clone());
        origin.put("plain.bin", data.clone());
        let rogue = BadPeer::start(Misbehaviour::FlipBytes, &data).await;
        let seed = seed_node(dir.path(), "s.bin", &data).await;
        let node = test_node_with(std::slice::from_ref(&seed), &[&rogue]).await;
        eventually("connected", async || {
            node.connected_peers().await.len() == 2
        })
        .await;
        let job = node.create_job("why", Priority::Normal).await.unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        node.add_file(
            job,
            spec(
                origin.url("w.bin"),
                &dir.path().join("out/w.bin"),
                blake3_only(&data),
            ),
        )
        .await
        .unwrap();
        node.add_file(
            job,
            spec(
                origin.url("plain.bin"),
                &dir.path().join("out/plain.bin"),
                Expected::default(),
            ),
        )
        .await
        .unwrap();
        node.resume(job).await.unwrap();
        let info = wait_for(&node, job, &[State::Transferred]).await;
        assert!(info.peer_stats.peers_banned >= 1);
        let d = node.diagnose(job).await.unwrap();
        assert_eq!(d.connected_peers, 2);
        let answers = &d.files[0].answers;
        let of = |p: PeerId| answers.iter().find(|a| a.peer == p).unwrap();
        assert!(of(rogue.peer_id).banned);
        assert!(!of(seed.peer_id()).banned);
        assert_eq!(of(seed.peer_id()).have, of(seed.peer_id()).pieces);
        let text = d.reasons.join("\n");
        assert!(
            text.contains(&format!("peer {} is banned", rogue.peer_id)),
            "{text}"
        );
        assert!(
            text.contains("file 1 does not use peers: it has no expected digest"),
            "{text}"
        );
        // A node in origin mode says so.
        let lone = test_builder(&[])
            .await
            .mode(PeerMode::Origin)
            .build()
            .await
            .unwrap();
        let job = lone.create_job("why", Priority::Normal).await.unwrap();
        lone.add_file(
            job,
            spec(
                origin.url("w.bin"),
                &dir.path().join("out/w2.bin"),
                blake3_only(&data),
            ),
        )
        .await
        .unwrap();
        let d = lone.diagnose(job).await.unwrap();
        assert!(
            d.reasons[0].contains("peer mode is \"origin\""),
            "{:?}",
            d.reasons
        );
        for n in [&node, &seed, &lone] {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario timed out");
}

/// GETs `http://addr/metrics` with a bare HTTP/1.0 request.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn prometheus_metrics_count_bytes_by_source_next_to_libp2p_metrics() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(300_000, 50);
        origin.put("m.bin", data.clone());
        let seed = seed_node(dir.path(), "s.bin", &data).await;
        let node = test_builder(std::slice::from_ref(&seed))
            .await
            .metrics("127.0.0.1:0".parse().unwrap())
            .build()
            .await
            .unwrap();
        let addr = node.metrics_addr().unwrap();
        let (_, job) = one_file_job(
            &node,
            dir.path().join("out/m.bin"),
            origin.url("m.bin"),
            &data,
        )
        .await;
        wait_for(&node, job, &[State::Transferred]).await;
        let text = scrape(addr).await;
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        assert_eq!(
            line("shoal_downloaded_bytes_total{source=\"lan\"}"),
            format!(
                "shoal_downloaded_bytes_total{{source=\"lan\"}} {}",
                data.len()
            )
        );
        assert_eq!(
            line("shoal_downloaded_bytes_total{source=\"origin\"}"),
            "shoal_downloaded_bytes_total{source=\"origin\"} 0"
        );
        assert_eq!(line("shoal_connected_peers"), "shoal_connected_peers 1");
        assert_eq!(
            line("shoal_jobs{state=\"Transferred\"}"),
            "shoal_jobs{state=\"Transferred\"} 1"
        );
        assert!(text.contains("shoal_percent_peer_caching 100"), "{text}");
        // The leecher asked; nobody asked it, on either have protocol.
        assert_eq!(
            line("shoal_have_streams_total"),
            "shoal_have_streams_total 0"
        );
        assert_eq!(
            line("shoal_have_requests_total"),
            "shoal_have_requests_total 0"
        );
        // libp2p's metrics are in the same registry.
        assert!(
            text.contains("libp2p_swarm_connections_established_total"),
            "{text}"
        );
        assert!(text.contains("libp2p_identify_"), "{text}");
        node.shutdown().await;
        seed.shutdown().await;
    })
    .await
    .expect("scenario timed out");
}

#[tokio::test]
async fn a_seed_serves_at_most_its_upload_peers_at_once() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(2 << 20, 51);
        origin.put("p.bin", data.clone());
        std::fs::write(dir.path().join("s.bin"), &data).unwrap();
        let seed = test_builder(&[])
            .await
            .max_upload_peers(1)
            // 2 MiB/s after a burst of 2 MiB: past it (the three want 6 MiB), a piece holds
            // the peer's slot about 8 ms, so the other leechers' requests find it taken
            // however loaded the machine is (unlimited, the three downloads can run one after
            // another on loopback, and nothing is busy).
            .bandwidth(shoal_node::config::BandwidthLimits {
                upload: Some(2 << 20),
                ..Default::default()
            })
            .build()
            .await
            .unwrap();
        seed.seed(dir.path().join("s.bin")).await.unwrap();
        let mut leechers = Vec::new();
        for _ in 0..3 {
            leechers.push(test_node(std::slice::from_ref(&seed)).await);
        }
        let mut jobs = Vec::new();
        for (i, n) in leechers.iter().enumerate() {
            jobs.push(
                one_file_job(
                    n,
                    dir.path().join(format!("l{i}/p.bin")),
                    origin.url("p.bin"),
                    &data,
                )
                .await,
            );
        }
        for (n, (local, job)) in leechers.iter().zip(&jobs) {
            wait_for(n, *job, &[State::Transferred]).await;
            n.complete(*job).await.unwrap();
            assert_eq!(std::fs::read(local).unwrap(), data);
        }
        let up = seed.upload_stats();
        assert_eq!(up.peak_peers, 1, "{up:?}");
        assert!(up.busy > 0 && up.pieces > 0, "{up:?}");
        for n in leechers.iter().chain([&seed]) {
            n.shutdown().await;
        }
    })
    .await
    .expect("scenario timed out");
}
