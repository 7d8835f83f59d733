//! Document format 3 (each setting a register of its own) reading and converting documents of
//! format 2 (settings as plain strings in one map): the upgrade path of issue 14.

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ReadDoc, Value as AmValue};
use konor_crdt::{GroupDoc, Mode, Settings, VersionId};
use serde_json::json;

use crate::support::{actor, deliver, meta, replicas, state, stored_format};

/// Writes `entries` the way a format-2 konord did (strings straight into `settings`, and
/// `ROOT.format = 2`), as version `counter` of `writer`, on top of `doc`.
fn legacy_write(doc: &mut GroupDoc, writer: u8, counter: u64, entries: &[(&str, serde_json::Value)]) {
    let mut raw = Automerge::load(&doc.save()).unwrap().with_actor(actor(writer));
    let settings = match raw.get(automerge::ROOT, "settings").unwrap() {
        Some((AmValue::Object(ObjType::Map), id)) => id,
        other => panic!("{other:?}"),
    };
    let versions = match raw.get(automerge::ROOT, "versions").unwrap() {
        Some((AmValue::Object(ObjType::Map), id)) => id,
        other => panic!("{other:?}"),
    };
    let mut after = Settings::new();
    for (key, value) in doc.settings().iter() {
        after.insert(key.to_owned(), value.clone());
    }
    let id = VersionId::new(counter, &actor(writer));
    let parents: Vec<String> = doc.head_versions().iter().map(|v| v.id.storage_key()).collect();
    let mut tx = raw.transaction();
    tx.put(automerge::ROOT, "format", 2u64).unwrap();
    for (key, value) in entries {
        tx.put(&settings, *key, serde_json::to_string(value).unwrap()).unwrap();
        after.insert((*key).to_owned(), value.clone());
    }
    let keys: Vec<&str> = entries.iter().map(|(k, _)| *k).collect();
    let info = json!({
        "id": id.storage_key(), "author": "old konord", "time": 1_700_000_000_000u64 + counter,
        "message": "written by format 2", "kind": "set", "keys": keys,
        "content_hash": after.content_hash().to_hex(), "hash_scheme": 2, "parents": parents,
    });
    tx.put(&versions, id.storage_key(), info.to_string()).unwrap();
    tx.commit_with(automerge::transaction::CommitOptions::default().with_message(id.storage_key()).with_time(1));
    let change = raw.get_last_local_change().unwrap().raw_bytes().to_vec();
    doc.apply_changes(&[change]).unwrap();
}

#[test]
fn a_format_2_document_loads_serves_and_converts_key_by_key() {
    let mut docs = replicas(2, Mode::Eventual);
    legacy_write(&mut docs[0], 9, 2, &[("db.port", json!(5432)), ("db.host", json!("old"))]);
    assert_eq!(stored_format(&docs[0]), 2);
    // A format-3 node loads the format-2 file and serves it as it was.
    let mut loaded = GroupDoc::load(&docs[0].save(), actor(3)).unwrap();
    assert_eq!(loaded.format(), 2);
    assert_eq!(loaded.get("db.port"), Some(&json!(5432)));
    assert_eq!(loaded.get("db.host"), Some(&json!("old")));
    let v2 = loaded.resolve("v2").unwrap().id.clone();

    // The first write converts: the key gets a register, the document says format 3.
    loaded.set(vec![("db.port".into(), json!(6000))], &meta(3)).unwrap();
    assert_eq!((loaded.format(), stored_format(&loaded)), (3, 3));
    assert_eq!(loaded.get("db.port"), Some(&json!(6000)));
    assert_eq!(loaded.get("db.host"), Some(&json!("old")), "an unwritten key stays as it was");
    assert!(loaded.conflicts().is_empty(), "the register supersedes the format-2 value");
    // History across the conversion: the old version reads as it was written.
    assert_eq!(loaded.settings_at(&v2).unwrap().get("db.port"), Some(&json!(5432)));
    // A format-2 key can be deleted, and set again (now as a register).
    loaded.delete(vec!["db.host".into()], &meta(4)).unwrap();
    assert_eq!(loaded.get("db.host"), None);
    loaded.set(vec![("db.host".into(), json!("new"))], &meta(5)).unwrap();
    loaded.rollback("v2", &meta(6)).unwrap();
    assert_eq!(loaded.settings().to_json(), json!({"db.port": 5432, "db.host": "old"}));
    assert!(loaded.derived_state_matches_document());

    // A replica still on the format-2 document takes the converted changes and agrees.
    let mut docs = vec![loaded, GroupDoc::load(&docs[0].save(), actor(4)).unwrap()];
    deliver(&mut docs, 0, 1);
    assert_eq!(docs[1].format(), 3);
    assert_eq!(state(&docs[0]), state(&docs[1]));
    assert!(docs[1].derived_state_matches_document());
}

