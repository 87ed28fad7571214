//! Notification delivery: API clients watching events, the acknowledgements and verdicts they
//! send back, the notify command line, and the per-user bound on notifications in flight.
//!
//! Each job's [`Callback`] is a [`JobCallback`]. BITS calls `JobTransferred` until the
//! callback returns `S_OK`; here:
//! 1. if a client of the job's owner (or root) is watching, the event goes to every such
//!    client with a delivery id, and the first [`Hub::acknowledge`] of that id is the `S_OK`;
//! 2. if no client is watching, or none acknowledged within the job's retry delay, the job's
//!    notify command line runs (as the job's owner, with the job id as its last argument) and
//!    exit status 0 is the `S_OK`;
//! 3. otherwise the node calls again after the retry delay; a client that starts watching cuts
//!    that delay short ([`crate::Node::retry_now`]).
//!
//! JobError goes the same way. FileTransferred asks watching clients for a verdict
//! ([`Hub::set_verdict`]); with nobody watching, or no answer within the validation timeout,
//! the file counts as the configured default (Valid unless configured otherwise).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use shoal_validator::ValidationState;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{info, warn};

use crate::{
    daemon::control::{self as pb, event::Kind},
    events::{Callback, CallbackError, TransferredFile},
    job::{JobError, JobId, JobInfo, notify},
};

/// The shortest time a notify command line may run before it is stopped.
/// The most Watch streams one user may have open at once.
pub(crate) const WATCHERS_PER_USER: usize = 16;
const CMDLINE_LIMIT: Duration = Duration::from_secs(300);

/// Events queued for one watching client before it is considered gone.
const WATCH_QUEUE: usize = 256;

/// One client's `Watch` stream.
struct Watcher {
    uid: u32,
    job: Option<JobId>,
    progress: bool,
    tx: mpsc::Sender<Result<pb::Event, tonic::Status>>,
}

impl Watcher {
    fn sees(&self, job: JobId, owner: Option<u32>) -> bool {
        (self.uid == 0 || owner == Some(self.uid)) && self.job.is_none_or(|j| j == job)
    }
}

/// Deliveries waiting for an acknowledgement: id → the job's owner and the waiting callback.
type Acks = HashMap<u64, (Option<u32>, oneshot::Sender<()>)>;

/// Settings of notification delivery.
#[derive(Clone, Debug)]
pub struct NotifyConfig {
    /// How long a FileTransferred verdict is awaited from a watching client.
    pub validation_timeout: Duration,
    /// The verdict when nobody answers in time.
    pub validation_default: ValidationState,
    /// JobTransferred / JobError notifications in flight per user at a time.
    pub in_flight_per_user: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        Self {
            validation_timeout: Duration::from_secs(60),
            validation_default: ValidationState::Valid,
            in_flight_per_user: 4,
        }
    }
}

