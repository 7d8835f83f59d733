//! A configuration group as one Automerge document: settings, versions, history, rollback and
//! conflicts, with a read view kept current so that reads never touch Automerge.
//!
//! Document layout (docs/data-model.md):
//! ```text
//! ROOT { format: 3,
//!        meta:     { name, mode, epoch },
//!        policy:   { version: 1, evict_after_ms, fencing, release },  (release: gated groups, format 4)
//!        configuration: "<Configuration JSON>"   (strong groups only)
//!        schema:   "<JSON Schema, canonical JSON>"  (when the group has one, SPEC F8)
//!        settings: { "<dotted.key>": { "<version storage key>": "<canonical JSON>" } },
//!        versions: { "<u64::MAX - counter, 20 digits>.<actor hex>": "<VersionInfo JSON>" } }
//! ```
//! Every local write is one Automerge change whose message is the version's storage key. Each
//! key is a register of its own (`register.rs`), so a change walks a bounded part of the
//! document whatever the group's age.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, Value as AmValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config_file::parse_config_file;
use crate::configuration::{Configuration, Fencing, GroupPolicy, Guards, ReleasePolicy, ReleaseStrategy};
use crate::diff::SettingsDiff;
use crate::error::{EditError, KeyError, LoadError, VersionError};
use crate::file_format::FileFormat;
use crate::key::validate_group_name;
use crate::limits::{AUTHOR_BYTES_MAX, KEYS_PER_GROUP_MAX, MESSAGE_BYTES_MAX, SECRET_KEYS_MAX, SETTINGS_BYTES_MAX};
use crate::schema::Schema;
use crate::settings::{ContentHash, Settings, hex};
use crate::time::Millis;
use crate::value::{decode_value, encode_value};
use crate::version::{CONTENT_HASH_SCHEME, VersionEntry, VersionId, VersionInfo, VersionKind, VersionRef};

/// Version of the document layout, stored at `ROOT.format`. 2 added the strong group's
/// configuration (`ROOT.configuration`) and the policy's `evict_after_ms` and `fencing`; format 1
/// documents still load (a strong group without a configuration refuses writes). 3 made each
/// setting a register of its own (`register.rs`); format 1 and 2 documents load and convert
/// key by key as keys are written, and the first write puts `ROOT.format = 3`, so an older
/// konord refuses the file rather than misread it.
pub const DOCUMENT_FORMAT: u64 = 3;

/// `ROOT.format` of a gated group (SPEC F14): written once, when the group is created, so that
/// a konord that does not know releases refuses the group (it would serve unreleased versions)
/// rather than misread it. The layout is format 3's, plus `ROOT.policy.release` and versions of
/// kind `release`.
pub const GATED_FORMAT: u64 = 4;

/// `ROOT.format` of a group that holds a secret mark (issue 17): the first write that marks a
/// key secret puts it, so that a konord that does not know secret marks refuses the group (it
/// would serve secret values to every reader) rather than misread it. The layout is format 3's
/// (or 4's: a gated group's release policy is read at its genesis change); versions may carry
/// `secret`.
pub const SECRET_FORMAT: u64 = 5;

/// A secret value as errors show it: canonical JSON text of the SDKs' `MASKED` (`"<secret>"`).
pub const MASKED_VALUE_TEXT: &str = "\"<secret>\"";

/// The newest `ROOT.format` this version reads.
pub const NEWEST_FORMAT: u64 = SECRET_FORMAT;

/// Version of the (for now empty) policy map, stored at `ROOT.policy.version`.
pub const POLICY_FORMAT: u64 = 1;

/// How a group commits writes (SPEC F10, F11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Committed once a live quorum holds the change durably.
    Eventual,
    /// Committed by an all-ack barrier round: visible everywhere or nowhere.
    Strong,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Eventual => "eventual",
            Mode::Strong => "strong",
        })
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "eventual" => Ok(Mode::Eventual),
            "strong" => Ok(Mode::Strong),
            other => Err(format!("unknown consistency mode {other:?}: use eventual or strong")),
        }
    }
}

/// Who, when and why, for one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitMeta {
    /// The author (an operator or service name).
    pub author: String,
    /// The message.
    pub message: String,
    /// The wall-clock time, given by the shell.
    pub time: Millis,
    /// A precondition (SPEC F5): the write is refused, with nothing changed, unless it holds.
    pub condition: Option<Condition>,
    /// Keys the write marks secret (issue 17), besides what it writes. Marking a key that is
    /// marked already does nothing.
    pub secret: Vec<String>,
}

/// What a conditional write expects of the group when it is made (optimistic concurrency).
/// Checked on the node that makes the write, against its own state, at the moment it writes. In a
/// strong group the write's round then commits only if every member of the configuration holds
/// exactly that state, so the check holds for the committed sequence; in an eventual group a
/// write made concurrently on another node still merges (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Condition {
    /// The group's only latest version must be this one (`v12`, `v12-3fa9`).
    pub version: Option<String>,
    /// The settings' content hash must start with these hex digits (12 to 64 of them).
    pub content: Option<String>,
}

impl Condition {
    /// True when it asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.version.is_none() && self.content.is_none()
    }
}

impl CommitMeta {
    /// Builds commit metadata.
    pub fn new(author: impl Into<String>, message: impl Into<String>, time: Millis) -> CommitMeta {
        CommitMeta { author: author.into(), message: message.into(), time, condition: None, secret: Vec::new() }
    }

    /// The same metadata with a precondition.
    pub fn with_condition(mut self, condition: Condition) -> CommitMeta {
        self.condition = (!condition.is_empty()).then_some(condition);
        self
    }

    /// The same metadata, also marking `keys` secret.
    pub fn with_secret(mut self, keys: Vec<String>) -> CommitMeta {
        self.secret = keys;
        self
    }

    fn validate(&self) -> Result<(), EditError> {
        for (what, text, max) in
            [("author", &self.author, AUTHOR_BYTES_MAX), ("message", &self.message, MESSAGE_BYTES_MAX)]
        {
            if text.len() > max {
                return Err(EditError::MetaTooLong { what, bytes: text.len(), max });
            }
        }
        Ok(())
    }
}

/// A local edit of a group's settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Set keys to JSON values.
    Set(Vec<(String, Value)>),
    /// Delete keys (each must exist).
    Delete(Vec<String>),
    /// Replace the settings by a file's contents.
    ApplyFile {
        /// The file's text.
        text: String,
        /// Its syntax.
        format: FileFormat,
    },
    /// Roll back to a version (a reference such as `v12`).
    Rollback(String),
    /// Release a version (a reference such as `v12`) in a gated group: members serve it from
    /// now on (SPEC F14). Settings unchanged.
    Release {
        /// The version to serve.
        to: String,
        /// Which nodes it reaches.
        strategy: ReleaseStrategy,
        /// What makes the members abort it.
        guards: Guards,
    },
    /// Move the current canary release to a later wave (`None`: the next one).
    Promote {
        /// The wave (0 is the first).
        wave: Option<u32>,
    },
    /// Abort the current release: every member goes back to what it served before it.
    Abort {
        /// Why.
        reason: String,
    },
    /// Set the group's schema (a JSON Schema), or remove it (`None`). Settings unchanged.
    Schema(Option<Value>),
}

/// The result of a local write: the new version and the change to persist and send.
#[derive(Debug, Clone)]
pub struct LocalCommit {
    /// The version created.
    pub version: VersionInfo,
    /// The Automerge change, as raw bytes: persist it, then push it to peers.
    pub change: Vec<u8>,
    /// The change's hash (the document's only head right after the write).
    pub change_hash: ChangeHash,
}

/// A setting with more than one concurrent value (SPEC F6).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conflict {
    /// The key.
    pub key: String,
    /// The value every node serves: Automerge's deterministic winner.
    pub winner: ConflictValue,
    /// The values that lost, still visible here until someone writes the key again.
    pub losers: Vec<ConflictValue>,
}

/// One side of a conflict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConflictValue {
    /// The value (`null` when the stored text is not valid JSON).
    pub value: Value,
    /// The version that wrote it, when known.
    pub version: Option<VersionId>,
}

/// The object ids of the document's maps.
#[derive(Debug, Clone)]
pub(crate) struct Objects {
    pub(crate) settings: ObjId,
    pub(crate) versions: ObjId,
}

/// Key of the configuration in the root map.
pub(crate) const CONFIGURATION_KEY: &str = "configuration";

/// Key of the schema in the root map.
pub(crate) const SCHEMA_KEY: &str = "schema";

/// The schema a document holds: none, one that compiles, or one this node cannot use (its
/// reason), which refuses every write but a new schema.
pub(crate) type StoredSchema = Option<Result<Schema, String>>;

