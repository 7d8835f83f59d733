//! Strong groups (SPEC F11): changes of the configuration. A node holding a strong group but
//! not in its configuration (a new member, or one evicted while it was away) proposes its own
//! addition once it holds the latest commit; members dead longer than the group's `evict_after`
//! (or that announced they left) are evicted by any member, if a majority agrees; a member
//! leaves through a configuration change of its own; an operator removes a member, or forces the
//! removal when no majority is left (a two-member group). Each change is one strong round
//! (`round.rs`), so it is ordered with the writes. Also the joiner's announcement, so that the
//! members count a new member of an eventual group before gossip tells them.

use std::collections::BTreeSet;

use super::round::Purpose;
use super::{CommandError, CommandId, CommandOutcome, NodeId, Output, PersistOp, Replica};
use crate::group::{CommitMeta, Mode};
use crate::limits::ANNOUNCE_TIMEOUT_MS;
use crate::peer_message::{PeerMessage, RoundId, RoundOutcome};
use crate::time::Millis;

/// How long an announced member counts without gossip confirming it: gossip spreads within
/// seconds, so a minute means the announcement was stale (the node left or died).
const ANNOUNCED_KEEP_MS: u64 = 60_000;

/// A join of an eventual group waiting for the members to take the announcement.
#[derive(Debug)]
pub(super) struct Announcing {
    pub(super) command: CommandId,
    pub(super) version: String,
    pub(super) waiting: BTreeSet<NodeId>,
    pub(super) deadline: Millis,
}

impl Replica {
    /// Metadata of a version this node writes on its own (upkeep), stamped with the wall clock.
    fn upkeep_meta(&self, message: String) -> CommitMeta {
        CommitMeta::new(format!("konord@{}", self.node_id), message, self.wall_clock())
    }

