//! Revocation of certificates (issue 17, item 2): a statement signed by the cluster CA's key
//! that a node's (or an operator's) certificates are no longer trusted, and the set of them a
//! node holds, checks every handshake and every gossiped certificate against, and keeps on disk.
//!
//! A revocation names an identity (`node`) and either one certificate (`serial`) or every
//! certificate of that identity issued up to `revoked_at_ms`. Issued means the certificate's
//! `notBefore` plus the [`ISSUE_SKEW_MS`] that `konorctl cert issue` sets it back by, so an
//! identity can be enrolled again after its revocation with a certificate issued later. Only the
//! holder of the CA key can sign one (`konorctl cert revoke` on the CA host); any node accepts
//! one from the socket, the HTTP API or a peer's gossip, checks the signature against the CA
//! certificate, stores it and gossips it on, so it reaches every node whichever node it entered
//! by and survives the loss of that node. A revocation cannot be withdrawn; it lapses once every
//! certificate it covers has expired ([`RETAINED_FOR_MS`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as BASE64;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::cert_facts::{SERIAL_HEX_CHARS_MAX, cert_facts};
use super::{PkiError, identity_of, validate_node_id};

/// Bytes of one signed revocation as text (JSON with its signature). A revocation is a node
/// id, a serial, two numbers, a reason and one ECDSA signature: about 350 bytes; the bound
/// keeps a gossiped value and a socket request small.
pub const REVOCATION_BYTES_MAX: usize = 1024;

/// Characters of a revocation's reason.
pub const REVOCATION_REASON_CHARS_MAX: usize = 200;

/// Revocations a node holds. Each is gossiped by every node, so the set costs the mesh
/// nodes × revocations values; revocations lapse with the certificates they cover (a year), and
/// 1,024 is far more than a fleet revokes in a year. A new one past the cap is refused with an
/// error, never by dropping an older one.
pub const REVOCATIONS_MAX: usize = 1024;

/// How far `konorctl cert issue` sets a certificate's `notBefore` before its issue time
/// (`CLOCK_SKEW_ALLOWANCE` in `ca.rs`): a certificate was issued at `notBefore` plus this.
pub const ISSUE_SKEW_MS: u64 = 60 * 60 * 1000;
const _: () = assert!(super::ca::CLOCK_SKEW_ALLOWANCE.as_millis() == ISSUE_SKEW_MS as u128);

/// A revocation is kept this long after it was made: past it every certificate it covers has
/// expired (node certificates are valid for a year from their `notBefore`, an hour before issue).
pub const RETAINED_FOR_MS: u64 = 366 * 24 * 60 * 60 * 1000;

/// The file in a node's data dir that holds its revocations.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// What a revocation says, before its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// The identity whose certificates are revoked (a node id, or an operator's name).
    pub node: String,
    /// One certificate's serial number (lowercase hex); absent: every certificate of `node`
    /// issued up to `revoked_at_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When it was made, in milliseconds since the Unix epoch (the revoking host's clock).
    pub revoked_at_ms: u64,
    /// Why, for the operators who read it later.
    #[serde(default)]
    pub reason: String,
}

/// A revocation with the CA's signature over it, as stored, sent and gossiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRevocation {
    /// The statement.
    #[serde(flatten)]
    pub revocation: Revocation,
    /// The CA key's signature over [`Revocation::signed_bytes`], base64 without padding.
    pub signature: String,
}

/// Why a revocation was refused; nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// Not a revocation: unreadable JSON, unknown fields, or over the byte bound.
    #[error("not a revocation: {0}")]
    Malformed(String),
    /// A field breaks its rule.
    #[error("invalid revocation: {0}")]
    Invalid(String),
    /// The signature is not the cluster CA's.
    #[error(
        "the revocation of {node:?} is not signed by this cluster's CA; sign it with `konorctl cert revoke --ca-dir` \
         on the host that holds this cluster's ca.key"
    )]
    NotSignedByCa { node: String },
    /// The set is full.
    #[error("this node already holds {REVOCATIONS_MAX} revocations, the most it keeps; refused")]
    Full,
    /// The revocations file could not be read or written.
    #[error("revocations file {path}: {detail}")]
    File { path: String, detail: String },
}

