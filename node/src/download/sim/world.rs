//! The simulation's world: nodes, links, the origin, and the event queue.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use libp2p::multihash::Multihash;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use shoal_protocol::{Bitfield, ContentId, Holding, MAX_MEMBERS, Member, PieceIndex};
use shoal_validator::{LayerBuilder, PieceLayer};

use super::views::Views;
use super::{Behaviour, Ended, Report, Scenario};
use crate::download::core::{Action, Core, End, Setup, StoreOp, Verdict};
use crate::download::members::MemberView;
use crate::download::scheduler::{self, Source};

/// Zeros for piece bytes: the simulation moves no data, only lengths (a slice of a static
/// costs nothing). Its size is the largest piece size.
static ZEROS: [u8; shoal_protocol::MAX_PIECE_SIZE_BYTES as usize] =
    [0; shoal_protocol::MAX_PIECE_SIZE_BYTES as usize];

/// The wall clock the members' heartbeats count from (milliseconds since the Unix epoch).
const WALL_MS: u64 = 1_700_000_000_000;

/// Something that happens at a virtual time.
#[derive(Debug)]
enum Ev {
    /// A node starts its download.
    Start(usize),
    /// A node's core timer may be due.
    Timer(usize),
    /// A piece reaches `to` (from a peer, or the origin), possibly with flipped bytes.
    Piece {
        to: usize,
        from: Option<usize>,
        index: PieceIndex,
        corrupt: bool,
    },
    /// A request of `to` to `peer` failed.
    Failed {
        to: usize,
        peer: usize,
        index: PieceIndex,
        busy: bool,
    },
    /// A have round of `node` ends: the answers of `asked` come in.
    Round {
        node: usize,
        asked: Vec<usize>,
        reachable: Vec<PeerId>,
    },
    /// An announcement reaches `to`.
    Announce {
        to: usize,
        from: usize,
        h: Box<Holding>,
    },
    /// The writer of `node` verified (or rejected) a piece.
    Verified {
        node: usize,
        index: PieceIndex,
        from: Option<usize>,
        ok: bool,
    },
    /// The origin run `run` sends its next piece.
    OriginNext(usize),
    /// The origin run `run` ended.
    OriginEnd(usize),
    /// `peer` finished sending a piece: an upload slot is free.
    UploadDone(usize),
    /// A node leaves.
    Leave(usize),
}

/// An event in the queue, ordered by time, then by when it was queued.
struct Queued {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One node: honest (running a core until it completes, then serving) or scripted.
struct Node {
    id: PeerId,
    script: Option<Behaviour>,
    core: Option<Core>,
    have: Bitfield,
    fetching: Bitfield,
    neighbours: Vec<usize>,
    up_free: Duration,
    down_free: Duration,
    cpu_free: Duration,
    sha_free: Duration,
    uploads: usize,
    timer_at: Option<Duration>,
    ended: Ended,
    left: bool,
    banned: BTreeSet<usize>,
    /// Live requests to peers: (piece, peer).
    requests: BTreeSet<(PieceIndex, usize)>,
    /// Pieces delivered with flipped bytes, not yet handed to the writer: (piece, sender).
    corrupt: BTreeSet<(PieceIndex, Option<usize>)>,
    from_peers: u64,
}

/// An origin run in progress.
struct Run {
    node: usize,
    next: u32,
    end: u32,
}

/// The simulated swarm.
struct World<'a> {
    sc: &'a Scenario,
    base: Instant,
    now: Duration,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    rng: StdRng,
    nodes: Vec<Node>,
    /// The nodes' member views, by node.
    views: Views,
    index: BTreeMap<PeerId, usize>,
    layer: PieceLayer,
    id: ContentId,
    origin_free: Duration,
    origin_bytes: u64,
    runs: Vec<Run>,
    rejected: u64,
    bans: Vec<(usize, usize)>,
    events: u64,
    running: usize,
    /// The first and the last start of a download.
    starts: Option<(Duration, Duration)>,
}

