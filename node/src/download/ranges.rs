//! BITS files with byte ranges (AddFileWithRanges): fetched from the origin only.

use super::*;

/// Downloads the ranges of a ranged file (BITS `AddFileWithRanges`) from the origin, one after
/// the other into the temporary file, then checks the local file against the expected digests
/// (which are the local file's). Peers hold whole files, so a ranged file comes from the
/// origin only. A ranged file that stops starts again from its first range.
pub(super) async fn download_ranges(
    env: &Env,
    task: &FileTask,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Downloaded, Failure> {
    let remote_error = |description: String| {
        Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description,
        })
    };
    let remote = env
        .origin
        .probe(&task.url)
        .await
        .map_err(|e| origin_failure(task.index, &e))?;
    // Resolve "to the end" and check every range against the remote length.
    let mut spans = Vec::with_capacity(task.ranges.len());
    for r in &task.ranges {
        let end = match r.length {
            Some(l) => r.offset.saturating_add(l),
            None => remote.length,
        };
        if r.offset >= remote.length || end > remote.length {
            return Err(remote_error(format!(
                "{}: the range {}..{end} is beyond the end of the file ({} bytes; BITS BG_E_INVALID_RANGE)",
                origin::redact(&task.url),
                r.offset,
                remote.length
            )));
        }
        spans.push(r.offset..end);
    }
    let whole = spans.len() == 1 && spans[0] == (0..remote.length);
    if !remote.ranges && !whole {
        return Err(remote_error(format!(
            "{}: the server does not support ranges (BITS BG_E_INSUFFICIENT_RANGE_SUPPORT)",
            origin::redact(&task.url)
        )));
    }
    let total: u64 = spans.iter().map(|s| s.end - s.start).sum();
    let local = |e: std::io::Error| local_error(task.index, &task.temp, &e);
    if let Some(d) = &task.durable {
        d.store
            .clear_pieces(d.job, d.index)
            .await
            .map_err(|e| local(std::io::Error::other(e)))?;
    }
    let file = create_temp(&task.temp, task.owner, total).map_err(local)?;
    progress(Update::Started {
        length: total,
        content_id: None,
        resumed: 0,
    });
    let file = Arc::new(file);
    let mut at = 0u64;
    for span in spans {
        let written = Arc::new(Mutex::new(Ok::<(), std::io::Error>(())));
        let fetch = env
            .origin
            .fetch(&task.url, &remote, span.clone(), 1 << 20, |bytes| {
                let (file, written, offset) = (file.clone(), written.clone(), at);
                at += bytes.len() as u64;
                let n = bytes.len() as u64;
                let bandwidth = env.bandwidth.clone();
                let foreground = task.priority == crate::job::Priority::Foreground;
                async move {
                    bandwidth.download(foreground, n).await;
                    let r = tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    let ok = r.is_ok();
                    if let Err(e) = r {
                        *written.lock().unwrap_or_else(|p| p.into_inner()) = Err(e);
                    } else {
                        progress(Update::Piece {
                            bytes: n,
                            source: None,
                        });
                    }
                    ok
                }
            });
        let result = tokio::select! {
            () = cancel.cancelled() => return Err(Failure::Cancelled),
            r = fetch => r,
        };
        std::mem::replace(
            &mut *written.lock().unwrap_or_else(|p| p.into_inner()),
            Ok(()),
        )
        .map_err(local)?;
        result.map_err(|e| origin_failure(task.index, &e))?;
    }
    // On disk before it can count as transferred.
    let f = file.clone();
    tokio::task::spawn_blocking(move || f.sync_data())
        .await
        .map_err(|e| local(std::io::Error::other(e)))?
        .map_err(local)?;
    // The local file's digests, from what was written.
    let (path, len, owner) = (task.temp.clone(), total, task.owner);
    let digests = tokio::task::spawn_blocking(move || {
        let f = open_temp(&path, owner, false)?;
        shoal_validator::hash_reader(std::io::BufReader::new(f), len).map_err(std::io::Error::other)
    })
    .await
    .map_err(|e| local(std::io::Error::other(e)))?
    .map_err(local)?;
    let id = digests.content_id();
    task.expected
        .check_content_id(&id)
        .and_then(|()| task.expected.check_sha256(digests.sha256))
        .map_err(|e| remote_error(format!("{} (ranges): {e}", origin::redact(&task.url))))?;
    let count = id.piece_count();
    let identity = FileIdentity::of(&file).map_err(local)?;
    env.store.insert(
        digests.layer.clone(),
        Bitfield::full(count),
        task.temp.clone(),
        Backing::Named {
            owner: task.owner,
            identity,
        },
    );
    env.store.set_sha256(&id, digests.sha256);
    Ok(Downloaded {
        content_id: id,
        layer: digests.layer,
        sha256: Some(digests.sha256),
        from_peers: false,
        from_cache: false,
        identity,
    })
}
