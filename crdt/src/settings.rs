//! A group's key -> value settings, with their content hash.
//!
//! The content hash identifies a ConfigSet by what it contains: SHA-256 over a domain prefix
//! and every `(key, canonical value)` in key order, defined in docs/protocol.md and computed by
//! [`konor_canon::content_hash`], the one implementation the SDK shares. It is computed when
//! first asked for after a change and kept until the next change, so a burst of remote changes
//! hashes once. It identifies content; it is not a signature (authenticity comes from mTLS and
//! the Automerge change hashes).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use serde_json::Value;

pub(crate) use konor_canon::hex;

use crate::value::{canonical_json, normalized};

/// The content hash of a set of settings.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The content hash of `(key, canonical JSON)` entries (any order, each key once).
    pub fn of<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> ContentHash {
        ContentHash(konor_canon::content_hash(entries))
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses the full hex form.
    pub fn from_hex(text: &str) -> Option<ContentHash> {
        let bytes = unhex(text)?;
        Some(ContentHash(bytes.try_into().ok()?))
    }

    /// The first 12 hex digits, for people.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_owned()
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentHash({})", self.short())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// Lowercase hex of `bytes`.
pub fn hex_of(bytes: &[u8]) -> String {
    hex(bytes)
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// One stored setting: the parsed value and its canonical text (kept so hashing, sizing and
/// comparing never re-serialize).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The value, as every node reads it back from `canonical` (a double written `1.0` is the
    /// integer `1`).
    pub value: Value,
    /// Its canonical JSON text.
    pub canonical: String,
}

/// Key -> value settings with a byte count and their content hash, computed on demand.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    entries: BTreeMap<String, Entry>,
    /// The content hash of `entries`; empty after a change until asked for.
    hash: OnceLock<ContentHash>,
    bytes: usize,
}

impl PartialEq for Settings {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Settings {
    /// Empty settings.
    pub fn new() -> Settings {
        Settings::default()
    }

    /// Inserts `key` with `value` whose canonical text is `canonical` (already computed and
    /// size-checked). The value stored is the one `canonical` reads back as.
    pub(crate) fn insert_canonical(&mut self, key: String, value: Value, canonical: String) {
        self.remove(&key);
        self.hash = OnceLock::new();
        self.bytes += key.len() + canonical.len();
        let value = normalized(value, &canonical);
        self.entries.insert(key, Entry { value, canonical });
    }

    /// Inserts or replaces `key`.
    pub fn insert(&mut self, key: String, value: Value) {
        let canonical = canonical_json(&value);
        self.insert_canonical(key, value, canonical);
    }

