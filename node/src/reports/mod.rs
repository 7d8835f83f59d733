//! Who saw what, mesh-wide (SPEC F16, F28): every local process's last apply report per group,
//! and the reports of processes that went away, kept as history. Pure: the daemon feeds it
//! reports and disconnects, publishes [`Reports::gossip_value`] under the gossip key
//! `rep:<group>` so every node can show every node's processes, and saves
//! [`Reports::saved`] beside the group's file so the history outlives a restart.
//!
//! Bounds (each with its reason in the constant's doc): history rows per group, the gossip
//! value's bytes, and the error text a gossiped row carries.

pub mod release_report;

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
    /// In a gated group, the release that serves this node (its id), as last followed.
    serving: Option<String>,
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
    /// A process's report (its connection's row for `group` replaced), made at `row.time_ms`.
    /// The same version, release and result reported again keeps the first report's time (when
    /// the process applied it); a report of another release keeps the row of the release it
    /// leaves as history, marked `superseded`, so the release report still has its outcome.
    pub fn report(&mut self, group: &str, connection: u64, mut row: ProcessRow) {
        let reports = self.groups.entry(group.to_owned()).or_default();
        if let Some(old) = reports.live.remove(&(connection, row.pid)) {
            let same = old.version == row.version && old.release == row.release && old.result == row.result;
            if same {
                row.time_ms = old.time_ms;
            }
            if old.version == row.version && old.release == row.release {
                // The rate it reported is about what it still runs.
                row.error_rate = row.error_rate.or(old.error_rate);
            } else if old.release.is_some() && old.release != row.release {
                let mut old = old;
                old.gone_ms = Some(row.time_ms);
                old.superseded = true;
                push_gone(&mut reports.gone, old);
            }
        }
        reports.live.insert((connection, row.pid), row);
        self.changed(group);
    }

    /// This node now serves `group` through `release` (a gated group; `None` before any
    /// release reaches it), whose target `is_target` recognizes by label. A live process that
    /// runs the target under another release (a release of the version it already served: its
    /// apps are told nothing, as their settings do not change) runs it under this one from
    /// `now_ms`: its row is stamped again, and the row it had stays as superseded history. Also
    /// orders the gossip (rows that decide whether this node is done go first).
    pub fn follow_release(
        &mut self,
        group: &str,
        release: Option<&str>,
        is_target: impl Fn(&str) -> bool,
        now_ms: u64,
    ) {
        let Some(reports) = self.groups.get_mut(group) else { return };
        let mut changed = reports.serving.as_deref() != release;
        reports.serving = release.map(str::to_owned);
        if let Some(release) = release {
            for row in reports.live.values_mut() {
                if row.release.as_deref() == Some(release) || !is_target(&row.version) {
                    continue;
                }
                let mut old = row.clone();
                old.gone_ms = Some(now_ms);
                old.superseded = true;
                push_gone(&mut reports.gone, old);
                row.release = Some(release.to_owned());
                row.time_ms = now_ms;
                // A rate measured before this release is not about it.
                row.error_rate = None;
                changed = true;
            }
        }
        if changed {
            self.changed(group);
        }
    }

    /// A process's error rate while it runs what it last reported applying (SPEC F15), on its
    /// connection's row for `group`; false when it reported nothing yet.
    pub fn error_rate(&mut self, group: &str, connection: u64, pid: u32, rate: f64) -> bool {
        let Some(row) = self.groups.get_mut(group).and_then(|reports| reports.live.get_mut(&(connection, pid))) else {
            return false;
        };
        row.error_rate = Some(rate);
        self.changed(group);
        true
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

    /// The gossip value of `group`: a JSON array of rows, live first (those not settled on the
    /// release this node serves first) then history, each newest first, error texts cut to [`REPORT_GOSSIP_MESSAGE_BYTES_MAX`], at most
    /// [`REPORT_GOSSIP_BYTES_MAX`] bytes (rows that do not fit are left out). `[]` for a group
    /// with no report (or one this node left).
    pub fn gossip_value(&self, group: &str) -> String {
        let Some(reports) = self.groups.get(group) else { return "[]".to_owned() };
        let mut live: Vec<&ProcessRow> = reports.live.values().collect();
        // The rows that keep this node from being done with its release (a failure, a process
        // on another release) first, so a cut leaves out only rows that applied it.
        let settled = |row: &ProcessRow| {
            row.result == ApplyResult::Ok && (reports.serving.is_none() || row.release == reports.serving)
        };
        live.sort_by_key(|row| (settled(row), std::cmp::Reverse(row.time_ms)));
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

/// True when `label`, as a process reported it (its node's label: `v12`, or `v12-3fa9` where
/// that node knew two versions numbered 12), can name `version`.
pub fn names(label: &str, version: &konor_crdt::VersionId) -> bool {
    label.parse::<konor_crdt::VersionRef>().is_ok_and(|reference| reference.matches(version))
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
            release: None,
            superseded: false,
            error_rate: None,
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
    fn a_report_keeps_when_it_applied_and_a_new_release_keeps_the_old_outcome_as_history() {
        let mut reports = Reports::default();
        let of = |release: &str, version: &str, time_ms: u64, result: ApplyResult| ProcessRow {
            release: Some(release.to_owned()),
            version: version.to_owned(),
            ..row(10, time_ms, result)
        };
        reports.report("app", 1, of("r1", "v3", 100, ApplyResult::Ok));
        reports.report("app", 1, of("r1", "v3", 150, ApplyResult::Ok));
        assert_eq!(reports.rows("app")[0].time_ms, 100, "the same apply again keeps its first time");
        let failed = ApplyResult::Error { message: "no".into() };
        reports.report("app", 1, of("r2", "v4", 200, failed.clone()));
        reports.report("app", 1, of("r2", "v4", 250, failed));
        let rows = reports.rows("app");
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!((rows[0].release.as_deref(), rows[0].time_ms, rows[0].gone_ms), (Some("r2"), 200, None));
        assert_eq!((rows[1].release.as_deref(), rows[1].gone_ms, rows[1].superseded), (Some("r1"), Some(200), true));
        reports.report("app", 1, of("r2", "v4", 300, ApplyResult::Ok));
        let rows = reports.rows("app");
        assert_eq!(rows.len(), 2, "a new result of the same release replaces the row: {rows:?}");
        assert_eq!((rows[0].time_ms, &rows[0].result), (300, &ApplyResult::Ok));
        reports.report("other", 2, row(20, 100, ApplyResult::Ok));
        reports.report("other", 2, row(20, 200, ApplyResult::Ok));
        assert_eq!(reports.rows("other").len(), 1, "an immediate group's rows keep no superseded history");
    }

    #[test]
    fn a_re_release_of_the_served_version_restamps_live_rows_and_the_gossip_keeps_the_unsettled() {
        let mut reports = Reports::default();
        let of = |pid: u32, release: &str, version: &str| ProcessRow {
            release: Some(release.to_owned()),
            version: version.to_owned(),
            ..row(pid, 100, ApplyResult::Ok)
        };
        reports.report("app", 1, of(10, "r1", "v2"));
        reports.report("app", 2, of(20, "r1", "v1"));
        reports.follow_release("app", Some("r1"), |label| label == "v2", 150);
        reports.take_unpublished();
        reports.follow_release("app", Some("r1"), |label| label == "v2", 160);
        assert!(reports.take_unpublished().is_empty(), "nothing moved");
        reports.follow_release("app", Some("r2"), |label| label == "v2", 200);
        assert_eq!(reports.take_unpublished(), ["app"]);
        let rows = reports.rows("app");
        let live: Vec<(u32, Option<&str>, u64)> =
            rows.iter().filter(|r| r.gone_ms.is_none()).map(|r| (r.pid, r.release.as_deref(), r.time_ms)).collect();
        assert_eq!(live, [(10, Some("r2"), 200), (20, Some("r1"), 100)], "only the process on the target moves");
        let history: Vec<(u32, bool)> =
            rows.iter().filter(|r| r.gone_ms.is_some()).map(|r| (r.pid, r.superseded)).collect();
        assert_eq!(history, [(10, true)]);
        // Many settled processes and one behind: the cut keeps the one behind.
        for pid in 100..200 {
            reports.report(
                "app",
                u64::from(pid),
                ProcessRow { time_ms: 1_000 + u64::from(pid), ..of(pid, "r2", "v2") },
            );
        }
        let gossiped = parse_gossip("n1", &reports.gossip_value("app"));
        assert!(gossiped.len() < 100, "cut: {}", gossiped.len());
        assert_eq!(gossiped[0].pid, 20, "the process still on r1 goes first");
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
