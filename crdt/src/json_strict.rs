//! Values exactly as written (issue 12). JSON read from a person, a file or a client is read
//! strictly: every number means exactly what its digits say, and nothing is silently dropped.
//!
//! * **Floats** parse to the nearest double, always (serde_json's `float_roundtrip`, enabled for
//!   the workspace), and print back as the shortest text that parses to the same double, so
//!   `95535577795.73523` comes back as `95535577795.73523`.
//! * **Integers** must fit 64 bits (`-9223372036854775808` to `18446744073709551615`). A longer
//!   one is refused, never rounded to a double: `{ "id": 12345678901234567890123 }` would
//!   otherwise come back as `1.2345678901234568e22`. Write it as a string.
//! * **Duplicate keys** in an object are refused, as TOML refuses them (serde_json keeps the last
//!   and says nothing).

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Why a JSON text is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StrictJsonError {
    /// An integer literal that does not fit 64 bits.
    #[error("the integer {literal} does not fit in 64 bits; write it as a string (\"{literal}\") to keep every digit")]
    IntegerTooLarge {
        /// The literal as written.
        literal: String,
    },
    /// A key given twice in one object.
    #[error("{0}")]
    DuplicateKey(String),
    /// Not JSON.
    #[error("{0}")]
    Syntax(String),
}

/// Marks the visitor's duplicate-key error, which reaches us inside serde_json's error text.
const DUPLICATE_MARK: &str = "is given twice in one object";

/// Parses `text` as JSON, strictly (see the module).
pub fn parse(text: &str) -> Result<Value, StrictJsonError> {
    check_integers(text)?;
    serde_json::from_str::<Strict>(text).map(|strict| strict.0).map_err(|error| {
        let detail = error.to_string();
        if detail.contains(DUPLICATE_MARK) {
            StrictJsonError::DuplicateKey(detail)
        } else {
            StrictJsonError::Syntax(detail)
        }
    })
}

/// Refuses an integer literal outside the 64-bit range anywhere in `text` (outside strings). A
/// linear scan of the text: serde_json turns such a literal into a double before any visitor
/// can tell it from `1e22`.
pub fn check_integers(text: &str) -> Result<(), StrictJsonError> {
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut in_string = false;
    while at < bytes.len() {
        let byte = bytes[at];
        if in_string {
            match byte {
                b'\\' => at += 1,
                b'"' => in_string = false,
                _ => {}
            }
            at += 1;
            continue;
        }
        match byte {
            b'"' => {
                in_string = true;
                at += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = at;
                while at < bytes.len() && matches!(bytes[at], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                    at += 1;
                }
                let literal = &text[start..at];
                let integer = !literal.contains(['.', 'e', 'E']);
                if integer && literal.parse::<i64>().is_err() && literal.parse::<u64>().is_err() {
                    // Not a number at all ("--1") is left to the parser's own error.
                    let digits = literal.strip_prefix('-').unwrap_or(literal);
                    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(StrictJsonError::IntegerTooLarge { literal: literal.to_owned() });
                    }
                }
            }
            _ => at += 1,
        }
    }
    Ok(())
}

/// A JSON value whose objects may not repeat a key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Strict, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(value).map(Value::Number).ok_or_else(|| E::custom("a number JSON cannot hold"))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Strict::deserialize(deserializer).map(|strict| strict.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format!("the key {key:?} {DUPLICATE_MARK}")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_come_back_bit_for_bit() {
        for text in ["95535577795.73523", "0.1", "2.2250738585072014e-308", "1.7976931348623157e308", "-0.0", "5e-324"]
        {
            let value = parse(text).unwrap();
            let expected: f64 = text.parse().unwrap();
            assert_eq!(value.as_f64().unwrap().to_bits(), expected.to_bits(), "{text}");
            let printed = serde_json::to_string(&value).unwrap();
            let again: f64 = printed.parse().unwrap();
            assert_eq!(again.to_bits(), expected.to_bits(), "{text} printed as {printed}");
        }
        assert_eq!(serde_json::to_string(&parse("95535577795.73523").unwrap()).unwrap(), "95535577795.73523");
    }

    #[test]
    fn integers_must_fit_64_bits() {
        assert_eq!(parse("18446744073709551615").unwrap(), json!(u64::MAX));
        assert_eq!(parse("-9223372036854775808").unwrap(), json!(i64::MIN));
        for big in ["18446744073709551616", "-9223372036854775809", "12345678901234567890123"] {
            let error = parse(&format!(r#"{{"id": [1, {big}]}}"#)).unwrap_err();
            assert_eq!(error, StrictJsonError::IntegerTooLarge { literal: big.to_owned() });
            assert!(error.to_string().contains("write it as a string"), "{error}");
        }
        // Digits inside strings, and floats, are not integers.
        assert_eq!(parse(r#"{"id": "12345678901234567890123", "x": 1e22}"#).unwrap()["x"], json!(1e22));
        assert!(parse(r#"{"a\"12345678901234567890123": 1}"#).is_ok());
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        for text in [r#"{"a": 1, "a": 2}"#, r#"{"x": {"a": 1, "a": 2}}"#, r#"[{"a": 1, "b": 2, "a": 3}]"#] {
            let error = parse(text).unwrap_err();
            assert!(matches!(error, StrictJsonError::DuplicateKey(_)), "{text}: {error:?}");
            assert!(error.to_string().contains("\"a\" is given twice"), "{text}: {error}");
        }
        assert_eq!(parse(r#"{"a": {"a": 1}}"#).unwrap(), json!({"a": {"a": 1}}));
    }

    #[test]
    fn not_json_is_a_syntax_error() {
        for text in ["", "{", "--1", "[1,]", "01"] {
            assert!(matches!(parse(text), Err(StrictJsonError::Syntax(_))), "{text}");
        }
    }
}
