//! One run, from seed to report: a fresh thread seeded for the randomness hook, a single-threaded
//! tokio runtime with a paused clock, every node spawned on it, then the phases: setup (mesh,
//! groups, watchers), active (workload and faults, checks running), healing (faults end, writes
//! stop, convergence awaited) and the final checks.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Notify;

use crate::check::{self, Served};
use crate::config::RunConfig;
use crate::fault::{self, FaultRecord};
use crate::invariant;
use crate::node::Cluster;
use crate::observe::{self, Observations};
use crate::report::{RunReport, Spread};
use crate::rng::SimRng;
use crate::trace::Trace;
use crate::workload::{self, GroupKind, Outcome, Phase, Records, Sim};

/// Longest wait for the mesh to form at the start: a few seconds per hundred nodes (FACTS: 8.5 s
/// at 1,000 nodes in a prototype), with room to spare.
fn mesh_bound(nodes: usize) -> Duration {
    Duration::from_secs(30 + (nodes as u64) / 20)
}

/// Longest wait for every node to join both groups.
fn join_bound(nodes: usize) -> Duration {
    Duration::from_secs(60 + (nodes as u64) / 10)
}

/// After healing, how long writes still in flight may take to settle (the commit timeout of
/// eventual writes and the round and decision timeouts of strong ones are a few seconds).
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(7);

/// Real time without any progress (neither simulated time nor a delivered frame) after which a
/// run is declared stalled: some task keeps running without ever waiting, so the paused clock
/// cannot advance (a busy loop).
const STALL_WALL: Duration = Duration::from_secs(120);

/// How often the simulation reports progress to the stall watchdog (simulated time).
const HEARTBEAT: Duration = Duration::from_millis(100);

/// Shared with the watchdog thread.
#[derive(Debug, Default)]
struct Liveness {
    /// Simulated µs last reported by the heartbeat task.
    heartbeat_us: AtomicU64,
    /// Frames the network delivered: a large mesh may take minutes of real time per simulated
    /// heartbeat, but while frames flow it is working, not stuck.
    delivered: std::sync::Mutex<Option<Arc<AtomicU64>>>,
    /// Set when the run ends, so the watchdog stops.
    finished: AtomicBool,
    /// Wakes the simulation when the watchdog declares a stall.
    stalled: Notify,
}

/// Node starts are spread over this long at the beginning of a run.
const STARTUP_SPREAD: Duration = Duration::from_secs(1);

/// How often the main loop looks for violations and nodes that stopped.
const MAIN_TICK: Duration = Duration::from_millis(100);

/// A supervisor restarts a node that stopped on its own after this long.
const SUPERVISOR_DELAY: Duration = Duration::from_secs(1);

/// Stack of the simulation thread: deep futures of a debug build need more than the default.
pub(crate) const SIM_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Distinguishes data dirs of runs in one process (tests and sweeps run several at once).
static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The data dirs of a run, removed when dropped.
pub(crate) struct DataDirs {
    pub(crate) base: PathBuf,
}

impl DataDirs {
    /// `/dev/shm/konor-sim-<pid>-<n>` when tmpfs is there (fsync costs nothing), else the temp dir.
    pub(crate) fn create(seed: u64) -> anyhow::Result<DataDirs> {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let run = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = parent.join(format!("konor-sim-{}-{run}-s{seed}", std::process::id()));
        std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
        Ok(DataDirs { base })
    }
}

