//! The driver of a transfer: runs the core (`core.rs`), carries out its actions and owns every child task.

use super::*;

/// What a driver's child task reports.
pub(super) enum Event {
    Fetched(Fetched),
    /// A have round: the peers asked, the peers that could have been asked (connected, or
    /// found in the DHT), and the answers (for the content, from peers not banned).
    Round(Vec<PeerId>, Vec<PeerId>, Vec<Answer>),
    Assembled(Assembled),
}

/// The clock a download reads: tokio's, so that paused time drives a whole download.
pub(super) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Runs a [`Core`]: carries out its actions, owns every child task (piece requests, origin
/// runs, have rounds, gatherings) in one `JoinSet`, and feeds results, announcements and
/// timeouts back. Dropping it aborts every child task.
pub(super) struct Driver<'a> {
    pub(super) env: &'a Env,
    pub(super) task: &'a FileTask,
    pub(super) foreground: bool,
    pub(super) length: u64,
    pub(super) piece_size: u64,
    pub(super) piece_count: u32,
    pub(super) remote: Arc<OnceCell<Remote>>,
    pub(super) writer: mpsc::Sender<ToWriter>,
    pub(super) served_file: Arc<File>,
    pub(super) progress: &'a (dyn Fn(Update) + Send + Sync),
    pub(super) tasks: tokio::task::JoinSet<Event>,
    pub(super) requests: HashMap<(PieceIndex, PeerId), tokio::task::AbortHandle>,
    pub(super) origin_tx: mpsc::Sender<Fetched>,
    /// The bytes of the piece whose verdict the core is handling, until its store operations
    /// (verified, or claimed) have kept it among the store's recent pieces.
    pub(super) passed: Option<(PieceIndex, Bytes, shoal_validator::ChainingValue)>,
    /// Whether the writer attaches the bytes of the pieces that pass to their verdicts: set
    /// while peers have asked this node for the content (otherwise a verdict would hold a
    /// piece's buffer for nothing).
    pub(super) keep_pieces: Arc<std::sync::atomic::AtomicBool>,
}

