//! The invariants a run checks, by the names reports print, and a violation of one. A leaf:
//! every module that finds or reports a violation uses it, and it uses none of them.

/// SPEC 1.
pub const CONVERGENCE: &str = "1 convergence";
/// SPEC F11: after healing, every holder of the strong group is in its configuration.
pub const CONFIGURATION: &str = "1 configuration converges";
/// SPEC 2.
pub const NO_LOST_COMMIT: &str = "2 no lost commit";
/// SPEC F9/F10: with every member up and reachable, an eventual commit is acknowledged by
/// a quorum of all of them (a node that just started or resumed must not commit alone).
pub const QUORUM: &str = "2 quorum of the members up";
/// protocol-peer E1, the ground of SPEC 2.
pub const DURABLE_ACK: &str = "2/E1 ack only after durable";
/// SPEC 3.
pub const STRONG_ATOMICITY: &str = "3 strong atomicity";
/// protocol-peer S2: a round has exactly one outcome, so one change.
pub const ONE_ROUND_ONE_CHANGE: &str = "3/S2 one round id, one change";
/// SPEC 3, second half (F12).
pub const FENCING: &str = "3 fencing";
/// SPEC 3: the committed versions of a strong group form one sequence.
pub const ONE_SEQUENCE: &str = "3 one committed sequence";
/// protocol-peer S1, the ground of SPEC 3.
pub const ALL_ACK: &str = "3/S1 commit only after every member staged";
/// protocol-peer S2 under recovery: an acceptance a recovery may count must survive a crash.
pub const DURABLE_ACCEPT: &str = "3/S2 accepted only after durable";
/// SPEC 4.
pub const WATCH: &str = "4 watch completeness";
/// SPEC F14: a gated group serves its applications only versions a release targeted, and
/// exactly the settings of the version it serves.
pub const RELEASE: &str = "F14 served only what was released";
/// SPEC 5, detection.
pub const DETECTION: &str = "5 membership detection";
/// SPEC 5, false positives.
pub const FALSE_DEAD: &str = "5 no false dead";
/// A node stopped on its own (its gossip task ended, its store failed).
pub const NODE_EXIT: &str = "node exited";
/// Simulated time must keep advancing: a task that never waits stalls every node.
pub const LIVENESS: &str = "liveness (no busy loop)";

/// An invariant that did not hold.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Simulated microseconds since the start.
    pub at_us: u64,
    /// Which invariant (one of this module's names).
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
}
