//! The local commands a replica takes (create, join, leave, remove a member, set, delete,
//! apply, rollback, schema, release, promote, abort) and their answers: `CommandOutcome` on success, `CommandError` (nothing
//! changed on this node, unless the variant says otherwise) on failure.

use serde_json::Value;

use super::NodeId;
use crate::configuration::GroupPolicy;
use crate::error::{EditError, RemoteError};
use crate::file_format::FileFormat;
use crate::group::{CommitMeta, Mode};
use crate::join::GroupKey;
use crate::version::VersionInfo;

/// Correlates a command with its reply.
pub type CommandId = u64;

/// A local command.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create a group here.
    CreateGroup {
        /// Name.
        name: String,
        /// Mode.
        mode: Mode,
        /// Its key (random bytes from the shell).
        key: GroupKey,
        /// Author, message, time.
        meta: CommitMeta,
        /// Its policy (eviction delay, fencing).
        policy: GroupPolicy,
    },
    /// Join a group held by some live peer.
    JoinGroup {
        /// Name.
        name: String,
        /// Its key.
        key: GroupKey,
        /// True when this node held the group and lost records of it (a damaged file): it then
        /// answers questions about rounds it has no record of with "unknown" until it moved on.
        repair: bool,
    },
    /// Move the group to a new key (`group rotate-key`): the members then were are handed it
    /// (wrapped under the key they hold); the old key admits nobody any more.
    RotateKey {
        /// Group.
        group: String,
        /// The new key (random bytes from the shell).
        key: GroupKey,
    },
    /// Stop holding a group here. A strong group's member leaves the configuration first.
    LeaveGroup {
        /// Name.
        name: String,
        /// Drop the group at once, without a configuration change (the others evict it).
        force: bool,
    },
    /// Remove members from a strong group's configuration.
    RemoveMember {
        /// Group.
        group: String,
        /// The members.
        nodes: Vec<NodeId>,
        /// Agreed by the remaining members alone, without a majority of the configuration.
        force: bool,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Set keys.
    Set {
        /// Group.
        group: String,
        /// Entries.
        entries: Vec<(String, Value)>,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Delete keys.
    Delete {
        /// Group.
        group: String,
        /// Keys.
        keys: Vec<String>,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Apply a whole file.
    Apply {
        /// Group.
        group: String,
        /// Syntax.
        format: FileFormat,
        /// Text.
        text: String,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Roll back to a version.
    Rollback {
        /// Group.
        group: String,
        /// Version reference.
        version: String,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Release a version of a gated group (SPEC F14): members serve it from now on.
    Release {
        /// Group.
        group: String,
        /// Version reference.
        version: String,
        /// Which nodes it reaches.
        strategy: crate::configuration::ReleaseStrategy,
        /// What makes the members abort it.
        guards: crate::configuration::Guards,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Move the current canary release of a gated group to a later wave.
    Promote {
        /// Group.
        group: String,
        /// The wave (0 is the first); `None`: the next one.
        wave: Option<u32>,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Abort the current release of a gated group.
    Abort {
        /// Group.
        group: String,
        /// Why.
        reason: String,
        /// Author, message, time.
        meta: CommitMeta,
    },
    /// Set the group's schema (a JSON Schema), or remove it (`None`).
    SetSchema {
        /// Group.
        group: String,
        /// The schema.
        schema: Option<Value>,
        /// Author, message, time.
        meta: CommitMeta,
    },
}

impl Command {
    /// The group it concerns.
    pub fn group(&self) -> &str {
        match self {
            Command::CreateGroup { name, .. } | Command::JoinGroup { name, .. } | Command::LeaveGroup { name, .. } => {
                name
            }
            Command::RemoveMember { group, .. }
            | Command::RotateKey { group, .. }
            | Command::Set { group, .. }
            | Command::Delete { group, .. }
            | Command::Apply { group, .. }
            | Command::Rollback { group, .. }
            | Command::Release { group, .. }
            | Command::Promote { group, .. }
            | Command::Abort { group, .. }
            | Command::SetSchema { group, .. } => group,
        }
    }
}

/// A local write that is applied and durable on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitReceipt {
    /// Group.
    pub group: String,
    /// The version created.
    pub version: VersionInfo,
    /// Its label.
    pub label: String,
    /// This node's revision after the write.
    pub revision: u64,
    /// Nodes known to hold it durably (this node).
    pub acked_by: Vec<NodeId>,
    /// The commit was final before this answer was queued (a strong round whose decision a
    /// majority recorded, this node's own record included): no later persist of this node can
    /// undo it, so the shell must not turn this answer into `not_durable` when a persist of the
    /// group that came before it in the same batch failed.
    pub final_before_reply: bool,
}

/// A successful command.
#[derive(Debug, Clone, PartialEq)]
// One value per answered command, moved once into a reply: boxing would cost an allocation per
// write for nothing.
#[allow(clippy::large_enum_variant)]
pub enum CommandOutcome {
    /// A write.
    Committed(CommitReceipt),
    /// A group was created.
    Created {
        /// Name.
        name: String,
    },
    /// This node joined a group.
    Joined {
        /// Name.
        name: String,
        /// Latest version label received.
        version: String,
    },
    /// This node left a group.
    Left {
        /// Name.
        name: String,
    },
    /// The group moved to a new key.
    KeyRotated {
        /// Group.
        group: String,
        /// The new key's generation.
        generation: u64,
        /// The members entitled to it (this node included).
        entitled: usize,
    },
    /// A strong group's configuration changed.
    Reconfigured {
        /// Group.
        group: String,
        /// The configuration now, as text.
        configuration: String,
    },
}

/// A refused command. Nothing changed on this node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The group is not held here.
    #[error("group {0:?} does not exist on this node (create it, or join it with its key)")]
    UnknownGroup(String),
    /// The group is already held here.
    #[error("group {0:?} already exists on this node")]
    AlreadyExists(String),
    /// A join is already running for the group.
    #[error("a join of group {0:?} is already in progress")]
    JoinInProgress(String),
    /// The write was refused.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// A member refused the join.
    #[error("join of group {group:?} refused by {member}: {reason}")]
    JoinRefused {
        /// Group.
        group: String,
        /// The member that refused.
        member: NodeId,
        /// Its reason.
        reason: String,
    },
    /// No member answered.
    #[error("no live member of group {0:?} answered in time (is a node holding it running? see `konorctl nodes`)")]
    JoinUnavailable(String),
    /// The document grew beyond what can be stored (the group needs an epoch switch).
    #[error("{0}")]
    TooLarge(String),
    /// An eventual write did not reach a live quorum in time. It stays applied on this node
    /// and keeps spreading.
    #[error(
        "{group}@{version} is applied on this node but not committed: durable on [{}], no ack from [{}] within {timeout_ms} ms (quorum {needed}); it stays applied here and keeps spreading",
        acked_by.join(", "),
        missing.join(", ")
    )]
    NotCommitted {
        /// Group.
        group: String,
        /// Version label.
        version: String,
        /// Nodes holding it durably.
        acked_by: Vec<NodeId>,
        /// Live members that did not ack.
        missing: Vec<NodeId>,
        /// The quorum it needed.
        needed: usize,
        /// The timeout.
        timeout_ms: u64,
    },
    /// Another strong round of the group is in flight here. Nothing changed; retry.
    #[error("group {group:?} has round {round} in flight; nothing changed, retry")]
    RoundInProgress {
        /// Group.
        group: String,
        /// The round in flight.
        round: String,
    },
    /// The strong round aborted: nothing became visible anywhere. Retry once the cause is gone.
    #[error("strong write to {group:?} aborted (round {round}): {reason}; nothing changed on any node, retry")]
    RoundAborted {
        /// Group.
        group: String,
        /// The round.
        round: String,
        /// Why, naming the members that blocked.
        reason: String,
    },
    /// The strong round's commit was proposed but this node could not learn whether it became
    /// final: the group settles it the same everywhere (committed or aborted, never both).
    #[error(
        "the outcome of the strong write to {group:?} (round {round}) is unknown: {reason}; read the group again (or its history) before retrying"
    )]
    OutcomeUnknown {
        /// Group.
        group: String,
        /// The round.
        round: String,
        /// Why.
        reason: String,
    },
    /// The strong group holds no configuration (made by an older konord). Nothing changed.
    #[error("strong group {0:?} has no configuration (it was created by an older konord); create it anew")]
    NoConfiguration(String),
    /// This node is not a member of the strong group's configuration. Nothing changed.
    #[error(
        "{node} is not (yet) a member of the configuration of strong group {group:?} ({configuration}); it catches up and joins it on its own, retry shortly"
    )]
    NotAMember {
        /// Group.
        group: String,
        /// This node.
        node: NodeId,
        /// The configuration, as text.
        configuration: String,
    },
    /// Leaving the strong group's configuration failed; the node still holds the group.
    #[error("cannot leave {group:?}: {reason}")]
    LeaveFailed {
        /// Group.
        group: String,
        /// Why.
        reason: String,
    },
    /// A request that makes no sense here. Nothing changed.
    #[error("{0}")]
    BadRequest(String),
    /// The change could not be made durable on this node (disk full, I/O error). It is not
    /// served here; an eventual change may still reach peers it was pushed to.
    #[error("{0}")]
    NotDurable(String),
}

impl From<RemoteError> for CommandError {
    fn from(error: RemoteError) -> Self {
        CommandError::TooLarge(error.to_string())
    }
}
