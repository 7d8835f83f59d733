//! Simulated nodes: each is the real `konor_node::daemon::run_node` spawned as a task on the
//! simulation's runtime, with an in-memory network handle, a data dir on tmpfs, a fixed
//! wall-clock base and a seed drawn from the run seed, and a storage hook onto the simulated disk
//! ([`crate::disk`]). Nodes crash (the task is aborted: memory is lost, and the files lose what
//! was written but not fsynced, as after a power cut), restart (run_node again on the same data dir) and
//! pause (the daemon task is not polled and its network is held, as after SIGSTOP).
//!
//! Pause, precisely: the daemon's own task is frozen (never polled while paused; its timers
//! fire late on resume, as a stopped process's do), frames to the node are held and released on
//! resume, and frames from it are dropped. chitchat's gossip task, which chitchat spawns on its
//! own, cannot be frozen from outside: it keeps its timers but can neither send nor receive.
//!
//! Clocks do not drift: every node reads the one paused tokio clock (its daemon counts
//! milliseconds from its own start, and wall-clock stamps are the fixed base plus that).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use konor_crdt::Millis;
use konor_node::api::socket::{ClientInfo, LocalCall};
use konor_node::daemon::{NodeParts, StoreIo, run_node};
use konor_node::peer::transport::Inbox;
use konor_sdk::protocol::{Request, Response};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::RunConfig;
use crate::disk::Disk;
use crate::network::{SimNetwork, node_addr};
use crate::rng::mix64;

/// The wall clock every node starts from: 2024-01-01T00:00:00Z, fixed so stamps repeat.
pub const WALL_BASE: Millis = Millis(1_704_067_200_000);

/// Frames buffered per inbox channel, as the QUIC transport's `INCOMING_QUEUE_MAX`.
const INBOX_FRAMES_MAX: usize = 4096;

/// Local calls queued per node, as konord's call queue.
const CALL_QUEUE_MAX: usize = 1024;

/// Seed addresses each node starts with (the first nodes of the mesh).
const SEEDS_MAX: usize = 3;

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Life {
    /// Not running (never started, crashed, or exited).
    Down,
    /// Running.
    Up,
    /// Stopped (SIGSTOP-like).
    Paused,
}

/// A gate that freezes a future: while closed, the future is not polled.
#[derive(Debug, Default)]
struct Gate {
    state: Mutex<(bool, Option<Waker>)>,
}