/// Runs `scenario` to its end (every node completed, failed or left) or its
/// [`Scenario::limit`], and reports what happened. The same scenario gives the same report.
///
/// Building the piece layer hashes the file's length of zeros once (about 0.5 s for 1 GiB).
///
/// # Panics
/// When [`Scenario::file_bytes`] is more than Shoal's largest file (1 TiB), or when the
/// thread that merges member lists cannot be started.
#[must_use]
pub fn run(scenario: &Scenario) -> Report {
    let mut w = World::new(scenario);
    while let Some(Reverse(q)) = w.queue.pop() {
        if q.at > scenario.limit || w.running == 0 {
            break;
        }
        w.now = q.at;
        w.events += 1;
        w.handle(q.ev);
    }
    w.report()
}

/// The verified layer of a file of `length` zero bytes.
fn zero_layer(length: u64) -> PieceLayer {
    let mut b = LayerBuilder::new(length).expect("the scenario's file length is at most 1 TiB");
    let id_size = shoal_protocol::piece_size_for(length);
    let count = length.div_ceil(id_size).max(1);
    for i in 0..count {
        let len = (length - i * id_size).min(id_size) as usize;
        b.add_piece(i as u32, &ZEROS[..len])
            .expect("pieces of the file's geometry");
    }
    b.finish().expect("every piece was added")
}

/// A made-up peer id (an identity multihash of random bytes), as a flooder invents.
fn made_up_peer(rng: &mut StdRng) -> PeerId {
    let mut bytes = [0u8; 32];
    rng.fill(&mut bytes);
    let mh = Multihash::wrap(0, &bytes).expect("32 bytes fit an identity multihash");
    PeerId::from_multihash(mh).expect("an identity multihash of 32 bytes is a peer id")
}

/// The graph: a ring through the honest nodes plus random edges up to about `degree` each;
/// each scripted peer connected to `degree` random honest nodes. `None`: a full mesh.
fn topology(sc: &Scenario, rng: &mut StdRng) -> Vec<Vec<usize>> {
    let (n, total) = (sc.nodes, sc.nodes + sc.adversaries.len());
    let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); total];
    let link = |a: usize, b: usize, edges: &mut Vec<BTreeSet<usize>>| {
        if a != b {
            edges[a].insert(b);
            edges[b].insert(a);
        }
    };
    match sc.degree {
        None => {
            for a in 0..total {
                for b in 0..n {
                    link(a, b, &mut edges);
                }
            }
        }
        Some(d) => {
            for a in 0..n {
                if n > 1 {
                    link(a, (a + 1) % n, &mut edges);
                }
                for _ in 0..(d / 2).saturating_sub(1) {
                    let b = rng.random_range(0..n);
                    link(a, b, &mut edges);
                }
            }
            for a in n..total {
                let mut honest: Vec<usize> = (0..n).collect();
                honest.shuffle(rng);
                for b in honest.into_iter().take(d) {
                    link(a, b, &mut edges);
                }
            }
        }
    }
    edges.into_iter().map(|e| e.into_iter().collect()).collect()
}

