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

    /// Feeds the next bytes of the file. Hashes them in steps of 1 KiB, each after asking the
    /// CPU for the step 4 KiB ahead (x86-64's `prefetcht0`):
    /// bytes that waited in main memory (a piece held for its turn, or read back) then hash
    /// about as fast as bytes in the cache (`tests/examples/hash_locality.rs`;
    /// `docs/benchmarks.md`, sessions 29 and 31).
    pub fn update(&mut self, bytes: &[u8]) {
        self.update_in_steps(bytes, PREFETCH_STEP, PREFETCH_LEAD);
    }

    /// Feeds the next bytes of the file in steps of `step` bytes (at least 1), each after a
    /// prefetch of the step `lead` bytes ahead. [`Sha256Stream::update`] is this with 1 KiB
    /// steps 4 KiB ahead; other sizes are for measuring (`tests/examples/hash_locality.rs`
    /// keeps the 16 KiB steps used before session 31). The digest does not depend on them.
    pub fn update_in_steps(&mut self, bytes: &[u8], step: usize, lead: usize) {
        let step = step.max(1);
        prefetch(&bytes[..bytes.len().min(lead)]);
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + step).min(bytes.len());
            let ahead = (at + lead).min(bytes.len());
            prefetch(&bytes[ahead..(ahead + step).min(bytes.len())]);
            self.0.update(&bytes[at..end]);
            at = end;
        }
    }

    /// The digest of everything fed.
    #[must_use]
    pub fn finish(self) -> Sha256Digest {
        Sha256Digest(self.0.finalize().into())
    }
}

/// Bytes hashed between prefetches ([`Sha256Stream::update`]), bytes.
const PREFETCH_STEP: usize = 1024;
/// How far ahead of the bytes being hashed the prefetches run, bytes.
const PREFETCH_LEAD: usize = 4096;

/// Asks the CPU to bring `bytes` into its caches, one request per 64-byte line, without
/// waiting for them (x86-64's `prefetcht0`; nothing elsewhere). A hint: it reads nothing and
/// never faults. [`Sha256Stream::update_in_steps`] uses it.
#[cfg(target_arch = "x86_64")]
fn prefetch(bytes: &[u8]) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    for line in bytes.chunks(64) {
        // SAFETY: SSE is part of every x86_64 CPU, and a prefetch reads nothing: it is a hint
        // that never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
}

/// Elsewhere, nothing: [`prefetch`] is a hint.
#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_bytes: &[u8]) {}

/// The SHA-256 (FIPS 180-4) of a file whose pieces verify in any order, taken in file order.
///
/// Pieces that come in order are hashed from memory at once; pieces that come early are held
/// while they fit in `hold_bytes` in all and start at most `hold_bytes` after the next piece
/// to hash, and the others are read back from the file when their turn comes. The distance
/// rule keeps the memory for the pieces due soonest: a piece far ahead (a random first piece,
/// BEP 3) would otherwise take the room of the window of pieces right after the next one. A
/// piece read back from a file someone else may have written since it verified is checked
/// again against the chaining value it verified with (BLAKE3, [`crate::check_piece`]): what
/// is hashed must be what verified. `B` is the caller's byte buffer (`Vec<u8>`, `Bytes`). Does
/// no I/O itself: the caller's `read_at(offset, len)` returns the `len` bytes of the file at
/// `offset` (in whatever buffer suits its I/O: an aligned one for `O_DIRECT`, say) and whether
/// someone other than the caller could have changed them (`true` makes the check).
#[derive(Debug)]
pub struct OrderedSha256<B> {
    sha: Sha256Stream,
    piece_size: u64,
    length: u64,
    next: shoal_protocol::PieceIndex,
    /// Pieces ahead of `next`: with their bytes while they fit, else `None` (read back);
    /// with their chaining values.
    later: std::collections::BTreeMap<
        shoal_protocol::PieceIndex,
        (Option<B>, Option<crate::ChainingValue>),
    >,
    /// Bytes held in `later`.
    held: usize,
    hold_bytes: usize,
    /// Pieces read back so far.
    read_back: u32,
}

