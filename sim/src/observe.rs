//! Membership as the nodes themselves report it (`Request::Nodes`, what `konorctl nodes` shows):
//! how long the mesh takes to form, how long each observer takes to mark a crashed node dead
//! (SPEC 5, with a bound), and whether a healthy node is ever marked dead (no false positives).
//!
//! Observers are the first nodes up to `--observers` (all of them up to 100 nodes): asking every
//! node of a 1,000-node mesh for its 1,000-row view several times a second would cost more than
//! the mesh itself.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use konor_sdk::protocol::{Request, Response};

use crate::invariant;
use crate::node::{Life, call};
use crate::workload::{Phase, Sim};

/// How often pending detections are polled.
const DETECTION_POLL: Duration = Duration::from_millis(250);

/// How often the false-positive sampler looks.
const SAMPLE_PERIOD: Duration = Duration::from_secs(2);

/// How long after a node (re)started, resumed, or a partition ended, before a "dead" verdict
/// about it counts as false: chitchat needs a few heartbeats to learn a new generation, and
/// the view is refreshed only every membership poll.
const SETTLE: Duration = Duration::from_secs(15);

/// One crash and who noticed it when.
#[derive(Debug, Clone)]
pub struct CrashWatch {
    /// The crashed node.
    pub target: usize,
    /// Its start count when it crashed (a restart ends the watch).
    pub starts: u64,
    /// When it crashed (µs).
    pub crashed_us: u64,
    /// Observers that have not marked it dead yet.
    pub pending: BTreeSet<usize>,
    /// Observers that did, with the delay in µs.
    pub detected: BTreeMap<usize, u64>,
    /// Observers cut off from the crashed node by a partition around the crash (they may take
    /// longer, see [`CUT_LOOKBACK`]): still watched after the bound, but not held to it.
    pub cut_off: BTreeSet<usize>,
    /// True once the watch ended (all detected, restart, or bound passed).
    pub closed: bool,
}

/// A partition, for deciding which observers were cut off from a crashed node.
#[derive(Debug, Clone)]
pub struct PartitionSpan {
    /// Its id in the network.
    pub id: u64,
    /// When it started (µs).
    pub start_us: u64,
    /// When it ended, if it did.
    pub end_us: Option<u64>,
    /// Which side each node was on.
    pub side: Vec<bool>,
}

/// An observer that was cut off from a node within this long before the node crashed may see it
/// live again for a while: when the partition heals, the node's last heartbeat (newer than the
/// observer's) reaches it through others and chitchat's phi detector, whose sample window was
/// reset, takes the whole gap as one heartbeat interval, so the node stays "live" for up to
/// 8 x (gap + 5 x prior) / 6 (about 13 s after a 9 s partition). Longest partition plus margin.
pub const CUT_LOOKBACK: Duration = Duration::from_secs(15);

/// Membership observations of a run.
#[derive(Debug, Default)]
pub struct Observations {
    /// Crashes being watched or done.
    pub crashes: Vec<CrashWatch>,
    /// Per observer, when it first saw every node live (µs).
    pub mesh_formed: BTreeMap<usize, u64>,
    /// Healthy nodes seen dead: (observer, node, µs).
    pub false_dead: Vec<(usize, usize, u64)>,
    /// Views sampled for false positives.
    pub samples: u64,
    /// When the last partition ended (µs), or 0.
    pub last_partition_end_us: u64,
    /// Every partition of the run.
    pub partitions: Vec<PartitionSpan>,
    /// Partitions active now.
    pub partitions_active: usize,
}

/// The observers of a run.
pub fn observers(sim: &Sim) -> Vec<usize> {
    (0..sim.config.observer_count()).collect()
}

fn node_index(id: &str) -> Option<usize> {
    id.strip_prefix('n')?.parse().ok()
}

/// (live ids, dead ids) in node `index`'s view, or `None` when it does not answer.
async fn view(sim: &Sim, index: usize) -> Option<(BTreeSet<usize>, BTreeSet<usize>)> {
    let Some(Response::Nodes { nodes }) = call(&sim.cluster, index, Request::Nodes).await else { return None };
    let mut live = BTreeSet::new();
    let mut dead = BTreeSet::new();
    for row in nodes {
        let Some(node) = node_index(&row.id) else { continue };
        match row.state.as_str() {
            "live" => live.insert(node),
            "dead" => dead.insert(node),
            _ => false,
        };
    }
    Some((live, dead))
}

