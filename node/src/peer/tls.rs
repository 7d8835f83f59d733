//! Cluster PKI and mutual TLS for peer traffic: the cluster CA, node certificates, and the quinn configs built on them.
//!
//! Every peer connection is QUIC with TLS 1.3 where both sides present a certificate issued by the cluster CA, so a
//! host without credentials from this cluster can neither join nor inject state (SPEC F22). Each node certificate
//! carries two DNS names: [`SERVER_NAME`], which every node answers to so a dialer need not know whom it reaches
//! before the handshake, and [`identity_name`], which names exactly one node; after the handshake the shell checks the
//! peer's certificate against the node id it expects with [`verify_node_identity`].

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use konor_sdk::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The DNS name every node certificate carries and every dialer asks for: a dialer knows an address, not yet which
/// node answers there, so the handshake proves cluster membership and [`verify_node_identity`] proves the node.
pub const SERVER_NAME: &str = "konor-node";

/// The one application protocol peers speak; a version bump changes it so old and new nodes refuse each other in the
/// handshake instead of misreading each other's frames.
pub const ALPN: &[u8] = b"konor/1";

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
/// beside the certificate and [`load_identity`] checks the certificate really names it.
pub const NODE_ID_FILE: &str = "node.id";

/// Suffix of a node's identity name; `.konor` is not a public top-level domain, so no public CA issues these names.
const IDENTITY_NAME_SUFFIX: &str = ".node.konor";

/// Common name of the cluster CA. Leaf certificates name their issuer by this distinguished name, and rcgen can only
/// rebuild the issuer from parameters (no X.509 parsing), so it must never change for an existing cluster.
const CA_COMMON_NAME: &str = "Konorkestra cluster CA";

/// Bytes of the CA key identifier shown in the CA name: 8 bytes (16 hex digits) make a collision between two
/// clusters' CA names negligible while staying readable in logs.
const CLUSTER_FINGERPRINT_BYTES: usize = 8;

/// The CA outlives many node certificates: replacing it means re-enrolling every node.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Node certificates expire within a year so a leaked key stops working without revocation.
const NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Certificates start to be valid this long before they are issued, so a peer whose clock lags the issuer's does not
/// refuse a certificate issued moments ago.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// Earliest plausible clock reading (2020-01-01): a host whose clock was never set reads 1970 and would issue
/// certificates that are already expired once the clock is corrected.
const CLOCK_UNIX_SECONDS_MIN: u64 = 1_577_836_800;

/// Latest plausible clock reading (2200-01-01); it also keeps validity arithmetic far from the X.509 date range end.
const CLOCK_UNIX_SECONDS_MAX: u64 = 7_258_118_400;

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

