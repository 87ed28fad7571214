//! Whole-file digests and the validation state.

use std::io::Read;

use sha2::{Digest as _, Sha256};
use shoal_protocol::{ContentId, Sha256Digest, piece_size_for};

use crate::{Error, LayerBuilder, PieceLayer};

/// The caller's verdict on a transferred file, as in BITS `IBackgroundCopyFile3::SetValidationState`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ValidationState {
    /// No verdict yet.
    #[default]
    Unknown,
    /// The caller accepted the file.
    Valid,
    /// The caller rejected the file: content from peers is fetched again from the origin,
    /// content from the origin puts the job in Error.
    Invalid,
}

/// Streaming SHA-256 (FIPS 180-4) over a file's bytes in order.
#[derive(Clone, Debug, Default)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    /// A fresh stream.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything fed.
    #[must_use]
    pub fn finish(self) -> Sha256Digest {
        Sha256Digest(self.0.finalize().into())
    }
}

/// The digests a job expects for a file. Either, both or none may be given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    /// The expected BLAKE3 hash (the content id's hash).
    pub blake3: Option<[u8; 32]>,
    /// The expected SHA-256.
    pub sha256: Option<Sha256Digest>,
}

impl Expected {
    /// True when no digest is given: nothing from peers can be trusted.
    #[must_use]
    pub fn is_none(&self) -> bool {
        self.blake3.is_none() && self.sha256.is_none()
    }

    /// Checks a content id against the expected BLAKE3 hash, if any.
    ///
    /// # Errors
    /// [`Error::Blake3Mismatch`].
    pub fn check_content_id(&self, id: &ContentId) -> Result<(), Error> {
        match self.blake3 {
            Some(h) if h != *id.hash() => Err(Error::Blake3Mismatch {
                expected: hex::encode(h),
                actual: id.hash_hex(),
            }),
            _ => Ok(()),
        }
    }

    /// Checks a computed SHA-256 against the expected one, if any.
    ///
    /// # Errors
    /// [`Error::Sha256Mismatch`].
    pub fn check_sha256(&self, actual: Sha256Digest) -> Result<(), Error> {
        match self.sha256 {
            Some(expected) if expected != actual => Err(Error::Sha256Mismatch { expected, actual }),
            _ => Ok(()),
        }
    }
}

/// Everything Shoal computes about a whole file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDigests {
    /// The piece layer, which carries the content id.
    pub layer: PieceLayer,
    /// The SHA-256 of the whole file.
    pub sha256: Sha256Digest,
}

impl FileDigests {
    /// The content id.
    #[must_use]
    pub fn content_id(&self) -> ContentId {
        self.layer.content_id()
    }

    /// Whether these are the digests of content `id` and, when given, of SHA-256 `sha256`: a
    /// copy, a cached file or a renamed file is still the verified content.
    #[must_use]
    pub fn is(&self, id: &ContentId, sha256: Option<Sha256Digest>) -> bool {
        self.content_id() == *id && sha256.is_none_or(|s| s == self.sha256)
    }
}

/// Hashes a whole file of `length` bytes from `reader` in one pass: content id, piece layer and
/// SHA-256. Memory is one piece (at most [`shoal_protocol::MAX_PIECE_SIZE_BYTES`]).
///
/// # Errors
/// [`Error::Io`] when reading fails or the reader ends before `length` bytes,
/// [`Error::TooLong`] beyond the maximum length.
pub fn hash_reader(mut reader: impl Read, length: u64) -> Result<FileDigests, Error> {
    let mut builder = LayerBuilder::new(length)?;
    let piece_size = piece_size_for(length);
    let mut sha = Sha256Stream::new();
    let mut buf = vec![0u8; piece_size.min(length) as usize];
    let mut offset = 0u64;
    let mut index = 0u32;
    while offset < length {
        let n = piece_size.min(length - offset) as usize;
        reader.read_exact(&mut buf[..n])?;
        sha.update(&buf[..n]);
        builder.add_piece(index, &buf[..n])?;
        offset += n as u64;
        index += 1;
    }
    let layer = builder
        .finish()
        .ok_or_else(|| Error::Io(std::io::ErrorKind::UnexpectedEof.into()))?;
    Ok(FileDigests {
        layer,
        sha256: sha.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_reader_matches_the_standard_functions() {
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let d = hash_reader(&bytes[..], bytes.len() as u64).unwrap();
        assert_eq!(d.content_id().hash(), blake3::hash(&bytes).as_bytes());
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(d.sha256, Sha256Digest(sha));
        // Known vector: SHA-256 of "abc".
        let mut s = Sha256Stream::new();
        s.update(b"abc");
        assert_eq!(
            s.finish().to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(hash_reader(&bytes[..10], 11).is_err());
        // A copy is the verified content only with the same content id and, when one is
        // expected, the same SHA-256.
        assert!(d.is(&d.content_id(), None));
        assert!(d.is(&d.content_id(), Some(d.sha256)));
        assert!(!d.is(&d.content_id(), Some(Sha256Digest([0; 32]))));
        let other = hash_reader(&bytes[1..], bytes.len() as u64 - 1).unwrap();
        assert!(!other.is(&d.content_id(), None));
    }

    #[test]
    fn expected_digests_are_checked() {
        let id = ContentId::new([1; 32], 5).unwrap();
        let e = Expected {
            blake3: Some([2; 32]),
            sha256: Some(Sha256Digest([3; 32])),
        };
        assert!(e.check_content_id(&id).is_err());
        assert!(e.check_sha256(Sha256Digest([4; 32])).is_err());
        assert!(e.check_sha256(Sha256Digest([3; 32])).is_ok());
        assert!(Expected::default().check_content_id(&id).is_ok());
    }
}
