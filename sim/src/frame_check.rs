//! Protocol checks on frames as nodes send them (docs/protocol.md: E1, S1, S2), which ask the
//! simulated disk ([`crate::disk`]) what the sender holds durably at the instant it sends: an
//! `Ack` only for changes durable on the acker; a yes `Vote` only for a round staged durably
//! (with the round's change) on the voter; an `Accepted{ok: true}` only after the acceptor
//! durably recorded that ballot's decision; a commit `Decide` only after every member's yes
//! vote reached the coordinator. Each is a few map lookups, so they run at any mesh size. The
//! network ([`crate::network`]) calls in here as frames leave and arrive.

use std::collections::{BTreeMap, BTreeSet};

use konor_crdt::{ChangeHash, PeerMessage};

use crate::disk::Disk;
use crate::invariant;

/// What the checker needs to hear again when a frame is delivered.
#[derive(Debug, Clone)]
pub enum Observed {
    /// A yes vote reached its coordinator.
    VoteYes {
        /// Round key.
        round: RoundKey,
        /// The voter.
        voter: String,
    },
}

/// (group, round id): a round's identity.
pub type RoundKey = (String, konor_crdt::peer_message::RoundId);

#[derive(Debug)]
struct RoundSeen {
    /// A write (every member must vote yes) rather than a configuration change.
    write: bool,
    members: BTreeSet<String>,
    change: Option<ChangeHash>,
    yes_delivered: BTreeSet<String>,
    decided: bool,
}

/// Checks E1, S1 and S2 on frames.
#[derive(Debug)]
pub struct ProtocolChecker {
    rounds: BTreeMap<RoundKey, RoundSeen>,
    /// What each node holds durably.
    disk: Disk,
    /// Acks checked against the disk.
    pub acks_checked: u64,
    /// Yes votes checked against the disk.
    pub votes_checked: u64,
    /// Acceptances checked against the disk.
    pub accepts_checked: u64,
    /// Commit decisions checked against delivered votes.
    pub decisions_checked: u64,
}

/// Rounds remembered at most; older ones are forgotten (they were decided long ago).
const ROUNDS_KEPT: usize = 4096;

impl ProtocolChecker {
    /// A checker asking `disk` what nodes hold durably.
    pub fn new(disk: Disk) -> ProtocolChecker {
        ProtocolChecker {
            rounds: BTreeMap::new(),
            disk,
            acks_checked: 0,
            votes_checked: 0,
            accepts_checked: 0,
            decisions_checked: 0,
        }
    }

