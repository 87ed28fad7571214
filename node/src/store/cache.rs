//! The content-addressed cache: verified files kept for serving peers and for later jobs of the
//! same content, with Delivery Optimization's limits.
//!
//! A file enters the cache when a download verified it (every piece against its piece layer and
//! the whole file against its expected digests): its temporary file is cloned (`FICLONE`, a
//! reflink, where the file system can; a copy otherwise) to `DIR/HASH-LENGTH`, and from then on
//! the node serves the content from the cache's copy, which nobody but the node writes. The
//! job's temporary file still becomes the local name at Complete, so Complete stays one
//! rename. A later job of the same content is filled from the cache: the cached file is cloned
//! into the job's temporary file and hashed again before the job may count it as transferred.
//!
//! Limits, after Delivery Optimization's cache policies:
//!
//! | setting | DO policy | default |
//! | --- | --- | --- |
//! | [`CacheConfig::max_size_bytes`] | DOAbsoluteMaxCacheSize | none |
//! | [`CacheConfig::max_size_percent`] | DOMaxCacheSize (percent of the disk) | 20 % |
//! | [`CacheConfig::max_age`] | DOMaxCacheAge (since the file was cached) | 3 days |
//! | [`CacheConfig::min_file_size`] | DOMinFileSizeToCache | 1 MiB |
//!
//! A sweep (every minute, and after a file entered) evicts first every entry older than the
//! maximum age, then the least recently used entries (used: cached, served to a peer, or copied
//! into a job) until the cache fits its size. Pinned entries and entries whose content a job
//! that is not Acknowledged or Cancelled names are never evicted. Eviction withdraws the
//! content from peers (and its provider records) before the file is deleted.
//!
//! The index (`DIR/index.redb`) keeps each entry's piece layer, SHA-256, times and pin, so the
//! cache survives restarts. Crash order: a file is written, flushed and renamed before its
//! record is committed, and a record is deleted before its file; files without a record are
//! deleted at start. A record whose file is missing or has the wrong length is dropped.
//!
//! Ages are measured on [`tokio::time`]'s clock from the wall-clock time the cache opened, so a
//! test with paused time can age entries.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shoal_protocol::HaveKey;
use shoal_validator::{ContentId, PieceLayer, Sha256Digest};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    store::ContentStore,
    timestamp::{from_ms, to_ms},
};

/// The directory, in the cache directory, of a cache node's downloads in progress.
pub(crate) const FILLS_DIR: &str = "fills";
/// The index's file name in the cache directory.
pub(crate) const INDEX_FILE: &str = "index.redb";
/// The value of `meta/format` this code writes and reads.
const FORMAT: &[u8] = b"shoal-cache/1";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const LAYERS: TableDefinition<&str, &[u8]> = TableDefinition::new("layers");

/// How often the cache is swept when nothing enters it.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Settings of the cache. [`Default`] gives Delivery Optimization's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    /// The cache directory (created with mode 0700); `None`: `cache` in the node's state
    /// directory.
    pub dir: Option<PathBuf>,
    /// At most this many bytes (DO's DOAbsoluteMaxCacheSize); `None`: no absolute limit.
    pub max_size_bytes: Option<u64>,
    /// At most this percentage (0–100) of the size of the file system holding the cache
    /// (DO's DOMaxCacheSize); `None`: no relative limit. Default 20.
    pub max_size_percent: Option<f64>,
    /// Entries older than this (since they were cached) are evicted (DO's DOMaxCacheAge).
    /// Default 3 days (259 200 s).
    pub max_age: Duration,
    /// Files smaller than this many bytes are not cached (DO's DOMinFileSizeToCache).
    /// Default 1 MiB.
    pub min_file_size: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_size_bytes: None,
            max_size_percent: Some(20.0),
            max_age: Duration::from_secs(3 * 24 * 3600),
            min_file_size: 1 << 20,
        }
    }
}

/// Errors of the cache.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The cache directory could not be created or read.
    #[error("cache directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The index could not be opened, read or written.
    #[error("cache index {path}: {source}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// The cause.
        source: Box<redb::Error>,
    },
    /// The index file is not a Shoal cache index.
    #[error("{path} is not a Shoal cache index (format {found:?})")]
    Foreign {
        /// The index file.
        path: PathBuf,
        /// The marker found, if any.
        found: Option<String>,
    },
    /// The cache holds no entry for this content.
    #[error("the cache holds no {0}")]
    Unknown(String),
    /// Copying a file into or out of the cache failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The cache needs a directory: none was given and the node has no state directory.
    #[error("the cache needs a directory: set one, or give the node a state directory")]
    NoDir,
    /// The cache node role was set without a cache.
    #[error("a cache node needs a cache: configure one")]
    NoCache,
}

