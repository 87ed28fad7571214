//! Length-prefix framing: each message is preceded by its length in bytes as an unsigned LEB128
//! varint (the same prefix as prost's `encode_length_delimiter`).
//!
//! [`LengthPrefix`] is a sans-I/O decoder: feed it bytes one at a time until it yields the body
//! length, which it has already checked against the caller's limit, so a peer can never make a
//! node buffer more than the limit of the message type it expects.

use thiserror::Error;

/// The longest varint prefix accepted, in bytes (enough for a `u64`).
pub const MAX_PREFIX_LEN_BYTES: usize = 10;

/// A framing error.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced body length exceeds the limit for the message type.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The announced length in bytes.
        len: u64,
        /// The limit in bytes.
        limit: usize,
    },
    /// The varint prefix is longer than [`MAX_PREFIX_LEN_BYTES`].
    #[error("malformed length prefix")]
    BadPrefix,
}

/// Incremental decoder of a varint length prefix.
#[derive(Debug)]
pub struct LengthPrefix {
    value: u64,
    shift: u32,
    limit: usize,
}

impl LengthPrefix {
    /// A decoder that rejects bodies longer than `limit` bytes.
    #[must_use]
    pub fn new(limit: usize) -> Self {
        Self {
            value: 0,
            shift: 0,
            limit,
        }
    }

    /// Feeds one byte. Returns `Ok(Some(len))` once the prefix is complete.
    ///
    /// # Errors
    /// [`FrameError::BadPrefix`] for a prefix over [`MAX_PREFIX_LEN_BYTES`] bytes,
    /// [`FrameError::TooLarge`] when the length exceeds the limit.
    pub fn push(&mut self, byte: u8) -> Result<Option<usize>, FrameError> {
        if self.shift >= 7 * MAX_PREFIX_LEN_BYTES as u32 {
            return Err(FrameError::BadPrefix);
        }
        // The tenth byte holds only the top bit of a u64: anything more would be dropped.
        if self.shift == 63 && byte & 0x7f > 1 {
            return Err(FrameError::BadPrefix);
        }
        self.value |= u64::from(byte & 0x7f).checked_shl(self.shift).unwrap_or(0);
        self.shift += 7;
        if byte & 0x80 != 0 {
            return Ok(None);
        }
        if self.value > self.limit as u64 {
            return Err(FrameError::TooLarge {
                len: self.value,
                limit: self.limit,
            });
        }
        // The value is at most `limit`, a usize.
        Ok(Some(self.value as usize))
    }
}

/// Encodes `len` as a varint prefix; returns the buffer and the number of bytes used.
#[must_use]
pub fn encode_prefix(mut len: u64) -> ([u8; MAX_PREFIX_LEN_BYTES], usize) {
    let mut buf = [0u8; MAX_PREFIX_LEN_BYTES];
    let mut i = 0;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            buf[i] = byte;
            return (buf, i + 1);
        }
        buf[i] = byte | 0x80;
        i += 1;
    }
}

/// Decodes a whole frame (prefix and body) from `buf`, for tests and tools that hold the bytes.
///
/// # Errors
/// A [`FrameError`] for a bad prefix or an over-limit length; `BadPrefix` also when `buf` ends
/// before the prefix or the body does.
pub fn split_frame(buf: &[u8], limit: usize) -> Result<&[u8], FrameError> {
    let mut prefix = LengthPrefix::new(limit);
    for (i, &b) in buf.iter().enumerate() {
        if let Some(len) = prefix.push(b)? {
            let body = &buf[i + 1..];
            return if body.len() == len {
                Ok(body)
            } else {
                Err(FrameError::BadPrefix)
            };
        }
    }
    Err(FrameError::BadPrefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trips() {
        for len in [0u64, 1, 127, 128, 300, 16 << 20, u64::from(u32::MAX)] {
            let (buf, n) = encode_prefix(len);
            let mut dec = LengthPrefix::new(usize::MAX);
            let mut out = None;
            for &b in &buf[..n] {
                out = dec.push(b).unwrap();
            }
            assert_eq!(out, Some(len as usize));
        }
    }

    #[test]
    fn oversized_and_overlong_prefixes_are_errors() {
        let (buf, n) = encode_prefix(1001);
        let mut dec = LengthPrefix::new(1000);
        let res: Result<Vec<_>, _> = buf[..n].iter().map(|&b| dec.push(b)).collect();
        assert_eq!(
            res,
            Err(FrameError::TooLarge {
                len: 1001,
                limit: 1000
            })
        );
        let mut dec = LengthPrefix::new(usize::MAX);
        let mut err = None;
        for _ in 0..11 {
            if let Err(e) = dec.push(0xff) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(FrameError::BadPrefix));
    }

    #[test]
    fn a_tenth_byte_that_overflows_64_bits_is_an_error_not_a_small_length() {
        // Nine continuation bytes of zero, then a tenth byte of 2: 2 << 63 overflows a u64
        // and used to wrap to a length of 0.
        let mut dec = LengthPrefix::new(usize::MAX);
        for _ in 0..9 {
            assert_eq!(dec.push(0x80), Ok(None));
        }
        assert_eq!(dec.push(0x02), Err(FrameError::BadPrefix));
        // The largest u64 still decodes.
        let (buf, n) = encode_prefix(u64::MAX);
        let mut dec = LengthPrefix::new(usize::MAX);
        let last = buf[..n].iter().map(|&b| dec.push(b)).last().unwrap();
        assert_eq!(last, Ok(Some(usize::MAX)));
    }
}
