//! One chaos run, start to end: the lab, the CA and the nodes, the groups, the recorded
//! workload under the seeded faults, then healing, settling and each node's final state. The
//! lab, the disk tmpfs and the processes are locals of [`run`] declared in the order that drops
//! them right (processes, then the tmpfs, then the network), so they go on every exit: a normal
//! end, an error, a panic, or ctrl-C dropping the future.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use konor_sdk::Client;
use konor_sdk::protocol::{Request, Response};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinSet;

use konor_chaos::history::{FinalState, FinalVersion, GroupInfo, Record, RunInfo};

use crate::cluster::{Cluster, Tmpfs};
use crate::faults::{self, Targets};
use crate::lab::Lab;
use crate::py_clients::{PythonClient, PythonClients};
use crate::record::{RecordCounts, Recorder};
use crate::workload::{self, WorkloadClient};

/// The groups of every run: one of each mode.
pub const GROUPS: [(&str, &str); 2] = [("ev", "eventual"), ("st", "strong")];

/// Size of the disk node's data dir tmpfs: far more than a run writes, and small enough that
/// filling it is quick.
const DISK_TMPFS_BYTES: u64 = 64 * 1024 * 1024;

/// Timeout of each workload request: a paused or cut-off node answers nothing, and the client
/// records `Unknown` and moves on rather than stalling the run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after their own timeout the workload clients may take to stop (recording the last
/// operation).
const CLIENTS_STOP_GRACE: Duration = Duration::from_secs(5);

/// Timeout of a membership sample or a final read: the node is local and answers from memory.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the mesh and the groups may take to form before the run gives up.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Seed of the schedule and the workload.
    pub seed: u64,
    /// Length of the fault phase.
    pub duration: Duration,
    /// Nodes, 3 to 7.
    pub nodes: usize,
    /// Run dir (history, logs, data dirs).
    pub out: PathBuf,
    /// The konord binary.
    pub konord: PathBuf,
    /// Longest settle after healing.
    pub settle: Duration,
    /// Workload clients per node.
    pub clients_per_node: u32,
    /// Workload clients per node on the Python SDK (a process each).
    pub python_clients_per_node: u32,
    /// konord's `KONOR_LOG` filter.
    pub log_filter: String,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Where its history and logs are.
    pub run_dir: PathBuf,
    /// Records by kind.
    pub counts: RecordCounts,
    /// Faults that ran.
    pub faults_ran: usize,
    /// Whether every node's heads agreed for every group before the settle bound.
    pub converged: bool,
    /// How long settling took, ms.
    pub settled_after_ms: u64,
}