/// One cached file, as [`crate::Node::cache_items`] lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheItem {
    /// What the file is.
    pub content_id: ContentId,
    /// Its SHA-256, computed by this node.
    pub sha256: Option<Sha256Digest>,
    /// Its length in bytes.
    pub bytes: u64,
    /// When it was cached.
    pub added: SystemTime,
    /// When it was last cached, served to a peer or copied into a job.
    pub used: SystemTime,
    /// Pinned entries are never evicted.
    pub pinned: bool,
    /// The cached file.
    pub path: PathBuf,
}

/// How full the cache is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Bytes of the cached files.
    pub bytes: u64,
    /// The size limit in bytes (the smaller of the absolute and the relative one).
    pub limit: u64,
    /// How many files are cached.
    pub entries: usize,
    /// Of `bytes`: pinned.
    pub pinned_bytes: u64,
}

/// An entry's record in the index.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    sha256: Option<String>,
    added_ms: u64,
    used_ms: u64,
    pinned: bool,
}

#[derive(Clone, Debug)]
struct Entry {
    sha256: Option<Sha256Digest>,
    added: SystemTime,
    used: SystemTime,
    pinned: bool,
    /// `used` changed since the index last recorded it.
    dirty: bool,
}

impl Entry {
    fn meta(&self) -> Meta {
        Meta {
            sha256: self.sha256.map(|d| d.to_string()),
            added_ms: to_ms(self.added),
            used_ms: to_ms(self.used),
            pinned: self.pinned,
        }
    }
}

/// Wall-clock time read off tokio's clock: the wall-clock time at start plus tokio's elapsed
/// time, so that paused time in tests ages entries.
#[derive(Debug)]
struct Clock {
    wall: SystemTime,
    mono: tokio::time::Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> SystemTime {
        self.wall + self.mono.elapsed()
    }
}

/// The cache of one node. Its methods block on the file system: call them from blocking
/// threads.
#[derive(Debug)]
pub(crate) struct Cache {
    dir: PathBuf,
    index: PathBuf,
    config: CacheConfig,
    db: Database,
    entries: Mutex<HashMap<ContentId, Entry>>,
    clock: Clock,
    store: Arc<ContentStore>,
    /// The size of the file system holding the cache, in bytes.
    disk_bytes: u64,
    /// Signalled when a file entered (the node's sweeper waits on it).
    wake: tokio::sync::Notify,
    /// Held while a record is written, so that each write reads the map after the last.
    writes: Mutex<()>,
    /// Content being copied into the cache now (a second copy of it waits its turn).
    admitting: Mutex<HashSet<ContentId>>,
    /// The keys in use at the last sweep: entries matching them cannot be evicted, so their
    /// bytes count against the limit when a new file asks to come in.
    in_use: Mutex<HashSet<HaveKey>>,
}

/// Whether `name` is one the cache makes: `HASH-LENGTH` (64 hex digits), or a part file of
/// it (`HASH-LENGTH.*.part`). Only such files are deleted at start, whatever else shares the
/// directory.
fn is_cache_name(name: &str) -> bool {
    let Some((hash, rest)) = name.split_at_checked(64) else {
        return false;
    };
    hash.bytes().all(|b| b.is_ascii_hexdigit())
        && rest.strip_prefix('-').is_some_and(|r| {
            let digits = r.bytes().take_while(u8::is_ascii_digit).count();
            digits > 0 && (digits == r.len() || r.ends_with(".part"))
        })
}

/// The file name of `id` in the cache directory.
fn file_name(id: &ContentId) -> String {
    format!("{}-{}", id.hash_hex(), id.length())
}

impl Cache {
    /// Opens (or creates) the cache in `dir`, drops records whose file is gone, deletes files
    /// without a record, and registers every entry in `store`, which then serves it.
    ///
    /// # Errors
    /// [`CacheError::Dir`] when the directory cannot be created or listed,
    /// [`CacheError::Index`] when the index cannot be opened or read,
    /// [`CacheError::Foreign`] when it is another program's file.
    pub(crate) fn open(
        dir: PathBuf,
        config: CacheConfig,
        store: Arc<ContentStore>,
    ) -> Result<Self, CacheError> {
        let dir_err = |e| CacheError::Dir {
            path: dir.clone(),
            source: e,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(dir_err)?;
        }
        crate::store::fsuser::check_private_dir(&dir).map_err(dir_err)?;
        let index = dir.join(INDEX_FILE);
        let idx_err = |e: redb::Error| CacheError::Index {
            path: index.clone(),
            source: Box::new(e),
        };
        let db = Database::create(&index).map_err(|e| idx_err(e.into()))?;
        {
            let tx = db.begin_write().map_err(|e| idx_err(e.into()))?;
            {
                let mut meta = tx.open_table(META).map_err(|e| idx_err(e.into()))?;
                let found = meta
                    .get("format")
                    .map_err(|e| idx_err(e.into()))?
                    .map(|v| v.value().to_vec());
                match found {
                    None => {
                        meta.insert("format", FORMAT)
                            .map_err(|e| idx_err(e.into()))?;
                    }
                    Some(f) if f == FORMAT => {}
                    Some(f) => {
                        return Err(CacheError::Foreign {
                            path: index.clone(),
                            found: Some(String::from_utf8_lossy(&f).into_owned()),
                        });
                    }
                }
                tx.open_table(ENTRIES).map_err(|e| idx_err(e.into()))?;
                tx.open_table(LAYERS).map_err(|e| idx_err(e.into()))?;
            }
            tx.commit().map_err(|e| idx_err(e.into()))?;
        }
        let disk_bytes = rustix::fs::statvfs(&dir)
            .map(|s| s.f_blocks.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX);
        let cache = Self {
            dir,
            index,
            config,
            db,
            entries: Mutex::new(HashMap::new()),
            clock: Clock::new(),
            store,
            disk_bytes,
            wake: tokio::sync::Notify::new(),
            writes: Mutex::new(()),
            admitting: Mutex::new(HashSet::new()),
            in_use: Mutex::new(HashSet::new()),
        };
        cache.load()?;
        Ok(cache)
    }

