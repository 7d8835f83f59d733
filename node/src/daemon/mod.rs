//! The daemon: one task owns the [`Replica`] and waits on a closed set of events (local calls,
//! peer frames, membership views, timers). It executes the replica's outputs in order (persist
//! before send before reply; a run of appends is written with one fsync per file, and the
//! outputs between them wait for it) and answers local reads from the replica's documents.
//! It makes no protocol decisions: those are in konor-crdt.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use konor_crdt::configuration::{Fencing, GroupPolicy};
use konor_crdt::replica::{
    CommandError, CommandOutcome, EventsSince, GroupGossip, LoadedState, MembershipView, Notification, PeerLiveness,
    PeerState, actor_for,
};
use konor_crdt::{
    Command, CommitMeta, EditError, FileFormat, GroupKey, Input, Keyring, Millis, Mode, Output, PersistOp, Replica,
};
use konor_sdk::Secret;
use konor_sdk::protocol::{
    ApplyResult, ConflictRow, ErrorCode, Freshness, GroupRow, NodeGroupRow, NodeRow, ProcessRow, Request, Response,
    VersionRow, ViolationRow, WatchEvent,
};
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::api::read_view::{Fresh, GroupRead, ReadView};
use crate::api::socket::{self, ClientInfo, LocalApiConfig, LocalCall};
use crate::health::alerts::{AlertChange, AlertRules, Moment, Observed, Seen};
use crate::health::history::HealthHistory;
use crate::health::webhook::{SYSTEM_CA_BUNDLE, Webhooks, read_ca_bundle};
use crate::limits::{PORT_RETRY, PREDECESSOR_EXIT_WAIT};
use crate::metrics::Metrics;
use crate::peer::membership::{
    GROUP_LEFT, GROUP_PREFIX, GROUP_WITHDRAWN, Liveness, Membership, MembershipConfig, MeshView,
};
use crate::peer::transport::{Channel, Inbox, Incoming, PeerNetwork, QuicNetwork};
use crate::pki::{self, identity::TlsIdentity};
use crate::settings::DaemonSettings;
use crate::storage::store::Store;

mod audit_gossip;
mod enrollments;
mod guards;
mod outputs;
mod requests;
mod revocations;
#[cfg(test)]
mod tests;

pub use requests::apply_result_text;

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

/// A process's apply report (F16) keeps at most this much of its error message: enough to say
/// why a callback refused settings; rows are kept per connection and group while it is open.
const REPORT_MESSAGE_BYTES_MAX: usize = 1024;

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
        key: Secret,
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

