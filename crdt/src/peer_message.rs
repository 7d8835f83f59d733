//! Messages between replicas (node to node over mutually authenticated QUIC streams), and their
//! encoding: one version byte, then the postcard encoding of [`PeerMessage`].
//!
//! **Boundary:** this is the peer wire format (docs/protocol.md, "Peer protocol"). New message
//! kinds are appended at the end of the enum; a change to an existing one needs a new
//! [`PEER_PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};

use crate::error::RemoteError;
use crate::group::Mode;
use crate::limits::PEER_MESSAGE_BYTES_MAX;

/// Version byte that starts every encoded peer message. 2: round ids carry the coordinator's
/// start (1 is refused with a version error, never misread).
pub const PEER_PROTOCOL_VERSION: u8 = 2;

/// Bytes of a join nonce or proof.
pub const NONCE_BYTES: usize = 32;

/// A random nonce for the join handshake.
pub type Nonce = [u8; NONCE_BYTES];

/// Identity and order of a strong round: `(lamport, coordinator, start)`, compared in that order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoundId {
    /// One more than the largest round lamport the coordinator had seen for the group.
    pub lamport: u64,
    /// The coordinator.
    pub node: String,
    /// The coordinator's start (from its actor, fresh at every start). A coordinator that
    /// crashed in a round restarts without any record of it and may reach the same lamport
    /// again; the start keeps the two rounds distinct, so an id always names one change (S2).
    pub start: u64,
}

impl std::fmt::Display for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}.{:04x}", self.lamport, self.node, self.start & 0xffff)
    }
}

/// What a peer knows of a round's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundOutcome {
    /// The change is committed (the peer holds it applied).
    Committed,
    /// The round was aborted.
    Aborted,
    /// The peer does not know (yet).
    Unknown,
}

/// Everything one replica says to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Changes pushed eagerly after a write (raw Automerge change bytes).
    Changes {
        /// Group.
        group: String,
        /// Raw changes.
        changes: Vec<Vec<u8>>,
    },
    /// One Automerge sync protocol message (anti-entropy).
    Sync {
        /// Group.
        group: String,
        /// The encoded sync message.
        message: Vec<u8>,
    },
    /// A node asks to join a group; `nonce` is the joiner's half of the challenge.
    JoinRequest {
        /// Group.
        group: String,
        /// Joiner's nonce.
        nonce: Nonce,
    },
    /// A member answers with its half of the challenge.
    JoinChallenge {
        /// Group.
        group: String,
        /// Member's nonce.
        nonce: Nonce,
    },
    /// The joiner proves it knows the group key without sending it.
    JoinProof {
        /// Group.
        group: String,
        /// HMAC-SHA256 over the transcript (see [`crate::join::join_proof`]).
        proof: [u8; 32],
    },
    /// The member admits the joiner and sends the group document.
    JoinGrant {
        /// Group.
        group: String,
        /// Consistency mode.
        mode: Mode,
        /// An Automerge save of the group document.
        snapshot: Vec<u8>,
    },
    /// The member refuses the join.
    JoinRefused {
        /// Group.
        group: String,
        /// Why, for the operator.
        reason: String,
    },
    /// These pushed changes are durable on the sender (sent only after fsync).
    Ack {
        /// Group.
        group: String,
        /// Hashes of the changes.
        changes: Vec<[u8; 32]>,
    },
    /// Strong round, phase 1: stage this change and vote.
    Prepare {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// The raw Automerge change.
        change: Vec<u8>,
        /// The live members the coordinator waits for.
        members: Vec<String>,
    },
    /// A member's vote.
    Vote {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// Staged durably (true) or refused.
        yes: bool,
        /// Why not, for the operator.
        reason: String,
    },
    /// Strong round, phase 2.
    Decide {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// Commit (true) or abort.
        commit: bool,
    },
    /// An in-doubt member asks what became of a round.
    DecisionQuery {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// The hash of the round's change: a peer holding it knows the round committed.
        change: [u8; 32],
    },
    /// The answer.
    DecisionAnswer {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// What the peer knows.
        outcome: RoundOutcome,
    },
}

