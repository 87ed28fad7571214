//! The transfer phase of one file's download as a state machine without I/O, after
//! quinn-proto's `Connection`: no tokio, no file system, no clock.
//!
//! Inputs are the `handle_*` methods, each given `now`: what a have round found, an
//! announcement, a fetched piece (or a failed, refused or ended fetch), a piece the writer
//! verified (or rejected), the outcome of a layer gathering, the member view's fetchers, and
//! timeouts. Outputs are [`Core::poll_action`] (request or cancel a piece, fetch an origin run,
//! ask peers, announce, gather a layer, write a piece, hand the writer a layer, ban a peer,
//! report progress, update what the store serves), [`Core::poll_timeout`] (when to call
//! [`Core::handle_timeout`]) and [`Core::poll_end`]. The driver (`super::attempt`) carries the
//! actions out and feeds the results back.
//!
//! The core decides; the scheduler (`super::scheduler`) inside it picks pieces and origin runs.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use rand::{SeedableRng, rngs::StdRng};
use shoal_protocol::{Bitfield, ContentId, Holding, Member, PieceIndex};
use shoal_validator::{ChainingValue, PieceLayer};

use super::members::Fetchers;
use super::scheduler::{self, Received, Scheduler, Source};
use super::{
    Assembled, Assembly, DHT_EVERY_REFRESHES, MAX_SETTLE, PEER_MISSES, PEER_REFRESH, SETTLE,
    STUCK_GRACE, TICK, origin_start,
};
use crate::source::origin::OriginError;

/// What the core starts from: the file's geometry and what the preamble found.
pub(super) struct Setup {
    /// This node.
    pub(super) me: PeerId,
    /// The file's pieces: their size in bytes, and how many.
    pub(super) piece_size: u64,
    pub(super) piece_count: u32,
    /// The verified layer, if the preamble has one.
    pub(super) layer: Option<PieceLayer>,
    /// The layer being assembled from origin pieces, without one.
    pub(super) assembly: Option<Assembly>,
    /// Pieces already on disk and verified (kept from an earlier run).
    pub(super) kept: Bitfield,
    /// The content id was claimed for a SHA-256 by peers (its layer verified against it).
    pub(super) claimed: bool,
    /// Bytes came from peers before (an earlier run).
    pub(super) from_peers: bool,
    /// The source policy never uses the origin.
    pub(super) never_origin: bool,
    /// This download asks peers and is a member of its content's swarm.
    pub(super) use_peers: bool,
    /// Peers are about (answers, a DHT, connections): the origin is shared among members.
    pub(super) swarm: bool,
    /// Until when peers are waited for before the origin (the source policy's wait, a cache
    /// node's, the first peers'): the member view hears whether this node uses the origin.
    pub(super) wait_until: Instant,
    /// The source policy's wait for peers before the first origin run, when it is ahead.
    pub(super) origin_wait: Option<Instant>,
    /// The scheduler's settings.
    pub(super) scheduler: scheduler::Config,
}

/// An update of what the store serves and reports of this file.
#[derive(Debug)]
pub(super) enum StoreOp {
    /// The pieces being fetched now (reported in have answers).
    SetFetching(ContentId, Bitfield),
    /// Piece verified and written: servable.
    MarkVerified(ContentId, PieceIndex),
    /// A chaining value computed from origin bytes (a claim, while assembling).
    AddClaim(ContentId, PieceIndex, ChainingValue),
    /// Values taken in from peers, passed on in turn (empty: none any more).
    SetRelayed(ContentId, Vec<(PieceIndex, ChainingValue)>),
    /// The member view: a peer's members merged, or the peer gone.
    MergeMembers(ContentId, PeerId, Vec<Member>),
    ForgetMember(ContentId, PeerId),
}

/// What the core asks the driver to do.
#[derive(Debug)]
pub(super) enum Action {
    /// Ask `peer` for piece `index` of the content.
    RequestPiece {
        content_id: ContentId,
        peer: PeerId,
        index: PieceIndex,
    },
    /// Abort the request for `index` to `peer` (another source delivered it).
    CancelRequest { peer: PeerId, index: PieceIndex },
    /// Fetch pieces `start..end` from the origin.
    FetchOrigin { start: u32, end: u32 },
    /// A have round for the content: the peers to ask are chosen by the driver, `busy` (peers
    /// with requests in flight) first; `dht` also asks the DHT for providers.
    AskPeers {
        content_id: ContentId,
        dht: bool,
        busy: HashSet<PeerId>,
    },
    /// Tell `to` at once what this node holds of the content.
    Announce {
        content_id: ContentId,
        to: Vec<PeerId>,
    },
    /// Gather chaining values (or a whole verified layer from `full_from`) for the assembly.
    Gather {
        content_id: ContentId,
        known: Vec<Option<ChainingValue>>,
        claims: Vec<(PeerId, Bitfield)>,
        full_from: Vec<PeerId>,
    },
    /// Hand a piece to the writer (verify, write).
    Write {
        index: PieceIndex,
        source: Source,
        bytes: Bytes,
    },
    /// Drop these pieces, written from peers before a layer could check them: the writer
    /// forgets them (the layer assembled from claims failed, so they are fetched again).
    Forget(Vec<PieceIndex>),
    /// The layer was assembled and verified: the writer checks against it from now on, and
    /// the store serves the `verified` pieces.
    SetLayer {
        layer: PieceLayer,
        verified: Bitfield,
    },
    /// Report this node's state to the member view and call [`Core::handle_members`] with its
    /// fetchers (`proven_only`: after a lapse, only members heard from directly; `lowest`: at
    /// least the fetchers with the lowest seeds up to this many, the only ones that can take
    /// shares).
    MemberTick {
        content_id: ContentId,
        done: u32,
        origin_now: bool,
        proven_only: bool,
        lowest: usize,
    },
    /// `peer` served bad data of the content: ban it.
    Ban { content_id: ContentId, peer: PeerId },
    /// Update the store.
    Store(StoreOp),
    /// A piece verified and was written (`peer`: `None` for the origin).
    PieceDone { bytes: u64, peer: Option<PeerId> },
    /// A piece failed verification and was discarded.
    Rejected,
}

/// How the transfer phase ended, when not by completing.
#[derive(Debug)]
pub(super) enum End {
    /// Every piece verified and was written.
    Done,
    /// No source can supply the missing pieces (the origin not being used).
    Stuck,
    /// A piece recorded before the assembled layer is not the layer's: the origin served
    /// bytes other than the content's.
    DiffersFromLayer(PieceIndex),
    /// Origin bytes do not match the content id peers claimed for a SHA-256.
    ClaimFailed,
    /// An origin piece failed verification against the content id.
    OriginPieceFailed(PieceIndex, String),
    /// An origin run failed.
    Origin(OriginError),
}

/// The timers of the transfer phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    /// The next have round.
    PeerRefresh,
    /// The next member tick.
    MemberTick,
    /// The stuck grace ends.
    Stuck,
    /// The scheduler's own deadlines (patience, timeouts, the first origin run): looked at
    /// every [`TICK`].
    Schedule,
}

/// One deadline per timer.
#[derive(Debug, Default)]
struct TimerTable([Option<Instant>; 4]);

impl TimerTable {
    fn set(&mut self, t: Timer, at: Instant) {
        self.0[t as usize] = Some(at);
    }
    fn stop(&mut self, t: Timer) {
        self.0[t as usize] = None;
    }
    fn get(&self, t: Timer) -> Option<Instant> {
        self.0[t as usize]
    }
    fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }
}