impl<'a> World<'a> {
    fn new(sc: &'a Scenario) -> Self {
        // The one reading of the clock: virtual time counts from here.
        let base = Instant::now();
        let mut rng = StdRng::seed_from_u64(sc.seed);
        let layer = zero_layer(sc.file_bytes);
        let id = layer.content_id();
        let n = id.piece_count();
        let neighbours = topology(sc, &mut rng);
        let total = sc.nodes + sc.adversaries.len();
        let mut nodes = Vec::with_capacity(total);
        let views = Views::new(total);
        let mut index = BTreeMap::new();
        for (i, neighbours) in neighbours.into_iter().enumerate() {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&sc.seed.to_le_bytes());
            key[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            let peer = libp2p::identity::Keypair::ed25519_from_bytes(key)
                .expect("32 bytes are an ed25519 secret key")
                .public()
                .to_peer_id();
            index.insert(peer, i);
            let script = sc.adversaries.get(i.wrapping_sub(sc.nodes)).copied();
            let seed = i < sc.seeds;
            // A seed serves the file with no download running: its view states only itself.
            views.set(
                i,
                seed.then(|| {
                    let mut v = MemberView::new(peer, id.hash(), base, WALL_MS);
                    v.idle(n);
                    v
                }),
            );
            nodes.push(Node {
                id: peer,
                script,
                core: None,
                have: if seed {
                    Bitfield::full(n)
                } else {
                    Bitfield::new(n)
                },
                fetching: Bitfield::new(n),
                neighbours,
                up_free: Duration::ZERO,
                down_free: Duration::ZERO,
                cpu_free: Duration::ZERO,
                sha_free: Duration::ZERO,
                uploads: 0,
                timer_at: None,
                ended: if seed {
                    Ended::Completed(Duration::ZERO)
                } else {
                    Ended::Running
                },
                left: false,
                banned: BTreeSet::new(),
                requests: BTreeSet::new(),
                corrupt: BTreeSet::new(),
                from_peers: 0,
            });
        }
        let mut w = Self {
            sc,
            base,
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            seq: 0,
            rng,
            nodes,
            views,
            index,
            layer,
            id,
            origin_free: Duration::ZERO,
            origin_bytes: 0,
            runs: Vec::new(),
            rejected: 0,
            bans: Vec::new(),
            events: 0,
            running: sc.nodes.saturating_sub(sc.seeds),
            starts: None,
        };
        for i in sc.seeds..sc.nodes {
            let at = sc.start_within.mul_f64(w.rng.random::<f64>());
            w.push(at, Ev::Start(i));
        }
        for &(i, at) in &sc.leave {
            w.push(at, Ev::Leave(i));
        }
        w
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn piece_len(&self, index: PieceIndex) -> u64 {
        let size = self.id.piece_size();
        (self.id.length() - u64::from(index) * size).min(size)
    }

    /// Handles one event and carries out what the core it reached asks for.
    fn handle(&mut self, ev: Ev) {
        let now = self.instant();
        let touched = match ev {
            Ev::Start(i) => {
                self.start(i);
                i
            }
            Ev::Timer(i) => {
                if self.nodes[i].timer_at == Some(self.now) {
                    self.nodes[i].timer_at = None;
                    if let Some(c) = &mut self.nodes[i].core {
                        c.handle_timeout(now);
                    }
                }
                i
            }
            Ev::Piece {
                to,
                from,
                index,
                corrupt,
            } => {
                self.piece_arrives(to, from, index, corrupt);
                to
            }
            Ev::Failed {
                to,
                peer,
                index,
                busy,
            } => {
                let p = self.nodes[peer].id;
                if self.nodes[to].requests.remove(&(index, peer))
                    && let Some(c) = &mut self.nodes[to].core
                {
                    c.handle_failed(now, index, p, busy);
                }
                to
            }
            Ev::Round {
                node,
                asked,
                reachable,
            } => {
                self.round_ends(node, &asked, &reachable);
                node
            }
            Ev::Announce { to, from, h } => {
                let p = self.nodes[from].id;
                let n = &mut self.nodes[to];
                if !n.banned.contains(&from)
                    && let Some(c) = &mut n.core
                {
                    c.handle_holding(now, p, *h);
                }
                to
            }
            Ev::Verified {
                node,
                index,
                from,
                ok,
            } => {
                self.verified(node, index, from, ok);
                node
            }
            Ev::OriginNext(run) => {
                self.origin_next(run);
                return;
            }
            Ev::OriginEnd(run) => {
                let node = self.runs[run].node;
                if let Some(c) = &mut self.nodes[node].core {
                    c.handle_origin_end(now, Ok(()), Some(true));
                }
                node
            }
            Ev::UploadDone(peer) => {
                let n = &mut self.nodes[peer];
                n.uploads = n.uploads.saturating_sub(1);
                return;
            }
            Ev::Leave(i) => {
                let n = &mut self.nodes[i];
                n.left = true;
                if n.core.take().is_some() {
                    n.ended = Ended::Left;
                    self.running -= 1;
                }
                return;
            }
        };
        self.drain(touched);
    }

    /// Node `i` starts: its core, with the verified layer and no peers known yet (its first
    /// have round goes out at once).
    fn start(&mut self, i: usize) {
        if self.nodes[i].left {
            return;
        }
        let (first, _) = self.starts.unwrap_or((self.now, self.now));
        self.starts = Some((first, self.now));
        let now = self.instant();
        let me = self.nodes[i].id;
        let n = self.id.piece_count();
        let mut core = Core::new(
            Setup {
                me,
                piece_size: self.id.piece_size(),
                piece_count: n,
                layer: Some(self.layer.clone()),
                assembly: None,
                kept: Bitfield::new(n),
                claimed: false,
                from_peers: false,
                never_origin: false,
                use_peers: true,
                swarm: !self.nodes[i].neighbours.is_empty(),
                wait_until: now,
                origin_wait: None,
                scheduler: scheduler::Config::default(),
            },
            now,
        );
        core.start(now, Vec::new());
        self.views.set(
            i,
            Some(MemberView::new(
                me,
                self.id.hash(),
                now,
                WALL_MS + self.now.as_millis() as u64,
            )),
        );
        self.nodes[i].core = Some(core);
    }
}

impl World<'_> {
    /// Carries out node `i`'s actions until its core has none, then takes its end or
    /// re-arms its timer.
    fn drain(&mut self, i: usize) {
        loop {
            let Some(action) = self.nodes[i].core.as_mut().and_then(Core::poll_action) else {
                break;
            };
            self.execute(i, action);
        }
        let Some(core) = &mut self.nodes[i].core else {
            return;
        };
        if let Some(end) = core.poll_end() {
            self.end(i, end);
            return;
        }
        let due = core.poll_timeout().map(|t| t.duration_since(self.base));
        if let Some(at) = due
            && self.nodes[i].timer_at != Some(at.max(self.now))
        {
            let at = at.max(self.now);
            self.nodes[i].timer_at = Some(at);
            self.push(at, Ev::Timer(i));
        }
    }