impl PeerMessage {
    /// The group the message is about.
    pub fn group(&self) -> &str {
        match self {
            PeerMessage::Changes { group, .. }
            | PeerMessage::Sync { group, .. }
            | PeerMessage::JoinRequest { group, .. }
            | PeerMessage::JoinChallenge { group, .. }
            | PeerMessage::JoinProof { group, .. }
            | PeerMessage::JoinGrant { group, .. }
            | PeerMessage::JoinRefused { group, .. }
            | PeerMessage::Ack { group, .. }
            | PeerMessage::Prepare { group, .. }
            | PeerMessage::Vote { group, .. }
            | PeerMessage::Decide { group, .. }
            | PeerMessage::DecisionQuery { group, .. }
            | PeerMessage::DecisionAnswer { group, .. } => group,
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMessage::Changes { .. } => "changes",
            PeerMessage::Sync { .. } => "sync",
            PeerMessage::JoinRequest { .. } => "join_request",
            PeerMessage::JoinChallenge { .. } => "join_challenge",
            PeerMessage::JoinProof { .. } => "join_proof",
            PeerMessage::JoinGrant { .. } => "join_grant",
            PeerMessage::JoinRefused { .. } => "join_refused",
            PeerMessage::Ack { .. } => "ack",
            PeerMessage::Prepare { .. } => "prepare",
            PeerMessage::Vote { .. } => "vote",
            PeerMessage::Decide { .. } => "decide",
            PeerMessage::DecisionQuery { .. } => "decision_query",
            PeerMessage::DecisionAnswer { .. } => "decision_answer",
        }
    }

    /// Encodes the message: version byte, then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PEER_PROTOCOL_VERSION];
        // postcard serializes every variant of this enum (strings, byte vectors, arrays):
        // encoding into a Vec cannot fail.
        if let Ok(bytes) = postcard::to_stdvec(self) {
            out.extend_from_slice(&bytes);
        }
        out
    }

    /// Decodes a message, refusing oversized input, another protocol version and garbage.
    pub fn decode(bytes: &[u8]) -> Result<PeerMessage, RemoteError> {
        if bytes.len() > PEER_MESSAGE_BYTES_MAX {
            return Err(RemoteError::TooLarge {
                what: "peer message",
                bytes: bytes.len(),
                max: PEER_MESSAGE_BYTES_MAX,
            });
        }
        let (version, body) = bytes
            .split_first()
            .ok_or_else(|| RemoteError::Malformed { what: "peer message", detail: "empty".into() })?;
        if *version != PEER_PROTOCOL_VERSION {
            return Err(RemoteError::Malformed {
                what: "peer message",
                detail: format!("protocol version {version}, this node speaks {PEER_PROTOCOL_VERSION}"),
            });
        }
        let (message, rest) = postcard::take_from_bytes::<PeerMessage>(body)
            .map_err(|e| RemoteError::Malformed { what: "peer message", detail: e.to_string() })?;
        if !rest.is_empty() {
            return Err(RemoteError::Malformed {
                what: "peer message",
                detail: format!("{} trailing bytes", rest.len()),
            });
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = PeerMessage> {
        let group = "[a-z]{1,8}";
        let bytes = prop::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            (group, prop::collection::vec(bytes.clone(), 0..4))
                .prop_map(|(group, changes)| PeerMessage::Changes { group, changes }),
            (group, bytes.clone()).prop_map(|(group, message)| PeerMessage::Sync { group, message }),
            (group, any::<[u8; 32]>()).prop_map(|(group, nonce)| PeerMessage::JoinRequest { group, nonce }),
            (group, any::<[u8; 32]>()).prop_map(|(group, proof)| PeerMessage::JoinProof { group, proof }),
            (group, bytes).prop_map(|(group, snapshot)| PeerMessage::JoinGrant { group, mode: Mode::Strong, snapshot }),
            (group, ".{0,20}").prop_map(|(group, reason)| PeerMessage::JoinRefused { group, reason }),
        ]
    }

    proptest! {
        #[test]
        fn peer_messages_round_trip(message in message()) {
            prop_assert_eq!(PeerMessage::decode(&message.encode()).unwrap(), message);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = PeerMessage::decode(&bytes);
        }
    }

    #[test]
    fn wrong_version_and_trailing_bytes_are_refused() {
        let mut bytes = PeerMessage::Sync { group: "g".into(), message: vec![1] }.encode();
        bytes.push(0);
        assert!(PeerMessage::decode(&bytes).unwrap_err().to_string().contains("trailing"));
        bytes[0] = 9;
        assert!(PeerMessage::decode(&bytes).unwrap_err().to_string().contains("version 9"));
        assert!(PeerMessage::decode(&[]).is_err());
    }
}
