//! The `shoal+http` and `shoal+https` acquire method: reads apt's messages, fetches each file,
//! answers.
//!
//! - A file apt gives an `Expected-SHA256` for (every `.deb`, by-hash indexes) becomes a
//!   Foreground job of one file in the local Shoal daemon ([`Settings::socket`]), so that it
//!   comes from LAN peers, cache nodes and the origin under Shoal's verification and stays in
//!   the daemon's cache for the next machine. One job per file, not per apt run: apt sends its
//!   requests one at a time as its queue drains, and takes each file as soon as it is done,
//!   where a job's files appear only when the whole job completes (BITS `Complete`). When no
//!   daemon answers, the files go through a node in this process, after one `104 Warning`;
//!   `Acquire::shoal::Fallback "fail"` makes that a failure instead. The job uses apt's proxy
//!   for the URL (`Acquire::http::Proxy` and its per-host forms, `DIRECT`, else the method's
//!   `http_proxy`/`https_proxy`), as the job's proxy override (BITS `SetProxySettings`);
//!   without one, the daemon's own setting.
//! - A file without one (`InRelease`, `Release`) comes from the origin, as apt's own `http`
//!   method would fetch it: `If-Modified-Since` from apt's `Last-Modified`, `IMS-Hit` on
//!   `304`, `Maximum-Size` enforced.
//!
//! Every `201 URI Done` carries the SHA-256 (and the SHA-512 when apt expects one) of the
//! bytes at `Filename`, computed there after the file is in place: apt trusts the hashes a
//! method reports. A file whose content does not match is never reported done, and is not
//! left at `Filename`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sha2::{Digest, Sha256, Sha512};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt},
    sync::{OnceCell, Semaphore, mpsc},
    task::JoinSet,
};
use url::Url;

use super::{Acquire, Message, MessageReader, capabilities, done, failure};
use crate::{
    Expected, FileSpec, Node, Priority,
    daemon::control::{self as pb, control_client::ControlClient},
};

/// The most files fetched at once: apt's default `Acquire::Max-Pipeline-Depth`.
const MAX_AT_ONCE: usize = 10;
/// Messages waiting for apt to read them.
const OUT_QUEUE: usize = 64;
/// How often a job in the daemon is looked at, and progress told to apt.
const POLL: Duration = Duration::from_millis(200);

/// What apt's configuration (`601 Configuration`) says that the method uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `Acquire::shoal::Socket`: the daemon's control socket (default
    /// [`crate::daemon::DEFAULT_SOCKET`]).
    pub socket: PathBuf,
    /// `Acquire::shoal::Fallback`: `true` (the default, any value but `fail`) fetches through
    /// a node in the method's process when no daemon answers.
    pub fallback: bool,
    /// `Acquire::shoal::Config`: the Shoal configuration of the node in the method's process
    /// when no daemon answers (default `/etc/shoal/shoal.toml`; the node's defaults when that
    /// file does not exist).
    pub config: PathBuf,
    /// `APT::Sandbox::User` (default `_apt`): the user the method runs as once it has read its
    /// configuration, when apt started it as root.
    pub sandbox_user: String,
    /// `Acquire::http::Timeout` / `Acquire::https::Timeout` (default 30 s): connecting to the
    /// origin, and a job without progress for this long fails as a transient failure.
    pub timeout: Duration,
    /// `Acquire::http::Proxy` / `Acquire::https::Proxy`, with the per-host forms: read by
    /// [`Settings::proxy_for`].
    items: HashMap<String, String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(crate::daemon::DEFAULT_SOCKET),
            fallback: true,
            config: PathBuf::from("/etc/shoal/shoal.toml"),
            sandbox_user: "_apt".into(),
            timeout: Duration::from_secs(30),
            items: HashMap::new(),
        }
    }
}

