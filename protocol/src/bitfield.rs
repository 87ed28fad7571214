//! [`Bitfield`]: which pieces of a file a peer holds.
//!
//! The wire form follows BEP 3: one bit per piece, the most significant bit of byte 0 is piece
//! 0, exactly `ceil(pieces / 8)` bytes, and the spare bits at the end are zero.

use crate::id::PieceIndex;

/// A fixed-length set of piece indices.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitfield {
    bytes: Vec<u8>,
    len: u32,
}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bitfield({}/{})", self.count_ones(), self.len)
    }
}

impl Bitfield {
    /// An empty bitfield for `len` pieces.
    #[must_use]
    pub fn new(len: u32) -> Self {
        Self {
            bytes: vec![0; len.div_ceil(8) as usize],
            len,
        }
    }

    /// A bitfield for `len` pieces with every piece set.
    #[must_use]
    pub fn full(len: u32) -> Self {
        let mut bytes = vec![0xff; len.div_ceil(8) as usize];
        if let Some(last) = bytes.last_mut()
            && !len.is_multiple_of(8)
        {
            // The spare bits at the end stay zero.
            *last = 0xff << (8 - len % 8);
        }
        Self { bytes, len }
    }

    /// Parses the wire form for a file of `len` pieces; `None` when the byte count is not
    /// `ceil(len / 8)` or a spare bit is set.
    #[must_use]
    pub fn from_bytes(bytes: &[u8], len: u32) -> Option<Self> {
        if bytes.len() != len.div_ceil(8) as usize {
            return None;
        }
        let spare = (bytes.len() * 8) as u64 - u64::from(len);
        if spare > 0 {
            let last = *bytes.last()?;
            if last & ((1u8 << spare) - 1) != 0 {
                return None;
            }
        }
        Some(Self {
            bytes: bytes.to_vec(),
            len,
        })
    }

    /// The wire form.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The number of pieces the bitfield covers.
    #[must_use]
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True when the bitfield covers no pieces.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether piece `index` is set; false for an index out of range.
    #[must_use]
    #[inline]
    pub fn get(&self, index: PieceIndex) -> bool {
        index < self.len && self.bytes[(index / 8) as usize] & (0x80 >> (index % 8)) != 0
    }

    /// Sets piece `index`; an index out of range is ignored.
    #[inline]
    pub fn set(&mut self, index: PieceIndex) {
        if index < self.len {
            self.bytes[(index / 8) as usize] |= 0x80 >> (index % 8);
        }
    }

    /// Clears piece `index`; an index out of range is ignored.
    #[inline]
    pub fn clear(&mut self, index: PieceIndex) {
        if index < self.len {
            self.bytes[(index / 8) as usize] &= !(0x80 >> (index % 8));
        }
    }

    /// The number of pieces set.
    #[must_use]
    pub fn count_ones(&self) -> u32 {
        self.bytes.iter().map(|b| b.count_ones()).sum()
    }

    /// True when every piece is set.
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.count_ones() == self.len
    }

    /// The indices of the pieces set, ascending. The bytes are read eight at a time, and
    /// words with no bit set are skipped whole.
    #[inline]
    pub fn ones(&self) -> Ones<'_> {
        Ones {
            chunks: self.bytes.chunks(8),
            end: 0,
            word: 0,
        }
    }

    /// The bits as 64-bit words: word `w` holds pieces `64·w ..`, the first in its most
    /// significant bit (the wire form read eight bytes at a time, big-endian; the last word
    /// padded with zeros).
    #[inline]
    pub fn words(&self) -> impl Iterator<Item = u64> + '_ {
        self.bytes.chunks(8).map(word)
    }

    /// The indices of the bits set in `words`, ascending: word `w` holds indices `64·w ..`,
    /// the first in its most significant bit, as [`Self::words`] gives them. For the pieces of
    /// bitfields combined a word at a time, such as
    /// `Bitfield::ones_of_words(a.words().zip(b.words()).map(|(a, b)| a & b))`.
    #[inline]
    pub fn ones_of_words(words: impl Iterator<Item = u64>) -> impl Iterator<Item = PieceIndex> {
        words
            .enumerate()
            .filter(|(_, w)| *w != 0)
            .flat_map(|(at, mut w)| {
                std::iter::from_fn(move || {
                    (w != 0).then(|| {
                        let bit = w.leading_zeros();
                        w &= !(1u64 << (63 - bit));
                        // Below the bitfield's length, which is a `u32`.
                        (at as u64 * 64 + u64::from(bit)) as PieceIndex
                    })
                })
            })
    }

    /// Clears every piece.
    pub fn clear_all(&mut self) {
        self.bytes.fill(0);
    }

    /// Sets every piece that `other` has set (a union); pieces of `other` past this
    /// bitfield's length are ignored, as [`Self::set`] ignores them.
    pub fn union_with(&mut self, other: &Bitfield) {
        for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
            *a |= b;
        }
        // The spare bits at the end stay zero.
        if let Some(last) = self.bytes.last_mut()
            && !self.len.is_multiple_of(8)
        {
            *last &= 0xff << (8 - self.len % 8);
        }
    }
}

