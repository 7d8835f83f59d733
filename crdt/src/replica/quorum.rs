//! Eventual commits (SPEC F9, F10): a local write answers once a live quorum of the group's
//! members holds it durably, counted from direct acks and from heads gossiped by members.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;

use super::{CommandError, CommandId, CommandOutcome, CommitReceipt, GroupGossip, NodeId, Replica};
use crate::limits::COMMIT_TIMEOUT_MS;
use crate::time::Millis;

/// A local write waiting for its quorum.
#[derive(Debug)]
pub(super) struct PendingCommit {
    receipt: CommitReceipt,
    change: ChangeHash,
    acked: BTreeSet<NodeId>,
    waiting_for: BTreeSet<NodeId>,
    needed: usize,
    pub(super) deadline: Millis,
}

/// A group's quorum as this node computes it (`konorctl status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumInfo {
    /// Members: nodes whose gossip proves they hold the group, and this node.
    pub members: Vec<NodeId>,
    /// Members live by this node's failure detector and not leaving, members it cannot judge
    /// yet (counted as live members that have not acknowledged), and this node.
    pub live: Vec<NodeId>,
    /// The members in `live` that the failure detector cannot judge yet.
    pub unknown: Vec<NodeId>,
    /// `floor(live / 2) + 1`.
    pub quorum: usize,
    /// The last local write: its version label and the nodes that acknowledged it.
    pub last_commit: Option<(String, Vec<NodeId>)>,
    /// True when reads are fenced (strong group catching up or in doubt): served as stale.
    pub fenced: bool,
    /// Why reads are fenced.
    pub fenced_reason: Option<String>,
    /// A strong group's configuration.
    pub configuration: Option<crate::configuration::Configuration>,
}

/// `floor(live / 2) + 1`.
pub fn quorum_of(live: usize) -> usize {
    live / 2 + 1
}

impl PendingCommit {
    /// The group written.
    pub(super) fn group(&self) -> &str {
        &self.receipt.group
    }
}

impl Replica {
    /// Members, live members, quorum and the last commit of `group`.
    pub fn quorum_info(&self, group: &str) -> Option<QuorumInfo> {
        let state = self.groups.get(group)?;
        let mut members = vec![self.node_id.clone()];
        let mut live = vec![self.node_id.clone()];
        let mut unknown = Vec::new();
        for (node, liveness) in self.member_liveness(group) {
            match liveness {
                super::PeerLiveness::Live => live.push(node.clone()),
                // Not judged yet: counted as a live member that has not acknowledged.
                super::PeerLiveness::Unknown => {
                    live.push(node.clone());
                    unknown.push(node.clone());
                }
                super::PeerLiveness::Dead => {}
            }
            members.push(node);
        }
        members.sort();
        live.sort();
        let quorum = quorum_of(live.len());
        Some(QuorumInfo {
            members,
            live,
            unknown,
            quorum,
            last_commit: state.last_commit.clone(),
            fenced: self.is_fenced(group),
            fenced_reason: self.fencing_reason(group),
            configuration: state.doc.configuration().cloned(),
        })
    }

    /// Answers the write at once when the writer alone is a quorum, else waits for acks.
    pub(super) fn await_quorum(
        &mut self,
        id: CommandId,
        receipt: CommitReceipt,
        change: ChangeHash,
        live: Vec<NodeId>,
    ) {
        let needed = quorum_of(live.len() + 1);
        let pending = PendingCommit {
            receipt,
            change,
            acked: BTreeSet::from([self.node_id.clone()]),
            waiting_for: live.into_iter().collect(),
            needed,
            deadline: Millis(self.now.0 + COMMIT_TIMEOUT_MS),
        };
        self.commits.insert(id, pending);
        // Only the new write: the others were counted when they, or the gossip, came in.
        self.count_gossip_acks_of(&[id]);
        self.finish_commits();
    }

