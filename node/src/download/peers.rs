//! Have queries: which peers to ask about a content, and asking them.

use super::*;

/// A peer's answer to a have query.
pub(super) type Answer = (PeerId, Holding);

/// Asks the connected peers and `extra` (providers found in the DHT) what they hold of `key`;
/// peers banned for `ban` are left out. The request to `fill_from` (a cache node) carries
/// `origin_url`, so that the cache node fetches what it lacks.
pub(super) async fn ask_peers(
    env: &Env,
    key: HaveKey,
    ban: BanKey,
    extra: Vec<PeerId>,
    fill_from: Option<(PeerId, &Url)>,
) -> Vec<Answer> {
    let peers = peers_to_ask(env, ban, extra).await;
    ask(env, key, peers, fill_from).await
}

/// The connected peers and `extra`, without those banned for `ban`.
pub(super) async fn peers_to_ask(env: &Env, ban: BanKey, extra: Vec<PeerId>) -> Vec<PeerId> {
    let mut peers: Vec<PeerId> = env.swarm.connected_peers().await;
    for p in extra {
        if !peers.contains(&p) {
            peers.push(p);
        }
    }
    peers.retain(|p| !env.bans.is_banned(ban, p));
    peers
}

/// At most this many peers are asked per have round during a download: those it has requests
/// with first, then others at random. Without a bound, a full mesh of N nodes sends N²
/// queries per round; the rest of the swarm is learned through member gossip and
/// announcements, and every peer is asked again within a few rounds.
pub(super) const POLL_PEERS: usize = 16;

/// Of `peers`, the ones to ask this round: all when at most [`POLL_PEERS`]; else those in
/// `busy` (live requests) first, up to half the bound, and the rest at random.
pub(super) fn poll_sample(peers: Vec<PeerId>, busy: &HashSet<PeerId>) -> Vec<PeerId> {
    poll_sample_with(peers, busy, &mut rand::rng())
}

/// [`poll_sample`] with the random choices drawn from `rng` (seeded in the core and the
/// simulator, so that a run repeats).
pub(super) fn poll_sample_with(
    mut peers: Vec<PeerId>,
    busy: &HashSet<PeerId>,
    rng: &mut impl rand::Rng,
) -> Vec<PeerId> {
    use rand::seq::SliceRandom;
    if peers.len() <= POLL_PEERS {
        return peers;
    }
    peers.shuffle(rng);
    // Busy peers to the front (in random order among them), at most half the bound.
    peers.sort_by_key(|p| !busy.contains(p));
    let busy_n = peers.iter().take_while(|p| busy.contains(p)).count();
    let keep = busy_n.min(POLL_PEERS / 2);
    let mut out: Vec<PeerId> = peers[..keep].to_vec();
    out.extend(peers[busy_n..].iter().take(POLL_PEERS - keep));
    // Too few idle peers: more busy ones.
    let room = POLL_PEERS - out.len();
    out.extend(peers[keep..busy_n].iter().take(room));
    out
}

/// Asks each of `peers` what it holds of `key`.
pub(super) async fn ask(
    env: &Env,
    key: HaveKey,
    peers: Vec<PeerId>,
    fill_from: Option<(PeerId, &Url)>,
) -> Vec<Answer> {
    let asks = peers.into_iter().map(|peer| {
        let swarm = env.swarm.clone();
        let mut request = HaveRequest::new(key);
        if let Some((cache, url)) = fill_from
            && cache == peer
            && url.as_str().len() <= shoal_protocol::MAX_ORIGIN_URL_BYTES
            && !origin::has_secrets(url)
        {
            request.origin_url = Some(url.to_string());
        }
        async move {
            match swarm.have(peer, request).await {
                Ok(resp) => resp.0.map(|h| (peer, h)),
                Err(e) => {
                    debug!("have query failed: {e}");
                    None
                }
            }
        }
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Waits for a first peer connection (at most the discovery wait) while the DHT is searched
/// for providers of `key`; returns the providers found.
pub(super) async fn discover(env: &Env, key: HaveKey) -> Vec<PeerId> {
    let (_, providers) = futures::join!(
        wait_for_peers(env),
        env.swarm.find_providers(key, env.discovery_wait)
    );
    providers
}

/// Waits until some peer is connected, at most the discovery wait.
pub(super) async fn wait_for_peers(env: &Env) {
    env.swarm.wait_connected(env.discovery_wait).await;
}

/// One have round for `id`: the providers from the DHT too when `dht`, then at most
/// [`POLL_PEERS`] of the reachable peers (`busy` first), not banned.
pub(super) async fn have_round(
    env: &Env,
    id: ContentId,
    dht: bool,
    busy: &HashSet<PeerId>,
) -> (Vec<PeerId>, Vec<PeerId>, Vec<Answer>) {
    let key = BanKey::Blake3(*id.hash());
    let have = HaveKey::Blake3(*id.hash());
    let providers = if dht {
        env.swarm.find_providers(have, PEER_REFRESH).await
    } else {
        Vec::new()
    };
    let reachable = peers_to_ask(env, key, providers).await;
    let asked = poll_sample(reachable.clone(), busy);
    let answers = ask(env, have, asked.clone(), None)
        .await
        .into_iter()
        .filter(|(p, h)| h.content_id == id && !env.bans.is_banned(key, p))
        .collect();
    (asked, reachable, answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_have_round_asks_at_most_sixteen_peers_with_busy_ones_first() {
        let peers: Vec<PeerId> = (0..40).map(|_| PeerId::random()).collect();
        // Few peers: all of them.
        assert_eq!(poll_sample(peers[..10].to_vec(), &HashSet::new()).len(), 10);
        // Many: 16, among them 8 of the 12 busy ones and 8 idle ones.
        let busy: HashSet<PeerId> = peers[..12].iter().copied().collect();
        let got = poll_sample(peers.clone(), &busy);
        assert_eq!(got.len(), POLL_PEERS);
        assert_eq!(got.iter().filter(|p| busy.contains(p)).count(), 8);
        let unique: HashSet<&PeerId> = got.iter().collect();
        assert_eq!(unique.len(), POLL_PEERS);
        // Over rounds, every peer is asked.
        let mut seen = HashSet::new();
        for _ in 0..50 {
            seen.extend(poll_sample(peers.clone(), &HashSet::new()));
        }
        assert_eq!(seen.len(), peers.len());
        // Nearly all busy: filled up with busy ones.
        let busy: HashSet<PeerId> = peers[..36].iter().copied().collect();
        assert_eq!(poll_sample(peers, &busy).len(), POLL_PEERS);
    }
}
