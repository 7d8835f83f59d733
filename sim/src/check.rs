//! Invariant checks. Two kinds:
//!
//! * Protocol checks on frames as nodes send them (docs/protocol.md: E1, S1, S2), which ask the
//!   simulated disk ([`crate::disk`]) what the sender holds durably at the instant it sends: an
//!   `Ack` only for changes durable on the acker; a yes `Vote` only for a round staged durably
//!   (with the round's change) on the voter; an `Accepted{ok: true}` only after the acceptor
//!   durably recorded that ballot's decision; a commit `Decide` only after every member's yes
//!   vote reached the coordinator. Each is a few map lookups, so they run at any mesh size.
//! * SPEC invariants over what clients and watchers saw ([`crate::workload`] records them and
//!   calls in here): convergence (1), no lost commit (2), strong atomicity and fencing (3),
//!   watch completeness (4), membership detection and false positives (5).
//!
//! A violation stops the run; the report prints the seed, the time, the invariant and the
//! command that replays it.

use std::collections::{BTreeMap, BTreeSet};

use konor_crdt::{ChangeHash, PeerMessage};
use konor_sdk::protocol::{Request, Response};

use crate::disk::Disk;
use crate::node::{Life, call};
use crate::workload::{GroupKind, Outcome, Sim};

/// Invariant names as reports print them.
pub mod invariant {
    /// SPEC 1.
    pub const CONVERGENCE: &str = "1 convergence";
    /// SPEC F11: after healing, every holder of the strong group is in its configuration.
    pub const CONFIGURATION: &str = "1 configuration converges";
    /// SPEC 2.
    pub const NO_LOST_COMMIT: &str = "2 no lost commit";
    /// SPEC F9/F10: with every member up and reachable, an eventual commit is acknowledged by
    /// a quorum of all of them (a node that just started or resumed must not commit alone).
    pub const QUORUM: &str = "2 quorum of the members up";
    /// protocol-peer E1, the ground of SPEC 2.
    pub const DURABLE_ACK: &str = "2/E1 ack only after durable";
    /// SPEC 3.
    pub const STRONG_ATOMICITY: &str = "3 strong atomicity";
    /// protocol-peer S2: a round has exactly one outcome, so one change.
    pub const ONE_ROUND_ONE_CHANGE: &str = "3/S2 one round id, one change";
    /// SPEC 3, second half (F12).
    pub const FENCING: &str = "3 fencing";
    /// SPEC 3: the committed versions of a strong group form one sequence.
    pub const ONE_SEQUENCE: &str = "3 one committed sequence";
    /// protocol-peer S1, the ground of SPEC 3.
    pub const ALL_ACK: &str = "3/S1 commit only after every member staged";
    /// protocol-peer S2 under recovery: an acceptance a recovery may count must survive a crash.
    pub const DURABLE_ACCEPT: &str = "3/S2 accepted only after durable";
    /// SPEC 4.
    pub const WATCH: &str = "4 watch completeness";
    /// SPEC 5, detection.
    pub const DETECTION: &str = "5 membership detection";
    /// SPEC 5, false positives.
    pub const FALSE_DEAD: &str = "5 no false dead";
    /// A node stopped on its own (its gossip task ended, its store failed).
    pub const NODE_EXIT: &str = "node exited";
    /// Simulated time must keep advancing: a task that never waits stalls every node.
    pub const LIVENESS: &str = "liveness (no busy loop)";
}

/// An invariant that did not hold.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Simulated microseconds since the start.
    pub at_us: u64,
    /// Which invariant ([`invariant`]).
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}

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

/// One member's copy of a group as its node serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// Its revision.
    pub revision: u64,
    /// Its settings' content hash.
    pub content_hash: String,
    /// Its settings.
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// Every running member's copy of `group`.
pub async fn served(sim: &Sim, group: GroupKind) -> BTreeMap<usize, Served> {
    let members: Vec<usize> =
        sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
    let mut states = BTreeMap::new();
    for node in members {
        if sim.cluster.borrow().nodes[node].life != Life::Up {
            continue;
        }
        if let Some(Response::Snapshot { settings, content_hash, freshness, .. }) =
            call(&sim.cluster, node, Request::Snapshot { group: group.name().to_owned() }).await
        {
            states.insert(node, Served { revision: freshness.revision, content_hash, settings });
        }
    }
    states
}

