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

/// What is known of one other member: 32 bytes, two to a cache line (a merge reads and
/// writes one per entry it takes, in views too large for the cache). Times are [`Tick`]s.
#[derive(Debug, Clone)]
#[repr(align(32))]
struct Known {
    heartbeat: u64,
    /// When its heartbeat last rose here.
    seen: Tick,
    /// When its count of pieces last rose here.
    progressed: Tick,
    done: u32,
    origin: bool,
    /// A direct peer that stopped answering: gone until a higher heartbeat comes.
    gone: bool,
    /// This node heard from the member itself (its own entry, first in its own answer or
    /// announcement, over a connection that authenticates it): not made up by a relayer.
    proven: bool,
}

/// An instant as a view keeps it: nanoseconds since the view's `base` (the `now` it was made
/// at; every later `now` is at or after it, the clock being monotonic). Exact, and half the
/// size of an `Instant`.
type Tick = u64;

/// Instant `t` as a [`Tick`] of a view made at `base` (0 for instants before it).
fn tick(base: Instant, t: Instant) -> Tick {
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// The instant that [`Tick`] `t` of a view made at `base` stands for.
fn instant(base: Instant, t: Tick) -> Instant {
    base + Duration::from_nanos(t)
}

/// The longest canonical peer id, in bytes: an identity multihash of a public key of at most
/// 42 bytes (longer keys are hashed to a SHA-256 multihash of 34 bytes), as libp2p encodes it.
const MAX_ID_BYTES: usize = 44;

/// A canonical peer id's bytes, held inline: an answer's sample copies them into one buffer
/// without reaching for another allocation per member.
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

/// A known member's id, parsed, and its fingerprint in the view's lookup table.
#[derive(Debug, Clone)]
struct Id {
    peer: PeerId,
    fingerprint: u64,
}

/// Where the lookup table finds a member: its fingerprint, its heartbeat (so that the common
/// case, a relayed entry that is no newer, is decided without reading the entry), and its
/// position.
#[derive(Debug, Clone, Copy)]
struct Slot {
    fingerprint: u64,
    heartbeat: u64,
    index: u32,
}

/// The known members, in the order they were learned of (walked in order and picked by
/// position, so that a seeded simulation repeats exactly), with a table that finds a relayed
/// entry by its id bytes. The table holds each id's 64-bit SipHash under a 128-bit key drawn
/// at random per view (std's `RandomState`), and an entry is found by that fingerprint alone:
/// most relayed entries are decided without reading anything but the table. Peers choose the
/// ids, but without the key they can neither make lookups collide nor make two ids share a
/// fingerprint; by chance, two of a view's at most 4,096 ids share one with a probability
/// below 10^-12, and then the later one's entries update the earlier one's.
#[derive(Debug, Clone, Default)]
struct Entries {
    known: Vec<Known>,
    ids: Vec<Id>,
    /// Each member's id bytes, apart from its parsed id: an answer's sample copies those of
    /// dozens of members in a row.
    bytes: Vec<IdBytes>,
    /// Each member's seed for the shares of this content ([`fetcher_seed`]).
    seeds: Vec<u64>,
    table: hashbrown::HashTable<Slot>,
    keys: std::hash::RandomState,
}

impl Entries {
    fn len(&self) -> usize {
        self.known.len()
    }

    /// The fingerprint of id `bytes` in this view.
    fn fingerprint(&self, bytes: &[u8]) -> u64 {
        // The bytes alone, without `Hash`'s length prefix: SipHash's last block holds the
        // length already.
        let mut h = std::hash::BuildHasher::build_hasher(&self.keys);
        std::hash::Hasher::write(&mut h, bytes);
        std::hash::Hasher::finish(&h)
    }

    /// Adds a member that is not known yet.
    fn insert(&mut self, bytes: IdBytes, peer: PeerId, fingerprint: u64, seed: u64, k: Known) {
        let index = u32::try_from(self.known.len()).unwrap_or(u32::MAX);
        self.table.insert_unique(
            fingerprint,
            Slot {
                fingerprint,
                heartbeat: k.heartbeat,
                index,
            },
            |s| s.fingerprint,
        );
        self.known.push(k);
        self.seeds.push(seed);
        self.bytes.push(bytes);
        self.ids.push(Id { peer, fingerprint });
    }

    /// The position of the member whose id bytes are `bytes`.
    fn position(&self, bytes: &[u8]) -> Option<usize> {
        let f = self.fingerprint(bytes);
        let slot = self.table.find(f, |s| s.fingerprint == f)?;
        let i = slot.index as usize;
        (self.bytes[i].as_slice() == bytes).then_some(i)
    }

    /// Keeps the members for which `keep` holds, in order.
    fn retain(&mut self, mut keep: impl FnMut(&Known) -> bool) {
        let kept: Vec<bool> = self.known.iter().map(&mut keep).collect();
        if kept.iter().all(|k| *k) {
            return;
        }
        retain_at(&mut self.known, &kept);
        retain_at(&mut self.ids, &kept);
        retain_at(&mut self.bytes, &kept);
        retain_at(&mut self.seeds, &kept);
        self.table.clear();
        for (i, (id, k)) in self.ids.iter().zip(&self.known).enumerate() {
            self.table.insert_unique(
                id.fingerprint,
                Slot {
                    fingerprint: id.fingerprint,
                    heartbeat: k.heartbeat,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                },
                |s| s.fingerprint,
            );
        }
    }

    fn clear(&mut self) {
        self.known.clear();
        self.ids.clear();
        self.bytes.clear();
        self.seeds.clear();
        self.table.clear();
    }

    fn iter(&self) -> std::slice::Iter<'_, Known> {
        self.known.iter()
    }
}

