//! `shoal daemon`, `shoal job ...` and `shoal status`: the daemon and its bitsadmin-like
//! client over the control API.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use shoal_node::{
    daemon::control::{self as pb, control_client::ControlClient, event::Kind},
    daemon::{DEFAULT_SOCKET, Daemon},
};
use tonic::transport::Channel;

/// The socket: `--socket`, else `$SHOAL_SOCKET`, else the default.
pub(crate) fn socket_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_owned)
        .or_else(|| std::env::var_os("SHOAL_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// A client of the daemon at `socket`.
///
/// # Errors
/// One line naming the socket and the cause: no daemon there, or no permission (with the
/// group to join).
pub(crate) async fn connect(socket: &Path) -> Result<ControlClient<Channel>> {
    // Asked once, plainly, so that the error names its cause once (tonic's would repeat the
    // OS error through its layers).
    if let Err(e) = std::os::unix::net::UnixStream::connect(socket) {
        bail!("{}", socket_error(socket, &e));
    }
    let channel = tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))?
        .connect()
        .await
        .map_err(|_| anyhow::anyhow!("no Shoal daemon answers on {}", socket.display()))?;
    Ok(ControlClient::new(channel))
}

/// What a failed connection to the daemon's socket means for the user, in one line.
pub(crate) fn socket_error(socket: &Path, e: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    let at = socket.display();
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            let group = std::fs::metadata(socket)
                .ok()
                .and_then(|m| group_name(m.gid()))
                .unwrap_or_else(|| "shoal".into());
            format!(
                "permission denied on {at}: add yourself to group {group} \
                 (sudo usermod -aG {group} $USER, then log in again)"
            )
        }
        std::io::ErrorKind::NotFound => format!(
            "no Shoal daemon at {at} (start one with `sudo shoal daemon`, or give --socket)"
        ),
        std::io::ErrorKind::ConnectionRefused => {
            format!("no Shoal daemon answers on {at} (the socket is left from a stopped daemon)")
        }
        _ => format!("cannot reach the Shoal daemon at {at}: {e}"),
    }
}

/// The name of user `uid` in `/etc/passwd`, else the number.
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|users| {
            users.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id = f.nth(1)?.parse::<u32>().ok()?;
                (id == uid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

/// The name of group `gid` in `/etc/group`.
fn group_name(gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id = f.nth(1)?.parse::<u32>().ok()?;
        (id == gid).then(|| name.to_owned())
    })
}

/// `shoal daemon --config FILE`.
pub(crate) async fn daemon(config: Option<&Path>) -> Result<()> {
    let (c, name) = match config {
        Some(path) => (
            shoal_node::config::Config::load(path)?,
            path.display().to_string(),
        ),
        None => (shoal_node::config::Config::default(), "defaults".to_owned()),
    };
    let mut builder = c
        .apply(shoal_node::Node::builder(), &name)?
        .state_dir(c.state_dir());
    if let Some(cache) = c.cache(&name)? {
        builder = builder.cache(cache);
    }
    if let Some(role) = c.cache_node_role(&name)? {
        builder = builder.cache_node_role(role);
    }
    let cfg = c.daemon(&name)?;
    let socket = cfg.socket.clone();
    let d = Daemon::start(builder, cfg)
        .await
        .with_context(|| format!("cannot start the daemon ({name})"))?;
    eprintln!("shoal daemon: peer id {}", d.node().peer_id());
    for a in d.node().listen_addrs().await {
        eprintln!("shoal daemon: listening {a}");
    }
    eprintln!("shoal daemon: control API on {}", socket.display());
    d.serve(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await?;
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PriorityArg {
    Foreground,
    High,
    Normal,
    Low,
}

impl From<PriorityArg> for pb::Priority {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::Foreground => Self::Foreground,
            PriorityArg::High => Self::High,
            PriorityArg::Normal => Self::Normal,
            PriorityArg::Low => Self::Low,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Verdict {
    Valid,
    Invalid,
}

/// `shoal cache ...`.
#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// List the cached files, most recently used first, and how full the cache is.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Pin a cached file: it is never evicted. KEY: blake3:HEX, sha256:HEX, HEX:LENGTH or HEX.
    Pin { key: String },
    /// Unpin a cached file.
    Unpin { key: String },
    /// Evict a cached file now, pinned or not.
    Evict { key: String },
}

fn print_cache_entry(e: &pb::CacheEntry) {
    outln!(
        "{} {:>14} {} {}{}",
        e.content_id,
        e.bytes,
        if e.sha256.is_empty() { "-" } else { &e.sha256 },
        e.path,
        if e.pinned { " pinned" } else { "" }
    );
}

/// `shoal cache ...` against the daemon at `socket` (root only).
pub(crate) async fn cache(command: CacheCommand, socket: &Path) -> Result<()> {
    let mut c = connect(socket).await?;
    let pinned = matches!(command, CacheCommand::Pin { .. });
    match command {
        CacheCommand::List { json: as_json } => {
            let r = c.list_cache(pb::ListCacheRequest {}).await?.into_inner();
            let u = r.usage.unwrap_or_default();
            if as_json {
                let entries: Vec<_> = r
                    .entries
                    .iter()
                    .map(|e| {
                        json!({
                            "content_id": e.content_id,
                            "sha256": (!e.sha256.is_empty()).then_some(&e.sha256),
                            "bytes": e.bytes,
                            "added_ms": e.added_ms,
                            "used_ms": e.used_ms,
                            "pinned": e.pinned,
                            "path": e.path,
                        })
                    })
                    .collect();
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "bytes": u.bytes,
                        "limit": u.limit,
                        "entries": entries,
                        "pinned_bytes": u.pinned_bytes,
                    }))?
                );
                return Ok(());
            }
            outln!(
                "cache: {} files, {} of {} bytes ({} pinned)",
                u.entries,
                u.bytes,
                u.limit,
                u.pinned_bytes
            );
            for e in &r.entries {
                print_cache_entry(e);
            }
        }
        CacheCommand::Pin { key } | CacheCommand::Unpin { key } => {
            let e = c
                .pin_cache(pb::PinCacheRequest { key, pinned })
                .await?
                .into_inner();
            print_cache_entry(&e);
        }
        CacheCommand::Evict { key } => {
            let e = c
                .evict_cache(pb::EvictCacheRequest { key })
                .await?
                .into_inner();
            out!("evicted ");
            print_cache_entry(&e);
        }
    }
    Ok(())
}

