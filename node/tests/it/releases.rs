//! Releases, first step (issue 16, SPEC F14), on real konords: in a gated group a write is
//! written and spreads as always but is served (`get`, snapshots, watches) only once `konorctl
//! release` targets it, on every node; `status` says what is served and what waits; a release
//! in a strong group commits through a round; an immediate group refuses releases; the HTTP
//! door releases too.

use std::process::{Command, Output};
use std::time::Duration;

use konor_sdk::protocol::{Request, Response, WatchEvent};
use serde_json::{Value, json};

use crate::harness::{Cluster, DEADLINE, eventually, gated_group_on_all, group_on_all, start_mesh};

fn konorctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_konorctl"))
        .args(args)
        .env_remove("KONOR_SOCKET")
        .env_remove("KONOR_ENDPOINT")
        .env_remove("KONOR_TLS_DIR")
        .output()
        .unwrap()
}

fn ok_json(output: &Output) -> Value {
    assert!(output.status.success(), "konorctl failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn on(socket: &str, args: &[&str]) -> Output {
    let mut all = vec!["--socket", socket, "--output", "json"];
    all.extend_from_slice(args);
    konorctl(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_group_serves_a_write_only_once_released_on_every_node() {
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 3).await;
    gated_group_on_all(&clients, "rel", "eventual").await;
    group_on_all(&clients, "plain", "eventual").await;
    let sockets: Vec<String> = nodes.iter().map(|n| n.socket.to_str().unwrap().to_owned()).collect();
    let mut watch = clients[2].watch("rel", None).await.unwrap();

    // Written on n2 and held by every node, but served by none.
    let written = ok_json(&on(&sockets[1], &["set", "rel", "db.pool=10", "db.host=a"]));
    assert_eq!(written["type"], "committed", "{written}");
    let label = written["version"].as_str().unwrap().to_owned();
    for socket in &sockets {
        eventually("every node holds the write", || async {
            let history = ok_json(&on(socket, &["history", "rel"]));
            history["versions"].as_array().unwrap().iter().any(|v| v["label"] == label.as_str()).then_some(())
        })
        .await;
        let served = ok_json(&on(socket, &["get", "rel"]));
        assert_eq!(served["settings"], json!({}), "{socket}: written, not released: {served}");
        let status = konorctl(&["--socket", socket, "status", "rel"]);
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            text.contains("release: none yet") && text.contains(&format!("{label} is written, not served here")),
            "{text}"
        );
    }

    // Released from n1: every node serves it, and the watcher on n3 hears it once, as that
    // version (nothing before: the write alone told it nothing).
    let released = ok_json(&on(&sockets[0], &["release", "rel", "--to", &label]));
    assert_eq!(released["type"], "committed", "{released}");
    for socket in &sockets {
        eventually("every node serves the release", || async {
            (ok_json(&on(socket, &["get", "rel"]))["settings"] == json!({"db.pool": 10, "db.host": "a"})).then_some(())
        })
        .await;
    }
    let event = tokio::time::timeout(DEADLINE, watch.next()).await.unwrap().unwrap().unwrap();
    let WatchEvent::Change { version, set, removed, .. } = &event else { panic!("{event:?}") };
    assert_eq!(version, &label, "the event names the released version: {event:?}");
    assert_eq!(serde_json::to_value(set).unwrap(), json!({"db.pool": 10, "db.host": "a"}));
    assert!(removed.is_empty());

    // A later write waits again; status names the release in force on every node.
    ok_json(&on(&sockets[2], &["set", "rel", "db.pool=20"]));
    let status = konorctl(&["--socket", &sockets[1], "status", "rel"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("to {label}")) && text.contains(&format!("served here: {label}")), "{text}");
    let json_status = ok_json(&on(&sockets[1], &["status", "rel"]));
    assert_eq!(json_status["release"]["current"]["to"], label.as_str(), "{json_status}");
    assert_eq!(json_status["release"]["current"]["strategy"], "all");
    assert_eq!(ok_json(&on(&sockets[0], &["get", "rel", "db.pool"]))["value"], 10);
    let quiet = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
    assert!(quiet.is_err(), "an unreleased write told the watcher something: {quiet:?}");

    // Releasing an older version is how a release is rolled back; the same release twice is
    // no change; an immediate group refuses releases.
    let again = konorctl(&["--socket", &sockets[0], "release", "rel", "--to", &label]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("no change"), "{again:?}");
    let plain = ok_json(&on(&sockets[0], &["set", "plain", "a=1"]));
    let refused = konorctl(&["--socket", &sockets[0], "release", "plain", "--to", plain["version"].as_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("gated"), "{refused:?}");
    let first = ok_json(&on(&sockets[0], &["history", "rel"]))["versions"][0]["label"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[2], &["release", "rel", "--to", &first, "-m", "back out"]));
    let event = tokio::time::timeout(DEADLINE, watch.next()).await.unwrap().unwrap().unwrap();
    let WatchEvent::Change { version, removed, .. } = &event else { panic!("{event:?}") };
    assert_eq!((version.as_str(), removed.len()), (first.as_str(), 2), "{event:?}");
    for client in &clients {
        eventually("every node serves the first version again", || async {
            match client.call(Request::Snapshot { group: "rel".into(), prefix: None }).await {
                Ok(Response::Snapshot { settings, freshness, .. }) => {
                    (settings.is_empty() && freshness.version == first).then_some(())
                }
                _ => None,
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strong_gated_group_releases_through_a_round_and_over_http() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.http = true;
    n1.start();
    let c1 = n1.client().await;
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.start();
    let c2 = n2.client().await;
    let nodes = [n1, n2];
    crate::harness::await_whole_mesh(&nodes, &[c1.clone(), c2.clone()]).await;
    gated_group_on_all(&[c1.clone(), c2.clone()], "srel", "strong").await;
    let s2 = nodes[1].socket.to_str().unwrap().to_owned();
    let written = ok_json(&on(&s2, &["set", "srel", "limit=5"]));
    let label = written["version"].as_str().unwrap().to_owned();
    assert_eq!(ok_json(&on(&s2, &["get", "srel"]))["settings"], json!({}), "a strong write waits too");

    let ops = cluster.dir.path().join("ops");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "ops-alice", &ops).unwrap();
    let endpoint = nodes[0].http_endpoint();
    let remote = |args: &[&str]| {
        let mut all = vec!["--endpoint", endpoint.as_str(), "--tls-dir", ops.to_str().unwrap(), "--output", "json"];
        all.extend_from_slice(args);
        konorctl(&all)
    };
    let released = ok_json(&remote(&["release", "srel", "--to", &label]));
    assert_eq!(released["type"], "committed", "{released}");
    // A strong release is committed on every member before it is answered.
    for client in [&c1, &c2] {
        match client.call(Request::Snapshot { group: "srel".into(), prefix: None }).await.unwrap() {
            Response::Snapshot { settings, freshness, .. } => {
                assert_eq!(serde_json::to_value(&settings).unwrap(), json!({"limit": 5}));
                assert_eq!(freshness.version, label);
            }
            other => panic!("{other:?}"),
        }
    }
    let history = ok_json(&remote(&["history", "srel"]));
    let last = history["versions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["kind"].as_str(), last["message"].as_str()),
        (Some("release"), Some(&*format!("release {label}")))
    );
}

/// A canary by label selector on real konords: only the nodes whose `--label` matches serve
/// the release, `status` says which side of the slice each node is on, a promotion past the last
/// wave is refused, and an abort moves every node back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_by_selector_reaches_only_matching_nodes_and_an_abort_moves_them_back() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.extra_args = vec!["--label".into(), "region=eu".into()];
    n1.start();
    let c1 = n1.client().await;
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.extra_args = vec!["--label".into(), "region=eu".into()];
    n2.start();
    let c2 = n2.client().await;
    let mut n3 = cluster.node("n3", &[&n1]);
    n3.extra_args = vec!["--label".into(), "region=us".into()];
    n3.start();
    let c3 = n3.client().await;
    let nodes = [n1, n2, n3];
    let clients = [c1, c2, c3];
    crate::harness::await_whole_mesh(&nodes, &clients).await;
    gated_group_on_all(&clients, "can", "eventual").await;
    let sockets: Vec<String> = nodes.iter().map(|n| n.socket.to_str().unwrap().to_owned()).collect();
    let base = ok_json(&on(&sockets[0], &["set", "can", "limit=1"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "can", "--to", &base]));
    let next = ok_json(&on(&sockets[0], &["set", "can", "limit=2"]))["version"].as_str().unwrap().to_owned();
    let mut watch_us = clients[2].watch("can", None).await.unwrap();

    let canary = ok_json(&on(
        &sockets[2],
        &[
            "release",
            "can",
            "--to",
            &next,
            "--strategy",
            "canary",
            "--waves",
            "100",
            "--selector",
            "region=eu",
            "--bake",
            "5m",
        ],
    ));
    assert_eq!(canary["type"], "committed", "{canary}");
    for (socket, expected) in sockets.iter().zip([2, 2, 1]) {
        eventually("each node serves its side of the canary", || async {
            let status = ok_json(&on(socket, &["status", "can"]));
            let known = status["release"]["current"]["label"] == canary["version"];
            (known && ok_json(&on(socket, &["get", "can", "limit"]))["value"] == expected).then_some(())
        })
        .await;
    }
    let eu = String::from_utf8_lossy(&konorctl(&["--socket", &sockets[0], "status", "can"]).stdout).into_owned();
    assert!(
        eu.contains("wave 1 of 1 (100% of the matching members)") && eu.contains("this node is in the slice"),
        "{eu}"
    );
    assert!(!eu.contains("promote"), "nothing to promote at the last wave: {eu}");
    let us = String::from_utf8_lossy(&konorctl(&["--socket", &sockets[2], "status", "can"]).stdout).into_owned();
    assert!(us.contains("this node is not in the slice"), "{us}");
    let quiet = tokio::time::timeout(Duration::from_millis(300), watch_us.next()).await;
    assert!(quiet.is_err(), "n3's app was told of a canary it is not in: {quiet:?}");

    // Nothing to promote past the last wave; an abort sends every node back.
    let refused = konorctl(&["--socket", &sockets[1], "promote", "can"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("last wave"), "{refused:?}");
    let aborted = ok_json(&on(&sockets[1], &["abort", "can", "--reason", "error rate"]));
    assert_eq!(aborted["type"], "committed");
    for socket in &sockets {
        eventually("every node serves the base again", || async {
            (ok_json(&on(socket, &["get", "can", "limit"]))["value"] == 1).then_some(())
        })
        .await;
    }
    let after = String::from_utf8_lossy(&konorctl(&["--socket", &sockets[2], "status", "can"]).stdout).into_owned();
    assert!(after.contains("aborted: error rate"), "{after}");
    let history = ok_json(&on(&sockets[2], &["history", "can"]));
    let kinds: Vec<&str> =
        history["versions"].as_array().unwrap().iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds[kinds.len() - 2..], ["release", "abort"], "{kinds:?}");
}

/// Guards on real konords (SPEC F15): an application on one node that fails to apply the
/// released version (its `on_change` returned an error, reported to its konord) makes the
/// members abort the release by themselves, and every node goes back; a canary wave that holds
/// through its bake time is promoted by the members without an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_apply_aborts_a_release_and_a_wave_that_bakes_is_promoted_by_the_members() {
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 3).await;
    gated_group_on_all(&clients, "grd", "eventual").await;
    let sockets: Vec<String> = nodes.iter().map(|n| n.socket.to_str().unwrap().to_owned()).collect();
    let base = ok_json(&on(&sockets[0], &["set", "grd", "pool=8"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "grd", "--to", &base]));
    let bad = ok_json(&on(&sockets[0], &["set", "grd", "pool=800"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "grd", "--to", &bad]));
    eventually("n3 serves the bad version", || async {
        (ok_json(&on(&sockets[2], &["get", "grd", "pool"]))["value"] == 800).then_some(())
    })
    .await;
    // The app on n3 refuses it, as an SDK's on_change reports a callback's error.
    let report = Request::ReportApply {
        group: "grd".into(),
        version: bad.clone(),
        revision: 0,
        result: konor_sdk::protocol::ApplyResult::Error { message: "pool must be at most 16".into() },
    };
    assert!(matches!(clients[2].call(report).await.unwrap(), Response::Done));
    for socket in &sockets {
        eventually("every node aborted the release and serves the base again", || async {
            let status = ok_json(&on(socket, &["status", "grd"]));
            let aborted = status["release"]["current"]["aborted"].as_str().unwrap_or_default().to_owned();
            let back = ok_json(&on(socket, &["get", "grd", "pool"]))["value"] == 8;
            (back && aborted.contains("pool must be at most 16") && aborted.contains("n3")).then_some(())
        })
        .await;
    }
    let history = ok_json(&on(&sockets[0], &["history", "grd"]));
    let abort = history["versions"].as_array().unwrap().iter().rev().find(|v| v["kind"] == "abort").unwrap().clone();
    assert!(abort["author"].as_str().unwrap().starts_with("konord@"), "written by a member: {abort}");

    // A canary whose first wave holds through a one-second bake is promoted to its last.
    let good = ok_json(&on(&sockets[1], &["set", "grd", "pool=12"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(
        &sockets[1],
        &["release", "grd", "--to", &good, "--strategy", "canary", "--waves", "1,100", "--bake", "1s"],
    ));
    for socket in &sockets {
        eventually("the members promote the canary once it baked", || async {
            let status = ok_json(&on(socket, &["status", "grd"]));
            let promoted = status["release"]["current"]["wave"] == 2;
            (promoted && ok_json(&on(socket, &["get", "grd", "pool"]))["value"] == 12).then_some(())
        })
        .await;
    }
}
