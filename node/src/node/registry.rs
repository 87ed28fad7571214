//! The job registry: one task owns every job of a node.
//!
//! After iroh-blobs' store actor and libp2p's `Client`/`EventLoop`: [`Node`](super::Node)'s
//! BITS methods send a [`Command`] whose variant names its reply channel; the registry task
//! handles one command at a time, so no two callers ever change one job at once and nothing
//! needs a lock. A job's runner (`run.rs`) changes its job the same way, with a [`Step`]: a
//! short function of the registry that the task runs between commands.
//!
//! **Persistence.** Every change the caller is told of is durable first: a command that
//! changes a stored job awaits its write on the state database's thread
//! ([`StateHandle`]) before it answers, and a failed write leaves the job as it was (AddFile
//! takes the file out again). The runner's changes are sent to that thread without waiting
//! (it has nobody to return the error to, and logs it); the thread runs writes in the order
//! sent, so a newer record is never overwritten by an older one. No write runs on the
//! registry's task itself.
//!
//! **Readers** do not ask the task: after each command it publishes the snapshots of the jobs
//! it changed in a `watch` channel ([`Views`]), which [`Node::info`](super::Node::info) and
//! [`Node::jobs`](super::Node::jobs) read and the daemon waits on.
//!
//! **Complete** renames files, which may mean hashing them again: that work runs on a blocking
//! thread while the registry goes on with other jobs. Meanwhile the job is *completing*:
//! commands for it wait in arrival order ([`Command::job`]) and run once Complete ended, as
//! they waited for the job's lock before.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::PathBuf,
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::runner::{Doing, LiveTasks, Runner};
use crate::{
    Error,
    events::{Callback, Event},
    job::slots::Slots,
    job::{
        BytesBySource, ErrorContext, FileInfo, InvalidState, JobError, JobId, JobInfo, State,
        Transition, next_state,
    },
    store::fsuser::{FileIdentity, LocalIds},
    store::state::{FileDisk, JobDisk, ResumePoint},
    store::state_actor::StateHandle,
    store::{Backing, ContentStore},
};

/// Commands waiting for the registry before senders wait.
const QUEUE: usize = 256;

/// The most final (Acknowledged, Cancelled) jobs a node still answers [`Node::info`] for; older
/// ones are forgotten, as BITS forgets a job once it is complete or cancelled.
///
/// [`Node::info`]: super::Node::info
const RETIRED_JOBS: usize = 256;
/// The most bytes (estimated from their strings) those final jobs may take together.
const RETIRED_BYTES: usize = 16 << 20;

/// One job as the registry keeps it.
pub(super) struct JobRecord {
    pub(super) info: JobInfo,
    pub(super) callback: Option<Arc<dyn Callback>>,
    /// Per file, what the node keeps besides its `FileInfo` (`files[i]` goes with
    /// `info.files[i]`).
    pub(super) files: Vec<FileRecord>,
    /// What runs the job now ([`Runner`]).
    pub(super) runner: Runner,
    /// The task of the last runner: the next one starts after it ended, so that it has stopped
    /// writing; shutdown waits for it.
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
    /// Cuts short a retry delay ([`super::Node::retry_now`]).
    pub(super) wake: Arc<tokio::sync::Notify>,
    /// When the job entered TransientError with no progress since (the no-progress timer).
    pub(super) transient_since: Option<tokio::time::Instant>,
    /// The last change by the caller or progress (the inactivity timer; tokio's clock, so
    /// that tests can advance it).
    pub(super) touched: tokio::time::Instant,
    /// A Complete is renaming its files: commands for the job wait ([`Registry::parked`]).
    pub(super) completing: bool,
    /// When progress last had the record stored: byte counts by source are stored at most
    /// once a second while a transfer runs, so that a crash loses at most a second of them.
    pub(super) progress_saved: tokio::time::Instant,
}

/// What the node keeps of one file of a job besides its [`FileInfo`].
#[derive(Clone, Debug)]
pub(super) struct FileRecord {
    /// Fetch from the origin alone (the caller rejected peer content).
    pub(super) origin_only: bool,
    /// Renamed to its local name by Complete.
    pub(super) completed: bool,
    /// Where a stopped download left off (pieces verified and written).
    pub(super) left: Option<ResumePoint>,
    /// Its directory and the file that verified (Complete renames only that file there; the
    /// node serves only that file).
    pub(super) local: LocalIds,
}

impl JobRecord {
    /// A new record of `info` (no runner, touched now).
    pub(super) fn new(info: JobInfo, files: Vec<FileRecord>) -> Self {
        Self {
            info,
            callback: None,
            files,
            runner: Runner::Idle,
            task: None,
            wake: Arc::default(),
            transient_since: None,
            touched: tokio::time::Instant::now(),
            completing: false,
            progress_saved: tokio::time::Instant::now(),
        }
    }
}

/// A job as readers see it: its snapshot and, per file, whether it comes from the origin only.
#[derive(Clone, Debug)]
pub(super) struct JobView {
    pub(super) info: JobInfo,
    pub(super) origin_only: Vec<bool>,
}

/// The published snapshots of every job the registry still answers for.
pub(super) type Views = HashMap<JobId, JobView>;

/// A change a caller makes to a job's snapshot ([`Command::Modify`]).
pub(super) type Change = Box<dyn FnOnce(&mut JobInfo) -> Result<(), Error> + Send>;

