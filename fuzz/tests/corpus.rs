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
