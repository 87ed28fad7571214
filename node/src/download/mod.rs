//! The download driver: fetches one file of a job from peers and the origin, verifying every
//! piece, and carries out what the [`Scheduler`] decides.
//!
//! One call of [`download_file`] is one file. It:
//! 1. asks connected peers what they hold, by BLAKE3 hash (trusted) or by SHA-256 (the answer's
//!    content id is an untrusted claim), unless the file has no digest or must come from the
//!    origin alone;
//! 2. fetches the piece layer from a peer and checks it against the content id (a peer whose
//!    layer fails is banned);
//! 3. writes pieces at their offsets into the temporary file, each checked against the layer on
//!    arrival (or, with no layer, recorded to derive the content id at the end), on a dedicated
//!    thread; a second thread computes the SHA-256 in file order;
//! 4. checks the whole file against the expected digests. When a SHA-256 claim turns out false,
//!    the claimers are banned, every byte is discarded and the file is fetched again from the
//!    origin alone.
//!
//! Memory stays bounded: at most [`scheduler::Config::max_in_flight`] peer pieces plus a few
//! origin pieces are held at once, whatever the file's size.

mod core;
pub(crate) mod members;
pub(crate) mod scheduler;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use libp2p::PeerId;
use shoal_protocol::{
    Bitfield, HaveKey, HaveRequest, Holding, LayerResponse, PieceIndex, PieceResponse,
};
use shoal_validator::{ContentId, Expected, LayerBuilder, PieceLayer, Sha256Digest, Sha256Stream};
use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

use self::core::{Action, Core, End, Setup, StoreOp, Verdict};
use crate::{
    download::scheduler::Source,
    job::{ByteRange, ErrorContext, JobError, JobId},
    source::origin::{self, OriginError, Remote},
    store::fsuser::FileIdentity,
    store::state::{ResumeDisk, ResumePoint, StateStore},
    store::{Backing, ContentStore},
    swarm,
};

/// How long peers' claims for a SHA-256 wait for the origin's length before they are weighed.
const LENGTH_WAIT: Duration = Duration::from_secs(10);
/// Peers of the chosen content asked for its layer at once, each for at most
/// [`LAYER_WAIT`].
const LAYER_ASKS: usize = 4;
/// How long one layer request may take before the next peers are asked.
const LAYER_WAIT: Duration = Duration::from_secs(5);

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often connected peers are asked again what they hold, during a download.
const PEER_REFRESH: Duration = Duration::from_millis(250);
/// How often the driver wakes up to retry backed-off peers.
const TICK: Duration = Duration::from_millis(100);
/// Origin pieces buffered between the HTTP stream and the verifier.
const ORIGIN_QUEUE: usize = 4;
/// Pieces buffered in front of the verifier thread.
const VERIFY_QUEUE: usize = 4;
/// Bytes of early pieces the SHA-256 thread keeps in memory rather than read back from disk
/// (pieces written with `O_DIRECT` are not in the page cache, so reading them back is disk I/O).
/// 16 MiB covers the reordering of one peer's pipeline even with 1 MiB pieces.
const SHA_HOLD_BYTES: usize = 16 << 20;
/// Before its first origin run, a node of a swarm waits until no new member that uses the
/// origin was learned for this long (a little over one have round), so that the shares it
/// computes are the ones its far peers compute too.
const SETTLE: Duration = Duration::from_millis(300);
/// The longest that settling delays the first origin run, from when the origin may be used.
const MAX_SETTLE: Duration = Duration::from_secs(2);

/// This download's membership of its content's member view; leaves it when dropped.
struct Membership {
    store: Arc<ContentStore>,
    id: ContentId,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.store.leave_members(&self.id);
    }
}

/// What a ban is about: a content id's hash, or a SHA-256 whose claim a peer made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BanKey {
    /// Served bytes or a layer that failed against this BLAKE3 hash.
    Blake3([u8; 32]),
    /// Claimed a content id for this SHA-256 that turned out false.
    Sha256(Sha256Digest),
}

/// Contents the node keeps bans for at most; the oldest-made key goes first beyond.
const MAX_BAN_KEYS: usize = 1024;
/// Peers banned at most per content (peer ids are free: past this, verification alone keeps
/// the bytes right).
const MAX_BANS_PER_KEY: usize = 4096;

/// Node-wide record of banned peers per content, bounded by [`MAX_BAN_KEYS`] and
/// [`MAX_BANS_PER_KEY`].
#[derive(Debug, Default)]
pub(crate) struct Bans(Mutex<BanTable>);

/// The banned peers per content, and the contents in the order their first ban was made.
type BanTable = (
    HashMap<BanKey, HashSet<PeerId>>,
    std::collections::VecDeque<BanKey>,
);

impl Bans {
    /// Bans `peer` for `key`; true when it was not banned before.
    pub(crate) fn ban(&self, key: BanKey, peer: PeerId) -> bool {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (m, order) = &mut *guard;
        if !m.contains_key(&key) {
            if m.len() >= MAX_BAN_KEYS
                && let Some(old) = order.pop_front()
            {
                m.remove(&old);
            }
            order.push_back(key);
        }
        let set = m.entry(key).or_default();
        set.len() < MAX_BANS_PER_KEY && set.insert(peer)
    }

    /// Whether `peer` is banned for `key`.
    pub(crate) fn is_banned(&self, key: BanKey, peer: &PeerId) -> bool {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.get(&key).is_some_and(|s| s.contains(peer))
    }
}

/// What a download reports as it goes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Update {
    /// The file's length (and content id, if known) became known; progress restarts at
    /// `resumed` bytes (pieces kept from an earlier run).
    Started {
        length: u64,
        content_id: Option<ContentId>,
        resumed: u64,
    },
    /// The content id became known mid-way (a piece layer was assembled and verified).
    ContentId(ContentId),
    /// A piece verified and was written; `source` is how the peer that sent it was found,
    /// `None` for the origin.
    Piece {
        bytes: u64,
        source: Option<swarm::PeerSource>,
    },
    /// A piece failed verification and was discarded.
    Rejected,
    /// A peer was banned.
    Banned,
}

/// The shared parts of the node a download uses.
#[derive(Clone)]
pub(crate) struct Env {
    pub(crate) swarm: swarm::Handle,
    pub(crate) origin: origin::Client,
    pub(crate) store: Arc<ContentStore>,
    pub(crate) bans: Arc<Bans>,
    pub(crate) scheduler: scheduler::Config,
    /// How long to wait for a first peer connection when peers are configured.
    pub(crate) discovery_wait: Duration,
    /// When the origin may be used.
    pub(crate) policy: Arc<crate::source::policy::SourcePolicy>,
    /// The content-addressed cache, if the node keeps one.
    pub(crate) cache: Option<Arc<crate::store::cache::Cache>>,
    /// The download buckets.
    pub(crate) bandwidth: Arc<crate::source::bandwidth::Bandwidth>,
}

/// One file to download.
pub(crate) struct FileTask {
    pub(crate) index: usize,
    /// The job's priority (the source policy's origin delay depends on it).
    pub(crate) priority: crate::job::Priority,
    pub(crate) url: Url,
    pub(crate) expected: Expected,
    /// Only these ranges of the remote file, concatenated (empty: the whole file).
    pub(crate) ranges: Vec<ByteRange>,
    pub(crate) temp: PathBuf,
    /// Use only the origin (after the caller rejected peer content).
    pub(crate) origin_only: bool,
    /// Pieces already in the temporary file from an earlier run (after a restart).
    pub(crate) resume: Option<ResumePoint>,
    /// Where to record pieces once they are on disk: the node's state store.
    pub(crate) durable: Option<Durable>,
    /// The Unix user the temporary file is given to (the job's owner), when the node runs as
    /// root.
    pub(crate) owner: Option<u32>,
    /// Filled when the download stops with verified pieces in the temporary file: where the
    /// next run of this file can go on from (without a state store too).
    pub(crate) left: Mutex<Option<ResumePoint>>,
    /// Cache the file whatever its size (a cache node's fill).
    pub(crate) cache_any_size: bool,
}

/// The state store and the file's key in it.
#[derive(Clone, Debug)]
pub(crate) struct Durable {
    pub(crate) store: Arc<StateStore>,
    pub(crate) job: JobId,
    pub(crate) index: u32,
}

/// A downloaded and verified file.
#[derive(Clone, Debug)]
pub(crate) struct Downloaded {
    pub(crate) content_id: ContentId,
    /// The layer the pieces verified against, or derived from them.
    pub(crate) layer: PieceLayer,
    pub(crate) sha256: Sha256Digest,
    /// True when any byte came from a peer.
    pub(crate) from_peers: bool,
    /// True when the file was copied from the local cache.
    pub(crate) from_cache: bool,
    /// The temporary file that verified, as it was then: Complete renames only this file,
    /// and the node serves it only while its path names this file.
    pub(crate) identity: FileIdentity,
}

/// Why a download stopped.
#[derive(Debug)]
pub(crate) enum Failure {
    Cancelled,
    Fatal(JobError),
    Transient(JobError),
}

enum AttemptFailure {
    Failure(Failure),
    /// The SHA-256 → content id claim was false: fetch again from the origin.
    ClaimFailed,
}

impl From<Failure> for AttemptFailure {
    fn from(f: Failure) -> Self {
        Self::Failure(f)
    }
}

fn local_error(index: usize, path: &Path, e: &std::io::Error) -> Failure {
    Failure::Fatal(JobError {
        context: ErrorContext::LocalFile,
        file: Some(index),
        description: format!("{}: {e}", path.display()),
    })
}

fn origin_failure(index: usize, e: &OriginError) -> Failure {
    let error = JobError {
        context: if e.is_transient() {
            ErrorContext::Transport
        } else {
            ErrorContext::RemoteFile
        },
        file: Some(index),
        description: e.to_string(),
    };
    if e.is_transient() {
        Failure::Transient(error)
    } else {
        Failure::Fatal(error)
    }
}

