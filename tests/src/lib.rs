//! The multi-node test harness: [`TestOrigin`], an in-process HTTP origin that counts what it
//! serves and misbehaves on request, and [`test_node`], a node bound to 127.0.0.1 with mDNS off.
//!
//! Everything listens on 127.0.0.1 only; nothing is sent to any other address, except inside
//! the network namespaces of [`netns`], which a test creates and removes itself.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures::StreamExt;
use shoal_node::{
    Node,
    config::{OriginConfig, SchedulerConfig},
};

pub mod bad_peer;
pub mod bench;
pub mod bits_server;
pub mod demo;
pub mod fuzz;
pub mod netns;
pub mod proxy;
pub mod tls;
pub use bad_peer::{BadPeer, Misbehaviour};

/// What the test origin serves and how it misbehaves.
#[derive(Default)]
pub struct OriginState {
    files: Mutex<HashMap<String, (Bytes, String)>>,
    /// Bytes of response bodies sent.
    pub bytes_served: AtomicU64,
    /// Requests answered (all statuses).
    pub requests: AtomicU32,
    /// Answer this many next requests with 500.
    pub fail_next: AtomicU32,
    /// Ignore `Range` and always send the whole body with 200.
    pub no_range: AtomicBool,
    /// Send bodies at this many bytes per second (0: as fast as possible).
    pub throttle_bytes_per_sec: AtomicU64,
    /// All bodies together at most this many bytes per second, like one WAN link shared by
    /// every client (0: no limit).
    pub wan_bytes_per_sec: AtomicU64,
    /// When the shared link is free again.
    wan_free_at: Mutex<Option<tokio::time::Instant>>,
    /// Where `/redirect/NAME` points: `BASE/NAME` when set (another origin), else `/NAME`.
    pub redirect_base: Mutex<Option<String>>,
    /// Faults armed for given requests ([`TestOrigin::cut_request`],
    /// [`TestOrigin::replace_after_request`]), and what each request asked for.
    faults: Mutex<Faults>,
    /// The headers of every `/NAME` request, in order.
    pub request_headers: Mutex<Vec<HeaderMap>>,
    /// When set, `/NAME` answers 401 unless `Authorization` is exactly this.
    pub require_authorization: Mutex<Option<String>>,
}

/// Faults tied to request numbers (the n-th request the origin answers, counting from 1 over
/// all its routes), so that a test arms them before the download starts and they happen
/// whatever the timing.
#[derive(Default)]
struct Faults {
    /// Cut the body of request `.0` after `.1` bytes.
    cut: Option<(u32, u64)>,
    /// Once request `.0` is answered, serve `.2` at `/.1`.
    replace: Option<(u32, String, Bytes)>,
    /// Each `/NAME` request: its number and the byte range it asked for (`None`: no `Range`).
    log: Vec<(u32, Option<(u64, u64)>)>,
}

