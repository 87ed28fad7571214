//! Peer messages as domain types, and their encoding.
//!
//! Each type implements [`Message`]: [`Message::encode`] gives the protobuf body (no prefix) and
//! [`Message::decode`] checks [`Message::MAX_LEN_BYTES`] and every field, so a malformed message is
//! a [`DecodeError`], never a panic. The prost types stay private to this crate.

use bytes::Bytes;
use prost::Message as _;
use thiserror::Error;

use crate::{
    bitfield::Bitfield,
    id::{ContentId, MAX_CONTENT_LEN_BYTES, MAX_PIECE_SIZE_BYTES, PieceIndex, Sha256Digest},
    proto,
};

/// Pieces in the largest file: [`MAX_CONTENT_LEN_BYTES`] / [`MAX_PIECE_SIZE_BYTES`].
const MAX_PIECES: u64 = MAX_CONTENT_LEN_BYTES / MAX_PIECE_SIZE_BYTES;
/// Room for field tags, lengths and small fields around the bulk of a message, in bytes.
const ENVELOPE_BYTES: usize = 256;
/// The most bytes one encoded [`Member`] takes: its tag and length, the peer id with its tag
/// and length, and three varint fields with their tags.
const MEMBER_BYTES: usize = 2 + (2 + MAX_MEMBER_ID_BYTES) + (1 + 10) + (1 + 5) + 2;

/// A message that could not be decoded; names what was wrong.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body exceeds the limit of its message type.
    #[error("{message} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The message type.
        message: &'static str,
        /// The body length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The bytes are not valid protobuf for the message type.
    #[error("malformed {message}: {reason}")]
    Malformed {
        /// The message type.
        message: &'static str,
        /// What the protobuf decoder reported.
        reason: String,
    },
    /// A field is missing or holds an impossible value.
    #[error("invalid field {field} in {message}")]
    InvalidField {
        /// The message type.
        message: &'static str,
        /// The field.
        field: &'static str,
    },
}

/// A peer message with a byte limit.
pub trait Message: Sized {
    /// The message's name in errors.
    const NAME: &'static str;
    /// The largest encoded body accepted, in bytes (without the length prefix).
    const MAX_LEN_BYTES: usize;

    /// The protobuf body, without a length prefix.
    fn encode(&self) -> Vec<u8>;

    /// The protobuf body in two parts to be written one after the other: a head, and a bulk
    /// payload passed through without copying. The default has no bulk part.
    fn encode_parts(&self) -> (Vec<u8>, Bytes) {
        (self.encode(), Bytes::new())
    }

    /// Decodes and checks a body.
    ///
    /// # Errors
    /// [`DecodeError::TooLarge`] over [`Self::MAX_LEN_BYTES`], [`DecodeError::Malformed`] for bad
    /// protobuf, [`DecodeError::InvalidField`] for a missing or impossible field.
    fn decode(body: Bytes) -> Result<Self, DecodeError>;

    /// For a request: the largest body of its response worth reading, in bytes, when it is
    /// smaller than the response type's own limit (a piece response is at most the piece asked
    /// for plus its envelope). `None`: the response type's limit.
    fn response_limit_bytes(&self) -> Option<usize> {
        None
    }
}

fn check_len<M: Message>(body: &Bytes) -> Result<(), DecodeError> {
    if body.len() > M::MAX_LEN_BYTES {
        return Err(DecodeError::TooLarge {
            message: M::NAME,
            len: body.len(),
            limit: M::MAX_LEN_BYTES,
        });
    }
    Ok(())
}

fn malformed(message: &'static str) -> impl FnOnce(prost::DecodeError) -> DecodeError {
    move |e| DecodeError::Malformed {
        message,
        reason: e.to_string(),
    }
}

fn invalid(message: &'static str, field: &'static str) -> DecodeError {
    DecodeError::InvalidField { message, field }
}

fn cid_to_proto(id: &ContentId) -> proto::ContentId {
    proto::ContentId {
        blake3: Bytes::copy_from_slice(id.hash()),
        length: id.length(),
    }
}