/// Downloads one file into its temporary file and verifies it.
pub(crate) async fn download_file(
    env: &Env,
    task: &FileTask,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Downloaded, Failure> {
    if !task.ranges.is_empty() {
        return download_ranges(env, task, cancel, progress).await;
    }
    if let Some(d) = from_cache(env, task, cancel, progress).await {
        return Ok(d);
    }
    let resume = task.resume.as_ref();
    let d = match attempt(env, task, task.origin_only, resume, cancel, progress).await {
        Ok(d) => d,
        Err(AttemptFailure::Failure(f)) => return Err(f),
        Err(AttemptFailure::ClaimFailed) => {
            info!(url = %origin::redact(&task.url), "peer claim for SHA-256 was false; fetching from the origin");
            match attempt(env, task, true, None, cancel, progress).await {
                Ok(d) => d,
                Err(AttemptFailure::Failure(f)) => return Err(f),
                Err(AttemptFailure::ClaimFailed) => {
                    return Err(Failure::Fatal(JobError {
                        context: ErrorContext::RemoteFile,
                        file: Some(task.index),
                        description: format!(
                            "{} does not match its expected digest",
                            origin::redact(&task.url)
                        ),
                    }));
                }
            }
        }
    };
    admit(env, task, &d).await;
    Ok(d)
}

/// Downloads the ranges of a ranged file (BITS `AddFileWithRanges`) from the origin, one after
/// the other into the temporary file, then checks the local file against the expected digests
/// (which are the local file's). Peers hold whole files, so a ranged file comes from the
/// origin only. A ranged file that stops starts again from its first range.
async fn download_ranges(
    env: &Env,
    task: &FileTask,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Downloaded, Failure> {
    let remote_error = |description: String| {
        Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description,
        })
    };
    let remote = env
        .origin
        .probe(&task.url)
        .await
        .map_err(|e| origin_failure(task.index, &e))?;
    // Resolve "to the end" and check every range against the remote length.
    let mut spans = Vec::with_capacity(task.ranges.len());
    for r in &task.ranges {
        let end = match r.length {
            Some(l) => r.offset.saturating_add(l),
            None => remote.length,
        };
        if r.offset >= remote.length || end > remote.length {
            return Err(remote_error(format!(
                "{}: the range {}..{end} is beyond the end of the file ({} bytes; BITS BG_E_INVALID_RANGE)",
                origin::redact(&task.url),
                r.offset,
                remote.length
            )));
        }
        spans.push(r.offset..end);
    }
    let whole = spans.len() == 1 && spans[0] == (0..remote.length);
    if !remote.ranges && !whole {
        return Err(remote_error(format!(
            "{}: the server does not support ranges (BITS BG_E_INSUFFICIENT_RANGE_SUPPORT)",
            origin::redact(&task.url)
        )));
    }
    let total: u64 = spans.iter().map(|s| s.end - s.start).sum();
    let local = |e: std::io::Error| local_error(task.index, &task.temp, &e);
    if let Some(d) = &task.durable {
        d.store
            .clear_pieces(d.job, d.index)
            .map_err(|e| local(std::io::Error::other(e)))?;
    }
    let file = create_temp(&task.temp, task.owner, total).map_err(local)?;
    progress(Update::Started {
        length: total,
        content_id: None,
        resumed: 0,
    });
    let file = Arc::new(file);
    let mut at = 0u64;
    for span in spans {
        let written = Arc::new(Mutex::new(Ok::<(), std::io::Error>(())));
        let fetch = env
            .origin
            .fetch(&task.url, &remote, span.clone(), 1 << 20, |bytes| {
                let (file, written, offset) = (file.clone(), written.clone(), at);
                at += bytes.len() as u64;
                let n = bytes.len() as u64;
                let bandwidth = env.bandwidth.clone();
                let foreground = task.priority == crate::job::Priority::Foreground;
                async move {
                    bandwidth.download(foreground, n).await;
                    let r = tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    let ok = r.is_ok();
                    if let Err(e) = r {
                        *written.lock().unwrap_or_else(|p| p.into_inner()) = Err(e);
                    } else {
                        progress(Update::Piece {
                            bytes: n,
                            source: None,
                        });
                    }
                    ok
                }
            });
        let result = tokio::select! {
            () = cancel.cancelled() => return Err(Failure::Cancelled),
            r = fetch => r,
        };
        std::mem::replace(
            &mut *written.lock().unwrap_or_else(|p| p.into_inner()),
            Ok(()),
        )
        .map_err(local)?;
        result.map_err(|e| origin_failure(task.index, &e))?;
    }
    // On disk before it can count as transferred.
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_data())
        .await
        .map_err(|e| local(std::io::Error::other(e)))?
        .map_err(local)?;
    // The local file's digests, from what was written.
    let (path, len, owner) = (task.temp.clone(), total, task.owner);
    let digests = tokio::task::spawn_blocking(move || {
        let f = open_temp(&path, owner, false)?;
        shoal_validator::hash_reader(std::io::BufReader::new(f), len).map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| local(std::io::Error::other(e)))?
    .map_err(local)?;
    let id = digests.content_id();
    task.expected
        .check_content_id(&id)
        .and_then(|()| task.expected.check_sha256(digests.sha256))
        .map_err(|e| remote_error(format!("{} (ranges): {e}", origin::redact(&task.url))))?;
    let count = id.piece_count();
    let identity = FileIdentity::of(&file).map_err(local)?;
    env.store.insert(
        digests.layer.clone(),
        Bitfield::full(count),
        task.temp.clone(),
        Backing::Named {
            owner: task.owner,
            identity,
        },
    );
    env.store.set_sha256(&id, digests.sha256);
    Ok(Downloaded {
        content_id: id,
        layer: digests.layer,
        sha256: digests.sha256,
        from_peers: false,
        from_cache: false,
        identity,
    })
}

/// Fills the temporary file from the local cache when the cache holds the expected content
/// (by BLAKE3, else by SHA-256): the cached file is cloned into the temporary file (a reflink
/// where the file system can) and the copy is hashed; it counts only when it matches the
/// expected digests and the cached content id. `None` when the file is not cached or cannot be
/// copied, the cached copy is damaged (it is evicted then), or the file already has pieces on
/// disk from an earlier run: the file is downloaded as usual.
async fn from_cache(
    env: &Env,
    task: &FileTask,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Option<Downloaded> {
    let cache = env.cache.clone()?;
    // A file with pieces of its own on disk goes on from them: the copy would first have to
    // forget them, and progress already reported must not go back.
    if task.origin_only
        || task
            .resume
            .as_ref()
            .is_some_and(|r| r.pieces.count_ones() > 0)
    {
        return None;
    }
    let key = match (task.expected.blake3, task.expected.sha256) {
        (Some(h), _) => HaveKey::Blake3(h),
        (None, Some(d)) => HaveKey::Sha256(d),
        (None, None) => return None,
    };
    let c = cache.clone();
    let (id, path) = tokio::task::spawn_blocking(move || c.find(&key))
        .await
        .ok()
        .flatten()?;
    if let Some(d) = &task.durable
        && let Err(e) = d.store.clear_pieces(d.job, d.index)
    {
        warn!(url = %origin::redact(&task.url), "cannot reset the stored pieces before a cache copy: {e}");
        return None;
    }
    if cancel.is_cancelled() {
        return None;
    }
    let (temp, owner, length) = (task.temp.clone(), task.owner, id.length());
    let cached = path.clone();
    let copied = tokio::task::spawn_blocking(move || {
        let src = File::open(&path)?;
        let dst = create_temp(&temp, owner, length)?;
        let reflinked = crate::store::cache::clone_or_copy(&src, &dst, length)?;
        dst.sync_data()?;
        let f = open_temp(&temp, owner, false)?;
        let identity = FileIdentity::of(&f)?;
        if !identity.same_file(&FileIdentity::of(&dst)?) {
            return Err(std::io::Error::other("the temporary file was replaced"));
        }
        let d = shoal_validator::hash_reader(std::io::BufReader::new(f), length)
            .map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((d, reflinked, identity))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    let (digests, reflinked, identity) = match copied {
        Ok(d) => d,
        Err(e) => {
            warn!(url = %origin::redact(&task.url), %id, "cannot copy from the cache; downloading: {e}");
            return None;
        }
    };
    if cancel.is_cancelled() {
        // Cancel or Complete ran meanwhile: leave no file behind.
        let (temp, owner) = (task.temp.clone(), task.owner);
        let _ = tokio::task::spawn_blocking(move || {
            crate::store::fsuser::as_owner(owner, || std::fs::remove_file(&temp))
        })
        .await;
        return None;
    }
    let found = digests.content_id();
    if found != id
        || task.expected.check_content_id(&found).is_err()
        || task.expected.check_sha256(digests.sha256).is_err()
    {
        // The copy is not the content the job expects. Only when the cache's own file (which
        // only the node writes) fails its content id is the entry evicted; a copy changed
        // while it was hashed, or a job expecting another SHA-256, leaves the cache alone.
        let damaged = tokio::task::spawn_blocking(move || {
            File::open(&cached)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    shoal_validator::hash_reader(std::io::BufReader::new(f), length)
                        .map_err(|e| e.to_string())
                })
                .is_ok_and(|d| d.content_id() != id)
        })
        .await
        .unwrap_or(false);
        if damaged {
            warn!(url = %origin::redact(&task.url), %id, "the cached copy is damaged; evicting it");
            let _ = tokio::task::spawn_blocking(move || cache.evict(&HaveKey::Blake3(*id.hash())))
                .await;
        } else {
            info!(url = %origin::redact(&task.url), %id, "the cached content is not what this file expects; downloading");
        }
        return None;
    }
    info!(url = %origin::redact(&task.url), %id, reflinked, "filled from the local cache");
    progress(Update::Started {
        length,
        content_id: Some(id),
        resumed: length,
    });
    Some(Downloaded {
        content_id: id,
        layer: digests.layer,
        sha256: digests.sha256,
        from_peers: false,
        from_cache: true,
        identity,
    })
}

/// Puts a downloaded and verified file into the cache (a clone of its temporary file); the
/// node then serves the content from the cache's copy. Failures are logged: the cache is
/// best effort and never fails a job.
async fn admit(env: &Env, task: &FileTask, d: &Downloaded) {
    let Some(cache) = env.cache.clone() else {
        return;
    };
    let (temp, owner, layer, sha256) = (task.temp.clone(), task.owner, d.layer.clone(), d.sha256);
    let any_size = task.cache_any_size;
    let r = tokio::task::spawn_blocking(move || {
        let f =
            open_temp(&temp, owner, false).map_err(|e| crate::store::cache::CacheError::Io {
                path: temp.clone(),
                source: e,
            })?;
        cache.admit(&layer, Some(sha256), &f, any_size)
    })
    .await;
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(url = %origin::redact(&task.url), "cannot cache the file: {e}"),
        Err(e) => warn!(url = %origin::redact(&task.url), "cannot cache the file: {e}"),
    }
}

/// A peer's answer to a have query.
type Answer = (PeerId, Holding);

/// Asks the connected peers and `extra` (providers found in the DHT) what they hold of `key`;
/// peers banned for `ban` are left out. The request to `fill_from` (a cache node) carries
/// `origin_url`, so that the cache node fetches what it lacks.
async fn ask_peers(
    env: &Env,
    key: HaveKey,
    ban: BanKey,
    extra: Vec<PeerId>,
    fill_from: Option<(PeerId, &Url)>,
) -> Vec<Answer> {
    let peers = peers_to_ask(env, ban, extra).await;
    ask(env, key, peers, fill_from).await
}

/// The connected peers and `extra`, without those banned for `ban`.
async fn peers_to_ask(env: &Env, ban: BanKey, extra: Vec<PeerId>) -> Vec<PeerId> {
    let mut peers: Vec<PeerId> = env.swarm.connected_peers().await;
    for p in extra {
        if !peers.contains(&p) {
            peers.push(p);
        }
    }
    peers.retain(|p| !env.bans.is_banned(ban, p));
    peers
}

/// At most this many peers are asked per have round during a download: those it has requests
/// with first, then others at random. Without a bound, a full mesh of N nodes sends N²
/// queries per round; the rest of the swarm is learned through member gossip and
/// announcements, and every peer is asked again within a few rounds.
const POLL_PEERS: usize = 16;

