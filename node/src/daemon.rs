//! The daemon: one task owns the [`Replica`] and waits on a closed set of events (local calls,
//! peer frames, membership views, timers). It executes the replica's outputs in order (persist
//! before send before reply; a run of appends is written with one fsync per file, and the
//! outputs between them wait for it) and answers local reads from the replica's documents.
//! It makes no protocol decisions: those are in konor-crdt.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use konor_crdt::configuration::{Fencing, GroupPolicy};
use konor_crdt::replica::{
    CommandError, CommandOutcome, EventsSince, GroupGossip, LoadedState, MembershipView, Notification, PeerLiveness,
    PeerState, actor_for,
};
use konor_crdt::{
    Command, CommitMeta, EditError, FileFormat, GroupKey, Input, Millis, Mode, Output, PersistOp, Replica,
};
use konor_sdk::protocol::{
    ApplyResult, ConflictRow, ErrorCode, Freshness, GroupRow, NodeGroupRow, NodeRow, ProcessRow, Request, Response,
    VersionRow, WatchEvent,
};
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::local_api::{self, ClientInfo, LocalApiConfig, LocalCall};
use crate::peer::membership::{GROUP_LEFT, GROUP_PREFIX, Liveness, Membership, MembershipConfig, MeshView};
use crate::peer::tls;
use crate::peer::transport::{Channel, Inbox, PeerNetwork, QuicNetwork};
use crate::read_view::{Fresh, GroupRead, ReadView};
use crate::settings::DaemonSettings;
use crate::store::Store;

/// How often the membership view is read from chitchat in production. Reading it costs O(mesh
/// size); the simulator of large meshes passes a longer period.
pub const MEMBERSHIP_POLL_DEFAULT: Duration = Duration::from_millis(100);

/// Longest wait between replica ticks when it asks for none.
const TICK_MAX: Duration = Duration::from_millis(500);

/// Shortest wait between replica ticks: a replica that keeps asking for a tick already due (a
/// timer that its tick does not clear) must not spin the loop. Found by konor-sim, whose paused
/// clock never advances while a task spins.
const TICK_MIN: Duration = Duration::from_millis(1);

/// Local calls queued before socket readers wait.
const CALL_QUEUE_MAX: usize = 1024;

/// How long a graceful shutdown lets the leaving flag spread before stopping gossip.
const LEAVE_GOSSIP_ROUNDS: u32 = 3;

/// File in the data dir holding the bound QUIC address, written at start.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, bytes)?;
    std::fs::rename(&temp, path)
}

/// Counters of the daemon.
#[derive(Debug, Default)]
pub struct DaemonStats {
    /// Peer messages the replica dropped.
    pub peer_messages_dropped: AtomicU64,
    /// Persist operations that failed.
    pub persist_failures: AtomicU64,
}

/// How to shape a command's reply for the socket.
enum PendingReply {
    Plain(oneshot::Sender<Response>),
    Created {
        reply: oneshot::Sender<Response>,
        key: String,
    },
    /// A repair of a damaged group (a join with its stored key): on failure it is queued again.
    Repair {
        name: String,
        key: GroupKey,
    },
}

/// A group whose file was unreadable, to fetch again from a peer (SPEC F24). Kept across
/// restarts: the group's key stays in `groups/` while its file is in quarantine.
struct Repair {
    name: String,
    key: GroupKey,
    /// Earliest next attempt.
    next: Instant,
    /// Attempts so far (the backoff doubles with each).
    attempts: u32,
}

/// First wait before retrying a failed repair; doubled per attempt up to [`REPAIR_BACKOFF_MAX`].
const REPAIR_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// Longest wait between repair attempts: a lost group is worth a try every half minute.
const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// First wait before rewriting a group file that a failed fsync left in an unknown state; then
/// doubled per attempt up to [`REPAIR_BACKOFF_MAX`] (the disk may stay full for a while).
const REWRITE_BACKOFF_MIN: Duration = Duration::from_millis(500);

/// How long a read of a strong group with the `block` fencing policy waits for the node to be
/// fresh before it fails with `unavailable`.
const BLOCKED_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads waiting for freshness at most: beyond this, reads of a fenced `block` group fail at
/// once (the node is cut off; queueing more only delays the error).
const BLOCKED_READS_MAX: usize = 1024;

/// A read of a `block` group waiting for the node to be fresh.
struct BlockedRead {
    group: String,
    request: Request,
    client: ClientInfo,
    reply: oneshot::Sender<Response>,
    deadline: Instant,
}

/// One watcher of a group.
struct Watcher {
    connection: u64,
    events: mpsc::Sender<WatchEvent>,
}

/// A process's last report for a group (F16).
#[derive(Clone)]
struct ProcessReport {
    row: ProcessRow,
}

struct Daemon {
    node_id: String,
    replica: Replica,
    /// The replica's actor, to load group files as this node (after a failed write).
    replica_actor: konor_crdt::ActorId,
    store: Arc<std::sync::Mutex<Store>>,
    store_io: StoreIo,
    reads: Option<ReadView>,
    network: Arc<dyn PeerNetwork>,
    membership: Membership,
    mesh: MeshView,
    started: Instant,
    wall_base: Option<Millis>,
    seed: [u8; 32],
    keys_drawn: u64,
    view_delivered: bool,
    next_command: u64,
    pending: BTreeMap<u64, PendingReply>,
    watchers: BTreeMap<String, Vec<Watcher>>,
    last_change: BTreeMap<String, Instant>,
    processes: BTreeMap<String, BTreeMap<(u64, u32), ProcessReport>>,
    repairs: Vec<Repair>,
    /// Attempts of each repair so far (for its backoff).
    repair_attempts: BTreeMap<String, u32>,
    /// Groups whose file must be rewritten (a failed fsync left it unknown), with the next
    /// attempt and the current backoff.
    rewrites: BTreeMap<String, (Instant, Duration)>,
    /// Groups whose last write to disk failed, with the error: the node is degraded until a
    /// later write of that group succeeds (SPEC F24, issue 11).
    degraded: BTreeMap<String, String>,
    blocked_reads: Vec<BlockedRead>,
    /// When the replica last got a tick from the timer.
    last_tick: Instant,
    stats: Arc<DaemonStats>,
}

/// What a node needs from its environment: the seams through which network, time and
/// randomness enter (SPEC: the same node code runs in production, tests and the simulator).
pub struct NodeParts {
    /// Node id.
    pub node_id: String,
    /// Data directory (group files, identity).
    pub data_dir: std::path::PathBuf,
    /// Seed addresses.
    pub seeds: Vec<SocketAddr>,
    /// Cluster name.
    pub cluster: String,
    /// Gossip period.
    pub gossip_interval: Duration,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The peer network (QUIC in production, in-memory in the simulator).
    pub network: Arc<dyn PeerNetwork>,
    /// Its receiving ends.
    pub inbox: Inbox,
    /// Local calls (from the socket in production, from the workload in the simulator).
    pub calls: mpsc::Receiver<LocalCall>,
    /// The node's only randomness (nonces, group keys): OS entropy in production.
    pub seed: [u8; 32],
    /// Unix milliseconds at the runtime's start, for wall-clock stamps; `None` reads the
    /// system clock (production). The simulator passes a fixed value and its paused clock.
    pub wall_base: Option<Millis>,
    /// How often the membership view is refreshed from gossip.
    pub membership_poll: Duration,
    /// Where file writes and fsyncs run.
    pub store_io: StoreIo,
    /// The view the socket sessions answer `get` from (`None`: every read asks the daemon).
    pub reads: Option<ReadView>,
    /// Sees (and may fail) every write, fsync, rename and truncation of the store: the
    /// simulator's disk model. `None` in production.
    pub storage_hook: Option<Arc<dyn crate::store::StorageHook>>,
    /// Signs this node's gossip and checks its peers' (issue 12): the node's certificate in
    /// production, a stand-in in the simulator.
    pub gossip_seal: Arc<dyn crate::peer::gossip_seal::GossipSeal>,
}