/// A configuration group: the Automerge document plus derived indexes.
///
/// Derived state (read view, conflict set, version index) is a pure function of the document;
/// every mutation keeps it in step, and `debug_assert`s check it after remote applies.
#[derive(Debug)]
pub struct GroupDoc {
    pub(crate) doc: Automerge,
    name: String,
    mode: Mode,
    epoch: u64,
    /// `ROOT.format` as this node last read or wrote it.
    pub(crate) format: u64,
    policy: GroupPolicy,
    /// A strong group's current configuration (`None` for eventual groups, and for strong
    /// groups written by a konord before configurations existed).
    pub(crate) configuration: Option<Configuration>,
    /// The group's schema (SPEC F8), read at load and whenever a change puts `ROOT.schema`.
    pub(crate) schema: StoredSchema,
    pub(crate) objects: Objects,
    pub(crate) view: Settings,
    pub(crate) conflicted: BTreeSet<String>,
    /// Every visible register (`register.rs`), by the id of the op that made it (counter,
    /// actor), to its key: a remote op on a register names only the register.
    pub(crate) registers: BTreeMap<(u64, ActorId), String>,
    /// Settings entries that fail validation (only a faulty or hostile peer writes them); they
    /// are never served.
    pub(crate) invalid: BTreeSet<String>,
    pub(crate) versions: BTreeMap<VersionId, VersionEntry>,
    pub(crate) by_change: BTreeMap<ChangeHash, VersionId>,
    /// The newest changes added here, for cheap ancestry questions.
    pub(crate) recent: crate::recent::RecentChanges,
    /// The ids of the versions of kinds `release`, `promote` and `abort`.
    pub(crate) releases: BTreeSet<VersionId>,
    /// Keys marked secret by any version (issue 17): the union of the versions' `secret`.
    pub(crate) secret_keys: BTreeSet<String>,
    /// The node this document serves (its id and labels pick its canary slices).
    viewer: crate::release::Viewer,
    /// What a gated group serves (`None` in an immediate group, which serves `view`).
    served: Option<Served>,
    /// A copy of `doc` on which strong writes' changes are built without being applied
    /// (`prepare`). Cloning the document for each cost time in proportion to its history
    /// (200 µs at 1k versions, 906 µs at 10k: `cargo bench -p konor-crdt`). It holds what `doc`
    /// holds plus, at most, changes prepared here: it is brought up to date from `doc` before
    /// each use, and copied again when it holds a change `doc` does not (an aborted round's).
    /// It is a second copy of the document, kept from the group's first strong write on (25 MB
    /// at 10k versions in `konor-bench --long-history --history-mode strong`), where each clone
    /// was one for the length of a write.
    scratch: Option<Automerge>,
}

/// A gated group's served version and its settings (SPEC F14).
#[derive(Debug, Clone)]
struct Served {
    version: VersionId,
    settings: Settings,
}

/// What the served settings of a gated group did when a change moved them to another version.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedChange {
    /// Keys set to a new value.
    pub set: BTreeMap<String, Value>,
    /// Keys removed.
    pub removed: Vec<String>,
}

/// An edit as a list of primitive operations on settings.
enum Op {
    Put { key: String, value: Value, canonical: String },
    Delete { key: String },
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

impl GroupDoc {
    /// Creates a new group with the default policy and no configuration (a strong group made by
    /// a replica gets its first configuration through [`GroupDoc::create_with`]): the genesis
    /// change holds the layout and version v1 (`Create`).
    ///
    /// `actor` must be unique to this process incarnation (FACTS: never reuse an actor after
    /// losing unsaved changes).
    pub fn create(
        name: &str,
        mode: Mode,
        actor: ActorId,
        meta: &CommitMeta,
    ) -> Result<(GroupDoc, LocalCommit), EditError> {
        GroupDoc::create_with(name, mode, actor, meta, &GroupPolicy::default(), None)
    }

    /// Creates a group with a policy and, for a strong group, its first configuration (the
    /// creator alone).
    pub fn create_with(
        name: &str,
        mode: Mode,
        actor: ActorId,
        meta: &CommitMeta,
        policy: &GroupPolicy,
        configuration: Option<&Configuration>,
    ) -> Result<(GroupDoc, LocalCommit), EditError> {
        validate_group_name(name)?;
        meta.validate()?;
        let mut doc = Automerge::new().with_actor(actor.clone());
        let id = VersionId::new(1, &actor);
        let info = VersionInfo {
            id: id.clone(),
            author: meta.author.clone(),
            time: meta.time,
            message: meta.message.clone(),
            kind: VersionKind::Create,
            content_hash: Settings::new().content_hash().to_hex(),
            hash_scheme: CONTENT_HASH_SCHEME,
            parents: Vec::new(),
            secret: Vec::new(),
        };
        let document_error = |e: automerge::AutomergeError| EditError::Document { detail: e.to_string() };
        let mut tx = doc.transaction();
        let build = (|| {
            let format = if policy.release == ReleasePolicy::Gated { GATED_FORMAT } else { DOCUMENT_FORMAT };
            tx.put(automerge::ROOT, "format", format)?;
            let meta_obj = tx.put_object(automerge::ROOT, "meta", ObjType::Map)?;
            tx.put(&meta_obj, "name", name)?;
            tx.put(&meta_obj, "mode", mode.to_string())?;
            tx.put(&meta_obj, "epoch", 0u64)?;
            let policy_obj = tx.put_object(automerge::ROOT, "policy", ObjType::Map)?;
            tx.put(&policy_obj, "version", POLICY_FORMAT)?;
            tx.put(&policy_obj, "evict_after_ms", policy.evict_after.0)?;
            tx.put(&policy_obj, "fencing", policy.fencing.to_string())?;
            if policy.release == ReleasePolicy::Gated {
                tx.put(&policy_obj, "release", policy.release.to_string())?;
            }
            if let Some(configuration) = configuration {
                tx.put(automerge::ROOT, CONFIGURATION_KEY, configuration.to_json())?;
            }
            tx.put_object(automerge::ROOT, "settings", ObjType::Map)?;
            let versions = tx.put_object(automerge::ROOT, "versions", ObjType::Map)?;
            tx.put(&versions, id.storage_key(), version_json(&info))?;
            Ok(())
        })();
        if let Err(error) = build {
            tx.rollback();
            return Err(document_error(error));
        }
        let options = CommitOptions::default().with_message(id.storage_key()).with_time(meta.time.as_secs());
        let (hash, _) = tx.commit_with(options);
        let change_hash = hash.ok_or_else(|| EditError::Document { detail: "empty genesis".into() })?;
        let change = last_local_change_bytes(&doc)?;
        let group = GroupDoc::from_document(doc).map_err(|e| EditError::Document { detail: e.to_string() })?;
        Ok((group, LocalCommit { version: info, change, change_hash }))
    }

    /// Loads a group from an Automerge save (a snapshot), as `actor`.
    pub fn load(snapshot: &[u8], actor: ActorId) -> Result<GroupDoc, LoadError> {
        // Snapshots come from files and from peers (join grants): bounded, then shielded like
        // every decoder.
        crate::change_bounds::check_chunks(snapshot).map_err(|e| LoadError::Snapshot { detail: e.to_string() })?;
        let doc = crate::shield::shielded("snapshot", || Automerge::load(snapshot).map_err(|e| e.to_string()))
            .map_err(|e| LoadError::Snapshot { detail: e.to_string() })?
            .with_actor(actor);
        GroupDoc::from_document(doc)
    }

