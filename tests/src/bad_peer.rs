//! [`BadPeer`]: a hostile peer built on Shoal's public wire codecs (`shoal_node::wire`: the
//! request-response codec and the piece streams' framing over `shoal_protocol`'s messages),
//! for the tests of what one remote peer can and cannot do to a node (`docs/security.md`). It
//! is a libp2p swarm of its own (TCP, noise, yamux) that speaks the have, layer, piece and
//! announce protocols and misbehaves as its [`Misbehaviour`] says. It listens on 127.0.0.1
//! only.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, identify, noise,
    request_response::{self, ProtocolSupport},
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux,
};
use shoal_node::wire::{Codec, read_message, write_message};
use shoal_protocol::{
    Ack, Bitfield, HaveKey, HaveRequest, HaveResponse, Holding, LayerRequest, LayerResponse,
    Member, PieceRequest, PieceResponse,
};
use shoal_validator::{ContentId, PieceLayer, Sha256Digest};

/// How a [`BadPeer`] misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Holds the content, answers have and layer requests truthfully, and answers every piece
    /// request Busy, forever.
    AlwaysBusy,
    /// Claims every piece as fetched from the origin while no verified layer is known (a cold
    /// start), holds none, and answers partial-layer and piece requests NotFound.
    ClaimAllTellNothing,
    /// Answers have requests with nothing held and member lists of 63 fresh made-up members
    /// each time (every one fetching from the origin, "all pieces done", heartbeats rising
    /// with the clock), after its own entry.
    MemberFlood,
    /// Keeps this many piece requests in flight to every node it is connected to, asking
    /// again as each is answered.
    HoldSlots(usize),
    /// Keeps this many layer requests in flight to every node it is connected to.
    LayerFlood(usize),
    /// Holds the content and answers truthfully, but flips a byte in every piece it serves.
    FlipBytes,
    /// Holds the content, serves a piece layer with one chaining value altered.
    WrongLayer,
    /// Claims every piece and serves only the even ones (NotFound for the odd ones).
    FalseHave,
    /// Answers a lookup of this SHA-256 with the content id of the content it holds (another
    /// content), which it serves truthfully.
    LyingSha256(Sha256Digest),
    /// A member of the swarm of a content known only by its SHA-256 (its swarm id, decision
    /// 0016) that claims every piece as fetched from the origin and serves each with one byte
    /// flipped.
    SwarmLiar,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    have: request_response::Behaviour<Codec<HaveRequest, HaveResponse>>,
    layer: request_response::Behaviour<Codec<LayerRequest, LayerResponse>>,
    stream: libp2p_stream::Behaviour,
    announce: request_response::Behaviour<Codec<HaveResponse, Ack>>,
}

/// What a [`BadPeer`] counted.
#[derive(Debug, Default)]
pub struct BadPeerStats {
    /// Have requests answered.
    pub have_answers: AtomicU64,
    /// Piece and layer requests answered (with anything).
    pub answers: AtomicU64,
    /// Bytes of piece data and chaining values received in answers to its own requests.
    pub received_bytes: AtomicU64,
    /// Piece and layer responses received to its own requests.
    pub responses: AtomicU64,
    /// Its requests that were answered Busy or NotFound.
    pub refused: AtomicU64,
}

/// A hostile peer on 127.0.0.1 that knows one content.
pub struct BadPeer {
    /// Its peer id.
    pub peer_id: PeerId,
    /// Its listen address, with `/p2p/PEER_ID`.
    pub addr: Multiaddr,
    /// What it counted.
    pub stats: Arc<BadPeerStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BadPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A content a bad peer knows.
struct Content {
    id: ContentId,
    /// The swarm id of its SHA-256 ([`shoal_validator::sha256_swarm_id`]).
    swarm: ContentId,
    layer: PieceLayer,
    sha256: Sha256Digest,
    bytes: Bytes,
}

impl Content {
    fn of(data: &[u8]) -> Self {
        let d = shoal_validator::hash_reader(data, data.len() as u64).expect("hash the content");
        Self {
            id: d.content_id(),
            swarm: shoal_validator::sha256_swarm_id(&d.sha256, data.len() as u64)
                .expect("a content of at most 1 TiB"),
            layer: d.layer,
            sha256: d.sha256,
            bytes: Bytes::copy_from_slice(data),
        }
    }

