//! Writes an operator can trust (SPEC F5, F8): a group's schema refuses a write that would break
//! it on the node where the write is made, and a conditional write is refused, with nothing
//! changed, when the group has moved on.

use konor_crdt::group::{Condition, Edit};
use konor_crdt::{EditError, GroupDoc, Mode, VersionKind};
use serde_json::{Value, json};

use crate::support::{deliver, exchange_all, meta, replicas};

fn port_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"db.port": {"type": "integer", "minimum": 1, "maximum": 65535}},
        "patternProperties": {"^feature\\.": {"type": "boolean"}}
    })
}

fn snapshot(doc: &GroupDoc) -> (Vec<konor_crdt::ChangeHash>, Value, usize) {
    (doc.heads(), doc.settings().to_json(), doc.version_count())
}

#[test]
fn a_schema_is_a_version_that_spreads_and_refuses_bad_writes_on_every_node() {
    let mut docs = replicas(2, Mode::Eventual);
    docs[0].set(vec![("db.port".into(), json!(5432))], &meta(1)).unwrap();
    let commit = docs[0].edit(Edit::Schema(Some(port_schema())), &meta(2)).unwrap();
    assert!(matches!(&commit.version.kind, VersionKind::Schema { schema: Some(hash) } if hash.len() == 12));
    assert_eq!(docs[0].settings().len(), 1, "a schema version changes no setting");
    exchange_all(&mut docs);
    // The other node learned the schema from the change alone, and refuses a bad write itself.
    assert_eq!(docs[1].schema().map(|s| s.to_value()), Some(port_schema()));
    let before = snapshot(&docs[1]);
    let error = docs[1].set(vec![("db.port".into(), json!(70000))], &meta(3)).unwrap_err();
    let EditError::SchemaViolation { violations, .. } = &error else { panic!("{error:?}") };
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].key.as_deref(), Some("db.port"));
    assert_eq!(violations[0].value.as_deref(), Some("70000"));
    assert_eq!(violations[0].rule, "/properties/db.port/maximum");
    let text = error.to_string();
    assert!(text.contains("db.port") && text.contains("70000") && text.contains("maximum"), "{text}");
    assert_eq!(snapshot(&docs[1]), before, "a refused write leaves nothing behind");
    // Every kind of settings write is checked: apply and rollback too.
    let file = "[feature]\nx = \"yes\"\n[db]\nport = 1\n";
    let refused = docs[1].apply_file(file, konor_crdt::FileFormat::Toml, &meta(4)).unwrap_err();
    assert!(matches!(refused, EditError::SchemaViolation { .. }), "{refused:?}");
    docs[1].set(vec![("feature.x".into(), json!(true))], &meta(5)).unwrap();
    // A good write passes; a reload from the saved document keeps the schema.
    let reloaded = GroupDoc::load(&docs[1].save(), crate::support::actor(9)).unwrap();
    assert_eq!(reloaded.schema(), docs[1].schema());
}

#[test]
fn a_schema_the_settings_break_is_refused_and_removing_it_lets_writes_through() {
    let mut doc = replicas(1, Mode::Eventual).remove(0);
    doc.set(vec![("db.port".into(), json!(0))], &meta(1)).unwrap();
    let before = snapshot(&doc);
    let error = doc.edit(Edit::Schema(Some(port_schema())), &meta(2)).unwrap_err();
    assert!(matches!(error, EditError::SchemaViolation { .. }), "{error:?}");
    assert_eq!(snapshot(&doc), before);
    let unusable = doc.edit(Edit::Schema(Some(json!({"type": 12}))), &meta(3)).unwrap_err();
    assert!(matches!(unusable, EditError::Schema(_)), "{unusable:?}");
    doc.set(vec![("db.port".into(), json!(80))], &meta(4)).unwrap();
    doc.edit(Edit::Schema(Some(port_schema())), &meta(5)).unwrap();
    assert!(matches!(doc.edit(Edit::Schema(Some(port_schema())), &meta(6)), Err(EditError::Unchanged)));
    assert!(doc.set(vec![("db.port".into(), json!(-1))], &meta(7)).is_err());
    let removed = doc.edit(Edit::Schema(None), &meta(8)).unwrap();
    assert_eq!(removed.version.kind, VersionKind::Schema { schema: None });
    doc.set(vec![("db.port".into(), json!(-1))], &meta(9)).unwrap();
    assert!(doc.schema().is_none());
}

