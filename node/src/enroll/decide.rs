//! The signer's decision on a host that enrolls, with no I/O: which node id it gets, whether
//! the id is free, and whether the token has uses left. The token's MAC, expiry and pin are
//! checked before (`pki/join_token.rs`), the proof of possession too.

use std::collections::BTreeMap;

use super::Refusal;
use super::grants::Grant;
use crate::pki::join_token::JoinToken;
use crate::pki::validate_node_id;

/// What the signer knows when it decides.
#[derive(Debug, Default)]
pub struct Facts<'a> {
    /// Every node id the mesh knows, with whether it is live now.
    pub known: BTreeMap<String, bool>,
    /// The grants this signer made under the token.
    pub granted_here: &'a [Grant],
    /// Hosts the token enrolled at other signers, as their gossip says.
    pub used_elsewhere: u32,
    /// Whether this signer granted the asked id under another token.
    pub granted_under_other_token: bool,
    /// When the asked id was last revoked as a whole (every certificate of it), if it was.
    pub revoked_at_ms: Option<u64>,
}

/// A yes: the node id, and whether the grant is a new use of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The node id the certificate names.
    pub node: String,
    /// False when the host asks again with the same key and id (its answer was lost): it gets
    /// a certificate again without spending a use.
    pub new_use: bool,
}

