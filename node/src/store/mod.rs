//! The content store: which verified content this node holds and where its bytes are.
//!
//! An entry maps a content id to a file on disk (a job's temporary file while it downloads, the
//! final file after Complete, the cache's copy, or a seeded file), its verified piece layer, and
//! a bitfield of the pieces whose bytes verified and are written. Only verified pieces are ever
//! served: an entry serves pieces only once its layer is verified, a piece's bit is set only after
//! its bytes verified and reached the disk, and a piece read to be served from a file that anyone
//! but this process's user (and root) could have changed is checked again against its chaining
//! value before it leaves (one BLAKE3 per piece), so no other user can make the node send bytes
//! that do not verify (decision 0020: a file only this node's user can write is not hashed again;
//! its receivers check every piece anyway). The bytes are read through a descriptor the node opened
//! itself (`Backing::Held`, a running download's temporary file) or from a file reopened for each
//! read as its owner, never through a symlink, never blocking, and only while it is the very file
//! that verified (`Backing::Named`); a daemon running as root so never reads a path a user controls
//! with root's rights. An entry without a layer (being assembled, see `docs/scheduling.md`) reports
//! which pieces it fetches and which chaining values it computed from origin bytes, and serves only
//! those pieces (its claims, decision 0016), under the same rule checked against the chaining
//! value it computed.
//! A SHA-256 maps to a content id only after this node computed that SHA-256 over the whole file
//! itself.
//!
//! Entries live in memory. At start the cache (the `cache` module) registers its files again, and
//! restored jobs their temporary files as they resume.

pub(crate) mod cache;
pub(crate) mod fill;
pub(crate) mod fsuser;
pub(crate) mod state;
pub(crate) mod state_actor;

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use shoal_protocol::{Bitfield, HaveKey, Holding, LayerResponse, PieceIndex};
use shoal_validator::{ChainingValue, ContentId, PieceLayer, Sha256Digest};

use crate::{
    download::members::MemberView,
    store::fsuser::{FileIdentity, as_owner, only_ours, open_regular},
};

/// Where an entry's bytes are read from to serve a peer.
#[derive(Clone, Debug)]
pub(crate) enum Backing {
    /// A descriptor the node opened itself (a running download's temporary file, opened as
    /// the job's owner and never through a symlink): what the path names now does not matter.
    Held(Arc<File>),
    /// A file reopened for each read, as `owner`, with [`open_regular`]: only while the path
    /// still names the regular file of `identity` (a transferred temporary file, a final file
    /// after Complete, the cache's copy, a seeded file).
    Named {
        /// Whose file it is (`None`: the node's own, read as the process is).
        owner: Option<u32>,
        /// The file that verified.
        identity: FileIdentity,
    },
}

impl Backing {
    /// A file the node reads as `owner` while it is the file `file` is open on.
    ///
    /// # Errors
    /// What `fstat` returns.
    pub(crate) fn named(file: &File, owner: Option<u32>) -> std::io::Result<Self> {
        Ok(Self::Named {
            owner,
            identity: FileIdentity::of(file)?,
        })
    }

    /// Reads `len` bytes at `offset`, with whether only this process's user can write the
    /// file ([`only_ours`]); `None` when the file is not the one that verified or the read
    /// falls short.
    fn read(&self, path: &Path, offset: u64, len: usize) -> Option<(Bytes, bool)> {
        let named;
        let file = match self {
            Self::Held(f) => f.as_ref(),
            Self::Named { owner, identity } => {
                named = as_owner(*owner, || open_regular(path, Some(*identity))).ok()?;
                &named
            }
        };
        let mut buf = crate::bufpool::take(len);
        file.read_exact_at(&mut buf, offset).ok()?;
        Some((crate::bufpool::into_bytes(buf), only_ours(file)))
    }
}

/// One content this node holds or assembles.
#[derive(Clone, Debug)]
struct Entry {
    /// The verified piece layer; `None` while the layer is being assembled from chaining
    /// values computed from origin bytes (the entry then serves no piece).
    layer: Option<Arc<PieceLayer>>,
    /// Pieces verified against `layer` and written.
    verified: Bitfield,
    /// Pieces being fetched now.
    fetching: Bitfield,
    /// While assembling: the chaining values this node computed from origin bytes.
    claims: Vec<Option<ChainingValue>>,
    /// While assembling: chaining values taken in from peers' partial layers (untrusted until
    /// the assembled layer verifies), passed on in partial layer responses.
    relayed: Vec<Option<ChainingValue>>,
    /// The file's path: what the entry is known by (a job's temporary file, its local name
    /// after Complete, a cache file).
    path: PathBuf,
    /// Where the bytes are read from to serve them: verified pieces, and while assembling the
    /// pieces this node fetched from the origin itself (its claims).
    backing: Option<Backing>,
    /// Set when a piece was read to serve a peer; taken by the cache's sweep (its LRU).
    served: Arc<AtomicBool>,
    /// Set when a peer first asked for a piece this entry offers, and left set: from then on
    /// the pieces it verifies are kept in memory for a while ([`ContentStore::keep_recent`]).
    asked: Arc<AtomicBool>,
}

