//! SPEC invariant 1, convergence: after the faults healed and the run settled (`settle_ms`,
//! the stated bound), every member of a group holds the same heads and the same settings.
//! Every node of the run joins every group, so a node without a final state of a group did not
//! converge either.

use std::collections::{BTreeMap, BTreeSet};

use super::{Invariant, Run, Violation};

pub(super) fn check(run: &Run<'_>, violations: &mut Vec<Violation>) {
    let Some(info) = run.info else { return };
    for (group, _) in run.groups() {
        let empty = BTreeMap::new();
        let finals = run.finals.get(group).unwrap_or(&empty);
        let missing: Vec<&str> =
            info.nodes.iter().map(String::as_str).filter(|node| !finals.contains_key(node)).collect();
        if !missing.is_empty() {
            violations.push(Violation {
                invariant: Invariant::Convergence,
                group: Some(group.to_owned()),
                explanation: format!(
                    "no final state from {} after {} ms of settling",
                    missing.join(", "),
                    info.settle_ms
                ),
                involved: Vec::new(),
            });
        }
        let involved = || finals.values().map(|&(index, _)| run.involved(index)).collect();
        let heads: BTreeSet<&str> = finals.values().map(|(_, state)| state.heads.as_str()).collect();
        if heads.len() > 1 {
            let by_node: Vec<String> =
                finals.iter().map(|(node, (_, state))| format!("{node} {}", state.heads)).collect();
            violations.push(Violation {
                invariant: Invariant::Convergence,
                group: Some(group.to_owned()),
                explanation: format!("heads differ after {} ms of settling: {}", info.settle_ms, by_node.join(", ")),
                involved: involved(),
            });
        }
        let mut states = finals.iter();
        if let Some((first_node, (_, first))) = states.next() {
            let differing: Vec<String> = states
                .filter(|(_, (_, state))| state.settings != first.settings)
                .map(|(node, (_, state))| {
                    let keys: BTreeSet<&String> = first.settings.keys().chain(state.settings.keys()).collect();
                    let keys: Vec<&str> = keys
                        .into_iter()
                        .filter(|key| first.settings.get(*key) != state.settings.get(*key))
                        .map(String::as_str)
                        .collect();
                    format!("{node} differs from {first_node} in {}", keys.join(", "))
                })
                .collect();
            if !differing.is_empty() {
                violations.push(Violation {
                    invariant: Invariant::Convergence,
                    group: Some(group.to_owned()),
                    explanation: format!(
                        "settings differ after {} ms of settling: {}",
                        info.settle_ms,
                        differing.join("; ")
                    ),
                    involved: involved(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::scenario::Scenario;
    use super::super::{Invariant, check};

    #[test]
    fn diverged_final_states_are_caught() {
        let mut history = Scenario::clean();
        let position = history.len() - 2;
        history[position] =
            Scenario::final_state("n3", "e", "hx", &[("k1", "c1-2"), ("k9", "c1-2")], &["v1", "v2", "v3"]);
        let report = check(&history);
        let convergence: Vec<_> = report.of(Invariant::Convergence).collect();
        assert_eq!(convergence.len(), 2, "{report}");
        assert!(convergence[0].explanation.contains("n3 hx"), "{report}");
        assert!(convergence[1].explanation.contains("n3 differs from n1 in k9"), "{report}");
    }

    #[test]
    fn a_member_without_a_final_state_did_not_converge() {
        let mut history = Scenario::clean();
        history.pop();
        let report = check(&history);
        let convergence: Vec<_> = report.of(Invariant::Convergence).collect();
        assert_eq!(convergence.len(), 1, "{report}");
        assert!(convergence[0].explanation.contains("no final state from n3"), "{report}");
    }
}
