//! Bandwidth limits, after Delivery Optimization's bandwidth policies: token buckets
//! ([`governor`]) for downloads of foreground and of background jobs
//! (DOMaxForegroundDownloadBandwidth, DOMaxBackgroundDownloadBandwidth) and for uploads to
//! peers, and a cap on the bytes uploaded per calendar month (DOMonthlyUploadDataCap).
//!
//! Downloads wait for tokens as bytes arrive (from the origin, each chunk before it is passed
//! on, which slows the HTTP stream through TCP's flow control; from a peer, each piece before
//! its request counts as done, which slows the request pipeline). Foreground jobs draw on the
//! foreground bucket, High, Normal and Low jobs on the background one. Uploads wait for
//! tokens before a piece is sent. A bucket holds one second of its rate (at least 64 KiB):
//! a transfer may run that far ahead of the rate after a pause.
//!
//! Once the month's uploads reach the cap, the node answers have queries with nothing and
//! piece requests with Busy until the month (UTC) ends. The month's count is kept in the state
//! database when the node has one, so it survives restarts.
//!
//! Every limit can be changed while the node runs ([`crate::Node::set_bandwidth`]).

use std::{
    num::NonZeroU32,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The smallest bucket, in bytes.
const MIN_BURST: u64 = 64 << 10;

/// Bandwidth limits; `None` is unlimited. Rates are in bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BandwidthLimits {
    /// Downloads of Foreground jobs (DO's DOMaxForegroundDownloadBandwidth).
    pub download_foreground: Option<u64>,
    /// Downloads of High, Normal and Low jobs, and of a cache node's fills
    /// (DOMaxBackgroundDownloadBandwidth).
    pub download_background: Option<u64>,
    /// Pieces served to peers.
    pub upload: Option<u64>,
    /// Bytes served to peers per calendar month, UTC (DOMonthlyUploadDataCap).
    pub monthly_upload_cap: Option<u64>,
}

/// The limits and this month's uploads, as [`crate::Node::bandwidth`] reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BandwidthStatus {
    /// The limits in force.
    pub limits: BandwidthLimits,
    /// The month counted, `YYYY-MM` (UTC).
    pub month: String,
    /// Bytes served to peers this month.
    pub uploaded_this_month: u64,
    /// Whether the monthly cap is reached (the node serves nothing until the month ends).
    pub cap_reached: bool,
}

/// Bytes per token: cells of 1 KiB keep governor's per-cell interval (whole nanoseconds)
/// exact enough up to terabytes per second.
const CELL: u64 = 1024;

/// One token bucket: a limiter and its burst in cells.
type Bucket = Option<(Arc<DefaultDirectRateLimiter>, u64)>;

fn bucket(rate: Option<u64>) -> Bucket {
    let cells = rate?.div_ceil(CELL).clamp(1, u64::from(u32::MAX));
    let burst = cells.max(MIN_BURST / CELL).min(u64::from(u32::MAX));
    let quota = Quota::per_second(NonZeroU32::new(cells as u32)?)
        .allow_burst(NonZeroU32::new(burst as u32)?);
    Some((Arc::new(RateLimiter::direct(quota)), burst))
}

/// Waits until `bucket` lets `bytes` through (rounded up to whole cells).
async fn take(bucket: Bucket, bytes: u64) {
    let Some((limiter, burst)) = bucket else {
        return;
    };
    let mut cells = bytes.div_ceil(CELL);
    while cells > 0 {
        let n = cells.min(burst);
        cells -= n;
        if let Some(cells) = NonZeroU32::new(n as u32) {
            // `n` never exceeds the burst, so there is always capacity.
            let _ = limiter.until_n_ready(cells).await;
        }
    }
}

/// The calendar month (UTC) of `t`, as `YYYY-MM`.
pub(crate) fn month_of(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let dt =
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}", dt.year(), u8::from(dt.month()))
}

/// The node's buckets and monthly upload count.
#[derive(Debug)]
pub(crate) struct Bandwidth {
    limits: RwLock<BandwidthLimits>,
    buckets: RwLock<[Bucket; 3]>,
    /// The month counted and the bytes uploaded in it.
    month: Mutex<(String, u64)>,
}

impl Bandwidth {
    /// Buckets for `limits`, with `month` (`YYYY-MM`, bytes) uploaded so far as stored.
    pub(crate) fn new(limits: BandwidthLimits, month: Option<(String, u64)>) -> Self {
        let now = month_of(SystemTime::now());
        let month = match month {
            Some((m, b)) if m == now => (m, b),
            _ => (now, 0),
        };
        let b = Self {
            limits: RwLock::new(limits),
            buckets: RwLock::new([None, None, None]),
            month: Mutex::new(month),
        };
        b.set(limits);
        b
    }

