//! The job model: BITS job states, priorities, files, errors and the one state machine every
//! state change goes through.
//!
//! State names and the transitions follow `IBackgroundCopyJob` (Resume, Suspend, Cancel,
//! Complete) and `BG_JOB_STATE`; see `docs/jobs.md` for the full table and the choices made
//! where BITS is silent.

pub mod http;
pub(crate) mod slots;

pub use http::{ClientCertificate, Credentials, HttpOptions, ProxyUsage};

use std::{
    fmt,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use shoal_validator::{ContentId, Expected, ValidationState};
use thiserror::Error;
use uuid::Uuid;

/// A job's id (a random UUID), as BITS's job GUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub Uuid);

impl JobId {
    /// A fresh random id.
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// A job's priority (BITS `BG_JOB_PRIORITY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Transfers as fast as possible, before every other priority.
    Foreground,
    /// Background, before Normal and Low.
    High,
    /// Background, the default.
    #[default]
    Normal,
    /// Background, last.
    Low,
}

/// A job's type (BITS `BG_JOB_TYPE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum JobType {
    /// Files from their origins (and peers) to local names (`BG_JOB_TYPE_DOWNLOAD`).
    #[default]
    Download,
    /// One local file to a BITS upload server (`BG_JOB_TYPE_UPLOAD`), over the BITS Upload
    /// Protocol.
    Upload,
    /// An upload whose server answers with a reply, downloaded to the client
    /// (`BG_JOB_TYPE_UPLOAD_REPLY`).
    UploadReply,
}

impl JobType {
    /// True for Upload and UploadReply.
    #[must_use]
    pub fn is_upload(self) -> bool {
        !matches!(self, Self::Download)
    }
}

/// A job's state (BITS `BG_JOB_STATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting to run.
    Queued,
    /// Looking for sources: asking peers and contacting the origin.
    Connecting,
    /// Bytes are arriving.
    Transferring,
    /// Paused by the caller; a new job starts here.
    Suspended,
    /// A fatal error; the caller may fix it and Resume, or Cancel.
    Error,
    /// A recoverable error (no source reachable); retried after the job's retry delay.
    TransientError,
    /// Every file has been transferred and verified; waiting for Complete.
    Transferred,
    /// Completed: the files are under their names. Final.
    Acknowledged,
    /// Cancelled: temporary files deleted. Final.
    Cancelled,
}

impl State {
    /// True for Acknowledged and Cancelled, from which nothing leaves.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Acknowledged | Self::Cancelled)
    }

    /// True while the job's runner should be working (Queued, Connecting, Transferring,
    /// TransientError).
    #[must_use]
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Queued | Self::Connecting | Self::Transferring | Self::TransientError
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What moves a job from one state to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The caller's Resume (`IBackgroundCopyJob::Resume`).
    Resume,
    /// The caller's Suspend (`IBackgroundCopyJob::Suspend`).
    Suspend,
    /// The caller's Cancel (`IBackgroundCopyJob::Cancel`).
    Cancel,
    /// The caller's Complete (`IBackgroundCopyJob::Complete`).
    Complete,
    /// The caller added a file (`IBackgroundCopyJob::AddFile`).
    AddFile,
    /// The runner started looking for sources.
    Connect,
    /// The first bytes arrived.
    Transfer,
    /// Every file verified and was validated.
    AllTransferred,
    /// A recoverable failure.
    TransientFailure,
    /// A fatal failure.
    Fail,
    /// The retry delay after a TransientError elapsed.
    Retry,
    /// The job gave its transfer slot to another job and waits for one again.
    Requeue,
}

/// An illegal transition; the job is unchanged.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{transition:?} is not allowed in state {from}")]
pub struct InvalidState {
    /// The state the job was in.
    pub from: State,
    /// The transition attempted.
    pub transition: Transition,
}

