//! Inbound piece and have streams, handed to their servers without being dropped under load.
//!
//! `libp2p-stream` 0.5.0-alpha hands inbound streams over a channel of capacity one
//! (`mpsc::channel(0)` with one sender) and drops (resets) a stream that arrives while the
//! previous one has not been taken yet. A connection task finishing two negotiations before the
//! server's accept task runs is enough: in a test of four clients starting against one cache
//! node, 25 piece streams were reset this way, each a failed piece request at the client, and
//! once in a while a client gave up on the cache node for a piece and took it from the origin.
//! Newer `libp2p-stream` sources take a buffer size, but no release that works with
//! `libp2p-swarm` 0.48 does. This behaviour accepts [`pieces::protocol`] and
//! [`have::protocol`] on every connection and queues what arrives, up to [`BACKLOG`] streams of
//! each; outbound streams still open through `libp2p-stream`'s `Control`. Decision records:
//! `docs/decisions/0021-piece-streams.md`, `docs/decisions/0022-have-streams.md`.
//!
//! [`pieces::protocol`]: super::pieces::protocol
//! [`have::protocol`]: super::have::protocol

use std::{
    convert::Infallible,
    iter,
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId, Stream,
    core::{
        Endpoint,
        transport::PortUse,
        upgrade::{DeniedUpgrade, InboundUpgrade, UpgradeInfo},
    },
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
        handler::{ConnectionEvent, FullyNegotiatedInbound},
    },
};
use tokio::sync::mpsc;
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

/// The behaviour that accepts inbound piece and have streams; it emits no events.
pub(crate) struct Behaviour {
    pieces: mpsc::Sender<(PeerId, Stream)>,
    have: mpsc::Sender<(PeerId, Stream)>,
}

impl Behaviour {
    /// The behaviour and the queues its connections fill ([`BACKLOG`] streams of each at most).
    pub(crate) fn new() -> (Self, Accepted) {
        let (pieces, pieces_rx) = mpsc::channel(BACKLOG);
        let (have, have_rx) = mpsc::channel(BACKLOG);
        (
            Self { pieces, have },
            Accepted {
                pieces: pieces_rx,
                have: have_rx,
            },
        )
    }

    fn handler(&self, peer: PeerId) -> Handler {
        Handler {
            peer,
            pieces: self.pieces.clone(),
            have: self.have.clone(),
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

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// The protocols accepted: the stream as negotiated, with its protocol.
#[derive(Clone, Debug)]
pub(crate) struct Protocols;

impl UpgradeInfo for Protocols {
    type Info = libp2p::StreamProtocol;
    type InfoIter = iter::Chain<iter::Once<Self::Info>, iter::Once<Self::Info>>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once(pieces::protocol()).chain(iter::once(have::protocol()))
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, libp2p::StreamProtocol);
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Output, Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: Self::Info) -> Self::Future {
        std::future::ready(Ok((stream, protocol)))
    }
}

/// One connection's side: offers the piece and have protocols to every inbound substream and
/// queues the streams negotiated on it, each in its protocol's queue.
pub(crate) struct Handler {
    peer: PeerId,
    pieces: mpsc::Sender<(PeerId, Stream)>,
    have: mpsc::Sender<(PeerId, Stream)>,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(Protocols, ())
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, Infallible, Infallible>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Infallible>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
        {
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
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
    use libp2p::{multiaddr::Protocol, swarm::SwarmEvent};

    use super::*;

    #[tokio::test]
    async fn piece_streams_wait_in_the_queue_until_the_server_takes_them() {
        let (
            accept,
            Accepted {
                pieces: mut incoming,
                ..
            },
        ) = Behaviour::new();
        let mut server = super::super::test_swarm(|_| accept);
        server
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
                break address;
            }
        };
        let server_id = *server.local_peer_id();
        let server_task = tokio::spawn(async move {
            loop {
                server.select_next_some().await;
            }
        });
        let mut client = super::super::test_swarm(|_| libp2p_stream::Behaviour::new());
        let mut control = client.behaviour().new_control();
        client.dial(addr.with(Protocol::P2p(server_id))).unwrap();
        let client_id = *client.local_peer_id();
        let client_task = tokio::spawn(async move {
            loop {
                client.select_next_some().await;
            }
        });
        // 32 streams open while the server takes none (libp2p-stream's own queue holds one).
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
}
