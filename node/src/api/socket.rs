//! The local socket API: the daemon's side of the Unix socket that SDKs and `konorctl` use.
//!
//! This module speaks the framing and the Hello handshake itself and hands every other request to
//! the daemon as a [`LocalCall`] on a bounded channel. It decides nothing about configuration,
//! so the daemon task can own all state and the socket can be tested with a stand-in daemon.
//!
//! **Boundary:** the wire format is `konor_sdk::protocol` (docs/protocol.md).
//!
//! Per connection: a reader task turns bytes into frames, a writer task writes whole frames
//! with a timeout, and the session loop in between enforces Hello, forwards requests (up to
//! [`REQUESTS_IN_FLIGHT_MAX`] at once, each in its own task and span) and runs watches. Bad input
//! (garbage, an oversized length, a truncated frame, a request before Hello) is counted in
//! [`LocalApiStats::bad_frames`], logged, answered with an error frame where possible, and ends
//! that connection only; the listener goes on.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::protocol::{
    ClientFrame, ErrorCode, PROTOCOL_VERSION, Request, Response, ServerFrame, WatchEvent, encode_frame, frame_length,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::api::read_view::ReadView;

/// Default file mode of the socket: only the daemon's user may connect (F23). Operators who
/// want a group of users to connect set 0o660 and the socket's group.
pub const SOCKET_MODE_DEFAULT: u32 = 0o600;

/// Default cap on open connections: each SDK client holds one, plus one per watch; 256 covers a
/// busy host and bounds the daemon's memory and tasks for local clients.
pub const CONNECTIONS_MAX_DEFAULT: usize = 256;

/// Events queued per watch between the daemon and the socket. A client that falls this far
/// behind gets its watch dropped by the daemon (`try_send` fails); the connection then closes
/// and the SDK resumes from its last revision, so nothing is lost and the daemon never waits on
/// a slow reader.
pub const WATCH_QUEUE_EVENTS: usize = 1024;

/// Requests one connection may have in flight; past it the session stops reading, which pushes
/// back on the client instead of queueing without bound.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;

/// Frames queued for one connection's writer: room for every answer in flight
/// ([`REQUESTS_IN_FLIGHT_MAX`]) plus a burst of events; producers wait when it is full.
const OUTBOX_FRAMES_MAX: usize = 256;

/// Frames read ahead by one connection's reader task: enough to overlap reading with handling,
/// few enough that a flooding client is held back by the socket.
const INBOX_FRAMES_MAX: usize = 16;

/// How long a write, or the rest of a frame after its first byte, may take. A local client
/// that cannot take or finish a frame in 10 s is stuck; its connection is closed.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new connection may take to say Hello before it is closed, so silent
/// connections cannot hold the connection slots.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that have not said Hello yet, at most: a new one past this closes the oldest
/// silent one. A client says Hello as soon as it connects, so only silent connections (a slow
/// loris, a stuck client) are ever old here, and they can hold no more than this many of the
/// [`CONNECTIONS_MAX_DEFAULT`] slots, whoever opens them. (A cap per uid would not do: with the
/// default socket mode every client has the daemon's uid.)
pub const UNGREETED_CONNECTIONS_MAX: usize = 32;

/// Pause after a failed accept (out of file descriptors, ...) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long shutdown waits for connections to flush and end before aborting them.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How long connecting to an existing socket file may take when checking whether it is stale.
const STALE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Connection number, unique for the life of the daemon process.
    pub connection: u64,
    /// Process id: from the socket's peer credentials when the OS gives them (as seen from the
    /// daemon's pid namespace), else the one the client sent in Hello.
    pub pid: u32,
    /// Process name from Hello.
    pub process: String,
    /// User id from the socket's peer credentials.
    pub uid: Option<u32>,
}