/// Why a PKI or TLS operation failed. Every operation that writes files either writes all of them or none.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
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

    /// rustls or quinn refused to build a TLS config from the loaded credentials; nothing changed.
    #[error("cannot build the {side} TLS config: {source}; check this node's credentials")]
    Config {
        side: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Checks a node id: 1..=[`NODE_ID_CHARS_MAX`] characters of `[a-z0-9-]`, not starting or ending with '-'.
///
/// The id becomes a DNS label in the certificate (`<id>.node.konor`), and DNS labels may neither start nor end with
/// a hyphen; lowercase only, because DNS names compare case-insensitively and two ids must never name one node.
pub fn validate_node_id(id: &str) -> Result<(), TlsError> {
    let invalid = |reason: String| Err(TlsError::InvalidNodeId { node_id: id.to_owned(), reason });
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

/// Creates the cluster CA in `dir` (created if missing): `ca.crt` and `ca.key` (mode 0600).
///
/// Refuses if either file exists: overwriting a CA would orphan every node certificate it issued.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    refuse_existing(&[&key_path, &cert_path])?;

    let key = Secret::new(KeyPair::generate()?);
    let mut params = ca_params(key.expose());
    set_validity(&mut params, CA_VALIDITY)?;
    let cert = params.self_signed(key.expose())?;

    create_private_dir(dir)?;
    let key_pem = Secret::new(key.expose().serialize_pem());
    let cert_pem = cert.pem();
    write_new_files(&[
        NewFile { path: key_path, contents: key_pem.expose().as_bytes(), private: true },
        NewFile { path: cert_path, contents: cert_pem.as_bytes(), private: false },
    ])?;
    tracing::info!(dir = %dir.display(), "created cluster CA");
    Ok(())
}

/// Issues a certificate for `node_id` from the CA in `ca_dir` and writes `node.crt`, `node.key` (0600), `node.id` and
/// a copy of `ca.crt` into `out_dir` (created if missing).
///
/// Refuses to overwrite node files; an existing `ca.crt` in `out_dir` is accepted only if it is the same CA, which
/// also allows `out_dir == ca_dir`.
pub fn issue_node_cert(ca_dir: &Path, node_id: &str, out_dir: &Path) -> Result<(), TlsError> {
    validate_node_id(node_id)?;
    let cert_path = out_dir.join(NODE_CERT_FILE);
    let key_path = out_dir.join(NODE_KEY_FILE);
    let id_path = out_dir.join(NODE_ID_FILE);
    let ca_copy_path = out_dir.join(CA_CERT_FILE);
    refuse_existing(&[&cert_path, &key_path, &id_path])?;

    let ca = load_ca(ca_dir)?;
    let copy_ca = match read_optional(&ca_copy_path)? {
        None => true,
        Some(existing) if existing == ca.cert_pem => false,
        Some(_) => return Err(TlsError::FileExists { path: ca_copy_path }),
    };

    let node_key = Secret::new(KeyPair::generate()?);
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned(), identity_name(node_id)])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node_id);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node both dials (client) and accepts (server) peer connections with the same certificate.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    // The serial is left to rcgen, which derives it from the fresh node public key, so serials never repeat.
    set_validity(&mut params, NODE_VALIDITY)?;
    let issuer = Issuer::new(ca_params(ca.key.expose()), ca.key.into_exposed());
    let cert = params.signed_by(node_key.expose(), &issuer)?;

    // rcgen rebuilt the issuer name from our constants and ca.key rather than from ca.crt, so prove the new
    // certificate chains to the CA on disk before handing it out.
    verify_chain(cert.der(), &ca.cert).map_err(|reason| TlsError::CaNotUsable { dir: ca_dir.to_owned(), reason })?;

    create_private_dir(out_dir)?;
    let key_pem = Secret::new(node_key.expose().serialize_pem());
    let cert_pem = cert.pem();
    let id_text = format!("{node_id}\n");
    let mut files = vec![
        NewFile { path: key_path, contents: key_pem.expose().as_bytes(), private: true },
        NewFile { path: cert_path, contents: cert_pem.as_bytes(), private: false },
        NewFile { path: id_path, contents: id_text.as_bytes(), private: false },
    ];
    if copy_ca {
        files.push(NewFile { path: ca_copy_path, contents: &ca.cert_pem, private: false });
    }
    write_new_files(&files)?;
    tracing::info!(node_id, out_dir = %out_dir.display(), "issued node certificate");
    Ok(())
}

/// A node's verified TLS credentials: its certificate and key, the cluster CA, and the node id they belong to.
pub struct TlsIdentity {
    node_id: String,
    cert: CertificateDer<'static>,
    key: Secret<PrivateKeyDer<'static>>,
    ca_cert: CertificateDer<'static>,
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
pub fn load_identity(tls_dir: &Path) -> Result<TlsIdentity, TlsError> {
    let id_path = tls_dir.join(NODE_ID_FILE);
    let cert_path = tls_dir.join(NODE_CERT_FILE);
    let key_path = tls_dir.join(NODE_KEY_FILE);
    let ca_path = tls_dir.join(CA_CERT_FILE);
    let missing = |file| TlsError::NoIdentity { dir: tls_dir.to_owned(), file };
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

    verify_chain(&cert, &ca_cert).map_err(|reason| TlsError::Untrusted {
        cert_path: cert_path.clone(),
        ca_path: ca_path.clone(),
        reason,
    })?;
    if verify_node_identity(&cert, &node_id).is_err() {
        return Err(TlsError::CertNotForNode { cert_path, node_id });
    }
    check_key_matches(&cert, key.expose(), &cert_path, &key_path)?;
    Ok(TlsIdentity { node_id, cert, key, ca_cert })
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

    /// The QUIC server config: TLS 1.3 only, ALPN [`ALPN`], and a client certificate from the cluster CA required.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = crypto_provider();
        let client_verifier = WebPkiClientVerifier::builder_with_provider(self.ca_roots("server")?, provider.clone())
            .build()
            .map_err(config_error("server"))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error("server"))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(vec![self.cert.clone()], self.key.expose().clone_key())
            .map_err(config_error("server"))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // max_early_data_size stays 0: 0-RTT data can be replayed, and peer messages are not idempotent.
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(config_error("server"))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport_config());
        Ok(config)
    }

    /// The QUIC client config: presents this node's certificate and trusts only servers certified by the cluster CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let provider = crypto_provider();
        let server_verifier = WebPkiServerVerifier::builder_with_provider(self.ca_roots("client")?, provider.clone())
            .build()
            .map_err(config_error("client"))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_error("client"))?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(vec![self.cert.clone()], self.key.expose().clone_key())
            .map_err(config_error("client"))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(config_error("client"))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport_config());
        Ok(config)
    }

    /// The cluster CA as the only trust root: no system roots, so a certificate from any public CA is refused.
    fn ca_roots(&self, side: &'static str) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_cert.clone()).map_err(config_error(side))?;
        Ok(Arc::new(roots))
    }
}

