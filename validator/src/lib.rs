//! Shoal's verification: the BLAKE3 piece layer, whole-file digests and validation state.
//!
//! This crate decides whether bytes are good; nothing else in Shoal compares hashes. It does no
//! networking and no async work: everything is a pure function over bytes or a blocking reader.
//!
//! - [`PieceLayer`]: the BLAKE3 chaining values of a file's piece-aligned subtrees, checked
//!   against the content id before any piece is trusted, then used to check each piece on
//!   arrival ([`PieceLayer::verify_piece`]).
//! - [`LayerBuilder`]: computes the layer of bytes that arrive without one (from the origin), so
//!   the file's content id can be derived and checked at the end.
//! - [`Sha256Stream`] and [`Expected`]: the whole-file digests a job may expect;
//!   [`OrderedSha256`]: the SHA-256 of pieces verified out of order, taken in file order.
//! - [`hash_reader`]: content id, SHA-256 and piece layer of a whole file in one pass.
//! - [`sha256_swarm_id`]: the id of a swarm that knows its content only by its SHA-256.
//!
//! The tree arithmetic follows section 2.1 of the BLAKE3 paper, through `blake3::hazmat`.

mod digest;
mod layer;
mod swarm_id;

pub use digest::{
    Expected, FileDigests, OrderedSha256, Sha256Stream, ValidationState, hash_reader,
};
pub use layer::{
    ChainingValue, LayerBuilder, PieceLayer, chaining_values_from_bytes, check_piece,
    piece_chaining_value,
};
pub use shoal_protocol::{ContentId, Sha256Digest};
pub use swarm_id::{SHA256_SWARM_CONTEXT, sha256_swarm_id};

use shoal_protocol::PieceIndex;
use thiserror::Error;

/// Why bytes, a piece layer or a file failed verification.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// A piece layer has the wrong number of chaining values for its content id.
    #[error("piece layer has {got} chaining values, content {content_id} needs {expected}")]
    LayerLength {
        /// The content the layer claims to describe.
        content_id: ContentId,
        /// The count the content id implies.
        expected: usize,
        /// The count received.
        got: usize,
    },
    /// The chaining values of a piece layer do not merge into the content id.
    #[error("piece layer does not merge into content id {0}")]
    LayerMismatch(ContentId),
    /// A piece has the wrong length.
    #[error("piece {index} has {got} bytes, expected {expected}")]
    PieceLength {
        /// The piece index.
        index: PieceIndex,
        /// The length the content id implies, in bytes.
        expected: u64,
        /// The length received, in bytes.
        got: u64,
    },
    /// A piece index beyond the end of the file.
    #[error("piece {index} is out of range: the file has {piece_count} pieces")]
    PieceOutOfRange {
        /// The piece index.
        index: PieceIndex,
        /// The file's piece count.
        piece_count: u32,
    },
    /// Stored chaining values whose byte length is not a multiple of 32.
    #[error("{0} bytes of chaining values is not a multiple of 32")]
    LayerBytes(usize),
    /// A length beyond [`shoal_protocol::MAX_CONTENT_LEN_BYTES`].
    #[error("a file of {0} bytes exceeds the maximum length")]
    TooLong(u64),
    /// A piece's chaining value differs from the layer's.
    #[error("piece {index} does not match its chaining value")]
    PieceMismatch {
        /// The piece index.
        index: PieceIndex,
    },
    /// The file's BLAKE3 hash differs from the expected content id.
    #[error("BLAKE3 mismatch: expected {expected}, computed {actual}")]
    Blake3Mismatch {
        /// The expected hash, hex.
        expected: String,
        /// The computed hash, hex.
        actual: String,
    },
    /// The file's SHA-256 differs from the expected digest.
    #[error("SHA-256 mismatch: expected {expected}, computed {actual}")]
    Sha256Mismatch {
        /// The expected digest.
        expected: Sha256Digest,
        /// The computed digest.
        actual: Sha256Digest,
    },
    /// Reading the bytes failed.
    #[error("reading failed: {0}")]
    Io(#[from] std::io::Error),
}
