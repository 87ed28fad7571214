//! Where bytes come from besides peers: the origin client, the source policy (when peers,
//! cache nodes and the origin may be used) and the bandwidth limits.

pub mod bandwidth;
pub mod origin;
pub mod policy;
