//! The replication protocol as a sans-IO state machine: one [`Replica`] per node holds the
//! groups it is a member of and decides when to push changes, to whom, when to start a sync
//! session, how to admit a joiner, and how local revisions are numbered for watchers.
//!
//! The shell drives it with [`Replica::handle`] (a local command, a peer's bytes, a membership
//! view, a timer tick) and executes the [`Output`]s from [`Replica::poll_output`] strictly in
//! order: a `Persist` is durable (fsync) before any later `Send` or `Reply` is executed, so a
//! caller or a peer never hears of a change this node could still lose.
//!
//! Membership claims in gossip carry a proof (HMAC of the node id under the group key), so a
//! node only ever exchanges a group's data with peers that hold the group key.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::{ActorId, ChangeHash};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::configuration::{Configuration, GroupPolicy};
use crate::error::{EditError, RemoteError};
use crate::exchange::{HeadsDigest, RemoteApplied, SyncPeer};
use crate::file_format::FileFormat;
use crate::group::{CommitMeta, Edit, GroupDoc, Mode};
use crate::join::{GroupKey, derive_nonce, join_proof, verify_join_proof};
use crate::journal::{RoundRecord, change_record, needs_compaction, round_record, snapshot_file};
use crate::limits::{
    ANTI_ENTROPY_DELAY_MS, DECISIONS_KEPT, JOIN_STEP_TIMEOUT_MS, JOIN_TIMEOUT_MS, START_GRACE_MS,
    SYNC_SESSION_TIMEOUT_MS, WATCH_EVENTS_KEPT,
};
use crate::peer_message::{Nonce, PeerMessage, RoundId, RoundOutcome};

mod configuration;
mod decision;
mod lease;
mod quorum;
mod round;

use crate::settings::{hex, unhex};
use crate::time::Millis;
use crate::version::VersionInfo;
pub use quorum::QuorumInfo;

/// A node's id, as in its certificate and in gossip.
pub type NodeId = String;

/// Correlates a command with its reply.
pub type CommandId = u64;

/// The Automerge actor of a node incarnation: a hash of the node id and its start counter, so a
/// restarted node never reuses an actor (FACTS).
pub fn actor_for(node_id: &str, incarnation: u64) -> ActorId {
    let mut hasher = Sha256::new();
    hasher.update(b"konorkestra/actor/v1");
    hasher.update((node_id.len() as u64).to_le_bytes());
    hasher.update(node_id.as_bytes());
    hasher.update(incarnation.to_le_bytes());
    let digest: [u8; 32] = hasher.finalize().into();
    let mut actor = [0u8; 16];
    actor.copy_from_slice(&digest[..16]);
    ActorId::from(actor)
}

/// A fresh actor for the `count`-th reload of a group in this run: derived from the run's actor,
/// so it is unique to this node, this start and this reload.
fn reload_actor(actor: &ActorId, count: u64) -> ActorId {
    let mut hasher = Sha256::new();
    hasher.update(b"konorkestra/reload-actor/v1");
    hasher.update(actor.to_bytes());
    hasher.update(count.to_le_bytes());
    let digest: [u8; 32] = hasher.finalize().into();
    let mut fresh = [0u8; 16];
    fresh.copy_from_slice(&digest[..16]);
    ActorId::from(fresh)
}

/// The records to persist before applying `changes` pushed to an eventual group, when that is
/// safe: every change decodes, is new here, and depends only on changes here or earlier in the
/// push (so the apply will take all of them, in this order). `None` otherwise: the caller
/// applies first and persists what was applied.
fn persist_first_records(doc: &crate::group::GroupDoc, changes: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut earlier: Vec<automerge::ChangeHash> = Vec::new();
    let mut records = Vec::new();
    for bytes in changes {
        let change = crate::exchange::decode_change(bytes).ok()?;
        let hash = change.hash();
        if doc.has_change(&hash) || earlier.contains(&hash) {
            return None;
        }
        if !change.deps().iter().all(|dep| earlier.contains(dep) || doc.has_change(dep)) {
            return None;
        }
        records.extend(change_record(bytes).ok()?);
        earlier.push(hash);
    }
    (!records.is_empty()).then_some(records)
}

/// What a node publishes in gossip for each group it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGossip {
    /// Digest of its heads.
    pub digest: HeadsDigest,
    /// Its revision of the group.
    pub revision: u64,
    /// Label of its latest version.
    pub version: String,
    /// HMAC of its node id under the group key: the membership proof.
    pub proof: [u8; 32],
    /// Its durable heads (the gossip summary of acks).
    pub heads: Vec<ChangeHash>,
}

impl PeerState {
    /// True when heartbeats arrive from it.
    pub fn is_live(&self) -> bool {
        self.liveness == PeerLiveness::Live
    }

    /// True when it may be up: live, or not judged yet.
    pub fn may_be_up(&self) -> bool {
        self.liveness != PeerLiveness::Dead
    }
}

impl GroupGossip {
    /// The gossip value: `digest;revision;version;proof-hex;heads-hex,...` (short UTF-8, as
    /// chitchat needs: one head normally, a few after concurrent writes).
    pub fn encode(&self) -> String {
        let heads: Vec<String> = self.heads.iter().map(|h| hex(&h.0)).collect();
        format!("{};{};{};{};{}", self.digest, self.revision, self.version, hex(&self.proof), heads.join(","))
    }

    /// Parses a gossip value; `None` for anything else (including the "left" marker).
    pub fn parse(text: &str) -> Option<GroupGossip> {
        let mut parts = text.split(';');
        let digest = HeadsDigest::from_hex(parts.next()?)?;
        let revision = parts.next()?.parse().ok()?;
        let version = parts.next()?.to_owned();
        let proof: [u8; 32] = unhex(parts.next()?)?.try_into().ok()?;
        let heads_text = parts.next()?;
        let mut heads = Vec::new();
        for head in heads_text.split(',').filter(|h| !h.is_empty()) {
            heads.push(ChangeHash(unhex(head)?.try_into().ok()?));
        }
        if parts.next().is_some() {
            return None;
        }
        Some(GroupGossip { digest, revision, version, proof, heads })
    }
}

/// The membership proof of `node` for `group`.
pub fn membership_proof(key: &GroupKey, group: &str, node: &str) -> [u8; 32] {
    join_proof(key, group, node, &[0; 32], &[1; 32])
}

/// What this node's failure detector can say about a peer (SPEC invariant 5, issue 11: unknown
/// is not dead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum PeerLiveness {
    /// Heartbeats arrive.
    Live,
    /// The detector cannot judge yet: this node just started or resumed from a pause, or has
    /// not heard enough heartbeats from the peer. Quorums count it as a live member that has
    /// not acknowledged; strong rounds never treat it as gone.
    #[default]
    Unknown,
    /// The detector gave up on it, or it announced a graceful leave.
    Dead,
}

/// One peer as the local membership view (gossip) sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerState {
    /// Its liveness by this node's failure detector (leaving counts as dead).
    pub liveness: PeerLiveness,
    /// Groups it claims to hold, with its gossip for each.
    pub groups: BTreeMap<String, GroupGossip>,
    /// Groups it announced in gossip that it left.
    pub left: BTreeSet<String>,
}

