//! What the checker found: counts of what the history holds, and the violations, each naming
//! its invariant and the records involved, with a human summary (`Display`).

use std::collections::BTreeMap;
use std::fmt;

/// The invariant a violation breaks (SPEC "Invariants"; issue 13, item 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// The history itself cannot be judged (no `run` record, a value written twice, a group of
    /// unknown mode): the run must not pass on a history the checker could not read.
    History,
    /// SPEC 2: an acknowledged write is missing from a node's history, or its value was
    /// replaced by a write it had already overwritten.
    LostWrite,
    /// SPEC 3: a strong group's committed versions do not form one sequence.
    StrongSequence,
    /// SPEC 3: a client or a node showed a value whose write was refused or aborted.
    RefusedVisible,
    /// SPEC 3 and F12: a read flagged fresh served a state older than a commit acknowledged
    /// before the read began.
    StaleFreshRead,
    /// SPEC 4: a watcher missed a change, saw one twice or out of order, with no resync.
    Watch,
    /// SPEC 1: members differ after healing and settling.
    Convergence,
    /// SPEC 5: a killed node was not marked dead within the detection bound.
    MembershipDetection,
    /// SPEC 5: a node on a healthy network was marked dead.
    FalseDead,
    /// A konord exited without being killed: a crash is never an acceptable answer to a fault.
    Crash,
}

impl Invariant {
    /// The name printed in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::History => "history",
            Invariant::LostWrite => "lost_write",
            Invariant::StrongSequence => "strong_sequence",
            Invariant::RefusedVisible => "refused_visible",
            Invariant::StaleFreshRead => "stale_fresh_read",
            Invariant::Watch => "watch",
            Invariant::Convergence => "convergence",
            Invariant::MembershipDetection => "membership_detection",
            Invariant::FalseDead => "false_dead",
            Invariant::Crash => "crash",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A record a violation involves: where it is in the history and the span of run time it
/// covers, so that the runner can print each node's log around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Involved {
    /// Index into the records given to `check` (0-based; the line number when the history had
    /// no blank lines is one more).
    pub record: usize,
    /// The node the record is about (the client's node, the watcher's, the observer's, the
    /// final state's), if any.
    pub node: Option<String>,
    /// Start of the record's span, ms since the run started (an operation's invoke time).
    pub from_ms: u64,
    /// End of the record's span (an operation's completion; the same as `from_ms` for events).
    pub to_ms: u64,
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which.
    pub invariant: Invariant,
    /// The group, when the violation is about one.
    pub group: Option<String>,
    /// One line saying what was seen and why it is wrong.
    pub explanation: String,
    /// The records that show it.
    pub involved: Vec<Involved>,
}

/// The checker's verdict on one history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The run's seed, from its `run` record.
    pub seed: Option<u64>,
    /// Client operations by kind and outcome (`write committed`, `write refused aborted`,
    /// `write unknown`, `read fresh`, `read stale`).
    pub operations: BTreeMap<String, usize>,
    /// Watch events by kind (`start`, `change`, `resync`, `ended`).
    pub watch_events: BTreeMap<String, usize>,
    /// Faults started, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Membership samples read.
    pub membership_samples: usize,
    /// Final states read.
    pub final_states: usize,
    /// What is wrong; empty when the run passed.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Whether the history broke no invariant.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Violations per invariant.
    pub fn violations_by_invariant(&self) -> BTreeMap<Invariant, usize> {
        let mut counts = BTreeMap::new();
        for violation in &self.violations {
            *counts.entry(violation.invariant).or_insert(0) += 1;
        }
        counts
    }

    /// The violations of one invariant.
    pub fn of(&self, invariant: Invariant) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |violation| violation.invariant == invariant)
    }
}

/// `a 3, b 4`, or `none`.
fn counts_line(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts.iter().map(|(name, count)| format!("{name} {count}")).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Report {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seed {
            Some(seed) => writeln!(formatter, "chaos history of seed {seed}")?,
            None => writeln!(formatter, "chaos history (no run record)")?,
        }
        let operations: usize = self.operations.values().sum();
        writeln!(formatter, "operations: {operations} ({})", counts_line(&self.operations))?;
        let events: usize = self.watch_events.values().sum();
        writeln!(formatter, "watch events: {events} ({})", counts_line(&self.watch_events))?;
        let faults: usize = self.faults.values().sum();
        writeln!(formatter, "faults: {faults} ({})", counts_line(&self.faults))?;
        writeln!(formatter, "membership samples: {}; final states: {}", self.membership_samples, self.final_states)?;
        let by_invariant = self.violations_by_invariant();
        let summary: Vec<String> =
            by_invariant.iter().map(|(invariant, count)| format!("{invariant} {count}")).collect();
        if summary.is_empty() {
            writeln!(formatter, "violations: 0")?;
        } else {
            writeln!(formatter, "violations: {} ({})", self.violations.len(), summary.join(", "))?;
        }
        for violation in &self.violations {
            match &violation.group {
                Some(group) => {
                    writeln!(formatter, "  [{}] group {group}: {}", violation.invariant, violation.explanation)?
                }
                None => writeln!(formatter, "  [{}] {}", violation.invariant, violation.explanation)?,
            }
            for involved in &violation.involved {
                let node = involved.node.as_deref().unwrap_or("-");
                if involved.from_ms == involved.to_ms {
                    writeln!(formatter, "      record {} on {node} at {} ms", involved.record, involved.from_ms)?;
                } else {
                    writeln!(
                        formatter,
                        "      record {} on {node}, {}..{} ms",
                        involved.record, involved.from_ms, involved.to_ms
                    )?;
                }
            }
        }
        writeln!(formatter, "{}", if self.passed() { "PASSED" } else { "FAILED" })
    }
}
