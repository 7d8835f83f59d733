//! The clients of a run: writers that set, delete, apply and roll back on an eventual and a
//! strong group from random members; readers that take snapshots of the strong group (fencing
//! checks); and one watcher per node and group, standing for an app on that node, recording
//! every change it was served.
//!
//! Every write carries a unique marker: its commit message is `w<seq>` and, for sets and applies,
//! the key `w<seq>` holds `seq`. Watchers report when each node first served a marker (how fast
//! changes spread), histories at the end show which commits survived, and a strong-group marker
//! served anywhere proves that write visible.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use konor_node::api::socket::{LocalCall, WatchSender};
use konor_sdk::protocol::{ErrorCode, Request, Response, WatchEvent, WriteMeta};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::config::RunConfig;
use crate::invariant;
use crate::node::{Cluster, Life, call};
use crate::rng::SimRng;

/// How long after a fault (other than the writer's own restart or resume) the quorum check
/// waits: the failure detector's bound plus its view refresh, so views have caught up.
const QUORUM_SETTLE_US: u64 = 3_000_000;

/// Keys that writes overwrite and delete (besides their own markers): few, so deletes and
/// concurrent sets meet on the same keys.
const PLAIN_KEYS: u64 = 16;

/// The two groups of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKind {
    /// Eventual consistency; every node is a member.
    Eventual,
    /// Strong consistency; the first `strong_members` nodes are members.
    Strong,
    /// Eventual consistency with release policy `gated` (SPEC F14): writes are served only
    /// once a release targets them; every node is a member.
    Gated,
}

impl GroupKind {
    /// The group's name.
    pub fn name(self) -> &'static str {
        match self {
            GroupKind::Eventual => "ev",
            GroupKind::Strong => "st",
            GroupKind::Gated => "gt",
        }
    }

    /// The group's mode as `GroupCreate` takes it.
    pub fn mode(self) -> &'static str {
        match self {
            GroupKind::Eventual | GroupKind::Gated => "eventual",
            GroupKind::Strong => "strong",
        }
    }

    /// Every group of a run.
    pub const ALL: [GroupKind; 3] = [GroupKind::Eventual, GroupKind::Strong, GroupKind::Gated];
}

/// What a write does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Set the marker and one plain key.
    Set,
    /// Delete one plain key.
    Delete,
    /// Apply a JSON file: the node's current settings plus the marker and one plain key.
    Apply,
    /// Roll back to the version before the latest.
    Rollback,
    /// Release the node's latest version to all or as a canary, or promote or abort the
    /// current release (the gated group only).
    Release,
}

/// How a write ended, as its client saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No answer yet.
    Pending,
    /// Committed (eventual: a live quorum holds it; strong: every member of the configuration
    /// staged it and a majority recorded the decision).
    Committed {
        /// The writer's revision after it.
        revision: u64,
        /// The version created.
        version: String,
        /// Nodes that hold it durably.
        acked_by: Vec<String>,
    },
    /// Eventual write applied on the writer but not acknowledged by a quorum in time.
    NotCommitted,
    /// Strong round aborted: nothing visible anywhere.
    Aborted,
    /// Strong round whose outcome the coordinator could not learn: committed everywhere or
    /// nowhere, the checks accept either.
    Unknown,
    /// Another strong round was in flight: nothing changed.
    Busy,
    /// The node could not save the change (`not_durable`). Of a strong write this says "not
    /// committed anywhere" (docs/protocol.md), so it must be invisible everywhere; an eventual
    /// change may still reach the peers it was pushed to.
    NotDurable { strong: bool },
    /// Refused before anything changed (unchanged, no such key or version).
    Refused(String),
    /// The node went down before answering: unknown.
    Lost,
    /// Another error.
    Failed(String),
}

impl Outcome {
    /// True when the write certainly became visible nowhere.
    pub fn certainly_invisible(&self) -> bool {
        matches!(self, Outcome::Aborted | Outcome::Busy | Outcome::Refused(_) | Outcome::NotDurable { strong: true })
    }

