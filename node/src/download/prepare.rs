//! The steps before the transfer: discovery and the piece layer, the length and the temporary file.

use super::*;

/// What discovery found: the content chosen among the peers' answers (with the key a false
/// claim bans under), its verified layer if a peer gave one (or the resumed one), the peers
/// that serve it, and until when peers are waited for before the origin.
pub(super) struct Discovered {
    pub(super) choice: Option<(ContentId, Vec<Answer>, BanKey)>,
    pub(super) layer: Option<PieceLayer>,
    pub(super) peers: Vec<Answer>,
    pub(super) wait_until: Instant,
    /// The origin's answer, once probed (shared with origin runs).
    pub(super) remote: Arc<OnceCell<Remote>>,
    /// The source policy's wait for peers before the origin.
    pub(super) delay: Duration,
    /// The content id was claimed by peers for a SHA-256 (its layer verified against it).
    pub(super) claimed: bool,
}

/// The file sized and opened: its geometry, the layer being assembled (without a verified
/// one), the temporary file, the pieces kept from an earlier run and what checks new ones.
pub(super) struct Opened<'r> {
    pub(super) found: Discovered,
    pub(super) length: u64,
    pub(super) geometry: ContentId,
    pub(super) assembly: Option<Assembly>,
    pub(super) file: Arc<File>,
    pub(super) kept: Bitfield,
    pub(super) checker: Checker,
    pub(super) resume: Option<&'r ResumePoint>,
    pub(super) resumed_bytes: u64,
}

/// Discovery's state between have rounds: until when peers are waited for, the cache node
/// wait, and the origin's length probe (SHA-256 claims only).
pub(super) struct Discovery {
    pub(super) started: Instant,
    pub(super) wait_until: Instant,
    pub(super) cache_wait: CacheWait,
    pub(super) remote: Arc<OnceCell<Remote>>,
    pub(super) length_probe: Option<AbortOnDrop>,
}

impl Discovery {
    pub(super) fn new(env: &Env, task: &FileTask, use_peers: bool, delay: Duration) -> Self {
        let started = now();
        let remote: Arc<OnceCell<Remote>> = Arc::new(OnceCell::new());
        // With only a SHA-256, a peer's claim names the length too, and a crowd of made-up
        // peers could claim any length (up to 1 TiB of disk): the origin tells the length, and
        // claims of another length do not count. The probe runs beside the peers' answers.
        let probe = use_peers && task.expected.blake3.is_none() && !env.policy.never_origin;
        let length_probe = probe.then(|| {
            let (origin, url, remote) = (env.origin.clone(), task.url.clone(), remote.clone());
            AbortOnDrop(tokio::spawn(async move {
                if let Ok(r) = origin.probe(&url).await {
                    let _ = remote.set(r);
                }
            }))
        });
        Self {
            started,
            wait_until: started + if use_peers { delay } else { Duration::ZERO },
            cache_wait: CacheWait::new(env.policy.cache_fallback(task.priority)),
            remote,
            length_probe,
        }
    }

