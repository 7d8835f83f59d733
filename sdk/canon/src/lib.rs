//! konor-canon: the one implementation of canonical JSON and of the settings content hash,
//! shared by the core (`konor-crdt`) and the Rust SDK so that the two can never disagree.
//!
//! * [`canonical_json`]: RFC 8785 (JSON Canonicalization Scheme) with one stated deviation:
//!   integers held as 64-bit integers print exactly (see [`number`]).
//! * [`content_hash`]: SHA-256 over a domain prefix and the sorted canonical entries.
//!
//! The definitions are in docs/protocol.md ("Canonical JSON", "Content hash"); the golden
//! vectors in `sdk/spec/` pin them for every SDK.

pub mod hash;
pub mod json;
pub mod number;

pub use hash::{CONTENT_HASH_DOMAIN, content_hash, hex};
pub use json::{canonical_json, write_canonical_json, write_canonical_string};
pub use number::{write_canonical_number, write_es_double};
