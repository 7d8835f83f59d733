//! The local socket protocol between `konord` and its clients (SDKs, `konorctl`): frames and
//! message types. Language-neutral: every frame is a 4-byte big-endian length followed by that
//! many bytes of UTF-8 JSON. docs/protocol.md is the reference for other languages.
//!
//! **Boundary:** these types are the wire format. Fields may be added (readers ignore unknown
//! fields); renaming or removing one needs a new [`PROTOCOL_VERSION`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::secret::Secret;

/// A field that is present holds a value, `null` included (an absent field is `None` by
/// `#[serde(default)]`): so `get` tells a key set to `null` from a key that is not set.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// An optional field given as `null` reads as if it were absent (its default), so that every
/// optional field of a request may be absent or `null` alike (docs/protocol.md).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// Version of this protocol, sent in `Hello` and answered in `Welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame in bytes, either direction: a whole group snapshot (4 MiB of settings at most)
/// as JSON with room to spare. A length above this is refused before anything is allocated.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Environment variable naming the daemon's socket path.
pub const SOCKET_ENV: &str = "KONOR_SOCKET";

/// Environment variable naming the uid konord runs as, when it is neither root nor the
/// client's own user (a number, or `any` to accept every user).
pub const DAEMON_UID_ENV: &str = "KONOR_DAEMON_UID";

/// A frame sent by a client: a request with an id chosen by the client, echoed in the response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Correlates the response: at least 1 (id 0 is the daemon's, for errors about the
    /// connection), and unique among the connection's requests still waiting for an answer.
    /// konord closes a connection that breaks either rule.
    pub id: u64,
    /// What the client asks.
    pub request: Request,
}

/// A frame sent by the daemon: the response to one request, or a pushed watch event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One frame per message, decoded and handed on at once: boxing the answer would cost an
// allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
pub enum ServerFrame {
    /// The answer to request `id`.
    Response {
        /// The request's id.
        id: u64,
        /// The answer.
        response: Response,
    },
    /// A change on a watched group, pushed without a request.
    Event {
        /// The event.
        event: WatchEvent,
    },
}

/// Who makes a write: shown in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WriteMeta {
    /// On whose behalf: the daemon authors the version as the user it authenticated
    /// (`<user>@<node>`) and adds this in parentheses, marked as a claim.
    #[serde(default, deserialize_with = "null_as_default")]
    pub author: String,
    /// Why.
    #[serde(default, deserialize_with = "null_as_default")]
    pub message: String,
    /// A precondition: write only if the group's only latest version is this one (`v12`);
    /// otherwise the write is refused with `condition_failed` and nothing changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_version: Option<String>,
    /// A precondition: write only if the group's content hash starts with these hex digits
    /// (12 to 64, as `history` and `snapshot` show them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_content: Option<String>,
    /// Keys the write marks secret (issue 17), whether or not it writes them: from then on
    /// their values, at every version, are [`MASKED`] for callers that may not reveal them
    /// (the `viewer` role). A mark is never taken back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret: Vec<String>,
}

/// What a caller that may not reveal secret values (a `viewer`, an HTTP caller without a
/// certificate) reads in place of each value of a key marked secret, in every answer and event.
pub const MASKED: &str = "<secret>";

