//! `kill -9` at any moment loses nothing that was acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;

use konor_sdk::protocol::{Request, Response, WriteMeta};
use serde_json::json;
use tokio::sync::Mutex;

use crate::harness::{Cluster, group_on_all, start_mesh};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_stream_of_writes_loses_no_acknowledged_write() {
    let cluster = Cluster::new();
    let (mut nodes, clients) = start_mesh(&cluster, 1).await;
    group_on_all(&clients, "app", "eventual").await;
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let client = clients[0].clone();
        let acknowledged = acknowledged.clone();
        tokio::spawn(async move {
            for n in 0u64.. {
                let request = Request::Set {
                    group: "app".into(),
                    entries: BTreeMap::from([(format!("k{}", n % 50), json!(n))]),
                    meta: WriteMeta::default(),
                };
                match client.call(request).await {
                    Ok(Response::Committed { .. }) => acknowledged.lock().await.push(n),
                    _ => break,
                }
            }
        })
    };
    // Kill once a good number of writes were acknowledged (an observable event).
    crate::harness::eventually("100 acknowledged writes", || async {
        (acknowledged.lock().await.len() >= 100).then_some(())
    })
    .await;
    nodes[0].kill9();
    let _ = writer.await;
    let acked = acknowledged.lock().await.clone();
    nodes[0].start();
    let client = nodes[0].client().await;
    let snapshot = client.snapshot("app").await.unwrap();
    // The last acknowledged write of every key must be there (a later, unacknowledged write of
    // the same key may also have reached the disk).
    let mut last_per_key = BTreeMap::new();
    for n in &acked {
        last_per_key.insert(format!("k{}", n % 50), *n);
    }
    for (key, n) in last_per_key {
        let value = snapshot.settings.get(&key).and_then(|v| v.as_u64());
        assert!(value.is_some_and(|v| v >= n), "{key}: acknowledged {n}, found {value:?} after kill -9");
    }
}

/// Issue 11: the repair queue survives restarts. A group file found unreadable is moved to
/// quarantine and repaired from a peer; when no peer holds the group, the repair waits, also
/// across a restart of the node (its key stays in `groups/`), and happens once a peer returns.
#[tokio::test]
async fn a_repair_that_found_no_peer_is_resumed_after_a_restart() {
    let cluster = Cluster::new();
    let (mut nodes, clients) = start_mesh(&cluster, 2).await;
    group_on_all(&clients, "app", "eventual").await;
    let request = Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([("k".to_owned(), json!("kept"))]),
        meta: WriteMeta::default(),
    };
    assert!(matches!(clients[0].call(request).await.unwrap(), Response::Committed { .. }));
    crate::harness::eventually("n2 holds the write", || async {
        match clients[1].call(Request::Get { group: "app".into(), key: "k".into() }).await {
            Ok(Response::Value { value: Some(value), .. }) if value == json!("kept") => Some(()),
            _ => None,
        }
    })
    .await;
    drop(clients);
    // Both stop; n2's group file is ruined from its header on (unreadable, not a torn tail).
    nodes[0].kill9();
    nodes[1].kill9();
    let file = nodes[1].group_file("app");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..16].copy_from_slice(b"not a group file");
    std::fs::write(&file, &bytes).unwrap();
    // n2 starts alone: it quarantines the file and cannot repair it (nobody holds the group).
    nodes[1].start();
    let n2 = nodes[1].client().await;
    let missing = n2.call(Request::Get { group: "app".into(), key: "k".into() }).await;
    assert!(missing.is_err(), "the ruined group is not served: {missing:?}");
    assert!(!file.exists(), "the unreadable file was moved to quarantine");
    drop(n2);
    // n2 restarts, still alone; then n1 returns: the repair resumes and n2 holds the group again.
    nodes[1].kill9_and_restart();
    let n2 = nodes[1].client().await;
    nodes[0].start();
    let _n1 = nodes[0].client().await;
    crate::harness::eventually("n2 repaired app from n1", || async {
        match n2.call(Request::Get { group: "app".into(), key: "k".into() }).await {
            Ok(Response::Value { value: Some(value), .. }) if value == json!("kept") => Some(()),
            _ => None,
        }
    })
    .await;
}
