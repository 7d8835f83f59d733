//! Releases, first step (issue 16, SPEC F14), on real konords: in a gated group a write is
//! written and spreads as always but is served (`get`, snapshots, watches) only once `konorctl
//! release` targets it, on every node; `status` says what is served and what waits; a release
//! in a strong group commits through a round; an immediate group refuses releases; the HTTP
//! door releases too.

use std::process::Output;
use std::time::Duration;

use konor_sdk::protocol::{Request, Response, WatchEvent};
use serde_json::{Value, json};

use crate::harness::{
    App, Cluster, DEADLINE, eventually, gated_group_on_all, group_on_all, konorctl, ok_json, start_mesh,
};

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
    // A strong release commits on a majority of the configuration's records before it is
    // answered; a member the decision has not reached yet is in doubt, and says so (its reads
    // are flagged stale, never fresh with the old settings) until it arrives.
    for (node, client) in [("n1", &c1), ("n2", &c2)] {
        eventually(&format!("{node} serves the release"), || async {
            match client.call(Request::Snapshot { group: "srel".into(), prefix: None }).await.unwrap() {
                Response::Snapshot { settings, freshness, .. } if freshness.version == label => {
                    assert_eq!(serde_json::to_value(&settings).unwrap(), json!({"limit": 5}), "on {node}");
                    Some(())
                }
                Response::Snapshot { freshness, .. } => {
                    assert!(freshness.stale, "{node} answered an old version as fresh: {freshness:?}");
                    None
                }
                other => panic!("{other:?}"),
            }
        })
        .await;
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

/// The example app on real konords (issue 16): one node's app refuses a release's settings in
/// its reload callback; the members roll the release back by themselves; `release --wait`
/// says so (exit 7), and `status` and the release report on every node show the refusal, while
/// the release before it is complete with a time to consistency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_apps_failed_reload_rolls_a_release_back_and_every_node_reports_it() {
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 3).await;
    gated_group_on_all(&clients, "shop", "eventual").await;
    let sockets: Vec<String> = nodes.iter().map(|n| n.socket.to_str().unwrap().to_owned()).collect();
    let _apps = [
        App::start(&nodes[0], "shop", &[]),
        App::start(&nodes[1], "shop", &[]),
        App::start(&nodes[2], "shop", &[("KONOR_APP_MAX_WORKERS", "16")]),
    ];
    for socket in &sockets {
        eventually("every app reported its start", || async {
            let status = ok_json(&on(socket, &["status", "shop"]));
            let live = status["processes"].as_array().unwrap().iter().filter(|p| p.get("gone_ms").is_none()).count();
            (live == 3).then_some(())
        })
        .await;
    }

    // A release every app takes: --wait ends when every node's app applied it.
    let good = ok_json(&on(&sockets[0], &["set", "shop", "workers=8"]))["version"].as_str().unwrap().to_owned();
    let waited = on(&sockets[0], &["release", "shop", "--to", &good, "--wait", "--wait-timeout", "60s"]);
    assert_eq!(waited.status.code(), Some(0), "{}", String::from_utf8_lossy(&waited.stderr));
    let report = ok_json(&waited)["releases"][0].clone();
    assert_eq!(report["outcome"], "complete", "{report}");
    assert_eq!((report["processes_ok"].as_u64(), report["processes_failed"].as_u64()), (Some(3), Some(0)));
    assert_eq!(report["success_rate"], 1.0);
    assert!(report["time_to_consistency_ms"].as_u64().is_some(), "{report}");
    // Another node's health (and so its metrics) carries the same figures.
    eventually("n3's health shows the release complete", || async {
        let health = ok_json(&on(&sockets[2], &["health"]));
        let group = health["health"]["groups"].as_array()?.iter().find(|g| g["name"] == "shop")?.clone();
        let release = &group["release"];
        (release["outcome"] == "complete" && release["done"] == 3 && release["processes_ok"] == 3).then_some(())
    })
    .await;

    // A release n3's app refuses: the members abort it, --wait says so.
    let bad = ok_json(&on(&sockets[1], &["set", "shop", "workers=32"]))["version"].as_str().unwrap().to_owned();
    let waited = on(&sockets[1], &["release", "shop", "--to", &bad, "--wait", "--wait-timeout", "60s"]);
    assert_eq!(waited.status.code(), Some(7), "{}", String::from_utf8_lossy(&waited.stderr));
    let report: Value = serde_json::from_slice::<Value>(&waited.stdout).unwrap()["releases"][0].clone();
    assert_eq!(report["outcome"], "aborted", "{report}");
    let release = report["release"]["label"].as_str().unwrap().to_owned();
    assert!(report["release"]["aborted"].as_str().unwrap().contains("more than this app supports (16)"), "{report}");

    // Every node: back on the good version, the abort in status, the refusal in the report.
    for socket in &sockets {
        eventually("every node shows the rollback and the refusal", || async {
            let served = ok_json(&on(socket, &["get", "shop", "workers"]))["value"] == 8;
            let status =
                String::from_utf8_lossy(&konorctl(&["--socket", socket, "status", "shop"]).stdout).into_owned();
            let csv = konorctl(&["--socket", socket, "release", "report", "shop", "--format", "csv"]);
            let csv = String::from_utf8_lossy(&csv.stdout).into_owned();
            let refusal = csv.lines().find(|line| {
                line.starts_with(&format!("{release},")) && line.contains(",n3,") && line.contains(",error,")
            });
            (served && status.contains("aborted: ") && status.contains("(16)") && refusal.is_some())
                .then(|| (status, refusal.unwrap().to_owned()))
        })
        .await;
    }
    let jsonl = konorctl(&["--socket", &sockets[2], "release", "report", "shop", "--format", "jsonl"]);
    let rows: Vec<Value> =
        String::from_utf8_lossy(&jsonl.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let of_bad: Vec<&Value> = rows.iter().filter(|row| row["release"] == release.as_str()).collect();
    assert_eq!(of_bad.len(), 3, "a row per node's app: {of_bad:?}");
    assert!(of_bad.iter().all(|row| row["outcome"] == "aborted"));
    let refused: Vec<&&Value> = of_bad.iter().filter(|row| row["result"] == "error").collect();
    assert_eq!(refused.len(), 1, "{of_bad:?}");
    assert_eq!(refused[0]["node"], "n3");
    assert!(rows.iter().any(|row| row["to"] == good.as_str()), "the good release is in the report: {rows:?}");

    // The good release is in force again: every app re-applied it, each counted once.
    let again = eventually("the good release is complete again", || async {
        let report = ok_json(&on(&sockets[0], &["release", "report", "shop", "--limit", "2"]))["releases"][1].clone();
        (report["release"]["to"] == good.as_str() && report["outcome"] == "complete").then_some(report)
    })
    .await;
    assert_eq!((again["processes_ok"].as_u64(), again["processes_failed"].as_u64()), (Some(3), Some(0)), "{again}");
    let text = konorctl(&["--socket", &sockets[0], "release", "report", "shop", "--limit", "2"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("outcome: aborted; 2 of 3 targeted nodes done"), "{text}");
    assert!(text.contains("outcome: complete; 3 of 3 targeted nodes done; processes: 3 applied, 0 failed"), "{text}");

    // A new release of the version every node already serves: no app is told (nothing
    // changes), yet each runs it under the new release, which completes.
    let again = on(&sockets[2], &["release", "shop", "--to", &good, "-m", "again", "--wait", "--wait-timeout", "30s"]);
    assert_eq!(again.status.code(), Some(0), "{}", String::from_utf8_lossy(&again.stderr));
    let report = serde_json::from_slice::<Value>(&again.stdout).unwrap()["releases"][0].clone();
    assert_eq!((report["outcome"].as_str(), report["processes_ok"].as_u64()), (Some("complete"), Some(3)), "{report}");
}

/// The other guards on real konords (SPEC F15): a release whose `--max-error-rate` an app's
/// reported error rate passes is rolled back, one within it is not; a release with
/// `--node-health` is rolled back when a node it targets dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_rate_over_the_bound_and_a_dead_node_roll_a_release_back() {
    let cluster = Cluster::new();
    let (mut nodes, clients) = start_mesh(&cluster, 3).await;
    gated_group_on_all(&clients, "rate", "eventual").await;
    let sockets: Vec<String> = nodes.iter().map(|n| n.socket.to_str().unwrap().to_owned()).collect();
    let base = ok_json(&on(&sockets[0], &["set", "rate", "pool=8"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "rate", "--to", &base]));
    let next = ok_json(&on(&sockets[0], &["set", "rate", "pool=9"]))["version"].as_str().unwrap().to_owned();
    let release = ok_json(&on(&sockets[0], &["release", "rate", "--to", &next, "--max-error-rate", "2%"]));
    let label = release["version"].as_str().unwrap().to_owned();
    eventually("n2 serves the release", || async {
        (ok_json(&on(&sockets[1], &["get", "rate", "pool"]))["value"] == 9).then_some(())
    })
    .await;
    let status = String::from_utf8_lossy(&konorctl(&["--socket", &sockets[1], "status", "rate"]).stdout).into_owned();
    assert!(status.contains("guards: abort on the first failed apply, an error rate over 2%"), "{status}");

    // An app on n2 applied it and reports its error rate: 1% holds, 5% breaks the guard.
    let applied = Request::ReportApply {
        group: "rate".into(),
        version: next.clone(),
        revision: 0,
        result: konor_sdk::protocol::ApplyResult::Ok,
    };
    assert!(matches!(clients[1].call(applied).await.unwrap(), Response::Done));
    clients[1].report_error_rate("rate", 0.01).await.unwrap();
    let refused = clients[1].report_error_rate("rate", 1.5).await;
    assert!(matches!(refused, Err(konor_sdk::SdkError::Daemon { .. })), "{refused:?}");
    let elsewhere = clients[2].report_error_rate("rate", 0.5).await;
    assert!(
        matches!(elsewhere, Err(konor_sdk::SdkError::Daemon { .. })),
        "n3's connection applied nothing: {elsewhere:?}"
    );
    eventually("every node sees n2's 1% in the report", || async {
        let report = ok_json(&on(&sockets[0], &["release", "status", "rate"]))["releases"][0].clone();
        let rate = report["applies"].as_array()?.iter().find(|row| row["node"] == "n2")?["error_rate"].as_f64()?;
        ((rate - 0.01).abs() < 1e-9 && report["outcome"] == "complete").then_some(())
    })
    .await;
    clients[1].report_error_rate("rate", 0.05).await.unwrap();
    for socket in &sockets {
        eventually("every node rolled the release back on the error rate", || async {
            let status = ok_json(&on(socket, &["status", "rate"]));
            let aborted = status["release"]["current"]["aborted"].as_str().unwrap_or_default().to_owned();
            let back = ok_json(&on(socket, &["get", "rate", "pool"]))["value"] == 8;
            (back && aborted.contains("error rate 5% over 2%") && aborted.contains("on n2")).then_some(())
        })
        .await;
    }
    assert_eq!(ok_json(&on(&sockets[2], &["status", "rate"]))["release"]["current"]["label"], label.as_str());

    // A release guarded by node health: n3 dies, the others roll it back.
    let third = ok_json(&on(&sockets[0], &["set", "rate", "pool=10"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "rate", "--to", &third, "--node-health"]));
    for socket in &sockets[..2] {
        eventually("n1 and n2 serve the release", || async {
            (ok_json(&on(socket, &["get", "rate", "pool"]))["value"] == 10).then_some(())
        })
        .await;
    }
    nodes[2].kill9();
    for socket in &sockets[..2] {
        eventually("n1 and n2 roll the release back once n3 is dead", || async {
            let status = ok_json(&on(socket, &["status", "rate"]));
            let aborted = status["release"]["current"]["aborted"].as_str().unwrap_or_default().to_owned();
            let back = ok_json(&on(socket, &["get", "rate", "pool"]))["value"] == 8;
            (back && aborted.contains("dead: n3")).then_some(())
        })
        .await;
    }
}

