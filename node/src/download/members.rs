//! Swarm members: the nodes fetching one content, as this node knows them.
//!
//! Every have answer (and announcement) carries up to [`MAX_MEMBERS`] entries of the sender's
//! view, itself first, so that membership spreads from peer to peer like a rumour: within a few
//! have rounds every node of a connected swarm knows about the same set of members, also those it
//! is not connected to. The scheduler shares out the pieces that need the origin among the
//! members that use the origin ([`MemberView::fetchers`]), so that a piece crosses the WAN once
//! even in a swarm where no node sees every other (see `docs/scheduling.md`).
//!
//! Each member states its own heartbeat (its clock in milliseconds); a relayed entry replaces
//! what is known only when its heartbeat is higher, the way gossip membership protocols keep
//! stale rumours from reviving a node (van Renesse, Minsky and Hayden, "A Gossip-Style Failure
//! Detection Service", 1998). A member whose heartbeat has not risen for [`MEMBER_TIMEOUT`] is
//! taken as gone; one whose count of pieces has not risen for [`MEMBER_STALL`] while it lacks
//! some is taken as stalled. Neither takes a share then.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use indexmap::IndexMap;
use libp2p::PeerId;
use shoal_protocol::{MAX_MEMBERS, Member};

/// How long a member's heartbeat may stay the same before the member is taken as gone: 10 s.
/// Entries reach a node through up to a few relays, each of which includes a given entry in
/// about every answer while the swarm has at most [`MAX_MEMBERS`] members.
pub(crate) const MEMBER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a member that lacks pieces may stay without a new one before it is taken as
/// stalled (its share goes to the others): 20 s, the scheduler's default patience for pieces
/// a peer fetches.
pub(crate) const MEMBER_STALL: Duration = Duration::from_secs(20);
/// How long an entry that is gone stays known (so that a relayed copy of its last heartbeat
/// does not bring it back): 60 s.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// How often entries gone for [`FORGET_AFTER`] are dropped: a walk over every entry, not
/// taken on every merge (an entry may stay up to this much longer).
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// How far ahead of this node's clock a relayed heartbeat may be: 10 min (clocks of
/// machines on one LAN differ by less).
pub(crate) const MAX_SKEW: Duration = Duration::from_secs(600);
/// The most members one view keeps; further ones are ignored.
const MAX_KNOWN: usize = 4096;

/// What is known of one other member.
#[derive(Debug, Clone)]
struct Known {
    heartbeat: u64,
    done: u32,
    origin: bool,
    /// When its heartbeat last rose here.
    seen: Instant,
    /// When its count of pieces last rose here.
    progressed: Instant,
    /// A direct peer that stopped answering: gone until a higher heartbeat comes.
    gone: bool,
    /// This node heard from the member itself (its own entry, first in its own answer or
    /// announcement, over a connection that authenticates it): not made up by a relayer.
    proven: bool,
    /// Its seed for the shares of this content ([`fetcher_seed`]).
    seed: u64,
}

/// The longest canonical peer id, in bytes: an identity multihash of a public key of at most
/// 42 bytes (longer keys are hashed to a SHA-256 multihash of 34 bytes), as libp2p encodes it.
const MAX_ID_BYTES: usize = 44;

/// A canonical peer id's bytes, held inline: a relayed entry is looked up by the bytes it
/// carries, and comparing them must not reach for another allocation (a view of a thousand
/// members is looked up a thousand times a second).
#[derive(Clone, Copy, PartialEq, Eq)]
struct IdBytes {
    len: u8,
    bytes: [u8; MAX_ID_BYTES],
}

impl IdBytes {
    /// `id`, when it is at most [`MAX_ID_BYTES`] long.
    fn new(id: &[u8]) -> Option<Self> {
        let mut bytes = [0; MAX_ID_BYTES];
        bytes.get_mut(..id.len())?.copy_from_slice(id);
        Some(Self {
            len: u8::try_from(id.len()).ok()?,
            bytes,
        })
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for IdBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdBytes({} bytes)", self.len)
    }
}

