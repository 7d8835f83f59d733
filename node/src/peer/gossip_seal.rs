//! Gossip that only its owner can write (issue 12). Every value a node gossips carries its
//! signature over what it says and where: the cluster, the node's id, generation and address,
//! the key, the version chitchat gives it, and the value. A node's first key, [`CERT_KEY`], is
//! its certificate from the cluster CA, itself signed this way, so a peer that holds nothing of
//! a node yet can check everything it is told about it. A relay cannot change a value, move it
//! to another version or generation, or invent a node: [`super::gossip_filter`] drops what does
//! not verify before chitchat sees it.
//!
//! A [`GossipSeal`] signs and checks. [`CertSeal`] does it with the node's TLS key and the
//! cluster CA (production). [`SimSeal`] stands in for it in the simulator, whose nodes have no
//! certificates and whose peers are never hostile: a keyed hash that anyone could forge, with
//! the same checks around it.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;
use chitchat::ChitchatId;
use rustls::SignatureScheme;
use rustls_pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};

use crate::pki::identity::{TlsIdentity, verify_node_identity};

/// The key under which a node gossips its certificate. Published first, so it has version 1.
pub const CERT_KEY: &str = "cert";

/// The key of a node's signed beat: its chitchat heartbeat at the time, republished every
/// [`super::membership::BEAT_GOSSIP_INTERVALS`] gossip periods. chitchat's heartbeats cannot be
/// signed (they ride in digests), so a relay could forge them; the beat is the signed evidence
/// that the node is alive, and it bounds how far ahead a relayed heartbeat may be.
pub const BEAT_KEY: &str = "beat";

/// Separates a value's payload from its signature. The payloads we gossip are printable text.
pub const SEAL_SEPARATOR: char = '\u{1f}';

/// Signs this node's gossip and checks other nodes'.
pub trait GossipSeal: Send + Sync + std::fmt::Debug {
    /// This node's certificate, as gossiped under [`CERT_KEY`].
    fn own_cert(&self) -> String;
    /// Signs `message` with this node's key.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
    /// Checks that `cert` (a [`CERT_KEY`] payload) was issued by the cluster to `node_id`;
    /// returns what [`GossipSeal::verify`] needs.
    fn accept_cert(&self, node_id: &str, cert: &str) -> Option<PeerCert>;
    /// Checks `signature` over `message` against an accepted certificate.
    fn verify(&self, cert: &PeerCert, message: &[u8], signature: &[u8]) -> bool;
    /// A number that moves whenever a certificate is revoked (the filter then checks the
    /// certificates it holds again with [`GossipSeal::revoked`]).
    fn revocation_generation(&self) -> u64 {
        0
    }
    /// Whether an accepted certificate has been revoked since.
    fn revoked(&self, _cert: &PeerCert) -> bool {
        false
    }
}

/// A certificate accepted by [`GossipSeal::accept_cert`]: opaque to everyone else.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerCert(Arc<[u8]>);

impl std::fmt::Debug for PeerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerCert").field("bytes", &self.0.len()).finish()
    }
}

/// The bytes a value's signature covers. Every field is length-prefixed, so no two different
/// statements share bytes.
pub fn signed_bytes(cluster: &str, id: &ChitchatId, key: &str, version: u64, payload: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64 + cluster.len() + id.node_id.len() + key.len() + payload.len());
    let mut field = |data: &[u8]| {
        bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
        bytes.extend_from_slice(data);
    };
    field(b"konor-gossip-v1");
    field(cluster.as_bytes());
    field(id.node_id.as_bytes());
    field(&id.generation_id.to_le_bytes());
    // The address as chitchat's wire carries it: IP and port (a V6 scope id does not travel).
    let addr = id.gossip_advertise_addr;
    field(format!("{}:{}", addr.ip(), addr.port()).as_bytes());
    field(key.as_bytes());
    field(&version.to_le_bytes());
    field(payload.as_bytes());
    bytes
}

/// A value as gossiped: `payload`, the separator, the signature in base64.
pub fn seal_value(
    seal: &dyn GossipSeal,
    cluster: &str,
    id: &ChitchatId,
    key: &str,
    version: u64,
    payload: &str,
) -> String {
    let signature = seal.sign(&signed_bytes(cluster, id, key, version, payload));
    format!("{payload}{SEAL_SEPARATOR}{}", BASE64.encode(signature))
}

/// Splits a gossiped value into payload and signature (`None`: no signature).
pub fn split_value(value: &str) -> Option<(&str, Vec<u8>)> {
    let (payload, signature) = value.rsplit_once(SEAL_SEPARATOR)?;
    Some((payload, BASE64.decode(signature).ok()?))
}

/// The payload of a gossiped value (the whole value if it carries no signature: this node's
/// view only ever holds values the filter checked).
pub fn payload(value: &str) -> &str {
    value.rsplit_once(SEAL_SEPARATOR).map_or(value, |(payload, _)| payload)
}

