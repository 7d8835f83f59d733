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
use tracing::{debug, info, warn};

use crate::tls::{self, TlsIdentity};

/// Magic bytes opening every stream.
const STREAM_MAGIC: [u8; 4] = *b"KNR1";

/// Boot ids last seen per peer address: a new one means the peer restarted.
type Boots = std::sync::Mutex<BTreeMap<SocketAddr, u64>>;

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

/// What a peer writer does next, in queue order.
enum Job {
    /// Write a frame.
    Frame(Outgoing),
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
    /// Random per process start, sent in every stream header: peers tell a restart of this
    /// node (new boot id) from an ordinary new connection.
    boot_id: u64,
    /// Counters.
    pub stats: Arc<TransportStats>,
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
        let server_config = identity.server_config()?;
        let client_config = identity.client_config()?;
        let mut endpoint = quinn::Endpoint::server(server_config, listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (UDP): {e}"))?;
        endpoint.set_default_client_config(client_config);
        let (gossip_tx, gossip_rx) = mpsc::channel(INCOMING_QUEUE_MAX);
        let (replica_tx, replica_rx) = mpsc::channel(INCOMING_QUEUE_MAX);
        let network = Arc::new(QuicNetwork {
            endpoint: endpoint.clone(),
            node_id: identity.node_id().to_owned(),
            senders: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
            boot_id: rand::random(),
            stats: Arc::new(TransportStats::default()),
        });
        let stats = network.stats.clone();
        let peers =
            PeerRegistry { senders: network.senders.clone(), boots: Arc::new(std::sync::Mutex::new(BTreeMap::new())) };
        tokio::spawn(accept_loop(endpoint, gossip_tx, replica_tx, stats, peers));
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

    fn sender_for(&self, addr: SocketAddr) -> Option<mpsc::Sender<Job>> {
        let mut senders = self.senders.lock().ok()?;
        if let Some(sender) = senders.get(&addr)
            && !sender.is_closed()
        {
            return Some(sender.clone());
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        senders.insert(addr, tx.clone());
        let writer = PeerWriter {
            endpoint: self.endpoint.clone(),
            node_id: self.node_id.clone(),
            boot_id: self.boot_id,
            addr,
            connection: None,
            streams: BTreeMap::new(),
            stats: self.stats.clone(),
        };
        tokio::spawn(writer.run(rx));
        Some(tx)
    }
}

impl PeerNetwork for QuicNetwork {
    fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn send(&self, addr: SocketAddr, expect: Option<&str>, channel: Channel, bytes: Vec<u8>) {
        let outgoing = Outgoing { expect: expect.map(str::to_owned), channel, bytes };
        let queued = self.sender_for(addr).is_some_and(|sender| sender.try_send(Job::Frame(outgoing)).is_ok());
        if !queued {
            self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            debug!(%addr, ?channel, "outgoing frame dropped: peer queue full");
        }
    }
}

/// Owns the connection to one peer address and writes its queue in order.
struct PeerWriter {
    endpoint: quinn::Endpoint,
    node_id: String,
    boot_id: u64,
    addr: SocketAddr,
    connection: Option<quinn::Connection>,
    streams: BTreeMap<Channel, quinn::SendStream>,
    stats: Arc<TransportStats>,
}

impl PeerWriter {
    async fn run(mut self, mut queue: mpsc::Receiver<Job>) {
        while let Some(job) = queue.recv().await {
            let outgoing = match job {
                Job::Frame(outgoing) => outgoing,
                Job::Reconnect => {
                    self.retire();
                    continue;
                }
            };
            // One retry on a fresh connection: a peer that restarted leaves a dead connection.
            let mut delivered = false;
            for attempt in 0..2 {
                match self.write(&outgoing).await {
                    Ok(()) => {
                        delivered = true;
                        break;
                    }
                    Err(error) => {
                        self.connection = None;
                        self.streams.clear();
                        if attempt == 1 {
                            debug!(addr = %self.addr, %error, "peer unreachable; frame dropped");
                        }
                    }
                }
            }
            if delivered {
                self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            }
        }
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

    async fn connection(&mut self, expect: Option<&str>) -> anyhow::Result<quinn::Connection> {
        let connection = match &self.connection {
            Some(connection) if connection.close_reason().is_none() => connection.clone(),
            _ => {
                let connecting = self.endpoint.connect(self.addr, tls::SERVER_NAME)?;
                let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                    .await
                    .map_err(|_| anyhow::anyhow!("connect to {} timed out", self.addr))??;
                self.streams.clear();
                self.connection = Some(connection.clone());
                connection
            }
        };
        if let Some(expected) = expect {
            let certificate = tls::peer_certificate(&connection)
                .ok_or_else(|| anyhow::anyhow!("peer at {} presented no certificate", self.addr))?;
            if let Err(error) = tls::verify_node_identity(&certificate, expected) {
                warn!(addr = %self.addr, expected, %error, "peer certificate does not match the node gossip places there");
                connection.close(1u32.into(), b"identity mismatch");
                self.connection = None;
                anyhow::bail!("identity mismatch at {}", self.addr);
            }
        }
        Ok(connection)
    }

    async fn write(&mut self, outgoing: &Outgoing) -> anyhow::Result<()> {
        let connection = self.connection(outgoing.expect.as_deref()).await?;
        if !self.streams.contains_key(&outgoing.channel) {
            let mut stream = connection.open_uni().await?;
            let mut header = STREAM_MAGIC.to_vec();
            header.push(outgoing.channel.to_byte());
            let id = self.node_id.as_bytes();
            header.push(u8::try_from(id.len()).unwrap_or(0));
            header.extend_from_slice(id);
            header.extend_from_slice(&self.boot_id.to_be_bytes());
            stream.write_all(&header).await?;
            self.streams.insert(outgoing.channel, stream);
        }
        let Some(stream) = self.streams.get_mut(&outgoing.channel) else {
            anyhow::bail!("stream vanished");
        };
        let length = u32::try_from(outgoing.bytes.len())?;
        let write = async {
            stream.write_all(&length.to_be_bytes()).await?;
            stream.write_all(&outgoing.bytes).await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(WRITE_TIMEOUT, write).await.map_err(|_| anyhow::anyhow!("write timed out"))??;
        Ok(())
    }
}

/// What the accept side needs to react to a peer's restart.
#[derive(Clone)]
struct PeerRegistry {
    senders: Arc<Senders>,
    boots: Arc<Boots>,
}

impl PeerRegistry {
    /// Records the boot id a peer sent; when it changed, the peer restarted and our connection
    /// to it may be dead without QUIC knowing (it notices only at the idle timeout), so frames
    /// after this point go on a fresh connection.
    fn saw_boot(&self, addr: SocketAddr, boot_id: u64) {
        let restarted = match self.boots.lock() {
            Ok(mut boots) => boots.insert(addr, boot_id).is_some_and(|previous| previous != boot_id),
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

async fn accept_loop(
    endpoint: quinn::Endpoint,
    gossip: mpsc::Sender<Incoming>,
    replica: mpsc::Sender<Incoming>,
    stats: Arc<TransportStats>,
    peers: PeerRegistry,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (gossip, replica, stats, peers) = (gossip.clone(), replica.clone(), stats.clone(), peers.clone());
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve_connection(connection, gossip, replica, stats, peers).await,
                Err(error) => {
                    stats.refused_in.fetch_add(1, Ordering::Relaxed);
                    info!(%addr, %error, "incoming connection refused (TLS)");
                }
            }
        });
    }
}

async fn serve_connection(
    connection: quinn::Connection,
    gossip: mpsc::Sender<Incoming>,
    replica: mpsc::Sender<Incoming>,
    stats: Arc<TransportStats>,
    peers: PeerRegistry,
) {
    let addr = connection.remote_address();
    let Some(certificate) = tls::peer_certificate(&connection) else {
        stats.refused_in.fetch_add(1, Ordering::Relaxed);
        connection.close(2u32.into(), b"no certificate");
        return;
    };
    while let Ok(stream) = connection.accept_uni().await {
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

async fn read_stream(
    mut stream: quinn::RecvStream,
    addr: SocketAddr,
    certificate: &rustls_pki_types::CertificateDer<'static>,
    gossip: mpsc::Sender<Incoming>,
    replica: mpsc::Sender<Incoming>,
    stats: &TransportStats,
    peers: &PeerRegistry,
) -> anyhow::Result<()> {
    let mut header = [0u8; 6];
    stream.read_exact(&mut header).await?;
    anyhow::ensure!(header[..4] == STREAM_MAGIC, "stream does not start with the konorkestra header");
    let channel = Channel::from_byte(header[4]).ok_or_else(|| anyhow::anyhow!("unknown channel {}", header[4]))?;
    let mut id = vec![0u8; usize::from(header[5])];
    stream.read_exact(&mut id).await?;
    let from = String::from_utf8(id).map_err(|_| anyhow::anyhow!("node id is not UTF-8"))?;
    tls::validate_node_id(&from)?;
    tls::verify_node_identity(certificate, &from)?;
    let mut boot = [0u8; 8];
    stream.read_exact(&mut boot).await?;
    peers.saw_boot(addr, u64::from_be_bytes(boot));
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
        let mut bytes = vec![0u8; length];
        stream.read_exact(&mut bytes).await?;
        stats.frames_in.fetch_add(1, Ordering::Relaxed);
        if sink.send(Incoming { from: from.clone(), addr, bytes }).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{init_ca, issue_node_cert, load_identity};

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
        endpoint.set_default_client_config(identity.client_config().unwrap());
        endpoint.connect(to, tls::SERVER_NAME).unwrap().await.unwrap()
    }

    async fn next(inbox: &mut mpsc::Receiver<Incoming>) -> Incoming {
        tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.unwrap().unwrap()
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
