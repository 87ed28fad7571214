//! A job's runner: the task that lives a queued job's life. It waits for a transfer slot,
//! downloads each file, waits out retry delays, and delivers the BITS notifications until the
//! callback acknowledges them.
//!
//! The runner owns nothing of the job: every change goes to the registry as a step
//! ([`registry::Handle::step`]), which checks the runner's token first, so a runner that was
//! replaced or stopped (Suspend, Cancel, Complete, shutdown) changes nothing.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    Node,
    registry::{self, Registry},
    runner::Doing,
};
use crate::{
    download::{self, Durable, Failure, FileTask, Update},
    events::{Callback, Event, TransferredFile},
    job::{BytesBySource, ErrorContext, JobError, JobId, JobInfo, State, Transition},
};
use shoal_validator::{ContentId, ValidationState};

/// How a job's transfer (while it held a slot) ended.
pub(super) enum Ended {
    /// Stopped by Suspend, Cancel, shutdown, or preemption.
    Stopped,
    /// In TransientError; retry after this delay.
    Transient(Duration),
    /// In Error, with the job as it entered it (for the first JobError).
    Failed(Option<Box<Notice>>),
    /// Every file transferred, with the job as it became Transferred (for the first
    /// JobTransferred).
    Transferred(Option<Box<Notice>>),
}

/// A job's snapshot, its callback and its wake-up.
type Notice = (JobInfo, Option<Arc<dyn Callback>>, Arc<tokio::sync::Notify>);

/// The job's [`Notice`] as the registry holds it now.
fn notice(r: &Registry, job: JobId) -> Option<Box<Notice>> {
    r.jobs
        .get(&job)
        .map(|rec| Box::new((rec.info.clone(), rec.callback.clone(), rec.wake.clone())))
}

/// The job's snapshot, its callback and its wake-up, or `None` once it is gone.
async fn snapshot(reg: &registry::Handle, job: JobId) -> Option<Notice> {
    reg.step(move |r| notice(r, job).map(|n| *n))
        .await
        .flatten()
}

async fn transition(
    reg: &registry::Handle,
    job: JobId,
    token: &CancellationToken,
    t: Transition,
) -> bool {
    let token = token.clone();
    reg.step(move |r| r.transition(job, &token, t))
        .await
        .unwrap_or(false)
}

async fn set_doing(
    reg: &registry::Handle,
    job: JobId,
    token: &CancellationToken,
    doing: Doing,
) -> bool {
    let token = token.clone();
    reg.step(move |r| r.set_doing(job, &token, doing))
        .await
        .unwrap_or(false)
}

/// The runner holding `token` ended on its own: the job has none (one that was replaced or
/// stopped leaves the job as it is).
pub(super) async fn ended(node: &Node, job: JobId, token: CancellationToken) {
    node.registry()
        .step(move |r| {
            if let Some(rec) = r.jobs.get_mut(&job) {
                rec.runner.ended(&token);
            }
        })
        .await;
}

/// Moves the job to Error (unless the runner was stopped); the job as it entered it.
pub(super) async fn fail(
    reg: &registry::Handle,
    job: JobId,
    token: &CancellationToken,
    error: JobError,
) -> Option<Box<Notice>> {
    let token = token.clone();
    reg.step(move |r| r.fail(job, &token, error).then(|| notice(r, job)).flatten())
        .await
        .flatten()
}

/// Waits `d`, or less if [`Node::retry_now`] wakes the job; false when cancelled.
async fn sleep_or_cancel(
    token: &CancellationToken,
    wake: &tokio::sync::Notify,
    d: Duration,
) -> bool {
    tokio::select! {
        () = token.cancelled() => false,
        () = tokio::time::sleep(d) => true,
        () = wake.notified() => true,
    }
}