/// An in-process HTTP origin on 127.0.0.1 with Range, ETag and If-Range support (HTTPS with
/// [`TestOrigin::start_tls`]).
pub struct TestOrigin {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// `http` or `https`.
    scheme: &'static str,
    /// Its state: files, counters and misbehaviour switches.
    pub state: Arc<OriginState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestOrigin {
    /// Starts an origin on a random loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(OriginState::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let app = Self::app(&state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            scheme: "http",
            state,
            task,
        }
    }

    /// Starts an HTTPS origin on a random loopback port with the server certificate of
    /// `pki`; with `client_auth`, it requires a client certificate issued by `pki`'s CA.
    pub async fn start_tls(pki: &tls::TestPki, client_auth: bool) -> Self {
        let state = Arc::new(OriginState::default());
        let listener = tls::TlsListener::bind(pki, client_auth).await;
        let addr = axum::serve::Listener::local_addr(&listener).expect("local addr");
        let app = Self::app(&state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            scheme: "https",
            state,
            task,
        }
    }

    fn app(state: &Arc<OriginState>) -> Router {
        Router::new()
            .route("/{name}", get(serve))
            .route("/redirect/{name}", get(redirect))
            .with_state(state.clone())
    }

    /// Serves `bytes` at `/name`, replacing what was there (with a new ETag).
    pub fn put(&self, name: &str, bytes: impl Into<Bytes>) {
        let bytes = bytes.into();
        let tag = etag(&bytes);
        self.state
            .files
            .lock()
            .expect("origin lock")
            .insert(name.to_owned(), (bytes, tag));
    }

    /// The URL of `/name`.
    pub fn url(&self, name: &str) -> url::Url {
        format!("{}://{}/{name}", self.scheme, self.addr)
            .parse()
            .expect("valid URL")
    }

    /// Requests answered so far (all statuses).
    pub fn requests(&self) -> u32 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Bytes of bodies sent so far.
    pub fn bytes_served(&self) -> u64 {
        self.state.bytes_served.load(Ordering::SeqCst)
    }

    /// Cuts the body of the `n`-th request from now (1: the next one) after `after` bytes: the
    /// connection fails there.
    pub fn cut_request(&self, n: u32, after: u64) {
        let at = self.requests() + n;
        self.state.faults.lock().expect("origin lock").cut = Some((at, after));
    }

    /// Serves `bytes` at `/name` (with a new ETag) from the request after the `n`-th from now
    /// on: the content changes between two requests of a download.
    pub fn replace_after_request(&self, n: u32, name: &str, bytes: impl Into<Bytes>) {
        let at = self.requests() + n;
        self.state.faults.lock().expect("origin lock").replace =
            Some((at, name.to_owned(), bytes.into()));
    }

    /// The `/NAME` requests so far, in order: each one's number (counting every request the
    /// origin answered, from 1) and the byte range it asked for, first and last byte
    /// inclusive (`None`: no `Range` header, or one that does not parse).
    pub fn requests_with_range(&self) -> Vec<(u32, Option<(u64, u64)>)> {
        self.state.faults.lock().expect("origin lock").log.clone()
    }
}

/// `/redirect/NAME` answers 302 to `/NAME`, or to `BASE/NAME` with a redirect base set.
async fn redirect(State(state): State<Arc<OriginState>>, Path(name): Path<String>) -> Response {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let base = state
        .redirect_base
        .lock()
        .expect("origin lock")
        .clone()
        .unwrap_or_default();
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, format!("{base}/{name}"))
        .body(Body::empty())
        .expect("valid response")
}

/// The `Last-Modified` of every file of a [`TestOrigin`]; a request with this exact
/// `If-Modified-Since` gets `304 Not Modified`.
pub const LAST_MODIFIED: &str = "Tue, 01 Dec 2026 10:00:00 GMT";

/// The strong ETag the origin gives `bytes`.
fn etag(bytes: &[u8]) -> String {
    format!("\"{}\"", &blake3::hash(bytes).to_hex()[..16])
}

