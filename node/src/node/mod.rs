//! [`Node`]: the embeddable node, with its builder and the BITS-style job API.

pub(crate) mod diagnose;
pub(crate) mod metrics;
mod runner;
pub(crate) mod stats;

use self::runner::{Doing, Runner};

use std::{
    collections::{HashMap, HashSet},
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use libp2p::{Multiaddr, PeerId, identity};
use shoal_protocol::{Bitfield, HaveKey};
use shoal_validator::{ContentId, PieceLayer, ValidationState};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::{
    Error,
    download::scheduler,
    download::{self, Bans, Durable, Env, Failure, FileTask, Update},
    events::{Callback, Event, TransferredFile},
    job::slots::Slots,
    job::{
        ByteRange, ErrorContext, FileInfo, FileSpec, InvalidState, JobError, JobId, JobInfo,
        JobProperties, PeerStats, Priority, State, Transition, next_state,
    },
    source::origin,
    store::fsuser::{LocalIds, RenameError},
    store::state::ResumePoint,
    store::state::{FileDisk, JobDisk, PersistError, StateStore, StoredJob},
    store::{Backing, ContentStore},
    swarm,
    swarm::group::{Group, PeerMode},
};

/// The state database's record of this month's uploads.
const UPLOAD_MONTH: &str = "upload_month";

/// How often this month's upload count is written to the state database (when it changed).
const UPLOAD_MONTH_EVERY: Duration = Duration::from_secs(10);

/// Fill requests a cache node queues before it drops more (askers ask again).
const FILL_QUEUE: usize = 64;

/// Capacity of the event broadcast; slow subscribers miss old events rather than block the node.
const EVENT_CAPACITY: usize = 1024;

/// Builds a [`Node`].
#[derive(Default)]
pub struct Builder {
    swarm: swarm::Config,
    /// Whether `listen` replaced the default listen addresses.
    listen_set: bool,
    origin: origin::Config,
    scheduler: scheduler::Config,
    retry_delay: Option<Duration>,
    discovery_wait: Option<Duration>,
    policy: crate::source::policy::SourcePolicy,
    metrics: Option<std::net::SocketAddr>,
    cache: Option<crate::store::cache::CacheConfig>,
    cache_node_role: Option<crate::store::fill::CacheNodeRole>,
    bandwidth: crate::source::bandwidth::BandwidthLimits,
    keypair: Option<identity::Keypair>,
    state_dir: Option<PathBuf>,
    callbacks: Option<CallbackFactory>,
    inactivity_timeout: Option<Duration>,
    max_active_jobs: Option<usize>,
    time_slice: Option<Duration>,
}

/// Makes the callback of each job, from its snapshot: at creation and when a job is reloaded
/// from the state directory. `None` leaves the job without one.
pub type CallbackFactory = Arc<dyn Fn(&JobInfo) -> Option<Arc<dyn Callback>> + Send + Sync>;

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("swarm", &self.swarm)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Replaces the listen addresses (default: TCP and QUIC on every interface, random ports).
    #[must_use]
    pub fn listen(mut self, addrs: Vec<Multiaddr>) -> Self {
        self.swarm.listen = addrs;
        self.listen_set = true;
        self
    }

    /// Adds a static peer, with or without a trailing `/p2p/PEER_ID`.
    #[must_use]
    pub fn peer(mut self, addr: Multiaddr) -> Self {
        self.swarm.peers.push(addr);
        self
    }

    /// Turns mDNS discovery on or off (default off). mDNS multicasts to 224.0.0.251.
    #[must_use]
    pub fn mdns(mut self, on: bool) -> Self {
        self.swarm.mdns = on;
        self
    }

    /// Which peers the node uses (default [`PeerMode::Lan`]): origin only, LAN (listed and
    /// mDNS peers), group or internet (and the DHT).
    #[must_use]
    pub fn mode(mut self, mode: PeerMode) -> Self {
        self.swarm.mode = mode;
        self
    }

    /// Puts the node in a peer group: it connects only to nodes of the same group (libp2p
    /// pnet, TCP only, so the default listen addresses become TCP only) and uses the group's
    /// DHT.
    #[must_use]
    pub fn group(mut self, group: Group) -> Self {
        self.swarm.group = Some(group);
        self
    }

    /// Adds a DHT bootstrap peer; the address must end in `/p2p/PEER_ID`.
    #[must_use]
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.swarm.bootstrap.push(addr);
        self
    }

    /// How long other nodes keep this node's provider records (default 2 h) and how often it
    /// publishes them again (default 30 min).
    #[must_use]
    pub fn provider_records(mut self, ttl: Duration, republish: Duration) -> Self {
        self.swarm.provider_ttl = ttl;
        self.swarm.provider_republish = republish;
        self
    }

    /// Bounds the peers served at once (default 16); piece requests of other peers are
    /// answered Busy.
    #[must_use]
    pub fn max_upload_peers(mut self, n: usize) -> Self {
        self.swarm.max_upload_peers = n;
        self
    }

    /// Bounds concurrent uploads (default 32); more piece requests are answered Busy.
    #[must_use]
    pub fn max_concurrent_uploads(mut self, n: usize) -> Self {
        self.swarm.max_concurrent_uploads = n;
        self
    }

    /// Origin client settings.
    #[must_use]
    pub fn origin(mut self, config: origin::Config) -> Self {
        self.origin = config;
        self
    }

    /// Scheduler limits.
    #[must_use]
    pub fn scheduler(mut self, config: scheduler::Config) -> Self {
        self.scheduler = config;
        self
    }

    /// The default retry delay of new jobs (BITS `SetMinimumRetryDelay`, default 600 s): the
    /// wait after a TransientError and between calls of a failing JobTransferred handler.
    #[must_use]
    pub fn retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = Some(delay);
        self
    }

    /// How long a download waits for a first peer connection when static peers or mDNS are
    /// configured (default 2 s; without either, downloads do not wait).
    #[must_use]
    pub fn discovery_wait(mut self, wait: Duration) -> Self {
        self.discovery_wait = Some(wait);
        self
    }

    /// The source policy: per priority, how long downloads wait for peers before they use the
    /// origin, and whether the origin is used at all (default: at once, yes).
    #[must_use]
    pub fn source_policy(mut self, policy: crate::source::policy::SourcePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Serves Prometheus metrics (libp2p's and Shoal's, see the `metrics` module docs) at
    /// `http://addr/metrics`; `addr` must be a loopback address (port 0 picks one; see
    /// [`Node::metrics_addr`]).
    #[must_use]
    pub fn metrics(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics = Some(addr);
        self
    }

    /// Keeps a content-addressed cache of verified files (`docs/operations.md`, "Cache"): downloaded
    /// files are cloned into it and served from it, later jobs of the same content are filled
    /// from it, and it is trimmed to `config`'s limits. Without a directory in `config`, the
    /// cache is `cache` in the state directory ([`Builder::state_dir`]), and building fails
    /// without one. Default: no cache.
    #[must_use]
    pub fn cache(mut self, config: crate::store::cache::CacheConfig) -> Self {
        self.cache = Some(config);
        self
    }

    /// Bandwidth limits (token buckets and the monthly upload cap; default: none), changeable later with
    /// [`Node::set_bandwidth`].
    #[must_use]
    pub fn bandwidth(mut self, limits: crate::source::bandwidth::BandwidthLimits) -> Self {
        self.bandwidth = limits;
        self
    }

    /// Makes the node a cache node: a peer's have request carrying an
    /// origin URL under `role.origins`, for content the node lacks, makes it fetch the content
    /// into its cache and serve it. Needs [`Builder::cache`]; building fails without it.
    #[must_use]
    pub fn cache_node_role(mut self, role: crate::store::fill::CacheNodeRole) -> Self {
        self.cache_node_role = Some(role);
        self
    }

    /// Adds a cache node to try before the origin, after those added before (DO's
    /// DOCacheHost); the address must end in `/p2p/PEER_ID`. Downloads ask the first connected
    /// one that does not refuse to fetch what no peer holds, wait for it while it makes
    /// progress (`SourcePolicy::cache_fallback`), and count its bytes as cache bytes.
    #[must_use]
    pub fn cache_node(mut self, addr: Multiaddr) -> Self {
        self.swarm.cache_nodes.push(addr);
        self
    }

    /// Uses this identity instead of a fresh random one.
    #[must_use]
    pub fn keypair(mut self, keypair: identity::Keypair) -> Self {
        self.keypair = Some(keypair);
        self
    }

    /// Keeps jobs in a state database under `dir` (created with mode 0700), so they survive
    /// restarts and crashes: at build the node reloads every job, checks the pieces its
    /// temporary files hold, and resumes the jobs that were active. The node's identity is
    /// kept there too, unless [`Builder::keypair`] gives one..
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Gives every job a callback made by `factory` (the daemon's notification delivery), also
    /// jobs reloaded from the state directory: those in Transferred or Error get their
    /// notification again, as nobody may have acknowledged it before the stop.
    #[must_use]
    pub fn callbacks(mut self, factory: CallbackFactory) -> Self {
        self.callbacks = Some(factory);
        self
    }

    /// Cancels jobs that nobody changed and that made no progress for `timeout` (BITS
    /// JobInactivityTimeout, default 90 days), deleting their temporary files.
    #[must_use]
    pub fn inactivity_timeout(mut self, timeout: Duration) -> Self {
        self.inactivity_timeout = Some(timeout);
        self
    }

    /// How many jobs transfer at once (default 4); the others wait in Queued, Foreground first,
    /// then High, Normal, Low, round-robin within a priority (see `docs/jobs.md`).
    #[must_use]
    pub fn max_active_jobs(mut self, n: usize) -> Self {
        self.max_active_jobs = Some(n);
        self
    }

    /// How long a job keeps its transfer slot while a job of its priority waits (default 60 s).
    #[must_use]
    pub fn time_slice(mut self, slice: Duration) -> Self {
        self.time_slice = Some(slice);
        self
    }

    /// Starts the node: binds the listen addresses and spawns the swarm.
    ///
    /// # Errors
    /// [`Error::Swarm`] when a transport cannot be built or an address bound,
    /// [`Error::Origin`] when the HTTP client cannot be built, [`Error::State`] when the state
    /// database cannot be opened, is another program's, or holds a record that does not
    /// decode (naming it), [`Error::Cache`] when the cache has no directory or its index
    /// cannot be opened, [`Error::Metrics`] when the metrics address is not loopback or cannot
    /// be bound, [`Error::Task`] when opening the state or the cache panicked.
    pub async fn build(self) -> Result<Node, Error> {
        let store = Arc::new(ContentStore::new());
        let cache = open_cache(self.cache.clone(), self.state_dir.as_deref(), &store).await?;
        let shutdown = CancellationToken::new();
        let (state, stored) = open_state(self.state_dir.as_deref()).await?;
        let keypair = match (self.keypair, &state) {
            (Some(k), _) => k,
            (None, Some(state)) => state_identity(state)?,
            (None, None) => identity::Keypair::generate_ed25519(),
        };
        if self.cache_node_role.is_some() && cache.is_none() {
            return Err(crate::store::cache::CacheError::NoCache.into());
        }
        let has_peers = self.swarm.mode.uses_peers()
            && (!self.swarm.peers.is_empty()
                || !self.swarm.cache_nodes.is_empty()
                || self.swarm.mdns
                || (self.swarm.mode.uses_dht() && !self.swarm.bootstrap.is_empty()));
        let mut swarm_config = self.swarm;
        if swarm_config.group.is_some() && !self.listen_set {
            swarm_config.listen.retain(swarm::is_tcp);
        }
        let mut registry = self
            .metrics
            .map(|_| prometheus_client::registry::Registry::default());
        let month = state.as_deref().and_then(upload_month);
        let bandwidth = Arc::new(crate::source::bandwidth::Bandwidth::new(
            self.bandwidth,
            month,
        ));
        let (fill_tx, fill_rx) = match self.cache_node_role {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::channel(FILL_QUEUE);
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let (handle, task) = swarm::spawn(
            keypair,
            swarm_config,
            store.clone(),
            registry.as_mut(),
            fill_tx,
            bandwidth.clone(),
            shutdown.clone(),
        )
        .await?;
        let origin = origin::Client::new(self.origin).map_err(|e| Error::Origin(e.to_string()))?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        // Waiting for peers makes sense only when some may come.
        let discovery_wait = if has_peers {
            self.discovery_wait.unwrap_or(Duration::from_secs(2))
        } else {
            Duration::ZERO
        };
        let node = Node {
            inner: Arc::new(Inner {
                env: Env {
                    swarm: handle,
                    origin,
                    store,
                    bans: Arc::new(Bans::default()),
                    scheduler: self.scheduler,
                    discovery_wait,
                    policy: Arc::new(self.policy),
                    cache,
                    bandwidth,
                },
                jobs: Mutex::new(HashMap::new()),
                events,
                shutdown,
                swarm_task: Mutex::new(Some(task)),
                retry_delay: self.retry_delay.unwrap_or(Duration::from_secs(600)),
                state: Mutex::new(state),
                callbacks: self.callbacks,
                counters: Counters::default(),
                metrics_addr: Mutex::new(None),
                retired: Mutex::default(),
                slots: Slots::new(
                    self.max_active_jobs.unwrap_or(4),
                    self.time_slice.unwrap_or(Duration::from_secs(60)),
                ),
            }),
        };
        tokio::spawn(node.inner.slots.clone().tick(node.inner.shutdown.clone()));
        if let (Some(addr), Some(registry)) = (self.metrics, registry) {
            let bound = crate::node::metrics::serve(
                node.clone(),
                registry,
                addr,
                node.inner.shutdown.clone(),
            )
            .await?;
            *node
                .inner
                .metrics_addr
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(bound);
        }
        node.restore(stored);
        node.spawn_cache_sweeper();
        node.spawn_upload_month_keeper();
        if let (Some(role), Some(rx)) = (self.cache_node_role, fill_rx) {
            tokio::spawn(crate::store::fill::run(
                node.clone(),
                role,
                rx,
                node.inner.shutdown.clone(),
            ));
        }
        node.spawn_inactivity_sweeper(
            self.inactivity_timeout
                .unwrap_or(Duration::from_secs(90 * 24 * 3600)),
        );
        Ok(node)
    }
}

/// The cache of a node that keeps one (its directory: the configured one, else `cache` in the
/// state directory), registering its files with `store`.
async fn open_cache(
    config: Option<crate::store::cache::CacheConfig>,
    state_dir: Option<&Path>,
    store: &Arc<ContentStore>,
) -> Result<Option<Arc<crate::store::cache::Cache>>, Error> {
    let Some(config) = config else {
        return Ok(None);
    };
    let dir = config
        .dir
        .clone()
        .or_else(|| state_dir.map(|d| d.join("cache")))
        .ok_or(crate::store::cache::CacheError::NoDir)?;
    let store = store.clone();
    Ok(Some(Arc::new(
        tokio::task::spawn_blocking(move || crate::store::cache::Cache::open(dir, config, store))
            .await
            .map_err(|e| Error::Task(e.to_string()))??,
    )))
}

/// The state database in `dir` and the jobs it holds (none without a directory).
async fn open_state(
    dir: Option<&Path>,
) -> Result<(Option<Arc<StateStore>>, Vec<crate::store::state::StoredJob>), Error> {
    let Some(dir) = dir.map(Path::to_path_buf) else {
        return Ok((None, Vec::new()));
    };
    let (state, stored) = tokio::task::spawn_blocking(move || {
        let state = StateStore::open(&dir)?;
        let stored = state.load()?;
        Ok::<_, PersistError>((state, stored))
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))??;
    Ok((Some(Arc::new(state)), stored))
}

/// This month's uploads, as the state database kept them (`"YYYY-MM BYTES"`).
fn upload_month(state: &StateStore) -> Option<(String, u64)> {
    let v = state.meta(UPLOAD_MONTH).ok().flatten()?;
    let text = String::from_utf8(v).ok()?;
    let (m, b) = text.split_once(' ')?;
    Some((m.to_owned(), b.parse().ok()?))
}

/// The node identity kept in the state database, made on first use.
fn state_identity(state: &StateStore) -> Result<identity::Keypair, Error> {
    if let Some(bytes) = state.meta("identity")? {
        return identity::Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            Error::State(PersistError::Corrupt {
                what: "meta identity".into(),
                detail: e.to_string(),
            })
        });
    }
    let key = identity::Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding().map_err(|e| {
        Error::State(PersistError::Corrupt {
            what: "meta identity".into(),
            detail: e.to_string(),
        })
    })?;
    state.put_meta("identity", &bytes)?;
    Ok(key)
}

