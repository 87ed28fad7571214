//! `shoal why`: why a job is or is not using peers.
//!
//! Delivery Optimization users ask why a download came from HTTP and not from peers; DO answers
//! with counters only. [`Node::diagnose`] looks again, live: the peer mode and group, the DHT,
//! the connected peers and the providers the DHT finds for each file, what each of them holds
//! of it, the bans, the source policy, and where the bytes so far came from; and it says in
//! plain sentences what follows from that.

use std::time::Duration;

use libp2p::PeerId;
use shoal_protocol::HaveKey;

use crate::{
    Error, Node,
    download::BanKey,
    job::{JobId, JobInfo},
    swarm::group::PeerMode,
    swarm::{DhtStatus, PeerSource},
};

/// How long a diagnosis waits for the DHT and for peers' answers, per file.
pub(crate) const DIAGNOSE_WAIT: Duration = Duration::from_secs(2);

/// One peer's answer about one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAnswer {
    /// The peer.
    pub peer: PeerId,
    /// How this node knows it.
    pub source: PeerSource,
    /// Whether it is banned for this content (it served bytes or a claim that failed).
    pub banned: bool,
    /// The content id it answered with (`hash:length`).
    pub content_id: String,
    /// Verified pieces it serves.
    pub have: u32,
    /// Pieces it is fetching.
    pub fetching: u32,
    /// Pieces it fetched from the origin before it had a verified layer.
    pub claimed: u32,
    /// The content's piece count.
    pub pieces: u32,
}

/// What was found for one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDiagnosis {
    /// The file's index in the job.
    pub index: usize,
    /// Its origin URL.
    pub url: String,
    /// Whether peers may supply it at all, and if not, why.
    pub peers_allowed: Result<(), String>,
    /// Providers the DHT returned for its key.
    pub dht_providers: Vec<PeerId>,
    /// Answers of the connected peers and the providers that hold something of it.
    pub answers: Vec<PeerAnswer>,
    /// Peers that answered nothing (they hold nothing of it).
    pub asked: usize,
    /// Verified bytes so far, by source.
    pub bytes_from: crate::job::BytesBySource,
    /// Whether this node's cache holds the file's content (a job of it is filled from there).
    pub in_cache: bool,
    /// This node's view of the swarm members of the file's content (`crate::download::members`), while
    /// a download of it runs or the content is held; `None` otherwise.
    pub members: Option<SwarmMembers>,
}

/// What this node knows of the other nodes fetching one content (gossiped in have answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwarmMembers {
    /// Other members known alive, directly connected or not.
    pub alive: usize,
    /// Members, this node included, that share out the pieces needing the origin.
    pub fetchers: usize,
    /// Whether this node is one of the fetchers (it uses the origin now).
    pub me_fetching: bool,
}

/// Why a job is or is not using peers.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnosis {
    /// The job as it is now.
    pub job: JobInfo,
    /// The node's peer mode.
    pub mode: PeerMode,
    /// The node's group.
    pub group: Option<String>,
    /// Peers connected now.
    pub connected_peers: usize,
    /// What the DHT side knows.
    pub dht: DhtStatus,
    /// The source policy's wait for peers before the origin, for this job's priority.
    pub origin_delay: Duration,
    /// Whether the source policy never uses the origin.
    pub never_origin: bool,
    /// Cache nodes configured, and of them connected now.
    pub cache_nodes: (usize, usize),
    /// Per file.
    pub files: Vec<FileDiagnosis>,
    /// The conclusions, as sentences.
    pub reasons: Vec<String>,
}

