//! Integration tests of konor-crdt: the public API of a group, driven as the node will drive it.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod architecture;
mod conflict;
mod convergence;
mod edit;
mod exchange;
mod format_upgrade;
mod guarded_edit;
mod module_graph;
mod overlay;
mod release;
mod replica;
mod rotation;
mod secret;
mod strong;
mod support;
