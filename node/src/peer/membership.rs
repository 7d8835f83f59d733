//! Membership and heartbeats through chitchat 0.11.2, carried over our authenticated
//! [`PeerNetwork`] instead of plaintext UDP. This adapter publishes this node's small per-node
//! summaries (labels, group digests, a leaving flag) and turns chitchat's state into a
//! [`MeshView`] for the daemon. It makes no protocol decisions.
//!
//! FACTS: never delete chitchat keys (overwrite them), keep values small, keep node ids short,
//! and refuse to grow past a cap instead of reaching chitchat's digest-overflow panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::Context as _;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable, FailureDetectorConfig, NodeState,
    Serializable, spawn_chitchat,
};
use tokio::sync::{Mutex, mpsc};
use tracing::{error, warn};

use super::gossip_filter::{GossipFilter, GossipSealStats, Refusal, Verdict};
use super::gossip_seal::{BEAT_KEY, CERT_KEY, GossipSeal, payload, seal_value};
use crate::peer::transport::{Channel, GOSSIP_FRAME_BYTES_MAX, Incoming, PeerNetwork};

/// Key prefix for labels (`label:region` = `eu-west`).
pub const LABEL_PREFIX: &str = "label:";

/// Key prefix for group summaries (`grp:checkout` = digest;revision;version;proof;heads).
pub const GROUP_PREFIX: &str = "grp:";

/// Value of a group key after this node left the group (keys are overwritten, never deleted).
pub const GROUP_LEFT: &str = "-";

/// Value of a group key while this node repairs the group (its file could not be read): not
/// held now, but not left either.
pub const GROUP_WITHDRAWN: &str = "~";

/// Key of the graceful-leave flag (SPEC F1).
pub const LEAVING_KEY: &str = "leaving";

pub use crate::limits::MESH_NODES_MAX;

/// A gossip message whose digest alone is this large would overflow chitchat's reply budget
/// (its receiving task asserts); such messages are dropped and the overflow reported.
const SYN_BYTES_MAX: usize = GOSSIP_FRAME_BYTES_MAX - 4 * 1024;

/// How long a dead node's state is kept before chitchat forgets it. FACTS: dead nodes count in
/// the digest for half this time, so hours, not the 24 h default.
pub const DEAD_NODE_GRACE: Duration = Duration::from_secs(2 * 60 * 60);

/// chitchat's phi is the time since a peer's last heartbeat over the mean heartbeat interval; past
/// this it holds the peer dead. 8 is chitchat's default and what FACTS measured (a crash seen in
/// 1.8-2.7 s at 300 ms gossip).
pub const PHI_THRESHOLD: f64 = 8.0;

/// chitchat judges liveness after each gossip round, and this node reads the verdict at its next
/// poll: a heartbeat heard less than this many gossip intervals ago may not be judged yet.
pub const JUDGE_LAG_GOSSIP_INTERVALS: u32 = 2;

/// A membership poll that comes later than its period by more than this many gossip intervals
/// means this node did not run for a while: it was paused (SIGSTOP, a frozen VM) or its event
/// loop stalled. Two intervals: chitchat needs about eight mean intervals of silence to call a
/// peer dead, and the mean can be half the gossip interval in a small mesh (every exchange
/// advances a heartbeat), so a shorter stall cannot make it err, and a longer one may. A false
/// alarm costs little: it only turns "dead" verdicts into "unknown" for one detection bound.
pub const PAUSE_GOSSIP_INTERVALS: u32 = 2;

/// A node signs a beat (its heartbeat, under [`BEAT_KEY`]) every this many gossip periods: 1 s
/// at 250 ms. Often enough that a live node's latest beat is always younger than
/// [`beat_fresh_for`]; rare enough that beats add about one signed value per node per second to
/// gossip (and one signature check per node per second on every peer).
pub const BEAT_GOSSIP_INTERVALS: u32 = 4;

/// How long the outbox of published values waits after a flush before the next one. Every
/// write changes the writer's group summary and every member's, and each value published costs
/// an ECDSA signature (about 30 µs): signed one by one they took 9% of a daemon's thread under
/// 16 concurrent writers (issue 14). chitchat sends a node's values only in its gossip rounds
/// (every `gossip_interval`, 100 ms in the tests, 1 s by default), so holding a value this long
/// delays no round by more than this, and bounds the signatures to 200 a second.
pub const PUBLISH_COALESCE: Duration = Duration::from_millis(5);

/// A peer whose signed beat advanced here less than this long ago is live, whatever chitchat's
/// detector says of its (unsigned, forgeable) heartbeats: the detection bound. A live node's
/// latest beat is at most [`BEAT_GOSSIP_INTERVALS`] periods old plus its way here, half the
/// bound, so a forged heartbeat never makes it flicker dead; a crashed node's last beat goes
/// stale within the bound plus that way, about when chitchat's detector gives up on it too.
pub fn beat_fresh_for(gossip_interval: Duration) -> Duration {
    detection_bound(gossip_interval)
}

/// chitchat's "live" counts only while the peer's signed beat advanced (or it was first seen)
/// less than this long ago: four detection bounds, 8 s at 250 ms. Heartbeats are unsigned, so
/// a relay could keep a crashed node's heartbeat rising for an hour (up to
/// `HEARTBEAT_AHEAD_MAX` past its last beat); without fresh beats it is `unknown` after this,
/// never `live`. Four bounds leave room for beats slowed by a large mesh.
pub fn beat_trusted_for(gossip_interval: Duration) -> Duration {
    detection_bound(gossip_interval) * 4
}

/// How long a peer may stay silent before it is judged dead: [`PHI_THRESHOLD`] mean heartbeat
/// intervals, with the mean taken as the gossip interval (chitchat starts every peer's mean
/// there and smooths toward it). About 2 s at the default 250 ms gossip period. A crash is seen
/// within this plus up to two gossip rounds (chitchat judges after each round, and the mean may
/// sit a little above the period) plus one membership poll: about 2.6 s at 250 ms.
pub fn detection_bound(gossip_interval: Duration) -> Duration {
    gossip_interval.mul_f64(PHI_THRESHOLD)
}

/// The failure detector's settings for a gossip period.
pub fn failure_detector_config(gossip_interval: Duration) -> FailureDetectorConfig {
    FailureDetectorConfig {
        phi_threshold: PHI_THRESHOLD,
        // A small window keeps memory flat in large meshes (FACTS: 1,000 nodes, 3.8 GB at
        // 50 vs 11.3 GB at 1,000) and adapts quickly to the gossip interval.
        sampling_window_size: 100,
        // An interval longer than the detection bound is not a heartbeat interval but an
        // outage (a partition, a pause): the peer was dead by the detector's own measure
        // meanwhile. chitchat keeps every interval up to `max_interval` as a sample, and when a
        // peer comes back it measures the first interval from the heartbeat before the outage:
        // with 10 s here, a 5 s partition became one 5 s sample in an emptied window, the mean
        // jumped from 0.25 s to about 1 s, and a crash right after the heal took 6-7 s to see
        // instead of 2 s. Dropped, the peer needs two fresh heartbeats to be live again (one
        // interval more) and its mean stays the gossip interval.
        max_interval: detection_bound(gossip_interval),
        initial_interval: gossip_interval,
        dead_node_grace_period: DEAD_NODE_GRACE,
    }
}

/// True when a membership poll `gap` after the previous one shows this node was paused or
/// stalled (see [`PAUSE_GOSSIP_INTERVALS`]).
pub fn is_pause(gap: Duration, poll_period: Duration, gossip_interval: Duration) -> bool {
    gap > poll_period + gossip_interval * PAUSE_GOSSIP_INTERVALS
}

/// What this node knows of its own ability to judge peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JudgeClock {
    /// Time since membership started on this node.
    pub since_start: Duration,
    /// Time since this node last resumed from a pause or stall (`None`: never).
    pub since_resume: Option<Duration>,
    /// [`detection_bound`] of the gossip period.
    pub detection_bound: Duration,
    /// The gossip period: chitchat judges liveness once per round.
    pub gossip_interval: Duration,
}