    /// Node `i`'s core ended.
    fn end(&mut self, i: usize, end: End) {
        let n = self.id.piece_count();
        let node = &mut self.nodes[i];
        node.core = None;
        node.timer_at = None;
        self.running -= 1;
        node.ended = match end {
            End::Done => {
                // The file is complete once the SHA-256 of its last piece is hashed too.
                if let Some(v) = self.views.get(i).as_mut() {
                    v.idle(n);
                }
                node.fetching = Bitfield::new(n);
                Ended::Completed(self.now.max(node.sha_free))
            }
            other => Ended::Failed(format!("{other:?}")),
        };
    }

    /// Carries out one action of node `i`'s core.
    fn execute(&mut self, i: usize, action: Action) {
        let now = self.instant();
        match action {
            Action::RequestPiece { peer, index, .. } => {
                if let Some(&j) = self.index.get(&peer) {
                    self.request(i, j, index);
                }
            }
            Action::CancelRequest { peer, index } => {
                if let Some(&j) = self.index.get(&peer) {
                    self.nodes[i].requests.remove(&(index, j));
                }
            }
            Action::FetchOrigin { start, end } => {
                self.runs.push(Run {
                    node: i,
                    next: start,
                    end,
                });
                let at = self.now + self.sc.origin_rtt;
                self.push(at, Ev::OriginNext(self.runs.len() - 1));
            }
            Action::AskPeers { busy, .. } => self.ask_peers(i, &busy),
            Action::Announce { to, .. } => {
                let h = self.holding(i);
                let at = self.now + self.sc.lan_latency;
                for peer in to {
                    if let (Some(&j), Some(h)) = (self.index.get(&peer), &h)
                        && !self.nodes[j].left
                    {
                        self.push(
                            at,
                            Ev::Announce {
                                to: j,
                                from: i,
                                h: Box::new(h.clone()),
                            },
                        );
                    }
                }
            }
            Action::Write { index, source, .. } => self.write(i, index, source),
            Action::MemberTick {
                done,
                origin_now,
                proven_only,
                lowest,
                ..
            } => {
                let pieces = self.id.piece_count();
                let view = self.views.get(i).as_mut().map(|v| {
                    v.set_self(done, origin_now, now);
                    (
                        v.fetchers_cached(pieces, now, proven_only, lowest),
                        v.grew_at(),
                    )
                });
                if let Some(c) = &mut self.nodes[i].core {
                    c.handle_members(now, view);
                }
            }
            Action::Ban { peer, .. } => {
                if let Some(&j) = self.index.get(&peer)
                    && self.nodes[i].banned.insert(j)
                {
                    self.bans.push((i, j));
                }
            }
            Action::Store(op) => self.store(i, op),
            Action::PieceDone { bytes, peer } => {
                if peer.is_some() {
                    self.nodes[i].from_peers += bytes;
                }
            }
            Action::Rejected => self.rejected += 1,
            // The layer is known from the start: nothing is gathered or assembled.
            Action::Gather { .. } | Action::SetLayer { .. } | Action::Forget(_) => {}
        }
    }

