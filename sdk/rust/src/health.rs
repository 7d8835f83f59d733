//! A node's health and alerts as its daemon reports them: what `konorctl health` and
//! `konorctl alerts` print, what the socket answers to `health` and `alerts`, and what the HTTP
//! API serves at `/api/v1/health` and `/api/v1/alerts` (issue 15). Plain data; the daemon builds
//! it and `konor_node::health` holds the rules that judge it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's health at one moment, built by the daemon's thread (`LocalCall::Health`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHealth {
    /// This node.
    pub node_id: String,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// The mesh's nodes by state, this node included.
    pub members: MemberCounts,
    /// The groups this node holds.
    pub groups: Vec<GroupHealth>,
    /// Groups whose last write to disk failed, with the error (SPEC F24): the node is degraded.
    pub degraded: BTreeMap<String, String>,
    /// Work waiting on the daemon's thread.
    pub queues: QueueDepths,
    /// Inputs the daemon dropped or failed, counted since it started.
    pub dropped: DroppedCounts,
    /// Anomalies that hold now (`konorctl alerts` also shows those that cleared).
    #[serde(default)]
    pub alerts: Vec<Alert>,
}

/// Nodes of the mesh by the failure detector's verdict, as this node sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCounts {
    /// Heartbeats arrive.
    pub live: u64,
    /// Not judged yet (just started, or not heard twice).
    pub unknown: u64,
    /// The detector gave up on them.
    pub dead: u64,
    /// They announced a graceful shutdown.
    pub leaving: u64,
}

/// One group on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHealth {
    /// Name.
    pub name: String,
    /// `eventual` or `strong`.
    pub mode: String,
    /// This node's revision of it.
    pub revision: u64,
    /// Milliseconds since this node last applied a change to it (since the start if never).
    pub since_change_ms: u64,
    /// Members as gossip shows them, this node included.
    pub members: u64,
    /// True when reads here may be behind (a strong group that cannot prove it is fresh).
    pub stale: bool,
    /// Why, when stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
}

/// Lengths of the daemon's queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueDepths {
    /// Local calls (socket and HTTP requests) waiting for the daemon's thread.
    pub calls: u64,
    /// Commands (writes, joins, leaves) waiting for their outcome.
    pub pending_commands: u64,
    /// Reads of `block` groups waiting for the node to be fresh.
    pub blocked_reads: u64,
    /// Watchers of all groups.
    pub watchers: u64,
}

/// What the daemon dropped or failed since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedCounts {
    /// Peer messages the replica refused (unreadable, from a non-member, over a bound).
    pub peer_messages: u64,
    /// Writes to disk that failed.
    pub persist_failures: u64,
}

/// What kind of anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A node keeps falling dead and coming back.
    Flapping,
    /// A node's heartbeats arrive much later than they usually do.
    HeartbeatDelay,
    /// Many nodes of one label fell at once.
    LabelLost,
}

impl AlertKind {
    /// The snake_case name, as in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Flapping => "flapping",
            AlertKind::HeartbeatDelay => "heartbeat_delay",
            AlertKind::LabelLost => "label_lost",
        }
    }
}

/// One alert: raised, and cleared later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The rule.
    pub kind: AlertKind,
    /// The node id, or the label (`region=eu-west`).
    pub subject: String,
    /// What was seen, in words.
    pub message: String,
    /// When it was raised (unix ms).
    pub raised_ms: u64,
    /// When it cleared (unix ms); `None` while it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_ms: Option<u64>,
}

/// The alerts of a node: those that hold and those that cleared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Alerts {
    /// Alerts that hold now.
    pub active: Vec<Alert>,
    /// Alerts that cleared since the daemon started, oldest first (a bounded number).
    pub history: Vec<Alert>,
}
