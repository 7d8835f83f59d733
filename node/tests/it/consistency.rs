//! Consistency on real daemons: eventual commits on a live quorum, strong rounds that are
//! visible everywhere or nowhere, and a coordinator killed mid-round never splitting a group.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use konor_sdk::client::{Client, SdkError};
use konor_sdk::protocol::{ErrorCode, Request, Response, WriteMeta};
use serde_json::{Value, json};

use crate::harness::{Cluster, eventually, group_on_all, live_nodes, start_mesh};

fn set(key: &str, value: Value) -> Request {
    Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([(key.to_owned(), value)]),
        meta: WriteMeta { author: "it".into(), message: String::new(), ..WriteMeta::default() },
    }
}

async fn status(client: &Client) -> Option<(Vec<String>, usize, bool, BTreeSet<String>)> {
    match client.call(Request::Status { group: "app".into() }).await.ok()? {
        Response::Status { live, quorum, fenced, nodes, .. } => {
            Some((live, quorum, fenced, nodes.into_iter().map(|n| n.heads).collect()))
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eventual_write_commits_with_two_acks_when_one_of_three_is_down() {
    let cluster = Cluster::new();
    let (mut nodes, clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "app", "eventual").await;
    nodes[2].kill9();
    eventually("n1 holds n3 dead", || async {
        let (live, quorum, _, _) = status(&clients[0]).await?;
        (live == ["n1", "n2"] && quorum == 2).then_some(())
    })
    .await;
    let committed = clients[0].call(set("k", json!(1))).await.unwrap();
    let Response::Committed { acked_by, .. } = committed else { panic!("{committed:?}") };
    assert_eq!(acked_by, vec!["n1".to_owned(), "n2".to_owned()]);
    let Some((_, _, _, _)) = status(&clients[0]).await else { panic!() };
    let Ok(Response::Status { last_write, .. }) = clients[0].call(Request::Status { group: "app".into() }).await else {
        panic!()
    };
    assert_eq!(last_write.map(|(_, acked)| acked), Some(vec!["n1".to_owned(), "n2".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_write_with_a_paused_member_aborts_everywhere_then_commits_after_it_resumes() {
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "app", "strong").await;
    let first = clients[0].call(set("limit", json!(1))).await;
    assert!(first.is_ok(), "{first:?}");
    for client in &clients {
        eventually("v1 everywhere", || async { (client.get("app", "limit").await.ok()?? == json!(1)).then_some(()) })
            .await;
    }
    nodes[2].pause();
    let error = clients[0].call(set("limit", json!(2))).await.unwrap_err();
    assert!(matches!(error, SdkError::Daemon { code: ErrorCode::Aborted, .. }), "{error}");
    assert!(error.to_string().contains("n3"), "the error names the member that blocked: {error}");
    for client in &clients[..2] {
        assert_eq!(client.get("app", "limit").await.unwrap(), Some(json!(1)), "nothing visible after an abort");
    }
    nodes[2].resume();
    assert_eq!(clients[2].get("app", "limit").await.unwrap(), Some(json!(1)), "nor on the paused member");
    // Retry until the round goes through (the resumed member may still be finishing the old
    // round, or be briefly held dead by the others): then it is visible everywhere.
    eventually("the retry commits", || async {
        match clients[0].call(set("limit", json!(2))).await {
            Ok(Response::Committed { .. }) => Some(()),
            _ => None,
        }
    })
    .await;
    for client in &clients {
        eventually("v2 everywhere", || async { (client.get("app", "limit").await.ok()?? == json!(2)).then_some(()) })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_coordinator_mid_round_never_splits_the_group() {
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "app", "strong").await;
    clients[0].call(set("k", json!("before"))).await.unwrap();
    // Fire a write and kill its coordinator while the round runs.
    let writer = {
        let client = clients[0].clone();
        tokio::spawn(async move { client.call(set("k", json!("during"))).await })
    };
    nodes[0].kill9();
    let _ = writer.await;
    nodes[0].start();
    clients[0] = nodes[0].client().await;
    let expected: Vec<String> = vec!["n1".into(), "n2".into(), "n3".into()];
    eventually("the mesh is whole again", || async { (live_nodes(&clients[0]).await == expected).then_some(()) }).await;
    // Every node ends with the same committed state, none fenced.
    let client = clients[0].clone();
    eventually("identical state, nobody in doubt", || async {
        let mut values = BTreeSet::new();
        for c in &clients {
            let (_, _, fenced, heads) = status(c).await?;
            if fenced || heads.len() != 1 {
                return None;
            }
            values.insert(c.get("app", "k").await.ok()??.to_string());
        }
        (values.len() == 1).then_some(())
    })
    .await;
    let value = client.get("app", "k").await.unwrap().unwrap();
    assert!(value == json!("before") || value == json!("during"), "{value}");
}

/// SPEC F12, the `block` fencing policy: a strong-group read that cannot be proven fresh waits
/// (bounded) instead of answering stale, fails with `unavailable` when it stays unprovable, and
/// answers fresh again once the node holds a lease from a majority.
#[tokio::test]
async fn a_block_group_holds_reads_it_cannot_prove_fresh() {
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 2).await;
    let created = clients[0]
        .call(Request::GroupCreate {
            name: "ledger".into(),
            mode: "strong".into(),
            key: None,
            evict_after_ms: None,
            fencing: Some("block".into()),
            release: None,
        })
        .await
        .unwrap();
    let Response::GroupCreated { key, .. } = created else { panic!("{created:?}") };
    let joined = clients[1].call(Request::GroupJoin { name: "ledger".into(), key }).await.unwrap();
    assert!(matches!(joined, Response::Joined { .. }), "{joined:?}");
    let get = || Request::Get { group: "ledger".into(), key: "k".into() };
    eventually("n1 reads ledger fresh", || async {
        match clients[0].call(get()).await {
            Ok(Response::Value { freshness, .. }) if !freshness.stale => Some(()),
            _ => None,
        }
    })
    .await;
    // n2 stops: n1's lease (a majority of two is both) runs out, and reads wait, then fail.
    nodes[1].pause();
    let asked = std::time::Instant::now();
    let answer = eventually("a read of ledger on n1 is refused as unprovable", || async {
        match clients[0].call(get()).await {
            Err(SdkError::Daemon { code: ErrorCode::Unavailable, message }) => Some(message),
            Ok(Response::Value { freshness, .. }) => {
                assert!(!freshness.stale, "a block group never answers stale: {freshness:?}");
                None
            }
            _ => None,
        }
    })
    .await;
    assert!(answer.contains("fencing policy is block"), "{answer}");
    assert!(asked.elapsed() >= Duration::from_secs(5), "the read waited for freshness first");
    // n2 back: fresh reads again, without a stale answer in between.
    nodes[1].resume();
    eventually("n1 reads ledger fresh again", || async {
        match clients[0].call(get()).await {
            Ok(Response::Value { freshness, .. }) => {
                assert!(!freshness.stale, "a block group never answers stale: {freshness:?}");
                Some(())
            }
            _ => None,
        }
    })
    .await;
}
