//! Latency histograms, number formats, and the machine description printed before any figure.
//!
//! Latencies are recorded in nanoseconds (3 significant digits) so a sub-microsecond cached get
//! keeps its resolution; every table and JSON field shows microseconds.

use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Largest latency a histogram holds: one minute. Longer waits are failures, reported as errors
/// by the workloads, not samples.
const LATENCY_NANOS_MAX: u64 = 60_000_000_000;

/// Significant digits kept by every histogram: 0.1% resolution, as in the core benches.
const SIGNIFICANT_DIGITS: u8 = 3;

/// A latency distribution in nanoseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Latency {
    /// An empty distribution.
    pub fn new() -> anyhow::Result<Latency> {
        let histogram = Histogram::new_with_bounds(1, LATENCY_NANOS_MAX, SIGNIFICANT_DIGITS)
            .context("cannot create a latency histogram")?;
        Ok(Latency { histogram })
    }

    /// Adds one sample; values past the bound are clamped to it.
    pub fn record(&mut self, elapsed: Duration) {
        self.record_nanos(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds one sample given in nanoseconds (a batch's time divided by its size).
    pub fn record_nanos(&mut self, nanos: u64) {
        self.histogram.saturating_record(nanos.clamp(1, LATENCY_NANOS_MAX));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latency) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram).context("cannot merge latency histograms")
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at `quantile` (0.5 for p50), in microseconds.
    pub fn quantile_micros(&self, quantile: f64) -> f64 {
        self.histogram.value_at_quantile(quantile) as f64 / 1_000.0
    }

    /// (latency µs, fraction of samples at or below it) at each recorded value: the CDF.
    pub fn cdf_points(&self) -> Vec<(f64, f64)> {
        let total = self.histogram.len().max(1) as f64;
        let mut below = 0u64;
        let mut points = Vec::new();
        for value in self.histogram.iter_recorded() {
            below += value.count_since_last_iteration();
            points.push((value.value_iterated_to() as f64 / 1_000.0, below as f64 / total));
        }
        points
    }

    /// The largest sample, in microseconds.
    pub fn max_micros(&self) -> f64 {
        self.histogram.max() as f64 / 1_000.0
    }

    /// The distribution's summary as JSON (µs).
    pub fn to_json(&self) -> Value {
        json!({
            "count": self.count(),
            "p50_us": self.quantile_micros(0.5),
            "p99_us": self.quantile_micros(0.99),
            "max_us": self.max_micros(),
            "mean_us": self.histogram.mean() / 1_000.0,
        })
    }
}

/// Microseconds with the precision that matters at that size: `0.052 µs`, `48.3 µs`, `1,234 µs`.
pub fn format_micros(micros: f64) -> String {
    if micros < 10.0 {
        format!("{micros:.3} µs")
    } else if micros < 1_000.0 {
        format!("{micros:.1} µs")
    } else {
        format!("{} µs", thousands(micros.round() as u64))
    }
}

fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// The machine a run happened on: the figures mean little without it.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Cores available to this process.
    pub cores: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Total memory, in MiB.
    pub memory_mib: u64,
    /// The 1-minute load average at start: other jobs on a shared machine move the figures.
    pub load_average: String,
}

impl Machine {
    /// Reads /proc; unknown fields say so rather than fail the run.
    pub fn describe() -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|line| line.strip_prefix("model name").map(|rest| rest.trim_start_matches([' ', '\t', ':'])))
            .map_or_else(|| "unknown".to_owned(), str::to_owned);
        let memory_mib = read("/proc/meminfo")
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let load_average = read("/proc/loadavg").split_whitespace().next().unwrap_or("unknown").to_owned();
        Machine {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            memory_mib,
            load_average,
        }
    }

    /// One line, printed first.
    pub fn line(&self) -> String {
        format!(
            "machine: nproc {}, CPU {}, {} MiB RAM, kernel {}, load average {} at start",
            self.cores, self.cpu_model, self.memory_mib, self.kernel, self.load_average
        )
    }

    /// The machine as JSON, for the report.
    pub fn to_json(&self) -> Value {
        json!({
            "nproc": self.cores,
            "cpu_model": self.cpu_model,
            "memory_mib": self.memory_mib,
            "kernel": self.kernel,
            "load_average_1m": self.load_average,
        })
    }
}

/// The filesystem type holding `path` (the longest mount point that prefixes it), because an
/// fsync costs very different amounts on ext4 and tmpfs.
pub fn filesystem_of(path: &std::path::Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_device), Some(mount_point), Some(kind)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if path.starts_with(mount_point) && best.as_ref().is_none_or(|(length, _)| mount_point.len() > *length) {
            best = Some((mount_point.len(), kind.to_owned()));
        }
    }
    best.map_or_else(|| "unknown".to_owned(), |(_, kind)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_are_formatted_by_size() {
        assert_eq!(format_micros(0.0523), "0.052 µs");
        assert_eq!(format_micros(48.31), "48.3 µs");
        assert_eq!(format_micros(1234.4), "1,234 µs");
        assert_eq!(format_micros(1_234_567.0), "1,234,567 µs");
    }
}
