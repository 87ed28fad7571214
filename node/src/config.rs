//! The node's configuration file (TOML).
//!
//! Every key is optional and defaults to the value in `configs/shoal.toml`, which documents
//! them all. An unknown key, a value of the wrong type or a bad multiaddr is a
//! [`ConfigError`] naming the file and the key; the node does not start with it.

pub use crate::download::scheduler::Config as SchedulerConfig;
pub use crate::source::bandwidth::BandwidthLimits;
pub use crate::source::origin::Config as OriginConfig;
pub use crate::source::origin::ProxySetting as OriginProxy;
pub use crate::source::policy::SourcePolicy;
pub use crate::store::cache::CacheConfig;
pub use crate::store::fill::CacheNodeRole;
pub use crate::swarm::group::{Group, PeerMode};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use libp2p::Multiaddr;
use serde::Deserialize;

use shoal_validator::ValidationState;

use crate::{Builder, daemon::DaemonConfig};

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub path: String,
    /// What was wrong, naming the key.
    pub reason: String,
}

/// `[node]`: the swarm.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Addresses to listen on (multiaddrs).
    pub listen: Option<Vec<String>>,
    /// Static peers (multiaddrs, with or without `/p2p/PEER_ID`).
    pub peers: Option<Vec<String>>,
    /// mDNS discovery of LAN peers (multicast to 224.0.0.251). On when absent: a fleet
    /// installed with defaults finds its LAN peers (Delivery Optimization's LAN mode does
    /// too). In the `origin` mode the node dials nobody whatever this says.
    pub mdns: Option<bool>,
    /// Piece requests served at once; more are answered Busy.
    pub max_concurrent_uploads: Option<usize>,
    /// Peers served at once; requests of other peers are answered Busy.
    pub max_upload_peers: Option<usize>,
    /// Which peers to use: "origin", "lan", "group" or "internet" (DO's download modes).
    pub mode: Option<String>,
    /// DHT bootstrap peers (multiaddrs ending in `/p2p/PEER_ID`), for the group and internet
    /// modes.
    pub bootstrap: Option<Vec<String>>,
    /// How long other nodes keep this node's provider records, in seconds.
    pub provider_ttl_seconds: Option<f64>,
    /// How often this node publishes its provider records again, in seconds.
    pub provider_republish_seconds: Option<f64>,
}

/// `[policy]`: when downloads may use the origin (see `shoal_node::policy`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Wait for peers before the origin, Foreground jobs, in seconds.
    pub origin_delay_foreground_seconds: Option<f64>,
    /// Wait for peers before the origin, High jobs, in seconds.
    pub origin_delay_high_seconds: Option<f64>,
    /// Wait for peers before the origin, Normal jobs, in seconds.
    pub origin_delay_normal_seconds: Option<f64>,
    /// Wait for peers before the origin, Low jobs, in seconds.
    pub origin_delay_low_seconds: Option<f64>,
    /// Never use the origin (air-gapped LAN).
    pub never_origin: Option<bool>,
    /// Cache nodes to try before the origin, in order, each `MULTIADDR/p2p/PEER_ID` (DO's
    /// DOCacheHost).
    pub cache_nodes: Option<Vec<String>>,
    /// How long a Foreground download waits for a cache node making no progress, in seconds
    /// (DO's DelayCacheServerFallbackForegroundDownload).
    pub cache_fallback_foreground_seconds: Option<f64>,
    /// The same for background (High, Normal, Low) downloads
    /// (DelayCacheServerFallbackBackgroundDownload).
    pub cache_fallback_background_seconds: Option<f64>,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// A loopback `IP:PORT` to serve `/metrics` on; absent: no metrics.
    pub listen: Option<String>,
}

/// `[bandwidth]`: token-bucket limits and the monthly upload cap (see
/// `shoal_node::bandwidth`); absent keys are no limit.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BandwidthSection {
    /// Downloads of Foreground jobs, bytes per second (DOMaxForegroundDownloadBandwidth).
    pub download_foreground_bytes_per_sec: Option<u64>,
    /// Downloads of other jobs, bytes per second (DOMaxBackgroundDownloadBandwidth).
    pub download_background_bytes_per_sec: Option<u64>,
    /// Uploads to peers, bytes per second.
    pub upload_bytes_per_sec: Option<u64>,
    /// Bytes served to peers per calendar month, UTC (DOMonthlyUploadDataCap).
    pub monthly_upload_cap_bytes: Option<u64>,
}

