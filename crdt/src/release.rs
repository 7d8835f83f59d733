//! Releases (SPEC F14), first step: a group's policy says whether each new version is served at
//! once (`immediate`, the default) or only once a release targets it (`gated`). A release is a
//! version of kind `release` in the group's document, so any node can make one, a strong group
//! commits it through a round like any write, and every node converges on the same answer.
//!
//! Which version a gated group serves is a pure function of its versions: the `to` of the
//! release with the largest id (ids order by Lamport counter, then actor, the same on every
//! node, so a release made after seeing another supersedes it and two made at once resolve
//! the same way everywhere), or the group's first version (empty settings) before any release.
//! Only strategy `all` exists for now: every member serves the target (docs/releases.md).

use std::collections::BTreeMap;

use crate::version::{VersionEntry, VersionId, VersionKind};

/// The release in force: the release version with the largest id whose target this node can
/// read (a target it cannot read, which only a faulty peer can write, is skipped).
pub(crate) fn current_release<'a>(
    releases: impl DoubleEndedIterator<Item = &'a VersionId>,
    versions: &'a BTreeMap<VersionId, VersionEntry>,
) -> Option<(&'a VersionId, &'a VersionId)> {
    releases.rev().find_map(|id| match &versions.get(id)?.info.kind {
        VersionKind::Release { to, .. } if versions.contains_key(to) => Some((id, to)),
        _ => None,
    })
}

/// The version a gated group serves: the current release's target, or the group's first
/// version (the smallest id: every other version depends on it) before any release.
pub(crate) fn served_target<'a>(
    releases: impl DoubleEndedIterator<Item = &'a VersionId>,
    versions: &'a BTreeMap<VersionId, VersionEntry>,
) -> Option<VersionId> {
    match current_release(releases, versions) {
        Some((_, to)) => Some(to.clone()),
        None => versions.keys().next().cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::{ReleasePolicy, ReleaseStrategy};
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
        };
        (id, VersionEntry { info, change: automerge::ChangeHash([counter as u8; 32]) })
    }

    fn release(to: &VersionId) -> VersionKind {
        VersionKind::Release { to: to.clone(), from: None, strategy: ReleaseStrategy::All }
    }

    #[test]
    fn the_largest_release_wins_and_a_group_without_one_serves_its_first_version() {
        let (v1, e1) = entry(1, "aa", VersionKind::Create);
        let (v2, e2) = entry(2, "aa", VersionKind::Set { keys: vec!["a".into()] });
        let (v3, e3) = entry(3, "bb", VersionKind::Set { keys: vec!["b".into()] });
        let mut versions = BTreeMap::from([(v1.clone(), e1), (v2.clone(), e2), (v3.clone(), e3)]);
        let mut releases = Vec::new();
        assert_eq!(served_target(releases.iter(), &versions), Some(v1.clone()));
        // Two releases made at once (same counter): the larger actor wins, on every node.
        let (r_a, e_a) = entry(4, "aa", release(&v3));
        let (r_b, e_b) = entry(4, "bb", release(&v2));
        versions.extend([(r_a.clone(), e_a), (r_b.clone(), e_b)]);
        releases.extend([r_a, r_b]);
        releases.sort();
        assert_eq!(served_target(releases.iter(), &versions), Some(v2.clone()));
        // A release whose target this node cannot read is skipped.
        let unknown = VersionId { counter: 99, actor: "cc".into() };
        let (r_bad, e_bad) = entry(5, "aa", release(&unknown));
        versions.insert(r_bad.clone(), e_bad);
        releases.push(r_bad);
        assert_eq!(served_target(releases.iter(), &versions), Some(v2));
    }

    #[test]
    fn policies_and_strategies_parse_and_print() {
        for policy in [ReleasePolicy::Immediate, ReleasePolicy::Gated] {
            assert_eq!(policy.to_string().parse::<ReleasePolicy>(), Ok(policy));
        }
        assert_eq!("all".parse::<ReleaseStrategy>(), Ok(ReleaseStrategy::All));
        assert!("canary".parse::<ReleaseStrategy>().unwrap_err().contains("not built"));
        assert!("later".parse::<ReleasePolicy>().is_err());
    }
}
