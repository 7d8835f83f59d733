//! The seeded fault schedule and its execution. Faults run one at a time: a gap, a fault held
//! for a while, its end, a gap, and so on until the fault phase is over. The kinds come in
//! passes, each pass every kind once in a seeded order. The first pass is fitted into the run
//! (shorter gaps and holds) whenever the duration leaves room for every kind's shortest slot
//! (about 50 s), so a 90 s run sees every kind; kills are always held past the detection bound,
//! so every run judges failure detection. Each fault writes a `FaultStart` before it acts and a
//! `FaultEnd` after it healed.
//!
//! Delay, reordering and duplication (this kernel has no netem), a slow disk and clock jumps
//! come from konord's own fault layer (`konor_node::fault_layer`), which every node of a run
//! starts with: the runner writes a node's control file and waits for konord's
//! acknowledgement.

use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::cluster::{Cluster, Tmpfs};
use crate::history::{FaultEnd, FaultStart, NodeExit, Record};
use crate::lab::Lab;
use crate::record::Recorder;

/// The failure detection bound written to the Run record for the membership check: with a
/// 100 ms gossip period konord marks a crashed node dead in 1-3 s (FACTS measured 1.8-2.7 s at
/// 300 ms); 5 s leaves room for a loaded 2-core machine.
pub const DETECTION_BOUND_MS: u64 = 5_000;

/// Shortest pause between two faults, ms.
const GAP_MIN_MS: u64 = 1_000;
/// Longest pause between two faults, ms.
const GAP_MAX_MS: u64 = 3_000;
/// Shortest time a fault is held, ms.
const HOLD_MIN_MS: u64 = 2_000;
/// Longest time a fault is held, ms: below a strong group's default eviction (30 s), so no
/// fault evicts a member.
const HOLD_MAX_MS: u64 = 8_000;

/// Shortest hold of a kill (`kill9`, `power_cut`), ms: past the detection bound, so the
/// membership check judges whether every other node saw the node go.
const KILL_HOLD_MIN_MS: u64 = DETECTION_BOUND_MS + 1_000;

/// The share of the run the first pass is fitted into: the plan does not count what the
/// faults themselves take (restarts, the fault layer's acknowledgements).
const FIRST_PASS_SHARE_PERCENT: u64 = 90;

/// Clock jumps drawn for the `clock_jump` kind (the fault layer's `clock_offset`): an NTP step,
/// a VM resumed hours or days later. All leave every certificate valid: back at most 50 min
/// (the CA backdates certificates by an hour), ahead at most 3 days (a node certificate lasts
/// a year), so the membership check counts them as a healthy network.
const CLOCK_JUMPS: [&str; 7] = ["-50m", "-10m", "-30s", "+30s", "+10m", "+6h", "+3d"];

/// Egress loss percentages drawn: up to 5 counts as a healthy network for the membership check
/// (no false dead), 10 and 20 as a bad one.
const LOSS_PERCENTS: [u32; 5] = [2, 5, 5, 10, 20];

/// Delays drawn for the `delay` kind, ms: from a LAN to a slow WAN link. The checker counts
/// delay (with jitter) up to 250 ms as a healthy network.
const DELAYS_MS: [u32; 4] = [20, 50, 100, 200];

/// fsync delays drawn for the `slow_disk` kind, ms: a busy SSD to a struggling spinning disk.
const FSYNC_DELAYS_MS: [u32; 4] = [20, 100, 300, 1000];

/// One fault, with the nodes it hits (indexes).
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// kill -9, down for the hold, then started again on its data dir.
    Kill9(usize),
    /// SIGSTOP for the hold, then SIGCONT.
    Pause(usize),
    /// Two sides that do not see each other (a majority and a minority).
    Partition(Vec<usize>, Vec<usize>),
    /// One node cut from all others.
    Isolate(usize),
    /// Packets from the first to the second node are dropped; the other way flows.
    OneWay(usize, usize),
    /// Two sides that do not see each other; the third node sees both.
    Bridge(Vec<usize>, Vec<usize>, usize),
    /// A percentage of one node's outgoing packets dropped at random.
    Loss(usize, u32),
    /// The disk node's data dir filled to the last byte, freed at the end.
    DiskFull(usize),
    /// Datagrams leaving these nodes delayed, reordered or duplicated by konord's fault layer;
    /// the kind names the flavour.
    Link(&'static str, Vec<usize>, LinkFaults),
    /// Every fsync (and write) of one node's store slowed by this many ms.
    SlowDisk(usize, u32),
    /// Power cut: these nodes killed at once, their unsynced bytes dropped, restarted at the end.
    PowerCut(Vec<usize>),
    /// These nodes' wall clocks jump by this offset (`-50m`, `+3d`), and back at the end.
    ClockJump(Vec<usize>, &'static str),
}

/// What the fault layer does to a node's outgoing datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFaults {
    /// Fixed delay, ms.
    pub delay_ms: u32,
    /// Random extra delay up to this, ms.
    pub jitter_ms: u32,
    /// Percent held back so that later ones overtake them.
    pub reorder_percent: u32,
    /// Percent sent twice.
    pub duplicate_percent: u32,
}