/// `[cache]`: the daemon's content-addressed cache (see `shoal_node::cache`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Keep a cache (default true).
    pub enabled: Option<bool>,
    /// The cache directory; default `cache` in the state directory.
    pub dir: Option<String>,
    /// At most this many bytes (DO's DOAbsoluteMaxCacheSize); default none.
    pub max_size_bytes: Option<u64>,
    /// At most this percentage of the disk (DO's DOMaxCacheSize); default 20.
    pub max_size_percent: Option<f64>,
    /// Entries older than this are evicted, in seconds (DO's DOMaxCacheAge); default 259200.
    pub max_age_seconds: Option<f64>,
    /// Files smaller than this are not cached, in bytes (DO's DOMinFileSizeToCache);
    /// default 1048576.
    pub min_file_size_bytes: Option<u64>,
    /// Be a cache node: fetch content peers ask for with its origin URL (default false).
    pub node: Option<bool>,
    /// URL prefixes a cache node fetches from for peers; default: none (no fills).
    pub node_origins: Option<Vec<String>>,
    /// Fills a cache node runs at once (default 8).
    pub node_max_fills: Option<usize>,
}

/// `[group]`: the peer group (a name and a secret; see `shoal_node::group`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    /// The group's name.
    pub name: Option<String>,
    /// The group's secret, inline.
    pub secret: Option<String>,
    /// A file whose contents (trailing whitespace removed) are the secret.
    pub secret_file: Option<String>,
}

/// `[origin]`: the HTTP client.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OriginSection {
    /// Retries of one request after a transient failure.
    pub retries: Option<u32>,
    /// First retry delay in seconds, doubled per retry up to 8 s.
    pub backoff_seconds: Option<f64>,
    /// Connect timeout in seconds.
    pub connect_timeout_seconds: Option<f64>,
    /// Longest wait for the next bytes of a response, in seconds.
    pub read_timeout_seconds: Option<f64>,
    /// The proxy of jobs that use the node's setting (BITS's "preconfig" proxy usage): an
    /// `http://` or `https://` URL (with `USER:PASSWORD@` if the proxy wants it), or
    /// `"direct"`. Absent: the `http_proxy`, `https_proxy` and `no_proxy` environment
    /// variables of the node's process.
    pub proxy: Option<String>,
    /// Hosts (a name also matches its subdomains), addresses and CIDR ranges reached without
    /// `proxy`.
    pub proxy_bypass: Option<Vec<String>>,
}

/// `[scheduler]`: piece requests to peers.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    /// The deepest pipeline of requests to one peer.
    pub max_requests_per_peer: Option<usize>,
    /// Peer requests in flight in all.
    pub max_requests_in_flight: Option<usize>,
    /// Longest origin run while peers are around, in pieces.
    pub max_origin_run_pieces: Option<u32>,
    /// Failed peer attempts after which a piece goes to the origin.
    pub peer_attempts: Option<u8>,
    /// First backoff of a failing peer in seconds, doubled per failure up to 30 s.
    pub peer_backoff_seconds: Option<f64>,
}

/// `[jobs]`: job defaults.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobsSection {
    /// Default retry delay of new jobs in seconds (BITS minimum retry delay).
    pub retry_delay_seconds: Option<f64>,
    /// How long a download waits for a first peer connection, in seconds.
    pub discovery_wait_seconds: Option<f64>,
    /// Jobs transferring at once; the others wait in Queued by priority.
    pub max_active: Option<usize>,
    /// How long a job keeps its transfer slot while a job of its priority waits, in seconds.
    pub time_slice_seconds: Option<f64>,
}

/// `[daemon]`: the daemon's state, control API, limits and notifications.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    /// The state directory (jobs, pieces on disk, identity).
    pub state_dir: Option<String>,
    /// The Unix socket of the control API.
    pub socket: Option<String>,
    /// The socket's permission bits, in octal ("0660").
    pub socket_mode: Option<String>,
    /// The group the socket belongs to (its members may call); default `shoal` when that
    /// group exists, else the daemon's own group.
    pub socket_group: Option<String>,
    /// A loopback `IP:PORT` to serve the API on as well, with the bearer token.
    pub tcp: Option<String>,
    /// The file holding the bearer token for `tcp`.
    pub token_file: Option<String>,
    /// The user that TCP callers with the token act as.
    pub tcp_uid: Option<u32>,
    /// Live jobs per user.
    pub jobs_per_user: Option<usize>,
    /// Live jobs on the machine.
    pub jobs_per_machine: Option<usize>,
    /// Files per job.
    pub files_per_job: Option<usize>,
    /// How long a FileTransferred verdict is awaited from a client, in seconds.
    pub validation_timeout_seconds: Option<f64>,
    /// The verdict when none comes in time: "valid" or "invalid".
    pub validation_default: Option<String>,
    /// JobTransferred / JobError notifications in flight per user.
    pub notifications_in_flight_per_user: Option<usize>,
    /// Jobs idle this long are cancelled (BITS JobInactivityTimeout), in seconds.
    pub inactivity_timeout_seconds: Option<f64>,
}

