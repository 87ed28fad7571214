//! The one thread that reads and writes the state database: every redb transaction of a node
//! runs there, one after the other, in the order it was asked for.
//!
//! After iroh-blobs' store actor (`src/store/fs.rs`, `src/store/fs/meta.rs`): the database
//! belongs to one OS thread that receives work over a bounded channel. A redb commit waits for
//! the disk (`fsync`), so no commit runs on a tokio worker or under a job's state: async
//! callers await [`StateHandle::run`], the download's writer thread (itself an OS thread)
//! calls [`StateHandle::run_blocking`]. The order of writes is the order they were sent, so
//! the job registry may send a job's record without waiting and still never see an older
//! record overwrite a newer one.
//!
//! [`StateHandle::close`] ends the thread and drops the database (redb's file lock goes with
//! it, so the same directory can be opened again at once). A closed handle answers `None`:
//! what was to be written after the node stopped is not written, as before a node had a
//! state directory at all.

use tokio::sync::{mpsc, oneshot};

use super::state::{PersistError, StateStore};

/// Requests waiting for the thread before senders wait (backpressure on the registry and the
/// writers).
const QUEUE: usize = 64;

/// Work for the thread.
enum Request {
    /// Run a closure against the database (it sends its own answer).
    Run(Box<dyn FnOnce(&StateStore) + Send>),
    /// Drop the database and end; answered once it is dropped.
    Close(oneshot::Sender<()>),
}

/// A handle to the state database's thread. Cheap to clone; every clone talks to the same
/// thread.
#[derive(Clone, Debug)]
pub(crate) struct StateHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Run(_) => "Run",
            Self::Close(_) => "Close",
        })
    }
}

/// The request that runs `work` and answers what it returns on the receiver.
fn request<R: Send + 'static>(
    work: impl FnOnce(&StateStore) -> R + Send + 'static,
) -> (Request, oneshot::Receiver<R>) {
    let (tx, rx) = oneshot::channel();
    let req = Request::Run(Box::new(move |s| {
        let _ = tx.send(work(s));
    }));
    (req, rx)
}

impl StateHandle {
    /// Starts the thread that owns `store`.
    ///
    /// # Errors
    /// [`PersistError::Db`] wrapping the I/O error when the OS refuses a thread.
    pub(crate) fn spawn(store: StateStore) -> Result<Self, PersistError> {
        let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
        std::thread::Builder::new()
            .name("shoal-state".into())
            .spawn(move || {
                while let Some(req) = rx.blocking_recv() {
                    match req {
                        Request::Run(work) => work(&store),
                        Request::Close(done) => {
                            drop(store);
                            let _ = done.send(());
                            return;
                        }
                    }
                }
            })
            .map_err(|e| PersistError::Db(Box::new(redb::Error::Io(e))))?;
        Ok(Self { tx })
    }

    /// Runs `work` on the database's thread after everything sent before it, and returns what
    /// it returned; `None` when the database is closed.
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&StateStore) -> R + Send + 'static,
    ) -> Option<R> {
        let (req, rx) = request(work);
        self.tx.send(req).await.ok()?;
        rx.await.ok()
    }

    /// Sends `work` without waiting for it to run: the write is ordered after everything sent
    /// before it. `done` hears its result (a closed database drops it unanswered).
    pub(crate) async fn send<R: Send + 'static>(
        &self,
        work: impl FnOnce(&StateStore) -> R + Send + 'static,
    ) -> oneshot::Receiver<R> {
        let (req, rx) = request(work);
        let _ = self.tx.send(req).await;
        rx
    }

    /// [`StateHandle::run`] for an OS thread outside the runtime (the download's writer).
    /// Must not be called from async code: it blocks the thread until the work ran.
    pub(crate) fn run_blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce(&StateStore) -> R + Send + 'static,
    ) -> Option<R> {
        let (req, rx) = request(work);
        self.tx.blocking_send(req).ok()?;
        rx.blocking_recv().ok()
    }

    /// Forgets a file's bitmap, resume record and layer (its bytes were discarded); see
    /// [`StateStore::clear_pieces`]. A closed database is not an error.
    ///
    /// # Errors
    /// [`PersistError::Db`] when the write fails.
    pub(crate) async fn clear_pieces(
        &self,
        id: crate::job::JobId,
        index: u32,
    ) -> Result<(), PersistError> {
        self.run(move |s| s.clear_pieces(id, index))
            .await
            .unwrap_or(Ok(()))
    }

    /// Drops the database once everything sent before ran, and waits until it is dropped.
    /// Later calls answer `None`.
    pub(crate) async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_run_in_the_order_sent_and_a_closed_database_answers_none() {
        let dir = tempfile::tempdir().unwrap();
        let h = StateHandle::spawn(StateStore::open(dir.path()).unwrap()).unwrap();
        // Sent without waiting, then read: the read sees the last write.
        for i in 0..20u8 {
            drop(h.send(move |s| s.put_meta("n", &[i])).await);
        }
        let got = h.run(|s| s.meta("n")).await.unwrap().unwrap();
        assert_eq!(got, Some(vec![19]));
        h.close().await;
        assert!(h.run(|s| s.meta("n")).await.is_none());
        // The file lock went with the database: the directory opens again.
        let again = StateStore::open(dir.path()).unwrap();
        assert_eq!(again.meta("n").unwrap(), Some(vec![19]));
    }

    #[test]
    fn a_blocking_caller_is_answered_too() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let h = StateHandle::spawn(StateStore::open(dir.path()).unwrap()).unwrap();
        h.run_blocking(|s| s.put_meta("k", b"v")).unwrap().unwrap();
        let got = rt.block_on(h.run(|s| s.meta("k"))).unwrap().unwrap();
        assert_eq!(got.as_deref(), Some(&b"v"[..]));
    }
}