/// What the socket asks of the daemon.
#[derive(Debug)]
pub enum LocalCall {
    /// Answer `request` on `reply`. Never `Hello`, `Watch` or `Unwatch`: the socket handles those.
    Request {
        /// Who asks.
        client: ClientInfo,
        /// The request.
        request: Request,
        /// Where the answer goes (dropping it answers `Internal`).
        reply: oneshot::Sender<Response>,
    },
    /// Subscribe `events` to `group` after `from_revision`, and answer `Watching` (or an error)
    /// on `reply`. Events sent before the reply are delivered after it. The daemon should push
    /// with `try_send` and drop `events` when it is full (a client too slow); dropping it, for
    /// that or any reason, closes the connection, and the SDK resumes from its last revision.
    Watch {
        /// Who asks.
        client: ClientInfo,
        /// Group.
        group: String,
        /// Deliver changes after this revision; `None`: from now on.
        from_revision: Option<u64>,
        /// Where events go; capacity [`WATCH_QUEUE_EVENTS`].
        events: mpsc::Sender<WatchEvent>,
        /// Where the answer goes.
        reply: oneshot::Sender<Response>,
    },
    /// A connection that said Hello has ended; its watches are gone.
    Disconnected {
        /// The connection number from [`ClientInfo::connection`].
        connection: u64,
    },
}

/// Counters of the local socket, shared with the metrics endpoint.
#[derive(Debug, Default)]
pub struct LocalApiStats {
    /// Frames refused: not JSON, an unknown request, an oversized length, truncated, or a
    /// request before Hello.
    pub bad_frames: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Silent connections closed to make room (see [`UNGREETED_CONNECTIONS_MAX`]).
    pub ungreeted_closed: AtomicU64,
}

/// Settings of the local socket.
#[derive(Debug, Clone)]
pub struct LocalApiConfig {
    /// Socket path (default `<data-dir>/konord.sock`).
    pub path: PathBuf,
    /// File mode set right after bind (default [`SOCKET_MODE_DEFAULT`]).
    pub mode: u32,
    /// Open connections at most (default [`CONNECTIONS_MAX_DEFAULT`]).
    pub connections_max: usize,
    /// This node's id, sent in Welcome.
    pub node_id: String,
    /// Counters.
    pub stats: Arc<LocalApiStats>,
    /// The daemon's read view: `get` is answered from it without a hop to the daemon task
    /// (groups not in it are asked of the daemon).
    pub reads: Option<ReadView>,
}

impl LocalApiConfig {
    /// A config with the default mode and connection cap.
    pub fn new(path: impl Into<PathBuf>, node_id: impl Into<String>) -> LocalApiConfig {
        LocalApiConfig {
            path: path.into(),
            mode: SOCKET_MODE_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            node_id: node_id.into(),
            stats: Arc::default(),
            reads: None,
        }
    }
}

/// What every connection shares.
struct Shared {
    node_id: String,
    stats: Arc<LocalApiStats>,
    calls: mpsc::Sender<LocalCall>,
    reads: Option<ReadView>,
    /// Connections that have not said Hello yet, oldest first, each with the signal that closes
    /// it (see [`UNGREETED_CONNECTIONS_MAX`]).
    ungreeted: std::sync::Mutex<std::collections::VecDeque<(u64, Arc<Notify>)>>,
}

impl Shared {
    /// Registers a new connection as not greeted yet; closes the oldest silent one if there
    /// are too many. Returns the signal that closes this one.
    fn expect_hello(&self, connection: u64) -> Arc<Notify> {
        let close = Arc::new(Notify::new());
        let mut ungreeted = self.ungreeted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while ungreeted.len() >= UNGREETED_CONNECTIONS_MAX {
            let Some((_, oldest)) = ungreeted.pop_front() else { break };
            // A stored permit: the session sees it even if it is not waiting yet.
            oldest.notify_one();
            self.stats.ungreeted_closed.fetch_add(1, Ordering::Relaxed);
        }
        ungreeted.push_back((connection, close.clone()));
        close
    }

    /// The connection said Hello (or ended): it no longer counts as silent.
    fn greeted(&self, connection: u64) {
        let mut ungreeted = self.ungreeted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ungreeted.retain(|(id, _)| *id != connection);
    }
}