/// What this node knows of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEvidence {
    /// It announced a graceful shutdown.
    pub leaving: bool,
    /// chitchat's failure detector holds it live.
    pub detector_live: bool,
    /// Heartbeat advances seen here since it appeared in this node's view, the first sighting
    /// included (saturating).
    pub heartbeats_heard: u32,
    /// Time since its heartbeat last advanced here (since it appeared, if it never did).
    pub heartbeat_age: Duration,
    /// Its signed beat advanced here less than [`beat_fresh_for`] ago (a new beat, not the one
    /// it had when this node first saw it).
    pub beat_fresh: bool,
    /// Its signed beat advanced, or it appeared, less than [`beat_trusted_for`] ago.
    pub beat_recent: bool,
}

/// Judges one peer (SPEC invariant 5; issue 11: unknown is not dead). chitchat 0.11.2 holds dead
/// every peer it cannot judge: one with fewer than two heartbeats (its phi is undefined), and
/// every peer right after this node was paused (the pause looks like their silence). So a
/// "not live" verdict becomes `Dead` only when this node could have judged:
///
/// * it has run membership for at least one detection bound since it started and since it last
///   resumed from a pause or stall;
/// * the peer was heard twice since it appeared, or has been silent for a whole detection bound
///   since it appeared (a peer known only from others' gossip, never heard to advance);
/// * the peer's last heartbeat is older than [`JUDGE_LAG_GOSSIP_INTERVALS`] gossip rounds:
///   chitchat judges after each round and this node reads the verdict at its next poll, so a
///   fresher heartbeat may not be judged yet (a peer coming back). A peer the detector rightly
///   holds dead has been silent for about eight mean intervals, far longer.
///
/// A leaving peer stays leaving (dead for quorums). A fresh signed beat is a live verdict:
/// chitchat's heartbeats ride unsigned in digests, so a relay could push one far ahead and make
/// the detector ignore the real ones (issue 12); a beat only its owner can sign outweighs that.
/// chitchat's live verdict stands while the peer's beats are recent ([`beat_trusted_for`]);
/// after that it only makes the peer `Unknown`, since a relay could be faking its heartbeats.
pub fn judge(clock: &JudgeClock, peer: &PeerEvidence) -> Liveness {
    if peer.leaving {
        return Liveness::Leaving;
    }
    if peer.beat_fresh || (peer.detector_live && peer.beat_recent) {
        return Liveness::Live;
    }
    if peer.detector_live {
        // Heartbeats without signed beats for a long while: maybe relayed forgeries.
        return Liveness::Unknown;
    }
    let warming_up = clock.since_start < clock.detection_bound;
    let resuming = clock.since_resume.is_some_and(|since| since < clock.detection_bound);
    let unheard = peer.heartbeats_heard < 2 && peer.heartbeat_age < clock.detection_bound;
    let unjudged = peer.heartbeat_age < clock.gossip_interval * JUDGE_LAG_GOSSIP_INTERVALS;
    if warming_up || resuming || unheard || unjudged { Liveness::Unknown } else { Liveness::Dead }
}

/// Settings of the membership layer.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// This node's id.
    pub node_id: String,
    /// Increases at every start (the store's incarnation): a restarted node rejoins anew.
    pub generation: u64,
    /// This node's endpoint address, as peers reach it.
    pub advertise: SocketAddr,
    /// Seed addresses of existing nodes.
    pub seeds: Vec<SocketAddr>,
    /// Cluster name: nodes of another cluster are refused by chitchat.
    pub cluster_id: String,
    /// Gossip period.
    pub gossip_interval: Duration,
    /// Labels published for this node.
    pub labels: BTreeMap<String, String>,
    /// How often the daemon reads the view ([`Membership::view`]): a much later read means this
    /// node was paused.
    pub poll_period: Duration,
    /// Signs this node's gossip and checks its peers' (issue 12).
    pub seal: Arc<dyn GossipSeal>,
    /// The runtime gossip runs on (chitchat's task and the beat): in konord the network's,
    /// not the daemon's, so that a daemon busy with Automerge for seconds never stops this
    /// node's heartbeats (issue 12, CPU isolation). `None`: the caller's runtime (the simulator).
    pub runtime: Option<tokio::runtime::Handle>,
    /// The most nodes the mesh holds: [`MESH_NODES_MAX`] (smaller only in tests of the cap).
    pub nodes_max: usize,
}

/// Liveness of a node as seen here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heartbeats arrive.
    Live,
    /// This node cannot judge yet (see [`judge`]): it started or resumed from a pause less than
    /// a detection bound ago, or has not heard the peer twice since it appeared.
    Unknown,
    /// The failure detector gave up on it.
    Dead,
    /// It announced a graceful shutdown.
    Leaving,
}

/// One node in the view.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshNode {
    /// Node id.
    pub id: String,
    /// Endpoint address.
    pub addr: SocketAddr,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Liveness.
    pub liveness: Liveness,
    /// Time since its heartbeat last advanced here (`None` for this node).
    pub heartbeat_age: Option<Duration>,
    /// Raw group summaries it publishes (left groups excluded).
    pub groups: BTreeMap<String, String>,
    /// Groups it announced it left (their key holds the left marker).
    pub left_groups: std::collections::BTreeSet<String>,
}

/// The mesh as this node sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshView {
    /// Every known node (this one included), the newest generation of each id.
    pub nodes: BTreeMap<String, MeshNode>,
    /// True when the mesh reached its cap ([`MESH_NODES_MAX`], or the configured one).
    pub over_cap: bool,
}

/// A peer's heartbeat as heard here.
#[derive(Debug, Clone, Copy)]
struct Heard {
    /// Its last heartbeat value.
    heartbeat: u64,
    /// When that value was first seen here.
    at: Instant,
    /// Advances seen since it appeared, the first sighting included.
    count: u32,
}

/// What the view remembers between reads.
#[derive(Debug, Default)]
struct Tracker {
    heard: BTreeMap<ChitchatId, Heard>,
    /// Each peer's signed beat (its version) as heard here.
    beats: BTreeMap<ChitchatId, Heard>,
    /// When the view was last read.
    last_read: Option<Instant>,
    /// When this node last resumed from a pause or stall.
    resumed: Option<Instant>,
}

impl Tracker {
    /// Forgets the peers chitchat forgot (`held` is false), so the tracker stays as small as the
    /// mesh instead of growing with every node generation ever heard.
    fn forget_unheld(&mut self, held: impl Fn(&ChitchatId) -> bool) {
        self.heard.retain(|id, _| held(id));
        self.beats.retain(|id, _| held(id));
    }
}

#[cfg(test)]
mod adapter_tests {
    use super::*;

    /// Counts what is sent, to where.
    struct Recorder {
        addr: SocketAddr,
        sent: std::sync::Mutex<Vec<SocketAddr>>,
    }

    impl PeerNetwork for Recorder {
        fn local_addr(&self) -> SocketAddr {
            self.addr
        }

        fn send(&self, addr: SocketAddr, _expect: Option<&str>, _channel: Channel, _bytes: Vec<u8>) {
            self.sent.lock().unwrap().push(addr);
        }
    }