impl Settings {
    /// Reads the `Config-Item: key=value` lines of a `601 Configuration` (keys compare
    /// without regard to case, as apt's do).
    #[must_use]
    pub fn from_message(m: &Message) -> Self {
        let items: HashMap<String, String> = m
            .all("Config-Item")
            .filter_map(|i| i.split_once('='))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
            .collect();
        let get = |k: &str| items.get(&k.to_ascii_lowercase()).map(String::as_str);
        let d = Self::default();
        Self {
            socket: get("Acquire::shoal::Socket").map_or(d.socket, PathBuf::from),
            fallback: get("Acquire::shoal::Fallback").is_none_or(|v| v != "fail"),
            config: get("Acquire::shoal::Config").map_or(d.config, PathBuf::from),
            sandbox_user: get("APT::Sandbox::User")
                .filter(|u| !u.is_empty())
                .map_or(d.sandbox_user, str::to_owned),
            timeout: get("Acquire::https::Timeout")
                .or_else(|| get("Acquire::http::Timeout"))
                .and_then(|v| v.parse().ok())
                .map_or(d.timeout, Duration::from_secs),
            items,
        }
    }

    /// The proxy for `url` in apt's order: the request's own `Proxy` field, then
    /// `Acquire::SCHEME::Proxy::HOST`, then `Acquire::SCHEME::Proxy`, then the environment's
    /// `http_proxy`/`https_proxy` (reqwest's default). `Some(None)`: no proxy (`DIRECT`).
    #[must_use]
    pub fn proxy_for(&self, url: &Url, from_request: Option<&str>) -> Option<Option<String>> {
        let host = url.host_str().unwrap_or("");
        let scheme = url.scheme();
        let value = from_request
            .map(str::to_owned)
            .or_else(|| {
                self.items
                    .get(&format!("acquire::{scheme}::proxy::{host}").to_ascii_lowercase())
                    .cloned()
            })
            .or_else(|| {
                self.items
                    .get(&format!("acquire::{scheme}::proxy"))
                    .cloned()
            })?;
        Some((!value.is_empty() && !value.eq_ignore_ascii_case("DIRECT")).then_some(value))
    }
}

/// The proxy usage of the job that fetches a hashed file, as apt would reach `url`: apt's
/// proxy ([`Settings::proxy_for`]: `DIRECT` is no proxy), else the method's own
/// `https_proxy`/`http_proxy` (with `no_proxy` as the bypass list), else `None`: the node's
/// setting (BITS's preconfig).
///
/// # Errors
/// A failure naming the proxy when it is not an http:// or https:// URL.
fn job_proxy(
    settings: &Settings,
    url: &Url,
    from_request: Option<&str>,
) -> Result<Option<crate::job::ProxyUsage>, Failed> {
    use crate::job::ProxyUsage;
    let env = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
    };
    let (proxy, bypass) = match settings.proxy_for(url, from_request) {
        Some(None) => return Ok(Some(ProxyUsage::NoProxy)),
        Some(Some(p)) => (p, Vec::new()),
        None => {
            let names: &[&str] = if url.scheme() == "https" {
                &["https_proxy", "HTTPS_PROXY"]
            } else {
                &["http_proxy"]
            };
            let Some(p) = env(names) else {
                return Ok(None);
            };
            let bypass = env(&["no_proxy", "NO_PROXY"])
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|b| !b.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            (p, bypass)
        }
    };
    let proxy = Url::parse(&proxy)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| Failed::new(format!("bad proxy {proxy:?} for {url}"), "", false))?;
    Ok(Some(ProxyUsage::Override {
        proxies: vec![proxy],
        bypass,
    }))
}

/// Where hashed files go: the daemon, a node in this process, or nowhere (no daemon and no
/// fallback).
enum Fetcher {
    Daemon(ControlClient<tonic::transport::Channel>),
    Embedded(Node),
    None(String),
}

/// Shared by the method's tasks.
struct Shared {
    out: mpsc::Sender<Message>,
    settings: Settings,
    fetcher: OnceCell<Fetcher>,
    privileges: OnceCell<Result<(), String>>,
    http: reqwest::Client,
}

