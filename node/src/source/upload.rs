//! The BITS Upload Protocol client (upload and upload-reply jobs), as Microsoft's pages on
//! the protocol specify it: every request is `BITS_POST` with a `BITS-Packet-Type`.
//!
//! 1. `Create-Session` offers `BITS-Supported-Protocols: {7df0354d-...}` (the BITS 1.5 Upload
//!    Protocol); the Ack names the session (`BITS-Session-Id`).
//! 2. `Fragment`s send the file in order, `Content-Range: bytes START-END/TOTAL`, the first with
//!    `Content-Name`; each Ack's `BITS-Received-Content-Range` is the next byte the server wants.
//!    The client goes on from there, whatever it sent: a server that kept less gets the rest
//!    again, and a 416 (not contiguous) tells where to resume. The session and that offset are
//!    stored with the job, so an upload resumes after a restart or a dropped connection.
//! 3. For an upload-reply job, the last Fragment's Ack names `BITS-Reply-URL`; the reply is
//!    fetched before the session is closed (the server drops it at Close-Session).
//! 4. `Close-Session` commits the file on the server; `Cancel-Session` (on Cancel) drops it.
//!
//! 5xx answers and network failures are retried with the origin client's backoff, then are
//! transient (the job goes to TransientError); other 4xx answers are fatal, naming the packet,
//! the status and the server's `BITS-Error-Code`.

use std::{path::Path, sync::Arc};

use reqwest::{Method, StatusCode};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::origin::{self, Attempt, Client, OriginError, redact};

/// The BITS 1.5 Upload Protocol's id.
pub(crate) const PROTOCOL: &str = "{7df0354d-249b-430f-820d-3d2a9bef4931}";
/// The largest fragment sent, in bytes.
pub(crate) const FRAGMENT: u64 = 1 << 20;
/// The most of a reply kept in memory for `reply_data` (BITS `GetReplyData`), in bytes.
pub(crate) const REPLY_DATA: usize = 1 << 20;
/// `BG_E_SESSION_NOT_FOUND`.
const SESSION_NOT_FOUND: &str = "0x8020001f";

/// Why an upload stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UploadError {
    /// The server refused (a 4xx other than a lost session): the job goes to Error.
    Fatal(String),
    /// Network failures or 5xx past the retries: the job goes to TransientError.
    Transient(String),
    /// The server no longer knows the session: start a new one from byte 0.
    SessionLost,
    /// The job was stopped.
    Cancelled,
}

impl From<OriginError> for UploadError {
    fn from(e: OriginError) -> Self {
        if e.is_transient() {
            Self::Transient(e.to_string())
        } else {
            Self::Fatal(e.to_string())
        }
    }
}

