//! The TCP security upgrade: libp2p's TLS 1.3 handshake (`/tls/1.0.0`, the libp2p TLS spec)
//! with the record cipher chosen for bulk throughput.
//!
//! `libp2p-tls` 0.7 fixes its cipher-suite order with ChaCha20-Poly1305 first. On CPUs with
//! AES instructions AES-GCM costs a fraction of that per byte, and piece traffic is nearly all
//! bulk, so this upgrade builds its own rustls configurations: the certificate (self-signed,
//! carrying the libp2p public-key extension) and its parsing and signature checks come from
//! `libp2p_tls::certificate`; only the provider's suite order differs. Peers running plain
//! `libp2p-tls` interoperate: the suites are the same three TLS 1.3 suites, in another order.
//! The AES-GCM code is ring's or aws-lc's, whichever is faster on this CPU. See
//! `docs/decisions/0006-tls-with-aes-gcm.md` and `0019-record-layer-and-frame-size.md`.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use futures::{AsyncRead, AsyncWrite, FutureExt, future::BoxFuture};
use libp2p::{
    PeerId,
    core::{
        UpgradeInfo,
        upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade},
    },
    identity,
    tls::certificate,
};
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    SignatureScheme, SupportedCipherSuite,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, aws_lc_rs},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

/// The ALPN token of the libp2p TLS handshake.
const ALPN: &[u8] = b"libp2p";

/// Errors of the TLS upgrade.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// The node's certificate could not be generated.
    #[error("cannot generate the TLS certificate: {0}")]
    Certificate(#[from] certificate::GenError),
    /// rustls refused the configuration (an internal error).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The handshake failed (I/O, a bad certificate, no common suite).
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    /// The remote presented no certificate or one without the libp2p extension.
    #[error("the remote's TLS certificate is not a libp2p certificate: {0}")]
    BadCertificate(String),
}

/// The TLS 1.3 suites, fastest first for this CPU: AES-GCM where the CPU has AES and carry-less
/// multiply instructions, ChaCha20-Poly1305 first elsewhere. The AES-GCM code comes from the
/// library that is faster on this CPU (see [`aes_gcm_from_ring`]); the handshake (key exchange,
/// signatures) stays with aws-lc-rs either way.
fn cipher_suites() -> Vec<SupportedCipherSuite> {
    let chacha = aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
    let (aes128, aes256) = if aes_gcm_from_ring() {
        use rustls::crypto::ring::cipher_suite as ring;
        (
            ring::TLS13_AES_128_GCM_SHA256,
            ring::TLS13_AES_256_GCM_SHA384,
        )
    } else {
        (
            aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        )
    };
    if aes_in_hardware() {
        vec![aes128, aes256, chacha]
    } else {
        vec![chacha, aes128, aes256]
    }
}

/// Whether the record layer's AES-GCM should be ring's rather than aws-lc's: on x86-64 CPUs with
/// VAES and VPCLMULQDQ but without AVX-512 (AMD Zen 3, Intel Alder Lake and later client
/// cores). There ring 0.17 runs a 256-bit VAES/AVX2 AES-GCM, while aws-lc (as built by
/// aws-lc-sys 0.47) has VAES code only for AVX-512 and falls back to its 128-bit AES-NI code:
/// 7.5 GB/s against 4.0 GB/s sealing 16 KiB records on a 2 vCPU AMD EPYC (docs/benchmarks.md,
/// 2026-12-03). With AVX-512, aws-lc's VAES/AVX-512 code is used; without VAES both libraries run
/// the same AES-NI code.
fn aes_gcm_from_ring() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("avx2")
            && !(std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The security upgrade for TCP connections: libp2p TLS 1.3 with AES-GCM preferred where the
/// CPU accelerates it. Output: the remote's peer id (from its certificate) and the stream.
#[derive(Clone)]
pub(crate) struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl Config {
    /// Builds both sides' configurations for `identity`, with a fresh certificate key.
    ///
    /// # Errors
    /// [`TlsError::Certificate`] if the certificate cannot be generated, [`TlsError::Config`] if
    /// rustls refuses the configuration.
    pub(crate) fn new(identity: &identity::Keypair) -> Result<Self, TlsError> {
        let (cert, key) = certificate::generate(identity)?;
        let provider = Arc::new(CryptoProvider {
            cipher_suites: cipher_suites(),
            ..aws_lc_rs::default_provider()
        });
        // rustls's own single-certificate setters parse the certificate with webpki, which
        // rejects the critical libp2p extension; a resolver hands out the key as it is.
        let certified = Arc::new(OwnCertificate(Arc::new(CertifiedKey::new(
            vec![cert],
            aws_lc_rs::sign::any_ecdsa_type(&key)?,
        ))));
        let versions = &[&rustls::version::TLS13];
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Libp2pCertVerifier))
            .with_client_cert_resolver(Arc::clone(&certified) as _);
        client.alpn_protocols = vec![ALPN.to_vec()];
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(Arc::new(Libp2pCertVerifier))
            .with_cert_resolver(certified);
        server.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/tls/1.0.0")
    }
}