impl<B: AsRef<[u8]>> OrderedSha256<B> {
    /// For a file of `length` bytes in pieces of `piece_size` bytes, holding at most
    /// `hold_bytes` of early pieces in memory.
    #[must_use]
    pub fn new(piece_size: u64, length: u64, hold_bytes: usize) -> Self {
        Self {
            sha: Sha256Stream::new(),
            piece_size: piece_size.max(1),
            length,
            next: 0,
            later: std::collections::BTreeMap::new(),
            held: 0,
            hold_bytes,
            read_back: 0,
        }
    }

    /// Piece `index` verified: `bytes` when at hand (`None`: it is in the file already), with
    /// the chaining value `cv` it verified with. Hashes every piece whose turn has come.
    ///
    /// # Errors
    /// What `read_at` returns; `InvalidData` when a piece read back from a file others could
    /// change no longer matches its chaining value (the file changed after the piece
    /// verified).
    pub fn add(
        &mut self,
        index: shoal_protocol::PieceIndex,
        bytes: Option<B>,
        cv: Option<crate::ChainingValue>,
        read_at: &mut impl FnMut(u64, usize) -> std::io::Result<(B, bool)>,
    ) -> std::io::Result<()> {
        if index != self.next {
            let ahead = u64::from(index.saturating_sub(self.next)) * self.piece_size;
            let near = ahead <= self.hold_bytes as u64;
            let keep = bytes.filter(|b| near && self.held + b.as_ref().len() <= self.hold_bytes);
            if let Some(b) = &keep {
                self.held += b.as_ref().len();
            }
            self.later.insert(index, (keep, cv));
            return Ok(());
        }
        self.take(bytes, cv, read_at)?;
        while let Some((b, cv)) = self.later.remove(&self.next) {
            if let Some(b) = &b {
                self.held -= b.as_ref().len();
            }
            self.take(b, cv, read_at)?;
        }
        Ok(())
    }