fn parse_range(h: &HeaderMap, len: u64) -> Option<(u64, u64)> {
    let v = h.get(header::RANGE)?.to_str().ok()?;
    let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end: u64 = if b.is_empty() {
        len.checked_sub(1)?
    } else {
        b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

async fn serve(
    State(state): State<Arc<OriginState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let number = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    state
        .request_headers
        .lock()
        .expect("origin lock")
        .push(headers.clone());
    let required = state
        .require_authorization
        .lock()
        .expect("origin lock")
        .clone();
    if let Some(want) = required
        && headers
            .get(header::AUTHORIZATION)
            .is_none_or(|v| v.as_bytes() != want.as_bytes())
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let armed_cut = {
        let mut faults = state.faults.lock().expect("origin lock");
        // As asked, whatever the file's length (an open end reads as `u64::MAX - 1`).
        faults.log.push((number, parse_range(&headers, u64::MAX)));
        if let Some((at, _, _)) = &faults.replace
            && number > *at
            && let Some((_, file, bytes)) = faults.replace.take()
        {
            let tag = etag(&bytes);
            state
                .files
                .lock()
                .expect("origin lock")
                .insert(file, (bytes, tag));
        }
        match faults.cut {
            Some((at, after)) if at == number => {
                faults.cut = None;
                after
            }
            _ => 0,
        }
    };
    if state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let Some((bytes, etag)) = state.files.lock().expect("origin lock").get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Every file was last modified at the same moment; a client that has it gets a 304.
    if headers
        .get(header::IF_MODIFIED_SINCE)
        .is_some_and(|v| v.as_bytes() == LAST_MODIFIED.as_bytes())
    {
        return Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header(header::LAST_MODIFIED, LAST_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }
    let len = bytes.len() as u64;
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().ok() == Some(etag.as_str()));
    let range = if state.no_range.load(Ordering::SeqCst) || !if_range_ok {
        None
    } else {
        parse_range(&headers, len)
    };
    let (status, body, content_range) = match range {
        Some((s, e)) => (
            StatusCode::PARTIAL_CONTENT,
            bytes.slice(s as usize..=e as usize),
            Some(format!("bytes {s}-{e}/{len}")),
        ),
        None => (StatusCode::OK, bytes, None),
    };
    let cut = armed_cut;
    let mut builder = Response::builder()
        .status(status)
        .header(header::ETAG, etag)
        .header(header::LAST_MODIFIED, LAST_MODIFIED)
        .header(header::CONTENT_LENGTH, body.len());
    if !state.no_range.load(Ordering::SeqCst) {
        builder = builder.header(header::ACCEPT_RANGES, "bytes");
    }
    if let Some(cr) = content_range {
        builder = builder.header(header::CONTENT_RANGE, cr);
    }
    let body = if cut > 0 && cut < body.len() as u64 {
        state.bytes_served.fetch_add(cut, Ordering::SeqCst);
        let head = body.slice(..cut as usize);
        Body::from_stream(futures::stream::iter(vec![
            Ok::<_, std::io::Error>(head),
            Err(std::io::Error::other("connection cut by the test origin")),
        ]))
    } else if let rate @ 1.. = state.wan_bytes_per_sec.load(Ordering::SeqCst) {
        // Chunks of 16 KiB through one shared link: each waits for its slot on it.
        const CHUNK: usize = 16 * 1024;
        let shared = state.clone();
        let chunks: Vec<Bytes> = (0..body.len().div_ceil(CHUNK))
            .map(|i| body.slice(i * CHUNK..((i + 1) * CHUNK).min(body.len())))
            .collect();
        Body::from_stream(futures::stream::iter(chunks).then(move |c| {
            let shared = shared.clone();
            async move {
                let slot = Duration::from_secs_f64(c.len() as f64 / rate as f64);
                let done = {
                    let mut free = shared.wan_free_at.lock().expect("wan lock");
                    // The link's schedule goes on from where it was unless it idled for more
                    // than 10 ms: timers wake up to a millisecond late, and a stream that
                    // started each slot anew from "now" would lose that every 16 KiB (a single
                    // stream at 64 MiB/s would get a quarter of it).
                    let now = tokio::time::Instant::now();
                    let start = free
                        .filter(|t| *t + Duration::from_millis(10) > now)
                        .unwrap_or(now);
                    *free = Some(start + slot);
                    start + slot
                };
                tokio::time::sleep_until(done).await;
                shared
                    .bytes_served
                    .fetch_add(c.len() as u64, Ordering::SeqCst);
                Ok::<_, std::io::Error>(c)
            }
        }))
    } else if state.throttle_bytes_per_sec.load(Ordering::SeqCst) > 0 {
        // Chunks of 16 KiB, each after the delay the rate asks for when it is its turn (a
        // rate set to 0 meanwhile lets the rest go at once); bytes are counted as sent.
        const CHUNK: usize = 16 * 1024;
        let counter = state.clone();
        let chunks: Vec<Bytes> = (0..body.len().div_ceil(CHUNK))
            .map(|i| body.slice(i * CHUNK..((i + 1) * CHUNK).min(body.len())))
            .collect();
        Body::from_stream(futures::stream::iter(chunks).then(move |c| {
            let counter = counter.clone();
            async move {
                let rate = counter.throttle_bytes_per_sec.load(Ordering::SeqCst);
                if rate > 0 {
                    tokio::time::sleep(Duration::from_secs_f64(c.len() as f64 / rate as f64)).await;
                }
                counter
                    .bytes_served
                    .fetch_add(c.len() as u64, Ordering::SeqCst);
                Ok::<_, std::io::Error>(c)
            }
        }))
    } else {
        state
            .bytes_served
            .fetch_add(body.len() as u64, Ordering::SeqCst);
        Body::from(body)
    };
    builder.body(body).expect("valid response")
}

/// Deterministic test content of `len` bytes, different for each `seed`.
pub fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A node on 127.0.0.1 (TCP), mDNS off, short retry delay and origin backoff, dialing `peers`;
/// returned once connected to them all, or after 10 s (a test of a peer that cannot be reached
/// goes on): on a loaded machine a job started at once could give up on its peers for the
/// origin before the dials complete, and a test that expects bytes from peers would fail.
pub async fn test_node(peers: &[Node]) -> Node {
    let node = test_builder(peers)
        .await
        .build()
        .await
        .expect("node starts on 127.0.0.1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node.connected_count() < peers.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node
}

/// A [`test_node`] that also dials the hostile peers `bad`.
pub async fn test_node_with(peers: &[Node], bad: &[&BadPeer]) -> Node {
    let mut b = test_builder(peers).await;
    for p in bad {
        b = b.peer(p.addr.clone());
    }
    b.build().await.expect("node starts on 127.0.0.1")
}

/// A [`test_node`] with no peers that keeps its jobs in the state directory `state`.
pub async fn stateful_node(state: &std::path::Path) -> Node {
    test_builder(&[])
        .await
        .state_dir(state)
        .build()
        .await
        .expect("node starts with its state directory")
}

/// The builder of [`test_node`], to adjust before `build`.
pub async fn test_builder(peers: &[Node]) -> shoal_node::Builder {
    let mut b = Node::builder()
        .listen(vec![
            "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr"),
        ])
        .mdns(false)
        .retry_delay(Duration::from_millis(200))
        .origin(OriginConfig {
            retries: 3,
            backoff: Duration::from_millis(20),
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(5),
            // Whatever proxy the environment names, tests reach their loopback origins directly.
            proxy: shoal_node::config::OriginProxy::Direct,
        })
        .scheduler(SchedulerConfig {
            peer_backoff: Duration::from_millis(50),
            ..SchedulerConfig::default()
        });
    for p in peers {
        for a in p.listen_addrs().await {
            b = b.peer(a);
        }
    }
    b
}

/// A daemon running in this process on a Unix socket in a test directory, with callers
/// identified by the `x-test-uid` request header instead of the socket's peer credentials
/// (the test cannot run as a second Unix user).
pub struct TestDaemon {
    /// The socket path.
    pub socket: std::path::PathBuf,
    /// The daemon's node.
    pub node: Node,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Takes the caller's uid from the `x-test-uid` header.
struct HeaderUid;

impl shoal_node::daemon::Credentials for HeaderUid {
    fn caller(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        _: &tonic::Extensions,
    ) -> Option<shoal_node::daemon::Caller> {
        let uid = metadata.get("x-test-uid")?.to_str().ok()?.parse().ok()?;
        Some(shoal_node::daemon::Caller { uid })
    }
}

impl TestDaemon {
    /// Starts a daemon with `config` (its socket is replaced by one in `dir`), its state in
    /// `dir/state`, the settings of [`test_node`].
    pub async fn start(dir: &std::path::Path, config: shoal_node::daemon::DaemonConfig) -> Self {
        Self::start_with(dir, config, true).await
    }

    /// Like [`TestDaemon::start`], but callers are who the socket's peer credentials say
    /// (this test process's user), as with a real daemon: for clients that cannot add the
    /// test header, such as the apt method.
    pub async fn start_with_peer_credentials(
        dir: &std::path::Path,
        config: shoal_node::daemon::DaemonConfig,
    ) -> Self {
        Self::start_with(dir, config, false).await
    }

    async fn start_with(
        dir: &std::path::Path,
        mut config: shoal_node::daemon::DaemonConfig,
        header_uid: bool,
    ) -> Self {
        config.socket = dir.join("shoal.sock");
        let socket = config.socket.clone();
        let builder = test_builder(&[]).await.state_dir(dir.join("state"));
        let mut daemon = shoal_node::daemon::Daemon::start(builder, config)
            .await
            .expect("daemon starts");
        if header_uid {
            daemon = daemon.with_credentials(Arc::new(HeaderUid));
        }
        let node = daemon.node().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            daemon
                .serve(async move {
                    let _ = stopped.await;
                })
                .await
                .expect("daemon serves");
        });
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            socket,
            node,
            stop: Some(stop),
            task,
        }
    }

    /// A client calling as user `uid`.
    pub async fn client(&self, uid: u32) -> Client {
        client_at(&self.socket, uid).await
    }

    /// Stops the daemon and its node.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Bounded: a stop that hangs fails the test instead of blocking the run.
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("the daemon stops within 20 s")
            .expect("the daemon task ends cleanly");
    }
}

