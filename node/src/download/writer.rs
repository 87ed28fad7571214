//! The thread that verifies and writes pieces, checkpoints them, and the one that hashes SHA-256 in file order; the temporary file.

use super::*;

/// The thread that verifies and writes pieces, and the one that hashes SHA-256 in order.
/// What the writer thread is sent.
pub(super) enum ToWriter {
    /// A piece to check and write.
    Piece(PieceIndex, Source, Bytes),
    /// From now on check pieces against this verified layer (assembled while downloading);
    /// the pieces recorded so far are checked against it too.
    Layer(PieceLayer),
    /// Drop these pieces, written from peers before a layer could check them (the layer
    /// assembled from claims failed): they count as not written, and are fetched again.
    Forget(Vec<PieceIndex>),
}

impl ToWriter {
    /// The piece bytes this message holds (0 for the others).
    fn bytes(&self) -> usize {
        match self {
            Self::Piece(_, _, b) => b.len(),
            Self::Layer(_) | Self::Forget(_) => 0,
        }
    }
}

pub(super) struct Writer {
    pub(super) tx: mpsc::Sender<ToWriter>,
    pub(super) thread: std::thread::JoinHandle<Result<WriterEnd, std::io::Error>>,
}

pub(super) struct WriterEnd {
    pub(super) builder: Option<LayerBuilder>,
    /// The file's SHA-256; `None` when it was not computed (not asked for) or some piece
    /// never came.
    pub(super) sha256: Option<Sha256Digest>,
    /// The pieces verified and written.
    pub(super) on_disk: Bitfield,
}

pub(super) enum Checker {
    Layer(PieceLayer),
    Builder(LayerBuilder),
}

impl Checker {
    /// The chaining value piece `index` verified with (`None` for a file of one piece, or a
    /// piece the builder has not taken).
    pub(super) fn chaining_value(
        &self,
        index: PieceIndex,
    ) -> Option<shoal_validator::ChainingValue> {
        match self {
            Self::Layer(l) => l.chaining_values().get(index as usize).copied(),
            Self::Builder(b) => b.chaining_value(index),
        }
    }
}

/// A piece for the SHA-256 thread: its index, its bytes (`None`: read it from the file), and
/// the chaining value it verified with, which bytes read back from the file must still have.
pub(super) type ShaPiece = (
    PieceIndex,
    Option<Bytes>,
    Option<shoal_validator::ChainingValue>,
);

/// The alignment O_DIRECT needs for offsets, lengths and buffer addresses, in bytes.
pub(super) const DIRECT_ALIGN: usize = swarm::BULK_ALIGN;

/// Writes pieces at their offsets. Where the file system allows it, aligned pieces go through a
/// second descriptor opened with `O_DIRECT`: on the 2-core machines Shoal is measured on, the
/// kernel's copy into the page cache costs more CPU than hashing, and direct writes skip it
/// (see `docs/benchmarks.md`). Other pieces, and every piece when `O_DIRECT` is refused, go
/// through the page cache. Reads (serving, SHA-256 read-back) see both, as the kernel keeps
/// them coherent.
pub(super) struct PieceWriter {
    pub(super) buffered: Arc<File>,
    pub(super) direct: Option<File>,
    /// A buffer of one piece plus slack, so an aligned window of it can be used.
    pub(super) scratch: Vec<u8>,
}

impl PieceWriter {
    pub(super) fn new(buffered: Arc<File>, piece_size: u64) -> Self {
        use std::os::unix::{fs::OpenOptionsExt, io::AsRawFd};
        // The same inode as `buffered`, not whatever the path names by now.
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", buffered.as_raw_fd()))
            .ok();
        let scratch = if direct.is_some() {
            vec![0u8; piece_size as usize + DIRECT_ALIGN]
        } else {
            Vec::new()
        };
        Self {
            buffered,
            direct,
            scratch,
        }
    }

    pub(super) fn write(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let aligned =
            offset.is_multiple_of(DIRECT_ALIGN as u64) && bytes.len().is_multiple_of(DIRECT_ALIGN);
        if let Some(direct) = &self.direct
            && aligned
            && bytes.len() + DIRECT_ALIGN <= self.scratch.len()
        {
            // Pieces from peers arrive aligned (`swarm::read_body`); others are copied first.
            let window = if bytes.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
                bytes
            } else {
                let start = self.scratch.as_ptr().align_offset(DIRECT_ALIGN);
                let window = &mut self.scratch[start..start + bytes.len()];
                window.copy_from_slice(bytes);
                window
            };
            match direct.write_all_at(window, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => return Err(e),
            }
        }
        self.buffered.write_all_at(bytes, offset)
    }
}

