//! The transfer of an upload or upload-reply job (BITS `BG_JOB_TYPE_UPLOAD`,
//! `BG_JOB_TYPE_UPLOAD_REPLY`): its one file goes to the server over the BITS Upload Protocol
//! ([`crate::source::upload`]), from where the server's last acknowledgement left it (the
//! session and that offset are stored with the job); an upload-reply job then fetches the
//! reply into its temporary file; Close-Session commits the upload, and the job becomes
//! Transferred (BITS: "after the upload file has been transferred to the server and the reply
//! has been transferred to the client").

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    Node,
    run::{Ended, all_transferred, fail, transient},
};
use crate::{
    download::Env,
    job::{ErrorContext, JobError, JobId, JobType, Transition},
    source::{
        origin::redact,
        upload::{self, UploadError},
    },
};

/// One upload run: what every step needs.
struct Upload<'a> {
    reg: &'a super::registry::Handle,
    env: &'a Env,
    job: JobId,
    token: &'a CancellationToken,
    url: url::Url,
    file: Arc<std::fs::File>,
    len: u64,
    name: String,
}

/// Opens `path` for reading as `owner` (not a FIFO's wait, not a non-file).
fn open_local(owner: Option<u32>, path: &std::path::Path) -> std::io::Result<(std::fs::File, u64)> {
    crate::store::fsuser::as_owner(owner, || {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok((f, meta.len()))
    })
}

/// Uploads the job's file; how it ended.
pub(super) async fn run(node: &Node, env: &Env, job: JobId, token: &CancellationToken) -> Ended {
    let reg = node.registry();
    let Ok(view) = node.view(job) else {
        return Ended::Stopped;
    };
    let info = view.info;
    let Some(file) = info.files.first().cloned() else {
        return Ended::Stopped;
    };
    let owner = info.owner;
    // The file as its owner may read it, now.
    let path = file.local_name.clone();
    let (f, len) = match tokio::task::spawn_blocking(move || open_local(owner, &path)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let e = JobError {
                context: ErrorContext::LocalFile,
                file: Some(0),
                description: format!("{}: {e}", file.local_name.display()),
            };
            return Ended::Failed(fail(reg, job, token, e).await);
        }
        Err(_) => return Ended::Stopped,
    };
    // The file's length is known; what the server acknowledged of it is the progress.
    reg.step(move |r| {
        if let Some(f) = r
            .jobs
            .get_mut(&job)
            .and_then(|rec| rec.info.files.get_mut(0))
        {
            f.bytes_total = Some(len);
        }
    })
    .await;
    let up = Upload {
        reg,
        env,
        job,
        token,
        url: file.url.clone(),
        file: Arc::new(f),
        len,
        name: file
            .local_name
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    };
    let acked = file.bytes_transferred.min(len);
    let (id, reply_url) = match up.send_all(info.upload_session.clone(), acked).await {
        Ok(x) => x,
        Err(e) => return ended(reg, job, token, &up.url, e).await,
    };
    if info.job_type == JobType::UploadReply
        && let Err(e) = up.fetch_reply(reply_url, owner, &file.temp_name).await
    {
        return e;
    }
    if let Err(e) = upload::close_session(&env.origin, &up.url, &id, token).await {
        return ended(reg, job, token, &up.url, e).await;
    }
    info!(%job, url = %redact(&up.url), bytes = len, "uploaded and committed");
    let t = token.clone();
    let done = reg
        .step(move |r| {
            if let Some(rec) = r.jobs.get_mut(&job) {
                rec.info.upload_session = None;
                if let Some(f) = rec.info.files.get_mut(0) {
                    f.bytes_transferred = len;
                    f.transferred = true;
                    f.validation_state = shoal_validator::ValidationState::Valid;
                }
            }
            all_transferred(r, job, &t)
        })
        .await;
    match done {
        Some(Err(ended)) => ended,
        _ => Ended::Stopped,
    }
}

