//! The async client of the local `konord` socket: calls, watches that resume without gaps, a
//! reload callback whose outcome is reported back (F16), and a local read cache (F18).
//!
//! A [`Client`] holds one connection. A reader task demultiplexes the daemon's frames: answers go
//! to the caller waiting on that request id, events go to the subscriber of their group. A writer
//! task writes whole frames, so a caller that gives up halfway never leaves half a frame on the
//! socket. A [`Watch`] owns a connection of its own: events on the wire name only their group, so
//! one subscription per connection keeps each watch's revision stream separate, and resuming is
//! a plain reconnect.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, warn};

use crate::connect::{ConnectOptions, DaemonUid, check_daemon};
pub use crate::error::SdkError;
use crate::protocol::{
    ApplyResult, ErrorCode, FrameError, Freshness, PROTOCOL_VERSION, Request, Response, SOCKET_ENV, ServerFrame,
    WatchEvent, content_hash, encode_frame, frame_length,
};

/// First pause before a watch reconnects: long enough not to spin while konord restarts.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// Longest pause between reconnect attempts: a restarted daemon is picked up within 2 s.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Events buffered per watch between the reader task and the consumer. When full, the reader
/// stops reading, the socket fills, and the daemon drops the watch and closes the connection;
/// the watch then resumes from its last revision, so a slow consumer loses nothing.
const WATCH_BUFFER_EVENTS: usize = 1024;

/// A group's settings: dotted key -> JSON value.
pub type Settings = BTreeMap<String, Value>;

fn unexpected(expected: &str, response: &Response) -> SdkError {
    match response {
        Response::Error { code, message } => SdkError::Daemon { code: *code, message: message.clone() },
        other => SdkError::Protocol(format!("expected a `{expected}` answer, got `{}`", other.kind())),
    }
}

/// A snapshot of a group's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Group.
    pub group: String,
    /// Dotted key -> value.
    pub settings: Settings,
    /// Content hash (full hex).
    pub content_hash: String,
    /// Revision, version and age of the state served.
    pub freshness: Freshness,
}

impl Snapshot {
    /// One setting.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.settings.get(key)
    }

    /// The settings deserialized into `T`, dotted keys nested into objects
    /// (`"db.pool" = 10` becomes `{"db": {"pool": 10}}`).
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, SdkError> {
        typed_settings(&self.group, &self.settings)
    }
}

fn typed_settings<T: DeserializeOwned>(group: &str, settings: &Settings) -> Result<T, SdkError> {
    serde_json::from_value(nest_settings(settings)?).map_err(|error| SdkError::Decode {
        what: format!("the settings of group `{group}` as {}", std::any::type_name::<T>()),
        detail: error.to_string(),
    })
}

/// Nests dotted keys into JSON objects: `{"db.pool": 10, "name": "x"}` becomes
/// `{"db": {"pool": 10}, "name": "x"}`. A key under another key that holds an object is merged
/// into that object; a key under one that holds anything else, or set twice, is an error.
pub fn nest_settings(settings: &Settings) -> Result<Value, SdkError> {
    let mut root = Map::new();
    for (key, value) in settings {
        let conflict = || SdkError::Decode {
            what: format!("key `{key}`"),
            detail: "a shorter key already holds a value at this path, so the keys cannot nest".to_owned(),
        };
        let mut node = &mut root;
        let mut segments = key.split('.').peekable();
        while let Some(segment) = segments.next() {
            if segments.peek().is_none() {
                if node.contains_key(segment) {
                    return Err(conflict());
                }
                node.insert(segment.to_owned(), value.clone());
                break;
            }
            match node.entry(segment.to_owned()).or_insert_with(|| Value::Object(Map::new())) {
                Value::Object(child) => node = child,
                _ => return Err(conflict()),
            }
        }
    }
    Ok(Value::Object(root))
}

/// Applies a watch event to settings: a resync replaces them, a change sets and removes keys.
pub fn apply_event(settings: &mut Settings, event: &WatchEvent) {
    match event {
        WatchEvent::Resync { settings: all, .. } => settings.clone_from(all),
        WatchEvent::Change { set, removed, .. } => {
            for (key, value) in set {
                settings.insert(key.clone(), value.clone());
            }
            for key in removed {
                settings.remove(key);
            }
        }
    }
}

/// The reader task's routing table and the connection's fate, under one lock so a caller never
/// registers on a connection that already closed.
#[derive(Default)]
struct Demux {
    waiters: HashMap<u64, oneshot::Sender<Result<Response, SdkError>>>,
    subscribers: HashMap<String, mpsc::Sender<WatchEvent>>,
    closed: Option<SdkError>,
}

#[derive(Default)]
struct ConnectionState {
    demux: Mutex<Demux>,
}

impl ConnectionState {
    fn lock(&self) -> MutexGuard<'_, Demux> {
        // Nothing panics while holding this lock, so a poisoned lock still holds a sound table.
        self.demux.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection closed and fails every waiter with `reason`; subscribers see their
    /// channel end.
    fn close(&self, reason: SdkError) {
        let waiters = {
            let mut demux = self.lock();
            if demux.closed.is_some() {
                return;
            }
            debug!(%reason, "konord connection closed");
            demux.closed = Some(reason.clone());
            demux.subscribers.clear();
            std::mem::take(&mut demux.waiters)
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(reason.clone()));
        }
    }

    fn closed_reason(&self) -> SdkError {
        self.lock().closed.clone().unwrap_or_else(|| SdkError::Closed("the connection closed".to_owned()))
    }

    fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }
}