/// `shoal bandwidth`: the flags given change the daemon's limits (root only; 0 removes one).
#[derive(clap::Args)]
pub(crate) struct BandwidthArgs {
    /// Downloads of Foreground jobs, bytes per second.
    #[arg(long)]
    download_foreground: Option<u64>,
    /// Downloads of High, Normal and Low jobs, bytes per second.
    #[arg(long)]
    download_background: Option<u64>,
    /// Uploads to peers, bytes per second.
    #[arg(long)]
    upload: Option<u64>,
    /// Bytes served to peers per calendar month (UTC).
    #[arg(long)]
    monthly_upload_cap: Option<u64>,
    /// Peers served at once.
    #[arg(long)]
    max_upload_peers: Option<u32>,
    #[arg(long)]
    json: bool,
}

/// `shoal bandwidth ...` against the daemon at `socket`.
pub(crate) async fn bandwidth(a: BandwidthArgs, socket: &Path) -> Result<()> {
    let mut c = connect(socket).await?;
    let change = a.download_foreground.is_some()
        || a.download_background.is_some()
        || a.upload.is_some()
        || a.monthly_upload_cap.is_some()
        || a.max_upload_peers.is_some();
    let b = if change {
        c.set_bandwidth(pb::SetBandwidthRequest {
            download_foreground_bytes_per_sec: a.download_foreground,
            download_background_bytes_per_sec: a.download_background,
            upload_bytes_per_sec: a.upload,
            monthly_upload_cap_bytes: a.monthly_upload_cap,
            max_upload_peers: a.max_upload_peers,
        })
        .await?
        .into_inner()
    } else {
        c.get_bandwidth(pb::GetBandwidthRequest {})
            .await?
            .into_inner()
    };
    let or_none = |v: u64| {
        if v == 0 {
            "none".to_owned()
        } else {
            v.to_string()
        }
    };
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "download_foreground_bytes_per_sec": b.download_foreground_bytes_per_sec,
                "download_background_bytes_per_sec": b.download_background_bytes_per_sec,
                "upload_bytes_per_sec": b.upload_bytes_per_sec,
                "monthly_upload_cap_bytes": b.monthly_upload_cap_bytes,
                "max_upload_peers": b.max_upload_peers,
                "month": b.month,
                "uploaded_this_month": b.uploaded_this_month,
                "cap_reached": b.cap_reached,
            }))?
        );
        return Ok(());
    }
    for (k, v) in [
        (
            "DownloadForegroundBytesPerSec",
            or_none(b.download_foreground_bytes_per_sec),
        ),
        (
            "DownloadBackgroundBytesPerSec",
            or_none(b.download_background_bytes_per_sec),
        ),
        ("UploadBytesPerSec", or_none(b.upload_bytes_per_sec)),
        ("MonthlyUploadCapBytes", or_none(b.monthly_upload_cap_bytes)),
        ("MaxUploadPeers", b.max_upload_peers.to_string()),
        (
            "UploadedThisMonth",
            format!(
                "{} ({}){}",
                b.uploaded_this_month,
                b.month,
                if b.cap_reached { ", cap reached" } else { "" }
            ),
        ),
    ] {
        outln!("{k:<32}: {v}");
    }
    Ok(())
}

/// `shoal job ...`.
#[derive(Subcommand)]
pub(crate) enum JobCommand {
    /// Create a job (it starts Suspended); prints its id.
    Create {
        /// Display name.
        name: String,
        #[arg(long, value_enum, default_value = "normal")]
        priority: PriorityArg,
        /// download (files from URLs), upload (one local file to a BITS upload server,
        /// `job add JOB URL LOCAL`) or upload-reply (an upload whose reply is fetched back).
        #[arg(long = "type", value_enum, default_value = "download")]
        job_type: JobTypeArg,
    },
    /// Print an upload-reply job's reply (its first 1 MiB) on stdout (BITS GetReplyData).
    Reply { job: String },
    /// Add a file: URL and local name (made absolute against the current directory).
    Add {
        job: String,
        url: String,
        local: PathBuf,
        /// Expected SHA-256, 64 hex digits.
        #[arg(long)]
        sha256: Option<String>,
        /// Expected BLAKE3, 64 hex digits (as b3sum prints).
        #[arg(long)]
        blake3: Option<String>,
        /// Only these ranges, as bitsadmin writes them: OFFSET:LENGTH,... with `eof` as a
        /// length for "to the end". The local file is the ranges one after the other.
        #[arg(long)]
        ranges: Option<String>,
    },
    /// Start or restart a job (BITS Resume).
    Resume { job: String },
    /// Pause a job (BITS Suspend).
    Suspend { job: String },
    /// Stop a job and delete its temporary files (BITS Cancel).
    Cancel { job: String },
    /// Give the transferred files their names (BITS Complete).
    Complete { job: String },
    /// List your jobs (root: all jobs).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a job: state, progress, files and their sources, error, times.
    Info {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Show per-file progress bars until the job is transferred (or fails).
    Monitor { job: String },
    /// Change a job's properties.
    Set {
        job: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum)]
        priority: Option<PriorityArg>,
        /// Minimum retry delay in seconds (at least 5).
        #[arg(long)]
        retry_delay: Option<u64>,
        /// No-progress timeout in seconds (0: fail at the first transient error).
        #[arg(long)]
        no_progress_timeout: Option<u64>,
        /// BG_NOTIFY_* flags (1 transferred, 2 error, 4 disable, 8 modification, 16 file).
        #[arg(long)]
        notify_flags: Option<u32>,
        /// The notify program and its arguments (the job id is appended); "" clears it.
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        notify_cmd: Option<Vec<String>>,
        /// Seconds the job may spend in Connecting and Transferring before it goes to Error
        /// (BITS SetMaximumDownloadTime; 0: the default of 90 days).
        #[arg(long)]
        max_download_time: Option<u64>,
        #[command(flatten)]
        http: HttpArgs,
    },
    /// Give one file a new URL (BITS SetRemoteName). A file with an expected digest, or
    /// already transferred, keeps its pieces; another file starts over.
    SetUrl {
        job: String,
        /// The file's index in the job, from 0 (as `job info` lists them).
        file: u32,
        url: String,
    },
    /// Replace the start of every URL of a job that starts with OLD by NEW (BITS
    /// ReplaceRemotePrefix), e.g. `http://old-mirror/` `http://new-mirror/`.
    ReplacePrefix {
        job: String,
        old: String,
        new: String,
    },
    /// Answer a FileTransferred notification: the file's verdict.
    Validate {
        job: String,
        /// The file's index in the job.
        file: u32,
        #[arg(value_enum)]
        verdict: Verdict,
    },
}