    fn idx_err(&self, e: impl Into<redb::Error>) -> CacheError {
        CacheError::Index {
            path: self.index.clone(),
            source: Box::new(e.into()),
        }
    }

    /// Reads the index, keeps the entries whose file is there with its length and whose
    /// layer verifies, and deletes the rest and every stray file.
    fn load(&self) -> Result<(), CacheError> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        {
            let tx = self.db.begin_read().map_err(|e| self.idx_err(e))?;
            let entries = tx.open_table(ENTRIES).map_err(|e| self.idx_err(e))?;
            let layers = tx.open_table(LAYERS).map_err(|e| self.idx_err(e))?;
            for row in entries.iter().map_err(|e| self.idx_err(e))? {
                let (k, v) = row.map_err(|e| self.idx_err(e))?;
                let key = k.value().to_owned();
                let layer = layers
                    .get(key.as_str())
                    .map_err(|e| self.idx_err(e))?
                    .map(|l| l.value().to_vec());
                match self.entry_of(&key, v.value(), layer.as_deref()) {
                    Ok(e) => good.push(e),
                    Err(why) => {
                        warn!(entry = %key, "dropping a cache record: {why}");
                        bad.push(key);
                    }
                }
            }
        }
        if !bad.is_empty() {
            let tx = self.db.begin_write().map_err(|e| self.idx_err(e))?;
            {
                let mut entries = tx.open_table(ENTRIES).map_err(|e| self.idx_err(e))?;
                let mut layers = tx.open_table(LAYERS).map_err(|e| self.idx_err(e))?;
                for k in &bad {
                    entries.remove(k.as_str()).map_err(|e| self.idx_err(e))?;
                    layers.remove(k.as_str()).map_err(|e| self.idx_err(e))?;
                }
            }
            tx.commit().map_err(|e| self.idx_err(e))?;
        }
        let names: HashSet<String> = good
            .iter()
            .map(|(l, _)| file_name(&l.content_id()))
            .collect();
        let listing = std::fs::read_dir(&self.dir).map_err(|e| CacheError::Dir {
            path: self.dir.clone(),
            source: e,
        })?;
        for f in listing.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name == FILLS_DIR {
                // A cache node's fills that a stop interrupted start again when asked.
                let _ = std::fs::remove_dir_all(f.path());
                continue;
            }
            if is_cache_name(&name) && !names.contains(&name) {
                info!(file = %f.path().display(), "deleting a file the cache index does not know");
                let _ = std::fs::remove_file(f.path());
            }
        }
        let mut map = self.lock();
        for (layer, entry) in good {
            let id = layer.content_id();
            let path = self.path_of(&id);
            let backing = match own_backing(&path) {
                Ok(b) => b,
                Err(e) => {
                    warn!(file = %path.display(), "not serving a cached file: {e}");
                    continue;
                }
            };
            self.store.insert_complete(layer, path, backing);
            if let Some(s) = entry.sha256 {
                self.store.set_sha256(&id, s);
            }
            map.insert(id, entry);
        }
        if !map.is_empty() {
            info!(entries = map.len(), dir = %self.dir.display(), "cache opened");
        }
        Ok(())
    }

    /// The entry of one index row, if its file is there and its layer verifies.
    fn entry_of(
        &self,
        key: &str,
        meta: &[u8],
        layer: Option<&[u8]>,
    ) -> Result<(PieceLayer, Entry), String> {
        let id: ContentId = key.parse().map_err(|e| format!("content id: {e}"))?;
        let meta: Meta = serde_json::from_slice(meta).map_err(|e| format!("record: {e}"))?;
        let cvs = shoal_validator::chaining_values_from_bytes(layer.ok_or("no piece layer")?)
            .map_err(|e| e.to_string())?;
        let layer = PieceLayer::verify(id, cvs).map_err(|e| format!("piece layer: {e}"))?;
        let sha256 = match &meta.sha256 {
            None => None,
            Some(h) => Some(h.parse().map_err(|e| format!("SHA-256: {e}"))?),
        };
        let path = self.path_of(&id);
        let len = std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if len != id.length() {
            return Err(format!(
                "{} holds {len} bytes, not {}",
                path.display(),
                id.length()
            ));
        }
        Ok((
            layer,
            Entry {
                sha256,
                added: from_ms(meta.added_ms),
                used: from_ms(meta.used_ms),
                pinned: meta.pinned,
                dirty: false,
            },
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the cached file of `id` is.
    pub(crate) fn path_of(&self, id: &ContentId) -> PathBuf {
        self.dir.join(file_name(id))
    }

    /// Where a cache node downloads content a peer asked for (created on demand; emptied at
    /// start).
    pub(crate) fn fills_dir(&self) -> PathBuf {
        self.dir.join(FILLS_DIR)
    }

    /// The size limit in bytes: the smaller of the absolute limit and the percentage of the
    /// disk.
    pub(crate) fn limit(&self) -> u64 {
        let relative = self.config.max_size_percent.map_or(u64::MAX, |p| {
            (self.disk_bytes as f64 * p.clamp(0.0, 100.0) / 100.0) as u64
        });
        relative.min(self.config.max_size_bytes.unwrap_or(u64::MAX))
    }

    /// The current time on the cache's clock.
    pub(crate) fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Resolves when a file entered the cache since the last call resolved (one waiter).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Caches the verified file `src` (its bytes are the content of `layer`; `sha256` was
    /// computed over them). Returns where the cached copy is, or `None` when the file is
    /// smaller than the minimum size (unless `any_size`: a cache node's fill) or does not fit
    /// beside the pinned entries. An entry
    /// already cached is only marked used.
    ///
    /// # Errors
    /// [`CacheError::Io`] when the copy cannot be written, [`CacheError::Index`] when its
    /// record cannot be committed (the copy is then deleted).
    pub(crate) fn admit(
        &self,
        layer: &PieceLayer,
        sha256: Option<Sha256Digest>,
        src: &File,
        any_size: bool,
    ) -> Result<Option<PathBuf>, CacheError> {
        let id = layer.content_id();
        let len = id.length();
        if len < self.config.min_file_size && !any_size {
            return Ok(None);
        }
        let now = self.now();
        {
            let mut map = self.lock();
            if let Some(e) = map.get_mut(&id) {
                e.used = now;
                e.dirty = true;
                return Ok(Some(self.path_of(&id)));
            }
            // Entries served since the last sweep were used before this admission: record it
            // now, so that the newcomer is not the least recently used one.
            for (id, e) in map.iter_mut() {
                if self.store.take_served(id, &self.path_of(id)) {
                    e.used = now;
                    e.dirty = true;
                }
            }
            if !self
                .admitting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id)
            {
                // Another download of the same content is copying it in.
                return Ok(None);
            }
            // What no sweep may evict: pinned entries and those of unfinished jobs.
            let in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            let pinned: u64 = map
                .iter()
                .filter(|(id, e)| {
                    e.pinned
                        || in_use.contains(&HaveKey::Blake3(*id.hash()))
                        || e.sha256
                            .is_some_and(|s| in_use.contains(&HaveKey::Sha256(s)))
                })
                .map(|(id, _)| id.length())
                .sum();
            drop(in_use);
            if pinned.saturating_add(len) > self.limit() {
                self.admitted(&id);
                info!(%id, limit = self.limit(), "not caching: the file does not fit the cache");
                return Ok(None);
            }
        }
        let r = self.copy_in(layer, sha256, src);
        self.admitted(&id);
        let (path, reflinked) = r?;
        let entry = Entry {
            sha256,
            added: now,
            used: now,
            pinned: false,
            dirty: false,
        };
        {
            let _w = self.writes.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = self.write(&id, Some((&entry, layer))) {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            self.lock().insert(id, entry);
        }
        let backing = own_backing(&path).map_err(|e| CacheError::Io {
            path: path.clone(),
            source: e,
        })?;
        self.store
            .insert_complete(layer.clone(), path.clone(), backing);
        if let Some(s) = sha256 {
            self.store.set_sha256(&id, s);
        }
        info!(%id, reflinked, "cached");
        self.wake.notify_one();
        Ok(Some(path))
    }

    /// Ends an admission of `id` (see `admitting`).
    fn admitted(&self, id: &ContentId) {
        self.admitting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Copies `src` into a part file of its own, hashes the copy (the source may be a file
    /// its user can still write), and renames it to the entry's name. Returns the path and
    /// whether the copy is a reflink.
    fn copy_in(
        &self,
        layer: &PieceLayer,
        sha256: Option<Sha256Digest>,
        src: &File,
    ) -> Result<(PathBuf, bool), CacheError> {
        let id = layer.content_id();
        let path = self.path_of(&id);
        let io = |e| CacheError::Io {
            path: path.clone(),
            source: e,
        };
        let part = tempfile::Builder::new()
            .prefix(&format!("{}.", file_name(&id)))
            .suffix(".part")
            .tempfile_in(&self.dir)
            .map_err(io)?;
        let reflinked = clone_or_copy(src, part.as_file(), id.length()).map_err(io)?;
        let copy = part.reopen().map_err(io)?;
        let d = shoal_validator::hash_reader(std::io::BufReader::new(copy), id.length())
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        if !d.is(&id, sha256) {
            return Err(io(std::io::Error::other(
                "the copy does not match the verified content (the source changed)",
            )));
        }
        part.as_file().sync_all().map_err(io)?;
        part.persist(&path).map_err(|e| io(e.error))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok((path, reflinked))
    }

    /// Writes (or with `None` deletes) the record of `id`.
    fn write(
        &self,
        id: &ContentId,
        entry: Option<(&Entry, &PieceLayer)>,
    ) -> Result<(), CacheError> {
        let key = id.to_string();
        let tx = self.db.begin_write().map_err(|e| self.idx_err(e))?;
        {
            let mut entries = tx.open_table(ENTRIES).map_err(|e| self.idx_err(e))?;
            let mut layers = tx.open_table(LAYERS).map_err(|e| self.idx_err(e))?;
            match entry {
                Some((e, layer)) => {
                    let meta = serde_json::to_vec(&e.meta()).unwrap_or_default();
                    entries
                        .insert(key.as_str(), meta.as_slice())
                        .map_err(|e| self.idx_err(e))?;
                    let flat = layer.chaining_values().concat();
                    layers
                        .insert(key.as_str(), flat.as_slice())
                        .map_err(|e| self.idx_err(e))?;
                }
                None => {
                    entries.remove(key.as_str()).map_err(|e| self.idx_err(e))?;
                    layers.remove(key.as_str()).map_err(|e| self.idx_err(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.idx_err(e))
    }

    /// The cached content a have query key names, if any, marked used: its content id and
    /// file.
    pub(crate) fn find(&self, key: &HaveKey) -> Option<(ContentId, PathBuf)> {
        let now = self.now();
        let mut map = self.lock();
        let (id, e) = map.iter_mut().find(|(id, e)| match key {
            HaveKey::Blake3(h) => id.hash() == h,
            HaveKey::Sha256(d) => e.sha256.as_ref() == Some(d),
        })?;
        e.used = now;
        e.dirty = true;
        Some((*id, self.path_of(id)))
    }

    /// Pins (`pinned`) or unpins the entry whose content id or SHA-256 is `key`.
    ///
    /// # Errors
    /// [`CacheError::Unknown`] when no entry matches, [`CacheError::Index`] when the record
    /// cannot be written.
    pub(crate) fn pin(&self, key: &HaveKey, pinned: bool) -> Result<ContentId, CacheError> {
        let _w = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let (id, entry) = {
            let mut map = self.lock();
            let (id, e) = map
                .iter_mut()
                .find(|(id, e)| match key {
                    HaveKey::Blake3(h) => id.hash() == h,
                    HaveKey::Sha256(d) => e.sha256.as_ref() == Some(d),
                })
                .ok_or_else(|| CacheError::Unknown(key.to_string()))?;
            e.pinned = pinned;
            e.dirty = false;
            (*id, e.clone())
        };
        let layer = self.layer_of(&id)?;
        self.write(&id, Some((&entry, &layer)))?;
        Ok(id)
    }

    /// The verified layer of a cached entry, from the index.
    fn layer_of(&self, id: &ContentId) -> Result<PieceLayer, CacheError> {
        let tx = self.db.begin_read().map_err(|e| self.idx_err(e))?;
        let layers = tx.open_table(LAYERS).map_err(|e| self.idx_err(e))?;
        let flat = layers
            .get(id.to_string().as_str())
            .map_err(|e| self.idx_err(e))?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| CacheError::Unknown(id.to_string()))?;
        shoal_validator::chaining_values_from_bytes(&flat)
            .ok()
            .and_then(|cvs| PieceLayer::verify(*id, cvs).ok())
            .ok_or_else(|| CacheError::Unknown(id.to_string()))
    }

    /// Evicts the entry whose content id or SHA-256 is `key`, pinned or not.
    ///
    /// # Errors
    /// [`CacheError::Unknown`] when no entry matches, [`CacheError::Index`] when the record
    /// cannot be deleted.
    pub(crate) fn evict(&self, key: &HaveKey) -> Result<ContentId, CacheError> {
        let id = {
            let map = self.lock();
            *map.iter()
                .find(|(id, e)| match key {
                    HaveKey::Blake3(h) => id.hash() == h,
                    HaveKey::Sha256(d) => e.sha256.as_ref() == Some(d),
                })
                .ok_or_else(|| CacheError::Unknown(key.to_string()))?
                .0
        };
        self.remove(&[id])?;
        Ok(id)
    }

    /// Deletes the records of `ids`, withdraws them from peers, then deletes their files.
    fn remove(&self, ids: &[ContentId]) -> Result<(), CacheError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _w = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let tx = self.db.begin_write().map_err(|e| self.idx_err(e))?;
        {
            let mut entries = tx.open_table(ENTRIES).map_err(|e| self.idx_err(e))?;
            let mut layers = tx.open_table(LAYERS).map_err(|e| self.idx_err(e))?;
            for id in ids {
                let key = id.to_string();
                entries.remove(key.as_str()).map_err(|e| self.idx_err(e))?;
                layers.remove(key.as_str()).map_err(|e| self.idx_err(e))?;
            }
        }
        tx.commit().map_err(|e| self.idx_err(e))?;
        {
            let mut map = self.lock();
            for id in ids {
                map.remove(id);
            }
        }
        for id in ids {
            let path = self.path_of(id);
            self.store.remove_at(id, &path);
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(file = %path.display(), "cannot delete an evicted cache file: {e}");
            }
        }
        Ok(())
    }

    /// Applies the limits: evicts the entries older than the maximum age, then the least
    /// recently used until the cache fits its size. Pinned entries and entries matching a key
    /// in `in_use` (content ids and SHA-256s of files of unfinished jobs) stay. Records when
    /// entries were last served. Returns the evicted content ids, oldest use first.
    ///
    /// # Errors
    /// [`CacheError::Index`] when the index cannot be written; nothing is evicted then.
    pub(crate) fn sweep(&self, in_use: &HashSet<HaveKey>) -> Result<Vec<ContentId>, CacheError> {
        in_use.clone_into(&mut self.in_use.lock().unwrap_or_else(|e| e.into_inner()));
        let now = self.now();
        let limit = self.limit();
        let (evict, dirty) = {
            let mut map = self.lock();
            for (id, e) in map.iter_mut() {
                if self.store.take_served(id, &self.path_of(id)) {
                    e.used = now;
                    e.dirty = true;
                }
            }
            let keep = |id: &ContentId, e: &Entry| {
                e.pinned
                    || in_use.contains(&HaveKey::Blake3(*id.hash()))
                    || e.sha256
                        .is_some_and(|s| in_use.contains(&HaveKey::Sha256(s)))
            };
            let mut candidates: Vec<(SystemTime, SystemTime, ContentId)> = map
                .iter()
                .filter(|(id, e)| !keep(id, e))
                .map(|(id, e)| (e.used, e.added, *id))
                .collect();
            candidates.sort();
            let mut total: u64 = map.keys().map(ContentId::length).sum();
            let mut evict = Vec::new();
            // By age first, then least recently used.
            candidates.retain(|(_, added, id)| {
                let old = now
                    .duration_since(*added)
                    .is_ok_and(|age| age > self.config.max_age);
                if old {
                    total -= id.length();
                    evict.push(*id);
                }
                !old
            });
            for (_, _, id) in candidates {
                if total <= limit {
                    break;
                }
                total -= id.length();
                evict.push(id);
            }
            let dirty: Vec<ContentId> = map
                .iter()
                .filter(|(id, e)| e.dirty && !evict.contains(id))
                .map(|(id, _)| *id)
                .collect();
            (evict, dirty)
        };
        if !dirty.is_empty() {
            // The records as the map holds them now, under the write lock: a pin committed
            // meanwhile is not overwritten by an older copy.
            let _w = self.writes.lock().unwrap_or_else(|e| e.into_inner());
            let current: Vec<(ContentId, Entry)> = {
                let mut map = self.lock();
                dirty
                    .iter()
                    .filter_map(|id| {
                        map.get_mut(id).map(|e| {
                            e.dirty = false;
                            (*id, e.clone())
                        })
                    })
                    .collect()
            };
            let tx = self.db.begin_write().map_err(|e| self.idx_err(e))?;
            {
                let mut entries = tx.open_table(ENTRIES).map_err(|e| self.idx_err(e))?;
                for (id, e) in &current {
                    let meta = serde_json::to_vec(&e.meta()).unwrap_or_default();
                    entries
                        .insert(id.to_string().as_str(), meta.as_slice())
                        .map_err(|e| self.idx_err(e))?;
                }
            }
            tx.commit().map_err(|e| self.idx_err(e))?;
        }
        self.remove(&evict)?;
        for id in &evict {
            info!(%id, "evicted from the cache");
        }
        Ok(evict)
    }

    /// Every entry, most recently used first.
    pub(crate) fn items(&self) -> Vec<CacheItem> {
        let map = self.lock();
        let mut items: Vec<CacheItem> = map
            .iter()
            .map(|(id, e)| CacheItem {
                content_id: *id,
                sha256: e.sha256,
                bytes: id.length(),
                added: e.added,
                used: e.used,
                pinned: e.pinned,
                path: self.path_of(id),
            })
            .collect();
        items.sort_by_key(|i| std::cmp::Reverse(i.used));
        items
    }

    /// How full the cache is.
    pub(crate) fn usage(&self) -> CacheUsage {
        let map = self.lock();
        CacheUsage {
            bytes: map.keys().map(ContentId::length).sum(),
            limit: self.limit(),
            entries: map.len(),
            pinned_bytes: map
                .iter()
                .filter(|(_, e)| e.pinned)
                .map(|(id, _)| id.length())
                .sum(),
        }
    }
}

/// Makes `dst` a copy of the first `len` bytes of `src`: a reflink (`FICLONE`, sharing the
/// blocks) where the file system can, else a kernel copy (`copy_file_range` through
/// [`std::io::copy`]). True when it reflinked.
///
/// # Errors
/// The copy's I/O error, or `UnexpectedEof` when `src` is shorter than `len`.
pub(crate) fn clone_or_copy(src: &File, dst: &File, len: u64) -> std::io::Result<bool> {
    if src.metadata()?.len() == len && rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(true);
    }
    dst.set_len(0)?;
    let mut reader = std::io::Read::take(src, len);
    let mut writer = dst;
    let n = std::io::copy(&mut reader, &mut writer)?;
    if n != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("copied {n} bytes of {len}"),
        ));
    }
    Ok(false)
}

/// How the store reads a file of the cache's own: reopened for each piece, only while it is
/// the regular file there now.
fn own_backing(path: &std::path::Path) -> std::io::Result<crate::store::Backing> {
    let file = crate::store::fsuser::open_regular(path, None)?;
    crate::store::Backing::named(&file, None)
}

#[cfg(test)]
mod tests {
    use std::{io::Write, path::Path};

    use super::*;

    fn file_of(dir: &Path, name: &str, len: usize, seed: u8) -> (File, PieceLayer, Sha256Digest) {
        let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let d = shoal_validator::hash_reader(bytes.as_slice(), len as u64).unwrap();
        (File::open(&path).unwrap(), d.layer, d.sha256)
    }

    fn config(max: u64) -> CacheConfig {
        CacheConfig {
            dir: None,
            max_size_bytes: Some(max),
            max_size_percent: None,
            max_age: Duration::from_secs(3 * 24 * 3600),
            min_file_size: 1000,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn files_of_unfinished_jobs_count_against_the_limit_so_the_cache_never_outgrows_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(ContentStore::new());
        let limit = 100_000;
        let cache = Cache::open(tmp.path().join("cache"), config(limit), store).unwrap();
        let files: Vec<_> = (0..3u8)
            .map(|i| file_of(tmp.path(), &format!("f{i}"), 45_000, 3 + 2 * i))
            .collect();
        // Three live jobs transferred three distinct files: none of them may be evicted.
        let mut in_use = HashSet::new();
        let mut admitted = 0;
        for (f, l, _) in &files {
            in_use.insert(HaveKey::Blake3(*l.content_id().hash()));
            if cache.admit(l, None, f, false).unwrap().is_some() {
                admitted += 1;
            }
            cache.sweep(&in_use).unwrap();
            assert!(
                cache.usage().bytes <= limit,
                "{} bytes",
                cache.usage().bytes
            );
        }
        assert_eq!(admitted, 2, "the third does not fit beside the two in use");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_older_than_the_maximum_age_are_evicted_unless_pinned_or_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(ContentStore::new());
        let cache = Cache::open(tmp.path().join("cache"), config(1 << 30), store.clone()).unwrap();
        let (a, la, _) = file_of(tmp.path(), "a", 40_000, 3);
        let (b, lb, sb) = file_of(tmp.path(), "b", 50_000, 5);
        let (c, lc, _) = file_of(tmp.path(), "c", 60_000, 7);
        let pa = cache.admit(&la, None, &a, false).unwrap().unwrap();
        cache.admit(&lb, Some(sb), &b, false).unwrap().unwrap();
        cache.admit(&lc, None, &c, false).unwrap().unwrap();
        assert_eq!(
            std::fs::read(&pa).unwrap(),
            std::fs::read(tmp.path().join("a")).unwrap()
        );
        assert!(
            store.read_piece(&la.content_id(), 0).is_some(),
            "a cached file is served"
        );
        cache
            .pin(&HaveKey::Blake3(*lc.content_id().hash()), true)
            .unwrap();
        // One second short of three days: nothing goes.
        tokio::time::advance(Duration::from_secs(3 * 24 * 3600 - 1)).await;
        assert!(cache.sweep(&HashSet::new()).unwrap().is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        // b's SHA-256 is named by an unfinished job; c is pinned; a goes.
        let in_use = HashSet::from([HaveKey::Sha256(sb)]);
        assert_eq!(cache.sweep(&in_use).unwrap(), vec![la.content_id()]);
        assert!(!pa.exists(), "the evicted file is deleted");
        assert!(
            store.read_piece(&la.content_id(), 0).is_none(),
            "and no longer served"
        );
        assert!(
            store
                .have(&HaveKey::Blake3(*la.content_id().hash()))
                .is_none()
        );
        // The job ended: b goes too; pinned c stays.
        assert_eq!(cache.sweep(&HashSet::new()).unwrap(), vec![lb.content_id()]);
        let left: Vec<_> = cache.items().into_iter().map(|i| i.content_id).collect();
        assert_eq!(left, vec![lc.content_id()]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_least_recently_used_entries_go_when_the_cache_is_over_its_size() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(ContentStore::new());
        // Room for two of the three 40 000-byte files.
        let cache = Cache::open(tmp.path().join("cache"), config(100_000), store.clone()).unwrap();
        let files: Vec<_> = (0..3)
            .map(|i| file_of(tmp.path(), &format!("f{i}"), 40_000, 3 + 2 * i as u8))
            .collect();
        for (f, l, _) in &files {
            cache.admit(l, None, f, false).unwrap().unwrap();
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        // f0 is used (a job found it), then f1 is served to a peer: f2 is the least recent.
        cache
            .find(&HaveKey::Blake3(*files[0].1.content_id().hash()))
            .unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(store.read_piece(&files[1].1.content_id(), 0).is_some());
        assert_eq!(
            cache.sweep(&HashSet::new()).unwrap(),
            vec![files[2].1.content_id()]
        );
        assert_eq!(cache.usage().bytes, 80_000);
        // Too small to cache, and too big to fit beside a pinned entry.
        let (s, ls, _) = file_of(tmp.path(), "small", 999, 9);
        assert_eq!(cache.admit(&ls, None, &s, false).unwrap(), None);
        cache
            .pin(&HaveKey::Blake3(*files[0].1.content_id().hash()), true)
            .unwrap();
        let (big, lbig, _) = file_of(tmp.path(), "big", 70_000, 11);
        assert_eq!(cache.admit(&lbig, None, &big, false).unwrap(), None);
        // A 50 000-byte file fits beside the pinned one: f1 makes room.
        let (m, lm, _) = file_of(tmp.path(), "m", 50_000, 13);
        cache.admit(&lm, None, &m, false).unwrap().unwrap();
        assert_eq!(
            cache.sweep(&HashSet::new()).unwrap(),
            vec![files[1].1.content_id()]
        );
        assert_eq!(cache.usage().bytes, 90_000);
    }

    #[tokio::test]
    async fn the_cache_survives_a_restart_and_forgets_what_is_damaged() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let (a, la, sa) = file_of(tmp.path(), "a", 40_000, 3);
        let (b, lb, _) = file_of(tmp.path(), "b", 50_000, 5);
        {
            let cache =
                Cache::open(dir.clone(), config(1 << 30), Arc::new(ContentStore::new())).unwrap();
            cache.admit(&la, Some(sa), &a, false).unwrap().unwrap();
            let pb = cache.admit(&lb, None, &b, false).unwrap().unwrap();
            cache.pin(&HaveKey::Sha256(sa), true).unwrap();
            // b's file is cut short while the node is down; a stray part file is left.
            std::fs::OpenOptions::new()
                .write(true)
                .open(pb)
                .unwrap()
                .set_len(10)
                .unwrap();
            let stray = format!("{}.tmp1.part", file_name(&la.content_id()));
            std::fs::write(dir.join(&stray), b"stray").unwrap();
            // Not the cache's: never deleted.
            std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        }
        let store = Arc::new(ContentStore::new());
        let cache = Cache::open(dir.clone(), config(1 << 30), store.clone()).unwrap();
        let items = cache.items();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].content_id, la.content_id());
        assert!(items[0].pinned);
        assert_eq!(items[0].sha256, Some(sa));
        assert!(
            !dir.join(format!("{}.tmp1.part", file_name(&la.content_id())))
                .exists()
        );
        assert!(dir.join("notes.txt").exists());
        assert!(is_cache_name(&file_name(&lb.content_id())));
        assert!(!is_cache_name("state.redb"));
        assert!(!is_cache_name(&format!("{}-", "a".repeat(64))));
        assert!(!cache.path_of(&lb.content_id()).exists());
        // Served again, by content id and by SHA-256.
        let piece = store.read_piece(&la.content_id(), 0).unwrap();
        la.verify_piece(0, &piece).unwrap();
        assert!(store.have(&HaveKey::Sha256(sa)).is_some());
        assert_eq!(
            cache.find(&HaveKey::Sha256(sa)).map(|(id, _)| id),
            Some(la.content_id())
        );
    }
}