/// A client of the daemon on `socket`, sending `x-test-uid: uid` (which a daemon that reads
/// the socket's peer credentials ignores).
pub async fn client_at(socket: &std::path::Path, uid: u32) -> Client {
    let channel = tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))
        .expect("socket URI")
        .connect()
        .await
        .expect("connect to the daemon");
    shoal_node::daemon::control::control_client::ControlClient::with_interceptor(
        channel,
        AsUid(uid),
    )
}

/// A control API client with the `x-test-uid` header.
pub type Client = shoal_node::daemon::control::control_client::ControlClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, AsUid>,
>;

/// Adds `x-test-uid` to every request.
#[derive(Clone, Copy)]
pub struct AsUid(pub u32);

impl tonic::service::Interceptor for AsUid {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut()
            .insert("x-test-uid", self.0.to_string().parse().expect("ascii"));
        Ok(req)
    }
}

/// A real second Unix user, for the tests of a daemon running as root on behalf of users: a
/// login name, its uid and primary group, a supplementary group, and a home directory.
#[derive(Clone, Debug)]
pub struct TestUser {
    /// The login name (`shoal-test`).
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    /// A supplementary group it is a member of (`shoal-test-extra`).
    pub extra_gid: u32,
    /// Its home directory.
    pub home: std::path::PathBuf,
}