impl Drop for DataDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Runs one simulation and returns its report. `log` prints node logs at that filter.
///
/// Replays are exact for the first simulation of a process only: tokio seeds every runtime it
/// builds from a process-wide counter (besides the hooked entropy), so a second runtime in the
/// same process draws other `select!` orders. `konor-sim sweep` and the tests therefore run each
/// simulation in a process of its own.
pub fn run(config: RunConfig, log: Option<String>) -> anyhow::Result<RunReport> {
    config.validate()?;
    let wall = std::time::Instant::now();
    let seed = config.seed;
    let liveness = Arc::new(Liveness::default());
    let watchdog = {
        let liveness = liveness.clone();
        std::thread::Builder::new()
            .name(format!("konor-sim-watchdog-{seed}"))
            .spawn(move || watch_for_stalls(&liveness))
            .context("cannot start the watchdog thread")?
    };
    let sim_liveness = liveness.clone();
    let thread = std::thread::Builder::new()
        .name(format!("konor-sim-{seed}"))
        .stack_size(SIM_STACK_BYTES)
        .spawn(move || -> anyhow::Result<RunReport> {
            // First thing on this thread: every later draw of randomness comes from the seed.
            crate::entropy::seed_this_thread(seed);
            let (log_counts, _log_guard) = crate::log::install(log.as_deref());
            let mut report = on_simulated_clock(simulate(config, sim_liveness))?;
            report.log_lines = crate::log::sorted(&log_counts);
            Ok(report)
        })
        .context("cannot start the simulation thread")?;
    let result = thread.join();
    liveness.finished.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    let mut report = result.map_err(|_| anyhow::anyhow!("the simulation thread panicked"))??;
    report.wall = wall.elapsed();
    report.peak_rss_kib = crate::report::peak_rss_kib();
    Ok(report)
}

/// Runs `future` to its end on a fresh single-threaded runtime whose clock is paused (time
/// jumps to the next timer), with a `LocalSet` for the nodes' `spawn_local`.
pub(crate) fn on_simulated_clock<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .context("cannot build the simulation runtime")?;
    tokio::task::LocalSet::new().block_on(&runtime, future)
}

/// Declares a stall when simulated time stops advancing for [`STALL_WALL`] of real time.
fn watch_for_stalls(liveness: &Liveness) {
    let mut last = (u64::MAX, u64::MAX);
    let mut since = std::time::Instant::now();
    while !liveness.finished.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        let delivered = liveness
            .delivered
            .lock()
            .ok()
            .and_then(|counter| counter.as_ref().map(|c| c.load(Ordering::Relaxed)))
            .unwrap_or(0);
        let now = (liveness.heartbeat_us.load(Ordering::Relaxed), delivered);
        if now != last {
            last = now;
            since = std::time::Instant::now();
        } else if since.elapsed() >= STALL_WALL {
            liveness.stalled.notify_one();
            return;
        }
    }
}

/// A node that stopped on its own: (µs, node, why).
type NodeExit = (u64, usize, String);

/// When the phases began and how they went.
#[derive(Debug, Default)]
struct PhaseTimes {
    active_start_us: u64,
    heal_start_us: u64,
    mesh_complete: bool,
    groups_ready: bool,
    converge_after_heal_us: Option<u64>,
}

/// Shared observation logs of a run.
#[derive(Debug, Default)]
struct Logs {
    observations: Rc<RefCell<Observations>>,
    faults: Rc<RefCell<Vec<FaultRecord>>>,
    exits: Rc<RefCell<Vec<NodeExit>>>,
}

async fn simulate(config: RunConfig, liveness: Arc<Liveness>) -> anyhow::Result<RunReport> {
    let dirs = DataDirs::create(config.seed)?;
    let trace = Trace::new(config.trace.as_deref())?;
    let cluster = Rc::new(RefCell::new(Cluster::new(&config, &dirs.base, trace)));
    let records = Records::default();
    let rng = SimRng::new(config.seed, 2);
    let sim = Sim {
        config: Rc::new(config),
        cluster: cluster.clone(),
        records: Rc::new(RefCell::new(records)),
        rng: Rc::new(RefCell::new(rng)),
        phase: Rc::new(Cell::new(Phase::Setup)),
    };
    let logs = Logs::default();
    if let Ok(mut delivered) = liveness.delivered.lock() {
        *delivered = Some(cluster.borrow().network.delivered_counter());
    }
    let pump = cluster.borrow().network.clone();
    tokio::task::spawn_local(pump.pump());
    {
        let sim = sim.clone();
        let liveness = liveness.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                liveness.heartbeat_us.store(sim.now_us(), Ordering::Relaxed);
            }
        });
    }
    let mut times = PhaseTimes::default();
    let mut finals: BTreeMap<GroupKind, BTreeMap<usize, Served>> = BTreeMap::new();
    tokio::select! {
        () = phases(&sim, &logs, &mut times, &mut finals) => {}
        () = liveness.stalled.notified() => {
            sim.violation(
                invariant::LIVENESS,
                format!(
                    "simulated time stopped advancing at {} µs for {:?} of real time: a task runs without ever waiting (a busy loop)",
                    sim.now_us(),
                    STALL_WALL
                ),
            );
        }
    }
    sim.phase.set(Phase::Done);
    let simulated_us = sim.now_us();
    sim.trace("phase done");
    let stalled = sim.cluster.borrow().network.lock().violations.iter().any(|v| v.invariant == invariant::LIVENESS);
    let strong_history = if stalled { (0, 0) } else { strong_history(&sim).await };
    Ok(build_report(&sim, &logs, &finals, &times, simulated_us, strong_history))
}

