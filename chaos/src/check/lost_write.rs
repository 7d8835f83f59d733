//! SPEC invariant 2, no acknowledged write lost: every write answered `Committed` is in every
//! member's final history, and its value was not replaced by a write it had overwritten.
//!
//! **The argument.** A write sets one key; the daemon makes it one version whose parents are
//! the versions the writer held, and an Automerge `set` supersedes every value of the key it
//! saw (docs/data-model.md, "Conflicts and deletes as users see them"). So once write `W`
//! (version `V`) is in a node's history, the node's value of the key is `W`'s value or the
//! value of a write that `W` did not see: one whose version is *not* an ancestor of `V`
//! (concurrent with `V`, the deterministic winner of a conflict, or later). The check fails a
//! node whose final history lacks `V`, or whose final value of the key is absent, was written
//! by no client, or was written by a committed write whose version is certainly a strict
//! ancestor of `V` in that node's final version graph. It holds for both modes: in a strong
//! group the graph is one chain and "ancestor" means "earlier in the sequence".
//!
//! It never blames a value it cannot place: a write whose outcome is unknown (or refused in a
//! way that may still take effect) has no version label, so its value is accepted. Real time is
//! not used: an eventual group's conflict winner is chosen by op id, not by the wall clock, so
//! a write acknowledged earlier may rightly win over one acknowledged later.

use super::{Invariant, Run, Violation};

