//! The history checker: judges a chaos run from its recorded history alone (issue 13, item 3),
//! without asking the daemons anything. Pure: no I/O except [`check_file`], no clock.
//!
//! Each invariant has a file of its own: `lost_write.rs` (SPEC 2), `sequence.rs` (SPEC 3: one
//! committed sequence, no refused write visible, no stale read flagged fresh), `watch.rs`
//! (SPEC 4), `convergence.rs` (SPEC 1) and `membership.rs` (SPEC 5). They share `Run`, an
//! index of the history built once.
//!
//! Every check is built to be sound first: it reports a violation only when the history proves
//! one (a write the checker cannot place, such as one whose outcome is unknown, is never held
//! against the system), and the unit tests of each file show it catching an injected bug.
//!
//! **What the checks assume of the runner** (beyond [`crate::history`]'s own rules):
//! * every value written is unique in the run (a repeat is a [`Invariant::History`] violation);
//! * every node of the run has a `final` record of every group, read after the settle period;
//! * a watcher's events are recorded until after the final states were read, and a watch the
//!   runner (re)opens starts with a `start` record carrying its snapshot;
//! * a fault's `fault_end` is timed before the healing begins: a `kill9` ends when the process
//!   is started again, not when it is ready, so that no sample of a restarted node falls inside
//!   the kill;
//! * `loss` faults say their rate as `loss=N%` in `detail`.

mod convergence;
mod crash;
mod lost_write;
mod membership;
mod report;
mod sequence;
mod version;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

pub use report::{Invariant, Involved, Report, Violation};
use version::VersionGraph;

use crate::history::{self, FinalState, HistoryError, Op, OpKind, Outcome, Record, RunInfo, WatchedEvent};

/// A group's consistency mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Eventual,
    Strong,
}

/// A write the history recorded.
#[derive(Debug)]
pub(crate) struct Write<'a> {
    /// Index of its record.
    pub(crate) index: usize,
    pub(crate) op: &'a Op,
    pub(crate) value: &'a str,
}

impl Write<'_> {
    /// The version label it was acknowledged with, if it was.
    pub(crate) fn committed_version(&self) -> Option<&str> {
        match &self.op.outcome {
            Outcome::Committed { version, .. } => Some(version),
            _ => None,
        }
    }

    /// The content hash of the version it made, if it was acknowledged with one.
    pub(crate) fn committed_hash(&self) -> &str {
        match &self.op.outcome {
            Outcome::Committed { content_hash, .. } => content_hash,
            _ => "",
        }
    }
}

/// Whether a refusal with `code` means, by the protocol's contract (docs/protocol.md, "Error
/// codes"), that the write never takes effect anywhere. Not so for an eventual write refused
/// `not_committed` (applied here and still spreading) or `not_durable` (may reach the peers it
/// was pushed to), nor for `internal` (the daemon failed somewhere; nothing is promised).
pub(crate) fn refusal_is_final(mode: Mode, code: &str) -> bool {
    match mode {
        Mode::Strong => !matches!(code, "internal" | "outcome_unknown"),
        Mode::Eventual => !matches!(code, "not_committed" | "not_durable" | "internal" | "outcome_unknown"),
    }
}

/// The history, indexed once for every check.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    pub(crate) records: &'a [Record],
    pub(crate) info: Option<&'a RunInfo>,
    /// Group name -> mode, for the groups of known mode.
    pub(crate) modes: BTreeMap<&'a str, Mode>,
    /// Every write, in record order.
    pub(crate) writes: Vec<Write<'a>>,
    /// A written value -> its write (values are unique in a run).
    pub(crate) write_of_value: BTreeMap<&'a str, usize>,
    /// Group -> node -> (record index, final state); the last one wins if a node has several.
    pub(crate) finals: BTreeMap<&'a str, BTreeMap<&'a str, (usize, &'a FinalState)>>,
    /// Group -> node -> the version graph of its final state.
    graphs: BTreeMap<&'a str, BTreeMap<&'a str, VersionGraph<'a>>>,
}

