//! `konorctl audit list|export|verify`: reads the audit chains in a node's data dir
//! (`audit/files.rs`), which hold every node's records as that node received them.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::cli::{AuditCommand, OutputFormat};
use super::exit::Exit;
use super::table::format_utc;
use crate::audit::chain::{AuditRecord, Line, verify};
use crate::audit::files::{AUDIT_DIR, read_dir};
use konor_sdk::protocol::AuditRow;

/// `audit list --data-dir`: the answer the node would give, read from `data_dir`'s files.
pub fn list_local(data_dir: &Path, request: &konor_sdk::protocol::Request) -> konor_sdk::protocol::Response {
    use konor_sdk::protocol::{ErrorCode, Request, Response};
    let Request::Audit { since_ms, group, node } = request else {
        return Response::Error { code: ErrorCode::BadRequest, message: "not an audit query".to_owned() };
    };
    let query = crate::audit::Query { since_ms: *since_ms, group: group.clone(), node: node.clone() };
    let dir = data_dir.join(AUDIT_DIR);
    match crate::audit::files::query(&dir, &query, crate::audit::AUDIT_ANSWER_RECORDS_MAX, &|| false) {
        Ok((records, truncated)) => {
            Response::Audit { records: records.into_iter().map(crate::audit::row_of).collect(), truncated }
        }
        Err(error) => {
            Response::Error { code: ErrorCode::Internal, message: format!("cannot read the audit log: {error}") }
        }
    }
}

/// Runs an audit command.
pub fn run(command: AuditCommand, output: OutputFormat) -> anyhow::Result<Exit> {
    match command {
        AuditCommand::List { .. } => anyhow::bail!("audit list is answered by the caller (list_local or the node)"),
        AuditCommand::Export { data_dir, .. } => {
            let mut text = String::new();
            for record in records(&data_dir)? {
                text.push_str(&serde_json::to_string(&record)?);
                text.push('\n');
            }
            print(&text)
        }
        AuditCommand::Verify { data_dir } => {
            let chains = chains(&data_dir)?;
            let own = own_node(&data_dir);
            let mut report = Report::default();
            for (node, lines) in &chains {
                let records = lines.iter().filter(|line| matches!(line, Line::Record(_))).count();
                let gaps: Vec<String> = lines
                    .iter()
                    .filter_map(|line| match line {
                        Line::Gap { from, to } => Some(format!("{from}-{to}")),
                        Line::Record(_) => None,
                    })
                    .collect();
                let first = lines.iter().find_map(|line| match line {
                    Line::Record(record) => Some(record.seq),
                    Line::Gap { .. } => None,
                });
                let mut breaks: Vec<String> = verify(node, lines)
                    .into_iter()
                    .map(|found| format!("audit/{node}.jsonl line {}: {}", found.line, found.what))
                    .collect();
                // A node's own chain has no gaps: it writes every record itself.
                if own.as_deref() == Some(node.as_str()) && !gaps.is_empty() {
                    breaks.push(format!(
                        "audit/{node}.jsonl: this node's own chain claims records it never received: {}",
                        gaps.join(", ")
                    ));
                }
                report.chains.push(ChainReport { node: node.clone(), records, starts_at: first, missed: gaps, breaks });
            }
            let broken = report.chains.iter().any(|chain| !chain.breaks.is_empty());
            match output {
                OutputFormat::Json => print(&format!("{}\n", serde_json::to_string_pretty(&report)?))?,
                OutputFormat::Table => print(&report.text())?,
            };
            Ok(if broken { Exit::File } else { Exit::Ok })
        }
    }
}

/// What `verify` found.
#[derive(Debug, Default, Serialize)]
struct Report {
    chains: Vec<ChainReport>,
}

#[derive(Debug, Serialize)]
struct ChainReport {
    node: String,
    records: usize,
    /// The first place held: above 1 when retention dropped older records.
    starts_at: Option<u64>,
    /// Places a copy never received (gossip carried a larger burst than it holds).
    missed: Vec<String>,
    breaks: Vec<String>,
}

impl Report {
    fn text(&self) -> String {
        let mut text = String::new();
        for chain in &self.chains {
            let state = if chain.breaks.is_empty() { "intact" } else { "BROKEN" };
            text.push_str(&format!("{}: {state}, {} records", chain.node, chain.records));
            if let Some(first) = chain.starts_at.filter(|first| *first > 1) {
                text.push_str(&format!(", from record {first} (older ones dropped by retention)"));
            }
            if !chain.missed.is_empty() {
                text.push_str(&format!(", never received here: {}", chain.missed.join(", ")));
            }
            text.push('\n');
            for found in &chain.breaks {
                text.push_str(&format!("  {found}\n"));
            }
        }
        if self.chains.is_empty() {
            text.push_str("no audit records yet\n");
        }
        text
    }
}

/// The node whose data dir this is (its `node.json`).
fn own_node(data_dir: &Path) -> Option<String> {
    let text = std::fs::read(data_dir.join("node.json")).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
    value["node_id"].as_str().map(str::to_owned)
}

fn chains(data_dir: &Path) -> anyhow::Result<std::collections::BTreeMap<String, Vec<Line>>> {
    let dir = data_dir.join(AUDIT_DIR);
    anyhow::ensure!(data_dir.is_dir(), "{} is not a data dir", data_dir.display());
    read_dir(&dir)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read the audit log in {}", dir.display()))
}

/// Every record of every chain, by time.
fn records(data_dir: &Path) -> anyhow::Result<Vec<AuditRecord>> {
    let mut records: Vec<AuditRecord> = chains(data_dir)?
        .into_values()
        .flatten()
        .filter_map(|line| match line {
            Line::Record(record) => Some(*record),
            Line::Gap { .. } => None,
        })
        .collect();
    records.sort_by(|a, b| (a.at_ms, &a.node, a.seq).cmp(&(b.at_ms, &b.node, b.seq)));
    Ok(records)
}

/// Audit rows as a table.
pub fn rows_table(records: &[AuditRow]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|record| {
            vec![
                format_utc(record.at_ms),
                record.node.clone(),
                record.who.clone(),
                record.from.clone(),
                record.action.clone(),
                record.group.clone().unwrap_or_else(|| "-".to_owned()),
                record.outcome.clone(),
                record.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no audit records\n".to_owned();
    }
    let mut table = super::table::Table::new(&["TIME", "NODE", "WHO", "FROM", "ACTION", "GROUP", "OUTCOME", "DETAIL"]);
    for row in rows {
        table.row(row.into_iter().map(|text| super::table::cell(&text)).collect());
    }
    table.render()
}

fn print(text: &str) -> anyhow::Result<Exit> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(Exit::Ok),
        other => other.map(|()| Exit::Ok).context("cannot write to stdout"),
    }
}