/// Waits until every observer sees all nodes live, or `bound` passes; records when each did.
pub async fn await_mesh(
    sim: &Sim,
    observations: &std::rc::Rc<std::cell::RefCell<Observations>>,
    bound: Duration,
) -> bool {
    let everyone = sim.config.nodes;
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let waiting: Vec<usize> =
            observers(sim).into_iter().filter(|o| !observations.borrow().mesh_formed.contains_key(o)).collect();
        if waiting.is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        for observer in waiting {
            if let Some((live, _)) = view(sim, observer).await
                && live.len() >= everyone
            {
                let now = sim.now_us();
                observations.borrow_mut().mesh_formed.insert(observer, now);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Starts watching a crash of `target`.
pub fn watch_crash(sim: &Sim, observations: &std::rc::Rc<std::cell::RefCell<Observations>>, target: usize) {
    let (starts, pending) = {
        let cluster = sim.cluster.borrow();
        let pending =
            observers(sim).into_iter().filter(|&o| o != target && cluster.nodes[o].life == Life::Up).collect();
        (cluster.nodes[target].starts, pending)
    };
    observations.borrow_mut().crashes.push(CrashWatch {
        target,
        starts,
        crashed_us: sim.now_us(),
        pending,
        detected: BTreeMap::new(),
        cut_off: BTreeSet::new(),
        closed: false,
    });
}

/// Polls observers about open crash watches until the run ends; a watch still open at the
/// detection bound, with its target still down, is a violation.
pub async fn detections(sim: Sim, observations: std::rc::Rc<std::cell::RefCell<Observations>>) {
    let bound_us = crate::network::micros(sim.config.detect_bound);
    while sim.phase.get() != Phase::Done {
        tokio::time::sleep(DETECTION_POLL).await;
        let open: Vec<usize> =
            observations.borrow().crashes.iter().enumerate().filter(|(_, c)| !c.closed).map(|(i, _)| i).collect();
        if open.is_empty() {
            continue;
        }
        let asked: BTreeSet<usize> =
            open.iter().flat_map(|&i| observations.borrow().crashes[i].pending.clone()).collect();
        let mut views = BTreeMap::new();
        for observer in asked {
            let up = sim.cluster.borrow().nodes[observer].life == Life::Up;
            if up && let Some((_, dead)) = view(&sim, observer).await {
                views.insert(observer, dead);
            }
        }
        let now = sim.now_us();
        let mut late = Vec::new();
        {
            let cluster = sim.cluster.borrow();
            let mut observations = observations.borrow_mut();
            let observations_partitions = observations.partitions.clone();
            for &i in &open {
                let crash = &mut observations.crashes[i];
                let target = &cluster.nodes[crash.target];
                if target.life != Life::Down || target.starts != crash.starts {
                    crash.closed = true;
                    continue;
                }
                let pending: Vec<usize> = crash.pending.iter().copied().collect();
                for observer in pending {
                    if cluster.nodes[observer].life != Life::Up {
                        // A stopped or crashed observer cannot be asked; it does not count.
                        crash.pending.remove(&observer);
                    } else if views.get(&observer).is_some_and(|dead| dead.contains(&crash.target)) {
                        crash.pending.remove(&observer);
                        crash.detected.insert(observer, now - crash.crashed_us);
                    }
                }
                if crash.pending.is_empty() {
                    crash.closed = true;
                } else if now - crash.crashed_us > bound_us {
                    let lookback = crate::network::micros(CUT_LOOKBACK);
                    let since = crash.crashed_us.saturating_sub(lookback);
                    let target = crash.target;
                    let was_cut = |observer: usize| {
                        observations_partitions.iter().any(|p| {
                            p.start_us <= now
                                && p.end_us.is_none_or(|end| end >= since)
                                && p.side.get(observer) != p.side.get(target)
                        })
                    };
                    let (cut, held): (BTreeSet<usize>, BTreeSet<usize>) =
                        crash.pending.iter().copied().partition(|&o| was_cut(o));
                    crash.cut_off.extend(cut.iter().copied());
                    if !held.is_empty() {
                        late.push((crash.target, held.iter().map(|o| format!("n{o}")).collect::<Vec<_>>()));
                    }
                    crash.pending = cut;
                    crash.closed = crash.pending.is_empty();
                }
            }
        }
        for (target, observers) in late {
            sim.violation(
                invariant::DETECTION,
                format!(
                    "n{target} crashed but [{}] still did not mark it dead after {:?}",
                    observers.join(", "),
                    sim.config.detect_bound
                ),
            );
        }
    }
}

/// Samples observers' views during the active phase: a node that is up, settled and reachable
/// but marked dead is a false positive; at loss of 5% or less it is a violation (SPEC 5).
pub async fn false_positives(sim: Sim, observations: std::rc::Rc<std::cell::RefCell<Observations>>) {
    let settle_us = crate::network::micros(SETTLE);
    loop {
        tokio::time::sleep(SAMPLE_PERIOD).await;
        match sim.phase.get() {
            Phase::Active => {}
            Phase::Setup => continue,
            Phase::Healing | Phase::Done => return,
        }
        let now = sim.now_us();
        {
            let observations = observations.borrow();
            if observations.partitions_active > 0 || now < observations.last_partition_end_us + settle_us {
                continue;
            }
        }
        let settled = |index: usize| {
            let cluster = sim.cluster.borrow();
            let node = &cluster.nodes[index];
            node.life == Life::Up
                && now >= node.started_us + settle_us
                && (node.paused_changed_us == 0 || now >= node.paused_changed_us + settle_us)
        };
        for observer in observers(&sim) {
            if !settled(observer) {
                continue;
            }
            let Some((_, dead)) = view(&sim, observer).await else { continue };
            observations.borrow_mut().samples += 1;
            let now = sim.now_us();
            for node in dead {
                if settled(node) {
                    observations.borrow_mut().false_dead.push((observer, node, now));
                    sim.trace(&format!("false dead n{node} at n{observer}"));
                    if sim.config.loss <= 0.05 {
                        sim.violation(
                            invariant::FALSE_DEAD,
                            format!(
                                "n{observer} marks n{node} dead although it is up and reachable (loss {})",
                                sim.config.loss
                            ),
                        );
                    }
                }
            }
        }
    }
}
