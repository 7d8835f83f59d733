//! SPEC invariant 4, watch completeness: every watch saw every change of its group exactly
//! once, in order, or an explicit resync.
//!
//! Per watcher and group, the events are replayed from each `start` (a watch opened by the
//! runner; the SDK resumes across reconnects by itself, so a new `start` only follows an
//! `ended`):
//!
//! * **Order and duplicates.** A `change` advances the revision by the number of Automerge
//!   changes it covers, which may be more than one (docs/protocol.md, "An event advances the
//!   revision by the number of changes it covers, not by one"). So revisions must rise strictly
//!   from event to event; a gap is not a lost event. A `change` at the revision of the previous
//!   event is a duplicate, one below it is out of order. A `resync` resets the baseline: it may
//!   carry a lower revision (its node lost part of its copy, or restarted).
//! * **Nothing missed (by content, since revisions may jump).** Every write acknowledged while
//!   the watch was open (invoked after its `start`, answered before its `ended`) must show in
//!   the watcher's events: its value, or a value of the same key from a write that is not
//!   certainly older (by the watcher node's final version graph, as in [`super::lost_write`]):
//!   a batch merged from peers carries only the newest value of a key, and a conflict's loser
//!   may never be shown. A `start` or `resync` that carries the value covers it too.
//! * **The view ends right.** A watch still open at the end of the history must have replayed
//!   to exactly its node's final settings. The runner reads the final states after the settle
//!   period and stops the watchers after that, so every change has been delivered by then.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::version::counter;

use super::{Invariant, Run, Violation};
use crate::history::{Record, WatchedEvent};

/// How many missed writes a violation lists.
const MISSED_SHOWN: usize = 5;

/// One watch, from a `start` to its `ended` (or the end of the history).
#[derive(Debug)]
struct Segment<'a> {
    watcher: u32,
    node: &'a str,
    group: &'a str,
    /// Record of its `start` (`None`: events came before any `start`).
    start: Option<usize>,
    from_ms: u64,
    /// Record and time of its `ended`.
    ended: Option<(usize, u64)>,
    /// (key, value) pairs it showed.
    seen: BTreeSet<(&'a str, &'a str)>,
    /// The settings its events replay to.
    settings: BTreeMap<&'a str, &'a str>,
    /// Revision of its last event.
    revision: Option<u64>,
}

pub(super) fn check(run: &Run<'_>, violations: &mut Vec<Violation>) {
    let mut open: BTreeMap<(u32, &str), Segment<'_>> = BTreeMap::new();
    let mut segments = Vec::new();
    for (index, record) in run.records.iter().enumerate() {
        let Record::Watch(watch) = record else { continue };
        let slot = (watch.watcher, watch.group.as_str());
        let new_segment = |start: Option<usize>| Segment {
            watcher: watch.watcher,
            node: &watch.node,
            group: &watch.group,
            start,
            from_ms: watch.at_ms,
            ended: None,
            seen: BTreeSet::new(),
            settings: BTreeMap::new(),
            revision: None,
        };
        if let WatchedEvent::Start { .. } = watch.event
            && let Some(previous) = open.insert(slot, new_segment(Some(index)))
        {
            segments.push(previous);
        }
        let segment = open.entry(slot).or_insert_with(|| new_segment(None));
        let watch_violation = |explanation: String| Violation {
            invariant: Invariant::Watch,
            group: Some(watch.group.clone()),
            explanation: format!("watcher {} on {}: {explanation}", watch.watcher, watch.node),
            involved: vec![run.involved(index)],
        };
        if let Some((ended_index, _)) = segment.ended {
            let mut violation = watch_violation("an event after the watch ended".to_owned());
            violation.involved.insert(0, run.involved(ended_index));
            violations.push(violation);
            continue;
        }
        match &watch.event {
            WatchedEvent::Start { revision, settings, .. } | WatchedEvent::Resync { revision, settings, .. } => {
                segment.revision = Some(*revision);
                segment.settings = settings.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
                segment.seen.extend(segment.settings.iter().map(|(&key, &value)| (key, value)));
            }
            WatchedEvent::Change { revision, set, removed, .. } => {
                match segment.revision {
                    Some(last) if *revision == last => {
                        violations.push(watch_violation(format!("revision {revision} delivered twice")))
                    }
                    Some(last) if *revision < last => violations
                        .push(watch_violation(format!("revision {revision} after {last}, with no resync between"))),
                    _ => {}
                }
                segment.revision = Some(*revision);
                for key in removed {
                    segment.settings.remove(key.as_str());
                }
                for (key, value) in set {
                    segment.settings.insert(key, value);
                    segment.seen.insert((key, value));
                }
            }
            WatchedEvent::Ended { .. } => segment.ended = Some((index, watch.at_ms)),
        }
    }
    segments.extend(open.into_values());
    for segment in &segments {
        check_missed(run, segment, violations);
        check_final_view(run, segment, violations);
    }
}

