//! The node's error type.

use std::path::PathBuf;

use thiserror::Error;

use crate::job::{InvalidState, JobId};

/// Errors of the node's API.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// No job has this id.
    #[error("no job {0}")]
    UnknownJob(JobId),
    /// An upload job takes exactly one file (BITS `BG_E_TOO_MANY_FILES`).
    #[error("upload job {0} already has its one file")]
    UploadFiles(JobId),
    /// No file with this index in the job.
    #[error("job {job} has no file {index}")]
    UnknownFile {
        /// The job.
        job: JobId,
        /// The index asked for (0-based).
        index: usize,
    },
    /// The operation is not allowed in the job's state (BITS `BG_E_INVALID_STATE`).
    #[error(transparent)]
    InvalidState(#[from] InvalidState),
    /// Resume of a job without files (BITS `BG_E_EMPTY`).
    #[error("job {0} has no files")]
    Empty(JobId),
    /// A URL that is not `http` or `https`, or does not parse.
    #[error("bad URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// A local name that escapes its directory, names a directory, or lacks a parent.
    #[error("bad local name {path}: {reason}")]
    BadLocalName {
        /// The path as given.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Byte ranges that are empty or overlap (BITS `BG_E_OVERLAPPING_RANGES`,
    /// `BG_E_INVALID_RANGE`).
    #[error("bad byte ranges: {0}")]
    BadRange(String),
    /// Two files of one job with the same local name.
    #[error("local name {0} is already used by another file of the job")]
    DuplicateLocalName(PathBuf),
    /// A job's HTTP option that cannot be used (a reserved or malformed header, a proxy URL
    /// that is not http or https, an unreadable certificate file).
    #[error("bad {option}: {reason}")]
    BadHttpOption {
        /// The option, as `header "X-Name"`, `proxy`, `client certificate`.
        option: String,
        /// What was wrong.
        reason: String,
    },
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The libp2p swarm could not be built or bound.
    #[error("swarm: {0}")]
    Swarm(String),
    /// The HTTP client could not be built.
    #[error("origin client: {0}")]
    Origin(String),
    /// The state store failed (the daemon's durable state).
    #[error(transparent)]
    State(#[from] crate::store::state::PersistError),
    /// The cache failed, or holds no such content.
    #[error(transparent)]
    Cache(#[from] crate::store::cache::CacheError),
    /// A file to seed could not be hashed.
    #[error("cannot hash {path}: {reason}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A blocking task of the node (state database, cache) panicked or was cancelled.
    #[error("a node task failed: {0}")]
    Task(String),
    /// The metrics endpoint could not be served.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon runs as root but cannot take its users' file-system identity (no
    /// `CAP_SETUID`/`CAP_SETGID`): it refuses to start rather than do users' file work as root.
    #[error("cannot act as the daemon's users: {0}")]
    Impersonation(std::io::Error),
}
