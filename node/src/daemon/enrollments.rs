//! Enrollment in the daemon (issue 17, item 1): a signer answers a host that enrolls with a
//! join token (the HTTP door's `POST /api/v1/enroll` hands it over as `LocalCall::Enroll`).
//! The token, the proof and the decision are checked in `pki/join_token.rs` and `enroll/`; here
//! the daemon gives them what the mesh knows, records the grant, issues the certificate and
//! spreads the token's use count through gossip (`tok:<id>`), so each signer counts the uses
//! made at the others.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::Daemon;
use crate::enroll::decide::{Facts, decide};
use crate::enroll::grants::{Grant, Grants};
use crate::enroll::{EnrollAsk, EnrollGrant, PUBLIC_KEY_BYTES, Refusal, proof_message};
use crate::peer::membership::Liveness;
use crate::pki::ca::Signer;
use crate::pki::join_token;

/// Prefix of the gossip keys that carry how many hosts a token enrolled at a signer
/// (`tok:<token id>` = `<count> <expires ms>`).
pub const TOKEN_USES_PREFIX: &str = "tok:";

/// Most seeds a grant names: enough to find the mesh if some are down.
const GRANT_SEEDS_MAX: usize = 8;

/// What a signer keeps.
pub(super) struct Enrollment {
    signer: Arc<Signer>,
    /// The grants made here; the error when the record does not read (enrollment is refused
    /// then: uses could not be counted).
    grants: Result<Grants, String>,
    /// Uses of each token at other signers, as their gossip says.
    used_elsewhere: BTreeMap<String, u32>,
    /// The cluster's name, for the grant.
    cluster: String,
    /// Whether the other signers' gossiped uses were read since the start (refused before).
    followed: bool,
    /// When they were last read.
    followed_at: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment").field("signer", &self.signer).finish_non_exhaustive()
    }
}

impl Enrollment {
    /// A signer's enrollment state, the grants read from `data_dir`.
    pub(super) fn new(signer: Arc<Signer>, data_dir: &std::path::Path, cluster: String) -> Enrollment {
        let grants = Grants::load(data_dir);
        if let Err(error) = &grants {
            tracing::error!(%error, "the record of join-token grants does not read: this node refuses to enroll hosts until it is fixed or removed");
        }
        Enrollment { signer, grants, used_elsewhere: BTreeMap::new(), cluster, followed: false, followed_at: None }
    }
}

impl Daemon {
    /// Answers a host that enrolls from `remote`; counts and logs the outcome.
    pub(super) fn enroll(&mut self, ask: EnrollAsk, remote: std::net::SocketAddr) -> Result<EnrollGrant, Refusal> {
        let outcome = self.enroll_checked(ask);
        match &outcome {
            Ok(grant) => {
                self.metrics.enrollments.count("issued");
                info!(node = %grant.node, token = %grant.token_id, %remote, "enrolled a host: certificate issued");
            }
            Err(refusal) => {
                self.metrics.enrollments.count(refusal.code());
                if let Some(refused_so_far) = crate::api::authorize::refusal_to_log() {
                    warn!(%remote, code = refusal.code(), %refusal, refused_so_far, "enrollment refused");
                }
            }
        }
        outcome
    }