/// Checks that every write acknowledged while `segment` was open shows in it.
fn check_missed(run: &Run<'_>, segment: &Segment<'_>, violations: &mut Vec<Violation>) {
    let graph = run.graph(segment.group, segment.node);
    let until_ms = segment.ended.map_or(u64::MAX, |(_, at_ms)| at_ms);
    // Per key, the labels of the values it showed, newest first; `None` (a value of a write
    // with no label) covers any write, so those come first.
    let mut shown: BTreeMap<&str, Vec<Option<&str>>> = BTreeMap::new();
    for &(key, value) in &segment.seen {
        shown.entry(key).or_default().push(run.write_of(value).and_then(|write| write.committed_version()));
    }
    for labels in shown.values_mut() {
        labels.sort_by_key(|label| Reverse(label.map_or(Some(u64::MAX), counter)));
    }
    let missed: Vec<_> = run
        .writes
        .iter()
        .filter(|write| write.op.group == segment.group)
        .filter(|write| write.op.invoke_ms > segment.from_ms && write.op.complete_ms < until_ms)
        .filter_map(|write| Some((write, write.committed_version()?)))
        .filter(|&(write, label)| {
            let key = write.op.key.as_str();
            if segment.seen.contains(&(key, write.value)) {
                return false;
            }
            // Another value of the key covers the write unless it is certainly older.
            let covered = shown.get(key).is_some_and(|labels| {
                labels.iter().any(|other| match (graph, other) {
                    (Some(graph), Some(other)) => !graph.certainly_before(other, label),
                    _ => true,
                })
            });
            !covered
        })
        .collect();
    let Some(&(first, label)) = missed.first() else { return };
    let mut involved: Vec<_> = segment.start.map(|index| run.involved(index)).into_iter().collect();
    involved.extend(missed.iter().take(MISSED_SHOWN).map(|(write, _)| run.involved(write.index)));
    violations.push(Violation {
        invariant: Invariant::Watch,
        group: Some(segment.group.to_owned()),
        explanation: format!(
            "watcher {} on {} never saw `{}` of key `{}` ({label}, acknowledged at {} ms) nor a newer value of the \
             key, and no resync covered it ({} write(s) missed)",
            segment.watcher,
            segment.node,
            first.value,
            first.op.key,
            first.op.complete_ms,
            missed.len()
        ),
        involved,
    });
}

/// Checks that a watch open at the end replayed to its node's final settings.
fn check_final_view(run: &Run<'_>, segment: &Segment<'_>, violations: &mut Vec<Violation>) {
    if segment.ended.is_some() {
        return;
    }
    let Some(&(final_index, state)) = run.finals.get(segment.group).and_then(|finals| finals.get(segment.node)) else {
        return;
    };
    let keys: BTreeSet<&str> =
        state.settings.keys().map(String::as_str).chain(segment.settings.keys().copied()).collect();
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|key| state.settings.get(*key).map(String::as_str) != segment.settings.get(key).copied())
        .map(|key| {
            let shown = |value: Option<&str>| value.map_or("unset".to_owned(), |value| format!("`{value}`"));
            format!(
                "`{key}` {} (node: {})",
                shown(segment.settings.get(key).copied()),
                shown(state.settings.get(key).map(String::as_str))
            )
        })
        .collect();
    if differing.is_empty() {
        return;
    }
    let mut involved: Vec<_> = segment.start.map(|index| run.involved(index)).into_iter().collect();
    involved.push(run.involved(final_index));
    violations.push(Violation {
        invariant: Invariant::Watch,
        group: Some(segment.group.to_owned()),
        explanation: format!(
            "watcher {} on {} ends with a view its node does not hold: {}",
            segment.watcher,
            segment.node,
            differing.join(", ")
        ),
        involved,
    });
}