impl Driver<'_> {
    pub(super) fn writer_failed(&self) -> AttemptFailure {
        Failure::Fatal(JobError {
            context: ErrorContext::LocalFile,
            file: Some(self.task.index),
            description: format!("writing {} failed", self.task.temp.display()),
        })
        .into()
    }

    /// Runs `core` until it ends, the download is cancelled or the writer fails.
    pub(super) async fn run(
        &mut self,
        core: &mut Core,
        verified: &mut mpsc::Receiver<Verdict>,
        origin_rx: &mut mpsc::Receiver<Fetched>,
        writer_done: &(dyn Fn() -> bool + Sync),
        cancel: &CancellationToken,
    ) -> Result<(), AttemptFailure> {
        let mut announcements = self.env.swarm.announcements();
        let mut announcements_open = true;
        // One timer, moved to each new deadline (not a new one per wake-up).
        let sleep = tokio::time::sleep(TICK);
        tokio::pin!(sleep);
        loop {
            while let Some(action) = core.poll_action() {
                self.execute(core, action).await?;
            }
            self.passed = None;
            if let Some(end) = core.poll_end() {
                return self.render(core, end);
            }
            let deadline: tokio::time::Instant = core
                .poll_timeout()
                .map_or_else(|| tokio::time::Instant::now() + TICK, Into::into);
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(Failure::Cancelled.into()),
                Some(mut v) = verified.recv() => {
                    self.passed = v.piece.take().map(|(b, cv)| (v.index, b, cv));
                    core.handle_verified(now(), v);
                }
                Some(f) = origin_rx.recv() => self.on_fetched(core, f),
                // An aborted request joins as an error: matched here, so that the branch stays
                // enabled for the results behind it (a failed pattern would disable it until the
                // next wake-up).
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => match joined {
                    Ok(Event::Fetched(f)) => self.on_fetched(core, f),
                    Ok(Event::Round(asked, reachable, answers)) => {
                        core.handle_round(now(), &asked, &reachable, answers);
                    }
                    Ok(Event::Assembled(a)) => core.handle_assembled(now(), a),
                    Err(_) => {}
                },
                got = announcements.recv(), if announcements_open && core.content_id().is_some() => match got {
                    Ok((peer, h)) => {
                        let banned = core
                            .content_id()
                            .is_some_and(|c| self.env.bans.is_banned(BanKey::Blake3(*c.hash()), &peer));
                        if !banned {
                            core.handle_holding(now(), peer, h);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => announcements_open = false,
                },
                () = &mut sleep => {
                    // The writer stops only on a write, flush or state-store failure; the
                    // pieces it held will never be reported, so end here (its error comes from
                    // the join).
                    if writer_done() {
                        return Err(self.writer_failed());
                    }
                    core.handle_timeout(now());
                }
            }
        }
    }

    pub(super) fn on_fetched(&mut self, core: &mut Core, f: Fetched) {
        match f {
            Fetched::Piece(index, source, bytes) => {
                if let Source::Peer(p) = source {
                    self.requests.remove(&(index, p));
                }
                core.handle_piece(now(), index, source, bytes);
            }
            Fetched::Failed(index, p, failure) => {
                debug!(index, peer = %p, "piece fetch failed: {failure}");
                self.requests.remove(&(index, p));
                core.handle_failed(now(), index, p, false);
            }
            Fetched::Busy(index, p) => {
                self.requests.remove(&(index, p));
                core.handle_failed(now(), index, p, true);
            }
            Fetched::OriginEnd(result) => {
                core.handle_origin_end(now(), result, self.remote.get().map(|r| r.ranges));
            }
        }
    }

    /// The one place a core's end becomes the download's outcome.
    pub(super) fn render(&self, core: &Core, end: End) -> Result<(), AttemptFailure> {
        let (task, url) = (self.task, origin::redact(&self.task.url));
        let content = core.content_id().map(|c| c.to_string()).unwrap_or_default();
        let fatal = |description: String| {
            Err(Failure::Fatal(JobError {
                context: ErrorContext::RemoteFile,
                file: Some(task.index),
                description,
            })
            .into())
        };
        match end {
            End::Done => Ok(()),
            End::Stuck => Err(Failure::Transient(JobError {
                context: ErrorContext::Transport,
                file: Some(task.index),
                description: format!(
                    "no peer has the missing pieces of {url} and the source policy never uses the origin"
                ),
            })
            .into()),
            End::DiffersFromLayer(index) => fatal(format!(
                "piece {index} from {url} differs from the verified piece layer of {content}"
            )),
            End::ClaimFailed => Err(AttemptFailure::ClaimFailed),
            End::OriginPieceFailed(index, reason) => fatal(format!(
                "piece {index} from {url} fails verification against content id {content}: {reason}"
            )),
            End::Origin(e) => Err(origin_failure(task.index, &e).into()),
        }
    }

    /// Carries out one action.
    pub(super) async fn execute(
        &mut self,
        core: &mut Core,
        action: Action,
    ) -> Result<(), AttemptFailure> {
        let env = self.env;
        match action {
            Action::RequestPiece {
                content_id,
                peer,
                index,
            } => {
                let (swarm, bandwidth, fg) =
                    (env.swarm.clone(), env.bandwidth.clone(), self.foreground);
                let h = self.tasks.spawn(async move {
                    Event::Fetched(match swarm.piece(peer, content_id, index).await {
                        Ok(PieceResponse::Data(b)) => {
                            bandwidth.download(fg, b.len() as u64).await;
                            Fetched::Piece(index, Source::Peer(peer), b)
                        }
                        Ok(PieceResponse::Busy) => Fetched::Busy(index, peer),
                        Ok(PieceResponse::NotFound) => {
                            Fetched::Failed(index, peer, PieceFailure::NotFound)
                        }
                        Err(e) => Fetched::Failed(index, peer, e.into()),
                    })
                });
                self.requests.insert((index, peer), h);
            }
            Action::CancelRequest { peer, index } => {
                if let Some(h) = self.requests.remove(&(index, peer)) {
                    h.abort();
                }
            }
            Action::FetchOrigin { start, end } => self.fetch_origin(start, end),
            Action::AskPeers {
                content_id,
                dht,
                busy,
            } => {
                let env2 = env.clone();
                self.tasks.spawn(async move {
                    let (asked, reachable, answers) =
                        have_round(&env2, content_id, dht, &busy).await;
                    Event::Round(asked, reachable, answers)
                });
            }
            Action::Announce { content_id, to } => {
                if let Some(h) = env.store.have(&HaveKey::Blake3(*content_id.hash()))
                    && h.content_id == content_id
                {
                    env.swarm.announce(to, h).await;
                }
            }
            Action::Gather {
                content_id,
                known,
                claims,
                full_from,
            } => {
                let env2 = env.clone();
                self.tasks.spawn(async move {
                    Event::Assembled(assemble(env2, content_id, known, claims, full_from).await)
                });
            }
            Action::Write {
                index,
                source,
                bytes,
            } => {
                if self
                    .writer
                    .send(ToWriter::Piece(index, source, bytes))
                    .await
                    .is_err()
                {
                    return Err(self.writer_failed());
                }
            }
            Action::Forget(pieces) => {
                if self.writer.send(ToWriter::Forget(pieces)).await.is_err() {
                    return Err(self.writer_failed());
                }
            }
            Action::SetLayer { layer, verified } => {
                let id = layer.content_id();
                info!(url = %origin::redact(&self.task.url), %id, "piece layer assembled and verified");
                if self
                    .writer
                    .send(ToWriter::Layer(layer.clone()))
                    .await
                    .is_err()
                {
                    return Err(self.writer_failed());
                }
                env.store.insert(
                    layer,
                    verified,
                    self.task.temp.clone(),
                    Backing::Held(self.served_file.clone()),
                );
                (self.progress)(Update::ContentId(id));
            }
            Action::MemberTick {
                content_id,
                done,
                origin_now,
                proven_only,
                lowest,
            } => {
                let now = now();
                let piece_count = self.piece_count;
                let view = env.store.with_members(&content_id, |v| {
                    v.set_self(done, origin_now, now);
                    (
                        v.fetchers_cached(piece_count, now, proven_only, lowest),
                        v.grew_at(),
                    )
                });
                core.handle_members(now, view);
            }
            Action::Ban { content_id, peer } => {
                if env.bans.ban(BanKey::Blake3(*content_id.hash()), peer) {
                    (self.progress)(Update::Banned);
                }
            }
            Action::Store(op) => {
                if let StoreOp::MarkVerified(id, index) | StoreOp::AddClaim(id, index, _) = &op {
                    let asked = self.env.store.asked(id);
                    self.keep_pieces
                        .store(asked, std::sync::atomic::Ordering::Relaxed);
                    if let Some((i, bytes, cv)) = &self.passed
                        && i == index
                        && asked
                    {
                        self.env.store.keep_recent(id, *index, *cv, bytes.clone());
                    }
                }
                self.store(op);
            }
            Action::PieceDone { bytes, peer } => {
                let source = peer.map(|p| env.swarm.peer_source(&p));
                (self.progress)(Update::Piece { bytes, source });
            }
            Action::Rejected => (self.progress)(Update::Rejected),
        }
        Ok(())
    }

    pub(super) fn store(&self, op: StoreOp) {
        let (store, temp) = (&self.env.store, &self.task.temp);
        match op {
            StoreOp::SetFetching(id, fetching) => store.set_fetching(&id, temp, fetching),
            StoreOp::MarkVerified(id, index) => store.mark_verified(&id, temp, index),
            StoreOp::AddClaim(id, index, cv) => store.add_claim(&id, temp, index, cv),
            StoreOp::SetRelayed(id, entries) => store.set_relayed(&id, temp, &entries),
            StoreOp::MergeMembers(id, peer, members) => {
                let now = now();
                store.with_members(&id, |v| v.merge(&peer, &members, now));
            }
            StoreOp::ForgetMember(id, peer) => {
                store.with_members(&id, |v| v.forget(&peer));
            }
        }
    }

    /// Starts an origin run of pieces `start..end`: pieces go out through the origin channel
    /// as they arrive, the run's end through the task set.
    pub(super) fn fetch_origin(&mut self, start: u32, end: u32) {
        let (origin, url, tx, remote) = (
            self.env.origin.clone(),
            self.task.url.clone(),
            self.origin_tx.clone(),
            self.remote.clone(),
        );
        let (bandwidth, fg) = (self.env.bandwidth.clone(), self.foreground);
        let (length, piece_size) = (self.length, self.piece_size);
        self.tasks.spawn(async move {
            let run = async {
                let r = remote.get_or_try_init(|| origin.probe(&url)).await?.clone();
                if r.length != length {
                    return Err(OriginError::Changed {
                        url: url.clone(),
                        detail: format!(
                            "the origin has {} bytes, the content id {length}",
                            r.length
                        ),
                    });
                }
                let mut index = start;
                let range =
                    u64::from(start) * piece_size..(u64::from(end) * piece_size).min(length);
                origin
                    .fetch(&url, &r, range, piece_size, |bytes| {
                        let (tx, i, bandwidth) = (tx.clone(), index, bandwidth.clone());
                        index += 1;
                        async move {
                            bandwidth.download(fg, bytes.len() as u64).await;
                            tx.send(Fetched::Piece(i, Source::Origin, bytes))
                                .await
                                .is_ok()
                        }
                    })
                    .await
            };
            Event::Fetched(Fetched::OriginEnd(run.await))
        });
    }
}

