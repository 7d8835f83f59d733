//! Local writes: set, delete, apply, rollback, history and diff, and refusals that change nothing.

use automerge::ReadDoc;
use automerge::transaction::Transactable;
use expect_test::expect;
use konor_crdt::{CommitMeta, EditError, FileFormat, GroupDoc, Millis, Mode, VersionKind};
use serde_json::json;

use crate::support::{actor, meta, replicas};

fn group() -> GroupDoc {
    replicas(1, Mode::Eventual).remove(0)
}

#[test]
fn every_write_creates_the_next_version_with_its_metadata() {
    let mut g = group();
    assert_eq!(g.version_count(), 1);
    assert_eq!(g.latest_version().unwrap().kind, VersionKind::Create);
    let commit = g.set(vec![("db.pool".into(), json!(10)), ("name".into(), json!("eu"))], &meta(1)).unwrap();
    assert_eq!(commit.version.id.counter, 2);
    assert_eq!(g.label(&commit.version.id), "v2");
    assert_eq!(commit.version.author, "tester");
    assert_eq!(commit.version.message, "change 1");
    assert_eq!(commit.version.time, Millis(1_700_000_000_001));
    assert_eq!(commit.version.kind, VersionKind::Set { keys: vec!["db.pool".into(), "name".into()] });
    assert_eq!(commit.version.content_hash().unwrap(), g.settings().content_hash());
    assert_eq!(g.get("db.pool"), Some(&json!(10)));
    assert_eq!(g.heads(), vec![commit.change_hash]);
    let second = g.delete(vec!["name".into()], &meta(2)).unwrap();
    assert_eq!(second.version.id.counter, 3);
    assert_eq!(second.version.parents, vec![commit.version.id.clone()]);
    assert_eq!(g.get("name"), None);
    let history: Vec<String> = g.history().map(|v| format!("{} {}", g.label(&v.id), v.kind.name())).collect();
    assert_eq!(history, ["v1 create", "v2 set", "v3 delete"]);
    assert!(g.derived_state_matches_document());
}