/// Everything a client can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First request on every connection.
    Hello {
        /// The client's protocol version.
        protocol: u32,
        /// The client's process id.
        pid: u32,
        /// The client's process name.
        process: String,
    },
    /// One setting.
    Get {
        /// Group.
        group: String,
        /// Key.
        key: String,
    },
    /// All settings of a group, or those whose key starts with `prefix`.
    Snapshot {
        /// Group.
        group: String,
        /// Only keys that start with this text (`db.` for every key under `db`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// Subscribe to changes after `from_revision` (or from now when absent).
    Watch {
        /// Group.
        group: String,
        /// Deliver every change with a larger revision; `None`: only future changes.
        #[serde(default)]
        from_revision: Option<u64>,
        /// Only changes to keys that start with this text: events carry only those keys, a
        /// change that touches none of them is not sent, and a resync holds only those keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// Stop a subscription.
    Unwatch {
        /// Group.
        group: String,
    },
    /// The client's reload callback ran for `version`: report the outcome (F16).
    ReportApply {
        /// Group.
        group: String,
        /// The version label applied.
        version: String,
        /// The revision applied.
        revision: u64,
        /// Ok or the error text.
        result: ApplyResult,
    },
    /// The client's error rate while it runs `group`'s current settings (SPEC F15): a fraction
    /// of its requests, 0 to 1, that a release's `max_error_rate` guard compares. It goes on the
    /// connection's apply report (a process reports what it applied first; `on_change` does).
    ReportErrorRate {
        /// Group.
        group: String,
        /// Failed requests over all requests, 0 to 1, over a window the app chooses.
        rate: f64,
    },
    /// Create a group on this node.
    GroupCreate {
        /// Name.
        name: String,
        /// "eventual" or "strong".
        mode: String,
        /// The group's secret key; generated when absent.
        #[serde(default)]
        key: Option<Secret>,
        /// Strong groups: how long a member may stay dead before the group's configuration
        /// evicts it (SPEC F11 `evict_after`); the daemon's default (30 s) when absent, never
        /// below its minimum (6 s).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        evict_after_ms: Option<u64>,
        /// Strong groups: what reads do while the node cannot prove it is fresh: `stale` (the
        /// default: answer, flagged stale) or `block` (wait, then `unavailable`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fencing: Option<String>,
        /// When new versions reach applications: `immediate` (the default: at once) or `gated`
        /// (only once a release targets them; SPEC F14).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<String>,
    },
    /// Join an existing group with its key.
    GroupJoin {
        /// Name.
        name: String,
        /// The group's secret key.
        key: Secret,
    },
    /// Move a group to a new key (`konorctl group rotate-key`): the members then are handed
    /// it; a node that left, or joins with the old key, is refused.
    GroupRotateKey {
        /// Name.
        name: String,
        /// The new key; konord draws one when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<Secret>,
    },
    /// Leave a group on this node.
    GroupLeave {
        /// Name.
        name: String,
        /// Strong groups: drop the group at once, without leaving the configuration first
        /// (the other members then evict this node).
        #[serde(default, skip_serializing_if = "std::ops::Not::not", deserialize_with = "null_as_default")]
        force: bool,
    },
    /// Groups this node holds.
    GroupList,
    /// Set keys.
    Set {
        /// Group.
        group: String,
        /// Key -> JSON value.
        entries: BTreeMap<String, Value>,
        /// Author and message.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// Delete keys.
    Delete {
        /// Group.
        group: String,
        /// Keys.
        keys: Vec<String>,
        /// Author and message.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// Replace the settings with a file's contents.
    Apply {
        /// Group.
        group: String,
        /// "toml", "yaml" or "json".
        format: String,
        /// The file's text.
        text: String,
        /// Author and message.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// Roll back to a version.
    Rollback {
        /// Group.
        group: String,
        /// Version label (`v12`).
        version: String,
        /// Author and message.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// Release a version of a gated group (SPEC F14): from now on every member serves it to
    /// its applications. A write like any other (a version of kind `release`); in a strong
    /// group it commits through a round.
    Release {
        /// Group.
        group: String,
        /// The version to serve (`v12`).
        version: String,
        /// Which nodes: `all` (the default) or `canary`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        strategy: Option<String>,
        /// A canary's waves: percentages of the matching members, strictly increasing
        /// (`[10, 50, 100]`); the release starts at the first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waves: Option<Vec<u8>>,
        /// A canary's selector: labels a member must carry (`region=eu-west,tier=web`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        selector: Option<String>,
        /// How long each wave must hold, with no guard broken, before the members promote it
        /// (absent or 0: promotion is left to an operator).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bake_ms: Option<u64>,
        /// Guard: abort once more than this many processes failed to apply it (absent: 0, the
        /// first failure aborts).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_failed: Option<u32>,
        /// Guard: abort once a process on a targeted node reports an error rate above this
        /// fraction (0 to 1; `0.02` is 2%) through `report_error_rate`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_error_rate: Option<f64>,
        /// Guard: abort once a targeted node is dead to a member.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_health: Option<bool>,
        /// Author and message.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// Move the current canary release of a gated group to its next wave (or to `wave`, 1 for
    /// the first).
    Promote {
        /// Group.
        group: String,
        /// The wave, counted from 1; the next one when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wave: Option<u32>,
        /// Author and message.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// Abort the current release of a gated group: every member goes back to what it served
    /// before it.
    Abort {
        /// Group.
        group: String,
        /// Why (stored with the abort).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Author and message.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// The whole settings of one version (`konorctl show group@v12`).
    Show {
        /// Group.
        group: String,
        /// Version label (`v12`).
        version: String,
    },
    /// Set the group's schema (a JSON Schema over its settings as one flat object), or remove
    /// it (`schema` absent or null). A new version of kind `schema`; refused when the settings
    /// break it.
    SchemaSet {
        /// Group.
        group: String,
        /// The schema; `None` removes it.
        #[serde(default)]
        schema: Option<Value>,
        /// Author, message and precondition.
        #[serde(default, deserialize_with = "null_as_default")]
        meta: WriteMeta,
    },
    /// The group's schema.
    SchemaGet {
        /// Group.
        group: String,
    },
    /// Validates a settings file against the group's schema (or against `schema` when given),
    /// as `apply` would see it, without writing anything.
    SchemaCheck {
        /// Group.
        group: String,
        /// "toml", "yaml" or "json".
        format: String,
        /// The file's text.
        text: String,
        /// A schema to check against instead of the group's (to try one before setting it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema: Option<Value>,
    },
    /// Version list.
    History {
        /// Group.
        group: String,
    },
    /// Diff of two versions.
    Diff {
        /// Group.
        group: String,
        /// From version.
        from: String,
        /// To version.
        to: String,
    },
    /// Keys with concurrent values.
    Conflicts {
        /// Group.
        group: String,
    },
    /// The mesh as this node sees it.
    Nodes,
    /// A group's state across nodes and local processes.
    Status {
        /// Group.
        group: String,
    },
    /// A gated group's newest releases, each joined with what every member serves and every
    /// process reported (SPEC F16, F28): `release status` and `release report`.
    ReleaseReport {
        /// Group.
        group: String,
        /// How many releases, newest first (default 1, at most 64).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// Only this release: its id or its version label (`limit` then does not apply).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<String>,
    },
    /// Remove members from a strong group's configuration (SPEC F11): agreed by a majority, or
    /// with `force` by the remaining members alone (when no majority is left: the other member
    /// of a two-member group, or two of three, gone for good).
    GroupRemove {
        /// Group.
        group: String,
        /// The members to remove.
        nodes: Vec<String>,
        /// Skip the majority of the configuration.
        #[serde(default, skip_serializing_if = "std::ops::Not::not", deserialize_with = "null_as_default")]
        force: bool,
    },
    /// The local socket's own counters: connections, bytes held against its budgets, and what
    /// it refused or closed. Answered by the socket itself, without a hop to the daemon task.
    SocketStats,
    /// The node's health: members by state, groups, degraded groups, queues, what it dropped,
    /// the alerts that hold (`konorctl health`; `GET /api/v1/health` over HTTP).
    Health,
    /// The node's anomaly alerts, those that hold and those that cleared (`konorctl alerts`).
    Alerts,
    /// What this node's failure detector saw over the last hours (`konorctl node-history`):
    /// one node's whole kept history, or (without `node`) every node over the last hour and
    /// the labels now.
    NodeHistory {
        /// A node id; `None`: the whole mesh.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// Store a certificate revocation signed by the cluster CA (`konorctl cert revoke` signs
    /// it where the CA key is) and spread it to every node: each then refuses handshakes with
    /// the certificates it covers and closes the connections it has with them.
    Revoke {
        /// The signed revocation, as `konorctl cert revoke` writes it (JSON text).
        revocation: String,
    },
    /// The revocations this node holds (`konorctl cert revocations`).
    Revocations,
    /// The audit log this node holds, every node's chain (`konorctl audit list`): the newest
    /// records that match, oldest first.
    Audit {
        /// Only records at or after this time (milliseconds since the Unix epoch).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_ms: Option<u64>,
        /// Only records about this group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// Only records of actions taken on this node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
}

/// Outcome of a client's reload callback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ApplyResult {
    /// The new settings are in use.
    Ok,
    /// The callback refused them.
    Error {
        /// Why.
        message: String,
    },
}

/// How fresh a served value is (F12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Freshness {
    /// The node's revision of the group when it answered.
    pub revision: u64,
    /// Label of the newest version in the served state (`v12`).
    pub version: String,
    /// Milliseconds since this node last applied a change to the group.
    pub age_ms: u64,
    /// True when the node knows it may be behind (strong group, fenced).
    #[serde(default)]
    pub stale: bool,
    /// Why the read is stale, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_reason: Option<String>,
}

/// One version in a history listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRow {
    /// `v12` or `v12-3fa9c2d1`.
    pub label: String,
    /// Author.
    pub author: String,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// Message.
    pub message: String,
    /// create, set, delete, apply, rollback.
    pub kind: String,
    /// Content hash (12 hex digits); empty for a caller that may not reveal the group's
    /// secret values (a hash of the settings would confirm a guessed secret).
    pub content_hash: String,
    /// Parent labels.
    pub parents: Vec<String>,
    /// Keys this version marked secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret: Vec<String>,
}

/// A schema rule that settings break (SPEC F8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationRow {
    /// The key the rule is about; `None`: the settings as a whole (a `required` key is missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key's value as canonical JSON text, when it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Where the rule is in the schema, as a JSON pointer (`/properties/db.port/maximum`).
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

/// A group in a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRow {
    /// Name.
    pub name: String,
    /// "eventual" or "strong".
    pub mode: String,
    /// Latest version label.
    pub version: String,
    /// This node's revision.
    pub revision: u64,
    /// Number of keys.
    pub keys: usize,
    /// Node ids that joined the group, as gossip shows them.
    pub members: Vec<String>,
}

/// A node in the mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    /// Node id.
    pub id: String,
    /// QUIC address.
    pub address: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// "live", "unknown" (this node cannot judge it yet), "dead" or "leaving"; free text, so
    /// a client shows a state it does not know as it is.
    pub state: String,
    /// Milliseconds since its last heartbeat reached this node (None for this node itself).
    pub last_heartbeat_ms: Option<u64>,
    /// True for the node answering.
    pub is_self: bool,
    /// For the node answering: why it is degraded (a failed write to its disk), if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// A gated group's release state as one node sees it (SPEC F14), in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseState {
    /// The version this node serves to its applications.
    pub served: String,
    /// The newest version written (served only once released).
    pub latest: String,
    /// The release in force; `None` before the first (the group's first version is served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<ReleaseRow>,
}

/// One release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRow {
    /// The release's own version label.
    pub label: String,
    /// Its full id as the document stores it (`<inverted counter>.<actor hex>`): what a
    /// canary's slice is computed from (docs/releases.md).
    #[serde(default)]
    pub id: String,
    /// The version released.
    pub to: String,
    /// The version served before it, on the node that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Which nodes it reaches (`all`, `canary 10%,50%,100%`).
    pub strategy: String,
    /// A canary's waves (percentages); empty for `all`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<u8>,
    /// The wave in force, counted from 1 (`None` for `all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    /// A canary's bake time per wave, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_ms: Option<u64>,
    /// When the wave in force began (the release's or the last promotion's time, Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_since_ms: Option<u64>,
    /// Why it was aborted, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
    /// What makes the members abort it (`abort on the first failed apply, a dead node`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub guards: String,
    /// True when this node is in the release's slice (it serves `to`).
    #[serde(default)]
    pub here: bool,
    /// Who made it.
    pub author: String,
    /// When (Unix milliseconds, the writer's clock).
    pub time_ms: u64,
    /// Why.
    pub message: String,
}

/// One release, desired against actual (SPEC F16, F28): what it targets, what every member
/// serves, what every process reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseReport {
    /// The release.
    pub release: ReleaseRow,
    /// `in progress`, `complete` (every node of the last wave applied it), `aborted`, or
    /// `superseded` (a newer release is in force).
    pub outcome: String,
    /// Every member of the group and where it stands.
    pub nodes: Vec<ReleaseNodeRow>,
    /// Every process's report of this release (live, gone and superseded rows).
    pub applies: Vec<ProcessRow>,
    /// Processes that applied it.
    pub processes_ok: u32,
    /// Processes whose reload failed on it.
    pub processes_failed: u32,
    /// `processes_ok` / processes that reported (`None` before any report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// From the release to the last targeted node's processes applying it, once every
    /// targeted node did (`None` before, and for an aborted release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_consistency_ms: Option<u64>,
}

/// One member in a release's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseNodeRow {
    /// Node id.
    pub node: String,
    /// The first wave (counted from 1) whose slice holds it; `None`: no wave does (its labels
    /// do not match the selector, or its place is past the last wave's percentage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    /// In the slice of the wave in force: the release is its desired state.
    pub targeted: bool,
    /// The version it serves now.
    pub serving: String,
    /// Live as seen from the answering node.
    pub live: bool,
    /// When the last of its processes applied the release (Unix ms), if any did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_ms: Option<u64>,
    /// Its processes that applied the release (each counted once, by its newest report).
    #[serde(default)]
    pub applied: u32,
    /// Its processes whose reload failed on the release.
    #[serde(default)]
    pub failed: u32,
    /// It holds the release as desired: its processes applied it and none failed (or, with
    /// no process reporting, it serves the target).
    pub done: bool,
}

/// One node's copy of a group, in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeGroupRow {
    /// Node id.
    pub node: String,
    /// Latest version label it has applied.
    pub version: String,
    /// Its revision.
    pub revision: u64,
    /// Its heads digest (equal digests: identical state).
    pub heads: String,
    /// Live as seen from here.
    pub live: bool,
    /// The id of the group key it holds, `GENERATION-TAG`, once the key was rotated (absent:
    /// the group's first key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// It claims the group under another key than this node's (a rotation on its way, or one
    /// it missed): the two do not exchange the group's data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other_key: bool,
}

/// One local process's use of a group, in `status` (F16).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRow {
    /// The node the process runs on (empty from a daemon before issue 16: the answering node).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Process id.
    pub pid: u32,
    /// Process name.
    pub process: String,
    /// Version it reported.
    pub version: String,
    /// Revision it reported.
    pub revision: u64,
    /// Result it reported.
    pub result: ApplyResult,
    /// Unix milliseconds of the report (of the first, while a process reports the same
    /// version, release and result again: when it applied it).
    pub time_ms: u64,
    /// Unix milliseconds when the row became history, not a live process (absent while it
    /// lives): the process's connection ended, or, with `superseded`, it applied a later
    /// release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_ms: Option<u64>,
    /// In a gated group, the release its node served it when it reported (the release's id,
    /// `<inverted counter>.<actor hex>`): what the report is about (SPEC F16, F28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// True for a row of history kept because the process went on to another release (its
    /// outcome of this one stays on record for the release report).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
    /// The error rate the process last reported while running this row's version (0 to 1;
    /// `report_error_rate`), if it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
}

