//! Group key rotation (issue 17, item 5). `group rotate-key` makes a new generation here and
//! names the members entitled to it: every member this node knows of (gossip, announcements,
//! a strong group's configuration, the members it remembers, those entitled to the key before)
//! except those that left. From then on the old key admits nobody (joins and membership proofs
//! use the current key), and members that hold an older key see this node's gossip name a newer
//! one: each asks a member it already knew (`KeyRequest`, proving every key it holds without
//! sending any), and a member holding the new key hands it over wrapped under the newest key
//! they share (`KeyGrant`, a MAC under that key binding both nodes, both nonces, the key's id
//! and the entitled list), only if the requester is entitled and has not left. Until it has
//! the key, a member's messages are dropped by those that moved, as if lost: rounds abort and
//! commits wait, nothing is decided on a mixed view.
//!
//! Two rotations at once (on two nodes) make two keys of one generation: the larger key id
//! wins, and the other's holders ask for it like members that missed a rotation (they share the
//! key both replaced).

use std::collections::BTreeSet;

use super::{CommandError, CommandId, CommandOutcome, NodeId, Output, PersistOp, Replica, membership_proof};
use crate::join::GroupKey;
use crate::keyring::{
    GrantContext, KEYRING_ENTITLED_MAX, KEYRING_PREVIOUS_MAX, KeyId, request_proof, verify_request_proof,
};
use crate::limits::JOIN_STEP_TIMEOUT_MS;
use crate::peer_message::{Nonce, PeerMessage};
use crate::time::Millis;

/// A key request this node has out.
#[derive(Debug)]
pub(super) struct KeyAsk {
    to: NodeId,
    nonce: Nonce,
    deadline: Millis,
    /// Members asked since the last success, so each is asked in turn.
    tried: BTreeSet<NodeId>,
}

/// A `KeyGrant`'s fields.
pub(super) struct Grant {
    pub(super) id: KeyId,
    pub(super) under: KeyId,
    pub(super) nonce: Nonce,
    pub(super) wrapped: [u8; 32],
    pub(super) tag: [u8; 32],
    pub(super) entitled: Vec<String>,
}

impl Replica {
    /// `group rotate-key`: a new key, its generation past any this node has seen.
    pub(super) fn rotate_key(&mut self, id: CommandId, group: String, key: GroupKey) {
        let Some(state) = self.groups.get(&group) else {
            return self.reply(id, Err(CommandError::UnknownGroup(group)));
        };
        let newest_seen = self
            .membership
            .peers
            .values()
            .filter_map(|peer| peer.groups.get(&group))
            .map(|gossip| gossip.generation())
            .max()
            .unwrap_or(0);
        let generation = state.keys.generation().max(newest_seen) + 1;
        let mut entitled: BTreeSet<NodeId> = self.member_liveness(&group).into_keys().collect();
        entitled.extend(state.known_members.iter().cloned());
        entitled.extend(state.keys.entitled().iter().cloned());
        if let Some(configuration) = state.doc.configuration() {
            entitled.extend(configuration.members.iter().cloned());
        }
        entitled.retain(|node| !self.has_left(&group, node));
        entitled.insert(self.node_id.clone());
        if entitled.len() > KEYRING_ENTITLED_MAX {
            let error = format!("the group has more than {KEYRING_ENTITLED_MAX} members to hand a key to");
            return self.reply(id, Err(CommandError::TooLarge(error)));
        }
        let keys = state.keys.moved_to(generation, key, entitled);
        let count = keys.entitled().len();
        self.adopt_keys(&group, keys);
        self.reply(id, Ok(CommandOutcome::KeyRotated { group, generation, entitled: count }));
    }

    /// Stores `keys` (durable before anything later is sent) and uses them from now on.
    fn adopt_keys(&mut self, group: &str, keys: crate::keyring::Keyring) {
        let node_id = self.node_id.clone();
        let Some(state) = self.groups.get_mut(group) else { return };
        self.outputs.push_back(Output::Persist(PersistOp::Keys { group: group.to_owned(), keys: keys.clone() }));
        state.proof = membership_proof(keys.key(), group, &node_id);
        state.keys = keys;
        state.key_ask = None;
        // Announcements were proven under the old key.
        state.announced.clear();
        self.publish(group);
        self.mark_divergence();
    }

    /// True when `node` said in gossip that it left `group`.
    fn has_left(&self, group: &str, node: &str) -> bool {
        self.membership.peers.get(node).is_some_and(|peer| peer.left.contains(group))
    }

    /// True when `node`'s gossip names a newer key of `group` than this node holds.
    pub(super) fn holds_newer_key(&self, group: &str, node: &str) -> bool {
        let Some(state) = self.groups.get(group) else { return false };
        let Some(gossip) = self.membership.peers.get(node).and_then(|peer| peer.groups.get(group)) else {
            return false;
        };
        // Generation 0 is published without an id: never newer.
        gossip.key.is_some_and(|theirs| theirs > state.keys.id(group))
    }

