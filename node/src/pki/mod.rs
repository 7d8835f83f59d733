//! The cluster PKI: the cluster CA, node certificates, the files that hold them, and the rules for node ids.
//!
//! Every peer connection is QUIC with TLS 1.3 where both sides present a certificate issued by the cluster CA, so a
//! host without credentials from this cluster can neither join nor inject state (SPEC F22). Each node certificate
//! carries two DNS names: [`SERVER_NAME`], which every node answers to so a dialer need not know whom it reaches
//! before the handshake, and [`identity_name`], which names exactly one node; after the handshake the shell checks the
//! peer's certificate against the node id it expects with [`identity::verify_node_identity`]. The quinn configs built
//! on these credentials live in `peer/tls.rs`.
//!
//! [`ca`] creates the CA, issues node certificates and signs revocations (and, on a node holding the CA key, issues
//! them to enrolling hosts), [`join_token`] mints and checks the tokens hosts enroll with, [`identity`] loads and
//! checks a node's credentials, [`revocation`] holds the revocations a node enforces (with [`cert_facts`], the serial and start a
//! certificate carries), and `files` reads and writes the credential files; this module holds what they share.

pub mod ca;
pub mod cert_facts;
mod files;
pub mod identity;
pub mod join_token;
pub mod revocation;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The DNS name every node certificate carries and every dialer asks for: a dialer knows an address, not yet which
/// node answers there, so the handshake proves cluster membership and [`identity::verify_node_identity`] proves the
/// node.
pub const SERVER_NAME: &str = "konor-node";

/// Longest node id, in characters. Node ids travel in every gossip digest and every peer message header, so they
/// must stay short; 32 still fits a hostname or a UUID without dashes.
pub const NODE_ID_CHARS_MAX: usize = 32;

/// The CA certificate (PEM), shared by the CA directory and every node's TLS directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA private key (PEM, mode 0600); only the CA directory holds it.
pub const CA_KEY_FILE: &str = "ca.key";
/// The node certificate (PEM).
pub const NODE_CERT_FILE: &str = "node.crt";
/// The node private key (PEM, mode 0600).
pub const NODE_KEY_FILE: &str = "node.key";
/// The node id the certificate was issued for, as text; X.509 parsing is not available here, so the id is stored
/// beside the certificate and [`identity::load_identity`] checks the certificate really names it.
pub const NODE_ID_FILE: &str = "node.id";

/// Suffix of a node's identity name; `.konor` is not a public top-level domain, so no public CA issues these names.
const IDENTITY_NAME_SUFFIX: &str = ".node.konor";

/// Why a PKI operation failed. Every operation that writes files either writes all of them or none.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The node id breaks the naming rules; nothing was written.
    #[error(
        "invalid node id '{node_id}': {reason}; use 1 to {NODE_ID_CHARS_MAX} characters of a-z, 0-9 and '-', \
         not starting or ending with '-'"
    )]
    InvalidNodeId { node_id: String, reason: String },

    /// The CA directory lacks `ca.crt` or `ca.key`; nothing was written.
    #[error("no CA in {dir}: run `konorctl ca init --dir {dir}` first", dir = .dir.display())]
    NoCa { dir: PathBuf },

    /// The TLS directory lacks one of the node's credential files; nothing changed.
    #[error(
        "no node credentials in {dir}: {file} is missing; issue this node's certificate from the cluster CA \
         into {dir} first",
        dir = .dir.display()
    )]
    NoIdentity { dir: PathBuf, file: &'static str },

    /// A file this operation would write already exists; nothing was written.
    #[error("file exists: {} (refusing to overwrite); move it away or choose another directory", .path.display())]
    FileExists { path: PathBuf },

    /// The filesystem refused an operation; files this operation created were removed again.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A credential file does not hold what it should; nothing changed.
    #[error(
        "{} does not hold a valid {what} ({detail}); restore it from backup or issue new credentials",
        .path.display()
    )]
    Unreadable { path: PathBuf, what: &'static str, detail: String },

    /// A private key does not belong to the certificate beside it; nothing changed.
    #[error(
        "the key in {} does not belong to the certificate in {}; restore the matching pair or issue new credentials",
        .key_path.display(),
        .cert_path.display()
    )]
    KeyMismatch { key_path: PathBuf, cert_path: PathBuf },

    /// The CA files cannot issue certificates that chain to the CA certificate; nothing was written.
    #[error(
        "the CA in {} cannot issue valid certificates ({reason:?}); check that it was created by \
         `konorctl ca init` and has not expired",
        .dir.display()
    )]
    CaNotUsable { dir: PathBuf, reason: webpki::Error },

    /// A node certificate does not chain to the CA certificate beside it, or has expired; nothing changed.
    #[error(
        "certificate in {} is not valid under the CA in {} ({reason:?}); issue a new certificate from this \
         cluster's CA",
        .cert_path.display(),
        .ca_path.display()
    )]
    Untrusted { cert_path: PathBuf, ca_path: PathBuf, reason: webpki::Error },

    /// A node certificate does not carry the identity name of the node id stored beside it; nothing changed.
    #[error(
        "certificate in {} is not for node '{node_id}' (it lacks the name {node_id}{IDENTITY_NAME_SUFFIX}); \
         issue a certificate for '{node_id}' or correct {NODE_ID_FILE}",
        .cert_path.display()
    )]
    CertNotForNode { cert_path: PathBuf, node_id: String },

    /// A peer's certificate does not name the node the caller expected; the caller should close the connection.
    #[error(
        "peer certificate is not for node '{node_id}' ({reason:?}); the peer is another node: check the address \
         configured for '{node_id}'"
    )]
    PeerNotNode { node_id: String, reason: webpki::Error },

    /// rcgen could not generate a key or a certificate; nothing was written.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),

    /// The system clock is implausible, so certificates issued now would be wrong; nothing was written.
    #[error("the system clock reads {unix_seconds} seconds since 1970, before 2020 or after 2200; fix the clock first")]
    Clock { unix_seconds: u64 },
}

