#![warn(unnameable_types)]
//! The Shoal node: a peer-to-peer delivery-optimization node after Windows BITS and Delivery
//! Optimization.
//!
//! A [`Node`] runs download jobs ([`job`]): each file is fetched in pieces from peers over
//! libp2p and from its origin over HTTP, every piece verified against a BLAKE3 piece layer
//! (`shoal_validator`), and a file reaches its local name only when the caller completes the
//! job ([`Node::complete`]). The node serves the verified pieces it holds to other peers.
//!
//! # The API
//!
//! What an embedding update agent needs, and nothing else:
//! - [`Node`] and its [`Builder`]; the settings the builder takes are in [`config`], which
//!   also reads the TOML configuration file;
//! - the job types ([`job`]: [`JobId`], [`FileSpec`], [`JobInfo`], [`State`], errors) and the
//!   BITS operations on `Node` (create, add files, resume, suspend, cancel, complete);
//! - [`events`]: the per-job [`Callback`] (BITS `IBackgroundCopyCallback`) and broadcast
//!   [`Event`]s;
//! - [`Error`], and the status types `Node`'s getters return ([`NodeStats`], [`Diagnosis`],
//!   [`CacheUsage`], [`BandwidthStatus`], ...);
//! - [`daemon`]: the multi-user daemon and its gRPC control API, for the `shoal` binary and
//!   for agents that run the daemon in-process; [`wire`]: the peer protocols' codec, for tools
//!   that speak them.
//!
//! Everything else (the scheduler, the swarm, the stores) is internal; `docs/ARCHITECTURE.md`
//! maps it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_node::Error> {
//! use shoal_node::{FileSpec, Node, Priority};
//! let node = Node::builder().build().await?;
//! let job = node.create_job("update", Priority::Normal).await?;
//! node.add_file(job, FileSpec {
//!     url: "https://example.org/pkg.deb".parse().unwrap(),
//!     local_name: "pkg.deb".into(),
//!     expected: Default::default(),
//!     ranges: Vec::new(),
//! }).await?;
//! node.resume(job).await?;
//! # Ok(()) }
//! ```

pub mod apt;
mod bufpool;
pub mod config;
pub mod daemon;
pub(crate) mod download;
mod error;
pub mod events;
pub mod job;
mod node;
pub(crate) mod source;
pub(crate) mod store;
pub(crate) mod swarm;
mod timestamp;

pub use error::Error;
pub use events::{Callback, CallbackError, Event, TransferredFile};
pub use job::{ByteRange, BytesBySource, FileSpec, JobId, JobInfo, Priority, State};
pub use libp2p::{Multiaddr, PeerId};
pub use node::stats::NodeStats;
pub use node::{Builder, CallbackFactory, Node};
pub use shoal_protocol::HaveKey;
pub use shoal_validator::{ContentId, Expected, Sha256Digest, ValidationState};

pub use node::diagnose::{Diagnosis, FileDiagnosis, PeerAnswer, SwarmMembers};
pub use source::bandwidth::BandwidthStatus;
pub use store::cache::{CacheError, CacheItem, CacheUsage};
pub use store::state::PersistError;
pub use swarm::group::GroupError;
pub use swarm::{DhtStatus, PeerSource, UploadStats};

/// The deterministic swarm simulator: N real download cores on a modelled network in virtual
/// time (`docs/simulator.md`). Built with the `sim` feature, for benchmarks and tests.
#[cfg(feature = "sim")]
pub use download::sim;

/// Shoal's peer protocols on the wire, for tools that speak them (the hostile-input kit in
/// `tests/`): the libp2p request-response codec over `shoal-protocol`'s messages, with each
/// message type's size limit, and the framing and exchange of the piece streams.
pub mod wire {
    pub use crate::swarm::pieces::exchange;
    pub use crate::swarm::{Codec, read_message, write_message};
}