/// Up to eight bytes of the wire form as one word, the first byte most significant and
/// missing bytes zero.
#[inline]
fn word(bytes: &[u8]) -> u64 {
    if let Ok(w) = <[u8; 8]>::try_from(bytes) {
        return u64::from_be_bytes(w);
    }
    // Only the last word is short.
    bytes
        .iter()
        .enumerate()
        .fold(0, |w, (i, &b)| w | u64::from(b) << (56 - 8 * i))
}

/// The iterator of [`Bitfield::ones`]: the indices of the pieces set, ascending.
#[derive(Debug, Clone)]
pub struct Ones<'a> {
    /// The bytes not loaded yet, eight at a time.
    chunks: std::slice::Chunks<'a, u8>,
    /// The index of the piece just past `word` (of the first piece of the next word).
    end: u64,
    /// Up to eight bytes, its first piece in the most significant bit; bits are cleared as
    /// they are yielded.
    word: u64,
}

impl Iterator for Ones<'_> {
    type Item = PieceIndex;

    #[inline]
    fn next(&mut self) -> Option<PieceIndex> {
        while self.word == 0 {
            self.word = word(self.chunks.next()?);
            self.end += 64;
        }
        let bit = self.word.leading_zeros();
        self.word &= !(1u64 << (63 - bit));
        // Below the bitfield's length, which is a `u32`.
        Some((self.end - 64 + u64::from(bit)) as PieceIndex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ones_full_and_union_agree_with_get_and_set() {
        for len in [0u32, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 1000] {
            let full = Bitfield::full(len);
            assert_eq!(full.count_ones(), len, "{len}");
            let every: Vec<u32> = (0..len).collect();
            assert_eq!(full.ones().collect::<Vec<_>>(), every, "{len}");
            assert!(
                Bitfield::from_bytes(full.as_bytes(), len).is_some(),
                "{len}"
            );
            let (mut a, mut b) = (Bitfield::new(len), Bitfield::new(len));
            for i in 0..len {
                if (i * 7 + i / 5) % 3 == 0 {
                    a.set(i);
                }
                if i % 11 == 4 {
                    b.set(i);
                }
            }
            let want: Vec<u32> = (0..len).filter(|&i| a.get(i)).collect();
            assert_eq!(a.ones().collect::<Vec<_>>(), want, "{len}");
            let want: Vec<u32> = (0..len).filter(|&i| a.get(i) && !b.get(i)).collect();
            let and_not = a.words().zip(b.words()).map(|(a, b)| a & !b);
            assert_eq!(
                Bitfield::ones_of_words(and_not).collect::<Vec<_>>(),
                want,
                "{len}"
            );
            let want: Vec<u32> = (0..len).filter(|&i| a.get(i) || b.get(i)).collect();
            a.union_with(&b);
            assert_eq!(a.ones().collect::<Vec<_>>(), want, "{len}");
            // Longer or shorter: only the pieces within this length count.
            let mut c = Bitfield::new(len);
            c.union_with(&Bitfield::full(len + 9));
            assert_eq!(c, Bitfield::full(len), "{len}");
            c.union_with(&Bitfield::new(len / 2));
            assert_eq!(c, Bitfield::full(len), "{len}");
            c.clear_all();
            assert_eq!(c, Bitfield::new(len), "{len}");
            assert_eq!(c.ones().next(), None, "{len}");
        }
    }

    #[test]
    fn wire_form_is_msb_first_and_rejects_spare_bits() {
        let mut b = Bitfield::new(10);
        b.set(0);
        b.set(9);
        assert_eq!(b.as_bytes(), &[0x80, 0x40]);
        assert_eq!(Bitfield::from_bytes(&[0x80, 0x40], 10), Some(b.clone()));
        assert_eq!(Bitfield::from_bytes(&[0x80, 0x41], 10), None);
        assert_eq!(Bitfield::from_bytes(&[0x80], 10), None);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 9]);
        assert!(Bitfield::full(10).is_full());
        assert!(!b.get(10));
    }
}
