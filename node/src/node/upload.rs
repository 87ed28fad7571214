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
    let (owner, url) = (info.owner, file.url.clone());
    let error = |context, description: String| JobError {
        context,
        file: Some(0),
        description,
    };
    // The file as its owner may read it, now.
    let path = file.local_name.clone();
    let opened = tokio::task::spawn_blocking(move || {
        crate::store::fsuser::as_owner(owner, || {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)?;
            let meta = f.metadata()?;
            if !meta.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            Ok((f, meta.len()))
        })
    })
    .await;
    let (f, len) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let e = error(
                ErrorContext::LocalFile,
                format!("{}: {e}", file.local_name.display()),
            );
            return Ended::Failed(fail(reg, job, token, e).await);
        }
        Err(_) => return Ended::Stopped,
    };
    let f = Arc::new(f);
    let name = file
        .local_name
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
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
    let mut session = info.upload_session.clone();
    let mut acked = if session.is_some() {
        file.bytes_transferred.min(len)
    } else {
        0
    };
    let mut fresh_sessions = 0;
    let outcome: Result<Option<url::Url>, UploadError> = loop {
        let id = match &session {
            Some(id) => id.clone(),
            None => {
                fresh_sessions += 1;
                match upload::create_session(&env.origin, &url, token).await {
                    Ok(id) => {
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
                        session = Some(id.clone());
                        id
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        // Progress goes to the registry as the server acknowledges it.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let acked_now = &mut acked;
        let (origin, f2, name2, id2) = (&env.origin, f.clone(), &name, &id);
        let url2 = &url;
        let send = async move {
            // Dropped when the fragments end, which ends the forwarding below.
            let mut report = move |n: u64| {
                let _ = tx.send(n);
            };
            upload::send_fragments(
                origin,
                url2,
                id2,
                f2,
                len,
                name2,
                acked_now,
                &mut report,
                token,
            )
            .await
        };
        let t = token.clone();
        let forward = async {
            let mut first = true;
            while let Some(n) = rx.recv().await {
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
        match sent {
            Err(UploadError::SessionLost) if fresh_sessions < 2 => {
                info!(%job, url = %redact(&url), "the upload server lost the session; starting a new one");
                session = None;
                reg.step(move |r| {
                    if let Some(rec) = r.jobs.get_mut(&job) {
                        rec.info.upload_session = None;
                        r.save_later(job);
                    }
                })
                .await;
            }
            other => break other,
        }
    };
    let reply_url = match outcome {
        Ok(reply) => reply,
        Err(e) => return ended(reg, job, token, &url, e).await,
    };
    let Some(id) = session else {
        return Ended::Stopped;
    };
    if info.job_type == JobType::UploadReply {
        let Some(reply) = reply_url else {
            let e = error(
                ErrorContext::RemoteFile,
                format!(
                    "{} sent no BITS-Reply-URL for an upload-reply job",
                    redact(&url)
                ),
            );
            return Ended::Failed(fail(reg, job, token, e).await);
        };
        let temp = file.temp_name.clone();
        let fetched = upload::fetch_reply(
            &env.origin,
            &reply,
            &temp,
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
        if let Err(e) = fetched {
            return ended(reg, job, token, &reply, e).await;
        }
    }
    if let Err(e) = upload::close_session(&env.origin, &url, &id, token).await {
        return ended(reg, job, token, &url, e).await;
    }
    info!(%job, url = %redact(&url), bytes = len, "uploaded and committed");
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
