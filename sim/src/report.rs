//! What a run found, and its printed summary: spread of changes (time until 50/99/99.9/100% of
//! members hold each), failure detection times, traffic per node, commit latencies per mode,
//! invariant results, wall time and peak memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::config::{RunConfig, duration_text};
use crate::disk::DiskStats;
use crate::fault::FaultRecord;
use crate::invariant::{self, Violation};
use crate::network::{ChannelStats, NetStats};
use crate::workload::GroupKind;

/// One row of a spread table: (fraction, p50, p99, max, changes that never reached it).
pub type SpreadRow = (f64, Option<u64>, Option<u64>, Option<u64>, usize);

/// Fractions of members reported for the spread of changes.
pub const FRACTIONS: [f64; 4] = [0.5, 0.99, 0.999, 1.0];

/// How one change spread: delays (µs after the write was sent) at which members first served it.
#[derive(Debug, Clone)]
pub struct Spread {
    /// The write's sequence number.
    pub seq: u64,
    /// Its group.
    pub group: GroupKind,
    /// Members of the group at the end.
    pub members: usize,
    /// Sorted delays of the members that served it.
    pub delays_us: Vec<u64>,
}

impl Spread {
    /// Delay until `fraction` of members held the change, if that many ever did.
    pub fn time_to(&self, fraction: f64) -> Option<u64> {
        let needed = ((fraction * self.members as f64).ceil() as usize).clamp(1, self.members.max(1));
        self.delays_us.get(needed - 1).copied()
    }
}

/// Everything a run measured.
#[derive(Debug)]
pub struct RunReport {
    /// The configuration.
    pub config: RunConfig,
    /// Trace hash (16 hex digits).
    pub trace_hash: String,
    /// Trace entries.
    pub trace_entries: u64,
    /// Violations (the run stops at the first).
    pub violations: Vec<Violation>,
    /// Simulated time in all.
    pub simulated_us: u64,
    /// When the active phase started.
    pub active_start_us: u64,
    /// When healing started.
    pub heal_start_us: u64,
    /// Real time the run took.
    pub wall: Duration,
    /// Peak resident memory of the process (VmHWM), KiB.
    pub peak_rss_kib: Option<u64>,
    /// Per observer, when it first saw every node live (µs), sorted.
    pub mesh_formed_us: Vec<u64>,
    /// Observers that never saw the whole mesh live during setup.
    pub mesh_incomplete: usize,
    /// True when every observer saw the whole mesh live during setup.
    pub mesh_complete: bool,
    /// True when both groups were created and joined everywhere.
    pub groups_ready: bool,
    /// The strong group's history at the end: versions, and versions with several parents
    /// (concurrent strong commits merged: each side of a partition committed on its own).
    pub strong_history: (usize, usize),
    /// Observations of strong versions checked against the one committed sequence.
    pub strong_observations: u64,
    /// Time from healing until every member served the same state.
    pub converge_after_heal_us: Option<u64>,
    /// How each measured change spread.
    pub spreads: Vec<Spread>,
    /// Changes whose marker was gone at the end (undone by a later write): not measured.
    pub spreads_undone: usize,
    /// Crash-to-dead delays over every (crash, observer), sorted.
    pub detections_us: Vec<u64>,
    /// Delays of observers that a partition had cut off from the crashed node around the crash
    /// (not held to the bound, see `observe::CUT_LOOKBACK`), sorted.
    pub detections_cut_us: Vec<u64>,
    /// Cut-off observers that never marked the node dead before it restarted or the run ended.
    pub undetected_cut: usize,
    /// Crashes watched.
    pub crashes_watched: usize,
    /// Network counters.
    pub net: NetStats,
    /// (group, outcome) -> writes.
    pub outcomes: BTreeMap<(String, String), u64>,
    /// group -> sorted commit latencies (µs).
    pub commit_latency_us: BTreeMap<String, Vec<u64>>,
    /// Strong reads: fresh, stale, unanswered.
    pub reads: (u64, u64, u64),
    /// Eventual commits checked against the quorum of all members.
    pub quorums_checked: u64,
    /// Strong-group joins, leaves and failed attempts during the run.
    pub churn: (u64, u64, u64),
    /// Group key rotations answered, and not answered or refused.
    pub rotations: (u64, u64),
    /// A few distinct errors of writes that ended `failed`, for a reader to judge.
    pub failure_samples: Vec<String>,
    /// Watch events checked, watchers.
    pub watch: (u64, usize),
    /// The gated group: versions released, watch events checked against them.
    pub releases: (usize, u64),
    /// Protocol checks: acks, votes, acceptances, decisions.
    pub protocol_checks: (u64, u64, u64, u64),
    /// What the simulated disk did (faults injected, crashes applied).
    pub disk: DiskStats,
    /// False dead verdicts, and views sampled.
    pub false_dead: (usize, u64),
    /// Nodes that stopped on their own: (µs, node, why).
    pub node_exits: Vec<(u64, usize, String)>,
    /// Node log warnings and errors: (level, message, count), most frequent first.
    pub log_lines: Vec<(String, String, u64)>,
    /// Injected faults.
    pub faults: Vec<FaultRecord>,
}

