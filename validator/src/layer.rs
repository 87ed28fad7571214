//! The BLAKE3 piece layer.
//!
//! Pieces are power-of-two sized and at least one BLAKE3 chunk, so each is a complete subtree of
//! the file's BLAKE3 tree, and its chaining value ("CV", BLAKE3 paper section 2.1) can be
//! computed on its own with `HasherExt::set_input_offset` and `finalize_non_root`. Merging the
//! CVs pairwise up the tree, splitting each span where BLAKE3 does
//! (`blake3::hazmat::left_subtree_len`), gives the root hash: the content id.
//!
//! A file of zero or one piece has no interior tree above its pieces: its piece layer is empty and
//! its single piece is checked against the content id directly.

use blake3::hazmat::{
    HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use shoal_protocol::{ContentId, PieceIndex};

use crate::Error;

/// A 32-byte BLAKE3 chaining value.
pub type ChainingValue = [u8; 32];

/// The chaining value of a piece that starts `offset` bytes into a file of more than one piece.
///
/// The caller must pass a piece-aligned `offset` and a whole piece; [`PieceLayer`] and
/// [`LayerBuilder`] do.
#[must_use]
pub fn piece_chaining_value(offset: u64, bytes: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(bytes);
    hasher.finalize_non_root()
}

/// Chaining values from their concatenation (32 bytes each, as a piece layer is stored).
///
/// # Errors
/// [`Error::LayerBytes`] when `flat`'s length is not a multiple of 32.
pub fn chaining_values_from_bytes(flat: &[u8]) -> Result<Vec<ChainingValue>, Error> {
    if !flat.len().is_multiple_of(32) {
        return Err(Error::LayerBytes(flat.len()));
    }
    Ok(flat
        .chunks_exact(32)
        .map(|c| {
            let mut cv = [0u8; 32];
            cv.copy_from_slice(c);
            cv
        })
        .collect())
}

/// Checks that piece `index`, `bytes` starting `offset` bytes into a file of more than one
/// piece, still has the chaining value `cv` it verified with (bytes read back from a file
/// someone else may write).
///
/// # Errors
/// [`Error::PieceMismatch`] when the bytes hash differently.
pub fn check_piece(
    index: PieceIndex,
    offset: u64,
    bytes: &[u8],
    cv: &ChainingValue,
) -> Result<(), Error> {
    if piece_chaining_value(offset, bytes) == *cv {
        Ok(())
    } else {
        Err(Error::PieceMismatch { index })
    }
}

/// Merges the CVs of consecutive pieces spanning `span` bytes into one CV (`root == false`) or
/// into the root hash (`root == true`). Needs at least two CVs when `root`.
fn merge(cvs: &[ChainingValue], piece_size: u64, span: u64, root: bool) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left_span = left_subtree_len(span);
    let left_count = (left_span / piece_size) as usize;
    let left = merge(&cvs[..left_count], piece_size, left_span, false);
    let right = merge(&cvs[left_count..], piece_size, span - left_span, false);
    if root {
        *merge_subtrees_root(&left, &right, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(&left, &right, Mode::Hash)
    }
}

/// The root hash of a file of `length` bytes from its piece layer (two or more CVs).
fn root_of(cvs: &[ChainingValue], length: u64) -> [u8; 32] {
    merge(cvs, shoal_protocol::piece_size_for(length), length, true)
}

/// The layer's CV count for a content id: its piece count, or 0 when it has at most one piece.
fn layer_len(content_id: &ContentId) -> usize {
    match content_id.piece_count() {
        0 | 1 => 0,
        n => n as usize,
    }
}

/// A piece layer verified against its content id.
///
/// The only way to build one is [`PieceLayer::verify`] (for a layer received from a peer) or
/// [`LayerBuilder::finish`] (for bytes hashed here), so holding a `PieceLayer` means its CVs merge
/// into its content id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PieceLayer {
    content_id: ContentId,
    cvs: Vec<ChainingValue>,
}

impl PieceLayer {
    /// Checks a piece layer received from a peer against `content_id`.
    ///
    /// # Errors
    /// [`Error::LayerLength`] when the count is not the content's piece count (0 for files of at
    /// most one piece), [`Error::LayerMismatch`] when the CVs do not merge into the content id.
    pub fn verify(content_id: ContentId, cvs: Vec<ChainingValue>) -> Result<Self, Error> {
        let expected = layer_len(&content_id);
        if cvs.len() != expected {
            return Err(Error::LayerLength {
                content_id,
                expected,
                got: cvs.len(),
            });
        }
        if expected > 0 && root_of(&cvs, content_id.length()) != *content_id.hash() {
            return Err(Error::LayerMismatch(content_id));
        }
        Ok(Self { content_id, cvs })
    }

    /// The content id this layer describes.
    #[must_use]
    pub fn content_id(&self) -> ContentId {
        self.content_id
    }