impl Entry {
    /// An entry with a verified layer and the pieces `verified` at `path`, read from `backing`.
    fn verified(layer: PieceLayer, verified: Bitfield, path: PathBuf, backing: Backing) -> Self {
        let n = layer.content_id().piece_count();
        Self {
            layer: Some(Arc::new(layer)),
            verified,
            fetching: Bitfield::new(n),
            claims: Vec::new(),
            relayed: Vec::new(),
            path,
            backing: Some(backing),
            served: Arc::default(),
            asked: Arc::default(),
        }
    }

    fn holding(&self, id: ContentId) -> Holding {
        let n = id.piece_count();
        let mut claimed = Bitfield::new(n);
        for (i, c) in self.claims.iter().enumerate() {
            if c.is_some() {
                claimed.set(i as u32);
            }
        }
        let chaining = if self.layer.is_some() {
            Bitfield::full(n)
        } else {
            let mut b = claimed.clone();
            for (i, c) in self.relayed.iter().enumerate() {
                if c.is_some() {
                    b.set(i as u32);
                }
            }
            b
        };
        Holding {
            content_id: id,
            have: if self.layer.is_some() {
                self.verified.clone()
            } else {
                Bitfield::new(n)
            },
            fetching: self.fetching.clone(),
            claimed,
            chaining,
            members: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<ContentId, Entry>,
    by_hash: HashMap<[u8; 32], ContentId>,
    by_sha256: HashMap<Sha256Digest, ContentId>,
    /// Swarm ids of content known by its SHA-256 (`sha256_swarm_id`) whose download on this
    /// node verified, and the content id it verified as: the swarm is still served, from the
    /// verified content's entry, while that entry lasts.
    aliases: HashMap<ContentId, ContentId>,
    /// Per content this node fetched: the swarm members it knows, and how many downloads on
    /// this node use the view. A view stays while the content is held, so that the node goes
    /// on stating itself as a member while it serves.
    members: HashMap<ContentId, (MemberView, u32)>,
}

/// The registry of verified content, shared by the swarm (serving) and the jobs (filling it).
#[derive(Debug, Default)]
pub(crate) struct ContentStore {
    inner: RwLock<Inner>,
    /// The pieces verified (or claimed) most recently, served from memory.
    recent: Mutex<Recent>,
    /// Signalled when the set of content ids or SHA-256s changes (one waiter: the swarm, which
    /// announces them in the DHT).
    changed: tokio::sync::Notify,
}

impl ContentStore {
    /// An empty store.
    #[must_use]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Registers content whose bytes are (or will be) at `path`, read from `backing`, with the
    /// pieces in `verified` already verified and written. Replaces an existing entry for the
    /// same content id only when that one holds fewer pieces.
    pub(crate) fn insert(
        &self,
        layer: PieceLayer,
        verified: Bitfield,
        path: PathBuf,
        backing: Backing,
    ) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let id = layer.content_id();
        if let Some(old) = inner.by_id.get(&id)
            && old.layer.is_some()
            && old.verified.count_ones() >= verified.count_ones()
            && old.path.exists()
        {
            return;
        }
        self.put(
            &mut inner,
            id,
            Entry::verified(layer, verified, path, backing),
        );
    }

    /// Registers the complete, verified content of `layer` at `path` (the cache's copy, read
    /// from `backing`), replacing any entry of the same content id: the copy serves every
    /// piece, and nobody but the node writes it.
    pub(crate) fn insert_complete(&self, layer: PieceLayer, path: PathBuf, backing: Backing) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let id = layer.content_id();
        let full = Bitfield::full(id.piece_count());
        self.put(&mut inner, id, Entry::verified(layer, full, path, backing));
    }

    /// Puts `entry` under `id` and tells the swarm the set of keys changed.
    fn put(&self, inner: &mut Inner, id: ContentId, entry: Entry) {
        // Peers that asked for the content before its layer verified still want it.
        if inner
            .by_id
            .get(&id)
            .is_some_and(|old| old.asked.load(Ordering::Relaxed))
        {
            entry.asked.store(true, Ordering::Relaxed);
        }
        inner.by_hash.insert(*id.hash(), id);
        inner.by_id.insert(id, entry);
        self.changed.notify_one();
    }