/// A job's HTTP options on the command line (`shoal job set`). Each option given replaces
/// the job's; `--clear-*` removes it.
#[derive(clap::Args, Default)]
pub(crate) struct HttpArgs {
    /// A request header for every origin request of the job, `NAME: VALUE`; repeat for more.
    /// Replaces the job's headers.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Remove the job's request headers.
    #[arg(long)]
    clear_headers: bool,
    /// Credentials for the origin: `basic:USER` or `bearer`. The password or token is read
    /// from the first line of standard input (never from the command line, where other users
    /// could read it); `none` removes them.
    #[arg(long, value_name = "basic:USER|bearer|none")]
    credentials: Option<String>,
    /// A TLS client certificate (PEM), with --client-key.
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Remove the client certificate.
    #[arg(long, conflicts_with = "client_cert")]
    clear_client_cert: bool,
    /// A PEM file of CA certificates to trust besides the system's; repeat for more.
    #[arg(long = "ca-cert")]
    ca_certs: Vec<PathBuf>,
    /// Trust only the system's CA certificates again.
    #[arg(long, conflicts_with = "ca_certs")]
    clear_ca_certs: bool,
    /// Which proxy to use (BITS BG_JOB_PROXY_USAGE): the daemon's setting, none, or the
    /// --proxy list.
    #[arg(long, value_enum)]
    proxy_usage: Option<ProxyUsageArg>,
    /// With --proxy-usage override: a proxy URL, `http://HOST:PORT`; repeat for fallbacks,
    /// tried in order.
    #[arg(long = "proxy")]
    proxies: Vec<String>,
    /// With --proxy-usage override: a host, address or CIDR range reached directly; repeat
    /// for more.
    #[arg(long = "proxy-bypass")]
    proxy_bypass: Vec<String>,
}

/// `--type` of `job create` (BITS BG_JOB_TYPE).
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum JobTypeArg {
    /// Files from their origins and peers.
    Download,
    /// One local file to a BITS upload server.
    Upload,
    /// An upload whose server's reply is fetched back.
    UploadReply,
}

/// `--proxy-usage`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ProxyUsageArg {
    /// The daemon's `[origin] proxy`, else its http_proxy/https_proxy/no_proxy environment.
    Preconfig,
    /// Direct connections.
    NoProxy,
    /// The --proxy list.
    Override,
}

impl HttpArgs {
    /// The request's HTTP fields; the secret of `--credentials` is read from `stdin`.
    fn apply(
        self,
        req: &mut pb::SetPropertiesRequest,
        stdin: &mut dyn std::io::BufRead,
    ) -> Result<()> {
        if !self.headers.is_empty() || self.clear_headers {
            let headers = self
                .headers
                .iter()
                .map(|h| {
                    let (name, value) = h
                        .split_once(':')
                        .with_context(|| format!("--header {h:?} is not NAME: VALUE"))?;
                    Ok(pb::Header {
                        name: name.trim().to_owned(),
                        value: value.trim().to_owned(),
                    })
                })
                .collect::<Result<_>>()?;
            req.headers = Some(pb::HeaderList { headers });
        }
        if let Some(c) = &self.credentials {
            let mut secret = || -> Result<String> {
                let mut line = String::new();
                stdin
                    .read_line(&mut line)
                    .context("reading the secret from standard input")?;
                let line = line.trim_end_matches(['\r', '\n']).to_owned();
                anyhow::ensure!(
                    !line.is_empty(),
                    "--credentials {c}: standard input gave no secret"
                );
                Ok(line)
            };
            let scheme = match c.as_str() {
                "none" => None,
                "bearer" => Some(pb::credentials::Scheme::BearerToken(secret()?)),
                _ => match c.strip_prefix("basic:") {
                    Some(user) => Some(pb::credentials::Scheme::Basic(pb::BasicCredentials {
                        user: user.to_owned(),
                        password: secret()?,
                    })),
                    None => anyhow::bail!("--credentials {c:?}: give basic:USER, bearer or none"),
                },
            };
            req.credentials = Some(pb::Credentials { scheme });
        }
        let abs = |p: &PathBuf| -> Result<String> {
            Ok(std::path::absolute(p)
                .with_context(|| format!("cannot make {} absolute", p.display()))?
                .display()
                .to_string())
        };
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            req.client_certificate = Some(pb::ClientCertificate {
                certificate: abs(cert)?,
                key: abs(key)?,
            });
        } else if self.clear_client_cert {
            req.client_certificate = Some(pb::ClientCertificate::default());
        }
        if !self.ca_certs.is_empty() || self.clear_ca_certs {
            req.ca_certificates = Some(pb::PathList {
                paths: self.ca_certs.iter().map(abs).collect::<Result<_>>()?,
            });
        }
        match self.proxy_usage {
            None if !self.proxies.is_empty() || !self.proxy_bypass.is_empty() => {
                anyhow::bail!("--proxy and --proxy-bypass need --proxy-usage override")
            }
            None => {}
            Some(u) => {
                let usage = match u {
                    ProxyUsageArg::Preconfig => pb::ProxyUsage::Preconfig,
                    ProxyUsageArg::NoProxy => pb::ProxyUsage::NoProxy,
                    ProxyUsageArg::Override => pb::ProxyUsage::Override,
                };
                anyhow::ensure!(
                    matches!(u, ProxyUsageArg::Override) || self.proxies.is_empty(),
                    "--proxy needs --proxy-usage override"
                );
                req.proxy = Some(pb::ProxySettings {
                    usage: usage as i32,
                    proxies: self.proxies,
                    bypass: self.proxy_bypass,
                });
            }
        }
        Ok(())
    }
}