impl LinkFaults {
    /// The control file's text, also the fault's detail.
    pub fn control_text(&self) -> String {
        format!(
            "delay={}ms jitter={}ms reorder={}% duplicate={}%",
            self.delay_ms, self.jitter_ms, self.reorder_percent, self.duplicate_percent
        )
    }
}

/// The kinds in a pass.
const KINDS: [&str; 14] = [
    "kill9",
    "pause",
    "partition",
    "isolate",
    "oneway",
    "bridge",
    "loss",
    "disk_full",
    "delay",
    "reorder",
    "duplicate",
    "slow_disk",
    "power_cut",
    "clock_jump",
];

/// A fault with its timing.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedFault {
    /// Wait this long after the previous fault ended, ms.
    pub gap_ms: u64,
    /// Hold the fault this long, ms.
    pub hold_ms: u64,
    /// What.
    pub fault: Fault,
}

impl Fault {
    /// The `FaultStart` kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill9(_) => "kill9",
            Fault::Pause(_) => "pause",
            Fault::Partition(..) => "partition",
            Fault::Isolate(_) => "isolate",
            Fault::OneWay(..) => "oneway",
            Fault::Bridge(..) => "bridge",
            Fault::Loss(..) => "loss",
            Fault::DiskFull(_) => "disk_full",
            Fault::Link(kind, ..) => kind,
            Fault::SlowDisk(..) => "slow_disk",
            Fault::PowerCut(_) => "power_cut",
            Fault::ClockJump(..) => "clock_jump",
        }
    }
}

/// The schedule for `seed`: faults whose gaps and holds fill `duration_ms`, on `node_count`
/// nodes, the disk node being `disk_node`. The same seed gives the same schedule.
pub fn plan(seed: u64, duration_ms: u64, node_count: usize, disk_node: usize) -> Vec<PlannedFault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut planned = Vec::new();
    let mut elapsed_ms = 0;
    let mut pass: Vec<&str> = KINDS.to_vec();
    pass.shuffle(&mut rng);
    // The first pass fits in this budget if every kind's shortest slot does.
    let budget_ms = duration_ms * FIRST_PASS_SHARE_PERCENT / 100;
    let mut fitting = pass.iter().map(|kind| shortest_slot_ms(kind)).sum::<u64>() <= budget_ms;
    loop {
        if pass.is_empty() {
            fitting = false;
            pass = KINDS.to_vec();
            pass.shuffle(&mut rng);
        }
        let kind = pass[pass.len() - 1];
        let (hold_min_ms, hold_max_ms) = hold_range(kind);
        let (gap_ms, hold_ms) = if fitting {
            // Every kind still to come keeps its shortest slot; this one takes about its share
            // of the slack left (up to twice it), so the pass ends inside the budget.
            let reserved: u64 = pass[..pass.len() - 1].iter().map(|kind| shortest_slot_ms(kind)).sum();
            let slack = budget_ms.saturating_sub(elapsed_ms + reserved + shortest_slot_ms(kind));
            let share = (2 * slack / pass.len() as u64).min(slack);
            let extra = rng.random_range(0..=share);
            let gap_extra = (extra / 3).min(GAP_MAX_MS - GAP_MIN_MS);
            let hold_extra = (extra - gap_extra).min(hold_max_ms - hold_min_ms);
            (GAP_MIN_MS + gap_extra, hold_min_ms + hold_extra)
        } else {
            (rng.random_range(GAP_MIN_MS..=GAP_MAX_MS), rng.random_range(hold_min_ms..=hold_max_ms))
        };
        if elapsed_ms + gap_ms + hold_ms > duration_ms {
            break;
        }
        elapsed_ms += gap_ms + hold_ms;
        pass.pop();
        let fault = draw(&mut rng, kind, node_count, disk_node);
        planned.push(PlannedFault { gap_ms, hold_ms, fault });
    }
    planned
}