    /// Registers content `id` whose layer is being assembled at `path` (no verified layer
    /// known), read from `backing`: have queries then report its fetching and claimed pieces,
    /// and it is announced in the DHT; of its pieces, only those this node fetched from the
    /// origin itself (its claims) are served, each while its bytes still have the claimed
    /// chaining value. With `sha256` (`id` is then the swarm id of that SHA-256), SHA-256
    /// lookups find the entry until a verified content answers them. True when the entry is
    /// this path's; false when another download of the same content holds it (with or without
    /// a layer).
    pub(crate) fn begin_assembly(
        &self,
        id: ContentId,
        path: PathBuf,
        backing: Backing,
        sha256: Option<Sha256Digest>,
    ) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = inner.by_id.get(&id) {
            return old.path == path && old.layer.is_none();
        }
        inner.aliases.remove(&id);
        if let Some(d) = sha256 {
            inner.by_sha256.entry(d).or_insert(id);
        }
        let n = id.piece_count();
        self.put(
            &mut inner,
            id,
            Entry {
                layer: None,
                verified: Bitfield::new(n),
                fetching: Bitfield::new(n),
                claims: vec![None; n as usize],
                relayed: vec![None; n as usize],
                path,
                backing: Some(backing),
                served: Arc::default(),
                asked: Arc::default(),
            },
        );
        true
    }

    /// The download at `path` of the content known by its SHA-256 under the swarm id `swarm`
    /// verified as `verified` (registered with [`Self::insert`] first): the swarm's entry
    /// gives way to an alias, through which the swarm's have queries and piece requests are
    /// answered from the verified entry (every verified piece offered, checked against the
    /// verified layer when read) for as long as that entry lasts.
    pub(crate) fn alias_swarm(&self, swarm: ContentId, path: &Path, verified: ContentId) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.by_id.get(&swarm).is_some_and(|e| e.path == path) {
            inner.by_id.remove(&swarm);
        }
        if !inner.by_id.contains_key(&swarm) && inner.by_id.contains_key(&verified) {
            inner.aliases.insert(swarm, verified);
            inner.by_hash.insert(*swarm.hash(), swarm);
        }
    }

    /// Records the chaining value this node computed for piece `index` of `id` from origin
    /// bytes, while the entry at `path` assembles its layer.
    pub(crate) fn add_claim(
        &self,
        id: &ContentId,
        path: &Path,
        index: PieceIndex,
        cv: ChainingValue,
    ) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.by_id.get_mut(id)
            && e.path == path
            && let Some(c) = e.claims.get_mut(index as usize)
        {
            *c = Some(cv);
        }
    }

    /// Records chaining values of `id` taken in from peers' partial layers while the entry at
    /// `path` assembles its layer (`entries`: piece index and value); values already known are
    /// kept. With `entries` empty, forgets every relayed value (the assembly failed).
    pub(crate) fn set_relayed(
        &self,
        id: &ContentId,
        path: &Path,
        entries: &[(PieceIndex, ChainingValue)],
    ) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.by_id.get_mut(id)
            && e.path == path
            && e.layer.is_none()
        {
            if entries.is_empty() {
                e.relayed.iter_mut().for_each(|c| *c = None);
            }
            for (i, cv) in entries {
                if let Some(c) = e.relayed.get_mut(*i as usize)
                    && c.is_none()
                {
                    *c = Some(*cv);
                }
            }
        }
    }

    /// Sets the pieces of `id` being fetched into `path`.
    pub(crate) fn set_fetching(&self, id: &ContentId, path: &Path, fetching: Bitfield) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.by_id.get_mut(id)
            && e.path == path
            && fetching.len() == e.fetching.len()
        {
            e.fetching = fetching;
        }
    }

    /// Marks piece `index` of `id` as verified and written to `path`.
    pub(crate) fn mark_verified(&self, id: &ContentId, path: &Path, index: PieceIndex) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.by_id.get_mut(id)
            && e.path == path
            && e.layer.is_some()
        {
            e.verified.set(index);
            e.fetching.clear(index);
        }
    }

    /// Records that this node computed `sha256` over the whole of `id`.
    pub(crate) fn set_sha256(&self, id: &ContentId, sha256: Sha256Digest) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.by_id.contains_key(id) && inner.by_sha256.insert(sha256, *id) != Some(*id) {
            self.changed.notify_one();
        }
    }

    /// Moves the entry of `id` to a new path, read from `backing` (after Complete renamed its
    /// file), if it was at `old`.
    pub(crate) fn relocate(&self, id: &ContentId, old: &Path, new: PathBuf, backing: Backing) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.by_id.get_mut(id)
            && e.path == old
        {
            e.path = new;
            e.backing = Some(backing);
        }
    }

    /// Forgets `id` if its bytes are at `path` (a temporary file being deleted).
    pub(crate) fn remove_at(&self, id: &ContentId, path: &Path) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.by_id.get(id).is_some_and(|e| e.path == path) {
            inner.by_id.remove(id);
            inner.by_hash.remove(id.hash());
            inner.by_sha256.retain(|_, v| v != id);
            // Swarms served from this entry are not any more.
            let gone: Vec<ContentId> = inner
                .aliases
                .iter()
                .filter(|(_, v)| *v == id)
                .map(|(k, _)| *k)
                .collect();
            for swarm in gone {
                inner.aliases.remove(&swarm);
                if !inner.by_id.contains_key(&swarm) {
                    inner.by_hash.remove(swarm.hash());
                    if inner
                        .members
                        .get(&swarm)
                        .is_some_and(|(_, users)| *users == 0)
                    {
                        inner.members.remove(&swarm);
                    }
                }
            }
            if inner.members.get(id).is_some_and(|(_, users)| *users == 0) {
                inner.members.remove(id);
            }
            self.changed.notify_one();
        }
    }

    /// Starts (or joins) the member view of `id` for a download on this node, `me`: have
    /// answers for `id` then carry the view's sample ([`MemberView::sample`]).
    pub(crate) fn join_members(&self, id: ContentId, me: libp2p::PeerId, now: Instant) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner
            .members
            .entry(id)
            .or_insert_with(|| {
                let wall = crate::timestamp::to_ms(std::time::SystemTime::now());
                (MemberView::new(me, id.hash(), now, wall), 0)
            })
            .1 += 1;
    }

    /// Runs `f` on the member view of `id`; `None` when there is none.
    pub(crate) fn with_members<R>(
        &self,
        id: &ContentId,
        f: impl FnOnce(&mut MemberView) -> R,
    ) -> Option<R> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        inner.members.get_mut(id).map(|(v, _)| f(v))
    }

    /// A download of `id` that joined the member view ended. The view goes when no download
    /// uses it and the content is not held; while held, this node stays a member, stating the
    /// pieces it holds, and forgets the others (only a download keeps them fresh).
    pub(crate) fn leave_members(&self, id: &ContentId) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let target = inner.aliases.get(id).copied().unwrap_or(*id);
        let held = inner.by_id.get(&target).map(|e| {
            if e.layer.is_some() {
                e.verified.count_ones()
            } else {
                0
            }
        });
        if let Some((view, users)) = inner.members.get_mut(id) {
            *users = users.saturating_sub(1);
            match held {
                _ if *users > 0 => {}
                Some(done) => view.idle(done),
                None => {
                    inner.members.remove(id);
                }
            }
        }
    }

    /// Whether a piece of `id` at `path` was read to serve a peer since the last call.
    #[must_use]
    pub(crate) fn take_served(&self, id: &ContentId, path: &Path) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .get(id)
            .is_some_and(|e| e.path == path && e.served.swap(false, Ordering::Relaxed))
    }

    /// Forgets every entry whose bytes are at `path` (a file being deleted).
    pub(crate) fn remove_path(&self, path: &Path) {
        let ids: Vec<ContentId> = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            inner
                .by_id
                .iter()
                .filter(|(_, e)| e.path == path)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in ids {
            self.remove_at(&id, path);
        }
    }

    /// Resolves when the set of content ids or SHA-256s changed since the last call resolved
    /// (for one waiter).
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The keys this node can answer have queries for: every content id's BLAKE3 hash and
    /// every SHA-256 it computed.
    #[must_use]
    pub(crate) fn keys(&self) -> Vec<HaveKey> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .keys()
            .map(|id| HaveKey::Blake3(*id.hash()))
            .chain(inner.by_sha256.keys().map(|d| HaveKey::Sha256(*d)))
            .collect()
    }

    /// What this node holds for a have query: the content id, its verified pieces, and the
    /// pieces it fetches and claims.
    #[must_use]
    pub(crate) fn have(&self, key: &HaveKey) -> Option<Holding> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let id = match key {
            HaveKey::Blake3(h) => *inner.by_hash.get(h)?,
            HaveKey::Sha256(d) => *inner.by_sha256.get(d)?,
        };
        let mut h = match (inner.by_id.get(&id), inner.aliases.get(&id)) {
            (Some(e), _) => e.holding(id),
            // A swarm served from verified content: its verified pieces, under the swarm id.
            (None, Some(verified)) => {
                let e = inner.by_id.get(verified)?;
                let n = id.piece_count();
                Holding {
                    content_id: id,
                    have: e.verified.clone(),
                    fetching: Bitfield::new(n),
                    claimed: Bitfield::new(n),
                    chaining: Bitfield::new(n),
                    members: Vec::new(),
                }
            }
            (None, None) => return None,
        };
        if let Some((v, _)) = inner.members.get(&id) {
            h.members = v.sample(Instant::now());
        }
        Some(h)
    }

    /// The answer to a layer request: the verified layer; or, with `partial` and while
    /// assembling, the chaining values this node computed from origin bytes and those it
    /// relays, of the pieces in `want` only when given (the ones the requester lacks).
    #[must_use]
    pub(crate) fn layer_response(
        &self,
        id: &ContentId,
        partial: bool,
        want: Option<&Bitfield>,
    ) -> LayerResponse {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        match inner.by_id.get(id) {
            Some(Entry { layer: Some(l), .. }) => LayerResponse::Full(l.chaining_values().to_vec()),
            Some(e) if partial && e.claims.iter().chain(&e.relayed).any(Option::is_some) => {
                LayerResponse::Partial(
                    e.claims
                        .iter()
                        .zip(&e.relayed)
                        .enumerate()
                        .filter(|(i, _)| want.is_none_or(|w| w.get(*i as u32)))
                        .filter_map(|(i, (c, r))| c.or(*r).map(|c| (i as u32, c)))
                        .collect(),
                )
            }
            _ => LayerResponse::NotFound,
        }
    }

    /// Whether piece `index` of `id` is offered: verified, or (while `id` assembles its layer)
    /// fetched from the origin by this node itself, a claim. Returns the content id it is held
    /// under (a swarm id resolves to the verified content it aliases), for a claim its
    /// chaining value, and the chaining value the piece's bytes must have (the claim's, or the
    /// verified layer's; `None` for a content of one piece). Marks the entry as served.
    fn offered(
        &self,
        id: &ContentId,
        index: PieceIndex,
    ) -> Option<(ContentId, Option<ChainingValue>, Option<ChainingValue>)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        match (inner.by_id.get(id), inner.aliases.get(id)) {
            (Some(e), _) if e.layer.is_none() => {
                let cv = (*e.claims.get(index as usize)?)?;
                e.served.store(true, Ordering::Relaxed);
                e.asked.store(true, Ordering::Relaxed);
                Some((*id, Some(cv), Some(cv)))
            }
            (Some(e), _) => {
                if !e.verified.get(index) {
                    return None;
                }
                e.served.store(true, Ordering::Relaxed);
                e.asked.store(true, Ordering::Relaxed);
                let expected = e
                    .layer
                    .as_ref()
                    .filter(|l| l.chaining_values().len() > 1)
                    .and_then(|l| l.chaining_values().get(index as usize).copied());
                Some((*id, None, expected))
            }
            // A swarm served from verified content.
            (None, Some(verified)) => {
                let verified = *verified;
                drop(inner);
                self.offered(&verified, index)
            }
            (None, None) => None,
        }
    }

    /// Keeps `bytes`, piece `index` of `id` as this node just verified it (or fetched it from
    /// the origin itself, a claim), with `cv`, the chaining value they have (the layer's they
    /// verified against, or the one computed from them), among the recent pieces served from
    /// memory ([`RECENT_BYTES`] at most; the oldest go first), if peers have asked for pieces of
    /// `id` (a download nobody fetches from keeps none, and no more memory). A kept piece is
    /// served only while the store offers the piece with that same chaining value, so a copy
    /// kept before its claim was refuted, or before a layer rejected it, is never served.
    pub(crate) fn keep_recent(
        &self,
        id: &ContentId,
        index: PieceIndex,
        cv: ChainingValue,
        bytes: Bytes,
    ) {
        if !self.asked(id) {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.keep(*id, index, cv, bytes);
    }

    /// Whether a peer has asked this node for a piece of `id` (then the pieces it verifies
    /// are worth keeping in memory).
    #[must_use]
    pub(crate) fn asked(&self, id: &ContentId) -> bool {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .get(id)
            .is_some_and(|e| e.asked.load(Ordering::Relaxed))
    }

    /// Piece `index` of `id` if it is offered and among the recent pieces kept in memory: what
    /// a peer is served without a disk read (the bytes are the ones this node verified or
    /// fetched from the origin, which no other user can change, kept with the chaining value
    /// the store expects of the piece now).
    #[must_use]
    pub(crate) fn read_piece_in_memory(&self, id: &ContentId, index: PieceIndex) -> Option<Bytes> {
        let (id, _, expected) = self.offered(id, index)?;
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.get(&id, index, &expected?)
    }

    /// Reads verified piece `index` of `id`, or while `id` assembles its layer a piece this
    /// node fetched from the origin itself (a claim): from the recent pieces kept in memory, else
    /// from disk (blocking), and then, unless only this process's user can write the file
    /// ([`only_ours`]), checks it again against its chaining value (the layer's, or the one
    /// claimed). `None` when the piece is not held, the file is no longer the one that verified
    /// (a symlink, a FIFO or another file at its path), the read fails, or a checked piece's
    /// bytes changed since they verified (a verified piece is then no longer offered).
    #[must_use]
    pub(crate) fn read_piece(&self, id: &ContentId, index: PieceIndex) -> Option<Bytes> {
        let (id, claim, expected) = self.offered(id, index)?;
        if let Some(expected) = expected
            && let Some(b) = self
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id, index, &expected)
        {
            return Some(b);
        }
        let (path, backing, range, layer) = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            let e = inner.by_id.get(&id)?;
            let layer = if claim.is_some() {
                None
            } else {
                Some(e.layer.clone()?)
            };
            (
                e.path.clone(),
                e.backing.clone()?,
                id.piece_range(index)?,
                layer,
            )
        };
        let len = usize::try_from(range.end - range.start).ok()?;
        let (buf, only_ours) = backing.read(&path, range.start, len)?;
        if only_ours {
            return Some(buf);
        }
        if let Some(cv) = claim {
            if shoal_validator::piece_chaining_value(range.start, &buf) != cv {
                tracing::warn!(%id, index, path = %path.display(), "a claimed piece changed on disk; not offered");
                return None;
            }
            return Some(buf);
        }
        if layer.is_some_and(|l| l.verify_piece(index, &buf).is_err()) {
            tracing::warn!(
                %id,
                index,
                path = %path.display(),
                "a piece changed on disk since it verified; no longer offered"
            );
            let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = inner.by_id.get_mut(&id)
                && e.path == path
            {
                e.verified.clear(index);
            }
            return None;
        }
        Some(buf)
    }
}