/// Overlays on real konords (SPEC F29): a value written with `--overlay env=dev` is served,
/// once released, only by the nodes labelled `env=dev`; `show` holds the base and the overlay;
/// deleting the overlay and releasing brings those nodes back to the base; an immediate group
/// refuses overlays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_reaches_only_the_nodes_whose_labels_match() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let c1 = n1.client().await;
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.extra_args = vec!["--label".into(), "env=dev".into()];
    n2.start();
    let c2 = n2.client().await;
    let nodes = [n1, n2];
    let clients = [c1, c2];
    crate::harness::await_whole_mesh(&nodes, &clients).await;
    gated_group_on_all(&clients, "ovl", "eventual").await;
    group_on_all(&clients, "flat", "eventual").await;
    let sockets: Vec<String> = nodes.iter().map(|n| n.socket.to_str().unwrap().to_owned()).collect();
    ok_json(&on(&sockets[0], &["set", "ovl", "pool=8", "host=a"]));
    let written = ok_json(&on(&sockets[0], &["set", "ovl", "pool=2", "--overlay", "env=dev"]));
    let version = written["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "ovl", "--to", &version]));
    for (socket, pool) in sockets.iter().zip([8, 2]) {
        eventually("each node serves its view", || async {
            let settings = ok_json(&on(socket, &["get", "ovl"]))["settings"].clone();
            (settings == json!({"pool": pool, "host": "a"})).then_some(())
        })
        .await;
    }
    let shown = ok_json(&on(&sockets[0], &["show", &format!("ovl@{version}")]));
    assert_eq!(shown["settings"]["pool@env=dev"], 2, "the version holds the overlay: {shown}");
    assert_eq!(shown["settings"]["pool"], 8);

    let removed = ok_json(&on(&sockets[1], &["delete", "ovl", "pool", "--overlay", "env=dev"]));
    ok_json(&on(&sockets[1], &["release", "ovl", "--to", removed["version"].as_str().unwrap()]));
    eventually("n2 serves the base again", || async {
        (ok_json(&on(&sockets[1], &["get", "ovl", "pool"]))["value"] == 8).then_some(())
    })
    .await;
    let refused = konorctl(&["--socket", &sockets[0], "set", "flat", "pool=2", "--overlay", "env=dev"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("overlays need a gated group"), "{refused:?}");
}

/// An app that exits right after its reload failed (a crash loop) still breaks the guard: its
/// row is history by the time the members look, and counts until another process on that node
/// applies the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_exits_after_a_failed_reload_still_rolls_the_release_back() {
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 2).await;
    gated_group_on_all(&clients, "crash", "eventual").await;
    let sockets: Vec<String> = nodes.iter().map(|n| n.socket.to_str().unwrap().to_owned()).collect();
    let base = ok_json(&on(&sockets[0], &["set", "crash", "pool=8"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "crash", "--to", &base]));
    let bad = ok_json(&on(&sockets[0], &["set", "crash", "pool=800"]))["version"].as_str().unwrap().to_owned();
    ok_json(&on(&sockets[0], &["release", "crash", "--to", &bad]));
    eventually("n2 serves the bad version", || async {
        (ok_json(&on(&sockets[1], &["get", "crash", "pool"]))["value"] == 800).then_some(())
    })
    .await;
    {
        let app = konor_sdk::Client::connect(&nodes[1].socket).await.unwrap();
        let report = Request::ReportApply {
            group: "crash".into(),
            version: bad.clone(),
            revision: 0,
            result: konor_sdk::protocol::ApplyResult::Error { message: "panicked on pool=800".into() },
        };
        assert!(matches!(app.call(report).await.unwrap(), Response::Done));
        // Dropped here: the connection closes and the row becomes history at once.
    }
    for socket in &sockets {
        eventually("every node rolled the release back", || async {
            let status = ok_json(&on(socket, &["status", "crash"]));
            let aborted = status["release"]["current"]["aborted"].as_str().unwrap_or_default().to_owned();
            (aborted.contains("panicked on pool=800")).then_some(())
        })
        .await;
    }
}
