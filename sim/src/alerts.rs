//! Scripted runs for the anomaly rules (`konor_node::health::alerts`, issue 15): real nodes on
//! the simulated network, each carrying `region=rK`, one fault injected on a fixed script, and
//! the alerts every node raised read back through its own `alerts` request, as `konorctl alerts`
//! reads them.
//!
//! * `flap`: the last node crashes and restarts [`FLAP_CYCLES`] times, each time staying down
//!   until every other node sees it dead, then up until they all see it live again.
//! * `label-cut`: the nodes of region `r1` are cut off from the rest for [`CUT_FOR`], then healed.
//! * `healthy`: nothing; the network's loss is the only trouble.
//!
//! Every run first lets the mesh form and the rules learn their baselines ([`WARMUP`]), and
//! ends with [`SETTLE`] of quiet so that what cleared has cleared. Like `run`, a process runs one
//! scenario (tokio seeds runtimes from a process-wide counter).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::health::{Alert, Alerts};
use konor_sdk::protocol::{Request, Response};

use crate::RunConfig;
use crate::node::{Cluster, Life, call, crash, node_id};
use crate::run::DataDirs;
use crate::trace::Trace;

/// Crash-and-restart cycles of the flapping node: the rule's threshold.
pub const FLAP_CYCLES: usize = konor_node::health::alerts::FLAP_DOWNS;

/// How long region `r1` stays cut off: well past the detection bound (about 2 s at 250 ms
/// gossip), so that the other side sees its nodes dead and the rules see them stay dead.
pub const CUT_FOR: Duration = Duration::from_secs(25);

/// Quiet time before the fault: the mesh forms and each node's heartbeat baseline warms up
/// (`DELAY_WARMUP_SAMPLES` at the 100 ms membership poll is 30 s).
pub const WARMUP: Duration = Duration::from_secs(40);

/// Quiet time after the fault.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Longest wait for one state change the script waits on (a node seen dead, then live).
const STATE_BOUND: Duration = Duration::from_secs(60);

/// Regions the nodes are spread over.
const REGIONS: usize = 3;

/// What to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// One node crashes and restarts repeatedly.
    Flap,
    /// One region is partitioned from the others.
    LabelCut,
    /// No fault.
    Healthy,
}

impl std::str::FromStr for Scenario {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Scenario> {
        match text {
            "flap" => Ok(Scenario::Flap),
            "label-cut" => Ok(Scenario::LabelCut),
            "healthy" => Ok(Scenario::Healthy),
            _ => bail!("unknown scenario {text:?}: use flap, label-cut or healthy"),
        }
    }
}

/// What a scenario run saw.
#[derive(Debug, Default)]
pub struct AlertReport {
    /// Each node's alerts at the end (active and cleared), by node index.
    pub alerts: BTreeMap<usize, Alerts>,
    /// What the script did, with simulated times.
    pub steps: Vec<String>,
    /// True when the script could not do what it meant to (the mesh did not form, a node was
    /// never seen dead): the run says nothing about the rules.
    pub incomplete: Option<String>,
}

impl AlertReport {
    /// Every alert any node raised, as (node, alert), active ones and cleared ones.
    pub fn raised(&self) -> Vec<(usize, &Alert)> {
        self.alerts
            .iter()
            .flat_map(|(node, alerts)| alerts.active.iter().chain(&alerts.history).map(move |alert| (*node, alert)))
            .collect()
    }

    /// The report as text: steps, then one line per alert
    /// (`alert NODE KIND SUBJECT raised_ms cleared_ms|- MESSAGE`).
    pub fn text(&self) -> String {
        let mut out = String::new();
        for step in &self.steps {
            let _ = writeln!(out, "step {step}");
        }
        for (node, alert) in self.raised() {
            let cleared = alert.cleared_ms.map_or_else(|| "-".to_owned(), |at| at.to_string());
            let _ = writeln!(
                out,
                "alert {} {} {} {} {cleared} {}",
                node_id(node),
                alert.kind.as_str(),
                alert.subject,
                alert.raised_ms,
                alert.message
            );
        }
        let _ = writeln!(out, "alerts raised: {}", self.raised().len());
        if let Some(why) = &self.incomplete {
            let _ = writeln!(out, "incomplete: {why}");
        }
        out
    }
}

