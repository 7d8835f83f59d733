//! The cluster CA: creating it (`init_ca`) and issuing node certificates from it (`issue_node_cert`).

use std::path::Path;
use std::time::{Duration, SystemTime};

use konor_sdk::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;

use super::files::{
    NewFile, create_private_dir, parse_cert, parse_key, read_optional, refuse_existing, write_new_files,
};
use super::{
    CA_CERT_FILE, CA_KEY_FILE, NODE_CERT_FILE, NODE_ID_FILE, NODE_KEY_FILE, PkiError, SERVER_NAME, check_key_matches,
    identity_name, unreadable, validate_node_id, verify_chain,
};

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
pub(super) const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// Earliest plausible clock reading (2020-01-01): a host whose clock was never set reads 1970 and would issue
/// certificates that are already expired once the clock is corrected.
const CLOCK_UNIX_SECONDS_MIN: u64 = 1_577_836_800;

/// Latest plausible clock reading (2200-01-01); it also keeps validity arithmetic far from the X.509 date range end.
const CLOCK_UNIX_SECONDS_MAX: u64 = 7_258_118_400;

/// Creates the cluster CA in `dir` (created if missing): `ca.crt` and `ca.key` (mode 0600).
///
/// Refuses if either file exists: overwriting a CA would orphan every node certificate it issued.
pub fn init_ca(dir: &Path) -> Result<(), PkiError> {
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
pub fn issue_node_cert(ca_dir: &Path, node_id: &str, out_dir: &Path) -> Result<(), PkiError> {
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
        Some(_) => return Err(PkiError::FileExists { path: ca_copy_path }),
    };

    let node_key = Secret::new(KeyPair::generate()?);
    let cert = sign_node_cert(&ca, ca_dir, node_id, node_key.expose())?;

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

/// A certificate for `node_id` with `public_key`, signed by `ca`, proven to chain to `ca.crt`.
fn sign_node_cert(
    ca: &LoadedCa,
    ca_dir: &Path,
    node_id: &str,
    public_key: &impl rcgen::PublicKeyData,
) -> Result<rcgen::Certificate, PkiError> {
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
    let issuer = Issuer::new(ca_params(ca.key.expose()), ca.key.expose());
    let cert = params.signed_by(public_key, &issuer)?;

    // rcgen rebuilt the issuer name from our constants and ca.key rather than from ca.crt, so prove the new
    // certificate chains to the CA on disk before handing it out.
    verify_chain(cert.der(), &ca.cert).map_err(|reason| PkiError::CaNotUsable { dir: ca_dir.to_owned(), reason })?;
    Ok(cert)
}

/// A node holding the CA key (issue 17, item 1): it issues certificates to hosts that enroll
/// with a join token, and it alone can check those tokens, whose MAC is keyed by the CA key.
/// A node is one when its TLS directory holds `ca.key` beside `ca.crt`
/// (`konorctl cert issue --signer`).
pub struct Signer {
    ca: LoadedCa,
    dir: std::path::PathBuf,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Signer {
    /// The signer in `dir`, or `None` when `dir` holds no `ca.key` (the node cannot sign).
    pub fn load(dir: &Path) -> Result<Option<Signer>, PkiError> {
        if read_optional(&dir.join(CA_KEY_FILE))?.is_none() {
            return Ok(None);
        }
        Ok(Some(Signer { ca: load_ca(dir)?, dir: dir.to_owned() }))
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca.cert
    }

    /// Signs `message` with the CA key (a signer's proof, `enroll::signer_proof_message`).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, PkiError> {
        Ok(rcgen::SigningKey::sign(self.ca.key.expose(), message)?)
    }

    /// The exact bytes of `ca.crt`.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca.cert_pem
    }

    /// The key of join-token MACs: a hash of the CA key under its own label, so the MAC key is
    /// the CA key's to derive and never the CA key itself.
    pub fn token_key(&self) -> Secret<[u8; 32]> {
        use sha2::Digest;
        let der = Secret::new(self.ca.key.expose().serialize_der());
        let mut hash = sha2::Sha256::new();
        hash.update(b"konor-join-token-key-v1\0");
        hash.update(der.expose());
        Secret::new(hash.finalize().into())
    }

    /// A certificate (PEM) for `node_id` with the P-256 public key `public_key` (its
    /// uncompressed point, as `KeyPair::public_key_raw` gives it).
    pub fn issue_for_key(&self, node_id: &str, public_key: &[u8]) -> Result<String, PkiError> {
        validate_node_id(node_id)?;
        let key = RawP256Key(public_key);
        Ok(sign_node_cert(&self.ca, &self.dir, node_id, &key)?.pem())
    }
}

/// Checks, before a host asks a signer (and spends a use of its token), that `tls_dir` can take
/// the credentials: none of them there yet, and the directory creatable.
pub fn check_enroll_target(tls_dir: &Path) -> Result<(), PkiError> {
    let files = [NODE_CERT_FILE, NODE_KEY_FILE, NODE_ID_FILE, CA_CERT_FILE].map(|file| tls_dir.join(file));
    refuse_existing(&files.iter().map(|path| path.as_path()).collect::<Vec<_>>())?;
    create_private_dir(tls_dir)
}