    /// One have round: asks the peers (and the DHT's providers, and a cache node with the
    /// origin URL), and chooses the content: the resumed layer's, else the one most peers
    /// serve verified pieces of. Claims of another length than the origin's do not count.
    pub(super) async fn choose(
        &mut self,
        env: &Env,
        task: &FileTask,
        resume: Option<&ResumePoint>,
    ) -> Option<(ContentId, Vec<Answer>, BanKey)> {
        let expected = task.expected;
        let (key, ban) = match (expected.blake3, expected.sha256) {
            (Some(h), _) => (HaveKey::Blake3(h), BanKey::Blake3(h)),
            (None, Some(d)) => (HaveKey::Sha256(d), BanKey::Sha256(d)),
            (None, None) => return None,
        };
        let providers = discover(env, key).await;
        let cache_nodes = env.swarm.cache_nodes();
        let fill_from = if cache_nodes.is_empty() {
            None
        } else if task.private_url {
            // A cache node could not fetch it with the URL alone, and is not told the URL of a
            // job whose requests carry credentials.
            None
        } else {
            let connected = env.swarm.connected_peers().await;
            let target = self.cache_wait.target(&connected, cache_nodes);
            if target.is_none() {
                // Cache nodes are configured but none is connected yet: wait for one as for
                // any first peer.
                self.wait_until = self.wait_until.max(self.started + env.discovery_wait);
            }
            target
        };
        let mut answers =
            ask_peers(env, key, ban, providers, fill_from.map(|p| (p, &task.url))).await;
        if let Some(until) = self.cache_wait.observe(&answers, now()) {
            self.wait_until = self.wait_until.max(until);
        }
        if let Some(h) = expected.blake3 {
            answers.retain(|(_, h2)| *h2.content_id.hash() == h);
        } else if !answers.is_empty()
            && let Some(probe) = &self.length_probe
        {
            // The claims wait for the origin's length (at most `LENGTH_WAIT`; a probe that
            // fails tells nothing, and the claims are then taken as they are).
            let deadline = tokio::time::Instant::now() + LENGTH_WAIT;
            while !probe.0.is_finished() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Some(r) = self.remote.get() {
                answers.retain(|(_, h2)| h2.content_id.length() == r.length);
            }
        }
        let mut groups: HashMap<ContentId, Vec<Answer>> = HashMap::new();
        for a in answers {
            groups.entry(a.1.content_id).or_default().push(a);
        }
        match resume.and_then(|r| r.layer.as_ref()) {
            // Resuming pieces verified against a layer: stay with that content.
            Some(l) => {
                let id = l.content_id();
                Some((id, groups.remove(&id).unwrap_or_default(), ban))
            }
            // The content most peers serve verified pieces of.
            None => groups
                .into_iter()
                .max_by_key(|(id, v)| {
                    (
                        v.iter().filter(|(_, h)| h.have.count_ones() > 0).count(),
                        v.len(),
                        *id,
                    )
                })
                .map(|(id, v)| (id, v, ban)),
        }
    }
}