#[cfg(test)]
mod tests {
    use super::super::scenario::Scenario;
    use super::super::{Invariant, check};
    use crate::history::{FinalVersion, Record, WatchedEvent};

    #[test]
    fn a_watcher_that_skipped_an_event_is_caught() {
        let mut history = Scenario::clean();
        // Watcher 2 never got v3's change of the strong group.
        history.remove(16);
        let report = check(&history);
        let watch: Vec<_> = report.of(Invariant::Watch).collect();
        assert_eq!(watch.len(), 2, "{report}");
        assert!(watch[0].explanation.contains("never saw `c2-2`"), "{report}");
        assert!(watch[1].explanation.contains("ends with a view"), "{report}");
    }

    #[test]
    fn a_newer_value_of_the_key_covers_a_change_folded_into_a_batch() {
        // Watcher 2 gets v3 and v4 (both setting k1) as one batch showing only v4's value: the
        // daemon folds changes merged together, so v3's value was never due on its own.
        let mut history = Scenario::clean();
        history.insert(17, Scenario::committed("n2", "s", "k1", "c2-3", 6_400, "v4"));
        history.insert(18, Scenario::watch(2, "n2", "s", 6_405, Scenario::change(4, "v4", "k1", "c2-3")));
        history.remove(16);
        for position in [history.len() - 5, history.len() - 3, history.len() - 1] {
            let Record::Final(state) = &mut history[position] else { unreachable!() };
            state.settings.insert("k1".into(), "c2-3".into());
            state.versions.push(FinalVersion {
                label: "v4".into(),
                parents: vec!["v3".into()],
                content_hash: String::new(),
            });
        }
        let report = check(&history);
        assert!(report.passed(), "{report}");
        // The same batch carrying an *older* value instead is caught.
        history[17] = Scenario::watch(2, "n2", "s", 6_405, Scenario::change(4, "v4", "k1", "c2-1"));
        let report = check(&history);
        let watch: Vec<_> = report.of(Invariant::Watch).collect();
        assert_eq!(watch.len(), 2, "{report}");
        assert!(watch[0].explanation.contains("never saw `c2-2`"), "{report}");
    }

    #[test]
    fn a_duplicate_and_an_out_of_order_event_are_caught() {
        let mut history = Scenario::clean();
        history.insert(7, Scenario::watch(2, "n2", "s", 206, Scenario::change(2, "v2", "k1", "c2-1")));
        history.insert(8, Scenario::watch(1, "n1", "e", 207, Scenario::change(1, "v1", "k1", "c1-1")));
        let report = check(&history);
        let watch: Vec<_> = report.of(Invariant::Watch).collect();
        assert_eq!(watch.len(), 2, "{report}");
        assert!(watch[0].explanation.contains("revision 2 delivered twice"), "{report}");
        assert!(watch[1].explanation.contains("revision 1 after 2"), "{report}");
    }

    #[test]
    fn a_resync_explains_a_gap_and_a_lower_revision() {
        let mut history = Scenario::clean();
        // n2 restarted: watcher 2 resumes with a resync at a lower revision, carrying v3's value.
        history[16] = Scenario::watch(2, "n2", "s", 6_205, Scenario::resync(1, "v3", &[("k1", "c2-2")]));
        let report = check(&history);
        assert!(report.passed(), "{report}");
    }

    #[test]
    fn an_ended_watch_is_not_held_to_later_writes_but_gets_no_more_events() {
        let mut history = Scenario::clean();
        history[16] = Scenario::watch(2, "n2", "s", 6_000, WatchedEvent::Ended { detail: "unknown_group".into() });
        assert!(check(&history).passed());
        history.insert(17, Scenario::watch(2, "n2", "s", 6_206, Scenario::change(3, "v3", "k1", "c2-2")));
        let report = check(&history);
        assert_eq!(report.of(Invariant::Watch).count(), 1, "{report}");
    }
}