    #[tokio::test]
    async fn regression_a_restarted_node_never_gossips_with_its_previous_generation_at_its_own_address() {
        // A restart right after SIGTERM logged "forged gossip refused: news about this node
        // itself": chitchat gossiped with the node's dead previous generation, at its address.
        let own = SocketAddr::from(([10, 0, 0, 2], 7400));
        let peer = SocketAddr::from(([10, 0, 0, 1], 7400));
        let network = Arc::new(Recorder { addr: own, sent: std::sync::Mutex::default() });
        let seal: Arc<dyn GossipSeal> = Arc::new(crate::peer::gossip_seal::SimSeal::new("n2"));
        let self_id = ChitchatId::new("n2".to_owned(), 2, own);
        let filter = GossipFilter::new(seal, "c", self_id, MESH_NODES_MAX);
        let (_tx, inbox) = mpsc::channel(1);
        let mut socket = GossipSocket {
            network: network.clone(),
            inbox,
            filter: Arc::new(std::sync::Mutex::new(filter)),
            started: Instant::now(),
        };
        socket.send(own, ChitchatMessage::BadCluster).await.unwrap();
        socket.send(peer, ChitchatMessage::BadCluster).await.unwrap();
        assert_eq!(*network.sent.lock().unwrap(), [peer]);
    }

    #[test]
    fn heartbeats_of_nodes_chitchat_forgot_are_pruned() {
        let node = |generation| ChitchatId::new("n2".to_owned(), generation, SocketAddr::from(([10, 0, 0, 2], 7400)));
        let heard = Heard { heartbeat: 3, at: Instant::now(), count: 2 };
        let mut tracker = Tracker::default();
        for generation in [1, 2] {
            tracker.heard.insert(node(generation), heard);
            tracker.beats.insert(node(generation), heard);
        }
        // Generation 1 was garbage-collected by chitchat; generation 2 runs.
        tracker.forget_unheld(|id| id.generation_id == 2);
        assert_eq!(tracker.heard.keys().chain(tracker.beats.keys()).cloned().collect::<Vec<_>>(), [node(2), node(2)]);
    }
}

/// The running membership layer.
pub struct Membership {
    handle: ChitchatHandle,
    node_id: String,
    self_id: ChitchatId,
    cluster: String,
    seal: Arc<dyn GossipSeal>,
    filter: Arc<std::sync::Mutex<GossipFilter>>,
    seal_stats: Arc<GossipSealStats>,
    started: Instant,
    gossip_interval: Duration,
    poll_period: Duration,
    nodes_max: usize,
    tracker: Mutex<Tracker>,
    /// Signs a beat every [`BEAT_GOSSIP_INTERVALS`] gossip periods; aborted with the membership.
    _beats: AbortOnDrop,
    /// Values published and not signed into chitchat yet.
    outbox: Arc<Outbox>,
    /// Signs the outbox into chitchat, off the daemon's thread; aborted with the membership.
    _flusher: AbortOnDrop,
}

/// Values published since the last flush, each key's latest only, in the order of their last
/// publication.
#[derive(Debug, Default)]
struct Outbox {
    values: std::sync::Mutex<Vec<(String, String)>>,
    ready: tokio::sync::Notify,
}

impl Outbox {
    fn put(&self, key: &str, value: &str) {
        let mut values = self.values.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        values.retain(|(waiting, _)| waiting != key);
        values.push((key.to_owned(), value.to_owned()));
        drop(values);
        self.ready.notify_one();
    }

    fn take(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.values.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// A task that ends when its owner is dropped (a crashed simulated node's beats stop with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// chitchat's transport, over our network.
struct GossipTransport {
    network: Arc<dyn PeerNetwork>,
    inbox: Mutex<Option<mpsc::Receiver<Incoming>>>,
    filter: Arc<std::sync::Mutex<GossipFilter>>,
}

struct GossipSocket {
    network: Arc<dyn PeerNetwork>,
    inbox: mpsc::Receiver<Incoming>,
    filter: Arc<std::sync::Mutex<GossipFilter>>,
    /// The origin of the filter's clock.
    started: Instant,
}

#[async_trait]
impl Transport for GossipTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inbox = self.inbox.lock().await.take().ok_or_else(|| anyhow::anyhow!("gossip socket already open"))?;
        Ok(Box::new(GossipSocket {
            network: self.network.clone(),
            inbox,
            filter: self.filter.clone(),
            started: Instant::now(),
        }))
    }
}

#[async_trait]
impl Socket for GossipSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        // After a restart, peers' gossip holds this node's previous generation at this very
        // address, dead, and chitchat now and then gossips with dead nodes: that would be this
        // node talking to itself, and its answer news about itself, refused as forged.
        if to == self.network.local_addr() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(message.serialized_len());
        message.serialize(&mut bytes);
        self.network.send(to, None, Channel::Gossip, bytes);
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let incoming = self.inbox.recv().await.ok_or_else(|| anyhow::anyhow!("network closed"))?;
            let admitted = match self.admit(&incoming) {
                Some(bytes) => bytes,
                None => continue,
            };
            let bytes = admitted.as_deref().unwrap_or(&incoming.bytes);
            let mut slice = bytes;
            let message = match ChitchatMessage::deserialize(&mut slice) {
                Ok(message) => message,
                Err(error) => {
                    warn!(from = %incoming.from, %error, "undecodable gossip message dropped");
                    continue;
                }
            };
            if matches!(message, ChitchatMessage::Syn { .. }) && bytes.len() > SYN_BYTES_MAX {
                error!(
                    from = %incoming.from,
                    bytes = bytes.len(),
                    max_nodes = MESH_NODES_MAX,
                    "gossip digest too large: the mesh exceeds its node cap; message dropped"
                );
                continue;
            }
            return Ok((incoming.addr, message));
        }
    }
}

impl GossipSocket {
    /// Runs the gossip filter over a received message: `None` drops it, `Some(None)` keeps it
    /// as received, `Some(Some(bytes))` hands chitchat the filtered message instead.
    fn admit(&self, incoming: &Incoming) -> Option<Option<Vec<u8>>> {
        let mut filter = self.filter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        filter.set_clock(Instant::now().saturating_duration_since(self.started).as_millis() as u64);
        let verdict = filter.admit(&incoming.bytes);
        let stats = filter.stats();
        for (node, refusal) in filter.last_refusals() {
            match refusal {
                Refusal::Forged(why) => {
                    // Logged at powers of two: a forger cannot flood the log.
                    let count = stats.node_deltas_forged.load(std::sync::atomic::Ordering::Relaxed);
                    if count.is_power_of_two() {
                        warn!(
                            relayed_by = %incoming.from,
                            node = %node.node_id,
                            generation = node.generation_id,
                            why = %why,
                            refused_so_far = count,
                            "forged gossip refused: a peer relayed state its owner did not sign"
                        );
                    }
                }
                Refusal::OverCap => {
                    let count = stats.nodes_over_cap.load(std::sync::atomic::Ordering::Relaxed);
                    if count.is_power_of_two() {
                        error!(
                            node = %node.node_id,
                            max_nodes = filter.nodes_max(),
                            refused_so_far = count,
                            "the mesh is at its node cap: a new node is refused"
                        );
                    }
                }
                Refusal::Unverifiable => {
                    tracing::debug!(node = %node.node_id, generation = node.generation_id, "gossip about a node whose certificate is unknown here, skipped");
                }
                Refusal::Revoked => {
                    tracing::debug!(relayed_by = %incoming.from, node = %node.node_id, "gossip about a node whose certificate is revoked, dropped");
                }
            }
        }
        match verdict {
            Verdict::Keep => Some(None),
            Verdict::Rewritten(bytes) => Some(Some(bytes)),
            Verdict::Drop(error) => {
                warn!(from = %incoming.from, %error, "undecodable gossip message dropped");
                None
            }
        }
    }
}

/// Sets `key` to `value` in this node's own state (overwriting; never deleting), signed for
/// the version chitchat gives it; nothing when the value is already there.
fn publish_sealed(
    seal: &dyn GossipSeal,
    cluster: &str,
    self_id: &ChitchatId,
    state: &mut NodeState,
    key: &str,
    value: &str,
) {
    if state.get(key).map(payload) == Some(value) {
        return;
    }
    // chitchat gives a changed value the next version (NodeState::set).
    let version = state.max_version() + 1;
    let sealed = seal_value(seal, cluster, self_id, key, version, value);
    state.set(key, sealed);
}

