//! The last changes added to a document, in the order they were added, with their
//! dependencies. "Do a peer's heads include this recent change?" is asked for every pending
//! write at every membership view; Automerge answers it by walking the whole history
//! (`get_changes_meta`), which made it a quarter of a daemon's CPU time at a few thousand
//! versions. A walk over the changes added since the one asked about gives the same answer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::ChangeHash;

/// Changes remembered: older ones fall back to Automerge's walk.
pub(crate) const RECENT_CHANGES_MAX: usize = 1024;

/// A bounded window of the newest changes, oldest first, indexed by hash: a question about a
/// change costs the changes it visits, not the window (with 16 writes waiting for acks from
/// every member, building the window per question was a tenth of a daemon's time, issue 14).
#[derive(Debug, Default, Clone)]
pub(crate) struct RecentChanges {
    entries: VecDeque<(ChangeHash, Vec<ChangeHash>)>,
    /// Each remembered change's sequence number: how many changes were pushed before it.
    index: BTreeMap<ChangeHash, u64>,
    /// The sequence number of `entries[0]`.
    first: u64,
}

impl RecentChanges {
    /// Records a change just added to the document (every path that adds one must call this,
    /// in the order they are added).
    pub(crate) fn push(&mut self, hash: ChangeHash, deps: Vec<ChangeHash>) {
        if self.entries.len() == RECENT_CHANGES_MAX {
            if let Some((old, _)) = self.entries.pop_front() {
                // A hash pushed twice keeps the index of its later entry.
                if self.index.get(&old) == Some(&self.first) {
                    self.index.remove(&old);
                }
            }
            self.first += 1;
        }
        self.index.insert(hash, self.first + self.entries.len() as u64);
        self.entries.push_back((hash, deps));
        debug_assert!(self.entries.len() <= RECENT_CHANGES_MAX);
    }

    /// Whether `hash` is in the window (so in the document).
    pub(crate) fn contains(&self, hash: &ChangeHash) -> bool {
        self.index.contains_key(hash)
    }

    /// Whether `change` is `heads` or one of their ancestors, when `change` is in the window;
    /// `None` when it is not (the caller asks Automerge). Every head must be in the document.
    ///
    /// Exact: a descendant of `change` was added after it, so it is in the window, and every
    /// path from a head down to `change` runs through descendants of `change` only. A head
    /// outside the window was added before `change` and cannot descend from it.
    pub(crate) fn heads_include(&self, heads: &[ChangeHash], change: &ChangeHash) -> Option<bool> {
        let start = *self.index.get(change)?;
        // Changes added at or after `change`, by sequence number.
        let after = |hash: &ChangeHash| self.index.get(hash).copied().filter(|seq| *seq >= start);
        let mut stack: Vec<u64> = heads.iter().filter_map(after).collect();
        let mut seen = BTreeSet::new();
        while let Some(seq) = stack.pop() {
            if seq == start {
                return Some(true);
            }
            if !seen.insert(seq) {
                continue;
            }
            let position = usize::try_from(seq - self.first).ok()?;
            let (_, deps) = self.entries.get(position)?;
            stack.extend(deps.iter().filter_map(after));
        }
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    #[test]
    fn ancestry_is_found_through_the_window_only() {
        let mut recent = RecentChanges::default();
        // 1 <- 2 <- 3, and 4 concurrent with 2 (on 1); 5 merges 3 and 4.
        recent.push(h(1), vec![]);
        recent.push(h(2), vec![h(1)]);
        recent.push(h(3), vec![h(2)]);
        recent.push(h(4), vec![h(1)]);
        recent.push(h(5), vec![h(3), h(4)]);
        assert_eq!(recent.heads_include(&[h(3)], &h(2)), Some(true));
        assert_eq!(recent.heads_include(&[h(2)], &h(2)), Some(true));
        assert_eq!(recent.heads_include(&[h(4)], &h(2)), Some(false), "concurrent");
        assert_eq!(recent.heads_include(&[h(5)], &h(2)), Some(true), "through a merge");
        assert_eq!(recent.heads_include(&[h(1)], &h(3)), Some(false), "an older head");
        assert_eq!(recent.heads_include(&[h(4)], &h(9)), None, "unknown change: ask Automerge");
    }

    #[test]
    fn the_window_is_bounded() {
        let mut recent = RecentChanges::default();
        for n in 0..(RECENT_CHANGES_MAX + 10) {
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&(n as u64).to_le_bytes());
            recent.push(ChangeHash(hash), vec![]);
        }
        assert_eq!(recent.entries.len(), RECENT_CHANGES_MAX);
        assert_eq!(recent.index.len(), RECENT_CHANGES_MAX);
        assert_eq!(recent.heads_include(&[], &ChangeHash([0; 32])), None, "the oldest fell out");
        assert!(!recent.contains(&ChangeHash([0; 32])));
        // The window still answers across the sequence numbers it dropped.
        let hash = |n: usize| {
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&(n as u64).to_le_bytes());
            ChangeHash(hash)
        };
        recent.push(h(0xee), vec![hash(RECENT_CHANGES_MAX + 9)]);
        assert_eq!(recent.heads_include(&[h(0xee)], &hash(RECENT_CHANGES_MAX + 9)), Some(true));
        assert_eq!(recent.heads_include(&[h(0xee)], &hash(RECENT_CHANGES_MAX + 8)), Some(false));
    }
}