/// Runs the method over `input` (apt's messages) and `output` (the answers) until apt closes
/// `input` and every file asked for is answered.
///
/// # Errors
/// A message apt sent that is not a message: it is answered with `401 General Failure` first
/// (apt then stops the method). I/O errors on `output`.
pub async fn run<R, W>(input: R, output: W) -> Result<(), super::AptError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Bounded: when apt stops reading, answers wait and progress reports are dropped.
    let (out, mut rx) = mpsc::channel::<Message>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        let mut output = output;
        while let Some(m) = rx.recv().await {
            if output.write_all(m.encode().as_bytes()).await.is_err()
                || output.flush().await.is_err()
            {
                break;
            }
        }
    });
    let _ = out.send(capabilities(env!("CARGO_PKG_VERSION"))).await;
    let mut lines = input.lines();
    let mut reader = MessageReader::new();
    let mut settings = Settings::default();
    let mut shared: Option<Arc<Shared>> = None;
    let gate = Arc::new(Semaphore::new(MAX_AT_ONCE));
    let mut tasks = JoinSet::new();
    let mut result = Ok(());
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                result = Err(super::AptError::BadStatusLine {
                    line: format!("unreadable input: {e}"),
                });
                let _ = out
                    .send(general_failure(&format!("cannot read from apt: {e}")))
                    .await;
                break;
            }
        };
        let msg = match reader.push_line(&line) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(e) => {
                let _ = out.send(general_failure(&e.to_string())).await;
                result = Err(e);
                break;
            }
        };
        match msg.code {
            601 => settings = Settings::from_message(&msg),
            600 => {
                let shared = shared
                    .get_or_insert_with(|| {
                        Arc::new(Shared {
                            out: out.clone(),
                            settings: settings.clone(),
                            fetcher: OnceCell::new(),
                            privileges: OnceCell::new(),
                            http: http_client(&settings, None).unwrap_or_default(),
                        })
                    })
                    .clone();
                let acq = match Acquire::from_message(&msg) {
                    Ok(a) => a,
                    Err(e) => {
                        match msg.get("URI") {
                            Some(uri) => {
                                let _ = out.send(failure(uri, &e.to_string(), "", false)).await;
                            }
                            None => {
                                let _ = out.send(general_failure(&e.to_string())).await;
                            }
                        }
                        continue;
                    }
                };
                let gate = gate.clone();
                tasks.spawn(async move {
                    let Ok(_permit) = gate.acquire_owned().await else {
                        return;
                    };
                    let answer = acquire(&shared, &acq).await;
                    let _ = shared.out.send(answer).await;
                });
            }
            // Credentials and media changes (602, 603) concern other methods.
            _ => {}
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(s) = shared.take()
        && let Some(Fetcher::Embedded(node)) = s.fetcher.get()
    {
        node.shutdown().await;
    }
    drop(shared);
    drop(out);
    let _ = writer.await;
    result
}

fn general_failure(message: &str) -> Message {
    Message::new(401, "General Failure").with("Message", message)
}

/// An HTTP client with apt's timeouts, for the origin; `proxy` as [`Settings::proxy_for`]
/// gives it (`None`: reqwest's default, the environment's `http_proxy`/`https_proxy`).
///
/// # Errors
/// The proxy URL does not parse, or the client cannot be built.
fn http_client(
    settings: &Settings,
    proxy: Option<Option<String>>,
) -> Result<reqwest::Client, Failed> {
    // reqwest is built without a default TLS provider; ring is the one the node uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .connect_timeout(settings.timeout)
        .read_timeout(settings.timeout)
        .user_agent(concat!("shoal-apt/", env!("CARGO_PKG_VERSION")));
    b = match proxy {
        None => b,
        Some(None) => b.no_proxy(),
        Some(Some(p)) => b.proxy(
            reqwest::Proxy::all(&p)
                .map_err(|e| Failed::new(format!("bad proxy {p}: {e}"), "", false))?,
        ),
    };
    b.build().map_err(|e| Failed::new(e.to_string(), "", false))
}

/// One file: the answer apt gets for it (`201` or `400`).
async fn acquire(shared: &Shared, acq: &Acquire) -> Message {
    if let Err(e) = shared
        .privileges
        .get_or_init(|| async { drop_privileges(&shared.settings.sandbox_user) })
        .await
    {
        return failure(&acq.uri, e, "", false);
    }
    let url = match acq.origin_url() {
        Ok(u) => u,
        Err(e) => return failure(&acq.uri, &e.to_string(), "", false),
    };
    let result = match acq.sha256 {
        Some(_) => through_shoal(shared, acq, &url).await,
        None => from_origin(shared, acq, &url).await,
    };
    match result {
        Ok(m) => m,
        Err(f) => {
            // Nothing unverified stays where apt looks.
            let _ = std::fs::remove_file(&acq.filename);
            failure(&acq.uri, &f.message, f.reason, f.transient)
        }
    }
}

/// Why a file failed, as apt is told.
struct Failed {
    message: String,
    reason: &'static str,
    transient: bool,
}

