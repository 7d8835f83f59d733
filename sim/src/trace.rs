//! The run's trace: an ordered log of delivered messages, write outcomes, faults and invariant
//! events, folded into one SHA-256 hash. Two runs of one configuration must print the same hash
//! (SPEC F26: the same seed gives the same run, byte for byte).

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// A fast 64-bit hash of message bytes. Messages run to gigabytes per run at scale, so their
/// contents are folded with a multiply-xorshift over 8-byte words; only the small trace entries
/// go through SHA-256. It detects any difference in practice; it resists no adversary.
pub fn bytes_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut value = [0u8; 8];
        value.copy_from_slice(word);
        hash = (hash ^ u64::from_le_bytes(value)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        hash ^= hash >> 29;
    }
    for &byte in words.remainder() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    crate::rng::mix64(hash)
}

/// The trace hasher, with an optional human-readable copy.
pub struct Trace {
    hasher: Sha256,
    entries: u64,
    copy: Option<std::io::BufWriter<std::fs::File>>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace").field("entries", &self.entries).finish_non_exhaustive()
    }
}

impl Trace {
    /// A trace; with `copy`, every entry is also written there as one line.
    pub fn new(copy: Option<&Path>) -> anyhow::Result<Trace> {
        let copy = match copy {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .map_err(|e| anyhow::anyhow!("cannot create the trace file {}: {e}", path.display()))?,
            )),
            None => None,
        };
        Ok(Trace { hasher: Sha256::new(), entries: 0, copy })
    }

    /// A delivered frame: when, who to whom, on which channel, and what.
    pub fn delivery(&mut self, at_us: u64, from: usize, to: usize, channel: u8, bytes: &[u8], note: Option<String>) {
        let digest = bytes_hash(bytes);
        self.hasher.update(b"D");
        self.hasher.update(at_us.to_le_bytes());
        self.hasher.update((from as u64).to_le_bytes());
        self.hasher.update((to as u64).to_le_bytes());
        self.hasher.update([channel]);
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(digest.to_le_bytes());
        self.entries += 1;
        if let Some(copy) = &mut self.copy {
            let note = note.map(|n| format!(" {n}")).unwrap_or_default();
            let _ = writeln!(copy, "{at_us} deliver {from}->{to} ch{channel} {}B {digest:016x}{note}", bytes.len());
        }
    }

    /// Any other event (a write's outcome, a fault, an invariant result), as text.
    pub fn event(&mut self, at_us: u64, text: &str) {
        self.hasher.update(b"E");
        self.hasher.update(at_us.to_le_bytes());
        self.hasher.update((text.len() as u64).to_le_bytes());
        self.hasher.update(text.as_bytes());
        self.entries += 1;
        if let Some(copy) = &mut self.copy {
            let _ = writeln!(copy, "{at_us} {text}");
        }
    }

    /// True when a text copy is written (callers then add notes to deliveries).
    pub fn has_copy(&self) -> bool {
        self.copy.is_some()
    }

    /// Number of entries so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The hash of everything so far, as 16 hex digits.
    pub fn hash_hex(&self) -> String {
        let digest = self.hasher.clone().finalize();
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Flushes the text copy.
    pub fn flush(&mut self) {
        if let Some(copy) = &mut self.copy {
            let _ = copy.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_entries_hash_equal_and_any_byte_changes_the_hash() {
        let mut a = Trace::new(None).unwrap();
        let mut b = Trace::new(None).unwrap();
        a.delivery(10, 1, 2, 1, b"hello world!", None);
        b.delivery(10, 1, 2, 1, b"hello world!", Some("note".to_owned()));
        assert_eq!(a.hash_hex(), b.hash_hex());
        b.event(11, "x");
        assert_ne!(a.hash_hex(), b.hash_hex());
        assert_ne!(bytes_hash(b"hello world!"), bytes_hash(b"hello world?"));
        assert_ne!(bytes_hash(b""), bytes_hash(b"\0"));
    }
}
