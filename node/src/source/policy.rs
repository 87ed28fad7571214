//! Source policy: when a download may use the origin.
//!
//! After Delivery Optimization's `DelayForegroundDownloadFromHttp` and
//! `DelayBackgroundDownloadFromHttp` (how long a download waits for peers before it uses an
//! HTTP source), per BITS priority; and an air-gapped switch, "never use the origin", under which
//! pieces no peer can supply leave the job in TransientError (retried after the retry delay)
//! rather than Error; and, after DO's `DelayCacheServerFallbackForegroundDownload` /
//! `DelayCacheServerFallbackBackgroundDownload`, how long a download waits for a cache node
//! that is fetching the content before it falls back to the origin.

use std::time::Duration;

use crate::job::Priority;

/// When downloads may use the origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourcePolicy {
    /// How long a download of each priority waits for peers before it uses the origin,
    /// indexed Foreground, High, Normal, Low. Counted from the start of the file's download;
    /// pieces peers hold are fetched meanwhile. Zero (the default, as in DO) uses the origin
    /// at once for pieces no peer holds.
    pub origin_delay: [Duration; 4],
    /// Never use the origin (an air-gapped LAN): only peers and cache nodes supply pieces.
    pub never_origin: bool,
    /// With cache nodes configured: how long a download waits for a cache node that makes no
    /// progress on the content (fetches or holds no new piece) before it uses the origin,
    /// indexed Foreground, then the background priorities (High, Normal, Low). Default 10 s
    /// and 60 s. A cache node that shows nothing of the content 5 s after it was asked counts
    /// as refusing, and the next one in the list is asked.
    pub cache_fallback: [Duration; 2],
}

impl Default for SourcePolicy {
    fn default() -> Self {
        Self {
            origin_delay: [Duration::ZERO; 4],
            never_origin: false,
            cache_fallback: [Duration::from_secs(10), Duration::from_secs(60)],
        }
    }
}

impl SourcePolicy {
    /// The wait before the origin for a download of `priority`.
    #[must_use]
    pub fn origin_delay(&self, priority: Priority) -> Duration {
        self.origin_delay[match priority {
            Priority::Foreground => 0,
            Priority::High => 1,
            Priority::Normal => 2,
            Priority::Low => 3,
        }]
    }

    /// The wait for a stalled cache node for a download of `priority`.
    #[must_use]
    pub fn cache_fallback(&self, priority: Priority) -> Duration {
        self.cache_fallback[usize::from(priority != Priority::Foreground)]
    }
}