/// A key with concurrent values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConflictRow {
    /// Key.
    pub key: String,
    /// The value served everywhere.
    pub winner: Value,
    /// Version that wrote the winner.
    pub winner_version: Option<String>,
    /// The losing values and their versions.
    pub losers: Vec<(Value, Option<String>)>,
}

/// Every answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to Hello.
    Welcome {
        /// The daemon's protocol version.
        protocol: u32,
        /// The daemon's node id.
        node_id: String,
        /// The daemon's build version.
        daemon_version: String,
    },
    /// A setting (`value` is absent when the key is not set, and `null` when it is set to JSON
    /// `null`).
    Value {
        /// Group.
        group: String,
        /// Key.
        key: String,
        /// Value: `None` when the key is not set; `Some(Value::Null)` when it holds `null`.
        #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
        value: Option<Value>,
        /// Freshness.
        freshness: Freshness,
    },
    /// All settings of a group.
    Snapshot {
        /// Group.
        group: String,
        /// Key -> value.
        settings: BTreeMap<String, Value>,
        /// Content hash (full hex).
        content_hash: String,
        /// Freshness.
        freshness: Freshness,
    },
    /// A watch is active; events follow as `ServerFrame::Event`.
    Watching {
        /// Group.
        group: String,
        /// Revision at subscription time.
        revision: u64,
    },
    /// A write was applied locally and persisted (fsync) on this node.
    Committed {
        /// Group.
        group: String,
        /// New version label.
        version: String,
        /// This node's revision after the write.
        revision: u64,
        /// Content hash (12 hex digits).
        content_hash: String,
        /// Nodes known to hold the change durably so far (this node at least).
        acked_by: Vec<String>,
    },
    /// A group was created.
    GroupCreated {
        /// Name.
        name: String,
        /// Its secret key: share it with nodes that should join.
        key: Secret,
    },
    /// A group moved to a new key.
    KeyRotated {
        /// Group.
        group: String,
        /// The new key's generation (the group's first key is 0).
        generation: u64,
        /// Members entitled to it, this node included.
        entitled: usize,
        /// The new key: joins need it from now on.
        key: Secret,
    },
    /// This node joined a group.
    Joined {
        /// Name.
        name: String,
        /// The version it received.
        version: String,
    },
    /// Groups.
    Groups {
        /// Rows.
        groups: Vec<GroupRow>,
    },
    /// One version's whole settings.
    Show {
        /// Group.
        group: String,
        /// The version.
        version: VersionRow,
        /// Key -> value, as of that version.
        settings: BTreeMap<String, Value>,
    },
    /// A group's schema.
    Schema {
        /// Group.
        group: String,
        /// The schema, `None` when the group has none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema: Option<Value>,
        /// The version that set it last (`None` without a schema).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        /// Why this node cannot use the schema the group holds, when it cannot.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unusable: Option<String>,
    },
    /// What a settings file breaks of a schema (`schema check`).
    SchemaCheck {
        /// Group.
        group: String,
        /// Keys in the file.
        keys: usize,
        /// Every rule the file breaks (empty: it validates), at most the reported maximum plus
        /// one.
        violations: Vec<ViolationRow>,
    },
    /// Versions, oldest first.
    History {
        /// Group.
        group: String,
        /// Rows.
        versions: Vec<VersionRow>,
    },
    /// Diff lines.
    Diff {
        /// Group.
        group: String,
        /// Added keys.
        added: BTreeMap<String, Value>,
        /// Removed keys.
        removed: BTreeMap<String, Value>,
        /// Changed keys: (old, new).
        changed: BTreeMap<String, (Value, Value)>,
    },
    /// Conflicts.
    Conflicts {
        /// Group.
        group: String,
        /// Rows.
        conflicts: Vec<ConflictRow>,
    },
    /// The mesh.
    Nodes {
        /// Rows.
        nodes: Vec<NodeRow>,
    },
    /// A gated group's releases, newest first.
    ReleaseReport {
        /// Group.
        group: String,
        /// One per release.
        releases: Vec<ReleaseReport>,
    },
    /// A group's state.
    Status {
        /// Group.
        group: String,
        /// Mode.
        mode: String,
        /// Per node.
        nodes: Vec<NodeGroupRow>,
        /// Per local process.
        processes: Vec<ProcessRow>,
        /// Members of the group (nodes whose gossip proves they hold it), this node included.
        #[serde(default)]
        members: Vec<String>,
        /// Members this node holds live and not leaving.
        #[serde(default)]
        live: Vec<String>,
        /// `floor(live / 2) + 1` as this node computes it.
        #[serde(default)]
        quorum: usize,
        /// The last write made on this node: its version and the nodes that acknowledged it.
        #[serde(default)]
        last_write: Option<(String, Vec<String>)>,
        /// True when this node serves the group as stale (strong group catching up or in doubt).
        #[serde(default)]
        fenced: bool,
        /// Why it is fenced.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fenced_reason: Option<String>,
        /// Strong groups: the configuration this node holds (`c3 [n1, n2, n3]`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        configuration: Option<String>,
        /// Members in `live` that this node's failure detector cannot judge yet (counted).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unknown: Vec<String>,
        /// Why this node is degraded (a failed write to its disk), if it is.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        degraded: Option<String>,
        /// A gated group's release state (SPEC F14); absent for an immediate group.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<Box<ReleaseState>>,
    },
    /// A strong group's configuration changed.
    Reconfigured {
        /// Group.
        group: String,
        /// The configuration now (`c4 [n1, n2]`).
        configuration: String,
    },
    /// The local socket's counters.
    SocketStats {
        /// The counters.
        stats: SocketStats,
    },
    /// The node's health.
    Health {
        /// As the daemon sees it now.
        health: Box<crate::health::NodeHealth>,
    },
    /// The node's alerts.
    Alerts {
        /// Those that hold and those that cleared.
        alerts: crate::health::Alerts,
    },
    /// One node's kept history.
    NodeHistory {
        /// Its state changes and its downsampled polls.
        history: crate::health::NodeHistory,
    },
    /// The mesh's history.
    MeshHistory {
        /// Every node over the last hour, and the labels now.
        history: crate::health::MeshHistory,
    },
    /// A revocation this node stored (or held already).
    Revoked {
        /// Its id (16 hex digits).
        id: String,
        /// False when this node held it already.
        new: bool,
    },
    /// The revocations this node holds.
    Revocations {
        /// By id.
        revocations: Vec<RevocationRow>,
    },
    /// Audit records, oldest first.
    Audit {
        /// The newest records that matched, at most the daemon's cap.
        records: Vec<AuditRow>,
        /// True when more matched than were answered (narrow with `since_ms`).
        truncated: bool,
    },
    /// Done, nothing to return.
    Done,
    /// Refused.
    Error {
        /// Machine-readable class.
        code: ErrorCode,
        /// What was wrong and what to do.
        message: String,
    },
}