impl Upload<'_> {
    /// Sends the whole file in `session` (a new one when `None`, or when the server lost it,
    /// once) from `acked` on; answers the session and the reply URL the last Ack named.
    async fn send_all(
        &self,
        mut session: Option<String>,
        mut acked: u64,
    ) -> Result<(String, Option<url::Url>), UploadError> {
        let (reg, job) = (self.reg, self.job);
        let mut fresh_sessions = 0;
        loop {
            let id = match &session {
                Some(id) => id.clone(),
                None => {
                    fresh_sessions += 1;
                    let id =
                        upload::create_session(&self.env.origin, &self.url, self.token).await?;
                    acked = 0;
                    let stored = id.clone();
                    reg.step(move |r| {
                        if let Some(rec) = r.jobs.get_mut(&job) {
                            rec.info.upload_session = Some(stored);
                            if let Some(f) = rec.info.files.get_mut(0) {
                                f.bytes_transferred = 0;
                            }
                            r.save_later(job);
                        }
                    })
                    .await;
                    id
                }
            };
            match self.send_once(&id, &mut acked).await {
                Ok(reply) => return Ok((id, reply)),
                Err(UploadError::SessionLost) if fresh_sessions < 2 => {
                    info!(%job, url = %redact(&self.url), "the upload server lost the session; starting a new one");
                    session = None;
                    reg.step(move |r| {
                        if let Some(rec) = r.jobs.get_mut(&job) {
                            rec.info.upload_session = None;
                            r.save_later(job);
                        }
                    })
                    .await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The fragments from `*acked` on in session `id`, with each acknowledgement forwarded
    /// to the registry as the file's progress.
    async fn send_once(&self, id: &str, acked: &mut u64) -> Result<Option<url::Url>, UploadError> {
        let (reg, job) = (self.reg, self.job);
        // The latest acknowledged offset only: a slow registry sees fewer, never more.
        let (tx, mut rx) = tokio::sync::watch::channel(*acked);
        let send = async move {
            // Dropped when the fragments end, which ends the forwarding below.
            let mut report = move |n: u64| {
                let _ = tx.send(n);
            };
            // (`tx` moves into `report`, which the fragments' end drops: `changed` then ends.)
            upload::send_fragments(
                &self.env.origin,
                &self.url,
                id,
                self.file.clone(),
                self.len,
                &self.name,
                acked,
                &mut report,
                self.token,
            )
            .await
        };
        let t = self.token.clone();
        let forward = async {
            let mut first = true;
            while rx.changed().await.is_ok() {
                let n = *rx.borrow_and_update();
                let t = t.clone();
                reg.step(move |r| {
                    if let Some(rec) = r.jobs.get_mut(&job) {
                        rec.transient_since = None;
                        rec.touched = tokio::time::Instant::now();
                        if let Some(f) = rec.info.files.get_mut(0) {
                            f.bytes_transferred = n;
                            f.bytes_from = crate::job::BytesBySource::default();
                        }
                        r.save_later(job);
                        if first {
                            r.transition(job, &t, Transition::Transfer);
                        }
                    }
                })
                .await;
                first = false;
            }
        };
        let (sent, ()) = tokio::join!(send, forward);
        sent
    }

    /// An upload-reply job's reply, from the URL the server named into `temp` (created as
    /// `owner`, mode 0600); `Err` with how the job ended when it cannot be had.
    async fn fetch_reply(
        &self,
        reply_url: Option<url::Url>,
        owner: Option<u32>,
        temp: &std::path::Path,
    ) -> Result<(), Ended> {
        let (reg, job, token) = (self.reg, self.job, self.token);
        let Some(reply) = reply_url else {
            let e = JobError {
                context: ErrorContext::RemoteFile,
                file: Some(0),
                description: format!(
                    "{} sent no BITS-Reply-URL for an upload-reply job",
                    redact(&self.url)
                ),
            };
            return Err(Ended::Failed(fail(reg, job, token, e).await));
        };
        let fetched = upload::fetch_reply(
            &self.env.origin,
            &reply,
            temp,
            move |p| {
                crate::store::fsuser::as_owner(owner, || {
                    use std::os::unix::fs::OpenOptionsExt;
                    let _ = std::fs::remove_file(p);
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(p)
                })
            },
            token,
        )
        .await;
        match fetched {
            Ok(_) => Ok(()),
            Err(e) => Err(ended(reg, job, token, &reply, e).await),
        }
    }
}

/// The job's end after upload error `e` at `url`.
async fn ended(
    reg: &super::registry::Handle,
    job: JobId,
    token: &CancellationToken,
    url: &url::Url,
    e: UploadError,
) -> Ended {
    let error = |context, description| JobError {
        context,
        file: Some(0),
        description,
    };
    match e {
        UploadError::Cancelled => Ended::Stopped,
        UploadError::Transient(d) => {
            transient(reg, job, token, error(ErrorContext::Transport, d)).await
        }
        UploadError::Fatal(d) => {
            Ended::Failed(fail(reg, job, token, error(ErrorContext::RemoteFile, d)).await)
        }
        UploadError::SessionLost => {
            let d = format!("{} keeps losing the upload session", redact(url));
            Ended::Failed(fail(reg, job, token, error(ErrorContext::RemoteFile, d)).await)
        }
    }
}
