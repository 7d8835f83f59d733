//! Group keys and the join proof (SPEC F4, F23): a joiner proves it knows the group's secret key
//! by an HMAC over a challenge transcript, so the key never crosses the wire, even encrypted.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::settings::{hex, unhex};

/// Bytes of a join nonce or proof.
pub const NONCE_BYTES: usize = 32;

/// A random nonce for the join handshake (and key requests).
pub type Nonce = [u8; NONCE_BYTES];

/// Bytes of a group key.
pub const GROUP_KEY_BYTES: usize = 32;

/// Domain separation for the proof transcript: a proof for anything else never verifies here.
const PROOF_CONTEXT: &[u8] = b"konorkestra/join-proof/v1";

/// A group's secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct GroupKey([u8; GROUP_KEY_BYTES]);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(<secret>)")
    }
}

impl GroupKey {
    /// A key from caller-provided random bytes (the core holds no randomness of its own).
    pub fn from_bytes(bytes: [u8; GROUP_KEY_BYTES]) -> GroupKey {
        GroupKey(bytes)
    }

    /// Parses the text form (64 hex digits), as operators pass it to `group join --key`.
    pub fn parse(text: &str) -> Result<GroupKey, String> {
        let bytes = unhex(text.trim()).ok_or_else(|| "a group key is 64 hex digits".to_owned())?;
        let bytes: [u8; GROUP_KEY_BYTES] = bytes.try_into().map_err(|_| "a group key is 64 hex digits".to_owned())?;
        Ok(GroupKey(bytes))
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        hex(&self.0)
    }

    /// The key's bytes, for the MACs of this crate.
    pub(crate) fn bytes(&self) -> &[u8; GROUP_KEY_BYTES] {
        &self.0
    }
}

fn transcript(group: &str, joiner: &str, joiner_nonce: &Nonce, member_nonce: &Nonce) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PROOF_CONTEXT.len() + group.len() + joiner.len() + 80);
    for part in [PROOF_CONTEXT, group.as_bytes(), joiner.as_bytes()] {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    bytes.extend_from_slice(joiner_nonce);
    bytes.extend_from_slice(member_nonce);
    bytes
}

/// The proof a joiner sends: HMAC-SHA256(key, context, group, joiner id, both nonces). Binding
/// the joiner's node id (checked against its certificate by the shell) stops a relay.
pub fn join_proof(key: &GroupKey, group: &str, joiner: &str, joiner_nonce: &Nonce, member_nonce: &Nonce) -> [u8; 32] {
    // HMAC accepts keys of any length: construction cannot fail for a 32-byte key.
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0) else {
        return [0; 32];
    };
    mac.update(&transcript(group, joiner, joiner_nonce, member_nonce));
    mac.finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify_join_proof(
    key: &GroupKey,
    group: &str,
    joiner: &str,
    joiner_nonce: &Nonce,
    member_nonce: &Nonce,
    proof: &[u8; 32],
) -> bool {
    let Ok(mut mac) = <Hmac<Sha256> as KeyInit>::new_from_slice(&key.0) else {
        return false;
    };
    mac.update(&transcript(group, joiner, joiner_nonce, member_nonce));
    mac.verify_slice(proof).is_ok()
}

/// Derives a nonce from a seed and a counter: the replica's only source of unpredictability,
/// seeded by the shell (OS randomness in production, the run seed in the simulator).
pub fn derive_nonce(seed: &[u8; 32], counter: u64) -> Nonce {
    let mut hasher = Sha256::new();
    hasher.update(b"konorkestra/nonce/v1");
    hasher.update(seed);
    hasher.update(counter.to_le_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_the_same_key_group_joiner_and_nonces() {
        let key = GroupKey::from_bytes([7; 32]);
        let (a, b) = ([1; 32], [2; 32]);
        let proof = join_proof(&key, "app", "n2", &a, &b);
        assert!(verify_join_proof(&key, "app", "n2", &a, &b, &proof));
        assert!(!verify_join_proof(&GroupKey::from_bytes([8; 32]), "app", "n2", &a, &b, &proof));
        assert!(!verify_join_proof(&key, "other", "n2", &a, &b, &proof));
        assert!(!verify_join_proof(&key, "app", "n3", &a, &b, &proof));
        assert!(!verify_join_proof(&key, "app", "n2", &b, &a, &proof));
    }

    #[test]
    fn keys_parse_from_their_text_form() {
        let key = GroupKey::from_bytes([0xab; 32]);
        assert_eq!(GroupKey::parse(&key.to_text()).unwrap(), key);
        assert!(GroupKey::parse("abc").is_err());
        assert!(GroupKey::parse(&"zz".repeat(32)).is_err());
        assert_eq!(format!("{key:?}"), "GroupKey(<secret>)");
    }

    #[test]
    fn nonces_differ_by_counter_and_seed() {
        assert_ne!(derive_nonce(&[0; 32], 1), derive_nonce(&[0; 32], 2));
        assert_ne!(derive_nonce(&[0; 32], 1), derive_nonce(&[1; 32], 1));
    }
}
