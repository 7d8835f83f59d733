//! How `konorctl health` and `konorctl alerts` print a node's health and alerts for people
//! (`--output json` prints the daemon's answer as it is).

use std::fmt::Write as _;

use konor_sdk::health::{Alert, Alerts, MeshHistory, NodeHealth, NodeHistory};

use crate::ctl::table::{Table, format_age};

/// A node's health: members, groups, degraded groups, queues, what it dropped, active alerts;
/// then the thresholds it fails, if any.
pub fn health_text(health: &NodeHealth, failures: &[String], now_ms: u64) -> String {
    let mut out = String::new();
    let verdict = if failures.is_empty() { "healthy" } else { "UNHEALTHY" };
    let _ = writeln!(out, "node {}: {verdict}, up {}", health.node_id, format_age(health.uptime_ms));
    let m = &health.members;
    let _ = writeln!(out, "members: {} live, {} unknown, {} dead, {} leaving", m.live, m.unknown, m.dead, m.leaving);
    let q = &health.queues;
    let _ = writeln!(
        out,
        "queues: {} calls, {} pending commands, {} blocked reads, {} watchers",
        q.calls, q.pending_commands, q.blocked_reads, q.watchers
    );
    let mesh = &health.mesh;
    if mesh.cap > 0 {
        let state = if mesh.at_cap { ": AT ITS CAP, new nodes are refused" } else { "" };
        let _ = writeln!(out, "mesh: {} of at most {} nodes{state}", mesh.nodes, mesh.cap);
    }
    let d = &health.dropped;
    let _ = writeln!(out, "dropped: {} peer messages, {} failed disk writes", d.peer_messages, d.persist_failures);
    for (group, error) in &health.degraded {
        let _ = writeln!(out, "degraded: the last write of group {group} to disk failed: {error}");
    }
    if !health.groups.is_empty() {
        let mut table = Table::new(&["GROUP", "MODE", "REVISION", "CHANGED", "MEMBERS", "STALE"]).right(&[2, 4]);
        for group in &health.groups {
            let stale = match (&group.stale, &group.stale_reason) {
                (true, Some(reason)) => format!("yes: {reason}"),
                (true, None) => "yes".to_owned(),
                (false, _) => "no".to_owned(),
            };
            table.row(vec![
                group.name.clone(),
                group.mode.clone(),
                group.revision.to_string(),
                format!("{} ago", format_age(group.since_change_ms)),
                group.members.to_string(),
                stale,
            ]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    if !health.alerts.is_empty() {
        out.push('\n');
        out.push_str(&alerts_table(&health.alerts, now_ms));
    }
    for failure in failures {
        let _ = writeln!(out, "fails: {failure}");
    }
    out
}

/// The alerts that hold, then those that cleared (newest first).
pub fn alerts_text(alerts: &Alerts, now_ms: u64) -> String {
    let mut out = String::new();
    if alerts.active.is_empty() {
        out.push_str("no alert holds\n");
    } else {
        out.push_str(&alerts_table(&alerts.active, now_ms));
    }
    if !alerts.history.is_empty() {
        let cleared: Vec<Alert> = alerts.history.iter().rev().cloned().collect();
        out.push_str("\ncleared:\n");
        out.push_str(&alerts_table(&cleared, now_ms));
    }
    out
}

/// Every node over the last hour, then the labels.
pub fn mesh_history_text(history: &MeshHistory) -> String {
    if history.nodes.is_empty() {
        return "no node seen yet\n".to_owned();
    }
    let window = format_age(history.window_ms);
    let mut out = format!("over the last {window}:\n");
    let mut table = Table::new(&["NODE", "STATE", "LIVE", "CHANGES", "HEARTBEAT MEAN", "HEARTBEAT MAX", "LABELS"])
        .right(&[2, 3, 4, 5]);
    for node in &history.nodes {
        let labels = node.labels.iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(",");
        table.row(vec![
            node.node.clone(),
            node.state.clone(),
            format!("{:.1}%", node.live_share * 100.0),
            node.transitions.to_string(),
            format_age(node.heartbeat_age_mean_ms),
            format_age(node.heartbeat_age_max_ms),
            labels,
        ]);
    }
    out.push_str(&table.render());
    if !history.labels.is_empty() {
        out.push_str("\nby label, now:\n");
        let mut table =
            Table::new(&["LABEL", "LIVE", "UNKNOWN", "DEAD", "LEAVING", "HEARTBEAT MEAN"]).right(&[1, 2, 3, 4, 5]);
        for label in &history.labels {
            table.row(vec![
                label.label.clone(),
                label.live.to_string(),
                label.unknown.to_string(),
                label.dead.to_string(),
                label.leaving.to_string(),
                format_age(label.heartbeat_age_mean_ms),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

/// One node's state changes and its last hour, minute by minute.
pub fn node_history_text(history: &NodeHistory, now_ms: u64) -> String {
    let mut out = format!("node {}\n", history.node);
    if history.transitions.is_empty() {
        out.push_str("no state change seen\n");
    } else {
        out.push_str("state changes:\n");
        let mut table = Table::new(&["WHEN", "STATE"]);
        for change in &history.transitions {
            table.row(vec![format!("{} ago", format_age(now_ms.saturating_sub(change.at_ms))), change.state.clone()]);
        }
        out.push_str(&table.render());
    }
    if !history.minutes.is_empty() {
        out.push_str("\nlast hour, by minute:\n");
        let mut table =
            Table::new(&["MINUTE", "POLLS", "LIVE", "HEARTBEAT MEAN", "HEARTBEAT MAX"]).right(&[1, 2, 3, 4]);
        for bucket in &history.minutes {
            table.row(vec![
                format!("{} ago", format_age(now_ms.saturating_sub(bucket.start_ms))),
                bucket.polls.to_string(),
                bucket.live.to_string(),
                format_age(bucket.age_sum_ms.checked_div(bucket.polls).unwrap_or(0)),
                format_age(bucket.age_max_ms),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

fn alerts_table(alerts: &[Alert], now_ms: u64) -> String {
    let mut table = Table::new(&["ALERT", "SUBJECT", "RAISED", "CLEARED", "WHAT"]);
    for alert in alerts {
        let ago = |at: u64| format!("{} ago", format_age(now_ms.saturating_sub(at)));
        table.row(vec![
            alert.kind.as_str().to_owned(),
            alert.subject.clone(),
            ago(alert.raised_ms),
            alert.cleared_ms.map_or_else(|| "-".to_owned(), ago),
            alert.message.clone(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use konor_sdk::health::AlertKind;

    #[test]
    fn alerts_show_what_holds_and_what_cleared_newest_first() {
        let alert = |subject: &str, raised_ms: u64, cleared_ms: Option<u64>| Alert {
            kind: AlertKind::Flapping,
            subject: subject.to_owned(),
            message: format!("{subject} fell dead 3 times"),
            raised_ms,
            cleared_ms,
        };
        let alerts = Alerts {
            active: vec![alert("n3", 50_000, None)],
            history: vec![alert("n1", 1_000, Some(2_000)), alert("n2", 3_000, Some(4_000))],
        };
        let text = alerts_text(&alerts, 60_000);
        assert!(text.starts_with("ALERT"), "{text}");
        assert!(text.contains("flapping  n3       10s ago  -"), "{text}");
        let n2 = text.find("n2 fell").unwrap();
        let n1 = text.find("n1 fell").unwrap();
        assert!(text.contains("cleared:") && n2 < n1, "{text}");
        assert_eq!(alerts_text(&Alerts::default(), 0), "no alert holds\n");
    }

    #[test]
    fn the_mesh_line_says_when_the_cap_is_reached() {
        let mut health = crate::health::tests::health();
        let text = health_text(&health, &[], 0);
        assert!(text.contains("mesh: 3 of at most 800 nodes\n"), "{text}");
        health.mesh = konor_sdk::health::MeshCapacity { nodes: 800, cap: 800, at_cap: true, refused: 4 };
        let failures = crate::health::failures(&health, &crate::health::Thresholds::default());
        let text = health_text(&health, &failures, 0);
        assert!(text.starts_with("node n1: UNHEALTHY"), "{text}");
        assert!(text.contains("mesh: 800 of at most 800 nodes: AT ITS CAP, new nodes are refused"), "{text}");
        assert!(text.contains("fails: the mesh is at its node cap (800 of 800 nodes)"), "{text}");
    }
}