/// Serves the local socket until `shutdown` becomes true (or its sender is dropped), then stops
/// accepting, ends the connections and removes the socket file.
///
/// Fails only at start: the parent directory cannot be created, the path is taken by a file
/// that is not a socket or by a socket something listens on, or bind or chmod fails.
pub async fn serve(
    config: LocalApiConfig,
    calls: mpsc::Sender<LocalCall>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = bind(&config).await?;
    info!(path = %config.path.display(), mode = format!("{:o}", config.mode), "local API listening");
    let shared = Arc::new(Shared {
        node_id: config.node_id.clone(),
        stats: config.stats.clone(),
        calls,
        reads: config.reads.clone(),
        ungreeted: std::sync::Mutex::default(),
    });
    let slots = Arc::new(Semaphore::new(config.connections_max));
    let mut connections = JoinSet::new();
    let mut connection_count = 0u64;
    while !*shutdown.borrow_and_update() {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connection_count += 1;
                    // A slot is taken at Hello; until then the connection counts among the
                    // ungreeted, the oldest of which make room for new ones.
                    let make_room = shared.expect_hello(connection_count);
                    let (shared, receiver) = (shared.clone(), shutdown.clone());
                    let slots = Slots { slots: slots.clone(), max: config.connections_max };
                    connections.spawn(serve_connection(connection_count, stream, shared, receiver, slots, make_room));
                }
                Err(error) => {
                    warn!(%error, "accepting a local connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            Some(ended) = connections.join_next(), if !connections.is_empty() => log_join_error(ended),
        }
    }
    drop(listener);
    match std::fs::remove_file(&config.path) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => warn!(path = %config.path.display(), %error, "could not remove the socket file"),
    }
    let drained = tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, async {
        while let Some(ended) = connections.join_next().await {
            log_join_error(ended);
        }
    })
    .await;
    if drained.is_err() {
        warn!(open = connections.len(), "aborting local connections that did not end in time");
        connections.shutdown().await;
    }
    info!(path = %config.path.display(), "local API stopped");
    Ok(())
}

fn log_join_error(ended: Result<(), JoinError>) {
    if let Err(failure) = ended
        && failure.is_panic()
    {
        error!(%failure, "a local connection task panicked");
    }
}

/// Creates the parent directory, clears a stale socket file, binds, and sets the mode.
async fn bind(config: &LocalApiConfig) -> anyhow::Result<UnixListener> {
    let path = &config.path;
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent)
            .await
            .with_context(|| format!("cannot create the socket's directory {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => {
            bail!("{} exists and is not a socket: move it away or choose another socket path", path.display())
        }
        Ok(_) => match tokio::time::timeout(STALE_CHECK_TIMEOUT, UnixStream::connect(path)).await {
            Ok(Err(error)) if error.kind() == ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing a stale socket file");
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
            }
            Ok(Ok(_)) => bail!(
                "another process (a running konord?) listens on {}: stop it or choose another socket path",
                path.display()
            ),
            Ok(Err(error)) => {
                bail!("cannot tell whether something listens on {}: {error}; remove it if it is stale", path.display())
            }
            Err(_) => bail!("something holds {} but does not accept connections: stop it or remove it", path.display()),
        },
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot bind the socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))
        .with_context(|| format!("cannot set mode {:o} on {}", config.mode, path.display()))?;
    Ok(listener)
}

/// The connection slots ([`CONNECTIONS_MAX_DEFAULT`]), taken when a connection says Hello.
struct Slots {
    slots: Arc<Semaphore>,
    max: usize,
}

/// One connection from accept to close.
async fn serve_connection(
    connection: u64,
    stream: UnixStream,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    slots: Slots,
    make_room: Arc<Notify>,
) {
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let credentials = stream.peer_cred().ok();
    let (read_half, write_half) = stream.into_split();
    let (outbox, outbox_receiver) = mpsc::channel(OUTBOX_FRAMES_MAX);
    let (inbox_sender, inbox) = mpsc::channel(INBOX_FRAMES_MAX);
    let closing = Arc::new(Notify::new());
    let writer = tokio::spawn(write_loop(write_half, outbox_receiver, closing.clone(), connection));
    let reader = tokio::spawn(read_loop(BufReader::new(read_half), inbox_sender));
    let mut session = Session {
        connection,
        credential_pid: credentials.and_then(|credentials| credentials.pid()).and_then(|pid| u32::try_from(pid).ok()),
        credential_uid: credentials.map(|credentials| credentials.uid()),
        client: None,
        shared: shared.clone(),
        outbox,
        closing,
        tasks: JoinSet::new(),
        watches: HashMap::new(),
        watch_count: 0,
        in_flight: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
        slots,
        slot: None,
        make_room,
    };
    let span = info_span!("local_connection", connection, pid = tracing::field::Empty);
    session.run(inbox, shutdown).instrument(span).await;

    let said_hello = session.client.is_some();
    session.tasks.shutdown().await;
    drop(session);
    // The outbox is closed now: the writer flushes what is queued (a last error frame) and ends.
    if tokio::time::timeout(IO_TIMEOUT, writer).await.is_err() {
        debug!(connection, "the writer did not finish in time");
    }
    reader.abort();
    if said_hello {
        let disconnected = shared.calls.send(LocalCall::Disconnected { connection });
        if tokio::time::timeout(IO_TIMEOUT, disconnected).await.is_err() {
            warn!(connection, "the daemon did not take the disconnect notice in time");
        }
    }
    shared.stats.connections.fetch_sub(1, Ordering::Relaxed);
}

