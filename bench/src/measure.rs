//! Histograms, figures with their targets, the report table and its JSON form, and the machine
//! description printed before any figure.
//!
//! Latencies are recorded in nanoseconds (3 significant digits) so a sub-microsecond cached get
//! keeps its resolution; every table and JSON field shows microseconds. Each figure carries the
//! system it measured, so a later comparison (issue 7) can put etcd rows beside these.

use std::fmt::Write as _;
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

    /// The largest sample, in microseconds.
    pub fn max_micros(&self) -> f64 {
        self.histogram.max() as f64 / 1_000.0
    }

    fn to_json(&self) -> Value {
        json!({
            "count": self.count(),
            "p50_us": self.quantile_micros(0.5),
            "p99_us": self.quantile_micros(0.99),
            "max_us": self.max_micros(),
            "mean_us": self.histogram.mean() / 1_000.0,
        })
    }
}

/// A goal from the issue, checked against a figure.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// The median latency is at most this many microseconds.
    P50AtMostMicros(f64),
    /// Every daemon's resident memory is at most this many bytes.
    RssAtMostBytes(u64),
}

impl Target {
    fn describe(self) -> String {
        match self {
            Target::P50AtMostMicros(micros) => format!("p50 ≤ {micros} µs"),
            Target::RssAtMostBytes(bytes) => format!("max ≤ {} MB", bytes / 1_000_000),
        }
    }
}

/// What a figure measured.
#[derive(Debug, Clone)]
pub enum Measured {
    /// A latency distribution.
    Latency(Latency),
    /// Operations completed in a fixed time, with the latency of each.
    Throughput {
        /// Operations completed.
        operations: u64,
        /// Wall time they took.
        elapsed: Duration,
        /// Latency of each operation.
        latency: Latency,
    },
    /// Resident memory per daemon, in KiB.
    Memory(Vec<(String, u64)>),
    /// A single duration (how long something took once).
    Once(Duration),
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Figure {
    /// The system measured (`konorkestra`; `etcd` in a comparison).
    pub system: &'static str,
    /// What was measured, in words.
    pub name: String,
    /// The measurement.
    pub measured: Measured,
    /// The goal, if it set one.
    pub target: Option<Target>,
}

impl Figure {
    /// True or false when a target applies, `None` otherwise.
    pub fn met(&self) -> Option<bool> {
        match (self.target?, &self.measured) {
            (Target::P50AtMostMicros(limit), Measured::Latency(latency))
            | (Target::P50AtMostMicros(limit), Measured::Throughput { latency, .. }) => {
                Some(latency.quantile_micros(0.5) <= limit)
            }
            (Target::RssAtMostBytes(limit), Measured::Memory(nodes)) => {
                Some(nodes.iter().all(|(_, kib)| kib * 1024 <= limit))
            }
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        let measured = match &self.measured {
            Measured::Latency(latency) => json!({ "latency": latency.to_json() }),
            Measured::Throughput { operations, elapsed, latency } => json!({
                "operations": operations,
                "elapsed_s": elapsed.as_secs_f64(),
                "per_second": per_second(*operations, *elapsed),
                "latency": latency.to_json(),
            }),
            Measured::Memory(nodes) => json!({
                "rss_kib": nodes.iter().map(|(id, kib)| (id.clone(), json!(kib))).collect::<serde_json::Map<_, _>>(),
                "max_rss_kib": nodes.iter().map(|(_, kib)| *kib).max(),
            }),
            Measured::Once(duration) => json!({ "seconds": duration.as_secs_f64() }),
        };
        json!({
            "system": self.system,
            "name": self.name,
            "measured": measured,
            "target": self.target.map(Target::describe),
            "met": self.met(),
        })
    }
}

/// Every figure of a run, in the order measured.
#[derive(Debug, Default)]
pub struct Report {
    /// The rows.
    pub figures: Vec<Figure>,
}

impl Report {
    /// Adds a row and prints it at once, so a long run shows progress.
    pub fn add(&mut self, figure: Figure) {
        println!("  {}", one_line(&figure));
        self.figures.push(figure);
    }

