//! Messages between replicas (node to node over mutually authenticated QUIC streams), and their
//! encoding: one version byte, then the postcard encoding of [`PeerMessage`].
//!
//! **Boundary:** this is the peer wire format (docs/protocol.md, "Peer protocol"). New message
//! kinds are appended at the end of the enum; a change to an existing one needs a new
//! [`PEER_PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};

use crate::configuration::Configuration;
use crate::error::RemoteError;
use crate::group::Mode;
use crate::keyring::KeyId;
use crate::limits::PEER_MESSAGE_BYTES_MAX;

/// Version byte that starts every encoded peer message. 5: secret marks (document format 5,
/// issue 17; a node that cannot mask must not receive the changes that carry secret values
/// once marked, which it would serve to every reader). 4: document format 3 (each setting a
/// register; a format-2 node would misread the changes a format-3 node sends). 3: strong groups by configuration
/// (prepares name their round's kind and configuration, decisions carry ballots, recovery,
/// leases and join announcements); 2 added the start of round ids. Other versions are refused
/// with a version error, never misread.
pub const PEER_PROTOCOL_VERSION: u8 = 5;

pub use crate::join::{NONCE_BYTES, Nonce};

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

/// The proposal number of a round's decision (single-decree Paxos over the round's outcome):
/// the coordinator proposes at ballot `(0, coordinator)`; a member recovering an in-doubt round
/// proposes at a higher one. Ordered by `(number, node)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Ballot {
    /// 0 for the coordinator, larger for each recovery attempt.
    pub number: u64,
    /// The proposer.
    pub node: String,
}

impl std::fmt::Display for Ballot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b{}@{}", self.number, self.node)
    }
}

/// What a strong round commits, which decides whose votes it needs (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundKind {
    /// A write: a yes from every member of the round's configuration.
    Write,
    /// A change of the configuration to `next`: a yes from a majority of the round's
    /// configuration and from every member of `next` not seen dead; with `forced`, a yes from
    /// every member of `next` alone (the operator's forced removal).
    Reconfigure {
        /// The configuration it installs.
        next: Configuration,
        /// Skips the majority of the old configuration.
        forced: bool,
    },
}

