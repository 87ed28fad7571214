//! The content-addressed cache (issue 4): a verified file outlives its job, is served to peers
//! after a restart, fills later jobs without a download, and is evicted by size (least
//! recently used first) but never when pinned. Eviction by age runs with paused time in the
//! cache's unit tests (`node/src/store/cache.rs`).

use super::*;
use shoal_node::{HaveKey, config::CacheConfig};
use shoal_tests::test_builder;

const MIB: usize = 1 << 20;

/// A node with a state directory and a cache of at most 3 MiB (one 2 MiB file fits, two do
/// not), caching files of 1 MiB and more, dialing `peers`.
async fn cache_node(state: &Path, peers: &[Node]) -> Node {
    test_builder(peers)
        .await
        .state_dir(state)
        .cache(CacheConfig {
            max_size_bytes: Some(3 * MIB as u64),
            min_file_size: MIB as u64,
            ..CacheConfig::default()
        })
        .build()
        .await
        .expect("node starts with its cache")
}

fn cached(node: &Node) -> Vec<[u8; 32]> {
    node.cache_items()
        .iter()
        .map(|i| *i.content_id.hash())
        .collect()
}

#[tokio::test]
async fn a_cached_file_outlives_its_job_serves_peers_after_a_restart_and_fills_later_jobs() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let origin = TestOrigin::start().await;
        let (a, b, c) = (
            content(2 * MIB, 61),
            content(2 * MIB, 62),
            content(2 * MIB, 63),
        );
        origin.put("a.bin", a.clone());
        origin.put("b.bin", b.clone());
        origin.put("c.bin", c.clone());
        let sent = || origin.bytes_served();

        // 1. A downloaded job's file enters the cache; Complete still gives the local file.
        let node = cache_node(&state, &[]).await;
        fetch(&node, origin.url("a.bin"), &dir.path().join("a1"), &a).await;
        assert_eq!(cached(&node), vec![blake3_of(&a)]);
        let item = node.cache_items().remove(0);
        assert_eq!(std::fs::read(&item.path).unwrap(), a, "the cached copy");
        let after_first = sent();
        assert!(after_first >= a.len() as u64);

        // 2. A later job of the same content is filled from the cache: no byte from anywhere.
        let info = fetch(&node, origin.url("a.bin"), &dir.path().join("a2"), &a).await;
        assert_eq!(sent(), after_first, "the origin was not asked again");
        assert_eq!(info.files[0].bytes_from.origin, 0);
        assert_eq!(info.files[0].bytes_from.peers(), 0);
        assert_eq!(info.files[0].bytes_transferred, a.len() as u64);
        let why = node.diagnose(info.id).await.unwrap();
        assert!(why.files[0].in_cache);
        assert!(
            why.reasons
                .iter()
                .any(|r| r.contains("cache holds its content")),
            "{:?}",
            why.reasons
        );

        // 3. After a restart the cache still serves A to a peer.
        node.shutdown().await;
        drop(node);
        let node = cache_node(&state, &[]).await;
        assert_eq!(cached(&node), vec![blake3_of(&a)]);
        let leecher = test_node(std::slice::from_ref(&node)).await;
        let info = fetch(&leecher, origin.url("a.bin"), &dir.path().join("la"), &a).await;
        assert_eq!(info.files[0].bytes_from.peers(), a.len() as u64);
        assert_eq!(sent(), after_first, "every byte came from the cache");
        leecher.shutdown().await;

        // 4. B does not fit beside A: the least recently used, A, is evicted, its file deleted,
        //    and it is no longer served.
        let a_path = node.cache_items()[0].path.clone();
        fetch(&node, origin.url("b.bin"), &dir.path().join("b1"), &b).await;
        eventually("A evicted for B", async || {
            cached(&node) == vec![blake3_of(&b)]
        })
        .await;
        assert!(!a_path.exists(), "the evicted file is deleted");
        let leecher = test_node(std::slice::from_ref(&node)).await;
        let before = sent();
        let info = fetch(&leecher, origin.url("a.bin"), &dir.path().join("la2"), &a).await;
        assert_eq!(info.files[0].bytes_from.peers(), 0, "A is no longer served");
        assert!(sent() - before >= a.len() as u64);
        leecher.shutdown().await;

        // 5. A pinned B stays: C does not fit beside it and is not cached.
        let pinned = node
            .cache_pin(HaveKey::Blake3(blake3_of(&b)), true)
            .await
            .unwrap();
        assert_eq!(*pinned.hash(), blake3_of(&b));
        fetch(&node, origin.url("c.bin"), &dir.path().join("c1"), &c).await;
        assert!(node.cache_sweep().await.unwrap().is_empty());
        assert_eq!(cached(&node), vec![blake3_of(&b)]);
        assert!(node.cache_items()[0].pinned);

        // 6. Explicit eviction, and errors naming what is not cached.
        node.cache_evict(HaveKey::Blake3(blake3_of(&b)))
            .await
            .unwrap();
        assert!(node.cache_items().is_empty());
        let e = node
            .cache_pin(HaveKey::Blake3(blake3_of(&c)), true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("holds no"), "{e}");
        assert_eq!(node.stats().cache.unwrap().bytes, 0);
        node.shutdown().await;
    })
    .await
    .expect("scenario finishes in time");
}