/// Of `peers`, the ones to ask this round: all when at most [`POLL_PEERS`]; else those in
/// `busy` (live requests) first, up to half the bound, and the rest at random.
fn poll_sample(mut peers: Vec<PeerId>, busy: &HashSet<PeerId>) -> Vec<PeerId> {
    use rand::seq::SliceRandom;
    if peers.len() <= POLL_PEERS {
        return peers;
    }
    peers.shuffle(&mut rand::rng());
    // Busy peers to the front (in random order among them), at most half the bound.
    peers.sort_by_key(|p| !busy.contains(p));
    let busy_n = peers.iter().take_while(|p| busy.contains(p)).count();
    let keep = busy_n.min(POLL_PEERS / 2);
    let mut out: Vec<PeerId> = peers[..keep].to_vec();
    out.extend(peers[busy_n..].iter().take(POLL_PEERS - keep));
    // Too few idle peers: more busy ones.
    let room = POLL_PEERS - out.len();
    out.extend(peers[keep..busy_n].iter().take(room));
    out
}

/// Asks each of `peers` what it holds of `key`.
async fn ask(
    env: &Env,
    key: HaveKey,
    peers: Vec<PeerId>,
    fill_from: Option<(PeerId, &Url)>,
) -> Vec<Answer> {
    let asks = peers.into_iter().map(|peer| {
        let swarm = env.swarm.clone();
        let mut request = HaveRequest::new(key);
        if let Some((cache, url)) = fill_from
            && cache == peer
            && url.as_str().len() <= shoal_protocol::MAX_ORIGIN_URL_BYTES
            && !origin::has_secrets(url)
        {
            request.origin_url = Some(url.to_string());
        }
        async move {
            match swarm.have(peer, request).await {
                Ok(resp) => resp.0.map(|h| (peer, h)),
                Err(e) => {
                    debug!("have query failed: {e}");
                    None
                }
            }
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// How long a cache node asked to fetch content may show nothing of it before the download
/// counts it as refusing and asks the next cache node (or uses the origin).
const CACHE_REFUSAL: Duration = Duration::from_secs(5);

/// "Never" for a wait that would overflow an `Instant` (about 30 years).
const FAR: Duration = Duration::from_secs(1 << 30);

/// A download's wait for its cache nodes (`policy::SourcePolicy::cache_fallback`): it asks
/// the first connected cache node of the list that has not refused to fetch the content, and
/// waits for it while it makes progress.
struct CacheWait {
    /// How long the cache node may make no progress.
    fallback: Duration,
    /// Cache nodes that showed nothing of the content [`CACHE_REFUSAL`] after they were asked.
    refused: HashSet<PeerId>,
    /// The cache node asked now, and since when.
    current: Option<(PeerId, Instant)>,
    /// The progress it showed last (pieces held and claimed, and whether it fetches), and
    /// when that grew.
    seen: u32,
    progress_at: Option<Instant>,
}

impl CacheWait {
    fn new(fallback: Duration) -> Self {
        Self {
            fallback,
            refused: HashSet::new(),
            current: None,
            seen: 0,
            progress_at: None,
        }
    }

    /// The cache node to ask: the first of `order` that is connected and has not refused.
    fn target(&mut self, connected: &[PeerId], order: &[PeerId]) -> Option<PeerId> {
        let next = order
            .iter()
            .find(|p| connected.contains(p) && !self.refused.contains(p))
            .copied();
        if next != self.current.map(|(p, _)| p) {
            self.current = next.map(|p| (p, Instant::now()));
            self.seen = 0;
            self.progress_at = None;
        }
        next
    }

    /// Reads the cache node's answer among `answers`; returns until when the download waits
    /// for it, or `None` when it does not (no cache node asked, or it just refused).
    fn observe(&mut self, answers: &[Answer], now: Instant) -> Option<Instant> {
        let (peer, asked) = self.current?;
        let shown = answers
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(0, |(_, h)| {
                h.have.count_ones()
                    + h.claimed.count_ones()
                    + u32::from(h.fetching.count_ones() > 0)
            });
        if shown > self.seen || (shown > 0 && self.progress_at.is_none()) {
            self.seen = shown;
            self.progress_at = Some(now);
        }
        match self.progress_at {
            Some(t) => Some(t.checked_add(self.fallback).unwrap_or(t + FAR)),
            None if now.duration_since(asked) >= CACHE_REFUSAL => {
                info!(%peer, "the cache node does not fetch the content; trying the next source");
                self.refused.insert(peer);
                self.current = None;
                None
            }
            None => Some(asked + CACHE_REFUSAL),
        }
    }
}

/// Have rounds in a row a peer may miss before its pieces and claims stop counting.
const PEER_MISSES: u32 = 3;

/// How long no source may be able to supply a missing piece (the origin not being used)
/// before the download gives up with a TransientError.
const STUCK_GRACE: Duration = Duration::from_secs(5);

/// How often a download looks up providers in the DHT again (every this many have rounds).
const DHT_EVERY_REFRESHES: u32 = 40;

/// Waits for a first peer connection (at most the discovery wait) while the DHT is searched
/// for providers of `key`; returns the providers found.
async fn discover(env: &Env, key: HaveKey) -> Vec<PeerId> {
    let (_, providers) = futures::join!(
        wait_for_peers(env),
        env.swarm.find_providers(key, env.discovery_wait)
    );
    providers
}

async fn wait_for_peers(env: &Env) {
    let deadline = Instant::now() + env.discovery_wait;
    while env.swarm.connected_peers().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The thread that verifies and writes pieces, and the one that hashes SHA-256 in order.
/// What the writer thread is sent.
enum ToWriter {
    /// A piece to check and write.
    Piece(PieceIndex, Source, Bytes),
    /// From now on check pieces against this verified layer (assembled while downloading);
    /// the pieces recorded so far are checked against it too.
    Layer(PieceLayer),
}

struct Writer {
    tx: mpsc::Sender<ToWriter>,
    thread: std::thread::JoinHandle<Result<WriterEnd, std::io::Error>>,
}

struct WriterEnd {
    builder: Option<LayerBuilder>,
    sha256: Option<Sha256Digest>,
    /// The pieces verified and written.
    on_disk: Bitfield,
}

enum Checker {
    Layer(PieceLayer),
    Builder(LayerBuilder),
}

impl Checker {
    /// The chaining value piece `index` verified with (`None` for a file of one piece, or a
    /// piece the builder has not taken).
    fn chaining_value(&self, index: PieceIndex) -> Option<shoal_validator::ChainingValue> {
        match self {
            Self::Layer(l) => l.chaining_values().get(index as usize).copied(),
            Self::Builder(b) => b.chaining_value(index),
        }
    }
}

/// A piece for the SHA-256 thread: its index, its bytes (`None`: read it from the file), and
/// the chaining value it verified with, which bytes read back from the file must still have.
type ShaPiece = (
    PieceIndex,
    Option<Bytes>,
    Option<shoal_validator::ChainingValue>,
);

/// The alignment O_DIRECT needs for offsets, lengths and buffer addresses, in bytes.
const DIRECT_ALIGN: usize = swarm::BULK_ALIGN;

/// Writes pieces at their offsets. Where the file system allows it, aligned pieces go through a
/// second descriptor opened with `O_DIRECT`: on the 2-core machines Shoal is measured on, the
/// kernel's copy into the page cache costs more CPU than hashing, and direct writes skip it
/// (see `docs/benchmarks.md`). Other pieces, and every piece when `O_DIRECT` is refused, go
/// through the page cache. Reads (serving, SHA-256 read-back) see both, as the kernel keeps
/// them coherent.
struct PieceWriter {
    buffered: Arc<File>,
    direct: Option<File>,
    /// A buffer of one piece plus slack, so an aligned window of it can be used.
    scratch: Vec<u8>,
}

impl PieceWriter {
    fn new(buffered: Arc<File>, piece_size: u64) -> Self {
        use std::os::unix::{fs::OpenOptionsExt, io::AsRawFd};
        // The same inode as `buffered`, not whatever the path names by now.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", buffered.as_raw_fd()))
            .ok();
        let scratch = if direct.is_some() {
            vec![0u8; piece_size as usize + DIRECT_ALIGN]
        } else {
            Vec::new()
        };
        Self {
            buffered,
            direct,
            scratch,
        }
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let aligned =
            offset.is_multiple_of(DIRECT_ALIGN as u64) && bytes.len().is_multiple_of(DIRECT_ALIGN);
        if let Some(direct) = &self.direct
            && aligned
            && bytes.len() + DIRECT_ALIGN <= self.scratch.len()
        {
            // Pieces from peers arrive aligned (`swarm::read_body`); others are copied first.
            let window = if bytes.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
                bytes
            } else {
                let start = self.scratch.as_ptr().align_offset(DIRECT_ALIGN);
                let window = &mut self.scratch[start..start + bytes.len()];
                window.copy_from_slice(bytes);
                window
            };
            match direct.write_all_at(window, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        self.buffered.write_all_at(bytes, offset)
    }
}

/// What the writer thread records with each checkpoint.
struct Checkpointing {
    durable: Durable,
    meta: ResumeDisk,
    /// The trusted layer, written with the first checkpoint.
    layer: Option<Vec<shoal_validator::ChainingValue>>,
    /// The origin resource, once probed: its validator goes into the record.
    remote: Arc<OnceCell<Remote>>,
}

/// Pieces the writer takes from its queue before it flushes and records them.
const CHECKPOINT_BATCH: usize = 64;

#[allow(clippy::too_many_arguments)]
fn spawn_writer(
    file: Arc<File>,
    checker: Checker,
    piece_size: u64,
    length: u64,
    resumed: Bitfield,
    mut checkpointing: Option<Checkpointing>,
    out: mpsc::Sender<Verdict>,
) -> Writer {
    let (tx, mut rx) = mpsc::channel::<ToWriter>(VERIFY_QUEUE);
    let thread = std::thread::spawn(move || {
        let mut writer = PieceWriter::new(file.clone(), piece_size);
        let (sha_tx, sha_rx) = std::sync::mpsc::sync_channel::<ShaPiece>(VERIFY_QUEUE);
        let sha_file = file.clone();
        let sha_thread =
            std::thread::spawn(move || sha_in_order(&sha_file, sha_rx, piece_size, length));
        let mut on_disk = resumed;
        // Pieces kept from an earlier run are hashed from the file (checked again first).
        for index in on_disk.ones() {
            let _ = sha_tx.send((index, None, checker.chaining_value(index)));
        }
        let mut checker = checker;
        let mut results = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < CHECKPOINT_BATCH {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let mut wrote = false;
            for msg in batch {
                let (index, source, bytes) = match msg {
                    ToWriter::Piece(i, s, b) => (i, s, b),
                    ToWriter::Layer(layer) => {
                        // Pieces recorded so far must be the layer's: a piece whose chaining
                        // value differs is dropped and reported as failing.
                        if let Checker::Builder(b) = &checker {
                            for index in on_disk.ones().collect::<Vec<_>>() {
                                let cv = b.chaining_value(index);
                                if cv.is_some()
                                    && layer.chaining_values().get(index as usize) != cv.as_ref()
                                {
                                    on_disk.clear(index);
                                    results.push(Verdict {
                                        index,
                                        source: Source::Origin,
                                        bytes: 0,
                                        result: Err("differs from the assembled piece layer".into()),
                                        cv: None,
                                        after_layer: true,
                                    });
                                }
                            }
                        }
                        if let Some(c) = &mut checkpointing {
                            c.meta.content_id = Some(layer.content_id().to_string());
                            c.layer = Some(layer.chaining_values().to_vec());
                        }
                        checker = Checker::Layer(layer);
                        continue;
                    }
                };
                let mut cv = None;
                let result = match &mut checker {
                    Checker::Layer(layer) => layer.verify_piece(index, &bytes),
                    Checker::Builder(b) => b.add_piece(index, &bytes).inspect(|()| {
                        cv = b.chaining_value(index);
                    }),
                }
                .map_err(|e| e.to_string());
                if result.is_ok() {
                    writer.write(u64::from(index) * piece_size, &bytes)?;
                    on_disk.set(index);
                    wrote = true;
                    if let (Some(c), Source::Peer(_)) = (&mut checkpointing, source) {
                        c.meta.from_peers = true;
                    }
                    let _ =
                        sha_tx.send((index, Some(bytes.clone()), checker.chaining_value(index)));
                }
                results.push(Verdict {
                    index,
                    source,
                    bytes: bytes.len() as u64,
                    result,
                    cv,
                    after_layer: false,
                });
            }
            // Data first, then the record that says it is there.
            if let Some(c) = &mut checkpointing
                && wrote
            {
                file.sync_data()?;
                c.meta.validator = c.remote.get().and_then(|r| r.validator.clone());
                c.durable
                    .store
                    .checkpoint(
                        c.durable.job,
                        c.durable.index,
                        &on_disk,
                        &c.meta,
                        c.layer.take().as_deref(),
                    )
                    .map_err(std::io::Error::other)?;
            }
            for v in results.drain(..) {
                let _ = out.blocking_send(v);
            }
        }
        drop(sha_tx);
        let sha256 = sha_thread
            .join()
            .map_err(|_| std::io::Error::other("SHA-256 thread panicked"))??;
        Ok(WriterEnd {
            builder: match checker {
                Checker::Builder(b) => Some(b),
                Checker::Layer(_) => None,
            },
            sha256,
            on_disk,
        })
    });
    Writer { tx, thread }
}

/// Hashes the file in order. Pieces come with their bytes, or without (`None`: already in the
/// file, kept from an earlier run). Pieces that arrive in order are hashed from memory, and so
/// are pieces that arrive early while they fit in [`SHA_HOLD_BYTES`]; the rest are read back
/// from the file when their turn comes, and must still have the chaining value they verified
/// with (the owner of the file may write it meanwhile: what is hashed is what verified, or the
/// file fails as a local error that bans nobody). `None` unless every piece arrived.
fn sha_in_order(
    file: &File,
    rx: std::sync::mpsc::Receiver<ShaPiece>,
    piece_size: u64,
    length: u64,
) -> Result<Option<Sha256Digest>, std::io::Error> {
    let piece_count = u32::try_from(length.div_ceil(piece_size)).unwrap_or(u32::MAX);
    let mut sha = Sha256Stream::new();
    let mut next: PieceIndex = 0;
    // Pieces ahead of `next`: with their bytes while they fit in `SHA_HOLD_BYTES`, else
    // `None`, to be read back from the file; with their chaining values.
    let mut later: BTreeMap<PieceIndex, (Option<Bytes>, Option<shoal_validator::ChainingValue>)> =
        BTreeMap::new();
    let mut held = 0usize;
    let mut buf = Vec::new();
    let mut hash_from_file =
        |sha: &mut Sha256Stream, index: PieceIndex, cv: Option<shoal_validator::ChainingValue>| {
            let start = u64::from(index) * piece_size;
            let len = (length - start).min(piece_size);
            buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
            file.read_exact_at(&mut buf, start)?;
            if let Some(cv) = cv {
                shoal_validator::check_piece(index, start, &buf, &cv).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("the temporary file changed after its piece verified: {e}"),
                    )
                })?;
            }
            sha.update(&buf);
            Ok::<(), std::io::Error>(())
        };
    for (index, bytes, cv) in rx {
        if index != next {
            let keep = bytes
                .filter(|b| held + b.len() <= SHA_HOLD_BYTES)
                .inspect(|b| held += b.len());
            later.insert(index, (keep, cv));
            continue;
        }
        match bytes {
            Some(b) => sha.update(&b),
            None => hash_from_file(&mut sha, index, cv)?,
        }
        next += 1;
        while let Some((piece, cv)) = later.remove(&next) {
            match piece {
                Some(b) => {
                    held -= b.len();
                    sha.update(&b);
                }
                None => hash_from_file(&mut sha, next, cv)?,
            }
            next += 1;
        }
    }
    Ok((next == piece_count).then(|| sha.finish()))
}

/// Creates the temporary file afresh, as the job's owner: an old file (or a symlink put in
/// its place) is removed, and the new one is created exclusively, never through a symlink,
/// with the owner's usual mode ([`crate::store::fsuser::file_mode`]).
fn create_temp(path: &Path, owner: Option<u32>, length: u64) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::store::fsuser::as_owner(owner, || {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // The owner's usual mode, whatever the daemon's umask.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
            crate::store::fsuser::file_mode(owner),
        ))?;
        file.set_len(length)?;
        Ok(file)
    })
}