/// What the reader task hands to the session.
enum Inbound {
    Payload(Vec<u8>),
    /// The frame could not be read; the reason is logged and counted by the session.
    Fault(String),
}

/// Reads frames until the end of the stream or a fault. Runs as its own task so the session
/// loop can wait on other things without ever cutting a frame in half.
/// The reader is buffered: one `read` usually brings a whole frame (length and payload).
async fn read_loop(mut read_half: BufReader<OwnedReadHalf>, inbox: mpsc::Sender<Inbound>) {
    loop {
        let inbound = match read_frame(&mut read_half).await {
            Ok(Some(payload)) => Inbound::Payload(payload),
            Ok(None) => return,
            Err(fault) => Inbound::Fault(fault),
        };
        let fault = matches!(inbound, Inbound::Fault(_));
        if inbox.send(inbound).await.is_err() || fault {
            return;
        }
    }
}

/// Reads one frame; `Ok(None)` is a clean end of stream between frames. Waiting for the first
/// byte has no timeout (idle clients are fine); the rest must follow within [`IO_TIMEOUT`].
async fn read_frame(read_half: &mut BufReader<OwnedReadHalf>) -> Result<Option<Vec<u8>>, String> {
    let mut header = [0u8; 4];
    let first = read_half.read(&mut header).await.map_err(|error| format!("read failed: {error}"))?;
    if first == 0 {
        return Ok(None);
    }
    let rest = async {
        read_half.read_exact(&mut header[first..]).await.map_err(truncated)?;
        // Checked before allocating: a bad length never reserves memory.
        let length = frame_length(header).map_err(|error| error.to_string())?;
        let mut payload = vec![0u8; length];
        read_half.read_exact(&mut payload).await.map_err(truncated)?;
        Ok(payload)
    };
    match tokio::time::timeout(IO_TIMEOUT, rest).await {
        Ok(result) => result.map(Some),
        Err(_) => Err(format!("truncated frame: the rest did not arrive within {} s", IO_TIMEOUT.as_secs())),
    }
}

fn truncated(error: std::io::Error) -> String {
    if error.kind() == ErrorKind::UnexpectedEof {
        "truncated frame: the connection ended mid-frame".to_owned()
    } else {
        format!("read failed: {error}")
    }
}

/// Writes frames until the outbox closes; a failed or slow write wakes the session to close.
async fn write_loop(
    mut write_half: OwnedWriteHalf,
    mut outbox: mpsc::Receiver<ServerFrame>,
    closing: Arc<Notify>,
    connection: u64,
) {
    while let Some(frame) = outbox.recv().await {
        let bytes = match encode_frame(&frame) {
            Ok(bytes) => bytes,
            Err(failure) => match frame {
                ServerFrame::Response { id, .. } => {
                    error!(connection, id, %failure, "an answer does not fit in a frame");
                    let message = format!("the answer does not fit in a frame ({failure}); ask for less");
                    let refusal =
                        ServerFrame::Response { id, response: Response::Error { code: ErrorCode::Internal, message } };
                    match encode_frame(&refusal) {
                        Ok(bytes) => bytes,
                        Err(_) => continue,
                    }
                }
                ServerFrame::Event { .. } => {
                    // Skipping an event would leave a gap; closing makes the client resume.
                    error!(connection, %failure, "a watch event does not fit in a frame; closing the connection");
                    closing.notify_one();
                    return;
                }
            },
        };
        match tokio::time::timeout(IO_TIMEOUT, write_half.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(connection, %error, "writing to a local client failed");
                closing.notify_one();
                return;
            }
            Err(_) => {
                warn!(connection, "a local client did not read for {} s; closing it", IO_TIMEOUT.as_secs());
                closing.notify_one();
                return;
            }
        }
    }
    let _ = write_half.shutdown().await;
}

