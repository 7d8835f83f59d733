//! SPEC invariants over what clients and watchers saw ([`crate::workload`] records them and
//! calls in here): convergence (1), no lost commit (2), strong atomicity and fencing (3), watch
//! completeness (4), membership detection and false positives (5). The protocol checks on frames
//! are in [`crate::frame_check`].
//!
//! A violation stops the run; the report prints the seed, the time, the invariant and the
//! command that replays it.

use std::collections::{BTreeMap, BTreeSet};

use konor_sdk::protocol::{Request, Response};

use crate::invariant;
use crate::node::{Life, call};
use crate::workload::{GroupKind, Outcome, Sim};

/// One member's copy of a group as its node serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// Its revision.
    pub revision: u64,
    /// Its settings' content hash.
    pub content_hash: String,
    /// Its settings.
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// Every running member's copy of `group`.
pub async fn served(sim: &Sim, group: GroupKind) -> BTreeMap<usize, Served> {
    let members: Vec<usize> =
        sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
    let mut states = BTreeMap::new();
    for node in members {
        if sim.cluster.borrow().nodes[node].life != Life::Up {
            continue;
        }
        if let Some(Response::Snapshot { settings, content_hash, freshness, .. }) =
            call(&sim.cluster, node, Request::Snapshot { group: group.name().to_owned(), prefix: None }).await
        {
            states.insert(node, Served { revision: freshness.revision, content_hash, settings });
        }
    }
    states
}