/// Runs one chaos run and leaves nothing behind but its run dir.
pub async fn run(options: &RunOptions) -> anyhow::Result<RunSummary> {
    if !(3..=7).contains(&options.nodes) {
        bail!("--nodes must be 3 to 7, not {}", options.nodes);
    }
    crate::lab::require_root_and_tools()?;
    let run_dir = prepare_run_dir(&options.out)?;
    let history_path = run_dir.join("history.jsonl");
    // Declared in reverse order of dropping: the processes go first, then the tmpfs, then the
    // network.
    let lab = Lab::new(options.nodes)?;
    let hosts: Vec<(String, String)> =
        lab.hosts().iter().map(|h| (h.namespace.clone(), h.address.to_string())).collect();
    let cluster = Cluster::new(&run_dir, &options.konord, &hosts, &options.log_filter)?;
    let disk_node = disk_node(options.seed, options.nodes);
    let disk = Tmpfs::mount(&cluster.nodes[disk_node].data_dir, DISK_TMPFS_BYTES)?;
    // Moved into a binding declared after the tmpfs, so the processes die before it unmounts.
    let mut cluster = cluster;
    println!(
        "konor-chaos: seed {} on {} nodes ({} on a tmpfs), bridge {}, run dir {}",
        options.seed,
        options.nodes,
        cluster.nodes[disk_node].id,
        lab.bridge(),
        run_dir.display()
    );

    for index in 0..options.nodes {
        cluster.start(index)?;
    }
    let mut admin = Vec::new();
    for index in 0..options.nodes {
        admin.push(cluster.client(index, CLIENT_TIMEOUT).await?);
    }
    tokio::time::timeout(SETUP_DEADLINE, await_mesh(&admin)).await.context("the mesh never formed")?;
    for (group, mode) in GROUPS {
        tokio::time::timeout(SETUP_DEADLINE, group_on_all(&admin, group, mode))
            .await
            .with_context(|| format!("group {group} never formed on every node"))??;
    }

    let recorder = Recorder::create(&history_path)?;
    let duration_ms = u64::try_from(options.duration.as_millis()).unwrap_or(u64::MAX);
    let settle_ms = u64::try_from(options.settle.as_millis()).unwrap_or(u64::MAX);
    let node_ids: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    recorder.write(&Record::Run(RunInfo {
        seed: options.seed,
        nodes: node_ids.clone(),
        groups: GROUPS.iter().map(|(name, mode)| GroupInfo { name: (*name).into(), mode: (*mode).into() }).collect(),
        duration_ms,
        settle_ms,
        detection_bound_ms: faults::DETECTION_BOUND_MS,
        started_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
    }))?;

    let (stop_clients, clients_stopped) = watch::channel(false);
    let (stop_observers, observers_stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut client_tasks = JoinSet::new();
    let groups: Vec<String> = GROUPS.iter().map(|(name, _)| (*name).to_owned()).collect();
    let mut client_number = 0;
    let mut watcher_number = 0;
    for (index, node) in node_ids.iter().enumerate() {
        for _ in 0..options.clients_per_node {
            client_number += 1;
            let client = cluster.client(index, CLIENT_TIMEOUT).await?;
            let worker = WorkloadClient { number: client_number, node: node.clone(), client };
            let (groups, recorder, stop) = (groups.clone(), recorder.clone(), clients_stopped.clone());
            client_tasks.spawn(workload::run_client(worker, groups, options.seed, recorder, stop));
        }
        for group in &groups {
            watcher_number += 1;
            let watch = workload::open_watcher(watcher_number, node.clone(), &admin[index], group, &recorder).await?;
            tasks.spawn(workload::run_watcher(
                watcher_number,
                node.clone(),
                watch,
                recorder.clone(),
                observers_stopped.clone(),
            ));
        }
        let probe = cluster.client(index, PROBE_TIMEOUT).await?;
        tasks.spawn(workload::run_membership(node.clone(), probe, recorder.clone(), observers_stopped.clone()));
    }

    let python: Vec<PythonClient> = (0..options.python_clients_per_node)
        .flat_map(|_| cluster.nodes.iter().map(|node| (node.id.clone(), node.socket.clone())).collect::<Vec<_>>())
        .enumerate()
        .map(|(offset, (node, socket))| PythonClient { number: client_number + 1 + offset as u32, node, socket })
        .collect();
    let python_clients = PythonClients::start(&python, &groups, options.seed, &recorder, &run_dir)?;

    let schedule = faults::plan(options.seed, duration_ms, options.nodes, disk_node);
    let targets = Targets { cluster: &mut cluster, lab: &lab, disk: &disk, recorder: &recorder };
    let faults_ran = faults::execute(&schedule, targets, duration_ms).await?;
    let left = duration_ms.saturating_sub(recorder.now_ms());
    tokio::time::sleep(Duration::from_millis(left)).await;

    faults::record_exits(&mut cluster, &recorder)?;
    // Heal everything (the schedule ends each fault, this covers an interrupted one).
    let _ = stop_clients.send(true);
    lab.heal();
    disk.free();
    cluster.revive_all()?;
    // Every operation in flight ends (answered, or unknown at its timeout) before the final
    // states are read: a write acknowledged after them could not be expected in them (seed 103
    // once failed lost_write on two strong writes answered 3 s after the stop, once a cluster
    // power cut had healed).
    let clients_done = tokio::time::timeout(CLIENT_TIMEOUT + CLIENTS_STOP_GRACE, async {
        while client_tasks.join_next().await.is_some() {}
    });
    if clients_done.await.is_err() {
        client_tasks.abort_all();
        bail!("workload clients did not stop within {:?} of their timeout", CLIENTS_STOP_GRACE);
    }
    python_clients.stop(CLIENT_TIMEOUT + CLIENTS_STOP_GRACE).await?;
    // A node that does not come back (konord exited on its own: it refused its data dir after a
    // power cut, say) gets no final state, which the convergence check reports.
    let mut probes = Vec::new();
    let mut answering = Vec::new();
    for (index, node) in node_ids.iter().enumerate() {
        match cluster.client(index, PROBE_TIMEOUT).await {
            Ok(probe) => {
                probes.push(probe);
                answering.push(node.clone());
            }
            Err(error) => {
                eprintln!("konor-chaos: {node} is not back after healing, so it has no final state: {error:#}")
            }
        }
    }
    // The final states must be one cut: the daemons may still commit after the clients stopped
    // (a strong write whose client timed out, say; seed 231 once read n1's final just before
    // such a commit reached every node). So they are read until every node's heads agree in
    // them, within the settle bound; the last reading is what the checker judges.
    let settle_started_ms = recorder.now_ms();
    let deadline = tokio::time::Instant::now() + options.settle;
    let (settled, finals) = loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let settled = !probes.is_empty() && settle(&probes, &answering, remaining).await;
        let mut finals = Vec::new();
        for (probe, node) in probes.iter().zip(&answering) {
            for (group, _) in GROUPS {
                match final_state(probe, node, group, &recorder).await {
                    Ok(state) => finals.push(state),
                    Err(error) => eprintln!("konor-chaos: no final state of {group} from {node}: {error:#}"),
                }
            }
        }
        if !settled || one_cut(&finals) || tokio::time::Instant::now() >= deadline {
            break (settled && one_cut(&finals), finals);
        }
    };
    let converged = settled && answering.len() == options.nodes;
    let settled_after_ms = recorder.now_ms() - settle_started_ms;
    for state in finals {
        recorder.write(&Record::Final(state))?;
    }
    faults::record_exits(&mut cluster, &recorder)?;
    let _ = stop_observers.send(true);
    let joined = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} });
    if joined.await.is_err() {
        tasks.abort_all();
    }
    let counts = recorder.counts();
    Ok(RunSummary { run_dir, counts, faults_ran, converged, settled_after_ms })
}

