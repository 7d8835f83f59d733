//! Error enums, one per family of operations a caller branches on. Each variant's doc says what
//! happened to state.

use serde::{Deserialize, Serialize};

use crate::file_format::FileFormat;

/// A key or group name that breaks the naming rules. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is the empty string.
    #[error("invalid key: a key may not be empty")]
    Empty,
    /// The key is longer than the limit.
    #[error("invalid key: {bytes} bytes, at most {max} allowed")]
    TooLong {
        /// The key, cut to the limit.
        key: String,
        /// Its length.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Two dots in a row, or a leading or trailing dot.
    #[error("invalid key {key:?}: empty segment (keys look like \"db.pool.size\")")]
    EmptySegment {
        /// The key.
        key: String,
    },
    /// One segment is too long.
    #[error("invalid key {key:?}: segment {segment:?} is longer than {max} bytes")]
    SegmentTooLong {
        /// The key.
        key: String,
        /// The segment.
        segment: String,
        /// The limit.
        max: usize,
    },
    /// Too many segments.
    #[error("invalid key {key:?}: {segments} segments, at most {max} allowed")]
    TooDeep {
        /// The key.
        key: String,
        /// How many it has.
        segments: usize,
        /// The limit.
        max: usize,
    },
    /// A character outside `[A-Za-z0-9_-]` in a segment.
    #[error("invalid key {key:?}: character {character:?} not allowed (use letters, digits, '_' or '-' between dots)")]
    BadCharacter {
        /// The key.
        key: String,
        /// The first offending character.
        character: char,
    },
    /// An overlay key (`key@selector`) whose selector breaks the rules.
    #[error("invalid overlay key {key:?}: {detail}")]
    BadOverlay {
        /// The stored key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// A group name that breaks the rules.
    #[error("invalid group name {name:?}: use 1 to 64 letters, digits, '_' or '-', starting with a letter or digit")]
    BadGroupName {
        /// The name.
        name: String,
    },
}

/// A value that cannot be stored. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Canonical JSON of the value is over the limit.
    #[error(
        "value of {key:?} is {bytes} bytes as JSON, at most {max} allowed (store large data elsewhere and reference it)"
    )]
    TooLarge {
        /// The key.
        key: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Stored text that is not JSON.
    #[error("value of {key:?} is not JSON: {detail}")]
    NotJson {
        /// The key.
        key: String,
        /// The parser's words.
        detail: String,
    },
}

/// A configuration file that cannot be applied. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The text does not parse.
    #[error("{format} file does not parse: {detail}")]
    Syntax {
        /// The format tried.
        format: FileFormat,
        /// The parser's words, with line and column.
        detail: String,
    },
    /// The top level is not a table/object.
    #[error("{format} file must hold a table of settings at the top level")]
    NotATable {
        /// The format.
        format: FileFormat,
    },
    /// The same flattened key twice.
    #[error("key {key:?} is defined twice in the file (once nested, once dotted?)")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// Too big.
    #[error("file is {bytes} bytes, at most {max} allowed")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Too many keys.
    #[error("file has {keys} keys, a group holds at most {max}")]
    TooManyKeys {
        /// How many.
        keys: usize,
        /// The limit.
        max: usize,
    },
    /// A key in the file is invalid.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A value in the file is too large.
    #[error(transparent)]
    Value(#[from] ValueError),
}

/// A version reference that names no version, or several. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionError {
    /// Not of the form `v12`, `12` or `v12-3fa9`.
    #[error("{text:?} is not a version: write it as v12 (or v12-3fa9 when several share a number)")]
    Unparsable {
        /// What was given.
        text: String,
    },
    /// No such version in this group.
    #[error("group {group:?} has no version {version}")]
    Unknown {
        /// The group.
        group: String,
        /// What was asked for.
        version: String,
    },
    /// Several concurrent versions share the counter.
    #[error("version {version} of group {group:?} is ambiguous: it could be any of {candidates}")]
    Ambiguous {
        /// The group.
        group: String,
        /// What was asked for.
        version: String,
        /// The full labels that match, comma separated.
        candidates: String,
    },
    /// The version exists but its settings are in an archived epoch.
    #[error("version {version} of group {group:?} is in an earlier epoch; its settings are archived")]
    Archived {
        /// The group.
        group: String,
        /// The version.
        version: String,
    },
}

