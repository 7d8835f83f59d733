//! A change made on any node reaches every node and every watcher; a node that was down
//! catches up when it returns.

use std::collections::BTreeMap;

use konor_sdk::protocol::{ErrorCode, Request, Response, WatchEvent, WriteMeta};
use serde_json::json;

use crate::harness::{Cluster, eventually, group_on_all, live_nodes, start_mesh};

fn set(group: &str, key: &str, value: serde_json::Value) -> Request {
    Request::Set {
        group: group.into(),
        entries: BTreeMap::from([(key.to_owned(), value)]),
        meta: WriteMeta { author: "it".into(), message: "test".into(), ..WriteMeta::default() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_any_node_reaches_every_node_and_watcher() {
    let cluster = Cluster::new();
    let (_nodes, clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "app", "eventual").await;
    let mut watch = clients[2].watch("app", None).await.unwrap();
    let committed = clients[1].call(set("app", "db.pool", json!(10))).await.unwrap();
    let Response::Committed { version, revision, acked_by, .. } = committed else { panic!("{committed:?}") };
    assert!(acked_by.len() >= 2 && acked_by.contains(&"n2".to_owned()), "a live quorum of 3: {acked_by:?}");
    let event = tokio::time::timeout(crate::harness::DEADLINE, watch.next()).await.unwrap().unwrap().unwrap();
    match event {
        WatchEvent::Change { group, set, version: seen, .. } => {
            assert_eq!(group, "app");
            assert_eq!(set.get("db.pool"), Some(&json!(10)));
            assert_eq!(seen, version);
        }
        other => panic!("{other:?}"),
    }
    for client in &clients {
        let value =
            eventually("the value on every node", || async { client.get("app", "db.pool").await.ok().flatten() }).await;
        assert_eq!(value, json!(10));
    }
    // Same history everywhere: the same revision and heads digest on every node.
    let _ = revision;
    eventually("identical heads on all nodes", || async {
        let Ok(Response::Status { nodes, .. }) = clients[0].call(Request::Status { group: "app".into() }).await else {
            return None;
        };
        let digests: std::collections::BTreeSet<String> = nodes.iter().map(|n| n.heads.clone()).collect();
        (digests.len() == 1 && nodes.len() == 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_and_keeps_its_identity() {
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "app", "eventual").await;
    let status = nodes[2].stop();
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    // The others see it leave (graceful) rather than wait for the failure detector.
    eventually("n3 no longer live on n1", || async {
        (!live_nodes(&clients[0]).await.contains(&"n3".to_owned())).then_some(())
    })
    .await;
    for n in 0..5 {
        clients[0].call(set("app", &format!("k{n}"), json!(n))).await.unwrap();
    }
    nodes[2].start();
    clients[2] = nodes[2].client().await;
    let client = clients[2].clone();
    eventually("n3 has every change made while it was down", || async {
        let snapshot = client.snapshot("app").await.ok()?;
        (snapshot.settings.len() == 5).then_some(())
    })
    .await;
    assert_eq!(clients[2].get("app", "k4").await.unwrap(), Some(json!(4)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_daemon_keeps_serving() {
    let cluster = Cluster::new();
    let (_nodes, clients) = start_mesh(&cluster, 1).await;
    group_on_all(&clients, "app", "eventual").await;
    let error = clients[0].call(set("nope", "k", json!(1))).await.unwrap_err();
    assert!(error.to_string().contains("does not exist"), "{error}");
    let error = clients[0].call(set("app", "bad key", json!(1))).await.unwrap_err();
    assert!(error.to_string().contains("invalid key"), "{error}");
    let bad_file =
        Request::Apply { group: "app".into(), format: "toml".into(), text: "a = ".into(), meta: WriteMeta::default() };
    let error = clients[0].call(bad_file).await.unwrap_err();
    assert!(error.to_string().contains("toml file does not parse"), "{error}");
    let error = clients[0].call(Request::GroupJoin { name: "app".into(), key: "not-a-key".into() }).await.unwrap_err();
    assert!(matches!(error, konor_sdk::client::SdkError::Daemon { code: ErrorCode::BadRequest, .. }), "{error}");
    // Nothing partial was stored, and the daemon still answers.
    let snapshot = clients[0].snapshot("app").await.unwrap();
    assert!(snapshot.settings.is_empty());
    clients[0].call(set("app", "ok", json!(true))).await.unwrap();
}