/// The identity a certificate, already verified against the cluster CA by the handshake, was issued to: the
/// `<id>` of its `<id>.node.konor` name (a node, or an operator given a certificate with `konorctl cert issue`).
/// `None` when it carries no such name.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<String> {
    let end_entity = webpki::EndEntityCert::try_from(cert).ok()?;
    end_entity
        .valid_dns_names()
        .filter_map(|name| name.strip_suffix(IDENTITY_NAME_SUFFIX))
        .find(|id| validate_node_id(id).is_ok())
        .map(str::to_owned)
}

/// The algorithms a CA key may sign statements with (rcgen makes P-256 keys).
const CA_ALGORITHMS: [&dyn rustls_pki_types::SignatureVerificationAlgorithm; 3] =
    [webpki::ring::ECDSA_P256_SHA256, webpki::ring::ECDSA_P384_SHA384, webpki::ring::ED25519];

/// Whether `signature` is the key of `ca_cert` signing `message` (a revocation, a signer's
/// proof that it holds the CA key).
pub fn verify_ca_signature(ca_cert: &CertificateDer<'_>, message: &[u8], signature: &[u8]) -> bool {
    let Ok(ca) = webpki::EndEntityCert::try_from(ca_cert) else { return false };
    CA_ALGORITHMS.iter().any(|algorithm| ca.verify_signature(*algorithm, message, signature).is_ok())
}

/// The pin of a CA certificate, as a join token carries it: SHA-256 of its DER, hex.
pub fn ca_pin(ca_cert: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(ca_cert.as_ref()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Checks a node id: 1..=[`NODE_ID_CHARS_MAX`] characters of `[a-z0-9-]`, not starting or ending with '-'.
///
/// The id becomes a DNS label in the certificate (`<id>.node.konor`), and DNS labels may neither start nor end with
/// a hyphen; lowercase only, because DNS names compare case-insensitively and two ids must never name one node.
pub fn validate_node_id(id: &str) -> Result<(), PkiError> {
    let invalid = |reason: String| Err(PkiError::InvalidNodeId { node_id: id.to_owned(), reason });
    if id.is_empty() {
        return invalid("it is empty".to_owned());
    }
    let chars = id.chars().count();
    if chars > NODE_ID_CHARS_MAX {
        return invalid(format!("it has {chars} characters, more than {NODE_ID_CHARS_MAX}"));
    }
    if let Some(bad) = id.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-')) {
        return invalid(format!("character {bad:?} is not allowed"));
    }
    if id.starts_with('-') {
        return invalid("it starts with '-'".to_owned());
    }
    if id.ends_with('-') {
        return invalid("it ends with '-'".to_owned());
    }
    Ok(())
}

/// The DNS name that identifies one node in its certificate: `<node_id>.node.konor`.
pub fn identity_name(node_id: &str) -> String {
    format!("{node_id}{IDENTITY_NAME_SUFFIX}")
}

/// The ring provider, passed explicitly to every builder: relying on a process-wide default would make the configs
/// depend on whichever crate installed one first.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies that `cert` chains to `ca_cert`, is valid now, and may act as both TLS server and TLS client.
fn verify_chain(cert: &CertificateDer<'_>, ca_cert: &CertificateDer<'_>) -> Result<(), webpki::Error> {
    let anchors = [webpki::anchor_from_trusted_cert(ca_cert)?];
    let end_entity = webpki::EndEntityCert::try_from(cert)?;
    let algorithms = crypto_provider().signature_verification_algorithms.all;
    let now = crate::wall_clock::unix_time();
    for usage in [webpki::KeyUsage::server_auth(), webpki::KeyUsage::client_auth()] {
        end_entity.verify_for_usage(algorithms, &anchors, &[], now, usage, None, None)?;
    }
    Ok(())
}

fn check_key_matches(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), PkiError> {
    match rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &crypto_provider()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(PkiError::KeyMismatch { key_path: key_path.to_owned(), cert_path: cert_path.to_owned() })
        }
        Err(error) => Err(unreadable(key_path, "private key", error)),
    }
}

fn unreadable(path: &Path, what: &'static str, detail: impl std::fmt::Display) -> PkiError {
    PkiError::Unreadable { path: path.to_owned(), what, detail: detail.to_string() }
}

/// Replaces the temporary directory in an error message so snapshots are stable.
#[cfg(test)]
fn message(error: PkiError, dir: &Path) -> String {
    error.to_string().replace(&dir.display().to_string(), "DIR")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_node_ids_at_the_limits() {
        for id in ["a", "0", "node-1", "a-b-c", &"z".repeat(NODE_ID_CHARS_MAX)] {
            validate_node_id(id).unwrap();
        }
    }
}
