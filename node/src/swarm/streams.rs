//! Piece and have streams: inbound ones handed to their servers without being dropped under
//! load, outbound ones opened on request, with no state kept for a closed connection.
//!
//! This behaviour replaces `libp2p-stream` 0.5.0-alpha, in two steps:
//! - **Inbound** (2026-12-04): `libp2p-stream` hands inbound streams over a channel of capacity
//!   one (`mpsc::channel(0)` with one sender) and drops (resets) a stream that arrives while
//!   the previous one has not been taken yet. A connection task finishing two negotiations
//!   before the server's accept task runs is enough: in a test of four clients starting
//!   against one cache node, 25 piece streams were reset this way, each a failed piece request
//!   at the client, and once in a while a client gave up on the cache node for a piece and took
//!   it from the origin. This behaviour accepts [`pieces::protocol`] and [`have::protocol`] on
//!   every connection and queues what arrives, up to [`BACKLOG`] streams of each.
//! - **Outbound** (2026-12-05): `libp2p-stream` keeps one channel sender per connection in a
//!   map (`Shared::senders`, `libp2p-stream-0.5.0-alpha/src/shared.rs`) that it fills for every
//!   connection established and never empties when one closes: each connection a peer ever
//!   made stayed in the daemon's memory, so a peer that connects and disconnects in a loop grew
//!   it without bound. [`Control::open_stream`] opens a stream on one of the peer's
//!   connections, waiting for the connection when a dial to the peer is under way; the
//!   behaviour keeps only the live connections and the opens waiting for one.
//!
//! Decision records: `docs/decisions/0021-piece-streams.md`, `docs/decisions/0022-have-streams.md`.
//!
//! [`pieces::protocol`]: super::pieces::protocol
//! [`have::protocol`]: super::have::protocol

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    io, iter,
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol,
    core::{
        Endpoint,
        transport::PortUse,
        upgrade::{InboundUpgrade, OutboundUpgrade, UpgradeInfo},
    },
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, DialError,
        FromSwarm, NetworkBehaviour, NotifyHandler, StreamUpgradeError, SubstreamProtocol,
        THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
        behaviour::{ConnectionClosed, ConnectionEstablished, DialFailure},
        dial_opts::{DialOpts, PeerCondition},
        handler::{
            ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
        },
    },
};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::{have, pieces};

/// Inbound streams of one protocol queued for its server at most, from all peers together; one
/// more is reset. A server takes each at once (it only counts it and starts a task), so a queue
/// fills only when that task cannot run; each peer's streams are limited after it
/// ([`pieces::MAX_STREAMS_PER_PEER`], [`have::MAX_STREAMS_PER_PEER`]).
pub(crate) const BACKLOG: usize = 1024;

/// Inbound streams of one protocol with the peer that opened each, in the order they were
/// negotiated.
pub(crate) type Incoming = mpsc::Receiver<(PeerId, Stream)>;

/// The streams this behaviour's connections negotiated: piece streams and have streams, each
/// in its queue.
pub(crate) struct Accepted {
    /// Piece streams ([`pieces::protocol`]).
    pub(crate) pieces: Incoming,
    /// Have streams ([`have::protocol`]).
    pub(crate) have: Incoming,
}

/// Opens waiting in [`Control`]'s queue for the swarm's event loop to take them. The opens
/// come from this node's own downloads, each of which has at most its pipeline's depth of
/// requests in flight.
const OPEN_QUEUE: usize = 256;

/// A request to open an outbound stream of `protocol` to `peer`; the stream, or why it could
/// not be opened, goes back on `reply`.
#[derive(Debug)]
pub(crate) struct Open {
    peer: PeerId,
    protocol: StreamProtocol,
    reply: oneshot::Sender<io::Result<Stream>>,
}

/// Opens outbound streams through a [`Behaviour`]; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Control {
    opens: mpsc::Sender<Open>,
}

impl Control {
    /// Opens a stream of `protocol` to `peer` on one of its connections (at random). When
    /// `peer` is not connected, the open waits for a connection: a dial under way (the caller
    /// starts one with its addresses), or one this behaviour asks the swarm for.
    ///
    /// # Errors
    /// `BrokenPipe` when the swarm has stopped; `NotConnected` when the dial to `peer` failed
    /// (the dial's error in the message); `Unsupported` when `peer` does not speak
    /// `protocol`; `TimedOut` when the negotiation took longer than libp2p's substream
    /// timeout (10 s); `ConnectionAborted` when the connection closed (or the swarm stopped)
    /// first; or the negotiation's I/O error. The caller bounds the wait itself.
    pub(crate) async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> io::Result<Stream> {
        let (reply, answer) = oneshot::channel();
        self.opens
            .send(Open {
                peer,
                protocol,
                reply,
            })
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the swarm has stopped"))?;
        answer.await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection closed before the stream opened",
            ))
        })
    }
}

