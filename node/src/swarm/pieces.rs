//! Piece requests on long-lived streams (`/shoal/piece/2.0.0`, [`PIECE_PROTOCOL`]).
//!
//! A leecher keeps a few streams open to each peer it fetches from and sends one piece
//! request after another on each: a request, then its response, then the next request. A
//! stream carries one exchange at a time; a leecher pipelines by using several streams at
//! once (as many as its per-peer pipeline, [`MAX_IDLE_PER_PEER`] at most kept between
//! requests). Compared with one substream per request (libp2p request-response), this saves
//! per piece the substream's opening, its protocol negotiation, two timers and two round trips
//! through the swarm's event loop: the bytes go from the connection to the task that asked
//! for them. Decision record: `docs/decisions/0021-piece-streams.md`.
//!
//! The server side reads requests from each stream in a task of its own, takes an upload slot
//! ([`UploadSlots`]) for each, reads the piece off the loop, pays for it from the upload
//! bucket, and writes the response; without a slot it answers Busy at once. A stream that
//! sends no request for [`STREAM_IDLE`] is closed, and a peer has at most
//! [`MAX_STREAMS_PER_PEER`] piece streams open to a node.

use std::{
    collections::HashMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use libp2p::{PeerId, Stream, StreamProtocol};
use shoal_protocol::{Message, PIECE_PROTOCOL, PieceRequest, PieceResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{source::bandwidth::Bandwidth, store::ContentStore};

use super::{UploadCounters, read_message, read_message_within, write_message};

/// How long a piece stream may wait for its next request before the server closes it; a
/// leecher drops a stream it kept idle for [`REUSE_WITHIN`] or longer rather than reuse it.
pub(crate) const STREAM_IDLE: Duration = Duration::from_secs(60);
/// A leecher reuses a kept stream only if it was last used this recently (well within
/// [`STREAM_IDLE`], so that the server has not closed it).
pub(crate) const REUSE_WITHIN: Duration = Duration::from_secs(45);
/// Piece streams a leecher keeps open to one peer between requests, at most.
pub(crate) const MAX_IDLE_PER_PEER: usize = super::MAX_UPLOADS_PER_PEER;
/// Piece streams one peer may have open to this node at once; more are reset at once.
pub(crate) const MAX_STREAMS_PER_PEER: usize = 4 * super::MAX_UPLOADS_PER_PEER;

/// The protocol of piece streams.
pub(crate) fn protocol() -> StreamProtocol {
    StreamProtocol::new(PIECE_PROTOCOL)
}

/// One piece exchange on `stream`: writes `request`, reads its response (at most the piece's
/// own length in bytes, [`Message::response_limit_bytes`]).
///
/// # Errors
/// The stream's I/O error; `InvalidData` for a response the codec refuses (too long, or not
/// a piece response).
pub async fn exchange<S>(stream: &mut S, request: &PieceRequest) -> io::Result<PieceResponse>
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin + Send,
{
    let limit = request
        .response_limit_bytes()
        .unwrap_or(PieceResponse::MAX_LEN_BYTES);
    exchange_within(stream, request, limit).await
}

/// One exchange on a stream of one request after another (pieces, have queries): writes
/// `request`, reads its response, of at most `limit` bytes.
///
/// # Errors
/// The stream's I/O error; `InvalidData` for a response the codec refuses (longer than
/// `limit`, or not a `Resp`).
pub(crate) async fn exchange_within<Req: Message, Resp: Message, S>(
    stream: &mut S,
    request: &Req,
    limit: usize,
) -> io::Result<Resp>
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin + Send,
{
    write_message(stream, request).await?;
    read_message_within(stream, limit).await
}

/// The piece streams a leecher keeps open between requests, per peer, with when each was last
/// used.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<PeerId, Vec<(Stream, Instant)>>>,
}

impl Pool {
    /// A kept stream to `peer` used within [`REUSE_WITHIN`], if any (older ones are dropped).
    pub(crate) fn take(&self, peer: &PeerId) -> Option<Stream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(peer)?;
        let now = Instant::now();
        let found = loop {
            match list.pop() {
                Some((s, at)) if now.duration_since(at) < REUSE_WITHIN => break Some(s),
                Some(_) => {}
                None => break None,
            }
        };
        if list.is_empty() {
            idle.remove(peer);
        }
        found
    }

    /// Keeps `stream` to `peer` for the next request (dropped if [`MAX_IDLE_PER_PEER`] are
    /// kept already).
    pub(crate) fn put(&self, peer: PeerId, stream: Stream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(peer).or_default();
        if list.len() < MAX_IDLE_PER_PEER {
            list.push((stream, Instant::now()));
        }
    }

    /// Drops the streams kept longer than [`REUSE_WITHIN`], and every stream of `gone` peers;
    /// an open stream keeps its connection alive.
    pub(crate) fn sweep(&self, gone: Option<&PeerId>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = gone {
            idle.remove(p);
        }
        let now = Instant::now();
        idle.retain(|_, list| {
            list.retain(|(_, at)| now.duration_since(*at) < REUSE_WITHIN);
            !list.is_empty()
        });
    }
}