/// Opens the temporary file of an earlier run, as the job's owner, never through a symlink.
fn open_temp(path: &Path, owner: Option<u32>, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::store::fsuser::as_owner(owner, || {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    })
}

/// Checks again the pieces an earlier run left in `temp`: against the layer, or hashed into
/// the content id being derived. Returns the pieces that pass, and the checker to go on with.
fn recheck(
    temp: &Path,
    geometry: ContentId,
    pieces: &Bitfield,
    mut checker: Checker,
    owner: Option<u32>,
) -> std::io::Result<(Bitfield, Checker)> {
    let file = open_temp(temp, owner, false)?;
    let mut kept = Bitfield::new(pieces.len());
    let mut buf = Vec::new();
    for index in pieces.ones() {
        let Some(range) = geometry.piece_range(index) else {
            continue;
        };
        buf.resize(
            usize::try_from(range.end - range.start).unwrap_or(usize::MAX),
            0,
        );
        file.read_exact_at(&mut buf, range.start)?;
        let ok = match &mut checker {
            Checker::Layer(l) => l.verify_piece(index, &buf).is_ok(),
            Checker::Builder(b) => b.add_piece(index, &buf).is_ok(),
        };
        if ok {
            kept.set(index);
        } else {
            warn!(path = %temp.display(), index, "a piece kept from an earlier run fails its check; fetching it again");
        }
    }
    Ok((kept, checker))
}

enum Fetched {
    Piece(PieceIndex, Source, Bytes),
    Failed(PieceIndex, Source, String),
    /// The peer holds the piece but had no upload slot free.
    Busy(PieceIndex, PeerId),
    OriginEnd(Result<(), OriginError>),
}

/// Where a download stands with its piece layer while it has no verified one: it is assembling
/// the layer of content `id` from the chaining values of the pieces it fetched from the origin
/// itself and those its peers claim (see `docs/scheduling.md`).
struct Assembly {
    id: ContentId,
    /// Chaining values of the pieces this node fetched and recorded.
    own: Vec<Option<shoal_validator::ChainingValue>>,
    /// Chaining values taken in from peers' partial layers (untrusted until the layer
    /// verifies); passed on to peers in turn.
    relayed: Vec<Option<shoal_validator::ChainingValue>>,
    /// Pieces whose chaining values each peer can tell (its claims and what it relays).
    claims: HashMap<PeerId, Bitfield>,
    /// Set after an assembled layer failed: claims are ignored from then on.
    failed: bool,
    /// An assembly (or a fetch of a peer's verified layer) is running.
    running: bool,
    /// Own pieces or claims changed since coverage was last checked.
    changed: bool,
}

impl Assembly {
    /// Whether the chaining value of piece `i` is known here (own or relayed).
    fn knows(&self, i: usize) -> bool {
        self.own[i].is_some() || self.relayed[i].is_some()
    }

    /// Whether some peer can tell a chaining value not known here: a gathering round would
    /// learn something.
    fn peers_know_more(&self) -> bool {
        self.claims
            .values()
            .any(|b| b.ones().any(|i| !self.knows(i as usize)))
    }

    /// The chaining values known here: own, else relayed.
    fn known(&self) -> Vec<Option<shoal_validator::ChainingValue>> {
        self.own
            .iter()
            .zip(&self.relayed)
            .map(|(o, r)| o.or(*r))
            .collect()
    }
}

/// What an assembly task found.
enum Assembled {
    /// A layer that verified against the content id.
    Layer(PieceLayer),
    /// Some values are still unknown; these were taken in from peers (piece and value).
    Learned(Vec<(PieceIndex, shoal_validator::ChainingValue)>),
    /// Claimed values did not merge into the content id (`from_claims`), or no peer's
    /// verified layer could be had.
    Failed { reason: String, from_claims: bool },
}

/// Gathers the chaining values the assembly lacks (`known` holds the rest) from the peers
/// that can tell them (their claims, and values they relay from their own peers); once every
/// value is known, merges them and checks the result against the content id. A peer with a
/// verified layer (`full_from`) is asked for that instead. Values learned while some are still
/// missing come back as [`Assembled::Learned`], to be relayed in turn.
async fn assemble(
    env: Env,
    id: ContentId,
    known: Vec<Option<shoal_validator::ChainingValue>>,
    claims: Vec<(PeerId, Bitfield)>,
    full_from: Vec<PeerId>,
) -> Assembled {
    for peer in full_from {
        if let Ok(LayerResponse::Full(cvs)) = env.swarm.layer(peer, id, false).await {
            match PieceLayer::verify(id, cvs) {
                Ok(l) => return Assembled::Layer(l),
                Err(e) => {
                    warn!(%peer, "piece layer rejected: {e}");
                    env.bans.ban(BanKey::Blake3(*id.hash()), peer);
                }
            }
        }
    }
    if claims.is_empty() {
        return Assembled::Failed {
            reason: "no peer's verified layer".into(),
            from_claims: false,
        };
    }
    let mut cvs = known;
    let mut learned = Vec::new();
    for (peer, bits) in claims {
        if bits.ones().all(|i| cvs[i as usize].is_some()) {
            continue;
        }
        match env.swarm.layer(peer, id, true).await {
            Ok(LayerResponse::Partial(entries)) => {
                // Only the values the peer said it can tell: one made-up answer does not
                // fill the whole layer.
                for (i, cv) in entries {
                    if bits.get(i)
                        && let Some(slot) = cvs.get_mut(i as usize)
                        && slot.is_none()
                    {
                        *slot = Some(cv);
                        learned.push((i, cv));
                    }
                }
            }
            Ok(LayerResponse::Full(full)) => {
                if let Ok(l) = PieceLayer::verify(id, full) {
                    return Assembled::Layer(l);
                }
            }
            Ok(LayerResponse::NotFound) => {}
            Err(e) => debug!("partial layer request failed: {e}"),
        }
        if cvs.iter().all(Option::is_some) {
            break;
        }
    }
    let Some(cvs) = cvs.into_iter().collect::<Option<Vec<_>>>() else {
        return Assembled::Learned(learned);
    };
    match PieceLayer::verify(id, cvs) {
        Ok(l) => Assembled::Layer(l),
        Err(e) => Assembled::Failed {
            reason: e.to_string(),
            from_claims: true,
        },
    }
}