/// What the transfer left: the writer's end (pieces on disk, the SHA-256, the derived layer),
/// the layer, and where bytes came from.
pub(super) struct Transferred {
    pub(super) found: Discovered,
    pub(super) end: WriterEnd,
    pub(super) layer: Option<PieceLayer>,
    pub(super) from_peers: bool,
    pub(super) assembly_id: Option<ContentId>,
    /// The SHA-256 whose swarm id `assembly_id` is, for content known by it alone.
    pub(super) swarm_of: Option<Sha256Digest>,
    /// Peers whose pieces are held unverified, checked only by the whole file's SHA-256.
    pub(super) unverified_from: Vec<PeerId>,
    pub(super) piece_count: u32,
    pub(super) served_file: Arc<File>,
}

/// Registers the file with the store: served from its descriptor when the layer is known, or
/// assembling the layer (with the chaining values of the pieces kept) when this download is the
/// node's only one assembling it; another one is: `assembly` becomes `None`.
pub(super) fn register(
    env: &Env,
    task: &FileTask,
    layer: Option<&PieceLayer>,
    kept: &Bitfield,
    file: &Arc<File>,
    assembly: &mut Option<Assembly>,
    checker: &Checker,
) {
    if let Some(l) = layer {
        env.store.remove_at(&l.content_id(), &task.temp);
        env.store.insert(
            l.clone(),
            kept.clone(),
            task.temp.clone(),
            Backing::Held(file.clone()),
        );
    }
    if let Some(a) = assembly {
        if !env.store.begin_assembly(
            a.id,
            task.temp.clone(),
            Backing::Held(file.clone()),
            a.swarm_of,
        ) {
            // Another download of this content on this node assembles it: do without.
            *assembly = None;
        } else if let Checker::Builder(b) = checker {
            for i in kept.ones() {
                if let Some(cv) = b.chaining_value(i) {
                    a.set_own(i, cv);
                    env.store.add_claim(&a.id, &task.temp, i, cv);
                }
            }
        }
    }
}

