//! The joining host's side (`konord --join ADDR --token-file FILE`): make a key pair, find a
//! signer among the `--join` addresses (HTTP API addresses), check it belongs to the cluster the
//! token pins before sending the token, and write what it grants.
//!
//! The TLS check: a node's HTTP API sends the CA certificate in its chain; the host accepts the
//! connection only if one certificate of the chain has the token's pin and the node's
//! certificate chains to it under the name every node answers to. A machine in the middle
//! without the CA key cannot pass, so it never sees the token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use konor_sdk::Secret;
use rcgen::KeyPair;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::{
    CHALLENGE_NONCE_BYTES, CHALLENGE_ROUTE, ENROLL_ROUTE, EnrollAsk, EnrollGrant, proof_message, signer_proof_message,
};
use crate::pki::join_token::{JOIN_TOKEN_BYTES_MAX, JoinToken, TokenError, read_claims};
use crate::pki::{PkiError, SERVER_NAME, ca_pin, crypto_provider};
use crate::wall_clock::WallTime;

/// What the host keeps of its enrollment in its data dir: a restart with the same flags reads
/// it instead of enrolling again (the token may be gone by then).
pub const ENROLLMENT_FILE: &str = "enrollment.json";

/// How long a host keeps asking when no signer answers (all down, or the network not up yet):
/// long enough for a boot-time race, short enough that a wrong address fails the unit.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The key of an enrollment not finished yet, in the data dir (mode 0600).
pub const PENDING_KEY_FILE: &str = "enroll.key";

/// One attempt at one address: connect, handshake, answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between rounds over all addresses.
const ROUND_PAUSE: Duration = Duration::from_secs(2);

/// Largest answer read: a certificate, the CA's and a few seeds.
const ANSWER_BYTES_MAX: usize = 64 << 10;

/// Largest token file read.
const TOKEN_FILE_BYTES_MAX: u64 = 2 * JOIN_TOKEN_BYTES_MAX as u64;

/// Why a host did not enroll. Nothing was written when it did not.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The token does not read.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The token file does not read.
    #[error("cannot read the join token from {path}: {detail}")]
    TokenFile { path: PathBuf, detail: String },
    /// A signer refused for good (a bad, expired or used-up token; a taken node id).
    #[error("{addr} refused to enroll this host ({code}): {message}")]
    Refused { addr: String, code: String, message: String },
    /// No signer answered in time.
    #[error("no signer enrolled this host within {} s; the last answer: {last}", JOIN_TIMEOUT.as_secs())]
    NoSigner { last: String },
    /// The grant does not hold together, or cannot be written.
    #[error("cannot store the credentials the signer granted: {0}")]
    Store(#[from] PkiError),
    /// The enrollment record cannot be written or read.
    #[error("{0}")]
    Record(String),
}

/// What the host keeps ([`ENROLLMENT_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    /// Its node id.
    pub node: String,
    /// The cluster's name.
    pub cluster: String,
    /// Labels the token gave.
    pub labels: BTreeMap<String, String>,
    /// Peer addresses to join through.
    pub seeds: Vec<SocketAddr>,
    /// Who signed.
    pub signer: String,
    /// The token's id.
    pub token_id: String,
}