struct JobRecord {
    info: JobInfo,
    callback: Option<Arc<dyn Callback>>,
    /// Per file, what the node keeps besides its `FileInfo` (`files[i]` goes with
    /// `info.files[i]`).
    files: Vec<FileRecord>,
    /// What runs the job now ([`Runner`]).
    runner: Runner,
    /// The task of the last runner: the next one starts after it ended, so that it has stopped
    /// writing; shutdown waits for it.
    task: Option<tokio::task::JoinHandle<()>>,
    /// Cuts short a retry delay ([`Node::retry_now`]).
    wake: Arc<tokio::sync::Notify>,
    /// When the job entered TransientError with no progress since (the no-progress timer).
    transient_since: Option<tokio::time::Instant>,
    /// The last change by the caller or progress (the inactivity timer; tokio's clock, so
    /// that tests can advance it).
    touched: tokio::time::Instant,
}

/// What the node keeps of one file of a job besides its [`crate::job::FileInfo`].
struct FileRecord {
    /// Fetch from the origin alone (the caller rejected peer content).
    origin_only: bool,
    /// Renamed to its local name by Complete.
    completed: bool,
    /// Where a stopped download left off (pieces verified and written).
    left: Option<ResumePoint>,
    /// Its directory and the file that verified (Complete renames only that file there; the
    /// node serves only that file).
    local: LocalIds,
}

