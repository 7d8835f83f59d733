//! Anomaly rules over what this node's failure detector sees (issue 15, SPEC F3). Pure: the
//! daemon feeds [`AlertRules::observe`] the mesh after each membership refresh, with the time,
//! and acts on what it answers (logs, `/api/v1/alerts`, metrics); the rules are tested here on
//! made-up observations and in the simulator on real node code.
//!
//! Three rules, each raised once per subject and cleared when it no longer holds:
//! * **flapping**: a node went from live to dead [`FLAP_DOWNS`] times within [`FLAP_WINDOW_MS`];
//!   cleared after a window without a new fall.
//! * **heartbeat delay**: a live node's heartbeat age, smoothed over about a second, is more than
//!   [`DELAY_FACTOR`] times its own baseline (smoothed over minutes) and at least
//!   [`DELAY_MARGIN_MS`] above it, for [`DELAY_HOLD_MS`] on end (longer at a slow gossip), after
//!   [`DELAY_WARMUP_SAMPLES`] samples (their mean is the first baseline); the baseline stops
//!   learning while the alert holds. (A crashed node's heartbeats age too, for the few seconds
//!   before the detector calls it dead: the hold keeps that quiet.)
//! * **label lost**: at least half (and at least two) of the nodes carrying one label
//!   (`region=eu-west`, `infra=cloud`) fell dead within [`LABEL_LOSS_WINDOW_MS`] of each other:
//!   a partition, or a zone down. Labels on fewer than [`LABEL_MIN_NODES`] nodes are not judged.
//!
//! A graceful leave is not a failure: leaving nodes count for none of them. `Unknown` is no
//! news (this node just started or resumed from a pause and cannot judge yet): it changes no
//! rule's memory, so a restart does not take long-dead nodes for a fresh loss, and a stall does
//! not clear and raise alerts again.

use std::collections::{BTreeMap, VecDeque};

pub use konor_sdk::health::{Alert, AlertKind};

/// Falls from live to dead within [`FLAP_WINDOW_MS`] that make a node flapping.
pub const FLAP_DOWNS: usize = 3;
/// The window in which falls count towards flapping (and the quiet time that clears it).
pub const FLAP_WINDOW_MS: u64 = 120_000;
/// How many times its baseline a node's smoothed heartbeat age must reach.
pub const DELAY_FACTOR: f64 = 4.0;
/// How far above its baseline (ms) it must be as well: a baseline of a few ms times four is
/// still nothing.
pub const DELAY_MARGIN_MS: f64 = 1_000.0;
/// How long the delay must stay high before it is an alert: longer than a crashed node takes
/// to be judged dead (about 2-8 s), which is the detector's news, not this rule's.
pub const DELAY_HOLD_MS: u64 = 10_000;
/// The hold in gossip periods: the detection bound is about 8 of them (2 s at 250 ms), so 40
/// leaves a wide margin at any gossip period.
pub const DELAY_HOLD_GOSSIP_INTERVALS: u64 = 40;
/// Samples of a node before its baseline is trusted (at the daemon's 100 ms poll: 30 s).
pub const DELAY_WARMUP_SAMPLES: u32 = 300;
/// Weight of a new sample in the fast average (about 1 s at a 100 ms poll).
const FAST_WEIGHT: f64 = 1.0 / 8.0;
/// Weight of a new sample in the baseline (about 100 s at a 100 ms poll).
const BASELINE_WEIGHT: f64 = 1.0 / 1024.0;
/// Nodes within which falls count as one loss of a label.
pub const LABEL_LOSS_WINDOW_MS: u64 = 10_000;
/// Labels carried by fewer nodes than this are not judged (losing one of two is not a pattern).
pub const LABEL_MIN_NODES: usize = 3;
/// Nodes a label-lost message names; the rest are counted (a message goes to every webhook).
const LABEL_NAMES_SHOWN: usize = 10;
/// Alerts kept after they cleared, newest last.
pub const ALERT_HISTORY_MAX: usize = 256;

