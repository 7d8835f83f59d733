//! Releases (SPEC F14): a group's policy says whether each new version is served at once
//! (`immediate`, the default) or only once a release targets it (`gated`). A release is a
//! version of kind `release`; promotions and aborts of a canary are versions of kinds `promote`
//! and `abort`. So any node can act, a strong group commits each through a round like any
//! write, and every node converges on the same answer (docs/releases.md).
//!
//! What a node serves is a pure function of the group's versions and of the node (its id and
//! labels): walking the releases from the newest (largest id: Lamport counter, then actor), the
//! node serves the target of the first one that is not aborted and whose slice holds it; before
//! any, the group's first version (empty settings). A release of strategy `all` holds every
//! node, so it ends the walk everywhere. A canary holds the nodes that match its selector and
//! whose place in the release's order falls under the current wave's percentage; the others
//! keep serving what the older releases give them, so a canary moves no other node, and an
//! abort moves every node back.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use crate::configuration::{Guards, ReleaseStrategy};
use crate::version::{VersionEntry, VersionId, VersionKind};

/// The node whose served version is computed: its id and its labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Viewer {
    /// The node id.
    pub node: String,
    /// Its labels (`region=eu-west`).
    pub labels: BTreeMap<String, String>,
}

/// The state of one release, folded from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseProgress {
    /// The wave in force (0: the first). Promotions set it to the largest wave any node promoted
    /// to, so two nodes promoting at once converge.
    pub wave: u32,
    /// Why it was aborted (the abort with the largest id, when several nodes aborted at once).
    /// An abort wins over every promotion, whatever their order.
    pub aborted: Option<String>,
    /// The version of the last event applied (the promotion or abort with the largest id).
    pub last_event: Option<VersionId>,
}

/// The progress of `release` from the event versions in `records`.
pub(crate) fn progress(
    release: &VersionId,
    records: &BTreeSet<VersionId>,
    versions: &BTreeMap<VersionId, VersionEntry>,
) -> ReleaseProgress {
    let mut folded = ReleaseProgress { wave: 0, aborted: None, last_event: None };
    // Events come after their release (they depend on it), so only larger ids can be its events.
    for id in records.range(release..) {
        let Some(entry) = versions.get(id) else { continue };
        match &entry.info.kind {
            VersionKind::Promote { release: of, wave } if of == release => {
                folded.wave = folded.wave.max(*wave);
                folded.last_event = Some(id.clone());
            }
            VersionKind::Abort { release: of, reason } if of == release => {
                folded.aborted = Some(reason.clone());
                folded.last_event = Some(id.clone());
            }
            _ => {}
        }
    }
    folded
}

/// True when `viewer` is in the slice of `release` (of `group`) at wave `wave`. The place of a
/// node is `sha256("konor-canary-v1" | group | release | node)`'s first 8 bytes read as a
/// fraction of 2^64, so each node decides alone, the same way everywhere, and a node in one
/// wave stays in every later one.
pub fn in_slice(group: &str, release: &VersionId, strategy: &ReleaseStrategy, wave: u32, viewer: &Viewer) -> bool {
    let canary = match strategy {
        ReleaseStrategy::All => return true,
        ReleaseStrategy::Canary(canary) => canary,
    };
    if !canary.selector.iter().all(|(key, value)| viewer.labels.get(key) == Some(value)) {
        return false;
    }
    let Some(&percent) = canary.waves.get(wave as usize).or(canary.waves.last()) else { return false };
    slice_place(group, release, &viewer.node) * 100 < u128::from(percent) << 64
}

/// A node's place in a release's order, in `0..2^64`.
pub fn slice_place(group: &str, release: &VersionId, node: &str) -> u128 {
    let mut hasher = Sha256::new();
    for part in ["konor-canary-v1", group, &release.storage_key(), node] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u128::from(u64::from_be_bytes(first))
}

