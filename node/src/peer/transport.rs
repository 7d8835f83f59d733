//! Peer transport: one QUIC endpoint per node, mutual TLS on every connection, framed messages
//! on long-lived unidirectional streams (one per channel), behind the [`PeerNetwork`] seam so
//! the simulator can plug in an in-memory network.
//!
//! Each direction of a peer pair has its own connection (this node always sends as the client
//! of the peer's endpoint), so there is no connection race to resolve. A stream starts with a
//! header naming the channel and the sender's node id; the receiver checks that id against the
//! sender's certificate before accepting a single frame. When this node knows which node it
//! means to reach (replica traffic), it checks the server certificate names that node: a gossip
//! claim "node X is at address A" that A's certificate contradicts is refused.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use konor_crdt::limits::PEER_MESSAGE_BYTES_MAX;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::limits::PEER_WRITER_IDLE;
use crate::peer::tls;
use crate::pki::identity::{TlsIdentity, verify_node_identity};
use crate::pki::revocation::Revocations;
use crate::pki::{SERVER_NAME, validate_node_id};

/// Magic bytes opening every stream.
const STREAM_MAGIC: [u8; 4] = *b"KNR1";

/// What this node knows of the peer at one address while it has connections to this node.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PeerBoot {
    /// The boot id its streams last sent: a new one means the peer restarted.
    boot_id: Option<u64>,
    /// Its connections to this node being served; the entry goes with the last one.
    connections: usize,
}

/// Peers by address, while they are connected to this node.
type Boots = std::sync::Mutex<BTreeMap<SocketAddr, PeerBoot>>;

/// Largest gossip frame: chitchat keeps every message within one UDP-sized payload.
pub const GOSSIP_FRAME_BYTES_MAX: usize = 65_507;

/// Outgoing messages queued per peer; past this the newest is dropped and counted (gossip is
/// lossy by design and anti-entropy repairs lost replica pushes).
pub const PEER_QUEUE_MAX: usize = 1024;

/// Incoming frames buffered per channel before readers wait (backpressure on the peer).
pub const INCOMING_QUEUE_MAX: usize = 4096;

/// How long connecting to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one frame write may take before the connection is considered broken.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A dial starts a fresh connection attempt this often until one succeeds or
/// [`CONNECT_TIMEOUT`] passes. QUIC retransmits a lost handshake packet after a backoff that
/// doubles (about 1 s, then 2 s, ...), so one attempt made during a partition may sleep through
/// the heal; a fresh attempt every half second reaches a healed peer within about that.
pub const DIAL_RETRY: Duration = Duration::from_millis(500);

/// A connection on which something sent (a frame, a keep-alive) has gone without any
/// acknowledgement this long is stuck: the path is cut, or was and QUIC's retransmission backoff
/// (it doubles while nothing is acknowledged) would keep it silent for seconds after a heal,
/// until the 10 s idle timeout. It is closed and the next frame dials a fresh connection. A
/// healthy peer acknowledges within a round trip plus its 25 ms ack delay, so one second (or
/// [`STUCK_RTTS`] round trips on a slower path) does not flap on a healthy connection.
pub const STUCK_AFTER: Duration = Duration::from_secs(1);

/// A stuck verdict also needs this many smoothed round trips without an acknowledgement.
pub const STUCK_RTTS: u32 = 4;

/// How often a writer looks at its connection's counters while something it sent is not yet
/// acknowledged (and while a frame write waits on flow control).
const PROGRESS_CHECK: Duration = Duration::from_millis(200);

/// How often a writer looks at an idle connection: a keep-alive (every 2 s) that goes
/// unanswered then shows a cut path before the next frame needs it.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A new stream must deliver its header (magic, channel, node id, boot id) within this long.
pub const STREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A frame being received must make progress at least this often: a peer that announces a
/// frame and then stalls is cut off here, not at QUIC's idle timeout (which a live peer's
/// keep-alives never reach).
pub const FRAME_PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

/// A frame must arrive whole within this long of its length: the largest (a 65 MiB join grant)
/// needs 13 s at 5 MB/s.
pub const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A frame is read in steps of at most this many bytes, and its buffer grows with what arrived:
/// announcing 65 MiB and sending nothing costs nothing.
pub const FRAME_CHUNK_BYTES: usize = 64 * 1024;

/// Frames larger than one chunk, being read or waiting in the inbox, hold at most this many bytes
/// across all peers; a larger frame waits (within [`FRAME_READ_TIMEOUT`]) for room. Four of the
/// largest frames at once, far above what honest joins need.
pub const LARGE_FRAMES_BYTES_MAX: usize = 256 * 1024 * 1024;

const _: () = assert!(DIAL_RETRY.as_millis() < CONNECT_TIMEOUT.as_millis());
const _: () = assert!(PROGRESS_CHECK.as_millis() * 4 <= STUCK_AFTER.as_millis());

/// Which logical stream a frame travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Channel {
    /// chitchat gossip messages.
    Gossip,
    /// Replica messages (konor-crdt `PeerMessage`).
    Replica,
}

impl Channel {
    fn to_byte(self) -> u8 {
        match self {
            Channel::Gossip => 1,
            Channel::Replica => 2,
        }
    }

    fn from_byte(byte: u8) -> Option<Channel> {
        match byte {
            1 => Some(Channel::Gossip),
            2 => Some(Channel::Replica),
            _ => None,
        }
    }

    fn frame_bytes_max(self) -> usize {
        match self {
            Channel::Gossip => GOSSIP_FRAME_BYTES_MAX,
            Channel::Replica => PEER_MESSAGE_BYTES_MAX,
        }
    }
}

/// A frame received from an authenticated peer.
#[derive(Debug)]
pub struct Incoming {
    /// The sender's node id, checked against its certificate.
    pub from: String,
    /// The sender's endpoint address (its listen address: one UDP socket serves both roles).
    pub addr: SocketAddr,
    /// The frame's bytes.
    pub bytes: Vec<u8>,
    /// Its share of [`LARGE_FRAMES_BYTES_MAX`] (frames over [`FRAME_CHUNK_BYTES`]), given back
    /// when the frame is dropped.
    pub budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Frames received and accepted.
    pub frames_in: AtomicU64,
    /// Frames written to a peer.
    pub frames_out: AtomicU64,
    /// Outgoing frames dropped (queue full, peer unreachable, identity mismatch).
    pub dropped_out: AtomicU64,
    /// Incoming connections or streams refused (bad certificate, identity mismatch, garbage).
    pub refused_in: AtomicU64,
    /// Connection attempts started (a dial may start several, [`DIAL_RETRY`] apart).
    pub connect_attempts: AtomicU64,
    /// Connections established to peers.
    pub connects: AtomicU64,
    /// Dials that found no peer within [`CONNECT_TIMEOUT`].
    pub connect_failures: AtomicU64,
    /// Connections closed because nothing sent on them was acknowledged ([`STUCK_AFTER`]).
    pub stuck_closed: AtomicU64,
    /// Peer writers that ended after [`PEER_WRITER_IDLE`] with nothing to send.
    pub writers_reaped: AtomicU64,
    /// Established connections closed because the peer's certificate was revoked since.
    pub revoked_closed: AtomicU64,
    /// Incoming handshakes refused (foreign, expired or revoked certificate); also in `refused_in`.
    pub refused_tls: AtomicU64,
    /// Gossip frames and their bytes (`/metrics`).
    pub gossip: ChannelCounters,
    /// Replica frames and their bytes (`/metrics`).
    pub replica: ChannelCounters,
}