/// The upload slots: at most [`super::Config::max_concurrent_uploads`] requests (piece or
/// layer) served at once, at most [`super::uploads_per_peer`] of them for one peer, and at
/// most `max_upload_peers` peers served at once; none past the monthly upload cap.
#[derive(Debug)]
pub(crate) struct UploadSlots {
    semaphore: Arc<Semaphore>,
    peers: Mutex<HashMap<PeerId, usize>>,
    max_upload_peers: Arc<AtomicUsize>,
    per_peer: usize,
    counters: Arc<UploadCounters>,
    bandwidth: Arc<Bandwidth>,
}

/// An upload slot held for one request of one peer; given back when dropped.
#[derive(Debug)]
pub(crate) struct UploadSlot {
    _permit: OwnedSemaphorePermit,
    peer: PeerId,
    slots: Arc<UploadSlots>,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        give_back(&self.slots.peers, &self.peer);
    }
}

/// Counts one less for `peer` in `counts`, forgetting a peer at zero.
fn give_back(counts: &Mutex<HashMap<PeerId, usize>>, peer: &PeerId) {
    let mut counts = counts.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = counts.get_mut(peer) {
        *n -= 1;
        if *n == 0 {
            counts.remove(peer);
        }
    }
}

impl UploadSlots {
    /// Slots for `slots` requests at once, `per_peer` of one peer, `max_upload_peers` peers.
    pub(crate) fn new(
        slots: usize,
        per_peer: usize,
        max_upload_peers: Arc<AtomicUsize>,
        counters: Arc<UploadCounters>,
        bandwidth: Arc<Bandwidth>,
    ) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(slots.max(1))),
            peers: Mutex::new(HashMap::new()),
            max_upload_peers,
            per_peer,
            counters,
            bandwidth,
        }
    }

    /// A slot for a request of `peer`: none when the monthly cap is reached, when `peer`
    /// already holds its share, when `max_upload_peers` other peers are being served, or
    /// when every slot is taken.
    pub(crate) fn take(self: &Arc<Self>, peer: PeerId) -> Option<UploadSlot> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let serving = peers.get(&peer).copied().unwrap_or(0);
        let max_peers = self.max_upload_peers.load(Relaxed);
        if (serving == 0 && peers.len() >= max_peers)
            || serving >= self.per_peer
            || self.bandwidth.cap_reached()
        {
            return None;
        }
        let permit = self.semaphore.clone().try_acquire_owned().ok()?;
        *peers.entry(peer).or_default() += 1;
        self.counters
            .peak_peers
            .fetch_max(peers.len() as u64, Relaxed);
        Some(UploadSlot {
            _permit: permit,
            peer,
            slots: self.clone(),
        })
    }
}

/// What the piece server needs: the store, the slots, the upload bucket, the counters.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) store: Arc<ContentStore>,
    pub(crate) slots: Arc<UploadSlots>,
    pub(crate) bandwidth: Arc<Bandwidth>,
    pub(crate) counters: Arc<UploadCounters>,
    /// The longest a response may take to be written.
    pub(crate) write_timeout: Duration,
}

impl Server {
    /// A server over a store, with its upload slots, upload bucket and counters; it writes each
    /// response within `write_timeout`.
    pub(crate) fn new(
        (store, slots, bandwidth, counters): (
            Arc<ContentStore>,
            Arc<UploadSlots>,
            Arc<Bandwidth>,
            Arc<UploadCounters>,
        ),
        write_timeout: Duration,
    ) -> Self {
        Self {
            store,
            slots,
            bandwidth,
            counters,
            write_timeout,
        }
    }

    /// Serves the piece streams `incoming` brings (from [`super::streams::Behaviour`]), each in
    /// a task of its own, until `shutdown` ([`serve_streams`]).
    pub(crate) fn start(self, incoming: super::streams::Incoming, shutdown: CancellationToken) {
        let server = Arc::new(self);
        let counters = server.counters.clone();
        serve_streams(
            (incoming, OpenStreams::new(MAX_STREAMS_PER_PEER), "piece"),
            shutdown,
            move || {
                counters.streams.fetch_add(1, Relaxed);
            },
            move |peer, stream| {
                let s = server.clone();
                async move { s.serve(peer, stream).await }
            },
        );
    }

