//! TLS for the HTTP API: the node's own certificate as the server's, and client certificates
//! from the cluster CA, which are asked for but not required at the handshake (a load balancer's
//! health check and a Prometheus scrape may come without one); the routes that read or change
//! configuration refuse a caller without one (`routes.rs`). A revoked certificate is refused at
//! the handshake, as on the peer port.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;

use crate::peer::tls::TlsConfigError;
use crate::pki::crypto_provider;
use crate::pki::identity::{TlsIdentity, identity_of};
use crate::wall_clock::WallTime;

/// The only application protocol served: HTTP/1.1.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The server config: TLS 1.3 and 1.2 (curl, browsers and Prometheus all speak one of them),
/// the node's certificate, and the cluster CA as the only root for client certificates.
pub fn server_config(identity: &TlsIdentity) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = crypto_provider();
    let mut roots = RootCertStore::empty();
    roots.add(identity.ca_cert().clone()).map_err(TlsConfigError::http)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(TlsConfigError::http)?;
    let verifier = crate::peer::tls::refusing_revoked_clients(verifier, identity.revocations());
    let mut config = rustls::ServerConfig::builder_with_details(provider, Arc::new(WallTime))
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::http)?
        .with_client_cert_verifier(verifier)
        // The chain carries the CA certificate: a host enrolling with a join token has no CA
        // yet, and checks this one against the token's pin (`enroll/client.rs`).
        .with_single_cert(vec![identity.cert().clone(), identity.ca_cert().clone()], identity.key().clone_key())
        .map_err(TlsConfigError::http)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    crate::peer::tls::refuse_resumption(&mut config);
    Ok(Arc::new(config))
}

/// Who is calling, from the certificate chain the handshake verified: `None` without one.
pub fn caller_identity(chain: Option<&[CertificateDer<'static>]>) -> Option<String> {
    chain?.first().and_then(identity_of)
}