#[test]
fn writes_that_repair_a_merged_state_pass_though_it_still_breaks_the_schema() {
    // Each node's write is valid alone; merged, the settings break `maxProperties`.
    let schema = json!({"type": "object", "maxProperties": 2, "properties": {"a": {"type": "integer"}}});
    let mut docs = replicas(2, Mode::Eventual);
    docs[0].edit(Edit::Schema(Some(schema)), &meta(1)).unwrap();
    exchange_all(&mut docs);
    docs[0].set(vec![("a".into(), json!(1)), ("b".into(), json!(1))], &meta(2)).unwrap();
    docs[1].set(vec![("a".into(), json!(2)), ("c".into(), json!(1))], &meta(3)).unwrap();
    exchange_all(&mut docs);
    assert_eq!(docs[0].settings().len(), 3);
    assert_eq!(docs[0].check_against_schema(docs[0].settings()).unwrap().len(), 1);
    // A write that fixes nothing but breaks nothing new passes; one that adds a break does not.
    docs[0].set(vec![("a".into(), json!(3))], &meta(4)).unwrap();
    assert!(docs[0].set(vec![("a".into(), json!("x"))], &meta(5)).is_err());
    docs[0].delete(vec!["c".into()], &meta(6)).unwrap();
    assert!(docs[0].check_against_schema(docs[0].settings()).unwrap().is_empty());
}

#[test]
fn a_conditional_write_is_refused_with_nothing_changed_when_the_group_moved_on() {
    let mut docs = replicas(2, Mode::Eventual);
    let v2 = docs[0].set(vec![("a".into(), json!(1))], &meta(1)).unwrap();
    let v2_label = docs[0].label(&v2.version.id);
    let if_v2 = Condition { version: Some(v2_label.clone()), content: None };
    // Holds: the write goes through.
    let v3 = docs[0].set(vec![("a".into(), json!(2))], &meta(2).with_condition(if_v2.clone())).unwrap();
    // The group moved on: refused, and the error names what holds instead.
    let before = snapshot(&docs[0]);
    let error = docs[0].set(vec![("a".into(), json!(3))], &meta(3).with_condition(if_v2.clone())).unwrap_err();
    let EditError::ConditionFailed { actual, .. } = &error else { panic!("{error:?}") };
    assert!(actual.contains(&docs[0].label(&v3.version.id)), "{actual}");
    assert_eq!(snapshot(&docs[0]), before);
    // Content: the hash as history shows it (12 digits) or whole.
    let hash = docs[0].settings().content_hash().to_hex();
    let if_content = |digits: &str| Condition { version: None, content: Some(digits.to_owned()) };
    docs[0].delete(vec!["a".into()], &meta(4).with_condition(if_content(&hash[..12]))).unwrap();
    let stale = docs[0].set(vec![("a".into(), json!(4))], &meta(5).with_condition(if_content(&hash))).unwrap_err();
    assert!(matches!(stale, EditError::ConditionFailed { .. }), "{stale:?}");
    let bad = docs[0].set(vec![("a".into(), json!(4))], &meta(6).with_condition(if_content("xyz"))).unwrap_err();
    assert!(matches!(bad, EditError::BadCondition { .. }), "{bad:?}");
    let unknown = Condition { version: Some("v99".into()), content: None };
    let missing = docs[0].set(vec![("a".into(), json!(4))], &meta(7).with_condition(unknown)).unwrap_err();
    assert!(matches!(missing, EditError::Version(_)), "{missing:?}");
    // Concurrent versions: no single latest version, so no version condition holds.
    deliver(&mut docs, 0, 1);
    let latest = docs[0].latest_label();
    docs[0].set(vec![("b".into(), json!(1))], &meta(8)).unwrap();
    docs[1].set(vec![("c".into(), json!(1))], &meta(9)).unwrap();
    exchange_all(&mut docs);
    let if_latest = Condition { version: Some(latest), content: None };
    let error = docs[0].set(vec![("d".into(), json!(1))], &meta(10).with_condition(if_latest)).unwrap_err();
    let EditError::ConditionFailed { actual, .. } = &error else { panic!("{error:?}") };
    assert!(actual.contains("concurrent"), "{actual}");
}
