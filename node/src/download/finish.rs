//! The whole-file checks after the transfer.

use super::*;

/// The whole-file checks (step 5): every piece on disk, the content id and the SHA-256
/// expected; then the file is served as verified.
pub(super) async fn finish(
    env: &Env,
    task: &FileTask,
    t: Transferred,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Downloaded, AttemptFailure> {
    let Transferred {
        found,
        end,
        layer,
        from_peers,
        assembly_id,
        swarm_of,
        unverified_from,
        piece_count,
        served_file,
    } = t;
    let expected = task.expected;
    let (choice, claimed) = (found.choice, found.claimed);
    // 6. Whole-file checks: every piece on disk, checked.
    if end.on_disk.count_ones() != piece_count {
        return Err(Failure::Fatal(JobError {
            context: ErrorContext::LocalFile,
            file: Some(task.index),
            description: format!(
                "{} of {piece_count} pieces of {} are on disk at the end",
                end.on_disk.count_ones(),
                task.temp.display()
            ),
        })
        .into());
    }
    let layer = match (layer, end.builder) {
        (Some(l), _) => l,
        (None, Some(b)) => b.finish().ok_or_else(|| {
            Failure::Fatal(JobError {
                context: ErrorContext::LocalFile,
                file: Some(task.index),
                description: "pieces missing at the end".into(),
            })
        })?,
        (None, None) => unreachable!("a writer without a layer has a builder"),
    };
    let id = layer.content_id();
    // Computed whenever one is expected (and, on nodes that answer SHA-256 lookups, always).
    let sha256 = end.sha256;
    if sha256.is_none() && expected.sha256.is_some() {
        return Err(Failure::Fatal(JobError {
            context: ErrorContext::LocalFile,
            file: Some(task.index),
            description: "SHA-256 could not be computed".into(),
        })
        .into());
    }
    // A whole-file mismatch: these bytes must not be resumed from.
    let forget = || async {
        env.store.remove_at(&id, &task.temp);
        if let Some(a) = &assembly_id {
            env.store.remove_at(a, &task.temp);
        }
        if let Some(d) = &task.durable
            && let Err(e) = d.store.clear_pieces(d.job, d.index).await
        {
            warn!(url = %origin::redact(&task.url), "cannot forget the pieces of a file that failed: {e}");
        }
    };
    if let Err(e) = expected.check_content_id(&id) {
        forget().await;
        // Only origin bytes reach here without a trusted layer.
        return Err(Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!("{}: {e}", origin::redact(&task.url)),
        })
        .into());
    }
    if let Some(Err(e)) = sha256.map(|d| expected.check_sha256(d)) {
        forget().await;
        if let Some(d) = swarm_of
            && !unverified_from.is_empty()
        {
            // Pieces taken unverified from these peers made the file fail: every byte is
            // dropped (the next attempt starts afresh), they are banned for this content, and
            // the file comes from the origin alone (decision 0016).
            warn!(url = %origin::redact(&task.url), peers = unverified_from.len(), "the file fails its SHA-256 with pieces from peers; banning them and fetching from the origin");
            for peer in unverified_from {
                let swarm_key = assembly_id.map(|a| BanKey::Blake3(*a.hash()));
                let banned = env.bans.ban(BanKey::Sha256(d), peer);
                if let Some(k) = swarm_key {
                    env.bans.ban(k, peer);
                }
                if banned {
                    progress(Update::Banned);
                }
            }
            return Err(AttemptFailure::ClaimFailed);
        }
        if claimed && from_peers {
            if let Some((_, answers, ban)) = &choice {
                for (peer, _) in answers {
                    if env.bans.ban(*ban, *peer) {
                        progress(Update::Banned);
                    }
                }
            }
            return Err(AttemptFailure::ClaimFailed);
        }
        return Err(Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!("{}: {e}", origin::redact(&task.url)),
        })
        .into());
    }
    // Verified: serve it (from now on from the file reopened as its owner, only while it is
    // this file), and answer SHA-256 lookups for it.
    let identity = FileIdentity::of(&served_file)
        .map_err(|e| AttemptFailure::from(local_error(task.index, &task.temp, &e)))?;
    env.store.insert(
        layer.clone(),
        Bitfield::full(piece_count),
        task.temp.clone(),
        Backing::Named {
            owner: task.owner,
            identity,
        },
    );
    if let Some(d) = sha256 {
        env.store.set_sha256(&id, d);
    }
    if let (Some(_), Some(swarm)) = (swarm_of, assembly_id) {
        // The swarm is served from the verified content from now on.
        env.store.alias_swarm(swarm, &task.temp, id);
    }
    Ok(Downloaded {
        content_id: id,
        layer,
        sha256,
        from_peers,
        from_cache: false,
        identity,
    })
}