/// Frames and payload bytes of one channel, each way.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Frames received and accepted.
    pub frames_in: AtomicU64,
    /// Their payload bytes.
    pub bytes_in: AtomicU64,
    /// Frames written to a peer.
    pub frames_out: AtomicU64,
    /// Their payload bytes.
    pub bytes_out: AtomicU64,
}

impl TransportStats {
    /// The counters of `channel`.
    pub fn channel(&self, channel: Channel) -> &ChannelCounters {
        match channel {
            Channel::Gossip => &self.gossip,
            Channel::Replica => &self.replica,
        }
    }
}

/// The seam between the node and its network: QUIC in production, in-memory in the simulator.
pub trait PeerNetwork: Send + Sync + 'static {
    /// This node's endpoint address.
    fn local_addr(&self) -> SocketAddr;

    /// Queues `bytes` for the peer at `addr` on `channel`. `expect` names the node meant (its
    /// certificate must name it); `None` accepts any node of the cluster (seeds, gossip).
    /// Never blocks; a full queue drops the frame and counts it.
    fn send(&self, addr: SocketAddr, expect: Option<&str>, channel: Channel, bytes: Vec<u8>);
}

/// Writer queues by peer address, shared with the accept loop.
type Senders = std::sync::Mutex<BTreeMap<SocketAddr, mpsc::Sender<Job>>>;

/// The application close code of a connection closed because its peer's certificate was revoked.
const REVOKED_CLOSE_CODE: u32 = 5;

/// What a peer writer does next, in queue order.
enum Job {
    /// Write a frame.
    Frame(Outgoing),
    /// A certificate was revoked: close the connection if it is the peer's.
    Revoked,
    /// The peer reconnected to us (it restarted or lost our connection): finish the current
    /// connection gracefully after the frames queued so far, and use a fresh one from now on.
    Reconnect,
}

struct Outgoing {
    expect: Option<String>,
    channel: Channel,
    bytes: Vec<u8>,
}

/// The QUIC implementation of [`PeerNetwork`].
pub struct QuicNetwork {
    endpoint: quinn::Endpoint,
    node_id: String,
    /// One writer queue per peer address; a plain mutex because `send` must not await.
    senders: Arc<Senders>,
    /// Peers connected to this node, by address (shared with the accept loop).
    boots: Arc<Boots>,
    /// How long a writer waits for a frame before it ends ([`PEER_WRITER_IDLE`]).
    writer_idle: Duration,
    /// Random per process start, sent in every stream header: peers tell a restart of this
    /// node (new boot id) from an ordinary new connection.
    boot_id: u64,
    /// Counters.
    pub stats: Arc<TransportStats>,
    /// The runtime the endpoint was started on: every task of the network runs there.
    runtime: tokio::runtime::Handle,
    /// The certificates this node no longer trusts (the identity's).
    revocations: Revocations,
}

impl std::fmt::Debug for QuicNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicNetwork").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// The receiving ends of a started network.
#[derive(Debug)]
pub struct Inbox {
    /// Gossip frames.
    pub gossip: mpsc::Receiver<Incoming>,
    /// Replica frames.
    pub replica: mpsc::Receiver<Incoming>,
}

impl QuicNetwork {
    /// Binds the endpoint on `listen` and starts accepting peers.
    pub fn start(identity: &TlsIdentity, listen: SocketAddr) -> anyhow::Result<(Arc<QuicNetwork>, Inbox)> {
        QuicNetwork::start_with(identity, listen, PEER_WRITER_IDLE, None)
    }

    /// [`QuicNetwork::start`] over the fault layer's socket (tests of real processes: delay,
    /// reordering, duplication of datagrams).
    pub fn start_with_faults(
        identity: &TlsIdentity,
        listen: SocketAddr,
        layer: Arc<crate::fault_layer::FaultLayer>,
    ) -> anyhow::Result<(Arc<QuicNetwork>, Inbox)> {
        QuicNetwork::start_with(identity, listen, PEER_WRITER_IDLE, Some(layer))
    }

