//! Canonical JSON text of a value, RFC 8785 (JCS): no whitespace; object members sorted by
//! their names as UTF-16 code units; strings with only the escapes JCS prescribes; numbers as in
//! [`crate::number`].

use std::cmp::Ordering;

use serde_json::Value;

use crate::number::write_canonical_number;

/// The canonical JSON text of `value`.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical_json(&mut out, value);
    out
}

/// Appends the canonical JSON text of `value` to `out`.
pub fn write_canonical_json(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(number) => write_canonical_number(out, number),
        Value::String(text) => write_canonical_string(out, text),
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical_json(out, item);
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_by(|a, b| utf16_order(a.0, b.0));
            out.push('{');
            for (index, (name, member)) in sorted.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical_string(out, name);
                out.push(':');
                write_canonical_json(out, member);
            }
            out.push('}');
        }
    }
}

/// JCS orders member names by their UTF-16 code units. That differs from UTF-8 byte (code
/// point) order only between U+E000..U+FFFF and characters past U+FFFF, whose surrogates
/// (U+D800..U+DFFF) sort before U+E000.
fn utf16_order(a: &str, b: &str) -> Ordering {
    a.encode_utf16().cmp(b.encode_utf16())
}

/// Appends `text` as a JSON string the way JCS (and ECMAScript's `JSON.stringify`) writes it:
/// `"` and `\` escaped, U+0008, U+0009, U+000A, U+000C and U+000D as `\b \t \n \f \r`, the other
/// controls below U+0020 as `\u00xx` with lowercase hex, everything else as itself.
pub fn write_canonical_string(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut start = 0;
    for (at, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            b'\t' => "\\t",
            b'\n' => "\\n",
            0x0c => "\\f",
            b'\r' => "\\r",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every escaped byte is ASCII, so `at` is a character boundary.
        out.push_str(&text[start..at]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = at + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_sort_by_utf16_code_units() {
        // U+10000 is D800 DC00 in UTF-16, so it sorts before U+E000; UTF-8 order says after.
        let value = json!({"\u{e000}": 1, "\u{10000}": 2, "b": 3, "a": {"z": [], "y": null}});
        assert_eq!(canonical_json(&value), "{\"a\":{\"y\":null,\"z\":[]},\"b\":3,\"\u{10000}\":2,\"\u{e000}\":1}");
    }

    #[test]
    fn strings_escape_only_what_jcs_escapes() {
        let value = json!("q\"b\\\u{8}\u{c}\n\r\t\u{0}\u{1f}\u{7f}é\u{2028}/");
        assert_eq!(canonical_json(&value), "\"q\\\"b\\\\\\b\\f\\n\\r\\t\\u0000\\u001f\u{7f}é\u{2028}/\"");
    }
}
