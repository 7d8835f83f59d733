//! Certificate revocations in the daemon (issue 17, item 2): stored from the socket or the HTTP
//! API (`revoke`), listed (`revocations`), and spread through gossip. Each revocation a node
//! holds is published under its own `rev:<id>` key, and every node adopts the valid ones it
//! reads under any node's, so one reaches every node whichever node it entered by and stays in
//! the mesh when that node is gone. The checks themselves (signature, bounds, coverage) are in
//! `pki/revocation.rs`; what a new revocation closes is in `peer/` (handshakes, connections,
//! the gossip filter).

use std::time::Duration;

use tokio::time::Instant;

use konor_sdk::protocol::{ErrorCode, Response, RevocationRow};
use tracing::{error, info, warn};

use super::{Daemon, error_response};
use crate::pki::revocation::{Added, REVOCATIONS_MAX, RevocationError, SignedRevocation};

/// Prefix of the gossip keys that carry revocations (`rev:<id>`).
pub const REVOCATION_PREFIX: &str = "rev:";

/// How often a node reads the revocations its peers gossip. Together with the gossip's own
/// spread this bounds how long a revoked node keeps talking to a node that has not heard yet.
pub const REVOCATION_FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

impl Daemon {
    /// `revoke`: checks and stores a signed revocation, publishes it.
    pub(super) fn revoke(&mut self, text: &str) -> Response {
        let Some(revocations) = self.revocations.clone() else {
            return error_response(ErrorCode::Unavailable, "this node holds no certificates to revoke (simulator)");
        };
        let signed = match SignedRevocation::decode(text) {
            Ok(signed) => signed,
            Err(error) => return error_response(ErrorCode::BadRequest, error.to_string()),
        };
        match revocations.add(&signed, self.wall_now_ms()) {
            Ok(added) => {
                let id = signed.id();
                let new = added == Added::New;
                if new {
                    warn!(node = %signed.revocation.node, serial = ?signed.revocation.serial, %id, reason = %signed.revocation.reason, "certificate revoked");
                }
                if added != Added::Lapsed {
                    self.membership.publish(&format!("{REVOCATION_PREFIX}{id}"), &signed.encode());
                }
                match added {
                    Added::Lapsed => error_response(
                        ErrorCode::BadRequest,
                        "the revocation is older than any certificate it could cover (a year); nothing to do",
                    ),
                    _ => Response::Revoked { id, new },
                }
            }
            Err(error @ RevocationError::NotSignedByCa { .. }) => {
                error_response(ErrorCode::Forbidden, error.to_string())
            }
            Err(error @ RevocationError::File { .. }) => error_response(ErrorCode::Internal, error.to_string()),
            Err(error) => error_response(ErrorCode::BadRequest, error.to_string()),
        }
    }

    /// `revocations`: every revocation held here.
    pub(super) fn revocation_rows(&self) -> Response {
        let rows = self
            .revocations
            .as_ref()
            .map(|revocations| revocations.list())
            .unwrap_or_default()
            .into_iter()
            .map(|(id, signed)| RevocationRow {
                id,
                node: signed.revocation.node,
                serial: signed.revocation.serial,
                revoked_at_ms: signed.revocation.revoked_at_ms,
                reason: signed.revocation.reason,
            })
            .collect();
        Response::Revocations { revocations: rows }
    }

    /// Publishes the revocations held at start (they may have come while this node was down
    /// elsewhere, or this node may be the last to hold one).
    pub(super) fn publish_revocations(&mut self) {
        let Some(revocations) = &self.revocations else { return };
        for (id, signed) in revocations.list() {
            self.membership.publish(&format!("{REVOCATION_PREFIX}{id}"), &signed.encode());
        }
    }

    /// Adopts the revocations peers gossip that this node does not hold yet, at most every
    /// [`REVOCATION_FOLLOW_INTERVAL`].
    pub(super) async fn follow_revocations(&mut self) {
        let Some(revocations) = self.revocations.clone() else { return };
        if self.revocations_followed.elapsed() < REVOCATION_FOLLOW_INTERVAL {
            return;
        }
        self.revocations_followed = Instant::now();
        let held: std::collections::BTreeSet<String> =
            revocations.list().into_iter().map(|(id, _)| format!("{REVOCATION_PREFIX}{id}")).collect();
        let refused = &self.revocations_refused;
        let gossiped = self
            .membership
            .values_with_prefix(REVOCATION_PREFIX, |key, value| {
                held.contains(key) || refused.get(key).is_some_and(|refused| refused == value)
            })
            .await;
        let now_ms = self.wall_now_ms();
        for (node, key, value) in gossiped {
            let id = &key[REVOCATION_PREFIX.len()..];
            let signed = match SignedRevocation::decode(&value) {
                Ok(signed) if signed.id() == id => signed,
                Ok(_) | Err(_) => {
                    warn!(from = %node, %key, "a peer gossips a revocation that does not read; ignored");
                    self.remember_refused(key, value);
                    continue;
                }
            };
            match revocations.add(&signed, now_ms) {
                Ok(Added::New) => {
                    info!(from = %node, revoked = %signed.revocation.node, %id, "certificate revoked (learned from a peer)");
                    self.membership.publish(&key, &signed.encode());
                    self.revocations_failing.remove(&key);
                }
                Ok(Added::Known) => {}
                // Not kept; remembered so it is not decoded again every round.
                Ok(Added::Lapsed) => self.remember_refused(key, value),
                Err(error @ (RevocationError::File { .. } | RevocationError::Full)) => {
                    // This node's trouble, not the value's: tried again next round, said once.
                    if self.revocations_failing.len() < REVOCATIONS_MAX && self.revocations_failing.insert(key.clone())
                    {
                        error!(from = %node, %key, %error, "cannot store a revocation a peer gossips; retrying");
                    }
                }
                Err(error) => {
                    warn!(from = %node, %key, %error, "a peer gossips a revocation this node refuses");
                    self.remember_refused(key, value);
                }
            }
        }
    }

    /// Remembers a gossiped value refused for good (it does not read, is not the CA's, or has
    /// lapsed), so it is neither checked nor warned about again. Bounded: past
    /// [`REVOCATIONS_MAX`] the first entry makes room.
    fn remember_refused(&mut self, key: String, value: String) {
        if self.revocations_refused.len() >= REVOCATIONS_MAX {
            self.revocations_refused.pop_first();
        }
        self.revocations_refused.insert(key, value);
    }

    pub(super) fn wall_now_ms(&self) -> u64 {
        crate::wall_clock::unix_time().as_secs() * 1000
    }
}
