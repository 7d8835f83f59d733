//! The history of a chaos run: what the clients did and saw, which faults ran when, what each
//! node's membership view said, and each node's final state after healing. The runner appends
//! one JSON object per line to `history.jsonl` as things happen; the checker reads the file
//! afterwards and judges it without asking the daemons anything. This file is the contract
//! between the two: a record's fields only grow (new fields optional).
//!
//! Times are milliseconds since the run started, on the runner's monotonic clock: `invoke_ms`
//! is taken before a request is sent and `complete_ms` after its answer arrived, so an
//! operation took effect (if at all) somewhere in between.
//!
//! Values written are unique strings (`c<client>-<seq>`), so a read or a watch event names the
//! one write it came from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// First line: how the run was set up.
    Run(RunInfo),
    /// A client operation, written when it completed (or when the run gave up on it).
    Op(Op),
    /// An event a watcher received.
    Watch(WatchRecord),
    /// A fault started.
    FaultStart(FaultStart),
    /// A fault ended (healed, resumed, restarted).
    FaultEnd(FaultEnd),
    /// A konord exited on its own: not killed by the runner (a crash, an abort).
    NodeExit(NodeExit),
    /// One node's view of every node's liveness, sampled.
    Membership(MembershipSample),
    /// A node's state of a group after healing and settling (one per node and group).
    Final(FinalState),
}

/// How the run was set up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The seed of the fault schedule and the workload.
    pub seed: u64,
    /// Node ids, `n1` ...
    pub nodes: Vec<String>,
    /// Groups and their modes.
    pub groups: Vec<GroupInfo>,
    /// Planned length of the fault phase, ms.
    pub duration_ms: u64,
    /// Settle time after healing before the final states are read, ms.
    pub settle_ms: u64,
    /// The failure detection bound the membership check holds nodes to, ms.
    pub detection_bound_ms: u64,
    /// Wall clock at the start, unix ms (for reading logs beside the history).
    pub started_unix_ms: u64,
}

/// A group of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Name.
    pub name: String,
    /// `eventual` or `strong`.
    pub mode: String,
}

/// A client operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Client number (one SDK client per number, bound to one node).
    pub client: u32,
    /// The node the client talks to.
    pub node: String,
    /// Group.
    pub group: String,
    /// Key.
    pub key: String,
    /// What was asked.
    pub kind: OpKind,
    /// Before the request was sent.
    pub invoke_ms: u64,
    /// After the answer arrived (or the client gave up).
    pub complete_ms: u64,
    /// What came back.
    pub outcome: Outcome,
}

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpKind {
    /// Set `key` to `value` (unique in the run).
    Write {
        /// The value.
        value: String,
    },
    /// Get `key`.
    Read,
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The write was acknowledged (`Response::Committed`).
    Committed {
        /// The version label the write made.
        version: String,
        /// The node's revision after it.
        revision: u64,
        /// Nodes the daemon said hold it durably.
        acked_by: Vec<String>,
        /// The content hash of the version it made: with the label, what identifies that
        /// version in a final history (a label alone may be reused once the version is lost:
        /// a later version on another actor can take its counter). Empty in older histories.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        content_hash: String,
    },
    /// The daemon refused or aborted it: by the contract, it never takes effect (the code says
    /// which: `not_committed`, `aborted`, `not_durable`, `busy`, `unavailable`, ...).
    /// `outcome_unknown` is not a refusal: it is recorded as `Unknown`.
    Refused {
        /// The protocol's error code.
        code: String,
        /// Its message.
        message: String,
    },
    /// No answer, a timeout, a closed connection or `outcome_unknown`: the write may or may not
    /// have taken effect.
    Unknown {
        /// What happened.
        detail: String,
    },
    /// A read's answer.
    Value {
        /// The value (`None`: the key was not set).
        value: Option<String>,
        /// `freshness.version`.
        version: String,
        /// `freshness.revision`.
        revision: u64,
        /// `freshness.stale`: the node said it may be behind. A read with `stale: false` on a
        /// strong group is a fresh read.
        stale: bool,
    },
}

/// An event a watcher received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchRecord {
    /// Watcher number.
    pub watcher: u32,
    /// The node it watches through.
    pub node: String,
    /// Group.
    pub group: String,
    /// When it arrived.
    pub at_ms: u64,
    /// What it said.
    pub event: WatchedEvent,
}

/// A watch event, reduced to what the checks need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WatchedEvent {
    /// The first state the watcher started from (its snapshot), before any event.
    Start {
        /// Revision of the snapshot.
        revision: u64,
        /// Version of the snapshot.
        version: String,
        /// Settings (values are the unique strings, or other JSON printed).
        settings: BTreeMap<String, String>,
    },
    /// A change.
    Change {
        /// Revision.
        revision: u64,
        /// Version label.
        version: String,
        /// Keys set, with their values.
        set: BTreeMap<String, String>,
        /// Keys removed.
        removed: Vec<String>,
    },
    /// The whole state again.
    Resync {
        /// Revision.
        revision: u64,
        /// Version label.
        version: String,
        /// Settings.
        settings: BTreeMap<String, String>,
    },
    /// The watch ended with an error (it will not deliver more).
    Ended {
        /// The error.
        detail: String,
    },
}

