//! A group's keyring (issue 17, item 5): the current key with its generation, the keys it
//! replaced, and the members entitled to the current key. `group rotate-key` makes a new
//! generation; a member that missed it proves a key it holds (`KeyRequest`) and a member that
//! holds the new one hands it over wrapped under that key (`KeyGrant`), only if the requester
//! was a member when the key was made. A node that left before the rotation is not entitled,
//! and the old key no longer admits anyone: joins and membership proofs use the current key.
//!
//! It also records the members seen leaving the group (`left`), with the generation held then:
//! such a node is never entitled, trusted to hand a key over, nor re-counted from its old key
//! (gossip forgets a node, and a node can take back its own "left" marker; this record does
//! not), until its gossip proves this node's current key again, or it joins again here.
//!
//! The text form is the key file: the current key's 64 hex digits on the first line (a file of
//! generation 0 is that line alone, as before keyrings), then `generation N`, `previous N HEX`,
//! `entitled NODE` and `left NODE N` lines.

use std::collections::{BTreeMap, BTreeSet};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::join::{GROUP_KEY_BYTES, GroupKey, Nonce};
use crate::settings::hex;

/// Replaced keys kept: a member that missed more rotations than this while down joins again
/// with the current key (`group join`). Each costs one line in the key file and one proof in a
/// key request.
pub const KEYRING_PREVIOUS_MAX: usize = 8;

/// Members named entitled to a key (and members recorded as left): above the largest mesh a
/// node serves, so a rotation never leaves a member out for want of room; it bounds the key file
/// and a grant.
pub const KEYRING_ENTITLED_MAX: usize = 4_096;

/// Longest node id kept in a keyring (certificates' node ids are at most 32 characters).
pub const KEYRING_NODE_ID_BYTES_MAX: usize = 64;

/// Largest text form of a keyring: the key, the generation, the previous keys and the
/// entitled members at their caps (a bound for the key file's reader).
pub const KEYRING_TEXT_BYTES_MAX: usize = (64 + 1)
    + ("generation ".len() + 20 + 1)
    + KEYRING_PREVIOUS_MAX * ("previous ".len() + 20 + 1 + 64 + 1)
    + KEYRING_ENTITLED_MAX * ("entitled ".len() + KEYRING_NODE_ID_BYTES_MAX + 1)
    + KEYRING_ENTITLED_MAX * ("left ".len() + KEYRING_NODE_ID_BYTES_MAX + 1 + 20 + 1);

const _: () = assert!(KEYRING_TEXT_BYTES_MAX < crate::limits::PEER_MESSAGE_BYTES_MAX);

const KEY_ID_CONTEXT: &[u8] = b"konorkestra/key-id/v1";
const REQUEST_CONTEXT: &[u8] = b"konorkestra/key-request/v1";
const WRAP_CONTEXT: &[u8] = b"konorkestra/key-wrap/v1";
const GRANT_CONTEXT: &[u8] = b"konorkestra/key-grant/v1";

/// A key's name in gossip and messages: its generation and the first 8 bytes of an HMAC of the
/// group under it (which key of a generation, when two nodes rotated at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct KeyId {
    /// Rotations since the group was created.
    pub generation: u64,
    /// Tells apart two keys of one generation; the larger wins.
    pub tag: [u8; 8],
}

impl KeyId {
    /// The id of `key` at `generation` in `group`.
    pub fn of(key: &GroupKey, group: &str, generation: u64) -> KeyId {
        let digest = mac(key, &[KEY_ID_CONTEXT, group.as_bytes(), &generation.to_le_bytes()]);
        let mut tag = [0; 8];
        tag.copy_from_slice(&digest[..8]);
        KeyId { generation, tag }
    }

    /// `GENERATION-TAGHEX`, as gossip carries it.
    pub fn encode(&self) -> String {
        format!("{}-{}", self.generation, hex(&self.tag))
    }

    /// Parses [`KeyId::encode`]'s form.
    pub fn parse(text: &str) -> Option<KeyId> {
        let (generation, tag) = text.split_once('-')?;
        let tag: [u8; 8] = crate::settings::unhex(tag)?.try_into().ok()?;
        Some(KeyId { generation: number(generation).ok()?, tag })
    }
}