    /// Starts the configuration changes this node owes: its own addition when it holds a strong
    /// group outside the configuration, evictions of seats no longer held.
    pub(super) fn maintain_configurations(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let Some(state) = self.groups.get(&name) else { continue };
            if state.doc.mode() != Mode::Strong
                || state.round.is_some()
                || !state.queued.is_empty()
                || state.leaving
                || state.strong.next_reconfigure > now
            {
                continue;
            }
            let Some(configuration) = state.doc.configuration().cloned() else { continue };
            let evict_after = state.doc.policy().evict_after;
            if !configuration.contains(&self.node_id) {
                let mut members = configuration.members.clone();
                members.insert(self.node_id.clone());
                let next = configuration.next(members);
                let meta = self.upkeep_meta(format!("add {} to the configuration", self.node_id));
                if let Some(state) = self.groups.get_mut(&name) {
                    state.strong.backoff(now);
                }
                let _ = self.start_reconfiguration(&name, next, false, Purpose::Join, &meta);
                continue;
            }
            let granted = &state.strong.granted;
            let gone: BTreeSet<NodeId> = configuration
                .members
                .iter()
                .filter(|m| **m != self.node_id && self.seat_abandoned(&name, m, evict_after))
                // This node promised not to help remove a member while its lease runs.
                .filter(|m| granted.get(*m).is_none_or(|until| *until <= now))
                .cloned()
                .collect();
            // The rest must still be a majority of the old configuration to agree; otherwise
            // only an operator's forced removal helps (a two-member group).
            if gone.is_empty() || configuration.members.len() - gone.len() < configuration.majority() {
                continue;
            }
            let members = configuration.members.difference(&gone).cloned().collect();
            let next = configuration.next(members);
            let list: Vec<&str> = gone.iter().map(String::as_str).collect();
            let meta = self.upkeep_meta(format!(
                "evict [{}]: dead longer than evict_after ({} ms) or left",
                list.join(", "),
                evict_after.0
            ));
            if let Some(state) = self.groups.get_mut(&name) {
                state.strong.backoff(now);
            }
            let _ = self.start_reconfiguration(&name, next, false, Purpose::Evict, &meta);
        }
    }

    /// Answers a join waiting for this node's seat in the configuration: once it has it, or at
    /// the join's deadline (the node keeps trying).
    pub(super) fn answer_joins(&mut self, group: &str) {
        let now = self.now;
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some((command, deadline)) = state.strong.joining else { return };
        let seated = state.doc.configuration().is_some_and(|c| c.contains(&node_id));
        if seated {
            state.strong.joining = None;
            let version = state.doc.latest_label();
            self.reply(command, Ok(CommandOutcome::Joined { name: group.to_owned(), version }));
        } else if deadline <= now {
            state.strong.joining = None;
            let configuration = state.doc.configuration().map(ToString::to_string).unwrap_or_default();
            self.reply(
                command,
                Err(CommandError::NotAMember { group: group.to_owned(), node: node_id, configuration }),
            );
        }
    }

    /// Answers pending joins whose deadline passed (strong: not yet seated; eventual: not every
    /// member took the announcement, which is fine).
    pub(super) fn expire_joins(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            self.answer_joins(&name);
            let Some(state) = self.groups.get_mut(&name) else { continue };
            if state.announcing.as_ref().is_some_and(|a| a.deadline <= now)
                && let Some(announcing) = state.announcing.take()
            {
                let outcome = CommandOutcome::Joined { name: name.clone(), version: announcing.version };
                self.reply(announcing.command, Ok(outcome));
            }
            if let Some(state) = self.groups.get_mut(&name) {
                state.announced.retain(|_, since| since.0 + ANNOUNCED_KEEP_MS > now.0);
            }
        }
    }

    /// After a join: tell the members this node holds the group, and answer the join once it
    /// counts (eventual: the members took the announcement; strong: the node has its seat).
    pub(super) fn announce_and_answer(&mut self, group: &str, command: CommandId, granter_members: Vec<NodeId>) {
        let now = self.now;
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get(group) else { return };
        let mut members: BTreeSet<NodeId> = granter_members.into_iter().collect();
        members.extend(self.members(group).into_iter().map(|(node, _, _)| node));
        if let Some(configuration) = state.doc.configuration() {
            members.extend(configuration.members.iter().cloned());
        }
        members.remove(&node_id);
        let proof = state.proof;
        // The granter verified these members' proofs (and a strong group's configuration names
        // its members): count them before their gossip reaches this node, or their first
        // pushes and prepares would be dropped as coming from non-members.
        let now_members = members.clone();
        for member in &members {
            let message = PeerMessage::Announce { group: group.to_owned(), proof };
            self.outputs.push_back(Output::Send { to: member.clone(), message });
        }
        let Some(state) = self.groups.get_mut(group) else { return };
        for member in now_members {
            state.announced.entry(member).or_insert(now);
        }
        // Saved before the join is answered: a node that restarts at once still knows whom to
        // trust (a rotated key is asked only of members it knew, rotation.rs).
        self.remember_members();
        let Some(state) = self.groups.get_mut(group) else { return };
        let version = state.doc.latest_label();
        if state.doc.mode() == Mode::Strong {
            state.strong.joining = Some((command, Millis(now.0 + crate::limits::JOIN_TIMEOUT_MS)));
            state.strong.next_reconfigure = now;
            self.answer_joins(group);
        } else if members.is_empty() {
            self.reply(command, Ok(CommandOutcome::Joined { name: group.to_owned(), version }));
        } else {
            state.announcing =
                Some(Announcing { command, version, waiting: members, deadline: Millis(now.0 + ANNOUNCE_TIMEOUT_MS) });
        }
    }

    /// A new member announces itself: count it from now on (its proof checked).
    pub(super) fn handle_announce(&mut self, group: &str, from: NodeId, proof: [u8; 32]) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        if proof != super::membership_proof(state.keys.key(), group, &from) {
            return self.drop_message(from, format!("announcement for {group:?} with a wrong membership proof"));
        }
        if self.behind(group) {
            return self.drop_message(from, format!("announcement for {group:?} under a key that was rotated"));
        }
        // An announcement carries no nonce (it can be replayed): it does not clear a record of
        // leaving, only a join answered here does (join.rs).
        let Some(state) = self.groups.get_mut(group) else { return };
        state.announced.insert(from.clone(), now);
        self.outputs
            .push_back(Output::Send { to: from, message: PeerMessage::AnnounceAck { group: group.to_owned() } });
        self.mark_divergence();
    }

    /// A member took this node's announcement.
    pub(super) fn handle_announce_ack(&mut self, group: &str, from: &NodeId) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let Some(announcing) = state.announcing.as_mut() else { return };
        announcing.waiting.remove(from);
        if announcing.waiting.is_empty()
            && let Some(announcing) = state.announcing.take()
        {
            let outcome = CommandOutcome::Joined { name: group.to_owned(), version: announcing.version };
            self.reply(announcing.command, Ok(outcome));
        }
    }

    /// `group leave`: a strong group's member leaves its configuration first (a round of its
    /// own); with `force`, or for an eventual group or a configuration of one, the node drops
    /// the group at once. A round this node coordinates and that is still voting is aborted
    /// (its caller answered, its members told).
    pub(super) fn leave_group(&mut self, command: CommandId, name: String, force: bool) {
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get(&name) else {
            return self.reply(command, Err(CommandError::UnknownGroup(name)));
        };
        let seated_with_others = state.doc.mode() == Mode::Strong
            && state.doc.configuration().is_some_and(|c| c.contains(&node_id) && c.members.len() > 1);
        if !seated_with_others || force {
            return self.remove_group_locally(&name, command);
        }
        self.abort_own_round(&name, format!("{node_id} is leaving the group"));
        if self.round_in_doubt(&name) {
            let round = self.groups.get(&name).and_then(|s| s.round.as_ref()).map(|r| r.id().to_string());
            let reason = format!(
                "in doubt about round {} (it settles within seconds once the members are reachable); retry, or leave with --force (the others then evict this node)",
                round.unwrap_or_default()
            );
            return self.reply(command, Err(CommandError::LeaveFailed { group: name, reason }));
        }
        let Some(configuration) = self.groups.get(&name).and_then(|s| s.doc.configuration().cloned()) else { return };
        let mut members = configuration.members.clone();
        members.remove(&node_id);
        let next = configuration.next(members);
        let meta = self.upkeep_meta(format!("{node_id} leaves the group"));
        if let Some(state) = self.groups.get_mut(&name) {
            state.leaving = true;
        }
        if let Err(error) = self.start_reconfiguration(&name, next, false, Purpose::Leave { command }, &meta) {
            if let Some(state) = self.groups.get_mut(&name) {
                state.leaving = false;
            }
            self.reply(command, Err(CommandError::LeaveFailed { group: name, reason: error.to_string() }));
        }
    }

    /// Drops a group here: its round ends (aborted if still voting; otherwise the members settle
    /// it without this node), queued writes are refused, the file moves to quarantine.
    pub(super) fn remove_group_locally(&mut self, name: &str, command: CommandId) {
        let node_id = self.node_id.clone();
        self.abort_own_round(name, format!("{node_id} left the group"));
        self.give_up_deciding(name, format!("{node_id} left the group before the commit was final"));
        let Some(state) = self.groups.remove(name) else {
            return self.reply(command, Err(CommandError::UnknownGroup(name.to_owned())));
        };
        self.left_lamports.insert(name.to_owned(), state.round_lamport);
        self.left_revisions.insert(name.to_owned(), state.revision);
        let members = state.doc.configuration().map(|c| c.members.clone()).unwrap_or_default();
        self.departed.retain(|(group, _)| group != name);
        self.departed.push_back((name.to_owned(), super::Departed { members, decisions: state.decisions }));
        while self.departed.len() > crate::limits::DEPARTED_GROUPS_KEPT {
            self.departed.pop_front();
        }
        for write in state.queued {
            let error = CommandError::UnknownGroup(name.to_owned());
            self.reply(write.command, Err(error));
        }
        if let Some((join, _)) = state.strong.joining {
            self.reply(join, Err(CommandError::UnknownGroup(name.to_owned())));
        }
        self.commits.retain(|_, pending| pending.group() != name);
        self.challenges.retain(|(_, group), _| group != name);
        self.outputs.push_back(Output::Persist(PersistOp::RemoveGroup { group: name.to_owned() }));
        self.outputs.push_back(Output::Publish { group: name.to_owned(), gossip: None });
        self.reply(command, Ok(CommandOutcome::Left { name: name.to_owned() }));
    }

    /// A member left behind asks about a round of a group this node left: the outcome, when
    /// this node knew it (else nothing: the members decide without this node).
    pub(super) fn answer_for_departed(&mut self, group: &str, from: NodeId, round: RoundId) {
        let Some((_, departed)) = self.departed.iter().find(|(name, _)| name == group) else {
            return self.drop_message(from, format!("round message for group {group:?}, not held here"));
        };
        if !departed.members.contains(&from) {
            return self.drop_message(from, format!("round message for left group {group:?} from a non-member"));
        }
        let Some(commit) = departed.decisions.iter().find(|(id, _)| *id == round).map(|(_, commit)| *commit) else {
            return;
        };
        let outcome = if commit { RoundOutcome::Committed } else { RoundOutcome::Aborted };
        let message = PeerMessage::DecisionAnswer { group: group.to_owned(), round, outcome };
        self.outputs.push_back(Output::Send { to: from, message });
    }

    /// `group remove NODE...`: a configuration change without `nodes`, agreed by a majority; with
    /// `force`, agreed by the remaining members alone (when no majority is left: the other member
    /// of a two-member group, or two of three, gone for good).
    pub(super) fn remove_member(
        &mut self,
        command: CommandId,
        group: String,
        nodes: Vec<NodeId>,
        force: bool,
        meta: CommitMeta,
    ) {
        let Some(state) = self.groups.get(&group) else {
            return self.reply(command, Err(CommandError::UnknownGroup(group)));
        };
        let Some(configuration) = state.doc.configuration().cloned() else {
            return self.reply(command, Err(CommandError::NoConfiguration(group)));
        };
        if nodes.is_empty() {
            return self.reply(command, Err(CommandError::BadRequest("name at least one member to remove".to_owned())));
        }
        let mut members = configuration.members.clone();
        for node in &nodes {
            if !configuration.contains(node) {
                let detail = format!("{node} is not a member of configuration {configuration}");
                return self.reply(command, Err(CommandError::BadRequest(detail)));
            }
            if *node == self.node_id {
                let detail = "to remove this node, use `konorctl group leave` on it".to_owned();
                return self.reply(command, Err(CommandError::BadRequest(detail)));
            }
            members.remove(node);
        }
        let next = configuration.next(members);
        if let Err(error) = self.start_reconfiguration(&group, next, force, Purpose::Remove { command }, &meta) {
            self.reply(command, Err(error));
        }
    }
}
