//! The local socket API: the daemon's side of the Unix socket that SDKs and `konorctl` use.
//!
//! This module speaks the framing and the Hello handshake itself and hands every other request to
//! the daemon as a [`LocalCall`] on a bounded channel. It decides nothing about configuration,
//! so the daemon task can own all state and the socket can be tested with a stand-in daemon.
//!
//! **Boundary:** the wire format is `konor_sdk::protocol` (docs/protocol.md).
//!
//! Per connection: a reader task turns bytes into frames (`frame_io.rs`), a writer task writes
//! whole frames with a timeout, and the session loop in between (`session.rs`) enforces Hello,
//! checks each request's names and sizes (`api/request_check.rs`, shared with the HTTP door), forwards requests (up to
//! [`REQUESTS_IN_FLIGHT_MAX`] requests and watches at once, each in its own task and span), runs
//! watches, and closes the connection when it idles. What a connection may hold, and all of them
//! together, is bounded in bytes (`budget.rs`); who gets a slot is decided in `admission.rs`.
//! Bad input (garbage, an oversized length, a truncated frame, a request before Hello, a reserved
//! or repeated id) is counted in [`LocalApiStats::bad_frames`], logged, answered with an error
//! frame where possible, and ends that connection only; the listener goes on.

mod admission;
mod budget;
mod frame_io;
mod session;
#[cfg(test)]
mod tests;

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::protocol::{Request, Response, SocketStats};
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tracing::{Instrument, debug, error, info, info_span, warn};

use self::admission::{Slots, Ungreeted};
use self::budget::Budget;
pub use self::budget::{BytePool, EncodedEvent, WatchFull, WatchReceiver, WatchSender};
use self::session::Session;
use crate::api::read_view::ReadView;
use crate::limits::{
    CONNECTION_READ_BYTES_MAX, CONNECTION_WRITE_BYTES_MAX, INBOX_FRAMES_MAX, IO_TIMEOUT, OUTBOX_FRAMES_MAX,
    SOCKET_READ_BYTES_MAX, SOCKET_WRITE_BYTES_MAX,
};
pub use crate::limits::{
    CONNECTIONS_MAX_DEFAULT, CONNECTIONS_PER_UID_MAX, IDLE_TIMEOUT, REQUESTS_IN_FLIGHT_MAX, UNGREETED_CONNECTIONS_MAX,
    WATCH_QUEUE_EVENTS,
};

/// Default file mode of the socket: only the daemon's user may connect (F23). Operators who
/// want a group of users to connect set 0o660 and the socket's group.
pub const SOCKET_MODE_DEFAULT: u32 = 0o600;

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
    /// Who the door authenticated (the socket: the user of `uid`; HTTP: the certificate's
    /// identity): versions this client writes are authored by it, whatever the client claims.
    /// `None`: unknown (the simulator, tests), and the author is the client's claim or its
    /// process name.
    pub user: Option<String>,
    /// The caller reads secret values (issue 17); else it reads them masked
    /// ([`crate::api::authorize::reveals`]).
    pub reveal: bool,
}

impl ClientInfo {
    /// Who, as the audit log names a socket caller.
    pub fn audit_who(&self) -> String {
        match (self.uid, &self.user) {
            (Some(uid), Some(user)) => format!("uid:{uid} ({user})"),
            (Some(uid), None) => format!("uid:{uid}"),
            (None, _) => "unknown".to_owned(),
        }
    }

