//! Which addresses stated by peers the node dials.
//!
//! Peers tell addresses in several ways: identify's listen addresses (kept by identify's cache
//! and by Kademlia's routing table), the closer peers and provider records of Kademlia answers,
//! and mDNS responses. Dialing them as stated lets any peer make the node connect to a
//! loopback service or into a private network it can reach and the peer cannot (reflection
//! and port probing, security review finding 17). The node therefore dials an address that a
//! behaviour supplies only when it is global, or in a non-global scope the operator opened:
//! a configured peer, bootstrap peer or cache node in that scope opens it, and `lan` mode or
//! mDNS open the private and link-local scopes. Addresses the node is told to dial directly
//! (configuration, [`crate::Node::dial`]) are not filtered: they are the operator's own.
//!
//! The filter wraps a behaviour ([`ScopedDial`]) and drops, from the addresses it offers for
//! an outgoing connection, those outside the open scopes; the transport never sees them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// The reach of an IP address, as the IANA special-purpose registries define it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    /// `127.0.0.0/8`, `::1`: this host.
    Loopback,
    /// `10/8`, `172.16/12`, `192.168/16`, shared `100.64/10`, unique local `fc00::/7`.
    Private,
    /// `169.254/16`, `fe80::/10`.
    LinkLocal,
    /// Everything else that is unicast.
    Global,
    /// Never dialed: unspecified, broadcast, multicast, documentation, benchmarking and
    /// reserved ranges, and addresses without an IP (no DNS transport is built).
    Never,
}

fn scope_v4(ip: Ipv4Addr) -> Scope {
    let o = ip.octets();
    if ip.is_loopback() {
        Scope::Loopback
    } else if ip.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64) {
        Scope::Private
    } else if ip.is_link_local() {
        Scope::LinkLocal
    } else if ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || o[0] >= 240
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
    {
        Scope::Never
    } else {
        Scope::Global
    }
}

fn scope_v6(ip: Ipv6Addr) -> Scope {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return scope_v4(v4);
    }
    let s = ip.segments();
    if ip.is_loopback() {
        Scope::Loopback
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Scope::Private
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Scope::LinkLocal
    } else if ip.is_unspecified() || ip.is_multicast() || (s[0] == 0x2001 && s[1] == 0x0db8) {
        Scope::Never
    } else {
        Scope::Global
    }
}

/// The scope of an IP address.
pub(crate) fn scope_of_ip(ip: std::net::IpAddr) -> Scope {
    match ip {
        std::net::IpAddr::V4(v4) => scope_v4(v4),
        std::net::IpAddr::V6(v6) => scope_v6(v6),
    }
}

/// The scope of the first IP address in `addr` ([`Scope::Never`] when it has none).
pub(crate) fn scope_of(addr: &Multiaddr) -> Scope {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => scope_v4(ip),
        Some(Protocol::Ip6(ip)) => scope_v6(ip),
        _ => Scope::Never,
    }
}

/// The non-global scopes the node dials addresses in when a peer states them. Clones share
/// one set: a scope opened through one is open for all.
#[derive(Clone, Debug, Default)]
pub(crate) struct DialScopes {
    open: Arc<AtomicU8>,
}

const LOOPBACK: u8 = 1;
const PRIVATE: u8 = 2;
const LINK_LOCAL: u8 = 4;

fn bit(scope: Scope) -> u8 {
    match scope {
        Scope::Loopback => LOOPBACK,
        Scope::Private => PRIVATE,
        Scope::LinkLocal => LINK_LOCAL,
        Scope::Global | Scope::Never => 0,
    }
}

impl DialScopes {
    /// The scopes opened by the operator's own addresses (`configured`: static peers, bootstrap
    /// peers, cache nodes) and, with `lan` (the `lan` peer mode, or mDNS on), the private and
    /// link-local scopes.
    pub(crate) fn new<'a>(configured: impl IntoIterator<Item = &'a Multiaddr>, lan: bool) -> Self {
        let mut open = if lan { PRIVATE | LINK_LOCAL } else { 0 };
        for a in configured {
            open |= bit(scope_of(a));
        }
        Self {
            open: Arc::new(AtomicU8::new(open)),
        }
    }

    /// A peer connected from (or was reached at) `remote`: its scope is one the node talks in,
    /// so it opens. A peer can only open a scope it is already in.
    pub(crate) fn connected(&self, remote: &Multiaddr) {
        self.open.fetch_or(bit(scope_of(remote)), Ordering::Relaxed);
    }

    /// Whether an address stated by a peer may be dialed.
    pub(crate) fn allows(&self, addr: &Multiaddr) -> bool {
        match scope_of(addr) {
            Scope::Global => true,
            Scope::Never => false,
            scope => self.open.load(Ordering::Relaxed) & bit(scope) != 0,
        }
    }
}

/// A behaviour whose addresses for outgoing connections are filtered by [`DialScopes`]; it
/// dereferences to the behaviour it wraps, and behaves as that behaviour in every other way.
pub(crate) struct ScopedDial<B> {
    inner: B,
    scopes: DialScopes,
}

impl<B> ScopedDial<B> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: B, scopes: DialScopes) -> Self {
        Self { inner, scopes }
    }
}