impl Enrollment {
    /// The record in `data_dir`, if the host enrolled before.
    pub fn read(data_dir: &Path) -> Result<Option<Enrollment>, JoinError> {
        let path = data_dir.join(ENROLLMENT_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| JoinError::Record(format!("{} does not read: {error}", path.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(JoinError::Record(format!("cannot read {}: {error}", path.display()))),
        }
    }

    fn write(&self, data_dir: &Path) -> Result<(), JoinError> {
        let path = data_dir.join(ENROLLMENT_FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|error| JoinError::Record(error.to_string()))?;
        std::fs::create_dir_all(data_dir)
            .and_then(|()| crate::storage::replace_file::replace_durably(&path, &bytes))
            .map_err(|error| JoinError::Record(format!("cannot write {}: {error}", path.display())))
    }
}

/// Reads a token from `path` (`-`: standard input), trimmed.
pub fn read_token_file(path: &Path) -> Result<Secret<String>, JoinError> {
    use std::io::Read as _;
    let fail = |detail: String| JoinError::TokenFile { path: path.to_owned(), detail };
    let mut text = Secret::new(String::new());
    let read = if path == Path::new("-") {
        std::io::stdin().take(TOKEN_FILE_BYTES_MAX).read_to_string(text.expose_mut())
    } else {
        std::fs::File::open(path).and_then(|file| file.take(TOKEN_FILE_BYTES_MAX).read_to_string(text.expose_mut()))
    };
    read.map_err(|error| fail(error.to_string()))?;
    let trimmed = text.expose().trim().to_owned();
    if trimmed.is_empty() {
        return Err(fail("it is empty".to_owned()));
    }
    Ok(Secret::new(trimmed))
}

/// Enrolls this host: asks the signers at `addrs` in turn until one grants or one refuses for
/// good, writes the credentials into `tls_dir` and the record into `data_dir`.
pub async fn enroll(
    addrs: &[String],
    token: &Secret<String>,
    node: Option<&str>,
    cluster: Option<&str>,
    tls_dir: &Path,
    data_dir: &Path,
) -> Result<Enrollment, JoinError> {
    let claims = read_claims(token.expose())?;
    // Before a signer records a use: a host that could not store its credentials would spend
    // one at every restart.
    crate::pki::ca::check_enroll_target(tls_dir)?;
    std::fs::create_dir_all(data_dir)
        .map_err(|error| JoinError::Record(format!("cannot create {}: {error}", data_dir.display())))?;
    let key = pending_key(data_dir)?;
    let public_key = key.expose().public_key_raw().to_vec();
    let asked = node.map(str::to_owned);
    let message = proof_message(&claims.id, asked.as_deref(), &public_key);
    let proof = rcgen::SigningKey::sign(key.expose(), &message).map_err(PkiError::from)?;
    let ask = EnrollAsk {
        token: konor_sdk::Secret::new(token.expose().clone()),
        node: asked,
        public_key: STANDARD.encode(&public_key),
        proof: STANDARD.encode(proof),
    };
    let body = Secret::new(serde_json::to_vec(&ask).map_err(|error| JoinError::Record(error.to_string()))?);
    drop(ask);
    let started = tokio::time::Instant::now();
    let mut last = String::from("none yet");
    // Addresses that never will enroll us (another cluster's node, a node that cannot sign).
    let mut skipped = std::collections::BTreeSet::new();
    loop {
        for addr in addrs {
            if skipped.contains(addr) {
                continue;
            }
            match tokio::time::timeout(ATTEMPT_TIMEOUT, ask_signer(addr, &claims, body.expose())).await {
                Ok(Ok(grant)) => {
                    let expected = claims.node.as_deref().or(node);
                    if expected.is_some_and(|expected| expected != grant.node)
                        || crate::pki::validate_node_id(&grant.node).is_err()
                    {
                        return Err(JoinError::Refused {
                            addr: addr.clone(),
                            code: "bad_grant".to_owned(),
                            message: format!("the signer granted node id {:?}, not the one asked", grant.node),
                        });
                    }
                    if cluster.is_some_and(|cluster| cluster != grant.cluster) {
                        return Err(JoinError::Refused {
                            addr: addr.clone(),
                            code: "wrong_cluster".to_owned(),
                            message: format!(
                                "the signer's cluster is {:?}, not {cluster:?} (--cluster)",
                                grant.cluster
                            ),
                        });
                    }
                    return store(grant, &key, &claims, addr, tls_dir, data_dir);
                }
                Ok(Err(Attempt::Final(error))) => return Err(error),
                Ok(Err(Attempt::Again(reason))) => {
                    warn!(%addr, %reason, "enrollment: this address did not enroll us; trying the next");
                    last = format!("{addr}: {reason}");
                }
                Ok(Err(Attempt::Never(reason))) => {
                    warn!(%addr, %reason, "enrollment: this address cannot enroll us; not asking it again");
                    last = format!("{addr}: {reason}");
                    skipped.insert(addr.clone());
                }
                Err(_) => {
                    last = format!("{addr}: no answer within {} s", ATTEMPT_TIMEOUT.as_secs());
                    warn!(%addr, "enrollment: no answer; trying the next");
                }
            }
        }
        if skipped.len() == addrs.len() || started.elapsed() + ROUND_PAUSE > JOIN_TIMEOUT {
            return Err(JoinError::NoSigner { last });
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

/// The key this host enrolls with: the one kept from an attempt that did not finish (so a
/// signer that granted it before answers again without spending a use), or a new one, kept
/// (0600) before any signer is asked.
fn pending_key(data_dir: &Path) -> Result<Secret<KeyPair>, JoinError> {
    let path = data_dir.join(PENDING_KEY_FILE);
    let unreadable =
        |detail: String| JoinError::Record(format!("{}: {detail}; remove it to start over", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            let pem = Secret::new(pem);
            KeyPair::from_pem(pem.expose()).map(Secret::new).map_err(|error| unreadable(error.to_string()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = Secret::new(KeyPair::generate().map_err(PkiError::from)?);
            let pem = Secret::new(key.expose().serialize_pem());
            crate::storage::replace_file::replace_durably(&path, pem.expose().as_bytes())
                .map_err(|error| JoinError::Record(format!("cannot write {}: {error}", path.display())))?;
            Ok(key)
        }
        Err(error) => Err(unreadable(error.to_string())),
    }
}

/// Checks and writes a grant.
fn store(
    grant: EnrollGrant,
    key: &Secret<KeyPair>,
    claims: &JoinToken,
    addr: &str,
    tls_dir: &Path,
    data_dir: &Path,
) -> Result<Enrollment, JoinError> {
    crate::pki::ca::store_enrolled(tls_dir, &grant.node, key.expose(), &grant.certificate, &grant.ca, &claims.ca)?;
    let join_ip = addr.parse::<SocketAddr>().ok().map(|addr| addr.ip());
    let seeds = grant
        .seeds
        .iter()
        .filter_map(|seed| seed.parse::<SocketAddr>().ok())
        .map(|mut seed| {
            // A signer listening on every interface names 0.0.0.0: reach it where we reached it.
            if seed.ip().is_unspecified()
                && let Some(ip) = join_ip
            {
                seed.set_ip(ip);
            }
            seed
        })
        .collect();
    let enrollment = Enrollment {
        node: grant.node,
        cluster: grant.cluster,
        labels: grant.labels,
        seeds,
        signer: grant.signer,
        token_id: grant.token_id,
    };
    enrollment.write(data_dir)?;
    // Its copy is node.key now.
    let _ = std::fs::remove_file(data_dir.join(PENDING_KEY_FILE));
    info!(node = %enrollment.node, signer = %enrollment.signer, token = %enrollment.token_id, "enrolled in the cluster");
    Ok(enrollment)
}

/// How one attempt ended, if not with a grant.
enum Attempt {
    /// Ask the next address, and this one again later (unreachable, busy).
    Again(String),
    /// Ask the next address, never this one again (another cluster's node, not a signer).
    Never(String),
    /// Stop: every signer would say the same.
    Final(JoinError),
}

async fn ask_signer(addr: &str, claims: &JoinToken, body: &[u8]) -> Result<EnrollGrant, Attempt> {
    let again = |reason: String| Attempt::Again(reason);
    let tcp = TcpStream::connect(addr).await.map_err(|error| again(format!("cannot connect: {error}")))?;
    let verifier = Arc::new(PinnedCa {
        pin: claims.ca.clone(),
        provider: crypto_provider(),
        mismatch: std::sync::atomic::AtomicBool::new(false),
    });
    let config = rustls::ClientConfig::builder_with_details(crypto_provider(), Arc::new(WallTime))
        .with_safe_default_protocol_versions()
        .map_err(|error| again(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(SERVER_NAME).map_err(|error| again(error.to_string()))?;
    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|error| {
        if verifier.mismatch.load(std::sync::atomic::Ordering::Relaxed) {
            Attempt::Never(format!("TLS: {error}"))
        } else {
            again(format!("TLS: {error}"))
        }
    })?;
    // The chain the node presented: its certificate first, the pinned CA in it (checked).
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|chain| chain.iter().map(|cert| cert.clone().into_owned()).collect())
        .unwrap_or_default();
    let (Some(server_cert), Some(ca)) = (chain.first(), chain.iter().find(|cert| ca_pin(cert) == claims.ca)) else {
        return Err(Attempt::Never("the node's TLS chain lacks its certificate or the pinned CA".to_owned()));
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|error| again(format!("HTTP: {error}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });

    // The node proves it holds the CA key before it gets the token: any node of the cluster
    // passes the TLS check, only a signer passes this.
    let nonce: [u8; CHALLENGE_NONCE_BYTES] = rand::random();
    let challenge = serde_json::json!({ "nonce": STANDARD.encode(nonce) }).to_string();
    let (status, value) = post(&mut sender, addr, CHALLENGE_ROUTE, challenge.as_bytes()).await?;
    if !status.is_success() {
        return Err(refusal(addr, status, &value));
    }
    let signature = value["signature"].as_str().and_then(|text| STANDARD.decode(text).ok()).unwrap_or_default();
    if !crate::pki::verify_ca_signature(ca, &signer_proof_message(&nonce, server_cert.as_ref()), &signature) {
        return Err(Attempt::Never("it does not prove it holds the CA key: not a signer".to_owned()));
    }

    let (status, mut value) = post(&mut sender, addr, ENROLL_ROUTE, body).await?;
    if status.is_success() {
        if let Some(object) = value.as_object_mut() {
            object.remove("type");
        }
        return serde_json::from_value(value).map_err(|error| again(format!("the grant does not read: {error}")));
    }
    Err(refusal(addr, status, &value))
}

/// POSTs `body` to `route` on the connection; the answer's status and JSON.
async fn post(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: &str,
    route: &str,
    body: &[u8],
) -> Result<(hyper::StatusCode, serde_json::Value), Attempt> {
    let again = |reason: String| Attempt::Again(reason);
    let request = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(route)
        .header(hyper::header::HOST, addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|error| again(error.to_string()))?;
    sender.ready().await.map_err(|error| again(format!("connection lost: {error}")))?;
    let answer = sender.send_request(request).await.map_err(|error| again(format!("no answer: {error}")))?;
    let status = answer.status();
    let bytes = Limited::new(answer.into_body(), ANSWER_BYTES_MAX)
        .collect()
        .await
        .map_err(|error| again(format!("cannot read the answer: {error}")))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes).map_err(|_| again(format!("the answer ({status}) is not JSON")))?;
    Ok((status, value))
}

/// What an error answer means for the host.
fn refusal(addr: &str, status: hyper::StatusCode, value: &serde_json::Value) -> Attempt {
    let code = value["code"].as_str().unwrap_or("unknown").to_owned();
    let message = value["message"].as_str().unwrap_or("no message").to_owned();
    // Another signer may enroll us when this one cannot sign, is busy, or does not know the
    // route (an older node); a verdict on the token or the node id would be the same anywhere.
    if matches!(code.as_str(), "not_signer" | "not_found") {
        return Attempt::Never(format!("{code}: {message}"));
    }
    if matches!(code.as_str(), "unavailable" | "timeout") || status.is_server_error() {
        return Attempt::Again(format!("{code}: {message}"));
    }
    Attempt::Final(JoinError::Refused { addr: addr.to_owned(), code, message })
}

/// Accepts a server whose chain holds the pinned CA and whose certificate chains to it.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Set when the node presented no certificate with the pin (not a transient failure).
    mismatch: std::sync::atomic::AtomicBool,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|cert| ca_pin(cert) == self.pin).ok_or_else(|| {
            self.mismatch.store(true, std::sync::atomic::Ordering::Relaxed);
            rustls::Error::General(
                "the node does not present the CA the join token pins: it is another cluster's, or older than enrollment"
                    .to_owned(),
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|error| rustls::Error::General(error.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