/// A group's keys as one node holds them.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring {
    generation: u64,
    key: GroupKey,
    /// Replaced keys, newest first, at most [`KEYRING_PREVIOUS_MAX`].
    previous: Vec<(u64, GroupKey)>,
    /// Who may be handed the current key: the members when it was made (empty: nobody is
    /// handed it; they join with it).
    entitled: BTreeSet<String>,
    /// Members seen leaving, with the generation this node held then.
    left: BTreeMap<String, u64>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("generation", &self.generation)
            .field("previous", &self.previous.len())
            .field("entitled", &self.entitled.len())
            .field("left", &self.left.len())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// A group's first key (generation 0), or a key joined with.
    pub fn first(key: GroupKey) -> Keyring {
        Keyring { generation: 0, key, previous: Vec::new(), entitled: BTreeSet::new(), left: BTreeMap::new() }
    }

    /// The current key.
    pub fn key(&self) -> &GroupKey {
        &self.key
    }

    /// The current key's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current key's id in `group`.
    pub fn id(&self, group: &str) -> KeyId {
        KeyId::of(&self.key, group, self.generation)
    }

    /// Who may be handed the current key.
    pub fn entitled(&self) -> &BTreeSet<String> {
        &self.entitled
    }

    /// The generation this node held when it saw `node` leave, if it did (and has not seen it
    /// come back since).
    pub fn left_at(&self, node: &str) -> Option<u64> {
        self.left.get(node).copied()
    }

    /// The members recorded as left.
    pub fn left(&self) -> &BTreeMap<String, u64> {
        &self.left
    }

    /// The keyring with `node` recorded as left now; `None` when nothing changes (already
    /// recorded, or the record is full: the oldest names are kept).
    pub fn with_left(&self, node: &str) -> Option<Keyring> {
        if self.left.contains_key(node) || self.left.len() >= KEYRING_ENTITLED_MAX || !valid_node(node) {
            return None;
        }
        let mut keys = self.clone();
        keys.left.insert(node.to_owned(), self.generation);
        keys.entitled.remove(node);
        Some(keys)
    }

    /// The keyring with `nodes` entitled too (members seen); `None` when nothing changes. Nodes
    /// recorded as left, and those past the cap, are not added.
    pub fn with_entitled(&self, nodes: &[String]) -> Option<Keyring> {
        let mut keys = self.clone();
        for node in nodes {
            if keys.entitled.len() < KEYRING_ENTITLED_MAX && valid_node(node) && !keys.left.contains_key(node) {
                keys.entitled.insert(node.clone());
            }
        }
        (keys.entitled != self.entitled).then_some(keys)
    }

    /// The keyring without `node`'s record of leaving (it joined again); `None` if there was
    /// none.
    pub fn without_left(&self, node: &str) -> Option<Keyring> {
        let mut keys = self.clone();
        keys.left.remove(node)?;
        Some(keys)
    }

    /// The keyring after moving to `key` at `generation` (a rotation made here or a grant):
    /// the current key joins the replaced ones; the record of members that left is kept.
    pub fn moved_to(&self, generation: u64, key: GroupKey, mut entitled: BTreeSet<String>) -> Keyring {
        let mut previous = vec![(self.generation, self.key.clone())];
        previous.extend(self.previous.iter().filter(|(_, old)| *old != key).cloned());
        previous.truncate(KEYRING_PREVIOUS_MAX);
        entitled.retain(|node| valid_node(node) && !self.left.contains_key(node));
        while entitled.len() > KEYRING_ENTITLED_MAX {
            entitled.pop_last();
        }
        Keyring { generation, key, previous, entitled, left: self.left.clone() }
    }

    /// The same key at `generation` (a joiner learns its generation from the granter's gossip).
    pub fn at_generation(mut self, generation: u64) -> Keyring {
        self.generation = generation;
        self
    }

    /// Every key held with its id, current first.
    pub fn all(&self, group: &str) -> Vec<(KeyId, &GroupKey)> {
        std::iter::once((self.generation, &self.key))
            .chain(self.previous.iter().map(|(generation, key)| (*generation, key)))
            .map(|(generation, key)| (KeyId::of(key, group, generation), key))
            .collect()
    }

    /// The held key named `id`.
    pub fn find(&self, group: &str, id: &KeyId) -> Option<&GroupKey> {
        self.all(group).into_iter().find(|(held, _)| held == id).map(|(_, key)| key)
    }

    /// The key file's text.
    pub fn to_text(&self) -> String {
        let mut text = self.key.to_text();
        text.push('\n');
        if self.generation == 0 && self.previous.is_empty() && self.entitled.is_empty() && self.left.is_empty() {
            return text;
        }
        text.push_str(&format!("generation {}\n", self.generation));
        for (generation, key) in &self.previous {
            text.push_str(&format!("previous {generation} {}\n", key.to_text()));
        }
        for node in &self.entitled {
            text.push_str(&format!("entitled {node}\n"));
        }
        for (node, generation) in &self.left {
            text.push_str(&format!("left {node} {generation}\n"));
        }
        text
    }

    /// Parses [`Keyring::to_text`]'s form (or a bare key: generation 0).
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
        let key = GroupKey::parse(lines.next().ok_or("the key file holds no key")?)?;
        let mut keyring = Keyring::first(key);
        let mut generation_seen = false;
        for line in lines {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("generation"), Some(n), None, None) if !generation_seen => {
                    keyring.generation = number(n)?;
                    generation_seen = true;
                }
                (Some("previous"), Some(n), Some(key), None) => {
                    if keyring.previous.len() >= KEYRING_PREVIOUS_MAX {
                        return Err(format!("more than {KEYRING_PREVIOUS_MAX} previous keys"));
                    }
                    let generation = number(n)?;
                    let key = GroupKey::parse(key)?;
                    if generation > keyring.generation || key == keyring.key {
                        return Err(format!(
                            "previous key of generation {generation} is not older than the current one"
                        ));
                    }
                    keyring.previous.push((generation, key));
                }
                (Some("entitled"), Some(node), None, None) => {
                    if keyring.entitled.len() >= KEYRING_ENTITLED_MAX || !valid_node(node) {
                        return Err(format!("more than {KEYRING_ENTITLED_MAX} entitled members, or a bad node id"));
                    }
                    keyring.entitled.insert(node.to_owned());
                }
                (Some("left"), Some(node), Some(n), None) => {
                    if keyring.left.len() >= KEYRING_ENTITLED_MAX || !valid_node(node) {
                        return Err(format!("more than {KEYRING_ENTITLED_MAX} members that left, or a bad node id"));
                    }
                    keyring.left.insert(node.to_owned(), number(n)?);
                }
                _ => {
                    return Err("a line of the key file is not one generation, previous, entitled or left line".into());
                }
            }
        }
        Ok(keyring)
    }
}

