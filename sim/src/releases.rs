//! A scripted canary release on real node code (issue 16, SPEC F14): `konor-sim releases`.
//!
//! Every node (labelled `region=rK`) holds one gated group and runs a watcher standing for its
//! applications. The script:
//!
//! 1. writes `a=1` and releases it to every node (the baseline, `base`);
//! 2. writes `a=2` and releases it as a 10% canary (`--waves 10,100`): each node must serve the
//!    canary's target exactly when the release's deterministic order puts it in the slice
//!    (worked out here from node ids with [`konor_crdt::release::in_slice`] and compared with
//!    what every node serves and what every watcher saw);
//! 3. cuts the mesh in two, promotes the canary on one side and aborts it on the other at
//!    the same time, heals, and checks that every node converges to one outcome: aborted (an
//!    abort wins over any promotion), every node back on `base`;
//! 4. releases `a=2` again as a canary and promotes it to its last wave (100%): every node
//!    serves it;
//! 5. writes `a=3`, releases it to a 30% canary, and has the application on one node of the
//!    slice report that it failed to apply it: the members' guards must abort the release and
//!    every node must serve `a=2` again within [`GUARD_BOUND`] of the report.

//!
//! The report prints one `step` line per step, `slice N of M`, and `check NAME ok|FAIL: ...`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, bail};
use konor_node::api::socket::{LocalCall, WatchSender};
use konor_sdk::protocol::{Request, Response, WatchEvent, WriteMeta};
use serde_json::json;
use tokio::sync::oneshot;

use crate::RunConfig;
use crate::node::{Cluster, Life, call, crash, node_id};
use crate::run::DataDirs;
use crate::trace::Trace;

/// How soon after a failed apply is reported every node must serve the version before the
/// release again: the report is gossiped within a second, every member reads reports and
/// evaluates guards once a second, and the abort spreads like any change.
pub const GUARD_BOUND: Duration = Duration::from_secs(10);

/// The gated group of the script.
const GROUP: &str = "rel";

/// Longest wait for one state the script waits on (every node serving a version).
const STATE_BOUND: Duration = Duration::from_secs(60);

/// Regions the nodes are spread over.
const REGIONS: usize = 3;

/// What a scripted release run saw.
#[derive(Debug, Default)]
pub struct ReleaseReport {
    /// What the script did, with simulated times.
    pub steps: Vec<String>,
    /// (name, passed, detail) of each check.
    pub checks: Vec<(String, bool, String)>,
    /// Nodes in the canary's slice, and all nodes.
    pub slice: (usize, usize),
    /// True when the script could not do what it meant to: the run says nothing.
    pub incomplete: Option<String>,
}

impl ReleaseReport {
    /// True when every check passed and the script ran to its end.
    pub fn passed(&self) -> bool {
        self.incomplete.is_none() && self.checks.iter().all(|(_, ok, _)| *ok)
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for step in &self.steps {
            let _ = writeln!(out, "step {step}");
        }
        let _ = writeln!(out, "slice {} of {}", self.slice.0, self.slice.1);
        for (name, ok, detail) in &self.checks {
            let _ = writeln!(out, "check {name} {}: {detail}", if *ok { "ok" } else { "FAIL" });
        }
        if let Some(why) = &self.incomplete {
            let _ = writeln!(out, "incomplete: {why}");
        }
        out
    }
}

/// Runs the script on `nodes` nodes with frame loss `loss`, seeded by `seed`.
pub fn run_releases(nodes: usize, seed: u64, loss: f64) -> anyhow::Result<ReleaseReport> {
    if nodes < 4 {
        bail!("--nodes must be at least 4");
    }
    let mut config = RunConfig::new(nodes, seed);
    config.loss = loss;
    config.regions = REGIONS;
    config.check_disk = false;
    config.validate()?;
    let thread = std::thread::Builder::new()
        .name(format!("konor-sim-releases-{seed}"))
        .stack_size(crate::run::SIM_STACK_BYTES)
        .spawn(move || -> anyhow::Result<ReleaseReport> {
            crate::entropy::seed_this_thread(seed);
            let (_log_counts, _log_guard) = crate::log::install(None);
            crate::run::on_simulated_clock(script(config))
        })
        .context("cannot start the simulation thread")?;
    thread.join().map_err(|_| anyhow::anyhow!("the simulation thread panicked"))?
}

