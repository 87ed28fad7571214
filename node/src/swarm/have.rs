//! Have queries on long-lived streams (`/shoal/have/2.0.0`, [`protocol`]).
//!
//! A downloading node asks its peers what they hold every have round (250 ms). On libp2p
//! request-response (`/shoal/have/1.0.0`) each query opened a substream, negotiated its
//! protocol, armed a request timeout on both sides and a negotiation timeout on each substream
//! (four `futures-timer` timers, each a wake-up of that crate's timer thread), and went
//! through the swarm's event loop on both sides. In a swarm of eight nodes that was 2,700
//! queries in 12 s. Here a node keeps one stream to each peer it asks and sends one query
//! after another on it, as piece streams carry pieces ([`super::pieces`]): a request, its
//! response, the next request. A peer that does not speak this protocol (an older node) is
//! asked with request-response, and remembered as such while it stays connected. Decision
//! record: `docs/decisions/0022-have-streams.md`.
//!
//! The server side answers each stream in a task of its own, exactly as request-response
//! queries are answered ([`Answers::answer`]); a stream that sends no query for
//! [`pieces::STREAM_IDLE`] is closed, and a peer has at most [`MAX_STREAMS_PER_PEER`] have
//! streams open to a node.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
};

use libp2p::{PeerId, Stream, StreamProtocol};
use shoal_protocol::{HAVE_STREAM_PROTOCOL, HaveRequest, HaveResponse};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{source::bandwidth::Bandwidth, store::ContentStore};

use super::{
    FillRequest, UploadCounters,
    pieces::{self, OpenStreams, next_request, serve_streams},
    write_message,
};

/// Have streams one peer may have open to this node at once; more are reset at once. A node
/// asks each peer one query at a time per download, so a few downloads at once fit.
pub(crate) const MAX_STREAMS_PER_PEER: usize = 8;

/// The protocol of have streams.
pub(crate) fn protocol() -> StreamProtocol {
    StreamProtocol::new(HAVE_STREAM_PROTOCOL)
}

/// What a have query is answered with, whichever protocol brought it: what the store holds of
/// the key, nothing past the monthly upload cap; a cache node passes a query with an origin URL
/// for content it lacks to its fill task.
#[derive(Clone, Debug)]
pub(crate) struct Answers {
    pub(crate) store: Arc<ContentStore>,
    pub(crate) bandwidth: Arc<Bandwidth>,
    /// A cache node's fill task.
    pub(crate) fills: Option<mpsc::Sender<FillRequest>>,
    /// Where queries are counted.
    pub(crate) counters: Arc<UploadCounters>,
}

impl Answers {
    /// The answer to `peer`'s `request`, which came on a have stream when `on_stream` (else
    /// with request-response).
    pub(crate) fn answer(
        &self,
        peer: PeerId,
        request: HaveRequest,
        on_stream: bool,
    ) -> HaveResponse {
        let counter = if on_stream {
            &self.counters.have_on_streams
        } else {
            &self.counters.have_requests
        };
        counter.fetch_add(1, Relaxed);
        // Past the monthly upload cap the node serves nothing, so it holds nothing either.
        if self.bandwidth.cap_reached() {
            return HaveResponse(None);
        }
        let response = HaveResponse(self.store.have(&request.key));
        if response.0.is_none()
            && let (Some(fills), Some(url)) = (&self.fills, request.origin_url)
        {
            // A full queue drops the request: the asker asks again.
            let _ = fills.try_send(FillRequest {
                peer,
                key: request.key,
                origin_url: url,
            });
        }
        response
    }
}

/// The server of have streams.
#[derive(Debug)]
pub(crate) struct Server {
    answers: Answers,
}

impl Server {
    /// A server answering with `answers`.
    pub(crate) fn new(answers: Answers) -> Self {
        Self { answers }
    }

    /// Serves the have streams `incoming` brings (from [`super::streams::Behaviour`]), each in a
    /// task of its own, until `shutdown`; at most [`MAX_STREAMS_PER_PEER`] of one peer at once
    /// ([`pieces::serve_streams`]).
    pub(crate) fn start(self, incoming: super::streams::Incoming, shutdown: CancellationToken) {
        let server = Arc::new(self);
        let counters = server.answers.counters.clone();
        serve_streams(
            (incoming, OpenStreams::new(MAX_STREAMS_PER_PEER), "have"),
            shutdown,
            move || {
                counters.have_streams.fetch_add(1, Relaxed);
            },
            move |peer, stream| {
                let s = server.clone();
                async move { s.serve(peer, stream).await }
            },
        );
    }

    /// Answers the queries on one stream until the peer closes it, stays silent for
    /// [`pieces::STREAM_IDLE`], sends what the codec refuses, or does not read an answer
    /// within [`super::HAVE_TIMEOUT`].
    async fn serve(&self, peer: PeerId, mut stream: Stream) {
        while let Some(request) = next_request::<HaveRequest>(&mut stream, &peer, "have").await {
            let response = self.answers.answer(peer, request, true);
            let written =
                tokio::time::timeout(super::HAVE_TIMEOUT, write_message(&mut stream, &response))
                    .await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
        }
    }
}

/// The asking side: the have streams kept open between queries, and the peers that do not
/// speak [`protocol`] (asked with request-response while they stay connected).
#[derive(Debug, Default)]
pub(crate) struct Client {
    pub(crate) pool: pieces::Pool,
    old: Mutex<HashSet<PeerId>>,
}

impl Client {
    /// Whether `peer` refused [`protocol`] since it connected.
    pub(crate) fn is_old(&self, peer: &PeerId) -> bool {
        self.old
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(peer)
    }

    /// Remembers that `peer` refused [`protocol`].
    pub(crate) fn set_old(&self, peer: PeerId) {
        self.old
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer);
    }

    /// Drops the streams kept too long, and all that is known of `gone` peers.
    pub(crate) fn sweep(&self, gone: Option<&PeerId>) {
        if let Some(p) = gone {
            self.old.lock().unwrap_or_else(|e| e.into_inner()).remove(p);
        }
        self.pool.sweep(gone);
    }
}
