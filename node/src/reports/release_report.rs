//! Desired against actual, per release (SPEC F16, F28): joins a gated group's releases (the
//! desired state, from its document) with what every member serves (its gossip) and what every
//! process reported applying (the mesh-wide reports), into one [`ReleaseReport`] per release:
//! which nodes each wave targets, which of them serve the target, each process's outcome, the
//! apply success rate and the time to consistency. Pure: `release status`, `release report`, the
//! metrics and the tests all read the same answer.
//!
//! Rules (docs/releases.md, "Reports, drift and time to consistency"):
//! * a node is **targeted** when the release's slice at its wave in force holds it (its id and
//!   labels, as its gossip tells them);
//! * a process's row is **of** the release when its node stamped the release's id on it;
//! * a targeted node is **done** when a process on it applied the release and none failed it,
//!   or, with no process reporting on it, when it serves the target (the release in force only;
//!   a node without processes gives no time);
//! * **time to consistency** = the latest first `ok` report of a targeted node's processes minus
//!   the release's time, once every targeted node is done (`None` before, and for an aborted
//!   release);
//! * **success rate** = processes whose newest report of the release is `ok` / processes that
//!   reported it (a process counts once, however many times it reported).

use std::collections::BTreeMap;

use konor_crdt::release::Viewer;
use konor_crdt::{GroupDoc, ReleaseStrategy, VersionId, VersionInfo, VersionKind};
use konor_sdk::protocol::{ApplyResult, ProcessRow, ReleaseNodeRow, ReleaseReport, ReleaseRow};

/// Most releases one report answers with (newest first): each carries a row per member and per
/// process, and the answer must fit one socket frame and one HTTP body.
pub const RELEASE_REPORT_MAX: usize = 64;

/// A member of the group as this node sees it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Node id.
    pub node: String,
    /// Its labels (its gossip's; this node's own settings for itself).
    pub labels: BTreeMap<String, String>,
    /// Live as seen from here.
    pub live: bool,
    /// The version label it serves (its gossip's; this node's own for itself).
    pub serving: String,
}

/// Which releases a report answers with.
#[derive(Debug, Clone, Copy)]
pub enum Which<'a> {
    /// The newest ones, at most [`RELEASE_REPORT_MAX`].
    Newest(usize),
    /// The one with this id (`<inverted counter>.<actor hex>`) or version label.
    One(&'a str),
}

/// The releases of `doc` that `which` names, newest first.
pub fn release_reports(
    doc: &GroupDoc,
    members: &[Member],
    rows: &[ProcessRow],
    which: Which<'_>,
) -> Vec<ReleaseReport> {
    let active = doc.active_release().map(|(id, _)| id.clone());
    let index = RowIndex::new(rows);
    let chosen: Vec<(&VersionId, &VersionInfo)> = match which {
        Which::Newest(limit) => {
            doc.releases().collect::<Vec<_>>().into_iter().rev().take(limit.min(RELEASE_REPORT_MAX)).collect()
        }
        Which::One(name) => doc
            .releases()
            .filter(|(id, _)| id.storage_key() == name || doc.label(id) == name)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .take(1)
            .collect(),
    };
    chosen
        .into_iter()
        .filter_map(|(id, info)| report(doc, id, info, active.as_ref() == Some(id), members, &index))
        .collect()
}

/// The rows by node and by release, built once per answer: a report of many releases over many
/// members and processes stays linear in what it reads.
struct RowIndex<'a> {
    /// Each node's live rows.
    live_by_node: BTreeMap<&'a str, Vec<&'a ProcessRow>>,
    /// Each release's rows (live, gone, superseded), by release id.
    by_release: BTreeMap<&'a str, Vec<&'a ProcessRow>>,
}