/// Waits until every running member of both groups serves the same settings, in the strong
/// group at the same revision (SPEC 1); returns how long that took, or records a violation
/// after `bound`. A strong group's revision is its change count, the version's position in its
/// one sequence, the same on every member; an eventual group's is local to each node's run
/// (docs/protocol.md, "Revisions"), so only its contents are compared here ([`check_heads`]
/// compares heads after).
pub async fn await_convergence(sim: &Sim, bound: std::time::Duration) -> Option<u64> {
    let start = sim.now_us();
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let mut diverged = Vec::new();
        for group in GroupKind::ALL {
            if group == GroupKind::Gated {
                // Members of a canary's slice serve other settings than the rest, on purpose.
                if let Some(differ) = gated_divergence(sim).await {
                    diverged.push(differ);
                }
                continue;
            }
            let states = served(sim, group).await;
            let position = |served: &Served| if group == GroupKind::Strong { served.revision } else { 0 };
            let distinct: BTreeSet<(u64, &str)> =
                states.values().map(|s| (position(s), s.content_hash.as_str())).collect();
            if distinct.len() > 1 {
                let sample: Vec<String> = states
                    .iter()
                    .take(12)
                    .map(|(n, s)| format!("n{n}@r{}/{}", s.revision, s.content_hash.get(..8).unwrap_or("")))
                    .collect();
                diverged.push(format!("{}: {} distinct states ({})", group.name(), distinct.len(), sample.join(" ")));
            }
        }
        if diverged.is_empty() {
            return Some(sim.now_us() - start);
        }
        if tokio::time::Instant::now() >= deadline || sim.failed() {
            // What the members say of themselves, for whoever reads the report.
            let mut notes = Vec::new();
            for group in GroupKind::ALL {
                let members: Vec<usize> =
                    sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
                for node in members {
                    let request = Request::Status { group: group.name().to_owned() };
                    if let Some(Response::Status { degraded: Some(why), .. }) = call(&sim.cluster, node, request).await
                    {
                        notes.push(format!("n{node} degraded: {why}"));
                    }
                }
            }
            let notes = if notes.is_empty() { String::new() } else { format!(" [{}]", notes.join("; ")) };
            sim.violation(
                invariant::CONVERGENCE,
                format!("members still differ {:?} after healing: {}{notes}", bound, diverged.join("; ")),
            );
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// How the running members of the gated group disagree, if they do: every member must name the
/// same current release, and those in its slice (all of them for strategy `all`) must serve the
/// same settings (SPEC 1 for what is served, F14). Those outside a canary's slice may serve
/// different older versions.
async fn gated_divergence(sim: &Sim) -> Option<String> {
    let group = GroupKind::Gated.name().to_owned();
    let members: Vec<usize> =
        sim.records.borrow().members.get(&GroupKind::Gated).map(|m| m.iter().copied().collect()).unwrap_or_default();
    let mut releases: BTreeMap<Option<(String, bool)>, Vec<usize>> = BTreeMap::new();
    // Nodes with the same labels in the slice serve the same settings (overlays differ by
    // labels, SPEC F29).
    let mut in_slice: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for node in members {
        if sim.cluster.borrow().nodes[node].life != Life::Up {
            continue;
        }
        let Some(Response::Status { release: Some(release), .. }) =
            call(&sim.cluster, node, Request::Status { group: group.clone() }).await
        else {
            continue;
        };
        let current = release.current.as_ref().map(|c| (c.label.clone(), c.aborted.is_some()));
        let here = release.current.as_ref().is_some_and(|c| c.here);
        releases.entry(current).or_default().push(node);
        if here
            && let Some(Response::Snapshot { content_hash, .. }) =
                call(&sim.cluster, node, Request::Snapshot { group: group.clone(), prefix: None }).await
        {
            let labels = konor_crdt::overlay::selector_text(&node_labels(sim, node));
            in_slice.entry((labels, content_hash)).or_default().push(node);
        }
    }
    let label_sets: std::collections::BTreeSet<&String> = in_slice.keys().map(|(labels, _)| labels).collect();
    (releases.len() > 1 || in_slice.len() > label_sets.len()).then(|| {
        let named: Vec<String> = releases.iter().map(|(release, nodes)| format!("{release:?} on {nodes:?}")).collect();
        let served: Vec<String> = in_slice
            .iter()
            .map(|((labels, hash), nodes)| format!("{} for {labels} on {nodes:?}", hash.get(..8).unwrap_or("")))
            .collect();
        format!("gt: current releases [{}]; served in the slice [{}]", named.join("; "), served.join("; "))
    })
}

/// After convergence: identical heads digests on every running member (SPEC 1, same heads),
/// within `bound`. The served state can agree before the heads do: a member that accepted a
/// commit whose decision it has not heard yet applies it when the decision arrives or when it
/// asks (seconds at most).
pub async fn check_heads(sim: &Sim, bound: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let differ = heads_differ(sim).await;
        if differ.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline || sim.failed() {
            for detail in differ {
                sim.violation(invariant::CONVERGENCE, format!("{detail} ({bound:?} after the state converged)"));
            }
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The groups whose running members report different heads now, described.
async fn heads_differ(sim: &Sim) -> Vec<String> {
    let mut differ = Vec::new();
    for group in GroupKind::ALL {
        let members: Vec<usize> =
            sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
        let mut digests: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for node in members {
            if sim.cluster.borrow().nodes[node].life != Life::Up {
                continue;
            }
            let own = format!("n{node}");
            if let Some(Response::Status { nodes, .. }) =
                call(&sim.cluster, node, Request::Status { group: group.name().to_owned() }).await
                && let Some(row) = nodes.iter().find(|row| row.node == own)
            {
                digests.entry(row.heads.clone()).or_default().push(node);
            }
        }
        if digests.len() > 1 {
            let shown: Vec<String> = digests
                .iter()
                .map(|(digest, nodes)| {
                    let names: Vec<String> = nodes.iter().map(|n| format!("n{n}")).collect();
                    format!("{digest} on [{}]", names.join(", "))
                })
                .collect();
            differ.push(format!("{} heads differ: {}", group.name(), shown.join(", ")));
        }
    }
    differ
}

/// After healing, every running node that holds the strong group is in its configuration,
/// and all of them agree on it, within `bound`: evicted members catch up and rejoin on their
/// own (SPEC F11). Rounds left in doubt by a lost decision settle first (seconds each).
pub async fn check_configurations(sim: &Sim, bound: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let problem = configuration_problem(sim).await;
        let Some(problem) = problem else { return };
        if tokio::time::Instant::now() >= deadline {
            sim.violation(invariant::CONFIGURATION, format!("{problem} ({bound:?} after the state converged)"));
            return;
        }
        if sim.failed() {
            // Another check failed: report what is seen now, without waiting out the bound.
            sim.violation(invariant::CONFIGURATION, format!("{problem} (when another check failed)"));
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// What is wrong with the strong group's configuration now, if anything.
async fn configuration_problem(sim: &Sim) -> Option<String> {
    let holders: Vec<usize> =
        sim.records.borrow().members.get(&GroupKind::Strong).map(|m| m.iter().copied().collect()).unwrap_or_default();
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for node in holders {
        if sim.cluster.borrow().nodes[node].life != Life::Up {
            continue;
        }
        let request = Request::Status { group: GroupKind::Strong.name().to_owned() };
        if let Some(Response::Status { configuration: Some(configuration), .. }) =
            call(&sim.cluster, node, request).await
        {
            seen.entry(configuration).or_default().push(node);
        }
    }
    let up: Vec<usize> = seen.values().flatten().copied().collect();
    // `c7 [n0, n2]`: the members are between the brackets.
    let members_of = |text: &str| -> BTreeSet<String> {
        let inner = text.split_once('[').and_then(|(_, rest)| rest.split_once(']')).map_or("", |(inner, _)| inner);
        inner.split(", ").filter(|m| !m.is_empty()).map(str::to_owned).collect()
    };
    let outside: Vec<String> = seen
        .keys()
        .flat_map(|configuration| {
            let members = members_of(configuration);
            up.iter().map(|n| format!("n{n}")).filter(move |n| !members.contains(n))
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    (seen.len() > 1 || !outside.is_empty()).then(|| {
        let shown: Vec<String> = seen.iter().map(|(c, nodes)| format!("{c} on {} node(s)", nodes.len())).collect();
        format!(
            "the strong group's configuration is [{}]; holders outside it: [{}]",
            shown.join("; "),
            outside.join(", ")
        )
    })
}

/// Every running member of the gated group serves exactly the settings of the version it says it
/// serves (SPEC F14: `settings_at` of the released version, whatever was written since), and
/// that version is one a release targeted (or the first, before any release).
pub async fn check_gated_served(sim: &Sim) {
    let group = GroupKind::Gated.name().to_owned();
    let members: Vec<usize> =
        sim.records.borrow().members.get(&GroupKind::Gated).map(|m| m.iter().copied().collect()).unwrap_or_default();
    for node in members {
        if sim.cluster.borrow().nodes[node].life != Life::Up {
            continue;
        }
        let Some(Response::Snapshot { settings, freshness, .. }) =
            call(&sim.cluster, node, Request::Snapshot { group: group.clone(), prefix: None }).await
        else {
            continue;
        };
        let version = freshness.version;
        let released = crate::workload::version_counter(&version)
            .is_some_and(|counter| counter == 1 || sim.records.borrow().released.contains(&counter));
        if !released {
            sim.violation(invariant::RELEASE, format!("n{node} serves gt at {version}, which no release targeted"));
            return;
        }
        let request = Request::Show { group: group.clone(), version: version.clone() };
        let Some(Response::Show { settings: written, .. }) = call(&sim.cluster, node, request).await else {
            continue;
        };
        // Independent of the node's own reading of versions: the version served was written
        // with content some release targeted (or is the empty first one), and the node serves
        // its base with the overlays of its own labels (SPEC F14, F29).
        let short = konor_sdk::protocol::content_hash(&written).get(..12).unwrap_or_default().to_owned();
        if !written.is_empty() && !sim.records.borrow().released_hashes.contains(&short) {
            sim.violation(
                invariant::RELEASE,
                format!("n{node} serves gt as {version} with content {short}, which no release targeted"),
            );
            return;
        }
        let mut stored = konor_crdt::Settings::new();
        for (key, value) in &written {
            stored.insert(key.clone(), value.clone());
        }
        let at_version: BTreeMap<String, serde_json::Value> =
            konor_crdt::overlay::resolve(&stored, &node_labels(sim, node))
                .iter()
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect();
        if at_version != settings {
            let differing: Vec<&String> = settings
                .keys()
                .chain(at_version.keys())
                .filter(|k| settings.get(*k) != at_version.get(*k))
                .take(5)
                .collect();
            sim.violation(
                invariant::RELEASE,
                format!("n{node} serves gt as {version} but with other settings than {version}'s (keys {differing:?})"),
            );
            return;
        }
    }
}

/// The labels node `node` runs with.
fn node_labels(sim: &Sim, node: usize) -> BTreeMap<String, String> {
    crate::node::region_labels(node, sim.config.regions)
}

/// Every write answered `Committed` is in the history of every running member (SPEC 2).
pub async fn check_lost_commits(sim: &Sim) {
    for group in GroupKind::ALL {
        let committed: Vec<u64> = sim
            .records
            .borrow()
            .writes
            .iter()
            .filter(|w| w.group == group && matches!(w.outcome, Outcome::Committed { .. }))
            .map(|w| w.seq)
            .collect();
        if committed.is_empty() {
            continue;
        }
        let members: Vec<usize> =
            sim.records.borrow().members.get(&group).map(|m| m.iter().copied().collect()).unwrap_or_default();
        for node in members {
            if sim.cluster.borrow().nodes[node].life != Life::Up {
                continue;
            }
            let Some(Response::History { versions, .. }) =
                call(&sim.cluster, node, Request::History { group: group.name().to_owned() }).await
            else {
                continue;
            };
            let messages: BTreeSet<&str> = versions.iter().map(|v| v.message.as_str()).collect();
            let lost: Vec<String> =
                committed.iter().map(|seq| format!("w{seq}")).filter(|m| !messages.contains(m.as_str())).collect();
            if !lost.is_empty() {
                sim.violation(
                    invariant::NO_LOST_COMMIT,
                    format!("n{node} lacks committed write(s) [{}] of {}", lost.join(", "), group.name()),
                );
                return;
            }
        }
    }
}

/// Each watcher rebuilt exactly its node's final settings from its snapshot and events (SPEC 4:
/// every change once, in order, or a resync).
pub fn check_watchers(sim: &Sim, finals: &BTreeMap<GroupKind, BTreeMap<usize, Served>>) {
    let mut found = Vec::new();
    {
        let records = sim.records.borrow();
        for ((node, group), watcher) in &records.watchers {
            let Some(state) = finals.get(group).and_then(|states| states.get(node)) else { continue };
            if !watcher.active {
                continue;
            }
            // A gated group's writes that are not released advance the node's revision and tell
            // its watchers nothing (SPEC F14): only the settings must agree.
            let gated_quiet = *group == GroupKind::Gated && watcher.revision <= state.revision;
            if watcher.revision != state.revision && !gated_quiet {
                found.push(format!(
                    "watcher of {} on n{node} stopped at revision {} but the node is at {}",
                    group.name(),
                    watcher.revision,
                    state.revision
                ));
            } else if watcher.settings != state.settings {
                let differing: Vec<&String> = watcher
                    .settings
                    .keys()
                    .chain(state.settings.keys())
                    .filter(|k| watcher.settings.get(*k) != state.settings.get(*k))
                    .take(5)
                    .collect();
                found.push(format!(
                    "watcher of {} on n{node} rebuilt other settings than the node serves at revision {} (keys {differing:?})",
                    group.name(),
                    state.revision
                ));
            }
        }
    }
    if let Some(first) = found.first() {
        sim.violation(invariant::WATCH, format!("{first} ({} watcher(s) in all)", found.len()));
    }
}
