//! konor-sim's integration tests: fixed seeds replay to the same trace and hold every invariant.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod determinism;