/// Batches of outputs one `execute_outputs` runs while persists keep failing: each failure
/// reloads its group and runs the outputs that follows in a new batch, which normally ends it
/// (error answers, gossip); a batch that fails again and again hands the main loop its turn
/// rather than spinning (or, as a recursion once did, overflowing the stack).
const FAILED_BATCHES_MAX: u32 = 4;

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
    events: socket::WatchSender,
    /// Only keys that start with this text (`None`: the whole group).
    prefix: Option<String>,
    /// The watcher reads secret values; else they come masked.
    reveal: bool,
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
    /// What the gossip filter refused for the mesh's cap (`health`).
    cap_refusals: CapRefusals,
    started: Instant,
    wall_base: Option<Millis>,
    seed: [u8; 32],
    keys_drawn: u64,
    view_delivered: bool,
    next_command: u64,
    pending: BTreeMap<u64, PendingReply>,
    /// The group of each pending command: a failed persist silences its own group's replies.
    pending_groups: BTreeMap<u64, String>,
    watchers: BTreeMap<String, Vec<Watcher>>,
    last_change: BTreeMap<String, Instant>,
    /// Local processes' apply reports and their history (F16), published to the mesh.
    reports: crate::reports::Reports,
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
    metrics: Metrics,
    /// When each pending write reached the daemon, for the commit latency metric.
    command_started: BTreeMap<u64, Instant>,
    /// Local calls waiting in the queue when the last one was taken (for `/metrics`).
    calls_waiting: usize,
    /// The anomaly rules over the mesh this node sees (issue 15).
    alerts: AlertRules,
    /// Where alert changes are POSTed.
    webhooks: Option<Webhooks>,
    /// What the failure detector saw over the last hours; `None` when not kept (the simulator).
    history: Option<HealthHistory>,
    /// When the history was last saved.
    history_saved: Instant,
    /// When apply reports were last published to the mesh and last saved.
    reports_flushed: (Instant, Instant),
    /// The apply reports each member gossips, by group then node (`rep:<group>`), read at most
    /// every [`REPORT_PUBLISH_INTERVAL`] for the groups this node holds.
    remote_reports: BTreeMap<String, BTreeMap<String, String>>,
    /// The last release guard action this node wrote, per group (SPEC F15).
    guards_acted: guards::GuardActed,
    /// Groups whose guards this node evaluates (its copy matched the members' once).
    guards_ready: guards::GuardsReady,
    /// Where it is saved.
    history_file: std::path::PathBuf,
    /// The save in progress, if any.
    history_write: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// The certificate revocations this node enforces (`revocations.rs`; `None` in the simulator).
    revocations: Option<crate::pki::revocation::Revocations>,
    /// When peers' gossiped revocations were last read.
    revocations_followed: Instant,
    /// Gossiped revocation values refused for good, by key (warned about once).
    revocations_refused: BTreeMap<String, String>,
    /// Gossiped revocations this node failed to store (its disk, its cap), said once each.
    revocations_failing: std::collections::BTreeSet<String>,
    /// What a node holding the CA key needs to enroll hosts (`enrollments.rs`); `None`: it
    /// cannot sign.
    enrollment: Option<enrollments::Enrollment>,
    /// The audit log and its spread (`audit_gossip.rs`; `None` in the simulator).
    audit: Option<audit_gossip::AuditGossip>,
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
    pub storage_hook: Option<Arc<dyn crate::storage::store::StorageHook>>,
    /// Signs this node's gossip and checks its peers' (issue 12): the node's certificate in
    /// production, a stand-in in the simulator.
    pub gossip_seal: Arc<dyn crate::peer::gossip_seal::GossipSeal>,
    /// The runtime gossip runs on: the network's in konord (the daemon runs on a thread of its
    /// own, see [`run`]); `None` in the simulator (the one runtime).
    pub gossip_runtime: Option<tokio::runtime::Handle>,
    /// Latencies for `/metrics` (issue 15), shared with the HTTP door.
    pub metrics: Metrics,
    /// Where alerts are POSTed (the settings file's `alert-webhook`); `None`: nowhere.
    pub webhooks: Option<Webhooks>,
    /// Keep the health history and save it in the data dir ([`HISTORY_FILE`]). Off in the
    /// simulator: a thousand nodes each keeping a thousand peers' history would cost gigabytes.
    pub keep_history: bool,
    /// The certificate revocations this node enforces, shared with its TLS configs and gossip
    /// seal (`None` in the simulator, whose nodes have no certificates).
    pub revocations: Option<crate::pki::revocation::Revocations>,
    /// The CA key, on a node that enrolls hosts with join tokens (`None`: it cannot sign).
    pub signer: Option<Arc<crate::pki::ca::Signer>>,
    /// The most nodes the mesh holds: [`crate::limits::MESH_NODES_MAX`] (smaller only in tests
    /// of the cap).
    pub mesh_nodes_max: usize,
    /// The audit log, spread to and copied from peers (`None` in the simulator).
    pub audit: Option<crate::audit::Audit>,
}