/// The layer of content `id` from the peers that answered for it (`answers`), unless `layer`
/// is already known: a few peers at once, each for a short while, until one verifies (a crowd
/// of peers that never answer costs [`LAYER_WAIT`] per [`LAYER_ASKS`] of them, not 20 s
/// each). Peers plainly assembling a layer themselves are not asked. A peer whose layer does
/// not verify is banned. Returns the layer and the peers not banned.
pub(super) async fn layer_of_peers(
    env: &Env,
    id: ContentId,
    answers: &[Answer],
    mut layer: Option<PieceLayer>,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> (Option<PieceLayer>, Vec<Answer>) {
    let ban_key = BanKey::Blake3(*id.hash());
    let mut peers: Vec<Answer> = answers
        .iter()
        .filter(|(peer, _)| !env.bans.is_banned(ban_key, peer))
        .cloned()
        .collect();
    let askable: Vec<PeerId> = peers
        .iter()
        .filter(|(_, h)| !(h.have.count_ones() == 0 && h.claimed.count_ones() > 0))
        .map(|(p, _)| *p)
        .collect();
    if layer.is_none() && id.piece_count() <= 1 && !askable.is_empty() {
        layer = PieceLayer::verify(id, Vec::new()).ok();
    }
    for batch in askable.chunks(LAYER_ASKS) {
        if layer.is_some() {
            break;
        }
        let asks = batch.iter().map(|peer| async move {
            let got = tokio::time::timeout(LAYER_WAIT, env.swarm.layer(*peer, id, None)).await;
            (*peer, got)
        });
        for (peer, got) in futures::future::join_all(asks).await {
            match got {
                Ok(Ok(LayerResponse::Full(cvs))) => match PieceLayer::verify(id, cvs) {
                    Ok(l) => {
                        if layer.is_none() {
                            layer = Some(l);
                        }
                    }
                    Err(e) => {
                        warn!(%peer, "piece layer rejected: {e}");
                        if env.bans.ban(ban_key, peer) {
                            progress(Update::Banned);
                        }
                        peers.retain(|(p, _)| *p != peer);
                    }
                },
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!("layer request failed: {e}"),
                Err(_) => debug!(%peer, "layer request took too long"),
            }
        }
    }
    (layer, peers)
}

/// Discovery and the piece layer (steps 1 and 2): the resumed layer, or the first peer's that
/// verifies. Under the source policy's wait for peers, this is repeated until a peer gives a
/// verified layer or the wait is over, before the origin is contacted at all.
pub(super) async fn discover_layer(
    env: &Env,
    task: &FileTask,
    use_peers: bool,
    resume: Option<&ResumePoint>,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Discovered, AttemptFailure> {
    let delay = env.policy.origin_delay(task.priority);
    let mut d = Discovery::new(env, task, use_peers, delay);
    loop {
        let choice = if use_peers {
            d.choose(env, task, resume).await
        } else {
            None
        };
        let resumed = if use_peers {
            resume.and_then(|r| r.layer.clone())
        } else {
            None
        };
        let (layer, peers) = match &choice {
            Some((id, answers, _)) => layer_of_peers(env, *id, answers, resumed, progress).await,
            None => (resumed, Vec::new()),
        };
        if layer.is_some() || now() >= d.wait_until {
            // A claimed content id (SHA-256 lookup) counts only with a layer that verifies
            // against it.
            let claimed = task.expected.blake3.is_none() && layer.is_some();
            return Ok(Discovered {
                choice,
                layer,
                peers,
                wait_until: d.wait_until,
                remote: d.remote,
                delay,
                claimed,
            });
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(Failure::Cancelled.into()),
            () = tokio::time::sleep(PEER_REFRESH) => {}
        }
    }
}

/// The pieces an earlier run left in the temporary file that this run keeps, and what checks
/// new pieces: the layer, or a builder deriving it. Pieces this process verified itself in a
/// run that stopped are kept as they are; others are checked again from the file.
pub(super) async fn kept_pieces(
    task: &FileTask,
    geometry: ContentId,
    layer: Option<&PieceLayer>,
    resume: Option<&ResumePoint>,
) -> Result<(Bitfield, Checker), AttemptFailure> {
    let length = geometry.length();
    let piece_count = geometry.piece_count();
    let local = |e: std::io::Error| AttemptFailure::from(local_error(task.index, &task.temp, &e));
    let builder = || {
        LayerBuilder::new(length).map_err(|e| {
            AttemptFailure::from(Failure::Fatal(JobError {
                context: ErrorContext::RemoteFile,
                file: Some(task.index),
                description: e.to_string(),
            }))
        })
    };
    let kept = match resume {
        None => (
            Bitfield::new(piece_count),
            match layer {
                Some(l) => Checker::Layer(l.clone()),
                None => Checker::Builder(builder()?),
            },
        ),
        // Pieces this process verified and wrote in a run that stopped: no second check.
        // (Against the same layer, or into the content id being derived.)
        Some(ResumePoint {
            pieces,
            trusted: Some(kept_builder),
            layer: before,
            ..
        }) if match (layer, before, kept_builder) {
            (Some(now), Some(before), _) => now == before,
            (None, None, Some(_)) => true,
            _ => false,
        } =>
        {
            (
                pieces.clone(),
                match (layer, kept_builder) {
                    (Some(l), _) => Checker::Layer(l.clone()),
                    (None, Some(b)) => Checker::Builder(b.clone()),
                    (None, None) => unreachable!("guarded"),
                },
            )
        }
        Some(r) => {
            let checker = match layer {
                Some(l) => Checker::Layer(l.clone()),
                None => Checker::Builder(builder()?),
            };
            let (pieces, temp, owner) = (r.pieces.clone(), task.temp.clone(), task.owner);
            tokio::task::spawn_blocking(move || recheck(&temp, geometry, &pieces, checker, owner))
                .await
                .map_err(|e| local(std::io::Error::other(e)))?
                .map_err(local)?
        }
    };
    Ok(kept)
}

/// The length (from the layer or the origin) and the temporary file (step 3), keeping the
/// pieces of an earlier run that are pieces of this content.
pub(super) async fn open_file<'r>(
    env: &Env,
    task: &FileTask,
    use_peers: bool,
    resume: Option<&'r ResumePoint>,
    mut found: Discovered,
    cancel: &CancellationToken,
) -> Result<Opened<'r>, AttemptFailure> {
    let expected = task.expected;
    let never_origin = env.policy.never_origin;
    let (layer, remote) = (&found.layer, &found.remote);
    // 3. Length, from the layer or the origin.
    let length = match &layer {
        Some(l) => l.content_id().length(),
        None if never_origin => {
            return Err(Failure::Transient(JobError {
                context: ErrorContext::Transport,
                file: Some(task.index),
                description: format!(
                    "no peer serves {} and the source policy never uses the origin",
                    origin::redact(&task.url)
                ),
            })
            .into());
        }
        None => {
            // A silent origin holds the probe for its timeouts and retries: a Cancel, Suspend
            // or shutdown does not wait for them.
            let probe = remote.get_or_try_init(|| env.origin.probe(&task.url));
            tokio::select! {
                r = probe => r.map_err(|e| origin_failure(task.index, &e))?.length,
                () = cancel.cancelled() => return Err(Failure::Cancelled.into()),
            }
        }
    };
    let geometry = ContentId::new([0; 32], length).map_err(|e| {
        Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!("{}: {e}", origin::redact(&task.url)),
        })
    })?;
    let piece_count = geometry.piece_count();
    // Without a verified layer but with the expected BLAKE3, the layer is assembled from the
    // pieces this node and its peers fetch from the origin. With only the SHA-256, the nodes
    // share those pieces under the SHA-256's swarm id, and each checks the whole file's
    // SHA-256 at the end (decision 0016).
    let swarm =
        |id: ContentId, swarm_of: Option<Sha256Digest>| Assembly::new(id, piece_count, swarm_of);
    let sharing = use_peers && piece_count > 1 && !never_origin;
    let assembly = match (&layer, expected.blake3, expected.sha256) {
        (None, Some(h), _) if sharing => ContentId::new(h, length).ok().map(|id| swarm(id, None)),
        (None, None, Some(d)) if sharing => shoal_validator::sha256_swarm_id(&d, length)
            .ok()
            .map(|id| swarm(id, Some(d))),
        _ => None,
    };
    if let Some(a) = &assembly {
        found.peers.retain(|(_, h)| h.content_id == a.id);
    }
    // 4. The temporary file: pieces of an earlier run are kept if they are pieces of this
    // content (same length; same layer, or from the origin with the same validator).
    let local = |e: std::io::Error| AttemptFailure::from(local_error(task.index, &task.temp, &e));
    if resume.is_some_and(|r| r.pieces.count_ones() > 0) && !task.temp.exists() {
        return Err(local(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the temporary file with the pieces of an earlier run vanished",
        )));
    }
    let resume = resume.filter(|r| {
        r.meta.length == length
            && r.pieces.len() == piece_count
            && r.pieces.count_ones() > 0
            && match &layer {
                Some(_) => true,
                None => {
                    let now = remote.get().and_then(|x| x.validator.clone());
                    match (&r.meta.validator, &now) {
                        (Some(a), Some(b)) => a == b,
                        // Without validators, only a digest checked at the end can tell.
                        (None, None) => !expected.is_none(),
                        _ => false,
                    }
                }
            }
    });
    let file = match resume {
        Some(_) => {
            open_temp(&task.temp, task.owner, true).and_then(|f| f.set_len(length).map(|()| f))
        }
        None => {
            if let Some(d) = &task.durable {
                // Forget an earlier run's pieces before the file is emptied.
                d.store
                    .clear_pieces(d.job, d.index)
                    .await
                    .map_err(|e| local(std::io::Error::other(e)))?;
            }
            create_temp(&task.temp, task.owner, length)
        }
    }
    .map(Arc::new)
    .map_err(local)?;
    let (kept, checker) = kept_pieces(task, geometry, layer.as_ref(), resume).await?;
    let resumed_bytes: u64 = kept
        .ones()
        .filter_map(|i| geometry.piece_range(i))
        .map(|r| r.end - r.start)
        .sum();
    if resume.is_some() {
        info!(
            url = %origin::redact(&task.url),
            pieces = kept.count_ones(),
            "resuming with pieces from an earlier run"
        );
    }
    Ok(Opened {
        found,
        length,
        geometry,
        assembly,
        file,
        kept,
        checker,
        resume,
        resumed_bytes,
    })
}