/// Parses `OFFSET:LENGTH,...` (`eof` as a length: to the end), as bitsadmin's RangeList.
fn parse_ranges(text: &str) -> Result<Vec<pb::ByteRange>> {
    text.split(',')
        .map(|part| {
            let (offset, length) = part
                .split_once(':')
                .with_context(|| format!("--ranges: {part:?} is not OFFSET:LENGTH"))?;
            let offset = offset
                .trim()
                .parse()
                .with_context(|| format!("--ranges: bad offset in {part:?}"))?;
            let length = match length.trim() {
                "eof" => None,
                l => Some(
                    l.parse()
                        .with_context(|| format!("--ranges: bad length in {part:?}"))?,
                ),
            };
            Ok(pb::ByteRange { offset, length })
        })
        .collect()
}

fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Queued => "Queued",
        pb::JobState::Connecting => "Connecting",
        pb::JobState::Transferring => "Transferring",
        pb::JobState::Suspended => "Suspended",
        pb::JobState::Error => "Error",
        pb::JobState::TransientError => "TransientError",
        pb::JobState::Transferred => "Transferred",
        pb::JobState::Acknowledged => "Acknowledged",
        pb::JobState::Cancelled => "Cancelled",
        pb::JobState::Unspecified => "Unknown",
    }
}

fn priority_name(p: i32) -> &'static str {
    match pb::Priority::try_from(p).unwrap_or(pb::Priority::Normal) {
        pb::Priority::Foreground => "Foreground",
        pb::Priority::High => "High",
        pb::Priority::Low => "Low",
        pb::Priority::Normal | pb::Priority::Unspecified => "Normal",
    }
}

fn context_name(c: i32) -> &'static str {
    match pb::ErrorContext::try_from(c).unwrap_or(pb::ErrorContext::None) {
        pb::ErrorContext::None => "None",
        pb::ErrorContext::RemoteFile => "RemoteFile",
        pb::ErrorContext::LocalFile => "LocalFile",
        pb::ErrorContext::Transport => "Transport",
        pb::ErrorContext::Validation => "Validation",
        pb::ErrorContext::Notification => "Notification",
        pb::ErrorContext::ServerCertificate => "ServerCertificate",
    }
}

/// A job as JSON (the `--json` output).
fn job_json(j: &pb::Job) -> serde_json::Value {
    let mut v = job_json_base(j);
    v["max_download_time_seconds"] = json!(j.max_download_time_seconds);
    v["active_time_ms"] = json!(j.active_time_ms);
    v["http"] = j.http.as_ref().map(http_json).unwrap_or_default();
    v["type"] = json!(match pb::JobType::try_from(j.r#type) {
        Ok(pb::JobType::Upload) => "upload",
        Ok(pb::JobType::UploadReply) => "upload-reply",
        _ => "download",
    });
    v["reply_file_name"] = json!((!j.reply_file_name.is_empty()).then_some(&j.reply_file_name));
    v
}

fn job_json_base(j: &pb::Job) -> serde_json::Value {
    json!({
        "id": j.id,
        "display_name": j.display_name,
        "priority": priority_name(j.priority),
        "state": state_name(j.state),
        "owner": j.owner,
        "bytes_total": j.bytes_total,
        "bytes_transferred": j.bytes_transferred,
        "bytes_from_peers": j.bytes_from_peers,
        "bytes_from_origin": j.bytes_from_origin,
        "bytes_from_lan_peers": j.bytes_from_lan_peers,
        "bytes_from_group_peers": j.bytes_from_group_peers,
        "bytes_from_cache": j.bytes_from_cache,
        "percent_peer_caching": j.percent_peer_caching,
        "pieces_rejected": j.pieces_rejected,
        "peers_banned": j.peers_banned,
        "created_ms": j.created_ms,
        "modified_ms": j.modified_ms,
        "transfer_completed_ms": (j.transfer_completed_ms != 0).then_some(j.transfer_completed_ms),
        "retry_delay_seconds": j.retry_delay_seconds,
        "no_progress_timeout_seconds": j.no_progress_timeout_seconds,
        "notify_flags": j.notify_flags,
        "notify_cmdline": j.notify_cmdline,
        "error": j.error.as_ref().map(|e| json!({
            "context": context_name(e.context),
            "file": e.file,
            "description": e.description,
        })),
        "files": j.files.iter().map(|f| json!({
            "url": f.url,
            "local_name": f.local_name,
            "temp_name": f.temp_name,
            "expected_blake3": (!f.expected_blake3.is_empty()).then_some(&f.expected_blake3),
            "expected_sha256": (!f.expected_sha256.is_empty()).then_some(&f.expected_sha256),
            "content_id": (!f.content_id.is_empty()).then_some(&f.content_id),
            "sha256": (!f.sha256.is_empty()).then_some(&f.sha256),
            "bytes_total": f.bytes_total,
            "bytes_transferred": f.bytes_transferred,
            "bytes_from_peers": f.bytes_from_peers,
            "bytes_from_origin": f.bytes_from_origin,
            "bytes_from_lan_peers": f.bytes_from_lan_peers,
            "bytes_from_group_peers": f.bytes_from_group_peers,
            "bytes_from_cache": f.bytes_from_cache,
            "transferred": f.transferred,
            "validation_state": match f.validation_state { 1 => "Valid", 2 => "Invalid", _ => "Unknown" },
        })).collect::<Vec<_>>(),
    })
}

