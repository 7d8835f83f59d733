//! A group's schema (SPEC F8): a JSON Schema that the group's settings must satisfy, checked on
//! the node where a write is made, before the change exists anywhere.
//!
//! The schema is validated against the settings as one **flat** JSON object, the way they are
//! stored: `{"db.port": 5432, "db.host": "a"}` (keys are dotted paths, docs/data-model.md). A
//! schema names keys in `properties` and `required`, or key patterns in `patternProperties`
//! (`"^feature\\."`).
//!
//! The rule a write must pass: it may not add a violation. A write that leaves the settings
//! valid passes; so does one that fixes some of the violations already there (concurrent writes
//! on two nodes can each be valid and merge into settings that are not, and the writes that
//! repair such a state must not be refused). A violation at a key is known by the key and the
//! schema rule it breaks, so a write that changes a bad value into another bad value of the same
//! rule passes, and a write that breaks a rule at a key where none was broken does not. A key the
//! schema does not allow (`additionalProperties`, `unevaluatedProperties`) is a violation of its
//! own at that key; a missing `required` key is known by its name; any other rule about the
//! settings as a whole (`maxProperties`, an `anyOf` at the root) by the rule and its message
//! (which never quotes the settings), so while such a rule stays broken, writes are not refused
//! for it. The comparison uses every violation; only what a refusal reports is cut.
//!
//! Bounded work: compiling uses no network and no files (the crate is built without remote
//! `$ref` resolution) and the `regex` engine, whose matching time is linear. A `$ref` must be a
//! JSON pointer into the schema itself (`#/$defs/port`), never recursive, and the schema with
//! every `$ref` written out in place may hold at most [`SCHEMA_EXPANDED_NODES_MAX`] JSON values:
//! a few kilobytes of `allOf` twice referring to the next level would otherwise cost 2^depth
//! checks per value. At most [`SCHEMA_PATTERNS_MAX`] regular expressions are compiled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use jsonschema::error::ValidationErrorKind;
use serde_json::Value;

use crate::error::{SchemaError, Violation};
use crate::limits::{
    SCHEMA_BYTES_MAX, SCHEMA_EXPANDED_NODES_MAX, SCHEMA_PATTERNS_MAX, SCHEMA_REGEX_BYTES_MAX, VIOLATIONS_REPORTED_MAX,
};
use crate::settings::{Settings, hex};

/// A compiled schema and its stored text.
#[derive(Clone)]
pub struct Schema {
    canonical: String,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").field("hash", &self.hash()).field("bytes", &self.canonical.len()).finish()
    }
}

impl PartialEq for Schema {
    fn eq(&self, other: &Schema) -> bool {
        self.canonical == other.canonical
    }
}

impl Schema {
    /// Compiles `value` as a JSON Schema (draft detected from `$schema`, 2020-12 when absent).
    pub fn compile(value: &Value) -> Result<Schema, SchemaError> {
        let canonical = crate::value::canonical_json(value);
        if canonical.len() > SCHEMA_BYTES_MAX {
            return Err(SchemaError::TooLarge { bytes: canonical.len(), max: SCHEMA_BYTES_MAX });
        }
        if !matches!(value, Value::Object(_) | Value::Bool(_)) {
            return Err(SchemaError::Invalid { detail: "a schema is a JSON object (or true / false)".into() });
        }
        bound_work(value)?;
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .with_pattern_options(jsonschema::PatternOptions::regex().size_limit(SCHEMA_REGEX_BYTES_MAX))
            .build(value)
            .map_err(|error| SchemaError::Invalid { detail: error.to_string() })?;
        Ok(Schema { canonical, validator: Arc::new(validator) })
    }

    /// Compiles a schema stored as canonical JSON text (the document's `ROOT.schema`).
    pub fn from_stored(text: &str) -> Result<Schema, SchemaError> {
        if text.len() > SCHEMA_BYTES_MAX {
            return Err(SchemaError::TooLarge { bytes: text.len(), max: SCHEMA_BYTES_MAX });
        }
        let value: Value =
            serde_json::from_str(text).map_err(|error| SchemaError::Invalid { detail: error.to_string() })?;
        Schema::compile(&value)
    }

    /// The schema as canonical JSON text (what the document stores).
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// The schema as a JSON value.
    pub fn to_value(&self) -> Value {
        // Canonical JSON text is JSON; the fallback is never taken.
        serde_json::from_str(&self.canonical).unwrap_or(Value::Null)
    }