/// Whether every group's final states name the same heads.
fn one_cut(finals: &[FinalState]) -> bool {
    GROUPS.iter().all(|(group, _)| {
        let mut heads = finals.iter().filter(|state| state.group == *group).map(|state| &state.heads);
        heads.next().is_none_or(|first| heads.all(|other| other == first))
    })
}

/// The node (index) whose data dir is on the small tmpfs, drawn from the seed.
pub fn disk_node(seed: u64, nodes: usize) -> usize {
    StdRng::seed_from_u64(seed).random_range(0..nodes)
}

/// Makes an empty run dir, clearing what an earlier run of the same seed left (its processes
/// and tmpfs first).
fn prepare_run_dir(out: &Path) -> anyhow::Result<PathBuf> {
    if out.exists() {
        crate::cleanup::kill_listed(out);
        let absolute = std::fs::canonicalize(out)?;
        for mount in crate::cleanup::suite_mounts() {
            if Path::new(&mount).starts_with(&absolute) {
                crate::lab::run_quietly("umount", &["-l", &mount]);
            }
        }
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::canonicalize(out).context("resolving the run dir")
}

/// Waits until every node sees every node live.
async fn await_mesh(clients: &[Client]) {
    loop {
        let mut whole = true;
        for client in clients {
            let live = match client.call(Request::Nodes).await {
                Ok(Response::Nodes { nodes }) => nodes.iter().filter(|n| n.state == "live").count(),
                _ => 0,
            };
            whole &= live == clients.len();
        }
        if whole {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates `group` on the first node and joins it on the others with its key, then waits until
/// every node counts every member live (as node/tests/it/harness.rs `group_on_all` does).
async fn group_on_all(clients: &[Client], group: &str, mode: &str) -> anyhow::Result<()> {
    let request = Request::GroupCreate {
        name: group.into(),
        mode: mode.into(),
        key: None,
        evict_after_ms: None,
        fencing: None,
        release: None,
    };
    let Response::GroupCreated { key, .. } = clients[0].call(request).await? else {
        bail!("creating {group}: unexpected answer");
    };
    for client in &clients[1..] {
        // A fresh group is known to peers once its gossip spreads; the join waits for that, and
        // is tried again if it came too early.
        loop {
            match client.call(Request::GroupJoin { name: group.into(), key: key.clone() }).await {
                Ok(Response::Joined { .. }) => break,
                Ok(other) => bail!("joining {group}: unexpected answer `{}`", other.kind()),
                Err(error) => {
                    tracing::debug!(%error, "join not yet possible");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    for client in clients {
        loop {
            match client.call(Request::Status { group: group.into() }).await {
                Ok(Response::Status { live, .. }) if live.len() == clients.len() => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// Each node's own heads of `group` (None when it does not answer).
async fn own_heads(client: &Client, node: &str, group: &str) -> Option<String> {
    match client.call(Request::Status { group: group.into() }).await {
        Ok(Response::Status { nodes, .. }) => nodes.into_iter().find(|row| row.node == node).map(|row| row.heads),
        _ => None,
    }
}

/// Waits until every node answers with the same heads for every group, at most `bound`;
/// returns whether they agreed.
async fn settle(clients: &[Client], nodes: &[String], bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let mut agreed = true;
        for (group, _) in GROUPS {
            let mut heads = Vec::new();
            for (client, node) in clients.iter().zip(nodes) {
                heads.push(own_heads(client, node, group).await);
            }
            agreed &= heads[0].is_some() && heads.iter().all(|h| *h == heads[0]);
        }
        if agreed {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One node's final state of a group: heads from `status`, settings from `snapshot`, versions
/// from `history`.
async fn final_state(client: &Client, node: &str, group: &str, recorder: &Recorder) -> anyhow::Result<FinalState> {
    // Stamped before the first read: a write acknowledged after this may or may not be in it.
    let at_ms = recorder.now_ms();
    let heads = own_heads(client, node, group).await.context("status did not name this node's heads")?;
    let snapshot = client.snapshot(group).await?;
    let settings = snapshot
        .settings
        .iter()
        .map(|(key, value)| {
            let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
            (key.clone(), text)
        })
        .collect();
    let Response::History { versions, .. } = client.call(Request::History { group: group.into() }).await? else {
        bail!("history: unexpected answer");
    };
    let versions = versions
        .into_iter()
        .map(|row| FinalVersion { label: row.label, parents: row.parents, content_hash: row.content_hash })
        .collect();
    Ok(FinalState { node: node.to_owned(), group: group.to_owned(), at_ms, heads, settings, versions })
}