/// The behaviour that accepts inbound piece and have streams and opens outbound streams for
/// its [`Control`]; it emits no events. Its state is the live connections of each peer and
/// the opens waiting for a connection, nothing per closed connection.
pub(crate) struct Behaviour {
    pieces: mpsc::Sender<(PeerId, Stream)>,
    have: mpsc::Sender<(PeerId, Stream)>,
    opens: mpsc::Receiver<Open>,
    /// The established connections of each peer (an entry goes with its last connection).
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// Opens for peers not connected yet, until a connection is established or the dial fails.
    waiting: HashMap<PeerId, Vec<Open>>,
    /// What to hand the swarm next: opens for their connections, dials.
    out: VecDeque<ToSwarm<Infallible, Open>>,
}

impl Behaviour {
    /// The behaviour, the queues its connections fill ([`BACKLOG`] streams of each at most),
    /// and the control that opens outbound streams.
    pub(crate) fn new() -> (Self, Accepted, Control) {
        let (pieces, pieces_rx) = mpsc::channel(BACKLOG);
        let (have, have_rx) = mpsc::channel(BACKLOG);
        let (opens_tx, opens) = mpsc::channel(OPEN_QUEUE);
        (
            Self {
                pieces,
                have,
                opens,
                connections: HashMap::new(),
                waiting: HashMap::new(),
                out: VecDeque::new(),
            },
            Accepted {
                pieces: pieces_rx,
                have: have_rx,
            },
            Control { opens: opens_tx },
        )
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            pieces: self.pieces.clone(),
            have: self.have.clone(),
            opens: VecDeque::new(),
            negotiating: false,
        }
    }

    /// Peers with a live connection, and peers with opens waiting: what the behaviour holds.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        (self.connections.len(), self.waiting.len())
    }

    /// Sends `open` to one of its peer's connections, chosen at random as `libp2p-stream` did
    /// (the streams to a peer with two connections share both connections' tasks), or parks
    /// it until one is established (asking the swarm to dial when no dial is under way).
    fn route(&mut self, open: Open) {
        if open.reply.is_closed() {
            return;
        }
        if let Some(c) = self.connections.get(&open.peer) {
            let connection = c[rand::random_range(0..c.len())];
            self.out.push_back(ToSwarm::NotifyHandler {
                peer_id: open.peer,
                handler: NotifyHandler::One(connection),
                event: open,
            });
            return;
        }
        let peer = open.peer;
        let waiting = self.waiting.entry(peer).or_default();
        // Opens whose caller gave up are dropped here, so a peer that never answers holds
        // at most what its callers still wait for.
        waiting.retain(|o| !o.reply.is_closed());
        waiting.push(open);
        if waiting.len() == 1 {
            self.out.push_back(ToSwarm::Dial {
                opts: DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
            });
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                ..
            }) => {
                self.connections
                    .entry(peer_id)
                    .or_default()
                    .push(connection_id);
                for open in self.waiting.remove(&peer_id).unwrap_or_default() {
                    self.route(open);
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                if let Some(c) = self.connections.get_mut(&peer_id) {
                    c.retain(|&id| id != connection_id);
                    if c.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
            }
            FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error,
                ..
            }) => {
                // A dial not made because another is under way (or the peer is connected)
                // leaves the opens to that one.
                if matches!(error, DialError::DialPeerConditionFalse(_))
                    || self.connections.contains_key(&peer)
                {
                    return;
                }
                for open in self.waiting.remove(&peer).unwrap_or_default() {
                    let _ = open.reply.send(Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!("cannot connect to {peer}: {error}"),
                    )));
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        loop {
            if let Some(next) = self.out.pop_front() {
                return Poll::Ready(next);
            }
            match self.opens.poll_recv(cx) {
                Poll::Ready(Some(open)) => self.route(open),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The protocols accepted: the stream as negotiated, with its protocol.
#[derive(Clone, Debug)]
pub(crate) struct Protocols;

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = iter::Chain<iter::Once<Self::Info>, iter::Once<Self::Info>>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once(pieces::protocol()).chain(iter::once(have::protocol()))
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: Self::Info) -> Self::Future {
        std::future::ready(Ok((stream, protocol)))
    }
}