/// The path of the binary `name` of the `shoal-node` package: beside the directory of this
/// test binary (`target/PROFILE/`), where `cargo test --workspace` builds it (the package has
/// integration tests of its own, so cargo builds its binaries first). Panics, saying what to
/// run, when it is not there.
pub fn node_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/PROFILE/deps/TEST-HASH
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test binary is in target/PROFILE/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, or build it first with \
         `cargo build -p shoal-node --bin {name}`",
        bin.display()
    );
    bin
}

/// Runs `shoal job --socket SOCKET ARGS...` as `user` (its uid and primary group), blocking,
/// and answers what it printed and its exit status.
pub fn shoal_job_as(
    user: &TestUser,
    socket: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(node_bin("shoal"))
        .arg("job")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .uid(user.uid)
        .gid(user.gid)
        .output()
        .expect("run shoal job")
}

/// The test user, created (with `groupadd`/`useradd`) the first time it is asked for. Panics
/// when the tests do not run as root or the user cannot be created: a test that needs a
/// second user must not pass without one (CI runs as root).
pub fn test_user() -> TestUser {
    static USER: std::sync::OnceLock<TestUser> = std::sync::OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: `geteuid` has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root to act for a second user (CI runs as root)"
        );
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
        };
        let home = std::path::PathBuf::from("/var/tmp/shoal-test-home");
        let _ = run("groupadd", &["-f", "shoal-test-extra"]);
        if !run("id", &["-u", "shoal-test"]).status.success() {
            let out = run(
                "useradd",
                &[
                    "--create-home",
                    "--home-dir",
                    &home.display().to_string(),
                    "--shell",
                    "/bin/sh",
                    "--groups",
                    "shoal-test-extra",
                    "shoal-test",
                ],
            );
            assert!(
                out.status.success(),
                "useradd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let num = |args: &[&str]| -> u32 {
            let out = run(args[0], &args[1..]);
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .rsplit(':')
                .find(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("cannot read {args:?}"))
        };
        let extra = run("getent", &["group", "shoal-test-extra"]);
        let extra_gid = String::from_utf8_lossy(&extra.stdout)
            .split(':')
            .nth(2)
            .and_then(|s| s.trim().parse().ok())
            .expect("the group shoal-test-extra exists");
        std::fs::create_dir_all(&home).expect("home directory");
        let uid = num(&["id", "-u", "shoal-test"]);
        let gid = num(&["id", "-g", "shoal-test"]);
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).expect("chown home");
        TestUser {
            name: "shoal-test".into(),
            uid,
            gid,
            extra_gid,
            home,
        }
    })
    .clone()
}