    /// The chaining values, one per piece (empty for files of at most one piece).
    #[must_use]
    pub fn chaining_values(&self) -> &[ChainingValue] {
        &self.cvs
    }

    /// Whether piece `index`'s chaining value in this layer is `cv` (a value recorded before
    /// the layer was known, checked against it). False for an index out of range.
    #[must_use]
    pub fn agrees(&self, index: PieceIndex, cv: &ChainingValue) -> bool {
        self.cvs.get(index as usize) == Some(cv)
    }

    /// Checks piece `index` against its chaining value (or, for a one-piece file, against the
    /// content id itself).
    ///
    /// # Errors
    /// [`Error::PieceOutOfRange`], [`Error::PieceLength`] when `bytes` is not exactly the piece's
    /// length, [`Error::PieceMismatch`] when the bytes hash differently.
    pub fn verify_piece(&self, index: PieceIndex, bytes: &[u8]) -> Result<(), Error> {
        let range = self
            .content_id
            .piece_range(index)
            .ok_or(Error::PieceOutOfRange {
                index,
                piece_count: self.content_id.piece_count(),
            })?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(Error::PieceLength {
                index,
                expected: range.end - range.start,
                got: bytes.len() as u64,
            });
        }
        let good = if self.cvs.is_empty() {
            blake3::hash(bytes).as_bytes() == self.content_id.hash()
        } else {
            piece_chaining_value(range.start, bytes) == self.cvs[index as usize]
        };
        if good {
            Ok(())
        } else {
            Err(Error::PieceMismatch { index })
        }
    }
}

/// Computes the piece layer of a file whose pieces arrive without one, in any order.
///
/// Each piece's CV is recorded as it arrives ([`LayerBuilder::add_piece`]); once every piece is
/// in, [`LayerBuilder::finish`] merges them into the content id.
#[derive(Clone, Debug)]
pub struct LayerBuilder {
    length: u64,
    piece_size: u64,
    piece_count: u32,
    cvs: Vec<Option<ChainingValue>>,
    /// For a one-piece file the piece's own hash is the root.
    single_root: Option<[u8; 32]>,
}

impl LayerBuilder {
    /// A builder for a file of `length` bytes.
    ///
    /// # Errors
    /// [`Error::TooLong`] beyond [`shoal_protocol::MAX_CONTENT_LEN_BYTES`].
    pub fn new(length: u64) -> Result<Self, Error> {
        let probe = ContentId::new([0; 32], length).map_err(|_| Error::TooLong(length))?;
        Ok(Self {
            length,
            piece_size: probe.piece_size(),
            piece_count: probe.piece_count(),
            cvs: vec![None; probe.piece_count() as usize],
            single_root: None,
        })
    }

    /// Records piece `index`.
    ///
    /// # Errors
    /// [`Error::PieceOutOfRange`] or [`Error::PieceLength`] when the piece does not fit the
    /// file's geometry.
    pub fn add_piece(&mut self, index: PieceIndex, bytes: &[u8]) -> Result<(), Error> {
        let start = u64::from(index) * self.piece_size;
        if index >= self.piece_count {
            return Err(Error::PieceOutOfRange {
                index,
                piece_count: self.piece_count,
            });
        }
        let expected = (start + self.piece_size).min(self.length) - start;
        if bytes.len() as u64 != expected {
            return Err(Error::PieceLength {
                index,
                expected,
                got: bytes.len() as u64,
            });
        }
        if self.piece_count == 1 {
            self.single_root = Some(*blake3::hash(bytes).as_bytes());
        }
        self.cvs[index as usize] = Some(piece_chaining_value(start, bytes));
        Ok(())
    }

    /// Whether piece `index` has been recorded.
    #[must_use]
    pub fn has_piece(&self, index: PieceIndex) -> bool {
        self.cvs.get(index as usize).is_some_and(Option::is_some)
    }

    /// The chaining value recorded for piece `index`, if any. (For a one-piece file this is
    /// the piece's non-root chaining value, not the content hash.)
    #[must_use]
    pub fn chaining_value(&self, index: PieceIndex) -> Option<ChainingValue> {
        self.cvs.get(index as usize).copied().flatten()
    }

    /// Forgets piece `index` (its bytes were discarded).
    pub fn remove_piece(&mut self, index: PieceIndex) {
        if let Some(cv) = self.cvs.get_mut(index as usize) {
            *cv = None;
        }
    }