/// The one protocol an outbound stream is opened for.
#[derive(Clone, Debug)]
pub(crate) struct Outbound(StreamProtocol);

impl UpgradeInfo for Outbound {
    type Info = StreamProtocol;
    type InfoIter = iter::Once<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once(self.0.clone())
    }
}

impl OutboundUpgrade<Stream> for Outbound {
    type Output = Stream;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Stream, Infallible>>;

    fn upgrade_outbound(self, stream: Stream, _: Self::Info) -> Self::Future {
        std::future::ready(Ok(stream))
    }
}

/// One connection's side: offers the piece and have protocols to every inbound substream and
/// queues the streams negotiated on it, each in its protocol's queue; opens the outbound
/// streams the behaviour routes to it and answers each open.
pub(crate) struct Handler {
    peer: PeerId,
    pieces: mpsc::Sender<(PeerId, Stream)>,
    have: mpsc::Sender<(PeerId, Stream)>,
    /// Opens routed here and not yet requested from the connection.
    opens: VecDeque<Open>,
    /// Whether an outbound stream is being negotiated: one at a time per connection, as
    /// `libp2p-stream` did.
    negotiating: bool,
}

/// The open info of an outbound stream: the protocol asked for and where its stream goes.
type Reply = (StreamProtocol, oneshot::Sender<io::Result<Stream>>);

