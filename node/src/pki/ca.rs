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
    verify_chain(cert.der(), &ca.cert).map_err(|reason| PkiError::CaNotUsable { dir: ca_dir.to_owned(), reason })?;

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
