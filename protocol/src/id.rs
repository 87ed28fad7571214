//! Content identity: [`ContentId`], [`Sha256Digest`] and piece geometry.
//!
//! A file's content id is its standard BLAKE3-256 hash (exactly what `b3sum` prints) together
//! with its length in bytes. The piece size is a function of the length alone
//! ([`piece_size_for`]), so every node cuts a file into the same pieces without negotiation.

use std::{fmt, ops::Range, str::FromStr};

use thiserror::Error;

/// The smallest piece size, in bytes (16 KiB).
pub const MIN_PIECE_SIZE_BYTES: u64 = 16 * 1024;
/// The largest piece size, in bytes (16 MiB).
pub const MAX_PIECE_SIZE_BYTES: u64 = 16 * 1024 * 1024;
/// The number of pieces the piece size formula aims at: a file is cut into at most this many
/// pieces unless that would need pieces larger than [`MAX_PIECE_SIZE_BYTES`].
pub const TARGET_PIECE_COUNT: u64 = 1024;
/// The largest file Shoal transfers, in bytes (1 TiB): at [`MAX_PIECE_SIZE_BYTES`] per piece that
/// is 65 536 pieces, which bounds the piece layer and bitfield messages.
pub const MAX_CONTENT_LEN_BYTES: u64 = 1 << 40;

/// The zero-based index of a piece within a file.
pub type PieceIndex = u32;

/// The piece size in bytes for a file of `length` bytes.
///
/// The formula: the smallest power of two that cuts the file into at most
/// [`TARGET_PIECE_COUNT`] pieces, clamped to
/// [`MIN_PIECE_SIZE_BYTES`]..=[`MAX_PIECE_SIZE_BYTES`]. Because the result is a power of two and
/// at least one BLAKE3 chunk (1024 bytes), every piece is a complete subtree of the file's BLAKE3
/// tree (BLAKE3 paper, section 2.1), which is what makes the piece layer possible.
///
/// ```
/// use shoal_protocol::piece_size_for;
/// assert_eq!(piece_size_for(0), 16 * 1024);
/// assert_eq!(piece_size_for(1 << 30), 1 << 20); // 1 GiB file: 1 MiB pieces, 1024 of them
/// assert_eq!(piece_size_for(1 << 40), 16 << 20);
/// ```
#[must_use]
pub fn piece_size_for(length: u64) -> u64 {
    length
        .div_ceil(TARGET_PIECE_COUNT)
        .next_power_of_two()
        .clamp(MIN_PIECE_SIZE_BYTES, MAX_PIECE_SIZE_BYTES)
}

/// A parse error for a hex digest or a content id.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// The text is not 64 hexadecimal digits.
    #[error("a digest must be 64 hexadecimal digits, got {0:?}")]
    BadHex(String),
    /// The length part of a `HASH:LENGTH` content id is not a number.
    #[error("bad length in content id {0:?}")]
    BadLength(String),
    /// The length exceeds [`MAX_CONTENT_LEN_BYTES`].
    #[error("length {0} bytes exceeds the maximum of {max} bytes", max = MAX_CONTENT_LEN_BYTES)]
    TooLong(u64),
}

fn parse_hex32(text: &str) -> Result<[u8; 32], ParseError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|_| ParseError::BadHex(text.to_owned()))?;
    Ok(out)
}

/// A file's content id: its BLAKE3-256 hash and its length in bytes.
///
/// Displayed and parsed as `HEX:LENGTH`, where `HEX` is what `b3sum` prints.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId {
    hash: [u8; 32],
    length: u64,
}

impl ContentId {
    /// Builds a content id from a BLAKE3 hash and a length in bytes.
    ///
    /// # Errors
    /// [`ParseError::TooLong`] when `length` exceeds [`MAX_CONTENT_LEN_BYTES`].
    pub fn new(hash: [u8; 32], length: u64) -> Result<Self, ParseError> {
        if length > MAX_CONTENT_LEN_BYTES {
            return Err(ParseError::TooLong(length));
        }
        Ok(Self { hash, length })
    }

