//! Who saw what, mesh-wide (SPEC F16, F28): every local process's last apply report per group,
//! and the reports of processes that went away, kept as history. Pure: the daemon feeds it
//! reports and disconnects, publishes [`Reports::gossip_value`] under the gossip key
//! `rep:<group>` so every node can show every node's processes, and saves
//! [`Reports::saved`] beside the group's file so the history outlives a restart.
//!
//! Bounds (each with its reason in the constant's doc): history rows per group, the gossip
//! value's bytes, and the error text a gossiped row carries.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use konor_sdk::protocol::{ApplyResult, ProcessRow};

/// The gossip key prefix of a node's reports for a group (`rep:<group>`).
pub const REPORT_PREFIX: &str = "rep:";

/// Rows of processes that went away, kept per group (newest kept): enough to see the last
/// restarts and crashes of a fleet's processes on one node, small enough to gossip and save.
pub const REPORT_HISTORY_MAX: usize = 32;

/// Largest gossip value of one node's reports for one group: chitchat carries every key of a
/// node in its deltas, and a few hundred nodes each with a few groups must stay well within the
/// datagrams a gossip round sends (FACTS). Rows that do not fit are left out, oldest first.
pub const REPORT_GOSSIP_BYTES_MAX: usize = 4 * 1024;

/// Longest error text a gossiped row carries (the node that holds the report keeps it whole,
/// up to the socket's limit): a headline, not a stack trace.
pub const REPORT_GOSSIP_MESSAGE_BYTES_MAX: usize = 160;

/// Largest saved reports file of one group read back: [`REPORT_HISTORY_MAX`] rows at the
/// socket's limits (1 KiB message, 256-byte process name, 128-byte version) are about 50 KB; a
/// larger file is not ours.
pub const REPORT_FILE_BYTES_MAX: usize = 256 * 1024;

/// One group's reports: the live processes by (connection, pid), and the history.
#[derive(Debug, Default)]
struct GroupReports {
    live: BTreeMap<(u64, u32), ProcessRow>,
    gone: VecDeque<ProcessRow>,
}

/// Every group's reports on this node.
#[derive(Debug, Default)]
pub struct Reports {
    groups: BTreeMap<String, GroupReports>,
    /// Groups whose gossip value is behind.
    unpublished: BTreeSet<String>,
    /// Groups whose saved file is behind.
    unsaved: BTreeSet<String>,
}

impl Reports {
    /// A process's report (its connection's row for `group` replaced).
    pub fn report(&mut self, group: &str, connection: u64, row: ProcessRow) {
        let reports = self.groups.entry(group.to_owned()).or_default();
        reports.live.insert((connection, row.pid), row);
        self.changed(group);
    }

    /// A connection ended: its rows become history, stamped `now_ms`.
    pub fn disconnected(&mut self, connection: u64, now_ms: u64) {
        for (group, reports) in &mut self.groups {
            let ended: Vec<(u64, u32)> = reports.live.keys().filter(|(c, _)| *c == connection).copied().collect();
            for key in ended {
                if let Some(mut row) = reports.live.remove(&key) {
                    row.gone_ms = Some(now_ms);
                    push_gone(&mut reports.gone, row);
                    self.unpublished.insert(group.clone());
                    self.unsaved.insert(group.clone());
                }
            }
        }
    }

    /// This node no longer holds `group`: its reports go (they were about the copy it left).
    pub fn forget_group(&mut self, group: &str) {
        if self.groups.remove(group).is_some() {
            self.changed(group);
        }
    }

    /// The live rows, then the history (newest first).
    pub fn rows(&self, group: &str) -> Vec<ProcessRow> {
        let Some(reports) = self.groups.get(group) else { return Vec::new() };
        reports.live.values().cloned().chain(reports.gone.iter().rev().cloned()).collect()
    }

    fn changed(&mut self, group: &str) {
        self.unpublished.insert(group.to_owned());
        self.unsaved.insert(group.to_owned());
    }

