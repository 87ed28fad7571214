//! A BITS upload server on 127.0.0.1, written from Microsoft's BITS Upload Protocol pages
//! (`BITS_POST` with `BITS-Packet-Type` Ping, Create-Session, Fragment, Close-Session and
//! Cancel-Session; the Ack packets with `BITS-Session-Id`, `BITS-Protocol`,
//! `BITS-Received-Content-Range` and `BITS-Reply-URL`), with switches for the faults a client
//! must survive: a refused Create-Session, a server that acknowledges less than it was sent, a
//! reply URL that fails.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, State},
    http::{HeaderMap, Method, Response, StatusCode},
    routing::any,
};

/// The BITS 1.5 Upload Protocol's id, which a client lists in `BITS-Supported-Protocols`.
pub const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";

/// What the server holds and how it misbehaves.
#[derive(Default)]
pub struct BitsState {
    /// Open sessions: id → (remote path, bytes received in order).
    sessions: Mutex<HashMap<String, (String, Vec<u8>)>>,
    next_session: AtomicU32,
    /// Files committed by Close-Session: remote path → content.
    pub committed: Mutex<HashMap<String, Vec<u8>>>,
    /// Every packet type received, in order (`Ping`, `Create-Session`, ...).
    pub packets: Mutex<Vec<String>>,
    /// The `Authorization` header of every request.
    pub authorizations: Mutex<Vec<Option<String>>>,
    /// When not 0: Create-Session answers this status (with BITS's error headers).
    pub create_status: AtomicU16,
    /// The next Fragment keeps (and acknowledges) this many bytes less than it was sent.
    pub ack_short: AtomicU64,
    /// When set: an upload-reply session's last Fragment Ack names `/reply/ID`, which serves
    /// this body.
    pub reply: Mutex<Option<Vec<u8>>>,
    /// When not 0: the reply URL answers this status.
    pub reply_status: AtomicU16,
    /// Fragments answered 500 before being read: the next this many.
    pub fail_fragments: AtomicU32,
    /// Each Fragment's Ack waits this many milliseconds (a slow link).
    pub fragment_delay_ms: AtomicU64,
}

impl BitsState {
    /// The packet types received so far.
    pub fn packets(&self) -> Vec<String> {
        self.packets.lock().expect("bits lock").clone()
    }

    /// The content committed at `path` (as the URL's path, `/up/a.bin`).
    pub fn committed(&self, path: &str) -> Option<Vec<u8>> {
        self.committed.lock().expect("bits lock").get(path).cloned()
    }

    /// Open sessions.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().expect("bits lock").len()
    }
}

/// The server; it stops when dropped.
pub struct BitsServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state and switches.
    pub state: Arc<BitsState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BitsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BitsServer {
    /// Starts a server on a random loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(BitsState::default());
        let app = Router::new()
            .route("/reply/{id}", any(reply))
            .route("/up/{name}", any(packet))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, state, task }
    }

    /// The upload URL of `name`.
    pub fn url(&self, name: &str) -> url::Url {
        format!("http://{}/up/{name}", self.addr)
            .parse()
            .expect("valid URL")
    }
}

fn ack(status: StatusCode) -> axum::http::response::Builder {
    Response::builder()
        .status(status)
        .header("BITS-Packet-Type", "Ack")
}

fn error(status: StatusCode, code: &str) -> Response<Body> {
    ack(status)
        .header("BITS-Error-Code", code)
        .header("BITS-Error-Context", "0x5")
        .header("Content-Length", "0")
        .body(Body::empty())
        .expect("response")
}

