//! A strong group's configuration (its agreed, numbered member set) and a group's policy, as
//! stored in the group document (SPEC F11, F12; docs/protocol.md, "Strong groups").
//!
//! The configuration lives in the document itself (`ROOT.configuration`, canonical JSON), so it
//! is ordered with the writes: each configuration change is one strong change in the group's
//! single committed sequence, and a node's configuration is a pure function of its heads.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::time::Millis;

/// A strong group's member set, numbered. Every write needs a durable yes from every member;
/// a change of the member set needs a majority of the old one (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Configuration {
    /// Starts at 1 when the group is created and grows by one with every change.
    pub number: u64,
    /// The members (node ids).
    pub members: BTreeSet<String>,
}

impl Configuration {
    /// The first configuration of a group: its creator alone.
    pub fn initial(creator: &str) -> Configuration {
        Configuration { number: 1, members: BTreeSet::from([creator.to_owned()]) }
    }

    /// The smallest number of members that is more than half of them: any two such sets share a
    /// member (quorum intersection).
    pub fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }

    /// True when `node` is a member.
    pub fn contains(&self, node: &str) -> bool {
        self.members.contains(node)
    }

    /// The next configuration: `members`, numbered one more.
    pub fn next(&self, members: BTreeSet<String>) -> Configuration {
        Configuration { number: self.number + 1, members }
    }

    /// Canonical JSON text, as stored in the document.
    pub fn to_json(&self) -> String {
        // Plain strings and a number: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses [`Configuration::to_json`] output; `None` for anything else.
    pub fn from_json(text: &str) -> Option<Configuration> {
        serde_json::from_str(text).ok().filter(|c: &Configuration| c.number >= 1 && !c.members.is_empty())
    }
}

impl fmt::Display for Configuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members: Vec<&str> = self.members.iter().map(String::as_str).collect();
        write!(f, "c{} [{}]", self.number, members.join(", "))
    }
}

/// What a strong-group read does while the node cannot prove it is fresh (SPEC F12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fencing {
    /// Answer from the last durable state, flagged `stale`.
    #[default]
    Stale,
    /// Wait until the node is fresh again (bounded), then answer; fail with `unavailable`.
    Block,
}

impl fmt::Display for Fencing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fencing::Stale => "stale",
            Fencing::Block => "block",
        })
    }
}

impl FromStr for Fencing {
    type Err = String;
    fn from_str(text: &str) -> Result<Fencing, String> {
        match text {
            "stale" => Ok(Fencing::Stale),
            "block" => Ok(Fencing::Block),
            other => Err(format!("unknown fencing policy {other:?}: use stale or block")),
        }
    }
}

/// When a new version reaches a node's applications (`ROOT.policy.release`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleasePolicy {
    /// Every version is served as soon as the node holds it (today's behaviour).
    #[default]
    Immediate,
    /// Versions are written as always, but served only once a release targets them.
    Gated,
}

impl fmt::Display for ReleasePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReleasePolicy::Immediate => "immediate",
            ReleasePolicy::Gated => "gated",
        })
    }
}

impl FromStr for ReleasePolicy {
    type Err = String;
    fn from_str(text: &str) -> Result<ReleasePolicy, String> {
        match text {
            "immediate" => Ok(ReleasePolicy::Immediate),
            "gated" => Ok(ReleasePolicy::Gated),
            other => Err(format!("unknown release policy {other:?}: use immediate or gated")),
        }
    }
}

/// Which nodes a release reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseStrategy {
    /// Every member serves the release's target.
    #[default]
    All,
}

impl fmt::Display for ReleaseStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReleaseStrategy::All => "all",
        })
    }
}

impl FromStr for ReleaseStrategy {
    type Err = String;
    fn from_str(text: &str) -> Result<ReleaseStrategy, String> {
        match text {
            "all" => Ok(ReleaseStrategy::All),
            "canary" => Err("strategy canary is not built yet (docs/releases.md, build step 2): use all".to_owned()),
            other => Err(format!("unknown release strategy {other:?}: use all")),
        }
    }
}

/// A group's policy, set when it is created (`ROOT.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupPolicy {
    /// A member of a strong group dead for this long (by the failure detector of the node that
    /// proposes it) is removed from the configuration, if a majority agrees. Never below
    /// [`crate::limits::EVICT_AFTER_MIN_MS`].
    pub evict_after: Millis,
    /// What reads do while the node cannot prove it is fresh.
    pub fencing: Fencing,
    /// Whether a new version is served at once or only once a release targets it (SPEC F14).
    pub release: ReleasePolicy,
}

impl Default for GroupPolicy {
    fn default() -> GroupPolicy {
        GroupPolicy {
            evict_after: Millis(crate::limits::EVICT_AFTER_DEFAULT_MS),
            fencing: Fencing::Stale,
            release: ReleasePolicy::Immediate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majorities_of_any_size_intersect() {
        for size in 1..=9usize {
            let members = (0..size).map(|i| format!("n{i}")).collect();
            let configuration = Configuration { number: 1, members };
            assert!(2 * configuration.majority() > size, "size {size}");
            assert!(configuration.majority() <= size, "size {size}");
        }
    }

    #[test]
    fn configurations_round_trip_and_refuse_nonsense() {
        let configuration = Configuration::initial("n1").next(BTreeSet::from(["n1".into(), "n2".into()]));
        assert_eq!(configuration.number, 2);
        assert_eq!(Configuration::from_json(&configuration.to_json()), Some(configuration.clone()));
        assert_eq!(configuration.to_string(), "c2 [n1, n2]");
        assert_eq!(Configuration::from_json(r#"{"number":0,"members":["a"]}"#), None);
        assert_eq!(Configuration::from_json(r#"{"number":3,"members":[]}"#), None);
        assert_eq!(Configuration::from_json("nonsense"), None);
    }
}
