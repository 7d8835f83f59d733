//! Join tokens (issue 17, item 1; SPEC F22): what lets a host with no credentials enroll.
//!
//! A token is `konor-join.<claims>.<mac>`, both parts base64url. The claims (JSON) say when the
//! token expires, how many hosts it may enroll, optionally the node id and labels it gives, and
//! the SHA-256 of the cluster CA's certificate: the joining host reads that pin and talks only
//! to a node whose certificate chains to that CA, as kubeadm's discovery hash does, so the token
//! is never sent to the wrong cluster. The MAC is an HMAC-SHA256 keyed by a hash of the CA key
//! ([`Signer::token_key`](super::ca::Signer::token_key)): only a holder of the CA key mints a
//! token, and every signer checks any signer's token without shared state. Whoever holds the
//! text holds the right to enroll, so it is a secret: konorctl writes it to a 0600 file or to
//! stdout, and konord reads it from a file or the environment, never from its command line.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use konor_sdk::Secret;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{ca_pin, validate_node_id};

/// What every token's text starts with.
pub const TOKEN_PREFIX: &str = "konor-join";

/// Longest token text, in bytes: the claims with 16 labels of 64+64 bytes fit well within it,
/// and a token travels in an HTTP body and an environment variable.
pub const JOIN_TOKEN_BYTES_MAX: usize = 4096;

/// Longest lifetime of a token: a token is a secret that admits hosts, so it should be spent
/// within the hour it is made; a week covers a rollout over a weekend.
pub const JOIN_TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Most hosts one token may enroll: a signer records each (`enroll/grants.rs`), and a fleet
/// larger than this is enrolled with several tokens.
pub const JOIN_TOKEN_USES_MAX: u32 = 100;

/// Most labels one token may give.
pub const JOIN_TOKEN_LABELS_MAX: usize = 16;

/// Bytes of a token id (random, shown as hex): enough that two tokens never share one.
const TOKEN_ID_BYTES: usize = 8;

/// The claims' format.
const CLAIMS_VERSION: u32 = 1;

/// Domain separation of the MAC: the key derived from the CA key signs nothing else.
const MAC_CONTEXT: &[u8] = b"konor-join-token-v1\0";

/// What a token says. Its MAC covers the exact bytes it was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Format of the claims.
    pub v: u32,
    /// Random id (hex): names the token in logs and in the record of its uses, never the secret.
    pub id: String,
    /// When it stops admitting hosts (Unix milliseconds).
    pub expires_ms: u64,
    /// How many distinct hosts it may enroll.
    pub uses: u32,
    /// SHA-256 (hex) of the cluster CA's certificate (DER).
    pub ca: String,
    /// The node id the host gets; `None`: the host names itself (a node id no node uses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Labels the host gets, over those it gives itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What `konorctl token create` asks for.
#[derive(Debug, Clone, Default)]
pub struct TokenPolicy {
    /// Lifetime, at most [`JOIN_TOKEN_TTL_MAX`].
    pub ttl: Duration,
    /// Hosts it may enroll, 1 to [`JOIN_TOKEN_USES_MAX`].
    pub uses: u32,
    /// The node id it gives.
    pub node: Option<String>,
    /// Labels it gives.
    pub labels: BTreeMap<String, String>,
}

/// Why a token is refused. The variants a signer counts are named in `enroll/`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The text is not a token.
    #[error("the join token does not read: {0}")]
    Malformed(String),
    /// The token pins another cluster's CA.
    #[error(
        "the join token is for another cluster (it pins CA {pinned}, this cluster's is {ours}); make a token on this cluster"
    )]
    WrongCluster { pinned: String, ours: String },
    /// The MAC does not match: the token was altered or not made with this cluster's CA key.
    #[error("the join token is forged or altered (its MAC does not match this cluster's CA key)")]
    Forged,
    /// The token's time is over.
    #[error("the join token {id} expired {ago_s} s ago; make a new one with konorctl token create")]
    Expired { id: String, ago_s: u64 },
    /// The policy asked for is out of bounds.
    #[error("{0}")]
    Policy(String),
}