/// What the writer thread records with each checkpoint.
pub(super) struct Checkpointing {
    pub(super) durable: Durable,
    pub(super) meta: ResumeDisk,
    /// The trusted layer, written with the first checkpoint.
    pub(super) layer: Option<Vec<shoal_validator::ChainingValue>>,
    /// The origin resource, once probed: its validator goes into the record.
    pub(super) remote: Arc<OnceCell<Remote>>,
}

impl Checkpointing {
    /// Records the pieces on disk, less those not verified yet, in the state database (on
    /// its thread; the calling writer thread waits). The data must be synced first.
    fn record(
        &mut self,
        on_disk: &Bitfield,
        unverified: &HashMap<PieceIndex, PeerId>,
    ) -> std::io::Result<()> {
        self.meta.validator = self.remote.get().and_then(|r| r.validator.clone());
        let mut pieces = on_disk.clone();
        for index in unverified.keys() {
            pieces.clear(*index);
        }
        let (job, index, meta, layer) = (
            self.durable.job,
            self.durable.index,
            self.meta.clone(),
            self.layer.take(),
        );
        self.durable
            .store
            .run_blocking(move |s| s.checkpoint(job, index, &pieces, &meta, layer.as_deref()))
            .unwrap_or(Ok(()))
            .map_err(std::io::Error::other)
    }
}

/// Pieces the writer takes from its queue before it flushes and records them.
pub(super) const CHECKPOINT_BATCH: usize = 64;
/// Bytes of pieces the writer takes from its queue before it flushes and records them: the
/// queue holds [`VERIFY_QUEUE`] pieces, but its senders refill it while the writer drains it,
/// so a batch bounded by count alone held up to 64 pieces (64 MiB of 1 MiB pieces) when the
/// writer fell behind the network: an origin-only download of 1 GiB peaked at 55-78 MiB
/// resident, 43-47 MiB with this bound (`docs/benchmarks.md`, session 24). Four 1 MiB pieces
/// still share one flush.
pub(super) const CHECKPOINT_BATCH_BYTES: usize = 4 << 20;