/// The node's certificate and key, offered in every handshake on either side.
#[derive(Debug)]
struct OwnCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for OwnCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The peer id in the one certificate the remote presented.
fn remote_peer(state: &CommonState) -> Result<PeerId, TlsError> {
    match state.peer_certificates() {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| TlsError::BadCertificate(e.to_string())),
        _ => Err(TlsError::BadCertificate(
            "expected exactly one certificate".into(),
        )),
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, futures_rustls::TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = remote_peer(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, futures_rustls::TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The spec forbids a Server Name Indication; an IP address name sends none.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(TlsError::Handshake)?;
            // The swarm compares this with the peer id it dialled, if the address named one.
            let peer = remote_peer(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// Checks what the libp2p TLS spec asks of both sides' certificates: exactly one, self-signed,
/// valid now, with a libp2p extension whose signature by the host key holds
/// (`libp2p_tls::certificate::parse` does the checks); and the handshake signature by the
/// certificate's key.
#[derive(Debug)]
struct Libp2pCertVerifier;

fn bad_certificate(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl Libp2pCertVerifier {
    fn check_chain(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        certificate::parse(end_entity).map_err(bad_certificate)?;
        Ok(())
    }

    fn check_signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        certificate::parse(cert)
            .map_err(bad_certificate)?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PKCS1_SHA512,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA256,
        ]
    }
}

impl ServerCertVerifier for Libp2pCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for Libp2pCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::compat::TokioAsyncReadCompatExt;

    use super::*;

    #[test]
    fn suites_are_the_three_tls13_suites() {
        let suites = cipher_suites();
        assert_eq!(suites.len(), 3);
        assert!(
            suites
                .iter()
                .all(|s| s.version() == &rustls::version::TLS13)
        );
    }

    /// Runs one handshake over an in-memory pipe; returns the peer ids each side saw and the
    /// suite the client negotiated.
    async fn handshake<D, L>(dialer: D, listener: L) -> (PeerId, PeerId, String)
    where
        D: OutboundConnectionUpgrade<
                tokio_util::compat::Compat<tokio::io::DuplexStream>,
                Info = &'static str,
                Output = (
                    PeerId,
                    futures_rustls::TlsStream<tokio_util::compat::Compat<tokio::io::DuplexStream>>,
                ),
            >,
        L: InboundConnectionUpgrade<
                tokio_util::compat::Compat<tokio::io::DuplexStream>,
                Info = &'static str,
                Output = (
                    PeerId,
                    futures_rustls::TlsStream<tokio_util::compat::Compat<tokio::io::DuplexStream>>,
                ),
            >,
        D::Error: std::fmt::Debug,
        L::Error: std::fmt::Debug,
    {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (out, inb) = tokio::join!(
            dialer.upgrade_outbound(a.compat(), "/tls/1.0.0"),
            listener.upgrade_inbound(b.compat(), "/tls/1.0.0"),
        );
        let (seen_by_dialer, stream) = out.expect("dialer handshake");
        let (seen_by_listener, _) = inb.expect("listener handshake");
        let suite = match &stream {
            futures_rustls::TlsStream::Client(c) => c.get_ref().1.negotiated_cipher_suite(),
            futures_rustls::TlsStream::Server(s) => s.get_ref().1.negotiated_cipher_suite(),
        };
        (
            seen_by_dialer,
            seen_by_listener,
            format!("{:?}", suite.expect("a suite").suite()),
        )
    }

    #[tokio::test]
    async fn handshake_gives_each_side_the_others_peer_id_and_prefers_aes() {
        let (ka, kb) = (
            identity::Keypair::generate_ed25519(),
            identity::Keypair::generate_ed25519(),
        );
        let (seen_by_a, seen_by_b, suite) =
            handshake(Config::new(&ka).unwrap(), Config::new(&kb).unwrap()).await;
        assert_eq!(seen_by_a, kb.public().to_peer_id());
        assert_eq!(seen_by_b, ka.public().to_peer_id());
        let expected = if aes_in_hardware() {
            "TLS13_AES_128_GCM_SHA256"
        } else {
            "TLS13_CHACHA20_POLY1305_SHA256"
        };
        assert_eq!(suite, expected);
    }

    #[tokio::test]
    async fn interoperates_with_stock_libp2p_tls_both_ways() {
        let (ours, stock) = (
            identity::Keypair::generate_ed25519(),
            identity::Keypair::generate_ed25519(),
        );
        let (a, b, _) = handshake(
            Config::new(&ours).unwrap(),
            libp2p::tls::Config::new(&stock).unwrap(),
        )
        .await;
        assert_eq!(
            (a, b),
            (stock.public().to_peer_id(), ours.public().to_peer_id())
        );
        let (a, b, _) = handshake(
            libp2p::tls::Config::new(&stock).unwrap(),
            Config::new(&ours).unwrap(),
        )
        .await;
        assert_eq!(
            (a, b),
            (ours.public().to_peer_id(), stock.public().to_peer_id())
        );
    }

    #[tokio::test]
    async fn a_plain_tls_certificate_is_refused() {
        // A listener whose certificate lacks the libp2p extension: an ordinary self-signed one.
        let key = plain_server();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let ours = Config::new(&identity::Keypair::generate_ed25519()).unwrap();
        let (out, _) = tokio::join!(
            ours.upgrade_outbound(a.compat(), "/tls/1.0.0"),
            futures_rustls::TlsAcceptor::from(key).accept(b.compat()),
        );
        let err = out.expect_err("a certificate without the libp2p extension must be refused");
        assert!(
            matches!(&err, TlsError::Handshake(e) if e.to_string().contains("certificate")),
            "{err}"
        );
    }

    /// A rustls server with an ordinary self-signed certificate: valid TLS, no libp2p
    /// extension, so no peer id.
    fn plain_server() -> Arc<rustls::ServerConfig> {
        let plain = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(plain.key_pair.serialize_der().into());
        let mut server =
            rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![plain.cert.der().clone()], key)
                .unwrap();
        server.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(server)
    }
}