    /// The first 12 hex digits of the SHA-256 of the canonical text: names the schema in the
    /// version that set it.
    pub fn hash(&self) -> String {
        use sha2::Digest;
        hex(&sha2::Sha256::digest(self.canonical.as_bytes()))[..12].to_owned()
    }

    /// Every rule `settings` break, sorted, at most [`VIOLATIONS_REPORTED_MAX`] plus one (so
    /// that a caller can tell "more").
    pub fn violations(&self, settings: &Settings) -> Vec<Violation> {
        self.all_violations(settings).into_iter().take(VIOLATIONS_REPORTED_MAX + 1).collect()
    }

    /// Every rule `settings` break, sorted, uncut. With overlays (SPEC F29), the base and each
    /// overlay's view must hold; a violation in an overlay's view names the overlay's key.
    fn all_violations(&self, settings: &Settings) -> BTreeSet<Violation> {
        if !crate::overlay::has_overlays(settings) {
            return self.view_violations(settings);
        }
        let mut found = self.view_violations(&crate::overlay::base(settings));
        let Some(views) = crate::overlay::views(settings) else {
            found.insert(Violation {
                key: None,
                value: None,
                rule: String::new(),
                message: format!(
                    "the overlays combine into more than {} views, too many to check against the schema: \
                     use fewer overlapping selectors",
                    crate::limits::OVERLAY_VIEWS_MAX
                ),
            });
            return found;
        };
        let in_base: BTreeSet<(Option<String>, String, String)> = found.iter().map(identity).collect();
        for (labels, view) in views {
            for mut violation in self.view_violations(&view) {
                if in_base.contains(&identity(&violation)) {
                    continue;
                }
                // A violation on a key an overlay sets names the overlay that wins it (the last
                // matching selector in text order), else the view's labels.
                let overlay = violation.key.as_ref().and_then(|key| {
                    settings
                        .entries()
                        .map(|(stored, _)| stored)
                        .filter(|stored| {
                            crate::overlay::split(stored).is_some_and(|(base, selector)| {
                                base == key && crate::overlay::selector_within(selector, &labels)
                            })
                        })
                        .last()
                });
                match overlay {
                    Some(stored) => violation.key = Some(stored.to_owned()),
                    None => violation.message = format!("{} (on nodes labelled {labels})", violation.message),
                }
                found.insert(violation);
            }
        }
        found
    }

    /// Every rule one view of the settings breaks.
    fn view_violations(&self, settings: &Settings) -> BTreeSet<Violation> {
        let instance = settings.to_json();
        let mut found = BTreeSet::new();
        if self.validator.is_valid(&instance) {
            return found;
        }
        let value_of = |key: &str| settings.entry(key).map(|entry| entry.canonical.clone());
        for error in self.validator.iter_errors(&instance) {
            let rule = error.schema_path().to_string();
            // Keys the schema does not allow: one violation each, at the key.
            if let ValidationErrorKind::AdditionalProperties { unexpected }
            | ValidationErrorKind::UnevaluatedProperties { unexpected } = error.kind()
                && error.instance_path().to_string().is_empty()
            {
                for key in unexpected {
                    let message = format!("key {key:?} is not allowed by the schema");
                    found.insert(Violation {
                        key: Some(key.clone()),
                        value: value_of(key),
                        rule: rule.clone(),
                        message,
                    });
                }
                continue;
            }
            let pointer = error.instance_path().to_string();
            // The settings object is flat: the first segment of the pointer is the key.
            let key = pointer
                .strip_prefix('/')
                .map(|rest| rest.split('/').next().unwrap_or(rest).replace("~1", "/").replace("~0", "~"));
            // About the settings as a whole: the message without the settings in it.
            let message = match key {
                Some(_) => error.to_string(),
                None => error.masked_with("the settings").to_string(),
            };
            let value = key.as_deref().and_then(value_of);
            found.insert(Violation { key, value, rule, message });
        }
        found
    }

    /// The violations `after` has that `before` did not (a write may not add any), at most
    /// [`VIOLATIONS_REPORTED_MAX`] plus one.
    pub fn added_violations(&self, before: &Settings, after: &Settings) -> Vec<Violation> {
        let after = self.all_violations(after);
        if after.is_empty() {
            return Vec::new();
        }
        let known: BTreeSet<(Option<String>, String, String)> =
            self.all_violations(before).iter().map(identity).collect();
        after.into_iter().filter(|v| !known.contains(&identity(v))).take(VIOLATIONS_REPORTED_MAX + 1).collect()
    }
}