impl<'a> RowIndex<'a> {
    fn new(rows: &'a [ProcessRow]) -> RowIndex<'a> {
        let mut index = RowIndex { live_by_node: BTreeMap::new(), by_release: BTreeMap::new() };
        for row in rows {
            if row.gone_ms.is_none() {
                index.live_by_node.entry(row.node.as_str()).or_default().push(row);
            }
            if let Some(release) = &row.release {
                index.by_release.entry(release.as_str()).or_default().push(row);
            }
        }
        index
    }
}

fn report(
    doc: &GroupDoc,
    id: &VersionId,
    info: &VersionInfo,
    in_force: bool,
    members: &[Member],
    index: &RowIndex<'_>,
) -> Option<ReleaseReport> {
    let release = release_row(doc, id, info)?;
    let VersionKind::Release { to, .. } = &info.kind else { return None };
    let key = id.storage_key();
    let applies: Vec<&ProcessRow> = index.by_release.get(key.as_str()).cloned().unwrap_or_default();
    let outcomes = process_outcomes(&applies);
    let processes_ok = outcomes.values().filter(|outcome| outcome.ok).count() as u32;
    let processes_failed = outcomes.len() as u32 - processes_ok;
    let mut nodes = Vec::with_capacity(members.len());
    for member in members {
        let viewer = Viewer { node: member.node.clone(), labels: member.labels.clone() };
        let of_node: Vec<&ProcessOutcome> =
            outcomes.range((member.node.as_str(), 0)..=(member.node.as_str(), u32::MAX)).map(|(_, o)| o).collect();
        let applied = of_node.iter().filter(|outcome| outcome.ok).count() as u32;
        let failed = of_node.iter().filter(|outcome| !outcome.ok).count() as u32;
        let applied_ms = of_node.iter().filter_map(|outcome| outcome.first_ok_ms).max();
        // A failure holds the node back unless its process is gone and another applied the
        // release after it (a supervisor restarted the app, and the new one took it).
        let replaced =
            |outcome: &ProcessOutcome| outcome.gone && applied_ms.is_some_and(|applied| applied >= outcome.last_ms);
        let blocking = of_node.iter().any(|outcome| !outcome.ok && !replaced(outcome));
        let live = index.live_by_node.get(member.node.as_str()).map(Vec::as_slice).unwrap_or_default();
        // A live process on the node still on something else: the node is not done yet.
        let lagging = in_force && live.iter().any(|row| row.release.as_deref() != Some(key.as_str()));
        let serves_target = crate::reports::names(&member.serving, to);
        let done = !blocking && !lagging && (applied_ms.is_some() || (live.is_empty() && (serves_target || !in_force)));
        nodes.push(ReleaseNodeRow {
            node: member.node.clone(),
            wave: doc.release_wave_of(id, &viewer).map(|wave| wave + 1),
            targeted: doc.release_holds(id, &viewer),
            serving: member.serving.clone(),
            live: member.live,
            applied_ms,
            applied,
            failed,
            done,
        });
    }
    let targeted: Vec<&ReleaseNodeRow> = nodes.iter().filter(|node| node.targeted).collect();
    let consistent = release.aborted.is_none() && !targeted.is_empty() && targeted.iter().all(|node| node.done);
    let time_to_consistency_ms = if consistent {
        targeted.iter().filter_map(|node| node.applied_ms).max().map(|last| last.saturating_sub(info.time.0))
    } else {
        None
    };
    let last_wave = release.waves.is_empty() || release.wave.is_some_and(|wave| wave as usize >= release.waves.len());
    let outcome = if release.aborted.is_some() {
        "aborted"
    } else if !in_force {
        "superseded"
    } else if consistent && last_wave {
        "complete"
    } else {
        "in progress"
    };
    let reported = processes_ok + processes_failed;
    Some(ReleaseReport {
        release,
        outcome: outcome.to_owned(),
        nodes,
        applies: applies.into_iter().cloned().collect(),
        processes_ok,
        processes_failed,
        success_rate: (reported > 0).then(|| f64::from(processes_ok) / f64::from(reported)),
        time_to_consistency_ms,
    })
}

/// What one process did with a release, from its rows of it (a process that went on to a
/// later release and came back has several).
struct ProcessOutcome {
    /// Its newest row of the release says `ok`.
    ok: bool,
    /// Its first `ok` report of the release.
    first_ok_ms: Option<u64>,
    /// The time of its newest row.
    last_ms: u64,
    /// Its newest row is of a process that went away (not one that went on to another release).
    gone: bool,
}

/// Each process's outcome of a release, by (node, pid), from the release's rows.
fn process_outcomes<'a>(applies: &[&'a ProcessRow]) -> BTreeMap<(&'a str, u32), ProcessOutcome> {
    let mut outcomes: BTreeMap<(&str, u32), ProcessOutcome> = BTreeMap::new();
    for row in applies {
        let ok = row.result == ApplyResult::Ok;
        let gone = row.gone_ms.is_some() && !row.superseded;
        let outcome = outcomes.entry((row.node.as_str(), row.pid)).or_insert(ProcessOutcome {
            ok,
            first_ok_ms: None,
            last_ms: row.time_ms,
            gone,
        });
        if row.time_ms >= outcome.last_ms {
            outcome.last_ms = row.time_ms;
            outcome.ok = ok;
            outcome.gone = gone;
        }
        if ok {
            outcome.first_ok_ms = Some(outcome.first_ok_ms.map_or(row.time_ms, |first| first.min(row.time_ms)));
        }
    }
    outcomes
}

