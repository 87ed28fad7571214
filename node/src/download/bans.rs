//! Bans shared by a node's downloads: which peers served bad data of which content.

use super::*;

/// What a ban is about: a content id's hash, or a SHA-256 whose claim a peer made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BanKey {
    /// Served bytes or a layer that failed against this BLAKE3 hash.
    Blake3([u8; 32]),
    /// Claimed a content id for this SHA-256 that turned out false.
    Sha256(Sha256Digest),
}

/// Contents the node keeps bans for at most; the oldest-made key goes first beyond.
pub(super) const MAX_BAN_KEYS: usize = 1024;

/// Peers banned at most per content (peer ids are free: past this, verification alone keeps
/// the bytes right).
pub(super) const MAX_BANS_PER_KEY: usize = 4096;

/// Node-wide record of banned peers per content, bounded by [`MAX_BAN_KEYS`] and
/// [`MAX_BANS_PER_KEY`].
#[derive(Debug, Default)]
pub(crate) struct Bans(Mutex<BanTable>);

/// The banned peers per content, and the contents in the order their first ban was made.
pub(super) type BanTable = (
    HashMap<BanKey, HashSet<PeerId>>,
    std::collections::VecDeque<BanKey>,
);

impl Bans {
    /// Bans `peer` for `key`; true when it was not banned before.
    pub(crate) fn ban(&self, key: BanKey, peer: PeerId) -> bool {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (m, order) = &mut *guard;
        if !m.contains_key(&key) {
            if m.len() >= MAX_BAN_KEYS
                && let Some(old) = order.pop_front()
            {
                m.remove(&old);
            }
            order.push_back(key);
        }
        let set = m.entry(key).or_default();
        set.len() < MAX_BANS_PER_KEY && set.insert(peer)
    }

    /// Whether `peer` is banned for `key`.
    pub(crate) fn is_banned(&self, key: BanKey, peer: &PeerId) -> bool {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.get(&key).is_some_and(|s| s.contains(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bans_are_bounded_per_content_and_in_contents() {
        let bans = Bans::default();
        let key = BanKey::Blake3([1; 32]);
        let banned = (0..MAX_BANS_PER_KEY + 100)
            .filter(|_| bans.ban(key, PeerId::random()))
            .count();
        assert_eq!(banned, MAX_BANS_PER_KEY);
        for i in 0..MAX_BAN_KEYS + 10 {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64 + 2).to_le_bytes());
            bans.ban(BanKey::Blake3(h), PeerId::random());
        }
        let guard = bans.0.lock().unwrap();
        assert!(guard.0.len() <= MAX_BAN_KEYS);
        assert!(
            !guard.0.contains_key(&key),
            "the oldest content's bans went first"
        );
    }
}