/// The peer's end-entity certificate of an established connection; `None` before the handshake completes or if the
/// peer presented none (which our configs never allow).
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.into_iter().next()
}

/// Checks that a certificate, already verified against the cluster CA by the handshake, names node `node_id`.
///
/// The handshake proves only cluster membership (every node answers to [`SERVER_NAME`]); this proves the peer is the
/// node the caller meant, since the CA issues `<node_id>.node.konor` to that node alone.
pub fn verify_node_identity(cert: &CertificateDer<'_>, node_id: &str) -> Result<(), TlsError> {
    validate_node_id(node_id)?;
    let peer_not_node = |reason| TlsError::PeerNotNode { node_id: node_id.to_owned(), reason };
    let end_entity = webpki::EndEntityCert::try_from(cert).map_err(peer_not_node)?;
    let name = ServerName::try_from(identity_name(node_id))
        .map_err(|_| peer_not_node(webpki::Error::MalformedDnsIdentifier))?;
    end_entity.verify_is_valid_for_subject_name(&name).map_err(peer_not_node)
}

/// The CA material needed to issue a node certificate.
struct LoadedCa {
    cert: CertificateDer<'static>,
    /// The exact bytes of `ca.crt`, copied verbatim into node directories.
    cert_pem: Vec<u8>,
    key: Secret<KeyPair>,
}

fn load_ca(ca_dir: &Path) -> Result<LoadedCa, TlsError> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let no_ca = || TlsError::NoCa { dir: ca_dir.to_owned() };
    let cert_pem = read_optional(&cert_path)?.ok_or_else(no_ca)?;
    let key_pem = Secret::new(read_optional(&key_path)?.ok_or_else(no_ca)?);

    let cert = parse_cert(&cert_path, &cert_pem)?;
    let parsed = Secret::new(parse_key(&key_path, key_pem.expose())?);
    check_key_matches(&cert, parsed.expose(), &cert_path, &key_path)?;
    let key_text =
        std::str::from_utf8(key_pem.expose()).map_err(|error| unreadable(&key_path, "private key", error))?;
    let key = Secret::new(KeyPair::from_pem(key_text).map_err(|error| unreadable(&key_path, "private key", error))?);
    Ok(LoadedCa { cert, cert_pem, key })
}

/// The CA parameters for `ca_key`. [`issue_node_cert`] rebuilds the issuer from these (rcgen cannot parse `ca.crt`
/// without its x509-parser feature), so the name and key identifier method must stay as `init_ca` wrote them.
fn ca_params(ca_key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    // The unit names the cluster by its CA key, so every cluster's CA has its own name: a certificate from another
    // cluster then fails as an unknown issuer instead of as a bad signature under a same-named CA. Derived from the
    // key rather than random so it can be rebuilt from ca.key alone.
    let cluster_fingerprint: String = params
        .key_identifier(ca_key)
        .iter()
        .take(CLUSTER_FINGERPRINT_BYTES)
        .map(|byte| format!("{byte:02x}"))
        .collect();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name.push(DnType::OrganizationalUnitName, format!("cluster {cluster_fingerprint}"));
    // Path length 0: the CA signs node certificates directly and no intermediate CA may exist.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Sets the validity window from now (less [`CLOCK_SKEW_ALLOWANCE`]) to now plus `validity`.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), TlsError> {
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let unix_seconds = since_epoch.as_secs();
    if !(CLOCK_UNIX_SECONDS_MIN..=CLOCK_UNIX_SECONDS_MAX).contains(&unix_seconds) {
        return Err(TlsError::Clock { unix_seconds });
    }
    // Dates are built as the epoch plus a std Duration because rcgen exposes `time` types but this crate does not
    // depend on `time`; the clock bounds above keep the additions far from the range where they could overflow.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(CLOCK_SKEW_ALLOWANCE);
    params.not_after = epoch + since_epoch + validity;
    Ok(())
}