    /// A short name for counts.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Committed { .. } => "committed",
            Outcome::NotCommitted => "not-committed",
            Outcome::Aborted => "aborted",
            Outcome::Unknown => "unknown",
            Outcome::Busy => "busy",
            Outcome::NotDurable { .. } => "not-durable",
            Outcome::Refused(_) => "refused",
            Outcome::Lost => "lost-reply",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// One write.
#[derive(Debug, Clone)]
pub struct WriteRecord {
    /// Its sequence number (marker `w<seq>`).
    pub seq: u64,
    /// Group written.
    pub group: GroupKind,
    /// What it did.
    pub kind: WriteKind,
    /// The node it was sent to.
    pub node: usize,
    /// When it was sent (simulated µs).
    pub issued_us: u64,
    /// When it was answered.
    pub replied_us: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// True when its marker key was part of the write (sets and applies).
    pub has_marker: bool,
}

/// What one watcher (an app on one node, watching one group) has seen.
#[derive(Debug, Clone, Default)]
pub struct WatcherState {
    /// Last revision served.
    pub revision: u64,
    /// The settings rebuilt from the snapshot and every event since.
    pub settings: BTreeMap<String, Value>,
    /// Change events received.
    pub events: u64,
    /// Resync events received.
    pub resyncs: u64,
    /// True while subscribed.
    pub active: bool,
    /// True once it has a starting point (a snapshot or a previous subscription).
    pub initialized: bool,
}

/// Everything the clients observed.
#[derive(Debug, Default)]
pub struct Records {
    /// Writes by sequence number (index = seq).
    pub writes: Vec<WriteRecord>,
    /// For each marker, the first time each node served it.
    pub sightings: BTreeMap<u64, BTreeMap<usize, u64>>,
    /// Watchers by (node, group).
    pub watchers: BTreeMap<(usize, GroupKind), WatcherState>,
    /// Members of each group (nodes whose join succeeded).
    pub members: BTreeMap<GroupKind, BTreeSet<usize>>,
    /// The strong group's history as clients saw it (one sequence, no stale read as fresh).
    pub strong: crate::history::StrongHistory,
    /// Strong reads answered fresh.
    pub reads_fresh: u64,
    /// Strong reads answered stale.
    pub reads_stale: u64,
    /// Strong reads not answered (node down).
    pub reads_unanswered: u64,
    /// Watcher events checked.
    pub watch_events: u64,
    /// Each group's key, for joins during the run.
    pub keys: BTreeMap<GroupKind, konor_sdk::Secret>,
    /// Strong-group joins and leaves during the run: (joins, leaves, failed attempts).
    pub churn: (u64, u64, u64),
    /// Group key rotations during the run: (answered rotated, not answered or refused).
    pub rotations: (u64, u64),
    /// When each fault began or ended (crash, restart, pause, resume, partition, heal), with
    /// the node it concerned (none for a partition).
    pub fault_events: Vec<(u64, Option<usize>)>,
    /// Eventual commits checked against the quorum of all members (no fault during them).
    pub quorums_checked: u64,
    /// The version counters a release of the gated group targeted (recorded when the release
    /// is sent, since it may take effect even if its answer is lost), and 1, the version a
    /// gated group serves before any release.
    pub released: BTreeSet<u64>,
    /// Watch events of the gated group checked against `released`.
    pub gated_events: u64,
    /// The content hashes (12 hex digits, as history shows them) of the versions a release
    /// targeted: what a gated group's member may serve, besides the empty settings.
    pub released_hashes: BTreeSet<String>,
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nodes start, the mesh forms, groups are created and joined.
    Setup,
    /// Workload and faults.
    Active,
    /// Faults healed, no new writes; waiting for convergence.
    Healing,
    /// Over.
    Done,
}

/// What every simulation task shares (single thread: `Rc`, `RefCell`).
#[derive(Debug, Clone)]
pub struct Sim {
    /// The run's configuration.
    pub config: Rc<RunConfig>,
    /// The nodes and the network.
    pub cluster: Rc<RefCell<Cluster>>,
    /// Observations.
    pub records: Rc<RefCell<Records>>,
    /// The workload's random stream.
    pub rng: Rc<RefCell<SimRng>>,
    /// The current phase.
    pub phase: Rc<Cell<Phase>>,
}

impl Sim {
    /// Simulated microseconds since the start.
    pub fn now_us(&self) -> u64 {
        self.cluster.borrow().network.lock().now_us()
    }

