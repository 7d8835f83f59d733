//! The strong group's history as the clients saw it, judged independently of the nodes'
//! opinion of themselves (SPEC invariant 3, issue 11):
//!
//! * **One committed sequence.** A strong group's changes form one chain, so a node's revision
//!   of the group is a position in it. Every observation of a version at a position (a write
//!   answered `committed`, a watcher's event, any read, stale or not) must agree with every
//!   other: two different versions at one position mean two commits where only one may be.
//! * **No stale read flagged fresh.** A read answered without the stale flag must not be older
//!   than a commit reported to any client before the read was asked, on any node.
//!
//! After the run, each member's history must be one chain: no version with two parents (a
//! merge of concurrent commits) and no two versions with the same parent.

use std::collections::BTreeMap;

/// What the clients saw of the strong group.
#[derive(Debug, Default)]
pub struct StrongHistory {
    /// The first version seen at each position, and where it was seen.
    positions: BTreeMap<u64, (String, String)>,
    /// Commits reported to clients: (reply time µs, position), in reply order.
    commits: Vec<(u64, u64)>,
    /// Observations checked.
    pub observations: u64,
    /// Fresh reads checked against the commits before them.
    pub fresh_reads_checked: u64,
}

/// A contradiction found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contradiction(pub String);

impl StrongHistory {
    /// `version` is at `position` (a node's revision) as seen by `source` (for the report).
    pub fn observe(&mut self, position: u64, version: &str, source: &str) -> Option<Contradiction> {
        self.observations += 1;
        match self.positions.get(&position) {
            Some((seen, first)) if seen != version => Some(Contradiction(format!(
                "two versions at position {position} of the strong group: {seen} ({first}) and {version} ({source})"
            ))),
            Some(_) => None,
            None => {
                self.positions.insert(position, (version.to_owned(), source.to_owned()));
                None
            }
        }
    }

    /// A write was answered `committed` at `at_us`, at `position`.
    pub fn committed(&mut self, at_us: u64, position: u64) {
        self.commits.push((at_us, position));
    }

    /// The newest position reported committed before `at_us`.
    pub fn floor_before(&self, at_us: u64) -> u64 {
        self.commits.iter().filter(|(replied, _)| *replied < at_us).map(|(_, position)| *position).max().unwrap_or(0)
    }

    /// A read asked at `asked_us` was answered fresh at `position`: not older than any commit
    /// reported before it was asked.
    pub fn fresh_read(&mut self, asked_us: u64, position: u64, source: &str) -> Option<Contradiction> {
        self.fresh_reads_checked += 1;
        let floor = self.floor_before(asked_us);
        (position < floor).then(|| {
            Contradiction(format!(
                "{source} served the strong group at position {position} without the stale flag, but position {floor} was reported committed before the read was asked"
            ))
        })
    }
}

/// Checks that versions with their parents form one chain: no merge (two parents) and no fork
/// (two versions on one parent). `versions` are (label, parent labels).
pub fn check_chain(versions: &[(String, Vec<String>)], node: &str) -> Option<Contradiction> {
    let mut children: BTreeMap<&str, &str> = BTreeMap::new();
    for (label, parents) in versions {
        if parents.len() > 1 {
            return Some(Contradiction(format!(
                "{node}: version {label} merges [{}]: two commits were made at one position",
                parents.join(", ")
            )));
        }
        if let Some(parent) = parents.first()
            && let Some(other) = children.insert(parent, label)
        {
            return Some(Contradiction(format!(
                "{node}: versions {other} and {label} both follow {parent}: two commits at one position"
            )));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_versions_at_one_position_are_caught() {
        let mut history = StrongHistory::default();
        assert_eq!(history.observe(5, "v4", "commit w1"), None);
        assert_eq!(history.observe(5, "v4", "n2 watcher"), None);
        let found = history.observe(5, "v4-ab12", "n3 read").unwrap();
        assert!(found.0.contains("two versions at position 5"), "{found:?}");
    }

    #[test]
    fn a_fresh_read_older_than_an_earlier_commit_is_caught() {
        let mut history = StrongHistory::default();
        history.committed(1_000, 7);
        assert_eq!(history.fresh_read(900, 6, "n1"), None, "asked before the commit was reported");
        assert!(history.fresh_read(1_100, 6, "n1").is_some());
        assert_eq!(history.fresh_read(1_100, 7, "n1"), None);
    }

    #[test]
    fn merges_and_forks_are_not_a_chain() {
        let chain = vec![("v1".to_owned(), vec![]), ("v2".to_owned(), vec!["v1".to_owned()])];
        assert_eq!(check_chain(&chain, "n1"), None);
        let mut fork = chain.clone();
        fork.push(("v2-ab".to_owned(), vec!["v1".to_owned()]));
        assert!(check_chain(&fork, "n1").is_some());
        let mut merge = chain;
        merge.push(("v3".to_owned(), vec!["v2".to_owned(), "v2-ab".to_owned()]));
        assert!(check_chain(&merge, "n1").is_some());
    }
}