/// How a task of the session ended.
enum TaskEnd {
    Request,
    /// The daemon refused the watch; the group may be watched again.
    WatchRefused {
        group: String,
        watch: u64,
    },
    /// The daemon dropped the watch's event sender.
    WatchDropped {
        group: String,
    },
    /// The writer is gone.
    OutboxClosed,
}

/// A client frame, parsed as far as it goes.
enum Parsed {
    Frame(ClientFrame),
    /// An envelope with an id, but a request this daemon does not know or cannot read.
    BadRequest {
        id: u64,
        detail: String,
    },
    Malformed(String),
}

fn parse_client_frame(payload: &[u8]) -> Parsed {
    /// Only the id matters; `request` must be present for the frame to count as a request.
    #[derive(Deserialize)]
    struct Envelope {
        id: u64,
        #[serde(rename = "request")]
        _request: serde_json::Value,
    }
    // Read strictly (issue 12): an integer past 64 bits or a key given twice is refused, not
    // rounded to a double or dropped.
    let strict = std::str::from_utf8(payload)
        .map_err(|error| error.to_string())
        .and_then(|text| konor_crdt::json_strict::parse(text).map_err(|error| error.to_string()));
    match strict.and_then(|value| serde_json::from_value::<ClientFrame>(value).map_err(|error| error.to_string())) {
        Ok(frame) => Parsed::Frame(frame),
        Err(detail) => match serde_json::from_slice::<Envelope>(payload) {
            Ok(envelope) => Parsed::BadRequest { id: envelope.id, detail },
            Err(_) => Parsed::Malformed(format!("malformed frame: {detail}")),
        },
    }
}

struct Session {
    connection: u64,
    credential_pid: Option<u32>,
    credential_uid: Option<u32>,
    /// Set by Hello.
    client: Option<ClientInfo>,
    shared: Arc<Shared>,
    outbox: mpsc::Sender<ServerFrame>,
    closing: Arc<Notify>,
    tasks: JoinSet<TaskEnd>,
    /// Group -> (watch number, task).
    watches: HashMap<String, (u64, AbortHandle)>,
    watch_count: u64,
    in_flight: Arc<Semaphore>,
    slots: Slots,
    /// This connection's slot, taken at Hello.
    slot: Option<OwnedSemaphorePermit>,
    /// Closes this connection while it has not said Hello, to make room for a newer one.
    make_room: Arc<Notify>,
}

/// Whether the session goes on after a frame.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

impl Session {
    fn pid(&self) -> u32 {
        self.client.as_ref().map(|client| client.pid).or(self.credential_pid).unwrap_or(0)
    }

