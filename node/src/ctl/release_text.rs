//! Releases for people and for audits (SPEC F14, F16, F28): the release lines of `status`,
//! `release status` (desired against actual, wave by wave, with the apply success rate and the
//! time to consistency), the one-line progress `--wait` prints, and `release report`'s export,
//! one row per (release, node, process) as JSON lines or CSV. Pure.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use konor_sdk::protocol::{ApplyResult, ProcessRow, ReleaseNodeRow, ReleaseReport, ReleaseRow};
use serde::Serialize;

use crate::ctl::table::{Table, cell, format_age, format_utc, plural};

/// The headline of a release and the state of its wave, as `status` and `release status` show
/// them.
pub fn release_lines(current: &ReleaseRow, now_ms: u64) -> String {
    let mut text = String::new();
    let from = current.from.as_deref().map(|from| format!(" (from {})", cell(from))).unwrap_or_default();
    let _ = writeln!(
        text,
        "release: {} to {}{from}, strategy {}, by {}, {} ago: {}",
        cell(&current.label),
        cell(&current.to),
        cell(&current.strategy),
        cell(&current.author),
        format_age(now_ms.saturating_sub(current.time_ms)),
        cell(&current.message),
    );
    if !current.guards.is_empty() && current.aborted.is_none() {
        let _ = writeln!(text, "guards: {}", cell(&current.guards));
    }
    if let Some(reason) = &current.aborted {
        let _ = writeln!(text, "aborted: {}; every member serves what it served before", cell(reason));
    } else if let Some(wave) = current.wave {
        let percent = current.waves.get(wave.saturating_sub(1) as usize).copied().unwrap_or(100);
        let since = current.wave_since_ms.map(|at| now_ms.saturating_sub(at)).unwrap_or(0);
        let mut line = format!(
            "wave {wave} of {} ({percent}% of the matching members) for {}",
            current.waves.len(),
            format_age(since)
        );
        let last = wave as usize >= current.waves.len();
        match current.bake_ms {
            Some(bake) if !last && since >= bake => {
                line.push_str(&format!("; bake of {} done: the members promote it", format_age(bake)));
            }
            Some(bake) if !last => line.push_str(&format!("; bakes {} more", format_age(bake - since))),
            _ if !last => line.push_str("; `konorctl promote` moves it on"),
            _ => {}
        }
        let here = if current.here { "in the slice" } else { "not in the slice" };
        let _ = writeln!(text, "{line}; this node is {here}");
    }
    text
}

/// `release status`: one release, desired against actual.
pub fn report_text(report: &ReleaseReport, now_ms: u64) -> String {
    let mut text = release_lines(&report.release, now_ms);
    let _ = writeln!(text, "outcome: {}", progress_line(report));
    let waves: Vec<String> = wave_counts(report)
        .into_iter()
        .map(|(wave, percent, nodes, done)| format!("wave {wave} ({percent}%): {nodes} targeted, {done} done"))
        .collect();
    if !waves.is_empty() {
        let outside = report.nodes.iter().filter(|node| node.wave.is_none()).count();
        let _ = writeln!(text, "{}; outside every wave: {}", waves.join("; "), plural(outside, "node", "nodes"));
    }
    let mut table = Table::new(&["NODE", "WAVE", "TARGETED", "SERVES", "PROCESSES", "STATE"]);
    for node in &report.nodes {
        let processes = match (node.applied, node.failed) {
            (0, 0) => "-".to_owned(),
            (ok, 0) => format!("{ok} ok"),
            (ok, failed) => format!("{ok} ok, {failed} failed"),
        };
        table.row(vec![
            cell(&node.node),
            node.wave.map_or_else(|| "-".to_owned(), |wave| wave.to_string()),
            if node.targeted { "yes" } else { "no" }.to_owned(),
            if node.serving.is_empty() { "?".to_owned() } else { cell(&node.serving) },
            processes,
            node_state(node, report).to_owned(),
        ]);
    }
    text.push_str(&table.render());
    // Each process's newest report of the release, when it is a failure.
    let mut newest: BTreeMap<(&str, u32), &ProcessRow> = BTreeMap::new();
    for row in &report.applies {
        let entry = newest.entry((row.node.as_str(), row.pid)).or_insert(row);
        if row.time_ms >= entry.time_ms {
            *entry = row;
        }
    }
    for row in newest.values() {
        let ApplyResult::Error { message } = &row.result else { continue };
        let _ = writeln!(
            text,
            "failed: {} (pid {}) on {}: {}",
            cell(&row.process),
            row.pid,
            cell(&row.node),
            cell(message)
        );
    }
    text
}