/// Writes the credentials a signer granted to a host that enrolled (`enroll/client.rs`) into
/// `tls_dir`: `node.key` (the host's own `key`), `node.crt`, `node.id` and `ca.crt`, all or
/// none, after checking that the CA is the one `pin` names, that the certificate chains to it,
/// names `node_id` and carries `key`'s public key.
pub fn store_enrolled(
    tls_dir: &Path,
    node_id: &str,
    key: &KeyPair,
    cert_pem: &str,
    ca_pem: &str,
    pin: &str,
) -> Result<(), PkiError> {
    validate_node_id(node_id)?;
    let cert_path = tls_dir.join(NODE_CERT_FILE);
    let key_path = tls_dir.join(NODE_KEY_FILE);
    let id_path = tls_dir.join(NODE_ID_FILE);
    let ca_path = tls_dir.join(CA_CERT_FILE);
    refuse_existing(&[&cert_path, &key_path, &id_path, &ca_path])?;
    let ca = parse_cert(&ca_path, ca_pem.as_bytes())?;
    if super::ca_pin(&ca) != pin {
        return Err(unreadable(&ca_path, "CA certificate", "it is not the CA the join token pins"));
    }
    let cert = parse_cert(&cert_path, cert_pem.as_bytes())?;
    verify_chain(&cert, &ca).map_err(|reason| PkiError::Untrusted {
        cert_path: cert_path.clone(),
        ca_path: ca_path.clone(),
        reason,
    })?;
    if super::identity_of(&cert).as_deref() != Some(node_id) {
        return Err(PkiError::CertNotForNode { cert_path, node_id: node_id.to_owned() });
    }
    let key_pem = Secret::new(key.serialize_pem());
    let key_der = parse_key(&key_path, key_pem.expose().as_bytes())?;
    check_key_matches(&cert, &key_der, &cert_path, &key_path)?;
    create_private_dir(tls_dir)?;
    let id_text = format!("{node_id}\n");
    write_new_files(&[
        NewFile { path: key_path, contents: key_pem.expose().as_bytes(), private: true },
        NewFile { path: cert_path, contents: cert_pem.as_bytes(), private: false },
        NewFile { path: id_path, contents: id_text.as_bytes(), private: false },
        NewFile { path: ca_path, contents: ca_pem.as_bytes(), private: false },
    ])?;
    tracing::info!(node_id, tls_dir = %tls_dir.display(), "enrolled: node credentials written");
    Ok(())
}

/// A P-256 public key as an uncompressed point: what an enrolling host sends.
struct RawP256Key<'a>(&'a [u8]);

impl rcgen::PublicKeyData for RawP256Key<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// Makes the node whose credentials are in `out_dir` a signer: copies `ca.key` (0600) from
/// `ca_dir`, once `out_dir`'s `ca.crt` is checked to be the same CA.
pub fn delegate_signing(ca_dir: &Path, out_dir: &Path) -> Result<(), PkiError> {
    let ca = load_ca(ca_dir)?;
    let ca_copy_path = out_dir.join(CA_CERT_FILE);
    if read_optional(&ca_copy_path)?.as_deref() != Some(ca.cert_pem.as_slice()) {
        return Err(unreadable(&ca_copy_path, "CA certificate", "it is not the CA in the CA directory"));
    }
    let key_path = out_dir.join(CA_KEY_FILE);
    refuse_existing(&[&key_path])?;
    let key_pem = Secret::new(ca.key.expose().serialize_pem());
    write_new_files(&[NewFile { path: key_path, contents: key_pem.expose().as_bytes(), private: true }])?;
    tracing::info!(out_dir = %out_dir.display(), "copied the CA key: this node is a signer");
    Ok(())
}

/// Signs `message` with the CA key in `ca_dir` (a revocation, `revocation::sign`); returns the
/// signature and the CA certificate it verifies under.
pub(super) fn sign_with_ca_key(ca_dir: &Path, message: &[u8]) -> Result<(Vec<u8>, CertificateDer<'static>), PkiError> {
    let ca = load_ca(ca_dir)?;
    let signature = rcgen::SigningKey::sign(ca.key.expose(), message)?;
    Ok((signature, ca.cert))
}

/// The CA material needed to issue a node certificate.
struct LoadedCa {
    cert: CertificateDer<'static>,
    /// The exact bytes of `ca.crt`, copied verbatim into node directories.
    cert_pem: Vec<u8>,
    key: Secret<KeyPair>,
}

fn load_ca(ca_dir: &Path) -> Result<LoadedCa, PkiError> {
    let cert_path = ca_dir.join(CA_CERT_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let no_ca = || PkiError::NoCa { dir: ca_dir.to_owned() };
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
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<(), PkiError> {
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let unix_seconds = since_epoch.as_secs();
    if !(CLOCK_UNIX_SECONDS_MIN..=CLOCK_UNIX_SECONDS_MAX).contains(&unix_seconds) {
        return Err(PkiError::Clock { unix_seconds });
    }
    // Dates are built as the epoch plus a std Duration because rcgen exposes `time` types but this crate does not
    // depend on `time`; the clock bounds above keep the additions far from the range where they could overflow.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch.saturating_sub(CLOCK_SKEW_ALLOWANCE);
    params.not_after = epoch + since_epoch + validity;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{NODE_ID_CHARS_MAX, message};
    use expect_test::expect;
    use std::fs;

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
    fn issue_node_cert_without_ca_says_how_to_create_one() {
        let root = tempfile::tempdir().unwrap();
        let error = issue_node_cert(root.path(), "node-1", &root.path().join("node")).unwrap_err();
        expect![[r#"no CA in DIR: run `konorctl ca init --dir DIR` first"#]].assert_eq(&message(error, root.path()));
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
