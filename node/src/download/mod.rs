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

mod assembly;
mod bans;
mod cache_wait;
mod core;
mod driver;
mod finish;
pub(crate) mod members;
mod peers;
mod prepare;
mod ranges;
pub(crate) mod scheduler;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod writer;

use std::{
    collections::{HashMap, HashSet},
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
use shoal_validator::{ContentId, Expected, LayerBuilder, PieceLayer, Sha256Digest};
use tokio::sync::{OnceCell, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use url::Url;

pub(crate) use self::bans::{BanKey, Bans};
use self::core::{Action, Core, End, Setup, StoreOp, Verdict};
use self::{
    assembly::*, cache_wait::*, driver::*, finish::*, peers::*, prepare::*, ranges::*, writer::*,
};
use crate::{
    download::scheduler::Source,
    job::{ByteRange, ErrorContext, JobError, JobId},
    source::origin::{self, OriginError, Remote},
    store::fsuser::FileIdentity,
    store::state::{ResumeDisk, ResumePoint},
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
/// Pieces buffered in front of the verifier thread. Each is a piece buffer held while the
/// writer is the slower side; 2 took less time and 2 to 5 MiB less peak RSS than 4, from one
/// seed and from the origin, on tmpfs and ext4 (`docs/benchmarks.md`, session 30).
const VERIFY_QUEUE: usize = 2;
/// Pieces written and waiting for the SHA-256 thread: how far it can fall behind before the
/// writer waits, each piece a buffer held. 1, 2 and 4 measured the same from one seed within
/// the noise (`docs/benchmarks.md`, session 30); 2 keeps the thread fed while the writer
/// flushes.
const SHA_QUEUE: usize = 2;
/// Bytes of early pieces the SHA-256 thread keeps in memory rather than read back from disk
/// (pieces written with `O_DIRECT` are not in the page cache, so reading them back is disk I/O).
/// The largest item of a leecher's memory bound: 16 MiB covered every reordering of one peer's
/// pipeline, but a piece that came late let the thread hold 16 pieces of 1 MiB behind it, and
/// a leecher given only the SHA-256 then peaked over 48 MiB resident in about one run in ten.
/// With 8 MiB the thread read back 0-7 pieces per run from one seed where 16 MiB read back
/// none, at the same median peak and time (`docs/benchmarks.md`, sessions 32 and 33).
const SHA_HOLD_BYTES: usize = 8 << 20;
/// Before its first origin run, a node of a swarm waits until no new member that uses the
/// origin was learned for this long (a little over one have round), so that the shares it
/// computes are the ones its far peers compute too.
const SETTLE: Duration = Duration::from_millis(300);
/// The longest that settling delays the first origin run, from when the origin may be used.
const MAX_SETTLE: Duration = Duration::from_secs(2);
/// Chaining values that cannot complete the layer yet are gathered from peers' claims at most
/// this often (each gathering asks every peer that can tell new ones for a partial layer);
/// once every value is known or told by some peer, the gathering runs at once. Every 250 ms
/// (each have round) cost eight nodes about as many layer requests as have queries.
const GATHER_EVERY: Duration = Duration::from_secs(1);

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
    /// Compute every file's SHA-256, expected or not, so that the node can answer SHA-256
    /// lookups for it afterwards; off, only files that expect one are hashed with SHA-256
    /// ([`crate::Builder::sha256_only_when_expected`]).
    pub(crate) sha256_always: bool,
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
    /// The job's requests carry headers, credentials or a client certificate
    /// ([`crate::job::HttpOptions::is_private`]): a cache node is never asked to fetch its URL.
    pub(crate) private_url: bool,
}

/// The state store and the file's key in it.
#[derive(Clone, Debug)]
pub(crate) struct Durable {
    pub(crate) store: crate::store::state_actor::StateHandle,
    pub(crate) job: JobId,
    pub(crate) index: u32,
}

/// A downloaded and verified file.
#[derive(Clone, Debug)]
pub(crate) struct Downloaded {
    pub(crate) content_id: ContentId,
    /// The layer the pieces verified against, or derived from them.
    pub(crate) layer: PieceLayer,
    /// The file's SHA-256; `None` when nobody expected one and the node computes it only
    /// when expected ([`Env::sha256_always`]).
    pub(crate) sha256: Option<Sha256Digest>,
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
        } else if matches!(e, OriginError::Certificate { .. }) {
            ErrorContext::ServerCertificate
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
        && let Err(e) = d.store.clear_pieces(d.job, d.index).await
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
                .is_ok_and(|d| !d.is(&id, None))
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
        sha256: Some(digests.sha256),
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
        cache.admit(&layer, sha256, &f, any_size)
    })
    .await;
    match r {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(url = %origin::redact(&task.url), "cannot cache the file: {e}"),
        Err(e) => warn!(url = %origin::redact(&task.url), "cannot cache the file: {e}"),
    }
}

/// Have rounds in a row a peer may miss before its pieces and claims stop counting.
const PEER_MISSES: u32 = 3;

/// How long no source may be able to supply a missing piece (the origin not being used)
/// before the download gives up with a TransientError.
const STUCK_GRACE: Duration = Duration::from_secs(5);

/// How often a download looks up providers in the DHT again (every this many have rounds).
const DHT_EVERY_REFRESHES: u32 = 40;

enum Fetched {
    Piece(PieceIndex, Source, Bytes),
    /// A peer did not send the piece.
    Failed(PieceIndex, PeerId, PieceFailure),
    /// The peer holds the piece but had no upload slot free.
    Busy(PieceIndex, PeerId),
    OriginEnd(Result<(), OriginError>),
}

/// Why a peer did not send a piece it was asked for (besides Busy, which is no failure).
#[derive(Debug, thiserror::Error)]
enum PieceFailure {
    /// The peer answered that it does not hold the piece.
    #[error("the peer does not hold the piece")]
    NotFound,
    /// The request failed ([`crate::swarm::RequestError`]: libp2p's `OutboundFailure`, or
    /// the swarm stopped).
    #[error(transparent)]
    Request(#[from] crate::swarm::RequestError),
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
    let opened = open_file(env, task, use_peers, resume, found, cancel).await?;
    let done = transfer(env, task, use_peers, opened, cancel, progress).await?;
    finish(env, task, done, progress).await
}