    /// The BLAKE3-256 hash of the whole file.
    #[must_use]
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The hash as 64 lowercase hex digits, as `b3sum` prints it.
    #[must_use]
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// The file's length in bytes.
    #[must_use]
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The piece size in bytes ([`piece_size_for`] of the length).
    #[must_use]
    pub fn piece_size(&self) -> u64 {
        piece_size_for(self.length)
    }

    /// The number of pieces: `ceil(length / piece_size)`, so 0 for an empty file.
    #[must_use]
    pub fn piece_count(&self) -> u32 {
        // The length is at most MAX_CONTENT_LEN_BYTES, so the count is at most 65 536.
        u32::try_from(self.length.div_ceil(self.piece_size())).unwrap_or(u32::MAX)
    }

    /// The byte range `start..end` of piece `index` within the file, or `None` when the index is
    /// out of range.
    #[must_use]
    pub fn piece_range(&self, index: PieceIndex) -> Option<Range<u64>> {
        if index >= self.piece_count() {
            return None;
        }
        let start = u64::from(index) * self.piece_size();
        Some(start..(start + self.piece_size()).min(self.length))
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hash_hex(), self.length)
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

impl FromStr for ContentId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hash, length) = s
            .split_once(':')
            .ok_or_else(|| ParseError::BadLength(s.to_owned()))?;
        let length = length
            .parse::<u64>()
            .map_err(|_| ParseError::BadLength(s.to_owned()))?;
        Self::new(parse_hex32(hash)?, length)
    }
}

/// A SHA-256 digest (FIPS 180-4), 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({self})")
    }
}

impl FromStr for Sha256Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(Self)
    }
}

/// Parses 64 hex digits into a 32-byte BLAKE3 hash.
///
/// # Errors
/// [`ParseError::BadHex`] when `text` is not 64 hex digits.
pub fn parse_blake3_hex(text: &str) -> Result<[u8; 32], ParseError> {
    parse_hex32(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_size_is_a_clamped_power_of_two() {
        for length in [
            0,
            1,
            1023,
            1024,
            16 << 10,
            (16 << 20) + 1,
            1 << 30,
            5 << 30,
            1 << 40,
        ] {
            let size = piece_size_for(length);
            assert!(size.is_power_of_two());
            assert!((MIN_PIECE_SIZE_BYTES..=MAX_PIECE_SIZE_BYTES).contains(&size));
            if size > MIN_PIECE_SIZE_BYTES && size < MAX_PIECE_SIZE_BYTES {
                assert!(length.div_ceil(size) <= TARGET_PIECE_COUNT);
                assert!(length.div_ceil(size / 2) > TARGET_PIECE_COUNT);
            }
        }
        assert_eq!(piece_size_for(16 << 20), 16 << 10);
        assert_eq!(piece_size_for((16 << 20) + 1), 32 << 10);
    }

    #[test]
    fn piece_ranges_cover_the_file() {
        let id = ContentId::new([0; 32], 3 * (16 << 10) + 5).unwrap();
        assert_eq!(id.piece_count(), 4);
        assert_eq!(id.piece_range(0), Some(0..16384));
        assert_eq!(id.piece_range(3), Some(49152..49157));
        assert_eq!(id.piece_range(4), None);
        assert_eq!(ContentId::new([0; 32], 0).unwrap().piece_count(), 0);
    }

    #[test]
    fn content_id_round_trips_through_text() {
        let id = ContentId::new([0xab; 32], 42).unwrap();
        assert_eq!(id.to_string().parse::<ContentId>().unwrap(), id);
        assert!("zz:1".parse::<ContentId>().is_err());
        assert!(
            format!("{}:x", "ab".repeat(32))
                .parse::<ContentId>()
                .is_err()
        );
        assert_eq!(
            ContentId::new([0; 32], MAX_CONTENT_LEN_BYTES + 1),
            Err(ParseError::TooLong(MAX_CONTENT_LEN_BYTES + 1))
        );
    }
}
