//! The side-by-side model: one [`Row`] per measure, holding what each system measured in each
//! interleaved round, summarised as the median over rounds of each round's p50 and p99, with
//! the ratio ours/etcd and the goal for that ratio.
//!
//! Absolute times on a shared 2-core machine drift by tens of percent between minutes; the two
//! systems are measured in the same round, one right after the other, so the ratio is the
//! figure that means something.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::measure::{Latency, format_micros};

/// The two systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Konorkestra: konord daemons and the Rust SDK.
    Konor,
    /// etcd members and etcd's gRPC client.
    Etcd,
}

/// What one system measured in one round.
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
}

impl Measured {
    /// The headline number (p50 in µs, operations per second, or the largest RSS in MB) and the
    /// second one (p99 in µs; p99 of each operation for a throughput; none for memory).
    fn headline(&self) -> (f64, Option<f64>) {
        match self {
            Measured::Latency(latency) => (latency.quantile_micros(0.5), Some(latency.quantile_micros(0.99))),
            Measured::Throughput { operations, elapsed, latency } => {
                (per_second(*operations, *elapsed), Some(latency.quantile_micros(0.99)))
            }
            Measured::Memory(nodes) => {
                let max = nodes.iter().map(|(_, kib)| *kib).max().unwrap_or(0);
                ((max * 1024) as f64 / 1_000_000.0, None)
            }
        }
    }

    /// One line for progress output.
    pub fn brief(&self) -> String {
        match self {
            Measured::Latency(latency) => format!(
                "p50 {}, p99 {}",
                format_micros(latency.quantile_micros(0.5)),
                format_micros(latency.quantile_micros(0.99))
            ),
            Measured::Throughput { operations, elapsed, .. } => {
                format!("{:.0}/s ({operations} in {:.1} s)", per_second(*operations, *elapsed), elapsed.as_secs_f64())
            }
            Measured::Memory(nodes) => {
                let each: Vec<String> =
                    nodes.iter().map(|(id, kib)| format!("{id} {:.1} MB", (kib * 1024) as f64 / 1e6)).collect();
                each.join(", ")
            }
        }
    }

    /// The latency distribution, if this is a timed measure.
    pub fn latency(&self) -> Option<&Latency> {
        match self {
            Measured::Latency(latency) | Measured::Throughput { latency, .. } => Some(latency),
            Measured::Memory(_) => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
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
        }
    }
}

/// The goal for a row, as a bound on the ratio ours/etcd of the headline numbers.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// Ours must be at most this fraction of etcd's (latency p50, memory).
    AtMost(f64),
    /// Ours must be at least this multiple of etcd's (operations per second).
    AtLeast(f64),
}

impl Goal {
    fn describe(self) -> String {
        match self {
            Goal::AtMost(ratio) => format!("≤ {ratio}x"),
            Goal::AtLeast(ratio) => format!("≥ {ratio}x"),
        }
    }

    fn holds(self, ratio: f64) -> bool {
        match self {
            Goal::AtMost(bound) => ratio <= bound,
            Goal::AtLeast(bound) => ratio >= bound,
        }
    }
}

/// The unit of a row's headline number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Latency: p50 and p99 in µs.
    Micros,
    /// Throughput: operations per second (and each operation's p99 in µs).
    PerSecond,
    /// Memory: the largest daemon's RSS in MB.
    Megabytes,
}

/// One measure, both systems, every round.
#[derive(Debug, Clone)]
pub struct Row {
    /// Cluster size the row was measured on.
    pub nodes: usize,
    /// What is measured, in words shared by both systems.
    pub name: String,
    /// How Konorkestra was driven (`set on a random node`).
    pub ours_how: String,
    /// How etcd was driven (`put on the leader`); empty when etcd has no counterpart.
    pub etcd_how: String,
    /// The unit of the headline number.
    pub unit: Unit,
    /// One measurement per round.
    pub ours: Vec<Measured>,
    /// One measurement per round (empty when etcd has no counterpart).
    pub etcd: Vec<Measured>,
    /// The goal for the ratio, if it set one.
    pub goal: Option<Goal>,
}

/// The median over rounds of each round's headline numbers.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Median of the rounds' p50 (µs), operations per second, or MB.
    pub headline: f64,
    /// Median of the rounds' p99 (µs), if the unit has one.
    pub p99: Option<f64>,
}