/// The place where this node's first origin run starts: the same for one node and content,
/// spread over the file across nodes.
fn origin_start(me: PeerId, id: &ContentId, piece_count: u32) -> u32 {
    let h = blake3::hash(&[me.to_bytes().as_slice(), id.hash()].concat());
    let n = u32::from_le_bytes([
        h.as_bytes()[0],
        h.as_bytes()[1],
        h.as_bytes()[2],
        h.as_bytes()[3],
    ]);
    if piece_count == 0 { 0 } else { n % piece_count }
}

/// What a driver's child task reports.
enum Event {
    Fetched(Fetched),
    /// A have round: the peers asked, the peers that could have been asked (connected, or
    /// found in the DHT), and the answers (for the content, from peers not banned).
    Round(Vec<PeerId>, Vec<PeerId>, Vec<Answer>),
    Assembled(Assembled),
}

/// The clock a download reads: tokio's, so that paused time drives a whole download.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Runs a [`Core`]: carries out its actions, owns every child task (piece requests, origin
/// runs, have rounds, gatherings) in one `JoinSet`, and feeds results, announcements and
/// timeouts back. Dropping it aborts every child task.
struct Driver<'a> {
    env: &'a Env,
    task: &'a FileTask,
    foreground: bool,
    length: u64,
    piece_size: u64,
    piece_count: u32,
    remote: Arc<OnceCell<Remote>>,
    writer: mpsc::Sender<ToWriter>,
    served_file: Arc<File>,
    progress: &'a (dyn Fn(Update) + Send + Sync),
    tasks: tokio::task::JoinSet<Event>,
    requests: HashMap<(PieceIndex, PeerId), tokio::task::AbortHandle>,
    origin_tx: mpsc::Sender<Fetched>,
}

impl Driver<'_> {
    fn writer_failed(&self) -> AttemptFailure {
        Failure::Fatal(JobError {
            context: ErrorContext::LocalFile,
            file: Some(self.task.index),
            description: format!("writing {} failed", self.task.temp.display()),
        })
        .into()
    }

    /// Runs `core` until it ends, the download is cancelled or the writer fails.
    async fn run(
        &mut self,
        core: &mut Core,
        verified: &mut mpsc::Receiver<Verdict>,
        origin_rx: &mut mpsc::Receiver<Fetched>,
        writer_done: &(dyn Fn() -> bool + Sync),
        cancel: &CancellationToken,
    ) -> Result<(), AttemptFailure> {
        let mut announcements = self.env.swarm.announcements();
        let mut announcements_open = true;
        loop {
            while let Some(action) = core.poll_action() {
                self.execute(core, action).await?;
            }
            if let Some(end) = core.poll_end() {
                return self.render(core, end);
            }
            let deadline = core
                .poll_timeout()
                .map_or_else(|| tokio::time::Instant::now() + TICK, Into::into);
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(Failure::Cancelled.into()),
                Some(v) = verified.recv() => core.handle_verified(now(), v),
                Some(f) = origin_rx.recv() => self.on_fetched(core, f),
                Some(Ok(event)) = self.tasks.join_next(), if !self.tasks.is_empty() => match event {
                    Event::Fetched(f) => self.on_fetched(core, f),
                    Event::Round(asked, reachable, answers) => {
                        core.handle_round(now(), &asked, &reachable, answers);
                    }
                    Event::Assembled(a) => core.handle_assembled(now(), a),
                },
                got = announcements.recv(), if announcements_open && core.content_id().is_some() => match got {
                    Ok((peer, h)) => {
                        let banned = core
                            .content_id()
                            .is_some_and(|c| self.env.bans.is_banned(BanKey::Blake3(*c.hash()), &peer));
                        if !banned {
                            core.handle_holding(now(), peer, h);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => announcements_open = false,
                },
                () = tokio::time::sleep_until(deadline) => {
                    // The writer stops only on a write, flush or state-store failure; the
                    // pieces it held will never be reported, so end here (its error comes from
                    // the join).
                    if writer_done() {
                        return Err(self.writer_failed());
                    }
                    core.handle_timeout(now());
                }
            }
        }
    }

    fn on_fetched(&mut self, core: &mut Core, f: Fetched) {
        match f {
            Fetched::Piece(index, source, bytes) => {
                if let Source::Peer(p) = source {
                    self.requests.remove(&(index, p));
                }
                core.handle_piece(now(), index, source, bytes);
            }
            Fetched::Failed(index, source, reason) => {
                debug!(index, ?source, "piece fetch failed: {reason}");
                if let Source::Peer(p) = source {
                    self.requests.remove(&(index, p));
                    core.handle_failed(now(), index, p, false);
                }
            }
            Fetched::Busy(index, p) => {
                self.requests.remove(&(index, p));
                core.handle_failed(now(), index, p, true);
            }
            Fetched::OriginEnd(result) => {
                core.handle_origin_end(now(), result, self.remote.get().map(|r| r.ranges));
            }
        }
    }

    /// The one place a core's end becomes the download's outcome.
    fn render(&self, core: &Core, end: End) -> Result<(), AttemptFailure> {
        let (task, url) = (self.task, origin::redact(&self.task.url));
        let content = core.content_id().map(|c| c.to_string()).unwrap_or_default();
        let fatal = |description: String| {
            Err(Failure::Fatal(JobError {
                context: ErrorContext::RemoteFile,
                file: Some(task.index),
                description,
            })
            .into())
        };
        match end {
            End::Done => Ok(()),
            End::Stuck => Err(Failure::Transient(JobError {
                context: ErrorContext::Transport,
                file: Some(task.index),
                description: format!(
                    "no peer has the missing pieces of {url} and the source policy never uses the origin"
                ),
            })
            .into()),
            End::DiffersFromLayer(index) => fatal(format!(
                "piece {index} from {url} differs from the verified piece layer of {content}"
            )),
            End::ClaimFailed => Err(AttemptFailure::ClaimFailed),
            End::OriginPieceFailed(index, reason) => fatal(format!(
                "piece {index} from {url} fails verification against content id {content}: {reason}"
            )),
            End::Origin(e) => Err(origin_failure(task.index, &e).into()),
        }
    }

    /// Carries out one action.
    async fn execute(&mut self, core: &mut Core, action: Action) -> Result<(), AttemptFailure> {
        let env = self.env;
        match action {
            Action::RequestPiece {
                content_id,
                peer,
                index,
            } => {
                let (swarm, bandwidth, fg) =
                    (env.swarm.clone(), env.bandwidth.clone(), self.foreground);
                let h = self.tasks.spawn(async move {
                    Event::Fetched(match swarm.piece(peer, content_id, index).await {
                        Ok(PieceResponse::Data(b)) => {
                            bandwidth.download(fg, b.len() as u64).await;
                            Fetched::Piece(index, Source::Peer(peer), b)
                        }
                        Ok(PieceResponse::Busy) => Fetched::Busy(index, peer),
                        Ok(other) => {
                            Fetched::Failed(index, Source::Peer(peer), format!("{other:?}"))
                        }
                        Err(e) => Fetched::Failed(index, Source::Peer(peer), e.to_string()),
                    })
                });
                self.requests.insert((index, peer), h);
            }
            Action::CancelRequest { peer, index } => {
                if let Some(h) = self.requests.remove(&(index, peer)) {
                    h.abort();
                }
            }
            Action::FetchOrigin { start, end } => self.fetch_origin(start, end),
            Action::AskPeers {
                content_id,
                dht,
                busy,
            } => {
                let env2 = env.clone();
                self.tasks.spawn(async move {
                    let (asked, reachable, answers) =
                        have_round(&env2, content_id, dht, &busy).await;
                    Event::Round(asked, reachable, answers)
                });
            }
            Action::Announce { content_id, to } => {
                if let Some(h) = env.store.have(&HaveKey::Blake3(*content_id.hash()))
                    && h.content_id == content_id
                {
                    env.swarm.announce(to, h).await;
                }
            }
            Action::Gather {
                content_id,
                known,
                claims,
                full_from,
            } => {
                let env2 = env.clone();
                self.tasks.spawn(async move {
                    Event::Assembled(assemble(env2, content_id, known, claims, full_from).await)
                });
            }
            Action::Write {
                index,
                source,
                bytes,
            } => {
                if self
                    .writer
                    .send(ToWriter::Piece(index, source, bytes))
                    .await
                    .is_err()
                {
                    return Err(self.writer_failed());
                }
            }
            Action::SetLayer { layer, verified } => {
                let id = layer.content_id();
                info!(url = %origin::redact(&self.task.url), %id, "piece layer assembled and verified");
                if self
                    .writer
                    .send(ToWriter::Layer(layer.clone()))
                    .await
                    .is_err()
                {
                    return Err(self.writer_failed());
                }
                env.store.insert(
                    layer,
                    verified,
                    self.task.temp.clone(),
                    Backing::Held(self.served_file.clone()),
                );
                (self.progress)(Update::ContentId(id));
            }
            Action::MemberTick {
                content_id,
                done,
                origin_now,
                proven_only,
            } => {
                let now = now();
                let piece_count = self.piece_count;
                let view = env.store.with_members(&content_id, |v| {
                    v.set_self(done, origin_now, now);
                    (v.fetchers(piece_count, now, proven_only), v.grew_at())
                });
                core.handle_members(now, view);
            }
            Action::Ban { content_id, peer } => {
                if env.bans.ban(BanKey::Blake3(*content_id.hash()), peer) {
                    (self.progress)(Update::Banned);
                }
            }
            Action::Store(op) => self.store(op),
            Action::PieceDone { bytes, peer } => {
                let source = peer.map(|p| env.swarm.peer_source(&p));
                (self.progress)(Update::Piece { bytes, source });
            }
            Action::Rejected => (self.progress)(Update::Rejected),
        }
        Ok(())
    }

    fn store(&self, op: StoreOp) {
        let (store, temp) = (&self.env.store, &self.task.temp);
        match op {
            StoreOp::SetFetching(id, fetching) => store.set_fetching(&id, temp, fetching),
            StoreOp::MarkVerified(id, index) => store.mark_verified(&id, temp, index),
            StoreOp::AddClaim(id, index, cv) => store.add_claim(&id, temp, index, cv),
            StoreOp::SetRelayed(id, entries) => store.set_relayed(&id, temp, &entries),
            StoreOp::MergeMembers(id, peer, members) => {
                let now = now();
                store.with_members(&id, |v| v.merge(&peer, &members, now));
            }
            StoreOp::ForgetMember(id, peer) => {
                store.with_members(&id, |v| v.forget(&peer));
            }
        }
    }

    /// Starts an origin run of pieces `start..end`: pieces go out through the origin channel
    /// as they arrive, the run's end through the task set.
    fn fetch_origin(&mut self, start: u32, end: u32) {
        let (origin, url, tx, remote) = (
            self.env.origin.clone(),
            self.task.url.clone(),
            self.origin_tx.clone(),
            self.remote.clone(),
        );
        let (bandwidth, fg) = (self.env.bandwidth.clone(), self.foreground);
        let (length, piece_size) = (self.length, self.piece_size);
        self.tasks.spawn(async move {
            let run = async {
                let r = remote.get_or_try_init(|| origin.probe(&url)).await?.clone();
                if r.length != length {
                    return Err(OriginError::Changed {
                        url: url.clone(),
                        detail: format!(
                            "the origin has {} bytes, the content id {length}",
                            r.length
                        ),
                    });
                }
                let mut index = start;
                let range =
                    u64::from(start) * piece_size..(u64::from(end) * piece_size).min(length);
                origin
                    .fetch(&url, &r, range, piece_size, |bytes| {
                        let (tx, i, bandwidth) = (tx.clone(), index, bandwidth.clone());
                        index += 1;
                        async move {
                            bandwidth.download(fg, bytes.len() as u64).await;
                            tx.send(Fetched::Piece(i, Source::Origin, bytes))
                                .await
                                .is_ok()
                        }
                    })
                    .await
            };
            Event::Fetched(Fetched::OriginEnd(run.await))
        });
    }
}

