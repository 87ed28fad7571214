//! The content store: which verified content this node holds and where its bytes are.
//!
//! An entry maps a content id to a file on disk (a job's temporary file while it downloads, the
//! final file after Complete, or a seeded file), its verified piece layer, and a bitfield of the
//! pieces whose bytes verified and are written. Only verified pieces are ever served: an entry
//! exists only once its layer is verified, and a piece's bit is set only after its bytes verified
//! and reached the disk. A SHA-256 maps to a content id only after this node computed that
//! SHA-256 over the whole file itself.
//!
//! This core keeps entries in memory; persistence comes with the daemon.

use std::{
    collections::HashMap,
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::RwLock,
};

use bytes::Bytes;
use shoal_protocol::{Bitfield, HaveKey, PieceIndex};
use shoal_validator::{ChainingValue, ContentId, PieceLayer, Sha256Digest};

/// One piece of content this node can serve.
#[derive(Clone, Debug)]
struct Entry {
    layer: PieceLayer,
    verified: Bitfield,
    path: PathBuf,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<ContentId, Entry>,
    by_hash: HashMap<[u8; 32], ContentId>,
    by_sha256: HashMap<Sha256Digest, ContentId>,
}

/// The registry of verified content, shared by the swarm (serving) and the jobs (filling it).
#[derive(Debug, Default)]
pub struct ContentStore {
    inner: RwLock<Inner>,
    /// Signalled when the set of content ids or SHA-256s changes (one waiter: the swarm, which
    /// announces them in the DHT).
    changed: tokio::sync::Notify,
}

impl ContentStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers content whose bytes are (or will be) at `path`, with the pieces in `verified`
    /// already verified and written. Replaces an existing entry for the same content id only
    /// when that one holds fewer pieces.
    pub fn insert(&self, layer: PieceLayer, verified: Bitfield, path: PathBuf) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let id = layer.content_id();
        if let Some(old) = inner.by_id.get(&id)
            && old.verified.count_ones() >= verified.count_ones()
            && old.path.exists()
        {
            return;
        }
        inner.by_hash.insert(*id.hash(), id);
        self.changed.notify_one();
        inner.by_id.insert(
            id,
            Entry {
                layer,
                verified,
                path,
            },
        );
    }

    /// Marks piece `index` of `id` as verified and written to `path`.
    pub fn mark_verified(&self, id: &ContentId, path: &Path, index: PieceIndex) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.by_id.get_mut(id)
            && e.path == path
        {
            e.verified.set(index);
        }
    }

    /// Records that this node computed `sha256` over the whole of `id`.
    pub fn set_sha256(&self, id: &ContentId, sha256: Sha256Digest) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.by_id.contains_key(id) && inner.by_sha256.insert(sha256, *id) != Some(*id) {
            self.changed.notify_one();
        }
    }

    /// Moves the entry of `id` to a new path (after Complete renamed its file), if it was at
    /// `old`.
    pub fn relocate(&self, id: &ContentId, old: &Path, new: PathBuf) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = inner.by_id.get_mut(id)
            && e.path == old
        {
            e.path = new;
        }
    }

    /// Forgets `id` if its bytes are at `path` (a temporary file being deleted).
    pub fn remove_at(&self, id: &ContentId, path: &Path) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if inner.by_id.get(id).is_some_and(|e| e.path == path) {
            inner.by_id.remove(id);
            inner.by_hash.remove(id.hash());
            inner.by_sha256.retain(|_, v| v != id);
            self.changed.notify_one();
        }
    }

    /// Resolves when the set of content ids or SHA-256s changed since the last call resolved
    /// (for one waiter).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// The keys this node can answer have queries for: every content id's BLAKE3 hash and
    /// every SHA-256 it computed.
    #[must_use]
    pub fn keys(&self) -> Vec<HaveKey> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .keys()
            .map(|id| HaveKey::Blake3(*id.hash()))
            .chain(inner.by_sha256.keys().map(|d| HaveKey::Sha256(*d)))
            .collect()
    }

    /// What this node holds for a have query: the content id and its verified pieces.
    #[must_use]
    pub fn have(&self, key: &HaveKey) -> Option<(ContentId, Bitfield)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let id = match key {
            HaveKey::Blake3(h) => *inner.by_hash.get(h)?,
            HaveKey::Sha256(d) => *inner.by_sha256.get(d)?,
        };
        inner.by_id.get(&id).map(|e| (id, e.verified.clone()))
    }

    /// The verified piece layer of `id`.
    #[must_use]
    pub fn layer(&self, id: &ContentId) -> Option<Vec<ChainingValue>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .get(id)
            .map(|e| e.layer.chaining_values().to_vec())
    }

    /// Reads verified piece `index` of `id` from disk (blocking). `None` when the piece is not
    /// held or the read fails.
    #[must_use]
    pub fn read_piece(&self, id: &ContentId, index: PieceIndex) -> Option<Bytes> {
        let (path, range) = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            let e = inner.by_id.get(id)?;
            if !e.verified.get(index) {
                return None;
            }
            (e.path.clone(), id.piece_range(index)?)
        };
        let len = (range.end - range.start) as usize;
        let mut file = File::open(path).ok()?;
        file.seek(SeekFrom::Start(range.start)).ok()?;
        // `read_to_end` fills spare capacity without zeroing it first.
        let mut buf = Vec::with_capacity(len);
        file.take(len as u64).read_to_end(&mut buf).ok()?;
        (buf.len() == len).then(|| Bytes::from(buf))
    }

    /// The content ids held, with how many pieces of each are verified.
    #[must_use]
    pub fn list(&self) -> Vec<(ContentId, u32)> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .iter()
            .map(|(id, e)| (*id, e.verified.count_ones()))
            .collect()
    }
}
