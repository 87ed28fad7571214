//! The piece scheduler: a pure, deterministic state machine that decides which piece to fetch
//! from which source.
//!
//! It does no I/O and reads no clock: the download driver passes `now` in, feeds it
//! what happened ([`Scheduler::on_done`], [`Scheduler::on_failed`], [`Scheduler::on_corrupt`],
//! [`Scheduler::set_peer`]) and carries out the [`Action`]s that [`Scheduler::next_actions`]
//! returns.
//!
//! Policy in this core:
//! - Peers first: each missing piece that an eligible peer holds is requested from the peer
//!   holding it that has the fewest requests in flight, rarest pieces first, within
//!   [`Config::max_per_peer`] and [`Config::max_in_flight`].
//! - The origin takes the pieces no eligible peer holds, and pieces that failed from peers
//!   [`Config::peer_attempts`] times, as one contiguous run at a time.
//! - A peer whose request fails (timeout, NotFound, Busy) is backed off exponentially; a peer
//!   that served a piece failing verification is banned for good.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use libp2p::PeerId;
use shoal_protocol::{Bitfield, PieceIndex};

/// Where a piece came from or is being fetched from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A peer.
    Peer(PeerId),
    /// The origin server.
    Origin,
}

/// Something for the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Request piece `index` from `peer`.
    Peer {
        /// The peer.
        peer: PeerId,
        /// The piece.
        index: PieceIndex,
    },
    /// Fetch pieces `start..end` from the origin as one stream.
    Origin {
        /// First piece.
        start: PieceIndex,
        /// One past the last piece.
        end: PieceIndex,
    },
}

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct Config {
    /// Requests in flight to one peer.
    pub max_per_peer: usize,
    /// Peer requests in flight in all.
    pub max_in_flight: usize,
    /// Longest origin run while peers are around, in pieces (without peers a run is unlimited).
    pub max_origin_run: u32,
    /// Failed peer attempts after which a piece goes to the origin.
    pub peer_attempts: u8,
    /// The first backoff of a failing peer; doubled per consecutive failure, at most 30 s.
    pub peer_backoff: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_per_peer: 8,
            max_in_flight: 32,
            max_origin_run: 16,
            peer_attempts: 3,
            peer_backoff: Duration::from_millis(500),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Missing,
    InFlight(Source),
    /// The bytes arrived and wait for verification.
    Verifying(Source),
    Done(Source),
}

#[derive(Debug)]
struct Peer {
    have: Bitfield,
    in_flight: usize,
    failures: u32,
    backoff_until: Option<Instant>,
}

/// The per-file scheduler.
#[derive(Debug)]
pub struct Scheduler {
    config: Config,
    pieces: Vec<Piece>,
    /// Per piece: failed peer attempts so far.
    peer_failures: Vec<u8>,
    peers: HashMap<PeerId, Peer>,
    banned: Vec<PeerId>,
    origin_busy: bool,
    origin_allowed: bool,
    peer_in_flight: usize,
}

impl Scheduler {
    /// A scheduler for `piece_count` pieces, none held yet.
    #[must_use]
    pub fn new(piece_count: u32, config: Config) -> Self {
        Self {
            config,
            pieces: vec![Piece::Missing; piece_count as usize],
            peer_failures: vec![0; piece_count as usize],
            peers: HashMap::new(),
            banned: Vec::new(),
            origin_busy: false,
            origin_allowed: true,
            peer_in_flight: 0,
        }
    }

    /// Marks piece `index` as already held (verified earlier, from `source`).
    pub fn set_done(&mut self, index: PieceIndex, source: Source) {
        if let Some(p) = self.pieces.get_mut(index as usize) {
            *p = Piece::Done(source);
        }
    }

    /// Allows or forbids the origin.
    pub fn set_origin_allowed(&mut self, allowed: bool) {
        self.origin_allowed = allowed;
    }

    /// Adds a peer or updates what it holds. Banned peers stay out.
    pub fn set_peer(&mut self, peer: PeerId, have: Bitfield) {
        if self.banned.contains(&peer) || have.len() as usize != self.pieces.len() {
            return;
        }
        self.peers
            .entry(peer)
            .and_modify(|p| p.have = have.clone())
            .or_insert(Peer {
                have,
                in_flight: 0,
                failures: 0,
                backoff_until: None,
            });
    }

    /// Bans `peer` for this file: no more requests to it.
    pub fn ban(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        if !self.banned.contains(&peer) {
            self.banned.push(peer);
        }
    }

    /// The peers banned so far.
    #[must_use]
    pub fn banned(&self) -> &[PeerId] {
        &self.banned
    }

