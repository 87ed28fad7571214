//! The piece scheduler: a pure, deterministic state machine that decides which piece to fetch
//! from which source.
//!
//! It does no I/O and reads no clock: the download driver passes `now` in, feeds it what
//! happened ([`Scheduler::on_received`], [`Scheduler::on_done`], [`Scheduler::on_failed`],
//! [`Scheduler::on_corrupt`], [`Scheduler::set_peer`]) and carries out the [`Action`]s that
//! [`Scheduler::next_actions`] returns. Its randomness comes from a seed
//! ([`Scheduler::set_seed`]), so a test can replay it.
//!
//! Policy (see `docs/scheduling.md`):
//! - **Peers first, rarest first**: each missing piece that an eligible peer holds is requested
//!   from the holder with the most room in its pipeline; pieces held by the fewest peers go
//!   first; among equals, those in a window of 16 from the first missing piece, at random
//!   inside it. While the file has fewer than [`Config::random_first`] pieces,
//!   pieces are picked at random instead, so a new node soon has something to share (BEP 3's
//!   "random first piece"). A node with a single peer has nobody to share with: it takes the
//!   pieces in file order, the order its SHA-256 hashes them.
//! - **Pipelining by throughput**: a peer's pipeline depth is sized to keep
//!   [`Config::target_queue`] worth of its measured rate in flight, between 2 and
//!   [`Config::max_per_peer`]; a fast peer gets more requests, a slow one fewer.
//! - **Slow peers dropped**: a peer that delivered nothing for [`Config::snub_after`] while it
//!   had requests is snubbed: its depth drops to 1 and its pieces are requested again from
//!   other peers.
//! - **Endgame**: once every missing piece is in flight, each in-flight piece is requested once
//!   more from another peer that holds it; the first copy to arrive wins and the other request
//!   is cancelled ([`Received::First`]).
//! - **Origin, coalesced**: the origin takes the pieces no eligible peer holds and no peer is
//!   fetching, and pieces that failed from peers [`Config::peer_attempts`] times, one
//!   contiguous run at a time. A piece some peer is fetching waits for that peer for up to
//!   [`Config::coming_patience`]; a piece a peer fetched from the origin but cannot serve yet
//!   (claimed, awaiting the piece layer) waits until the claims are dropped. The first run starts
//!   at [`Scheduler::set_origin_start`] (each node of a swarm at a different place); later runs
//!   go on where the last one ended, or jump into the middle of the largest stretch nobody has
//!   or fetches.
//! - **Trust**: a peer whose request fails (timeout, NotFound, Busy) is backed off
//!   exponentially and loses score; a peer that served a piece failing verification is banned
//!   for good.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use libp2p::PeerId;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use shoal_protocol::{Bitfield, PieceIndex};

/// Where a piece came from or is being fetched from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// A peer.
    Peer(PeerId),
    /// The origin server.
    Origin,
}

/// Something for the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
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

/// What [`Scheduler::on_received`] made of an arriving piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Received {
    /// The first copy: verify it. The requests for the same piece to these peers are
    /// cancelled (the driver drops them).
    First {
        /// Peers whose requests for the piece lost.
        cancel: Vec<PeerId>,
    },
    /// A copy of a piece already received, or of a request that was cancelled: drop it.
    Late,
}

/// Scheduler limits and policy knobs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The deepest pipeline of requests to one peer.
    pub max_per_peer: usize,
    /// Peer requests in flight in all.
    pub max_in_flight: usize,
    /// Longest origin run while peers are around, in pieces (without peers a run is unlimited).
    pub max_origin_run: u32,
    /// Failed peer attempts after which a piece goes to the origin.
    pub peer_attempts: u8,
    /// The first backoff of a failing peer; doubled per consecutive failure, at most 30 s.
    pub peer_backoff: Duration,
    /// Pieces picked at random, not rarest first, until the file holds this many.
    pub random_first: u32,
    /// How much of a peer's measured throughput to keep requested, as time.
    pub target_queue: Duration,
    /// A peer with requests that delivered nothing for this long is snubbed.
    pub snub_after: Duration,
    /// How long a piece that a peer is fetching waits for that peer before the origin may
    /// take it.
    pub coming_patience: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_per_peer: 16,
            max_in_flight: 48,
            max_origin_run: 8,
            peer_attempts: 3,
            peer_backoff: Duration::from_millis(500),
            random_first: 4,
            target_queue: Duration::from_millis(500),
            snub_after: Duration::from_secs(10),
            coming_patience: Duration::from_secs(20),
        }
    }
}

/// The most bytes requested from one peer at a time: a peer's pipeline holds at most this
/// many bytes of pieces (4 pieces of 1 MiB), whatever [`Config::max_per_peer`] allows. It
/// bounds the memory of pieces in flight: a response being received holds a piece buffer,
/// and when the leecher is the slower side every request in flight holds one. Far more than
/// a LAN's bandwidth-delay product; it caps one peer 50 ms away at about 80 MiB/s. 8 MiB took
/// the same time from one seed over loopback with 6 to 13 MiB more peak RSS
/// (`docs/benchmarks.md`, session 30).
pub(crate) const PEER_WINDOW_BYTES: u64 = 4 << 20;
/// The most bytes requested from all peers together at a time (16 pieces of 1 MiB).
pub(crate) const TOTAL_WINDOW_BYTES: u64 = 16 << 20;
/// The most members that share out the origin for one download: those with the lowest seeds.
/// Bounds the work of computing the shares (blocks × fetchers) whatever members peers make up.
pub(crate) const MAX_FETCHERS: usize = 256;

/// Pieces per block when the swarm's members share out the origin
/// ([`Scheduler::set_fetchers`]). Every node must cut the same blocks, so this is part of the
/// protocol, not a setting.
pub(crate) const SHARE_BLOCK: u32 = 8;

/// Pieces of equal rarity are taken a window of this many at a time, from the first missing
/// piece on, in random order inside the window.
const ORDER_WINDOW: u32 = 16;

/// The depth of a peer's pipeline before its rate is known.
const INITIAL_DEPTH: usize = 4;
/// Busy time over which a peer's rate is measured before the measurement is halved.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Missing,
    /// Requested; the source is the first one asked (others may be asked too: endgame).
    InFlight(Src),
    /// The bytes arrived and wait for verification.
    Verifying(Src),
    Done(Src),
}

/// A [`Source`] as a piece stores it: the origin, or a peer by its place in
/// [`Scheduler::sources`]. Eight bytes rather than a `PeerId`'s eighty, for each of a file's
/// pieces (the walks over pieces read them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Origin,
    Peer(u32),
}

#[derive(Debug)]
struct Peer {
    have: Bitfield,
    fetching: Bitfield,
    claimed: Bitfield,
    in_flight: usize,
    failures: u32,
    backoff_until: Option<Instant>,
    /// Bytes received over `busy`, for the rate.
    delivered: f64,
    /// Time with at least one request in flight, closed periods only.
    busy: Duration,
    /// Start of the open busy period.
    busy_since: Option<Instant>,
    /// The last time a piece arrived from the peer.
    last_delivery: Option<Instant>,
    /// The first Busy answer since the peer last delivered a piece.
    refused_since: Option<Instant>,
    /// The peer answered only Busy for [`Config::coming_patience`]: what it holds, fetches
    /// and claims no longer keeps a piece from the origin, and it is asked for nothing more
    /// in this download.
    stalled: bool,
}

impl Peer {
    fn new(have: Bitfield, fetching: Bitfield, claimed: Bitfield) -> Self {
        Self {
            have,
            fetching,
            claimed,
            in_flight: 0,
            failures: 0,
            backoff_until: None,
            delivered: 0.0,
            busy: Duration::ZERO,
            busy_since: None,
            last_delivery: None,
            refused_since: None,
            stalled: false,
        }
    }

    fn busy_time(&self, now: Instant) -> Duration {
        self.busy
            + self
                .busy_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Bytes per second, once measured over at least 200 ms of busy time.
    fn rate(&self, now: Instant) -> Option<f64> {
        let busy = self.busy_time(now).as_secs_f64();
        (busy >= 0.2 && self.delivered > 0.0).then(|| self.delivered / busy)
    }

    fn snubbed(&self, now: Instant, after: Duration) -> bool {
        self.in_flight > 0
            && match (self.last_delivery, self.busy_since) {
                (Some(d), Some(b)) => now.saturating_duration_since(d.max(b)) >= after,
                (None, Some(b)) => now.saturating_duration_since(b) >= after,
                _ => false,
            }
    }

    fn start_request(&mut self, now: Instant) {
        if self.in_flight == 0 {
            self.busy_since = Some(now);
        }
        self.in_flight += 1;
    }

    fn end_request(&mut self, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.in_flight == 0
            && let Some(t) = self.busy_since.take()
        {
            self.busy += now.saturating_duration_since(t);
            if self.busy > RATE_WINDOW {
                self.busy /= 2;
                self.delivered /= 2.0;
            }
        }
    }
}

/// The backoff after `failures` consecutive failures: `first` doubled per failure, at most
/// 30 s.
fn backoff(first: Duration, failures: u32) -> Duration {
    first
        .saturating_mul(1 << failures.min(6))
        .min(Duration::from_secs(30))
}

/// Adds (`+1`) or removes (`-1`) the bits of `b` to per-piece counts, and tells `changed`
/// each piece counted with its new count.
fn count_bits(counts: &mut [u16], b: &Bitfield, delta: i32, mut changed: impl FnMut(u32, u16)) {
    for i in b.ones() {
        if let Some(c) = counts.get_mut(i as usize) {
            *c = u16::try_from((i32::from(*c) + delta).max(0)).unwrap_or(u16::MAX);
            changed(i, *c);
        }
    }
}

/// A `changed` for [`count_bits`] and [`recount`] that marks the pieces in `dirty`.
fn mark(dirty: &mut Bitfield) -> impl FnMut(u32, u16) + '_ {
    |i, _| dirty.set(i)
}

/// A `changed` for [`count_bits`] and [`recount`] that keeps `held` set where a count is
/// above zero.
fn held_where_counted(held: &mut Bitfield) -> impl FnMut(u32, u16) + '_ {
    |i, c| {
        if c > 0 {
            held.set(i);
        } else {
            held.clear(i);
        }
    }
}

