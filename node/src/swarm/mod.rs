//! The libp2p swarm: transports, the [`Behaviour`], and the event loop that owns the swarm.
//!
//! The event loop task alone touches the `Swarm`. The rest of the node talks to it through a
//! cloneable [`Handle`] whose methods send a command over a bounded channel and await the
//! answer on a oneshot. Inbound requests are answered from the [`ContentStore`] by short-lived
//! tasks (disk reads never run on the loop), at most [`Config::max_concurrent_uploads`] at once;
//! beyond that a piece request is answered Busy. Pieces travel on long-lived streams that
//! bypass the loop ([`pieces`]).

pub(crate) mod dialscope;
pub(crate) mod discovered;
pub(crate) mod group;
pub(crate) mod have;
pub(crate) mod lan;
pub(crate) mod mux;
pub(crate) mod pieces;
pub(crate) mod streams;
pub(crate) mod tls;

use std::{
    collections::{HashMap, HashSet},
    io,
    marker::PhantomData,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, identify, identity, kad, noise, ping,
    request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel},
    swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle, dial_opts::DialOpts},
    tcp,
};
use shoal_protocol::{
    ANNOUNCE_PROTOCOL, Ack, HAVE_PROTOCOL, HaveKey, HaveRequest, HaveResponse, Holding,
    LAYER_PROTOCOL, LayerRequest, LayerResponse, Message, PieceRequest, PieceResponse,
    frame::LengthPrefix,
};
use shoal_validator::ContentId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::swarm::dialscope::{DialScopes, ScopedDial};
use crate::{
    Error,
    store::ContentStore,
    swarm::group::{Group, PUBLIC_DHT_PROTOCOL, PeerMode},
};

/// Capacity of the command channel into the event loop.
const COMMAND_QUEUE: usize = 256;
/// How often the loop redials configured peers that are not connected.
const REDIAL_INTERVAL: Duration = Duration::from_secs(3);

/// A request-response codec for one request and one response type of [`shoal_protocol`]: a varint
/// length prefix, then the protobuf body, with the message type's byte limit checked before
/// the body is read. A response is held to its request's own limit where that is smaller
/// ([`Message::response_limit_bytes`]: a piece response to the piece asked for), since
/// libp2p uses one clone of the codec per outbound stream, writing the request and then
/// reading the response.
pub struct Codec<Req, Resp> {
    /// The limit of the response to the request this clone wrote.
    response_limit: Option<usize>,
    types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Default for Codec<Req, Resp> {
    fn default() -> Self {
        Self {
            response_limit: None,
            types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Reads one framed message (varint length, then the protobuf body), refusing a length over
/// the type's limit ([`Message::MAX_LEN_BYTES`]) before reading the body.
///
/// # Errors
/// The stream's I/O error (`UnexpectedEof` when it ends early); `InvalidData` for a length
/// over the limit or a body that does not decode.
pub async fn read_message<M: Message, T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<M> {
    read_message_within(io, M::MAX_LEN_BYTES).await
}

/// Reads a message whose body may be at most `limit` bytes (and the type's own limit).
async fn read_message_within<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<M> {
    let mut prefix = LengthPrefix::new(limit.min(M::MAX_LEN_BYTES));
    let len = loop {
        let mut byte = [0u8; 1];
        io.read_exact(&mut byte).await?;
        match prefix.push(byte[0]) {
            Ok(Some(len)) => break len,
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    };
    let body = read_body(io, len).await?;
    M::decode(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Bodies at least this long, in bytes, are read so that a trailing bulk field starts on a
/// [`BULK_ALIGN`] boundary.
const ALIGN_FROM_BYTES: usize = 64 * 1024;
/// The alignment of bulk payloads in received bodies, in bytes: what O_DIRECT writes need.
pub(crate) const BULK_ALIGN: usize = crate::bufpool::ALIGN;

/// Reads a body of `len` bytes. A large body is one bulk field (a piece) behind a short head
/// of tag and varint length; it is placed so that the bulk starts 4096-aligned, and the
/// prost-decoded `Bytes` of the piece, which slice this buffer without copying, can go to disk
/// with O_DIRECT without another copy.
async fn read_body<T: AsyncRead + Unpin + Send>(io: &mut T, len: usize) -> io::Result<Bytes> {
    if len < ALIGN_FROM_BYTES {
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await?;
        return Ok(Bytes::from(body));
    }
    // The head of a single length-delimited field: one tag byte and the varint of the rest.
    let head = (2..=11)
        .find(|&h| {
            let (_, n) = shoal_protocol::frame::encode_prefix((len - h) as u64);
            1 + n == h
        })
        .unwrap_or(0);
    // A reused buffer: a fresh one costs zeroing and page faults on every piece.
    let mut buf = crate::bufpool::take(len + BULK_ALIGN);
    let start = (buf.as_ptr().wrapping_add(head).align_offset(BULK_ALIGN)) % BULK_ALIGN;
    io.read_exact(&mut buf[start..start + len]).await?;
    Ok(crate::bufpool::into_bytes(buf).slice(start..start + len))
}

/// Writes one framed message (varint length, then the protobuf body) and flushes.
///
/// # Errors
/// The stream's I/O error.
pub async fn write_message<M: Message, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    msg: &M,
) -> io::Result<()> {
    let (head, bulk) = msg.encode_parts();
    let (prefix, n) = shoal_protocol::frame::encode_prefix((head.len() + bulk.len()) as u64);
    io.write_all(&prefix[..n]).await?;
    io.write_all(&head).await?;
    io.write_all(&bulk).await?;
    io.flush().await
}

impl<Req, Resp> request_response::Codec for Codec<Req, Resp>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message_within(io, self.response_limit.unwrap_or(Resp::MAX_LEN_BYTES)).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        self.response_limit = req.response_limit_bytes();
        write_message(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &resp).await
    }
}

type HaveBehaviour = request_response::Behaviour<Codec<HaveRequest, HaveResponse>>;
type LayerBehaviour = request_response::Behaviour<Codec<LayerRequest, LayerResponse>>;
type AnnounceBehaviour = request_response::Behaviour<Codec<HaveResponse, Ack>>;

mod behaviour {
    #![allow(missing_docs)]

    use super::{
        AnnounceBehaviour, HaveBehaviour, LayerBehaviour, NetworkBehaviour, Toggle, identify, kad,
        ping,
    };
    use crate::swarm::dialscope::ScopedDial;

    /// Shoal's network behaviour: identify, ping, the optional Kademlia DHT, and the peer
    /// protocols (pieces on long-lived streams, `stream`). The addresses identify and Kademlia offer for an outgoing connection were
    /// stated by peers: they are dialed only in the open scopes (`dialscope`). (mDNS runs
    /// beside the swarm, `lan`.)
    #[derive(NetworkBehaviour)]
    pub(crate) struct Behaviour {
        pub(super) identify: ScopedDial<identify::Behaviour>,
        pub(super) ping: ping::Behaviour,
        pub(super) kad: Toggle<ScopedDial<kad::Behaviour<kad::store::MemoryStore>>>,
        pub(super) have: HaveBehaviour,
        pub(super) layer: LayerBehaviour,
        pub(super) streams: super::streams::Behaviour,
        pub(super) announce: AnnounceBehaviour,
    }
}

pub(crate) use behaviour::{Behaviour, BehaviourEvent};

/// Swarm settings.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and redial while not connected (with or without `/p2p/ID`).
    pub peers: Vec<Multiaddr>,
    /// Whether to discover LAN peers with mDNS (multicast to 224.0.0.251).
    pub mdns: bool,
    /// The most inbound piece requests served at once; more are answered Busy.
    pub max_concurrent_uploads: usize,
    /// The most peers served at once; a piece request from another peer is answered Busy.
    pub max_upload_peers: usize,
    /// Timeout of one piece request.
    pub piece_timeout: Duration,
    /// Which peers the node uses. In [`PeerMode::Origin`] it listens nowhere and dials
    /// nobody.
    pub mode: PeerMode,
    /// The peer group: connections then need the group's pre-shared key (TCP only).
    pub group: Option<Group>,
    /// DHT bootstrap peers, each ending in `/p2p/PEER_ID` (used in the group and internet
    /// modes).
    pub bootstrap: Vec<Multiaddr>,
    /// How long other nodes keep this node's provider records, in seconds.
    pub provider_ttl: Duration,
    /// How often this node publishes its provider records again.
    pub provider_republish: Duration,
    /// Cache nodes, in order of preference, each ending in `/p2p/PEER_ID`: dialed and
    /// redialed like `peers`; their bytes count as cache bytes, and downloads ask the first
    /// one that answers to fetch what nobody holds (the have request carries the origin URL).
    pub cache_nodes: Vec<Multiaddr>,
}

/// A peer's have request with an origin URL for content this node lacks, passed to a cache
/// node's fill task: the node may fetch the content and serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FillRequest {
    /// Who asked.
    pub peer: PeerId,
    /// The content asked for.
    pub key: HaveKey,
    /// Where the asker would fetch it (at most 4096 bytes; not yet checked).
    pub origin_url: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0"
                    .parse()
                    .expect("valid literal multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("valid literal multiaddr"),
            ],
            peers: Vec::new(),
            mdns: false,
            max_concurrent_uploads: 32,
            max_upload_peers: 16,
            piece_timeout: Duration::from_secs(30),
            mode: PeerMode::Lan,
            group: None,
            bootstrap: Vec::new(),
            provider_ttl: Duration::from_secs(2 * 3600),
            provider_republish: Duration::from_secs(30 * 60),
            cache_nodes: Vec::new(),
        }
    }
}