    /// True when every piece is held.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.pieces.iter().all(|p| matches!(p, Piece::Done(_)))
    }

    /// True when some piece is being fetched.
    #[must_use]
    pub fn is_busy(&self) -> bool {
        self.origin_busy || self.peer_in_flight > 0
    }

    /// True when a piece is missing that no eligible peer holds and the origin is forbidden.
    #[must_use]
    pub fn is_stuck(&self) -> bool {
        !self.origin_allowed
            && !self.is_busy()
            && (0..self.pieces.len() as u32).any(|i| {
                self.pieces[i as usize] == Piece::Missing
                    && !self.peers.values().any(|p| p.have.get(i))
            })
    }

    /// Whether piece `index` came from a peer.
    #[must_use]
    pub fn from_peer(&self, index: PieceIndex) -> bool {
        matches!(
            self.pieces.get(index as usize),
            Some(Piece::Done(Source::Peer(_)))
        )
    }

    fn eligible(&self, peer: &Peer, now: Instant) -> bool {
        peer.in_flight < self.config.max_per_peer && peer.backoff_until.is_none_or(|t| t <= now)
    }

    fn needs_origin(&self, index: u32) -> bool {
        self.pieces[index as usize] == Piece::Missing
            && (self.peer_failures[index as usize] >= self.config.peer_attempts
                || !self.peers.values().any(|p| p.have.get(index)))
    }

    /// The fetches to start now.
    pub fn next_actions(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        // Peers: rarest first among pieces some eligible peer holds.
        let mut wanted: Vec<(usize, u32)> = (0..self.pieces.len() as u32)
            .filter(|&i| {
                self.pieces[i as usize] == Piece::Missing
                    && self.peer_failures[i as usize] < self.config.peer_attempts
            })
            .map(|i| (self.peers.values().filter(|p| p.have.get(i)).count(), i))
            .filter(|(n, _)| *n > 0)
            .collect();
        wanted.sort_unstable();
        for (_, index) in wanted {
            if self.peer_in_flight >= self.config.max_in_flight {
                break;
            }
            let best = self
                .peers
                .iter()
                .filter(|(_, p)| p.have.get(index) && self.eligible(p, now))
                .min_by_key(|(id, p)| (p.in_flight, p.failures, **id))
                .map(|(id, _)| *id);
            if let Some(peer) = best {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.in_flight += 1;
                }
                self.peer_in_flight += 1;
                self.pieces[index as usize] = Piece::InFlight(Source::Peer(peer));
                actions.push(Action::Peer { peer, index });
            }
        }
        // Origin: one contiguous run of pieces no peer can give.
        if self.origin_allowed
            && !self.origin_busy
            && let Some(start) = (0..self.pieces.len() as u32).find(|&i| self.needs_origin(i))
        {
            let limit = if self.peers.is_empty() {
                u32::MAX
            } else {
                self.config.max_origin_run
            };
            let mut end = start + 1;
            while end < self.pieces.len() as u32 && end - start < limit && self.needs_origin(end) {
                end += 1;
            }
            for i in start..end {
                self.pieces[i as usize] = Piece::InFlight(Source::Origin);
            }
            self.origin_busy = true;
            actions.push(Action::Origin { start, end });
        }
        actions
    }

    fn release(&mut self, index: PieceIndex, source: Source) {
        if let Source::Peer(peer) = source {
            self.peer_in_flight = self.peer_in_flight.saturating_sub(1);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.in_flight = p.in_flight.saturating_sub(1);
            }
        }
        let _ = index;
    }

    /// The bytes of piece `index` arrived and went to verification; an origin run that ends
    /// now no longer takes the piece back.
    pub fn on_received(&mut self, index: PieceIndex) {
        if let Some(p) = self.pieces.get_mut(index as usize)
            && let Piece::InFlight(source) = *p
        {
            *p = Piece::Verifying(source);
        }
    }

    /// Piece `index` arrived from `source` and verified.
    pub fn on_done(&mut self, index: PieceIndex, source: Source) {
        self.release(index, source);
        if let Source::Peer(peer) = source
            && let Some(p) = self.peers.get_mut(&peer)
        {
            p.failures = 0;
            p.backoff_until = None;
        }
        if let Some(p) = self.pieces.get_mut(index as usize) {
            *p = Piece::Done(source);
        }
    }

    /// Fetching piece `index` from `source` failed without proof of bad faith (timeout,
    /// NotFound, Busy, a dropped connection). The peer is backed off and the piece returns to
    /// the pool.
    pub fn on_failed(&mut self, index: PieceIndex, source: Source, now: Instant) {
        self.release(index, source);
        let mut bump = 0;
        if let Source::Peer(peer) = source {
            bump = 1;
            if let Some(p) = self.peers.get_mut(&peer) {
                p.failures += 1;
                let delay = self
                    .config
                    .peer_backoff
                    .saturating_mul(1 << p.failures.min(6))
                    .min(Duration::from_secs(30));
                p.backoff_until = Some(now + delay);
            }
        }
        if let Some(p) = self.pieces.get_mut(index as usize) {
            *p = Piece::Missing;
            self.peer_failures[index as usize] =
                self.peer_failures[index as usize].saturating_add(bump);
        }
    }

    /// Piece `index` from `peer` failed verification: the peer is banned and the piece
    /// returns to the pool.
    pub fn on_corrupt(&mut self, index: PieceIndex, peer: PeerId) {
        self.release(index, Source::Peer(peer));
        self.ban(peer);
        if let Some(p) = self.pieces.get_mut(index as usize) {
            *p = Piece::Missing;
        }
    }

    /// The origin run ended (all its pieces reported, or the stream failed); pieces of it still
    /// in flight return to the pool.
    pub fn on_origin_run_end(&mut self) {
        self.origin_busy = false;
        for p in &mut self.pieces {
            if *p == Piece::InFlight(Source::Origin) {
                *p = Piece::Missing;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_with(pieces: &[u32], len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for &i in pieces {
            b.set(i);
        }
        b
    }

    #[test]
    fn without_peers_the_origin_gets_one_run_of_everything() {
        let mut s = Scheduler::new(10, Config::default());
        let now = Instant::now();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 0, end: 10 }]
        );
        assert!(s.next_actions(now).is_empty());
        for i in 0..10 {
            s.on_done(i, Source::Origin);
        }
        s.on_origin_run_end();
        assert!(s.is_complete());
    }

    #[test]
    fn peers_get_what_they_hold_and_the_origin_the_rest() {
        let mut s = Scheduler::new(6, Config::default());
        let a = PeerId::random();
        s.set_peer(a, peer_with(&[0, 1, 2, 3], 6));
        let actions = s.next_actions(Instant::now());
        let peer_pieces: Vec<_> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Peer { index, .. } => Some(*index),
                Action::Origin { .. } => None,
            })
            .collect();
        assert_eq!(peer_pieces.len(), 4);
        assert!(actions.contains(&Action::Origin { start: 4, end: 6 }));
    }

    #[test]
    fn rarest_pieces_go_first_and_load_is_spread() {
        let cfg = Config {
            max_in_flight: 1,
            ..Config::default()
        };
        let mut s = Scheduler::new(3, cfg);
        let (a, b) = (PeerId::random(), PeerId::random());
        s.set_peer(a, peer_with(&[0, 1, 2], 3));
        s.set_peer(b, peer_with(&[0, 2], 3));
        // Piece 1 is held by one peer only: it goes first.
        assert_eq!(
            s.next_actions(Instant::now()),
            vec![Action::Peer { peer: a, index: 1 }]
        );
    }

    #[test]
    fn a_corrupt_piece_bans_the_peer_and_goes_elsewhere() {
        let mut s = Scheduler::new(1, Config::default());
        let (bad, good) = (PeerId::random(), PeerId::random());
        s.set_peer(bad, peer_with(&[0], 1));
        let now = Instant::now();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Peer {
                peer: bad,
                index: 0
            }]
        );
        s.on_corrupt(0, bad);
        assert_eq!(s.banned(), &[bad]);
        s.set_peer(bad, peer_with(&[0], 1));
        s.set_peer(good, peer_with(&[0], 1));
        assert_eq!(
            s.next_actions(now),
            vec![Action::Peer {
                peer: good,
                index: 0
            }]
        );
    }

    #[test]
    fn repeated_peer_failures_send_the_piece_to_the_origin() {
        let mut s = Scheduler::new(1, Config::default());
        let a = PeerId::random();
        s.set_peer(a, peer_with(&[0], 1));
        let mut now = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                s.next_actions(now),
                vec![Action::Peer { peer: a, index: 0 }]
            );
            s.on_failed(0, Source::Peer(a), now);
            // Backed off: nothing until the delay passes.
            now += Duration::from_secs(60);
        }
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 0, end: 1 }]
        );
    }

    #[test]
    fn a_failed_origin_run_returns_its_pieces() {
        let mut s = Scheduler::new(4, Config::default());
        let now = Instant::now();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 0, end: 4 }]
        );
        s.on_done(0, Source::Origin);
        s.on_origin_run_end();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 1, end: 4 }]
        );
        s.set_origin_allowed(false);
        s.on_origin_run_end();
        assert!(s.is_stuck());
    }
}
