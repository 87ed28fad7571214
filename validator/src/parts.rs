//! Bytes held in one or more parts.

/// Bytes that may be held in several parts, in order: a piece whose bytes arrived as the
/// parts of an HTTP response body, say. Every function of this crate that hashes a piece takes
/// one, so a caller never copies the parts together to verify them (an origin-only download
/// spent 4-20 % of its CPU on that copy, `docs/benchmarks.md`, session 33). Implemented for
/// `[u8]`, `[u8; N]`, `Vec<u8>` and `bytes::Bytes` (one part each).
pub trait Parts {
    /// The parts, in order (an empty one may appear).
    fn parts(&self) -> impl Iterator<Item = &[u8]>;

    /// All parts' length, in bytes.
    fn byte_len(&self) -> usize {
        self.parts().map(<[u8]>::len).sum()
    }
}

impl Parts for [u8] {
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self)
    }

    fn byte_len(&self) -> usize {
        self.len()
    }
}

impl<const N: usize> Parts for [u8; N] {
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.as_slice())
    }

    fn byte_len(&self) -> usize {
        N
    }
}

impl Parts for Vec<u8> {
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.as_slice())
    }

    fn byte_len(&self) -> usize {
        self.len()
    }
}

impl Parts for bytes::Bytes {
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self[..])
    }

    fn byte_len(&self) -> usize {
        self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LayerBuilder, OrderedSha256, PieceLayer, hash_reader, piece_chaining_value};

    /// A piece in the parts an origin's response might cut it into.
    struct Split(Vec<Vec<u8>>);

    impl Parts for Split {
        fn parts(&self) -> impl Iterator<Item = &[u8]> {
            self.0.iter().map(Vec::as_slice)
        }
    }

    /// `bytes` cut at `cuts` (offsets, in order).
    fn split(bytes: &[u8], cuts: &[usize]) -> Split {
        let mut parts = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let c = c.clamp(at, bytes.len());
            parts.push(bytes[at..c].to_vec());
            at = c;
        }
        Split(parts)
    }

    #[test]
    fn a_piece_in_parts_verifies_and_hashes_as_the_same_bytes_in_one() {
        let piece = 16 * 1024usize;
        let file: Vec<u8> = (0..3 * piece + 500)
            .map(|i| (i * 7 + i / 999) as u8)
            .collect();
        let d = hash_reader(&file[..], file.len() as u64).unwrap();
        let pieces: Vec<&[u8]> = file.chunks(piece).collect();
        // Cuts inside a BLAKE3 chunk, on a chunk boundary, empty parts, one byte parts.
        let cuts: [&[usize]; 5] = [&[], &[1], &[1000, 1024, 1024, 5000], &[0, 0, 16383], &[512]];
        let mut b = LayerBuilder::new(file.len() as u64).unwrap();
        for (i, p) in pieces.iter().enumerate() {
            let parts = split(p, cuts[i % cuts.len()]);
            assert_eq!(parts.byte_len(), p.len());
            let at = (i * piece) as u64;
            assert_eq!(
                piece_chaining_value(at, &parts),
                piece_chaining_value(at, *p)
            );
            d.layer.verify_piece(i as u32, &parts).unwrap();
            b.add_piece(i as u32, &parts).unwrap();
        }
        assert_eq!(b.finish(), Some(d.layer.clone()));
        // A byte changed in any part, or a part missing, fails.
        let mut bad = split(pieces[1], &[100, 9000]);
        bad.0[2][5] ^= 1;
        assert!(d.layer.verify_piece(1, &bad).is_err());
        let mut short = split(pieces[1], &[100, 9000]);
        short.0.remove(1);
        assert!(d.layer.verify_piece(1, &short).is_err());
        // A one-piece file is checked against the content id itself.
        let small = &file[..700];
        let one = hash_reader(small, 700).unwrap().layer;
        let one = PieceLayer::verify(one.content_id(), Vec::new()).unwrap();
        one.verify_piece(0, &split(small, &[3, 300])).unwrap();
        // The SHA-256 of pieces in parts, in and out of order, is the file's.
        let mut sha = OrderedSha256::new(piece as u64, file.len() as u64, 1 << 20);
        let mut never = |_: u64, _: usize| -> std::io::Result<(Split, bool)> {
            Err(std::io::Error::other("nothing is read back"))
        };
        for i in [2, 0, 3, 1] {
            let parts = split(pieces[i], cuts[(i + 2) % cuts.len()]);
            sha.add(i as u32, Some(parts), None, &mut never).unwrap();
        }
        assert_eq!(sha.finish(), Some(d.sha256));
    }
}