/// After the run: reads what the writer still reports while it ends (it must never block on
/// a full channel; a piece that the assembled layer rejected after the run ended fails the
/// file), and on failure stops serving the file and leaves in `task.left` what the next run may
/// keep (`left`: the content id, the layer and what the pieces are of).
pub(super) async fn wind_down(
    env: &Env,
    task: &FileTask,
    result: Result<(), AttemptFailure>,
    writer_thread: std::thread::JoinHandle<Result<WriterEnd, std::io::Error>>,
    mut verified_rx: mpsc::Receiver<Verdict>,
    (content_id, layer, left): (Option<ContentId>, Option<&PieceLayer>, ResumeDisk),
) -> Result<WriterEnd, AttemptFailure> {
    let join = tokio::task::spawn_blocking(move || writer_thread.join());
    let mut late_rejects = Vec::new();
    while let Some(v) = verified_rx.recv().await {
        if let Err(reason) = v.result {
            late_rejects.push(format!("piece {}: {reason}", v.index));
        }
    }
    let end = join.await.ok().and_then(Result::ok);
    let result = match result {
        Ok(()) if !late_rejects.is_empty() => Err(Failure::Fatal(JobError {
            context: ErrorContext::RemoteFile,
            file: Some(task.index),
            description: format!(
                "{}: bytes from the origin differ from the verified piece layer ({})",
                origin::redact(&task.url),
                late_rejects.join(", ")
            ),
        })
        .into()),
        other => other,
    };
    if let Err(e) = result {
        if let Some(id) = &content_id {
            env.store.remove_at(id, &task.temp);
        }
        // Unless the bytes are discarded (a false claim), the next run may keep the pieces.
        if !matches!(e, AttemptFailure::ClaimFailed)
            && let Some(Ok(end)) = &end
            && end.on_disk.count_ones() > 0
        {
            *task.left.lock().unwrap_or_else(|e| e.into_inner()) = Some(ResumePoint {
                pieces: end.on_disk.clone(),
                meta: left,
                layer: layer.cloned(),
                trusted: Some(end.builder.clone()),
            });
        }
        return Err(e);
    }
    match end {
        Some(Ok(end)) => Ok(end),
        Some(Err(e)) => Err(local_error(task.index, &task.temp, &e).into()),
        None => Err(local_error(
            task.index,
            &task.temp,
            &std::io::Error::other("writer thread failed"),
        )
        .into()),
    }
}

