//! Node-wide figures: what the node fetched and served since it started.

use crate::job::BytesBySource;

/// Node-wide figures since the node started, after Delivery Optimization's performance
/// snapshot (`Get-DeliveryOptimizationPerfSnap`). Bytes are verified bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Verified bytes fetched, by source.
    pub bytes_from: BytesBySource,
    /// Bytes of pieces served to peers.
    pub bytes_uploaded: u64,
    /// Pieces that failed verification and were discarded.
    pub pieces_rejected: u64,
    /// Bans of a peer for a content.
    pub peers_banned: u64,
    /// How full the cache is (DO's CacheSizeBytes), if the node keeps one.
    pub cache: Option<crate::store::cache::CacheUsage>,
}

impl NodeStats {
    /// DO's PercentPeerCaching, in percent ([`BytesBySource::percent_peer_caching`]).
    #[must_use]
    pub fn percent_peer_caching(&self) -> f64 {
        self.bytes_from.percent_peer_caching()
    }
}
