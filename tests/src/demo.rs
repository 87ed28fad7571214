//! The demo (`shoal-demo`): a self-contained swarm on 127.0.0.1.
//!
//! It starts a local HTTP origin (axum with tower-http's `ServeDir`, which honours `Range`)
//! serving generated files or the real files of a directory, one seed node holding the files,
//! and N peers of which K are rogue: [`BadPeer`]s that hold the files and serve every piece
//! with a flipped byte (the rogue behaviour lives here, in the test kit, never in the shipped
//! node). Every honest node runs one job for every file at the same moment; the report gives,
//! per node, the bytes from peers and from the origin, the pieces rejected, the peers banned,
//! the time, and whether each final file's SHA-256 equals the origin file's. Nothing leaves
//! 127.0.0.1 and mDNS stays off.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use shoal_validator::{Expected, Sha256Stream};
use tokio::sync::oneshot;

use shoal_node::{Callback, CallbackError, Error, FileSpec, JobInfo, Node, Priority, State};

use crate::{BadPeer, Misbehaviour};

/// Demo settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Peers besides the seed (rogue ones included).
    pub nodes: usize,
    /// Of those, how many serve corrupt pieces (and download nothing).
    pub rogue: usize,
    /// Size in bytes of the generated file (ignored with `dir`).
    pub size: u64,
    /// Serve the real files of this directory instead of a generated one.
    pub dir: Option<PathBuf>,
}

/// One node's line of the report.
#[derive(Clone, Debug)]
pub struct NodeReport {
    /// "seed", "node" or "rogue".
    pub role: &'static str,
    /// Verified bytes from peers.
    pub bytes_from_peers: u64,
    /// Verified bytes from the origin.
    pub bytes_from_origin: u64,
    /// Pieces rejected.
    pub pieces_rejected: u64,
    /// Peers banned.
    pub peers_banned: u64,
    /// Time from job start to Transferred.
    pub elapsed: Duration,
    /// Whether every final file equals the origin's, by SHA-256 (a rogue peer downloads
    /// nothing: true).
    pub verified: bool,
    /// The job's final state.
    pub state: State,
}

/// The demo's result.
#[derive(Clone, Debug)]
pub struct Report {
    /// The files served by the origin: name and length in bytes.
    pub files: Vec<(String, u64)>,
    /// One line per peer: the downloading nodes, then the rogue peers.
    pub nodes: Vec<NodeReport>,
}

impl Report {
    /// True when every node's files equal the origin's.
    #[must_use]
    pub fn all_verified(&self) -> bool {
        self.nodes.iter().all(|n| n.verified)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        writeln!(
            f,
            "{:<4} {:<6} {:>12} {:>12} {:>9} {:>7} {:>8} {:>9}",
            "node", "role", "peers MiB", "origin MiB", "rejected", "banned", "time s", "verified"
        )?;
        for (i, n) in self.nodes.iter().enumerate() {
            writeln!(
                f,
                "{:<4} {:<6} {:>12.1} {:>12.1} {:>9} {:>7} {:>8.2} {:>9}",
                i,
                n.role,
                mib(n.bytes_from_peers),
                mib(n.bytes_from_origin),
                n.pieces_rejected,
                n.peers_banned,
                n.elapsed.as_secs_f64(),
                match (n.role, n.verified) {
                    ("rogue", _) => "-",
                    (_, true) => "yes",
                    (_, false) => "NO",
                }
            )?;
        }
        Ok(())
    }
}

struct Done(std::sync::Mutex<Option<oneshot::Sender<()>>>);

impl Callback for Done {
    fn job_transferred(&self, _job: JobInfo) -> BoxFuture<'static, Result<(), CallbackError>> {
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
        Box::pin(async { Ok(()) })
    }

    fn job_error(
        &self,
        _job: JobInfo,
        _error: shoal_node::job::JobError,
    ) -> BoxFuture<'static, Result<(), CallbackError>> {
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
        Box::pin(async { Ok(()) })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn sha256_file(path: &Path) -> Result<shoal_validator::Sha256Digest, std::io::Error> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut sha = Sha256Stream::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(sha.finish());
        }
        sha.update(&buf[..n]);
    }
}

async fn start_origin(dir: PathBuf) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io_err(Path::new("127.0.0.1:0")))?;
    let addr = listener
        .local_addr()
        .map_err(io_err(Path::new("127.0.0.1:0")))?;
    let app = axum::Router::new().fallback_service(tower_http::services::ServeDir::new(dir));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, task))
}

fn loopback() -> Vec<shoal_node::Multiaddr> {
    vec![
        "/ip4/127.0.0.1/tcp/0"
            .parse()
            .expect("valid literal multiaddr"),
    ]
}