    /// [`QuicNetwork::start`], with writers ending after `writer_idle` without a frame.
    fn start_with(
        identity: &TlsIdentity,
        listen: SocketAddr,
        writer_idle: Duration,
        fault_layer: Option<Arc<crate::fault_layer::FaultLayer>>,
    ) -> anyhow::Result<(Arc<QuicNetwork>, Inbox)> {
        let server_config = tls::server_config(identity)?;
        let client_config = tls::client_config(identity)?;
        let endpoint = match fault_layer {
            None => quinn::Endpoint::server(server_config, listen),
            Some(layer) => crate::fault_layer::socket::FaultySocket::bind(listen, layer).and_then(|socket| {
                quinn::Endpoint::new_with_abstract_socket(
                    quinn::EndpointConfig::default(),
                    Some(server_config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            }),
        };
        // The io::Error stays the source: a caller may wait out `AddrInUse` (a restart).
        let mut endpoint =
            endpoint.map_err(|e| anyhow::Error::new(e).context(format!("cannot listen on {listen} (UDP)")))?;
        endpoint.set_default_client_config(client_config);
        let (gossip_tx, gossip_rx) = mpsc::channel(INCOMING_QUEUE_MAX);
        let (replica_tx, replica_rx) = mpsc::channel(INCOMING_QUEUE_MAX);
        let network = Arc::new(QuicNetwork {
            endpoint: endpoint.clone(),
            node_id: identity.node_id().to_owned(),
            senders: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
            boots: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
            writer_idle,
            boot_id: rand::random(),
            stats: Arc::new(TransportStats::default()),
            runtime: tokio::runtime::Handle::current(),
            revocations: identity.revocations().clone(),
        });
        let stats = network.stats.clone();
        let peers = PeerRegistry {
            senders: network.senders.clone(),
            boots: network.boots.clone(),
            frame_budget: Arc::new(tokio::sync::Semaphore::new(LARGE_FRAMES_BYTES_MAX / 1024)),
        };
        tokio::spawn(accept_loop(endpoint, gossip_tx, replica_tx, stats, peers, identity.revocations().clone()));
        tokio::spawn(close_revoked_writers(identity.revocations().subscribe(), network.senders.clone()));
        Ok((network, Inbox { gossip: gossip_rx, replica: replica_rx }))
    }

    /// Closes every connection and the endpoint.
    pub async fn close(&self) {
        if let Ok(mut senders) = self.senders.lock() {
            senders.clear();
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        self.endpoint.wait_idle().await;
    }

    /// Peer writers running (one per address this node sent to within [`PEER_WRITER_IDLE`]).
    pub fn peer_writers(&self) -> usize {
        self.senders.lock().map_or(0, |senders| senders.len())
    }

    /// Peer addresses with connections to this node, whose boot ids it keeps.
    pub fn peers_connected(&self) -> usize {
        self.boots.lock().map_or(0, |boots| boots.len())
    }

    /// Queues `job` for the writer of `addr`, starting one if there is none. The queue is
    /// written under the map's lock, so a writer that leaves the map (idle) after finding its
    /// queue empty under the same lock can lose no frame.
    fn queue(&self, addr: SocketAddr, job: Job) -> bool {
        let Ok(mut senders) = self.senders.lock() else { return false };
        if let Some(sender) = senders.get(&addr)
            && !sender.is_closed()
        {
            return sender.try_send(job).is_ok();
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let queued = tx.try_send(job).is_ok();
        let writer = PeerWriter {
            endpoint: self.endpoint.clone(),
            node_id: self.node_id.clone(),
            boot_id: self.boot_id,
            addr,
            connection: None,
            streams: BTreeMap::new(),
            progress: Progress::default(),
            wrote_since_check: false,
            stats: self.stats.clone(),
            senders: self.senders.clone(),
            own: tx.downgrade(),
            idle: self.writer_idle,
            refused_since_success: false,
            revocations: self.revocations.clone(),
            revocations_seen: self.revocations.generation(),
        };
        senders.insert(addr, tx);
        // On the network's runtime, whichever thread sends (the daemon runs on its own).
        self.runtime.spawn(writer.run(rx));
        queued
    }
}

impl PeerNetwork for QuicNetwork {
    fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn send(&self, addr: SocketAddr, expect: Option<&str>, channel: Channel, bytes: Vec<u8>) {
        let outgoing = Outgoing { expect: expect.map(str::to_owned), channel, bytes };
        let queued = self.queue(addr, Job::Frame(outgoing));
        if !queued {
            self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            debug!(%addr, ?channel, "outgoing frame dropped: peer queue full");
        }
    }
}

/// Whether a connection still gets its sends acknowledged, from its counters: the pure part of
/// stuck-connection detection ([`STUCK_AFTER`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    /// Ack-eliciting frames sent (stream data, pings: keep-alives and loss probes).
    sent: u64,
    /// ACK frames received.
    acks: u64,
    /// Since when something sent has waited for an acknowledgement.
    waiting_since: Option<Instant>,
}

impl Progress {
    /// Progress of a connection whose counters stand at `sent`, `acks` now.
    fn start(sent: u64, acks: u64) -> Progress {
        Progress { sent, acks, waiting_since: None }
    }

    /// Takes the counters at `now`; true when the connection is stuck: frames were sent and
    /// nothing was acknowledged for `stuck_after`. The wait counts from the first look that saw
    /// the send, so it starts up to one look late, never early.
    fn observe(&mut self, now: Instant, sent: u64, acks: u64, stuck_after: Duration) -> bool {
        if acks != self.acks {
            *self = Progress::start(sent, acks);
            return false;
        }
        if sent != self.sent {
            self.sent = sent;
            self.waiting_since.get_or_insert(now);
        }
        self.waiting_since.is_some_and(|since| now.saturating_duration_since(since) >= stuck_after)
    }
}

/// The counters [`Progress`] reads.
fn progress_counters(connection: &quinn::Connection) -> (u64, u64) {
    let stats = connection.stats();
    (stats.frame_tx.stream + stats.frame_tx.ping, stats.frame_rx.acks)
}

/// Why a frame was not written.
enum WriteFailure {
    /// No connection could be made within [`CONNECT_TIMEOUT`].
    Unreachable(anyhow::Error),
    /// The peer's certificate does not name the node meant.
    Refused,
    /// The connection was stuck and is closed.
    Stuck,
    /// The connection or stream failed (the peer restarted, a write timed out).
    Broken(anyhow::Error),
}

/// Owns the connection to one peer address and writes its queue in order.
struct PeerWriter {
    endpoint: quinn::Endpoint,
    node_id: String,
    boot_id: u64,
    addr: SocketAddr,
    connection: Option<quinn::Connection>,
    streams: BTreeMap<Channel, quinn::SendStream>,
    progress: Progress,
    /// A frame went out since the counters were last read: read them soon.
    wrote_since_check: bool,
    stats: Arc<TransportStats>,
    /// The writer map, which this writer leaves when idle.
    senders: Arc<Senders>,
    /// Its own queue's sender, to tell its map entry from a newer writer's.
    own: mpsc::WeakSender<Job>,
    /// How long it waits for a frame before it ends.
    idle: Duration,
    /// A handshake was refused since the last frame went out (warned once, not per retry).
    refused_since_success: bool,
    /// The certificates this node no longer trusts.
    revocations: Revocations,
    /// The revocations' generation when the connection was last checked against them.
    revocations_seen: u64,
}

impl PeerWriter {
    async fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        let mut last_job = Instant::now();
        loop {
            // While there is a connection, its counters are read now and then, often while a
            // send waits for its acknowledgement, so a cut path is seen without a frame to send.
            let look_in = match &self.connection {
                None => None,
                Some(_) if self.wrote_since_check || self.progress.waiting_since.is_some() => Some(PROGRESS_CHECK),
                Some(_) => Some(IDLE_CHECK),
            };
            let idle_at = last_job + self.idle;
            let wake = look_in.map_or(idle_at, |wait| (Instant::now() + wait).min(idle_at));
            let job = match tokio::time::timeout_at(wake, queue.recv()).await {
                Ok(job) => job,
                Err(_) => {
                    if Instant::now() >= idle_at && self.leave_if_idle(&queue) {
                        self.stats.writers_reaped.fetch_add(1, Ordering::Relaxed);
                        debug!(addr = %self.addr, idle_s = self.idle.as_secs(), "peer writer idle; ended");
                        self.retire();
                        return;
                    }
                    self.check_progress();
                    continue;
                }
            };
            let Some(job) = job else { break };
            last_job = Instant::now();
            match job {
                Job::Frame(outgoing) => self.deliver(outgoing, &mut queue).await,
                Job::Reconnect => self.retire(),
                Job::Revoked => self.close_if_revoked(),
            }
        }
    }

    async fn deliver(&mut self, outgoing: Outgoing, queue: &mut mpsc::Receiver<Job>) {
        // A stuck connection is replaced before it swallows this frame.
        self.check_progress();
        // Nothing more goes to a peer revoked since (a `Job::Revoked` may have found the queue full).
        if self.revocations.generation() != self.revocations_seen {
            self.close_if_revoked();
        }
        // One retry on a fresh connection: a peer that restarted leaves a dead connection.
        for attempt in 0..2 {
            match self.write(&outgoing).await {
                Ok(()) => {
                    self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
                    let counters = self.stats.channel(outgoing.channel);
                    counters.frames_out.fetch_add(1, Ordering::Relaxed);
                    counters.bytes_out.fetch_add(outgoing.bytes.len() as u64, Ordering::Relaxed);
                    self.refused_since_success = false;
                    return;
                }
                Err(WriteFailure::Unreachable(error)) => {
                    // A TLS refusal (a certificate not yet valid or expired: a clock off by more
                    // than the CA's skew allowance; a peer of another cluster) will not heal by
                    // retrying, and the peer's log is not this operator's: say it here, once.
                    if handshake_refused(&error) && !self.refused_since_success {
                        self.refused_since_success = true;
                        warn!(addr = %self.addr, node = %self.node_id, %error, "TLS handshake with a peer failed; check both clocks and certificates");
                    }
                    // Everything queued meanwhile waited a whole connect timeout: gossip is
                    // stale by now and anti-entropy repairs replica messages, so it goes too,
                    // and the next frame dials again (a fresh attempt every `DIAL_RETRY`).
                    let mut dropped = 1;
                    while queue.try_recv().is_ok() {
                        dropped += 1;
                    }
                    self.stats.dropped_out.fetch_add(dropped, Ordering::Relaxed);
                    debug!(addr = %self.addr, %error, dropped, "peer unreachable; queued frames dropped");
                    return;
                }
                Err(WriteFailure::Refused) => break,
                Err(WriteFailure::Stuck) => {}
                Err(WriteFailure::Broken(error)) => {
                    self.connection = None;
                    self.streams.clear();
                    if attempt == 1 {
                        debug!(addr = %self.addr, %error, "peer connection broken; frame dropped");
                    }
                }
            }
        }
        self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Leaves the writer map if nothing is queued (true: the writer may end). Frames are queued
    /// under the map's lock, so none can slip in between the look and the leaving. A writer whose
    /// entry a newer writer took (after [`QuicNetwork::close`]) leaves the entry alone.
    fn leave_if_idle(&self, queue: &mpsc::Receiver<Job>) -> bool {
        let Ok(mut senders) = self.senders.lock() else { return false };
        if !queue.is_empty() {
            return false;
        }
        let ours = match (senders.get(&self.addr), self.own.upgrade()) {
            (Some(entry), Some(own)) => entry.same_channel(&own),
            _ => false,
        };
        if ours {
            senders.remove(&self.addr);
        }
        true
    }

    /// Closes the connection at once if the peer's certificate is revoked: what is queued on
    /// it is not delivered, and the next frame's dial fails in the handshake.
    fn close_if_revoked(&mut self) {
        self.revocations_seen = self.revocations.generation();
        let Some(connection) = &self.connection else { return };
        let Some(revocation) = tls::peer_certificate(connection).and_then(|cert| self.revocations.covering(&cert))
        else {
            return;
        };
        warn!(addr = %self.addr, node = %revocation.node, "closing the connection to a peer whose certificate was revoked");
        connection.close(REVOKED_CLOSE_CODE.into(), b"revoked");
        self.connection = None;
        self.streams.clear();
        self.stats.revoked_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the connection's counters; closes it when stuck (true).
    fn check_progress(&mut self) -> bool {
        self.wrote_since_check = false;
        let Some(connection) = &self.connection else { return false };
        let (sent, acks) = progress_counters(connection);
        let stuck_after = STUCK_AFTER.max(connection.rtt() * STUCK_RTTS);
        if !self.progress.observe(Instant::now(), sent, acks, stuck_after) {
            return false;
        }
        info!(
            addr = %self.addr,
            stuck_ms = stuck_after.as_millis() as u64,
            "connection to peer stuck (nothing acknowledged); closing it, the next frame dials afresh"
        );
        // Closing, not retiring: what is unacknowledged on it is given up rather than delivered
        // late, after frames sent on the new connection.
        connection.close(4u32.into(), b"stuck");
        self.connection = None;
        self.streams.clear();
        self.stats.stuck_closed.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Lets the current connection deliver what was written on it, then closes it; the next
    /// frame opens a new one. Dropping a quinn connection abandons unacknowledged stream data,
    /// so the old streams are finished and awaited (bounded) before the drop.
    fn retire(&mut self) {
        let streams = std::mem::take(&mut self.streams);
        let Some(connection) = self.connection.take() else { return };
        tokio::spawn(async move {
            for (_, mut stream) in streams {
                let _ = stream.finish();
                let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.stopped()).await;
            }
            drop(connection);
        });
    }

    /// Connects to the peer: a fresh attempt every [`DIAL_RETRY`] while earlier ones go on,
    /// the first to succeed wins, the others are dropped (closed); [`CONNECT_TIMEOUT`] in all.
    async fn dial(&self) -> anyhow::Result<quinn::Connection> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut attempts = tokio::task::JoinSet::new();
        let mut last_error = None;
        while Instant::now() < deadline {
            let connecting = self.endpoint.connect(self.addr, SERVER_NAME)?;
            self.stats.connect_attempts.fetch_add(1, Ordering::Relaxed);
            attempts.spawn(connecting);
            let next_attempt = (Instant::now() + DIAL_RETRY).min(deadline);
            loop {
                if attempts.is_empty() {
                    tokio::time::sleep_until(next_attempt).await;
                    break;
                }
                tokio::select! {
                    done = attempts.join_next() => match done {
                        Some(Ok(Ok(connection))) => {
                            self.stats.connects.fetch_add(1, Ordering::Relaxed);
                            return Ok(connection);
                        }
                        Some(Ok(Err(error))) => last_error = Some(anyhow::Error::from(error)),
                        Some(Err(error)) => last_error = Some(anyhow::Error::from(error)),
                        None => {}
                    },
                    _ = tokio::time::sleep_until(next_attempt) => break,
                }
            }
        }
        self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("connect to {} timed out", self.addr)))
    }

    async fn connection(&mut self, expect: Option<&str>) -> Result<quinn::Connection, WriteFailure> {
        let connection = match &self.connection {
            Some(connection) if connection.close_reason().is_none() => connection.clone(),
            _ => {
                let connection = self.dial().await.map_err(WriteFailure::Unreachable)?;
                self.streams.clear();
                let (sent, acks) = progress_counters(&connection);
                self.progress = Progress::start(sent, acks);
                self.connection = Some(connection.clone());
                connection
            }
        };
        if let Some(expected) = expect {
            let verified = tls::peer_certificate(&connection)
                .ok_or_else(|| anyhow::anyhow!("peer at {} presented no certificate", self.addr))
                .and_then(|certificate| Ok(verify_node_identity(&certificate, expected)?));
            if let Err(error) = verified {
                warn!(addr = %self.addr, expected, %error, "peer certificate does not match the node gossip places there");
                connection.close(1u32.into(), b"identity mismatch");
                self.connection = None;
                self.streams.clear();
                return Err(WriteFailure::Refused);
            }
        }
        Ok(connection)
    }

    async fn write(&mut self, outgoing: &Outgoing) -> Result<(), WriteFailure> {
        let connection = self.connection(outgoing.expect.as_deref()).await?;
        let mut stream = self.streams.remove(&outgoing.channel);
        let mut header = STREAM_MAGIC.to_vec();
        header.push(outgoing.channel.to_byte());
        let id = self.node_id.as_bytes();
        header.push(u8::try_from(id.len()).unwrap_or(0));
        header.extend_from_slice(id);
        header.extend_from_slice(&self.boot_id.to_be_bytes());
        let result = {
            let stream = &mut stream;
            let write = async {
                let stream = match stream {
                    Some(stream) => stream,
                    None => {
                        let mut opened = connection.open_uni().await?;
                        opened.write_all(&header).await?;
                        stream.insert(opened)
                    }
                };
                let length = u32::try_from(outgoing.bytes.len())?;
                stream.write_all(&length.to_be_bytes()).await?;
                stream.write_all(&outgoing.bytes).await?;
                anyhow::Ok(())
            };
            tokio::pin!(write);
            // Bounded, and watched: a write that waits on flow control over a cut path ends as
            // soon as the connection is seen stuck, not at the write timeout.
            let deadline = Instant::now() + WRITE_TIMEOUT;
            loop {
                match tokio::time::timeout(PROGRESS_CHECK, &mut write).await {
                    Ok(result) => break result.map_err(WriteFailure::Broken),
                    Err(_) if self.check_progress() => break Err(WriteFailure::Stuck),
                    Err(_) if Instant::now() >= deadline => {
                        break Err(WriteFailure::Broken(anyhow::anyhow!("write timed out")));
                    }
                    Err(_) => {}
                }
            }
        };
        self.wrote_since_check = true;
        result?;
        if let Some(stream) = stream {
            self.streams.insert(outgoing.channel, stream);
        }
        Ok(())
    }
}

/// What the accept side needs to react to a peer's restart, and the budget its large frames
/// share ([`LARGE_FRAMES_BYTES_MAX`], in KiB permits).
#[derive(Clone)]
struct PeerRegistry {
    senders: Arc<Senders>,
    boots: Arc<Boots>,
    frame_budget: Arc<tokio::sync::Semaphore>,
}

/// Counts one connection of a peer while it is served; the peer's entry goes with its last
/// connection, so the map holds the peers connected now, not every address ever seen.
struct ConnectionTracked {
    boots: Arc<Boots>,
    addr: SocketAddr,
}

impl Drop for ConnectionTracked {
    fn drop(&mut self) {
        if let Ok(mut boots) = self.boots.lock()
            && let Some(peer) = boots.get_mut(&self.addr)
        {
            peer.connections = peer.connections.saturating_sub(1);
            if peer.connections == 0 {
                boots.remove(&self.addr);
            }
        }
    }
}

impl PeerRegistry {
    /// Counts a connection from `addr` until the guard drops.
    fn track_connection(&self, addr: SocketAddr) -> ConnectionTracked {
        if let Ok(mut boots) = self.boots.lock() {
            boots.entry(addr).or_default().connections += 1;
        }
        ConnectionTracked { boots: self.boots.clone(), addr }
    }

