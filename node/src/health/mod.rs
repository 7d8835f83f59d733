//! A node's health as its daemon sees it (members, groups, queues, what it dropped), and the
//! check of it against a caller's thresholds. The HTTP door answers `/api/v1/health` and fills
//! `/metrics` from it; the check is pure so that its rules are tested here, not through HTTP.

pub mod alerts;
pub mod history;
pub mod webhook;

use serde::Deserialize;

pub use konor_sdk::health::{
    Alert, AlertKind, Alerts, DroppedCounts, GroupHealth, MemberCounts, MeshCapacity, NodeHealth, QueueDepths,
};

/// What a caller of `/api/v1/health` tolerates; each bound left out is not checked, except
/// `degraded` and a mesh at its node cap, which fail unless allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    /// Most dead members allowed.
    pub max_dead: Option<u64>,
    /// Most stale groups allowed.
    pub max_stale: Option<u64>,
    /// Longest time since a group's last change, in milliseconds (a group that should see
    /// regular writes and has gone quiet here is lagging).
    pub max_since_change_ms: Option<u64>,
    /// Accept a degraded node (a failed disk write).
    #[serde(default)]
    pub allow_degraded: bool,
    /// Accept a mesh at its node cap (a probe that must not take every node out at once).
    #[serde(default)]
    pub allow_at_cap: bool,
}

/// Why `health` fails `thresholds`: one sentence per broken bound, empty when healthy.
pub fn failures(health: &NodeHealth, thresholds: &Thresholds) -> Vec<String> {
    let mut failures = Vec::new();
    if !thresholds.allow_degraded && !health.degraded.is_empty() {
        let groups: Vec<&str> = health.degraded.keys().map(String::as_str).collect();
        failures.push(format!("degraded: the last write to disk failed for {}", groups.join(", ")));
    }
    // At the cap no new host can join the mesh (issue 19): every node says so, not only in its
    // log. A probe that would restart or drain nodes on a failure allows it (it is the whole
    // mesh's state, not this node's).
    if health.mesh.at_cap && !thresholds.allow_at_cap {
        failures.push(format!(
            "the mesh is at its node cap ({} of {} nodes): new nodes are refused (docs/operations.md, \"The mesh is over its cap\")",
            health.mesh.nodes, health.mesh.cap
        ));
    }
    if let Some(max) = thresholds.max_dead
        && health.members.dead > max
    {
        failures.push(format!("{} dead members, more than {max}", health.members.dead));
    }
    let stale: Vec<&str> = health.groups.iter().filter(|g| g.stale).map(|g| g.name.as_str()).collect();
    if let Some(max) = thresholds.max_stale
        && stale.len() as u64 > max
    {
        failures.push(format!("{} stale groups ({}), more than {max}", stale.len(), stale.join(", ")));
    }
    if let Some(max) = thresholds.max_since_change_ms {
        for group in health.groups.iter().filter(|g| g.since_change_ms > max) {
            failures.push(format!(
                "group {} last changed here {} ms ago, more than {max} ms",
                group.name, group.since_change_ms
            ));
        }
    }
    failures
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A node's health with a stale strong group `app` and a gated group `web` whose release
    /// has 2 of 3 processes applied.
    pub(crate) fn health() -> NodeHealth {
        NodeHealth {
            node_id: "n1".to_owned(),
            uptime_ms: 1000,
            members: MemberCounts { live: 2, unknown: 0, dead: 1, leaving: 0 },
            groups: vec![
                GroupHealth {
                    name: "app".to_owned(),
                    mode: "strong".to_owned(),
                    revision: 3,
                    since_change_ms: 500,
                    members: 3,
                    stale: true,
                    stale_reason: Some("no lease".to_owned()),
                    release: None,
                },
                GroupHealth {
                    name: "web".to_owned(),
                    mode: "eventual".to_owned(),
                    revision: 9,
                    since_change_ms: 20,
                    members: 3,
                    stale: false,
                    stale_reason: None,
                    release: Some(konor_sdk::health::ReleaseHealth {
                        label: "v9".to_owned(),
                        outcome: "in progress".to_owned(),
                        wave: 2,
                        targeted: 3,
                        done: 2,
                        processes_ok: 2,
                        processes_failed: 1,
                        time_to_consistency_ms: None,
                    }),
                },
            ],
            degraded: BTreeMap::new(),
            queues: QueueDepths::default(),
            dropped: DroppedCounts::default(),
            alerts: Vec::new(),
            mesh: MeshCapacity { nodes: 3, cap: 800, at_cap: false, refused: 0 },
        }
    }

    #[test]
    fn a_mesh_at_its_cap_fails_unless_allowed() {
        let mut health = health();
        health.mesh = MeshCapacity { nodes: 800, cap: 800, at_cap: true, refused: 12 };
        let degraded_allowed = Thresholds { allow_degraded: true, ..Thresholds::default() };
        let failed = failures(&health, &degraded_allowed);
        assert_eq!(failed.len(), 1);
        assert!(failed[0].starts_with("the mesh is at its node cap (800 of 800 nodes): new nodes are refused"));
        assert!(failures(&health, &Thresholds { allow_at_cap: true, ..Thresholds::default() }).is_empty());
        // Refusals in the past do not fail a mesh that is below its cap now.
        health.mesh = MeshCapacity { nodes: 700, cap: 800, at_cap: false, refused: 12 };
        assert!(failures(&health, &degraded_allowed).is_empty());
    }

    #[test]
    fn no_thresholds_fail_only_a_degraded_node() {
        let mut health = health();
        assert!(failures(&health, &Thresholds::default()).is_empty());
        health.degraded.insert("app".to_owned(), "No space left on device".to_owned());
        assert_eq!(failures(&health, &Thresholds::default()), ["degraded: the last write to disk failed for app"]);
        assert!(failures(&health, &Thresholds { allow_degraded: true, ..Thresholds::default() }).is_empty());
    }

    #[test]
    fn each_bound_fails_only_past_its_value() {
        let health = health();
        let at =
            Thresholds { max_dead: Some(1), max_stale: Some(1), max_since_change_ms: Some(500), ..Default::default() };
        assert!(failures(&health, &at).is_empty());
        let below =
            Thresholds { max_dead: Some(0), max_stale: Some(0), max_since_change_ms: Some(499), ..Default::default() };
        assert_eq!(
            failures(&health, &below),
            [
                "1 dead members, more than 0",
                "1 stale groups (app), more than 0",
                "group app last changed here 500 ms ago, more than 499 ms"
            ]
        );
    }
}