/// The state a job moves to on `transition` from `from`, or [`InvalidState`].
///
/// Resume with no files (BITS `BG_E_EMPTY`) is checked by the caller, which knows the files.
///
/// # Errors
/// [`InvalidState`] for any transition the table in `docs/jobs.md` does not list.
pub fn next_state(from: State, transition: Transition) -> Result<State, InvalidState> {
    use State as S;
    use Transition as T;
    let to = match (from, transition) {
        (S::Suspended | S::Error | S::TransientError, T::Resume) => S::Queued,
        (S::Queued | S::Connecting | S::Transferring | S::Transferred, T::Resume) => from,
        (
            S::Queued | S::Connecting | S::Transferring | S::TransientError | S::Error,
            T::Suspend,
        ) => S::Suspended,
        (S::Suspended, T::Suspend) => S::Suspended,
        (s, T::Cancel) if !s.is_final() => S::Cancelled,
        (s, T::Complete) if !s.is_final() => S::Acknowledged,
        (S::Transferred, T::AddFile) => S::Queued,
        (s, T::AddFile) if !s.is_final() => s,
        (S::Queued | S::TransientError, T::Connect) => S::Connecting,
        (S::Connecting | S::Transferring, T::Connect) => from,
        (S::Connecting | S::Transferring, T::Transfer) => S::Transferring,
        (S::Queued | S::Connecting | S::Transferring, T::AllTransferred) => S::Transferred,
        (S::Queued | S::Connecting | S::Transferring | S::TransientError, T::TransientFailure) => {
            S::TransientError
        }
        (S::Queued | S::Connecting | S::Transferring | S::TransientError, T::Fail) => S::Error,
        (S::TransientError, T::Retry) => S::Queued,
        (S::Queued | S::Connecting | S::Transferring, T::Requeue) => S::Queued,
        _ => {
            return Err(InvalidState { from, transition });
        }
    };
    Ok(to)
}

/// Where a job error happened (BITS `BG_ERROR_CONTEXT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorContext {
    /// No further context.
    None,
    /// The remote file: the origin answered with an error, or its content changed or failed
    /// verification.
    RemoteFile,
    /// The local file: creating, writing or renaming it failed.
    LocalFile,
    /// The transport: connections to the origin or peers failed.
    Transport,
    /// The caller rejected a file through its validation verdict.
    Validation,
    /// The caller's notification handler.
    Notification,
    /// The server's TLS certificate did not verify (BITS
    /// `BG_ERROR_CONTEXT_SERVER_CERTIFICATE_CALLBACK`, context 8).
    ServerCertificate,
}

/// A job's error: where it happened, which file, and a description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobError {
    /// Where it happened.
    pub context: ErrorContext,
    /// The index of the file concerned, if any.
    pub file: Option<usize>,
    /// A one-line description naming what was wrong (a URL, a path, a digest).
    pub description: String,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.context, self.description)
    }
}

/// A byte range of a remote file (BITS `BG_FILE_RANGE`): `length` bytes from `offset`, or to
/// the end of the file when `length` is `None` (`BG_LENGTH_TO_EOF`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// The first byte, counted from the start of the remote file.
    pub offset: u64,
    /// The number of bytes; `None` for all bytes to the end of the file.
    pub length: Option<u64>,
}

/// A file to add to a job (`IBackgroundCopyJob::AddFile`, or `IBackgroundCopyJob3::
/// AddFileWithRanges` with `ranges`, plus the expected digests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    /// The origin URL, `http` or `https`.
    pub url: url::Url,
    /// The local name: the path the file takes on Complete.
    pub local_name: PathBuf,
    /// The expected digests; with none, only the origin is used. With `ranges`, they are the
    /// digests of the local file (the ranges concatenated).
    pub expected: Expected,
    /// Only these ranges of the remote file, written one after the other in the order given
    /// (BITS: ranges 100-199, 900-999, 400-499 make a local file of 300 bytes in that order).
    /// Empty: the whole file. Ranged files come from the origin only.
    pub ranges: Vec<ByteRange>,
}

/// A snapshot of one file of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// The origin URL.
    pub url: url::Url,
    /// The local name.
    pub local_name: PathBuf,
    /// The temporary file beside the local name that holds the bytes until Complete.
    pub temp_name: PathBuf,
    /// The expected digests.
    pub expected: Expected,
    /// The ranges of the remote file to fetch (empty: all of it).
    pub ranges: Vec<ByteRange>,
    /// The content id once known (expected BLAKE3, a peer's claim, or computed).
    pub content_id: Option<ContentId>,
    /// The SHA-256 computed over the verified file.
    pub sha256: Option<shoal_validator::Sha256Digest>,
    /// Length in bytes, once known.
    pub bytes_total: Option<u64>,
    /// Verified bytes written so far.
    pub bytes_transferred: u64,
    /// Of the verified bytes, how many came from each kind of source. A resume keeps the
    /// counts stored for the bytes already in the temporary file; a transfer that starts
    /// over (nothing kept) starts them at zero.
    pub bytes_from: BytesBySource,
    /// True once every byte verified and the caller validated the file.
    pub transferred: bool,
    /// The caller's verdict.
    pub validation_state: ValidationState,
}

