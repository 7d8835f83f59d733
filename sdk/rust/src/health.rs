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
    /// The mesh's size against its node cap (absent from daemons before it: all zero).
    #[serde(default)]
    pub mesh: MeshCapacity,
}

/// The mesh's size against its node cap, as this node's gossip sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCapacity {
    /// Nodes in this node's view (the newest generation of each id, dead ones gossip still
    /// remembers included).
    pub nodes: u64,
    /// The most nodes a mesh holds (`MESH_NODES_MAX`).
    pub cap: u64,
    /// The mesh is at its cap: its view holds `cap` nodes, or this node's gossip filter refused
    /// a new node in the last 10 s. New hosts cannot join.
    pub at_cap: bool,
    /// Refusals for the cap since this node started: one per refused node delta, so a host that
    /// keeps trying counts many times.
    pub refused: u64,
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
    /// A gated group's newest release, desired against actual (absent in an immediate group
    /// and before the first release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseHealth>,
}

/// A gated group's newest release in `health` and the metrics (SPEC F28).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseHealth {
    /// The release's version label.
    pub label: String,
    /// `in progress`, `complete`, `aborted` or `superseded`.
    pub outcome: String,
    /// The wave in force, counted from 1 (1 for a release to every member).
    pub wave: u32,
    /// Members in the slice of the wave in force.
    pub targeted: u64,
    /// Of those, the ones that hold it as desired.
    pub done: u64,
    /// Processes that applied it.
    pub processes_ok: u64,
    /// Processes whose reload failed on it.
    pub processes_failed: u64,
    /// From the release to every targeted node applied, once reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_consistency_ms: Option<u64>,
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

/// One state change of a node, as this node's failure detector saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// When (Unix ms).
    pub at_ms: u64,
    /// `live`, `unknown`, `dead` or `leaving`.
    pub state: String,
}

/// What the membership polls of one stretch of time saw of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Start of the stretch (Unix ms, a multiple of its length).
    pub start_ms: u64,
    /// Polls that saw the node.
    pub polls: u64,
    /// Of those, polls that saw it live.
    pub live: u64,
    /// Sum of the heartbeat ages seen (ms): divided by `polls`, the mean.
    pub age_sum_ms: u64,
    /// The largest heartbeat age seen (ms).
    pub age_max_ms: u64,
}

/// One node's kept history (`konorctl node-history NODE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHistory {
    /// The node.
    pub node: String,
    /// Its labels, as last seen.
    pub labels: BTreeMap<String, String>,
    /// Its last state changes, oldest first.
    pub transitions: Vec<Transition>,
    /// One-minute buckets of the last hour, oldest first (the newest still filling).
    pub minutes: Vec<Bucket>,
    /// Ten-minute buckets of the last six hours, oldest first (closed minutes only).
    pub ten_minutes: Vec<Bucket>,
}

/// One node over a recent window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSummary {
    /// The node.
    pub node: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its state now.
    pub state: String,
    /// The share of polls that saw it live (0 to 1).
    pub live_share: f64,
    /// Its state changes.
    pub transitions: u64,
    /// Mean heartbeat age (ms).
    pub heartbeat_age_mean_ms: u64,
    /// Largest heartbeat age (ms).
    pub heartbeat_age_max_ms: u64,
}

/// The nodes of one label, now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSummary {
    /// `key=value`.
    pub label: String,
    /// Nodes live.
    pub live: u64,
    /// Nodes not judged yet.
    pub unknown: u64,
    /// Nodes dead.
    pub dead: u64,
    /// Nodes leaving.
    pub leaving: u64,
    /// Mean heartbeat age of its live nodes over the last minute (ms).
    pub heartbeat_age_mean_ms: u64,
}

/// The mesh's history as this node kept it (`konorctl node-history`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshHistory {
    /// The window of the node summaries (ms): the last hour.
    pub window_ms: u64,
    /// Every node remembered, over the window.
    pub nodes: Vec<NodeSummary>,
    /// Labels, now.
    pub labels: Vec<LabelSummary>,
    /// Peers live, minute by minute over the window: per minute, the sum over peers of the
    /// share of polls that saw each live (this node not counted).
    #[serde(default)]
    pub live_by_minute: Vec<MinuteLive>,
}

/// Peers live during one minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinuteLive {
    /// Start of the minute (Unix ms).
    pub start_ms: u64,
    /// Peers live, on average over the minute.
    pub live: f64,
}
