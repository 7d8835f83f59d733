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
//! Whom a member trusts to hand it a key: a member it knew (remembered, entitled to its key,
//! or in a strong group's configuration) that it never saw leave, or that came back since (its
//! gossip proves the current key again; the keyring's `left` record is durable: gossip forgets,
//! and a node can take back its own "left" marker). It takes a grant only wrapped under its
//! current key, or under a key it replaced from a member entitled to its current key (two
//! rotations at once, where the larger key id wins, or a rotation after them). A member that
//! knows it is behind admits no joiner, counts no announcement and makes no rotation under its
//! old key.
//!
use std::collections::BTreeSet;

use super::{
    CommandError, CommandId, CommandOutcome, MembershipView, NodeId, Output, PersistOp, Replica, membership_proof,
};
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
    /// `group rotate-key`: a new key, its generation past any this node has seen a member hold.
    pub(super) fn rotate_key(&mut self, id: CommandId, group: String, key: GroupKey) {
        let Some(state) = self.groups.get(&group) else {
            return self.reply(id, Err(CommandError::UnknownGroup(group)));
        };
        if state.keys.all(&group).iter().any(|(_, held)| **held == key) {
            let error = "the new key is the group's current key or one it replaced: draw a new one".to_owned();
            return self.reply(id, Err(CommandError::BadRequest(error)));
        }
        if self.behind(&group) {
            let error = format!(
                "a member holds a newer key of group {group:?} than this node: rotate once this node has it \
                 (konorctl status {group} shows it), or on that member"
            );
            return self.reply(id, Err(CommandError::BadRequest(error)));
        }
        // This very key, named at a later generation by a trusted member (this node joined
        // with it before gossip told it the generation).
        let own_key = state.keys.key();
        let reach = state.keys.generation().saturating_add(KEYRING_PREVIOUS_MAX as u64);
        let labelled = self
            .membership
            .peers
            .iter()
            .filter(|(node, _)| self.trusted(&group, node))
            .filter_map(|(_, peer)| peer.groups.get(&group)?.key)
            .filter(|id| id.generation <= reach && *id == KeyId::of(own_key, &group, id.generation))
            .map(|id| id.generation)
            .max()
            .unwrap_or(0);
        let Some(generation) = state.keys.generation().max(labelled).checked_add(1) else {
            let error = "the group's key generation cannot grow any more".to_owned();
            return self.reply(id, Err(CommandError::TooLarge(error)));
        };
        let mut entitled: BTreeSet<NodeId> = self.member_liveness(&group).into_keys().collect();
        entitled.extend(state.known_members.iter().cloned());
        entitled.extend(state.keys.entitled().iter().cloned());
        if let Some(configuration) = state.doc.configuration() {
            entitled.extend(configuration.members.iter().cloned());
        }
        entitled.retain(|node| !self.has_left(&group, node) && !self.departed(&group, node));
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
        self.outputs.push_back(Output::Persist(PersistOp::Keys {
            group: group.to_owned(),
            keys: keys.clone(),
            required: true,
        }));
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

    /// True when this node saw `node` leave `group` and `node` has not come back since (its
    /// gossip holding the group with a proof under this node's current key).
    pub(super) fn departed(&self, group: &str, node: &str) -> bool {
        self.groups.get(group).is_some_and(|state| self.departed_in(&state.keys, group, node))
    }

    /// [`Replica::departed`] by the record in `keys`.
    fn departed_in(&self, keys: &crate::keyring::Keyring, group: &str, node: &str) -> bool {
        if keys.left_at(node).is_none() {
            return false;
        }
        // Back: its gossip holds the group again, under this node's current key (it joined
        // again, through any member, or was handed a later key). A node that left holding the
        // current key could join again anyway; one that left before a rotation cannot prove
        // the key that replaced the one it kept.
        let back = self.membership.peers.get(node).is_some_and(|peer| {
            !peer.left.contains(group)
                && peer
                    .groups
                    .get(group)
                    .is_some_and(|gossip| self.proofs.verifies(&gossip.proof, keys.key(), group, node))
        });
        !back
    }

    /// Whether this node trusts `node` to hand it `group`'s key: a member it knew (remembered,
    /// of the configuration, or entitled to its current key) that it has not seen leave.
    fn trusted(&self, group: &str, node: &str) -> bool {
        let Some(state) = self.groups.get(group) else { return false };
        let known = state.known_members.contains(node)
            || state.keys.entitled().contains(node)
            || state.doc.configuration().is_some_and(|configuration| configuration.contains(node));
        known && !self.has_left(group, node) && !self.departed(group, node)
    }

    /// True when `node`'s gossip names a newer key of `group` than this node holds.
    pub(super) fn holds_newer_key(&self, group: &str, node: &str) -> bool {
        let Some(state) = self.groups.get(group) else { return false };
        // Generation 0 is published without an id: never newer (and the common case, asked of
        // every peer on every tick: answered before any key id is computed).
        let Some(theirs) = self.membership.peers.get(node).and_then(|peer| peer.groups.get(group)?.key) else {
            return false;
        };
        // This very key under another generation is not newer, and an id further ahead than a
        // member could hand over (it names no key this node holds any more) is not believed.
        let ours = state.keys.id(group);
        let reach = ours.generation.saturating_add(KEYRING_PREVIOUS_MAX as u64);
        theirs > ours && theirs.generation <= reach && theirs != KeyId::of(state.keys.key(), group, theirs.generation)
    }

    /// True when a member this node trusts holds a newer key of `group`: this node's key is on
    /// its way out, so it admits nobody under it.
    pub(super) fn behind(&self, group: &str) -> bool {
        self.membership.peers.iter().any(|(node, peer)| {
            peer.liveness != super::PeerLiveness::Dead && self.holds_newer_key(group, node) && self.trusted(group, node)
        })
    }

    /// Records the members of each group seen leaving (durably, in the keyring): a "left"
    /// marker that appeared since the `previous` view, of a node this node counted as a member
    /// (remembered, announced, entitled, of the configuration, or proven in gossip before).
    /// Forgets the record of those that came back with a newer key.
    pub(super) fn record_departures(&mut self, previous: &MembershipView) {
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let Some(state) = self.groups.get(&name) else { continue };
            let mut keys = state.keys.clone();
            for (node, peer) in &self.membership.peers {
                let newly =
                    peer.left.contains(&name) && !previous.peers.get(node).is_some_and(|p| p.left.contains(&name));
                if !newly {
                    continue;
                }
                let was_member = state.known_members.contains(node)
                    || state.announced.contains_key(node)
                    || state.keys.entitled().contains(node)
                    || state.doc.configuration().is_some_and(|c| c.contains(node))
                    || previous
                        .peers
                        .get(node)
                        .and_then(|p| p.groups.get(&name))
                        .is_some_and(|gossip| self.proofs.verifies(&gossip.proof, state.keys.key(), &name, node));
                if was_member && let Some(moved) = keys.with_left(node) {
                    keys = moved;
                }
            }
            let back: Vec<String> =
                keys.left().keys().filter(|node| !self.departed_in(&keys, &name, node)).cloned().collect();
            for node in back {
                if let Some(moved) = keys.without_left(&node) {
                    keys = moved;
                }
            }
            if keys != state.keys {
                self.save_keys(&name, keys);
            }
        }
    }

    /// `node` joined `group` again here (its proof under the current key checked): it is no
    /// longer recorded as left.
    pub(super) fn rejoined(&mut self, group: &str, node: &str) {
        if let Some(keys) = self.groups.get(group).and_then(|state| state.keys.without_left(node)) {
            self.save_keys(group, keys);
        }
    }

    /// Saves `keys` (same key, other records) and keeps them.
    pub(super) fn save_keys(&mut self, group: &str, keys: crate::keyring::Keyring) {
        let Some(state) = self.groups.get_mut(group) else { return };
        self.outputs.push_back(Output::Persist(PersistOp::Keys {
            group: group.to_owned(),
            keys: keys.clone(),
            required: false,
        }));
        state.keys = keys;
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
            // A member trusted here names this very key at a later generation, and this node
            // only just joined with it (gossip had not told it the generation): take it.
            let fresh = state.keys.generation() == 0 && state.keys.all(&name).len() == 1;
            let own_key = state.keys.key();
            let reach = KEYRING_PREVIOUS_MAX as u64;
            // The peer's key id first: most peers publish none (generation 0), and `trusted`
            // costs set lookups per peer on every tick (a mesh of hundreds: konor-sim's profile).
            let relabel = self
                .membership
                .peers
                .iter()
                .filter(|_| fresh)
                .filter_map(|(node, peer)| peer.groups.get(&name)?.key.map(|id| (node, id)))
                .filter(|(node, _)| self.trusted(&name, node))
                .map(|(_, id)| id)
                .filter(|id| {
                    id.generation > 0 && id.generation <= reach && *id == KeyId::of(own_key, &name, id.generation)
                })
                .map(|id| id.generation)
                .max();
            if let Some(generation) = relabel {
                let keys = state.keys.clone().at_generation(generation);
                self.save_keys(&name, keys);
                self.publish(&name);
                continue;
            }
            let tried = state.key_ask.as_ref().map(|ask| ask.tried.clone()).unwrap_or_default();
            let candidates: Vec<NodeId> = self
                .membership
                .peers
                .iter()
                .filter(|(node, peer)| peer.is_live() && self.holds_newer_key(&name, node) && self.trusted(&name, node))
                .map(|(node, _)| node.clone())
                .collect();
            // Each candidate in turn; once all were asked, start over from the one after the
            // last asked.
            let last = state.key_ask.as_ref().map(|ask| ask.to.clone());
            let mut tried = tried;
            if candidates.iter().all(|node| tried.contains(node)) {
                tried.clear();
            }
            let next = candidates.iter().find(|node| !tried.contains(*node) && Some(*node) != last.as_ref());
            let Some(to) = next.or(candidates.first()).cloned() else {
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
        if self.has_left(group, &from) || self.departed(group, &from) {
            return self.drop_message(from, format!("key request for {group:?} from a node that left it"));
        }
        let current = state.keys.id(group);
        // Matched by key, not by the id the requester names: a member that joined with a key
        // before it learnt its generation names it under another one.
        let held = state.keys.all(group);
        let proven = proofs
            .iter()
            .take(KEYRING_PREVIOUS_MAX + 1)
            .filter_map(|(id, proof)| {
                let (mine, key) =
                    held.iter().find(|(_, key)| verify_request_proof(key, group, &from, &nonce, proof))?;
                (*mine != current).then_some((*id, *mine, *key))
            })
            .max_by_key(|(_, mine, _)| *mine)
            .map(|(id, _, key)| (id, key));
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
        let current = state.keys.id(group);
        if grant.id <= current || grant.entitled.len() > KEYRING_ENTITLED_MAX {
            return self.drop_message(from, format!("key grant for {group:?} not newer than the key held"));
        }
        if !self.trusted(group, &from) {
            return self.drop_message(from, format!("key grant for {group:?} from a node not trusted with its key"));
        }
        // Under the current key; under a key it replaced only from a member entitled to the
        // current one (two rotations at once, or one after: a node holding only an old key
        // must not move a member that already moved).
        let from_entitled = state.keys.entitled().contains(&from);
        if grant.under != current && !from_entitled {
            return self.drop_message(from, format!("key grant for {group:?} under a key this node replaced"));
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
        // The members entitled to this node's key stay entitled (minus those seen leaving):
        // the rotator may not have known them all (it joined after they went down, or made
        // the other key of two rotations at once).
        let mut entitled: BTreeSet<NodeId> = grant.entitled.into_iter().collect();
        entitled.extend(state.keys.entitled().iter().cloned());
        let keys = state.keys.moved_to(grant.id.generation, key, entitled);
        self.adopt_keys(group, keys);
    }
}
