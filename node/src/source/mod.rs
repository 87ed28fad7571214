//! Where bytes come from besides peers: the origin client, the source policy (when peers,
//! cache nodes and the origin may be used) and the bandwidth limits.

pub(crate) mod bandwidth;
pub(crate) mod lowat;
pub(crate) mod origin;
pub(crate) mod policy;
pub(crate) mod upload;