    /// From where, as the audit log names a socket caller.
    pub fn audit_from(&self) -> String {
        format!("socket pid {} ({})", self.pid, self.process)
    }
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
    /// on `reply`. Events sent before the reply are delivered after it. The daemon pushes with
    /// [`WatchSender::try_send`], which never waits, and drops `events` when it fails (a client
    /// too slow); dropping it, for that or any reason, closes the connection, and the SDK
    /// resumes from its last revision.
    Watch {
        /// Who asks.
        client: ClientInfo,
        /// Group.
        group: String,
        /// Deliver changes after this revision; `None`: from now on.
        from_revision: Option<u64>,
        /// Only changes to keys that start with this text.
        prefix: Option<String>,
        /// Where events go: [`WATCH_QUEUE_EVENTS`] at most, within the connection's and the
        /// socket's write budgets.
        events: WatchSender,
        /// Where the answer goes.
        reply: oneshot::Sender<Response>,
    },
    /// The node's health now (the HTTP door's `/api/v1/health` and `/metrics`).
    Health {
        /// Where the answer goes.
        reply: oneshot::Sender<crate::health::NodeHealth>,
    },
    /// A host enrolls with a join token (the HTTP door's `POST /api/v1/enroll`).
    Enroll {
        /// What it sends.
        ask: crate::enroll::EnrollAsk,
        /// From where.
        remote: std::net::SocketAddr,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<crate::enroll::EnrollGrant, crate::enroll::Refusal>>,
    },
    /// A connection that said Hello has ended; its watches are gone.
    Disconnected {
        /// The connection number from [`ClientInfo::connection`].
        connection: u64,
    },
}

/// Counters and byte budgets of the local socket, answered to `socket_stats`.
#[derive(Debug)]
pub struct LocalApiStats {
    /// Frames refused: not JSON, an unknown request, an oversized length, truncated, a request
    /// before Hello, or a reserved or repeated id.
    pub bad_frames: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Connections refused at Hello: over the connection cap or the cap per user.
    pub refused: AtomicU64,
    /// Silent connections closed to make room (see [`UNGREETED_CONNECTIONS_MAX`]).
    pub ungreeted_closed: AtomicU64,
    /// Connections closed for being idle (see [`IDLE_TIMEOUT`]).
    pub idle_closed: AtomicU64,
    /// Watches dropped because their client fell behind.
    pub watches_dropped: AtomicU64,
    /// Bytes read and not yet answered, all connections together.
    pub read: Arc<BytePool>,
    /// Bytes queued for writers, all connections together.
    pub write: Arc<BytePool>,
}

impl Default for LocalApiStats {
    fn default() -> LocalApiStats {
        LocalApiStats::with_budgets(SOCKET_READ_BYTES_MAX, SOCKET_WRITE_BYTES_MAX)
    }
}

impl LocalApiStats {
    /// Counters at zero, with pools of `read_max` and `write_max` bytes shared by all
    /// connections ([`SOCKET_READ_BYTES_MAX`] and [`SOCKET_WRITE_BYTES_MAX`] by default).
    pub fn with_budgets(read_max: usize, write_max: usize) -> LocalApiStats {
        LocalApiStats {
            bad_frames: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            ungreeted_closed: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            watches_dropped: AtomicU64::new(0),
            read: Arc::new(BytePool::new(read_max)),
            write: Arc::new(BytePool::new(write_max)),
        }
    }

    /// The counters as `socket_stats` answers them.
    pub fn snapshot(&self) -> SocketStats {
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        SocketStats {
            connections: count(&self.connections),
            read_bytes: self.read.held(),
            read_bytes_peak: self.read.peak(),
            read_bytes_max: self.read.max(),
            write_bytes: self.write.held(),
            write_bytes_peak: self.write.peak(),
            write_bytes_max: self.write.max(),
            bad_frames: count(&self.bad_frames),
            refused: count(&self.refused),
            ungreeted_closed: count(&self.ungreeted_closed),
            idle_closed: count(&self.idle_closed),
            watches_dropped: count(&self.watches_dropped),
        }
    }
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
    /// Open connections of one user at most, for users not in `uncapped_uids` (default
    /// [`CONNECTIONS_PER_UID_MAX`]).
    pub connections_per_uid_max: usize,
    /// Users whose connections are not capped per user: `None` (the default) means root and
    /// konord's own user, the only users the default socket mode lets in.
    pub uncapped_uids: Option<Vec<u32>>,
    /// How long a connection with nothing in flight may stay silent (default [`IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// This node's id, sent in Welcome.
    pub node_id: String,
    /// Counters.
    pub stats: Arc<LocalApiStats>,
    /// The daemon's read view: `get` is answered from it without a hop to the daemon task
    /// (groups not in it are asked of the daemon).
    pub reads: Option<ReadView>,
    /// Who may do what (the settings file's `[roles]`); `None`: every caller the socket's file
    /// mode lets in may do anything.
    pub roles: Option<Arc<crate::api::authorize::RolePolicy>>,
    /// Where admin actions and refusals are recorded (`None`: not audited, in tests).
    pub audit: Option<crate::audit::Audit>,
}