/// One audit record, as `audit` lists it (docs/operations.md, The audit log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    /// The node the action was taken on.
    pub node: String,
    /// Its place in that node's chain.
    pub seq: u64,
    /// When (milliseconds since the Unix epoch, that node's clock).
    pub at_ms: u64,
    /// Who (the authenticated identity).
    pub who: String,
    /// From where.
    pub from: String,
    /// The action (a request kind, or `enroll`).
    pub action: String,
    /// The group, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The version made, the id revoked, the node enrolled, or a refusal's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `ok` or an error code.
    pub outcome: String,
    /// The record's hash (its chain link).
    pub hash: String,
}

/// One revocation, as `revocations` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRow {
    /// Its id (16 hex digits).
    pub id: String,
    /// The identity whose certificates it revokes.
    pub node: String,
    /// One certificate's serial (lowercase hex); absent: every certificate of `node` issued up
    /// to `revoked_at_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// When it was made (milliseconds since the Unix epoch, the revoking host's clock).
    pub revoked_at_ms: u64,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// The local socket's counters, as `socket_stats` answers them. Bytes are frame bytes (the
/// length prefix not counted); "held" means read and not yet answered, or queued for writing and
/// not yet written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SocketStats {
    /// Connections open now, said Hello or not.
    pub connections: u64,
    /// Bytes of frames read and not yet answered, all connections together.
    pub read_bytes: u64,
    /// The most `read_bytes` has been since konord started.
    pub read_bytes_peak: u64,
    /// The budget of `read_bytes`: past it, readers wait.
    pub read_bytes_max: u64,
    /// Bytes of answers and events queued for writing, all connections together.
    pub write_bytes: u64,
    /// The most `write_bytes` has been since konord started.
    pub write_bytes_peak: u64,
    /// The budget of `write_bytes`: past it, answers wait and events drop their watch.
    pub write_bytes_max: u64,
    /// Frames refused: not JSON, an unknown request, an oversized length, truncated, a request
    /// before Hello, a reserved or repeated id.
    pub bad_frames: u64,
    /// Connections refused at Hello: over the connection cap or the cap per user.
    pub refused: u64,
    /// Silent connections closed to make room for new ones.
    pub ungreeted_closed: u64,
    /// Connections closed for being idle.
    pub idle_closed: u64,
    /// Watches dropped because their client fell behind (its queue or a byte budget was full).
    pub watches_dropped: u64,
}

