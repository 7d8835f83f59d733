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