impl<'a> Run<'a> {
    /// Indexes `records`, reporting what makes the history unreadable.
    fn index(records: &'a [Record], violations: &mut Vec<Violation>) -> Run<'a> {
        let mut run = Run {
            records,
            info: None,
            modes: BTreeMap::new(),
            writes: Vec::new(),
            write_of_value: BTreeMap::new(),
            finals: BTreeMap::new(),
            graphs: BTreeMap::new(),
        };
        for (index, record) in records.iter().enumerate() {
            match record {
                Record::Run(info) if run.info.is_none() => {
                    run.info = Some(info);
                    for group in &info.groups {
                        let mode = match group.mode.as_str() {
                            "eventual" => Mode::Eventual,
                            "strong" => Mode::Strong,
                            other => {
                                violations.push(Violation {
                                    invariant: Invariant::History,
                                    group: Some(group.name.clone()),
                                    explanation: format!("unknown mode `{other}`: the group's checks are skipped"),
                                    involved: vec![run.involved(index)],
                                });
                                continue;
                            }
                        };
                        run.modes.insert(&group.name, mode);
                    }
                }
                Record::Run(_) => violations.push(Violation {
                    invariant: Invariant::History,
                    group: None,
                    explanation: "a second run record: two runs in one history".to_owned(),
                    involved: vec![run.involved(index)],
                }),
                Record::Op(op @ Op { kind: OpKind::Write { value }, .. }) => {
                    if let Some(&earlier) = run.write_of_value.get(value.as_str()) {
                        violations.push(Violation {
                            invariant: Invariant::History,
                            group: Some(op.group.clone()),
                            explanation: format!("value `{value}` written twice: reads cannot name their write"),
                            involved: vec![run.involved(run.writes[earlier].index), run.involved(index)],
                        });
                    } else {
                        run.write_of_value.insert(value, run.writes.len());
                    }
                    run.writes.push(Write { index, op, value });
                }
                Record::Final(state) => {
                    run.finals.entry(&state.group).or_default().insert(&state.node, (index, state));
                }
                _ => {}
            }
        }
        run.graphs = run
            .finals
            .iter()
            .map(|(&group, finals)| {
                (group, finals.iter().map(|(&node, &(_, state))| (node, VersionGraph::of(state))).collect())
            })
            .collect();
        match run.info {
            None => violations.push(Violation {
                invariant: Invariant::History,
                group: None,
                explanation: "no run record: the groups' modes and the nodes are unknown".to_owned(),
                involved: Vec::new(),
            }),
            Some(info) => run.check_groups_named(info, violations),
        }
        run
    }

    /// Reports records about a group the run did not set up (once per group): nothing checks
    /// them, so they must not pass unnoticed.
    fn check_groups_named(&self, info: &RunInfo, violations: &mut Vec<Violation>) {
        let mut reported = BTreeSet::new();
        for (index, record) in self.records.iter().enumerate() {
            let group = match record {
                Record::Op(op) => &op.group,
                Record::Watch(watch) => &watch.group,
                Record::Final(state) => &state.group,
                _ => continue,
            };
            if !info.groups.iter().any(|known| &known.name == group) && reported.insert(group) {
                violations.push(Violation {
                    invariant: Invariant::History,
                    group: Some(group.clone()),
                    explanation: "records of a group the run record does not name: they are not checked".to_owned(),
                    involved: vec![self.involved(index)],
                });
            }
        }
    }

    /// The record at `index` as a violation names it.
    pub(crate) fn involved(&self, index: usize) -> Involved {
        let (node, from_ms, to_ms) = match &self.records[index] {
            Record::Run(_) => (None, 0, 0),
            Record::Op(op) => (Some(op.node.clone()), op.invoke_ms, op.complete_ms),
            Record::Watch(watch) => (Some(watch.node.clone()), watch.at_ms, watch.at_ms),
            Record::FaultStart(fault) => (fault.nodes.first().cloned(), fault.at_ms, fault.at_ms),
            Record::FaultEnd(end) => (None, end.at_ms, end.at_ms),
            Record::Membership(sample) => (Some(sample.observer.clone()), sample.at_ms, sample.at_ms),
            Record::Final(state) => (Some(state.node.clone()), state.at_ms, state.at_ms),
            Record::NodeExit(exit) => (Some(exit.node.clone()), exit.at_ms, exit.at_ms),
        };
        Involved { record: index, node, from_ms, to_ms }
    }

    /// The version graph of `node`'s final state of `group`.
    pub(crate) fn graph(&self, group: &str, node: &str) -> Option<&VersionGraph<'a>> {
        self.graphs.get(group)?.get(node)
    }

    /// The write that wrote `value`.
    pub(crate) fn write_of(&self, value: &str) -> Option<&Write<'a>> {
        self.write_of_value.get(value).map(|&position| &self.writes[position])
    }

    /// The groups of known mode, with their mode.
    pub(crate) fn groups(&self) -> impl Iterator<Item = (&'a str, Mode)> + '_ {
        self.modes.iter().map(|(&group, &mode)| (group, mode))
    }
}

