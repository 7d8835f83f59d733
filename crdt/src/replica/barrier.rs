//! Strong groups (SPEC F11, F12): the all-ack barrier round. The writer coordinates: every live
//! member stages the change durably and votes; only when every vote is yes is the commit
//! decided (made durable by applying and appending the change), then broadcast. Anything else
//! aborts, and nothing becomes visible anywhere. docs/protocol.md states the invariants S1-S3.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;

use super::{CommandError, CommandId, CommandOutcome, CommitReceipt, NodeId, Output, PersistOp, Replica};
use crate::group::{CommitMeta, Edit, Mode};
use crate::journal::{RoundRecord, round_record};
use crate::limits::{DECISION_TIMEOUT_MS, ROUND_QUEUE_MAX, ROUND_TIMEOUT_MS};
use crate::peer_message::{PeerMessage, RoundId, RoundOutcome};
use crate::time::Millis;

/// The round a node takes part in for one group (at most one: invariant S3).
#[derive(Debug)]
pub(super) enum Round {
    /// This node coordinates the round.
    Coordinating {
        id: RoundId,
        command: CommandId,
        change: Vec<u8>,
        receipt: Box<CommitReceipt>,
        members: BTreeSet<NodeId>,
        votes: BTreeMap<NodeId, bool>,
        deadline: Millis,
    },
    /// This node staged the round's change and voted yes; it waits for the decision.
    Staged { id: RoundId, change: Vec<u8>, hash: ChangeHash, members: Vec<NodeId>, next_query: Millis },
}

impl Round {
    /// When the replica must look at the round again.
    pub(super) fn deadline(&self) -> Millis {
        match self {
            Round::Coordinating { deadline, .. } => *deadline,
            Round::Staged { next_query, .. } => *next_query,
        }
    }

    /// The record that restores this round after a restart: only a staged round needs one (a
    /// coordinator's undecided round is aborted by its restart).
    pub(super) fn staged_record(&self) -> Option<RoundRecord> {
        match self {
            Round::Staged { id, change, members, .. } => {
                Some(RoundRecord::Staged { round: id.clone(), change: change.clone(), members: members.clone() })
            }
            Round::Coordinating { .. } => None,
        }
    }

    fn id(&self) -> &RoundId {
        match self {
            Round::Coordinating { id, .. } | Round::Staged { id, .. } => id,
        }
    }
}

/// A local write to a strong group waiting for the group's current round to end.
#[derive(Debug)]
pub(super) struct QueuedWrite {
    command: CommandId,
    edit: Edit,
    meta: CommitMeta,
    pub(super) deadline: Millis,
}

