//! Fewer wake-ups for a long origin body: the kernel's receive low-water mark (`SO_RCVLOWAT`,
//! socket(7)) on the connection that carries it (decision 0023).
//!
//! Over a WAN link the origin's bytes arrive one TCP segment (about 1,448 bytes) at a time, and
//! tokio's edge-triggered reactor wakes the node for each one: about 177,000 wake-ups for
//! 256 MiB at 200 Mbit/s. With a low-water mark of [`MARK`] bytes the kernel reports the socket
//! readable only once that much is queued (or the connection ended), so one wake-up carries
//! about 45 segments; Linux acknowledges at once while the mark is not reached, so the sender
//! is not slowed.
//!
//! reqwest does not hand out its sockets. The socket is found by the addresses hyper reports
//! for the response (`HttpInfo`) among this process's descriptors (`/proc/self/fd`): each
//! socket descriptor is duplicated first and the duplicate's addresses are checked, so the
//! descriptor the mark is set on is the connection checked even if the number was closed and
//! reused meanwhile (a TCP connection's pair of addresses is unique while it is open, and the
//! duplicate keeps it open until [`LowWater`] is dropped).
//!
//! A mark above what is still to come would stall the response until the connection closes.
//! The mark goes back to one byte (the default) once the body's remaining bytes come within
//! [`MARK`] plus twice the largest chunk seen (hyper reads ahead of the body by at most a chunk
//! or so), whenever no chunk came for [`STALL`] (an origin slower than [`MARK`] bytes per
//! [`STALL`] gains nothing from it), and when the [`LowWater`] is dropped, before the
//! connection can serve another request. Lowering the mark wakes a reader whose queued bytes
//! already suffice (`tcp_set_rcvlowat` signals the socket readable), so none of these waits
//! longer than [`STALL`].

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The low-water mark set on an origin connection while a long body streams: 64 KiB (about
/// 45 segments of 1,448 bytes; 2.6 ms of a 200 Mbit/s link, 10 ms of 50 Mbit/s).
const MARK: usize = 64 << 10;

/// Bodies shorter than this (bytes) keep the default mark: the lookup of the socket costs a
/// system call or three per descriptor of the process.
const MIN_BODY: u64 = 1 << 20;

/// How long a chunk may take while the mark is set before the mark is dropped for the rest of
/// the body (an origin slower than [`MARK`] bytes per `STALL`, or a mark above what is left).
const STALL: Duration = Duration::from_millis(200);

/// The low-water mark of one response's connection; back to one byte when dropped.
pub(crate) struct LowWater {
    /// A duplicate of the connection's descriptor.
    fd: OwnedFd,
    /// Body bytes not yet received.
    remaining: u64,
    /// The largest chunk received so far, in bytes.
    largest: usize,
    on: bool,
    /// Whether the mark was dropped because a chunk took longer than [`STALL`].
    stalled: bool,
}

impl LowWater {
    /// Sets [`MARK`] on the connection of `resp` when its body is worth it: HTTP/1 (an HTTP/2
    /// connection carries other streams and control frames that must not wait), a known length
    /// of at least [`MIN_BODY`] bytes, and the socket found (Linux only). `None` otherwise,
    /// and on any error of the lookup: the body then streams as it would without.
    pub(crate) fn for_response(resp: &reqwest::Response) -> Option<Self> {
        if resp.version() > reqwest::Version::HTTP_11 {
            return None;
        }
        let remaining = resp.content_length().filter(|&n| n >= MIN_BODY)?;
        let info = resp
            .extensions()
            .get::<hyper_util::client::legacy::connect::HttpInfo>()?;
        let fd = find_socket(info.local_addr(), info.remote_addr())?;
        set_mark(&fd, MARK).ok()?;
        Some(Self {
            fd,
            remaining,
            largest: 0,
            on: true,
            stalled: false,
        })
    }

    /// Whether the mark is set (a chunk then waits at most [`STALL`] before
    /// [`LowWater::stalled`]).
    fn is_on(&self) -> bool {
        self.on
    }

    /// Counts a chunk of `len` body bytes; drops the mark once what is left is within [`MARK`]
    /// plus twice the largest chunk.
    fn received(&mut self, len: usize) {
        self.remaining = self.remaining.saturating_sub(len as u64);
        self.largest = self.largest.max(len);
        if self.remaining <= (MARK + 2 * self.largest) as u64 {
            self.off();
        }
    }

    /// No chunk came for [`STALL`] while the mark was set: drops it for the rest of the body.
    fn stalled(&mut self) {
        self.stalled = true;
        self.off();
    }

    /// Puts the mark back to one byte for the rest of the body; a reader whose bytes are
    /// already queued is woken by the kernel.
    fn off(&mut self) {
        if self.on {
            self.on = false;
            if let Err(e) = set_mark(&self.fd, 1) {
                tracing::debug!(error = %e, "could not drop the receive low-water mark");
            }
        }
    }
}

impl Drop for LowWater {
    fn drop(&mut self) {
        self.off();
    }
}

/// The body's next chunk (`None` at its end), counted against `mark`: while the mark is set,
/// a chunk that takes longer than [`STALL`] drops it ([`LowWater::stalled`]) and is then
/// waited for as without one.
pub(crate) async fn next_chunk<S, T, E>(
    mark: &mut Option<LowWater>,
    body: &mut S,
) -> Option<Result<T, E>>
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    T: AsRef<[u8]>,
{
    use futures::StreamExt;
    let next = match mark.as_mut().filter(|m| m.is_on()) {
        Some(m) => match tokio::time::timeout(STALL, body.next()).await {
            Ok(next) => next,
            Err(_) => {
                m.stalled();
                body.next().await
            }
        },
        None => body.next().await,
    };
    if let (Some(Ok(chunk)), Some(m)) = (&next, mark.as_mut()) {
        m.received(chunk.as_ref().len());
    }
    next
}

/// Sets `SO_RCVLOWAT` on `fd` to `bytes`.
fn set_mark(fd: &OwnedFd, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is an open descriptor we own; the option value is a c_int on the stack,
    // passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A duplicate of this process's descriptor of the TCP connection from `local` to `remote`.
#[cfg(target_os = "linux")]
fn find_socket(local: SocketAddr, remote: SocketAddr) -> Option<OwnedFd> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    for entry in dir.flatten() {
        let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::c_int>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|target| {
            target
                .as_os_str()
                .as_encoded_bytes()
                .starts_with(b"socket:")
        });
        if !is_socket {
            continue;
        }
        // SAFETY: `fcntl` on a plain number: if it was closed since, the call fails (EBADF);
        // if it was reused, the duplicate is of another file and its addresses do not match.
        let dup = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        let same = |got: Option<rustix::net::SocketAddrAny>, want: SocketAddr| {
            got.and_then(|a| SocketAddr::try_from(a).ok()) == Some(want)
        };
        if same(rustix::net::getsockname(&fd).ok(), local)
            && same(rustix::net::getpeername(&fd).ok().flatten(), remote)
        {
            return Some(fd);
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
fn find_socket(_local: SocketAddr, _remote: SocketAddr) -> Option<OwnedFd> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::source::origin::{Client, Config};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The mark now set on `fd`, in bytes.
    fn mark_of(fd: &impl AsRawFd) -> usize {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an open descriptor, and an out value with its size.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        value as usize
    }

    fn body_byte(i: usize) -> u8 {
        (i.wrapping_mul(31) % 251) as u8
    }

    /// Serves one HTTP/1.1 response of `len` bytes, written in segments of 1,448 bytes with
    /// a 1 ms pause after every `burst` of them and a pause of `pause_ms` after `pause_at`
    /// bytes: an origin behind a slow link. Returns the URL.
    async fn trickling_origin(
        len: usize,
        burst: usize,
        pause_at: usize,
        pause_ms: u64,
    ) -> url::Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
            conn.write_all(header.as_bytes()).await.unwrap();
            let body: Vec<u8> = (0..len).map(body_byte).collect();
            for (n, segment) in body.chunks(1448).enumerate() {
                if n * 1448 < pause_at && (n + 1) * 1448 >= pause_at {
                    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                }
                conn.write_all(segment).await.unwrap();
                if n % burst == burst - 1 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            // Keep the connection open, as a keep-alive origin does.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        format!("http://{addr}/file").parse().unwrap()
    }

    struct Fetched {
        bytes: Vec<u8>,
        /// Chunks, and their bytes, that came while the mark was set.
        chunks_marked: usize,
        bytes_marked: usize,
        mark_during: usize,
        mark_after: usize,
        stalled: bool,
    }

    async fn fetch(url: &url::Url) -> Fetched {
        let client = Client::new(Config::default()).unwrap();
        let resp = client.get(url).send().await.unwrap();
        let mark = LowWater::for_response(&resp).expect("the socket is found and marked");
        let mark_during = mark_of(&mark.fd);
        let mut body = resp.bytes_stream();
        let mut out = Fetched {
            bytes: Vec::new(),
            chunks_marked: 0,
            bytes_marked: 0,
            mark_during,
            mark_after: 0,
            stalled: false,
        };
        let mut mark = Some(mark);
        loop {
            let was_on = mark.as_ref().is_some_and(LowWater::is_on);
            let Some(chunk) = next_chunk(&mut mark, &mut body).await else {
                break;
            };
            let chunk = chunk.unwrap();
            if was_on && !mark.as_ref().is_some_and(|m| m.stalled) {
                out.chunks_marked += 1;
                out.bytes_marked += chunk.len();
            }
            out.bytes.extend_from_slice(&chunk);
        }
        let mark = mark.unwrap();
        out.mark_after = mark_of(&mark.fd);
        out.stalled = mark.stalled;
        out
    }

    #[test]
    fn the_connection_is_found_by_its_addresses_and_no_other_is_marked() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let one = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let two = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let fd = find_socket(one.local_addr().unwrap(), one.peer_addr().unwrap()).unwrap();
        set_mark(&fd, MARK).unwrap();
        assert_eq!(mark_of(&one), MARK);
        assert_eq!(mark_of(&two), 1, "another connection to the same origin");
        let unknown: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(find_socket(one.local_addr().unwrap(), unknown).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trickling_body_comes_whole_in_few_chunks_and_the_mark_goes_before_its_end() {
        let len = 3 * MIN_BODY as usize + 12_345;
        let url = trickling_origin(len, 4, usize::MAX, 0).await;
        let got = tokio::time::timeout(Duration::from_secs(60), fetch(&url))
            .await
            .expect("the body comes without stalling");
        assert!(
            got.bytes
                .iter()
                .enumerate()
                .all(|(i, &b)| b == body_byte(i))
        );
        assert_eq!(got.bytes.len(), len);
        assert_eq!(got.mark_during, MARK);
        assert_eq!(
            got.mark_after, 1,
            "the connection goes back to the pool unmarked"
        );
        assert!(
            !got.stalled,
            "the mark was dropped before the last bytes, not after a stall"
        );
        // Segments come 4 at a time (5,792 bytes); while the mark is set, the kernel wakes the
        // reader only for 64 KiB (hyper's buffer grows to that size in a few reads).
        assert!(got.bytes_marked > len / 2, "{}", got.bytes_marked);
        assert!(
            got.chunks_marked <= 2 * got.bytes_marked / MARK + 8,
            "{} chunks for {} bytes",
            got.chunks_marked,
            got.bytes_marked
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_origin_that_pauses_costs_one_stall_and_the_body_still_comes_whole() {
        let len = 2 * MIN_BODY as usize;
        // 256 KiB at once, then nothing for 600 ms: less than the mark waits in the kernel.
        let url = trickling_origin(len, 1_000_000, 256 << 10, 600).await;
        let got = tokio::time::timeout(Duration::from_secs(60), fetch(&url))
            .await
            .expect("the body comes without stalling for good");
        assert_eq!(got.bytes.len(), len);
        assert!(
            got.bytes
                .iter()
                .enumerate()
                .all(|(i, &b)| b == body_byte(i))
        );
        assert!(got.stalled, "the pause dropped the mark");
        assert_eq!(got.mark_after, 1);
    }
}
