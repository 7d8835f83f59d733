//! Fault injection during the active phase: crashes (with a restart after a short or a long
//! downtime), symmetric and one-way partitions, pauses, and disk faults (a full disk, write
//! errors, a failed fsync, torn writes; see [`crate::disk`]), each arriving as a Poisson process
//! at its configured rate. At most half the mesh (rounded down, minus one) is down or paused at
//! once, so an eventual quorum always stays alive with its disks. A node with a failing disk
//! stays up and counts as up: it refuses what it cannot persist.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use crate::disk::DiskFault;
use crate::node::{Life, crash};
use crate::observe::{Observations, PartitionSpan, watch_crash};
use crate::workload::{GroupKind, Phase, Sim, watch};

/// Shortest and longest partition.
const PARTITION_MS: (u64, u64) = (2_000, 10_000);

/// Shortest and longest pause.
const PAUSE_MS: (u64, u64) = (1_000, 5_000);

/// A short downtime (restart before the failure detector settles) in ms.
const SHORT_DOWNTIME_MS: (u64, u64) = (1_000, 4_000);

/// Shortest and longest disk fault: a few seconds, long enough for writes, compactions and
/// rewrites to run into it, short enough that the node recovers within the run.
const DISK_FAULT_MS: (u64, u64) = (1_000, 5_000);

/// One injected fault, for the report.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// When (µs).
    pub at_us: u64,
    /// What.
    pub text: String,
}

/// Starts the fault loops.
pub fn start(sim: &Sim, observations: &Rc<RefCell<Observations>>, log: &Rc<RefCell<Vec<FaultRecord>>>) {
    let rates = sim.config.faults;
    for (kind, rate) in [
        (Kind::Crash, rates.crash_per_s),
        (Kind::Partition, rates.partition_per_s),
        (Kind::Oneway, rates.oneway_per_s),
        (Kind::Pause, rates.pause_per_s),
        (Kind::Disk, rates.disk_per_s),
    ] {
        if rate > 0.0 {
            tokio::task::spawn_local(fault_loop(sim.clone(), observations.clone(), log.clone(), kind, rate));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Crash,
    Partition,
    Oneway,
    Pause,
    Disk,
}

/// Logs a fault event; `node` is the one node it concerns (none for a partition).
fn record(sim: &Sim, log: &Rc<RefCell<Vec<FaultRecord>>>, node: Option<usize>, text: String) {
    sim.trace(&format!("fault {text}"));
    let now = sim.now_us();
    sim.records.borrow_mut().fault_events.push((now, node));
    log.borrow_mut().push(FaultRecord { at_us: now, text });
}

/// Nodes that may still be taken down: keeps down + paused under half the mesh.
fn may_take_down(sim: &Sim) -> bool {
    let cluster = sim.cluster.borrow();
    let out = cluster.indices(Life::Down).len() + cluster.indices(Life::Paused).len();
    out < sim.config.nodes.saturating_sub(1) / 2
}

fn pick_up(sim: &Sim) -> Option<usize> {
    let up = sim.cluster.borrow().indices(Life::Up);
    if up.is_empty() {
        return None;
    }
    let pick = sim.rng.borrow_mut().index(up.len());
    Some(up[pick])
}

async fn fault_loop(
    sim: Sim,
    observations: Rc<RefCell<Observations>>,
    log: Rc<RefCell<Vec<FaultRecord>>>,
    kind: Kind,
    rate: f64,
) {
    loop {
        let Some(gap_s) = sim.rng.borrow_mut().exponential_s(rate) else { return };
        tokio::time::sleep(Duration::from_secs_f64(gap_s)).await;
        if sim.phase.get() != Phase::Active {
            return;
        }
        match kind {
            Kind::Crash => {
                if !may_take_down(&sim) {
                    continue;
                }
                let Some(target) = pick_up(&sim) else { continue };
                let long = sim.rng.borrow_mut().chance(0.5);
                let downtime_ms = if long {
                    let bound = u64::try_from(sim.config.detect_bound.as_millis()).unwrap_or(u64::MAX);
                    sim.rng.borrow_mut().between(bound + 1_000, bound + 5_000)
                } else {
                    sim.rng.borrow_mut().between(SHORT_DOWNTIME_MS.0, SHORT_DOWNTIME_MS.1)
                };
                record(&sim, &log, Some(target), format!("crash n{target} for {downtime_ms} ms"));
                crash(&sim.cluster, target).await;
                watch_crash(&sim, &observations, target);
                let starts = sim.cluster.borrow().nodes[target].starts;
                let task_sim = sim.clone();
                let task_log = log.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_millis(downtime_ms)).await;
                    let still_down = {
                        let cluster = task_sim.cluster.borrow();
                        let node = &cluster.nodes[target];
                        node.life == Life::Down && node.starts == starts
                    };
                    if still_down && task_sim.phase.get() == Phase::Active {
                        record(&task_sim, &task_log, Some(target), format!("restart n{target}"));
                        restart(&task_sim, target);
                    }
                });
            }
            Kind::Partition | Kind::Oneway => {
                let oneway = matches!(kind, Kind::Oneway);
                let nodes = sim.config.nodes;
                if nodes < 2 {
                    continue;
                }
                let (side, duration_ms) = {
                    let mut rng = sim.rng.borrow_mut();
                    let size = rng.between(1, (nodes / 2).max(1) as u64) as usize;
                    let mut order: Vec<usize> = (0..nodes).collect();
                    for i in 0..size {
                        let j = i + rng.index(nodes - i);
                        order.swap(i, j);
                    }
                    let mut side = vec![false; nodes];
                    for &i in &order[..size] {
                        side[i] = true;
                    }
                    (side, rng.between(PARTITION_MS.0, PARTITION_MS.1))
                };
                let members: Vec<String> =
                    side.iter().enumerate().filter(|(_, s)| **s).map(|(i, _)| format!("n{i}")).take(8).collect();
                let count = side.iter().filter(|s| **s).count();
                let shape = if oneway { "one-way partition (side cannot send)" } else { "partition" };
                record(
                    &sim,
                    &log,
                    None,
                    format!("{shape} of {count} node(s) [{}] for {duration_ms} ms", members.join(" ")),
                );
                let id = sim.cluster.borrow().network.partition(side.clone(), oneway);
                {
                    let mut observations = observations.borrow_mut();
                    observations.partitions_active += 1;
                    let start_us = sim.now_us();
                    observations.partitions.push(PartitionSpan { id, start_us, end_us: None, side });
                }
                let task_sim = sim.clone();
                let task_log = log.clone();
                let task_observations = observations.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_millis(duration_ms)).await;
                    if task_sim.phase.get() == Phase::Active {
                        task_sim.cluster.borrow().network.heal(id);
                        let mut observations = task_observations.borrow_mut();
                        observations.partitions_active = observations.partitions_active.saturating_sub(1);
                        let now = task_sim.now_us();
                        observations.last_partition_end_us = now;
                        if let Some(span) = observations.partitions.iter_mut().find(|p| p.id == id) {
                            span.end_us = Some(now);
                        }
                        drop(observations);
                        record(&task_sim, &task_log, None, format!("heal partition {id}"));
                    }
                });
            }
            Kind::Disk => disk_fault(&sim, &log),
            Kind::Pause => {
                if !may_take_down(&sim) {
                    continue;
                }
                let Some(target) = pick_up(&sim) else { continue };
                let duration_ms = sim.rng.borrow_mut().between(PAUSE_MS.0, PAUSE_MS.1);
                record(&sim, &log, Some(target), format!("pause n{target} for {duration_ms} ms"));
                sim.cluster.borrow_mut().set_paused(target, true);
                let task_sim = sim.clone();
                let task_log = log.clone();
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(Duration::from_millis(duration_ms)).await;
                    let paused = task_sim.cluster.borrow().nodes[target].life == Life::Paused;
                    if paused && task_sim.phase.get() == Phase::Active {
                        task_sim.cluster.borrow_mut().set_paused(target, false);
                        record(&task_sim, &task_log, Some(target), format!("resume n{target}"));
                    }
                });
            }
        }
    }
}