impl<B> std::ops::Deref for ScopedDial<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B> std::ops::DerefMut for ScopedDial<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for ScopedDial<B> {
    type ConnectionHandler = B::ConnectionHandler;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        let mut offered = self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )?;
        let before = offered.len();
        offered.retain(|a| self.scopes.allows(a));
        if offered.len() < before {
            tracing::debug!(
                peer = ?maybe_peer,
                dropped = before - offered.len(),
                "not dialing addresses a peer stated outside the open scopes"
            );
        }
        Ok(offered)
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn scopes_follow_the_special_purpose_registries() {
        for (addr, scope) in [
            ("/ip4/127.0.0.1/tcp/1", Scope::Loopback),
            ("/ip4/10.1.2.3/tcp/1", Scope::Private),
            ("/ip4/172.20.0.1/tcp/1", Scope::Private),
            ("/ip4/192.168.1.1/tcp/1", Scope::Private),
            ("/ip4/100.64.0.1/tcp/1", Scope::Private),
            ("/ip4/169.254.1.1/tcp/1", Scope::LinkLocal),
            ("/ip4/0.0.0.0/tcp/1", Scope::Never),
            ("/ip4/255.255.255.255/tcp/1", Scope::Never),
            ("/ip4/224.0.0.251/udp/5353", Scope::Never),
            ("/ip4/192.0.2.1/tcp/1", Scope::Never),
            ("/ip4/198.18.0.1/tcp/1", Scope::Never),
            ("/ip4/8.8.8.8/tcp/1", Scope::Global),
            ("/ip4/100.128.0.1/tcp/1", Scope::Global),
            ("/ip6/::1/tcp/1", Scope::Loopback),
            ("/ip6/fd00::1/tcp/1", Scope::Private),
            ("/ip6/fe80::1/tcp/1", Scope::LinkLocal),
            ("/ip6/::/tcp/1", Scope::Never),
            ("/ip6/2001:db8::1/tcp/1", Scope::Never),
            ("/ip6/::ffff:127.0.0.1/tcp/1", Scope::Loopback),
            ("/ip6/2606:4700::1/tcp/1", Scope::Global),
            ("/dns4/localhost/tcp/1", Scope::Never),
        ] {
            assert_eq!(scope_of(&a(addr)), scope, "{addr}");
        }
    }

    #[test]
    fn only_the_scopes_the_operator_opened_are_dialed_when_a_peer_states_them() {
        let public = DialScopes::new([&a("/ip4/8.8.8.8/tcp/7680")], false);
        assert!(public.allows(&a("/ip4/1.1.1.1/tcp/7680")));
        for denied in [
            "/ip4/127.0.0.1/tcp/22",
            "/ip4/10.0.0.1/tcp/7680",
            "/ip4/169.254.169.254/tcp/80",
            "/ip6/::1/tcp/22",
            "/ip4/0.0.0.0/tcp/7680",
        ] {
            assert!(!public.allows(&a(denied)), "{denied}");
        }
        // A bootstrap peer on this host opens loopback, nothing else.
        let local = DialScopes::new([&a("/ip4/127.0.0.1/tcp/4001")], false);
        assert!(local.allows(&a("/ip4/127.0.0.1/tcp/22")));
        assert!(!local.allows(&a("/ip4/192.168.0.1/tcp/22")));
        // The LAN mode opens the private and link-local scopes, not loopback.
        let lan = DialScopes::new([], true);
        assert!(lan.allows(&a("/ip4/192.168.0.1/tcp/7680")));
        assert!(lan.allows(&a("/ip6/fe80::1/tcp/7680")));
        assert!(!lan.allows(&a("/ip4/127.0.0.1/tcp/22")));
        // A peer connecting from this host opens loopback, for every clone.
        let seen = lan.clone();
        seen.connected(&a("/ip4/127.0.0.1/tcp/50000"));
        assert!(lan.allows(&a("/ip4/127.0.0.1/tcp/22")));
    }

    /// The real path: Kademlia offers an address a peer stated for a peer the node dials.
    /// Closed, the dial has no address and the listener at that address sees no connection;
    /// opened by a configured address on this host, the same dial reaches it.
    #[tokio::test]
    async fn an_address_a_peer_stated_is_dialed_only_in_an_open_scope() {
        use futures::StreamExt;
        use libp2p::{kad, swarm::DialError};
        use std::time::Duration;
        for open in [false, true] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let scopes = if open {
                DialScopes::new([&a("/ip4/127.0.0.1/tcp/4001")], false)
            } else {
                DialScopes::new([&a("/ip4/8.8.8.8/tcp/4001")], false)
            };
            let mut swarm = crate::swarm::test_swarm(|key| {
                let me = key.public().to_peer_id();
                ScopedDial::new(
                    kad::Behaviour::new(me, kad::store::MemoryStore::new(me)),
                    scopes,
                )
            });
            let stranger = PeerId::random();
            swarm
                .behaviour_mut()
                .add_address(&stranger, a(&format!("/ip4/127.0.0.1/tcp/{port}")));
            let dialed = swarm.dial(stranger);
            assert_eq!(
                matches!(dialed, Err(DialError::NoAddresses)),
                !open,
                "{dialed:?}"
            );
            let wait = Duration::from_secs(if open { 10 } else { 2 });
            let reached = tokio::time::timeout(wait, async {
                tokio::select! {
                    r = listener.accept() => r.is_ok(),
                    () = async { loop { swarm.select_next_some().await; } } => false,
                }
            })
            .await
            .unwrap_or(false);
            assert_eq!(reached, open, "open: {open}");
        }
    }
}