/// A change the daemon acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertChange {
    /// A rule started to hold.
    Raised(Alert),
    /// It no longer holds (the alert with its clear time).
    Cleared(Alert),
}

/// A node's state as the failure detector reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Heartbeats arrive.
    Live,
    /// Not judged yet.
    Unknown,
    /// The detector gave up on it.
    Dead,
    /// It announced a graceful shutdown.
    Leaving,
}

/// One node of the mesh, as seen at one observation.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// Node id.
    pub id: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// The detector's verdict.
    pub seen: Seen,
    /// Milliseconds since its last heartbeat was heard, when known.
    pub heartbeat_age_ms: Option<u64>,
}

#[derive(Debug, Default)]
struct NodeTrack {
    last: Option<Seen>,
    /// Times it fell from live to dead, within the flap window.
    falls: VecDeque<u64>,
    /// When it last fell dead, while it stays dead.
    dead_since: Option<u64>,
    fast: f64,
    baseline: f64,
    samples: u32,
    /// Since when the smoothed delay has been high, while it is.
    high_since: Option<u64>,
}

/// Per label: how many nodes carry it, and when each of its dead ones fell.
type LabelFalls<'a> = (usize, Vec<(&'a str, u64)>);

/// The time of an observation: monotonic milliseconds for the rules' windows (a step of the wall
/// clock must not end a window early or keep it open), wall-clock Unix milliseconds for the
/// times an alert shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Milliseconds on a clock that never steps (since the daemon started).
    pub mono_ms: u64,
    /// Unix milliseconds.
    pub wall_ms: u64,
}

/// The rules' memory: per node, and the alerts that hold.
#[derive(Debug)]
pub struct AlertRules {
    nodes: BTreeMap<String, NodeTrack>,
    active: BTreeMap<(AlertKind, String), Alert>,
    history: VecDeque<Alert>,
    delay_hold_ms: u64,
}

impl Default for AlertRules {
    fn default() -> AlertRules {
        AlertRules {
            nodes: BTreeMap::new(),
            active: BTreeMap::new(),
            history: VecDeque::new(),
            delay_hold_ms: DELAY_HOLD_MS,
        }
    }
}

impl AlertRules {
    /// Rules for a mesh gossiping every `gossip_interval`: a crashed node takes longer to be
    /// judged dead at a slower gossip, so the heartbeat delay must hold longer before it is an
    /// alert ([`DELAY_HOLD_GOSSIP_INTERVALS`] gossip periods, at least [`DELAY_HOLD_MS`]).
    pub fn for_gossip_interval(gossip_interval: std::time::Duration) -> AlertRules {
        let hold = (gossip_interval.as_millis() as u64).saturating_mul(DELAY_HOLD_GOSSIP_INTERVALS);
        AlertRules { delay_hold_ms: hold.max(DELAY_HOLD_MS), ..AlertRules::default() }
    }

    /// Alerts that hold now, by kind and subject.
    pub fn active(&self) -> Vec<Alert> {
        self.active.values().cloned().collect()
    }

    /// Alerts that cleared, oldest first, at most [`ALERT_HISTORY_MAX`].
    pub fn history(&self) -> Vec<Alert> {
        self.history.iter().cloned().collect()
    }