struct Inner {
    env: Env,
    jobs: Mutex<HashMap<JobId, Arc<Mutex<JobRecord>>>>,
    events: broadcast::Sender<Event>,
    shutdown: CancellationToken,
    swarm_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    retry_delay: Duration,
    /// The state database, when the node keeps jobs across restarts; taken (closed) by
    /// [`Node::shutdown`].
    state: Mutex<Option<Arc<StateStore>>>,
    callbacks: Option<CallbackFactory>,
    slots: Slots,
    /// Node-wide byte and trust counters since start.
    counters: Counters,
    /// Where the metrics are served.
    metrics_addr: Mutex<Option<std::net::SocketAddr>>,
    /// Acknowledged and Cancelled jobs still answered by [`Node::info`], oldest first, with
    /// their estimated sizes in bytes; see [`Node::retire`].
    retired: Mutex<std::collections::VecDeque<(JobId, usize)>>,
}

/// The most final (Acknowledged, Cancelled) jobs a node still answers [`Node::info`] for; older
/// ones are forgotten, as BITS forgets a job once it is complete or cancelled.
const RETIRED_JOBS: usize = 256;
/// The most bytes (estimated from their strings) those final jobs may take together.
const RETIRED_BYTES: usize = 16 << 20;

/// The atomics behind [`crate::node::stats::NodeStats`].
#[derive(Debug, Default)]
struct Counters {
    origin: AtomicU64,
    lan: AtomicU64,
    group: AtomicU64,
    cache: AtomicU64,
    rejected: AtomicU64,
    banned: AtomicU64,
}

/// A Shoal node: a libp2p peer that runs download jobs and serves verified content.
///
/// Cheap to clone; every clone is the same node. Dropping the last clone does not stop it: call
/// [`Node::shutdown`].
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

/// A job's size in memory, estimated from its strings and files, in bytes.
fn job_size(info: &JobInfo) -> usize {
    let path = |p: &Path| p.as_os_str().len();
    512 + info.display_name.len()
        + info
            .files
            .iter()
            .map(|f| {
                512 + f.url.as_str().len()
                    + path(&f.local_name)
                    + path(&f.temp_name)
                    + f.ranges.len() * 16
            })
            .sum::<usize>()
}

fn temp_name_for(local: &Path, job: JobId) -> PathBuf {
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let short = &job.0.simple().to_string()[..8];
    local.with_file_name(format!(".{name}.{short}.shoal-part"))
}

/// Whether the local name holds the file that verified (a Complete that renamed the file but
/// was stopped before it recorded so): `found` is what the owner sees at the local name
/// (`lstat`), compared with the recorded identity. A record without one (from an older
/// version) counts as not renamed.
fn renamed_already(found: Option<std::fs::Metadata>, ids: &LocalIds) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (found, &ids.verified) {
        (Some(m), Some(v)) => {
            m.file_type().is_file() && (m.dev(), m.ino(), m.len()) == (v.dev, v.ino, v.len)
        }
        _ => false,
    }
}

/// Checks ranges as BITS `AddFileWithRanges` does: none empty, none starting at "to the end",
/// none overlapping another (compared sorted by offset).
fn check_ranges(ranges: &[ByteRange]) -> Result<(), Error> {
    let bad = |reason: String| Error::BadRange(reason);
    let mut sorted: Vec<&ByteRange> = ranges.iter().collect();
    sorted.sort_by_key(|r| r.offset);
    for r in &sorted {
        if r.length == Some(0) {
            return Err(bad(format!("the range at offset {} is empty", r.offset)));
        }
        if r.length.is_some_and(|l| r.offset.checked_add(l).is_none()) {
            return Err(bad(format!(
                "the range at offset {} ends past 2^64",
                r.offset
            )));
        }
    }
    for w in sorted.windows(2) {
        let (a, b) = (w[0], w[1]);
        let overlaps = match a.length {
            None => true,
            Some(l) => a.offset + l > b.offset,
        };
        if overlaps {
            return Err(bad(format!(
                "the ranges at offsets {} and {} overlap",
                a.offset, b.offset
            )));
        }
    }
    Ok(())
}

/// Checks a local name: no `..`, a file name, a parent directory that exists, not a directory.
fn check_local_name(path: &Path) -> Result<(), Error> {
    let bad = |reason: &str| Error::BadLocalName {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(bad("a local name may not contain '..'"));
    }
    if path.file_name().is_none() {
        return Err(bad("no file name"));
    }
    if path.is_dir() {
        return Err(bad("it is an existing directory"));
    }
    let parent = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Err(bad("no parent directory")),
    };
    if !parent.is_dir() {
        return Err(bad("its directory does not exist"));
    }
    Ok(())
}