/// Mints a token under `policy` that expires `policy.ttl` after `now_ms`; the token and its text.
pub fn mint(
    ca_cert: &CertificateDer<'_>,
    key: &Secret<[u8; 32]>,
    policy: &TokenPolicy,
    now_ms: u64,
) -> Result<(JoinToken, Secret<String>), TokenError> {
    check_policy(policy)?;
    let id_bytes: [u8; TOKEN_ID_BYTES] = rand::random();
    let token = JoinToken {
        v: CLAIMS_VERSION,
        id: hex(&id_bytes),
        expires_ms: now_ms.saturating_add(policy.ttl.as_millis() as u64),
        uses: policy.uses,
        ca: ca_pin(ca_cert),
        node: policy.node.clone(),
        labels: policy.labels.clone(),
    };
    let claims = serde_json::to_vec(&token).map_err(|error| TokenError::Malformed(error.to_string()))?;
    let tag = keyed(key, &claims)?.finalize().into_bytes().to_vec();
    let text = format!("{TOKEN_PREFIX}.{}.{}", URL_SAFE_NO_PAD.encode(&claims), URL_SAFE_NO_PAD.encode(tag));
    Ok((token, Secret::new(text)))
}

/// The bounds of a policy: lifetime, uses, node id, labels.
fn check_policy(policy: &TokenPolicy) -> Result<(), TokenError> {
    let refuse = |message: String| Err(TokenError::Policy(message));
    if policy.ttl.is_zero() || policy.ttl > JOIN_TOKEN_TTL_MAX {
        return refuse(format!(
            "a token lives between 1 s and {} h (asked: {} s)",
            JOIN_TOKEN_TTL_MAX.as_secs() / 3600,
            policy.ttl.as_secs()
        ));
    }
    if !(1..=JOIN_TOKEN_USES_MAX).contains(&policy.uses) {
        return refuse(format!("a token enrolls 1 to {JOIN_TOKEN_USES_MAX} hosts (asked: {})", policy.uses));
    }
    if let Some(node) = &policy.node {
        validate_node_id(node).map_err(|error| TokenError::Policy(error.to_string()))?;
        if policy.uses != 1 {
            return refuse("a token that names a node id enrolls one host (--uses 1)".to_owned());
        }
    }
    if policy.labels.len() > JOIN_TOKEN_LABELS_MAX {
        return refuse(format!("a token gives at most {JOIN_TOKEN_LABELS_MAX} labels"));
    }
    Ok(())
}

/// The claims of `text` without checking its MAC: what a joining host reads (the CA pin and
/// the node id), and the first step of [`verify`].
pub fn read_claims(text: &str) -> Result<JoinToken, TokenError> {
    split(text).map(|(token, _, _)| token)
}

/// Checks `text` as a signer does: it pins `ca_cert`, its MAC is `key`'s, and it has not
/// expired at `now_ms`.
pub fn verify(
    text: &str,
    ca_cert: &CertificateDer<'_>,
    key: &Secret<[u8; 32]>,
    now_ms: u64,
) -> Result<JoinToken, TokenError> {
    let (token, claims, tag) = split(text)?;
    let ours = ca_pin(ca_cert);
    if token.ca != ours {
        return Err(TokenError::WrongCluster { pinned: token.ca, ours });
    }
    keyed(key, &claims)?.verify_slice(&tag).map_err(|_| TokenError::Forged)?;
    if token.expires_ms <= now_ms {
        return Err(TokenError::Expired { id: token.id, ago_s: (now_ms - token.expires_ms) / 1000 });
    }
    // Minted tokens always pass; a token that does not was made by other code with the key.
    check_claims(&token)?;
    Ok(token)
}

