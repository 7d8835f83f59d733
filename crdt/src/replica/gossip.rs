//! What the membership layer (gossip) tells the core, and what the core publishes in it: each
//! peer's liveness, the groups it left, and per group its `GroupGossip` (heads digest, revision,
//! version label, membership proof, durable heads). The shell parses gossip into a
//! `MembershipView` and publishes the values `Output::Publish` hands it.

use std::collections::{BTreeMap, BTreeSet};

use automerge::ChangeHash;

use super::NodeId;
use crate::exchange::HeadsDigest;
use crate::join::{GroupKey, join_proof};
use crate::keyring::KeyId;
use crate::limits::{PROOF_MEMO_GROUPS_MAX, PROOF_MEMO_NODES_MAX};
use crate::settings::{hex, unhex};

/// What a node publishes in gossip for each group it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGossip {
    /// Digest of its heads.
    pub digest: HeadsDigest,
    /// Its revision of the group.
    pub revision: u64,
    /// Label of its latest version.
    pub version: String,
    /// HMAC of its node id under the group key: the membership proof.
    pub proof: [u8; 32],
    /// Its durable heads (the gossip summary of acks).
    pub heads: Vec<ChangeHash>,
    /// The id of the key it holds, past the first (`None`: generation 0).
    pub key: Option<KeyId>,
}

impl GroupGossip {
    /// The gossip value: `digest;revision;version;proof-hex;heads-hex,...[;key-id]` (short
    /// UTF-8, as chitchat needs: one head normally, a few after concurrent writes; the key id
    /// only once the group's key was rotated).
    pub fn encode(&self) -> String {
        let heads: Vec<String> = self.heads.iter().map(|h| hex(&h.0)).collect();
        let mut text =
            format!("{};{};{};{};{}", self.digest, self.revision, self.version, hex(&self.proof), heads.join(","));
        if let Some(key) = &self.key {
            text.push(';');
            text.push_str(&key.encode());
        }
        text
    }

    /// The generation of the key it holds.
    pub fn generation(&self) -> u64 {
        self.key.map_or(0, |key| key.generation)
    }

    /// Parses a gossip value; `None` for anything else (including the "left" marker).
    pub fn parse(text: &str) -> Option<GroupGossip> {
        let mut parts = text.split(';');
        let digest = HeadsDigest::from_hex(parts.next()?)?;
        let revision = parts.next()?.parse().ok()?;
        let version = parts.next()?.to_owned();
        let proof: [u8; 32] = unhex(parts.next()?)?.try_into().ok()?;
        let heads_text = parts.next()?;
        let mut heads = Vec::new();
        for head in heads_text.split(',').filter(|h| !h.is_empty()) {
            heads.push(ChangeHash(unhex(head)?.try_into().ok()?));
        }
        let key = match parts.next() {
            Some(text) => Some(KeyId::parse(text)?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(GroupGossip { digest, revision, version, proof, heads, key })
    }
}

/// The membership proof of `node` for `group`.
pub fn membership_proof(key: &GroupKey, group: &str, node: &str) -> [u8; 32] {
    join_proof(key, group, node, &[0; 32], &[1; 32])
}

/// The membership proofs this node expects of its peers, remembered per group with the key
/// they were computed under. Every membership view asks for the proof of every peer of every
/// group several times (members, liveness, departures, announcements): an HMAC each, O(mesh)
/// per question, which showed in konor-sim's profiles at hundreds of nodes. When a group's key
/// changes (a rotation, a rejoin) its remembered proofs are dropped.
#[derive(Debug, Default)]
pub(super) struct ProofMemo {
    // A mutex only so that a replica stays `Sync` (the daemon's future holds `&Replica` across
    // awaits); one thread uses it, so it is never contended.
    groups: std::sync::Mutex<BTreeMap<String, GroupProofs>>,
}

/// One group's remembered proofs and the key they were computed under.
#[derive(Debug)]
struct GroupProofs {
    key: GroupKey,
    nodes: BTreeMap<NodeId, [u8; 32]>,
}

impl ProofMemo {
    /// The membership proof of `node` for `group` under `key`.
    pub(super) fn proof(&self, key: &GroupKey, group: &str, node: &str) -> [u8; 32] {
        let mut groups = self.groups.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(proof) = groups.get(group).filter(|held| held.key == *key).and_then(|held| held.nodes.get(node)) {
            return *proof;
        }
        let proof = membership_proof(key, group, node);
        if !groups.contains_key(group) && groups.len() >= PROOF_MEMO_GROUPS_MAX {
            groups.clear();
        }
        let held =
            groups.entry(group.to_owned()).or_insert_with(|| GroupProofs { key: key.clone(), nodes: BTreeMap::new() });
        if held.key != *key || held.nodes.len() >= PROOF_MEMO_NODES_MAX {
            *held = GroupProofs { key: key.clone(), nodes: BTreeMap::new() };
        }
        held.nodes.insert(node.to_owned(), proof);
        proof
    }

    /// Forgets the groups `held` says this node no longer holds, with their keys: the key of a
    /// group this node left is dropped with the next membership view the replica takes.
    pub(super) fn keep_groups(&self, held: impl Fn(&str) -> bool) {
        self.groups.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|group, _| held(group));
    }

    /// True when `proof` is the membership proof of `node` for `group` under `key`.
    pub(super) fn verifies(&self, proof: &[u8; 32], key: &GroupKey, group: &str, node: &str) -> bool {
        *proof == self.proof(key, group, node)
    }
}

/// What this node's failure detector can say about a peer (SPEC invariant 5, issue 11: unknown
/// is not dead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum PeerLiveness {
    /// Heartbeats arrive.
    Live,
    /// The detector cannot judge yet: this node just started or resumed from a pause, or has
    /// not heard enough heartbeats from the peer. Quorums count it as a live member that has
    /// not acknowledged; strong rounds never treat it as gone.
    #[default]
    Unknown,
    /// The detector gave up on it, or it announced a graceful leave.
    Dead,
}