/// Where the daemon's file writes and fsyncs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreIo {
    /// Production: appends with a deferred apply to run meanwhile (a member's pushed changes,
    /// saved before they are applied) and every other persist go to a blocking thread, awaited;
    /// other appends are written on the daemon's thread, which would only wait for them. Sends
    /// and the socket run on the caller's runtime either way.
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
    let identity = pki::identity::load_identity(&settings.tls_dir)
        .with_context(|| format!("cannot load the node certificate from {}", settings.tls_dir.display()))?;
    anyhow::ensure!(
        identity.node_id() == settings.node_id,
        "the certificate in {} is for node {:?}, but this daemon is {:?}",
        settings.tls_dir.display(),
        identity.node_id(),
        settings.node_id
    );
    warn_on_open_permissions(&settings);
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("cannot create the data dir {}", settings.data_dir.display()))?;
    // Before the first handshake: a node restarted must not let a revoked peer in meanwhile.
    let now_ms = crate::wall_clock::unix_time().as_secs() * 1000;
    let revocations = pki::revocation::Revocations::load(&settings.data_dir, identity.ca_cert().clone(), now_ms)
        .context("cannot start without the revocations this node holds")?;
    if !revocations.is_empty() {
        info!(held = revocations.len(), "certificate revocations loaded");
    }
    if let Some(facts) = pki::cert_facts::cert_facts(identity.cert()) {
        info!(serial = %facts.serial, "node certificate (konorctl cert revoke --serial takes this serial)");
    }
    let signer = pki::ca::Signer::load(&settings.tls_dir)
        .with_context(|| format!("cannot read the CA key in {}", settings.tls_dir.display()))?
        .map(Arc::new);
    if let Some(signer) = &signer {
        anyhow::ensure!(
            signer.ca_cert() == identity.ca_cert(),
            "the CA key in {} is not the CA of this node's certificate",
            settings.tls_dir.display()
        );
        info!("this node holds the CA key: it enrolls hosts that present a join token");
    }
    let identity = identity.with_revocations(revocations.clone());
    let gossip_seal = Arc::new(crate::peer::gossip_seal::CertSeal::new(&identity)?);
    let fault_layer = settings.fault_control.as_deref().map(|path| {
        warn!(
            control = %path.display(),
            "konord runs with a fault layer ({}): peer traffic and the disk are slowed as that file says; a test setting, never for production",
            crate::fault_layer::FAULT_CONTROL_ENV
        );
        crate::fault_layer::FaultLayer::start(path)
    });
    let (network, inbox) = start_network(&identity, settings.listen, fault_layer.as_ref()).await?;
    let advertise = network.local_addr();
    // Tools and tests started with `--listen 127.0.0.1:0` read the bound address here.
    write_atomically(&settings.data_dir.join(LISTEN_ADDR_FILE), advertise.to_string().as_bytes())
        .context("cannot write the listen address file")?;
    let (calls_tx, calls) = mpsc::channel(CALL_QUEUE_MAX);
    let (api_shutdown_tx, api_shutdown) = watch::channel(false);
    let reads = ReadView::default();
    let metrics = Metrics::default();
    let mut api_config = LocalApiConfig::new(settings.socket.clone(), settings.node_id.clone());
    api_config.mode = settings.socket_mode;
    api_config.reads = Some(reads.clone());
    let roles = settings.roles.clone().map(Arc::new);
    api_config.roles = roles.clone();
    let audit = crate::audit::Audit::open(&settings.data_dir, &settings.node_id)
        .map_err(anyhow::Error::msg)
        .context("cannot start without the audit log")?;
    api_config.audit = Some(audit.clone());
    let http = match settings.http_listen {
        Some(listen) => {
            if settings.http_open_reads {
                warn!(
                    %listen,
                    "the HTTP API serves reads to callers without a certificate (--http-open-reads): every group's settings can be read by whoever reaches this address"
                );
            }
            let listener = crate::api::http::bind(listen).await?;
            let bound = listener.local_addr().context("cannot read the HTTP API's address")?;
            write_atomically(&settings.data_dir.join(crate::api::http::HTTP_ADDR_FILE), bound.to_string().as_bytes())
                .context("cannot write the HTTP address file")?;
            let config = crate::api::http::HttpConfig {
                node_id: settings.node_id.clone(),
                tls: crate::api::http::server_config(&identity)?,
                calls: calls_tx.clone(),
                reads: Some(reads.clone()),
                socket_stats: api_config.stats.clone(),
                transport: network.stats.clone(),
                metrics: metrics.clone(),
                open_reads: settings.http_open_reads,
                revocations: identity.revocations().clone(),
                roles: roles.clone(),
                signer: signer.clone().map(|signer| (signer, identity.cert().clone())),
                audit: Some(audit.clone()),
            };
            Some(tokio::spawn(crate::api::http::serve(listener, config, api_shutdown.clone())))
        }
        None => None,
    };
    let api = tokio::spawn(socket::serve(api_config, calls_tx, api_shutdown));
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
        storage_hook: match (fault_layer, &settings.fault_control) {
            (Some(layer), Some(control)) => {
                let ledger = crate::fault_layer::disk::ledger_path(control);
                let disk = crate::fault_layer::disk::FaultDisk::new(layer, Some(&ledger))
                    .with_context(|| format!("cannot create the fault layer's ledger {}", ledger.display()))?;
                Some(Arc::new(disk) as Arc<dyn crate::storage::store::StorageHook>)
            }
            _ => None,
        },
        gossip_seal,
        gossip_runtime: Some(tokio::runtime::Handle::current()),
        webhooks: start_webhooks(&settings, &metrics)?,
        metrics,
        keep_history: true,
        revocations: Some(revocations),
        signer,
        mesh_nodes_max: crate::limits::MESH_NODES_MAX,
        audit: Some(audit),
    };
    let result = run_node_on_own_thread(parts, shutdown).await;
    let _ = api_shutdown_tx.send(true);
    if let Some(http) = http {
        let _ = http.await;
    }
    let api_result = api.await;
    let result = match (result, api_result) {
        (Err(_), Ok(Err(api_error))) => Err(api_error.context("the local socket failed")),
        (result, _) => result,
    };
    network.close().await;
    info!("konord stopped");
    result
}

/// Runs [`run_node`] on a thread of its own with its own runtime, while the caller's runtime
/// keeps the QUIC endpoint, gossip, signed beats and the socket going (issue 12, CPU isolation):
/// Automerge's long steps (a catch-up of a long history, a load, a save of a big group) then
/// hold up this node's replica work, never its heartbeats, connections or local reads, so
/// peers do not judge a busy node dead.
async fn run_node_on_own_thread(parts: NodeParts, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("konord-daemon".to_owned())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(run_node(parts, shutdown)),
                Err(error) => Err(anyhow::Error::new(error).context("cannot start the daemon's runtime")),
            };
            let _ = done_tx.send(result);
        })
        .context("cannot start the daemon thread")?;
    done_rx.await.unwrap_or_else(|_| Err(anyhow::anyhow!("the daemon thread panicked")))
}