/// The daemon's notification hub, shared by the API service and every job's callback.
pub struct Hub {
    config: NotifyConfig,
    next_id: AtomicU64,
    watchers: Mutex<HashMap<u64, Watcher>>,
    /// Delivery id → the job's owner and the waiting callback.
    acks: Mutex<Acks>,
    /// Cancelled at shutdown: every wait for an answer ends.
    closing: tokio_util::sync::CancellationToken,
    /// (job, file) → the waiting callback.
    verdicts: Mutex<HashMap<(JobId, usize), oneshot::Sender<ValidationState>>>,
    /// Per user: notifications in flight.
    in_flight: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub with `config`.
    #[must_use]
    pub fn new(config: NotifyConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            next_id: AtomicU64::new(1),
            watchers: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            closing: tokio_util::sync::CancellationToken::new(),
            verdicts: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    fn next(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a watching client; returns its id and the receiving end of its stream, or
    /// `None` when user `uid` already has [`WATCHERS_PER_USER`] open streams.
    pub(crate) fn watch(
        &self,
        uid: u32,
        job: Option<JobId>,
        progress: bool,
    ) -> Option<(u64, mpsc::Receiver<Result<pb::Event, tonic::Status>>)> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let id = self.next();
        let mut watchers = locked(&self.watchers);
        watchers.retain(|_, w| !w.tx.is_closed());
        if watchers.values().filter(|w| w.uid == uid).count() >= WATCHERS_PER_USER {
            return None;
        }
        watchers.insert(
            id,
            Watcher {
                uid,
                job,
                progress,
                tx,
            },
        );
        Some((id, rx))
    }

    /// Sends `event` of `job` (owned by `owner`) to every client that may see it; returns how
    /// many took it. Clients whose stream is closed or full are dropped.
    pub(crate) fn send(&self, job: JobId, owner: Option<u32>, event: &pb::Event) -> usize {
        let progress = matches!(event.kind, Some(Kind::Progress(_)));
        let mut watchers = locked(&self.watchers);
        let mut sent = 0;
        watchers.retain(|_, w| {
            if !w.sees(job, owner) || (progress && !w.progress) {
                return !w.tx.is_closed();
            }
            match w.tx.try_send(Ok(event.clone())) {
                Ok(()) => {
                    sent += 1;
                    true
                }
                Err(_) => false,
            }
        });
        sent
    }

    /// Ends every client's stream (at shutdown, so that the server's graceful stop does not
    /// wait for streams that never end).
    pub(crate) fn close_all(&self) {
        self.closing.cancel();
        locked(&self.watchers).clear();
    }

    /// Whether a client that may see `job` is watching.
    pub(crate) fn watched(&self, job: JobId, owner: Option<u32>) -> bool {
        locked(&self.watchers)
            .values()
            .any(|w| w.sees(job, owner) && !w.tx.is_closed())
    }

    /// Whether any client watches with progress events.
    pub(crate) fn wants_progress(&self) -> bool {
        locked(&self.watchers)
            .values()
            .any(|w| w.progress && !w.tx.is_closed())
    }

    /// Acknowledges delivery `id` for a caller who may see jobs of `may_see`'s owners; false
    /// when it is unknown, already answered, or another user's.
    pub(crate) fn acknowledge(&self, id: u64, may_see: impl Fn(Option<u32>) -> bool) -> bool {
        let mut acks = locked(&self.acks);
        match acks.get(&id) {
            Some((owner, _)) if may_see(*owner) => {
                acks.remove(&id).is_some_and(|(_, tx)| tx.send(()).is_ok())
            }
            _ => false,
        }
    }

    /// Answers the pending verdict of `file` of `job`; false when none is pending.
    pub(crate) fn set_verdict(&self, job: JobId, file: usize, state: ValidationState) -> bool {
        locked(&self.verdicts)
            .remove(&(job, file))
            .is_some_and(|tx| tx.send(state).is_ok())
    }

    fn permits(&self, uid: u32) -> Arc<Semaphore> {
        locked(&self.in_flight)
            .entry(uid)
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.in_flight_per_user.max(1))))
            .clone()
    }

    /// Delivers a notification that needs an acknowledgement (steps 1 and 2 of the module
    /// docs). Ok when acknowledged.
    async fn deliver(
        self: Arc<Self>,
        info: JobInfo,
        kind: impl Fn(u64) -> Kind,
        what: &'static str,
    ) -> Result<(), CallbackError> {
        let owner_key = info.owner.unwrap_or(0);
        let permits = self.permits(owner_key);
        let _permit = permits
            .acquire_owned()
            .await
            .map_err(|_| CallbackError("notification bound closed".into()))?;
        if self.watched(info.id, info.owner) {
            let id = self.next();
            let (tx, rx) = oneshot::channel();
            locked(&self.acks).insert(id, (info.owner, tx));
            // The entry goes when this delivery ends, however it ends.
            let _forget = Forget(&self.acks, id);
            let event = pb::Event {
                job: info.id.to_string(),
                kind: Some(kind(id)),
            };
            if self.send(info.id, info.owner, &event) > 0 {
                let acked = tokio::select! {
                    () = self.closing.cancelled() => None,
                    r = tokio::time::timeout(info.properties.retry_delay, rx) => r.ok(),
                };
                if matches!(acked, Some(Ok(()))) {
                    info!(job = %info.id, "{what} acknowledged by a client");
                    return Ok(());
                }
            }
        }
        if self.closing.is_cancelled() {
            return Err(CallbackError("the daemon is stopping".into()));
        }
        if let Some(argv) = &info.properties.notify_cmdline {
            // A command that runs longer than five minutes (or the retry delay, if longer) is
            // stopped and counts as failed, so that one hung program cannot hold the user's
            // notification slots for ever.
            let limit = info.properties.retry_delay.max(CMDLINE_LIMIT);
            return tokio::select! {
                () = self.closing.cancelled() => Err(CallbackError("the daemon is stopping".into())),
                r = tokio::time::timeout(limit, run_cmdline(argv, info.id, info.owner, what)) => {
                    r.unwrap_or_else(|_| Err(CallbackError(format!(
                        "the notify command line ran longer than {} s",
                        limit.as_secs()
                    ))))
                }
            };
        }
        Err(CallbackError(format!(
            "no client acknowledged {what} and the job has no notify command line"
        )))
    }
}

