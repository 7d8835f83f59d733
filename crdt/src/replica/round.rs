//! Strong groups (SPEC F11), phase 1: rounds over the group's configuration.
//!
//! A strong group's committed changes form one chain: every round's change depends on exactly
//! the heads its members hold, and a member stages it (durably, not visible) only when its own
//! heads are those dependencies. A write commits when every member of the configuration staged
//! it; a configuration change when a majority of the old configuration and every member of the
//! new one not seen dead staged it. The coordinator then proposes the commit decision, which is
//! final once a majority of the configuration recorded it (`decision.rs`). Anything short of that
//! aborts, and nothing becomes visible anywhere. docs/protocol.md states the protocol, its
//! invariants and why they hold.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;

use super::{CommandError, CommandId, CommandOutcome, CommitReceipt, NodeId, Output, PersistOp, Replica};
use crate::configuration::Configuration;
use crate::group::{CommitMeta, Edit, Mode};
use crate::journal::{RoundRecord, round_record};
use crate::limits::{DECIDE_TIMEOUT_MS, DECISION_TIMEOUT_MS, ROUND_QUEUE_MAX, ROUND_TIMEOUT_MS};
use crate::peer_message::{Ballot, PeerMessage, RoundId, RoundKind, RoundOutcome};
use crate::time::Millis;

/// The round a node takes part in for one group (at most one: invariant S3).
#[derive(Debug)]
pub(super) enum Round {
    /// This node coordinates the round.
    Coordinating(Box<Coordinating>),
    /// This node staged the round's change; it waits for the final decision.
    Staged(Box<Staged>),
}

/// Why a node coordinates a round, which says whom to answer and how.
#[derive(Debug)]
pub(super) enum Purpose {
    /// A local write.
    Write { command: CommandId, receipt: Box<CommitReceipt> },
    /// This node enters the configuration (after a join, or after it was evicted).
    Join,
    /// This node leaves the configuration, then the group.
    Leave { command: CommandId },
    /// Members dead longer than the group's `evict_after` leave the configuration.
    Evict,
    /// An operator removes a member (`group remove`, maybe forced).
    Remove { command: CommandId },
}

/// Where a coordinated round stands.
#[derive(Debug)]
pub(super) enum Phase {
    /// Prepares sent; votes come in.
    Voting,
    /// Every vote needed is in; the commit decision is proposed at ballot 0 and waits until a
    /// majority of the configuration recorded it.
    Deciding { accepted_by: BTreeSet<NodeId> },
}

/// A round this node coordinates.
#[derive(Debug)]
pub(super) struct Coordinating {
    pub(super) id: RoundId,
    pub(super) purpose: Purpose,
    pub(super) change: Vec<u8>,
    pub(super) hash: ChangeHash,
    pub(super) deps: Vec<ChangeHash>,
    pub(super) kind: RoundKind,
    /// The configuration the round runs in (the one at `deps`).
    pub(super) base: Configuration,
    /// Everyone the prepare went to.
    pub(super) voters: BTreeSet<NodeId>,
    pub(super) votes: BTreeMap<NodeId, bool>,
    pub(super) phase: Phase,
    pub(super) deadline: Millis,
}

/// A round staged here (a member's copy, or a coordinator's own round whose commit proposal did
/// not reach a majority in time): in doubt until its final decision is known.
#[derive(Debug)]
pub(super) struct Staged {
    pub(super) id: RoundId,
    pub(super) change: Vec<u8>,
    pub(super) hash: ChangeHash,
    pub(super) deps: Vec<ChangeHash>,
    pub(super) kind: RoundKind,
    pub(super) base: Configuration,
    /// The highest ballot promised (durable).
    pub(super) promised: Ballot,
    /// The decision accepted, with its ballot (durable).
    pub(super) accepted: Option<(Ballot, bool)>,
    /// When to ask about the round next.
    pub(super) next_query: Millis,
    /// Query rounds sent without a final answer.
    pub(super) queries: u32,
    /// The largest ballot number seen for the round, to pick the next recovery's.
    pub(super) highest_ballot: u64,
    /// The recovery this node runs, if any.
    pub(super) recovery: Option<Recovery>,
}