/// Median over rounds; `None` when nothing was measured.
fn summarise(rounds: &[Measured]) -> Option<Summary> {
    if rounds.is_empty() {
        return None;
    }
    let headlines: Vec<f64> = rounds.iter().map(|m| m.headline().0).collect();
    let p99s: Vec<f64> = rounds.iter().filter_map(|m| m.headline().1).collect();
    Some(Summary { headline: median(headlines)?, p99: median(p99s) })
}

/// The median of a list (the mean of the two middle values for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[middle]),
        _ => Some((values[middle - 1] + values[middle]) / 2.0),
    }
}

impl Row {
    /// Ours, summarised over rounds.
    pub fn ours_summary(&self) -> Option<Summary> {
        summarise(&self.ours)
    }

    /// etcd's, summarised over rounds.
    pub fn etcd_summary(&self) -> Option<Summary> {
        summarise(&self.etcd)
    }

    /// Ours / etcd's headline numbers.
    pub fn ratio(&self) -> Option<f64> {
        let (ours, etcd) = (self.ours_summary()?, self.etcd_summary()?);
        (etcd.headline > 0.0).then(|| ours.headline / etcd.headline)
    }

    /// Whether the goal holds; `None` without a goal or without both figures.
    pub fn met(&self) -> Option<bool> {
        Some(self.goal?.holds(self.ratio()?))
    }

    fn to_json(&self) -> Value {
        let summary = |summary: Option<Summary>| {
            summary.map(|s| json!({ "median_headline": s.headline, "median_p99_us": s.p99 }))
        };
        json!({
            "nodes": self.nodes,
            "name": self.name,
            "unit": match self.unit { Unit::Micros => "us", Unit::PerSecond => "ops_per_s", Unit::Megabytes => "MB" },
            "konorkestra": { "how": self.ours_how, "summary": summary(self.ours_summary()),
                             "rounds": self.ours.iter().map(Measured::to_json).collect::<Vec<_>>() },
            "etcd": { "how": self.etcd_how, "summary": summary(self.etcd_summary()),
                      "rounds": self.etcd.iter().map(Measured::to_json).collect::<Vec<_>>() },
            "ratio": self.ratio(),
            "goal": self.goal.map(Goal::describe),
            "met": self.met(),
        })
    }
}

/// Every row of a run, in the order first measured.
#[derive(Debug, Default)]
pub struct Comparison {
    /// The rows.
    pub rows: Vec<Row>,
}

impl Comparison {
    /// Adds one round's measurement of `system` to the row named `name` on `nodes` nodes,
    /// creating the row with `info`'s fixed fields on first use.
    pub fn record(&mut self, nodes: usize, name: &str, system: System, measured: Measured, info: &RowInfo) {
        let index = match self.rows.iter().position(|row| row.nodes == nodes && row.name == name) {
            Some(index) => index,
            None => {
                self.rows.push(Row {
                    nodes,
                    name: name.to_owned(),
                    ours_how: info.ours_how.clone(),
                    etcd_how: info.etcd_how.clone(),
                    unit: info.unit,
                    ours: Vec::new(),
                    etcd: Vec::new(),
                    goal: info.goal,
                });
                self.rows.len() - 1
            }
        };
        let row = &mut self.rows[index];
        match system {
            System::Konor => row.ours.push(measured),
            System::Etcd => row.etcd.push(measured),
        }
    }