    fn piece(&self, index: u32) -> Option<Bytes> {
        let r = self.id.piece_range(index)?;
        Some(
            self.bytes
                .slice(usize::try_from(r.start).ok()?..usize::try_from(r.end).ok()?),
        )
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl BadPeer {
    /// Starts a bad peer that knows `data` (its content id, layer and SHA-256) and misbehaves
    /// as `mode` says.
    ///
    /// # Panics
    /// When the swarm cannot be built or cannot listen on 127.0.0.1 (a test setup failure).
    pub async fn start(mode: Misbehaviour, data: &[u8]) -> Self {
        Self::start_with(mode, &[data]).await
    }

    /// Starts a bad peer that knows every content of `contents` (the first is the one it
    /// requests in its flooding modes and offers for a lying SHA-256).
    ///
    /// # Panics
    /// As [`BadPeer::start`]; with no content.
    pub async fn start_with(mode: Misbehaviour, contents: &[&[u8]]) -> Self {
        let contents: Vec<Content> = contents.iter().map(|d| Content::of(d)).collect();
        assert!(!contents.is_empty(), "a bad peer needs a content");
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp transport")
            .with_behaviour(|key| Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/shoal/1.0.0".into(),
                    key.public(),
                )),
                have: rr(shoal_protocol::HAVE_PROTOCOL),
                layer: rr(shoal_protocol::LAYER_PROTOCOL),
                stream: libp2p_stream::Behaviour::new(),
                announce: rr(shoal_protocol::ANNOUNCE_PROTOCOL),
            })
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr"))
            .expect("listen on 127.0.0.1");
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        let peer_id = *swarm.local_peer_id();
        let stats = Arc::new(BadPeerStats::default());
        let s = stats.clone();
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control
            .accept(StreamProtocol::new(shoal_protocol::PIECE_PROTOCOL))
            .expect("piece streams accepted once");
        let contents = Arc::new(contents);
        let pieces = tokio::spawn(serve_pieces(incoming, mode, contents.clone(), s.clone()));
        let task = tokio::spawn(async move {
            run(swarm, control, mode, contents, s).await;
            pieces.abort();
        });
        Self {
            peer_id,
            addr: addr.with(libp2p::multiaddr::Protocol::P2p(peer_id)),
            stats,
            task,
        }
    }

    /// Bytes of pieces and chaining values it received in answers to its own requests.
    pub fn total_received(&self) -> u64 {
        self.stats.received_bytes.load(Ordering::SeqCst)
    }
}

/// A request-response behaviour for one of Shoal's protocols.
fn rr<Req, Resp>(protocol: &'static str) -> request_response::Behaviour<Codec<Req, Resp>>
where
    Req: shoal_protocol::Message + Send + Sync + 'static,
    Resp: shoal_protocol::Message + Send + Sync + 'static,
{
    request_response::Behaviour::new(
        [(StreamProtocol::new(protocol), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(60))
            .with_max_concurrent_streams(1024),
    )
}

/// The content of `contents` with content id `id` (or swarm id, for a swarm liar).
fn find<'a>(contents: &'a [Content], mode: Misbehaviour, id: &ContentId) -> Option<&'a Content> {
    contents
        .iter()
        .find(|c| c.id == *id || (matches!(mode, Misbehaviour::SwarmLiar) && c.swarm == *id))
}

