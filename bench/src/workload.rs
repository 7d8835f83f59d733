//! What both sides share: the sizes of a run ([`Plan`]), the deadlines, and small helpers.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

/// Clients of the concurrent-write workload, each with its own connection.
pub const CONCURRENT_WRITERS: usize = 16;

/// Longest wait for any one condition of a system (a watcher's event, a group reaching every
/// node). Past it the run fails: the system is stuck, not slow.
pub const CONDITION_DEADLINE: Duration = Duration::from_secs(60);

/// Cached gets timed together: one `Instant` pair costs about as much as a cached get, so a
/// batch of 1,000 makes the timer's share negligible.
pub const CACHED_GETS_PER_BATCH: u32 = 1_000;

/// Sizes of one run. Every latency workload runs `warmup` unrecorded samples first, so
/// connections, caches and the allocator reach their steady state.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Interleaved rounds; each figure is the median over them.
    pub rounds: usize,
    /// Timed propagation samples per round and writer placement.
    pub propagation_samples: u64,
    /// Timed commits per round and consistency mode (etcd: per writer placement).
    pub commit_samples: u64,
    /// Timed local gets per round.
    pub local_gets: u64,
    /// Timed batches of cached gets per round.
    pub cached_batches: u64,
    /// Unrecorded samples before each latency workload.
    pub warmup_samples: u64,
    /// How long each write workload runs per round.
    pub write_duration: Duration,
    /// Groups (etcd: key prefixes) created for the memory figure.
    pub idle_groups: usize,
    /// Keys per such group.
    pub idle_keys: usize,
    /// Bytes of each value in those groups.
    pub idle_value_bytes: usize,
}

impl Plan {
    /// The full run: about 2 minutes per cluster size on an idle 2-core machine.
    pub fn full() -> Plan {
        Plan {
            rounds: 3,
            propagation_samples: 1_000,
            commit_samples: 500,
            local_gets: 20_000,
            cached_batches: 3_000,
            warmup_samples: 50,
            write_duration: Duration::from_secs(5),
            idle_groups: 10,
            idle_keys: 1_000,
            idle_value_bytes: 32,
        }
    }

    /// A smoke check in under a minute: the same workloads, smaller. The memory workload keeps
    /// its size, since its goal is defined for 10 groups of 1,000 keys.
    pub fn quick() -> Plan {
        Plan {
            propagation_samples: 100,
            commit_samples: 100,
            local_gets: 2_000,
            cached_batches: 200,
            warmup_samples: 10,
            write_duration: Duration::from_secs(1),
            ..Plan::full()
        }
    }

    /// The plan as JSON, for the report.
    pub fn to_json(&self) -> Value {
        json!({
            "rounds": self.rounds,
            "propagation_samples": self.propagation_samples,
            "commit_samples": self.commit_samples,
            "local_gets": self.local_gets,
            "cached_batches": self.cached_batches,
            "cached_gets_per_batch": CACHED_GETS_PER_BATCH,
            "warmup_samples": self.warmup_samples,
            "write_duration_s": self.write_duration.as_secs_f64(),
            "concurrent_writers": CONCURRENT_WRITERS,
            "idle_groups": self.idle_groups,
            "idle_keys": self.idle_keys,
            "idle_value_bytes": self.idle_value_bytes,
        })
    }
}

/// The value of idle key `key` in group `group`: `idle_value_bytes` characters, the same for
/// both systems.
pub fn idle_value(group: &str, key: usize, plan: &Plan) -> String {
    format!("{group}.{key:04}-").chars().cycle().take(plan.idle_value_bytes).collect()
}

/// Resident set size of process `pid` from `/proc/<pid>/status` (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .with_context(|| format!("{path} has no VmRSS line (is /proc mounted?)"))?;
    let kib = line.split_whitespace().nth(1).and_then(|text| text.parse().ok());
    kib.with_context(|| format!("cannot parse {line:?} in {path}"))
}

/// Aborts tasks when dropped, so no task outlives the workload that started it.
pub struct AbortOnDrop<T>(pub Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_values_have_the_planned_size() {
        let plan = Plan::full();
        let value = idle_value("idle3", 17, &plan);
        assert_eq!(value.len(), plan.idle_value_bytes);
        assert!(value.starts_with("idle3.0017-"));
    }

    #[test]
    fn this_process_has_a_resident_set() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