/// The new URLs of some files of a job, `(index, url)`, picked from its snapshot
/// ([`Command::SetRemoteNames`]).
pub(super) type Rename = Box<dyn FnOnce(&JobInfo) -> Result<Vec<(usize, url::Url)>, Error> + Send>;

/// Where a command's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A runner's step: runs on the registry's task, between commands.
/// It returns its answer's delivery, which the registry calls once the step's changes are
/// published.
pub(super) type Step = Box<dyn FnOnce(&mut Registry) -> Deliver + Send>;

/// An answer to send once the command's changes are published.
pub(super) type Deliver = Box<dyn FnOnce() + Send>;

/// Tells `reply` `answer` (on delivery).
fn deliver<T: Send + 'static>(reply: oneshot::Sender<T>, answer: T) -> Deliver {
    Box::new(move || {
        let _ = reply.send(answer);
    })
}

/// What Complete found renaming a job's files, for [`Command::EndComplete`].
#[derive(Debug)]
pub(super) enum CompleteEnd {
    /// Every transferred file was renamed: the job is Acknowledged.
    Done,
    /// File `index` is not the file that verified (`reason`): it is forgotten and the job goes
    /// to Error.
    Refused { index: usize, reason: String },
    /// A rename failed or a write was refused: the job keeps its state (Complete may be
    /// called again).
    Stopped,
}

/// The files a Complete renames, from [`Command::BeginComplete`].
pub(super) struct CompletePlan {
    pub(super) owner: Option<u32>,
    /// Download, or an upload whose Complete only gives an upload-reply job's reply its name.
    pub(super) job_type: crate::job::JobType,
    /// Where an upload-reply job's reply goes.
    pub(super) reply_file_name: Option<PathBuf>,
    /// `(index, file, identities)` of each file not renamed yet.
    pub(super) files: Vec<(usize, FileInfo, LocalIds)>,
}

/// What the registry is asked to do; each variant names its reply channel.
pub(super) enum Command {
    /// BITS `CreateJob`: stores and adds the record.
    Create {
        record: Box<JobRecord>,
        reply: Reply<()>,
    },
    /// BITS `AddFile`: the file, checked by the caller against the file system.
    AddFile {
        job: JobId,
        file: Box<(FileInfo, FileRecord)>,
        reply: Reply<()>,
    },
    /// BITS `SetDisplayName`, `SetPriority` and the other properties.
    Modify {
        job: JobId,
        change: Change,
        reply: Reply<()>,
    },
    /// BITS `SetRemoteName` and `ReplaceRemotePrefix`: the new URLs `rename` picks from the
    /// job; answers how many files lost their pieces.
    SetRemoteNames {
        job: JobId,
        rename: Rename,
        reply: Reply<usize>,
    },
    /// An upload-reply job's reply file name.
    SetReplyName {
        job: JobId,
        name: PathBuf,
        reply: Reply<()>,
    },
    /// BITS `Resume`.
    Resume { job: JobId, reply: Reply<()> },
    /// BITS `Suspend`.
    Suspend { job: JobId, reply: Reply<()> },
    /// BITS `Cancel`; answers the temporary files to delete, as the owner.
    Cancel {
        job: JobId,
        reply: Reply<(Option<u32>, Vec<PathBuf>)>,
    },
    /// BITS `Complete`, first step: the state allows it; the runner stops and the job waits.
    BeginComplete {
        job: JobId,
        reply: Reply<CompletePlan>,
    },
    /// File `index` was renamed to its local name and is now `identity`.
    Renamed {
        job: JobId,
        index: usize,
        identity: FileIdentity,
        reply: Reply<()>,
    },
    /// The last step of Complete.
    EndComplete {
        job: JobId,
        end: CompleteEnd,
        reply: Reply<()>,
    },
    /// BITS `SetNotifyInterface`.
    SetCallback {
        job: JobId,
        callback: Arc<dyn Callback>,
        reply: Reply<()>,
    },
    /// Cuts short a retry delay.
    RetryNow { job: JobId, reply: Reply<()> },
    /// Jobs reloaded from the state database at start (`true`: its state changed in reload,
    /// so it is stored again).
    Restore {
        records: Vec<(JobRecord, bool)>,
        reply: oneshot::Sender<()>,
    },
    /// The jobs with no change for `timeout` (the inactivity timer).
    Idle {
        timeout: Duration,
        reply: oneshot::Sender<Vec<JobId>>,
    },
    /// Node shutdown: the runners' tasks, to be awaited.
    Shutdown {
        reply: oneshot::Sender<Vec<tokio::task::JoinHandle<()>>>,
    },
    /// A runner's step.
    Step(Step),
}

impl Command {
    /// The job a caller's command changes: it waits while that job completes.
    fn job(&self) -> Option<JobId> {
        match self {
            Self::AddFile { job, .. }
            | Self::Modify { job, .. }
            | Self::SetRemoteNames { job, .. }
            | Self::Resume { job, .. }
            | Self::Suspend { job, .. }
            | Self::Cancel { job, .. }
            | Self::BeginComplete { job, .. }
            | Self::SetCallback { job, .. } => Some(*job),
            _ => None,
        }
    }
}

/// A handle to the registry's task. Cheap to clone.
#[derive(Clone, Debug)]
pub(super) struct Handle {
    tx: mpsc::Sender<Command>,
}

/// The registry's task ended (it panicked): nothing can change a job any more.
fn gone() -> Error {
    Error::Task("the job registry stopped".into())
}

