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
