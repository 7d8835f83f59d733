//! Restarts as an operator does them (issue 12): SIGTERM and start again at once, on the same
//! ports and data dir, while the old konord is still announcing its leave.

use std::collections::BTreeMap;

use konor_sdk::protocol::{Request, Response, WriteMeta};
use serde_json::json;

use crate::harness::{Cluster, eventually, group_on_all, live_nodes, start_mesh};

/// The lines of `log` from byte `from` on that an operator would take for trouble.
fn alarming_lines(log: &std::path::Path, from: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap();
    text.get(from..)
        .unwrap_or_default()
        .lines()
        // A daemon thread held up for half a second on a loaded test machine says so, truly: that
        // is a stall of this machine, not an alarm raised by the restart.
        .filter(|line| !line.contains("this node was paused or stalled"))
        .filter(|line| {
            line.contains(" WARN ")
                || line.contains(" ERROR ")
                || line.contains("refused")
                || line.contains("in use")
                || line.starts_with("konord:")
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_right_after_sigterm_takes_the_same_ports_and_logs_nothing_alarming() {
    let cluster = Cluster::new();
    let (mut nodes, clients) = start_mesh(&cluster, 2).await;
    group_on_all(&clients, "app", "eventual").await;
    let set = Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([("db.pool".to_owned(), json!(10))]),
        meta: WriteMeta { author: "it".into(), message: "before the restarts".into(), ..WriteMeta::default() },
    };
    assert!(matches!(clients[0].call(set).await.unwrap(), Response::Committed { .. }));
    let address = nodes[1].addr();
    let log_start = std::fs::metadata(&nodes[1].log).unwrap().len() as usize;
    for round in 0..3 {
        let mut old = nodes[1].child.take().expect("running");
        let term = std::process::Command::new("kill").args(["-TERM", &old.id().to_string()]).status().unwrap();
        assert!(term.success());
        // At once: the old konord is still leaving, with its ports and data dir held.
        nodes[1].start();
        assert!(old.wait().unwrap().success(), "round {round}: the old konord stops cleanly");
        let client = nodes[1].client().await;
        assert_eq!(nodes[1].addr(), address, "round {round}: the same QUIC port");
        eventually("the restarted node sees its peer live and serves the group", || async {
            let live = live_nodes(&client).await == ["n1", "n2"];
            let value = client.call(Request::Get { group: "app".into(), key: "db.pool".into() }).await;
            (live && matches!(value, Ok(Response::Value { value: Some(_), .. }))).then_some(())
        })
        .await;
    }
    let alarming = alarming_lines(&nodes[1].log, log_start);
    assert!(alarming.is_empty(), "an ordinary restart logged: {alarming:#?}");
    let peer_alarming = alarming_lines(&nodes[0].log, 0);
    assert!(peer_alarming.is_empty(), "the peer of a restarting node logged: {peer_alarming:#?}");
}
