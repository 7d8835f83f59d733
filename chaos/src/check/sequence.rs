//! SPEC invariant 3, strong atomicity and order: a strong group's committed versions form one
//! sequence on every node; no client or node ever shows a value whose write was refused; no
//! read flagged fresh serves a state older than a commit acknowledged before it began.
//!
//! **One sequence.** Each node's final history of a strong group must be a chain (every
//! version's one parent is the version before it) and the nodes' chains must be prefixes of one
//! another; the longest is *the committed sequence*. Two writes acknowledged with the same
//! label are two versions at one position: a fork, whatever the final states say (a fork
//! healed by a merge shows as a version with two parents instead).
//!
//! **Fresh reads, per key (the linearizability argument).** Values are unique, so a read's
//! value names its write, and an acknowledged write's label names its position in the committed
//! sequence. A strong group commits one version at a time, in sequence order, and a write
//! acknowledged at `complete_ms` is committed from then on. So a read invoked at `invoke_ms >
//! complete_ms` of write `W` is, in real time, after `W` took effect: a linearizable (fresh)
//! read must return `W`'s value or the value of a write at a later position (never an earlier
//! one, never "unset"), and its `freshness.version` must be at or after `W`'s position. Reads
//! that overlap `W` may see either side and are not judged. A value whose write had an unknown
//! outcome has no known position and is not judged either. This is the per-key check Knossos
//! makes for a register, reduced by unique values and the recorded commit order to one
//! comparison per read.
//!
//! **Refused writes.** A write refused with a code that by contract never takes effect
//! ([`refusal_is_final`]) must never be seen: not by a read, not in a watch event, not in a
//! node's final settings. This holds for both modes (an eventual group's `not_committed` is not
//! such a refusal).

use std::collections::BTreeMap;

use super::version::{VersionGraph, counter_part, labels_match};
use super::{Invariant, Mode, Run, Violation, Write, refusal_is_final};
use crate::history::{OpKind, Outcome, Record, WatchedEvent};

/// How many records a violation lists as witnesses of one refused write.
const WITNESSES_SHOWN: usize = 5;

pub(super) fn check(run: &Run<'_>, violations: &mut Vec<Violation>) {
    for (group, mode) in run.groups() {
        if mode == Mode::Strong {
            let sequence = committed_sequence(run, group, violations);
            check_shared_labels(run, group, violations);
            if let Some((node, sequence)) = sequence
                && let Some(graph) = run.graph(group, node)
            {
                check_fresh_reads(run, group, &sequence, graph, violations);
            }
        }
    }
    check_refused_visible(run, violations);
}

/// Checks that every node's final history is a chain and that the chains are prefixes of one
/// another; returns the longest and its node (`None` without final states).
fn committed_sequence<'a>(
    run: &Run<'a>,
    group: &str,
    violations: &mut Vec<Violation>,
) -> Option<(&'a str, Vec<&'a str>)> {
    let finals = run.finals.get(group)?;
    let mut longest: Option<(&str, usize, Vec<&str>)> = None;
    for (&node, &(index, state)) in finals {
        for (position, version) in state.versions.iter().enumerate().skip(1) {
            let previous = &state.versions[position - 1].label;
            if version.parents.len() != 1 || &version.parents[0] != previous {
                violations.push(Violation {
                    invariant: Invariant::StrongSequence,
                    group: Some(group.to_owned()),
                    explanation: format!(
                        "{node}'s history is not one sequence: {} has parents {:?}, not [{previous}]",
                        version.label, version.parents
                    ),
                    involved: vec![run.involved(index)],
                });
                break;
            }
        }
        let labels: Vec<&str> = state.versions.iter().map(|version| version.label.as_str()).collect();
        if longest.as_ref().is_none_or(|(_, _, best)| labels.len() > best.len()) {
            longest = Some((node, index, labels));
        }
    }
    let (longest_node, longest_index, sequence) = longest?;
    for (&node, &(index, state)) in finals {
        let differs = state.versions.iter().zip(&sequence).position(|(version, label)| version.label != *label);
        if let Some(position) = differs {
            violations.push(Violation {
                invariant: Invariant::StrongSequence,
                group: Some(group.to_owned()),
                explanation: format!(
                    "two versions at position {position}: {node} holds {} where {longest_node} holds {}",
                    state.versions[position].label, sequence[position]
                ),
                involved: vec![run.involved(index), run.involved(longest_index)],
            });
        }
    }
    Some((longest_node, sequence))
}

