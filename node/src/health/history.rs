//! Health history (SPEC F3, issue 15): what this node's failure detector saw of each peer over
//! the last hours, in bounded memory. Pure: the daemon feeds [`HealthHistory::observe`] the same
//! observations as the alert rules, saves [`HealthHistory::snapshot`] to its data dir now and
//! then, and loads it back at start, so a restart keeps the last hours.
//!
//! Per node it keeps
//! * its last [`TRANSITIONS_MAX`] state changes (live, unknown, dead, leaving) with their times;
//! * downsampled rings of what each membership poll saw: one-minute buckets for the last hour
//!   ([`FINE_BUCKETS`]) and ten-minute buckets for the last six hours ([`COARSE_BUCKETS`]); a
//!   bucket holds how many polls saw the node, how many saw it live, and the mean and largest
//!   heartbeat age (the failure detector's input: how long since its heartbeat last advanced).
//!
//! At 800 nodes that is about 2.5 MB. Nodes that leave the mesh view keep their history until
//! their newest bucket is older than the coarse ring.

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
/// Nodes remembered at most (a mesh holds at most `MESH_NODES_MAX`; nodes gone from the view
/// stay a while, so twice that).
pub const HISTORY_NODES_MAX: usize = 2 * crate::limits::MESH_NODES_MAX;

/// Everything kept, in the form that is saved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthHistory {
    nodes: BTreeMap<String, Track>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Track {
    labels: BTreeMap<String, String>,
    state: Option<String>,
    transitions: VecDeque<Transition>,
    fine: VecDeque<Bucket>,
    coarse: VecDeque<Bucket>,
}

fn state_name(seen: Seen) -> &'static str {
    match seen {
        Seen::Live => "live",
        Seen::Unknown => "unknown",
        Seen::Dead => "dead",
        Seen::Leaving => "leaving",
    }
}

fn empty(start_ms: u64) -> Bucket {
    Bucket { start_ms, polls: 0, live: 0, age_sum_ms: 0, age_max_ms: 0 }
}

fn add(into: &mut Bucket, other: &Bucket) {
    into.polls += other.polls;
    into.live += other.live;
    into.age_sum_ms += other.age_sum_ms;
    into.age_max_ms = into.age_max_ms.max(other.age_max_ms);
}

/// Pushes `sample` into the ring of `width` buckets, at most `keep`: into the newest bucket if
/// it covers `sample.start_ms`, else into a new one (the oldest leaves past `keep`). Answers the
/// bucket that closed, if one did.
fn push(ring: &mut VecDeque<Bucket>, width: u64, keep: usize, sample: &Bucket) -> Option<Bucket> {
    let start = sample.start_ms - sample.start_ms % width;
    if let Some(newest) = ring.back_mut()
        && newest.start_ms == start
    {
        add(newest, sample);
        return None;
    }
    let closed = ring.back().cloned();
    let mut bucket = empty(start);
    add(&mut bucket, sample);
    ring.push_back(bucket);
    while ring.len() > keep {
        ring.pop_front();
    }
    closed
}

