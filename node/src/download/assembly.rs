//! The piece layer assembled from the chaining values of origin pieces (this node's and its peers').

use super::*;

/// Where a download stands with its piece layer while it has no verified one: it is assembling
/// the layer of content `id` from the chaining values of the pieces it fetched from the origin
/// itself and those its peers claim (see `docs/scheduling.md`).
pub(super) struct Assembly {
    pub(super) id: ContentId,
    /// Chaining values of the pieces this node fetched and recorded ([`Self::set_own`]).
    own: Vec<Option<shoal_validator::ChainingValue>>,
    /// Chaining values taken in from peers' partial layers (untrusted until the layer
    /// verifies); passed on to peers in turn ([`Self::set_relayed`]).
    relayed: Vec<Option<shoal_validator::ChainingValue>>,
    /// The pieces whose chaining values are known here (own or relayed), kept beside them:
    /// the checks after every change of claims go a word at a time.
    known: Bitfield,
    /// Pieces whose chaining values each peer can tell (its claims and what it relays).
    pub(super) claims: HashMap<PeerId, Bitfield>,
    /// Set after an assembled layer failed: claims are ignored from then on.
    pub(super) failed: bool,
    /// An assembly (or a fetch of a peer's verified layer) is running.
    pub(super) running: bool,
    /// Set when `id` is the swarm id of content known only by this SHA-256
    /// (`shoal_validator::sha256_swarm_id`): there is no root to check a layer against, so no
    /// layer is assembled; the whole file's SHA-256 checks every piece at the end.
    pub(super) swarm_of: Option<shoal_validator::Sha256Digest>,
    /// Own pieces or claims changed since coverage was last checked.
    pub(super) changed: bool,
    /// When the last gathering from claims started.
    pub(super) last_gather: Option<std::time::Instant>,
    /// A gathering is due (peers can tell values not known here), with whether it could
    /// complete the layer ([`Self::could_complete`]); checked when `changed`.
    pub(super) due: Option<bool>,
}

impl Assembly {
    /// An assembly of content `id` with `pieces` pieces and no value known yet; `swarm_of` as
    /// the field says.
    pub(super) fn new(
        id: ContentId,
        pieces: u32,
        swarm_of: Option<shoal_validator::Sha256Digest>,
    ) -> Self {
        Self {
            id,
            own: vec![None; pieces as usize],
            relayed: vec![None; pieces as usize],
            known: Bitfield::new(pieces),
            claims: HashMap::new(),
            failed: false,
            running: false,
            swarm_of,
            changed: true,
            last_gather: None,
            due: None,
        }
    }

    /// Whether the chaining value of piece `i` is known here (own or relayed).
    pub(super) fn knows(&self, i: usize) -> bool {
        self.known.get(i as PieceIndex)
    }

    /// Whether every chaining value is known here.
    pub(super) fn knows_all(&self) -> bool {
        self.known.is_full()
    }

    /// Records the chaining value of piece `i`, fetched and checked by this node.
    pub(super) fn set_own(&mut self, i: PieceIndex, cv: shoal_validator::ChainingValue) {
        if let Some(slot) = self.own.get_mut(i as usize) {
            *slot = Some(cv);
            self.known.set(i);
        }
    }

    /// Records the chaining value of piece `i` as a peer told it (untrusted).
    pub(super) fn set_relayed(&mut self, i: PieceIndex, cv: shoal_validator::ChainingValue) {
        if let Some(slot) = self.relayed.get_mut(i as usize) {
            *slot = Some(cv);
            self.known.set(i);
        }
    }

    /// Forgets every relayed value (an assembled layer failed); own values stay.
    pub(super) fn forget_relayed(&mut self) {
        self.relayed.iter_mut().for_each(|c| *c = None);
        self.known.clear_all();
        for (i, cv) in self.own.iter().enumerate() {
            if cv.is_some() {
                self.known.set(i as PieceIndex);
            }
        }
    }

    /// This node's own chaining values, by piece.
    pub(super) fn own(&self) -> &[Option<shoal_validator::ChainingValue>] {
        &self.own
    }

