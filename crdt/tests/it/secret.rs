//! Keys marked secret (issue 17): a mark travels in the version that makes it, holds for every
//! value of the key (older ones, overlays) and is never taken back; the first mark moves the
//! document to [`SECRET_FORMAT`], which a konord that cannot mask refuses.

use automerge::Automerge;
use automerge::transaction::Transactable;
use konor_crdt::group::{NEWEST_FORMAT, SECRET_FORMAT};
use konor_crdt::{EditError, GroupDoc, Mode};
use serde_json::json;

use crate::support::{actor, exchange_all, meta, replicas, stored_format};

#[test]
fn a_mark_spreads_with_its_version_survives_a_reload_and_moves_the_format() {
    let mut docs = replicas(3, Mode::Eventual);
    docs[0].set(vec![("db.user".into(), json!("app"))], &meta(1)).unwrap();
    assert!(docs[0].secret_keys().is_empty());
    assert_eq!(stored_format(&docs[0]), 3, "no mark, no new format");

    let marked = meta(2).with_secret(vec!["db.password".into(), "db.password".into()]);
    let commit = docs[0].set(vec![("db.password".into(), json!("hunter2"))], &marked).unwrap();
    assert_eq!(commit.version.secret, vec!["db.password".to_owned()], "each key once");
    assert!(docs[0].is_secret("db.password"));
    assert!(docs[0].is_secret("db.password@env=dev"), "an overlay of a secret key is secret");
    assert!(!docs[0].is_secret("db.user"));
    assert_eq!(stored_format(&docs[0]), SECRET_FORMAT);

    exchange_all(&mut docs);
    for doc in &docs {
        assert!(doc.is_secret("db.password"), "the mark reached every replica");
        assert_eq!(doc.format(), SECRET_FORMAT);
    }
    let reloaded = GroupDoc::load(&docs[2].save(), actor(9)).unwrap();
    assert_eq!(reloaded.secret_keys().iter().collect::<Vec<_>>(), ["db.password"]);

    // A later write without the flag does not unmark: the key stays secret.
    docs[1].set(vec![("db.password".into(), json!("s3cret"))], &meta(3)).unwrap();
    exchange_all(&mut docs);
    assert!(docs.iter().all(|doc| doc.is_secret("db.password")));
}

#[test]
fn a_key_can_be_marked_without_a_new_value_and_marking_twice_is_no_change() {
    let mut docs = replicas(1, Mode::Eventual);
    let doc = &mut docs[0];
    doc.set(vec![("api.token".into(), json!("t0k3n"))], &meta(1)).unwrap();
    let same = meta(2).with_secret(vec!["api.token".into()]);
    let commit = doc.set(vec![("api.token".into(), json!("t0k3n"))], &same).unwrap();
    assert_eq!(commit.version.secret, vec!["api.token".to_owned()], "a mark-only write makes a version");
    assert!(doc.is_secret("api.token"));
    let again = meta(3).with_secret(vec!["api.token".into()]);
    let refused = doc.set(vec![("api.token".into(), json!("t0k3n"))], &again).unwrap_err();
    assert_eq!(refused, EditError::Unchanged);
}

#[test]
fn a_mark_that_names_no_key_is_refused_with_nothing_written() {
    let mut docs = replicas(1, Mode::Eventual);
    let doc = &mut docs[0];
    let versions = doc.version_count();
    for bad in ["", "db..password", "db.password@env=dev"] {
        let marked = meta(1).with_secret(vec![bad.into()]);
        let error = doc.set(vec![("k".into(), json!(1))], &marked).unwrap_err();
        assert!(matches!(error, EditError::Key(_)), "{bad:?}: {error:?}");
    }
    assert_eq!(doc.version_count(), versions);
    assert!(doc.secret_keys().is_empty());
    assert_eq!(stored_format(doc), 3);
}

#[test]
fn concurrent_marks_of_one_key_converge() {
    let mut docs = replicas(2, Mode::Eventual);
    for (n, doc) in docs.iter_mut().enumerate() {
        let marked = meta(n as u64 + 1).with_secret(vec!["k".into()]);
        doc.set(vec![("k".into(), json!(n))], &marked).unwrap();
    }
    exchange_all(&mut docs);
    assert_eq!(docs[0].secret_keys(), docs[1].secret_keys());
    assert!(docs[0].is_secret("k"));
}

#[test]
fn a_document_of_a_newer_format_is_refused_by_name() {
    let mut docs = replicas(1, Mode::Eventual);
    let mut raw = Automerge::load(&docs.remove(0).save()).unwrap();
    let mut tx = raw.transaction();
    tx.put(automerge::ROOT, "format", NEWEST_FORMAT + 1).unwrap();
    tx.commit();
    let error = GroupDoc::load(&raw.save(), actor(2)).unwrap_err().to_string();
    assert!(error.contains(&format!("document format {}", NEWEST_FORMAT + 1)), "{error}");
    assert!(error.contains("upgrade konord"), "{error}");
}

#[test]
fn a_schema_error_never_quotes_a_secret_value() {
    let mut docs = replicas(1, Mode::Eventual);
    let doc = &mut docs[0];
    let schema = json!({"type": "object", "properties": {"pin": {"type": "integer"}, "name": {"type": "integer"}}});
    doc.edit(konor_crdt::group::Edit::Schema(Some(schema)), &meta(1)).unwrap();
    // Marked by the very write that breaks the schema, then a marked key the schema breaks.
    let marked = meta(2).with_secret(vec!["pin".into()]);
    let error = doc.set(vec![("pin".into(), json!("s3cret-pin")), ("name".into(), json!("plain"))], &marked);
    let text = error.unwrap_err().to_string();
    assert!(!text.contains("s3cret-pin"), "{text}");
    assert!(text.contains("plain"), "a value not secret is still shown: {text}");
    doc.set(vec![("pin".into(), json!(1234))], &meta(3).with_secret(vec!["pin".into()])).unwrap();
    let error =
        doc.edit(konor_crdt::group::Edit::Schema(Some(json!({"properties": {"pin": {"maximum": 10}}}))), &meta(4));
    let text = error.unwrap_err().to_string();
    assert!(!text.contains("1234"), "a stored secret: {text}");
}

#[test]
fn a_write_puts_the_secret_format_back_when_a_concurrent_one_lowered_it() {
    let mut docs = replicas(1, Mode::Eventual);
    docs[0].set(vec![("k".into(), json!(1))], &meta(1).with_secret(vec!["k".into()])).unwrap();
    // A peer's change puts format 3 (as a conversion racing the mark could leave it).
    let mut raw = Automerge::load(&docs[0].save()).unwrap().with_actor(actor(7));
    let mut tx = raw.transaction();
    tx.put(automerge::ROOT, "format", 3u64).unwrap();
    tx.commit();
    let change = raw.get_last_local_change().unwrap().raw_bytes().to_vec();
    docs[0].apply_changes(&[change]).unwrap();
    assert_eq!(stored_format(&docs[0]), 3);
    docs[0].set(vec![("other".into(), json!(2))], &meta(2)).unwrap();
    assert_eq!(stored_format(&docs[0]), SECRET_FORMAT, "the next write puts it back");
}