/// Starts the writer thread. With `sha256` it also runs the SHA-256 thread, which hashes
/// every piece written, in file order; without, the file's SHA-256 is not computed.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_writer(
    file: Arc<File>,
    checker: Checker,
    piece_size: u64,
    length: u64,
    resumed: Bitfield,
    mut checkpointing: Option<Checkpointing>,
    out: mpsc::Sender<Verdict>,
    sha256: bool,
    keep_pieces: Arc<std::sync::atomic::AtomicBool>,
) -> Writer {
    let (tx, mut rx) = mpsc::channel::<ToWriter>(VERIFY_QUEUE);
    let thread = std::thread::spawn(move || {
        let mut writer = PieceWriter::new(file.clone(), piece_size);
        let mut sha = sha256.then(|| spawn_sha(&file, piece_size, length));
        let mut on_disk = resumed;
        // Pieces kept from an earlier run are hashed from the file (checked again first).
        if let Some((sha_tx, _)) = &sha {
            for index in on_disk.ones() {
                let _ = sha_tx.send((index, None, checker.chaining_value(index)));
            }
        }
        let mut checker = checker;
        let mut results = Vec::new();
        // Pieces written from peers with no layer to check them yet (a swarm sharing its
        // origin pieces before any node has the layer), and who sent them: they are not
        // recorded in checkpoints (a resumed run would take them for checked ones), and the
        // layer, when it comes, names the peer of each that fails.
        let mut unverified: HashMap<PieceIndex, PeerId> = HashMap::new();
        while let Some(first) = rx.blocking_recv() {
            let batch = take_batch(first, &mut rx);
            let mut wrote = false;
            let mut dropped = false;
            for msg in batch {
                let (index, source, bytes) = match msg {
                    ToWriter::Piece(i, s, b) => (i, s, b),
                    ToWriter::Forget(pieces) => {
                        dropped |= forget(&mut checker, &pieces, &mut on_disk, &mut unverified);
                        continue;
                    }
                    ToWriter::Layer(layer) => {
                        dropped |= check_against(
                            &checker,
                            &layer,
                            &mut on_disk,
                            &unverified,
                            &mut results,
                        );
                        // Checked now: the pieces that passed are recorded like any other.
                        unverified.clear();
                        wrote = true;
                        if let Some(c) = &mut checkpointing {
                            c.meta.content_id = Some(layer.content_id().to_string());
                            c.layer = Some(layer.chaining_values().to_vec());
                        }
                        checker = Checker::Layer(layer);
                        continue;
                    }
                };
                let mut cv = None;
                let result = match &mut checker {
                    Checker::Layer(layer) => layer.verify_piece(index, &bytes),
                    Checker::Builder(b) => b.add_piece(index, &bytes).inspect(|()| {
                        cv = b.chaining_value(index);
                    }),
                }
                .map_err(|e| e.to_string());
                if result.is_ok() {
                    writer.write(u64::from(index) * piece_size, &bytes)?;
                    on_disk.set(index);
                    wrote = true;
                    if let (Checker::Builder(_), Source::Peer(p)) = (&checker, source) {
                        unverified.insert(index, p);
                    }
                    if let (Some(c), Source::Peer(_)) = (&mut checkpointing, source) {
                        c.meta.from_peers = true;
                    }
                    if let Some((sha_tx, _)) = &sha {
                        let _ = sha_tx.send((
                            index,
                            Some(bytes.clone()),
                            checker.chaining_value(index),
                        ));
                    }
                }
                results.push(Verdict {
                    index,
                    source,
                    bytes: bytes.len() as u64,
                    piece: checker
                        .chaining_value(index)
                        .filter(|_| {
                            result.is_ok() && keep_pieces.load(std::sync::atomic::Ordering::Relaxed)
                        })
                        .map(|cv| (bytes.clone(), cv)),
                    result,
                    cv,
                    after_layer: false,
                });
            }
            if dropped {
                // The SHA-256 thread may have hashed a dropped piece: start it again on the
                // pieces still written, read back from the file.
                if let Some((old_tx, old_thread)) = sha.take() {
                    drop(old_tx);
                    let _ = old_thread.join();
                    let (sha_tx, thread) = spawn_sha(&file, piece_size, length);
                    for index in on_disk.ones() {
                        let _ = sha_tx.send((index, None, checker.chaining_value(index)));
                    }
                    sha = Some((sha_tx, thread));
                }
                wrote = true;
            }
            // Data first, then the record that says it is there.
            if let Some(c) = &mut checkpointing
                && wrote
            {
                file.sync_data()?;
                c.record(&on_disk, &unverified)?;
            }
            for v in results.drain(..) {
                let _ = out.blocking_send(v);
            }
        }
        let sha256 = match sha {
            Some((sha_tx, sha_thread)) => {
                drop(sha_tx);
                sha_thread
                    .join()
                    .map_err(|_| std::io::Error::other("SHA-256 thread panicked"))??
            }
            None => None,
        };
        Ok(WriterEnd {
            builder: match checker {
                Checker::Builder(b) => Some(b),
                Checker::Layer(_) => None,
            },
            sha256,
            on_disk,
        })
    });
    Writer { tx, thread }
}