    /// What the store of node `i` serves and reports.
    fn store(&mut self, i: usize, op: StoreOp) {
        let now = self.instant();
        let node = &mut self.nodes[i];
        match op {
            StoreOp::SetFetching(_, f) => node.fetching = f,
            StoreOp::MarkVerified(_, index) => node.have.set(index),
            StoreOp::MergeMembers(_, peer, members) => self.views.merge(i, peer, members, now),
            StoreOp::ForgetMember(_, peer) => {
                if let Some(v) = self.views.get(i).as_mut() {
                    v.forget(&peer);
                }
            }
            StoreOp::AddClaim(..) | StoreOp::SetRelayed(..) => {}
        }
    }

    /// Node `i`'s answer to a have query, as its store gives it: `None` when it holds and
    /// fetches nothing of the content.
    fn holding(&mut self, i: usize) -> Option<Holding> {
        let now = self.instant();
        let n = self.id.piece_count();
        let node = &self.nodes[i];
        if node.left {
            return None;
        }
        let own = |done: u32, origin: bool| Member {
            peer_id: Bytes::from(node.id.to_bytes()),
            heartbeat: WALL_MS + self.now.as_millis() as u64,
            done,
            origin,
        };
        // Each field built once: an answer is made for every have round and announcement.
        let holding = |have, fetching, chaining, members| Holding {
            content_id: self.id,
            have,
            fetching,
            claimed: Bitfield::new(n),
            chaining,
            members,
        };
        let h = match node.script {
            Some(Behaviour::MemberFlood) => {
                let mut members = vec![own(0, false)];
                let heartbeat = WALL_MS + self.now.as_millis() as u64;
                for _ in 1..MAX_MEMBERS {
                    let peer = made_up_peer(&mut self.rng);
                    members.push(Member {
                        peer_id: Bytes::from(peer.to_bytes()),
                        heartbeat,
                        done: self.rng.random_range(1..n.max(2)),
                        origin: true,
                    });
                }
                holding(
                    Bitfield::new(n),
                    Bitfield::new(n),
                    Bitfield::new(n),
                    members,
                )
            }
            Some(_) => holding(
                Bitfield::full(n),
                Bitfield::new(n),
                Bitfield::full(n),
                vec![own(n, false)],
            ),
            None => {
                let members = self.views.get(i).as_ref()?.sample_with(now, &mut self.rng);
                holding(
                    node.have.clone(),
                    node.fetching.clone(),
                    Bitfield::full(n),
                    members,
                )
            }
        };
        Some(h)
    }