/// One have round for `id`: the providers from the DHT too when `dht`, then at most
/// [`POLL_PEERS`] of the reachable peers (`busy` first), not banned.
async fn have_round(
    env: &Env,
    id: ContentId,
    dht: bool,
    busy: &HashSet<PeerId>,
) -> (Vec<PeerId>, Vec<PeerId>, Vec<Answer>) {
    let key = BanKey::Blake3(*id.hash());
    let have = HaveKey::Blake3(*id.hash());
    let providers = if dht {
        env.swarm.find_providers(have, PEER_REFRESH).await
    } else {
        Vec::new()
    };
    let reachable = peers_to_ask(env, key, providers).await;
    let asked = poll_sample(reachable.clone(), busy);
    let answers = ask(env, have, asked.clone(), None)
        .await
        .into_iter()
        .filter(|(p, h)| h.content_id == id && !env.bans.is_banned(key, p))
        .collect();
    (asked, reachable, answers)
}

/// What discovery found: the content chosen among the peers' answers (with the key a false
/// claim bans under), its verified layer if a peer gave one (or the resumed one), the peers
/// that serve it, and until when peers are waited for before the origin.
struct Discovered {
    choice: Option<(ContentId, Vec<Answer>, BanKey)>,
    layer: Option<PieceLayer>,
    peers: Vec<Answer>,
    wait_until: Instant,
    /// The origin's answer, once probed (shared with origin runs).
    remote: Arc<OnceCell<Remote>>,
    /// The source policy's wait for peers before the origin.
    delay: Duration,
    /// The content id was claimed by peers for a SHA-256 (its layer verified against it).
    claimed: bool,
}

/// The file sized and opened: its geometry, the layer being assembled (without a verified
/// one), the temporary file, the pieces kept from an earlier run and what checks new ones.
struct Opened<'r> {
    found: Discovered,
    length: u64,
    geometry: ContentId,
    assembly: Option<Assembly>,
    file: Arc<File>,
    kept: Bitfield,
    checker: Checker,
    resume: Option<&'r ResumePoint>,
    resumed_bytes: u64,
}

/// What the transfer left: the writer's end (pieces on disk, the SHA-256, the derived layer),
/// the layer, and where bytes came from.
struct Transferred {
    found: Discovered,
    end: WriterEnd,
    layer: Option<PieceLayer>,
    from_peers: bool,
    assembly_id: Option<ContentId>,
    piece_count: u32,
    served_file: Arc<File>,
}

/// One try at a file: discovery and the layer, the temporary file, the transfer, and the
/// whole-file checks.
async fn attempt(
    env: &Env,
    task: &FileTask,
    origin_only: bool,
    resume: Option<&ResumePoint>,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Downloaded, AttemptFailure> {
    let use_peers = !origin_only && !task.expected.is_none() && env.swarm.mode().uses_peers();
    let found = discover_layer(env, task, use_peers, resume, cancel, progress).await?;
    let opened = open_file(env, task, use_peers, resume, found).await?;
    let done = transfer(env, task, use_peers, opened, cancel, progress).await?;
    finish(env, task, done, progress)
}

/// Discovery's state between have rounds: until when peers are waited for, the cache node
/// wait, and the origin's length probe (SHA-256 claims only).
struct Discovery {
    started: Instant,
    wait_until: Instant,
    cache_wait: CacheWait,
    remote: Arc<OnceCell<Remote>>,
    length_probe: Option<AbortOnDrop>,
}

impl Discovery {
    fn new(env: &Env, task: &FileTask, use_peers: bool, delay: Duration) -> Self {
        let started = now();
        let remote: Arc<OnceCell<Remote>> = Arc::new(OnceCell::new());
        // With only a SHA-256, a peer's claim names the length too, and a crowd of made-up
        // peers could claim any length (up to 1 TiB of disk): the origin tells the length, and
        // claims of another length do not count. The probe runs beside the peers' answers.
        let probe = use_peers && task.expected.blake3.is_none() && !env.policy.never_origin;
        let length_probe = probe.then(|| {
            let (origin, url, remote) = (env.origin.clone(), task.url.clone(), remote.clone());
            AbortOnDrop(tokio::spawn(async move {
                if let Ok(r) = origin.probe(&url).await {
                    let _ = remote.set(r);
                }
            }))
        });
        Self {
            started,
            wait_until: started + if use_peers { delay } else { Duration::ZERO },
            cache_wait: CacheWait::new(env.policy.cache_fallback(task.priority)),
            remote,
            length_probe,
        }
    }

    /// One have round: asks the peers (and the DHT's providers, and a cache node with the
    /// origin URL), and chooses the content: the resumed layer's, else the one most peers
    /// serve verified pieces of. Claims of another length than the origin's do not count.
    async fn choose(
        &mut self,
        env: &Env,
        task: &FileTask,
        resume: Option<&ResumePoint>,
    ) -> Option<(ContentId, Vec<Answer>, BanKey)> {
        let expected = task.expected;
        let (key, ban) = match (expected.blake3, expected.sha256) {
            (Some(h), _) => (HaveKey::Blake3(h), BanKey::Blake3(h)),
            (None, Some(d)) => (HaveKey::Sha256(d), BanKey::Sha256(d)),
            (None, None) => return None,
        };
        let providers = discover(env, key).await;
        let cache_nodes = env.swarm.cache_nodes();
        let fill_from = if cache_nodes.is_empty() {
            None
        } else {
            let connected = env.swarm.connected_peers().await;
            let target = self.cache_wait.target(&connected, cache_nodes);
            if target.is_none() {
                // Cache nodes are configured but none is connected yet: wait for one as for
                // any first peer.
                self.wait_until = self.wait_until.max(self.started + env.discovery_wait);
            }
            target
        };
        let mut answers =
            ask_peers(env, key, ban, providers, fill_from.map(|p| (p, &task.url))).await;
        if let Some(until) = self.cache_wait.observe(&answers, now()) {
            self.wait_until = self.wait_until.max(until);
        }
        if let Some(h) = expected.blake3 {
            answers.retain(|(_, h2)| *h2.content_id.hash() == h);
        } else if !answers.is_empty()
            && let Some(probe) = &self.length_probe
        {
            // The claims wait for the origin's length (at most `LENGTH_WAIT`; a probe that
            // fails tells nothing, and the claims are then taken as they are).
            let deadline = tokio::time::Instant::now() + LENGTH_WAIT;
            while !probe.0.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Some(r) = self.remote.get() {
                answers.retain(|(_, h2)| h2.content_id.length() == r.length);
            }
        }
        let mut groups: HashMap<ContentId, Vec<Answer>> = HashMap::new();
        for a in answers {
            groups.entry(a.1.content_id).or_default().push(a);
        }
        match resume.and_then(|r| r.layer.as_ref()) {
            // Resuming pieces verified against a layer: stay with that content.
            Some(l) => {
                let id = l.content_id();
                Some((id, groups.remove(&id).unwrap_or_default(), ban))
            }
            // The content most peers serve verified pieces of.
            None => groups
                .into_iter()
                .max_by_key(|(id, v)| {
                    (
                        v.iter().filter(|(_, h)| h.have.count_ones() > 0).count(),
                        v.len(),
                        *id,
                    )
                })
                .map(|(id, v)| (id, v, ban)),
        }
    }
}

/// The layer of content `id` from the peers that answered for it (`answers`), unless `layer`
/// is already known: a few peers at once, each for a short while, until one verifies (a crowd
/// of peers that never answer costs [`LAYER_WAIT`] per [`LAYER_ASKS`] of them, not 20 s
/// each). Peers plainly assembling a layer themselves are not asked. A peer whose layer does
/// not verify is banned. Returns the layer and the peers not banned.
async fn layer_of_peers(
    env: &Env,
    id: ContentId,
    answers: &[Answer],
    mut layer: Option<PieceLayer>,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> (Option<PieceLayer>, Vec<Answer>) {
    let ban_key = BanKey::Blake3(*id.hash());
    let mut peers: Vec<Answer> = answers
        .iter()
        .filter(|(peer, _)| !env.bans.is_banned(ban_key, peer))
        .cloned()
        .collect();
    let askable: Vec<PeerId> = peers
        .iter()
        .filter(|(_, h)| !(h.have.count_ones() == 0 && h.claimed.count_ones() > 0))
        .map(|(p, _)| *p)
        .collect();
    if layer.is_none() && id.piece_count() <= 1 && !askable.is_empty() {
        layer = PieceLayer::verify(id, Vec::new()).ok();
    }
    for batch in askable.chunks(LAYER_ASKS) {
        if layer.is_some() {
            break;
        }
        let asks = batch.iter().map(|peer| async move {
            let got = tokio::time::timeout(LAYER_WAIT, env.swarm.layer(*peer, id, false)).await;
            (*peer, got)
        });
        for (peer, got) in futures::future::join_all(asks).await {
            match got {
                Ok(Ok(LayerResponse::Full(cvs))) => match PieceLayer::verify(id, cvs) {
                    Ok(l) => {
                        if layer.is_none() {
                            layer = Some(l);
                        }
                    }
                    Err(e) => {
                        warn!(%peer, "piece layer rejected: {e}");
                        if env.bans.ban(ban_key, peer) {
                            progress(Update::Banned);
                        }
                        peers.retain(|(p, _)| *p != peer);
                    }
                },
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!("layer request failed: {e}"),
                Err(_) => debug!(%peer, "layer request took too long"),
            }
        }
    }
    (layer, peers)
}

/// Discovery and the piece layer (steps 1 and 2): the resumed layer, or the first peer's that
/// verifies. Under the source policy's wait for peers, this is repeated until a peer gives a
/// verified layer or the wait is over, before the origin is contacted at all.
async fn discover_layer(
    env: &Env,
    task: &FileTask,
    use_peers: bool,
    resume: Option<&ResumePoint>,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Discovered, AttemptFailure> {
    let delay = env.policy.origin_delay(task.priority);
    let mut d = Discovery::new(env, task, use_peers, delay);
    loop {
        let choice = if use_peers {
            d.choose(env, task, resume).await
        } else {
            None
        };
        let resumed = if use_peers {
            resume.and_then(|r| r.layer.clone())
        } else {
            None
        };
        let (layer, peers) = match &choice {
            Some((id, answers, _)) => layer_of_peers(env, *id, answers, resumed, progress).await,
            None => (resumed, Vec::new()),
        };
        if layer.is_some() || now() >= d.wait_until {
            // A claimed content id (SHA-256 lookup) counts only with a layer that verifies
            // against it.
            let claimed = task.expected.blake3.is_none() && layer.is_some();
            return Ok(Discovered {
                choice,
                layer,
                peers,
                wait_until: d.wait_until,
                remote: d.remote,
                delay,
                claimed,
            });
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(Failure::Cancelled.into()),
            () = tokio::time::sleep(PEER_REFRESH) => {}
        }
    }
}

/// The pieces an earlier run left in the temporary file that this run keeps, and what checks
/// new pieces: the layer, or a builder deriving it. Pieces this process verified itself in a
/// run that stopped are kept as they are; others are checked again from the file.
async fn kept_pieces(
    task: &FileTask,
    geometry: ContentId,
    layer: Option<&PieceLayer>,
    resume: Option<&ResumePoint>,
) -> Result<(Bitfield, Checker), AttemptFailure> {
    let length = geometry.length();
    let piece_count = geometry.piece_count();
    let local = |e: std::io::Error| AttemptFailure::from(local_error(task.index, &task.temp, &e));
    let builder = || {
        LayerBuilder::new(length).map_err(|e| {
            AttemptFailure::from(Failure::Fatal(JobError {
                context: ErrorContext::RemoteFile,
                file: Some(task.index),
                description: e.to_string(),
            }))
        })
    };
    let kept = match resume {
        None => (
            Bitfield::new(piece_count),
            match layer {
                Some(l) => Checker::Layer(l.clone()),
                None => Checker::Builder(builder()?),
            },
        ),
        // Pieces this process verified and wrote in a run that stopped: no second check.
        // (Against the same layer, or into the content id being derived.)
        Some(ResumePoint {
            pieces,
            trusted: Some(kept_builder),
            layer: before,
            ..
        }) if match (layer, before, kept_builder) {
            (Some(now), Some(before), _) => now == before,
            (None, None, Some(_)) => true,
            _ => false,
        } =>
        {
            (
                pieces.clone(),
                match (layer, kept_builder) {
                    (Some(l), _) => Checker::Layer(l.clone()),
                    (None, Some(b)) => Checker::Builder(b.clone()),
                    (None, None) => unreachable!("guarded"),
                },
            )
        }
        Some(r) => {
            let checker = match layer {
                Some(l) => Checker::Layer(l.clone()),
                None => Checker::Builder(builder()?),
            };
            let (pieces, temp, owner) = (r.pieces.clone(), task.temp.clone(), task.owner);
            tokio::task::spawn_blocking(move || recheck(&temp, geometry, &pieces, checker, owner))
                .await
                .map_err(|e| local(std::io::Error::other(e)))?
                .map_err(local)?
        }
    };
    Ok(kept)
}

/// The length (from the layer or the origin) and the temporary file (step 3), keeping the
/// pieces of an earlier run that are pieces of this content.
async fn open_file<'r>(
    env: &Env,
    task: &FileTask,
    use_peers: bool,
    resume: Option<&'r ResumePoint>,
    mut found: Discovered,
) -> Result<Opened<'r>, AttemptFailure> {
    let expected = task.expected;
    let never_origin = env.policy.never_origin;
    let (layer, remote) = (&found.layer, &found.remote);
    // 3. Length, from the layer or the origin.
    let length = match &layer {
        Some(l) => l.content_id().length(),
        None if never_origin => {
            return Err(Failure::Transient(JobError {
                context: ErrorContext::Transport,
                file: Some(task.index),
                description: format!(
                    "no peer serves {} and the source policy never uses the origin",
                    origin::redact(&task.url)
                ),
            })
            .into());
        }
        None => {
            remote
                .get_or_try_init(|| env.origin.probe(&task.url))
                .await
                .map_err(|e| origin_failure(task.index, &e))?
                .length
        }
    };
    let geometry = ContentId::new([0; 32], length).map_err(|e| {
        Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!("{}: {e}", origin::redact(&task.url)),
        })
    })?;
    let piece_count = geometry.piece_count();
    // Without a verified layer but with the expected BLAKE3, the layer is assembled from the
    // pieces this node and its peers fetch from the origin.
    let assembly = match (&layer, expected.blake3) {
        (None, Some(h)) if use_peers && piece_count > 1 && !never_origin => {
            ContentId::new(h, length).ok().map(|id| Assembly {
                id,
                own: vec![None; piece_count as usize],
                relayed: vec![None; piece_count as usize],
                claims: HashMap::new(),
                failed: false,
                running: false,
                changed: true,
            })
        }
        _ => None,
    };
    if let Some(a) = &assembly {
        found.peers.retain(|(_, h)| h.content_id == a.id);
    }
    // 4. The temporary file: pieces of an earlier run are kept if they are pieces of this
    // content (same length; same layer, or from the origin with the same validator).
    let local = |e: std::io::Error| AttemptFailure::from(local_error(task.index, &task.temp, &e));
    if resume.is_some_and(|r| r.pieces.count_ones() > 0) && !task.temp.exists() {
        return Err(local(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the temporary file with the pieces of an earlier run vanished",
        )));
    }
    let resume = resume.filter(|r| {
        r.meta.length == length
            && r.pieces.len() == piece_count
            && r.pieces.count_ones() > 0
            && match &layer {
                Some(_) => true,
                None => {
                    let now = remote.get().and_then(|x| x.validator.clone());
                    match (&r.meta.validator, &now) {
                        (Some(a), Some(b)) => a == b,
                        // Without validators, only a digest checked at the end can tell.
                        (None, None) => !expected.is_none(),
                        _ => false,
                    }
                }
            }
    });
    let file = match resume {
        Some(_) => {
            open_temp(&task.temp, task.owner, true).and_then(|f| f.set_len(length).map(|()| f))
        }
        None => {
            if let Some(d) = &task.durable {
                // Forget an earlier run's pieces before the file is emptied.
                d.store
                    .clear_pieces(d.job, d.index)
                    .map_err(|e| local(std::io::Error::other(e)))?;
            }
            create_temp(&task.temp, task.owner, length)
        }
    }
    .map(Arc::new)
    .map_err(local)?;
    let (kept, checker) = kept_pieces(task, geometry, layer.as_ref(), resume).await?;
    let resumed_bytes: u64 = kept
        .ones()
        .filter_map(|i| geometry.piece_range(i))
        .map(|r| r.end - r.start)
        .sum();
    if resume.is_some() {
        info!(
            url = %origin::redact(&task.url),
            pieces = kept.count_ones(),
            "resuming with pieces from an earlier run"
        );
    }
    Ok(Opened {
        found,
        length,
        geometry,
        assembly,
        file,
        kept,
        checker,
        resume,
        resumed_bytes,
    })
}