async fn phases(
    sim: &Sim,
    logs: &Logs,
    times: &mut PhaseTimes,
    finals: &mut BTreeMap<GroupKind, BTreeMap<usize, Served>>,
) {
    let config = sim.config.clone();
    // Setup: every node at once, then the groups, then one watcher per (node, group).
    // Starts are spread over the first second: hosts never boot on the same microsecond, and
    // nodes started together would refresh their membership views in lockstep, so every
    // observer would notice a crash at the very same instant.
    let stagger_us = STARTUP_SPREAD.as_micros() as u64 / config.nodes.max(1) as u64;
    for index in 0..config.nodes {
        sim.cluster.borrow_mut().start(index);
        tokio::time::sleep(Duration::from_micros(stagger_us)).await;
    }
    progress(sim, "nodes started");
    times.mesh_complete = observe::await_mesh(sim, &logs.observations, mesh_bound(config.nodes)).await;
    progress(sim, if times.mesh_complete { "mesh formed" } else { "mesh did not fully form in time" });
    times.groups_ready = workload::setup_groups(sim, join_bound(config.nodes)).await;
    progress(sim, if times.groups_ready { "groups joined" } else { "some joins failed" });
    let memberships: Vec<(usize, GroupKind)> =
        sim.records.borrow().members.iter().flat_map(|(group, nodes)| nodes.iter().map(|&n| (n, *group))).collect();
    for (node, group) in memberships {
        workload::watch(sim, node, group);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    times.active_start_us = sim.now_us();
    sim.trace("phase active");

    // Active: workload, faults and the membership observers run until the duration is over.
    sim.phase.set(Phase::Active);
    tokio::task::spawn_local(workload::writers(sim.clone()));
    tokio::task::spawn_local(workload::readers(sim.clone()));
    tokio::task::spawn_local(workload::churn(sim.clone()));
    tokio::task::spawn_local(workload::rotations(sim.clone()));
    tokio::task::spawn_local(observe::detections(sim.clone(), logs.observations.clone()));
    tokio::task::spawn_local(observe::false_positives(sim.clone(), logs.observations.clone()));
    fault::start(sim, &logs.observations, &logs.faults);
    let active_end = tokio::time::Instant::now() + config.duration;
    let mut next_progress = sim.now_us() + 5_000_000;
    while tokio::time::Instant::now() < active_end && !sim.failed() {
        tokio::time::sleep(MAIN_TICK).await;
        supervise(sim, &logs.exits);
        if config.progress && sim.now_us() >= next_progress {
            next_progress += 5_000_000;
            progress(sim, "active");
        }
    }
    if sim.failed() {
        return;
    }

    // Healing: no new writes or faults; everything restored; wait for one state everywhere.
    sim.phase.set(Phase::Healing);
    times.heal_start_us = sim.now_us();
    sim.trace("phase healing");
    fault::heal_everything(sim, &logs.observations, &logs.faults);
    let Some(first) = check::await_convergence(sim, config.converge_bound).await else { return };
    // Writes still in flight settle (commit, round and decision timeouts are a few seconds);
    // the state must then be one state everywhere again.
    tokio::time::sleep(IN_FLIGHT_GRACE).await;
    supervise(sim, &logs.exits);
    let Some(again) = check::await_convergence(sim, config.converge_bound).await else { return };
    times.converge_after_heal_us =
        Some(if again == 0 { first } else { sim.now_us().saturating_sub(times.heal_start_us) });
    progress(sim, "converged");
    tokio::time::sleep(Duration::from_secs(1)).await;
    check::check_heads(sim, config.converge_bound).await;
    check::check_configurations(sim, config.converge_bound).await;
    check::check_lost_commits(sim).await;
    check::check_gated_served(sim).await;
    for group in GroupKind::ALL {
        finals.insert(group, check::served(sim, group).await);
    }
    check::check_watchers(sim, finals);
}

/// The strong group's history at the end: (versions on the first member up, versions with
/// several parents there). Every member up must hold one chain (SPEC 3: one committed
/// sequence); a merge or a fork is a violation.
async fn strong_history(sim: &Sim) -> (usize, usize) {
    let members: Vec<usize> =
        sim.records.borrow().members.get(&GroupKind::Strong).map(|m| m.iter().copied().collect()).unwrap_or_default();
    let mut summary = None;
    for node in members {
        if sim.cluster.borrow().nodes[node].life != crate::node::Life::Up {
            continue;
        }
        let request = konor_sdk::protocol::Request::History { group: "st".to_owned() };
        let Some(konor_sdk::protocol::Response::History { versions, .. }) =
            crate::node::call(&sim.cluster, node, request).await
        else {
            continue;
        };
        let chain: Vec<(String, Vec<String>)> = versions.iter().map(|v| (v.label.clone(), v.parents.clone())).collect();
        if let Some(found) = crate::history::check_chain(&chain, &format!("n{node}")) {
            sim.violation(invariant::ONE_SEQUENCE, found.0);
        }
        if summary.is_none() {
            let merges = versions.iter().filter(|v| v.parents.len() > 1).count();
            summary = Some((versions.len(), merges));
        }
    }
    summary.unwrap_or((0, 0))
}

/// Notices nodes that stopped on their own; a supervisor (systemd in production) restarts each
/// after a second, during the active phase.
fn supervise(sim: &Sim, exits: &Rc<RefCell<Vec<NodeExit>>>) {
    let stopped = sim.cluster.borrow_mut().take_exits();
    for (index, why) in stopped {
        let now = sim.now_us();
        // The data dir's path holds the process id: the trace (and so the run's hash) names
        // it by node, so that two runs of one seed hash the same.
        let dir = sim.cluster.borrow().nodes[index].data_dir.display().to_string();
        sim.trace(&format!("node n{index} stopped: {}", why.replace(&dir, &format!("<n{index}>"))));
        exits.borrow_mut().push((now, index, why));
        let task_sim = sim.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(SUPERVISOR_DELAY).await;
            let down = task_sim.cluster.borrow().nodes[index].life == crate::node::Life::Down;
            if down && matches!(task_sim.phase.get(), Phase::Active | Phase::Healing) {
                task_sim.trace(&format!("supervisor restarts n{index}"));
                let now = task_sim.now_us();
                task_sim.records.borrow_mut().fault_events.push((now, Some(index)));
                fault::restart(&task_sim, index);
            }
        });
    }
    let _ = invariant::NODE_EXIT;
}