/// The HTTP options of a job as JSON: names and paths, never a secret (the daemon sends none).
fn http_json(h: &pb::HttpOptionsInfo) -> serde_json::Value {
    json!({
        "header_names": h.header_names,
        "credentials": (!h.credentials_scheme.is_empty()).then(|| json!({
            "scheme": h.credentials_scheme,
            "user": (!h.credentials_user.is_empty()).then_some(&h.credentials_user),
        })),
        "client_certificate": h.client_certificate.as_ref().map(|c| json!({
            "certificate": c.certificate,
            "key": c.key,
        })),
        "ca_certificates": h.ca_certificates,
        "proxy": h.proxy.as_ref().map(|p| json!({
            "usage": proxy_usage_name(p.usage),
            "proxies": p.proxies,
            "bypass": p.bypass,
        })),
    })
}

fn proxy_usage_name(u: i32) -> &'static str {
    match pb::ProxyUsage::try_from(u).unwrap_or(pb::ProxyUsage::Preconfig) {
        pb::ProxyUsage::Unspecified | pb::ProxyUsage::Preconfig => "preconfig",
        pb::ProxyUsage::NoProxy => "no_proxy",
        pb::ProxyUsage::Override => "override",
    }
}

/// A time in milliseconds since the epoch as an HTTP date (UTC), or "-" for 0 (not yet).
fn time_text(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

fn print_info(j: &pb::Job) {
    outln!("job        {}", j.id);
    outln!("name       {}", j.display_name);
    outln!("state      {}", state_name(j.state));
    outln!("priority   {}", priority_name(j.priority));
    outln!("owner      {} ({})", user_name(j.owner), j.owner);
    let kind = match pb::JobType::try_from(j.r#type) {
        Ok(pb::JobType::Upload) => "upload",
        Ok(pb::JobType::UploadReply) => "upload-reply",
        _ => "download",
    };
    if j.reply_file_name.is_empty() {
        outln!("type       {kind}");
    } else {
        outln!("type       {kind}, reply to {}", j.reply_file_name);
    }
    outln!(
        "progress   {}/{} bytes ({} from peers, {} from the origin)",
        j.bytes_transferred,
        j.bytes_total,
        j.bytes_from_peers,
        j.bytes_from_origin
    );
    outln!(
        "sources    LAN peers {}, group peers {}, cache nodes {}; peer caching {:.1} %",
        j.bytes_from_lan_peers,
        j.bytes_from_group_peers,
        j.bytes_from_cache,
        j.percent_peer_caching
    );
    outln!(
        "peers      {} pieces rejected, {} peers banned",
        j.pieces_rejected,
        j.peers_banned
    );
    if let Some(e) = &j.error {
        outln!("error      {}: {}", context_name(e.context), e.description);
    }
    outln!(
        "retry      {} s, no-progress timeout {} s, notify flags {:#x}{}",
        j.retry_delay_seconds,
        j.no_progress_timeout_seconds,
        j.notify_flags,
        if j.notify_cmdline.is_empty() {
            String::new()
        } else {
            format!(", notify command {:?}", j.notify_cmdline)
        }
    );
    outln!(
        "times      created {}, modified {}, transferred {}; {} s in Connecting/Transferring of at most {} s",
        time_text(j.created_ms),
        time_text(j.modified_ms),
        time_text(j.transfer_completed_ms),
        j.active_time_ms / 1000,
        j.max_download_time_seconds
    );
    if let Some(h) = &j.http {
        let mut parts = Vec::new();
        if !h.header_names.is_empty() {
            parts.push(format!("headers {}", h.header_names.join(", ")));
        }
        if !h.credentials_scheme.is_empty() {
            parts.push(if h.credentials_user.is_empty() {
                format!("{} credentials", h.credentials_scheme)
            } else {
                format!(
                    "{} credentials for {}",
                    h.credentials_scheme, h.credentials_user
                )
            });
        }
        if let Some(c) = &h.client_certificate {
            parts.push(format!("client certificate {}", c.certificate));
        }
        if !h.ca_certificates.is_empty() {
            parts.push(format!("CA files {}", h.ca_certificates.join(", ")));
        }
        if let Some(p) = &h.proxy {
            parts.push(match proxy_usage_name(p.usage) {
                "override" if p.bypass.is_empty() => format!("proxy {}", p.proxies.join(", ")),
                "override" => format!(
                    "proxy {} (not for {})",
                    p.proxies.join(", "),
                    p.bypass.join(", ")
                ),
                other => format!("proxy {other}"),
            });
        }
        outln!("http       {}", parts.join("; "));
    }
    for (i, f) in j.files.iter().enumerate() {
        let total = f.bytes_total.map_or("?".into(), |t| t.to_string());
        outln!(
            "file {i}     {} -> {} {}/{} bytes (peers {}, origin {}){}",
            f.url,
            f.local_name,
            f.bytes_transferred,
            total,
            f.bytes_from_peers,
            f.bytes_from_origin,
            if f.transferred { ", transferred" } else { "" }
        );
    }
}

/// `shoal job create`: prints the new job's id.
async fn create(
    c: &mut ControlClient<Channel>,
    name: String,
    priority: PriorityArg,
    job_type: JobTypeArg,
) -> Result<()> {
    let j = c
        .create_job(pb::CreateJobRequest {
            display_name: name,
            priority: pb::Priority::from(priority) as i32,
            r#type: match job_type {
                JobTypeArg::Download => pb::JobType::Download,
                JobTypeArg::Upload => pb::JobType::Upload,
                JobTypeArg::UploadReply => pb::JobType::UploadReply,
            } as i32,
        })
        .await?
        .into_inner();
    outln!("{}", j.id);
    Ok(())
}

