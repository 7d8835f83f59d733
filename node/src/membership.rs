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

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable, FailureDetectorConfig, NodeState,
    Serializable, spawn_chitchat,
};
use tokio::sync::{Mutex, mpsc};
use tracing::{error, warn};

use crate::transport::{Channel, GOSSIP_FRAME_BYTES_MAX, Incoming, PeerNetwork};

/// Key prefix for labels (`label:region` = `eu-west`).
pub const LABEL_PREFIX: &str = "label:";

/// Key prefix for group summaries (`grp:checkout` = digest;revision;version;proof;heads).
pub const GROUP_PREFIX: &str = "grp:";

/// Value of a group key after this node left the group (keys are overwritten, never deleted).
pub const GROUP_LEFT: &str = "-";

/// Key of the graceful-leave flag (SPEC F1).
pub const LEAVING_KEY: &str = "leaving";

/// Most nodes a mesh may hold. FACTS: the whole digest must fit one 65,507-byte message; that
/// held for ~1,340 nodes with 9-character ids and 850-900 with 32-character ids. 800 leaves
/// headroom for the longest ids we allow; larger meshes are refused with a clear error.
pub const MESH_NODES_MAX: usize = 800;

/// A gossip message whose digest alone is this large would overflow chitchat's reply budget
/// (its receiving task asserts); such messages are dropped and the overflow reported.
const SYN_BYTES_MAX: usize = GOSSIP_FRAME_BYTES_MAX - 4 * 1024;

/// How long a dead node's state is kept before chitchat forgets it. FACTS: dead nodes count in
/// the digest for half this time, so hours, not the 24 h default.
pub const DEAD_NODE_GRACE: Duration = Duration::from_secs(2 * 60 * 60);

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
}

/// Liveness of a node as seen here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heartbeats arrive.
    Live,
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
    /// True when the mesh reached [`MESH_NODES_MAX`].
    pub over_cap: bool,
}

/// The running membership layer.
pub struct Membership {
    handle: ChitchatHandle,
    node_id: String,
    heartbeats: Mutex<BTreeMap<ChitchatId, (u64, Instant)>>,
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
}

struct GossipSocket {
    network: Arc<dyn PeerNetwork>,
    inbox: mpsc::Receiver<Incoming>,
}

#[async_trait]
impl Transport for GossipTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inbox = self.inbox.lock().await.take().ok_or_else(|| anyhow::anyhow!("gossip socket already open"))?;
        Ok(Box::new(GossipSocket { network: self.network.clone(), inbox }))
    }
}

#[async_trait]
impl Socket for GossipSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        let mut bytes = Vec::with_capacity(message.serialized_len());
        message.serialize(&mut bytes);
        self.network.send(to, None, Channel::Gossip, bytes);
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let incoming = self.inbox.recv().await.ok_or_else(|| anyhow::anyhow!("network closed"))?;
            let mut slice = incoming.bytes.as_slice();
            let message = match ChitchatMessage::deserialize(&mut slice) {
                Ok(message) => message,
                Err(error) => {
                    warn!(from = %incoming.from, %error, "undecodable gossip message dropped");
                    continue;
                }
            };
            if matches!(message, ChitchatMessage::Syn { .. }) && incoming.bytes.len() > SYN_BYTES_MAX {
                error!(
                    from = %incoming.from,
                    bytes = incoming.bytes.len(),
                    max_nodes = MESH_NODES_MAX,
                    "gossip digest too large: the mesh exceeds its node cap; message dropped"
                );
                continue;
            }
            return Ok((incoming.addr, message));
        }
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
        let failure_detector_config = FailureDetectorConfig {
            phi_threshold: 8.0,
            // A small window keeps memory flat in large meshes (FACTS: 1,000 nodes, 3.8 GB at
            // 50 vs 11.3 GB at 1,000) and adapts quickly to the gossip interval.
            sampling_window_size: 100,
            max_interval: Duration::from_secs(10),
            initial_interval: config.gossip_interval,
            dead_node_grace_period: DEAD_NODE_GRACE,
        };
        let chitchat_config = ChitchatConfig {
            chitchat_id,
            cluster_id: config.cluster_id.clone(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.advertise,
            seed_nodes: config.seeds.iter().map(ToString::to_string).collect(),
            failure_detector_config,
            marked_for_deletion_grace_period: DEAD_NODE_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| state.get(LEAVING_KEY) != Some("1"))),
        };
        let mut initial = vec![(LEAVING_KEY.to_owned(), "0".to_owned())];
        for (key, value) in &config.labels {
            initial.push((format!("{LABEL_PREFIX}{key}"), value.clone()));
        }
        let transport = GossipTransport { network, inbox: Mutex::new(Some(gossip_inbox)) };
        let handle = spawn_chitchat(chitchat_config, initial, &transport).await?;
        Ok(Membership { handle, node_id: config.node_id, heartbeats: Mutex::new(BTreeMap::new()) })
    }

    /// Publishes `value` under `key` for this node (overwriting; never deleting).
    pub async fn publish(&self, key: &str, value: &str) {
        let chitchat = self.handle.chitchat();
        let mut chitchat = chitchat.lock().await;
        chitchat.self_node_state().set(key, value);
    }

    /// Announces a graceful shutdown: peers stop counting this node as live at once.
    pub async fn set_leaving(&self) {
        self.publish(LEAVING_KEY, "1").await;
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

    /// The current view of the mesh.
    pub async fn view(&self) -> MeshView {
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let live: std::collections::BTreeSet<ChitchatId> = chitchat.live_nodes().cloned().collect();
        let now = Instant::now();
        let mut heartbeats = self.heartbeats.lock().await;
        let mut view = MeshView::default();
        let self_id = chitchat.self_chitchat_id().clone();
        for (id, state) in chitchat.node_states() {
            let heartbeat = u64::from(state.heartbeat());
            let entry = heartbeats.entry(id.clone()).or_insert((heartbeat, now));
            if entry.0 != heartbeat {
                *entry = (heartbeat, now);
            }
            let is_self = *id == self_id;
            let leaving = state.get(LEAVING_KEY) == Some("1");
            let liveness = if leaving {
                Liveness::Leaving
            } else if is_self || live.contains(id) {
                Liveness::Live
            } else {
                Liveness::Dead
            };
            let labels = state
                .key_values()
                .filter_map(|(k, v)| k.strip_prefix(LABEL_PREFIX).map(|k| (k.to_owned(), v.to_owned())))
                .collect();
            let groups = state
                .key_values()
                .filter(|(_, v)| *v != GROUP_LEFT)
                .filter_map(|(k, v)| k.strip_prefix(GROUP_PREFIX).map(|k| (k.to_owned(), v.to_owned())))
                .collect();
            let left_groups = state
                .key_values()
                .filter(|(_, v)| *v == GROUP_LEFT)
                .filter_map(|(k, _)| k.strip_prefix(GROUP_PREFIX).map(str::to_owned))
                .collect();
            let node = MeshNode {
                id: id.node_id.to_string(),
                addr: id.gossip_advertise_addr,
                labels,
                liveness,
                heartbeat_age: (!is_self).then(|| now.saturating_duration_since(entry.1)),
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
        view.over_cap = view.nodes.len() >= MESH_NODES_MAX;
        view
    }
}