/// The bad peer's answer to a piece request.
fn answer_piece(mode: Misbehaviour, contents: &[Content], request: &PieceRequest) -> PieceResponse {
    let piece = find(contents, mode, &request.content_id).and_then(|c| c.piece(request.index));
    match (mode, piece) {
        (Misbehaviour::AlwaysBusy, _) => PieceResponse::Busy,
        (
            Misbehaviour::ClaimAllTellNothing
            | Misbehaviour::MemberFlood
            | Misbehaviour::HoldSlots(_)
            | Misbehaviour::LayerFlood(_),
            _,
        )
        | (_, None) => PieceResponse::NotFound,
        (Misbehaviour::FalseHave, Some(_)) if request.index % 2 == 1 => PieceResponse::NotFound,
        (Misbehaviour::FlipBytes | Misbehaviour::SwarmLiar, Some(b)) => {
            let mut v = b.to_vec();
            if let Some(x) = v.first_mut() {
                *x ^= 0x01;
            }
            PieceResponse::Data(Bytes::from(v))
        }
        (_, Some(b)) => PieceResponse::Data(b),
    }
}

/// Answers the piece streams peers open, each in a task of its own.
async fn serve_pieces(
    mut incoming: libp2p_stream::IncomingStreams,
    mode: Misbehaviour,
    contents: Arc<Vec<Content>>,
    stats: Arc<BadPeerStats>,
) {
    while let Some((_, mut stream)) = incoming.next().await {
        let (contents, stats) = (contents.clone(), stats.clone());
        tokio::spawn(async move {
            while let Ok(request) = read_message::<PieceRequest, _>(&mut stream).await {
                stats.answers.fetch_add(1, Ordering::SeqCst);
                let answer = answer_piece(mode, &contents, &request);
                if write_message(&mut stream, &answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Keeps one piece request in flight on a stream of its own to `peer`, asking again as each
/// is answered, from piece `first` on (every `stride`-th piece), until the stream fails.
async fn hold_slot(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    content: ContentId,
    first: u32,
    stride: u32,
    stats: Arc<BadPeerStats>,
) {
    let Ok(mut stream) = control
        .open_stream(peer, StreamProtocol::new(shoal_protocol::PIECE_PROTOCOL))
        .await
    else {
        return;
    };
    let n = content.piece_count().max(1);
    let mut index = first;
    loop {
        let request = PieceRequest {
            content_id: content,
            index: index % n,
        };
        index = index.wrapping_add(stride);
        let Ok(response) = shoal_node::wire::exchange(&mut stream, &request).await else {
            return;
        };
        stats.responses.fetch_add(1, Ordering::SeqCst);
        match response {
            PieceResponse::Data(b) => {
                stats
                    .received_bytes
                    .fetch_add(b.len() as u64, Ordering::SeqCst);
            }
            _ => {
                stats.refused.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

async fn run(
    mut swarm: libp2p::Swarm<Behaviour>,
    control: libp2p_stream::Control,
    mode: Misbehaviour,
    contents: Arc<Vec<Content>>,
    stats: Arc<BadPeerStats>,
) {
    let me = *swarm.local_peer_id();
    let content = &contents[0];
    let find = |id: &ContentId| find(&contents, mode, id);
    let mut holders: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut connected: HashSet<PeerId> = HashSet::new();
    loop {
        let Some(event) = swarm.next().await else {
            break;
        };
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if connected.insert(peer_id) => {
                match mode {
                    Misbehaviour::HoldSlots(k) => {
                        let k = u32::try_from(k).unwrap_or(u32::MAX);
                        for first in 0..k {
                            holders.push(tokio::spawn(hold_slot(
                                control.clone(),
                                peer_id,
                                content.id,
                                first,
                                k,
                                stats.clone(),
                            )));
                        }
                    }
                    Misbehaviour::LayerFlood(k) => {
                        for _ in 0..k {
                            swarm.behaviour_mut().layer.send_request(
                                &peer_id,
                                LayerRequest {
                                    content_id: content.id,
                                    partial: false,
                                    want: None,
                                },
                            );
                        }
                    }
                    _ => {}
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                connected.remove(&peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Have(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                stats.have_answers.fetch_add(1, Ordering::SeqCst);
                let holding = answer_have(mode, &contents, me, &request);
                let _ = swarm
                    .behaviour_mut()
                    .have
                    .send_response(channel, HaveResponse(holding));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Layer(request_response::Event::Message {
                peer,
                message,
                ..
            })) => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    stats.answers.fetch_add(1, Ordering::SeqCst);
                    let answer = match (mode, find(&request.content_id)) {
                        (Misbehaviour::ClaimAllTellNothing | Misbehaviour::MemberFlood, _)
                        | (_, None) => LayerResponse::NotFound,
                        (Misbehaviour::WrongLayer, Some(c)) => {
                            let mut cvs = c.layer.chaining_values().to_vec();
                            if let Some(cv) = cvs.first_mut() {
                                cv[0] ^= 0xff;
                            }
                            LayerResponse::Full(cvs)
                        }
                        (_, Some(c)) => LayerResponse::Full(c.layer.chaining_values().to_vec()),
                    };
                    let _ = swarm.behaviour_mut().layer.send_response(channel, answer);
                }
                request_response::Message::Response { response, .. } => {
                    stats.responses.fetch_add(1, Ordering::SeqCst);
                    match response {
                        LayerResponse::Full(cvs) => {
                            stats
                                .received_bytes
                                .fetch_add(32 * cvs.len() as u64, Ordering::SeqCst);
                        }
                        LayerResponse::Partial(cvs) => {
                            stats
                                .received_bytes
                                .fetch_add(36 * cvs.len() as u64, Ordering::SeqCst);
                        }
                        LayerResponse::NotFound => {
                            stats.refused.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    if matches!(mode, Misbehaviour::LayerFlood(_)) && connected.contains(&peer) {
                        swarm.behaviour_mut().layer.send_request(
                            &peer,
                            LayerRequest {
                                content_id: content.id,
                                partial: false,
                                want: None,
                            },
                        );
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Announce(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) => {
                let _ = swarm.behaviour_mut().announce.send_response(channel, Ack);
            }
            _ => {}
        }
    }
    for h in holders {
        h.abort();
    }
}

/// The have answer of a bad peer.
fn answer_have(
    mode: Misbehaviour,
    contents: &[Content],
    me: PeerId,
    request: &HaveRequest,
) -> Option<Holding> {
    let content = match (mode, request.key) {
        (Misbehaviour::LyingSha256(lie), HaveKey::Sha256(d)) if d == lie => &contents[0],
        (Misbehaviour::SwarmLiar, HaveKey::Blake3(h)) => {
            contents.iter().find(|c| *c.swarm.hash() == h)?
        }
        (_, HaveKey::Blake3(h)) => contents.iter().find(|c| *c.id.hash() == h)?,
        (_, HaveKey::Sha256(d)) => contents.iter().find(|c| c.sha256 == d)?,
    };
    let n = content.id.piece_count();
    let none = Bitfield::new(n);
    let all = Bitfield::full(n);
    let own = |done: u32| Member {
        peer_id: Bytes::from(me.to_bytes()),
        heartbeat: now_ms(),
        done,
        origin: true,
    };
    Some(match mode {
        Misbehaviour::SwarmLiar => Holding {
            content_id: content.swarm,
            have: none.clone(),
            fetching: none,
            claimed: all.clone(),
            chaining: all,
            members: vec![own(0)],
        },
        Misbehaviour::ClaimAllTellNothing => Holding {
            content_id: content.id,
            have: none.clone(),
            fetching: none,
            claimed: all.clone(),
            chaining: all,
            members: vec![own(0)],
        },
        Misbehaviour::MemberFlood => {
            let mut members = vec![own(0)];
            members.extend((0..shoal_protocol::MAX_MEMBERS - 1).map(|_| Member {
                peer_id: Bytes::from(PeerId::random().to_bytes()),
                heartbeat: now_ms(),
                done: n,
                origin: true,
            }));
            Holding {
                content_id: content.id,
                have: none.clone(),
                fetching: none.clone(),
                claimed: none.clone(),
                chaining: none,
                members,
            }
        }
        _ => Holding {
            content_id: content.id,
            have: all.clone(),
            fetching: none,
            claimed: Bitfield::new(n),
            chaining: all,
            members: Vec::new(),
        },
    })
}