/// Checks that no two writes were acknowledged with labels that may name the same version.
fn check_shared_labels(run: &Run<'_>, group: &str, violations: &mut Vec<Violation>) {
    let mut by_counter: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for write in run.writes.iter().filter(|write| write.op.group == group) {
        if let Some(label) = write.committed_version() {
            by_counter.entry(counter_part(label)).or_default().push((write, label));
        }
    }
    for committed in by_counter.values() {
        for (position, (first, first_label)) in committed.iter().enumerate() {
            for (second, second_label) in &committed[position + 1..] {
                if labels_match(first_label, second_label) {
                    violations.push(Violation {
                        invariant: Invariant::StrongSequence,
                        group: Some(group.to_owned()),
                        explanation: format!(
                            "writes `{}` and `{}` were both acknowledged as {first_label}: two versions at one \
                             position",
                            first.value, second.value
                        ),
                        involved: vec![run.involved(first.index), run.involved(second.index)],
                    });
                }
            }
        }
    }
}

/// The one position of `label` in the committed sequence (the list of `graph`), if it names
/// exactly one.
fn position_of(graph: &VersionGraph<'_>, label: &str) -> Option<usize> {
    match graph.candidates(label)[..] {
        [position] => Some(position),
        _ => None,
    }
}

/// Acknowledged writes in order of completion, with the newest position acknowledged so far.
#[derive(Debug, Default)]
struct Acknowledged<'r, 'w> {
    complete_ms: Vec<u64>,
    /// `newest[i]`: the write at the latest position among the first `i + 1`.
    newest: Vec<(usize, &'r Write<'w>)>,
}

impl<'r, 'w> Acknowledged<'r, 'w> {
    /// Adds a write completed no earlier than the ones before.
    fn push(&mut self, position: usize, write: &'r Write<'w>) {
        let newest = match self.newest.last() {
            Some(&(best, best_write)) if best >= position => (best, best_write),
            _ => (position, write),
        };
        self.complete_ms.push(write.op.complete_ms);
        self.newest.push(newest);
    }

    /// The write at the latest position among those acknowledged before `invoke_ms`.
    fn newest_before(&self, invoke_ms: u64) -> Option<(usize, &'r Write<'w>)> {
        let count = self.complete_ms.partition_point(|&complete_ms| complete_ms < invoke_ms);
        self.newest.get(count.checked_sub(1)?).copied()
    }
}

/// Checks every read flagged fresh against the writes acknowledged before it began.
fn check_fresh_reads(
    run: &Run<'_>,
    group: &str,
    sequence: &[&str],
    graph: &VersionGraph<'_>,
    violations: &mut Vec<Violation>,
) {
    // Every acknowledged write of the group placed in the sequence, for the whole group and
    // per key.
    let mut whole = Acknowledged::default();
    let mut per_key: BTreeMap<&str, Acknowledged<'_, '_>> = BTreeMap::new();
    let mut placed: Vec<_> = run
        .writes
        .iter()
        .filter(|write| write.op.group == group)
        .filter_map(|write| Some((position_of(graph, write.committed_version()?)?, write)))
        .collect();
    placed.sort_by_key(|(_, write)| write.op.complete_ms);
    for &(position, write) in &placed {
        whole.push(position, write);
        per_key.entry(&write.op.key).or_default().push(position, write);
    }
    for (index, record) in run.records.iter().enumerate() {
        let Record::Op(op) = record else { continue };
        let (OpKind::Read, Outcome::Value { value, version, stale: false, .. }) = (&op.kind, &op.outcome) else {
            continue;
        };
        if op.group != group {
            continue;
        }
        let stale = |explanation: String, write_index: usize| Violation {
            invariant: Invariant::StaleFreshRead,
            group: Some(group.to_owned()),
            explanation,
            involved: vec![run.involved(index), run.involved(write_index)],
        };
        // A version served as fresh must be a committed one.
        if graph.candidates(version).is_empty() {
            violations.push(Violation {
                invariant: Invariant::StrongSequence,
                group: Some(group.to_owned()),
                explanation: format!(
                    "read of `{}` at {} ms served {version} as fresh, a version in no node's final history",
                    op.key, op.invoke_ms
                ),
                involved: vec![run.involved(index)],
            });
            continue;
        }
        // The state served must include every version acknowledged before the read began (a
        // label naming two versions, after a fork, is not judged here).
        if let Some((newest, write)) = whole.newest_before(op.invoke_ms)
            && let Some(served) = position_of(graph, version)
            && served < newest
        {
            violations.push(stale(
                format!(
                    "read of `{}` at {} ms served {version} as fresh, but {} was acknowledged at {} ms",
                    op.key, op.invoke_ms, sequence[newest], write.op.complete_ms
                ),
                write.index,
            ));
        }
        // The value must be that of the newest write of the key acknowledged before, or newer.
        let Some((newest, write)) = per_key.get(op.key.as_str()).and_then(|key| key.newest_before(op.invoke_ms)) else {
            continue;
        };
        let served = match value {
            None => "the key unset".to_owned(),
            Some(value) => {
                match run.write_of(value).and_then(|served| position_of(graph, served.committed_version()?)) {
                    Some(position) if position >= newest => continue,
                    Some(position) => format!("`{value}` of {}", sequence[position]),
                    // A value the checker cannot place is not judged.
                    None => continue,
                }
            }
        };
        violations.push(stale(
            format!(
                "read of `{}` at {} ms returned {served} as fresh, but `{}` ({}) was acknowledged at {} ms",
                op.key, op.invoke_ms, write.value, sequence[newest], write.op.complete_ms
            ),
            write.index,
        ));
    }
}