/// One socket to the daemon, after a successful Hello.
struct Connection {
    state: Arc<ConnectionState>,
    /// Callers write their own frames, one at a time: no hop through a writer task (a wakeup
    /// of another thread per request). A stuck daemon makes callers wait within their timeout.
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// Request ids start at 1: the daemon reserves id 0 for errors about the connection itself.
    next_id: AtomicU64,
    node_id: String,
    tasks: [AbortHandle; 1],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Connection {
    async fn open(path: &Path, timeout: Duration, daemon_uid: DaemonUid) -> Result<Connection, SdkError> {
        let connect_error = |detail: String| SdkError::Connect { path: path.to_owned(), detail };
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(connect_error(error.to_string())),
            Err(_) => return Err(connect_error(format!("no answer within {} ms", timeout.as_millis()))),
        };
        check_daemon(&stream, path, daemon_uid)?;
        let (read_half, write_half) = stream.into_split();
        let state = Arc::new(ConnectionState::default());
        let reader = tokio::spawn(read_loop(BufReader::new(read_half), state.clone(), timeout));
        let mut connection = Connection {
            state,
            writer: Arc::new(tokio::sync::Mutex::new(write_half)),
            next_id: AtomicU64::new(1),
            node_id: String::new(),
            tasks: [reader.abort_handle()],
        };
        let hello = Request::Hello { protocol: PROTOCOL_VERSION, pid: std::process::id(), process: process_name() };
        connection.node_id = match connection.request(&hello, timeout).await? {
            Response::Welcome { protocol, node_id, .. } if protocol == PROTOCOL_VERSION => node_id,
            Response::Welcome { protocol, .. } => {
                return Err(SdkError::Protocol(format!(
                    "konord at {} speaks protocol version {protocol}, this SDK speaks version {PROTOCOL_VERSION}: \
                     upgrade the older of the two",
                    path.display()
                )));
            }
            Response::Error { code: ErrorCode::Protocol, message } => return Err(SdkError::Protocol(message)),
            other => return Err(unexpected("welcome", &other)),
        };
        Ok(connection)
    }

    /// Sends one request and waits for its answer, all within `timeout`.
    async fn request(&self, request: &Request, timeout: Duration) -> Result<Response, SdkError> {
        /// `ClientFrame` by reference, so a request can be sent again without a copy.
        #[derive(serde::Serialize)]
        struct ClientFrameRef<'a> {
            id: u64,
            request: &'a Request,
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&ClientFrameRef { id, request })?;
        let (sender, receiver) = oneshot::channel();
        {
            let mut demux = self.state.lock();
            if let Some(reason) = &demux.closed {
                return Err(reason.clone());
            }
            demux.waiters.insert(id, sender);
        }
        let _waiter = WaiterGuard { state: &self.state, id };
        let exchange = async {
            if let Err(error) = self.write_frame(&frame, timeout).await {
                // The daemon closed the socket. Its reason (an idle close, too many connections)
                // comes with the end of the stream, which the reader turns into this waiter's
                // answer; a frame that could not be written was not handled.
                return match error {
                    SdkError::Closed(_) => receiver.await.unwrap_or(Err(error)),
                    other => Err(other),
                };
            }
            receiver.await.unwrap_or_else(|_| Err(self.state.closed_reason()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(SdkError::Timeout { waited: timeout }),
        }
    }

    /// Writes one whole frame. The common case is one non-blocking write in the caller's own
    /// task; when the socket takes only part of it, a task of its own writes the rest, so a
    /// caller that gives up (timeout, dropped future) never leaves half a frame on the socket.
    async fn write_frame(&self, frame: &[u8], timeout: Duration) -> Result<(), SdkError> {
        let mut writer = self.writer.clone().lock_owned().await;
        if let Some(reason) = &self.state.lock().closed {
            return Err(reason.clone());
        }
        let written = match writer.try_write(frame) {
            Ok(written) => written,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => 0,
            // The daemon closed the socket. The reader still gets what it sent last (such as
            // "too many connections") and then the end of the stream, and closes the
            // connection with the most useful reason.
            Err(error) => return Err(SdkError::Closed(format!("write failed: {error}"))),
        };
        if written == frame.len() {
            return Ok(());
        }
        let rest = frame[written..].to_vec();
        let state = self.state.clone();
        let finish = tokio::spawn(async move {
            match tokio::time::timeout(timeout, writer.write_all(&rest)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(SdkError::Closed(format!("write failed: {error}"))),
                Err(_) => {
                    // Half a frame is on the socket: nothing else can follow it.
                    let waited = timeout.as_millis();
                    let reason = SdkError::Closed(format!("konord did not take a frame within {waited} ms"));
                    state.close(reason.clone());
                    Err(reason)
                }
            }
        });
        finish.await.unwrap_or_else(|_| Err(SdkError::Closed("the frame writer task failed".to_owned())))
    }

    /// Routes the events of `group` on this connection to the returned receiver.
    fn subscribe(&self, group: &str) -> Result<mpsc::Receiver<WatchEvent>, SdkError> {
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER_EVENTS);
        let mut demux = self.state.lock();
        if let Some(reason) = &demux.closed {
            return Err(reason.clone());
        }
        demux.subscribers.insert(group.to_owned(), sender);
        Ok(receiver)
    }
}

/// Removes a waiter whose caller gave up (timeout or dropped future), so the table stays small.
struct WaiterGuard<'a> {
    state: &'a ConnectionState,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.state.lock().waiters.remove(&self.id);
    }
}

