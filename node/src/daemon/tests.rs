//! The daemon's own paths, driven in process (issue 12): real [`run_node`]s on real group files in
//! temp dirs, wired by an in-memory network, on tokio's paused clock (time jumps whenever every
//! task waits, so timeouts and backoffs cost nothing). A storage hook, the seam the simulator's
//! disk uses, fails writes and fsyncs on demand. These are the paths the end-to-end tests cannot
//! steer precisely: a write the disk refuses and the recovery after it, the rewrite after a
//! failed fsync, a repair that fails and is retried, apply reports, and a member leaving while a
//! round needs its vote.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32};

use konor_crdt::PeerMessage;
use konor_sdk::Secret;
use konor_sdk::protocol::WriteMeta;
use serde_json::{Value, json};

use super::*;
use crate::api::socket::{WatchReceiver, WatchSender};
use crate::peer::gossip_seal::SimSeal;
use crate::peer::transport::Incoming;
use crate::storage::store::{StorageHook, WriteFault};

const GOSSIP: Duration = Duration::from_millis(250);

/// Replica frames a test may send in all: far above what these tests exchange. Two nodes
/// trading frames without end never let the paused clock move; past this, the test fails
/// instead of hanging.
const BUSY_LOOP_FRAMES: u64 = 100_000;
const POLL: Duration = Duration::from_millis(100);

/// A running node as the hub knows it: its id and its inboxes (gossip, replica).
type Attached = (String, mpsc::Sender<Incoming>, mpsc::Sender<Incoming>);

/// The in-memory network: frames go straight to the receiver's inbox, unless a test drops them.
#[derive(Default)]
struct Hub {
    /// Running nodes by address.
    nodes: Mutex<BTreeMap<SocketAddr, Attached>>,
    /// Replica frames of these kinds on these links are dropped: (from, to, kind).
    drop: Mutex<BTreeSet<(String, String, &'static str)>>,
    /// Replica frames dropped so far, by (from, to, kind).
    dropped: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    /// Replica frames sent so far.
    sent: std::sync::atomic::AtomicU64,
    /// Replica frames of these kinds on these links are held back: (from, to, kind).
    hold: Mutex<BTreeSet<(String, String, &'static str)>>,
    /// The frames held back, in the order they were sent: (receiver's address, frame).
    held: Mutex<Vec<(SocketAddr, Incoming)>>,
}

impl Hub {
    fn drop_frames(&self, from: &str, to: &str, kinds: &[&'static str]) {
        let mut drop = self.drop.lock().unwrap();
        for kind in kinds {
            drop.insert((from.to_owned(), to.to_owned(), *kind));
        }
    }

    fn deliver_all(&self) {
        self.drop.lock().unwrap().clear();
    }

    fn dropped(&self, from: &str, to: &str, kind: &'static str) -> u64 {
        self.dropped.lock().unwrap().get(&(from.to_owned(), to.to_owned(), kind)).copied().unwrap_or(0)
    }

    fn hold_frames(&self, from: &str, to: &str, kinds: &[&'static str]) {
        let mut hold = self.hold.lock().unwrap();
        for kind in kinds {
            hold.insert((from.to_owned(), to.to_owned(), *kind));
        }
    }

    /// How many frames are held back.
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Stops holding frames back and delivers the held ones, in the order they were sent, all
    /// at once: the receiver handles them in one batch.
    fn release_held(&self) {
        self.hold.lock().unwrap().clear();
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        let nodes = self.nodes.lock().unwrap();
        for (addr, incoming) in held {
            if let Some((_, _, replica)) = nodes.get(&addr) {
                replica.try_send(incoming).unwrap();
            }
        }
    }
}

struct Port {
    hub: Arc<Hub>,
    addr: SocketAddr,
}

impl PeerNetwork for Port {
    fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    fn send(&self, addr: SocketAddr, _expect: Option<&str>, channel: Channel, bytes: Vec<u8>) {
        let nodes = self.hub.nodes.lock().unwrap();
        let (Some((from, _, _)), Some((to, gossip, replica))) = (nodes.get(&self.addr), nodes.get(&addr)) else {
            return;
        };
        if channel == Channel::Replica {
            let sent = self.hub.sent.fetch_add(1, Ordering::Relaxed);
            assert!(sent < BUSY_LOOP_FRAMES, "the nodes exchange replica frames without end (a busy loop)");
        }
        if channel == Channel::Replica
            && let Ok(message) = PeerMessage::decode(&bytes)
        {
            let link = (from.clone(), to.clone(), message.kind());
            if self.hub.drop.lock().unwrap().contains(&link) {
                *self.hub.dropped.lock().unwrap().entry(link).or_default() += 1;
                return;
            }
            if self.hub.hold.lock().unwrap().contains(&link) {
                let incoming = Incoming { from: from.clone(), addr: self.addr, bytes, budget: None };
                self.hub.held.lock().unwrap().push((addr, incoming));
                return;
            }
        }
        let inbox = if channel == Channel::Gossip { gossip } else { replica };
        let _ = inbox.try_send(Incoming { from: from.clone(), addr: self.addr, bytes, budget: None });
    }
}

/// A disk that can be made full (every write fails with ENOSPC) or made to fail fsyncs.
#[derive(Debug, Default)]
struct FlakyDisk {
    full: AtomicBool,
    /// Writes to paths containing this fail with ENOSPC (one group's file, say).
    full_for: std::sync::Mutex<Option<String>>,
    /// fsyncs still to fail (EIO).
    syncs_to_fail: AtomicU32,
    /// The next writes to paths containing this fail with ENOSPC, as many as the count says
    /// (the first append of a batch fails, a later one fits, as on a disk nearly full).
    writes_to_fail: std::sync::Mutex<Option<(String, u32)>>,
    /// While true, every fsync of the group `app`'s file waits (a slow disk).
    syncs_held: std::sync::Mutex<bool>,
    syncs_released: std::sync::Condvar,
    /// fsyncs of the group `app`'s file that returned.
    syncs_done: AtomicU32,
    /// A write failed by `writes_to_fail` also damages the start of its file (a disk that
    /// fails a write and loses the file's header with it), so the reload after it fails.
    damage_on_fail: AtomicBool,
}

/// Releases held fsyncs when dropped, so a failed assertion does not leave a store thread
/// waiting for ever (the runtime would wait for it at the end of the test).
struct ReleaseSyncs<'a>(&'a FlakyDisk);

impl Drop for ReleaseSyncs<'_> {
    fn drop(&mut self) {
        self.0.hold_syncs(false);
    }
}

impl FlakyDisk {
    fn hold_syncs(&self, hold: bool) {
        *self.syncs_held.lock().unwrap() = hold;
        self.syncs_released.notify_all();
    }
}

impl StorageHook for FlakyDisk {
    fn before_write(&self, _path: &Path, _: u64, _: &[u8]) -> Result<(), WriteFault> {
        let full_here =
            self.full_for.lock().unwrap().as_deref().is_some_and(|part| _path.to_string_lossy().contains(part));
        let mut writes_to_fail = self.writes_to_fail.lock().unwrap();
        let fail_here = match writes_to_fail.as_mut() {
            Some((part, left)) if *left > 0 && _path.to_string_lossy().contains(part.as_str()) => {
                *left -= 1;
                true
            }
            _ => false,
        };
        if fail_here && self.damage_on_fail.load(Ordering::SeqCst) {
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new().write(true).open(_path).unwrap();
            file.write_all(b"not a group file").unwrap();
        }
        if self.full.load(Ordering::SeqCst) || full_here || fail_here {
            return Err(WriteFault { prefix_bytes: 0, error: std::io::Error::from_raw_os_error(28) });
        }
        Ok(())
    }

    fn before_sync(&self, path: &Path) -> std::io::Result<()> {
        let mut held = self.syncs_held.lock().unwrap();
        while *held && path.to_string_lossy().contains("groups/app.") {
            held = self.syncs_released.wait(held).unwrap();
        }
        drop(held);
        if path.to_string_lossy().contains("groups/app.") {
            self.syncs_done.fetch_add(1, Ordering::SeqCst);
        }
        let failing = self.syncs_to_fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1));
        match failing {
            Ok(_) => Err(std::io::Error::from_raw_os_error(5)),
            Err(_) => Ok(()),
        }
    }
}