/// Checks that no value of a write refused for good is ever shown.
fn check_refused_visible(run: &Run<'_>, violations: &mut Vec<Violation>) {
    // Refused write -> the records that showed its value.
    let mut witnesses: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut note = |group: &str, value: &str, index: usize| {
        let Some(write) = run.write_of(value) else { return };
        let Some(&mode) = run.modes.get(group) else { return };
        if let Outcome::Refused { code, .. } = &write.op.outcome
            && write.op.group == group
            && refusal_is_final(mode, code)
        {
            witnesses.entry(write.index).or_default().push(index);
        }
    };
    for (index, record) in run.records.iter().enumerate() {
        match record {
            Record::Op(op) => {
                if let Outcome::Value { value: Some(value), .. } = &op.outcome {
                    note(&op.group, value, index);
                }
            }
            Record::Watch(watch) => match &watch.event {
                WatchedEvent::Start { settings, .. } | WatchedEvent::Resync { settings, .. } => {
                    settings.values().for_each(|value| note(&watch.group, value, index));
                }
                WatchedEvent::Change { set, .. } => set.values().for_each(|value| note(&watch.group, value, index)),
                WatchedEvent::Ended { .. } => {}
            },
            Record::Final(state) => state.settings.values().for_each(|value| note(&state.group, value, index)),
            _ => {}
        }
    }
    for (write_index, shown) in witnesses {
        let Record::Op(op) = &run.records[write_index] else { continue };
        let (OpKind::Write { value }, Outcome::Refused { code, .. }) = (&op.kind, &op.outcome) else { continue };
        let mut involved = vec![run.involved(write_index)];
        involved.extend(shown.iter().take(WITNESSES_SHOWN).map(|&index| run.involved(index)));
        violations.push(Violation {
            invariant: Invariant::RefusedVisible,
            group: Some(op.group.clone()),
            explanation: format!(
                "write `{value}` of key `{}` was refused `{code}` at {} ms, yet {} record(s) show its value",
                op.key,
                op.complete_ms,
                shown.len()
            ),
            involved,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::scenario::Scenario;
    use super::super::{Invariant, check};
    use crate::history::{FinalVersion, Outcome, Record};

    #[test]
    fn a_fork_in_the_strong_sequence_is_caught_from_the_acknowledgements_and_the_final_states() {
        let mut history = Scenario::clean();
        // A minority side acknowledged its own v3, and n3 kept it.
        history.insert(16, Scenario::committed("n3", "s", "k2", "c3-1", 6_210, "v3"));
        let position = history.len() - 1;
        history[position] =
            Scenario::final_state("n3", "s", "hx", &[("k1", "c2-1"), ("k2", "c3-1")], &["v1", "v2", "v3"]);
        let Record::Final(state) = &mut history[position] else { unreachable!() };
        state.versions.push(FinalVersion {
            label: "v4".into(),
            parents: vec!["v2".into(), "v3".into()],
            content_hash: String::new(),
        });
        let report = check(&history);
        let sequence: Vec<_> = report.of(Invariant::StrongSequence).collect();
        assert!(sequence.iter().any(|violation| violation.explanation.contains("both acknowledged as v3")), "{report}");
        assert!(sequence.iter().any(|violation| violation.explanation.contains("not one sequence")), "{report}");
    }

    #[test]
    fn diverging_strong_histories_are_two_versions_at_one_position() {
        let mut history = Scenario::clean();
        let position = history.len() - 1;
        history[position] = Scenario::final_state("n3", "s", "hs", &[("k1", "c2-2")], &["v1", "v2-ab", "v3"]);
        let report = check(&history);
        let sequence: Vec<_> = report.of(Invariant::StrongSequence).collect();
        assert_eq!(sequence.len(), 1, "{report}");
        assert!(sequence[0].explanation.contains("position 1"), "{report}");
    }

    #[test]
    fn a_read_of_a_refused_write_is_caught() {
        let mut history = Scenario::clean();
        let refused = Outcome::Refused { code: "aborted".into(), message: "n3 did not vote".into() };
        history.insert(17, Scenario::write("n2", "s", "k2", "c2-3", 6_250, refused));
        history.insert(18, Scenario::read("n2", "s", "k2", Some("c2-3"), "v3", 6_280, true));
        let report = check(&history);
        let refused: Vec<_> = report.of(Invariant::RefusedVisible).collect();
        assert_eq!(refused.len(), 1, "{report}");
        assert_eq!(refused[0].involved.len(), 2, "{report}");
        // A watcher shown the aborted value is a witness too.
        history.insert(19, Scenario::watch(2, "n2", "s", 6_290, Scenario::change(4, "v4", "k2", "c2-3")));
        let report = check(&history);
        let refused: Vec<_> = report.of(Invariant::RefusedVisible).collect();
        assert_eq!(refused.len(), 1, "{report}");
        assert_eq!(refused[0].involved.len(), 3, "{report}");
    }

    #[test]
    fn an_eventual_write_that_was_not_committed_in_time_may_still_be_seen() {
        let mut history = Scenario::clean();
        let late = Outcome::Refused { code: "not_committed".into(), message: "n3 did not ack".into() };
        history.insert(17, Scenario::write("n1", "e", "k2", "c1-3", 6_250, late));
        history.insert(18, Scenario::read("n2", "e", "k2", Some("c1-3"), "v4", 6_280, false));
        let report = check(&history);
        assert_eq!(report.of(Invariant::RefusedVisible).count(), 0, "{report}");
    }

    #[test]
    fn a_fresh_read_older_than_an_acknowledged_write_is_stale() {
        let mut history = Scenario::clean();
        // n3 says fresh but serves v2 after v3 was acknowledged at 6,210 ms.
        history.insert(18, Scenario::read("n3", "s", "k1", Some("c2-1"), "v2", 6_400, false));
        let report = check(&history);
        let stale: Vec<_> = report.of(Invariant::StaleFreshRead).collect();
        assert_eq!(stale.len(), 2, "{report}");
        assert!(stale[0].explanation.contains("served v2 as fresh"), "{report}");
        assert!(stale[1].explanation.contains("returned `c2-1`"), "{report}");
    }

    #[test]
    fn a_fresh_read_of_a_version_no_node_committed_is_caught() {
        let mut history = Scenario::clean();
        history.insert(18, Scenario::read("n3", "s", "k1", Some("c2-2"), "v9", 6_400, false));
        let report = check(&history);
        let sequence: Vec<_> = report.of(Invariant::StrongSequence).collect();
        assert_eq!(sequence.len(), 1, "{report}");
        assert!(sequence[0].explanation.contains("served v9 as fresh"), "{report}");
    }

    #[test]
    fn a_stale_read_flagged_stale_or_overlapping_the_write_is_not_judged() {
        let mut history = Scenario::clean();
        history.insert(18, Scenario::read("n3", "s", "k1", Some("c2-1"), "v2", 6_400, true));
        history.insert(19, Scenario::read("n3", "s", "k1", Some("c2-1"), "v2", 6_205, false));
        let report = check(&history);
        assert!(report.passed(), "{report}");
    }
}