fn process_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|path| path.file_name().map(|name| name.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The reader is buffered: one `read` usually brings a whole frame (length and payload).
async fn read_loop(mut read_half: BufReader<OwnedReadHalf>, state: Arc<ConnectionState>, timeout: Duration) {
    let reason = loop {
        let payload = match read_frame(&mut read_half, timeout).await {
            Ok(Some(payload)) => payload,
            Ok(None) => break SdkError::Closed("konord closed the connection".to_owned()),
            Err(error) => break error,
        };
        match decode_server_frame(&payload) {
            Inbound::Response { id: 0, response: Response::Error { code, message } } => {
                // Id 0 is the daemon speaking about the connection itself (too many
                // connections, a bad frame): it closes the connection after this frame.
                break SdkError::Daemon { code, message };
            }
            Inbound::Response { id, response } => {
                let waiter = state.lock().waiters.remove(&id);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(Ok(response));
                    }
                    None => debug!(id, "answer for a request whose caller gave up"),
                }
            }
            Inbound::UnknownResponse { id, detail } => {
                let waiter = state.lock().waiters.remove(&id);
                if let Some(waiter) = waiter {
                    let message = format!("konord sent an answer this SDK does not understand (upgrade it?): {detail}");
                    let _ = waiter.send(Err(SdkError::Protocol(message)));
                }
            }
            Inbound::Event(event) => {
                let subscriber = state.lock().subscribers.get(event.group()).cloned();
                let Some(subscriber) = subscriber else {
                    debug!(group = event.group(), "event for a group nobody watches here");
                    continue;
                };
                let group = event.group().to_owned();
                // Waiting here is the backpressure: see WATCH_BUFFER_EVENTS.
                if subscriber.send(event).await.is_err() {
                    let mut demux = state.lock();
                    if demux.subscribers.get(&group).is_some_and(|current| current.same_channel(&subscriber)) {
                        demux.subscribers.remove(&group);
                    }
                }
            }
            Inbound::UnknownEvent { detail } => {
                warn!(%detail, "skipping a watch event this SDK does not understand (upgrade it?)");
            }
            Inbound::Malformed(error) => break SdkError::Frame(error),
        }
    };
    state.close(reason);
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames. The wait for a frame's
/// first byte has no timeout (a watch may be quiet for hours; a dead daemon's socket reports
/// end of stream); the rest of the frame must follow within `timeout`.
async fn read_frame(read_half: &mut BufReader<OwnedReadHalf>, timeout: Duration) -> Result<Option<Vec<u8>>, SdkError> {
    let mut header = [0u8; 4];
    let first = read_half.read(&mut header).await.map_err(|error| SdkError::Closed(format!("read failed: {error}")))?;
    if first == 0 {
        return Ok(None);
    }
    let truncated = || SdkError::Frame(FrameError::Decode("truncated frame: konord stopped mid-frame".to_owned()));
    let rest = async {
        read_half.read_exact(&mut header[first..]).await?;
        // Checked before allocating: a bad length never reserves memory.
        let length = frame_length(header).map_err(SdkError::Frame)?;
        let mut payload = vec![0u8; length];
        read_half.read_exact(&mut payload).await?;
        Ok::<_, ReadError>(payload)
    };
    match tokio::time::timeout(timeout, rest).await {
        Ok(Ok(payload)) => Ok(Some(payload)),
        Ok(Err(ReadError::Sdk(error))) => Err(error),
        Ok(Err(ReadError::Io(error))) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(truncated()),
        Ok(Err(ReadError::Io(error))) => Err(SdkError::Closed(format!("read failed: {error}"))),
        Err(_) => Err(truncated()),
    }
}

enum ReadError {
    Io(std::io::Error),
    Sdk(SdkError),
}

impl From<std::io::Error> for ReadError {
    fn from(error: std::io::Error) -> ReadError {
        ReadError::Io(error)
    }
}

impl From<SdkError> for ReadError {
    fn from(error: SdkError) -> ReadError {
        ReadError::Sdk(error)
    }
}

// One value per frame read, handed on at once (see `ServerFrame`).
#[allow(clippy::large_enum_variant)]
enum Inbound {
    Response {
        id: u64,
        response: Response,
    },
    Event(WatchEvent),
    /// A well-formed answer of a kind this SDK does not know (a newer daemon): fails that call.
    UnknownResponse {
        id: u64,
        detail: String,
    },
    /// A well-formed event of a kind this SDK does not know: skipped.
    UnknownEvent {
        detail: String,
    },
    Malformed(FrameError),
}

fn decode_server_frame(payload: &[u8]) -> Inbound {
    let error = match serde_json::from_slice::<ServerFrame>(payload) {
        Ok(ServerFrame::Response { id, response }) => return Inbound::Response { id, response },
        Ok(ServerFrame::Event { event }) => return Inbound::Event(event),
        Err(error) => error.to_string(),
    };
    // Additions to the protocol do not bump its version, so tell an unknown but well-formed
    // answer or event from garbage.
    let Ok(Value::Object(frame)) = serde_json::from_slice::<Value>(payload) else {
        return Inbound::Malformed(FrameError::Decode(error));
    };
    if let Some(id) = frame.get("response").and_then(|response| response.get("id")).and_then(Value::as_u64) {
        return Inbound::UnknownResponse { id, detail: error };
    }
    if frame.get("event").is_some_and(Value::is_object) {
        return Inbound::UnknownEvent { detail: error };
    }
    Inbound::Malformed(FrameError::Decode(error))
}

/// A connection to the local `konord`. Cheap to clone; clones share the connection, and many
/// tasks may call through one client at once. When the connection drops, the next call
/// reconnects (a call in flight at that moment fails with [`SdkError::Closed`]).
#[derive(Clone)]
pub struct Client {
    shared: Arc<ClientShared>,
    timeout: Duration,
}