/// One running node.
struct TestNode {
    id: String,
    addr: SocketAddr,
    data_dir: PathBuf,
    disk: Arc<FlakyDisk>,
    calls: mpsc::Sender<LocalCall>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn addr_of(index: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, index], 7400))
}

fn client(connection: u64) -> ClientInfo {
    ClientInfo {
        connection,
        pid: 1000 + connection as u32,
        process: "daemon-test".to_owned(),
        uid: None,
        user: None,
        reveal: true,
    }
}

impl TestNode {
    /// Starts node `n<index>` on `data_dir` (kept across restarts), seeded with node 1.
    fn start(hub: &Arc<Hub>, index: u8, data_dir: &Path) -> TestNode {
        TestNode::start_with(hub, index, data_dir, StoreIo::Inline)
    }

    /// The same, with the store's I/O run as `store_io` says (`Blocking`: as konord runs it,
    /// so the daemon goes on while a write or an fsync waits).
    fn start_with(hub: &Arc<Hub>, index: u8, data_dir: &Path, store_io: StoreIo) -> TestNode {
        TestNode::start_capped(hub, index, data_dir, store_io, crate::limits::MESH_NODES_MAX)
    }

    /// The same, in a mesh capped at `mesh_nodes_max` nodes.
    fn start_capped(hub: &Arc<Hub>, index: u8, data_dir: &Path, store_io: StoreIo, mesh_nodes_max: usize) -> TestNode {
        let id = format!("n{index}");
        let addr = addr_of(index);
        let (gossip_tx, gossip) = mpsc::channel(4096);
        let (replica_tx, replica) = mpsc::channel(4096);
        hub.nodes.lock().unwrap().insert(addr, (id.clone(), gossip_tx, replica_tx));
        let (calls_tx, calls) = mpsc::channel(64);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let disk = Arc::new(FlakyDisk::default());
        let parts = NodeParts {
            node_id: id.clone(),
            data_dir: data_dir.to_owned(),
            seeds: if index == 1 { Vec::new() } else { vec![addr_of(1)] },
            cluster: "daemon-test".to_owned(),
            gossip_interval: GOSSIP,
            labels: BTreeMap::new(),
            network: Arc::new(Port { hub: hub.clone(), addr }),
            inbox: Inbox { gossip, replica },
            calls,
            seed: [index; 32],
            wall_base: None,
            membership_poll: POLL,
            store_io,
            reads: None,
            storage_hook: Some(disk.clone()),
            gossip_seal: Arc::new(SimSeal::new(&id)),
            gossip_runtime: None,
            metrics: Default::default(),
            webhooks: None,
            keep_history: false,
            revocations: None,
            signer: None,
            mesh_nodes_max,
            audit: None,
        };
        let task = tokio::spawn(run_node(parts, shutdown_rx));
        TestNode { id, addr, data_dir: data_dir.to_owned(), disk, calls: calls_tx, shutdown, task }
    }

    /// Stops the node gracefully (it announces that it is leaving) and waits until it is gone.
    async fn stop(self, hub: &Hub) -> PathBuf {
        let _ = self.shutdown.send(true);
        let result = self.task.await.unwrap();
        assert!(result.is_ok(), "{} stopped with {result:?}", self.id);
        hub.nodes.lock().unwrap().remove(&self.addr);
        self.data_dir
    }