/// A request of BITS packet `kind` to `url`.
fn packet(client: &Client, url: &Url, kind: &str) -> reqwest::RequestBuilder {
    client
        .request(
            Method::from_bytes(b"BITS_POST").unwrap_or(Method::POST),
            url,
        )
        .header("BITS-Packet-Type", kind)
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends `make()` until an answer that is not a 5xx, with the origin client's retries and
/// backoff; `Ok` with that answer.
async fn send(
    client: &Client,
    url: &Url,
    cancel: &CancellationToken,
    make: impl Fn() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response, UploadError> {
    let mut attempt = 0;
    loop {
        let sent = tokio::select! {
            r = make().send() => r,
            () = cancel.cancelled() => return Err(UploadError::Cancelled),
        };
        let detail = match sent {
            Ok(r) if r.status().is_server_error() => format!("HTTP {}", r.status().as_u16()),
            Ok(r) => return Ok(r),
            Err(e) => match Client::send_failure::<()>(url, &e) {
                Ok(Attempt::Retry(d)) => d,
                Ok(Attempt::Done(())) => origin::describe(&e),
                Err(fatal) => return Err(UploadError::Fatal(fatal.to_string())),
            },
        };
        client.backoff(url, attempt, detail).await?;
        attempt += 1;
    }
}

/// The error of a refused packet, naming it, the status and BITS's error code.
fn refused(url: &Url, kind: &str, resp: &reqwest::Response) -> UploadError {
    let code = header(resp, "BITS-Error-Code");
    if code
        .as_deref()
        .is_some_and(|c| c.eq_ignore_ascii_case(SESSION_NOT_FOUND))
    {
        return UploadError::SessionLost;
    }
    UploadError::Fatal(format!(
        "{} refused {kind}: HTTP {}{}",
        redact(url),
        resp.status().as_u16(),
        code.map(|c| format!(", BITS error {c}"))
            .unwrap_or_default()
    ))
}

/// Opens a session (`Create-Session`); answers its id.
pub(crate) async fn create_session(
    client: &Client,
    url: &Url,
    cancel: &CancellationToken,
) -> Result<String, UploadError> {
    let resp = send(client, url, cancel, || {
        packet(client, url, "Create-Session").header("BITS-Supported-Protocols", PROTOCOL)
    })
    .await?;
    if !matches!(resp.status(), StatusCode::OK | StatusCode::CREATED) {
        return Err(refused(url, "Create-Session", &resp));
    }
    let protocol = header(&resp, "BITS-Protocol").unwrap_or_default();
    if !protocol.eq_ignore_ascii_case(PROTOCOL) {
        return Err(UploadError::Fatal(format!(
            "{} chose upload protocol {protocol:?}, not BITS 1.5's",
            redact(url)
        )));
    }
    header(&resp, "BITS-Session-Id")
        .filter(|s| !s.is_empty() && s.len() <= 100)
        .ok_or_else(|| {
            UploadError::Fatal(format!("{} sent no usable BITS-Session-Id", redact(url)))
        })
}

/// Sends `file` (`len` bytes, named `name` on the server) from `*acked` on, in fragments,
/// moving `*acked` to what the server acknowledges and calling `progress` after each Ack.
/// Answers the reply URL the last Ack named, if any (resolved against `url`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_fragments(
    client: &Client,
    url: &Url,
    session: &str,
    file: Arc<std::fs::File>,
    len: u64,
    name: &str,
    acked: &mut u64,
    progress: &mut (dyn FnMut(u64) + Send),
    cancel: &CancellationToken,
) -> Result<Option<Url>, UploadError> {
    let mut reply = None;
    let mut stalls = 0u32;
    while *acked < len {
        let start = *acked;
        let end = (start + FRAGMENT).min(len);
        let f = file.clone();
        let body = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; (end - start) as usize];
            f.read_exact_at(&mut buf, start).map(|()| buf)
        })
        .await
        .map_err(|e| UploadError::Fatal(format!("reading the file to upload: {e}")))?
        .map_err(|e| UploadError::Fatal(format!("reading the file to upload: {e}")))?;
        let body = bytes::Bytes::from(body);
        let resp = send(client, url, cancel, || {
            let mut req = packet(client, url, "Fragment")
                .header("BITS-Session-Id", session)
                .header("Content-Range", format!("bytes {start}-{}/{len}", end - 1))
                .body(body.clone());
            if start == 0 {
                req = req.header("Content-Name", name);
            }
            req
        })
        .await?;
        let next =
            header(&resp, "BITS-Received-Content-Range").and_then(|v| v.trim().parse::<u64>().ok());
        match resp.status() {
            StatusCode::OK | StatusCode::CREATED | StatusCode::RANGE_NOT_SATISFIABLE => {
                let next = next.ok_or_else(|| {
                    UploadError::Fatal(format!(
                        "{} acknowledged a fragment without BITS-Received-Content-Range",
                        redact(url)
                    ))
                })?;
                if next > len {
                    return Err(UploadError::Fatal(format!(
                        "{} acknowledged {next} bytes of {len}",
                        redact(url)
                    )));
                }
                // A server that keeps acknowledging no more than before makes no progress:
                // after a few, it is an error rather than a loop.
                if next <= start {
                    stalls += 1;
                    if stalls > 3 {
                        return Err(UploadError::Transient(format!(
                            "{} keeps acknowledging {next} bytes of {len}",
                            redact(url)
                        )));
                    }
                } else {
                    stalls = 0;
                }
                *acked = next;
                progress(next);
                if let Some(r) = header(&resp, "BITS-Reply-URL") {
                    reply = Some(url.join(&r).map_err(|e| {
                        UploadError::Fatal(format!(
                            "{} sent a bad BITS-Reply-URL: {e}",
                            redact(url)
                        ))
                    })?);
                }
            }
            _ => return Err(refused(url, "Fragment", &resp)),
        }
    }
    Ok(reply)
}