impl Failed {
    fn new(message: impl Into<String>, reason: &'static str, transient: bool) -> Self {
        Self {
            message: message.into(),
            reason,
            transient,
        }
    }
}

/// Runs as `user` from now on, with its groups, when running as root (apt starts methods as
/// root; its own methods drop to `APT::Sandbox::User` the same way). A method run by another
/// user stays that user.
fn drop_privileges(user: &str) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || user == "root" {
        return Ok(());
    }
    let Some((uid, entry)) = crate::store::fsuser::passwd_by_name(user) else {
        return Err(format!(
            "APT::Sandbox::User {user:?} does not exist: cannot drop privileges"
        ));
    };
    let name = std::ffi::CString::new(user).map_err(|_| format!("bad user name {user:?}"))?;
    let gid = entry.gid;
    // SAFETY: plain system calls on valid arguments; glibc applies set*id to every thread.
    let ok = unsafe {
        libc::initgroups(name.as_ptr(), gid) == 0
            && libc::setgid(gid) == 0
            && libc::setuid(uid) == 0
    };
    if !ok {
        return Err(format!(
            "cannot drop privileges to {user}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A file without an expected SHA-256, from the origin as apt's `http` method fetches it.
async fn from_origin(shared: &Shared, acq: &Acquire, url: &Url) -> Result<Message, Failed> {
    let client = match shared.settings.proxy_for(url, acq.proxy.as_deref()) {
        None => shared.http.clone(),
        proxy => http_client(&shared.settings, proxy)?,
    };
    let mut req = client.get(url.clone());
    // apt's `Last-Modified` is the date of the copy it keeps (elsewhere than `Filename`).
    if let Some(lm) = acq.last_modified.as_deref() {
        req = req.header(reqwest::header::IF_MODIFIED_SINCE, lm);
    }
    let mut resp = req.send().await.map_err(|e| {
        let reason = if e.is_timeout() {
            "Timeout"
        } else {
            "ConnectionFailed"
        };
        Failed::new(format!("{}: {e}", url), reason, true)
    })?;
    let status = resp.status();
    let last_modified = resp
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if status == reqwest::StatusCode::NOT_MODIFIED && acq.last_modified.is_some() {
        return Ok(Message::new(201, "URI Done")
            .with("URI", &acq.uri)
            .with("Filename", acq.filename.display())
            .with("IMS-Hit", "true")
            .with(
                "Last-Modified",
                last_modified
                    .or_else(|| acq.last_modified.clone())
                    .unwrap_or_default(),
            ));
    }
    if !status.is_success() {
        let transient = status.is_server_error() || status.as_u16() == 429;
        return Err(Failed::new(
            format!("{url}: HTTP {status}"),
            http_reason(status.as_u16()),
            transient,
        ));
    }
    let limit = acq.maximum_size.or(acq.size);
    if let (Some(max), Some(len)) = (limit, resp.content_length())
        && len > max
    {
        return Err(Failed::new(
            format!("{url}: {len} bytes, more than the {max} apt allows"),
            "MaximumSizeExceeded",
            false,
        ));
    }
    let _ = shared
        .out
        .send({
            let mut m = Message::new(200, "URI Start").with("URI", &acq.uri);
            if let Some(len) = resp.content_length() {
                m = m.with("Size", len);
            }
            if let Some(lm) = &last_modified {
                m = m.with("Last-Modified", lm);
            }
            m
        })
        .await;
    let mut file = open_for_apt(&acq.filename)
        .map_err(|e| Failed::new(format!("{}: {e}", acq.filename.display()), "", false))?;
    let (mut sha256, mut sha512, mut size) = (Sha256::new(), Sha512::new(), 0u64);
    loop {
        let chunk = resp.chunk().await.map_err(|e| {
            Failed::new(
                format!("{url}: {e}"),
                if e.is_timeout() {
                    "Timeout"
                } else {
                    "ConnectionFailed"
                },
                true,
            )
        })?;
        let Some(chunk) = chunk else { break };
        size += chunk.len() as u64;
        if let Some(max) = limit
            && size > max
        {
            return Err(Failed::new(
                format!("{url}: more than the {max} bytes apt allows"),
                "MaximumSizeExceeded",
                false,
            ));
        }
        sha256.update(&chunk);
        sha512.update(&chunk);
        std::io::Write::write_all(&mut file, &chunk)
            .map_err(|e| Failed::new(format!("{}: {e}", acq.filename.display()), "", false))?;
    }
    // The file's date is the origin's `Last-Modified`, as apt's `http` method leaves it: apt
    // sends it back as the next request's `Last-Modified`, for `If-Modified-Since`.
    if let Some(t) = last_modified
        .as_deref()
        .and_then(|lm| httpdate::parse_http_date(lm).ok())
    {
        let _ = file.set_modified(t);
    }
    file.sync_all()
        .map_err(|e| Failed::new(format!("{}: {e}", acq.filename.display()), "", false))?;
    let sha256 = shoal_validator::Sha256Digest(sha256.finalize().into());
    let sha512 = hex::encode(sha512.finalize());
    check_expected(acq, &sha256, &sha512, size)?;
    Ok(done(
        &acq.uri,
        &acq.filename,
        size,
        last_modified.as_deref(),
        &sha256,
        Some(&sha512),
    ))
}

/// apt's `FailReason` for an HTTP status (apt's `http` method says `HttpError` and the code).
fn http_reason(code: u16) -> &'static str {
    match code {
        404 => "HttpError404",
        403 => "HttpError403",
        401 => "HttpError401",
        410 => "HttpError410",
        429 => "TooManyRequests",
        500 => "HttpError500",
        502 => "HttpError502",
        503 => "HttpError503",
        504 => "HttpError504",
        _ => "HttpError",
    }
}

/// Creates (or empties) `path` for writing, never through a symlink.
fn open_for_apt(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The size and digests apt expects, against those of the bytes at `Filename`.
fn check_expected(
    acq: &Acquire,
    sha256: &shoal_validator::Sha256Digest,
    sha512: &str,
    size: u64,
) -> Result<(), Failed> {
    let mismatch = |what: &str, want: &str, got: &str| {
        Failed::new(
            format!("{what} mismatch: expected {want}, got {got}"),
            "HashSumMismatch",
            false,
        )
    };
    if let Some(want) = acq.size
        && want != size
    {
        return Err(mismatch("size", &want.to_string(), &size.to_string()));
    }
    if let Some(want) = &acq.sha256
        && want != sha256
    {
        return Err(mismatch("SHA-256", &want.to_string(), &sha256.to_string()));
    }
    if let Some(want) = &acq.sha512
        && want != sha512
    {
        return Err(mismatch("SHA-512", want, sha512));
    }
    Ok(())
}

/// The SHA-256, SHA-512 and size of the file at `path`.
fn hash_file(path: &Path) -> std::io::Result<(shoal_validator::Sha256Digest, String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let (mut sha256, mut sha512, mut size) = (Sha256::new(), Sha512::new(), 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha256.update(&buf[..n]);
        sha512.update(&buf[..n]);
        size += n as u64;
    }
    Ok((
        shoal_validator::Sha256Digest(sha256.finalize().into()),
        hex::encode(sha512.finalize()),
        size,
    ))
}

/// A file with an expected SHA-256, through the daemon or a node in this process.
async fn through_shoal(shared: &Shared, acq: &Acquire, url: &Url) -> Result<Message, Failed> {
    let fetcher = shared
        .fetcher
        .get_or_init(|| async { fetcher(shared).await })
        .await;
    let _ = shared
        .out
        .send({
            let mut m = Message::new(200, "URI Start").with("URI", &acq.uri);
            if let Some(len) = acq.size {
                m = m.with("Size", len);
            }
            m
        })
        .await;
    match fetcher {
        Fetcher::Daemon(c) => via_daemon(shared, c.clone(), acq, url).await?,
        Fetcher::Embedded(node) => via_node(shared, node, acq, url).await?,
        Fetcher::None(why) => return Err(Failed::new(why.clone(), "", true)),
    }
    // apt trusts what is reported: hash what is now at `Filename`.
    // A whole `.deb` read: off the runtime's workers, which the method's own node shares.
    let path = acq.filename.clone();
    let (sha256, sha512, size) = tokio::task::spawn_blocking(move || hash_file(&path))
        .await
        .map_err(|e| Failed::new(e.to_string(), "", false))?
        .map_err(|e| Failed::new(format!("{}: {e}", acq.filename.display()), "", false))?;
    check_expected(acq, &sha256, &sha512, size)?;
    Ok(done(
        &acq.uri,
        &acq.filename,
        size,
        None,
        &sha256,
        acq.sha512.is_some().then_some(sha512.as_str()),
    ))
}

/// The daemon when it answers; else a node in this process (after a warning), or none.
async fn fetcher(shared: &Shared) -> Fetcher {
    let socket = &shared.settings.socket;
    let connected = async {
        let channel = tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(ControlClient::new(channel))
    };
    let why = match tokio::time::timeout(Duration::from_secs(5), connected).await {
        Ok(Ok(c)) => return Fetcher::Daemon(c),
        Ok(Err(e)) => format!("no Shoal daemon answers on {}: {e}", socket.display()),
        Err(_) => format!("no Shoal daemon answers on {} within 5 s", socket.display()),
    };
    if !shared.settings.fallback {
        return Fetcher::None(format!("{why} (Acquire::shoal::Fallback is \"fail\")"));
    }
    let _ = shared
        .out
        .send(Message::new(104, "Warning").with(
            "Message",
            format!("{why}; fetching through a Shoal node in the method's process"),
        ))
        .await;
    match embedded_node(&shared.settings.config).await {
        Ok(node) => Fetcher::Embedded(node),
        Err(e) => Fetcher::None(format!("{why}, and no node could start in the method: {e}")),
    }
}

/// A node with the settings of the configuration file at `path`, or the node's defaults
/// when there is no such file.
async fn embedded_node(path: &Path) -> Result<Node, String> {
    let b = Node::builder();
    let b = if path.exists() {
        crate::config::Config::load(path)
            .and_then(|c| c.apply(b, &path.display().to_string()))
            .map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        b
    };
    b.build().await.map_err(|e| e.to_string())
}

/// apt's `FailReason` and transience for a job's error (`transport`: the error's context is
/// the transport, BITS context 5).
fn job_failure(transport: bool, description: String) -> Failed {
    if description.contains("expected digest") || description.contains("SHA-256 mismatch") {
        Failed::new(description, "HashSumMismatch", false)
    } else if transport {
        Failed::new(description, "ConnectionFailed", true)
    } else {
        Failed::new(description, "", false)
    }
}

async fn via_daemon(
    shared: &Shared,
    mut c: ControlClient<tonic::transport::Channel>,
    acq: &Acquire,
    url: &Url,
) -> Result<(), Failed> {
    let rpc =
        |e: tonic::Status| Failed::new(format!("the Shoal daemon: {}", e.message()), "", true);
    let name = acq
        .filename
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let job = c
        .create_job(pb::CreateJobRequest {
            display_name: format!("apt {name}"),
            priority: pb::Priority::Foreground as i32,
            r#type: pb::JobType::Download as i32,
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .id;
    let outcome = async {
        c.add_file(pb::AddFileRequest {
            job: job.clone(),
            url: url.to_string(),
            local_name: acq.filename.display().to_string(),
            blake3: String::new(),
            sha256: acq.sha256.map(|d| d.to_string()).unwrap_or_default(),
            ranges: Vec::new(),
        })
        .await
        .map_err(rpc)?;
        let proxy = job_proxy(&shared.settings, url, acq.proxy.as_deref())?.map(|p| match p {
            crate::job::ProxyUsage::Preconfig => pb::ProxySettings::default(),
            crate::job::ProxyUsage::NoProxy => pb::ProxySettings {
                usage: pb::ProxyUsage::NoProxy as i32,
                ..pb::ProxySettings::default()
            },
            crate::job::ProxyUsage::Override { proxies, bypass } => pb::ProxySettings {
                usage: pb::ProxyUsage::Override as i32,
                proxies: proxies.iter().map(ToString::to_string).collect(),
                bypass,
            },
        });
        c.set_properties(pb::SetPropertiesRequest {
            job: job.clone(),
            retry_delay_seconds: Some(5),
            no_progress_timeout_seconds: Some(shared.settings.timeout.as_secs().max(1)),
            proxy,
            ..Default::default()
        })
        .await
        .map_err(rpc)?;
        c.resume(pb::JobRef { job: job.clone() })
            .await
            .map_err(rpc)?;
        let mut told = 0u64;
        loop {
            let j = c
                .get_job(pb::JobRef { job: job.clone() })
                .await
                .map_err(rpc)?
                .into_inner();
            match pb::JobState::try_from(j.state) {
                Ok(pb::JobState::Transferred) => {
                    c.complete(pb::JobRef { job: job.clone() })
                        .await
                        .map_err(rpc)?;
                    return Ok(());
                }
                Ok(pb::JobState::Error) => {
                    let e = j.error.unwrap_or_default();
                    let transport = e.context == pb::ErrorContext::Transport as i32;
                    return Err(job_failure(transport, e.description));
                }
                _ => {
                    if j.bytes_transferred > told {
                        told = j.bytes_transferred;
                        let _ = shared.out.try_send(status(acq, &j));
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }
    .await;
    if outcome.is_err() {
        let _ = c.cancel(pb::JobRef { job }).await;
    }
    outcome
}

/// `102 Status`: bytes so far and the share from peers.
fn status(acq: &Acquire, j: &pb::Job) -> Message {
    let share = (100 * j.bytes_from_peers)
        .checked_div(j.bytes_transferred)
        .unwrap_or(0);
    Message::new(102, "Status").with("URI", &acq.uri).with(
        "Message",
        format!(
            "{} of {} bytes, {share}% from peers",
            j.bytes_transferred, j.bytes_total
        ),
    )
}

/// Completes the job once it is transferred and reports the end.
struct Finisher {
    node: Node,
    done: mpsc::Sender<Result<(), Failed>>,
}

impl crate::Callback for Finisher {
    fn job_transferred(
        &self,
        job: crate::JobInfo,
    ) -> futures::future::BoxFuture<'static, Result<(), crate::CallbackError>> {
        let (node, done) = (self.node.clone(), self.done.clone());
        Box::pin(async move {
            let r = node
                .complete(job.id)
                .await
                .map_err(|e| Failed::new(e.to_string(), "", false));
            let _ = done.send(r).await;
            Ok(())
        })
    }

    fn job_error(
        &self,
        _job: crate::JobInfo,
        error: crate::job::JobError,
    ) -> futures::future::BoxFuture<'static, Result<(), crate::CallbackError>> {
        let done = self.done.clone();
        Box::pin(async move {
            let transport = error.context == crate::job::ErrorContext::Transport;
            let _ = done
                .send(Err(job_failure(transport, error.description)))
                .await;
            Ok(())
        })
    }
}

async fn via_node(shared: &Shared, node: &Node, acq: &Acquire, url: &Url) -> Result<(), Failed> {
    let err = |e: crate::Error| Failed::new(e.to_string(), "", false);
    let job = node
        .create_job("apt", Priority::Foreground)
        .await
        .map_err(err)?;
    let outcome = async {
        node.add_file(
            job,
            FileSpec {
                url: url.clone(),
                local_name: acq.filename.clone(),
                expected: Expected {
                    blake3: None,
                    sha256: acq.sha256,
                },
                ranges: Vec::new(),
            },
        )
        .await
        .map_err(err)?;
        let (tx, mut rx) = mpsc::channel(1);
        node.set_callback(
            job,
            Arc::new(Finisher {
                node: node.clone(),
                done: tx,
            }),
        )
        .await
        .map_err(err)?;
        node.set_retry_delay(job, Duration::from_secs(5))
            .await
            .map_err(err)?;
        if let Some(proxy) = job_proxy(&shared.settings, url, acq.proxy.as_deref())? {
            node.set_http_options(
                job,
                crate::job::HttpOptions {
                    proxy,
                    ..crate::job::HttpOptions::default()
                },
            )
            .await
            .map_err(err)?;
        }
        node.resume(job).await.map_err(err)?;
        let mut stalled = tokio::time::Instant::now();
        let mut told = 0u64;
        loop {
            tokio::select! {
                r = rx.recv() => return r.unwrap_or_else(|| Err(Failed::new("the node stopped", "", true))),
                () = tokio::time::sleep(POLL) => {
                    let info = node.info(job).map_err(err)?;
                    if info.bytes_transferred() > told {
                        told = info.bytes_transferred();
                        stalled = tokio::time::Instant::now();
                    } else if stalled.elapsed() >= shared.settings.timeout
                        && info.state == crate::State::TransientError
                    {
                        let why = info.error.map(|e| e.description).unwrap_or_default();
                        return Err(Failed::new(
                            format!("no progress for {} s: {why}", shared.settings.timeout.as_secs()),
                            "Timeout",
                            true,
                        ));
                    }
                }
            }
        }
    }
    .await;
    if outcome.is_err() {
        let _ = node.cancel(job).await;
    }
    outcome
}