/// Where the daemon's file writes and fsyncs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreIo {
    /// On a blocking thread, awaited (production): while an fsync runs, the runtime keeps
    /// sending (a writer's push leaves before its own fsync) and reading the socket.
    Blocking,
    /// On the daemon's task itself (the simulator): a thread would finish at a real-time
    /// moment and break the run's determinism.
    Inline,
}

/// Events (local calls, peer frames) handled together before their outputs run: the appends
/// they cause share one write and one fsync per group file (group commit).
const EVENTS_PER_BATCH_MAX: usize = 64;

impl std::fmt::Debug for NodeParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeParts").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// Runs konord until `shutdown` turns true: graceful leave, flush, exit.
pub async fn run(settings: DaemonSettings, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let identity = tls::load_identity(&settings.tls_dir)
        .with_context(|| format!("cannot load the node certificate from {}", settings.tls_dir.display()))?;
    anyhow::ensure!(
        identity.node_id() == settings.node_id,
        "the certificate in {} is for node {:?}, but this daemon is {:?}",
        settings.tls_dir.display(),
        identity.node_id(),
        settings.node_id
    );
    warn_on_open_permissions(&settings);
    let gossip_seal = Arc::new(crate::peer::gossip_seal::CertSeal::new(&identity)?);
    let (network, inbox) = QuicNetwork::start(&identity, settings.listen)?;
    let advertise = network.local_addr();
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("cannot create the data dir {}", settings.data_dir.display()))?;
    // Tools and tests started with `--listen 127.0.0.1:0` read the bound address here.
    write_atomically(&settings.data_dir.join(LISTEN_ADDR_FILE), advertise.to_string().as_bytes())
        .context("cannot write the listen address file")?;
    let (calls_tx, calls) = mpsc::channel(CALL_QUEUE_MAX);
    let (api_shutdown_tx, api_shutdown) = watch::channel(false);
    let reads = ReadView::default();
    let mut api_config = LocalApiConfig::new(settings.socket.clone(), settings.node_id.clone());
    api_config.mode = settings.socket_mode;
    api_config.reads = Some(reads.clone());
    let api = tokio::spawn(local_api::serve(api_config, calls_tx, api_shutdown));
    info!(node = %settings.node_id, %advertise, socket = %settings.socket.display(), "konord starting");
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let parts = NodeParts {
        node_id: settings.node_id.clone(),
        data_dir: settings.data_dir.clone(),
        seeds: settings.seeds.clone(),
        cluster: settings.cluster.clone(),
        gossip_interval: settings.gossip_interval,
        labels: settings.labels.clone(),
        network: network.clone(),
        inbox,
        calls,
        seed,
        wall_base: None,
        membership_poll: MEMBERSHIP_POLL_DEFAULT,
        store_io: StoreIo::Blocking,
        reads: Some(reads),
        storage_hook: None,
        gossip_seal,
    };
    let result = run_node(parts, shutdown).await;
    let _ = api_shutdown_tx.send(true);
    let api_result = api.await;
    let result = match (result, api_result) {
        (Err(_), Ok(Err(api_error))) => Err(api_error.context("the local socket failed")),
        (result, _) => result,
    };
    network.close().await;
    info!("konord stopped");
    result
}

/// Warns at start about secrets and doors left open (issue 12): a node key others can read
/// lets them sign gossip and hold connections as this node; a socket anyone may write to lets
/// any local user change configuration.
fn warn_on_open_permissions(settings: &DaemonSettings) {
    use std::os::unix::fs::PermissionsExt;
    let key = settings.tls_dir.join(tls::NODE_KEY_FILE);
    if let Ok(metadata) = std::fs::metadata(&key)
        && let Some(message) = open_permissions_warning(metadata.permissions().mode(), settings.socket_mode)
    {
        warn!(key = %key.display(), "{message}");
    } else if let Some(message) = open_permissions_warning(0o600, settings.socket_mode) {
        warn!("{message}");
    }
}