/// The transfer phase of one file.
pub(super) struct Core {
    sched: Scheduler,
    piece_count: u32,
    layer: Option<PieceLayer>,
    assembly: Option<Assembly>,
    content_id: Option<ContentId>,
    claimed: bool,
    never_origin: bool,
    from_peers: bool,
    wait_until: Instant,
    /// A member of the content's swarm (joined by the driver).
    member: bool,
    /// Holding the first origin run until the member view is still.
    settling: bool,
    /// A member tick is out: the step goes on when the fetchers come back.
    awaiting_members: bool,
    not_before: Option<Instant>,
    settle_from: Instant,
    /// The generation of the member view's fetchers last given to the scheduler.
    fetchers_generation: Option<u64>,
    announced_growth: Option<Instant>,
    /// This download announced its first origin run to its peers (later runs are not
    /// announced: peers see them at their next have round).
    origin_announced: bool,
    rounds_answered: u32,
    /// Have rounds in a row each known peer missed.
    misses: BTreeMap<PeerId, u32>,
    /// Pieces handed to the writer and not reported yet.
    in_verifier: usize,
    /// Pieces taken from peers while no verified layer was known (a swarm sharing what its
    /// members fetch from the origin, decision 0016): who sent each, and its chaining value.
    /// They count as held, are never served or claimed, and are checked when the layer
    /// verifies (or, for content known by its SHA-256 alone, by the whole file's SHA-256).
    unverified: BTreeMap<PieceIndex, (PeerId, Option<ChainingValue>)>,
    /// Unverified pieces the layer rejected when it came (their peers banned then): the
    /// writer's own report of them, after the layer, changes nothing more.
    rejected_at_layer: BTreeSet<PieceIndex>,
    /// Requests in flight to peers.
    requests: BTreeSet<(PieceIndex, PeerId)>,
    /// A have round is out.
    refreshing: bool,
    refreshes: u32,
    timers: TimerTable,
    /// The core's random choices (which peers hear of new members), seeded from this node
    /// and the content so that a simulated run repeats.
    rng: StdRng,
    actions: VecDeque<Action>,
    end: Option<End>,
    /// The transfer ended (its end may have been taken already).
    ended: bool,
}

impl Core {
    /// The core of a transfer starting at `now`.
    pub(super) fn new(s: Setup, now: Instant) -> Self {
        let mut sched = Scheduler::new(s.piece_count, s.piece_size, s.scheduler);
        for index in s.kept.ones() {
            sched.set_done(index, Source::Origin);
        }
        let content_id = s
            .layer
            .as_ref()
            .map(PieceLayer::content_id)
            .or(s.assembly.as_ref().map(|a| a.id));
        // Before the first origin run: not before this, and, while settling, not before the
        // member view has been still for `SETTLE`.
        let mut not_before = None;
        let mut settling = false;
        let mut seed = 0;
        let member = s.use_peers && content_id.is_some();
        if let Some(id) = &content_id {
            seed = u64::from(origin_start(s.me, id, u32::MAX));
            sched.set_seed(seed);
            sched.set_me(s.me);
            if s.swarm {
                sched.set_origin_start(origin_start(s.me, id, s.piece_count));
                sched.set_swarm(true);
                // Nodes that start together start their origin runs up to 100 ms apart, so
                // that each sees the others' announcements first.
                let jitter = Duration::from_millis(u64::from(origin_start(s.me, id, 100)));
                not_before = Some(now + jitter);
                settling = member && !s.never_origin;
            }
        }
        if s.never_origin {
            sched.set_origin_allowed(false);
        }
        // The rest of the source policy's wait for peers before the origin (DO's
        // DelayBackground/ForegroundDownloadFromHttp).
        not_before = not_before.max(s.origin_wait);
        sched.set_origin_not_before(not_before);
        let mut timers = TimerTable::default();
        if content_id.is_some() {
            // The first have round goes out at once.
            timers.set(Timer::PeerRefresh, now);
        }
        if member {
            timers.set(Timer::MemberTick, now);
        }
        timers.set(Timer::Schedule, now);
        Self {
            sched,
            piece_count: s.piece_count,
            layer: s.layer,
            assembly: s.assembly,
            content_id,
            claimed: s.claimed,
            never_origin: s.never_origin,
            from_peers: s.from_peers,
            wait_until: s.wait_until,
            member,
            settling,
            awaiting_members: false,
            not_before,
            // Settling counts from when the origin may be used.
            settle_from: not_before.unwrap_or(now),
            fetchers_generation: None,
            announced_growth: None,
            origin_announced: false,
            rounds_answered: 0,
            misses: BTreeMap::new(),
            in_verifier: 0,
            unverified: BTreeMap::new(),
            rejected_at_layer: BTreeSet::new(),
            requests: BTreeSet::new(),
            refreshing: false,
            refreshes: 0,
            timers,
            rng: StdRng::seed_from_u64(seed),
            actions: VecDeque::new(),
            end: None,
            ended: false,
        }
    }

    /// The content peers are asked about: the verified layer's, or the one being assembled.
    pub(super) fn content_id(&self) -> Option<ContentId> {
        self.content_id
    }

    /// The verified layer, once there is one.
    pub(super) fn layer(&self) -> Option<&PieceLayer> {
        self.layer.as_ref()
    }

    /// The layer being assembled (its content id), if any.
    pub(super) fn assembly_id(&self) -> Option<ContentId> {
        self.assembly.as_ref().map(|a| a.id)
    }

    /// The SHA-256 whose swarm id the content is, when it is known by that alone.
    pub(super) fn swarm_of(&self) -> Option<shoal_validator::Sha256Digest> {
        self.assembly.as_ref().and_then(|a| a.swarm_of)
    }

    /// Whether some bytes came from peers.
    pub(super) fn got_peer_bytes(&self) -> bool {
        self.from_peers
    }