    /// Records the boot id a peer sent; when it changed, the peer restarted and our connection
    /// to it may be dead without QUIC knowing (it notices only at the idle timeout), so frames
    /// after this point go on a fresh connection. Only peers with a connection being served are
    /// recorded ([`ConnectionTracked`]): a peer whose connections to this node all ended either
    /// shut down, which closed ours to it too, or went silent past the idle timeout, which ends
    /// ours as well; either way the next frame dials afresh.
    fn saw_boot(&self, addr: SocketAddr, boot_id: u64) {
        let restarted = match self.boots.lock() {
            Ok(mut boots) => boots
                .get_mut(&addr)
                .and_then(|peer| peer.boot_id.replace(boot_id))
                .is_some_and(|previous| previous != boot_id),
            Err(_) => false,
        };
        if restarted
            && let Ok(senders) = self.senders.lock()
            && let Some(sender) = senders.get(&addr)
        {
            let _ = sender.try_send(Job::Reconnect);
        }
    }
}

/// On every new revocation, has each peer writer close its connection if its peer is revoked.
async fn close_revoked_writers(mut changes: tokio::sync::watch::Receiver<u64>, senders: Arc<Senders>) {
    while changes.changed().await.is_ok() {
        let writers: Vec<mpsc::Sender<Job>> = match senders.lock() {
            Ok(senders) => senders.values().cloned().collect(),
            Err(_) => return,
        };
        for writer in writers {
            // A full queue: its next frame's dial is refused in the handshake anyway.
            let _ = writer.try_send(Job::Revoked);
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    gossip: mpsc::Sender<Incoming>,
    replica: mpsc::Sender<Incoming>,
    stats: Arc<TransportStats>,
    peers: PeerRegistry,
    revocations: Revocations,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (gossip, replica, stats, peers) = (gossip.clone(), replica.clone(), stats.clone(), peers.clone());
        let revocations = revocations.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve_connection(connection, gossip, replica, stats, peers, revocations).await,
                Err(error) if abandoned_by_peer(&error) => {
                    debug!(%addr, %error, "incoming connection abandoned by the peer during its handshake");
                }
                Err(error) => {
                    // Logged at powers of two: a host that keeps dialing with a foreign or revoked
                    // certificate (several tries a second) cannot flood the log.
                    let refused = stats.refused_tls.fetch_add(1, Ordering::Relaxed) + 1;
                    stats.refused_in.fetch_add(1, Ordering::Relaxed);
                    if refused.is_power_of_two() {
                        info!(%addr, %error, refused_so_far = refused, "incoming connection refused (TLS)");
                    }
                }
            }
        });
    }
}

