//! A strong group's configuration (its agreed, numbered member set) and a group's policy, as
//! stored in the group document (SPEC F11, F12; docs/protocol.md, "Strong groups").
//!
//! The configuration lives in the document itself (`ROOT.configuration`, canonical JSON), so it
//! is ordered with the writes: each configuration change is one strong change in the group's
//! single committed sequence, and a node's configuration is a pure function of its heads.

use std::collections::{BTreeMap, BTreeSet};
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
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseStrategy {
    /// Every member serves the release's target.
    #[default]
    All,
    /// A slice of the members, grown wave by wave (docs/releases.md).
    Canary(Canary),
}

/// A canary release: the members that match `selector` (all of them when it is empty) and
/// whose place in the release's deterministic order falls under the current wave's percentage
/// serve the target; the others serve what they served before.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Canary {
    /// Percentages of the matching members, strictly increasing, each 1 to 100: the release
    /// starts at the first; each promotion moves to the next.
    pub waves: Vec<u8>,
    /// Labels a member must carry (`region=eu-west`), all of them; empty: every member.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// How long each wave must hold, with no guard broken, before the members promote it to the
    /// next; 0: promotion is left to an operator.
    #[serde(default)]
    pub bake_ms: u64,
}

impl Canary {
    /// Checks the waves and the selector against their limits.
    pub fn validate(&self) -> Result<(), String> {
        use crate::limits::{RELEASE_BAKE_MS_MAX, RELEASE_SELECTOR_LABELS_MAX, RELEASE_WAVES_MAX};
        if self.waves.is_empty() || self.waves.len() > RELEASE_WAVES_MAX {
            return Err(format!("a canary needs 1 to {RELEASE_WAVES_MAX} waves, not {}", self.waves.len()));
        }
        if self.waves.iter().any(|w| !(1..=100).contains(w)) || self.waves.windows(2).any(|p| p[0] >= p[1]) {
            return Err(format!(
                "waves {:?} must be percentages from 1 to 100, strictly increasing (10,50,100)",
                self.waves
            ));
        }
        if self.selector.len() > RELEASE_SELECTOR_LABELS_MAX {
            return Err(format!("a selector names at most {RELEASE_SELECTOR_LABELS_MAX} labels"));
        }
        for (key, value) in &self.selector {
            validate_label(key).and_then(|()| validate_label(value))?;
        }
        if self.bake_ms > RELEASE_BAKE_MS_MAX {
            return Err(format!("bake time {} ms is over the limit of {RELEASE_BAKE_MS_MAX} ms", self.bake_ms));
        }
        Ok(())
    }
}

/// What makes the members abort a release by themselves (SPEC F15), set per release. Every
/// live member evaluates them once a second from its own view (docs/releases.md, "Guards and
/// who acts"); the default aborts on the first process that fails to apply the release.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Guards {
    /// Abort once more than this many processes failed to apply the release (their reload
    /// callback returned an error); 0: the first failure aborts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_failed: u32,
    /// Abort once a process on a node the release targets reports an error rate above this,
    /// in parts per million of its requests (`--max-error-rate 2%` is 20,000); `None`: no
    /// error-rate guard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate_ppm: Option<u32>,
    /// Abort once a node the release targets is dead to the member evaluating.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_health: bool,
}

fn is_zero(count: &u32) -> bool {
    *count == 0
}

/// One in a million: the unit of [`Guards::max_error_rate_ppm`].
pub const PPM: u32 = 1_000_000;

impl Guards {
    /// True for the default guards (nothing stored with the release).
    pub fn is_default(&self) -> bool {
        *self == Guards::default()
    }

    /// Checks the error-rate bound.
    pub fn validate(&self) -> Result<(), String> {
        match self.max_error_rate_ppm {
            Some(ppm) if ppm > PPM => Err(format!("an error rate is at most 100%, not {}%", f64::from(ppm) / 10_000.0)),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Guards {
    /// `abort on 1 failed apply, an error rate over 2%, a dead node`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = vec![match self.max_failed {
            0 => "the first failed apply".to_owned(),
            n => format!("more than {n} failed applies"),
        }];
        if let Some(ppm) = self.max_error_rate_ppm {
            parts.push(format!("an error rate over {}%", f64::from(ppm) / 10_000.0));
        }
        if self.node_health {
            parts.push("a dead node".to_owned());
        }
        write!(f, "abort on {}", parts.join(", "))
    }
}

/// A label key or value in a selector: what `konord --label` accepts.
fn validate_label(text: &str) -> Result<(), String> {
    let ok = !text.is_empty()
        && text.len() <= crate::limits::LABEL_BYTES_MAX
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "selector label {:?} must be 1 to {} bytes of letters, digits, '-', '_', '.', '/'",
            text.chars().take(80).collect::<String>(),
            crate::limits::LABEL_BYTES_MAX
        ))
    }
}

/// Parses a selector: `k=v[,k=v]`.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut selector = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) =
            pair.split_once('=').ok_or_else(|| format!("selector {pair:?} is not key=value (region=eu-west)"))?;
        validate_label(key.trim())?;
        validate_label(value.trim())?;
        selector.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(selector)
}

impl fmt::Display for ReleaseStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReleaseStrategy::All => f.write_str("all"),
            ReleaseStrategy::Canary(canary) => {
                let waves: Vec<String> = canary.waves.iter().map(|w| format!("{w}%")).collect();
                write!(f, "canary {}", waves.join(","))?;
                if !canary.selector.is_empty() {
                    let pairs: Vec<String> = canary.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    write!(f, " of {}", pairs.join(","))?;
                }
                if canary.bake_ms > 0 {
                    write!(f, ", bake {} s", canary.bake_ms / 1000)?;
                }
                Ok(())
            }
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
