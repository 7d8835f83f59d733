//! Bounds of the shell (konord) that are not tied to one module, each with the reason for its
//! number. The core's bounds are in `konor_crdt::limits`; older shell bounds still sit beside the
//! code that enforces them and are all listed in docs/operations.md's limits table.

use std::time::Duration;

use crate::peer::membership::MESH_NODES_MAX;

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
