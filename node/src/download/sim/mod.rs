//! A deterministic discrete-event simulation of a swarm: N instances of the real download core
//! (`download/core.rs`, with the real scheduler and member view inside) on a modelled network,
//! in virtual time, with every random choice drawn from one seed.
//!
//! The model (`docs/simulator.md` states it in full and how it was calibrated):
//! - **the origin** sits behind one shared link of [`Scenario::origin_rate`] bytes per second
//!   with a round-trip time of [`Scenario::origin_rtt`]: every origin piece of every node
//!   crosses it, one piece at a time in the order the runs ask for them;
//! - **each node** has an uplink and a downlink ([`Rates`], bytes per second) on a LAN with a
//!   one-way latency of [`Scenario::lan_latency`]; a piece from a peer takes the sender's
//!   uplink and then the receiver's downlink, each serving pieces in the order they were asked
//!   for;
//! - **CPU costs** ([`CpuCosts`], nanoseconds per byte): the sender encrypts each piece before
//!   its uplink sends it; the receiver decrypts (peer pieces) and verifies each piece on one
//!   core, and hashes the file's SHA-256 on another;
//! - **peers** answer have rounds and announcements with what they hold and their member
//!   view, serve a piece when they hold it and have a free upload slot, and answer Busy when
//!   they have none; scripted [`Behaviour`]s lie;
//! - **what is not modelled**: the preamble (every node starts with the verified piece layer,
//!   as after a catalog that names the BLAKE3 content id, or after one node of the LAN has
//!   it), TCP's slow start and loss, the DHT, disk speed.
//!
//! [`run`] returns a [`Report`]: origin bytes, each node's completion time against the
//! physical limit, pieces rejected and bans. Tests assert on it exactly; `shoal-sim` (in
//! `tests/`) prints it for `docs/benchmarks.md`.

// Without the `sim` feature the module is built for the unit tests alone: its public items
// are then reachable from nowhere else.
#![cfg_attr(not(feature = "sim"), allow(unreachable_pub, dead_code))]

mod views;
mod world;

use std::time::Duration;

pub use self::world::run;

/// A node's link rates, in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Uplink: what the node sends to peers.
    pub up: f64,
    /// Downlink: what the node receives from peers and the origin.
    pub down: f64,
}

/// CPU time per byte, in nanoseconds, measured on the machine the simulation stands for
/// (`shoal-sim --calibrate` measures this one's).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CpuCosts {
    /// Checking a piece against its chaining value (BLAKE3).
    pub verify_ns_per_byte: f64,
    /// Encrypting a piece to send, or decrypting one received (the peer connection's cipher).
    pub encrypt_ns_per_byte: f64,
    /// The file's SHA-256, piece by piece as pieces verify (on a second core).
    pub sha256_ns_per_byte: f64,
}

impl CpuCosts {
    /// No CPU cost: the network alone.
    pub const FREE: Self = Self {
        verify_ns_per_byte: 0.0,
        encrypt_ns_per_byte: 0.0,
        sha256_ns_per_byte: 0.0,
    };
}

/// How a scripted peer lies. Scripted peers run no download; they are connected to
/// [`Scenario::degree`] honest nodes (or all of them in a full mesh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Claims every piece and serves each with its bytes flipped.
    FlipsBytes,
    /// Claims every piece and answers every request with "not found".
    FalseHaves,
    /// Claims every piece and answers every request with Busy.
    BusyForever,
    /// Holds nothing, and fills every answer with made-up members that use the origin.
    MemberFlood,
}

/// What one simulation runs.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Honest nodes that download the file.
    pub nodes: usize,
    /// Of those, how many hold the whole file from the start (seeds); they download nothing.
    pub seeds: usize,
    /// The file's length, in bytes; its piece size is Shoal's for that length.
    pub file_bytes: u64,
    /// Peers each node is connected to (a random graph with a ring through all nodes, so it is
    /// connected); `None`: every node to every other.
    pub degree: Option<usize>,
    /// The origin link's rate, in bytes per second, shared by every node.
    pub origin_rate: f64,
    /// The origin's round-trip time (from a run's request to its first byte).
    pub origin_rtt: Duration,
    /// Every node's link rates, unless [`Self::node_rates`] names it.
    pub lan: Rates,
    /// Link rates of particular nodes: (node index, rates).
    pub node_rates: Vec<(usize, Rates)>,
    /// The LAN's one-way latency.
    pub lan_latency: Duration,
    /// CPU costs per byte.
    pub cpu: CpuCosts,
    /// Nodes start at times spread evenly at random over this span from time 0.
    pub start_within: Duration,
    /// Pieces a node serves at once; further requests are answered Busy (the node's
    /// `upload_slots`).
    pub upload_slots: usize,
    /// Scripted peers, besides the honest nodes.
    pub adversaries: Vec<Behaviour>,
    /// Honest nodes that leave (stop, disconnect) mid-download: (node index, when).
    pub leave: Vec<(usize, Duration)>,
    /// The seed of every random choice (topology, start times, the cores' own).
    pub seed: u64,
    /// The simulation stops at this virtual time, whether or not every node completed.
    pub limit: Duration,
}