/// Binds the QUIC endpoint. A port still held by a konord that is stopping (a restart right
/// after SIGTERM: the old one announces its leave for a few gossip periods, then lets go of its
/// port last, after its data dir and socket) is waited for, at most [`PREDECESSOR_EXIT_WAIT`].
async fn start_network(
    identity: &TlsIdentity,
    listen: SocketAddr,
    fault_layer: Option<&Arc<crate::fault_layer::FaultLayer>>,
) -> anyhow::Result<(Arc<QuicNetwork>, Inbox)> {
    let deadline = Instant::now() + PREDECESSOR_EXIT_WAIT;
    let mut waiting = false;
    loop {
        let started = match fault_layer {
            Some(layer) => QuicNetwork::start_with_faults(identity, listen, layer.clone()),
            None => QuicNetwork::start(identity, listen),
        };
        match started {
            Err(error) if address_in_use(&error) && Instant::now() < deadline => {
                if !waiting {
                    info!(
                        %listen,
                        wait_ms = PREDECESSOR_EXIT_WAIT.as_millis() as u64,
                        "the QUIC port is still held (by a konord that is stopping?); waiting for it"
                    );
                    waiting = true;
                }
                // Another process lets go of a port without telling: look again shortly.
                tokio::time::sleep(PORT_RETRY).await;
            }
            result => return result,
        }
    }
}

fn address_in_use(error: &anyhow::Error) -> bool {
    error.downcast_ref::<std::io::Error>().is_some_and(|error| error.kind() == std::io::ErrorKind::AddrInUse)
}

/// Warns at start about secrets and doors left open (issue 12): a node key others can read
/// lets them sign gossip and hold connections as this node; a socket anyone may write to lets
/// any local user change configuration.
fn warn_on_open_permissions(settings: &DaemonSettings) {
    use std::os::unix::fs::PermissionsExt;
    let key = settings.tls_dir.join(pki::NODE_KEY_FILE);
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

/// The apply reports a previous run saved for the groups this node holds: all history now
/// (their processes' connections ended with that run). A file that cannot be read is logged
/// and skipped; it only costs history.
fn load_reports(store: &Store, groups: &[String], now_ms: u64) -> crate::reports::Reports {
    use crate::reports::{REPORT_FILE_BYTES_MAX, Reports};
    let mut reports = Reports::default();
    for group in groups {
        let restored = match store.read_reports(group, REPORT_FILE_BYTES_MAX) {
            Ok(None) => continue,
            Ok(Some(bytes)) => reports.restore(group, &bytes, now_ms),
            Err(crate::storage::store::ReadBoundedError::TooLarge(bytes)) => Err(format!("{bytes} bytes")),
            Err(crate::storage::store::ReadBoundedError::Io(error)) => Err(error.to_string()),
        };
        if let Err(error) = restored {
            warn!(%group, %error, "cannot read the group's saved apply reports; their history starts again");
        }
    }
    reports
}

/// How often changed apply reports are published to the mesh at most: a fleet's processes
/// reporting every change of a busy group must not republish a gossip value every poll.
const REPORT_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// How often changed apply reports are saved at most (each save is a write and two fsyncs per
/// group): a crash loses at most this much of the history.
const REPORT_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// The health history's file in the data dir.
pub const HISTORY_FILE: &str = "health-history.bin";

/// How often the health history is saved: a crash loses at most this much of it.
const HISTORY_SAVE_INTERVAL: Duration = Duration::from_secs(60);

/// How long a shutdown waits for the health history's save (a few MB to the data dir).
const HISTORY_SAVE_WAIT: Duration = Duration::from_secs(5);

/// The saved health history is read only up to this size; a larger file is not ours. At 1,600
/// nodes with full rings it is about 4 MB.
pub const HISTORY_FILE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The health history saved by the last run, or an empty one (a missing file is the first
/// start; a damaged or foreign one is logged and set aside).
fn load_history(data_dir: &std::path::Path) -> HealthHistory {
    use crate::storage::store::{ReadBoundedError, read_bounded};
    let path = data_dir.join(HISTORY_FILE);
    let read = match read_bounded(&path, HISTORY_FILE_BYTES_MAX) {
        Ok(None) => return HealthHistory::default(),
        Ok(Some(bytes)) => HealthHistory::restore(&bytes).map_err(|error| error.to_string()),
        Err(ReadBoundedError::TooLarge(bytes)) => Err(format!("{bytes} bytes, more than a history holds")),
        Err(ReadBoundedError::Io(error)) => Err(error.to_string()),
    };
    match read {
        Ok(history) => {
            info!(nodes = history.len(), "health history loaded");
            history
        }
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read the health history; starting a new one");
            HealthHistory::default()
        }
    }
}

/// Logs a failed save of the health history (the next save tries again).
fn report_history_write(result: Result<std::io::Result<()>, tokio::task::JoinError>) {
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "cannot save the health history"),
        Err(error) => warn!(%error, "the health history's save did not finish"),
    }
}

