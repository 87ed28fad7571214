//! What runs a job now: one task per job at a time, in one explicit state.
//!
//! A job's runner is the task that lives its life: it waits for a transfer slot, transfers,
//! waits out a retry delay, and delivers the BITS notifications (`JobTransferred`,
//! `JobError`) until the callback acknowledges them. [`Runner`] says which of these it is
//! doing. It replaces a token, a "lingering" flag and a lock per job. A new runner (Resume,
//! AddFile, a reload) replaces one that only waits or notifies; it starts its work after the
//! task it replaces ended ([`Runner::start`]), so two runners never write one job's files.

use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// The number of runner tasks alive, for [`crate::Node::wait_idle`]: a task counts from
/// [`Runner::start`] until its future is dropped (it returned, or was aborted).
#[derive(Clone, Debug)]
pub(super) struct LiveTasks(watch::Sender<usize>);

/// One live runner task, counted in [`LiveTasks`] until dropped.
struct Live(watch::Sender<usize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl LiveTasks {
    pub(super) fn new() -> Self {
        Self(watch::channel(0).0)
    }

    fn enter(&self) -> Live {
        self.0.send_modify(|n| *n += 1);
        Live(self.0.clone())
    }

    /// The count, to wait on.
    pub(super) fn subscribe(&self) -> watch::Receiver<usize> {
        self.0.subscribe()
    }
}

/// A job's runner, by what it is doing.
#[derive(Debug, Default)]
pub(super) enum Runner {
    /// No runner: the job is Suspended, final, or waits for a caller.
    #[default]
    Idle,
    /// Queued: waiting for a transfer slot.
    WaitingSlot(CancellationToken),
    /// Holding a transfer slot: Connecting or Transferring.
    Transferring(CancellationToken),
    /// Waiting out the retry delay after a TransientError.
    RetryWait(CancellationToken),
    /// Delivering `JobTransferred` or `JobError` until the callback acknowledges it.
    Notifying(CancellationToken),
}

/// The states a live runner moves between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Doing {
    WaitingSlot,
    Transferring,
    RetryWait,
    Notifying,
}

impl Runner {
    /// The live runner's token.
    pub(super) fn token(&self) -> Option<&CancellationToken> {
        match self {
            Self::Idle => None,
            Self::WaitingSlot(t)
            | Self::Transferring(t)
            | Self::RetryWait(t)
            | Self::Notifying(t) => Some(t),
        }
    }

    /// Whether a runner is live.
    pub(super) fn is_live(&self) -> bool {
        self.token().is_some()
    }

    /// Whether the runner only waits or notifies: a job queued again replaces it (it would
    /// stop without running the job).
    pub(super) fn is_replaceable(&self) -> bool {
        matches!(self, Self::Idle | Self::RetryWait(_) | Self::Notifying(_))
    }

    /// Stops the runner, if any: its token is cancelled and the job has none.
    pub(super) fn stop(&mut self) {
        if let Some(t) = std::mem::take(self).token() {
            t.cancel();
        }
    }

    /// The runner holding `token` now does `doing`; false when it was replaced or stopped,
    /// and then nothing changes. A job has at most one runner whose token is not cancelled
    /// (replacing or stopping one cancels it), so a live token is the job's runner.
    pub(super) fn set(&mut self, token: &CancellationToken, doing: Doing) -> bool {
        if token.is_cancelled() {
            return false;
        }
        *self = Self::doing(token.clone(), doing);
        true
    }

    /// The runner holding `token` ended on its own: the job has none. One that was replaced
    /// or stopped leaves the job as it is.
    pub(super) fn ended(&mut self, token: &CancellationToken) {
        if !token.is_cancelled() {
            *self = Self::Idle;
        }
    }

    fn doing(t: CancellationToken, doing: Doing) -> Self {
        match doing {
            Doing::WaitingSlot => Self::WaitingSlot(t),
            Doing::Transferring => Self::Transferring(t),
            Doing::RetryWait => Self::RetryWait(t),
            Doing::Notifying => Self::Notifying(t),
        }
    }

    /// Makes `token` the job's runner, doing `doing`, and spawns `work` once `previous`
    /// (the task of the runner it replaces) has ended. Returns the new task, which the
    /// next runner waits for in turn; it counts in `live` until it ends.
    pub(super) fn start<F>(
        &mut self,
        token: CancellationToken,
        doing: Doing,
        (previous, live): (Option<JoinHandle<()>>, &LiveTasks),
        work: F,
    ) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.stop();
        *self = Self::doing(token.clone(), doing);
        let live = live.enter();
        tokio::spawn(async move {
            let _live = live;
            if let Some(p) = previous {
                // Its panic, if any, was the old runner's; this one starts regardless.
                let _ = p.await;
            }
            if !token.is_cancelled() {
                work.await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[test]
    fn a_runner_moves_between_states_only_while_its_token_is_live() {
        let mut r = Runner::Idle;
        assert!(!r.is_live() && r.is_replaceable());
        let t = CancellationToken::new();
        assert!(r.set(&t, Doing::WaitingSlot));
        assert!(matches!(r, Runner::WaitingSlot(_)) && !r.is_replaceable());
        assert!(r.set(&t, Doing::Transferring));
        assert!(!r.is_replaceable());
        assert!(r.set(&t, Doing::RetryWait));
        assert!(r.is_replaceable());
        assert!(r.set(&t, Doing::Notifying));
        assert!(r.is_replaceable());
        // Stopped: the token is cancelled, the job has no runner, and the old runner can
        // neither move the state nor clear a new runner's.
        r.stop();
        assert!(t.is_cancelled() && matches!(r, Runner::Idle));
        assert!(!r.set(&t, Doing::Transferring));
        let t2 = CancellationToken::new();
        assert!(r.set(&t2, Doing::WaitingSlot));
        r.ended(&t);
        assert!(matches!(r, Runner::WaitingSlot(_)));
        r.ended(&t2);
        assert!(matches!(r, Runner::Idle));
    }

    #[tokio::test]
    async fn a_new_runner_starts_its_work_only_after_the_one_it_replaces_ended() {
        let order = Arc::new(AtomicUsize::new(0));
        let live = LiveTasks::new();
        let count = live.subscribe();
        let mut r = Runner::Idle;
        let (first, release) = (
            CancellationToken::new(),
            Arc::new(tokio::sync::Notify::new()),
        );
        let (o, rel) = (order.clone(), release.clone());
        let old = r.start(first.clone(), Doing::Notifying, (None, &live), async move {
            rel.notified().await;
            o.fetch_add(1, Ordering::SeqCst);
        });
        // The first runner is at work (it holds on until released, as a write would).
        tokio::task::yield_now().await;
        let o = order.clone();
        let new = r.start(
            CancellationToken::new(),
            Doing::WaitingSlot,
            (Some(old), &live),
            async move {
                // The old runner ended before this line ran.
                assert_eq!(o.fetch_add(10, Ordering::SeqCst), 1);
            },
        );
        assert!(first.is_cancelled(), "the replaced runner was stopped");
        assert!(matches!(r, Runner::WaitingSlot(_)));
        tokio::task::yield_now().await;
        assert_eq!(order.load(Ordering::SeqCst), 0, "the new one waits");
        assert_eq!(*count.borrow(), 2, "both tasks are live");
        release.notify_one();
        new.await.unwrap();
        assert_eq!(order.load(Ordering::SeqCst), 11);
        assert_eq!(*count.borrow(), 0, "no task is live once both ended");
    }
}