/// Classes of errors a client may branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed or names something invalid (key, value, file, version).
    BadRequest,
    /// The group does not exist on this node.
    UnknownGroup,
    /// The group already exists.
    AlreadyExists,
    /// A key or version that does not exist.
    NotFound,
    /// The write changes nothing; no version was created.
    Unchanged,
    /// The group key was wrong.
    Forbidden,
    /// No peer could serve the request (join) in time.
    Unavailable,
    /// The daemon failed internally (disk full, ...); the message says what.
    Internal,
    /// Hello was not the first request, or the protocol version is not supported.
    Protocol,
    /// An eventual write is applied on this node but no live quorum acknowledged it in time.
    NotCommitted,
    /// A strong write's round aborted: nothing became visible anywhere; retry.
    Aborted,
    /// Another strong round of the group is in flight; retry.
    Busy,
    /// A conditional write's condition does not hold (`if_version`, `if_content`): the group
    /// has moved on; nothing was written. Read again, then decide.
    ConditionFailed,
    /// The write would break the group's schema; the message names the key, the value and the
    /// rule. Nothing was written.
    SchemaViolation,
    /// A strong write's commit was proposed but this node could not learn whether it became
    /// final: it is committed everywhere or nowhere; read before retrying.
    OutcomeUnknown,
    /// The change could not be made durable on this node (disk full, I/O error): not committed,
    /// not served here.
    NotDurable,
    /// On id 0 only: the connection was idle too long and the daemon closed it. The daemon
    /// handled no request on it after its last answer, so a request still waiting for an answer
    /// was not handled: reconnect and send it again.
    Idle,
}