/// The most bytes of recent pieces a node keeps in memory to serve ([`ContentStore::keep_recent`]):
/// in a swarm, a piece a node has just verified is what its peers ask for next, and serving it
/// from memory saves a disk read (pieces are written with O_DIRECT and are not in the page
/// cache), a copy and a blocking thread's wake-up per piece.
pub(crate) const RECENT_BYTES: usize = 4 << 20;

/// The recent pieces, oldest first, each with the chaining value its bytes have, and their
/// bytes in all.
#[derive(Debug, Default)]
struct Recent {
    pieces: std::collections::VecDeque<(ContentId, PieceIndex, ChainingValue, Bytes)>,
    bytes: usize,
}

impl Recent {
    fn keep(&mut self, id: ContentId, index: PieceIndex, cv: ChainingValue, bytes: Bytes) {
        if let Some(i) = self
            .pieces
            .iter()
            .position(|(c, x, _, _)| *x == index && *c == id)
            && let Some((_, _, _, old)) = self.pieces.remove(i)
        {
            self.bytes -= old.len();
        }
        if bytes.len() > RECENT_BYTES {
            return;
        }
        self.bytes += bytes.len();
        self.pieces.push_back((id, index, cv, bytes));
        while self.bytes > RECENT_BYTES {
            match self.pieces.pop_front() {
                Some((_, _, _, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The kept piece `index` of `id`, if its chaining value is `expected`.
    fn get(&self, id: &ContentId, index: PieceIndex, expected: &ChainingValue) -> Option<Bytes> {
        self.pieces
            .iter()
            .rev()
            .find(|(c, x, _, _)| *x == index && c == id)
            .filter(|(_, _, cv, _)| cv == expected)
            .map(|(_, _, _, b)| b.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assembling_entry_passes_on_relayed_values_and_a_member_view_outlives_its_download() {
        let store = ContentStore::new();
        // Four pieces of 16 KiB.
        let id = ContentId::new([9; 32], 4 * 16 * 1024).unwrap();
        let path = PathBuf::from("/nonexistent/a.part");
        let held = Backing::Held(Arc::new(tempfile::tempfile().unwrap()));
        assert!(store.begin_assembly(id, path.clone(), held, None));
        store.add_claim(&id, &path, 0, [1; 32]);
        store.set_relayed(&id, &path, &[(2, [3; 32]), (0, [7; 32])]);
        let h = store.have(&HaveKey::Blake3(*id.hash())).unwrap();
        // Claimed: only what this node fetched; chaining: also what it relays.
        assert_eq!(h.claimed.ones().collect::<Vec<_>>(), vec![0]);
        assert_eq!(h.chaining.ones().collect::<Vec<_>>(), vec![0, 2]);
        // Own claims win over relayed values of the same piece.
        assert_eq!(
            store.layer_response(&id, true, None),
            LayerResponse::Partial(vec![(0, [1; 32]), (2, [3; 32])])
        );
        // Asked for some pieces only (those the requester lacks): only those it can tell.
        let mut want = Bitfield::new(4);
        want.set(2);
        want.set(3);
        assert_eq!(
            store.layer_response(&id, true, Some(&want)),
            LayerResponse::Partial(vec![(2, [3; 32])])
        );
        // A failed assembly forgets the relayed values.
        store.set_relayed(&id, &path, &[]);
        let h = store.have(&HaveKey::Blake3(*id.hash())).unwrap();
        assert_eq!(h.chaining.ones().collect::<Vec<_>>(), vec![0]);

        // Members: the node states itself in have answers while it downloads, and after,
        // while it holds the content; the view goes with the content.
        let me = libp2p::PeerId::random();
        let other = libp2p::PeerId::random();
        store.join_members(id, me, Instant::now());
        store.with_members(&id, |v| {
            v.merge(
                &other,
                &[shoal_protocol::Member {
                    peer_id: Bytes::from(other.to_bytes()),
                    heartbeat: 1,
                    done: 0,
                    origin: true,
                }],
                Instant::now(),
            );
        });
        let ids = |store: &ContentStore| -> Vec<Bytes> {
            store
                .have(&HaveKey::Blake3(*id.hash()))
                .map(|h| h.members.into_iter().map(|m| m.peer_id).collect())
                .unwrap_or_default()
        };
        assert_eq!(
            ids(&store),
            vec![Bytes::from(me.to_bytes()), Bytes::from(other.to_bytes())]
        );
        store.leave_members(&id);
        assert_eq!(ids(&store), vec![Bytes::from(me.to_bytes())]);
        store.remove_at(&id, &path);
        assert!(store.with_members(&id, |_| ()).is_none());
    }

    /// A file of three 16 KiB pieces and its layer.
    fn three_pieces(dir: &Path) -> (PathBuf, Vec<u8>, PieceLayer) {
        let bytes: Vec<u8> = (0..48 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.join("content");
        std::fs::write(&path, &bytes).unwrap();
        let d = shoal_validator::hash_reader(&bytes[..], bytes.len() as u64).unwrap();
        (path, bytes, d.layer)
    }

    #[test]
    fn a_swarm_serves_only_its_own_origin_pieces_as_claimed_then_the_verified_content() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, layer) = three_pieces(dir.path());
        let real = layer.content_id();
        let sha = shoal_validator::hash_reader(&bytes[..], bytes.len() as u64)
            .unwrap()
            .sha256;
        let swarm = shoal_validator::sha256_swarm_id(&sha, bytes.len() as u64).unwrap();
        let store = ContentStore::new();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        assert!(store.begin_assembly(swarm, path.clone(), Backing::Held(file.clone()), Some(sha)));
        // A SHA-256 lookup finds the swarm while nothing verified answers it.
        assert_eq!(store.have(&HaveKey::Sha256(sha)).unwrap().content_id, swarm);
        // Piece 1 was fetched from the origin here: claimed, and served while its bytes are
        // the claimed ones. Piece 0 (say, taken from a peer) is neither claimed nor served.
        let cv1 = layer.chaining_values()[1];
        store.add_claim(&swarm, &path, 1, cv1);
        assert_eq!(
            store.read_piece(&swarm, 1).unwrap(),
            &bytes[16 * 1024..32 * 1024]
        );
        assert!(store.read_piece(&swarm, 0).is_none());
        // A claim the bytes do not match (they changed since they were claimed) is not
        // served from a file others can write (decision 0020)...
        use std::os::unix::fs::PermissionsExt;
        let chmod = |mode| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        chmod(0o664);
        store.add_claim(&swarm, &path, 2, [0; 32]);
        assert!(store.read_piece(&swarm, 2).is_none());
        // ...and from one only this process's user writes, it is read as it is, unchecked
        // (its receivers' checks cover it: decision 0016's bound on a lying member).
        chmod(0o644);
        assert_eq!(
            store.read_piece(&swarm, 2).unwrap(),
            &bytes[32 * 1024..48 * 1024]
        );
        // Verified: the swarm is served from the verified content, every piece, under the
        // swarm id, and SHA-256 lookups find the verified content.
        store.insert(
            layer.clone(),
            Bitfield::full(3),
            path.clone(),
            Backing::Held(file),
        );
        store.set_sha256(&real, sha);
        store.join_members(swarm, libp2p::PeerId::random(), Instant::now());
        store.alias_swarm(swarm, &path, real);
        // The download that joined the swarm's view ends; the node stays a member while it
        // serves the verified content.
        store.leave_members(&swarm);
        assert!(store.with_members(&swarm, |_| ()).is_some());
        assert_eq!(store.have(&HaveKey::Sha256(sha)).unwrap().content_id, real);
        let h = store.have(&HaveKey::Blake3(*swarm.hash())).unwrap();
        assert_eq!((h.content_id, h.have.count_ones()), (swarm, 3));
        assert_eq!(store.read_piece(&swarm, 0).unwrap(), &bytes[..16 * 1024]);
        // The verified content goes: so does the swarm, and its member view.
        store.remove_at(&real, &path);
        assert!(store.have(&HaveKey::Blake3(*swarm.hash())).is_none());
        assert!(store.read_piece(&swarm, 0).is_none());
        assert!(store.with_members(&swarm, |_| ()).is_none());
    }

    #[test]
    fn a_piece_is_served_only_from_the_file_that_verified_and_only_as_it_verified() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, layer) = three_pieces(dir.path());
        let id = layer.content_id();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, vec![0x5a; bytes.len()]).unwrap();
        let piece = |i: usize| Bytes::copy_from_slice(&bytes[i * 16384..(i + 1) * 16384]);

        // Reopened by name: served while it is the file that verified.
        let store = ContentStore::new();
        let file = File::open(&path).unwrap();
        let backing = Backing::named(&file, None).unwrap();
        store.insert(layer.clone(), Bitfield::full(3), path.clone(), backing);
        assert_eq!(store.read_piece(&id, 0), Some(piece(0)));
        // A symlink to another file of the same length: nothing is read through it.
        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        assert_eq!(store.read_piece(&id, 1), None);
        // A FIFO: refused at once, without waiting for a writer.
        std::fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(store.read_piece(&id, 1), None);
        // Another regular file with the same bytes at the path: not the file that verified.
        std::fs::remove_file(&path).unwrap();
        std::fs::copy(&moved, &path).unwrap();
        assert_eq!(store.read_piece(&id, 1), None);
        // The file itself back: served again.
        std::fs::rename(&moved, &path).unwrap();
        assert_eq!(store.read_piece(&id, 1), Some(piece(1)));
        // Its bytes changed in place while others may write it (mode 0664): checked against
        // the chaining value, never sent, and no longer offered.
        use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"changed", 16384 * 2 + 5).unwrap();
        assert_eq!(store.read_piece(&id, 2), None);
        let have = store.have(&HaveKey::Blake3(*id.hash())).unwrap().have;
        assert_eq!(have.ones().collect::<Vec<_>>(), vec![0, 1]);
        // Only this process's user can write it (mode 0644, owned by it): read without the
        // second BLAKE3 (decision 0020), so a change its user made goes out as it is, and the
        // receiver's check refuses it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        f.write_all_at(b"changed", 5).unwrap();
        let sent = store.read_piece(&id, 0).unwrap();
        assert_eq!(&sent[5..12], b"changed");
        assert!(layer.verify_piece(0, &sent).is_err());
        // Group-writable again: checked, and no longer offered.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(store.read_piece(&id, 0), None);
        let have = store.have(&HaveKey::Blake3(*id.hash())).unwrap().have;
        assert_eq!(have.ones().collect::<Vec<_>>(), vec![1]);

        // Through a held descriptor: whatever the path names now, only the verified bytes.
        let (path, _, layer) = three_pieces(&dir.path().join("held").tap_mkdir());
        let store = ContentStore::new();
        let held = Arc::new(File::open(&path).unwrap());
        store.insert(layer, Bitfield::full(3), path.clone(), Backing::Held(held));
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&secret, &path).unwrap();
        assert_eq!(store.read_piece(&id, 0), Some(piece(0)));
    }

    #[test]
    fn a_recent_piece_is_served_from_memory_once_peers_asked_and_only_while_offered() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, layer) = three_pieces(dir.path());
        let id = layer.content_id();
        let cvs = layer.chaining_values().to_vec();
        let piece = |i: usize| Bytes::copy_from_slice(&bytes[i * 16384..(i + 1) * 16384]);
        let store = ContentStore::new();
        let held = Arc::new(File::open(&path).unwrap());
        let mut verified = Bitfield::new(3);
        verified.set(0);
        verified.set(1);
        store.insert(layer, verified, path, Backing::Held(held));
        // Nobody asked yet: a download nobody fetches from keeps nothing in memory.
        let p0 = piece(0);
        store.keep_recent(&id, 0, cvs[0], p0.clone());
        assert_eq!(store.read_piece_in_memory(&id, 0), None);
        // A peer asked (the read above): from now on verified pieces are kept, and served as
        // they are, without a read.
        store.keep_recent(&id, 0, cvs[0], p0.clone());
        let got = store.read_piece_in_memory(&id, 0).unwrap();
        assert_eq!(got.as_ptr(), p0.as_ptr());
        assert_eq!(store.read_piece(&id, 0).unwrap().as_ptr(), p0.as_ptr());
        // A copy kept with another chaining value than the layer's (bytes kept before a layer
        // or a refuted claim said otherwise) is never served: the file's bytes are.
        let stale = Bytes::from(vec![0xee; 16384]);
        store.keep_recent(&id, 1, cvs[0], stale);
        assert_eq!(store.read_piece_in_memory(&id, 1), None);
        assert_eq!(store.read_piece(&id, 1), Some(piece(1)));
        // Kept but not offered (not verified), or another content: never served.
        store.keep_recent(&id, 2, cvs[2], piece(2));
        assert_eq!(store.read_piece_in_memory(&id, 2), None);
        assert_eq!(store.read_piece(&id, 2), None);
        let other = ContentId::new([9; 32], 3 * 16384).unwrap();
        assert_eq!(store.read_piece_in_memory(&other, 0), None);
    }

    #[test]
    fn the_recent_pieces_are_bounded_and_a_piece_kept_again_replaces_its_copy() {
        let id = ContentId::new([1; 32], 1 << 30).unwrap();
        let (cv1, cv2) = ([1u8; 32], [2u8; 32]);
        let mut recent = Recent::default();
        let piece = |fill: u8| Bytes::from(vec![fill; 1 << 20]);
        for i in 0..10 {
            recent.keep(id, i, cv1, piece(1));
        }
        assert_eq!(recent.bytes, RECENT_BYTES);
        assert_eq!(recent.pieces.len(), RECENT_BYTES >> 20);
        assert!(recent.get(&id, 0, &cv1).is_none(), "the oldest went first");
        assert!(recent.get(&id, 9, &cv1).is_some());
        assert!(
            recent.get(&id, 9, &cv2).is_none(),
            "only with its chaining value"
        );
        recent.keep(id, 9, cv2, piece(2));
        assert_eq!(recent.pieces.len(), RECENT_BYTES >> 20);
        assert_eq!(recent.get(&id, 9, &cv2).unwrap()[0], 2);
        assert!(recent.get(&id, 9, &cv1).is_none(), "the old copy is gone");
        // A piece larger than the bound is not kept.
        recent.keep(id, 11, cv1, Bytes::from(vec![0; RECENT_BYTES + 1]));
        assert!(recent.get(&id, 11, &cv1).is_none());
        assert_eq!(recent.bytes, RECENT_BYTES);
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> Self;
    }

    impl TapMkdir for PathBuf {
        fn tap_mkdir(self) -> Self {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }
}