/// Signs this node's heartbeat as a beat every `period`, on the gossip runtime: a beat says the
/// node's process and gossip are alive, so a daemon busy with a long Automerge step does not
/// stop it (issue 12, CPU isolation); a stopped or crashed process does.
async fn sign_beats(
    chitchat: Arc<Mutex<chitchat::Chitchat>>,
    seal: Arc<dyn GossipSeal>,
    cluster: String,
    self_id: ChitchatId,
    period: Duration,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        let heartbeat = u64::from(state.heartbeat());
        publish_sealed(seal.as_ref(), &cluster, &self_id, state, BEAT_KEY, &heartbeat.to_string());
    }
}

/// Signs what the outbox holds into this node's chitchat state, then waits
/// [`PUBLISH_COALESCE`] before the next flush, on the gossip runtime.
async fn flush_outbox(
    chitchat: Arc<Mutex<chitchat::Chitchat>>,
    seal: Arc<dyn GossipSeal>,
    cluster: String,
    self_id: ChitchatId,
    outbox: Arc<Outbox>,
) {
    loop {
        outbox.ready.notified().await;
        publish_all(&chitchat, seal.as_ref(), &cluster, &self_id, &outbox).await;
        tokio::time::sleep(PUBLISH_COALESCE).await;
    }
}

/// Signs what `outbox` holds into chitchat's state. The outbox is emptied under chitchat's
/// lock: two flushes (the flusher's and [`Membership::flush`]) must not write what they took
/// in another order than they took it, or an older value would overwrite a newer one.
async fn publish_all(
    chitchat: &Mutex<chitchat::Chitchat>,
    seal: &dyn GossipSeal,
    cluster: &str,
    self_id: &ChitchatId,
    outbox: &Outbox,
) {
    let mut chitchat = chitchat.lock().await;
    let values = outbox.take();
    if values.is_empty() {
        return;
    }
    let state = chitchat.self_node_state();
    for (key, value) in values {
        publish_sealed(seal, cluster, self_id, state, &key, &value);
    }
}

