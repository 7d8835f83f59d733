//! ConfigSet versions: identity, order and the metadata stored with each one.
//!
//! A version is identified by `(counter, actor)`. The counter is one more than the largest
//! counter the writer had seen, a Lamport clock over versions; the actor is the Automerge actor
//! of the writer. Two nodes writing concurrently may pick the same counter, never the same pair,
//! so ids are never reused. Versions are totally ordered by `(counter, actor)`, the same on
//! every node. People see `v12`; when two versions share a counter, `v12-3fa9c2d1` (docs/data-model.md).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::configuration::{Guards, ReleaseStrategy};
use crate::error::VersionError;
use crate::file_format::FileFormat;
use crate::settings::{ContentHash, hex, unhex};
use crate::time::Millis;

/// The identity of a version: Lamport counter and writer actor (hex of the Automerge actor id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VersionId {
    /// One more than the largest counter the writer had seen.
    pub counter: u64,
    /// Lowercase hex of the writer's Automerge actor id.
    pub actor: String,
}

/// Hex digits of the actor shown when a counter is shared by several versions.
pub const ACTOR_TAG_CHARS: usize = 8;

impl VersionId {
    /// Builds an id from an Automerge actor.
    pub fn new(counter: u64, actor: &automerge::ActorId) -> VersionId {
        VersionId { counter, actor: hex(actor.to_bytes()) }
    }

    /// The key under which the version is stored in the document: unique, and ordered newest
    /// first (the counter is stored as `u64::MAX - counter`). Automerge walks a map in key
    /// order up to the key it writes when applying remote changes, so new versions sorting
    /// first keeps that walk short instead of crossing the whole history (measured: ~2 ms per
    /// applied change at 10k versions with oldest-first keys).
    pub fn storage_key(&self) -> String {
        format!("{:020}.{}", u64::MAX - self.counter, self.actor)
    }

    /// Parses [`VersionId::storage_key`] output.
    pub fn from_storage_key(key: &str) -> Option<VersionId> {
        let (inverted, actor) = key.split_once('.')?;
        if inverted.len() != 20 || actor.is_empty() || unhex(actor).is_none() {
            return None;
        }
        let inverted: u64 = inverted.parse().ok()?;
        Some(VersionId { counter: u64::MAX - inverted, actor: actor.to_owned() })
    }

    /// The full label, unique whatever else exists: `v12-3fa9c2d1`.
    pub fn full_label(&self) -> String {
        let tag = self.actor.get(..ACTOR_TAG_CHARS).unwrap_or(&self.actor);
        format!("v{}-{}", self.counter, tag)
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full_label())
    }
}

impl Serialize for VersionId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.storage_key())
    }
}

impl<'de> Deserialize<'de> for VersionId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        VersionId::from_storage_key(&text).ok_or_else(|| serde::de::Error::custom(format!("bad version id {text:?}")))
    }
}

/// What a person typed to name a version: `v12`, `12`, `v12-3fa9`, optionally `group@v12`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRef {
    /// The counter.
    pub counter: u64,
    /// A prefix of the actor hex, when given.
    pub actor_prefix: Option<String>,
}

impl FromStr for VersionRef {
    type Err = VersionError;
    fn from_str(text: &str) -> Result<Self, VersionError> {
        let bad = || VersionError::Unparsable { text: text.chars().take(80).collect() };
        let bare = text.rsplit_once('@').map_or(text, |(_, v)| v);
        let bare = bare.strip_prefix('v').unwrap_or(bare);
        let (counter, actor_prefix) = match bare.split_once('-') {
            Some((counter, actor)) => {
                let actor = actor.to_ascii_lowercase();
                if actor.is_empty() || !actor.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad());
                }
                (counter, Some(actor))
            }
            None => (bare, None),
        };
        let counter = counter.parse::<u64>().map_err(|_| bad())?;
        Ok(VersionRef { counter, actor_prefix })
    }
}

impl VersionRef {
    /// True when `id` is one of the versions this reference can mean.
    pub fn matches(&self, id: &VersionId) -> bool {
        id.counter == self.counter
            && self.actor_prefix.as_ref().is_none_or(|prefix| id.actor.starts_with(prefix.as_str()))
    }
}

/// What a version did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VersionKind {
    /// The group was created.
    Create,
    /// Keys were set (the keys, sorted).
    Set {
        /// Keys written.
        keys: Vec<String>,
    },
    /// Keys were deleted.
    Delete {
        /// Keys removed.
        keys: Vec<String>,
    },
    /// A whole file replaced the settings.
    Apply {
        /// Its syntax.
        format: FileFormat,
    },
    /// The settings were rolled back to an earlier version's.
    Rollback {
        /// The version whose settings were restored.
        to: VersionId,
    },
    /// A strong group's configuration changed (settings unchanged).
    Membership {
        /// The new configuration's number.
        configuration: u64,
        /// Members added.
        added: Vec<String>,
        /// Members removed.
        removed: Vec<String>,
    },
    /// The group's schema was set or removed (settings unchanged; SPEC F8).
    Schema {
        /// The new schema's hash (12 hex digits of its canonical text's SHA-256); `None`: the
        /// schema was removed.
        schema: Option<String>,
    },
    /// A release (SPEC F14; gated groups): from now on the members serve `to`'s settings
    /// (settings unchanged; docs/releases.md).
    Release {
        /// The version released.
        to: VersionId,
        /// The version served before, on the node that made the release.
        from: Option<VersionId>,
        /// Which nodes it reaches.
        strategy: ReleaseStrategy,
        /// What makes the members abort it (SPEC F15).
        #[serde(default, skip_serializing_if = "Guards::is_default")]
        guards: Guards,
    },
    /// A canary release moved to a later wave (settings unchanged).
    Promote {
        /// The release.
        release: VersionId,
        /// The wave now in force (0 is the first).
        wave: u32,
    },
    /// A release was aborted: every member serves what it served before it (settings unchanged).
    Abort {
        /// The release.
        release: VersionId,
        /// Why.
        reason: String,
    },
}