/// Runs `scenario` on `nodes` nodes with frame loss `loss`, seeded by `seed`.
pub fn run_scenario(scenario: Scenario, nodes: usize, seed: u64, loss: f64) -> anyhow::Result<AlertReport> {
    if nodes < 2 * REGIONS {
        bail!("--nodes must be at least {} (two per region)", 2 * REGIONS);
    }
    let mut config = RunConfig::new(nodes, seed);
    config.loss = loss;
    config.regions = REGIONS;
    config.check_disk = false;
    config.validate()?;
    let thread = std::thread::Builder::new()
        .name(format!("konor-sim-alerts-{seed}"))
        .stack_size(crate::run::SIM_STACK_BYTES)
        .spawn(move || -> anyhow::Result<AlertReport> {
            crate::entropy::seed_this_thread(seed);
            let (_log_counts, _log_guard) = crate::log::install(None);
            crate::run::on_simulated_clock(script(scenario, config))
        })
        .context("cannot start the simulation thread")?;
    thread.join().map_err(|_| anyhow::anyhow!("the simulation thread panicked"))?
}

async fn script(scenario: Scenario, config: RunConfig) -> anyhow::Result<AlertReport> {
    let dirs = DataDirs::create(config.seed)?;
    let cluster = Rc::new(RefCell::new(Cluster::new(&config, &dirs.base, Trace::new(None)?)));
    tokio::task::spawn_local(cluster.borrow().network.clone().pump());
    let mut report = AlertReport::default();
    let started = tokio::time::Instant::now();
    let step = |report: &mut AlertReport, what: String| {
        report.steps.push(format!("{:.1}s {what}", started.elapsed().as_secs_f64()));
    };
    for index in 0..config.nodes {
        cluster.borrow_mut().start(index);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let everyone: Vec<usize> = (0..config.nodes).collect();
    if !seen_as(&cluster, 0, &everyone, "live", STATE_BOUND).await {
        report.incomplete = Some("the mesh did not form".to_owned());
        return Ok(report);
    }
    step(&mut report, "mesh formed".to_owned());
    tokio::time::sleep(WARMUP).await;
    match scenario {
        Scenario::Flap => {
            let target = config.nodes - 1;
            let others: Vec<usize> = (0..target).collect();
            for cycle in 1..=FLAP_CYCLES {
                crash(&cluster, target).await;
                step(&mut report, format!("crash {} ({cycle} of {FLAP_CYCLES})", node_id(target)));
                if !seen_by_all(&cluster, &others, target, "dead").await {
                    report.incomplete = Some(format!("{} was never seen dead by every node", node_id(target)));
                    return Ok(report);
                }
                step(&mut report, format!("{} seen dead", node_id(target)));
                cluster.borrow_mut().start(target);
                if !seen_by_all(&cluster, &others, target, "live").await {
                    report.incomplete = Some(format!("{} was never seen live again by every node", node_id(target)));
                    return Ok(report);
                }
                step(&mut report, format!("{} restarted and seen live", node_id(target)));
            }
        }
        Scenario::LabelCut => {
            let side: Vec<bool> = (0..config.nodes).map(|index| index % REGIONS == 1).collect();
            let cut = cluster.borrow().network.partition(side, false);
            step(&mut report, format!("region r1 cut off for {} s", CUT_FOR.as_secs()));
            tokio::time::sleep(CUT_FOR).await;
            cluster.borrow().network.heal(cut);
            step(&mut report, "healed".to_owned());
        }
        Scenario::Healthy => {}
    }
    tokio::time::sleep(SETTLE).await;
    step(&mut report, "settled".to_owned());
    for index in 0..config.nodes {
        if cluster.borrow().nodes[index].life != Life::Up {
            continue;
        }
        match call(&cluster, index, Request::Alerts).await {
            Some(Response::Alerts { alerts }) => {
                report.alerts.insert(index, alerts);
            }
            other => {
                // A node that cannot answer says nothing about the rules: the run is void.
                report.incomplete = Some(format!("{} answered alerts with {other:?}", node_id(index)));
            }
        }
    }
    for index in 0..config.nodes {
        crash(&cluster, index).await;
    }
    Ok(report)
}

/// Waits until every one of `observers` reports `target` in `state`, each for at most
/// [`STATE_BOUND`].
async fn seen_by_all(cluster: &Rc<RefCell<Cluster>>, observers: &[usize], target: usize, state: &str) -> bool {
    for &observer in observers {
        if !seen_as(cluster, observer, &[target], state, STATE_BOUND).await {
            return false;
        }
    }
    true
}

/// Waits until node `observer` reports every one of `nodes` in `state`, for at most `bound`.
async fn seen_as(
    cluster: &Rc<RefCell<Cluster>>,
    observer: usize,
    nodes: &[usize],
    state: &str,
    bound: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < deadline {
        if let Some(Response::Nodes { nodes: rows }) = call(cluster, observer, Request::Nodes).await {
            let all = nodes.iter().all(|&index| {
                let id = node_id(index);
                rows.iter().any(|row| row.id == id && (row.state == state || (row.is_self && state == "live")))
            });
            if all {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