/// A whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`.
    #[serde(default)]
    pub node: NodeSection,
    /// `[origin]`.
    #[serde(default)]
    pub origin: OriginSection,
    /// `[scheduler]`.
    #[serde(default)]
    pub scheduler: SchedulerSection,
    /// `[jobs]`.
    #[serde(default)]
    pub jobs: JobsSection,
    /// `[daemon]`.
    #[serde(default)]
    pub daemon: DaemonSection,
    /// `[group]`.
    pub group: Option<GroupSection>,
    /// `[policy]`.
    #[serde(default)]
    pub policy: PolicySection,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[cache]`.
    #[serde(default)]
    pub cache: CacheSection,
    /// `[bandwidth]`.
    #[serde(default)]
    pub bandwidth: BandwidthSection,
}

/// A proxy setting as it may be shown in an error: without what precedes an `@`.
fn redact_user(text: &str) -> String {
    match text.rsplit_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => text.to_owned(),
    }
}

fn seconds(path: &str, key: &str, v: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(v).map_err(|_| ConfigError {
        path: path.to_owned(),
        reason: format!("{key} = {v} is not a number of seconds >= 0"),
    })
}

fn addrs(path: &str, key: &str, list: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    list.iter()
        .map(|a| {
            a.parse().map_err(|e| ConfigError {
                path: path.to_owned(),
                reason: format!("{key}: {a:?} is not a multiaddr: {e}"),
            })
        })
        .collect()
}

impl Config {
    /// Parses TOML text; `path` names the source in errors.
    ///
    /// # Errors
    /// [`ConfigError`] for bad TOML, an unknown key or a value of the wrong type.
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            path: path.to_owned(),
            reason: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &name)
    }

    /// Applies the settings to a builder; `path` names the source in errors.
    ///
    /// # Errors
    /// [`ConfigError`] for a bad multiaddr or a negative duration.
    pub fn apply(&self, mut b: Builder, path: &str) -> Result<Builder, ConfigError> {
        let n = &self.node;
        if let Some(l) = &n.listen {
            b = b.listen(addrs(path, "node.listen", l)?);
        }
        for p in addrs(path, "node.peers", n.peers.as_deref().unwrap_or_default())? {
            b = b.peer(p);
        }
        b = b.mdns(n.mdns.unwrap_or(true));
        if let Some(u) = n.max_concurrent_uploads {
            b = b.max_concurrent_uploads(u);
        }
        if let Some(u) = n.max_upload_peers {
            if u == 0 {
                return Err(ConfigError {
                    path: path.to_owned(),
                    reason: "node.max_upload_peers must be at least 1".into(),
                });
            }
            b = b.max_upload_peers(u);
        }
        b = self.apply_peers(b, path)?;
        b = b.source_policy(self.source_policy(path)?);
        b = b.bandwidth(self.bandwidth_limits(path)?);
        b = self.apply_cache_nodes_and_metrics(b, path)?;
        b = b.origin(self.origin_config(path)?);
        b = b.scheduler(self.scheduler_config(path)?);
        self.apply_jobs(b, path)
    }

    /// `[policy]`: the source policy.
    fn source_policy(&self, path: &str) -> Result<SourcePolicy, ConfigError> {
        let p = &self.policy;
        let mut policy = SourcePolicy::default();
        for (i, (key, v)) in [
            (
                "policy.origin_delay_foreground_seconds",
                p.origin_delay_foreground_seconds,
            ),
            (
                "policy.origin_delay_high_seconds",
                p.origin_delay_high_seconds,
            ),
            (
                "policy.origin_delay_normal_seconds",
                p.origin_delay_normal_seconds,
            ),
            (
                "policy.origin_delay_low_seconds",
                p.origin_delay_low_seconds,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = v {
                policy.origin_delay[i] = seconds(path, key, v)?;
            }
        }
        policy.never_origin = p.never_origin.unwrap_or(false);
        for (i, (key, v)) in [
            (
                "policy.cache_fallback_foreground_seconds",
                p.cache_fallback_foreground_seconds,
            ),
            (
                "policy.cache_fallback_background_seconds",
                p.cache_fallback_background_seconds,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = v {
                policy.cache_fallback[i] = seconds(path, key, v)?;
            }
        }
        Ok(policy)
    }

    /// `[bandwidth]`: the limits (a key set to 0 is an error: leave it out for none).
    fn bandwidth_limits(&self, path: &str) -> Result<BandwidthLimits, ConfigError> {
        let w = &self.bandwidth;
        for (key, v) in [
            (
                "bandwidth.download_foreground_bytes_per_sec",
                w.download_foreground_bytes_per_sec,
            ),
            (
                "bandwidth.download_background_bytes_per_sec",
                w.download_background_bytes_per_sec,
            ),
            ("bandwidth.upload_bytes_per_sec", w.upload_bytes_per_sec),
            (
                "bandwidth.monthly_upload_cap_bytes",
                w.monthly_upload_cap_bytes,
            ),
        ] {
            if v == Some(0) {
                return Err(ConfigError {
                    path: path.to_owned(),
                    reason: format!("{key} = 0: leave the key out for no limit"),
                });
            }
        }
        Ok(BandwidthLimits {
            download_foreground: w.download_foreground_bytes_per_sec,
            download_background: w.download_background_bytes_per_sec,
            upload: w.upload_bytes_per_sec,
            monthly_upload_cap: w.monthly_upload_cap_bytes,
        })
    }

    /// `policy.cache_nodes` and `[metrics]`.
    fn apply_cache_nodes_and_metrics(
        &self,
        mut b: Builder,
        path: &str,
    ) -> Result<Builder, ConfigError> {
        let p = &self.policy;
        for a in addrs(
            path,
            "policy.cache_nodes",
            p.cache_nodes.as_deref().unwrap_or_default(),
        )? {
            if !a
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            {
                return Err(ConfigError {
                    path: path.to_owned(),
                    reason: format!("policy.cache_nodes: {a} must end in /p2p/PEER_ID"),
                });
            }
            b = b.cache_node(a);
        }
        if let Some(l) = &self.metrics.listen {
            let addr: SocketAddr = l.parse().map_err(|e| ConfigError {
                path: path.to_owned(),
                reason: format!("metrics.listen: {l:?} is not IP:PORT: {e}"),
            })?;
            if !addr.ip().is_loopback() {
                return Err(ConfigError {
                    path: path.to_owned(),
                    reason: format!("metrics.listen: {addr} is not a loopback address"),
                });
            }
            b = b.metrics(addr);
        }
        Ok(b)
    }

    /// `[origin]`: the origin client's retries and timeouts.
    fn origin_config(&self, path: &str) -> Result<OriginConfig, ConfigError> {
        let o = &self.origin;
        let mut origin = OriginConfig::default();
        if let Some(r) = o.retries {
            origin.retries = r;
        }
        if let Some(s) = o.backoff_seconds {
            origin.backoff = seconds(path, "origin.backoff_seconds", s)?;
        }
        if let Some(s) = o.connect_timeout_seconds {
            origin.connect_timeout = seconds(path, "origin.connect_timeout_seconds", s)?;
        }
        if let Some(s) = o.read_timeout_seconds {
            origin.read_timeout = seconds(path, "origin.read_timeout_seconds", s)?;
        }
        let bypass = o.proxy_bypass.clone().unwrap_or_default();
        origin.proxy = match o.proxy.as_deref() {
            None => OriginProxy::Environment,
            Some("direct") => OriginProxy::Direct,
            Some(text) => {
                let url = url::Url::parse(text)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
                    .ok_or_else(|| ConfigError {
                        path: path.to_owned(),
                        reason: format!(
                            "origin.proxy = {:?} is not an http:// or https:// proxy URL, nor \"direct\"",
                            redact_user(text)
                        ),
                    })?;
                OriginProxy::Proxy { url, bypass }
            }
        };
        Ok(origin)
    }

    /// `[scheduler]`: the piece scheduler's limits.
    fn scheduler_config(&self, path: &str) -> Result<SchedulerConfig, ConfigError> {
        let s = &self.scheduler;
        let mut sched = SchedulerConfig::default();
        if let Some(v) = s.max_requests_per_peer {
            sched.max_per_peer = v;
        }
        if let Some(v) = s.max_requests_in_flight {
            sched.max_in_flight = v;
        }
        if let Some(v) = s.max_origin_run_pieces {
            sched.max_origin_run = v;
        }
        if let Some(v) = s.peer_attempts {
            sched.peer_attempts = v;
        }
        if let Some(v) = s.peer_backoff_seconds {
            sched.peer_backoff = seconds(path, "scheduler.peer_backoff_seconds", v)?;
        }
        Ok(sched)
    }

    /// `[jobs]` and `[daemon]`: retries, discovery, transfer slots, inactivity.
    fn apply_jobs(&self, mut b: Builder, path: &str) -> Result<Builder, ConfigError> {
        if let Some(v) = self.jobs.retry_delay_seconds {
            b = b.retry_delay(seconds(path, "jobs.retry_delay_seconds", v)?);
        }
        if let Some(v) = self.jobs.discovery_wait_seconds {
            b = b.discovery_wait(seconds(path, "jobs.discovery_wait_seconds", v)?);
        }
        if let Some(v) = self.jobs.max_active {
            if v == 0 {
                return Err(ConfigError {
                    path: path.to_owned(),
                    reason: "jobs.max_active must be at least 1".into(),
                });
            }
            b = b.max_active_jobs(v);
        }
        if let Some(v) = self.jobs.time_slice_seconds {
            b = b.time_slice(seconds(path, "jobs.time_slice_seconds", v)?);
        }
        if let Some(v) = self.daemon.inactivity_timeout_seconds {
            b = b.inactivity_timeout(seconds(path, "daemon.inactivity_timeout_seconds", v)?);
        }
        Ok(b)
    }

    /// The peer mode, group and DHT settings.
    fn apply_peers(&self, mut b: Builder, path: &str) -> Result<Builder, ConfigError> {
        let n = &self.node;
        let bad = |reason: String| ConfigError {
            path: path.to_owned(),
            reason,
        };
        let mode: PeerMode = match &n.mode {
            Some(m) => m.parse().map_err(|e| bad(format!("node.mode: {e}")))?,
            None => PeerMode::default(),
        };
        b = b.mode(mode);
        let group = match &self.group {
            None => None,
            Some(g) => Some(self.group_of(g, path)?),
        };
        match (mode, &group) {
            (PeerMode::Group, None) => {
                return Err(bad(
                    "node.mode = \"group\" needs a [group] section with a name and a secret".into(),
                ));
            }
            (PeerMode::Internet, Some(_)) => {
                return Err(bad(
                    "node.mode = \"internet\" with a [group]: a grouped node reaches only its \
                     group; use mode = \"group\""
                        .into(),
                ));
            }
            _ => {}
        }
        if let Some(g) = group {
            for a in addrs(path, "node.listen", n.listen.as_deref().unwrap_or_default())? {
                if !crate::swarm::is_tcp(&a) {
                    return Err(bad(format!(
                        "node.listen: {a} is not TCP; a grouped node runs TCP only (pnet)"
                    )));
                }
            }
            b = b.group(g);
        }
        let boot = addrs(
            path,
            "node.bootstrap",
            n.bootstrap.as_deref().unwrap_or_default(),
        )?;
        if !boot.is_empty() && !mode.uses_dht() {
            return Err(bad(format!(
                "node.bootstrap is used only with node.mode = \"group\" or \"internet\", not \"{mode}\""
            )));
        }
        for a in boot {
            if !a
                .iter()
                .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            {
                return Err(bad(format!("node.bootstrap: {a} must end in /p2p/PEER_ID")));
            }
            b = b.bootstrap(a);
        }
        let defaults = crate::swarm::Config::default();
        let ttl = match n.provider_ttl_seconds {
            Some(v) => seconds(path, "node.provider_ttl_seconds", v)?,
            None => defaults.provider_ttl,
        };
        let republish = match n.provider_republish_seconds {
            Some(v) => seconds(path, "node.provider_republish_seconds", v)?,
            None => defaults.provider_republish,
        };
        if republish.is_zero() || republish >= ttl {
            return Err(bad(format!(
                "node.provider_republish_seconds ({}) must be above 0 and below \
                 node.provider_ttl_seconds ({})",
                republish.as_secs_f64(),
                ttl.as_secs_f64()
            )));
        }
        Ok(b.provider_records(ttl, republish))
    }

    fn group_of(&self, g: &GroupSection, path: &str) -> Result<Group, ConfigError> {
        let bad = |reason: String| ConfigError {
            path: path.to_owned(),
            reason,
        };
        let name = g
            .name
            .as_deref()
            .ok_or_else(|| bad("group.name is missing".into()))?;
        let secret = match (&g.secret, &g.secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map_err(|e| bad(format!("group.secret_file: {f}: {e}")))?
                .trim_end()
                .to_owned(),
            _ => {
                return Err(bad(
                    "[group] needs exactly one of group.secret and group.secret_file".into(),
                ));
            }
        };
        Group::new(name, secret.as_bytes()).map_err(|e| bad(format!("[group]: {e}")))
    }

    /// The daemon's cache settings from `[cache]`, `None` with `enabled = false`; `path`
    /// names the source in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key for a percentage outside 0–100 or a bad duration.
    pub fn cache(
        &self,
        path: &str,
    ) -> Result<Option<crate::store::cache::CacheConfig>, ConfigError> {
        let c = &self.cache;
        if c.enabled == Some(false) {
            return Ok(None);
        }
        let mut config = crate::store::cache::CacheConfig {
            dir: c.dir.as_ref().map(PathBuf::from),
            ..crate::store::cache::CacheConfig::default()
        };
        if let Some(b) = c.max_size_bytes {
            config.max_size_bytes = Some(b);
        }
        if let Some(p) = c.max_size_percent {
            if !(0.0..=100.0).contains(&p) {
                return Err(ConfigError {
                    path: path.to_owned(),
                    reason: format!("cache.max_size_percent = {p} is not between 0 and 100"),
                });
            }
            config.max_size_percent = Some(p);
        }
        if let Some(v) = c.max_age_seconds {
            config.max_age = seconds(path, "cache.max_age_seconds", v)?;
        }
        if let Some(v) = c.min_file_size_bytes {
            config.min_file_size = v;
        }
        Ok(Some(config))
    }

    /// The daemon's cache node role from `[cache]`, `None` unless `node = true`; `path`
    /// names the source in errors.
    ///
    /// # Errors
    /// [`ConfigError`] for `node = true` with the cache disabled, a fill limit of 0, or an
    /// origin prefix that is not an `http`/`https` URL.
    pub fn cache_node_role(
        &self,
        path: &str,
    ) -> Result<Option<crate::store::fill::CacheNodeRole>, ConfigError> {
        let c = &self.cache;
        let bad = |reason: String| ConfigError {
            path: path.to_owned(),
            reason,
        };
        if c.node != Some(true) {
            return Ok(None);
        }
        if c.enabled == Some(false) {
            return Err(bad(
                "cache.node = true needs the cache (cache.enabled = false)".into(),
            ));
        }
        let mut role = crate::store::fill::CacheNodeRole::default();
        if let Some(n) = c.node_max_fills {
            if n == 0 {
                return Err(bad("cache.node_max_fills must be at least 1".into()));
            }
            role.max_fills = n;
        }
        for o in c.node_origins.as_deref().unwrap_or_default() {
            match url::Url::parse(o) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => role.origins.push(o.clone()),
                _ => {
                    return Err(bad(format!(
                        "cache.node_origins: {o:?} is not an http or https URL prefix"
                    )));
                }
            }
        }
        Ok(Some(role))
    }

    /// The daemon's state directory: `[daemon] state_dir`, default
    /// [`crate::daemon::DEFAULT_STATE_DIR`].
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(
            self.daemon
                .state_dir
                .as_deref()
                .unwrap_or(crate::daemon::DEFAULT_STATE_DIR),
        )
    }

    /// The daemon's settings; `path` names the source in errors.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key for a bad socket mode, TCP address, verdict or duration.
    pub fn daemon(&self, path: &str) -> Result<DaemonConfig, ConfigError> {
        let d = &self.daemon;
        let bad = |key: &str, why: String| ConfigError {
            path: path.to_owned(),
            reason: format!("daemon.{key}: {why}"),
        };
        let mut c = DaemonConfig::default();
        if let Some(s) = &d.socket {
            c.socket = PathBuf::from(s);
        }
        if let Some(m) = &d.socket_mode {
            c.socket_mode = u32::from_str_radix(m.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    bad(
                        "socket_mode",
                        format!("{m:?} is not octal permission bits like \"0660\""),
                    )
                })?;
        }
        c.socket_group = match &d.socket_group {
            Some(name) => Some(crate::store::fsuser::group_id(name).ok_or_else(|| {
                bad(
                    "socket_group",
                    format!("there is no group {name:?} on this machine"),
                )
            })?),
            None => crate::store::fsuser::group_id(DEFAULT_SOCKET_GROUP),
        };
        if let Some(t) = &d.tcp {
            let addr: SocketAddr = t
                .parse()
                .map_err(|e| bad("tcp", format!("{t:?} is not IP:PORT: {e}")))?;
            if !addr.ip().is_loopback() {
                return Err(bad("tcp", format!("{addr} is not a loopback address")));
            }
            c.tcp = Some(addr);
            if d.token_file.is_none() {
                return Err(bad("token_file", "required with daemon.tcp".into()));
            }
        }
        c.token_file = d.token_file.as_ref().map(PathBuf::from);
        if let Some(u) = d.tcp_uid {
            c.tcp_uid = u;
        }
        if let Some(v) = d.jobs_per_user {
            c.limits.jobs_per_user = v;
        }
        if let Some(v) = d.jobs_per_machine {
            c.limits.jobs_per_machine = v;
        }
        if let Some(v) = d.files_per_job {
            c.limits.files_per_job = v;
        }
        if let Some(v) = d.validation_timeout_seconds {
            c.notify.validation_timeout = seconds(path, "daemon.validation_timeout_seconds", v)?;
        }
        if let Some(v) = &d.validation_default {
            c.notify.validation_default = match v.as_str() {
                "valid" => ValidationState::Valid,
                "invalid" => ValidationState::Invalid,
                other => {
                    return Err(bad(
                        "validation_default",
                        format!("{other:?} is neither \"valid\" nor \"invalid\""),
                    ));
                }
            };
        }
        if let Some(v) = d.notifications_in_flight_per_user {
            if !(1..=1024).contains(&v) {
                return Err(bad(
                    "notifications_in_flight_per_user",
                    format!("{v} is not between 1 and 1024"),
                ));
            }
            c.notify.in_flight_per_user = v;
        }
        Ok(c)
    }
}

/// The group the daemon's socket belongs to when the configuration names none, if it exists
/// (the Debian package creates it, with apt's `_apt` in it).
pub const DEFAULT_SOCKET_GROUP: &str = "shoal";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_config_parses_and_applies() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = Config::load(&path).unwrap();
                c.apply(crate::Node::builder(), &path.display().to_string())
                    .unwrap();
                c.daemon(&path.display().to_string()).unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 1, "no example configs in {}", dir.display());
    }

    #[test]
    fn the_origin_proxy_is_the_environment_direct_or_a_url_and_a_bad_one_is_named() {
        let proxy = |text: &str| {
            Config::parse(text, "x.toml")
                .and_then(|c| c.origin_config("x.toml"))
                .map(|o| o.proxy)
        };
        assert_eq!(proxy("").unwrap(), OriginProxy::Environment);
        assert_eq!(
            proxy("[origin]\nproxy = \"direct\"\n").unwrap(),
            OriginProxy::Direct
        );
        assert_eq!(
            proxy("[origin]\nproxy = \"http://p.lan:3128\"\nproxy_bypass = [\"mirror.lan\"]\n")
                .unwrap(),
            OriginProxy::Proxy {
                url: "http://p.lan:3128".parse().unwrap(),
                bypass: vec!["mirror.lan".into()],
            }
        );
        let e = proxy("[origin]\nproxy = \"socks5://u:secret@p.lan\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("origin.proxy") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn mdns_is_on_unless_the_file_turns_it_off() {
        let on = |text: &str| {
            Config::parse(text, "x.toml")
                .unwrap()
                .apply(crate::Node::builder(), "x.toml")
                .unwrap()
                .mdns_on()
        };
        assert!(on(""));
        assert!(on("[node]\nmode = \"lan\"\n"));
        assert!(on("[node]\nmdns = true\n"));
        assert!(!on("[node]\nmdns = false\n"));
        // The library's own default stays off: an embedding agent chooses.
        assert!(!crate::Node::builder().mdns_on());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_file() {
        let e = Config::parse("[node]\nmdsn = true\n", "x.toml").unwrap_err();
        assert!(e.to_string().starts_with("x.toml: "), "{e}");
        assert!(e.to_string().contains("mdsn"), "{e}");
        let e = Config::parse("[nodes]\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("nodes"), "{e}");
        let e = Config::parse("[origin]\nretries = \"five\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("retries"), "{e}");
        let c = Config::parse("[node]\nlisten = [\"/ip4/nope\"]\n", "x.toml").unwrap();
        let e = c.apply(crate::Node::builder(), "x.toml").unwrap_err();
        assert!(e.to_string().contains("node.listen"), "{e}");
        let c = Config::parse("[jobs]\nretry_delay_seconds = -1.0\n", "x.toml").unwrap();
        let e = c.apply(crate::Node::builder(), "x.toml").unwrap_err();
        assert!(e.to_string().contains("jobs.retry_delay_seconds"), "{e}");
        for (text, key) in [
            (
                "[daemon]\ntcp = \"0.0.0.0:7788\"\ntoken_file = \"t\"\n",
                "daemon.tcp",
            ),
            ("[daemon]\ntcp = \"127.0.0.1:7788\"\n", "daemon.token_file"),
            ("[daemon]\nsocket_mode = \"0999\"\n", "daemon.socket_mode"),
            (
                "[daemon]\nsocket_group = \"no-such-group-here\"\n",
                "daemon.socket_group",
            ),
            (
                "[daemon]\nvalidation_default = \"maybe\"\n",
                "daemon.validation_default",
            ),
        ] {
            let c = Config::parse(text, "x.toml").unwrap();
            let e = c.daemon("x.toml").unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        // A group that exists (every machine has `root`, id 0).
        let c = Config::parse("[daemon]\nsocket_group = \"root\"\n", "x.toml").unwrap();
        assert_eq!(c.daemon("x.toml").unwrap().socket_group, Some(0));
        let e = Config::parse("[daemon]\nsocket_path = \"/x\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("socket_path"), "{e}");
    }

    #[test]
    fn peer_modes_groups_and_bootstrap_peers_are_checked() {
        let group = "[group]\nname = \"lab\"\nsecret = \"0123456789abcdef0123\"\n";
        let boot =
            "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
        let ok = |text: &str| {
            let c = Config::parse(text, "x.toml").unwrap();
            c.apply(crate::Node::builder(), "x.toml").unwrap();
        };
        ok(&format!(
            "[node]\nmode = \"group\"\nbootstrap = [\"{boot}\"]\n{group}"
        ));
        ok(&format!(
            "[node]\nmode = \"internet\"\nbootstrap = [\"{boot}\"]\n"
        ));
        ok("[node]\nmode = \"origin\"\n");
        ok(&format!("[node]\nmode = \"lan\"\n{group}"));
        for (text, says) in [
            ("[node]\nmode = \"cloud\"\n".to_owned(), "node.mode"),
            ("[node]\nmode = \"group\"\n".to_owned(), "[group]"),
            (
                format!("[node]\nmode = \"internet\"\n{group}"),
                "node.mode = \"internet\"",
            ),
            (
                format!("[node]\nbootstrap = [\"{boot}\"]\n"),
                "node.bootstrap",
            ),
            (
                "[node]\nmode = \"internet\"\nbootstrap = [\"/ip4/127.0.0.1/tcp/1\"]\n".to_owned(),
                "/p2p/PEER_ID",
            ),
            (
                format!("[node]\nlisten = [\"/ip4/0.0.0.0/udp/0/quic-v1\"]\n{group}"),
                "TCP only",
            ),
            ("[group]\nname = \"lab\"\n".to_owned(), "group.secret"),
            (
                "[group]\nname = \"a b\"\nsecret = \"0123456789abcdef0123\"\n".to_owned(),
                "group name",
            ),
            (
                "[group]\nname = \"lab\"\nsecret = \"short\"\n".to_owned(),
                "at least 16",
            ),
            (
                "[group]\nname = \"lab\"\nsecret_file = \"/nonexistent/secret\"\n".to_owned(),
                "group.secret_file",
            ),
            (
                "[node]\nprovider_ttl_seconds = 60.0\nprovider_republish_seconds = 60.0\n"
                    .to_owned(),
                "node.provider_republish_seconds",
            ),
        ] {
            let c = Config::parse(&text, "x.toml").unwrap();
            let e = c.apply(crate::Node::builder(), "x.toml").unwrap_err();
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn cache_and_cache_node_settings_are_checked() {
        let c = Config::parse(
            "[cache]\nmax_size_percent = 5.0\nmax_age_seconds = 60.0\nmin_file_size_bytes = 0\n\
             node = true\nnode_origins = [\"https://deb.example.org/\"]\n",
            "x.toml",
        )
        .unwrap();
        let cache = c.cache("x.toml").unwrap().unwrap();
        assert_eq!(cache.max_size_percent, Some(5.0));
        assert_eq!(cache.max_age, Duration::from_secs(60));
        assert_eq!(cache.min_file_size, 0);
        let role = c.cache_node_role("x.toml").unwrap().unwrap();
        assert_eq!(role.origins, vec!["https://deb.example.org/".to_owned()]);
        assert_eq!(role.max_fills, 8);
        // Defaults: DO's; no cache node.
        let d = Config::default();
        assert_eq!(
            d.cache("x").unwrap(),
            Some(crate::store::cache::CacheConfig::default())
        );
        assert_eq!(d.cache_node_role("x").unwrap(), None);
        let off = Config::parse("[cache]\nenabled = false\n", "x.toml").unwrap();
        assert_eq!(off.cache("x.toml").unwrap(), None);
        for (text, says) in [
            (
                "[cache]\nmax_size_percent = 150.0\n",
                "cache.max_size_percent",
            ),
            ("[cache]\nmax_age_seconds = -1.0\n", "cache.max_age_seconds"),
            ("[cache]\nenabled = false\nnode = true\n", "cache.node"),
            (
                "[cache]\nnode = true\nnode_origins = [\"ftp://x/\"]\n",
                "cache.node_origins",
            ),
            (
                "[cache]\nnode = true\nnode_max_fills = 0\n",
                "node_max_fills",
            ),
        ] {
            let c = Config::parse(text, "x.toml").unwrap();
            let e = c
                .cache("x.toml")
                .and_then(|_| c.cache_node_role("x.toml"))
                .unwrap_err();
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
        let c = Config::parse(
            "[policy]\ncache_nodes = [\"/ip4/127.0.0.1/tcp/1\"]\n",
            "x.toml",
        )
        .unwrap();
        let e = c.apply(crate::Node::builder(), "x.toml").unwrap_err();
        assert!(e.to_string().contains("policy.cache_nodes"), "{e}");
        let c = Config::parse(
            "[policy]\ncache_fallback_background_seconds = 5.0\n",
            "x.toml",
        );
        assert!(c.unwrap().apply(crate::Node::builder(), "x.toml").is_ok());
    }
}