    /// Looks at a replica frame from node `from` (`from_id`) to `to_id` as it is sent; returns
    /// what to watch for at its delivery and any violations.
    pub fn on_send(
        &mut self,
        from: usize,
        from_id: &str,
        to_id: &str,
        bytes: &[u8],
    ) -> (Option<Observed>, Vec<(&'static str, String)>) {
        let mut found = Vec::new();
        let Ok(message) = PeerMessage::decode(bytes) else { return (None, found) };
        match message {
            PeerMessage::Ack { group, changes } => {
                self.acks_checked += 1;
                let mut disk = self.disk.lock();
                let missing: Vec<String> =
                    changes.iter().filter(|hash| !disk.change_durable(from, &group, hash)).map(hex8).collect();
                if !missing.is_empty() {
                    found.push((
                        invariant::DURABLE_ACK,
                        format!(
                            "{from_id} acked change(s) [{}] of {group} to {to_id} but its disk does not hold them durably",
                            missing.join(", ")
                        ),
                    ));
                }
                (None, found)
            }
            PeerMessage::Prepare { group, round, change, members, kind, .. } => {
                let key = (group.clone(), round.clone());
                let change = konor_crdt::exchange::decode_change(&change).ok().map(|c| c.hash());
                if let Some(seen) = self.rounds.get(&key)
                    && seen.change != change
                {
                    // One round id, two changes: members still holding the first change staged
                    // under this id would vote yes for, and then commit, the wrong change.
                    found.push((
                        invariant::ONE_ROUND_ONE_CHANGE,
                        format!(
                            "{from_id} prepared round {round} of {group} again with a different change (the id was used before, e.g. before a restart)"
                        ),
                    ));
                    self.rounds.remove(&key);
                }
                self.rounds.entry(key).or_insert_with(|| RoundSeen {
                    write: kind == konor_crdt::peer_message::RoundKind::Write,
                    members: members.into_iter().collect(),
                    change,
                    yes_delivered: BTreeSet::new(),
                    decided: false,
                });
                while self.rounds.len() > ROUNDS_KEPT {
                    self.rounds.pop_first();
                }
                (None, found)
            }
            PeerMessage::Vote { group, round, yes: true, .. } => {
                let key = (group.clone(), round.clone());
                let Some(seen) = self.rounds.get(&key).filter(|seen| !seen.decided) else {
                    // A vote for a round already decided (or never prepared here) decides nothing.
                    return (None, found);
                };
                self.votes_checked += 1;
                let observed = Some(Observed::VoteYes { round: key.clone(), voter: from_id.to_owned() });
                let mut disk = self.disk.lock();
                // Staged under this round id *with this round's change*, or already applied.
                let durable = seen.change.is_some_and(|hash| {
                    disk.staged_durable(from, &group, &round, &hash.0) || disk.change_durable(from, &group, &hash.0)
                });
                if !durable {
                    found.push((
                        invariant::ALL_ACK,
                        format!("{from_id} voted yes for round {round} of {group} without staging it durably"),
                    ));
                }
                (observed, found)
            }
            PeerMessage::Accepted { group, round, ballot, ok: true, .. } => {
                self.accepts_checked += 1;
                if !self.disk.lock().accepted_durable(from, &group, &round, &ballot) {
                    found.push((
                        invariant::DURABLE_ACCEPT,
                        format!(
                            "{from_id} answered Accepted for round {round} of {group} at ballot {ballot} without recording it durably"
                        ),
                    ));
                }
                (None, found)
            }
            // The coordinator's commit proposal (ballot 0): a write needs a yes from every
            // member, a configuration change from a majority at least. Recoveries (higher
            // ballots) re-propose what a majority reported; the strong history checks them.
            PeerMessage::Decide { group, round, commit, ballot } if ballot.number == 0 => {
                let key = (group.clone(), round.clone());
                if let Some(seen) = self.rounds.get_mut(&key)
                    && !seen.decided
                {
                    seen.decided = true;
                    if commit {
                        self.decisions_checked += 1;
                        let missing: Vec<&str> =
                            seen.members.difference(&seen.yes_delivered).map(String::as_str).collect();
                        let enough = if seen.write {
                            missing.is_empty()
                        } else {
                            2 * (seen.yes_delivered.len() + 1) > seen.members.len()
                        };
                        if !enough {
                            found.push((
                                invariant::ALL_ACK,
                                format!(
                                    "{from_id} decided commit of round {round} of {group} without a yes vote from [{}]",
                                    missing.join(", ")
                                ),
                            ));
                        }
                    }
                }
                (None, found)
            }
            _ => (None, found),
        }
    }

    /// A frame with something observed was delivered.
    pub fn on_delivered(&mut self, observed: Observed) {
        match observed {
            Observed::VoteYes { round, voter } => {
                if let Some(seen) = self.rounds.get_mut(&round) {
                    seen.yes_delivered.insert(voter);
                }
            }
        }
    }
}

fn hex8(bytes: &[u8; 32]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// A short description of a replica frame, for the text trace.
pub fn describe(bytes: &[u8]) -> String {
    match PeerMessage::decode(bytes) {
        Ok(PeerMessage::Changes { group, changes }) => format!("Changes {group} x{}", changes.len()),
        Ok(PeerMessage::Sync { group, message }) => format!("Sync {group} {}B", message.len()),
        Ok(PeerMessage::Ack { group, changes }) => {
            let hashes: Vec<String> = changes.iter().map(hex8).collect();
            format!("Ack {group} [{}]", hashes.join(","))
        }
        Ok(PeerMessage::Prepare { group, round, members, .. }) => {
            format!("Prepare {group} {round} members [{}]", members.join(","))
        }
        Ok(PeerMessage::Vote { group, round, yes, reason }) => format!("Vote {group} {round} yes={yes} {reason}"),
        Ok(PeerMessage::Decide { group, round, commit, ballot }) => {
            format!("Decide {group} {round} {ballot} commit={commit}")
        }
        Ok(PeerMessage::Accepted { group, round, ballot, ok, .. }) => {
            format!("Accepted {group} {round} {ballot} ok={ok}")
        }
        Ok(PeerMessage::Recover { group, round, ballot, .. }) => format!("Recover {group} {round} {ballot}"),
        Ok(PeerMessage::Promise { group, round, ballot, ok, accepted, .. }) => {
            format!("Promise {group} {round} {ballot} ok={ok} accepted={accepted:?}")
        }
        Ok(PeerMessage::LeaseRequest { group, .. }) => format!("LeaseRequest {group}"),
        Ok(PeerMessage::LeaseGrant { group, configuration, .. }) => format!("LeaseGrant {group} c{configuration}"),
        Ok(PeerMessage::Announce { group, .. }) => format!("Announce {group}"),
        Ok(PeerMessage::AnnounceAck { group }) => format!("AnnounceAck {group}"),
        Ok(PeerMessage::DecisionQuery { group, round, .. }) => format!("DecisionQuery {group} {round}"),
        Ok(PeerMessage::DecisionAnswer { group, round, outcome }) => {
            format!("DecisionAnswer {group} {round} {outcome:?}")
        }
        Ok(PeerMessage::JoinRequest { group, .. }) => format!("JoinRequest {group}"),
        Ok(PeerMessage::JoinChallenge { group, .. }) => format!("JoinChallenge {group}"),
        Ok(PeerMessage::JoinProof { group, .. }) => format!("JoinProof {group}"),
        Ok(PeerMessage::JoinGrant { group, .. }) => format!("JoinGrant {group}"),
        Ok(PeerMessage::JoinRefused { group, reason }) => format!("JoinRefused {group} {reason}"),
        Ok(PeerMessage::KeyRequest { group, proofs, .. }) => format!("KeyRequest {group} x{}", proofs.len()),
        Ok(PeerMessage::KeyGrant { group, id, .. }) => format!("KeyGrant {group} {}", id.encode()),
        Err(error) => format!("undecodable: {error}"),
    }
}