    /// A have round of node `i`: at most the poll bound of its connected peers, those with
    /// requests in flight first; the answers come back one round trip later.
    fn ask_peers(&mut self, i: usize, busy: &HashSet<PeerId>) {
        let node = &self.nodes[i];
        let reachable: Vec<PeerId> = node
            .neighbours
            .iter()
            .filter(|j| !self.nodes[**j].left && !node.banned.contains(j))
            .map(|j| self.nodes[*j].id)
            .collect();
        let asked =
            crate::download::peers::poll_sample_with(reachable.clone(), busy, &mut self.rng);
        let asked = asked
            .iter()
            .filter_map(|p| self.index.get(p).copied())
            .collect();
        let at = self.now + 2 * self.sc.lan_latency;
        self.push(
            at,
            Ev::Round {
                node: i,
                asked,
                reachable,
            },
        );
    }

    /// The answers of a have round of node `i` come in.
    fn round_ends(&mut self, i: usize, asked: &[usize], reachable: &[PeerId]) {
        if self.nodes[i].core.is_none() {
            return;
        }
        let mut answers = Vec::new();
        for &j in asked {
            if self.nodes[i].banned.contains(&j) {
                continue;
            }
            if let Some(h) = self.holding(j) {
                answers.push((self.nodes[j].id, h));
            }
        }
        let asked: Vec<PeerId> = asked.iter().map(|j| self.nodes[*j].id).collect();
        let now = self.instant();
        if let Some(c) = &mut self.nodes[i].core {
            c.handle_round(now, &asked, reachable, answers);
        }
    }

    /// Node `i` asks peer `j` for a piece: `j` answers at once when it cannot serve it, else
    /// sends it through its uplink and `i`'s downlink.
    fn request(&mut self, i: usize, j: usize, index: PieceIndex) {
        self.nodes[i].requests.insert((index, j));
        let lat = self.sc.lan_latency;
        let fail = |busy| Ev::Failed {
            to: i,
            peer: j,
            index,
            busy,
        };
        let peer = &self.nodes[j];
        if peer.left {
            self.push(self.now + lat, fail(false));
            return;
        }
        let corrupt = match peer.script {
            Some(Behaviour::FlipsBytes) => true,
            Some(Behaviour::BusyForever) => {
                self.push(self.now + 2 * lat, fail(true));
                return;
            }
            Some(Behaviour::FalseHaves | Behaviour::MemberFlood) => {
                self.push(self.now + 2 * lat, fail(false));
                return;
            }
            None if !peer.have.get(index) => {
                self.push(self.now + 2 * lat, fail(false));
                return;
            }
            None if peer.uploads >= self.sc.upload_slots => {
                self.push(self.now + 2 * lat, fail(true));
                return;
            }
            None => false,
        };
        let size = self.piece_len(index) as f64;
        let (up, down) = (self.sc.rates(j).up, self.sc.rates(i).down);
        let send =
            Duration::from_secs_f64(size / up + size * self.sc.cpu.encrypt_ns_per_byte * 1e-9);
        let start = (self.now + lat).max(self.nodes[j].up_free);
        let sent = start + send;
        self.nodes[j].up_free = sent;
        self.nodes[j].uploads += 1;
        let recv_start = start.max(self.nodes[i].down_free);
        let received = sent.max(recv_start + Duration::from_secs_f64(size / down));
        self.nodes[i].down_free = received;
        self.push(sent, Ev::UploadDone(j));
        self.push(
            received + lat,
            Ev::Piece {
                to: i,
                from: Some(j),
                index,
                corrupt,
            },
        );
    }

    /// A piece reaches node `i`: a peer's only while the request is live and the peer still
    /// connected.
    fn piece_arrives(&mut self, i: usize, from: Option<usize>, index: PieceIndex, corrupt: bool) {
        let now = self.instant();
        let source = match from {
            Some(j) => {
                if !self.nodes[i].requests.remove(&(index, j)) {
                    return;
                }
                if self.nodes[j].left {
                    let p = self.nodes[j].id;
                    if let Some(c) = &mut self.nodes[i].core {
                        c.handle_failed(now, index, p, false);
                    }
                    return;
                }
                Source::Peer(self.nodes[j].id)
            }
            None => Source::Origin,
        };
        if corrupt {
            self.nodes[i].corrupt.insert((index, from));
        }
        let len = self.piece_len(index) as usize;
        if let Some(c) = &mut self.nodes[i].core {
            c.handle_piece(now, index, source, Bytes::from_static(&ZEROS[..len]));
        }
    }

