//! Peers found by mDNS, and when to dial them again after a dial failed.
//!
//! A discovered peer is dialed at once. When that dial fails (the peer was still starting, a
//! packet was lost, or both nodes dialed each other at the same moment), it is dialed again
//! after a delay that doubles with each failure, from [`FIRST_RETRY`] up to [`MAX_RETRY`], with
//! up to half the delay again added at random so that two nodes that failed together do not
//! retry together. Retries go on while mDNS still reports the peer (its record lives for the
//! TTL of the last response, six minutes with libp2p's defaults) and stop when the peer is
//! connected, as a BitTorrent client retries the peers its tracker lists.
//!
//! Pure bookkeeping: no I/O and no clock of its own (the event loop passes `now`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// The delay before the first retry of a failed dial, seconds: 1.
pub(crate) const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest delay between two retries, seconds: 60.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(60);

/// One discovered peer.
#[derive(Debug, Default)]
struct Entry {
    /// The addresses mDNS reports for it, in scopes the node dials.
    addrs: Vec<Multiaddr>,
    /// Dials that failed since it was last connected.
    failures: u32,
    /// When to dial it again, if a dial failed.
    due: Option<Instant>,
}

/// The peers mDNS reports and their dial retries.
#[derive(Debug, Default)]
pub(crate) struct Discovered {
    peers: HashMap<PeerId, Entry>,
}

/// The delay before retry number `failures` (1 for the first), before jitter: doubled each
/// time from [`FIRST_RETRY`], at most [`MAX_RETRY`].
pub(crate) fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

impl Discovered {
    /// Records that mDNS reports `peer` at `addr`; returns true when the address is new.
    pub(crate) fn found(&mut self, peer: PeerId, addr: Multiaddr) -> bool {
        let e = self.peers.entry(peer).or_default();
        if e.addrs.contains(&addr) {
            return false;
        }
        e.addrs.push(addr);
        true
    }

    /// Records that mDNS no longer reports `peer` at `addr`; the peer is forgotten (no more
    /// retries) once it has no address left.
    pub(crate) fn expired(&mut self, peer: &PeerId, addr: &Multiaddr) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.addrs.retain(|a| a != addr);
            if e.addrs.is_empty() {
                self.peers.remove(peer);
            }
        }
    }

    /// The addresses of `peer` to dial, if it is a discovered peer.
    pub(crate) fn addrs(&self, peer: &PeerId) -> Option<&[Multiaddr]> {
        self.peers.get(peer).map(|e| e.addrs.as_slice())
    }

    /// A connection to `peer` was established: no retry is pending, and the next failure
    /// starts again from [`FIRST_RETRY`].
    pub(crate) fn connected(&mut self, peer: &PeerId) {
        if let Some(e) = self.peers.get_mut(peer) {
            e.failures = 0;
            e.due = None;
        }
    }

    /// A dial to `peer` failed at `now`; schedules its retry after [`backoff`] plus
    /// `jitter` (a fraction in `0.0..=1.0` of half the backoff). Returns the delay, or `None`
    /// when `peer` is not a discovered peer.
    pub(crate) fn failed(&mut self, peer: &PeerId, now: Instant, jitter: f64) -> Option<Duration> {
        let e = self.peers.get_mut(peer)?;
        e.failures = e.failures.saturating_add(1);
        let base = backoff(e.failures);
        let delay = base + base.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
        e.due = Some(now + delay);
        Some(delay)
    }

    /// The earliest pending retry.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.peers.values().filter_map(|e| e.due).min()
    }

    /// The peers whose retry is due at `now`, with their addresses; their retries are
    /// cleared (a new failure schedules the next one).
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<(PeerId, Vec<Multiaddr>)> {
        let mut due = Vec::new();
        for (peer, e) in &mut self.peers {
            if e.due.is_some_and(|d| d <= now) {
                e.due = None;
                due.push((*peer, e.addrs.clone()));
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/10.77.0.2/tcp/{port}").parse().unwrap()
    }

    #[test]
    fn the_delay_doubles_from_one_second_up_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn a_failed_dial_is_retried_after_the_backoff_until_the_peer_connects() {
        let mut d = Discovered::default();
        let p = PeerId::random();
        let t0 = Instant::now();
        assert!(d.found(p, addr(7680)));
        assert!(!d.found(p, addr(7680)), "the same address twice");
        assert_eq!(d.next_due(), None, "nothing failed yet");
        assert_eq!(d.failed(&p, t0, 0.0), Some(Duration::from_secs(1)));
        assert!(d.take_due(t0).is_empty(), "not before the delay");
        let due = d.take_due(t0 + Duration::from_secs(1));
        assert_eq!(due, vec![(p, vec![addr(7680)])]);
        assert_eq!(d.next_due(), None, "taken");
        // The second failure waits twice as long, and the jitter adds up to half again.
        assert_eq!(d.failed(&p, t0, 1.0), Some(Duration::from_secs(3)));
        assert_eq!(d.next_due(), Some(t0 + Duration::from_secs(3)));
        d.connected(&p);
        assert_eq!(d.next_due(), None, "connected: no retry");
        assert_eq!(d.failed(&p, t0, 0.0), Some(FIRST_RETRY), "starts over");
    }

    #[test]
    fn a_peer_mdns_no_longer_reports_is_not_retried_and_others_are_not_tracked() {
        let mut d = Discovered::default();
        let p = PeerId::random();
        let t0 = Instant::now();
        d.found(p, addr(1));
        d.found(p, addr(2));
        d.expired(&p, &addr(1));
        assert_eq!(d.addrs(&p), Some(&[addr(2)][..]));
        d.failed(&p, t0, 0.0);
        d.expired(&p, &addr(2));
        assert_eq!(d.addrs(&p), None);
        assert_eq!(d.next_due(), None);
        assert!(d.take_due(t0 + MAX_RETRY * 2).is_empty());
        assert_eq!(d.failed(&PeerId::random(), t0, 0.0), None, "not discovered");
    }
}
