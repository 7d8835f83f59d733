//! Health history (SPEC F3, issue 15): what this node's failure detector saw of each peer over
//! the last hours, in bounded memory. Pure: the daemon feeds [`HealthHistory::observe`] the same
//! observations as the alert rules, saves [`HealthHistory::snapshot`] to its data dir now and
//! then, and loads it back at start, so a restart keeps the last hours.
//!
//! Per node it keeps
//! * its last [`TRANSITIONS_MAX`] state changes (live, dead, leaving) with their times;
//! * downsampled rings of what each membership poll saw: one-minute buckets for the last hour
//!   ([`FINE_BUCKETS`]) and ten-minute buckets for the last six hours ([`COARSE_BUCKETS`]); a
//!   bucket holds how many polls saw the node, how many saw it live, and the mean and largest
//!   heartbeat age (the failure detector's input: how long since its heartbeat last advanced).
//!
//! `unknown` is no news, as for the alert rules: a poll that cannot judge a node (this node just
//! started or resumed) neither counts nor changes its state. The first sighting of a node is
//! its state, not a change. Times never go back: a wall clock stepped back is held at the newest
//! time seen until it catches up, so rings stay in order.
//!
//! About 3.5 KB per node with full rings: under 3 MB at 800 nodes. Nodes that leave the mesh
//! view keep their history until their newest bucket is older than the coarse ring.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use konor_sdk::health::{Bucket, LabelSummary, MeshHistory, MinuteLive, NodeHistory, NodeSummary, Transition};

use crate::health::alerts::{Observed, Seen};

/// State changes kept per node.
pub const TRANSITIONS_MAX: usize = 64;
/// One-minute buckets kept: the last hour at full detail.
pub const FINE_BUCKETS: usize = 60;
/// Length of a fine bucket.
pub const FINE_MS: u64 = 60_000;
/// Ten-minute buckets kept: the last six hours.
pub const COARSE_BUCKETS: usize = 36;
/// Length of a coarse bucket.
pub const COARSE_MS: u64 = 600_000;
/// The window of the mesh summary (`konorctl node-history` without a node): the last hour,
/// the fine ring.
pub const SUMMARY_WINDOW_MS: u64 = FINE_MS * FINE_BUCKETS as u64;
/// How far back the coarse ring reaches.
const KEPT_MS: u64 = COARSE_MS * COARSE_BUCKETS as u64;
/// Nodes remembered at most (a mesh holds at most `MESH_NODES_MAX`; nodes gone from the view
/// stay a while, so twice that).
pub const HISTORY_NODES_MAX: usize = 2 * crate::limits::MESH_NODES_MAX;

/// Everything kept, in the form that is saved (its own types, not the SDK's: postcard has no
/// field names, so the saved form must change only with [`HISTORY_FORMAT`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthHistory {
    nodes: BTreeMap<String, Track>,
    /// The newest time observed (Unix ms): later observations never go before it.
    latest_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Track {
    labels: BTreeMap<String, String>,
    state: Option<State>,
    /// The last poll that saw it (Unix ms).
    seen_ms: u64,
    transitions: VecDeque<(u64, State)>,
    fine: VecDeque<Sums>,
    coarse: VecDeque<Sums>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    Live,
    Dead,
    Leaving,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Live => "live",
            State::Dead => "dead",
            State::Leaving => "leaving",
        }
    }
}

/// A bucket as kept: what the polls of one stretch saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Sums {
    start_ms: u64,
    polls: u64,
    live: u64,
    age_sum_ms: u64,
    age_max_ms: u64,
}

impl Sums {
    fn empty(start_ms: u64) -> Sums {
        Sums { start_ms, polls: 0, live: 0, age_sum_ms: 0, age_max_ms: 0 }
    }

    fn add(&mut self, other: &Sums) {
        self.polls = self.polls.saturating_add(other.polls);
        self.live = self.live.saturating_add(other.live);
        self.age_sum_ms = self.age_sum_ms.saturating_add(other.age_sum_ms);
        self.age_max_ms = self.age_max_ms.max(other.age_max_ms);
    }

    fn end_ms(&self, width: u64) -> u64 {
        self.start_ms.saturating_add(width)
    }