/// A recovery this node runs for a round in doubt (driven by `decision.rs`).
#[derive(Debug)]
pub(super) struct Recovery {
    pub(super) ballot: Ballot,
    /// Promises so far, with what each member accepted.
    pub(super) promises: BTreeMap<NodeId, Option<(Ballot, bool)>>,
    /// The decision proposed in phase 2, once a majority promised.
    pub(super) proposal: Option<bool>,
    pub(super) accepted_by: BTreeSet<NodeId>,
}

impl Round {
    /// When the replica must look at the round again.
    pub(super) fn deadline(&self) -> Millis {
        match self {
            Round::Coordinating(c) => c.deadline,
            Round::Staged(s) => s.next_query,
        }
    }

    /// The records that restore this round after a restart: a staged round with its ballots.
    /// A coordinator's round still voting needs none (its restart aborts it); one deciding has
    /// staged itself when it proposed the commit.
    pub(super) fn staged_records(&self) -> Vec<RoundRecord> {
        let (id, change, kind, base, promised, accepted) = match self {
            Round::Staged(s) => (&s.id, &s.change, &s.kind, &s.base, s.promised.clone(), s.accepted.clone()),
            Round::Coordinating(c) if matches!(c.phase, Phase::Deciding { .. }) => {
                let ballot = coordinator_ballot(&c.id);
                (&c.id, &c.change, &c.kind, &c.base, ballot.clone(), Some((ballot, true)))
            }
            Round::Coordinating(_) => return Vec::new(),
        };
        let mut records = vec![RoundRecord::Staged {
            round: id.clone(),
            change: change.clone(),
            kind: kind.clone(),
            configuration: base.clone(),
        }];
        if promised != Ballot::default() {
            records.push(RoundRecord::Promised { round: id.clone(), ballot: promised });
        }
        if let Some((ballot, commit)) = accepted {
            records.push(RoundRecord::Accepted { round: id.clone(), ballot, commit });
        }
        records
    }

    pub(super) fn id(&self) -> &RoundId {
        match self {
            Round::Coordinating(c) => &c.id,
            Round::Staged(s) => &s.id,
        }
    }

    /// The round's change hash, when this node holds it staged or proposes it.
    pub(super) fn staged_change(&self) -> Option<ChangeHash> {
        match self {
            Round::Staged(s) => Some(s.hash),
            Round::Coordinating(c) if matches!(c.phase, Phase::Deciding { .. }) => Some(c.hash),
            Round::Coordinating(_) => None,
        }
    }

    /// True when this node cannot know whether the round committed: it holds the change staged
    /// (or proposed it) without a final decision.
    pub(super) fn in_doubt(&self) -> bool {
        self.staged_change().is_some()
    }
}

/// The coordinator's own proposal number: below every recovery's.
pub(super) fn coordinator_ballot(round: &RoundId) -> Ballot {
    Ballot { number: 0, node: round.node.clone() }
}

/// The members whose records decide a round's outcome: the round's configuration, or for a
/// forced change the new one (the old one is being overruled).
pub(super) fn decision_set<'a>(base: &'a Configuration, kind: &'a RoundKind) -> &'a BTreeSet<NodeId> {
    match kind {
        RoundKind::Reconfigure { next, forced: true } => &next.members,
        _ => &base.members,
    }
}

/// Members of a decision set that recorded a proposal, counted against its majority.
pub(super) fn majority_reached(set: &BTreeSet<NodeId>, recorded: &BTreeSet<NodeId>) -> bool {
    set.intersection(recorded).count() > set.len() / 2
}

/// True when a change with these dependencies (all present in `doc`) extends exactly the
/// document's current state: every head is among them. (Automerge may also list an ancestor,
/// such as the writer's own previous change, so the lists need not be equal.)
pub(super) fn builds_on_heads(doc: &crate::group::GroupDoc, deps: &[ChangeHash]) -> bool {
    doc.heads().iter().all(|head| deps.contains(head))
}

/// A local write to a strong group waiting for the group's current round to end.
#[derive(Debug)]
pub(super) struct QueuedWrite {
    pub(super) command: CommandId,
    edit: Edit,
    meta: CommitMeta,
    pub(super) deadline: Millis,
}