/// Keeps the items of `v` whose place in `kept` is true (the columns of [`Entries`] move
/// together).
fn retain_at<T>(v: &mut Vec<T>, kept: &[bool]) {
    let mut at = kept.iter();
    v.retain(|_| at.next().copied().unwrap_or(false));
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

/// The ticks a member's times are compared with at one `now`: a member is heard from when it
/// was seen after `stale`, and progressing when it progressed after `stalled` (`None`: `now`
/// is too early for any time to be that old). Computed once per walk, so that each entry
/// costs two comparisons of integers rather than two subtractions of instants.
#[derive(Debug, Clone, Copy)]
struct Cutoffs {
    stale: Option<Tick>,
    stalled: Option<Tick>,
}

impl Cutoffs {
    /// The cutoffs at `now` of a view made at `base`.
    fn at(base: Instant, now: Instant) -> Self {
        let now = tick(base, now);
        let before = |d: Duration| now.checked_sub(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            stale: before(MEMBER_TIMEOUT),
            stalled: before(MEMBER_STALL),
        }
    }
}

/// Whether member `k` is heard from: not gone, and its heartbeat rose within
/// [`MEMBER_TIMEOUT`] of the `now` that `c` was computed at.
fn alive(k: &Known, c: Cutoffs) -> bool {
    !k.gone && c.stale.is_none_or(|t| k.seen > t)
}

/// Whether member `k` takes a share at the `now` of `c` ([`MemberView::fetchers`]).
fn is_fetcher(k: &Known, pieces: u32, c: Cutoffs, proven_only: bool) -> bool {
    k.origin
        && (!proven_only || (k.proven && k.done > 0))
        && alive(k, c)
        && (k.done >= pieces || c.stalled.is_none_or(|t| k.progressed > t))
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
        // This node's id and the sender's, found among the entries by fingerprint as the
        // table finds every member.
        let (me, sender) = (
            self.known.fingerprint(&self.me_bytes),
            self.known.fingerprint(&from_bytes),
        );
        // `now` as the entries compare it, computed once for all of them.
        let at = (now, tick(self.base, now), Cutoffs::at(self.base, now));
        // A list is at most `MAX_MEMBERS` long on the wire; longer ones are taken in parts.
        let mut fingerprints = [0u64; MAX_MEMBERS];
        for (part, chunk) in members.chunks(MAX_MEMBERS).enumerate() {
            let fingerprints = &mut fingerprints[..chunk.len()];
            for (f, m) in fingerprints.iter_mut().zip(chunk) {
                *f = self.known.fingerprint(&m.peer_id);
            }
            // Every lookup once ahead, its result unused: the lines it reads (another node's
            // view, rarely in cache) are fetched for all entries at once rather than one after
            // the other, and the entry itself only where it will likely be updated (most
            // relayed entries are decided on the table alone). What the entries do is decided
            // below, in order, as if this were not here.
            for (m, &f) in chunk.iter().zip(fingerprints.iter()) {
                if let Some(slot) = self.known.table.find(f, |s| s.fingerprint == f)
                    && m.heartbeat > slot.heartbeat
                {
                    std::hint::black_box(self.known.known.get(slot.index as usize).map(|k| k.done));
                }
            }
            for (k, (m, &f)) in chunk.iter().zip(fingerprints.iter()).enumerate() {
                let i = part * MAX_MEMBERS + k;
                let direct = i == 0;
                if f == me || (i > 0 && f == sender) || (!direct && m.heartbeat > ceiling) {
                    continue;
                }
                self.merge_entry(m, f, direct, at);
            }
        }
        if now.saturating_duration_since(self.pruned_at) >= PRUNE_EVERY {
            self.pruned_at = now;
            let (now, forget) = (tick(self.base, now), FORGET_AFTER.as_nanos());
            self.known
                .retain(|k| u128::from(now.saturating_sub(k.seen)) < forget);
        }
    }

    /// Takes in one entry of a peer's list (`direct`: the peer's own), whose id has the
    /// fingerprint `f` in this view, at `now` (with its tick and cutoffs in this view).
    fn merge_entry(
        &mut self,
        m: &Member,
        f: u64,
        direct: bool,
        (now, t, c): (Instant, Tick, Cutoffs),
    ) {
        let cached = self.cache.as_ref().map(|c| (c.pieces, c.proven_only));
        let counts = |k: &Known| cached.map(|(p, po)| is_fetcher(k, p, c, po));
        let Entries { known, table, .. } = &mut self.known;
        if let Some(slot) = table.find_mut(f, |s| s.fingerprint == f) {
            // Decided on the table alone: most relayed entries are no newer.
            if m.heartbeat <= slot.heartbeat && !(direct && m.heartbeat != slot.heartbeat) {
                return;
            }
            let i = slot.index as usize;
            slot.heartbeat = m.heartbeat;
            let k = &mut known[i];
            let before = counts(k);
            if m.origin && (!k.origin || k.gone) {
                self.grew_at = now;
            }
            k.heartbeat = m.heartbeat;
            k.seen = t;
            if m.done > k.done {
                k.progressed = t;
            }
            k.done = m.done;
            k.origin = m.origin;
            k.gone = false;
            k.proven |= direct;
            if counts(k) != before {
                self.invalidate();
            }
            return;
        }
        if known.len() >= MAX_KNOWN {
            return;
        }
        // A new member: its id must parse, and be in its one canonical encoding (the bytes it
        // is found by from then on).
        let Ok(peer) = PeerId::from_bytes(&m.peer_id) else {
            return;
        };
        if peer.to_bytes() != m.peer_id.as_ref() {
            return;
        }
        let Some(bytes) = IdBytes::new(&m.peer_id) else {
            return;
        };
        if m.origin {
            self.grew_at = now;
        }
        let k = Known {
            heartbeat: m.heartbeat,
            done: m.done,
            origin: m.origin,
            seen: t,
            progressed: t,
            gone: false,
            proven: direct,
        };
        if counts(&k) == Some(true) {
            self.invalidate();
        }
        let seed = fetcher_seed(&peer, &self.content);
        self.known.insert(bytes, peer, f, seed, k);
    }

    /// Marks `peer` as gone (a direct peer that stopped answering), until an entry with a
    /// higher heartbeat than the last one known arrives.
    pub(crate) fn forget(&mut self, peer: &PeerId) {
        if let Some(i) = self.known.position(&peer.to_bytes())
            && !std::mem::replace(&mut self.known.known[i].gone, true)
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
        let (known, ids) = (&self.known.known, &self.known.bytes);
        let c = Cutoffs::at(self.base, now);
        let mut picked = Vec::with_capacity(want.min(n));
        picked.extend(
            (start..n)
                .chain(0..start)
                .filter(|&i| alive(&known[i], c))
                .take(want),
        );
        // The ids in one buffer: one allocation per answer, each member's id a slice of it.
        let mut buf = Vec::with_capacity(picked.len() * MAX_ID_BYTES);
        for &i in &picked {
            buf.extend_from_slice(ids[i].as_slice());
        }
        let buf = Bytes::from(buf);
        let mut at = 0;
        out.extend(picked.iter().map(|&i| {
            let len = ids[i].as_slice().len();
            let peer_id = buf.slice(at..at + len);
            at += len;
            Member {
                peer_id,
                heartbeat: known[i].heartbeat,
                done: known[i].done,
                origin: known[i].origin,
            }
        }));
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
        let (entries, ids, seeds) = (&self.known.known, &self.known.ids, &self.known.seeds);
        let cutoffs = Cutoffs::at(self.base, now);
        // (seed, position): small to select and sort; ids are compared only on equal seeds.
        let mut found: Vec<(u64, usize)> = entries
            .iter()
            .enumerate()
            .filter(|(_, k)| is_fetcher(k, pieces, cutoffs, proven_only))
            .map(|(i, _)| (seeds[i], i))
            .collect();
        let order = |a: &(u64, usize), b: &(u64, usize)| {
            a.0.cmp(&b.0)
                .then_with(|| ids[a.1].peer.cmp(&ids[b.1].peer))
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
                let stale = instant(self.base, k.seen) + MEMBER_TIMEOUT;
                until = until.min(if k.done >= pieces {
                    stale
                } else {
                    stale.min(instant(self.base, k.progressed) + MEMBER_STALL)
                });
                (ids[i].peer, seeds[i])
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
        let c = Cutoffs::at(self.base, now);
        self.known.iter().filter(|k| alive(k, c)).count()
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
    fn after_forgotten_members_are_dropped_every_other_one_is_still_found_by_its_id() {
        let t0 = Instant::now();
        let (me, relay) = (PeerId::random(), PeerId::random());
        let mut v = MemberView::new(me, &CONTENT, t0, WALL);
        let (old, kept): (Vec<PeerId>, Vec<PeerId>) = (
            (0..40).map(|_| PeerId::random()).collect(),
            (0..40).map(|_| PeerId::random()).collect(),
        );
        // Learned interleaved, so that dropping the old ones moves every kept one.
        let mut list = vec![member(relay, 1, 0, false)];
        for (o, k) in old.iter().zip(&kept) {
            list.push(member(*o, 1, 0, true));
            list.push(member(*k, 1, 0, true));
        }
        v.merge(&relay, &list, t0);
        // The kept ones stay heard of; the old ones are dropped at the next prune.
        let mid = t0 + FORGET_AFTER / 2;
        let mut fresh = vec![member(relay, 2, 0, false)];
        fresh.extend(kept.iter().map(|k| member(*k, 2, 0, true)));
        v.merge(&relay, &fresh, mid);
        let late = t0 + FORGET_AFTER + PRUNE_EVERY;
        let mut again = vec![member(relay, 3, 0, false)];
        again.extend(kept.iter().map(|k| member(*k, 3, 5, true)));
        v.merge(&relay, &again, late);
        assert_eq!(v.known.len(), 41, "the old ones are gone");
        // Every kept member is found and updated where it now is: a higher heartbeat with
        // pieces counts, an older one changes nothing.
        let mut newer = vec![member(relay, 4, 0, false)];
        newer.extend(kept.iter().map(|k| member(*k, 4, 7, true)));
        newer.extend(kept.iter().map(|k| member(*k, 1, 0, false)));
        v.merge(&relay, &newer, late);
        for k in &kept {
            let i = v.known.position(&k.to_bytes()).expect("found");
            let entry = &v.known.known[i];
            assert_eq!((entry.heartbeat, entry.done, entry.origin), (4, 7, true));
            assert_eq!(v.known.ids[i].peer, *k);
        }
        assert!(
            old.iter()
                .all(|o| v.known.position(&o.to_bytes()).is_none())
        );
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