impl Node {
    /// Diagnoses `job`: asks the DHT and the peers again, for each file, and explains why it
    /// does or does not use peers. Takes up to 2 s per file.
    ///
    /// # Errors
    /// [`Error::UnknownJob`].
    pub async fn diagnose(&self, job: JobId) -> Result<Diagnosis, Error> {
        let info = self.info(job)?;
        let env = self.env();
        let mode = env.swarm.mode();
        let connected = env.swarm.connected_peers().await;
        let dht = env.swarm.dht_status().await;
        let mut reasons = Vec::new();
        let mut files = Vec::new();
        match mode {
            PeerMode::Origin => reasons.push(
                "the node's peer mode is \"origin\": it uses no peers at all (node.mode)".into(),
            ),
            _ if connected.is_empty() && !dht.enabled => reasons.push(format!(
                "no peer is connected and the node is in no DHT (peer mode \"{mode}\"): list \
                 peers (node.peers, --peer), turn on mDNS, or use the group or internet mode"
            )),
            _ if connected.is_empty() => reasons.push(format!(
                "no peer is connected; the DHT routing table holds {} peers",
                dht.routing_peers
            )),
            _ => {}
        }
        for (index, f) in info.files.iter().enumerate() {
            let d = self.diagnose_file(job, index, f, &connected).await;
            reasons.extend(file_reasons(&d));
            files.push(d);
        }
        let origin_delay = env.policy.origin_delay(info.priority);
        if !origin_delay.is_zero() {
            reasons.push(format!(
                "the source policy makes {:?} jobs wait {} s for peers before the origin",
                info.priority,
                origin_delay.as_secs_f64()
            ));
        }
        let cache_nodes = env.swarm.cache_nodes();
        let cache_connected = cache_nodes.iter().filter(|p| connected.contains(p)).count();
        if !cache_nodes.is_empty() {
            reasons.push(if cache_connected == 0 {
                format!(
                    "none of the {} configured cache nodes is connected (policy.cache_nodes)",
                    cache_nodes.len()
                )
            } else {
                format!(
                    "{cache_connected} of {} configured cache nodes are connected; a download \
                     asks the first to fetch what no peer holds, and waits {} s for it while it \
                     makes no progress before the origin",
                    cache_nodes.len(),
                    env.policy.cache_fallback(info.priority).as_secs_f64()
                )
            });
        }
        if env.policy.never_origin {
            reasons.push(
                "the source policy never uses the origin: pieces no peer has leave the job in \
                 TransientError"
                    .into(),
            );
        }
        Ok(Diagnosis {
            mode,
            group: env.swarm.group().map(str::to_owned),
            connected_peers: connected.len(),
            dht,
            origin_delay,
            never_origin: env.policy.never_origin,
            cache_nodes: (cache_nodes.len(), cache_connected),
            files,
            reasons,
            job: info,
        })
    }