/// Judges a history.
pub fn check(records: &[Record]) -> Report {
    let mut violations = Vec::new();
    let run = Run::index(records, &mut violations);
    lost_write::check(&run, &mut violations);
    sequence::check(&run, &mut violations);
    watch::check(&run, &mut violations);
    convergence::check(&run, &mut violations);
    membership::check(&run, &mut violations);
    crash::check(records, &mut violations);
    let mut report = Report {
        seed: run.info.map(|info| info.seed),
        violations,
        final_states: run.finals.values().map(BTreeMap::len).sum(),
        ..Report::default()
    };
    for record in records {
        match record {
            Record::Op(op) => *report.operations.entry(operation_name(op)).or_insert(0) += 1,
            Record::Watch(watch) => {
                let name = match &watch.event {
                    WatchedEvent::Start { .. } => "start",
                    WatchedEvent::Change { .. } => "change",
                    WatchedEvent::Resync { .. } => "resync",
                    WatchedEvent::Ended { .. } => "ended",
                };
                *report.watch_events.entry(name.to_owned()).or_insert(0) += 1;
            }
            Record::FaultStart(fault) => *report.faults.entry(fault.kind.clone()).or_insert(0) += 1,
            Record::Membership(_) => report.membership_samples += 1,
            _ => {}
        }
    }
    report
}

/// `write committed`, `write refused aborted`, `read fresh`, ...
fn operation_name(op: &Op) -> String {
    let kind = match op.kind {
        OpKind::Write { .. } => "write",
        OpKind::Read => "read",
    };
    match &op.outcome {
        Outcome::Committed { .. } => format!("{kind} committed"),
        Outcome::Refused { code, .. } => format!("{kind} refused {code}"),
        Outcome::Unknown { .. } => format!("{kind} unknown"),
        Outcome::Value { stale: false, .. } => format!("{kind} fresh"),
        Outcome::Value { stale: true, .. } => format!("{kind} stale"),
    }
}

/// A history file that could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum CheckFileError {
    /// The file could not be read; nothing was checked.
    #[error("cannot read history {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not a record; nothing was checked.
    #[error("history {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Which line and why.
        source: HistoryError,
    },
}

/// Reads and judges a history: `path` is a `history.jsonl` file, or a run's directory holding
/// one.
pub fn check_file(path: &Path) -> Result<Report, CheckFileError> {
    let file = if path.is_dir() { path.join("history.jsonl") } else { path.to_owned() };
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(&file).map_err(|source| CheckFileError::Read { path: shown.clone(), source })?;
    let records = history::parse(&text).map_err(|source| CheckFileError::Parse { path: shown, source })?;
    Ok(check(&records))
}

#[cfg(test)]
pub(crate) mod scenario;

#[cfg(test)]
mod tests {
    use super::scenario::Scenario;
    use super::*;

    #[test]
    fn a_clean_history_passes_with_zero_violations_and_counts_what_it_holds() {
        let history = Scenario::clean();
        let report = check(&history);
        assert!(report.passed(), "{report}");
        assert_eq!(report.operations.get("write committed"), Some(&4));
        assert_eq!(report.operations.get("read fresh"), Some(&2));
        assert_eq!(report.watch_events.get("change"), Some(&4));
        assert_eq!(report.faults.get("kill9"), Some(&1));
        assert_eq!(report.final_states, 6);
        let summary = report.to_string();
        assert!(summary.contains("violations: 0") && summary.ends_with("PASSED\n"), "{summary}");
    }

    #[test]
    fn a_long_clean_history_passes() {
        let history = Scenario::long(2_000, 5);
        let report = check(&history);
        assert!(report.passed(), "{report}");
        assert_eq!(report.operations.get("write committed"), Some(&4_000));
    }

    #[test]
    fn a_history_without_a_run_record_fails() {
        let mut history = Scenario::clean();
        history.remove(0);
        let report = check(&history);
        assert_eq!(report.of(Invariant::History).count(), 1, "{report}");
        assert!(report.to_string().ends_with("FAILED\n"));
    }

    #[test]
    fn records_of_a_group_the_run_did_not_set_up_are_reported_once() {
        let mut history = Scenario::clean();
        history.push(Scenario::committed("n1", "x", "k1", "c1-9", 7_000, "v2"));
        history.push(Scenario::read("n1", "x", "k1", Some("c1-9"), "v2", 7_100, false));
        let report = check(&history);
        let unread: Vec<_> = report.of(Invariant::History).collect();
        assert_eq!(unread.len(), 1, "{report}");
        assert_eq!(unread[0].group.as_deref(), Some("x"));
    }

    #[test]
    fn check_file_reads_a_run_directory_and_names_a_bad_line() {
        let directory = tempfile::tempdir().unwrap();
        let text: String =
            Scenario::clean().iter().map(|record| serde_json::to_string(record).unwrap() + "\n").collect();
        std::fs::write(directory.path().join("history.jsonl"), &text).unwrap();
        assert!(check_file(directory.path()).unwrap().passed());
        std::fs::write(directory.path().join("history.jsonl"), "{}\n").unwrap();
        let error = check_file(directory.path()).unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        assert!(matches!(check_file(&directory.path().join("absent")), Err(CheckFileError::Read { .. })));
    }
}