impl Gate {
    fn set_paused(&self, paused: bool) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            state.0 = paused;
            if paused { None } else { state.1.take() }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// `inner`, polled only while its gate is open.
struct Pausable<F> {
    inner: Pin<Box<F>>,
    gate: Arc<Gate>,
}

impl<F: Future> Future for Pausable<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        {
            let mut state = self.gate.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if state.0 {
                state.1 = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

/// One simulated node.
#[derive(Debug)]
pub struct SimNode {
    /// Node id (`n17`).
    pub id: String,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Where it stands.
    pub life: Life,
    /// Starts so far (1 after the first start).
    pub starts: u64,
    /// Simulated time of the last start, in microseconds.
    pub started_us: u64,
    /// Simulated time of the last pause or resume, in microseconds.
    pub paused_changed_us: u64,
    /// How its last run ended, if it ended on its own (error text).
    pub exit: Rc<RefCell<Option<String>>>,
    calls: Option<mpsc::Sender<LocalCall>>,
    task: Option<JoinHandle<()>>,
    gate: Option<Arc<Gate>>,
    shutdown: Option<watch::Sender<bool>>,
}

/// Every node of the run.
#[derive(Debug)]
pub struct Cluster {
    /// The network.
    pub network: SimNetwork,
    /// The nodes' disks.
    pub disk: Disk,
    /// The nodes, by index.
    pub nodes: Vec<SimNode>,
    seed: u64,
    gossip_interval: Duration,
    membership_poll: Duration,
    next_connection: u64,
    regions: usize,
}

/// A node's labels: `sim=1`, `parity=even|odd` (by index: the gated group's overlays select
/// on it), and `region=rK` (K = index mod `regions`) when regions are asked for.
pub fn region_labels(index: usize, regions: usize) -> BTreeMap<String, String> {
    let parity = if index.is_multiple_of(2) { "even" } else { "odd" };
    let mut labels = BTreeMap::from([("sim".to_owned(), "1".to_owned()), ("parity".to_owned(), parity.to_owned())]);
    if regions > 0 {
        labels.insert("region".to_owned(), format!("r{}", index % regions));
    }
    labels
}

/// Node ids are short (`n0` ... `n999`): chitchat's digest holds every id and must fit one
/// 65,507-byte message (FACTS), so short ids leave the most room.
pub fn node_id(index: usize) -> String {
    format!("n{index}")
}

impl Cluster {
    /// A cluster of `config.nodes` nodes (none started) with data dirs under `base`.
    pub fn new(config: &RunConfig, base: &Path, trace: crate::trace::Trace) -> Cluster {
        let ids: Vec<String> = (0..config.nodes).map(node_id).collect();
        let dirs: Vec<PathBuf> = ids.iter().map(|id| base.join(id)).collect();
        let disk = Disk::new(config.seed, &dirs, config.check_disk);
        let network = SimNetwork::new(config, &ids, &disk, trace);
        let nodes = ids
            .into_iter()
            .zip(dirs)
            .map(|(id, data_dir)| SimNode {
                id,
                data_dir,
                life: Life::Down,
                starts: 0,
                started_us: 0,
                paused_changed_us: 0,
                exit: Rc::new(RefCell::new(None)),
                calls: None,
                task: None,
                gate: None,
                shutdown: None,
            })
            .collect();
        Cluster {
            network,
            disk,
            nodes,
            seed: config.seed,
            gossip_interval: config.gossip_interval,
            membership_poll: config.membership_poll(),
            next_connection: 0,
            regions: config.regions,
        }
    }

    /// Starts (or restarts) node `index` on its data dir. It must be down.
    pub fn start(&mut self, index: usize) {
        let count = self.nodes.len();
        let seeds = (0..count.min(SEEDS_MAX)).filter(|&i| i != index).map(node_addr).collect();
        let now_us = self.network.lock().now_us();
        let gossip_interval = self.gossip_interval;
        let membership_poll = self.membership_poll;
        let node_seed_base = self.seed;
        let (gossip_tx, gossip_rx) = mpsc::channel(INBOX_FRAMES_MAX);
        let (replica_tx, replica_rx) = mpsc::channel(INBOX_FRAMES_MAX);
        let handle = self.network.attach(index, gossip_tx, replica_tx);
        let node = &mut self.nodes[index];
        node.starts += 1;
        node.started_us = now_us;
        node.life = Life::Up;
        let (calls_tx, calls_rx) = mpsc::channel(CALL_QUEUE_MAX);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut seed = [0u8; 32];
        let base = mix64(node_seed_base ^ mix64(index as u64) ^ mix64(node.starts.wrapping_mul(0x5151)));
        for (i, chunk) in seed.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&mix64(base.wrapping_add(i as u64)).to_le_bytes());
        }
        let parts = NodeParts {
            node_id: node.id.clone(),
            data_dir: node.data_dir.clone(),
            seeds,
            cluster: "konor-sim".to_owned(),
            gossip_interval,
            labels: region_labels(index, self.regions),
            network: Arc::new(handle),
            inbox: Inbox { gossip: gossip_rx, replica: replica_rx },
            calls: calls_rx,
            seed,
            wall_base: Some(WALL_BASE),
            membership_poll,
            // A blocking thread would finish at a real-time moment: the run would not replay.
            store_io: StoreIo::Inline,
            // The simulator's reads go through the daemon task.
            reads: None,
            storage_hook: Some(self.disk.hook(index, {
                let network = self.network.clone();
                Arc::new(move |note: &str| network.trace_event(note))
            })),
            gossip_seal: Arc::new(konor_node::peer::gossip_seal::SimSeal::new(&node.id)),
            // One runtime: gossip and daemon interleave as the seed says.
            gossip_runtime: None,
            metrics: Default::default(),
            webhooks: None,
            keep_history: false,
            revocations: None,
            signer: None,
            mesh_nodes_max: konor_node::limits::MESH_NODES_MAX,
            audit: None,
        };
        let gate = Arc::new(Gate::default());
        let exit = node.exit.clone();
        exit.replace(None);
        let future = Pausable { inner: Box::pin(run_node(parts, shutdown_rx)), gate: gate.clone() };
        let task = tokio::task::spawn_local(async move {
            let result = future.await;
            let text = match result {
                Ok(()) => "stopped".to_owned(),
                Err(error) => format!("{error:#}"),
            };
            exit.replace(Some(text));
        });
        node.calls = Some(calls_tx);
        node.task = Some(task);
        node.gate = Some(gate);
        node.shutdown = Some(shutdown_tx);
    }