/// What a peer knows of a round's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundOutcome {
    /// Final: the change is committed.
    Committed,
    /// Final: the round was aborted; it never commits.
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
        /// The members the granter knows (itself included): the joiner announces itself to them.
        members: Vec<String>,
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
        /// The raw Automerge change (its dependencies are the position it commits at).
        change: Vec<u8>,
        /// Whose votes it needs.
        kind: RoundKind,
        /// The number of the configuration it runs in.
        configuration: u64,
        /// The nodes whose vote the coordinator waits for.
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
    /// Strong round, phase 2: record this decision at `ballot` (Paxos accept request).
    Decide {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// The proposal.
        ballot: Ballot,
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
        /// What the round commits: a node that never staged a round that needs its yes can
        /// abort it on the spot; one that a majority could commit without it cannot.
        kind: RoundKind,
    },
    /// What a peer knows of a round; `Committed` and `Aborted` are final (also sent unasked
    /// once a decision is final).
    DecisionAnswer {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// What the peer knows.
        outcome: RoundOutcome,
    },
    /// The answer to `Decide`: recorded durably (`ok`), or refused because the member promised
    /// a higher ballot (`promised`) or does not hold the round.
    Accepted {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// The ballot of the `Decide`.
        ballot: Ballot,
        /// Recorded.
        ok: bool,
        /// The highest ballot the member promised.
        promised: Ballot,
    },
    /// Recovery of an in-doubt round, phase 1 (Paxos prepare): promise to ignore lower
    /// ballots and say what you accepted.
    Recover {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// The recovery's ballot.
        ballot: Ballot,
        /// What the round commits (see `DecisionQuery`).
        kind: RoundKind,
    },
    /// The answer to `Recover` from a member that holds the round staged.
    Promise {
        /// Group.
        group: String,
        /// The round.
        round: RoundId,
        /// The ballot promised (or refused).
        ballot: Ballot,
        /// Promised (durably).
        ok: bool,
        /// The decision it accepted, with its ballot.
        accepted: Option<(Ballot, bool)>,
        /// The highest ballot it promised.
        promised: Ballot,
    },
    /// A strong-group member asks for a read lease (SPEC F12); `sent` is its own clock.
    LeaseRequest {
        /// Group.
        group: String,
        /// The requester's time of asking, echoed in the grant.
        sent: u64,
    },
    /// The granter promises not to vote for the requester's removal for a lease's time, and
    /// says what it holds so the requester can tell whether it is behind.
    LeaseGrant {
        /// Group.
        group: String,
        /// The request's `sent`.
        sent: u64,
        /// The granter's configuration number.
        configuration: u64,
        /// The granter's heads.
        heads: Vec<[u8; 32]>,
        /// A round the granter holds staged (in doubt), with its change hash.
        staged: Option<(RoundId, [u8; 32])>,
    },
    /// A new member tells the members it holds the group (its membership proof), so their
    /// next write counts it before gossip spreads the news.
    Announce {
        /// Group.
        group: String,
        /// Its membership proof.
        proof: [u8; 32],
    },
    /// The announcement was taken.
    AnnounceAck {
        /// Group.
        group: String,
    },
    /// A member that holds an older key of the group (its gossip showed a newer one) asks for
    /// the current key, proving each key it holds (see [`crate::keyring::request_proof`]).
    KeyRequest {
        /// Group.
        group: String,
        /// The requester's nonce.
        nonce: Nonce,
        /// For each key it holds: its id and the proof.
        proofs: Vec<(KeyId, [u8; 32])>,
    },
    /// The current key, wrapped under a key the requester proved (see
    /// [`crate::keyring::GrantContext`]).
    KeyGrant {
        /// Group.
        group: String,
        /// The granted key's id.
        id: KeyId,
        /// The id of the requester's key it is wrapped under.
        under: KeyId,
        /// The granter's nonce.
        nonce: Nonce,
        /// The key, wrapped.
        wrapped: [u8; 32],
        /// MAC under `under` over all of it.
        tag: [u8; 32],
        /// The members entitled to the key.
        entitled: Vec<String>,
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
            | PeerMessage::DecisionAnswer { group, .. }
            | PeerMessage::Accepted { group, .. }
            | PeerMessage::Recover { group, .. }
            | PeerMessage::Promise { group, .. }
            | PeerMessage::LeaseRequest { group, .. }
            | PeerMessage::LeaseGrant { group, .. }
            | PeerMessage::Announce { group, .. }
            | PeerMessage::AnnounceAck { group }
            | PeerMessage::KeyRequest { group, .. }
            | PeerMessage::KeyGrant { group, .. } => group,
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
            PeerMessage::Accepted { .. } => "accepted",
            PeerMessage::Recover { .. } => "recover",
            PeerMessage::Promise { .. } => "promise",
            PeerMessage::LeaseRequest { .. } => "lease_request",
            PeerMessage::LeaseGrant { .. } => "lease_grant",
            PeerMessage::Announce { .. } => "announce",
            PeerMessage::AnnounceAck { .. } => "announce_ack",
            PeerMessage::KeyRequest { .. } => "key_request",
            PeerMessage::KeyGrant { .. } => "key_grant",
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
            (group, bytes).prop_map(|(group, snapshot)| PeerMessage::JoinGrant {
                group,
                mode: Mode::Strong,
                snapshot,
                members: vec!["n1".into()]
            }),
            (group, any::<u64>(), ".{0,8}").prop_map(|(group, number, node)| PeerMessage::Recover {
                group,
                round: RoundId { lamport: number, node: node.clone(), start: 7 },
                ballot: Ballot { number, node },
                kind: RoundKind::Write,
            }),
            (group, any::<u64>()).prop_map(|(group, sent)| PeerMessage::LeaseGrant {
                group,
                sent,
                configuration: 3,
                heads: vec![[1; 32]],
                staged: Some((RoundId { lamport: 1, node: "n".into(), start: 2 }, [2; 32])),
            }),
            (group, ".{0,20}").prop_map(|(group, reason)| PeerMessage::JoinRefused { group, reason }),
            (group, any::<[u8; 32]>(), any::<u64>()).prop_map(|(group, nonce, generation)| PeerMessage::KeyRequest {
                group,
                nonce,
                proofs: vec![(KeyId { generation, tag: [3; 8] }, nonce)],
            }),
            (group, any::<[u8; 32]>(), any::<u64>()).prop_map(|(group, wrapped, generation)| PeerMessage::KeyGrant {
                group,
                id: KeyId { generation, tag: [1; 8] },
                under: KeyId { generation: 0, tag: [2; 8] },
                nonce: wrapped,
                wrapped,
                tag: [4; 32],
                entitled: vec!["n1".into(), "n2".into()],
            }),
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