/// How this node came to know a peer; it decides which figure the peer's bytes count in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PeerSource {
    /// A listed (static) peer, an mDNS peer, or one found no other way that connected from a
    /// loopback or private address: a LAN peer.
    #[default]
    Lan,
    /// Found as a provider through the DHT (the group's, or the public one), and neither
    /// listed nor found by mDNS.
    Dht,
    /// A configured cache node.
    Cache,
}

impl crate::job::BytesBySource {
    /// Counts `bytes` from `source` (`None`: the origin). Here rather than beside the type,
    /// which the job types keep free of the rest of the crate.
    pub(crate) fn add(&mut self, source: Option<PeerSource>, bytes: u64) {
        *match source {
            None => &mut self.origin,
            Some(PeerSource::Lan) => &mut self.lan_peers,
            Some(PeerSource::Dht) => &mut self.group_peers,
            Some(PeerSource::Cache) => &mut self.cache,
        } += bytes;
    }
}

impl PeerSource {
    /// The name used in stats: `lan`, `group` (DHT peers) or `cache`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lan => "lan",
            Self::Dht => "group",
            Self::Cache => "cache",
        }
    }
}

/// What the DHT side of the swarm knows, for diagnostics (`shoal why`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DhtStatus {
    /// Whether the node takes part in a DHT.
    pub enabled: bool,
    /// The DHT protocol name.
    pub protocol: String,
    /// Peers in the routing table.
    pub routing_peers: usize,
    /// Content keys this node announces as a provider.
    pub provided_keys: usize,
    /// Provider lookups run so far.
    pub lookups: u64,
    /// Providers those lookups returned, in all.
    pub providers_found: u64,
}

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    /// The request failed on the network, as libp2p's request-response reports it: a dial
    /// failure, the request timeout, a closed connection, an unsupported protocol, or an I/O
    /// error (a response our codec refused, by its size or its encoding, is one).
    #[error("request to {peer} failed: {error}")]
    Outbound {
        /// The peer.
        peer: PeerId,
        /// What libp2p reported, kept as its type.
        error: request_response::OutboundFailure,
    },
    /// An exchange on a piece or have stream failed: the stream could not be opened
    /// (`Unsupported`: the peer does not speak the protocol), the request timed out
    /// ([`Config::piece_timeout`], [`HAVE_TIMEOUT`]; `TimedOut`), the stream broke, or the
    /// codec refused the response (`InvalidData`: longer than asked, or not the response
    /// expected).
    #[error("request to {peer} on a stream failed: {error}")]
    Stream {
        /// The peer.
        peer: PeerId,
        /// What failed.
        error: io::Error,
    },
    /// The swarm has shut down.
    #[error("the swarm has shut down")]
    Shutdown,
}

/// An outbound request to a peer.
#[derive(Debug)]
enum OutRequest {
    Have(
        HaveRequest,
        oneshot::Sender<Result<HaveResponse, RequestError>>,
    ),
    Layer(
        LayerRequest,
        oneshot::Sender<Result<LayerResponse, RequestError>>,
    ),
}

/// A command to the event loop.
#[derive(Debug)]
enum Command {
    Request(PeerId, OutRequest),
    Dial(Multiaddr),
    FindProviders(HaveKey, mpsc::Sender<PeerId>),
    Announce(Vec<PeerId>, Holding),
    DhtStatus(oneshot::Sender<DhtStatus>),
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    /// Dials the peer (as a request to it would) unless it is connected, then answers.
    Connect(PeerId, oneshot::Sender<()>),
    RespondLayer(
        ResponseChannel<LayerResponse>,
        LayerResponse,
        pieces::UploadSlot,
    ),
}

/// Counters of what this node served to peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Pieces sent to peers.
    pub pieces: u64,
    /// Bytes of pieces sent to peers.
    pub bytes: u64,
    /// Piece requests answered Busy because the most concurrent uploads or
    /// the most upload peers were being served.
    pub busy: u64,
    /// The most peers served at once so far.
    pub peak_peers: u64,
    /// Piece streams peers opened to this node (each carries one request after another,
    /// decision 0021).
    pub streams: u64,
    /// Have streams peers opened to this node (each carries one query after another,
    /// decision 0022).
    pub have_streams: u64,
    /// Have queries answered on have streams.
    pub have_on_streams: u64,
    /// Have queries answered with request-response (`/shoal/have/1.0.0`, from peers that do
    /// not speak have streams).
    pub have_requests: u64,
}

#[derive(Debug, Default)]
pub(crate) struct UploadCounters {
    pieces: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    busy: std::sync::atomic::AtomicU64,
    peak_peers: std::sync::atomic::AtomicU64,
    streams: std::sync::atomic::AtomicU64,
    pub(crate) have_streams: std::sync::atomic::AtomicU64,
    pub(crate) have_on_streams: std::sync::atomic::AtomicU64,
    pub(crate) have_requests: std::sync::atomic::AtomicU64,
}

/// Peer sources, shared between the loop (which learns them) and downloads (which count
/// bytes by them).
/// Each peer's source with the rank of the evidence: a configured cache node (3) beats a
/// listed or mDNS peer (2), which beats a DHT provider (1), which beats a guess from the
/// address of an inbound connection (0).
type Sources = Arc<std::sync::RwLock<HashMap<PeerId, (PeerSource, u8)>>>;

/// Records that `peer` is of `source` on evidence of `rank`, unless stronger evidence said
/// otherwise.
fn learn(sources: &Sources, peer: PeerId, source: PeerSource, rank: u8) {
    let mut s = sources.write().unwrap_or_else(|e| e.into_inner());
    if s.len() >= MAX_SOURCES && !s.contains_key(&peer) {
        // Guesses and DHT findings go first; listed peers and cache nodes are configured.
        s.retain(|_, (_, r)| *r >= RANK_LISTED);
        if s.len() >= MAX_SOURCES {
            return;
        }
    }
    let e = s.entry(peer).or_insert((source, rank));
    if rank > e.1 {
        *e = (source, rank);
    }
}

/// Peers whose source the node remembers at most.
const MAX_SOURCES: usize = 4096;

/// Evidence ranks for [`learn`].
const RANK_GUESS: u8 = 0;
const RANK_DHT: u8 = 1;
const RANK_LISTED: u8 = 2;
const RANK_CACHE: u8 = 3;

/// A cloneable handle to the swarm's event loop.
#[derive(Clone, Debug)]
pub(crate) struct Handle {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    uploads: Arc<UploadCounters>,
    sources: Sources,
    mode: PeerMode,
    group: Option<String>,
    announcements: tokio::sync::broadcast::Sender<(PeerId, Holding)>,
    connected: tokio::sync::watch::Receiver<usize>,
    cache_nodes: Arc<Vec<PeerId>>,
    max_upload_peers: Arc<std::sync::atomic::AtomicUsize>,
    /// Opens piece streams.
    streams: streams::Control,
    /// The piece streams kept open between requests.
    pool: Arc<pieces::Pool>,
    /// The have streams kept open between queries, and the peers that speak only
    /// request-response have queries.
    have: Arc<have::Client>,
    /// The timeout of one piece exchange.
    piece_timeout: Duration,
}

/// Announcements buffered per subscriber; a slow download misses old ones (its have queries
/// catch up).
const ANNOUNCE_QUEUE: usize = 1024;

impl Handle {
    /// How many peers are connected now (without a round trip to the event loop).
    #[must_use]
    pub(crate) fn connected_count(&self) -> usize {
        *self.connected.borrow()
    }