/// A generation: digits only.
fn number(text: &str) -> Result<u64, String> {
    // The text is not quoted back: a key written in the wrong place must not reach a log.
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err("a generation is not a number".to_owned());
    }
    text.parse().map_err(|_| "a generation is out of range".to_owned())
}

/// A node id a keyring can hold: one word, within [`KEYRING_NODE_ID_BYTES_MAX`].
fn valid_node(node: &str) -> bool {
    !node.is_empty() && node.len() <= KEYRING_NODE_ID_BYTES_MAX && !node.contains(char::is_whitespace)
}

fn mac(key: &GroupKey, parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: construction cannot fail for a 32-byte key.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(key.bytes()) else {
        return [0; 32];
    };
    for part in parts {
        mac.update(&(part.len() as u64).to_le_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The proof a key request carries for one held key: HMAC over the group, the requester and its
/// nonce, so it says "I hold this key" without sending it.
pub fn request_proof(key: &GroupKey, group: &str, requester: &str, nonce: &Nonce) -> [u8; 32] {
    mac(key, &[REQUEST_CONTEXT, group.as_bytes(), requester.as_bytes(), nonce])
}

/// Checks a key request's proof (constant time).
pub fn verify_request_proof(key: &GroupKey, group: &str, requester: &str, nonce: &Nonce, proof: &[u8; 32]) -> bool {
    equal(&request_proof(key, group, requester, nonce), proof)
}

/// What a grant binds: both nodes, both nonces, the key's id and the entitled members.
#[derive(Debug)]
pub struct GrantContext<'a> {
    /// Group.
    pub group: &'a str,
    /// The member that asked.
    pub requester: &'a str,
    /// The member that grants.
    pub granter: &'a str,
    /// The requester's nonce.
    pub request_nonce: &'a Nonce,
    /// The granter's nonce.
    pub grant_nonce: &'a Nonce,
    /// The granted key's id.
    pub id: KeyId,
    /// The members entitled to the granted key.
    pub entitled: &'a [String],
}

impl GrantContext<'_> {
    fn pad(&self, under: &GroupKey) -> [u8; 32] {
        let generation = self.id.generation.to_le_bytes();
        mac(
            under,
            &[
                WRAP_CONTEXT,
                self.group.as_bytes(),
                self.requester.as_bytes(),
                self.request_nonce,
                self.grant_nonce,
                &generation,
            ],
        )
    }

    fn tag(&self, under: &GroupKey, wrapped: &[u8; 32]) -> [u8; 32] {
        let generation = self.id.generation.to_le_bytes();
        let mut parts: Vec<&[u8]> = vec![
            GRANT_CONTEXT,
            self.group.as_bytes(),
            self.requester.as_bytes(),
            self.granter.as_bytes(),
            self.request_nonce,
            self.grant_nonce,
            &generation,
            &self.id.tag,
            wrapped,
        ];
        parts.extend(self.entitled.iter().map(|node| node.as_bytes()));
        mac(under, &parts)
    }

    /// Wraps `key` under `under` (a key the requester proved it holds): the wrapped bytes and
    /// their tag.
    pub fn wrap(&self, under: &GroupKey, key: &GroupKey) -> ([u8; 32], [u8; 32]) {
        let pad = self.pad(under);
        let mut wrapped = [0; GROUP_KEY_BYTES];
        for (i, byte) in wrapped.iter_mut().enumerate() {
            *byte = key.bytes()[i] ^ pad[i];
        }
        let tag = self.tag(under, &wrapped);
        (wrapped, tag)
    }

    /// The key a grant holds, if its tag verifies under `under` and the key is the one named
    /// (only a holder of `under` can make a grant that passes).
    pub fn unwrap(&self, under: &GroupKey, wrapped: &[u8; 32], tag: &[u8; 32]) -> Option<GroupKey> {
        if !equal(&self.tag(under, wrapped), tag) {
            return None;
        }
        let pad = self.pad(under);
        let mut bytes = [0; GROUP_KEY_BYTES];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = wrapped[i] ^ pad[i];
        }
        let key = GroupKey::from_bytes(bytes);
        (KeyId::of(&key, self.group, self.id.generation) == self.id).then_some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> GroupKey {
        GroupKey::from_bytes([byte; 32])
    }

    #[test]
    fn the_text_form_round_trips_and_a_bare_key_is_generation_zero() {
        let first = Keyring::first(key(1));
        assert_eq!(first.to_text().lines().count(), 1);
        assert_eq!(Keyring::parse(&first.to_text()).unwrap(), first);
        let entitled = BTreeSet::from(["n1".to_owned(), "n2".to_owned()]);
        let second = first.moved_to(1, key(2), entitled.clone());
        let third = second.moved_to(2, key(3), entitled);
        let parsed = Keyring::parse(&third.to_text()).unwrap();
        assert_eq!(parsed, third);
        assert_eq!(parsed.generation(), 2);
        assert_eq!(parsed.find("app", &KeyId::of(&key(1), "app", 0)), Some(&key(1)));
        assert!(Keyring::parse("").is_err());
        assert!(Keyring::parse(&format!("{}\nowner n1\n", key(1).to_text())).is_err());
        assert!(!format!("{third:?}").contains("0303"), "Debug never shows a key");
    }

    #[test]
    fn previous_keys_are_bounded() {
        let mut ring = Keyring::first(key(0));
        for n in 1..=20u8 {
            ring = ring.moved_to(u64::from(n), key(n), BTreeSet::new());
        }
        assert_eq!(ring.all("g").len(), KEYRING_PREVIOUS_MAX + 1);
        assert!(ring.find("g", &KeyId::of(&key(20 - KEYRING_PREVIOUS_MAX as u8), "g", 12)).is_some());
        assert!(ring.find("g", &KeyId::of(&key(1), "g", 1)).is_none());
    }

    #[test]
    fn a_grant_opens_only_under_the_key_it_was_wrapped_with_and_for_its_context() {
        let entitled = vec!["n1".to_owned(), "n2".to_owned()];
        let new = key(9);
        let context = GrantContext {
            group: "app",
            requester: "n2",
            granter: "n1",
            request_nonce: &[1; 32],
            grant_nonce: &[2; 32],
            id: KeyId::of(&new, "app", 1),
            entitled: &entitled,
        };
        let (wrapped, tag) = context.wrap(&key(1), &new);
        assert_ne!(wrapped, [9; 32]);
        assert_eq!(context.unwrap(&key(1), &wrapped, &tag), Some(new.clone()));
        // Someone holding another key cannot open it, nor forge one that opens.
        assert_eq!(context.unwrap(&key(7), &wrapped, &tag), None);
        let (forged, forged_tag) = context.wrap(&key(7), &new);
        assert_eq!(context.unwrap(&key(1), &forged, &forged_tag), None);
        // Bound to its context: another requester, or another entitled list, does not verify.
        let other = GrantContext { requester: "n3", ..context };
        assert_eq!(other.unwrap(&key(1), &wrapped, &tag), None);
        let fewer = vec!["n1".to_owned()];
        let other = GrantContext { entitled: &fewer, requester: "n2", ..other };
        assert_eq!(other.unwrap(&key(1), &wrapped, &tag), None);
    }

    #[test]
    fn key_ids_order_by_generation_then_tag_and_round_trip() {
        let a = KeyId::of(&key(1), "g", 1);
        let b = KeyId::of(&key(2), "g", 2);
        assert!(a < b);
        assert_eq!(KeyId::parse(&a.encode()), Some(a));
        assert_eq!(KeyId::parse("x-00"), None);
        assert!(request_proof(&key(1), "g", "n", &[0; 32]) != request_proof(&key(2), "g", "n", &[0; 32]));
        assert!(verify_request_proof(&key(1), "g", "n", &[0; 32], &request_proof(&key(1), "g", "n", &[0; 32])));
    }
}