/// The life of a queued job: wait for a transfer slot, transfer, and deliver the
/// notifications once the slot is given back.
pub(super) async fn run_job(node: &Node, job: JobId, token: &CancellationToken) {
    let reg = node.registry();
    loop {
        let Some((info, _, wake)) = snapshot(reg, job).await else {
            return;
        };
        let Some(guard) = node.inner.slots.acquire(job, info.priority, token).await else {
            return;
        };
        if !set_doing(reg, job, token, Doing::Transferring).await {
            return;
        }
        let end = transfer(node, job, &guard.preempt).await;
        let preempted = guard.preempt.is_cancelled() && !token.is_cancelled();
        drop(guard);
        match end {
            // The job entered Error or Transferred: its first notification goes out even if
            // a Complete, Cancel or Suspend came right after.
            Ended::Failed(Some(first)) => {
                set_doing(reg, job, token, Doing::Notifying).await;
                deliver(node, job, token, State::Error, Some(first)).await;
                return;
            }
            Ended::Transferred(Some(first)) => {
                set_doing(reg, job, token, Doing::Notifying).await;
                let _ = node.inner.events.send(Event::JobTransferred { job });
                deliver(node, job, token, State::Transferred, Some(first)).await;
                return;
            }
            _ if token.is_cancelled() => return,
            Ended::Transient(_)
            | Ended::Stopped
            | Ended::Failed(None)
            | Ended::Transferred(None) => {}
        }
        let Some((info, _, _)) = snapshot(reg, job).await else {
            return;
        };
        match end {
            // Preempted, possibly while failing or finishing: the transition that would
            // have ended the run was refused, so the job queues again.
            _ if preempted
                && matches!(
                    info.state,
                    State::Queued | State::Connecting | State::Transferring
                ) =>
            {
                info!(%job, "yielding the transfer slot");
                if !transition(reg, job, token, Transition::Requeue).await
                    || !set_doing(reg, job, token, Doing::WaitingSlot).await
                {
                    return;
                }
            }
            Ended::Transient(delay) => {
                let go_on = set_doing(reg, job, token, Doing::RetryWait).await
                    && sleep_or_cancel(token, &wake, delay).await
                    && transition(reg, job, token, Transition::Retry).await
                    && set_doing(reg, job, token, Doing::WaitingSlot).await;
                if !go_on {
                    return;
                }
            }
            // Stopped, or the move to Error or Transferred was refused (the job is gone).
            Ended::Stopped | Ended::Failed(_) | Ended::Transferred(_) => return,
        }
    }
}

/// Delivers the notification of `state` to the job's callback (Transferred: JobTransferred,
/// Error: JobError) until it returns Ok or the job leaves `state` (BITS: called until S_OK is
/// returned). `first`: the job as it entered `state`, delivered once whatever happened since
/// (a Complete right after the job became Transferred still finds the notification given), as
/// when the move and the first call were one step under the job's lock.
pub(super) async fn deliver(
    node: &Node,
    job: JobId,
    token: &CancellationToken,
    state: State,
    mut first: Option<Box<Notice>>,
) {
    let mut failures = 0u32;
    loop {
        let (info, cb, wake) = match first.take() {
            Some(n) => *n,
            None => match snapshot(node.registry(), job).await {
                Some(n) if n.0.state == state && !token.is_cancelled() => n,
                _ => return,
            },
        };
        let delay = info.properties.retry_delay;
        let call = match (cb, state, info.error.clone()) {
            (Some(cb), State::Transferred, _) => cb.job_transferred(info),
            (Some(cb), State::Error, Some(error)) => cb.job_error(info, error),
            _ => return,
        };
        // Only the node's shutdown cuts a callback short: one that completes or cancels the
        // job itself (and so stops this runner) awaits that call and still finishes its work.
        let delivered = tokio::select! {
            biased;
            r = call => r,
            () = node.inner.shutdown.cancelled() => return,
        };
        match delivered {
            Ok(()) => return,
            Err(e) => {
                // Once a warning, then quietly: a job that waits for its Complete (nobody
                // watching, no notify command) would otherwise warn every retry delay.
                if failures == 0 {
                    warn!(%job, "the {state} notification was not acknowledged; it is delivered again every {delay:?} until it is (further attempts are logged at debug level): {e}");
                } else {
                    tracing::debug!(%job, attempt = failures + 1, "the {state} notification was not acknowledged, again in {delay:?}: {e}");
                }
                failures += 1;
                if !sleep_or_cancel(token, &wake, delay).await {
                    return;
                }
            }
        }
    }
}