struct ClientShared {
    path: PathBuf,
    /// Whose daemon this client accepts, on every reconnect and every watch's connection.
    daemon_uid: DaemonUid,
    current: Mutex<Arc<Connection>>,
    /// Serializes reconnects so a burst of callers opens one connection, not many.
    reconnect: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Client {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Client")
            .field("path", &self.shared.path)
            .field("node_id", &self.node_id())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Client {
    /// Connects to the daemon's socket at `path` and says Hello, with the default options and
    /// the daemon user named by `KONOR_DAEMON_UID` (see [`ConnectOptions::from_env`]).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, SdkError> {
        Client::connect_with(path, ConnectOptions::from_env()?).await
    }

    /// Connects to the daemon's socket at `path` with `options`, checks that the daemon runs
    /// as a user `options` accepts, and says Hello.
    pub async fn connect_with(path: impl AsRef<Path>, options: ConnectOptions) -> Result<Client, SdkError> {
        let path = path.as_ref().to_owned();
        let connection = Connection::open(&path, options.timeout, options.daemon_uid).await?;
        let shared = ClientShared {
            path,
            daemon_uid: options.daemon_uid,
            current: Mutex::new(Arc::new(connection)),
            reconnect: tokio::sync::Mutex::new(()),
        };
        Ok(Client { shared: Arc::new(shared), timeout: options.timeout })
    }

    /// Connects to the socket named by the `KONOR_SOCKET` environment variable.
    pub async fn connect_default() -> Result<Client, SdkError> {
        match std::env::var_os(SOCKET_ENV) {
            Some(path) if !path.is_empty() => Client::connect(PathBuf::from(path)).await,
            _ => Err(SdkError::SocketUnset),
        }
    }

    /// This handle with another timeout for each exchange (default [`TIMEOUT_DEFAULT`](crate::connect::TIMEOUT_DEFAULT)). Other
    /// clones keep theirs.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The daemon's node id, from its Welcome.
    pub fn node_id(&self) -> String {
        self.current().node_id.clone()
    }

    fn current(&self) -> Arc<Connection> {
        // Nothing panics while holding this lock.
        self.shared.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    async fn connection(&self) -> Result<Arc<Connection>, SdkError> {
        let current = self.current();
        if !current.state.is_closed() {
            return Ok(current);
        }
        let _reconnecting = self.shared.reconnect.lock().await;
        let current = self.current();
        if !current.state.is_closed() {
            return Ok(current);
        }
        debug!(path = %self.shared.path.display(), "reconnecting to konord");
        let fresh = Arc::new(Connection::open(&self.shared.path, self.timeout, self.shared.daemon_uid).await?);
        *self.shared.current.lock().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        Ok(fresh)
    }

    /// Sends any request and returns the daemon's answer; `Response::Error` becomes
    /// [`SdkError::Daemon`]. `Hello`, `Watch` and `Unwatch` belong to the connection and
    /// [`Client::watch`], and are refused here.
    pub async fn call(&self, request: Request) -> Result<Response, SdkError> {
        if matches!(request, Request::Hello { .. } | Request::Watch { .. } | Request::Unwatch { .. }) {
            return Err(SdkError::InvalidCall(format!(
                "`{}` is not sent through call(): the client says hello itself, and watches go through watch()",
                request.kind()
            )));
        }
        let connection = self.connection().await?;
        let answer = match connection.request(&request, self.timeout).await {
            // The daemon closed the connection as idle and handled nothing after its last
            // answer, so this request was not handled: send it again on a new connection.
            Err(SdkError::Daemon { code: ErrorCode::Idle, .. }) => {
                debug!("konord closed an idle connection under a request; sending it again");
                self.connection().await?.request(&request, self.timeout).await?
            }
            answer => answer?,
        };
        match answer {
            Response::Error { code, message } => Err(SdkError::Daemon { code, message }),
            response => Ok(response),
        }
    }

    /// One setting; `None` when the key is not set.
    pub async fn get(&self, group: &str, key: &str) -> Result<Option<Value>, SdkError> {
        match self.call(Request::Get { group: group.to_owned(), key: key.to_owned() }).await? {
            Response::Value { value, .. } => Ok(value),
            other => Err(unexpected("value", &other)),
        }
    }

    /// One setting deserialized into `T`; `None` when the key is not set.
    pub async fn get_as<T: DeserializeOwned>(&self, group: &str, key: &str) -> Result<Option<T>, SdkError> {
        let Some(value) = self.get(group, key).await? else {
            return Ok(None);
        };
        serde_json::from_value(value).map(Some).map_err(|error| SdkError::Decode {
            what: format!("`{group}/{key}` as {}", std::any::type_name::<T>()),
            detail: error.to_string(),
        })
    }

    /// All settings of a group; [`Snapshot::typed`] turns them into a struct.
    pub async fn snapshot(&self, group: &str) -> Result<Snapshot, SdkError> {
        match self.call(Request::Snapshot { group: group.to_owned() }).await? {
            Response::Snapshot { group, settings, content_hash, freshness } => {
                Ok(Snapshot { group, settings, content_hash, freshness })
            }
            other => Err(unexpected("snapshot", &other)),
        }
    }

    /// Subscribes to a group's changes after `from_revision` (`None`: from now on). The watch
    /// has a connection of its own and survives daemon restarts (see [`Watch`]).
    pub async fn watch(&self, group: &str, from_revision: Option<u64>) -> Result<Watch, SdkError> {
        let (path, daemon_uid) = (&self.shared.path, self.shared.daemon_uid);
        let (link, revision) = WatchLink::open(path, self.timeout, daemon_uid, group, from_revision).await?;
        Ok(Watch {
            path: self.shared.path.clone(),
            timeout: self.timeout,
            daemon_uid,
            group: group.to_owned(),
            last_revision: from_revision.unwrap_or(revision),
            link: Some(link),
            backoff: RECONNECT_BACKOFF_MIN,
            finished: false,
        })
    }

    /// Runs `callback` on every change of `group` and reports each outcome to the daemon (F16,
    /// `Request::ReportApply`), until the handle is dropped.
    ///
    /// The callback first runs once with the current state, presented as a
    /// [`WatchEvent::Resync`], so one callback configures the application at start and on every
    /// change, and the daemon knows from the start which version this process uses. It gets the
    /// event and the settings with the event applied; `Err(text)` reports a refusal. It runs on
    /// the runtime, so it should be quick (hand heavy work to `spawn_blocking`). A panic in it
    /// is reported as an error and the loop goes on.
    pub async fn on_change<F>(&self, group: &str, mut callback: F) -> Result<ChangeHandle, SdkError>
    where
        F: FnMut(&WatchEvent, &Settings) -> Result<(), String> + Send + 'static,
    {
        let snapshot = self.snapshot(group).await?;
        let mut watch = self.watch(group, Some(snapshot.freshness.revision)).await?;
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut settings = snapshot.settings;
            let initial = WatchEvent::Resync {
                group: snapshot.group,
                revision: snapshot.freshness.revision,
                version: snapshot.freshness.version,
                settings: settings.clone(),
            };
            run_callback_and_report(&client, &mut callback, &initial, &settings).await;
            while let Some(next) = watch.next().await {
                match next {
                    Ok(event) => {
                        apply_event(&mut settings, &event);
                        run_callback_and_report(&client, &mut callback, &event, &settings).await;
                    }
                    Err(error) => {
                        warn!(group = watch.group(), %error, "on_change stopped: the watch ended");
                        break;
                    }
                }
            }
        });
        Ok(ChangeHandle { task })
    }

