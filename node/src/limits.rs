//! Bounds of the shell (konord), each with the reason for its number. The core's bounds are in
//! `konor_crdt::limits`; some older shell bounds still sit beside the code that enforces them.
//! The `const` assertions keep related limits consistent; docs/operations.md lists every one in
//! its limits tables.

use std::time::Duration;

use konor_sdk::protocol::FRAME_BYTES_MAX;

// Peers and the mesh.

/// Most nodes a mesh may hold. FACTS: the whole digest must fit one 65,507-byte message; that
/// held for ~1,340 nodes with 9-character ids and 850-900 with 32-character ids. 800 leaves
/// headroom for the longest ids we allow; larger meshes are refused with a clear error.
pub const MESH_NODES_MAX: usize = 800;

/// A peer writer (its task, queue and QUIC connection to one address) that had nothing to send
/// this long ends and leaves the writer map; the next frame to that address starts a new one.
/// Without it every address this node ever sent to (seeds, nodes long gone, addresses a restart
/// changed) kept a task and a map entry for the life of the process. Five minutes: gossip picks
/// three random peers per round, so in an 800-node mesh at 250 ms a live peer goes 5 minutes
/// without a message from this node with a chance of about 1 %, and its writer rarely has to
/// dial again.
pub const PEER_WRITER_IDLE: Duration = Duration::from_secs(5 * 60);

/// Node ids whose highest gossip generation the gossip filter remembers after chitchat forgot
/// them (a node dead for the grace period): that memory refuses a replay of an old generation,
/// but kept forever it grows with every node id the cluster ever had. Four meshes' worth; past it
/// the ids whose last new generation is oldest are forgotten first, never one chitchat holds.
pub const FORGOTTEN_NODE_IDS_MAX: usize = 4 * MESH_NODES_MAX;

/// How long a starting konord waits for its QUIC port while another process holds it: a
/// konord stopped by SIGTERM announces its leave for three gossip periods (0.75 s at 250 ms,
/// 3 s at 1 s), drains its socket connections (up to 1 s) and lets go of its port last, so a
/// restart issued right after SIGTERM finds the port taken for a second or a few. Past this the
/// holder is not a konord that is stopping, and the start fails.
pub const PREDECESSOR_EXIT_WAIT: Duration = Duration::from_secs(10);

/// How often a starting konord tries its held QUIC port again: the other process gives no sign
/// when it lets go, and a bind costs a system call.
pub const PORT_RETRY: Duration = Duration::from_millis(50);

const _: () = assert!(FORGOTTEN_NODE_IDS_MAX >= MESH_NODES_MAX);
const _: () = assert!(PORT_RETRY.as_millis() * 10 <= PREDECESSOR_EXIT_WAIT.as_millis());

// Local socket (`api/socket/`): what one connection, and all of them together, may hold.

/// Default cap on open connections that said Hello: each SDK client holds one, plus one per
/// watch; 256 covers a busy host and bounds the daemon's memory and tasks for local clients.
pub const CONNECTIONS_MAX_DEFAULT: usize = 256;

/// Connections that said Hello from one user, for users other than konord's own and root: a
/// user let in by the socket's group cannot take every slot with silent or idle connections.
/// konord's own user and root are not capped: with the default socket mode (0600) they are the
/// only users, and they can stop the daemon anyway. A quarter of [`CONNECTIONS_MAX_DEFAULT`].
pub const CONNECTIONS_PER_UID_MAX: usize = CONNECTIONS_MAX_DEFAULT / 4;

/// Connections that have not said Hello yet, at most: a new one past this closes the oldest
/// silent one of the user that holds the most of them. A client says Hello as soon as it
/// connects, so only silent connections (a slow loris, a stuck client) are ever old here, and
/// they hold no slot (a slot is taken at Hello).
pub const UNGREETED_CONNECTIONS_MAX: usize = 32;

/// Largest first frame of a connection (its `hello`): a hello is a few hundred bytes, and a
/// silent connection must not make the daemon hold a 16 MiB frame before it said who it is.
pub const HELLO_FRAME_BYTES_MAX: usize = 4 * 1024;

/// Longest process name in `hello`, in bytes: Linux file names are at most 255 bytes, and the
/// name is kept in every apply report row (F16) and log line of the connection.
pub const PROCESS_NAME_BYTES_MAX: usize = 256;

/// Requests plus watches one connection may have in flight. A request past it waits: the
/// session stops reading, which pushes back on the client instead of queueing without bound.
/// A watch holds its place while it lasts, and may not take the last one (it is refused), so a
/// connection always has room for the `unwatch` that ends a watch.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 64;

/// Frames queued for one connection's writer: room for every answer in flight
/// ([`REQUESTS_IN_FLIGHT_MAX`]) plus a burst of events; producers wait when it is full.
pub const OUTBOX_FRAMES_MAX: usize = 256;

/// Frames read ahead by one connection's reader task: enough to overlap reading with handling,
/// few enough that a flooding client is held back by the socket.
pub const INBOX_FRAMES_MAX: usize = 16;

/// Events queued per watch between the daemon and the socket. A client that falls this far
/// behind (or past [`CONNECTION_WRITE_BYTES_MAX`]) gets its watch dropped by the daemon; the
/// connection then closes and the SDK resumes from its last revision, so nothing is lost and
/// the daemon never waits on a slow reader.
pub const WATCH_QUEUE_EVENTS: usize = 1024;