impl Node {
    /// A builder with the defaults.
    #[must_use]
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// This node's peer id.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.inner.env.swarm.peer_id()
    }

    /// The addresses this node listens on, each ending in `/p2p/PEER_ID`.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner.env.swarm.listen_addrs().await
    }

    /// What this node has served to peers so far.
    #[must_use]
    pub fn upload_stats(&self) -> swarm::UploadStats {
        self.inner.env.swarm.upload_stats()
    }

    /// Where the Prometheus metrics are served (`http://ADDR/metrics`), if they are.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        *self
            .inner
            .metrics_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// How many peers are connected now.
    #[must_use]
    pub fn connected_count(&self) -> usize {
        self.inner.env.swarm.connected_count()
    }

    /// The peers connected now.
    pub async fn connected_peers(&self) -> Vec<PeerId> {
        self.inner.env.swarm.connected_peers().await
    }

    /// Node-wide figures since the node started: bytes by source, bytes uploaded, pieces
    /// rejected, peers banned (Delivery Optimization's performance snapshot).
    #[must_use]
    pub fn stats(&self) -> crate::node::stats::NodeStats {
        let c = &self.inner.counters;
        crate::node::stats::NodeStats {
            bytes_from_origin: c.origin.load(Relaxed),
            bytes_from_lan_peers: c.lan.load(Relaxed),
            bytes_from_group_peers: c.group.load(Relaxed),
            bytes_from_cache: c.cache.load(Relaxed),
            bytes_uploaded: self.inner.env.swarm.upload_stats().bytes,
            pieces_rejected: c.rejected.load(Relaxed),
            peers_banned: c.banned.load(Relaxed),
            cache: self.inner.env.cache.as_ref().map(|c| c.usage()),
        }
    }

    /// The bandwidth limits and this month's uploads.
    #[must_use]
    pub fn bandwidth(&self) -> crate::source::bandwidth::BandwidthStatus {
        self.inner.env.bandwidth.status()
    }

    /// Replaces the bandwidth limits while the node runs (they last until it stops; the
    /// configuration gives those of the next start). Transfers waiting on an old limit finish
    /// that wait, at most one second's worth of it.
    pub fn set_bandwidth(&self, limits: crate::source::bandwidth::BandwidthLimits) {
        info!(?limits, "bandwidth limits changed");
        self.inner.env.bandwidth.set(limits);
    }

    /// The most peers served at once.
    #[must_use]
    pub fn max_upload_peers(&self) -> usize {
        self.inner.env.swarm.max_upload_peers()
    }

    /// Sets the most peers served at once (at least 1) while the node runs.
    pub fn set_max_upload_peers(&self, n: usize) {
        self.inner.env.swarm.set_max_upload_peers(n);
    }

    /// Writes this month's upload count to the state database, if any.
    fn keep_upload_month(&self) {
        let state = self
            .inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(state) = state {
            let (month, bytes) = self.inner.env.bandwidth.month();
            if let Err(e) = state.put_meta(UPLOAD_MONTH, format!("{month} {bytes}").as_bytes()) {
                warn!("cannot store this month's uploads: {e}");
            }
        }
    }

    /// Keeps the month's upload count in the state database while it changes.
    fn spawn_upload_month_keeper(&self) {
        let node = self.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let mut kept = node.inner.env.bandwidth.month();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(UPLOAD_MONTH_EVERY) => {}
                }
                let now = node.inner.env.bandwidth.month();
                if now != kept {
                    let n = node.clone();
                    let _ = tokio::task::spawn_blocking(move || n.keep_upload_month()).await;
                    kept = now;
                }
            }
        });
    }

    /// The cached files, most recently used first (empty without a cache).
    #[must_use]
    pub fn cache_items(&self) -> Vec<crate::store::cache::CacheItem> {
        self.inner
            .env
            .cache
            .as_ref()
            .map(|c| c.items())
            .unwrap_or_default()
    }

    fn cache(&self) -> Result<Arc<crate::store::cache::Cache>, Error> {
        self.inner.env.cache.clone().ok_or_else(|| {
            crate::store::cache::CacheError::Unknown("cache: the node keeps none".into()).into()
        })
    }

    /// Pins (`pinned` true) or unpins the cached file whose BLAKE3 hash or SHA-256 is `key`:
    /// a pinned file is never evicted.
    ///
    /// # Errors
    /// [`Error::Cache`] when the node has no cache or the cache no such file, or the index
    /// cannot be written.
    pub async fn cache_pin(&self, key: HaveKey, pinned: bool) -> Result<ContentId, Error> {
        let cache = self.cache()?;
        Ok(tokio::task::spawn_blocking(move || cache.pin(&key, pinned))
            .await
            .map_err(|e| Error::Task(e.to_string()))??)
    }

    /// Evicts the cached file whose BLAKE3 hash or SHA-256 is `key`, pinned or not: peers are
    /// no longer served it and its file is deleted.
    ///
    /// # Errors
    /// [`Error::Cache`] when the node has no cache or the cache no such file, or the index
    /// cannot be written.
    pub async fn cache_evict(&self, key: HaveKey) -> Result<ContentId, Error> {
        let cache = self.cache()?;
        Ok(tokio::task::spawn_blocking(move || cache.evict(&key))
            .await
            .map_err(|e| Error::Task(e.to_string()))??)
    }

    /// Applies the cache's limits now (the node also does every minute and after a file
    /// entered): evicts entries past the maximum age, then the least recently used until the
    /// cache fits, never pinned ones nor content a job that is not Acknowledged or Cancelled
    /// names. Returns the evicted content ids (empty without a cache).
    ///
    /// # Errors
    /// [`Error::Cache`] when the index cannot be written.
    pub async fn cache_sweep(&self) -> Result<Vec<ContentId>, Error> {
        let Some(cache) = self.inner.env.cache.clone() else {
            return Ok(Vec::new());
        };
        let in_use = self.content_in_use();
        Ok(tokio::task::spawn_blocking(move || cache.sweep(&in_use))
            .await
            .map_err(|e| Error::Task(e.to_string()))??)
    }

    /// The content ids and SHA-256s of the transferred files of jobs that are not Acknowledged
    /// or Cancelled: the cache keeps them (and counts them against its limit).
    fn content_in_use(&self) -> HashSet<HaveKey> {
        let slots: Vec<_> = self.lock_jobs().values().cloned().collect();
        let mut keys = HashSet::new();
        for slot in slots {
            let rec = lock(&slot);
            if rec.info.state.is_final() {
                continue;
            }
            // Only what a job transferred: naming a digest as expected does not keep another
            // user's cached content from eviction.
            for f in rec.info.files.iter().filter(|f| f.transferred) {
                keys.extend(f.content_id.map(|id| HaveKey::Blake3(*id.hash())));
                keys.extend(f.sha256.map(HaveKey::Sha256));
            }
        }
        keys
    }

    /// Sweeps the cache every [`crate::store::cache::SWEEP_INTERVAL`] and after a file entered it.
    fn spawn_cache_sweeper(&self) {
        let Some(cache) = self.inner.env.cache.clone() else {
            return;
        };
        let node = self.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(crate::store::cache::SWEEP_INTERVAL) => {}
                    () = cache.woken() => {}
                }
                if let Err(e) = node.cache_sweep().await {
                    warn!("cache sweep: {e}");
                }
            }
        });
    }

    /// What the DHT side of the swarm knows: routing table size, keys announced, lookups.
    pub async fn dht_status(&self) -> swarm::DhtStatus {
        self.inner.env.swarm.dht_status().await
    }

    /// Looks up the providers of `key` in the DHT (dialing each as it is found),
    /// waiting at most `wait`.
    pub async fn find_providers(
        &self,
        key: shoal_protocol::HaveKey,
        wait: Duration,
    ) -> Vec<PeerId> {
        self.inner.env.swarm.find_providers(key, wait).await
    }

    /// How this node came to know `peer`: its bytes count as LAN, group (DHT) or cache bytes.
    #[must_use]
    pub fn peer_source(&self, peer: &PeerId) -> swarm::PeerSource {
        self.inner.env.swarm.peer_source(peer)
    }

    /// The name of the node's peer group, if it has one.
    #[must_use]
    pub fn group(&self) -> Option<&str> {
        self.inner.env.swarm.group()
    }

    /// The peer mode the node runs in.
    #[must_use]
    pub fn mode(&self) -> PeerMode {
        self.inner.env.swarm.mode()
    }

    /// Dials a peer.
    pub async fn dial(&self, addr: Multiaddr) {
        self.inner.env.swarm.dial(addr).await;
    }

    /// Subscribes to this node's events.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Hashes the file at `path` and serves it to peers under its content id (and its SHA-256).
    ///
    /// # Errors
    /// [`Error::Hash`] when the file cannot be read.
    pub async fn seed(&self, path: impl AsRef<Path>) -> Result<ContentId, Error> {
        let path = path.as_ref().to_owned();
        let p = path.clone();
        let (digests, backing) = tokio::task::spawn_blocking(move || {
            let file = crate::store::fsuser::open_regular(&p, None)?;
            let backing = Backing::named(&file, None)?;
            let len = file.metadata()?.len();
            shoal_validator::hash_reader(std::io::BufReader::new(file), len)
                .map(|d| (d, backing))
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .await
        .map_err(|e| Error::Hash {
            path: path.clone(),
            reason: e.to_string(),
        })?
        .map_err(|e| Error::Hash {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let id = digests.content_id();
        self.inner.env.store.insert(
            digests.layer,
            Bitfield::full(id.piece_count()),
            path.clone(),
            backing,
        );
        self.inner.env.store.set_sha256(&id, digests.sha256);
        info!(%id, path = %path.display(), "seeding");
        Ok(id)
    }

    /// Creates a job (BITS `CreateJob`) with the default properties; it starts Suspended.
    ///
    /// # Errors
    /// [`Error::State`] when the job cannot be stored (with a state directory).
    pub fn create_job(&self, display_name: &str, priority: Priority) -> Result<JobId, Error> {
        self.create_job_with(display_name, priority, None, None)
    }

    /// Creates a job owned by the Unix user `owner` (the daemon's API caller; `None` for the
    /// library), with `properties` (default: the node's retry delay and BITS's defaults).
    ///
    /// # Errors
    /// [`Error::State`] when the job cannot be stored (with a state directory).
    pub fn create_job_with(
        &self,
        display_name: &str,
        priority: Priority,
        owner: Option<u32>,
        properties: Option<JobProperties>,
    ) -> Result<JobId, Error> {
        let id = JobId::new();
        let now = SystemTime::now();
        let properties = properties.unwrap_or_else(|| JobProperties {
            retry_delay: self.inner.retry_delay,
            ..JobProperties::default()
        });
        let mut record = JobRecord {
            info: JobInfo {
                id,
                display_name: display_name.to_owned(),
                priority,
                state: State::Suspended,
                owner,
                properties,
                files: Vec::new(),
                error: None,
                peer_stats: PeerStats::default(),
                created: now,
                modified: now,
                transfer_completed: None,
            },
            callback: None,
            files: Vec::new(),
            runner: Runner::Idle,
            task: None,
            wake: Arc::default(),
            transient_since: None,
            touched: tokio::time::Instant::now(),
        };
        if let Some(f) = &self.inner.callbacks {
            record.callback = f(&record.info);
        }
        self.save(&record)?;
        self.lock_jobs().insert(id, Arc::new(Mutex::new(record)));
        Ok(id)
    }

    /// The state database, if the node has one and is not shut down.
    fn state(&self) -> Option<Arc<StateStore>> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes a job's record to the state database (or removes it once final). Without a
    /// state directory it does nothing.
    fn save(&self, rec: &JobRecord) -> Result<(), Error> {
        let Some(state) = self.state() else {
            return Ok(());
        };
        if rec.info.state.is_final() {
            state.remove_job(rec.info.id)?;
            return Ok(());
        }
        let files: Vec<(u32, FileDisk)> = rec
            .info
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                (
                    u32::try_from(i).unwrap_or(u32::MAX),
                    FileDisk::of(
                        f,
                        rec.files[i].origin_only,
                        rec.files[i].completed,
                        rec.files[i].local,
                    ),
                )
            })
            .collect();
        state.put_job(rec.info.id, &JobDisk::of(&rec.info), &files)?;
        Ok(())
    }

    /// [`Node::save`] for the runner, which has nobody to return an error to: logs it.
    fn save_logged(&self, rec: &JobRecord) {
        if let Err(e) = self.save(rec) {
            warn!(job = %rec.info.id, "cannot store the job: {e}");
        }
    }

    /// Reloads the jobs of the state database (at build).
    fn restore(&self, stored: Vec<StoredJob>) {
        for s in stored {
            let id = s.id;
            let mut files = Vec::with_capacity(s.files.len());
            let mut flags = Vec::with_capacity(s.files.len());
            let mut bad = None;
            for (i, f) in s.files.iter().enumerate() {
                match f.file.to_info(&format!("job {id} file {i}")) {
                    Ok(mut info) => {
                        info.bytes_transferred = ResumePoint::from_stored(
                            f.pieces.as_deref(),
                            f.resume.as_ref(),
                            f.layer.as_deref(),
                            &info.expected,
                        )
                        .map_or(0, |r| r.bytes());
                        if info.transferred {
                            info.bytes_transferred = info.bytes_total.unwrap_or(0);
                        }
                        files.push(info);
                        flags.push((f.file.origin_only, f.file.completed));
                    }
                    Err(e) => bad = Some(e),
                }
            }
            let info = match bad {
                Some(e) => Err(e),
                None => s.job.to_info(id, files),
            };
            let mut info = match info {
                Ok(i) => i,
                Err(e) => {
                    warn!(job = %id, "cannot restore the job: {e}");
                    continue;
                }
            };
            // Files that verified keep serving; a vanished temporary file is an error.
            let mut vanished = None;
            let owner = info.owner;
            for (i, f) in info.files.iter().enumerate() {
                let done = f.transferred && !flags[i].1;
                let ids = s.files[i].file.local;
                // Only the owner's view of the path, and no open: nothing a user put there
                // (a FIFO, a symlink) can block or mislead the start.
                let there = |p: &Path| {
                    crate::store::fsuser::as_owner(owner, || std::fs::symlink_metadata(p)).ok()
                };
                if done && there(&f.temp_name).is_none() {
                    // Complete renamed it just before the stop, before it could record that.
                    if renamed_already(there(&f.local_name), &ids) {
                        flags[i].1 = true;
                        continue;
                    }
                    vanished = Some(i);
                }
                if done
                    && let Some(identity) = ids.verified
                    && let Some(layer) = s.files[i].layer.as_ref().and_then(|cvs| {
                        f.content_id
                            .and_then(|id| PieceLayer::verify(id, cvs.clone()).ok())
                    })
                {
                    // Served only while the temporary file is the one that verified.
                    let count = layer.content_id().piece_count();
                    self.inner.env.store.insert(
                        layer,
                        Bitfield::full(count),
                        f.temp_name.clone(),
                        Backing::Named { owner, identity },
                    );
                    if let (Some(id), Some(sha)) = (f.content_id, f.sha256) {
                        self.inner.env.store.set_sha256(&id, sha);
                    }
                }
            }
            let was = info.state;
            if let Some(i) = vanished
                && !was.is_final()
            {
                info.state = State::Error;
                info.error = Some(JobError {
                    context: ErrorContext::LocalFile,
                    file: Some(i),
                    description: format!(
                        "{}: the temporary file of a transferred file vanished",
                        info.files[i].temp_name.display()
                    ),
                });
            } else if was.is_active() {
                // It was working when the node stopped: it goes on.
                info.state = State::Queued;
            }
            info!(job = %id, state = %info.state, "restored job");
            let idle = SystemTime::now()
                .duration_since(info.modified)
                .unwrap_or_default();
            let now = tokio::time::Instant::now();
            let callback = self.inner.callbacks.as_ref().and_then(|f| f(&info));
            let record = JobRecord {
                files: flags
                    .iter()
                    .zip(&s.files)
                    .map(|(&(origin_only, completed), f)| FileRecord {
                        origin_only,
                        completed,
                        left: None,
                        local: f.file.local,
                    })
                    .collect(),
                info,
                callback,
                runner: Runner::Idle,
                task: None,
                wake: Arc::default(),
                transient_since: None,
                touched: now.checked_sub(idle).unwrap_or(now),
            };
            if record.info.state != was {
                self.save_logged(&record);
            }
            let state = record.info.state;
            let slot = Arc::new(Mutex::new(record));
            self.lock_jobs().insert(id, slot.clone());
            match state {
                State::Queued => self.start_runner(id, &slot),
                // Notifications nobody acknowledged before the stop are delivered again.
                State::Transferred | State::Error => self.start_notifier(id, &slot),
                _ => {}
            }
        }
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<Mutex<JobRecord>>>> {
        self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn job(&self, id: JobId) -> Result<Arc<Mutex<JobRecord>>, Error> {
        self.lock_jobs()
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownJob(id))
    }

    /// Sets the job's callback (BITS `SetNotifyInterface`).
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub fn set_callback(&self, job: JobId, callback: Arc<dyn Callback>) -> Result<(), Error> {
        let slot = self.job(job)?;
        lock(&slot).callback = Some(callback);
        Ok(())
    }

    /// Sets the job's retry delay (BITS `SetMinimumRetryDelay`).
    ///
    /// # Errors
    /// [`Error::UnknownJob`], [`Error::State`].
    pub fn set_retry_delay(&self, job: JobId, delay: Duration) -> Result<(), Error> {
        self.modify(job, |info| {
            info.properties.retry_delay = delay;
            Ok(())
        })
    }

    /// Changes a job's display name, priority or properties (BITS `SetDisplayName`,
    /// `SetPriority`, `SetMinimumRetryDelay`, `SetNoProgressTimeout`, `SetNotifyFlags`,
    /// `SetNotifyCmdLine`): `change` edits the job's snapshot; only those fields are kept.
    ///
    /// # Errors
    /// What `change` returns, [`Error::InvalidState`] on a final job, [`Error::UnknownJob`],
    /// [`Error::State`].
    pub fn modify(
        &self,
        job: JobId,
        change: impl FnOnce(&mut JobInfo) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let slot = self.job(job)?;
        let mut rec = lock(&slot);
        if rec.info.state.is_final() {
            return Err(InvalidState {
                from: rec.info.state,
                transition: Transition::AddFile,
            }
            .into());
        }
        let mut info = rec.info.clone();
        change(&mut info)?;
        rec.info.display_name = info.display_name;
        if rec.info.priority != info.priority {
            self.inner.slots.set_priority(job, info.priority);
        }
        rec.info.priority = info.priority;
        rec.info.properties = info.properties;
        rec.info.modified = SystemTime::now();
        rec.touched = tokio::time::Instant::now();
        self.save(&rec)
    }

    /// Adds a file to a job (BITS `AddFile`). Adding to a Transferred job queues it again.
    ///
    /// # Errors
    /// [`Error::BadUrl`] for a scheme other than http/https, [`Error::BadLocalName`],
    /// [`Error::DuplicateLocalName`], [`Error::InvalidState`] on a final job,
    /// [`Error::UnknownJob`].
    pub fn add_file(&self, job: JobId, spec: FileSpec) -> Result<(), Error> {
        if !matches!(spec.url.scheme(), "http" | "https") {
            return Err(Error::BadUrl {
                url: spec.url.to_string(),
                reason: "only http and https URLs are supported".into(),
            });
        }
        check_ranges(&spec.ranges)?;
        let slot = self.job(job)?;
        let owner = lock(&slot).info.owner;
        // As the owner sees it: the daemon tells a user nothing of paths the user may not see.
        let dir = crate::store::fsuser::as_owner(owner, || {
            check_local_name(&spec.local_name).map_err(std::io::Error::other)?;
            let dir = crate::store::fsuser::dir_identity(&spec.local_name)?;
            crate::store::fsuser::may_create_in(&spec.local_name)?;
            Ok(dir)
        })
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return Error::Io {
                    path: spec.local_name.clone(),
                    source: e,
                };
            }
            match e.downcast::<Error>() {
                Ok(e) => e,
                Err(e) => Error::BadLocalName {
                    path: spec.local_name.clone(),
                    reason: format!("its directory cannot be used: {e}"),
                },
            }
        })?;
        let start = {
            let mut rec = lock(&slot);
            if rec
                .info
                .files
                .iter()
                .any(|f| f.local_name == spec.local_name)
            {
                return Err(Error::DuplicateLocalName(spec.local_name));
            }
            let to = next_state(rec.info.state, Transition::AddFile)?;
            rec.info.files.push(FileInfo {
                temp_name: temp_name_for(&spec.local_name, job),
                url: spec.url,
                local_name: spec.local_name,
                expected: spec.expected,
                ranges: spec.ranges,
                content_id: None,
                sha256: None,
                bytes_total: None,
                bytes_transferred: 0,
                bytes_from_peers: 0,
                bytes_from_origin: 0,
                bytes_from_lan_peers: 0,
                bytes_from_group_peers: 0,
                bytes_from_cache: 0,
                transferred: false,
                validation_state: ValidationState::Unknown,
            });
            rec.files.push(FileRecord {
                origin_only: false,
                completed: false,
                left: None,
                local: LocalIds {
                    dir: Some(dir),
                    verified: None,
                },
            });
            let changed = to != rec.info.state;
            self.set_state(&mut rec, to);
            if let Err(e) = self.save(&rec) {
                // Not stored, so not added: the caller may try again.
                rec.info.files.pop();
                rec.files.pop();
                return Err(e);
            }
            changed && to == State::Queued
        };
        if start {
            self.start_runner(job, &slot);
        }
        Ok(())
    }

    fn set_state(&self, rec: &mut JobRecord, to: State) {
        let changed = rec.info.state != to;
        rec.info.state = to;
        rec.info.modified = SystemTime::now();
        rec.touched = tokio::time::Instant::now();
        if changed {
            let _ = self.inner.events.send(Event::JobModification {
                job: rec.info.id,
                state: to,
            });
            if let Some(cb) = &rec.callback {
                cb.job_modification(rec.info.clone());
            }
        }
    }

    /// Starts or restarts a job (BITS `Resume`).
    ///
    /// # Errors
    /// [`Error::Empty`] without files (BITS `BG_E_EMPTY`), [`Error::InvalidState`] on a final
    /// job, [`Error::UnknownJob`].
    pub fn resume(&self, job: JobId) -> Result<(), Error> {
        let slot = self.job(job)?;
        {
            let mut rec = lock(&slot);
            if rec.info.files.is_empty() {
                return Err(Error::Empty(job));
            }
            let to = next_state(rec.info.state, Transition::Resume)?;
            if to == State::Queued {
                rec.info.error = None;
            }
            self.set_state(&mut rec, to);
            self.save(&rec)?;
        }
        self.start_runner(job, &slot);
        Ok(())
    }

    /// Pauses a job (BITS `Suspend`); its temporary files stay.
    ///
    /// # Errors
    /// [`Error::InvalidState`] on a Transferred or final job, [`Error::UnknownJob`].
    pub fn suspend(&self, job: JobId) -> Result<(), Error> {
        let slot = self.job(job)?;
        let mut rec = lock(&slot);
        let to = next_state(rec.info.state, Transition::Suspend)?;
        rec.runner.stop();
        self.set_state(&mut rec, to);
        self.save(&rec)
    }

    /// Cancels a job (BITS `Cancel`): stops it and deletes its temporary files.
    ///
    /// # Errors
    /// [`Error::InvalidState`] on a final job, [`Error::UnknownJob`].
    pub fn cancel(&self, job: JobId) -> Result<(), Error> {
        let slot = self.job(job)?;
        let mut rec = lock(&slot);
        let to = next_state(rec.info.state, Transition::Cancel)?;
        rec.runner.stop();
        // The state first: a crash after it leaves stray temporary files, never a live job
        // whose files are gone.
        self.set_state(&mut rec, to);
        self.save(&rec)?;
        for f in &rec.info.files {
            self.forget_temp(f, rec.info.owner);
        }
        let size = job_size(&rec.info);
        drop(rec);
        self.retire(job, size);
        Ok(())
    }

    /// A final job leaves the node's memory but for a bounded list of the most recent ones
    /// ([`RETIRED_JOBS`], [`RETIRED_BYTES`]), which [`Node::info`] still answers for; older
    /// ones are forgotten ([`Error::UnknownJob`]). Called without any job's lock held.
    fn retire(&self, job: JobId, size: usize) {
        let gone: Vec<JobId> = {
            let mut retired = self.inner.retired.lock().unwrap_or_else(|e| e.into_inner());
            retired.push_back((job, size));
            let mut bytes: usize = retired.iter().map(|(_, b)| b).sum();
            let mut gone = Vec::new();
            while retired.len() > RETIRED_JOBS || bytes > RETIRED_BYTES {
                let Some((old, b)) = retired.pop_front() else {
                    break;
                };
                bytes -= b;
                gone.push(old);
            }
            gone
        };
        let mut jobs = self.lock_jobs();
        for id in gone {
            jobs.remove(&id);
        }
    }

    fn forget_temp(&self, f: &FileInfo, owner: Option<u32>) {
        if let Some(id) = &f.content_id {
            self.inner.env.store.remove_at(id, &f.temp_name);
        }
        let _ = crate::store::fsuser::as_owner(owner, || std::fs::remove_file(&f.temp_name));
    }

    /// Ends a job (BITS `Complete`): renames each transferred and validated file's temporary
    /// file to its local name, deletes the other temporary files, and moves the job to
    /// Acknowledged. Called during a transfer, only the files already transferred are kept.
    ///
    /// # Errors
    /// [`Error::InvalidState`] on a Cancelled or Acknowledged job, [`Error::Io`] when a rename
    /// fails (the job then keeps its state and its remaining temporary files, so Complete can
    /// be called again), [`Error::UnknownJob`].
    pub fn complete(&self, job: JobId) -> Result<(), Error> {
        let slot = self.job(job)?;
        let mut rec = lock(&slot);
        let to = next_state(rec.info.state, Transition::Complete)?;
        rec.runner.stop();
        for i in 0..rec.info.files.len() {
            let f = rec.info.files[i].clone();
            if rec.files[i].completed {
                continue;
            }
            if !f.transferred {
                self.forget_temp(&f, rec.info.owner);
                continue;
            }
            if f.local_name.is_dir() {
                return Err(Error::BadLocalName {
                    path: f.local_name.clone(),
                    reason: "it became a directory".into(),
                });
            }
            // As the job's owner: the rename is checked as the user would be (a directory
            // swapped for a symlink since the file was added leads nowhere the user may not
            // write; a sticky directory keeps other users' files). Only the file that
            // verified is renamed, within the directory the file was added in.
            let ids = rec.files[i].local;
            let recheck = |file: &std::fs::File| -> std::io::Result<bool> {
                let Some(id) = f.content_id else {
                    return Ok(false);
                };
                let d = shoal_validator::hash_reader(
                    std::io::BufReader::new(file.try_clone()?),
                    id.length(),
                )
                .map_err(std::io::Error::other)?;
                Ok(d.is(&id, f.sha256))
            };
            let renamed = crate::store::fsuser::as_owner(rec.info.owner, || {
                Ok(crate::store::fsuser::rename_verified(
                    &f.temp_name,
                    &f.local_name,
                    &ids,
                    recheck,
                ))
            })
            .unwrap_or_else(|e| Err(RenameError::Io(e)));
            let identity = match renamed {
                Ok(identity) => identity,
                Err(RenameError::Io(e)) => {
                    return Err(Error::Io {
                        path: f.local_name.clone(),
                        source: e,
                    });
                }
                Err(RenameError::NotVerified(reason)) => {
                    return Err(self.complete_refused(&mut rec, i, reason));
                }
            };
            rec.files[i].local.verified = Some(identity);
            if let Some(id) = &f.content_id {
                self.inner.env.store.relocate(
                    id,
                    &f.temp_name,
                    f.local_name.clone(),
                    Backing::Named {
                        owner: rec.info.owner,
                        identity,
                    },
                );
            }
            rec.files[i].completed = true;
            self.save(&rec)?;
        }
        self.set_state(&mut rec, to);
        self.save(&rec)?;
        let size = job_size(&rec.info);
        drop(rec);
        self.retire(job, size);
        Ok(())
    }

    /// Complete found that file `i` is not the file that verified: the file counts as not
    /// transferred (its pieces and its served entry are forgotten), and the job goes to
    /// Error with the LocalFile context naming it; a Resume downloads it again.
    fn complete_refused(&self, rec: &mut JobRecord, i: usize, reason: String) -> Error {
        let f = &mut rec.info.files[i];
        warn!(job = %rec.info.id, file = i, "Complete refused: {reason}");
        if let Some(id) = &f.content_id {
            self.inner.env.store.remove_at(id, &f.temp_name);
        }
        f.transferred = false;
        f.bytes_transferred = 0;
        f.validation_state = ValidationState::Unknown;
        let path = f.temp_name.clone();
        rec.files[i].local.verified = None;
        if let Some(state) = self.state()
            && let Err(e) = state.clear_pieces(rec.info.id, u32::try_from(i).unwrap_or(u32::MAX))
        {
            warn!(job = %rec.info.id, "cannot forget the pieces of a refused file: {e}");
        }
        let error = JobError {
            context: ErrorContext::LocalFile,
            file: Some(i),
            description: format!("{reason}; resume the job to download it again"),
        };
        rec.info.error = Some(error.clone());
        self.set_state(rec, State::Error);
        self.save_logged(rec);
        let _ = self.inner.events.send(Event::JobError {
            job: rec.info.id,
            error,
        });
        Error::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
        }
    }

    /// A snapshot of a job (BITS `GetState`, `GetProgress`, `GetError`, `GetTimes`).
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub fn info(&self, job: JobId) -> Result<JobInfo, Error> {
        let slot = self.job(job)?;
        Ok(lock(&slot).info.clone())
    }

    /// Adds verified bytes from `source` (`None`: the origin) to the node-wide counters.
    pub(crate) fn count_bytes(&self, source: Option<swarm::PeerSource>, bytes: u64) {
        let c = &self.inner.counters;
        match source {
            None => c.origin.fetch_add(bytes, Relaxed),
            Some(swarm::PeerSource::Lan) => c.lan.fetch_add(bytes, Relaxed),
            Some(swarm::PeerSource::Dht) => c.group.fetch_add(bytes, Relaxed),
            Some(swarm::PeerSource::Cache) => c.cache.fetch_add(bytes, Relaxed),
        };
    }

    /// The shared parts downloads use.
    pub(crate) fn env(&self) -> &Env {
        &self.inner.env
    }

    /// Whether file `index` of `job` comes from the origin alone (the caller rejected its peer
    /// content).
    pub(crate) fn origin_only(&self, job: JobId, index: usize) -> bool {
        self.job(job)
            .is_ok_and(|slot| lock(&slot).files.get(index).is_some_and(|f| f.origin_only))
    }

    /// Snapshots of every job.
    #[must_use]
    pub fn jobs(&self) -> Vec<JobInfo> {
        let slots: Vec<_> = self.lock_jobs().values().cloned().collect();
        slots.iter().map(|s| lock(s).info.clone()).collect()
    }

    /// Stops the node: cancels running jobs' transfers and the swarm, waits until every job
    /// runner has stopped writing, and closes the state database (the jobs stay in it, in the
    /// state they were in, for the next start).
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.keep_upload_month();
        let task = self
            .inner
            .swarm_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = task {
            let _ = t.await;
        }
        // Every runner was cancelled with the node's token: wait until each has stopped.
        let tasks: Vec<_> = self
            .lock_jobs()
            .values()
            .filter_map(|slot| lock(slot).task.take())
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        self.inner
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Starts a runner for a Queued job, unless one is at work already; one that only waits
    /// out a retry delay or delivers a notification is replaced ([`Runner::is_replaceable`]).
    fn start_runner(&self, job: JobId, slot: &Arc<Mutex<JobRecord>>) {
        let mut rec = lock(slot);
        if rec.info.state != State::Queued || !rec.runner.is_replaceable() {
            return;
        }
        let token = self.inner.shutdown.child_token();
        let (node, slot2, t) = (self.clone(), slot.clone(), token.clone());
        let previous = rec.task.take();
        let task = rec
            .runner
            .start(token, Doing::WaitingSlot, previous, async move {
                node.run_job(job, &slot2, &t).await;
                lock(&slot2).runner.ended(&t);
            });
        rec.task = Some(task);
    }

    /// Moves the job on `t` unless the runner was stopped; false when it was.
    fn runner_transition(
        &self,
        slot: &Arc<Mutex<JobRecord>>,
        token: &CancellationToken,
        t: Transition,
    ) -> bool {
        let mut rec = lock(slot);
        if token.is_cancelled() {
            return false;
        }
        match next_state(rec.info.state, t) {
            Ok(to) => {
                self.set_state(&mut rec, to);
                self.save_logged(&rec);
                true
            }
            Err(e) => {
                warn!("runner transition refused: {e}");
                false
            }
        }
    }

    /// Waits `d`, or less if [`Node::retry_now`] wakes the job; false when cancelled.
    async fn sleep_or_cancel(
        token: &CancellationToken,
        slot: &Arc<Mutex<JobRecord>>,
        d: Duration,
    ) -> bool {
        let wake = lock(slot).wake.clone();
        tokio::select! {
            () = token.cancelled() => false,
            () = tokio::time::sleep(d) => true,
            () = wake.notified() => true,
        }
    }

    /// Cuts short the job's current retry delay: a transfer after a TransientError, or a
    /// notification nobody acknowledged, is tried again at once (the daemon calls this when a
    /// client starts watching).
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub fn retry_now(&self, job: JobId) -> Result<(), Error> {
        let slot = self.job(job)?;
        lock(&slot).wake.notify_one();
        Ok(())
    }

    /// Delivers JobTransferred to the job's callback until it returns Ok or the job leaves
    /// Transferred (BITS: called until S_OK is returned).
    async fn deliver_transferred(
        &self,
        job: JobId,
        slot: &Arc<Mutex<JobRecord>>,
        token: &CancellationToken,
    ) {
        loop {
            let (info, cb) = {
                let rec = lock(slot);
                (rec.info.clone(), rec.callback.clone())
            };
            let Some(cb) = cb else { return };
            if info.state != State::Transferred || token.is_cancelled() {
                return;
            }
            let delay = info.properties.retry_delay;
            // The callback goes first: one that completes the job itself (and so cancels this
            // runner) still finishes its work; a cancellation ends only a long wait.
            let delivered = tokio::select! {
                biased;
                r = cb.job_transferred(info) => r,
                () = token.cancelled() => return,
            };
            match delivered {
                Ok(()) => return,
                Err(e) => {
                    warn!(%job, "JobTransferred not acknowledged, again in {delay:?}: {e}");
                    if !Self::sleep_or_cancel(token, slot, delay).await {
                        return;
                    }
                }
            }
        }
    }

    /// Delivers JobError until the callback returns Ok or the job leaves Error.
    async fn deliver_error(&self, slot: &Arc<Mutex<JobRecord>>, token: &CancellationToken) {
        loop {
            let (info, cb) = {
                let rec = lock(slot);
                (rec.info.clone(), rec.callback.clone())
            };
            let (Some(cb), Some(error)) = (cb, info.error.clone()) else {
                return;
            };
            if info.state != State::Error || token.is_cancelled() {
                return;
            }
            let delay = info.properties.retry_delay;
            let delivered = tokio::select! {
                biased;
                r = cb.job_error(info, error) => r,
                () = token.cancelled() => return,
            };
            if delivered.is_ok() || !Self::sleep_or_cancel(token, slot, delay).await {
                return;
            }
        }
    }

    /// Runs the notification delivery of a reloaded Transferred or Error job.
    fn start_notifier(&self, job: JobId, slot: &Arc<Mutex<JobRecord>>) {
        let mut rec = lock(slot);
        if rec.runner.is_live() || rec.callback.is_none() {
            return;
        }
        let token = self.inner.shutdown.child_token();
        let state = rec.info.state;
        let (node, slot2, t) = (self.clone(), slot.clone(), token.clone());
        let previous = rec.task.take();
        let task = rec
            .runner
            .start(token, Doing::Notifying, previous, async move {
                match state {
                    State::Transferred => node.deliver_transferred(job, &slot2, &t).await,
                    State::Error => node.deliver_error(&slot2, &t).await,
                    _ => {}
                }
                lock(&slot2).runner.ended(&t);
            });
        rec.task = Some(task);
    }

    /// Cancels, every so often, jobs idle for longer than `timeout`.
    fn spawn_inactivity_sweeper(&self, timeout: Duration) {
        let node = self.clone();
        let period = (timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(3600));
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(period) => {}
                }
                let idle: Vec<JobId> = node
                    .lock_jobs()
                    .iter()
                    .filter(|(_, slot)| {
                        let rec = lock(slot);
                        !rec.info.state.is_final() && rec.touched.elapsed() >= timeout
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for job in idle {
                    info!(%job, "no change for {timeout:?}: cancelling (inactivity timeout)");
                    if let Err(e) = node.cancel(job) {
                        warn!(%job, "cannot cancel an inactive job: {e}");
                    }
                }
            }
        });
    }

    /// Moves the job to Error with `error` and broadcasts JobError; the runner delivers the
    /// notification after it gave up its transfer slot.
    fn fail(&self, slot: &Arc<Mutex<JobRecord>>, token: &CancellationToken, error: JobError) {
        let job = {
            let mut rec = lock(slot);
            rec.info.error = Some(error.clone());
            rec.info.id
        };
        if !self.runner_transition(slot, token, Transition::Fail) {
            return;
        }
        warn!(%job, "job error: {error}");
        let _ = self.inner.events.send(Event::JobError { job, error });
    }

    /// The life of a queued job: wait for a transfer slot, transfer, and deliver the
    /// notifications once the slot is given back.
    async fn run_job(&self, job: JobId, slot: &Arc<Mutex<JobRecord>>, token: &CancellationToken) {
        loop {
            let priority = lock(slot).info.priority;
            let Some(guard) = self.inner.slots.acquire(job, priority, token).await else {
                return;
            };
            if !lock(slot).runner.set(token, Doing::Transferring) {
                return;
            }
            let end = self.transfer(job, slot, &guard.preempt).await;
            let preempted = guard.preempt.is_cancelled() && !token.is_cancelled();
            drop(guard);
            if token.is_cancelled() {
                return;
            }
            let state = lock(slot).info.state;
            match end {
                // Preempted, possibly while failing or finishing: the transition that would
                // have ended the run was refused, so the job queues again.
                _ if preempted
                    && matches!(
                        state,
                        State::Queued | State::Connecting | State::Transferring
                    ) =>
                {
                    info!(%job, "yielding the transfer slot");
                    if !self.runner_transition(slot, token, Transition::Requeue)
                        || !lock(slot).runner.set(token, Doing::WaitingSlot)
                    {
                        return;
                    }
                }
                Ended::Stopped => return,
                Ended::Transient(delay) => {
                    let go_on = lock(slot).runner.set(token, Doing::RetryWait)
                        && Self::sleep_or_cancel(token, slot, delay).await
                        && self.runner_transition(slot, token, Transition::Retry)
                        && lock(slot).runner.set(token, Doing::WaitingSlot);
                    if !go_on {
                        return;
                    }
                }
                Ended::Failed => {
                    lock(slot).runner.set(token, Doing::Notifying);
                    self.deliver_error(slot, token).await;
                    return;
                }
                Ended::Transferred => {
                    lock(slot).runner.set(token, Doing::Notifying);
                    let _ = self.inner.events.send(Event::JobTransferred { job });
                    self.deliver_transferred(job, slot, token).await;
                    return;
                }
            }
        }
    }

    /// The transfer of every file not yet transferred, while the job holds a slot. `token` is
    /// the slot's preempt token (a child of the runner's).
    #[allow(clippy::too_many_lines)]
    async fn transfer(
        &self,
        job: JobId,
        slot: &Arc<Mutex<JobRecord>>,
        token: &CancellationToken,
    ) -> Ended {
        if !self.runner_transition(slot, token, Transition::Connect) {
            return Ended::Stopped;
        }
        let mut i = 0;
        loop {
            if i >= lock(slot).info.files.len() {
                match self.all_transferred(slot, token) {
                    Ok(next) => i = next,
                    Err(ended) => return ended,
                }
                continue;
            }
            let (mut task, done) = self.file_task(job, slot, i);
            if done {
                i += 1;
                continue;
            }
            // With a state store, pick up the pieces an earlier run left on disk.
            if let Some(d) = &task.durable {
                let (store, index) = (d.store.clone(), d.index);
                let file = lock(slot).info.files[i].clone();
                if let Some(r) =
                    tokio::task::spawn_blocking(move || store.resume_point(job, index, &file))
                        .await
                        .ok()
                        .flatten()
                {
                    task.resume = Some(r);
                }
            }
            let progress = |u: Update| self.on_update(slot, token, i, u);
            let result = download::download_file(&self.inner.env, &task, token, &progress).await;
            // Pieces verified and written by a download that stopped: the next run keeps them.
            if result.is_err() {
                let left = task.left.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(f) = lock(slot).files.get_mut(i) {
                    f.left = left;
                }
            }
            match result {
                Ok(d) => match self.file_transferred(job, slot, token, &task, d).await {
                    Ok(true) => i += 1,
                    Ok(false) => {}
                    Err(ended) => return ended,
                },
                Err(Failure::Cancelled) => return Ended::Stopped,
                Err(Failure::Fatal(e)) => {
                    self.fail(slot, token, e);
                    return Ended::Failed;
                }
                Err(Failure::Transient(e)) => return self.transient(job, slot, token, e),
            }
        }
    }

    /// Every file is done, unless one was added meanwhile (`Ok`: its index): checked and moved
    /// to Transferred under one lock, so that an AddFile cannot slip in between.
    fn all_transferred(
        &self,
        slot: &Arc<Mutex<JobRecord>>,
        token: &CancellationToken,
    ) -> Result<usize, Ended> {
        let mut rec = lock(slot);
        if token.is_cancelled() {
            return Err(Ended::Stopped);
        }
        if let Some(next) = rec.info.files.iter().position(|f| !f.transferred) {
            return Ok(next);
        }
        rec.info.transfer_completed = Some(SystemTime::now());
        Err(
            match next_state(rec.info.state, Transition::AllTransferred) {
                Ok(to) => {
                    self.set_state(&mut rec, to);
                    self.save_logged(&rec);
                    Ended::Transferred
                }
                Err(e) => {
                    warn!("runner transition refused: {e}");
                    Ended::Stopped
                }
            },
        )
    }

    /// The download of file `i` (`true`: it is transferred already).
    fn file_task(&self, job: JobId, slot: &Arc<Mutex<JobRecord>>, i: usize) -> (FileTask, bool) {
        let mut rec = lock(slot);
        let resume = rec.files.get_mut(i).and_then(|f| f.left.take());
        let f = &rec.info.files[i];
        (
            FileTask {
                index: i,
                priority: rec.info.priority,
                url: f.url.clone(),
                expected: f.expected,
                ranges: f.ranges.clone(),
                temp: f.temp_name.clone(),
                origin_only: rec.files[i].origin_only,
                resume,
                owner: rec.info.owner,
                durable: self.state().map(|store| Durable {
                    store,
                    job,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                }),
                left: Mutex::new(None),
                cache_any_size: false,
            },
            f.transferred,
        )
    }

    /// File `task.index` downloaded and verified: recorded, reported, and given to the
    /// callback's verdict (BITS validation). `Ok(true)`: it is transferred; `Ok(false)`: it is
    /// fetched again, from the origin (the caller rejected peer or cached content).
    async fn file_transferred(
        &self,
        job: JobId,
        slot: &Arc<Mutex<JobRecord>>,
        token: &CancellationToken,
        task: &FileTask,
        d: download::Downloaded,
    ) -> Result<bool, Ended> {
        let i = task.index;
        let mut advance = false;
        let (info, cb) = {
            let mut rec = lock(slot);
            let f = &mut rec.info.files[i];
            f.content_id = Some(d.content_id);
            f.sha256 = Some(d.sha256);
            rec.files[i].local.verified = Some(d.identity);
            self.save_logged(&rec);
            (rec.info.clone(), rec.callback.clone())
        };
        if let Some(d2) = &task.durable {
            // The derived or trusted layer, so a restart can serve the file.
            let (store, index, layer) = (d2.store.clone(), d2.index, d.layer.clone());
            let _ =
                tokio::task::spawn_blocking(move || store.record_layer(job, index, &layer)).await;
        }
        let file = TransferredFile {
            index: i,
            temp_name: task.temp.clone(),
            from_peers: d.from_peers,
        };
        let _ = self.inner.events.send(Event::FileTransferred {
            job,
            file: file.clone(),
        });
        let verdict = match cb {
            Some(cb) => tokio::select! {
                biased;
                v = cb.file_transferred(info, file) => v,
                () = token.cancelled() => return Err(Ended::Stopped),
            },
            None => ValidationState::Valid,
        };
        if token.is_cancelled() {
            return Err(Ended::Stopped);
        }
        let rejected_origin_content = {
            let mut rec = lock(slot);
            rec.info.files[i].validation_state = verdict;
            let rejected = if verdict == ValidationState::Invalid {
                self.inner.env.store.remove_at(&d.content_id, &task.temp);
                if let Some(d2) = &task.durable
                    && let Err(e) = d2.store.clear_pieces(job, d2.index)
                {
                    warn!(%job, "cannot forget rejected pieces: {e}");
                }
                if (d.from_peers || d.from_cache) && !task.origin_only {
                    info!(%job, file = i, "caller rejected peer or cached content; refetching from the origin");
                    rec.files[i].origin_only = true;
                    false
                } else {
                    true
                }
            } else {
                rec.info.files[i].transferred = true;
                rec.info.modified = SystemTime::now();
                advance = true;
                false
            };
            self.save_logged(&rec);
            rejected
        };
        if rejected_origin_content {
            let url = task.url.clone();
            self.fail(
                slot,
                token,
                JobError {
                    context: ErrorContext::Validation,
                    file: Some(i),
                    description: format!(
                        "the caller rejected the content of {url} from the origin"
                    ),
                },
            );
            return Err(Ended::Failed);
        }
        Ok(advance)
    }

    /// A transient error: the job waits and retries, or fails once the no-progress timeout
    /// has passed since the first transient error with no progress (BITS
    /// SetNoProgressTimeout).
    fn transient(
        &self,
        job: JobId,
        slot: &Arc<Mutex<JobRecord>>,
        token: &CancellationToken,
        e: JobError,
    ) -> Ended {
        let (delay, timed_out) = {
            let mut rec = lock(slot);
            rec.info.error = Some(e.clone());
            // The no-progress timer runs from the first transient error with no
            // progress since (BITS SetNoProgressTimeout).
            let since = *rec
                .transient_since
                .get_or_insert_with(tokio::time::Instant::now);
            (
                rec.info.properties.retry_delay,
                since.elapsed() >= rec.info.properties.no_progress_timeout,
            )
        };
        if timed_out {
            let timeout = lock(slot).info.properties.no_progress_timeout;
            warn!(%job, "no progress for {timeout:?}: {e}");
            self.fail(
                slot,
                token,
                JobError {
                    description: format!(
                        "no progress within the no-progress timeout ({} s): {}",
                        timeout.as_secs(),
                        e.description
                    ),
                    ..e
                },
            );
            return Ended::Failed;
        }
        warn!(%job, "transient error, retrying in {delay:?}: {e}");
        if !self.runner_transition(slot, token, Transition::TransientFailure) {
            return Ended::Stopped;
        }
        Ended::Transient(delay)
    }

    fn on_update(
        &self,
        slot: &Arc<Mutex<JobRecord>>,
        token: &CancellationToken,
        index: usize,
        u: Update,
    ) {
        let first_piece = {
            let mut rec = lock(slot);
            rec.info.modified = SystemTime::now();
            match u {
                Update::Started {
                    length,
                    content_id,
                    resumed,
                } => {
                    let f = &mut rec.info.files[index];
                    f.bytes_total = Some(length);
                    f.content_id = content_id;
                    f.bytes_transferred = resumed;
                    if resumed == 0 {
                        f.bytes_from_peers = 0;
                        f.bytes_from_origin = 0;
                        f.bytes_from_lan_peers = 0;
                        f.bytes_from_group_peers = 0;
                        f.bytes_from_cache = 0;
                    }
                    self.save_logged(&rec);
                    false
                }
                Update::ContentId(id) => {
                    rec.info.files[index].content_id = Some(id);
                    false
                }
                Update::Piece { bytes, source } => {
                    rec.transient_since = None;
                    rec.touched = tokio::time::Instant::now();
                    let f = &mut rec.info.files[index];
                    f.bytes_transferred += bytes;
                    self.count_bytes(source, bytes);
                    match source {
                        None => f.bytes_from_origin += bytes,
                        Some(s) => {
                            f.bytes_from_peers += bytes;
                            *match s {
                                swarm::PeerSource::Lan => &mut f.bytes_from_lan_peers,
                                swarm::PeerSource::Dht => &mut f.bytes_from_group_peers,
                                swarm::PeerSource::Cache => &mut f.bytes_from_cache,
                            } += bytes;
                        }
                    }
                    rec.info.state == State::Connecting
                }
                Update::Rejected => {
                    rec.info.peer_stats.pieces_rejected += 1;
                    self.inner.counters.rejected.fetch_add(1, Relaxed);
                    false
                }
                Update::Banned => {
                    rec.info.peer_stats.peers_banned += 1;
                    self.inner.counters.banned.fetch_add(1, Relaxed);
                    false
                }
            }
        };
        if first_piece {
            self.runner_transition(slot, token, Transition::Transfer);
        }
    }
}

/// How a job's transfer (while it held a slot) ended.
enum Ended {
    /// Stopped by Suspend, Cancel, shutdown, or preemption.
    Stopped,
    /// In TransientError; retry after this delay.
    Transient(Duration),
    /// In Error.
    Failed,
    /// Every file transferred.
    Transferred,
}

fn lock(slot: &Mutex<JobRecord>) -> std::sync::MutexGuard<'_, JobRecord> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}