    /// The writer of node `i` takes a piece: decrypted (from a peer) and verified on its CPU.
    fn write(&mut self, i: usize, index: PieceIndex, source: Source) {
        let from = match source {
            Source::Peer(p) => self.index.get(&p).copied(),
            Source::Origin => None,
        };
        let ok = !self.nodes[i].corrupt.remove(&(index, from));
        let size = self.piece_len(index) as f64;
        let cpu = self.sc.cpu;
        let mut ns = cpu.verify_ns_per_byte;
        if from.is_some() {
            ns += cpu.encrypt_ns_per_byte;
        }
        let node = &mut self.nodes[i];
        let at = self.now.max(node.cpu_free) + Duration::from_secs_f64(size * ns * 1e-9);
        node.cpu_free = at;
        self.push(
            at,
            Ev::Verified {
                node: i,
                index,
                from,
                ok,
            },
        );
    }

    /// Node `i`'s writer reports a piece; a verified one goes on to the SHA-256 core.
    fn verified(&mut self, i: usize, index: PieceIndex, from: Option<usize>, ok: bool) {
        let now = self.instant();
        let size = self.piece_len(index);
        let sha = Duration::from_secs_f64(size as f64 * self.sc.cpu.sha256_ns_per_byte * 1e-9);
        let source = match from {
            Some(j) => Source::Peer(self.nodes[j].id),
            None => Source::Origin,
        };
        let node = &mut self.nodes[i];
        if ok {
            node.sha_free = self.now.max(node.sha_free) + sha;
        }
        if let Some(c) = &mut node.core {
            c.handle_verified(
                now,
                Verdict {
                    index,
                    source,
                    bytes: size,
                    piece: None,
                    result: if ok {
                        Ok(())
                    } else {
                        Err("the bytes were flipped".into())
                    },
                    cv: None,
                    after_layer: false,
                },
            );
        }
    }

    /// Origin run `r` sends its next piece over the origin link and the node's downlink.
    fn origin_next(&mut self, r: usize) {
        let (i, index, end) = (self.runs[r].node, self.runs[r].next, self.runs[r].end);
        if self.nodes[i].core.is_none() {
            return;
        }
        let size = self.piece_len(index);
        let down = self.sc.rates(i).down;
        let start = self.now.max(self.origin_free);
        self.origin_free = start + Duration::from_secs_f64(size as f64 / self.sc.origin_rate);
        self.origin_bytes += size;
        let node = &mut self.nodes[i];
        let received = self
            .origin_free
            .max(start.max(node.down_free) + Duration::from_secs_f64(size as f64 / down));
        node.down_free = received;
        self.push(
            received,
            Ev::Piece {
                to: i,
                from: None,
                index,
                corrupt: false,
            },
        );
        self.runs[r].next += 1;
        if index + 1 < end {
            self.push(received, Ev::OriginNext(r));
        } else {
            self.push(received, Ev::OriginEnd(r));
        }
    }

    fn report(self) -> Report {
        let n = self.sc.nodes;
        Report {
            file_bytes: self.sc.file_bytes,
            origin_bytes: self.origin_bytes,
            nodes: self.nodes[..n].iter().map(|x| x.ended.clone()).collect(),
            bytes_from_peers: self.nodes[..n].iter().map(|x| x.from_peers).collect(),
            rejected: self.rejected,
            bans: self.bans,
            limit: self.starts.map_or(Duration::ZERO, |(first, last)| {
                self.sc.physical_limit(first, last)
            }),
            events: self.events,
            end: self.now,
        }
    }
}
