//! Transfer slots: how many jobs transfer at once, and which.
//!
//! BITS transfers Foreground jobs before High, High before Normal, Normal before Low, and shares
//! time round-robin among jobs of one priority. Here a job needs a slot to transfer; there are
//! `max` of them. Only jobs of the highest priority that wants to transfer (waiting or
//! running) get slots, the one waiting longest first; a running job of a lower priority gives
//! its slot up at once, so that higher priorities take bandwidth as well as slots first. A
//! running job that has held its slot for a time slice yields it to a waiting job of its own
//! priority (round-robin).
//!
//! A preempted job goes back to Queued and keeps its verified pieces; it waits for a slot again.
//! Jobs waiting for a retry after a TransientError, and jobs delivering notifications, hold no
//! slot.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::job::{JobId, Priority};

struct Waiter {
    job: JobId,
    priority: Priority,
    seq: u64,
    grant: oneshot::Sender<CancellationToken>,
    parent: CancellationToken,
}

struct Active {
    job: JobId,
    priority: Priority,
    since: Instant,
    preempt: CancellationToken,
}

#[derive(Default)]
struct Inner {
    seq: u64,
    waiting: Vec<Waiter>,
    active: Vec<Active>,
}

/// The transfer slots of a node. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Slots {
    max: usize,
    slice: Duration,
    inner: Arc<Mutex<Inner>>,
}

/// A held slot; dropping it frees the slot. `preempt` is cancelled when the job must yield
/// (and when the runner's own token is, being its child).
pub(crate) struct SlotGuard {
    slots: Slots,
    job: JobId,
    pub(crate) preempt: CancellationToken,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        inner.active.retain(|a| a.job != self.job);
        self.slots.rebalance(&mut inner);
    }
}

