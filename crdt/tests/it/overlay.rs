//! Overlays (SPEC F29, issue 16): overrides of some keys for the nodes whose labels match a
//! selector, stored as `key@selector` settings, so a version holds its base and its overlays; in
//! a gated group each node serves the released version's base with the overlays its labels
//! match, and history and diff show both.

use std::collections::BTreeMap;

use konor_crdt::configuration::GroupPolicy;
use konor_crdt::group::Edit;
use konor_crdt::release::Viewer;
use konor_crdt::{EditError, FileFormat, GroupDoc, Mode, ReleasePolicy, ReleaseStrategy, SettingsDiff};
use serde_json::json;

use crate::support::{actor, deliver, meta};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Replicas of one gated group, each viewed by a node with the given labels.
fn gated(viewers: &[&[(&str, &str)]]) -> Vec<GroupDoc> {
    let policy = GroupPolicy { release: ReleasePolicy::Gated, ..Default::default() };
    let (first, _) = GroupDoc::create_with("app", Mode::Eventual, actor(1), &meta(0), &policy, None).unwrap();
    let genesis = first.save();
    let mut docs = vec![first];
    for n in 2..=viewers.len() as u8 {
        docs.push(GroupDoc::load(&genesis, actor(n)).unwrap());
    }
    for (n, (doc, pairs)) in docs.iter_mut().zip(viewers).enumerate() {
        doc.set_viewer(Viewer { node: format!("n{}", n + 1), labels: labels(pairs) });
    }
    docs
}

#[test]
fn each_node_serves_the_released_base_with_its_overlays_and_history_shows_both() {
    let mut docs = gated(&[&[], &[("env", "dev")]]);
    docs[0].set(vec![("db.pool".into(), json!(8)), ("db.host".into(), json!("a"))], &meta(1)).unwrap();
    let overlay = konor_crdt::overlay::overlay_key("db.pool", &labels(&[("env", "dev")]));
    assert_eq!(overlay, "db.pool@env=dev");
    let commit = docs[0].set(vec![(overlay.clone(), json!(2))], &meta(2)).unwrap();
    let to = docs[0].label(&commit.version.id);
    docs[0].edit(Edit::Release { to, strategy: ReleaseStrategy::All, guards: Default::default() }, &meta(3)).unwrap();
    docs[0].refresh_served();
    deliver(&mut docs, 0, 1);
    docs[1].refresh_served();
    assert_eq!(docs[0].served_settings().to_json(), json!({"db.pool": 8, "db.host": "a"}), "n1 has no env label");
    assert_eq!(docs[1].served_settings().to_json(), json!({"db.pool": 2, "db.host": "a"}), "n2 is env=dev");
    assert!(docs[0].served_matches_document() && docs[1].served_matches_document());
    // The version holds both; the diff of the overlay write names the overlay key.
    assert_eq!(docs[1].settings().get(&overlay), Some(&json!(2)));
    let before = docs[1].settings_at(&docs[1].history().nth(1).unwrap().id).unwrap();
    let diff = SettingsDiff::between(&before, docs[1].settings());
    assert_eq!(diff.added.iter().map(|(key, _)| key).collect::<Vec<_>>(), [&overlay]);

    // A node whose labels change serves the other view.
    docs[0].set_viewer(Viewer { node: "n1".into(), labels: labels(&[("env", "dev")]) });
    assert_eq!(docs[0].served_get("db.pool"), Some(&json!(2)));
    // A file applied keeps the overlays: it holds base settings.
    docs[0].edit(Edit::ApplyFile { text: "db.pool = 9\n".into(), format: FileFormat::Toml }, &meta(4)).unwrap();
    assert_eq!(docs[0].settings().get(&overlay), Some(&json!(2)));
    assert_eq!(docs[0].settings().get("db.host"), None);
}

#[test]
fn overlays_need_a_gated_group_a_valid_selector_and_hold_to_the_schema() {
    let (mut plain, _) = GroupDoc::create("plain", Mode::Eventual, actor(1), &meta(0)).unwrap();
    let refused = plain.set(vec![("db.pool@env=dev".into(), json!(2))], &meta(1));
    assert!(matches!(refused, Err(EditError::BadOverlay { .. })), "{refused:?}");
    let mut docs = gated(&[&[]]);
    for bad in ["db.pool@env", "db.pool@region=eu,env=dev", "db.pool@"] {
        assert!(docs[0].set(vec![(bad.into(), json!(2))], &meta(1)).is_err(), "{bad}");
    }
    let schema = json!({"type": "object", "properties": {"db.pool": {"type": "integer", "maximum": 16}}});
    docs[0].edit(Edit::Schema(Some(schema)), &meta(2)).unwrap();
    let refused = docs[0].set(vec![("db.pool@env=dev".into(), json!(64))], &meta(3));
    let Err(EditError::SchemaViolation { violations, .. }) = refused else { panic!("{refused:?}") };
    assert_eq!(violations[0].key.as_deref(), Some("db.pool@env=dev"), "{violations:?}");
    docs[0].set(vec![("db.pool@env=dev".into(), json!(4))], &meta(4)).unwrap();
    // Too many selectors.
    for n in 0..konor_crdt::limits::OVERLAY_SELECTORS_MAX - 1 {
        docs[0].set(vec![(format!("db.pool@env=e{n}"), json!(1))], &meta(5 + n as u64)).unwrap();
    }
    let refused = docs[0].set(vec![("db.pool@env=last".into(), json!(1))], &meta(99));
    assert!(matches!(refused, Err(EditError::BadOverlay { .. })), "{refused:?}");
}

#[test]
fn the_schema_holds_for_a_node_that_matches_two_overlays_at_once() {
    let mut docs = gated(&[&[]]);
    // `a` and `b` may not both be 1.
    let schema = json!({"type": "object", "not": {"required": ["a", "b"], "properties": {"a": {"const": 1}, "b": {"const": 1}}}});
    docs[0].edit(Edit::Schema(Some(schema)), &meta(1)).unwrap();
    assert!(docs[0].set(vec![("a".into(), json!(1)), ("b".into(), json!(1))], &meta(2)).is_err(), "in the base");
    docs[0].set(vec![("a@env=dev".into(), json!(1))], &meta(3)).unwrap();
    let refused = docs[0].set(vec![("b@region=eu".into(), json!(1))], &meta(4));
    let Err(EditError::SchemaViolation { violations, .. }) = refused else {
        panic!("a node labelled env=dev and region=eu would serve a = b = 1: {refused:?}")
    };
    assert!(violations[0].message.contains("env=dev,region=eu"), "{violations:?}");
    // Selectors that contradict each other never meet on one node.
    docs[0].set(vec![("b@env=prod".into(), json!(1))], &meta(5)).unwrap();
}
