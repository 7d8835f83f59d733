//! Certificate revocation on real konords (issue 17, item 2): `konorctl cert revoke` on one node
//! cuts the revoked node off from every node while it keeps running and retrying (its
//! connections closed, its handshakes refused both ways, its gossip dropped), the revocation
//! survives a restart, and one signed by another cluster's CA is refused.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use konor_sdk::protocol::{Request, WriteMeta};
use serde_json::{Value, json};

use crate::harness::{Cluster, eventually, group_on_all, konorctl_on, node_states, ok_json, start_mesh};

/// How soon every node must refuse a node revoked on one of them: the revocation's gossip
/// (a few 100 ms rounds here) plus the failure detector's judgement of a node whose heartbeat
/// stopped (operations.md, "Revoking a certificate").
const CUT_OFF_BOUND: Duration = Duration::from_secs(10);

fn set(key: &str, value: Value) -> Request {
    Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([(key.to_owned(), value)]),
        meta: WriteMeta { author: "it".into(), message: "test".into(), ..WriteMeta::default() },
    }
}

async fn state_of(client: &konor_sdk::Client, node: &str) -> Option<String> {
    node_states(client).await?.get(node).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_while_it_runs_and_stays_out_after_a_restart() {
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "app", "eventual").await;

    // Another cluster's CA signs nothing here: refused, nothing changes.
    let other = tempfile::tempdir().unwrap();
    konor_node::pki::ca::init_ca(other.path()).unwrap();
    let forged = konorctl_on(&nodes[0].socket, &["cert", "revoke", "n2", "--ca-dir", other.path().to_str().unwrap()]);
    assert!(!forged.status.success());
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(stderr.contains("not signed by this cluster's CA"), "{stderr}");

    let started = Instant::now();
    let revoked = konorctl_on(
        &nodes[0].socket,
        &["--output", "json", "cert", "revoke", "n3", "--ca-dir", cluster.ca_dir.to_str().unwrap(), "--reason", "it"],
    );
    let answer = ok_json(&revoked);
    assert_eq!(answer["type"], "revoked", "{answer}");
    assert_eq!(answer["new"], true, "{answer}");

    // n1 (where it entered) and n2 (by gossip) both hold n3 dead, within the bound.
    eventually("n1 and n2 hold n3 dead", || async {
        let on_n1 = state_of(&clients[0], "n3").await;
        let on_n2 = state_of(&clients[1], "n3").await;
        (on_n1.as_deref() != Some("live") && on_n2.as_deref() != Some("live")).then_some(())
    })
    .await;
    let cut_off = started.elapsed();
    assert!(cut_off < CUT_OFF_BOUND, "n3 was cut off after {cut_off:?}");
    eprintln!("n3 cut off by n1 and n2 after {} ms", cut_off.as_millis());
    // n2 learned it from gossip and holds it itself.
    let listed = konorctl_on(&nodes[1].socket, &["--output", "json", "cert", "revocations"]);
    let listed = ok_json(&listed);
    assert_eq!(listed["revocations"][0]["node"], "n3", "{listed}");

    // n3 runs on and sees everyone gone: its handshakes are refused both ways.
    eventually("n3 holds n1 and n2 dead", || async {
        let n1 = state_of(&clients[2], "n1").await;
        let n2 = state_of(&clients[2], "n2").await;
        (n1.as_deref() != Some("live") && n2.as_deref() != Some("live")).then_some(())
    })
    .await;
    // What n3 writes now reaches no one, while n1's writes reach n2.
    let _ = tokio::time::timeout(Duration::from_secs(3), clients[2].call(set("from-n3", json!(3)))).await;
    clients[0].call(set("from-n1", json!(1))).await.unwrap();
    eventually("n2 holds n1's write", || async {
        (clients[1].get("app", "from-n1").await.ok().flatten() == Some(json!(1))).then_some(())
    })
    .await;
    for client in &clients[..2] {
        assert_eq!(client.get("app", "from-n3").await.unwrap(), None, "a revoked node's write was applied");
    }

    // n1 restarts: it reads the revocation back before its first handshake and keeps n3 out.
    nodes[0].stop();
    nodes[0].start();
    clients[0] = nodes[0].client().await;
    let listed = konorctl_on(&nodes[0].socket, &["--output", "json", "cert", "revocations"]);
    let listed = ok_json(&listed);
    assert_eq!(listed["revocations"][0]["node"], "n3", "{listed}");
    eventually("n1 sees n2 live after its restart", || async {
        (state_of(&clients[0], "n2").await.as_deref() == Some("live")).then_some(())
    })
    .await;
    let written = clients[0].call(set("after-restart", json!(1))).await.unwrap();
    assert!(matches!(written, konor_sdk::protocol::Response::Committed { .. }), "{written:?}");
    eventually("n2 holds n1's write after the restart", || async {
        (clients[1].get("app", "after-restart").await.ok().flatten() == Some(json!(1))).then_some(())
    })
    .await;
    assert_ne!(state_of(&clients[0], "n3").await.as_deref(), Some("live"));
    assert_eq!(clients[0].get("app", "from-n3").await.unwrap(), None);
}