    /// A local read cache of `group`: a snapshot kept current by a watch in a background task.
    /// Reads from it never touch the socket. While the daemon is unreachable the cache serves
    /// the last state it saw, and catches up when the watch reconnects.
    pub async fn cached(&self, group: &str) -> Result<CachedGroup, SdkError> {
        let snapshot = self.snapshot(group).await?;
        let mut watch = self.watch(group, Some(snapshot.freshness.revision)).await?;
        let hash = content_hash(&snapshot.settings);
        if hash != snapshot.content_hash {
            warn!(group, daemon = %snapshot.content_hash, local = %hash, "content hash differs from konord's");
        }
        let revision = snapshot.freshness.revision;
        let state = Arc::new(RwLock::new(CacheState {
            settings: snapshot.settings,
            revision,
            version: snapshot.freshness.version,
            hash: OnceLock::from(hash),
        }));
        let (revisions, revision_receiver) = watch::channel(revision);
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            while let Some(next) = watch.next().await {
                match next {
                    Ok(event) => {
                        let revision = event.revision();
                        write_cache(&task_state).apply(&event);
                        revisions.send_replace(revision);
                    }
                    Err(error) => {
                        warn!(group = watch.group(), %error, "the read cache stopped following its group");
                        break;
                    }
                }
            }
        });
        let inner =
            CacheInner { group: group.to_owned(), state, revisions: revision_receiver, task: task.abort_handle() };
        Ok(CachedGroup { inner: Arc::new(inner) })
    }
}

async fn run_callback_and_report<F>(client: &Client, callback: &mut F, event: &WatchEvent, settings: &Settings)
where
    F: FnMut(&WatchEvent, &Settings) -> Result<(), String>,
{
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(event, settings)));
    let result = match outcome {
        Ok(Ok(())) => ApplyResult::Ok,
        Ok(Err(message)) => ApplyResult::Error { message },
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            ApplyResult::Error { message: format!("the callback panicked: {text}") }
        }
    };
    let version = match event {
        WatchEvent::Change { version, .. } | WatchEvent::Resync { version, .. } => version.clone(),
    };
    let report = Request::ReportApply { group: event.group().to_owned(), version, revision: event.revision(), result };
    if let Err(error) = client.call(report).await {
        warn!(group = event.group(), revision = event.revision(), %error, "could not report the callback's outcome");
    }
}

/// A live subscription to one group's changes.
///
/// [`Watch::next`] yields every change exactly once, in revision order. When the connection
/// drops, the watch reconnects with backoff (50 ms doubling to 2 s, forever) and resubscribes
/// from the last revision it delivered, so the caller sees neither a gap nor a duplicate. A
/// [`WatchEvent::Resync`] replaces the whole state (the daemon no longer had the history asked
/// for, or its revisions restarted); it may carry a lower revision than before.
pub struct Watch {
    path: PathBuf,
    timeout: Duration,
    daemon_uid: DaemonUid,
    group: String,
    last_revision: u64,
    link: Option<WatchLink>,
    backoff: Duration,
    finished: bool,
}

impl fmt::Debug for Watch {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Watch")
            .field("group", &self.group)
            .field("last_revision", &self.last_revision)
            .field("connected", &self.link.is_some())
            .field("finished", &self.finished)
            .finish()
    }
}

struct WatchLink {
    _connection: Connection,
    events: mpsc::Receiver<WatchEvent>,
}

