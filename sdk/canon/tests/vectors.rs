//! The golden vectors of `sdk/spec/` (generated independently, by Node.js and Python): every
//! case must pass. Every SDK runs the same files.

use std::path::Path;

use konor_canon::{canonical_json, content_hash, hex};
use serde_json::Value;

fn vectors(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text<'a>(case: &'a Value, field: &str) -> &'a str {
    case[field].as_str().unwrap_or_else(|| panic!("{field} missing in {case}"))
}

#[test]
fn canonical_json_vectors() {
    let file = vectors("canonical_json.json");
    let cases = file["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let value: Value = serde_json::from_str(text(case, "input")).unwrap();
        let expected = text(case, "canonical");
        let got = canonical_json(&value);
        if got != expected {
            failures.push(format!("{}:\n  want {expected}\n  got  {got}", text(case, "name")));
        }
        // Canonical text is a fixed point.
        let again = canonical_json(&serde_json::from_str(expected).unwrap());
        if again != expected {
            failures
                .push(format!("{} (canonical text re-read):\n  want {expected}\n  got  {again}", text(case, "name")));
        }
    }
    let doubles = file["doubles"].as_array().unwrap();
    assert!(doubles.len() >= 400, "{} doubles", doubles.len());
    for case in doubles {
        let bits = u64::from_str_radix(text(case, "bits"), 16).unwrap();
        let number = serde_json::Number::from_f64(f64::from_bits(bits)).unwrap();
        let got = canonical_json(&Value::Number(number));
        if got != text(case, "canonical") {
            failures.push(format!("double {bits:016x}: want {} got {got}", text(case, "canonical")));
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn content_hash_vectors() {
    let file = vectors("content_hash.json");
    assert_eq!(text(&file, "domain").as_bytes(), konor_canon::CONTENT_HASH_DOMAIN);
    let cases = file["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "{} cases", cases.len());
    for case in cases {
        let entries: Vec<(&str, &str)> = case["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| (pair[0].as_str().unwrap(), pair[1].as_str().unwrap()))
            .collect();
        for (key, canonical) in &entries {
            let reread = canonical_json(&serde_json::from_str(canonical).unwrap());
            assert_eq!(&reread, canonical, "{}: the value of {key} is canonical", text(case, "name"));
        }
        assert_eq!(hex(&content_hash(entries.iter().copied())), text(case, "hash"), "{}", text(case, "name"));
    }
}
