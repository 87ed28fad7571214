//! BITS `Complete`: the renames, on a blocking thread, between the registry's first and last
//! step ([`Command::BeginComplete`], [`Command::EndComplete`]). The job waits meanwhile; other
//! jobs do not.

use super::{
    Node,
    registry::{Command, CompleteEnd},
};
use crate::{Error, job::JobId, store::fsuser::RenameError};

/// Completes `job`: each transferred file not renamed yet is renamed to its local name, as
/// the job's owner, only if it is the file that verified; the other temporary files are
/// deleted.
pub(super) async fn run(node: &Node, job: JobId) -> Result<(), Error> {
    let reg = node.registry();
    let plan = reg
        .call(|reply| Command::BeginComplete { job, reply })
        .await?;
    let owner = plan.owner;
    if plan.job_type.is_upload() {
        return complete_upload(node, job, plan).await;
    }
    let mut end = CompleteEnd::Done;
    let mut failed = None;
    for (i, f, ids) in plan.files {
        let local = f.local_name.clone();
        let content = node.env().store.clone();
        let renamed = tokio::task::spawn_blocking(move || {
            if !f.transferred {
                if let Some(id) = &f.content_id {
                    content.remove_at(id, &f.temp_name);
                }
                let _ =
                    crate::store::fsuser::as_owner(owner, || std::fs::remove_file(&f.temp_name));
                return None;
            }
            if f.local_name.is_dir() {
                return Some(Err(None));
            }
            // As the job's owner: the rename is checked as the user would be (a directory
            // swapped for a symlink since the file was added leads nowhere the user may not
            // write; a sticky directory keeps other users' files). Only the file that
            // verified is renamed, within the directory the file was added in.
            let recheck = |file: &std::fs::File| -> std::io::Result<bool> {
                let Some(id) = f.content_id else {
                    return Ok(false);
                };
                let d = shoal_validator::hash_reader(
                    std::io::BufReader::new(file.try_clone()?),
                    id.length(),
                )
                .map_err(std::io::Error::other)?;
                Ok(d.is(&id, f.sha256))
            };
            Some(
                crate::store::fsuser::as_owner(owner, || {
                    Ok(crate::store::fsuser::rename_verified(
                        &f.temp_name,
                        &f.local_name,
                        &ids,
                        recheck,
                    ))
                })
                .unwrap_or_else(|e| Err(RenameError::Io(e)))
                .map_err(Some),
            )
        })
        .await
        .unwrap_or_else(|e| {
            Some(Err(Some(RenameError::Io(std::io::Error::other(
                e.to_string(),
            )))))
        });
        match renamed {
            None => {}
            Some(Ok(identity)) => {
                let stored = reg
                    .call(|reply| Command::Renamed {
                        job,
                        index: i,
                        identity,
                        reply,
                    })
                    .await;
                if let Err(e) = stored {
                    end = CompleteEnd::Stopped;
                    failed = Some(e);
                    break;
                }
            }
            Some(Err(None)) => {
                end = CompleteEnd::Stopped;
                failed = Some(Error::BadLocalName {
                    path: local,
                    reason: "it became a directory".into(),
                });
                break;
            }
            Some(Err(Some(RenameError::Io(e)))) => {
                end = CompleteEnd::Stopped;
                failed = Some(Error::Io {
                    path: local,
                    source: e,
                });
                break;
            }
            Some(Err(Some(RenameError::NotVerified(reason)))) => {
                end = CompleteEnd::Refused { index: i, reason };
                break;
            }
        }
    }
    let ended = reg
        .call(|reply| Command::EndComplete { job, end, reply })
        .await;
    match failed {
        Some(e) => Err(e),
        None => ended,
    }
}

/// Complete of a Transferred upload job: the upload was committed on the server already; an
/// upload-reply job's reply takes its name (as the owner; the reply was verified by nothing
/// but the server's TLS, so there is nothing to check again).
async fn complete_upload(
    node: &Node,
    job: JobId,
    plan: super::registry::CompletePlan,
) -> Result<(), Error> {
    let reg = node.registry();
    let owner = plan.owner;
    let mut end = CompleteEnd::Done;
    let mut failed = None;
    if plan.job_type == crate::job::JobType::UploadReply
        && let (Some(name), Some((_, f, _))) = (plan.reply_file_name, plan.files.first())
    {
        let temp = f.temp_name.clone();
        let target = name.clone();
        let renamed = tokio::task::spawn_blocking(move || {
            crate::store::fsuser::as_owner(owner, || std::fs::rename(&temp, &target))
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(e) = renamed {
            end = CompleteEnd::Stopped;
            failed = Some(Error::Io {
                path: name,
                source: e,
            });
        }
    }
    let ended = reg
        .call(|reply| Command::EndComplete { job, end, reply })
        .await;
    match failed {
        Some(e) => Err(e),
        None => ended,
    }
}
