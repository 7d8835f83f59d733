//! End-to-end tests of konord: real processes, real QUIC with mutual TLS on loopback, real
//! files with fsync, talking through the real SDK over the real socket.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alerting;
mod audit;
mod consistency;
mod durability;
mod enrollment;
mod fault_layer;
mod faults;
mod guarded_edits;
mod harness;
mod http;
mod isolation;
mod key_rotation;
mod liveness;
mod mesh;
mod netns;
mod releases;
mod restart;
mod revocation;
mod roles;
mod secrets;
mod security;
mod socket;
mod values;
mod who_saw_what;