impl Revocation {
    /// Checks the fields: a valid identity, a serial of hex within RFC 5280's 20 octets, a
    /// bounded reason.
    pub fn validate(&self) -> Result<(), RevocationError> {
        validate_node_id(&self.node).map_err(|error| RevocationError::Invalid(error.to_string()))?;
        if let Some(serial) = &self.serial {
            let hex = serial.len() % 2 == 0 && serial.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let padded = serial.len() > 2 && serial.starts_with("00");
            if serial.is_empty() || serial.len() > SERIAL_HEX_CHARS_MAX || !hex || padded {
                return Err(RevocationError::Invalid(format!(
                    "serial {serial:?} is not 1 to 20 octets of lowercase hex without leading zero octets (as \
                     `konorctl cert issue` prints it and konord logs it at start)"
                )));
            }
        }
        if self.reason.chars().count() > REVOCATION_REASON_CHARS_MAX || self.reason.chars().any(char::is_control) {
            return Err(RevocationError::Invalid(format!(
                "the reason has control characters or more than {REVOCATION_REASON_CHARS_MAX} characters"
            )));
        }
        Ok(())
    }

    /// The bytes the CA signs: every field length-prefixed after a domain tag, so no two
    /// statements share bytes and no other signature of the CA key reads as a revocation.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(96 + self.node.len() + self.reason.len());
        let mut field = |data: &[u8]| {
            bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
            bytes.extend_from_slice(data);
        };
        field(b"konor-revocation-v1");
        field(self.node.as_bytes());
        field(self.serial.as_deref().unwrap_or("").as_bytes());
        field(&self.revoked_at_ms.to_le_bytes());
        field(self.reason.as_bytes());
        bytes
    }

    /// Whether every certificate it can cover has expired by `now_ms` ([`RETAINED_FOR_MS`]).
    pub fn lapsed_at(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.saturating_add(RETAINED_FOR_MS) < now_ms
    }

    /// Whether it covers a certificate of `identity` with these facts.
    pub fn covers(&self, identity: &str, serial: &str, not_before_ms: u64) -> bool {
        if identity != self.node {
            return false;
        }
        match &self.serial {
            Some(revoked) => revoked == serial,
            None => not_before_ms.saturating_add(ISSUE_SKEW_MS) <= self.revoked_at_ms,
        }
    }
}

impl SignedRevocation {
    /// Reads one from text, bounded and strict.
    pub fn decode(text: &str) -> Result<SignedRevocation, RevocationError> {
        if text.len() > REVOCATION_BYTES_MAX {
            return Err(RevocationError::Malformed(format!(
                "{} bytes, over the {REVOCATION_BYTES_MAX}-byte bound",
                text.len()
            )));
        }
        let signed: SignedRevocation =
            serde_json::from_str(text).map_err(|error| RevocationError::Malformed(error.to_string()))?;
        signed.revocation.validate()?;
        Ok(signed)
    }

    /// As text (compact JSON).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A short id: the first 16 hex digits of SHA-256 over the signed bytes (the gossip key's
    /// suffix, and what `konorctl cert revocations` shows).
    pub fn id(&self) -> String {
        let digest = Sha256::digest(self.revocation.signed_bytes());
        super::cert_facts::hex(&digest[..8])
    }

    /// Checks the signature against the cluster CA certificate.
    pub fn verify(&self, ca_cert: &CertificateDer<'_>) -> Result<(), RevocationError> {
        let not_signed = || RevocationError::NotSignedByCa { node: self.revocation.node.clone() };
        let signature = BASE64.decode(&self.signature).map_err(|_| not_signed())?;
        super::verify_ca_signature(ca_cert, &self.revocation.signed_bytes(), &signature)
            .then_some(())
            .ok_or_else(not_signed)
    }
}

/// Signs `revocation` with the CA key in `ca_dir` (`konorctl cert revoke`): the statement
/// every node checks against the CA certificate before it acts on it.
pub fn sign(ca_dir: &Path, revocation: Revocation) -> Result<SignedRevocation, PkiError> {
    let (signature, ca_cert) = super::ca::sign_with_ca_key(ca_dir, &revocation.signed_bytes())?;
    let signed = SignedRevocation { revocation, signature: BASE64.encode(signature) };
    // As with issued certificates: prove the CA on disk accepts what its key signed.
    signed.verify(&ca_cert).map_err(|_| PkiError::CaNotUsable {
        dir: ca_dir.to_owned(),
        reason: webpki::Error::InvalidSignatureForPublicKey,
    })?;
    Ok(signed)
}

/// What [`Revocations::add`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// It was new here: stored, and connections it covers are being closed.
    New,
    /// This node held it already.
    Known,
    /// Every certificate it covers has expired ([`RETAINED_FOR_MS`]); not kept.
    Lapsed,
}

/// The revocations a node holds, shared by its handshakes, its gossip filter and its daemon.
#[derive(Clone)]
pub struct Revocations {
    inner: Arc<Inner>,
}