/// How long a fault of `kind` is held, shortest and longest, ms.
fn hold_range(kind: &str) -> (u64, u64) {
    match kind {
        "kill9" | "power_cut" => (KILL_HOLD_MIN_MS, HOLD_MAX_MS.max(KILL_HOLD_MIN_MS)),
        _ => (HOLD_MIN_MS, HOLD_MAX_MS),
    }
}

/// The shortest gap and hold of a fault of `kind`, ms.
fn shortest_slot_ms(kind: &str) -> u64 {
    GAP_MIN_MS + hold_range(kind).0
}

fn draw(rng: &mut StdRng, kind: &str, node_count: usize, disk_node: usize) -> Fault {
    let mut order: Vec<usize> = (0..node_count).collect();
    order.shuffle(rng);
    let one = order[0];
    match kind {
        "pause" => Fault::Pause(one),
        "partition" => {
            // A minority of 1..=floor((n-1)/2) nodes, the rest the majority.
            let minority = rng.random_range(1..=((node_count - 1) / 2).max(1));
            let (small, large) = order.split_at(minority);
            Fault::Partition(large.to_vec(), small.to_vec())
        }
        "isolate" => Fault::Isolate(one),
        "oneway" => Fault::OneWay(order[0], order[1 % node_count]),
        "bridge" => {
            let middle = order[0];
            let rest = &order[1..];
            let half = rest.len().div_ceil(2);
            Fault::Bridge(rest[..half].to_vec(), rest[half..].to_vec(), middle)
        }
        "loss" => Fault::Loss(one, LOSS_PERCENTS[rng.random_range(0..LOSS_PERCENTS.len())]),
        "disk_full" => Fault::DiskFull(disk_node),
        "delay" | "reorder" | "duplicate" => {
            // One node's egress, or every node's (then every link carries the fault both ways).
            let nodes = if rng.random_bool(0.5) { vec![one] } else { (0..node_count).collect() };
            let link = match kind {
                "delay" => {
                    let delay_ms = DELAYS_MS[rng.random_range(0..DELAYS_MS.len())];
                    LinkFaults { delay_ms, jitter_ms: delay_ms / 4, reorder_percent: 0, duplicate_percent: 0 }
                }
                "reorder" => LinkFaults {
                    delay_ms: 5,
                    jitter_ms: 10,
                    reorder_percent: rng.random_range(5..=30),
                    duplicate_percent: 0,
                },
                _ => LinkFaults {
                    delay_ms: 0,
                    jitter_ms: 0,
                    reorder_percent: 0,
                    duplicate_percent: rng.random_range(5..=30),
                },
            };
            Fault::Link(kind_name(kind), nodes, link)
        }
        "slow_disk" => Fault::SlowDisk(one, FSYNC_DELAYS_MS[rng.random_range(0..FSYNC_DELAYS_MS.len())]),
        // One host, or the whole cluster (a data centre losing power): every acknowledged
        // write must be on some node's disk, not only in page caches.
        "power_cut" => Fault::PowerCut(if rng.random_bool(0.5) { vec![one] } else { (0..node_count).collect() }),
        // One node's clock, or every node's (then they jump together and stay in step).
        "clock_jump" => Fault::ClockJump(
            if rng.random_bool(0.5) { vec![one] } else { (0..node_count).collect() },
            CLOCK_JUMPS[rng.random_range(0..CLOCK_JUMPS.len())],
        ),
        _ => Fault::Kill9(one),
    }
}

/// The static name of a link fault kind.
fn kind_name(kind: &str) -> &'static str {
    match kind {
        "delay" => "delay",
        "reorder" => "reorder",
        _ => "duplicate",
    }
}

/// What a fault acts on.
pub struct Targets<'a> {
    /// The processes.
    pub cluster: &'a mut Cluster,
    /// The network.
    pub lab: &'a Lab,
    /// The disk node's tmpfs.
    pub disk: &'a Tmpfs,
    /// The history.
    pub recorder: &'a Recorder,
}

