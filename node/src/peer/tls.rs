//! Mutual TLS for peer traffic: the quinn server and client configs built on a node's [`TlsIdentity`], and the QUIC
//! transport settings every peer connection shares.
//!
//! Both sides present a certificate from the cluster CA (`pki/`), which is the only trust root, and not revoked
//! (`pki/revocation.rs`): each side checks the other's against its revocations in the handshake. The handshake proves
//! cluster membership; the transport then checks that the peer is the node it expected with
//! [`verify_node_identity`](crate::pki::identity::verify_node_identity) on [`peer_certificate`].

use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore};

use crate::pki::revocation::Revocations;
use crate::wall_clock::WallTime;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::pki::crypto_provider;
use crate::pki::identity::TlsIdentity;

/// The one application protocol peers speak; a version bump changes it so old and new nodes refuse each other in the
/// handshake instead of misreading each other's frames.
pub const ALPN: &[u8] = b"konor/1";

/// A quiet connection still sends a packet this often, so NAT bindings and the peer's idle timer stay fresh.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// A connection that hears nothing for this long is dead; membership then learns of it from gossip as well.
const IDLE_TIMEOUT_MS: u32 = 10_000;

// Several keep-alives must fit in one idle timeout, or a single lost packet would close a healthy connection.
const _: () = assert!(KEEP_ALIVE_INTERVAL.as_millis() * 4 <= IDLE_TIMEOUT_MS as u128);

/// Unidirectional streams a peer may have open to this node at once: it uses one per channel
/// (two), and a few more while it replaces a stuck connection's streams.
pub const PEER_STREAMS_MAX: u32 = 8;

/// Bytes a peer may have in flight to this node on one connection (QUIC flow control), across
/// its streams.
pub const PEER_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// rustls or quinn refused to build a TLS config from the loaded credentials; nothing changed.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the {side} TLS config: {source}; check this node's credentials")]
pub struct TlsConfigError {
    side: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl TlsConfigError {
    /// The HTTP API's server config could not be built.
    pub(crate) fn http<E: std::error::Error + Send + Sync + 'static>(error: E) -> TlsConfigError {
        TlsConfigError { side: "HTTP server", source: Box::new(error) }
    }
}

/// The QUIC server config: TLS 1.3 only, ALPN [`ALPN`], and a client certificate from the cluster CA required.
pub fn server_config(identity: &TlsIdentity) -> Result<quinn::ServerConfig, TlsConfigError> {
    let provider = crypto_provider();
    let client_verifier = WebPkiClientVerifier::builder_with_provider(ca_roots(identity, "server")?, provider.clone())
        .build()
        .map_err(config_error("server"))?;
    let client_verifier = refusing_revoked_clients(client_verifier, identity.revocations());
    let mut tls = rustls::ServerConfig::builder_with_details(provider, Arc::new(WallTime))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error("server"))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![identity.cert().clone()], identity.key().clone_key())
        .map_err(config_error("server"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    refuse_resumption(&mut tls);
    // max_early_data_size stays 0: 0-RTT data can be replayed, and peer messages are not idempotent.
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(config_error("server"))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// The QUIC client config: presents this node's certificate and trusts only servers certified by the cluster CA.
pub fn client_config(identity: &TlsIdentity) -> Result<quinn::ClientConfig, TlsConfigError> {
    let provider = crypto_provider();
    let server_verifier = WebPkiServerVerifier::builder_with_provider(ca_roots(identity, "client")?, provider.clone())
        .build()
        .map_err(config_error("client"))?;
    let server_verifier =
        Arc::new(RevokingServerVerifier { inner: server_verifier, revocations: identity.revocations().clone() });
    let mut tls = rustls::ClientConfig::builder_with_details(provider, Arc::new(WallTime))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error("client"))?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_auth_cert(vec![identity.cert().clone()], identity.key().clone_key())
        .map_err(config_error("client"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // A resumed session skips the certificate verifier, so a peer revoked since the ticket was
    // issued would get back in: every handshake is a full one (connections are long-lived).
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(config_error("client"))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config());
    Ok(config)
}

/// `inner` (the CA check) followed by the revocation check: a client whose certificate is revoked fails its
/// handshake (`CertificateError::Revoked`). Used by the peer port and the HTTP API.
pub(crate) fn refusing_revoked_clients(
    inner: Arc<dyn ClientCertVerifier>,
    revocations: &Revocations,
) -> Arc<dyn ClientCertVerifier> {
    Arc::new(RevokingClientVerifier { inner, revocations: revocations.clone() })
}

/// A server that issues no session tickets and keeps no session cache: a resumed handshake does
/// not run the client verifier, so a client revoked since would get back in with its ticket.
pub(crate) fn refuse_resumption(tls: &mut rustls::ServerConfig) {
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
}

fn refuse_revoked(revocations: &Revocations, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    match revocations.covering(end_entity) {
        Some(_) => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)),
        None => Ok(()),
    }
}

#[derive(Debug)]
struct RevokingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
}

impl ClientCertVerifier for RevokingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        refuse_revoked(&self.revocations, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct RevokingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    revocations: Revocations,
}

impl ServerCertVerifier for RevokingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        refuse_revoked(&self.revocations, end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The cluster CA as the only trust root: no system roots, so a certificate from any public CA is refused.
fn ca_roots(identity: &TlsIdentity, side: &'static str) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca_cert().clone()).map_err(config_error(side))?;
    Ok(Arc::new(roots))
}

/// The peer's end-entity certificate of an established connection; `None` before the handshake completes or if the
/// peer presented none (which our configs never allow).
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS))));
    // A peer's budget on one connection: a few unidirectional streams (we use one per
    // channel), no bidirectional ones, and a bounded window of bytes in flight.
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(PEER_STREAMS_MAX));
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    transport.receive_window(quinn::VarInt::from_u32(PEER_RECEIVE_WINDOW_BYTES));
    Arc::new(transport)
}