    /// A member says these changes are durable on it.
    pub(super) fn handle_ack(&mut self, group: &str, from: &NodeId, changes: &[[u8; 32]]) {
        for pending in self.commits.values_mut() {
            if pending.receipt.group == group && changes.contains(&pending.change.0) {
                pending.acked.insert(from.clone());
            }
        }
        self.finish_commits();
    }

    /// Counts members whose gossiped durable heads include a pending change (they got it by
    /// sync rather than by push, or their direct ack was lost).
    pub(super) fn count_gossip_acks(&mut self) {
        let ids: Vec<CommandId> = self.commits.keys().copied().collect();
        self.count_gossip_acks_of(&ids);
        self.finish_commits();
    }

    /// Recounts the pending writes of `group` after changes arrived: a member's gossiped heads
    /// may name a change that was not here before, and could not count until it was.
    pub(super) fn count_gossip_acks_in(&mut self, group: &str) {
        let ids: Vec<CommandId> =
            self.commits.iter().filter(|(_, pending)| pending.group() == group).map(|(id, _)| *id).collect();
        if ids.is_empty() {
            return;
        }
        self.count_gossip_acks_of(&ids);
        self.finish_commits();
    }

    /// Adds to each of the pending writes `ids` the members whose gossiped heads include it.
    /// Each group's members are read once (a proof check each), and a member that acked is
    /// not asked again: with many writes waiting, this ran for every write and every member
    /// at every new write (a tenth of a daemon's time with 16 writers, issue 14).
    fn count_gossip_acks_of(&mut self, ids: &[CommandId]) {
        let mut members_of: BTreeMap<String, Vec<(NodeId, GroupGossip)>> = BTreeMap::new();
        for id in ids {
            let Some(pending) = self.commits.get(id) else { continue };
            let group = pending.receipt.group.as_str();
            let Some(state) = self.groups.get(group) else { continue };
            if !members_of.contains_key(group) {
                let members = self.members(group).into_iter().map(|(node, _, gossip)| (node, gossip)).collect();
                members_of.insert(group.to_owned(), members);
            }
            let holders: Vec<NodeId> = members_of[group]
                .iter()
                .filter(|(node, gossip)| {
                    !pending.acked.contains(node) && state.doc.heads_include(&gossip.heads, &pending.change)
                })
                .map(|(node, _)| node.clone())
                .collect();
            if let Some(pending) = self.commits.get_mut(id) {
                pending.acked.extend(holders);
            }
        }
    }

    fn finish_commits(&mut self) {
        let done: Vec<CommandId> =
            self.commits.iter().filter(|(_, p)| p.acked.len() >= p.needed).map(|(id, _)| *id).collect();
        for id in done {
            let Some(pending) = self.commits.remove(&id) else { continue };
            let mut receipt = pending.receipt;
            receipt.acked_by = pending.acked.into_iter().collect();
            if let Some(state) = self.groups.get_mut(&receipt.group) {
                state.last_commit = Some((receipt.label.clone(), receipt.acked_by.clone()));
            }
            self.reply(id, Ok(CommandOutcome::Committed(receipt)));
        }
    }

    /// Answers writes whose quorum did not come in time.
    pub(super) fn expire_commits(&mut self) {
        let now = self.now;
        let expired: Vec<CommandId> =
            self.commits.iter().filter(|(_, p)| p.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let Some(pending) = self.commits.remove(&id) else { continue };
            let missing = pending.waiting_for.difference(&pending.acked).cloned().collect();
            let acked_by: Vec<NodeId> = pending.acked.into_iter().collect();
            if let Some(state) = self.groups.get_mut(&pending.receipt.group) {
                state.last_commit = Some((pending.receipt.label.clone(), acked_by.clone()));
            }
            let error = CommandError::NotCommitted {
                group: pending.receipt.group,
                version: pending.receipt.label,
                acked_by,
                missing,
                needed: pending.needed,
                timeout_ms: COMMIT_TIMEOUT_MS,
            };
            self.reply(id, Err(error));
        }
    }
}