/// Runs a `shoal job` command against the daemon at `socket`.
pub(crate) async fn job(cmd: JobCommand, socket: &Path) -> Result<()> {
    let mut c = connect(socket).await?;
    let jr = |job: String| pb::JobRef { job };
    match cmd {
        JobCommand::Create {
            name,
            priority,
            job_type,
        } => create(&mut c, name, priority, job_type).await?,
        JobCommand::Add {
            job,
            url,
            local,
            sha256,
            blake3,
            ranges,
        } => {
            let local = std::path::absolute(&local)
                .with_context(|| format!("cannot make {} absolute", local.display()))?;
            c.add_file(pb::AddFileRequest {
                job,
                url,
                local_name: local.display().to_string(),
                blake3: blake3.unwrap_or_default(),
                sha256: sha256.unwrap_or_default(),
                ranges: ranges
                    .as_deref()
                    .map(parse_ranges)
                    .transpose()?
                    .unwrap_or_default(),
            })
            .await?;
        }
        JobCommand::Resume { job } => {
            c.resume(jr(job)).await?;
        }
        JobCommand::Suspend { job } => {
            c.suspend(jr(job)).await?;
        }
        JobCommand::Cancel { job } => {
            c.cancel(jr(job)).await?;
        }
        JobCommand::Complete { job } => {
            c.complete(jr(job)).await?;
        }
        JobCommand::List { json } => {
            let jobs = c
                .list_jobs(pb::ListJobsRequest { owner: None })
                .await?
                .into_inner()
                .jobs;
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&jobs.iter().map(job_json).collect::<Vec<_>>())?
                );
            } else {
                outln!(
                    "{:<36}  {:<12}  {:<14}  {:<10}  {:>5}  {:>21}  NAME",
                    "JOB",
                    "OWNER",
                    "STATE",
                    "PRIORITY",
                    "FILES",
                    "BYTES"
                );
                for j in &jobs {
                    outln!(
                        "{:<36}  {:<12}  {:<14}  {:<10}  {:>5}  {:>21}  {}",
                        j.id,
                        user_name(j.owner),
                        state_name(j.state),
                        priority_name(j.priority),
                        j.files.len(),
                        format!("{}/{}", j.bytes_transferred, j.bytes_total),
                        j.display_name
                    );
                }
            }
        }
        JobCommand::Info { job, json } => {
            let j = c.get_job(jr(job)).await?.into_inner();
            if json {
                outln!("{}", serde_json::to_string_pretty(&job_json(&j))?);
            } else {
                print_info(&j);
            }
        }
        JobCommand::Monitor { job } => monitor(&mut c, job).await?,
        JobCommand::Set {
            job,
            name,
            priority,
            retry_delay,
            no_progress_timeout,
            notify_flags,
            notify_cmd,
            max_download_time,
            http,
        } => {
            let mut req = pb::SetPropertiesRequest {
                job,
                display_name: name,
                priority: priority.map(|p| pb::Priority::from(p) as i32),
                retry_delay_seconds: retry_delay,
                no_progress_timeout_seconds: no_progress_timeout,
                notify_flags,
                notify_cmdline: notify_cmd.map(|argv| pb::CommandLine {
                    argv: argv.into_iter().filter(|a| !a.is_empty()).collect(),
                }),
                max_download_time_seconds: max_download_time,
                ..pb::SetPropertiesRequest::default()
            };
            http.apply(&mut req, &mut std::io::stdin().lock())?;
            c.set_properties(req).await?;
        }
        JobCommand::Reply { job } => {
            use std::io::Write;
            let r = c.get_reply_data(jr(job)).await?.into_inner();
            std::io::stdout().write_all(&r.data)?;
        }
        JobCommand::SetUrl { job, file, url } => {
            c.set_remote_name(pb::SetRemoteNameRequest { job, file, url })
                .await?;
        }
        JobCommand::ReplacePrefix { job, old, new } => {
            c.replace_remote_prefix(pb::ReplaceRemotePrefixRequest {
                job,
                old_prefix: old,
                new_prefix: new,
            })
            .await?;
        }
        JobCommand::Validate { job, file, verdict } => {
            c.set_validation_state(pb::SetValidationStateRequest {
                job,
                file,
                state: match verdict {
                    Verdict::Valid => pb::ValidationState::Valid,
                    Verdict::Invalid => pb::ValidationState::Invalid,
                } as i32,
            })
            .await?;
        }
    }
    Ok(())
}

/// Per-file progress bars until the job is Transferred (exit 0) or in Error (exit 1).
async fn monitor(c: &mut ControlClient<Channel>, job: String) -> Result<()> {
    let mut stream = c
        .watch(pb::WatchRequest {
            job: job.clone(),
            progress: true,
        })
        .await?
        .into_inner();
    let j = c
        .get_job(pb::JobRef { job: job.clone() })
        .await?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>4} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bars: Vec<ProgressBar> = j
        .files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let b = multi.add(ProgressBar::new(f.bytes_total.unwrap_or(0)));
            b.set_style(style.clone());
            b.set_prefix(format!("#{i}"));
            b.set_message(f.local_name.clone());
            b.set_position(f.bytes_transferred);
            if !tty {
                b.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            b
        })
        .collect();
    let mut state = j.state;
    loop {
        if state == pb::JobState::Transferred as i32 || state == pb::JobState::Acknowledged as i32 {
            for b in &bars {
                b.finish();
            }
            outln!("{job}: {}", state_name(state));
            return Ok(());
        }
        if state == pb::JobState::Error as i32 || state == pb::JobState::Cancelled as i32 {
            let j = c
                .get_job(pb::JobRef { job: job.clone() })
                .await?
                .into_inner();
            let why = j.error.map(|e| e.description).unwrap_or_default();
            bail!("{job}: {} {why}", state_name(state));
        }
        let Some(ev) = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap_or(Ok(None))?
        else {
            // No event for a while, or the stream ended (the daemon drops a reader that falls
            // behind): ask, at most once a second.
            state = c
                .get_job(pb::JobRef { job: job.clone() })
                .await?
                .into_inner()
                .state;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        match ev.kind {
            Some(Kind::Progress(p)) => {
                state = p.state;
                for (b, f) in bars.iter().zip(&p.files) {
                    if let Some(t) = f.bytes_total {
                        b.set_length(t);
                    }
                    b.set_position(f.bytes_transferred);
                }
                if !tty {
                    eprintln!(
                        "{} {}/{} bytes",
                        state_name(p.state),
                        p.bytes_transferred,
                        p.bytes_total
                    );
                }
            }
            Some(Kind::JobModification(m)) => state = m.state,
            Some(Kind::FileTransferred(f)) if f.awaits_verdict => {
                let say = format!(
                    "file {} verified; the daemon waits for its verdict: \
                     `shoal job validate {job} {} valid` (or `invalid`); without one it counts \
                     as the daemon's validation default after its validation timeout",
                    f.file, f.file
                );
                if tty {
                    let _ = multi.println(say);
                } else {
                    eprintln!("{say}");
                }
            }
            Some(Kind::JobTransferred(_)) => state = pb::JobState::Transferred as i32,
            Some(Kind::JobError(_)) => state = pb::JobState::Error as i32,
            _ => {}
        }
    }
}