impl Replica {
    /// Starts the next queued local write of every strong group whose round has ended, refuses
    /// queued writes that waited too long, and runs configuration upkeep (evictions, joins).
    pub(super) fn drain_round_queues(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let mut expired = Vec::new();
            let mut next = None;
            if let Some(state) = self.groups.get_mut(&name) {
                while state.queued.front().is_some_and(|write| write.deadline <= now) {
                    if let Some(write) = state.queued.pop_front() {
                        let round = state.round.as_ref().map(|r| r.id().to_string()).unwrap_or_default();
                        expired.push((write.command, round));
                    }
                }
                if state.round.is_none() {
                    next = state.queued.pop_front();
                }
            }
            for (command, round) in expired {
                self.reply(command, Err(CommandError::RoundInProgress { group: name.clone(), round }));
            }
            // A round that ends at once (a configuration of one) lets the next one start too.
            while let Some(write) = next.take() {
                self.start_round(write.command, name.clone(), write.edit, write.meta);
                next = self.groups.get_mut(&name).filter(|s| s.round.is_none()).and_then(|s| s.queued.pop_front());
            }
        }
        self.maintain_configurations();
    }

    /// This start's tag for round ids: the first 8 bytes of the actor, which is fresh at every
    /// start (derived from the node id, a per-start seed and the incarnation).
    pub(super) fn start_tag(&self) -> u64 {
        let bytes = self.actor.to_bytes();
        let mut tag = [0u8; 8];
        for (slot, byte) in tag.iter_mut().zip(bytes) {
            *slot = *byte;
        }
        u64::from_be_bytes(tag)
    }

    fn next_round_id(&mut self, group: &str) -> Option<RoundId> {
        let start = self.start_tag();
        let node = self.node_id.clone();
        let state = self.groups.get_mut(group)?;
        state.round_lamport += 1;
        Some(RoundId { lamport: state.round_lamport, node, start })
    }

    /// Starts a round for a local write to a strong group.
    pub(super) fn start_round(&mut self, command: CommandId, group: String, edit: Edit, meta: CommitMeta) {
        let now = self.now;
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get_mut(&group) else {
            return self.reply(command, Err(CommandError::UnknownGroup(group)));
        };
        if let Some(round) = &state.round {
            // One round per group at a time (S3): later local writes wait their turn, bounded.
            if state.queued.len() < ROUND_QUEUE_MAX {
                // Long enough for a round in doubt to be settled by asking peers, then run.
                let deadline = Millis(now.0 + DECISION_TIMEOUT_MS + ROUND_TIMEOUT_MS);
                state.queued.push_back(QueuedWrite { command, edit, meta, deadline });
                return;
            }
            let round = round.id().to_string();
            return self.reply(command, Err(CommandError::RoundInProgress { group, round }));
        }
        let Some(base) = state.doc.configuration().cloned() else {
            return self.reply(command, Err(CommandError::NoConfiguration(group)));
        };
        if !base.contains(&node_id) {
            let configuration = base.to_string();
            return self.reply(command, Err(CommandError::NotAMember { group, node: node_id, configuration }));
        }
        let prepared = match state.doc.prepare(edit, &meta) {
            Ok(prepared) => prepared,
            Err(error) => return self.reply(command, Err(error.into())),
        };
        let label = state.doc.label(&prepared.version.id);
        let receipt = Box::new(CommitReceipt {
            group: group.clone(),
            version: prepared.version,
            label,
            revision: 0,
            acked_by: Vec::new(),
            final_before_reply: false,
        });
        let purpose = Purpose::Write { command, receipt };
        self.launch_round(&group, purpose, prepared.change, prepared.change_hash, RoundKind::Write, base);
    }

    /// Starts a round that changes the configuration of `group` to `next`.
    pub(super) fn start_reconfiguration(
        &mut self,
        group: &str,
        next: Configuration,
        forced: bool,
        purpose: Purpose,
        meta: &CommitMeta,
    ) -> Result<(), CommandError> {
        let Some(state) = self.groups.get_mut(group) else {
            return Err(CommandError::UnknownGroup(group.to_owned()));
        };
        if let Some(round) = &state.round {
            return Err(CommandError::RoundInProgress { group: group.to_owned(), round: round.id().to_string() });
        }
        let Some(base) = state.doc.configuration().cloned() else {
            return Err(CommandError::NoConfiguration(group.to_owned()));
        };
        // The coordinator's own yes counts too: it must keep the promises of its grants like
        // any voter (a member holding its lease may still be serving reads as fresh).
        let now = self.now;
        let leased: Vec<String> = base
            .members
            .iter()
            .filter(|m| !next.contains(m) && **m != self.node_id)
            .filter(|m| state.strong.granted.get(*m).is_some_and(|until| *until > now))
            .cloned()
            .collect();
        if !leased.is_empty() {
            return Err(CommandError::BadRequest(format!(
                "[{}] hold a read lease from this node and may still serve reads as fresh: they cannot be removed until it ends (to remove a live node, run `konorctl group leave` on it)",
                leased.join(", ")
            )));
        }
        let prepared = state.doc.prepare_reconfiguration(&next, meta)?;
        let kind = RoundKind::Reconfigure { next, forced };
        self.launch_round(group, purpose, prepared.change, prepared.change_hash, kind, base);
        Ok(())
    }

    /// Sends the prepares of a new round and records it; decides at once when no other vote
    /// is needed.
    fn launch_round(
        &mut self,
        group: &str,
        purpose: Purpose,
        change: Vec<u8>,
        hash: ChangeHash,
        kind: RoundKind,
        base: Configuration,
    ) {
        let now = self.now;
        let Some(id) = self.next_round_id(group) else { return };
        let deps = self.groups.get(group).map(|s| s.doc.heads()).unwrap_or_default();
        let mut voters: BTreeSet<NodeId> = base.members.clone();
        if let RoundKind::Reconfigure { next, .. } = &kind {
            voters.extend(next.members.iter().cloned());
        }
        voters.remove(&self.node_id);
        for voter in &voters {
            let message = PeerMessage::Prepare {
                group: group.to_owned(),
                round: id.clone(),
                change: change.clone(),
                kind: kind.clone(),
                configuration: base.number,
                members: voters.iter().cloned().collect(),
            };
            self.outputs.push_back(Output::Send { to: voter.clone(), message });
        }
        let round = Coordinating {
            id,
            purpose,
            change,
            hash,
            deps,
            kind,
            base,
            voters,
            votes: BTreeMap::new(),
            phase: Phase::Voting,
            deadline: Millis(now.0 + ROUND_TIMEOUT_MS),
        };
        if let Some(state) = self.groups.get_mut(group) {
            state.round = Some(Round::Coordinating(Box::new(round)));
        }
        self.check_votes(group);
    }

    /// Decides a voting round of this node's when its votes allow: proposes the commit when the
    /// yes votes suffice, aborts when a member it needs is seen dead.
    pub(super) fn check_votes(&mut self, group: &str) {
        let Some(Round::Coordinating(round)) = self.groups.get(group).and_then(|s| s.round.as_ref()) else {
            return;
        };
        if !matches!(round.phase, Phase::Voting) {
            return;
        }
        let mut yes: BTreeSet<&NodeId> = round.votes.iter().filter(|(_, yes)| **yes).map(|(node, _)| node).collect();
        yes.insert(&self.node_id);
        let dead = |node: &NodeId| self.peer_is_dead(node);
        let sufficient = match &round.kind {
            RoundKind::Write => round.base.members.iter().all(|m| yes.contains(m)),
            RoundKind::Reconfigure { next, forced: false } => {
                round.base.members.iter().filter(|m| yes.contains(m)).count() >= round.base.majority()
                    && next.members.iter().all(|m| yes.contains(m) || dead(m))
            }
            RoundKind::Reconfigure { next, forced: true } => next.members.iter().all(|m| yes.contains(m)),
        };
        if sufficient {
            return self.propose_commit(group);
        }
        // A member seen dead (not merely unknown) cannot vote in time: abort at once when the
        // round needs it.
        let silent_dead = |m: &&NodeId| !round.votes.contains_key(*m) && *m != &self.node_id && dead(m);
        let blocked: Vec<&str> = match &round.kind {
            RoundKind::Write => round.base.members.iter().filter(silent_dead).map(String::as_str).collect(),
            RoundKind::Reconfigure { next, forced: true } => {
                next.members.iter().filter(silent_dead).map(String::as_str).collect()
            }
            RoundKind::Reconfigure { forced: false, .. } => {
                let dead_members: Vec<&str> =
                    round.base.members.iter().filter(silent_dead).map(String::as_str).collect();
                if round.base.members.len() - dead_members.len() < round.base.majority() {
                    let reason = format!(
                        "members [{}] of configuration {} are down: no majority can agree to a change (with one of two members gone for good, remove it with --force)",
                        dead_members.join(", "),
                        round.base
                    );
                    return self.abort_own_round(group, reason);
                }
                Vec::new()
            }
        };
        if !blocked.is_empty() {
            let evict_after = self.groups.get(group).map_or(0, |s| s.doc.policy().evict_after.0);
            let reason = format!(
                "member(s) [{}] of configuration {} are down; a strong write needs every member, so writes wait until they return or are evicted (evict_after {} ms)",
                blocked.join(", "),
                round.base,
                evict_after
            );
            self.abort_own_round(group, reason);
        }
    }

    /// Every vote needed is in: record the commit proposal here (staged, accepted at ballot 0)
    /// and ask the decision set to record it too. Final once a majority has (`decision.rs`).
    fn propose_commit(&mut self, group: &str) {
        let now = self.now;
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Coordinating(round)) = state.round.as_mut() else { return };
        let set = decision_set(&round.base, &round.kind).clone();
        let alone = majority_reached(&set, &BTreeSet::from([node_id.clone()]));
        if alone {
            // This node alone is a majority of the decision set: its durable decision is final.
            return self.finalize_own_commit(group);
        }
        round.phase = Phase::Deciding { accepted_by: BTreeSet::from([node_id.clone()]) };
        round.deadline = Millis(now.0 + DECIDE_TIMEOUT_MS);
        let ballot = coordinator_ballot(&round.id);
        let records = vec![
            RoundRecord::Staged {
                round: round.id.clone(),
                change: round.change.clone(),
                kind: round.kind.clone(),
                configuration: round.base.clone(),
            },
            RoundRecord::Accepted { round: round.id.clone(), ballot: ballot.clone(), commit: true },
        ];
        let id = round.id.clone();
        // The Decides leave first and this node's own record is written while the acceptors
        // write theirs: one forced write in series fewer (issue 14). Paxos needs the acceptors'
        // records durable, not the proposer's: this node counts itself among the acceptors only
        // once its record is durable (outputs run in order, and no answer is handled before
        // this batch's fsync). A coordinator without a durable record of its round may have
        // proposed it, so it never answers "aborted" for a round of its own it holds no record
        // of (`outcome_for`, `restore_round`, `handle_persist_failed`): a majority decides.
        for member in set.iter().filter(|m| **m != node_id) {
            let message = PeerMessage::Decide {
                group: group.to_owned(),
                round: id.clone(),
                ballot: ballot.clone(),
                commit: true,
            };
            self.outputs.push_back(Output::Send { to: member.clone(), message });
        }
        self.persist_rounds(group, &records);
    }

    /// The commit of this node's round is final: apply the change (now visible here), record
    /// the decision, tell everyone, answer.
    pub(super) fn finalize_own_commit(&mut self, group: &str) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Coordinating(round)) = state.round.take() else { return };
        let Coordinating { id, mut purpose, change, hash, voters, base, phase, .. } = *round;
        // When this node recorded its decision before proposing it (every case but a
        // configuration of one), the commit is durable here and at a majority already: the
        // answer need not wait for the change's own append (whose failure, a full disk, must not
        // turn a commit the members hold into "not committed").
        let answer_first = matches!(phase, Phase::Deciding { .. });
        if let Purpose::Write { receipt, .. } = &mut purpose {
            receipt.final_before_reply = answer_first;
        }
        let answer_at = self.outputs.len();
        if !state.doc.has_change(&hash) {
            match state.doc.apply_changes(std::slice::from_ref(&change)) {
                Ok(applied) => self.after_remote_apply(group, applied),
                Err(failure) => {
                    // Cannot happen for a change built on this document; never leave it half done.
                    self.after_remote_apply(group, failure.applied);
                    let reason = format!("the coordinator could not apply its own change: {}", failure.error);
                    self.drop_message(self.node_id.clone(), reason);
                }
            }
        }
        self.persist_rounds(group, &[RoundRecord::Decided { round: id.clone(), commit: true }]);
        for voter in &voters {
            let message = PeerMessage::DecisionAnswer {
                group: group.to_owned(),
                round: id.clone(),
                outcome: RoundOutcome::Committed,
            };
            self.outputs.push_back(Output::Send { to: voter.clone(), message });
        }
        if let Some(state) = self.groups.get_mut(group) {
            state.remember_decision(id, true);
        }
        let acked_by: Vec<NodeId> = base.members.iter().cloned().collect();
        let write = matches!(purpose, Purpose::Write { .. });
        self.answer_purpose(group, purpose, Ok(acked_by));
        if answer_first
            && write
            && matches!(self.outputs.back(), Some(Output::Reply { .. }))
            && let Some(reply) = self.outputs.pop_back()
        {
            self.outputs.insert(answer_at, reply);
        }
    }

    /// Aborts a round of this node's that is still voting: nobody was asked to record a commit,
    /// so the abort is final at once.
    pub(super) fn abort_own_round(&mut self, group: &str, reason: String) {
        let round = self.groups.get(group).and_then(|s| s.round.as_ref()).map(|r| r.id().to_string());
        let error = CommandError::RoundAborted { group: group.to_owned(), round: round.unwrap_or_default(), reason };
        self.abort_own_round_with(group, error);
    }

    /// [`Replica::abort_own_round`], answering the caller with `error`.
    pub(super) fn abort_own_round_with(&mut self, group: &str, error: CommandError) {
        let Some(state) = self.groups.get_mut(group) else { return };
        if !matches!(state.round.as_ref(), Some(Round::Coordinating(c)) if matches!(c.phase, Phase::Voting)) {
            return;
        }
        let Some(Round::Coordinating(round)) = state.round.take() else { return };
        for voter in &round.voters {
            let message = PeerMessage::DecisionAnswer {
                group: group.to_owned(),
                round: round.id.clone(),
                outcome: RoundOutcome::Aborted,
            };
            self.outputs.push_back(Output::Send { to: voter.clone(), message });
        }
        if let Some(state) = self.groups.get_mut(group) {
            state.remember_decision(round.id.clone(), false);
        }
        self.answer_purpose(group, round.purpose, Err(error));
    }

    /// The commit proposal of this node's round did not reach a majority in time (a partition,
    /// dead members): the outcome is unknown here. Answer so, and wait in doubt like any
    /// member: recovery settles it, the same everywhere.
    pub(super) fn give_up_deciding(&mut self, group: &str, reason: String) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        if !matches!(state.round.as_ref(), Some(Round::Coordinating(c)) if matches!(c.phase, Phase::Deciding { .. })) {
            return;
        }
        let Some(Round::Coordinating(round)) = state.round.take() else { return };
        let Coordinating { id, purpose, change, hash, deps, kind, base, .. } = *round;
        let ballot = coordinator_ballot(&id);
        state.round = Some(Round::Staged(Box::new(Staged {
            id: id.clone(),
            change,
            hash,
            deps,
            kind,
            base,
            promised: ballot.clone(),
            accepted: Some((ballot, true)),
            next_query: now,
            queries: 0,
            highest_ballot: 0,
            recovery: None,
        })));
        let error = CommandError::OutcomeUnknown { group: group.to_owned(), round: id.to_string(), reason };
        self.answer_purpose(group, purpose, Err(error));
    }

    /// Answers whoever waits on a round this node coordinated. `acked_by` is the outcome: the
    /// members that staged the committed change, or the error.
    pub(super) fn answer_purpose(&mut self, group: &str, purpose: Purpose, outcome: Result<Vec<NodeId>, CommandError>) {
        match purpose {
            Purpose::Write { command, mut receipt } => match outcome {
                Ok(acked_by) => {
                    let Some(state) = self.groups.get_mut(group) else { return };
                    receipt.revision = state.revision;
                    receipt.label = state.doc.label(&receipt.version.id);
                    receipt.acked_by = acked_by;
                    state.last_commit = Some((receipt.label.clone(), receipt.acked_by.clone()));
                    self.reply(command, Ok(CommandOutcome::Committed(*receipt)));
                }
                Err(error) => self.reply(command, Err(error)),
            },
            Purpose::Join | Purpose::Evict => {
                // Upkeep rounds answer nobody; a failed one is retried later, and a pending join
                // answers once this node is in the configuration.
                if outcome.is_err()
                    && let Some(state) = self.groups.get_mut(group)
                {
                    state.strong.backoff(self.now);
                }
                self.answer_joins(group);
            }
            Purpose::Leave { command } => match outcome {
                Ok(_) => self.remove_group_locally(group, command),
                Err(error) => {
                    // Still a member: configuration upkeep resumes (found by konor-sim, seed
                    // 51: a node whose leave failed never rejoined after being evicted).
                    if let Some(state) = self.groups.get_mut(group) {
                        state.leaving = false;
                    }
                    let reason = error.to_string();
                    self.reply(command, Err(CommandError::LeaveFailed { group: group.to_owned(), reason }));
                }
            },
            Purpose::Remove { command } => {
                let result = outcome.map(|_| CommandOutcome::Reconfigured {
                    group: group.to_owned(),
                    configuration: self
                        .groups
                        .get(group)
                        .and_then(|s| s.doc.configuration().map(ToString::to_string))
                        .unwrap_or_default(),
                });
                self.reply(command, result);
            }
        }
    }

    pub(super) fn persist_rounds(&mut self, group: &str, records: &[RoundRecord]) {
        let mut bytes = Vec::new();
        for record in records {
            if let Ok(encoded) = round_record(record) {
                bytes.extend(encoded);
            }
        }
        if !bytes.is_empty() {
            self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.to_owned(), records: bytes }));
        }
    }

    fn vote(&mut self, group: &str, to: NodeId, round: RoundId, yes: bool, reason: String) {
        let message = PeerMessage::Vote { group: group.to_owned(), round, yes, reason };
        self.outputs.push_back(Output::Send { to, message });
    }

    /// A coordinator asks this node to stage a change and vote.
    pub(super) fn handle_prepare(
        &mut self,
        group: &str,
        from: NodeId,
        round: RoundId,
        change: Vec<u8>,
        kind: RoundKind,
        configuration: u64,
    ) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        if state.doc.mode() != Mode::Strong {
            return self.drop_message(from, format!("prepare for eventual group {group:?}"));
        }
        state.round_lamport = state.round_lamport.max(round.lamport);
        if let Some((_, commit)) = state.decisions.iter().find(|(id, _)| *id == round) {
            // A repeated prepare of a decided round: yes only if its change really is here.
            let applied = crate::exchange::decode_change(&change).is_ok_and(|c| state.doc.has_change(&c.hash()));
            let yes = *commit && applied;
            let reason = if yes { String::new() } else { format!("round {round} was already decided here") };
            return self.vote(group, from, round, yes, reason);
        }
        let decoded = match crate::exchange::decode_change(&change) {
            Ok(decoded) => decoded,
            Err(error) => return self.vote(group, from, round, false, error.to_string()),
        };
        if let Some(Round::Staged(staged)) = &state.round
            && staged.id != round
            && decoded.deps().contains(&staged.hash)
        {
            // The new round's change was made on top of the change staged here, so its
            // coordinator holds that change, which enters a document only once its commit is
            // final. The decision is merely late: settle it now.
            let staged = staged.id.clone();
            self.handle_final_decision(group, &staged, true);
        }
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get(group) else { return };
        match &state.round {
            Some(Round::Staged(staged)) if staged.id == round => {
                return self.vote(group, from, round, true, String::new());
            }
            Some(Round::Staged(staged)) => {
                let reason = format!("{node_id} is busy with round {} (in doubt)", staged.id);
                return self.vote(group, from, round, false, reason);
            }
            Some(Round::Coordinating(own)) if round < own.id && matches!(own.phase, Phase::Voting) => {
                // Rounds are ordered the same everywhere: the smaller one wins, ours yields.
                let reason =
                    format!("preempted by the concurrent round {round} (rounds are ordered by (lamport, node))");
                self.abort_own_round(group, reason);
            }
            Some(Round::Coordinating(own)) => {
                let reason = format!("{node_id} coordinates the concurrent round {}, which goes first", own.id);
                return self.vote(group, from, round, false, reason);
            }
            None => {}
        }
        let Some(state) = self.groups.get(group) else { return };
        let Some(base) = state.doc.configuration().cloned() else {
            let reason = format!("{node_id} holds no configuration of {group:?} (created by an older konord)");
            return self.vote(group, from, round, false, reason);
        };
        let missing = decoded.deps().iter().filter(|dep| !state.doc.has_change(dep)).count();
        if missing > 0 {
            let reason = format!("{node_id} is behind ({missing} changes missing); it is catching up, retry");
            self.start_sync(group, &from);
            return self.vote(group, from, round, false, reason);
        }
        let mut deps = decoded.deps().to_vec();
        deps.sort();
        if !builds_on_heads(&state.doc, &deps) {
            // The change would not extend the chain this node holds: the coordinator lacks a
            // commit (it catches up by sync), and a second change at one position must never
            // commit (one committed sequence).
            let reason =
                format!("{node_id} holds commits the coordinator lacks; the coordinator is catching up, retry");
            self.start_sync(group, &from);
            return self.vote(group, from, round, false, reason);
        }
        if base.number != configuration {
            let reason = format!("{node_id} is in configuration {base}, the round in c{configuration}");
            return self.vote(group, from, round, false, reason);
        }
        if let RoundKind::Reconfigure { next, .. } = &kind {
            if next.number != base.number + 1 {
                let reason = format!("configuration {} does not follow {}", next.number, base.number);
                return self.vote(group, from, round, false, reason);
            }
            // A member that holds a read lease from this node keeps its seat until the lease
            // runs out: it may still be serving reads as fresh (SPEC F12).
            let leased: Vec<String> = base
                .members
                .iter()
                .filter(|m| !next.contains(m) && **m != round.node)
                .filter_map(|m| {
                    let until = state.strong.granted.get(m)?;
                    (*until > now).then(|| format!("{m} ({} ms)", until.0 - now.0))
                })
                .collect();
            if !leased.is_empty() {
                let reason = format!(
                    "{node_id} granted a read lease to [{}], which may still serve reads; it cannot be removed before the lease ends (to remove a live node, run `konorctl group leave` on it)",
                    leased.join(", ")
                );
                return self.vote(group, from, round, false, reason);
            }
        }
        let hash = decoded.hash();
        let staged = Staged {
            id: round.clone(),
            change: change.clone(),
            hash,
            deps,
            kind: kind.clone(),
            base: base.clone(),
            promised: Ballot::default(),
            accepted: None,
            next_query: Millis(now.0 + DECISION_TIMEOUT_MS),
            queries: 0,
            highest_ballot: 0,
            recovery: None,
        };
        if let Some(state) = self.groups.get_mut(group) {
            state.round = Some(Round::Staged(Box::new(staged)));
        }
        // Staged durably before the vote leaves (outputs run in order).
        let record = RoundRecord::Staged { round: round.clone(), change, kind, configuration: base };
        self.persist_rounds(group, &[record]);
        self.vote(group, from, round, true, String::new());
    }

    /// A member's vote on a round this node coordinates.
    pub(super) fn handle_vote(&mut self, group: &str, from: NodeId, round: RoundId, yes: bool, reason: String) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Coordinating(own)) = state.round.as_mut() else { return };
        if own.id != round || !matches!(own.phase, Phase::Voting) || !own.voters.contains(&from) {
            return;
        }
        if own.deadline <= now {
            // A coordinator that was paused past its deadline never proposes a commit late.
            return self.abort_own_round(group, format!("no decision within {ROUND_TIMEOUT_MS} ms"));
        }
        own.votes.insert(from.clone(), yes);
        if !yes {
            return self.abort_own_round(group, format!("{from} voted no: {reason}"));
        }
        self.check_votes(group);
    }

    /// Rounds past their deadline: a vote that did not come aborts; a commit proposal that did
    /// not reach a majority leaves the outcome unknown here; a round in doubt asks its peers.
    pub(super) fn expire_rounds(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let Some(state) = self.groups.get(&name) else { continue };
            match &state.round {
                Some(Round::Coordinating(own)) if own.deadline <= now => match &own.phase {
                    Phase::Voting => {
                        let missing: Vec<&str> =
                            own.voters.iter().filter(|m| !own.votes.contains_key(*m)).map(String::as_str).collect();
                        let reason = format!("no vote from [{}] within {ROUND_TIMEOUT_MS} ms", missing.join(", "));
                        self.abort_own_round(&name, reason);
                    }
                    Phase::Deciding { accepted_by } => {
                        let set = decision_set(&own.base, &own.kind);
                        let missing: Vec<&str> =
                            set.iter().filter(|m| !accepted_by.contains(*m)).map(String::as_str).collect();
                        let reason = format!(
                            "every member staged the change, but only [{}] of configuration {} recorded the commit within {DECIDE_TIMEOUT_MS} ms (no answer from [{}]); the group settles it the same everywhere: committed or aborted, never both",
                            accepted_by.iter().map(String::as_str).collect::<Vec<_>>().join(", "),
                            own.base,
                            missing.join(", ")
                        );
                        self.give_up_deciding(&name, reason);
                    }
                },
                Some(Round::Staged(staged)) if staged.next_query <= now => self.advance_in_doubt(&name),
                _ => {}
            }
        }
    }
}