/// `bytes START-END/TOTAL` → (START, END inclusive, TOTAL).
fn content_range(h: &HeaderMap) -> Option<(u64, u64, u64)> {
    let v = h.get("Content-Range")?.to_str().ok()?;
    let rest = v
        .strip_prefix("bytes ")
        .or_else(|| v.strip_prefix("Bytes "))?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((
        a.trim().parse().ok()?,
        b.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

/// BG_E_SESSION_NOT_FOUND.
const SESSION_NOT_FOUND: &str = "0x8020001F";

async fn packet(
    State(state): State<Arc<BitsState>>,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    if method.as_str() != "BITS_POST" {
        return error(StatusCode::METHOD_NOT_ALLOWED, "0x80070032");
    }
    let path = format!("/up/{name}");
    let kind = headers
        .get("BITS-Packet-Type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    state.packets.lock().expect("bits lock").push(kind.clone());
    state.authorizations.lock().expect("bits lock").push(
        headers
            .get("Authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    let session = headers
        .get("BITS-Session-Id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ok = || ack(StatusCode::OK).header("Content-Length", "0");
    match kind.as_str() {
        "Ping" => ok().body(Body::empty()).expect("response"),
        "Create-Session" => {
            let offered = headers
                .get("BITS-Supported-Protocols")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !offered
                .split_whitespace()
                .any(|p| p.eq_ignore_ascii_case(PROTOCOL))
            {
                return error(StatusCode::BAD_REQUEST, "0x80070057");
            }
            let status = state.create_status.load(Ordering::SeqCst);
            if status != 0 {
                return error(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN),
                    "0x80070005",
                );
            }
            let n = state.next_session.fetch_add(1, Ordering::SeqCst);
            let id = format!("{{00000000-0000-4000-8000-{n:012x}}}");
            state
                .sessions
                .lock()
                .expect("bits lock")
                .insert(id.clone(), (path, Vec::new()));
            ack(StatusCode::CREATED)
                .header("BITS-Protocol", PROTOCOL)
                .header("BITS-Session-Id", id)
                .header("Accept-Encoding", "Identity")
                .header("Content-Length", "0")
                .body(Body::empty())
                .expect("response")
        }
        "Fragment" => {
            let delay = state.fragment_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            }
            if state
                .fail_fragments
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return error(StatusCode::INTERNAL_SERVER_ERROR, "0x80004005");
            }
            let Some(id) = session else {
                return error(StatusCode::BAD_REQUEST, SESSION_NOT_FOUND);
            };
            let Some((start, end, total)) = content_range(&headers) else {
                return error(StatusCode::BAD_REQUEST, "0x80070057");
            };
            let mut sessions = state.sessions.lock().expect("bits lock");
            let Some((_, data)) = sessions.get_mut(&id) else {
                return error(StatusCode::NOT_FOUND, SESSION_NOT_FOUND);
            };
            let have = data.len() as u64;
            let len = body.len() as u64;
            if end < start || end - start + 1 != len || end >= total {
                return error(StatusCode::BAD_REQUEST, "0x80070057");
            }
            if start > have {
                // Not contiguous with what the server holds: 416 and where to go on from.
                return ack(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header("BITS-Received-Content-Range", have.to_string())
                    .header("Content-Length", "0")
                    .body(Body::empty())
                    .expect("response");
            }
            // Only the part not held yet is written (the spec: no overwriting).
            let fresh = &body[(have - start) as usize..];
            data.extend_from_slice(fresh);
            let short = state.ack_short.swap(0, Ordering::SeqCst);
            if short > 0 {
                let keep = data.len().saturating_sub(short as usize);
                data.truncate(keep);
            }
            let received = data.len() as u64;
            let mut resp = ack(StatusCode::OK)
                .header("BITS-Session-Id", id.clone())
                .header("BITS-Received-Content-Range", received.to_string())
                .header("Content-Length", "0");
            if received == total && state.reply.lock().expect("bits lock").is_some() {
                resp = resp.header(
                    "BITS-Reply-URL",
                    format!("/reply/{}", id.trim_matches(['{', '}'])),
                );
            }
            resp.body(Body::empty()).expect("response")
        }
        "Close-Session" => {
            let Some(id) = session else {
                return error(StatusCode::BAD_REQUEST, SESSION_NOT_FOUND);
            };
            match state.sessions.lock().expect("bits lock").remove(&id) {
                Some((path, data)) => {
                    state
                        .committed
                        .lock()
                        .expect("bits lock")
                        .insert(path, data);
                    ok().header("BITS-Session-Id", id)
                        .body(Body::empty())
                        .expect("response")
                }
                None => error(StatusCode::NOT_FOUND, SESSION_NOT_FOUND),
            }
        }
        "Cancel-Session" => {
            let Some(id) = session else {
                return error(StatusCode::BAD_REQUEST, SESSION_NOT_FOUND);
            };
            match state.sessions.lock().expect("bits lock").remove(&id) {
                Some(_) => ok()
                    .header("BITS-Session-Id", id)
                    .body(Body::empty())
                    .expect("response"),
                None => error(StatusCode::NOT_FOUND, SESSION_NOT_FOUND),
            }
        }
        _ => error(StatusCode::BAD_REQUEST, "0x80070057"),
    }
}

async fn reply(State(state): State<Arc<BitsState>>, Path(_id): Path<String>) -> Response<Body> {
    let status = state.reply_status.load(Ordering::SeqCst);
    if status != 0 {
        return Response::builder()
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND))
            .body(Body::empty())
            .expect("response");
    }
    let body = state
        .reply
        .lock()
        .expect("bits lock")
        .clone()
        .unwrap_or_default();
    Response::builder()
        .status(StatusCode::OK)
        .header("Content-Length", body.len().to_string())
        .body(Body::from(body))
        .expect("response")
}
