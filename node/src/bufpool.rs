//! Reused buffers for piece bodies, received or read to be served.
//!
//! A 1 MiB piece that lands in a freshly allocated buffer costs the allocator's zeroing and,
//! when the allocator got the memory back from the kernel in between, a page fault and the
//! kernel's clearing of every page: on the 2-core machines Shoal is measured on this was about
//! 6 % of a leecher's CPU and 3 % of a seed's (`docs/benchmarks.md`). Buffers here are zeroed
//! once, when first made, and come back to a bounded free list when the last [`Bytes`] that
//! slices them is dropped (the writer and SHA-256 threads hold pieces for a while; the free
//! list is refilled whenever they let go). A reused buffer keeps the bytes of whatever it held
//! before (a piece of another job, another user's): every `Bytes` handed out slices only the
//! range that was just written in full, so those bytes are never seen.

use std::sync::Mutex;

use bytes::Bytes;

/// At most this many free buffers are kept. The byte bound below is the one that matters for
/// 1 MiB pieces; this one lets a swarm node with 256 KiB pieces (a 256 MiB file), whose
/// buffers come and go in bursts of many, keep enough of them.
const MAX_FREE: usize = 64;
/// At most this many bytes of free buffers are kept.
const MAX_FREE_BYTES: usize = 24 << 20;
/// Buffers shorter than this, in bytes, are not pooled (small bodies are cheap to allocate).
pub(crate) const MIN_POOLED: usize = 64 * 1024;

/// The alignment of pieces in [`Filling`] buffers, in bytes: what O_DIRECT writes need.
pub(crate) const ALIGN: usize = 4096;

/// A piece being filled from a stream (an origin response), in a pooled buffer where it
/// starts [`ALIGN`]-aligned, so that it goes to disk with O_DIRECT without another copy.
pub(crate) struct Filling {
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    want: usize,
}

impl Filling {
    /// An empty piece of `want` bytes (nothing is allocated for none).
    pub(crate) fn new(want: usize) -> Self {
        if want == 0 {
            return Self {
                buf: Vec::new(),
                start: 0,
                filled: 0,
                want,
            };
        }
        let buf = take(want + ALIGN);
        let start = buf.as_ptr().align_offset(ALIGN).min(ALIGN);
        Self {
            buf,
            start,
            filled: 0,
            want,
        }
    }

    /// Bytes in so far.
    pub(crate) fn len(&self) -> usize {
        self.filled
    }

    /// Bytes still wanted.
    pub(crate) fn remaining(&self) -> usize {
        self.want - self.filled
    }

    /// Appends `src`, at most [`Filling::remaining`] bytes of it; returns how many it took.
    pub(crate) fn extend(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.remaining());
        let at = self.start + self.filled;
        self.buf[at..at + n].copy_from_slice(&src[..n]);
        self.filled += n;
        n
    }

    /// The piece so far as [`Bytes`] (the buffer goes back to the pool when it drops).
    pub(crate) fn freeze(self) -> Bytes {
        let (start, end) = (self.start, self.start + self.filled);
        into_bytes(self.buf).slice(start..end)
    }
}

/// Free buffers, each with every byte below its length initialised.
pub(crate) struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// The process's pool.
static POOL: Pool = Pool::new();

/// A buffer of exactly `len` initialised bytes from the process's pool ([`Pool::take`]).
pub(crate) fn take(len: usize) -> Vec<u8> {
    POOL.take(len)
}

/// `buf` as [`Bytes`] that gives it back to the process's pool ([`Pool::share`]).
pub(crate) fn into_bytes(buf: Vec<u8>) -> Bytes {
    POOL.share(buf)
}