/// Gives an up node's disk one of the [`DiskFault`]s for a few seconds.
fn disk_fault(sim: &Sim, log: &Rc<RefCell<Vec<FaultRecord>>>) {
    let Some(target) = pick_up(sim) else { return };
    let (fault, duration_ms) = {
        let mut rng = sim.rng.borrow_mut();
        let mut fault = DiskFault::ALL[rng.index(DiskFault::ALL.len())];
        let duration_ms = rng.between(DISK_FAULT_MS.0, DISK_FAULT_MS.1);
        if let DiskFault::FsyncError { directory } = &mut fault {
            *directory = rng.chance(0.5);
        }
        (fault, duration_ms)
    };
    record(sim, log, Some(target), format!("disk n{target} {} for {duration_ms} ms", fault.name()));
    let generation = sim.cluster.borrow().disk.start_fault(target, fault);
    let task_sim = sim.clone();
    let task_log = log.clone();
    tokio::task::spawn_local(async move {
        tokio::time::sleep(Duration::from_millis(duration_ms)).await;
        let ended = task_sim.cluster.borrow().disk.end_fault(target, generation);
        if ended && task_sim.phase.get() == Phase::Active {
            record(&task_sim, &task_log, Some(target), format!("disk-heal n{target}"));
        }
    });
}

/// Starts a down node again and resubscribes its watchers (they resume from their revision).
pub fn restart(sim: &Sim, index: usize) {
    sim.cluster.borrow_mut().start(index);
    let groups: Vec<GroupKind> = {
        let records = sim.records.borrow();
        GroupKind::ALL.into_iter().filter(|g| records.members.get(g).is_some_and(|m| m.contains(&index))).collect()
    };
    for group in groups {
        watch(sim, index, group);
    }
}

/// Ends every fault: partitions healed, disks healthy, paused nodes resumed, down nodes
/// restarted.
pub fn heal_everything(sim: &Sim, observations: &Rc<RefCell<Observations>>, log: &Rc<RefCell<Vec<FaultRecord>>>) {
    sim.cluster.borrow().network.heal_all();
    sim.cluster.borrow().disk.end_all_faults();
    {
        let mut observations = observations.borrow_mut();
        observations.partitions_active = 0;
        let now = sim.now_us();
        observations.last_partition_end_us = now;
        for span in observations.partitions.iter_mut().filter(|p| p.end_us.is_none()) {
            span.end_us = Some(now);
        }
    }
    let paused = sim.cluster.borrow().indices(Life::Paused);
    for index in paused {
        sim.cluster.borrow_mut().set_paused(index, false);
    }
    let down = sim.cluster.borrow().indices(Life::Down);
    for index in down {
        record(sim, log, Some(index), format!("restart n{index} (heal)"));
        restart(sim, index);
    }
}