/// A format-2 write made concurrently with a key's first register (possible only across an
/// upgrade) loses to the register on every node, whatever the order of delivery.
#[test]
fn a_format_2_value_concurrent_with_the_first_register_loses_everywhere() {
    let mut docs = replicas(3, Mode::Eventual);
    legacy_write(&mut docs[0], 9, 2, &[("k", json!("old"))]);
    for to in [1, 2] {
        deliver(&mut docs, 0, to);
    }
    // docs[0] plays the old node, docs[1] the upgraded one; they have not met since.
    legacy_write(&mut docs[0], 9, 3, &[("k", json!("from the old node"))]);
    docs[1].set(vec![("k".into(), json!("from the new node"))], &meta(3)).unwrap();
    deliver(&mut docs, 0, 2);
    deliver(&mut docs, 1, 2);
    deliver(&mut docs, 1, 0);
    deliver(&mut docs, 0, 1);
    for doc in &docs {
        assert_eq!(doc.get("k"), Some(&json!("from the new node")));
        assert!(doc.conflicts().is_empty(), "{:?}", doc.conflicts());
        assert!(doc.derived_state_matches_document());
    }
    assert_eq!(state(&docs[0]), state(&docs[1]));
    assert_eq!(state(&docs[1]), state(&docs[2]));
}

/// Two nodes that write a key for the first time concurrently each make a register; both
/// count, every node serves the same winner, and the next write that sees both settles it.
/// Automerge reports no patch for a change inside the register that is not the winner at the
/// key, so this also checks that such a change still reaches the read view.
#[test]
fn registers_made_concurrently_both_count_and_a_later_write_settles_them() {
    let mut docs = replicas(3, Mode::Eventual);
    docs[0].set(vec![("k".into(), json!(1))], &meta(1)).unwrap();
    docs[1].set(vec![("k".into(), json!(2))], &meta(2)).unwrap();
    deliver(&mut docs, 0, 2);
    deliver(&mut docs, 1, 0);
    deliver(&mut docs, 0, 1);
    assert_eq!(docs[0].get("k"), docs[1].get("k"));
    assert_eq!(docs[0].conflicts().len(), 1);
    // docs[2] has seen only docs[0]'s register, and writes into it.
    docs[2].set(vec![("k".into(), json!(3))], &meta(3)).unwrap();
    for to in [0, 1] {
        deliver(&mut docs, 2, to);
    }
    deliver(&mut docs, 1, 2);
    for doc in &docs {
        // Version 3 (docs[2]'s) outranks version 2; docs[1]'s value, unseen by it, stays a loser.
        assert_eq!(doc.get("k"), Some(&json!(3)));
        let conflicts = doc.conflicts();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].losers.iter().map(|l| l.value.clone()).collect::<Vec<_>>(), vec![json!(2)]);
        assert!(doc.derived_state_matches_document());
    }
    docs[1].set(vec![("k".into(), json!(4))], &meta(4)).unwrap();
    docs[0].delete(vec!["other.key.absent".into()], &meta(5)).unwrap_err();
    for to in [0, 2] {
        deliver(&mut docs, 1, to);
    }
    for doc in &docs {
        assert_eq!(doc.get("k"), Some(&json!(4)));
        assert!(doc.conflicts().is_empty());
        assert!(doc.derived_state_matches_document());
    }
    docs[0].delete(vec!["k".into()], &meta(6)).unwrap();
    for to in [1, 2] {
        deliver(&mut docs, 0, to);
    }
    assert!(docs.iter().all(|d| d.get("k").is_none() && d.derived_state_matches_document()));
}