impl Pool {
    const fn new() -> Self {
        Self {
            free: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of exactly `len` initialised bytes (stale contents when reused, zeros when
    /// new): a free one whose capacity is between `len` and `len` plus a quarter, else a new
    /// one. A reused buffer is cut or grown to `len` within its capacity; growing zeroes only
    /// the bytes it adds. (Matching on the capacity, not the length, lets a buffer cut to a
    /// piece's length to serve it come back for a received piece, which is a few KiB longer
    /// with its head and alignment: a node that both serves and receives would otherwise make
    /// and zero a new buffer for most pieces it receives.)
    fn take(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = free
                .iter()
                .position(|b| b.capacity() >= len && b.capacity() - len <= len / 4)
            {
                let mut buf = free.swap_remove(i);
                drop(free);
                buf.resize(len, 0);
                return buf;
            }
        }
        vec![0u8; len]
    }

    /// `buf` as [`Bytes`]; a buffer of at least [`MIN_POOLED`] bytes goes back to the free
    /// list when the last `Bytes` slicing it drops.
    fn share(&'static self, buf: Vec<u8>) -> Bytes {
        if buf.len() >= MIN_POOLED {
            Bytes::from_owner(Pooled(buf, self))
        } else {
            Bytes::from(buf)
        }
    }

    /// Keeps `buf` if the free list has room.
    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = free.iter().map(Vec::capacity).sum();
        if free.len() < MAX_FREE && held + buf.capacity() <= MAX_FREE_BYTES {
            free.push(buf);
        }
    }
}

/// A buffer that goes back to its pool when dropped.
struct Pooled(Vec<u8>, &'static Pool);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.1.give_back(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> &'static Pool {
        Box::leak(Box::new(Pool::new()))
    }

    #[test]
    fn a_buffer_comes_back_when_its_last_slice_drops_and_is_reused_at_the_length_asked() {
        let pool = pool();
        let mut a = pool.take(MIN_POOLED * 2);
        a.fill(7);
        let ptr = a.as_ptr();
        let bytes = pool.share(a);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(
            pool.free.lock().unwrap().len(),
            0,
            "still held by the slice"
        );
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        let b = pool.take(MIN_POOLED * 2 - 100);
        assert_eq!((b.as_ptr(), b.len()), (ptr, MIN_POOLED * 2 - 100));
        assert!(b.iter().all(|&x| x == 7), "reused, not zeroed again");
    }

    #[test]
    fn a_buffer_cut_short_to_serve_a_piece_comes_back_for_a_longer_received_one() {
        let pool = pool();
        let long = MIN_POOLED * 4 + 4096;
        let mut a = pool.take(long);
        a.fill(7);
        let ptr = a.as_ptr();
        drop(pool.share(a));
        // Taken to serve a piece: cut to the piece's length.
        let b = pool.take(MIN_POOLED * 4);
        assert_eq!((b.as_ptr(), b.len()), (ptr, MIN_POOLED * 4));
        drop(pool.share(b));
        // Taken again to receive one (head and alignment on top): the same buffer, grown back.
        let c = pool.take(long);
        assert_eq!((c.as_ptr(), c.len()), (ptr, long));
        assert!(
            c[..MIN_POOLED * 4].iter().all(|&x| x == 7),
            "not zeroed again"
        );
        assert!(
            c[MIN_POOLED * 4..].iter().all(|&x| x == 0),
            "the grown part is zeroed"
        );
    }

    #[test]
    fn a_filling_piece_starts_aligned_and_takes_no_more_than_it_wants() {
        let mut f = Filling::new(MIN_POOLED + 10);
        assert_eq!(f.extend(&[1; 100]), 100);
        assert_eq!(f.extend(&vec![2; MIN_POOLED]), MIN_POOLED - 90);
        assert_eq!(f.remaining(), 0);
        assert_eq!(f.extend(&[3; 5]), 0);
        let b = f.freeze();
        assert_eq!(b.len(), MIN_POOLED + 10);
        assert_eq!(b.as_ptr().align_offset(ALIGN), 0);
        assert_eq!((b[0], b[99], b[100], b[MIN_POOLED + 9]), (1, 1, 2, 2));
        // The empty piece after a response's last one.
        let mut none = Filling::new(0);
        assert_eq!((none.extend(&[1]), none.remaining()), (0, 0));
        assert!(none.freeze().is_empty());
    }

    #[test]
    fn a_much_smaller_request_or_a_full_free_list_does_not_keep_big_buffers() {
        let pool = pool();
        drop(pool.share(vec![0; MIN_POOLED * 2]));
        let c = pool.take(MIN_POOLED);
        assert_eq!(c.len(), MIN_POOLED);
        assert_eq!(pool.free.lock().unwrap().len(), 1, "the big one stays free");
        let many: Vec<Bytes> = (0..MAX_FREE + 4)
            .map(|_| pool.share(vec![0; MIN_POOLED]))
            .collect();
        drop(many);
        let free = pool.free.lock().unwrap();
        assert!(free.len() <= MAX_FREE);
        assert!(free.iter().map(Vec::len).sum::<usize>() <= MAX_FREE_BYTES);
    }
}