struct Inner {
    ca_cert: CertificateDer<'static>,
    /// Where they are kept (`None`: in memory only, for tests).
    file: Option<PathBuf>,
    held: RwLock<BTreeMap<String, SignedRevocation>>,
    /// One `add` at a time: it saves the file outside `held`'s lock, so handshakes checking
    /// certificates never wait for an fsync.
    adding: std::sync::Mutex<()>,
    /// Bumped on every new revocation; connections and the gossip filter watch it.
    changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").field("held", &self.len()).finish_non_exhaustive()
    }
}

impl Revocations {
    /// An empty set kept in memory only.
    pub fn in_memory(ca_cert: CertificateDer<'static>) -> Revocations {
        Revocations::with(ca_cert, None, BTreeMap::new())
    }

    /// Reads the set from `data_dir`'s [`REVOCATIONS_FILE`] (none yet: empty). Every entry must
    /// verify against `ca_cert`; a file that does not read is an error, not an empty set, since
    /// starting without its revocations would let revoked nodes back in. Entries lapsed at
    /// `now_ms` are left out (and out of the next save).
    pub fn load(
        data_dir: &Path,
        ca_cert: CertificateDer<'static>,
        now_ms: u64,
    ) -> Result<Revocations, RevocationError> {
        let path = data_dir.join(REVOCATIONS_FILE);
        let file_error =
            |detail: String| RevocationError::File { path: path.display().to_string(), detail: detail.clone() };
        let held = match std::fs::read(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => return Err(file_error(error.to_string())),
            Ok(bytes) => {
                // Saved as compact JSON, each entry within REVOCATION_BYTES_MAX (`add`), a comma apart.
                if bytes.len() > REVOCATIONS_MAX * (REVOCATION_BYTES_MAX + 1) + 2 {
                    return Err(file_error(format!("{} bytes, more than {REVOCATIONS_MAX} revocations", bytes.len())));
                }
                let entries: Vec<SignedRevocation> =
                    serde_json::from_slice(&bytes).map_err(|error| file_error(format!("unreadable: {error}")))?;
                let mut held = BTreeMap::new();
                for entry in entries {
                    entry.revocation.validate().map_err(|error| file_error(error.to_string()))?;
                    entry.verify(&ca_cert).map_err(|error| file_error(error.to_string()))?;
                    if !entry.revocation.lapsed_at(now_ms) {
                        held.insert(entry.id(), entry);
                    }
                }
                held
            }
        };
        Ok(Revocations::with(ca_cert, Some(path), held))
    }

    fn with(
        ca_cert: CertificateDer<'static>,
        file: Option<PathBuf>,
        held: BTreeMap<String, SignedRevocation>,
    ) -> Revocations {
        let (changes, _) = tokio::sync::watch::channel(0);
        let adding = std::sync::Mutex::new(());
        Revocations { inner: Arc::new(Inner { ca_cert, file, held: RwLock::new(held), adding, changes }) }
    }

    /// Checks `signed` against the CA, stores it (on disk first, fsynced) and tells the
    /// watchers. `now_ms` is this node's wall clock, for lapsing.
    pub fn add(&self, signed: &SignedRevocation, now_ms: u64) -> Result<Added, RevocationError> {
        // The cheap checks first: a lapsed or known one costs no signature check.
        signed.revocation.validate()?;
        if signed.encode().len() > REVOCATION_BYTES_MAX {
            return Err(RevocationError::Invalid(format!("over {REVOCATION_BYTES_MAX} bytes as stored")));
        }
        if signed.revocation.lapsed_at(now_ms) {
            return Ok(Added::Lapsed);
        }
        let id = signed.id();
        let _adding = self.inner.adding.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = self.inner.held.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if next.contains_key(&id) {
            return Ok(Added::Known);
        }
        signed.verify(&self.inner.ca_cert)?;
        next.retain(|_, entry| !entry.revocation.lapsed_at(now_ms));
        if next.len() >= REVOCATIONS_MAX {
            return Err(RevocationError::Full);
        }
        next.insert(id, signed.clone());
        if let Some(path) = &self.inner.file {
            save(path, &next)?;
        }
        *self.inner.held.write().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        self.inner.changes.send_modify(|generation| *generation += 1);
        Ok(Added::New)
    }