/// The core of a transfer, and this download's membership of its content's swarm (left when
/// dropped).
#[allow(clippy::too_many_arguments)]
pub(super) async fn start_core(
    env: &Env,
    use_peers: bool,
    found: &Discovered,
    layer: Option<PieceLayer>,
    assembly: Option<Assembly>,
    kept: Bitfield,
    geometry: ContentId,
    from_peers: bool,
) -> (Core, Option<Membership>) {
    let me = env.swarm.peer_id();
    let content = layer
        .as_ref()
        .map(PieceLayer::content_id)
        .or(assembly.as_ref().map(|a| a.id));
    let swarm_about = content.is_some()
        && (!found.peers.is_empty()
            || env.swarm.mode().uses_dht()
            || !env.swarm.connected_peers().await.is_empty());
    // Swarm members (`members`): have answers now state this node as one.
    let membership = content.filter(|_| use_peers).map(|id| {
        env.store.join_members(id, me, now());
        Membership {
            store: env.store.clone(),
            id,
        }
    });
    let (wait_until, delay) = (found.wait_until, found.delay);
    let core = Core::new(
        Setup {
            me,
            piece_size: geometry.piece_size(),
            piece_count: geometry.piece_count(),
            layer,
            assembly,
            kept,
            claimed: found.claimed,
            from_peers,
            never_origin: env.policy.never_origin,
            use_peers,
            swarm: swarm_about,
            wait_until,
            origin_wait: (use_peers && !delay.is_zero() && now() < wait_until)
                .then_some(wait_until),
            scheduler: env.scheduler.clone(),
        },
        now(),
    );
    (core, membership)
}