    async fn call_as(&self, connection: u64, request: Request) -> Response {
        let (reply, answer) = oneshot::channel();
        self.calls.send(LocalCall::Request { client: client(connection), request, reply }).await.unwrap();
        answer.await.unwrap()
    }

    async fn call(&self, request: Request) -> Response {
        self.call_as(1, request).await
    }

    async fn set(&self, key: &str, value: Value) -> Response {
        let entries = BTreeMap::from([(key.to_owned(), value)]);
        self.call(Request::Set { group: "app".into(), entries, meta: WriteMeta::default() }).await
    }

    async fn get(&self, key: &str) -> Option<Value> {
        match self.call(Request::Get { group: "app".into(), key: key.into() }).await {
            Response::Value { value, .. } => value,
            _ => None,
        }
    }

    /// `status` of `app`: (nodes, processes, degraded).
    async fn status(&self) -> Option<(Vec<NodeGroupRow>, Vec<ProcessRow>, Option<String>)> {
        match self.call(Request::Status { group: "app".into() }).await {
            Response::Status { nodes, processes, degraded, .. } => Some((nodes, processes, degraded)),
            _ => None,
        }
    }

    /// The heads of `node` in this node's `status` of `app` (its own, or as its gossip says).
    async fn heads_of(&self, node: &str) -> Option<String> {
        let (nodes, _, _) = self.status().await?;
        nodes.into_iter().find(|row| row.node == node).map(|row| row.heads)
    }

    async fn watch(&self, connection: u64) -> WatchReceiver {
        self.watch_group(connection, "app").await
    }

    async fn watch_group(&self, connection: u64, group: &str) -> WatchReceiver {
        let (events, received) = WatchSender::detached(connection);
        let (reply, answer) = oneshot::channel();
        let call = LocalCall::Watch {
            client: client(connection),
            group: group.into(),
            from_revision: None,
            prefix: None,
            events,
            reply,
        };
        self.calls.send(call).await.unwrap();
        assert!(matches!(answer.await.unwrap(), Response::Watching { .. }));
        received
    }
}

/// Polls `check` every poll period until it gives a value, at most `limit` of (paused) time.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Starts `count` nodes in temp dirs and waits until every one sees every other live.
async fn mesh(hub: &Arc<Hub>, dirs: &tempfile::TempDir, count: u8) -> Vec<TestNode> {
    let nodes: Vec<TestNode> =
        (1..=count).map(|index| TestNode::start(hub, index, &dirs.path().join(format!("n{index}")))).collect();
    await_mesh(&nodes).await;
    nodes
}

/// Waits until every one of `nodes` sees every other live.
async fn await_mesh(nodes: &[TestNode]) {
    for node in nodes {
        eventually("the mesh forms", Duration::from_secs(20), || async {
            let Response::Nodes { nodes: rows } = node.call(Request::Nodes).await else { return None };
            (rows.iter().filter(|row| row.state == "live").count() == nodes.len()).then_some(())
        })
        .await;
    }
}

/// Creates `app` on the first node and joins it on the others; returns its key.
async fn group_everywhere(nodes: &[TestNode], mode: &str) -> Secret {
    named_group_everywhere(nodes, "app", mode).await
}

/// Creates group `name` on the first node and joins it on the others; returns its key.
async fn named_group_everywhere(nodes: &[TestNode], name: &str, mode: &str) -> Secret {
    let create = Request::GroupCreate {
        name: name.into(),
        mode: mode.into(),
        key: None,
        evict_after_ms: (mode == "strong").then_some(konor_crdt::limits::EVICT_AFTER_MIN_MS),
        fencing: None,
        release: None,
    };
    let Response::GroupCreated { key, .. } = nodes[0].call(create).await else { panic!("group create failed") };
    for node in &nodes[1..] {
        eventually("the join succeeds", Duration::from_secs(20), || async {
            let join = Request::GroupJoin { name: name.into(), key: key.clone() };
            matches!(node.call(join).await, Response::Joined { .. }).then_some(())
        })
        .await;
    }
    key
}

async fn commit(node: &TestNode, key: &str, value: Value) {
    eventually("the write commits", Duration::from_secs(30), || async {
        matches!(node.set(key, value.clone()).await, Response::Committed { .. }).then_some(())
    })
    .await;
}