/// One release as `status` and the report show it.
pub fn release_row(doc: &GroupDoc, id: &VersionId, info: &VersionInfo) -> Option<ReleaseRow> {
    let VersionKind::Release { to, from, strategy, guards } = &info.kind else { return None };
    let progress = doc.release_progress(id);
    let canary = match strategy {
        ReleaseStrategy::Canary(canary) => Some(canary),
        ReleaseStrategy::All => None,
    };
    let since = progress
        .last_event
        .as_ref()
        .and_then(|event| doc.version_info(event))
        .map_or(info.time.0, |event| event.time.0);
    Some(ReleaseRow {
        label: doc.label(id),
        id: id.storage_key(),
        to: doc.label(to),
        from: from.as_ref().map(|from| doc.label(from)),
        strategy: strategy.to_string(),
        author: info.author.clone(),
        time_ms: info.time.0,
        message: info.message.clone(),
        waves: canary.map(|c| c.waves.clone()).unwrap_or_default(),
        wave: canary.map(|_| progress.wave.saturating_add(1)),
        bake_ms: canary.map(|c| c.bake_ms).filter(|ms| *ms > 0),
        wave_since_ms: canary.map(|_| since),
        aborted: progress.aborted.clone(),
        guards: guards.to_string(),
        here: progress.aborted.is_none() && doc.in_release_slice(id),
    })
}

#[cfg(test)]
mod tests {
    use konor_crdt::configuration::{Canary, GroupPolicy};
    use konor_crdt::group::Edit;
    use konor_crdt::{ActorId, CommitMeta, Millis, Mode, ReleasePolicy};
    use serde_json::json;

    use super::*;

    const RELEASED_MS: u64 = 10_000;

    fn meta(time: u64) -> CommitMeta {
        CommitMeta::new("alice", "test", Millis(time))
    }

    /// A gated group with v2 written and v3 released to it.
    fn gated(strategy: ReleaseStrategy) -> GroupDoc {
        let policy = GroupPolicy { release: ReleasePolicy::Gated, ..Default::default() };
        let (mut doc, _) =
            GroupDoc::create_with("app", Mode::Eventual, ActorId::from([1u8; 16]), &meta(1), &policy, None).unwrap();
        doc.set(vec![("workers".into(), json!(8))], &meta(2)).unwrap();
        doc.edit(Edit::Release { to: "v2".into(), strategy, guards: Default::default() }, &meta(RELEASED_MS)).unwrap();
        doc.refresh_served();
        doc
    }

    fn member(node: &str, serving: &str) -> Member {
        Member { node: node.into(), labels: BTreeMap::new(), live: true, serving: serving.into() }
    }

    fn row(doc: &GroupDoc, node: &str, pid: u32, time_ms: u64, result: ApplyResult) -> ProcessRow {
        let (release, _) = doc.current_release().unwrap();
        ProcessRow {
            node: node.into(),
            pid,
            process: "app".into(),
            version: "v2".into(),
            revision: 2,
            result,
            time_ms,
            gone_ms: None,
            release: Some(release.storage_key()),
            superseded: false,
            error_rate: None,
        }
    }

    #[test]
    fn a_release_is_consistent_once_every_targeted_node_applied_it() {
        let doc = gated(ReleaseStrategy::All);
        let members = [member("n1", "v2"), member("n2", "v2"), member("n3", "v1")];
        let mut rows = vec![row(&doc, "n1", 10, RELEASED_MS + 40, ApplyResult::Ok)];
        let report = &release_reports(&doc, &members, &rows, Which::Newest(1))[0];
        assert_eq!(report.outcome, "in progress");
        assert_eq!(report.time_to_consistency_ms, None);
        let done: Vec<bool> = report.nodes.iter().map(|node| node.done).collect();
        assert_eq!(done, [true, true, false], "n2 has no process but serves v2; n3 still serves v1");

        let members = [member("n1", "v2"), member("n2", "v2"), member("n3", "v2")];
        rows.push(row(&doc, "n3", 30, RELEASED_MS + 250, ApplyResult::Ok));
        rows.push(row(&doc, "n3", 31, RELEASED_MS + 90, ApplyResult::Ok));
        let report = &release_reports(&doc, &members, &rows, Which::Newest(1))[0];
        assert_eq!(report.outcome, "complete");
        assert_eq!(report.time_to_consistency_ms, Some(250), "the last first-ok report");
        assert_eq!((report.processes_ok, report.processes_failed, report.success_rate), (3, 0, Some(1.0)));
    }