fn cid_from_proto(
    id: Option<proto::ContentId>,
    message: &'static str,
) -> Result<ContentId, DecodeError> {
    let id = id.ok_or_else(|| invalid(message, "content_id"))?;
    let hash: [u8; 32] = id
        .blake3
        .as_ref()
        .try_into()
        .map_err(|_| invalid(message, "content_id.blake3"))?;
    ContentId::new(hash, id.length).map_err(|_| invalid(message, "content_id.length"))
}

/// What a have query looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HaveKey {
    /// A BLAKE3 hash the asker trusts; the answer's content id must carry the same hash.
    Blake3([u8; 32]),
    /// A SHA-256 digest; the answer's content id is an untrusted claim.
    Sha256(Sha256Digest),
}

impl std::fmt::Display for HaveKey {
    /// `blake3:HEX` or `sha256:HEX` (64 lowercase hex digits).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Blake3(h) => write!(f, "blake3:{}", hex::encode(h)),
            Self::Sha256(d) => write!(f, "sha256:{d}"),
        }
    }
}

impl std::str::FromStr for HaveKey {
    type Err = crate::id::ParseError;

    /// Parses `blake3:HEX`, `sha256:HEX`, a content id `HEX:LENGTH` (its BLAKE3 hash), or
    /// bare `HEX` (a BLAKE3 hash); `HEX` is 64 hexadecimal digits.
    ///
    /// # Errors
    /// [`crate::id::ParseError`] when the digest is not 64 hex digits or the length no number.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(h) = s.strip_prefix("blake3:") {
            return crate::id::parse_blake3_hex(h).map(Self::Blake3);
        }
        if let Some(d) = s.strip_prefix("sha256:") {
            return d.parse().map(Self::Sha256);
        }
        if s.contains(':') {
            return s.parse::<ContentId>().map(|id| Self::Blake3(*id.hash()));
        }
        crate::id::parse_blake3_hex(s).map(Self::Blake3)
    }
}

/// The longest origin URL a have request carries, in bytes.
pub const MAX_ORIGIN_URL_BYTES: usize = 4096;

/// `/shoal/have/1.0.0` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaveRequest {
    /// What to look up.
    pub key: HaveKey,
    /// The content's origin URL, sent to cache nodes (at most [`MAX_ORIGIN_URL_BYTES`]).
    pub origin_url: Option<String>,
}

impl HaveRequest {
    /// A plain lookup of `key`, without an origin URL.
    #[must_use]
    pub fn new(key: HaveKey) -> Self {
        Self {
            key,
            origin_url: None,
        }
    }
}

impl Message for HaveRequest {
    const NAME: &'static str = "HaveRequest";
    const MAX_LEN_BYTES: usize = ENVELOPE_BYTES + MAX_ORIGIN_URL_BYTES;

    fn encode(&self) -> Vec<u8> {
        let key = match &self.key {
            HaveKey::Blake3(h) => proto::have_request::Key::Blake3(Bytes::copy_from_slice(h)),
            HaveKey::Sha256(d) => proto::have_request::Key::Sha256(Bytes::copy_from_slice(&d.0)),
        };
        proto::HaveRequest {
            key: Some(key),
            origin_url: self.origin_url.clone().unwrap_or_default(),
        }
        .encode_to_vec()
    }

    fn decode(body: Bytes) -> Result<Self, DecodeError> {
        check_len::<Self>(&body)?;
        let msg = proto::HaveRequest::decode(body).map_err(malformed(Self::NAME))?;
        if msg.origin_url.len() > MAX_ORIGIN_URL_BYTES {
            return Err(invalid(Self::NAME, "origin_url"));
        }
        let origin_url = (!msg.origin_url.is_empty()).then_some(msg.origin_url);
        let key = match msg.key {
            Some(proto::have_request::Key::Blake3(h)) => {
                let h: [u8; 32] = h
                    .as_ref()
                    .try_into()
                    .map_err(|_| invalid(Self::NAME, "blake3"))?;
                HaveKey::Blake3(h)
            }
            Some(proto::have_request::Key::Sha256(d)) => {
                let d: [u8; 32] = d
                    .as_ref()
                    .try_into()
                    .map_err(|_| invalid(Self::NAME, "sha256"))?;
                HaveKey::Sha256(Sha256Digest(d))
            }
            None => return Err(invalid(Self::NAME, "key")),
        };
        Ok(Self { key, origin_url })
    }
}