impl Replica {
    /// Starts the next queued local write of every strong group whose round has ended, and
    /// refuses queued writes that waited too long (a round in doubt can last).
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
            // A round that ends at once (no other live member) lets the next one start too.
            while let Some(write) = next.take() {
                self.start_round(write.command, name.clone(), write.edit, write.meta);
                next = self.groups.get_mut(&name).filter(|s| s.round.is_none()).and_then(|s| s.queued.pop_front());
            }
        }
    }

    /// True when reads of `group` must be flagged stale: a strong group in doubt about a round,
    /// not yet compared with its peers since start, or behind a live member.
    pub fn is_fenced(&self, group: &str) -> bool {
        let Some(state) = self.groups.get(group) else { return false };
        if state.doc.mode() != Mode::Strong {
            return false;
        }
        if state.awaiting_view || matches!(state.round, Some(Round::Staged { .. })) {
            return true;
        }
        let ours = state.doc.heads_digest();
        self.members(group)
            .iter()
            .any(|(_, live, gossip)| *live && gossip.digest != ours && gossip.revision > state.revision)
    }

    /// This start's tag for round ids: the first 8 bytes of the actor, which is fresh at every
    /// start (derived from the node id, a per-start seed and the incarnation).
    fn start_tag(&self) -> u64 {
        let bytes = self.actor.to_bytes();
        let mut tag = [0u8; 8];
        for (slot, byte) in tag.iter_mut().zip(bytes) {
            *slot = *byte;
        }
        u64::from_be_bytes(tag)
    }

    /// Starts a round for a local write to a strong group.
    pub(super) fn start_round(&mut self, command: CommandId, group: String, edit: Edit, meta: CommitMeta) {
        let live = self.live_members(&group);
        let node_id = self.node_id.clone();
        let now = self.now;
        let start = self.start_tag();
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
        let prepared = match state.doc.prepare(edit, &meta) {
            Ok(prepared) => prepared,
            Err(error) => return self.reply(command, Err(error.into())),
        };
        state.round_lamport += 1;
        let id = RoundId { lamport: state.round_lamport, node: node_id.clone(), start };
        let label = state.doc.label(&prepared.version.id);
        let receipt = Box::new(CommitReceipt {
            group: group.clone(),
            version: prepared.version,
            label,
            revision: 0,
            acked_by: Vec::new(),
        });
        let members: BTreeSet<NodeId> = live.into_iter().collect();
        for member in &members {
            let message = PeerMessage::Prepare {
                group: group.clone(),
                round: id.clone(),
                change: prepared.change.clone(),
                members: members.iter().cloned().collect(),
            };
            self.outputs.push_back(Output::Send { to: member.clone(), message });
        }
        let round = Round::Coordinating {
            id,
            command,
            change: prepared.change,
            receipt,
            members,
            votes: BTreeMap::new(),
            deadline: Millis(now.0 + ROUND_TIMEOUT_MS),
        };
        if let Some(state) = self.groups.get_mut(&group) {
            state.round = Some(round);
        }
        // Alone in the group: every live member (none) has voted.
        self.decide_if_complete(&group);
    }

    fn decide_if_complete(&mut self, group: &str) {
        let complete = matches!(
            self.groups.get(group).and_then(|s| s.round.as_ref()),
            Some(Round::Coordinating { members, votes, .. })
                if members.iter().all(|m| votes.get(m) == Some(&true))
        );
        if complete {
            self.commit_own_round(group);
        }
    }

    /// Every member staged the change: apply it here (the durable decision), then broadcast.
    fn commit_own_round(&mut self, group: &str) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Coordinating { id, command, change, mut receipt, members, .. }) = state.round.take() else {
            return;
        };
        let applied = match state.doc.apply_changes(std::slice::from_ref(&change)) {
            Ok(applied) => applied,
            Err(error) => {
                let reason = format!("the coordinator could not apply its own change: {error}");
                return self.finish_abort(group, id, command, &members, reason);
            }
        };
        debug_assert_eq!(applied.new_changes.len(), 1, "a committed round applies exactly its change");
        self.after_remote_apply(group, applied);
        self.persist_round(group, &RoundRecord::Decided { round: id.clone(), commit: true });
        for member in &members {
            let message = PeerMessage::Decide { group: group.to_owned(), round: id.clone(), commit: true };
            self.outputs.push_back(Output::Send { to: member.clone(), message });
        }
        let Some(state) = self.groups.get_mut(group) else { return };
        state.remember_decision(id, true);
        receipt.revision = state.revision;
        receipt.label = state.doc.label(&receipt.version.id);
        let mut acked: Vec<NodeId> = members.into_iter().collect();
        acked.push(self.node_id.clone());
        acked.sort();
        receipt.acked_by = acked;
        state.last_commit = Some((receipt.label.clone(), receipt.acked_by.clone()));
        self.reply(command, Ok(CommandOutcome::Committed(*receipt)));
    }

    fn abort_own_round(&mut self, group: &str, reason: String) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Coordinating { id, command, members, .. }) = state.round.take() else {
            return;
        };
        self.finish_abort(group, id, command, &members, reason);
    }

    fn finish_abort(
        &mut self,
        group: &str,
        id: RoundId,
        command: CommandId,
        members: &BTreeSet<NodeId>,
        reason: String,
    ) {
        for member in members {
            let message = PeerMessage::Decide { group: group.to_owned(), round: id.clone(), commit: false };
            self.outputs.push_back(Output::Send { to: member.clone(), message });
        }
        if let Some(state) = self.groups.get_mut(group) {
            state.remember_decision(id.clone(), false);
        }
        let error = CommandError::RoundAborted { group: group.to_owned(), round: id.to_string(), reason };
        self.reply(command, Err(error));
    }

    fn persist_round(&mut self, group: &str, record: &RoundRecord) {
        if let Ok(records) = round_record(record) {
            self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.to_owned(), records }));
        }
    }

    fn vote(&mut self, group: &str, to: NodeId, round: RoundId, yes: bool, reason: String) {
        let message = PeerMessage::Vote { group: group.to_owned(), round, yes, reason };
        self.outputs.push_back(Output::Send { to, message });
    }

    pub(super) fn handle_prepare(
        &mut self,
        group: &str,
        from: NodeId,
        round: RoundId,
        change: Vec<u8>,
        members: Vec<NodeId>,
    ) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        state.round_lamport = state.round_lamport.max(round.lamport);
        if let Some((_, commit)) = state.decisions.iter().find(|(id, _)| *id == round) {
            // A repeated prepare of a decided round: yes only if its change really is here.
            let applied = crate::exchange::decode_change(&change).is_ok_and(|c| state.doc.has_change(&c.hash()));
            let yes = *commit && applied;
            let reason = if yes { String::new() } else { format!("round {round} was already decided here") };
            return self.vote(group, from, round, yes, reason);
        }
        if let Some(Round::Staged { id, hash, .. }) = &state.round
            && *id != round
            && crate::exchange::decode_change(&change).is_ok_and(|c| c.deps().contains(hash))
        {
            // The new round's change was made on top of the change staged here, so its
            // coordinator holds that change: it was committed (a strong change enters a document
            // only by a commit decision). The Decide is merely late; settle it now instead of
            // refusing a writer that followed a commit it was told about.
            let staged = id.clone();
            self.handle_decision(group, &staged, true);
        }
        let Some(state) = self.groups.get_mut(group) else { return };
        match &state.round {
            Some(Round::Staged { id, .. }) if *id == round => {
                return self.vote(group, from, round, true, String::new());
            }
            Some(Round::Staged { id, .. }) => {
                let reason = format!("{} is busy with round {id}", self.node_id);
                return self.vote(group, from, round, false, reason);
            }
            Some(Round::Coordinating { id, .. }) if round < *id => {
                // Rounds are ordered the same everywhere: the smaller one wins, ours yields.
                let reason =
                    format!("preempted by the concurrent round {round} (rounds are ordered by (lamport, node))");
                self.abort_own_round(group, reason);
            }
            Some(Round::Coordinating { id, .. }) => {
                let reason = format!("{} coordinates the concurrent round {id}, which goes first", self.node_id);
                return self.vote(group, from, round, false, reason);
            }
            None => {}
        }
        let Some(state) = self.groups.get_mut(group) else { return };
        let decoded = match crate::exchange::decode_change(&change) {
            Ok(decoded) => decoded,
            Err(error) => return self.vote(group, from, round, false, error.to_string()),
        };
        let missing = decoded.deps().iter().filter(|dep| !state.doc.has_change(dep)).count();
        if missing > 0 {
            let reason = format!("{} is behind ({missing} changes missing); it is catching up, retry", self.node_id);
            self.start_sync(group, &from);
            return self.vote(group, from, round, false, reason);
        }
        let hash = decoded.hash();
        state.round = Some(Round::Staged {
            id: round.clone(),
            change: change.clone(),
            hash,
            members: members.clone(),
            next_query: Millis(now.0 + DECISION_TIMEOUT_MS),
        });
        // Staged durably before the vote leaves (outputs run in order).
        self.persist_round(group, &RoundRecord::Staged { round: round.clone(), change, members });
        self.vote(group, from, round, true, String::new());
    }

    pub(super) fn handle_vote(&mut self, group: &str, from: NodeId, round: RoundId, yes: bool, reason: String) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Coordinating { id, votes, .. }) = state.round.as_mut() else { return };
        if *id != round {
            return;
        }
        votes.insert(from.clone(), yes);
        if !yes {
            return self.abort_own_round(group, format!("{from} voted no: {reason}"));
        }
        self.decide_if_complete(group);
    }

    /// The coordinator's (or an authoritative peer's) decision for a round staged here.
    pub(super) fn handle_decision(&mut self, group: &str, round: &RoundId, commit: bool) {
        let Some(state) = self.groups.get_mut(group) else { return };
        if !state.decisions.iter().any(|(id, _)| id == round) {
            state.remember_decision(round.clone(), commit);
        }
        let staged = matches!(&state.round, Some(Round::Staged { id, .. }) if id == round);
        if !staged {
            return;
        }
        let Some(Round::Staged { change, .. }) = state.round.take() else { return };
        if commit {
            match state.doc.apply_changes(std::slice::from_ref(&change)) {
                Ok(applied) => self.after_remote_apply(group, applied),
                Err(error) => {
                    let reason = format!("committed change of round {round} does not apply: {error}");
                    return self.drop_message(round.node.clone(), reason);
                }
            }
        }
        self.persist_round(group, &RoundRecord::Decided { round: round.clone(), commit });
    }

    /// A staged round whose change arrived by sync was committed by its coordinator.
    pub(super) fn settle_round_by_sync(&mut self, group: &str) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Staged { id, hash, .. }) = &state.round else { return };
        if !state.doc.has_change(hash) {
            return;
        }
        let id = id.clone();
        state.round = None;
        state.remember_decision(id.clone(), true);
        self.persist_round(group, &RoundRecord::Decided { round: id, commit: true });
    }

    /// Aborts own rounds whose live member set changed; asks peers about rounds in doubt.
    pub(super) fn expire_rounds(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let Some(state) = self.groups.get_mut(&name) else { continue };
            match &mut state.round {
                Some(Round::Coordinating { deadline, members, votes, .. }) if *deadline <= now => {
                    let missing: Vec<&str> =
                        members.iter().filter(|m| !votes.contains_key(*m)).map(String::as_str).collect();
                    let reason = format!("no vote from [{}] within {ROUND_TIMEOUT_MS} ms", missing.join(", "));
                    self.abort_own_round(&name, reason);
                }
                Some(Round::Staged { id, hash, next_query, .. }) if *next_query <= now => {
                    *next_query = Millis(now.0 + DECISION_TIMEOUT_MS / 2);
                    let (round, change) = (id.clone(), hash.0);
                    let peers: Vec<NodeId> = self.live_members(&name);
                    for peer in peers {
                        let message = PeerMessage::DecisionQuery { group: name.clone(), round: round.clone(), change };
                        self.outputs.push_back(Output::Send { to: peer, message });
                    }
                }
                _ => {}
            }
        }
    }

    /// Aborts an own round when the group's live members differ from those it started with.
    pub(super) fn check_rounds_against_membership(&mut self) {
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let live: BTreeSet<NodeId> = self.live_members(&name).into_iter().collect();
            let Some(Round::Coordinating { members, .. }) = self.groups.get(&name).and_then(|s| s.round.as_ref())
            else {
                continue;
            };
            if *members != live {
                let gone: Vec<&str> = members.difference(&live).map(String::as_str).collect();
                let new: Vec<&str> = live.difference(members).map(String::as_str).collect();
                let reason = format!(
                    "live members changed during the round (lost: [{}], new: [{}])",
                    gone.join(", "),
                    new.join(", ")
                );
                self.abort_own_round(&name, reason);
            }
        }
    }

    pub(super) fn answer_decision_query(&mut self, group: &str, from: NodeId, round: RoundId, change: ChangeHash) {
        let Some(state) = self.groups.get(group) else { return };
        let outcome = if state.doc.has_change(&change) {
            RoundOutcome::Committed
        } else if let Some((_, commit)) = state.decisions.iter().find(|(id, _)| *id == round) {
            if *commit { RoundOutcome::Committed } else { RoundOutcome::Aborted }
        } else if round.node == self.node_id
            && !matches!(&state.round, Some(Round::Coordinating { id, .. }) if *id == round)
        {
            // The coordinator decides; a round of its own it does not hold (its change is not
            // in its document, so it never committed) is aborted, and stays so.
            RoundOutcome::Aborted
        } else {
            RoundOutcome::Unknown
        };
        let message = PeerMessage::DecisionAnswer { group: group.to_owned(), round, outcome };
        self.outputs.push_back(Output::Send { to: from, message });
    }

    pub(super) fn handle_decision_answer(
        &mut self,
        group: &str,
        from: &NodeId,
        round: &RoundId,
        outcome: RoundOutcome,
    ) {
        // An abort is authoritative only from the coordinator or from a peer that recorded it;
        // both answer Aborted only in those cases.
        let _ = from;
        match outcome {
            RoundOutcome::Committed => self.handle_decision(group, round, true),
            RoundOutcome::Aborted => self.handle_decision(group, round, false),
            RoundOutcome::Unknown => {}
        }
    }

    /// Restores a round found staged in the group file at start.
    pub(super) fn restore_round(&mut self, group: &str, staged: Option<RoundRecord>) {
        let Some(RoundRecord::Staged { round, change, members }) = staged else { return };
        if round.node == self.node_id {
            // Our own round from a previous run, never decided: abort it for good.
            if let Some(state) = self.groups.get_mut(group) {
                state.remember_decision(round.clone(), false);
            }
            return self.persist_round(group, &RoundRecord::Decided { round, commit: false });
        }
        let Ok(decoded) = crate::exchange::decode_change(&change) else { return };
        let Some(state) = self.groups.get_mut(group) else { return };
        state.round_lamport = state.round_lamport.max(round.lamport);
        state.round = Some(Round::Staged { id: round, change, hash: decoded.hash(), members, next_query: self.now });
        self.settle_round_by_sync(group);
    }
}