impl HealthHistory {
    /// Takes one membership poll at `now_ms` (Unix ms): the mesh without this node.
    pub fn observe(&mut self, now_ms: u64, nodes: &[Observed<'_>]) {
        for node in nodes {
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
            let state = state_name(node.seen);
            if track.state.as_deref() != Some(state) {
                track.state = Some(state.to_owned());
                track.transitions.push_back(Transition { at_ms: now_ms, state: state.to_owned() });
                while track.transitions.len() > TRANSITIONS_MAX {
                    track.transitions.pop_front();
                }
            }
            let age = node.heartbeat_age_ms.unwrap_or(0);
            let sample = Bucket {
                start_ms: now_ms,
                polls: 1,
                live: u64::from(node.seen == Seen::Live),
                age_sum_ms: age,
                age_max_ms: age,
            };
            let mut closed = push(&mut track.fine, FINE_MS, FINE_BUCKETS, &sample);
            // A fine bucket that closes goes into the coarse ring whole.
            if let Some(closed) = closed.take() {
                push(&mut track.coarse, COARSE_MS, COARSE_BUCKETS, &closed);
            }
        }
        // Forget nodes with nothing newer than the coarse ring covers.
        let horizon = now_ms.saturating_sub(COARSE_MS * COARSE_BUCKETS as u64);
        self.nodes.retain(|_, track| track.fine.back().is_some_and(|newest| newest.start_ms >= horizon));
    }

    /// One node's whole history, or `None` when it is not known here.
    pub fn node(&self, id: &str) -> Option<NodeHistory> {
        let track = self.nodes.get(id)?;
        // The coarse ring lacks the fine bucket still open; the reader gets both as they are.
        Some(NodeHistory {
            node: id.to_owned(),
            labels: track.labels.clone(),
            transitions: track.transitions.iter().cloned().collect(),
            minutes: track.fine.iter().cloned().collect(),
            ten_minutes: track.coarse.iter().cloned().collect(),
        })
    }

    /// Each node over the last `window_ms`: the share of polls that saw it live, its state
    /// changes, its mean and largest heartbeat age.
    pub fn summaries(&self, now_ms: u64, window_ms: u64) -> Vec<NodeSummary> {
        let since = now_ms.saturating_sub(window_ms);
        self.nodes
            .iter()
            .map(|(id, track)| {
                let mut total = empty(since);
                for bucket in track.fine.iter().filter(|bucket| bucket.start_ms + FINE_MS > since) {
                    add(&mut total, bucket);
                }
                NodeSummary {
                    node: id.clone(),
                    labels: track.labels.clone(),
                    state: track.state.clone().unwrap_or_default(),
                    live_share: if total.polls == 0 { 0.0 } else { total.live as f64 / total.polls as f64 },
                    transitions: track.transitions.iter().filter(|t| t.at_ms >= since).count() as u64,
                    heartbeat_age_mean_ms: total.age_sum_ms.checked_div(total.polls).unwrap_or(0),
                    heartbeat_age_max_ms: total.age_max_ms,
                }
            })
            .collect()
    }

    /// Peers live minute by minute since `now_ms - window_ms`, oldest first: per minute, the sum
    /// of each peer's share of polls that saw it live.
    pub fn live_by_minute(&self, now_ms: u64, window_ms: u64) -> Vec<MinuteLive> {
        let since = now_ms.saturating_sub(window_ms);
        let mut minutes: BTreeMap<u64, f64> = BTreeMap::new();
        for track in self.nodes.values() {
            for bucket in track.fine.iter().filter(|bucket| bucket.start_ms + FINE_MS > since && bucket.polls > 0) {
                *minutes.entry(bucket.start_ms).or_default() += bucket.live as f64 / bucket.polls as f64;
            }
        }
        minutes.into_iter().map(|(start_ms, live)| MinuteLive { start_ms, live }).collect()
    }

    /// Per label (`region=eu-west`): nodes by their state now, and the mean heartbeat age of its
    /// live nodes over the newest fine bucket.
    pub fn labels(&self) -> Vec<LabelSummary> {
        // Per label: the summary, and the heartbeat ages (sum, polls) of its live nodes.
        let mut by_label: BTreeMap<String, (LabelSummary, u64, u64)> = BTreeMap::new();
        for track in self.nodes.values() {
            for (key, value) in &track.labels {
                let label = format!("{key}={value}");
                let (summary, age_sum, polls) = by_label
                    .entry(label.clone())
                    .or_insert_with(|| (LabelSummary { label, ..Default::default() }, 0, 0));
                match track.state.as_deref() {
                    Some("live") => summary.live += 1,
                    Some("dead") => summary.dead += 1,
                    Some("leaving") => summary.leaving += 1,
                    _ => summary.unknown += 1,
                }
                if let Some(newest) = track.fine.back()
                    && newest.live > 0
                {
                    *age_sum += newest.age_sum_ms;
                    *polls += newest.polls;
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

    /// Reads saved bytes back; an unknown format or damaged bytes are an error (the caller
    /// starts afresh).
    pub fn restore(bytes: &[u8]) -> Result<HealthHistory, HistoryError> {
        let (format, history): (u32, HealthHistory) =
            postcard::from_bytes(bytes).map_err(|error| HistoryError::Damaged(error.to_string()))?;
        if format != HISTORY_FORMAT {
            return Err(HistoryError::Format(format));
        }
        if history.nodes.len() > HISTORY_NODES_MAX
            || history.nodes.values().any(|track| {
                track.transitions.len() > TRANSITIONS_MAX
                    || track.fine.len() > FINE_BUCKETS
                    || track.coarse.len() > COARSE_BUCKETS
            })
        {
            return Err(HistoryError::Damaged("more entries than this version keeps".to_owned()));
        }
        Ok(history)
    }
}

/// The saved form's version; a file of another is not read.
pub const HISTORY_FORMAT: u32 = 1;

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
        // Two changes an hour, the last 64 kept.
        assert_eq!(node.transitions.len(), 14);
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
        assert!(matches!(HealthHistory::restore(&other), Err(HistoryError::Format(2))));
        assert!(HealthHistory::restore(b"").is_err());
    }
}
