//! Concurrent writes (SPEC F6): deterministic winners, reported losers, deletes against sets.

use konor_crdt::{Mode, VersionError};
use serde_json::json;

use crate::support::{deliver, exchange_all, meta, replicas, state};

#[test]
fn concurrent_writes_to_one_key_resolve_the_same_everywhere_and_report_the_loser() {
    let mut docs = replicas(2, Mode::Eventual);
    let a = docs[0].set(vec![("timeout_ms".into(), json!(100))], &meta(1)).unwrap().version.id;
    let b = docs[1].set(vec![("timeout_ms".into(), json!(250))], &meta(2)).unwrap().version.id;
    // Same counter, different actors: both ids exist, never the same pair.
    assert_eq!(a.counter, b.counter);
    assert_ne!(a, b);
    deliver(&mut docs, 0, 1);
    deliver(&mut docs, 1, 0);
    assert_eq!(state(&docs[0]), state(&docs[1]));
    for doc in &docs {
        let conflicts = doc.conflicts();
        assert_eq!(conflicts.len(), 1, "the conflict is reported on every replica");
        let conflict = &conflicts[0];
        assert_eq!(conflict.key, "timeout_ms");
        assert_eq!(Some(&conflict.winner.value), doc.get("timeout_ms"));
        assert_eq!(conflict.losers.len(), 1);
        let mut both = vec![conflict.winner.value.clone(), conflict.losers[0].value.clone()];
        both.sort_by_key(|v| v.to_string());
        assert_eq!(both, vec![json!(100), json!(250)]);
        let mut writers = vec![conflict.winner.version.clone().unwrap(), conflict.losers[0].version.clone().unwrap()];
        writers.sort();
        let mut expected = vec![a.clone(), b.clone()];
        expected.sort();
        assert_eq!(writers, expected);
        // Both versions are in history, labelled apart, and "v2" alone is ambiguous.
        assert_eq!(doc.label(&a), a.full_label());
        assert!(matches!(doc.resolve("v2"), Err(VersionError::Ambiguous { .. })));
        assert_eq!(doc.resolve(&a.full_label()).unwrap().id, a);
        assert_eq!(doc.head_versions().len(), 2);
    }
    // Any later write of the key resolves the conflict, on every replica.
    let resolved = docs[1].set(vec![("timeout_ms".into(), json!(300))], &meta(3)).unwrap();
    assert_eq!(resolved.version.id.counter, 3);
    assert_eq!(resolved.version.parents.len(), 2);
    exchange_all(&mut docs);
    for doc in &docs {
        assert!(doc.conflicts().is_empty());
        assert_eq!(doc.get("timeout_ms"), Some(&json!(300)));
    }
}

#[test]
fn a_set_survives_a_concurrent_delete() {
    let mut docs = replicas(2, Mode::Eventual);
    docs[0].set(vec![("flag".into(), json!(false))], &meta(1)).unwrap();
    exchange_all(&mut docs);
    docs[0].delete(vec!["flag".into()], &meta(2)).unwrap();
    docs[1].set(vec![("flag".into(), json!(true))], &meta(3)).unwrap();
    exchange_all(&mut docs);
    for doc in &docs {
        assert_eq!(doc.get("flag"), Some(&json!(true)));
        assert!(doc.derived_state_matches_document());
    }
    assert_eq!(state(&docs[0]), state(&docs[1]));
}

#[test]
fn merge_order_does_not_change_the_winner() {
    // Three replicas write the same key; merge into two fresh observers in opposite orders.
    let mut docs = replicas(5, Mode::Eventual);
    for (n, doc) in docs.iter_mut().take(3).enumerate() {
        doc.set(vec![("k".into(), json!(n))], &meta(n as u64)).unwrap();
    }
    for from in [0, 1, 2] {
        deliver(&mut docs, from, 3);
    }
    for from in [2, 1, 0] {
        deliver(&mut docs, from, 4);
    }
    assert_eq!(state(&docs[3]), state(&docs[4]));
    assert_eq!(docs[3].conflicts()[0].losers.len(), 2);
}