    #[test]
    fn a_failed_apply_keeps_a_release_inconsistent_and_counts_in_the_success_rate() {
        let doc = gated(ReleaseStrategy::All);
        let members = [member("n1", "v2"), member("n2", "v2")];
        let failed = ApplyResult::Error { message: "workers too many".into() };
        let mut rows =
            vec![row(&doc, "n1", 10, RELEASED_MS + 40, ApplyResult::Ok), row(&doc, "n2", 20, RELEASED_MS + 60, failed)];
        // A report of an earlier release (or none) on n1 is not of this one.
        rows.push(ProcessRow { release: None, pid: 11, ..rows[0].clone() });
        let report = &release_reports(&doc, &members, &rows, Which::Newest(1))[0];
        assert_eq!(report.applies.len(), 2, "only the rows stamped with the release");
        assert_eq!((report.processes_ok, report.processes_failed, report.success_rate), (1, 1, Some(0.5)));
        assert_eq!(report.outcome, "in progress");
        assert_eq!(report.time_to_consistency_ms, None);
        assert_eq!(report.nodes[1].failed, 1);
        assert!(!report.nodes[0].done, "a live process on n1 is not on the release yet");
    }

    #[test]
    fn a_canary_targets_its_slice_and_an_abort_is_never_consistent() {
        let canary = Canary { waves: vec![50, 100], selector: BTreeMap::new(), bake_ms: 0 };
        let mut doc = gated(ReleaseStrategy::Canary(canary));
        let members: Vec<Member> = (1..=20).map(|n| member(&format!("n{n}"), "v1")).collect();
        let report = &release_reports(&doc, &members, &[], Which::Newest(1))[0];
        let targeted = report.nodes.iter().filter(|node| node.targeted).count();
        assert!((3..=17).contains(&targeted), "about half of 20: {targeted}");
        assert!(report.nodes.iter().all(|node| node.targeted == (node.wave == Some(1))));
        assert!(report.nodes.iter().all(|node| node.wave.is_some()), "the last wave holds every node");
        doc.edit(Edit::Abort { reason: "guard".into() }, &meta(RELEASED_MS + 1)).unwrap();
        let report = &release_reports(&doc, &members, &[], Which::Newest(1))[0];
        assert_eq!((report.outcome.as_str(), report.time_to_consistency_ms), ("aborted", None));
        assert_eq!(release_reports(&doc, &members, &[], Which::Newest(64)).len(), 1, "one release in the group");
    }

    #[test]
    fn a_failed_process_that_went_away_does_not_hold_back_a_node_whose_next_process_applied() {
        let doc = gated(ReleaseStrategy::All);
        let members = [member("n1", "v2")];
        let failed = ApplyResult::Error { message: "crashed on it".into() };
        let gone =
            ProcessRow { gone_ms: Some(RELEASED_MS + 50), ..row(&doc, "n1", 10, RELEASED_MS + 20, failed.clone()) };
        let mut rows = vec![gone.clone()];
        let report = &release_reports(&doc, &members, &rows, Which::Newest(1))[0];
        assert!(!report.nodes[0].done, "nothing on n1 applied it yet");
        rows.push(row(&doc, "n1", 11, RELEASED_MS + 80, ApplyResult::Ok));
        let report = &release_reports(&doc, &members, &rows, Which::Newest(1))[0];
        assert!(report.nodes[0].done, "the restarted app took it: {:?}", report.nodes[0]);
        assert_eq!((report.nodes[0].applied, report.nodes[0].failed), (1, 1));
        assert_eq!((report.processes_ok, report.processes_failed), (1, 1), "the failure still counts in the rate");
        // A live process that failed holds it back, whatever others did.
        rows.push(row(&doc, "n1", 12, RELEASED_MS + 90, failed));
        assert!(!release_reports(&doc, &members, &rows, Which::Newest(1))[0].nodes[0].done);
    }

    #[test]
    fn one_release_is_found_by_id_or_label() {
        let doc = gated(ReleaseStrategy::All);
        let (id, _) = doc.current_release().unwrap();
        let members = [member("n1", "v2")];
        let label = doc.label(id);
        for name in [id.storage_key(), label.clone()] {
            let found = release_reports(&doc, &members, &[], Which::One(&name));
            assert_eq!(found.len(), 1, "{name}");
            assert_eq!(found[0].release.label, label);
        }
        assert!(release_reports(&doc, &members, &[], Which::One("v99")).is_empty());
    }
}
