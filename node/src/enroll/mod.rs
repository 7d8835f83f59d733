//! Enrollment with join tokens (issue 17, item 1; SPEC F22): a host with no credentials gets
//! its certificate from a node that holds the CA key, and nothing is copied by hand.
//!
//! The host (`konord --join ADDR --token-file FILE`, [`client`]) makes its own key pair, reads
//! the CA pin from the token ([`crate::pki::join_token`]) and talks only to a node whose
//! certificate chains to that CA; it sends the token, its public key and a proof that it holds
//! the private key. A signer (a node whose TLS directory holds `ca.key`) checks the token, the
//! proof, the node id and the token's uses ([`decide`]), records the grant durably
//! ([`grants`]) and answers the certificate, the cluster's name, the labels the token gives and
//! the signer's peer address to join through. The HTTP API serves it (`POST /api/v1/enroll`,
//! the one write that needs no client certificate: the token is the credential); the daemon
//! decides (`daemon/enrollments.rs`).
//!
//! Signing authority: every node holding `ca.key` signs; an operator makes a node a signer by
//! issuing its certificate with `konorctl cert issue --signer`. With two or more signers the
//! cluster keeps enrolling when any one is down (the host tries each `--join` address in turn).

pub mod client;
pub mod decide;
pub mod grants;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pki::join_token::TokenError;

/// The route a signer answers enrollment on.
pub const ENROLL_ROUTE: &str = "/api/v1/enroll";

/// The route where a signer proves it holds the CA key, before a host sends it a token.
pub const CHALLENGE_ROUTE: &str = "/api/v1/enroll/challenge";

/// Domain separation of the proof of possession.
const PROOF_CONTEXT: &[u8] = b"konor-enroll-v1\0";

/// Domain separation of a signer's proof: the CA key signs nothing else that starts so (a
/// revocation starts `konor-revocation-v1`, a certificate with a DER sequence).
const SIGNER_PROOF_CONTEXT: &[u8] = b"konor-signer-proof-v1\0";

/// Bytes of the nonce a host sends a signer.
pub const CHALLENGE_NONCE_BYTES: usize = 32;

/// What a signer signs with the CA key to show a host it is one: the host's fresh nonce and the
/// certificate the signer presented on this TLS connection, so a node relaying the challenge to
/// a real signer gets a proof for that signer's certificate, not its own.
pub fn signer_proof_message(nonce: &[u8], server_cert: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut message = SIGNER_PROOF_CONTEXT.to_vec();
    message.extend_from_slice(&(nonce.len() as u32).to_be_bytes());
    message.extend_from_slice(nonce);
    message.extend_from_slice(&sha2::Sha256::digest(server_cert));
    message
}

/// Bytes of a P-256 public key as an uncompressed point, the only key a host may enroll.
pub const PUBLIC_KEY_BYTES: usize = 65;

/// What a joining host sends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollAsk {
    /// The join token's text (never in `Debug`, so never in a log line).
    pub token: konor_sdk::Secret,
    /// The node id the host asks for (`--node-id`); the token's, when it names one, wins.
    #[serde(default)]
    pub node: Option<String>,
    /// The host's P-256 public key (uncompressed point), base64.
    pub public_key: String,
    /// ECDSA P-256 SHA-256 signature (ASN.1) of [`proof_message`], base64: the host holds the
    /// private key of `public_key`.
    pub proof: String,
}

/// What a signer answers a host it enrolls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollGrant {
    /// The host's node id.
    pub node: String,
    /// Its certificate (PEM).
    pub certificate: String,
    /// The cluster CA's certificate (PEM).
    pub ca: String,
    /// The cluster's name (`--cluster`).
    pub cluster: String,
    /// Labels the token gives.
    pub labels: BTreeMap<String, String>,
    /// Peer addresses to join through (the signer's own).
    pub seeds: Vec<String>,
    /// The signer's node id.
    pub signer: String,
    /// The token's id (never its secret).
    pub token_id: String,
}