/// One line: the outcome, the nodes done, the processes' results, the time to consistency.
pub fn progress_line(report: &ReleaseReport) -> String {
    let targeted: Vec<&ReleaseNodeRow> = report.nodes.iter().filter(|node| node.targeted).collect();
    let done = targeted.iter().filter(|node| node.done).count();
    let mut line = report.outcome.clone();
    if let (Some(wave), false) = (report.release.wave, report.release.waves.is_empty()) {
        let _ = write!(line, " (wave {wave} of {})", report.release.waves.len());
    }
    let _ = write!(line, "; {done} of {} done", plural(targeted.len(), "targeted node", "targeted nodes"));
    let _ = write!(line, "; processes: {} applied, {} failed", report.processes_ok, report.processes_failed);
    if let Some(rate) = report.success_rate {
        let _ = write!(line, " ({:.0}% success)", rate * 100.0);
    }
    match report.time_to_consistency_ms {
        Some(ms) => {
            let _ = write!(line, "; time to consistency {}", format_age(ms));
        }
        None if report.outcome == "in progress" => line.push_str("; not consistent yet"),
        None => {}
    }
    line
}

/// Per wave (counted from 1): its percentage, the nodes it holds, and how many of those are
/// done. Empty for a release to every member.
fn wave_counts(report: &ReleaseReport) -> Vec<(u32, u8, usize, usize)> {
    let Some(current) = report.release.wave else { return Vec::new() };
    (1..=current)
        .map(|wave| {
            let percent = report.release.waves.get(wave as usize - 1).copied().unwrap_or(100);
            let held: Vec<&ReleaseNodeRow> =
                report.nodes.iter().filter(|node| node.wave.is_some_and(|first| first <= wave)).collect();
            (wave, percent, held.len(), held.iter().filter(|node| node.done).count())
        })
        .collect()
}

fn node_state(node: &ReleaseNodeRow, report: &ReleaseReport) -> &'static str {
    match (node.targeted, node.done, node.failed) {
        (_, _, failed) if failed > 0 => "failed",
        (false, _, _) => "outside",
        (true, true, _) => "done",
        (true, false, _) if report.outcome == "aborted" => "rolled back",
        (true, false, _) if !node.live => "pending (not live)",
        (true, false, _) => "pending",
    }
}

/// One row of `release report`'s export: a (release, node, process) with both times and the
/// result; a node with no process reporting the release has one row with the process fields
/// empty. Every row repeats its release's outcome, success rate and time to consistency, so
/// each line stands alone in an audit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportRow {
    /// The release's version label.
    pub release: String,
    /// Its id as the document stores it.
    pub release_id: String,
    /// The version released.
    pub to: String,
    /// Its strategy (`all`, `canary 10%,100% where region=eu`).
    pub strategy: String,
    /// Who made it.
    pub author: String,
    /// When (RFC 3339, UTC).
    pub released_at: String,
    /// `in progress`, `complete`, `aborted`, `superseded`.
    pub outcome: String,
    /// Why it was aborted.
    pub aborted: String,
    /// Its apply success rate, 0 to 1 (empty before any report).
    pub success_rate: Option<f64>,
    /// Its time to consistency in milliseconds (empty until reached).
    pub time_to_consistency_ms: Option<u64>,
    /// The node.
    pub node: String,
    /// The first wave holding the node (empty: none).
    pub wave: Option<u32>,
    /// The release was the node's desired state.
    pub targeted: bool,
    /// The version the node serves now.
    pub serving: String,
    /// The process (empty for a node with none reporting).
    pub process: String,
    /// Its pid.
    pub pid: Option<u32>,
    /// The version it applied.
    pub version: String,
    /// `ok` or `error`.
    pub result: String,
    /// The error its reload returned.
    pub error: String,
    /// When it applied or refused the release (RFC 3339, UTC).
    pub applied_at: String,
    /// Milliseconds from the release to that report.
    pub after_release_ms: Option<u64>,
    /// `live`, `gone` (the process ended) or `superseded` (it went on to a later release).
    pub state: String,
}

