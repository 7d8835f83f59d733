//! Release guards (SPEC F15), the shell's half: once a second, after the members' apply reports
//! were read from gossip, this node gathers what it knows of each gated group's current release
//! (the processes, on any node, that failed to apply its target; when its wave began) and asks
//! the core's rule ([`konor_crdt::release::guard_action`]) what to do. An abort or a promotion
//! is then written like any operator's, as `konord@<node>`: every live member runs the same
//! rule, so a release moves on with any node down, and several acting at once converge
//! (docs/releases.md, "Guards and who acts").

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use konor_crdt::release::{GuardAction, GuardView, guard_action};
use konor_crdt::{CommitMeta, ReleaseStrategy, VersionKind};
use konor_sdk::protocol::{ApplyResult, ProcessRow};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::info;

use super::{Command, Daemon, PendingReply};
use crate::peer::membership::Liveness;

/// How long a member waits before it repeats a guard action it already wrote (a strong
/// group's round can be busy; an eventual write may not commit at once).
const GUARD_RETRY: Duration = Duration::from_secs(5);

/// The last guard action this node wrote for a group: (release id, the action's kind and
/// wave, when). The kind, not the reason: while failures come in, the reason changes.
pub(super) type GuardActed = BTreeMap<String, (String, Option<u32>, Instant)>;

/// Groups whose copy here has matched every live member's at least once since this node
/// started: before that, its view of the releases may be out of date (a node back from a long
/// stop would promote a canary that was replaced long ago), so it does not act.
pub(super) type GuardsReady = BTreeSet<String>;

impl Daemon {
    /// Evaluates the guards of every gated group's current release and writes what they call
    /// for.
    pub(super) fn run_guards(&mut self) {
        let groups: Vec<String> = self.replica.group_names().map(str::to_owned).collect();
        let now_ms = self.wall_clock().0;
        for group in groups {
            if !self.guards_ready.contains(&group) {
                if !self.in_step_with_members(&group) {
                    continue;
                }
                self.guards_ready.insert(group.clone());
            }
            let Some(action) = self.guard_for(&group, now_ms) else { continue };
            let Some(doc) = self.replica.group(&group) else { continue };
            let Some((release, _)) = doc.active_release() else { continue };
            let release = release.storage_key();
            let kind = match &action {
                GuardAction::Abort { .. } => None,
                GuardAction::Promote { wave } => Some(*wave),
            };
            if let Some((acted_on, acted, at)) = self.guards_acted.get(&group)
                && *acted_on == release
                && *acted == kind
                && at.elapsed() < GUARD_RETRY
            {
                continue;
            }
            self.guards_acted.insert(group.clone(), (release, kind, Instant::now()));
            let author = format!("konord@{}", self.node_id);
            let command = match action {
                GuardAction::Abort { reason } => {
                    info!(%group, %reason, "release guard broke: aborting the release");
                    let meta = CommitMeta::new(author, format!("abort: {reason}"), self.wall_clock());
                    Command::Abort { group, reason, meta }
                }
                GuardAction::Promote { wave } => {
                    info!(%group, wave = wave + 1, "release wave held through its bake time: promoting");
                    let meta =
                        CommitMeta::new(author, format!("promote to wave {} (bake held)", wave + 1), self.wall_clock());
                    Command::Promote { group, wave: Some(wave), meta }
                }
            };
            // Nobody waits for the answer: a refusal (another member acted first) is fine, and a
            // write that did not commit is retried after GUARD_RETRY.
            let (reply, _) = oneshot::channel();
            self.command(command, PendingReply::Plain(reply));
        }
    }

    /// Tells the reports which release serves each gated group here, so a release of the
    /// version this node already served counts its processes as running it (F16, F28).
    pub(super) fn follow_releases(&mut self) {
        let now_ms = self.wall_clock().0;
        for group in self.replica.group_names() {
            let Some(doc) = self.replica.group(group).filter(|doc| doc.is_gated()) else { continue };
            let serving = doc.serving_release();
            let release = serving.map(|(release, _)| release.storage_key());
            let is_target = |label: &str| serving.is_some_and(|(_, to)| crate::reports::names(label, to));
            self.reports.follow_release(group, release.as_deref(), is_target, now_ms);
        }
    }

    /// True when every live member gossips the same heads as this node holds for `group`.
    fn in_step_with_members(&self, group: &str) -> bool {
        let Some(doc) = self.replica.group(group) else { return false };
        let ours = doc.heads_digest();
        self.replica.members(group).iter().filter(|(_, live, _)| *live).all(|(_, _, gossip)| gossip.digest == ours)
    }