/// A change on a watched group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    /// Keys changed; `revision` is the node's new revision of the group.
    Change {
        /// Group.
        group: String,
        /// Revision after the change.
        revision: u64,
        /// Latest version label after the change.
        version: String,
        /// Keys set or replaced, with their new values.
        set: BTreeMap<String, Value>,
        /// Keys removed.
        removed: Vec<String>,
    },
    /// History older than the requested revision is gone: here is the whole state instead.
    Resync {
        /// Group.
        group: String,
        /// Revision of the snapshot.
        revision: u64,
        /// Latest version label.
        version: String,
        /// All settings.
        settings: BTreeMap<String, Value>,
    },
}

impl WatchEvent {
    /// The group the event is about.
    pub fn group(&self) -> &str {
        match self {
            WatchEvent::Change { group, .. } | WatchEvent::Resync { group, .. } => group,
        }
    }

    /// The revision after the event.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Change { revision, .. } | WatchEvent::Resync { revision, .. } => *revision,
        }
    }
}

/// Encodes one frame: 4-byte big-endian length, then the JSON bytes.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(message).map_err(|e| FrameError::Encode(e.to_string()))?;
    if json.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { bytes: json.len(), max: FRAME_BYTES_MAX });
    }
    let length =
        u32::try_from(json.len()).map_err(|_| FrameError::TooLarge { bytes: json.len(), max: FRAME_BYTES_MAX })?;
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}

/// Checks a frame header and returns the payload length it announces.
pub fn frame_length(header: [u8; 4]) -> Result<usize, FrameError> {
    let length = u32::from_be_bytes(header) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { bytes: length, max: FRAME_BYTES_MAX });
    }
    Ok(length)
}

/// Decodes a frame's JSON payload.
pub fn decode_payload<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::Decode(e.to_string()))
}

