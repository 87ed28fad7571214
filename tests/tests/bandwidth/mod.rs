//! Bandwidth limits (issue 4): token buckets for downloads and uploads, the monthly upload
//! cap, and changes while the node runs.

use super::*;
use shoal_node::config::BandwidthLimits;
use shoal_tests::test_builder;

const MIB: usize = 1 << 20;

async fn capped_seed(state: &Path, file: &Path, cap: u64) -> Node {
    let node = test_builder(&[])
        .await
        .state_dir(state)
        .bandwidth(BandwidthLimits {
            monthly_upload_cap: Some(cap),
            ..BandwidthLimits::default()
        })
        .build()
        .await
        .unwrap();
    node.seed(file).await.unwrap();
    node
}

#[tokio::test]
async fn the_monthly_upload_cap_stops_serving_survives_a_restart_and_can_be_raised() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let origin = TestOrigin::start().await;
        let data = content(4 * MIB, 71);
        origin.put("f.bin", data.clone());
        let file = dir.path().join("seed.bin");
        std::fs::write(&file, &data).unwrap();
        let cap = MIB as u64;

        // The seed serves up to its cap (and what was asked for before it was reached: at most
        // 48 requests of 16 KiB pieces); the rest comes from the origin.
        let seed = capped_seed(&state, &file, cap).await;
        let leecher = test_node(std::slice::from_ref(&seed)).await;
        let info = fetch(&leecher, origin.url("f.bin"), &dir.path().join("l1"), &data).await;
        let from_seed = info.files[0].bytes_from.peers();
        assert!(
            from_seed >= cap && from_seed <= cap + 48 * 16 * 1024,
            "{from_seed} bytes from the capped seed"
        );
        assert_eq!(
            info.files[0].bytes_from.origin,
            data.len() as u64 - from_seed
        );
        let status = seed.bandwidth();
        assert!(status.cap_reached);
        // Pieces, and the piece layers sent (32 bytes per piece, at most a few times).
        let uploaded = status.uploaded_this_month;
        let layer = 32 * (data.len() / (16 * 1024)) as u64;
        assert!(
            uploaded >= from_seed && uploaded <= from_seed + 4 * layer,
            "{uploaded} bytes uploaded, {from_seed} of pieces"
        );
        leecher.shutdown().await;
        seed.shutdown().await;
        drop(seed);

        // After a restart the month's count is still there: the seed serves nothing.
        let seed = capped_seed(&state, &file, cap).await;
        assert_eq!(seed.bandwidth().uploaded_this_month, uploaded);
        let leecher = test_node(std::slice::from_ref(&seed)).await;
        let info = fetch(&leecher, origin.url("f.bin"), &dir.path().join("l2"), &data).await;
        assert_eq!(info.files[0].bytes_from.peers(), 0);
        leecher.shutdown().await;

        // Raised while it runs: it serves again.
        seed.set_bandwidth(BandwidthLimits {
            monthly_upload_cap: Some(64 * MIB as u64),
            ..BandwidthLimits::default()
        });
        let leecher = test_node(std::slice::from_ref(&seed)).await;
        let info = fetch(&leecher, origin.url("f.bin"), &dir.path().join("l3"), &data).await;
        assert_eq!(info.files[0].bytes_from.peers(), data.len() as u64);
        leecher.shutdown().await;
        seed.shutdown().await;
    })
    .await
    .expect("scenario finishes in time");
}

#[tokio::test]
async fn download_and_upload_buckets_hold_transfers_to_their_rates() {
    tokio::time::timeout(SCENARIO_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let origin = TestOrigin::start().await;
        let data = content(3 * MIB, 72);
        origin.put("f.bin", data.clone());
        // A background job limited to 1 MiB/s: after the first second's burst, 2 MiB take at
        // least 2 s. (Lower bounds only: a slow machine cannot make them fail.)
        let node = test_builder(&[])
            .await
            .bandwidth(BandwidthLimits {
                download_background: Some(MIB as u64),
                ..BandwidthLimits::default()
            })
            .build()
            .await
            .unwrap();
        let start = std::time::Instant::now();
        fetch(&node, origin.url("f.bin"), &dir.path().join("a"), &data).await;
        assert!(
            start.elapsed() >= Duration::from_millis(1800),
            "{:?}",
            start.elapsed()
        );
        // The same node as a seed with an upload limit of 1 MiB/s: a leecher takes as long.
        node.set_bandwidth(BandwidthLimits {
            upload: Some(MIB as u64),
            ..BandwidthLimits::default()
        });
        node.seed(dir.path().join("a")).await.unwrap();
        let leecher = test_node(std::slice::from_ref(&node)).await;
        let start = std::time::Instant::now();
        let info = fetch(&leecher, origin.url("f.bin"), &dir.path().join("b"), &data).await;
        assert_eq!(info.files[0].bytes_from.peers(), data.len() as u64);
        assert!(
            start.elapsed() >= Duration::from_millis(1800),
            "{:?}",
            start.elapsed()
        );
        // Pieces and the piece layer (32 bytes per piece, at most a few times).
        let uploaded = node.bandwidth().uploaded_this_month;
        let layer = 32 * (data.len() / (16 * 1024)) as u64;
        assert!(
            uploaded >= data.len() as u64 && uploaded <= data.len() as u64 + 4 * layer,
            "{uploaded}"
        );
        leecher.shutdown().await;
        node.shutdown().await;
    })
    .await
    .expect("scenario finishes in time");
}