/// Removes a delivery's entry when dropped.
struct Forget<'a>(&'a Mutex<Acks>, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        locked(self.0).remove(&self.1);
    }
}

/// The `PATH` a notify command line gets (the owner's login environment is not known to the
/// daemon; this is the usual one for users).
const NOTIFY_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// Bytes of a notify command's output kept in the daemon's log, per stream.
const NOTIFY_LOG_BYTES: usize = 16 * 1024;

/// Runs the notify command line with the job id appended. Exit status 0 acknowledges.
///
/// The command runs as the user whose job it is (when the daemon runs as root: that user's
/// uid, primary group and supplementary groups, so it can call the daemon back), in a
/// session of its own with no controlling terminal, with standard input from `/dev/null`
/// and its output in the daemon's log (at most [`NOTIFY_LOG_BYTES`] per stream), a clean
/// environment (`HOME`, `USER`, `LOGNAME`, `SHELL` of the user's password entry and a
/// standard `PATH`), in the user's home directory (`/` when it has none). A user without a
/// password entry gets no command run.
async fn run_cmdline(
    argv: &[String],
    job: JobId,
    owner: Option<u32>,
    what: &str,
) -> Result<(), CallbackError> {
    use std::os::unix::process::CommandExt as _;
    let Some((program, args)) = argv.split_first() else {
        return Err(CallbackError("empty notify command line".into()));
    };
    // SAFETY: `geteuid` has no preconditions.
    let (euid, root) = unsafe { (libc::geteuid(), libc::geteuid() == 0) };
    let uid = owner.unwrap_or(euid);
    let user = crate::store::fsuser::passwd(uid)
        .ok_or_else(|| CallbackError(format!("user {uid} has no password entry")))?;
    let become_user = root && uid != 0;
    let groups = if become_user {
        crate::store::fsuser::group_list(&user.name, user.gid)
    } else {
        Vec::new()
    };
    let home = if user.home.is_dir() {
        user.home.clone()
    } else {
        std::path::PathBuf::from("/")
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .arg(job.to_string())
        .env_clear()
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell)
        .env("PATH", NOTIFY_PATH)
        .current_dir(&home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let gid = user.gid;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe system calls (setgroups, setgid, setuid, setsid) on data prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if become_user
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // A session of its own: no controlling terminal, nothing to inject keys into.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| CallbackError(format!("cannot run {program}: {e}")))?;
    // The readers end when the output closes, or shortly after the command exits (a
    // process it left behind may hold the output open).
    let readers = [
        tokio::spawn(log_output(child.stdout.take(), job, "stdout")),
        tokio::spawn(log_output(child.stderr.take(), job, "stderr")),
    ];
    let status = child.wait().await;
    for mut r in readers {
        if tokio::time::timeout(Duration::from_secs(1), &mut r)
            .await
            .is_err()
        {
            r.abort();
        }
    }
    let status = status.map_err(|e| CallbackError(format!("cannot run {program}: {e}")))?;
    if status.success() {
        info!(%job, "{what}: notify command line {program} succeeded");
        Ok(())
    } else {
        warn!(%job, "{what}: notify command line {program} failed: {status}");
        Err(CallbackError(format!("{program} exited with {status}")))
    }
}

/// Copies a notify command's output into the daemon's log, a line at a time, keeping at most
/// [`NOTIFY_LOG_BYTES`] and reading (and dropping) the rest so the command never blocks.
async fn log_output(
    stream: Option<impl tokio::io::AsyncRead + Unpin>,
    job: JobId,
    name: &'static str,
) {
    use tokio::io::AsyncBufReadExt as _;
    let Some(stream) = stream else { return };
    let mut lines = tokio::io::BufReader::new(stream).split(b'\n');
    let mut logged = 0usize;
    while let Ok(Some(line)) = lines.next_segment().await {
        if logged < NOTIFY_LOG_BYTES {
            let keep = &line[..line.len().min(NOTIFY_LOG_BYTES - logged)];
            logged += keep.len();
            info!(%job, stream = name, "notify command: {}", String::from_utf8_lossy(keep));
        }
    }
}

/// The callback the daemon gives each job: delivery through the [`Hub`].
#[derive(Debug)]
pub(crate) struct JobCallback {
    pub(crate) hub: Arc<Hub>,
}

impl Callback for JobCallback {
    fn file_transferred(
        &self,
        job: JobInfo,
        file: TransferredFile,
    ) -> BoxFuture<'static, ValidationState> {
        let hub = self.hub.clone();
        Box::pin(async move {
            let default = hub.config.validation_default;
            let flags = job.properties.notify_flags;
            let ask = flags & notify::FILE_TRANSFERRED != 0 && flags & notify::DISABLE == 0;
            let event = |awaits| pb::Event {
                job: job.id.to_string(),
                kind: Some(Kind::FileTransferred(pb::FileTransferred {
                    file: u32::try_from(file.index).unwrap_or(u32::MAX),
                    temp_name: file.temp_name.display().to_string(),
                    from_peers: file.from_peers,
                    awaits_verdict: awaits,
                })),
            };
            if !ask || !hub.watched(job.id, job.owner) {
                hub.send(job.id, job.owner, &event(false));
                return default;
            }
            let (tx, rx) = oneshot::channel();
            locked(&hub.verdicts).insert((job.id, file.index), tx);
            hub.send(job.id, job.owner, &event(true));
            let verdict: Option<ValidationState> = tokio::select! {
                () = hub.closing.cancelled() => None,
                r = tokio::time::timeout(hub.config.validation_timeout, rx) => r.ok().and_then(Result::ok),
            };
            locked(&hub.verdicts).remove(&(job.id, file.index));
            match verdict {
                Some(v) => v,
                None => {
                    info!(job = %job.id, file = file.index, "no verdict in time; the file counts as {default:?}");
                    default
                }
            }
        })
    }

    fn job_modification(&self, job: JobInfo) {
        // Sent from the state change itself, so it reaches clients before any notification
        // the new state leads to.
        self.hub.send(
            job.id,
            job.owner,
            &pb::Event {
                job: job.id.to_string(),
                kind: Some(Kind::JobModification(pb::JobModification {
                    state: super::convert::state_to_pb(job.state) as i32,
                })),
            },
        );
    }

    fn job_transferred(&self, job: JobInfo) -> BoxFuture<'static, Result<(), CallbackError>> {
        let hub = self.hub.clone();
        Box::pin(async move {
            let flags = job.properties.notify_flags;
            if flags & notify::DISABLE != 0 || flags & notify::JOB_TRANSFERRED == 0 {
                return Ok(());
            }
            hub.deliver(
                job,
                |delivery| Kind::JobTransferred(pb::JobTransferred { delivery }),
                "JobTransferred",
            )
            .await
        })
    }

    fn job_error(
        &self,
        job: JobInfo,
        error: JobError,
    ) -> BoxFuture<'static, Result<(), CallbackError>> {
        let hub = self.hub.clone();
        Box::pin(async move {
            let flags = job.properties.notify_flags;
            if flags & notify::DISABLE != 0 || flags & notify::JOB_ERROR == 0 {
                return Ok(());
            }
            let error = super::convert::error_to_pb(&error);
            hub.deliver(
                job,
                move |delivery| {
                    Kind::JobError(pb::JobErrorEvent {
                        delivery,
                        error: Some(error.clone()),
                    })
                },
                "JobError",
            )
            .await
        })
    }
}