#[tokio::test]
async fn a_cache_node_fetches_once_for_clients_that_start_at_different_times() {
    fetches_once_for_staggered_clients(blake3_only).await;
}

#[tokio::test]
async fn a_cache_node_fetches_once_for_clients_that_know_only_the_sha256() {
    // The running fill serves the pieces it fetched to clients that cannot check them before
    // the whole file is in (decision 0016); each checks the SHA-256 at the end.
    fetches_once_for_staggered_clients(|data| Expected {
        blake3: None,
        sha256: Some(sha256_of(data)),
    })
    .await;
}

/// Four clients that know only a cache node start one job each, 0.6 s apart, expecting the
/// digests `expected` gives: the origin sends one copy, every byte comes from the cache node.
async fn fetches_once_for_staggered_clients(expected: fn(&[u8]) -> Expected) {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(6 * MIB, 64);
        origin.put("u.bin", data.clone());
        // One 4 MiB/s WAN link: the file needs 1.5 s to cross it once.
        origin
            .state
            .wan_bytes_per_sec
            .store(4 << 20, std::sync::atomic::Ordering::SeqCst);
        let cache_node = test_builder(&[])
            .await
            .cache(CacheConfig {
                dir: Some(dir.path().join("cache")),
                ..CacheConfig::default()
            })
            .cache_node_role(shoal_node::config::CacheNodeRole {
                origins: vec![origin.url("").to_string()],
                ..Default::default()
            })
            .build()
            .await
            .unwrap();
        let at = cache_node.listen_addrs().await.remove(0);
        // Four clients that know only the cache node start 0.6 s apart: the first asks while
        // nothing is cached, the second and third while the cache node fetches, the last
        // after it finished.
        let mut clients = Vec::new();
        for i in 0..4 {
            let client = test_builder(&[])
                .await
                .cache_node(at.clone())
                .build()
                .await
                .unwrap();
            let local = dir.path().join(format!("c{i}/u.bin"));
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            let rec = Arc::new(Recorder::default());
            let job = start_job(
                &client,
                spec(origin.url("u.bin"), &local, expected(&data)),
                &rec,
            )
            .await;
            clients.push((client, local, job));
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        for (client, local, job) in &clients {
            let info = wait_for(client, *job, &[State::Transferred]).await;
            client.complete(*job).await.unwrap();
            assert_eq!(std::fs::read(local).unwrap(), data);
            assert_eq!(
                info.files[0].bytes_from.cache,
                data.len() as u64,
                "all from the cache node"
            );
            assert_eq!(info.files[0].bytes_from.origin, 0);
        }
        let ratio = origin.bytes_served() as f64 / data.len() as f64;
        eprintln!("origin sent {ratio:.4} copies");
        assert!(
            ratio <= 1.05,
            "the origin sent {ratio:.4} copies of the file"
        );
        assert_eq!(cached(&cache_node), vec![blake3_of(&data)]);
        assert_eq!(cache_node.stats().bytes_from.origin, data.len() as u64);
        let why = clients[0].0.diagnose(clients[0].2).await.unwrap();
        assert_eq!(why.cache_nodes, (1, 1));
        assert!(
            why.reasons
                .iter()
                .any(|r| r.contains("cache node") && r.contains("holds")),
            "{:?}",
            why.reasons
        );
        // A URL outside the cache node's origins is not fetched for the client: it falls back
        // to that origin itself, after the cache node showed nothing for 5 s.
        let other = TestOrigin::start().await;
        let v = content(2 * MIB, 65);
        other.put("v.bin", v.clone());
        let (client, _, _) = &clients[0];
        let local = dir.path().join("c0/v.bin");
        let rec = Arc::new(Recorder::default());
        let job = start_job(
            client,
            spec(other.url("v.bin"), &local, blake3_only(&v)),
            &rec,
        )
        .await;
        let info = wait_for(client, job, &[State::Transferred]).await;
        client.complete(job).await.unwrap();
        assert_eq!(std::fs::read(&local).unwrap(), v);
        assert_eq!(info.files[0].bytes_from.origin, v.len() as u64);
        assert_eq!(
            cache_node.stats().bytes_from.origin,
            data.len() as u64,
            "no fill"
        );
        assert_eq!(cached(&cache_node), vec![blake3_of(&data)]);
        for (client, _, _) in &clients {
            client.shutdown().await;
        }
        cache_node.shutdown().await;
    })
    .await
    .expect("scenario finishes in time");
}

