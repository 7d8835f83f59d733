//! Strong groups (SPEC F11), phase 2: a round's outcome, decided once and for all.
//!
//! A round's outcome is one single-decree Paxos instance among the round's decision set (its
//! configuration). The coordinator proposes "commit" at ballot 0 once every vote it needs is
//! in; the commit is final when a majority of the set recorded it (`Accepted`). A coordinator
//! that aborts before proposing needs nobody: nothing can ever propose commit for that round.
//! A member in doubt asks its peers (`DecisionQuery`); without a final answer it recovers the
//! round at a higher ballot (`Recover`/`Promise`, then `Decide`): it proposes the highest-ballot
//! decision a majority reports, or abort when none reports any. A node that never staged the
//! round aborts it on the spot when asked (it never voted yes, so the round cannot commit), and
//! records that. A change of a strong group enters a document only once its commit is final, so
//! a change arriving by sync settles a round too. docs/protocol.md has the argument.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;

use super::round::{Phase, Recovery, Round, Staged, coordinator_ballot, decision_set, majority_reached};
use super::{NodeId, Output, Replica};
use crate::journal::{RoundRecord, StagedRound};
use crate::limits::DECISION_TIMEOUT_MS;
use crate::peer_message::{Ballot, PeerMessage, RoundId, RoundKind, RoundOutcome};
use crate::time::Millis;

/// Paxos acceptor state of a round this node does not hold staged.
#[derive(Debug, Clone, Default)]
pub(super) struct Acceptor {
    /// The highest ballot promised.
    pub(super) promised: Ballot,
    /// The decision accepted, with its ballot.
    pub(super) accepted: Option<(Ballot, bool)>,
}

/// True when `round` cannot commit without `node`'s staged yes: a write needs every member, a
/// forced change every member of the new configuration. A node that never staged such a round
/// may abort it on the spot; any other round a majority can decide without it.
fn needs_yes_of(kind: &RoundKind, node: &str) -> bool {
    match kind {
        RoundKind::Write => true,
        RoundKind::Reconfigure { next, forced: true } => next.contains(node),
        RoundKind::Reconfigure { forced: false, .. } => false,
    }
}

impl Replica {
    /// Everyone who took part in a round: its configuration, the new one of a reconfiguration,
    /// and the coordinator.
    fn participants(
        &self,
        round: &RoundId,
        base_kind: Option<(&crate::configuration::Configuration, &RoundKind)>,
    ) -> BTreeSet<NodeId> {
        let mut nodes = BTreeSet::from([round.node.clone()]);
        if let Some((base, kind)) = base_kind {
            nodes.extend(base.members.iter().cloned());
            if let RoundKind::Reconfigure { next, .. } = kind {
                nodes.extend(next.members.iter().cloned());
            }
        }
        nodes.remove(&self.node_id);
        nodes
    }

    /// `Decide`: record a proposed decision of a round held here (Paxos accept).
    pub(super) fn handle_decide(&mut self, group: &str, from: NodeId, round: RoundId, ballot: Ballot, commit: bool) {
        let Some(state) = self.groups.get(group) else { return };
        if let Some(outcome) = state.final_outcome(&round) {
            return self.answer(group, from, round, outcome);
        }
        if matches!(&state.round, Some(Round::Coordinating(own)) if own.id == round && ballot > coordinator_ballot(&round))
        {
            // A recovery overrules this coordinator's proposal: wait in doubt like any member.
            let reason = format!("member {from} is recovering the round at {ballot}");
            self.give_up_deciding(group, reason);
        }
        let Some(state) = self.groups.get_mut(group) else { return };
        let held = matches!(&state.round, Some(Round::Staged(staged)) if staged.id == round)
            || matches!(&state.round, Some(Round::Coordinating(own)) if own.id == round);
        let (ok, promised) = match state.round.as_mut() {
            Some(Round::Staged(staged)) if staged.id == round => {
                staged.highest_ballot = staged.highest_ballot.max(ballot.number);
                if ballot >= staged.promised {
                    staged.promised = ballot.clone();
                    staged.accepted = Some((ballot.clone(), commit));
                    (true, ballot.clone())
                } else {
                    (false, staged.promised.clone())
                }
            }
            _ if held => (false, Ballot::default()),
            // An acceptor that did not stage the round (it voted no, or never heard of it): a
            // configuration change is decided by a majority, with or without it.
            _ => {
                let acceptor = state.ballots.entry(round.clone()).or_default();
                if ballot >= acceptor.promised {
                    acceptor.promised = ballot.clone();
                    acceptor.accepted = Some((ballot.clone(), commit));
                    (true, ballot.clone())
                } else {
                    (false, acceptor.promised.clone())
                }
            }
        };
        self.trim_ballots(group);
        if ok {
            // Durable before the answer leaves.
            let record = RoundRecord::Accepted { round: round.clone(), ballot: ballot.clone(), commit };
            self.persist_rounds(group, &[record]);
        }
        let message = PeerMessage::Accepted { group: group.to_owned(), round, ballot, ok, promised };
        self.outputs.push_back(Output::Send { to: from, message });
    }

