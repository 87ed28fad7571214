//! Node-wide figures: what the node fetched and served since it started.

use crate::job::percent_peer_caching;

/// Node-wide figures since the node started, after Delivery Optimization's performance
/// snapshot (`Get-DeliveryOptimizationPerfSnap`). Bytes are verified bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Bytes from the origin (DO's BytesFromHttp).
    pub bytes_from_origin: u64,
    /// Bytes from LAN peers (listed, mDNS, or on a private network).
    pub bytes_from_lan_peers: u64,
    /// Bytes from peers found through the DHT (DO's BytesFromGroupPeers).
    pub bytes_from_group_peers: u64,
    /// Bytes from cache nodes (DO's BytesFromCacheServer).
    pub bytes_from_cache: u64,
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
    /// Bytes from peers and cache nodes.
    #[must_use]
    pub fn bytes_from_peers(&self) -> u64 {
        self.bytes_from_lan_peers + self.bytes_from_group_peers + self.bytes_from_cache
    }

    /// DO's PercentPeerCaching, in percent.
    #[must_use]
    pub fn percent_peer_caching(&self) -> f64 {
        percent_peer_caching(self.bytes_from_peers(), self.bytes_from_origin)
    }
}
