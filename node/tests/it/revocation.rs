//! Certificate revocation on real konords (issue 17, item 2): `konorctl cert revoke` on one node
//! cuts the revoked node off from every node while it keeps running and retrying (its open
//! connections closed, its handshakes refused both ways, its gossip dropped), a revoked
//! operator's HTTP connection is closed and its next handshake refused, the revocation
//! survives a restart, and one signed by another cluster's CA is refused.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use konor_sdk::protocol::{Request, Response, WriteMeta};
use serde_json::{Value, json};

use crate::harness::{Cluster, eventually, group_on_all, konorctl, konorctl_on, node_states, ok_json, start_mesh_with};

/// How soon every node must hold a node revoked on one of them dead: the revocation's gossip
/// (a few 100 ms rounds here, plus a 500 ms read) and the failure detector's judgement of a
/// node whose heartbeat stopped (operations.md, "Revoking a certificate").
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

/// A QUIC endpoint that dials with the credentials in `tls_dir`, as a konord would.
fn dialer(tls_dir: &std::path::Path) -> quinn::Endpoint {
    let identity = konor_node::pki::identity::load_identity(tls_dir).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(konor_node::peer::tls::client_config(&identity).unwrap());
    endpoint
}

/// Whether `addr` refuses a handshake from `endpoint`'s certificate. The client side of a TLS 1.3
/// handshake completes before the server has checked the client's certificate, so a refusal is
/// a connection closed at once with a TLS alert (QUIC crypto error 0x100-0x1ff).
async fn handshake_refused(endpoint: &quinn::Endpoint, addr: std::net::SocketAddr) -> bool {
    let connection = match endpoint.connect(addr, konor_node::pki::SERVER_NAME).unwrap().await {
        Ok(connection) => connection,
        Err(_) => return true,
    };
    match tokio::time::timeout(Duration::from_secs(5), connection.closed()).await {
        Ok(quinn::ConnectionError::ConnectionClosed(close)) => (0x100..0x200).contains(&u64::from(close.error_code)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_while_it_runs_and_stays_out_after_a_restart() {
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = start_mesh_with(&cluster, 3, |node| node.http = node.id == "n1").await;
    group_on_all(&clients, "app", "eventual").await;
    let n1_addr: std::net::SocketAddr = nodes[0].addr().parse().unwrap();

    // An operator with a certificate uses n1's HTTP API; n3's key holds a connection of its own.
    let ops = cluster.dir.path().join("ops");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "ops", &ops).unwrap();
    let endpoint = nodes[0].http_endpoint();
    let ops_call = |args: &[&str]| {
        let mut all = vec!["--endpoint", endpoint.as_str(), "--tls-dir", ops.to_str().unwrap(), "--output", "json"];
        all.extend_from_slice(args);
        konorctl(&all)
    };
    ok_json(&ops_call(&["cert", "revocations"]));
    let n3_key = dialer(&nodes[2].tls_dir);
    let held_open = n3_key.connect(n1_addr, konor_node::pki::SERVER_NAME).unwrap().await.expect("n3 may connect");

    // Another cluster's CA signs nothing here: refused, nothing changes.
    let other = tempfile::tempdir().unwrap();
    konor_node::pki::ca::init_ca(other.path()).unwrap();
    let forged = konorctl_on(&nodes[0].socket, &["cert", "revoke", "n2", "--ca-dir", other.path().to_str().unwrap()]);
    assert!(!forged.status.success());
    let stderr = String::from_utf8_lossy(&forged.stderr);
    assert!(stderr.contains("not signed by this cluster's CA"), "{stderr}");

    let started = Instant::now();
    let ca_dir = cluster.ca_dir.to_str().unwrap();
    let revoked = konorctl_on(
        &nodes[0].socket,
        &["--output", "json", "cert", "revoke", "n3", "--ca-dir", ca_dir, "--reason", "it"],
    );
    let answer = ok_json(&revoked);
    assert_eq!(answer["type"], "revoked", "{answer}");
    assert_eq!(answer["new"], true, "{answer}");

    // n1 closes the connection n3's key held open, and refuses a new one.
    let closed = tokio::time::timeout(CUT_OFF_BOUND, held_open.closed()).await.expect("closed by n1");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(close) if close.error_code == 5u32.into()),
        "{closed:?}"
    );
    assert!(handshake_refused(&n3_key, n1_addr).await, "a revoked certificate completed a handshake");

    // n1 (where it entered) and n2 (by gossip) both hold n3 dead, within the bound.
    eventually("n1 and n2 hold n3 dead", || async {
        let on_n1 = state_of(&clients[0], "n3").await?;
        let on_n2 = state_of(&clients[1], "n3").await?;
        (on_n1 == "dead" && on_n2 == "dead").then_some(())
    })
    .await;
    let cut_off = started.elapsed();
    assert!(cut_off < CUT_OFF_BOUND, "n3 was cut off after {cut_off:?}");
    eprintln!("n3 held dead by n1 and n2 {} ms after the revocation", cut_off.as_millis());
    // n2 learned it from gossip and holds it itself.
    let listed = ok_json(&konorctl_on(&nodes[1].socket, &["--output", "json", "cert", "revocations"]));
    assert_eq!(listed["revocations"][0]["node"], "n3", "{listed}");

    // n3 runs on and sees everyone gone: its handshakes are refused both ways.
    eventually("n3 holds n1 and n2 dead", || async {
        let n1 = state_of(&clients[2], "n1").await?;
        let n2 = state_of(&clients[2], "n2").await?;
        (n1 == "dead" && n2 == "dead").then_some(())
    })
    .await;
    // What n3 writes now reaches no one, while n1's writes reach n2.
    let _ = tokio::time::timeout(Duration::from_secs(3), clients[2].call(set("from-n3", json!(3)))).await;
    let written = clients[0].call(set("from-n1", json!(1))).await.unwrap();
    assert!(matches!(written, Response::Committed { .. }), "{written:?}");
    eventually("n2 holds n1's write", || async {
        (clients[1].get("app", "from-n1").await.ok().flatten() == Some(json!(1))).then_some(())
    })
    .await;
    for client in &clients[..2] {
        assert_eq!(client.get("app", "from-n3").await.unwrap(), None, "a revoked node's write was applied");
    }

    // A revoked operator's HTTP connection: its next handshake is refused.
    let revoked_ops = konorctl_on(&nodes[1].socket, &["--output", "json", "cert", "revoke", "ops", "--ca-dir", ca_dir]);
    ok_json(&revoked_ops);
    eventually("n1 refuses the revoked operator over HTTP", || async {
        (!ops_call(&["cert", "revocations"]).status.success()).then_some(())
    })
    .await;

    // n1 restarts: it reads the revocations back before its first handshake and keeps n3 out.
    nodes[0].stop();
    nodes[0].start();
    clients[0] = nodes[0].client().await;
    let listed = ok_json(&konorctl_on(&nodes[0].socket, &["--output", "json", "cert", "revocations"]));
    assert_eq!(listed["revocations"].as_array().map(Vec::len), Some(2), "{listed}");
    let n1_addr: std::net::SocketAddr = nodes[0].addr().parse().unwrap();
    assert!(handshake_refused(&n3_key, n1_addr).await, "a revoked certificate completed a handshake after a restart");
    eventually("n1 sees n2 live after its restart", || async {
        (state_of(&clients[0], "n2").await.as_deref() == Some("live")).then_some(())
    })
    .await;
    let written = clients[0].call(set("after-restart", json!(1))).await.unwrap();
    assert!(matches!(written, Response::Committed { .. }), "{written:?}");
    eventually("n2 holds n1's write after the restart", || async {
        (clients[1].get("app", "after-restart").await.ok().flatten() == Some(json!(1))).then_some(())
    })
    .await;
    assert_ne!(state_of(&clients[0], "n3").await.as_deref(), Some("live"));
    assert_eq!(clients[0].get("app", "from-n3").await.unwrap(), None);
}