fn error_code(response: &Response) -> Option<ErrorCode> {
    match response {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// How long the failure is watched for what must not happen: anti-entropy offers a peer's
/// changes within a second or two.
const REFUSAL_WINDOW: Duration = Duration::from_secs(4);

/// docs/protocol.md: a write the writer cannot make durable is answered `not_durable`, and
/// nothing of it is notified to watchers or published in gossip (gossiped heads count as acks);
/// the node is degraded while its disk fails, and serves and writes again once it works.
#[tokio::test(start_paused = true)]
async fn a_write_the_disk_refuses_is_not_durable_never_announced_and_the_node_recovers() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 2).await;
    group_everywhere(&nodes, "eventual").await;
    commit(&nodes[0], "k", json!("old")).await;
    let durable_heads = eventually("n2 sees n1's heads", Duration::from_secs(10), || async {
        let own = nodes[0].heads_of("n1").await?;
        (nodes[1].heads_of("n1").await? == own).then_some(own)
    })
    .await;
    let mut events = nodes[0].watch(7).await;
    nodes[0].disk.full.store(true, Ordering::SeqCst);
    let refused = nodes[0].set("k", json!("refused")).await;
    assert_eq!(error_code(&refused), Some(ErrorCode::NotDurable), "{refused:?}");
    let started = Instant::now();
    while started.elapsed() < REFUSAL_WINDOW {
        // A zero timeout polls the watch once: an event already queued is taken. The reload
        // after the failed write may resync the watcher, to what the node holds durably.
        let event = tokio::time::timeout(Duration::ZERO, events.recv()).await;
        let durable_resync = matches!(&event, Ok(Some(WatchEvent::Resync { settings, .. }))
            if settings.get("k") == Some(&json!("old")));
        assert!(event.is_err() || durable_resync, "a watcher was told of a write the disk refused: {event:?}");
        assert_eq!(nodes[0].get("k").await, Some(json!("old")), "n1 serves what it could not persist");
        assert_eq!(nodes[0].heads_of("n1").await.as_ref(), Some(&durable_heads), "n1's own heads moved");
        let gossiped = nodes[1].heads_of("n1").await;
        assert_eq!(gossiped.as_ref(), Some(&durable_heads), "n1 gossiped heads it does not hold durably");
        tokio::time::sleep(POLL).await;
    }
    let (_, _, degraded) = nodes[0].status().await.unwrap();
    assert!(degraded.as_deref().is_some_and(|text| text.contains("disk full")), "{degraded:?}");
    // The disk works again: the next write commits, the node is no longer degraded, watchers
    // and peers hear of it.
    nodes[0].disk.full.store(false, Ordering::SeqCst);
    commit(&nodes[0], "k", json!("after")).await;
    let (_, _, degraded) = nodes[0].status().await.unwrap();
    assert_eq!(degraded, None);
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.recv().await {
            if let WatchEvent::Change { set, .. } = event
                && set.get("k") == Some(&json!("after"))
            {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(heard, Ok(true), "the watcher hears the write");
    // n2 may hold the refused change (pushed before the append failed): the copies converge
    // either way, and n1 gossips what it holds again.
    eventually("n1 and n2 converge and n2 sees n1's new heads", Duration::from_secs(10), || async {
        let own = nodes[0].heads_of("n1").await?;
        let same = nodes[1].heads_of("n2").await? == own && nodes[1].get("k").await == nodes[0].get("k").await;
        (same && own != durable_heads && nodes[1].heads_of("n1").await? == own).then_some(())
    })
    .await;
}

/// SPEC F24, issue 11: a failed fsync leaves the group file in an unknown state; the node is
/// degraded until it has rewritten the file from what it holds durably, retried with a backoff
/// while the disk keeps failing, with no new write needed. The rewritten file holds nothing of
/// the refused write.
#[tokio::test(start_paused = true)]
async fn a_failed_fsync_degrades_the_node_until_its_group_file_is_rewritten() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let mut nodes = mesh(&hub, &dirs, 1).await;
    group_everywhere(&nodes, "eventual").await;
    commit(&nodes[0], "k", json!(1)).await;
    // The append's fsync fails, then the fsyncs of the first rewrites.
    nodes[0].disk.syncs_to_fail.store(3, Ordering::SeqCst);
    let refused = nodes[0].set("k", json!(2)).await;
    assert_eq!(error_code(&refused), Some(ErrorCode::NotDurable), "{refused:?}");
    let (_, _, degraded) = nodes[0].status().await.unwrap();
    assert!(degraded.is_some());
    eventually("the group file is rewritten", Duration::from_secs(20), || async {
        let (_, _, degraded) = nodes[0].status().await?;
        degraded.is_none().then_some(())
    })
    .await;
    assert_eq!(nodes[0].disk.syncs_to_fail.load(Ordering::SeqCst), 0, "the failed rewrites were retried");
    assert_eq!(nodes[0].get("k").await, Some(json!(1)));
    // What is on disk now loads, and holds the committed value only.
    let node = nodes.pop().unwrap();
    let data_dir = node.stop(&hub).await;
    let node = TestNode::start(&hub, 1, &data_dir);
    let served =
        eventually("the restarted node serves app", Duration::from_secs(10), || async { node.get("k").await }).await;
    assert_eq!(served, json!(1));
    commit(&node, "k", json!(3)).await;
}

/// A group whose file cannot be read back after a failed write is dropped (nothing unsaved may
/// be served); it is then repaired from a peer while the node runs, as at start, not only after
/// a restart (found noted in issue 14's session, fixed in issue 16's).
#[tokio::test(start_paused = true)]
async fn regression_a_group_unreadable_after_a_failed_write_is_repaired_without_a_restart() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 2).await;
    group_everywhere(&nodes, "eventual").await;
    commit(&nodes[0], "k", json!("kept")).await;
    eventually("n2 holds the write", Duration::from_secs(10), || async {
        (nodes[1].get("k").await == Some(json!("kept"))).then_some(())
    })
    .await;
    nodes[1].disk.damage_on_fail.store(true, Ordering::SeqCst);
    *nodes[1].disk.writes_to_fail.lock().unwrap() = Some(("groups/app.konor".to_owned(), 1));
    let refused = nodes[1].set("k", json!("lost")).await;
    assert_eq!(error_code(&refused), Some(ErrorCode::NotDurable), "{refused:?}");
    assert_eq!(nodes[1].get("k").await, None, "the group whose file is unreadable is not served");
    // The pushed change may have reached n1 before n2's failed write: either value is right.
    let repaired =
        eventually("n2 serves app again", Duration::from_secs(60), || async { nodes[1].get("k").await }).await;
    assert!(repaired == json!("kept") || repaired == json!("lost"), "{repaired}");
    let file = nodes[1].data_dir.join("groups").join("app.konor");
    assert!(std::fs::read(&file).unwrap().starts_with(&konor_crdt::record::FILE_MAGIC), "a new file replaced it");
    commit(&nodes[1], "k", json!("after")).await;
}