    /// One file's findings: whether peers may serve it, the DHT's providers and the peers'
    /// answers (each asked for at most [`DIAGNOSE_WAIT`]), the member view, the cache.
    async fn diagnose_file(
        &self,
        job: JobId,
        index: usize,
        f: &crate::job::FileInfo,
        connected: &[PeerId],
    ) -> FileDiagnosis {
        let env = self.env();
        let mode = env.swarm.mode();
        let mut d = FileDiagnosis {
            index,
            url: f.url.to_string(),
            peers_allowed: Ok(()),
            dht_providers: Vec::new(),
            answers: Vec::new(),
            asked: 0,
            bytes_from: f.bytes_from,
            in_cache: false,
            members: None,
        };
        if let Some(id) = &f.content_id {
            let me = env.swarm.peer_id();
            let now = std::time::Instant::now();
            d.members = env.store.with_members(id, |v| {
                let fetchers = v.fetchers(id.piece_count(), now, false);
                SwarmMembers {
                    alive: v.len_alive(now),
                    fetchers: fetchers.len(),
                    me_fetching: fetchers.contains(&me),
                }
            });
        }
        let key = match (f.expected.blake3, f.expected.sha256) {
            (Some(h), _) => Some((HaveKey::Blake3(h), BanKey::Blake3(h))),
            (None, Some(s)) => Some((HaveKey::Sha256(s), BanKey::Sha256(s))),
            (None, None) => None,
        };
        if !f.ranges.is_empty() {
            d.peers_allowed = Err("it has byte ranges, which come from the origin only".into());
        } else if key.is_none() {
            d.peers_allowed = Err("it has no expected digest, so nothing from peers could \
                 be trusted: it comes from the origin only"
                .into());
        } else if mode == PeerMode::Origin {
            d.peers_allowed = Err("the peer mode is \"origin\"".into());
        } else if self.origin_only(job, index) {
            d.peers_allowed = Err("the caller marked content from peers invalid, so it is \
                 fetched again from the origin only"
                .into());
        }
        if let (Ok(()), Some((have, ban))) = (&d.peers_allowed, key) {
            d.dht_providers = env.swarm.find_providers(have, DIAGNOSE_WAIT).await;
            let mut peers = connected.to_vec();
            for p in &d.dht_providers {
                if !peers.contains(p) {
                    peers.push(*p);
                }
            }
            d.asked = peers.len();
            let asks = peers.into_iter().map(|peer| {
                let swarm = env.swarm.clone();
                async move {
                    let r = tokio::time::timeout(
                        DIAGNOSE_WAIT,
                        swarm.have(peer, shoal_protocol::HaveRequest::new(have)),
                    )
                    .await;
                    match r {
                        Ok(Ok(resp)) => resp.0.map(|h| (peer, h)),
                        _ => None,
                    }
                }
            });
            for (peer, h) in futures::future::join_all(asks).await.into_iter().flatten() {
                let id = h.content_id;
                d.answers.push(PeerAnswer {
                    peer,
                    source: env.swarm.peer_source(&peer),
                    banned: env.bans.is_banned(ban, &peer)
                        || env.bans.is_banned(BanKey::Blake3(*id.hash()), &peer),
                    content_id: id.to_string(),
                    have: h.have.count_ones(),
                    fetching: h.fetching.count_ones(),
                    claimed: h.claimed.count_ones(),
                    pieces: id.piece_count(),
                });
            }
        }
        d.in_cache = self.cache_items().iter().any(|c| {
            Some(*c.content_id.hash()) == f.expected.blake3.or(f.content_id.map(|i| *i.hash()))
                || (c.sha256.is_some() && c.sha256 == f.expected.sha256)
        });
        d
    }
}

/// The sentences that follow from one file's findings.
fn file_reasons(d: &FileDiagnosis) -> Vec<String> {
    let i = d.index;
    let mut out = Vec::new();
    if d.in_cache {
        out.push(format!(
            "file {i}: this node's cache holds its content; a job of it is copied from the cache \
             (checked again) without a download"
        ));
    }
    if let Err(why) = &d.peers_allowed {
        out.push(format!("file {i} does not use peers: {why}"));
        return out;
    }
    let usable: Vec<&PeerAnswer> = d.answers.iter().filter(|a| !a.banned).collect();
    for a in d.answers.iter().filter(|a| a.banned) {
        out.push(format!(
            "file {i}: peer {} is banned for this content (it served bytes or a claim that \
             failed verification)",
            a.peer
        ));
    }
    for a in usable.iter().filter(|a| a.source == PeerSource::Cache) {
        out.push(format!(
            "file {i}: cache node {} holds {} and fetches {} of its {} pieces",
            a.peer, a.have, a.fetching, a.pieces
        ));
    }
    if usable.is_empty() {
        out.push(format!(
            "file {i}: none of the {} peers asked ({} found in the DHT) holds or fetches it, \
             so it comes from the origin",
            d.asked,
            d.dht_providers.len()
        ));
    } else {
        let have: u32 = usable.iter().map(|a| a.have).max().unwrap_or(0);
        out.push(format!(
            "file {i}: {} peers hold or fetch it (the best holds {have} of {} verified pieces)",
            usable.len(),
            usable[0].pieces
        ));
    }
    if let Some(m) = d.members {
        out.push(format!(
            "file {i}: this node knows {} other nodes fetching it (directly or through peers); \
             {} members{} share out the pieces no peer holds, so that each crosses the origin \
             link once",
            m.alive,
            m.fetchers,
            if m.me_fetching {
                ", this node included,"
            } else {
                " (not this node)"
            }
        ));
    }
    if d.bytes_from.total() > 0 {
        out.push(format!(
            "file {i}: {:.1} % of its bytes so far came from peers",
            d.bytes_from.percent_peer_caching()
        ));
    }
    out
}