impl Slots {
    /// `max` slots (at least 1), and the time slice after which a job yields to a waiting job of
    /// its priority.
    pub(crate) fn new(max: usize, slice: Duration) -> Self {
        Self {
            max: max.max(1),
            slice,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a slot for `job`; the guard's preempt token is a child of `token`.
    pub(crate) async fn acquire(
        &self,
        job: JobId,
        priority: Priority,
        token: &CancellationToken,
    ) -> Option<SlotGuard> {
        let (tx, rx) = oneshot::channel();
        {
            let mut inner = self.lock();
            inner.seq += 1;
            let seq = inner.seq;
            inner.waiting.push(Waiter {
                job,
                priority,
                seq,
                grant: tx,
                parent: token.clone(),
            });
            self.rebalance(&mut inner);
        }
        let granted = tokio::select! {
            () = token.cancelled() => None,
            g = rx => g.ok(),
        };
        match granted {
            Some(preempt) => Some(SlotGuard {
                slots: self.clone(),
                job,
                preempt,
            }),
            None => {
                let mut inner = self.lock();
                inner.waiting.retain(|w| w.job != job);
                // Granted just as the token was cancelled: give the slot back.
                inner.active.retain(|a| a.job != job);
                self.rebalance(&mut inner);
                None
            }
        }
    }

    /// Applies a priority change to a waiting or running job.
    pub(crate) fn set_priority(&self, job: JobId, priority: Priority) {
        let mut inner = self.lock();
        for w in inner.waiting.iter_mut().filter(|w| w.job == job) {
            w.priority = priority;
        }
        for a in inner.active.iter_mut().filter(|a| a.job == job) {
            a.priority = priority;
        }
        self.rebalance(&mut inner);
    }

    /// Grants free slots and preempts as the module docs say. Called on every change and
    /// periodically (for time slices) by [`Slots::tick`].
    fn rebalance(&self, inner: &mut Inner) {
        inner
            .waiting
            .retain(|w| !w.parent.is_cancelled() && !w.grant.is_closed());
        // The highest priority that wants to transfer, waiting or running.
        let Some(top) = inner
            .waiting
            .iter()
            .map(|w| w.priority)
            .chain(
                inner
                    .active
                    .iter()
                    .filter(|a| !a.preempt.is_cancelled())
                    .map(|a| a.priority),
            )
            .min()
        else {
            return;
        };
        // Lower priorities give their slots (and so their bandwidth) up at once.
        for a in inner.active.iter().filter(|a| a.priority > top) {
            a.preempt.cancel();
        }
        // Free slots go to the top priority, the longest waiting first.
        while inner.active.len() < self.max {
            let Some(best) = (0..inner.waiting.len())
                .filter(|&i| inner.waiting[i].priority == top)
                .min_by_key(|&i| inner.waiting[i].seq)
            else {
                break;
            };
            let w = inner.waiting.swap_remove(best);
            let preempt = w.parent.child_token();
            if w.grant.send(preempt.clone()).is_ok() {
                inner.active.push(Active {
                    job: w.job,
                    priority: w.priority,
                    since: Instant::now(),
                    preempt,
                });
            }
        }
        // Round-robin: with a job of the top priority waiting, the longest running job of
        // that priority yields once it has had its time slice.
        if inner.waiting.iter().any(|w| w.priority == top)
            && let Some(v) = inner
                .active
                .iter()
                .filter(|a| !a.preempt.is_cancelled())
                .filter(|a| a.priority == top && a.since.elapsed() >= self.slice)
                .min_by_key(|a| a.since)
        {
            v.preempt.cancel();
        }
    }

    /// Runs time slices until `shutdown`.
    pub(crate) async fn tick(self, shutdown: CancellationToken) {
        let period = (self.slice / 4).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let mut inner = self.lock();
            self.rebalance(&mut inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn priorities_first_then_round_robin() {
        let slots = Slots::new(1, Duration::from_secs(10));
        let root = CancellationToken::new();
        tokio::spawn(slots.clone().tick(root.clone()));
        let low = JobId::new();
        let g_low = slots.acquire(low, Priority::Low, &root).await.unwrap();
        // A Foreground job preempts the Low one at once.
        let fg = JobId::new();
        let s2 = slots.clone();
        let r2 = root.clone();
        let fg_wait = tokio::spawn(async move { s2.acquire(fg, Priority::Foreground, &r2).await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(g_low.preempt.is_cancelled());
        drop(g_low);
        let g_fg = fg_wait.await.unwrap().unwrap();
        assert!(!g_fg.preempt.is_cancelled());
        // Another Foreground job waits for the time slice, then gets the slot.
        let fg2 = JobId::new();
        let s3 = slots.clone();
        let r3 = root.clone();
        let fg2_wait =
            tokio::spawn(async move { s3.acquire(fg2, Priority::Foreground, &r3).await });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!g_fg.preempt.is_cancelled(), "yielded before its slice");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(g_fg.preempt.is_cancelled(), "kept the slot past its slice");
        drop(g_fg);
        let g_fg2 = fg2_wait.await.unwrap().unwrap();
        // A Low job waiting does not preempt a Foreground one, whatever the slice.
        let s4 = slots.clone();
        let r4 = root.clone();
        let low_wait = tokio::spawn(async move { s4.acquire(low, Priority::Low, &r4).await });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!g_fg2.preempt.is_cancelled());
        drop(g_fg2);
        let g_low = low_wait.await.unwrap().unwrap();
        root.cancel();
        drop(g_low);
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_slot_waits_rather_than_go_to_a_lower_priority() {
        let slots = Slots::new(2, Duration::from_secs(10));
        let root = CancellationToken::new();
        let g_fg = slots
            .acquire(JobId::new(), Priority::Foreground, &root)
            .await
            .unwrap();
        // One slot is free, but a Foreground job transfers: the Low job waits.
        let s2 = slots.clone();
        let r2 = root.clone();
        let low = tokio::spawn(async move { s2.acquire(JobId::new(), Priority::Low, &r2).await });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!low.is_finished());
        drop(g_fg);
        assert!(low.await.unwrap().is_some());
        root.cancel();
    }
}
