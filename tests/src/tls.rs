//! TLS for the test origin: a throw-away PKI (a CA, a server certificate for 127.0.0.1 and
//! `localhost`, a client certificate) and a listener that serves HTTPS with it.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// A CA and the certificates it issued, as PEM text.
pub struct TestPki {
    /// The CA's certificate.
    pub ca_pem: String,
    /// The server's certificate (for `127.0.0.1` and `localhost`) and key.
    pub server_cert_pem: String,
    /// The server certificate's private key.
    pub server_key_pem: String,
    /// A client certificate (for TLS client authentication).
    pub client_cert_pem: String,
    /// The client certificate's private key.
    pub client_key_pem: String,
}

impl TestPki {
    /// A fresh PKI.
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Shoal test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issue = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(names).expect("params");
            p.extended_key_usages = vec![purpose];
            let cert = p
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("issued certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert_pem, server_key_pem) = issue(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) =
            issue(vec!["client".into()], ExtendedKeyUsagePurpose::ClientAuth);
        Self {
            ca_pem: ca_cert.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        }
    }

    /// Writes `ca.pem`, `client.pem` and `client.key` into `dir`; answers their paths in
    /// that order.
    pub fn write(&self, dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
        let ca = dir.join("ca.pem");
        let cert = dir.join("client.pem");
        let key = dir.join("client.key");
        std::fs::write(&ca, &self.ca_pem).expect("write ca.pem");
        std::fs::write(&cert, &self.client_cert_pem).expect("write client.pem");
        std::fs::write(&key, &self.client_key_pem).expect("write client.key");
        (ca, cert, key)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP listener on 127.0.0.1 whose connections are TLS-accepted before axum sees them; a
/// failed handshake is dropped and the next connection accepted.
pub struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    /// Binds a random loopback port with `pki`'s server certificate; with `client_auth`,
    /// clients must present a certificate from `pki`'s CA.
    pub async fn bind(pki: &TestPki, client_auth: bool) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = vec![
            CertificateDer::from_pem_slice(pki.server_cert_pem.as_bytes())
                .expect("server certificate PEM"),
        ];
        let key =
            PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).expect("server key PEM");
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).expect("CA PEM"))
                .expect("CA root");
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .expect("server certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
