//! Job events and the caller's callback, after BITS `IBackgroundCopyCallback` /
//! `IBackgroundCopyCallback2`.
//!
//! A job may carry one [`Callback`] (BITS `SetNotifyInterface`). Every node also broadcasts
//! [`Event`]s to whoever subscribed ([`crate::Node::subscribe`]), for monitoring.
//!
//! - [`Callback::file_transferred`] is called for each file whose bytes verified, with its
//!   temporary path; its [`ValidationState`] verdict is the `SetValidationState` analogue.
//! - [`Callback::job_transferred`] is called when every file verified and was validated. If it
//!   returns an error it is called again after the job's retry delay, until it returns `Ok`
//!   (BITS: "BITS continues to call this method until S_OK is returned").
//! - [`Callback::job_error`] is called when the job enters Error.
//! - [`Callback::job_modification`] is called on each state change.

use std::path::PathBuf;

use futures::future::BoxFuture;
use shoal_validator::ValidationState;

use crate::job::{JobError, JobId, JobInfo, State};

/// A failure reported by a callback; the node retries after the job's retry delay.
#[derive(Debug, thiserror::Error)]
#[error("callback failed: {0}")]
pub struct CallbackError(pub String);

/// A file whose bytes all verified, waiting for the caller's verdict.
#[derive(Clone, Debug)]
pub struct TransferredFile {
    /// The file's index in the job.
    pub index: usize,
    /// The temporary file holding the bytes (BITS `GetTemporaryName`).
    pub temp_name: PathBuf,
    /// True when some of the bytes came from peers.
    pub from_peers: bool,
}

/// The caller's handler of a job's events (BITS `IBackgroundCopyCallback2`). Every method has
/// a default that accepts.
pub trait Callback: Send + Sync + 'static {
    /// A file's bytes verified; return the verdict. Invalid on content from peers fetches the
    /// file again from the origin; Invalid on content from the origin puts the job in Error.
    fn file_transferred(
        &self,
        job: JobInfo,
        file: TransferredFile,
    ) -> BoxFuture<'static, ValidationState> {
        let _ = (job, file);
        Box::pin(async { ValidationState::Valid })
    }

    /// Every file of the job verified and was validated. Return `Ok` to acknowledge; an error
    /// makes the node call again after the job's retry delay. Only the node's shutdown cuts
    /// the call short, so the returned future may await [`crate::Node::complete`] (BITS's usual
    /// answer to JobTransferred) or [`crate::Node::cancel`].
    fn job_transferred(&self, job: JobInfo) -> BoxFuture<'static, Result<(), CallbackError>> {
        let _ = job;
        Box::pin(async { Ok(()) })
    }

    /// The job entered Error. An error return is retried like [`Callback::job_transferred`].
    fn job_error(
        &self,
        job: JobInfo,
        error: JobError,
    ) -> BoxFuture<'static, Result<(), CallbackError>> {
        let _ = (job, error);
        Box::pin(async { Ok(()) })
    }

    /// The job's state changed. Called on the job registry's task, in the order of the
    /// changes, once the new state is published ([`crate::Node::info`] shows it): it must not
    /// block, and must not wait for the node's async methods (hand the snapshot to a task or
    /// channel instead).
    fn job_modification(&self, job: JobInfo) {
        let _ = job;
    }
}

/// A broadcast event of a node.
#[derive(Clone, Debug)]
pub enum Event {
    /// A job changed state.
    JobModification {
        /// The job.
        job: JobId,
        /// The new state.
        state: State,
    },
    /// A file's bytes verified (before the caller's verdict).
    FileTransferred {
        /// The job.
        job: JobId,
        /// The file.
        file: TransferredFile,
    },
    /// Every file of a job verified and was validated.
    JobTransferred {
        /// The job.
        job: JobId,
    },
    /// A job entered Error.
    JobError {
        /// The job.
        job: JobId,
        /// The error.
        error: JobError,
    },
}
