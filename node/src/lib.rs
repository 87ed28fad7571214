//! The Shoal node: a peer-to-peer delivery-optimization node after Windows BITS and Delivery
//! Optimization.
//!
//! A [`Node`] runs download jobs ([`job`]): each file is fetched in pieces from peers over
//! libp2p ([`swarm`]) and from its origin over HTTP ([`origin`]), every piece verified against a
//! BLAKE3 piece layer (`shoal_validator`), and a file reaches its local name only when the caller
//! completes the job ([`Node::complete`]). The node serves the verified pieces it holds to other
//! peers ([`store`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), shoal_node::Error> {
//! use shoal_node::{FileSpec, Node, Priority};
//! let node = Node::builder().build().await?;
//! let job = node.create_job("update", Priority::Normal)?;
//! node.add_file(job, FileSpec {
//!     url: "https://example.org/pkg.deb".parse().unwrap(),
//!     local_name: "pkg.deb".into(),
//!     expected: Default::default(),
//!     ranges: Vec::new(),
//! })?;
//! node.resume(job)?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod daemon;
pub(crate) mod download;
mod error;
pub mod events;
pub mod job;
mod node;
pub mod source;
pub mod store;
pub mod swarm;
mod timestamp;

pub use error::Error;
pub use events::{Callback, CallbackError, Event, TransferredFile};
pub use job::{ByteRange, FileSpec, JobId, JobInfo, Priority, State};
pub use libp2p::{Multiaddr, PeerId};
pub use node::stats::NodeStats;
pub use node::{Builder, CallbackFactory, Node};
pub use shoal_protocol::HaveKey;
pub use shoal_validator::{ContentId, Expected, Sha256Digest, ValidationState};

// Paths of the layout before issue 12, kept while callers move.
pub use daemon::control;
pub use download::{members, scheduler};
pub use node::{diagnose, stats};
pub use source::{bandwidth, origin, policy};
pub use store::{cache, fill, state as persist};
pub use swarm::group;