/// The transfer of every file not yet transferred, while the job holds a slot, within what is
/// left of the job's maximum download time (BITS `SetMaximumDownloadTime`: time in Connecting
/// and Transferring counts, and the job goes to Error once it is spent). `token` is the slot's
/// preempt token (a child of the runner's).
async fn transfer(node: &Node, job: JobId, token: &CancellationToken) -> Ended {
    let reg = node.registry();
    let Some((info, _, _)) = snapshot(reg, job).await else {
        return Ended::Stopped;
    };
    let max = info.properties.max_download_time;
    let left = max.saturating_sub(info.active_time);
    let limit = token.child_token();
    let started = tokio::time::Instant::now();
    let end = {
        let files = transfer_files(node, job, &limit);
        tokio::pin!(files);
        let timer = tokio::time::sleep(left);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                end = &mut files => break end,
                () = &mut timer, if !limit.is_cancelled() => limit.cancel(),
            }
        }
    };
    let spent = started.elapsed();
    reg.step(move |r| {
        if let Some(rec) = r.jobs.get_mut(&job) {
            rec.info.active_time += spent;
            r.save_later(job);
        }
    })
    .await;
    if matches!(end, Ended::Stopped) && limit.is_cancelled() && !token.is_cancelled() {
        let error = JobError {
            context: ErrorContext::None,
            file: None,
            description: format!(
                "the job spent its maximum download time of {} s in Connecting and \
                 Transferring (BITS BG_E_MAXDOWNLOAD_TIMEOUT); Resume starts the count again",
                max.as_secs()
            ),
        };
        warn!(%job, "maximum download time of {} s spent", max.as_secs());
        return Ended::Failed(fail(reg, job, token, error).await);
    }
    end
}

/// [`transfer`] without the time limit: `token` is cancelled when the limit is reached.
async fn transfer_files(node: &Node, job: JobId, token: &CancellationToken) -> Ended {
    let reg = node.registry();
    if !transition(reg, job, token, Transition::Connect).await {
        return Ended::Stopped;
    }
    let env = match job_env(node, job).await {
        Ok(env) => env,
        Err(e) => return Ended::Failed(fail(reg, job, token, e).await),
    };
    if node.view(job).is_ok_and(|v| v.info.job_type.is_upload()) {
        return super::upload::run(node, &env, job, token).await;
    }
    let mut i = 0;
    loop {
        let Some((task, done)) = file_task(reg, job, i).await else {
            let t = token.clone();
            match reg.step(move |r| all_transferred(r, job, &t)).await {
                Some(Ok(next)) => i = next,
                Some(Err(ended)) => return ended,
                None => return Ended::Stopped,
            }
            continue;
        };
        if done {
            i += 1;
            continue;
        }
        let (task, result) = download_with_progress(node, &env, job, i, task, token).await;
        // Pieces verified and written by a download that stopped: the next run keeps them.
        if result.is_err() {
            let left = task.left.lock().unwrap_or_else(|e| e.into_inner()).take();
            let url = task.url.clone();
            reg.step(move |r| {
                // Not if the file got a new URL meanwhile and no digest pins its content: then
                // SetRemoteName discarded its pieces.
                if let Some(rec) = r.jobs.get_mut(&job)
                    && rec.info.files.get(i).is_some_and(|f| {
                        f.url == url || f.expected.blake3.is_some() || f.expected.sha256.is_some()
                    })
                    && let Some(f) = rec.files.get_mut(i)
                {
                    f.left = left;
                }
            })
            .await;
        }
        match result {
            Ok(d) => match file_transferred(node, job, token, &task, d).await {
                Ok(true) => i += 1,
                Ok(false) => {}
                Err(ended) => return ended,
            },
            Err(Failure::Cancelled) => return Ended::Stopped,
            Err(Failure::Fatal(e)) => return Ended::Failed(fail(reg, job, token, e).await),
            Err(Failure::Transient(e)) => return transient(reg, job, token, e).await,
        }
    }
}

/// What a transfer of `job` downloads with: the node's shared parts, with the job's own
/// origin client when it has HTTP options (its certificate files read as its owner).
///
/// # Errors
/// A job error (context LocalFile, naming the file or option) when a file cannot be read or
/// an option cannot be used.
pub(super) async fn job_env(node: &Node, job: JobId) -> Result<download::Env, JobError> {
    let env = node.inner.env.clone();
    let Ok(view) = node.view(job) else {
        return Ok(env);
    };
    let (http, owner) = (view.info.properties.http, view.info.owner);
    if http == crate::job::HttpOptions::default() {
        return Ok(env);
    }
    let local = |description: String| JobError {
        context: ErrorContext::LocalFile,
        file: None,
        description,
    };
    let options = http.clone();
    let files = tokio::task::spawn_blocking(move || {
        crate::store::fsuser::as_owner(owner, || {
            crate::source::origin::TlsFiles::read(&options).map_err(|(path, e)| {
                std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
            })
        })
    })
    .await
    .map_err(|e| local(format!("reading the job's certificate files: {e}")))?
    .map_err(|e| local(format!("cannot read a certificate file of the job: {e}")))?;
    let origin = crate::source::origin::Client::for_job(env.origin.config(), &http, &files)
        .map_err(local)?;
    Ok(download::Env { origin, ..env })
}