    /// Replaces the limits; transfers waiting on an old bucket finish that wait.
    pub(crate) fn set(&self, limits: BandwidthLimits) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
        *self.buckets.write().unwrap_or_else(|e| e.into_inner()) = [
            bucket(limits.download_foreground),
            bucket(limits.download_background),
            bucket(limits.upload),
        ];
    }

    fn bucket(&self, i: usize) -> Bucket {
        self.buckets.read().unwrap_or_else(|e| e.into_inner())[i].clone()
    }

    /// Waits until a download of a Foreground (`foreground`) or background job may take in
    /// `bytes` more.
    pub(crate) async fn download(&self, foreground: bool, bytes: u64) {
        take(self.bucket(usize::from(!foreground)), bytes).await;
    }

    /// Waits until `bytes` more may be sent to a peer.
    pub(crate) async fn upload(&self, bytes: u64) {
        take(self.bucket(2), bytes).await;
    }

    /// The month's count, rolled over to `now`'s month.
    fn rolled(&self, now: SystemTime) -> std::sync::MutexGuard<'_, (String, u64)> {
        let mut m = self.month.lock().unwrap_or_else(|e| e.into_inner());
        let month = month_of(now);
        if m.0 != month {
            *m = (month, 0);
        }
        m
    }

    /// Whether the monthly upload cap is reached at `now`.
    pub(crate) fn cap_reached_at(&self, now: SystemTime) -> bool {
        let cap = self
            .limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .monthly_upload_cap;
        cap.is_some_and(|cap| self.rolled(now).1 >= cap)
    }

    /// Whether the monthly upload cap is reached now.
    pub(crate) fn cap_reached(&self) -> bool {
        self.cap_reached_at(SystemTime::now())
    }

    /// Counts `bytes` sent to a peer at `now`.
    pub(crate) fn count_upload_at(&self, now: SystemTime, bytes: u64) {
        self.rolled(now).1 += bytes;
    }

    /// Counts `bytes` sent to a peer now.
    pub(crate) fn count_upload(&self, bytes: u64) {
        self.count_upload_at(SystemTime::now(), bytes);
    }

    /// The month counted and its bytes, to store.
    pub(crate) fn month(&self) -> (String, u64) {
        self.rolled(SystemTime::now()).clone()
    }

    /// The limits and this month's uploads.
    pub(crate) fn status(&self) -> BandwidthStatus {
        let (month, uploaded) = self.month();
        BandwidthStatus {
            limits: *self.limits.read().unwrap_or_else(|e| e.into_inner()),
            month,
            uploaded_this_month: uploaded,
            cap_reached: self.cap_reached(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_monthly_cap_counts_per_utc_month() {
        // 2026-11-30 23:59:59 UTC, and one second later.
        let nov = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_083_199);
        let dec = nov + Duration::from_secs(1);
        assert_eq!(month_of(nov), "2026-11");
        assert_eq!(month_of(dec), "2026-12");
        let b = Bandwidth::new(
            BandwidthLimits {
                monthly_upload_cap: Some(1000),
                ..BandwidthLimits::default()
            },
            None,
        );
        b.count_upload_at(nov, 999);
        assert!(!b.cap_reached_at(nov));
        b.count_upload_at(nov, 1);
        assert!(b.cap_reached_at(nov));
        // A new month starts from zero.
        assert!(!b.cap_reached_at(dec));
        // A stored count of another month is not this month's.
        let b = Bandwidth::new(BandwidthLimits::default(), Some(("1999-01".into(), 5)));
        assert_eq!(b.month().1, 0);
        // Raising the cap at run time lifts the stop.
        let b = Bandwidth::new(
            BandwidthLimits {
                monthly_upload_cap: Some(10),
                ..BandwidthLimits::default()
            },
            None,
        );
        b.count_upload(10);
        assert!(b.cap_reached());
        b.set(BandwidthLimits {
            monthly_upload_cap: Some(20),
            ..BandwidthLimits::default()
        });
        assert!(!b.cap_reached());
        assert_eq!(b.status().uploaded_this_month, 10);
    }

    #[tokio::test]
    async fn a_bucket_holds_back_what_exceeds_its_rate() {
        let b = Bandwidth::new(
            BandwidthLimits {
                download_background: Some(256 << 10),
                ..BandwidthLimits::default()
            },
            None,
        );
        let start = std::time::Instant::now();
        // One second of burst, then 256 KiB more at 256 KiB/s: at least about a second.
        b.download(false, 512 << 10).await;
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
    }
}