    /// Crashes node `index`: detaches it from the network and takes its task to abort. The
    /// caller awaits the returned handle (so the node's files are closed before a restart).
    pub fn crash(&mut self, index: usize) -> Option<JoinHandle<()>> {
        self.network.detach(index);
        let node = &mut self.nodes[index];
        node.life = Life::Down;
        node.calls = None;
        node.gate = None;
        node.shutdown = None;
        let task = node.task.take()?;
        task.abort();
        Some(task)
    }

    /// Pauses or resumes node `index` (no effect on a down node).
    pub fn set_paused(&mut self, index: usize, paused: bool) {
        let now_us = self.network.lock().now_us();
        let node = &mut self.nodes[index];
        if node.life == Life::Down {
            return;
        }
        node.life = if paused { Life::Paused } else { Life::Up };
        node.paused_changed_us = now_us;
        if let Some(gate) = &node.gate {
            gate.set_paused(paused);
        }
        self.network.set_paused(index, paused);
    }

    /// A sender of local calls to node `index`, and a fresh client identity, if it is not down.
    pub fn caller(&mut self, index: usize) -> Option<(mpsc::Sender<LocalCall>, ClientInfo)> {
        let calls = self.nodes.get(index)?.calls.clone()?;
        self.next_connection += 1;
        let client = ClientInfo {
            connection: self.next_connection,
            pid: 40_000 + (self.next_connection % 20_000) as u32,
            process: "konor-sim".to_owned(),
            uid: None,
            user: None,
            reveal: true,
        };
        Some((calls, client))
    }

    /// Indices of nodes in `life`.
    pub fn indices(&self, life: Life) -> Vec<usize> {
        self.nodes.iter().enumerate().filter(|(_, n)| n.life == life).map(|(i, _)| i).collect()
    }

    /// Nodes that stopped on their own since the last look: (index, why). They are marked down.
    pub fn take_exits(&mut self) -> Vec<(usize, String)> {
        let mut exits = Vec::new();
        for (index, node) in self.nodes.iter_mut().enumerate() {
            if node.life != Life::Down
                && let Some(text) = node.exit.borrow_mut().take()
            {
                exits.push((index, text));
            }
        }
        for (index, _) in &exits {
            self.network.detach(*index);
            let node = &mut self.nodes[*index];
            node.life = Life::Down;
            node.calls = None;
            node.task = None;
            node.gate = None;
            node.shutdown = None;
        }
        exits
    }
}

/// Sends `request` to node `index` and waits for the answer; `None` when the node is down or
/// went down before answering.
pub async fn call(cluster: &Rc<RefCell<Cluster>>, index: usize, request: Request) -> Option<Response> {
    let (calls, client) = cluster.borrow_mut().caller(index)?;
    let (reply, answer) = oneshot::channel();
    calls.send(LocalCall::Request { client, request, reply }).await.ok()?;
    answer.await.ok()
}

/// Crashes node `index` and waits until its task is gone (its files closed, its lock released),
/// then cuts its disk back to what was durable, as a power cut would ([`Disk::crash`]).
pub async fn crash(cluster: &Rc<RefCell<Cluster>>, index: usize) {
    let task = cluster.borrow_mut().crash(index);
    let Some(task) = task else { return };
    let _ = task.await;
    let cluster = cluster.borrow();
    let notes = cluster.disk.crash(index);
    let mut hub = cluster.network.lock();
    let now = hub.now_us();
    for note in notes {
        hub.trace.event(now, &format!("crash n{index} disk: {note}"));
    }
}
