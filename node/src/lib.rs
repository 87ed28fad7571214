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

pub mod bandwidth;
pub mod cache;
pub mod config;
pub mod control;
pub mod daemon;
pub mod diagnose;
mod dialscope;
pub(crate) mod download;
mod error;
pub mod events;
pub mod fill;
mod fsuser;
pub mod group;
pub mod job;
pub mod members;
mod metrics;
mod node;
pub mod origin;
pub mod persist;
pub mod policy;
pub mod scheduler;
mod slots;
pub mod stats;
pub mod store;
pub mod swarm;
mod timestamp;
mod tls;

pub use error::Error;
pub use events::{Callback, CallbackError, Event, TransferredFile};
pub use job::{ByteRange, FileSpec, JobId, JobInfo, Priority, State};
pub use libp2p::{Multiaddr, PeerId};
pub use node::{Builder, CallbackFactory, Node};
pub use shoal_protocol::HaveKey;
pub use shoal_validator::{ContentId, Expected, Sha256Digest, ValidationState};
pub use stats::NodeStats;