/// Closes the session (`Close-Session`): the server commits the file.
pub(crate) async fn close_session(
    client: &Client,
    url: &Url,
    session: &str,
    cancel: &CancellationToken,
) -> Result<(), UploadError> {
    let resp = send(client, url, cancel, || {
        packet(client, url, "Close-Session").header("BITS-Session-Id", session)
    })
    .await?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(refused(url, "Close-Session", &resp))
    }
}

/// Cancels the session (`Cancel-Session`), once, without waiting for retries: the job is
/// going away whatever the server answers.
pub(crate) async fn cancel_session(client: &Client, url: &Url, session: &str) {
    let r = packet(client, url, "Cancel-Session")
        .header("BITS-Session-Id", session)
        .send()
        .await;
    if let Err(e) = r {
        tracing::info!(url = %redact(url), "Cancel-Session not delivered: {e}");
    }
}

/// Fetches the reply at `reply` into `dest` (created, or replaced, by `create`), verified by
/// nothing but the connection's TLS; answers its first [`REPLY_DATA`] bytes.
pub(crate) async fn fetch_reply(
    client: &Client,
    reply: &Url,
    dest: &Path,
    create: impl FnOnce(&Path) -> std::io::Result<std::fs::File> + Send + 'static,
    cancel: &CancellationToken,
) -> Result<Vec<u8>, UploadError> {
    use futures::StreamExt;
    let resp = send(client, reply, cancel, || client.get(reply)).await?;
    if !resp.status().is_success() {
        return Err(UploadError::Fatal(format!(
            "the reply at {} answered HTTP {}",
            redact(reply),
            resp.status().as_u16()
        )));
    }
    let path = dest.to_owned();
    let file = tokio::task::spawn_blocking(move || create(&path))
        .await
        .map_err(|e| UploadError::Fatal(e.to_string()))?
        .map_err(|e| UploadError::Fatal(format!("{}: {e}", dest.display())))?;
    let file = Arc::new(file);
    let mut head = Vec::new();
    let mut at = 0u64;
    let mut body = resp.bytes_stream();
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            () = cancel.cancelled() => return Err(UploadError::Cancelled),
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk.map_err(|e| {
            UploadError::Transient(format!(
                "the reply at {}: {}",
                redact(reply),
                origin::describe(&e)
            ))
        })?;
        if head.len() < REPLY_DATA {
            let take = (REPLY_DATA - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
        }
        let f = file.clone();
        let offset = at;
        at += chunk.len() as u64;
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&chunk, offset)
        })
        .await
        .map_err(|e| UploadError::Fatal(e.to_string()))?
        .map_err(|e| UploadError::Fatal(format!("{}: {e}", dest.display())))?;
    }
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_data())
        .await
        .map_err(|e| UploadError::Fatal(e.to_string()))?
        .map_err(|e| UploadError::Fatal(format!("{}: {e}", dest.display())))?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use shoal_tests::bits_server::BitsServer;

    use super::*;

    fn client() -> Client {
        Client::new(origin::Config {
            retries: 2,
            backoff: std::time::Duration::from_millis(10),
            proxy: origin::ProxySetting::Direct,
            ..origin::Config::default()
        })
        .unwrap()
    }

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, Arc<std::fs::File>) {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), bytes).unwrap();
        let f = Arc::new(std::fs::File::open(t.path()).unwrap());
        (t, f)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_file_goes_up_in_fragments_and_the_session_commits_it() {
        let server = BitsServer::start().await;
        let (c, url, cancel) = (client(), server.url("a.bin"), CancellationToken::new());
        let bytes = data(2 * FRAGMENT as usize + 12_345);
        let (_t, f) = file_of(&bytes);
        let id = create_session(&c, &url, &cancel).await.unwrap();
        let (mut acked, mut seen) = (0, Vec::new());
        let reply = send_fragments(
            &c,
            &url,
            &id,
            f,
            bytes.len() as u64,
            "a.bin",
            &mut acked,
            &mut |n| seen.push(n),
            &cancel,
        )
        .await
        .unwrap();
        assert_eq!(reply, None);
        assert_eq!(acked, bytes.len() as u64);
        assert_eq!(seen.len(), 3);
        assert_eq!(
            server.state.committed("/up/a.bin"),
            None,
            "not before Close-Session"
        );
        close_session(&c, &url, &id, &cancel).await.unwrap();
        assert_eq!(server.state.committed("/up/a.bin").unwrap(), bytes);
        assert_eq!(
            server.state.packets(),
            [
                "Create-Session",
                "Fragment",
                "Fragment",
                "Fragment",
                "Close-Session"
            ]
        );
    }

    #[tokio::test]
    async fn what_the_server_did_not_keep_is_sent_again_and_a_new_run_resumes_from_its_ack() {
        let server = BitsServer::start().await;
        let (c, url, cancel) = (client(), server.url("b.bin"), CancellationToken::new());
        let bytes = data(3 * FRAGMENT as usize);
        let (_t, f) = file_of(&bytes);
        let id = create_session(&c, &url, &cancel).await.unwrap();
        // The first fragment is acknowledged 1000 bytes short: the next one starts there.
        server.state.ack_short.store(1000, Ordering::SeqCst);
        let mut acked = 0;
        // Stopped after the first Ack, as by a restart.
        let stop = CancellationToken::new();
        let s = stop.clone();
        let r = send_fragments(
            &c,
            &url,
            &id,
            f.clone(),
            bytes.len() as u64,
            "b.bin",
            &mut acked,
            &mut move |_| s.cancel(),
            &stop,
        )
        .await;
        assert_eq!(r, Err(UploadError::Cancelled));
        assert_eq!(acked, FRAGMENT - 1000);
        // A new run with the stored session and offset goes on, through a 500 on the way.
        server.state.fail_fragments.store(1, Ordering::SeqCst);
        send_fragments(
            &c,
            &url,
            &id,
            f,
            bytes.len() as u64,
            "b.bin",
            &mut acked,
            &mut |_| {},
            &cancel,
        )
        .await
        .unwrap();
        close_session(&c, &url, &id, &cancel).await.unwrap();
        assert_eq!(server.state.committed("/up/b.bin").unwrap(), bytes);
    }

    #[tokio::test]
    async fn a_refused_session_is_fatal_and_a_lost_one_is_said() {
        let server = BitsServer::start().await;
        let (c, url, cancel) = (client(), server.url("c.bin"), CancellationToken::new());
        server.state.create_status.store(403, Ordering::SeqCst);
        match create_session(&c, &url, &cancel).await {
            Err(UploadError::Fatal(e)) => {
                assert!(e.contains("403") && e.contains("Create-Session"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let (_t, f) = file_of(&data(10));
        let mut acked = 0;
        let r = send_fragments(
            &c,
            &url,
            "{unknown}",
            f,
            10,
            "c.bin",
            &mut acked,
            &mut |_| {},
            &cancel,
        )
        .await;
        assert_eq!(r, Err(UploadError::SessionLost));
    }

    #[tokio::test]
    async fn an_upload_reply_session_names_its_reply_which_is_fetched_before_close() {
        let server = BitsServer::start().await;
        let (c, url, cancel) = (client(), server.url("d.bin"), CancellationToken::new());
        let answer = data(3 * REPLY_DATA / 2);
        *server.state.reply.lock().unwrap() = Some(answer.clone());
        let bytes = data(5000);
        let (_t, f) = file_of(&bytes);
        let id = create_session(&c, &url, &cancel).await.unwrap();
        let mut acked = 0;
        let reply = send_fragments(
            &c,
            &url,
            &id,
            f,
            5000,
            "d.bin",
            &mut acked,
            &mut |_| {},
            &cancel,
        )
        .await
        .unwrap()
        .expect("a reply URL");
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("reply");
        let head = fetch_reply(&c, &reply, &dest, |p| std::fs::File::create(p), &cancel)
            .await
            .unwrap();
        assert_eq!(head, answer[..REPLY_DATA]);
        assert_eq!(std::fs::read(&dest).unwrap(), answer);
        // A reply URL that fails is an error naming it.
        server.state.reply_status.store(404, Ordering::SeqCst);
        match fetch_reply(&c, &reply, &dest, |p| std::fs::File::create(p), &cancel).await {
            Err(UploadError::Fatal(e)) => assert!(e.contains("404"), "{e}"),
            other => panic!("{other:?}"),
        }
        cancel_session(&c, &url, &id).await;
        assert_eq!(server.state.open_sessions(), 0);
        assert_eq!(server.state.packets().last().unwrap(), "Cancel-Session");
    }
}