impl Handle {
    /// Sends the command `make` builds and waits for its answer.
    ///
    /// # Errors
    /// What the command returns; [`Error::Task`] when the registry's task ended.
    pub(super) async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Sends a command answered on a plain channel and waits for the answer; `None` when the
    /// registry's task ended.
    pub(super) async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Runs `step` on the registry's task and returns what it returned; `None` when the
    /// registry's task ended.
    pub(super) async fn step<R: Send + 'static>(
        &self,
        step: impl FnOnce(&mut Registry) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let step: Step = Box::new(move |r| deliver(tx, step(r)));
        self.tx.send(Command::Step(step)).await.ok()?;
        rx.await.ok()
    }
}

/// What the registry needs of the rest of the node.
pub(super) struct Parts {
    pub(super) state: Option<StateHandle>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) slots: Slots,
    pub(super) content: Arc<ContentStore>,
    /// The node, to start runners with (weak: the registry's task must not keep the node
    /// alive; it ends when the node is dropped).
    pub(super) node: Weak<super::Inner>,
    /// The count of runner tasks alive.
    pub(super) live: LiveTasks,
}

/// The registry's state, owned by its task.
pub(super) struct Registry {
    pub(super) jobs: HashMap<JobId, JobRecord>,
    /// Final jobs still answered for, oldest first, with their estimated sizes in bytes.
    retired: VecDeque<(JobId, usize)>,
    views: watch::Sender<Views>,
    pub(super) state: Option<StateHandle>,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) slots: Slots,
    pub(super) content: Arc<ContentStore>,
    node: Weak<super::Inner>,
    live: LiveTasks,
    /// Commands for completing jobs, in arrival order.
    parked: HashMap<JobId, VecDeque<Command>>,
    /// Commands whose job finished completing: run before the next from the channel.
    replay: VecDeque<Command>,
    /// Jobs the command being handled changed: published after it.
    changed: Vec<JobId>,
    /// Jobs to store after the command, without waiting.
    unsaved: Vec<JobId>,
    /// Files whose stored pieces are forgotten after the command, without waiting.
    clears: Vec<(JobId, u32)>,
    /// Events and callbacks of the command, delivered once its changes are published.
    outbox: Vec<Out>,
}

/// What a command tells others once its changes are published.
enum Out {
    Event(Event),
    /// The callback's `job_modification` with the job's snapshot.
    Modified(Arc<dyn Callback>, Box<JobInfo>),
}

/// Starts the registry's task; returns its handle and the published snapshots.
pub(super) fn spawn(parts: Parts) -> (Handle, watch::Receiver<Views>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (views, seen) = watch::channel(Views::new());
    let registry = Registry {
        jobs: HashMap::new(),
        retired: VecDeque::new(),
        views,
        state: parts.state,
        events: parts.events,
        slots: parts.slots,
        content: parts.content,
        node: parts.node,
        live: parts.live,
        parked: HashMap::new(),
        replay: VecDeque::new(),
        changed: Vec::new(),
        unsaved: Vec::new(),
        clears: Vec::new(),
        outbox: Vec::new(),
    };
    tokio::spawn(registry.run(rx));
    (Handle { tx }, seen)
}

/// A job's size in memory, estimated from its strings and files, in bytes.
fn job_size(info: &JobInfo) -> usize {
    let path = |p: &std::path::Path| p.as_os_str().len();
    512 + info.display_name.len()
        + info
            .files
            .iter()
            .map(|f| {
                512 + f.url.as_str().len()
                    + path(&f.local_name)
                    + path(&f.temp_name)
                    + f.ranges.len() * 16
            })
            .sum::<usize>()
}

/// The writes that store `rec`: its record and its files', or its removal once final.
fn write_of(
    rec: &JobRecord,
) -> impl FnOnce(&crate::store::state::StateStore) -> Result<(), crate::store::state::PersistError>
+ Send
+ 'static {
    let id = rec.info.id;
    let write = if rec.info.state.is_final() {
        None
    } else {
        let files: Vec<(u32, FileDisk)> = rec
            .info
            .files
            .iter()
            .zip(&rec.files)
            .enumerate()
            .map(|(i, (f, r))| {
                (
                    u32::try_from(i).unwrap_or(u32::MAX),
                    FileDisk::of(f, r.origin_only, r.completed, r.local),
                )
            })
            .collect();
        Some((JobDisk::of(&rec.info), files))
    };
    move |s| match write {
        None => s.remove_job(id),
        Some((job, files)) => s.put_job(id, &job, &files),
    }
}