/// Checks a sealed value of `id` against its certificate.
pub fn verify_value(
    seal: &dyn GossipSeal,
    cert: &PeerCert,
    cluster: &str,
    id: &ChitchatId,
    key: &str,
    version: u64,
    value: &str,
) -> bool {
    let Some((payload, signature)) = split_value(value) else { return false };
    seal.verify(cert, &signed_bytes(cluster, id, key, version, payload), &signature)
}

/// The production seal: the node's TLS key signs, certificates chain to the cluster CA.
pub struct CertSeal {
    cert: CertificateDer<'static>,
    ca_cert: CertificateDer<'static>,
    /// The node's private key, loaded to sign.
    signer: konor_sdk::Secret<Box<dyn rustls::sign::Signer>>,
    /// Certificates no longer trusted (the identity's).
    revocations: crate::pki::revocation::Revocations,
}

impl std::fmt::Debug for CertSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSeal").field("signer", &self.signer).finish_non_exhaustive()
    }
}

/// The signature schemes a node key may sign gossip with (rcgen makes P-256 keys).
const SCHEMES: [SignatureScheme; 3] =
    [SignatureScheme::ECDSA_NISTP256_SHA256, SignatureScheme::ECDSA_NISTP384_SHA384, SignatureScheme::ED25519];

/// The verification algorithms matching [`SCHEMES`].
const ALGORITHMS: [&dyn rustls_pki_types::SignatureVerificationAlgorithm; 3] =
    [webpki::ring::ECDSA_P256_SHA256, webpki::ring::ECDSA_P384_SHA384, webpki::ring::ED25519];

impl CertSeal {
    /// The seal of a loaded identity; fails if its key cannot sign gossip.
    pub fn new(identity: &TlsIdentity) -> anyhow::Result<CertSeal> {
        let provider = rustls::crypto::ring::default_provider();
        let key = provider
            .key_provider
            .load_private_key(identity.key().clone_key())
            .map_err(|error| anyhow::anyhow!("the node key cannot sign gossip: {error}"))?;
        let signer = key.choose_scheme(&SCHEMES).ok_or_else(|| {
            anyhow::anyhow!("the node key is not ECDSA P-256/P-384 or Ed25519; it cannot sign gossip")
        })?;
        Ok(CertSeal {
            cert: identity.cert().clone(),
            ca_cert: identity.ca_cert().clone(),
            signer: konor_sdk::Secret::new(signer),
            revocations: identity.revocations().clone(),
        })
    }
}

impl GossipSeal for CertSeal {
    fn own_cert(&self) -> String {
        BASE64.encode(self.cert.as_ref())
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        // ring's signers fail only on a broken key, which load_identity has ruled out; an empty
        // signature would just be refused by every peer.
        self.signer.expose().sign(message).unwrap_or_default()
    }

    fn accept_cert(&self, node_id: &str, cert: &str) -> Option<PeerCert> {
        let der = CertificateDer::from(BASE64.decode(cert).ok()?);
        let anchors = [webpki::anchor_from_trusted_cert(&self.ca_cert).ok()?];
        let end_entity = webpki::EndEntityCert::try_from(&der).ok()?;
        let now = crate::wall_clock::unix_time();
        end_entity
            .verify_for_usage(&ALGORITHMS, &anchors, &[], now, webpki::KeyUsage::client_auth(), None, None)
            .ok()?;
        verify_node_identity(&der, node_id).ok()?;
        Some(PeerCert(Arc::from(der.as_ref())))
    }

    fn revocation_generation(&self) -> u64 {
        self.revocations.generation()
    }

    fn revoked(&self, cert: &PeerCert) -> bool {
        self.revocations.covering(&CertificateDer::from(&cert.0[..])).is_some()
    }

    fn verify(&self, cert: &PeerCert, message: &[u8], signature: &[u8]) -> bool {
        let der = CertificateDer::from(&cert.0[..]);
        let Ok(end_entity) = webpki::EndEntityCert::try_from(&der) else { return false };
        ALGORITHMS.iter().any(|algorithm| end_entity.verify_signature(*algorithm, message, signature).is_ok())
    }
}

/// The simulator's seal: a keyed hash whose key is the node id. It keeps every check of the
/// production path (a value must be signed for its node, version and generation) without the
/// cost of public-key signatures on thousands of simulated nodes; it is no defence against a
/// hostile peer, and the simulator has none.
#[derive(Debug, Clone)]
pub struct SimSeal {
    node_id: String,
}

impl SimSeal {
    /// The seal of simulated node `node_id`.
    pub fn new(node_id: &str) -> SimSeal {
        SimSeal { node_id: node_id.to_owned() }
    }

    fn mac(node_id: &str, message: &[u8]) -> Vec<u8> {
        let mut hash = Sha256::new();
        hash.update(b"konor-sim-seal\0");
        hash.update(node_id.as_bytes());
        hash.update([0]);
        hash.update(message);
        hash.finalize()[..16].to_vec()
    }
}

