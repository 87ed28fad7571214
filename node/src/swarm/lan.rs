//! LAN discovery: DNS-based service discovery over multicast DNS (RFC 6763 over RFC 6762),
//! through the `mdns-sd` crate, on private and link-local interfaces only.
//!
//! Every node registers one instance of the service [`SERVICE`], named after its peer id, with
//! its TCP listen port, the addresses of its private and link-local interfaces, and a TXT
//! record holding its peer id (`p2p`) and QUIC port (`quic`, when it listens on QUIC). It
//! browses the same service: an instance resolved is a peer found, at each of its addresses;
//! an instance removed (its node stopped, or its records expired) is a peer lost.
//!
//! Queries and answers go out only on interfaces whose address is private (RFC 1918, shared
//! address space, unique local) or link-local, never on loopback or a public address: a node
//! with a public interface does not announce itself there. Turned off with `mdns = false` (or
//! `--no-mdns`); the library's default is off.

use std::collections::HashMap;
use std::net::IpAddr;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use mdns_sd::{IfKind, IfPredicate, ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::Error;
use crate::swarm::dialscope::{Scope, scope_of_ip};

/// The DNS-SD service type Shoal nodes register and browse.
pub(crate) const SERVICE: &str = "_shoal._tcp.local.";

/// What browsing found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// A node at these addresses (TCP, and QUIC when it listens on it).
    Peer(PeerId, Vec<Multiaddr>),
    /// The node that was at these addresses is gone.
    Gone(PeerId, Vec<Multiaddr>),
}

/// Whether mDNS may run on an interface with this address: private or link-local only.
pub(crate) fn on_interface(ip: IpAddr) -> bool {
    matches!(scope_of_ip(ip), Scope::Private | Scope::LinkLocal)
}

/// The mDNS daemon of a node: its own instance and what it browses.
pub(crate) struct Lan {
    daemon: ServiceDaemon,
    events: mdns_sd::Receiver<ServiceEvent>,
    me: PeerId,
    /// This node's instance, once registered (its full name, and the ports it states).
    registered: Option<(String, u16, Option<u16>)>,
    /// Instances resolved, by full name: the peer and its addresses.
    peers: HashMap<String, (PeerId, Vec<Multiaddr>)>,
}

impl Lan {
    /// Starts the daemon (its own thread, and sockets on the private and link-local
    /// interfaces) and browses for other nodes.
    ///
    /// # Errors
    /// [`Error::Swarm`] when the daemon cannot start or browse.
    pub(crate) fn start(me: PeerId) -> Result<Self, Error> {
        let err = |e: mdns_sd::Error| Error::Swarm(format!("mDNS: {e}"));
        let daemon = ServiceDaemon::new().map_err(err)?;
        // Later selections win: none, then the private and link-local ones.
        daemon.disable_interface(IfKind::All).map_err(err)?;
        daemon
            .enable_interface(IfKind::Predicate(IfPredicate::new(|intf| {
                on_interface(intf.ip())
            })))
            .map_err(err)?;
        let events = daemon.browse(SERVICE).map_err(err)?;
        Ok(Self {
            daemon,
            events,
            me,
            registered: None,
            peers: HashMap::new(),
        })
    }

    /// States this node at TCP port `tcp` (and QUIC port `quic`); registered again only when
    /// the ports changed.
    pub(crate) fn announce(&mut self, tcp: u16, quic: Option<u16>) {
        if self
            .registered
            .as_ref()
            .is_some_and(|(_, t, q)| *t == tcp && *q == quic)
        {
            return;
        }
        let id = self.me.to_base58();
        // An instance name is at most 63 bytes; a host name must be unique on the link.
        let host = format!("shoal-{}.local.", &id[id.len().saturating_sub(16)..]);
        let mut txt = vec![("p2p".to_owned(), id.clone())];
        if let Some(q) = quic {
            txt.push(("quic".to_owned(), q.to_string()));
        }
        let info = match ServiceInfo::new(SERVICE, &id, &host, "", tcp, &txt[..]) {
            Ok(i) => i.enable_addr_auto(),
            Err(e) => {
                tracing::warn!("mDNS: cannot describe this node: {e}");
                return;
            }
        };
        let fullname = info.get_fullname().to_owned();
        match self.daemon.register(info) {
            Ok(()) => self.registered = Some((fullname, tcp, quic)),
            Err(e) => tracing::warn!("mDNS: cannot register this node: {e}"),
        }
    }

    /// The next peer found or lost; `None` once the daemon stopped.
    pub(crate) async fn next(&mut self) -> Option<Found> {
        loop {
            let event = self.events.recv_async().await.ok()?;
            if let Some(found) = self.on_event(event) {
                return Some(found);
            }
        }
    }

    /// What an event of the daemon means for the node, if anything.
    fn on_event(&mut self, event: ServiceEvent) -> Option<Found> {
        match event {
            ServiceEvent::ServiceResolved(r) => {
                let peer: PeerId = r.txt_properties.get_property_val_str("p2p")?.parse().ok()?;
                if peer == self.me {
                    return None;
                }
                let quic = r
                    .txt_properties
                    .get_property_val_str("quic")
                    .and_then(|q| q.parse::<u16>().ok());
                let addrs = addresses(
                    r.addresses.iter().map(mdns_sd::ScopedIp::to_ip_addr),
                    r.port,
                    quic,
                );
                if addrs.is_empty() {
                    return None;
                }
                self.peers.insert(r.fullname.clone(), (peer, addrs.clone()));
                Some(Found::Peer(peer, addrs))
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                let (peer, addrs) = self.peers.remove(&fullname)?;
                Some(Found::Gone(peer, addrs))
            }
            _ => None,
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if let Some((fullname, _, _)) = &self.registered {
            let _ = self.daemon.unregister(fullname);
        }
        let _ = self.daemon.shutdown();
    }
}

/// The multiaddrs of a node stated at `ips`, TCP port `tcp` and QUIC port `quic`: only the
/// addresses mDNS may be used on (private and link-local).
fn addresses(ips: impl Iterator<Item = IpAddr>, tcp: u16, quic: Option<u16>) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    for ip in ips.filter(|ip| on_interface(*ip)) {
        let base = Multiaddr::empty().with(match ip {
            IpAddr::V4(v4) => Protocol::Ip4(v4),
            IpAddr::V6(v6) => Protocol::Ip6(v6),
        });
        out.push(base.clone().with(Protocol::Tcp(tcp)));
        if let Some(q) = quic {
            out.push(base.with(Protocol::Udp(q)).with(Protocol::QuicV1));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_and_link_local_interfaces_and_addresses_count() {
        for (ip, ok) in [
            ("10.1.2.3", true),
            ("192.168.0.7", true),
            ("172.16.5.5", true),
            ("169.254.3.3", true),
            ("fe80::1", true),
            ("fd00::5", true),
            ("127.0.0.1", false),
            ("::1", false),
            ("8.8.8.8", false),
            ("2606:4700::1", false),
        ] {
            assert_eq!(on_interface(ip.parse().unwrap()), ok, "{ip}");
        }
        let ips = ["8.8.8.8", "10.0.0.2", "127.0.0.1"].map(|s| s.parse().unwrap());
        assert_eq!(
            addresses(ips.into_iter(), 7680, Some(7680)),
            vec![
                "/ip4/10.0.0.2/tcp/7680".parse::<Multiaddr>().unwrap(),
                "/ip4/10.0.0.2/udp/7680/quic-v1".parse().unwrap(),
            ]
        );
    }
}