// Hashed as the slice it holds, so that a lookup by `&[u8]` finds it (`Borrow`'s contract).
impl std::hash::Hash for IdBytes {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for IdBytes {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

/// The known members, by their peer id bytes (canonical), in the order they were learned
/// of: an entry a peer relays is found by the bytes it carries, with one hash and without
/// parsing them again; the members are walked in order and picked by index. The hasher is
/// keyed at random per view (std's `RandomState`), since peers choose the ids; the order does
/// not depend on it, so a seeded simulation repeats exactly. The parsed peer ids (80 bytes
/// each, needed only to list the fetchers) are kept apart, at the same positions, so that a
/// lookup reads less memory.
#[derive(Debug, Clone, Default)]
struct Entries(IndexMap<IdBytes, Known>, Vec<PeerId>);

impl Entries {
    fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds a member that is not known yet.
    fn insert(&mut self, key: IdBytes, k: Known, peer: PeerId) {
        self.0.insert(key, k);
        self.1.push(peer);
    }

    /// Keeps the members for which `keep` holds, in order.
    fn retain(&mut self, mut keep: impl FnMut(&Known) -> bool) {
        let kept: Vec<bool> = self.0.values().map(&mut keep).collect();
        let mut at = kept.iter();
        self.0.retain(|_, _| at.next().copied().unwrap_or(false));
        let mut at = kept.iter();
        self.1.retain(|_| at.next().copied().unwrap_or(false));
    }

    fn clear(&mut self) {
        self.0.clear();
        self.1.clear();
    }

