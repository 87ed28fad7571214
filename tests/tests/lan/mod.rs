//! LAN discovery on a real bridged LAN (issue 13, item 4): three hosts in network namespaces
//! this test creates, each with one interface on one bridge, no route out, mDNS on, and every
//! node on the same fixed port, as a fleet runs (Delivery Optimization uses 7680).
//!
//! Each host's node runs on a thread of its own that entered the host's namespace, on a
//! current-thread runtime, so its sockets (TCP, QUIC, the mDNS multicast socket) are on that
//! host (see `shoal_tests::netns`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_node::{Node, PeerId, config::PeerMode};
use shoal_tests::netns::{self, Lan};

/// Tries in a row, each with three fresh nodes started at the same moment.
const TRIES: usize = 20;
/// How long one try may take before it counts as failed.
const TRY_BOUND: Duration = Duration::from_secs(30);
/// The fleet's port, on every host.
const PORT: u16 = 7680;

/// What one host saw in one try: how long until it was connected to both others, or the peers
/// it had at the bound.
type Seen = Result<Duration, Vec<PeerId>>;

/// Runs host `i`'s node for one try, listening on TCP (and QUIC when `quic`): built when
/// every host is ready, then connected peers polled until it has `others` or the bound passes;
/// it stays up until every host is done.
fn host(
    lan: &Lan,
    i: usize,
    quic: bool,
    others: usize,
    start: &Arc<tokio::sync::Barrier>,
    done: &Arc<tokio::sync::Barrier>,
) -> Seen {
    lan.enter(i).expect("enter the host's network namespace");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let state = tempfile::tempdir().expect("state dir");
        // Bounded, so that a host that failed to start cannot hold the others for ever.
        let _ = tokio::time::timeout(TRY_BOUND, start.wait()).await;
        let t0 = Instant::now();
        let mut listen = vec![format!("/ip4/0.0.0.0/tcp/{PORT}")];
        if quic {
            listen.push(format!("/ip4/0.0.0.0/udp/{PORT}/quic-v1"));
        }
        let node = Node::builder()
            .listen(
                listen
                    .iter()
                    .map(|a| a.parse().expect("multiaddr"))
                    .collect(),
            )
            .mode(PeerMode::Lan)
            .mdns(true)
            .state_dir(state.path())
            .build()
            .await
            .expect("node starts on the host");
        let seen = loop {
            let peers = node.connected_peers().await;
            if peers.len() >= others {
                break Ok(t0.elapsed());
            }
            if t0.elapsed() > TRY_BOUND {
                break Err(peers);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = tokio::time::timeout(TRY_BOUND, done.wait()).await;
        node.shutdown().await;
        seen
    })
}

/// Runs [`TRIES`] tries on `lan`, each with fresh nodes on every host; returns how long each
/// node took to be connected to all others. Panics naming the try and the host that was not.
fn tries(lan: &Arc<Lan>, quic: bool) -> Vec<Duration> {
    let hosts = lan.len();
    let mut times = Vec::new();
    for attempt in 1..=TRIES {
        let start = Arc::new(tokio::sync::Barrier::new(hosts));
        let done = Arc::new(tokio::sync::Barrier::new(hosts));
        let threads: Vec<_> = (0..hosts)
            .map(|i| {
                let (lan, start, done) = (lan.clone(), start.clone(), done.clone());
                std::thread::spawn(move || host(&lan, i, quic, hosts - 1, &start, &done))
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            match t.join().expect("host thread") {
                Ok(took) => times.push(took),
                Err(peers) => panic!(
                    "try {attempt} (QUIC {quic}): host {i} ({}) was connected to {} of {} peers \
                     after {TRY_BOUND:?}: {peers:?}",
                    lan.host_ip(i),
                    peers.len(),
                    hosts - 1
                ),
            }
        }
    }
    times.sort();
    times
}

#[test]
fn nodes_on_one_fixed_port_find_each_other_by_mdns_every_time() {
    if !netns::available() {
        eprintln!(
            "SKIPPED nodes_on_one_fixed_port_find_each_other_by_mdns_every_time: \
             creating network namespaces needs root and iproute2"
        );
        return;
    }
    let lan = Arc::new(Lan::new("mdns", 3).expect("create the LAN's namespaces"));
    // TCP alone first: a simultaneous open on TCP is what failed (QUIC has no such thing, and
    // a node that listens on both is dialed on both, so QUIC alone would hide it).
    for quic in [false, true] {
        let times = tries(&lan, quic);
        eprintln!(
            "{TRIES} tries x {} hosts on port {PORT} (QUIC {quic}): every node connected to \
             all others; median {:?}, slowest {:?}",
            lan.len(),
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}