/// Bytes of frames one connection may have read and not yet answered (its requests waiting for
/// the daemon, and frames read ahead). Past it the connection's reader stops reading until
/// answers go out: backpressure, as with [`REQUESTS_IN_FLIGHT_MAX`]. Two largest frames, so one
/// always fits beside another being answered.
pub const CONNECTION_READ_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX;

/// Bytes of frames queued for one connection's writer (answers and watch events) and not yet
/// written to the socket. An answer past it waits for the client to read (a client that reads
/// nothing for [`IO_TIMEOUT`] is closed); a watch event past it drops the watch, as a full
/// [`WATCH_QUEUE_EVENTS`] does. Two largest frames: a snapshot and an event fit at once.
pub const CONNECTION_WRITE_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX;

/// Bytes read and not yet answered over all connections together: without it, 256 clients could
/// make the daemon hold 256 × [`CONNECTION_READ_BYTES_MAX`] (8 GiB). Eight largest frames at once
/// is far beyond what local clients send (requests are bytes to kilobytes; a full-file `apply` is
/// at most 8 MiB); past it, readers wait for room.
pub const SOCKET_READ_BYTES_MAX: usize = 8 * FRAME_BYTES_MAX;

/// Bytes queued for writers over all connections together (answers and watch events). Past it
/// answers wait and watch events drop their watch (the client resumes), so many slow readers
/// together cannot grow the daemon either.
pub const SOCKET_WRITE_BYTES_MAX: usize = 8 * FRAME_BYTES_MAX;

/// Longest version label or reference a request may carry (`v12`, `v12-3fa9c2d1`, `app@v12`):
/// a group name, `@`, `v`, a 20-digit counter and an actor tag fit with room to spare. Labels are
/// kept in apply report rows (F16) and echoed in errors.
pub const VERSION_LABEL_BYTES_MAX: usize = 128;

/// How long a new connection may take to say Hello before it is closed, so silent connections
/// cannot hold the daemon's attention.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write, or the rest of a frame after its first byte, may take. A local client
/// that cannot take or finish a frame in 10 s is stuck; its connection is closed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection that said Hello, has no request in flight, no watch and no apply report (F16)
/// the daemon shows, and sends nothing for this long is closed (after an id-0 `idle` error
/// frame), so forgotten clients give their slot back. The daemon handles nothing on it after deciding, so the SDK reconnects and resends a
/// request that crossed the close. Five minutes keeps a client that calls every minute (a cron,
/// a health check) on one connection; reconnecting costs well under a millisecond.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

// The HTTP API (issue 15).

/// HTTPS connections open at once; more are closed at accept. An operator's tools, a scraper,
/// a load balancer and a few dashboards need tens; 256 bounds the memory a flood can take
/// (each connection holds a TLS session and a request of at most [`HTTP_BODY_BYTES_MAX`]).
pub const HTTP_CONNECTIONS_MAX: usize = 256;

/// Bytes of one request body: an `apply` carries a whole config file (at most
/// `CONFIG_FILE_BYTES_MAX`) as a JSON string, where escaping can double it.
pub const HTTP_BODY_BYTES_MAX: usize = 2 * konor_crdt::limits::CONFIG_FILE_BYTES_MAX + 4096;

/// Watch streams (Server-Sent Events) open at once: each holds a queue of at most
/// `WATCH_QUEUE_EVENTS` events within its own write budget. A dashboard watches a few groups;
/// applications watch through the socket.
pub const HTTP_WATCHES_MAX: usize = 64;

/// How long a TLS handshake, or the headers of a request, may take: a client that is this
/// slow is stuck (or holding a slot on purpose).
pub const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits for the daemon's answer. A strong write answers within its round's
/// timeouts (3 s to vote, 3 s to decide) and a `block` read within 5 s; 30 s is a bound for a
/// daemon that is stuck, after which the caller gets `timeout` and the write's outcome is
/// unknown.
pub const HTTP_CALL_TIMEOUT: Duration = Duration::from_secs(30);

const _: () = assert!(CONNECTION_READ_BYTES_MAX >= FRAME_BYTES_MAX);
const _: () = assert!(CONNECTION_WRITE_BYTES_MAX >= FRAME_BYTES_MAX);
const _: () = assert!(SOCKET_READ_BYTES_MAX >= CONNECTION_READ_BYTES_MAX);
const _: () = assert!(SOCKET_WRITE_BYTES_MAX >= CONNECTION_WRITE_BYTES_MAX);
// Budgets are semaphore permits, acquired a frame at a time as a u32.
const _: () = assert!(FRAME_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(HELLO_FRAME_BYTES_MAX <= FRAME_BYTES_MAX);
const _: () = assert!(HELLO_FRAME_BYTES_MAX >= 2 * PROCESS_NAME_BYTES_MAX);
const _: () = assert!(OUTBOX_FRAMES_MAX >= REQUESTS_IN_FLIGHT_MAX);
const _: () = assert!(REQUESTS_IN_FLIGHT_MAX >= 2);
const _: () = assert!(CONNECTIONS_PER_UID_MAX >= 1);
const _: () = assert!(IDLE_TIMEOUT.as_secs() > HELLO_TIMEOUT.as_secs());
