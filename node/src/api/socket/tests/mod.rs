//! Tests of the local socket: real Unix sockets, real SDK clients, and a stand-in daemon that
//! answers `LocalCall`s the way konord would.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use konor_sdk::protocol::{
    ApplyResult, ClientFrame, ErrorCode, Freshness, PROTOCOL_VERSION, ServerFrame, WatchEvent, decode_payload,
    encode_frame, frame_length,
};
use konor_sdk::{Client, SdkError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

mod bounds;

const GROUP: &str = "app";

/// Writes to this group are held by the stand-in daemon until [`release_held`].
const HELD: &str = "held";

/// Bound on every wait in these tests; a healthy run needs milliseconds.
const WAIT: Duration = Duration::from_secs(10);

/// The state of the stand-in daemon: one group, `app`.
#[derive(Default)]
struct DaemonState {
    settings: BTreeMap<String, Value>,
    revision: u64,
    history: Vec<WatchEvent>,
    watchers: Vec<WatchSender>,
    /// Replays from `from_revision` inclusive, one event too many, to prove the SDK drops
    /// duplicates.
    replay_inclusive: bool,
    /// Answers to writes of group [`HELD`], not sent yet.
    held: Vec<oneshot::Sender<Response>>,
    /// Set by [`release_held`]: later writes of [`HELD`] are answered at once.
    released: bool,
}

impl DaemonState {
    fn content_hash(&self) -> String {
        let mut settings = konor_crdt::Settings::new();
        for (key, value) in &self.settings {
            settings.insert(key.clone(), value.clone());
        }
        settings.content_hash().to_hex()
    }

    fn freshness(&self) -> Freshness {
        Freshness {
            revision: self.revision,
            version: format!("v{}", self.revision),
            age_ms: 0,
            stale: false,
            stale_reason: None,
        }
    }
}

struct Harness {
    _directory: tempfile::TempDir,
    path: PathBuf,
    stats: Arc<LocalApiStats>,
    daemon: Arc<Mutex<DaemonState>>,
    /// `from_revision` of every Watch the daemon received.
    watch_requests: mpsc::Receiver<Option<u64>>,
    /// Every ReportApply the daemon received.
    reports: mpsc::Receiver<Request>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<anyhow::Result<()>>,
    config: LocalApiConfig,
    calls: mpsc::Sender<LocalCall>,
}

impl Harness {
    /// Stops the listener: every connection ends and the socket file goes.
    async fn stop_listener(&mut self) {
        self.shutdown.send(true).unwrap();
        (&mut self.server).await.unwrap().unwrap();
        assert!(!self.path.exists());
    }

    /// Starts a new listener on the same path, answered by the same daemon state.
    async fn start_listener(&mut self) {
        let (shutdown, shutdown_receiver) = watch::channel(false);
        self.shutdown = shutdown;
        self.server = tokio::spawn(serve(self.config.clone(), self.calls.clone(), shutdown_receiver));
        let path = self.path.clone();
        wait_until(|| path.exists()).await;
    }
}

async fn start(configure: impl FnOnce(&mut LocalApiConfig)) -> Harness {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("run").join("konord.sock");
    let mut config = LocalApiConfig::new(&path, "node-test");
    configure(&mut config);
    let stats = config.stats.clone();
    let (calls, calls_receiver) = mpsc::channel(64);
    let (shutdown, shutdown_receiver) = watch::channel(false);
    let daemon = Arc::new(Mutex::new(DaemonState::default()));
    let (watch_sender, watch_requests) = mpsc::channel(64);
    let (report_sender, reports) = mpsc::channel(64);
    tokio::spawn(play_daemon(calls_receiver, daemon.clone(), watch_sender, report_sender));
    let server = tokio::spawn(serve(config.clone(), calls.clone(), shutdown_receiver));
    wait_until(|| path.exists()).await;
    Harness { _directory: directory, path, stats, daemon, watch_requests, reports, shutdown, server, config, calls }
}

/// Polls a condition that another task makes true, within [`WAIT`].
async fn wait_until(mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("condition not met in time");
}

/// Answers LocalCalls the way konord would, from `DaemonState`.
async fn play_daemon(
    mut calls: mpsc::Receiver<LocalCall>,
    daemon: Arc<Mutex<DaemonState>>,
    watch_requests: mpsc::Sender<Option<u64>>,
    reports: mpsc::Sender<Request>,
) {
    while let Some(call) = calls.recv().await {
        match call {
            LocalCall::Request { request, reply, .. } => {
                if matches!(request, Request::ReportApply { .. }) {
                    reports.send(request.clone()).await.unwrap();
                }
                let mut state = daemon.lock().unwrap();
                let response = match request {
                    Request::Set { group, .. } if group == HELD && !state.released => {
                        state.held.push(reply);
                        continue;
                    }
                    Request::Set { group, .. } if group == HELD => Response::Done,
                    Request::Get { group, key } if group == GROUP => Response::Value {
                        value: state.settings.get(&key).cloned(),
                        group,
                        key,
                        freshness: state.freshness(),
                    },
                    Request::Snapshot { group, .. } if group == GROUP => Response::Snapshot {
                        group,
                        settings: state.settings.clone(),
                        content_hash: state.content_hash(),
                        freshness: state.freshness(),
                    },
                    Request::ReportApply { .. } => Response::Done,
                    Request::Get { group, .. } | Request::Snapshot { group, .. } => {
                        Response::Error { code: ErrorCode::UnknownGroup, message: format!("no group `{group}`") }
                    }
                    other => Response::Error { code: ErrorCode::BadRequest, message: other.kind().to_owned() },
                };
                let _ = reply.send(response);
            }
            LocalCall::Watch { group, from_revision, events, reply, .. } => {
                watch_requests.send(from_revision).await.unwrap();
                // `app` and `app-N` exist; events are pushed to every watcher.
                if group != GROUP && !group.starts_with("app-") {
                    let message = format!("no group `{group}`");
                    let _ = reply.send(Response::Error { code: ErrorCode::UnknownGroup, message });
                    continue;
                }
                let mut state = daemon.lock().unwrap();
                if let Some(from) = from_revision {
                    for event in &state.history {
                        let revision = event.revision();
                        if revision > from || (state.replay_inclusive && revision == from) {
                            events.try_send(event.clone()).unwrap();
                        }
                    }
                }
                state.watchers.push(events);
                let _ = reply.send(Response::Watching { group, revision: state.revision });
            }
            LocalCall::Disconnected { .. } | LocalCall::Health { .. } | LocalCall::Enroll { .. } => {}
        }
    }
}

/// Applies a change to the stand-in daemon and pushes it to every watcher; returns its revision.
fn push_change(daemon: &Mutex<DaemonState>, set: &[(&str, Value)], removed: &[&str]) -> u64 {
    let mut state = daemon.lock().unwrap();
    state.revision += 1;
    for (key, value) in set {
        state.settings.insert((*key).to_owned(), value.clone());
    }
    for key in removed {
        state.settings.remove(*key);
    }
    let event = WatchEvent::Change {
        group: GROUP.to_owned(),
        revision: state.revision,
        version: format!("v{}", state.revision),
        set: set.iter().map(|(key, value)| ((*key).to_owned(), value.clone())).collect(),
        removed: removed.iter().map(|key| (*key).to_owned()).collect(),
    };
    state.history.push(event.clone());
    // Encoded once and shared, as konord does.
    let event = EncodedEvent::from(event);
    state.watchers.retain(|watcher| watcher.try_send(event.clone()).is_ok());
    state.revision
}

/// Answers every held write with `done`, and later ones at once; returns how many were held.
fn release_held(daemon: &Mutex<DaemonState>) -> usize {
    let held = {
        let mut state = daemon.lock().unwrap();
        state.released = true;
        std::mem::take(&mut state.held)
    };
    let count = held.len();
    for reply in held {
        let _ = reply.send(Response::Done);
    }
    count
}

async fn next_event(watch: &mut konor_sdk::Watch) -> WatchEvent {
    tokio::time::timeout(WAIT, watch.next()).await.expect("no event in time").expect("watch ended").unwrap()
}

async fn raw_connect(path: &Path) -> UnixStream {
    UnixStream::connect(path).await.unwrap()
}

/// The next frame from the daemon, or `None` when it closed the connection.
async fn read_raw(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<ServerFrame> {
    tokio::time::timeout(WAIT, async {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await.ok()?;
        let mut payload = vec![0u8; frame_length(header).unwrap()];
        stream.read_exact(&mut payload).await.unwrap();
        Some(decode_payload(&payload).unwrap())
    })
    .await
    .expect("no frame in time")
}

fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

fn request_frame(id: u64, request: Request) -> Vec<u8> {
    encode_frame(&ClientFrame { id, request }).unwrap()
}

fn hello() -> Request {
    Request::Hello { protocol: PROTOCOL_VERSION, pid: 42, process: "raw-test".into() }
}

fn error_code(frame: Option<ServerFrame>) -> (u64, ErrorCode) {
    match frame {
        Some(ServerFrame::Response { id, response: Response::Error { code, .. } }) => (id, code),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_is_answered_with_welcome() {
    let harness = start(|_| {}).await;
    let client = Client::connect(&harness.path).await.unwrap();
    assert_eq!(client.node_id(), "node-test");
    assert_eq!(harness.stats.connections.load(Ordering::Relaxed), 1);

    let mut stream = raw_connect(&harness.path).await;
    stream.write_all(&request_frame(1, hello())).await.unwrap();
    match read_raw(&mut stream).await {
        Some(ServerFrame::Response { id: 1, response: Response::Welcome { protocol, node_id, daemon_version } }) => {
            assert_eq!((protocol, node_id.as_str()), (PROTOCOL_VERSION, "node-test"));
            assert_eq!(daemon_version, env!("CARGO_PKG_VERSION"));
        }
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn refuses_a_client_speaking_another_protocol_version() {
    let harness = start(|_| {}).await;
    let mut stream = raw_connect(&harness.path).await;
    let hello = Request::Hello { protocol: PROTOCOL_VERSION + 1, pid: 1, process: "future".into() };
    stream.write_all(&request_frame(1, hello)).await.unwrap();
    assert_eq!(error_code(read_raw(&mut stream).await), (1, ErrorCode::Protocol));
    assert!(read_raw(&mut stream).await.is_none());
}

#[tokio::test]
async fn get_round_trips_through_the_daemon() {
    let harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("db.pool", json!(10))], &[]);
    let client = Client::connect(&harness.path).await.unwrap();
    assert_eq!(client.get(GROUP, "db.pool").await.unwrap(), Some(json!(10)));
    assert_eq!(client.get_as::<u32>(GROUP, "db.pool").await.unwrap(), Some(10));
    assert_eq!(client.get(GROUP, "absent").await.unwrap(), None);
    let error = client.get("nope", "x").await.unwrap_err();
    assert!(matches!(error, SdkError::Daemon { code: ErrorCode::UnknownGroup, .. }), "{error:?}");
    let snapshot = client.snapshot(GROUP).await.unwrap();
    assert_eq!(snapshot.freshness.revision, 1);
    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Config {
        db: Db,
    }
    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Db {
        pool: u32,
    }
    assert_eq!(snapshot.typed::<Config>().unwrap(), Config { db: Db { pool: 10 } });
    // A secret this process may not reveal: the error says so, rather than "invalid type".
    push_change(&harness.daemon, &[("db.pin", json!(konor_sdk::protocol::MASKED))], &[]);
    let masked = client.get_as::<u32>(GROUP, "db.pin").await.unwrap_err().to_string();
    assert!(masked.contains("may not reveal it"), "{masked}");
}

#[tokio::test]
async fn a_watch_receives_pushed_events_in_order() {
    let harness = start(|_| {}).await;
    let client = Client::connect(&harness.path).await.unwrap();
    let mut watch = client.watch(GROUP, None).await.unwrap();
    for index in 0..5 {
        push_change(&harness.daemon, &[("counter", json!(index))], &[]);
    }
    for expected in 1..=5u64 {
        let event = next_event(&mut watch).await;
        assert_eq!(event.revision(), expected);
        let WatchEvent::Change { set, .. } = event else { panic!("expected a change") };
        assert_eq!(set["counter"], json!(expected - 1));
    }
}

#[tokio::test]
async fn the_socket_file_is_private() {
    let harness = start(|_| {}).await;
    let mode = std::fs::metadata(&harness.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

async fn fresh_client_reads(path: &Path) {
    let client = Client::connect(path).await.unwrap();
    assert_eq!(client.get(GROUP, "a").await.unwrap(), Some(json!(1)));
}

#[tokio::test]
async fn bad_frames_are_counted_and_the_listener_keeps_serving() {
    let harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);
    let fresh_client_works = || fresh_client_reads(&harness.path);

    // Garbage: a valid length around bytes that are not JSON.
    let mut stream = raw_connect(&harness.path).await;
    stream.write_all(&raw_frame(b"\x00\xffnot json at all")).await.unwrap();
    assert_eq!(error_code(read_raw(&mut stream).await), (0, ErrorCode::BadRequest));
    assert!(read_raw(&mut stream).await.is_none());
    fresh_client_works().await;

    // A length over FRAME_BYTES_MAX: refused from the header alone.
    let mut stream = raw_connect(&harness.path).await;
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert_eq!(error_code(read_raw(&mut stream).await), (0, ErrorCode::BadRequest));
    assert!(read_raw(&mut stream).await.is_none());
    fresh_client_works().await;

    // A request before Hello.
    let mut stream = raw_connect(&harness.path).await;
    stream.write_all(&request_frame(7, Request::GroupList)).await.unwrap();
    assert_eq!(error_code(read_raw(&mut stream).await), (7, ErrorCode::Protocol));
    assert!(read_raw(&mut stream).await.is_none());
    fresh_client_works().await;

    // A frame cut short by the end of the stream.
    let mut stream = raw_connect(&harness.path).await;
    stream.write_all(&request_frame(1, hello())).await.unwrap();
    assert!(matches!(read_raw(&mut stream).await, Some(ServerFrame::Response { id: 1, .. })));
    let mut cut = request_frame(2, Request::GroupList);
    cut.truncate(cut.len() - 3);
    stream.write_all(&cut).await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(error_code(read_raw(&mut stream).await), (0, ErrorCode::BadRequest));
    fresh_client_works().await;

    // An unknown request after Hello is refused by id, and the connection stays open.
    let mut stream = raw_connect(&harness.path).await;
    stream.write_all(&request_frame(1, hello())).await.unwrap();
    assert!(matches!(read_raw(&mut stream).await, Some(ServerFrame::Response { id: 1, .. })));
    stream.write_all(&raw_frame(br#"{"id":5,"request":{"type":"from_the_future"}}"#)).await.unwrap();
    assert_eq!(error_code(read_raw(&mut stream).await), (5, ErrorCode::BadRequest));
    let get = Request::Get { group: GROUP.into(), key: "a".into() };
    stream.write_all(&request_frame(6, get)).await.unwrap();
    assert!(matches!(
        read_raw(&mut stream).await,
        Some(ServerFrame::Response { id: 6, response: Response::Value { .. } })
    ));

    assert_eq!(harness.stats.bad_frames.load(Ordering::Relaxed), 5);
}

#[tokio::test]
async fn on_change_reports_each_outcome_of_the_callback() {
    let mut harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);
    let client = Client::connect(&harness.path).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_by_callback = seen.clone();
    let _handle = client
        .on_change(GROUP, move |event, settings| {
            seen_by_callback.lock().unwrap().push((event.revision(), settings.clone()));
            match settings.get("bad") {
                Some(value) => Err(format!("refusing bad = {value}")),
                None => Ok(()),
            }
        })
        .await
        .unwrap();
    push_change(&harness.daemon, &[("b", json!(2))], &[]);
    push_change(&harness.daemon, &[("bad", json!(true))], &[]);

    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let report = tokio::time::timeout(WAIT, harness.reports.recv()).await.unwrap().unwrap();
        let Request::ReportApply { group, version, revision, result } = report else { unreachable!() };
        assert_eq!((group.as_str(), version), (GROUP, format!("v{revision}")));
        outcomes.push((revision, result));
    }
    assert_eq!(
        outcomes,
        vec![
            (1, ApplyResult::Ok),
            (2, ApplyResult::Ok),
            (3, ApplyResult::Error { message: "refusing bad = true".into() }),
        ]
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen[2].1,
        [("a", json!(1)), ("b", json!(2)), ("bad", json!(true))]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect::<BTreeMap<_, _>>()
    );
}

#[tokio::test]
async fn the_cached_group_follows_pushed_events_from_memory() {
    let harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("a", json!(1)), ("b", json!("x"))], &[]);
    let client = Client::connect(&harness.path).await.unwrap();
    let cache = client.cached(GROUP).await.unwrap();
    assert_eq!(cache.get("a"), Some(json!(1)));
    assert_eq!(cache.content_hash(), harness.daemon.lock().unwrap().content_hash());

    let revision = push_change(&harness.daemon, &[("a", json!(2))], &["b"]);
    tokio::time::timeout(WAIT, cache.wait_for_revision(revision)).await.unwrap().unwrap();
    assert_eq!(cache.get("a"), Some(json!(2)));
    assert_eq!(cache.get("b"), None);
    assert_eq!(cache.revision(), revision);
    assert_eq!(cache.version(), format!("v{revision}"));
    // The cache's running hash agrees with konor-crdt's hash of the same settings.
    assert_eq!(cache.content_hash(), harness.daemon.lock().unwrap().content_hash());

    // Reads are memory only: count them against a budget far below one socket round trip.
    let reads = 100_000u32;
    let started = std::time::Instant::now();
    for _ in 0..reads {
        std::hint::black_box(cache.get("a"));
    }
    let per_read = started.elapsed() / reads;
    println!("CachedGroup::get: {per_read:?} per read");
    assert!(per_read < Duration::from_micros(5), "{per_read:?} per read");
}

#[tokio::test]
async fn a_watch_resumes_after_the_daemon_drops_its_connection() {
    let mut harness = start(|_| {}).await;
    harness.daemon.lock().unwrap().replay_inclusive = true;
    let client = Client::connect(&harness.path).await.unwrap();
    let mut watch = client.watch(GROUP, Some(0)).await.unwrap();
    assert_eq!(harness.watch_requests.recv().await.unwrap(), Some(0));
    for index in 1..=3 {
        push_change(&harness.daemon, &[("n", json!(index))], &[]);
    }
    for expected in 1..=3 {
        assert_eq!(next_event(&mut watch).await.revision(), expected);
    }

    // The daemon drops the watch: the socket closes the connection mid-stream.
    harness.daemon.lock().unwrap().watchers.clear();
    push_change(&harness.daemon, &[("n", json!(4))], &[]);
    push_change(&harness.daemon, &[("n", json!(5))], &[]);

    // Revision 3 is replayed again by this sloppy daemon; the watch skips it.
    assert_eq!(next_event(&mut watch).await.revision(), 4);
    assert_eq!(next_event(&mut watch).await.revision(), 5);
    let resumed_from = tokio::time::timeout(WAIT, harness.watch_requests.recv()).await.unwrap().unwrap();
    assert_eq!(resumed_from, Some(3));
    push_change(&harness.daemon, &[("n", json!(6))], &[]);
    assert_eq!(next_event(&mut watch).await.revision(), 6);
    assert_eq!(watch.last_revision(), 6);
}

#[tokio::test]
async fn a_watch_and_the_client_survive_a_listener_restart() {
    let mut harness = start(|_| {}).await;
    let client = Client::connect(&harness.path).await.unwrap();
    let mut watch = client.watch(GROUP, None).await.unwrap();
    push_change(&harness.daemon, &[("n", json!(1))], &[]);
    assert_eq!(next_event(&mut watch).await.revision(), 1);

    // The watch retries while nothing listens, and catches up once the listener is back:
    // revision 2 was written while it was away.
    harness.stop_listener().await;
    let waiting = tokio::spawn(async move {
        let event = next_event(&mut watch).await;
        (event, watch)
    });
    push_change(&harness.daemon, &[("n", json!(2))], &[]);
    assert!(Client::connect(&harness.path).await.is_err());
    harness.start_listener().await;
    let (event, watch) = tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap();
    assert_eq!(event.revision(), 2);
    assert_eq!(watch.last_revision(), 2);
    // The client's own connection reconnects on the next call.
    assert_eq!(client.get(GROUP, "n").await.unwrap(), Some(json!(2)));
}

#[tokio::test]
async fn a_watch_on_an_unknown_group_is_refused() {
    let harness = start(|_| {}).await;
    let client = Client::connect(&harness.path).await.unwrap();
    let error = client.watch("nope", None).await.unwrap_err();
    assert!(matches!(error, SdkError::Daemon { code: ErrorCode::UnknownGroup, .. }), "{error:?}");
}

#[tokio::test]
async fn refuses_connections_over_the_limit() {
    let harness = start(|config| config.connections_max = 1).await;
    let first = Client::connect(&harness.path).await.unwrap();
    let error = Client::connect(&harness.path).await.unwrap_err();
    match &error {
        SdkError::Daemon { code: ErrorCode::Internal, message } => {
            assert!(message.contains("too many connections"), "{message}")
        }
        other => panic!("expected too many connections, got {other:?}"),
    }
    drop(first);
    wait_until(|| harness.stats.connections.load(Ordering::Relaxed) == 0).await;
    Client::connect(&harness.path).await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_the_listener_and_removes_the_socket() {
    let harness = start(|_| {}).await;
    let client = Client::connect(&harness.path).await.unwrap();
    harness.shutdown.send(true).unwrap();
    tokio::time::timeout(WAIT, harness.server).await.unwrap().unwrap().unwrap();
    assert!(!harness.path.exists());
    assert!(client.get(GROUP, "a").await.is_err());
}

#[tokio::test]
async fn replaces_a_stale_socket_but_not_a_live_one() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("konord.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let (calls, _calls_receiver) = mpsc::channel(1);
    let (shutdown, shutdown_receiver) = watch::channel(false);
    let server = tokio::spawn(serve(LocalApiConfig::new(&path, "n"), calls.clone(), shutdown_receiver));
    wait_until(|| std::fs::metadata(&path).is_ok_and(|metadata| metadata.permissions().mode() & 0o777 == 0o600)).await;

    // Now something listens there: a second daemon must not take the path.
    let (_second_shutdown, second_receiver) = watch::channel(false);
    let error = serve(LocalApiConfig::new(&path, "n"), calls, second_receiver).await.unwrap_err();
    assert!(error.to_string().contains("listens on"), "{error}");

    shutdown.send(true).unwrap();
    server.await.unwrap().unwrap();

    std::fs::write(&path, "not a socket").unwrap();
    let (calls, _calls_receiver) = mpsc::channel(1);
    let (_shutdown, shutdown_receiver) = watch::channel(false);
    let error = serve(LocalApiConfig::new(&path, "n"), calls, shutdown_receiver).await.unwrap_err();
    assert!(error.to_string().contains("not a socket"), "{error}");
}
