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
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::identity::revocation::RevocationList;
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

/// A connection that carried nothing for this long is closed (no keep-alives: an idle
/// peer costs no packets; the next send dials again).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Unidirectional streams a peer may have open at once on one connection.
pub const MAX_UNI_STREAMS: u32 = 32;
/// Bidirectional streams a peer may have open at once on one connection.
pub const MAX_BI_STREAMS: u32 = 8;
/// Bytes a peer may have in flight on one stream: one whole frame and a little.
pub const STREAM_WINDOW: u32 = super::frame::MAX_FRAME + 64 * 1024;
/// Bytes a peer may have in flight on one connection, all streams together.
pub const CONNECTION_WINDOW: u32 = 4 << 20;
/// What the agent asks for its UDP socket's receive and send buffers (the system may give
/// less: `net.core.rmem_max`).
pub const SOCKET_BUFFER: usize = 4 << 20;
/// Received datagrams buffered per connection before the oldest are dropped.
pub const DATAGRAM_BUFFER: usize = 128 * 1024;

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("a valid idle timeout")));
    t.keep_alive_interval(None);
    t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
    t.max_concurrent_bidi_streams(MAX_BI_STREAMS.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t
}

/// The key behind stateless resets, derived from the agent's private key so that it is the
/// same in every life of the agent: a restarted agent resets its old life's connections at
/// their first packet, instead of leaving peers to wait for the idle timeout.
fn reset_key(id: &Identity) -> Arc<ring::hmac::Key> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"shoal stateless reset key v1\0");
    h.update(id.key.secret_der());
    Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &h.finalize()))
}

/// The fleet CA as the one root of trust.
fn roots(id: &Identity) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(id.ca.clone())
        .context("the fleet CA certificate is not usable as a root")?;
    Ok(Arc::new(roots))
}

/// The revocation list, if any, as rustls takes it.
fn crls(revoked: Option<&RevocationList>) -> Vec<CertificateRevocationListDer<'static>> {
    revoked
        .map(|l| vec![CertificateRevocationListDer::from(l.der.clone())])
        .unwrap_or_default()
}

/// The client side alone: what an operator's CLI uses to talk to an agent, and what an
/// agent dials with. Servers on the revocation list are refused.
pub fn client_config(
    id: &Identity,
    revoked: Option<&RevocationList>,
) -> Result<quinn::ClientConfig> {
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(id)?, provider())
            .with_crls(crls(revoked))
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
            .build()?;
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

/// What an agent accepts: peers of the fleet whose certificates are not revoked.
pub fn server_config(
    id: &Identity,
    revoked: Option<&RevocationList>,
) -> Result<quinn::ServerConfig> {
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
            .with_crls(crls(revoked))
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status()
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
    Ok(server)
}

/// An endpoint bound to `listen` that accepts only peers of the fleet (and none that
/// `revoked` lists), and dials as `id`.
pub fn endpoint(
    listen: SocketAddr,
    id: &Identity,
    revoked: Option<&RevocationList>,
) -> Result<quinn::Endpoint> {
    let server = server_config(id, revoked)?;
    let socket = udp_socket(listen).with_context(|| format!("binding UDP {listen}"))?;
    let config = quinn::EndpointConfig::new(reset_key(id));
    let mut endpoint =
        quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
            .with_context(|| format!("binding UDP {listen}"))?;
    endpoint.set_default_client_config(client_config(id, revoked)?);
    Ok(endpoint)
}

/// The endpoint's one UDP socket, with room for bursts: every peer's packets arrive on it,
/// and the system's default receive buffer (208 KiB on Linux) overflowed when 100 agents
/// started at once (about one packet in ten dropped by the kernel, membership datagrams
/// among them: refutations lost, false deaths).
fn udp_socket(listen: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    for (what, result) in [
        ("receive", socket.set_recv_buffer_size(SOCKET_BUFFER)),
        ("send", socket.set_send_buffer_size(SOCKET_BUFFER)),
    ] {
        if let Err(e) = result {
            tracing::warn!("the UDP {what} buffer stays at the system's default: {e}");
        }
    }
    let got = socket.recv_buffer_size().unwrap_or(0);
    if got < SOCKET_BUFFER {
        tracing::info!(
            bytes = got,
            wanted = SOCKET_BUFFER,
            "the system caps the UDP receive buffer (net.core.rmem_max); bursts may drop packets"
        );
    }
    socket.bind(&listen.into())?;
    Ok(socket.into())
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
    identity::name_and_role(&peer_cert(conn)?)
}

/// A connected peer's certificate (DER).
pub fn peer_cert(conn: &quinn::Connection) -> Result<CertificateDer<'static>> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| anyhow!("the peer presented no certificate"))?;
    certs
        .first()
        .cloned()
        .ok_or_else(|| anyhow!("the peer presented no certificate"))
}

/// What a TLS refusal means, if the connection ended in one (a TLS alert travels as a QUIC
/// crypto error, 0x100 + the alert): said of the certificate that was refused.
pub fn refusal(e: &quinn::ConnectionError) -> Option<&'static str> {
    let code = match e {
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        quinn::ConnectionError::TransportError(t) => t.code,
        _ => return None,
    };
    [
        (44, "has been revoked by the fleet CA (`shoal ca revoke`)"),
        (42, "was not accepted (is it from this fleet's CA?)"),
        (48, "is not from this fleet's CA"),
        (45, "has expired"),
    ]
    .into_iter()
    .find(|(alert, _)| code == quinn::TransportErrorCode::crypto(*alert))
    .map(|(_, why)| why)
}