/// True when the peer itself gave up a connection during its handshake: a dial sends a fresh
/// attempt every [`DIAL_RETRY`] and drops the ones that lose, which quinn closes with the
/// transport code `APPLICATION_ERROR`. A peer that comes back after a restart meets a burst of
/// them; they are no refusal of ours and no sign of trouble.
/// Whether a dial failed in the TLS handshake (QUIC's crypto error codes, 0x100-0x1ff), by
/// either side's verdict, rather than on an unreachable address.
fn handshake_refused(error: &anyhow::Error) -> bool {
    let code = match error.downcast_ref::<quinn::ConnectionError>() {
        Some(quinn::ConnectionError::TransportError(transport)) => u64::from(transport.code),
        Some(quinn::ConnectionError::ConnectionClosed(close)) => u64::from(close.error_code),
        _ => return false,
    };
    (0x100..0x200).contains(&code)
}

fn abandoned_by_peer(error: &quinn::ConnectionError) -> bool {
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => {
            close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR
        }
        quinn::ConnectionError::ApplicationClosed(_) => true,
        _ => false,
    }
}

async fn serve_connection(
    connection: quinn::Connection,
    gossip: mpsc::Sender<Incoming>,
    replica: mpsc::Sender<Incoming>,
    stats: Arc<TransportStats>,
    peers: PeerRegistry,
    revocations: Revocations,
) {
    let addr = connection.remote_address();
    let _tracked = peers.track_connection(addr);
    let Some(certificate) = tls::peer_certificate(&connection) else {
        stats.refused_in.fetch_add(1, Ordering::Relaxed);
        connection.close(2u32.into(), b"no certificate");
        return;
    };
    let mut changes = revocations.subscribe();
    // A revocation that came after the handshake and before the subscription is not news to
    // `changes`: checked once here.
    changes.mark_changed();
    loop {
        let stream = tokio::select! {
            // The revocation first: no stream of a revoked peer is taken once it is known.
            biased;
            changed = changes.changed() => {
                if changed.is_ok() && let Some(revocation) = revocations.covering(&certificate) {
                    warn!(%addr, node = %revocation.node, "closing a connection from a peer whose certificate was revoked");
                    connection.close(REVOKED_CLOSE_CODE.into(), b"revoked");
                    stats.revoked_closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                continue;
            }
            stream = connection.accept_uni() => stream,
        };
        let Ok(stream) = stream else { break };
        let (gossip, replica, stats, peers) = (gossip.clone(), replica.clone(), stats.clone(), peers.clone());
        let certificate = certificate.clone();
        let connection = connection.clone();
        tokio::spawn(async move {
            if let Err(error) = read_stream(stream, addr, &certificate, gossip, replica, &stats, &peers).await {
                stats.refused_in.fetch_add(1, Ordering::Relaxed);
                warn!(%addr, %error, "peer stream refused; closing the connection");
                connection.close(3u32.into(), b"bad stream");
            }
        });
    }
}

/// Reads and checks a stream's header: its channel and the sender's node id (which must be the
/// one its certificate names).
async fn read_header(
    stream: &mut quinn::RecvStream,
    addr: SocketAddr,
    certificate: &rustls_pki_types::CertificateDer<'static>,
    peers: &PeerRegistry,
) -> anyhow::Result<(Channel, String)> {
    let mut header = [0u8; 6];
    stream.read_exact(&mut header).await?;
    anyhow::ensure!(header[..4] == STREAM_MAGIC, "stream does not start with the konorkestra header");
    let channel = Channel::from_byte(header[4]).ok_or_else(|| anyhow::anyhow!("unknown channel {}", header[4]))?;
    let mut id = vec![0u8; usize::from(header[5])];
    stream.read_exact(&mut id).await?;
    let from = String::from_utf8(id).map_err(|_| anyhow::anyhow!("node id is not UTF-8"))?;
    validate_node_id(&from)?;
    verify_node_identity(certificate, &from)?;
    let mut boot = [0u8; 8];
    stream.read_exact(&mut boot).await?;
    peers.saw_boot(addr, u64::from_be_bytes(boot));
    Ok((channel, from))
}

/// Reads a frame of `length` bytes by chunks, its buffer growing with what arrives; fails if
/// it stalls for [`FRAME_PROGRESS_TIMEOUT`] or is not whole by `deadline`.
async fn read_frame(stream: &mut quinn::RecvStream, length: usize, deadline: Instant) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(length.min(FRAME_CHUNK_BYTES));
    while bytes.len() < length {
        let want = (length - bytes.len()).min(FRAME_CHUNK_BYTES);
        let step_deadline = deadline.min(Instant::now() + FRAME_PROGRESS_TIMEOUT);
        let chunk = tokio::time::timeout_at(step_deadline, stream.read_chunk(want, true))
            .await
            .map_err(|_| anyhow::anyhow!("a frame of {length} bytes stalled after {} bytes", bytes.len()))??
            .ok_or_else(|| anyhow::anyhow!("the stream ended inside a frame of {length} bytes"))?;
        bytes.extend_from_slice(&chunk.bytes);
    }
    Ok(bytes)
}