    fn iter(&self) -> indexmap::map::Values<'_, IdBytes, Known> {
        self.0.values()
    }
}

/// This node's view of the members fetching one content.
#[derive(Debug, Clone)]
pub(crate) struct MemberView {
    me: PeerId,
    me_bytes: Bytes,
    /// The content's hash, which members' seeds are drawn from ([`fetcher_seed`]).
    content: [u8; 32],
    /// This node's seed.
    my_seed: u64,
    done: u32,
    origin: bool,
    /// The heartbeat at `base`, in milliseconds since the Unix epoch.
    base_ms: u64,
    base: Instant,
    known: Entries,
    /// When a member that uses the origin was last learned of (the fetchers grew).
    grew_at: Instant,
    /// When entries gone for [`FORGET_AFTER`] were last dropped.
    pruned_at: Instant,
    /// The fetchers as last computed by [`Self::fetchers_cached`], while they hold.
    cache: Option<FetcherCache>,
}

/// The other members that take a share, as last computed, and until when they stay the same
/// unless an entry changes: time alone only takes members out (a member's heartbeat goes
/// stale, or its progress stalls), so the list holds until the first of those times.
#[derive(Debug, Clone)]
struct FetcherCache {
    pieces: u32,
    proven_only: bool,
    lowest: usize,
    others: Arc<[(PeerId, u64)]>,
    valid_until: Instant,
    /// What the last call returned, and whether this node used the origin then.
    last: Option<(Fetchers, bool)>,
}

/// The fetchers of a member view at one tick, for [`crate::download`]'s core.
#[derive(Debug, Clone)]
pub(crate) struct Fetchers {
    /// The members that take a share ([`MemberView::fetchers`]), each with its seed
    /// ([`fetcher_seed`]), sorted by (seed, id): the order the scheduler ranks them in.
    pub(crate) ids: Arc<[(PeerId, u64)]>,
    /// Equal for two ticks only when `ids` are the same list (unique within the process).
    pub(crate) generation: u64,
}

/// Whether member `k` is heard from: not gone, and its heartbeat rose within
/// [`MEMBER_TIMEOUT`].
fn alive(k: &Known, now: Instant) -> bool {
    !k.gone && now.saturating_duration_since(k.seen) < MEMBER_TIMEOUT
}

/// Whether member `k` takes a share at `now` ([`MemberView::fetchers`]).
fn is_fetcher(k: &Known, pieces: u32, now: Instant, proven_only: bool) -> bool {
    k.origin
        && (!proven_only || (k.proven && k.done > 0))
        && alive(k, now)
        && (k.done >= pieces || now.saturating_duration_since(k.progressed) < MEMBER_STALL)
}

/// The source of [`Fetchers::generation`].
static GENERATION: AtomicU64 = AtomicU64::new(1);

impl Fetchers {
    /// `ids` (sorted by seed and id) with a generation of their own.
    #[must_use]
    #[cfg(test)]
    pub(crate) fn new(ids: Vec<(PeerId, u64)>) -> Self {
        Self {
            ids: ids.into(),
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl MemberView {
    /// A view of the members fetching the content with hash `content`, holding only this
    /// node, `me`, with no piece and not using the origin; `wall_ms` is the wall clock at
    /// `now` (milliseconds since the Unix epoch), which heartbeats count from, so that they
    /// keep rising across restarts.
    #[must_use]
    pub(crate) fn new(me: PeerId, content: &[u8; 32], now: Instant, wall_ms: u64) -> Self {
        let base_ms = wall_ms;
        Self {
            me,
            me_bytes: Bytes::from(me.to_bytes()),
            content: *content,
            my_seed: fetcher_seed(&me, content),
            done: 0,
            origin: false,
            base_ms,
            base: now,
            known: Entries::default(),
            grew_at: now,
            pruned_at: now,
            cache: None,
        }
    }

    /// The cached fetchers must be computed again (the last list stays, to compare with).
    fn invalidate(&mut self) {
        if let Some(c) = &mut self.cache {
            c.valid_until = self.base;
        }
    }

    /// This node's heartbeat at `now`, in milliseconds.
    fn heartbeat(&self, now: Instant) -> u64 {
        let ms = u64::try_from(now.saturating_duration_since(self.base).as_millis()).unwrap_or(0);
        self.base_ms.saturating_add(ms)
    }

    /// Sets what this node states of itself: `done` pieces held, and whether it uses the
    /// origin for this content now.
    pub(crate) fn set_self(&mut self, done: u32, origin: bool, now: Instant) {
        if origin && !self.origin {
            self.grew_at = now;
        }
        self.done = done;
        self.origin = origin;
    }

    /// No download of the content runs here any more: states `done` pieces (what the node
    /// holds and serves) and forgets the other members, which only a download refreshes.
    pub(crate) fn idle(&mut self, done: u32) {
        self.done = done;
        self.known.clear();
        self.invalidate();
    }

    /// Takes in the entries peer `from` sent. The first entry must be `from`'s own (the
    /// connection authenticates it), else the whole list is ignored; it replaces what is
    /// known of `from` whatever its heartbeat. A relayed entry replaces what is known only
    /// with a higher heartbeat, and one more than [`MAX_SKEW`] ahead of this node's clock is
    /// skipped (so a made-up heartbeat cannot freeze a member's own out for long). Entries of
    /// this node and entries that do not parse are skipped.
    pub(crate) fn merge(&mut self, from: &PeerId, members: &[Member], now: Instant) {
        let from_bytes = from.to_bytes();
        let own_first = members
            .first()
            .is_some_and(|m| m.peer_id.as_ref() == from_bytes.as_slice());
        if !own_first {
            return;
        }
        let skew_ms = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        let ceiling = self.heartbeat(now).saturating_add(skew_ms);
        for (i, m) in members.iter().enumerate() {
            let direct = i == 0;
            let id = m.peer_id.as_ref();
            if id == self.me_bytes.as_ref()
                || (i > 0 && id == from_bytes.as_slice())
                || (!direct && m.heartbeat > ceiling)
            {
                continue;
            }
            self.merge_entry(m, direct, now);
        }
        if now.saturating_duration_since(self.pruned_at) >= PRUNE_EVERY {
            self.pruned_at = now;
            self.known
                .retain(|k| now.saturating_duration_since(k.seen) < FORGET_AFTER);
        }
    }

    /// Takes in one entry of a peer's list (`direct`: the peer's own).
    fn merge_entry(&mut self, m: &Member, direct: bool, now: Instant) {
        let cached = self.cache.as_ref().map(|c| (c.pieces, c.proven_only));
        let counts = |k: &Known| cached.map(|(p, po)| is_fetcher(k, p, now, po));
        let len = self.known.len();
        match self.known.0.get_mut(m.peer_id.as_ref()) {
            Some(k) => {
                if m.heartbeat <= k.heartbeat && !(direct && m.heartbeat != k.heartbeat) {
                    return;
                }
                let before = counts(k);
                if m.origin && (!k.origin || k.gone) {
                    self.grew_at = now;
                }
                k.heartbeat = m.heartbeat;
                k.seen = now;
                if m.done > k.done {
                    k.progressed = now;
                }
                k.done = m.done;
                k.origin = m.origin;
                k.gone = false;
                k.proven |= direct;
                if counts(k) != before {
                    self.invalidate();
                }
            }
            None if len < MAX_KNOWN => {
                // A new member: its id must parse, and be in its one canonical encoding (the
                // key it is found by from then on).
                let Ok(peer) = PeerId::from_bytes(&m.peer_id) else {
                    return;
                };
                if peer.to_bytes() != m.peer_id.as_ref() {
                    return;
                }
                let Some(key) = IdBytes::new(&m.peer_id) else {
                    return;
                };
                if m.origin {
                    self.grew_at = now;
                }
                let k = Known {
                    heartbeat: m.heartbeat,
                    done: m.done,
                    origin: m.origin,
                    seen: now,
                    progressed: now,
                    gone: false,
                    proven: direct,
                    seed: fetcher_seed(&peer, &self.content),
                };
                if counts(&k) == Some(true) {
                    self.invalidate();
                }
                self.known.insert(key, k, peer);
            }
            None => {}
        }
    }

    /// Marks `peer` as gone (a direct peer that stopped answering), until an entry with a
    /// higher heartbeat than the last one known arrives.
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        if let Some(k) = self.known.0.get_mut(peer.to_bytes().as_slice())
            && !std::mem::replace(&mut k.gone, true)
        {
            self.invalidate();
        }
    }

    /// The entries to send a peer: this node first, then up to [`MAX_MEMBERS`] − 1 other live
    /// members picked at random (over successive answers, every member is passed on).
    #[must_use]
    pub(crate) fn sample(&self, now: Instant) -> Vec<Member> {
        self.sample_with(now, &mut rand::rng())
    }

    /// [`Self::sample`] with the members picked by `rng` (seeded in the simulator): the live
    /// members that follow a random one in the view's order, up to [`MAX_MEMBERS`] − 1 of
    /// them (each member is as likely to be sent as any other, and the view is read in one
    /// stretch rather than at scattered places).
    #[must_use]
    pub(crate) fn sample_with(&self, now: Instant, rng: &mut impl rand::Rng) -> Vec<Member> {
        let want = MAX_MEMBERS - 1;
        let n = self.known.len();
        let mut out = Vec::with_capacity(MAX_MEMBERS.min(n + 1));
        out.push(Member {
            peer_id: self.me_bytes.clone(),
            heartbeat: self.heartbeat(now),
            done: self.done,
            origin: self.origin,
        });
        if n == 0 {
            return out;
        }
        let start = rng.random_range(0..n);
        let (head, tail) = self.known.0.as_slice().split_at(start);
        out.extend(
            tail.iter()
                .chain(head)
                .filter(|(_, k)| alive(k, now))
                .take(want)
                .map(|(id, k)| Member {
                    peer_id: Bytes::copy_from_slice(id.as_slice()),
                    heartbeat: k.heartbeat,
                    done: k.done,
                    origin: k.origin,
                }),
        );
        out
    }

    /// The other members that take a share at `now` with their seeds, the `lowest` of them
    /// by (seed, id) and in that order, and the first time one of those stops counting by
    /// time alone (its heartbeat goes stale, or it stalls), at most [`FORGET_AFTER`] from
    /// now. (Time only takes members out, so a member beyond the `lowest` that goes stale
    /// changes nothing.)
    fn other_fetchers(
        &self,
        pieces: u32,
        now: Instant,
        proven_only: bool,
        lowest: usize,
    ) -> (Vec<(PeerId, u64)>, Instant) {
        let (entries, peers) = (self.known.0.as_slice(), &self.known.1);
        // (seed, position): small to select and sort; ids are compared only on equal seeds.
        let mut found: Vec<(u64, usize)> = entries
            .values()
            .enumerate()
            .filter(|(_, k)| is_fetcher(k, pieces, now, proven_only))
            .map(|(i, k)| (k.seed, i))
            .collect();
        let order = |a: &(u64, usize), b: &(u64, usize)| {
            a.0.cmp(&b.0).then_with(|| peers[a.1].cmp(&peers[b.1]))
        };
        if found.len() > lowest {
            if lowest == 0 {
                found.clear();
            } else {
                found.select_nth_unstable_by(lowest - 1, order);
                found.truncate(lowest);
            }
        }
        found.sort_unstable_by(order);
        let mut until = now + FORGET_AFTER;
        let out = found
            .into_iter()
            .map(|(_, i)| {
                let k = &entries[i];
                let stale = k.seen + MEMBER_TIMEOUT;
                until = until.min(if k.done >= pieces {
                    stale
                } else {
                    stale.min(k.progressed + MEMBER_STALL)
                });
                (peers[i], k.seed)
            })
            .collect();
        (out, until)
    }

    /// The members that take a share of the pieces that need the origin, sorted: those that
    /// use the origin, are alive, and have not stalled (a member with all `pieces` counts
    /// however long ago it last progressed); with `proven_only` (after a lapse of the shares:
    /// relayed entries may be made up), only those this node heard from directly that hold
    /// some piece by now. This node is among them when it uses the origin.
    #[must_use]
    pub(crate) fn fetchers(&self, pieces: u32, now: Instant, proven_only: bool) -> Vec<PeerId> {
        let (others, _) = self.other_fetchers(pieces, now, proven_only, usize::MAX);
        let mut out: Vec<PeerId> = others.into_iter().map(|(p, _)| p).collect();
        if self.origin {
            out.push(self.me);
        }
        out.sort_unstable();
        out
    }

    /// [`Self::fetchers`] with their seeds, in (seed, id) order: the other members with the
    /// `lowest` seeds, and this node when it uses the origin (so the first `lowest` are
    /// exactly those of the whole list). Computed again only when an entry changed in a way
    /// that matters, when `pieces`, `proven_only` or `lowest` differ from the last call, or
    /// when time took one of them out; with a generation that changes only when the list
    /// does. A download asks every tick (100 ms); in a swarm of N members, walking the view
    /// each time would cost every node O(N) per tick.
    pub(crate) fn fetchers_cached(
        &mut self,
        pieces: u32,
        now: Instant,
        proven_only: bool,
        lowest: usize,
    ) -> Fetchers {
        let fresh = self.cache.as_ref().is_some_and(|c| {
            c.pieces == pieces
                && c.proven_only == proven_only
                && c.lowest == lowest
                && now < c.valid_until
        });
        if fresh
            && let Some((l, origin)) = self.cache.as_ref().and_then(|c| c.last.as_ref())
            && *origin == self.origin
        {
            // Nothing changed since the last call: the same list, without walking it.
            return l.clone();
        }
        if !fresh {
            let (others, valid_until) = self.other_fetchers(pieces, now, proven_only, lowest);
            let last = self.cache.take().and_then(|c| c.last);
            self.cache = Some(FetcherCache {
                pieces,
                proven_only,
                lowest,
                others: others.into(),
                valid_until,
                last,
            });
        }
        let (me, origin) = ((self.me, self.my_seed), self.origin);
        let cache = self.cache.get_or_insert_with(|| FetcherCache {
            pieces,
            proven_only,
            lowest,
            others: Arc::from(Vec::new()),
            valid_until: now,
            last: None,
        });
        let ids: Arc<[(PeerId, u64)]> = match cache.others.binary_search_by(|o| by_seed(o, &me)) {
            Err(at) if origin => {
                let mut all = cache.others.to_vec();
                all.insert(at, me);
                all.into()
            }
            _ => cache.others.clone(),
        };
        let f = match &cache.last {
            Some((l, _)) if l.ids == ids => l.clone(),
            _ => Fetchers {
                ids,
                generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            },
        };
        cache.last = Some((f.clone(), origin));
        f
    }

    /// When a member that uses the origin was last learned of (or came back, or this node
    /// started using the origin).
    #[must_use]
    pub(crate) fn grew_at(&self) -> Instant {
        self.grew_at
    }

    /// How many other members are known alive.
    #[must_use]
    pub(crate) fn len_alive(&self, now: Instant) -> usize {
        self.known.iter().filter(|k| alive(k, now)).count()
    }
}

/// The owner of each of `blocks` blocks of pieces that need the origin, among fetchers given
/// by their `seeds` (from [`fetcher_seed`]): block `b` goes to the fetcher with the highest
/// `mix(seed ⊕ b·φ)`, rendezvous hashing (Thaler and Ravishankar, "Using Name-Based Mappings
/// to Increase Hit Rates", 1998), so that a fetcher joining or leaving moves only the blocks it
/// wins or held. Returns, per block, the index into `seeds` of its owner; empty when `seeds`
/// is empty. At most 65 535 fetchers count (indices are `u16`).
#[must_use]
pub(crate) fn assign(seeds: &[u64], blocks: u32) -> Vec<u16> {
    if seeds.is_empty() {
        return Vec::new();
    }
    (0..blocks)
        .map(|b| {
            let mut best = (0u64, 0u16);
            for (i, &s) in seeds.iter().enumerate() {
                let score = mix(s ^ u64::from(b).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let i = u16::try_from(i).unwrap_or(u16::MAX);
                if i == 0 || score > best.0 {
                    best = (score, i);
                }
            }
            best.1
        })
        .collect()
}

/// The order of fetchers for the shares: by seed, then by id (seeds of two ids are equal
/// only by chance).
pub(crate) fn by_seed(a: &(PeerId, u64), b: &(PeerId, u64)) -> std::cmp::Ordering {
    a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0))
}

/// A member's seed for [`assign`]: the first 8 bytes of BLAKE3(peer id ‖ content hash).
#[must_use]
pub(crate) fn fetcher_seed(peer: &PeerId, content: &[u8; 32]) -> u64 {
    let h = blake3::hash(&[peer.to_bytes().as_slice(), content].concat());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// SplitMix64's finaliser: a well-mixed 64-bit value from `x`.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wall clock for the views under test, in milliseconds since the Unix epoch.
    const WALL: u64 = 1_764_547_200_000;
    /// The content the views under test are of.
    const CONTENT: [u8; 32] = [5; 32];

    fn member(peer: PeerId, heartbeat: u64, done: u32, origin: bool) -> Member {
        Member {
            peer_id: Bytes::from(peer.to_bytes()),
            heartbeat,
            done,
            origin,
        }
    }

    #[test]
    fn gossip_spreads_members_and_old_rumours_do_not_revive_them() {
        let t0 = Instant::now();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut va = MemberView::new(a, &CONTENT, t0, WALL);
        let mut vb = MemberView::new(b, &CONTENT, t0, WALL);
        let mut vc = MemberView::new(c, &CONTENT, t0, WALL);
        for v in [&mut va, &mut vb, &mut vc] {
            v.set_self(0, true, t0);
        }
        // A line a - b - c: c learns of a through b.
        vb.merge(&a, &va.sample(t0), t0);
        vc.merge(&b, &vb.sample(t0), t0);
        assert_eq!(vc.fetchers(10, t0, false), {
            let mut all = vec![a, b, c];
            all.sort_unstable();
            all
        });
        // a says nothing more: after the timeout it is gone, also at c.
        let later = t0 + MEMBER_TIMEOUT + Duration::from_millis(1);
        let b_again = vb.sample(later);
        assert!(b_again.iter().all(|m| m.peer_id != a.to_bytes()));
        vc.merge(&b, &b_again, later);
        assert!(!vc.fetchers(10, later, false).contains(&a));
        // b forgets c (it stopped answering); c's old entry relayed back does not revive it,
        // a newer heartbeat does.
        vb.merge(&c, &vc.sample(t0), t0);
        vb.forget(&c);
        assert!(!vb.fetchers(10, t0, false).contains(&c));
        let c_then = vc.sample(t0)[0].heartbeat;
        vb.merge(&a, &[member(a, 1, 0, true), member(c, c_then, 0, true)], t0);
        assert!(!vb.fetchers(10, t0, false).contains(&c));
        vb.merge(&c, &vc.sample(t0 + Duration::from_millis(5)), t0);
        assert!(vb.fetchers(10, t0, false).contains(&c));
        // A list that does not start with its sender's own entry is ignored; a relayed
        // heartbeat far ahead of this node's clock is skipped.
        let (x, y) = (PeerId::random(), PeerId::random());
        vb.merge(&a, &[member(x, 1, 0, true)], t0);
        let far = vb.heartbeat(t0) + 2 * MAX_SKEW.as_millis() as u64;
        vb.merge(&a, &[member(a, 2, 0, true), member(y, far, 0, true)], t0);
        let f = vb.fetchers(10, t0, false);
        assert!(!f.contains(&x) && !f.contains(&y) && f.contains(&a));
    }

    #[test]
    fn after_a_lapse_only_members_heard_from_directly_take_shares() {
        let t0 = Instant::now();
        let (me, neighbour, far) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = MemberView::new(me, &CONTENT, t0, WALL);
        v.set_self(0, true, t0);
        // The neighbour (which holds pieces) relays `far` (which may be made up) and 60
        // made-up fetchers.
        let mut list = vec![member(neighbour, 1, 3, true), member(far, 1, 0, true)];
        let fakes: Vec<PeerId> = (0..60).map(|_| PeerId::random()).collect();
        list.extend(fakes.iter().map(|f| member(*f, 1, 10, true)));
        v.merge(&neighbour, &list, t0);
        assert_eq!(v.fetchers(10, t0, false).len(), 63);
        let mut proven = vec![me, neighbour];
        proven.sort_unstable();
        assert_eq!(v.fetchers(10, t0, true), proven);
        // `far` answers this node itself: it counts once it holds a piece.
        v.merge(&far, &[member(far, 2, 0, true)], t0);
        assert!(!v.fetchers(10, t0, true).contains(&far));
        v.merge(&far, &[member(far, 3, 1, true)], t0);
        assert!(v.fetchers(10, t0, true).contains(&far));
    }

    #[test]
    fn a_member_without_progress_stalls_unless_it_has_everything() {
        let t0 = Instant::now();
        let (me, slow, full) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut v = MemberView::new(me, &CONTENT, t0, WALL);
        v.merge(
            &slow,
            &[member(slow, 1, 3, true), member(full, 1, 10, true)],
            t0,
        );
        // Heartbeats go on, pieces do not.
        let later = t0 + MEMBER_STALL;
        v.merge(
            &slow,
            &[member(slow, 2, 3, true), member(full, 2, 10, true)],
            later,
        );
        assert_eq!(v.fetchers(10, later, false), vec![full]);
        // Members that do not use the origin take no share; this one does once it says so.
        let quiet = PeerId::random();
        v.merge(&quiet, &[member(quiet, 1, 0, false)], later);
        let grew = v.grew_at();
        v.set_self(0, true, later + Duration::from_millis(1));
        assert!(v.grew_at() > grew);
        let mut want = vec![me, full];
        want.sort_unstable();
        assert_eq!(v.fetchers(10, later, false), want);
    }

    #[test]
    fn a_sample_holds_this_node_first_and_at_most_the_limit() {
        let t0 = Instant::now();
        let me = PeerId::random();
        let mut v = MemberView::new(me, &CONTENT, t0, WALL);
        let others: Vec<Member> = (0..200)
            .map(|_| member(PeerId::random(), 1, 0, true))
            .collect();
        let sender = PeerId::from_bytes(&others[0].peer_id).unwrap();
        v.merge(&sender, &others, t0);
        assert_eq!(v.len_alive(t0), 200);
        let s = v.sample(t0);
        assert_eq!(s.len(), MAX_MEMBERS);
        assert_eq!(s[0].peer_id, Bytes::from(me.to_bytes()));
        // Garbage ids are skipped.
        v.merge(
            &sender,
            &[
                others[0].clone(),
                Member {
                    peer_id: Bytes::from_static(b"nope"),
                    ..others[0].clone()
                },
            ],
            t0,
        );
        assert_eq!(v.len_alive(t0), 200);
    }

    #[test]
    fn rendezvous_shares_are_even_and_a_new_member_moves_only_what_it_wins() {
        let content = [7u8; 32];
        let peers: Vec<PeerId> = (0..10).map(|_| PeerId::random()).collect();
        let seeds: Vec<u64> = peers.iter().map(|p| fetcher_seed(p, &content)).collect();
        let before = assign(&seeds[..9], 900);
        let mut counts = [0u32; 9];
        for &o in &before {
            counts[o as usize] += 1;
        }
        // 100 blocks each on average; none far off.
        assert!(
            counts.iter().all(|&c| (50..=150).contains(&c)),
            "{counts:?}"
        );
        let after = assign(&seeds, 900);
        for (b, (&x, &y)) in before.iter().zip(&after).enumerate() {
            assert!(x == y || y == 9, "block {b} moved from {x} to {y}");
        }
        assert!(after.contains(&9));
        assert!(assign(&[], 5).is_empty());
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Over a random run of merges, forgets, own-state changes and time passing, the cached
    /// fetchers are always the ones computed afresh, and their generation changes exactly
    /// when the list does.
    #[test]
    fn the_cached_fetchers_are_always_the_fresh_ones() {
        let mut rng = StdRng::seed_from_u64(7);
        let t0 = Instant::now();
        let me = PeerId::random();
        let peers: Vec<PeerId> = (0..12).map(|_| PeerId::random()).collect();
        let mut v = MemberView::new(me, &[9; 32], t0, 1_764_547_200_000);
        let mut now = t0;
        let mut last: Option<Fetchers> = None;
        let mut heartbeats = vec![1_764_547_200_000u64; peers.len()];
        for step in 0..3000 {
            now += Duration::from_millis(rng.random_range(0..800));
            // Stretches where only time passes: members go stale and stall on their own.
            let op = if step % 100 < 40 {
                9
            } else {
                rng.random_range(0..10)
            };
            match op {
                0..=5 => {
                    let from = rng.random_range(0..peers.len());
                    let other = rng.random_range(0..peers.len());
                    heartbeats[from] += rng.random_range(0..2000);
                    heartbeats[other] += rng.random_range(0..500);
                    let entry = |i: usize, rng: &mut StdRng| Member {
                        peer_id: Bytes::from(peers[i].to_bytes()),
                        heartbeat: heartbeats[i],
                        done: rng.random_range(0..12),
                        origin: rng.random_bool(0.7),
                    };
                    let list = vec![entry(from, &mut rng), entry(other, &mut rng)];
                    v.merge(&peers[from], &list, now);
                }
                6 => v.forget(&peers[rng.random_range(0..peers.len())]),
                7 => v.set_self(rng.random_range(0..10), rng.random_bool(0.5), now),
                _ => {}
            }
            let (pieces, proven_only) = (10, step % 500 > 400);
            // All of them, or only the lowest 3 besides this node.
            let lowest = if step % 300 < 150 { usize::MAX } else { 3 };
            let got = v.fetchers_cached(pieces, now, proven_only, lowest);
            // The same members as afresh, each with its seed, in (seed, id) order.
            let seeded = |p: &PeerId| (*p, fetcher_seed(p, &[9; 32]));
            let fresh = v.fetchers(pieces, now, proven_only);
            let mut want: Vec<(PeerId, u64)> =
                fresh.iter().filter(|p| **p != me).map(seeded).collect();
            want.sort_unstable_by(by_seed);
            want.truncate(lowest);
            if fresh.contains(&me) {
                want.push(seeded(&me));
                want.sort_unstable_by(by_seed);
            }
            assert_eq!(got.ids.to_vec(), want, "step {step}");
            if let Some(l) = &last {
                assert_eq!(
                    l.ids == got.ids,
                    l.generation == got.generation,
                    "step {step}"
                );
            }
            last = Some(got);
        }
    }
}