    /// Builds the derived state from a whole document.
    pub(crate) fn from_document(doc: Automerge) -> Result<GroupDoc, LoadError> {
        let not_a_group = |detail: &str| LoadError::NotAGroup { detail: detail.to_owned() };
        let map_at = |obj: &ObjId, key: &str| -> Result<ObjId, LoadError> {
            match doc.get(obj, key) {
                Ok(Some((AmValue::Object(ObjType::Map), id))) => Ok(id),
                _ => Err(not_a_group(&format!("missing map {key:?}"))),
            }
        };
        let format = read_format(&doc);
        if format == 0 || format > NEWEST_FORMAT {
            return Err(not_a_group(&format!(
                "document format {format}, this version reads 1 to {NEWEST_FORMAT}; upgrade konord"
            )));
        }
        let meta = map_at(&automerge::ROOT, "meta")?;
        let objects = Objects {
            settings: map_at(&automerge::ROOT, "settings")?,
            versions: map_at(&automerge::ROOT, "versions")?,
        };
        let text_at = |key: &str| -> Option<String> {
            match doc.get(&meta, key) {
                Ok(Some((AmValue::Scalar(s), _))) => s.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let name = text_at("name").ok_or_else(|| not_a_group("missing meta.name"))?;
        let mode =
            text_at("mode").and_then(|m| m.parse().ok()).ok_or_else(|| not_a_group("missing or unknown meta.mode"))?;
        let epoch = match doc.get(&meta, "epoch") {
            Ok(Some((AmValue::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Uint(n) => *n,
                ScalarValue::Int(n) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            },
            _ => 0,
        };
        let policy = read_policy(&doc);
        let configuration = read_configuration(&doc);
        let schema = read_schema(&doc);
        let mut group = GroupDoc {
            doc,
            name,
            mode,
            epoch,
            format,
            policy,
            configuration,
            schema,
            objects,
            view: Settings::new(),
            conflicted: BTreeSet::new(),
            registers: BTreeMap::new(),
            invalid: BTreeSet::new(),
            versions: BTreeMap::new(),
            by_change: BTreeMap::new(),
            recent: crate::recent::RecentChanges::default(),
            releases: BTreeSet::new(),
            secret_keys: BTreeSet::new(),
            viewer: crate::release::Viewer::default(),
            served: None,
            scratch: None,
        };
        group.rebuild_derived_state();
        group.policy.release = group.genesis_release_policy();
        if group.policy.release == ReleasePolicy::Gated {
            group.served = Some(group.compute_served());
        }
        Ok(group)
    }

    /// The release policy as the group's creation set it: read at the genesis change, so a
    /// member's later change to `ROOT.format` or `policy.release` (only a faulty or hostile
    /// peer makes one) never gates or ungates a group, on a node that reloads or anywhere.
    fn genesis_release_policy(&self) -> ReleasePolicy {
        let Some(genesis) = self.versions.values().next().filter(|e| e.info.kind == VersionKind::Create) else {
            return ReleasePolicy::Immediate;
        };
        let heads = [genesis.change];
        let scalar_at = |obj: &ObjId, key: &str| match self.doc.get_at(obj, key, &heads) {
            Ok(Some((AmValue::Scalar(s), _))) => Some(s.into_owned()),
            _ => None,
        };
        let format = scalar_at(&automerge::ROOT, "format").and_then(|s| s.as_u64()).unwrap_or(0);
        let policy = match self.doc.get_at(automerge::ROOT, "policy", &heads) {
            Ok(Some((AmValue::Object(ObjType::Map), obj))) => obj,
            _ => return ReleasePolicy::Immediate,
        };
        let gated = scalar_at(&policy, "release").is_some_and(|s| s.as_str() == Some("gated"));
        if format >= GATED_FORMAT && gated { ReleasePolicy::Gated } else { ReleasePolicy::Immediate }
    }

    /// Recomputes the read view, the conflict set and the version index from the document.
    fn rebuild_derived_state(&mut self) {
        let (view, conflicted, invalid) = settings_from_document(&self.doc, &self.objects.settings, None);
        self.registers = registers(&self.doc, &self.objects.settings);
        self.view = view;
        self.conflicted = conflicted;
        self.invalid = invalid;
        self.versions.clear();
        self.by_change.clear();
        self.releases.clear();
        self.secret_keys.clear();
        let entries: Vec<(String, String, automerge::ObjId)> = self
            .doc
            .map_range(&self.objects.versions, ..)
            .filter_map(|item| {
                let id = item.id();
                match item.value {
                    automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(text)) => {
                        Some((item.key.into_owned(), text.into_owned(), id))
                    }
                    _ => None,
                }
            })
            .collect();
        for (key, text, op) in entries {
            self.index_version(&key, &text, &op);
        }
    }

    /// Adds one `versions` entry to the index; malformed entries are skipped and remembered.
    pub(crate) fn index_version(&mut self, key: &str, text: &str, op: &ObjId) {
        let change = self.doc.hash_for_opid(op);
        self.index_version_in(key, text, change);
    }

    /// [`GroupDoc::index_version`] for an entry written by the change `change`.
    pub(crate) fn index_version_of(&mut self, key: &str, text: &str, change: ChangeHash) {
        self.index_version_in(key, text, Some(change));
    }

    fn index_version_in(&mut self, key: &str, text: &str, change: Option<ChangeHash>) {
        let parsed = serde_json::from_str::<VersionInfo>(text).ok();
        match (parsed, change) {
            (Some(info), Some(change)) if info.id.storage_key() == key => {
                if is_release_record(&info.kind) {
                    self.releases.insert(info.id.clone());
                }
                // Only keys: a faulty peer's mark of something else masks nothing real.
                let marks = info.secret.iter().filter(|key| crate::key::validate_key(key).is_ok());
                self.secret_keys.extend(marks.cloned());
                self.by_change.insert(change, info.id.clone());
                self.versions.insert(info.id.clone(), VersionEntry { info, change });
            }
            (parsed, _) => {
                self.invalid.insert(format!("versions/{key}"));
                // A version that does not parse here (a kind from a newer release) still marks
                // its keys: the values it wrote may be served.
                if parsed.is_none() {
                    #[derive(serde::Deserialize)]
                    struct Marks {
                        #[serde(default)]
                        secret: Vec<String>,
                    }
                    let marks = serde_json::from_str::<Marks>(text).map(|marks| marks.secret).unwrap_or_default();
                    let keys = marks.into_iter().filter(|key| crate::key::validate_key(key).is_ok());
                    self.secret_keys.extend(keys.take(SECRET_KEYS_MAX));
                }
            }
        }
    }

    /// The document format (`ROOT.format`): below [`DOCUMENT_FORMAT`] until this node writes
    /// to an older document or receives a write that converted it.
    pub fn format(&self) -> u64 {
        self.format
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's consistency mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The group's policy.
    pub fn policy(&self) -> &GroupPolicy {
        &self.policy
    }

    /// A strong group's current configuration: the one its heads hold.
    pub fn configuration(&self) -> Option<&Configuration> {
        self.configuration.as_ref()
    }

    /// The group's schema, when it has one that this node can use.
    pub fn schema(&self) -> Option<&Schema> {
        self.schema.as_ref().and_then(|stored| stored.as_ref().ok())
    }

    /// Why the schema the document holds cannot be used, when it cannot.
    pub fn schema_unusable(&self) -> Option<&str> {
        self.schema.as_ref().and_then(|stored| stored.as_ref().err()).map(String::as_str)
    }

    /// The violations `settings` would have under the group's schema (none without one): what
    /// `schema check` reports for a file, without writing.
    pub fn check_against_schema(&self, settings: &Settings) -> Result<Vec<crate::error::Violation>, EditError> {
        match &self.schema {
            None => Ok(Vec::new()),
            Some(Ok(schema)) => Ok(schema.violations(settings)),
            Some(Err(detail)) => Err(EditError::SchemaUnusable { group: self.name.clone(), detail: detail.clone() }),
        }
    }

    /// The epoch this document belongs to (docs/data-model.md, "Epochs").
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// This replica's Automerge actor.
    pub fn actor(&self) -> &ActorId {
        self.doc.get_actor()
    }

    /// Writes from now on as `actor`. A replica that lost changes it had already sent (a failed
    /// append) must never issue their sequence numbers again with other contents (FACTS: peers
    /// refuse a "duplicate seq" and never converge): it takes a fresh actor.
    pub fn set_actor(&mut self, actor: ActorId) {
        self.doc.set_actor(actor);
        self.scratch = None;
    }

    /// The current settings, from the read view (no Automerge access).
    pub fn settings(&self) -> &Settings {
        &self.view
    }

    /// The current value of `key`, from the read view.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.view.get(key)
    }

    /// Entries this replica refuses to serve because they fail validation (keys of the settings
    /// map, or `versions/<key>`). Only a faulty or hostile writer creates them.
    pub fn invalid_entries(&self) -> &BTreeSet<String> {
        &self.invalid
    }

    /// The document's heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// Every version, oldest first in the global `(counter, actor)` order.
    pub fn history(&self) -> impl DoubleEndedIterator<Item = &VersionInfo> {
        self.versions.values().map(|entry| &entry.info)
    }

    /// One version's record.
    pub fn version_info(&self, id: &VersionId) -> Option<&VersionInfo> {
        self.versions.get(id).map(|entry| &entry.info)
    }

    /// True when every head in `heads` is known here and `change` is among their ancestors (or
    /// is one of them): a peer gossiping those heads holds the change.
    pub fn heads_include(&self, heads: &[ChangeHash], change: &ChangeHash) -> bool {
        // The window of recent changes answers "is it in the document" without asking Automerge.
        let known = |hash: &ChangeHash| self.recent.contains(hash) || self.has_change(hash);
        if heads.contains(change) {
            return known(change);
        }
        if heads.is_empty() || !known(change) || !heads.iter().all(known) {
            return false;
        }
        if let Some(included) = self.recent.heads_include(heads, change) {
            return included;
        }
        !self.doc.get_changes_meta(heads).iter().any(|meta| meta.hash == *change)
    }

    /// True when changes wait in Automerge's queue for dependencies this document lacks.
    pub fn has_missing_deps(&self) -> bool {
        !self.doc.get_missing_deps(&[]).is_empty()
    }

    /// The number of Automerge changes in the document: a replica's revision after loading.
    /// Walks the whole history (O(changes)): for loading, never per write.
    pub fn change_count(&self) -> u64 {
        self.doc.get_changes_meta(&[]).len() as u64
    }

    /// The label of the latest version (`v12`), or `v0` for a document without versions.
    pub fn latest_label(&self) -> String {
        self.latest_version().map_or_else(|| "v0".to_owned(), |v| self.label(&v.id))
    }

    /// The number of versions.
    pub fn version_count(&self) -> usize {
        self.versions.len()
    }

    /// The latest version in the global order.
    pub fn latest_version(&self) -> Option<&VersionInfo> {
        self.versions.values().next_back().map(|entry| &entry.info)
    }

    /// The versions whose changes are the document's heads: one normally, several after
    /// concurrent writes merged (the current settings are then their merge).
    pub fn head_versions(&self) -> Vec<&VersionInfo> {
        let mut heads: Vec<&VersionInfo> = self
            .doc
            .get_heads()
            .iter()
            .filter_map(|hash| self.by_change.get(hash))
            .filter_map(|id| self.versions.get(id))
            .map(|entry| &entry.info)
            .collect();
        heads.sort_by(|a, b| a.id.cmp(&b.id));
        heads
    }

    /// The label people see: `v12`, or `v12-3fa9c2d1` when another version shares the counter.
    pub fn label(&self, id: &VersionId) -> String {
        let shared = self
            .versions
            .range(VersionId { counter: id.counter, actor: String::new() }..)
            .take_while(|(other, _)| other.counter == id.counter)
            .count()
            > 1;
        if shared { id.full_label() } else { format!("v{}", id.counter) }
    }

    /// Resolves what a person typed (`v12`, `v12-3fa9`, `checkout@v12`) to one version.
    pub fn resolve(&self, text: &str) -> Result<&VersionInfo, VersionError> {
        if let Some((group, _)) = text.rsplit_once('@')
            && group != self.name
        {
            return Err(VersionError::Unknown { group: self.name.clone(), version: text.to_owned() });
        }
        let reference: VersionRef = text.parse()?;
        let candidates: Vec<&VersionEntry> = self
            .versions
            .range(VersionId { counter: reference.counter, actor: String::new() }..)
            .take_while(|(id, _)| id.counter == reference.counter)
            .filter(|(id, _)| reference.matches(id))
            .map(|(_, entry)| entry)
            .collect();
        match candidates.as_slice() {
            [] => Err(VersionError::Unknown { group: self.name.clone(), version: text.to_owned() }),
            [one] => Ok(&one.info),
            many => Err(VersionError::Ambiguous {
                group: self.name.clone(),
                version: text.to_owned(),
                candidates: many.iter().map(|e| e.info.id.full_label()).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    /// The settings exactly as they were right after `version` was written, on its writer.
    pub fn settings_at(&self, version: &VersionId) -> Result<Settings, VersionError> {
        let entry = self
            .versions
            .get(version)
            .ok_or_else(|| VersionError::Unknown { group: self.name.clone(), version: version.full_label() })?;
        let (settings, _, _) = settings_from_document(&self.doc, &self.objects.settings, Some(&[entry.change]));
        debug_assert!(
            entry.info.content_hash().is_none_or(|hash| hash == settings.content_hash()),
            "settings at {version} do not match the content hash recorded when it was written"
        );
        Ok(settings)
    }

    /// The difference between two versions' settings (`from` -> `to`).
    pub fn diff(&self, from: &VersionId, to: &VersionId) -> Result<SettingsDiff, VersionError> {
        Ok(SettingsDiff::between(&self.settings_at(from)?, &self.settings_at(to)?))
    }

    /// Keys with concurrent values, the winner every node serves and the losing values.
    pub fn conflicts(&self) -> Vec<Conflict> {
        self.conflicted
            .iter()
            .filter_map(|key| {
                let values = crate::register::values_of(&self.doc, &self.objects.settings, key, None);
                if values.len() < 2 {
                    return None;
                }
                // The first value is the winner every node serves; the others lost.
                let mut sides = values.iter().map(|value| ConflictValue {
                    value: value.text.as_deref().and_then(|t| serde_json::from_str(t).ok()).unwrap_or(Value::Null),
                    version: self.doc.hash_for_opid(&value.op).and_then(|h| self.by_change.get(&h).cloned()),
                });
                let winner = sides.next()?;
                Some(Conflict { key: key.clone(), winner, losers: sides.collect() })
            })
            .collect()
    }

    /// Sets `entries` (key, JSON value) as one new version.
    pub fn set(&mut self, entries: Vec<(String, Value)>, meta: &CommitMeta) -> Result<LocalCommit, EditError> {
        self.edit(Edit::Set(entries), meta)
    }

    /// Deletes `keys` as one new version; every key must exist.
    pub fn delete(&mut self, keys: Vec<String>, meta: &CommitMeta) -> Result<LocalCommit, EditError> {
        self.edit(Edit::Delete(keys), meta)
    }

    /// Replaces the settings with the contents of a whole file, as one new version: keys not in
    /// the file are deleted, keys whose value is unchanged are left alone.
    pub fn apply_file(&mut self, text: &str, format: FileFormat, meta: &CommitMeta) -> Result<LocalCommit, EditError> {
        self.edit(Edit::ApplyFile { text: text.to_owned(), format }, meta)
    }

    /// Rolls back to `target`: a new version whose settings equal the target's.
    pub fn rollback(&mut self, target: &str, meta: &CommitMeta) -> Result<LocalCommit, EditError> {
        self.edit(Edit::Rollback(target.to_owned()), meta)
    }

    /// The operations that turn the current settings into `target`, conflicts resolved.
    /// Checks a key a write names: a key, or an overlay key (`key@selector`) in a gated group
    /// (SPEC F29; an immediate group serves its settings as they are, with no layer to resolve
    /// overlays).
    fn validate_written_key(&self, key: &str) -> Result<(), EditError> {
        crate::overlay::validate_stored_key(key)?;
        if crate::overlay::split(key).is_some() && !self.is_gated() {
            return Err(EditError::BadOverlay {
                detail: format!("group {:?} serves every version at once: overlays need a gated group", self.name),
            });
        }
        Ok(())
    }

    fn ops_to_reach(&self, target: &Settings) -> Vec<Op> {
        let mut ops = Vec::new();
        for (key, entry) in target.entries() {
            ops.push(Op::Put { key: key.to_owned(), value: entry.value.clone(), canonical: entry.canonical.clone() });
        }
        for (key, _) in self.view.entries() {
            if target.entry(key).is_none() {
                ops.push(Op::Delete { key: key.to_owned() });
            }
        }
        for key in &self.conflicted {
            if target.entry(key).is_none() && self.view.entry(key).is_none() {
                ops.push(Op::Delete { key: key.clone() });
            }
        }
        ops
    }

    /// Writes a planned edit (its settings operations, its schema and its version entry) as one
    /// Automerge change. On any error nothing has changed.
    fn commit_plan(
        &mut self,
        plan: PlannedEdit,
        meta: &CommitMeta,
    ) -> Result<(LocalCommit, BTreeSet<String>), EditError> {
        let deps = self.doc.get_heads();
        let secret = self.has_marks_after(&plan);
        let (change_hash, change, made) = write_plan(&mut self.doc, &self.objects, secret, &plan, meta)?;
        self.format = self.format.max(written_format(secret));
        self.secret_keys.extend(plan.info.secret.iter().cloned());
        for (register, key) in made {
            if let ObjId::Id(counter, actor, _) = register {
                self.registers.insert((counter, actor), key);
            }
        }
        self.recent.push(change_hash, deps);
        let PlannedEdit { ops, info, hash_after, schema, .. } = plan;
        if let Some(schema) = schema {
            self.schema = schema.map(Ok);
        }
        // The keys whose value in the read view changed, as a remote apply reports them: the
        // ops say which keys, so the caller needs no copy of the settings to diff.
        let mut before: BTreeMap<String, Option<String>> = BTreeMap::new();
        for op in ops {
            self.conflicted.remove(op.key());
            self.invalid.remove(op.key());
            if !before.contains_key(op.key()) {
                before.insert(op.key().to_owned(), self.view.entry(op.key()).map(|entry| entry.canonical.clone()));
            }
            match op {
                Op::Put { key, value, canonical } => self.view.insert_canonical(key, value, canonical),
                Op::Delete { key } => {
                    self.view.remove(&key);
                }
            }
        }
        let changed: BTreeSet<String> = before
            .into_iter()
            .filter(|(key, was)| self.view.entry(key).map(|entry| &entry.canonical) != was.as_ref())
            .map(|(key, _)| key)
            .collect();
        // The staged hash is the hash of the applied edit (checked in debug builds).
        self.view.set_known_hash(hash_after);
        self.by_change.insert(change_hash, info.id.clone());
        if is_release_record(&info.kind) {
            self.releases.insert(info.id.clone());
        }
        self.versions.insert(info.id.clone(), VersionEntry { info: info.clone(), change: change_hash });
        debug_assert_eq!(self.doc.get_heads(), vec![change_hash], "a local commit is the only head");
        Ok((LocalCommit { version: info, change, change_hash }, changed))
    }

    /// Builds the change an edit would make without applying it anywhere: the strong-round
    /// coordinator stages it and applies it only once every member voted yes. Nothing changes.
    pub fn prepare(&mut self, edit: Edit, meta: &CommitMeta) -> Result<LocalCommit, EditError> {
        let plan = self.plan_edit(edit, meta)?;
        let secret = self.has_marks_after(&plan);
        let (change_hash, change) = self.write_on_scratch(secret, &plan, meta)?;
        Ok(LocalCommit { version: plan.info, change, change_hash })
    }

    /// Writes `plan` on the scratch copy, brought up to date first; the copy is kept only when
    /// the write went through, so no half-written copy is ever reused.
    fn write_on_scratch(
        &mut self,
        secret: bool,
        plan: &PlannedEdit,
        meta: &CommitMeta,
    ) -> Result<(ChangeHash, Vec<u8>), EditError> {
        self.refresh_scratch();
        let mut scratch = self.scratch.take().unwrap_or_else(|| self.doc.clone());
        let (change_hash, change, _) = write_plan(&mut scratch, &self.objects, secret, plan, meta)?;
        self.scratch = Some(scratch);
        Ok((change_hash, change))
    }

    /// Makes the scratch copy of the document equal to it (see the field). A copy keeps this
    /// replica's actor (Automerge's fork would draw a random one); an aborted change is never
    /// applied anywhere, so its sequence number is free to reuse, which a new copy does.
    fn refresh_scratch(&mut self) {
        let current = match self.scratch.as_mut() {
            Some(scratch) => {
                let heads = scratch.get_heads();
                // Only changes `doc` holds: bring it up to date with what `doc` added since.
                heads.iter().all(|head| self.doc.get_change_meta_by_hash(head).is_some()) && {
                    let missing = self.doc.get_changes(&heads);
                    scratch.apply_changes(missing).is_ok() && scratch.get_heads() == self.doc.get_heads()
                }
            }
            None => false,
        };
        if !current {
            self.scratch = Some(self.doc.clone());
        }
    }

    /// Builds the change that moves a strong group to `next` (one version of kind
    /// `membership`), without applying it anywhere: it commits through a round like any strong
    /// write. Nothing changes.
    pub fn prepare_reconfiguration(
        &mut self,
        next: &Configuration,
        meta: &CommitMeta,
    ) -> Result<LocalCommit, EditError> {
        let current = self.configuration.as_ref();
        let added = next.members.iter().filter(|m| current.is_none_or(|c| !c.contains(m))).cloned().collect();
        let removed =
            current.map(|c| c.members.iter().filter(|m| !next.contains(m)).cloned().collect()).unwrap_or_default();
        let kind = VersionKind::Membership { configuration: next.number, added, removed };
        let mut plan = self.plan_unchecked(Vec::new(), kind, meta)?;
        plan.configuration = Some(next.clone());
        let secret = self.has_marks_after(&plan);
        let (change_hash, change) = self.write_on_scratch(secret, &plan, meta)?;
        Ok(LocalCommit { version: plan.info, change, change_hash })
    }

    /// Applies an edit as a new version.
    pub fn edit(&mut self, edit: Edit, meta: &CommitMeta) -> Result<LocalCommit, EditError> {
        self.edit_reporting_keys(edit, meta).map(|(commit, _)| commit)
    }

    /// Applies an edit as a new version; also answers the keys whose value changed in the read
    /// view (what watchers are told).
    pub(crate) fn edit_reporting_keys(
        &mut self,
        edit: Edit,
        meta: &CommitMeta,
    ) -> Result<(LocalCommit, BTreeSet<String>), EditError> {
        let plan = self.plan_edit(edit, meta)?;
        self.commit_plan(plan, meta)
    }

    /// Everything an edit would write, checked (limits, condition, schema), without writing.
    fn plan_edit(&self, edit: Edit, meta: &CommitMeta) -> Result<PlannedEdit, EditError> {
        match edit {
            Edit::Release { to, strategy, guards } => return self.plan_release(&to, strategy, guards, meta),
            Edit::Promote { wave } => return self.plan_promote(wave, meta),
            Edit::Abort { reason } => return self.plan_abort(reason, meta),
            _ => {}
        }
        let Edit::Schema(value) = edit else {
            let (ops, kind) = self.ops_for(edit)?;
            let plan = self.plan(ops, kind, meta)?;
            self.check_schema(&plan.ops).map_err(|error| self.mask_violations(error, &meta.secret))?;
            return Ok(plan);
        };
        let schema = value.as_ref().map(Schema::compile).transpose()?;
        let unchanged = match (&self.schema, &schema) {
            (Some(Ok(old)), Some(new)) => old == new,
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return Err(EditError::Unchanged);
        }
        if let Some(schema) = &schema {
            let violations = schema.violations(&self.view);
            if !violations.is_empty() {
                let error = EditError::SchemaViolation { group: self.name.clone(), violations };
                return Err(self.mask_violations(error, &[]));
            }
        }
        let kind = VersionKind::Schema { schema: schema.as_ref().map(Schema::hash) };
        let mut plan = self.plan_unchecked(Vec::new(), kind, meta)?;
        plan.schema = Some(schema);
        Ok(plan)
    }

    /// A release of `to` (SPEC F14): only in a gated group, of a version this node holds, and
    /// not of the version already released with the same strategy.
    fn plan_release(
        &self,
        to: &str,
        strategy: ReleaseStrategy,
        guards: Guards,
        meta: &CommitMeta,
    ) -> Result<PlannedEdit, EditError> {
        if self.policy.release != ReleasePolicy::Gated {
            return Err(EditError::NotGated { group: self.name.clone() });
        }
        guards.validate().map_err(|detail| EditError::BadRelease { detail })?;
        if let ReleaseStrategy::Canary(canary) = &strategy {
            canary.validate().map_err(|detail| EditError::BadRelease { detail })?;
        }
        let target_info = self.resolve(to)?;
        if is_release_record(&target_info.kind) {
            // Its settings are its writer's whole view when it was made, unreleased writes
            // included: release the version it targets instead.
            return Err(EditError::BadRelease {
                detail: format!(
                    "{} is a {} version, not settings to release: release a version that wrote settings",
                    self.label(&target_info.id),
                    target_info.kind.name()
                ),
            });
        }
        let target = target_info.id.clone();
        if let Some((id, info)) = self.current_release()
            && let VersionKind::Release { to: released, strategy: in_force, guards: guarded, .. } = &info.kind
            && *released == target
            && *in_force == strategy
            && *guarded == guards
            && crate::release::progress(id, &self.releases, &self.versions).aborted.is_none()
        {
            return Err(EditError::Unchanged);
        }
        let from = self.served.as_ref().map(|served| served.version.clone());
        self.plan_unchecked(Vec::new(), VersionKind::Release { to: target, from, strategy, guards }, meta)
    }

    /// The current release and its progress, for a promotion or an abort; refused when there is
    /// none or it was aborted.
    fn release_to_act_on(&self) -> Result<(VersionId, ReleaseStrategy, crate::release::ReleaseProgress), EditError> {
        if self.policy.release != ReleasePolicy::Gated {
            return Err(EditError::NotGated { group: self.name.clone() });
        }
        let bad = |detail: String| EditError::BadRelease { detail };
        let Some((id, info)) = self.active_release() else {
            return Err(bad(format!(
                "group {:?} has no release in force (none yet, or every one was aborted)",
                self.name
            )));
        };
        let VersionKind::Release { strategy, .. } = &info.kind else {
            return Err(bad("the release in force is not a release version".into()));
        };
        let progress = crate::release::progress(id, &self.releases, &self.versions);
        Ok((id.clone(), strategy.clone(), progress))
    }

    /// A promotion of the current canary release to `wave` (the next one when `None`).
    fn plan_promote(&self, wave: Option<u32>, meta: &CommitMeta) -> Result<PlannedEdit, EditError> {
        let (release, strategy, progress) = self.release_to_act_on()?;
        let bad = |detail: String| EditError::BadRelease { detail };
        let ReleaseStrategy::Canary(canary) = strategy else {
            return Err(bad(format!(
                "release {} reaches every member: there is nothing to promote",
                self.label(&release)
            )));
        };
        let last = canary.waves.len().saturating_sub(1) as u32;
        let wave = wave.unwrap_or(progress.wave.saturating_add(1));
        if progress.wave >= last {
            return Err(bad(format!(
                "release {} is at its last wave ({}%); release the version with --strategy all to reach every member",
                self.label(&release),
                canary.waves.last().copied().unwrap_or(100)
            )));
        }
        if wave <= progress.wave || wave > last {
            return Err(bad(format!(
                "release {} is at wave {} of {}: promote to a wave from {} to {}",
                self.label(&release),
                progress.wave + 1,
                last + 1,
                progress.wave + 2,
                last + 1
            )));
        }
        self.plan_unchecked(Vec::new(), VersionKind::Promote { release, wave }, meta)
    }

    /// An abort of the current release.
    fn plan_abort(&self, reason: String, meta: &CommitMeta) -> Result<PlannedEdit, EditError> {
        let (release, _, _) = self.release_to_act_on()?;
        if reason.len() > crate::limits::MESSAGE_BYTES_MAX {
            return Err(EditError::MetaTooLong {
                what: "reason",
                bytes: reason.len(),
                max: crate::limits::MESSAGE_BYTES_MAX,
            });
        }
        self.plan_unchecked(Vec::new(), VersionKind::Abort { release, reason }, meta)
    }

    /// Refuses settings operations that would add a violation of the group's schema.
    fn check_schema(&self, ops: &[Op]) -> Result<(), EditError> {
        let schema = match &self.schema {
            None => return Ok(()),
            Some(Ok(schema)) => schema,
            Some(Err(detail)) => {
                return Err(EditError::SchemaUnusable { group: self.name.clone(), detail: detail.clone() });
            }
        };
        let mut after = self.view.clone();
        for op in ops {
            match op {
                Op::Put { key, value, canonical } => {
                    after.insert_canonical(key.clone(), value.clone(), canonical.clone())
                }
                Op::Delete { key } => {
                    after.remove(key);
                }
            }
        }
        let violations = schema.added_violations(&self.view, &after);
        if violations.is_empty() {
            Ok(())
        } else {
            Err(EditError::SchemaViolation { group: self.name.clone(), violations })
        }
    }

    /// Refuses the write unless its precondition holds (SPEC F5).
    fn check_condition(&self, condition: &Condition) -> Result<(), EditError> {
        let failed = |expected: String, actual: String| EditError::ConditionFailed {
            group: self.name.clone(),
            expected,
            actual,
        };
        if let Some(text) = &condition.version {
            let expected = self.resolve(text)?.id.clone();
            // Exactly the change of that version as the document's only head: a head this node
            // cannot read a version of (a newer konord's kind) counts as the group moving on.
            let change = self.versions.get(&expected).map(|entry| entry.change);
            if change.is_none_or(|change| self.doc.get_heads() != [change]) {
                let mut labels: Vec<String> = self.head_versions().iter().map(|v| self.label(&v.id)).collect();
                let unreadable = self.doc.get_heads().len().saturating_sub(labels.len());
                if unreadable > 0 {
                    labels.push(format!("{unreadable} change(s) without a version this node can read"));
                }
                let actual = match labels.as_slice() {
                    [one] => format!("its latest version is {one}"),
                    many => format!("it has concurrent latest versions {}", many.join(", ")),
                };
                return Err(failed(format!("is expected at {}", self.label(&expected)), actual));
            }
        }
        if let Some(text) = &condition.content {
            let wanted = text.trim().to_ascii_lowercase();
            if !(12..=64).contains(&wanted.len()) || !wanted.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(EditError::BadCondition {
                    detail: format!("{text:?} is not a content hash: give 12 to 64 hex digits"),
                });
            }
            let current = self.view.content_hash().to_hex();
            if !current.starts_with(&wanted) {
                return Err(failed(
                    format!("is expected with content {wanted}"),
                    format!("its content is {}", &current[..12]),
                ));
            }
        }
        Ok(())
    }

    fn ops_for(&self, edit: Edit) -> Result<(Vec<Op>, VersionKind), EditError> {
        match edit {
            // Planned by `plan_edit`, which never passes it here.
            Edit::Schema(_) | Edit::Release { .. } | Edit::Promote { .. } | Edit::Abort { .. } => {
                Err(EditError::Document { detail: "a schema or release edit has no settings operations".into() })
            }
            Edit::Set(entries) => {
                if entries.is_empty() {
                    return Err(EditError::NoKeys);
                }
                // A key named twice: the last value wins, as in a shell assignment list.
                let mut unique: BTreeMap<String, (Value, String)> = BTreeMap::new();
                for (key, value) in entries {
                    self.validate_written_key(&key)?;
                    let canonical = encode_value(&key, &value)?;
                    unique.insert(key, (value, canonical));
                }
                let keys: Vec<String> = unique.keys().cloned().collect();
                let ops =
                    unique.into_iter().map(|(key, (value, canonical))| Op::Put { key, value, canonical }).collect();
                Ok((ops, VersionKind::Set { keys }))
            }
            Edit::Delete(keys) => {
                if keys.is_empty() {
                    return Err(EditError::NoKeys);
                }
                let mut unique = BTreeSet::new();
                for key in keys {
                    self.validate_written_key(&key)?;
                    if self.view.get(&key).is_none() && !self.conflicted.contains(&key) {
                        return Err(EditError::NoSuchKey { group: self.name.clone(), key });
                    }
                    unique.insert(key);
                }
                let ops = unique.iter().map(|key| Op::Delete { key: key.clone() }).collect();
                Ok((ops, VersionKind::Delete { keys: unique.into_iter().collect() }))
            }
            Edit::ApplyFile { text, format } => {
                let mut target = parse_config_file(&text, format)?;
                // A file holds base settings: the overlays stay as they are.
                for (key, entry) in self.view.entries().filter(|(key, _)| crate::overlay::split(key).is_some()) {
                    target.insert_canonical(key.to_owned(), entry.value.clone(), entry.canonical.clone());
                }
                Ok((self.ops_to_reach(&target), VersionKind::Apply { format }))
            }
            Edit::Rollback(target) => {
                let to = self.resolve(&target)?.id.clone();
                let settings = self.settings_at(&to)?;
                Ok((self.ops_to_reach(&settings), VersionKind::Rollback { to }))
            }
        }
    }

    /// Drops no-op operations, checks limits and computes the version entry. Pure.
    fn plan(&self, ops: Vec<Op>, kind: VersionKind, meta: &CommitMeta) -> Result<PlannedEdit, EditError> {
        let plan = self.plan_unchecked(ops, kind, meta)?;
        // A write that only marks keys secret makes a version: the marks are what it changes.
        if plan.ops.is_empty() && plan.info.secret.is_empty() {
            return Err(EditError::Unchanged);
        }
        Ok(plan)
    }

    /// [`GroupDoc::plan`] without refusing an edit that changes no setting.
    fn plan_unchecked(&self, ops: Vec<Op>, kind: VersionKind, meta: &CommitMeta) -> Result<PlannedEdit, EditError> {
        meta.validate()?;
        if let Some(condition) = &meta.condition {
            self.check_condition(condition)?;
        }
        let ops: Vec<Op> = ops
            .into_iter()
            .filter(|op| {
                let conflicted = self.conflicted.contains(op.key());
                match op {
                    Op::Put { key, canonical, .. } => {
                        conflicted || self.view.entry(key).is_none_or(|e| &e.canonical != canonical)
                    }
                    Op::Delete { key } => conflicted || self.view.entry(key).is_some(),
                }
            })
            .collect();
        let (mut keys_after, mut bytes_after) = (self.view.len(), self.view.bytes());
        for op in &ops {
            if let Some(old) = self.view.entry(op.key()) {
                keys_after -= 1;
                bytes_after -= op.key().len() + old.canonical.len();
            }
            if let Op::Put { key, canonical, .. } = op {
                keys_after += 1;
                bytes_after += key.len() + canonical.len();
            }
        }
        if keys_after > KEYS_PER_GROUP_MAX {
            return Err(EditError::TooManyKeys { keys: keys_after, max: KEYS_PER_GROUP_MAX });
        }
        if bytes_after > SETTINGS_BYTES_MAX {
            return Err(EditError::SettingsTooLarge { bytes: bytes_after, max: SETTINGS_BYTES_MAX });
        }
        let new_selectors: BTreeSet<&str> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { key, .. } => crate::overlay::split(key).map(|(_, selector)| selector),
                Op::Delete { .. } => None,
            })
            .collect();
        if !new_selectors.is_empty() {
            let selectors = crate::overlay::selectors(&self.view);
            let count = selectors.union(&new_selectors).count();
            if count > crate::limits::OVERLAY_SELECTORS_MAX && count > selectors.len() {
                return Err(EditError::BadOverlay {
                    detail: format!(
                        "a group holds overlays of at most {} selectors; this write makes {count}",
                        crate::limits::OVERLAY_SELECTORS_MAX
                    ),
                });
            }
        }
        let hash_after = self.view.hash_after(ops.iter().map(|op| match op {
            Op::Put { key, canonical, .. } => (key.as_str(), Some(canonical.as_str())),
            Op::Delete { key } => (key.as_str(), None),
        }));
        // Ids order by counter first, so the last id holds the largest counter seen.
        let counter = self.versions.keys().next_back().map_or(0, |id| id.counter) + 1;
        let id = VersionId::new(counter, self.doc.get_actor());
        let info = VersionInfo {
            id: id.clone(),
            author: meta.author.clone(),
            time: meta.time,
            message: meta.message.clone(),
            kind,
            content_hash: hash_after.to_hex(),
            hash_scheme: CONTENT_HASH_SCHEME,
            parents: self.head_versions().into_iter().map(|v| v.id.clone()).collect(),
            secret: self.new_secret_marks(&meta.secret)?,
        };
        Ok(PlannedEdit { ops, info, hash_after, configuration: None, schema: None })
    }

    /// The keys of `asked` not marked secret yet, each once, in order; refused when one is not
    /// a key (an overlay's stored key is marked through its base key) or when the group would
    /// hold more than [`SECRET_KEYS_MAX`] marks.
    fn new_secret_marks(&self, asked: &[String]) -> Result<Vec<String>, EditError> {
        let mut marks: Vec<String> = Vec::new();
        for key in asked {
            crate::key::validate_key(key)?;
            if !self.secret_keys.contains(key) && !marks.contains(key) {
                marks.push(key.clone());
            }
        }
        let marked = self.secret_keys.len() + marks.len();
        if !marks.is_empty() && marked > SECRET_KEYS_MAX {
            return Err(EditError::TooManySecretKeys { marked, max: SECRET_KEYS_MAX });
        }
        Ok(marks)
    }

    /// `error` with the value of every secret key (marked, or marked by this write) taken out
    /// of its schema violations: the value and the validator's words, which quote it. The
    /// error goes back to the writer and into logs.
    fn mask_violations(&self, error: EditError, marking: &[String]) -> EditError {
        let EditError::SchemaViolation { group, mut violations } = error else { return error };
        for violation in &mut violations {
            let secret = violation.key.as_deref().is_some_and(|key| {
                let base = crate::overlay::base_key(key);
                self.is_secret(key) || marking.iter().any(|marked| marked == base)
            });
            if secret {
                violation.value = violation.value.as_ref().map(|_| MASKED_VALUE_TEXT.to_owned());
                violation.message = "the value breaks this rule (not shown: the key is secret)".to_owned();
            }
        }
        EditError::SchemaViolation { group, violations }
    }

    /// Whether the group holds a secret mark once `plan` is written.
    fn has_marks_after(&self, plan: &PlannedEdit) -> bool {
        !self.secret_keys.is_empty() || !plan.info.secret.is_empty()
    }

    /// Keys marked secret (issue 17), by any version this node holds.
    pub fn secret_keys(&self) -> &BTreeSet<String> {
        &self.secret_keys
    }

    /// Whether `key` (a key, or an overlay's stored key `KEY@SELECTOR`) holds a secret value.
    pub fn is_secret(&self, key: &str) -> bool {
        self.secret_keys.contains(crate::overlay::base_key(key))
    }

    /// Saves the whole document (a snapshot) in Automerge's compressed format.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// Saves the whole document without Automerge's deflate (for snapshot records, which
    /// compress it as a whole).
    pub fn save_uncompressed(&self) -> Vec<u8> {
        self.doc.save_nocompress()
    }

    /// Whether new versions wait for a release (SPEC F14).
    pub fn is_gated(&self) -> bool {
        self.policy.release == ReleasePolicy::Gated
    }

    /// The settings this node serves to its applications: the latest in an immediate group,
    /// the released version's in a gated one (SPEC F14). Reads, watches and the SDK see these;
    /// history, diff and `show` see every version.
    pub fn served_settings(&self) -> &Settings {
        self.served.as_ref().map_or(&self.view, |served| &served.settings)
    }

    /// One served setting.
    pub fn served_get(&self, key: &str) -> Option<&Value> {
        self.served_settings().get(key)
    }

    /// The label of the version served: the latest in an immediate group, the released one in
    /// a gated group.
    pub fn served_label(&self) -> String {
        match &self.served {
            Some(served) => self.label(&served.version),
            None => self.latest_label(),
        }
    }

    /// The version a gated group serves (`None` in an immediate group).
    pub fn served_version(&self) -> Option<&VersionId> {
        self.served.as_ref().map(|served| &served.version)
    }

    /// The newest release: its id and its version record (`None` before any release).
    pub fn current_release(&self) -> Option<(&VersionId, &VersionInfo)> {
        let id = crate::release::current_release(&self.releases, &self.versions)?;
        Some((id, &self.versions.get(id)?.info))
    }

    /// The release in force: the newest one that is not aborted (after an abort, the release
    /// before it serves again, and promotions, aborts and guards act on it).
    pub fn active_release(&self) -> Option<(&VersionId, &VersionInfo)> {
        self.releases.iter().rev().find_map(|id| {
            let info = &self.versions.get(id)?.info;
            let VersionKind::Release { to, .. } = &info.kind else { return None };
            (self.versions.contains_key(to) && self.release_progress(id).aborted.is_none()).then_some((id, info))
        })
    }

    /// A release's progress (its wave, whether it was aborted), folded from its events.
    pub fn release_progress(&self, release: &VersionId) -> crate::release::ReleaseProgress {
        crate::release::progress(release, &self.releases, &self.versions)
    }

    /// Every release of the group, oldest first: its id and its version record.
    pub fn releases(&self) -> impl Iterator<Item = (&VersionId, &VersionInfo)> {
        self.releases.iter().filter_map(|id| {
            let info = &self.versions.get(id)?.info;
            matches!(info.kind, VersionKind::Release { .. }).then_some((id, info))
        })
    }

    /// The release that gives this node what it serves, and its target (`None` in an
    /// immediate group, or before the first release reaches this node): what an application's
    /// apply report is about (SPEC F16).
    pub fn serving_release(&self) -> Option<(&VersionId, &VersionId)> {
        self.served.as_ref()?;
        crate::release::serving_release(&self.name, &self.releases, &self.versions, &self.viewer)
    }

    /// True when `viewer` (any node, with its labels) is in the slice of `release` at the
    /// release's current wave, whether or not the release is aborted or superseded.
    pub fn release_holds(&self, release: &VersionId, viewer: &crate::release::Viewer) -> bool {
        match self.versions.get(release).map(|entry| &entry.info.kind) {
            Some(VersionKind::Release { strategy, .. }) => {
                let wave = self.release_progress(release).wave;
                crate::release::in_slice(&self.name, release, strategy, wave, viewer)
            }
            _ => false,
        }
    }

    /// The first wave (counted from 0) of `release` whose slice holds `viewer`, if any.
    pub fn release_wave_of(&self, release: &VersionId, viewer: &crate::release::Viewer) -> Option<u32> {
        let Some(VersionKind::Release { strategy, .. }) = self.versions.get(release).map(|entry| &entry.info.kind)
        else {
            return None;
        };
        let waves = match strategy {
            ReleaseStrategy::All => 1,
            ReleaseStrategy::Canary(canary) => canary.waves.len().max(1) as u32,
        };
        (0..waves).find(|wave| crate::release::in_slice(&self.name, release, strategy, *wave, viewer))
    }

    /// True when this node is in the slice of `release` at its current wave.
    pub fn in_release_slice(&self, release: &VersionId) -> bool {
        self.release_holds(release, &self.viewer)
    }

    /// Sets the node this document serves (its id and labels pick its canary slices) and
    /// recomputes what it serves, telling nobody: called before anyone watches.
    pub fn set_viewer(&mut self, viewer: crate::release::Viewer) {
        if self.viewer != viewer {
            self.viewer = viewer;
            if self.served.is_some() {
                self.served = Some(self.compute_served());
            }
        }
    }

    /// The served version and settings as the document says now.
    fn compute_served(&self) -> Served {
        let version = crate::release::served_target(&self.name, &self.releases, &self.versions, &self.viewer)
            .unwrap_or_else(|| VersionId { counter: 0, actor: String::new() });
        // A target this node indexed is readable; a document without versions serves nothing.
        let settings = self.settings_at(&version).unwrap_or_default();
        // Each node serves the version's base with the overlays its labels match (SPEC F29).
        let settings = crate::overlay::resolve(&settings, &self.viewer.labels);
        Served { version, settings }
    }

    /// Brings a gated group's served settings up to date after changes were added (a release,
    /// or the version a release targets arriving). Returns what the applications must be told,
    /// or `None` when the served version did not move (always `None` in an immediate group).
    pub fn refresh_served(&mut self) -> Option<ServedChange> {
        let old = self.served.as_ref()?;
        let target = crate::release::served_target(&self.name, &self.releases, &self.versions, &self.viewer)?;
        if target == old.version {
            return None;
        }
        let next = self.compute_served();
        let old = self.served.replace(next)?;
        let new = &self.served.as_ref()?.settings;
        let diff = SettingsDiff::between(&old.settings, new);
        let set =
            diff.added.into_iter().chain(diff.changed.into_iter().map(|changed| (changed.key, changed.new))).collect();
        Some(ServedChange { set, removed: diff.removed.into_iter().map(|(key, _)| key).collect() })
    }

    /// Checks that the served version is the one the document says (after
    /// [`GroupDoc::refresh_served`]; tests and debug builds).
    pub fn served_matches_document(&self) -> bool {
        self.served.as_ref().is_none_or(|served| {
            crate::release::served_target(&self.name, &self.releases, &self.versions, &self.viewer).as_ref()
                == Some(&served.version)
                && self
                    .settings_at(&served.version)
                    .is_ok_and(|settings| crate::overlay::resolve(&settings, &self.viewer.labels) == served.settings)
        })
    }

    /// Checks that the derived state equals what the document says (tests and debug builds).
    /// A gated group's served settings are brought up to date by the caller after a change
    /// ([`GroupDoc::refresh_served`]) and checked by [`GroupDoc::served_matches_document`].
    pub fn derived_state_matches_document(&self) -> bool {
        let (view, conflicted, _) = settings_from_document(&self.doc, &self.objects.settings, None);
        view == self.view
            && conflicted == self.conflicted
            // A superset: an entry of a register a faulty peer overwrote stays in the index, and
            // an op on it only makes its key read again.
            && registers(&self.doc, &self.objects.settings).iter().all(|(id, key)| self.registers.get(id) == Some(key))
            && self.view.recomputed_hash() == self.view.content_hash()
    }
}

/// An edit ready to be written: the effective operations and the version entry.
struct PlannedEdit {
    ops: Vec<Op>,
    info: VersionInfo,
    hash_after: ContentHash,
    /// A new configuration to store (a membership version).
    configuration: Option<Configuration>,
    /// A new schema to store, or `Some(None)` to remove it (a schema version).
    schema: Option<Option<Schema>>,
}

/// Writes a planned edit into `doc` as one Automerge change; on error the transaction is
/// rolled back and `doc` is unchanged.
/// Registers a write made, with their keys.
type MadeRegisters = Vec<(ObjId, String)>;

/// A document of an older format is converted by its first write: registers for the keys
/// written, and `ROOT.format` set to this version's. Returns the registers it made, with their
/// keys.
fn write_plan(
    doc: &mut Automerge,
    objects: &Objects,
    secret: bool,
    plan: &PlannedEdit,
    meta: &CommitMeta,
) -> Result<(ChangeHash, Vec<u8>, MadeRegisters), EditError> {
    let key = plan.info.id.storage_key();
    let mut made = Vec::new();
    let current_format = read_format(doc);
    let mut tx = doc.transaction();
    let written = (|| {
        // Against the document's own value, not a cached one: a conversion to format 3 made
        // concurrently with a first mark may have won, and each later write puts 5 back.
        let target = written_format(secret);
        if current_format < target {
            tx.put(automerge::ROOT, "format", target)?;
        }
        for op in &plan.ops {
            match op {
                Op::Put { key: setting, canonical, .. } => {
                    if let Some(register) = crate::register::put(&mut tx, &objects.settings, setting, &key, canonical)?
                    {
                        made.push((register, setting.clone()));
                    }
                }
                Op::Delete { key: setting } => crate::register::delete(&mut tx, &objects.settings, setting)?,
            }
        }
        if let Some(configuration) = &plan.configuration {
            tx.put(automerge::ROOT, CONFIGURATION_KEY, configuration.to_json())?;
        }
        match &plan.schema {
            Some(Some(schema)) => tx.put(automerge::ROOT, SCHEMA_KEY, schema.canonical())?,
            Some(None) => tx.delete(automerge::ROOT, SCHEMA_KEY)?,
            None => {}
        }
        tx.put(&objects.versions, key.as_str(), version_json(&plan.info))
    })();
    if let Err(error) = written {
        tx.rollback();
        return Err(EditError::Document { detail: error.to_string() });
    }
    let options = CommitOptions::default().with_message(key).with_time(meta.time.as_secs());
    let (hash, _) = tx.commit_with(options);
    let change_hash = hash.ok_or_else(|| EditError::Document { detail: "empty change".into() })?;
    let change = last_local_change_bytes(doc)?;
    Ok((change_hash, change, made))
}

/// The least `ROOT.format` a document holds once a write is in it: this version's layout, and
/// [`SECRET_FORMAT`] once a key is marked `secret`.
fn written_format(secret: bool) -> u64 {
    if secret { SECRET_FORMAT } else { DOCUMENT_FORMAT }
}

fn version_json(info: &VersionInfo) -> String {
    // VersionInfo holds only strings, numbers and enums: serialization cannot fail.
    serde_json::to_string(info).unwrap_or_default()
}

fn last_local_change_bytes(doc: &Automerge) -> Result<Vec<u8>, EditError> {
    doc.get_last_local_change()
        .map(|change| change.raw_bytes().to_vec())
        .ok_or_else(|| EditError::Document { detail: "no local change after commit".into() })
}

/// `ROOT.format` (0 when missing or not a number).
pub(crate) fn read_format(doc: &Automerge) -> u64 {
    match doc.get(automerge::ROOT, "format") {
        Ok(Some((AmValue::Scalar(s), _))) => match s.as_ref() {
            ScalarValue::Uint(n) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

/// Versions that decide what a gated group serves.
fn is_release_record(kind: &VersionKind) -> bool {
    matches!(kind, VersionKind::Release { .. } | VersionKind::Promote { .. } | VersionKind::Abort { .. })
}

/// The policy map's settings; defaults for anything missing (format 1 documents).
fn read_policy(doc: &Automerge) -> GroupPolicy {
    let mut policy = GroupPolicy::default();
    let Ok(Some((AmValue::Object(ObjType::Map), obj))) = doc.get(automerge::ROOT, "policy") else {
        return policy;
    };
    if let Ok(Some((AmValue::Scalar(s), _))) = doc.get(&obj, "evict_after_ms")
        && let ScalarValue::Uint(ms) = s.as_ref()
    {
        policy.evict_after = Millis((*ms).max(crate::limits::EVICT_AFTER_MIN_MS));
    }
    if let Ok(Some((AmValue::Scalar(s), _))) = doc.get(&obj, "fencing")
        && let Some(fencing) = s.as_str().and_then(|t| t.parse::<Fencing>().ok())
    {
        policy.fencing = fencing;
    }
    // `release` is read at the genesis change (`GroupDoc::genesis_release_policy`).
    policy
}

/// The schema the document holds, if any: compiled, or the reason it cannot be.
pub(crate) fn read_schema(doc: &Automerge) -> StoredSchema {
    match doc.get(automerge::ROOT, SCHEMA_KEY) {
        Ok(Some((AmValue::Scalar(s), _))) => Some(match s.as_str() {
            Some(text) => Schema::from_stored(text).map_err(|error| error.to_string()),
            None => Err("ROOT.schema is not text".to_owned()),
        }),
        Ok(None) => None,
        _ => Some(Err("ROOT.schema is not text".to_owned())),
    }
}

/// The configuration the document holds, if any (and if it parses).
pub(crate) fn read_configuration(doc: &Automerge) -> Option<Configuration> {
    match doc.get(automerge::ROOT, CONFIGURATION_KEY) {
        Ok(Some((AmValue::Scalar(s), _))) => s.as_str().and_then(Configuration::from_json),
        _ => None,
    }
}

/// Reads the settings map (at `heads`, or now) into settings, the conflicted keys and the keys
/// whose entries are invalid.
pub(crate) fn settings_from_document(
    doc: &Automerge,
    settings: &ObjId,
    heads: Option<&[ChangeHash]>,
) -> (Settings, BTreeSet<String>, BTreeSet<String>) {
    let mut view = Settings::new();
    let mut conflicted = BTreeSet::new();
    let mut invalid = BTreeSet::new();
    let keys: Vec<String> = match heads {
        Some(heads) => doc.map_range_at(settings, .., heads).map(|item| item.key.into_owned()).collect(),
        None => doc.map_range(settings, ..).map(|item| item.key.into_owned()).collect(),
    };
    for key in keys {
        match read_key(doc, settings, &key, heads) {
            KeyState::Absent => {}
            KeyState::Invalid { conflict } => {
                if conflict {
                    conflicted.insert(key.clone());
                }
                invalid.insert(key);
            }
            KeyState::Value { value, conflict } => {
                if conflict {
                    conflicted.insert(key.clone());
                }
                view.insert(key, value);
            }
        }
    }
    (view, conflicted, invalid)
}

/// Every visible register of the settings map, by the id of the op that made it.
fn registers(doc: &Automerge, settings: &ObjId) -> BTreeMap<(u64, ActorId), String> {
    let keys: Vec<String> = doc.map_range(settings, ..).map(|item| item.key.into_owned()).collect();
    let mut registers = BTreeMap::new();
    for key in keys {
        for (value, id) in doc.get_all(settings, key.as_str()).unwrap_or_default() {
            if let (AmValue::Object(ObjType::Map), ObjId::Id(counter, actor, _)) = (value, id) {
                registers.insert((counter, actor), key.clone());
            }
        }
    }
    registers
}

/// What one key holds, as the read view serves it.
pub(crate) enum KeyState {
    /// No visible value.
    Absent,
    /// The winning value fails validation (only a faulty or hostile peer writes one): not served.
    Invalid { conflict: bool },
    /// The winning value; `conflict` when concurrent values are visible beside it.
    Value { value: Value, conflict: bool },
}

/// Reads one key (at `heads`, or now).
pub(crate) fn read_key(doc: &Automerge, settings: &ObjId, key: &str, heads: Option<&[ChangeHash]>) -> KeyState {
    let values = crate::register::values_of(doc, settings, key, heads);
    let conflict = values.len() > 1;
    let Some(winner) = values.first() else {
        return KeyState::Absent;
    };
    match winner.text.as_deref().map(|text| (crate::overlay::validate_stored_key(key), decode_value(key, text))) {
        Some((Ok(()), Ok(value))) => KeyState::Value { value, conflict },
        _ => KeyState::Invalid { conflict },
    }
}

/// The hex form of an actor, as used in version ids.
pub fn actor_hex(actor: &ActorId) -> String {
    hex(actor.to_bytes())
}

impl From<KeyError> for LoadError {
    fn from(error: KeyError) -> Self {
        LoadError::NotAGroup { detail: error.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshots from files and join grants are bounded before Automerge reads them: a document
    /// column declaring more rows than a document may have is refused (issue 12).
    #[test]
    fn a_snapshot_past_the_row_limit_is_refused() {
        let too_many = crate::change_bounds::tests::document_with_too_many_rows();
        let refused = GroupDoc::load(&too_many, ActorId::from([7u8; 16].as_slice()));
        // Refused by the bound, not by Automerge finding the column short.
        let Err(LoadError::Snapshot { detail }) = refused else { panic!("{refused:?}") };
        assert!(detail.contains("over the limit"), "{detail}");
    }

    /// Found by review: `if_version` looked only at the heads with a version this node can read,
    /// so a concurrent change without one (a newer konord's version kind) did not count as the
    /// group moving on.
    #[test]
    fn regression_a_head_without_a_readable_version_fails_a_version_condition() {
        let meta = |n: u64| CommitMeta::new("t", format!("m{n}"), Millis(1_700_000_000_000 + n));
        let (mut doc, _) =
            GroupDoc::create("app", Mode::Eventual, ActorId::from([1u8; 16].as_slice()), &meta(0)).unwrap();
        // A peer's change, concurrent with v2, whose version entry this node cannot read.
        let mut peer = GroupDoc::load(&doc.save(), ActorId::from([2u8; 16].as_slice())).unwrap();
        let v2 = doc.set(vec![("a".into(), serde_json::json!(1))], &meta(1)).unwrap();
        let label = doc.label(&v2.version.id);
        let mut tx = peer.doc.transaction();
        tx.put(&peer.objects.versions, "99999999999999999999.02", "{\"kind\":\"from_the_future\"}").unwrap();
        tx.commit();
        let change = peer.doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        doc.apply_changes(&[change]).unwrap();
        assert_eq!(doc.heads().len(), 2);
        assert_eq!(doc.head_versions().len(), 1, "only v2 is readable");
        let condition = Condition { version: Some(label), content: None };
        let refused = doc.set(vec![("a".into(), serde_json::json!(2))], &meta(2).with_condition(condition));
        let Err(EditError::ConditionFailed { actual, .. }) = refused else { panic!("{refused:?}") };
        assert!(actual.contains("without a version"), "{actual}");
    }

    /// Found by review: a member's change that wrote `ROOT.format = 4` and `policy.release =
    /// "gated"` into an immediate group made it gated on every node that reloaded it (and a
    /// change removing the key ungated a gated one). The policy is read at the genesis change.
    #[test]
    fn regression_a_later_change_to_the_release_policy_changes_nothing() {
        let meta = |n: u64| CommitMeta::new("t", format!("m{n}"), Millis(1_700_000_000_000 + n));
        let actor = |n: u8| ActorId::from([n; 16].as_slice());
        let (mut plain, _) = GroupDoc::create("app", Mode::Eventual, actor(1), &meta(0)).unwrap();
        let policy = match plain.doc.get(automerge::ROOT, "policy") {
            Ok(Some((AmValue::Object(ObjType::Map), obj))) => obj,
            other => panic!("{other:?}"),
        };
        let mut tx = plain.doc.transaction();
        tx.put(automerge::ROOT, "format", GATED_FORMAT).unwrap();
        tx.put(&policy, "release", "gated").unwrap();
        tx.commit();
        let reloaded = GroupDoc::load(&plain.save(), actor(2)).unwrap();
        assert!(!reloaded.is_gated(), "a later change gated an immediate group");

        let gated_policy = GroupPolicy { release: ReleasePolicy::Gated, ..GroupPolicy::default() };
        let (mut gated, _) =
            GroupDoc::create_with("gt", Mode::Eventual, actor(1), &meta(0), &gated_policy, None).unwrap();
        let policy = match gated.doc.get(automerge::ROOT, "policy") {
            Ok(Some((AmValue::Object(ObjType::Map), obj))) => obj,
            other => panic!("{other:?}"),
        };
        let mut tx = gated.doc.transaction();
        tx.delete(&policy, "release").unwrap();
        tx.commit();
        assert!(GroupDoc::load(&gated.save(), actor(2)).unwrap().is_gated(), "a later change ungated a gated group");
    }
}
