//! The swarm id of content known only by its SHA-256.

use shoal_protocol::{ContentId, Sha256Digest, id::ParseError};

/// The key-derivation context of [`sha256_swarm_id`] (BLAKE3's `derive_key` mode, BLAKE3
/// paper §5.2: a context string fixed at design time, unique to this use).
pub const SHA256_SWARM_CONTEXT: &str =
    "shoal 2026-12-02 swarm id of content known by its SHA-256 v1";

/// The id under which nodes that know a file only by its SHA-256 (`sha256`) and its length
/// (`length` bytes, from the origin) share its pieces before any of them has verified it:
/// `BLAKE3-derive_key(SHA256_SWARM_CONTEXT, sha256 ‖ length as 8 little-endian bytes)` and the
/// length, in the shape of a content id so that have answers, piece and layer requests and the
/// member view carry it as they carry a content id.
///
/// It is not the BLAKE3 hash of any file (finding a file whose hash it is would be a BLAKE3
/// preimage), so a piece is never verified against it: pieces shared under it are checked
/// against the whole file's SHA-256 once every piece is in (decision 0016).
///
/// # Errors
/// [`ParseError::TooLong`] when `length` exceeds the largest content.
pub fn sha256_swarm_id(sha256: &Sha256Digest, length: u64) -> Result<ContentId, ParseError> {
    let mut input = [0u8; 40];
    input[..32].copy_from_slice(&sha256.0);
    input[32..].copy_from_slice(&length.to_le_bytes());
    ContentId::new(blake3::derive_key(SHA256_SWARM_CONTEXT, &input), length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swarm_id_depends_on_the_digest_and_the_length_and_is_not_the_contents_hash() {
        let bytes = b"hello";
        let sha = crate::Sha256Stream::new();
        let mut sha = sha;
        sha.update(bytes);
        let d = sha.finish();
        let id = sha256_swarm_id(&d, 5).unwrap();
        assert_eq!(id, sha256_swarm_id(&d, 5).unwrap(), "deterministic");
        assert_ne!(id, sha256_swarm_id(&d, 6).unwrap(), "the length counts");
        assert_ne!(id, sha256_swarm_id(&Sha256Digest([0; 32]), 5).unwrap());
        assert_ne!(id.hash(), blake3::hash(bytes).as_bytes());
        assert_eq!(id.length(), 5);
        assert!(sha256_swarm_id(&d, u64::MAX).is_err());
    }
}
