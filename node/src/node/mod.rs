//! [`Node`]: the embeddable node, with its builder and the BITS-style job API.

mod complete;
pub(crate) mod diagnose;
pub(crate) mod metrics;
mod registry;
mod run;
mod runner;
pub(crate) mod stats;
mod upload;

use self::registry::{Command, FileRecord, JobRecord};

use std::{
    collections::HashSet,
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use libp2p::{Multiaddr, PeerId, identity};
use shoal_protocol::{Bitfield, HaveKey};
use shoal_validator::{ContentId, PieceLayer};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::{
    Error,
    download::scheduler,
    download::{Bans, Env},
    events::{Callback, Event},
    job::slots::Slots,
    job::{
        ByteRange, ErrorContext, FileInfo, FileSpec, JobError, JobId, JobInfo, JobProperties,
        Priority, State,
    },
    source::origin,
    store::fsuser::LocalIds,
    store::state::ResumePoint,
    store::state::{PersistError, StateStore, StoredJob},
    store::state_actor::StateHandle,
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
    sha256_only_when_expected: bool,
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

    /// Whether mDNS discovery is on, for the configuration's tests.
    #[cfg(test)]
    pub(crate) fn mdns_on(&self) -> bool {
        self.swarm.mdns
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

    /// With `on`, a file's SHA-256 is computed only when its job expects one (default off:
    /// every file's is). The SHA-256 of a file fetched by its BLAKE3 lets the node answer
    /// SHA-256 lookups for it afterwards (clients that know only a SHA-256, as apt and dnf
    /// catalogs give); it costs about as much CPU as the rest of a download from one peer
    /// (`docs/benchmarks.md`). A node that stops after its download serves nobody
    /// afterwards: `shoal get` turns this on unless it seeds after (`--seed-for`). A node
    /// with a cache ([`Builder::cache`]) computes every file's SHA-256 whatever this says.
    /// The file's [`crate::job::FileInfo::sha256`] is `None` when it was not computed.
    #[must_use]
    pub fn sha256_only_when_expected(mut self, on: bool) -> Self {
        self.sha256_only_when_expected = on;
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
        let opened = open_state(self.state_dir.as_deref(), self.keypair.is_none()).await?;
        let keypair = match (self.keypair, opened.identity) {
            (Some(k), _) | (None, Some(k)) => k,
            (None, None) => identity::Keypair::generate_ed25519(),
        };
        let state = opened.store.map(StateHandle::spawn).transpose()?;
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
        let month = opened.month;
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
        let slots = Slots::new(
            self.max_active_jobs.unwrap_or(4),
            self.time_slice.unwrap_or(Duration::from_secs(60)),
        );
        let live = runner::LiveTasks::new();
        // A cache outlives the jobs and answers SHA-256 lookups.
        let sha256_always = !self.sha256_only_when_expected || cache.is_some();
        let node = Node {
            inner: Arc::new_cyclic(|weak| {
                let (registry, views) = registry::spawn(registry::Parts {
                    state: state.clone(),
                    events: events.clone(),
                    slots: slots.clone(),
                    content: store.clone(),
                    node: weak.clone(),
                    live: live.clone(),
                });
                Inner {
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
                        sha256_always,
                    },
                    registry,
                    views,
                    events,
                    shutdown,
                    swarm_task: Mutex::new(Some(task)),
                    retry_delay: self.retry_delay.unwrap_or(Duration::from_secs(600)),
                    state,
                    callbacks: self.callbacks,
                    counters: Counters::default(),
                    metrics_addr: Mutex::new(None),
                    slots,
                    tasks: tokio_util::task::TaskTracker::new(),
                    live,
                }
            }),
        };
        node.inner
            .tasks
            .spawn(node.inner.slots.clone().tick(node.inner.shutdown.clone()));
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
        let (content, callbacks) = (node.inner.env.store.clone(), node.inner.callbacks.clone());
        let records = tokio::task::spawn_blocking(move || {
            restore_records(opened.stored, &content, callbacks.as_ref())
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?;
        // Published before build returns: the restored jobs answer at once.
        node.registry()
            .ask(|reply| Command::Restore { records, reply })
            .await;
        node.spawn_cache_sweeper();
        node.spawn_upload_month_keeper();
        if let (Some(role), Some(rx)) = (self.cache_node_role, fill_rx) {
            node.inner.tasks.spawn(crate::store::fill::run(
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

/// What a state directory holds at start.
#[derive(Default)]
struct Opened {
    store: Option<StateStore>,
    stored: Vec<StoredJob>,
    /// The node's identity (made and stored on first use), when asked for.
    identity: Option<identity::Keypair>,
    /// This month's uploads.
    month: Option<(String, u64)>,
}

/// Opens the state database in `dir` (nothing without a directory) and reads its jobs, this
/// month's uploads and, with `identity`, the node's identity, on a blocking thread.
async fn open_state(dir: Option<&Path>, identity: bool) -> Result<Opened, Error> {
    let Some(dir) = dir.map(Path::to_path_buf) else {
        return Ok(Opened::default());
    };
    tokio::task::spawn_blocking(move || {
        let store = StateStore::open(&dir)?;
        Ok(Opened {
            stored: store.load()?,
            identity: identity.then(|| state_identity(&store)).transpose()?,
            month: upload_month(&store),
            store: Some(store),
        })
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))?
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

struct Inner {
    env: Env,
    /// The job registry's task ([`registry`]).
    registry: registry::Handle,
    /// The jobs as the registry last published them.
    views: tokio::sync::watch::Receiver<registry::Views>,
    events: broadcast::Sender<Event>,
    shutdown: CancellationToken,
    swarm_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    retry_delay: Duration,
    /// The state database's thread, when the node keeps jobs across restarts; closed by
    /// [`Node::shutdown`].
    state: Option<StateHandle>,
    callbacks: Option<CallbackFactory>,
    slots: Slots,
    /// Node-wide byte and trust counters since start.
    counters: Counters,
    /// Where the metrics are served.
    metrics_addr: Mutex<Option<std::net::SocketAddr>>,
    /// The node's own tasks (sweepers, the slot ticker, the cache-node role, the metrics
    /// server, Complete's renames): [`Node::shutdown`] waits for every one of them.
    tasks: tokio_util::task::TaskTracker,
    /// The count of job runners' tasks alive ([`Node::wait_idle`]).
    live: runner::LiveTasks,
}

/// The counters behind [`crate::node::stats::NodeStats`].
#[derive(Debug, Default)]
struct Counters {
    /// Taken for each verified piece, briefly.
    bytes: Mutex<crate::job::BytesBySource>,
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
            bytes_from: *c
                .bytes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
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
    async fn keep_upload_month(&self) {
        if let Some(state) = &self.inner.state {
            let (month, bytes) = self.inner.env.bandwidth.month();
            let value = format!("{month} {bytes}");
            if let Some(Err(e)) = state
                .run(move |s| s.put_meta(UPLOAD_MONTH, value.as_bytes()))
                .await
            {
                warn!("cannot store this month's uploads: {e}");
            }
        }
    }

    /// Keeps the month's upload count in the state database while it changes.
    fn spawn_upload_month_keeper(&self) {
        let node = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let mut kept = node.inner.env.bandwidth.month();
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(UPLOAD_MONTH_EVERY) => {}
                }
                let now = node.inner.env.bandwidth.month();
                if now != kept {
                    node.keep_upload_month().await;
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
        registry::Registry::in_use(&self.inner.views.borrow())
    }

    /// Sweeps the cache every [`crate::store::cache::SWEEP_INTERVAL`] and after a file entered it.
    fn spawn_cache_sweeper(&self) {
        let Some(cache) = self.inner.env.cache.clone() else {
            return;
        };
        let node = self.clone();
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
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
    pub async fn create_job(&self, display_name: &str, priority: Priority) -> Result<JobId, Error> {
        self.create_job_with(display_name, priority, None, None)
            .await
    }

    /// Creates a job owned by the Unix user `owner` (the daemon's API caller; `None` for the
    /// library), with `properties` (default: the node's retry delay and BITS's defaults).
    ///
    /// # Errors
    /// [`Error::State`] when the job cannot be stored (with a state directory).
    pub async fn create_job_with(
        &self,
        display_name: &str,
        priority: Priority,
        owner: Option<u32>,
        properties: Option<JobProperties>,
    ) -> Result<JobId, Error> {
        let properties = properties.unwrap_or_else(|| JobProperties {
            retry_delay: self.inner.retry_delay,
            ..JobProperties::default()
        });
        let info = JobInfo::created(
            JobId::new(),
            display_name,
            priority,
            owner,
            properties,
            SystemTime::now(),
        );
        self.create(info).await
    }

    /// Stores and registers the new job `info`, with the node's callback for it.
    async fn create(&self, info: JobInfo) -> Result<JobId, Error> {
        let id = info.id;
        let mut record = JobRecord::new(info, Vec::new());
        if let Some(f) = &self.inner.callbacks {
            record.callback = f(&record.info);
        }
        let record = Box::new(record);
        self.registry()
            .call(|reply| Command::Create { record, reply })
            .await?;
        Ok(id)
    }

    /// The job registry's handle.
    fn registry(&self) -> &registry::Handle {
        &self.inner.registry
    }

    /// The published snapshot of `job`.
    fn view(&self, job: JobId) -> Result<registry::JobView, Error> {
        self.inner
            .views
            .borrow()
            .get(&job)
            .cloned()
            .ok_or(Error::UnknownJob(job))
    }

    /// Sets the job's callback (BITS `SetNotifyInterface`).
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub async fn set_callback(&self, job: JobId, callback: Arc<dyn Callback>) -> Result<(), Error> {
        self.registry()
            .call(|reply| Command::SetCallback {
                job,
                callback,
                reply,
            })
            .await
    }

    /// Sets the job's retry delay (BITS `SetMinimumRetryDelay`).
    ///
    /// # Errors
    /// [`Error::UnknownJob`], [`Error::State`].
    pub async fn set_retry_delay(&self, job: JobId, delay: Duration) -> Result<(), Error> {
        self.modify(job, move |info| {
            info.properties.retry_delay = delay;
            Ok(())
        })
        .await
    }

    /// Changes a job's display name, priority or properties (BITS `SetDisplayName`,
    /// `SetPriority`, `SetMinimumRetryDelay`, `SetNoProgressTimeout`, `SetNotifyFlags`,
    /// `SetNotifyCmdLine`): `change` edits the job's snapshot; only those fields are kept.
    ///
    /// # Errors
    /// What `change` returns, [`Error::InvalidState`] on a final job, [`Error::UnknownJob`],
    /// [`Error::State`].
    pub async fn modify(
        &self,
        job: JobId,
        change: impl FnOnce(&mut JobInfo) -> Result<(), Error> + Send + 'static,
    ) -> Result<(), Error> {
        let change = Box::new(change);
        self.registry()
            .call(|reply| Command::Modify { job, change, reply })
            .await
    }

    /// Sets a job's HTTP options (BITS `IBackgroundCopyJobHttpOptions::SetCustomHeaders`,
    /// `SetClientCertificateByName`, `IBackgroundCopyJob2::SetCredentials`,
    /// `IBackgroundCopyJob::SetProxySettings`), replacing the ones it had. The certificate and
    /// CA files are read now, as the job's owner, to check them; they are read again when a
    /// transfer starts. A transfer in progress starts again with the new options (verified
    /// pieces are kept).
    ///
    /// # Errors
    /// [`Error::BadHttpOption`] naming the option (a reserved or malformed header, a proxy URL
    /// that is not http or https, a file the owner cannot read, a file that is not PEM),
    /// [`Error::InvalidState`] on a final job, [`Error::UnknownJob`], [`Error::State`].
    pub async fn set_http_options(
        &self,
        job: JobId,
        options: crate::job::HttpOptions,
    ) -> Result<(), Error> {
        options.check()?;
        let owner = self.view(job)?.info.owner;
        let config = self.inner.env.origin.config().clone();
        let checked = options.clone();
        tokio::task::spawn_blocking(move || {
            let files = crate::store::fsuser::as_owner(owner, || {
                crate::source::origin::TlsFiles::read(&checked).map_err(|(path, e)| {
                    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                })
            })
            .map_err(|e| Error::BadHttpOption {
                option: "certificate file".into(),
                reason: e.to_string(),
            })?;
            crate::source::origin::Client::for_job(&config, &checked, &files)
                .map(drop)
                .map_err(|reason| Error::BadHttpOption {
                    option: "HTTP options".into(),
                    reason,
                })
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        self.modify(job, move |info| {
            info.properties.http = options;
            Ok(())
        })
        .await
    }

    /// Sets the longest time the job may spend in Connecting and Transferring before it
    /// moves to Error (BITS `IBackgroundCopyJob4::SetMaximumDownloadTime`, in seconds; 0 is
    /// BITS's default of 90 days, as in BITS).
    ///
    /// # Errors
    /// [`Error::InvalidState`] on a final job, [`Error::UnknownJob`], [`Error::State`].
    pub async fn set_maximum_download_time(&self, job: JobId, time: Duration) -> Result<(), Error> {
        let time = if time.is_zero() {
            crate::job::DEFAULT_MAX_DOWNLOAD_TIME
        } else {
            time
        };
        self.modify(job, move |info| {
            info.properties.max_download_time = time;
            Ok(())
        })
        .await
    }

    /// Changes the origin URL of file `index` of a job (BITS
    /// `IBackgroundCopyFile2::SetRemoteName`). A file with an expected digest keeps its
    /// verified pieces, since the digest pins its content whatever URL serves it, and so does
    /// a file already transferred; any other file loses them (a JobModification tells it). A
    /// transfer in progress goes on from the new URL. Answers whether the file's pieces were
    /// discarded.
    ///
    /// # Errors
    /// [`Error::BadUrl`] for a scheme other than http/https, [`Error::UnknownFile`] for an
    /// index past the job's files, [`Error::InvalidState`] on a final job,
    /// [`Error::UnknownJob`], [`Error::State`].
    pub async fn set_remote_name(
        &self,
        job: JobId,
        index: usize,
        url: url::Url,
    ) -> Result<bool, Error> {
        check_url(&url)?;
        let discarded = self
            .registry()
            .call(|reply| Command::SetRemoteNames {
                job,
                rename: Box::new(move |info| {
                    if index >= info.files.len() {
                        return Err(Error::UnknownFile { job, index });
                    }
                    Ok(vec![(index, url)])
                }),
                reply,
            })
            .await?;
        Ok(discarded > 0)
    }

    /// Replaces `old_prefix` by `new_prefix` at the start of every URL of a job that starts
    /// with it (BITS `IBackgroundCopyJob3::ReplaceRemotePrefix`: a case-sensitive comparison
    /// of the URL's text), with [`Node::set_remote_name`]'s rules for each file. The URLs
    /// are compared in their normalized form (`http://Host` reads as `http://host/`), and
    /// `http://a.example` also matches `http://a.example.org/`: end the prefix with `/` to
    /// mean one host. Answers how many files lost their pieces.
    ///
    /// # Errors
    /// [`Error::BadUrl`] when a prefix is empty or a new URL does not parse or is not
    /// http/https (no file is changed then), [`Error::InvalidState`] on a final job,
    /// [`Error::UnknownJob`], [`Error::State`].
    pub async fn replace_remote_prefix(
        &self,
        job: JobId,
        old_prefix: &str,
        new_prefix: &str,
    ) -> Result<usize, Error> {
        if old_prefix.is_empty() || new_prefix.is_empty() {
            return Err(Error::BadUrl {
                url: format!("{old_prefix:?} -> {new_prefix:?}"),
                reason: "neither prefix may be empty".into(),
            });
        }
        let (old, new) = (old_prefix.to_owned(), new_prefix.to_owned());
        self.registry()
            .call(|reply| Command::SetRemoteNames {
                job,
                rename: Box::new(move |info| {
                    let mut out = Vec::new();
                    for (i, f) in info.files.iter().enumerate() {
                        if let Some(rest) = f.url.as_str().strip_prefix(old.as_str()) {
                            let text = format!("{new}{rest}");
                            let url = url::Url::parse(&text).map_err(|e| Error::BadUrl {
                                url: text.clone(),
                                reason: e.to_string(),
                            })?;
                            check_url(&url)?;
                            out.push((i, url));
                        }
                    }
                    Ok(out)
                }),
                reply,
            })
            .await
    }

    /// Adds a file to a job (BITS `AddFile`). Adding to a Transferred job queues it again.
    ///
    /// # Errors
    /// [`Error::BadUrl`] for a scheme other than http/https, [`Error::BadLocalName`],
    /// [`Error::DuplicateLocalName`], [`Error::InvalidState`] on a final job,
    /// [`Error::UnknownJob`].
    pub async fn add_file(&self, job: JobId, spec: FileSpec) -> Result<(), Error> {
        check_url(&spec.url)?;
        check_ranges(&spec.ranges)?;
        let view = self.view(job)?.info;
        if view.job_type.is_upload() {
            return self.add_upload_file(job, &view, spec).await;
        }
        let owner = view.owner;
        let local = spec.local_name.clone();
        // As the owner sees it: the daemon tells a user nothing of paths the user may not see.
        let dir = tokio::task::spawn_blocking(move || {
            crate::store::fsuser::as_owner(owner, || {
                check_local_name(&local).map_err(std::io::Error::other)?;
                let dir = crate::store::fsuser::dir_identity(&local)?;
                crate::store::fsuser::may_create_in(&local)?;
                Ok(dir)
            })
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
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
        let temp_name = temp_name_for(&spec.local_name, job);
        let file = FileInfo::added(spec, temp_name);
        let record = FileRecord {
            origin_only: false,
            completed: false,
            left: None,
            local: LocalIds {
                dir: Some(dir),
                verified: None,
            },
        };
        self.registry()
            .call(|reply| Command::AddFile {
                job,
                file: Box::new((file, record)),
                reply,
            })
            .await
    }

    /// Creates an upload job (BITS `CreateJob` with `BG_JOB_TYPE_UPLOAD`, or
    /// `BG_JOB_TYPE_UPLOAD_REPLY` with `reply`), owned by `owner`, with the default
    /// properties; it starts Suspended and takes one file: the local file to send, and the
    /// server's upload URL.
    ///
    /// # Errors
    /// [`Error::State`] when the job cannot be stored (with a state directory).
    pub async fn create_upload_job(
        &self,
        display_name: &str,
        priority: Priority,
        owner: Option<u32>,
        reply: bool,
    ) -> Result<JobId, Error> {
        let mut info = JobInfo::created(
            JobId::new(),
            display_name,
            priority,
            owner,
            JobProperties {
                retry_delay: self.inner.retry_delay,
                ..JobProperties::default()
            },
            SystemTime::now(),
        );
        info.job_type = if reply {
            crate::job::JobType::UploadReply
        } else {
            crate::job::JobType::Upload
        };
        self.create(info).await
    }

    /// The file of an upload job: one, a regular file its owner can read, no digests or
    /// ranges; an upload-reply job's reply goes to `LOCAL.reply`, whose directory the owner
    /// must be able to write.
    async fn add_upload_file(
        &self,
        job: JobId,
        view: &JobInfo,
        spec: FileSpec,
    ) -> Result<(), Error> {
        if !view.files.is_empty() {
            return Err(Error::UploadFiles(job));
        }
        if !spec.ranges.is_empty() || spec.expected != crate::Expected::default() {
            return Err(Error::BadLocalName {
                path: spec.local_name.clone(),
                reason: "an upload takes no byte ranges or expected digests".into(),
            });
        }
        let (owner, reply) = (
            view.owner,
            view.job_type == crate::job::JobType::UploadReply,
        );
        let local = spec.local_name.clone();
        let dir = tokio::task::spawn_blocking(move || {
            crate::store::fsuser::as_owner(owner, || {
                if local.components().any(|c| c == Component::ParentDir) {
                    return Err(std::io::Error::other("a local name may not contain '..'"));
                }
                use std::os::unix::fs::OpenOptionsExt;
                // Opened as the owner, without following a FIFO's open into a wait.
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&local)?;
                if !f.metadata()?.is_file() {
                    return Err(std::io::Error::other("it is not a regular file"));
                }
                if reply {
                    crate::store::fsuser::may_create_in(&local)?;
                }
                crate::store::fsuser::dir_identity(&local)
            })
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
        .map_err(|e| Error::BadLocalName {
            path: spec.local_name.clone(),
            reason: format!("the file to upload cannot be used: {e}"),
        })?;
        let temp_name = temp_name_for(&spec.local_name, job);
        let reply_name = reply.then(|| {
            let mut name = spec.local_name.clone().into_os_string();
            name.push(".reply");
            PathBuf::from(name)
        });
        let file = FileInfo::added(spec, temp_name);
        let record = FileRecord {
            origin_only: true,
            completed: false,
            left: None,
            local: LocalIds {
                dir: Some(dir),
                verified: None,
            },
        };
        self.registry()
            .call(|r| Command::AddFile {
                job,
                file: Box::new((file, record)),
                reply: r,
            })
            .await?;
        if let Some(name) = reply_name {
            self.modify_reply_name(job, name).await?;
        }
        Ok(())
    }

    /// Sets an upload-reply job's reply file name.
    async fn modify_reply_name(&self, job: JobId, name: PathBuf) -> Result<(), Error> {
        self.registry()
            .call(|reply| Command::SetReplyName { job, name, reply })
            .await
    }

    /// The first 1 MiB of an upload-reply job's reply (BITS `IBackgroundCopyJob2::
    /// GetReplyData`): empty until the reply arrived; read from the reply's temporary file,
    /// or from its name once the job is Acknowledged. The reply is verified by nothing but the
    /// connection's TLS.
    ///
    /// # Errors
    /// [`Error::UnknownJob`], [`Error::Io`] when the reply file cannot be read.
    pub async fn reply_data(&self, job: JobId) -> Result<Vec<u8>, Error> {
        let info = self.view(job)?.info;
        let (Some(name), Some(f)) = (info.reply_file_name.clone(), info.files.first()) else {
            return Ok(Vec::new());
        };
        if !f.transferred {
            return Ok(Vec::new());
        }
        let path = if info.state == State::Acknowledged {
            name
        } else {
            f.temp_name.clone()
        };
        let owner = info.owner;
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            crate::store::fsuser::as_owner(owner, || {
                use std::io::Read;
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&p)?;
                let mut buf = Vec::new();
                file.take(crate::source::upload::REPLY_DATA as u64)
                    .read_to_end(&mut buf)?;
                Ok(buf)
            })
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
        .map_err(|source| Error::Io { path, source })
    }

    /// Starts or restarts a job (BITS `Resume`).
    ///
    /// # Errors
    /// [`Error::Empty`] without files (BITS `BG_E_EMPTY`), [`Error::InvalidState`] on a final
    /// job, [`Error::UnknownJob`].
    pub async fn resume(&self, job: JobId) -> Result<(), Error> {
        self.registry()
            .call(|reply| Command::Resume { job, reply })
            .await
    }

    /// Pauses a job (BITS `Suspend`); its temporary files stay.
    ///
    /// # Errors
    /// [`Error::InvalidState`] on a Transferred or final job, [`Error::UnknownJob`].
    pub async fn suspend(&self, job: JobId) -> Result<(), Error> {
        self.registry()
            .call(|reply| Command::Suspend { job, reply })
            .await
    }

    /// Cancels a job (BITS `Cancel`): stops it and deletes its temporary files.
    ///
    /// # Errors
    /// [`Error::InvalidState`] on a final job, [`Error::UnknownJob`].
    pub async fn cancel(&self, job: JobId) -> Result<(), Error> {
        // An upload's open session is cancelled on the server too (BITS Cancel-Session).
        let session = match self.view(job) {
            Ok(v) if v.info.job_type.is_upload() => match (
                v.info.upload_session.clone(),
                v.info.files.first().map(|f| f.url.clone()),
            ) {
                (Some(id), Some(url)) => run::job_env(self, job)
                    .await
                    .ok()
                    .map(|env| (env.origin, url, id)),
                _ => None,
            },
            _ => None,
        };
        let (owner, temps) = self
            .registry()
            .call(|reply| Command::Cancel { job, reply })
            .await?;
        if let Some((client, url, id)) = session {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                crate::source::upload::cancel_session(&client, &url, &id),
            )
            .await;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for t in temps {
                let _ = crate::store::fsuser::as_owner(owner, || std::fs::remove_file(&t));
            }
        })
        .await;
        Ok(())
    }

    /// Ends a job (BITS `Complete`): renames each transferred and validated file's temporary
    /// file to its local name, deletes the other temporary files, and moves the job to
    /// Acknowledged. Called during a transfer, only the files already transferred are kept.
    /// The renames go on if the returned future is dropped.
    ///
    /// # Errors
    /// [`Error::InvalidState`] on a Cancelled or Acknowledged job, [`Error::Io`] when a rename
    /// fails (the job then keeps its state and its remaining temporary files, so Complete can
    /// be called again), [`Error::UnknownJob`].
    pub async fn complete(&self, job: JobId) -> Result<(), Error> {
        let node = self.clone();
        let tasks = node.inner.tasks.clone();
        tasks
            .spawn(async move { complete::run(&node, job).await })
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    /// A snapshot of a job (BITS `GetState`, `GetProgress`, `GetError`, `GetTimes`).
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub fn info(&self, job: JobId) -> Result<JobInfo, Error> {
        Ok(self.view(job)?.info)
    }

    /// Adds verified bytes from `source` (`None`: the origin) to the node-wide counters.
    pub(crate) fn count_bytes(&self, source: Option<swarm::PeerSource>, bytes: u64) {
        self.inner
            .counters
            .bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(source, bytes);
    }

    /// The shared parts downloads use.
    pub(crate) fn env(&self) -> &Env {
        &self.inner.env
    }

    /// Whether file `index` of `job` comes from the origin alone (the caller rejected its peer
    /// content).
    pub(crate) fn origin_only(&self, job: JobId, index: usize) -> bool {
        self.view(job)
            .is_ok_and(|v| v.origin_only.get(index).copied().unwrap_or(false))
    }

    /// Snapshots of every job.
    #[must_use]
    pub fn jobs(&self) -> Vec<JobInfo> {
        self.inner
            .views
            .borrow()
            .values()
            .map(|v| v.info.clone())
            .collect()
    }

    /// Stops the node: cancels running jobs' transfers and the swarm, waits until every job
    /// runner has stopped writing and every task of the node has ended, and closes the state
    /// database (the jobs stay in it, in the state they were in, for the next start).
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.keep_upload_month().await;
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
        let tasks = self
            .registry()
            .ask(|reply| Command::Shutdown { reply })
            .await
            .unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
        // The node's own tasks end on its token; a Complete under way finishes its renames.
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        if let Some(state) = &self.inner.state {
            state.close().await;
        }
    }

    /// Waits until the node has nothing to do for its jobs: no job waits for a transfer slot,
    /// transfers, waits out a retry delay, delivers a notification (`JobTransferred`,
    /// `JobError`, until its callback acknowledges it) or completes, and the task of every
    /// runner stopped by a Suspend or Cancel has ended (its writes are done). A job in
    /// TransientError is tried again first (after `retry_delay`), and a callback that keeps
    /// failing keeps the node busy; serving peers and the node's own tasks do not count.
    ///
    /// After it returns, what a job shows stays as it is until a caller changes it (or a
    /// timer of the job properties does, such as the inactivity timeout). For tests and for
    /// embedders that leave only once their downloads are settled; jobs started meanwhile
    /// are waited for too. Returns at once on a node that was shut down.
    pub async fn wait_idle(&self) {
        let mut live = self.inner.live.subscribe();
        loop {
            // A runner's last step (its job has none now) comes before its task ends: once
            // no task is alive, the registry is asked whether a new one started meanwhile.
            if live.wait_for(|n| *n == 0).await.is_err() {
                return;
            }
            match self.registry().step(|r| r.is_idle()).await {
                // The registry stopped: nothing can start any more.
                None => return,
                // Unless a runner started and ended meanwhile, its task still ending.
                Some(true) if *live.borrow_and_update() == 0 => return,
                Some(true) => {}
                // A Complete under way, or commands waiting for it: no task to wait on.
                Some(false) if *live.borrow_and_update() == 0 => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // A runner started meanwhile.
                Some(false) => {}
            }
        }
    }

    /// Cuts short the job's current retry delay: a transfer after a TransientError, or a
    /// notification nobody acknowledged, is tried again at once (the daemon calls this when a
    /// client starts watching).
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub async fn retry_now(&self, job: JobId) -> Result<(), Error> {
        self.registry()
            .call(|reply| Command::RetryNow { job, reply })
            .await
    }

    /// Cancels, every so often, jobs idle for longer than `timeout`.
    fn spawn_inactivity_sweeper(&self, timeout: Duration) {
        let node = self.clone();
        let period = (timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(3600));
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(period) => {}
                }
                let idle = node
                    .registry()
                    .ask(|reply| Command::Idle { timeout, reply })
                    .await
                    .unwrap_or_default();
                for job in idle {
                    info!(%job, "no change for {timeout:?}: cancelling (inactivity timeout)");
                    if let Err(e) = node.cancel(job).await {
                        warn!(%job, "cannot cancel an inactive job: {e}");
                    }
                }
            }
        });
    }
}

/// The records of the jobs of the state database (at build), and whether each changed in
/// reload (so is stored again). Registers the files that verified with `content`, to serve.
/// Reads the file system as each job's owner: call on a blocking thread.
fn restore_records(
    stored: Vec<StoredJob>,
    content: &ContentStore,
    callbacks: Option<&CallbackFactory>,
) -> Vec<(JobRecord, bool)> {
    let mut out = Vec::new();
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
        // An upload goes on from what the server acknowledged, in the session it opened.
        if info.job_type.is_upload()
            && let Some(f) = info.files.first_mut()
        {
            f.bytes_transferred = if f.transferred {
                f.bytes_total.unwrap_or(s.job.upload_acked)
            } else {
                s.job.upload_acked
            };
        }
        // Files that verified keep serving; a vanished temporary file is an error.
        let mut vanished = None;
        let owner = info.owner;
        let downloads = if info.job_type.is_upload() {
            &[][..]
        } else {
            &info.files[..]
        };
        for (i, f) in downloads.iter().enumerate() {
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
                content.insert(
                    layer,
                    Bitfield::full(count),
                    f.temp_name.clone(),
                    Backing::Named { owner, identity },
                );
                if let (Some(id), Some(sha)) = (f.content_id, f.sha256) {
                    content.set_sha256(&id, sha);
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
        let callback = callbacks.and_then(|f| f(&info));
        let changed = info.state != was;
        let mut record = JobRecord::new(
            info,
            flags
                .iter()
                .zip(&s.files)
                .map(|(&(origin_only, completed), f)| FileRecord {
                    origin_only,
                    completed,
                    left: None,
                    local: f.file.local,
                })
                .collect(),
        );
        record.callback = callback;
        record.touched = now.checked_sub(idle).unwrap_or(now);
        out.push((record, changed));
    }
    out
}

/// A URL a file may have: `http` or `https`.
fn check_url(url: &url::Url) -> Result<(), Error> {
    if matches!(url.scheme(), "http" | "https") {
        Ok(())
    } else {
        Err(Error::BadUrl {
            url: origin::redact(url),
            reason: "only http and https URLs are supported".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_every_task_of_the_node() {
        let node = Node::builder()
            .listen(vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()])
            .mdns(false)
            .build()
            .await
            .unwrap();
        // The slot ticker, the inactivity sweeper and the upload-month keeper run.
        assert!(node.inner.tasks.len() >= 3, "{}", node.inner.tasks.len());
        // One more that, like a Complete under way, takes a while to end after the stop.
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (token, e) = (node.inner.shutdown.clone(), ended.clone());
        node.inner.tasks.spawn(async move {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            e.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        node.shutdown().await;
        assert!(ended.load(std::sync::atomic::Ordering::SeqCst));
        assert!(node.inner.tasks.is_closed() && node.inner.tasks.is_empty());
    }
}