fn progress(sim: &Sim, what: &str) {
    if !sim.config.progress {
        return;
    }
    let cluster = sim.cluster.borrow();
    let hub = cluster.network.lock();
    eprintln!(
        "[{:>8.2}s simulated] {what}: {} gossip / {} replica frames delivered",
        hub.now_us() as f64 / 1e6,
        hub.stats.gossip.delivered,
        hub.stats.replica.delivered
    );
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    sim: &Sim,
    logs: &Logs,
    finals: &BTreeMap<GroupKind, BTreeMap<usize, Served>>,
    times: &PhaseTimes,
    simulated_us: u64,
    strong_history: (usize, usize),
) -> RunReport {
    let records = sim.records.borrow();
    let observations = logs.observations.borrow();
    // Spread of each change that is still present at the end (a later rollback, delete or
    // apply may have undone it, and then some members never served it at all).
    let mut spreads = Vec::new();
    let mut spreads_undone = 0;
    for write in records.writes.iter().filter(|w| w.has_marker) {
        let members = records.members.get(&write.group).cloned().unwrap_or_default();
        let marker = format!("w{}", write.seq);
        // Without final states (the run stopped early) every marked write is measured.
        let present = finals
            .get(&write.group)
            .and_then(|states| states.values().next())
            .is_none_or(|state| state.settings.contains_key(&marker));
        if !present {
            spreads_undone += 1;
            continue;
        }
        let mut delays_us: Vec<u64> = records
            .sightings
            .get(&write.seq)
            .map(|seen| {
                seen.iter()
                    .filter(|(node, _)| members.contains(node))
                    .map(|(_, at)| at.saturating_sub(write.issued_us))
                    .collect()
            })
            .unwrap_or_default();
        delays_us.sort_unstable();
        spreads.push(Spread { seq: write.seq, group: write.group, members: members.len(), delays_us });
    }
    let mut detections_us: Vec<u64> = Vec::new();
    let mut detections_cut_us: Vec<u64> = Vec::new();
    for crash in &observations.crashes {
        for (observer, delay) in &crash.detected {
            if crash.cut_off.contains(observer) {
                detections_cut_us.push(*delay);
            } else {
                detections_us.push(*delay);
            }
        }
    }
    detections_us.sort_unstable();
    detections_cut_us.sort_unstable();
    let undetected_cut =
        observations.crashes.iter().map(|c| c.cut_off.iter().filter(|o| !c.detected.contains_key(o)).count()).sum();
    let mut outcomes: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut commit_latency_us: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for write in &records.writes {
        *outcomes.entry((write.group.name().to_owned(), write.outcome.name().to_owned())).or_default() += 1;
        if let (Outcome::Committed { .. }, Some(replied)) = (&write.outcome, write.replied_us) {
            commit_latency_us.entry(write.group.name().to_owned()).or_default().push(replied - write.issued_us);
        }
    }
    for latencies in commit_latency_us.values_mut() {
        latencies.sort_unstable();
    }
    let mut mesh_formed_us: Vec<u64> = observations.mesh_formed.values().copied().collect();
    mesh_formed_us.sort_unstable();
    let observer_count = sim.config.observer_count();
    let cluster = sim.cluster.borrow();
    let mut hub = cluster.network.lock();
    hub.trace.flush();
    let protocol_checks = hub
        .checker
        .as_ref()
        .map_or((0, 0, 0, 0), |c| (c.acks_checked, c.votes_checked, c.accepts_checked, c.decisions_checked));
    let watchers: BTreeSet<&(usize, GroupKind)> = records.watchers.keys().collect();
    RunReport {
        config: (*sim.config).clone(),
        trace_hash: hub.trace.hash_hex(),
        trace_entries: hub.trace.entries(),
        violations: hub.violations.clone(),
        simulated_us,
        active_start_us: times.active_start_us,
        heal_start_us: times.heal_start_us,
        wall: Duration::ZERO,
        peak_rss_kib: None,
        mesh_incomplete: observer_count.saturating_sub(mesh_formed_us.len()),
        mesh_formed_us,
        mesh_complete: times.mesh_complete,
        groups_ready: times.groups_ready,
        strong_history,
        strong_observations: records.strong.observations,
        converge_after_heal_us: times.converge_after_heal_us,
        spreads,
        spreads_undone,
        detections_us,
        detections_cut_us,
        undetected_cut,
        crashes_watched: observations.crashes.len(),
        net: hub.stats,
        outcomes,
        commit_latency_us,
        reads: (records.reads_fresh, records.reads_stale, records.reads_unanswered),
        churn: records.churn,
        rotations: records.rotations,
        quorums_checked: records.quorums_checked,
        failure_samples: {
            let mut samples: Vec<String> = Vec::new();
            for write in &records.writes {
                if let Outcome::Failed(message) = &write.outcome {
                    let short: String = message.chars().take(160).collect();
                    if samples.len() < 3 && !samples.contains(&short) {
                        samples.push(short);
                    }
                }
            }
            samples
        },
        watch: (records.watch_events, watchers.len()),
        releases: (records.released.len(), records.gated_events),
        protocol_checks,
        disk: cluster.disk.stats(),
        false_dead: (observations.false_dead.len(), observations.samples),
        node_exits: logs.exits.borrow().clone(),
        log_lines: Vec::new(),
        faults: logs.faults.borrow().clone(),
    }
}
