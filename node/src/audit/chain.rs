//! One node's audit chain, with no I/O: a record's hash covers its fields and the hash of the
//! record before it, so changing, removing or reordering a record breaks every link after it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash a chain's first record links to.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audited action. Field order is the wire and hash order: `node` and `seq` come first so a
/// gossiped record's origin and place read from its first bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// The node that took the action in (its chain).
    pub node: String,
    /// Place in that node's chain, from 1.
    pub seq: u64,
    /// When (Unix milliseconds, that node's clock).
    pub at_ms: u64,
    /// Who: the authenticated identity (`uid:N (user)` on the socket, `cert:ID` or `anonymous`
    /// on HTTP, `konord` for the node itself).
    pub who: String,
    /// From where: `socket pid N (process)`, the HTTP caller's address.
    pub from: String,
    /// What: the request (`group_create`, `release`, `revoke`, `enroll`, ...).
    pub action: String,
    /// The group it concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The version made, the id revoked, the node enrolled, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `ok`, or the error code (`forbidden`, `not_committed`, `token_expired`, ...).
    pub outcome: String,
    /// The hash of the record before (or [`GENESIS`]).
    pub prev: String,
    /// SHA-256 (hex) of this record's fields, `hash` left empty.
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record's fields give.
    pub fn computed_hash(&self) -> String {
        let mut unsealed = self.clone();
        unsealed.hash = String::new();
        let bytes = serde_json::to_vec(&unsealed).unwrap_or_default();
        let mut hash = Sha256::new();
        hash.update(b"konor-audit-v1\0");
        hash.update(&bytes);
        hash.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Links this record after `prev` (`None`: the first) and seals it.
    pub fn seal_after(self, prev: Option<&AuditRecord>) -> AuditRecord {
        match prev {
            Some(prev) => self.seal_at(prev.seq + 1, &prev.hash),
            None => self.seal_at(1, GENESIS),
        }
    }

    /// Seals this record as place `seq`, after the record whose hash is `prev`.
    pub fn seal_at(mut self, seq: u64, prev: &str) -> AuditRecord {
        self.seq = seq;
        self.prev = prev.to_owned();
        self.hash = self.computed_hash();
        self
    }
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The line (from 1) of the record where it breaks.
    pub line: usize,
    /// What is wrong.
    pub what: String,
}

/// One line of a chain file: a record, or a gap a copy did not receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A record.
    Record(Box<AuditRecord>),
    /// Records `from..=to` of the chain never reached this copy (a burst larger than gossip
    /// carried at once); the link across is not checked.
    Gap { from: u64, to: u64 },
}

/// Checks a chain of `node`: each record's hash, its link to the one before, and consecutive
/// places. A chain may start after 1 (older records dropped by retention); a gap line lets a
/// copy skip what it never received. Returns every break found.
pub fn verify(node: &str, lines: &[Line]) -> Vec<Break> {
    let mut breaks = Vec::new();
    let mut before: Option<&AuditRecord> = None;
    for (index, line) in lines.iter().enumerate() {
        let number = index + 1;
        let mut broken = |what: String| breaks.push(Break { line: number, what });
        match line {
            Line::Gap { from, to } => {
                if let Some(prev) = before
                    && *from != prev.seq + 1
                {
                    broken(format!("a gap from {from} follows record {}", prev.seq));
                }
                // What follows the gap is checked against `to + 1`.
                before = None;
                if to < from {
                    broken(format!("a gap from {from} to {to}"));
                }
            }
            Line::Record(record) => {
                if record.node != node {
                    broken(format!("record {} is node {}'s, in the chain of {node}", record.seq, record.node));
                }
                if record.hash != record.computed_hash() {
                    broken(format!("record {} was changed: its hash does not match its fields", record.seq));
                }
                if let Some(prev) = before {
                    if record.seq != prev.seq + 1 {
                        broken(format!(
                            "record {} follows record {}: records were removed or reordered",
                            record.seq, prev.seq
                        ));
                    } else if record.prev != prev.hash {
                        broken(format!("record {} does not link to record {}", record.seq, prev.seq));
                    }
                } else if let Some(Line::Gap { to, .. }) = index.checked_sub(1).and_then(|at| lines.get(at))
                    && record.seq != to + 1
                {
                    broken(format!("record {} follows a gap to {to}", record.seq));
                } else if index == 0 && record.seq == 1 && record.prev != GENESIS {
                    broken("the first record does not start the chain".to_owned());
                }
                before = Some(record);
            }
        }
    }
    breaks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(count: u64) -> Vec<AuditRecord> {
        let mut records: Vec<AuditRecord> = Vec::new();
        for i in 0..count {
            let record = AuditRecord {
                node: "n1".to_owned(),
                seq: 0,
                at_ms: 1000 + i,
                who: "uid:0 (root)".to_owned(),
                from: "socket".to_owned(),
                action: "group_create".to_owned(),
                group: Some(format!("g{i}")),
                detail: None,
                outcome: "ok".to_owned(),
                prev: String::new(),
                hash: String::new(),
            };
            let sealed = record.seal_after(records.last());
            records.push(sealed);
        }
        records
    }

    fn lines(records: &[AuditRecord]) -> Vec<Line> {
        records.iter().cloned().map(|record| Line::Record(Box::new(record))).collect()
    }

    #[test]
    fn an_intact_chain_verifies_and_each_tampering_is_found() {
        let records = chain(5);
        assert!(verify("n1", &lines(&records)).is_empty());
        // Retention: a chain may start later.
        assert!(verify("n1", &lines(&records[2..])).is_empty());

        let mut edited = records.clone();
        edited[2].outcome = "forbidden".to_owned();
        let found = verify("n1", &lines(&edited));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].what.contains("record 3 was changed"));

        // A record edited and resealed still breaks the next link.
        let mut resealed = records.clone();
        resealed[2].outcome = "forbidden".to_owned();
        resealed[2].hash = resealed[2].computed_hash();
        assert!(verify("n1", &lines(&resealed)).iter().any(|b| b.what.contains("record 4 does not link")));

        let mut removed = records.clone();
        removed.remove(3);
        assert!(verify("n1", &lines(&removed)).iter().any(|b| b.what.contains("record 5 follows record 3")));

        let mut reordered = records.clone();
        reordered.swap(1, 2);
        assert!(!verify("n1", &lines(&reordered)).is_empty());

        assert!(!verify("n2", &lines(&records)).is_empty(), "another node's chain");
    }

    #[test]
    fn a_copy_may_skip_a_gap_but_not_hide_one() {
        let records = chain(6);
        let mut with_gap = lines(&records[..2]);
        with_gap.push(Line::Gap { from: 3, to: 4 });
        with_gap.extend(lines(&records[4..]));
        assert!(verify("n1", &with_gap).is_empty());
        let mut hidden = lines(&records[..2]);
        hidden.push(Line::Gap { from: 3, to: 3 });
        hidden.extend(lines(&records[4..]));
        assert!(!verify("n1", &hidden).is_empty(), "a gap that does not reach the next record");
    }
}