/// Runs the schedule; returns how many faults ran. Stops early if `deadline_ms` (run clock)
/// passes.
pub async fn execute(schedule: &[PlannedFault], targets: Targets<'_>, deadline_ms: u64) -> anyhow::Result<usize> {
    let Targets { cluster, lab, disk, recorder } = targets;
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    let name = |index: &usize| names[*index].clone();
    let mut ran = 0;
    for (id, planned) in schedule.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(planned.gap_ms)).await;
        record_exits(cluster, recorder)?;
        if recorder.now_ms() + planned.hold_ms > deadline_ms {
            break;
        }
        let id = u32::try_from(id).unwrap_or(u32::MAX);
        let (nodes, sides, detail) = describe(&planned.fault, &names);
        let at_ms = recorder.now_ms();
        recorder.write(&Record::FaultStart(FaultStart {
            id,
            at_ms,
            kind: planned.fault.kind().into(),
            nodes,
            sides,
            detail,
        }))?;
        tracing::info!(id, fault = ?planned.fault, hold_ms = planned.hold_ms, "fault starts");
        let mut end_detail = String::new();
        match &planned.fault {
            Fault::Kill9(index) => cluster.kill9(*index),
            Fault::Pause(index) => cluster.pause(*index),
            Fault::Partition(large, small) => lab.partition(&[large.clone(), small.clone()])?,
            Fault::Isolate(index) => {
                let others: Vec<usize> = (0..names.len()).filter(|i| i != index).collect();
                lab.partition(&[vec![*index], others])?;
            }
            Fault::OneWay(from, to) => lab.one_way(*from, *to)?,
            Fault::Bridge(left, right, _) => lab.bridge_partition(left, right)?,
            Fault::Loss(index, percent) => lab.egress_loss(*index, *percent)?,
            Fault::DiskFull(_) => {
                let bytes = disk.fill()?;
                tracing::info!(bytes, "disk filled");
            }
            Fault::Link(_, nodes, link) => {
                for index in nodes {
                    cluster.set_faults(*index, &link.control_text()).await?;
                }
            }
            Fault::SlowDisk(index, ms) => cluster.set_faults(*index, &slow_disk_text(*ms)).await?,
            Fault::ClockJump(nodes, offset) => {
                for index in nodes {
                    cluster.set_faults(*index, &clock_jump_text(offset)).await?;
                }
            }
            Fault::PowerCut(nodes) => {
                let dropped = cluster.power_cut(nodes)?;
                let dropped: Vec<String> =
                    nodes.iter().zip(dropped).map(|(index, bytes)| format!("{} {bytes} B", name(index))).collect();
                end_detail = format!("unsynced bytes dropped: {}", dropped.join(", "));
            }
        }
        tokio::time::sleep(Duration::from_millis(planned.hold_ms)).await;
        record_exits(cluster, recorder)?;
        match &planned.fault {
            Fault::Kill9(index) => cluster.start(*index).with_context(|| format!("restarting {}", name(index)))?,
            Fault::Pause(index) => cluster.resume(*index),
            Fault::DiskFull(_) => disk.free(),
            Fault::Link(_, nodes, _) => {
                for index in nodes {
                    cluster.set_faults(*index, "").await?;
                }
            }
            Fault::SlowDisk(index, _) => cluster.set_faults(*index, "").await?,
            Fault::ClockJump(nodes, _) => {
                for index in nodes {
                    cluster.set_faults(*index, "").await?;
                }
            }
            Fault::PowerCut(nodes) => {
                for index in nodes {
                    cluster.start(*index).with_context(|| format!("restarting {} after its power cut", name(index)))?;
                }
            }
            _ => lab.heal(),
        }
        recorder.write(&Record::FaultEnd(FaultEnd { id, at_ms: recorder.now_ms(), detail: end_detail }))?;
        ran += 1;
    }
    Ok(ran)
}

/// Writes a `NodeExit` for every konord that exited on its own since the last look.
pub fn record_exits(cluster: &mut Cluster, recorder: &Recorder) -> anyhow::Result<()> {
    for (index, status, log_tail) in cluster.exited() {
        let node = cluster.nodes[index].id.clone();
        tracing::warn!(%node, %status, "konord exited on its own");
        recorder.write(&Record::NodeExit(NodeExit { node, at_ms: recorder.now_ms(), status, log_tail }))?;
    }
    Ok(())
}