    /// The table printed at the end: one line per row, medians over rounds.
    pub fn table(&self) -> String {
        let header = [
            "nodes",
            "measure",
            "konorkestra",
            "p50 / rate",
            "p99",
            "etcd",
            "p50 / rate",
            "p99",
            "ours/etcd",
            "goal",
            "met",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|cell| (*cell).to_owned()).collect()];
        for row in &self.rows {
            let cells = |summary: Option<Summary>| match summary {
                None => ("-".to_owned(), "-".to_owned()),
                Some(summary) => (
                    match row.unit {
                        Unit::Micros => format_micros(summary.headline),
                        Unit::PerSecond => format!("{:.0}/s", summary.headline),
                        Unit::Megabytes => format!("{:.1} MB", summary.headline),
                    },
                    summary.p99.map_or_else(|| "-".to_owned(), format_micros),
                ),
            };
            let (ours_p50, ours_p99) = cells(row.ours_summary());
            let (etcd_p50, etcd_p99) = cells(row.etcd_summary());
            let met = match row.met() {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "-",
            };
            rows.push(vec![
                row.nodes.to_string(),
                row.name.clone(),
                row.ours_how.clone(),
                ours_p50,
                ours_p99,
                if row.etcd_how.is_empty() { "-".to_owned() } else { row.etcd_how.clone() },
                etcd_p50,
                etcd_p99,
                row.ratio().map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}x")),
                row.goal.map_or_else(|| "-".to_owned(), Goal::describe),
                met.to_owned(),
            ]);
        }
        let mut widths = vec![0usize; header.len()];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        for row in &rows {
            let mut line = String::new();
            for (index, (cell, width)) in row.iter().zip(&widths).enumerate() {
                let padding = " ".repeat(width - cell.chars().count());
                // Words left-aligned, numbers right-aligned.
                if matches!(index, 1 | 2 | 5 | 9 | 10) {
                    let _ = write!(line, "{cell}{padding}  ");
                } else {
                    let _ = write!(line, "{padding}{cell}  ");
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    /// How many goals were met, of how many set.
    pub fn goals_met(&self) -> (usize, usize) {
        let results: Vec<bool> = self.rows.iter().filter_map(Row::met).collect();
        (results.iter().filter(|met| **met).count(), results.len())
    }

    /// Every row as JSON.
    pub fn to_json(&self) -> Value {
        Value::Array(self.rows.iter().map(Row::to_json).collect())
    }
}

/// The fixed fields of a row, given when it is first recorded.
#[derive(Debug, Clone)]
pub struct RowInfo {
    /// How Konorkestra was driven.
    pub ours_how: String,
    /// How etcd was driven; empty when it has no counterpart.
    pub etcd_how: String,
    /// The headline unit.
    pub unit: Unit,
    /// The goal.
    pub goal: Option<Goal>,
}

fn per_second(operations: u64, elapsed: Duration) -> f64 {
    operations as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency_of(micros: &[u64]) -> Measured {
        let mut latency = Latency::new().unwrap();
        for value in micros {
            latency.record(Duration::from_micros(*value));
        }
        Measured::Latency(latency)
    }

    fn info(goal: Option<Goal>) -> RowInfo {
        RowInfo { ours_how: "ours".into(), etcd_how: "theirs".into(), unit: Unit::Micros, goal }
    }

    #[test]
    fn the_ratio_compares_medians_over_rounds() {
        let mut comparison = Comparison::default();
        // Round p50s: ours 100, 300, 200 (median 200); etcd 400, 1000, 500 (median 500).
        for (ours, etcd) in [(100, 400), (300, 1000), (200, 500)] {
            comparison.record(3, "x", System::Konor, latency_of(&[ours]), &info(Some(Goal::AtMost(0.5))));
            comparison.record(3, "x", System::Etcd, latency_of(&[etcd]), &info(None));
        }
        let row = &comparison.rows[0];
        assert_eq!(comparison.rows.len(), 1, "rounds of one measure share a row");
        let ratio = row.ratio().unwrap();
        assert!((ratio - 0.4).abs() < 0.01, "ratio {ratio}");
        assert_eq!(row.met(), Some(true));
        assert_eq!(comparison.goals_met(), (1, 1));
    }

    #[test]
    fn goals_bound_the_ratio_from_the_right_side() {
        assert!(Goal::AtLeast(2.0).holds(2.5));
        assert!(!Goal::AtLeast(2.0).holds(1.9));
        assert!(Goal::AtMost(1.2).holds(1.2));
        assert!(!Goal::AtMost(0.15).holds(0.2));
    }

    #[test]
    fn a_row_without_etcd_has_no_ratio() {
        let mut comparison = Comparison::default();
        comparison.record(3, "cached", System::Konor, latency_of(&[1]), &info(Some(Goal::AtMost(1.0))));
        assert_eq!(comparison.rows[0].ratio(), None);
        assert_eq!(comparison.rows[0].met(), None);
        assert!(comparison.table().contains("cached"));
    }

    #[test]
    fn medians_of_even_and_odd_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
