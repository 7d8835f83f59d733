//! CI's smoke of the fuzz targets: every committed corpus file (`fuzz/corpus/<target>/`) runs
//! through its target. The corpora hold the inputs the coverage-guided runs kept (minimized), so
//! this replays the paths they reached; a crash a fuzz run finds is added here as a file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[test]
fn every_corpus_file_runs_through_its_target_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut ran = 0;
    for target in konor_fuzz::TARGETS {
        let dir = root.join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()));
        let mut files = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            assert!(konor_fuzz::run(target, &data));
            files += 1;
        }
        assert!(files > 0, "the corpus of {target} is empty");
        ran += files;
    }
    assert!(ran >= konor_fuzz::TARGETS.len());
}

/// Mutations of each corpus file per target in CI; `KONOR_FUZZ_MUTATIONS=N` runs more by hand.
const MUTATIONS_PER_TARGET_DEFAULT: usize = 3_000;

/// A smoke beyond the replay: seeded mutations of every corpus file (bit flips, boundary bytes,
/// LEB128-sized runs, truncations, repeats, splices between files) through each target. Not
/// coverage-guided (that is `fuzz/run-all.sh`), but it reaches the neighbours of every path the
/// corpora hold in seconds, on stable Rust, in CI.
#[test]
fn seeded_mutations_of_the_corpora_run_without_a_panic() {
    let per_target: usize =
        std::env::var("KONOR_FUZZ_MUTATIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(MUTATIONS_PER_TARGET_DEFAULT);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for target in konor_fuzz::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                (path, data)
            })
            .collect();
        files.sort();
        let started = std::time::Instant::now();
        for round in 0..per_target {
            let (path, base) = &files[round % files.len()];
            let other = &files[rng.below(files.len())].1;
            let data = mutate(&mut rng, base, other);
            let ran = std::panic::catch_unwind(|| konor_fuzz::run(target, &data));
            assert!(
                matches!(ran, Ok(true)),
                "{target}: a mutation of {} failed; input (hex): {}",
                path.display(),
                data.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
        }
        eprintln!("{target}: {per_target} mutations in {:?}", started.elapsed());
    }
}

/// One seeded mutation of `base` (with `other` for splices).
fn mutate(rng: &mut XorShift, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = base.to_vec();
    for _ in 0..=rng.below(4) {
        let at = if data.is_empty() { 0 } else { rng.below(data.len()) };
        match rng.below(7) {
            0 if !data.is_empty() => data[at] ^= 1 << rng.below(8),
            1 if !data.is_empty() => data[at] = [0x00, 0x01, 0x7f, 0x80, 0xff][rng.below(5)],
            // A large LEB128 number: a length or a run count far past the bytes.
            2 => {
                let big = [0xff, 0xff, 0xff, 0xff, 0x0f];
                data.splice(at..at, big);
            }
            3 => data.truncate(at),
            4 if !data.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(data.len());
                let piece = data[at..end].to_vec();
                data.splice(at..at, piece);
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                data.splice(at..at, other[from..end].iter().copied());
            }
            _ => data.insert(at, rng.below(256) as u8),
        }
    }
    data
}

/// A tiny seeded generator: the smoke repeats exactly.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound.max(1) as u64) as usize
    }
}

#[test]
fn unknown_targets_are_refused() {
    assert!(!konor_fuzz::run("nope", b""));
}

/// Writes the structured seeds of the corpora (`cargo test -p konor-fuzz -- --ignored
/// write_seeds`): real encodings a fuzzer would take long to find.
#[test]
#[ignore = "writes files: run by hand when the encodings change"]
fn write_seeds() {
    use chitchat::ChitchatId;
    use konor_node::peer::gossip_seal::{SimSeal, seal_value};
    use konor_node::peer::gossip_wire::{DigestEntry, KeyValue, Message, NodeDelta, encode};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let n2 = ChitchatId::new("n2".to_owned(), 3, std::net::SocketAddr::from(([10, 0, 0, 2], 7400)));
    let seal = SimSeal::new("n2");
    let kv = |key: &str, version: u64, value: &str| KeyValue {
        key: key.to_owned(),
        value: seal_value(&seal, "c", &n2, key, version, value),
        version,
        status: 0,
    };
    let digest = vec![DigestEntry { id: n2.clone(), heartbeat: 40, last_gc_version: 0, max_version: 3 }];
    let delta = vec![NodeDelta {
        id: n2.clone(),
        last_gc_version: 0,
        from_version_excluded: 0,
        key_values: vec![kv("cert", 1, "sim:n2"), kv("leaving", 2, "0"), kv("beat", 3, "40")],
        set_max_version: None,
    }];
    let messages = [
        ("syn", Message::Syn { digest: digest.clone(), cluster_id: "c".into() }),
        ("synack", Message::SynAck { digest, delta: delta.clone() }),
        ("ack", Message::Ack { delta }),
    ];
    for (name, message) in messages {
        std::fs::write(root.join("gossip").join(format!("seed-{name}")), encode(&message)).unwrap();
    }
    let peer = [
        konor_crdt::PeerMessage::Changes { group: "app".into(), changes: vec![vec![1, 2, 3]] },
        konor_crdt::PeerMessage::Sync { group: "app".into(), message: vec![0x42, 0, 1] },
    ];
    for (i, message) in peer.iter().enumerate() {
        std::fs::write(root.join("peer_message").join(format!("seed-{i}")), message.encode()).unwrap();
    }
}