/// The claims, their exact bytes and the MAC of a token's text.
fn split(text: &str) -> Result<(JoinToken, Vec<u8>, Vec<u8>), TokenError> {
    let malformed = |what: &str| TokenError::Malformed(what.to_owned());
    let text = text.trim();
    if text.len() > JOIN_TOKEN_BYTES_MAX {
        return Err(malformed(&format!("it is longer than {JOIN_TOKEN_BYTES_MAX} bytes")));
    }
    let mut parts = text.split('.');
    let (Some(prefix), Some(claims), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed(&format!("it is not {TOKEN_PREFIX}.<claims>.<mac>")));
    };
    if prefix != TOKEN_PREFIX {
        return Err(malformed(&format!("it does not start with {TOKEN_PREFIX}.")));
    }
    let claims = URL_SAFE_NO_PAD.decode(claims).map_err(|_| malformed("its claims are not base64url"))?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| malformed("its MAC is not base64url"))?;
    let token: JoinToken =
        serde_json::from_slice(&claims).map_err(|error| malformed(&format!("its claims: {error}")))?;
    if token.v != CLAIMS_VERSION {
        return Err(malformed(&format!("claims format {} (this build reads {CLAIMS_VERSION})", token.v)));
    }
    Ok((token, claims, tag))
}

/// The claims' own bounds.
fn check_claims(token: &JoinToken) -> Result<(), TokenError> {
    let bad = |what: &str| TokenError::Malformed(what.to_owned());
    if token.id.len() != TOKEN_ID_BYTES * 2 || !token.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("its id is not 16 hex digits"));
    }
    if !(1..=JOIN_TOKEN_USES_MAX).contains(&token.uses) {
        return Err(bad("its uses are out of bounds"));
    }
    if token.node.as_deref().is_some_and(|node| validate_node_id(node).is_err()) {
        return Err(bad("its node id is not valid"));
    }
    if token.labels.len() > JOIN_TOKEN_LABELS_MAX {
        return Err(bad("it gives too many labels"));
    }
    Ok(())
}

