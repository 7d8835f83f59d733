//! The audit log's spread (issue 17, item 4): this node publishes its last records under
//! `aud:<slot>` (slot = place modulo [`AUDIT_RECENT`], signed as all its gossip), and copies
//! the records its peers publish into their chains here (`audit/files.rs`), so every node holds
//! every node's audit log. A record is copied only if its hash matches its fields and it came
//! in the gossip of the node it names (gossip is signed per node, so no node can write
//! another's). A burst of more than [`AUDIT_RECENT`] records between two reads leaves a gap in
//! the copies, which they mark.

use tokio::time::Instant;
use tracing::warn;

use super::Daemon;
use super::revocations::REVOCATION_FOLLOW_INTERVAL;
use crate::audit::Audit;
use crate::audit::chain::AuditRecord;
use crate::audit::files::AUDIT_RECENT;

/// Prefix of the gossip keys that carry audit records.
pub const AUDIT_PREFIX: &str = "aud:";

/// The audit log and what of it was published and read.
#[derive(Debug)]
pub(super) struct AuditGossip {
    audit: Audit,
    /// The last own place published.
    published: u64,
    /// When peers' records were last read.
    followed: Option<Instant>,
    /// The copier of the last round (its fsyncs run off the daemon's thread and loop).
    copying: Option<tokio::task::JoinHandle<()>>,
    /// Gossiped values refused for good (not a record, not the sender's), warned about once;
    /// bounded by [`AUDIT_REFUSED_MAX`].
    refused: std::collections::BTreeSet<String>,
}

/// Refused gossiped values remembered (then the oldest is forgotten, and warned about again).
const AUDIT_REFUSED_MAX: usize = 1024;

impl AuditGossip {
    pub(super) fn new(audit: Audit) -> AuditGossip {
        AuditGossip { audit, published: 0, followed: None, copying: None, refused: std::collections::BTreeSet::new() }
    }
}

/// The node and place a gossiped record names, read from its first bytes (the record's JSON
/// starts `{"node":"<id>","seq":<n>,`), so records already held are skipped unparsed.
fn origin(payload: &str) -> Option<(&str, u64)> {
    let rest = payload.strip_prefix("{\"node\":\"")?;
    let (node, rest) = rest.split_once('"')?;
    let rest = rest.strip_prefix(",\"seq\":")?;
    let digits = rest.split(',').next()?;
    Some((node, digits.parse().ok()?))
}

impl Daemon {
    /// The audit log, if this node keeps one.
    pub(super) fn audit_log(&self) -> Option<Audit> {
        self.audit.as_ref().map(|gossip| gossip.audit.clone())
    }

    /// Publishes this node's new records and copies its peers', at most every
    /// `REVOCATION_FOLLOW_INTERVAL`.
    pub(super) async fn spread_audit(&mut self) {
        let Some(gossip) = self.audit.as_mut() else { return };
        if gossip.followed.is_some_and(|at| at.elapsed() < REVOCATION_FOLLOW_INTERVAL) {
            return;
        }
        gossip.followed = Some(Instant::now());
        let audit = gossip.audit.clone();
        let published = gossip.published;
        for record in audit.recent().into_iter().filter(|record| record.seq > published) {
            if let Ok(text) = serde_json::to_string(&record) {
                self.membership.publish(&format!("{AUDIT_PREFIX}{}", record.seq % AUDIT_RECENT as u64), &text);
            }
            gossip.published = record.seq;
        }
        // One copier at a time: the next round reads what it wrote.
        if gossip.copying.as_ref().is_some_and(|copying| !copying.is_finished()) {
            return;
        }
        let own = self.node_id.clone();
        let refused = &gossip.refused;
        // Copied out first: the gossip read holds chitchat's lock, a copier may hold the files'.
        let heads = audit.heads();
        let held = |payload: &str| {
            refused.contains(payload)
                || origin(payload).is_none_or(|(node, seq)| node == own || seq <= heads.get(node).copied().unwrap_or(0))
        };
        let gossiped = self.membership.values_with_prefix(AUDIT_PREFIX, |_, payload| held(payload)).await;
        let mut records: Vec<AuditRecord> = Vec::new();
        for (from, key, value) in gossiped {
            match serde_json::from_str::<AuditRecord>(&value) {
                Ok(record) if record.node == from && record.hash == record.computed_hash() => records.push(record),
                _ => {
                    warn!(%from, %key, "a peer gossips an audit record that does not read or is not its own; ignored");
                    if gossip.refused.len() >= AUDIT_REFUSED_MAX {
                        gossip.refused.pop_first();
                    }
                    gossip.refused.insert(value);
                }
            }
        }
        if records.is_empty() {
            return;
        }
        records.sort_by(|a, b| (&a.node, a.seq).cmp(&(&b.node, b.seq)));
        let copier = tokio::task::spawn_blocking(move || {
            if let Err(error) = audit.append_copies(&records) {
                warn!(%error, "cannot copy peers' audit records; retrying");
            }
        });
        gossip.copying = Some(copier);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_origin_reads_from_its_first_bytes() {
        assert_eq!(origin(r#"{"node":"n-1","seq":42,"at_ms":1}"#), Some(("n-1", 42)));
        assert_eq!(origin(r#"{"seq":42,"node":"n1"}"#), None);
        assert_eq!(origin("garbage"), None);
    }
}