    /// For each group where a member this node knew shows a newer key: ask one (in turn, one
    /// request out at a time, another after `JOIN_STEP_TIMEOUT_MS`).
    pub(super) fn ask_for_newer_keys(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let Some(state) = self.groups.get(&name) else { continue };
            if state.key_ask.as_ref().is_some_and(|ask| ask.deadline > now) {
                continue;
            }
            let configuration = state.doc.configuration();
            let tried = state.key_ask.as_ref().map(|ask| ask.tried.clone()).unwrap_or_default();
            let candidates: Vec<NodeId> = self
                .membership
                .peers
                .iter()
                .filter(|(node, peer)| {
                    peer.is_live()
                        && (state.known_members.contains(*node)
                            || configuration.is_some_and(|c| c.contains(node.as_str())))
                        && !peer.left.contains(&name)
                })
                .map(|(node, _)| node.clone())
                .filter(|node| self.holds_newer_key(&name, node))
                .collect();
            let Some(to) = candidates.iter().find(|node| !tried.contains(*node)).or(candidates.first()).cloned() else {
                if let Some(state) = self.groups.get_mut(&name) {
                    state.key_ask = None;
                }
                continue;
            };
            let nonce = self.next_nonce();
            let node_id = self.node_id.clone();
            let Some(state) = self.groups.get_mut(&name) else { continue };
            let proofs: Vec<(KeyId, [u8; 32])> = state
                .keys
                .all(&name)
                .into_iter()
                .map(|(id, key)| (id, request_proof(key, &name, &node_id, &nonce)))
                .collect();
            let mut tried = if tried.len() >= candidates.len() { BTreeSet::new() } else { tried };
            tried.insert(to.clone());
            state.key_ask =
                Some(KeyAsk { to: to.clone(), nonce, deadline: Millis(now.0 + JOIN_STEP_TIMEOUT_MS), tried });
            let message = PeerMessage::KeyRequest { group: name.clone(), nonce, proofs };
            self.outputs.push_back(Output::Send { to, message });
        }
    }

    /// A member asks for the current key: hand it over, wrapped under the newest key it proved,
    /// if it is entitled and has not left.
    pub(super) fn serve_key_request(&mut self, group: &str, from: NodeId, nonce: Nonce, proofs: &[(KeyId, [u8; 32])]) {
        let grant_nonce = self.next_nonce();
        let Some(state) = self.groups.get(group) else {
            return self.drop_message(from, format!("key request for {group:?}, which this node does not hold"));
        };
        if !state.keys.entitled().contains(&from) {
            return self.drop_message(from, format!("key request for {group:?} from a node not entitled to its key"));
        }
        if self.has_left(group, &from) {
            return self.drop_message(from, format!("key request for {group:?} from a node that left it"));
        }
        let current = state.keys.id(group);
        let proven = proofs
            .iter()
            .take(KEYRING_PREVIOUS_MAX + 1)
            .filter(|(id, _)| *id != current)
            .filter_map(|(id, proof)| {
                let key = state.keys.find(group, id)?;
                verify_request_proof(key, group, &from, &nonce, proof).then_some((*id, key))
            })
            .max_by_key(|(id, _)| *id);
        let Some((under, under_key)) = proven else {
            return self.drop_message(from, format!("key request for {group:?} proves no older key this node holds"));
        };
        let entitled: Vec<String> = state.keys.entitled().iter().cloned().collect();
        let context = GrantContext {
            group,
            requester: &from,
            granter: &self.node_id,
            request_nonce: &nonce,
            grant_nonce: &grant_nonce,
            id: current,
            entitled: &entitled,
        };
        let (wrapped, tag) = context.wrap(under_key, state.keys.key());
        let message = PeerMessage::KeyGrant {
            group: group.to_owned(),
            id: current,
            under,
            nonce: grant_nonce,
            wrapped,
            tag,
            entitled,
        };
        self.outputs.push_back(Output::Send { to: from, message });
    }

    /// The member this node asked hands over a newer key: open it with the key it names and
    /// move to it.
    pub(super) fn take_key_grant(&mut self, group: &str, from: NodeId, grant: Grant) {
        let Some(state) = self.groups.get(group) else {
            return self.drop_message(from, format!("key grant for {group:?}, which this node does not hold"));
        };
        let Some(ask) = state.key_ask.as_ref().filter(|ask| ask.to == from) else {
            return self.drop_message(from, format!("key grant for {group:?} not asked for"));
        };
        if grant.id <= state.keys.id(group) || grant.entitled.len() > KEYRING_ENTITLED_MAX {
            return self.drop_message(from, format!("key grant for {group:?} not newer than the key held"));
        }
        let Some(under_key) = state.keys.find(group, &grant.under) else {
            return self.drop_message(from, format!("key grant for {group:?} under a key this node does not hold"));
        };
        let context = GrantContext {
            group,
            requester: &self.node_id,
            granter: &from,
            request_nonce: &ask.nonce,
            grant_nonce: &grant.nonce,
            id: grant.id,
            entitled: &grant.entitled,
        };
        let Some(key) = context.unwrap(under_key, &grant.wrapped, &grant.tag) else {
            return self.drop_message(from, format!("key grant for {group:?} does not verify"));
        };
        let keys = state.keys.moved_to(grant.id.generation, key, grant.entitled.into_iter().collect());
        self.adopt_keys(group, keys);
    }
}