    /// The table of all figures, as printed at the end.
    pub fn table(&self) -> String {
        let mut text = String::new();
        let header = ["figure", "count", "p50", "p99", "max", "target", "met"];
        let mut rows: Vec<[String; 7]> = vec![header.map(str::to_owned)];
        let several_systems = self.figures.iter().any(|figure| figure.system != self.figures[0].system);
        for figure in &self.figures {
            let met = match figure.met() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "-",
            };
            let target = figure.target.map_or_else(|| "-".to_owned(), Target::describe);
            let (count, p50, p99, max) = match &figure.measured {
                Measured::Latency(latency) => latency_cells(latency),
                Measured::Throughput { operations, elapsed, latency } => {
                    let (_, p50, p99, max) = latency_cells(latency);
                    (format!("{:.0}/s", per_second(*operations, *elapsed)), p50, p99, max)
                }
                Measured::Memory(nodes) => {
                    // p50 is the median daemon; the per-node figures are printed as they are measured.
                    let mut sorted: Vec<u64> = nodes.iter().map(|(_, kib)| *kib).collect();
                    sorted.sort_unstable();
                    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
                    let max = sorted.last().copied().unwrap_or(0);
                    (format!("{} nodes", nodes.len()), format_kib(median), String::new(), format_kib(max))
                }
                Measured::Once(duration) => {
                    ("1".to_owned(), format!("{:.2} s", duration.as_secs_f64()), "".into(), "".into())
                }
            };
            // The system is named only when the report compares several.
            let name =
                if several_systems { format!("[{}] {}", figure.system, figure.name) } else { figure.name.clone() };
            rows.push([name, count, p50, p99, max, target, met.to_owned()]);
        }
        let mut widths = [0usize; 7];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in &rows {
            let mut line = String::new();
            for (index, (cell, width)) in row.iter().zip(widths).enumerate() {
                let padding = width - cell.chars().count();
                // The figure name is left-aligned, numbers right-aligned.
                if index == 0 || index >= 5 {
                    let _ = write!(line, "{cell}{}  ", " ".repeat(padding));
                } else {
                    let _ = write!(line, "{}{cell}  ", " ".repeat(padding));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    /// How many targets were met, of how many set.
    pub fn targets_met(&self) -> (usize, usize) {
        let results: Vec<bool> = self.figures.iter().filter_map(Figure::met).collect();
        (results.iter().filter(|met| **met).count(), results.len())
    }

    /// The whole run as JSON: the machine, the options and every figure.
    pub fn to_json(&self, machine: &Machine, options: Value) -> Value {
        json!({
            "machine": machine.to_json(),
            "options": options,
            "figures": self.figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
        })
    }
}

fn latency_cells(latency: &Latency) -> (String, String, String, String) {
    (
        latency.count().to_string(),
        format_micros(latency.quantile_micros(0.5)),
        format_micros(latency.quantile_micros(0.99)),
        format_micros(latency.max_micros()),
    )
}

fn one_line(figure: &Figure) -> String {
    let verdict = match figure.met() {
        Some(true) => " [met]",
        Some(false) => " [MISSED]",
        None => "",
    };
    let target = figure.target.map(|target| format!(" target {}", target.describe())).unwrap_or_default();
    let body = match &figure.measured {
        Measured::Latency(latency) => {
            let (count, p50, p99, max) = latency_cells(latency);
            format!("p50 {p50}, p99 {p99}, max {max}, n={count}")
        }
        Measured::Throughput { operations, elapsed, latency } => {
            let (_, p50, p99, max) = latency_cells(latency);
            format!(
                "{:.0}/s ({operations} in {:.1} s); each p50 {p50}, p99 {p99}, max {max}",
                per_second(*operations, *elapsed),
                elapsed.as_secs_f64()
            )
        }
        Measured::Memory(nodes) => {
            let each: Vec<String> = nodes.iter().map(|(id, kib)| format!("{id} {}", format_kib(*kib))).collect();
            let max = nodes.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
            format!("{}; max {}", each.join(", "), format_kib(max))
        }
        Measured::Once(duration) => format!("{:.2} s", duration.as_secs_f64()),
    };
    format!("{}: {body}{target}{verdict}", figure.name)
}

fn per_second(operations: u64, elapsed: Duration) -> f64 {
    operations as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
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

/// KiB as decimal megabytes, the unit of the 40 MB target.
fn format_kib(kib: u64) -> String {
    format!("{:.1} MB", (kib * 1024) as f64 / 1_000_000.0)
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

    fn to_json(&self) -> Value {
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

    #[test]
    fn targets_compare_the_median_and_every_node() {
        let mut latency = Latency::new().unwrap();
        for micros in [100, 200, 300] {
            latency.record(Duration::from_micros(micros));
        }
        let figure = |measured, target| Figure { system: "konorkestra", name: "x".into(), measured, target };
        assert_eq!(figure(Measured::Latency(latency.clone()), Some(Target::P50AtMostMicros(250.0))).met(), Some(true));
        assert_eq!(figure(Measured::Latency(latency), Some(Target::P50AtMostMicros(150.0))).met(), Some(false));
        let nodes = vec![("n1".to_owned(), 30_000), ("n2".to_owned(), 40_000)];
        assert_eq!(
            figure(Measured::Memory(nodes.clone()), Some(Target::RssAtMostBytes(40_000_000))).met(),
            Some(false)
        );
        assert_eq!(figure(Measured::Memory(nodes), None).met(), None);
    }
}
