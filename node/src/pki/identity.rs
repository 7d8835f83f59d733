//! A node's credentials: `load_identity` reads and checks them at start-up into a `TlsIdentity`, and
//! `verify_node_identity` checks that a peer's certificate names the node the caller expected.

use std::path::Path;

use konor_sdk::Secret;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::files::{parse_cert, parse_key, read_optional};
use super::revocation::Revocations;
use super::{
    CA_CERT_FILE, NODE_CERT_FILE, NODE_ID_FILE, NODE_KEY_FILE, PkiError, check_key_matches, identity_name, unreadable,
    validate_node_id, verify_chain,
};

/// A node's verified TLS credentials: its certificate and key, the cluster CA, and the node id they belong to; and
/// what it trusts under the CA: every certificate from it but the revoked ones ([`Revocations`]; none until the
/// daemon gives it its stored set with [`TlsIdentity::with_revocations`]).
pub struct TlsIdentity {
    node_id: String,
    cert: CertificateDer<'static>,
    key: Secret<PrivateKeyDer<'static>>,
    ca_cert: CertificateDer<'static>,
    revocations: Revocations,
}

// Hand-written so the certificate bytes do not fill a log line; the key is a `Secret`.
impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").field("node_id", &self.node_id).field("key", &self.key).finish_non_exhaustive()
    }
}

/// Loads `node.id`, `node.crt`, `node.key` and `ca.crt` from `tls_dir`, and checks that the certificate chains to the
/// CA, is valid now, names the node id, and matches the key; a node with broken credentials fails at start-up, not
/// at its first handshake.
pub fn load_identity(tls_dir: &Path) -> Result<TlsIdentity, PkiError> {
    let id_path = tls_dir.join(NODE_ID_FILE);
    let cert_path = tls_dir.join(NODE_CERT_FILE);
    let key_path = tls_dir.join(NODE_KEY_FILE);
    let ca_path = tls_dir.join(CA_CERT_FILE);
    let missing = |file| PkiError::NoIdentity { dir: tls_dir.to_owned(), file };
    let id_bytes = read_optional(&id_path)?.ok_or_else(|| missing(NODE_ID_FILE))?;
    let cert_bytes = read_optional(&cert_path)?.ok_or_else(|| missing(NODE_CERT_FILE))?;
    let key_bytes = Secret::new(read_optional(&key_path)?.ok_or_else(|| missing(NODE_KEY_FILE))?);
    let ca_bytes = read_optional(&ca_path)?.ok_or_else(|| missing(CA_CERT_FILE))?;

    let node_id = String::from_utf8(id_bytes)
        .map_err(|error| unreadable(&id_path, "node id", error))?
        .trim_end_matches('\n')
        .to_owned();
    validate_node_id(&node_id).map_err(|error| unreadable(&id_path, "node id", error))?;
    let cert = parse_cert(&cert_path, &cert_bytes)?;
    let ca_cert = parse_cert(&ca_path, &ca_bytes)?;
    let key = Secret::new(parse_key(&key_path, key_bytes.expose())?);

    verify_chain(&cert, &ca_cert).map_err(|reason| PkiError::Untrusted {
        cert_path: cert_path.clone(),
        ca_path: ca_path.clone(),
        reason,
    })?;
    if verify_node_identity(&cert, &node_id).is_err() {
        return Err(PkiError::CertNotForNode { cert_path, node_id });
    }
    check_key_matches(&cert, key.expose(), &cert_path, &key_path)?;
    let revocations = Revocations::in_memory(ca_cert.clone());
    Ok(TlsIdentity { node_id, cert, key, ca_cert, revocations })
}

impl TlsIdentity {
    /// The node id these credentials were issued for.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The node's certificate.
    pub(crate) fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The node's private key (never logged: [`TlsIdentity`]'s `Debug` leaves it out).
    pub(crate) fn key(&self) -> &PrivateKeyDer<'static> {
        self.key.expose()
    }

    /// The cluster CA's certificate.
    pub(crate) fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// The revocations its TLS configs and gossip seal enforce.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// These credentials enforcing `revocations` (the set loaded from the data dir).
    pub fn with_revocations(mut self, revocations: Revocations) -> TlsIdentity {
        self.revocations = revocations;
        self
    }
}

pub use super::identity_of;

/// Checks that a certificate, already verified against the cluster CA by the handshake, names node `node_id`.
///
/// The handshake proves only cluster membership (every node answers to [`SERVER_NAME`](super::SERVER_NAME)); this
/// proves the peer is the node the caller meant, since the CA issues `<node_id>.node.konor` to that node alone.
pub fn verify_node_identity(cert: &CertificateDer<'_>, node_id: &str) -> Result<(), PkiError> {
    validate_node_id(node_id)?;
    let peer_not_node = |reason| PkiError::PeerNotNode { node_id: node_id.to_owned(), reason };
    let end_entity = webpki::EndEntityCert::try_from(cert).map_err(peer_not_node)?;
    let name = ServerName::try_from(identity_name(node_id))
        .map_err(|_| peer_not_node(webpki::Error::MalformedDnsIdentifier))?;
    end_entity.verify_is_valid_for_subject_name(&name).map_err(peer_not_node)
}

/// Issues `node_id` from the CA in `ca_dir` into `root/node_id` and loads it.
#[cfg(test)]
pub(crate) fn enrolled(ca_dir: &Path, root: &Path, node_id: &str) -> TlsIdentity {
    let out_dir = root.join(node_id);
    super::ca::issue_node_cert(ca_dir, node_id, &out_dir).unwrap();
    load_identity(&out_dir).unwrap()
}

