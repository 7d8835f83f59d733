//! Whole configuration files (TOML, YAML, JSON) turned into flat settings for `apply`.
//!
//! Nested tables become dotted keys (`[db] pool = 10` -> `db.pool = 10`); arrays, scalars and
//! empty tables are leaf values. The result is validated as a whole before anything is applied.

use serde_json::{Map, Value};

use crate::error::FileError;
use crate::file_format::FileFormat;
use crate::key::validate_key;
use crate::limits::{CONFIG_FILE_BYTES_MAX, KEYS_PER_GROUP_MAX, SETTINGS_BYTES_MAX};
use crate::settings::Settings;
use crate::value::encode_value;

/// Parses `text` as `format` and flattens it into validated settings.
pub fn parse_config_file(text: &str, format: FileFormat) -> Result<Settings, FileError> {
    if text.len() > CONFIG_FILE_BYTES_MAX {
        return Err(FileError::TooLarge { bytes: text.len(), max: CONFIG_FILE_BYTES_MAX });
    }
    let syntax = |detail: String| FileError::Syntax { format, detail };
    let document: Value = match format {
        FileFormat::Json => crate::json_strict::parse(text).map_err(|e| syntax(e.to_string()))?,
        FileFormat::Toml => toml_to_json(toml::from_str(text).map_err(|e| syntax(e.to_string()))?),
        FileFormat::Yaml => serde_yaml::from_str(text).map_err(|e| syntax(e.to_string()))?,
    };
    let Value::Object(top) = document else {
        return Err(FileError::NotATable { format });
    };
    let mut settings = Settings::new();
    flatten_into(&mut settings, "", top)?;
    if settings.len() > KEYS_PER_GROUP_MAX {
        return Err(FileError::TooManyKeys { keys: settings.len(), max: KEYS_PER_GROUP_MAX });
    }
    if settings.bytes() > SETTINGS_BYTES_MAX {
        return Err(FileError::TooLarge { bytes: settings.bytes(), max: SETTINGS_BYTES_MAX });
    }
    Ok(settings)
}

/// TOML values as JSON; TOML dates and times become their RFC 3339 text (JSON has no date type).
fn toml_to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(text) => Value::String(text),
        toml::Value::Integer(n) => Value::from(n),
        toml::Value::Float(x) => serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(datetime) => Value::String(datetime.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(table.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect()),
    }
}

fn flatten_into(out: &mut Settings, prefix: &str, table: Map<String, Value>) -> Result<(), FileError> {
    for (name, value) in table {
        let key = if prefix.is_empty() { name } else { format!("{prefix}.{name}") };
        match value {
            Value::Object(inner) if !inner.is_empty() => flatten_into(out, &key, inner)?,
            leaf => {
                validate_key(&key)?;
                if out.get(&key).is_some() {
                    return Err(FileError::DuplicateKey { key });
                }
                let canonical = encode_value(&key, &leaf)?;
                out.insert_canonical(key, leaf, canonical);
            }
        }
        if out.len() > KEYS_PER_GROUP_MAX {
            return Err(FileError::TooManyKeys { keys: out.len(), max: KEYS_PER_GROUP_MAX });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use serde_json::json;

    #[test]
    fn flattens_nested_tables_in_every_format() {
        let toml = "timeout_ms = 250\n[db]\npool = 10\nhosts = [\"a\", \"b\"]\n";
        let yaml = "timeout_ms: 250\ndb:\n  pool: 10\n  hosts: [a, b]\n";
        let json = r#"{"timeout_ms": 250, "db": {"pool": 10, "hosts": ["a", "b"]}}"#;
        let parsed: Vec<Settings> = [(toml, FileFormat::Toml), (yaml, FileFormat::Yaml), (json, FileFormat::Json)]
            .into_iter()
            .map(|(text, format)| parse_config_file(text, format).unwrap())
            .collect();
        assert_eq!(parsed[0], parsed[1]);
        assert_eq!(parsed[1], parsed[2]);
        assert_eq!(parsed[0].get("db.hosts"), Some(&json!(["a", "b"])));
        assert_eq!(parsed[0].get("timeout_ms"), Some(&json!(250)));
    }

    #[test]
    fn malformed_files_name_the_problem() {
        let errors: Vec<String> = [
            ("a = ", FileFormat::Toml),
            ("a: [1, 2", FileFormat::Yaml),
            ("{\"a\": }", FileFormat::Json),
            ("[1, 2]", FileFormat::Json),
            ("\"bad key\" = 1", FileFormat::Toml),
            ("{\"a.b\": 1, \"a\": {\"b\": 2}}", FileFormat::Json),
        ]
        .into_iter()
        .map(|(text, format)| parse_config_file(text, format).unwrap_err().to_string())
        .collect();
        expect![[r#"
            [
                "toml file does not parse: TOML parse error at line 1, column 5\n  |\n1 | a = \n  |     ^\n\n",
                "yaml file does not parse: did not find expected ',' or ']' at line 2 column 1, while parsing a flow sequence at line 1 column 4",
                "json file does not parse: expected value at line 1 column 7",
                "json file must hold a table of settings at the top level",
                "invalid key \"bad key\": character ' ' not allowed (use letters, digits, '_' or '-' between dots)",
                "key \"a.b\" is defined twice in the file (once nested, once dotted?)",
            ]
        "#]]
        .assert_debug_eq(&errors);
    }

    #[test]
    fn toml_dates_become_text() {
        let settings = parse_config_file("released = 2026-11-24T10:00:00Z\n", FileFormat::Toml).unwrap();
        assert_eq!(settings.get("released"), Some(&json!("2026-11-24T10:00:00Z")));
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(FileFormat::from_path("app.YML"), Some(FileFormat::Yaml));
        assert_eq!(FileFormat::from_path("x/app.toml"), Some(FileFormat::Toml));
        assert_eq!(FileFormat::from_path("noext"), None);
    }
}