/// The download of file `i` (`true`: it is transferred already), with where an earlier run
/// left off; `None` past the last file.
async fn file_task(reg: &registry::Handle, job: JobId, i: usize) -> Option<(FileTask, bool)> {
    let (mut task, done, file) = reg
        .step(move |r| {
            let state = r.state.clone();
            let rec = r.jobs.get_mut(&job)?;
            let f = rec.info.files.get(i)?.clone();
            let resume = rec.files.get_mut(i).and_then(|f| f.left.take());
            let task = FileTask {
                index: i,
                priority: rec.info.priority,
                url: f.url.clone(),
                expected: f.expected,
                ranges: f.ranges.clone(),
                temp: f.temp_name.clone(),
                origin_only: rec.files[i].origin_only,
                resume,
                owner: rec.info.owner,
                durable: state.map(|store| Durable {
                    store,
                    job,
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                }),
                left: Mutex::new(None),
                cache_any_size: false,
                private_url: rec.info.properties.http.is_private(),
            };
            Some((task, f.transferred, f))
        })
        .await
        .flatten()?;
    // With a state store, pick up the pieces an earlier run left on disk.
    if !done && let Some(d) = &task.durable {
        let index = d.index;
        if let Some(r) = d
            .store
            .run(move |s| s.resume_point(job, index, &file))
            .await
            .flatten()
        {
            task.resume = Some(r);
        }
    }
    Some((task, done))
}

/// What a download reported since the registry last heard of it, folded: the registry hears
/// of progress in order, as often as it keeps up, and never loses a byte.
#[derive(Default)]
struct Delta {
    /// The file's length, content id and bytes already there (a new start).
    started: Option<(u64, Option<ContentId>, u64)>,
    content_id: Option<ContentId>,
    bytes: BytesBySource,
    rejected: u64,
    banned: u64,
}

impl Delta {
    fn add(&mut self, u: Update) {
        match u {
            Update::Started {
                length,
                content_id,
                resumed,
            } => {
                // Bytes before a new start do not count: it sets the file's progress.
                *self = Self {
                    started: Some((length, content_id, resumed)),
                    rejected: self.rejected,
                    banned: self.banned,
                    ..Self::default()
                };
            }
            Update::ContentId(id) => self.content_id = Some(id),
            Update::Piece { bytes, source } => self.bytes.add(source, bytes),
            Update::Rejected => self.rejected += 1,
            Update::Banned => self.banned += 1,
        }
    }

    fn is_empty(&self) -> bool {
        self.started.is_none()
            && self.content_id.is_none()
            && self.bytes.total() + self.rejected + self.banned == 0
    }
}

/// Applies a download's progress to file `index` of `job`; the first piece moves the job
/// from Connecting to Transferring.
fn progress(r: &mut Registry, job: JobId, token: &CancellationToken, index: usize, d: Delta) {
    let Ok(rec) = r.rec(job) else { return };
    rec.info.modified = SystemTime::now();
    let bytes = d.bytes.total();
    rec.info.peer_stats.pieces_rejected += d.rejected;
    rec.info.peer_stats.peers_banned += d.banned;
    if bytes > 0 {
        rec.transient_since = None;
        rec.touched = tokio::time::Instant::now();
    }
    let connecting = rec.info.state == State::Connecting;
    let Some(f) = rec.info.files.get_mut(index) else {
        return;
    };
    let started = d.started.is_some();
    if let Some((length, content_id, resumed)) = d.started {
        f.bytes_total = Some(length);
        f.content_id = content_id;
        f.bytes_transferred = resumed;
        if resumed == 0 {
            f.bytes_from = BytesBySource::default();
        }
    }
    if let Some(id) = d.content_id {
        f.content_id = Some(id);
    }
    f.bytes_transferred += bytes;
    f.bytes_from += d.bytes;
    let now = tokio::time::Instant::now();
    let due = bytes > 0 && now.duration_since(rec.progress_saved) >= Duration::from_secs(1);
    if started || due {
        rec.progress_saved = now;
        r.save_later(job);
    }
    if bytes > 0 && connecting {
        r.transition(job, token, Transition::Transfer);
    }
}