/// SPEC F24: a group file found unreadable at start is repaired from a peer; an attempt that
/// fails (the peer does not answer) is tried again, with a backoff, until it succeeds, without
/// a restart.
#[tokio::test(start_paused = true)]
async fn a_repair_that_fails_is_retried_until_a_peer_answers() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let mut nodes = mesh(&hub, &dirs, 2).await;
    group_everywhere(&nodes, "eventual").await;
    commit(&nodes[0], "k", json!("kept")).await;
    eventually("n2 holds the write", Duration::from_secs(10), || async {
        (nodes[1].get("k").await == Some(json!("kept"))).then_some(())
    })
    .await;
    let n2 = nodes.pop().unwrap();
    let data_dir = n2.stop(&hub).await;
    let file = data_dir.join("groups").join("app.konor");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..16].copy_from_slice(b"not a group file");
    std::fs::write(&file, &bytes).unwrap();
    // n1 gossips that it holds app, but answers none of n2's joins for a while.
    hub.drop_frames("n2", "n1", &["join_request", "join_proof"]);
    let n2 = TestNode::start(&hub, 2, &data_dir);
    eventually("n2 tries to repair app", Duration::from_secs(30), || async {
        (hub.dropped("n2", "n1", "join_request") > 0).then_some(())
    })
    .await;
    // Past the join's own timeout, that attempt has failed.
    tokio::time::sleep(Duration::from_millis(konor_crdt::limits::JOIN_TIMEOUT_MS + 1_000)).await;
    assert_eq!(n2.get("k").await, None, "the unreadable group is not served");
    assert!(!file.exists(), "the unreadable file was moved to quarantine");
    hub.deliver_all();
    let repaired = eventually("n2 repaired app", Duration::from_secs(60), || async { n2.get("k").await }).await;
    assert_eq!(repaired, json!("kept"));
}

/// F16: each connection's latest report per group is one row, cut to 1 KiB at a character
/// boundary; a row turns into history when its connection goes, and every row goes with the
/// group when this node leaves it.
#[tokio::test(start_paused = true)]
async fn report_rows_are_one_per_connection_and_go_with_the_connection_or_the_group() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 2).await;
    let key = group_everywhere(&nodes, "eventual").await;
    let report = |version: &str, result: ApplyResult| Request::ReportApply {
        group: "app".into(),
        version: version.into(),
        revision: 1,
        result,
    };
    assert_eq!(nodes[0].call_as(7, report("v1", ApplyResult::Ok)).await, Response::Done);
    assert_eq!(nodes[0].call_as(7, report("v2", ApplyResult::Ok)).await, Response::Done);
    // Three-byte characters: 1024 falls inside one.
    let long = ApplyResult::Error { message: "€".repeat(1_000) };
    assert_eq!(nodes[0].call_as(8, report("v2", long)).await, Response::Done);
    let (_, rows, _) = nodes[0].status().await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].version, "v2", "a connection's latest report replaces its earlier one");
    let ApplyResult::Error { message } = &rows[1].result else { panic!("{rows:?}") };
    assert!(message.len() <= REPORT_MESSAGE_BYTES_MAX + 3 && message.ends_with("€..."), "{} bytes", message.len());
    nodes[0].calls.send(LocalCall::Disconnected { connection: 7 }).await.unwrap();
    let (_, rows, _) = nodes[0].status().await.unwrap();
    let live: Vec<u32> = rows.iter().filter(|row| row.gone_ms.is_none()).map(|row| row.pid).collect();
    assert_eq!(live, [1008], "connection 7's row is no longer live");
    let gone: Vec<(u32, &str)> =
        rows.iter().filter(|row| row.gone_ms.is_some()).map(|row| (row.pid, row.version.as_str())).collect();
    assert_eq!(gone, [(1007, "v2")], "it is history, with its last report");
    // n1 leaves app and joins it again: the reports were about the copy it left.
    let left = nodes[0].call(Request::GroupLeave { name: "app".into(), force: false }).await;
    assert_eq!(left, Response::Done);
    let join = Request::GroupJoin { name: "app".into(), key };
    assert!(matches!(nodes[0].call(join).await, Response::Joined { .. }));
    let (_, rows, _) = nodes[0].status().await.unwrap();
    assert!(rows.is_empty(), "reports outlived the group they were about: {rows:?}");
}

/// docs/protocol.md "Rounds": a write needs every member's yes, and a member seen dead aborts it
/// at once. A member shutting down gracefully announces it (`leaving`), and the daemon counts it
/// dead for quorums from then on: a write waiting for its vote is aborted as soon as that
/// spreads, not at the round's timeout, and the others write on without it.
#[tokio::test(start_paused = true)]
async fn a_member_shutting_down_while_a_write_awaits_its_vote_aborts_it_at_once() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let mut nodes = mesh(&hub, &dirs, 3).await;
    group_everywhere(&nodes, "strong").await;
    commit(&nodes[0], "k", json!(1)).await;
    hub.drop_frames("n1", "n3", &["prepare"]);
    let n1 = nodes.remove(0);
    let n1 = Arc::new(n1);
    let writer = {
        let n1 = n1.clone();
        tokio::spawn(async move { n1.set("k", json!(2)).await })
    };
    eventually("the write's round is open", Duration::from_secs(5), || async {
        (hub.dropped("n1", "n3", "prepare") > 0).then_some(())
    })
    .await;
    let n3 = nodes.pop().unwrap();
    let leaving = Instant::now();
    let shutdown = tokio::spawn({
        let hub = hub.clone();
        async move { n3.stop(&hub).await }
    });
    let answer = writer.await.unwrap();
    let waited = leaving.elapsed();
    assert_eq!(error_code(&answer), Some(ErrorCode::Aborted), "{answer:?}");
    let round_timeout = Duration::from_millis(konor_crdt::limits::ROUND_TIMEOUT_MS);
    assert!(waited < round_timeout / 2, "the write waited {waited:?} for a member that said it was leaving");
    shutdown.await.unwrap();
    hub.deliver_all();
    // After evict_after, n1 and n2 write without n3.
    let acked = eventually("a write commits without n3", Duration::from_secs(30), || async {
        match n1.set("k", json!(3)).await {
            Response::Committed { acked_by, .. } => Some(acked_by),
            _ => None,
        }
    })
    .await;
    assert_eq!(acked, ["n1", "n2"]);
    assert_eq!(nodes[0].get("k").await, Some(json!(3)));
}

