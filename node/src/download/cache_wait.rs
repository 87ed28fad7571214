//! The wait for a cache node before the origin (DO's cache fallback delay).

use super::*;

/// How long a cache node asked to fetch content may show nothing of it before the download
/// counts it as refusing and asks the next cache node (or uses the origin).
pub(super) const CACHE_REFUSAL: Duration = Duration::from_secs(5);

/// "Never" for a wait that would overflow an `Instant` (about 30 years).
pub(super) const FAR: Duration = Duration::from_secs(1 << 30);

/// A download's wait for its cache nodes (`policy::SourcePolicy::cache_fallback`): it asks
/// the first connected cache node of the list that has not refused to fetch the content, and
/// waits for it while it makes progress.
pub(super) struct CacheWait {
    /// How long the cache node may make no progress.
    pub(super) fallback: Duration,
    /// Cache nodes that showed nothing of the content [`CACHE_REFUSAL`] after they were asked.
    pub(super) refused: HashSet<PeerId>,
    /// The cache node asked now, and since when.
    pub(super) current: Option<(PeerId, Instant)>,
    /// The progress it showed last (pieces held and claimed, and whether it fetches), and
    /// when that grew.
    pub(super) seen: u32,
    pub(super) progress_at: Option<Instant>,
}

impl CacheWait {
    pub(super) fn new(fallback: Duration) -> Self {
        Self {
            fallback,
            refused: HashSet::new(),
            current: None,
            seen: 0,
            progress_at: None,
        }
    }

    /// The cache node to ask: the first of `order` that is connected and has not refused.
    pub(super) fn target(&mut self, connected: &[PeerId], order: &[PeerId]) -> Option<PeerId> {
        let next = order
            .iter()
            .find(|p| connected.contains(p) && !self.refused.contains(p))
            .copied();
        if next != self.current.map(|(p, _)| p) {
            self.current = next.map(|p| (p, Instant::now()));
            self.seen = 0;
            self.progress_at = None;
        }
        next
    }

    /// Reads the cache node's answer among `answers`; returns until when the download waits
    /// for it, or `None` when it does not (no cache node asked, or it just refused).
    pub(super) fn observe(&mut self, answers: &[Answer], now: Instant) -> Option<Instant> {
        let (peer, asked) = self.current?;
        let shown = answers
            .iter()
            .find(|(p, _)| *p == peer)
            .map_or(0, |(_, h)| {
                h.have.count_ones()
                    + h.claimed.count_ones()
                    + u32::from(h.fetching.count_ones() > 0)
            });
        if shown > self.seen || (shown > 0 && self.progress_at.is_none()) {
            self.seen = shown;
            self.progress_at = Some(now);
        }
        match self.progress_at {
            Some(t) => Some(t.checked_add(self.fallback).unwrap_or(t + FAR)),
            None if now.duration_since(asked) >= CACHE_REFUSAL => {
                info!(%peer, "the cache node does not fetch the content; trying the next source");
                self.refused.insert(peer);
                self.current = None;
                None
            }
            None => Some(asked + CACHE_REFUSAL),
        }
    }
}