impl Scenario {
    /// `nodes` nodes fetching a file of `file_bytes` bytes over a 1 Gbit/s LAN (125 MB/s up
    /// and down, 0.2 ms one way) behind a 100 Mbit/s origin link (12.5 MB/s, 20 ms round
    /// trip), degree 6, no CPU cost, all starting within 1 s, 64 upload slots, seed 1.
    #[must_use]
    pub fn lan(nodes: usize, file_bytes: u64) -> Self {
        Self {
            nodes,
            seeds: 0,
            file_bytes,
            degree: Some(6),
            origin_rate: 12.5e6,
            origin_rtt: Duration::from_millis(20),
            lan: Rates {
                up: 125e6,
                down: 125e6,
            },
            node_rates: Vec::new(),
            lan_latency: Duration::from_micros(200),
            cpu: CpuCosts::FREE,
            start_within: Duration::from_secs(1),
            upload_slots: 64,
            adversaries: Vec::new(),
            leave: Vec::new(),
            seed: 1,
            limit: Duration::from_secs(3600),
        }
    }

    /// Node `i`'s link rates.
    #[must_use]
    pub fn rates(&self, i: usize) -> Rates {
        self.node_rates
            .iter()
            .rev()
            .find(|(n, _)| *n == i)
            .map_or(self.lan, |(_, r)| *r)
    }

    /// The least time by which every node can hold the file, whatever the scheduling, for
    /// downloads that start from `first` to `last`: the fluid bound of Kumar and Ross
    /// ("Peer-Assisted File Distribution: The Minimum Distribution Time", 2006) with the
    /// origin as the server (one copy over the origin link, each downloading node's
    /// downlink, and all the copies over the origin link and the uplinks together) plus the
    /// origin's round trip, from the first start; and the last node's downlink from its own
    /// start. With seeds, the origin is not needed and the LAN's round trip counts instead.
    #[must_use]
    pub fn physical_limit(&self, first: Duration, last: Duration) -> Duration {
        let f = self.file_bytes as f64;
        let leechers = self.nodes.saturating_sub(self.seeds);
        let uploads: f64 = (0..self.nodes).map(|i| self.rates(i).up).sum();
        let min_down = (self.seeds..self.nodes)
            .map(|i| self.rates(i).down)
            .fold(f64::INFINITY, f64::min);
        let (server, rtt) = if self.seeds == 0 {
            (self.origin_rate, self.origin_rtt)
        } else {
            (0.0, 2 * self.lan_latency)
        };
        let mut t = f / min_down;
        if self.seeds == 0 {
            t = t.max(f / self.origin_rate);
        }
        t = t.max(leechers as f64 * f / (server + uploads));
        let from_first = first + Duration::from_secs_f64(t) + rtt;
        let from_last = last + Duration::from_secs_f64(f / min_down) + rtt;
        from_first.max(from_last)
    }
}

/// How a node's download ended, when it did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every piece verified, at this virtual time.
    Completed(Duration),
    /// The core ended otherwise (its reason).
    Failed(String),
    /// The node left mid-download, as scripted.
    Left,
    /// Still downloading at [`Scenario::limit`].
    Running,
}

/// What a simulation measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// The file's length, in bytes.
    pub file_bytes: u64,
    /// Bytes the origin sent, in all.
    pub origin_bytes: u64,
    /// Each honest node's outcome, by node index (seeds: completed at 0).
    pub nodes: Vec<Ended>,
    /// Each honest node's bytes from peers and from the origin.
    pub bytes_from_peers: Vec<u64>,
    /// Pieces that failed verification, over all nodes.
    pub rejected: u64,
    /// Bans: (honest node index, banned peer's index; scripted peers follow the honest nodes).
    pub bans: Vec<(usize, usize)>,
    /// The physical limit of the run, from its first and last start
    /// ([`Scenario::physical_limit`]).
    pub limit: Duration,
    /// Events processed.
    pub events: u64,
    /// Virtual time when the simulation ended.
    pub end: Duration,
}

impl Report {
    /// Origin bytes over the file's length: 1.0 is one copy over the origin link.
    #[must_use]
    pub fn origin_copies(&self) -> f64 {
        self.origin_bytes as f64 / self.file_bytes.max(1) as f64
    }

    /// Completion times of the nodes that completed, sorted.
    #[must_use]
    pub fn completions(&self) -> Vec<Duration> {
        let mut t: Vec<Duration> = self
            .nodes
            .iter()
            .filter_map(|e| match e {
                Ended::Completed(t) => Some(*t),
                _ => None,
            })
            .collect();
        t.sort();
        t
    }

    /// The last completion, when every node that did not leave completed.
    #[must_use]
    pub fn all_completed(&self) -> Option<Duration> {
        let done = self
            .nodes
            .iter()
            .all(|e| matches!(e, Ended::Completed(_) | Ended::Left));
        done.then(|| self.completions().last().copied().unwrap_or_default())
    }

    /// Whether every one of `peers` (indices) was banned by every honest node in `by`.
    #[must_use]
    pub fn banned_by_all(&self, peers: &[usize], by: &[usize]) -> bool {
        peers
            .iter()
            .all(|p| by.iter().all(|n| self.bans.contains(&(*n, *p))))
    }
}

#[cfg(test)]
mod tests;