/// Downloads `task`, forwarding its progress to the registry as it comes; returns the task
/// (its `left`) with the result once every update reached the registry.
async fn download_with_progress(
    node: &Node,
    env: &download::Env,
    job: JobId,
    index: usize,
    task: FileTask,
    token: &CancellationToken,
) -> (FileTask, Result<download::Downloaded, Failure>) {
    let pending = Mutex::new(Delta::default());
    let wake = tokio::sync::Notify::new();
    let ended = AtomicBool::new(false);
    let take = || std::mem::take(&mut *pending.lock().unwrap_or_else(|e| e.into_inner()));
    let report = |u: Update| {
        let counters = &node.inner.counters;
        match &u {
            Update::Piece { bytes, source } => node.count_bytes(*source, *bytes),
            Update::Rejected => {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
            }
            Update::Banned => {
                counters.banned.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        pending.lock().unwrap_or_else(|e| e.into_inner()).add(u);
        wake.notify_one();
    };
    let download = async {
        let r = download::download_file(env, &task, token, &report).await;
        ended.store(true, Ordering::Release);
        wake.notify_one();
        r
    };
    let forward = async {
        loop {
            let d = take();
            if !d.is_empty() {
                let t = token.clone();
                node.registry()
                    .step(move |r| progress(r, job, &t, index, d))
                    .await;
            } else if ended.load(Ordering::Acquire) {
                return;
            } else {
                wake.notified().await;
            }
        }
    };
    let (result, ()) = tokio::join!(download, forward);
    (task, result)
}

/// Every file is done, unless one was added meanwhile (`Ok`: its index): checked and moved
/// to Transferred in one step, so that an AddFile cannot slip in between.
pub(super) fn all_transferred(
    r: &mut Registry,
    job: JobId,
    token: &CancellationToken,
) -> Result<usize, Ended> {
    if token.is_cancelled() {
        return Err(Ended::Stopped);
    }
    let Ok(rec) = r.rec(job) else {
        return Err(Ended::Stopped);
    };
    if let Some(next) = rec.info.files.iter().position(|f| !f.transferred) {
        return Ok(next);
    }
    rec.info.transfer_completed = Some(SystemTime::now());
    if r.transition(job, token, Transition::AllTransferred) {
        Err(Ended::Transferred(notice(r, job)))
    } else {
        Err(Ended::Stopped)
    }
}

/// File `task.index` downloaded and verified: recorded, reported, and given to the
/// callback's verdict (BITS validation). `Ok(true)`: it is transferred; `Ok(false)`: it is
/// fetched again, from the origin (the caller rejected peer or cached content).
async fn file_transferred(
    node: &Node,
    job: JobId,
    token: &CancellationToken,
    task: &FileTask,
    d: download::Downloaded,
) -> Result<bool, Ended> {
    let reg = node.registry();
    let i = task.index;
    let (content_id, sha256, identity) = (d.content_id, d.sha256, d.identity);
    let Some((info, cb)) = reg
        .step(move |r| {
            let rec = r.rec(job).ok()?;
            let f = rec.info.files.get_mut(i)?;
            f.content_id = Some(content_id);
            f.sha256 = sha256;
            rec.files[i].local.verified = Some(identity);
            let out = (rec.info.clone(), rec.callback.clone());
            r.save_later(job);
            Some(out)
        })
        .await
        .flatten()
    else {
        return Err(Ended::Stopped);
    };
    if let Some(d2) = &task.durable {
        // The derived or trusted layer, so a restart can serve the file.
        let (index, layer) = (d2.index, d.layer.clone());
        let _ = d2
            .store
            .run(move |s| s.record_layer(job, index, &layer))
            .await;
    }
    let file = TransferredFile {
        index: i,
        temp_name: task.temp.clone(),
        from_peers: d.from_peers,
    };
    let _ = node.inner.events.send(Event::FileTransferred {
        job,
        file: file.clone(),
    });
    let verdict = match cb {
        Some(cb) => tokio::select! {
            biased;
            v = cb.file_transferred(info, file) => v,
            () = token.cancelled() => return Err(Ended::Stopped),
        },
        None => ValidationState::Valid,
    };
    if token.is_cancelled() {
        return Err(Ended::Stopped);
    }
    let (temp, origin_only) = (task.temp.clone(), task.origin_only);
    let from_elsewhere = d.from_peers || d.from_cache;
    let outcome = reg
        .step(move |r| {
            let content = r.content.clone();
            let rec = r.rec(job).ok()?;
            rec.info.files.get(i)?;
            rec.info.files[i].validation_state = verdict;
            let outcome = if verdict == ValidationState::Invalid {
                content.remove_at(&content_id, &temp);
                let refetch = from_elsewhere && !origin_only;
                if refetch {
                    info!(%job, file = i, "caller rejected peer or cached content; refetching from the origin");
                    rec.files[i].origin_only = true;
                }
                r.clear_later(job, i);
                Verdict::Rejected { refetch }
            } else {
                rec.info.files[i].transferred = true;
                rec.info.modified = SystemTime::now();
                Verdict::Accepted
            };
            r.save_later(job);
            Some(outcome)
        })
        .await
        .flatten();
    match outcome {
        None => Err(Ended::Stopped),
        Some(Verdict::Accepted) => Ok(true),
        Some(Verdict::Rejected { refetch: true }) => Ok(false),
        Some(Verdict::Rejected { refetch: false }) => {
            let url = task.url.clone();
            let first = fail(
                reg,
                job,
                token,
                JobError {
                    context: ErrorContext::Validation,
                    file: Some(i),
                    description: format!(
                        "the caller rejected the content of {url} from the origin"
                    ),
                },
            )
            .await;
            Err(Ended::Failed(first))
        }
    }
}

/// The caller's verdict on a transferred file.
enum Verdict {
    Accepted,
    /// Invalid; `refetch`: it came from peers or the cache, and is fetched from the origin.
    Rejected {
        refetch: bool,
    },
}

/// A transient error: the job waits and retries, or fails once the no-progress timeout
/// has passed since the first transient error with no progress (BITS
/// SetNoProgressTimeout).
pub(super) async fn transient(
    reg: &registry::Handle,
    job: JobId,
    token: &CancellationToken,
    e: JobError,
) -> Ended {
    let t = token.clone();
    let e2 = e;
    let outcome = reg
        .step(move |r| {
            let rec = r.rec(job).ok()?;
            rec.info.error = Some(e2.clone());
            // The no-progress timer runs from the first transient error with no
            // progress since (BITS SetNoProgressTimeout).
            let since = *rec
                .transient_since
                .get_or_insert_with(tokio::time::Instant::now);
            let (delay, timeout) = (
                rec.info.properties.retry_delay,
                rec.info.properties.no_progress_timeout,
            );
            if since.elapsed() >= timeout {
                warn!(%job, "no progress for {timeout:?}: {e2}");
                let error = JobError {
                    description: format!(
                        "no progress within the no-progress timeout ({} s): {}",
                        timeout.as_secs(),
                        e2.description
                    ),
                    ..e2
                };
                let first = r.fail(job, &t, error).then(|| notice(r, job)).flatten();
                return Some(Ended::Failed(first));
            }
            warn!(%job, "transient error, retrying in {delay:?}: {e2}");
            Some(if r.transition(job, &t, Transition::TransientFailure) {
                Ended::Transient(delay)
            } else {
                Ended::Stopped
            })
        })
        .await
        .flatten();
    outcome.unwrap_or(Ended::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_folds_without_losing_a_byte_and_a_new_start_resets_the_bytes_before_it() {
        let mut d = Delta::default();
        assert!(d.is_empty());
        d.add(Update::Piece {
            bytes: 100,
            source: None,
        });
        d.add(Update::Rejected);
        d.add(Update::Banned);
        // A new start sets the file's progress: the bytes before it are not added to it.
        d.add(Update::Started {
            length: 1000,
            content_id: None,
            resumed: 300,
        });
        for (bytes, source) in [
            (10, None),
            (20, Some(crate::swarm::PeerSource::Lan)),
            (30, Some(crate::swarm::PeerSource::Dht)),
            (40, Some(crate::swarm::PeerSource::Cache)),
            (5, Some(crate::swarm::PeerSource::Lan)),
        ] {
            d.add(Update::Piece { bytes, source });
        }
        d.add(Update::Rejected);
        assert_eq!(d.started, Some((1000, None, 300)));
        assert_eq!(
            d.bytes,
            BytesBySource {
                origin: 10,
                lan_peers: 25,
                group_peers: 30,
                cache: 40
            }
        );
        // Rejections and bans are the job's counters: a new start keeps them.
        assert_eq!((d.rejected, d.banned), (2, 1));
        assert!(!d.is_empty());
    }
}