/// Decides on a host asking for `asked` with a key whose SHA-256 is `key_hash`.
pub fn decide(token: &JoinToken, asked: Option<&str>, key_hash: &str, facts: &Facts<'_>) -> Result<Decision, Refusal> {
    let node = match (token.node.as_deref(), asked) {
        (Some(named), Some(asked)) if named != asked => {
            return Err(Refusal::NodeMismatch { token: named.to_owned(), asked: asked.to_owned() });
        }
        (Some(named), _) => named.to_owned(),
        (None, Some(asked)) => {
            validate_node_id(asked).map_err(|error| Refusal::BadRequest(error.to_string()))?;
            asked.to_owned()
        }
        (None, None) => return Err(Refusal::NoNodeId),
    };
    let revoked_since = |at_ms: u64| facts.revoked_at_ms.is_some_and(|revoked| revoked >= at_ms);
    if let Some(grant) = facts.granted_here.iter().find(|grant| grant.node == node && grant.key == key_hash) {
        // A host revoked since its grant does not get back in with the same token.
        if revoked_since(grant.at_ms) {
            return Err(Refusal::NodeTaken { node, state: "revoked" });
        }
        return Ok(Decision { node, new_use: false });
    }
    // A revoked id is re-enrolled only by a token that names it: the operator's intent.
    if facts.revoked_at_ms.is_some() && token.node.is_none() {
        return Err(Refusal::NodeTaken { node, state: "revoked" });
    }
    if facts.granted_under_other_token {
        return Err(Refusal::NodeTaken { node, state: "enrolled by another token" });
    }
    let granted_to_other_key = facts.granted_here.iter().any(|grant| grant.node == node);
    match facts.known.get(&node) {
        // A token that names the id re-enrolls a replaced host, once the old one is down.
        Some(true) => return Err(Refusal::NodeTaken { node, state: "live" }),
        Some(false) if token.node.is_none() => return Err(Refusal::NodeTaken { node, state: "down" }),
        _ if granted_to_other_key => return Err(Refusal::NodeTaken { node, state: "enrolled by this token" }),
        _ => {}
    }
    let used = (facts.granted_here.len() as u32).saturating_add(facts.used_elsewhere);
    if used >= token.uses {
        return Err(Refusal::UsedUp { id: token.id.clone(), uses: token.uses, used });
    }
    Ok(Decision { node, new_use: true })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(uses: u32, node: Option<&str>) -> JoinToken {
        JoinToken {
            v: 1,
            id: "00112233aabbccdd".to_owned(),
            expires_ms: u64::MAX,
            uses,
            ca: String::new(),
            node: node.map(str::to_owned),
            labels: BTreeMap::new(),
        }
    }

    fn grant(node: &str, key: &str) -> Grant {
        Grant { node: node.to_owned(), key: key.to_owned(), at_ms: 0 }
    }

    #[test]
    fn the_node_id_comes_from_the_token_or_the_host_and_must_agree() {
        let facts = Facts::default();
        assert_eq!(decide(&token(1, Some("a")), None, "k", &facts).unwrap().node, "a");
        assert_eq!(decide(&token(1, Some("a")), Some("a"), "k", &facts).unwrap().node, "a");
        assert_eq!(decide(&token(1, None), Some("b"), "k", &facts).unwrap().node, "b");
        assert_eq!(
            decide(&token(1, Some("a")), Some("b"), "k", &facts),
            Err(Refusal::NodeMismatch { token: "a".to_owned(), asked: "b".to_owned() })
        );
        assert_eq!(decide(&token(1, None), None, "k", &facts), Err(Refusal::NoNodeId));
        assert!(matches!(decide(&token(1, None), Some("B!"), "k", &facts), Err(Refusal::BadRequest(_))));
    }

    #[test]
    fn a_members_id_is_taken_unless_the_token_names_it_and_the_member_is_down() {
        let mut facts = Facts::default();
        facts.known.insert("up".to_owned(), true);
        facts.known.insert("down".to_owned(), false);
        for (node, named) in [("up", false), ("up", true), ("down", false)] {
            let token = token(1, named.then_some(node));
            assert!(matches!(decide(&token, Some(node), "k", &facts), Err(Refusal::NodeTaken { .. })), "{node}");
        }
        assert_eq!(decide(&token(1, Some("down")), None, "k", &facts).unwrap().node, "down");
    }

    #[test]
    fn uses_count_here_and_elsewhere_and_a_repeat_with_the_same_key_is_free() {
        let granted = [grant("a", "ka")];
        let facts = Facts { granted_here: &granted, ..Facts::default() };
        assert_eq!(
            decide(&token(2, None), Some("b"), "kb", &facts).unwrap(),
            Decision { node: "b".to_owned(), new_use: true }
        );
        assert_eq!(
            decide(&token(1, None), Some("a"), "ka", &facts).unwrap(),
            Decision { node: "a".to_owned(), new_use: false }
        );
        assert!(matches!(decide(&token(1, None), Some("b"), "kb", &facts), Err(Refusal::UsedUp { used: 1, .. })));
        assert!(matches!(decide(&token(2, None), Some("a"), "other", &facts), Err(Refusal::NodeTaken { .. })));
        let facts = Facts { granted_here: &granted, used_elsewhere: 1, ..Facts::default() };
        assert!(matches!(decide(&token(2, None), Some("b"), "kb", &facts), Err(Refusal::UsedUp { used: 2, .. })));
        let facts = Facts { granted_under_other_token: true, ..Facts::default() };
        assert!(matches!(decide(&token(2, None), Some("b"), "kb", &facts), Err(Refusal::NodeTaken { .. })));
    }

    #[test]
    fn a_revoked_id_needs_a_token_that_names_it_and_a_revoked_grant_is_not_repeated() {
        let granted = [Grant { node: "a".to_owned(), key: "ka".to_owned(), at_ms: 100 }];
        let revoked = |at_ms| Facts { granted_here: &granted, revoked_at_ms: Some(at_ms), ..Facts::default() };
        assert!(matches!(decide(&token(2, None), Some("a"), "ka", &revoked(150)), Err(Refusal::NodeTaken { .. })));
        assert!(decide(&token(2, None), Some("a"), "ka", &revoked(50)).is_ok(), "revoked before the grant");
        let free = Facts { revoked_at_ms: Some(10), ..Facts::default() };
        assert!(matches!(decide(&token(1, None), Some("x"), "k", &free), Err(Refusal::NodeTaken { .. })));
        assert_eq!(decide(&token(1, Some("x")), None, "k", &free).unwrap().node, "x");
    }
}
