//! The `shoal` command line: `get`, `seed`, `hash`, `daemon`, `job`, `status`, `why`, `cache`
//! and `bandwidth`.
//!
//! Only argument parsing, tracing setup, progress display and the `anyhow` edge live here; the
//! work is done by the `shoal_node` library.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use futures::future::BoxFuture;
use libp2p::Multiaddr;
use shoal_node::{
    Callback, CallbackError, Expected, FileSpec, JobInfo, Node, Priority, Sha256Digest, State,
};
use tokio::sync::mpsc;

/// `println!` that does not panic when stdout is gone: a reader that stopped reading (`shoal
/// get ... | head -1`, a script that took the line it wanted) leaves the work done and the
/// process ending as it would have; other write errors are reported on stderr.
macro_rules! outln {
    () => {
        $crate::out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` with [`outln!`]'s handling of a closed stdout.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out(format_args!($($arg)*))
    };
}

mod jobcli;
mod progress;

/// Writes to stdout; a broken pipe is ignored, other errors go to stderr (see [`outln!`]).
fn out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args)
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("shoal: cannot write to stdout: {e}");
    }
}

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Peer-to-peer delivery optimization with verified pieces"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download files from peers and their origin, verified, then complete the job.
    Get(GetArgs),
    /// Serve files to peers.
    Seed {
        /// Files to serve.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Address to listen on (repeatable).
        #[arg(long)]
        listen: Vec<Multiaddr>,
        /// Node settings (see configs/shoal.toml); flags override them.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Do not discover LAN peers with mDNS.
        #[arg(long)]
        no_mdns: bool,
    },
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell) on
    /// stdout, e.g. `shoal completions bash > /etc/bash_completion.d/shoal`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (shoal.1 and one per subcommand, clap_mangen) into DIR; the
    /// Debian package runs it at build time.
    Man {
        /// Where to write them (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Print a file's content id (BLAKE3, as b3sum), SHA-256, length and pieces.
    Hash {
        /// The file.
        file: PathBuf,
    },
    /// Run the daemon: one node with a state directory, and the control API on a Unix socket.
    Daemon {
        /// Settings (see configs/shoal.toml, its `[daemon]` section).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Manage jobs of the running daemon (like bitsadmin).
    Job {
        #[command(subcommand)]
        command: jobcli::JobCommand,
        /// The daemon's socket (default $SHOAL_SOCKET, else /run/shoal/shoal.sock).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
    },
    /// Show the daemon's status: peers, jobs by state, bytes by source, uploads.
    Status {
        #[arg(long)]
        json: bool,
        /// The daemon's socket (default $SHOAL_SOCKET, else /run/shoal/shoal.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Show the daemon's bandwidth limits and this month's uploads; with flags, change them
    /// (root only; 0 removes a limit).
    Bandwidth {
        #[command(flatten)]
        args: jobcli::BandwidthArgs,
        /// The daemon's socket (default $SHOAL_SOCKET, else /run/shoal/shoal.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Manage the daemon's cache of verified files (root only): list, pin, unpin, evict.
    Cache {
        #[command(subcommand)]
        command: jobcli::CacheCommand,
        /// The daemon's socket (default $SHOAL_SOCKET, else /run/shoal/shoal.sock).
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
    },
    /// Explain why a job of the daemon is or is not using peers: mode, group, DHT, the
    /// providers found and what they hold, bans, the source policy.
    #[command(visible_alias = "diagnose")]
    Why {
        /// The job id.
        job: String,
        #[arg(long)]
        json: bool,
        /// The daemon's socket (default $SHOAL_SOCKET, else /run/shoal/shoal.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct GetArgs {
    /// Origin URLs (http or https).
    #[arg(required = true)]
    urls: Vec<url::Url>,
    /// Output: the file (one URL, or an existing directory), or a directory (several URLs).
    #[arg(short, long)]
    output: PathBuf,
    /// Expected SHA-256 in hex, one per URL in the order of the URLs.
    #[arg(long)]
    sha256: Vec<String>,
    /// Expected BLAKE3 in hex (as b3sum prints), one per URL in the order of the URLs.
    #[arg(long)]
    blake3: Vec<String>,
    /// A peer's multiaddr, with or without /p2p/PEER_ID (repeatable).
    #[arg(long)]
    peer: Vec<Multiaddr>,
    /// Address to listen on (repeatable).
    #[arg(long)]
    listen: Vec<Multiaddr>,
    /// Keep serving the downloaded files for this many seconds after completing. Only then
    /// is the SHA-256 of a file given no --sha256 computed (to answer SHA-256 lookups).
    #[arg(long, default_value_t = 0)]
    seed_for: u64,
    /// Do not discover LAN peers with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Which peers to use: origin, lan, group (needs a `[group]` section in --config) or
    /// internet.
    #[arg(long)]
    mode: Option<shoal_node::config::PeerMode>,
    /// A DHT bootstrap peer, ending in /p2p/PEER_ID (repeatable; modes group and internet).
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// Node settings (see configs/shoal.toml); flags override them.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Give up when no source has been reachable for this many seconds (the job stays in
    /// TransientError that long; BITS's no-progress timeout).
    #[arg(long, default_value_t = 60)]
    no_progress_timeout: u64,
    /// Run an embedded node even when a daemon answers on the socket.
    #[arg(long)]
    no_daemon: bool,
    /// The daemon's socket (default $SHOAL_SOCKET, else /run/shoal/shoal.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// A builder with the settings of `config`, or the configuration file's defaults (mDNS on,
/// as in a file that does not turn it off).
fn builder(config: Option<&Path>) -> Result<shoal_node::Builder> {
    let b = Node::builder();
    match config {
        Some(path) => {
            Ok(shoal_node::config::Config::load(path)?.apply(b, &path.display().to_string())?)
        }
        None => Ok(b.mdns(true)),
    }
}

/// glibc's malloc settings for a process that moves pieces: up to 4 MiB freed at the top of a
/// heap is kept for the next allocation instead of being given back to the kernel at once
/// (`M_TRIM_THRESHOLD`), and blocks up to 2 MiB come from the heap rather than from a fresh
/// `mmap` each (`M_MMAP_THRESHOLD`). The stack below Shoal (yamux's frame bodies, rustls's
/// buffers) allocates and frees a few hundred KiB per received frame; with glibc's defaults
/// each such block came back from the kernel as fresh zeroed pages: about 29,000 page faults
/// per GiB received in a leecher, 5,700 with these settings, for about 4 MiB more resident
/// memory (16 MiB kept gave no fewer faults and 3 MiB more in an origin-only download;
/// `docs/benchmarks.md`). Setting either value turns off glibc's own adjustment of both.
/// `GLIBC_TUNABLES` still overrides them (glibc reads it before `main`; these calls come after,
/// so they are skipped when it names either).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if !tunables.contains("malloc.trim_threshold")
            && !tunables.contains("malloc.mmap_threshold")
        {
            // SAFETY: mallopt only sets malloc's parameters; no other thread exists yet.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
            }
        }
    }
}

fn main() {
    tune_malloc();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async_main());
}

async fn async_main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a journal or a log file gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = run(Cli::parse()).await {
        // The daemon's answers carry a message that names what was wrong; print just that.
        match e.downcast_ref::<tonic::Status>() {
            Some(status) => eprintln!("shoal: {}", status.message()),
            None => eprintln!("shoal: {e:#}"),
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Get(args) => get(args).await,
        Command::Seed {
            files,
            listen,
            config,
            no_mdns,
        } => seed(files, listen, config, no_mdns).await,
        Command::Hash { file } => hash(&file),
        Command::Daemon { config } => jobcli::daemon(config.as_deref()).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => {
            use clap::CommandFactory;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            clap_mangen::generate_to(Cli::command(), &out)
                .with_context(|| format!("cannot write the man pages into {}", out.display()))?;
            Ok(())
        }
        Command::Job { command, socket } => {
            jobcli::job(command, &jobcli::socket_path(socket.as_deref())).await
        }
        Command::Status { json, socket } => {
            jobcli::status(&jobcli::socket_path(socket.as_deref()), json).await
        }
        Command::Bandwidth { args, socket } => {
            jobcli::bandwidth(args, &jobcli::socket_path(socket.as_deref())).await
        }
        Command::Cache { command, socket } => {
            jobcli::cache(command, &jobcli::socket_path(socket.as_deref())).await
        }
        Command::Why { job, json, socket } => {
            jobcli::why(&jobcli::socket_path(socket.as_deref()), &job, json).await
        }
    }
}

fn hash(file: &Path) -> Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = f.metadata()?.len();
    let d = shoal_validator::hash_reader(std::io::BufReader::new(f), len)
        .with_context(|| format!("cannot hash {}", file.display()))?;
    let id = d.content_id();
    outln!("blake3      {}", id.hash_hex());
    outln!("sha256      {}", d.sha256);
    outln!("length      {len}");
    outln!("piece size  {}", id.piece_size());
    outln!("pieces      {}", id.piece_count());
    outln!("content id  {id}");
    Ok(())
}

async fn seed(
    files: Vec<PathBuf>,
    listen: Vec<Multiaddr>,
    config: Option<PathBuf>,
    no_mdns: bool,
) -> Result<()> {
    let mut b = builder(config.as_deref())?;
    if no_mdns {
        b = b.mdns(false);
    }
    if !listen.is_empty() {
        b = b.listen(listen);
    }
    let node = b.build().await?;
    outln!("peer id {}", node.peer_id());
    for a in node.listen_addrs().await {
        outln!("listening {a}");
    }
    for f in &files {
        let id = node.seed(f).await?;
        outln!("{}  {}", id, f.display());
    }
    tokio::signal::ctrl_c().await?;
    node.shutdown().await;
    Ok(())
}

/// Completes the job when it is transferred, and reports the end either way.
struct Finisher {
    node: Node,
    done: mpsc::Sender<std::result::Result<(), String>>,
}

impl Callback for Finisher {
    fn job_transferred(&self, job: JobInfo) -> BoxFuture<'static, Result<(), CallbackError>> {
        let (node, done) = (self.node.clone(), self.done.clone());
        Box::pin(async move {
            let result = node.complete(job.id).await.map_err(|e| e.to_string());
            let _ = done.send(result).await;
            Ok(())
        })
    }

    fn job_error(
        &self,
        _job: JobInfo,
        error: shoal_node::job::JobError,
    ) -> BoxFuture<'static, Result<(), CallbackError>> {
        let done = self.done.clone();
        Box::pin(async move {
            let _ = done.send(Err(error.description)).await;
            Ok(())
        })
    }
}

fn digests(args: &GetArgs) -> Result<Vec<Expected>> {
    let n = args.urls.len();
    if !args.sha256.is_empty() && args.sha256.len() != n {
        bail!("give --sha256 once per URL ({n}), or not at all");
    }
    if !args.blake3.is_empty() && args.blake3.len() != n {
        bail!("give --blake3 once per URL ({n}), or not at all");
    }
    (0..n)
        .map(|i| {
            Ok(Expected {
                sha256: args
                    .sha256
                    .get(i)
                    .map(|h| h.parse::<Sha256Digest>())
                    .transpose()
                    .context("bad --sha256")?,
                blake3: args
                    .blake3
                    .get(i)
                    .map(|h| shoal_protocol::id::parse_blake3_hex(h))
                    .transpose()
                    .context("bad --blake3")?,
            })
        })
        .collect()
}

fn local_names(args: &GetArgs) -> Result<Vec<PathBuf>> {
    let name_of = |u: &url::Url| -> Result<String> {
        let seg = u
            .path_segments()
            .and_then(|mut s| s.next_back())
            .filter(|s| !s.is_empty())
            .with_context(|| format!("{u} has no file name in its path; give -o FILE"))?;
        let name = percent_encoding::percent_decode_str(seg)
            .decode_utf8()
            .with_context(|| format!("{u}: file name is not UTF-8"))?
            .into_owned();
        if name == ".." || name == "." || name.contains('/') {
            bail!("{u}: unusable file name {name:?}");
        }
        Ok(name)
    };
    if args.urls.len() == 1 && !args.output.is_dir() {
        return Ok(vec![args.output.clone()]);
    }
    if !args.output.is_dir() {
        bail!(
            "-o {} must be an existing directory when several URLs are given",
            args.output.display()
        );
    }
    args.urls
        .iter()
        .map(|u| Ok(args.output.join(name_of(u)?)))
        .collect()
}

/// The node `shoal get` runs without a daemon: the configuration file's, with the flags.
fn get_builder(args: &GetArgs) -> Result<shoal_node::Builder> {
    // Nobody can ask this node for the file by its SHA-256 once it stops: do not compute
    // one that is not expected, unless it seeds on.
    let mut b = builder(args.config.as_deref())?.sha256_only_when_expected(args.seed_for == 0);
    if args.no_mdns {
        b = b.mdns(false);
    }
    if !args.listen.is_empty() {
        b = b.listen(args.listen.clone());
    }
    for p in &args.peer {
        b = b.peer(p.clone());
    }
    if let Some(m) = args.mode {
        b = b.mode(m);
    }
    for a in &args.bootstrap {
        if !a
            .iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
        {
            bail!("--bootstrap {a}: the address must end in /p2p/PEER_ID");
        }
        b = b.bootstrap(a.clone());
    }
    Ok(b)
}

/// Shows the job's progress ([`progress::Progress`]) until the callback reports its end, the
/// job made no progress for `no_progress_timeout` seconds, or Ctrl-C or SIGTERM came: each of
/// the last two is an `Err` with the reason.
async fn watch(
    node: &Node,
    job: shoal_node::JobId,
    mut rx: mpsc::Receiver<std::result::Result<(), String>>,
    no_progress_timeout: u64,
) -> Result<std::result::Result<(), String>> {
    let mut shown = progress::Progress::new(Duration::from_secs(no_progress_timeout));
    let mut tick = tokio::time::interval(shown.period());
    let signal = progress::interrupted();
    tokio::pin!(signal);
    let outcome = loop {
        tokio::select! {
            r = rx.recv() => break r.unwrap_or_else(|| Err("the node stopped".into())),
            why = &mut signal => break Err(why.to_owned()),
            _ = tick.tick() => {
                let info = node.info(job)?;
                let snapshot = progress::Snapshot {
                    state: info.state.to_string(),
                    done: info.bytes_transferred(),
                    total: info.bytes_total(),
                    from_peers: info.bytes_from().peers(),
                    transient: (info.state == State::TransientError)
                        .then(|| info.error.as_ref().map(|e| e.description.clone()))
                        .flatten(),
                };
                if let Err(reason) = shown.update(&snapshot) {
                    break Err(reason);
                }
            }
        }
    };
    shown.finish();
    Ok(outcome)
}

async fn get(args: GetArgs) -> Result<()> {
    let expected = digests(&args)?;
    let names = local_names(&args)?;
    if !args.no_daemon {
        let socket = jobcli::socket_path(args.socket.as_deref());
        if socket.exists()
            && let Err(e) = std::os::unix::net::UnixStream::connect(&socket)
            && e.kind() == std::io::ErrorKind::PermissionDenied
        {
            eprintln!(
                "shoal get: {}; running a node in this process instead",
                jobcli::socket_error(&socket, &e)
            );
        } else if socket.exists()
            && let Ok(client) = jobcli::connect(&socket).await
        {
            return jobcli::get_via_daemon(
                client,
                &args.urls,
                &names,
                &expected,
                args.no_progress_timeout,
            )
            .await;
        }
    }
    let node = get_builder(&args)?.build().await?;
    let job = node.create_job("shoal get", Priority::Foreground).await?;
    for ((url, name), exp) in args.urls.iter().zip(&names).zip(&expected) {
        node.add_file(
            job,
            FileSpec {
                url: url.clone(),
                local_name: name.clone(),
                expected: *exp,
                ranges: Vec::new(),
            },
        )
        .await?;
    }
    let (tx, rx) = mpsc::channel(1);
    node.set_callback(
        job,
        Arc::new(Finisher {
            node: node.clone(),
            done: tx,
        }),
    )
    .await?;
    node.set_retry_delay(job, Duration::from_secs(5)).await?;
    let start = Instant::now();
    node.resume(job).await?;
    let outcome = watch(&node, job, rx, args.no_progress_timeout).await?;
    let info = node.info(job)?;
    if let Err(reason) = outcome {
        // Cancel deletes the temporary files: an interrupted or failed `get` leaves nothing
        // behind, and the next one starts afresh.
        let _ = node.cancel(job).await;
        node.shutdown().await;
        bail!("{reason}; the job was cancelled and its partial files removed");
    }
    outln!(
        "{} file(s), {} bytes in {:.1} s: {} from peers, {} from the origin; {} pieces rejected, {} peers banned",
        info.files.len(),
        info.bytes_transferred(),
        start.elapsed().as_secs_f64(),
        info.bytes_from().peers(),
        info.bytes_from().origin,
        info.peer_stats.pieces_rejected,
        info.peer_stats.peers_banned
    );
    for f in &info.files {
        outln!("{}", f.local_name.display());
    }
    if args.seed_for > 0 {
        for a in node.listen_addrs().await {
            outln!("seeding on {a}");
        }
        tokio::time::sleep(Duration::from_secs(args.seed_for)).await;
    }
    node.shutdown().await;
    Ok(())
}
