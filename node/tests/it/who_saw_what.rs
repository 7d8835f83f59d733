//! Who saw what, mesh-wide (issue 16, SPEC F16 and F28), on real konords: a process's apply
//! report on one node is shown by `status` on every node; when the process goes away its row
//! stays as history, and that history outlives a restart of its node.

use konor_sdk::protocol::{ApplyResult, ProcessRow, Request, Response};

use crate::harness::{Cluster, eventually, group_on_all, start_mesh};

/// The row of process `pid` on `node` in `status app`, as `client`'s node shows it.
async fn row_of(client: &konor_sdk::Client, node: &str, pid: u32) -> Option<ProcessRow> {
    match client.call(Request::Status { group: "app".into() }).await {
        Ok(Response::Status { processes, .. }) => processes.into_iter().find(|p| p.node == node && p.pid == pid),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_shows_every_nodes_processes_and_their_history_outlives_a_restart() {
    let cluster = Cluster::new();
    let (mut nodes, clients) = start_mesh(&cluster, 2).await;
    group_on_all(&clients, "app", "eventual").await;
    let (c1, c2) = (clients[0].clone(), clients[1].clone());
    drop(clients);

    // A process on n2 reports a failed apply; n1 shows it, tagged with n2, while it lives.
    let reporter = konor_sdk::Client::connect(&nodes[1].socket).await.unwrap();
    let pid = std::process::id();
    let report = Request::ReportApply {
        group: "app".into(),
        version: "v1".into(),
        revision: 1,
        result: ApplyResult::Error { message: "pool must be at most 16".into() },
    };
    assert_eq!(reporter.call(report).await.unwrap(), Response::Done);
    let seen = eventually("n1 shows n2's process", || async {
        row_of(&c1, "n2", pid).await.filter(|row| row.gone_ms.is_none())
    })
    .await;
    assert_eq!(seen.result, ApplyResult::Error { message: "pool must be at most 16".into() });
    assert_eq!(seen.version, "v1");

    // The process goes away: its row is history on both nodes, not dropped.
    drop(reporter);
    eventually("n1 shows the process as gone", || async {
        row_of(&c1, "n2", pid).await.filter(|row| row.gone_ms.is_some())
    })
    .await;

    // n2 restarts: the history was saved, comes back, and is gossiped again.
    drop(c2);
    nodes[1].stop();
    nodes[1].start();
    let c2 = nodes[1].client().await;
    let restored = eventually("n2 shows the history it saved", || async { row_of(&c2, "n2", pid).await }).await;
    assert!(restored.gone_ms.is_some(), "{restored:?}");
    assert_eq!(restored.result, ApplyResult::Error { message: "pool must be at most 16".into() });
    eventually("n1 shows n2's history after n2's restart", || async {
        row_of(&c1, "n2", pid).await.filter(|row| row.gone_ms.is_some())
    })
    .await;
}