impl Membership {
    /// Starts gossip: chitchat on our network, initial keys published.
    pub async fn start(
        config: MembershipConfig,
        network: Arc<dyn PeerNetwork>,
        gossip_inbox: mpsc::Receiver<Incoming>,
    ) -> anyhow::Result<Membership> {
        let chitchat_id = ChitchatId::new(config.node_id.clone(), config.generation, config.advertise);
        let filter = GossipFilter::new(config.seal.clone(), &config.cluster_id, chitchat_id.clone(), config.nodes_max);
        let seal_stats = filter.stats();
        let filter = Arc::new(std::sync::Mutex::new(filter));
        let self_id = chitchat_id.clone();
        let failure_detector_config = failure_detector_config(config.gossip_interval);
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.advertise,
            seed_nodes: config.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config,
            marked_for_deletion_grace_period: DEAD_NODE_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                state.get(LEAVING_KEY).map(payload) != Some("1")
            })),
        };
        // chitchat sets the initial keys in this order at versions 1, 2, ... (after the first
        // heartbeat), so each is signed for its version; the certificate comes first.
        let mut initial = vec![
            (CERT_KEY.to_owned(), config.seal.own_cert()),
            (LEAVING_KEY.to_owned(), "0".to_owned()),
            (BEAT_KEY.to_owned(), "1".to_owned()),
        ];
        for (key, value) in &config.labels {
            initial.push((format!("{LABEL_PREFIX}{key}"), value.clone()));
        }
        let sealed = initial
            .iter()
            .zip(1u64..)
            .map(|((key, value), version)| {
                (key.clone(), seal_value(config.seal.as_ref(), &config.cluster_id, &self_id, key, version, value))
            })
            .collect();
        let transport = GossipTransport { network, inbox: Mutex::new(Some(gossip_inbox)), filter: filter.clone() };
        let runtime = config.runtime.clone().unwrap_or_else(tokio::runtime::Handle::current);
        // chitchat spawns its task on the runtime that runs this call.
        let handle = runtime
            .spawn(async move { spawn_chitchat(chitchat_config, sealed, &transport).await })
            .await
            .context("the gossip task failed to start")??;
        {
            let chitchat = handle.chitchat();
            let mut chitchat = chitchat.lock().await;
            let state = chitchat.self_node_state();
            for ((key, _), version) in initial.iter().zip(1u64..) {
                let actual = state.get_versioned(key).map(|value| value.version);
                anyhow::ensure!(
                    actual == Some(version),
                    "chitchat gave the initial key {key:?} version {actual:?}, not {version}: its signature would not verify"
                );
            }
        }
        let beats = runtime.spawn(sign_beats(
            handle.chitchat(),
            config.seal.clone(),
            config.cluster_id.clone(),
            self_id.clone(),
            config.gossip_interval * BEAT_GOSSIP_INTERVALS,
        ));
        let outbox = Arc::new(Outbox::default());
        let flusher = runtime.spawn(flush_outbox(
            handle.chitchat(),
            config.seal.clone(),
            config.cluster_id.clone(),
            self_id.clone(),
            outbox.clone(),
        ));
        Ok(Membership {
            handle,
            _beats: AbortOnDrop(beats),
            outbox,
            _flusher: AbortOnDrop(flusher),
            node_id: config.node_id,
            self_id,
            cluster: config.cluster_id,
            seal: config.seal,
            filter,
            seal_stats,
            started: Instant::now(),
            gossip_interval: config.gossip_interval,
            poll_period: config.poll_period,
            nodes_max: config.nodes_max,
            tracker: Mutex::new(Tracker::default()),
        })
    }

    /// Publishes `value` under `key` for this node (overwriting; never deleting), signed for
    /// the version chitchat gives it. Values published within [`PUBLISH_COALESCE`] of each
    /// other are signed together, each key's latest only, off the caller's thread; call
    /// [`Membership::flush`] to have them in chitchat's state before going on.
    pub fn publish(&self, key: &str, value: &str) {
        self.outbox.put(key, value);
    }

    /// Signs every value published so far into chitchat's state now.
    pub async fn flush(&self) {
        publish_all(&self.handle.chitchat(), self.seal.as_ref(), &self.cluster, &self.self_id, &self.outbox).await;
    }

    /// The most nodes the mesh holds ([`MembershipConfig::nodes_max`]).
    pub fn nodes_max(&self) -> usize {
        self.nodes_max
    }

    /// What the gossip filter refused so far.
    pub fn seal_stats(&self) -> Arc<GossipSealStats> {
        self.seal_stats.clone()
    }

    /// Whether this node verified the certificate of `id` (for tests).
    pub fn knows(&self, id: &ChitchatId) -> bool {
        self.filter.lock().unwrap_or_else(std::sync::PoisonError::into_inner).knows(id)
    }

    /// Announces a graceful shutdown: peers stop counting this node as live at once.
    pub async fn set_leaving(&self) {
        // Now, not with the next flush: the rounds left before the gossip stops carry it.
        self.publish(LEAVING_KEY, "1");
        self.flush().await;
    }

    /// Resolves when the gossip task ends (it should not: the daemon restarts membership).
    pub fn termination(&self) -> impl std::future::Future<Output = anyhow::Result<()>> + use<> {
        self.handle.termination_watcher()
    }

    /// Stops gossip.
    pub async fn shutdown(self) {
        if let Err(error) = self.handle.shutdown().await {
            warn!(%error, "gossip did not shut down cleanly");
        }
    }

    /// The value of `key` each node publishes (its newest generation's), by node id: read on
    /// demand, for values too large to copy into every view (apply reports, `rep:<group>`).
    pub async fn values_of(&self, key: &str) -> BTreeMap<String, String> {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let mut newest: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for (id, state) in chitchat.node_states() {
            let Some(value) = state.get(key) else { continue };
            let node = id.node_id.to_string();
            if newest.get(&node).is_none_or(|(generation, _)| *generation < id.generation_id) {
                newest.insert(node, (id.generation_id, payload(value).to_owned()));
            }
        }
        newest.into_iter().map(|(node, (_, value))| (node, value)).collect()
    }

    /// Every value under a key starting with `prefix`, of each node's newest generation, as
    /// (node id, key, payload), but those `skip` (key, payload) says the caller has: read on
    /// demand (revocations, `rev:<id>`).
    pub async fn values_with_prefix(
        &self,
        prefix: &str,
        skip: impl Fn(&str, &str) -> bool,
    ) -> Vec<(String, String, String)> {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let mut newest: BTreeMap<String, (u64, Vec<(String, String)>)> = BTreeMap::new();
        for (id, state) in chitchat.node_states() {
            let node = id.node_id.to_string();
            if newest.get(&node).is_some_and(|(generation, _)| *generation >= id.generation_id) {
                continue;
            }
            let values = state
                .key_values()
                .filter(|(key, value)| key.starts_with(prefix) && !skip(key, payload(value)))
                .map(|(key, value)| (key.to_owned(), payload(value).to_owned()))
                .collect();
            newest.insert(node, (id.generation_id, values));
        }
        newest
            .into_iter()
            .flat_map(|(node, (_, values))| values.into_iter().map(move |(key, value)| (node.clone(), key, value)))
            .collect()
    }

    /// The current view of the mesh. Meant to be read every `poll_period`: a read that comes
    /// much later than that tells this node it was paused or stalled ([`is_pause`]).
    pub async fn view(&self) -> MeshView {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let live: std::collections::BTreeSet<ChitchatId> = chitchat.live_nodes().cloned().collect();
        let now = Instant::now();
        let mut tracker = self.tracker.lock().await;
        if let Some(last) = tracker.last_read
            && is_pause(now.saturating_duration_since(last), self.poll_period, self.gossip_interval)
        {
            warn!(
                gap_ms = now.saturating_duration_since(last).as_millis() as u64,
                unknown_for_ms = detection_bound(self.gossip_interval).as_millis() as u64,
                "this node was paused or stalled: peers the failure detector holds dead are unknown for a while"
            );
            tracker.resumed = Some(now);
        }
        tracker.last_read = Some(now);
        let clock = JudgeClock {
            since_start: now.saturating_duration_since(self.started),
            since_resume: tracker.resumed.map(|at| now.saturating_duration_since(at)),
            detection_bound: detection_bound(self.gossip_interval),
            gossip_interval: self.gossip_interval,
        };
        // Forget nodes chitchat forgot, so the tracker stays as small as the mesh.
        tracker.forget_unheld(|id| chitchat.node_states().contains_key(id));
        // The filter forgets, after a margin, the nodes chitchat forgot (the cap counts the mesh
        // as it is).
        {
            let mut filter = self.filter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            filter.forget_unheld(|id| chitchat.node_states().contains_key(id));
            filter.observe_held(chitchat.node_states().len());
        }
        let beat_fresh_for = beat_fresh_for(self.gossip_interval);
        let beat_trusted_for = beat_trusted_for(self.gossip_interval);
        let mut view = MeshView::default();
        let self_id = chitchat.self_chitchat_id().clone();
        for (id, state) in chitchat.node_states() {
            let heartbeat = u64::from(state.heartbeat());
            let heard = tracker.heard.entry(id.clone()).or_insert(Heard { heartbeat, at: now, count: 1 });
            if heard.heartbeat != heartbeat {
                *heard = Heard { heartbeat, at: now, count: heard.count.saturating_add(1) };
            }
            let heard_at = heard.at;
            // The beat's version: only its owner can sign a new one.
            let beat = state.get_versioned(BEAT_KEY).map_or(0, |value| value.version);
            let beat_heard = tracker.beats.entry(id.clone()).or_insert(Heard { heartbeat: beat, at: now, count: 1 });
            if beat_heard.heartbeat != beat {
                *beat_heard = Heard { heartbeat: beat, at: now, count: beat_heard.count.saturating_add(1) };
            }
            let beat_age = now.saturating_duration_since(beat_heard.at);
            let beat_fresh = beat_heard.count >= 2 && beat_age < beat_fresh_for;
            let beat_recent = beat_age < beat_trusted_for;
            let heard_count = tracker.heard.get(id).map_or(1, |heard| heard.count);
            let is_self = *id == self_id;
            let leaving = state.get(LEAVING_KEY).map(payload) == Some("1");
            let liveness = if is_self && !leaving {
                Liveness::Live
            } else {
                let evidence = PeerEvidence {
                    leaving,
                    detector_live: live.contains(id),
                    heartbeats_heard: heard_count,
                    heartbeat_age: now.saturating_duration_since(heard_at),
                    beat_fresh,
                    beat_recent,
                };
                judge(&clock, &evidence)
            };
            // Each kind of key read from its own range of the node's sorted keys: scanning every
            // key (certificates and beats included) three times was most of this loop's cost in
            // a 150-node simulation. `iter_prefix` skips deleted keys, as `key_values` does.
            let labels = state
                .iter_prefix(LABEL_PREFIX)
                .filter_map(|(k, v)| Some((k.strip_prefix(LABEL_PREFIX)?.to_owned(), payload(&v.value).to_owned())))
                .collect();
            let mut groups = BTreeMap::new();
            let mut left_groups = std::collections::BTreeSet::new();
            for (key, value) in state.iter_prefix(GROUP_PREFIX) {
                let Some(group) = key.strip_prefix(GROUP_PREFIX) else { continue };
                match payload(&value.value) {
                    GROUP_LEFT => {
                        left_groups.insert(group.to_owned());
                    }
                    GROUP_WITHDRAWN => {}
                    summary => {
                        groups.insert(group.to_owned(), summary.to_owned());
                    }
                }
            }
            let node = MeshNode {
                id: id.node_id.to_string(),
                addr: id.gossip_advertise_addr,
                labels,
                liveness,
                heartbeat_age: (!is_self).then(|| now.saturating_duration_since(heard_at)),
                groups,
                left_groups,
            };
            // Keep the newest generation of each node id (a restart starts a new one).
            let newer = view.nodes.get(&node.id).is_none_or(|_| {
                chitchat
                    .node_states()
                    .keys()
                    .filter(|other| other.node_id == id.node_id)
                    .all(|other| other.generation_id <= id.generation_id)
            });
            if newer {
                view.nodes.insert(node.id.clone(), node);
            }
        }
        view.over_cap = view.nodes.len() >= self.nodes_max;
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOSSIP: Duration = Duration::from_millis(250);
    const POLL: Duration = Duration::from_millis(100);

    fn clock(since_start_ms: u64, since_resume_ms: Option<u64>) -> JudgeClock {
        JudgeClock {
            since_start: Duration::from_millis(since_start_ms),
            since_resume: since_resume_ms.map(Duration::from_millis),
            detection_bound: detection_bound(GOSSIP),
            gossip_interval: GOSSIP,
        }
    }

    /// A peer chitchat holds dead, heard many times, silent for `age_ms`.
    fn silent(age_ms: u64) -> PeerEvidence {
        PeerEvidence {
            leaving: false,
            detector_live: false,
            heartbeats_heard: 40,
            heartbeat_age: Duration::from_millis(age_ms),
            beat_fresh: false,
            beat_recent: true,
        }
    }

    #[test]
    fn the_detection_bound_is_eight_gossip_intervals() {
        assert_eq!(detection_bound(GOSSIP), Duration::from_secs(2));
        assert_eq!(detection_bound(Duration::from_millis(100)), Duration::from_millis(800));
    }

    #[test]
    fn the_detector_drops_intervals_longer_than_the_detection_bound() {
        let config = failure_detector_config(GOSSIP);
        assert_eq!(config.max_interval, Duration::from_secs(2));
        assert_eq!(config.initial_interval, GOSSIP);
        assert_eq!(config.phi_threshold, PHI_THRESHOLD);
        assert_eq!(config.dead_node_grace_period, DEAD_NODE_GRACE);
    }

    #[test]
    fn a_peer_silent_for_the_bound_is_dead_once_this_node_can_judge() {
        assert_eq!(judge(&clock(60_000, None), &silent(2_500)), Liveness::Dead);
        assert_eq!(judge(&clock(60_000, Some(30_000)), &silent(2_500)), Liveness::Dead);
    }

    #[test]
    fn a_live_verdict_stands_and_leaving_stays_leaving() {
        let live = PeerEvidence { detector_live: true, ..silent(10) };
        assert_eq!(judge(&clock(10, Some(5)), &live), Liveness::Live);
        assert_eq!(judge(&clock(60_000, None), &live), Liveness::Live);
        let leaving = PeerEvidence { leaving: true, ..live };
        assert_eq!(judge(&clock(60_000, None), &leaving), Liveness::Leaving);
        assert_eq!(judge(&clock(10, None), &PeerEvidence { leaving: true, ..silent(9_000) }), Liveness::Leaving);
    }

    #[test]
    fn heartbeats_without_signed_beats_do_not_keep_a_node_live() {
        // A fresh signed beat is life, whatever the (forgeable) heartbeats say.
        let beating = PeerEvidence { beat_fresh: true, ..silent(9_000) };
        assert_eq!(judge(&clock(60_000, None), &beating), Liveness::Live);
        // Heartbeats (maybe relayed forgeries of a crashed node) with no beat for 4 bounds: not
        // live, and not dead either (the detector is not silent).
        let pumped = PeerEvidence { detector_live: true, beat_recent: false, ..silent(10) };
        assert_eq!(judge(&clock(60_000, None), &pumped), Liveness::Unknown);
        let honest = PeerEvidence { detector_live: true, ..silent(10) };
        assert_eq!(judge(&clock(60_000, None), &honest), Liveness::Live);
    }

    #[test]
    fn peers_are_unknown_not_dead_while_this_node_warms_up() {
        assert_eq!(judge(&clock(0, None), &silent(2_500)), Liveness::Unknown);
        assert_eq!(judge(&clock(1_999, None), &silent(2_500)), Liveness::Unknown);
        assert_eq!(judge(&clock(2_000, None), &silent(2_500)), Liveness::Dead);
    }

    #[test]
    fn peers_are_unknown_not_dead_right_after_a_pause() {
        assert_eq!(judge(&clock(60_000, Some(0)), &silent(3_000)), Liveness::Unknown);
        assert_eq!(judge(&clock(60_000, Some(1_999)), &silent(5_000)), Liveness::Unknown);
        assert_eq!(judge(&clock(60_000, Some(2_000)), &silent(5_000)), Liveness::Dead);
    }

    #[test]
    fn a_peer_heard_once_is_unknown_until_silent_for_the_bound() {
        let once = |age_ms| PeerEvidence { heartbeats_heard: 1, ..silent(age_ms) };
        assert_eq!(judge(&clock(60_000, None), &once(0)), Liveness::Unknown);
        assert_eq!(judge(&clock(60_000, None), &once(1_999)), Liveness::Unknown);
        // Known only from others' gossip and never heard to advance: dead after the bound.
        assert_eq!(judge(&clock(60_000, None), &once(2_000)), Liveness::Dead);
        let twice = PeerEvidence { heartbeats_heard: 2, ..silent(1_000) };
        assert_eq!(judge(&clock(60_000, None), &twice), Liveness::Dead);
    }

    #[test]
    fn a_heartbeat_heard_within_the_last_two_gossip_rounds_is_not_judged_yet() {
        assert_eq!(judge(&clock(60_000, None), &silent(100)), Liveness::Unknown);
        assert_eq!(judge(&clock(60_000, None), &silent(499)), Liveness::Unknown);
        assert_eq!(judge(&clock(60_000, None), &silent(500)), Liveness::Dead);
    }

    #[test]
    fn a_poll_much_later_than_its_period_is_a_pause() {
        assert!(!is_pause(POLL, POLL, GOSSIP));
        assert!(!is_pause(Duration::from_millis(600), POLL, GOSSIP));
        assert!(is_pause(Duration::from_millis(601), POLL, GOSSIP));
        assert!(is_pause(Duration::from_secs(3), POLL, GOSSIP));
        // The simulator's large meshes poll every second: its own period is no pause.
        assert!(!is_pause(Duration::from_secs(1), Duration::from_secs(1), GOSSIP));
    }

    /// Gossip between in-process nodes, with cuttable links.
    #[derive(Default)]
    struct Hub {
        inboxes: std::sync::Mutex<BTreeMap<SocketAddr, (String, mpsc::Sender<Incoming>)>>,
        /// Nodes cut off from everyone.
        cut: std::sync::Mutex<std::collections::BTreeSet<SocketAddr>>,
    }

    struct HubPort {
        hub: Arc<Hub>,
        addr: SocketAddr,
    }

    impl PeerNetwork for HubPort {
        fn local_addr(&self) -> SocketAddr {
            self.addr
        }

        fn send(&self, addr: SocketAddr, _expect: Option<&str>, _channel: Channel, bytes: Vec<u8>) {
            let cut = self.hub.cut.lock().unwrap();
            if cut.contains(&self.addr) || cut.contains(&addr) {
                return;
            }
            let inboxes = self.hub.inboxes.lock().unwrap();
            let (Some((from, _)), Some((_, inbox))) = (inboxes.get(&self.addr), inboxes.get(&addr)) else { return };
            let _ = inbox.try_send(Incoming { from: from.clone(), addr: self.addr, bytes, budget: None });
        }
    }

    async fn member(hub: &Arc<Hub>, index: u8, generation: u64) -> Membership {
        let id = format!("n{index}");
        member_with(hub, &id, SocketAddr::from(([10, 0, 0, index], 7400)), generation, sim_seal(&id), &[]).await
    }

    fn state(view: &MeshView, id: &str) -> Option<Liveness> {
        view.nodes.get(id).map(|node| node.liveness)
    }

    /// Polls every member's view each `POLL` (as the daemon does) until `done` holds for the
    /// views, at most `limit`; returns the time it took. Each round of views goes to `each`.
    async fn poll_until(
        members: &[&Membership],
        limit: Duration,
        mut each: impl FnMut(&[MeshView]),
        done: impl Fn(&[MeshView]) -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() <= limit {
            let mut views = Vec::new();
            for member in members {
                views.push(member.view().await);
            }
            each(&views);
            if done(&views) {
                return Some(start.elapsed());
            }
            tokio::time::sleep(POLL).await;
        }
        None
    }

    fn all_live(views: &[MeshView], ids: &[&str]) -> bool {
        views.iter().all(|view| ids.iter().all(|id| state(view, id) == Some(Liveness::Live)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_right_after_a_partition_heals_is_seen_within_the_bound() {
        let hub = Arc::new(Hub::default());
        let (a, b, c) = (member(&hub, 1, 1).await, member(&hub, 2, 1).await, member(&hub, 3, 1).await);
        let ids = ["n1", "n2", "n3"];
        let formed = poll_until(&[&a, &b, &c], Duration::from_secs(10), |_| {}, |v| all_live(v, &ids)).await;
        assert!(formed.is_some(), "the mesh forms");
        // Let every detector learn the gossip rhythm, then cut n3 off for 5 s (chitchat 0.11.2
        // kept gaps up to its 10 s max_interval as samples).
        poll_until(&[&a, &b, &c], Duration::from_secs(20), |_| {}, |_| false).await;
        hub.cut.lock().unwrap().insert(SocketAddr::from(([10, 0, 0, 3], 7400)));
        let seen_dead = poll_until(
            &[&a, &b],
            Duration::from_secs(5),
            |_| {},
            |v| v.iter().all(|view| state(view, "n3") == Some(Liveness::Dead)),
        )
        .await;
        assert!(seen_dead.is_some_and(|t| t <= detection_bound(GOSSIP) + GOSSIP * 2), "cut off: {seen_dead:?}");
        poll_until(&[&a, &b, &c], Duration::from_secs(5) - seen_dead.unwrap_or_default(), |_| {}, |_| false).await;
        hub.cut.lock().unwrap().clear();
        let healed = poll_until(&[&a, &b, &c], Duration::from_secs(10), |_| {}, |v| all_live(v, &ids)).await;
        assert!(healed.is_some(), "the partition heals");
        // n3 crashes at once: it falls silent for good.
        c.shutdown().await;
        hub.cut.lock().unwrap().insert(SocketAddr::from(([10, 0, 0, 3], 7400)));
        let detected = poll_until(
            &[&a, &b],
            Duration::from_secs(15),
            |_| {},
            |v| v.iter().all(|view| state(view, "n3") == Some(Liveness::Dead)),
        )
        .await;
        // The bound, plus up to two gossip rounds (chitchat judges after each round, and right
        // after a heal the mean interval starts a little above the gossip period) and one poll.
        let limit = detection_bound(GOSSIP) + GOSSIP * 2 + POLL;
        assert!(detected.is_some_and(|t| t <= limit), "crash after the heal seen in {detected:?}, limit {limit:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_node_never_sees_its_healthy_peers_dead() {
        let hub = Arc::new(Hub::default());
        let (a, b, c) = (member(&hub, 1, 1).await, member(&hub, 2, 1).await, member(&hub, 3, 1).await);
        let ids = ["n1", "n2", "n3"];
        poll_until(&[&a, &b, &c], Duration::from_secs(10), |_| {}, |v| all_live(v, &ids)).await;
        poll_until(&[&a, &b, &c], Duration::from_secs(5), |_| {}, |_| false).await;
        // n3 dies without a word and comes back at once with a new generation.
        c.shutdown().await;
        let c = member(&hub, 3, 2).await;
        let mut seen = Vec::new();
        let live = poll_until(
            &[&a, &b, &c],
            Duration::from_secs(10),
            |views| seen.push((state(&views[2], "n1"), state(&views[2], "n2"))),
            |v| all_live(v, &ids),
        )
        .await;
        assert!(live.is_some(), "the restarted node rejoins");
        assert!(
            seen.iter().all(|(n1, n2)| *n1 != Some(Liveness::Dead) && *n2 != Some(Liveness::Dead)),
            "the restarted node saw a healthy peer dead: {seen:?}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // The view as the daemon reads it (issue 12): summaries, leaving, beats, generations, seals.

    /// A member of the in-process mesh, with its address, seal and labels, seeded with n1.
    async fn member_with(
        hub: &Arc<Hub>,
        id: &str,
        addr: SocketAddr,
        generation: u64,
        seal: Arc<dyn GossipSeal>,
        labels: &[(&str, &str)],
    ) -> Membership {
        let (tx, rx) = mpsc::channel(1024);
        hub.inboxes.lock().unwrap().insert(addr, (id.to_owned(), tx));
        let config = MembershipConfig {
            node_id: id.to_owned(),
            generation,
            advertise: addr,
            seeds: vec![SocketAddr::from(([10, 0, 0, 1], 7400))],
            cluster_id: "test".into(),
            gossip_interval: GOSSIP,
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            poll_period: POLL,
            seal,
            runtime: None,
            nodes_max: MESH_NODES_MAX,
        };
        Membership::start(config, Arc::new(HubPort { hub: hub.clone(), addr }), rx).await.unwrap()
    }

    fn sim_seal(id: &str) -> Arc<dyn GossipSeal> {
        Arc::new(crate::peer::gossip_seal::SimSeal::new(id))
    }

    /// This node's own keys as chitchat holds them: (key, version, value).
    async fn own_keys(member: &Membership) -> Vec<(String, u64, String)> {
        let chitchat = member.handle.chitchat();
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        let keys: Vec<String> = state.key_values().map(|(key, _)| key.to_owned()).collect();
        keys.into_iter()
            .filter_map(|key| {
                let value = state.get_versioned(&key)?;
                Some((key, value.version, value.value.clone()))
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn labels_and_group_summaries_reach_peers_and_a_left_group_is_listed_apart() {
        let hub = Arc::new(Hub::default());
        let a =
            member_with(&hub, "n1", SocketAddr::from(([10, 0, 0, 1], 7400)), 1, sim_seal("n1"), &[("zone", "a")]).await;
        let b = member(&hub, 2, 1).await;
        a.publish(&format!("{GROUP_PREFIX}app"), "d1;3;v3;proof;heads");
        a.publish(&format!("{GROUP_PREFIX}old"), GROUP_LEFT);
        let seen = poll_until(
            &[&a, &b],
            Duration::from_secs(10),
            |_| {},
            |views| {
                views[1].nodes.get("n1").is_some_and(|n1| n1.groups.contains_key("app") && !n1.left_groups.is_empty())
            },
        )
        .await;
        assert!(seen.is_some(), "n2 sees n1's summaries");
        let view = b.view().await;
        let n1 = &view.nodes["n1"];
        assert_eq!(n1.labels, BTreeMap::from([("zone".to_owned(), "a".to_owned())]));
        assert_eq!(n1.groups, BTreeMap::from([("app".to_owned(), "d1;3;v3;proof;heads".to_owned())]));
        assert_eq!(n1.left_groups, ["old".to_owned()].into());
        assert_eq!(n1.addr, SocketAddr::from(([10, 0, 0, 1], 7400)));
        // Its own view shows it live, without a heartbeat age; the peer's has one.
        let own = a.view().await;
        assert_eq!(own.nodes["n1"].liveness, Liveness::Live);
        assert_eq!(own.nodes["n1"].heartbeat_age, None);
        assert!(view.nodes["n1"].heartbeat_age.is_some());
        // Leaving the group later moves it from one list to the other (keys are overwritten).
        a.publish(&format!("{GROUP_PREFIX}app"), GROUP_LEFT);
        let moved = poll_until(
            &[&a, &b],
            Duration::from_secs(10),
            |_| {},
            |views| views[1].nodes.get("n1").is_some_and(|n1| n1.groups.is_empty() && n1.left_groups.len() == 2),
        )
        .await;
        assert!(moved.is_some(), "n2 sees n1 left app: {:?}", b.view().await.nodes.get("n1"));
    }

    /// Issue 14: every write republishes the group summary, and each value published cost a
    /// signature on the daemon's thread. A burst is now signed once, with its last value, by
    /// the flusher on its own (no `flush` call), sealed for the version it takes.
    #[tokio::test(start_paused = true)]
    async fn a_burst_of_published_values_is_signed_once_with_its_last_value() {
        let hub = Arc::new(Hub::default());
        let a = member_with(&hub, "n1", SocketAddr::from(([10, 0, 0, 1], 7400)), 1, sim_seal("n1"), &[]).await;
        let version_of = |keys: &[(String, u64, String)], key: &str| {
            keys.iter().find(|(k, _, _)| k == key).map(|(_, version, value)| (*version, payload(value).to_owned()))
        };
        a.publish("grp:app", "0");
        a.flush().await;
        let (first, _) = version_of(&own_keys(&a).await, "grp:app").expect("flushed");
        let max_before = own_keys(&a).await.iter().map(|(_, version, _)| *version).max().unwrap();
        for n in 1..=100 {
            a.publish("grp:app", &n.to_string());
        }
        let landed = loop {
            let keys = own_keys(&a).await;
            if let Some((version, value)) = version_of(&keys, "grp:app")
                && value == "100"
            {
                break (version, keys);
            }
            tokio::time::sleep(PUBLISH_COALESCE).await;
        };
        let (version, keys) = landed;
        assert!(version > first);
        // The burst took one version (a beat signed meanwhile may take one more).
        let max_after = keys.iter().map(|(_, version, _)| *version).max().unwrap();
        assert!(max_after - max_before <= 2, "{max_before} -> {max_after}: the burst took many versions");
        let seal = sim_seal("n1");
        let cert = seal.accept_cert("n1", &seal.own_cert()).unwrap();
        let (_, _, sealed) = keys.iter().find(|(key, _, _)| key == "grp:app").unwrap();
        assert!(crate::peer::gossip_seal::verify_value(
            seal.as_ref(),
            &cert,
            "test",
            &a.self_id,
            "grp:app",
            version,
            sealed
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn every_published_value_is_sealed_for_its_version_and_repeats_take_no_version() {
        let hub = Arc::new(Hub::default());
        let a =
            member_with(&hub, "n1", SocketAddr::from(([10, 0, 0, 1], 7400)), 1, sim_seal("n1"), &[("zone", "a")]).await;
        a.publish("grp:app", "first");
        a.flush().await;
        a.publish("grp:app", "second");
        a.flush().await;
        let before = own_keys(&a).await;
        // The daemon publishes after every batch; an unchanged value must not churn gossip.
        a.publish("grp:app", "second");
        a.flush().await;
        assert_eq!(own_keys(&a).await, before, "an unchanged value took a new version");
        let seal = sim_seal("n1");
        let cert = seal.accept_cert("n1", &seal.own_cert()).unwrap();
        for (key, version, value) in &before {
            assert!(
                crate::peer::gossip_seal::verify_value(seal.as_ref(), &cert, "test", &a.self_id, key, *version, value),
                "{key} at version {version} is not sealed for it: {value:?}"
            );
        }
        let keys: Vec<&str> = before.iter().map(|(key, _, _)| key.as_str()).collect();
        for key in [CERT_KEY, LEAVING_KEY, BEAT_KEY, "label:zone", "grp:app"] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        a.set_leaving().await;
        let leaving = own_keys(&a).await;
        let (_, version, value) = leaving.iter().find(|(key, _, _)| key == LEAVING_KEY).unwrap();
        assert_eq!(payload(value), "1");
        assert!(crate::peer::gossip_seal::verify_value(
            seal.as_ref(),
            &cert,
            "test",
            &a.self_id,
            LEAVING_KEY,
            *version,
            value
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_signs_a_beat_once_per_beat_period_however_often_it_is_read() {
        let hub = Arc::new(Hub::default());
        let a = member(&hub, 1, 1).await;
        let beat_version = |keys: Vec<(String, u64, String)>| {
            keys.into_iter().find(|(key, _, _)| key == BEAT_KEY).map(|(_, version, _)| version).unwrap()
        };
        let mut versions = std::collections::BTreeSet::new();
        let period = GOSSIP * BEAT_GOSSIP_INTERVALS;
        let start = Instant::now();
        // Read ten times per beat period, for ten periods.
        while start.elapsed() < period * 10 {
            a.view().await;
            versions.insert(beat_version(own_keys(&a).await));
            tokio::time::sleep(period / 10).await;
        }
        // The initial beat, then one per period: reads do not sign beats.
        assert!((10..=12).contains(&versions.len()), "beats signed in 10 periods: {}", versions.len());
        // Unread, the node still signs one beat per period: beats come from the gossip runtime,
        // so a daemon loop busy with a long step is not judged dead (issue 12, CPU isolation).
        let last = beat_version(own_keys(&a).await);
        tokio::time::sleep(period * 5).await;
        let signed = beat_version(own_keys(&a).await) - last;
        assert!((4..=6).contains(&signed), "beats signed in 5 unread periods: {signed}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_leaving_node_is_leaving_in_every_view_including_its_own() {
        let hub = Arc::new(Hub::default());
        let (a, b) = (member(&hub, 1, 1).await, member(&hub, 2, 1).await);
        poll_until(&[&a, &b], Duration::from_secs(10), |_| {}, |v| all_live(v, &["n1", "n2"])).await;
        b.set_leaving().await;
        let seen = poll_until(
            &[&a, &b],
            Duration::from_secs(5),
            |_| {},
            |v| v.iter().all(|view| state(view, "n2") == Some(Liveness::Leaving)),
        )
        .await;
        // A gossip round or two, not a detection bound: quorums stop counting it at once.
        assert!(seen.is_some_and(|t| t < detection_bound(GOSSIP)), "leaving seen after {seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_node_appears_once_at_its_newest_generation_and_address() {
        let hub = Arc::new(Hub::default());
        let (a, b) = (member(&hub, 1, 1).await, member(&hub, 2, 1).await);
        poll_until(&[&a, &b], Duration::from_secs(10), |_| {}, |v| all_live(v, &["n1", "n2"])).await;
        b.shutdown().await;
        let moved = SocketAddr::from(([10, 0, 0, 9], 7400));
        let b = member_with(&hub, "n2", moved, 2, sim_seal("n2"), &[]).await;
        let seen = poll_until(
            &[&a, &b],
            Duration::from_secs(10),
            |_| {},
            |v| v[0].nodes.get("n2").is_some_and(|n2| n2.addr == moved && n2.liveness == Liveness::Live),
        )
        .await;
        assert!(seen.is_some(), "n1 sees n2's new generation: {:?}", a.view().await.nodes.get("n2"));
        // chitchat still holds the old generation for a while; the view shows the newest only,
        // and keeps doing so as views are read again.
        for _ in 0..20 {
            let view = a.view().await;
            assert_eq!(view.nodes.len(), 2, "{:?}", view.nodes.keys());
            assert_eq!(view.nodes["n2"].addr, moved);
            tokio::time::sleep(POLL).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_whose_certificate_names_another_never_enters_a_view() {
        let hub = Arc::new(Hub::default());
        let (a, b) = (member(&hub, 1, 1).await, member(&hub, 2, 1).await);
        // n3 signs with n2's seal: its certificate is n2's, not its own.
        let forger = member_with(&hub, "n3", SocketAddr::from(([10, 0, 0, 3], 7400)), 1, sim_seal("n2"), &[]).await;
        let mut shown = 0;
        poll_until(
            &[&a, &b, &forger],
            Duration::from_secs(10),
            |views| shown += views[..2].iter().filter(|view| view.nodes.contains_key("n3")).count(),
            |_| false,
        )
        .await;
        assert_eq!(shown, 0, "a node with another's certificate was shown");
        let view = a.view().await;
        assert_eq!(view.nodes.keys().collect::<Vec<_>>(), ["n1", "n2"]);
        assert_eq!(view.nodes["n2"].liveness, Liveness::Live, "the real n2 is unaffected");
        assert!(!a.knows(&forger.self_id) && !b.knows(&forger.self_id));
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_long_after_the_last_makes_silent_peers_unknown_before_dead() {
        let hub = Arc::new(Hub::default());
        let (a, b) = (member(&hub, 1, 1).await, member(&hub, 2, 1).await);
        poll_until(&[&a, &b], Duration::from_secs(10), |_| {}, |v| all_live(v, &["n1", "n2"])).await;
        poll_until(&[&a, &b], Duration::from_secs(5), |_| {}, |_| false).await;
        // n2 falls silent, and n1's daemon does not read its view for 5 s (a stall).
        hub.cut.lock().unwrap().insert(SocketAddr::from(([10, 0, 0, 2], 7400)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        // chitchat holds n2 dead by now, but this node was away: it cannot tell a peer's silence
        // from its own, so the first reads say unknown, for one detection bound.
        let after_stall = Instant::now();
        assert_eq!(state(&a.view().await, "n2"), Some(Liveness::Unknown));
        let dead =
            poll_until(&[&a], Duration::from_secs(5), |_| {}, |v| state(&v[0], "n2") == Some(Liveness::Dead)).await;
        let waited = after_stall.elapsed();
        assert!(dead.is_some(), "n2 is dead once this node can judge again");
        assert!(
            waited >= detection_bound(GOSSIP) && waited <= detection_bound(GOSSIP) + POLL * 2,
            "dead after {waited:?}"
        );
    }
}