/// What makes two violations the same across a write: the key and the rule; for a rule about
/// the settings as a whole, its message too (a missing `required` key is named in it).
fn identity(violation: &Violation) -> (Option<String>, String, String) {
    let detail = if violation.key.is_none() { violation.message.clone() } else { String::new() };
    (violation.key.clone(), violation.rule.clone(), detail)
}

/// Refuses a schema whose checks could take unbounded work: a `$ref` that is not a JSON pointer
/// into the schema, `$dynamicRef` / `$recursiveRef`, a `$id` below the root (it would move what
/// a pointer means), a recursive `$ref`, more than [`SCHEMA_EXPANDED_NODES_MAX`] JSON values
/// with every `$ref` written out in place, or more than [`SCHEMA_PATTERNS_MAX`] patterns.
fn bound_work(schema: &Value) -> Result<(), SchemaError> {
    let invalid = |detail: String| SchemaError::Invalid { detail };
    let mut walk = Walk { root: schema, done: BTreeMap::new(), open: BTreeSet::new(), patterns: 0 };
    let nodes = walk.count(schema, "", true)?;
    if nodes > SCHEMA_EXPANDED_NODES_MAX {
        return Err(invalid(format!(
            "with every $ref written out the schema holds {nodes} JSON values, at most {SCHEMA_EXPANDED_NODES_MAX} \
             allowed (its checks would cost as much on every write)"
        )));
    }
    if walk.patterns > SCHEMA_PATTERNS_MAX {
        return Err(invalid(format!(
            "the schema has {} patterns, at most {SCHEMA_PATTERNS_MAX} allowed",
            walk.patterns
        )));
    }
    Ok(())
}

/// The walk of [`bound_work`]: expanded sizes of the `$ref` targets already counted, the targets
/// being counted (a cycle), and the patterns seen.
struct Walk<'a> {
    root: &'a Value,
    done: BTreeMap<String, usize>,
    open: BTreeSet<String>,
    patterns: usize,
}

