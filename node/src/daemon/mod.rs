//! The daemon: one long-lived [`Node`] with a state directory, serving the gRPC control API
//! (`node/proto/control.proto`) on a Unix domain socket, and optionally on a loopback TCP port
//! with a bearer token.
//!
//! Who calls: on the Unix socket, the peer credentials the kernel reports for the connection
//! (`SO_PEERCRED`); on TCP, a caller presenting the token acts as the configured user
//! ([`DaemonConfig::tcp_uid`], root by default, as the token file is readable only by whoever
//! the administrator allows). Jobs belong to their creator; see [`Caller::may_see`].

pub mod control;

mod convert;
mod hub;
mod service;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

pub use hub::{Hub, NotifyConfig};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{
    Status,
    metadata::MetadataMap,
    service::Interceptor,
    transport::{Server, server::UdsConnectInfo},
};
use tracing::info;

use crate::{Node, daemon::control::control_server::ControlServer};

/// Errors of starting or running the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The Unix socket could not be bound or given its mode.
    #[error("cannot serve on {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The TCP address is not loopback, or the token file is missing or empty.
    #[error("{0}")]
    Tcp(String),
    /// The gRPC server failed.
    #[error("control API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Per-user and per-machine limits (BITS: 60 jobs per user, 300 per machine, 200 files per job).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Live (not Acknowledged or Cancelled) jobs one user may have.
    pub jobs_per_user: usize,
    /// Live jobs on the machine.
    pub jobs_per_machine: usize,
    /// Files one job may have.
    pub files_per_job: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            jobs_per_user: 60,
            jobs_per_machine: 300,
            files_per_job: 200,
        }
    }
}

/// The daemon's settings (the `[daemon]` section of the configuration file).
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The Unix socket of the control API (default `/run/shoal/shoal.sock`).
    pub socket: PathBuf,
    /// The socket's permission bits (default 0o660: the owner and the group may call).
    pub socket_mode: u32,
    /// The group id the socket is given (`None`: the daemon's own group). The configuration
    /// file's `socket_group` (default `shoal` when that group exists).
    pub socket_group: Option<u32>,
    /// A loopback TCP address to serve the API on as well, with a bearer token.
    pub tcp: Option<SocketAddr>,
    /// The file holding the bearer token (required with `tcp`); surrounding whitespace is
    /// ignored.
    pub token_file: Option<PathBuf>,
    /// The user that callers with the token act as (default 0, root).
    pub tcp_uid: u32,
    /// Job and file limits.
    pub limits: Limits,
    /// Notification delivery.
    pub notify: NotifyConfig,
    /// How often Progress events go to clients that asked for them (default 500 ms).
    pub progress_period: Duration,
}

/// The default socket path.
pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/shoal";

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o660,
            socket_group: None,
            tcp: None,
            token_file: None,
            tcp_uid: 0,
            limits: Limits::default(),
            notify: NotifyConfig::default(),
            progress_period: Duration::from_millis(500),
        }
    }
}

/// A caller of the API: a Unix user id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The user id.
    pub uid: u32,
}

impl Caller {
    /// Whether the caller may see and change a job owned by `owner`: its owner, and root
    /// (BITS administrators). Jobs without an owner (made through the library) are root's.
    #[must_use]
    pub fn may_see(&self, owner: Option<u32>) -> bool {
        self.uid == 0 || owner == Some(self.uid)
    }
}

/// Where the caller's identity comes from.
pub trait Credentials: Send + Sync + 'static {
    /// The caller of a request, from its metadata and connection extensions; `None` refuses
    /// the request (UNAUTHENTICATED).
    fn caller(&self, metadata: &MetadataMap, extensions: &tonic::Extensions) -> Option<Caller>;
}

/// The real source: the Unix socket's peer credentials, or the token user on TCP.
#[derive(Clone, Copy, Debug)]
pub struct PeerCredentials {
    /// The user that TCP callers with the token act as.
    pub tcp_uid: u32,
}

impl Credentials for PeerCredentials {
    fn caller(&self, _: &MetadataMap, extensions: &tonic::Extensions) -> Option<Caller> {
        if let Some(info) = extensions.get::<UdsConnectInfo>() {
            return info.peer_cred.map(|c| Caller { uid: c.uid() });
        }
        // Only the TCP server, which checks the token first, has TCP connections.
        extensions
            .get::<tonic::transport::server::TcpConnectInfo>()
            .map(|_| Caller { uid: self.tcp_uid })
    }
}

/// Checks `authorization: Bearer TOKEN` on the TCP server.
#[derive(Clone)]
struct BearerToken(Arc<str>);

