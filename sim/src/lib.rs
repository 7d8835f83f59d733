//! konor-sim: runs many real Konorkestra nodes (the same `run_node` as konord) in one process, on
//! one paused clock and an in-memory network with latency, loss, duplication, reordering,
//! partitions, crashes, restarts and pauses. One seed drives every random choice, chitchat's and
//! std's included (see [`entropy`]), so a seed replays a run byte for byte; invariants are
//! checked during and after each run (see [`invariant`]).
//!
//! Code map: [`config`] (what a run is), [`run`](mod@run) (phases), [`node`] (spawn, crash, restart,
//! pause), [`disk`] (what each node's files hold durably; disk faults and crashes), [`network`]
//! (the hub), [`workload`] (writers, readers, watchers), [`fault`], [`observe`] (membership as
//! nodes report it), [`invariant`] (their names), [`check`] (the SPEC invariants over what
//! clients saw), [`frame_check`] (the protocol's on frames), [`history`] (the strong group's one committed
//! sequence and fresh reads), [`report`], [`plot`],
//! [`trace`], [`rng`], [`entropy`], [`log`].

pub mod alerts;
pub mod check;
pub mod config;
pub mod disk;
pub mod entropy;
pub mod fault;
pub mod frame_check;
pub mod history;
pub mod invariant;
pub mod log;
pub mod network;
pub mod node;
pub mod observe;
pub mod plot;
pub mod releases;
pub mod report;
pub mod rng;
pub mod run;
pub mod trace;
pub mod workload;

pub use config::RunConfig;
pub use report::RunReport;
pub use run::run;
