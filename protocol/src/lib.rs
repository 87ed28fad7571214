//! Shoal's wire protocol and content identity types.
//!
//! This crate holds no I/O and spawns no tasks. It gives:
//!
//! - [`ContentId`], [`Sha256Digest`] and the piece geometry every node derives from a file's
//!   length alone ([`piece_size_for`]), so no piece size is ever negotiated;
//! - [`Bitfield`], the set of pieces a peer holds;
//! - the peer messages ([`message`]) as domain types, converted from the private prost types with
//!   `TryFrom`, so a malformed message from a peer is a [`DecodeError`] and never a panic;
//! - length-prefix framing ([`frame`]) with a hard byte limit per message type, checked before a
//!   body is buffered.
//!
//! The protocol names, limits and flows are documented in `docs/protocol.md`.

pub mod bitfield;
pub mod frame;
pub mod id;
pub mod message;

mod proto {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/shoal.peer.v1.rs"));
}

pub use bitfield::{Bitfield, Ones};
pub use id::{
    ContentId, MAX_CONTENT_LEN_BYTES, MAX_PIECE_SIZE_BYTES, MIN_PIECE_SIZE_BYTES, PieceIndex,
    Sha256Digest, TARGET_PIECE_COUNT, parse_blake3_hex, piece_size_for,
};
pub use message::{
    Ack, DecodeError, HaveKey, HaveRequest, HaveResponse, Holding, LayerRequest, LayerResponse,
    MAX_MEMBER_ID_BYTES, MAX_MEMBERS, MAX_ORIGIN_URL_BYTES, Member, Message, PieceRequest,
    PieceResponse,
};

/// The protocol name of the have query, on which a node asks what a peer holds of a content id
/// or of a SHA-256 digest.
pub const HAVE_PROTOCOL: &str = "/shoal/have/1.0.0";
/// The protocol name of have queries on a long-lived stream: one [`HaveRequest`], then its
/// [`HaveResponse`], each framed like every message, then the next request, and so on, the
/// way [`PIECE_PROTOCOL`] carries pieces (`docs/protocol.md`). A node asks a peer that does
/// not speak it with [`HAVE_PROTOCOL`], one request-response stream per query.
pub const HAVE_STREAM_PROTOCOL: &str = "/shoal/have/2.0.0";
/// The protocol name of the piece layer fetch.
pub const LAYER_PROTOCOL: &str = "/shoal/layer/1.0.0";
/// The protocol name of announcements: a node pushes what it holds and fetches of a content
/// ([`HaveResponse`] as the request, [`Ack`] as the response) to the peers fetching the same
/// content when it starts fetching pieces from the origin.
pub const ANNOUNCE_PROTOCOL: &str = "/shoal/announce/1.0.0";
/// The protocol name of the piece fetch: a long-lived stream that carries one
/// [`PieceRequest`] and then its [`PieceResponse`], each framed like every message (varint
/// length, then the body), then the next request, and so on (`docs/protocol.md`). Version 1
/// was request-response, one stream per piece.
pub const PIECE_PROTOCOL: &str = "/shoal/piece/2.0.0";