    /// The revocation covering this certificate, if any. A certificate whose serial or start
    /// cannot be read (it was verified against the CA already) is covered by every revocation
    /// of its whole identity: the check fails closed.
    pub fn covering(&self, cert: &CertificateDer<'_>) -> Option<Revocation> {
        let held = self.inner.held.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.is_empty() {
            return None;
        }
        let identity = identity_of(cert)?;
        let facts = cert_facts(cert);
        held.values()
            .map(|entry| &entry.revocation)
            .find(|revocation| match &facts {
                Some(facts) => revocation.covers(&identity, &facts.serial, facts.not_before_ms),
                None => revocation.node == identity && revocation.serial.is_none(),
            })
            .cloned()
    }

    /// Every revocation held, by id.
    pub fn list(&self) -> Vec<(String, SignedRevocation)> {
        let held = self.inner.held.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.iter().map(|(id, entry)| (id.clone(), entry.clone())).collect()
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.inner.held.read().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A counter that moves on every new revocation.
    pub fn generation(&self) -> u64 {
        *self.inner.changes.borrow()
    }

    /// Wakes on every new revocation.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}

/// Writes the set durably (mode 0600: who was revoked and why is for the node's operators).
fn save(path: &Path, held: &BTreeMap<String, SignedRevocation>) -> Result<(), RevocationError> {
    let entries: Vec<&SignedRevocation> = held.values().collect();
    let bytes = serde_json::to_vec(&entries)
        .map_err(|error| RevocationError::File { path: path.display().to_string(), detail: error.to_string() })?;
    crate::storage::replace_file::replace_durably(path, &bytes).map_err(|error| RevocationError::File {
        path: path.display().to_string(),
        detail: format!("cannot write: {error}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ca::{init_ca, issue_node_cert};
    use crate::pki::{CA_CERT_FILE, NODE_CERT_FILE};
    use expect_test::expect;

    /// A certificate file of `dir`, parsed (not through `identity.rs`, which uses this module).
    fn read_cert(dir: &Path, file: &str) -> CertificateDer<'static> {
        let path = dir.join(file);
        crate::pki::files::parse_cert(&path, &std::fs::read(&path).unwrap()).unwrap()
    }

    struct Cluster {
        root: tempfile::TempDir,
    }

    impl Cluster {
        fn new() -> Cluster {
            let root = tempfile::tempdir().unwrap();
            init_ca(&root.path().join("ca")).unwrap();
            Cluster { root }
        }
        fn ca_dir(&self) -> PathBuf {
            self.root.path().join("ca")
        }
        fn cert(&self, node: &str) -> CertificateDer<'static> {
            let dir = self.root.path().join(node);
            if !dir.exists() {
                issue_node_cert(&self.ca_dir(), node, &dir).unwrap();
            }
            read_cert(&dir, NODE_CERT_FILE)
        }
        fn ca_cert(&self) -> CertificateDer<'static> {
            read_cert(&self.ca_dir(), CA_CERT_FILE)
        }
        fn revoke(&self, node: &str, serial: Option<&str>, at_ms: u64) -> SignedRevocation {
            let revocation = Revocation {
                node: node.to_owned(),
                serial: serial.map(str::to_owned),
                revoked_at_ms: at_ms,
                reason: "key lost".to_owned(),
            };
            sign(&self.ca_dir(), revocation).unwrap()
        }
    }

    fn now_ms() -> u64 {
        crate::wall_clock::unix_time().as_secs() * 1000
    }

    #[test]
    fn a_node_revocation_covers_its_certificates_issued_before_it_and_no_other() {
        let cluster = Cluster::new();
        let set = Revocations::in_memory(cluster.ca_cert());
        let n1 = cluster.cert("n1");
        let n2 = cluster.cert("n2");
        assert_eq!(set.covering(&n1), None);
        let signed = cluster.revoke("n1", None, now_ms() + 1000);
        assert_eq!(set.add(&signed, now_ms()).unwrap(), Added::New);
        assert_eq!(set.add(&signed, now_ms()).unwrap(), Added::Known);
        assert_eq!(set.covering(&n1).map(|r| r.node), Some("n1".to_owned()));
        assert_eq!(set.covering(&n2), None);
        // A certificate issued after the revocation (re-enrolment) is not covered.
        let early = cluster.revoke("n2", None, now_ms() - 10_000);
        set.add(&early, now_ms()).unwrap();
        assert_eq!(set.covering(&n2), None, "issued after the revocation");
    }

    #[test]
    fn a_serial_revocation_covers_that_certificate_only() {
        let cluster = Cluster::new();
        let set = Revocations::in_memory(cluster.ca_cert());
        let n1 = cluster.cert("n1");
        let serial = cert_facts(&n1).unwrap().serial;
        set.add(&cluster.revoke("n1", Some("0badc0de"), now_ms()), now_ms()).unwrap();
        assert_eq!(set.covering(&n1), None);
        set.add(&cluster.revoke("n2", Some(&serial), now_ms()), now_ms()).unwrap();
        assert_eq!(set.covering(&n1), None, "the serial of n1 under another identity");
        set.add(&cluster.revoke("n1", Some(&serial), now_ms()), now_ms()).unwrap();
        assert!(set.covering(&n1).is_some());
    }

    #[test]
    fn forged_tampered_and_malformed_revocations_are_refused() {
        let cluster = Cluster::new();
        let other = Cluster::new();
        let set = Revocations::in_memory(cluster.ca_cert());
        let forged = other.revoke("n1", None, now_ms());
        expect![[r#"the revocation of "n1" is not signed by this cluster's CA; sign it with `konorctl cert revoke --ca-dir` on the host that holds this cluster's ca.key"#]]
            .assert_eq(&set.add(&forged, now_ms()).unwrap_err().to_string());
        let mut tampered = cluster.revoke("n1", None, now_ms());
        tampered.revocation.node = "n2".to_owned();
        assert!(matches!(set.add(&tampered, now_ms()), Err(RevocationError::NotSignedByCa { .. })));
        assert!(set.is_empty());
        for text in ["", "{}", "[1]", &"x".repeat(REVOCATION_BYTES_MAX + 1)] {
            assert!(matches!(SignedRevocation::decode(text), Err(RevocationError::Malformed(_))), "{text}");
        }
        let bad_node = r#"{"node":"N1","revoked_at_ms":1,"signature":""}"#;
        assert!(matches!(SignedRevocation::decode(bad_node), Err(RevocationError::Invalid(_))));
        let bad_serial = r#"{"node":"n1","serial":"XYZ","revoked_at_ms":1,"signature":""}"#;
        assert!(matches!(SignedRevocation::decode(bad_serial), Err(RevocationError::Invalid(_))));
        let good = cluster.revoke("n1", None, now_ms());
        assert_eq!(SignedRevocation::decode(&good.encode()).unwrap(), good);
    }

    #[test]
    fn revocations_survive_a_restart_and_a_damaged_file_is_an_error() {
        let cluster = Cluster::new();
        let data = tempfile::tempdir().unwrap();
        let set = Revocations::load(data.path(), cluster.ca_cert(), now_ms()).unwrap();
        assert!(set.is_empty());
        // Issued before the revocation, which covers certificates issued up to it. (Issued
        // after, in the next second, it would not be covered: certificate times are in whole
        // seconds. The test failed so, now and then.)
        let cert = cluster.cert("n1");
        let signed = cluster.revoke("n1", None, now_ms());
        set.add(&signed, now_ms()).unwrap();
        let generation = set.generation();
        assert_eq!(generation, 1);
        let again = Revocations::load(data.path(), cluster.ca_cert(), now_ms()).unwrap();
        assert_eq!(again.list(), set.list());
        assert!(again.covering(&cert).is_some());
        // Another cluster's CA does not vouch for the file.
        assert!(matches!(
            Revocations::load(data.path(), Cluster::new().ca_cert(), now_ms()),
            Err(RevocationError::File { .. })
        ));
        // A year and a day later it has lapsed and is left out.
        let later = Revocations::load(data.path(), cluster.ca_cert(), now_ms() + RETAINED_FOR_MS + 1000).unwrap();
        assert!(later.is_empty());
        std::fs::write(data.path().join(REVOCATIONS_FILE), b"[{").unwrap();
        assert!(matches!(
            Revocations::load(data.path(), cluster.ca_cert(), now_ms()),
            Err(RevocationError::File { .. })
        ));
    }

    #[test]
    fn lapsed_revocations_are_not_kept_and_the_set_is_bounded() {
        let cluster = Cluster::new();
        let set = Revocations::in_memory(cluster.ca_cert());
        let old = cluster.revoke("n1", None, 1_600_000_000_000);
        assert_eq!(set.add(&old, now_ms()).unwrap(), Added::Lapsed);
        assert!(set.is_empty());
        let one = cluster.revoke("n9", None, now_ms());
        let fill = Revocations::with(
            cluster.ca_cert(),
            None,
            (0..REVOCATIONS_MAX).map(|i| (format!("{i:016x}"), one.clone())).collect(),
        );
        assert_eq!(fill.add(&cluster.revoke("n2", None, now_ms()), now_ms()), Err(RevocationError::Full));
    }
}
