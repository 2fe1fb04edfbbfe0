//! TLS 1.3 configurations for libp2p's QUIC handshake, with the cipher order chosen here.
//!
//! libp2p-tls builds its rustls configs with ChaCha20-Poly1305 first and no way to change
//! that, and libp2p-quic takes no config from outside. ChaCha20 is 17% of a replicated put's
//! CPU on this project's machines, which run AES-GCM in hardware. These configs are the TLS
//! half of our own QUIC transport ([`super::quic`]): the same libp2p certificates (a self-signed
//! certificate carrying the host key's signature, [`libp2p::tls::certificate`]), checked the
//! same way, with AES-128-GCM first. Our server puts its own order first, and libp2p's server
//! follows the client's, so a peer still on libp2p's configs talks AES with us either way.

use std::sync::Arc;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use libp2p::tls::certificate;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::aws_lc_rs::{self, cipher_suite};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    SupportedCipherSuite,
};

/// The ALPN protocol of libp2p over TLS.
const ALPN: &[u8] = b"libp2p";

/// TLS 1.3 suites, hardware AES first. (QUIC needs AES-128-GCM for its initial packets.)
static SUITES: &[SupportedCipherSuite] = &[
    cipher_suite::TLS13_AES_128_GCM_SHA256,
    cipher_suite::TLS13_AES_256_GCM_SHA384,
    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// Why a TLS config could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make this node's libp2p certificate: {0}")]
    Certificate(#[from] certificate::GenError),
    #[error("cannot build the TLS config: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = SUITES.to_vec();
    Arc::new(provider)
}

/// This node's certificate and key. rustls's own `with_single_cert` would refuse the
/// certificate (webpki does not know libp2p's critical extension), so it is handed over
/// through a resolver that always answers with it.
#[derive(Debug)]
struct OwnCert(Arc<CertifiedKey>);

impl OwnCert {
    fn new(
        keypair: &Keypair,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Arc<Self>, TlsError> {
        let (cert, key) = certificate::generate(keypair)?;
        let key = provider.key_provider.load_private_key(key)?;
        Ok(Arc::new(Self(Arc::new(CertifiedKey::new(vec![cert], key)))))
    }
}

impl ResolvesClientCert for OwnCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The dialer's config; with `remote`, the handshake fails unless the server is that peer.
pub fn client_config(
    keypair: &Keypair,
    remote: Option<PeerId>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let own = OwnCert::new(keypair, &provider)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier { remote }))
        .with_client_cert_resolver(own);
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The listener's config: every client must present a valid libp2p certificate, and the
/// server's suite order wins.
pub fn server_config(keypair: &Keypair) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let own = OwnCert::new(keypair, &provider)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PeerVerifier { remote: None }))
        .with_cert_resolver(own);
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.ignore_client_order = true;
    Ok(config)
}

/// The peer id a verified libp2p certificate names.
pub fn peer_of(cert: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    Ok(parse(cert)?.peer_id())
}

fn parse<'a>(
    cert: &'a CertificateDer<'a>,
) -> Result<certificate::P2pCertificate<'a>, rustls::Error> {
    // `parse` checks the self-signature, the validity period and the host key's signature
    // over the certificate's key.
    certificate::parse(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))
}

/// Checks a peer's certificate as libp2p's TLS spec says: exactly one, self-signed, with a
/// valid libp2p extension; and, when dialing a known peer, that it is that peer.
#[derive(Debug)]
struct PeerVerifier {
    remote: Option<PeerId>,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a libp2p peer presents exactly one certificate".into(),
            ));
        }
        let peer = peer_of(end_entity)?;
        match self.remote {
            Some(expected) if expected != peer => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(()),
        }
    }

    fn signature(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        parse(cert)?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ED25519,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::RSA_PSS_SHA256,
            SignatureScheme::RSA_PSS_SHA384,
            SignatureScheme::RSA_PSS_SHA512,
            SignatureScheme::RSA_PKCS1_SHA256,
            SignatureScheme::RSA_PKCS1_SHA384,
            SignatureScheme::RSA_PKCS1_SHA512,
        ]
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("libp2p uses TLS 1.3 only".into())
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    /// Runs a TLS handshake in memory; on success, the suite and the peer ids each side saw.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(SupportedCipherSuite, PeerId, PeerId), rustls::Error> {
        let name = ServerName::try_from("l").map_err(|e| rustls::Error::General(e.to_string()))?;
        let mut c = ClientConnection::new(Arc::new(client), name)?;
        let mut s = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            if !buf.is_empty() {
                s.read_tls(&mut &buf[..])
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                s.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf)
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            }
            if !buf.is_empty() {
                c.read_tls(&mut &buf[..])
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
                c.process_new_packets()?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                let suite = c
                    .negotiated_cipher_suite()
                    .ok_or_else(|| rustls::Error::General("no suite".into()))?;
                let seen_by_client = peer_of(&c.peer_certificates().unwrap_or_default()[0])?;
                let seen_by_server = peer_of(&s.peer_certificates().unwrap_or_default()[0])?;
                return Ok((suite, seen_by_client, seen_by_server));
            }
        }
        Err(rustls::Error::General(
            "the handshake did not finish".into(),
        ))
    }

    #[test]
    fn peers_prove_their_ids_and_agree_on_aes() {
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let (suite, server, client) = handshake(
            client_config(&a, Some(b.public().to_peer_id())).unwrap(),
            server_config(&b).unwrap(),
        )
        .unwrap();
        assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(server, b.public().to_peer_id());
        assert_eq!(client, a.public().to_peer_id());
    }

    #[test]
    fn a_server_that_is_not_the_dialed_peer_is_refused() {
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        let impostor = Keypair::generate_ed25519();
        let refused = handshake(
            client_config(&a, Some(b.public().to_peer_id())).unwrap(),
            server_config(&impostor).unwrap(),
        );
        assert!(
            matches!(
                refused,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ApplicationVerificationFailure
                ))
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn a_client_without_a_libp2p_certificate_is_refused() {
        let b = Keypair::generate_ed25519();
        // A client with an ordinary self-signed certificate (no libp2p extension).
        let plain = rcgen::generate_simple_self_signed(vec!["l".into()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(plain.key_pair.serialize_der()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier { remote: None }))
            .with_client_auth_cert(vec![plain.cert.der().clone()], key)
            .unwrap();
        let refused = handshake(client, server_config(&b).unwrap());
        assert!(
            matches!(
                refused,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding
                ))
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn libp2p_tls_peers_interoperate_and_use_aes_both_ways() {
        let a = Keypair::generate_ed25519();
        let b = Keypair::generate_ed25519();
        // libp2p's own client (ChaCha20 first) dialing us: our order wins.
        let (suite, _, client) = handshake(
            libp2p::tls::make_client_config(&a, Some(b.public().to_peer_id())).unwrap(),
            server_config(&b).unwrap(),
        )
        .unwrap();
        assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(client, a.public().to_peer_id());
        // Us dialing libp2p's own server: it follows the client's order, which is ours.
        let (suite, server, _) = handshake(
            client_config(&a, Some(b.public().to_peer_id())).unwrap(),
            libp2p::tls::make_server_config(&b).unwrap(),
        )
        .unwrap();
        assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(server, b.public().to_peer_id());
    }
}