/// Seconds, for printing.
pub fn secs(us: u64) -> String {
    let s = us as f64 / 1e6;
    if s < 0.1 { format!("{:.1}ms", s * 1e3) } else { format!("{s:.2}s") }
}

fn sorted_percentiles(values_us: &[u64]) -> String {
    let values: Vec<f64> = values_us.iter().map(|&v| v as f64).collect();
    match (percentile(&values, 50.0), percentile(&values, 99.0), values.last()) {
        (Some(p50), Some(p99), Some(max)) => {
            format!("p50 {} p99 {} max {}", secs(p50 as u64), secs(p99 as u64), secs(*max as u64))
        }
        _ => "none".to_owned(),
    }
}

/// Peak resident memory of this process, from /proc/self/status (VmHWM), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl RunReport {
    /// True when no invariant was violated.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// Per-fraction percentiles of spread time over the measured changes of `group`:
    /// (fraction, p50, p99, max, changes that never reached it).
    pub fn spread_table(&self, group: GroupKind) -> Vec<SpreadRow> {
        let changes: Vec<&Spread> = self.spreads.iter().filter(|s| s.group == group).collect();
        FRACTIONS
            .iter()
            .map(|&fraction| {
                let mut times: Vec<f64> = Vec::new();
                let mut missing = 0;
                for change in &changes {
                    match change.time_to(fraction) {
                        Some(t) => times.push(t as f64),
                        None => missing += 1,
                    }
                }
                times.sort_by(f64::total_cmp);
                let p = |q: f64| percentile(&times, q).map(|v| v as u64);
                (fraction, p(50.0), p(99.0), times.last().map(|v| *v as u64), missing)
            })
            .collect()
    }

    /// Messages and bytes per node per second on a channel, over the whole run.
    fn per_node(&self, stats: &ChannelStats) -> (f64, f64) {
        let seconds = (self.simulated_us as f64 / 1e6).max(1e-9);
        let nodes = self.config.nodes.max(1) as f64;
        (stats.sent as f64 / nodes / seconds, stats.sent_bytes as f64 / nodes / seconds)
    }

    /// The printed summary.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "konor-sim run: {} nodes, seed {}, {} active (+{} setup, +{} healing), loss {}, latency {}..{}, wire {:?}, gossip {}, membership poll {}",
            c.nodes,
            c.seed,
            duration_text(c.duration),
            secs(self.active_start_us),
            secs(if self.heal_start_us == 0 { 0 } else { self.simulated_us.saturating_sub(self.heal_start_us) }),
            c.loss,
            duration_text(c.latency.0),
            duration_text(c.latency.1),
            c.wire,
            duration_text(c.gossip_interval),
            duration_text(c.membership_poll()),
        );
        let _ = writeln!(out, "trace hash: {} ({} entries)", self.trace_hash, self.trace_entries);
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for fault in &self.faults {
            let kind = fault.text.split_whitespace().next().unwrap_or("").to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let _ = writeln!(out, "faults: {}", if kinds.is_empty() { "none".to_owned() } else { kinds.join(", ") });
        let formed =
            if self.mesh_formed_us.is_empty() { "never".to_owned() } else { sorted_percentiles(&self.mesh_formed_us) };
        let _ = writeln!(
            out,
            "mesh formation (every node seen live by each of {} observer(s)): {formed}{}",
            self.mesh_formed_us.len() + self.mesh_incomplete,
            if self.mesh_incomplete > 0 {
                format!(", {} observer(s) never", self.mesh_incomplete)
            } else {
                String::new()
            }
        );
        if !self.groups_ready {
            let _ = writeln!(out, "groups: not every node could create or join the groups in time");
        }
        for group in GroupKind::ALL {
            let measured = self.spreads.iter().filter(|s| s.group == group).count();
            if measured == 0 {
                continue;
            }
            let members = self.spreads.iter().find(|s| s.group == group).map_or(0, |s| s.members);
            let _ = writeln!(
                out,
                "changes spread in {} ({} members, {} changes measured): time from write until a fraction of members served it",
                group.name(),
                members,
                measured
            );
            let _ = writeln!(out, "  {:>7}  {:>9}  {:>9}  {:>9}  never", "members", "p50", "p99", "max");
            for (fraction, p50, p99, max, missing) in self.spread_table(group) {
                let show = |v: Option<u64>| v.map_or("-".to_owned(), secs);
                let _ = writeln!(
                    out,
                    "  {:>6}%  {:>9}  {:>9}  {:>9}  {missing}",
                    fraction * 100.0,
                    show(p50),
                    show(p99),
                    show(max)
                );
            }
        }
        if self.spreads_undone > 0 {
            let _ = writeln!(out, "  ({} changes undone by later writes were not measured)", self.spreads_undone);
        }
        match self.converge_after_heal_us {
            Some(us) => {
                let _ = writeln!(out, "after healing: every member served the same state after {}", secs(us));
            }
            None => {
                let _ = writeln!(out, "after healing: members did not converge");
            }
        }
        let _ = writeln!(
            out,
            "failure detection (crash until marked dead), {} crash(es), {} observation(s): {}",
            self.crashes_watched,
            self.detections_us.len(),
            sorted_percentiles(&self.detections_us)
        );
        if !self.detections_cut_us.is_empty() || self.undetected_cut > 0 {
            let _ = writeln!(
                out,
                "  observers cut off from the crashed node by a partition around the crash (not held to the bound): {} observation(s) {}, {} never marked it dead before it restarted",
                self.detections_cut_us.len(),
                sorted_percentiles(&self.detections_cut_us),
                self.undetected_cut
            );
        }
        let (gossip_msgs, gossip_bytes) = self.per_node(&self.net.gossip);
        let (replica_msgs, replica_bytes) = self.per_node(&self.net.replica);
        let _ = writeln!(
            out,
            "traffic per node per second: gossip {gossip_msgs:.1} msgs {:.1} KB, replica {replica_msgs:.1} msgs {:.1} KB",
            gossip_bytes / 1e3,
            replica_bytes / 1e3
        );
        for (name, stats) in [("gossip", &self.net.gossip), ("replica", &self.net.replica)] {
            let _ = writeln!(
                out,
                "  {name}: {} sent, {} delivered, {} lost, {} duplicated, {} cut by partitions, {} unreachable",
                stats.sent, stats.delivered, stats.lost, stats.duplicated, stats.cut, stats.unreachable
            );
        }
        for group in GroupKind::ALL {
            let counts: Vec<String> = self
                .outcomes
                .iter()
                .filter(|((g, _), _)| g == group.name())
                .map(|((_, outcome), n)| format!("{n} {outcome}"))
                .collect();
            if counts.is_empty() {
                continue;
            }
            let latency =
                self.commit_latency_us.get(group.name()).map_or_else(|| "none".to_owned(), |l| sorted_percentiles(l));
            let _ = writeln!(
                out,
                "writes to {} ({}): {}; commit latency {latency}",
                group.name(),
                group.mode(),
                counts.join(", ")
            );
        }
        let (versions, merges) = self.strong_history;
        if versions > 0 {
            let note = if merges > 0 {
                " (strong commits made concurrently, e.g. on both sides of a partition, then merged)"
            } else {
                ""
            };
            let _ = writeln!(out, "strong history: {versions} versions, {merges} with several parents{note}");
        }
        let _ =
            writeln!(out, "strong reads: {} fresh, {} stale, {} unanswered", self.reads.0, self.reads.1, self.reads.2);
        for sample in &self.failure_samples {
            let _ = writeln!(out, "  a failed write: {sample}");
        }
        if self.churn != (0, 0, 0) {
            let _ = writeln!(
                out,
                "strong membership changes: {} joins, {} leaves, {} attempts failed",
                self.churn.0, self.churn.1, self.churn.2
            );
        }
        if self.rotations != (0, 0) {
            let _ = writeln!(
                out,
                "key rotations: {} rotated, {} not answered or refused",
                self.rotations.0, self.rotations.1
            );
        }
        let d = &self.disk;
        if d.writes_failed + d.writes_torn + d.fsyncs_failed + d.crash_bytes_dropped + d.crash_renames_undone > 0 {
            let _ = writeln!(
                out,
                "disk: {} writes failed, {} torn, {} fsyncs failed; {} crash(es) dropped {} unsynced bytes ({} tails left torn, {} renames undone)",
                d.writes_failed,
                d.writes_torn,
                d.fsyncs_failed,
                d.crashes,
                d.crash_bytes_dropped,
                d.crash_torn_tails,
                d.crash_renames_undone
            );
        }
        let _ = writeln!(out, "invariants:");
        for (name, note) in self.invariant_lines() {
            let _ = writeln!(out, "  {name:<44} {note}");
        }
        if !self.node_exits.is_empty() {
            let _ = writeln!(out, "nodes that stopped on their own: {}", self.node_exits.len());
            for (at, node, why) in self.node_exits.iter().take(5) {
                let _ = writeln!(out, "  n{node} at {}: {why}", secs(*at));
            }
        }
        if !self.log_lines.is_empty() {
            let _ = writeln!(out, "node log (warnings and errors, by message):");
            for (level, message, count) in self.log_lines.iter().take(8) {
                let _ = writeln!(out, "  {count:>8} {level:<5} {message}");
            }
        }
        let rss = self.peak_rss_kib.map_or_else(|| "unknown".to_owned(), |k| format!("{:.0} MiB", k as f64 / 1024.0));
        let _ = writeln!(
            out,
            "wall time {:.1}s for {} simulated ({:.2}x real time), peak RSS {rss}",
            self.wall.as_secs_f64(),
            secs(self.simulated_us),
            self.simulated_us as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
        );
        for violation in &self.violations {
            let _ = writeln!(
                out,
                "VIOLATION of {} at {} simulated (seed {}): {}",
                violation.invariant,
                secs(violation.at_us),
                c.seed,
                violation.detail
            );
        }
        if !self.violations.is_empty() {
            let _ = writeln!(out, "replay: {}", c.replay_command());
        }
        out
    }

    /// One line per invariant: its name and what was checked or found.
    pub fn invariant_lines(&self) -> Vec<(&'static str, String)> {
        let failed = |name: &str| self.violations.iter().find(|v| v.invariant == name).map(|v| v.detail.clone());
        let verdict = |name: &'static str, ok: String| -> (&'static str, String) {
            match failed(name) {
                Some(detail) => (name, format!("VIOLATED: {detail}")),
                None => (name, ok),
            }
        };
        let (acks, votes, accepts, decisions) = self.protocol_checks;
        let commits: u64 = self.outcomes.iter().filter(|((_, o), _)| o == "committed").map(|(_, n)| n).sum();
        let disk = if self.config.check_disk { "" } else { " (disk checks off: --check-disk false)" };
        vec![
            verdict(
                invariant::CONVERGENCE,
                match self.converge_after_heal_us {
                    Some(us) => format!("ok: identical state {} after healing, same heads", secs(us)),
                    None => "not reached (run stopped earlier)".to_owned(),
                },
            ),
            verdict(
                invariant::CONFIGURATION,
                "ok: every holder of the strong group is in its configuration after healing".to_owned(),
            ),
            verdict(invariant::NO_LOST_COMMIT, format!("ok: {commits} committed writes in every member's history")),
            verdict(
                invariant::QUORUM,
                format!(
                    "ok: {} eventual commits made with every member up were acked by a quorum of all",
                    self.quorums_checked
                ),
            ),
            verdict(invariant::DURABLE_ACK, format!("ok: {acks} acks durable on the acker{disk}")),
            verdict(invariant::STRONG_ATOMICITY, "ok: no watcher served a strong write whose round aborted".to_owned()),
            verdict(
                invariant::ALL_ACK,
                format!("ok: {votes} yes votes staged durably, {decisions} commits after every vote{disk}"),
            ),
            verdict(invariant::DURABLE_ACCEPT, format!("ok: {accepts} acceptances durable on the acceptor{disk}")),
            verdict(invariant::ONE_ROUND_ONE_CHANGE, "ok: no round id prepared with two changes".to_owned()),
            verdict(
                invariant::ONE_SEQUENCE,
                format!(
                    "ok: {} observations of strong versions agree, one at each position; every member's history is one chain",
                    self.strong_observations
                ),
            ),
            verdict(
                invariant::FENCING,
                format!("ok: {} fresh reads never older than a commit reported before them", self.reads.0),
            ),
            verdict(
                invariant::WATCH,
                format!(
                    "ok: {} events to {} watchers, revisions increasing, settings rebuilt exactly",
                    self.watch.0, self.watch.1
                ),
            ),
            verdict(
                invariant::RELEASE,
                format!(
                    "ok: {} version(s) released; {} gt watch events and every member's final gt named a released version, served with its settings",
                    self.releases.0, self.releases.1
                ),
            ),
            verdict(
                invariant::DETECTION,
                format!(
                    "ok: {} crash observation(s) within {}",
                    self.detections_us.len(),
                    duration_text(self.config.detect_bound)
                ),
            ),
            verdict(
                invariant::FALSE_DEAD,
                format!(
                    "ok: {} false dead in {} sampled views (checked at loss <= 5%)",
                    self.false_dead.0, self.false_dead.1
                ),
            ),
            ("6 integrity", "not exercised: no corruption or foreign peers injected".to_owned()),
        ]
    }

    /// One line for sweeps.
    pub fn one_line(&self) -> String {
        let status = match self.violations.first() {
            Some(v) => format!("FAIL {} at {}: {}", v.invariant, secs(v.at_us), v.detail),
            None => "ok".to_owned(),
        };
        format!(
            "seed {:>6}  hash {}  {:>6.1}s wall  {}",
            self.config.seed,
            self.trace_hash,
            self.wall.as_secs_f64(),
            status
        )
    }
}

/// Percentile of sorted values (nearest rank); `None` for no values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 99.9), Some(3.0));
    }

    #[test]
    fn spread_fractions_round_up_to_whole_members() {
        let spread = Spread { seq: 0, group: GroupKind::Eventual, members: 10, delays_us: (1..=9).collect() };
        assert_eq!(spread.time_to(0.5), Some(5));
        assert_eq!(spread.time_to(0.99), None, "the tenth member never served it");
        assert_eq!(spread.time_to(0.9), Some(9));
    }
}