/// A fault's nodes, sides and detail for its `FaultStart`.
fn describe(fault: &Fault, names: &[String]) -> (Vec<String>, Vec<Vec<String>>, String) {
    let name = |index: &usize| names[*index].clone();
    let names_of = |indexes: &[usize]| indexes.iter().map(name).collect::<Vec<_>>();
    match fault {
        Fault::Kill9(i) => (vec![name(i)], Vec::new(), "kill -9, then a restart on the same data dir".into()),
        Fault::Pause(i) => (vec![name(i)], Vec::new(), "SIGSTOP, then SIGCONT".into()),
        Fault::Partition(large, small) => {
            (names.to_vec(), vec![names_of(large), names_of(small)], "majority | minority".into())
        }
        Fault::Isolate(i) => {
            let others: Vec<String> = names.iter().filter(|n| **n != names[*i]).cloned().collect();
            (names.to_vec(), vec![vec![name(i)], others], format!("{} cut from all others", name(i)))
        }
        Fault::OneWay(from, to) => (
            vec![name(from), name(to)],
            Vec::new(),
            format!("packets {} -> {} dropped; {} -> {} flow", name(from), name(to), name(to), name(from)),
        ),
        Fault::Bridge(left, right, middle) => (
            names.to_vec(),
            vec![names_of(left), names_of(right)],
            format!("{} sees both sides; the sides do not see each other", name(middle)),
        ),
        Fault::Loss(i, percent) => (vec![name(i)], Vec::new(), konor_chaos::history::loss_detail(*percent)),
        Fault::DiskFull(i) => (vec![name(i)], Vec::new(), "data dir tmpfs filled to ENOSPC, then freed".into()),
        Fault::Link(_, nodes, link) => {
            (names_of(nodes), Vec::new(), konor_chaos::history::link_detail(&link.control_text()))
        }
        Fault::SlowDisk(i, ms) => (vec![name(i)], Vec::new(), slow_disk_text(*ms)),
        Fault::PowerCut(nodes) => (
            names_of(nodes),
            Vec::new(),
            "kill -9, bytes not fsynced dropped (from konord's durability ledger), then a restart".into(),
        ),
        Fault::ClockJump(nodes, offset) => {
            (names_of(nodes), Vec::new(), konor_chaos::history::clock_jump_detail(&clock_jump_text(offset)))
        }
    }
}

/// The control text of a clock jump (also the fault's detail, which the membership check reads).
fn clock_jump_text(offset: &str) -> String {
    format!("clock_offset={offset}")
}

/// The control text of a slow disk: every fsync waits `ms`, every write a tenth of it.
fn slow_disk_text(ms: u32) -> String {
    format!("fsync_delay={ms}ms write_delay={}ms", ms / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_schedule() {
        let first = plan(7, 90_000, 5, 4);
        assert_eq!(first, plan(7, 90_000, 5, 4));
        assert_ne!(first, plan(8, 90_000, 5, 4));
    }

    #[test]
    fn every_90_second_run_sees_every_kind_and_holds_kills_past_detection() {
        for nodes in [3, 5, 7] {
            for seed in 0..300 {
                let schedule = plan(seed, 90_000, nodes, nodes - 1);
                for kind in KINDS {
                    assert!(schedule.iter().any(|p| p.fault.kind() == kind), "seed {seed}: {kind} missing");
                }
                let first_pass: u64 = schedule[..KINDS.len()].iter().map(|p| p.gap_ms + p.hold_ms).sum();
                assert!(first_pass <= 81_000, "seed {seed}: the first pass takes {first_pass} ms");
                let total: u64 = schedule.iter().map(|p| p.gap_ms + p.hold_ms).sum();
                assert!(total <= 90_000, "seed {seed}: {total} ms");
                for planned in &schedule {
                    assert!((GAP_MIN_MS..=GAP_MAX_MS).contains(&planned.gap_ms), "{planned:?}");
                    let (shortest, longest) = hold_range(planned.fault.kind());
                    assert!((shortest..=longest).contains(&planned.hold_ms), "{planned:?}");
                }
                let kill = schedule.iter().find(|p| p.fault.kind() == "kill9").unwrap();
                assert!(kill.hold_ms > DETECTION_BOUND_MS, "{kill:?}");
            }
        }
    }

    #[test]
    fn a_run_too_short_for_a_pass_still_draws_full_slots() {
        let schedule = plan(3, 20_000, 5, 4);
        assert!(!schedule.is_empty());
        for planned in &schedule {
            let (shortest, _) = hold_range(planned.fault.kind());
            assert!(planned.hold_ms >= shortest, "{planned:?}");
        }
    }

    #[test]
    fn partitions_keep_a_majority_on_three_nodes() {
        for seed in 0..50 {
            for planned in plan(seed, 60_000, 3, 2) {
                if let Fault::Partition(large, small) = planned.fault {
                    assert!(large.len() > small.len(), "{large:?} {small:?}");
                }
            }
        }
    }
}