/// A local write that was refused. Nothing changed: the document, the read view and the version
/// list are exactly as before the call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// An invalid key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A value that cannot be stored.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// A file that cannot be applied.
    #[error(transparent)]
    File(#[from] FileError),
    /// A bad version reference (rollback).
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The write would leave the group with too many keys.
    #[error("group would hold {keys} keys, at most {max} allowed")]
    TooManyKeys {
        /// How many it would hold.
        keys: usize,
        /// The limit.
        max: usize,
    },
    /// The write would leave the group's settings too large.
    #[error("group settings would be {bytes} bytes, at most {max} allowed")]
    SettingsTooLarge {
        /// The size it would have.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The write would leave the group with too many keys marked secret.
    #[error("group would have {marked} keys marked secret, at most {max} allowed (marks are never taken back)")]
    TooManySecretKeys {
        /// How many it would have.
        marked: usize,
        /// The limit.
        max: usize,
    },
    /// The commit message or author is too long.
    #[error("{what} is {bytes} bytes, at most {max} allowed")]
    MetaTooLong {
        /// "message" or "author".
        what: &'static str,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The write names no key.
    #[error("nothing to write: name at least one key")]
    NoKeys,
    /// The write would not change the settings; no version was created.
    #[error("no change: the settings already hold these values (no version created)")]
    Unchanged,
    /// Deleting keys that do not exist.
    #[error("key {key:?} is not set in group {group:?}")]
    NoSuchKey {
        /// The group.
        group: String,
        /// The key.
        key: String,
    },
    /// A schema that cannot be set.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The write would break the group's schema (SPEC F8): it adds these violations.
    #[error("refused by the schema of group {group:?}: {}", violations_text(violations))]
    SchemaViolation {
        /// The group.
        group: String,
        /// What the write would break (sorted; more than `VIOLATIONS_REPORTED_MAX` are cut).
        violations: Vec<Violation>,
    },
    /// The group's document holds a schema this node cannot compile (written by a newer
    /// konord?): writes are refused rather than left unchecked; a new schema may be set.
    #[error("group {group:?} holds a schema this node cannot use ({detail}); set a new schema or upgrade konord")]
    SchemaUnusable {
        /// The group.
        group: String,
        /// Why.
        detail: String,
    },
    /// A release asked of a group whose versions are served at once (SPEC F14).
    #[error("group {group:?} serves every version at once (release policy immediate): releases need a gated group")]
    NotGated {
        /// The group.
        group: String,
    },
    /// A release, promotion or abort that cannot be made (bad waves, nothing to promote).
    #[error("{detail}")]
    BadRelease {
        /// What is wrong.
        detail: String,
    },
    /// An overlay that cannot be written (an immediate group, too many selectors).
    #[error("{detail}")]
    BadOverlay {
        /// What is wrong.
        detail: String,
    },
    /// A condition that cannot be checked (not a content hash, for example).
    #[error("bad condition: {detail}")]
    BadCondition {
        /// What is wrong.
        detail: String,
    },
    /// A conditional write whose condition does not hold: the group has moved on (SPEC F5).
    #[error("condition failed: group {group:?} {expected}, but {actual}; nothing was written")]
    ConditionFailed {
        /// The group.
        group: String,
        /// The condition, in words (`is at v12`).
        expected: String,
        /// What holds instead (`its heads are v13`).
        actual: String,
    },
    /// Automerge refused the transaction (a bug on our side, reported, never a panic).
    #[error("document error: {detail}")]
    Document {
        /// Automerge's words.
        detail: String,
    },
}

/// A schema that cannot be used (SPEC F8). Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// Not a JSON Schema the validator accepts (the validator's words).
    #[error("not a usable JSON Schema: {detail}")]
    Invalid {
        /// What is wrong.
        detail: String,
    },
    /// Over the size limit.
    #[error("schema is {bytes} bytes as canonical JSON, at most {max} allowed")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

/// One broken rule: which key, its value, which rule of the schema, and the validator's words.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Violation {
    /// The key the rule is about (`None`: the settings as a whole, for example a `required`
    /// key that is missing, whose name is in `message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The key's value as canonical JSON text, when the key is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Where the rule is in the schema, as a JSON pointer (`/properties/db.port/maximum`).
    pub rule: String,
    /// What is wrong, in the validator's words.
    pub message: String,
}

impl std::fmt::Display for Violation {
    /// One line, a long value or message cut (a value may be 16 KiB).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message = shortened(&self.message);
        match (&self.key, &self.value) {
            (Some(key), Some(value)) => write!(f, "key {key:?} = {}: {message} (rule {})", shortened(value), self.rule),
            (Some(key), None) => write!(f, "key {key:?}: {message} (rule {})", self.rule),
            (None, _) => write!(f, "{message} (rule {})", self.rule),
        }
    }
}

/// `text` cut to about 200 bytes at a character boundary, with "..." when cut.
fn shortened(text: &str) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 200;
    if text.len() <= SHOWN {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!("{}...", &text[..end]))
}

/// The violations a refused write would have added, as one line.
pub(crate) fn violations_text(violations: &[Violation]) -> String {
    let shown = violations.len().min(crate::limits::VIOLATIONS_REPORTED_MAX);
    let mut text = violations[..shown].iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    if violations.len() > shown {
        text.push_str("; and more");
    }
    text
}

/// Changes or a sync message from a peer that were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// Over the size limit; nothing was decoded or applied.
    #[error("{what} of {bytes} bytes is over the limit of {max}")]
    TooLarge {
        /// "change" or "sync message".
        what: &'static str,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not a valid Automerge change or sync message; nothing was applied.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// "change", "sync message" or "sync state".
        what: &'static str,
        /// The decoder's words.
        detail: String,
    },
    /// Automerge refused to apply decoded changes. Batches before the failing one were applied
    /// (each batch is all-or-nothing in Automerge); the read view matches the document.
    #[error("changes refused by the document: {detail}")]
    Rejected {
        /// Automerge's words.
        detail: String,
    },
}

/// A group file or snapshot that cannot be loaded. Nothing is served from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file does not start with the Konorkestra record header.
    #[error("not a konorkestra group file (bad header): {detail}")]
    BadHeader {
        /// What was wrong.
        detail: String,
    },
    /// A record kind this version does not know (written by a newer version?).
    #[error("unknown record kind {kind} at offset {offset}; upgrade konord to read this file")]
    UnknownRecord {
        /// The kind byte.
        kind: u8,
        /// Where.
        offset: usize,
    },
    /// No intact snapshot record: nothing to build the document from.
    #[error("no intact snapshot record in the file; repair it from a peer")]
    NoSnapshot,
    /// The snapshot bytes are not an Automerge document.
    #[error("snapshot does not load: {detail}")]
    Snapshot {
        /// Automerge's words.
        detail: String,
    },
    /// The document loads but is not a Konorkestra group (missing or wrong structure).
    #[error("document is not a konorkestra group: {detail}")]
    NotAGroup {
        /// What is missing.
        detail: String,
    },
}