    async fn run(&mut self, mut inbox: mpsc::Receiver<Inbound>, mut shutdown: watch::Receiver<bool>) {
        let make_room = self.make_room.clone();
        let first = tokio::select! {
            first = tokio::time::timeout(HELLO_TIMEOUT, inbox.recv()) => Some(first),
            () = make_room.notified() => None,
        };
        self.shared.greeted(self.connection);
        let Some(first) = first else {
            debug!(connection = self.connection, "closed to make room: it had not said hello");
            return;
        };
        match first {
            Err(_) => {
                debug!(connection = self.connection, "no hello in time; closing");
                return;
            }
            Ok(None) => return,
            Ok(Some(inbound)) => {
                let Ok(slot) = self.slots.slots.clone().try_acquire_owned() else {
                    self.refuse_connection().await;
                    return;
                };
                self.slot = Some(slot);
                if self.handle_hello(inbound).await == Flow::Close {
                    return;
                }
            }
        }
        loop {
            let reading = self.in_flight.available_permits() > 0;
            let flow = tokio::select! {
                () = self.closing.notified() => Flow::Close,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() { Flow::Close } else { Flow::Continue }
                }
                Some(ended) = self.tasks.join_next(), if !self.tasks.is_empty() => self.handle_task_end(ended),
                inbound = inbox.recv(), if reading => match inbound {
                    None => Flow::Close,
                    Some(Inbound::Fault(fault)) => self.refuse_frame(fault).await,
                    Some(Inbound::Payload(payload)) => self.handle_payload(&payload).await,
                },
            };
            if flow == Flow::Close {
                return;
            }
        }
    }

    /// Tells a client over the connection cap why it is closed.
    async fn refuse_connection(&self) {
        let connections_max = self.slots.max;
        warn!(connection = self.connection, connections_max, "refusing a local connection: too many connections");
        let message =
            format!("too many connections: konord serves {connections_max} at most; close idle clients and retry");
        let response = Response::Error { code: ErrorCode::Internal, message };
        self.send(ServerFrame::Response { id: 0, response }).await;
    }

    async fn send(&self, frame: ServerFrame) {
        // A closed outbox means the writer is gone; the session notices through `closing`.
        let _ = self.outbox.send(frame).await;
    }

    async fn respond(&self, id: u64, response: Response) {
        self.send(ServerFrame::Response { id, response }).await;
    }

    fn count_bad_frame(&self, detail: &str) {
        self.shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
        warn!(connection = self.connection, pid = self.pid(), %detail, "bad frame on the local socket");
    }

    /// Counts a frame that cannot be read, says why on id 0 and closes the connection.
    async fn refuse_frame(&self, fault: String) -> Flow {
        self.count_bad_frame(&fault);
        let message = format!("{fault}; closing the connection");
        self.respond(0, Response::Error { code: ErrorCode::BadRequest, message }).await;
        Flow::Close
    }

    async fn handle_hello(&mut self, inbound: Inbound) -> Flow {
        let payload = match inbound {
            Inbound::Fault(fault) => return self.refuse_frame(fault).await,
            Inbound::Payload(payload) => payload,
        };
        let (id, request) = match parse_client_frame(&payload) {
            Parsed::Frame(ClientFrame { id, request }) => (id, request),
            Parsed::BadRequest { id, detail } => {
                self.count_bad_frame(&detail);
                let message = format!("the first request must be hello: {detail}");
                self.respond(id, Response::Error { code: ErrorCode::Protocol, message }).await;
                return Flow::Close;
            }
            Parsed::Malformed(detail) => return self.refuse_frame(detail).await,
        };
        let Request::Hello { protocol, pid, process } = request else {
            self.count_bad_frame(&format!("`{}` before hello", request.kind()));
            let message = format!("the first request on a connection must be hello, got `{}`", request.kind());
            self.respond(id, Response::Error { code: ErrorCode::Protocol, message }).await;
            return Flow::Close;
        };
        if protocol != PROTOCOL_VERSION {
            warn!(connection = self.connection, pid, %process, protocol, "client speaks another protocol version");
            let message = format!(
                "konord speaks protocol version {PROTOCOL_VERSION}, the client speaks version {protocol}: \
                 upgrade the older of the two"
            );
            self.respond(id, Response::Error { code: ErrorCode::Protocol, message }).await;
            return Flow::Close;
        }
        let client = ClientInfo {
            connection: self.connection,
            pid: self.credential_pid.filter(|pid| *pid != 0).unwrap_or(pid),
            process,
            uid: self.credential_uid,
        };
        tracing::Span::current().record("pid", client.pid);
        debug!(connection = self.connection, pid = client.pid, process = %client.process, uid = client.uid, "hello");
        self.client = Some(client);
        let welcome = Response::Welcome {
            protocol: PROTOCOL_VERSION,
            node_id: self.shared.node_id.clone(),
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.respond(id, welcome).await;
        Flow::Continue
    }

    async fn handle_payload(&mut self, payload: &[u8]) -> Flow {
        match parse_client_frame(payload) {
            Parsed::Frame(ClientFrame { id, request }) => self.dispatch(id, request).await,
            Parsed::BadRequest { id, detail } => {
                // A well-formed envelope with a request this daemon does not know (a newer
                // client): refuse that request, keep the connection.
                self.count_bad_frame(&detail);
                let message = format!("unknown or malformed request: {detail}");
                self.respond(id, Response::Error { code: ErrorCode::BadRequest, message }).await;
                Flow::Continue
            }
            Parsed::Malformed(detail) => self.refuse_frame(detail).await,
        }
    }

    async fn dispatch(&mut self, id: u64, request: Request) -> Flow {
        let Some(client) = self.client.clone() else {
            // `run` handles Hello before dispatching anything.
            return Flow::Close;
        };
        match request {
            Request::Hello { .. } => {
                let message = "hello was already sent on this connection".to_owned();
                self.respond(id, Response::Error { code: ErrorCode::Protocol, message }).await;
            }
            Request::Watch { group, from_revision } => {
                if self.watches.contains_key(&group) {
                    let message = format!(
                        "group `{group}` is already watched on this connection: \
                         unwatch it first, or watch on another connection"
                    );
                    self.respond(id, Response::Error { code: ErrorCode::BadRequest, message }).await;
                    return Flow::Continue;
                }
                self.watch_count += 1;
                let watch = self.watch_count;
                let span =
                    info_span!("local_request", connection = self.connection, pid = client.pid, id, kind = "watch");
                let task = run_watch(
                    self.shared.clone(),
                    self.outbox.clone(),
                    client,
                    id,
                    group.clone(),
                    from_revision,
                    watch,
                );
                let handle = self.tasks.spawn(task.instrument(span));
                self.watches.insert(group, (watch, handle));
            }
            Request::Unwatch { group } => {
                if let Some((_, handle)) = self.watches.remove(&group) {
                    handle.abort();
                }
                self.respond(id, Response::Done).await;
            }
            Request::Get { group, key } if self.shared.reads.is_some() => {
                match self.shared.reads.as_ref().and_then(|reads| reads.get(&group, &key)) {
                    Some(response) => self.respond(id, response).await,
                    None => return self.forward(id, client, Request::Get { group, key }),
                }
            }
            request => return self.forward(id, client, request),
        }
        Flow::Continue
    }

    /// Hands a request to the daemon in a task of its own, which writes the answer.
    fn forward(&mut self, id: u64, client: ClientInfo, request: Request) -> Flow {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            // `run` reads only while a permit is free, and only it takes permits.
            return Flow::Close;
        };
        let span =
            info_span!("local_request", connection = self.connection, pid = client.pid, id, kind = request.kind());
        let task = run_request(self.shared.clone(), self.outbox.clone(), client, id, request, permit);
        self.tasks.spawn(task.instrument(span));
        Flow::Continue
    }

    fn handle_task_end(&mut self, ended: Result<TaskEnd, JoinError>) -> Flow {
        match ended {
            Ok(TaskEnd::Request) => Flow::Continue,
            Ok(TaskEnd::WatchRefused { group, watch }) => {
                if self.watches.get(&group).is_some_and(|(current, _)| *current == watch) {
                    self.watches.remove(&group);
                }
                Flow::Continue
            }
            Ok(TaskEnd::WatchDropped { group }) => {
                // The client resumes from its last revision on a new connection.
                let (connection, pid) = (self.connection, self.pid());
                info!(connection, pid, %group, "the daemon dropped a watch; closing the connection");
                Flow::Close
            }
            Ok(TaskEnd::OutboxClosed) => Flow::Close,
            Err(failure) if failure.is_panic() => {
                error!(connection = self.connection, %failure, "a local request task panicked");
                Flow::Continue
            }
            Err(_) => Flow::Continue,
        }
    }
}

