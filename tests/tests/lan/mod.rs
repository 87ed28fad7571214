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
use shoal_tests::netns::{self, Lan, UdpCount};

/// Tries in a row, each with three fresh nodes started at the same moment: on TCP alone (the
/// case that failed); then a few more with QUIC too (about 1 s each, mDNS probing included).
const TRIES: usize = 20;
const TRIES_WITH_QUIC: usize = 5;
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

/// Runs `tries` tries on `lan`, each with fresh nodes on every host; returns how long each
/// node took to be connected to all others. Panics naming the try and the host that was not.
fn tries(lan: &Arc<Lan>, quic: bool, tries: usize) -> Vec<Duration> {
    let hosts = lan.len();
    let mut times = Vec::new();
    for attempt in 1..=tries {
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
    for (quic, n) in [(false, TRIES), (true, TRIES_WITH_QUIC)] {
        let times = tries(&lan, quic, n);
        eprintln!(
            "{n} tries x {} hosts on port {PORT} (QUIC {quic}): every node connected to \
             all others; median {:?}, slowest {:?}",
            lan.len(),
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}

#[test]
fn nodes_on_public_addresses_do_not_use_mdns_there() {
    if !netns::available() {
        eprintln!(
            "SKIPPED nodes_on_public_addresses_do_not_use_mdns_there: \
             creating network namespaces needs root and iproute2"
        );
        return;
    }
    // Two hosts whose only addresses are public ones (IPv6 off), on a bridge of their own
    // that leads nowhere else. mDNS runs only on private and link-local interfaces: no mDNS
    // datagram crosses the bridge, and neither node finds the other, within three times what
    // discovery takes on a private LAN (about 1 s, the test above).
    let lan = Arc::new(Lan::on_subnet("public", 2, [100, 128, 0]).expect("create the LAN"));
    let mdns = UdpCount::start(&lan, 5353).expect("count mDNS on the bridge");
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let done = Arc::new(tokio::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let (lan, start, done) = (lan.clone(), start.clone(), done.clone());
            std::thread::spawn(move || {
                lan.enter(i).expect("enter the host");
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let state = tempfile::tempdir().expect("state dir");
                    let _ = tokio::time::timeout(TRY_BOUND, start.wait()).await;
                    let node = Node::builder()
                        .listen(vec![
                            format!("/ip4/0.0.0.0/tcp/{PORT}").parse().expect("addr"),
                        ])
                        .mode(PeerMode::Lan)
                        .mdns(true)
                        .state_dir(state.path())
                        .build()
                        .await
                        .expect("node starts");
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let peers = node.connected_peers().await;
                    let _ = tokio::time::timeout(TRY_BOUND, done.wait()).await;
                    node.shutdown().await;
                    peers
                })
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let peers = t.join().expect("host thread");
        assert!(peers.is_empty(), "host {i} found {peers:?} on a public LAN");
    }
    let sent = mdns.stop().expect("capture");
    assert_eq!(
        sent, 0,
        "{sent} mDNS datagrams crossed a LAN of public addresses"
    );
}