impl FileInfo {
    /// A file as BITS `AddFile` adds it: `spec`, downloaded into `temp_name`, nothing
    /// transferred yet.
    pub(crate) fn added(spec: FileSpec, temp_name: PathBuf) -> Self {
        Self {
            url: spec.url,
            local_name: spec.local_name,
            temp_name,
            expected: spec.expected,
            ranges: spec.ranges,
            content_id: None,
            sha256: None,
            bytes_total: None,
            bytes_transferred: 0,
            bytes_from: BytesBySource::default(),
            transferred: false,
            validation_state: ValidationState::Unknown,
        }
    }
}

/// Verified bytes by the kind of source they came from: a file's, a job's (the sum of its
/// files') or the node's since it started. The kinds are Delivery Optimization's
/// (`Get-DeliveryOptimizationStatus` and `Get-DeliveryOptimizationPerfSnap`): BytesFromHttp,
/// BytesFromLanPeers, BytesFromGroupPeers and BytesFromCacheServer. Bytes are counted once
/// they verified; a piece that failed verification counts nowhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BytesBySource {
    /// From the origin, over HTTP (DO's BytesFromHttp).
    pub origin: u64,
    /// From LAN peers: listed, found by mDNS, or connected from a private address (DO's
    /// BytesFromLanPeers).
    pub lan_peers: u64,
    /// From peers found through the DHT, the group's or the public one (DO's
    /// BytesFromGroupPeers).
    pub group_peers: u64,
    /// From configured cache nodes (DO's BytesFromCacheServer).
    pub cache: u64,
}

impl BytesBySource {
    /// Bytes from peers of every kind and cache nodes: everything but the origin.
    #[must_use]
    pub fn peers(&self) -> u64 {
        self.lan_peers + self.group_peers + self.cache
    }

    /// Bytes from every source.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.origin + self.peers()
    }

    /// Delivery Optimization's PercentPeerCaching: `100 × peers / (peers + origin)`, the
    /// share of the bytes that did not come from the origin, in percent (0 with no bytes).
    #[must_use]
    pub fn percent_peer_caching(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            all => 100.0 * self.peers() as f64 / all as f64,
        }
    }
}

impl std::ops::AddAssign for BytesBySource {
    fn add_assign(&mut self, o: Self) {
        self.origin += o.origin;
        self.lan_peers += o.lan_peers;
        self.group_peers += o.group_peers;
        self.cache += o.cache;
    }
}

impl std::iter::Sum for BytesBySource {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |mut a, b| {
            a += b;
            a
        })
    }
}

/// Notification flags (BITS `BG_NOTIFY_*`, same values): which events a job's owner is told
/// of, by an API client or the notify command line.
pub mod notify {
    /// JobTransferred (`BG_NOTIFY_JOB_TRANSFERRED`).
    pub const JOB_TRANSFERRED: u32 = 0x1;
    /// JobError (`BG_NOTIFY_JOB_ERROR`).
    pub const JOB_ERROR: u32 = 0x2;
    /// No notifications at all (`BG_NOTIFY_DISABLE`).
    pub const DISABLE: u32 = 0x4;
    /// JobModification (`BG_NOTIFY_JOB_MODIFICATION`).
    pub const JOB_MODIFICATION: u32 = 0x8;
    /// FileTransferred (`BG_NOTIFY_FILE_TRANSFERRED`).
    pub const FILE_TRANSFERRED: u32 = 0x10;
    /// BITS's default: JobTransferred and JobError.
    pub const DEFAULT: u32 = JOB_TRANSFERRED | JOB_ERROR;
}