impl Registry {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let command = match self.replay.pop_front() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => return,
                },
            };
            if let Some(job) = command.job()
                && self.jobs.get(&job).is_some_and(|r| r.completing)
            {
                self.parked.entry(job).or_default().push_back(command);
                continue;
            }
            let answer = self.handle(command).await;
            // Published first: a caller that got its answer, or heard an event, reads the
            // snapshot that follows from it.
            self.flush().await;
            answer();
        }
    }

    async fn handle(&mut self, command: Command) -> Deliver {
        match command {
            Command::Create { record, reply } => deliver(reply, self.create(*record).await),
            Command::AddFile { job, file, reply } => {
                let (file, record) = *file;
                deliver(reply, self.add_file(job, file, record).await)
            }
            Command::Modify { job, change, reply } => {
                deliver(reply, self.modify(job, change).await)
            }
            Command::SetRemoteNames { job, rename, reply } => {
                deliver(reply, self.set_remote_names(job, rename).await)
            }
            Command::SetReplyName { job, name, reply } => {
                let r = match self.rec(job) {
                    Ok(rec) => {
                        rec.info.reply_file_name = Some(name);
                        self.persist(job).await
                    }
                    Err(e) => Err(e),
                };
                deliver(reply, r)
            }
            Command::Resume { job, reply } => deliver(reply, self.resume(job).await),
            Command::Suspend { job, reply } => deliver(reply, self.suspend(job).await),
            Command::Cancel { job, reply } => deliver(reply, self.cancel(job).await),
            Command::BeginComplete { job, reply } => deliver(reply, self.begin_complete(job)),
            Command::Renamed {
                job,
                index,
                identity,
                reply,
            } => deliver(reply, self.renamed(job, index, identity).await),
            Command::EndComplete { job, end, reply } => {
                deliver(reply, self.end_complete(job, end).await)
            }
            Command::SetCallback {
                job,
                callback,
                reply,
            } => deliver(reply, self.rec(job).map(|r| r.callback = Some(callback))),
            Command::RetryNow { job, reply } => {
                deliver(reply, self.rec(job).map(|r| r.wake.notify_one()))
            }
            Command::Restore { records, reply } => {
                self.restore(records);
                deliver(reply, ())
            }
            Command::Idle { timeout, reply } => {
                let idle = self
                    .jobs
                    .iter()
                    .filter(|(_, r)| !r.info.state.is_final() && r.touched.elapsed() >= timeout)
                    .map(|(id, _)| *id)
                    .collect();
                deliver(reply, idle)
            }
            Command::Shutdown { reply } => {
                let tasks = self
                    .jobs
                    .values_mut()
                    .filter_map(|r| r.task.take())
                    .collect();
                deliver(reply, tasks)
            }
            Command::Step(step) => step(self),
        }
    }

    /// Whether no job has a runner at work (one that was stopped only has its task to end,
    /// which [`crate::Node::wait_idle`] counts apart) or a Complete under way, and no command
    /// waits for one.
    pub(super) fn is_idle(&self) -> bool {
        self.jobs
            .values()
            .all(|r| r.runner.token().is_none_or(CancellationToken::is_cancelled) && !r.completing)
            && self.parked.is_empty()
            && self.replay.is_empty()
    }

    /// The record of `job`, marked changed (published after the command).
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub(super) fn rec(&mut self, job: JobId) -> Result<&mut JobRecord, Error> {
        let rec = self.jobs.get_mut(&job).ok_or(Error::UnknownJob(job))?;
        self.changed.push(job);
        Ok(rec)
    }

    /// Stores `job` now and waits until it is durable (nothing without a state database).
    ///
    /// # Errors
    /// [`Error::State`] when the write fails.
    async fn persist(&mut self, job: JobId) -> Result<(), Error> {
        self.unsaved.retain(|j| *j != job);
        let (Some(state), Some(rec)) = (&self.state, self.jobs.get(&job)) else {
            return Ok(());
        };
        Ok(state.run(write_of(rec)).await.unwrap_or(Ok(()))?)
    }

    /// Stores `job` after the command, without waiting (a runner's change: failures are
    /// logged).
    pub(super) fn save_later(&mut self, job: JobId) {
        if !self.unsaved.contains(&job) {
            self.unsaved.push(job);
        }
    }

    /// Forgets file `index`'s stored pieces after the command, without waiting, before the
    /// job's record is stored again.
    pub(super) fn clear_later(&mut self, job: JobId, index: usize) {
        self.clears
            .push((job, u32::try_from(index).unwrap_or(u32::MAX)));
    }

    /// Sends the unsaved jobs to the state database and publishes the changed ones.
    async fn flush(&mut self) {
        for (job, index) in std::mem::take(&mut self.clears) {
            if let Some(state) = &self.state {
                drop(
                    state
                        .send(move |s| {
                            if let Err(e) = s.clear_pieces(job, index) {
                                warn!(%job, "cannot forget the pieces of file {index}: {e}");
                            }
                        })
                        .await,
                );
            }
        }
        for job in std::mem::take(&mut self.unsaved) {
            if let (Some(state), Some(rec)) = (&self.state, self.jobs.get(&job)) {
                let write = write_of(rec);
                drop(
                    state
                        .send(move |s| {
                            if let Err(e) = write(s) {
                                warn!(%job, "cannot store the job: {e}");
                            }
                        })
                        .await,
                );
            }
        }
        self.publish();
        for out in std::mem::take(&mut self.outbox) {
            match out {
                Out::Event(e) => {
                    let _ = self.events.send(e);
                }
                Out::Modified(cb, info) => cb.job_modification(*info),
            }
        }
    }

    /// Publishes the snapshots of the jobs changed since the last time, each once.
    fn publish(&mut self) {
        let mut changed = std::mem::take(&mut self.changed);
        if changed.is_empty() {
            return;
        }
        changed.sort_unstable();
        changed.dedup();
        let jobs = &self.jobs;
        self.views.send_modify(|views| {
            for job in changed {
                match jobs.get(&job) {
                    Some(rec) => {
                        views.insert(
                            job,
                            JobView {
                                info: rec.info.clone(),
                                origin_only: rec.files.iter().map(|f| f.origin_only).collect(),
                            },
                        );
                    }
                    None => {
                        views.remove(&job);
                    }
                }
            }
        });
    }

    /// Moves `job` to `to`: stamps it, and on a change of state broadcasts JobModification and
    /// calls the callback's `job_modification` (on the registry's task: it must not block).
    pub(super) fn set_state(&mut self, job: JobId, to: State) {
        let Ok(rec) = self.rec(job) else { return };
        let changed = rec.info.state != to;
        rec.info.state = to;
        rec.info.modified = SystemTime::now();
        rec.touched = tokio::time::Instant::now();
        if changed {
            self.announce_modification(job);
        }
    }

    /// Tells the job's callback and the node's subscribers of a JobModification: the state
    /// changed, or something the caller relies on did without one (pieces discarded).
    pub(super) fn announce_modification(&mut self, job: JobId) {
        let Ok(rec) = self.rec(job) else { return };
        let state = rec.info.state;
        let callback = rec
            .callback
            .as_ref()
            .map(|cb| (cb.clone(), rec.info.clone()));
        self.outbox
            .push(Out::Event(Event::JobModification { job, state }));
        if let Some((cb, info)) = callback {
            self.outbox.push(Out::Modified(cb, Box::new(info)));
        }
    }

    /// Stops a transfer in progress and queues the job again, so that a change to its URLs
    /// or HTTP options takes effect now; verified pieces are kept as after a preemption. A job
    /// that is not transferring is left as it is: its next run sees the change.
    fn restart_transfer(&mut self, job: JobId) {
        let Ok(rec) = self.rec(job) else { return };
        if !matches!(rec.runner, Runner::WaitingSlot(_) | Runner::Transferring(_)) {
            return;
        }
        rec.runner.stop();
        if let Ok(to) = next_state(rec.info.state, Transition::Requeue) {
            self.set_state(job, to);
        }
        self.start_runner(job);
    }

    async fn create(&mut self, record: JobRecord) -> Result<(), Error> {
        let job = record.info.id;
        self.jobs.insert(job, record);
        self.changed.push(job);
        if let Err(e) = self.persist(job).await {
            self.jobs.remove(&job);
            return Err(e);
        }
        Ok(())
    }

    async fn add_file(
        &mut self,
        job: JobId,
        file: FileInfo,
        record: FileRecord,
    ) -> Result<(), Error> {
        let rec = self.rec(job)?;
        if rec
            .info
            .files
            .iter()
            .any(|f| f.local_name == file.local_name)
        {
            return Err(Error::DuplicateLocalName(file.local_name));
        }
        let to = next_state(rec.info.state, Transition::AddFile)?;
        let changed = to != rec.info.state;
        rec.info.files.push(file);
        rec.files.push(record);
        self.set_state(job, to);
        if let Err(e) = self.persist(job).await {
            // Not stored, so not added: the caller may try again.
            if let Some(rec) = self.jobs.get_mut(&job) {
                rec.info.files.pop();
                rec.files.pop();
            }
            return Err(e);
        }
        if changed && to == State::Queued {
            self.start_runner(job);
        }
        Ok(())
    }

    async fn modify(&mut self, job: JobId, change: Change) -> Result<(), Error> {
        let slots = self.slots.clone();
        let rec = self.rec(job)?;
        if rec.info.state.is_final() {
            return Err(InvalidState {
                from: rec.info.state,
                transition: Transition::AddFile,
            }
            .into());
        }
        let mut info = rec.info.clone();
        change(&mut info)?;
        info.properties.http.check()?;
        let restart = rec.info.properties.http != info.properties.http;
        rec.info.display_name = info.display_name;
        if rec.info.priority != info.priority {
            slots.set_priority(job, info.priority);
        }
        rec.info.priority = info.priority;
        rec.info.properties = info.properties;
        rec.info.modified = SystemTime::now();
        rec.touched = tokio::time::Instant::now();
        self.persist(job).await?;
        if restart {
            self.restart_transfer(job);
        }
        Ok(())
    }

    /// New URLs for files of `job` (BITS `SetRemoteName`, `ReplaceRemotePrefix`). A file
    /// with an expected digest keeps its verified pieces (the digest pins its content,
    /// whatever URL serves it), and so does a file already transferred (BITS does not restart
    /// transferred files); any other file loses them, and a JobModification says so. A
    /// transfer in progress starts again with the new URLs.
    async fn set_remote_names(&mut self, job: JobId, rename: Rename) -> Result<usize, Error> {
        let content = self.content.clone();
        let rec = self.rec(job)?;
        if rec.info.state.is_final() {
            return Err(InvalidState {
                from: rec.info.state,
                transition: Transition::AddFile,
            }
            .into());
        }
        let changes = rename(&rec.info)?;
        let (info_before, files_before) = (rec.info.clone(), rec.files.clone());
        let mut discarded = Vec::new();
        for (i, url) in changes {
            let (Some(f), Some(r)) = (rec.info.files.get_mut(i), rec.files.get_mut(i)) else {
                continue;
            };
            if f.url == url {
                continue;
            }
            f.url = url;
            if f.transferred || f.expected.blake3.is_some() || f.expected.sha256.is_some() {
                continue;
            }
            if let Some(id) = &f.content_id {
                content.remove_at(id, &f.temp_name);
            }
            f.content_id = None;
            f.sha256 = None;
            f.bytes_total = None;
            f.bytes_transferred = 0;
            f.bytes_from = BytesBySource::default();
            r.left = None;
            r.origin_only = false;
            discarded.push(i);
        }
        rec.info.modified = SystemTime::now();
        rec.touched = tokio::time::Instant::now();
        if let Err(e) = self.persist(job).await {
            if let Ok(rec) = self.rec(job) {
                rec.info = info_before;
                rec.files = files_before;
            }
            return Err(e);
        }
        for &i in &discarded {
            self.clear_later(job, i);
        }
        if !discarded.is_empty() {
            self.announce_modification(job);
        }
        self.restart_transfer(job);
        Ok(discarded.len())
    }

    async fn resume(&mut self, job: JobId) -> Result<(), Error> {
        let rec = self.rec(job)?;
        if rec.info.files.is_empty() {
            return Err(Error::Empty(job));
        }
        let to = next_state(rec.info.state, Transition::Resume)?;
        if to == State::Queued {
            rec.info.error = None;
        }
        // BITS: "Calling the IBackgroundCopyJob::Resume method resets the elapsed time."
        rec.info.active_time = Duration::ZERO;
        self.set_state(job, to);
        self.persist(job).await?;
        self.start_runner(job);
        Ok(())
    }

    async fn suspend(&mut self, job: JobId) -> Result<(), Error> {
        let rec = self.rec(job)?;
        let to = next_state(rec.info.state, Transition::Suspend)?;
        rec.runner.stop();
        self.set_state(job, to);
        self.persist(job).await
    }

    async fn cancel(&mut self, job: JobId) -> Result<(Option<u32>, Vec<PathBuf>), Error> {
        let content = self.content.clone();
        let rec = self.rec(job)?;
        let to = next_state(rec.info.state, Transition::Cancel)?;
        rec.runner.stop();
        // The state first: a crash after it leaves stray temporary files, never a live job
        // whose files are gone.
        self.set_state(job, to);
        self.persist(job).await?;
        let rec = self.rec(job)?;
        let owner = rec.info.owner;
        let temps = rec
            .info
            .files
            .iter()
            .map(|f| {
                if let Some(id) = &f.content_id {
                    content.remove_at(id, &f.temp_name);
                }
                f.temp_name.clone()
            })
            .collect();
        let size = job_size(&rec.info);
        self.retire(job, size);
        Ok((owner, temps))
    }

    fn begin_complete(&mut self, job: JobId) -> Result<CompletePlan, Error> {
        let rec = self.rec(job)?;
        next_state(rec.info.state, Transition::Complete)?;
        // BITS: "For uploads, the state of the job must be BG_JOB_STATE_TRANSFERRED."
        if rec.info.job_type.is_upload() && rec.info.state != State::Transferred {
            return Err(InvalidState {
                from: rec.info.state,
                transition: Transition::Complete,
            }
            .into());
        }
        rec.runner.stop();
        rec.completing = true;
        let files = rec
            .info
            .files
            .iter()
            .zip(&rec.files)
            .enumerate()
            .filter(|(_, (_, r))| !r.completed)
            .map(|(i, (f, r))| (i, f.clone(), r.local))
            .collect();
        Ok(CompletePlan {
            owner: rec.info.owner,
            files,
            job_type: rec.info.job_type,
            reply_file_name: rec.info.reply_file_name.clone(),
        })
    }

    async fn renamed(
        &mut self,
        job: JobId,
        index: usize,
        identity: FileIdentity,
    ) -> Result<(), Error> {
        let content = self.content.clone();
        let rec = self.rec(job)?;
        let owner = rec.info.owner;
        let (Some(f), Some(r)) = (rec.info.files.get(index), rec.files.get_mut(index)) else {
            return Ok(());
        };
        r.local.verified = Some(identity);
        if let Some(id) = &f.content_id {
            content.relocate(
                id,
                &f.temp_name,
                f.local_name.clone(),
                Backing::Named { owner, identity },
            );
        }
        r.completed = true;
        self.persist(job).await
    }

    async fn end_complete(&mut self, job: JobId, end: CompleteEnd) -> Result<(), Error> {
        let result = match self.rec(job) {
            Err(e) => Err(e),
            Ok(rec) => {
                rec.completing = false;
                match end {
                    CompleteEnd::Stopped => Ok(()),
                    CompleteEnd::Refused { index, reason } => {
                        Err(self.complete_refused(job, index, reason))
                    }
                    CompleteEnd::Done => self.acknowledged(job).await,
                }
            }
        };
        if let Some(waiting) = self.parked.remove(&job) {
            self.replay.extend(waiting);
        }
        result
    }

    /// Every file of a completing job is renamed: it is Acknowledged.
    async fn acknowledged(&mut self, job: JobId) -> Result<(), Error> {
        let rec = self.rec(job)?;
        let to = next_state(rec.info.state, Transition::Complete)?;
        self.set_state(job, to);
        self.persist(job).await?;
        let size = self.jobs.get(&job).map_or(0, |r| job_size(&r.info));
        self.retire(job, size);
        Ok(())
    }

    /// Complete found that file `i` is not the file that verified: the file counts as not
    /// transferred (its pieces and its served entry are forgotten), and the job goes to
    /// Error with the LocalFile context naming it; a Resume downloads it again.
    fn complete_refused(&mut self, job: JobId, i: usize, reason: String) -> Error {
        let content = self.content.clone();
        let Ok(rec) = self.rec(job) else {
            return Error::UnknownJob(job);
        };
        warn!(%job, file = i, "Complete refused: {reason}");
        let f = &mut rec.info.files[i];
        if let Some(id) = &f.content_id {
            content.remove_at(id, &f.temp_name);
        }
        f.transferred = false;
        f.bytes_transferred = 0;
        f.validation_state = shoal_validator::ValidationState::Unknown;
        let path = f.temp_name.clone();
        rec.files[i].local.verified = None;
        let error = JobError {
            context: ErrorContext::LocalFile,
            file: Some(i),
            description: format!("{reason}; resume the job to download it again"),
        };
        rec.info.error = Some(error.clone());
        self.clear_later(job, i);
        self.set_state(job, State::Error);
        self.save_later(job);
        self.outbox.push(Out::Event(Event::JobError { job, error }));
        Error::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
        }
    }

    /// A final job leaves the registry but for a bounded list of the most recent ones
    /// ([`RETIRED_JOBS`], [`RETIRED_BYTES`]), still answered for; older ones are forgotten
    /// ([`Error::UnknownJob`]).
    fn retire(&mut self, job: JobId, size: usize) {
        self.retired.push_back((job, size));
        let mut bytes: usize = self.retired.iter().map(|(_, b)| b).sum();
        while self.retired.len() > RETIRED_JOBS || bytes > RETIRED_BYTES {
            let Some((old, b)) = self.retired.pop_front() else {
                break;
            };
            bytes -= b;
            self.jobs.remove(&old);
            self.changed.push(old);
        }
    }

    fn restore(&mut self, records: Vec<(JobRecord, bool)>) {
        for (record, changed) in records {
            let job = record.info.id;
            let state = record.info.state;
            self.jobs.insert(job, record);
            self.changed.push(job);
            if changed {
                self.save_later(job);
            }
            match state {
                State::Queued => self.start_runner(job),
                // Notifications nobody acknowledged before the stop are delivered again.
                State::Transferred | State::Error => self.start_notifier(job),
                _ => {}
            }
        }
    }

    /// Starts a runner for a Queued job, unless one is at work already; one that only waits
    /// out a retry delay or delivers a notification is replaced ([`Runner::is_replaceable`]).
    pub(super) fn start_runner(&mut self, job: JobId) {
        let Some(node) = self.node.upgrade().map(|inner| super::Node { inner }) else {
            return;
        };
        let token = node.inner.shutdown.child_token();
        let live = self.live.clone();
        let Ok(rec) = self.rec(job) else { return };
        if rec.info.state != State::Queued || !rec.runner.is_replaceable() {
            return;
        }
        let t = token.clone();
        let previous = rec.task.take();
        let task = rec
            .runner
            .start(token, Doing::WaitingSlot, (previous, &live), async move {
                super::run::run_job(&node, job, &t).await;
                super::run::ended(&node, job, t).await;
            });
        rec.task = Some(task);
    }

    /// Runs the notification delivery of a reloaded Transferred or Error job.
    fn start_notifier(&mut self, job: JobId) {
        let Some(node) = self.node.upgrade().map(|inner| super::Node { inner }) else {
            return;
        };
        let token = node.inner.shutdown.child_token();
        let live = self.live.clone();
        let Ok(rec) = self.rec(job) else { return };
        if rec.runner.is_live() || rec.callback.is_none() {
            return;
        }
        let state = rec.info.state;
        let t = token.clone();
        let previous = rec.task.take();
        let task = rec
            .runner
            .start(token, Doing::Notifying, (previous, &live), async move {
                super::run::deliver(&node, job, &t, state, None).await;
                super::run::ended(&node, job, t).await;
            });
        rec.task = Some(task);
    }

    /// Moves the job on `t` unless the runner holding `token` was stopped; false when it was.
    pub(super) fn transition(
        &mut self,
        job: JobId,
        token: &CancellationToken,
        t: Transition,
    ) -> bool {
        if token.is_cancelled() {
            return false;
        }
        let Ok(rec) = self.rec(job) else { return false };
        match next_state(rec.info.state, t) {
            Ok(to) => {
                self.set_state(job, to);
                self.save_later(job);
                true
            }
            Err(e) => {
                warn!("runner transition refused: {e}");
                false
            }
        }
    }

    /// The runner holding `token` now does `doing`; false when it was replaced or stopped.
    pub(super) fn set_doing(
        &mut self,
        job: JobId,
        token: &CancellationToken,
        doing: Doing,
    ) -> bool {
        self.jobs
            .get_mut(&job)
            .is_some_and(|r| r.runner.set(token, doing))
    }

    /// Moves the job to Error with `error` and broadcasts JobError, unless the runner holding
    /// `token` was stopped (false).
    pub(super) fn fail(&mut self, job: JobId, token: &CancellationToken, error: JobError) -> bool {
        let Ok(rec) = self.rec(job) else { return false };
        rec.info.error = Some(error.clone());
        if !self.transition(job, token, Transition::Fail) {
            return false;
        }
        warn!(%job, "job error: {error}");
        self.outbox.push(Out::Event(Event::JobError { job, error }));
        true
    }

    /// The content ids and SHA-256s of the transferred files of jobs that are not final.
    pub(super) fn in_use(views: &Views) -> HashSet<shoal_protocol::HaveKey> {
        use shoal_protocol::HaveKey;
        let mut keys = HashSet::new();
        for v in views.values().filter(|v| !v.info.state.is_final()) {
            // Only what a job transferred: naming a digest as expected does not keep another
            // user's cached content from eviction.
            for f in v.info.files.iter().filter(|f| f.transferred) {
                keys.extend(f.content_id.map(|id| HaveKey::Blake3(*id.hash())));
                keys.extend(f.sha256.map(HaveKey::Sha256));
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobProperties, Priority};

    fn registry() -> (Handle, watch::Receiver<Views>, broadcast::Sender<Event>) {
        let (events, _) = broadcast::channel(64);
        let (handle, views) = spawn(Parts {
            state: None,
            events: events.clone(),
            slots: Slots::new(1, Duration::from_secs(60)),
            content: Arc::new(ContentStore::new()),
            // No node: no runner starts, so the registry alone decides every state.
            node: Weak::new(),
            live: LiveTasks::new(),
        });
        (handle, views, events)
    }

    fn job(state: State) -> JobRecord {
        let mut info = JobInfo::created(
            JobId::new(),
            "test",
            Priority::Normal,
            None,
            JobProperties::default(),
            SystemTime::now(),
        );
        info.state = state;
        JobRecord::new(info, Vec::new())
    }

    fn file(name: &str) -> (FileInfo, FileRecord) {
        let spec = crate::job::FileSpec {
            url: format!("http://127.0.0.1:9/{name}").parse().unwrap(),
            local_name: PathBuf::from(format!("/tmp/{name}")),
            expected: shoal_validator::Expected::default(),
            ranges: Vec::new(),
        };
        (
            FileInfo::added(spec, PathBuf::from(format!("/tmp/.{name}.part"))),
            FileRecord {
                origin_only: false,
                completed: false,
                left: None,
                local: LocalIds::default(),
            },
        )
    }

    async fn create(h: &Handle, record: JobRecord) -> JobId {
        let id = record.info.id;
        let record = Box::new(record);
        h.call(|reply| Command::Create { record, reply })
            .await
            .unwrap();
        id
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_and_an_event_come_after_the_snapshot_they_follow_from() {
        let (h, views, events) = registry();
        let mut heard = events.subscribe();
        for _ in 0..50 {
            let id = create(&h, job(State::Suspended)).await;
            // Answered: the job is there for readers.
            assert_eq!(
                views.borrow().get(&id).unwrap().info.state,
                State::Suspended
            );
            let f = Box::new(file("a"));
            h.call(|reply| Command::AddFile {
                job: id,
                file: f,
                reply,
            })
            .await
            .unwrap();
            assert_eq!(views.borrow()[&id].info.files.len(), 1);
            // Heard: the state it names is the published one.
            let resume = h.clone();
            tokio::spawn(async move {
                resume
                    .call(|reply| Command::Resume { job: id, reply })
                    .await
            });
            let Event::JobModification { job, state } = heard.recv().await.unwrap() else {
                panic!("another event");
            };
            assert_eq!((job, state), (id, State::Queued));
            assert_eq!(views.borrow()[&id].info.state, State::Queued);
        }
    }

    #[tokio::test]
    async fn commands_for_a_completing_job_wait_until_complete_ended() {
        let (h, views, _) = registry();
        let mut transferred = job(State::Transferred);
        let (mut f, r) = file("done");
        f.transferred = true;
        transferred.info.files.push(f);
        transferred.files.push(r);
        let id = create(&h, transferred).await;
        let plan = h
            .call(|reply| Command::BeginComplete { job: id, reply })
            .await
            .unwrap();
        assert_eq!(plan.files.len(), 1);
        // A Cancel arrives while the files are being renamed: it waits.
        let canceller = h.clone();
        let mut cancel = tokio::spawn(async move {
            canceller
                .call(|reply| Command::Cancel { job: id, reply })
                .await
        });
        // Other jobs and readers go on meanwhile.
        let other = create(&h, job(State::Suspended)).await;
        assert!(views.borrow().contains_key(&other));
        assert_eq!(views.borrow()[&id].info.state, State::Transferred);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut cancel)
                .await
                .is_err(),
            "the Cancel ran during Complete"
        );
        h.call(|reply| Command::EndComplete {
            job: id,
            end: CompleteEnd::Done,
            reply,
        })
        .await
        .unwrap();
        assert_eq!(views.borrow()[&id].info.state, State::Acknowledged);
        // Then the Cancel runs, on the completed job.
        let refused = cancel.await.unwrap().unwrap_err();
        assert!(matches!(refused, Error::InvalidState(_)), "{refused}");
    }

    #[tokio::test]
    async fn a_refused_rename_puts_the_job_in_error_and_forgets_the_file() {
        let (h, views, _) = registry();
        let mut transferred = job(State::Transferred);
        let (mut f, r) = file("swapped");
        f.transferred = true;
        f.bytes_transferred = 10;
        transferred.info.files.push(f);
        transferred.files.push(r);
        let id = create(&h, transferred).await;
        h.call(|reply| Command::BeginComplete { job: id, reply })
            .await
            .unwrap();
        let e = h
            .call(|reply| Command::EndComplete {
                job: id,
                end: CompleteEnd::Refused {
                    index: 0,
                    reason: "not the file that verified".into(),
                },
                reply,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        let info = views.borrow()[&id].info.clone();
        assert_eq!(info.state, State::Error);
        assert!(!info.files[0].transferred && info.files[0].bytes_transferred == 0);
        assert_eq!(info.error.unwrap().file, Some(0));
    }
}