/// Moves the per-piece `counts` from bitfield `old` to `new`: the pieces set only in `new`
/// count one more, those set only in `old` one less (the same as removing `old` and adding
/// `new`, at the cost of the words that differ), and tells `changed` each piece counted with
/// its new count.
fn recount(counts: &mut [u16], old: &Bitfield, new: &Bitfield, mut changed: impl FnMut(u32, u16)) {
    for (word, (a, b)) in old.words().zip(new.words()).enumerate() {
        let mut diff = a ^ b;
        while diff != 0 {
            let bit = diff.leading_zeros() as usize;
            let mask = 1u64 << (63 - bit);
            diff &= !mask;
            let i = word * 64 + bit;
            if let Some(c) = counts.get_mut(i) {
                *c = if b & mask != 0 {
                    c.saturating_add(1)
                } else {
                    c.saturating_sub(1)
                };
                changed(i as u32, *c);
            }
        }
    }
}

/// A peer that may take a request, with what ranks it: the most room left in its pipeline,
/// then the fewest failures, then the fastest, then the highest id.
#[derive(Debug)]
struct Candidate {
    id: PeerId,
    room: usize,
    failures: u32,
    rate: f64,
    /// The peer's pieces, while lent for a walk; empty otherwise.
    have: Bitfield,
}

impl Candidate {
    fn rank(&self, other: &Self) -> std::cmp::Ordering {
        (self.room, std::cmp::Reverse(self.failures))
            .cmp(&(other.room, std::cmp::Reverse(other.failures)))
            .then(self.rate.total_cmp(&other.rate))
            .then(self.id.cmp(&other.id))
    }
}

/// The per-file scheduler.
#[derive(Debug)]
pub(crate) struct Scheduler {
    config: Config,
    piece_size: u64,
    pieces: Vec<Piece>,
    /// The buffers of [`Self::next_actions`]'s walk, kept between calls (their contents are
    /// not: each call fills them anew).
    wanted: Vec<u32>,
    cands: Vec<Candidate>,
    /// The peers that [`Src::Peer`] points into, in the order they were first a source (each
    /// once; none is dropped while the scheduler lives).
    sources: Vec<PeerId>,
    /// Bit `i` is set while piece `i` is [`Piece::Missing`] ([`Self::set_piece`] keeps it):
    /// the walks over missing pieces skip 8 held ones at a time.
    missing: Bitfield,
    /// Bit `i` is set while piece `i` is [`Piece::InFlight`] (kept the same way).
    flying: Bitfield,
    /// Per piece: failed peer attempts so far.
    peer_failures: Vec<u8>,
    /// Bit `i` is set once piece `i` failed from peers [`Config::peer_attempts`] times (it
    /// then goes to the origin).
    exhausted: Bitfield,
    /// Per piece: how many known peers hold it, fetch it, claim it.
    have_count: Vec<u16>,
    /// Bit `i` is set while some known peer holds piece `i` (`have_count` above zero).
    held: Bitfield,
    fetching_count: Vec<u16>,
    claimed_count: Vec<u16>,
    /// Per piece: since when some peer has been fetching it.
    coming_since: Vec<Option<Instant>>,
    /// Pieces whose fetching or claimed counts changed since `set_peer` last brought
    /// `coming_since` and `claimed_since` in line with the counts (a bitset, as
    /// [`Self::missing`]).
    since_dirty: Bitfield,
    /// Per piece: since when some peer first claimed it (never reset: a claim that has not
    /// become a piece within [`Config::coming_patience`] no longer holds the origin back).
    claimed_since: Vec<Option<Instant>>,
    peers: BTreeMap<PeerId, Peer>,
    /// Live peer requests: piece and peer.
    requests: BTreeSet<(PieceIndex, PeerId)>,
    banned: Vec<PeerId>,
    origin_busy: bool,
    origin_allowed: bool,
    /// Whether the origin honours Range requests.
    origin_ranges: bool,
    origin_not_before: Option<Instant>,
    /// Where the first origin run starts.
    origin_start: PieceIndex,
    /// One past the end of the last origin run.
    origin_next: Option<PieceIndex>,
    peer_in_flight: usize,
    done: u32,
    /// Peers may join (some are connected or may be found): origin runs stay short.
    swarm: bool,
    /// This node, to rank itself among the peers that fetch the same content.
    me: Option<PeerId>,
    /// The swarm members that share out the pieces needing the origin (by seed, then id), and this
    /// node's shares of them; see [`Scheduler::set_fetchers`].
    fetchers: Vec<PeerId>,
    /// The seed of each fetcher.
    seeds: Vec<u64>,
    shares: Option<Shares>,
    /// Fetchers whose blocks were still awaited when the shares lapsed: they take no share
    /// again in this download (they may not exist, or may never deliver).
    excluded: BTreeSet<PeerId>,
    /// Pieces held when last looked at, and since when (from the shares being first set):
    /// shares lapse after [`Config::coming_patience`] without a new piece.
    progress: Option<(u32, Instant)>,
    rng: StdRng,
}

/// Which blocks of pieces are this node's to fetch from the origin.
#[derive(Debug)]
struct Shares {
    /// Pieces per block.
    block: u32,
    /// Per block: whether this node owns it.
    mine: Vec<bool>,
    /// The pieces of the blocks this node owns.
    pieces: Bitfield,
    /// Per block: its owner.
    owners: Vec<Option<PeerId>>,
}

impl Scheduler {
    /// A scheduler for `piece_count` pieces of `piece_size` bytes, none held yet.
    #[must_use]
    pub(crate) fn new(piece_count: u32, piece_size: u64, config: Config) -> Self {
        let n = piece_count as usize;
        Self {
            piece_size: piece_size.max(1),
            pieces: vec![Piece::Missing; n],
            sources: Vec::new(),
            wanted: Vec::new(),
            cands: Vec::new(),
            missing: Bitfield::full(n as u32),
            flying: Bitfield::new(n as u32),
            peer_failures: vec![0; n],
            exhausted: if config.peer_attempts == 0 {
                Bitfield::full(n as u32)
            } else {
                Bitfield::new(n as u32)
            },
            have_count: vec![0; n],
            held: Bitfield::new(n as u32),
            fetching_count: vec![0; n],
            claimed_count: vec![0; n],
            coming_since: vec![None; n],
            since_dirty: Bitfield::new(n as u32),
            claimed_since: vec![None; n],
            peers: BTreeMap::new(),
            requests: BTreeSet::new(),
            banned: Vec::new(),
            origin_busy: false,
            origin_allowed: true,
            origin_ranges: true,
            origin_not_before: None,
            origin_start: 0,
            origin_next: None,
            peer_in_flight: 0,
            done: 0,
            swarm: false,
            me: None,
            fetchers: Vec::new(),
            seeds: Vec::new(),
            shares: None,
            excluded: BTreeSet::new(),
            progress: None,
            config,
            rng: StdRng::seed_from_u64(0x5eed),
        }
    }

    /// Says whether peers may take part even before any is known (connected peers, a DHT):
    /// origin runs then stay at [`Config::max_origin_run`], so that pieces are left for peers
    /// that show up.
    pub(crate) fn set_swarm(&mut self, swarm: bool) {
        self.swarm = swarm;
    }

    /// Says whether the origin honours Range requests (default: yes). Without, every origin
    /// run is read from byte 0, so a run is never cut short for the swarm's sake: it takes
    /// every missing piece from its start on, up to the first one fetched or held (an origin
    /// run of a few pieces at a time would cost the square of the file's length in transfer).
    pub(crate) fn set_origin_ranges(&mut self, ranges: bool) {
        self.origin_ranges = ranges;
    }

    /// Tells the scheduler this node's peer id: among the peers fetching the same content, each
    /// node takes a different share of the pieces that need the origin, by the rank of its id.
    pub(crate) fn set_me(&mut self, me: PeerId) {
        self.me = Some(me);
    }

    /// Sets the swarm members that share out the pieces needing the origin: each with its
    /// seed (`crate::download::members::fetcher_seed`), this node among them when it uses the origin.
    /// With two or more (or only others), the pieces are cut into blocks of [`SHARE_BLOCK`]
    /// and each block goes to one fetcher by rendezvous hashing
    /// (`crate::download::members::assign`); a block of another fetcher is awaited, not fetched,
    /// unless no piece arrived for [`Config::coming_patience`] (the shares lapse) or the piece
    /// failed from peers. Every node that knows the same fetchers computes the same shares,
    /// whether or not they are its neighbours. Unchanged fetchers change nothing.
    ///
    /// At most [`MAX_FETCHERS`] take shares: those with the lowest seeds, the same ones on
    /// every node that knows the same members, whether or not this node is among them. In a
    /// swarm of more members, the others await the pieces (`docs/decisions/0012`). Made-up
    /// members with low seeds cost a lapse of the shares: their blocks never come, and they
    /// are out after [`Config::coming_patience`].
    pub(crate) fn set_fetchers(&mut self, fetchers: &[(PeerId, u64)], now: Instant) {
        let by_seed = crate::download::members::by_seed;
        let usable = |(p, _): &&(PeerId, u64)| !self.excluded.contains(p);
        let fetchers: Vec<(PeerId, u64)> = if fetchers.is_sorted_by(|a, b| by_seed(a, b).is_le()) {
            // The member view's order: the first `MAX_FETCHERS` are the lowest.
            fetchers
                .iter()
                .filter(usable)
                .take(MAX_FETCHERS)
                .copied()
                .collect()
        } else {
            let mut f: Vec<(PeerId, u64)> = fetchers.iter().filter(usable).copied().collect();
            if f.len() > MAX_FETCHERS {
                f.select_nth_unstable_by(MAX_FETCHERS - 1, by_seed);
                f.truncate(MAX_FETCHERS);
            }
            f.sort_unstable_by(by_seed);
            f
        };
        if fetchers.len() == self.fetchers.len()
            && fetchers
                .iter()
                .zip(&self.fetchers)
                .all(|((a, _), b)| a == b)
        {
            return;
        }
        self.fetchers = fetchers.iter().map(|(p, _)| *p).collect();
        self.seeds = fetchers.iter().map(|(_, s)| *s).collect();
        let alone = fetchers.is_empty() || (fetchers.len() == 1 && Some(fetchers[0].0) == self.me);
        if alone || self.me.is_none() {
            self.shares = None;
            return;
        }
        if self.shares.is_none() {
            // Shares (again): the patience starts now.
            self.progress = Some((self.done, now));
        }
        let block = SHARE_BLOCK;
        let blocks = (self.pieces.len() as u32).div_ceil(block);
        let seeds: Vec<u64> = fetchers.iter().map(|(_, s)| *s).collect();
        let owners = crate::download::members::assign(&seeds, blocks);
        let me = self.fetchers.iter().position(|p| Some(*p) == self.me);
        let mine: Vec<bool> = owners
            .iter()
            .map(|&o| me.is_some_and(|m| usize::from(o) == m))
            .collect();
        let n = self.pieces.len() as u32;
        let mut pieces = Bitfield::new(n);
        for (b, _) in mine.iter().enumerate().filter(|(_, m)| **m) {
            let start = b as u32 * block;
            for i in start..(start + block).min(n) {
                pieces.set(i);
            }
        }
        self.shares = Some(Shares {
            block,
            mine,
            pieces,
            owners: owners
                .iter()
                .map(|&o| self.fetchers.get(usize::from(o)).copied())
                .collect(),
        });
    }