/// What a peer holds of one content: the answer to a have query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The content id (for a SHA-256 lookup, the peer's untrusted claim).
    pub content_id: ContentId,
    /// The verified pieces the peer serves.
    pub have: Bitfield,
    /// The pieces the peer is fetching now.
    pub fetching: Bitfield,
    /// The pieces the peer fetched from the origin while it knew no verified layer; it can
    /// tell their chaining values (a partial [`LayerResponse`]).
    pub claimed: Bitfield,
    /// The pieces whose chaining values the peer can tell in a partial [`LayerResponse`]: its
    /// claims and values it took in from other peers (relayed, so that a swarm whose nodes
    /// each see a few others can still assemble the layer); every piece once it holds a
    /// verified layer. Decoded as `claimed` when the peer sends none.
    pub chaining: Bitfield,
    /// The swarm members fetching this content that the peer knows of (itself first), at
    /// most [`MAX_MEMBERS`]; empty from peers that do not gossip members.
    pub members: Vec<Member>,
}

/// The most [`Member`] entries one [`Holding`] carries.
pub const MAX_MEMBERS: usize = 64;
/// The longest peer id a [`Member`] carries, in bytes (a libp2p multihash is at most 64 bytes
/// of digest plus its header).
pub const MAX_MEMBER_ID_BYTES: usize = 70;

/// A node fetching some content, as one peer tells another: the swarm's shared view of who
/// takes part, gossiped in [`Holding::members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's libp2p peer id bytes (a multihash, at most [`MAX_MEMBER_ID_BYTES`]); the
    /// node layer parses it and drops entries that do not parse.
    pub peer_id: Bytes,
    /// The node's own clock in milliseconds when it last stated this entry; a relayed entry
    /// is newer when this is higher.
    pub heartbeat: u64,
    /// Pieces of the content the node holds (verified, or fetched while it assembles).
    pub done: u32,
    /// Whether the node uses the origin for this content now.
    pub origin: bool,
}

impl Holding {
    /// A holding of `have` with nothing fetching or claimed.
    #[must_use]
    pub fn verified(content_id: ContentId, have: Bitfield) -> Self {
        let n = content_id.piece_count();
        Self {
            content_id,
            have,
            fetching: Bitfield::new(n),
            claimed: Bitfield::new(n),
            chaining: Bitfield::new(n),
            members: Vec::new(),
        }
    }
}

/// `/shoal/have/1.0.0` response: what the peer holds of the content, or `None` when it holds
/// nothing (and fetches nothing of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaveResponse(pub Option<Holding>);

impl Message for HaveResponse {
    const NAME: &'static str = "HaveResponse";
    const MAX_LEN_BYTES: usize =
        4 * MAX_PIECES.div_ceil(8) as usize + MAX_MEMBERS * MEMBER_BYTES + ENVELOPE_BYTES;

    fn encode(&self) -> Vec<u8> {
        let empty_or = |b: &Bitfield| {
            if b.count_ones() == 0 {
                Bytes::new()
            } else {
                Bytes::copy_from_slice(b.as_bytes())
            }
        };
        let msg = match &self.0 {
            Some(h) => proto::HaveResponse {
                content_id: Some(cid_to_proto(&h.content_id)),
                bitfield: Bytes::copy_from_slice(h.have.as_bytes()),
                fetching: empty_or(&h.fetching),
                claimed: empty_or(&h.claimed),
                chaining: if h.chaining == h.claimed {
                    Bytes::new()
                } else {
                    empty_or(&h.chaining)
                },
                members: h
                    .members
                    .iter()
                    .take(MAX_MEMBERS)
                    .map(|m| proto::Member {
                        peer_id: m.peer_id.clone(),
                        heartbeat: m.heartbeat,
                        done: m.done,
                        origin: m.origin,
                    })
                    .collect(),
            },
            None => proto::HaveResponse::default(),
        };
        msg.encode_to_vec()
    }