/// Registers the file with the store: served from its descriptor when the layer is known, or
/// assembling the layer (with the chaining values of the pieces kept) when this download is the
/// node's only one assembling it; another one is: `assembly` becomes `None`.
fn register(
    env: &Env,
    task: &FileTask,
    layer: Option<&PieceLayer>,
    kept: &Bitfield,
    file: &Arc<File>,
    assembly: &mut Option<Assembly>,
    checker: &Checker,
) {
    if let Some(l) = layer {
        env.store.remove_at(&l.content_id(), &task.temp);
        env.store.insert(
            l.clone(),
            kept.clone(),
            task.temp.clone(),
            Backing::Held(file.clone()),
        );
    }
    if let Some(a) = assembly {
        if !env.store.begin_assembly(a.id, task.temp.clone()) {
            // Another download of this content on this node assembles it: do without.
            *assembly = None;
        } else if let Checker::Builder(b) = checker {
            for i in kept.ones() {
                a.own[i as usize] = b.chaining_value(i);
                if let Some(cv) = a.own[i as usize] {
                    env.store.add_claim(&a.id, &task.temp, i, cv);
                }
            }
        }
    }
}

/// After the run: reads what the writer still reports while it ends (it must never block on
/// a full channel; a piece that the assembled layer rejected after the run ended fails the
/// file), and on failure stops serving the file and leaves in `task.left` what the next run may
/// keep (`left`: the content id, the layer and what the pieces are of).
async fn wind_down(
    env: &Env,
    task: &FileTask,
    result: Result<(), AttemptFailure>,
    writer_thread: std::thread::JoinHandle<Result<WriterEnd, std::io::Error>>,
    mut verified_rx: mpsc::Receiver<Verdict>,
    (content_id, layer, left): (Option<ContentId>, Option<&PieceLayer>, ResumeDisk),
) -> Result<WriterEnd, AttemptFailure> {
    let join = tokio::task::spawn_blocking(move || writer_thread.join());
    let mut late_rejects = Vec::new();
    while let Some(v) = verified_rx.recv().await {
        if let Err(reason) = v.result {
            late_rejects.push(format!("piece {}: {reason}", v.index));
        }
    }
    let end = join.await.ok().and_then(Result::ok);
    let result = match result {
        Ok(()) if !late_rejects.is_empty() => Err(Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!(
                "{}: bytes from the origin differ from the verified piece layer ({})",
                origin::redact(&task.url),
                late_rejects.join(", ")
            ),
        })
        .into()),
        other => other,
    };
    if let Err(e) = result {
        if let Some(id) = &content_id {
            env.store.remove_at(id, &task.temp);
        }
        // Unless the bytes are discarded (a false claim), the next run may keep the pieces.
        if !matches!(e, AttemptFailure::ClaimFailed)
            && let Some(Ok(end)) = &end
            && end.on_disk.count_ones() > 0
        {
            *task.left.lock().unwrap_or_else(|e| e.into_inner()) = Some(ResumePoint {
                pieces: end.on_disk.clone(),
                meta: left,
                layer: layer.cloned(),
                trusted: Some(end.builder.clone()),
            });
        }
        return Err(e);
    }
    match end {
        Some(Ok(end)) => Ok(end),
        Some(Err(e)) => Err(local_error(task.index, &task.temp, &e).into()),
        None => Err(local_error(
            task.index,
            &task.temp,
            &std::io::Error::other("writer thread failed"),
        )
        .into()),
    }
}

