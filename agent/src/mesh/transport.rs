//! The agent's one QUIC endpoint (quinn, rustls with ring), server and client at once, with
//! mutual TLS against the fleet CA: a peer whose certificate does not chain to the CA is
//! refused during the handshake, and the reason is logged. Peers are dialled by address,
//! so a server certificate is checked for its chain, not for a host name; who the peer is
//! (its name and role) is then read from its certificate ([`peer_identity`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::identity::{self, Identity, Role};

/// The ALPN protocol of Shoal's wire format, version 1.
pub const ALPN: &[u8] = b"shoal/1";
/// The name clients put in the handshake; servers' certificates are not checked against it.
const SERVER_NAME: &str = "shoal.fleet";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies a server's chain to the fleet CA, and nothing about its name.
#[derive(Debug)]
struct FleetServerVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for FleetServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(CertificateError::NotValidForName))
            | Err(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        Duration::from_secs(10)
            .try_into()
            .expect("a valid idle timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(2)));
    t
}

/// The client side alone: what an operator's CLI uses to talk to an agent.
pub fn client_config(id: &Identity) -> Result<quinn::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(id.ca.clone())
        .context("the fleet CA certificate is not usable as a root")?;
    let roots = Arc::new(roots);
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider()).build()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FleetServerVerifier(server_verifier)))
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("the identity's certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// An endpoint bound to `listen` that accepts only peers of the fleet, and dials as `id`.
pub fn endpoint(listen: SocketAddr, id: &Identity) -> Result<quinn::Endpoint> {
    let mut roots = RootCertStore::empty();
    roots
        .add(id.ca.clone())
        .context("the fleet CA certificate is not usable as a root")?;
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("the identity's certificate and key do not match")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    server.transport_config(Arc::new(transport_config()));
    let mut endpoint =
        quinn::Endpoint::server(server, listen).with_context(|| format!("binding UDP {listen}"))?;
    endpoint.set_default_client_config(client_config(id)?);
    Ok(endpoint)
}

/// Dials `addr` from `endpoint`.
pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection> {
    let connecting = endpoint
        .connect(addr, SERVER_NAME)
        .with_context(|| format!("connecting to {addr}"))?;
    connecting
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// The name and role in a connected peer's certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Result<(String, Role)> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| anyhow!("the peer presented no certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| anyhow!("the peer presented no certificate"))?;
    identity::name_and_role(leaf)
}