/// The export rows of `reports`, newest release first, nodes in order, processes by pid.
pub fn export_rows(reports: &[ReleaseReport]) -> Vec<ExportRow> {
    let mut rows = Vec::new();
    for report in reports {
        let release = &report.release;
        let base = |node: &ReleaseNodeRow| ExportRow {
            release: release.label.clone(),
            release_id: release.id.clone(),
            to: release.to.clone(),
            strategy: release.strategy.clone(),
            author: release.author.clone(),
            released_at: format_utc(release.time_ms),
            outcome: report.outcome.clone(),
            aborted: release.aborted.clone().unwrap_or_default(),
            success_rate: report.success_rate,
            time_to_consistency_ms: report.time_to_consistency_ms,
            node: node.node.clone(),
            wave: node.wave,
            targeted: node.targeted,
            serving: node.serving.clone(),
            process: String::new(),
            pid: None,
            version: String::new(),
            result: String::new(),
            error: String::new(),
            applied_at: String::new(),
            after_release_ms: None,
            state: String::new(),
        };
        for node in &report.nodes {
            let mut applies: Vec<&ProcessRow> = report.applies.iter().filter(|row| row.node == node.node).collect();
            applies.sort_by_key(|row| (row.pid, row.time_ms));
            if applies.is_empty() {
                rows.push(base(node));
            }
            for apply in applies {
                let (result, error) = match &apply.result {
                    ApplyResult::Ok => ("ok", String::new()),
                    ApplyResult::Error { message } => ("error", message.clone()),
                };
                let state = match (apply.gone_ms, apply.superseded) {
                    (None, _) => "live",
                    (Some(_), true) => "superseded",
                    (Some(_), false) => "gone",
                };
                rows.push(ExportRow {
                    process: apply.process.clone(),
                    pid: Some(apply.pid),
                    version: apply.version.clone(),
                    result: result.to_owned(),
                    error,
                    applied_at: format_utc(apply.time_ms),
                    after_release_ms: Some(apply.time_ms.saturating_sub(release.time_ms)),
                    state: state.to_owned(),
                    ..base(node)
                });
            }
        }
    }
    rows
}

/// The export as JSON lines: one object per row.
pub fn jsonl(rows: &[ExportRow]) -> String {
    rows.iter().filter_map(|row| serde_json::to_string(row).ok()).map(|line| line + "\n").collect()
}

/// The export as CSV (RFC 4180) with a header row. A field that a spreadsheet would run as a
/// formula (starting with `=`, `+`, `-`, `@`, tab or carriage return) is prefixed with `'`:
/// error texts and messages come from applications and operators, and an audit file is opened
/// in spreadsheets.
pub fn csv(rows: &[ExportRow]) -> String {
    let Ok(serde_json::Value::Array(values)) = serde_json::to_value(rows) else { return String::new() };
    let header = [
        "release",
        "release_id",
        "to",
        "strategy",
        "author",
        "released_at",
        "outcome",
        "aborted",
        "success_rate",
        "time_to_consistency_ms",
        "node",
        "wave",
        "targeted",
        "serving",
        "process",
        "pid",
        "version",
        "result",
        "error",
        "applied_at",
        "after_release_ms",
        "state",
    ];
    let mut text = header.join(",") + "\r\n";
    for value in values {
        let fields: Vec<String> = header
            .iter()
            .map(|name| match value.get(*name) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(text)) => csv_field(text),
                Some(other) => other.to_string(),
            })
            .collect();
        text.push_str(&fields.join(","));
        text.push_str("\r\n");
    }
    text
}

fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{text}") } else { text.to_owned() };
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ReleaseReport {
        let release = ReleaseRow {
            label: "v7".into(),
            id: "ff.ab".into(),
            to: "v6".into(),
            from: Some("v5".into()),
            strategy: "canary 50%,100%".into(),
            waves: vec![50, 100],
            wave: Some(1),
            bake_ms: None,
            wave_since_ms: Some(1_000),
            aborted: Some("app (pid 7) on n2: =HYPERLINK(\"x\")".into()),
            guards: "abort on the first failed apply".into(),
            here: false,
            author: "alice".into(),
            time_ms: 1_000,
            message: "release v6".into(),
        };
        let node = |name: &str, wave: Option<u32>, failed: u32| ReleaseNodeRow {
            node: name.into(),
            wave,
            targeted: wave == Some(1),
            serving: "v5".into(),
            live: true,
            applied_ms: None,
            applied: 0,
            failed,
            done: false,
        };
        let apply = ProcessRow {
            node: "n2".into(),
            pid: 7,
            process: "app".into(),
            version: "v6".into(),
            revision: 9,
            result: ApplyResult::Error { message: "=HYPERLINK(\"x\"), bad".into() },
            time_ms: 1_250,
            gone_ms: Some(2_000),
            release: Some("ff.ab".into()),
            superseded: true,
            error_rate: None,
        };
        ReleaseReport {
            release,
            outcome: "aborted".into(),
            nodes: vec![node("n1", Some(2), 0), node("n2", Some(1), 1)],
            applies: vec![apply],
            processes_ok: 0,
            processes_failed: 1,
            success_rate: Some(0.0),
            time_to_consistency_ms: None,
        }
    }

    #[test]
    fn the_export_has_a_row_per_node_and_process_and_csv_quotes_and_defuses_formulas() {
        let rows = export_rows(&[report()]);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].node.as_str(), rows[0].pid), ("n1", None), "a node with no process: one row");
        assert_eq!((rows[1].pid, rows[1].result.as_str(), rows[1].after_release_ms), (Some(7), "error", Some(250)));
        assert_eq!(rows[1].state, "superseded");
        let csv = csv(&rows);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines.len(), 4, "header, two rows, and the end: {csv}");
        assert!(lines[0].starts_with("release,release_id,to,"));
        assert!(lines[2].contains(r#""'=HYPERLINK(""x""), bad""#), "{}", lines[2]);
        assert!(!csv.contains(",=HYPERLINK") && !csv.contains(",\"=HYPERLINK"), "{csv}");
        let jsonl = jsonl(&rows);
        assert_eq!(jsonl.lines().count(), 2);
        let back: serde_json::Value = serde_json::from_str(jsonl.lines().nth(1).unwrap()).unwrap();
        assert_eq!(back["error"], "=HYPERLINK(\"x\"), bad", "JSON keeps the text as it is");
    }

    #[test]
    fn status_names_the_outcome_the_waves_and_every_failure() {
        let text = report_text(&report(), 61_000);
        assert!(text.contains("outcome: aborted (wave 1 of 2); 0 of 1 targeted node done"), "{text}");
        assert!(text.contains("wave 1 (50%): 1 targeted, 0 done; outside every wave: 0 nodes"), "{text}");
        assert!(text.contains("failed: app (pid 7) on n2: =HYPERLINK"), "{text}");
        assert!(text.contains("n2    1     yes"), "{text}");
    }
}