/// Hands one request to the daemon and writes its answer.
async fn run_request(
    shared: Arc<Shared>,
    outbox: mpsc::Sender<ServerFrame>,
    client: ClientInfo,
    id: u64,
    request: Request,
    _permit: OwnedSemaphorePermit,
) -> TaskEnd {
    let (reply, answer) = oneshot::channel();
    let response = ask_daemon(&shared, LocalCall::Request { client, request, reply }, answer).await;
    match outbox.send(ServerFrame::Response { id, response }).await {
        Ok(()) => TaskEnd::Request,
        Err(_) => TaskEnd::OutboxClosed,
    }
}

/// Subscribes with the daemon, writes its answer, then forwards events until the daemon drops
/// the watch (or the session aborts this task on Unwatch or close).
async fn run_watch(
    shared: Arc<Shared>,
    outbox: mpsc::Sender<ServerFrame>,
    client: ClientInfo,
    id: u64,
    group: String,
    from_revision: Option<u64>,
    watch: u64,
) -> TaskEnd {
    let (events, mut receiver) = mpsc::channel(WATCH_QUEUE_EVENTS);
    let (reply, answer) = oneshot::channel();
    let call = LocalCall::Watch { client, group: group.clone(), from_revision, events, reply };
    let response = ask_daemon(&shared, call, answer).await;
    let watching = matches!(response, Response::Watching { .. });
    // The answer goes out before any event: events wait in `receiver` until then.
    if outbox.send(ServerFrame::Response { id, response }).await.is_err() {
        return TaskEnd::OutboxClosed;
    }
    if !watching {
        return TaskEnd::WatchRefused { group, watch };
    }
    while let Some(event) = receiver.recv().await {
        if outbox.send(ServerFrame::Event { event }).await.is_err() {
            return TaskEnd::OutboxClosed;
        }
    }
    TaskEnd::WatchDropped { group }
}