/// Runs the demo and reports; `progress` gets one line per step.
///
/// # Errors
/// [`Error`] when a node cannot start or a file cannot be written or hashed.
pub async fn run(config: Config, progress: impl Fn(&str)) -> Result<Report, Error> {
    let work = tempfile::tempdir().map_err(io_err(Path::new("temporary directory")))?;
    let origin_dir = match &config.dir {
        Some(d) => d.clone(),
        None => {
            let d = work.path().join("origin");
            std::fs::create_dir(&d).map_err(io_err(&d))?;
            let path = d.join("payload.bin");
            let size = config.size;
            let p = path.clone();
            tokio::task::spawn_blocking(move || write_payload(&p, size))
                .await
                .map_err(|e| Error::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })?
                .map_err(io_err(&path))?;
            d
        }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&origin_dir).map_err(io_err(&origin_dir))? {
        let entry = entry.map_err(io_err(&origin_dir))?;
        let meta = entry.metadata().map_err(io_err(&entry.path()))?;
        if meta.is_file() {
            files.push((entry.path(), meta.len()));
        }
    }
    files.sort();
    progress(&format!(
        "origin: {} file(s), {} bytes",
        files.len(),
        files.iter().map(|f| f.1).sum::<u64>()
    ));
    // Expected digests, from one pass over each file: SHA-256 only for real files (as apt
    // publishes), both for generated ones.
    let mut expected = Vec::new();
    for (path, len) in &files {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let digests =
            shoal_validator::hash_reader(std::io::BufReader::new(file), *len).map_err(|e| {
                Error::Hash {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
        expected.push(Expected {
            blake3: config.dir.is_none().then(|| *digests.content_id().hash()),
            sha256: Some(digests.sha256),
        });
    }
    let (addr, origin_task) = start_origin(origin_dir.clone()).await?;
    let seed = Node::builder()
        .listen(loopback())
        .mdns(false)
        .build()
        .await?;
    for (path, _) in &files {
        seed.seed(path).await?;
    }
    progress(&format!("seed {} ready", seed.peer_id()));
    // The rogue peers hold every file (in memory) and flip a byte in every piece they serve.
    let rogue_count = config.rogue.min(config.nodes);
    let mut contents = Vec::new();
    for (path, _) in &files {
        contents.push(std::fs::read(path).map_err(io_err(path))?);
    }
    let refs: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    let mut rogues = Vec::new();
    for _ in 0..rogue_count {
        let r = BadPeer::start_with(Misbehaviour::FlipBytes, &refs).await;
        progress(&format!("rogue {} ready", r.peer_id));
        rogues.push(r);
    }
    drop(contents);
    let mut nodes = Vec::new();
    let mut known = seed.listen_addrs().await;
    known.extend(rogues.iter().map(|r| r.addr.clone()));
    for _ in 0..config.nodes - rogue_count {
        // Straight to the loopback origin, whatever proxy the environment names: the demo
        // sends nothing anywhere but 127.0.0.1.
        let mut b = Node::builder().listen(loopback()).mdns(false).origin(
            shoal_node::config::OriginConfig {
                proxy: shoal_node::config::OriginProxy::Direct,
                ..shoal_node::config::OriginConfig::default()
            },
        );
        for a in &known {
            b = b.peer(a.clone());
        }
        let node = b.build().await?;
        known.extend(node.listen_addrs().await);
        nodes.push(node);
    }
    // Let the connections settle so every node knows the others before the jobs start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut running = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let out = work.path().join(format!("node{i}"));
        std::fs::create_dir(&out).map_err(io_err(&out))?;
        let job = node
            .create_job(&format!("demo {i}"), Priority::Foreground)
            .await?;
        for ((path, _), exp) in files.iter().zip(&expected) {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let url = format!(
                "http://{addr}/{}",
                percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
            )
            .parse()
            .map_err(|e: url::ParseError| Error::BadUrl {
                url: name.clone(),
                reason: e.to_string(),
            })?;
            node.add_file(
                job,
                FileSpec {
                    url,
                    local_name: out.join(&name),
                    expected: *exp,
                    ranges: Vec::new(),
                },
            )
            .await?;
        }
        let (tx, rx) = oneshot::channel();
        node.set_callback(job, Arc::new(Done(std::sync::Mutex::new(Some(tx)))))
            .await?;
        running.push((node.clone(), job, rx, out));
    }
    let start = Instant::now();
    for (node, job, ..) in &running {
        node.resume(*job).await?;
    }
    let mut reports = Vec::new();
    for (node, job, rx, out) in running {
        let _ = rx.await;
        let elapsed = start.elapsed();
        let info = node.info(job)?;
        if info.state == State::Transferred {
            node.complete(job).await?;
        }
        let verified = info.state == State::Transferred
            && files.iter().zip(&expected).all(|((path, _), exp)| {
                let name = path.file_name().unwrap_or_default();
                sha256_file(&out.join(name)).ok() == exp.sha256
            });
        progress(&format!("{} finished: {:?}", node.peer_id(), info.state));
        reports.push(report_of(&info, elapsed, verified));
    }
    for node in &nodes {
        node.shutdown().await;
    }
    for r in &rogues {
        reports.push(NodeReport {
            role: "rogue",
            bytes_from_peers: 0,
            bytes_from_origin: 0,
            pieces_rejected: 0,
            peers_banned: 0,
            elapsed: Duration::ZERO,
            verified: true,
            state: State::Acknowledged,
        });
        progress(&format!(
            "rogue {} answered {} requests with flipped bytes",
            r.peer_id,
            r.stats.answers.load(std::sync::atomic::Ordering::SeqCst)
        ));
    }
    seed.shutdown().await;
    origin_task.abort();
    Ok(Report {
        files: files
            .iter()
            .map(|(p, l)| {
                (
                    p.file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                    *l,
                )
            })
            .collect(),
        nodes: reports,
    })
}

fn report_of(info: &JobInfo, elapsed: Duration, verified: bool) -> NodeReport {
    NodeReport {
        role: "node",
        bytes_from_peers: info.bytes_from().peers(),
        bytes_from_origin: info.bytes_from().origin,
        pieces_rejected: info.peer_stats.pieces_rejected,
        peers_banned: info.peer_stats.peers_banned,
        elapsed,
        verified,
        state: info.state,
    }
}

/// Writes `size` bytes of pseudo-random content (xorshift, fixed seed) to `path`.
fn write_payload(path: &Path, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}