    /// The shares lapsed at `now`: the owners of blocks with pieces still missing take no
    /// share again in this download, and the blocks are shared anew among the rest (every node
    /// that lapsed on the same owners computes the same new shares).
    fn lapse(&mut self, now: Instant) {
        let Some(shares) = self.shares.take() else {
            return;
        };
        for (b, owner) in shares.owners.iter().enumerate() {
            let start = b * shares.block as usize;
            let end = (start + shares.block as usize).min(self.pieces.len());
            if let Some(o) = owner
                && Some(*o) != self.me
                && self.pieces[start..end].contains(&Piece::Missing)
            {
                self.excluded.insert(*o);
            }
        }
        let keep: Vec<(PeerId, u64)> = self
            .fetchers
            .iter()
            .zip(&self.seeds)
            .filter(|(p, _)| !self.excluded.contains(p))
            .map(|(p, s)| (*p, *s))
            .collect();
        self.fetchers.clear();
        self.progress = None;
        self.set_fetchers(&keep, now);
    }

    /// How many of the member view's fetchers with the lowest seeds [`Self::set_fetchers`]
    /// needs to choose exactly as from all of them: [`MAX_FETCHERS`] and those it excluded.
    #[must_use]
    pub(crate) fn fetchers_wanted(&self) -> usize {
        MAX_FETCHERS + self.excluded.len()
    }

    /// Whether the shares lapsed at least once in this download (some fetcher's blocks never
    /// came): from then on only members this node heard from itself take shares.
    #[must_use]
    pub(crate) fn has_lapsed(&self) -> bool {
        !self.excluded.is_empty()
    }

    /// Whether the shares among fetchers hold at `now` (set, and not lapsed).
    fn shared(&self, now: Instant) -> bool {
        self.shares.is_some()
            && self
                .progress
                .is_none_or(|(_, t)| now.saturating_duration_since(t) < self.config.coming_patience)
    }

    /// Whether piece `index` is this node's to fetch from the origin under the shares
    /// (`shared`: [`Self::shared`] now).
    fn mine(&self, index: usize, shared: bool) -> bool {
        match &self.shares {
            Some(s) if shared => s
                .mine
                .get(index / s.block as usize)
                .copied()
                .unwrap_or(true),
            _ => true,
        }
    }

    /// Seeds the random choices (random first pieces, ties between equally rare pieces).
    pub(crate) fn set_seed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// Marks piece `index` as already held (verified earlier, from `source`).
    pub(crate) fn set_done(&mut self, index: PieceIndex, source: Source) {
        if let Some(p) = self.pieces.get(index as usize) {
            if !matches!(p, Piece::Done(_)) {
                self.done += 1;
            }
            let s = self.src(source);
            self.set_piece(index as usize, Piece::Done(s));
        }
    }

    /// `source` as a piece stores it (a peer not seen before is added to [`Self::sources`]).
    fn src(&mut self, source: Source) -> Src {
        match source {
            Source::Origin => Src::Origin,
            Source::Peer(p) => match self.src_of(p) {
                Some(s) => s,
                None => {
                    self.sources.push(p);
                    Src::Peer(u32::try_from(self.sources.len() - 1).unwrap_or(u32::MAX))
                }
            },
        }
    }

    /// Peer `peer` as a piece stores it, when some piece ever had it as its source.
    fn src_of(&self, peer: PeerId) -> Option<Src> {
        let at = self.sources.iter().position(|p| *p == peer)?;
        Some(Src::Peer(u32::try_from(at).ok()?))
    }

    /// The source that `s` stands for.
    fn source(&self, s: Src) -> Option<Source> {
        match s {
            Src::Origin => Some(Source::Origin),
            Src::Peer(at) => self.sources.get(at as usize).map(|p| Source::Peer(*p)),
        }
    }

    /// Whether piece `index` is in flight with `peer` as the first source asked.
    fn in_flight_from(&self, index: PieceIndex, peer: PeerId) -> bool {
        matches!(
            (self.pieces.get(index as usize), self.src_of(peer)),
            (Some(Piece::InFlight(a)), Some(b)) if *a == b
        )
    }

    /// Sets the state of piece `index` (in range), and its bits in [`Self::missing`] and
    /// [`Self::flying`].
    fn set_piece(&mut self, index: usize, state: Piece) {
        let set = |b: &mut Bitfield, on: bool| {
            if on {
                b.set(index as u32);
            } else {
                b.clear(index as u32);
            }
        };
        set(&mut self.missing, state == Piece::Missing);
        set(&mut self.flying, matches!(state, Piece::InFlight(_)));
        self.pieces[index] = state;
    }

