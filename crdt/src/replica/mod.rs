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
//!
//! This file holds the [`Replica`] itself, the state it keeps per group, its constructor and the
//! dispatch of inputs, commands and peer messages; each concern lives in a file of its own
//! (see the code map in docs/ARCHITECTURE.md). The types the shell exchanges with the core are
//! defined in `command.rs`, `gossip.rs`, `interface.rs` and `watch.rs` and re-exported here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::{ActorId, ChangeHash};
use sha2::{Digest, Sha256};

use crate::exchange::SyncPeer;
use crate::group::{Edit, GroupDoc, Mode};
use crate::join::derive_nonce;
use crate::keyring::Keyring;
use crate::limits::{ANTI_ENTROPY_DELAY_MS, DECISIONS_KEPT, SYNC_SESSION_TIMEOUT_MS};
use crate::peer_message::{Nonce, PeerMessage, RoundId, RoundOutcome};
use crate::time::Millis;
use join::{Challenge, PendingJoin};
use push::DeferredApply;
use sync::SyncSession;

mod command;
mod configuration;
mod decision;
mod gossip;
mod interface;
mod join;
mod lease;
mod membership;
mod persist;
mod push;
mod quorum;
mod rotation;
mod round;
mod sync;
mod watch;
mod write;

pub use command::{Command, CommandError, CommandId, CommandOutcome, CommitReceipt};
pub use gossip::{GroupGossip, MembershipView, PeerLiveness, PeerState, membership_proof};
pub use interface::{Input, LoadedState, Notification, Output, PersistOp};
pub use quorum::QuorumInfo;
pub use watch::EventsSince;

/// A node's id, as in its certificate and in gossip.
pub type NodeId = String;

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

/// What this node holds of one group: its document, key and revision, the sessions and rounds
/// it runs for it, and what it knows of its members.
#[derive(Debug)]
struct GroupState {
    doc: GroupDoc,
    /// The group's keys: the current one admits and proves membership.
    keys: Keyring,
    proof: [u8; 32],
    revision: u64,
    /// Recent notifications with the revision of the one told before each (a gated group's
    /// quiet changes lie between them and are told to nobody).
    events: VecDeque<(u64, Notification)>,
    /// The revision of the last notification told (or where the ring starts): the next one's
    /// starting point.
    last_told: u64,
    /// The document's change count, kept as changes arrive (counting them in the document
    /// walks its whole history). Not the revision, which starts at a base per run.
    changes: u64,
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
    /// A key request this node has out (a member showed a newer key).
    key_ask: Option<rotation::KeyAsk>,
    /// Every member this node has known of the group (persisted): just after a start, those it
    /// has not heard of yet count as unknown, not absent.
    known_members: BTreeSet<NodeId>,
}

