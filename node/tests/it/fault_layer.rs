//! konord's fault layer (the chaos suite's delay, reordering, duplication and slow disk, for a
//! kernel without netem): a konord started with a control file slows what the file says, and
//! nothing once the file is emptied.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use konor_node::fault_layer::applied_path;
use konor_sdk::Client;
use konor_sdk::protocol::{Request, Response, WriteMeta};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{Cluster, eventually, group_on_all};

/// Writes `key` on `client`'s node and returns how long the commit took.
async fn timed_write(client: &Client, key: &str) -> Duration {
    let started = Instant::now();
    let request = Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([(key.to_owned(), json!(1))]),
        meta: WriteMeta { author: "it".into(), message: String::new() },
    };
    let answer = client.call(request).await.unwrap();
    assert!(matches!(answer, Response::Committed { .. }), "{answer:?}");
    started.elapsed()
}

/// Sets the control file and waits for konord's acknowledgement.
async fn set_faults(control: &Path, text: &str) {
    std::fs::write(control, text).unwrap();
    eventually("konord acknowledges its fault settings", || async {
        std::fs::read_to_string(applied_path(control)).is_ok_and(|applied| applied == text).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_layer_slows_the_disk_and_the_peer_traffic_its_file_names() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let c1 = n1.client().await;
    let mut n2 = cluster.node("n2", &[&n1]);
    let control = cluster.dir.path().join("n2-faults");
    n2.fault_control = Some(control.clone());
    n2.start();
    let c2 = n2.client().await;
    let clients = [c1, c2];
    group_on_all(&clients, "app", "eventual").await;
    timed_write(&clients[1], "warm").await;

    // A slow disk: n2's own write waits for its fsync.
    set_faults(&control, "fsync_delay=400ms").await;
    let slow = timed_write(&clients[1], "on-a-slow-disk").await;
    assert!(slow >= Duration::from_millis(400), "n2's write took {slow:?} on a disk with 400 ms fsyncs");

    // A slow link: n1's write waits for n2's ack (a live quorum of two), which leaves n2
    // through its delayed egress.
    set_faults(&control, "delay=300ms").await;
    let delayed = timed_write(&clients[0], "over-a-slow-link").await;
    assert!(delayed >= Duration::from_millis(300), "n1's write took {delayed:?} with n2's egress 300 ms late");

    // Emptied, the file heals both (acknowledged as such), and the mesh stays whole.
    set_faults(&control, "").await;
    timed_write(&clients[0], "healed").await;
    for client in &clients {
        eventually("both nodes hold every write", || async {
            match client.call(Request::Get { group: "app".into(), key: "healed".into() }).await {
                Ok(Response::Value { value: Some(_), .. }) => Some(()),
                _ => None,
            }
        })
        .await;
    }
}