/// What is wrong with a node key of mode `key_mode` and a socket of mode `socket_mode`, if
/// anything.
fn open_permissions_warning(key_mode: u32, socket_mode: u32) -> Option<String> {
    let mut problems = Vec::new();
    if key_mode & 0o077 != 0 {
        problems.push(format!(
            "the node key is readable by others (mode {:o}): whoever reads it can pose as this node; chmod 600 it",
            key_mode & 0o777
        ));
    }
    if socket_mode & 0o002 != 0 {
        problems.push(format!(
            "the socket mode {socket_mode:o} lets every local user change configuration; use 600, or 660 with a group"
        ));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Runs one node on the given seams until `shutdown` turns true (graceful leave) or its gossip
/// task dies (an error: the supervisor restarts the node).
pub async fn run_node(parts: NodeParts, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let NodeParts {
        node_id,
        data_dir,
        seeds,
        cluster,
        gossip_interval,
        labels,
        network,
        inbox,
        mut calls,
        seed,
        wall_base,
        membership_poll,
        store_io,
        reads,
        storage_hook,
        gossip_seal,
    } = parts;
    let Inbox { gossip, mut replica } = inbox;
    let mut store = match storage_hook {
        Some(hook) => Store::open_with_hook(&data_dir, &node_id, hook)?,
        None => Store::open(&data_dir, &node_id)?,
    };
    // The incarnation makes the actor unique per start; the seed also covers a data dir that
    // was wiped or restored from an old backup (FACTS: never reuse an actor).
    let actor = actor_for(&format!("{node_id}/{}", konor_crdt::settings::hex_of(&seed[..8])), store.incarnation());
    let (loaded, repair_list) = load_groups(&mut store, &actor)?;
    let repairs =
        repair_list.into_iter().map(|(name, key)| Repair { name, key, next: Instant::now(), attempts: 0 }).collect();
    let membership_config = MembershipConfig {
        node_id: node_id.clone(),
        generation: store.incarnation(),
        advertise: network.local_addr(),
        seeds,
        cluster_id: cluster,
        gossip_interval,
        labels,
        poll_period: membership_poll,
        seal: gossip_seal,
    };
    let membership = Membership::start(membership_config, network.clone(), gossip).await?;
    let mut replica_state = Replica::new(node_id.clone(), actor.clone(), seed, loaded);
    let started = Instant::now();
    let wall_now = match wall_base {
        Some(base) => base,
        None => system_clock(),
    };
    replica_state.set_wall_offset(wall_now.0);
    let mut daemon = Daemon {
        node_id: node_id.clone(),
        replica: replica_state,
        replica_actor: actor,
        store: Arc::new(std::sync::Mutex::new(store)),
        store_io,
        reads,
        network,
        membership,
        mesh: MeshView::default(),
        started,
        wall_base,
        seed,
        keys_drawn: 0,
        view_delivered: false,
        next_command: 0,
        pending: BTreeMap::new(),
        watchers: BTreeMap::new(),
        last_change: BTreeMap::new(),
        processes: BTreeMap::new(),
        repairs,
        repair_attempts: BTreeMap::new(),
        rewrites: BTreeMap::new(),
        degraded: BTreeMap::new(),
        blocked_reads: Vec::new(),
        last_tick: Instant::now(),
        stats: Arc::new(DaemonStats::default()),
    };
    info!(node = %node_id, "node running");
    daemon.execute_outputs().await;
    let mut membership_poll = tokio::time::interval(membership_poll);
    membership_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let gossip_ended = daemon.membership.termination();
    tokio::pin!(gossip_ended);
    loop {
        let timeout = daemon.tick_deadline();
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            call = calls.recv() => match call {
                Some(call) => daemon.handle_call(call),
                None => {
                    // The socket server ended (it failed to bind, or crashed): without it no
                    // application can read, so the node stops with an error.
                    error!("local API stopped");
                    anyhow::bail!("the local API stopped; see the log line before this one");
                }
            },
            incoming = replica.recv() => {
                let Some(incoming) = incoming else { break };
                let now = daemon.now();
                daemon.replica.handle(now, Input::Peer { from: incoming.from, bytes: incoming.bytes });
            }
            _ = membership_poll.tick() => daemon.refresh_membership().await,
            _ = tokio::time::sleep_until(timeout) => {
                let now = daemon.now();
                daemon.last_tick = Instant::now();
                daemon.replica.handle(now, Input::Tick);
                daemon.rewrite_due_files().await;
            }
            result = &mut gossip_ended => {
                // FACTS: a dead gossip task must never go unnoticed; without membership the
                // node cannot tell live peers, so it stops and lets its supervisor restart it.
                error!(?result, "gossip task ended; stopping the node");
                anyhow::bail!("gossip task ended: {result:?}");
            }
        }
        // Whatever else is already waiting joins this batch, so its appends share the fsync.
        // A call answered from the current state (a read, a watch) waits until the batch's
        // outputs ran: it must not see changes that are not durable yet.
        let mut read_after_batch = None;
        for _ in 1..EVENTS_PER_BATCH_MAX {
            let mut handled = false;
            if read_after_batch.is_none()
                && let Ok(call) = calls.try_recv()
            {
                if answers_from_state(&call) {
                    read_after_batch = Some(call);
                } else {
                    daemon.handle_call(call);
                }
                handled = true;
            }
            if let Ok(incoming) = replica.try_recv() {
                let now = daemon.now();
                daemon.replica.handle(now, Input::Peer { from: incoming.from, bytes: incoming.bytes });
                handled = true;
            }
            if !handled {
                break;
            }
        }
        daemon.execute_outputs().await;
        if let Some(call) = read_after_batch {
            daemon.handle_call(call);
            daemon.execute_outputs().await;
        }
        daemon.answer_blocked_reads();
    }
    info!("shutting down: announcing leave");
    daemon.membership.set_leaving().await;
    tokio::time::sleep(gossip_interval * LEAVE_GOSSIP_ROUNDS).await;
    daemon.membership.shutdown().await;
    Ok(())
}

/// True for a call the daemon answers at once from its state (reads, watches), false for
/// commands whose answer follows their persist. Unknown kinds count as reads: deferring one is
/// always safe.
fn answers_from_state(call: &LocalCall) -> bool {
    match call {
        LocalCall::Request { request, .. } => !matches!(
            request,
            Request::Set { .. }
                | Request::Delete { .. }
                | Request::Apply { .. }
                | Request::Rollback { .. }
                | Request::GroupCreate { .. }
                | Request::GroupJoin { .. }
                | Request::GroupLeave { .. }
                | Request::GroupRemove { .. }
        ),
        LocalCall::Watch { .. } => true,
        LocalCall::Disconnected { .. } => false,
    }
}

/// Groups loaded at start, and groups to repair from peers (name and stored key).
type LoadedGroups = (BTreeMap<String, LoadedState>, Vec<(String, GroupKey)>);

/// Loads every group file; a damaged tail is cut (and reported), an unreadable file is moved
/// aside and queued for repair from peers with its stored key.
fn load_groups(store: &mut Store, actor: &konor_crdt::ActorId) -> anyhow::Result<LoadedGroups> {
    let mut loaded = BTreeMap::new();
    let mut repairs = Vec::new();
    for name in store.list_groups()? {
        let key = match store.read_group_key(&name)?.map(|text| GroupKey::parse(&text)) {
            Some(Ok(key)) => key,
            _ => {
                error!(group = %name, "group key missing or unreadable; the group is not served");
                continue;
            }
        };
        let bytes = store.read_group(&name)?;
        match konor_crdt::load_group_file(&bytes, actor.clone()) {
            Ok(file) => {
                if let Some(dropped) = file.dropped {
                    warn!(group = %name, %dropped, "group file damaged: the intact prefix is kept, the rest comes back from peers");
                    store.truncate_group(&name, file.valid_bytes)?;
                }
                let state = LoadedState {
                    damaged: file.dropped.is_some(),
                    doc: file.group,
                    key,
                    tail_changes: file.tail_changes,
                    sync_states: store.read_sync_states(&name).unwrap_or_default(),
                    staged: file.staged,
                    decisions: file.decisions,
                    known_members: store.read_members(&name).into_iter().collect(),
                    ballots: file.ballots,
                };
                loaded.insert(name, state);
            }
            Err(error) => {
                let moved = store.quarantine_group(&name)?;
                error!(group = %name, %error, moved = %moved.display(), "group file unreadable; moved aside, repairing from peers");
                repairs.push((name, key));
            }
        }
    }
    // A key without a group file: a group quarantined by an earlier start whose repair never
    // finished. The repair queue survives restarts this way.
    for name in store.list_group_keys()? {
        if loaded.contains_key(&name) || repairs.iter().any(|(pending, _)| *pending == name) {
            continue;
        }
        if let Some(Ok(key)) = store.read_group_key(&name)?.map(|text| GroupKey::parse(&text)) {
            warn!(group = %name, "group file missing (quarantined earlier): repairing from peers");
            repairs.push((name, key));
        }
    }
    Ok((loaded, repairs))
}

/// The group a persist operation writes.
fn persist_op_group(op: &PersistOp) -> &str {
    match op {
        PersistOp::CreateGroup { group, .. }
        | PersistOp::Append { group, .. }
        | PersistOp::Compact { group, .. }
        | PersistOp::RemoveGroup { group }
        | PersistOp::Members { group, .. }
        | PersistOp::SyncState { group, .. } => group,
    }
}

/// What an operator reads when a write to disk failed: a full disk named as such.
fn persist_error_text(group: &str, error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    let full = text.contains("No space left") || text.contains("os error 28") || text.contains("quota");
    if full {
        format!("disk full while saving group {group:?} on this node ({text}); free space in the data dir")
    } else {
        format!("could not save group {group:?} on this node ({text})")
    }
}

fn system_clock() -> Millis {
    Millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

fn error_response(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

fn command_error_response(error: &CommandError) -> Response {
    let code = match error {
        CommandError::UnknownGroup(_) => ErrorCode::UnknownGroup,
        CommandError::AlreadyExists(_) | CommandError::JoinInProgress(_) => ErrorCode::AlreadyExists,
        CommandError::Edit(EditError::Unchanged) => ErrorCode::Unchanged,
        CommandError::Edit(EditError::NoSuchKey { .. }) => ErrorCode::NotFound,
        CommandError::Edit(EditError::Version(konor_crdt::VersionError::Unknown { .. })) => ErrorCode::NotFound,
        CommandError::Edit(_) => ErrorCode::BadRequest,
        CommandError::JoinRefused { .. } => ErrorCode::Forbidden,
        CommandError::JoinUnavailable(_) => ErrorCode::Unavailable,
        CommandError::NotCommitted { .. } => ErrorCode::NotCommitted,
        CommandError::RoundAborted { .. } => ErrorCode::Aborted,
        CommandError::RoundInProgress { .. } => ErrorCode::Busy,
        CommandError::OutcomeUnknown { .. } => ErrorCode::OutcomeUnknown,
        CommandError::NotDurable(_) => ErrorCode::NotDurable,
        CommandError::NotAMember { .. } => ErrorCode::Unavailable,
        CommandError::LeaveFailed { .. } => ErrorCode::Unavailable,
        CommandError::NoConfiguration(_) | CommandError::BadRequest(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    error_response(code, error.to_string())
}

impl Daemon {
    /// Wall-clock Unix milliseconds for stamps (version times, reports): the system clock, or
    /// the simulator's base plus its paused clock.
    fn wall_clock(&self) -> Millis {
        match self.wall_base {
            Some(base) => Millis(base.0 + self.started.elapsed().as_millis() as u64),
            None => system_clock(),
        }
    }

    /// A fresh group key drawn from the node's seed.
    fn draw_key(&mut self) -> GroupKey {
        self.keys_drawn += 1;
        let mut bytes = konor_crdt::join::derive_nonce(&self.seed, u64::MAX - self.keys_drawn);
        // Domain-separate keys from the replica's nonces (which count up from 1).
        bytes[0] ^= 0x4b;
        GroupKey::from_bytes(bytes)
    }

    fn now(&self) -> Millis {
        Millis(self.started.elapsed().as_millis() as u64)
    }

    /// When the next tick is due: the replica's next timer, and at the latest `TICK_MAX` after
    /// the last tick. The cap counts from the last tick, not from now: the loop wakes every
    /// membership poll (100 ms), and a cap from now would move away at each wake, so a replica
    /// without timers (and the shell's own upkeep: rewriting files after a failed fsync) would
    /// never tick (found by the simulator's disk faults: a degraded node never rewrote its file).
    fn tick_deadline(&self) -> Instant {
        let now = self.now();
        let latest = self.last_tick + TICK_MAX;
        let at = match self.replica.poll_timeout() {
            Some(at) => (Instant::now() + Duration::from_millis(at.0.saturating_sub(now.0))).min(latest),
            None => latest,
        };
        at.max(Instant::now() + TICK_MIN)
    }

    fn command(&mut self, command: Command, reply: PendingReply) {
        self.next_command += 1;
        let id = self.next_command;
        self.pending.insert(id, reply);
        let now = self.now();
        self.replica.handle(now, Input::Command { id, command });
    }

    async fn refresh_membership(&mut self) {
        let view = self.membership.view().await;
        if view.over_cap && !self.mesh.over_cap {
            error!(nodes = view.nodes.len(), "mesh reached its node cap; larger meshes are not supported");
        }
        let mut peers = BTreeMap::new();
        for node in view.nodes.values().filter(|n| n.id != self.node_id) {
            let groups = node
                .groups
                .iter()
                .filter_map(|(g, v)| GroupGossip::parse(v).map(|gossip| (g.clone(), gossip)))
                .collect();
            let liveness = match node.liveness {
                Liveness::Live => PeerLiveness::Live,
                Liveness::Unknown => PeerLiveness::Unknown,
                // A leaving peer is gone for quorums as soon as it says so.
                Liveness::Dead | Liveness::Leaving => PeerLiveness::Dead,
            };
            peers.insert(node.id.clone(), PeerState { liveness, groups, left: node.left_groups.clone() });
        }
        let membership = MembershipView { peers };
        self.mesh = view;
        // The first view always goes in, even an empty one: a node alone in its mesh must learn
        // that it has seen its view (strong groups stay fenced until then).
        if !self.view_delivered || &membership != self.replica.membership() {
            self.view_delivered = true;
            let now = self.now();
            self.replica.handle(now, Input::Membership(membership));
        }
        // Groups found damaged are repaired by joining again once a peer holds them; a failed
        // attempt comes back here with a longer wait.
        let now = Instant::now();
        let repairs = std::mem::take(&mut self.repairs);
        for repair in repairs {
            let available =
                self.mesh.nodes.values().any(|n| n.liveness == Liveness::Live && n.groups.contains_key(&repair.name));
            if available && repair.next <= now && self.replica.group(&repair.name).is_none() {
                info!(group = %repair.name, attempt = repair.attempts + 1, "repairing damaged group from a peer");
                let command = Command::JoinGroup { name: repair.name.clone(), key: repair.key.clone(), repair: true };
                self.repair_attempts.insert(repair.name.clone(), repair.attempts + 1);
                self.command(command, PendingReply::Repair { name: repair.name, key: repair.key });
            } else if self.replica.group(&repair.name).is_none() {
                self.repairs.push(repair);
            }
        }
    }

    fn peer_addr(&self, node: &str) -> Option<SocketAddr> {
        self.mesh.nodes.get(node).map(|n| n.addr)
    }

    /// Runs the replica's outputs in order, except that a run of appends is written together:
    /// every append up to the next other persist operation goes into one write and one fsync
    /// per group file, and the outputs between them wait until that is durable. Waiting longer
    /// is always safe (an ack, a reply or a heads digest only ever follows its fsync), and
    /// concurrent writers share the cost of the fsync.
    async fn execute_outputs(&mut self) {
        // Stale flags first: a vote or an acceptance about to leave makes this node in doubt,
        // and no read may be served as fresh once it is (the commit may be reported any moment).
        // Flags only: the contents follow the notifications, which run after their persists.
        self.settle_freshness();
        let mut persist_failed: Option<String> = None;
        let mut failed_groups: Vec<String> = Vec::new();
        let mut outputs: std::collections::VecDeque<Output> =
            std::iter::from_fn(|| self.replica.poll_output()).collect();
        loop {
            let Some(output) = outputs.pop_front() else {
                // Outputs queued while these ran (a resumed apply) run in the same batch.
                outputs.extend(std::iter::from_fn(|| self.replica.poll_output()));
                if outputs.is_empty() {
                    break;
                }
                continue;
            };
            match output {
                Output::Persist(PersistOp::Append { group, records }) => {
                    let mut appends: Vec<(String, Vec<u8>)> = vec![(group, records)];
                    // Each waiting output with the number of appends that came before it.
                    let mut waiting: Vec<(usize, Output)> = Vec::new();
                    let mut resume = false;
                    while let Some(next) = outputs.pop_front() {
                        match next {
                            Output::Persist(PersistOp::Append { group, records }) => appends.push((group, records)),
                            Output::Persist(other) => {
                                outputs.push_front(Output::Persist(other));
                                break;
                            }
                            Output::Resume => {
                                resume = true;
                                break;
                            }
                            other => waiting.push((appends.len(), other)),
                        }
                    }
                    let order: Vec<String> = appends.iter().map(|(group, _)| group.clone()).collect();
                    let writing = self.start_appends(appends);
                    if resume {
                        // The replica applies while the fsync runs. What it queues belongs to its
                        // newest deferred apply, which is the last event of the batch (a later
                        // event would have finished it): those outputs go to the back, after
                        // everything already queued, and run once the fsync is done.
                        let now = self.now();
                        self.replica.handle(now, Input::Resume);
                        outputs.extend(std::iter::from_fn(|| self.replica.poll_output()));
                    }
                    let failed = writing.await;
                    for (group, error) in &failed {
                        if let Some(reads) = &self.reads {
                            reads.remove(group);
                        }
                        self.mark_degraded(group, error);
                    }
                    if failed.is_empty() {
                        for group in &order {
                            self.clear_degraded(group);
                        }
                    }
                    // As if run one by one: outputs before the first failed append go out as
                    // usual, the ones after it see the failure.
                    let first_failed = order.iter().position(|group| failed.iter().any(|(g, _)| g == group));
                    for (appends_before, output) in waiting {
                        if persist_failed.is_none()
                            && let Some(index) = first_failed
                            && appends_before > index
                        {
                            persist_failed = failed.first().map(|(_, error)| error.clone());
                        }
                        self.execute_plain(output, persist_failed.as_deref()).await;
                    }
                    if persist_failed.is_none() && first_failed.is_some() {
                        persist_failed = failed.first().map(|(_, error)| error.clone());
                    }
                    failed_groups.extend(failed.into_iter().map(|(group, _)| group));
                }
                Output::Persist(op) => {
                    if let PersistOp::RemoveGroup { group } = &op
                        && let Some(reads) = &self.reads
                    {
                        reads.remove(group);
                    }
                    let group = persist_op_group(&op).to_owned();
                    let create_or_compact = matches!(op, PersistOp::CreateGroup { .. } | PersistOp::Compact { .. });
                    // Best effort: a lost sync state costs a larger sync, lost members a less
                    // careful first second after a restart.
                    let sync_state = matches!(op, PersistOp::SyncState { .. } | PersistOp::Members { .. });
                    match self.persist(op).await {
                        Ok(()) if create_or_compact => self.clear_degraded(&group),
                        Ok(()) => {}
                        // A sync state is an optimisation: losing one costs a larger sync.
                        Err(error) if sync_state => warn!(%group, %error, "could not save a sync state"),
                        Err(error) => {
                            let text = persist_error_text(&group, &error);
                            self.mark_degraded(&group, &text);
                            persist_failed = Some(text);
                            failed_groups.push(group);
                        }
                    }
                }
                other => self.execute_plain(other, persist_failed.as_deref()).await,
            }
        }
        if let Some(error) = persist_failed {
            // Whatever was not made durable is dropped from memory: the replica reloads the
            // groups from their files and fails what depended on them.
            failed_groups.sort();
            failed_groups.dedup();
            for group in failed_groups {
                let reloaded = self.reload_group(&group).await;
                let now = self.now();
                let input = Input::PersistFailed { group, error: error.clone(), reloaded: reloaded.map(Box::new) };
                self.replica.handle(now, input);
            }
            // Their outputs (error answers, the durable gossip) run in a batch of their own.
            Box::pin(self.execute_outputs()).await;
            return;
        }
        self.settle_reads();
    }

    /// A group as its file holds it now (what is durable), for the replica after a failed
    /// persist; `None` when the file cannot be read (it is then repaired from peers).
    async fn reload_group(&mut self, group: &str) -> Option<LoadedState> {
        let name = group.to_owned();
        let read = self.with_store(move |store| store.read_group(&name)).await;
        let bytes = match read {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(crate::store::StoreError::GroupNotFound { .. })) => return None,
            Ok(Err(error)) => {
                error!(%group, %error, "cannot read the group file after a failed write");
                return None;
            }
            Err(error) => {
                error!(%group, %error, "cannot read the group file after a failed write");
                return None;
            }
        };
        let file = match konor_crdt::load_group_file(&bytes, self.replica_actor()) {
            Ok(file) => file,
            Err(error) => {
                error!(%group, %error, "the group file does not load after a failed write");
                return None;
            }
        };
        let name = group.to_owned();
        let key = self.with_store(move |store| store.read_group_key(&name)).await.ok()?.ok()??;
        let key = GroupKey::parse(&key).ok()?;
        let needs_rewrite = {
            let name = group.to_owned();
            self.with_store(move |store| store.needs_recovery(&name)).await.unwrap_or(true)
        };
        if needs_rewrite {
            self.rewrites
                .entry(group.to_owned())
                .or_insert((Instant::now() + REWRITE_BACKOFF_MIN, REWRITE_BACKOFF_MIN));
        }
        Some(LoadedState {
            damaged: false,
            doc: file.group,
            key,
            tail_changes: file.tail_changes,
            sync_states: BTreeMap::new(),
            staged: file.staged,
            decisions: file.decisions,
            known_members: Default::default(),
            ballots: file.ballots,
        })
    }

    /// The replica's actor, for loading documents as this node.
    fn replica_actor(&self) -> konor_crdt::ActorId {
        self.replica_actor.clone()
    }

    /// A write of `group` to disk failed: the node is degraded until a later one succeeds.
    fn mark_degraded(&mut self, group: &str, error: &str) {
        self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
        if self.degraded.insert(group.to_owned(), error.to_owned()).is_none() {
            error!(%group, %error, "disk write failed: node degraded (nothing that was not saved is served or acknowledged)");
        } else {
            warn!(%group, %error, "disk write failed again");
        }
    }

    fn clear_degraded(&mut self, group: &str) {
        if self.degraded.remove(group).is_some() {
            info!(%group, "disk writes succeed again: no longer degraded");
        }
    }

    /// Rewrites group files a failed fsync left unknown, once their backoff has passed.
    async fn rewrite_due_files(&mut self) {
        let now = Instant::now();
        let due: Vec<String> =
            self.rewrites.iter().filter(|(_, (at, _))| *at <= now).map(|(group, _)| group.clone()).collect();
        for group in due {
            let Some(file) = self.replica.compacted_file(&group) else {
                self.rewrites.remove(&group);
                continue;
            };
            let name = group.clone();
            match self.with_store(move |store| store.replace_group(&name, &file)).await {
                Ok(Ok(())) => {
                    self.rewrites.remove(&group);
                    self.clear_degraded(&group);
                    warn!(%group, "group file rewritten after a failed write");
                }
                Ok(Err(error)) => {
                    let text = persist_error_text(&group, &error);
                    if let Some((at, backoff)) = self.rewrites.get_mut(&group) {
                        *backoff = (*backoff * 2).min(REPAIR_BACKOFF_MAX);
                        *at = now + *backoff;
                    }
                    self.mark_degraded(&group, &text);
                }
                Err(error) => warn!(%group, %error, "the store thread failed"),
            }
        }
    }

    /// Runs one output that is not a persist operation; `persist_failed` says an earlier
    /// persist of this batch failed.
    async fn execute_plain(&mut self, output: Output, persist_failed: Option<&str>) {
        match output {
            Output::Persist(op) => {
                // Callers route persist operations elsewhere; run it rather than lose it.
                if let Err(error) = self.persist(op).await {
                    self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
                    error!(%error, "persist failed");
                }
            }
            Output::Send { to, message } => {
                if persist_failed.is_some() {
                    return;
                }
                match self.peer_addr(&to) {
                    Some(addr) => self.network.send(addr, Some(&to), Channel::Replica, message.encode()),
                    None => warn!(peer = %to, "no address known for peer; message dropped"),
                }
            }
            Output::Reply { id, result } => {
                let result = match (persist_failed, result) {
                    (Some(error), Ok(_)) => Err(error.to_owned()),
                    (_, result) => Ok(result),
                };
                self.reply(id, result);
            }
            // After a failed persist nothing further is announced: watchers and gossip must
            // not learn of state that is not on disk (gossiped heads count as acks).
            Output::Notify(_) | Output::Publish { .. } if persist_failed.is_some() => {}
            Output::Notify(notification) => {
                if let Some(reads) = &self.reads {
                    reads.apply(&notification);
                }
                self.notify(notification);
            }
            Output::Publish { group, gossip } => {
                let value = gossip.map_or_else(|| GROUP_LEFT.to_owned(), |g| g.encode());
                self.membership.publish(&format!("{GROUP_PREFIX}{group}"), &value).await;
            }
            Output::Dropped { from, reason } => {
                self.stats.peer_messages_dropped.fetch_add(1, Ordering::Relaxed);
                warn!(peer = %from, %reason, "peer message dropped");
            }
            // Not after an append run (the replica resumed already): the outputs it queues are
            // picked up before the batch ends.
            Output::Resume => {
                let now = self.now();
                self.replica.handle(now, Input::Resume);
            }
        }
    }

    /// Brings the read view in line with the replica after a batch: groups that appeared, or
    /// whose revision moved without a notification (load, join, repair), are copied whole;
    /// stale flags follow fencing; groups that were left go.
    fn settle_reads(&self) {
        self.settle_view(true);
    }

    /// Refreshes the stale flags of the groups in the read view, copying nothing in: what the
    /// replica holds may include changes whose persist has not run yet.
    fn settle_freshness(&self) {
        self.settle_view(false);
    }

    fn settle_view(&self, copy_contents: bool) {
        let Some(reads) = &self.reads else { return };
        let present: Vec<String> = self.replica.group_names().map(str::to_owned).collect();
        let mut fresh = BTreeMap::new();
        for name in &present {
            let Some(doc) = self.replica.group(name) else { continue };
            let revision = self.replica.revision(name).unwrap_or(0);
            if copy_contents && reads.revision(name) != Some(revision) {
                let settings = doc.settings().iter().map(|(key, value)| (key.to_owned(), value.clone())).collect();
                let changed = self.last_change.get(name).copied().unwrap_or(self.started);
                let read = GroupRead {
                    settings,
                    revision,
                    version: doc.latest_label(),
                    changed,
                    stale: true,
                    stale_reason: None,
                    fresh_until: None,
                    block: false,
                };
                reads.replace(name, read);
            }
            let block = doc.policy().fencing == Fencing::Block && doc.mode() == Mode::Strong;
            let mut state = match self.replica.freshness(name) {
                Ok(until) => Fresh { stale_reason: None, fresh_until: until.map(|at| self.instant_at(at)), block },
                Err(reason) => Fresh { stale_reason: Some(reason), fresh_until: None, block },
            };
            // The replica may already hold changes whose persist (and so whose notification)
            // has not run: the view serves older contents until it has, and must not call them
            // fresh (found by the fault tests: a joiner served the version before a commit as
            // fresh for a moment, between applying the commit and saving it).
            if !copy_contents
                && doc.mode() == Mode::Strong
                && state.stale_reason.is_none()
                && reads.revision(name).is_some_and(|shown| shown != revision)
            {
                state.stale_reason = Some("a change is being saved here".to_owned());
            }
            fresh.insert(name.clone(), state);
        }
        reads.settle(&present, &fresh);
    }

    /// The instant of a replica time.
    fn instant_at(&self, at: Millis) -> Instant {
        self.started + Duration::from_millis(at.0)
    }

    /// True for a read of a strong group with the `block` fencing policy while this node cannot
    /// prove it is fresh.
    fn must_block(&self, request: &Request) -> bool {
        let group = match request {
            Request::Get { group, .. } | Request::Snapshot { group } => group,
            _ => return false,
        };
        self.replica.group(group).is_some_and(|doc| doc.policy().fencing == Fencing::Block)
            && self.replica.is_fenced(group)
    }

    /// Holds a read until this node is fresh (fencing policy `block`), bounded in time and count.
    fn block_read(&mut self, client: ClientInfo, request: Request, reply: oneshot::Sender<Response>) {
        let group = match &request {
            Request::Get { group, .. } | Request::Snapshot { group } => group.clone(),
            _ => return,
        };
        if self.blocked_reads.len() >= BLOCKED_READS_MAX {
            let reason = self.replica.fencing_reason(&group).unwrap_or_default();
            let message =
                format!("group {group:?} cannot be read fresh here ({reason}) and too many reads wait already");
            return send(reply, error_response(ErrorCode::Unavailable, message));
        }
        let deadline = Instant::now() + BLOCKED_READ_TIMEOUT;
        self.blocked_reads.push(BlockedRead { group, request, client, reply, deadline });
    }

    /// Answers held reads whose node is fresh again, and fails those past their deadline.
    fn answer_blocked_reads(&mut self) {
        if self.blocked_reads.is_empty() {
            return;
        }
        let now = Instant::now();
        let held = std::mem::take(&mut self.blocked_reads);
        for read in held {
            if !self.replica.is_fenced(&read.group) {
                self.handle_request(read.client, read.request, read.reply);
            } else if read.deadline <= now {
                let reason = self.replica.fencing_reason(&read.group).unwrap_or_default();
                let message = format!(
                    "group {:?} could not be read fresh within {BLOCKED_READ_TIMEOUT:?}: {reason} (the group's fencing policy is block)",
                    read.group
                );
                send(read.reply, error_response(ErrorCode::Unavailable, message));
            } else {
                self.blocked_reads.push(read);
            }
        }
    }

    /// Queues a failed repair again, with a longer wait.
    fn queue_repair(&mut self, name: String, key: GroupKey, attempts: u32, error: &str) {
        let backoff = REPAIR_BACKOFF_MIN.saturating_mul(1 << attempts.min(5)).min(REPAIR_BACKOFF_MAX);
        warn!(group = %name, %error, retry_in = ?backoff, "repair from a peer failed; it is tried again");
        self.repairs.push(Repair { name, key, next: Instant::now() + backoff, attempts });
    }

    /// Runs `work` on the store where [`StoreIo`] says.
    async fn with_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Store) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let store = self.store.clone();
        let run = move || work(&mut store.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        match self.store_io {
            StoreIo::Inline => Ok(run()),
            StoreIo::Blocking => tokio::task::spawn_blocking(run).await.context("the store thread failed"),
        }
    }

    /// Starts appending every record, grouped by file in order, with one write and one fsync
    /// per file: at once on a blocking thread ([`StoreIo::Blocking`]), or right here
    /// ([`StoreIo::Inline`]). The future answers the groups whose append failed, with the error.
    fn start_appends(
        &self,
        appends: Vec<(String, Vec<u8>)>,
    ) -> impl std::future::Future<Output = Vec<(String, String)>> + 'static {
        let mut by_group: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for (group, records) in appends {
            by_group.entry(group).or_default().push(records);
        }
        let groups: Vec<String> = by_group.keys().cloned().collect();
        let store = self.store.clone();
        let write = move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut failed = Vec::new();
            for (group, records) in &by_group {
                let parts: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
                if let Err(error) = store.append_batch(group, &parts) {
                    failed.push((group.clone(), persist_error_text(group, &error)));
                }
            }
            failed
        };
        // Inline: written now, the future only hands the result over. Blocking: running now
        // on the blocking pool, the future waits for it.
        let (written, running) = match self.store_io {
            StoreIo::Inline => (write(), None),
            StoreIo::Blocking => (Vec::new(), Some(tokio::task::spawn_blocking(write))),
        };
        async move {
            let Some(running) = running else { return written };
            running.await.unwrap_or_else(|error| {
                groups.into_iter().map(|group| (group, format!("the store thread failed: {error}"))).collect()
            })
        }
    }

    async fn persist(&mut self, op: PersistOp) -> anyhow::Result<()> {
        if let PersistOp::RemoveGroup { group } = &op {
            self.watchers.remove(group);
        }
        self.with_store(move |store| -> anyhow::Result<()> {
            match op {
                PersistOp::CreateGroup { group, file, key } => {
                    store.write_group_key(&group, &key.to_text())?;
                    store.create_group(&group, &file)?;
                }
                PersistOp::Append { group, records } => store.append(&group, &records)?,
                PersistOp::Compact { group, file } => store.replace_group(&group, &file)?,
                PersistOp::RemoveGroup { group } => {
                    store.remove_group(&group)?;
                }
                PersistOp::SyncState { group, peer, state } => store.write_sync_state(&group, &peer, &state)?,
                PersistOp::Members { group, members } => store.write_members(&group, &members)?,
            }
            Ok(())
        })
        .await?
    }

    fn reply(&mut self, id: u64, result: Result<Result<CommandOutcome, CommandError>, String>) {
        let Some(pending) = self.pending.remove(&id) else { return };
        let (sender, key) = match pending {
            PendingReply::Plain(sender) => (sender, None),
            PendingReply::Created { reply, key } => (reply, Some(key)),
            PendingReply::Repair { name, key } => {
                let attempts = self.repair_attempts.get(&name).copied().unwrap_or(1);
                match result {
                    Ok(Ok(_)) => {
                        info!(group = %name, "group repaired from a peer");
                        self.repair_attempts.remove(&name);
                    }
                    Ok(Err(CommandError::AlreadyExists(_) | CommandError::JoinInProgress(_))) => {}
                    Ok(Err(error)) => self.queue_repair(name, key, attempts, &error.to_string()),
                    Err(error) => self.queue_repair(name, key, attempts, &error),
                }
                return;
            }
        };
        let response = match result {
            Err(persist_error) => error_response(
                ErrorCode::NotDurable,
                format!(
                    "{persist_error}; the write is not acknowledged by this node and nothing of it is served here (it may still reach the members it was sent to: read the group before retrying)"
                ),
            ),
            Ok(Err(error)) => command_error_response(&error),
            Ok(Ok(CommandOutcome::Committed(receipt))) => Response::Committed {
                group: receipt.group,
                version: receipt.label,
                revision: receipt.revision,
                content_hash: receipt.version.content_hash.get(..12).unwrap_or_default().to_owned(),
                acked_by: receipt.acked_by,
            },
            Ok(Ok(CommandOutcome::Created { name })) => Response::GroupCreated { name, key: key.unwrap_or_default() },
            Ok(Ok(CommandOutcome::Joined { name, version })) => Response::Joined { name, version },
            Ok(Ok(CommandOutcome::Left { .. })) => Response::Done,
            Ok(Ok(CommandOutcome::Reconfigured { group, configuration })) => {
                Response::Reconfigured { group, configuration }
            }
        };
        let _ = sender.send(response);
    }

    fn notify(&mut self, notification: Notification) {
        self.last_change.insert(notification.group.clone(), Instant::now());
        let Some(watchers) = self.watchers.get_mut(&notification.group) else { return };
        let event = WatchEvent::Change {
            group: notification.group.clone(),
            revision: notification.revision,
            version: notification.version.clone(),
            set: notification.set.clone(),
            removed: notification.removed.clone(),
        };
        // A watcher whose queue is full is dropped: its connection closes and the SDK resumes
        // from its last revision, so it misses nothing.
        watchers.retain(|watcher| watcher.events.try_send(event.clone()).is_ok());
    }

    fn freshness(&self, group: &str) -> Freshness {
        let doc = self.replica.group(group);
        let stale_reason = self.replica.fencing_reason(group);
        Freshness {
            revision: self.replica.revision(group).unwrap_or(0),
            version: doc.map(|d| d.latest_label()).unwrap_or_default(),
            age_ms: self
                .last_change
                .get(group)
                .map_or_else(|| self.started.elapsed().as_millis() as u64, |at| at.elapsed().as_millis() as u64),
            stale: stale_reason.is_some(),
            stale_reason,
        }
    }

    fn write_meta(&self, client: &ClientInfo, meta: konor_sdk::protocol::WriteMeta) -> CommitMeta {
        let author = if meta.author.is_empty() { format!("{}@{}", client.process, self.node_id) } else { meta.author };
        CommitMeta::new(author, meta.message, self.wall_clock())
    }

    fn handle_call(&mut self, call: LocalCall) {
        match call {
            LocalCall::Request { client, request, reply } => self.handle_request(client, request, reply),
            LocalCall::Watch { client, group, from_revision, events, reply } => {
                let response = self.start_watch(&client, &group, from_revision, events);
                let _ = reply.send(response);
            }
            LocalCall::Disconnected { connection } => {
                for watchers in self.watchers.values_mut() {
                    watchers.retain(|w| w.connection != connection);
                }
            }
        }
    }

    fn start_watch(
        &mut self,
        client: &ClientInfo,
        group: &str,
        from_revision: Option<u64>,
        events: mpsc::Sender<WatchEvent>,
    ) -> Response {
        let Some(doc) = self.replica.group(group) else {
            return error_response(ErrorCode::UnknownGroup, format!("group {group:?} does not exist on this node"));
        };
        let revision = self.replica.revision(group).unwrap_or(0);
        if let Some(from) = from_revision {
            // A backlog that would fill most of the watcher's queue is replaced by one resync.
            let backlog = match self.replica.events_since(group, from) {
                Some(EventsSince::Events(backlog)) if backlog.len() < local_api::WATCH_QUEUE_EVENTS / 2 => {
                    Some(backlog)
                }
                _ => None,
            };
            match backlog {
                Some(backlog) => {
                    for notification in backlog {
                        let event = WatchEvent::Change {
                            group: notification.group,
                            revision: notification.revision,
                            version: notification.version,
                            set: notification.set,
                            removed: notification.removed,
                        };
                        if events.try_send(event).is_err() {
                            return error_response(ErrorCode::Internal, "watch queue full");
                        }
                    }
                }
                None => {
                    let settings = doc.settings().iter().map(|(k, v)| (k.to_owned(), v.clone())).collect();
                    let event =
                        WatchEvent::Resync { group: group.to_owned(), revision, version: doc.latest_label(), settings };
                    if events.try_send(event).is_err() {
                        return error_response(ErrorCode::Internal, "watch queue full");
                    }
                }
            }
        }
        self.watchers.entry(group.to_owned()).or_default().push(Watcher { connection: client.connection, events });
        Response::Watching { group: group.to_owned(), revision }
    }

    fn handle_request(&mut self, client: ClientInfo, request: Request, reply: oneshot::Sender<Response>) {
        let unknown = |group: &str| {
            error_response(
                ErrorCode::UnknownGroup,
                format!("group {group:?} does not exist on this node (create it, or join it with its key)"),
            )
        };
        let response = match request {
            Request::Get { .. } | Request::Snapshot { .. } if self.must_block(&request) => {
                return self.block_read(client, request, reply);
            }
            Request::Get { group, key } => match self.replica.group(&group) {
                Some(doc) => {
                    Response::Value { value: doc.get(&key).cloned(), freshness: self.freshness(&group), group, key }
                }
                None => unknown(&group),
            },
            Request::Snapshot { group } => match self.replica.group(&group) {
                Some(doc) => Response::Snapshot {
                    settings: doc.settings().iter().map(|(k, v)| (k.to_owned(), v.clone())).collect(),
                    content_hash: doc.settings().content_hash().to_hex(),
                    freshness: self.freshness(&group),
                    group,
                },
                None => unknown(&group),
            },
            Request::ReportApply { group, version, revision, result } => {
                let row = ProcessRow {
                    pid: client.pid,
                    process: client.process.clone(),
                    version,
                    revision,
                    result,
                    time_ms: self.wall_clock().0,
                };
                self.processes.entry(group).or_default().insert((client.connection, client.pid), ProcessReport { row });
                Response::Done
            }
            Request::GroupCreate { name, mode, key, evict_after_ms, fencing } => {
                let mode: Mode = match mode.parse() {
                    Ok(mode) => mode,
                    Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                };
                let mut policy = GroupPolicy::default();
                if let Some(ms) = evict_after_ms {
                    if ms < konor_crdt::limits::EVICT_AFTER_MIN_MS {
                        let message = format!(
                            "evict_after {ms} ms is below the minimum of {} ms (a member's read lease must run out before it is evicted)",
                            konor_crdt::limits::EVICT_AFTER_MIN_MS
                        );
                        return send(reply, error_response(ErrorCode::BadRequest, message));
                    }
                    policy.evict_after = Millis(ms);
                }
                if let Some(text) = fencing {
                    match text.parse::<Fencing>() {
                        Ok(fencing) => policy.fencing = fencing,
                        Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                    }
                }
                let key = match key {
                    Some(text) => match GroupKey::parse(&text) {
                        Ok(key) => key,
                        Err(message) => return send(reply, error_response(ErrorCode::BadRequest, message)),
                    },
                    None => self.draw_key(),
                };
                let meta =
                    CommitMeta::new(format!("{}@{}", client.process, self.node_id), "create group", self.wall_clock());
                let text = key.to_text();
                self.command(
                    Command::CreateGroup { name, mode, key, meta, policy },
                    PendingReply::Created { reply, key: text },
                );
                return;
            }
            Request::GroupJoin { name, key } => match GroupKey::parse(&key) {
                Ok(key) => {
                    return self.command(Command::JoinGroup { name, key, repair: false }, PendingReply::Plain(reply));
                }
                Err(message) => error_response(ErrorCode::BadRequest, message),
            },
            Request::GroupLeave { name, force } => {
                return self.command(Command::LeaveGroup { name, force }, PendingReply::Plain(reply));
            }
            Request::GroupRemove { group, nodes, force } => {
                let message = format!("remove {}{}", nodes.join(", "), if force { " (forced)" } else { "" });
                let meta = CommitMeta::new(format!("{}@{}", client.process, self.node_id), message, self.wall_clock());
                let command = Command::RemoveMember { group, nodes, force, meta };
                return self.command(command, PendingReply::Plain(reply));
            }
            Request::GroupList => Response::Groups { groups: self.group_rows() },
            Request::Set { group, entries, meta } => {
                let meta = self.write_meta(&client, meta);
                let entries = entries.into_iter().collect();
                return self.command(Command::Set { group, entries, meta }, PendingReply::Plain(reply));
            }
            Request::Delete { group, keys, meta } => {
                let meta = self.write_meta(&client, meta);
                return self.command(Command::Delete { group, keys, meta }, PendingReply::Plain(reply));
            }
            Request::Apply { group, format, text, meta } => match format.parse::<FileFormat>() {
                Ok(format) => {
                    let meta = self.write_meta(&client, meta);
                    return self.command(Command::Apply { group, format, text, meta }, PendingReply::Plain(reply));
                }
                Err(error) => error_response(ErrorCode::BadRequest, error.to_string()),
            },
            Request::Rollback { group, version, meta } => {
                let meta = self.write_meta(&client, meta);
                return self.command(Command::Rollback { group, version, meta }, PendingReply::Plain(reply));
            }
            Request::History { group } => match self.replica.group(&group) {
                Some(doc) => Response::History {
                    versions: doc
                        .history()
                        .map(|v| VersionRow {
                            label: doc.label(&v.id),
                            author: v.author.clone(),
                            time_ms: v.time.0,
                            message: v.message.clone(),
                            kind: v.kind.name().to_owned(),
                            content_hash: v.content_hash.get(..12).unwrap_or_default().to_owned(),
                            parents: v.parents.iter().map(|p| doc.label(p)).collect(),
                        })
                        .collect(),
                    group,
                },
                None => unknown(&group),
            },
            Request::Diff { group, from, to } => match self.replica.group(&group) {
                Some(doc) => {
                    let ids = doc
                        .resolve(&from)
                        .map(|a| a.id.clone())
                        .and_then(|a| doc.resolve(&to).map(|b| (a, b.id.clone())));
                    match ids.and_then(|(a, b)| doc.diff(&a, &b)) {
                        Ok(diff) => Response::Diff {
                            added: diff.added.into_iter().collect(),
                            removed: diff.removed.into_iter().collect(),
                            changed: diff.changed.into_iter().map(|c| (c.key, (c.old, c.new))).collect(),
                            group,
                        },
                        Err(error) => error_response(ErrorCode::NotFound, error.to_string()),
                    }
                }
                None => unknown(&group),
            },
            Request::Conflicts { group } => match self.replica.group(&group) {
                Some(doc) => Response::Conflicts {
                    conflicts: doc
                        .conflicts()
                        .into_iter()
                        .map(|c| ConflictRow {
                            key: c.key,
                            winner: c.winner.value,
                            winner_version: c.winner.version.map(|v| doc.label(&v)),
                            losers: c.losers.into_iter().map(|l| (l.value, l.version.map(|v| doc.label(&v)))).collect(),
                        })
                        .collect(),
                    group,
                },
                None => unknown(&group),
            },
            Request::Nodes => Response::Nodes { nodes: self.node_rows() },
            Request::Status { group } => self.status(&group),
            Request::Hello { .. } | Request::Watch { .. } | Request::Unwatch { .. } => {
                error_response(ErrorCode::Protocol, "handled by the socket layer")
            }
        };
        send(reply, response);
    }

    fn group_rows(&self) -> Vec<GroupRow> {
        self.replica
            .group_names()
            .filter_map(|name| {
                let doc = self.replica.group(name)?;
                let mut members: Vec<String> =
                    self.replica.members(name).into_iter().map(|(node, _, _)| node).collect();
                members.push(self.node_id.clone());
                members.sort();
                Some(GroupRow {
                    name: name.to_owned(),
                    mode: doc.mode().to_string(),
                    version: doc.latest_label(),
                    revision: self.replica.revision(name).unwrap_or(0),
                    keys: doc.settings().len(),
                    members,
                })
            })
            .collect()
    }

    fn node_rows(&self) -> Vec<NodeRow> {
        self.mesh
            .nodes
            .values()
            .map(|node| NodeRow {
                id: node.id.clone(),
                address: node.addr.to_string(),
                labels: node.labels.clone(),
                state: match node.liveness {
                    Liveness::Live => "live",
                    Liveness::Unknown => "unknown",
                    Liveness::Dead => "dead",
                    Liveness::Leaving => "leaving",
                }
                .to_owned(),
                last_heartbeat_ms: node.heartbeat_age.map(|age| age.as_millis() as u64),
                is_self: node.id == self.node_id,
                degraded: (node.id == self.node_id).then(|| self.degraded_text()).flatten(),
            })
            .collect()
    }

    fn status(&self, group: &str) -> Response {
        let Some(doc) = self.replica.group(group) else {
            return error_response(ErrorCode::UnknownGroup, format!("group {group:?} does not exist on this node"));
        };
        let mut nodes = vec![NodeGroupRow {
            node: self.node_id.clone(),
            version: doc.latest_label(),
            revision: self.replica.revision(group).unwrap_or(0),
            heads: doc.heads_digest().to_string(),
            live: true,
        }];
        for (node, live, gossip) in self.replica.members(group) {
            nodes.push(NodeGroupRow {
                node,
                version: gossip.version,
                revision: gossip.revision,
                heads: gossip.digest.to_string(),
                live,
            });
        }
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let processes = self
            .processes
            .get(group)
            .map(|reports| reports.values().map(|report| report.row.clone()).collect())
            .unwrap_or_default();
        let quorum = self.replica.quorum_info(group);
        Response::Status {
            group: group.to_owned(),
            mode: doc.mode().to_string(),
            nodes,
            processes,
            members: quorum.as_ref().map(|q| q.members.clone()).unwrap_or_default(),
            live: quorum.as_ref().map(|q| q.live.clone()).unwrap_or_default(),
            quorum: quorum.as_ref().map_or(1, |q| q.quorum),
            last_write: quorum.as_ref().and_then(|q| q.last_commit.clone()),
            fenced: quorum.as_ref().is_some_and(|q| q.fenced),
            fenced_reason: quorum.as_ref().and_then(|q| q.fenced_reason.clone()),
            configuration: quorum.as_ref().and_then(|q| q.configuration.as_ref().map(ToString::to_string)),
            unknown: quorum.as_ref().map(|q| q.unknown.clone()).unwrap_or_default(),
            degraded: self.degraded_text(),
        }
    }

    /// Why this node is degraded (a failed write to its disk), if it is.
    fn degraded_text(&self) -> Option<String> {
        let errors: Vec<&str> = self.degraded.values().map(String::as_str).collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }
}

fn send(reply: oneshot::Sender<Response>, response: Response) {
    let _ = reply.send(response);
}

/// Used by `ApplyResult` consumers in tests and status rendering.
pub fn apply_result_text(result: &ApplyResult) -> String {
    match result {
        ApplyResult::Ok => "ok".to_owned(),
        ApplyResult::Error { message } => format!("error: {message}"),
    }
}

#[cfg(test)]
mod permission_tests {
    use super::open_permissions_warning;

    #[test]
    fn open_keys_and_world_writable_sockets_are_named() {
        assert_eq!(open_permissions_warning(0o100600, 0o600), None);
        assert_eq!(open_permissions_warning(0o600, 0o660), None);
        let key = open_permissions_warning(0o100644, 0o600).unwrap();
        assert!(key.contains("readable by others (mode 644)") && key.contains("chmod 600"), "{key}");
        let socket = open_permissions_warning(0o600, 0o666).unwrap();
        assert!(socket.contains("every local user"), "{socket}");
    }
}