impl GroupState {
    fn new(doc: GroupDoc, keys: Keyring, proof: [u8; 32], tail_changes: usize, revision: u64) -> GroupState {
        GroupState {
            revision,
            last_told: revision,
            changes: doc.change_count(),
            doc,
            keys,
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
            key_ask: None,
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
    /// Expected membership proofs of peers, per group (`gossip.rs`).
    proofs: gossip::ProofMemo,
    joins: BTreeMap<String, PendingJoin>,
    challenges: BTreeMap<(NodeId, String), Challenge>,
    commits: BTreeMap<CommandId, quorum::PendingCommit>,
    outputs: VecDeque<Output>,
    /// Received changes already queued for persisting, applied at [`Input::Resume`].
    deferred: Option<DeferredApply>,
    /// Pushes queued since outputs were last polled, which later writes may join.
    open_pushes: Vec<push::OpenPush>,
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
    /// Where this run's revisions start: above every revision an earlier run of this node can
    /// have told a watcher (see [`Replica::start_revisions_at`]).
    revision_base: u64,
    /// The last revision of each group this node dropped during this run (left, or reloaded
    /// after a failed persist): a group taken again starts above it, so no revision is given
    /// twice with two meanings (SPEC invariant 4).
    left_revisions: BTreeMap<String, u64>,
    /// This node's labels (`--label`): a canary release's selector matches them (SPEC F14).
    labels: BTreeMap<String, String>,
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

/// True for a group whose revisions start above every earlier run's (an eventual group, whose
/// watchers may be told before the fsync, and a gated group, whose served version can change
/// across a restart with the node's labels); false for a strong group, whose revision is its
/// change count.
pub(crate) fn revisions_per_run(doc: &GroupDoc) -> bool {
    doc.mode() == Mode::Eventual || doc.is_gated()
}

impl Replica {
    /// The same replica serving a node with these labels: a canary release's selector matches
    /// them (SPEC F14). Set before any watcher subscribes (labels do not change during a run).
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> Replica {
        self.labels = labels;
        let viewer = self.viewer();
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for state in self.groups.values_mut() {
            state.doc.set_viewer(viewer.clone());
        }
        // The summaries published at load named what was served without the labels.
        for name in names {
            self.publish(&name);
        }
        self
    }

    /// This node as a gated group's served version is computed for.
    fn viewer(&self) -> crate::release::Viewer {
        crate::release::Viewer { node: self.node_id.clone(), labels: self.labels.clone() }
    }

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
            proofs: gossip::ProofMemo::default(),
            joins: BTreeMap::new(),
            challenges: BTreeMap::new(),
            commits: BTreeMap::new(),
            outputs: VecDeque::new(),
            deferred: None,
            open_pushes: Vec::new(),
            dead_since: BTreeMap::new(),
            left_lamports: BTreeMap::new(),
            departed: VecDeque::new(),
            reloads: 0,
            wall_offset: 0,
            revision_base: 0,
            left_revisions: BTreeMap::new(),
            labels: BTreeMap::new(),
        };
        for (name, state) in loaded {
            let mut sync = BTreeMap::new();
            for (peer, bytes) in state.sync_states {
                if let Ok(peer_state) = SyncPeer::decode(&bytes) {
                    sync.insert(peer, SyncSession { peer: peer_state, ..SyncSession::default() });
                }
            }
            let proof = membership_proof(state.keys.key(), &name, &replica.node_id);
            let round_lamport = state.decisions.iter().map(|(round, _)| round.lamport).max().unwrap_or(0);
            let revision = state.doc.change_count();
            let mut doc = state.doc;
            doc.set_viewer(replica.viewer());
            let mut group = GroupState::new(doc, state.keys, proof, state.tail_changes, revision);
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

    /// Starts this run's revisions of eventual groups at `base` (call it right after
    /// [`Replica::new`]): each one's revision becomes `base` plus its change count. A watcher
    /// may have been told of a pushed change before this node's fsync (issue 14), so the
    /// revisions an earlier run gave can name changes that were lost with it; the shell passes
    /// a base above all of them ([`crate::limits::revision_base`] of the incarnation), and a
    /// watcher resuming from one gets an explicit resync. A strong group's revision stays its
    /// change count: its watchers are told only what is saved, and the count is the version's
    /// position in the group's one sequence, the same on every node.
    pub fn start_revisions_at(&mut self, base: u64) {
        self.revision_base = base;
        let mut moved = Vec::new();
        for (name, state) in self.groups.iter_mut().filter(|(_, state)| revisions_per_run(&state.doc)) {
            state.revision = base.saturating_add(state.doc.change_count());
            state.last_told = state.revision;
            state.events.clear();
            moved.push(name.clone());
        }
        // The summaries published at load carry the revision from before.
        for name in moved {
            self.publish(&name);
        }
    }

    /// The revision a group taken now (created, joined, reloaded) starts at: its change count,
    /// and in an eventual group above this run's base and above any revision this run gave
    /// the name before (see [`Replica::start_revisions_at`]).
    fn starting_revision(&self, name: &str, doc: &GroupDoc) -> u64 {
        if !revisions_per_run(doc) {
            return doc.change_count();
        }
        let counted = self.revision_base.saturating_add(doc.change_count());
        match self.left_revisions.get(name) {
            Some(last) => counted.max(last.saturating_add(1)),
            None => counted,
        }
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

    /// The keys this node holds of `name`.
    pub fn keyring(&self, name: &str) -> Option<&Keyring> {
        self.groups.get(name).map(|state| &state.keys)
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

    /// Next output to execute, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        if !self.open_pushes.is_empty() {
            // A push that may be on its way is never joined.
            self.open_pushes.clear();
        }
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
                // What this node serves (a gated group's released version, SPEC F14): `status`
                // compares each process's applied version with it.
                version: state.doc.served_label(),
                proof: state.proof,
                heads: state.doc.heads(),
                key: (state.keys.generation() > 0).then(|| state.keys.id(name)),
            };
            // A publish still queued for the group is superseded: only the latest value counts,
            // and it is published at the latest position, after every persist queued before it.
            // The writes of one batch then publish once (issue 14).
            self.outputs.retain(|output| !matches!(output, Output::Publish { group, .. } if group == name));
            self.outputs.push_back(Output::Publish { group: name.to_owned(), gossip: Some(gossip) });
        }
    }

    fn handle_command(&mut self, id: CommandId, command: Command) {
        match command {
            Command::CreateGroup { name, mode, key, meta, policy } => {
                self.create_group(id, name, mode, key, meta, policy)
            }
            Command::JoinGroup { name, key, repair } => self.start_join(id, name, key, repair),
            Command::RotateKey { group, key } => self.rotate_key(id, group, key),
            Command::LeaveGroup { name, force } => self.leave_group(id, name, force),
            Command::RemoveMember { group, nodes, force, meta } => self.remove_member(id, group, nodes, force, meta),
            Command::Set { group, entries, meta } => self.local_write(id, group, Edit::Set(entries), meta),
            Command::Delete { group, keys, meta } => self.local_write(id, group, Edit::Delete(keys), meta),
            Command::Apply { group, format, text, meta } => {
                self.local_write(id, group, Edit::ApplyFile { text, format }, meta)
            }
            Command::Rollback { group, version, meta } => self.local_write(id, group, Edit::Rollback(version), meta),
            Command::SetSchema { group, schema, meta } => self.local_write(id, group, Edit::Schema(schema), meta),
            Command::Release { group, version, strategy, guards, meta } => {
                self.local_write(id, group, Edit::Release { to: version, strategy, guards }, meta)
            }
            Command::Promote { group, wave, meta } => self.local_write(id, group, Edit::Promote { wave }, meta),
            Command::Abort { group, reason, meta } => self.local_write(id, group, Edit::Abort { reason }, meta),
        }
    }

    fn handle_peer_message(&mut self, from: NodeId, message: PeerMessage) {
        let group = message.group().to_owned();
        match message {
            PeerMessage::Changes { changes, .. } => {
                if !self.is_member(&group, &from) {
                    return self.drop_message(from, format!("changes for group {group:?} from a non-member"));
                }
                self.handle_changes(group, from, changes);
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
            PeerMessage::JoinRefused { reason, .. } => self.handle_join_refused(from, group, reason),
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
            PeerMessage::KeyRequest { nonce, proofs, .. } => self.serve_key_request(&group, from, nonce, &proofs),
            PeerMessage::KeyGrant { id, under, nonce, wrapped, tag, entitled, .. } => {
                self.take_key_grant(&group, from, rotation::Grant { id, under, nonce, wrapped, tag, entitled })
            }
        }
    }

    fn handle_tick(&mut self) {
        self.run_anti_entropy();
        self.expire_challenges();
        self.expire_commits();
        self.expire_rounds();
        self.renew_leases();
        self.expire_joins();
        self.ask_for_newer_keys();
        let names: Vec<String> = self.joins.keys().cloned().collect();
        for name in names {
            self.advance_join(&name);
        }
    }
}