    /// The peers whose pieces are held unverified (decision 0016): those to blame when the
    /// whole file fails its SHA-256.
    pub(super) fn unverified_from(&self) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self.unverified.values().map(|(p, _)| *p).collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// The next thing to do.
    #[must_use]
    pub(super) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Self::handle_timeout`] is due.
    #[must_use]
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        self.timers.next()
    }

    /// How the transfer ended, once it has.
    #[must_use]
    pub(super) fn poll_end(&mut self) -> Option<End> {
        self.end.take()
    }

    fn finish(&mut self, end: End) {
        if !self.ended {
            self.ended = true;
            self.end = Some(end);
        }
    }

    /// A peer's holding of the content: from the first answers, a have round or an
    /// announcement. A peer's claims stand for pieces it will serve once it has the layer;
    /// while this node has none, the peer's verified pieces count as claims too (its layer can
    /// be had).
    fn apply_holding(&mut self, now: Instant, peer: PeerId, h: Holding) {
        let n = self.piece_count;
        let layer_known = self.layer.is_some();
        let claimed = match &mut self.assembly {
            Some(a) if !a.failed => {
                let mut c = h.claimed.clone();
                if !layer_known {
                    c.union_with(&h.have);
                    // What the peer can tell: its claims, its pieces, and relayed values.
                    let mut tell = h.chaining.clone();
                    tell.union_with(&c);
                    if a.claims.get(&peer) != Some(&tell) {
                        a.claims.insert(peer, tell);
                        a.changed = true;
                    }
                }
                c
            }
            _ => Bitfield::new(n),
        };
        // Once this node has a verified layer, a peer's claims are pieces it is about to
        // serve: awaited like pieces it fetches, with the same patience. Before, the pieces a
        // peer fetched from the origin itself (its claims) or verified are taken from it
        // unverified, to be checked when the layer verifies (decision 0016).
        let (have, fetching, claimed) = if layer_known {
            let mut f = h.fetching;
            f.union_with(&claimed);
            (h.have, f, Bitfield::new(n))
        } else {
            (claimed, h.fetching, Bitfield::new(n))
        };
        self.sched.set_peer(peer, have, fetching, claimed, now);
    }

    /// The transfer starts with the answers of the peers the preamble chose (for the content).
    pub(super) fn start(&mut self, now: Instant, peers: Vec<(PeerId, Holding)>) {
        if let Some(id) = self.content_id {
            for (peer, h) in peers {
                self.actions.push_back(Action::Store(StoreOp::MergeMembers(
                    id,
                    peer,
                    h.members.clone(),
                )));
                self.apply_holding(now, peer, h);
            }
        }
        self.step(now);
    }

    /// A peer's answer or announcement for the content: its members join the view, its
    /// holding counts. Answers for other content are ignored. Peers banned for the content
    /// must be filtered out by the driver.
    pub(super) fn handle_holding(&mut self, now: Instant, peer: PeerId, mut h: Holding) {
        let Some(id) = self.content_id else { return };
        if h.content_id != id {
            return;
        }
        self.actions.push_back(Action::Store(StoreOp::MergeMembers(
            id,
            peer,
            std::mem::take(&mut h.members),
        )));
        self.apply_holding(now, peer, h);
        self.step(now);
    }

    /// A have round ended: `asked` were asked, `reachable` could have been (connected, or
    /// found in the DHT), `answers` came back (for the content, from peers not banned).
    pub(super) fn handle_round(
        &mut self,
        now: Instant,
        asked: &[PeerId],
        reachable: &[PeerId],
        answers: Vec<(PeerId, Holding)>,
    ) {
        self.refreshing = false;
        self.rounds_answered += 1;
        self.timers.set(Timer::PeerRefresh, now + PEER_REFRESH);
        let answered: HashSet<PeerId> = answers.iter().map(|(p, _)| *p).collect();
        for peer in self.sched.peer_ids() {
            if !asked.contains(&peer) && reachable.contains(&peer) {
                // Not asked this round: its last answer stands. (A peer that is not reachable
                // any more, disconnected, counts a miss.)
                continue;
            }
            if answered.contains(&peer) {
                self.misses.remove(&peer);
                continue;
            }
            let m = self.misses.entry(peer).or_default();
            *m += 1;
            if *m >= PEER_MISSES {
                // Gone, or holds nothing of it any more: its pieces and claims no longer count.
                self.sched.remove_peer(&peer);
                if let Some(id) = self.content_id {
                    self.actions
                        .push_back(Action::Store(StoreOp::ForgetMember(id, peer)));
                }
                if let Some(a) = &mut self.assembly {
                    a.claims.remove(&peer);
                    a.changed = true;
                }
                self.misses.remove(&peer);
            }
        }
        let mut full_from = Vec::new();
        for (peer, mut h) in answers {
            if self.content_id != Some(h.content_id) {
                continue;
            }
            if self.layer.is_none() && h.have.count_ones() > 0 {
                full_from.push(peer);
            }
            if let Some(id) = self.content_id {
                self.actions.push_back(Action::Store(StoreOp::MergeMembers(
                    id,
                    peer,
                    std::mem::take(&mut h.members),
                )));
            }
            self.apply_holding(now, peer, h);
        }
        if self.layer.is_none()
            && let Some(a) = &mut self.assembly
            && !a.running
            && a.swarm_of.is_none()
        {
            // Values a peer could tell that an earlier gathering missed are asked again.
            if a.peers_know_more() {
                a.changed = true;
            }
            // A peer with a verified layer: take it rather than wait for the claims.
            if !full_from.is_empty() {
                a.running = true;
                self.actions.push_back(Action::Gather {
                    content_id: a.id,
                    known: Vec::new(),
                    claims: Vec::new(),
                    full_from,
                });
            }
        }
        self.step(now);
    }

    /// A piece arrived from `source`.
    pub(super) fn handle_piece(
        &mut self,
        now: Instant,
        index: PieceIndex,
        source: Source,
        bytes: Bytes,
    ) {
        if let Source::Peer(p) = source {
            self.requests.remove(&(index, p));
        }
        match self
            .sched
            .on_received(index, source, bytes.len() as u64, now)
        {
            Received::Late => {}
            Received::First { cancel } => {
                for peer in cancel {
                    if self.requests.remove(&(index, peer)) {
                        self.actions
                            .push_back(Action::CancelRequest { peer, index });
                    }
                }
                self.in_verifier += 1;
                self.actions.push_back(Action::Write {
                    index,
                    source,
                    bytes,
                });
            }
        }
        self.step(now);
    }

    /// A request to `peer` for `index` failed (`busy`: refused for want of an upload slot).
    pub(super) fn handle_failed(
        &mut self,
        now: Instant,
        index: PieceIndex,
        peer: PeerId,
        busy: bool,
    ) {
        self.requests.remove(&(index, peer));
        if busy {
            self.sched.on_busy(index, peer, now);
        } else {
            self.sched.on_failed(index, peer, now);
        }
        self.step(now);
    }

    /// An origin run ended; `ranges`: whether the origin is known to honour Range.
    pub(super) fn handle_origin_end(
        &mut self,
        now: Instant,
        result: Result<(), OriginError>,
        ranges: Option<bool>,
    ) {
        self.sched.on_origin_run_end();
        match result {
            Ok(()) => {
                // An origin without Range support sends from byte 0 on every request: its runs
                // then go on as far as the pieces are missing.
                if let Some(r) = ranges {
                    self.sched.set_origin_ranges(r);
                }
                self.step(now);
            }
            Err(e) if self.claimed && matches!(e, OriginError::Changed { .. }) => {
                self.finish(End::ClaimFailed);
            }
            Err(e) => self.finish(End::Origin(e)),
        }
    }

    /// The writer verified (`Ok`) or rejected piece `index`; `cv`: its chaining value, when
    /// recorded to derive the layer; `after_layer`: a piece written earlier that the layer
    /// assembled since rejects (not one of the pieces handed over).
    pub(super) fn handle_verified(&mut self, now: Instant, v: Verdict) {
        if v.after_layer && v.result.is_err() && self.rejected_at_layer.remove(&v.index) {
            // Rejected already, when the layer came.
            return;
        }
        if !v.after_layer {
            self.in_verifier = self.in_verifier.saturating_sub(1);
        }
        match v.result {
            Ok(())
                if v.cv.is_some_and(|cv| {
                    self.layer.as_ref().is_some_and(|l| !l.agrees(v.index, &cv))
                }) =>
            {
                self.finish(End::DiffersFromLayer(v.index));
            }
            Ok(()) if self.layer.is_none() && matches!(v.source, Source::Peer(_)) => {
                // Taken from a peer before a layer can check it: held, not served, not
                // claimed; its value is passed on like a relayed one.
                let Source::Peer(p) = v.source else {
                    return;
                };
                if self.assembly.as_ref().is_none_or(|a| a.failed) {
                    // Requested before the assembly failed: nothing will check it now, so it
                    // is dropped and fetched again.
                    self.sched.forget_held(&[v.index]);
                    self.actions.push_back(Action::Forget(vec![v.index]));
                    self.step(now);
                    return;
                }
                self.sched.on_done(v.index, v.source);
                self.unverified.insert(v.index, (p, v.cv));
                if let (Some(a), Some(cv)) = (&mut self.assembly, v.cv)
                    && a.swarm_of.is_none()
                    && !a.failed
                    && !a.knows(v.index as usize)
                {
                    a.set_relayed(v.index, cv);
                    a.changed = true;
                    self.actions.push_back(Action::Store(StoreOp::SetRelayed(
                        a.id,
                        vec![(v.index, cv)],
                    )));
                }
                self.from_peers = true;
                self.actions.push_back(Action::PieceDone {
                    bytes: v.bytes,
                    peer: Some(p),
                });
                self.step(now);
            }
            Ok(()) => {
                self.sched.on_done(v.index, v.source);
                if let Some(id) = self.content_id {
                    self.actions
                        .push_back(Action::Store(StoreOp::MarkVerified(id, v.index)));
                }
                if let (Some(a), Some(cv)) = (&mut self.assembly, v.cv)
                    && self.layer.is_none()
                {
                    a.set_own(v.index, cv);
                    a.changed = true;
                    self.actions
                        .push_back(Action::Store(StoreOp::AddClaim(a.id, v.index, cv)));
                }
                let peer = match v.source {
                    Source::Peer(p) => Some(p),
                    Source::Origin => None,
                };
                self.from_peers |= peer.is_some();
                self.actions.push_back(Action::PieceDone {
                    bytes: v.bytes,
                    peer,
                });
                self.step(now);
            }
            Err(reason) => {
                self.actions.push_back(Action::Rejected);
                match v.source {
                    Source::Peer(peer) => {
                        tracing::warn!(%peer, index = v.index, "piece rejected, peer banned: {reason}");
                        self.sched.on_corrupt(v.index, peer);
                        if let Some(content_id) = self.content_id {
                            self.actions.push_back(Action::Ban { content_id, peer });
                        }
                        self.step(now);
                    }
                    Source::Origin if self.claimed => self.finish(End::ClaimFailed),
                    Source::Origin => self.finish(End::OriginPieceFailed(v.index, reason)),
                }
            }
        }
    }

    /// A layer gathering ended.
    pub(super) fn handle_assembled(&mut self, now: Instant, result: Assembled) {
        let Some(a) = &mut self.assembly else { return };
        a.running = false;
        match result {
            Assembled::Layer(l) => {
                // Only own pieces whose chaining value is the layer's are servable; the writer
                // checks every recorded piece against the layer too.
                let mut verified = Bitfield::new(self.piece_count);
                for (i, cv) in a.own().iter().enumerate() {
                    if cv.is_some_and(|cv| l.agrees(i as u32, &cv)) {
                        verified.set(i as u32);
                    }
                }
                // Pieces taken from peers unverified are checked now: those that agree are
                // served; each that does not is proof against its peer, banned, and the piece
                // is fetched again (the transfer cannot end on it).
                let id = l.content_id();
                for (i, (peer, cv)) in std::mem::take(&mut self.unverified) {
                    let Some(cv) = cv else {
                        // No value recorded to check: fetched again, nobody blamed.
                        self.sched.forget_held(&[i]);
                        continue;
                    };
                    if l.agrees(i, &cv) {
                        verified.set(i);
                    } else {
                        tracing::warn!(%peer, index = i, "a piece taken before the layer was known is not the layer's; peer banned");
                        self.sched.on_corrupt(i, peer);
                        self.rejected_at_layer.insert(i);
                        self.actions.push_back(Action::Rejected);
                        self.actions.push_back(Action::Ban {
                            content_id: id,
                            peer,
                        });
                    }
                }
                self.content_id = Some(l.content_id());
                self.layer = Some(l.clone());
                self.actions
                    .push_back(Action::SetLayer { layer: l, verified });
                // Peers' pieces count from the next have round on, which goes out now (or, with
                // a round out, when it ends and the refresh is due).
                if !self.refreshing {
                    self.timers.set(Timer::PeerRefresh, now);
                }
            }
            Assembled::Learned(entries) => {
                // Passed on to peers from now on; the rest is asked for again when peers tell
                // more (or at the next have round).
                for (i, cv) in &entries {
                    a.set_relayed(*i, *cv);
                }
                if !entries.is_empty() {
                    self.actions
                        .push_back(Action::Store(StoreOp::SetRelayed(a.id, entries)));
                }
            }
            Assembled::Failed {
                reason,
                from_claims,
            } => {
                if from_claims {
                    tracing::warn!(
                        "the piece layer assembled from peers' claims fails ({reason}); fetching the rest from the origin"
                    );
                    a.failed = true;
                    a.forget_relayed();
                    self.actions
                        .push_back(Action::Store(StoreOp::SetRelayed(a.id, Vec::new())));
                    self.sched.drop_claims();
                    // Pieces taken from peers unverified are dropped and fetched again: any
                    // of the claimers may have lied, and none can be shown to have.
                    let dropped: Vec<PieceIndex> =
                        std::mem::take(&mut self.unverified).into_keys().collect();
                    if !dropped.is_empty() {
                        self.sched.forget_held(&dropped);
                        self.actions.push_back(Action::Forget(dropped));
                    }
                } else {
                    // Only peers' verified layers were tried; claims may still do.
                    a.changed = true;
                }
            }
        }
        self.step(now);
    }

    /// The member view's fetchers and when it last grew, after an [`Action::MemberTick`].
    /// `view`: `None` when there is no member view (any more).
    pub(super) fn handle_members(&mut self, now: Instant, view: Option<(Fetchers, Instant)>) {
        self.awaiting_members = false;
        let (Some(id), Some((fetchers, grew))) = (self.content_id, view) else {
            self.schedule(now);
            return;
        };
        // The same list as last time changes nothing (the scheduler would find its fetchers
        // unchanged), unless the shares lapsed since: then the scheduler filters them anew.
        if self.fetchers_generation != Some(fetchers.generation) || self.sched.has_lapsed() {
            self.fetchers_generation = Some(fetchers.generation);
            self.sched.set_fetchers(&fetchers.ids, now);
        }
        if self.settling && now >= self.settle_from + MAX_SETTLE {
            self.settling = false;
        }
        if self.settling {
            // Two have rounds answered (members two hops away known), and no new member for
            // `SETTLE`; at most `MAX_SETTLE`.
            let cap = self.settle_from + MAX_SETTLE;
            let until = if self.rounds_answered >= 2 {
                (grew + SETTLE).min(cap)
            } else {
                cap
            };
            self.sched
                .set_origin_not_before(self.not_before.max(Some(until)));
            // New members reach the peers at once, not at their next have round.
            if self.announced_growth != Some(grew) {
                self.announced_growth = Some(grew);
                self.actions.push_back(Action::Announce {
                    content_id: id,
                    to: super::poll_sample_with(
                        self.sched.peer_ids(),
                        &HashSet::new(),
                        &mut self.rng,
                    ),
                });
            }
        }
        self.schedule(now);
    }

    /// Timers that are due run.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        self.step(now);
    }

    /// After any input: the member tick when due, then [`Self::schedule`].
    fn step(&mut self, now: Instant) {
        if self.ended || self.awaiting_members {
            return;
        }
        // With pieces held unverified, a BLAKE3 content is done only once the layer verified
        // them; content known by its SHA-256 alone is checked whole at the end.
        let checked = self.layer.is_some()
            || self.unverified.is_empty()
            || self.assembly.as_ref().is_some_and(|a| a.swarm_of.is_some());
        if self.sched.is_complete() && self.in_verifier == 0 && checked {
            self.finish(End::Done);
            return;
        }
        // The swarm's members, every tick: state this node, share the origin among those that
        // use it, and while settling, hold the first origin run until the view is still. The
        // rest of the step waits for the fetchers ([`Self::handle_members`]).
        if let Some(id) = self.content_id
            && self.member
            && self.timers.get(Timer::MemberTick).is_none_or(|t| now >= t)
        {
            self.timers.set(Timer::MemberTick, now + TICK);
            self.awaiting_members = true;
            self.actions.push_back(Action::MemberTick {
                content_id: id,
                done: self.sched.done_count(),
                origin_now: !self.never_origin && now >= self.wait_until,
                proven_only: self.sched.has_lapsed(),
                lowest: self.sched.fetchers_wanted(),
            });
            return;
        }
        self.schedule(now);
    }

    /// The scheduler's actions, the stuck check, the have round when due, and a gathering
    /// when the assembly can learn something.
    fn schedule(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        self.timers.set(Timer::Schedule, now + TICK);
        let actions = self.sched.next_actions(now);
        let origin_run = actions
            .iter()
            .any(|a| matches!(a, scheduler::Action::Origin { .. }));
        if origin_run {
            self.settling = false;
        }
        if self.sched.is_stuck() {
            let since = match self.timers.get(Timer::Stuck) {
                Some(deadline) => deadline - STUCK_GRACE,
                None => {
                    self.timers.set(Timer::Stuck, now + STUCK_GRACE);
                    now
                }
            };
            if now >= since + STUCK_GRACE {
                self.finish(End::Stuck);
                return;
            }
        } else {
            self.timers.stop(Timer::Stuck);
        }
        if !actions.is_empty()
            && let Some(id) = self.content_id
        {
            self.actions.push_back(Action::Store(StoreOp::SetFetching(
                id,
                self.sched.in_flight(),
            )));
            // Starting on the origin: tell the peers fetching the same content at once. Only
            // the first run: it makes this node a fetcher in their views, so later runs fall
            // in the shares they expect, and their have rounds show them within
            // `PEER_REFRESH`. Every run announced cost eight nodes about 1,000 announcements
            // (a substream and two timers each) per 256 MiB.
            if origin_run && !std::mem::replace(&mut self.origin_announced, true) {
                self.actions.push_back(Action::Announce {
                    content_id: id,
                    to: self.sched.peer_ids(),
                });
            }
        }
        for action in actions {
            match action {
                scheduler::Action::Peer { peer, index } => {
                    let Some(content_id) = self.content_id else {
                        continue;
                    };
                    self.requests.insert((index, peer));
                    self.actions.push_back(Action::RequestPiece {
                        content_id,
                        peer,
                        index,
                    });
                }
                scheduler::Action::Origin { start, end } => {
                    self.actions.push_back(Action::FetchOrigin { start, end });
                }
            }
        }
        if let Some(id) = self.content_id
            && !self.refreshing
            && self
                .timers
                .get(Timer::PeerRefresh)
                .is_some_and(|t| now >= t)
        {
            self.refreshing = true;
            self.refreshes += 1;
            // While a round is out, the next is not due.
            self.timers.stop(Timer::PeerRefresh);
            self.actions.push_back(Action::Store(StoreOp::SetFetching(
                id,
                self.sched.in_flight(),
            )));
            self.actions.push_back(Action::AskPeers {
                content_id: id,
                dht: self.refreshes.is_multiple_of(DHT_EVERY_REFRESHES),
                busy: self.requests.iter().map(|(_, p)| *p).collect(),
            });
        }
        // Gather chaining values from peers that can tell ones not known here, and assemble
        // the layer once all are known (a peer with a verified layer gives it whole). Values
        // that cannot complete the layer yet are gathered at most every `GATHER_EVERY`; once
        // every value is known here or told by some peer, at once.
        if self.layer.is_none()
            && let Some(a) = &mut self.assembly
            && !a.running
            && !a.failed
            && a.swarm_of.is_none()
        {
            // Checked only after own pieces or peers' values changed: it compares every
            // peer's claims with the known values, a word at a time.
            if std::mem::take(&mut a.changed) && (a.peers_know_more() || a.knows_all()) {
                a.due = Some(a.could_complete());
            }
            if let Some(complete) = a.due
                && (complete || a.last_gather.is_none_or(|t| now >= t + super::GATHER_EVERY))
            {
                a.due = None;
                a.running = true;
                a.last_gather = Some(now);
                self.actions.push_back(Action::Gather {
                    content_id: a.id,
                    known: a.known(),
                    claims: a.claims.iter().map(|(p, b)| (*p, b.clone())).collect(),
                    full_from: Vec::new(),
                });
            }
        }
    }
}

/// The writer's verdict on one piece.
#[derive(Debug)]
pub(super) struct Verdict {
    pub(super) index: PieceIndex,
    pub(super) source: Source,
    /// The piece's length, in bytes.
    pub(super) bytes: u64,
    /// The piece's bytes as written, when it passed, with the chaining value they have (the
    /// layer's they verified against, or the one computed from them), for the store's recent
    /// pieces ([`crate::store::ContentStore::keep_recent`]); the core does not look at them.
    pub(super) piece: Option<(Bytes, ChainingValue)>,
    /// `Err`: why it failed verification.
    pub(super) result: Result<(), String>,
    /// The piece's chaining value, when it was recorded to derive the layer (no layer yet).
    pub(super) cv: Option<ChainingValue>,
    /// A piece written earlier that the layer assembled since rejects (not a queued piece).
    pub(super) after_layer: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIECE: u64 = 16 * 1024;

    /// A verified layer of a file of `pieces` pieces of 16 KiB, and the file's bytes.
    fn layer_of(pieces: u64) -> (PieceLayer, Vec<u8>) {
        let bytes: Vec<u8> = (0..pieces * PIECE).map(|i| (i % 251) as u8).collect();
        let d = shoal_validator::hash_reader(&bytes[..], bytes.len() as u64).unwrap();
        (d.layer, bytes)
    }

    fn setup(layer: &PieceLayer, now: Instant) -> Setup {
        let id = layer.content_id();
        Setup {
            me: PeerId::random(),
            piece_size: id.piece_size(),
            piece_count: id.piece_count(),
            layer: Some(layer.clone()),
            assembly: None,
            kept: Bitfield::new(id.piece_count()),
            claimed: false,
            from_peers: false,
            never_origin: false,
            use_peers: true,
            swarm: false,
            wait_until: now,
            origin_wait: None,
            scheduler: scheduler::Config::default(),
        }
    }

    /// A core without a layer, assembling `layer`'s from the values `own` and `relayed` (a
    /// gathering running).
    fn assembling(
        layer: &PieceLayer,
        own: Vec<Option<ChainingValue>>,
        relayed: Vec<Option<ChainingValue>>,
        t0: Instant,
    ) -> Core {
        let id = layer.content_id();
        let mut assembly = Assembly::new(id, id.piece_count(), None);
        for (i, cv) in own.into_iter().enumerate() {
            if let Some(cv) = cv {
                assembly.set_own(i as PieceIndex, cv);
            }
        }
        for (i, cv) in relayed.into_iter().enumerate() {
            if let Some(cv) = cv {
                assembly.set_relayed(i as PieceIndex, cv);
            }
        }
        assembly.running = true;
        assembly.changed = false;
        Core::new(
            Setup {
                layer: None,
                assembly: Some(assembly),
                ..setup(layer, t0)
            },
            t0,
        )
    }

    fn holding(id: ContentId, have: &[u32]) -> Holding {
        let n = id.piece_count();
        let mut h = Bitfield::new(n);
        for i in have {
            h.set(*i);
        }
        Holding {
            content_id: id,
            chaining: h.clone(),
            have: h,
            fetching: Bitfield::new(n),
            claimed: Bitfield::new(n),
            members: Vec::new(),
        }
    }

    /// Every action the core has, answering member ticks with an empty view (as the driver
    /// does with the store's).
    fn drain(core: &mut Core, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = core.poll_action() {
            if matches!(a, Action::MemberTick { .. }) {
                core.handle_members(now, Some((Fetchers::new(Vec::new()), now)));
            }
            out.push(a);
        }
        out
    }

    /// A core started at `t0` with no peer, its first actions drained.
    fn started(s: Setup, t0: Instant) -> Core {
        let mut core = Core::new(s, t0);
        core.start(t0, Vec::new());
        drain(&mut core, t0);
        core
    }

    fn pieces_asked(actions: &[Action]) -> Vec<(PeerId, PieceIndex)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::RequestPiece { peer, index, .. } => Some((*peer, *index)),
                _ => None,
            })
            .collect()
    }

    fn origin_runs(actions: &[Action]) -> Vec<(u32, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::FetchOrigin { start, end } => Some((*start, *end)),
                _ => None,
            })
            .collect()
    }

    fn written(actions: &[Action]) -> Vec<(PieceIndex, Source)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Write { index, source, .. } => Some((*index, *source)),
                _ => None,
            })
            .collect()
    }

    fn ok(index: PieceIndex, source: Source) -> Verdict {
        Verdict {
            index,
            source,
            bytes: PIECE,
            piece: None,
            result: Ok(()),
            cv: None,
            after_layer: false,
        }
    }

    #[test]
    fn pieces_a_peer_has_are_asked_of_it_written_when_they_come_and_the_transfer_ends_when_all_verified()
     {
        let t0 = Instant::now();
        let (layer, bytes) = layer_of(4);
        let id = layer.content_id();
        let mut core = Core::new(setup(&layer, t0), t0);
        let peer = PeerId::random();
        core.start(t0, vec![(peer, holding(id, &[0, 1, 2, 3]))]);
        let actions = drain(&mut core, t0);
        // The member view hears of the answer, a have round goes out at once, and every piece
        // is asked of the peer that has it; the origin is not used.
        assert!(actions.iter().any(
            |a| matches!(a, Action::Store(StoreOp::MergeMembers(c, p, _)) if *c == id && *p == peer)
        ));
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::AskPeers { content_id, .. } if *content_id == id))
        );
        let mut asked = pieces_asked(&actions);
        asked.sort_by_key(|(_, i)| *i);
        assert_eq!(asked, (0..4).map(|i| (peer, i)).collect::<Vec<_>>());
        assert!(origin_runs(&actions).is_empty());
        // Pieces come back: each is handed to the writer once.
        for i in 0..4u32 {
            let piece =
                Bytes::copy_from_slice(&bytes[(u64::from(i) * PIECE) as usize..][..PIECE as usize]);
            core.handle_piece(t0, i, Source::Peer(peer), piece);
        }
        let actions = drain(&mut core, t0);
        assert_eq!(
            written(&actions),
            (0..4).map(|i| (i, Source::Peer(peer))).collect::<Vec<_>>()
        );
        // Not done until the writer verified every piece.
        assert!(core.poll_end().is_none());
        for i in 0..4 {
            core.handle_verified(t0, ok(i, Source::Peer(peer)));
        }
        let actions = drain(&mut core, t0);
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, Action::PieceDone { peer: Some(p), .. } if *p == peer))
                .count(),
            4
        );
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, Action::Store(StoreOp::MarkVerified(..))))
                .count(),
            4
        );
        assert!(matches!(core.poll_end(), Some(End::Done)));
        assert!(core.got_peer_bytes());
        assert!(core.poll_timeout().is_none());
    }

    #[test]
    fn without_peers_the_origin_fetches_every_piece_and_a_second_copy_is_not_written() {
        let t0 = Instant::now();
        let (layer, bytes) = layer_of(3);
        let mut core = Core::new(setup(&layer, t0), t0);
        core.start(t0, Vec::new());
        let actions = drain(&mut core, t0);
        assert_eq!(origin_runs(&actions), vec![(0, 3)]);
        let piece = |i: u32| {
            Bytes::copy_from_slice(&bytes[(u64::from(i) * PIECE) as usize..][..PIECE as usize])
        };
        core.handle_piece(t0, 0, Source::Origin, piece(0));
        // The same piece again (a late duplicate) is not written twice.
        core.handle_piece(t0, 0, Source::Origin, piece(0));
        let actions = drain(&mut core, t0);
        assert_eq!(written(&actions), vec![(0, Source::Origin)]);
    }

    #[test]
    fn a_peer_piece_that_fails_verification_bans_the_peer_and_the_piece_is_fetched_again() {
        let t0 = Instant::now();
        let (layer, _) = layer_of(2);
        let id = layer.content_id();
        let mut core = Core::new(setup(&layer, t0), t0);
        let (bad, good) = (PeerId::random(), PeerId::random());
        core.start(t0, vec![(bad, holding(id, &[0, 1]))]);
        drain(&mut core, t0);
        core.handle_piece(
            t0,
            0,
            Source::Peer(bad),
            Bytes::from_static(b"not the piece"),
        );
        drain(&mut core, t0);
        core.handle_holding(t0, good, holding(id, &[0, 1]));
        drain(&mut core, t0);
        core.handle_verified(
            t0,
            Verdict {
                result: Err("does not match".into()),
                ..ok(0, Source::Peer(bad))
            },
        );
        let t1 = t0 + TICK;
        core.handle_timeout(t1);
        let actions = drain(&mut core, t1);
        assert!(matches!(actions[0], Action::Rejected));
        assert!(actions.iter().any(
            |a| matches!(a, Action::Ban { content_id, peer } if *content_id == id && *peer == bad)
        ));
        // Piece 0 is asked again, of the good peer, never of the banned one.
        let asked = pieces_asked(&actions);
        assert!(asked.contains(&(good, 0)), "{asked:?}");
        assert!(asked.iter().all(|(p, _)| *p != bad));
        assert!(core.poll_end().is_none());
    }

    #[test]
    fn an_origin_piece_that_fails_verification_ends_the_transfer_and_a_claimed_content_id_fails_its_claim()
     {
        let t0 = Instant::now();
        let (layer, _) = layer_of(2);
        for claimed in [false, true] {
            let mut core = started(
                Setup {
                    claimed,
                    ..setup(&layer, t0)
                },
                t0,
            );
            core.handle_verified(
                t0,
                Verdict {
                    result: Err("does not match".into()),
                    ..ok(1, Source::Origin)
                },
            );
            match (claimed, core.poll_end()) {
                (false, Some(End::OriginPieceFailed(1, reason))) => {
                    assert_eq!(reason, "does not match");
                }
                (true, Some(End::ClaimFailed)) => {}
                (c, other) => panic!("claimed {c}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_origin_run_that_fails_ends_the_transfer_with_its_error() {
        let t0 = Instant::now();
        let (layer, _) = layer_of(2);
        let url: url::Url = "http://origin.invalid/f".parse().unwrap();
        for claimed in [false, true] {
            let mut core = started(
                Setup {
                    claimed,
                    ..setup(&layer, t0)
                },
                t0,
            );
            core.handle_origin_end(
                t0,
                Err(OriginError::Changed {
                    url: url.clone(),
                    detail: "other length".into(),
                }),
                None,
            );
            match (claimed, core.poll_end()) {
                (false, Some(End::Origin(OriginError::Changed { .. })))
                | (true, Some(End::ClaimFailed)) => {}
                (c, other) => panic!("claimed {c}: {other:?}"),
            }
        }
    }

    #[test]
    fn with_the_origin_never_used_and_no_peer_the_transfer_is_stuck_after_the_grace() {
        let t0 = Instant::now();
        let (layer, _) = layer_of(2);
        let mut core = Core::new(
            Setup {
                never_origin: true,
                ..setup(&layer, t0)
            },
            t0,
        );
        core.start(t0, Vec::new());
        let actions = drain(&mut core, t0);
        assert!(origin_runs(&actions).is_empty());
        // The stuck timer is armed: the core wants to be woken before the grace ends.
        let wake = core.poll_timeout().unwrap();
        assert!(wake <= t0 + STUCK_GRACE);
        let almost = t0 + STUCK_GRACE - Duration::from_millis(1);
        core.handle_timeout(almost);
        drain(&mut core, almost);
        assert!(core.poll_end().is_none(), "stuck before the grace ended");
        core.handle_timeout(t0 + STUCK_GRACE);
        assert!(matches!(core.poll_end(), Some(End::Stuck)));
    }

    #[test]
    fn have_rounds_go_out_one_at_a_time_every_peer_refresh_and_a_peer_that_misses_rounds_is_forgotten()
     {
        let t0 = Instant::now();
        let (layer, _) = layer_of(8);
        let id = layer.content_id();
        let mut core = Core::new(
            Setup {
                never_origin: true,
                ..setup(&layer, t0)
            },
            t0,
        );
        let gone = PeerId::random();
        core.start(t0, vec![(gone, holding(id, &[0, 1, 2, 3, 4, 5, 6, 7]))]);
        let rounds = |actions: &[Action]| {
            actions
                .iter()
                .filter(|a| matches!(a, Action::AskPeers { .. }))
                .count()
        };
        assert_eq!(rounds(&drain(&mut core, t0)), 1);
        // While the round is out, no other goes out, however long it takes.
        let later = t0 + 10 * PEER_REFRESH;
        core.handle_timeout(later);
        assert_eq!(rounds(&drain(&mut core, later)), 0);
        let mut now = later;
        for round in 1..=PEER_MISSES {
            // The peer was asked and did not answer.
            core.handle_round(now, &[gone], &[gone], Vec::new());
            let actions = drain(&mut core, now);
            let forgotten = actions.iter().any(
                |a| matches!(a, Action::Store(StoreOp::ForgetMember(c, p)) if *c == id && *p == gone),
            );
            assert_eq!(forgotten, round == PEER_MISSES, "round {round}");
            // The next round is due `PEER_REFRESH` after this one ended, not before.
            assert_eq!(rounds(&actions), 0);
            core.handle_timeout(now + PEER_REFRESH - Duration::from_millis(1));
            assert_eq!(rounds(&drain(&mut core, now)), 0);
            now += PEER_REFRESH;
            core.handle_timeout(now);
            assert_eq!(rounds(&drain(&mut core, now)), 1, "round {round}");
        }
    }

    #[test]
    fn member_ticks_come_every_tick_and_the_step_waits_for_the_fetchers() {
        let t0 = Instant::now();
        let (layer, _) = layer_of(2);
        let mut core = Core::new(
            Setup {
                swarm: true,
                ..setup(&layer, t0)
            },
            t0,
        );
        core.start(t0, Vec::new());
        // The first action is the member tick; nothing is scheduled until it is answered.
        let first = core.poll_action();
        assert!(
            matches!(first, Some(Action::MemberTick { done: 0, .. })),
            "{first:?}"
        );
        assert!(core.poll_action().is_none());
        core.handle_members(t0, Some((Fetchers::new(Vec::new()), t0)));
        assert!(core.poll_action().is_some());
        drain(&mut core, t0);
        // Within the tick, no other member tick.
        core.handle_timeout(t0 + TICK / 2);
        let ticks = |a: &[Action]| {
            a.iter()
                .filter(|a| matches!(a, Action::MemberTick { .. }))
                .count()
        };
        assert_eq!(ticks(&drain(&mut core, t0 + TICK / 2)), 0);
        core.handle_timeout(t0 + TICK);
        assert_eq!(ticks(&drain(&mut core, t0 + TICK)), 1);
        assert!(core.poll_timeout().is_some_and(|t| t <= t0 + 2 * TICK));
    }

    #[test]
    fn an_assembled_layer_is_handed_over_with_the_own_pieces_that_match_it_and_peers_are_asked_again()
     {
        let t0 = Instant::now();
        let (layer, _) = layer_of(3);
        let id = layer.content_id();
        let n = id.piece_count() as usize;
        let mut own = vec![None; n];
        own[0] = Some(layer.chaining_values()[0]);
        // A recorded value that is not the layer's: not servable.
        own[2] = Some([7u8; 32]);
        let mut core = assembling(&layer, own, vec![None; n], t0);
        core.start(t0, Vec::new());
        drain(&mut core, t0);
        core.handle_round(t0, &[], &[], Vec::new());
        drain(&mut core, t0);
        core.handle_assembled(t0, Assembled::Layer(layer.clone()));
        let actions = drain(&mut core, t0);
        let verified = actions.iter().find_map(|a| match a {
            Action::SetLayer { layer: l, verified } if *l == layer => Some(verified.clone()),
            _ => None,
        });
        let verified = verified.expect("the layer is handed over");
        assert_eq!(verified.ones().collect::<Vec<_>>(), vec![0]);
        assert_eq!(core.layer(), Some(&layer));
        // A have round goes out at once: peers' pieces count now.
        assert!(actions.iter().any(|a| matches!(a, Action::AskPeers { .. })));
    }

    #[test]
    fn pieces_a_peer_fetched_from_the_origin_are_taken_unverified_and_checked_by_the_layer() {
        let t0 = Instant::now();
        let (layer, bytes) = layer_of(4);
        let id = layer.content_id();
        let n = id.piece_count() as usize;
        let cvs = layer.chaining_values().to_vec();
        // This node fetched pieces 0 and 1 from the origin; no layer is known yet.
        let mut own = vec![None; n];
        own[0] = Some(cvs[0]);
        own[1] = Some(cvs[1]);
        let mut kept = Bitfield::new(n as u32);
        kept.set(0);
        kept.set(1);
        let mut assembly = Assembly::new(id, n as u32, None);
        for (i, cv) in own.into_iter().enumerate() {
            if let Some(cv) = cv {
                assembly.set_own(i as PieceIndex, cv);
            }
        }
        assembly.changed = false;
        // No origin: what is missing comes from peers or not at all.
        let mut core = Core::new(
            Setup {
                layer: None,
                assembly: Some(assembly),
                kept,
                never_origin: true,
                ..setup(&layer, t0)
            },
            t0,
        );
        core.start(t0, Vec::new());
        drain(&mut core, t0);
        // Two peers each claim a piece they fetched from the origin: each is asked for it
        // before any layer could check it.
        let (honest, liar) = (PeerId::random(), PeerId::random());
        let claims = |i: u32| Holding {
            claimed: {
                let mut b = Bitfield::new(n as u32);
                b.set(i);
                b
            },
            ..holding(id, &[])
        };
        core.handle_holding(t0, honest, claims(2));
        core.handle_holding(t0, liar, claims(3));
        let mut asked = pieces_asked(&drain(&mut core, t0));
        asked.sort_by_key(|(_, i)| *i);
        assert_eq!(asked, vec![(honest, 2), (liar, 3)]);
        let piece = |i: u32| {
            Bytes::copy_from_slice(&bytes[(u64::from(i) * PIECE) as usize..][..PIECE as usize])
        };
        core.handle_piece(t0, 2, Source::Peer(honest), piece(2));
        core.handle_piece(t0, 3, Source::Peer(liar), Bytes::from_static(b"made up"));
        drain(&mut core, t0);
        // The writer takes both (no layer to check them against), with their values.
        core.handle_verified(
            t0,
            Verdict {
                cv: Some(cvs[2]),
                ..ok(2, Source::Peer(honest))
            },
        );
        core.handle_verified(
            t0,
            Verdict {
                cv: Some([9; 32]),
                ..ok(3, Source::Peer(liar))
            },
        );
        let actions = drain(&mut core, t0);
        // Held, not served, not claimed: no MarkVerified, no AddClaim.
        assert!(!actions.iter().any(|a| matches!(
            a,
            Action::Store(StoreOp::MarkVerified(..) | StoreOp::AddClaim(..))
        )));
        assert_eq!(core.unverified_from().len(), 2);
        // Every piece is held, but a BLAKE3 content is done only once the layer verified.
        assert!(core.poll_end().is_none());
        core.handle_assembled(t0, Assembled::Layer(layer.clone()));
        let actions = drain(&mut core, t0);
        let verified = actions
            .iter()
            .find_map(|a| match a {
                Action::SetLayer { verified, .. } => Some(verified.clone()),
                _ => None,
            })
            .expect("the layer is handed over");
        // Own pieces and the honest peer's piece are served; the liar's is not.
        assert_eq!(verified.ones().collect::<Vec<_>>(), vec![0, 1, 2]);
        // The liar's piece is not the layer's: proof, the liar is banned, and the piece is
        // missing again (the transfer cannot end).
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Ban { peer, .. } if *peer == liar))
        );
        assert!(core.poll_end().is_none(), "the liar's piece is missing");
        // The writer's own report of that piece, later, changes nothing more.
        core.handle_verified(
            t0,
            Verdict {
                result: Err("differs from the assembled piece layer".into()),
                after_layer: true,
                bytes: 0,
                piece: None,
                ..ok(3, Source::Peer(liar))
            },
        );
        let actions = drain(&mut core, t0);
        assert!(!actions.iter().any(|a| matches!(a, Action::Rejected)));
        assert!(core.poll_end().is_none());
        assert!(core.unverified_from().is_empty());
        // The piece is missing again: a peer that holds it verified is asked for it.
        core.handle_holding(t0, honest, holding(id, &[2, 3]));
        assert_eq!(pieces_asked(&drain(&mut core, t0)), vec![(honest, 3)]);
    }

    #[test]
    fn a_failed_assembly_from_claims_drops_the_relayed_values_and_a_busy_peer_is_not_asked_at_once()
    {
        let t0 = Instant::now();
        let (layer, _) = layer_of(2);
        let id = layer.content_id();
        let mut core = assembling(&layer, vec![None; 2], vec![Some([1u8; 32]), None], t0);
        core.start(t0, Vec::new());
        drain(&mut core, t0);
        core.handle_assembled(
            t0,
            Assembled::Failed {
                reason: "does not merge".into(),
                from_claims: true,
            },
        );
        let actions = drain(&mut core, t0);
        assert!(actions.iter().any(
            |a| matches!(a, Action::Store(StoreOp::SetRelayed(c, v)) if *c == id && v.is_empty())
        ));
        // A piece taken unverified that lands after the failure has nothing to check it: it
        // is dropped (and fetched again), not held.
        let late = PeerId::random();
        core.handle_verified(
            t0,
            Verdict {
                cv: Some([2; 32]),
                ..ok(1, Source::Peer(late))
            },
        );
        let actions = drain(&mut core, t0);
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Forget(v) if *v == vec![1]))
        );
        assert!(core.unverified_from().is_empty());
        // A peer that answers Busy is not asked for the same piece again at once.
        let (layer, _) = layer_of(2);
        let id = layer.content_id();
        let mut core = Core::new(setup(&layer, t0), t0);
        let peer = PeerId::random();
        core.start(t0, vec![(peer, holding(id, &[0, 1]))]);
        assert!(pieces_asked(&drain(&mut core, t0)).contains(&(peer, 0)));
        core.handle_failed(t0, 0, peer, true);
        assert!(!pieces_asked(&drain(&mut core, t0)).contains(&(peer, 0)));
    }

    #[test]
    fn values_that_cannot_complete_the_layer_are_gathered_once_a_second_and_the_last_at_once() {
        let t0 = Instant::now();
        let (layer, _) = layer_of(4);
        let id = layer.content_id();
        let cvs = layer.chaining_values().to_vec();
        let mut core = assembling(&layer, vec![None; 4], vec![None; 4], t0);
        core.assembly.as_mut().unwrap().running = false;
        core.start(t0, Vec::new());
        drain(&mut core, t0);
        let claims = |pieces: &[u32]| Holding {
            claimed: {
                let mut b = Bitfield::new(4);
                for &i in pieces {
                    b.set(i);
                }
                b
            },
            ..holding(id, &[])
        };
        let gathers = |actions: &[Action]| {
            actions
                .iter()
                .filter(|a| matches!(a, Action::Gather { .. }))
                .count()
        };
        // A first claim: gathered at once.
        core.handle_holding(t0, PeerId::random(), claims(&[0]));
        assert_eq!(gathers(&drain(&mut core, t0)), 1);
        let t1 = t0 + Duration::from_millis(10);
        core.handle_assembled(t1, Assembled::Learned(vec![(0, cvs[0])]));
        drain(&mut core, t1);
        // A second claim within the second, with pieces 2 and 3 known nowhere: it waits.
        let t2 = t0 + Duration::from_millis(300);
        core.handle_holding(t2, PeerId::random(), claims(&[1]));
        assert_eq!(gathers(&drain(&mut core, t2)), 0);
        let t3 = t0 + Duration::from_millis(600);
        core.handle_timeout(t3);
        assert_eq!(gathers(&drain(&mut core, t3)), 0);
        // A second after the first, it goes.
        let t4 = t0 + super::super::GATHER_EVERY;
        core.handle_timeout(t4);
        assert_eq!(gathers(&drain(&mut core, t4)), 1);
        core.handle_assembled(t4, Assembled::Learned(vec![(1, cvs[1])]));
        drain(&mut core, t4);
        // The claims that complete the layer are gathered at once.
        let t5 = t4 + Duration::from_millis(100);
        core.handle_holding(t5, PeerId::random(), claims(&[2, 3]));
        assert_eq!(gathers(&drain(&mut core, t5)), 1);
    }

    #[test]
    fn a_layer_assembled_while_a_have_round_is_out_asks_for_no_wake_up_in_the_past() {
        let t0 = Instant::now();
        let (layer, _) = layer_of(2);
        let mut core = assembling(&layer, vec![None; 2], vec![None; 2], t0);
        core.start(t0, Vec::new());
        // The first have round is out.
        assert!(
            drain(&mut core, t0)
                .iter()
                .any(|a| matches!(a, Action::AskPeers { .. }))
        );
        let t1 = t0 + Duration::from_millis(10);
        core.handle_assembled(t1, Assembled::Layer(layer));
        drain(&mut core, t1);
        // The driver sleeps until the next deadline: one in the past would wake it at once,
        // again and again, until the round ends.
        assert!(core.poll_timeout().is_some_and(|t| t > t1));
        // When the round ends, the next is due a refresh later.
        core.handle_round(t1, &[], &[], Vec::new());
        drain(&mut core, t1);
        core.handle_timeout(t1 + PEER_REFRESH);
        assert!(
            drain(&mut core, t1 + PEER_REFRESH)
                .iter()
                .any(|a| matches!(a, Action::AskPeers { .. }))
        );
    }
}
