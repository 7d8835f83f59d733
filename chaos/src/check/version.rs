//! Version labels and one node's version graph, as its final `history` listed them.
//!
//! A label is `v<counter>` or, once another version with the same counter is known,
//! `v<counter>-<actor hex prefix>` (docs/data-model.md, "Identity and order"). So the label a
//! write was acknowledged with (`v12`) may show in a final history as `v12-3fa9c2d1`: two labels
//! name the same version only if they *may*: same counter, and one actor tag a prefix of the
//! other (or absent). Every judgement built on this is careful to stay sound when a label
//! matches more than one version.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::FinalState;

/// Whether labels `a` and `b` may name the same version.
pub(crate) fn labels_match(a: &str, b: &str) -> bool {
    let (counter_a, tag_a) = split(a);
    let (counter_b, tag_b) = split(b);
    if counter_a != counter_b {
        return false;
    }
    match (tag_a, tag_b) {
        (Some(tag_a), Some(tag_b)) => {
            let (tag_a, tag_b) = (tag_a.to_ascii_lowercase(), tag_b.to_ascii_lowercase());
            tag_a.starts_with(&tag_b) || tag_b.starts_with(&tag_a)
        }
        _ => true,
    }
}

/// `v12-3fa9` -> `v12`: labels that may name the same version share it.
pub(crate) fn counter_part(label: &str) -> &str {
    split(label).0
}

/// `v12-3fa9` -> (`v12`, `Some("3fa9")`).
fn split(label: &str) -> (&str, Option<&str>) {
    match label.split_once('-') {
        Some((counter, tag)) => (counter, Some(tag)),
        None => (label, None),
    }
}

/// The Lamport counter of a label (`v12-3fa9` -> 12): a version that saw another has a larger
/// one (docs/data-model.md, "Identity and order").
pub(crate) fn counter(label: &str) -> Option<u64> {
    split(label).0.strip_prefix('v')?.parse().ok()
}

/// One node's versions with their parents, by position in its list.
#[derive(Debug)]
pub(crate) struct VersionGraph<'a> {
    labels: Vec<&'a str>,
    /// Content hashes ("" where the history had none).
    hashes: Vec<&'a str>,
    counters: Vec<Option<u64>>,
    parents: Vec<Vec<usize>>,
    /// Counter part of a label (`v12`) -> the positions of the labels that have it.
    by_counter: BTreeMap<&'a str, Vec<usize>>,
}

impl<'a> VersionGraph<'a> {
    /// The graph of a final state. A parent is found by its exact label in the same list, else
    /// by every label that may name it.
    pub(crate) fn of(state: &'a FinalState) -> VersionGraph<'a> {
        let labels: Vec<&str> = state.versions.iter().map(|version| version.label.as_str()).collect();
        let mut by_counter: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut by_label: BTreeMap<&str, usize> = BTreeMap::new();
        for (position, label) in labels.iter().enumerate() {
            by_counter.entry(split(label).0).or_default().push(position);
            by_label.entry(label).or_insert(position);
        }
        let mut graph = VersionGraph {
            hashes: state.versions.iter().map(|version| version.content_hash.as_str()).collect(),
            counters: labels.iter().map(|label| counter(label)).collect(),
            labels,
            parents: Vec::new(),
            by_counter,
        };
        graph.parents = state
            .versions
            .iter()
            .map(|version| {
                version
                    .parents
                    .iter()
                    .flat_map(|parent| match by_label.get(parent.as_str()) {
                        Some(&position) => vec![position],
                        None => graph.candidates(parent),
                    })
                    .collect()
            })
            .collect();
        graph
    }

    /// Positions of the versions `label` may name.
    pub(crate) fn candidates(&self, label: &str) -> Vec<usize> {
        let positions = self.by_counter.get(split(label).0).map_or(&[][..], Vec::as_slice);
        positions.iter().copied().filter(|&position| labels_match(self.labels[position], label)).collect()
    }

    /// Positions of the versions `label` may name that also have `content_hash` (where both
    /// hashes are known): a write's own version, not a later one that took its counter after
    /// it was lost.
    pub(crate) fn candidates_with_hash(&self, label: &str, content_hash: &str) -> Vec<usize> {
        let mut positions = self.candidates(label);
        if !content_hash.is_empty() {
            positions.retain(|&position| self.hashes[position].is_empty() || self.hashes[position] == content_hash);
        }
        positions
    }

    /// Whether the version at `ancestor` is a strict ancestor of the one at `descendant`. The
    /// walk stops at versions whose counter is below the ancestor's: they cannot lead to it.
    pub(crate) fn is_strict_ancestor(&self, ancestor: usize, descendant: usize) -> bool {
        let floor = self.counters.get(ancestor).copied().flatten();
        let mut seen = BTreeSet::new();
        let mut stack = self.parents.get(descendant).cloned().unwrap_or_default();
        while let Some(position) = stack.pop() {
            if position == ancestor {
                return true;
            }
            let below = matches!((self.counters[position], floor), (Some(here), Some(floor)) if here < floor);
            if !below && seen.insert(position) {
                stack.extend(self.parents[position].iter().copied());
            }
        }
        false
    }

    /// Whether `earlier` is certainly causally before `later`: every version `earlier` may name
    /// is a strict ancestor of every version `later` may name (and both name at least one).
    pub(crate) fn certainly_before(&self, earlier: &str, later: &str) -> bool {
        if let (Some(earlier), Some(later)) = (counter(earlier), counter(later))
            && earlier >= later
        {
            return false;
        }
        let (earlier, later) = (self.candidates(earlier), self.candidates(later));
        !earlier.is_empty()
            && !later.is_empty()
            && earlier.iter().all(|&a| later.iter().all(|&b| self.is_strict_ancestor(a, b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::FinalVersion;

    #[test]
    fn a_short_label_matches_its_full_forms_and_nothing_else() {
        assert!(labels_match("v12", "v12"));
        assert!(labels_match("v12", "v12-3fa9c2d1"));
        assert!(labels_match("v12-3fa9", "v12-3FA9c2d1"));
        assert!(!labels_match("v12-3fa9", "v12-4fa9"));
        assert!(!labels_match("v12", "v13"));
        assert!(!labels_match("v1", "v12"));
    }

    #[test]
    fn ancestry_follows_parents_and_stays_unsure_on_an_ambiguous_label() {
        let version = |label: &str, parents: &[&str]| FinalVersion {
            label: label.into(),
            parents: parents.iter().map(|parent| parent.to_string()).collect(),
            content_hash: String::new(),
        };
        let state = FinalState {
            node: "n1".into(),
            group: "e".into(),
            at_ms: 0,
            heads: "h".into(),
            settings: Default::default(),
            versions: vec![
                version("v1", &[]),
                version("v2-aa", &["v1"]),
                version("v2-bb", &["v1"]),
                version("v3", &["v2-aa", "v2-bb"]),
            ],
        };
        let graph = VersionGraph::of(&state);
        assert!(graph.certainly_before("v1", "v3"));
        assert!(graph.certainly_before("v2", "v3"));
        assert!(!graph.certainly_before("v2-aa", "v2-bb"));
        assert!(!graph.certainly_before("v3", "v1"));
        assert!(!graph.certainly_before("v9", "v3"));
    }
}
