//! SPEC invariant 5, membership: a killed node is marked dead by every live node within the
//! detection bound; a node on a healthy network is never marked dead.
//!
//! Membership is sampled, so both rules are judged on the samples there are:
//!
//! * **Detection.** For a `kill9` (or `power_cut`) of node `x` at `t` that lasts past `t + detection_bound_ms`,
//!   every sample taken in `[t + bound, restart)` by another observer that is not itself
//!   killed or paused at that time must show `x` as anything but `live` (`dead`, or `suspect`
//!   on the way there). A run whose samples all fall before the bound judges nothing.
//! * **No false dead.** A sample in which observer `o` calls node `y` `dead` fails when, over
//!   the detection bound before it, no fault hit `y` or `o` and no network fault was active
//!   anywhere. Loss up to [`HEALTHY_LOSS_PERCENT`] % (`detail` `loss=N%`) counts as a
//!   healthy network (SPEC: no false positives at 5 % loss), and so do the fault layer's link
//!   faults (`delay`, `reorder`, `duplicate`) whose delay plus jitter is at most
//!   [`HEALTHY_DELAY_MS`] ms (detail `delay=Nms jitter=Mms ...`), and clock jumps that leave
//!   every certificate valid (detail `clock_offset=-50m`; see [`HEALTHY_CLOCK_BEHIND_MS`]):
//!   no protocol timer reads the wall clock, so a jump must not cost a node its place. The bound is the grace after a
//!   fault ends: a restarted node may be seen dead until the detector hears from it again.

use std::collections::BTreeSet;

use super::{Invariant, Run, Violation};
use crate::history::{FaultStart, MembershipSample, Record};

/// Loss on a link up to this percentage is a healthy network (SPEC invariant 5).
const HEALTHY_LOSS_PERCENT: f64 = 5.0;

/// Delay plus jitter of a link up to this is a healthy network: a slow WAN link, far from the
/// seconds of silence a failure detector needs to call a node dead.
const HEALTHY_DELAY_MS: u64 = 250;

/// A clock jump back by up to this is harmless: the CA backdates every certificate by an hour
/// (konord's `CLOCK_SKEW_ALLOWANCE`), so a node this far behind still finds them valid.
const HEALTHY_CLOCK_BEHIND_MS: i64 = 55 * 60 * 1000;

/// A clock jump ahead by up to this is harmless: a node certificate lasts a year.
const HEALTHY_CLOCK_AHEAD_MS: i64 = 300 * 24 * 60 * 60 * 1000;

/// The fault layer's link faults: delay, reordering, duplication of datagrams.
const LINK_FAULT_KINDS: &[&str] = &["delay", "reorder", "duplicate"];

/// Fault kinds that hit only their nodes and leave the network healthy. Any other kind (or an
/// unknown one) counts as a network fault, so the false-dead rule judges less, never wrongly.
const NODE_FAULT_KINDS: &[&str] = &["kill9", "pause", "disk_full", "slow_disk", "clock_jump", "power_cut"];

/// Fault kinds after which a node's own membership view may be stale (it was not running).
const STOPPED_KINDS: &[&str] = &["kill9", "pause", "power_cut"];

/// Fault kinds that kill their nodes until the fault ends: every other node must see them go.
const KILLED_KINDS: &[&str] = &["kill9", "power_cut"];

/// A fault and when it ended (`None`: never healed in the history).
#[derive(Debug)]
struct Fault<'a> {
    index: usize,
    start: &'a FaultStart,
    end_ms: Option<u64>,
}

impl Fault<'_> {
    fn active_during(&self, from_ms: u64, to_ms: u64) -> bool {
        self.start.at_ms <= to_ms && self.end_ms.is_none_or(|end_ms| end_ms >= from_ms)
    }

    fn hits(&self, node: &str) -> bool {
        self.start.nodes.iter().any(|hit| hit == node)
    }

    /// Loss of at most 5 %, a link fault of at most [`HEALTHY_DELAY_MS`], or a clock jump that
    /// leaves certificates valid: no fault at all for these rules.
    fn is_healthy_loss(&self) -> bool {
        let detail = &self.start.detail;
        match self.start.kind.as_str() {
            "loss" => loss_percent(detail).is_some_and(|p| p <= HEALTHY_LOSS_PERCENT),
            kind if LINK_FAULT_KINDS.contains(&kind) => {
                let delay = millis_of(detail, "delay=");
                let jitter = millis_of(detail, "jitter=");
                delay.zip(jitter).is_some_and(|(delay, jitter)| delay + jitter <= HEALTHY_DELAY_MS)
            }
            "clock_jump" => clock_offset_ms(detail)
                .is_some_and(|offset| (-HEALTHY_CLOCK_BEHIND_MS..=HEALTHY_CLOCK_AHEAD_MS).contains(&offset)),
            _ => false,
        }
    }

    fn is_network(&self) -> bool {
        !self.is_healthy_loss() && !NODE_FAULT_KINDS.contains(&self.start.kind.as_str())
    }
}