impl LocalApiConfig {
    /// A config with the default mode and connection cap.
    pub fn new(path: impl Into<PathBuf>, node_id: impl Into<String>) -> LocalApiConfig {
        LocalApiConfig {
            path: path.into(),
            mode: SOCKET_MODE_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            connections_per_uid_max: CONNECTIONS_PER_UID_MAX,
            uncapped_uids: None,
            idle_timeout: IDLE_TIMEOUT,
            node_id: node_id.into(),
            stats: Arc::default(),
            reads: None,
            roles: None,
            audit: None,
        }
    }
}

/// What every connection shares.
struct Shared {
    node_id: String,
    stats: Arc<LocalApiStats>,
    calls: mpsc::Sender<LocalCall>,
    reads: Option<ReadView>,
    roles: Option<Arc<crate::api::authorize::RolePolicy>>,
    audit: Option<crate::audit::Audit>,
    ungreeted: Ungreeted,
    slots: Slots,
    idle_timeout: Duration,
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
    let own_uid = rustix::process::geteuid().as_raw();
    let uncapped = config.uncapped_uids.clone().unwrap_or_else(|| vec![0, own_uid]);
    let shared = Arc::new(Shared {
        node_id: config.node_id.clone(),
        stats: config.stats.clone(),
        calls,
        reads: config.reads.clone(),
        roles: config.roles.clone(),
        audit: config.audit.clone(),
        ungreeted: Ungreeted::default(),
        slots: Slots::new(config.connections_max, config.connections_per_uid_max, uncapped),
        idle_timeout: config.idle_timeout,
    });
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
                    let uid = stream.peer_cred().ok().map(|credentials| credentials.uid());
                    let make_room = shared.ungreeted.expect_hello(connection_count, uid, &shared.stats);
                    let (shared, receiver) = (shared.clone(), shutdown.clone());
                    connections.spawn(serve_connection(connection_count, stream, shared, receiver, make_room));
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

/// One connection from accept to close.
async fn serve_connection(
    connection: u64,
    stream: UnixStream,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    make_room: Arc<Notify>,
) {
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let credentials = stream.peer_cred().ok();
    let (read_half, write_half) = stream.into_split();
    let (outbox, outbox_receiver) = mpsc::channel(OUTBOX_FRAMES_MAX);
    let (inbox_sender, inbox) = mpsc::channel(INBOX_FRAMES_MAX);
    let closing = Arc::new(Notify::new());
    let read_budget = Budget::new(CONNECTION_READ_BYTES_MAX, shared.stats.read.clone());
    let write_budget = Budget::new(CONNECTION_WRITE_BYTES_MAX, shared.stats.write.clone());
    let writer = tokio::spawn(frame_io::write_loop(write_half, outbox_receiver, closing.clone(), connection));
    let reader = tokio::spawn(frame_io::read_loop(BufReader::new(read_half), inbox_sender, read_budget));
    let mut session = Session::new(connection, credentials, shared.clone(), outbox, closing, write_budget, make_room);
    let span = info_span!("local_connection", connection, pid = tracing::field::Empty);
    session.run(inbox, shutdown).instrument(span).await;

    let said_hello = session.said_hello();
    let abandon = session.abandons_outbox();
    session.end().await;
    if abandon {
        // The client does not read: what is queued goes back to the budgets now.
        writer.abort();
    } else if tokio::time::timeout(IO_TIMEOUT, writer).await.is_err() {
        // The outbox is closed: the writer flushes what is queued (a last error frame) and ends.
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