/// What a member does about the current release (SPEC F15), decided alone from its own view:
/// every live member evaluates the same rules, so the release moves on with any node down, and
/// actions taken by several at once converge (the fold of `progress`: the largest wave, an abort
/// wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardAction {
    /// A guard broke: abort the release, with why.
    Abort {
        /// Why (which processes failed, and their words).
        reason: String,
    },
    /// The wave held through its bake time: move to this wave (0 is the first).
    Promote {
        /// The next wave.
        wave: u32,
    },
}

/// What a member knows of the current release when it evaluates its guards.
#[derive(Debug, Clone)]
pub struct GuardView<'a> {
    /// The release's label and its target's, for the abort's reason.
    pub release: &'a str,
    /// The target's label.
    pub to: &'a str,
    /// The wave in force (0 is the first).
    pub wave: u32,
    /// A canary's waves; empty for strategy `all` (nothing to promote).
    pub waves: &'a [u8],
    /// A canary's bake time per wave; 0: promotion is manual.
    pub bake_ms: u64,
    /// When the wave in force began (the release's or its last promotion's time, the writer's
    /// clock), Unix ms.
    pub wave_since_ms: u64,
    /// This node's clock, Unix ms.
    pub now_ms: u64,
    /// The release's guards.
    pub guards: &'a Guards,
    /// The processes, on any node, that reported failing to apply the target (`on_change`
    /// returned an error), described (`api (pid 41) on n2: pool must be at most 16`).
    pub failures: &'a [String],
    /// The error rates processes on targeted nodes reported while running the release, in
    /// parts per million, each with the process described (`api (pid 41) on n2`).
    pub error_rates: &'a [(String, u32)],
    /// The targeted nodes dead to this member.
    pub dead: &'a [String],
}

/// The guard rule (SPEC F15): the release is aborted when more processes failed to apply its
/// target than its guards allow (by default any one), when a process on a targeted node reports
/// an error rate over the release's bound, or, with the node-health guard, when a targeted node
/// is dead; otherwise a wave that held through its bake time plus
/// [`crate::limits::BAKE_SKEW_MARGIN_MS`] on this node's clock is promoted to the next.
pub fn guard_action(view: &GuardView<'_>) -> Option<GuardAction> {
    let abort = |what: String| {
        let reason = format!("guard: {what}");
        GuardAction::Abort { reason: reason.chars().take(crate::limits::MESSAGE_BYTES_MAX / 4).collect() }
    };
    if view.failures.len() > view.guards.max_failed as usize {
        let first = &view.failures[0];
        let more = match view.failures.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        let what = match view.guards.max_failed {
            0 => format!("a process failed to apply {} (release {}): {first}{more}", view.to, view.release),
            allowed => format!(
                "{} processes failed to apply {} (release {}), more than {allowed}: {first}{more}",
                view.failures.len(),
                view.to,
                view.release
            ),
        };
        return Some(abort(what));
    }
    if let Some(bound) = view.guards.max_error_rate_ppm
        && let Some((process, rate)) =
            view.error_rates.iter().filter(|(_, rate)| *rate > bound).max_by_key(|(_, rate)| *rate)
    {
        return Some(abort(format!(
            "error rate {}% over {}% (release {} of {}): {process}",
            f64::from(*rate) / 10_000.0,
            f64::from(bound) / 10_000.0,
            view.release,
            view.to
        )));
    }
    if view.guards.node_health && !view.dead.is_empty() {
        return Some(abort(format!(
            "{} of the release {} ({}) dead: {}",
            if view.dead.len() == 1 { "a node" } else { "nodes" },
            view.release,
            view.to,
            view.dead.join(", ")
        )));
    }
    let next = view.wave.saturating_add(1);
    let baked = view.now_ms
        >= view.wave_since_ms.saturating_add(view.bake_ms).saturating_add(crate::limits::BAKE_SKEW_MARGIN_MS);
    (view.bake_ms > 0 && (next as usize) < view.waves.len() && baked).then_some(GuardAction::Promote { wave: next })
}

/// The release in force: the release version with the largest id whose target this node can
/// read (a target it cannot read, which only a faulty peer can write, is skipped).
pub(crate) fn current_release<'a>(
    records: &'a BTreeSet<VersionId>,
    versions: &'a BTreeMap<VersionId, VersionEntry>,
) -> Option<&'a VersionId> {
    records.iter().rev().find(|id| match versions.get(*id).map(|entry| &entry.info.kind) {
        Some(VersionKind::Release { to, .. }) => versions.contains_key(to),
        _ => false,
    })
}