/// The MAC over `claims` under `key`, to finish or to check.
fn keyed(key: &Secret<[u8; 32]>, claims: &[u8]) -> Result<Hmac<Sha256>, TokenError> {
    // HMAC takes a key of any length, so this never fails.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key.expose())
        .map_err(|_| TokenError::Malformed("the MAC key is not usable".to_owned()))?;
    mac.update(MAC_CONTEXT);
    mac.update(claims);
    Ok(mac)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ca::{Signer, init_ca};

    fn signer(dir: &std::path::Path) -> Signer {
        init_ca(dir).unwrap();
        Signer::load(dir).unwrap().unwrap()
    }

    fn policy() -> TokenPolicy {
        TokenPolicy { ttl: Duration::from_secs(600), uses: 2, node: None, labels: BTreeMap::new() }
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let root = tempfile::tempdir().unwrap();
        let signer = signer(root.path());
        let (token, text) = mint(signer.ca_cert(), &signer.token_key(), &policy(), 1_000_000).unwrap();
        let read = verify(text.expose(), signer.ca_cert(), &signer.token_key(), 1_000_000 + 599_999).unwrap();
        assert_eq!(read, token);
        assert_eq!(read_claims(text.expose()).unwrap().ca, ca_pin(signer.ca_cert()));
        let expired = verify(text.expose(), signer.ca_cert(), &signer.token_key(), 1_000_000 + 602_000).unwrap_err();
        assert_eq!(expired, TokenError::Expired { id: token.id, ago_s: 2 });
    }

    #[test]
    fn an_altered_token_is_forged_and_another_clusters_is_wrong_cluster() {
        let root = tempfile::tempdir().unwrap();
        let ours = signer(&root.path().join("ours"));
        let theirs = signer(&root.path().join("theirs"));
        let (_, text) = mint(ours.ca_cert(), &ours.token_key(), &policy(), 0).unwrap();
        let (prefix_claims, _) = text.expose().rsplit_once('.').unwrap();

        // More uses, same MAC.
        let mut claims = read_claims(text.expose()).unwrap();
        claims.uses = 50;
        let (_, tag) = text.expose().rsplit_once('.').unwrap();
        let altered = format!("{TOKEN_PREFIX}.{}.{tag}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()));
        assert_eq!(verify(&altered, ours.ca_cert(), &ours.token_key(), 1).unwrap_err(), TokenError::Forged);
        // Claims re-MACed by a key that is not the CA's.
        let stranger = Secret::new([7u8; 32]);
        let claims_bytes = URL_SAFE_NO_PAD.decode(prefix_claims.split('.').nth(1).unwrap()).unwrap();
        let forged = format!(
            "{prefix_claims}.{}",
            URL_SAFE_NO_PAD.encode(keyed(&stranger, &claims_bytes).unwrap().finalize().into_bytes())
        );
        assert_eq!(verify(&forged, ours.ca_cert(), &ours.token_key(), 1).unwrap_err(), TokenError::Forged);
        // Another cluster's token.
        let (_, theirs_text) = mint(theirs.ca_cert(), &theirs.token_key(), &policy(), 0).unwrap();
        assert!(matches!(
            verify(theirs_text.expose(), ours.ca_cert(), &ours.token_key(), 1),
            Err(TokenError::WrongCluster { .. })
        ));
    }

    #[test]
    fn text_that_is_not_a_token_says_why() {
        let root = tempfile::tempdir().unwrap();
        let signer = signer(root.path());
        let long = "x".repeat(JOIN_TOKEN_BYTES_MAX + 1);
        let messages: Vec<String> =
            ["", "konor-join.a", "other.e30.e30", "konor-join.!!.AA", "konor-join.e30.AA", &long]
                .into_iter()
                .map(|text| verify(text, signer.ca_cert(), &signer.token_key(), 0).unwrap_err().to_string())
                .collect();
        expect_test::expect![[r#"
            the join token does not read: it is not konor-join.<claims>.<mac>
            the join token does not read: it is not konor-join.<claims>.<mac>
            the join token does not read: it does not start with konor-join.
            the join token does not read: its claims are not base64url
            the join token does not read: its claims: missing field `v` at line 1 column 2
            the join token does not read: it is longer than 4096 bytes"#]]
        .assert_eq(&messages.join("\n"));
    }

    #[test]
    fn policies_out_of_bounds_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let signer = signer(root.path());
        let mut labels = BTreeMap::new();
        for i in 0..=JOIN_TOKEN_LABELS_MAX {
            labels.insert(format!("k{i}"), "v".to_owned());
        }
        let cases = [
            TokenPolicy { ttl: Duration::ZERO, ..policy() },
            TokenPolicy { ttl: JOIN_TOKEN_TTL_MAX + Duration::from_secs(1), ..policy() },
            TokenPolicy { uses: 0, ..policy() },
            TokenPolicy { uses: JOIN_TOKEN_USES_MAX + 1, ..policy() },
            TokenPolicy { node: Some("n1".to_owned()), ..policy() },
            TokenPolicy { node: Some("N1".to_owned()), uses: 1, ..policy() },
            TokenPolicy { labels, ..policy() },
        ];
        let messages: Vec<String> = cases
            .iter()
            .map(|policy| mint(signer.ca_cert(), &signer.token_key(), policy, 0).unwrap_err().to_string())
            .collect();
        expect_test::expect![[r#"
            a token lives between 1 s and 168 h (asked: 0 s)
            a token lives between 1 s and 168 h (asked: 604801 s)
            a token enrolls 1 to 100 hosts (asked: 0)
            a token enrolls 1 to 100 hosts (asked: 101)
            a token that names a node id enrolls one host (--uses 1)
            invalid node id 'N1': character 'N' is not allowed; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
            a token gives at most 16 labels"#]]
        .assert_eq(&messages.join("\n"));
    }
}
