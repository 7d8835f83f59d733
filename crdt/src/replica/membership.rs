//! Who the members of a group are, as this node sees them: peers whose gossiped membership
//! proof verifies under the group key, members that announced themselves since, and (for
//! `START_GRACE_MS` after a start) the members this node knew before. `handle_membership` takes
//! each new view from the shell and lets every concern react to it (sync sessions, dead peers,
//! votes, gossip acks, timers); `remember_members` persists the members known.

use std::collections::{BTreeMap, BTreeSet};

use super::{GroupGossip, MembershipView, NodeId, Output, PeerLiveness, PersistOp, Replica};
use crate::limits::START_GRACE_MS;

impl Replica {
    /// The peers whose verified gossip says they hold `group` (this node excluded).
    pub fn members(&self, group: &str) -> Vec<(NodeId, bool, GroupGossip)> {
        self.claims(group, true)
    }

    /// The peers whose gossip claims `group` under another key than this node's (their proof
    /// does not verify here), with their liveness: members on the way to a rotated key, or
    /// behind one. Not members here: nothing of the group is exchanged with them.
    pub fn other_key_claims(&self, group: &str) -> Vec<(NodeId, bool, GroupGossip)> {
        self.claims(group, false)
    }

    /// The peers whose gossip claims `group` with a proof that verifies here (`verified`) or
    /// does not, with their liveness.
    fn claims(&self, group: &str, verified: bool) -> Vec<(NodeId, bool, GroupGossip)> {
        let Some(state) = self.groups.get(group) else {
            return Vec::new();
        };
        self.membership
            .peers
            .iter()
            .filter_map(|(node, peer)| {
                let gossip = peer.groups.get(group)?;
                (self.proofs.verifies(&gossip.proof, state.keys.key(), group, node) == verified)
                    .then(|| (node.clone(), peer.is_live(), gossip.clone()))
            })
            .collect()
    }

    /// Every member of `group` this node knows of (this node excluded) with its liveness: peers
    /// whose gossiped proof verifies, and members that announced themselves since (a new member
    /// of an eventual group counts before gossip spreads its proof).
    pub fn member_liveness(&self, group: &str) -> BTreeMap<NodeId, PeerLiveness> {
        let Some(state) = self.groups.get(group) else {
            return BTreeMap::new();
        };
        // One pass over the claims (a proof each): those that verify, and those under another key.
        let mut members = BTreeMap::new();
        let mut other_key = Vec::new();
        for (node, peer) in &self.membership.peers {
            let Some(gossip) = peer.groups.get(group) else { continue };
            if self.proofs.verifies(&gossip.proof, state.keys.key(), group, node) {
                members.insert(node.clone(), peer.liveness);
            } else {
                other_key.push((node, peer.liveness));
            }
        }
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
        // Members on another key (a rotation on its way): still members, up but unable to ack
        // until they move, so an eventual write waits for them rather than commit with a
        // quorum of the few that moved first.
        for (node, liveness) in other_key {
            let counted = state.known_members.contains(node)
                || state.keys.entitled().contains(node)
                || state.doc.configuration().is_some_and(|configuration| configuration.contains(node));
            if counted && !members.contains_key(node) && !self.departed(group, node) {
                members.insert(node.clone(), liveness);
            }
        }
        members
    }

    /// Members that may be up (live, or not judged yet): pushes go to them, and eventual
    /// quorums count them.
    pub(super) fn live_members(&self, group: &str) -> Vec<NodeId> {
        self.member_liveness(group)
            .into_iter()
            .filter(|(_, liveness)| *liveness != PeerLiveness::Dead)
            .map(|(node, _)| node)
            .collect()
    }

    /// True when `peer` proved membership of `group`: in gossip, or by announcing itself
    /// (with the same proof) since.
    pub(super) fn is_member(&self, group: &str, peer: &str) -> bool {
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
            .is_some_and(|gossip| self.proofs.verifies(&gossip.proof, state.keys.key(), group, peer))
    }

    /// Takes a new membership view from the shell.
    pub(super) fn handle_membership(&mut self, view: MembershipView) {
        let previous = std::mem::replace(&mut self.membership, view);
        let groups = &self.groups;
        self.proofs.keep_groups(|group| groups.contains_key(group));
        self.reset_sessions_of_changed_peers(&previous);
        // Announced members that gossip now shows (or shows as gone) are gossip's business.
        let (peers, proofs) = (&self.membership.peers, &self.proofs);
        for (name, state) in self.groups.iter_mut() {
            state.announced.retain(|node, _| {
                peers.get(node).is_none_or(|peer| {
                    !peer.left.contains(name)
                        && peer
                            .groups
                            .get(name)
                            .is_none_or(|gossip| !proofs.verifies(&gossip.proof, state.keys.key(), name, node))
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
        self.record_departures(&previous);
        self.ask_for_newer_keys();
        self.handle_tick();
    }

    /// Adds the members gossip and announcements show to what this node knows of each group,
    /// drops the ones that left (or, after the start grace, that gossip no longer knows), and
    /// persists the list when it changed.
    pub(super) fn remember_members(&mut self) {
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
                    && !self.departed(&name, node)
                    // A member that moved to a newer key is still one: this node asks it for
                    // the key (rotation.rs), and trusts only members it knew.
                    && (current.contains(node) || !grace_over || self.holds_newer_key(&name, node))
            });
            // Every member seen is entitled to the group's next key, durably (the keyring),
            // until it leaves: one that is down when the key rotates, or that gossip forgot,
            // or that restarts at that moment, is handed the key when it comes back.
            let newcomers: Vec<NodeId> = current
                .iter()
                .filter(|node| **node != self.node_id && !state.keys.entitled().contains(*node))
                .filter(|node| {
                    !self.departed(&name, node)
                        && !self.membership.peers.get(*node).is_some_and(|p| p.left.contains(&name))
                })
                .cloned()
                .collect();
            if let Some(keys) = state.keys.with_entitled(&newcomers) {
                self.save_keys(&name, keys);
            }
            let Some(state) = self.groups.get_mut(&name) else { continue };
            if known != state.known_members {
                state.known_members = known.clone();
                let members = known.into_iter().collect();
                self.outputs.push_back(Output::Persist(PersistOp::Members { group: name.clone(), members }));
            }
        }
    }
}