    /// Waits until some peer is connected, at most `wait`; true when one is.
    pub(crate) async fn wait_connected(&self, wait: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(wait, rx.wait_for(|n| *n > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Pushes `holding` to `peers` (fire and forget): what this node holds and fetches of one
    /// content, so that peers fetching it too see at once which pieces are taken.
    pub(crate) async fn announce(&self, peers: Vec<PeerId>, holding: Holding) {
        if !peers.is_empty() {
            let _ = self.commands.send(Command::Announce(peers, holding)).await;
        }
    }

    /// Announcements received from peers, as they come.
    #[must_use]
    pub(crate) fn announcements(&self) -> tokio::sync::broadcast::Receiver<(PeerId, Holding)> {
        self.announcements.subscribe()
    }

    /// The peer mode the swarm runs in.
    #[must_use]
    pub(crate) fn mode(&self) -> PeerMode {
        self.mode
    }

    /// The name of the node's group, if it has one.
    #[must_use]
    pub(crate) fn group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// How this node came to know `peer` ([`PeerSource::Lan`] for a peer it knows nothing
    /// about).
    #[must_use]
    pub(crate) fn peer_source(&self, peer: &PeerId) -> PeerSource {
        self.sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(peer)
            .map(|e| e.0)
            .unwrap_or_default()
    }

    /// Looks up the providers of `key` in the DHT and dials each as it is found; returns the
    /// providers found (without this node) when the lookup ends or `wait` has passed,
    /// whichever comes first (the lookup goes on, dialing what it finds, for at most the DHT
    /// query timeout of 15 s). Empty at once when the node is in no DHT.
    pub(crate) async fn find_providers(&self, key: HaveKey, wait: Duration) -> Vec<PeerId> {
        let (tx, mut rx) = mpsc::channel(PROVIDERS_QUEUE);
        if self
            .commands
            .send(Command::FindProviders(key, tx))
            .await
            .is_err()
        {
            return Vec::new();
        }
        let mut found = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(p)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if !found.contains(&p) {
                found.push(p);
            }
        }
        found
    }

    /// What the DHT side knows now.
    pub(crate) async fn dht_status(&self) -> DhtStatus {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::DhtStatus(tx)).await.is_err() {
            return DhtStatus::default();
        }
        rx.await.unwrap_or_default()
    }

    /// This node's peer id.
    #[must_use]
    pub(crate) fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// What this node has served to peers so far.
    #[must_use]
    pub(crate) fn upload_stats(&self) -> UploadStats {
        use std::sync::atomic::Ordering::Relaxed;
        UploadStats {
            pieces: self.uploads.pieces.load(Relaxed),
            bytes: self.uploads.bytes.load(Relaxed),
            busy: self.uploads.busy.load(Relaxed),
            peak_peers: self.uploads.peak_peers.load(Relaxed),
            streams: self.uploads.streams.load(Relaxed),
            have_streams: self.uploads.have_streams.load(Relaxed),
            have_on_streams: self.uploads.have_on_streams.load(Relaxed),
            have_requests: self.uploads.have_requests.load(Relaxed),
        }
    }

    async fn request<R>(
        &self,
        peer: PeerId,
        make: impl FnOnce(oneshot::Sender<Result<R, RequestError>>) -> OutRequest,
    ) -> Result<R, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Request(peer, make(tx)))
            .await
            .map_err(|_| RequestError::Shutdown)?;
        rx.await.map_err(|_| RequestError::Shutdown)?
    }

    /// Sets the most peers served at once (at least 1); requests of further peers are
    /// answered Busy.
    pub(crate) fn set_max_upload_peers(&self, n: usize) {
        self.max_upload_peers
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The most peers served at once.
    #[must_use]
    pub(crate) fn max_upload_peers(&self) -> usize {
        self.max_upload_peers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The configured cache nodes, in order of preference.
    #[must_use]
    pub(crate) fn cache_nodes(&self) -> &[PeerId] {
        &self.cache_nodes
    }

    /// Asks `peer` what it holds of a key (`request.origin_url` is for cache nodes): on a have
    /// stream kept open from an earlier query or on a new one ([`have`]), within
    /// [`HAVE_TIMEOUT`]; with request-response when the peer does not speak the stream
    /// protocol.
    ///
    /// # Errors
    /// [`RequestError`] when the query fails.
    pub(crate) async fn have(
        &self,
        peer: PeerId,
        request: HaveRequest,
    ) -> Result<HaveResponse, RequestError> {
        if !self.have.is_old(&peer) {
            let asked = self
                .exchange_on(
                    (&self.have.pool, have::protocol(), HAVE_TIMEOUT),
                    peer,
                    &request,
                    HaveResponse::MAX_LEN_BYTES,
                )
                .await;
            match asked {
                Err(RequestError::Stream { error, .. })
                    if error.kind() == io::ErrorKind::Unsupported =>
                {
                    self.have.set_old(peer);
                }
                other => return other,
            }
        }
        self.request(peer, |tx| OutRequest::Have(request, tx)).await
    }

    /// Asks `peer` for the piece layer of `id`; with `partial`, also for the chaining values
    /// it can tell when it has no verified layer (its claims and what it relays), of the
    /// pieces set in that bitfield only.
    ///
    /// # Errors
    /// [`RequestError`] when the request fails.
    pub(crate) async fn layer(
        &self,
        peer: PeerId,
        id: ContentId,
        partial: Option<shoal_protocol::Bitfield>,
    ) -> Result<LayerResponse, RequestError> {
        self.request(peer, |tx| {
            OutRequest::Layer(
                LayerRequest {
                    content_id: id,
                    partial: partial.is_some(),
                    want: partial,
                },
                tx,
            )
        })
        .await
    }

    /// Asks `peer` for piece `index` of `id`, on a piece stream kept open from an earlier
    /// request or on a new one ([`pieces`]), within [`Config::piece_timeout`]. A kept stream
    /// that fails other than by a refused response (the peer closed it meanwhile) is dropped
    /// and the request sent again once on a new stream.
    ///
    /// # Errors
    /// [`RequestError::Stream`] when the stream cannot be opened, breaks, times out, or
    /// brings a response the codec refuses; [`RequestError::Shutdown`].
    pub(crate) async fn piece(
        &self,
        peer: PeerId,
        id: ContentId,
        index: u32,
    ) -> Result<PieceResponse, RequestError> {
        let request = PieceRequest {
            content_id: id,
            index,
        };
        let limit = request
            .response_limit_bytes()
            .unwrap_or(PieceResponse::MAX_LEN_BYTES);
        self.exchange_on(
            (&self.pool, pieces::protocol(), self.piece_timeout),
            peer,
            &request,
            limit,
        )
        .await
    }

    /// One exchange with `peer` on a stream of `protocol` taken from `pool` (or a new one),
    /// within `timeout`: writes `request`, reads a response of at most `limit` bytes, and keeps
    /// the stream in `pool` for the next. A kept stream that fails other than by a refused
    /// response (the peer closed it meanwhile) is dropped and the request sent again once on a
    /// new stream.
    ///
    /// # Errors
    /// [`RequestError::Stream`]: `Unsupported` when the peer does not speak `protocol`,
    /// `TimedOut`, `InvalidData` for a response the codec refuses, or the stream's I/O error.
    async fn exchange_on<Req: Message, Resp: Message>(
        &self,
        (pool, protocol, timeout): (&pieces::Pool, StreamProtocol, Duration),
        peer: PeerId,
        request: &Req,
        limit: usize,
    ) -> Result<Resp, RequestError> {
        let once = |mut stream: libp2p::Stream| async move {
            let r = pieces::exchange_within(&mut stream, request, limit).await?;
            Ok::<_, io::Error>((r, stream))
        };
        let exchange = async {
            if let Some(stream) = pool.take(&peer) {
                match once(stream).await {
                    Ok((r, stream)) => {
                        pool.put(peer, stream);
                        return Ok(r);
                    }
                    Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                        return Err(RequestError::Stream { peer, error });
                    }
                    Err(e) => {
                        debug!(%peer, %protocol, "a kept stream failed ({e}); opening another")
                    }
                }
            }
            let stream = self.open_stream(peer, protocol.clone()).await?;
            let (r, stream) = once(stream)
                .await
                .map_err(|error| RequestError::Stream { peer, error })?;
            pool.put(peer, stream);
            Ok(r)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(RequestError::Stream {
                    peer,
                    error: io::Error::new(io::ErrorKind::TimedOut, "the request timed out"),
                })
            })
    }

    /// Opens a stream of `protocol` to `peer`, having the loop dial it first when it is not
    /// connected (from a new port, at the addresses mDNS gave, as for any request).
    async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<libp2p::Stream, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Connect(peer, tx))
            .await
            .map_err(|_| RequestError::Shutdown)?;
        rx.await.map_err(|_| RequestError::Shutdown)?;
        self.streams
            .open_stream(peer, protocol)
            .await
            .map_err(|error| RequestError::Stream { peer, error })
    }

    /// The peers connected now.
    pub(crate) async fn connected_peers(&self) -> Vec<PeerId> {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::ConnectedPeers(tx))
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The addresses this node listens on, each ending in `/p2p/PEER_ID`.
    pub(crate) async fn listen_addrs(&self) -> Vec<Multiaddr> {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::ListenAddrs(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Dials `addr` once (with or without `/p2p/ID`).
    pub(crate) async fn dial(&self, addr: Multiaddr) {
        let _ = self.commands.send(Command::Dial(addr)).await;
    }
}

/// The next peer mDNS found or lost; pending for ever when mDNS is off.
async fn lan_next(lan: &mut Option<lan::Lan>) -> Option<lan::Found> {
    match lan {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// The dial options for an address this node dials (with or without `/p2p/ID`): always from
/// a new local port, never from the listen port. libp2p's default binds an outgoing TCP
/// socket to the listen port; two nodes on one fixed port (a fleet on DO's 7680) that dial
/// each other at the same moment then make one TCP connection by simultaneous open, where both
/// ends act as TLS clients and the handshake fails. From new ports they make two connections,
/// and both work. Shoal does no NAT hole punching, which is what the listen port is reused for.
fn dial_addr(addr: Multiaddr) -> DialOpts {
    DialOpts::unknown_peer_id()
        .address(addr)
        .allocate_new_port()
        .build()
}

/// How long one have query may take, on either protocol.
pub(crate) const HAVE_TIMEOUT: Duration = Duration::from_secs(10);

fn request_config(timeout: Duration) -> request_response::Config {
    request_response::Config::default()
        .with_request_timeout(timeout)
        .with_max_concurrent_streams(512)
}

/// The DHT record key of a have key: the BLAKE3 hash itself, or `sha256:` and the digest.
#[must_use]
pub(crate) fn record_key(key: &HaveKey) -> kad::RecordKey {
    match key {
        HaveKey::Blake3(h) => kad::RecordKey::new(h),
        HaveKey::Sha256(d) => kad::RecordKey::new(&[b"sha256:".as_slice(), &d.0].concat()),
    }
}

/// The Kademlia behaviour: server mode (a LAN node is reachable), the group's protocol name,
/// provider records with the configured lifetime, and room to announce many keys.
fn kad_behaviour(peer_id: PeerId, config: &Config) -> kad::Behaviour<kad::store::MemoryStore> {
    let protocol = config.group.as_ref().map_or(
        StreamProtocol::new(PUBLIC_DHT_PROTOCOL),
        Group::dht_protocol,
    );
    let mut kc = kad::Config::new(protocol);
    // Other peers' provider records reach the store only through `RemoteProviders`' quotas.
    kc.set_record_filtering(kad::StoreInserts::FilterBoth);
    kc.set_query_timeout(DHT_QUERY_TIMEOUT)
        .set_provider_record_ttl(Some(config.provider_ttl))
        .set_provider_publication_interval(Some(config.provider_republish));
    let store = kad::store::MemoryStore::with_config(
        peer_id,
        kad::store::MemoryStoreConfig {
            max_provided_keys: 1 << 20,
            max_records: 1024,
            ..Default::default()
        },
    );
    let mut k = kad::Behaviour::with_config(peer_id, store, kc);
    k.set_mode(Some(kad::Mode::Server));
    k
}

/// Provider records of other peers kept at most, per providing peer.
const MAX_REMOTE_KEYS_PER_PEER: usize = 256;
/// Provider records of other peers kept at most, in all.
const MAX_REMOTE_KEYS: usize = 16 * 1024;
/// Addresses kept per remote provider record.
const MAX_PROVIDER_ADDRS: usize = 4;

/// The quotas on other peers' DHT provider records (`ADD_PROVIDER`): at most
/// [`MAX_REMOTE_KEYS_PER_PEER`] keys per providing peer and [`MAX_REMOTE_KEYS`] in all, each
/// counted until its record expires, so that no peer can fill the node's memory with records.
#[derive(Debug, Default)]
struct RemoteProviders {
    /// Per providing peer: the keys it provides and when each record expires.
    by_peer: HashMap<PeerId, HashMap<kad::RecordKey, std::time::Instant>>,
    total: usize,
    /// When expired records were last forgotten (at most once a second: a flood of refused
    /// records must not cost a walk over every record each).
    pruned: Option<std::time::Instant>,
}

impl RemoteProviders {
    /// Whether `record` may be stored (a renewal of a counted record always may).
    fn admit(&mut self, record: &kad::ProviderRecord, now: std::time::Instant) -> bool {
        let expires = record
            .expires
            .unwrap_or(now + Duration::from_secs(48 * 3600));
        if let Some(keys) = self.by_peer.get_mut(&record.provider)
            && let Some(t) = keys.get_mut(&record.key)
        {
            *t = expires;
            return true;
        }
        let full = |s: &Self| {
            s.total >= MAX_REMOTE_KEYS
                || s.by_peer
                    .get(&record.provider)
                    .is_some_and(|k| k.len() >= MAX_REMOTE_KEYS_PER_PEER)
        };
        if full(self) {
            if self
                .pruned
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
            {
                return false;
            }
            self.prune(now);
            if full(self) {
                return false;
            }
        }
        self.by_peer
            .entry(record.provider)
            .or_default()
            .insert(record.key.clone(), expires);
        self.total += 1;
        true
    }

    /// Forgets the records that expired.
    fn prune(&mut self, now: std::time::Instant) {
        self.pruned = Some(now);
        for keys in self.by_peer.values_mut() {
            keys.retain(|_, t| *t > now);
        }
        self.by_peer.retain(|_, k| !k.is_empty());
        self.total = self.by_peer.values().map(HashMap::len).sum();
    }
}

/// While the routing table holds at most this many peers, a new peer in it makes the node
/// publish its provider records again (K, the Kademlia replication factor).
const REPUBLISH_BELOW_PEERS: usize = 20;

/// Providers a lookup's waiter is told of before it reads them; later ones are still dialed.
const PROVIDERS_QUEUE: usize = 256;

/// The longest a DHT lookup runs.
const DHT_QUERY_TIMEOUT: Duration = Duration::from_secs(15);

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Whether `addr` is a TCP address (and not QUIC).
pub(crate) fn is_tcp(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)))
        && !addr.iter().any(|p| {
            matches!(
                p,
                libp2p::multiaddr::Protocol::QuicV1 | libp2p::multiaddr::Protocol::Udp(_)
            )
        })
}