/// Writes `bytes` to `path` through a temporary file readable by the owner only (the history
/// names nodes and labels, which the HTTP API shows only to callers with a certificate), then
/// renames it into place.
fn write_private_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&temp, path)
}

/// Starts the senders of the settings' alert webhooks, if any; the CA bundle is read only when
/// a receiver speaks https.
fn start_webhooks(settings: &DaemonSettings, metrics: &Metrics) -> anyhow::Result<Option<Webhooks>> {
    if settings.alert_webhooks.is_empty() {
        return Ok(None);
    }
    let roots = if settings.alert_webhooks.iter().any(|url| url.is_https()) {
        let bundle = settings.alert_webhook_ca.clone().unwrap_or_else(|| SYSTEM_CA_BUNDLE.into());
        read_ca_bundle(&bundle)?
    } else {
        Vec::new()
    };
    info!(webhooks = settings.alert_webhooks.len(), "alerts are posted to webhooks");
    Ok(Some(Webhooks::start(&settings.node_id, settings.alert_webhooks.clone(), roots, metrics.webhooks.clone())?))
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
        gossip_runtime,
        metrics,
        webhooks,
        keep_history,
        revocations,
        signer,
        mesh_nodes_max,
        audit,
    } = parts;
    let enrollment = signer.map(|signer| enrollments::Enrollment::new(signer, &data_dir, cluster.clone()));
    let Inbox { gossip, mut replica } = inbox;
    let mut store = match storage_hook {
        Some(hook) => Store::open_with_hook(&data_dir, &node_id, hook)?,
        None => Store::open(&data_dir, &node_id)?,
    };
    // The incarnation makes the actor unique per start; the seed also covers a data dir that
    // was wiped or restored from an old backup (FACTS: never reuse an actor).
    let actor = actor_for(&format!("{node_id}/{}", konor_crdt::settings::hex_of(&seed[..8])), store.incarnation());
    let (loaded, repair_list) = load_groups(&mut store, &actor)?;
    let groups_held: Vec<String> = loaded.keys().cloned().collect();
    let repairs =
        repair_list.into_iter().map(|(name, key)| Repair { name, key, next: Instant::now(), attempts: 0 }).collect();
    let replica_labels = labels.clone();
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
        runtime: gossip_runtime,
        nodes_max: mesh_nodes_max,
    };
    let membership = Membership::start(membership_config, network.clone(), gossip).await?;
    let mut replica_state = Replica::new(node_id.clone(), actor.clone(), seed, loaded).with_labels(replica_labels);
    // Revisions of this run start above every revision an earlier run can have told a watcher
    // (which may name a pushed change lost with it: watchers are told before the fsync).
    replica_state.start_revisions_at(konor_crdt::limits::revision_base(store.incarnation()));
    let started = Instant::now();
    let wall_now = match wall_base {
        Some(base) => base,
        None => system_clock(),
    };
    replica_state.set_wall_offset(wall_now.0);
    let reports = load_reports(&store, &groups_held, wall_now.0);
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
        cap_refusals: CapRefusals::default(),
        started,
        wall_base,
        seed,
        keys_drawn: 0,
        view_delivered: false,
        next_command: 0,
        pending: BTreeMap::new(),
        pending_groups: BTreeMap::new(),
        watchers: BTreeMap::new(),
        last_change: BTreeMap::new(),
        reports,
        repairs,
        repair_attempts: BTreeMap::new(),
        rewrites: BTreeMap::new(),
        degraded: BTreeMap::new(),
        blocked_reads: Vec::new(),
        last_tick: Instant::now(),
        stats: Arc::new(DaemonStats::default()),
        metrics,
        command_started: BTreeMap::new(),
        calls_waiting: 0,
        alerts: AlertRules::for_gossip_interval(gossip_interval),
        webhooks,
        history: keep_history.then(|| load_history(&data_dir)),
        history_saved: Instant::now(),
        reports_flushed: (Instant::now(), Instant::now()),
        remote_reports: BTreeMap::new(),
        guards_acted: BTreeMap::new(),
        guards_ready: Default::default(),
        history_file: data_dir.join(HISTORY_FILE),
        history_write: None,
        revocations,
        revocations_followed: Instant::now(),
        revocations_refused: BTreeMap::new(),
        revocations_failing: Default::default(),
        enrollment,
        audit: audit.map(audit_gossip::AuditGossip::new),
    };
    info!(node = %node_id, "node running");
    daemon.publish_revocations();
    daemon.publish_token_uses();
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
                Some(call) => {
                    daemon.calls_waiting = calls.len();
                    daemon.handle_call(call);
                }
                None => {
                    // The socket server ended (it failed to bind, or crashed): without it no
                    // application can read, so the node stops with an error.
                    error!("local API stopped");
                    anyhow::bail!("the local API stopped; see the log line before this one");
                }
            },
            incoming = replica.recv() => {
                let Some(incoming) = incoming else { break };
                daemon.handle_peer(incoming);
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
                daemon.calls_waiting = calls.len();
                if answers_from_state(&call) {
                    read_after_batch = Some(call);
                } else {
                    daemon.handle_call(call);
                }
                handled = true;
            }
            if let Ok(incoming) = replica.try_recv() {
                daemon.handle_peer(incoming);
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
    daemon.save_history(true).await;
    daemon.flush_reports(true).await;
    info!("shutting down: announcing leave");
    daemon.membership.set_leaving().await;
    tokio::time::sleep(gossip_interval * LEAVE_GOSSIP_ROUNDS).await;
    daemon.membership.shutdown().await;
    Ok(())
}

