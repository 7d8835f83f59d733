//! Stands in for `etcd.rs` in a build without the `etcd` feature (no protoc on the machine):
//! the same API, refusing to start, so `main.rs` needs no conditional code. Run with
//! `--no-etcd`, or build with `--features etcd` to compare.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use crate::measure::Latency;
use crate::workload::Plan;

/// No value of this type exists: a cluster is never started in this build.
pub enum EtcdCluster {}

/// Always refuses, naming the fix.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    bail!(
        "this konor-bench was built without etcd support: build it with \
         `cargo build --release -p konor-node -p konor-bench --features konor-bench/etcd` \
         (needs protoc: apt-get install protobuf-compiler), or run with --no-etcd"
    )
}

/// Never called: no binary is ever found.
pub fn describe(binary: &Path) -> String {
    binary.display().to_string()
}

#[allow(clippy::unused_async, reason = "the same signatures as etcd.rs")]
impl EtcdCluster {
    pub async fn start(_etcd: &Path, _count: usize, _work_dir: &Path) -> anyhow::Result<EtcdCluster> {
        bail!("built without the `etcd` feature")
    }
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match *self {}
    }
    pub fn leader_and_follower(&self) -> (usize, usize) {
        match *self {}
    }
    pub fn dir(&self) -> &Path {
        match *self {}
    }
    pub fn memory(&self) -> anyhow::Result<Vec<(String, u64)>> {
        match *self {}
    }
    pub async fn load_idle(&mut self, _plan: &Plan) -> anyhow::Result<()> {
        match *self {}
    }
    pub async fn propagation(&mut self, _writer: usize, _samples: u64, _warmup: u64) -> anyhow::Result<Latency> {
        match *self {}
    }
    pub async fn put_ack(&mut self, _writer: usize, _samples: u64, _warmup: u64) -> anyhow::Result<Latency> {
        match *self {}
    }
    pub async fn serializable_get(&mut self, _member: usize, _samples: u64, _warmup: u64) -> anyhow::Result<Latency> {
        match *self {}
    }
    pub async fn writes(
        &self,
        _member: usize,
        _writers: usize,
        _duration: Duration,
    ) -> anyhow::Result<(u64, Duration, Latency)> {
        match *self {}
    }
}
