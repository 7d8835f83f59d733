//! konor-sim's integration tests: fixed seeds replay to the same trace and hold every invariant;
//! the anomaly rules raise their alerts on scripted faults and none on a healthy mesh.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alerts;
mod determinism;
mod releases;
mod rotation;