    /// The groups whose gossip value changed since the last call.
    pub fn take_unpublished(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unpublished).into_iter().collect()
    }

    /// The groups whose saved file is behind (a failed save gives them back with
    /// [`Reports::unsaved_again`]).
    pub fn take_unsaved(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unsaved).into_iter().collect()
    }

    /// A save of `group` failed: it is saved again next time.
    pub fn unsaved_again(&mut self, group: &str) {
        self.unsaved.insert(group.to_owned());
    }

    /// The gossip value of `group`: a JSON array of rows, live first then history, each newest
    /// first, error texts cut to [`REPORT_GOSSIP_MESSAGE_BYTES_MAX`], at most
    /// [`REPORT_GOSSIP_BYTES_MAX`] bytes (rows that do not fit are left out). `[]` for a group
    /// with no report (or one this node left).
    pub fn gossip_value(&self, group: &str) -> String {
        let Some(reports) = self.groups.get(group) else { return "[]".to_owned() };
        let mut live: Vec<&ProcessRow> = reports.live.values().collect();
        live.sort_by_key(|row| std::cmp::Reverse(row.time_ms));
        let mut text = String::from("[");
        for row in live.into_iter().chain(reports.gone.iter().rev()) {
            let mut row = row.clone();
            row.node = String::new();
            if let ApplyResult::Error { message } = &mut row.result {
                *message = cut(message, REPORT_GOSSIP_MESSAGE_BYTES_MAX);
            }
            let Ok(encoded) = serde_json::to_string(&row) else { continue };
            // One byte for the comma, one for the closing bracket.
            if text.len() + encoded.len() + 2 > REPORT_GOSSIP_BYTES_MAX {
                break;
            }
            if text.len() > 1 {
                text.push(',');
            }
            text.push_str(&encoded);
        }
        text.push(']');
        text
    }

    /// What to save of `group`: the newest [`REPORT_HISTORY_MAX`] rows, live ones first and
    /// included (after a restart they are history: their connections ended with the
    /// daemon), newest first; what a restore keeps, at most about 50 KB.
    pub fn saved(&self, group: &str) -> Vec<u8> {
        let mut rows = self.rows(group);
        // Live rows first (the newest of all), then history by when it went.
        rows.sort_by_key(|row| std::cmp::Reverse(row.gone_ms.unwrap_or(u64::MAX)));
        rows.truncate(REPORT_HISTORY_MAX);
        serde_json::to_vec(&rows).unwrap_or_default()
    }

    /// Takes back what a previous run saved of `group`: every row becomes history (a live row
    /// is stamped gone at `now_ms`, when this node found its daemon gone), to be published
    /// again. Bad bytes change nothing.
    pub fn restore(&mut self, group: &str, bytes: &[u8], now_ms: u64) -> Result<usize, String> {
        if bytes.len() > REPORT_FILE_BYTES_MAX {
            return Err(format!("{} bytes, more than a reports file holds", bytes.len()));
        }
        let mut rows: Vec<ProcessRow> = serde_json::from_slice(bytes).map_err(|error| error.to_string())?;
        // Saved newest first; pushed oldest first so the newest stay.
        rows.reverse();
        let reports = self.groups.entry(group.to_owned()).or_default();
        let count = rows.len();
        for mut row in rows {
            row.gone_ms = Some(row.gone_ms.unwrap_or(now_ms));
            push_gone(&mut reports.gone, row);
        }
        // Told to the mesh again; the file already holds it.
        self.unpublished.insert(group.to_owned());
        Ok(count)
    }
}

/// The rows a peer gossiped for a group, each tagged with the peer's id (whatever the value
/// says). A value that is too large or not an array of rows gives none.
pub fn parse_gossip(node: &str, value: &str) -> Vec<ProcessRow> {
    if value.len() > REPORT_GOSSIP_BYTES_MAX {
        return Vec::new();
    }
    let Ok(rows) = serde_json::from_str::<Vec<ProcessRow>>(value) else { return Vec::new() };
    rows.into_iter()
        .map(|mut row| {
            row.node = node.to_owned();
            row
        })
        .collect()
}