    /// Records an invariant violation.
    pub fn violation(&self, invariant: &'static str, detail: String) {
        self.cluster.borrow().network.lock().violation(invariant, detail);
    }

    /// Adds an event to the trace.
    pub fn trace(&self, text: &str) {
        let cluster = self.cluster.borrow();
        let mut hub = cluster.network.lock();
        let now = hub.now_us();
        hub.trace.event(now, text);
    }

    /// True once a violation was found.
    pub fn failed(&self) -> bool {
        !self.cluster.borrow().network.lock().violations.is_empty()
    }

    /// A random member of `group` that is not down, if any.
    fn pick_member(&self, group: GroupKind) -> Option<usize> {
        let members: Vec<usize> = {
            let records = self.records.borrow();
            let cluster = self.cluster.borrow();
            records
                .members
                .get(&group)
                .map(|m| m.iter().copied().filter(|&i| cluster.nodes[i].life != Life::Down).collect())
                .unwrap_or_default()
        };
        if members.is_empty() {
            return None;
        }
        let pick = self.rng.borrow_mut().index(members.len());
        Some(members[pick])
    }
}

fn meta(seq: u64) -> WriteMeta {
    WriteMeta { author: "konor-sim".to_owned(), message: format!("w{seq}"), ..WriteMeta::default() }
}

/// The counter of a version label (`v12` or `v12-3fa9` -> 12).
pub fn version_counter(label: &str) -> Option<u64> {
    label.strip_prefix('v')?.split('-').next()?.parse().ok()
}

/// The sequence number of a marker key (`w17` -> 17).
pub fn marker_seq(key: &str) -> Option<u64> {
    key.strip_prefix('w')?.parse().ok()
}

/// Issues writes at the configured rate while the phase is active.
pub async fn writers(sim: Sim) {
    loop {
        let Some(gap_s) = sim.rng.borrow_mut().exponential_s(sim.config.workload.writes_per_s) else { return };
        tokio::time::sleep(Duration::from_secs_f64(gap_s)).await;
        if sim.phase.get() != Phase::Active {
            return;
        }
        let task_sim = sim.clone();
        tokio::task::spawn_local(write_once(task_sim));
    }
}

async fn write_once(sim: Sim) {
    let strong_share = if sim.config.strong_member_count() > 0 { 0.3 } else { 0.0 };
    let (group, kind, plain) = {
        let mut rng = sim.rng.borrow_mut();
        let group = if rng.chance(strong_share) {
            GroupKind::Strong
        } else if rng.chance(0.25) {
            GroupKind::Gated
        } else {
            GroupKind::Eventual
        };
        let roll = rng.unit();
        let kind = match roll {
            r if group == GroupKind::Gated && r < 0.3 => WriteKind::Release,
            r if r < 0.7 => WriteKind::Set,
            r if r < 0.8 => WriteKind::Delete,
            r if r < 0.9 => WriteKind::Apply,
            _ => WriteKind::Rollback,
        };
        (group, kind, rng.between(0, PLAIN_KEYS - 1))
    };
    let Some(node) = sim.pick_member(group) else { return };
    let seq = {
        let mut records = sim.records.borrow_mut();
        let seq = records.writes.len() as u64;
        records.writes.push(WriteRecord {
            seq,
            group,
            kind,
            node,
            issued_us: sim.now_us(),
            replied_us: None,
            outcome: Outcome::Pending,
            has_marker: matches!(kind, WriteKind::Set | WriteKind::Apply),
        });
        seq
    };
    let name = group.name().to_owned();
    let marker = format!("w{seq}");
    let request = match kind {
        WriteKind::Set => {
            // In the gated group, some writes go to an overlay (SPEC F29): the nodes of one
            // parity serve them once released.
            let overlay = group == GroupKind::Gated && sim.rng.borrow_mut().chance(0.3);
            let key = match (overlay, seq % 2) {
                (false, _) => format!("k{plain}"),
                (true, 0) => format!("k{plain}@parity=even"),
                (true, _) => format!("k{plain}@parity=odd"),
            };
            let entries = BTreeMap::from([(marker, Value::from(seq)), (key, Value::from(format!("v{seq}")))]);
            Some(Request::Set { group: name, entries, meta: meta(seq) })
        }
        WriteKind::Delete => Some(Request::Delete { group: name, keys: vec![format!("k{plain}")], meta: meta(seq) }),
        WriteKind::Apply => {
            match call(&sim.cluster, node, Request::Snapshot { group: name.clone(), prefix: None }).await {
                Some(Response::Snapshot { mut settings, .. }) => {
                    settings.insert(marker, Value::from(seq));
                    settings.insert(format!("k{plain}"), Value::from(format!("a{seq}")));
                    let text = Value::Object(settings.into_iter().collect()).to_string();
                    Some(Request::Apply { group: name, format: "json".to_owned(), text, meta: meta(seq) })
                }
                _ => None,
            }
        }
        WriteKind::Rollback => match call(&sim.cluster, node, Request::History { group: name.clone() }).await {
            Some(Response::History { versions, .. }) if versions.len() >= 2 => {
                let version = versions[versions.len() - 2].label.clone();
                Some(Request::Rollback { group: name, version, meta: meta(seq) })
            }
            Some(_) => None,
            None => None,
        },
        WriteKind::Release => {
            // Half the releases reach every member, the rest are canaries; promotions and
            // aborts act on whatever release is current on the writer.
            let roll = sim.rng.borrow_mut().unit();
            match roll {
                r if r < 0.15 => Some(Request::Promote { group: name, wave: None, meta: meta(seq) }),
                r if r < 0.25 => Some(Request::Abort { group: name, reason: Some(format!("w{seq}")), meta: meta(seq) }),
                r => match call(&sim.cluster, node, Request::History { group: name.clone() }).await {
                    Some(Response::History { versions, .. }) => {
                        versions.iter().rev().find(|v| !matches!(v.kind.as_str(), "release" | "promote" | "abort")).map(
                            |latest| {
                                {
                                    let mut records = sim.records.borrow_mut();
                                    if let Some(counter) = version_counter(&latest.label) {
                                        records.released.insert(counter);
                                    }
                                    records.released_hashes.insert(latest.content_hash.clone());
                                }
                                let canary = r >= 0.6;
                                Request::Release {
                                    group: name,
                                    version: latest.label.clone(),
                                    strategy: Some(if canary { "canary" } else { "all" }.to_owned()),
                                    waves: canary.then(|| vec![30, 60, 100]),
                                    selector: None,
                                    bake_ms: None,
                                    max_failed: None,
                                    max_error_rate: None,
                                    node_health: None,
                                    meta: meta(seq),
                                }
                            },
                        )
                    }
                    _ => None,
                },
            }
        }
    };
    let response = match request {
        Some(request) => call(&sim.cluster, node, request).await,
        None => None,
    };
    let outcome = match response {
        None => Outcome::Lost,
        Some(Response::Committed { revision, acked_by, version, .. }) => {
            Outcome::Committed { revision, version, acked_by }
        }
        Some(Response::Error { code, message }) => match code {
            ErrorCode::NotCommitted => Outcome::NotCommitted,
            ErrorCode::Aborted => Outcome::Aborted,
            ErrorCode::OutcomeUnknown => Outcome::Unknown,
            ErrorCode::Busy => Outcome::Busy,
            ErrorCode::NotDurable => Outcome::NotDurable { strong: group == GroupKind::Strong },
            // Unavailable: this node is not (yet) in the strong group's configuration; nothing changed.
            ErrorCode::BadRequest | ErrorCode::NotFound | ErrorCode::Unchanged | ErrorCode::Unavailable => {
                Outcome::Refused(format!("{code:?}"))
            }
            _ => Outcome::Failed(format!("{code:?}: {message}")),
        },
        Some(other) => Outcome::Failed(format!("unexpected answer {other:?}")),
    };
    finish_write(&sim, seq, outcome);
}

/// Records a write's outcome and runs the checks that depend on it.
fn finish_write(sim: &Sim, seq: u64, outcome: Outcome) {
    let now = sim.now_us();
    sim.trace(&format!("write w{seq} {}", outcome.name()));
    let (group, seen_at, contradiction, quorum_violation) = {
        let mut records = sim.records.borrow_mut();
        let Some(write) = records.writes.get_mut(seq as usize) else { return };
        write.replied_us = Some(now);
        write.outcome = outcome.clone();
        let (group, node, issued_us) = (write.group, write.node, write.issued_us);
        let mut contradiction = None;
        if let (GroupKind::Eventual, Outcome::Committed { acked_by, .. }) = (group, &outcome) {
            // Ground truth: nothing failed or recovered since before the write, and every
            // member is up, so the writer's quorum is a majority of all of them.
            let members: Vec<usize> =
                records.members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
            let all_up = {
                let cluster = sim.cluster.borrow();
                members.iter().all(|&m| cluster.nodes[m].life == Life::Up) && !cluster.network.partitioned()
            };
            // The writer's own restart or resume is the case under test (issue 11, failure 5);
            // any other fault must have ended a detection bound before, so that the writer's
            // view of who is live has caught up with the truth.
            let settled = records
                .fault_events
                .iter()
                .filter(|(_, concerned)| *concerned != Some(node))
                .all(|(at, _)| at + QUORUM_SETTLE_US <= issued_us);
            if settled && all_up && sim.phase.get() == Phase::Active {
                records.quorums_checked += 1;
                let needed = members.len() / 2 + 1;
                if acked_by.len() < needed {
                    contradiction = Some(crate::history::Contradiction(format!(
                        "w{seq} committed on n{node} acked by [{}] only, with all {} members up and settled (quorum {needed})",
                        acked_by.join(", "),
                        members.len()
                    )));
                }
            }
        }
        let quorum_violation = contradiction.take();
        if let (GroupKind::Strong, Outcome::Committed { revision, version, .. }) = (group, &outcome) {
            records.strong.committed(now, *revision);
            contradiction = records.strong.observe(*revision, version, &format!("w{seq} committed on n{node}"));
        }
        let seen_at = records.sightings.get(&seq).and_then(|s| s.iter().next().map(|(n, t)| (*n, *t)));
        (group, seen_at, contradiction, quorum_violation)
    };
    if let Some(found) = contradiction {
        sim.violation(invariant::ONE_SEQUENCE, found.0);
    }
    if let Some(found) = quorum_violation {
        sim.violation(invariant::QUORUM, found.0);
    }
    if group == GroupKind::Strong
        && outcome.certainly_invisible()
        && let Some((node, at_us)) = seen_at
    {
        sim.violation(
            invariant::STRONG_ATOMICITY,
            format!("strong write w{seq} ended {outcome:?} but n{node} served it at {at_us} µs"),
        );
    }
}

/// Reads the strong group from random members while the phase is active: a read that is not
/// flagged stale must not be older than a commit its node took part in (SPEC 3, F12).
pub async fn readers(sim: Sim) {
    loop {
        let Some(gap_s) = sim.rng.borrow_mut().exponential_s(sim.config.workload.reads_per_s) else { return };
        tokio::time::sleep(Duration::from_secs_f64(gap_s)).await;
        if sim.phase.get() != Phase::Active {
            return;
        }
        let Some(node) = sim.pick_member(GroupKind::Strong) else { continue };
        let task_sim = sim.clone();
        tokio::task::spawn_local(async move {
            let asked_us = task_sim.now_us();
            let answer =
                call(&task_sim.cluster, node, Request::Snapshot { group: "st".to_owned(), prefix: None }).await;
            let Some(Response::Snapshot { freshness, .. }) = answer else {
                task_sim.records.borrow_mut().reads_unanswered += 1;
                return;
            };
            let source = format!("a read on n{node}");
            let mut records = task_sim.records.borrow_mut();
            let mut found = Vec::new();
            if let Some(contradiction) = records.strong.observe(freshness.revision, &freshness.version, &source) {
                found.push((invariant::ONE_SEQUENCE, contradiction.0));
            }
            if freshness.stale {
                records.reads_stale += 1;
            } else {
                records.reads_fresh += 1;
                if let Some(contradiction) = records.strong.fresh_read(asked_us, freshness.revision, &source) {
                    found.push((invariant::FENCING, contradiction.0));
                }
            }
            drop(records);
            for (name, detail) in found {
                task_sim.violation(name, detail);
            }
        });
    }
}

/// Changes the strong group's membership while writes run: at the configured rate a random
/// node that is up leaves the group if it holds it (never below two members), or joins it
/// otherwise (a join during writes: it must enter the configuration without losing a commit).
pub async fn churn(sim: Sim) {
    loop {
        let Some(gap_s) = sim.rng.borrow_mut().exponential_s(sim.config.workload.churn_per_s) else { return };
        tokio::time::sleep(Duration::from_secs_f64(gap_s)).await;
        if sim.phase.get() != Phase::Active {
            return;
        }
        let up = sim.cluster.borrow().indices(Life::Up);
        if up.is_empty() {
            continue;
        }
        let node = up[sim.rng.borrow_mut().index(up.len())];
        let (member, members, key) = {
            let records = sim.records.borrow();
            let members = records.members.get(&GroupKind::Strong).map_or(0, BTreeSet::len);
            let member = records.members.get(&GroupKind::Strong).is_some_and(|m| m.contains(&node));
            (member, members, records.keys.get(&GroupKind::Strong).cloned().unwrap_or_default())
        };
        let task_sim = sim.clone();
        let name = GroupKind::Strong.name().to_owned();
        if member && members > 2 {
            sim.trace(&format!("churn: n{node} leaves st"));
            // Taken out of the checked members first: from now on it may stop holding the group.
            sim.records.borrow_mut().members.entry(GroupKind::Strong).or_default().remove(&node);
            tokio::task::spawn_local(async move {
                let answer = call(&task_sim.cluster, node, Request::GroupLeave { name, force: false }).await;
                let left = matches!(answer, Some(Response::Done));
                let mut records = task_sim.records.borrow_mut();
                if left {
                    records.churn.1 += 1;
                    records.watchers.remove(&(node, GroupKind::Strong));
                } else {
                    records.churn.2 += 1;
                    records.members.entry(GroupKind::Strong).or_default().insert(node);
                }
            });
        } else if !member {
            sim.trace(&format!("churn: n{node} joins st"));
            tokio::task::spawn_local(async move {
                let answer = call(&task_sim.cluster, node, Request::GroupJoin { name, key }).await;
                if matches!(answer, Some(Response::Joined { .. })) {
                    {
                        let mut records = task_sim.records.borrow_mut();
                        records.churn.0 += 1;
                        records.members.entry(GroupKind::Strong).or_default().insert(node);
                        records.watchers.remove(&(node, GroupKind::Strong));
                    }
                    watch(&task_sim, node, GroupKind::Strong);
                } else {
                    task_sim.records.borrow_mut().churn.2 += 1;
                }
            });
        }
    }
}

/// Rotates group keys while writes run: at the configured rate a random member that is up
/// rotates the key of a random group (SPEC F23, issue 17). Later joins use the new key; a
/// member that cannot get it would miss the later writes, which the convergence check finds.
pub async fn rotations(sim: Sim) {
    loop {
        let Some(gap_s) = sim.rng.borrow_mut().exponential_s(sim.config.workload.rotations_per_s) else { return };
        tokio::time::sleep(Duration::from_secs_f64(gap_s)).await;
        if sim.phase.get() != Phase::Active {
            return;
        }
        let group = GroupKind::ALL[sim.rng.borrow_mut().index(GroupKind::ALL.len())];
        let Some(node) = sim.pick_member(group) else { continue };
        sim.trace(&format!("rotate: n{node} rotates the key of {}", group.name()));
        let task_sim = sim.clone();
        tokio::task::spawn_local(async move {
            let request = Request::GroupRotateKey { name: group.name().to_owned(), key: None };
            let answer = call(&task_sim.cluster, node, request).await;
            let mut records = task_sim.records.borrow_mut();
            match answer {
                Some(Response::KeyRotated { key, generation, .. }) => {
                    records.rotations.0 += 1;
                    records.keys.insert(group, key);
                    drop(records);
                    task_sim.trace(&format!("rotate: {} at generation {generation}", group.name()));
                }
                other => {
                    records.rotations.1 += 1;
                    drop(records);
                    task_sim.trace(&format!("rotate: {} not rotated: {}", group.name(), answer_kind(other.as_ref())));
                }
            }
        });
    }
}

/// A short name of an answer, for the trace (never a key).
fn answer_kind(answer: Option<&Response>) -> String {
    match answer {
        Some(Response::Error { code, .. }) => code.as_str().to_owned(),
        Some(response) => response.kind().to_owned(),
        None => "no answer".to_owned(),
    }
}

/// Subscribes the watcher of (node, group): from its last revision when it had one (a resume,
/// F13), else from a fresh snapshot. Runs until the node goes down.
pub fn watch(sim: &Sim, node: usize, group: GroupKind) {
    let sim = sim.clone();
    tokio::task::spawn_local(async move {
        let known = sim.records.borrow().watchers.get(&(node, group)).filter(|w| w.initialized).map(|w| w.revision);
        let from = match known {
            Some(revision) => revision,
            None => {
                let answer =
                    call(&sim.cluster, node, Request::Snapshot { group: group.name().to_owned(), prefix: None }).await;
                let Some(Response::Snapshot { settings, freshness, .. }) = answer else { return };
                let now = sim.now_us();
                let mut records = sim.records.borrow_mut();
                for key in settings.keys() {
                    if let Some(seq) = marker_seq(key) {
                        records.sightings.entry(seq).or_default().entry(node).or_insert(now);
                    }
                }
                let watcher = records.watchers.entry((node, group)).or_default();
                watcher.settings = settings;
                watcher.revision = freshness.revision;
                watcher.initialized = true;
                freshness.revision
            }
        };
        let Some((calls, client)) = sim.cluster.borrow_mut().caller(node) else { return };
        let (events_tx, mut events) = WatchSender::detached(client.connection);
        let (reply, answer) = oneshot::channel();
        let subscribe = LocalCall::Watch {
            client,
            group: group.name().to_owned(),
            from_revision: Some(from),
            prefix: None,
            events: events_tx,
            reply,
        };
        if calls.send(subscribe).await.is_err() {
            return;
        }
        match answer.await {
            Ok(Response::Watching { .. }) => {}
            _ => return,
        }
        sim.records.borrow_mut().watchers.entry((node, group)).or_default().active = true;
        while let Some(event) = events.recv().await {
            on_event(&sim, node, group, event);
        }
        if let Some(watcher) = sim.records.borrow_mut().watchers.get_mut(&(node, group)) {
            watcher.active = false;
        }
    });
}

fn on_event(sim: &Sim, node: usize, group: GroupKind, event: WatchEvent) {
    let now = sim.now_us();
    let mut found = Vec::new();
    {
        let mut records = sim.records.borrow_mut();
        records.watch_events += 1;
        let Records { watchers, sightings, writes, strong, released, gated_events, .. } = &mut *records;
        let watcher = watchers.entry((node, group)).or_default();
        let revision = event.revision();
        if group == GroupKind::Strong {
            let version = match &event {
                WatchEvent::Change { version, .. } | WatchEvent::Resync { version, .. } => version.clone(),
            };
            if let Some(contradiction) = strong.observe(revision, &version, &format!("the watcher on n{node}")) {
                found.push((invariant::ONE_SEQUENCE, contradiction.0));
            }
        }
        if group == GroupKind::Gated {
            *gated_events += 1;
            let version = match &event {
                WatchEvent::Change { version, .. } | WatchEvent::Resync { version, .. } => version,
            };
            let counter = version_counter(version);
            if counter.is_none_or(|counter| counter != 1 && !released.contains(&counter)) {
                found.push((
                    invariant::RELEASE,
                    format!("the watcher of gt on n{node} was served {version}, which no release targeted"),
                ));
            }
        }
        if revision <= watcher.revision {
            found.push((
                invariant::WATCH,
                format!(
                    "watcher of {} on n{node} got revision {revision} after {} (revisions must increase)",
                    group.name(),
                    watcher.revision
                ),
            ));
        }
        watcher.revision = revision;
        let served: Vec<String> = match event {
            WatchEvent::Change { set, removed, .. } => {
                watcher.events += 1;
                for key in removed {
                    watcher.settings.remove(&key);
                }
                let keys = set.keys().cloned().collect();
                watcher.settings.extend(set);
                keys
            }
            WatchEvent::Resync { settings, .. } => {
                watcher.resyncs += 1;
                watcher.settings = settings;
                watcher.settings.keys().cloned().collect()
            }
        };
        for seq in served.iter().filter_map(|key| marker_seq(key)) {
            sightings.entry(seq).or_default().entry(node).or_insert(now);
            if group == GroupKind::Strong
                && let Some(write) = writes.get(seq as usize)
                && write.outcome.certainly_invisible()
            {
                found.push((
                    invariant::STRONG_ATOMICITY,
                    format!("n{node} served strong write w{seq}, whose round ended {:?}", write.outcome),
                ));
            }
        }
    }
    for (name, detail) in found {
        sim.violation(name, detail);
    }
}

/// Creates both groups on node 0 and joins them everywhere else; returns false when some node
/// could not join within `bound`.
pub async fn setup_groups(sim: &Sim, bound: Duration) -> bool {
    let strong_members = sim.config.strong_member_count();
    let mut keys = BTreeMap::new();
    for group in GroupKind::ALL {
        // The strong group evicts members dead for the shortest time allowed, so that runs
        // exercise evictions and rejoins, not only rounds that wait for a crashed member.
        let evict_after_ms = (group == GroupKind::Strong).then_some(konor_crdt::limits::EVICT_AFTER_MIN_MS);
        let request = Request::GroupCreate {
            name: group.name().to_owned(),
            mode: group.mode().to_owned(),
            key: None,
            evict_after_ms,
            fencing: None,
            release: (group == GroupKind::Gated).then(|| "gated".to_owned()),
        };
        match call(&sim.cluster, 0, request).await {
            Some(Response::GroupCreated { key, .. }) => {
                keys.insert(group, key);
            }
            other => {
                sim.trace(&format!("group {} not created: {other:?}", group.name()));
                return false;
            }
        }
        sim.records.borrow_mut().members.entry(group).or_default().insert(0);
    }
    sim.records.borrow_mut().keys = keys.clone();
    let nodes = sim.config.nodes;
    let pending = Rc::new(Cell::new(0usize));
    for node in 1..nodes {
        for group in GroupKind::ALL {
            if group == GroupKind::Strong && node >= strong_members {
                continue;
            }
            let key = keys.get(&group).cloned().unwrap_or_default();
            let task_sim = sim.clone();
            let pending = pending.clone();
            pending.set(pending.get() + 1);
            tokio::task::spawn_local(async move {
                for _attempt in 0..8 {
                    let request = Request::GroupJoin { name: group.name().to_owned(), key: key.clone() };
                    match call(&task_sim.cluster, node, request).await {
                        Some(Response::Joined { .. }) => {
                            task_sim.records.borrow_mut().members.entry(group).or_default().insert(node);
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
                pending.set(pending.get() - 1);
            });
        }
    }
    let deadline = tokio::time::Instant::now() + bound;
    while pending.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = sim.records.borrow();
    let joined = records.members.values().map(BTreeSet::len).sum::<usize>();
    let expected: usize =
        GroupKind::ALL.iter().map(|group| if *group == GroupKind::Strong { strong_members } else { nodes }).sum();
    joined == expected
}