/// A frame that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Over [`FRAME_BYTES_MAX`].
    #[error("frame of {bytes} bytes is over the limit of {max}")]
    TooLarge {
        /// Announced or actual size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid JSON for the expected type.
    #[error("malformed frame: {0}")]
    Decode(String),
    /// Could not serialize (a bug).
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

impl Request {
    /// The group the request is about, if it names one.
    pub fn group(&self) -> Option<&str> {
        match self {
            Request::Get { group, .. }
            | Request::Snapshot { group, .. }
            | Request::Show { group, .. }
            | Request::SchemaSet { group, .. }
            | Request::SchemaGet { group }
            | Request::SchemaCheck { group, .. }
            | Request::Watch { group, .. }
            | Request::Unwatch { group }
            | Request::ReportApply { group, .. }
            | Request::ReportErrorRate { group, .. }
            | Request::Set { group, .. }
            | Request::Delete { group, .. }
            | Request::Apply { group, .. }
            | Request::Rollback { group, .. }
            | Request::Release { group, .. }
            | Request::Promote { group, .. }
            | Request::Abort { group, .. }
            | Request::History { group }
            | Request::Diff { group, .. }
            | Request::Conflicts { group }
            | Request::Status { group }
            | Request::ReleaseReport { group, .. } => Some(group),
            Request::GroupCreate { name, .. }
            | Request::GroupJoin { name, .. }
            | Request::GroupLeave { name, .. }
            | Request::GroupRotateKey { name, .. } => Some(name),
            Request::GroupRemove { group, .. } => Some(group),
            Request::Hello { .. }
            | Request::GroupList
            | Request::Nodes
            | Request::SocketStats
            | Request::Health
            | Request::Alerts
            | Request::NodeHistory { .. }
            | Request::Revoke { .. }
            | Request::Revocations
            | Request::Audit { .. } => None,
        }
    }

    /// The request's wire tag (`"get"`, `"watch"`, ...), for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Get { .. } => "get",
            Request::Snapshot { .. } => "snapshot",
            Request::Watch { .. } => "watch",
            Request::Unwatch { .. } => "unwatch",
            Request::ReportApply { .. } => "report_apply",
            Request::ReportErrorRate { .. } => "report_error_rate",
            Request::GroupCreate { .. } => "group_create",
            Request::GroupJoin { .. } => "group_join",
            Request::Release { .. } => "release",
            Request::Promote { .. } => "promote",
            Request::Abort { .. } => "abort",
            Request::GroupLeave { .. } => "group_leave",
            Request::GroupRotateKey { .. } => "group_rotate_key",
            Request::GroupRemove { .. } => "group_remove",
            Request::GroupList => "group_list",
            Request::Set { .. } => "set",
            Request::Delete { .. } => "delete",
            Request::Apply { .. } => "apply",
            Request::Rollback { .. } => "rollback",
            Request::Show { .. } => "show",
            Request::SchemaSet { .. } => "schema_set",
            Request::SchemaGet { .. } => "schema_get",
            Request::SchemaCheck { .. } => "schema_check",
            Request::History { .. } => "history",
            Request::Diff { .. } => "diff",
            Request::Conflicts { .. } => "conflicts",
            Request::Nodes => "nodes",
            Request::Status { .. } => "status",
            Request::ReleaseReport { .. } => "release_report",
            Request::SocketStats => "socket_stats",
            Request::Health => "health",
            Request::Alerts => "alerts",
            Request::NodeHistory { .. } => "node_history",
            Request::Revoke { .. } => "revoke",
            Request::Revocations => "revocations",
            Request::Audit { .. } => "audit",
        }
    }
}

impl Response {
    /// The response's wire tag (`"value"`, `"error"`, ...), for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Welcome { .. } => "welcome",
            Response::Value { .. } => "value",
            Response::Snapshot { .. } => "snapshot",
            Response::Watching { .. } => "watching",
            Response::Committed { .. } => "committed",
            Response::GroupCreated { .. } => "group_created",
            Response::Joined { .. } => "joined",
            Response::KeyRotated { .. } => "key_rotated",
            Response::Groups { .. } => "groups",
            Response::Show { .. } => "show",
            Response::Schema { .. } => "schema",
            Response::SchemaCheck { .. } => "schema_check",
            Response::History { .. } => "history",
            Response::Diff { .. } => "diff",
            Response::Conflicts { .. } => "conflicts",
            Response::Nodes { .. } => "nodes",
            Response::Status { .. } => "status",
            Response::ReleaseReport { .. } => "release_report",
            Response::Reconfigured { .. } => "reconfigured",
            Response::SocketStats { .. } => "socket_stats",
            Response::Health { .. } => "health",
            Response::Alerts { .. } => "alerts",
            Response::NodeHistory { .. } => "node_history",
            Response::MeshHistory { .. } => "mesh_history",
            Response::Revoked { .. } => "revoked",
            Response::Revocations { .. } => "revocations",
            Response::Audit { .. } => "audit",
            Response::Done => "done",
            Response::Error { .. } => "error",
        }
    }
}

impl ErrorCode {
    /// The code's wire name (`"unknown_group"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownGroup => "unknown_group",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unchanged => "unchanged",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Protocol => "protocol",
            ErrorCode::NotCommitted => "not_committed",
            ErrorCode::Aborted => "aborted",
            ErrorCode::Busy => "busy",
            ErrorCode::ConditionFailed => "condition_failed",
            ErrorCode::SchemaViolation => "schema_violation",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::NotDurable => "not_durable",
            ErrorCode::Idle => "idle",
        }
    }
}

/// Canonical JSON text of a value (docs/protocol.md, "Canonical JSON"), as konord computes it.
pub use konor_canon::canonical_json;