/// A job's settable properties (BITS `SetMinimumRetryDelay`, `SetNoProgressTimeout`,
/// `SetNotifyFlags`, `SetNotifyCmdLine`, `SetMaximumDownloadTime`, and the HTTP options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobProperties {
    /// How long to wait after a TransientError, and between notification attempts that were
    /// not acknowledged. BITS default 600 s, minimum 5 s (the node enforces the minimum where
    /// the caller sets it through the API).
    pub retry_delay: Duration,
    /// How long a job may go without progress in TransientError before it moves to Error.
    /// BITS default 14 days; zero means at the first transient error.
    pub no_progress_timeout: Duration,
    /// [`notify`] flags.
    pub notify_flags: u32,
    /// The program and arguments run when no client takes a JobTransferred or JobError
    /// notification (BITS `SetNotifyCmdLine`); the job id is appended as the last argument.
    pub notify_cmdline: Option<Vec<String>>,
    /// The longest time the job may spend in Connecting or Transferring before it moves to
    /// Error (BITS `SetMaximumDownloadTime`, `BG_E_MAXDOWNLOAD_TIMEOUT`; default 90 days).
    /// Time in Queued, TransientError and Suspended does not count; Resume starts the count
    /// again.
    pub max_download_time: Duration,
    /// What the job's origin requests carry: headers, credentials, certificates, proxies.
    pub http: HttpOptions,
}

/// BITS's default maximum download time: 7,776,000 s (90 days).
pub const DEFAULT_MAX_DOWNLOAD_TIME: Duration = Duration::from_secs(7_776_000);

/// The minimum retry delay BITS allows, in seconds.
pub const MIN_RETRY_DELAY: Duration = Duration::from_secs(5);

impl Default for JobProperties {
    fn default() -> Self {
        Self {
            retry_delay: Duration::from_secs(600),
            no_progress_timeout: Duration::from_secs(14 * 24 * 3600),
            notify_flags: notify::DEFAULT,
            notify_cmdline: None,
            max_download_time: DEFAULT_MAX_DOWNLOAD_TIME,
            http: HttpOptions::default(),
        }
    }
}

/// Counters of a job's trouble with peers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Pieces that failed verification and were discarded.
    pub pieces_rejected: u64,
    /// Peers banned for serving bad data or a false claim.
    pub peers_banned: u64,
}

/// A snapshot of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// The id.
    pub id: JobId,
    /// The display name.
    pub display_name: String,
    /// The priority.
    pub priority: Priority,
    /// The state.
    pub state: State,
    /// The Unix user that owns the job (the daemon's API caller), or `None` for jobs made
    /// through the library.
    pub owner: Option<u32>,
    /// The settable properties.
    pub properties: JobProperties,
    /// The files, in the order they were added.
    pub files: Vec<FileInfo>,
    /// The last error, if the job is or was in Error or TransientError.
    pub error: Option<JobError>,
    /// Trouble with peers.
    pub peer_stats: PeerStats,
    /// Creation time.
    pub created: SystemTime,
    /// Last modification time (any state or progress change).
    pub modified: SystemTime,
    /// When the job reached Transferred.
    pub transfer_completed: Option<SystemTime>,
    /// Time spent in Connecting and Transferring since the last Resume, counted against
    /// [`JobProperties::max_download_time`] (to the end of the last transfer run; a run in
    /// progress is added when it ends).
    pub active_time: Duration,
    /// Download, Upload or UploadReply.
    pub job_type: JobType,
    /// An upload-reply job's reply file (BITS `GetReplyFileName`): `LOCAL.reply` beside the
    /// uploaded file; it appears there on Complete.
    pub reply_file_name: Option<PathBuf>,
    /// The upload session the server opened (`BITS-Session-Id`) and not yet closed; with the
    /// file's `bytes_transferred` (what the server acknowledged), where an upload resumes.
    pub upload_session: Option<String>,
}

impl JobInfo {
    /// A new job as BITS `CreateJob` makes it: Suspended, with no files, created at `now`.
    pub(crate) fn created(
        id: JobId,
        display_name: &str,
        priority: Priority,
        owner: Option<u32>,
        properties: JobProperties,
        now: SystemTime,
    ) -> Self {
        Self {
            id,
            display_name: display_name.to_owned(),
            priority,
            state: State::Suspended,
            owner,
            properties,
            files: Vec::new(),
            error: None,
            peer_stats: PeerStats::default(),
            created: now,
            modified: now,
            transfer_completed: None,
            active_time: Duration::ZERO,
            job_type: JobType::Download,
            reply_file_name: None,
            upload_session: None,
        }
    }