    fn shown(&self) -> Bucket {
        Bucket {
            start_ms: self.start_ms,
            polls: self.polls,
            live: self.live,
            age_sum_ms: self.age_sum_ms,
            age_max_ms: self.age_max_ms,
        }
    }

    /// Sane as read from a file: aligned to `width`, no more live polls than polls.
    fn sane(&self, width: u64) -> bool {
        self.start_ms.is_multiple_of(width) && self.live <= self.polls && self.age_max_ms <= self.age_sum_ms
    }
}

/// Pushes `sample` into the ring of `width` buckets, at most `keep`: into the newest bucket if
/// it covers `sample.start_ms`, else into a new one (the oldest leaves past `keep`). Answers the
/// bucket that closed, if one did. Samples come in time order ([`HealthHistory::observe`]).
fn push(ring: &mut VecDeque<Sums>, width: u64, keep: usize, sample: &Sums) -> Option<Sums> {
    let start = sample.start_ms - sample.start_ms % width;
    if let Some(newest) = ring.back_mut()
        && newest.start_ms >= start
    {
        newest.add(sample);
        return None;
    }
    let closed = ring.back().copied();
    if ring.len() >= keep {
        ring.pop_front();
    }
    let mut bucket = Sums::empty(start);
    bucket.add(sample);
    ring.push_back(bucket);
    closed
}