#[tokio::test]
async fn a_cache_node_is_not_an_open_proxy() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        // The listed origin redirects to another one (an open redirect on a mirror).
        let listed = TestOrigin::start().await;
        let elsewhere = TestOrigin::start().await;
        let data = content(2 * MIB, 66);
        elsewhere.put("x.bin", data.clone());
        *listed.state.redirect_base.lock().unwrap() = Some(format!("http://{}", elsewhere.addr));
        let role_node = |origins: Vec<String>, name: &'static str| {
            let dir = dir.path().join(name);
            async move {
                test_builder(&[])
                    .await
                    .cache(CacheConfig {
                        dir: Some(dir),
                        ..CacheConfig::default()
                    })
                    .cache_node_role(shoal_node::config::CacheNodeRole {
                        origins,
                        ..Default::default()
                    })
                    .build()
                    .await
                    .unwrap()
            }
        };
        // 1. A cache node with no origins configured fetches nothing for peers; 2. one with an
        // origin does not follow its redirect to another host.
        let none = role_node(Vec::new(), "none").await;
        let some = role_node(vec![listed.url("").to_string()], "some").await;
        for (cache_node, url) in [
            (&none, elsewhere.url("x.bin")),
            (
                &some,
                format!("http://{}/redirect/x.bin", listed.addr)
                    .parse()
                    .unwrap(),
            ),
        ] {
            let client = test_builder(&[])
                .await
                .cache_node(cache_node.listen_addrs().await.remove(0))
                .build()
                .await
                .unwrap();
            let local = dir.path().join("client.bin");
            let rec = Arc::new(Recorder::default());
            let job = start_job(&client, spec(url, &local, blake3_only(&data)), &rec).await;
            // The client fetches it itself, following the redirect as any client does.
            let info = wait_for(&client, job, &[State::Transferred]).await;
            client.complete(job).await.unwrap();
            assert_eq!(std::fs::read(&local).unwrap(), data);
            assert_eq!(info.files[0].bytes_from.cache, 0);
            std::fs::remove_file(&local).unwrap();
            client.shutdown().await;
            assert_eq!(
                cache_node.stats().bytes_from.origin,
                0,
                "the cache node fetched"
            );
            assert!(cached(cache_node).is_empty());
        }
        // Every byte `elsewhere` sent went to the clients: two copies and their one-byte
        // probes, nothing for a cache node.
        assert!(elsewhere.bytes_served() <= 2 * (data.len() as u64 + 1));
        none.shutdown().await;
        some.shutdown().await;
    })
    .await
    .expect("scenario finishes in time");
}