impl ConnectionHandler for Handler {
    type FromBehaviour = Open;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = Outbound;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Reply;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(Protocols, ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Reply, Infallible>> {
        while !self.negotiating
            && let Some(open) = self.opens.pop_front()
        {
            if open.reply.is_closed() {
                continue;
            }
            self.negotiating = true;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(
                    Outbound(open.protocol.clone()),
                    (open.protocol, open.reply),
                ),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, open: Open) {
        self.opens.push_back(open);
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Reply>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: (stream, protocol),
                ..
            }) => {
                let queue = if protocol == have::protocol() {
                    &self.have
                } else {
                    &self.pieces
                };
                if let Err(e) = queue.try_send((self.peer, stream)) {
                    // Dropping the stream resets it; the peer sees its request fail.
                    debug!(peer = %self.peer, %protocol, "inbound stream reset: {e}");
                }
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                info: (_, reply),
            }) => {
                self.negotiating = false;
                // A caller that gave up drops the stream, which resets it.
                let _ = reply.send(Ok(stream));
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError {
                info: (protocol, reply),
                error,
            }) => {
                self.negotiating = false;
                let error = match error {
                    StreamUpgradeError::Timeout => io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("opening a {protocol} stream timed out"),
                    ),
                    StreamUpgradeError::NegotiationFailed => io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!("the peer does not support {protocol}"),
                    ),
                    StreamUpgradeError::Io(e) => e,
                    StreamUpgradeError::Apply(never) => match never {},
                };
                let _ = reply.send(Err(error));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::{Swarm, multiaddr::Protocol, swarm::SwarmEvent};

    use super::*;

    /// A server swarm on 127.0.0.1 running in a task: its id, its address, the queues its
    /// behaviour fills, and the task.
    async fn server() -> (PeerId, Multiaddr, Accepted, tokio::task::JoinHandle<()>) {
        let (behaviour, accepted, _) = Behaviour::new();
        let mut server = super::super::test_swarm(|_| behaviour);
        server
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
                break address;
            }
        };
        let id = *server.local_peer_id();
        let task = tokio::spawn(async move {
            loop {
                server.select_next_some().await;
            }
        });
        (id, addr, accepted, task)
    }

    /// A client swarm (not listening) and the control that opens its streams.
    fn client() -> (Swarm<Behaviour>, Control) {
        let (behaviour, _, control) = Behaviour::new();
        (super::super::test_swarm(|_| behaviour), control)
    }

    /// Polls `swarm` until `done` finishes (at most 10 s) and returns its output.
    async fn drive<T>(
        swarm: &mut Swarm<Behaviour>,
        done: impl std::future::Future<Output = T>,
    ) -> T {
        let run = async {
            tokio::pin!(done);
            loop {
                tokio::select! {
                    out = &mut done => break out,
                    _ = swarm.select_next_some() => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("within 10 s")
    }

    /// Polls `swarm` until it reports a connection to `peer` closed or established.
    async fn until_connection(swarm: &mut Swarm<Behaviour>, peer: PeerId, established: bool) {
        let run = async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. }
                        if established && peer_id == peer =>
                    {
                        break;
                    }
                    SwarmEvent::ConnectionClosed { peer_id, .. }
                        if !established && peer_id == peer =>
                    {
                        break;
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("within 10 s");
    }

    #[tokio::test]
    async fn piece_streams_wait_in_the_queue_until_the_server_takes_them() {
        let (server_id, addr, accepted, server_task) = server().await;
        let mut incoming = accepted.pieces;
        let (mut client, control) = client();
        client.dial(addr.with(Protocol::P2p(server_id))).unwrap();
        let client_id = *client.local_peer_id();
        let client_task = tokio::spawn(async move {
            loop {
                client.select_next_some().await;
            }
        });
        // 32 streams open while the server takes none (libp2p-stream's own queue held one).
        let mut opened = Vec::new();
        for i in 0..32u8 {
            let mut s = control
                .open_stream(server_id, pieces::protocol())
                .await
                .unwrap();
            s.write_all(&[i]).await.unwrap();
            s.flush().await.unwrap();
            opened.push(s);
        }
        // Each reaches the server, in order, and carries its byte.
        for i in 0..32u8 {
            let (peer, mut s) = tokio::time::timeout(Duration::from_secs(10), incoming.recv())
                .await
                .expect("a queued stream")
                .unwrap();
            assert_eq!(peer, client_id);
            let mut b = [0u8];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
        }
        server_task.abort();
        client_task.abort();
    }

    #[tokio::test]
    async fn an_open_waits_for_the_dial_under_way_then_uses_its_connection() {
        let (server_id, addr, accepted, server_task) = server().await;
        let mut incoming = accepted.have;
        let (mut client, control) = client();
        // The dial starts before the open and the swarm has not run yet: the open finds no
        // connection and waits for this one.
        client.dial(addr.with(Protocol::P2p(server_id))).unwrap();
        let mut stream = drive(
            &mut client,
            control.open_stream(server_id, have::protocol()),
        )
        .await
        .expect("a stream once connected");
        stream.write_all(b"h").await.unwrap();
        stream.flush().await.unwrap();
        let (_, mut s) = drive(&mut client, incoming.recv()).await.unwrap();
        let mut b = [0u8];
        drive(&mut client, s.read_exact(&mut b)).await.unwrap();
        assert_eq!(&b, b"h");
        assert_eq!(
            client.behaviour().held(),
            (1, 0),
            "one live connection, no open waiting"
        );
        server_task.abort();
    }

    #[tokio::test]
    async fn a_peer_that_connects_and_disconnects_again_and_again_leaves_nothing_held() {
        let (server_id, addr, _accepted, server_task) = server().await;
        let (mut client, control) = client();
        let addr = addr.with(Protocol::P2p(server_id));
        for _ in 0..20 {
            client.dial(addr.clone()).unwrap();
            until_connection(&mut client, server_id, true).await;
            let stream = drive(
                &mut client,
                control.open_stream(server_id, pieces::protocol()),
            )
            .await
            .expect("a stream");
            drop(stream);
            assert_eq!(client.behaviour().held(), (1, 0));
            let _ = client.disconnect_peer_id(server_id);
            until_connection(&mut client, server_id, false).await;
            assert_eq!(
                client.behaviour().held(),
                (0, 0),
                "nothing kept for a closed connection"
            );
        }
        server_task.abort();
    }

    #[tokio::test]
    async fn an_open_fails_with_the_reason_when_the_peer_cannot_be_reached_or_lacks_the_protocol() {
        let (server_id, addr, _accepted, server_task) = server().await;
        let (mut client, control) = client();
        // Not connected and no address to dial: the dial this behaviour asks for fails.
        let unknown = PeerId::random();
        let e = drive(
            &mut client,
            control.open_stream(unknown, pieces::protocol()),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotConnected, "{e}");
        assert_eq!(client.behaviour().held(), (0, 0));
        // Connected, but the server does not speak the protocol.
        client.dial(addr.with(Protocol::P2p(server_id))).unwrap();
        until_connection(&mut client, server_id, true).await;
        let e = drive(
            &mut client,
            control.open_stream(server_id, StreamProtocol::new("/shoal/none/1.0.0")),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
        server_task.abort();
    }
}