    fn decode(body: Bytes) -> Result<Self, DecodeError> {
        check_len::<Self>(&body)?;
        let msg = proto::HaveResponse::decode(body).map_err(malformed(Self::NAME))?;
        if msg.content_id.is_none() {
            return Ok(Self(None));
        }
        let id = cid_from_proto(msg.content_id, Self::NAME)?;
        let n = id.piece_count();
        let bits = |b: &Bytes, field: &'static str| {
            if b.is_empty() && field != "bitfield" {
                return Ok(Bitfield::new(n));
            }
            Bitfield::from_bytes(b, n).ok_or_else(|| invalid(Self::NAME, field))
        };
        if msg.members.len() > MAX_MEMBERS {
            return Err(invalid(Self::NAME, "members"));
        }
        let members = msg
            .members
            .into_iter()
            .map(|m| {
                if m.peer_id.is_empty() || m.peer_id.len() > MAX_MEMBER_ID_BYTES || m.done > n {
                    return Err(invalid(Self::NAME, "members"));
                }
                Ok(Member {
                    peer_id: m.peer_id,
                    heartbeat: m.heartbeat,
                    done: m.done,
                    origin: m.origin,
                })
            })
            .collect::<Result<_, _>>()?;
        let claimed = bits(&msg.claimed, "claimed")?;
        let chaining = if msg.chaining.is_empty() {
            claimed.clone()
        } else {
            bits(&msg.chaining, "chaining")?
        };
        Ok(Self(Some(Holding {
            have: bits(&msg.bitfield, "bitfield")?,
            fetching: bits(&msg.fetching, "fetching")?,
            claimed,
            chaining,
            content_id: id,
            members,
        })))
    }
}

/// `/shoal/announce/1.0.0` response: the receipt of an announcement (a [`HaveResponse`] pushed
/// to a peer when this node starts fetching pieces, so that peers fetching the same content
/// need not wait for their next have query to know). Carries nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack;

impl Message for Ack {
    const NAME: &'static str = "Ack";
    const MAX_LEN_BYTES: usize = ENVELOPE_BYTES;

    fn encode(&self) -> Vec<u8> {
        Vec::new()
    }

    fn decode(body: Bytes) -> Result<Self, DecodeError> {
        check_len::<Self>(&body)?;
        Ok(Self)
    }
}

/// `/shoal/layer/1.0.0` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRequest {
    /// The content.
    pub content_id: ContentId,
    /// Accept a partial layer (the peer's claimed chaining values) when the peer holds no
    /// verified one.
    pub partial: bool,
    /// With `partial`: only the chaining values of these pieces (one bit per piece of the
    /// content), the ones the requester lacks; `None`: every value the peer can tell. A
    /// gathering round so carries each value about once rather than the whole partial layer
    /// (up to 36 bytes per piece) every round.
    pub want: Option<Bitfield>,
}

impl Message for LayerRequest {
    const NAME: &'static str = "LayerRequest";
    const MAX_LEN_BYTES: usize = MAX_PIECES.div_ceil(8) as usize + ENVELOPE_BYTES;

    fn encode(&self) -> Vec<u8> {
        proto::LayerRequest {
            content_id: Some(cid_to_proto(&self.content_id)),
            partial: self.partial,
            want: self
                .want
                .as_ref()
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .unwrap_or_default(),
        }
        .encode_to_vec()
    }

    fn decode(body: Bytes) -> Result<Self, DecodeError> {
        check_len::<Self>(&body)?;
        let msg = proto::LayerRequest::decode(body).map_err(malformed(Self::NAME))?;
        let content_id = cid_from_proto(msg.content_id, Self::NAME)?;
        let want = if msg.want.is_empty() {
            None
        } else {
            Some(
                Bitfield::from_bytes(&msg.want, content_id.piece_count())
                    .ok_or_else(|| invalid(Self::NAME, "want"))?,
            )
        };
        Ok(Self {
            content_id,
            partial: msg.partial,
            want,
        })
    }
}

/// `/shoal/layer/1.0.0` response. The count and indices are checked against the content id by
/// the receiver, which knows which content it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerResponse {
    /// The peer holds neither a verified layer nor claimed chaining values.
    NotFound,
    /// The verified piece layer: one 32-byte BLAKE3 chaining value per piece.
    Full(Vec<[u8; 32]>),
    /// Chaining values the peer computed from origin bytes, as `(piece, value)` with strictly
    /// increasing pieces: a claim, to be checked by merging into the content id.
    Partial(Vec<(PieceIndex, [u8; 32])>),
}