impl WatchLink {
    /// Opens a connection and subscribes; returns the daemon's revision at subscription time.
    async fn open(
        path: &Path,
        timeout: Duration,
        daemon_uid: DaemonUid,
        group: &str,
        from_revision: Option<u64>,
    ) -> Result<(WatchLink, u64), SdkError> {
        let connection = Connection::open(path, timeout, daemon_uid).await?;
        let events = connection.subscribe(group)?;
        let request = Request::Watch { group: group.to_owned(), from_revision };
        match connection.request(&request, timeout).await? {
            Response::Watching { revision, .. } => Ok((WatchLink { _connection: connection, events }, revision)),
            other => Err(unexpected("watching", &other)),
        }
    }
}

impl Watch {
    /// The next event; `None` after the watch ended with an error (the daemon refused to
    /// resubscribe, for instance because the group is gone), which the previous call returned.
    ///
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, SdkError>> {
        loop {
            if self.finished {
                return None;
            }
            let Some(link) = &mut self.link else {
                tokio::time::sleep(self.backoff).await;
                let from_revision = Some(self.last_revision);
                match WatchLink::open(&self.path, self.timeout, self.daemon_uid, &self.group, from_revision).await {
                    Ok((link, _)) => {
                        debug!(group = %self.group, from_revision = self.last_revision, "watch resubscribed");
                        self.link = Some(link);
                        self.backoff = RECONNECT_BACKOFF_MIN;
                    }
                    Err(error) if is_final(&error) => {
                        self.finished = true;
                        return Some(Err(error));
                    }
                    Err(error) => {
                        debug!(group = %self.group, %error, "watch reconnect failed; retrying");
                        self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
                    }
                }
                continue;
            };
            let Some(event) = link.events.recv().await else {
                debug!(group = %self.group, last_revision = self.last_revision, "watch connection lost; resuming");
                self.link = None;
                continue;
            };
            if let WatchEvent::Change { revision, .. } = &event
                && *revision <= self.last_revision
            {
                debug!(group = %self.group, revision, "skipping an event already delivered");
                continue;
            }
            self.last_revision = event.revision();
            return Some(Ok(event));
        }
    }

    /// The group watched.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The revision of the last event delivered (or the starting revision).
    pub fn last_revision(&self) -> u64 {
        self.last_revision
    }
}

/// True for errors a reconnect cannot cure: the daemon refused the subscription (unknown group,
/// forbidden, ...), speaks another protocol, or runs as a user this client does not trust. "Too
/// many connections" (`Internal`), `Unavailable` and `Idle` pass, so the watch keeps retrying.
fn is_final(error: &SdkError) -> bool {
    match error {
        SdkError::Daemon { code, .. } => {
            !matches!(code, ErrorCode::Internal | ErrorCode::Unavailable | ErrorCode::Idle)
        }
        SdkError::Protocol(_) | SdkError::UntrustedDaemon { .. } | SdkError::InvalidSetting(_) => true,
        _ => false,
    }
}

/// Keeps an [`Client::on_change`] callback running; dropping it stops the callback.
#[derive(Debug)]
pub struct ChangeHandle {
    task: JoinHandle<()>,
}

impl ChangeHandle {
    /// Stops the callback now.
    pub fn stop(self) {}

    /// True when the loop ended by itself (its watch ended with an error, logged).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for ChangeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct CacheState {
    settings: Settings,
    revision: u64,
    version: String,
    /// The content hash of `settings`; empty after a change until asked for.
    hash: OnceLock<String>,
}

impl CacheState {
    fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Resync { settings, revision, version, .. } => {
                self.settings.clone_from(settings);
                self.revision = *revision;
                self.version.clone_from(version);
            }
            WatchEvent::Change { set, removed, revision, version, .. } => {
                for (key, value) in set {
                    self.settings.insert(key.clone(), value.clone());
                }
                for key in removed {
                    self.settings.remove(key);
                }
                self.revision = *revision;
                self.version.clone_from(version);
            }
        }
        self.hash = OnceLock::new();
    }
}

fn read_cache(state: &RwLock<CacheState>) -> std::sync::RwLockReadGuard<'_, CacheState> {
    // The writer applies an event without panicking paths, so a poisoned lock holds sound data.
    state.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_cache(state: &RwLock<CacheState>) -> std::sync::RwLockWriteGuard<'_, CacheState> {
    state.write().unwrap_or_else(PoisonError::into_inner)
}

/// A group's settings held in memory and kept current by a background watch
/// ([`Client::cached`]). Reads take a read lock and clone one value: no socket, no await.
/// Cheap to clone; the background task stops when the last clone is dropped.
#[derive(Clone)]
pub struct CachedGroup {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    group: String,
    state: Arc<RwLock<CacheState>>,
    revisions: watch::Receiver<u64>,
    task: AbortHandle,
}

impl Drop for CacheInner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for CachedGroup {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = read_cache(&self.inner.state);
        formatter
            .debug_struct("CachedGroup")
            .field("group", &self.inner.group)
            .field("revision", &state.revision)
            .field("keys", &state.settings.len())
            .finish()
    }
}

impl CachedGroup {
    /// The group.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// One setting, from memory.
    pub fn get(&self, key: &str) -> Option<Value> {
        read_cache(&self.inner.state).settings.get(key).cloned()
    }