/// One peer as the local membership view (gossip) sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerState {
    /// Its liveness by this node's failure detector (leaving counts as dead).
    pub liveness: PeerLiveness,
    /// Groups it claims to hold, with its gossip for each.
    pub groups: BTreeMap<String, GroupGossip>,
    /// Groups it announced in gossip that it left.
    pub left: BTreeSet<String>,
}

impl PeerState {
    /// True when heartbeats arrive from it.
    pub fn is_live(&self) -> bool {
        self.liveness == PeerLiveness::Live
    }

    /// True when it may be up: live, or not judged yet.
    pub fn may_be_up(&self) -> bool {
        self.liveness != PeerLiveness::Dead
    }
}

/// The whole membership view, handed in whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MembershipView {
    /// Every other node known to gossip.
    pub peers: BTreeMap<NodeId, PeerState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ProofMemo {
        fn remembered(&self, group: &str) -> usize {
            self.groups.lock().unwrap().get(group).map_or(0, |held| held.nodes.len())
        }
    }

    #[test]
    fn a_remembered_proof_is_the_proof_under_the_key_asked_for() {
        let memo = ProofMemo::default();
        let (old, new) = (GroupKey::from_bytes([1; 32]), GroupKey::from_bytes([2; 32]));
        assert_eq!(memo.proof(&old, "app", "n2"), membership_proof(&old, "app", "n2"));
        assert_eq!(memo.proof(&old, "app", "n2"), membership_proof(&old, "app", "n2"));
        // After a rotation the proof under the old key must not be given for the new one.
        assert_eq!(memo.proof(&new, "app", "n2"), membership_proof(&new, "app", "n2"));
        assert!(memo.verifies(&membership_proof(&new, "app", "n2"), &new, "app", "n2"));
        assert!(!memo.verifies(&membership_proof(&old, "app", "n2"), &new, "app", "n2"));
        // Per group and per node.
        assert_eq!(memo.proof(&new, "db", "n2"), membership_proof(&new, "db", "n2"));
        assert_eq!(memo.proof(&new, "app", "n3"), membership_proof(&new, "app", "n3"));
        assert_ne!(memo.proof(&new, "app", "n3"), memo.proof(&new, "app", "n2"));
    }

    #[test]
    fn the_memo_is_bounded_per_group_and_in_groups() {
        let memo = ProofMemo::default();
        let key = GroupKey::from_bytes([7; 32]);
        for index in 0..=PROOF_MEMO_NODES_MAX {
            let node = format!("n{index}");
            assert_eq!(memo.proof(&key, "app", &node), membership_proof(&key, "app", &node));
        }
        assert!(memo.remembered("app") <= PROOF_MEMO_NODES_MAX);
        for index in 0..=PROOF_MEMO_GROUPS_MAX {
            memo.proof(&key, &format!("g{index}"), "n1");
        }
        assert!(memo.groups.lock().unwrap().len() <= PROOF_MEMO_GROUPS_MAX);
        assert_eq!(memo.proof(&key, "app", "n1"), membership_proof(&key, "app", "n1"));
    }

    #[test]
    fn a_group_no_longer_held_is_forgotten_with_its_key() {
        let memo = ProofMemo::default();
        let key = GroupKey::from_bytes([3; 32]);
        memo.proof(&key, "app", "n2");
        memo.proof(&key, "db", "n2");
        memo.keep_groups(|group| group == "db");
        assert_eq!(memo.remembered("app"), 0);
        assert_eq!(memo.remembered("db"), 1);
        assert!(!memo.groups.lock().unwrap().contains_key("app"));
    }
}