/// How long a node reports the mesh at its cap after its gossip filter last refused a new
/// node: forty gossip periods at the default 250 ms. A refused host keeps gossiping to the nodes
/// it knows every period, so while it tries, the report holds without a gap; a health check or a
/// scrape every few seconds cannot fall between two refusals.
const CAP_REFUSAL_HOLD: Duration = Duration::from_secs(10);

/// What this node's gossip filter refused for the mesh's node cap.
#[derive(Debug, Clone, Copy, Default)]
struct CapRefusals {
    /// Refusals since the daemon started (one per refused node delta, so one host that keeps
    /// trying counts many times).
    total: u64,
    /// When the count last grew (seen at a membership poll).
    last: Option<Instant>,
}

impl CapRefusals {
    /// True when a new node was refused within [`CAP_REFUSAL_HOLD`].
    fn refusing(&self) -> bool {
        self.last.is_some_and(|at| at.elapsed() < CAP_REFUSAL_HOLD)
    }
}

/// True for a call the daemon answers at once from its state (reads, watches), false for
/// commands whose answer follows their persist. Unknown kinds count as reads: deferring one is
/// always safe.
fn answers_from_state(call: &LocalCall) -> bool {
    match call {
        // Its grant is written (with its fsync) before it is answered, on the daemon's thread:
        // enrollment is rare, and a signer must not answer a use it could lose.
        LocalCall::Health { .. } | LocalCall::Enroll { .. } => true,
        LocalCall::Request { request, .. } => !matches!(
            request,
            Request::Set { .. }
                | Request::Delete { .. }
                | Request::Apply { .. }
                | Request::Rollback { .. }
                | Request::Release { .. }
                | Request::Promote { .. }
                | Request::Abort { .. }
                | Request::GroupCreate { .. }
                | Request::GroupJoin { .. }
                | Request::GroupLeave { .. }
                | Request::GroupRemove { .. }
                | Request::GroupRotateKey { .. }
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
        let keys = match store.read_group_key(&name)?.map(|text| Keyring::parse(text.expose())) {
            Some(Ok(keys)) => keys,
            // The parse error names the line's kind, never the key.
            Some(Err(error)) => {
                error!(group = %name, %error, "group key file does not read; the group is not served");
                continue;
            }
            None => {
                error!(group = %name, "group key missing; the group is not served");
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
                    keys,
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
                repairs.push((name, keys.key().clone()));
            }
        }
    }
    // A key without a group file: a group quarantined by an earlier start whose repair never
    // finished. The repair queue survives restarts this way.
    for name in store.list_group_keys()? {
        if loaded.contains_key(&name) || repairs.iter().any(|(pending, _)| *pending == name) {
            continue;
        }
        if let Some(Ok(keys)) = store.read_group_key(&name)?.map(|text| Keyring::parse(text.expose())) {
            warn!(group = %name, "group file missing (quarantined earlier): repairing from peers");
            repairs.push((name, keys.key().clone()));
        }
    }
    Ok((loaded, repairs))
}

/// The group a persist operation writes.
fn persist_op_group(op: &PersistOp) -> &str {
    match op {
        PersistOp::CreateGroup { group, .. }
        | PersistOp::Keys { group, .. }
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

/// Logs each peer whose state changed between two views (issue 12: an operator reads node
/// up, down and leave in the log). A peer turning `unknown` (this node starting or resuming) is
/// not news, so an ordinary restart logs each peer once, as live.
fn log_liveness_changes(before: &MeshView, after: &MeshView, self_id: &str) {
    for node in after.nodes.values().filter(|node| node.id != self_id) {
        let previous = before.nodes.get(&node.id).map(|old| old.liveness);
        if previous == Some(node.liveness) {
            continue;
        }
        let since = node.heartbeat_age.map(|age| age.as_millis() as u64);
        match node.liveness {
            Liveness::Live => info!(node = %node.id, addr = %node.addr, "node is live"),
            Liveness::Dead => {
                warn!(node = %node.id, silent_ms = ?since, "node is dead: no heartbeat within the detection bound")
            }
            Liveness::Leaving => info!(node = %node.id, "node is leaving (graceful shutdown)"),
            Liveness::Unknown => {}
        }
    }
}

fn system_clock() -> Millis {
    Millis(crate::wall_clock::unix_millis())
}

fn error_response(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

fn command_error_response(error: &CommandError) -> Response {
    let code = match error {
        CommandError::UnknownGroup(_) => ErrorCode::UnknownGroup,
        CommandError::AlreadyExists(_) | CommandError::JoinInProgress(_) => ErrorCode::AlreadyExists,
        CommandError::Edit(EditError::Unchanged) => ErrorCode::Unchanged,
        CommandError::Edit(EditError::ConditionFailed { .. }) => ErrorCode::ConditionFailed,
        CommandError::Edit(EditError::SchemaViolation { .. } | EditError::SchemaUnusable { .. }) => {
            ErrorCode::SchemaViolation
        }
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

    /// Hands a peer's message to the replica, timed for `/metrics`.
    fn handle_peer(&mut self, incoming: Incoming) {
        let started = Instant::now();
        let now = self.now();
        self.replica.handle(now, Input::Peer { from: incoming.from, bytes: incoming.bytes });
        self.metrics.observe_apply(started.elapsed());
    }

    fn command(&mut self, command: Command, reply: PendingReply) {
        self.next_command += 1;
        let id = self.next_command;
        self.command_started.insert(id, Instant::now());
        self.pending.insert(id, reply);
        self.pending_groups.insert(id, command.group().to_owned());
        let now = self.now();
        self.replica.handle(now, Input::Command { id, command });
    }

    async fn refresh_membership(&mut self) {
        let view = self.membership.view().await;
        if view.over_cap && !self.mesh.over_cap {
            error!(nodes = view.nodes.len(), "mesh reached its node cap; larger meshes are not supported");
        }
        // The filter refuses new node states once chitchat holds the cap (dead nodes and old
        // generations count there, not in the view): a refusal means the mesh is at its cap,
        // even when the view is below it, for `CAP_REFUSAL_HOLD`.
        let refused = self.membership.seal_stats().nodes_over_cap.load(Ordering::Relaxed);
        if refused > self.cap_refusals.total {
            self.cap_refusals.last = Some(Instant::now());
        }
        self.cap_refusals.total = refused;
        let mut peers = BTreeMap::new();
        for node in view.nodes.values().filter(|n| n.id != self.node_id) {
            // A summary the last view held unchanged was parsed then: the replica's view holds it
            // (it is always the one built from `self.mesh`). Parsing every peer's summaries on
            // every poll was a tenth of a 150-node simulation's time (docs/benchmarks.md).
            let before = self.mesh.nodes.get(&node.id).map(|old| &old.groups);
            let parsed = self.replica.membership().peers.get(&node.id).map(|peer| &peer.groups);
            let groups = node
                .groups
                .iter()
                .filter_map(|(g, v)| {
                    let unchanged = before.and_then(|old| old.get(g)).is_some_and(|old| old == v);
                    let known = parsed.and_then(|peer| peer.get(g)).filter(|_| unchanged).cloned();
                    known.or_else(|| GroupGossip::parse(v)).map(|gossip| (g.clone(), gossip))
                })
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
        self.follow_revocations().await;
        self.follow_token_uses().await;
        self.spread_audit().await;
        log_liveness_changes(&self.mesh, &view, &self.node_id);
        self.mesh = view;
        self.judge_alerts();
        self.save_history(false).await;
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
        // After the view went in: a save never holds up quorum and fencing decisions.
        self.flush_reports(false).await;
    }

    /// Runs the anomaly rules over the view just taken and logs what they raised and cleared.
    fn judge_alerts(&mut self) {
        let observed: Vec<Observed<'_>> = self
            .mesh
            .nodes
            .values()
            .filter(|node| node.id != self.node_id)
            .map(|node| Observed {
                id: &node.id,
                labels: &node.labels,
                seen: match node.liveness {
                    Liveness::Live => Seen::Live,
                    Liveness::Unknown => Seen::Unknown,
                    Liveness::Dead => Seen::Dead,
                    Liveness::Leaving => Seen::Leaving,
                },
                heartbeat_age_ms: node.heartbeat_age.map(|age| age.as_millis() as u64),
            })
            .collect();
        let now = Moment { mono_ms: self.now().0, wall_ms: self.wall_clock().0 };
        if let Some(history) = &mut self.history {
            history.observe(now.wall_ms, &observed);
        }
        for change in self.alerts.observe(now, &observed) {
            if let Some(webhooks) = &self.webhooks {
                webhooks.notify(&change);
            }
            match change {
                AlertChange::Raised(alert) => {
                    warn!(kind = alert.kind.as_str(), subject = %alert.subject, "alert: {}", alert.message)
                }
                AlertChange::Cleared(alert) => {
                    info!(kind = alert.kind.as_str(), subject = %alert.subject, "alert cleared: {}", alert.message)
                }
            }
        }
    }

    /// Publishes the apply reports that changed (gossip key `rep:<group>`, so `status` on every
    /// node shows this node's processes) and saves them beside the group's file (SPEC F16). A
    /// failed save is logged; the rows stay in memory and the next change saves them again.
    ///
    /// Bounded in rate: published at most every [`REPORT_PUBLISH_INTERVAL`], saved at most every
    /// [`REPORT_SAVE_INTERVAL`] (all groups in one call to the store), or both `now` (shutdown).
    async fn flush_reports(&mut self, now: bool) {
        if now || self.reports_flushed.0.elapsed() >= REPORT_PUBLISH_INTERVAL {
            self.reports_flushed.0 = Instant::now();
            self.follow_releases();
            for group in self.reports.take_unpublished() {
                let value = self.reports.gossip_value(&group);
                self.membership.publish(&format!("{}{group}", crate::reports::REPORT_PREFIX), &value);
            }
            // The members' reports, for `status`: only the groups held here.
            let mut remote = BTreeMap::new();
            let held: Vec<String> = self.replica.group_names().map(str::to_owned).collect();
            for group in held {
                let values = self.membership.values_of(&format!("{}{group}", crate::reports::REPORT_PREFIX)).await;
                remote.insert(group, values);
            }
            self.remote_reports = remote;
            // With the members' reports fresh: the guards of gated groups' releases (F15).
            self.run_guards();
        }
        if !now && self.reports_flushed.1.elapsed() < REPORT_SAVE_INTERVAL {
            return;
        }
        self.reports_flushed.1 = Instant::now();
        // A group left is saved empty, so a later join does not bring back the old copy's.
        let files: Vec<(String, Vec<u8>)> =
            self.reports.take_unsaved().into_iter().map(|group| (group.clone(), self.reports.saved(&group))).collect();
        if files.is_empty() {
            return;
        }
        let failed = self
            .with_store(move |store| {
                let mut failed = Vec::new();
                for (group, bytes) in files {
                    if let Err(error) = store.write_reports(&group, &bytes) {
                        failed.push((group, error.to_string()));
                    }
                }
                failed
            })
            .await
            .unwrap_or_else(|error| vec![(String::new(), error.to_string())]);
        for (group, error) in failed {
            warn!(%group, %error, "cannot save the group's apply reports; trying again later");
            if !group.is_empty() {
                self.reports.unsaved_again(&group);
            }
        }
    }

    /// Saves the health history when it is due (every [`HISTORY_SAVE_INTERVAL`]) or `now`. The
    /// bytes are made here and written off this thread; a failed write is logged, and the next
    /// one tries again.
    async fn save_history(&mut self, now: bool) {
        if self.history.is_none() || (!now && self.history_saved.elapsed() < HISTORY_SAVE_INTERVAL) {
            return;
        }
        // One write at a time: a periodic save still running is skipped (a stalled disk does not
        // pile writers up) and awaited before the last one (two writers would share the file).
        if let Some(write) = &self.history_write {
            if !now && !write.is_finished() {
                return;
            }
            if let Some(write) = self.history_write.take() {
                // A hung disk must not hold the shutdown: wait a bounded time, then go on.
                match tokio::time::timeout(HISTORY_SAVE_WAIT, write).await {
                    Ok(result) => report_history_write(result),
                    Err(_) => return warn!("the health history's last save is stuck; not saved again"),
                }
            }
        }
        self.history_saved = Instant::now();
        let Some(history) = &self.history else { return };
        let bytes = match history.snapshot() {
            Ok(bytes) => bytes,
            Err(error) => return warn!(%error, "cannot encode the health history"),
        };
        let path = self.history_file.clone();
        let write = tokio::task::spawn_blocking(move || write_private_atomically(&path, &bytes));
        if now {
            // At shutdown: the write must end before the process does, within a bound.
            match tokio::time::timeout(HISTORY_SAVE_WAIT, write).await {
                Ok(result) => report_history_write(result),
                Err(_) => warn!("the health history was not saved in {HISTORY_SAVE_WAIT:?}; stopping without it"),
            }
        } else {
            self.history_write = Some(write);
        }
    }

    fn peer_addr(&self, node: &str) -> Option<SocketAddr> {
        self.mesh.nodes.get(node).map(|n| n.addr)
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