    /// `Accepted`: a member recorded (or refused) a decision this node proposed.
    pub(super) fn handle_accepted(
        &mut self,
        group: &str,
        from: NodeId,
        round: RoundId,
        ballot: Ballot,
        ok: bool,
        promised: Ballot,
    ) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        match state.round.as_mut() {
            Some(Round::Coordinating(own)) if own.id == round && ballot == coordinator_ballot(&round) => {
                let Phase::Deciding { accepted_by } = &mut own.phase else { return };
                if !ok {
                    if promised > ballot {
                        let reason = format!("member {from} promised a recovery of the round a higher ballot");
                        return self.give_up_deciding(group, reason);
                    }
                    // The member cannot record it (it holds the round some other way): a
                    // majority may still come from the others.
                    return;
                }
                accepted_by.insert(from);
                if majority_reached(decision_set(&own.base, &own.kind), accepted_by) {
                    self.finalize_own_commit(group);
                }
            }
            Some(Round::Staged(staged)) if staged.id == round => {
                let set = decision_set(&staged.base, &staged.kind).clone();
                let Some(recovery) = staged.recovery.as_mut().filter(|r| r.ballot == ballot) else { return };
                let Some(value) = recovery.proposal else { return };
                if !ok {
                    staged.recovery = None;
                    staged.next_query = Millis(now.0 + DECISION_TIMEOUT_MS / 2);
                    return;
                }
                recovery.accepted_by.insert(from);
                if majority_reached(&set, &recovery.accepted_by) {
                    self.settle_and_tell(group, &round, value);
                }
            }
            _ => {}
        }
    }

    /// The round's outcome is final and this node knows it: record it, apply or discard the
    /// staged change, and tell every participant.
    fn settle_and_tell(&mut self, group: &str, round: &RoundId, commit: bool) {
        let participants = match self.groups.get(group).and_then(|s| s.round.as_ref()) {
            Some(Round::Staged(staged)) if staged.id == *round => {
                self.participants(round, Some((&staged.base, &staged.kind)))
            }
            Some(Round::Coordinating(own)) if own.id == *round => {
                self.participants(round, Some((&own.base, &own.kind)))
            }
            _ => self.participants(round, None),
        };
        self.handle_final_decision(group, round, commit);
        let outcome = if commit { RoundOutcome::Committed } else { RoundOutcome::Aborted };
        for peer in participants {
            self.answer(group, peer, round.clone(), outcome);
        }
    }

    fn answer(&mut self, group: &str, to: NodeId, round: RoundId, outcome: RoundOutcome) {
        let message = PeerMessage::DecisionAnswer { group: group.to_owned(), round, outcome };
        self.outputs.push_back(Output::Send { to, message });
    }

    /// A final decision of a round, from whoever knows it. A staged change is applied (commit)
    /// or discarded (abort) and the decision recorded; a coordinator answers its caller.
    pub(super) fn handle_final_decision(&mut self, group: &str, round: &RoundId, commit: bool) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let known = state.decisions.iter().any(|(id, _)| id == round);
        if !known {
            state.remember_decision(round.clone(), commit);
        }
        match state.round.as_ref() {
            Some(Round::Staged(staged)) if staged.id == *round => {
                let Some(Round::Staged(staged)) = state.round.take() else { return };
                if commit && !state.doc.has_change(&staged.hash) {
                    match state.doc.apply_changes(std::slice::from_ref(&staged.change)) {
                        Ok(applied) => self.after_remote_apply(group, applied),
                        Err(failure) => {
                            self.after_remote_apply(group, failure.applied);
                            let reason = format!("committed change of round {round} does not apply: {}", failure.error);
                            self.drop_message(round.node.clone(), reason);
                        }
                    }
                }
                self.persist_rounds(group, &[RoundRecord::Decided { round: round.clone(), commit }]);
                self.answer_joins(group);
            }
            Some(Round::Coordinating(own)) if own.id == *round => match (&own.phase, commit) {
                (Phase::Deciding { .. }, true) => self.finalize_own_commit(group),
                (Phase::Deciding { .. }, false) => {
                    let Some(Round::Coordinating(own)) = state.round.take() else { return };
                    self.persist_rounds(group, &[RoundRecord::Decided { round: round.clone(), commit: false }]);
                    let reason = "a recovery by the members aborted the round before its commit was final".to_owned();
                    let error =
                        super::CommandError::RoundAborted { group: group.to_owned(), round: round.to_string(), reason };
                    self.answer_purpose(group, own.purpose, Err(error));
                }
                (Phase::Voting, false) => self.abort_own_round(group, "aborted by the members".to_owned()),
                // Nothing was proposed: a commit cannot be final. Ignore a confused peer.
                (Phase::Voting, true) => {}
            },
            _ => {}
        }
    }

    /// A member in doubt asks what became of `round`.
    pub(super) fn answer_decision_query(
        &mut self,
        group: &str,
        from: NodeId,
        round: RoundId,
        change: ChangeHash,
        kind: &RoundKind,
    ) {
        let outcome = self.outcome_for(group, &round, Some(&change), kind);
        self.answer(group, from, round, outcome);
    }

    /// What this node can say of a round it is asked about. A node that never staged a round
    /// that needs its yes aborts it here and records that (the round cannot commit without it);
    /// a round a majority can decide without it (a configuration change), or any round when
    /// this node is amnesic (its file lost records), gets `Unknown`: recovery decides those.
    fn outcome_for(
        &mut self,
        group: &str,
        round: &RoundId,
        change: Option<&ChangeHash>,
        kind: &RoundKind,
    ) -> RoundOutcome {
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get_mut(group) else { return RoundOutcome::Unknown };
        if change.is_some_and(|hash| state.doc.has_change(hash)) {
            return RoundOutcome::Committed;
        }
        if let Some(outcome) = state.final_outcome(round) {
            return outcome;
        }
        let held = match &state.round {
            Some(Round::Staged(staged)) => staged.id == *round,
            Some(Round::Coordinating(own)) => own.id == *round,
            None => false,
        };
        if held || state.strong.is_amnesic(&state.doc) {
            return RoundOutcome::Unknown;
        }
        if state.ballots.contains_key(round) || !needs_yes_of(kind, &node_id) {
            // This node is (or may become) an acceptor of the round: only a majority decides.
            return RoundOutcome::Unknown;
        }
        if round.node == node_id {
            // A round of this node's (of an earlier run, or dropped with a failed persist) that
            // left no record here: its Decides may have left before its own record was durable
            // (`propose_commit`), so a majority may hold its commit. Only a majority decides.
            return RoundOutcome::Unknown;
        }
        // Never staged here: this node's yes is missing for good.
        state.remember_decision(round.clone(), false);
        self.persist_rounds(group, &[RoundRecord::Decided { round: round.clone(), commit: false }]);
        RoundOutcome::Aborted
    }

    /// Whether `node` takes part in `round`, the round this node holds in `group` (its
    /// coordinator, a member of its configuration, or a member of the next one).
    pub(super) fn takes_part_in(&self, group: &str, round: &RoundId, node: &str) -> bool {
        let Some(state) = self.groups.get(group) else { return false };
        let (base, kind) = match &state.round {
            Some(Round::Staged(staged)) if staged.id == *round => (&staged.base, &staged.kind),
            Some(Round::Coordinating(own)) if own.id == *round => (&own.base, &own.kind),
            _ => return false,
        };
        round.node == node
            || base.contains(node)
            || matches!(kind, RoundKind::Reconfigure { next, .. } if next.contains(node))
    }

    /// `DecisionAnswer`: a peer's knowledge of a round.
    pub(super) fn handle_decision_answer(&mut self, group: &str, round: &RoundId, outcome: RoundOutcome) {
        match outcome {
            RoundOutcome::Committed => self.handle_final_decision(group, round, true),
            RoundOutcome::Aborted => self.handle_final_decision(group, round, false),
            RoundOutcome::Unknown => {}
        }
    }

    /// A round in doubt here, due for another look: ask the participants once; if nobody knows,
    /// recover it at a higher ballot (again after a while if that does not finish).
    pub(super) fn advance_in_doubt(&mut self, group: &str) {
        let now = self.now;
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get_mut(group) else { return };
        let amnesic = state.strong.is_amnesic(&state.doc);
        let Some(Round::Staged(staged)) = state.round.as_mut() else { return };
        staged.next_query = Millis(now.0 + DECISION_TIMEOUT_MS / 2);
        let round = staged.id.clone();
        let participants = {
            let mut nodes = BTreeSet::from([round.node.clone()]);
            nodes.extend(staged.base.members.iter().cloned());
            if let RoundKind::Reconfigure { next, .. } = &staged.kind {
                nodes.extend(next.members.iter().cloned());
            }
            nodes.remove(&node_id);
            nodes
        };
        let kind = staged.kind.clone();
        if staged.queries == 0 || amnesic {
            staged.queries += 1;
            let change = staged.hash.0;
            for peer in participants {
                let message = PeerMessage::DecisionQuery {
                    group: group.to_owned(),
                    round: round.clone(),
                    change,
                    kind: kind.clone(),
                };
                self.outputs.push_back(Output::Send { to: peer, message });
            }
            return;
        }
        // Phase 1 of a recovery: a ballot above every one seen, promised here first.
        let number = staged
            .highest_ballot
            .max(staged.promised.number)
            .max(staged.accepted.as_ref().map_or(0, |(ballot, _)| ballot.number))
            + 1;
        let ballot = Ballot { number, node: node_id.clone() };
        staged.highest_ballot = number;
        staged.promised = ballot.clone();
        let set = decision_set(&staged.base, &staged.kind).clone();
        let mut promises = BTreeMap::new();
        if set.contains(&node_id) {
            promises.insert(node_id.clone(), staged.accepted.clone());
        }
        staged.recovery =
            Some(Recovery { ballot: ballot.clone(), promises, proposal: None, accepted_by: BTreeSet::new() });
        self.persist_rounds(group, &[RoundRecord::Promised { round: round.clone(), ballot: ballot.clone() }]);
        for peer in set.iter().filter(|m| **m != node_id) {
            let message = PeerMessage::Recover {
                group: group.to_owned(),
                round: round.clone(),
                ballot: ballot.clone(),
                kind: kind.clone(),
            };
            self.outputs.push_back(Output::Send { to: peer.clone(), message });
        }
        self.check_promises(group);
    }

    /// `Recover`: promise the ballot (if it is the highest) and say what was accepted; or give
    /// the outcome when it is known or can be decided here.
    pub(super) fn handle_recover(
        &mut self,
        group: &str,
        from: NodeId,
        round: RoundId,
        ballot: Ballot,
        kind: &RoundKind,
    ) {
        if matches!(self.groups.get(group).and_then(|s| s.round.as_ref()), Some(Round::Coordinating(own)) if own.id == round)
        {
            match self.groups.get(group).and_then(|s| s.round.as_ref()) {
                Some(Round::Coordinating(own)) if matches!(own.phase, Phase::Voting) => {
                    self.abort_own_round(group, format!("member {from} gave up waiting and recovers the round"));
                }
                _ => self.give_up_deciding(group, format!("member {from} is recovering the round at {ballot}")),
            }
        }
        let Some(state) = self.groups.get_mut(group) else { return };
        let reply = match state.round.as_mut() {
            Some(Round::Staged(staged)) if staged.id == round => {
                staged.highest_ballot = staged.highest_ballot.max(ballot.number);
                if ballot > staged.promised {
                    staged.promised = ballot.clone();
                    Some((true, staged.accepted.clone(), ballot.clone()))
                } else {
                    Some((false, staged.accepted.clone(), staged.promised.clone()))
                }
            }
            _ => None,
        };
        match reply {
            Some((ok, accepted, promised)) => {
                if ok {
                    let record = RoundRecord::Promised { round: round.clone(), ballot: ballot.clone() };
                    self.persist_rounds(group, &[record]);
                }
                let message = PeerMessage::Promise { group: group.to_owned(), round, ballot, ok, accepted, promised };
                self.outputs.push_back(Output::Send { to: from, message });
            }
            None => {
                let outcome = self.outcome_for(group, &round, None, kind);
                if outcome != RoundOutcome::Unknown {
                    return self.answer(group, from, round, outcome);
                }
                let node_id = self.node_id.clone();
                let Some(state) = self.groups.get_mut(group) else { return };
                if state.strong.is_amnesic(&state.doc) && !state.ballots.contains_key(&round) {
                    // It may have promised or accepted this round before its file lost records.
                    return self.answer(group, from, round, RoundOutcome::Unknown);
                }
                if needs_yes_of(kind, &node_id) && !state.ballots.contains_key(&round) {
                    return self.answer(group, from, round, RoundOutcome::Unknown);
                }
                // An acceptor of a round it did not stage: promise like any other.
                let acceptor = state.ballots.entry(round.clone()).or_default();
                let ok = ballot > acceptor.promised;
                if ok {
                    acceptor.promised = ballot.clone();
                }
                let (accepted, promised) = (acceptor.accepted.clone(), acceptor.promised.clone());
                self.trim_ballots(group);
                if ok {
                    let record = RoundRecord::Promised { round: round.clone(), ballot: ballot.clone() };
                    self.persist_rounds(group, &[record]);
                }
                let message = PeerMessage::Promise { group: group.to_owned(), round, ballot, ok, accepted, promised };
                self.outputs.push_back(Output::Send { to: from, message });
            }
        }
    }

    /// Keeps the acceptor state of at most [`DECISIONS_KEPT`](crate::limits::DECISIONS_KEPT) undecided rounds (the oldest go:
    /// a round that old was decided long ago).
    fn trim_ballots(&mut self, group: &str) {
        let Some(state) = self.groups.get_mut(group) else { return };
        while state.ballots.len() > crate::limits::DECISIONS_KEPT {
            state.ballots.pop_first();
        }
    }

    /// `Promise`: a member promised (or refused) this node's recovery ballot.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn handle_promise(
        &mut self,
        group: &str,
        from: NodeId,
        round: RoundId,
        ballot: Ballot,
        ok: bool,
        accepted: Option<(Ballot, bool)>,
        promised: Ballot,
    ) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Staged(staged)) = state.round.as_mut() else { return };
        if staged.id != round {
            return;
        }
        staged.highest_ballot = staged.highest_ballot.max(promised.number);
        let Some(recovery) = staged.recovery.as_mut().filter(|r| r.ballot == ballot && r.proposal.is_none()) else {
            return;
        };
        if !ok {
            staged.recovery = None;
            staged.next_query = Millis(now.0 + DECISION_TIMEOUT_MS / 2);
            return;
        }
        recovery.promises.insert(from, accepted);
        self.check_promises(group);
    }

    /// With promises from a majority, phase 2: propose the decision of the highest ballot any
    /// of them accepted, or abort when none accepted one.
    fn check_promises(&mut self, group: &str) {
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(Round::Staged(staged)) = state.round.as_mut() else { return };
        let set = decision_set(&staged.base, &staged.kind).clone();
        let Some(recovery) = staged.recovery.as_mut().filter(|r| r.proposal.is_none()) else { return };
        let promised: BTreeSet<NodeId> = recovery.promises.keys().cloned().collect();
        if !majority_reached(&set, &promised) {
            return;
        }
        let value =
            recovery.promises.values().flatten().max_by(|a, b| a.0.cmp(&b.0)).is_some_and(|(_, commit)| *commit);
        recovery.proposal = Some(value);
        let ballot = recovery.ballot.clone();
        if set.contains(&node_id) {
            recovery.accepted_by.insert(node_id.clone());
        }
        staged.accepted = Some((ballot.clone(), value));
        let round = staged.id.clone();
        let done = majority_reached(&set, &recovery.accepted_by);
        self.persist_rounds(
            group,
            &[RoundRecord::Accepted { round: round.clone(), ballot: ballot.clone(), commit: value }],
        );
        if done {
            return self.settle_and_tell(group, &round, value);
        }
        for peer in set.iter().filter(|m| **m != node_id) {
            let message = PeerMessage::Decide {
                group: group.to_owned(),
                round: round.clone(),
                ballot: ballot.clone(),
                commit: value,
            };
            self.outputs.push_back(Output::Send { to: peer.clone(), message });
        }
    }

    /// After changes arrived by sync (or a commit applied here): a staged round whose change is
    /// now in the document committed; one whose position was taken by another change aborted
    /// (strong changes enter documents only once final, and one position holds one change).
    pub(super) fn settle_round_by_sync(&mut self, group: &str) {
        let Some(state) = self.groups.get(group) else { return };
        let (id, hash, deps) = match &state.round {
            Some(Round::Staged(staged)) => (staged.id.clone(), staged.hash, &staged.deps),
            Some(Round::Coordinating(own)) => (own.id.clone(), own.hash, &own.deps),
            None => return,
        };
        if state.doc.has_change(&hash) {
            if let Some(Round::Coordinating(own)) = &state.round
                && matches!(own.phase, Phase::Voting)
            {
                return;
            }
            return self.handle_final_decision(group, &id, true);
        }
        let moved_on =
            deps.iter().all(|dep| state.doc.has_change(dep)) && !super::round::builds_on_heads(&state.doc, deps);
        if moved_on {
            match &state.round {
                Some(Round::Coordinating(own)) if matches!(own.phase, Phase::Voting) => {
                    self.abort_own_round(group, "another change committed at this position first".to_owned());
                }
                _ => self.handle_final_decision(group, &id, false),
            }
        }
    }

    /// Restores a round found staged in the group file at start (in doubt, asked about at
    /// once), unless what the document holds already settles it.
    pub(super) fn restore_round(&mut self, group: &str, staged: Option<StagedRound>) {
        let Some(StagedRound { round, change, kind, configuration, promised, accepted }) = staged else { return };
        let Ok(decoded) = crate::exchange::decode_change(&change) else { return };
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        // This node's own round staged without its acceptance (an append torn after the Staged
        // record, or a file of an older konord) is in doubt like any other: its Decides may
        // have left before its record was durable (`propose_commit`).
        let Some(base) = configuration.or_else(|| state.doc.configuration().cloned()) else { return };
        state.round_lamport = state.round_lamport.max(round.lamport);
        let mut deps = decoded.deps().to_vec();
        deps.sort();
        let highest_ballot = promised.number.max(accepted.as_ref().map_or(0, |(b, _)| b.number));
        state.round = Some(Round::Staged(Box::new(Staged {
            id: round,
            change,
            hash: decoded.hash(),
            deps,
            kind,
            base,
            promised,
            accepted,
            next_query: now,
            queries: 0,
            highest_ballot,
            recovery: None,
        })));
        self.settle_round_by_sync(group);
    }
}