#[test]
fn settings_as_of_any_version_diff_and_rollback() {
    let mut g = group();
    let v2 = g.set(vec![("a".into(), json!(1)), ("b".into(), json!("x"))], &meta(1)).unwrap().version.id;
    let v3 = g.set(vec![("b".into(), json!("y")), ("c".into(), json!([1, 2]))], &meta(2)).unwrap().version.id;
    let v4 = g.delete(vec!["a".into()], &meta(3)).unwrap().version.id;
    assert_eq!(g.settings_at(&v2).unwrap().to_json(), json!({"a": 1, "b": "x"}));
    assert_eq!(g.settings_at(&v3).unwrap().to_json(), json!({"a": 1, "b": "y", "c": [1, 2]}));
    expect![[r#"
        - a = 1
        ~ b: "x" -> "y"
        + c = [1,2]
    "#]]
    .assert_eq(&g.diff(&v2, &v4).unwrap().to_string());
    let rollback = g.rollback("v2", &meta(4)).unwrap();
    assert_eq!(rollback.version.kind, VersionKind::Rollback { to: v2.clone() });
    assert_eq!(g.settings().to_json(), json!({"a": 1, "b": "x"}));
    assert_eq!(g.settings().content_hash(), g.settings_at(&v2).unwrap().content_hash());
    assert_eq!(rollback.version.content_hash, g.history().nth(1).unwrap().content_hash);
    // History is append-only: the rolled-back versions are still there and readable.
    assert_eq!(g.version_count(), 5);
    assert_eq!(g.settings_at(&v4).unwrap().to_json(), json!({"b": "y", "c": [1, 2]}));
    assert!(matches!(g.rollback("app@v5", &meta(5)), Err(EditError::Unchanged)));
    assert!(matches!(g.rollback("checkout@v2", &meta(5)), Err(EditError::Version(_))));
}

#[test]
fn apply_replaces_the_settings_with_the_file() {
    let mut g = group();
    g.set(vec![("old".into(), json!(1)), ("db.pool".into(), json!(5))], &meta(1)).unwrap();
    let toml = "[db]\npool = 10\nhosts = [\"a\"]\n[feature]\nnew_checkout = true\n";
    let commit = g.apply_file(toml, FileFormat::Toml, &meta(2)).unwrap();
    assert_eq!(commit.version.kind, VersionKind::Apply { format: FileFormat::Toml });
    assert_eq!(g.settings().to_json(), json!({"db.pool": 10, "db.hosts": ["a"], "feature.new_checkout": true}));
    assert!(matches!(g.apply_file(toml, FileFormat::Toml, &meta(3)), Err(EditError::Unchanged)));
    let yaml = "db:\n  pool: 10\n  hosts: [a]\nfeature:\n  new_checkout: true\n";
    assert!(matches!(g.apply_file(yaml, FileFormat::Yaml, &meta(3)), Err(EditError::Unchanged)));
}

#[test]
fn refused_writes_leave_nothing_behind_and_say_why() {
    let mut g = group();
    g.set(vec![("keep".into(), json!(1))], &meta(1)).unwrap();
    let before = (g.heads(), g.settings().clone(), g.version_count(), g.save().len());
    let huge = json!("x".repeat(20_000));
    let many: String = (0..10_001).map(|i| format!("k{i} = {i}\n")).collect();
    let attempts: Vec<Result<konor_crdt::LocalCommit, EditError>> = vec![
        g.set(vec![("bad key".into(), json!(1))], &meta(2)),
        g.set(vec![("ok".into(), json!(1)), ("bad..key".into(), json!(2))], &meta(2)),
        g.set(vec![("blob".into(), huge)], &meta(2)),
        g.set(vec![], &meta(2)),
        g.set(vec![("keep".into(), json!(1))], &meta(2)),
        g.delete(vec!["missing".into()], &meta(2)),
        g.apply_file("a = ", FileFormat::Toml, &meta(2)),
        g.apply_file("- just\n- a list\n", FileFormat::Yaml, &meta(2)),
        g.apply_file(&many, FileFormat::Toml, &meta(2)),
        g.rollback("v99", &meta(2)),
        g.rollback("latest", &meta(2)),
        g.set(vec![("ok".into(), json!(1))], &CommitMeta::new("a".repeat(200), "m", Millis(0))),
    ];
    let messages: Vec<String> = attempts.into_iter().map(|r| r.unwrap_err().to_string()).collect();
    expect![[r#"
        [
            "invalid key \"bad key\": character ' ' not allowed (use letters, digits, '_' or '-' between dots)",
            "invalid key \"bad..key\": empty segment (keys look like \"db.pool.size\")",
            "value of \"blob\" is 20002 bytes as JSON, at most 16384 allowed (store large data elsewhere and reference it)",
            "nothing to write: name at least one key",
            "no change: the settings already hold these values (no version created)",
            "key \"missing\" is not set in group \"app\"",
            "toml file does not parse: TOML parse error at line 1, column 5\n  |\n1 | a = \n  |     ^\n\n",
            "yaml file must hold a table of settings at the top level",
            "file has 10001 keys, a group holds at most 10000",
            "group \"app\" has no version v99",
            "\"latest\" is not a version: write it as v12 (or v12-3fa9 when several share a number)",
            "author is 200 bytes, at most 128 allowed",
        ]
    "#]]
    .assert_debug_eq(&messages);
    let after = (g.heads(), g.settings().clone(), g.version_count(), g.save().len());
    assert_eq!(before, after);
    assert!(g.derived_state_matches_document());
}

#[test]
fn invalid_group_names_are_refused() {
    let error = GroupDoc::create("no spaces", Mode::Strong, actor(1), &meta(0)).unwrap_err();
    assert!(error.to_string().contains("invalid group name"), "{error}");
    let (strong, _) = GroupDoc::create("payments", Mode::Strong, actor(1), &meta(0)).unwrap();
    assert_eq!(strong.mode(), Mode::Strong);
    assert_eq!(strong.name(), "payments");
    let reloaded = GroupDoc::load(&strong.save(), actor(2)).unwrap();
    assert_eq!(reloaded.mode(), Mode::Strong);
    assert_eq!(reloaded.epoch(), 0);
}

#[test]
fn a_double_is_served_as_its_canonical_text_reads_back_on_every_node() {
    let mut docs = replicas(2, Mode::Eventual);
    let commit =
        docs[0].set(vec![("f".into(), json!(1.0)), ("z".into(), json!(-0.0)), ("x".into(), json!(0.5))], &meta(1));
    let commit = commit.unwrap();
    crate::support::deliver(&mut docs, 0, 1);
    for doc in &docs {
        assert_eq!(doc.settings().to_json().to_string(), r#"{"f":1,"x":0.5,"z":0}"#);
        assert_eq!(doc.settings().content_hash(), commit.version.content_hash().unwrap());
        assert!(doc.derived_state_matches_document());
    }
    // 1 and 1.0 are one value: writing the other changes nothing.
    assert!(matches!(docs[1].set(vec![("f".into(), json!(1))], &meta(2)), Err(EditError::Unchanged)));
}

#[test]
fn versions_written_with_the_retired_summed_hash_still_load_and_read() {
    // Build a document as konord wrote it before issue 12: version records without
    // `hash_scheme`, their `content_hash` a sum of per-entry hashes (here a stand-in value).
    let mut g = group();
    g.set(vec![("a".into(), json!(1)), ("b".into(), json!([1.5]))], &meta(1)).unwrap();
    g.delete(vec!["a".into()], &meta(2)).unwrap();
    let mut doc = automerge::Automerge::load(&g.save()).unwrap();
    let old_hash = "12".repeat(32);
    let versions = match doc.get(automerge::ROOT, "versions").unwrap() {
        Some((automerge::Value::Object(_), id)) => id,
        other => panic!("versions map: {other:?}"),
    };
    let records: Vec<(String, String)> = doc
        .map_range(&versions, ..)
        .map(|item| match item.value {
            automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(text)) => {
                (item.key.into_owned(), text.to_string())
            }
            other => panic!("version record: {other:?}"),
        })
        .collect();
    let mut tx = doc.transaction();
    for (key, text) in records {
        let mut record: serde_json::Value = serde_json::from_str(&text).unwrap();
        let record = record.as_object_mut().unwrap();
        assert!(record.remove("hash_scheme").is_some(), "today's records carry hash_scheme");
        record.insert("content_hash".into(), json!(old_hash));
        tx.put(&versions, key, serde_json::to_string(record).unwrap()).unwrap();
    }
    tx.commit();

    let loaded = GroupDoc::load(&doc.save(), actor(9)).unwrap();
    assert_eq!(loaded.version_count(), 3);
    for version in loaded.history() {
        assert_eq!(version.content_hash, old_hash, "shown as written");
        assert_eq!(version.content_hash(), None, "not compared with today's hashes");
        // Reading the settings as of an old version does not trip the hash check.
        loaded.settings_at(&version.id).unwrap();
    }
    assert_eq!(loaded.settings().to_json(), json!({"b": [1.5]}));
}

/// A strong write's change is built on a copy kept beside the document (issue 14): after a
/// prepared change that was never applied (an aborted round), after one that was, and after
/// changes from a peer, each prepared change is exactly what a fresh copy would build, and
/// applies on this replica and on a peer.
#[test]
fn prepared_changes_stay_right_across_aborts_commits_and_remote_changes() {
    use konor_crdt::group::Edit;
    let mut docs = crate::support::replicas(2, konor_crdt::Mode::Eventual);
    let set = |key: &str, n: u64| Edit::Set(vec![(key.to_owned(), serde_json::json!(n))]);
    // Aborted: never applied anywhere.
    let aborted = docs[0].prepare(set("a", 1), &crate::support::meta(1)).unwrap();
    // The next one is built on the document as it is, not on the aborted change.
    let next = docs[0].prepare(set("a", 2), &crate::support::meta(2)).unwrap();
    let fresh = konor_crdt::GroupDoc::load(&docs[0].save(), crate::support::actor(1))
        .unwrap()
        .prepare(set("a", 2), &crate::support::meta(2))
        .unwrap();
    assert_eq!(next.change_hash, fresh.change_hash, "the same change a fresh copy builds");
    assert_ne!(next.change_hash, aborted.change_hash);
    // Committed: applied here and on the peer.
    for doc in docs.iter_mut() {
        doc.apply_changes(std::slice::from_ref(&next.change)).unwrap();
    }
    // A peer's write arrives, then another prepare.
    let remote = docs[1].set(vec![("b".into(), serde_json::json!(3))], &crate::support::meta(3)).unwrap();
    docs[0].apply_changes(&[remote.change]).unwrap();
    let third = docs[0].prepare(set("c", 4), &crate::support::meta(4)).unwrap();
    let fresh = konor_crdt::GroupDoc::load(&docs[0].save(), crate::support::actor(1))
        .unwrap()
        .prepare(set("c", 4), &crate::support::meta(4))
        .unwrap();
    assert_eq!(third.change_hash, fresh.change_hash);
    for doc in docs.iter_mut() {
        doc.apply_changes(std::slice::from_ref(&third.change)).unwrap();
    }
    assert_eq!(crate::support::state(&docs[0]), crate::support::state(&docs[1]));
    assert_eq!(docs[0].get("c"), Some(&serde_json::json!(4)));
    assert_eq!(docs[0].get("a"), Some(&serde_json::json!(2)), "the aborted write is nowhere");
    // A new actor (a restart's): the next change is built as that actor.
    docs[0].set_actor(crate::support::actor(9));
    let as_new = docs[0].prepare(set("d", 5), &crate::support::meta(5)).unwrap();
    let fresh = konor_crdt::GroupDoc::load(&docs[0].save(), crate::support::actor(9))
        .unwrap()
        .prepare(set("d", 5), &crate::support::meta(5))
        .unwrap();
    assert_eq!(as_new.change_hash, fresh.change_hash);
}
