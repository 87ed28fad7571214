//! Prometheus metrics: one registry with libp2p's swarm, identify, ping and Kademlia metrics
//! (`libp2p::metrics`) and Shoal's own figures, served in the OpenMetrics text format at
//! `http://ADDR/metrics` on a loopback address.
//!
//! Shoal's figures are read at each scrape from the node ([`Node::stats`], jobs by state,
//! connected peers), so nothing is counted twice:
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `shoal_downloaded_bytes_total` | counter | `source` = origin, lan, group, cache |
//! | `shoal_uploaded_bytes_total` | counter | |
//! | `shoal_upload_busy_total` (piece requests answered Busy) | counter | |
//! | `shoal_upload_streams_total` (piece streams peers opened) | counter | |
//! | `shoal_have_streams_total` (have streams peers opened) | counter | |
//! | `shoal_have_requests_total` (have queries from peers without have streams) | counter | |
//! | `shoal_pieces_rejected_total` | counter | |
//! | `shoal_peers_banned_total` | counter | |
//! | `shoal_percent_peer_caching` | gauge | |
//! | `shoal_connected_peers` | gauge | |
//! | `shoal_jobs` | gauge | `state` (BITS state names) |

use std::{net::SocketAddr, sync::Arc};

use axum::response::IntoResponse as _;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};
use tokio_util::sync::CancellationToken;

use crate::{Error, Node, job::State};

/// The BITS states, for the `shoal_jobs` gauge.
const STATES: [State; 9] = [
    State::Queued,
    State::Connecting,
    State::Transferring,
    State::Suspended,
    State::Error,
    State::TransientError,
    State::Transferred,
    State::Acknowledged,
    State::Cancelled,
];

/// Reads Shoal's figures from the node at each scrape.
#[derive(Debug)]
struct NodeCollector {
    node: Node,
}

fn labels(name: &str, value: &str) -> Vec<(String, String)> {
    vec![(name.to_owned(), value.to_owned())]
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.node.stats();
        let uploads = self.node.upload_stats();
        let mut fam = encoder.encode_descriptor(
            "shoal_downloaded",
            "Verified bytes downloaded, by source",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for (source, v) in [
            ("origin", st.bytes_from.origin),
            ("lan", st.bytes_from.lan_peers),
            ("group", st.bytes_from.group_peers),
            ("cache", st.bytes_from.cache),
        ] {
            ConstCounter::new(v).encode(fam.encode_family(&labels("source", source))?)?;
        }
        for (name, help, unit, v) in [
            (
                "shoal_uploaded",
                "Bytes of pieces served to peers",
                Some(Unit::Bytes),
                st.bytes_uploaded,
            ),
            (
                "shoal_upload_busy",
                "Piece requests answered Busy at the upload limit",
                None,
                uploads.busy,
            ),
            (
                "shoal_upload_streams",
                "Piece streams peers opened to this node (each carries many piece requests)",
                None,
                uploads.streams,
            ),
            (
                "shoal_have_streams",
                "Have streams peers opened to this node (each carries many have queries)",
                None,
                uploads.have_streams,
            ),
            (
                "shoal_have_requests",
                "Have queries answered with request-response, from peers without have streams",
                None,
                uploads.have_requests,
            ),
            (
                "shoal_pieces_rejected",
                "Pieces that failed verification and were discarded",
                None,
                st.pieces_rejected,
            ),
            (
                "shoal_peers_banned",
                "Bans of a peer for a content",
                None,
                st.peers_banned,
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, unit.as_ref(), c.metric_type())?)?;
        }
        let g = ConstGauge::new(st.percent_peer_caching());
        g.encode(encoder.encode_descriptor(
            "shoal_percent_peer_caching",
            "Share of downloaded bytes from peers and cache nodes, in percent",
            None,
            g.metric_type(),
        )?)?;
        let g = ConstGauge::new(i64::try_from(self.node.connected_count()).unwrap_or(i64::MAX));
        g.encode(encoder.encode_descriptor(
            "shoal_connected_peers",
            "Peers connected now",
            None,
            g.metric_type(),
        )?)?;
        let jobs = self.node.jobs();
        let mut fam = encoder.encode_descriptor(
            "shoal_jobs",
            "Jobs by BITS state",
            None,
            MetricType::Gauge,
        )?;
        for state in STATES {
            let n = jobs.iter().filter(|j| j.state == state).count();
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                .encode(fam.encode_family(&labels("state", &format!("{state:?}")))?)?;
        }
        Ok(())
    }
}

/// Registers Shoal's figures of `node` in `registry` and serves the registry at
/// `http://addr/metrics` until `shutdown`. Returns the bound address (for port 0).
///
/// # Errors
/// [`Error::Metrics`] when `addr` is not a loopback address or cannot be bound.
pub(crate) async fn serve(
    node: Node,
    mut registry: Registry,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<SocketAddr, Error> {
    let node_tasks = node.inner.tasks.clone();
    if !addr.ip().is_loopback() {
        return Err(Error::Metrics {
            addr,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a loopback address: metrics are served on this host only",
            ),
        });
    }
    registry.register_collector(Box::new(NodeCollector { node }));
    let registry = Arc::new(registry);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Metrics { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Metrics { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    let tasks = node_tasks.clone();
    tasks.spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok(bound)
}