type Shared = Rc<RefCell<Cluster>>;

/// Every version label each node's watcher was served, by node index.
type Seen = Rc<RefCell<BTreeMap<usize, BTreeSet<String>>>>;

fn meta(message: &str) -> WriteMeta {
    WriteMeta { author: "konor-sim".to_owned(), message: message.to_owned(), ..WriteMeta::default() }
}

async fn script(config: RunConfig) -> anyhow::Result<ReleaseReport> {
    let dirs = DataDirs::create(config.seed)?;
    let cluster: Shared = Rc::new(RefCell::new(Cluster::new(&config, &dirs.base, Trace::new(None)?)));
    tokio::task::spawn_local(cluster.borrow().network.clone().pump());
    let mut report = ReleaseReport::default();
    let started = tokio::time::Instant::now();
    let step = |report: &mut ReleaseReport, what: String| {
        report.steps.push(format!("{:.1}s {what}", started.elapsed().as_secs_f64()));
    };
    let nodes = config.nodes;
    for index in 0..nodes {
        cluster.borrow_mut().start(index);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcome = steps(&cluster, nodes, &mut report, &step).await;
    if let Err(why) = outcome {
        report.incomplete = Some(format!("{why:#}"));
    }
    for index in 0..nodes {
        crash(&cluster, index).await;
    }
    Ok(report)
}

async fn steps(
    cluster: &Shared,
    nodes: usize,
    report: &mut ReleaseReport,
    step: &impl Fn(&mut ReleaseReport, String),
) -> anyhow::Result<()> {
    let create = Request::GroupCreate {
        name: GROUP.into(),
        mode: "eventual".into(),
        key: None,
        evict_after_ms: None,
        fencing: None,
        release: Some("gated".into()),
    };
    let key = loop {
        match call(cluster, 0, create.clone()).await {
            Some(Response::GroupCreated { key, .. }) => break key,
            other => {
                if started_too_long(cluster) {
                    bail!("the group was not created: {other:?}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    for index in 1..nodes {
        let mut joined = false;
        for _attempt in 0..20 {
            let request = Request::GroupJoin { name: GROUP.into(), key: key.clone() };
            if matches!(call(cluster, index, request).await, Some(Response::Joined { .. })) {
                joined = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !joined {
            bail!("{} could not join", node_id(index));
        }
    }
    step(report, format!("{GROUP} gated on {nodes} nodes"));
    let seen: Seen = Rc::new(RefCell::new(BTreeMap::new()));
    for index in 0..nodes {
        watch(cluster, index, seen.clone()).await?;
    }

    // 1. The baseline, released to all.
    let base = write(cluster, 0, json!(1)).await?;
    release(cluster, 1, &base, "all", None).await?;
    let everyone: Vec<usize> = (0..nodes).collect();
    if !serving(cluster, &everyone, &base).await {
        bail!("not every node came to serve the baseline {base}");
    }
    step(report, format!("baseline {base} served everywhere"));

    // 2. A 10% canary of the next version.
    let next = write(cluster, 2, json!(2)).await?;
    let canary = release(cluster, 3, &next, "canary", Some(vec![10, 100])).await?;
    let canary_id = release_id(cluster, 3, &canary).await?;
    let slice: Vec<usize> = (0..nodes)
        .filter(|&index| {
            let viewer = konor_crdt::release::Viewer {
                node: node_id(index),
                labels: crate::node::region_labels(index, REGIONS),
            };
            let strategy =
                konor_crdt::ReleaseStrategy::Canary(konor_crdt::Canary { waves: vec![10, 100], ..Default::default() });
            konor_crdt::release::in_slice(GROUP, &canary_id, &strategy, 0, &viewer)
        })
        .collect();
    let outside: Vec<usize> = (0..nodes).filter(|index| !slice.contains(index)).collect();
    report.slice = (slice.len(), nodes);
    let slice_served = serving(cluster, &slice, &next).await;
    // Every node has the release (its status names it) before the outside is checked.
    let known = release_known(cluster, &everyone, &canary).await;
    let outside_held = outside_serves(cluster, &outside, &base).await;
    let leaked: Vec<String> =
        outside.iter().filter(|index| seen_version(&seen, **index, &next)).map(|index| node_id(*index)).collect();
    report.checks.push((
        "canary-slice".into(),
        slice_served && known && outside_held.is_empty() && leaked.is_empty() && !slice.is_empty(),
        format!(
            "{canary} ({next} to 10%): {} node(s) in the slice serve {next}: {slice_served}; every node knows the release: {known}; \
             outside serving something else: {outside_held:?}; outside watchers served {next}: {leaked:?}",
            slice.len()
        ),
    ));
    step(report, format!("canary {canary} of {next}: {} of {nodes} nodes in the slice", slice.len()));

    // 3. A partition; promote on one side, abort on the other at once; heal.
    let side: Vec<bool> = (0..nodes).map(|index| index < nodes / 2).collect();
    let cut = cluster.borrow().network.partition(side, false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (promoted, aborted) = tokio::join!(
        call(cluster, 0, Request::Promote { group: GROUP.into(), wave: None, meta: meta("promote") }),
        call(
            cluster,
            nodes - 1,
            Request::Abort { group: GROUP.into(), reason: Some("errors on the canary".into()), meta: meta("abort") }
        ),
    );
    step(
        report,
        format!("partitioned; promote on n0: {}; abort on {}: {}", name(&promoted), node_id(nodes - 1), name(&aborted)),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.borrow().network.heal(cut);
    step(report, "healed".to_owned());
    let both =
        matches!(promoted, Some(Response::Committed { .. })) && matches!(aborted, Some(Response::Committed { .. }));
    let back = serving(cluster, &everyone, &base).await;
    let agreed = all_aborted(cluster, &everyone).await;
    report.checks.push((
        "promote-and-abort-converge".into(),
        both && back && agreed,
        format!(
            "both committed on their side: {both}; every node serves {base} again: {back}; every node says the release was aborted: {agreed}"
        ),
    ));

    // 4. The canary again, promoted to its last wave.
    let again = release(cluster, 4 % nodes, &next, "canary", Some(vec![10, 100])).await?;
    // Node 1 may not hold the new release yet: it retries until it does.
    let mut promote = None;
    for _attempt in 0..50 {
        promote = call(cluster, 1, Request::Promote { group: GROUP.into(), wave: None, meta: meta("promote") }).await;
        if matches!(promote, Some(Response::Committed { .. })) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !matches!(promote, Some(Response::Committed { .. })) {
        bail!("the promotion of {again} was not committed: {promote:?}");
    }
    let all_served = serving(cluster, &everyone, &next).await;
    report.checks.push((
        "promoted-to-all".into(),
        all_served,
        format!("{again} promoted to 100%: every node serves {next}: {all_served}"),
    ));
    step(report, format!("{again} promoted to its last wave"));

    // 5. A guard breach on one node of a canary's slice rolls the release back everywhere.
    let third = write(cluster, 0, json!(3)).await?;
    let breached = release(cluster, 0, &third, "canary", Some(vec![30, 100])).await?;
    let breached_id = release_id(cluster, 0, &breached).await?;
    let strategy =
        konor_crdt::ReleaseStrategy::Canary(konor_crdt::Canary { waves: vec![30, 100], ..Default::default() });
    let first_in_slice = (0..nodes).find(|&index| {
        let viewer =
            konor_crdt::release::Viewer { node: node_id(index), labels: crate::node::region_labels(index, REGIONS) };
        konor_crdt::release::in_slice(GROUP, &breached_id, &strategy, 0, &viewer)
    });
    let Some(failing) = first_in_slice else { bail!("the 30% canary {breached} holds no node") };
    if !serving(cluster, &[failing], &third).await {
        bail!("{} never served {third}", node_id(failing));
    }
    let reported_at = tokio::time::Instant::now();
    let failed = Request::ReportApply {
        group: GROUP.into(),
        version: third.clone(),
        revision: 0,
        result: konor_sdk::protocol::ApplyResult::Error { message: "the app refused it".into() },
    };
    if !matches!(call(cluster, failing, failed).await, Some(Response::Done)) {
        bail!("{} did not take the apply report", node_id(failing));
    }
    step(report, format!("the app on {} failed to apply {third} of canary {breached}", node_id(failing)));
    let rolled_back = serving(cluster, &everyone, &next).await && all_aborted(cluster, &everyone).await;
    let took = reported_at.elapsed();
    report.checks.push((
        "guard-rolls-back".into(),
        rolled_back && took <= GUARD_BOUND,
        format!(
            "every node aborted {breached} and serves {next} again: {rolled_back}, {:.1} s after the report (bound {} s)",
            took.as_secs_f64(),
            GUARD_BOUND.as_secs()
        ),
    ));
    Ok(())
}

fn started_too_long(cluster: &Shared) -> bool {
    cluster.borrow().network.lock().now_us() > STATE_BOUND.as_micros() as u64
}

fn name(answer: &Option<Response>) -> String {
    match answer {
        Some(Response::Committed { version, .. }) => format!("committed {version}"),
        Some(Response::Error { code, .. }) => code.as_str().to_owned(),
        Some(_) => "unexpected answer".to_owned(),
        None => "no answer".to_owned(),
    }
}

/// Sets `a` on node `index`; the version written.
async fn write(cluster: &Shared, index: usize, value: serde_json::Value) -> anyhow::Result<String> {
    let request = Request::Set { group: GROUP.into(), entries: [("a".to_owned(), value)].into(), meta: meta("write") };
    match call(cluster, index, request).await {
        Some(Response::Committed { version, .. }) => Ok(version),
        other => bail!("the write on {} was not committed: {other:?}", node_id(index)),
    }
}

/// Releases `version` from node `index`; the release's own version.
async fn release(
    cluster: &Shared,
    index: usize,
    version: &str,
    strategy: &str,
    waves: Option<Vec<u8>>,
) -> anyhow::Result<String> {
    let request = Request::Release {
        group: GROUP.into(),
        version: version.to_owned(),
        strategy: Some(strategy.to_owned()),
        waves,
        selector: None,
        bake_ms: None,
        max_failed: None,
        max_error_rate: None,
        node_health: None,
        meta: meta("release"),
    };
    // The node may not hold `version` yet (it committed on another): it retries until it does.
    let mut answer = None;
    for _attempt in 0..50 {
        answer = call(cluster, index, request.clone()).await;
        match &answer {
            Some(Response::Committed { version, .. }) => return Ok(version.clone()),
            Some(Response::Error { code: konor_sdk::protocol::ErrorCode::NotFound, .. }) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ => break,
        }
    }
    bail!("the release of {version} on {} was not committed: {answer:?}", node_id(index))
}

/// The full id of the current release `label`, from node `index`'s status.
async fn release_id(cluster: &Shared, index: usize, label: &str) -> anyhow::Result<konor_crdt::VersionId> {
    let status = call(cluster, index, Request::Status { group: GROUP.into() }).await;
    let Some(Response::Status { release: Some(state), .. }) = status else {
        bail!("{} has no release state: {status:?}", node_id(index));
    };
    let current = state.current.filter(|c| c.label == label).context("the release is not current")?;
    konor_crdt::VersionId::from_storage_key(&current.id).with_context(|| format!("release id {:?}", current.id))
}

/// Subscribes a watcher on node `index` that records every version label it is served.
async fn watch(cluster: &Shared, index: usize, seen: Seen) -> anyhow::Result<()> {
    let Some((calls, client)) = cluster.borrow_mut().caller(index) else { bail!("{} is down", node_id(index)) };
    let (events_tx, mut events) = WatchSender::detached(client.connection);
    let (reply, answer) = oneshot::channel();
    let subscribe =
        LocalCall::Watch { client, group: GROUP.into(), from_revision: None, prefix: None, events: events_tx, reply };
    calls.send(subscribe).await.map_err(|_| anyhow::anyhow!("{} is gone", node_id(index)))?;
    if !matches!(answer.await, Ok(Response::Watching { .. })) {
        bail!("{} refused the watch", node_id(index));
    }
    tokio::task::spawn_local(async move {
        while let Some(event) = events.recv().await {
            let version = match event {
                WatchEvent::Change { version, .. } | WatchEvent::Resync { version, .. } => version,
            };
            seen.borrow_mut().entry(index).or_default().insert(version);
        }
    });
    Ok(())
}

fn seen_version(seen: &Seen, index: usize, version: &str) -> bool {
    seen.borrow().get(&index).is_some_and(|versions| versions.contains(version))
}

/// The version node `index` serves.
async fn served(cluster: &Shared, index: usize) -> Option<String> {
    match call(cluster, index, Request::Snapshot { group: GROUP.into(), prefix: None }).await {
        Some(Response::Snapshot { freshness, .. }) => Some(freshness.version),
        _ => None,
    }
}

/// Waits until every node of `nodes` serves `version`, for at most [`STATE_BOUND`].
async fn serving(cluster: &Shared, nodes: &[usize], version: &str) -> bool {
    let deadline = tokio::time::Instant::now() + STATE_BOUND;
    'wait: while tokio::time::Instant::now() < deadline {
        for &index in nodes {
            if cluster.borrow().nodes[index].life != Life::Up
                || served(cluster, index).await.as_deref() != Some(version)
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'wait;
            }
        }
        return true;
    }
    false
}

/// Waits until every node of `nodes` names `release` as its current release.
async fn release_known(cluster: &Shared, nodes: &[usize], release: &str) -> bool {
    let deadline = tokio::time::Instant::now() + STATE_BOUND;
    'wait: while tokio::time::Instant::now() < deadline {
        for &index in nodes {
            let status = call(cluster, index, Request::Status { group: GROUP.into() }).await;
            let current = match &status {
                Some(Response::Status { release: Some(state), .. }) => state.current.as_ref().map(|c| c.label.clone()),
                _ => None,
            };
            if current.as_deref() != Some(release) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'wait;
            }
        }
        return true;
    }
    false
}

/// The nodes of `nodes` that do not serve `version` now.
async fn outside_serves(cluster: &Shared, nodes: &[usize], version: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    for &index in nodes {
        if served(cluster, index).await.as_deref() != Some(version) {
            wrong.push(node_id(index));
        }
    }
    wrong
}

/// Waits until every node of `nodes` says its current release was aborted.
async fn all_aborted(cluster: &Shared, nodes: &[usize]) -> bool {
    let deadline = tokio::time::Instant::now() + STATE_BOUND;
    'wait: while tokio::time::Instant::now() < deadline {
        for &index in nodes {
            let status = call(cluster, index, Request::Status { group: GROUP.into() }).await;
            let aborted = matches!(
                &status,
                Some(Response::Status { release: Some(state), .. })
                    if state.current.as_ref().is_some_and(|c| c.aborted.is_some())
            );
            if !aborted {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'wait;
            }
        }
        return true;
    }
    false
}