/// Verifies that `cert` chains to `ca_cert`, is valid now, and may act as both TLS server and TLS client.
fn verify_chain(cert: &CertificateDer<'_>, ca_cert: &CertificateDer<'_>) -> Result<(), webpki::Error> {
    let anchors = [webpki::anchor_from_trusted_cert(ca_cert)?];
    let end_entity = webpki::EndEntityCert::try_from(cert)?;
    let algorithms = crypto_provider().signature_verification_algorithms.all;
    let now = UnixTime::now();
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
) -> Result<(), TlsError> {
    match rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &crypto_provider()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(TlsError::KeyMismatch { key_path: key_path.to_owned(), cert_path: cert_path.to_owned() })
        }
        Err(error) => Err(unreadable(key_path, "private key", error)),
    }
}

/// The ring provider, passed explicitly to every builder: relying on a process-wide default would make the configs
/// depend on whichever crate installed one first.
fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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

fn config_error<E>(side: &'static str) -> impl FnOnce(E) -> TlsError
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |error| TlsError::Config { side, source: Box::new(error) }
}

fn unreadable(path: &Path, what: &'static str, detail: impl std::fmt::Display) -> TlsError {
    TlsError::Unreadable { path: path.to_owned(), what, detail: detail.to_string() }
}

fn parse_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem).map_err(|error| unreadable(path, "PEM certificate", error))
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| unreadable(path, "PEM private key", error))
}

/// Reads a file, mapping "not found" to `None` so callers can name what is missing.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Io { action: "read", path: path.to_owned(), source }),
    }
}

/// Fails on the first path that exists, before any key is generated, so the error names the file the user must
/// move; `create_new` in [`write_new_files`] still guards against a file appearing in between.
fn refuse_existing(paths: &[&Path]) -> Result<(), TlsError> {
    for path in paths {
        if fs::symlink_metadata(path).is_ok() {
            return Err(TlsError::FileExists { path: path.to_path_buf() });
        }
    }
    Ok(())
}

/// Creates a directory that will hold private keys; new directories get mode 0700, existing ones are left alone.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| TlsError::Io { action: "create directory", path: dir.to_owned(), source })
}

struct NewFile<'a> {
    path: PathBuf,
    contents: &'a [u8],
    /// Private files (keys) get mode 0600 so only the node's user can read them.
    private: bool,
}

