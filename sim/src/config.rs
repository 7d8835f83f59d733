//! What one run simulates: mesh size, seed, network model, faults and workload, with the parsers
//! for the command-line forms (`60s`, `1ms..20ms`, `crash:0.01/s,partition:0.005/s`,
//! `writes:5/s`) and the exact command line that replays a run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

/// How the simulated network treats the replica channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Every frame on either channel is an independent datagram: lost, duplicated and reordered
    /// by latency jitter. Harsher than production, which is the point of a simulator.
    Datagram,
    /// Models QUIC streams: gossip frames as datagrams, replica frames in order per link, never
    /// duplicated, a lost frame costing a retransmission delay instead of vanishing.
    Stream,
}

impl Wire {
    fn name(self) -> &'static str {
        match self {
            Wire::Datagram => "datagram",
            Wire::Stream => "stream",
        }
    }
}

impl std::str::FromStr for Wire {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Wire> {
        match text {
            "datagram" => Ok(Wire::Datagram),
            "stream" => Ok(Wire::Stream),
            _ => bail!("unknown wire model {text:?}: use datagram or stream"),
        }
    }
}

/// Rates of injected faults, per second of simulated time across the whole mesh.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FaultRates {
    /// A running node is killed (its task aborted, its files kept) and restarted later.
    pub crash_per_s: f64,
    /// The mesh splits in two sides that cannot reach each other.
    pub partition_per_s: f64,
    /// One side cannot send to the other (the other direction works).
    pub oneway_per_s: f64,
    /// A node stops (SIGSTOP-like) for a while, then resumes.
    pub pause_per_s: f64,
    /// A running node's disk fails for a while: full, write errors, one failed fsync, or torn
    /// writes ([`crate::disk::DiskFault`]).
    pub disk_per_s: f64,
}

impl FaultRates {
    /// True when no fault is injected.
    pub fn is_none(&self) -> bool {
        self.crash_per_s <= 0.0
            && self.partition_per_s <= 0.0
            && self.oneway_per_s <= 0.0
            && self.pause_per_s <= 0.0
            && self.disk_per_s <= 0.0
    }

    fn text(&self) -> String {
        let mut parts = Vec::new();
        for (name, rate) in [
            ("crash", self.crash_per_s),
            ("partition", self.partition_per_s),
            ("oneway", self.oneway_per_s),
            ("pause", self.pause_per_s),
            ("disk", self.disk_per_s),
        ] {
            if rate > 0.0 {
                parts.push(format!("{name}:{rate}/s"));
            }
        }
        if parts.is_empty() { "none".to_owned() } else { parts.join(",") }
    }
}

/// Rates of the client workload, per second of simulated time across the whole mesh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadRates {
    /// Writes (set, delete, apply, rollback) to either group from random members.
    pub writes_per_s: f64,
    /// Snapshot reads of the strong group from random members (fencing checks).
    pub reads_per_s: f64,
    /// Membership changes of the strong group during the writes: a random node that holds the
    /// group leaves it, or one that does not joins it.
    pub churn_per_s: f64,
    /// Group key rotations (`group rotate-key`) on a random member of a random group: every
    /// member must move to the new key while writes and faults run, or the groups do not
    /// converge.
    pub rotations_per_s: f64,
}

impl Default for WorkloadRates {
    fn default() -> WorkloadRates {
        WorkloadRates { writes_per_s: 5.0, reads_per_s: 2.0, churn_per_s: 0.0, rotations_per_s: 0.0 }
    }
}

/// Everything that determines a run. Two runs with equal configs produce equal traces.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Number of nodes.
    pub nodes: usize,
    /// The one seed behind every random choice.
    pub seed: u64,
    /// Length of the phase with workload and faults (bootstrap and healing come on top).
    pub duration: Duration,
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Probability that a frame is delivered twice (datagram wire only).
    pub duplicate: f64,
    /// One-way latency range; each frame draws uniformly from it.
    pub latency: (Duration, Duration),
    /// Network model of the replica channel.
    pub wire: Wire,
    /// Fault rates.
    pub faults: FaultRates,
    /// Workload rates.
    pub workload: WorkloadRates,
    /// chitchat's gossip period.
    pub gossip_interval: Duration,
    /// How often each node reads its membership view; `None` picks one by mesh size.
    pub membership_poll: Option<Duration>,
    /// Members of the strong group (the first nodes); eventual group members are all nodes.
    pub strong_members: usize,
    /// Nodes asked for their membership view when checking detection; `None`: all up to 100.
    pub observers: Option<usize>,
    /// Check against the disk model that acks, votes and acceptances follow durability (E1,
    /// S1, S2). On by default at any size; off skips parsing group files too.
    pub check_disk: bool,
    /// Longest time after healing for every member to reach the same state (invariant 1).
    pub converge_bound: Duration,
    /// Longest time for every observer to mark a crashed node dead (invariant 5).
    pub detect_bound: Duration,
    /// Where to draw the convergence/detection chart.
    pub plot: Option<PathBuf>,
    /// Where to write the ordered trace, one event per line (for diffing two runs).
    pub trace: Option<PathBuf>,
    /// Print progress lines while running.
    pub progress: bool,
    /// Nodes carry the label `region=rK` with K = index mod this (0: no region label); the
    /// anomaly rules judge labels ([`crate::alerts`]).
    pub regions: usize,
}

