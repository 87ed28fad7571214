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
    /// The LAN's /24: its first three octets.
    subnet: [u8; 3],
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
        Self::on_subnet(tag, hosts, [10, 77, 0])
    }

    /// [`Lan::new`] on the /24 `subnet` (its first three octets) rather than `10.77.0.0/24`,
    /// with IPv6 off on the hosts (no link-local addresses): a LAN of public addresses, say.
    /// Its hosts reach only each other, whatever the addresses.
    ///
    /// # Errors
    /// As [`Lan::new`].
    pub fn on_subnet(tag: &str, hosts: usize, subnet: [u8; 3]) -> io::Result<Lan> {
        assert!(hosts <= 250, "at most 250 hosts");
        let prefix = format!("shoal{}-{tag}", std::process::id());
        let mut lan = Lan {
            subnet,
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
            if subnet != [10, 77, 0] {
                for key in ["all", "default"] {
                    let setting = format!("net.ipv6.conf.{key}.disable_ipv6=1");
                    run("ip", &["netns", "exec", &ns, "sysctl", "-qw", &setting])?;
                }
            }
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

    /// The address of host `i` on the LAN: `10.77.0.(i + 1)` (or on its subnet).
    #[must_use]
    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, u8::try_from(i + 1).expect("at most 250 hosts"))
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

/// Counts the UDP datagrams to one port that cross a LAN's bridge, from the moment it is
/// started until [`UdpCount::stop`]: a packet socket (`AF_PACKET`) on the bridge, in the
/// bridge's namespace, on a thread of its own.
pub struct UdpCount {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<io::Result<u64>>,
}

impl UdpCount {
    /// Starts counting UDP datagrams to `port` on the bridge of `lan`.
    ///
    /// # Errors
    /// The namespace cannot be entered or the packet socket opened.
    pub fn start(lan: &Lan, port: u16) -> io::Result<UdpCount> {
        let ns = lan.bridge.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let counted = (|| {
                enter(&ns)?;
                let fd = packet_socket("br0")?;
                let _ = ready_tx.send(Ok(()));
                Ok::<_, io::Error>(count_udp(&fd, port, &flag))
            })();
            if let Err(e) = &counted {
                let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
            }
            counted
        });
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the capture thread ended"))??;
        Ok(UdpCount { stop, thread })
    }

    /// Stops counting; returns the datagrams counted.
    ///
    /// # Errors
    /// The capture failed.
    pub fn stop(self) -> io::Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the capture thread panicked"))?
    }
}

/// A packet socket receiving every frame on interface `dev`, with a 100 ms read timeout.
fn packet_socket(dev: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor this function owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    let name = std::ffi::CString::new(dev).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zeroed sockaddr_ll is valid; the fields set are the ones bind needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
    // SAFETY: `sll` lives across the call and its size is passed.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: `timeout` lives across the call and its size is passed.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Reads frames from `fd` until `stop`, counting UDP datagrams (IPv4 or IPv6) to `port`.
fn count_udp(fd: &std::os::fd::OwnedFd, port: u16, stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut buf = vec![0u8; 65_536];
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: `buf` is valid for its length.
        let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(len) = usize::try_from(got) else {
            continue;
        };
        if udp_dst_port(&buf[..len]) == Some(port) {
            n += 1;
        }
    }
    n
}

/// The UDP destination port of an Ethernet frame carrying UDP over IPv4 or IPv6.
fn udp_dst_port(frame: &[u8]) -> Option<u16> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let udp = match ethertype {
        0x0800 => {
            let ihl = usize::from(frame.get(14)? & 0x0f) * 4;
            (*frame.get(14 + 9)? == 17).then_some(14 + ihl)?
        }
        0x86dd => (*frame.get(14 + 6)? == 17).then_some(14 + 40)?,
        _ => return None,
    };
    Some(u16::from_be_bytes([
        *frame.get(udp + 2)?,
        *frame.get(udp + 3)?,
    ]))
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
