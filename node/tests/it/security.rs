//! Peers without a certificate from the cluster CA are refused; the socket is private.

use std::os::unix::fs::PermissionsExt;

use crate::harness::{Cluster, Node, eventually, live_nodes};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_never_joins() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let c1 = n1.client().await;
    // A rogue node with its own CA, seeded at n1.
    let rogue_base = cluster.dir.path().join("rogue");
    let rogue_ca = rogue_base.join("ca");
    konor_node::peer::tls::init_ca(&rogue_ca).unwrap();
    let rogue_tls = rogue_base.join("tls");
    konor_node::peer::tls::issue_node_cert(&rogue_ca, "rogue", &rogue_tls).unwrap();
    let mut rogue = Node::new("rogue", &rogue_base, rogue_tls, &[&n1]);
    rogue.start();
    let rogue_client = rogue.client().await;
    // A legitimate node seeded at n1 after the rogue: once n1 sees it, the rogue had as much
    // time to join as a real node needs.
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.start();
    let _c2 = n2.client().await;
    eventually("n2 joins n1", || async { live_nodes(&c1).await.contains(&"n2".to_owned()).then_some(()) }).await;
    assert!(!live_nodes(&c1).await.contains(&"rogue".to_owned()), "n1 must never list the rogue node");
    assert_eq!(live_nodes(&rogue_client).await, vec!["rogue".to_owned()], "the rogue sees nobody");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_only_for_its_owner() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let _client = n1.client().await;
    let mode = std::fs::metadata(&n1.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