impl RunConfig {
    /// The defaults of `konor-sim run` for `nodes` nodes and `seed`.
    pub fn new(nodes: usize, seed: u64) -> RunConfig {
        RunConfig {
            nodes,
            seed,
            duration: Duration::from_secs(60),
            loss: 0.01,
            duplicate: 0.0,
            latency: (Duration::from_millis(1), Duration::from_millis(20)),
            wire: Wire::Datagram,
            faults: FaultRates { crash_per_s: 0.01, partition_per_s: 0.005, ..FaultRates::default() },
            workload: WorkloadRates::default(),
            gossip_interval: Duration::from_millis(250),
            membership_poll: None,
            strong_members: 5,
            observers: None,
            check_disk: true,
            converge_bound: Duration::from_secs(60),
            detect_bound: Duration::from_secs(15),
            plot: None,
            trace: None,
            progress: false,
            regions: 0,
        }
    }

    /// The membership poll period in use: production's 100 ms up to 50 nodes, 500 ms up to 300,
    /// then 1 s. Each refresh rebuilds the node's whole view (O(nodes) allocations and parses), so
    /// the mesh pays O(nodes²) per period; at 1,000 nodes that cost dominates the simulation.
    pub fn membership_poll(&self) -> Duration {
        self.membership_poll.unwrap_or(Duration::from_millis(match self.nodes {
            0..=50 => 100,
            51..=300 => 500,
            _ => 1000,
        }))
    }

    /// Nodes whose views are polled for detection checks.
    pub fn observer_count(&self) -> usize {
        self.observers.unwrap_or(100).clamp(1, self.nodes.max(1))
    }

    /// Members of the strong group.
    pub fn strong_member_count(&self) -> usize {
        self.strong_members.clamp(1, self.nodes.max(1))
    }

    /// Refuses configurations the simulator cannot run meaningfully.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if self.nodes > 60_000 {
            bail!("--nodes {} is more than the simulated address plan holds (60,000)", self.nodes);
        }
        for (name, p) in [("--loss", self.loss), ("--duplicate", self.duplicate)] {
            if !(0.0..1.0).contains(&p) {
                bail!("{name} {p} must be in [0, 1)");
            }
        }
        if self.latency.0 > self.latency.1 {
            bail!("--latency: the low end is above the high end");
        }
        if self.gossip_interval.is_zero() {
            bail!("--gossip-interval must be positive");
        }
        Ok(())
    }

    /// The command line that replays this run exactly.
    pub fn replay_command(&self) -> String {
        let mut command = format!(
            "konor-sim run --nodes {} --seed {} --duration {} --loss {} --latency {}..{} --faults {} --workload writes:{}/s,reads:{}/s,churn:{}/s --wire {} --gossip-interval {} --strong-members {}",
            self.nodes,
            self.seed,
            duration_text(self.duration),
            self.loss,
            duration_text(self.latency.0),
            duration_text(self.latency.1),
            self.faults.text(),
            self.workload.writes_per_s,
            self.workload.reads_per_s,
            self.workload.churn_per_s,
            self.wire.name(),
            duration_text(self.gossip_interval),
            self.strong_members,
        );
        if self.workload.rotations_per_s > 0.0 {
            // Appended to the workload list (left out at 0, so older replay lines stay as they were).
            if let Some(at) = command.find(" --wire") {
                command.insert_str(at, &format!(",rotate:{}/s", self.workload.rotations_per_s));
            }
        }
        if self.duplicate > 0.0 {
            command.push_str(&format!(" --duplicate {}", self.duplicate));
        }
        if let Some(poll) = self.membership_poll {
            command.push_str(&format!(" --membership-poll {}", duration_text(poll)));
        }
        if let Some(observers) = self.observers {
            command.push_str(&format!(" --observers {observers}"));
        }
        if !self.check_disk {
            command.push_str(" --check-disk false");
        }
        if self.converge_bound != RunConfig::new(1, 0).converge_bound {
            command.push_str(&format!(" --converge-bound {}", duration_text(self.converge_bound)));
        }
        if self.detect_bound != RunConfig::new(1, 0).detect_bound {
            command.push_str(&format!(" --detect-bound {}", duration_text(self.detect_bound)));
        }
        command
    }
}

/// `1500ms`, `2s`, `1m`: the shortest exact form.
pub fn duration_text(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(60_000) && millis > 0 {
        format!("{}m", millis / 60_000)
    } else if millis.is_multiple_of(1000) && millis > 0 {
        format!("{}s", millis / 1000)
    } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{millis}ms")
    } else {
        format!("{}us", duration.as_micros())
    }
}