impl HealthHistory {
    /// Takes one membership poll at `now_ms` (Unix ms): the mesh without this node.
    pub fn observe(&mut self, now_ms: u64, nodes: &[Observed<'_>]) {
        let now_ms = now_ms.max(self.latest_ms);
        self.latest_ms = now_ms;
        for node in nodes {
            let state = match node.seen {
                Seen::Unknown => continue,
                Seen::Live => State::Live,
                Seen::Dead => State::Dead,
                Seen::Leaving => State::Leaving,
            };
            if !self.nodes.contains_key(node.id) {
                if self.nodes.len() >= HISTORY_NODES_MAX {
                    continue;
                }
                self.nodes.insert(node.id.to_owned(), Track::default());
            }
            let Some(track) = self.nodes.get_mut(node.id) else { continue };
            if &track.labels != node.labels {
                track.labels = node.labels.clone();
            }
            track.seen_ms = now_ms;
            if track.state.is_some_and(|last| last != state) {
                if track.transitions.len() >= TRANSITIONS_MAX {
                    track.transitions.pop_front();
                }
                track.transitions.push_back((now_ms, state));
            }
            track.state = Some(state);
            let age = node.heartbeat_age_ms.unwrap_or(0);
            let sample = Sums {
                start_ms: now_ms,
                polls: 1,
                live: u64::from(state == State::Live),
                age_sum_ms: age,
                age_max_ms: age,
            };
            // A fine bucket that closes goes into the coarse ring whole.
            if let Some(closed) = push(&mut track.fine, FINE_MS, FINE_BUCKETS, &sample) {
                push(&mut track.coarse, COARSE_MS, COARSE_BUCKETS, &closed);
            }
        }
        // Forget nodes not seen for as long as the coarse ring reaches.
        let horizon = now_ms.saturating_sub(KEPT_MS);
        self.nodes.retain(|_, track| track.seen_ms >= horizon);
    }

    /// One node's history, or `None` when it is not known here: its state changes, its minutes
    /// of the last hour, its ten-minute buckets of the last six hours (the minutes not folded yet
    /// included).
    pub fn node(&self, id: &str) -> Option<NodeHistory> {
        let track = self.nodes.get(id)?;
        let now = self.latest_ms;
        let minutes: Vec<Bucket> = track
            .fine
            .iter()
            .filter(|bucket| bucket.end_ms(FINE_MS) > now.saturating_sub(SUMMARY_WINDOW_MS))
            .map(Sums::shown)
            .collect();
        // The coarse ring holds closed minutes; the newest one is still open, and folded here.
        let mut coarse: VecDeque<Sums> = track.coarse.clone();
        if let Some(open) = track.fine.back() {
            push(&mut coarse, COARSE_MS, COARSE_BUCKETS, open);
        }
        let ten_minutes = coarse
            .iter()
            .filter(|bucket| bucket.end_ms(COARSE_MS) > now.saturating_sub(KEPT_MS))
            .map(Sums::shown)
            .collect();
        Some(NodeHistory {
            node: id.to_owned(),
            labels: track.labels.clone(),
            transitions: track
                .transitions
                .iter()
                .map(|(at_ms, state)| Transition { at_ms: *at_ms, state: state.name().to_owned() })
                .collect(),
            minutes,
            ten_minutes,
        })
    }

    /// Each node seen in the last `window_ms`, over that window: the share of polls that saw it
    /// live, its state changes, its mean and largest heartbeat age.
    pub fn summaries(&self, now_ms: u64, window_ms: u64) -> Vec<NodeSummary> {
        let since = now_ms.max(self.latest_ms).saturating_sub(window_ms);
        self.nodes
            .iter()
            .filter_map(|(id, track)| {
                let mut total = Sums::empty(since);
                for bucket in track.fine.iter().filter(|bucket| bucket.end_ms(FINE_MS) > since) {
                    total.add(bucket);
                }
                (total.polls > 0).then(|| NodeSummary {
                    node: id.clone(),
                    labels: track.labels.clone(),
                    state: track.state.map(State::name).unwrap_or_default().to_owned(),
                    live_share: total.live as f64 / total.polls as f64,
                    transitions: track.transitions.iter().filter(|(at_ms, _)| *at_ms >= since).count() as u64,
                    heartbeat_age_mean_ms: total.age_sum_ms / total.polls,
                    heartbeat_age_max_ms: total.age_max_ms,
                })
            })
            .collect()
    }

    /// Peers live minute by minute since `now_ms - window_ms`, oldest first: per minute, the sum
    /// of each peer's share of polls that saw it live.
    pub fn live_by_minute(&self, now_ms: u64, window_ms: u64) -> Vec<MinuteLive> {
        let since = now_ms.max(self.latest_ms).saturating_sub(window_ms);
        let mut minutes: BTreeMap<u64, f64> = BTreeMap::new();
        for track in self.nodes.values() {
            for bucket in track.fine.iter().filter(|bucket| bucket.end_ms(FINE_MS) > since && bucket.polls > 0) {
                *minutes.entry(bucket.start_ms).or_default() += bucket.live as f64 / bucket.polls as f64;
            }
        }
        minutes.into_iter().map(|(start_ms, live)| MinuteLive { start_ms, live }).collect()
    }

    /// Per label (`region=eu-west`), over the nodes the last poll saw: how many are live, dead
    /// and leaving, and the mean heartbeat age of the live ones over the current minute.
    /// (`unknown` counts nodes the last poll could not judge yet.)
    pub fn labels(&self) -> Vec<LabelSummary> {
        // Per label: the summary, and the heartbeat ages (sum, polls) of its live nodes.
        let mut by_label: BTreeMap<String, (LabelSummary, u64, u64)> = BTreeMap::new();
        let minute = self.latest_ms - self.latest_ms % FINE_MS;
        for track in self.nodes.values() {
            let current = track.seen_ms == self.latest_ms;
            for (key, value) in &track.labels {
                let label = format!("{key}={value}");
                let (summary, age_sum, polls) = by_label
                    .entry(label.clone())
                    .or_insert_with(|| (LabelSummary { label, ..Default::default() }, 0, 0));
                match (current, track.state) {
                    (true, Some(State::Live)) => summary.live += 1,
                    (true, Some(State::Dead)) => summary.dead += 1,
                    (true, Some(State::Leaving)) => summary.leaving += 1,
                    // Gone from the view (forgotten by the mesh) or not judged in the last poll.
                    _ => summary.unknown += 1,
                }
                if current
                    && track.state == Some(State::Live)
                    && let Some(newest) =
                        track.fine.back().filter(|bucket| bucket.start_ms == minute && bucket.live > 0)
                {
                    *age_sum = age_sum.saturating_add(newest.age_sum_ms);
                    *polls = polls.saturating_add(newest.polls);
                }
            }
        }
        by_label
            .into_values()
            .map(|(mut summary, age_sum, polls)| {
                summary.heartbeat_age_mean_ms = age_sum.checked_div(polls).unwrap_or(0);
                summary
            })
            .collect()
    }

    /// Nodes remembered.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The bytes to save.
    pub fn snapshot(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(&(HISTORY_FORMAT, self))
    }

    /// Reads saved bytes back; an unknown format, damaged bytes, bytes left over, or contents
    /// this version would never have kept are an error (the caller starts afresh).
    pub fn restore(bytes: &[u8]) -> Result<HealthHistory, HistoryError> {
        let damaged = |why: &str| HistoryError::Damaged(why.to_owned());
        let (format, rest): (u32, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|error| HistoryError::Damaged(error.to_string()))?;
        if format != HISTORY_FORMAT {
            return Err(HistoryError::Format(format));
        }
        let (history, rest): (HealthHistory, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|error| HistoryError::Damaged(error.to_string()))?;
        if !rest.is_empty() {
            return Err(damaged("bytes after the history"));
        }
        if history.nodes.len() > HISTORY_NODES_MAX {
            return Err(damaged("more nodes than this version keeps"));
        }
        for track in history.nodes.values() {
            let ordered =
                |ring: &VecDeque<Sums>| ring.iter().zip(ring.iter().skip(1)).all(|(a, b)| a.start_ms < b.start_ms);
            if track.transitions.len() > TRANSITIONS_MAX
                || track.fine.len() > FINE_BUCKETS
                || track.coarse.len() > COARSE_BUCKETS
            {
                return Err(damaged("more entries than this version keeps"));
            }
            if !ordered(&track.fine)
                || !ordered(&track.coarse)
                || !track.fine.iter().all(|bucket| bucket.sane(FINE_MS))
                || !track.coarse.iter().all(|bucket| bucket.sane(COARSE_MS))
                || track.seen_ms > history.latest_ms
            {
                return Err(damaged("buckets out of order or inconsistent"));
            }
        }
        Ok(history)
    }
}

/// The saved form's version; a file of another is not read.
pub const HISTORY_FORMAT: u32 = 2;

/// Why saved history was not read back.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Not a history of this format.
    #[error("the health history file is damaged: {0}")]
    Damaged(String),
    /// Written by another version.
    #[error("the health history file has format {0}; this konord reads format {HISTORY_FORMAT}")]
    Format(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe(history: &mut HealthHistory, now: u64, seen: &[(&str, Seen, u64)], labels: &BTreeMap<String, String>) {
        let nodes: Vec<Observed<'_>> = seen
            .iter()
            .map(|(id, seen, age)| Observed { id, labels, seen: *seen, heartbeat_age_ms: Some(*age) })
            .collect();
        history.observe(now, &nodes);
    }

    #[test]
    fn polls_fill_minute_buckets_that_fold_into_ten_minute_ones_and_old_ones_leave() {
        let labels = BTreeMap::from([("region".to_owned(), "a".to_owned())]);
        let mut history = HealthHistory::default();
        let start = 1_700_000_000_000 - 1_700_000_000_000 % COARSE_MS;
        // Seven hours of polls every 10 s; n1 dead for the first minute of each hour.
        let mut now = start;
        while now < start + 7 * 3_600_000 {
            let dead = (now - start) % 3_600_000 < FINE_MS;
            let seen = if dead { Seen::Dead } else { Seen::Live };
            observe(&mut history, now, &[("n1", seen, if dead { 9_000 } else { 100 })], &labels);
            now += 10_000;
        }
        let node = history.node("n1").unwrap();
        assert_eq!(node.minutes.len(), FINE_BUCKETS);
        assert_eq!(node.ten_minutes.len(), COARSE_BUCKETS);
        assert!(node.minutes.iter().all(|bucket| bucket.polls == 6), "{:?}", node.minutes);
        // A ten-minute bucket holds ten closed minutes; the one with the outage shows it.
        let full = &node.ten_minutes[0];
        assert_eq!(full.polls, 60);
        let outage = node.ten_minutes.iter().find(|bucket| bucket.live < bucket.polls).unwrap();
        assert_eq!((outage.polls, outage.live, outage.age_max_ms), (60, 54, 9_000));
        // Two changes an hour (the first sighting is a state, not a change).
        assert_eq!(node.transitions.len(), 13);
        assert_eq!(node.transitions.last().unwrap().state, "live");
        let summary = &history.summaries(now, 3_600_000)[0];
        assert!((summary.live_share - 59.0 / 60.0).abs() < 0.01, "{summary:?}");
        assert_eq!(summary.transitions, 2);
        assert_eq!(summary.heartbeat_age_max_ms, 9_000);
        let minutes = history.live_by_minute(now, 3_600_000);
        assert_eq!(minutes.len(), 60);
        assert_eq!((minutes[0].live, minutes[1].live), (0.0, 1.0));
        // A node gone from the view is forgotten once its history is older than six hours.
        observe(&mut history, now + 6 * 3_600_000 + COARSE_MS, &[], &labels);
        assert!(history.is_empty());
    }

    #[test]
    fn unknown_polls_and_a_wall_clock_stepped_back_change_nothing() {
        let labels = BTreeMap::new();
        let mut history = HealthHistory::default();
        let t = 1_700_000_040_000;
        observe(&mut history, t, &[("n1", Seen::Live, 100)], &labels);
        // A restart or a pause: unknown for a moment, then live again. No change, no poll.
        observe(&mut history, t + 1_000, &[("n1", Seen::Unknown, 0)], &labels);
        observe(&mut history, t + 2_000, &[("n1", Seen::Live, 100)], &labels);
        let node = history.node("n1").unwrap();
        assert!(node.transitions.is_empty(), "{node:?}");
        assert_eq!(node.minutes.iter().map(|b| b.polls).sum::<u64>(), 2);
        // The wall clock steps back an hour: polls count at the newest time seen, in order.
        observe(&mut history, t - 3_600_000, &[("n1", Seen::Dead, 5_000)], &labels);
        observe(&mut history, t + 3_000, &[("n1", Seen::Dead, 5_000)], &labels);
        let node = history.node("n1").unwrap();
        assert_eq!(node.minutes.len(), 1, "{node:?}");
        assert_eq!(node.transitions.len(), 1);
        assert_eq!(node.transitions[0].at_ms, t + 2_000);
        assert_eq!(history.live_by_minute(t + 3_000, 3_600_000).len(), 1);
        // A node gone from the view counts as unknown in its labels, not as what it last was.
        let zone = BTreeMap::from([("zone".to_owned(), "a".to_owned())]);
        observe(&mut history, t + 4_000, &[("n2", Seen::Live, 100)], &zone);
        observe(&mut history, t + 5_000, &[("n3", Seen::Live, 100)], &zone);
        let zones: Vec<(u64, u64)> = history.labels().iter().map(|l| (l.live, l.unknown)).collect();
        assert_eq!(zones, [(1, 1)]);
    }

    #[test]
    fn labels_count_nodes_by_state_now() {
        let a = BTreeMap::from([("region".to_owned(), "a".to_owned())]);
        let b = BTreeMap::from([("region".to_owned(), "b".to_owned())]);
        let mut history = HealthHistory::default();
        observe(&mut history, 1_000, &[("n1", Seen::Live, 100), ("n2", Seen::Dead, 5_000)], &a);
        observe(&mut history, 1_000, &[("n3", Seen::Live, 300)], &b);
        let labels = history.labels();
        assert_eq!(labels.len(), 2);
        assert_eq!((labels[0].label.as_str(), labels[0].live, labels[0].dead), ("region=a", 1, 1));
        assert_eq!(labels[0].heartbeat_age_mean_ms, 100);
        assert_eq!((labels[1].live, labels[1].heartbeat_age_mean_ms), (1, 300));
    }

    #[test]
    fn saved_history_reads_back_and_damage_is_refused() {
        let labels = BTreeMap::new();
        let mut history = HealthHistory::default();
        observe(&mut history, 1_000, &[("n1", Seen::Live, 100)], &labels);
        let bytes = history.snapshot().unwrap();
        assert_eq!(HealthHistory::restore(&bytes).unwrap(), history);
        assert!(matches!(HealthHistory::restore(&bytes[..bytes.len() / 2]), Err(HistoryError::Damaged(_))));
        let other = postcard::to_allocvec(&(HISTORY_FORMAT + 1, &history)).unwrap();
        assert!(matches!(HealthHistory::restore(&other), Err(HistoryError::Format(3))));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(HealthHistory::restore(&longer), Err(HistoryError::Damaged(_))));
        assert!(HealthHistory::restore(b"").is_err());
    }
}