/// `shoal status`: the node, its jobs, and its figures since start laid out like Delivery
/// Optimization's `Get-DeliveryOptimizationPerfSnap`.
pub(crate) async fn status(socket: &Path, as_json: bool) -> Result<()> {
    let mut c = connect(socket).await?;
    let s = c.status(pb::StatusRequest {}).await?.into_inner();
    let by_state: BTreeMap<_, _> = s.jobs_by_state.iter().collect();
    let n = s.node.unwrap_or_default();
    let from_peers = n.bytes_from_lan_peers + n.bytes_from_group_peers + n.bytes_from_cache;
    if as_json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "peer_id": s.peer_id,
                "listen_addrs": s.listen_addrs,
                "connected_peers": s.connected_peers,
                "peer_mode": s.peer_mode,
                "group": (!s.group.is_empty()).then_some(&s.group),
                "dht_routing_peers": s.dht_routing_peers,
                "dht_provided_keys": s.dht_provided_keys,
                "jobs_by_state": by_state,
                "bytes_from_peers": s.bytes_from_peers,
                "bytes_from_origin": s.bytes_from_origin,
                "upload_pieces": s.upload_pieces,
                "upload_bytes": s.upload_bytes,
                "upload_busy": s.upload_busy,
                "node": {
                    "bytes_from_peers": from_peers,
                    "bytes_from_lan_peers": n.bytes_from_lan_peers,
                    "bytes_from_group_peers": n.bytes_from_group_peers,
                    "bytes_from_cache": n.bytes_from_cache,
                    "bytes_from_origin": n.bytes_from_origin,
                    "bytes_uploaded": n.bytes_uploaded,
                    "pieces_rejected": n.pieces_rejected,
                    "peers_banned": n.peers_banned,
                    "percent_peer_caching": n.percent_peer_caching,
                },
                "cache": s.cache.as_ref().map(|c| json!({
                    "bytes": c.bytes,
                    "limit": c.limit,
                    "entries": c.entries,
                    "pinned_bytes": c.pinned_bytes,
                })),
            }))?
        );
        return Ok(());
    }
    let jobs: Vec<String> = by_state.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let rows: Vec<(&str, String)> = vec![
        ("PeerId", s.peer_id.clone()),
        ("PeerMode", s.peer_mode.clone()),
        (
            "Group",
            if s.group.is_empty() {
                "none".into()
            } else {
                s.group.clone()
            },
        ),
        ("ConnectedPeers", s.connected_peers.to_string()),
        (
            "DhtRoutingPeers / ProvidedKeys",
            format!("{} / {}", s.dht_routing_peers, s.dht_provided_keys),
        ),
        (
            "Jobs",
            if jobs.is_empty() {
                "none".into()
            } else {
                jobs.join(", ")
            },
        ),
        ("BytesFromPeers", from_peers.to_string()),
        ("  BytesFromLanPeers", n.bytes_from_lan_peers.to_string()),
        (
            "  BytesFromGroupPeers",
            n.bytes_from_group_peers.to_string(),
        ),
        ("  BytesFromCacheServer", n.bytes_from_cache.to_string()),
        ("BytesFromHttp", n.bytes_from_origin.to_string()),
        (
            "PercentPeerCaching",
            format!("{:.1}", n.percent_peer_caching),
        ),
        ("UploadBytes", n.bytes_uploaded.to_string()),
        (
            "UploadPieces / Busy",
            format!("{} / {}", s.upload_pieces, s.upload_busy),
        ),
        ("PiecesRejected", n.pieces_rejected.to_string()),
        ("PeersBanned", n.peers_banned.to_string()),
        (
            "CacheSizeBytes / Limit / Files",
            match &s.cache {
                Some(c) => format!("{} / {} / {}", c.bytes, c.limit, c.entries),
                None => "no cache".into(),
            },
        ),
    ];
    for (k, v) in rows {
        outln!("{k:<32}: {v}");
    }
    for a in &s.listen_addrs {
        outln!("{:<32}: {a}", "ListenAddress");
    }
    Ok(())
}

