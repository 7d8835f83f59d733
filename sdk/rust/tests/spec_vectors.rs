//! The SDK passes the golden vectors of `sdk/spec/`, as every SDK must: canonical JSON of each
//! input, and the content hash of each set of settings through `protocol::content_hash`.

use std::collections::BTreeMap;
use std::path::Path;

use konor_sdk::protocol::{canonical_json, content_hash};
use serde_json::Value;

fn vectors(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn canonical_json_vectors() {
    let file = vectors("canonical_json.json");
    for case in file["cases"].as_array().unwrap() {
        let value: Value = serde_json::from_str(case["input"].as_str().unwrap()).unwrap();
        assert_eq!(canonical_json(&value), case["canonical"].as_str().unwrap(), "{}", case["name"]);
    }
    for case in file["doubles"].as_array().unwrap() {
        let bits = u64::from_str_radix(case["bits"].as_str().unwrap(), 16).unwrap();
        let value = Value::from(f64::from_bits(bits));
        assert_eq!(canonical_json(&value), case["canonical"].as_str().unwrap(), "bits {bits:016x}");
    }
}

#[test]
fn content_hash_vectors() {
    let file = vectors("content_hash.json");
    for case in file["cases"].as_array().unwrap() {
        let settings: BTreeMap<String, Value> = case["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|pair| {
                (pair[0].as_str().unwrap().to_owned(), serde_json::from_str(pair[1].as_str().unwrap()).unwrap())
            })
            .collect();
        assert_eq!(content_hash(&settings), case["hash"].as_str().unwrap(), "{}", case["name"]);
    }
}