/// Credentials from a foreign CA that nonetheless trust `trusted_ca`: the attacker knows the cluster CA
/// certificate (it is public) but cannot get a certificate signed by it.
#[cfg(test)]
pub(crate) fn forged(root: &Path, node_id: &str, trusted_ca: &TlsIdentity) -> TlsIdentity {
    let rogue_ca = root.join("rogue-ca");
    super::ca::init_ca(&rogue_ca).unwrap();
    let rogue = enrolled(&rogue_ca, &root.join("rogue"), node_id);
    TlsIdentity {
        ca_cert: trusted_ca.ca_cert.clone(),
        revocations: Revocations::in_memory(trusted_ca.ca_cert.clone()),
        ..rogue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ca::{init_ca, issue_node_cert};
    use crate::pki::{SERVER_NAME, message};
    use expect_test::expect;
    use std::fs;

    // Two tests of issuing live here because they load what was issued: `ca.rs` must not use this module.
    #[test]
    fn issue_node_cert_refuses_to_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        let out_dir = root.path().join("node");
        init_ca(&ca_dir).unwrap();
        issue_node_cert(&ca_dir, "node-1", &out_dir).unwrap();
        let error = issue_node_cert(&ca_dir, "node-2", &out_dir).unwrap_err();
        expect![[
            r#"file exists: DIR/node/node.crt (refusing to overwrite); move it away or choose another directory"#
        ]]
        .assert_eq(&message(error, root.path()));
        assert_eq!(load_identity(&out_dir).unwrap().node_id(), "node-1");
    }

    #[test]
    fn issue_node_cert_into_the_ca_directory_keeps_the_ca() {
        let root = tempfile::tempdir().unwrap();
        init_ca(root.path()).unwrap();
        issue_node_cert(root.path(), "node-1", root.path()).unwrap();
        assert_eq!(load_identity(root.path()).unwrap().node_id(), "node-1");
    }

    #[test]
    fn node_certificate_carries_both_names() {
        let root = tempfile::tempdir().unwrap();
        init_ca(&root.path().join("ca")).unwrap();
        let identity = enrolled(&root.path().join("ca"), root.path(), "node-1");
        let end_entity = webpki::EndEntityCert::try_from(&identity.cert).unwrap();
        for name in [SERVER_NAME.to_owned(), identity_name("node-1")] {
            end_entity.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap()).unwrap();
        }
        verify_node_identity(&identity.cert, "node-1").unwrap();
        let error = verify_node_identity(&identity.cert, "node-2").unwrap_err();
        expect![[r#"peer certificate is not for node 'node-2' (CertNotValidForName(InvalidNameContext { expected: DnsName("node-2.node.konor"), presented: ["DnsName(\"konor-node\")", "DnsName(\"node-1.node.konor\")"] })); the peer is another node: check the address configured for 'node-2'"#]].assert_eq(&error.to_string());
    }

    #[test]
    fn load_identity_refuses_a_certificate_for_another_node() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        let out_dir = root.path().join("node");
        init_ca(&ca_dir).unwrap();
        issue_node_cert(&ca_dir, "node-1", &out_dir).unwrap();
        fs::write(out_dir.join(NODE_ID_FILE), "node-2\n").unwrap();
        let error = load_identity(&out_dir).unwrap_err();
        expect!["certificate in DIR/node/node.crt is not for node 'node-2' (it lacks the name node-2.node.konor); issue a certificate for 'node-2' or correct node.id"].assert_eq(&message(error, root.path()));
    }

    #[test]
    fn load_identity_refuses_a_certificate_from_another_ca() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        let other_ca_dir = root.path().join("other-ca");
        let out_dir = root.path().join("node");
        init_ca(&ca_dir).unwrap();
        init_ca(&other_ca_dir).unwrap();
        issue_node_cert(&ca_dir, "node-1", &out_dir).unwrap();
        fs::copy(other_ca_dir.join(CA_CERT_FILE), out_dir.join(CA_CERT_FILE)).unwrap();
        let error = load_identity(&out_dir).unwrap_err();
        expect!["certificate in DIR/node/node.crt is not valid under the CA in DIR/node/ca.crt (UnknownIssuer); issue a new certificate from this cluster's CA"].assert_eq(&message(error, root.path()));
    }

    #[test]
    fn load_identity_refuses_a_key_for_another_certificate() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        init_ca(&ca_dir).unwrap();
        issue_node_cert(&ca_dir, "node-1", &root.path().join("node-1")).unwrap();
        issue_node_cert(&ca_dir, "node-2", &root.path().join("node-2")).unwrap();
        fs::copy(root.path().join("node-2").join(NODE_KEY_FILE), root.path().join("node-1").join(NODE_KEY_FILE))
            .unwrap();
        let error = load_identity(&root.path().join("node-1")).unwrap_err();
        expect!["the key in DIR/node-1/node.key does not belong to the certificate in DIR/node-1/node.crt; restore the matching pair or issue new credentials"].assert_eq(&message(error, root.path()));
    }

    #[test]
    fn load_identity_names_the_missing_file() {
        let root = tempfile::tempdir().unwrap();
        let error = load_identity(root.path()).unwrap_err();
        expect!["no node credentials in DIR: node.id is missing; issue this node's certificate from the cluster CA into DIR first"].assert_eq(&message(error, root.path()));
    }
}
