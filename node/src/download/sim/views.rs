//! The nodes' member views, with their merges on a second thread.
//!
//! Merging the member lists of answers and announcements is about a third of a large
//! simulation's time, and each merge reads and changes one view alone. So the world hands
//! merges to a worker thread, in the order the cores ask for them, and goes on with the next
//! events; any other use of a view (a sample for an answer, the fetchers at a member tick, a
//! `forget`, a reset) first waits until the worker has applied every merge queued for that
//! view. Each view thus sees the same operations in the same order as on one thread, and the
//! simulation's report is the same to the event; only merges into different views overlap
//! with the rest.

use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicU32, Ordering},
    mpsc,
};
use std::thread::JoinHandle;
use std::time::Instant;

use libp2p::PeerId;
use shoal_protocol::Member;

use crate::download::members::MemberView;

/// A merge for the worker: view `node` takes in `members` from `from` at `now`.
struct Merge {
    node: usize,
    from: PeerId,
    members: Vec<Member>,
    now: Instant,
}

/// What the world and the worker share.
struct Shared {
    views: Vec<Mutex<Option<MemberView>>>,
    /// Merges queued for each view and not yet applied.
    pending: Vec<AtomicU32>,
}

/// Merges queued at most: when the worker lags this far behind, the world waits for it.
const QUEUE: usize = 4096;

/// The views of `n` nodes (none has one until [`Views::set`]) and the merge worker.
pub(super) struct Views {
    shared: Arc<Shared>,
    /// Taken on drop, to close the queue.
    tx: Option<mpsc::SyncSender<Merge>>,
    worker: Option<JoinHandle<()>>,
}

impl Views {
    /// `n` nodes without a view, and the worker thread.
    ///
    /// # Panics
    /// When the thread cannot be started.
    pub(super) fn new(n: usize) -> Self {
        let shared = Arc::new(Shared {
            views: (0..n).map(|_| Mutex::new(None)).collect(),
            pending: (0..n).map(|_| AtomicU32::new(0)).collect(),
        });
        let (tx, rx) = mpsc::sync_channel::<Merge>(QUEUE);
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("sim-merges".into())
            .spawn(move || {
                for m in rx {
                    if let Some(v) = lock(&s.views[m.node]).as_mut() {
                        v.merge(&m.from, &m.members, m.now);
                    }
                    s.pending[m.node].fetch_sub(1, Ordering::Release);
                }
            })
            .expect("the simulation's merge thread starts");
        Self {
            shared,
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    /// Node `i`'s view, once every merge queued for it is applied.
    pub(super) fn get(&self, i: usize) -> MutexGuard<'_, Option<MemberView>> {
        let pending = &self.shared.pending[i];
        let mut spins = 0u32;
        while pending.load(Ordering::Acquire) > 0 {
            // The worker is at most a few merges behind; on a busy machine, it needs the core.
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                assert!(
                    !self.worker.as_ref().is_some_and(JoinHandle::is_finished),
                    "the merge worker ended with merges queued: a merge panicked"
                );
                std::thread::yield_now();
            }
        }
        lock(&self.shared.views[i])
    }

    /// Gives node `i` the view `v` (or none).
    pub(super) fn set(&self, i: usize, v: Option<MemberView>) {
        *self.get(i) = v;
    }

    /// Queues the merge of `members` from `from` into node `i`'s view, at `now`; waits while
    /// the queue is full.
    ///
    /// # Panics
    /// When the worker ended (a merge panicked).
    pub(super) fn merge(&self, i: usize, from: PeerId, members: Vec<Member>, now: Instant) {
        self.shared.pending[i].fetch_add(1, Ordering::Relaxed);
        let merge = Merge {
            node: i,
            from,
            members,
            now,
        };
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(merge).is_ok());
        assert!(sent, "the merge worker ended: a merge panicked");
    }
}

impl Drop for Views {
    fn drop(&mut self) {
        // The queue closes and the worker ends after the merges still queued.
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// A view's lock; one poisoned by a panic of the other thread is taken as it is.
fn lock(m: &Mutex<Option<MemberView>>) -> MutexGuard<'_, Option<MemberView>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    /// A list as peer `from` sends it: itself first, then members of `pool`.
    fn list(rng: &mut StdRng, from: PeerId, pool: &[PeerId], ms: u64) -> Vec<Member> {
        let member = |p: &PeerId, heartbeat: u64, done: u32| Member {
            peer_id: Bytes::from(p.to_bytes()),
            heartbeat,
            done,
            origin: done.is_multiple_of(2),
        };
        let mut out = vec![member(&from, ms, rng.random_range(0..100))];
        for _ in 0..rng.random_range(0..20) {
            let p = &pool[rng.random_range(0..pool.len())];
            out.push(member(
                p,
                ms - rng.random_range(0..5_000),
                rng.random_range(0..100),
            ));
        }
        out
    }

    #[test]
    fn views_read_after_queued_merges_are_those_of_merging_on_one_thread() {
        let (t0, wall) = (Instant::now(), 1_700_000_000_000);
        let nodes: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let pool: Vec<PeerId> = (0..64).map(|_| PeerId::random()).collect();
        let mut direct: Vec<MemberView> = nodes
            .iter()
            .map(|p| MemberView::new(*p, &[7; 32], t0, wall))
            .collect();
        let views = Views::new(nodes.len());
        for (i, v) in direct.iter().enumerate() {
            views.set(i, Some(v.clone()));
        }
        let mut rng = StdRng::seed_from_u64(5);
        for step in 0..2_000u64 {
            let i = rng.random_range(0..nodes.len());
            let now = t0 + Duration::from_millis(step * 10);
            let from = pool[rng.random_range(0..pool.len())];
            let members = list(&mut rng, from, &pool, wall + step * 10);
            direct[i].merge(&from, &members, now);
            views.merge(i, from, members, now);
            if step % 7 == 0 {
                // A read waits for the merges queued for its view, and sees what one thread
                // would have made of them.
                let j = rng.random_range(0..nodes.len());
                let seed = rng.random();
                let got = views
                    .get(j)
                    .as_ref()
                    .unwrap()
                    .sample_with(now, &mut StdRng::seed_from_u64(seed));
                let want = direct[j].sample_with(now, &mut StdRng::seed_from_u64(seed));
                assert_eq!(got, want, "step {step}");
                let got = views.get(j).as_ref().unwrap().fetchers(100, now, false);
                assert_eq!(got, direct[j].fetchers(100, now, false), "step {step}");
            }
        }
    }
}
