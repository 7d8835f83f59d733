//! What the shell and the core exchange: the `Input`s a replica reacts to, the `Output`s it
//! asks the shell to execute in order (with the durable writes of `PersistOp` and the
//! `Notification`s for watchers), and the `LoadedState` of a group read from disk.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{Command, CommandError, CommandId, CommandOutcome, GroupGossip, MembershipView, NodeId};
use crate::group::GroupDoc;
use crate::keyring::Keyring;
use crate::peer_message::{PeerMessage, RoundId};

/// The input a replica reacts to.
#[derive(Debug)]
pub enum Input {
    /// A local command.
    Command {
        /// Reply correlation.
        id: CommandId,
        /// The command.
        command: Command,
    },
    /// Bytes from an authenticated peer (its node id checked against its certificate).
    Peer {
        /// The peer.
        from: NodeId,
        /// The encoded [`PeerMessage`].
        bytes: Vec<u8>,
    },
    /// The membership view changed.
    Membership(MembershipView),
    /// Time passed; check timers.
    Tick,
    /// The shell started the persist operations before [`Output::Resume`]: continue.
    Resume,
    /// A persist operation of `group` failed (disk full, I/O error): nothing after it in its
    /// batch ran. `reloaded` is the group as its file holds it now (the durable state), or
    /// `None` when the file cannot be read: the replica drops what was not made durable.
    PersistFailed {
        /// Group.
        group: String,
        /// What failed, for the error answers.
        error: String,
        /// The group reloaded from its file.
        reloaded: Option<Box<LoadedState>>,
    },
}

/// What the shell must do, in order.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send a message to a peer.
    Send {
        /// Peer.
        to: NodeId,
        /// Message.
        message: PeerMessage,
    },
    /// Make something durable.
    Persist(PersistOp),
    /// Answer a local command.
    Reply {
        /// The command.
        id: CommandId,
        /// Its outcome.
        result: Result<CommandOutcome, CommandError>,
    },
    /// Tell local watchers.
    Notify(Notification),
    /// Publish (or, with `None`, retract) this node's gossip for a group.
    Publish {
        /// Group.
        group: String,
        /// The value, or `None` after leaving.
        gossip: Option<GroupGossip>,
    },
    /// Stop publishing the group without leaving it: its file cannot be read, and the shell
    /// repairs it from peers. The members keep counting this node as one (it is not recorded as
    /// left, and stays entitled to a rotated key).
    Withdraw {
        /// Group.
        group: String,
    },
    /// A peer's message was dropped: count and log it.
    Dropped {
        /// Peer.
        from: NodeId,
        /// Why.
        reason: String,
    },
    /// Start the persist operations queued before this output, then hand the replica
    /// [`Input::Resume`] before waiting for them: the work it resumes (applying received
    /// changes) overlaps their fsync. Outputs that follow (acks, notifications) still run only
    /// after those persists, as always. A shell that ignores this output loses nothing: the
    /// replica resumes at its next input anyway.
    Resume,
}

/// A durable write the shell must perform before executing later outputs, and before handing
/// the replica any input other than [`Input::Resume`]: the replica relies on it (a strong
/// coordinator counts its own acceptance as durable once its record's persist is queued, and
/// any answer that reaches it later comes after that persist; `round.rs`, `propose_commit`).
#[derive(Debug, Clone)]
pub enum PersistOp {
    /// Create the group's file and store its key.
    CreateGroup {
        /// Group.
        group: String,
        /// The whole file.
        file: Vec<u8>,
        /// The key.
        keys: Keyring,
    },
    /// Replace the group's key file (a rotation made here or a key handed over): durable
    /// before the new key is used.
    Keys {
        /// Group.
        group: String,
        /// The keyring.
        keys: Keyring,
        /// False when only records changed (a member seen leaving or back, the generation of
        /// a key joined with): a failed save is then logged, not a failure of the group.
        required: bool,
    },
    /// Append records to the group's file.
    Append {
        /// Group.
        group: String,
        /// Framed records.
        records: Vec<u8>,
    },
    /// Replace the group's file by a compacted one (atomic rename).
    Compact {
        /// Group.
        group: String,
        /// The whole new file.
        file: Vec<u8>,
    },
    /// Remove the group's file (moved aside, never deleted).
    RemoveGroup {
        /// Group.
        group: String,
    },
    /// Store the members this node knows of the group (so that after a restart it counts them
    /// before gossip tells it about them).
    Members {
        /// Group.
        group: String,
        /// The members, this node excluded.
        members: Vec<NodeId>,
    },
    /// Store the sync state for (group, peer).
    SyncState {
        /// Group.
        group: String,
        /// Peer.
        peer: NodeId,
        /// Encoded state.
        state: Vec<u8>,
    },
}

/// A change in what a group serves, for local watchers.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    /// Group.
    pub group: String,
    /// This node's revision after the change.
    pub revision: u64,
    /// Latest version label after the change.
    pub version: String,
    /// Keys set or replaced, with their values.
    pub set: BTreeMap<String, Value>,
    /// Keys removed.
    pub removed: Vec<String>,
    /// True when the change came from a peer, which holds it durably: the shell may tell
    /// watchers of an eventual group before this node's own fsync (issue 14).
    pub pushed: bool,
    /// True when the change moved nothing this node serves (a gated group's write that is not
    /// released, SPEC F14): the revision moves, and the read view with it, but watchers are not
    /// told and the event ring does not keep it (a resuming watcher skips the gap).
    pub quiet: bool,
}

/// A group loaded from disk at start.
#[derive(Debug)]
pub struct LoadedState {
    /// The document.
    pub doc: GroupDoc,
    /// The keys.
    pub keys: Keyring,
    /// Change records after the snapshot in its file.
    pub tail_changes: usize,
    /// Persisted sync states per peer.
    pub sync_states: BTreeMap<NodeId, Vec<u8>>,
    /// A staged strong round without a decision in the file.
    pub staged: Option<crate::journal::StagedRound>,
    /// True when the file lost records (a damaged tail was cut): the node may have forgotten
    /// votes and acceptances.
    pub damaged: bool,
    /// The members this node knew of the group before it stopped.
    pub known_members: BTreeSet<NodeId>,
    /// Decisions recorded in the file.
    pub decisions: Vec<(RoundId, bool)>,
    /// Ballots promised and decisions accepted for rounds not staged here.
    pub ballots: Vec<crate::journal::AcceptorRecord>,
}
