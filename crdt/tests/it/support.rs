//! Shared builders for the integration tests.

use konor_crdt::{ActorId, CommitMeta, GroupDoc, Millis, Mode};

/// A distinct actor per replica number.
pub fn actor(n: u8) -> ActorId {
    ActorId::from([n; 16])
}

/// Commit metadata with a time derived from `n`.
pub fn meta(n: u64) -> CommitMeta {
    CommitMeta::new("tester", format!("change {n}"), Millis(1_700_000_000_000 + n))
}

/// `count` replicas of one new group: replica 0 created it, the others loaded its genesis.
pub fn replicas(count: u8, mode: Mode) -> Vec<GroupDoc> {
    let (first, _) = GroupDoc::create("app", mode, actor(1), &meta(0)).unwrap();
    let genesis = first.save();
    let mut all = vec![first];
    for n in 2..=count {
        all.push(GroupDoc::load(&genesis, actor(n)).unwrap());
    }
    all
}

/// Sends everything `from` has that `to` lacks, as raw changes.
pub fn deliver(docs: &mut [GroupDoc], from: usize, to: usize) {
    let changes = docs[from].changes_since(&docs[to].heads());
    docs[to].apply_changes(&changes).unwrap();
}

/// Delivers in both directions between every pair until nothing moves.
pub fn exchange_all(docs: &mut [GroupDoc]) {
    for from in 0..docs.len() {
        for to in 0..docs.len() {
            if from != to {
                deliver(docs, from, to);
            }
        }
    }
}

/// A fingerprint of what a replica serves and knows, for equality checks.
pub fn state(doc: &GroupDoc) -> (Vec<konor_crdt::ChangeHash>, serde_json::Value, Vec<String>, String) {
    let mut heads = doc.heads();
    heads.sort();
    let history: Vec<String> = doc.history().map(|v| v.id.storage_key()).collect();
    let conflicts = serde_json::to_string(&doc.conflicts()).unwrap();
    (heads, doc.settings().to_json(), history, conflicts)
}

/// `ROOT.format` as stored in the document's bytes.
pub fn stored_format(doc: &GroupDoc) -> u64 {
    let raw = automerge::Automerge::load(&doc.save()).unwrap();
    match automerge::ReadDoc::get(&raw, automerge::ROOT, "format").unwrap() {
        Some((automerge::Value::Scalar(s), _)) => s.as_u64().unwrap(),
        other => panic!("{other:?}"),
    }
}