    fn enroll_checked(&mut self, ask: EnrollAsk) -> Result<EnrollGrant, Refusal> {
        let now_ms = self.wall_now_ms();
        let seeds = self.grant_seeds();
        let mut known: BTreeMap<String, bool> = self
            .mesh
            .nodes
            .values()
            .map(|node| (node.id.clone(), matches!(node.liveness, Liveness::Live | Liveness::Unknown)))
            .collect();
        known.insert(self.node_id.clone(), true);
        let node_id = self.node_id.clone();
        let view_ready = self.view_delivered;
        let revocations = self.revocations.clone();
        let Some(enrollment) = self.enrollment.as_mut() else { return Err(Refusal::NotSigner) };
        // Until this node has a view of the mesh and the other signers' counts, it cannot tell
        // a taken id or a used-up token: the host asks again or asks another signer.
        if !view_ready || !enrollment.followed {
            return Err(Refusal::Unavailable("it has just started and does not see the mesh yet".to_owned()));
        }
        let signer = enrollment.signer.clone();
        let token = join_token::verify(ask.token.expose(), signer.ca_cert(), &signer.token_key(), now_ms)?;
        let bad = |what: &str| Refusal::BadRequest(what.to_owned());
        let public_key = STANDARD.decode(&ask.public_key).map_err(|_| bad("public_key is not base64"))?;
        if public_key.len() != PUBLIC_KEY_BYTES || public_key[0] != 4 {
            return Err(bad("public_key is not a P-256 public key (an uncompressed point of 65 bytes)"));
        }
        let proof = STANDARD.decode(&ask.proof).map_err(|_| bad("proof is not base64"))?;
        let message = proof_message(&token.id, ask.node.as_deref(), &public_key);
        webpki::ring::ECDSA_P256_SHA256
            .verify_signature(&public_key, &message, &proof)
            .map_err(|_| bad("the proof of possession does not verify under public_key"))?;
        let key_hash: String = Sha256::digest(&public_key).iter().map(|byte| format!("{byte:02x}")).collect();
        let grants = enrollment.grants.as_mut().map_err(|error| Refusal::Unavailable(error.clone()))?;
        let asked = token.node.as_deref().or(ask.node.as_deref()).unwrap_or_default();
        let revoked_at_ms = revocations
            .iter()
            .flat_map(|revocations| revocations.list())
            .filter(|(_, signed)| signed.revocation.node == asked && signed.revocation.serial.is_none())
            .map(|(_, signed)| signed.revocation.revoked_at_ms)
            .max();
        let facts = Facts {
            known,
            granted_here: grants.of(&token.id),
            used_elsewhere: enrollment.used_elsewhere.get(&token.id).copied().unwrap_or(0),
            granted_under_other_token: grants.granted_elsewhere(asked, &token.id),
            revoked_at_ms,
        };
        let decision = decide(&token, ask.node.as_deref(), &key_hash, &facts)?;
        let certificate = signer
            .issue_for_key(&decision.node, &public_key)
            .map_err(|error| Refusal::Unavailable(error.to_string()))?;
        if decision.new_use {
            let grant = Grant { node: decision.node.clone(), key: key_hash, at_ms: now_ms };
            grants.record(&token.id, token.expires_ms, grant, now_ms).map_err(Refusal::Unavailable)?;
            let count = grants.of(&token.id).len();
            self.membership
                .publish(&format!("{TOKEN_USES_PREFIX}{}", token.id), &format!("{count} {}", token.expires_ms));
        }
        let enrollment = self.enrollment.as_ref().ok_or(Refusal::NotSigner)?;
        Ok(EnrollGrant {
            node: decision.node,
            certificate,
            ca: String::from_utf8_lossy(signer.ca_pem()).into_owned(),
            cluster: enrollment.cluster.clone(),
            labels: token.labels,
            seeds,
            signer: node_id,
            token_id: token.id,
        })
    }

    /// Peer addresses a new host joins through: this node's, then live peers'.
    fn grant_seeds(&self) -> Vec<String> {
        let own = self.network.local_addr();
        let mut seeds = vec![own.to_string()];
        let peers = self.mesh.nodes.values().filter(|node| node.id != self.node_id && node.liveness == Liveness::Live);
        seeds.extend(peers.map(|node| node.addr.to_string()).take(GRANT_SEEDS_MAX - 1));
        seeds
    }

    /// Publishes the use counts held at start, so other signers count them after a restart.
    pub(super) fn publish_token_uses(&mut self) {
        let now_ms = self.wall_now_ms();
        let Some(Enrollment { grants: Ok(grants), .. }) = &self.enrollment else { return };
        for (id, count, expires_ms) in grants.counts(now_ms) {
            self.membership.publish(&format!("{TOKEN_USES_PREFIX}{id}"), &format!("{count} {expires_ms}"));
        }
    }

    /// Reads the uses other signers gossip, at most every `REVOCATION_FOLLOW_INTERVAL`.
    pub(super) async fn follow_token_uses(&mut self) {
        let Some(enrollment) = self.enrollment.as_mut() else { return };
        let interval = super::revocations::REVOCATION_FOLLOW_INTERVAL;
        if enrollment.followed_at.is_some_and(|at| at.elapsed() < interval) {
            return;
        }
        enrollment.followed_at = Some(tokio::time::Instant::now());
        let own = self.node_id.clone();
        let now_ms = self.wall_now_ms();
        let gossiped = self.membership.values_with_prefix(TOKEN_USES_PREFIX, |_, _| false).await;
        let mut used: BTreeMap<String, u32> = BTreeMap::new();
        for (node, key, value) in gossiped {
            let Some((count, expires_ms)) = value.split_once(' ') else { continue };
            let (Ok(count), Ok(expires_ms)) = (count.parse::<u32>(), expires_ms.parse::<u64>()) else { continue };
            if node == own || expires_ms <= now_ms {
                continue;
            }
            let id = key[TOKEN_USES_PREFIX.len()..].to_owned();
            let total = used.entry(id).or_default();
            *total = total.saturating_add(count);
        }
        if let Some(enrollment) = self.enrollment.as_mut() {
            enrollment.used_elsewhere = used;
            enrollment.followed = true;
        }
    }
}