/// The bytes a host signs to prove it holds its key: bound to the token and the node id asked,
/// so a proof does not serve another request.
pub fn proof_message(token_id: &str, node: Option<&str>, public_key: &[u8]) -> Vec<u8> {
    let mut message = PROOF_CONTEXT.to_vec();
    for part in [token_id.as_bytes(), node.unwrap_or_default().as_bytes(), public_key] {
        message.extend_from_slice(&(part.len() as u32).to_be_bytes());
        message.extend_from_slice(part);
    }
    message
}

/// Why a signer refuses to enroll a host. Each is counted (`konord_enrollments_total`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The token is malformed, forged, expired or another cluster's.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The token has enrolled as many hosts as it may.
    #[error("the join token {id} is used up: it enrolls {uses} host(s) and has enrolled {used}")]
    UsedUp { id: String, uses: u32, used: u32 },
    /// The node id is a member's.
    #[error(
        "node id '{node}' is taken: a node of that id is in the mesh ({state}); choose another, or make a token \
         that names it (--node-id) to re-enroll a replaced host once the old one is stopped"
    )]
    NodeTaken { node: String, state: &'static str },
    /// Neither the token nor the host names a node id.
    #[error("no node id: the token names none, so the host must give one (konord --node-id)")]
    NoNodeId,
    /// The host asks for another id than the token gives.
    #[error("the join token is for node '{token}', not '{asked}'")]
    NodeMismatch { token: String, asked: String },
    /// The request does not read, or its proof of possession fails.
    #[error("bad enrollment request: {0}")]
    BadRequest(String),
    /// This node holds no CA key.
    #[error(
        "this node cannot sign certificates (its TLS directory holds no ca.key); join through a signer \
         (a node issued with konorctl cert issue --signer)"
    )]
    NotSigner,
    /// This signer cannot record the grant (its disk, or too many live tokens).
    #[error("this signer cannot enroll now: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The error code the HTTP door answers (and the label it is counted under).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Token(TokenError::Malformed(_) | TokenError::Policy(_)) => "token_malformed",
            Refusal::Token(TokenError::Forged) => "token_forged",
            Refusal::Token(TokenError::Expired { .. }) => "token_expired",
            Refusal::Token(TokenError::WrongCluster { .. }) => "wrong_cluster",
            Refusal::UsedUp { .. } => "token_used_up",
            Refusal::NodeTaken { .. } | Refusal::NoNodeId | Refusal::NodeMismatch { .. } => "node_id",
            Refusal::BadRequest(_) => "bad_request",
            Refusal::NotSigner => "not_signer",
            Refusal::Unavailable(_) => "unavailable",
        }
    }

    /// Whether asking another signer, or this one later, may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, Refusal::NotSigner | Refusal::Unavailable(_))
    }
}

/// Every outcome an enrollment is counted under, in the order `/metrics` shows them.
pub const OUTCOMES: [&str; 10] = [
    "issued",
    "token_malformed",
    "token_forged",
    "token_expired",
    "wrong_cluster",
    "token_used_up",
    "node_id",
    "bad_request",
    "not_signer",
    "unavailable",
];

/// Enrollments answered, by outcome (indexes of [`OUTCOMES`]).
#[derive(Debug, Default)]
pub struct EnrollCounters {
    counts: [std::sync::atomic::AtomicU64; OUTCOMES.len()],
}

impl EnrollCounters {
    /// Counts one answer with `outcome` (one of [`OUTCOMES`]).
    pub fn count(&self, outcome: &str) {
        if let Some(index) = OUTCOMES.iter().position(|known| *known == outcome) {
            self.counts[index].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Each outcome with its count.
    pub fn read(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        OUTCOMES
            .iter()
            .zip(&self.counts)
            .map(|(outcome, count)| (*outcome, count.load(std::sync::atomic::Ordering::Relaxed)))
    }
}