    /// Merges the recorded CVs into the content id and piece layer; `None` until every piece
    /// has been recorded.
    #[must_use]
    pub fn finish(&self) -> Option<PieceLayer> {
        let hash = match self.piece_count {
            0 => *blake3::hash(&[]).as_bytes(),
            1 => self.single_root?,
            _ => {
                let cvs: Option<Vec<_>> = self.cvs.iter().copied().collect();
                let cvs = cvs?;
                let root = root_of(&cvs, self.length);
                return Some(PieceLayer {
                    content_id: ContentId::new(root, self.length).ok()?,
                    cvs,
                });
            }
        };
        Some(PieceLayer {
            content_id: ContentId::new(hash, self.length).ok()?,
            cvs: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use shoal_protocol::{MIN_PIECE_SIZE_BYTES, piece_size_for};

    use super::*;

    fn data(len: usize) -> Vec<u8> {
        // A simple deterministic pattern that differs between chunks.
        (0..len).map(|i| (i * 31 + i / 1024) as u8).collect()
    }

    fn layer_of(bytes: &[u8]) -> PieceLayer {
        let mut b = LayerBuilder::new(bytes.len() as u64).unwrap();
        let size = piece_size_for(bytes.len() as u64) as usize;
        for (i, piece) in bytes.chunks(size).enumerate() {
            b.add_piece(i as u32, piece).unwrap();
        }
        b.finish().unwrap()
    }

    /// Boundary sizes, each tied to a case of the tree arithmetic.
    const INTERESTING_SIZES: &[(usize, &str)] = &[
        (0, "empty file: no pieces, root is hash of nothing"),
        (1, "one byte: one partial chunk"),
        (1023, "one chunk minus one"),
        (1024, "exactly one chunk"),
        (1025, "two chunks, the second of one byte"),
        (16 * 1024 - 1, "piece minus one"),
        (16 * 1024, "exactly one piece"),
        (
            16 * 1024 + 1,
            "piece plus one: two pieces, the second of one byte",
        ),
        (5 * 16 * 1024, "five pieces: a non-power-of-two piece count"),
        (64 * 16 * 1024, "many pieces, a power of two"),
        (1000 * 16 * 1024 + 77, "many pieces and a partial last one"),
        ((16 << 20) + 1, "first length with 32 KiB pieces"),
    ];

    #[test]
    fn merged_root_equals_blake3_hash() {
        for &(len, case) in INTERESTING_SIZES {
            let bytes = data(len);
            let layer = layer_of(&bytes);
            assert_eq!(
                layer.content_id().hash(),
                blake3::hash(&bytes).as_bytes(),
                "{case}"
            );
            assert_eq!(layer.content_id().length(), len as u64, "{case}");
            // A received copy of the layer verifies, and so does every piece.
            let again =
                PieceLayer::verify(layer.content_id(), layer.chaining_values().to_vec()).unwrap();
            let size = piece_size_for(len as u64) as usize;
            for (i, piece) in bytes.chunks(size).enumerate() {
                again.verify_piece(i as u32, piece).unwrap();
            }
        }
    }

    #[test]
    fn a_tampered_layer_or_piece_is_refused() {
        let bytes = data(5 * MIN_PIECE_SIZE_BYTES as usize + 3);
        let layer = layer_of(&bytes);
        let mut cvs = layer.chaining_values().to_vec();
        cvs[2][0] ^= 1;
        assert!(matches!(
            PieceLayer::verify(layer.content_id(), cvs),
            Err(Error::LayerMismatch(_))
        ));
        assert!(matches!(
            PieceLayer::verify(layer.content_id(), vec![[0; 32]; 3]),
            Err(Error::LayerLength {
                expected: 6,
                got: 3,
                ..
            })
        ));
        let mut piece = bytes[..MIN_PIECE_SIZE_BYTES as usize].to_vec();
        piece[100] ^= 0x40;
        assert!(matches!(
            layer.verify_piece(0, &piece),
            Err(Error::PieceMismatch { index: 0 })
        ));
        assert!(matches!(
            layer.verify_piece(0, &piece[1..]),
            Err(Error::PieceLength { .. })
        ));
        assert!(matches!(
            layer.verify_piece(6, &piece),
            Err(Error::PieceOutOfRange { .. })
        ));
        // A piece moved to another index does not verify either.
        let p1 = &bytes[MIN_PIECE_SIZE_BYTES as usize..2 * MIN_PIECE_SIZE_BYTES as usize];
        assert!(layer.verify_piece(2, p1).is_err());
    }

    #[test]
    fn a_recorded_chaining_value_agrees_only_with_its_own_piece() {
        let bytes = data(5 * 16 * 1024);
        let layer = layer_of(&bytes);
        let cvs = layer.chaining_values().to_vec();
        assert!(layer.agrees(2, &cvs[2]));
        assert!(!layer.agrees(3, &cvs[2]));
        assert!(!layer.agrees(2, &[0; 32]));
        assert!(!layer.agrees(5, &cvs[4]), "out of range");
    }

    #[test]
    fn one_piece_files_verify_against_the_content_id() {
        let bytes = data(1000);
        let layer = layer_of(&bytes);
        assert!(layer.chaining_values().is_empty());
        layer.verify_piece(0, &bytes).unwrap();
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(layer.verify_piece(0, &bad).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_length_merges_to_the_standard_hash(len in 0usize..(40 * 16 * 1024), seed in any::<u8>()) {
            let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
            prop_assert_eq!(*layer_of(&bytes).content_id().hash(), *blake3::hash(&bytes).as_bytes());
        }
    }
}