async fn read_stream(
    mut stream: quinn::RecvStream,
    addr: SocketAddr,
    certificate: &rustls_pki_types::CertificateDer<'static>,
    gossip: mpsc::Sender<Incoming>,
    replica: mpsc::Sender<Incoming>,
    stats: &TransportStats,
    peers: &PeerRegistry,
) -> anyhow::Result<()> {
    let frame_budget = &peers.frame_budget;
    let (channel, from) =
        tokio::time::timeout(STREAM_HEADER_TIMEOUT, read_header(&mut stream, addr, certificate, peers))
            .await
            .map_err(|_| anyhow::anyhow!("no stream header within {STREAM_HEADER_TIMEOUT:?}"))??;
    let sink = match channel {
        Channel::Gossip => gossip,
        Channel::Replica => replica,
    };
    loop {
        let mut length = [0u8; 4];
        match stream.read_exact(&mut length).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(()),
            Err(error) => {
                // A connection closed by the peer (restart, shutdown) ends the stream normally.
                debug!(%addr, %error, "peer stream ended");
                return Ok(());
            }
        }
        let length = u32::from_be_bytes(length) as usize;
        anyhow::ensure!(length <= channel.frame_bytes_max(), "frame of {length} bytes over the {channel:?} limit");
        let deadline = Instant::now() + FRAME_READ_TIMEOUT;
        let budget = if length > FRAME_CHUNK_BYTES {
            let kib = u32::try_from(length.div_ceil(1024))?;
            let permit =
                tokio::time::timeout_at(deadline, frame_budget.clone().acquire_many_owned(kib)).await.map_err(
                    |_| anyhow::anyhow!("no room for a frame of {length} bytes within {FRAME_READ_TIMEOUT:?}"),
                )??;
            Some(permit)
        } else {
            None
        };
        let bytes = read_frame(&mut stream, length, deadline).await?;
        stats.frames_in.fetch_add(1, Ordering::Relaxed);
        let counters = stats.channel(channel);
        counters.frames_in.fetch_add(1, Ordering::Relaxed);
        counters.bytes_in.fetch_add(length as u64, Ordering::Relaxed);
        if sink.send(Incoming { from: from.clone(), addr, bytes, budget }).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ca::{init_ca, issue_node_cert};
    use crate::pki::identity::load_identity;

    struct Pki {
        _dir: tempfile::TempDir,
        a: TlsIdentity,
        b: TlsIdentity,
    }

    fn pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        init_ca(&dir.path().join("ca")).unwrap();
        for id in ["a", "b"] {
            issue_node_cert(&dir.path().join("ca"), id, &dir.path().join(id)).unwrap();
        }
        let a = load_identity(&dir.path().join("a")).unwrap();
        let b = load_identity(&dir.path().join("b")).unwrap();
        Pki { _dir: dir, a, b }
    }

    /// A raw client endpoint with `identity`, to speak garbage to a node.
    async fn raw_connection(identity: &TlsIdentity, to: SocketAddr) -> quinn::Connection {
        let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        endpoint.set_default_client_config(tls::client_config(identity).unwrap());
        endpoint.connect(to, SERVER_NAME).unwrap().await.unwrap()
    }

    async fn next(inbox: &mut mpsc::Receiver<Incoming>) -> Incoming {
        tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.unwrap().unwrap()
    }

    /// Waits (at most 10 s) for `done`, which reads counters that change on no awaitable event.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "not within 10 s: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn an_idle_writer_ends_and_leaves_the_map_and_a_later_frame_starts_a_new_one() {
        let pki = pki();
        let (a, mut a_inbox) = QuicNetwork::start(&pki.a, "127.0.0.1:0".parse().unwrap()).unwrap();
        let idle = Duration::from_millis(300);
        let (b, _b_inbox) = QuicNetwork::start_with(&pki.b, "127.0.0.1:0".parse().unwrap(), idle, None).unwrap();
        b.send(a.local_addr(), Some("a"), Channel::Replica, b"one".to_vec());
        assert_eq!(next(&mut a_inbox.replica).await.bytes, b"one");
        assert_eq!((b.peer_writers(), a.peers_connected()), (1, 1));
        eventually("b's idle writer to a ends", || b.peer_writers() == 0).await;
        assert_eq!(b.stats.writers_reaped.load(Ordering::Relaxed), 1);
        // Its connection went with it, and with it a's record of b.
        eventually("a forgets b once b's connection closed", || a.peers_connected() == 0).await;
        b.send(a.local_addr(), Some("a"), Channel::Replica, b"two".to_vec());
        assert_eq!(next(&mut a_inbox.replica).await.bytes, b"two");
        assert_eq!(b.peer_writers(), 1);
    }

    #[tokio::test]
    async fn frames_keep_a_writer_alive_and_none_is_lost_around_its_idle_end() {
        let pki = pki();
        let (a, mut a_inbox) = QuicNetwork::start(&pki.a, "127.0.0.1:0".parse().unwrap()).unwrap();
        let idle = Duration::from_millis(50);
        let (b, _b_inbox) = QuicNetwork::start_with(&pki.b, "127.0.0.1:0".parse().unwrap(), idle, None).unwrap();
        // Frames at about the idle period: writers end and start around them.
        for round in 0..20u8 {
            b.send(a.local_addr(), Some("a"), Channel::Replica, vec![round]);
            assert_eq!(next(&mut a_inbox.replica).await.bytes, vec![round]);
            tokio::time::sleep(Duration::from_millis(u64::from(round % 4) * 20)).await;
        }
        assert_eq!(b.stats.dropped_out.load(Ordering::Relaxed), 0);
        assert!(b.peer_writers() <= 1);
    }

    #[tokio::test]
    async fn frames_cross_a_delaying_reordering_duplicating_network_once_each() {
        use crate::fault_layer::FaultLayer;
        use crate::fault_layer::control::FaultSettings;
        let pki = pki();
        let settings = FaultSettings::parse("delay=30ms jitter=20ms reorder=20% duplicate=20%").unwrap();
        let (a_layer, b_layer) = (FaultLayer::fixed(settings), FaultLayer::fixed(settings));
        let any = "127.0.0.1:0".parse().unwrap();
        let (a, mut a_inbox) = QuicNetwork::start_with_faults(&pki.a, any, a_layer.clone()).unwrap();
        let (b, _b_inbox) = QuicNetwork::start_with_faults(&pki.b, any, b_layer.clone()).unwrap();
        b.send(a.local_addr(), Some("a"), Channel::Replica, vec![0]);
        assert_eq!(next(&mut a_inbox.replica).await.bytes, vec![0]);
        // On the open connection: a frame takes at least the delay of its datagrams.
        let sent = Instant::now();
        b.send(a.local_addr(), Some("a"), Channel::Replica, vec![1]);
        assert_eq!(next(&mut a_inbox.replica).await.bytes, vec![1]);
        assert!(sent.elapsed() >= Duration::from_millis(30), "a frame crossed in {:?}", sent.elapsed());
        let frames: Vec<Vec<u8>> = (2..202u32).map(|n| n.to_be_bytes().repeat(300)).collect();
        for frame in &frames {
            b.send(a.local_addr(), Some("a"), Channel::Replica, frame.clone());
        }
        let mut received = Vec::new();
        while received.len() < frames.len() {
            received.push(next(&mut a_inbox.replica).await.bytes);
        }
        received.sort();
        assert_eq!(received, frames, "every frame once, none twice");
        let (delayed, duplicated) = b_layer.counts();
        // How many datagrams carry 200 frames depends on how QUIC packs them (fewer when the
        // machine is busy and frames queue up): at least one per two frames, whatever the load.
        assert!(delayed > 100 && duplicated > 10, "b's layer delayed {delayed} and duplicated {duplicated} datagrams");
        assert!(a_layer.counts().0 > 0, "a's acks were delayed too");
        assert_eq!(b.stats.dropped_out.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_peer_is_forgotten_when_its_connections_end() {
        let pki = pki();
        let (a, mut a_inbox) = QuicNetwork::start(&pki.a, "127.0.0.1:0".parse().unwrap()).unwrap();
        let (b, _b_inbox) = QuicNetwork::start(&pki.b, "127.0.0.1:0".parse().unwrap()).unwrap();
        b.send(a.local_addr(), Some("a"), Channel::Gossip, b"hi".to_vec());
        next(&mut a_inbox.gossip).await;
        assert_eq!(a.peers_connected(), 1);
        b.close().await;
        eventually("a forgets b after b shut down", || a.peers_connected() == 0).await;
    }

    #[test]
    fn a_dial_attempt_the_peer_gave_up_is_no_refusal() {
        use quinn::{ConnectionError, TransportErrorCode};
        let closed_by_peer = |code: TransportErrorCode| {
            let ConnectionError::TransportError(error) = ConnectionError::TransportError(code.into()) else {
                unreachable!()
            };
            ConnectionError::ConnectionClosed(error.into())
        };
        // A losing attempt of the peer's dial, dropped by quinn during the handshake.
        assert!(abandoned_by_peer(&closed_by_peer(TransportErrorCode::APPLICATION_ERROR)));
        // A TLS alert from the peer (it refused our certificate), our own refusal of its
        // certificate, a handshake that never finished: refusals, still logged.
        assert!(!abandoned_by_peer(&closed_by_peer(TransportErrorCode::crypto(42))));
        assert!(!abandoned_by_peer(&ConnectionError::TransportError(TransportErrorCode::crypto(48).into())));
        assert!(!abandoned_by_peer(&ConnectionError::TimedOut));
    }

    #[test]
    fn a_connection_whose_sends_go_unacknowledged_for_a_second_is_stuck() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut progress = Progress::start(10, 5);
        // Sent at 0 (seen by the look at 0), nothing acknowledged since.
        assert!(!progress.observe(at(0), 11, 5, STUCK_AFTER));
        assert!(!progress.observe(at(200), 13, 5, STUCK_AFTER));
        assert!(!progress.observe(at(999), 14, 5, STUCK_AFTER));
        assert!(progress.observe(at(1_000), 14, 5, STUCK_AFTER));
    }

    #[test]
    fn acknowledged_or_idle_connections_are_never_stuck() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut progress = Progress::start(10, 5);
        // A busy healthy connection: every look sees new acks.
        for step in 1..50u64 {
            assert!(!progress.observe(at(step * 200), 10 + step * 3, 5 + step, STUCK_AFTER));
        }
        // Then idle for a long time: nothing sent, nothing to answer.
        assert!(!progress.observe(at(60_000), 10 + 49 * 3, 5 + 49, STUCK_AFTER));
        // A keep-alive answered within the wait resets it.
        assert!(!progress.observe(at(61_000), 10 + 49 * 3 + 1, 5 + 49, STUCK_AFTER));
        assert!(!progress.observe(at(61_900), 10 + 49 * 3 + 1, 5 + 50, STUCK_AFTER));
        assert!(!progress.observe(at(70_000), 10 + 49 * 3 + 1, 5 + 50, STUCK_AFTER));
    }

    #[tokio::test]
    async fn frames_reach_the_peer_with_the_sender_identity_checked() {
        let pki = pki();
        let (a, mut a_inbox) = QuicNetwork::start(&pki.a, "127.0.0.1:0".parse().unwrap()).unwrap();
        let (b, _b_inbox) = QuicNetwork::start(&pki.b, "127.0.0.1:0".parse().unwrap()).unwrap();
        b.send(a.local_addr(), Some("a"), Channel::Replica, b"hello".to_vec());
        b.send(a.local_addr(), None, Channel::Gossip, b"gossip".to_vec());
        let replica = next(&mut a_inbox.replica).await;
        assert_eq!((replica.from.as_str(), replica.bytes.as_slice()), ("b", &b"hello"[..]));
        assert_eq!(replica.addr, b.local_addr());
        assert_eq!(next(&mut a_inbox.gossip).await.bytes, b"gossip");
    }

    #[tokio::test]
    async fn a_claimed_node_id_that_the_certificate_does_not_name_is_refused() {
        let pki = pki();
        let (a, mut a_inbox) = QuicNetwork::start(&pki.a, "127.0.0.1:0".parse().unwrap()).unwrap();
        let connection = raw_connection(&pki.b, a.local_addr()).await;
        let mut stream = connection.open_uni().await.unwrap();
        let mut header = STREAM_MAGIC.to_vec();
        header.extend([Channel::Replica.to_byte(), 1, b'a']);
        header.extend(7u64.to_be_bytes());
        stream.write_all(&header).await.unwrap();
        stream.write_all(&5u32.to_be_bytes()).await.unwrap();
        stream.write_all(b"forged").await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed()).await.unwrap();
        assert!(matches!(closed, quinn::ConnectionError::ApplicationClosed(_)), "{closed:?}");
        assert_eq!(a.stats.refused_in.load(Ordering::Relaxed), 1);
        assert!(a_inbox.replica.try_recv().is_err(), "nothing from a forged identity is delivered");
    }

    #[tokio::test]
    async fn garbage_and_oversized_frames_close_the_connection_and_the_node_keeps_serving() {
        let pki = pki();
        let (a, mut a_inbox) = QuicNetwork::start(&pki.a, "127.0.0.1:0".parse().unwrap()).unwrap();
        let garbage = raw_connection(&pki.b, a.local_addr()).await;
        let mut stream = garbage.open_uni().await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), garbage.closed()).await.unwrap();
        let oversized = raw_connection(&pki.b, a.local_addr()).await;
        let mut stream = oversized.open_uni().await.unwrap();
        let mut header = STREAM_MAGIC.to_vec();
        header.extend([Channel::Gossip.to_byte(), 1, b'b']);
        header.extend(7u64.to_be_bytes());
        stream.write_all(&header).await.unwrap();
        stream.write_all(&(GOSSIP_FRAME_BYTES_MAX as u32 + 1).to_be_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), oversized.closed()).await.unwrap();
        assert_eq!(a.stats.refused_in.load(Ordering::Relaxed), 2);
        // A well-behaved peer is still served.
        let (b, _b_inbox) = QuicNetwork::start(&pki.b, "127.0.0.1:0".parse().unwrap()).unwrap();
        b.send(a.local_addr(), Some("a"), Channel::Replica, b"still here".to_vec());
        assert_eq!(next(&mut a_inbox.replica).await.bytes, b"still here");
    }

    #[tokio::test]
    async fn a_peer_whose_certificate_names_another_node_gets_nothing() {
        let pki = pki();
        let (a, _a_inbox) = QuicNetwork::start(&pki.a, "127.0.0.1:0".parse().unwrap()).unwrap();
        let (b, mut b_inbox) = QuicNetwork::start(&pki.b, "127.0.0.1:0".parse().unwrap()).unwrap();
        // Gossip claims node "c" lives at b's address: a refuses to hand it c's data.
        a.send(b.local_addr(), Some("c"), Channel::Replica, b"for c".to_vec());
        a.send(b.local_addr(), Some("b"), Channel::Replica, b"for b".to_vec());
        assert_eq!(next(&mut b_inbox.replica).await.bytes, b"for b");
        assert_eq!(a.stats.dropped_out.load(Ordering::Relaxed), 1);
    }
}