pub(super) fn check(run: &Run<'_>, violations: &mut Vec<Violation>) {
    for write in &run.writes {
        let Some(label) = write.committed_version() else { continue };
        let (group, key) = (write.op.group.as_str(), write.op.key.as_str());
        // Missing final states are the convergence check's to report.
        let Some(finals) = run.finals.get(group) else { continue };
        for (&node, &(final_index, state)) in finals {
            // A final state is a snapshot: a write acknowledged after it was read need not be
            // in it (the runner lets every operation end first; this keeps the rule true of
            // any history).
            if write.op.complete_ms > state.at_ms {
                continue;
            }
            let Some(graph) = run.graph(group, node) else { continue };
            let lost = |explanation: String, also: Option<usize>| {
                let mut involved = vec![run.involved(write.index), run.involved(final_index)];
                involved.extend(also.map(|index| run.involved(index)));
                Violation { invariant: Invariant::LostWrite, group: Some(group.to_owned()), explanation, involved }
            };
            let acknowledged = format!(
                "write `{}` of key `{key}`, acknowledged as {label} at {} ms",
                write.value, write.op.complete_ms
            );
            if graph.candidates_with_hash(label, write.committed_hash()).is_empty() {
                violations.push(lost(format!("{acknowledged}, is not in {node}'s final history"), None));
                continue;
            }
            match state.settings.get(key).map(String::as_str) {
                Some(value) if value == write.value => {}
                None => violations.push(lost(format!("{acknowledged}: {node} ends with the key unset"), None)),
                Some(value) => match run.write_of(value) {
                    None => violations
                        .push(lost(format!("{acknowledged}: {node} ends with `{value}`, which no client wrote"), None)),
                    Some(other) => {
                        if let Some(other_label) = other.committed_version()
                            && other.op.key == key
                            && graph.certainly_before(other_label, label)
                        {
                            violations.push(lost(
                                format!(
                                    "{acknowledged}: {node} ends with `{value}` of {other_label}, an older version \
                                     that {label} had overwritten"
                                ),
                                Some(other.index),
                            ));
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::scenario::Scenario;
    use super::super::{Invariant, check};
    use crate::history::{FinalVersion, Outcome, Record};

    #[test]
    fn an_acknowledged_write_overwritten_by_an_older_value_is_lost() {
        let mut history = Scenario::clean();
        // n2 of the eventual group ends with the value of v2, which v3 overwrote.
        let position = history.len() - 4;
        history[position] = Scenario::final_state("n2", "e", "he", &[("k1", "c1-1")], &["v1", "v2", "v3"]);
        let report = check(&history);
        let lost: Vec<_> = report.of(Invariant::LostWrite).collect();
        assert_eq!(lost.len(), 1, "{report}");
        assert!(lost[0].explanation.contains("`c1-2`") && lost[0].explanation.contains("n2"), "{report}");
    }

    #[test]
    fn an_acknowledged_write_missing_from_a_members_history_is_lost() {
        let mut history = Scenario::clean();
        // n3 of the strong group never got v3 (and still serves v2's value).
        let position = history.len() - 1;
        history[position] = Scenario::final_state("n3", "s", "hs", &[("k1", "c2-1")], &["v1", "v2"]);
        let report = check(&history);
        let lost: Vec<_> = report.of(Invariant::LostWrite).collect();
        assert_eq!(lost.len(), 1, "{report}");
        assert!(lost[0].explanation.contains("not in n3's final history"), "{report}");
    }

    #[test]
    fn a_concurrent_write_that_wins_the_conflict_loses_nothing() {
        // Two writes of k1 made on both sides of a partition, both acknowledged as v2: every
        // node ends with the winner, whose version is not an ancestor of the loser's.
        let mut history = vec![
            Scenario::run(),
            Scenario::committed("n1", "e", "k1", "c1-1", 100, "v2"),
            Scenario::committed("n2", "e", "k1", "c2-1", 200, "v2"),
        ];
        for node in ["n1", "n2", "n3"] {
            let Record::Final(mut state) = Scenario::final_state(node, "e", "he", &[("k1", "c1-1")], &["v1"]) else {
                unreachable!()
            };
            for tag in ["v2-aa", "v2-bb"] {
                state.versions.push(FinalVersion {
                    label: tag.into(),
                    parents: vec!["v1".into()],
                    content_hash: String::new(),
                });
            }
            history.push(Record::Final(state));
            history.push(Scenario::final_state(node, "s", "hs", &[], &["v1"]));
        }
        let report = check(&history);
        assert!(report.passed(), "{report}");
    }

    #[test]
    fn a_lost_version_whose_label_a_later_version_took_is_still_lost() {
        // v3 (c1-2) was acknowledged with content hash aaa; every node ends with a v3 of hash
        // bbb (its own v3 was lost, a later write took the counter) and a value of that one.
        let mut history = Scenario::clean();
        for record in history.iter_mut() {
            match record {
                Record::Op(op) => {
                    if let Outcome::Committed { version, content_hash, .. } = &mut op.outcome {
                        *content_hash = format!("hash-of-{version}");
                    }
                }
                Record::Final(state) => {
                    for version in &mut state.versions {
                        version.content_hash = format!("hash-of-{}", version.label);
                    }
                }
                _ => {}
            }
        }
        assert!(check(&history).passed(), "hashes that match change nothing");
        for record in history.iter_mut() {
            if let Record::Final(state) = record
                && state.group == "e"
                && let Some(version) = state.versions.iter_mut().find(|version| version.label == "v3")
            {
                version.content_hash = "hash-of-another-v3".into();
            }
        }
        let report = check(&history);
        let lost: Vec<_> = report.of(Invariant::LostWrite).collect();
        assert_eq!(lost.len(), 3, "{report}");
        assert!(lost.iter().all(|violation| violation.explanation.contains("is not in")), "{report}");
    }

    #[test]
    fn a_write_acknowledged_after_the_final_states_were_read_is_not_held_against_them() {
        // Finals are read at 20,000 ms; a write invoked before, answered after, is not in them.
        let mut history = Scenario::clean();
        let Record::Op(mut late) = Scenario::committed("n1", "s", "k1", "c1-99", 19_000, "v9") else { unreachable!() };
        late.complete_ms = 20_500;
        history.insert(14, Record::Op(late.clone()));
        assert_eq!(check(&history).of(Invariant::LostWrite).count(), 0);
        // Answered before the finals were read, the same write is lost.
        late.complete_ms = 19_500;
        history[14] = Record::Op(late);
        assert!(check(&history).of(Invariant::LostWrite).count() > 0);
    }

    #[test]
    fn a_value_of_a_write_with_an_unknown_outcome_is_not_held_against_the_system() {
        let mut history = Scenario::clean();
        let unknown = Outcome::Unknown { detail: "timeout".into() };
        history.insert(14, Scenario::write("n2", "e", "k1", "c2-9", 6_150, unknown));
        for position in [history.len() - 6, history.len() - 4, history.len() - 2] {
            let Record::Final(state) = &mut history[position] else { unreachable!() };
            state.settings.insert("k1".into(), "c2-9".into());
        }
        let report = check(&history);
        assert_eq!(report.of(Invariant::LostWrite).count(), 0, "{report}");
    }
}