    /// What the guard rule says about `group`'s release in force, if anything.
    fn guard_for(&self, group: &str, now_ms: u64) -> Option<GuardAction> {
        let doc = self.replica.group(group)?;
        let (id, info) = doc.active_release()?;
        let VersionKind::Release { to, strategy, guards, .. } = &info.kind else { return None };
        let progress = doc.release_progress(id);
        if progress.aborted.is_some() {
            return None;
        }
        let to_label = doc.label(to);
        // Reports of this release: each row names the release its node served (a process that
        // failed on the same version under an earlier release does not count). A row without
        // one (from a daemon before releases named theirs) counts when it names the target and
        // came after the release; clocks of nodes differ by up to the skew margin.
        let since = info.time.0.saturating_sub(konor_crdt::limits::BAKE_SKEW_MARGIN_MS);
        let release_key = id.storage_key();
        let of_release = |row: &ProcessRow| match &row.release {
            Some(release) => *release == release_key,
            None => row.time_ms >= since && crate::reports::names(&row.version, to),
        };
        let rows: Vec<ProcessRow> = self.process_rows(group).into_iter().filter(|row| of_release(row)).collect();
        let live: Vec<&ProcessRow> = rows.iter().filter(|row| row.gone_ms.is_none()).collect();
        // Every process that failed to apply it: live ones, and ones that went away after
        // failing (an app that exits on a bad reload, a crash loop) unless a process on the
        // same node applied the release after them. Each (node, pid) once.
        let applied_after = |failed: &ProcessRow| {
            rows.iter()
                .any(|row| row.node == failed.node && row.result == ApplyResult::Ok && row.time_ms >= failed.time_ms)
        };
        let mut failed: BTreeMap<(&str, u32), String> = BTreeMap::new();
        for row in rows.iter().filter(|row| !row.superseded) {
            let ApplyResult::Error { message } = &row.result else { continue };
            if row.gone_ms.is_some() && applied_after(row) {
                continue;
            }
            failed.insert(
                (row.node.as_str(), row.pid),
                format!("{} (pid {}) on {}: {message}", row.process, row.pid, row.node),
            );
        }
        let failures: Vec<String> = failed.into_values().collect();
        let wave_since_ms =
            progress.last_event.as_ref().and_then(|event| doc.version_info(event)).map_or(info.time.0, |v| v.time.0);
        // Error rates of processes running the release (their rows are of it, so their nodes
        // are in its slice).
        let error_rates: Vec<(String, u32)> = live
            .iter()
            .filter_map(|row| {
                let rate = row.error_rate?;
                let ppm = (rate.clamp(0.0, 1.0) * f64::from(konor_crdt::configuration::PPM)).round() as u32;
                Some((format!("{} (pid {}) on {}", row.process, row.pid, row.node), ppm))
            })
            .collect();
        // Dead to the failure detector; a node that announced a graceful leave (a restart) is
        // not a broken one.
        let dead: Vec<String> = if guards.node_health {
            self.release_members(group)
                .into_iter()
                .filter(|member| {
                    // Dead after the wave began: a node already long dead when the release was
                    // made did not die of it (the report shows it not done).
                    self.mesh.nodes.get(&member.node).is_some_and(|node| {
                        let heard_ms = node.heartbeat_age.map(|age| now_ms.saturating_sub(age.as_millis() as u64));
                        node.liveness == Liveness::Dead && heard_ms.is_some_and(|heard| heard >= wave_since_ms)
                    })
                })
                .filter(|member| {
                    let viewer =
                        konor_crdt::release::Viewer { node: member.node.clone(), labels: member.labels.clone() };
                    doc.release_holds(id, &viewer)
                })
                .map(|member| member.node)
                .collect()
        } else {
            Vec::new()
        };
        let (waves, bake_ms) = match strategy {
            ReleaseStrategy::Canary(canary) => (canary.waves.as_slice(), canary.bake_ms),
            ReleaseStrategy::All => (&[][..], 0),
        };
        let release_label = doc.label(id);
        let view = GuardView {
            release: &release_label,
            to: &to_label,
            wave: progress.wave,
            waves,
            bake_ms,
            wave_since_ms,
            now_ms,
            guards,
            failures: &failures,
            error_rates: &error_rates,
            dead: &dead,
        };
        guard_action(&view)
    }

    /// Every process's apply report of `group` this node knows: its own processes' and the
    /// other members' as their gossip tells them (F16).
    pub(super) fn process_rows(&self, group: &str) -> Vec<ProcessRow> {
        let mut rows = self.reports.rows(group);
        if let Some(by_node) = self.remote_reports.get(group) {
            for (node, value) in by_node.iter().filter(|(node, _)| **node != self.node_id) {
                rows.extend(crate::reports::parse_gossip(node, value));
            }
        }
        rows
    }
}