/// Parses `250ms`, `60s`, `2m`, `500us` (a bare number is seconds).
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number.trim().parse().with_context(|| format!("{text:?} is not a duration (try 250ms or 60s)"))?;
    if !value.is_finite() || value < 0.0 {
        bail!("{text:?} is not a duration (try 250ms or 60s)");
    }
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("unknown unit {unit:?} in {text:?}: use us, ms, s, m or h"),
    };
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses `1ms..20ms` (or a single latency `5ms`).
pub fn parse_latency(text: &str) -> anyhow::Result<(Duration, Duration)> {
    match text.split_once("..") {
        Some((low, high)) => Ok((parse_duration(low)?, parse_duration(high)?)),
        None => {
            let fixed = parse_duration(text)?;
            Ok((fixed, fixed))
        }
    }
}

/// Parses `name:rate/s` pairs separated by commas; `none` or an empty text is no pair.
fn parse_rates(text: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let mut rates = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "none") {
        let (name, rate) = part.split_once(':').with_context(|| format!("{part:?} should look like crash:0.01/s"))?;
        let rate = rate.trim().trim_end_matches("/s");
        let rate: f64 = rate.parse().with_context(|| format!("{part:?}: {rate:?} is not a rate"))?;
        if !rate.is_finite() || rate < 0.0 {
            bail!("{part:?}: a rate must be zero or positive");
        }
        rates.push((name.trim().to_owned(), rate));
    }
    Ok(rates)
}

/// Parses `crash:0.01/s,partition:0.005/s,oneway:0.002/s,pause:0.01/s,disk:0.01/s`.
pub fn parse_faults(text: &str) -> anyhow::Result<FaultRates> {
    let mut faults = FaultRates::default();
    for (name, rate) in parse_rates(text)? {
        match name.as_str() {
            "crash" => faults.crash_per_s = rate,
            "partition" => faults.partition_per_s = rate,
            "oneway" => faults.oneway_per_s = rate,
            "pause" => faults.pause_per_s = rate,
            "disk" => faults.disk_per_s = rate,
            _ => bail!("unknown fault {name:?}: use crash, partition, oneway, pause or disk"),
        }
    }
    Ok(faults)
}

/// Parses `writes:5/s,reads:2/s` (reads default to 2/s when only writes are given).
pub fn parse_workload(text: &str) -> anyhow::Result<WorkloadRates> {
    let mut workload = WorkloadRates::default();
    for (name, rate) in parse_rates(text)? {
        match name.as_str() {
            "writes" => workload.writes_per_s = rate,
            "reads" => workload.reads_per_s = rate,
            "churn" => workload.churn_per_s = rate,
            "rotate" => workload.rotations_per_s = rate,
            _ => bail!("unknown workload {name:?}: use writes, reads, churn or rotate"),
        }
    }
    if text.trim() == "none" {
        workload = WorkloadRates { writes_per_s: 0.0, reads_per_s: 0.0, churn_per_s: 0.0, rotations_per_s: 0.0 };
    }
    Ok(workload)
}

/// Parses a seed range `A..B` (inclusive of A, exclusive of B) or a single seed.
pub fn parse_seeds(text: &str) -> anyhow::Result<std::ops::Range<u64>> {
    match text.split_once("..") {
        Some((low, high)) => {
            let low: u64 = low.trim().parse().with_context(|| format!("{low:?} is not a seed"))?;
            let high: u64 = high.trim().parse().with_context(|| format!("{high:?} is not a seed"))?;
            if high <= low {
                bail!("seed range {text:?} is empty");
            }
            Ok(low..high)
        }
        None => {
            let seed: u64 = text.trim().parse().with_context(|| format!("{text:?} is not a seed"))?;
            Ok(seed..seed + 1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit_and_print_back() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("fast").is_err());
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_text(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn the_issue_example_parses() {
        assert_eq!(parse_latency("1ms..20ms").unwrap(), (Duration::from_millis(1), Duration::from_millis(20)));
        let faults = parse_faults("crash:0.01/s,partition:0.005/s").unwrap();
        assert_eq!(faults.crash_per_s, 0.01);
        assert_eq!(faults.partition_per_s, 0.005);
        assert_eq!(parse_workload("writes:5/s").unwrap().writes_per_s, 5.0);
        assert!(parse_faults("meteor:1/s").is_err());
        assert_eq!(parse_seeds("3..6").unwrap(), 3..6);
    }

    #[test]
    fn the_replay_command_parses_back_to_the_same_settings() {
        let mut config = RunConfig::new(7, 99);
        config.faults.pause_per_s = 0.02;
        config.faults.disk_per_s = 0.05;
        let command = config.replay_command();
        assert!(command.contains("--nodes 7 --seed 99"), "{command}");
        assert!(command.contains("pause:0.02/s,disk:0.05/s"), "{command}");
        assert_eq!(parse_faults("pause:0.02/s,disk:0.05/s").unwrap().disk_per_s, 0.05);
        assert!(!command.contains("--check-disk"), "on by default: {command}");
        config.check_disk = false;
        assert!(config.replay_command().ends_with(" --check-disk false"));
    }
}