/// The `detail` of a `loss` fault: the membership check reads the percentage from it.
pub fn loss_detail(percent: u32) -> String {
    format!("egress loss={percent}%")
}

/// The `detail` of a link fault (`delay`, `reorder`, `duplicate`): the fault layer's control
/// text (`delay=40ms jitter=10ms reorder=0% duplicate=0%`), whose delay and jitter the
/// membership check reads.
pub fn link_detail(control_text: &str) -> String {
    format!("egress {control_text}")
}

/// The `detail` of a clock jump (`clock_jump`): the fault layer's control text
/// (`clock_offset=-50m`), whose offset the membership check reads.
pub fn clock_jump_detail(control_text: &str) -> String {
    format!("{control_text}, then back")
}

/// A fault started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultStart {
    /// Unique in the run; `FaultEnd` names it.
    pub id: u32,
    /// When.
    pub at_ms: u64,
    /// `kill9`, `pause`, `partition`, `oneway`, `bridge`, `isolate`, `loss`, `delay`,
    /// `disk_full`, ...
    pub kind: String,
    /// Nodes it hits (for a partition: every node; `sides` says how).
    pub nodes: Vec<String>,
    /// Partition sides, when it is one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sides: Vec<Vec<String>>,
    /// Free text: loss percentage, direction, ...
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A fault ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultEnd {
    /// The `FaultStart` it ends.
    pub id: u32,
    /// When.
    pub at_ms: u64,
    /// What the fault did that was known only once it acted (a power cut: the unsynced bytes
    /// dropped per node); empty for most kinds.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A konord that exited without the runner killing it, as the runner found it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeExit {
    /// The node.
    pub node: String,
    /// When the runner noticed (the exit came before).
    pub at_ms: u64,
    /// The exit status (`signal: 6 (SIGABRT)`, `exit status: 1`).
    pub status: String,
    /// The last lines of its log.
    #[serde(default)]
    pub log_tail: Vec<String>,
}

/// One node's view of liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipSample {
    /// When.
    pub at_ms: u64,
    /// The node asked.
    pub observer: String,
    /// Node id -> `live`, `suspect`, `unknown`, `dead`, `leaving` (as `konorctl nodes` says).
    pub states: BTreeMap<String, String>,
}

/// A node's state of a group after the run healed and settled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalState {
    /// Node.
    pub node: String,
    /// Group.
    pub group: String,
    /// When it was read.
    pub at_ms: u64,
    /// The node's heads of the group (from `status`), to compare across nodes.
    pub heads: String,
    /// The settings (values are the unique strings).
    pub settings: BTreeMap<String, String>,
    /// The node's version labels, oldest first, with their parents (from `history`).
    pub versions: Vec<FinalVersion>,
}

/// One version in a node's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalVersion {
    /// Label.
    pub label: String,
    /// Parent labels.
    pub parents: Vec<String>,
    /// Its content hash (see `Outcome::Committed`); empty in older histories.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content_hash: String,
}

/// Reads a history file: one record per line; a line that does not parse is an error naming
/// its number (a torn last line, from a runner killed mid-write, is skipped).
pub fn parse(text: &str) -> Result<Vec<Record>, HistoryError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if index + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(error) => return Err(HistoryError::Line { line: index + 1, detail: error.to_string() }),
        }
    }
    Ok(records)
}

/// A history that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// A line is not a record.
    #[error("history line {line} is not a record: {detail}")]
    Line {
        /// 1-based.
        line: usize,
        /// Why.
        detail: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_a_line_each_and_a_torn_last_line_is_skipped() {
        let records = vec![
            Record::Op(Op {
                client: 1,
                node: "n1".into(),
                group: "s".into(),
                key: "k1".into(),
                kind: OpKind::Write { value: "c1-1".into() },
                invoke_ms: 10,
                complete_ms: 12,
                outcome: Outcome::Committed {
                    version: "v2".into(),
                    revision: 2,
                    acked_by: vec!["n1".into()],
                    content_hash: "0a1b2c3d4e5f".into(),
                },
            }),
            Record::FaultEnd(FaultEnd { id: 3, at_ms: 40, detail: String::new() }),
        ];
        let mut text: String = records.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        assert_eq!(parse(&text).unwrap(), records);
        text.push_str("{\"type\":\"op\",\"cli");
        assert_eq!(parse(&text).unwrap(), records);
        let broken = text.replace("\"type\":\"fault_end\"", "\"type\":\"nonsense\"");
        assert!(matches!(parse(&broken), Err(HistoryError::Line { line: 2, .. })));
    }
}