/// A failed append of one group fails that group's outputs only: a write of another group in
/// the same batch, durable on disk, is answered `committed` and told to its watchers (found by
/// the chaos suite, seed 238: during a full disk a strong group's watcher on the degraded node
/// never saw one revision, because an eventual group's append had failed just before it).
#[tokio::test(start_paused = true)]
async fn a_failed_append_of_one_group_does_not_silence_another_group_in_the_same_batch() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 1).await;
    group_everywhere(&nodes, "eventual").await;
    let create = Request::GroupCreate {
        name: "other".into(),
        mode: "eventual".into(),
        key: None,
        evict_after_ms: None,
        fencing: None,
        release: None,
    };
    assert!(matches!(nodes[0].call(create).await, Response::GroupCreated { .. }));
    let mut events = nodes[0].watch_group(7, "other").await;
    *nodes[0].disk.full_for.lock().unwrap() = Some("groups/app.".to_owned());
    // Both calls are queued before the daemon runs again: one batch, app's append first.
    let set = |group: &str, value: &str| Request::Set {
        group: group.into(),
        entries: BTreeMap::from([("k".to_owned(), json!(value))]),
        meta: WriteMeta::default(),
    };
    let (app_reply, app_answer) = oneshot::channel();
    let (other_reply, other_answer) = oneshot::channel();
    for (request, reply) in [(set("app", "refused"), app_reply), (set("other", "kept"), other_reply)] {
        nodes[0].calls.try_send(LocalCall::Request { client: client(1), request, reply }).unwrap();
    }
    let app = app_answer.await.unwrap();
    let other = other_answer.await.unwrap();
    assert_eq!(error_code(&app), Some(ErrorCode::NotDurable), "{app:?}");
    assert!(matches!(other, Response::Committed { .. }), "a durable write of another group was answered {other:?}");
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert!(
        matches!(&event, Ok(Some(WatchEvent::Change { set, .. })) if set.get("k") == Some(&json!("kept"))),
        "the watcher of `other` was not told of its durable write: {event:?}"
    );
}