fn config_error<E>(side: &'static str) -> impl FnOnce(E) -> TlsConfigError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |error| TlsConfigError { side, source: Box::new(error) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::SERVER_NAME;
    use crate::pki::ca::init_ca;
    use crate::pki::identity::{enrolled, forged, verify_node_identity};
    use quinn::{ConnectionError, Endpoint};
    use std::net::SocketAddr;
    use tokio::time::timeout;

    /// Bounds every network await in these tests; a handshake on loopback takes milliseconds.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn server(identity: &TlsIdentity) -> (Endpoint, SocketAddr) {
        let endpoint = Endpoint::server(server_config(identity).unwrap(), loopback()).unwrap();
        let address = endpoint.local_addr().unwrap();
        (endpoint, address)
    }

    fn connect(identity: &TlsIdentity, address: SocketAddr) -> (Endpoint, quinn::Connecting) {
        let endpoint = Endpoint::client(loopback()).unwrap();
        let connecting = endpoint.connect_with(client_config(identity).unwrap(), address, SERVER_NAME).unwrap();
        (endpoint, connecting)
    }

    #[tokio::test]
    async fn nodes_from_one_ca_handshake_and_exchange_bytes() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        init_ca(&ca_dir).unwrap();
        let server_identity = enrolled(&ca_dir, root.path(), "server-id");
        let client_identity = enrolled(&ca_dir, root.path(), "client-id");
        let (server_endpoint, address) = server(&server_identity);
        let (_client_endpoint, connecting) = connect(&client_identity, address);

        let server_side = async {
            let incoming = server_endpoint.accept().await.unwrap();
            let conn = incoming.await.unwrap();
            let client_cert = peer_certificate(&conn).unwrap();
            verify_node_identity(&client_cert, "client-id").unwrap();
            assert!(verify_node_identity(&client_cert, "other").is_err());
            let mut recv = conn.accept_uni().await.unwrap();
            let bytes = recv.read_to_end(1024).await.unwrap();
            conn.close(0u32.into(), b"done");
            bytes
        };
        let client_side = async {
            let conn = connecting.await.unwrap();
            let server_cert = peer_certificate(&conn).unwrap();
            verify_node_identity(&server_cert, "server-id").unwrap();
            assert!(verify_node_identity(&server_cert, "client-id").is_err());
            let handshake = conn.handshake_data().unwrap().downcast::<quinn::crypto::rustls::HandshakeData>().unwrap();
            assert_eq!(handshake.protocol.as_deref(), Some(ALPN));
            let mut send = conn.open_uni().await.unwrap();
            send.write_all(b"hello").await.unwrap();
            send.finish().unwrap();
            // The server closes once it has read everything; waiting for that keeps the stream alive until then.
            conn.closed().await
        };
        let (bytes, close_reason) =
            timeout(TEST_TIMEOUT, async { tokio::join!(server_side, client_side) }).await.unwrap();
        assert_eq!(bytes, b"hello");
        assert!(matches!(close_reason, ConnectionError::ApplicationClosed(_)), "{close_reason:?}");
    }

    #[tokio::test]
    async fn refuses_client_with_certificate_from_another_ca() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        init_ca(&ca_dir).unwrap();
        let server_identity = enrolled(&ca_dir, root.path(), "server-id");
        let rogue_client = forged(root.path(), "client-id", &server_identity);
        let (server_endpoint, address) = server(&server_identity);
        let (_client_endpoint, connecting) = connect(&rogue_client, address);

        let server_side = async {
            let incoming = server_endpoint.accept().await.unwrap();
            incoming.await
        };
        let client_side = async {
            // In TLS 1.3 the client finishes its side of the handshake before the server has checked the client
            // certificate, so the refusal may arrive as a failed handshake or as the connection closing afterwards.
            match connecting.await {
                Err(error) => error,
                Ok(conn) => {
                    if let Ok(mut send) = conn.open_uni().await {
                        let _ = send.write_all(b"injected").await;
                        let _ = send.finish();
                    }
                    conn.closed().await
                }
            }
        };
        let (accepted, client_error) =
            timeout(TEST_TIMEOUT, async { tokio::join!(server_side, client_side) }).await.unwrap();
        assert!(accepted.is_err(), "server accepted a client from another CA");
        assert!(!matches!(client_error, ConnectionError::ApplicationClosed(_)), "{client_error:?}");
    }

    #[tokio::test]
    async fn refuses_server_with_certificate_from_another_ca() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        init_ca(&ca_dir).unwrap();
        let client_identity = enrolled(&ca_dir, root.path(), "client-id");
        let rogue_server = forged(root.path(), "server-id", &client_identity);
        let (server_endpoint, address) = server(&rogue_server);
        let (_client_endpoint, connecting) = connect(&client_identity, address);

        let server_side = async {
            let incoming = server_endpoint.accept().await.unwrap();
            incoming.await
        };
        let (accepted, connected) =
            timeout(TEST_TIMEOUT, async { tokio::join!(server_side, connecting) }).await.unwrap();
        let client_error = connected.err().unwrap();
        assert!(client_error.to_string().contains("invalid peer certificate: UnknownIssuer"), "{client_error}");
        assert!(accepted.is_err());
    }
}