impl Message for LayerResponse {
    const NAME: &'static str = "LayerResponse";
    const MAX_LEN_BYTES: usize = MAX_PIECES as usize * (32 + 5) + ENVELOPE_BYTES;

    fn encode(&self) -> Vec<u8> {
        match self {
            Self::Full(cvs) => proto::LayerResponse {
                chaining_values: cvs.iter().flatten().copied().collect::<Vec<u8>>().into(),
                found: true,
                indices: Vec::new(),
            },
            Self::Partial(entries) => proto::LayerResponse {
                chaining_values: entries
                    .iter()
                    .flat_map(|(_, cv)| cv.iter().copied())
                    .collect::<Vec<u8>>()
                    .into(),
                found: false,
                indices: entries.iter().map(|(i, _)| *i).collect(),
            },
            Self::NotFound => proto::LayerResponse::default(),
        }
        .encode_to_vec()
    }

    fn decode(body: Bytes) -> Result<Self, DecodeError> {
        check_len::<Self>(&body)?;
        let msg = proto::LayerResponse::decode(body).map_err(malformed(Self::NAME))?;
        if msg.chaining_values.len() % 32 != 0 {
            return Err(invalid(Self::NAME, "chaining_values"));
        }
        let cvs: Vec<[u8; 32]> = msg
            .chaining_values
            .chunks_exact(32)
            .map(|c| {
                let mut cv = [0u8; 32];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        if msg.found {
            if !msg.indices.is_empty() {
                return Err(invalid(Self::NAME, "indices"));
            }
            return Ok(Self::Full(cvs));
        }
        if msg.indices.is_empty() {
            return if cvs.is_empty() {
                Ok(Self::NotFound)
            } else {
                Err(invalid(Self::NAME, "chaining_values"))
            };
        }
        if msg.indices.len() != cvs.len() || msg.indices.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(Self::NAME, "indices"));
        }
        Ok(Self::Partial(msg.indices.into_iter().zip(cvs).collect()))
    }
}

/// `/shoal/piece/2.0.0` request (one of many on a piece stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceRequest {
    /// The content the piece belongs to.
    pub content_id: ContentId,
    /// The piece's index; less than the content's piece count.
    pub index: PieceIndex,
}

impl Message for PieceRequest {
    const NAME: &'static str = "PieceRequest";
    const MAX_LEN_BYTES: usize = ENVELOPE_BYTES;

    fn response_limit_bytes(&self) -> Option<usize> {
        let range = self.content_id.piece_range(self.index)?;
        usize::try_from(range.end - range.start)
            .ok()
            .map(|len| len + ENVELOPE_BYTES)
    }

    fn encode(&self) -> Vec<u8> {
        proto::PieceRequest {
            content_id: Some(cid_to_proto(&self.content_id)),
            index: self.index,
        }
        .encode_to_vec()
    }

    fn decode(body: Bytes) -> Result<Self, DecodeError> {
        check_len::<Self>(&body)?;
        let msg = proto::PieceRequest::decode(body).map_err(malformed(Self::NAME))?;
        let content_id = cid_from_proto(msg.content_id, Self::NAME)?;
        if msg.index >= content_id.piece_count() {
            return Err(invalid(Self::NAME, "index"));
        }
        Ok(Self {
            content_id,
            index: msg.index,
        })
    }
}

/// `/shoal/piece/2.0.0` response (one of many on a piece stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceResponse {
    /// The piece's bytes. The receiver checks the length and the chaining value.
    Data(Bytes),
    /// The peer does not hold this verified piece.
    NotFound,
    /// The peer is at its upload limit.
    Busy,
}

impl Message for PieceResponse {
    const NAME: &'static str = "PieceResponse";
    const MAX_LEN_BYTES: usize = MAX_PIECE_SIZE_BYTES as usize + ENVELOPE_BYTES;