impl Interceptor for BearerToken {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compare every byte, so the time taken does not tell how much matched.
        let want = self.0.as_bytes();
        let same = given.len() == want.len()
            && given
                .bytes()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// The daemon: a node and its control API.
pub struct Daemon {
    node: Node,
    hub: Arc<Hub>,
    config: DaemonConfig,
    credentials: Arc<dyn Credentials>,
    /// Per caller: how often Status and Diagnose (which ask the peers and the DHT) may run.
    probes: Arc<governor::DefaultKeyedRateLimiter<u32>>,
}

/// Status and Diagnose calls one user may make: a burst of 10, then 1 a second.
fn probe_quota() -> governor::Quota {
    governor::Quota::per_second(std::num::NonZeroU32::MIN)
        .allow_burst(std::num::NonZeroU32::new(10).unwrap_or(std::num::NonZeroU32::MIN))
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Builds the daemon's node from `builder` (which should carry a state directory), giving
    /// every job the daemon's notification callback.
    ///
    /// # Errors
    /// What [`crate::Builder::build`] returns; [`crate::Error::Impersonation`] when it runs as
    /// root without the capabilities to act as its users; [`crate::Error::Io`] when another
    /// daemon answers on the socket.
    pub async fn start(
        builder: crate::Builder,
        config: DaemonConfig,
    ) -> Result<Self, crate::Error> {
        crate::store::fsuser::check_impersonation().map_err(crate::Error::Impersonation)?;
        // A second daemon on a busy socket stops here, before it builds a node or says it
        // serves anything.
        if std::os::unix::net::UnixStream::connect(&config.socket).is_ok() {
            return Err(crate::Error::Io {
                path: config.socket.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another Shoal daemon is serving on this socket",
                ),
            });
        }
        let hub = Hub::new(config.notify.clone());
        let h = hub.clone();
        let node = builder
            .callbacks(Arc::new(move |_| {
                Some(Arc::new(hub::JobCallback { hub: h.clone() }) as Arc<dyn crate::Callback>)
            }))
            .build()
            .await?;
        tokio::spawn(service::forward_progress(
            node.clone(),
            hub.clone(),
            config.progress_period,
        ));
        Ok(Self {
            node,
            hub,
            credentials: Arc::new(PeerCredentials {
                tcp_uid: config.tcp_uid,
            }),
            config,
            probes: Arc::new(governor::RateLimiter::keyed(probe_quota())),
        })
    }

    /// Replaces where callers' identities come from. For tests that cannot run a second Unix
    /// user: an injected source stands in for the socket's peer credentials.
    #[must_use]
    pub fn with_credentials(mut self, credentials: Arc<dyn Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// The daemon's node.
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.node
    }

    fn service(&self) -> service::Service {
        service::Service {
            node: self.node.clone(),
            hub: self.hub.clone(),
            credentials: self.credentials.clone(),
            limits: self.config.limits,
            probes: self.probes.clone(),
        }
    }

    /// Serves the API on the Unix socket (and TCP, if configured) until `shutdown` resolves,
    /// then stops the node.
    ///
    /// # Errors
    /// [`DaemonError::Socket`] when the socket cannot be bound (its directory is created with
    /// mode 0755 if missing; a stale socket file is replaced), [`DaemonError::Tcp`] for a
    /// non-loopback address or a missing token, [`DaemonError::Serve`].
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), DaemonError> {
        let listener = bind_socket(
            &self.config.socket,
            self.config.socket_mode,
            self.config.socket_group,
        )?;
        info!(socket = %self.config.socket.display(), "control API listening");
        let stop = tokio_util::sync::CancellationToken::new();
        let tcp = match self.config.tcp {
            None => None,
            Some(addr) => {
                if !addr.ip().is_loopback() {
                    return Err(DaemonError::Tcp(format!(
                        "daemon.tcp {addr}: only loopback addresses are allowed"
                    )));
                }
                let token = read_token(self.config.token_file.as_deref())?;
                let svc =
                    ControlServer::with_interceptor(self.service(), BearerToken(token.into()));
                let stop = stop.clone();
                info!(%addr, "control API listening on TCP");
                Some(tokio::spawn(
                    Server::builder()
                        .add_service(svc)
                        .serve_with_shutdown(addr, async move { stop.cancelled().await }),
                ))
            }
        };
        let hub = self.hub.clone();
        let stopping = stop.clone();
        let uds = Server::builder()
            .add_service(ControlServer::new(self.service()))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                shutdown.await;
                stopping.cancel();
                // Watch streams end, so the graceful stop has nothing left to wait for.
                hub.close_all();
            });
        let result = uds.await;
        stop.cancel();
        if let Some(t) = tcp {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.config.socket);
        self.node.shutdown().await;
        result.map_err(DaemonError::from)
    }
}

fn bind_socket(path: &Path, mode: u32, group: Option<u32>) -> Result<UnixListener, DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| DaemonError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err)?;
    }
    // A socket left by a daemon that died; a live daemon answers, and then we stop.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another daemon is serving on this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// The shortest bearer token accepted, in bytes.
const MIN_TOKEN_LEN: usize = 16;

/// Reads the bearer token: a regular file (not through a symlink) of the daemon's user, mode
/// 0600 or stricter, holding at least [`MIN_TOKEN_LEN`] bytes (surrounding whitespace
/// trimmed; at most 4 KiB read).
fn read_token(path: Option<&Path>) -> Result<String, DaemonError> {
    let path = path.ok_or_else(|| {
        DaemonError::Tcp("daemon.tcp needs daemon.token_file (the bearer token)".into())
    })?;
    use std::os::unix::fs::MetadataExt as _;
    let bad =
        |what: String| DaemonError::Tcp(format!("daemon.token_file {}: {what}", path.display()));
    let file = crate::store::fsuser::open_regular(path, None).map_err(|e| bad(e.to_string()))?;
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    // SAFETY: `geteuid` has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "must belong to the daemon's user ({me}) and be readable by it alone (mode 0600); \
             it is owned by {} with mode {:o}",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let mut token = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(&file, 4096), &mut token)
        .map_err(|e| bad(e.to_string()))?;
    let token = token.trim().to_owned();
    if token.len() < MIN_TOKEN_LEN {
        return Err(bad(format!(
            "the token must be at least {MIN_TOKEN_LEN} characters (it is {})",
            token.len()
        )));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_others_can_read_or_a_short_token_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("mode 0600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(Some(&path)).unwrap(), "0123456789abcdef");
        std::fs::write(&path, "short\n").unwrap();
        let e = read_token(Some(&path)).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(read_token(Some(&link)).is_err());
    }
}