    /// Takes one observation of the whole mesh (this node excluded) at `now_ms` (unix ms) and
    /// answers the alerts it raised and cleared.
    pub fn observe(&mut self, now: Moment, nodes: &[Observed<'_>]) -> Vec<AlertChange> {
        let now_ms = now.mono_ms;
        let mut holds: BTreeMap<(AlertKind, String), String> = BTreeMap::new();
        for node in nodes {
            if !self.nodes.contains_key(node.id) {
                self.nodes.insert(node.id.to_owned(), NodeTrack::default());
            }
            let Some(track) = self.nodes.get_mut(node.id) else { continue };
            match node.seen {
                // No news: this node just started or resumed and cannot judge it yet. A peer
                // long dead that turns unknown and dead again did not fall again.
                Seen::Unknown => {}
                Seen::Dead => {
                    if track.last == Some(Seen::Live) {
                        track.falls.push_back(now_ms);
                        track.dead_since = Some(now_ms);
                    }
                    track.last = Some(Seen::Dead);
                }
                Seen::Live | Seen::Leaving => {
                    track.dead_since = None;
                    track.last = Some(node.seen);
                }
            }
            while track.falls.front().is_some_and(|at| now_ms.saturating_sub(*at) > FLAP_WINDOW_MS) {
                track.falls.pop_front();
            }
            let flapping_key = (AlertKind::Flapping, node.id.to_owned());
            let still_flapping = self.active.contains_key(&flapping_key) && !track.falls.is_empty();
            if track.falls.len() >= FLAP_DOWNS || still_flapping {
                let message = format!(
                    "{} fell dead {} times in the last {} s",
                    node.id,
                    track.falls.len(),
                    FLAP_WINDOW_MS / 1000
                );
                holds.insert(flapping_key, message);
            }
            let delay_key = (AlertKind::HeartbeatDelay, node.id.to_owned());
            let alerting = self.active.get(&delay_key).map(|alert| alert.message.clone());
            match (node.seen, node.heartbeat_age_ms) {
                (Seen::Live, Some(age)) => {
                    let age = age as f64;
                    track.samples = track.samples.saturating_add(1);
                    if track.samples == 1 {
                        (track.fast, track.baseline) = (age, age);
                    } else {
                        track.fast += FAST_WEIGHT * (age - track.fast);
                    }
                    let judged = track.samples >= DELAY_WARMUP_SAMPLES;
                    let high =
                        track.fast > DELAY_FACTOR * track.baseline && track.fast > track.baseline + DELAY_MARGIN_MS;
                    let back = track.fast < 2.0 * track.baseline.max(1.0);
                    if judged && high {
                        track.high_since.get_or_insert(now_ms);
                    } else if alerting.is_none() || back {
                        track.high_since = None;
                    }
                    let held = track.high_since.is_some_and(|since| now_ms.saturating_sub(since) >= self.delay_hold_ms);
                    if judged && (held || (alerting.is_some() && !back)) {
                        holds.insert(
                            delay_key,
                            format!(
                                "heartbeats of {} are {:.0} ms old on average, against {:.0} ms usually",
                                node.id, track.fast, track.baseline
                            ),
                        );
                    } else if !judged {
                        // Warming up: the baseline is the plain mean of the samples so far.
                        track.baseline += (age - track.baseline) / f64::from(track.samples);
                    } else if track.high_since.is_none() {
                        // The baseline learns only while the delay is not high: learning during
                        // the hold would lift it until the delay no longer counts as high.
                        track.baseline += BASELINE_WEIGHT * (age - track.baseline);
                    }
                }
                (Seen::Unknown, _) | (Seen::Live, None) => {
                    // No sample: an alert that holds keeps holding.
                    if let Some(message) = alerting {
                        holds.insert(delay_key, message);
                    }
                }
                (Seen::Dead | Seen::Leaving, _) => {
                    // Gone: the delay's story is the failure detector's now; start over.
                    track.samples = 0;
                    track.high_since = None;
                }
            }
        }
        self.judge_labels(nodes, &mut holds);
        if self.nodes.len() > nodes.len() {
            // Nodes the mesh forgot (dead past chitchat's grace period): memory stays as large as
            // the mesh. Their alerts clear below, as they no longer hold.
            let present: std::collections::BTreeSet<&str> = nodes.iter().map(|node| node.id).collect();
            self.nodes.retain(|id, _| present.contains(id.as_str()));
        }
        self.settle(now.wall_ms, holds)
    }

    fn judge_labels(&self, nodes: &[Observed<'_>], holds: &mut BTreeMap<(AlertKind, String), String>) {
        // Per label: how many nodes carry it, and when each of its dead ones fell.
        let mut by_label: BTreeMap<(&str, &str), LabelFalls<'_>> = BTreeMap::new();
        for node in nodes.iter().filter(|node| node.seen != Seen::Leaving) {
            let fell = self.nodes.get(node.id).and_then(|track| track.dead_since);
            for (key, value) in node.labels {
                let entry = by_label.entry((key.as_str(), value.as_str())).or_default();
                entry.0 += 1;
                if let Some(fell) = fell {
                    entry.1.push((node.id, fell));
                }
            }
        }
        for ((key, value), (carried, fallen)) in by_label {
            if carried < LABEL_MIN_NODES || fallen.len() < 2 {
                continue;
            }
            let label = format!("{key}={value}");
            let Some(latest) = fallen.iter().map(|(_, at)| *at).max() else { continue };
            // The falls that cluster: those within the window of the latest one.
            let together = fallen.iter().filter(|(_, at)| latest.saturating_sub(*at) <= LABEL_LOSS_WINDOW_MS).count();
            let key = (AlertKind::LabelLost, label.clone());
            let needed = carried.div_ceil(2).max(2);
            let holding = self.active.contains_key(&key);
            if together >= needed || (holding && fallen.len() >= needed) {
                let mut names: Vec<&str> = fallen.iter().take(LABEL_NAMES_SHOWN).map(|(id, _)| *id).collect();
                let more = format!("{} more", fallen.len().saturating_sub(LABEL_NAMES_SHOWN));
                if fallen.len() > LABEL_NAMES_SHOWN {
                    names.push(&more);
                }
                holds.insert(
                    key,
                    format!(
                        "{} of {carried} nodes with {label} fell dead within {} s of each other ({}): a partition, or the zone down?",
                        together.max(fallen.len()),
                        LABEL_LOSS_WINDOW_MS / 1000,
                        names.join(", ")
                    ),
                );
            }
        }
    }

    /// Raises what holds and was not active, clears what was active and holds no more.
    fn settle(&mut self, now_ms: u64, holds: BTreeMap<(AlertKind, String), String>) -> Vec<AlertChange> {
        let mut changes = Vec::new();
        let ended: Vec<(AlertKind, String)> =
            self.active.keys().filter(|key| !holds.contains_key(*key)).cloned().collect();
        for key in ended {
            if let Some(mut alert) = self.active.remove(&key) {
                alert.cleared_ms = Some(now_ms);
                self.history.push_back(alert.clone());
                if self.history.len() > ALERT_HISTORY_MAX {
                    self.history.pop_front();
                }
                changes.push(AlertChange::Cleared(alert));
            }
        }
        for ((kind, subject), message) in holds {
            match self.active.get_mut(&(kind, subject.clone())) {
                Some(alert) => alert.message = message,
                None => {
                    let alert = Alert { kind, subject: subject.clone(), message, raised_ms: now_ms, cleared_ms: None };
                    self.active.insert((kind, subject), alert.clone());
                    changes.push(AlertChange::Raised(alert));
                }
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mesh {
        labels: Vec<BTreeMap<String, String>>,
    }

    impl Mesh {
        /// `count` nodes n0.., the first `in_a` with region=a, the rest region=b.
        fn new(count: usize, in_a: usize) -> Mesh {
            let labels = (0..count)
                .map(|i| BTreeMap::from([("region".to_owned(), if i < in_a { "a" } else { "b" }.to_owned())]))
                .collect();
            Mesh { labels }
        }

        fn observe(&self, rules: &mut AlertRules, now: u64, seen: impl Fn(usize) -> (Seen, u64)) -> Vec<AlertChange> {
            let ids: Vec<String> = (0..self.labels.len()).map(|i| format!("n{i}")).collect();
            let nodes: Vec<Observed<'_>> = (0..self.labels.len())
                .map(|i| {
                    let (state, age) = seen(i);
                    Observed { id: &ids[i], labels: &self.labels[i], seen: state, heartbeat_age_ms: Some(age) }
                })
                .collect();
            rules.observe(Moment { mono_ms: now, wall_ms: 1_700_000_000_000 + now }, &nodes)
        }
    }

    fn raised(changes: &[AlertChange]) -> Vec<(AlertKind, String)> {
        changes
            .iter()
            .filter_map(|change| match change {
                AlertChange::Raised(alert) => Some((alert.kind, alert.subject.clone())),
                AlertChange::Cleared(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_node_that_falls_three_times_in_two_minutes_is_flapping_until_it_stays_up() {
        let mesh = Mesh::new(4, 4);
        let mut rules = AlertRules::default();
        let mut all = Vec::new();
        let mut now = 0;
        for cycle in 0..3 {
            for phase in [Seen::Live, Seen::Dead] {
                now += 10_000;
                let changes = mesh.observe(&mut rules, now, |i| (if i == 2 { phase } else { Seen::Live }, 100));
                all.extend(raised(&changes));
                if cycle < 2 {
                    assert!(rules.active().is_empty(), "raised after {} falls", cycle + 1);
                }
            }
        }
        assert_eq!(all, [(AlertKind::Flapping, "n2".to_owned())]);
        // Up for good: cleared once the window holds no fall.
        now += FLAP_WINDOW_MS + 1;
        let changes = mesh.observe(&mut rules, now, |_| (Seen::Live, 100));
        assert!(matches!(&changes[..], [AlertChange::Cleared(alert)] if alert.subject == "n2"), "{changes:?}");
        assert_eq!(rules.history().len(), 1);
        // Leaving is no fall.
        let mut rules = AlertRules::default();
        for step in 0..8 {
            let phase = if step % 2 == 0 { Seen::Live } else { Seen::Leaving };
            mesh.observe(&mut rules, step * 1000, |i| (if i == 1 { phase } else { Seen::Live }, 100));
        }
        assert!(rules.active().is_empty());
    }

    #[test]
    fn most_nodes_of_a_label_falling_together_is_a_lost_label_and_one_node_is_not() {
        let mesh = Mesh::new(7, 3);
        let mut rules = AlertRules::default();
        mesh.observe(&mut rules, 0, |_| (Seen::Live, 100));
        // One node of region b falls: no pattern.
        let changes = mesh.observe(&mut rules, 1_000, |i| (if i == 3 { Seen::Dead } else { Seen::Live }, 100));
        assert!(raised(&changes).is_empty());
        // A second one within the window: two of four is half of region b.
        let changes =
            mesh.observe(&mut rules, 5_000, |i| (if i == 3 || i == 4 { Seen::Dead } else { Seen::Live }, 100));
        assert_eq!(raised(&changes), [(AlertKind::LabelLost, "region=b".to_owned())]);
        // They come back: cleared.
        let changes = mesh.observe(&mut rules, 9_000, |_| (Seen::Live, 100));
        assert!(matches!(&changes[..], [AlertChange::Cleared(alert)] if alert.subject == "region=b"));
        // Two falls far apart are not one loss.
        let mut rules = AlertRules::default();
        mesh.observe(&mut rules, 0, |_| (Seen::Live, 100));
        mesh.observe(&mut rules, 1_000, |i| (if i == 3 { Seen::Dead } else { Seen::Live }, 100));
        let changes = mesh.observe(&mut rules, 1_000 + LABEL_LOSS_WINDOW_MS + 1, |i| {
            (if i == 3 || i == 4 { Seen::Dead } else { Seen::Live }, 100)
        });
        assert!(raised(&changes).is_empty(), "{changes:?}");
    }

    #[test]
    fn an_observer_that_restarts_or_stalls_sees_no_new_loss_and_clears_nothing() {
        let mesh = Mesh::new(7, 3);
        // A restart: nodes 3 and 4 died long ago; a fresh observer sees them unknown, then dead.
        let mut rules = AlertRules::default();
        mesh.observe(&mut rules, 0, |i| (if i == 3 || i == 4 { Seen::Unknown } else { Seen::Live }, 100));
        let changes =
            mesh.observe(&mut rules, 2_000, |i| (if i == 3 || i == 4 { Seen::Dead } else { Seen::Live }, 100));
        assert!(changes.is_empty(), "a restart raised {changes:?}");
        // A real loss raises; a stall (every peer unknown for 2 s) neither clears nor raises again.
        let mut rules = AlertRules::default();
        mesh.observe(&mut rules, 0, |_| (Seen::Live, 100));
        let raised_first =
            mesh.observe(&mut rules, 1_000, |i| (if i == 3 || i == 4 { Seen::Dead } else { Seen::Live }, 100));
        assert_eq!(raised(&raised_first), [(AlertKind::LabelLost, "region=b".to_owned())]);
        let stalled = mesh.observe(&mut rules, 3_000, |_| (Seen::Unknown, 100));
        let after = mesh.observe(&mut rules, 5_000, |i| (if i == 3 || i == 4 { Seen::Dead } else { Seen::Live }, 100));
        assert!(stalled.is_empty() && after.is_empty(), "{stalled:?} {after:?}");
        assert_eq!(rules.active().len(), 1);
    }

    #[test]
    fn a_slow_gossip_holds_the_delay_longer_and_a_steady_delay_still_raises() {
        assert_eq!(AlertRules::for_gossip_interval(std::time::Duration::from_millis(250)).delay_hold_ms, DELAY_HOLD_MS);
        let mut rules = AlertRules::for_gossip_interval(std::time::Duration::from_secs(2));
        assert_eq!(rules.delay_hold_ms, 80_000);
        let mesh = Mesh::new(3, 3);
        let mut now = 0;
        for _ in 0..600 {
            now += 100;
            mesh.observe(&mut rules, now, |_| (Seen::Live, 1_000));
        }
        // n1's heartbeats stay 5 times their usual age: raised after the 80 s hold, not before.
        let mut raised_at = None;
        for _ in 0..1_200 {
            now += 100;
            let changes = mesh.observe(&mut rules, now, |i| (Seen::Live, if i == 1 { 5_000 } else { 1_000 }));
            if raised_at.is_none() && !raised(&changes).is_empty() {
                raised_at = Some(now);
            }
        }
        let after = raised_at.expect("a steady delay of 5 times the baseline was never raised") - 60_000;
        assert!((80_000..85_000).contains(&after), "raised {after} ms after the delay began");
    }

    #[test]
    fn heartbeats_far_slower_than_a_nodes_own_baseline_raise_an_alert_and_jitter_does_not() {
        let mesh = Mesh::new(3, 3);
        let mut rules = AlertRules::default();
        let mut now = 0;
        // A baseline with jitter: ages of 0 to 400 ms, every 100 ms, for a minute.
        for step in 0..600u64 {
            now += 100;
            let changes = mesh.observe(&mut rules, now, |_| (Seen::Live, (step * 37) % 400));
            assert!(raised(&changes).is_empty(), "jitter raised {changes:?}");
        }
        // A node that crashes: its heartbeats age for 3 s, then it is dead. No delay alert.
        for age in (0..30u64).map(|step| step * 100) {
            now += 100;
            let changes = mesh.observe(&mut rules, now, |i| (Seen::Live, if i == 2 { age } else { 100 }));
            assert!(raised(&changes).is_empty(), "a crash raised {changes:?}");
        }
        now += 100;
        mesh.observe(&mut rules, now, |i| (if i == 2 { Seen::Dead } else { Seen::Live }, 100));
        // n1's heartbeats fall 3 s behind, for good.
        let mut alerted = Vec::new();
        for step in 0..150u64 {
            now += 100;
            let changes =
                mesh.observe(&mut rules, now, |i| (Seen::Live, if i == 1 { 3_000 } else { (step * 37) % 400 }));
            alerted.extend(raised(&changes));
        }
        assert_eq!(alerted, [(AlertKind::HeartbeatDelay, "n1".to_owned())]);
        // Back to normal: cleared.
        let mut cleared = false;
        for step in 0..100u64 {
            now += 100;
            let changes = mesh.observe(&mut rules, now, |_| (Seen::Live, (step * 37) % 400));
            cleared |= changes.iter().any(|change| matches!(change, AlertChange::Cleared(_)));
        }
        assert!(cleared && rules.active().is_empty());
    }
}