/// The version a gated group serves to `viewer`: the target of the newest release that is not
/// aborted and holds the viewer, else the group's first version (the smallest id: every other
/// version depends on it).
pub(crate) fn served_target(
    group: &str,
    records: &BTreeSet<VersionId>,
    versions: &BTreeMap<VersionId, VersionEntry>,
    viewer: &Viewer,
) -> Option<VersionId> {
    match serving_release(group, records, versions, viewer) {
        Some((_, to)) => Some(to.clone()),
        None => versions.keys().next().cloned(),
    }
}

/// The release that gives `viewer` what it serves, and its target: the newest release that is
/// not aborted and holds the viewer (`None` before any: the group's first version is served).
pub(crate) fn serving_release<'a>(
    group: &str,
    records: &'a BTreeSet<VersionId>,
    versions: &'a BTreeMap<VersionId, VersionEntry>,
    viewer: &Viewer,
) -> Option<(&'a VersionId, &'a VersionId)> {
    for id in records.iter().rev() {
        let Some(VersionKind::Release { to, strategy, .. }) = versions.get(id).map(|entry| &entry.info.kind) else {
            continue;
        };
        if !versions.contains_key(to) {
            continue;
        }
        let progress = progress(id, records, versions);
        if progress.aborted.is_none() && in_slice(group, id, strategy, progress.wave, viewer) {
            return Some((id, to));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{Canary, ReleasePolicy};
    use crate::time::Millis;
    use crate::version::VersionInfo;

    fn entry(counter: u64, actor: &str, kind: VersionKind) -> (VersionId, VersionEntry) {
        let id = VersionId { counter, actor: actor.to_owned() };
        let info = VersionInfo {
            id: id.clone(),
            author: String::new(),
            time: Millis(0),
            message: String::new(),
            kind,
            content_hash: String::new(),
            hash_scheme: crate::version::CONTENT_HASH_SCHEME,
            parents: Vec::new(),
            secret: Vec::new(),
        };
        (id, VersionEntry { info, change: automerge::ChangeHash([counter as u8; 32]) })
    }

    fn release(to: &VersionId, strategy: ReleaseStrategy) -> VersionKind {
        VersionKind::Release { to: to.clone(), from: None, strategy, guards: Guards::default() }
    }

    fn viewer(node: &str) -> Viewer {
        Viewer { node: node.to_owned(), labels: BTreeMap::new() }
    }

    #[test]
    fn the_largest_release_wins_and_a_group_without_one_serves_its_first_version() {
        let (v1, e1) = entry(1, "aa", VersionKind::Create);
        let (v2, e2) = entry(2, "aa", VersionKind::Set { keys: vec!["a".into()] });
        let (v3, e3) = entry(3, "bb", VersionKind::Set { keys: vec!["b".into()] });
        let mut versions = BTreeMap::from([(v1.clone(), e1), (v2.clone(), e2), (v3.clone(), e3)]);
        let mut records = BTreeSet::new();
        assert_eq!(served_target("g", &records, &versions, &viewer("n1")), Some(v1.clone()));
        // Two releases made at once (same counter): the larger actor wins, on every node.
        let (r_a, e_a) = entry(4, "aa", release(&v3, ReleaseStrategy::All));
        let (r_b, e_b) = entry(4, "bb", release(&v2, ReleaseStrategy::All));
        versions.extend([(r_a.clone(), e_a), (r_b.clone(), e_b)]);
        records.extend([r_a, r_b.clone()]);
        assert_eq!(served_target("g", &records, &versions, &viewer("n1")), Some(v2.clone()));
        assert_eq!(current_release(&records, &versions), Some(&r_b));
        // A release whose target this node cannot read is skipped.
        let unknown = VersionId { counter: 99, actor: "cc".into() };
        let (r_bad, e_bad) = entry(5, "aa", release(&unknown, ReleaseStrategy::All));
        versions.insert(r_bad.clone(), e_bad);
        records.insert(r_bad);
        assert_eq!(served_target("g", &records, &versions, &viewer("n1")), Some(v2));
        assert_eq!(current_release(&records, &versions), Some(&r_b));
    }

    #[test]
    fn a_canary_slice_is_deterministic_grows_with_its_waves_and_respects_its_selector() {
        let release_id = VersionId { counter: 7, actor: "ab".into() };
        let canary = |waves: Vec<u8>, selector: &[(&str, &str)]| {
            ReleaseStrategy::Canary(Canary {
                waves,
                selector: selector.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                bake_ms: 0,
            })
        };
        let strategy = canary(vec![10, 50, 100], &[]);
        let nodes: Vec<String> = (0..1000).map(|n| format!("node-{n}")).collect();
        let slice = |wave: u32| -> BTreeSet<&String> {
            nodes.iter().filter(|n| in_slice("g", &release_id, &strategy, wave, &viewer(n))).collect()
        };
        let (first, second, last) = (slice(0), slice(1), slice(2));
        // Close to the percentage (binomial, 1,000 nodes: within 4 standard deviations).
        assert!((60..=140).contains(&first.len()), "{}", first.len());
        assert!((430..=570).contains(&second.len()), "{}", second.len());
        assert_eq!(last.len(), 1000);
        assert!(first.is_subset(&second) && second.is_subset(&last), "a node in a wave stays in every later one");
        // Another release orders the nodes differently.
        let other = VersionId { counter: 8, actor: "ab".into() };
        let other_first: BTreeSet<&String> =
            nodes.iter().filter(|n| in_slice("g", &other, &strategy, 0, &viewer(n))).collect();
        assert_ne!(first, other_first);
        // A selector: only matching nodes, and all of them at 100%.
        let eu = canary(vec![100], &[("region", "eu")]);
        let mut labelled = viewer("n1");
        assert!(!in_slice("g", &release_id, &eu, 0, &labelled));
        labelled.labels.insert("region".into(), "eu".into());
        assert!(in_slice("g", &release_id, &eu, 0, &labelled));
    }

    #[test]
    fn abort_wins_over_promotions_in_any_order_and_promotions_take_the_largest_wave() {
        let (v1, e1) = entry(1, "aa", VersionKind::Create);
        let (v2, e2) = entry(2, "aa", VersionKind::Set { keys: vec!["a".into()] });
        let strategy = ReleaseStrategy::Canary(Canary { waves: vec![1, 2, 100], ..Canary::default() });
        let (r, er) = entry(3, "aa", release(&v2, strategy));
        let (p1, ep1) = entry(4, "bb", VersionKind::Promote { release: r.clone(), wave: 2 });
        let (p2, ep2) = entry(4, "cc", VersionKind::Promote { release: r.clone(), wave: 1 });
        let mut versions = BTreeMap::from([(v1.clone(), e1), (v2.clone(), e2), (r.clone(), er), (p1.clone(), ep1)]);
        versions.insert(p2.clone(), ep2);
        let mut records = BTreeSet::from([r.clone(), p1, p2]);
        let folded = progress(&r, &records, &versions);
        assert_eq!((folded.wave, folded.aborted.clone()), (2, None));
        // Wave 2 is 100%: every node serves v2.
        assert_eq!(served_target("g", &records, &versions, &viewer("zz")), Some(v2.clone()));
        let (a, ea) = entry(4, "dd", VersionKind::Abort { release: r.clone(), reason: "errors".into() });
        versions.insert(a.clone(), ea);
        records.insert(a);
        assert_eq!(progress(&r, &records, &versions).aborted.as_deref(), Some("errors"));
        assert_eq!(served_target("g", &records, &versions, &viewer("zz")), Some(v1), "aborted: back to before");
    }

    #[test]
    fn policies_parse_and_print() {
        for policy in [ReleasePolicy::Immediate, ReleasePolicy::Gated] {
            assert_eq!(policy.to_string().parse::<ReleasePolicy>(), Ok(policy));
        }
        assert!("later".parse::<ReleasePolicy>().is_err());
        let canary = Canary { waves: vec![10, 50, 100], ..Canary::default() };
        assert!(canary.validate().is_ok());
        for bad in [vec![], vec![50, 10], vec![0, 10], vec![10, 10], vec![101]] {
            assert!(Canary { waves: bad.clone(), ..Canary::default() }.validate().is_err(), "{bad:?}");
        }
        assert_eq!(
            crate::configuration::parse_selector("region=eu, tier=web").unwrap().len(),
            2,
            "pairs separated by commas"
        );
        assert!(crate::configuration::parse_selector("region").is_err());
        assert!(crate::configuration::parse_selector("re gion=eu").is_err());
    }

    #[test]
    fn a_failure_aborts_and_a_wave_that_held_through_its_bake_is_promoted() {
        let failures = vec!["api (pid 7) on n2: bad pool".to_owned()];
        let view = GuardView {
            release: "v5",
            to: "v4",
            wave: 0,
            waves: &[10, 50, 100],
            bake_ms: 60_000,
            wave_since_ms: 1_000_000,
            now_ms: 1_000_000 + 60_000 + crate::limits::BAKE_SKEW_MARGIN_MS,
            guards: &Guards::default(),
            failures: &[],
            error_rates: &[],
            dead: &[],
        };
        assert_eq!(guard_action(&view), Some(GuardAction::Promote { wave: 1 }));
        assert_eq!(guard_action(&GuardView { now_ms: view.now_ms - 1, ..view.clone() }), None, "still baking");
        assert_eq!(guard_action(&GuardView { bake_ms: 0, ..view.clone() }), None, "manual promotion");
        assert_eq!(guard_action(&GuardView { wave: 2, ..view.clone() }), None, "the last wave");
        assert_eq!(guard_action(&GuardView { waves: &[], ..view.clone() }), None, "strategy all");
        let Some(GuardAction::Abort { reason }) = guard_action(&GuardView { failures: &failures, ..view }) else {
            panic!("a failure must abort")
        };
        assert!(reason.contains("v4") && reason.contains("bad pool"), "{reason}");
    }

    #[test]
    fn each_guard_aborts_only_past_its_bound() {
        let failures = ["api (pid 1) on n2: no".to_owned(), "api (pid 2) on n3: no".to_owned()];
        let rates = [("api (pid 1) on n2".to_owned(), 30_000), ("api (pid 2) on n3".to_owned(), 5_000)];
        let dead = ["n3".to_owned()];
        let lenient = Guards { max_failed: 2, max_error_rate_ppm: Some(30_000), node_health: false };
        let view = GuardView {
            release: "v5",
            to: "v4",
            wave: 0,
            waves: &[],
            bake_ms: 0,
            wave_since_ms: 0,
            now_ms: 0,
            guards: &lenient,
            failures: &failures,
            error_rates: &rates,
            dead: &dead,
        };
        assert_eq!(guard_action(&view), None, "2 failures allowed, 3% is not over 3%, node health off");
        let aborts = |guards: Guards| match guard_action(&GuardView { guards: &guards, ..view.clone() }) {
            Some(GuardAction::Abort { reason }) => reason,
            other => panic!("{guards:?} must abort: {other:?}"),
        };
        let reason = aborts(Guards { max_failed: 1, ..lenient.clone() });
        assert!(reason.contains("2 processes failed to apply v4") && reason.contains("more than 1"), "{reason}");
        let reason = aborts(Guards { max_error_rate_ppm: Some(20_000), ..lenient.clone() });
        assert!(reason.contains("error rate 3% over 2%") && reason.contains("on n2"), "{reason}");
        let reason = aborts(Guards { node_health: true, ..lenient.clone() });
        assert!(reason.contains("dead: n3"), "{reason}");
        assert_eq!(
            guard_action(&GuardView {
                error_rates: &[],
                dead: &[],
                guards: &Guards { max_error_rate_ppm: Some(1), node_health: true, ..lenient },
                ..view
            }),
            None,
            "no report and no dead node: nothing to act on"
        );
    }
}