/// The whole membership view, handed in whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MembershipView {
    /// Every other node known to gossip.
    pub peers: BTreeMap<NodeId, PeerState>,
}

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
}

/// A durable write the shell must perform before executing later outputs.
#[derive(Debug, Clone)]
pub enum PersistOp {
    /// Create the group's file and store its key.
    CreateGroup {
        /// Group.
        group: String,
        /// The whole file.
        file: Vec<u8>,
        /// The key.
        key: GroupKey,
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

/// A group loaded from disk at start.
#[derive(Debug)]
pub struct LoadedState {
    /// The document.
    pub doc: GroupDoc,
    /// The key.
    pub key: GroupKey,
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

#[derive(Debug, Default)]
struct SyncSession {
    peer: SyncPeer,
    /// When we last sent a message and still await an answer.
    in_flight_since: Option<Millis>,
    /// Since when the peer's gossiped digest differs from ours.
    diverged_since: Option<Millis>,
}

#[derive(Debug)]
struct GroupState {
    doc: GroupDoc,
    key: GroupKey,
    proof: [u8; 32],
    revision: u64,
    /// Recent notifications with the revision each one started from.
    events: VecDeque<(u64, Notification)>,
    tail_changes: usize,
    sync: BTreeMap<NodeId, SyncSession>,
    /// The strong round this node coordinates or has staged (at most one: invariant S3).
    round: Option<round::Round>,
    /// The largest round lamport seen for the group.
    round_lamport: u64,
    /// Recent round outcomes, to answer in-doubt peers.
    decisions: VecDeque<(RoundId, bool)>,
    /// Paxos acceptor state of rounds this node does not hold staged (a configuration change
    /// it did not vote for can still be decided by a majority, so it answers recoveries):
    /// the ballot promised and the decision accepted. Bounded like `decisions`.
    ballots: BTreeMap<RoundId, decision::Acceptor>,
    /// The last local write's commit: its label and who acknowledged it.
    last_commit: Option<(String, Vec<NodeId>)>,
    /// Local writes waiting for the current strong round to end.
    queued: VecDeque<round::QueuedWrite>,
    /// Leases, configuration upkeep and amnesia of a strong group.
    strong: lease::StrongState,
    /// Members that announced themselves since (their gossip may not have arrived yet).
    announced: BTreeMap<NodeId, Millis>,
    /// An eventual join waiting for the members to take this node's announcement.
    announcing: Option<configuration::Announcing>,
    /// True while this node leaves the group's configuration.
    leaving: bool,
    /// Every member this node has known of the group (persisted): just after a start, those it
    /// has not heard of yet count as unknown, not absent.
    known_members: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct PendingJoin {
    id: CommandId,
    key: GroupKey,
    repair: bool,
    nonce: Nonce,
    tried: BTreeSet<NodeId>,
    asking: Option<NodeId>,
    step_deadline: Millis,
    deadline: Millis,
}

#[derive(Debug)]
struct Challenge {
    joiner_nonce: Nonce,
    member_nonce: Nonce,
    deadline: Millis,
}

impl GroupState {
    fn new(doc: GroupDoc, key: GroupKey, proof: [u8; 32], tail_changes: usize) -> GroupState {
        GroupState {
            revision: doc.change_count(),
            doc,
            key,
            proof,
            events: VecDeque::new(),
            tail_changes,
            sync: BTreeMap::new(),
            round: None,
            round_lamport: 0,
            decisions: VecDeque::new(),
            ballots: BTreeMap::new(),
            last_commit: None,
            queued: VecDeque::new(),
            strong: lease::StrongState::default(),
            announced: BTreeMap::new(),
            announcing: None,
            leaving: false,
            known_members: BTreeSet::new(),
        }
    }

    /// The final outcome of `round` as recorded here, if known.
    fn final_outcome(&self, round: &RoundId) -> Option<RoundOutcome> {
        self.decisions
            .iter()
            .find(|(id, _)| id == round)
            .map(|(_, commit)| if *commit { RoundOutcome::Committed } else { RoundOutcome::Aborted })
    }

    fn remember_decision(&mut self, round: RoundId, commit: bool) {
        self.round_lamport = self.round_lamport.max(round.lamport);
        self.ballots.remove(&round);
        self.decisions.push_back((round, commit));
        while self.decisions.len() > DECISIONS_KEPT {
            self.decisions.pop_front();
        }
    }
}

/// Outcome of a read of a group's recent notifications.
#[derive(Debug, Clone, PartialEq)]
pub enum EventsSince {
    /// Every notification after the revision asked for, in order (possibly none).
    Events(Vec<Notification>),
    /// History that old is not kept: the watcher must resync from a snapshot.
    Resync,
}

/// The replication state machine of one node.
#[derive(Debug)]
pub struct Replica {
    node_id: NodeId,
    actor: ActorId,
    nonce_seed: [u8; 32],
    nonce_counter: u64,
    now: Millis,
    groups: BTreeMap<String, GroupState>,
    membership: MembershipView,
    joins: BTreeMap<String, PendingJoin>,
    challenges: BTreeMap<(NodeId, String), Challenge>,
    commits: BTreeMap<CommandId, quorum::PendingCommit>,
    outputs: VecDeque<Output>,
    /// Received changes already queued for persisting, applied at [`Input::Resume`].
    deferred: Option<DeferredApply>,
    /// Since when each peer has been dead in the membership view (evictions).
    dead_since: BTreeMap<NodeId, Millis>,
    /// Groups reloaded after a failed persist during this run (each takes a fresh actor).
    reloads: u64,
    /// The round lamport of each group this node left during this run: a group joined again
    /// starts above it, so this node never issues one round id twice (S2).
    left_lamports: BTreeMap<String, u64>,
    /// Groups this node left during this run (the newest last, at most
    /// [`DEPARTED_GROUPS_KEPT`](crate::limits::DEPARTED_GROUPS_KEPT)): the outcomes of their last
    /// rounds, told to the members left behind when they ask. In a configuration of two, the
    /// one that stays cannot decide the round of the other's leave alone.
    departed: VecDeque<(String, Departed)>,
    /// Unix milliseconds at `now` = 0, for the stamps of versions this node writes on its own.
    wall_offset: u64,
}

/// What this node keeps of a group it left: who it left behind and what it knew of the
/// group's last rounds.
#[derive(Debug)]
struct Departed {
    /// The members of the configuration when this node left (the only ones answered).
    members: BTreeSet<NodeId>,
    /// The outcomes of the group's last rounds, as `GroupState::decisions`.
    decisions: VecDeque<(RoundId, bool)>,
}

/// Changes a member persists before it applies them, so that the apply overlaps the fsync.
#[derive(Debug)]
struct DeferredApply {
    group: String,
    from: NodeId,
    changes: Vec<Vec<u8>>,
}

impl Replica {
    /// A replica for `node_id` writing as `actor` (see [`actor_for`]), with groups loaded from
    /// disk. `nonce_seed` is the only randomness it uses.
    pub fn new(
        node_id: NodeId,
        actor: ActorId,
        nonce_seed: [u8; 32],
        loaded: BTreeMap<String, LoadedState>,
    ) -> Replica {
        let mut replica = Replica {
            node_id,
            actor,
            nonce_seed,
            nonce_counter: 0,
            now: Millis(0),
            groups: BTreeMap::new(),
            membership: MembershipView::default(),
            joins: BTreeMap::new(),
            challenges: BTreeMap::new(),
            commits: BTreeMap::new(),
            outputs: VecDeque::new(),
            deferred: None,
            dead_since: BTreeMap::new(),
            left_lamports: BTreeMap::new(),
            departed: VecDeque::new(),
            reloads: 0,
            wall_offset: 0,
        };
        for (name, state) in loaded {
            let mut sync = BTreeMap::new();
            for (peer, bytes) in state.sync_states {
                if let Ok(peer_state) = SyncPeer::decode(&bytes) {
                    sync.insert(peer, SyncSession { peer: peer_state, ..SyncSession::default() });
                }
            }
            let proof = membership_proof(&state.key, &name, &replica.node_id);
            let round_lamport = state.decisions.iter().map(|(round, _)| round.lamport).max().unwrap_or(0);
            let mut group = GroupState::new(state.doc, state.key, proof, state.tail_changes);
            group.sync = sync;
            group.round_lamport = round_lamport;
            group.decisions = state.decisions.into_iter().collect();
            if state.damaged {
                let mut heads = group.doc.heads();
                heads.sort();
                group.strong.amnesic_at = Some(heads);
            }
            group.known_members = state.known_members;
            for (round, promised, accepted) in state.ballots {
                group.ballots.insert(round, decision::Acceptor { promised, accepted });
            }
            replica.groups.insert(name.clone(), group);
            replica.restore_round(&name, state.staged);
            replica.publish(&name);
        }
        replica
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Sets the wall clock: Unix milliseconds at `now` = 0 (for versions this node writes on
    /// its own, such as evictions).
    pub fn set_wall_offset(&mut self, unix_ms_at_zero: u64) {
        self.wall_offset = unix_ms_at_zero;
    }

    fn wall_clock(&self) -> Millis {
        Millis(self.wall_offset + self.now.0)
    }

    /// The group `name`, for reads (reads never go through the state machine).
    pub fn group(&self, name: &str) -> Option<&GroupDoc> {
        self.groups.get(name).map(|state| &state.doc)
    }

    /// This node's revision of `name`.
    pub fn revision(&self, name: &str) -> Option<u64> {
        self.groups.get(name).map(|state| state.revision)
    }

    /// The groups held here, by name.
    pub fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    /// The membership view last handed in.
    pub fn membership(&self) -> &MembershipView {
        &self.membership
    }

    /// The peers whose verified gossip says they hold `group` (this node excluded).
    pub fn members(&self, group: &str) -> Vec<(NodeId, bool, GroupGossip)> {
        let Some(state) = self.groups.get(group) else {
            return Vec::new();
        };
        self.membership
            .peers
            .iter()
            .filter_map(|(node, peer)| {
                let gossip = peer.groups.get(group)?;
                (gossip.proof == membership_proof(&state.key, group, node))
                    .then(|| (node.clone(), peer.is_live(), gossip.clone()))
            })
            .collect()
    }

    /// Every member of `group` this node knows of (this node excluded) with its liveness: peers
    /// whose gossiped proof verifies, and members that announced themselves since (a new member
    /// of an eventual group counts before gossip spreads its proof).
    pub fn member_liveness(&self, group: &str) -> BTreeMap<NodeId, PeerLiveness> {
        let mut members: BTreeMap<NodeId, PeerLiveness> = self
            .members(group)
            .into_iter()
            .map(|(node, _, _)| {
                let liveness = self.membership.peers.get(&node).map_or(PeerLiveness::Unknown, |p| p.liveness);
                (node, liveness)
            })
            .collect();
        if let Some(state) = self.groups.get(group) {
            if self.now.0 < START_GRACE_MS {
                // Just started: gossip has not told this node about every member yet. Those it
                // knew before count as members it cannot judge (unknown), never as absent.
                for node in &state.known_members {
                    if *node != self.node_id && !members.contains_key(node) {
                        let peer = self.membership.peers.get(node);
                        if peer.is_some_and(|p| p.left.contains(group)) {
                            continue;
                        }
                        members.insert(node.clone(), peer.map_or(PeerLiveness::Unknown, |p| p.liveness));
                    }
                }
            }
            for node in state.announced.keys() {
                if *node == self.node_id || members.contains_key(node) {
                    continue;
                }
                let peer = self.membership.peers.get(node);
                if peer.is_some_and(|p| p.left.contains(group)) {
                    continue;
                }
                members.insert(node.clone(), peer.map_or(PeerLiveness::Unknown, |p| p.liveness));
            }
        }
        members
    }

    /// The notifications after `revision` for a watcher resuming there, or `Resync` when the
    /// oldest kept notification starts after it (SPEC F13: never a silent gap).
    pub fn events_since(&self, group: &str, revision: u64) -> Option<EventsSince> {
        let state = self.groups.get(group)?;
        if revision == state.revision {
            return Some(EventsSince::Events(Vec::new()));
        }
        if revision > state.revision {
            // This node's revision went down (a damaged tail was cut, the group re-joined):
            // the watcher saw a history this node no longer has, so it must resync.
            return Some(EventsSince::Resync);
        }
        let oldest_from = state.events.front().map_or(state.revision, |(from, _)| *from);
        if revision < oldest_from {
            return Some(EventsSince::Resync);
        }
        let events = state
            .events
            .iter()
            .filter(|(_, event)| event.revision > revision)
            .map(|(_, event)| event.clone())
            .collect();
        Some(EventsSince::Events(events))
    }

    /// Next output to execute, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When the shell should next send [`Input::Tick`] even if nothing else happens.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let mut earliest: Option<Millis> = None;
        let mut consider = |at: Millis| earliest = Some(earliest.map_or(at, |e| e.min(at)));
        for join in self.joins.values() {
            consider(join.step_deadline.min(join.deadline));
        }
        for commit in self.commits.values() {
            consider(commit.deadline);
        }
        if let Some(at) = self.next_lease_request() {
            consider(at);
        }
        for state in self.groups.values() {
            if let Some(round) = &state.round {
                consider(round.deadline());
            }
            if let Some((_, deadline)) = state.strong.joining {
                consider(deadline);
            }
            if let Some(at) = self.next_upkeep(state) {
                consider(at);
            }
            if let Some(announcing) = &state.announcing {
                consider(announcing.deadline);
            }
            for write in &state.queued {
                consider(write.deadline);
            }
            for session in state.sync.values() {
                // A session already in flight is not started again: its anti-entropy deadline would
                // lie in the past and ask for a tick at once, over and over (found at 1,000 nodes).
                if let Some(since) = session.diverged_since
                    && session.in_flight_since.is_none()
                {
                    consider(Millis(since.0 + ANTI_ENTROPY_DELAY_MS));
                }
                if let Some(since) = session.in_flight_since {
                    consider(Millis(since.0 + SYNC_SESSION_TIMEOUT_MS));
                }
            }
        }
        earliest
    }

    /// When configuration upkeep of a strong group is due next: this node's own addition when
    /// it holds the group outside the configuration, or the eviction of a member dead long
    /// enough (or that left). Without this a quiet node would never retry (found by the fault
    /// tests: an evicted node stayed out after a heal until some write woke it up).
    fn next_upkeep(&self, state: &GroupState) -> Option<Millis> {
        if state.doc.mode() != Mode::Strong || state.leaving {
            return None;
        }
        let configuration = state.doc.configuration()?;
        let earliest = state.strong.next_reconfigure;
        if !configuration.contains(&self.node_id) {
            return Some(earliest);
        }
        let evict_after = state.doc.policy().evict_after;
        configuration
            .members
            .iter()
            .filter(|member| **member != self.node_id)
            .filter_map(|member| {
                let left = self.membership.peers.get(member).is_some_and(|p| p.left.contains(state.doc.name()));
                let due = if left {
                    Some(self.now)
                } else {
                    self.dead_since.get(member).map(|since| Millis(since.0 + evict_after.0))
                };
                due.map(|at| at.max(earliest))
            })
            .min()
    }

    /// Feeds one input at time `now`.
    pub fn handle(&mut self, now: Millis, input: Input) {
        self.now = self.now.max(now);
        // A deferred apply finishes before anything else is looked at (at the latest here, if
        // the shell did not resume it).
        if let Some(deferred) = self.deferred.take() {
            self.finish_deferred_apply(deferred);
        }
        match input {
            Input::Command { id, command } => self.handle_command(id, command),
            Input::Peer { from, bytes } => match PeerMessage::decode(&bytes) {
                Ok(message) => self.handle_peer_message(from, message),
                Err(error) => self.drop_message(from, error.to_string()),
            },
            Input::Membership(view) => self.handle_membership(view),
            Input::Tick => self.handle_tick(),
            Input::PersistFailed { group, error, reloaded } => self.handle_persist_failed(&group, &error, reloaded),
            Input::Resume => {}
        }
        self.drain_round_queues();
    }

    fn next_nonce(&mut self) -> Nonce {
        self.nonce_counter += 1;
        derive_nonce(&self.nonce_seed, self.nonce_counter)
    }

    fn drop_message(&mut self, from: NodeId, reason: String) {
        self.outputs.push_back(Output::Dropped { from, reason });
    }

    fn reply(&mut self, id: CommandId, result: Result<CommandOutcome, CommandError>) {
        self.outputs.push_back(Output::Reply { id, result });
    }

    fn publish(&mut self, name: &str) {
        if let Some(state) = self.groups.get(name) {
            let gossip = GroupGossip {
                digest: state.doc.heads_digest(),
                revision: state.revision,
                version: state.doc.latest_label(),
                proof: state.proof,
                heads: state.doc.heads(),
            };
            self.outputs.push_back(Output::Publish { group: name.to_owned(), gossip: Some(gossip) });
        }
    }

    /// Members that may be up (live, or not judged yet): pushes go to them, and eventual
    /// quorums count them.
    fn live_members(&self, group: &str) -> Vec<NodeId> {
        self.member_liveness(group)
            .into_iter()
            .filter(|(_, liveness)| *liveness != PeerLiveness::Dead)
            .map(|(node, _)| node)
            .collect()
    }

    fn handle_command(&mut self, id: CommandId, command: Command) {
        match command {
            Command::CreateGroup { name, mode, key, meta, policy } => {
                self.create_group(id, name, mode, key, meta, policy)
            }
            Command::JoinGroup { name, key, repair } => self.start_join(id, name, key, repair),
            Command::LeaveGroup { name, force } => self.leave_group(id, name, force),
            Command::RemoveMember { group, nodes, force, meta } => self.remove_member(id, group, nodes, force, meta),
            Command::Set { group, entries, meta } => self.local_write(id, group, Edit::Set(entries), meta),
            Command::Delete { group, keys, meta } => self.local_write(id, group, Edit::Delete(keys), meta),
            Command::Apply { group, format, text, meta } => {
                self.local_write(id, group, Edit::ApplyFile { text, format }, meta)
            }
            Command::Rollback { group, version, meta } => self.local_write(id, group, Edit::Rollback(version), meta),
        }
    }

    fn create_group(
        &mut self,
        id: CommandId,
        name: String,
        mode: Mode,
        key: GroupKey,
        meta: CommitMeta,
        policy: GroupPolicy,
    ) {
        if self.groups.contains_key(&name) || self.joins.contains_key(&name) {
            return self.reply(id, Err(CommandError::AlreadyExists(name)));
        }
        let configuration = (mode == Mode::Strong).then(|| Configuration::initial(&self.node_id));
        let created = GroupDoc::create_with(&name, mode, self.actor.clone(), &meta, &policy, configuration.as_ref());
        let (doc, _) = match created {
            Ok(created) => created,
            Err(error) => return self.reply(id, Err(error.into())),
        };
        if let Err(error) = self.adopt_group(name.clone(), doc, key) {
            return self.reply(id, Err(error));
        }
        self.reply(id, Ok(CommandOutcome::Created { name }));
    }

    /// Stores a new group (created here or received by a join) and starts publishing it.
    fn adopt_group(&mut self, name: String, doc: GroupDoc, key: GroupKey) -> Result<(), CommandError> {
        let file = snapshot_file(&doc, None).map_err(|e| CommandError::TooLarge(e.to_string()))?;
        self.outputs.push_back(Output::Persist(PersistOp::CreateGroup { group: name.clone(), file, key: key.clone() }));
        let proof = membership_proof(&key, &name, &self.node_id);
        let mut state = GroupState::new(doc, key, proof, 0);
        state.round_lamport = self.left_lamports.get(&name).copied().unwrap_or(0);
        self.departed.retain(|(group, _)| *group != name);
        self.groups.insert(name.clone(), state);
        self.publish(&name);
        // Peers holding the group are now members of ours: compare digests at once.
        self.mark_divergence();
        Ok(())
    }

    /// A local edit: applied at once in eventual groups (the reply waits for a live quorum),
    /// run as a barrier round in strong groups.
    fn local_write(&mut self, id: CommandId, group: String, edit: Edit, meta: CommitMeta) {
        let Some(state) = self.groups.get_mut(&group) else {
            return self.reply(id, Err(CommandError::UnknownGroup(group)));
        };
        if state.doc.mode() == Mode::Strong {
            return self.start_round(id, group, edit, meta);
        }
        let before = state.doc.settings().clone();
        let commit = match state.doc.edit(edit, &meta) {
            Ok(commit) => commit,
            Err(error) => return self.reply(id, Err(error.into())),
        };
        let records = match change_record(&commit.change) {
            Ok(records) => records,
            Err(error) => return self.reply(id, Err(CommandError::TooLarge(error.to_string()))),
        };
        let keys = changed_keys(&before, state.doc.settings());
        let label = state.doc.label(&commit.version.id);
        // Push first, then fsync: peers apply and persist while this node does. Safe because
        // this node's actor is fresh per process start (a change lost in a crash is never
        // re-issued under the same actor), and this node counts itself toward the quorum only
        // through outputs that run after the persist below.
        let live = self.live_members(&group);
        for member in &live {
            let message = PeerMessage::Changes { group: group.clone(), changes: vec![commit.change.clone()] };
            self.outputs.push_back(Output::Send { to: member.clone(), message });
        }
        self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.clone(), records }));
        let revision = self.record_changes(&group, 1, keys);
        self.compact_if_due(&group);
        self.publish(&group);
        let receipt =
            CommitReceipt { group, version: commit.version, label, revision, acked_by: vec![self.node_id.clone()] };
        self.await_quorum(id, receipt, commit.change_hash, live);
    }

    /// A persist of `group` failed: everything of the group that was not made durable is
    /// dropped from memory (the group is rebuilt from what its file holds), and every write that
    /// depended on it fails with the error. Nothing not on disk is served or acknowledged.
    fn handle_persist_failed(&mut self, group: &str, error: &str, reloaded: Option<Box<LoadedState>>) {
        let failed: Vec<CommandId> =
            self.commits.iter().filter(|(_, pending)| pending.group() == group).map(|(id, _)| *id).collect();
        for id in failed {
            self.commits.remove(&id);
            let text = format!("{error}; the write is not committed (it may still reach the peers it was sent to)");
            self.reply(id, Err(CommandError::NotDurable(text)));
        }
        let reloaded_staged = reloaded.as_ref().and_then(|r| r.staged.as_ref().map(|s| s.round.clone()));
        if let Some(round::Round::Coordinating(own)) = self.groups.get(group).and_then(|s| s.round.as_ref()) {
            {
                let proposed_durably = reloaded_staged.as_ref() == Some(&own.id);
                if proposed_durably {
                    self.give_up_deciding(group, format!("{error} while finishing the round"));
                } else {
                    // Its commit proposal (if any) never left: the Decides came after the
                    // failed persist. Aborting is final.
                    if let Some(state) = self.groups.get_mut(group)
                        && let Some(round::Round::Coordinating(own)) = state.round.as_mut()
                    {
                        own.phase = round::Phase::Voting;
                    }
                    let text = format!("{error}; the strong write is not committed anywhere");
                    self.abort_own_round_with(group, CommandError::NotDurable(text));
                }
            }
        }
        let Some(old) = self.groups.remove(group) else { return };
        self.left_lamports.insert(group.to_owned(), old.round_lamport);
        let Some(loaded) = reloaded else {
            // The file cannot be read: the shell repairs the group from peers.
            for write in old.queued {
                self.reply(write.command, Err(CommandError::NotDurable(error.to_owned())));
            }
            self.outputs.push_back(Output::Publish { group: group.to_owned(), gossip: None });
            return;
        };
        let LoadedState {
            mut doc,
            key,
            tail_changes,
            sync_states: _,
            staged,
            decisions,
            damaged: _,
            known_members: _,
            ballots: _,
        } = *loaded;
        // Changes lost with the failed append may have been sent already: write from now on
        // under a fresh actor so their sequence numbers are never reused.
        self.reloads += 1;
        doc.set_actor(reload_actor(&self.actor, self.reloads));
        let mut state = GroupState::new(doc, key, old.proof, tail_changes);
        state.round_lamport = old.round_lamport;
        state.decisions = old.decisions;
        state.ballots = old.ballots;
        for (round, commit) in decisions {
            if state.final_outcome(&round).is_none() {
                state.remember_decision(round, commit);
            }
        }
        // Watchers were told only of durable changes (notifications follow their persist).
        let revision = state.revision;
        state.events = old.events.into_iter().filter(|(_, event)| event.revision <= revision).collect();
        state.last_commit = old.last_commit;
        state.queued = old.queued;
        state.strong = old.strong;
        state.announced = old.announced;
        state.announcing = old.announcing;
        state.leaving = old.leaving;
        state.known_members = old.known_members;
        self.groups.insert(group.to_owned(), state);
        self.restore_round(group, staged);
        // Not at once: while the disk keeps failing, every answer would fail to save again
        // (found by the simulator: thousands of queries a second from a node with write errors).
        let retry = Millis(self.now.0 + crate::limits::DECISION_TIMEOUT_MS / 2);
        if let Some(round::Round::Staged(staged)) = self.groups.get_mut(group).and_then(|s| s.round.as_mut()) {
            staged.next_query = staged.next_query.max(retry);
        }
        self.publish(group);
    }

    /// Advances the revision by `changes`, notifies watchers of `keys`, keeps the event ring.
    fn record_changes(&mut self, group: &str, changes: usize, keys: BTreeSet<String>) -> u64 {
        let Some(state) = self.groups.get_mut(group) else {
            return 0;
        };
        let from = state.revision;
        state.revision += changes as u64;
        state.tail_changes += changes;
        let mut set = BTreeMap::new();
        let mut removed = Vec::new();
        for key in keys {
            match state.doc.get(&key) {
                Some(value) => {
                    set.insert(key, value.clone());
                }
                None => removed.push(key),
            }
        }
        let notification = Notification {
            group: group.to_owned(),
            revision: state.revision,
            version: state.doc.latest_label(),
            set,
            removed,
        };
        state.events.push_back((from, notification.clone()));
        while state.events.len() > WATCH_EVENTS_KEPT {
            state.events.pop_front();
        }
        self.outputs.push_back(Output::Notify(notification));
        state.revision
    }

    fn compact_if_due(&mut self, group: &str) {
        if self.groups.get(group).is_some_and(|state| needs_compaction(state.tail_changes)) {
            self.compact(group);
        }
    }

    /// The whole file `group` would be compacted into now: a snapshot of the document and the
    /// round records (for a shell that must rewrite a file a failed fsync left unknown). Round
    /// records survive compaction: the decisions (which keep the round lamport monotonic and
    /// answer in-doubt peers), a round staged here without a decision, and the ballots of
    /// undecided rounds this node is an acceptor of. `None` when the snapshot no longer fits a
    /// record (the file keeps growing by appends instead; epochs will bound it).
    pub fn compacted_file(&self, group: &str) -> Option<Vec<u8>> {
        let state = self.groups.get(group)?;
        let mut file = snapshot_file(&state.doc, None).ok()?;
        let mut records: Vec<RoundRecord> = state
            .decisions
            .iter()
            .map(|(round, commit)| RoundRecord::Decided { round: round.clone(), commit: *commit })
            .collect();
        records.extend(state.round.as_ref().map(round::Round::staged_records).unwrap_or_default());
        for (round, acceptor) in &state.ballots {
            records.push(RoundRecord::Promised { round: round.clone(), ballot: acceptor.promised.clone() });
            if let Some((ballot, commit)) = &acceptor.accepted {
                records.push(RoundRecord::Accepted { round: round.clone(), ballot: ballot.clone(), commit: *commit });
            }
        }
        for record in &records {
            if let Ok(bytes) = round_record(record) {
                file.extend(bytes);
            }
        }
        Some(file)
    }

    /// Queues a new file for `group`: a snapshot of the document and the round records.
    fn compact(&mut self, group: &str) {
        let Some(file) = self.compacted_file(group) else { return };
        if let Some(state) = self.groups.get_mut(group) {
            state.tail_changes = 0;
        }
        self.outputs.push_back(Output::Persist(PersistOp::Compact { group: group.to_owned(), file }));
    }

    /// Applies changes pushed by `from` and acks what is now here (durable: the persist
    /// operations run before the ack). `persisted` were already queued for persisting.
    fn apply_pushed(&mut self, group: &str, from: NodeId, changes: &[Vec<u8>], persisted: &[Vec<u8>]) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let (applied, failed) = match state.doc.apply_changes(changes) {
            Ok(applied) => (applied, None),
            // Whatever did apply before the failure is persisted, counted and announced like
            // any apply: a document must never serve a change its file does not hold.
            Err(failure) => (failure.applied, Some(failure.error)),
        };
        let missing_deps = state.doc.has_missing_deps();
        self.after_remote_apply_except(group, applied, persisted);
        // Durable now (the append above executes before this send): ack.
        let hashes = changes
            .iter()
            .filter_map(|bytes| crate::exchange::decode_change(bytes).ok())
            .map(|change| change.hash())
            .filter(|hash| self.groups.get(group).is_some_and(|s| s.doc.has_change(hash)))
            .map(|hash| hash.0)
            .collect::<Vec<_>>();
        if !hashes.is_empty() {
            let ack = PeerMessage::Ack { group: group.to_owned(), changes: hashes.clone() };
            self.outputs.push_back(Output::Send { to: from.clone(), message: ack });
        }
        if let Some(error) = failed {
            if persisted.len() > hashes.len() {
                // Records of changes that did not apply are in the file: rewrite it from the
                // document, which never took them.
                self.compact(group);
            }
            return self.drop_message(from, error.to_string());
        }
        if missing_deps {
            // Nothing new became visible: either duplicates or changes waiting for
            // dependencies; a sync session settles which.
            self.start_sync(group, &from);
        }
    }

    /// Finishes the apply of changes persisted first.
    fn finish_deferred_apply(&mut self, deferred: DeferredApply) {
        let DeferredApply { group, from, changes } = deferred;
        self.apply_pushed(&group, from, &changes, &changes);
    }

    /// Persists and announces what a remote apply added.
    fn after_remote_apply(&mut self, group: &str, applied: RemoteApplied) {
        self.after_remote_apply_except(group, applied, &[]);
    }

    /// The same, for an apply some of whose changes (`persisted`, raw bytes) were already
    /// queued for persisting.
    fn after_remote_apply_except(&mut self, group: &str, applied: RemoteApplied, persisted: &[Vec<u8>]) {
        if applied.new_changes.is_empty() {
            return;
        }
        let mut records = Vec::new();
        for change in applied.new_changes.iter().filter(|change| !persisted.contains(change)) {
            match change_record(change) {
                Ok(record) => records.extend(record),
                Err(error) => {
                    return self.drop_message(self.node_id.clone(), format!("cannot persist a change: {error}"));
                }
            }
        }
        if !records.is_empty() {
            self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.to_owned(), records }));
        }
        self.record_changes(group, applied.new_changes.len(), applied.changed_keys);
        self.compact_if_due(group);
        self.publish(group);
        // A staged round whose change arrived by sync was committed elsewhere (or lost its
        // position to another change).
        self.settle_round_by_sync(group);
        if let Some(state) = self.groups.get_mut(group) {
            state.strong.settle_amnesia(&state.doc);
        }
        // A change of the configuration may have seated this node.
        self.answer_joins(group);
    }

    /// True when `peer` proved membership of `group`: in gossip, or by announcing itself
    /// (with the same proof) since.
    fn is_member(&self, group: &str, peer: &str) -> bool {
        let Some(state) = self.groups.get(group) else {
            return false;
        };
        if state.announced.contains_key(peer) {
            return true;
        }
        self.membership
            .peers
            .get(peer)
            .and_then(|p| p.groups.get(group))
            .is_some_and(|gossip| gossip.proof == membership_proof(&state.key, group, peer))
    }

    fn handle_peer_message(&mut self, from: NodeId, message: PeerMessage) {
        let group = message.group().to_owned();
        match message {
            PeerMessage::Changes { changes, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("changes for group {group:?} from a non-member"));
                }
                let Some(state) = self.groups.get_mut(&group) else { return };
                if state.doc.mode() == Mode::Strong {
                    // Strong groups change only through rounds (and sync of committed rounds).
                    return self.drop_message(from, format!("pushed changes for strong group {group:?}"));
                }
                if let Some(records) = persist_first_records(&state.doc, &changes) {
                    // Durable first, applied while the fsync runs (Output::Resume).
                    self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.clone(), records }));
                    self.outputs.push_back(Output::Resume);
                    self.deferred = Some(DeferredApply { group, from, changes });
                    return;
                }
                self.apply_pushed(&group, from, &changes, &[]);
            }
            PeerMessage::Sync { message, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("sync for group {group:?} from a non-member"));
                }
                self.handle_sync(&group, from, &message);
            }
            PeerMessage::JoinRequest { nonce, .. } => self.serve_join_request(from, group, nonce),
            PeerMessage::JoinChallenge { nonce, .. } => self.answer_challenge(from, group, nonce),
            PeerMessage::JoinProof { proof, .. } => self.check_join_proof(from, group, proof),
            PeerMessage::JoinGrant { snapshot, members, .. } => self.finish_join(from, group, &snapshot, members),
            PeerMessage::JoinRefused { reason, .. } => {
                let Some(join) = self.joins.remove(&group) else {
                    return self.drop_message(from, format!("unexpected join refusal for {group:?}"));
                };
                self.reply(join.id, Err(CommandError::JoinRefused { group, member: from, reason }));
            }
            PeerMessage::Ack { changes, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("ack for group {group:?} from a non-member"));
                }
                self.handle_ack(&group, &from, &changes);
            }
            PeerMessage::Prepare { round, change, kind, configuration, .. } => {
                if !self.is_member(&group, &from) || round.node != from {
                    return self.drop_message(from, format!("prepare for group {group:?} from a non-member"));
                }
                self.handle_prepare(&group, from, round, change, kind, configuration);
            }
            PeerMessage::Vote { round, yes, reason, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("vote for group {group:?} from a non-member"));
                }
                self.handle_vote(&group, from, round, yes, reason);
            }
            PeerMessage::Decide { round, ballot, commit, .. } => {
                if !self.is_member(&group, &from) || ballot.node != from {
                    return self.drop_message(from, format!("decision for group {group:?} from a non-proposer"));
                }
                self.handle_decide(&group, from, round, ballot, commit);
            }
            PeerMessage::Accepted { round, ballot, ok, promised, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("acceptance for group {group:?} from a non-member"));
                }
                self.handle_accepted(&group, from, round, ballot, ok, promised);
            }
            PeerMessage::DecisionQuery { round, .. } | PeerMessage::Recover { round, .. }
                if !self.groups.contains_key(&group) =>
            {
                self.answer_for_departed(&group, from, round);
            }
            PeerMessage::DecisionQuery { round, change, kind, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("decision query for group {group:?} from a non-member"));
                }
                self.answer_decision_query(&group, from, round, ChangeHash(change), &kind);
            }
            PeerMessage::DecisionAnswer { round, outcome, .. } => {
                // A participant of the round may have left the group since (its leave was the
                // round): its answer still counts.
                if !self.is_member(&group, &from) && !self.takes_part_in(&group, &round, &from) {
                    return self.drop_message(from, format!("decision answer for group {group:?} from a non-member"));
                }
                self.handle_decision_answer(&group, &round, outcome);
            }
            PeerMessage::Recover { round, ballot, kind, .. } => {
                if !self.is_member(&group, &from) || ballot.node != from {
                    return self.drop_message(from, format!("recovery for group {group:?} from a non-member"));
                }
                self.handle_recover(&group, from, round, ballot, &kind);
            }
            PeerMessage::Promise { round, ballot, ok, accepted, promised, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("promise for group {group:?} from a non-member"));
                }
                self.handle_promise(&group, from, round, ballot, ok, accepted, promised);
            }
            PeerMessage::LeaseRequest { sent, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("lease request for group {group:?} from a non-member"));
                }
                self.handle_lease_request(&group, from, sent);
            }
            PeerMessage::LeaseGrant { sent, configuration, heads, staged, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("lease grant for group {group:?} from a non-member"));
                }
                self.handle_lease_grant(&group, from, sent, configuration, heads, staged);
            }
            PeerMessage::Announce { proof, .. } => self.handle_announce(&group, from, proof),
            PeerMessage::AnnounceAck { .. } => self.handle_announce_ack(&group, &from),
        }
    }

    fn handle_sync(&mut self, group: &str, from: NodeId, message: &[u8]) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let session = state.sync.entry(from.clone()).or_default();
        session.in_flight_since = None;
        let result = state.doc.receive_sync_message(&mut session.peer, message);
        match result {
            Ok(applied) => self.after_remote_apply(group, applied),
            Err(failure) => {
                let error = failure.error;
                // What applied before the failure is persisted and announced all the same.
                self.after_remote_apply(group, failure.applied);
                if let Some(session) = self.groups.get_mut(group).and_then(|s| s.sync.get_mut(&from)) {
                    session.peer.reset_after_disconnect();
                }
                return self.drop_message(from, error.to_string());
            }
        }
        self.continue_sync(group, &from);
    }

    /// Sends the next sync message to `peer` if the protocol has one; persists the state when
    /// the session has nothing more to say.
    fn continue_sync(&mut self, group: &str, peer: &NodeId) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        let session = state.sync.entry(peer.clone()).or_default();
        match state.doc.sync_message(&mut session.peer) {
            Some(message) => {
                session.in_flight_since = Some(now);
                self.outputs.push_back(Output::Send {
                    to: peer.clone(),
                    message: PeerMessage::Sync { group: group.to_owned(), message },
                });
            }
            None => {
                let encoded = session.peer.encode();
                self.outputs.push_back(Output::Persist(PersistOp::SyncState {
                    group: group.to_owned(),
                    peer: peer.clone(),
                    state: encoded,
                }));
            }
        }
    }

    fn start_sync(&mut self, group: &str, peer: &NodeId) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let session = state.sync.entry(peer.clone()).or_default();
        if session.in_flight_since.is_some() {
            return;
        }
        session.diverged_since = None;
        self.continue_sync(group, peer);
    }

    fn handle_membership(&mut self, view: MembershipView) {
        let previous = std::mem::replace(&mut self.membership, view);
        // A peer that went down or came back starts its sync sessions afresh (FACTS: lost
        // messages stall the protocol unless the state is reset).
        for state in self.groups.values_mut() {
            for (peer, session) in state.sync.iter_mut() {
                let was_live = previous.peers.get(peer).is_some_and(PeerState::is_live);
                let is_live = self.membership.peers.get(peer).is_some_and(PeerState::is_live);
                if was_live != is_live {
                    session.peer.reset_after_disconnect();
                    session.in_flight_since = None;
                }
            }
        }
        // Announced members that gossip now shows (or shows as gone) are gossip's business.
        let peers = &self.membership.peers;
        for (name, state) in self.groups.iter_mut() {
            state.announced.retain(|node, _| {
                peers.get(node).is_none_or(|peer| {
                    !peer.left.contains(name)
                        && peer
                            .groups
                            .get(name)
                            .is_none_or(|gossip| gossip.proof != membership_proof(&state.key, name, node))
                })
            });
        }
        self.mark_divergence();
        self.track_dead_peers();
        self.remember_members();
        // A member seen dead may block a write (abort it now) or no longer be needed by a
        // configuration change (its votes may now suffice).
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in &names {
            self.check_votes(name);
        }
        self.count_gossip_acks();
        self.handle_tick();
    }

    /// Adds the members gossip and announcements show to what this node knows of each group,
    /// drops the ones that left (or, after the start grace, that gossip no longer knows), and
    /// persists the list when it changed.
    fn remember_members(&mut self) {
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let mut current: BTreeSet<NodeId> = self.members(&name).into_iter().map(|(node, _, _)| node).collect();
            let Some(state) = self.groups.get(&name) else { continue };
            current.extend(state.announced.keys().cloned());
            if let Some(configuration) = state.doc.configuration() {
                current.extend(configuration.members.iter().cloned());
            }
            let mut known = state.known_members.clone();
            known.extend(current.iter().cloned());
            let grace_over = self.now.0 >= START_GRACE_MS;
            known.retain(|node| {
                let peer = self.membership.peers.get(node);
                *node != self.node_id
                    && !peer.is_some_and(|p| p.left.contains(&name))
                    && (current.contains(node) || !grace_over)
            });
            let Some(state) = self.groups.get_mut(&name) else { continue };
            if known != state.known_members {
                state.known_members = known.clone();
                let members = known.into_iter().collect();
                self.outputs.push_back(Output::Persist(PersistOp::Members { group: name.clone(), members }));
            }
        }
    }

    /// Notes, per group and live member, since when its gossiped digest differs from ours.
    fn mark_divergence(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let members = self.members(&name);
            let Some(state) = self.groups.get_mut(&name) else { continue };
            let ours = state.doc.heads_digest();
            for (peer, live, gossip) in members {
                let session = state.sync.entry(peer).or_default();
                if live && gossip.digest != ours {
                    session.diverged_since.get_or_insert(now);
                } else {
                    session.diverged_since = None;
                }
            }
        }
    }

    fn handle_tick(&mut self) {
        let now = self.now;
        // Anti-entropy: sessions for peers that stayed diverged, and stalled sessions reset.
        let mut to_start = Vec::new();
        for (name, state) in self.groups.iter_mut() {
            for (peer, session) in state.sync.iter_mut() {
                if let Some(since) = session.in_flight_since
                    && now.saturating_sub(since).0 >= SYNC_SESSION_TIMEOUT_MS
                {
                    session.peer.reset_after_disconnect();
                    session.in_flight_since = None;
                }
                if let Some(since) = session.diverged_since
                    && now.saturating_sub(since).0 >= ANTI_ENTROPY_DELAY_MS
                    && session.in_flight_since.is_none()
                {
                    to_start.push((name.clone(), peer.clone()));
                }
            }
        }
        for (group, peer) in to_start {
            self.start_sync(&group, &peer);
        }
        self.challenges.retain(|_, challenge| challenge.deadline > now);
        self.expire_commits();
        self.expire_rounds();
        self.renew_leases();
        self.expire_joins();
        let names: Vec<String> = self.joins.keys().cloned().collect();
        for name in names {
            self.advance_join(&name);
        }
    }

    fn start_join(&mut self, id: CommandId, name: String, key: GroupKey, repair: bool) {
        if self.groups.contains_key(&name) {
            return self.reply(id, Err(CommandError::AlreadyExists(name)));
        }
        if self.joins.contains_key(&name) {
            return self.reply(id, Err(CommandError::JoinInProgress(name)));
        }
        if let Err(error) = crate::key::validate_group_name(&name) {
            return self.reply(id, Err(CommandError::Edit(error.into())));
        }
        let nonce = self.next_nonce();
        let join = PendingJoin {
            id,
            key,
            repair,
            nonce,
            tried: BTreeSet::new(),
            asking: None,
            step_deadline: self.now,
            deadline: Millis(self.now.0 + JOIN_TIMEOUT_MS),
        };
        self.joins.insert(name.clone(), join);
        self.advance_join(&name);
    }

    /// Asks the next live peer that claims the group, or gives up at the deadline.
    fn advance_join(&mut self, name: &str) {
        let now = self.now;
        let Some(join) = self.joins.get(name) else { return };
        if join.deadline <= now {
            if let Some(join) = self.joins.remove(name) {
                self.reply(join.id, Err(CommandError::JoinUnavailable(name.to_owned())));
            }
            return;
        }
        if join.asking.is_some() && join.step_deadline > now {
            return;
        }
        // Claims cannot be verified before holding the key, so any live claimant is asked;
        // the joiner checks nothing it receives until a member proves itself with a grant.
        let candidate = self
            .membership
            .peers
            .iter()
            .filter(|(node, peer)| peer.is_live() && peer.groups.contains_key(name) && !join.tried.contains(*node))
            .map(|(node, _)| node.clone())
            .next();
        let Some(join) = self.joins.get_mut(name) else { return };
        match candidate {
            Some(member) => {
                join.tried.insert(member.clone());
                join.asking = Some(member.clone());
                join.step_deadline = Millis(now.0 + JOIN_STEP_TIMEOUT_MS);
                let message = PeerMessage::JoinRequest { group: name.to_owned(), nonce: join.nonce };
                self.outputs.push_back(Output::Send { to: member, message });
            }
            None => {
                // Nobody (new) to ask yet: wait for gossip, and retry everyone after a round.
                join.asking = None;
                join.tried.clear();
                join.step_deadline = Millis(now.0 + JOIN_STEP_TIMEOUT_MS);
            }
        }
    }

    fn serve_join_request(&mut self, from: NodeId, group: String, joiner_nonce: Nonce) {
        if !self.groups.contains_key(&group) {
            let reason = format!("node {} does not hold group {group:?}", self.node_id);
            return self
                .outputs
                .push_back(Output::Send { to: from, message: PeerMessage::JoinRefused { group, reason } });
        }
        let member_nonce = self.next_nonce();
        let deadline = Millis(self.now.0 + JOIN_STEP_TIMEOUT_MS);
        self.challenges.insert((from.clone(), group.clone()), Challenge { joiner_nonce, member_nonce, deadline });
        self.outputs
            .push_back(Output::Send { to: from, message: PeerMessage::JoinChallenge { group, nonce: member_nonce } });
    }

    fn answer_challenge(&mut self, from: NodeId, group: String, member_nonce: Nonce) {
        let Some(join) = self.joins.get(&group).filter(|join| join.asking.as_ref() == Some(&from)) else {
            return self.drop_message(from, format!("unexpected join challenge for {group:?}"));
        };
        let proof = join_proof(&join.key, &group, &self.node_id, &join.nonce, &member_nonce);
        self.outputs.push_back(Output::Send { to: from, message: PeerMessage::JoinProof { group, proof } });
    }

    fn check_join_proof(&mut self, from: NodeId, group: String, proof: [u8; 32]) {
        let Some(challenge) = self.challenges.remove(&(from.clone(), group.clone())) else {
            return self.drop_message(from, format!("join proof for {group:?} without a challenge"));
        };
        let Some(state) = self.groups.get(&group) else { return };
        let valid =
            verify_join_proof(&state.key, &group, &from, &challenge.joiner_nonce, &challenge.member_nonce, &proof);
        if !valid {
            let message = PeerMessage::JoinRefused { group, reason: "wrong group key".to_owned() };
            return self.outputs.push_back(Output::Send { to: from, message });
        }
        let mut members: Vec<NodeId> = self.member_liveness(&group).into_keys().collect();
        members.push(self.node_id.clone());
        let Some(state) = self.groups.get_mut(&group) else { return };
        // The joiner proved it holds the key: count it from now on, before gossip says so.
        state.announced.insert(from.clone(), self.now);
        let message = PeerMessage::JoinGrant { group, mode: state.doc.mode(), snapshot: state.doc.save(), members };
        self.outputs.push_back(Output::Send { to: from, message });
    }

    fn finish_join(&mut self, from: NodeId, group: String, snapshot: &[u8], granter_members: Vec<NodeId>) {
        let Some(join) = self.joins.get(&group).filter(|join| join.asking.as_ref() == Some(&from)) else {
            return self.drop_message(from, format!("unexpected join grant for {group:?}"));
        };
        // The joiner holds the key, so it can check the granter's membership proof in gossip:
        // a node without the key cannot hand it a forged group.
        let proven = self
            .membership
            .peers
            .get(&from)
            .and_then(|peer| peer.groups.get(&group))
            .is_some_and(|gossip| gossip.proof == membership_proof(&join.key, &group, &from));
        if !proven {
            return self
                .drop_message(from, format!("join grant for {group:?} from a node without a valid membership proof"));
        }
        let doc = match GroupDoc::load(snapshot, self.actor.clone()) {
            Ok(doc) if doc.name() == group => doc,
            Ok(doc) => {
                let reason = format!("grant for {group:?} holds group {:?}", doc.name());
                return self.drop_message(from, reason);
            }
            Err(error) => return self.drop_message(from, format!("join grant does not load: {error}")),
        };
        let key = join.key.clone();
        let Some(join) = self.joins.remove(&group) else { return };
        match self.adopt_group(group.clone(), doc, key) {
            Ok(()) => {
                if join.repair
                    && let Some(state) = self.groups.get_mut(&group)
                {
                    // Records of this group were lost here: until the document moves on, this
                    // node cannot tell a round it never staged from one it forgot.
                    let mut heads = state.doc.heads();
                    heads.sort();
                    state.strong.amnesic_at = Some(heads);
                }
                self.announce_and_answer(&group, join.id, granter_members);
            }
            Err(error) => self.reply(join.id, Err(error)),
        }
    }
}

/// The keys whose served value differs between two settings.
fn changed_keys(before: &crate::settings::Settings, after: &crate::settings::Settings) -> BTreeSet<String> {
    let changed = crate::diff::SettingsDiff::between(before, after);
    let mut keys: BTreeSet<String> = changed.added.into_iter().map(|(k, _)| k).collect();
    keys.extend(changed.removed.into_iter().map(|(k, _)| k));
    keys.extend(changed.changed.into_iter().map(|c| c.key));
    keys
}

impl From<RemoteError> for CommandError {
    fn from(error: RemoteError) -> Self {
        CommandError::TooLarge(error.to_string())
    }
}
