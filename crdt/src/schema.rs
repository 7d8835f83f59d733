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
//! repair such a state must not be refused). A violation is known by its key and the schema
//! rule it breaks, so a write that changes a bad value into another bad value of the same rule
//! passes; a write that breaks a rule at a key where none was broken does not.
//!
//! Compiling uses no network and no files (the crate is built without `$ref` resolution) and the
//! `regex` engine, whose matching time is linear: a schema cannot make a write hang.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;

use crate::error::{SchemaError, Violation};
use crate::limits::{SCHEMA_BYTES_MAX, SCHEMA_REGEX_BYTES_MAX, VIOLATIONS_REPORTED_MAX};
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
        let instance = settings.to_json();
        if self.validator.is_valid(&instance) {
            return Vec::new();
        }
        let mut found = BTreeSet::new();
        for error in self.validator.iter_errors(&instance) {
            let pointer = error.instance_path().to_string();
            // The settings object is flat: the first segment of the pointer is the key.
            let key = pointer
                .strip_prefix('/')
                .map(|rest| rest.split('/').next().unwrap_or(rest).replace("~1", "/").replace("~0", "~"));
            let value = key.as_deref().and_then(|key| settings.entry(key)).map(|entry| entry.canonical.clone());
            found.insert(Violation { key, value, rule: error.schema_path().to_string(), message: error.to_string() });
            if found.len() > VIOLATIONS_REPORTED_MAX {
                break;
            }
        }
        found.into_iter().collect()
    }

    /// The violations `after` has that `before` did not (a write may not add any).
    pub fn added_violations(&self, before: &Settings, after: &Settings) -> Vec<Violation> {
        let after = self.violations(after);
        if after.is_empty() {
            return after;
        }
        let known: BTreeSet<(Option<String>, String)> =
            self.violations(before).into_iter().map(|v| (v.key, v.rule)).collect();
        after.into_iter().filter(|v| !known.contains(&(v.key.clone(), v.rule.clone()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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

    #[test]
    fn a_stored_schema_compiles_back_to_the_same_text() {
        let schema = port_schema();
        let again = Schema::from_stored(schema.canonical()).unwrap();
        assert_eq!(again, schema);
        assert_eq!(again.hash(), schema.hash());
        assert_eq!(again.hash().len(), 12);
    }
}