/// `first` and what else waits in `rx`, up to [`CHECKPOINT_BATCH`] messages and
/// [`CHECKPOINT_BATCH_BYTES`] of piece bytes (the piece that crosses it is the last one
/// taken): the messages the writer handles before one flush and checkpoint.
fn take_batch(first: ToWriter, rx: &mut mpsc::Receiver<ToWriter>) -> Vec<ToWriter> {
    let mut bytes = first.bytes();
    let mut batch = vec![first];
    while batch.len() < CHECKPOINT_BATCH && bytes < CHECKPOINT_BATCH_BYTES {
        match rx.try_recv() {
            Ok(next) => {
                bytes += next.bytes();
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    batch
}

/// The SHA-256 thread's queue and handle.
type ShaThread = (
    std::sync::mpsc::SyncSender<ShaPiece>,
    std::thread::JoinHandle<Result<Option<Sha256Digest>, std::io::Error>>,
);

/// Starts a thread hashing `file` in order ([`sha_in_order`]).
fn spawn_sha(file: &Arc<File>, piece_size: u64, length: u64) -> ShaThread {
    let (tx, rx) = std::sync::mpsc::sync_channel::<ShaPiece>(SHA_QUEUE);
    let file = file.clone();
    let thread = std::thread::spawn(move || sha_in_order(&file, rx, piece_size, length));
    (tx, thread)
}

/// Checks the pieces recorded so far without a layer against the `layer` that came: a piece
/// whose chaining value differs is dropped from `on_disk` and reported as failing (after the
/// layer), against the peer that sent it (`unverified`) or the origin. True when any was.
fn check_against(
    checker: &Checker,
    layer: &PieceLayer,
    on_disk: &mut Bitfield,
    unverified: &HashMap<PieceIndex, PeerId>,
    results: &mut Vec<Verdict>,
) -> bool {
    let Checker::Builder(b) = checker else {
        return false;
    };
    let mut dropped = false;
    for index in on_disk.ones().collect::<Vec<_>>() {
        let cv = b.chaining_value(index);
        if cv.is_some_and(|cv| !layer.agrees(index, &cv)) {
            on_disk.clear(index);
            dropped = true;
            results.push(Verdict {
                index,
                source: unverified
                    .get(&index)
                    .map_or(Source::Origin, |p| Source::Peer(*p)),
                bytes: 0,
                piece: None,
                result: Err("differs from the assembled piece layer".into()),
                cv: None,
                after_layer: true,
            });
        }
    }
    dropped
}

/// Drops `pieces` written unverified from peers (the builder forgets them, they are no
/// longer on disk); true when any was.
fn forget(
    checker: &mut Checker,
    pieces: &[PieceIndex],
    on_disk: &mut Bitfield,
    unverified: &mut HashMap<PieceIndex, PeerId>,
) -> bool {
    let Checker::Builder(b) = checker else {
        return false;
    };
    let mut dropped = false;
    for &index in pieces {
        if unverified.remove(&index).is_some() {
            b.remove_piece(index);
            on_disk.clear(index);
            dropped = true;
        }
    }
    dropped
}

/// Hashes the file in order ([`shoal_validator::OrderedSha256`]). Pieces come with their
/// bytes, or without (`None`: already in the file, kept from an earlier run); early pieces
/// are held while they fit in [`SHA_HOLD_BYTES`], the rest read back from `file` when their
/// turn comes. A piece read back from a file someone other than this process's user could
/// write (the job's owner, when the daemon runs a user's job) is checked again against the
/// chaining value it verified with: what is hashed is what verified, or the file fails as a
/// local error that bans nobody. A file only this process's user can write is hashed as read
/// (decision 0020); a change there makes the SHA-256 fail. `None` unless every piece arrived.
pub(super) fn sha_in_order(
    file: &File,
    rx: std::sync::mpsc::Receiver<ShaPiece>,
    piece_size: u64,
    length: u64,
) -> Result<Option<Sha256Digest>, std::io::Error> {
    let mut sha = shoal_validator::OrderedSha256::new(piece_size, length, SHA_HOLD_BYTES);
    let mut back = ReadBack::new(file);
    // A piece read back is checked again against the chaining value it verified with only
    // when someone other than this process's user could have written the file since
    // (decision 0020): the job's owner, when the daemon runs the job for a user.
    let mut read_at = |at: u64, len: usize| {
        let bytes = back.read(at, len)?;
        Ok((bytes, !crate::store::fsuser::only_ours(file)))
    };
    let mut pieces = 0u32;
    for (index, bytes, cv) in rx {
        pieces += 1;
        sha.add(index, bytes, cv, &mut read_at)?;
    }
    debug!(
        pieces,
        read_back = sha.read_back(),
        "SHA-256 taken in file order"
    );
    Ok(sha.finish())
}

/// Reads pieces back for the SHA-256 thread. Where the file system allows it, through a
/// descriptor of the same inode opened with `O_DIRECT`, into a pooled aligned buffer: pieces
/// are mostly written with `O_DIRECT` too ([`PieceWriter`]), so they are not in the page
/// cache, and a buffered read would copy them through it and read ahead into pieces not yet
/// written (zeroed pages the next direct write must evict). In a swarm, where pieces arrive
/// from several members' origin fronts at once, most pieces are read back
/// (`docs/benchmarks.md`). The kernel writes back any buffered piece before a direct read of
/// its range, so both paths read what was written.
struct ReadBack<'a> {
    buffered: &'a File,
    direct: Option<File>,
}

impl<'a> ReadBack<'a> {
    fn new(buffered: &'a File) -> Self {
        use std::os::unix::{fs::OpenOptionsExt, io::AsRawFd};
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", buffered.as_raw_fd()))
            .ok();
        Self { buffered, direct }
    }

    /// The `len` bytes at `at`; fewer only at the end of the file.
    fn read(&mut self, at: u64, len: usize) -> std::io::Result<Bytes> {
        if let Some(direct) = &self.direct
            && at.is_multiple_of(DIRECT_ALIGN as u64)
        {
            let padded = len.next_multiple_of(DIRECT_ALIGN);
            let mut buf = crate::bufpool::take(padded + DIRECT_ALIGN);
            let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
            let mut got = 0;
            // Direct reads come short only at the end of the file; a short read anywhere
            // else (or a refused one) falls back to the page cache.
            let direct_ok = loop {
                match direct.read_at(&mut buf[start + got..start + padded], at + got as u64) {
                    Ok(0) => break true,
                    Ok(n) => {
                        got += n;
                        if got >= len || !got.is_multiple_of(DIRECT_ALIGN) {
                            break true;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break false,
                    Err(e) => return Err(e),
                }
            };
            if !direct_ok {
                self.direct = None;
            } else if got >= len {
                return Ok(crate::bufpool::into_bytes(buf).slice(start..start + len));
            }
        }
        let mut buf = crate::bufpool::take(len);
        let mut got = 0;
        while got < len {
            match self.buffered.read_at(&mut buf[got..], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(crate::bufpool::into_bytes(buf))
    }
}

/// Creates the temporary file afresh, as the job's owner: an old file (or a symlink put in
/// its place) is removed, and the new one is created exclusively, never through a symlink,
/// with the owner's usual mode ([`crate::store::fsuser::file_mode`]).
pub(super) fn create_temp(path: &Path, owner: Option<u32>, length: u64) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::store::fsuser::as_owner(owner, || {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // The owner's usual mode, whatever the daemon's umask.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(
            crate::store::fsuser::file_mode(owner),
        ))?;
        file.set_len(length)?;
        Ok(file)
    })
}

/// Opens the temporary file of an earlier run, as the job's owner, never through a symlink.
pub(super) fn open_temp(path: &Path, owner: Option<u32>, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::store::fsuser::as_owner(owner, || {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
    })
}

/// Checks again the pieces an earlier run left in `temp`: against the layer, or hashed into
/// the content id being derived. Returns the pieces that pass, and the checker to go on with.
pub(super) fn recheck(
    temp: &Path,
    geometry: ContentId,
    pieces: &Bitfield,
    mut checker: Checker,
    owner: Option<u32>,
) -> std::io::Result<(Bitfield, Checker)> {
    let file = open_temp(temp, owner, false)?;
    let mut kept = Bitfield::new(pieces.len());
    let mut buf = Vec::new();
    for index in pieces.ones() {
        let Some(range) = geometry.piece_range(index) else {
            continue;
        };
        buf.resize(
            usize::try_from(range.end - range.start).unwrap_or(usize::MAX),
            0,
        );
        file.read_exact_at(&mut buf, range.start)?;
        let ok = match &mut checker {
            Checker::Layer(l) => l.verify_piece(index, &buf).is_ok(),
            Checker::Builder(b) => b.add_piece(index, &buf).is_ok(),
        };
        if ok {
            kept.set(index);
        } else {
            warn!(path = %temp.display(), index, "a piece kept from an earlier run fails its check; fetching it again");
        }
    }
    Ok((kept, checker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_batch_holds_at_most_four_mib_of_pieces_however_fast_they_come() {
        let piece =
            |i: u32, len: usize| ToWriter::Piece(i, Source::Origin, Bytes::from(vec![0; len]));
        let (tx, mut rx) = mpsc::channel(256);
        // 1 MiB pieces waiting (the senders refill the queue as the writer drains it):
        // four go into one batch, not 64 (64 MiB).
        for i in 1..20 {
            tx.try_send(piece(i, 1 << 20)).unwrap();
        }
        let batch = take_batch(piece(0, 1 << 20), &mut rx);
        assert_eq!(batch.len(), 4);
        assert_eq!(batch.iter().map(ToWriter::bytes).sum::<usize>(), 4 << 20);
        // Small pieces still share one flush, up to 64 of them.
        let (tx, mut rx) = mpsc::channel(256);
        for i in 1..100 {
            tx.try_send(piece(i, 16 * 1024)).unwrap();
        }
        tx.try_send(ToWriter::Forget(vec![1])).unwrap();
        assert_eq!(
            take_batch(piece(0, 16 * 1024), &mut rx).len(),
            CHECKPOINT_BATCH
        );
        // What waits is all there is: no waiting for more.
        let (tx, mut rx) = mpsc::channel(4);
        tx.try_send(piece(1, 1 << 20)).unwrap();
        assert_eq!(take_batch(piece(0, 1 << 20), &mut rx).len(), 2);
    }

    #[test]
    fn pieces_read_back_for_the_sha256_must_still_be_the_verified_ones() {
        use std::os::unix::fs::FileExt as _;
        let piece = 16 * 1024u64;
        let bytes: Vec<u8> = (0..3 * piece).map(|i| (i % 251) as u8).collect();
        let d = shoal_validator::hash_reader(&bytes[..], bytes.len() as u64).unwrap();
        let cvs = d.layer.chaining_values().to_vec();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, &bytes).unwrap();
        let run = |file: &File| {
            let (tx, rx) = std::sync::mpsc::sync_channel(8);
            // Pieces 2 and 1 come first and without their bytes (read back), then piece 0.
            for i in [2u32, 1] {
                tx.send((i, None, Some(cvs[i as usize]))).unwrap();
            }
            let p0 = Bytes::copy_from_slice(&bytes[..piece as usize]);
            tx.send((0, Some(p0), Some(cvs[0]))).unwrap();
            drop(tx);
            sha_in_order(file, rx, piece, bytes.len() as u64)
        };
        let file = File::open(&path).unwrap();
        assert_eq!(run(&file).unwrap(), Some(d.sha256));
        // Someone writes into piece 2 after it verified, in a file others may write (a job's
        // owner, for the daemon): the piece is checked again, no SHA-256 is claimed for it.
        use std::os::unix::fs::PermissionsExt;
        let chmod = |mode| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        chmod(0o664);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"changed", 2 * piece + 9)
            .unwrap();
        let e = run(&file).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        // In a file only this process's user can write, the piece is hashed as read (decision
        // 0020): the SHA-256 is that of the changed file, which the expected digest refuses.
        chmod(0o644);
        let changed = shoal_validator::hash_reader(std::fs::File::open(&path).unwrap(), 3 * piece)
            .unwrap()
            .sha256;
        assert_ne!(changed, d.sha256);
        assert_eq!(run(&file).unwrap(), Some(changed));
    }

    #[test]
    fn pieces_read_back_are_what_was_written_directly_or_through_the_page_cache() {
        let piece = 16 * 1024u64;
        // Two whole pieces and a short last one, as a download writes them: piece 0 through
        // `O_DIRECT` where the file system allows it, pieces 1 and 2 through the page cache
        // (still dirty when read back).
        let bytes: Vec<u8> = (0..2 * piece + 100).map(|i| (i % 253) as u8).collect();
        // In the crate's directory: on the disk's file system (`/tmp` may be a tmpfs).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let file = Arc::new(create_temp(&dir.path().join("t"), None, bytes.len() as u64).unwrap());
        let mut writer = PieceWriter::new(file.clone(), piece);
        let mut aligned = crate::bufpool::take(piece as usize + DIRECT_ALIGN);
        let start = aligned.as_ptr().align_offset(DIRECT_ALIGN);
        aligned[start..start + piece as usize].copy_from_slice(&bytes[..piece as usize]);
        writer
            .write(0, &aligned[start..start + piece as usize])
            .unwrap();
        file.write_all_at(&bytes[piece as usize..], piece).unwrap();
        let mut back = ReadBack::new(&file);
        let direct = back.direct.is_some();
        for i in [2u64, 0, 1] {
            let at = i * piece;
            let len = (bytes.len() as u64 - at).min(piece) as usize;
            let got = back.read(at, len).unwrap();
            assert_eq!(
                &got[..],
                &bytes[at as usize..at as usize + len],
                "piece {i} (O_DIRECT: {direct})"
            );
        }
        // Past the end: short, never padded.
        assert_eq!(back.read(2 * piece, piece as usize).unwrap().len(), 100);
    }
}