    /// Hashes piece `self.next`, from `bytes` or read back and checked.
    fn take(
        &mut self,
        bytes: Option<B>,
        cv: Option<crate::ChainingValue>,
        read_at: &mut impl FnMut(u64, usize) -> std::io::Result<(B, bool)>,
    ) -> std::io::Result<()> {
        let index = self.next;
        match bytes {
            Some(b) => self.sha.update(b.as_ref()),
            None => {
                let start = u64::from(index) * self.piece_size;
                let len = self.length.saturating_sub(start).min(self.piece_size);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let (read, shared) = read_at(start, len)?;
                let piece = read.as_ref();
                if piece.len() != len {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("piece {index} read back as {} of {len} bytes", piece.len()),
                    ));
                }
                self.read_back += 1;
                if let Some(cv) = cv.filter(|_| shared) {
                    crate::check_piece(index, start, piece, &cv).map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("the temporary file changed after its piece verified: {e}"),
                        )
                    })?;
                }
                self.sha.update(piece);
            }
        }
        self.next += 1;
        Ok(())
    }

    /// How many pieces were read back rather than hashed from memory so far.
    #[must_use]
    pub fn read_back(&self) -> u32 {
        self.read_back
    }

    /// The file's SHA-256, once every piece was hashed; `None` if some never came.
    #[must_use]
    pub fn finish(self) -> Option<Sha256Digest> {
        let count = self.length.div_ceil(self.piece_size);
        (u64::from(self.next) == count).then(|| self.sha.finish())
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

    /// Piece `i` of `file` in pieces of `piece` bytes.
    fn piece_of(file: &[u8], piece: u64, i: u32) -> Vec<u8> {
        let start = u64::from(i) * piece;
        file[start as usize..][..((file.len() as u64 - start).min(piece)) as usize].to_vec()
    }

    #[test]
    fn pieces_in_any_order_hash_as_the_file_and_a_changed_piece_read_back_is_refused() {
        let piece = 16 * 1024u64;
        let file: Vec<u8> = (0..5 * piece + 100).map(|i| (i % 251) as u8).collect();
        let d = hash_reader(&file[..], file.len() as u64).unwrap();
        let cvs = d.layer.chaining_values().to_vec();
        let slice = |i: u32| piece_of(&file, piece, i);
        let run = |disk: &[u8], hold: usize, shared: bool| {
            let mut sha = OrderedSha256::new(piece, file.len() as u64, hold);
            let mut read_at =
                |at: u64, len: usize| Ok((disk[at as usize..][..len].to_vec(), shared));
            // 4 and 2 early with bytes (held while they fit), 3 early without (read back),
            // then 0, 1 and the last.
            for (i, with) in [
                (4, true),
                (2, true),
                (3, false),
                (0, true),
                (1, true),
                (5, true),
            ] {
                let cv = Some(cvs[i as usize]);
                sha.add(i, with.then(|| slice(i)), cv, &mut read_at)?;
            }
            Ok::<_, std::io::Error>(sha.finish())
        };
        for hold in [0, piece as usize, 1 << 20] {
            assert_eq!(
                run(&file, hold, true).unwrap(),
                Some(d.sha256),
                "hold {hold}"
            );
        }
        // Piece 3 changed on disk after it verified, in a file others can write: refused,
        // never hashed.
        let mut changed = file.clone();
        changed[(3 * piece + 7) as usize] ^= 1;
        let e = run(&changed, 1 << 20, true).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        // In a file only the caller writes it is not checked again: hashed as read, so the
        // file's SHA-256 is that of the changed bytes, which the expected digest refuses.
        let changed_sha = hash_reader(&changed[..], changed.len() as u64)
            .unwrap()
            .sha256;
        assert_ne!(changed_sha, d.sha256);
        assert_eq!(run(&changed, 1 << 20, false).unwrap(), Some(changed_sha));
        // A piece that never came: no digest.
        let mut sha = OrderedSha256::new(piece, file.len() as u64, 0);
        let mut none = |_: u64, _: usize| Ok((Vec::new(), true));
        sha.add(0, Some(slice(0)), None, &mut none).unwrap();
        assert_eq!(sha.finish(), None);
        // A read-back that comes short is an error, never hashed as the piece.
        let mut sha = OrderedSha256::new(piece, file.len() as u64, 0);
        let mut short = |at: u64, len: usize| Ok((file[at as usize..][..len - 1].to_vec(), true));
        sha.add(1, Some(slice(1)), None, &mut short).unwrap();
        let e = sha.add(0, Some(slice(0)), None, &mut short).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn pieces_far_ahead_are_read_back_and_leave_the_room_to_the_pieces_due_next() {
        let piece = 16 * 1024u64;
        let file: Vec<u8> = (0..5 * piece + 100).map(|i| (i % 251) as u8).collect();
        let d = hash_reader(&file[..], file.len() as u64).unwrap();
        let slice = |i: u32| piece_of(&file, piece, i);
        // Room for one piece. The last piece (5) comes first, far ahead; then the others
        // out of order, each one ahead of the next to hash.
        let mut sha = OrderedSha256::new(piece, file.len() as u64, piece as usize);
        let mut reads = Vec::new();
        let mut read_at = |at: u64, len: usize| {
            reads.push(at / piece);
            Ok((file[at as usize..][..len].to_vec(), true))
        };
        for i in [5, 1, 0, 3, 2, 4] {
            sha.add(i, Some(slice(i)), None, &mut read_at).unwrap();
        }
        assert_eq!(sha.read_back(), 1);
        assert_eq!(sha.finish(), Some(d.sha256));
        // Held first-come, piece 5 would have taken the room for good and 1 and 3 would have
        // been read back instead.
        assert_eq!(reads, [5]);
    }

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
    fn the_stream_hashes_the_same_whatever_the_slices_and_the_prefetch_chunks() {
        let bytes: Vec<u8> = (0..3 * PREFETCH_LEAD as u32 + 77)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let want = Sha256Digest(Sha256::digest(&bytes).into());
        let (step, lead) = (PREFETCH_STEP, PREFETCH_LEAD);
        for cut in [
            0,
            1,
            63,
            step - 1,
            step,
            step + 1,
            lead - 1,
            lead,
            lead + 1,
            2 * lead + 5,
            bytes.len() - 1,
            bytes.len(),
        ] {
            let mut s = Sha256Stream::new();
            s.update(&bytes[..cut]);
            s.update(&bytes[cut..]);
            assert_eq!(s.finish(), want, "split at {cut}");
        }
        // Any step and lead give the same digest; a step of 0 counts as 1 (and ends).
        for (step, lead) in [(0, 0), (1, 0), (100, 7), (16 << 10, 16 << 10)] {
            for cut in [0, 99, 4096, bytes.len()] {
                let mut s = Sha256Stream::new();
                s.update_in_steps(&bytes[..cut], step, lead);
                s.update_in_steps(&bytes[cut..], step, lead);
                assert_eq!(s.finish(), want, "step {step}, lead {lead}, split at {cut}");
            }
        }
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