/// The content hash of a group's settings, as `Snapshot.content_hash` carries it (64 lowercase
/// hex digits).
///
/// Definition (docs/protocol.md, "Content hash"): SHA-256 over the prefix
/// `konor-content-hash-v2\n` and then, for each entry in key order, `u64_le(len key) || key ||
/// u64_le(len canonical) || canonical`, where `canonical` is the value's canonical JSON (RFC 8785
/// with 64-bit integers kept exact). Computed by `konor-canon`, the code konord runs.
pub fn content_hash(settings: &BTreeMap<String, Value>) -> String {
    let canonical: Vec<(&str, String)> =
        settings.iter().map(|(key, value)| (key.as_str(), canonical_json(value))).collect();
    konor_canon::hex(&konor_canon::content_hash(canonical.iter().map(|(key, text)| (*key, text.as_str()))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn frames_are_length_prefixed_json() {
        let frame = ClientFrame { id: 7, request: Request::Get { group: "app".into(), key: "db.pool".into() } };
        let bytes = encode_frame(&frame).unwrap();
        let length = frame_length([bytes[0], bytes[1], bytes[2], bytes[3]]).unwrap();
        assert_eq!(length, bytes.len() - 4);
        expect![[r#"{"id":7,"request":{"type":"get","group":"app","key":"db.pool"}}"#]]
            .assert_eq(std::str::from_utf8(&bytes[4..]).unwrap());
        assert_eq!(decode_payload::<ClientFrame>(&bytes[4..]).unwrap(), frame);
    }

    #[test]
    fn group_create_carries_evict_after_ms_only_when_set() {
        let without = Request::GroupCreate {
            name: "app".into(),
            mode: "strong".into(),
            key: None,
            evict_after_ms: None,
            fencing: None,
            release: None,
        };
        expect![[r#"{"type":"group_create","name":"app","mode":"strong","key":null}"#]]
            .assert_eq(&serde_json::to_string(&without).unwrap());
        let with = r#"{"type":"group_create","name":"app","mode":"strong","evict_after_ms":2000}"#;
        let Request::GroupCreate { evict_after_ms, key, .. } = serde_json::from_str(with).unwrap() else { panic!() };
        assert_eq!((evict_after_ms, key), (Some(2000), None));
    }

    #[test]
    fn a_key_set_to_null_is_told_from_a_key_not_set() {
        let answer = |value| ServerFrame::Response {
            id: 1,
            response: Response::Value { group: "app".into(), key: "k".into(), value, freshness: Freshness::default() },
        };
        for value in [None, Some(Value::Null), Some(Value::from(95_535_577_795.735_23))] {
            let bytes = encode_frame(&answer(value.clone())).unwrap();
            let text = std::str::from_utf8(&bytes[4..]).unwrap();
            assert_eq!(text.contains("\"value\":"), value.is_some(), "{text}");
            assert_eq!(decode_payload::<ServerFrame>(&bytes[4..]).unwrap(), answer(value));
        }
    }

    #[test]
    fn optional_request_fields_may_be_null_or_absent() {
        let null = r#"{"type":"set","group":"app","entries":{},"meta":null}"#;
        let absent = r#"{"type":"set","group":"app","entries":{}}"#;
        let empty = r#"{"type":"set","group":"app","entries":{},"meta":{"author":null,"message":null}}"#;
        let [null, absent, empty] = [null, absent, empty].map(|text| serde_json::from_str::<Request>(text).unwrap());
        assert_eq!((&null, &empty), (&absent, &absent));
        let leave: Request = serde_json::from_str(r#"{"type":"group_leave","name":"app","force":null}"#).unwrap();
        assert_eq!(leave, Request::GroupLeave { name: "app".into(), force: false });
        let watch: Request = serde_json::from_str(r#"{"type":"watch","group":"app","from_revision":null}"#).unwrap();
        assert_eq!(watch, Request::Watch { group: "app".into(), from_revision: None, prefix: None });
        // A required field may not be null.
        assert!(serde_json::from_str::<Request>(r#"{"type":"watch","group":null}"#).is_err());
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        assert!(frame_length(u32::MAX.to_be_bytes()).is_err());
        assert!(decode_payload::<ClientFrame>(b"{\"id\":1}").is_err());
        assert!(decode_payload::<ClientFrame>(b"\xff\xfe").is_err());
    }

    #[test]
    fn content_hash_follows_every_change() {
        let mut settings = BTreeMap::new();
        settings.insert("db.pool".to_owned(), serde_json::json!(10));
        settings.insert("name".to_owned(), serde_json::json!({"b": 1, "a": "x"}));
        let full = content_hash(&settings);
        assert_eq!(full.len(), 64);
        let mut moved = settings.clone();
        let value = moved.remove("db.pool").unwrap();
        moved.insert("db.size".to_owned(), value);
        assert_ne!(content_hash(&moved), full);
        settings.insert("db.pool".to_owned(), serde_json::json!(10.0));
        assert_eq!(content_hash(&settings), full, "10.0 and 10 are one number in canonical JSON");
        assert_ne!(content_hash(&BTreeMap::new()), full);
    }

    #[test]
    fn kinds_match_the_wire_tags() {
        let request =
            Request::ReportApply { group: "app".into(), version: "v1".into(), revision: 1, result: ApplyResult::Ok };
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json["type"], request.kind());
        let response = Response::Done;
        assert_eq!(serde_json::to_value(&response).unwrap()["type"], response.kind());
        let code = ErrorCode::UnknownGroup;
        assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
    }

    #[test]
    fn requests_and_answers_carrying_a_group_key_do_not_print_it() {
        const KEY: &str = crate::secret::tests::KEY;
        let carriers = [
            format!("{:?}", Request::GroupJoin { name: "app".into(), key: KEY.into() }),
            format!(
                "{:?}",
                Request::GroupCreate {
                    name: "app".into(),
                    mode: "strong".into(),
                    key: Some(KEY.into()),
                    evict_after_ms: None,
                    fencing: None,
                    release: None,
                }
            ),
            format!("{:#?}", Response::GroupCreated { name: "app".into(), key: KEY.into() }),
        ];
        for text in carriers {
            assert!(!text.contains(KEY) && !text.contains(&KEY[..16]), "{text}");
            assert!(text.contains("Secret(..)"), "{text}");
        }
        // The wire is unchanged: the key travels as a string.
        let json = serde_json::to_string(&Request::GroupJoin { name: "app".into(), key: KEY.into() }).unwrap();
        assert!(json.contains(&format!("\"key\":\"{KEY}\"")), "{json}");
    }
}