impl VersionKind {
    /// One word for tables.
    pub fn name(&self) -> &'static str {
        match self {
            VersionKind::Create => "create",
            VersionKind::Set { .. } => "set",
            VersionKind::Delete { .. } => "delete",
            VersionKind::Apply { .. } => "apply",
            VersionKind::Rollback { .. } => "rollback",
            VersionKind::Membership { .. } => "membership",
            VersionKind::Schema { .. } => "schema",
            VersionKind::Release { .. } => "release",
            VersionKind::Promote { .. } => "promote",
            VersionKind::Abort { .. } => "abort",
        }
    }
}

/// The immutable record of one version, stored in the group document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Identity and order.
    pub id: VersionId,
    /// Who made it (an operator name, a service account).
    pub author: String,
    /// When, as given by the writer's shell.
    pub time: Millis,
    /// Why.
    pub message: String,
    /// What it did.
    #[serde(flatten)]
    pub kind: VersionKind,
    /// Hex of the content hash of the settings the writer had right after writing.
    pub content_hash: String,
    /// Which definition `content_hash` follows: [`CONTENT_HASH_SCHEME`] in versions written
    /// since issue 12. Older versions have no such field (read as 1): their hash was a sum of
    /// per-entry hashes, and is kept as written, for display only.
    #[serde(default = "retired_hash_scheme")]
    pub hash_scheme: u8,
    /// The versions the writer had as its heads when writing (more than one after a merge).
    pub parents: Vec<VersionId>,
    /// Keys this version marked secret (issue 17): their values, at every version, are masked
    /// for callers that may not reveal them. A mark is never taken back. Absent when empty, so
    /// versions that mark nothing read as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret: Vec<String>,
}

/// A version known to a document, with the change that created it.
#[derive(Debug, Clone)]
pub(crate) struct VersionEntry {
    pub(crate) info: VersionInfo,
    pub(crate) change: automerge::ChangeHash,
}

/// The content hash definition of docs/protocol.md (SHA-256 over the sorted canonical entries).
pub const CONTENT_HASH_SCHEME: u8 = 2;

fn retired_hash_scheme() -> u8 {
    1
}

impl VersionInfo {
    /// The content hash, when it parses and follows today's definition (a version written
    /// before it carries a hash that cannot be compared with today's).
    pub fn content_hash(&self) -> Option<ContentHash> {
        if self.hash_scheme != CONTENT_HASH_SCHEME {
            return None;
        }
        ContentHash::from_hex(&self.content_hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_refs_parse_in_every_spelling() {
        let plain: VersionRef = "v12".parse().unwrap();
        assert_eq!(plain, VersionRef { counter: 12, actor_prefix: None });
        assert_eq!("12".parse::<VersionRef>().unwrap(), plain);
        assert_eq!("checkout@v12".parse::<VersionRef>().unwrap(), plain);
        let tagged: VersionRef = "v12-3FA9".parse().unwrap();
        assert_eq!(tagged.actor_prefix.as_deref(), Some("3fa9"));
        for bad in ["", "v", "vx", "v1-", "v1-xyz", "v-1"] {
            assert!(bad.parse::<VersionRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_order_by_counter_then_actor_and_round_trip() {
        let a = VersionId { counter: 3, actor: "ff".into() };
        let b = VersionId { counter: 4, actor: "00".into() };
        let c = VersionId { counter: 4, actor: "01".into() };
        assert!(a < b && b < c);
        assert_eq!(VersionId::from_storage_key(&c.storage_key()), Some(c.clone()));
        assert!(VersionRef { counter: 4, actor_prefix: Some("0".into()) }.matches(&c));
        assert!(!VersionRef { counter: 4, actor_prefix: Some("00".into()) }.matches(&c));
        assert_eq!(VersionId::from_storage_key("12.zz"), None);
    }

    #[test]
    fn info_round_trips_through_json() {
        let info = VersionInfo {
            id: VersionId { counter: 2, actor: "abcd".into() },
            author: "ops".into(),
            time: Millis(5),
            message: "m".into(),
            kind: VersionKind::Rollback { to: VersionId { counter: 1, actor: "ab".into() } },
            content_hash: ContentHash::of([]).to_hex(),
            hash_scheme: CONTENT_HASH_SCHEME,
            parents: vec![VersionId { counter: 1, actor: "ab".into() }],
            secret: vec!["db.password".into()],
        };
        let text = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<VersionInfo>(&text).unwrap(), info);
        assert_eq!(info.content_hash(), Some(ContentHash::of([])));
    }

    #[test]
    fn versions_written_before_the_hash_scheme_load_without_a_comparable_hash() {
        // A version record as konord wrote it before issue 12: no `hash_scheme`, a summed hash.
        let old = VersionInfo {
            id: VersionId { counter: 1, actor: "ab".into() },
            author: "ops".into(),
            time: Millis(5),
            message: String::new(),
            kind: VersionKind::Create,
            content_hash: "0".repeat(64),
            hash_scheme: 1,
            parents: Vec::new(),
            secret: Vec::new(),
        };
        let text = serde_json::to_string(&old).unwrap().replace(",\"hash_scheme\":1", "");
        assert!(!text.contains("hash_scheme"), "{text}");
        let info: VersionInfo = serde_json::from_str(&text).unwrap();
        assert_eq!(info, old, "loads, its hash kept as written");
        assert_eq!(info.content_hash(), None, "not comparable with today's hashes");
    }
}