impl Walk<'_> {
    /// The JSON values in `value` with every `$ref` written out in place (a referenced subtree
    /// counts its whole size at each `$ref`).
    fn count(&mut self, value: &Value, here: &str, root: bool) -> Result<usize, SchemaError> {
        let invalid = |detail: String| SchemaError::Invalid { detail };
        let mut nodes = 1usize;
        match value {
            Value::Object(members) => {
                for keyword in ["$dynamicRef", "$recursiveRef"] {
                    if members.contains_key(keyword) {
                        return Err(invalid(format!("{keyword} at {here:?} is not supported (use $ref)")));
                    }
                }
                if !root && members.contains_key("$id") {
                    return Err(invalid(format!("$id at {here:?}: only the schema's root may have one")));
                }
                if members.get("pattern").is_some_and(Value::is_string) {
                    self.patterns += 1;
                }
                if let Some(Value::Object(patterns)) = members.get("patternProperties") {
                    self.patterns += patterns.len();
                }
                if let Some(reference) = members.get("$ref") {
                    nodes = nodes.saturating_add(self.reference(reference, here)?);
                }
                for (name, member) in members {
                    nodes = nodes.saturating_add(self.count(member, &format!("{here}/{name}"), false)?);
                }
            }
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    nodes = nodes.saturating_add(self.count(item, &format!("{here}/{index}"), false)?);
                }
            }
            _ => {}
        }
        Ok(nodes)
    }

    /// The expanded size of what `reference` (a `$ref` value at `here`) points to.
    fn reference(&mut self, reference: &Value, here: &str) -> Result<usize, SchemaError> {
        let invalid = |detail: String| SchemaError::Invalid { detail };
        let Some(text) = reference.as_str() else {
            return Err(invalid(format!("$ref at {here:?} is not a string")));
        };
        let Some(pointer) = text.strip_prefix('#').filter(|p| p.is_empty() || p.starts_with('/')) else {
            return Err(invalid(format!(
                "$ref {text:?} at {here:?}: only a JSON pointer into this schema is allowed (\"#/$defs/name\")"
            )));
        };
        if let Some(size) = self.done.get(pointer) {
            return Ok(*size);
        }
        if !self.open.insert(pointer.to_owned()) {
            return Err(invalid(format!(
                "$ref {text:?} at {here:?} is recursive; a schema here may not refer to itself"
            )));
        }
        let root = self.root;
        let Some(target) = root.pointer(pointer) else {
            return Err(invalid(format!("$ref {text:?} at {here:?} points to nothing in the schema")));
        };
        // Patterns are counted where they are written, not once per reference.
        let patterns = self.patterns;
        let size = self.count(target, pointer, pointer.is_empty())?;
        self.patterns = patterns;
        self.open.remove(pointer);
        self.done.insert(pointer.to_owned(), size);
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::limits::SCHEMA_PATTERNS_MAX;

    fn settings(value: Value) -> Settings {
        let mut settings = Settings::new();
        for (key, value) in value.as_object().unwrap() {
            settings.insert(key.clone(), value.clone());
        }
        settings
    }

    fn port_schema() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "properties": {"db.port": {"type": "integer", "minimum": 1, "maximum": 65535}},
            "required": ["db.port"],
            "patternProperties": {"^feature\\.": {"type": "boolean"}}
        }))
        .unwrap()
    }

    #[test]
    fn a_violation_names_the_key_the_value_and_the_rule() {
        let found = port_schema().violations(&settings(json!({"db.port": 70000, "feature.x": true})));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].key.as_deref(), Some("db.port"));
        assert_eq!(found[0].value.as_deref(), Some("70000"));
        assert_eq!(found[0].rule, "/properties/db.port/maximum");
        assert!(found[0].to_string().contains("70000"), "{}", found[0]);
    }

    #[test]
    fn pattern_properties_and_required_keys_are_checked() {
        let found = port_schema().violations(&settings(json!({"feature.x": "yes"})));
        let rules: Vec<&str> = found.iter().map(|v| v.rule.as_str()).collect();
        // Sorted by key; the missing key is about the settings as a whole (no key).
        assert_eq!(rules, ["/required", "/patternProperties/^feature\\./type"], "{found:?}");
        assert_eq!(found[0].key, None);
        assert!(found[0].message.contains("db.port"), "{}", found[0].message);
        assert!(port_schema().violations(&settings(json!({"db.port": 80, "feature.x": false}))).is_empty());
    }

    #[test]
    fn a_write_may_fix_some_violations_but_add_none() {
        let schema = port_schema();
        let broken = settings(json!({"db.port": 0, "feature.x": 1}));
        // Fixing one of two: passes.
        assert!(schema.added_violations(&broken, &settings(json!({"db.port": 0, "feature.x": true}))).is_empty());
        // Breaking a rule nothing broke before: refused.
        let worse = schema.added_violations(&broken, &settings(json!({"db.port": 0, "feature.x": 1, "feature.y": 2})));
        assert_eq!(worse.iter().map(|v| v.key.as_deref()).collect::<Vec<_>>(), [Some("feature.y")]);
    }

    #[test]
    fn bad_schemas_are_refused_with_the_reason() {
        assert!(matches!(Schema::compile(&json!([1])), Err(SchemaError::Invalid { .. })));
        assert!(matches!(Schema::compile(&json!({"type": "no-such-type"})), Err(SchemaError::Invalid { .. })));
        // Look-around is not linear-time: the `regex` engine refuses it.
        let lookahead = json!({"patternProperties": {"^(?=a)": {}}});
        assert!(matches!(Schema::compile(&lookahead), Err(SchemaError::Invalid { .. })));
        // No `$ref` leaves the process.
        let remote = json!({"$ref": "https://example.com/schema.json"});
        assert!(matches!(Schema::compile(&remote), Err(SchemaError::Invalid { .. })));
        let huge = json!({"description": "x".repeat(SCHEMA_BYTES_MAX)});
        assert!(matches!(Schema::compile(&huge), Err(SchemaError::TooLarge { .. })));
    }

    /// Found by review: `allOf` referring twice to the next level compiled in a millisecond and
    /// cost 2^depth checks per value (5.6 s at depth 20), on the daemon's thread.
    #[test]
    fn regression_a_schema_whose_refs_fan_out_exponentially_is_refused() {
        let mut defs = serde_json::Map::new();
        for level in 0..30 {
            let next = format!("#/$defs/a{}", level + 1);
            defs.insert(format!("a{level}"), json!({"allOf": [{"$ref": next}, {"$ref": next}]}));
        }
        defs.insert("a30".into(), json!({"type": "string"}));
        let fan_out = json!({"$defs": defs, "properties": {"k": {"$ref": "#/$defs/a0"}}});
        let error = Schema::compile(&fan_out).unwrap_err();
        assert!(error.to_string().contains("JSON values"), "{error}");
        // References that do not multiply are fine.
        let shared = json!({
            "$defs": {"port": {"type": "integer", "minimum": 1, "maximum": 65535}},
            "properties": {"a.port": {"$ref": "#/$defs/port"}, "b.port": {"$ref": "#/$defs/port"}}
        });
        let schema = Schema::compile(&shared).unwrap();
        assert_eq!(schema.violations(&settings(json!({"a.port": 0, "b.port": 80}))).len(), 1);
    }

    #[test]
    fn refs_that_leave_the_schema_or_recurse_and_too_many_patterns_are_refused() {
        let refused = [
            json!({"$ref": "other.json#/a"}),
            json!({"$ref": "#anchor"}),
            json!({"$ref": "#/$defs/missing"}),
            json!({"$defs": {"a": {"items": {"$ref": "#/$defs/a"}}}, "properties": {"k": {"$ref": "#/$defs/a"}}}),
            json!({"properties": {"k": {"$dynamicRef": "#x"}}}),
            json!({"properties": {"k": {"$id": "https://example.com/k", "type": "string"}}}),
            json!({"patternProperties": (0..=SCHEMA_PATTERNS_MAX).map(|n| (format!("^p{n}"), json!({}))).collect::<serde_json::Map<_, _>>()}),
        ];
        for schema in refused {
            assert!(matches!(Schema::compile(&schema), Err(SchemaError::Invalid { .. })), "{schema:.80}");
        }
    }

    /// Found by review: a broken rule about the settings as a whole covered every later break of
    /// the same rule, so keys `additionalProperties` forbids and missing `required` keys got in.
    #[test]
    fn regression_a_broken_root_rule_does_not_let_new_breaks_of_it_through() {
        let closed =
            Schema::compile(&json!({"properties": {"a": {}, "b": {}}, "additionalProperties": false})).unwrap();
        let broken = settings(json!({"a": 1, "x": 1}));
        let worse = closed.added_violations(&broken, &settings(json!({"a": 1, "x": 1, "y": 1})));
        assert_eq!(worse.iter().map(|v| v.key.as_deref()).collect::<Vec<_>>(), [Some("y")], "{worse:?}");
        let repaired = settings(json!({"a": 1}));
        assert!(closed.added_violations(&settings(json!({"a": 1, "x": 1, "y": 1})), &broken).is_empty());
        assert!(closed.added_violations(&broken, &repaired).is_empty());
        let required = Schema::compile(&json!({"required": ["a", "b"]})).unwrap();
        let missing_a = settings(json!({"b": 1}));
        let worse = required.added_violations(&missing_a, &settings(json!({"c": 1})));
        assert_eq!(worse.len(), 1, "{worse:?}");
        assert!(worse[0].message.contains("\"b\""), "{worse:?}");
        // A whole-settings message never quotes the settings.
        let most = Schema::compile(&json!({"maxProperties": 1})).unwrap();
        let found = most.violations(&settings(json!({"secret": "hunter2", "b": 1})));
        assert!(!found[0].message.contains("hunter2"), "{found:?}");
    }

    /// Found by review: the comparison used the list cut for reports (21 violations), so a new
    /// break got in past it and a repair brought an old one into view and was refused.
    #[test]
    fn regression_the_comparison_sees_every_violation_not_only_those_reported() {
        let schema = port_schema();
        let many: serde_json::Map<String, Value> = (0..30)
            .map(|n| (format!("feature.a{n:02}"), json!(1)))
            .chain([("db.port".to_owned(), json!(80))])
            .collect();
        let before = settings(Value::Object(many.clone()));
        assert_eq!(schema.violations(&before).len(), VIOLATIONS_REPORTED_MAX + 1, "reports are cut");
        let mut more = many.clone();
        more.insert("feature.zz".into(), json!(2));
        let added = schema.added_violations(&before, &settings(Value::Object(more)));
        assert_eq!(added.iter().map(|v| v.key.as_deref()).collect::<Vec<_>>(), [Some("feature.zz")]);
        let mut fixed = many;
        fixed.insert("feature.a00".into(), json!(true));
        assert!(schema.added_violations(&before, &settings(Value::Object(fixed))).is_empty());
    }

    #[test]
    fn a_stored_schema_compiles_back_to_the_same_text() {
        let schema = port_schema();
        let again = Schema::from_stored(schema.canonical()).unwrap();
        assert_eq!(again, schema);
        assert_eq!(again.hash(), schema.hash());
        assert_eq!(again.hash().len(), 12);
    }
}