    fn encode(&self) -> Vec<u8> {
        use proto::piece_response::Status;
        let (status, data) = match self {
            Self::Data(d) => (Status::Ok, d.clone()),
            Self::NotFound => (Status::NotFound, Bytes::new()),
            Self::Busy => (Status::Busy, Bytes::new()),
        };
        proto::PieceResponse {
            status: status as i32,
            data,
        }
        .encode_to_vec()
    }

    /// A piece travels as the head (status, data tag and length) then the piece's bytes
    /// themselves, so serving a piece does not copy it.
    fn encode_parts(&self) -> (Vec<u8>, Bytes) {
        let data = match self {
            Self::Data(data) if !data.is_empty() => data,
            _ => return (self.encode(), Bytes::new()),
        };
        // Field 1 (status) is OK = 0, the proto3 default, and is omitted as prost would.
        // Field 2 (data): key 2 << 3 | 2 (length-delimited), varint length, the bytes.
        let mut head = vec![0x12];
        let (len, n) = crate::frame::encode_prefix(data.len() as u64);
        head.extend_from_slice(&len[..n]);
        (head, data.clone())
    }

    fn decode(body: Bytes) -> Result<Self, DecodeError> {
        use proto::piece_response::Status;
        check_len::<Self>(&body)?;
        let msg = proto::PieceResponse::decode(body).map_err(malformed(Self::NAME))?;
        match Status::try_from(msg.status) {
            Ok(Status::Ok) => Ok(Self::Data(msg.data)),
            Ok(Status::NotFound) => Ok(Self::NotFound),
            Ok(Status::Busy) => Ok(Self::Busy),
            Err(_) => Err(invalid(Self::NAME, "status")),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
        let body = Bytes::from(m.encode());
        assert!(body.len() <= M::MAX_LEN_BYTES);
        assert_eq!(&M::decode(body).unwrap(), m);
    }

    fn id(len: u64) -> ContentId {
        ContentId::new([7; 32], len).unwrap()
    }

    #[test]
    fn have_keys_print_and_parse() {
        let b = HaveKey::Blake3([0xab; 32]);
        let s = HaveKey::Sha256(Sha256Digest([0x01; 32]));
        for k in [b, s] {
            assert_eq!(k.to_string().parse::<HaveKey>().unwrap(), k);
        }
        assert_eq!(
            format!("{}:1000", "ab".repeat(32))
                .parse::<HaveKey>()
                .unwrap(),
            b
        );
        assert_eq!("ab".repeat(32).parse::<HaveKey>().unwrap(), b);
        for bad in [
            "",
            "sha256:12",
            "blake3:zz",
            "abc:12",
            &format!("{}:x", "ab".repeat(32)),
        ] {
            assert!(bad.parse::<HaveKey>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn messages_round_trip() {
        round_trip(&HaveRequest::new(HaveKey::Blake3([5; 32])));
        round_trip(&HaveRequest::new(HaveKey::Sha256(Sha256Digest([9; 32]))));
        round_trip(&HaveResponse(None));
        let mut bits = Bitfield::new(id(100_000).piece_count());
        bits.set(3);
        round_trip(&HaveResponse(Some(Holding::verified(
            id(100_000),
            bits.clone(),
        ))));
        let mut other = Bitfield::new(id(100_000).piece_count());
        other.set(1);
        round_trip(&HaveResponse(Some(Holding {
            content_id: id(100_000),
            have: Bitfield::new(id(100_000).piece_count()),
            fetching: bits.clone(),
            claimed: other.clone(),
            chaining: other.clone(),
            members: vec![Member {
                peer_id: Bytes::from_static(&[0, 36, 8, 1]),
                heartbeat: 1_700_000_000_123,
                done: 7,
                origin: true,
            }],
        })));
        // Relayed chaining values beyond the claims; an old peer's empty field reads as claimed.
        round_trip(&HaveResponse(Some(Holding {
            content_id: id(100_000),
            have: Bitfield::new(id(100_000).piece_count()),
            fetching: bits.clone(),
            claimed: other.clone(),
            chaining: Bitfield::full(id(100_000).piece_count()),
            members: Vec::new(),
        })));
        let old_peer = proto::HaveResponse {
            content_id: Some(cid_to_proto(&id(100_000))),
            bitfield: Bytes::copy_from_slice(bits.as_bytes()),
            claimed: Bytes::copy_from_slice(other.as_bytes()),
            ..Default::default()
        };
        let got = HaveResponse::decode(Bytes::from(old_peer.encode_to_vec())).unwrap();
        assert_eq!(got.0.map(|h| h.chaining), Some(other.clone()));
        round_trip(&HaveRequest::new(HaveKey::Blake3([5; 32])));
        round_trip(&HaveRequest {
            key: HaveKey::Sha256(Sha256Digest([6; 32])),
            origin_url: Some("https://example.org/a.iso".into()),
        });
        round_trip(&LayerRequest {
            content_id: id(1),
            partial: true,
            want: None,
        });
        let mut want = Bitfield::new(id(40_000).piece_count());
        want.set(1);
        round_trip(&LayerRequest {
            content_id: id(40_000),
            partial: true,
            want: Some(want),
        });
        round_trip(&LayerResponse::NotFound);
        round_trip(&Ack);
        round_trip(&LayerResponse::Full(vec![[1; 32], [2; 32]]));
        round_trip(&LayerResponse::Partial(vec![(0, [1; 32]), (7, [2; 32])]));
        round_trip(&PieceRequest {
            content_id: id(40_000),
            index: 2,
        });
        round_trip(&PieceResponse::Data(Bytes::from_static(b"abc")));
        round_trip(&PieceResponse::NotFound);
        round_trip(&PieceResponse::Busy);
    }

    #[test]
    fn piece_parts_equal_the_prost_encoding() {
        for len in [0usize, 1, 127, 128, 1 << 20] {
            let m = PieceResponse::Data(Bytes::from(vec![9u8; len]));
            let (mut head, bulk) = m.encode_parts();
            head.extend_from_slice(&bulk);
            assert_eq!(head, m.encode(), "length {len}");
        }
        let (head, bulk) = PieceResponse::Busy.encode_parts();
        assert_eq!((head, bulk.len()), (PieceResponse::Busy.encode(), 0));
    }

    #[test]
    fn the_largest_messages_fit_their_limits() {
        let big = ContentId::new([0; 32], MAX_CONTENT_LEN_BYTES).unwrap();
        round_trip(&HaveResponse(Some(Holding {
            content_id: big,
            have: Bitfield::full(big.piece_count()),
            fetching: Bitfield::full(big.piece_count()),
            claimed: Bitfield::new(big.piece_count()),
            chaining: Bitfield::full(big.piece_count()),
            members: vec![
                Member {
                    peer_id: Bytes::from(vec![0xff; MAX_MEMBER_ID_BYTES]),
                    heartbeat: u64::MAX,
                    done: big.piece_count(),
                    origin: true,
                };
                MAX_MEMBERS
            ],
        })));
        round_trip(&HaveRequest {
            key: HaveKey::Blake3([1; 32]),
            origin_url: Some("x".repeat(MAX_ORIGIN_URL_BYTES)),
        });
        round_trip(&LayerRequest {
            content_id: big,
            partial: true,
            want: Some(Bitfield::full(big.piece_count())),
        });
        round_trip(&LayerResponse::Full(vec![
            [3; 32];
            big.piece_count() as usize
        ]));
        round_trip(&LayerResponse::Partial(
            (0..big.piece_count()).map(|i| (i, [4; 32])).collect(),
        ));
        round_trip(&PieceResponse::Data(Bytes::from(vec![
            0u8;
            MAX_PIECE_SIZE_BYTES
                as usize
        ])));
    }

    #[test]
    fn invalid_fields_are_typed_errors() {
        let body = Bytes::from(
            proto::PieceRequest {
                content_id: Some(cid_to_proto(&id(40_000))),
                index: 3,
            }
            .encode_to_vec(),
        );
        assert_eq!(
            PieceRequest::decode(body),
            Err(invalid("PieceRequest", "index"))
        );
        let body = Bytes::from(
            proto::HaveResponse {
                content_id: Some(proto::ContentId {
                    blake3: Bytes::from_static(&[1; 31]),
                    length: 1,
                }),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(
            HaveResponse::decode(body),
            Err(invalid("HaveResponse", "content_id.blake3"))
        );
        // A `want` bitfield of the wrong length.
        let body = Bytes::from(
            proto::LayerRequest {
                content_id: Some(cid_to_proto(&id(40_000))),
                partial: true,
                want: Bytes::from_static(&[0xff; 2]),
            }
            .encode_to_vec(),
        );
        assert_eq!(
            LayerRequest::decode(body),
            Err(invalid("LayerRequest", "want"))
        );
        // A fetching bitfield of the wrong length.
        let body = Bytes::from(
            proto::HaveResponse {
                content_id: Some(cid_to_proto(&id(100_000))),
                bitfield: Bytes::from_static(&[0]),
                fetching: Bytes::from_static(&[0, 0, 0]),
                claimed: Bytes::new(),
                chaining: Bytes::new(),
                members: Vec::new(),
            }
            .encode_to_vec(),
        );
        assert_eq!(
            HaveResponse::decode(body),
            Err(invalid("HaveResponse", "fetching"))
        );
        // Members: too many, an empty or oversized peer id, more pieces done than exist.
        let member = proto::Member {
            peer_id: Bytes::from_static(&[1; 38]),
            heartbeat: 5,
            done: 1,
            origin: true,
        };
        let bad_members = [
            vec![member.clone(); MAX_MEMBERS + 1],
            vec![proto::Member {
                peer_id: Bytes::new(),
                ..member.clone()
            }],
            vec![proto::Member {
                peer_id: Bytes::from(vec![1; MAX_MEMBER_ID_BYTES + 1]),
                ..member.clone()
            }],
            vec![proto::Member {
                done: id(100_000).piece_count() + 1,
                ..member.clone()
            }],
        ];
        for members in bad_members {
            let body = Bytes::from(
                proto::HaveResponse {
                    content_id: Some(cid_to_proto(&id(100_000))),
                    bitfield: Bytes::from(vec![0; id(100_000).piece_count().div_ceil(8) as usize]),
                    members,
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            assert_eq!(
                HaveResponse::decode(body),
                Err(invalid("HaveResponse", "members"))
            );
        }
        let body = Bytes::from(
            proto::HaveRequest {
                key: Some(proto::have_request::Key::Blake3(Bytes::from_static(
                    &[1; 32],
                ))),
                origin_url: "x".repeat(MAX_ORIGIN_URL_BYTES + 1),
            }
            .encode_to_vec(),
        );
        assert_eq!(
            HaveRequest::decode(body),
            Err(invalid("HaveRequest", "origin_url"))
        );
        // Partial layers: indices must increase and match the values one to one.
        for indices in [vec![3, 3], vec![4, 2], vec![1]] {
            let body = Bytes::from(
                proto::LayerResponse {
                    chaining_values: Bytes::from_static(&[0; 64]),
                    found: false,
                    indices,
                }
                .encode_to_vec(),
            );
            assert_eq!(
                LayerResponse::decode(body),
                Err(invalid("LayerResponse", "indices"))
            );
        }
        assert_eq!(
            HaveRequest::decode(Bytes::new()),
            Err(invalid("HaveRequest", "key"))
        );
        let body = Bytes::from(
            proto::LayerResponse {
                chaining_values: Bytes::from_static(&[0; 33]),
                found: true,
                indices: Vec::new(),
            }
            .encode_to_vec(),
        );
        assert!(LayerResponse::decode(body).is_err());
    }

    #[test]
    fn oversized_bodies_are_refused_before_parsing() {
        let body = Bytes::from(vec![0u8; HaveRequest::MAX_LEN_BYTES + 1]);
        assert!(matches!(
            HaveRequest::decode(body),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_bodies_are_errors() {
        let full = PieceResponse::Data(Bytes::from(vec![5u8; 1000])).encode();
        for cut in [1, 2, 10, full.len() - 1] {
            assert!(PieceResponse::decode(Bytes::copy_from_slice(&full[..cut])).is_err());
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let b = Bytes::from(data);
            let _ = HaveRequest::decode(b.clone());
            let _ = HaveResponse::decode(b.clone());
            let _ = LayerRequest::decode(b.clone());
            let _ = LayerResponse::decode(b.clone());
            let _ = PieceRequest::decode(b.clone());
            let _ = PieceResponse::decode(b);
        }
    }
}