    /// The missing pieces, ascending.
    fn missing_pieces(&self) -> impl Iterator<Item = usize> + '_ {
        self.missing.ones().map(|i| i as usize)
    }

    /// Allows or forbids the origin.
    pub(crate) fn set_origin_allowed(&mut self, allowed: bool) {
        self.origin_allowed = allowed;
    }

    /// Keeps the origin unused until `when` (the source policy's wait for peers).
    pub(crate) fn set_origin_not_before(&mut self, when: Option<Instant>) {
        self.origin_not_before = when;
    }

    /// Where the first origin run starts (wrapping around): each node of a swarm starting one
    /// job together should pass a different place.
    pub(crate) fn set_origin_start(&mut self, index: PieceIndex) {
        if !self.pieces.is_empty() {
            self.origin_start = index % self.pieces.len() as u32;
        }
    }

    /// Adds a peer or updates what it holds (`have`), fetches (`fetching`) and claims
    /// (`claimed`: fetched from the origin, servable once the piece layer is verified).
    /// Banned peers and bitfields of another length are ignored.
    pub(crate) fn set_peer(
        &mut self,
        peer: PeerId,
        have: Bitfield,
        fetching: Bitfield,
        claimed: Bitfield,
        now: Instant,
    ) {
        let n = self.pieces.len() as u32;
        if self.banned.contains(&peer) || [&have, &fetching, &claimed].iter().any(|b| b.len() != n)
        {
            return;
        }
        match self.peers.get_mut(&peer) {
            // A stalled peer's bits are not in the counts: only what changed is counted.
            Some(p) => {
                if !p.stalled {
                    let held = held_where_counted(&mut self.held);
                    recount(&mut self.have_count, &p.have, &have, held);
                    let dirty = mark(&mut self.since_dirty);
                    recount(&mut self.fetching_count, &p.fetching, &fetching, dirty);
                    let dirty = mark(&mut self.since_dirty);
                    recount(&mut self.claimed_count, &p.claimed, &claimed, dirty);
                }
                p.have = have;
                p.fetching = fetching;
                p.claimed = claimed;
            }
            None => {
                let p = Peer::new(have, fetching, claimed);
                self.count_peer(&p, 1);
                self.peers.insert(peer, p);
            }
        }
        // Only pieces whose counts changed since the last time can need it: for the others
        // the times already agree with the counts.
        for i in self.since_dirty.ones().map(|i| i as usize) {
            let since = &mut self.coming_since[i];
            if self.fetching_count[i] == 0 {
                *since = None;
            } else if since.is_none() {
                *since = Some(now);
            }
            if self.claimed_count[i] > 0 && self.claimed_since[i].is_none() {
                self.claimed_since[i] = Some(now);
            }
        }
        self.since_dirty.clear_all();
    }

    /// Adds (`sign` 1) or removes (-1) what `peer` holds, fetches and claims to the per-piece
    /// counts; a stalled peer's bits are not in them.
    fn count_peer(&mut self, peer: &Peer, sign: i32) {
        if peer.stalled {
            return;
        }
        let held = held_where_counted(&mut self.held);
        count_bits(&mut self.have_count, &peer.have, sign, held);
        let dirty = mark(&mut self.since_dirty);
        count_bits(&mut self.fetching_count, &peer.fetching, sign, dirty);
        let dirty = mark(&mut self.since_dirty);
        count_bits(&mut self.claimed_count, &peer.claimed, sign, dirty);
    }

    /// Forgets every peer's claims (the piece layer assembled from them failed to verify):
    /// the origin may take those pieces now.
    pub(crate) fn drop_claims(&mut self) {
        for p in self.peers.values_mut() {
            p.claimed = Bitfield::new(p.claimed.len());
        }
        self.claimed_count.iter_mut().for_each(|c| *c = 0);
    }

    /// Forgets `peer` (it left, or stopped answering): what it held, fetched and claimed no
    /// longer counts. Its live requests stay; they end on their own.
    pub(crate) fn remove_peer(&mut self, peer: &PeerId) {
        if let Some(old) = self.peers.remove(peer) {
            self.count_peer(&old, -1);
        }
        // (The pieces stay marked: the next `set_peer` also starts the times of counts that
        // rose.)
        for i in self.since_dirty.ones().map(|i| i as usize) {
            if self.fetching_count[i] == 0 {
                self.coming_since[i] = None;
            }
        }
    }

    /// Bans `peer` for this file: no more requests to it.
    pub(crate) fn ban(&mut self, peer: PeerId) {
        if let Some(old) = self.peers.remove(&peer) {
            self.count_peer(&old, -1);
        }
        let dropped: Vec<_> = self
            .requests
            .iter()
            .filter(|(_, p)| *p == peer)
            .copied()
            .collect();
        for key in dropped {
            self.requests.remove(&key);
            self.peer_in_flight = self.peer_in_flight.saturating_sub(1);
            self.orphaned(key.0, peer);
        }
        if !self.banned.contains(&peer) {
            self.banned.push(peer);
        }
    }

    /// The peers known for this file (they answered with its content).
    #[must_use]
    pub(crate) fn peer_ids(&self) -> Vec<PeerId> {
        self.peers.keys().copied().collect()
    }

    /// The peers banned so far.
    #[cfg(test)]
    fn banned(&self) -> &[PeerId] {
        &self.banned
    }

    /// How many pieces are held.
    #[must_use]
    pub(crate) fn done_count(&self) -> u32 {
        self.done
    }

    /// True when every piece is held.
    #[must_use]
    pub(crate) fn is_complete(&self) -> bool {
        self.done as usize == self.pieces.len()
    }

    /// True when some piece is being fetched.
    #[must_use]
    pub(crate) fn is_busy(&self) -> bool {
        self.origin_busy || self.peer_in_flight > 0
    }

    /// True when a piece is missing that no peer holds, fetches or claims (or that failed
    /// from peers [`Config::peer_attempts`] times), and the origin is forbidden: no source can
    /// supply it.
    #[must_use]
    pub(crate) fn is_stuck(&self) -> bool {
        !self.origin_allowed
            && !self.is_busy()
            && self.missing_pieces().any(|i| {
                self.peer_failures[i] >= self.config.peer_attempts
                    || (self.have_count[i] == 0
                        && self.fetching_count[i] == 0
                        && self.claimed_count[i] == 0)
            })
    }

    /// The pieces in flight now (to any source).
    #[must_use]
    pub(crate) fn in_flight(&self) -> Bitfield {
        self.flying.clone()
    }

    /// The pipeline depth of a peer: its measured rate times [`Config::target_queue`] in
    /// pieces, plus one, between 2 and [`Config::max_per_peer`]; 1 while snubbed.
    fn depth(&self, peer: &Peer, now: Instant) -> usize {
        if peer.snubbed(now, self.config.snub_after) {
            return 1;
        }
        let window = usize::try_from(PEER_WINDOW_BYTES / self.piece_size).unwrap_or(usize::MAX);
        let max = self.config.max_per_peer.min(window).max(1);
        match peer.rate(now) {
            None => INITIAL_DEPTH.min(max),
            Some(rate) => {
                let pieces = rate * self.config.target_queue.as_secs_f64() / self.piece_size as f64;
                (pieces.ceil() as usize + 1).clamp(2.min(max), max)
            }
        }
    }

    /// Peer requests in flight in all: [`Config::max_in_flight`], at most
    /// [`TOTAL_WINDOW_BYTES`] of pieces.
    fn max_in_flight(&self) -> usize {
        let window = usize::try_from(TOTAL_WINDOW_BYTES / self.piece_size).unwrap_or(usize::MAX);
        self.config.max_in_flight.min(window).max(1)
    }

    fn eligible(&self, peer: &Peer, now: Instant) -> bool {
        !peer.stalled
            && peer.in_flight < self.depth(peer, now)
            && peer.backoff_until.is_none_or(|t| t <= now)
    }

    /// Whether the origin should take piece `index` now.
    fn needs_origin(&self, index: usize, now: Instant) -> bool {
        self.needs_origin_shared(index, now, self.shared(now))
    }

    /// [`Self::needs_origin`], with [`Self::shared`] computed once for a walk over pieces.
    fn needs_origin_shared(&self, index: usize, now: Instant, shared: bool) -> bool {
        if self.pieces[index] != Piece::Missing {
            return false;
        }
        if self.peer_failures[index] >= self.config.peer_attempts {
            return true;
        }
        let in_time = |since: Option<Instant>| {
            since.is_none_or(|t| now.saturating_duration_since(t) < self.config.coming_patience)
        };
        let coming_in_time = self.fetching_count[index] > 0 && in_time(self.coming_since[index]);
        let claimed_in_time = self.claimed_count[index] > 0 && in_time(self.claimed_since[index]);
        self.have_count[index] == 0
            && !coming_in_time
            && !claimed_in_time
            && self.mine(index, shared)
    }

    /// The best eligible peer holding `index`, other than `not`: the most room left in its
    /// pipeline, then the fewest failures, then the fastest.
    fn best_peer(&self, index: PieceIndex, not: Option<PeerId>, now: Instant) -> Option<PeerId> {
        self.peers
            .iter()
            .filter(|(id, p)| Some(**id) != not && p.have.get(index) && self.eligible(p, now))
            .map(|(id, p)| self.candidate(*id, p, now))
            .max_by(Candidate::rank)
            .map(|c| c.id)
    }

    /// An eligible peer as [`Self::best_peer`] ranks it, without its bitfield.
    fn candidate(&self, id: PeerId, p: &Peer, now: Instant) -> Candidate {
        Candidate {
            id,
            room: self.depth(p, now) - p.in_flight,
            failures: p.failures,
            rate: p.rate(now).unwrap_or(0.0),
            have: Bitfield::new(0),
        }
    }

    /// Gives a candidate's lent bitfield back to its peer.
    fn give_back(&mut self, c: Candidate) {
        if let Some(p) = self.peers.get_mut(&c.id) {
            p.have = c.have;
        }
    }

    fn request(&mut self, peer: PeerId, index: PieceIndex, now: Instant) -> Action {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.start_request(now);
        }
        self.peer_in_flight += 1;
        self.requests.insert((index, peer));
        if self.pieces[index as usize] == Piece::Missing {
            let s = self.src(Source::Peer(peer));
            self.set_piece(index as usize, Piece::InFlight(s));
        }
        Action::Peer { peer, index }
    }

    /// The fetches to start now.
    pub(crate) fn next_actions(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        self.stall_refusers(now);
        if let Some((done, at)) = &mut self.progress
            && *done != self.done
        {
            (*done, *at) = (self.done, now);
        }
        if self.shares.is_some() && !self.shared(now) {
            self.lapse(now);
        }
        let n = self.pieces.len();
        // Pieces stalled at snubbed peers go to other peers first.
        self.duplicates(false, now, &mut actions);
        // Peers: rarest first (random first while the file holds few pieces).
        let room = self.peers.values().any(|p| self.eligible(p, now));
        let max_in_flight = self.max_in_flight();
        if room && self.peer_in_flight < max_in_flight {
            // Missing, held by some peer, and not failed from peers too often.
            let words = (self.missing.words().zip(self.held.words()))
                .zip(self.exhausted.words())
                .map(|((m, h), x)| m & h & !x);
            // (Both lists reuse the buffers of the last call: this runs after every event.)
            let mut wanted = std::mem::take(&mut self.wanted);
            wanted.clear();
            wanted.extend(Bitfield::ones_of_words(words));
            // A node with one peer has nobody to trade with: it takes the pieces in file
            // order, with no random first pieces, so the SHA-256 hashes each piece as it
            // lands (at random inside windows of 16, a tenth of a 1 GiB file was read back
            // from disk, `docs/scheduling.md`). With two peers or more, random picks keep
            // nodes that fetch from one peer apart.
            let window = if self.peers.len() > 1 {
                wanted.shuffle(&mut self.rng);
                ORDER_WINDOW
            } else {
                1
            };
            if self.done >= self.config.random_first || window == 1 {
                // Rarest first; among equals, the window of `window` pieces nearest the first
                // missing one first, at random inside it. The file then fills roughly in
                // order (the SHA-256 runs in file order, and pieces that arrive far ahead of
                // it are read back from disk), while nodes fetching from one peer still take
                // different pieces of each window to trade.
                let low = wanted.iter().copied().min().unwrap_or(0);
                wanted.sort_by_key(|&i| (self.have_count[i as usize], (i - low) / window));
            }
            // The eligible peers, ranked as `best_peer` ranks them, taken once: a request
            // changes only its own peer's entry.
            let mut cands = std::mem::take(&mut self.cands);
            cands.clear();
            cands.extend(
                self.peers
                    .iter()
                    .filter(|(_, p)| self.eligible(p, now))
                    .map(|(id, p)| self.candidate(*id, p, now)),
            );
            // Each candidate's bitfield is lent to it for the walk (requests do not read
            // them) and given back after.
            for c in &mut cands {
                if let Some(p) = self.peers.get_mut(&c.id) {
                    c.have = std::mem::replace(&mut p.have, Bitfield::new(0));
                }
            }
            for &index in &wanted {
                if self.peer_in_flight >= max_in_flight || cands.is_empty() {
                    break;
                }
                let best = cands
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.have.get(index))
                    .max_by(|(_, a), (_, b)| a.rank(b))
                    .map(|(k, c)| (k, c.id));
                if let Some((k, peer)) = best {
                    actions.push(self.request(peer, index, now));
                    match self.peers.get(&peer) {
                        Some(p) if self.eligible(p, now) => {
                            let have = std::mem::replace(&mut cands[k].have, Bitfield::new(0));
                            cands[k] = Candidate {
                                have,
                                ..self.candidate(peer, p, now)
                            };
                        }
                        _ => {
                            let c = cands.swap_remove(k);
                            self.give_back(c);
                        }
                    }
                }
            }
            while let Some(c) = cands.pop() {
                self.give_back(c);
            }
            (self.wanted, self.cands) = (wanted, cands);
        }
        // Endgame: a second request for every piece in flight once none is left missing.
        if self.missing_pieces().next().is_none() {
            self.duplicates(true, now, &mut actions);
        }
        // Origin: one contiguous run of pieces no peer can give.
        if self.origin_allowed
            && !self.origin_busy
            && self.origin_not_before.is_none_or(|t| now >= t)
            && let Some((start, share)) = self.origin_run_start(now)
        {
            let limit = if (self.peers.is_empty() && !self.swarm) || !self.origin_ranges {
                u32::MAX
            } else {
                self.config.max_origin_run.max(1).min(share)
            };
            let mut end = start + 1;
            while (end as usize) < n
                && end - start < limit
                && if self.origin_ranges {
                    self.needs_origin(end as usize, now)
                } else {
                    self.pieces[end as usize] == Piece::Missing
                }
            {
                end += 1;
            }
            for i in start..end {
                self.set_piece(i as usize, Piece::InFlight(Src::Origin));
            }
            self.origin_busy = true;
            self.origin_next = Some(end);
            actions.push(Action::Origin { start, end });
        }
        actions
    }

    /// Second requests for pieces in flight: for every one (`endgame`), or for those whose
    /// first request went to a snubbed peer.
    fn duplicates(&mut self, endgame: bool, now: Instant, actions: &mut Vec<Action>) {
        let snubbed: BTreeSet<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.snubbed(now, self.config.snub_after))
            .map(|(id, _)| *id)
            .collect();
        if !endgame && snubbed.is_empty() {
            return;
        }
        let mut live: BTreeMap<PieceIndex, usize> = BTreeMap::new();
        for (i, _) in &self.requests {
            *live.entry(*i).or_default() += 1;
        }
        // (A request changes no piece in flight: the walk may take them first.)
        let flying: Vec<u32> = self.flying.ones().collect();
        for i in flying {
            let Piece::InFlight(first) = self.pieces[i as usize] else {
                continue;
            };
            let Some(first) = self.source(first) else {
                continue;
            };
            let copies = live.get(&i).copied().unwrap_or(0) + usize::from(first == Source::Origin);
            let first_peer = match first {
                Source::Peer(p) => Some(p),
                Source::Origin => None,
            };
            let stalled = first_peer.is_some_and(|p| snubbed.contains(&p));
            if copies >= 2 || !(endgame || stalled) {
                continue;
            }
            if self.peer_in_flight >= self.max_in_flight() + self.config.max_per_peer {
                break;
            }
            if let Some(peer) = self.best_peer(i, first_peer, now)
                && !self.requests.contains(&(i, peer))
            {
                actions.push(self.request(peer, i, now));
            }
        }
    }

    /// Where the next origin run starts. A run goes on where the last one ended, unless that
    /// piece does not need the origin or a peer with a lower id is fetching alongside (two
    /// nodes that met keep apart: the lower id goes on, the other moves). Otherwise, with the
    /// peers fetching the same content known, the pieces that need the origin are shared out
    /// by rank: of K nodes, the one of rank r starts r/K of the way through them. With no
    /// peer known, the first run starts at [`Scheduler::set_origin_start`].
    ///
    /// Returns the start and the longest run from there (a share of the pieces needed, so
    /// that one node's run does not reach into the next node's share). With fewer pieces
    /// needed than nodes, the nodes ranked past their number wait.
    fn origin_run_start(&self, now: Instant) -> Option<(PieceIndex, u32)> {
        let n = self.pieces.len() as u32;
        if n == 0 {
            return None;
        }
        let unlimited = u32::MAX;
        let shared = self.shared(now);
        let needs = |i: u32| self.needs_origin_shared(i as usize, now, shared);
        if let Some(next) = self.origin_next
            && next < n
            && needs(next)
            && !self.alongside(next)
        {
            return Some((next, unlimited));
        }
        // Pieces that failed from peers are this node's own business.
        let words = self.missing.words().zip(self.exhausted.words());
        if let Some(i) = Bitfield::ones_of_words(words.map(|(m, x)| m & x)).find(|&i| needs(i)) {
            return Some((i, unlimited));
        }
        // Shares among the swarm's members: the first piece of this node's blocks that needs
        // the origin, in file order (every fetcher goes front to back, so the swarm's file
        // fills roughly in order).
        if shared && let Some(shares) = &self.shares {
            // Only the missing pieces of this node's blocks can be such a piece (a piece that
            // failed from peers was taken above): walk those, not every piece.
            let words = self.missing.words().zip(shares.pieces.words());
            return Bitfield::ones_of_words(words.map(|(m, p)| m & p))
                .find(|&i| needs(i))
                .map(|i| (i, unlimited));
        }
        if self.peers.is_empty() || self.me.is_none() {
            return (0..n)
                .map(|k| (self.origin_start + k) % n)
                .find(|&i| needs(i))
                .map(|i| (i, unlimited));
        }
        let needed: Vec<u32> = self
            .missing_pieces()
            .map(|i| i as u32)
            .filter(|&i| needs(i))
            .collect();
        if needed.is_empty() {
            return None;
        }
        let me = self.me?;
        // Every node known to fetch the same content takes a share (all nodes see about the
        // same set, so the shares do not overlap).
        let rank = self.peers.keys().filter(|p| **p < me).count();
        let k = self.peers.len() + 1;
        if rank >= needed.len() {
            // Fewer pieces left than nodes: the lower ranks take them, while they are at work
            // (fetching, or holding claims).
            let lower_fetching = self.peers.iter().any(|(id, p)| {
                *id < me && (p.fetching.count_ones() > 0 || p.claimed.count_ones() > 0)
            });
            return (!lower_fetching).then(|| (needed[0], 1));
        }
        let share = u32::try_from(needed.len() / k).unwrap_or(u32::MAX).max(1);
        Some((needed[rank * needed.len() / k], share))
    }

    /// Whether a peer with a lower id than this node fetches or claims the piece before
    /// `next` (it runs alongside this node's last origin run).
    fn alongside(&self, next: PieceIndex) -> bool {
        let (Some(me), Some(last)) = (self.me, next.checked_sub(1)) else {
            return false;
        };
        self.peers
            .iter()
            .any(|(id, p)| *id < me && (p.fetching.get(last) || p.claimed.get(last)))
    }

    /// A request for `index` to `peer` ended without the piece: make the piece missing again
    /// unless another request for it is live.
    fn orphaned(&mut self, index: PieceIndex, peer: PeerId) {
        if !self.in_flight_from(index, peer) {
            return;
        }
        let other = self
            .requests
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, q)| *q);
        let state = match other {
            Some(q) => Piece::InFlight(self.src(Source::Peer(q))),
            None => Piece::Missing,
        };
        self.set_piece(index as usize, state);
    }

    /// Piece `index` arrived (`bytes` long) from `source`. The first copy goes to verification
    /// and cancels the other requests for it; anything else is [`Received::Late`].
    pub(crate) fn on_received(
        &mut self,
        index: PieceIndex,
        source: Source,
        bytes: u64,
        now: Instant,
    ) -> Received {
        if let Source::Peer(peer) = source {
            if !self.requests.remove(&(index, peer)) {
                return Received::Late;
            }
            self.peer_in_flight = self.peer_in_flight.saturating_sub(1);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.delivered += bytes as f64;
                p.last_delivery = Some(now);
                p.refused_since = None;
                p.end_request(now);
            }
        }
        if !matches!(self.pieces.get(index as usize), Some(Piece::InFlight(_))) {
            return Received::Late;
        }
        let s = self.src(source);
        self.set_piece(index as usize, Piece::Verifying(s));
        let cancel: Vec<PeerId> = self
            .requests
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, p)| *p)
            .collect();
        let snub_after = self.config.snub_after;
        for peer in &cancel {
            self.requests.remove(&(index, *peer));
            self.peer_in_flight = self.peer_in_flight.saturating_sub(1);
            if let Some(p) = self.peers.get_mut(peer) {
                // A snubbed peer that lost a piece it held up is backed off like a failure.
                if p.snubbed(now, snub_after) {
                    p.failures += 1;
                    p.backoff_until = Some(now + backoff(self.config.peer_backoff, p.failures));
                }
                p.end_request(now);
            }
        }
        Received::First { cancel }
    }

    /// Piece `index` from `source` verified and was written.
    pub(crate) fn on_done(&mut self, index: PieceIndex, source: Source) {
        if let Source::Peer(peer) = source
            && let Some(p) = self.peers.get_mut(&peer)
        {
            p.failures = 0;
            p.backoff_until = None;
        }
        self.set_done(index, source);
    }

    /// Fetching piece `index` from `peer` failed without proof of bad faith (timeout,
    /// NotFound, Busy, a dropped connection): the peer is backed off and loses score, and
    /// the piece returns to the pool unless another request for it is live. A failure of a
    /// request that was cancelled is ignored. A peer that delivers nothing for
    /// [`Config::coming_patience`] while its requests fail is stalled (see [`Self::on_busy`]).
    pub(crate) fn on_failed(&mut self, index: PieceIndex, peer: PeerId, now: Instant) {
        self.failed(index, peer, now, true);
        // A peer that fails every request for the patience (it says it holds pieces it never
        // serves) is stalled like one that only answers Busy.
        if let Some(p) = self.peers.get_mut(&peer) {
            p.refused_since.get_or_insert(now);
        }
        self.stall_refusers(now);
    }

    /// `peer` answered Busy for piece `index` (no upload slot free): the peer is backed off as
    /// for a failure, but the piece does not count as failing from peers (it does not go to
    /// the origin for that). A peer that answers only Busy for [`Config::coming_patience`]
    /// after its last piece is stalled: it is asked for nothing more in this download, and
    /// what it holds no longer keeps any piece from the origin (a peer that claims every
    /// piece and never serves cannot hold a download back).
    pub(crate) fn on_busy(&mut self, index: PieceIndex, peer: PeerId, now: Instant) {
        self.failed(index, peer, now, false);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.refused_since.get_or_insert(now);
        }
        self.stall_refusers(now);
    }

    /// Stalls the peers that answered only Busy for [`Config::coming_patience`].
    fn stall_refusers(&mut self, now: Instant) {
        let patience = self.config.coming_patience;
        let stalled: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                !p.stalled
                    && p.refused_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= patience)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            if let Some(mut p) = self.peers.remove(&id) {
                self.count_peer(&p, -1);
                p.stalled = true;
                self.peers.insert(id, p);
            }
        }
    }

    fn failed(&mut self, index: PieceIndex, peer: PeerId, now: Instant, count_piece: bool) {
        if !self.requests.remove(&(index, peer)) {
            return;
        }
        self.peer_in_flight = self.peer_in_flight.saturating_sub(1);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.end_request(now);
            p.failures += 1;
            p.backoff_until = Some(now + backoff(self.config.peer_backoff, p.failures));
        }
        if count_piece
            && self.in_flight_from(index, peer)
            && let Some(f) = self.peer_failures.get_mut(index as usize)
        {
            *f = f.saturating_add(1);
            if *f >= self.config.peer_attempts {
                self.exhausted.set(index);
            }
        }
        self.orphaned(index, peer);
    }

    /// Piece `index` from `peer` failed verification: the peer is banned and the piece
    /// returns to the pool. A piece held before it could be verified (taken from a peer
    /// before the piece layer was known, and rejected when it came) returns to the pool too.
    pub(crate) fn on_corrupt(&mut self, index: PieceIndex, peer: PeerId) {
        self.ban(peer);
        if let Some(s) = self.src_of(peer) {
            match self.pieces.get(index as usize) {
                Some(Piece::Verifying(v)) if *v == s => {
                    self.set_piece(index as usize, Piece::Missing);
                }
                Some(Piece::Done(d)) if *d == s => {
                    self.done -= 1;
                    self.set_piece(index as usize, Piece::Missing);
                }
                _ => {}
            }
        }
    }

    /// Pieces held before they could be verified that must be fetched again, with nobody to
    /// blame (the layer assembled from claims failed, so any of the claimers may have lied):
    /// they return to the pool.
    pub(crate) fn forget_held(&mut self, pieces: &[PieceIndex]) {
        for &index in pieces {
            match self.pieces.get(index as usize) {
                Some(Piece::Done(_)) => {
                    self.done -= 1;
                    self.set_piece(index as usize, Piece::Missing);
                }
                Some(Piece::Verifying(_)) => self.set_piece(index as usize, Piece::Missing),
                _ => {}
            }
        }
    }

    /// The origin run ended (all its pieces reported, or the stream failed); its pieces still
    /// in flight go to a live peer request for them, or back to the pool.
    pub(crate) fn on_origin_run_end(&mut self) {
        self.origin_busy = false;
        // (Only pieces in flight can be the origin's; setting one changes no other.)
        let flying: Vec<u32> = self.flying.ones().collect();
        for i in flying.into_iter().map(|i| i as usize) {
            if self.pieces[i] == Piece::InFlight(Src::Origin) {
                let other = self
                    .requests
                    .iter()
                    .find(|(j, _)| *j as usize == i)
                    .map(|(_, q)| *q);
                let state = match other {
                    Some(q) => Piece::InFlight(self.src(Source::Peer(q))),
                    None => Piece::Missing,
                };
                self.set_piece(i, state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    const PIECE: u64 = 256 * 1024;

    fn bits(pieces: &[u32], len: u32) -> Bitfield {
        let mut b = Bitfield::new(len);
        for &i in pieces {
            b.set(i);
        }
        b
    }

    fn sched(n: u32, cfg: Config) -> Scheduler {
        Scheduler::new(n, PIECE, cfg)
    }

    #[test]
    fn moving_counts_between_bitfields_is_removing_one_and_adding_the_other() {
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        for len in [1u32, 63, 64, 65, 200, 1000] {
            let random = |rng: &mut StdRng| {
                let on: Vec<u32> = (0..len).filter(|_| rng.random_bool(0.3)).collect();
                bits(&on, len)
            };
            let (old, new) = (random(&mut rng), random(&mut rng));
            let start: Vec<u16> = (0..len).map(|_| rng.random_range(1..5)).collect();
            let mut want = start.clone();
            count_bits(&mut want, &old, -1, |_, _| {});
            count_bits(&mut want, &new, 1, |_, _| {});
            let mut got = start.clone();
            let mut dirty = Bitfield::new(len);
            recount(&mut got, &old, &new, mark(&mut dirty));
            assert_eq!(got, want, "{len}");
            let changed: Vec<u32> = (0..len).filter(|&i| old.get(i) != new.get(i)).collect();
            assert_eq!(dirty.ones().collect::<Vec<_>>(), changed, "{len}");
            // The pieces held by some peer follow the counts that changed.
            let mut counts = start;
            let mut held = Bitfield::full(len);
            count_bits(&mut counts, &old, -1, held_where_counted(&mut held));
            recount(
                &mut counts,
                &Bitfield::new(len),
                &new,
                held_where_counted(&mut held),
            );
            for i in 0..len {
                let expect = if old.get(i) || new.get(i) {
                    counts[i as usize] > 0
                } else {
                    true
                };
                assert_eq!(held.get(i), expect, "{len}: piece {i}");
            }
        }
    }

    #[test]
    fn the_bitfields_kept_beside_the_pieces_and_counts_always_follow_them() {
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        let n = 200u32;
        let mut s = sched(n, Config::default());
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut now = Instant::now();
        for p in &peers {
            let held: Vec<u32> = (0..n).filter(|_| rng.random_bool(0.6)).collect();
            holds(&mut s, *p, &held, now);
        }
        let mut requested: Vec<(u32, PeerId)> = Vec::new();
        let mut verifying: Vec<(u32, PeerId)> = Vec::new();
        let mut origin = false;
        for step in 0..4000 {
            now += Duration::from_millis(rng.random_range(0..300));
            match rng.random_range(0..9) {
                0..=2 => {
                    for a in s.next_actions(now) {
                        match a {
                            Action::Peer { peer, index } => requested.push((index, peer)),
                            Action::Origin { .. } => origin = true,
                        }
                    }
                }
                3 if !requested.is_empty() => {
                    let (i, p) = requested.swap_remove(rng.random_range(0..requested.len()));
                    if let Received::First { .. } = s.on_received(i, Source::Peer(p), PIECE, now) {
                        verifying.push((i, p));
                    }
                }
                7 if !verifying.is_empty() => {
                    let (i, p) = verifying.swap_remove(rng.random_range(0..verifying.len()));
                    if rng.random_bool(0.8) {
                        s.on_done(i, Source::Peer(p));
                    } else {
                        s.on_corrupt(i, p);
                    }
                }
                4 if !requested.is_empty() => {
                    let (i, p) = requested.swap_remove(rng.random_range(0..requested.len()));
                    s.on_failed(i, p, now);
                }
                5 if origin => {
                    origin = false;
                    s.on_origin_run_end();
                }
                6 => s.set_done(rng.random_range(0..n), Source::Origin),
                8 => {
                    // A peer's holding changes (or it leaves and comes back).
                    let p = peers[rng.random_range(0..peers.len())];
                    if rng.random_bool(0.2) {
                        s.remove_peer(&p);
                    }
                    let held: Vec<u32> = (0..n).filter(|_| rng.random_bool(0.6)).collect();
                    holds(&mut s, p, &held, now);
                }
                _ => {}
            }
            let held: Vec<u32> = (0..n).filter(|&i| s.have_count[i as usize] > 0).collect();
            assert_eq!(s.held.ones().collect::<Vec<_>>(), held, "step {step}");
            let exhausted: Vec<u32> = (0..n)
                .filter(|&i| s.peer_failures[i as usize] >= s.config.peer_attempts)
                .collect();
            assert_eq!(
                s.exhausted.ones().collect::<Vec<_>>(),
                exhausted,
                "step {step}"
            );
            let missing: Vec<usize> = (0..n as usize)
                .filter(|&i| s.pieces[i] == Piece::Missing)
                .collect();
            assert_eq!(
                s.missing_pieces().collect::<Vec<_>>(),
                missing,
                "step {step}"
            );
            let flying: Vec<u32> = (0..n)
                .filter(|&i| matches!(s.pieces[i as usize], Piece::InFlight(_)))
                .collect();
            assert_eq!(
                s.in_flight().ones().collect::<Vec<_>>(),
                flying,
                "step {step}"
            );
        }
        assert!(
            s.done > n / 2,
            "the walk reached far into the download: {}",
            s.done
        );
    }

    fn holds(s: &mut Scheduler, peer: PeerId, pieces: &[u32], now: Instant) {
        let n = s.pieces.len() as u32;
        s.set_peer(
            peer,
            bits(pieces, n),
            Bitfield::new(n),
            Bitfield::new(n),
            now,
        );
    }

    fn peer_pieces(actions: &[Action]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Peer { index, .. } => Some(*index),
                Action::Origin { .. } => None,
            })
            .collect()
    }

    #[test]
    fn without_peers_the_origin_gets_one_run_of_everything() {
        let mut s = sched(10, Config::default());
        let now = Instant::now();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 0, end: 10 }]
        );
        assert!(s.next_actions(now).is_empty());
        for i in 0..10 {
            assert_eq!(
                s.on_received(i, Source::Origin, PIECE, now),
                Received::First { cancel: vec![] }
            );
            s.on_done(i, Source::Origin);
        }
        s.on_origin_run_end();
        assert!(s.is_complete());
    }

    #[test]
    fn peers_get_what_they_hold_and_the_origin_the_rest() {
        let mut s = sched(6, Config::default());
        let now = Instant::now();
        let a = PeerId::random();
        holds(&mut s, a, &[0, 1, 2, 3], now);
        let actions = s.next_actions(now);
        assert_eq!(peer_pieces(&actions).len(), 4);
        assert!(actions.contains(&Action::Origin { start: 4, end: 6 }));
    }

    #[test]
    fn rarest_pieces_go_first_once_a_few_are_held() {
        let cfg = Config {
            max_in_flight: 1,
            random_first: 1,
            ..Config::default()
        };
        let mut s = sched(4, cfg);
        let now = Instant::now();
        s.set_done(3, Source::Origin);
        let (a, b) = (PeerId::random(), PeerId::random());
        holds(&mut s, a, &[0, 1, 2], now);
        holds(&mut s, b, &[0, 2], now);
        // Piece 1 is held by one peer only: it goes first, whatever the seed.
        for seed in 0..20 {
            s.set_seed(seed);
            let actions = s.next_actions(now);
            assert_eq!(
                actions,
                vec![Action::Peer { peer: a, index: 1 }],
                "seed {seed}"
            );
            s.on_failed(1, a, now);
            s.peers.get_mut(&a).unwrap().backoff_until = None;
            s.peer_failures[1] = 0;
            s.exhausted.clear(1);
        }
    }

    #[test]
    fn the_first_pieces_are_random_and_ties_are_broken_at_random() {
        let cfg = Config {
            max_in_flight: 1,
            ..Config::default()
        };
        let now = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut firsts = HashSet::new();
        for seed in 0..40 {
            let mut s = sched(64, cfg.clone());
            s.set_seed(seed);
            holds(&mut s, a, &(0..64).collect::<Vec<_>>(), now);
            holds(&mut s, b, &(0..64).collect::<Vec<_>>(), now);
            firsts.extend(peer_pieces(&s.next_actions(now)));
        }
        // Not always piece 0, nor any one piece.
        assert!(firsts.len() > 10, "{firsts:?}");
    }

    #[test]
    fn a_node_with_one_peer_takes_the_pieces_in_file_order() {
        let now = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut shuffled = 0;
        for seed in 0..20 {
            let mut s = sched(64, Config::default());
            s.set_seed(seed);
            holds(&mut s, a, &(0..64).collect::<Vec<_>>(), now);
            // The first pipeline, and every later pick, in file order: what the SHA-256 needs.
            let first = peer_pieces(&s.next_actions(now));
            assert!(first.len() > 1);
            assert_eq!(
                first,
                (0..first.len() as u32).collect::<Vec<_>>(),
                "seed {seed}"
            );
            for &i in &first[..2] {
                s.on_received(i, Source::Peer(a), PIECE, now);
                s.on_done(i, Source::Peer(a));
            }
            let n = first.len() as u32;
            assert_eq!(
                peer_pieces(&s.next_actions(now)),
                vec![n, n + 1],
                "seed {seed}"
            );
            // A second peer to trade with: picks inside the window are random again.
            holds(&mut s, b, &(0..64).collect::<Vec<_>>(), now);
            for &i in &first[2..] {
                s.on_received(i, Source::Peer(a), PIECE, now);
                s.on_done(i, Source::Peer(a));
            }
            let next = peer_pieces(&s.next_actions(now));
            assert!(next.len() > 2, "{next:?}");
            if next != (n + 2..n + 2 + next.len() as u32).collect::<Vec<_>>() {
                shuffled += 1;
            }
        }
        assert!(
            shuffled > 10,
            "in file order with two peers for {} seeds of 20",
            20 - shuffled
        );
    }

    #[test]
    fn a_corrupt_piece_bans_the_peer_and_goes_elsewhere() {
        let mut s = sched(1, Config::default());
        let now = Instant::now();
        let (bad, good) = (PeerId::random(), PeerId::random());
        holds(&mut s, bad, &[0], now);
        assert_eq!(
            s.next_actions(now),
            vec![Action::Peer {
                peer: bad,
                index: 0
            }]
        );
        assert!(matches!(
            s.on_received(0, Source::Peer(bad), PIECE, now),
            Received::First { .. }
        ));
        s.on_corrupt(0, bad);
        assert_eq!(s.banned(), &[bad]);
        holds(&mut s, bad, &[0], now);
        holds(&mut s, good, &[0], now);
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
        let mut s = sched(1, Config::default());
        let a = PeerId::random();
        let mut now = Instant::now();
        holds(&mut s, a, &[0], now);
        for attempt in 1..=3 {
            assert_eq!(
                s.next_actions(now),
                vec![Action::Peer { peer: a, index: 0 }]
            );
            s.on_failed(0, a, now);
            if attempt < 3 {
                // Backed off: nothing until the delay passes (within the patience, after
                // which a peer that never delivers is stalled).
                let idle = s.next_actions(now);
                assert!(idle.is_empty(), "{idle:?}");
                now += Duration::from_secs(5);
            }
        }
        // The third failure sends the piece to the origin at once.
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 0, end: 1 }]
        );
    }

    #[test]
    fn a_peer_that_answers_only_busy_stops_holding_the_origin_back_after_the_patience() {
        let cfg = Config::default();
        let patience = cfg.coming_patience;
        let mut s = sched(2, cfg);
        let rogue = PeerId::random();
        let start = Instant::now();
        let mut now = start;
        // The rogue claims both pieces and answers every request Busy, as often as asked;
        // its have answers keep coming.
        let mut origin = None;
        while now < start + 3 * patience {
            holds(&mut s, rogue, &[0, 1], now);
            for a in s.next_actions(now) {
                match a {
                    Action::Peer { peer, index } => s.on_busy(index, peer, now),
                    Action::Origin { start: a, end } => {
                        origin = Some((a, end, now));
                        break;
                    }
                }
            }
            if origin.is_some() {
                break;
            }
            now += Duration::from_millis(250);
        }
        let (a, end, at) = origin.expect("the origin never took the pieces");
        assert_eq!((a, end), (0, 2));
        // After the patience, at the next look.
        let waited = at - start;
        assert!(
            waited >= patience && waited <= patience + Duration::from_millis(250),
            "{waited:?}"
        );
        // A peer that serves after being Busy a while is not stalled.
        let mut s = sched(1, Config::default());
        let honest = PeerId::random();
        let now = Instant::now();
        holds(&mut s, honest, &[0], now);
        assert_eq!(
            s.next_actions(now),
            vec![Action::Peer {
                peer: honest,
                index: 0
            }]
        );
        s.on_busy(0, honest, now);
        let later = now + patience / 2;
        assert_eq!(
            s.next_actions(later),
            vec![Action::Peer {
                peer: honest,
                index: 0
            }]
        );
        s.on_received(0, Source::Peer(honest), PIECE, later);
        assert!(!s.peers[&honest].stalled && s.peers[&honest].refused_since.is_none());
    }

    #[test]
    fn claims_that_never_become_pieces_stop_holding_the_origin_back_after_the_patience() {
        let cfg = Config::default();
        let patience = cfg.coming_patience;
        let mut s = sched(2, cfg);
        let rogue = PeerId::random();
        let now = Instant::now();
        // Claims every piece, holds none, tells nothing, and flips its claims on and off.
        let claim = |s: &mut Scheduler, on: bool, t: Instant| {
            let pieces: &[u32] = if on { &[0, 1] } else { &[] };
            s.set_peer(
                rogue,
                Bitfield::new(2),
                Bitfield::new(2),
                bits(pieces, 2),
                t,
            );
        };
        claim(&mut s, true, now);
        assert!(s.next_actions(now).is_empty());
        claim(&mut s, false, now + patience / 2);
        claim(&mut s, true, now + patience / 2);
        assert!(s.next_actions(now + patience / 2).is_empty());
        // The patience counts from the first claim: flipping does not restart it.
        assert_eq!(
            s.next_actions(now + patience),
            vec![Action::Origin { start: 0, end: 2 }]
        );
    }

    #[test]
    fn without_range_support_an_origin_run_takes_every_missing_piece_to_the_end() {
        let mut s = sched(64, Config::default());
        s.set_swarm(true);
        let now = Instant::now();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 0, end: 8 }]
        );
        for i in 0..8 {
            s.on_received(i, Source::Origin, PIECE, now);
            s.on_done(i, Source::Origin);
        }
        s.set_origin_ranges(false);
        s.on_origin_run_end();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 8, end: 64 }]
        );
    }

    #[test]
    fn a_failed_origin_run_returns_its_pieces_and_without_the_origin_a_job_is_stuck() {
        let mut s = sched(4, Config::default());
        let now = Instant::now();
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 0, end: 4 }]
        );
        s.on_received(0, Source::Origin, PIECE, now);
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

    #[test]
    fn endgame_asks_a_second_peer_and_the_first_copy_cancels_the_other() {
        let mut s = sched(2, Config::default());
        let now = Instant::now();
        let (a, b) = (PeerId::random(), PeerId::random());
        holds(&mut s, a, &[0, 1], now);
        holds(&mut s, b, &[0, 1], now);
        let first = s.next_actions(now);
        // Both pieces requested once, then each once more from the other peer.
        assert_eq!(first.len(), 4, "{first:?}");
        let mut per_piece: HashMap<u32, Vec<PeerId>> = HashMap::new();
        for a in &first {
            if let Action::Peer { peer, index } = a {
                per_piece.entry(*index).or_default().push(*peer);
            }
        }
        for (i, peers) in &per_piece {
            assert_eq!(peers.len(), 2, "piece {i}");
            assert_ne!(peers[0], peers[1]);
        }
        assert!(s.next_actions(now).is_empty());
        let winner = per_piece[&0][1];
        let loser = per_piece[&0][0];
        assert_eq!(
            s.on_received(0, Source::Peer(winner), PIECE, now),
            Received::First {
                cancel: vec![loser]
            }
        );
        // The loser's answer, if it still comes, is dropped; its failure is ignored.
        assert_eq!(
            s.on_received(0, Source::Peer(loser), PIECE, now),
            Received::Late
        );
        s.on_failed(0, loser, now);
        s.on_done(0, Source::Peer(winner));
        assert_eq!(s.peers[&loser].failures, 0);
    }

    #[test]
    fn pipelines_grow_with_throughput_and_a_quiet_peer_is_replaced() {
        let cfg = Config {
            max_in_flight: 1000,
            random_first: 0,
            ..Config::default()
        };
        let mut s = sched(1000, cfg);
        let (fast, slow) = (PeerId::random(), PeerId::random());
        let mut now = Instant::now();
        let all: Vec<u32> = (0..1000).collect();
        holds(&mut s, fast, &all, now);
        holds(&mut s, slow, &all, now);
        let live = |s: &Scheduler, p: PeerId| -> Vec<u32> {
            let mut v: Vec<u32> = s
                .requests
                .iter()
                .filter(|(_, q)| *q == p)
                .map(|(i, _)| *i)
                .collect();
            v.sort_unstable();
            v
        };
        s.next_actions(now);
        assert_eq!(live(&s, fast).len(), INITIAL_DEPTH);
        assert_eq!(live(&s, slow).len(), INITIAL_DEPTH);
        let stuck_at_slow = live(&s, slow);
        // The fast peer delivers 20 pieces (5 MiB) a second, the slow one nothing.
        for step in 0..220 {
            now += Duration::from_millis(50);
            let i = live(&s, fast)[0];
            s.on_received(i, Source::Peer(fast), PIECE, now);
            s.on_done(i, Source::Peer(fast));
            s.next_actions(now);
            if step == 40 {
                // 5 MiB/s × 0.5 s = 10 pieces, plus one.
                assert_eq!(live(&s, fast).len(), 11);
            }
        }
        // After 10 s of silence the slow peer is snubbed: one request at most, and the
        // pieces it held up went to the fast peer.
        for i in stuck_at_slow {
            assert!(
                s.pieces[i as usize] == Piece::Done(s.src_of(fast).unwrap())
                    || live(&s, fast).contains(&i),
                "piece {i}"
            );
        }
        let quiet = &s.peers[&slow];
        assert!(quiet.failures > 0 && !s.eligible(quiet, now));
    }

    #[test]
    fn pieces_a_peer_fetches_or_claims_wait_for_it_and_the_origin_starts_elsewhere() {
        let mut s = sched(100, Config::default());
        let mut now = Instant::now();
        let a = PeerId::random();
        // The peer fetches 0..30 and claims 30..50.
        let fetching = bits(&(0..30).collect::<Vec<_>>(), 100);
        let claimed = bits(&(30..50).collect::<Vec<_>>(), 100);
        s.set_peer(
            a,
            Bitfield::new(100),
            fetching.clone(),
            claimed.clone(),
            now,
        );
        s.set_origin_start(10);
        // The first run starts at the first piece from 10 on that nobody has or fetches.
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 50, end: 58 }]
        );
        for i in 50..58 {
            s.on_received(i, Source::Origin, PIECE, now);
            s.on_done(i, Source::Origin);
        }
        s.on_origin_run_end();
        // Then it goes on where it stopped.
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 58, end: 66 }]
        );
        s.on_origin_run_end();
        for i in 58..66 {
            s.on_received(i, Source::Origin, PIECE, now);
            s.on_done(i, Source::Origin);
        }
        s.on_origin_run_end();
        for i in 66..100 {
            s.set_done(i, Source::Origin);
        }
        // A peer that fetches for too long loses its pieces to the origin (the largest
        // stretch, 0..30, from its middle); claimed pieces still wait.
        now += Duration::from_secs(10);
        s.set_peer(a, Bitfield::new(100), fetching, claimed, now);
        assert!(s.next_actions(now).is_empty());
        now += Duration::from_secs(11);
        assert_eq!(
            s.next_actions(now),
            vec![Action::Origin { start: 10, end: 18 }]
        );
        // Known peers fetching the same content share out the pieces by rank: of three nodes,
        // each starts a third of the way further, with runs no longer than its share.
        for _ in 0..10 {
            let me = PeerId::random();
            let (p1, p2) = (PeerId::random(), PeerId::random());
            let mut t = sched(100, Config::default());
            t.set_me(me);
            let none = Bitfield::new(100);
            // Both peers fetch from the origin (one piece each at the end).
            t.set_peer(p1, none.clone(), bits(&[98], 100), none.clone(), now);
            t.set_peer(p2, none.clone(), bits(&[99], 100), none.clone(), now);
            let rank = [p1, p2].iter().filter(|p| **p < me).count() as u32;
            assert_eq!(
                t.next_actions(now),
                vec![Action::Origin {
                    start: rank * 98 / 3,
                    end: rank * 98 / 3 + 8
                }]
            );
            // With fewer pieces left than nodes, a node ranked past them takes one anyway when
            // no lower-ranked node is fetching (it may have left, or never use the origin).
            let mut u = sched(2, Config::default());
            let lower: Vec<PeerId> = (0..50)
                .map(|_| PeerId::random())
                .filter(|p| *p < me)
                .take(2)
                .collect();
            if lower.len() == 2 {
                u.set_me(me);
                let none2 = Bitfield::new(2);
                for p in &lower {
                    u.set_peer(*p, none2.clone(), none2.clone(), none2.clone(), now);
                }
                u.set_done(0, Source::Origin);
                assert_eq!(
                    u.next_actions(now),
                    vec![Action::Origin { start: 1, end: 2 }]
                );
            }
        }
    }

    #[test]
    fn made_up_fetchers_with_low_seeds_cost_this_node_one_lapse_of_the_shares() {
        let now = Instant::now();
        let me = PeerId::random();
        // 300 fetchers whose seeds are all below this node's.
        let mut fetchers: Vec<(PeerId, u64)> =
            (0..300).map(|i| (PeerId::random(), i as u64)).collect();
        fetchers.push((me, u64::MAX));
        fetchers.sort_unstable_by_key(|(p, _)| *p);
        let mut s = sched(8 * 1024, Config::default());
        s.set_me(me);
        s.set_swarm(true);
        s.set_fetchers(&fetchers, now);
        // The lowest seeds take the shares, as on every other node: not this one.
        assert_eq!(s.fetchers.len(), MAX_FETCHERS);
        assert!(!s.fetchers.contains(&me));
        assert!(
            s.next_actions(now).is_empty(),
            "the others' blocks are awaited"
        );
        // After the made-up fetchers' blocks never came, the shares lapse and they are out.
        let later = now + Config::default().coming_patience;
        s.next_actions(later);
        assert!(s.has_lapsed());
        // (A few made-up fetchers owned no block, so nothing was awaited of them.)
        assert!(s.excluded.len() >= 200, "{}", s.excluded.len());
        // The member view's list again: this node is among the few left, and fetches its share.
        s.set_fetchers(&fetchers, later);
        assert!(s.fetchers.contains(&me) && s.fetchers.len() < 100);
        assert!(s.shares.as_ref().unwrap().mine.iter().any(|m| *m));
        assert!(
            s.next_actions(later)
                .iter()
                .any(|a| matches!(a, Action::Origin { .. })),
            "this node fetches its share"
        );
    }

    #[test]
    fn in_a_swarm_of_more_than_max_fetchers_members_only_the_lowest_seeds_fetch() {
        // 1,000 members that all use the origin, known alike on every node: the blocks go to
        // the 256 with the lowest seeds, and each block to exactly one of them.
        let now = Instant::now();
        let content = [4u8; 32];
        let members: Vec<(PeerId, u64)> = (0..1000)
            .map(|_| {
                let p = PeerId::random();
                (p, crate::download::members::fetcher_seed(&p, &content))
            })
            .collect();
        let mut owners = vec![0u32; (1024 / SHARE_BLOCK) as usize];
        let mut fetching_nodes = 0;
        for (me, _) in &members {
            let mut s = sched(1024, Config::default());
            s.set_me(*me);
            s.set_swarm(true);
            s.set_fetchers(&members, now);
            let shares = s.shares.as_ref().unwrap();
            let mine: Vec<usize> = (0..shares.mine.len()).filter(|&b| shares.mine[b]).collect();
            fetching_nodes += usize::from(!mine.is_empty());
            for b in mine {
                owners[b] += 1;
            }
        }
        assert!(owners.iter().all(|&o| o == 1), "{owners:?}");
        assert!(fetching_nodes <= MAX_FETCHERS, "{fetching_nodes}");
    }

    #[test]
    fn members_share_the_origin_by_blocks_and_await_the_others_until_progress_stops() {
        let content = [3u8; 32];
        let now = Instant::now();
        let (me, other) = (PeerId::random(), PeerId::random());
        let fetchers: Vec<(PeerId, u64)> = {
            let mut f = vec![me, other];
            f.sort_unstable();
            f.into_iter()
                .map(|p| (p, crate::download::members::fetcher_seed(&p, &content)))
                .collect()
        };
        // 20 blocks of 8 pieces; `other` is not a neighbour (never answered a have query).
        let mut s = sched(160, Config::default());
        s.set_me(me);
        s.set_swarm(true);
        s.set_fetchers(&fetchers, now);
        let seeds: Vec<u64> = fetchers.iter().map(|f| f.1).collect();
        let me_at = fetchers.iter().position(|f| f.0 == me).unwrap() as u16;
        let mine: Vec<u32> = crate::download::members::assign(&seeds, 20)
            .iter()
            .enumerate()
            .filter(|(_, o)| **o == me_at)
            .map(|(b, _)| b as u32)
            .collect();
        assert!(!mine.is_empty() && mine.len() < 20, "{mine:?}");
        // The origin takes this node's blocks in file order and nothing else.
        let mut taken = Vec::new();
        loop {
            let acts = s.next_actions(now);
            let Some(Action::Origin { start, end }) = acts.first().cloned() else {
                assert!(acts.is_empty(), "{acts:?}");
                break;
            };
            assert_eq!(
                (start % 8, end - start),
                (0, 8),
                "whole blocks, one at a time"
            );
            taken.push(start / 8);
            for i in start..end {
                s.on_received(i, Source::Origin, PIECE, now);
                s.on_done(i, Source::Origin);
            }
            s.on_origin_run_end();
        }
        assert_eq!(taken, mine);
        // The other member's blocks are awaited while pieces keep arriving...
        let later = now + Duration::from_secs(19);
        assert!(s.next_actions(later).is_empty());
        // ...and once none arrived for the patience, the shares lapse.
        let stalled = now + Duration::from_secs(20);
        match s.next_actions(stalled).as_slice() {
            [Action::Origin { start, end }] => {
                assert!(!mine.contains(&(start / 8)), "{start}");
                assert_eq!(end - start, 8);
            }
            other => panic!("{other:?}"),
        }
        // The member whose blocks never came takes no share again in this download, also when
        // the driver names it among the fetchers once more.
        s.set_fetchers(&fetchers, stalled);
        assert!(s.shares.is_none() && s.excluded.contains(&other));
        // A lone fetcher (only this node) has no shares: it starts where it was told.
        let mut t = sched(160, Config::default());
        t.set_me(me);
        t.set_origin_start(40);
        t.set_fetchers(&fetchers[..0], now);
        t.set_fetchers(&[(me, 1)], now);
        assert_eq!(
            t.next_actions(now),
            vec![Action::Origin {
                start: 40,
                end: 160
            }]
        );
    }
}