async fn ask_daemon(shared: &Shared, call: LocalCall, answer: oneshot::Receiver<Response>) -> Response {
    if shared.calls.send(call).await.is_err() {
        let message = "konord is shutting down; retry in a moment".to_owned();
        return Response::Error { code: ErrorCode::Unavailable, message };
    }
    answer.await.unwrap_or_else(|_| Response::Error {
        code: ErrorCode::Internal,
        message: "konord dropped the request without an answer; see its log".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Mutex;

    use konor_sdk::protocol::{ApplyResult, Freshness, decode_payload};
    use konor_sdk::{Client, SdkError};
    use serde_json::{Value, json};
    use tokio::task::JoinHandle;

    use super::*;

    const GROUP: &str = "app";

    /// Bound on every wait in these tests; a healthy run needs milliseconds.
    const WAIT: Duration = Duration::from_secs(10);

    /// The state of the stand-in daemon: one group, `app`.
    #[derive(Default)]
    struct DaemonState {
        settings: BTreeMap<String, Value>,
        revision: u64,
        history: Vec<WatchEvent>,
        watchers: Vec<mpsc::Sender<WatchEvent>>,
        /// Replays from `from_revision` inclusive, one event too many, to prove the SDK drops
        /// duplicates.
        replay_inclusive: bool,
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
                    let state = daemon.lock().unwrap();
                    let response = match request {
                        Request::Get { group, key } if group == GROUP => Response::Value {
                            value: state.settings.get(&key).cloned(),
                            group,
                            key,
                            freshness: state.freshness(),
                        },
                        Request::Snapshot { group } if group == GROUP => Response::Snapshot {
                            group,
                            settings: state.settings.clone(),
                            content_hash: state.content_hash(),
                            freshness: state.freshness(),
                        },
                        Request::ReportApply { .. } => Response::Done,
                        Request::Get { group, .. } | Request::Snapshot { group } => {
                            Response::Error { code: ErrorCode::UnknownGroup, message: format!("no group `{group}`") }
                        }
                        other => Response::Error { code: ErrorCode::BadRequest, message: other.kind().to_owned() },
                    };
                    let _ = reply.send(response);
                }
                LocalCall::Watch { group, from_revision, events, reply, .. } => {
                    watch_requests.send(from_revision).await.unwrap();
                    if group != GROUP {
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
                LocalCall::Disconnected { .. } => {}
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
        state.watchers.retain(|watcher| watcher.try_send(event.clone()).is_ok());
        state.revision
    }

    async fn next_event(watch: &mut konor_sdk::Watch) -> WatchEvent {
        tokio::time::timeout(WAIT, watch.next()).await.expect("no event in time").expect("watch ended").unwrap()
    }

    async fn raw_connect(path: &Path) -> UnixStream {
        UnixStream::connect(path).await.unwrap()
    }

    /// The next frame from the daemon, or `None` when it closed the connection.
    async fn read_raw(stream: &mut UnixStream) -> Option<ServerFrame> {
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
            Some(ServerFrame::Response {
                id: 1,
                response: Response::Welcome { protocol, node_id, daemon_version },
            }) => {
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
        wait_until(|| std::fs::metadata(&path).is_ok_and(|metadata| metadata.permissions().mode() & 0o777 == 0o600))
            .await;

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
}
