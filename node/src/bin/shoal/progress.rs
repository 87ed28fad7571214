//! What `shoal get` shows while a job runs, in an embedded node or in the daemon alike: a bar
//! on a terminal (a spinner until the length is known), a line a second otherwise; the
//! no-progress timer; and Ctrl-C or SIGTERM.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};

/// One snapshot of a job, as either source gives it.
pub(crate) struct Snapshot {
    /// The BITS state's name.
    pub(crate) state: String,
    /// Verified bytes so far.
    pub(crate) done: u64,
    /// Bytes of the files whose length is known.
    pub(crate) total: u64,
    /// Of `done`, the bytes from peers and cache nodes.
    pub(crate) from_peers: u64,
    /// The job's last error, while it is in TransientError.
    pub(crate) transient: Option<String>,
}

/// The display and the no-progress timer of one `shoal get`.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    has_length: bool,
    timeout: Duration,
    /// When a verified byte last arrived (or the job started).
    last_progress: Instant,
    last_done: u64,
    last_line: Option<Instant>,
}

impl Progress {
    /// A display on stderr; `timeout`: how long the job may go without a verified byte.
    pub(crate) fn new(timeout: Duration) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        });
        Self {
            bar,
            has_length: false,
            timeout,
            last_progress: Instant::now(),
            last_done: 0,
            last_line: None,
        }
    }

    /// How often to take a snapshot.
    pub(crate) fn period(&self) -> Duration {
        Duration::from_millis(if self.bar.is_some() { 100 } else { 250 })
    }

    /// Shows `s`; `Err` with the reason once the job made no progress for the timeout: no
    /// verified byte for that long, counted from the last one (or the start), whatever the
    /// state (BITS counts only TransientError; a user at a terminal counts from the last byte).
    pub(crate) fn update(&mut self, s: &Snapshot) -> Result<(), String> {
        let share = (100 * s.from_peers).checked_div(s.done).unwrap_or(0);
        if let Some(bar) = &self.bar {
            if s.total > 0 && !self.has_length {
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                self.has_length = true;
            }
            if self.has_length {
                bar.set_length(s.total);
                bar.set_position(s.done);
            } else {
                bar.tick();
            }
            bar.set_message(format!("{} · {share}% from peers", s.state));
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last_line = Some(Instant::now());
            eprintln!(
                "{} {}/{} bytes, {share}% from peers",
                s.state, s.done, s.total
            );
        }
        if s.done > self.last_done {
            self.last_done = s.done;
            self.last_progress = Instant::now();
        } else if self.last_progress.elapsed() >= self.timeout {
            let reason = s
                .transient
                .clone()
                .unwrap_or_else(|| format!("no source sent a verified byte (state {})", s.state));
            return Err(format!(
                "no progress for {} s: {reason}",
                self.timeout.as_secs()
            ));
        }
        Ok(())
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, naming which.
pub(crate) async fn interrupted() -> &'static str {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        () = term => "terminated",
    }
}