/// `shoal why JOB`: the daemon's diagnosis of a job, as sentences then findings, or JSON.
pub(crate) async fn why(socket: &Path, job: &str, as_json: bool) -> Result<()> {
    let mut c = connect(socket).await?;
    let d = c
        .diagnose(pb::JobRef {
            job: job.to_owned(),
        })
        .await?
        .into_inner();
    let files: Vec<serde_json::Value> = d
        .files
        .iter()
        .map(|f| {
            json!({
                "index": f.index,
                "url": f.url,
                "peers_not_allowed": (!f.peers_not_allowed.is_empty()).then_some(&f.peers_not_allowed),
                "dht_providers": f.dht_providers,
                "asked": f.asked,
                "members_alive": f.members_alive,
                "member_fetchers": f.member_fetchers,
                "origin_share": f.origin_share,
                "answers": f.answers.iter().map(|a| json!({
                    "peer": a.peer,
                    "source": a.source,
                    "banned": a.banned,
                    "content_id": a.content_id,
                    "have": a.have,
                    "fetching": a.fetching,
                    "claimed": a.claimed,
                    "pieces": a.pieces,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    if as_json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "job": d.job.as_ref().map(job_json),
                "peer_mode": d.peer_mode,
                "group": (!d.group.is_empty()).then_some(&d.group),
                "connected_peers": d.connected_peers,
                "dht_enabled": d.dht_enabled,
                "dht_protocol": d.dht_protocol,
                "dht_routing_peers": d.dht_routing_peers,
                "origin_delay_ms": d.origin_delay_ms,
                "never_origin": d.never_origin,
                "files": files,
                "reasons": d.reasons,
            }))?
        );
        return Ok(());
    }
    for r in &d.reasons {
        outln!("- {r}");
    }
    outln!();
    outln!(
        "mode {}{}, {} peers connected, DHT {}",
        d.peer_mode,
        if d.group.is_empty() {
            String::new()
        } else {
            format!(" (group {})", d.group)
        },
        d.connected_peers,
        if d.dht_enabled {
            format!("{} with {} peers", d.dht_protocol, d.dht_routing_peers)
        } else {
            "off".into()
        }
    );
    for f in &d.files {
        outln!(
            "file {}  {}: asked {} peers, {} found in the DHT",
            f.index,
            f.url,
            f.asked,
            f.dht_providers.len()
        );
        for a in &f.answers {
            outln!(
                "  {} ({}{}): {}/{} verified, {} fetching, {} claimed",
                a.peer,
                a.source,
                if a.banned { ", banned" } else { "" },
                a.have,
                a.pieces,
                a.fetching,
                a.claimed
            );
        }
    }
    Ok(())
}

/// `shoal get` through a running daemon: one Foreground job, polled until it is transferred,
/// then completed. The job survives this process: if it is interrupted, the job goes on in
/// the daemon (see `shoal job list`).
pub(crate) async fn get_via_daemon(
    mut c: ControlClient<Channel>,
    urls: &[url::Url],
    names: &[PathBuf],
    expected: &[shoal_node::Expected],
    no_progress_timeout: u64,
) -> Result<()> {
    let start = std::time::Instant::now();
    let j = c
        .create_job(pb::CreateJobRequest {
            display_name: "shoal get".into(),
            priority: pb::Priority::Foreground as i32,
            r#type: pb::JobType::Download as i32,
        })
        .await?
        .into_inner();
    let job = j.id;
    eprintln!("shoal get: job {job} in the daemon");
    let outcome = async {
        for ((url, name), exp) in urls.iter().zip(names).zip(expected) {
            let local = std::path::absolute(name)
                .with_context(|| format!("cannot make {} absolute", name.display()))?;
            c.add_file(pb::AddFileRequest {
                job: job.clone(),
                url: url.to_string(),
                local_name: local.display().to_string(),
                blake3: exp.blake3.map(hex::encode).unwrap_or_default(),
                sha256: exp.sha256.map(|d| d.to_string()).unwrap_or_default(),
                ranges: Vec::new(),
            })
            .await?;
        }
        c.set_properties(pb::SetPropertiesRequest {
            job: job.clone(),
            retry_delay_seconds: Some(5),
            no_progress_timeout_seconds: Some(no_progress_timeout),
            ..Default::default()
        })
        .await?;
        c.resume(pb::JobRef { job: job.clone() }).await?;
        let mut shown = crate::progress::Progress::new(Duration::from_secs(no_progress_timeout));
        let signal = crate::progress::interrupted();
        tokio::pin!(signal);
        let result = loop {
            let j = c
                .get_job(pb::JobRef { job: job.clone() })
                .await?
                .into_inner();
            let state = pb::JobState::try_from(j.state);
            match state {
                Ok(pb::JobState::Transferred) => {
                    shown.finish();
                    let j = c
                        .complete(pb::JobRef { job: job.clone() })
                        .await?
                        .into_inner();
                    break Ok::<_, anyhow::Error>(j);
                }
                Ok(pb::JobState::Error) => {
                    break Err(anyhow::anyhow!(
                        "{}",
                        j.error
                            .map(|e| e.description)
                            .unwrap_or_else(|| "job error".into())
                    ));
                }
                _ => {}
            }
            let snapshot = crate::progress::Snapshot {
                state: state_name(j.state).to_owned(),
                done: j.bytes_transferred,
                total: j.bytes_total,
                from_peers: j.bytes_from_peers,
                transient: (state == Ok(pb::JobState::TransientError))
                    .then(|| j.error.as_ref().map(|e| e.description.clone()))
                    .flatten(),
            };
            if let Err(reason) = shown.update(&snapshot) {
                break Err(anyhow::anyhow!("{reason}"));
            }
            tokio::select! {
                why = &mut signal => break Err(anyhow::anyhow!("{why}")),
                () = tokio::time::sleep(shown.period()) => {}
            }
        };
        shown.finish();
        result
    }
    .await;
    let j = match outcome {
        Ok(j) => j,
        Err(e) => {
            // The user's intent, or a job that cannot finish: the daemon's job goes too, with
            // its partial files, rather than running on in the background.
            let _ = c.cancel(pb::JobRef { job: job.clone() }).await;
            return Err(e.context(format!("job {job} cancelled in the daemon")));
        }
    };
    outln!(
        "{} file(s), {} bytes in {:.1} s: {} from peers, {} from the origin; {} pieces rejected, {} peers banned",
        j.files.len(),
        j.bytes_transferred,
        start.elapsed().as_secs_f64(),
        j.bytes_from_peers,
        j.bytes_from_origin,
        j.pieces_rejected,
        j.peers_banned
    );
    for f in &j.files {
        outln!("{}", f.local_name);
    }
    Ok(())
}