fn push_gone(gone: &mut VecDeque<ProcessRow>, row: ProcessRow) {
    gone.push_back(row);
    while gone.len() > REPORT_HISTORY_MAX {
        gone.pop_front();
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked with "..." when cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: u32, time_ms: u64, result: ApplyResult) -> ProcessRow {
        ProcessRow {
            node: "n1".into(),
            pid,
            process: format!("app-{pid}"),
            version: "v3".into(),
            revision: 3,
            result,
            time_ms,
            gone_ms: None,
        }
    }

    #[test]
    fn a_process_that_goes_away_becomes_history_and_the_newest_history_is_kept() {
        let mut reports = Reports::default();
        reports.report("app", 1, row(10, 100, ApplyResult::Ok));
        reports.report("app", 2, row(20, 200, ApplyResult::Ok));
        assert_eq!(reports.take_unpublished(), ["app"]);
        assert_eq!(reports.take_unsaved(), ["app"]);
        reports.disconnected(1, 500);
        assert_eq!(reports.take_unpublished(), ["app"]);
        reports.disconnected(1, 600);
        assert!(reports.take_unpublished().is_empty(), "nothing changed");
        let rows = reports.rows("app");
        assert_eq!(rows.iter().map(|r| (r.pid, r.gone_ms)).collect::<Vec<_>>(), [(20, None), (10, Some(500))]);
        for n in 0..(REPORT_HISTORY_MAX as u64 + 5) {
            reports.report("app", 100 + n, row(1000 + n as u32, 1000 + n, ApplyResult::Ok));
            reports.disconnected(100 + n, 2000 + n);
        }
        let gone: Vec<u32> = reports.rows("app").iter().filter(|r| r.gone_ms.is_some()).map(|r| r.pid).collect();
        assert_eq!(gone.len(), REPORT_HISTORY_MAX);
        assert_eq!(gone[0], 1000 + REPORT_HISTORY_MAX as u32 + 4, "newest first");
        assert!(!gone.contains(&10), "the oldest went first");
    }

    #[test]
    fn the_gossip_value_is_bounded_and_reads_back_tagged_with_the_sender() {
        let mut reports = Reports::default();
        let long = "e".repeat(5_000);
        for pid in 0..200 {
            reports.report(
                "app",
                u64::from(pid),
                row(pid, u64::from(pid), ApplyResult::Error { message: long.clone() }),
            );
        }
        let value = reports.gossip_value("app");
        assert!(value.len() <= REPORT_GOSSIP_BYTES_MAX, "{} bytes", value.len());
        let rows = parse_gossip("n7", &value);
        assert!(!rows.is_empty() && rows.len() < 200);
        assert!(rows.iter().all(|r| r.node == "n7"));
        assert_eq!(rows[0].pid, 199, "the newest report first");
        let ApplyResult::Error { message } = &rows[0].result else { panic!("{:?}", rows[0]) };
        assert!(message.len() <= REPORT_GOSSIP_MESSAGE_BYTES_MAX + 3 && message.ends_with("..."));
        assert_eq!(reports.gossip_value("other"), "[]");
        for garbage in ["", "{", "[1]", &"[".repeat(10_000), &format!("[{}]", "x".repeat(REPORT_GOSSIP_BYTES_MAX))] {
            assert!(parse_gossip("n7", garbage).is_empty(), "{garbage:.20}");
        }
    }

    #[test]
    fn saved_reports_come_back_as_history_after_a_restart() {
        let mut reports = Reports::default();
        reports.report("app", 1, row(10, 100, ApplyResult::Ok));
        reports.report("app", 2, row(20, 200, ApplyResult::Error { message: "bad".into() }));
        reports.disconnected(2, 300);
        let saved = reports.saved("app");
        let mut after = Reports::default();
        assert_eq!(after.restore("app", &saved, 900), Ok(2));
        let rows = after.rows("app");
        assert_eq!(rows.iter().map(|r| (r.pid, r.gone_ms)).collect::<Vec<_>>(), [(10, Some(900)), (20, Some(300))]);
        assert!(after.restore("app", b"not json", 900).is_err());
        assert_eq!(after.rows("app").len(), 2, "bad bytes change nothing");
        reports.forget_group("app");
        assert!(reports.rows("app").is_empty());
    }
}
