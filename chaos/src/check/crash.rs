//! No crash: a konord exits only when the runner kills it. A panic, an abort or a stack
//! overflow under faults is a bug whatever the other invariants say (chaos seed 302 first
//! showed one only as false deads, when n1's daemon thread overflowed its stack after a full
//! disk and the power cut that followed restarted it).

use super::{Invariant, Involved, Violation};
use crate::history::Record;

pub(super) fn check(records: &[Record], violations: &mut Vec<Violation>) {
    for (index, record) in records.iter().enumerate() {
        let Record::NodeExit(exit) = record else { continue };
        let last = exit.log_tail.iter().rev().find(|line| !line.trim().is_empty()).map_or("", String::as_str);
        violations.push(Violation {
            invariant: Invariant::Crash,
            group: None,
            explanation: format!(
                "konord {} exited on its own ({}), noticed at {} ms; its log ends: {last}",
                exit.node, exit.status, exit.at_ms
            ),
            involved: vec![Involved {
                record: index,
                node: Some(exit.node.clone()),
                from_ms: exit.at_ms,
                to_ms: exit.at_ms,
            }],
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::check::scenario::Scenario;
    use crate::check::{Invariant, check};
    use crate::history::{NodeExit, Record};

    #[test]
    fn a_node_that_exits_on_its_own_is_a_crash_and_a_clean_run_has_none() {
        assert!(check(&Scenario::clean()).passed());
        let mut history = Scenario::clean();
        history.insert(
            12,
            Record::NodeExit(NodeExit {
                node: "n2".into(),
                at_ms: 6_000,
                status: "signal: 6 (SIGABRT) (core dumped)".into(),
                log_tail: vec![
                    "thread 'konord-daemon' has overflowed its stack".into(),
                    "fatal runtime error: stack overflow, aborting".into(),
                    String::new(),
                ],
            }),
        );
        let report = check(&history);
        let crashes: Vec<_> = report.of(Invariant::Crash).collect();
        assert_eq!(crashes.len(), 1, "{report}");
        assert!(crashes[0].explanation.contains("konord n2 exited on its own (signal: 6"), "{report}");
        assert!(crashes[0].explanation.ends_with("fatal runtime error: stack overflow, aborting"), "{report}");
    }
}