    /// One setting deserialized into `T`; `Ok(None)` when the key is not set.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SdkError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        serde_json::from_value(value).map(Some).map_err(|error| SdkError::Decode {
            what: format!("`{}/{key}` as {}", self.inner.group, std::any::type_name::<T>()),
            detail: error.to_string(),
        })
    }

    /// A copy of all settings.
    pub fn settings(&self) -> Settings {
        read_cache(&self.inner.state).settings.clone()
    }

    /// All settings deserialized into `T`, dotted keys nested (see [`Snapshot::typed`]).
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, SdkError> {
        typed_settings(&self.inner.group, &read_cache(&self.inner.state).settings)
    }

    /// The daemon's revision of the group that the cache reflects.
    pub fn revision(&self) -> u64 {
        read_cache(&self.inner.state).revision
    }

    /// The latest version label the cache reflects.
    pub fn version(&self) -> String {
        read_cache(&self.inner.state).version.clone()
    }

    /// The content hash of the cached settings (full hex), computed from them once after each
    /// change (see [`content_hash`]).
    pub fn content_hash(&self) -> String {
        let state = read_cache(&self.inner.state);
        state.hash.get_or_init(|| content_hash(&state.settings)).clone()
    }

    /// Waits until the cache reflects `revision` or later. Fails when the cache stopped
    /// following the group (its watch ended with an error); wrap it in a timeout to bound it.
    pub async fn wait_for_revision(&self, revision: u64) -> Result<(), SdkError> {
        let mut revisions = self.inner.revisions.clone();
        match revisions.wait_for(|current| *current >= revision).await {
            Ok(_) => Ok(()),
            Err(_) => Err(SdkError::Closed(format!(
                "the read cache of group `{}` stopped following it (see the log)",
                self.inner.group
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClientFrame, decode_payload, encode_frame};
    use serde::Deserialize;
    use serde_json::json;
    use tokio::net::UnixListener;

    /// A daemon double at the frame level: `answer` maps each client frame to raw bytes to send
    /// back (so tests can send garbage); Hello is answered with a Welcome unless `answer`
    /// handles it.
    fn fake_daemon<F>(answer: F) -> (tempfile::TempDir, PathBuf)
    where
        F: Fn(&ClientFrame) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("konord.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let answer = answer.clone();
                tokio::spawn(async move {
                    while let Some(frame) = read_client_frame(&mut stream).await {
                        let bytes = match answer(&frame) {
                            Some(bytes) => bytes,
                            None if matches!(frame.request, Request::Hello { .. }) => respond(frame.id, welcome(1)),
                            None => continue,
                        };
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (directory, path)
    }

    /// The next client frame on a fake daemon's connection; `None` at the end of the stream.
    async fn read_client_frame(stream: &mut tokio::net::UnixStream) -> Option<ClientFrame> {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await.ok()?;
        let mut payload = vec![0u8; frame_length(header).unwrap()];
        stream.read_exact(&mut payload).await.unwrap();
        Some(decode_payload(&payload).unwrap())
    }

    fn welcome(protocol: u32) -> Response {
        Response::Welcome { protocol, node_id: "node-a".into(), daemon_version: "0.1.0".into() }
    }

    fn respond(id: u64, response: Response) -> Vec<u8> {
        encode_frame(&ServerFrame::Response { id, response }).unwrap()
    }

    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    fn value_of(frame: &ClientFrame) -> Option<Vec<u8>> {
        let Request::Get { group, key } = &frame.request else { return None };
        let response = Response::Value {
            group: group.clone(),
            key: key.clone(),
            value: Some(json!(format!("value of {key}"))),
            freshness: Freshness::default(),
        };
        Some(respond(frame.id, response))
    }

    #[tokio::test]
    async fn connect_names_the_path_and_the_fix_when_no_daemon_listens() {
        let directory = tempfile::tempdir().unwrap();
        let error = Client::connect(directory.path().join("absent.sock")).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, SdkError::Connect { .. }), "{error:?}");
        assert!(text.contains("absent.sock") && text.contains("is konord running?"), "{text}");
    }

    #[tokio::test]
    async fn hello_reports_the_node_id() {
        let (_directory, path) = fake_daemon(|_| None);
        let client = Client::connect(&path).await.unwrap();
        assert_eq!(client.node_id(), "node-a");
    }

    #[tokio::test]
    async fn rejects_a_daemon_speaking_another_protocol_version() {
        let (_directory, path) = fake_daemon(|frame| Some(respond(frame.id, welcome(99))));
        let error = Client::connect(&path).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, SdkError::Protocol(_)), "{error:?}");
        assert!(text.contains("99") && text.contains(&format!("version {PROTOCOL_VERSION}")), "{text}");
    }

    #[tokio::test]
    async fn concurrent_calls_get_their_own_answers() {
        let (_directory, path) = fake_daemon(value_of);
        let client = Client::connect(&path).await.unwrap();
        let mut tasks = Vec::new();
        for index in 0..64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("key{index}");
                let value = client.get("app", &key).await.unwrap();
                assert_eq!(value, Some(json!(format!("value of {key}"))));
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn daemon_errors_become_sdk_errors() {
        let (_directory, path) = fake_daemon(|frame| match frame.request {
            Request::Get { .. } => Some(respond(
                frame.id,
                Response::Error { code: ErrorCode::UnknownGroup, message: "no group `nope`".into() },
            )),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("nope", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Daemon { code: ErrorCode::UnknownGroup, .. }), "{error:?}");
        assert_eq!(error.to_string(), "konord refused the request (unknown_group): no group `nope`");
    }

    /// Issue 12: konord closes a connection that idled, with an id-0 `idle` frame, and handles
    /// nothing it sent after that. A request that crossed the close is sent again on a new
    /// connection instead of failing.
    #[tokio::test]
    async fn a_request_that_crosses_an_idle_close_is_sent_again() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("konord.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let first = counted.fetch_add(1, Ordering::Relaxed) == 0;
                tokio::spawn(async move {
                    while let Some(frame) = read_client_frame(&mut stream).await {
                        let answer = match frame.request {
                            Request::Hello { .. } => respond(frame.id, welcome(1)),
                            // The first connection idles out just as the request arrives.
                            _ if first => {
                                let message = "idle for 300 s".to_owned();
                                let idle = respond(0, Response::Error { code: ErrorCode::Idle, message });
                                let _ = stream.write_all(&idle).await;
                                return;
                            }
                            _ => value_of(&frame).unwrap(),
                        };
                        stream.write_all(&answer).await.unwrap();
                    }
                });
            }
        });
        let client = Client::connect(&path).await.unwrap();
        assert_eq!(client.get("app", "a").await.unwrap(), Some(json!("value of a")));
        assert_eq!(connections.load(Ordering::Relaxed), 2, "sent again on a second connection");
    }

    #[tokio::test]
    async fn a_silent_daemon_times_out() {
        let (_directory, path) = fake_daemon(|_| None);
        let client = Client::connect(&path).await.unwrap().with_timeout(Duration::from_millis(100));
        let error = client.get("app", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Timeout { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn an_oversized_frame_from_the_daemon_fails_the_call_without_allocating() {
        let (_directory, path) = fake_daemon(|frame| match frame.request {
            Request::Get { .. } => Some(u32::MAX.to_be_bytes().to_vec()),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("app", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Frame(FrameError::TooLarge { .. })), "{error:?}");
    }

    #[tokio::test]
    async fn a_malformed_frame_fails_every_waiter_and_the_next_call_reconnects() {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let (_directory, path) = fake_daemon(move |frame| match frame.request {
            // The first Get gets garbage; later ones a proper answer.
            Request::Get { .. } if counter.fetch_add(1, Ordering::SeqCst) == 0 => Some(raw_frame(b"not json")),
            Request::Get { .. } => value_of(frame),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("app", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Frame(FrameError::Decode(_))), "{error:?}");
        assert_eq!(client.get("app", "y").await.unwrap(), Some(json!("value of y")));
    }

    #[tokio::test]
    async fn an_unknown_answer_kind_fails_only_that_call() {
        let (_directory, path) = fake_daemon(|frame| match &frame.request {
            Request::Get { key, .. } if key == "new" => {
                let text = format!(r#"{{"response":{{"id":{},"response":{{"type":"from_the_future"}}}}}}"#, frame.id);
                Some(raw_frame(text.as_bytes()))
            }
            Request::Get { .. } => value_of(frame),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("app", "new").await.unwrap_err();
        assert!(matches!(error, SdkError::Protocol(_)), "{error:?}");
        assert_eq!(client.get("app", "old").await.unwrap(), Some(json!("value of old")));
    }

    #[tokio::test]
    async fn call_refuses_requests_that_belong_to_the_connection() {
        let (_directory, path) = fake_daemon(|_| None);
        let client = Client::connect(&path).await.unwrap();
        let error = client.call(Request::Watch { group: "app".into(), from_revision: None }).await.unwrap_err();
        assert!(matches!(error, SdkError::InvalidCall(_)), "{error:?}");
    }

    #[test]
    fn nests_dotted_keys_into_objects() {
        let settings: Settings = [
            ("db.pool".to_owned(), json!(10)),
            ("db.host".to_owned(), json!("h")),
            ("name".to_owned(), json!("x")),
            ("tls".to_owned(), json!({"on": true})),
            ("tls.ca".to_owned(), json!("/ca.pem")),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            nest_settings(&settings).unwrap(),
            json!({"db": {"pool": 10, "host": "h"}, "name": "x", "tls": {"on": true, "ca": "/ca.pem"}})
        );
    }

    #[test]
    fn refuses_keys_that_cannot_nest() {
        let settings: Settings = [("db".to_owned(), json!(1)), ("db.pool".to_owned(), json!(10))].into_iter().collect();
        let error = nest_settings(&settings).unwrap_err();
        assert!(error.to_string().contains("`db.pool`"), "{error}");
        let settings: Settings =
            [("db".to_owned(), json!({"pool": 1})), ("db.pool".to_owned(), json!(10))].into_iter().collect();
        assert!(nest_settings(&settings).is_err());
    }

    #[test]
    fn typed_snapshot_fills_a_struct() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Config {
            db: Db,
            name: String,
        }
        #[derive(Debug, Deserialize, PartialEq)]
        struct Db {
            pool: u32,
        }
        let snapshot = Snapshot {
            group: "app".into(),
            settings: [("db.pool".to_owned(), json!(10)), ("name".to_owned(), json!("x"))].into_iter().collect(),
            content_hash: String::new(),
            freshness: Freshness::default(),
        };
        assert_eq!(snapshot.typed::<Config>().unwrap(), Config { db: Db { pool: 10 }, name: "x".into() });
        let error = snapshot.typed::<Db>().unwrap_err();
        assert!(matches!(error, SdkError::Decode { .. }), "{error:?}");
    }

    #[test]
    fn events_apply_to_settings() {
        let mut settings = Settings::new();
        let resync = WatchEvent::Resync {
            group: "app".into(),
            revision: 1,
            version: "v1".into(),
            settings: [("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))].into_iter().collect(),
        };
        apply_event(&mut settings, &resync);
        let change = WatchEvent::Change {
            group: "app".into(),
            revision: 2,
            version: "v2".into(),
            set: [("a".to_owned(), json!(3))].into_iter().collect(),
            removed: vec!["b".into()],
        };
        apply_event(&mut settings, &change);
        assert_eq!(settings, [("a".to_owned(), json!(3))].into_iter().collect::<Settings>());
    }
}