    /// Whether some peer can tell a chaining value not known here: a gathering round would
    /// learn something. Word by word: it runs after every change of own pieces or claims.
    pub(super) fn peers_know_more(&self) -> bool {
        self.claims
            .values()
            .any(|b| b.words().zip(self.known.words()).any(|(c, k)| c & !k != 0))
    }

    /// Whether every chaining value is known here or can be told by some peer: a gathering
    /// now could assemble the layer.
    pub(super) fn could_complete(&self) -> bool {
        let mut told = self.known.clone();
        for b in self.claims.values() {
            told.union_with(b);
        }
        told.is_full()
    }

    /// The chaining values known here: own, else relayed.
    pub(super) fn known(&self) -> Vec<Option<shoal_validator::ChainingValue>> {
        self.own
            .iter()
            .zip(&self.relayed)
            .map(|(o, r)| o.or(*r))
            .collect()
    }
}

/// What an assembly task found.
pub(super) enum Assembled {
    /// A layer that verified against the content id.
    Layer(PieceLayer),
    /// Some values are still unknown; these were taken in from peers (piece and value).
    Learned(Vec<(PieceIndex, shoal_validator::ChainingValue)>),
    /// Claimed values did not merge into the content id (`from_claims`), or no peer's
    /// verified layer could be had.
    Failed { reason: String, from_claims: bool },
}

/// Gathers the chaining values the assembly lacks (`known` holds the rest) from the peers
/// that can tell them (their claims, and values they relay from their own peers); once every
/// value is known, merges them and checks the result against the content id. A peer with a
/// verified layer (`full_from`) is asked for that instead. Values learned while some are still
/// missing come back as [`Assembled::Learned`], to be relayed in turn.
pub(super) async fn assemble(
    env: Env,
    id: ContentId,
    known: Vec<Option<shoal_validator::ChainingValue>>,
    claims: Vec<(PeerId, Bitfield)>,
    full_from: Vec<PeerId>,
) -> Assembled {
    for peer in full_from {
        if let Ok(LayerResponse::Full(cvs)) = env.swarm.layer(peer, id, None).await {
            match PieceLayer::verify(id, cvs) {
                Ok(l) => return Assembled::Layer(l),
                Err(e) => {
                    warn!(%peer, "piece layer rejected: {e}");
                    env.bans.ban(BanKey::Blake3(*id.hash()), peer);
                }
            }
        }
    }
    if claims.is_empty() {
        return Assembled::Failed {
            reason: "no peer's verified layer".into(),
            from_claims: false,
        };
    }
    let mut cvs = known;
    let mut learned = Vec::new();
    for (peer, bits) in claims {
        // Only the values this peer can tell and this node still lacks.
        let mut want = Bitfield::new(id.piece_count());
        for i in bits
            .ones()
            .filter(|&i| cvs.get(i as usize).is_some_and(Option::is_none))
        {
            want.set(i);
        }
        if want.count_ones() == 0 {
            continue;
        }
        match env.swarm.layer(peer, id, Some(want)).await {
            Ok(LayerResponse::Partial(entries)) => {
                // Only the values the peer said it can tell: one made-up answer does not
                // fill the whole layer.
                for (i, cv) in entries {
                    if bits.get(i)
                        && let Some(slot) = cvs.get_mut(i as usize)
                        && slot.is_none()
                    {
                        *slot = Some(cv);
                        learned.push((i, cv));
                    }
                }
            }
            Ok(LayerResponse::Full(full)) => {
                if let Ok(l) = PieceLayer::verify(id, full) {
                    return Assembled::Layer(l);
                }
            }
            Ok(LayerResponse::NotFound) => {}
            Err(e) => debug!("partial layer request failed: {e}"),
        }
        if cvs.iter().all(Option::is_some) {
            break;
        }
    }
    let Some(cvs) = cvs.into_iter().collect::<Option<Vec<_>>>() else {
        return Assembled::Learned(learned);
    };
    match PieceLayer::verify(id, cvs) {
        Ok(l) => Assembled::Layer(l),
        Err(e) => Assembled::Failed {
            reason: e.to_string(),
            from_claims: true,
        },
    }
}
