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
        let VersionKind::Release { to, strategy, .. } = &info.kind else { return None };
        let progress = doc.release_progress(id);
        if progress.aborted.is_some() {
            return None;
        }
        let to_label = doc.label(to);
        // Reports made before this release (a process that failed on the same version under an
        // earlier release, and has not been served it again yet) do not count; clocks of nodes
        // differ by up to the skew margin.
        let since = info.time.0.saturating_sub(konor_crdt::limits::BAKE_SKEW_MARGIN_MS);
        let failures: Vec<String> = self
            .process_rows(group)
            .into_iter()
            .filter(|row| row.gone_ms.is_none() && row.time_ms >= since && names(&row.version, to))
            .filter_map(|row| match &row.result {
                ApplyResult::Error { message } => {
                    Some(format!("{} (pid {}) on {}: {message}", row.process, row.pid, row.node))
                }
                ApplyResult::Ok => None,
            })
            .collect();
        let (waves, bake_ms) = match strategy {
            ReleaseStrategy::Canary(canary) => (canary.waves.as_slice(), canary.bake_ms),
            ReleaseStrategy::All => (&[][..], 0),
        };
        let wave_since_ms =
            progress.last_event.as_ref().and_then(|event| doc.version_info(event)).map_or(info.time.0, |v| v.time.0);
        let release_label = doc.label(id);
        let view = GuardView {
            release: &release_label,
            to: &to_label,
            wave: progress.wave,
            waves,
            bake_ms,
            wave_since_ms,
            now_ms,
            failures: &failures,
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

/// True when `label`, as a process reported it (its node's label: `v12`, or `v12-3fa9` where
/// that node knew two versions numbered 12), can name `version`.
fn names(label: &str, version: &konor_crdt::VersionId) -> bool {
    label.parse::<konor_crdt::VersionRef>().is_ok_and(|reference| reference.matches(version))
}