/// The transfer (step 4): the file registered with the store, the writer started, and the
/// core run by the driver until every piece verified; on failure, what the next run may keep.
pub(super) async fn transfer(
    env: &Env,
    task: &FileTask,
    use_peers: bool,
    o: Opened<'_>,
    cancel: &CancellationToken,
    progress: &(dyn Fn(Update) + Send + Sync),
) -> Result<Transferred, AttemptFailure> {
    let Opened {
        mut found,
        length,
        geometry,
        mut assembly,
        file,
        kept,
        checker,
        resume,
        resumed_bytes,
    } = o;
    let (piece_size, piece_count) = (geometry.piece_size(), geometry.piece_count());
    let foreground = task.priority == crate::job::Priority::Foreground;
    let claimed = found.claimed;
    let remote = found.remote.clone();
    let layer = found.layer.clone();
    progress(Update::Started {
        length,
        content_id: layer.as_ref().map(PieceLayer::content_id),
        resumed: resumed_bytes,
    });
    register(
        env,
        task,
        layer.as_ref(),
        &kept,
        &file,
        &mut assembly,
        &checker,
    );
    let (verified_tx, mut verified_rx) = mpsc::channel::<Verdict>(256);
    let checkpointing = task.durable.clone().map(|durable| Checkpointing {
        durable,
        meta: ResumeDisk {
            length,
            content_id: layer.as_ref().map(|l| l.content_id().to_string()),
            claimed,
            validator: None,
            from_peers: resume.is_some_and(|r| r.meta.from_peers),
        },
        layer: layer.as_ref().map(|l| l.chaining_values().to_vec()),
        remote: remote.clone(),
    });
    // The descriptor pieces are served through while the file downloads.
    let served_file = file.clone();
    let keep_pieces = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = spawn_writer(
        file,
        checker,
        piece_size,
        length,
        kept.clone(),
        checkpointing,
        verified_tx,
        env.sha256_always || task.expected.sha256.is_some(),
        keep_pieces.clone(),
    );
    // 5. Transfer: the core decides, the driver carries out.
    let (mut core, _membership) = start_core(
        env,
        use_peers,
        &found,
        layer.clone(),
        assembly.take(),
        kept.clone(),
        geometry,
        resume.is_some_and(|r| r.meta.from_peers),
    )
    .await;
    core.start(now(), std::mem::take(&mut found.peers));
    let (origin_tx, mut origin_rx) = mpsc::channel::<Fetched>(ORIGIN_QUEUE);
    let Writer {
        tx: writer_tx,
        thread: writer_thread,
    } = writer;
    let mut driver = Driver {
        env,
        task,
        foreground,
        length,
        piece_size,
        piece_count,
        remote: remote.clone(),
        writer: writer_tx,
        served_file: served_file.clone(),
        progress,
        tasks: tokio::task::JoinSet::new(),
        requests: HashMap::new(),
        origin_tx,
        passed: None,
        keep_pieces,
    };
    let result = driver
        .run(
            &mut core,
            &mut verified_rx,
            &mut origin_rx,
            &|| writer_thread.is_finished(),
            cancel,
        )
        .await;
    // Every child task is aborted, and the writer's queue closes.
    drop(driver);
    let content_id = core.content_id();
    let layer = core.layer().cloned();
    let from_peers = core.got_peer_bytes();
    let assembly_id = core.assembly_id();
    let swarm_of = core.swarm_of();
    let unverified_from = core.unverified_from();
    let left = ResumeDisk {
        length,
        content_id: layer.as_ref().map(|l| l.content_id().to_string()),
        claimed,
        validator: remote.get().and_then(|r| r.validator.clone()),
        from_peers,
    };
    let end = wind_down(
        env,
        task,
        result,
        writer_thread,
        verified_rx,
        (content_id, layer.as_ref(), left),
    )
    .await?;
    Ok(Transferred {
        found,
        end,
        layer,
        from_peers,
        assembly_id,
        swarm_of,
        unverified_from,
        piece_count,
        served_file,
    })
}