/// docs/protocol.md "Fencing": a member that staged a commit is in doubt until it holds it, so
/// it never serves the version before it as fresh. Found by the chaos suite (seed 336): on a
/// nearly full disk the append of a committed change and its decision failed, a later append of
/// the same group in the same batch (the next round's `Staged`, built on the change that was
/// not saved) fitted, and the group reloaded from that file had lost the round in doubt: the
/// node, neither in doubt nor holding the commit, served the version before it as fresh.
#[tokio::test(start_paused = true)]
async fn a_failed_append_is_never_followed_by_a_later_append_of_its_group_in_the_same_batch() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 3).await;
    group_everywhere(&nodes, "strong").await;
    named_group_everywhere(&nodes, "ev", "eventual").await;
    commit(&nodes[0], "k", json!(1)).await;
    for node in &nodes[1..] {
        eventually("every member holds k = 1", Duration::from_secs(10), || async {
            (node.get("k").await == Some(json!(1))).then_some(())
        })
        .await;
    }
    // n3 stays in doubt about the next commit (it hears neither the decision nor the change),
    // so its lease grants show that round staged and heads without it. n2 learns of the
    // commit only from the held decision, and gets nothing by sync.
    hub.drop_frames("n1", "n3", &["decision_answer", "sync"]);
    hub.drop_frames("n2", "n3", &["decision_answer", "sync"]);
    hub.drop_frames("n1", "n2", &["sync"]);
    hub.drop_frames("n3", "n2", &["sync"]);
    hub.hold_frames("n1", "n2", &["decision_answer"]);
    let Response::Committed { acked_by, .. } = nodes[0].set("k", json!(2)).await else {
        panic!("the write of k = 2 did not commit")
    };
    assert_eq!(acked_by, ["n1", "n2", "n3"], "n2 staged the commit durably before it voted");
    assert_eq!(hub.held(), 1, "the decision for n2 is held back");
    // Then, to n2 and after the decision: a push of the eventual group (persisted first and
    // applied while its fsync runs: a `Resume` ends the run of appends), and the prepare of the
    // next round, built on the commit.
    hub.hold_frames("n1", "n2", &["changes", "prepare"]);
    hub.drop_frames("n1", "n3", &["prepare"]);
    let ev = Request::Set {
        group: "ev".into(),
        entries: BTreeMap::from([("x".to_owned(), json!(1))]),
        meta: WriteMeta::default(),
    };
    assert!(matches!(nodes[0].call(ev).await, Response::Committed { .. }));
    let (next_reply, next_answer) = oneshot::channel();
    let next = Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([("k".to_owned(), json!(3))]),
        meta: WriteMeta::default(),
    };
    nodes[0].calls.send(LocalCall::Request { client: client(1), request: next, reply: next_reply }).await.unwrap();
    eventually("the next round's prepare is held", Duration::from_secs(5), || async {
        (hub.held() == 3).then_some(())
    })
    .await;
    // n2's first write to app's file fails (a full disk), the next one fits.
    *nodes[1].disk.writes_to_fail.lock().unwrap() = Some(("groups/app.".to_owned(), 1));
    hub.release_held();
    // n2 staged k = 2 durably and every member acknowledged it: until n2 holds it (by the
    // decision it asks for) it is in doubt about that round, and serves reads as stale. n3 stays
    // in doubt for a while (its query and recovery start after DECISION_TIMEOUT_MS), long enough
    // for n2's leases from it to look current.
    let released = Instant::now();
    let window = Duration::from_millis(konor_crdt::limits::DECISION_TIMEOUT_MS);
    while released.elapsed() < window {
        let get = Request::Get { group: "app".into(), key: "k".into() };
        let Response::Value { value, freshness, .. } = nodes[1].call(get).await else {
            panic!("n2 does not serve app")
        };
        let in_doubt = freshness.stale && freshness.stale_reason.as_deref().is_some_and(|why| why.contains("in doubt"));
        assert!(
            value == Some(json!(2)) || in_doubt,
            "n2 served {value:?} ({}, stale: {:?}) {:?} after the batch, though it staged k = 2 and every member acknowledged it",
            freshness.version,
            freshness.stale_reason,
            released.elapsed()
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(*nodes[1].disk.writes_to_fail.lock().unwrap(), Some(("groups/app.".to_owned(), 0)), "the append failed");
    let next = next_answer.await.unwrap();
    assert!(!matches!(next, Response::Committed { .. }), "{next:?}");
    hub.deliver_all();
    eventually("n2 holds k = 2", Duration::from_secs(30), || async {
        (nodes[1].get("k").await == Some(json!(2))).then_some(())
    })
    .await;
}

/// Issue 14: a member tells its watchers of a change pushed to an eventual group while its own
/// fsync runs, not after it; its acknowledgement still waits for the fsync, so the write does
/// not commit on it before.
#[tokio::test(start_paused = true)]
async fn a_pushed_change_reaches_watchers_before_the_members_fsync_and_commits_only_after_it() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = vec![
        TestNode::start(&hub, 1, &dirs.path().join("n1")),
        TestNode::start_with(&hub, 2, &dirs.path().join("n2"), StoreIo::Blocking),
    ];
    await_mesh(&nodes).await;
    group_everywhere(&nodes, "eventual").await;
    commit(&nodes[0], "k", json!("before")).await;
    let mut events = nodes[1].watch(7).await;
    nodes[1].disk.hold_syncs(true);
    let _release = ReleaseSyncs(&nodes[1].disk);
    // The paused clock does not move while a store thread waits: if the change is not told
    // before the fsync, a watchdog on real time releases it, and the check below fails.
    let disk = nodes[1].disk.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(10));
        disk.hold_syncs(false);
    });
    let synced = nodes[1].disk.syncs_done.load(Ordering::SeqCst);
    let writer = {
        let calls = nodes[0].calls.clone();
        tokio::spawn(async move {
            let (reply, answer) = oneshot::channel();
            let entries = BTreeMap::from([("k".to_owned(), json!("early"))]);
            let request = Request::Set { group: "app".into(), entries, meta: WriteMeta::default() };
            calls.send(LocalCall::Request { client: client(1), request, reply }).await.unwrap();
            answer.await.unwrap()
        })
    };
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert!(
        matches!(&event, Ok(Some(WatchEvent::Change { set, .. })) if set.get("k") == Some(&json!("early"))),
        "n2's watcher was not told of the pushed change: {event:?}"
    );
    assert_eq!(nodes[1].disk.syncs_done.load(Ordering::SeqCst), synced, "n2 saved the change before telling");
    // A group of two needs n2's durable acknowledgement: no commit while its fsync waits.
    if writer.is_finished() {
        let answer = writer.await.unwrap();
        assert!(!matches!(answer, Response::Committed { .. }), "committed before n2's fsync: {answer:?}");
    } else {
        nodes[1].disk.hold_syncs(false);
        let answer = writer.await.unwrap();
        let Response::Committed { acked_by, .. } = &answer else { panic!("{answer:?}") };
        assert!(acked_by.contains(&"n2".to_owned()), "{answer:?}");
    }
    nodes[1].disk.hold_syncs(false);
}

/// Issue 14: a watcher told of a pushed change that its node then fails to save gets an
/// explicit resync to what the node holds, at a revision above every one it was given (SPEC
/// invariant 4), and the change arrives again once the disk works.
#[tokio::test(start_paused = true)]
async fn a_watcher_told_of_a_change_its_node_fails_to_save_gets_a_resync() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 2).await;
    group_everywhere(&nodes, "eventual").await;
    commit(&nodes[0], "k", json!("before")).await;
    eventually("n2 holds k", Duration::from_secs(10), || async {
        (nodes[1].get("k").await == Some(json!("before"))).then_some(())
    })
    .await;
    let mut events = nodes[1].watch(7).await;
    *nodes[1].disk.full_for.lock().unwrap() = Some("groups/app.".to_owned());
    let _ = nodes[0].set("k", json!("lost here")).await;
    let told = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.ok().flatten();
    let Some(WatchEvent::Change { revision: told_at, set, .. }) = &told else { panic!("{told:?}") };
    assert_eq!(set.get("k"), Some(&json!("lost here")));
    let resync = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.ok().flatten();
    let Some(WatchEvent::Resync { revision, settings, .. }) = &resync else { panic!("no resync: {resync:?}") };
    assert!(revision > told_at, "the resync's revision {revision} is not above {told_at}");
    assert_eq!(settings.get("k"), Some(&json!("before")), "{settings:?}");
    assert_eq!(nodes[1].get("k").await, Some(json!("before")));
    *nodes[1].disk.full_for.lock().unwrap() = None;
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(WatchEvent::Change { set, .. }) if set.get("k") == Some(&json!("lost here")) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await;
    assert_eq!(again, Ok(true), "the change did not arrive again");
}

