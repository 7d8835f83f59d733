//! A group's key -> value settings, with an order-independent content hash kept up to date on
//! every insert and remove.
//!
//! The content hash identifies a ConfigSet by what it contains. It is the sum, modulo 2^256,
//! of SHA-256(len(key) || key || canonical value) over all entries, so one insert or remove
//! updates it in O(1) (a write must not rehash a 10k-key group). It identifies content; it is
//! not a signature (authenticity comes from mTLS and the Automerge change hashes).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::value::canonical_json;

/// The content hash of a set of settings.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
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

    fn add(&mut self, other: &[u8; 32]) {
        let mut carry = 0u16;
        for index in (0..32).rev() {
            let sum = u16::from(self.0[index]) + u16::from(other[index]) + carry;
            self.0[index] = (sum & 0xff) as u8;
            carry = sum >> 8;
        }
    }

    fn sub(&mut self, other: &[u8; 32]) {
        let mut borrow = 0i16;
        for index in (0..32).rev() {
            let mut diff = i16::from(self.0[index]) - i16::from(other[index]) - borrow;
            borrow = 0;
            if diff < 0 {
                diff += 256;
                borrow = 1;
            }
            self.0[index] = diff as u8;
        }
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

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    out
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn entry_hash(key: &str, canonical_value: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update((key.len() as u64).to_le_bytes());
    hasher.update(key.as_bytes());
    hasher.update(canonical_value.as_bytes());
    hasher.finalize().into()
}

/// One stored setting: the parsed value and its canonical text (kept so hashing, sizing and
/// comparing never re-serialize).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The value.
    pub value: Value,
    /// Its canonical JSON text.
    pub canonical: String,
}

/// Key -> value settings with a running content hash and byte count.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    entries: BTreeMap<String, Entry>,
    hash: ContentHash,
    bytes: usize,
}

impl PartialEq for Settings {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.entries == other.entries
    }
}

impl Settings {
    /// Empty settings.
    pub fn new() -> Settings {
        Settings::default()
    }

    /// Builds settings from canonical `(key, canonical JSON)` pairs that are already known valid.
    pub(crate) fn insert_canonical(&mut self, key: String, value: Value, canonical: String) {
        self.remove(&key);
        self.hash.add(&entry_hash(&key, &canonical));
        self.bytes += key.len() + canonical.len();
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
        self.hash.sub(&entry_hash(key, &old.canonical));
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

    /// The content hash.
    pub fn content_hash(&self) -> ContentHash {
        self.hash
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
    /// and removing each `(key, None)`, without changing anything. Keys must be distinct.
    pub fn hash_after<'a>(&self, edits: impl Iterator<Item = (&'a str, Option<&'a str>)>) -> ContentHash {
        let mut hash = self.hash;
        for (key, canonical) in edits {
            if let Some(old) = self.entries.get(key) {
                hash.sub(&entry_hash(key, &old.canonical));
            }
            if let Some(canonical) = canonical {
                hash.add(&entry_hash(key, canonical));
            }
        }
        hash
    }

    /// Recomputes the hash from scratch; used by assertions and tests to check the running hash.
    pub fn recomputed_hash(&self) -> ContentHash {
        let mut hash = ContentHash::default();
        for (key, entry) in &self.entries {
            hash.add(&entry_hash(key, &entry.canonical));
        }
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_is_order_independent_and_incremental() {
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
        assert_eq!(a.content_hash(), a.recomputed_hash());
        b.insert("x".into(), json!(2));
        assert_ne!(a.content_hash(), b.content_hash());
        assert_eq!(b.content_hash(), b.recomputed_hash());
        b.insert("x".into(), json!(1));
        assert_eq!(a.content_hash(), b.content_hash());
    }

    #[test]
    fn empty_settings_hash_to_zero_and_bytes_track_entries() {
        let mut s = Settings::new();
        assert_eq!(s.content_hash(), ContentHash::default());
        s.insert("key".into(), json!([1, 2]));
        assert_eq!(s.bytes(), 3 + 5);
        s.remove("key");
        assert_eq!(s.bytes(), 0);
        assert_eq!(s.content_hash(), ContentHash::default());
    }

    #[test]
    fn hex_round_trips() {
        let hash = ContentHash([7; 32]);
        assert_eq!(ContentHash::from_hex(&hash.to_hex()), Some(hash));
        assert_eq!(ContentHash::from_hex("zz"), None);
    }
}