/// Waits until every running member of both groups serves the same settings at the same
/// revision (SPEC 1); returns how long that took, or records a violation after `bound`.
pub async fn await_convergence(sim: &Sim, bound: std::time::Duration) -> Option<u64> {
    let start = sim.now_us();
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let mut diverged = Vec::new();
        for group in GroupKind::ALL {
            let states = served(sim, group).await;
            let distinct: BTreeSet<(u64, &str)> =
                states.values().map(|s| (s.revision, s.content_hash.as_str())).collect();
            if distinct.len() > 1 {
                let sample: Vec<String> = states
                    .iter()
                    .take(12)
                    .map(|(n, s)| format!("n{n}@r{}/{}", s.revision, s.content_hash.get(..8).unwrap_or("")))
                    .collect();
                diverged.push(format!("{}: {} distinct states ({})", group.name(), distinct.len(), sample.join(" ")));
            }
        }
        if diverged.is_empty() {
            return Some(sim.now_us() - start);
        }
        if tokio::time::Instant::now() >= deadline || sim.failed() {
            // What the members say of themselves, for whoever reads the report.
            let mut notes = Vec::new();
            for group in GroupKind::ALL {
                let members: Vec<usize> =
                    sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
                for node in members {
                    let request = Request::Status { group: group.name().to_owned() };
                    if let Some(Response::Status { degraded: Some(why), .. }) = call(&sim.cluster, node, request).await
                    {
                        notes.push(format!("n{node} degraded: {why}"));
                    }
                }
            }
            let notes = if notes.is_empty() { String::new() } else { format!(" [{}]", notes.join("; ")) };
            sim.violation(
                invariant::CONVERGENCE,
                format!("members still differ {:?} after healing: {}{notes}", bound, diverged.join("; ")),
            );
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// After convergence: identical heads digests on every running member (SPEC 1, same heads),
/// within `bound`. The served state can agree before the heads do: a member that accepted a
/// commit whose decision it has not heard yet applies it when the decision arrives or when it
/// asks (seconds at most).
pub async fn check_heads(sim: &Sim, bound: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let differ = heads_differ(sim).await;
        if differ.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline || sim.failed() {
            for detail in differ {
                sim.violation(invariant::CONVERGENCE, format!("{detail} ({bound:?} after the state converged)"));
            }
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The groups whose running members report different heads now, described.
async fn heads_differ(sim: &Sim) -> Vec<String> {
    let mut differ = Vec::new();
    for group in GroupKind::ALL {
        let members: Vec<usize> =
            sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
        let mut digests: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for node in members {
            if sim.cluster.borrow().nodes[node].life != Life::Up {
                continue;
            }
            let own = format!("n{node}");
            if let Some(Response::Status { nodes, .. }) =
                call(&sim.cluster, node, Request::Status { group: group.name().to_owned() }).await
                && let Some(row) = nodes.iter().find(|row| row.node == own)
            {
                digests.entry(row.heads.clone()).or_default().push(node);
            }
        }
        if digests.len() > 1 {
            let shown: Vec<String> = digests
                .iter()
                .map(|(digest, nodes)| {
                    let names: Vec<String> = nodes.iter().map(|n| format!("n{n}")).collect();
                    format!("{digest} on [{}]", names.join(", "))
                })
                .collect();
            differ.push(format!("{} heads differ: {}", group.name(), shown.join(", ")));
        }
    }
    differ
}

/// After healing, every running node that holds the strong group is in its configuration,
/// and all of them agree on it, within `bound`: evicted members catch up and rejoin on their
/// own (SPEC F11). Rounds left in doubt by a lost decision settle first (seconds each).
pub async fn check_configurations(sim: &Sim, bound: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let problem = configuration_problem(sim).await;
        let Some(problem) = problem else { return };
        if tokio::time::Instant::now() >= deadline {
            sim.violation(invariant::CONFIGURATION, format!("{problem} ({bound:?} after the state converged)"));
            return;
        }
        if sim.failed() {
            // Another check failed: report what is seen now, without waiting out the bound.
            sim.violation(invariant::CONFIGURATION, format!("{problem} (when another check failed)"));
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What is wrong with the strong group's configuration now, if anything.
async fn configuration_problem(sim: &Sim) -> Option<String> {
    let holders: Vec<usize> =
        sim.records.borrow().members.get(&GroupKind::Strong).map(|m| m.iter().copied().collect()).unwrap_or_default();
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for node in holders {
        if sim.cluster.borrow().nodes[node].life != Life::Up {
            continue;
        }
        let request = Request::Status { group: GroupKind::Strong.name().to_owned() };
        if let Some(Response::Status { configuration: Some(configuration), .. }) =
            call(&sim.cluster, node, request).await
        {
            seen.entry(configuration).or_default().push(node);
        }
    }
    let up: Vec<usize> = seen.values().flatten().copied().collect();
    // `c7 [n0, n2]`: the members are between the brackets.
    let members_of = |text: &str| -> BTreeSet<String> {
        let inner = text.split_once('[').and_then(|(_, rest)| rest.split_once(']')).map_or("", |(inner, _)| inner);
        inner.split(", ").filter(|m| !m.is_empty()).map(str::to_owned).collect()
    };
    let outside: Vec<String> = seen
        .keys()
        .flat_map(|configuration| {
            let members = members_of(configuration);
            up.iter().map(|n| format!("n{n}")).filter(move |n| !members.contains(n))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    (seen.len() > 1 || !outside.is_empty()).then(|| {
        let shown: Vec<String> = seen.iter().map(|(c, nodes)| format!("{c} on {} node(s)", nodes.len())).collect();
        format!(
            "the strong group's configuration is [{}]; holders outside it: [{}]",
            shown.join("; "),
            outside.join(", ")
        )
    })
}

/// Every write answered `Committed` is in the history of every running member (SPEC 2).
pub async fn check_lost_commits(sim: &Sim) {
    for group in GroupKind::ALL {
        let committed: Vec<u64> = sim
            .records
            .borrow()
            .writes
            .iter()
            .filter(|w| w.group == group && matches!(w.outcome, Outcome::Committed { .. }))
            .map(|w| w.seq)
            .collect();
        if committed.is_empty() {
            continue;
        }
        let members: Vec<usize> =
            sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
        for node in members {
            if sim.cluster.borrow().nodes[node].life != Life::Up {
                continue;
            }
            let Some(Response::History { versions, .. }) =
                call(&sim.cluster, node, Request::History { group: group.name().to_owned() }).await
            else {
                continue;
            };
            let messages: BTreeSet<&str> = versions.iter().map(|v| v.message.as_str()).collect();
            let lost: Vec<String> =
                committed.iter().map(|seq| format!("w{seq}")).filter(|m| !messages.contains(m.as_str())).collect();
            if !lost.is_empty() {
                sim.violation(
                    invariant::NO_LOST_COMMIT,
                    format!("n{node} lacks committed write(s) [{}] of {}", lost.join(", "), group.name()),
                );
                return;
            }
        }
    }
}

/// Each watcher rebuilt exactly its node's final settings from its snapshot and events (SPEC 4:
/// every change once, in order, or a resync).
pub fn check_watchers(sim: &Sim, finals: &BTreeMap<GroupKind, BTreeMap<usize, Served>>) {
    let mut found = Vec::new();
    {
        let records = sim.records.borrow();
        for ((node, group), watcher) in &records.watchers {
            let Some(state) = finals.get(group).and_then(|states| states.get(node)) else { continue };
            if !watcher.active {
                continue;
            }
            if watcher.revision != state.revision {
                found.push(format!(
                    "watcher of {} on n{node} stopped at revision {} but the node is at {}",
                    group.name(),
                    watcher.revision,
                    state.revision
                ));
            } else if watcher.settings != state.settings {
                let differing: Vec<&String> = watcher
                    .settings
                    .keys()
                    .chain(state.settings.keys())
                    .filter(|k| watcher.settings.get(*k) != state.settings.get(*k))
                    .take(5)
                    .collect();
                found.push(format!(
                    "watcher of {} on n{node} rebuilt other settings than the node serves at revision {} (keys {differing:?})",
                    group.name(),
                    state.revision
                ));
            }
        }
    }
    if let Some(first) = found.first() {
        sim.violation(invariant::WATCH, format!("{first} ({} watcher(s) in all)", found.len()));
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
        Err(error) => format!("undecodable: {error}"),
    }
}

/// Percentile of sorted values (nearest rank); `None` for no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 99.9), Some(3.0));
    }
}