/// The node's health, as `konorctl health` asks for it.
async fn health_of(node: &TestNode) -> crate::health::NodeHealth {
    let Response::Health { health } = node.call(Request::Health).await else { panic!("{} gave no health", node.id) };
    *health
}

/// A hub and a way to start node `n<index>` in a mesh capped at `cap` nodes.
fn capped_mesh(cap: usize) -> (Arc<Hub>, impl Fn(u8) -> TestNode) {
    let hub = Arc::new(Hub::default());
    let dirs = Arc::new(tempfile::tempdir().unwrap());
    let for_start = hub.clone();
    let start = move |index: u8| {
        let dir = dirs.path().join(format!("n{index}"));
        TestNode::start_capped(&for_start, index, &dir, StoreIo::Inline, cap)
    };
    (hub, start)
}

/// Issue 19, item 4: at the mesh's node cap every node says so in its health (a failed check,
/// not only a log line), and a node past the cap is kept out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_of_a_mesh_at_its_cap_fails_its_health_check_and_a_node_past_it_is_refused() {
    let cap = 3;
    let (hub, start) = capped_mesh(cap);
    let first: Vec<TestNode> = (1..=3).map(&start).collect();
    await_mesh(&first).await;
    let late = start(4);
    for node in first.iter().chain(std::iter::once(&late)) {
        eventually("the node reports the mesh at its cap", Duration::from_secs(20), || async {
            let health = health_of(node).await;
            (health.mesh.at_cap && health.mesh.cap == cap as u64).then_some(health)
        })
        .await;
        let health = health_of(node).await;
        let failures = crate::health::failures(&health, &crate::health::Thresholds::default());
        assert!(
            failures.iter().any(|failure| failure.contains("the mesh is at its node cap")),
            "{}: {failures:?}",
            node.id
        );
    }
    // The three that formed the mesh never admit the fourth.
    for node in &first {
        let Response::Nodes { nodes: rows } = node.call(Request::Nodes).await else { panic!("no nodes") };
        assert!(rows.iter().all(|row| row.id != "n4"), "{} admitted n4: {rows:?}", node.id);
    }
    for node in first.into_iter().chain(std::iter::once(late)) {
        node.stop(&hub).await;
    }
}

/// Below its cap a mesh's health says so and passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_below_its_cap_passes_its_health_check() {
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 3).await;
    for node in &nodes {
        let health = health_of(node).await;
        assert_eq!((health.mesh.nodes, health.mesh.cap, health.mesh.at_cap), (3, 800, false), "{}", node.id);
        assert!(crate::health::failures(&health, &crate::health::Thresholds::default()).is_empty());
    }
    for node in nodes {
        node.stop(&hub).await;
    }
}

/// The cap counts the node states gossip holds, old generations of restarted nodes included,
/// while a node's view shows each id once: a node whose view is below the cap still reports the
/// mesh at its cap while its gossip filter refuses a new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refusing_new_nodes_reports_the_cap_even_when_its_view_is_below_it() {
    let (hub, start) = capped_mesh(4);
    let mut nodes: Vec<TestNode> = (1..=3).map(&start).collect();
    await_mesh(&nodes).await;
    // n3 restarts: gossip now holds two generations of it, four states in all.
    let n3 = nodes.pop().unwrap();
    n3.stop(&hub).await;
    nodes.push(start(3));
    await_mesh(&nodes).await;
    let late = start(4);
    let n1 = &nodes[0];
    let health = eventually("n1 reports the mesh at its cap", Duration::from_secs(20), || async {
        let health = health_of(n1).await;
        health.mesh.at_cap.then_some(health)
    })
    .await;
    assert_eq!(health.mesh.nodes, 3, "n1's view holds each id once: {:?}", health.mesh);
    assert!(health.mesh.refused > 0, "{:?}", health.mesh);
    for node in nodes.into_iter().chain(std::iter::once(late)) {
        node.stop(&hub).await;
    }
}

/// Issue 14: pushes a member takes in one batch are saved with one fsync. Each push is persisted
/// before it is applied (its apply overlaps the fsync); each one used to end the run of appends,
/// so a member handed eight pushes at once made eight fsyncs in series, and under concurrent
/// writers the members' disks, not their CPUs, set the write rate.
#[tokio::test(start_paused = true)]
async fn pushes_a_member_takes_in_one_batch_share_one_fsync() {
    const PUSHES: usize = 8;
    let hub = Arc::new(Hub::default());
    let dirs = tempfile::tempdir().unwrap();
    let nodes = mesh(&hub, &dirs, 3).await;
    group_everywhere(&nodes, "eventual").await;
    commit(&nodes[0], "k", json!(0)).await;
    eventually("n2 holds k = 0", Duration::from_secs(10), || async {
        (nodes[1].get("k").await == Some(json!(0))).then_some(())
    })
    .await;
    // n3's acks commit the writes; n2's pushes wait, then arrive together.
    hub.hold_frames("n1", "n2", &["changes"]);
    for value in 1..=PUSHES {
        assert!(matches!(nodes[0].set("k", json!(value)).await, Response::Committed { .. }));
    }
    assert_eq!(hub.held(), PUSHES, "each write pushed one frame to n2");
    let synced = nodes[1].disk.syncs_done.load(Ordering::SeqCst);
    hub.release_held();
    eventually("n2 holds the last write", Duration::from_secs(10), || async {
        (nodes[1].get("k").await == Some(json!(PUSHES))).then_some(())
    })
    .await;
    let fsyncs = nodes[1].disk.syncs_done.load(Ordering::SeqCst) - synced;
    assert_eq!(fsyncs, 1, "n2 saved {PUSHES} pushes taken in one batch with {fsyncs} fsyncs");
}