/// Whether a peer's address is on this host or a private network (RFC 1918, RFC 4193,
/// link-local): a peer there counts as a LAN peer.
fn is_local(addr: &Multiaddr) -> bool {
    use crate::swarm::dialscope::{Scope, scope_of};
    matches!(
        scope_of(addr),
        Scope::Loopback | Scope::Private | Scope::LinkLocal
    )
}

/// Connections kept at most from one IP address (loopback aside: tests and single-host
/// swarms share it).
const MAX_CONNECTIONS_PER_IP: usize = 8;
/// Connections kept at most in all.
const MAX_CONNECTIONS: usize = 1024;
/// Listen addresses of one peer taken from identify into the DHT's routing table.
const MAX_STATED_ADDRESSES: usize = 8;

/// Which inbound and outbound connections the node keeps: in `lan` mode only peers on this
/// host or a private network, or listed (static peers, cache nodes), may connect in; and at
/// most [`MAX_CONNECTIONS_PER_IP`] per address and [`MAX_CONNECTIONS`] in all.
#[derive(Debug, Default)]
struct ConnectionGate {
    lan_only: bool,
    listed: HashSet<PeerId>,
    per_ip: HashMap<std::net::IpAddr, usize>,
    total: usize,
}

/// The IP address of a multiaddr, if it has one.
fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(ip.into()),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

impl ConnectionGate {
    /// Counts a connection to `peer` at `remote` (`inbound`: it dialed us); false when it must
    /// be closed (the count is given back when it closes, through [`Self::closed`]).
    fn opened(&mut self, peer: &PeerId, remote: &Multiaddr, inbound: bool) -> bool {
        let ip = ip_of(remote);
        self.total += 1;
        if let Some(ip) = ip {
            *self.per_ip.entry(ip).or_default() += 1;
        }
        if self.listed.contains(peer) {
            return true;
        }
        if inbound && self.lan_only && !is_local(remote) {
            return false;
        }
        let crowded = ip.is_some_and(|ip| {
            !ip.is_loopback() && self.per_ip.get(&ip).copied().unwrap_or(0) > MAX_CONNECTIONS_PER_IP
        });
        !crowded && self.total <= MAX_CONNECTIONS
    }

