//! Peer groups and peer modes: who a node talks to.
//!
//! A [`Group`] is Delivery Optimization's Group ID made real: a name plus a secret. Nodes of a
//! group derive one libp2p private-network key (pnet, a 32-byte pre-shared key) from it, and
//! every TCP connection starts with the pnet handshake (XSalsa20 under the key) before the
//! security handshake. A node with another key, or none, cannot complete a connection at all:
//! its TLS handshake arrives as noise. pnet wraps a byte stream, so it works over TCP only; a
//! grouped node runs TCP alone, without QUIC. The Kademlia protocol name is per group as well
//! (`/shoal/kad/NAME/1.0.0`), so two groups' DHTs never mix even on a shared relay.
//!
//! [`PeerMode`] follows Delivery Optimization's download modes (`DODownloadMode`): origin only
//! (HTTP only, mode 0/99), LAN (1), group (2), internet (3).

use std::{fmt, str::FromStr};

use libp2p::{
    PeerId, StreamProtocol, Transport,
    core::{muxing::StreamMuxerBox, transport::Boxed, upgrade::Version},
    identity, pnet, tcp,
};

/// The DHT protocol name of nodes without a group.
pub(crate) const PUBLIC_DHT_PROTOCOL: &str = "/shoal/kad/1.0.0";

/// The longest group name, in bytes.
pub(crate) const MAX_GROUP_NAME_BYTES: usize = 64;
/// The shortest group secret, in bytes (a 128-bit random secret in hex is 32 bytes).
pub(crate) const MIN_GROUP_SECRET_BYTES: usize = 16;

/// A group definition that cannot be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupError {
    /// The name is empty, too long, or has a character outside `A-Z a-z 0-9 . _ -`.
    #[error("group name {0:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'")]
    BadName(String),
    /// The secret is shorter than 16 bytes.
    #[error(
        "the group secret is {0} bytes; it must be at least 16 (`head -c 32 /dev/urandom | base64` makes one)"
    )]
    ShortSecret(usize),
}

/// A peer group: a name and the pre-shared key derived from the name and the secret.
///
/// The key is `BLAKE3-derive_key("shoal 2026 group pre-shared key v1", len(name) ‖ name ‖
/// secret)` with the name's length as one byte, so the same secret under two names gives two
/// unrelated keys.
#[derive(Clone)]
pub struct Group {
    name: String,
    psk: pnet::PreSharedKey,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl Group {
    /// The group `name` with `secret`.
    ///
    /// # Errors
    /// [`GroupError::BadName`] for an empty or long name or one with other characters;
    /// [`GroupError::ShortSecret`] for a secret under 16 bytes.
    pub fn new(name: &str, secret: &[u8]) -> Result<Self, GroupError> {
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES || !name.chars().all(ok) {
            return Err(GroupError::BadName(name.to_owned()));
        }
        if secret.len() < MIN_GROUP_SECRET_BYTES {
            return Err(GroupError::ShortSecret(secret.len()));
        }
        let mut input = Vec::with_capacity(1 + name.len() + secret.len());
        input.push(name.len() as u8);
        input.extend_from_slice(name.as_bytes());
        input.extend_from_slice(secret);
        let key = blake3::derive_key("shoal 2026 group pre-shared key v1", &input);
        Ok(Self {
            name: name.to_owned(),
            psk: pnet::PreSharedKey::new(key),
        })
    }

    /// The group's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pnet fingerprint of the key (16 hex bytes), safe to show: members of one group
    /// print the same fingerprint.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        self.psk.fingerprint().to_string()
    }

    /// The Kademlia protocol name of the group: `/shoal/kad/NAME/1.0.0`.
    #[must_use]
    pub fn dht_protocol(&self) -> StreamProtocol {
        StreamProtocol::try_from_owned(format!("/shoal/kad/{}/1.0.0", self.name))
            .unwrap_or(StreamProtocol::new(PUBLIC_DHT_PROTOCOL))
    }

    /// The group's TCP transport: TCP, then the pnet handshake, then TLS 1.3 (AES-GCM first,
    /// see `tls`), then yamux (256 KiB data frames, see `mux`).
    pub(crate) fn transport(
        &self,
        key: &identity::Keypair,
        tcp: tcp::Config,
    ) -> Result<Boxed<(PeerId, StreamMuxerBox)>, crate::swarm::tls::TlsError> {
        let psk = self.psk;
        Ok(tcp::tokio::Transport::new(tcp)
            .and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(crate::swarm::tls::Config::new(key)?)
            .multiplex(crate::swarm::mux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed())
    }
}

/// Which peers a node uses, after Delivery Optimization's download modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PeerMode {
    /// The origin only: the node listens nowhere, dials nobody and serves nobody (DO's HTTP
    /// only modes 0 and 99).
    Origin,
    /// Listed peers and, where enabled, mDNS peers (DO mode 1, LAN).
    #[default]
    Lan,
    /// Listed and mDNS peers, and the group's DHT; needs a [`Group`] (DO mode 2, Group).
    Group,
    /// Listed and mDNS peers, and the public Shoal DHT reached through the bootstrap peers
    /// (DO mode 3, Internet).
    Internet,
}

impl PeerMode {
    /// Whether the node uses peers at all.
    #[must_use]
    pub fn uses_peers(self) -> bool {
        self != Self::Origin
    }

    /// Whether the node joins a DHT.
    #[must_use]
    pub fn uses_dht(self) -> bool {
        matches!(self, Self::Group | Self::Internet)
    }

    /// The name used in the config and the CLI.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::Lan => "lan",
            Self::Group => "group",
            Self::Internet => "internet",
        }
    }
}

impl fmt::Display for PeerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PeerMode {
    type Err = String;

    /// Parses `origin`, `lan`, `group` or `internet`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "origin" => Ok(Self::Origin),
            "lan" => Ok(Self::Lan),
            "group" => Ok(Self::Group),
            "internet" => Ok(Self::Internet),
            _ => Err(format!(
                "{s:?} is not a peer mode (origin, lan, group or internet)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_name_and_secret_and_names_are_checked() {
        let s = b"0123456789abcdef0123";
        let a = Group::new("lab", s).unwrap();
        assert_eq!(a.fingerprint(), Group::new("lab", s).unwrap().fingerprint());
        assert_ne!(
            a.fingerprint(),
            Group::new("lab2", s).unwrap().fingerprint()
        );
        assert_ne!(
            a.fingerprint(),
            Group::new("lab", b"0123456789abcdef0124")
                .unwrap()
                .fingerprint()
        );
        assert_eq!(a.dht_protocol().as_ref(), "/shoal/kad/lab/1.0.0");
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(
                matches!(Group::new(bad, s), Err(GroupError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Group::new("lab", b"short"),
            Err(GroupError::ShortSecret(5))
        ));
    }
}