/// The core of a transfer, and this download's membership of its content's swarm (left when
/// dropped).
#[allow(clippy::too_many_arguments)]
async fn start_core(
    env: &Env,
    use_peers: bool,
    found: &Discovered,
    layer: Option<PieceLayer>,
    assembly: Option<Assembly>,
    kept: Bitfield,
    geometry: ContentId,
    from_peers: bool,
) -> (Core, Option<Membership>) {
    let me = env.swarm.peer_id();
    let content = layer
        .as_ref()
        .map(PieceLayer::content_id)
        .or(assembly.as_ref().map(|a| a.id));
    let swarm_about = content.is_some()
        && (!found.peers.is_empty()
            || env.swarm.mode().uses_dht()
            || !env.swarm.connected_peers().await.is_empty());
    // Swarm members (`members`): have answers now state this node as one.
    let membership = content.filter(|_| use_peers).map(|id| {
        env.store.join_members(id, me, now());
        Membership {
            store: env.store.clone(),
            id,
        }
    });
    let (wait_until, delay) = (found.wait_until, found.delay);
    let core = Core::new(
        Setup {
            me,
            piece_size: geometry.piece_size(),
            piece_count: geometry.piece_count(),
            layer,
            assembly,
            kept,
            claimed: found.claimed,
            from_peers,
            never_origin: env.policy.never_origin,
            use_peers,
            swarm: swarm_about,
            wait_until,
            origin_wait: (use_peers && !delay.is_zero() && now() < wait_until)
                .then_some(wait_until),
            scheduler: env.scheduler.clone(),
        },
        now(),
    );
    (core, membership)
}

/// The transfer (step 4): the file registered with the store, the writer started, and the
/// core run by the driver until every piece verified; on failure, what the next run may keep.
async fn transfer(
    env: &Env,
    task: &FileTask,
    use_peers: bool,
    o: Opened<'_>,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Transferred, AttemptFailure> {
    let Opened {
        mut found,
        length,
        geometry,
        mut assembly,
        file,
        kept,
        checker,
        resume,
        resumed_bytes,
    } = o;
    let (piece_size, piece_count) = (geometry.piece_size(), geometry.piece_count());
    let foreground = task.priority == crate::job::Priority::Foreground;
    let claimed = found.claimed;
    let remote = found.remote.clone();
    let layer = found.layer.clone();
    progress(Update::Started {
        length,
        content_id: layer.as_ref().map(PieceLayer::content_id),
        resumed: resumed_bytes,
    });
    register(
        env,
        task,
        layer.as_ref(),
        &kept,
        &file,
        &mut assembly,
        &checker,
    );
    let (verified_tx, mut verified_rx) = mpsc::channel::<Verdict>(256);
    let checkpointing = task.durable.clone().map(|durable| Checkpointing {
        durable,
        meta: ResumeDisk {
            length,
            content_id: layer.as_ref().map(|l| l.content_id().to_string()),
            claimed,
            validator: None,
            from_peers: resume.is_some_and(|r| r.meta.from_peers),
        },
        layer: layer.as_ref().map(|l| l.chaining_values().to_vec()),
        remote: remote.clone(),
    });
    // The descriptor pieces are served through while the file downloads.
    let served_file = file.clone();
    let writer = spawn_writer(
        file,
        checker,
        piece_size,
        length,
        kept.clone(),
        checkpointing,
        verified_tx,
    );
    // 5. Transfer: the core decides, the driver carries out.
    let (mut core, _membership) = start_core(
        env,
        use_peers,
        &found,
        layer.clone(),
        assembly.take(),
        kept.clone(),
        geometry,
        resume.is_some_and(|r| r.meta.from_peers),
    )
    .await;
    core.start(now(), std::mem::take(&mut found.peers));
    let (origin_tx, mut origin_rx) = mpsc::channel::<Fetched>(ORIGIN_QUEUE);
    let Writer {
        tx: writer_tx,
        thread: writer_thread,
    } = writer;
    let mut driver = Driver {
        env,
        task,
        foreground,
        length,
        piece_size,
        piece_count,
        remote: remote.clone(),
        writer: writer_tx,
        served_file: served_file.clone(),
        progress,
        tasks: tokio::task::JoinSet::new(),
        requests: HashMap::new(),
        origin_tx,
    };
    let result = driver
        .run(
            &mut core,
            &mut verified_rx,
            &mut origin_rx,
            &|| writer_thread.is_finished(),
            cancel,
        )
        .await;
    // Every child task is aborted, and the writer's queue closes.
    drop(driver);
    let content_id = core.content_id();
    let layer = core.layer().cloned();
    let from_peers = core.got_peer_bytes();
    let assembly_id = core.assembly_id();
    let left = ResumeDisk {
        length,
        content_id: layer.as_ref().map(|l| l.content_id().to_string()),
        claimed,
        validator: remote.get().and_then(|r| r.validator.clone()),
        from_peers,
    };
    let end = wind_down(
        env,
        task,
        result,
        writer_thread,
        verified_rx,
        (content_id, layer.as_ref(), left),
    )
    .await?;
    Ok(Transferred {
        found,
        end,
        layer,
        from_peers,
        assembly_id,
        piece_count,
        served_file,
    })
}

/// The whole-file checks (step 5): every piece on disk, the content id and the SHA-256
/// expected; then the file is served as verified.
fn finish(
    env: &Env,
    task: &FileTask,
    t: Transferred,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Downloaded, AttemptFailure> {
    let Transferred {
        found,
        end,
        layer,
        from_peers,
        assembly_id,
        piece_count,
        served_file,
    } = t;
    let expected = task.expected;
    let (choice, claimed) = (found.choice, found.claimed);
    // 6. Whole-file checks: every piece on disk, checked.
    if end.on_disk.count_ones() != piece_count {
        return Err(Failure::Fatal(JobError {
            context: ErrorContext::LocalFile,
            file: Some(task.index),
            description: format!(
                "{} of {piece_count} pieces of {} are on disk at the end",
                end.on_disk.count_ones(),
                task.temp.display()
            ),
        })
        .into());
    }
    let layer = match (layer, end.builder) {
        (Some(l), _) => l,
        (None, Some(b)) => b.finish().ok_or_else(|| {
            Failure::Fatal(JobError {
                context: ErrorContext::LocalFile,
                file: Some(task.index),
                description: "pieces missing at the end".into(),
            })
        })?,
        (None, None) => unreachable!("a writer without a layer has a builder"),
    };
    let id = layer.content_id();
    let sha256 = end.sha256.ok_or_else(|| {
        Failure::Fatal(JobError {
            context: ErrorContext::LocalFile,
            file: Some(task.index),
            description: "SHA-256 could not be computed".into(),
        })
    })?;
    // A whole-file mismatch: these bytes must not be resumed from.
    let forget = || {
        env.store.remove_at(&id, &task.temp);
        if let Some(a) = &assembly_id {
            env.store.remove_at(a, &task.temp);
        }
        if let Some(d) = &task.durable
            && let Err(e) = d.store.clear_pieces(d.job, d.index)
        {
            warn!(url = %origin::redact(&task.url), "cannot forget the pieces of a file that failed: {e}");
        }
    };
    if let Err(e) = expected.check_content_id(&id) {
        forget();
        // Only origin bytes reach here without a trusted layer.
        return Err(Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!("{}: {e}", origin::redact(&task.url)),
        })
        .into());
    }
    if let Err(e) = expected.check_sha256(sha256) {
        forget();
        if claimed && from_peers {
            if let Some((_, answers, ban)) = &choice {
                for (peer, _) in answers {
                    if env.bans.ban(*ban, *peer) {
                        progress(Update::Banned);
                    }
                }
            }
            return Err(AttemptFailure::ClaimFailed);
        }
        return Err(Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!("{}: {e}", origin::redact(&task.url)),
        })
        .into());
    }
    // Verified: serve it (from now on from the file reopened as its owner, only while it is
    // this file), and answer SHA-256 lookups for it.
    let identity = FileIdentity::of(&served_file)
        .map_err(|e| AttemptFailure::from(local_error(task.index, &task.temp, &e)))?;
    env.store.insert(
        layer.clone(),
        Bitfield::full(piece_count),
        task.temp.clone(),
        Backing::Named {
            owner: task.owner,
            identity,
        },
    );
    env.store.set_sha256(&id, sha256);
    Ok(Downloaded {
        content_id: id,
        layer,
        sha256,
        from_peers,
        from_cache: false,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_read_back_for_the_sha256_must_still_be_the_verified_ones() {
        use std::os::unix::fs::FileExt as _;
        let piece = 16 * 1024u64;
        let bytes: Vec<u8> = (0..3 * piece).map(|i| (i % 251) as u8).collect();
        let d = shoal_validator::hash_reader(&bytes[..], bytes.len() as u64).unwrap();
        let cvs = d.layer.chaining_values().to_vec();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, &bytes).unwrap();
        let run = |file: &File| {
            let (tx, rx) = std::sync::mpsc::sync_channel(8);
            // Pieces 2 and 1 come first and without their bytes (read back), then piece 0.
            for i in [2u32, 1] {
                tx.send((i, None, Some(cvs[i as usize]))).unwrap();
            }
            let p0 = Bytes::copy_from_slice(&bytes[..piece as usize]);
            tx.send((0, Some(p0), Some(cvs[0]))).unwrap();
            drop(tx);
            sha_in_order(file, rx, piece, bytes.len() as u64)
        };
        let file = File::open(&path).unwrap();
        assert_eq!(run(&file).unwrap(), Some(d.sha256));
        // The owner writes into piece 2 after it verified: no SHA-256 is claimed for it.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"changed", 2 * piece + 9)
            .unwrap();
        let e = run(&file).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn bans_are_bounded_per_content_and_in_contents() {
        let bans = Bans::default();
        let key = BanKey::Blake3([1; 32]);
        let banned = (0..MAX_BANS_PER_KEY + 100)
            .filter(|_| bans.ban(key, PeerId::random()))
            .count();
        assert_eq!(banned, MAX_BANS_PER_KEY);
        for i in 0..MAX_BAN_KEYS + 10 {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64 + 2).to_le_bytes());
            bans.ban(BanKey::Blake3(h), PeerId::random());
        }
        let guard = bans.0.lock().unwrap();
        assert!(guard.0.len() <= MAX_BAN_KEYS);
        assert!(
            !guard.0.contains_key(&key),
            "the oldest content's bans went first"
        );
    }

    #[test]
    fn a_have_round_asks_at_most_sixteen_peers_with_busy_ones_first() {
        let peers: Vec<PeerId> = (0..40).map(|_| PeerId::random()).collect();
        // Few peers: all of them.
        assert_eq!(poll_sample(peers[..10].to_vec(), &HashSet::new()).len(), 10);
        // Many: 16, among them 8 of the 12 busy ones and 8 idle ones.
        let busy: HashSet<PeerId> = peers[..12].iter().copied().collect();
        let got = poll_sample(peers.clone(), &busy);
        assert_eq!(got.len(), POLL_PEERS);
        assert_eq!(got.iter().filter(|p| busy.contains(p)).count(), 8);
        let unique: HashSet<&PeerId> = got.iter().collect();
        assert_eq!(unique.len(), POLL_PEERS);
        // Over rounds, every peer is asked.
        let mut seen = HashSet::new();
        for _ in 0..50 {
            seen.extend(poll_sample(peers.clone(), &HashSet::new()));
        }
        assert_eq!(seen.len(), peers.len());
        // Nearly all busy: filled up with busy ones.
        let busy: HashSet<PeerId> = peers[..36].iter().copied().collect();
        assert_eq!(poll_sample(peers, &busy).len(), POLL_PEERS);
    }
}
