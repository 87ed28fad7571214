//! A piece's bytes in one or more parts.

use std::{fs::File, os::unix::fs::FileExt};

use bytes::Bytes;

/// A piece's bytes, in one or more parts in order. A piece a peer sent is one part (read into
/// one aligned buffer, `swarm::read_body`); a piece from the origin is the parts of the
/// response body it was cut from, as hyper read them. Copying those parts into one buffer
/// cost 4-20 % of an origin-only download's CPU (`docs/benchmarks.md`, session 33), so they
/// are kept as they came: verification and the SHA-256 hash them part by part
/// ([`shoal_validator::Parts`]), the writer writes them part by part, and only a piece kept
/// to be served is copied into one buffer ([`PieceBytes::contiguous`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct PieceBytes {
    parts: Vec<Bytes>,
    len: usize,
}

impl PieceBytes {
    /// No bytes yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Appends `part` (an empty one is dropped).
    pub(crate) fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// The length of all parts, in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The parts, in order (none empty).
    pub(crate) fn as_parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// Writes the parts to `file` from `offset` on, in order (one `pwrite` or more per part).
    ///
    /// # Errors
    /// What `pwrite` returns.
    pub(crate) fn write_all_at(&self, file: &File, offset: u64) -> std::io::Result<()> {
        let mut at = offset;
        for p in &self.parts {
            file.write_all_at(p, at)?;
            at += p.len() as u64;
        }
        Ok(())
    }

    /// The bytes as one [`Bytes`]: the part itself when there is one, else the parts copied
    /// into one pooled buffer (`crate::bufpool`).
    pub(crate) fn contiguous(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => {
                let mut buf = crate::bufpool::take(self.len);
                let mut at = 0;
                for p in parts {
                    buf[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                crate::bufpool::into_bytes(buf)
            }
        }
    }
}

impl From<Bytes> for PieceBytes {
    fn from(part: Bytes) -> Self {
        let mut p = Self::new();
        p.push(part);
        p
    }
}

impl shoal_validator::Parts for PieceBytes {
    fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(|p| &p[..])
    }

    fn byte_len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_their_order_and_come_together_only_when_asked() {
        let mut p = PieceBytes::new();
        p.push(Bytes::from_static(b"ab"));
        p.push(Bytes::new());
        p.push(Bytes::from(vec![b'c'; 70_000]));
        assert_eq!((p.len(), p.as_parts().len()), (70_002, 2), "the empty part dropped");
        let one = p.contiguous();
        assert_eq!(&one[..2], b"ab");
        assert!(one[2..].iter().all(|&b| b == b'c'));
        assert_eq!(one.len(), 70_002);
        // One part: that part, not a copy.
        let single = PieceBytes::from(Bytes::from_static(b"xyz"));
        assert_eq!(single.contiguous().as_ptr(), b"xyz".as_ptr());
        assert!(PieceBytes::new().contiguous().is_empty());
    }
}