    /// Total bytes of the files whose length is known.
    #[must_use]
    pub fn bytes_total(&self) -> u64 {
        self.files.iter().filter_map(|f| f.bytes_total).sum()
    }

    /// Verified bytes so far, over all files.
    #[must_use]
    pub fn bytes_transferred(&self) -> u64 {
        self.files.iter().map(|f| f.bytes_transferred).sum()
    }

    /// Verified bytes by source, over all files.
    #[must_use]
    pub fn bytes_from(&self) -> BytesBySource {
        self.files.iter().map(|f| f.bytes_from).sum()
    }

    /// Delivery Optimization's PercentPeerCaching over all files
    /// ([`BytesBySource::percent_peer_caching`]).
    #[must_use]
    pub fn percent_peer_caching(&self) -> f64 {
        self.bytes_from().percent_peer_caching()
    }

    /// Files transferred and validated.
    #[must_use]
    pub fn files_transferred(&self) -> usize {
        self.files.iter().filter(|f| f.transferred).count()
    }
}

#[cfg(test)]
mod tests {
    use super::{State as S, Transition as T, *};

    #[test]
    fn bytes_by_source_add_up_and_give_do_s_percent_peer_caching() {
        assert_eq!(BytesBySource::default().percent_peer_caching(), 0.0);
        let a = BytesBySource {
            origin: 25,
            lan_peers: 50,
            group_peers: 0,
            cache: 0,
        };
        let b = BytesBySource {
            origin: 0,
            lan_peers: 0,
            group_peers: 15,
            cache: 10,
        };
        let sum: BytesBySource = [a, b].into_iter().sum();
        assert_eq!(
            sum,
            BytesBySource {
                origin: 25,
                lan_peers: 50,
                group_peers: 15,
                cache: 10,
            }
        );
        assert_eq!((sum.peers(), sum.total()), (75, 100));
        assert_eq!(sum.percent_peer_caching(), 75.0);
        let origin_only = BytesBySource {
            origin: 7,
            ..BytesBySource::default()
        };
        assert_eq!(origin_only.percent_peer_caching(), 0.0);
    }

    const ALL: [S; 9] = [
        S::Queued,
        S::Connecting,
        S::Transferring,
        S::Suspended,
        S::Error,
        S::TransientError,
        S::Transferred,
        S::Acknowledged,
        S::Cancelled,
    ];

    #[test]
    fn final_states_refuse_everything() {
        for t in [
            T::Resume,
            T::Suspend,
            T::Cancel,
            T::Complete,
            T::AddFile,
            T::Connect,
        ] {
            for s in [S::Acknowledged, S::Cancelled] {
                assert_eq!(
                    next_state(s, t),
                    Err(InvalidState {
                        from: s,
                        transition: t
                    })
                );
            }
        }
    }

    #[test]
    fn cancel_and_complete_work_from_every_live_state() {
        for s in ALL.into_iter().filter(|s| !s.is_final()) {
            assert_eq!(next_state(s, T::Cancel), Ok(S::Cancelled));
            assert_eq!(next_state(s, T::Complete), Ok(S::Acknowledged));
        }
    }

    #[test]
    fn the_normal_life_of_a_job() {
        let mut s = S::Suspended;
        for (t, want) in [
            (T::Resume, S::Queued),
            (T::Connect, S::Connecting),
            (T::Transfer, S::Transferring),
            (T::TransientFailure, S::TransientError),
            (T::Retry, S::Queued),
            (T::Connect, S::Connecting),
            (T::AllTransferred, S::Transferred),
            (T::AddFile, S::Queued),
            (T::Connect, S::Connecting),
            (T::AllTransferred, S::Transferred),
            (T::Complete, S::Acknowledged),
        ] {
            s = next_state(s, t).unwrap();
            assert_eq!(s, want, "after {t:?}");
        }
    }

    #[test]
    fn runner_transitions_need_an_active_job() {
        assert!(next_state(S::Suspended, T::Connect).is_err());
        assert!(next_state(S::Suspended, T::Transfer).is_err());
        assert!(next_state(S::Transferred, T::Fail).is_err());
        assert!(next_state(S::Error, T::Retry).is_err());
        assert!(next_state(S::Transferred, T::Suspend).is_err());
        assert_eq!(next_state(S::Error, T::Resume), Ok(S::Queued));
    }
}
