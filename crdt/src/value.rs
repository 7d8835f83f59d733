//! Setting values: JSON, stored as canonical JSON text so that every node hashes and compares
//! the same bytes.

use serde_json::Value;

use crate::error::ValueError;
use crate::limits::VALUE_BYTES_MAX;

/// Canonical JSON text of `value` (RFC 8785 with 64-bit integers kept exact; docs/protocol.md,
/// "Canonical JSON"): [`konor_canon::canonical_json`], the implementation the SDK shares.
pub fn canonical_json(value: &Value) -> String {
    konor_canon::canonical_json(value)
}

/// `value` as its canonical text reads back, which is how every other node holds it: canonical
/// JSON prints an integral double without a fraction, so `1.0` reads back as the integer `1`
/// and `-0.0` as `0`. Values without doubles are returned as they are, unparsed.
pub fn normalized(value: Value, canonical: &str) -> Value {
    if !has_double(&value) {
        return value;
    }
    // Canonical text of a JSON value is JSON; the fallback is never taken.
    serde_json::from_str(canonical).unwrap_or(value)
}

fn has_double(value: &Value) -> bool {
    match value {
        Value::Number(number) => number.is_f64(),
        Value::Array(items) => items.iter().any(has_double),
        Value::Object(members) => members.values().any(has_double),
        Value::Null | Value::Bool(_) | Value::String(_) => false,
    }
}

/// Encodes `value` for storage, refusing values over [`VALUE_BYTES_MAX`].
pub fn encode_value(key: &str, value: &Value) -> Result<String, ValueError> {
    let text = canonical_json(value);
    if text.len() > VALUE_BYTES_MAX {
        return Err(ValueError::TooLarge { key: key.to_owned(), bytes: text.len(), max: VALUE_BYTES_MAX });
    }
    Ok(text)
}

/// Decodes a stored value; anything that is not JSON within the size limit is refused.
pub fn decode_value(key: &str, text: &str) -> Result<Value, ValueError> {
    if text.len() > VALUE_BYTES_MAX {
        return Err(ValueError::TooLarge { key: key.to_owned(), bytes: text.len(), max: VALUE_BYTES_MAX });
    }
    serde_json::from_str(text).map_err(|e| ValueError::NotJson { key: key.to_owned(), detail: e.to_string() })
}

/// Parses a value typed by a person on a command line: JSON when it parses as JSON, otherwise
/// the text itself as a JSON string (`port=8080` is a number, `name=eu-west` a string). JSON is
/// read strictly ([`crate::json_strict`]): an integer past 64 bits or a key given twice is
/// refused, never rounded or dropped.
pub fn parse_cli_value(text: &str) -> Result<Value, crate::json_strict::StrictJsonError> {
    match crate::json_strict::parse(text) {
        Ok(value) => Ok(value),
        Err(crate::json_strict::StrictJsonError::Syntax(_)) => Ok(Value::String(text.to_owned())),
        Err(refused) => Err(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_object_keys() {
        let value: Value = serde_json::from_str(r#"{"b": 1, "a": [true, null]}"#).unwrap();
        assert_eq!(canonical_json(&value), r#"{"a":[true,null],"b":1}"#);
    }

    #[test]
    fn normalized_values_read_back_from_their_canonical_text() {
        for text in
            ["1.0", "[1.5, {\"a\": -0.0}]", "1e21", "1e20", "0.1", "{\"n\": 7}", "\"s\"", "18446744073709551615"]
        {
            let value: Value = serde_json::from_str(text).unwrap();
            let canonical = canonical_json(&value);
            let held = normalized(value, &canonical);
            assert_eq!(held, serde_json::from_str::<Value>(&canonical).unwrap(), "{text}");
            assert_eq!(canonical_json(&held), canonical, "{text}");
        }
        assert_eq!(normalized(json!([1.0, 2]), "[1,2]"), json!([1, 2]));
    }

    #[test]
    fn rejects_value_over_size_limit() {
        let big = json!("x".repeat(VALUE_BYTES_MAX));
        let err = encode_value("blob", &big).unwrap_err();
        assert!(err.to_string().contains("blob"), "{err}");
        assert!(encode_value("ok", &json!("x".repeat(100))).is_ok());
    }

    #[test]
    fn cli_values_are_json_or_strings() {
        assert_eq!(parse_cli_value("8080").unwrap(), json!(8080));
        assert_eq!(parse_cli_value("true").unwrap(), json!(true));
        assert_eq!(parse_cli_value("eu-west").unwrap(), json!("eu-west"));
        assert_eq!(parse_cli_value(r#"{"a":1}"#).unwrap(), json!({"a": 1}));
        assert_eq!(parse_cli_value("95535577795.73523").unwrap().to_string(), "95535577795.73523");
        assert!(parse_cli_value("12345678901234567890123").is_err());
        assert!(parse_cli_value(r#"{"a":1,"a":2}"#).is_err());
    }
}