    /// A connection counted by [`Self::opened`] closed.
    fn closed(&mut self, remote: &Multiaddr) {
        self.total = self.total.saturating_sub(1);
        if let Some(ip) = ip_of(remote)
            && let Some(n) = self.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

/// Checks the settings against the mode (an origin-only node binds and dials nothing; a
/// group needs its name and secret, and TCP only) and returns the bootstrap peers.
///
/// # Errors
/// [`Error::Swarm`] naming what is wrong.
fn check(config: &mut Config) -> Result<Vec<(PeerId, Multiaddr)>, Error> {
    if !config.mode.uses_peers() {
        // Origin only: nothing is bound and nobody is dialed.
        config.listen.clear();
        config.peers.clear();
        config.bootstrap.clear();
        config.mdns = false;
    }
    if config.mode == PeerMode::Group && config.group.is_none() {
        return Err(Error::Swarm(
            "peer mode \"group\" needs a group (a name and a secret)".into(),
        ));
    }
    if config.group.is_some() {
        // pnet wraps a byte stream: a grouped node runs TCP alone.
        if let Some(bad) = config.listen.iter().find(|a| !is_tcp(a)) {
            return Err(Error::Swarm(format!(
                "cannot listen on {bad}: a grouped node runs TCP only (pnet needs a byte stream)"
            )));
        }
    }
    Ok(if config.mode.uses_dht() {
        config
            .bootstrap
            .iter()
            .map(|a| {
                peer_of(a).map(|p| (p, a.clone())).ok_or_else(|| {
                    Error::Swarm(format!("bootstrap address {a} must end in /p2p/PEER_ID"))
                })
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    })
}

/// The swarm: the behaviour (addresses peers state dialed only in `dial_scopes`) over TCP with
/// TLS or noise and QUIC, or over the group's pnet TCP transport.
///
/// # Errors
/// [`Error::Swarm`] when a transport or mDNS cannot be set up.
fn build_swarm(
    keypair: identity::Keypair,
    config: &Config,
    dial_scopes: &DialScopes,
    streams: streams::Behaviour,
) -> Result<libp2p::Swarm<Behaviour>, Error> {
    let dht_on = config.mode.uses_dht();
    let make_behaviour =
        |key: &identity::Keypair| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
            let peer_id = key.public().to_peer_id();
            Ok(Behaviour {
                identify: ScopedDial::new(
                    identify::Behaviour::new(identify::Config::new(
                        "/shoal/1.0.0".into(),
                        key.public(),
                    )),
                    dial_scopes.clone(),
                ),
                ping: ping::Behaviour::default(),
                kad: Toggle::from(
                    dht_on.then(|| {
                        ScopedDial::new(kad_behaviour(peer_id, config), dial_scopes.clone())
                    }),
                ),
                have: request_response::Behaviour::new(
                    [(StreamProtocol::new(HAVE_PROTOCOL), ProtocolSupport::Full)],
                    request_config(HAVE_TIMEOUT),
                ),
                layer: request_response::Behaviour::new(
                    [(StreamProtocol::new(LAYER_PROTOCOL), ProtocolSupport::Full)],
                    request_config(Duration::from_secs(20)),
                ),
                streams,
                announce: request_response::Behaviour::new(
                    [(
                        StreamProtocol::new(ANNOUNCE_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    request_config(Duration::from_secs(10)),
                ),
            })
        };
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(120));
    let tcp_config = tcp::Config::default().nodelay(true);
    let swarm_err = |e: &dyn std::fmt::Display| Error::Swarm(e.to_string());
    Ok(match &config.group {
        Some(group) => libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_other_transport(|key| {
                group
                    .transport(key, tcp_config)
                    .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
            })
            .map_err(|e| swarm_err(&e))?
            .with_behaviour(make_behaviour)
            .map_err(|e| swarm_err(&e))?
            .with_swarm_config(idle)
            .build(),
        None => libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp_config,
                // TLS with AES-GCM first (see `tls`); noise for peers that only speak noise.
                (crate::swarm::tls::Config::new, noise::Config::new),
                // yamux with 256 KiB data frames (see `mux`).
                crate::swarm::mux::Config::default,
            )
            .map_err(|e| swarm_err(&e))?
            .with_quic()
            .with_behaviour(make_behaviour)
            .map_err(|e| swarm_err(&e))?
            .with_swarm_config(idle)
            .build(),
    })
}

/// Builds the swarm and spawns its event loop; the loop stops when `shutdown` is cancelled.
///
/// # Errors
/// [`Error::Swarm`] when a transport cannot be built, a listen address cannot be bound, a
/// grouped node is given a non-TCP listen address, or a bootstrap address lacks `/p2p/ID`.
pub(crate) async fn spawn(
    keypair: identity::Keypair,
    mut config: Config,
    store: Arc<ContentStore>,
    registry: Option<&mut prometheus_client::registry::Registry>,
    fills: Option<mpsc::Sender<FillRequest>>,
    bandwidth: Arc<crate::source::bandwidth::Bandwidth>,
    shutdown: CancellationToken,
) -> Result<(Handle, tokio::task::JoinHandle<()>), Error> {
    let bootstrap = check(&mut config)?;
    let dial_scopes = DialScopes::new(
        config
            .peers
            .iter()
            .chain(&config.bootstrap)
            .chain(&config.cache_nodes),
        config.mode == PeerMode::Lan || config.mdns,
    );
    let lan = if config.mdns {
        Some(lan::Lan::start(keypair.public().to_peer_id())?)
    } else {
        None
    };
    let (streams, accepted, control) = streams::Behaviour::new();
    let mut swarm = build_swarm(keypair, &config, &dial_scopes, streams)?;
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| Error::Swarm(format!("cannot listen on {addr}: {e}")))?;
    }
    let sources: Sources = Arc::default();
    for p in config.peers.iter().filter_map(peer_of) {
        learn(&sources, p, PeerSource::Lan, RANK_LISTED);
    }
    let cache_nodes: Vec<PeerId> = config.cache_nodes.iter().filter_map(peer_of).collect();
    for p in &cache_nodes {
        learn(&sources, *p, PeerSource::Cache, RANK_CACHE);
    }
    for a in &config.cache_nodes {
        if !config.peers.contains(a) {
            config.peers.push(a.clone());
        }
    }
    for addr in &config.peers {
        if let Err(e) = swarm.dial(dial_addr(addr.clone())) {
            warn!(%addr, "cannot dial peer: {e}");
        }
    }
    if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
        for (peer, addr) in &bootstrap {
            kad.add_address(peer, addr.clone());
        }
        if !bootstrap.is_empty() {
            let _ = kad.bootstrap();
        }
    }
    for (_, addr) in &bootstrap {
        let _ = swarm.dial(dial_addr(addr.clone()));
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (announcements, _) = tokio::sync::broadcast::channel(ANNOUNCE_QUEUE);
    let max_upload_peers = Arc::new(std::sync::atomic::AtomicUsize::new(
        config.max_upload_peers.max(1),
    ));
    let (connected, connected_rx) = tokio::sync::watch::channel(0usize);
    let peer_id = *swarm.local_peer_id();
    let counters = Arc::new(UploadCounters::default());
    let (slots, answers) = start_servers(
        &config,
        (&store, &bandwidth, &counters, &max_upload_peers),
        (accepted, fills),
        &shutdown,
    );
    let pool = Arc::new(pieces::Pool::default());
    let have_client = Arc::new(have::Client::default());
    let handle = Handle {
        commands: tx.clone(),
        peer_id,
        uploads: counters.clone(),
        sources: sources.clone(),
        mode: config.mode,
        group: config.group.as_ref().map(|g| g.name().to_owned()),
        announcements: announcements.clone(),
        connected: connected_rx,
        cache_nodes: Arc::new(cache_nodes),
        max_upload_peers,
        streams: control,
        pool: pool.clone(),
        have: have_client.clone(),
        piece_timeout: config.piece_timeout,
    };
    let listening = !config.listen.is_empty();
    let (bound_tx, bound) = oneshot::channel();
    let event_loop = EventLoop {
        swarm,
        commands: rx,
        self_tx: tx,
        store,
        slots,
        pool,
        gate: ConnectionGate {
            lan_only: config.mode == PeerMode::Lan,
            listed: config
                .peers
                .iter()
                .filter_map(peer_of)
                .chain(handle.cache_nodes.iter().copied())
                .collect(),
            ..ConnectionGate::default()
        },
        dial_scopes,
        discovered: discovered::Discovered::default(),
        lan,
        lan_ports: (None, None),
        static_peers: config.peers,
        bootstrap: bootstrap.into_iter().map(|(_, a)| a).collect(),
        pending_have: HashMap::new(),
        pending_layer: HashMap::new(),
        listen_addrs: HashSet::new(),
        sources,
        lookups: HashMap::new(),
        provided: HashSet::new(),
        dht_counts: (0, 0),
        remote_providers: RemoteProviders::default(),
        bound: Some(bound_tx),
        republish: false,
        announcements,
        connected,
        metrics: registry.map(libp2p::metrics::Metrics::new),
        answers,
        have_client,
        bandwidth,
        dht_protocol: config
            .group
            .as_ref()
            .map_or(PUBLIC_DHT_PROTOCOL.to_owned(), |g| {
                g.dht_protocol().to_string()
            }),
    };
    let task = tokio::spawn(event_loop.run(shutdown));
    // Wait until a listener is bound (at most a second), so that `listen_addrs` is useful at
    // once.
    if listening {
        let _ = tokio::time::timeout(Duration::from_secs(1), bound).await;
    }
    Ok((handle, task))
}

/// The upload slots, and the piece streams' server on them, serving the streams `incoming`
/// brings until `shutdown`.
/// Starts the servers of inbound piece streams and have streams (`fills`: a cache node's fill
/// task); returns the upload slots and how have queries are answered.
fn start_servers(
    config: &Config,
    (store, bandwidth, counters, max_upload_peers): (
        &Arc<ContentStore>,
        &Arc<crate::source::bandwidth::Bandwidth>,
        &Arc<UploadCounters>,
        &Arc<std::sync::atomic::AtomicUsize>,
    ),
    (accepted, fills): (streams::Accepted, Option<mpsc::Sender<FillRequest>>),
    shutdown: &CancellationToken,
) -> (Arc<pieces::UploadSlots>, have::Answers) {
    let answers = have::Answers {
        store: store.clone(),
        bandwidth: bandwidth.clone(),
        fills,
        counters: counters.clone(),
    };
    have::Server::new(answers.clone()).start(accepted.have, shutdown.clone());
    let slots = Arc::new(pieces::UploadSlots::new(
        config.max_concurrent_uploads,
        uploads_per_peer(config.max_concurrent_uploads),
        max_upload_peers.clone(),
        counters.clone(),
        bandwidth.clone(),
    ));
    let server = (
        store.clone(),
        slots.clone(),
        bandwidth.clone(),
        counters.clone(),
    );
    pieces::Server::new(server, config.piece_timeout).start(accepted.pieces, shutdown.clone());
    (slots, answers)
}

/// A provider lookup in progress: the providers found so far and who wants to hear of them.
struct Lookup {
    found: HashSet<PeerId>,
    waiting: Vec<mpsc::Sender<PeerId>>,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    /// Serving tasks send their answers back through this.
    self_tx: mpsc::Sender<Command>,
    store: Arc<ContentStore>,
    /// The upload slots, shared with the piece streams' server: a slot is held from the
    /// request until its response is handed to libp2p (or fails).
    slots: Arc<pieces::UploadSlots>,
    /// The piece streams kept open between requests (swept here).
    pool: Arc<pieces::Pool>,
    static_peers: Vec<Multiaddr>,
    /// Which connections the node keeps.
    gate: ConnectionGate,
    /// Where the node dials addresses peers state.
    dial_scopes: DialScopes,
    /// The peers mDNS reports, and the retries of failed dials to them.
    discovered: discovered::Discovered,
    /// LAN discovery, when mDNS is on, and the TCP and QUIC ports it states.
    lan: Option<lan::Lan>,
    lan_ports: (Option<u16>, Option<u16>),
    bootstrap: Vec<Multiaddr>,
    pending_have: HashMap<OutboundRequestId, oneshot::Sender<Result<HaveResponse, RequestError>>>,
    pending_layer: HashMap<OutboundRequestId, oneshot::Sender<Result<LayerResponse, RequestError>>>,
    listen_addrs: HashSet<Multiaddr>,
    sources: Sources,
    lookups: HashMap<kad::QueryId, Lookup>,
    /// The DHT keys this node announces.
    provided: HashSet<kad::RecordKey>,
    /// Provider lookups started, and providers they found.
    dht_counts: (u64, u64),
    /// Quotas on other peers' provider records.
    remote_providers: RemoteProviders,
    /// Told when the first listen address is bound.
    bound: Option<oneshot::Sender<()>>,
    /// Set when the provider records should be published again at the next tick.
    republish: bool,
    announcements: tokio::sync::broadcast::Sender<(PeerId, Holding)>,
    /// Peers connected now (read by the metrics).
    connected: tokio::sync::watch::Sender<usize>,
    metrics: Option<libp2p::metrics::Metrics>,
    /// How have queries are answered (request-response ones here, stream ones in `have`); a
    /// cache node's fill task takes those with an origin URL for content not held.
    answers: have::Answers,
    /// The have streams kept open (swept here when a peer disconnects).
    have_client: Arc<have::Client>,
    /// The upload bucket and the monthly upload cap.
    bandwidth: Arc<crate::source::bandwidth::Bandwidth>,
    dht_protocol: String,
}

impl EventLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let store = self.store.clone();
        let dht = self.swarm.behaviour().kad.is_enabled();
        self.sync_provided();
        loop {
            let changed = store.changed();
            let retry = self.discovered.next_due();
            let retry_at = retry.map_or_else(tokio::time::Instant::now, Into::into);
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                _ = redial.tick() => self.redial(),
                () = tokio::time::sleep_until(retry_at), if retry.is_some() => {
                    self.retry_discovered();
                }
                Some(found) = lan_next(&mut self.lan) => self.on_lan(found),
                () = changed, if dht => self.sync_provided(),
            }
        }
        debug!("swarm event loop stopped");
    }

    /// Peers mDNS found are learned as LAN peers and dialed; those it lost are not retried.
    fn on_lan(&mut self, found: lan::Found) {
        match found {
            lan::Found::Peer(peer, addrs) => {
                let mut new = false;
                for addr in addrs {
                    if self.dial_scopes.allows(&addr) {
                        learn(&self.sources, peer, PeerSource::Lan, RANK_LISTED);
                        new |= self.discovered.found(peer, addr);
                    }
                }
                if new {
                    self.dial_discovered(peer);
                }
            }
            lan::Found::Gone(peer, addrs) => {
                for addr in addrs {
                    self.discovered.expired(&peer, &addr);
                }
            }
        }
    }

    /// A listen address was bound: mDNS states the node at its port once it listens on a
    /// private or link-local address (or every interface).
    fn announce_on_lan(&mut self, address: &Multiaddr) {
        use crate::swarm::dialscope::{Scope, scope_of};
        let Some(lan) = &mut self.lan else { return };
        if !matches!(scope_of(address), Scope::Private | Scope::LinkLocal) {
            return;
        }
        let mut tcp = None;
        let mut udp = None;
        for p in address.iter() {
            match p {
                libp2p::multiaddr::Protocol::Tcp(port) => tcp = Some(port),
                libp2p::multiaddr::Protocol::Udp(port) => udp = Some(port),
                _ => {}
            }
        }
        if tcp.is_some() {
            self.lan_ports.0 = tcp;
        } else if udp.is_some() {
            self.lan_ports.1 = udp;
        }
        if let (Some(tcp), quic) = self.lan_ports {
            lan.announce(tcp, quic);
        }
    }

    /// A dial to `peer` failed: a discovered peer is dialed again after a backoff.
    fn on_dial_failure(&mut self, peer: PeerId, error: &libp2p::swarm::DialError) {
        use libp2p::swarm::DialError;
        let lost = !matches!(
            error,
            DialError::DialPeerConditionFalse(_) | DialError::Aborted
        );
        if lost && !self.swarm.is_connected(&peer) {
            let jitter = rand::random::<f64>();
            if let Some(delay) = self
                .discovered
                .failed(&peer, std::time::Instant::now(), jitter)
            {
                debug!(%peer, ?delay, "dial to a discovered peer failed: {error}");
            }
        }
    }

    /// Dials a peer mDNS reported, at all its addresses, unless it is connected or being
    /// dialed.
    fn dial_discovered(&mut self, peer: PeerId) {
        let Some(addrs) = self.discovered.addrs(&peer) else {
            return;
        };
        if self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs.to_vec())
            .allocate_new_port()
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!(%peer, "not dialing a discovered peer: {e}");
        }
    }

    /// Dials again the discovered peers whose retry is due.
    fn retry_discovered(&mut self) {
        for (peer, _) in self.discovered.take_due(std::time::Instant::now()) {
            debug!(%peer, "dialing a discovered peer again");
            self.dial_discovered(peer);
        }
    }

    fn redial(&mut self) {
        for addr in self.static_peers.clone() {
            let known = peer_of(&addr);
            let connected = known.is_some_and(|id| self.swarm.is_connected(&id));
            if !connected && (known.is_some() || self.swarm.connected_peers().next().is_none()) {
                let _ = self.swarm.dial(dial_addr(addr));
            }
        }
        if std::mem::take(&mut self.republish) {
            self.republish_all();
        }
        self.pool.sweep(None);
        self.have_client.sweep(None);
        // Without any connection the DHT is cut off: go back to the bootstrap peers.
        if self.swarm.connected_peers().next().is_none() {
            for addr in self.bootstrap.clone() {
                let _ = self.swarm.dial(dial_addr(addr));
            }
        }
    }

    /// Announces (as a provider) every content id and SHA-256 the store holds, and stops
    /// announcing what it no longer holds; other nodes' copies of a withdrawn record expire
    /// after the provider record TTL.
    fn sync_provided(&mut self) {
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        let now: HashSet<kad::RecordKey> = self.store.keys().iter().map(record_key).collect();
        for gone in self.provided.difference(&now) {
            kad.stop_providing(gone);
        }
        for new in now.difference(&self.provided) {
            if let Err(e) = kad.start_providing(new.clone()) {
                warn!("cannot announce a provider record: {e}");
            }
        }
        self.provided = now;
    }

    /// Publishes every provider record again now (not only at the republish interval).
    fn republish_all(&mut self) {
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        for key in &self.provided {
            let _ = kad.start_providing(key.clone());
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        use kad::{Event as K, GetProvidersOk, QueryResult};
        if let K::InboundRequest {
            request:
                kad::InboundRequest::AddProvider {
                    record: Some(mut record),
                },
        } = event
        {
            if self
                .remote_providers
                .admit(&record, std::time::Instant::now())
            {
                record.addresses.truncate(MAX_PROVIDER_ADDRS);
                if let Some(k) = self.swarm.behaviour_mut().kad.as_mut() {
                    let _ = kad::store::RecordStore::add_provider(k.store_mut(), record);
                }
            }
            return;
        }
        if let K::RoutingUpdated {
            is_new_peer: true, ..
        } = &event
        {
            // A record published while the routing table was small reached few nodes, maybe
            // none: publish again (at the next tick) while the table is still filling.
            let size: usize = self
                .swarm
                .behaviour_mut()
                .kad
                .as_mut()
                .map_or(0, |k| k.kbuckets().map(|b| b.num_entries()).sum());
            if size <= REPUBLISH_BELOW_PEERS && !self.provided.is_empty() {
                self.republish = true;
            }
            return;
        }
        let K::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        let QueryResult::GetProviders(result) = result else {
            return;
        };
        let me = *self.swarm.local_peer_id();
        if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = &result {
            for peer in providers {
                if *peer == me {
                    continue;
                }
                learn(&self.sources, *peer, PeerSource::Dht, RANK_DHT);
                // Dial while the query still knows the addresses.
                if !self.swarm.is_connected(peer) {
                    let _ = self
                        .swarm
                        .dial(DialOpts::peer_id(*peer).allocate_new_port().build());
                }
                if let Some(l) = self.lookups.get_mut(&id)
                    && l.found.insert(*peer)
                {
                    for tx in &l.waiting {
                        // A waiter that fell behind misses providers; they are dialed anyway.
                        let _ = tx.try_send(*peer);
                    }
                }
            }
        }
        let finished = step.last
            || matches!(
                result,
                Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) | Err(_)
            );
        if finished && let Some(l) = self.lookups.remove(&id) {
            // Dropping the senders tells the waiters the lookup ended.
            self.dht_counts.1 += l.found.len() as u64;
        }
    }

    fn on_command(&mut self, cmd: Command) {
        if let Command::Request(peer, _) | Command::Connect(peer, _) = &cmd
            && !self.swarm.is_connected(peer)
        {
            // Dialed here from a new port (see `dial_addr`), at the addresses mDNS gave and
            // those the behaviours know; the request goes out on this connection, and
            // request-response's own dial gives way to it.
            let addrs = self
                .discovered
                .addrs(peer)
                .map(<[Multiaddr]>::to_vec)
                .unwrap_or_default();
            let _ = self.swarm.dial(
                DialOpts::peer_id(*peer)
                    .addresses(addrs)
                    .extend_addresses_through_behaviour()
                    .allocate_new_port()
                    .build(),
            );
        }
        let b = self.swarm.behaviour_mut();
        match cmd {
            Command::Request(peer, OutRequest::Have(req, tx)) => {
                let id = b.have.send_request(&peer, req);
                self.pending_have.insert(id, tx);
            }
            Command::Request(peer, OutRequest::Layer(req, tx)) => {
                let id = b.layer.send_request(&peer, req);
                self.pending_layer.insert(id, tx);
            }
            Command::Connect(_, tx) => {
                let _ = tx.send(());
            }
            Command::Dial(addr) => {
                if let Err(e) = self.swarm.dial(dial_addr(addr.clone())) {
                    warn!(%addr, "cannot dial: {e}");
                }
            }
            Command::FindProviders(key, tx) => match b.kad.as_mut() {
                Some(kad) => {
                    let id = kad.get_providers(record_key(&key));
                    self.dht_counts.0 += 1;
                    self.lookups
                        .entry(id)
                        .or_insert_with(|| Lookup {
                            found: HashSet::new(),
                            waiting: Vec::new(),
                        })
                        .waiting
                        .push(tx);
                }
                None => drop(tx),
            },
            Command::Announce(peers, holding) => {
                for peer in peers {
                    if self.swarm.is_connected(&peer) {
                        self.swarm
                            .behaviour_mut()
                            .announce
                            .send_request(&peer, HaveResponse(Some(holding.clone())));
                    }
                }
            }
            Command::DhtStatus(tx) => {
                let mut status = DhtStatus {
                    enabled: b.kad.is_enabled(),
                    protocol: self.dht_protocol.clone(),
                    provided_keys: self.provided.len(),
                    lookups: self.dht_counts.0,
                    providers_found: self.dht_counts.1,
                    ..DhtStatus::default()
                };
                if let Some(kad) = b.kad.as_mut() {
                    status.routing_peers = kad.kbuckets().map(|b| b.num_entries()).sum();
                }
                let _ = tx.send(status);
            }
            Command::ConnectedPeers(tx) => {
                let _ = tx.send(self.swarm.connected_peers().copied().collect());
            }
            Command::ListenAddrs(tx) => {
                let me = *self.swarm.local_peer_id();
                let addrs = self
                    .listen_addrs
                    .iter()
                    .map(|a| a.clone().with(libp2p::multiaddr::Protocol::P2p(me)))
                    .collect();
                let _ = tx.send(addrs);
            }
            Command::RespondLayer(ch, r, slot) => {
                let _ = b.layer.send_response(ch, r);
                drop(slot);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        if let Some(m) = &self.metrics {
            use libp2p::metrics::Recorder;
            m.record(&event);
            match &event {
                SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => m.record(e),
                SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => m.record(e),
                _ => {}
            }
        }
        match &event {
            SwarmEvent::ConnectionEstablished {
                num_established, ..
            } if num_established.get() == 1 => {
                self.connected.send_modify(|n| *n += 1);
            }
            SwarmEvent::ConnectionClosed {
                num_established: 0,
                peer_id,
                ..
            } => {
                self.connected.send_modify(|n| *n = n.saturating_sub(1));
                self.pool.sweep(Some(peer_id));
                self.have_client.sweep(Some(peer_id));
            }
            _ => {}
        }
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.announce_on_lan(&address);
                self.listen_addrs.insert(address);
                if let Some(tx) = self.bound.take() {
                    let _ = tx.send(());
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.remove(&address);
            }
            SwarmEvent::ConnectionClosed { endpoint, .. } => {
                self.gate.closed(endpoint.get_remote_address());
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                connection_id,
                ..
            } => {
                let remote = endpoint.get_remote_address();
                if !self.gate.opened(&peer_id, remote, endpoint.is_listener()) {
                    debug!(%peer_id, %remote, "connection refused (not on the LAN, or too many)");
                    self.swarm.close_connection(connection_id);
                    return;
                }
                debug!(%peer_id, "connected");
                self.dial_scopes.connected(remote);
                self.discovered.connected(&peer_id);
                // A guess for a peer found no other way: LAN if it is on this host or a
                // private network.
                let guess = if is_local(endpoint.get_remote_address()) {
                    PeerSource::Lan
                } else {
                    PeerSource::Dht
                };
                learn(&self.sources, peer_id, guess, RANK_GUESS);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => self.on_dial_failure(peer, &error),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                let proto = StreamProtocol::try_from_owned(self.dht_protocol.clone()).ok();
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                    && proto.is_some_and(|p| info.protocols.contains(&p))
                {
                    // A peer's stated addresses, at most a few, kept to be relayed to other
                    // DHT peers; this node dials them only in the open scopes (`dialscope`).
                    for addr in info
                        .listen_addrs
                        .into_iter()
                        .filter(|a| {
                            crate::swarm::dialscope::scope_of(a)
                                != crate::swarm::dialscope::Scope::Never
                        })
                        .take(MAX_STATED_ADDRESSES)
                    {
                        kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::Behaviour(BehaviourEvent::Have(e)) => self.on_have(e),
            SwarmEvent::Behaviour(BehaviourEvent::Layer(e)) => self.on_layer(e),
            SwarmEvent::Behaviour(BehaviourEvent::Streams(never)) => match never {},
            SwarmEvent::Behaviour(BehaviourEvent::Announce(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                if let Some(h) = request.0 {
                    let _ = self.announcements.send((peer, h));
                }
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .announce
                    .send_response(channel, Ack);
            }
            _ => {}
        }
    }

    fn on_have(&mut self, e: request_response::Event<HaveRequest, HaveResponse>) {
        if let Routed::Request(peer, request, channel) = route(&mut self.pending_have, e) {
            // Past the monthly upload cap the node serves nothing, so it holds nothing either.
            let response = self.answers.answer(peer, request, false);
            let _ = self
                .swarm
                .behaviour_mut()
                .have
                .send_response(channel, response);
        }
    }

    /// Answers a layer request like a piece request: only with an upload slot free (within
    /// the per-peer share) and under the monthly cap, built off the loop, and paid for from
    /// the upload bucket; a request that gets no slot is answered NotFound.
    fn on_layer(&mut self, e: request_response::Event<LayerRequest, LayerResponse>) {
        let peer = match &e {
            request_response::Event::Message { peer, .. } => Some(*peer),
            _ => None,
        };
        let Routed::Request(_, request, channel) = route(&mut self.pending_layer, e) else {
            return;
        };
        let Some(peer) = peer else { return };
        let Some(slot) = self.slots.take(peer) else {
            let _ = self
                .swarm
                .behaviour_mut()
                .layer
                .send_response(channel, LayerResponse::NotFound);
            return;
        };
        let (store, tx, bandwidth) = (
            self.store.clone(),
            self.self_tx.clone(),
            self.bandwidth.clone(),
        );
        tokio::spawn(async move {
            let layer = tokio::task::spawn_blocking(move || {
                store.layer_response(&request.content_id, request.partial, request.want.as_ref())
            })
            .await
            .unwrap_or(LayerResponse::NotFound);
            let bytes = match &layer {
                LayerResponse::Full(cvs) => 32 * cvs.len() as u64,
                LayerResponse::Partial(cvs) => 36 * cvs.len() as u64,
                LayerResponse::NotFound => 0,
            };
            bandwidth.upload(bytes).await;
            bandwidth.count_upload(bytes);
            let _ = tx.send(Command::RespondLayer(channel, layer, slot)).await;
        });
    }
}

/// The deepest pipeline a leecher keeps with one peer ([`crate::download::scheduler::Config`]'s
/// default `max_per_peer`): the most piece requests of one peer served at once.
pub(crate) const MAX_UPLOADS_PER_PEER: usize = 16;

/// The piece requests one peer may have served at once, out of `slots` in all: as many as a
/// leecher's pipeline, and at most half the slots, so that one peer that never reads its
/// responses cannot hold every slot (the others get Busy only from a Sybil crowd).
fn uploads_per_peer(slots: usize) -> usize {
    (slots / 2).clamp(1, MAX_UPLOADS_PER_PEER)
}

/// What [`route`] left for the caller.
enum Routed<Req, Resp> {
    /// An inbound request of a peer to answer.
    Request(PeerId, Req, ResponseChannel<Resp>),
    /// Nothing left to do.
    Handled,
}

/// Routes a request-response event: a response or failure of one of our requests goes to the
/// caller waiting in `pending`; an inbound request is handed back.
fn route<Req, Resp>(
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Result<Resp, RequestError>>>,
    e: request_response::Event<Req, Resp>,
) -> Routed<Req, Resp> {
    use request_response::{Event, Message as M};
    match e {
        Event::Message {
            message:
                M::Response {
                    request_id,
                    response,
                },
            ..
        } => {
            if let Some(tx) = pending.remove(&request_id) {
                let _ = tx.send(Ok(response));
            }
            Routed::Handled
        }
        Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(tx) = pending.remove(&request_id) {
                let _ = tx.send(Err(RequestError::Outbound { peer, error }));
            }
            Routed::Handled
        }
        Event::Message {
            peer,
            message:
                M::Request {
                    request_id: _,
                    request,
                    channel,
                },
            ..
        } => Routed::Request(peer, request, channel),
        Event::ResponseSent { .. } | Event::InboundFailure { .. } => Routed::Handled,
    }
}

fn serve_piece(store: &ContentStore, req: &PieceRequest) -> PieceResponse {
    match store.read_piece(&req.content_id, req.index) {
        Some(bytes) => PieceResponse::Data(bytes),
        None => PieceResponse::NotFound,
    }
}

/// A swarm for tests: TCP with noise and yamux, the behaviour `make` builds from the new
/// identity, connections kept 60 s idle.
///
/// # Panics
/// When the transport or the behaviour cannot be built.
#[cfg(test)]
pub(crate) fn test_swarm<B: libp2p::swarm::NetworkBehaviour>(
    make: impl FnOnce(&identity::Keypair) -> B,
) -> Swarm<B> {
    use libp2p::{noise, yamux};
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp transport")
        .with_behaviour(make)
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;
    use shoal_protocol::frame::encode_prefix;

    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let (p, n) = encode_prefix(body.len() as u64);
        let mut v = p[..n].to_vec();
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn a_piece_round_trips_through_the_stream_codec() {
        let msg = PieceResponse::Data(Bytes::from(vec![7u8; 100_000]));
        let mut out = Cursor::new(Vec::new());
        write_message(&mut out, &msg).await.unwrap();
        let mut input = Cursor::new(out.into_inner());
        let back: PieceResponse = read_message(&mut input).await.unwrap();
        assert_eq!(back, msg);
    }

    #[tokio::test]
    async fn truncated_and_oversized_frames_are_errors() {
        let body = PieceResponse::Data(Bytes::from(vec![1u8; 1000])).encode();
        let whole = framed(&body);
        for cut in [0, 1, 2, whole.len() / 2, whole.len() - 1] {
            let mut input = Cursor::new(whole[..cut].to_vec());
            let r: io::Result<PieceResponse> = read_message(&mut input).await;
            assert_eq!(
                r.unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof,
                "cut {cut}"
            );
        }
        // A have request announcing more than its limit is refused before its body is read.
        let (p, n) = encode_prefix(HaveRequest::MAX_LEN_BYTES as u64 + 1);
        let mut input = Cursor::new(p[..n].to_vec());
        let r: io::Result<HaveRequest> = read_message(&mut input).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // Garbage of the right length is InvalidData too.
        let mut input = Cursor::new(framed(&[0xff; 40]));
        let r: io::Result<PieceRequest> = read_message(&mut input).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn other_peers_provider_records_are_bounded_per_peer_and_in_all() {
        let now = std::time::Instant::now();
        let mut q = RemoteProviders::default();
        let record = |peer: PeerId, i: u32, ttl: u64| kad::ProviderRecord {
            key: kad::RecordKey::new(&i.to_be_bytes()),
            provider: peer,
            expires: Some(now + Duration::from_secs(ttl)),
            addresses: Vec::new(),
        };
        let flood = PeerId::random();
        let admitted = (0..10_000)
            .filter(|&i| q.admit(&record(flood, i, 7200), now))
            .count();
        assert_eq!(admitted, MAX_REMOTE_KEYS_PER_PEER);
        // A renewal of a kept record is taken.
        assert!(q.admit(&record(flood, 0, 7200), now));
        // Many peers fill the total, no more.
        let mut total = admitted;
        for _ in 0..100 {
            let p = PeerId::random();
            total += (0..300)
                .filter(|&i| q.admit(&record(p, i, 60), now))
                .count();
        }
        assert_eq!(total, MAX_REMOTE_KEYS);
        // Expired records make room again.
        let later = now + Duration::from_secs(61);
        assert!(q.admit(&record(PeerId::random(), 1, 60), later));
    }

    /// An in-memory stream: reads from `input`, writes into `output`.
    struct Duplex {
        input: futures::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl AsyncRead for Duplex {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.get_mut().input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.get_mut().output.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_piece_response_longer_than_the_piece_asked_for_is_refused_before_its_body() {
        // A content of 16 KiB pieces.
        let id = ContentId::new([1; 32], 64 * 1024).unwrap();
        let request = PieceRequest {
            content_id: id,
            index: 0,
        };
        // The peer announces a 16 MiB body and sends none of it: refused at the prefix.
        let (prefix, n) = shoal_protocol::frame::encode_prefix(16 << 20);
        let mut io = Duplex {
            input: futures::io::Cursor::new(prefix[..n].to_vec()),
            output: Vec::new(),
        };
        let e = pieces::exchange(&mut io, &request).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // The request went out framed.
        let sent: PieceRequest = read_message(&mut futures::io::Cursor::new(io.output))
            .await
            .unwrap();
        assert_eq!(sent, request);
        // A response of the piece's size is read, and the next one on the same stream too.
        let mut answers = futures::io::Cursor::new(Vec::new());
        for fill in [7u8, 8] {
            write_message(
                &mut answers,
                &PieceResponse::Data(Bytes::from(vec![fill; 16 * 1024])),
            )
            .await
            .unwrap();
        }
        let mut io = Duplex {
            input: futures::io::Cursor::new(answers.into_inner()),
            output: Vec::new(),
        };
        for fill in [7u8, 8] {
            let got = pieces::exchange(&mut io, &request).await.unwrap();
            assert!(matches!(&got, PieceResponse::Data(b) if b.len() == 16 * 1024 && b[0] == fill));
        }
    }

    #[test]
    fn in_lan_mode_only_lan_or_listed_peers_connect_in_and_one_address_is_bounded() {
        let listed = PeerId::random();
        let mut gate = ConnectionGate {
            lan_only: true,
            listed: HashSet::from([listed]),
            ..ConnectionGate::default()
        };
        let addr = |a: &str| -> Multiaddr { a.parse().unwrap() };
        let public = addr("/ip4/203.0.113.7/tcp/4001");
        // From the internet: refused inbound, unless listed; dialed out by this node: kept.
        assert!(!gate.opened(&PeerId::random(), &public, true));
        gate.closed(&public);
        assert!(gate.opened(&listed, &public, true));
        gate.closed(&public);
        assert!(gate.opened(&PeerId::random(), &public, false));
        gate.closed(&public);
        // A private address: at most 8 connections from it; loopback is not counted so.
        let lan = addr("/ip4/192.168.1.20/tcp/4001");
        let kept = (0..20)
            .filter(|_| gate.opened(&PeerId::random(), &lan, true))
            .count();
        assert_eq!(kept, MAX_CONNECTIONS_PER_IP);
        let lo = addr("/ip4/127.0.0.1/tcp/4001");
        assert!((0..50).all(|_| gate.opened(&PeerId::random(), &lo, true)));
        assert_eq!(gate.total, 20 + 50);
        for _ in 0..20 {
            gate.closed(&lan);
        }
        assert!(gate.opened(&PeerId::random(), &lan, true));
    }

    #[test]
    fn peer_sources_are_bounded() {
        let sources: Sources = Arc::default();
        let listed = PeerId::random();
        learn(&sources, listed, PeerSource::Lan, RANK_LISTED);
        for _ in 0..3 * MAX_SOURCES {
            learn(&sources, PeerId::random(), PeerSource::Dht, RANK_DHT);
        }
        let s = sources.read().unwrap();
        assert!(s.len() <= MAX_SOURCES);
        assert!(s.contains_key(&listed), "a listed peer is kept");
    }
}
