//! LAN discovery on a real bridged LAN (issue 13, item 4): three hosts in network namespaces
//! this test creates, each with one interface on one bridge, no route out, mDNS on, and every
//! node on the same fixed port, as a fleet runs (Delivery Optimization uses 7680).
//!
//! Each host's node runs on a thread of its own that entered the host's namespace, on a
//! current-thread runtime, so its sockets (TCP, QUIC, the mDNS multicast socket) are on that
//! host (see `shoal_tests::netns`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_node::{Node, config::PeerMode};
use shoal_tests::netns::{self, Lan, UdpCount};

/// Tries in a row, each with three fresh nodes started at the same moment: on TCP alone (the
/// case that failed); then a few more with QUIC too (about 1 s each, mDNS probing included).
const TRIES: usize = 20;
const TRIES_WITH_QUIC: usize = 5;
/// How long one try may take before it counts as failed.
const TRY_BOUND: Duration = Duration::from_secs(30);
/// The fleet's port, on every host.
const PORT: u16 = 7680;

/// A node of the fleet: on [`PORT`] on every interface (TCP, and QUIC when `quic`), in LAN
/// mode with mDNS on, as a fleet installed with defaults on one fixed port runs.
async fn fleet_node(quic: bool, state: &std::path::Path) -> Node {
    let mut listen = vec![format!("/ip4/0.0.0.0/tcp/{PORT}")];
    if quic {
        listen.push(format!("/ip4/0.0.0.0/udp/{PORT}/quic-v1"));
    }
    Node::builder()
        .listen(
            listen
                .iter()
                .map(|a| a.parse().expect("multiaddr"))
                .collect(),
        )
        .mode(PeerMode::Lan)
        .mdns(true)
        .state_dir(state)
        .build()
        .await
        .expect("node starts on the host")
}

/// Starts a [`fleet_node`] on every host of `lan` at the same moment, each on a thread of its
/// own in its host's namespace, on a current-thread runtime (so its sockets are on that host),
/// and runs `watch` on each with the node and its start; every node stays up until all
/// `watch`es returned. Returns what each returned, by host.
fn on_every_host<T, F, W>(lan: &Arc<Lan>, quic: bool, watch: W) -> Vec<T>
where
    W: Fn(Node, Instant) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let n = lan.len();
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let done = Arc::new(tokio::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (lan, start, done) = (lan.clone(), start.clone(), done.clone());
            let watch = watch.clone();
            std::thread::spawn(move || {
                lan.enter(i).expect("enter the host's network namespace");
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let state = tempfile::tempdir().expect("state dir");
                    // Bounded, so that a host that failed to start cannot hold the others.
                    let _ = tokio::time::timeout(TRY_BOUND, start.wait()).await;
                    let t0 = Instant::now();
                    let node = fleet_node(quic, state.path()).await;
                    let seen = watch(node.clone(), t0).await;
                    let _ = tokio::time::timeout(TRY_BOUND, done.wait()).await;
                    node.shutdown().await;
                    seen
                })
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("host thread"))
        .collect()
}

/// Runs `tries` tries on `lan`, each with fresh nodes on every host; returns how long each
/// node took to be connected to all others. Panics naming the try and the host that was not.
fn tries(lan: &Arc<Lan>, quic: bool, tries: usize) -> Vec<Duration> {
    let others = lan.len() - 1;
    let mut times = Vec::new();
    for attempt in 1..=tries {
        let seen = on_every_host(lan, quic, move |node, t0| async move {
            loop {
                let peers = node.connected_peers().await;
                if peers.len() >= others {
                    break Ok(t0.elapsed());
                }
                if t0.elapsed() > TRY_BOUND {
                    break Err(peers);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        for (i, seen) in seen.into_iter().enumerate() {
            match seen {
                Ok(took) => times.push(took),
                Err(peers) => panic!(
                    "try {attempt} (QUIC {quic}): host {i} ({}) was connected to {} of \
                     {others} peers after {TRY_BOUND:?}: {peers:?}",
                    lan.host_ip(i),
                    peers.len(),
                ),
            }
        }
    }
    times.sort();
    times
}

/// True, with a loud message, where network namespaces cannot be made (not root, no
/// iproute2); CI runs as root with iproute2, so there the tests run.
fn skipped(test: &str) -> bool {
    let skip = !netns::available();
    if skip {
        eprintln!("SKIPPED {test}: creating network namespaces needs root and iproute2");
    }
    skip
}

#[test]
fn nodes_on_one_fixed_port_find_each_other_by_mdns_every_time() {
    if skipped("nodes_on_one_fixed_port_find_each_other_by_mdns_every_time") {
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
    if skipped("nodes_on_public_addresses_do_not_use_mdns_there") {
        return;
    }
    // Two hosts whose only addresses are public ones (IPv6 off), on a bridge of their own
    // that leads nowhere else. mDNS runs only on private and link-local interfaces: no mDNS
    // datagram crosses the bridge, and neither node finds the other, within three times what
    // discovery takes on a private LAN (about 1 s, the test above).
    let lan = Arc::new(Lan::on_subnet("public", 2, [100, 128, 0]).expect("create the LAN"));
    let mdns = UdpCount::start(&lan, 5353).expect("count mDNS on the bridge");
    let found = on_every_host(&lan, false, |node, _| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        node.connected_peers().await
    });
    for (i, peers) in found.into_iter().enumerate() {
        assert!(peers.is_empty(), "host {i} found {peers:?} on a public LAN");
    }
    let sent = mdns.stop().expect("capture");
    assert_eq!(
        sent, 0,
        "{sent} mDNS datagrams crossed a LAN of public addresses"
    );
}