    /// Removes `key`, returning its entry.
    pub fn remove(&mut self, key: &str) -> Option<Entry> {
        let old = self.entries.remove(key)?;
        self.hash = OnceLock::new();
        self.bytes -= key.len() + old.canonical.len();
        Some(old)
    }

    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key).map(|entry| &entry.value)
    }

    /// The entry of `key`, with its canonical text.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total bytes of keys and canonical values.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The content hash: O(1) when nothing changed since it was last asked for, otherwise one
    /// pass over the entries.
    pub fn content_hash(&self) -> ContentHash {
        *self.hash.get_or_init(|| self.recomputed_hash())
    }

    /// Records `hash` as the content hash of the current entries, when the caller has just
    /// computed it ([`Settings::hash_after`] for the edit it then applied). Debug builds check it.
    pub(crate) fn set_known_hash(&mut self, hash: ContentHash) {
        debug_assert_eq!(hash, self.recomputed_hash(), "the known hash is the hash of the entries");
        self.hash = OnceLock::from(hash);
    }

    /// Keys and values in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, e)| (k.as_str(), &e.value))
    }

    /// Keys, values and canonical text in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, e)| (k.as_str(), e))
    }

    /// The settings as a flat JSON object `{ "db.pool": 10, ... }`.
    pub fn to_json(&self) -> Value {
        Value::Object(self.iter().map(|(k, v)| (k.to_owned(), v.clone())).collect())
    }

    /// The content hash the settings would have after replacing each `(key, Some(canonical))`
    /// and removing each `(key, None)`, without changing anything. Keys must be distinct (a key
    /// given twice counts once, its last edit). One pass over the entries and the edits.
    pub fn hash_after<'a>(&self, edits: impl Iterator<Item = (&'a str, Option<&'a str>)>) -> ContentHash {
        let edits: BTreeMap<&str, Option<&str>> = edits.collect();
        let mut edits = edits.into_iter().peekable();
        let mut entries = self.entries.iter().peekable();
        // Both in key order: merge them, an edit replacing the entry of its key.
        let merged = std::iter::from_fn(|| {
            loop {
                let order = match (entries.peek(), edits.peek()) {
                    (Some((key, _)), Some((edited, _))) => (*edited).cmp(key.as_str()),
                    (Some(_), None) => Ordering::Greater,
                    (None, Some(_)) => Ordering::Less,
                    (None, None) => return None,
                };
                if order == Ordering::Equal {
                    // The edit replaces (or removes) this entry.
                    entries.next();
                }
                if order == Ordering::Greater {
                    return entries.next().map(|(key, entry)| (key.as_str(), entry.canonical.as_str()));
                }
                if let Some((key, Some(canonical))) = edits.next() {
                    return Some((key, canonical));
                }
            }
        });
        ContentHash::of(merged)
    }

    /// Computes the hash from the entries, ignoring what is kept; assertions and tests use it.
    pub fn recomputed_hash(&self) -> ContentHash {
        ContentHash::of(self.entries.iter().map(|(key, entry)| (key.as_str(), entry.canonical.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_is_independent_of_insertion_order_and_follows_every_change() {
        let mut a = Settings::new();
        a.insert("x".into(), json!(1));
        a.insert("y".into(), json!("two"));
        let mut b = Settings::new();
        b.insert("y".into(), json!("two"));
        b.insert("z".into(), json!(3));
        b.insert("x".into(), json!(1));
        assert_ne!(a.content_hash(), b.content_hash());
        b.remove("z");
        assert_eq!(a.content_hash(), b.content_hash());
        b.insert("x".into(), json!(2));
        assert_ne!(a.content_hash(), b.content_hash(), "a changed value");
        assert_eq!(b.content_hash(), b.recomputed_hash());
        b.insert("x".into(), json!(1));
        assert_eq!(a.content_hash(), b.content_hash());
        // The entry x = 1 moved to key w.
        b.remove("x");
        b.insert("w".into(), json!(1));
        assert_ne!(a.content_hash(), b.content_hash(), "a moved entry");
    }

    #[test]
    fn bytes_moved_between_key_and_value_change_the_hash() {
        let mut a = Settings::new();
        a.insert("ab".into(), json!("c"));
        let mut b = Settings::new();
        b.insert("a".into(), json!("bc"));
        assert_ne!(a.content_hash(), b.content_hash());
        let mut c = Settings::new();
        c.insert("a1".into(), json!(23));
        let mut d = Settings::new();
        d.insert("a".into(), json!(123));
        assert_ne!(c.content_hash(), d.content_hash());
    }

    #[test]
    fn hash_after_equals_the_hash_of_the_edited_settings() {
        let mut settings = Settings::new();
        for (key, value) in [("a", json!(1)), ("c", json!([2])), ("e", json!({"k": 3})), ("g", json!(null))] {
            settings.insert(key.into(), value);
        }
        let edits = [("c", None), ("b", Some("\"new\"")), ("g", Some("4")), ("h", Some("5")), ("0", Some("6"))];
        let predicted = settings.hash_after(edits.iter().map(|(key, canonical)| (*key, *canonical)));
        let before = settings.content_hash();
        for (key, canonical) in edits {
            match canonical {
                Some(text) => settings.insert(key.into(), serde_json::from_str(text).unwrap()),
                None => drop(settings.remove(key)),
            }
        }
        assert_ne!(before, predicted);
        assert_eq!(settings.content_hash(), predicted);
        assert_eq!(settings.hash_after(std::iter::empty()), predicted);
    }

    proptest::proptest! {
        #[test]
        fn hash_after_predicts_any_edit(
            start in proptest::collection::btree_map("[a-e]{1,2}", 0u8..4, 0..8),
            edits in proptest::collection::btree_map("[a-e]{1,2}", proptest::option::of(0u8..4), 0..6),
        ) {
            let mut settings = Settings::new();
            for (key, value) in &start {
                settings.insert(key.clone(), json!(value));
            }
            let texts: Vec<(String, Option<String>)> =
                edits.iter().map(|(key, value)| (key.clone(), value.map(|v| v.to_string()))).collect();
            let predicted = settings.hash_after(texts.iter().map(|(key, text)| (key.as_str(), text.as_deref())));
            for (key, value) in edits {
                match value {
                    Some(value) => settings.insert(key, json!(value)),
                    None => drop(settings.remove(&key)),
                }
            }
            proptest::prop_assert_eq!(predicted, settings.content_hash());
        }
    }

    #[test]
    fn empty_settings_hash_the_domain_and_bytes_track_entries() {
        let mut s = Settings::new();
        let empty = ContentHash::of([]);
        assert_eq!(s.content_hash(), empty);
        assert_ne!(empty, ContentHash::default());
        s.insert("key".into(), json!([1, 2]));
        assert_eq!(s.bytes(), 3 + 5);
        assert_ne!(s.content_hash(), empty);
        s.remove("key");
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.content_hash(), empty);
    }

    #[test]
    fn values_are_held_as_their_canonical_text_reads_back() {
        let mut s = Settings::new();
        s.insert("f".into(), json!(1.0));
        s.insert("z".into(), json!(-0.0));
        s.insert("x".into(), json!(0.5));
        assert_eq!(s.get("f"), Some(&json!(1)));
        assert_eq!(s.get("z"), Some(&json!(0)));
        assert_eq!(s.get("x"), Some(&json!(0.5)));
        assert_eq!(s.entry("f").unwrap().canonical, "1");
    }

    #[test]
    fn hex_round_trips() {
        let hash = ContentHash([7; 32]);
        assert_eq!(ContentHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(ContentHash::from_hex("zz"), None);
    }
}
