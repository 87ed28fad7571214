//! Network namespaces a test or benchmark creates for itself: hosts on one bridged LAN, and a
//! shaped link to an origin host, as real machines have them.
//!
//! Every namespace is named after this process (`shoal<PID>-<tag>-...`) and deleted when the
//! [`Lan`] is dropped, which also removes its links. Links are created from inside the
//! namespaces (`ip -n`), so the host's own interfaces, routes and `lo` are never touched, and no
//! namespace has a route out: a host reaches its LAN (10.77.0.0/24) and nothing else. Needs root
//! and iproute2 (`ip`, `tc`).
//!
//! A host is entered either by a process (`ip netns exec NAME ...`, [`exec`]) or by a
//! thread ([`Lan::enter`]): a network namespace belongs to a thread, and the sockets a thread
//! creates live in its namespace, as do those of the threads it starts. A node built on a
//! current-thread runtime on such a thread is a node on that host.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

/// Whether this process may create network namespaces (it runs as root and `ip` exists).
#[must_use]
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `ip ARGS`; an error names the command and what it printed.
///
/// # Errors
/// The command could not run or exited with a failure.
pub fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args).map(drop)
}

/// Runs `tc ARGS`, as [`ip`].
///
/// # Errors
/// The command could not run or exited with a failure.
pub fn tc(args: &[&str]) -> io::Result<()> {
    run("tc", args).map(drop)
}

fn run(program: &str, args: &[&str]) -> io::Result<Output> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Hosts on one bridged LAN, each in its own network namespace with one interface `eth0`
/// at `10.77.0.N/24` (N from 1), joined by a bridge in a namespace of its own, and
/// optionally an origin host behind a shaped link ([`Lan::with_wan`]).
pub struct Lan {
    prefix: String,
    hosts: Vec<String>,
    bridge: String,
    origin: Option<String>,
    wan_mbit: Option<u32>,
}

/// The LAN's hosts get `10.77.0.1` upwards; the origin host `10.78.0.1`, reached through
/// the bridge namespace acting as the router (`10.78.0.2` on its side, `10.77.0.254` on the
/// LAN).
const LAN_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);
const WAN_ORIGIN: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);

impl Lan {
    /// Creates `hosts` hosts (at most 250) on a bridge; `tag` tells the namespaces of two
    /// LANs of one process apart.
    ///
    /// # Errors
    /// A namespace, link or address could not be created (not root, no iproute2); what was
    /// created is deleted again.
    pub fn new(tag: &str, hosts: usize) -> io::Result<Lan> {
        assert!(hosts <= 250, "at most 250 hosts");
        let prefix = format!("shoal{}-{tag}", std::process::id());
        let mut lan = Lan {
            bridge: format!("{prefix}-br"),
            hosts: Vec::new(),
            origin: None,
            wan_mbit: None,
            prefix,
        };
        let br = lan.bridge.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = format!("{}-h{i}", lan.prefix);
            ip(&["netns", "add", &ns])?;
            lan.hosts.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", lan.host_ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }

    /// Adds an origin host at [`Lan::origin_ip`] behind a link shaped to `mbit` Mbit/s in both
    /// directions with `tc tbf` (what leaves the origin is what crosses the WAN), routed from
    /// the LAN through the bridge namespace. Its namespace is [`Lan::origin_ns`].
    ///
    /// # Errors
    /// As [`Lan::new`].
    pub fn with_wan(mut self, mbit: u32) -> io::Result<Lan> {
        let ns = format!("{}-origin", self.prefix);
        ip(&["netns", "add", &ns])?;
        self.origin = Some(ns.clone());
        self.wan_mbit = Some(mbit);
        let br = self.bridge.clone();
        ip(&[
            "-n", &br, "link", "add", "wan", "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", &br, "addr", "add", "10.78.0.2/24", "dev", "wan"])?;
        ip(&[
            "-n",
            &br,
            "addr",
            "add",
            &format!("{LAN_ROUTER}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &br, "link", "set", "wan", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{WAN_ORIGIN}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "10.77.0.0/24",
            "via",
            "10.78.0.2",
        ])?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &br,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        for host in &self.hosts {
            ip(&[
                "-n",
                host,
                "route",
                "add",
                "10.78.0.0/24",
                "via",
                &LAN_ROUTER.to_string(),
            ])?;
        }
        // A token bucket: the rate, a burst of 1 ms at that rate (at least 32 KiB, so that
        // TSO-sized packets pass), and 50 ms of queue.
        let rate = format!("{mbit}mbit");
        let burst = format!(
            "{}",
            (u64::from(mbit) * 1_000_000 / 8 / 1000).max(32 * 1024)
        );
        for (netns, dev) in [(ns.as_str(), "eth0"), (br.as_str(), "wan")] {
            tc(&[
                "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst",
                &burst, "latency", "50ms",
            ])?;
        }
        Ok(self)
    }

    /// The number of hosts on the LAN.
    #[must_use]
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the LAN has no hosts.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The namespace of host `i`.
    #[must_use]
    pub fn host_ns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// The address of host `i` on the LAN: `10.77.0.(i + 1)`.
    #[must_use]
    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, u8::try_from(i + 1).expect("at most 250 hosts"))
    }

    /// The origin host's namespace, when [`Lan::with_wan`] added one.
    #[must_use]
    pub fn origin_ns(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// The rate of the origin's link, Mbit/s, when [`Lan::with_wan`] added one.
    #[must_use]
    pub fn wan_mbit(&self) -> Option<u32> {
        self.wan_mbit
    }

    /// The origin host's address: `10.78.0.1`.
    #[must_use]
    pub fn origin_ip(&self) -> Ipv4Addr {
        WAN_ORIGIN
    }

    /// The bytes the origin host has sent over its link so far (its `eth0` TX counter):
    /// what crossed the WAN towards the LAN.
    ///
    /// # Errors
    /// No origin host, or the counter could not be read.
    pub fn origin_tx_bytes(&self) -> io::Result<u64> {
        let ns = self
            .origin
            .as_deref()
            .ok_or_else(|| io::Error::other("no origin host"))?;
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "cat",
                "/sys/class/net/eth0/statistics/tx_bytes",
            ],
        )?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(io::Error::other)
    }

    /// Moves the calling thread into host `i`'s namespace: the sockets it creates from now on,
    /// and those of threads it starts, are on that host. Call it on a thread of its own.
    ///
    /// # Errors
    /// The namespace could not be opened or entered.
    pub fn enter(&self, i: usize) -> io::Result<()> {
        enter(&self.hosts[i])
    }
}

/// A command that runs `program` in the named namespace (`ip netns exec NS program`).
#[must_use]
pub fn exec(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// Moves the calling thread into the named network namespace.
///
/// # Errors
/// The namespace could not be opened or entered.
pub fn enter(ns: &str) -> io::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: the descriptor is open for the whole call; setns changes only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self
            .hosts
            .iter()
            .chain(self.origin.as_ref())
            .chain(std::iter::once(&self.bridge))
        {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cannot delete network namespace {ns}: {e}");
            }
        }
    }
}