    /// Answers the requests on one stream, one after another, until the peer closes it, stays
    /// silent for [`STREAM_IDLE`], sends what the codec refuses, or does not read a response
    /// within the write timeout.
    async fn serve(&self, peer: PeerId, mut stream: Stream) {
        loop {
            let Some(request) = next_request::<PieceRequest>(&mut stream, &peer, "piece").await
            else {
                return;
            };
            let Some(slot) = self.slots.take(peer) else {
                self.counters.busy.fetch_add(1, Relaxed);
                if !self.respond(&mut stream, &PieceResponse::Busy).await {
                    return;
                }
                continue;
            };
            // A piece this node has just verified is in memory; others are read off the runtime.
            let response = match self
                .store
                .read_piece_in_memory(&request.content_id, request.index)
            {
                Some(bytes) => PieceResponse::Data(bytes),
                None => {
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || super::serve_piece(&store, &request))
                        .await
                        .unwrap_or(PieceResponse::NotFound)
                }
            };
            if let PieceResponse::Data(b) = &response {
                let n = b.len() as u64;
                self.bandwidth.upload(n).await;
                self.bandwidth.count_upload(n);
            }
            if !self.respond(&mut stream, &response).await {
                return;
            }
            if let PieceResponse::Data(d) = &response {
                self.counters.pieces.fetch_add(1, Relaxed);
                self.counters.bytes.fetch_add(d.len() as u64, Relaxed);
            }
            drop(slot);
        }
    }

    /// Writes `response`; false when the stream failed or the peer did not read it in time.
    async fn respond(&self, stream: &mut Stream, response: &PieceResponse) -> bool {
        matches!(
            tokio::time::timeout(self.write_timeout, write_message(stream, response)).await,
            Ok(Ok(()))
        )
    }
}

/// Streams of one protocol open now, per peer, at most `max` of one peer; cloned, the same
/// counts.
#[derive(Clone, Debug)]
pub(crate) struct OpenStreams {
    counts: Arc<Mutex<HashMap<PeerId, usize>>>,
    max: usize,
}

impl OpenStreams {
    /// No stream open yet; at most `max` of one peer.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            counts: Arc::default(),
            max,
        }
    }

    /// Counts a new stream of `peer`, unless it has `max` open; the count drops with the guard.
    pub(crate) fn admit(&self, peer: PeerId) -> Option<OpenStream> {
        let mut open = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(peer).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(OpenStream {
            peer,
            counts: self.counts.clone(),
        })
    }
}

/// One open stream of a peer, counted until dropped.
pub(crate) struct OpenStream {
    peer: PeerId,
    counts: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        give_back(&self.counts, &self.peer);
    }
}

/// Takes the streams `incoming` brings (of the protocol named `what`, for the logs) until
/// `shutdown`, in a task of its own: each is admitted against `open` (else reset), counted
/// with `opened`, and served by `serve` in a task of its own, which `shutdown` ends too.
pub(crate) fn serve_streams<Fut>(
    (mut incoming, open, what): (super::streams::Incoming, OpenStreams, &'static str),
    shutdown: CancellationToken,
    opened: impl Fn() + Send + 'static,
    serve: impl Fn(PeerId, Stream) -> Fut + Send + 'static,
) where
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                next = incoming.recv() => {
                    let Some((peer, stream)) = next else { break };
                    let Some(guard) = open.admit(peer) else {
                        debug!(%peer, "too many {what} streams from one peer; one reset");
                        continue;
                    };
                    opened();
                    let served = serve(peer, stream);
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = served => {}
                        }
                        drop(guard);
                    });
                }
            }
        }
    });
}

/// The next request on a served stream of the protocol named `what` (for the logs): `None`
/// when the peer closed it, sent nothing for [`STREAM_IDLE`], or sent what the codec refuses.
pub(crate) async fn next_request<M: Message>(
    stream: &mut Stream,
    peer: &PeerId,
    what: &str,
) -> Option<M> {
    match tokio::time::timeout(STREAM_IDLE, read_message(stream)).await {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                debug!(%peer, "{what} stream closed: {e}");
            }
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::bandwidth::BandwidthLimits;

    fn slots(n: usize, per_peer: usize, peers: usize) -> Arc<UploadSlots> {
        Arc::new(UploadSlots::new(
            n,
            per_peer,
            Arc::new(AtomicUsize::new(peers)),
            Arc::default(),
            Arc::new(Bandwidth::new(BandwidthLimits::default(), None)),
        ))
    }

    #[test]
    fn a_peer_gets_its_share_of_the_slots_and_a_slot_comes_back_when_dropped() {
        let s = slots(8, 3, 2);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let held: Vec<_> = (0..5).filter_map(|_| s.take(a)).collect();
        assert_eq!(held.len(), 3, "one peer holds at most its share");
        let of_b = s.take(b).expect("a second peer is served");
        assert!(s.take(c).is_none(), "at most two peers are served at once");
        drop(of_b);
        let of_c = s
            .take(c)
            .expect("a peer's place frees when its last slot is back");
        drop(held);
        assert_eq!(s.counters.peak_peers.load(Relaxed), 2);
        // Every slot of `a` came back: it gets its share again.
        let again: Vec<_> = (0..5).filter_map(|_| s.take(a)).collect();
        assert_eq!(again.len(), 3);
        drop(of_c);
    }

    #[test]
    fn the_slots_bound_all_peers_together() {
        let s = slots(4, 4, 16);
        let held: Vec<_> = (0..8).filter_map(|_| s.take(PeerId::random())).collect();
        assert_eq!(held.len(), 4);
        assert!(s.take(PeerId::random()).is_none());
        drop(held);
        assert!(s.take(PeerId::random()).is_some());
    }
}