impl GossipSeal for SimSeal {
    fn own_cert(&self) -> String {
        format!("sim:{}", self.node_id)
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        SimSeal::mac(&self.node_id, message)
    }

    fn accept_cert(&self, node_id: &str, cert: &str) -> Option<PeerCert> {
        (cert.strip_prefix("sim:") == Some(node_id)).then(|| PeerCert(Arc::from(node_id.as_bytes())))
    }

    fn verify(&self, cert: &PeerCert, message: &[u8], signature: &[u8]) -> bool {
        let Ok(node_id) = std::str::from_utf8(&cert.0) else { return false };
        SimSeal::mac(node_id, message) == signature
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn id(name: &str, generation: u64) -> ChitchatId {
        ChitchatId::new(name.to_owned(), generation, SocketAddr::from(([10, 0, 0, 1], 7400)))
    }

    fn identity(ca: &std::path::Path, root: &std::path::Path, node: &str) -> TlsIdentity {
        let dir = root.join(node);
        crate::pki::ca::issue_node_cert(ca, node, &dir).unwrap();
        crate::pki::identity::load_identity(&dir).unwrap()
    }

    #[test]
    fn a_value_verifies_only_as_signed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        crate::pki::ca::init_ca(&ca).unwrap();
        let n1 = CertSeal::new(&identity(&ca, dir.path(), "n1")).unwrap();
        let n2 = CertSeal::new(&identity(&ca, dir.path(), "n2")).unwrap();
        let n1_cert = n2.accept_cert("n1", &n1.own_cert()).expect("n1's certificate is from the cluster CA");
        assert!(n2.accept_cert("n2", &n1.own_cert()).is_none(), "n1's certificate does not name n2");
        let value = seal_value(&n1, "c", &id("n1", 1), "grp:a", 5, "digest;1;2");
        assert!(verify_value(&n2, &n1_cert, "c", &id("n1", 1), "grp:a", 5, &value));
        assert_eq!(payload(&value), "digest;1;2");
        // Moved to another version, generation, key or cluster, or changed: refused.
        assert!(!verify_value(&n2, &n1_cert, "c", &id("n1", 1), "grp:a", 6, &value));
        assert!(!verify_value(&n2, &n1_cert, "c", &id("n1", 2), "grp:a", 5, &value));
        assert!(!verify_value(&n2, &n1_cert, "c", &id("n1", 1), "grp:b", 5, &value));
        assert!(!verify_value(&n2, &n1_cert, "other", &id("n1", 1), "grp:a", 5, &value));
        let forged = value.replacen("digest;1;2", "digest;1;3", 1);
        assert!(!verify_value(&n2, &n1_cert, "c", &id("n1", 1), "grp:a", 5, &forged));
        // Signed by n2 but claimed for n1: refused.
        let by_n2 = seal_value(&n2, "c", &id("n1", 1), "grp:a", 5, "digest;1;2");
        assert!(!verify_value(&n2, &n1_cert, "c", &id("n1", 1), "grp:a", 5, &by_n2));
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other_ca) = (dir.path().join("ca"), dir.path().join("other-ca"));
        crate::pki::ca::init_ca(&ca).unwrap();
        crate::pki::ca::init_ca(&other_ca).unwrap();
        let n1 = CertSeal::new(&identity(&ca, dir.path(), "n1")).unwrap();
        let rogue_dir = dir.path().join("rogue");
        std::fs::create_dir_all(&rogue_dir).unwrap();
        let rogue = CertSeal::new(&identity(&other_ca, &rogue_dir, "n2")).unwrap();
        assert!(n1.accept_cert("n2", &rogue.own_cert()).is_none());
        assert!(n1.accept_cert("n2", "not base64!").is_none());
    }

    #[test]
    fn a_scoped_ipv6_address_verifies_as_the_wire_carries_it() {
        use std::net::{Ipv6Addr, SocketAddrV6};
        let scoped = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 7400, 0, 3));
        let wired = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 7400, 0, 0));
        let seal = SimSeal::new("n1");
        let cert = seal.accept_cert("n1", &seal.own_cert()).unwrap();
        let signed = seal_value(&seal, "c", &ChitchatId::new("n1".to_owned(), 1, scoped), "k", 1, "v");
        assert!(verify_value(&seal, &cert, "c", &ChitchatId::new("n1".to_owned(), 1, wired), "k", 1, &signed));
    }

    #[test]
    fn the_simulators_seal_checks_the_same_fields() {
        let (n1, n2) = (SimSeal::new("n1"), SimSeal::new("n2"));
        let cert = n2.accept_cert("n1", &n1.own_cert()).unwrap();
        assert!(n2.accept_cert("n2", &n1.own_cert()).is_none());
        let value = seal_value(&n1, "c", &id("n1", 1), "k", 1, "v");
        assert!(verify_value(&n2, &cert, "c", &id("n1", 1), "k", 1, &value));
        assert!(!verify_value(&n2, &cert, "c", &id("n1", 1), "k", 2, &value));
    }
}