/// `delay=40ms` (anywhere in the detail, for `key` `delay=`) -> 40.
fn millis_of(detail: &str, key: &str) -> Option<u64> {
    let at = detail.split_whitespace().find_map(|word| word.strip_prefix(key))?;
    at.strip_suffix("ms")?.parse().ok()
}

/// `clock_offset=-50m` (anywhere in the detail) -> -3,000,000, read as konord's fault layer
/// reads it.
fn clock_offset_ms(detail: &str) -> Option<i64> {
    let word = detail.split([' ', ',']).find(|word| word.starts_with("clock_offset="))?;
    konor_node::fault_layer::control::FaultSettings::parse(word).ok().map(|settings| settings.clock_offset_ms)
}

/// `loss=3%` (anywhere in the detail) -> 3.
fn loss_percent(detail: &str) -> Option<f64> {
    let after = &detail[detail.find("loss=")? + "loss=".len()..];
    after[..after.find('%')?].trim().parse().ok()
}

pub(super) fn check(run: &Run<'_>, violations: &mut Vec<Violation>) {
    let Some(info) = run.info else { return };
    let bound_ms = info.detection_bound_ms;
    let mut faults: Vec<Fault<'_>> = Vec::new();
    let mut samples: Vec<(usize, &MembershipSample)> = Vec::new();
    for (index, record) in run.records.iter().enumerate() {
        match record {
            Record::FaultStart(start) => faults.push(Fault { index, start, end_ms: None }),
            Record::FaultEnd(end) => {
                if let Some(fault) = faults.iter_mut().find(|fault| fault.start.id == end.id && fault.end_ms.is_none())
                {
                    fault.end_ms = Some(end.at_ms);
                }
            }
            Record::Membership(sample) => samples.push((index, sample)),
            _ => {}
        }
    }
    let stopped = |node: &str, from_ms: u64, to_ms: u64| {
        faults.iter().any(|fault| {
            STOPPED_KINDS.contains(&fault.start.kind.as_str())
                && fault.hits(node)
                && fault.active_during(from_ms, to_ms)
        })
    };
    // Detection of every kill.
    for kill in faults.iter().filter(|fault| KILLED_KINDS.contains(&fault.start.kind.as_str())) {
        let deadline_ms = kill.start.at_ms.saturating_add(bound_ms);
        for victim in &kill.start.nodes {
            let mut blamed = BTreeSet::new();
            for &(index, sample) in &samples {
                let in_window = sample.at_ms >= deadline_ms && kill.end_ms.is_none_or(|end_ms| sample.at_ms < end_ms);
                if !in_window
                    || sample.observer == *victim
                    || sample.states.get(victim).map(String::as_str) != Some("live")
                    || stopped(&sample.observer, kill.start.at_ms, sample.at_ms)
                    || !blamed.insert(sample.observer.as_str())
                {
                    continue;
                }
                violations.push(Violation {
                    invariant: Invariant::MembershipDetection,
                    group: None,
                    explanation: format!(
                        "{victim} was killed at {} ms, yet {} still saw it live at {} ms, past the {bound_ms} ms \
                         detection bound",
                        kill.start.at_ms, sample.observer, sample.at_ms
                    ),
                    involved: vec![run.involved(kill.index), run.involved(index)],
                });
            }
        }
    }
    // No false dead.
    let mut blamed = BTreeSet::new();
    for &(index, sample) in &samples {
        let from_ms = sample.at_ms.saturating_sub(bound_ms);
        let active: Vec<&Fault<'_>> = faults
            .iter()
            .filter(|fault| !fault.is_healthy_loss() && fault.active_during(from_ms, sample.at_ms))
            .collect();
        if active.iter().any(|fault| fault.is_network() || fault.hits(&sample.observer)) {
            continue;
        }
        for (node, state) in &sample.states {
            if state != "dead" || *node == sample.observer || active.iter().any(|fault| fault.hits(node)) {
                continue;
            }
            if !blamed.insert((sample.observer.as_str(), node.as_str())) {
                continue;
            }
            violations.push(Violation {
                invariant: Invariant::FalseDead,
                group: None,
                explanation: format!(
                    "{} saw {node} dead at {} ms, though neither was under a fault and the network was healthy \
                     since {from_ms} ms",
                    sample.observer, sample.at_ms
                ),
                involved: vec![run.involved(index)],
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::scenario::Scenario;
    use super::super::{Invariant, check};
    use super::loss_percent;

    const N3_LIVE: [(&str, &str); 3] = [("n1", "live"), ("n2", "live"), ("n3", "live")];

    #[test]
    fn a_killed_node_never_seen_dead_is_caught() {
        let mut history = Scenario::clean();
        history[11] = Scenario::sample("n2", 4_500, &N3_LIVE);
        let report = check(&history);
        let detection: Vec<_> = report.of(Invariant::MembershipDetection).collect();
        assert_eq!(detection.len(), 1, "{report}");
        assert!(detection[0].explanation.contains("n2 still saw it live at 4500 ms"), "{report}");
    }

    #[test]
    fn a_node_seen_live_before_the_bound_or_after_its_restart_is_no_violation() {
        let mut history = Scenario::clean();
        history.insert(10, Scenario::sample("n2", 3_900, &N3_LIVE));
        history.insert(13, Scenario::sample("n2", 6_100, &N3_LIVE));
        assert!(check(&history).passed());
    }

    #[test]
    fn a_false_dead_on_a_healthy_network_is_caught_even_under_light_loss() {
        let mut history = Scenario::clean();
        let n2_dead = [("n1", "live"), ("n2", "dead"), ("n3", "live")];
        history.insert(18, Scenario::fault(2, 6_500, "loss", &["n2"], "loss=5%"));
        history.insert(21, Scenario::sample("n3", 12_000, &n2_dead));
        let report = check(&history);
        let false_dead: Vec<_> = report.of(Invariant::FalseDead).collect();
        assert_eq!(false_dead.len(), 1, "{report}");
        assert!(false_dead[0].explanation.contains("n3 saw n2 dead at 12000 ms"), "{report}");
    }

    #[test]
    fn a_node_seen_dead_under_heavy_loss_or_a_partition_or_just_after_a_restart_is_no_violation() {
        let n2_dead = [("n1", "live"), ("n2", "dead"), ("n3", "live")];
        let n3_dead = [("n1", "live"), ("n2", "live"), ("n3", "dead")];
        let mut history = Scenario::clean();
        history.insert(18, Scenario::fault(2, 6_500, "loss", &["n2"], "loss=20%"));
        history.insert(21, Scenario::sample("n3", 12_000, &n2_dead));
        assert!(check(&history).passed());
        let mut history = Scenario::clean();
        history.insert(18, Scenario::fault(2, 6_500, "partition", &["n1", "n2", "n3"], ""));
        history.insert(19, Scenario::heal(2, 10_000));
        history.insert(21, Scenario::sample("n3", 12_000, &n2_dead));
        assert!(check(&history).passed());
        let mut history = Scenario::clean();
        history.insert(13, Scenario::sample("n1", 7_000, &n3_dead));
        assert!(check(&history).passed());
    }

    #[test]
    fn a_false_dead_under_a_moderate_link_fault_or_clock_jump_is_caught_and_under_a_long_delay_is_not() {
        use crate::history::clock_jump_detail;
        let n2_dead = [("n1", "live"), ("n2", "dead"), ("n3", "live")];
        for (kind, detail, caught) in [
            ("delay", "egress delay=200ms jitter=50ms reorder=0% duplicate=0%", true),
            ("duplicate", "egress delay=0ms jitter=0ms reorder=0% duplicate=30%", true),
            ("delay", "egress delay=1000ms jitter=250ms reorder=0% duplicate=0%", false),
            ("delay", "egress delay=unreadable", false),
            ("clock_jump", &clock_jump_detail("clock_offset=-50m"), true),
            ("clock_jump", &clock_jump_detail("clock_offset=+3d"), true),
            ("clock_jump", &clock_jump_detail("clock_offset=-2h"), false),
            ("clock_jump", &clock_jump_detail("clock_offset=+400d"), false),
        ] {
            let mut history = Scenario::clean();
            history.insert(18, Scenario::fault(2, 6_500, kind, &["n1", "n2", "n3"], detail));
            history.insert(21, Scenario::sample("n3", 12_000, &n2_dead));
            let report = check(&history);
            assert_eq!(report.of(Invariant::FalseDead).count(), usize::from(caught), "{detail}: {report}");
        }
    }

    #[test]
    fn the_runners_details_are_read_as_it_writes_them() {
        use crate::history::{link_detail, loss_detail};
        let detail = link_detail("delay=40ms jitter=10ms reorder=0% duplicate=0%");
        assert_eq!((super::millis_of(&detail, "delay="), super::millis_of(&detail, "jitter=")), (Some(40), Some(10)));
        assert_eq!(super::loss_percent(&loss_detail(5)), Some(5.0));
        let jump = crate::history::clock_jump_detail("clock_offset=-50m");
        assert_eq!(super::clock_offset_ms(&jump), Some(-50 * 60 * 1000));
    }

    #[test]
    fn loss_percentages_are_read_from_the_detail() {
        assert_eq!(loss_percent("loss=5%"), Some(5.0));
        assert_eq!(loss_percent("egress loss=2.5% on n2"), Some(2.5));
        assert_eq!(loss_percent("loss"), None);
    }
}