/// Writes all files or none: on failure the files created so far are removed, so the command can simply be rerun.
fn write_new_files(files: &[NewFile<'_>]) -> Result<(), TlsError> {
    for (written, file) in files.iter().enumerate() {
        if let Err(error) = write_new_file(file) {
            for earlier in &files[..written] {
                // Best effort: the original error is the one worth reporting.
                let _ = fs::remove_file(&earlier.path);
            }
            return Err(error);
        }
    }
    Ok(())
}

fn write_new_file(file: &NewFile<'_>) -> Result<(), TlsError> {
    let io_error = |action, source| TlsError::Io { action, path: file.path.clone(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if file.private { 0o600 } else { 0o644 });
    let mut handle = options.open(&file.path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => TlsError::FileExists { path: file.path.clone() },
        _ => io_error("create", source),
    })?;
    // Credentials must be durable before the caller reports success and hands the node its certificate.
    if let Err(source) = handle.write_all(file.contents).and_then(|()| handle.sync_all()) {
        drop(handle);
        // Best effort: a half-written key file must not stay behind to block the rerun.
        let _ = fs::remove_file(&file.path);
        return Err(io_error("write", source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use quinn::{ConnectionError, Endpoint};
    use std::net::SocketAddr;
    use tokio::time::timeout;

    /// Bounds every network await in these tests; a handshake on loopback takes milliseconds.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Issues `node_id` from the CA in `ca_dir` into `root/node_id` and loads it.
    fn enrolled(ca_dir: &Path, root: &Path, node_id: &str) -> TlsIdentity {
        let out_dir = root.join(node_id);
        issue_node_cert(ca_dir, node_id, &out_dir).unwrap();
        load_identity(&out_dir).unwrap()
    }

    /// Credentials from a foreign CA that nonetheless trust `trusted_ca`: the attacker knows the cluster CA
    /// certificate (it is public) but cannot get a certificate signed by it.
    fn forged(root: &Path, node_id: &str, trusted_ca: &TlsIdentity) -> TlsIdentity {
        let rogue_ca = root.join("rogue-ca");
        init_ca(&rogue_ca).unwrap();
        let rogue = enrolled(&rogue_ca, &root.join("rogue"), node_id);
        TlsIdentity { ca_cert: trusted_ca.ca_cert.clone(), ..rogue }
    }

    fn server(identity: &TlsIdentity) -> (Endpoint, SocketAddr) {
        let endpoint = Endpoint::server(identity.server_config().unwrap(), loopback()).unwrap();
        let address = endpoint.local_addr().unwrap();
        (endpoint, address)
    }

    fn connect(identity: &TlsIdentity, address: SocketAddr) -> (Endpoint, quinn::Connecting) {
        let endpoint = Endpoint::client(loopback()).unwrap();
        let connecting = endpoint.connect_with(identity.client_config().unwrap(), address, SERVER_NAME).unwrap();
        (endpoint, connecting)
    }

    /// Replaces the temporary directory in an error message so snapshots are stable.
    fn message(error: TlsError, dir: &Path) -> String {
        error.to_string().replace(&dir.display().to_string(), "DIR")
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

    #[test]
    fn init_ca_refuses_to_overwrite() {
        let root = tempfile::tempdir().unwrap();
        init_ca(root.path()).unwrap();
        let ca_before = fs::read(root.path().join(CA_CERT_FILE)).unwrap();
        let error = init_ca(root.path()).unwrap_err();
        expect![[r#"file exists: DIR/ca.key (refusing to overwrite); move it away or choose another directory"#]]
            .assert_eq(&message(error, root.path()));
        assert_eq!(fs::read(root.path().join(CA_CERT_FILE)).unwrap(), ca_before);

        fs::remove_file(root.path().join(CA_KEY_FILE)).unwrap();
        let error = init_ca(root.path()).unwrap_err();
        expect![[r#"file exists: DIR/ca.crt (refusing to overwrite); move it away or choose another directory"#]]
            .assert_eq(&message(error, root.path()));
        assert!(!root.path().join(CA_KEY_FILE).exists());
    }

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
    fn issue_node_cert_refuses_a_copy_of_another_ca() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        let out_dir = root.path().join("node");
        init_ca(&ca_dir).unwrap();
        init_ca(&out_dir).unwrap();
        let error = issue_node_cert(&ca_dir, "node-1", &out_dir).unwrap_err();
        expect![[r#"file exists: DIR/node/ca.crt (refusing to overwrite); move it away or choose another directory"#]]
            .assert_eq(&message(error, root.path()));
        assert!(!out_dir.join(NODE_KEY_FILE).exists());
    }

    #[test]
    fn issue_node_cert_refuses_bad_node_ids() {
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        let out_dir = root.path().join("node");
        init_ca(&ca_dir).unwrap();
        let too_long = "a".repeat(NODE_ID_CHARS_MAX + 1);
        let messages: Vec<String> = ["", "UPPER", "a_b", too_long.as_str(), "-a", "a-", "a.b"]
            .into_iter()
            .map(|id| issue_node_cert(&ca_dir, id, &out_dir).unwrap_err().to_string())
            .collect();
        expect![[r#"
            invalid node id '': it is empty; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
            invalid node id 'UPPER': character 'U' is not allowed; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
            invalid node id 'a_b': character '_' is not allowed; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
            invalid node id 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa': it has 33 characters, more than 32; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
            invalid node id '-a': it starts with '-'; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
            invalid node id 'a-': it ends with '-'; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
            invalid node id 'a.b': character '.' is not allowed; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'"#]].assert_eq(&messages.join("\n"));
        assert!(!out_dir.exists(), "a refused node id must not create anything");
    }

    #[test]
    fn accepts_node_ids_at_the_limits() {
        for id in ["a", "0", "node-1", "a-b-c", &"z".repeat(NODE_ID_CHARS_MAX)] {
            validate_node_id(id).unwrap();
        }
    }

    #[test]
    fn issue_node_cert_without_ca_says_how_to_create_one() {
        let root = tempfile::tempdir().unwrap();
        let error = issue_node_cert(root.path(), "node-1", &root.path().join("node")).unwrap_err();
        expect![[r#"no CA in DIR: run `konorctl ca init --dir DIR` first"#]].assert_eq(&message(error, root.path()));
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

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let ca_dir = root.path().join("ca");
        let out_dir = root.path().join("node");
        init_ca(&ca_dir).unwrap();
        issue_node_cert(&ca_dir, "node-1", &out_dir).unwrap();
        for key_path in [ca_dir.join(CA_KEY_FILE), out_dir.join(NODE_KEY_FILE)] {
            let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key_path.display());
        }
        for dir in [&ca_dir, &out_dir] {
            let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{}", dir.display());
        }
    }
}
