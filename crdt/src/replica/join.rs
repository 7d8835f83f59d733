//! The join handshake on both sides. The joiner asks a live peer that claims the group
//! (`JoinRequest`), answers its `JoinChallenge` with a `JoinProof` (an HMAC under the group key
//! over both nonces) and adopts the snapshot of the `JoinGrant` once the granter's gossiped
//! membership proof verifies; it tries the next claimant after `JOIN_STEP_TIMEOUT_MS` and gives
//! up after `JOIN_TIMEOUT_MS`. The member challenges, checks the proof, counts the joiner as
//! announced and grants. What follows a grant (the announcement, a strong group's seat) is in
//! configuration.rs.

use std::collections::BTreeSet;

use super::{CommandError, CommandId, NodeId, Output, Replica, membership_proof};
use crate::group::GroupDoc;
use crate::join::{GroupKey, join_proof, verify_join_proof};
use crate::keyring::{KeyId, Keyring};
use crate::limits::{JOIN_STEP_TIMEOUT_MS, JOIN_TIMEOUT_MS};
use crate::peer_message::{Nonce, PeerMessage};
use crate::time::Millis;

/// A join this node runs, waiting for a member to grant it.
#[derive(Debug)]
pub(super) struct PendingJoin {
    id: CommandId,
    key: GroupKey,
    repair: bool,
    nonce: Nonce,
    tried: BTreeSet<NodeId>,
    /// Members that refused (a member that has not moved to a rotated key refuses the new
    /// one): the join fails once every live claimant refused.
    refused: BTreeSet<NodeId>,
    asking: Option<NodeId>,
    pub(super) step_deadline: Millis,
    pub(super) deadline: Millis,
}

/// A challenge this node sent a joiner, waiting for its proof.
#[derive(Debug)]
pub(super) struct Challenge {
    joiner_nonce: Nonce,
    member_nonce: Nonce,
    deadline: Millis,
}

impl Replica {
    /// Starts a join of `name` (a local command).
    pub(super) fn start_join(&mut self, id: CommandId, name: String, key: GroupKey, repair: bool) {
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
            refused: BTreeSet::new(),
            asking: None,
            step_deadline: self.now,
            deadline: Millis(self.now.0 + JOIN_TIMEOUT_MS),
        };
        self.joins.insert(name.clone(), join);
        self.advance_join(&name);
    }

    /// Asks the next live peer that claims the group, or gives up at the deadline.
    pub(super) fn advance_join(&mut self, name: &str) {
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
            .filter(|(node, peer)| {
                peer.is_live()
                    && peer.groups.contains_key(name)
                    && !join.tried.contains(*node)
                    && !join.refused.contains(*node)
            })
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

    pub(super) fn serve_join_request(&mut self, from: NodeId, group: String, joiner_nonce: Nonce) {
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

    pub(super) fn answer_challenge(&mut self, from: NodeId, group: String, member_nonce: Nonce) {
        let Some(join) = self.joins.get(&group).filter(|join| join.asking.as_ref() == Some(&from)) else {
            return self.drop_message(from, format!("unexpected join challenge for {group:?}"));
        };
        let proof = join_proof(&join.key, &group, &self.node_id, &join.nonce, &member_nonce);
        self.outputs.push_back(Output::Send { to: from, message: PeerMessage::JoinProof { group, proof } });
    }

    pub(super) fn check_join_proof(&mut self, from: NodeId, group: String, proof: [u8; 32]) {
        let Some(challenge) = self.challenges.remove(&(from.clone(), group.clone())) else {
            return self.drop_message(from, format!("join proof for {group:?} without a challenge"));
        };
        let Some(state) = self.groups.get(&group) else { return };
        let valid = verify_join_proof(
            state.keys.key(),
            &group,
            &from,
            &challenge.joiner_nonce,
            &challenge.member_nonce,
            &proof,
        );
        if !valid {
            let message = PeerMessage::JoinRefused { group, reason: "wrong group key".to_owned() };
            return self.outputs.push_back(Output::Send { to: from, message });
        }
        if self.behind(&group) {
            // This member's key was rotated and it has not moved yet: no grant (the joiner asks
            // another member after its step).
            return self.drop_message(from, format!("join of {group:?} under a key that was rotated"));
        }
        // A join answered here clears a record of leaving, but not just after a start: this
        // node may not have heard yet that the key moved on.
        if self.now.0 >= crate::limits::START_GRACE_MS {
            self.rejoined(&group, &from);
        }
        let mut members: Vec<NodeId> = self.member_liveness(&group).into_keys().collect();
        members.push(self.node_id.clone());
        let Some(state) = self.groups.get_mut(&group) else { return };
        // The joiner proved it holds the key: count it from now on, before gossip says so.
        state.announced.insert(from.clone(), self.now);
        let message = PeerMessage::JoinGrant { group, mode: state.doc.mode(), snapshot: state.doc.save(), members };
        self.outputs.push_back(Output::Send { to: from, message });
    }

    pub(super) fn finish_join(&mut self, from: NodeId, group: String, snapshot: &[u8], granter_members: Vec<NodeId>) {
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
        // The granter's gossip names its key's generation (checked against the key: a wrong
        // one would only make this node ask for a key it has).
        let generation = self
            .membership
            .peers
            .get(&from)
            .and_then(|peer| peer.groups.get(&group))
            .and_then(|gossip| gossip.key)
            .filter(|id| *id == KeyId::of(&join.key, &group, id.generation))
            .map_or(0, |id| id.generation);
        let keys = Keyring::first(join.key.clone()).at_generation(generation);
        let Some(join) = self.joins.remove(&group) else { return };
        match self.adopt_group(group.clone(), doc, keys) {
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

    /// A member refused this node's join: the join command fails.
    pub(super) fn handle_join_refused(&mut self, from: NodeId, group: String, reason: String) {
        let Some(join) = self.joins.get_mut(&group).filter(|join| join.asking.as_ref() == Some(&from)) else {
            return self.drop_message(from, format!("unexpected join refusal for {group:?}"));
        };
        join.refused.insert(from.clone());
        join.asking = None;
        join.step_deadline = self.now;
        // Another member may hold the key this one refused (it has not moved to a rotated key
        // yet): ask the others; fail once every live claimant refused.
        let others = self
            .membership
            .peers
            .iter()
            .any(|(node, peer)| peer.is_live() && peer.groups.contains_key(&group) && !join.refused.contains(node));
        if others {
            return self.advance_join(&group);
        }
        if let Some(join) = self.joins.remove(&group) {
            self.reply(join.id, Err(CommandError::JoinRefused { group, member: from, reason }));
        }
    }

    /// Forgets the challenges whose joiner did not answer in time.
    pub(super) fn expire_challenges(&mut self) {
        let now = self.now;
        self.challenges.retain(|_, challenge| challenge.deadline > now);
    }
}
