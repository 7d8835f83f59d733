//! Edits an operator can trust (issue 16, SPEC F5 and F8), on real konords: a group's schema set
//! on one node refuses a bad write on another before it spreads, `schema check` validates a
//! file without writing, conditional writes are refused when the group moved on (and in a
//! strong group two racing conditional writes commit exactly once), reads and watches by key
//! prefix, `show group@vN`, and the same through `konorctl --endpoint` over HTTP.

use std::process::Output;

use konor_sdk::SdkError;
use konor_sdk::protocol::{ErrorCode, Request, Response, WatchEvent, WriteMeta};
use serde_json::{Value, json};

use crate::harness::{Cluster, await_whole_mesh, eventually, group_on_all, konorctl, ok_json, start_mesh};

fn refused(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "expected a refusal: {}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const SCHEMA: &str = r#"{
  "type": "object",
  "properties": { "db.port": { "type": "integer", "minimum": 1, "maximum": 65535 } },
  "patternProperties": { "^feature\\.": { "type": "boolean" } }
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_set_on_one_node_refuses_bad_writes_on_another_and_conditions_refuse_stale_writes() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.http = true;
    n1.start();
    let c1 = n1.client().await;
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.start();
    let c2 = n2.client().await;
    let nodes = vec![n1, n2];
    await_whole_mesh(&nodes, &[c1.clone(), c2.clone()]).await;
    group_on_all(&[c1.clone(), c2.clone()], "app", "eventual").await;
    let dir = cluster.dir.path();
    let (s1, s2) = (nodes[0].socket.to_str().unwrap().to_owned(), nodes[1].socket.to_str().unwrap().to_owned());
    let on = |socket: &str, args: &[&str]| {
        let mut all = vec!["--socket", socket, "--output", "json"];
        all.extend_from_slice(args);
        konorctl(&all)
    };

    // The schema is set on n1 and reaches n2 as a version of the group.
    let schema_file = dir.join("schema.json");
    std::fs::write(&schema_file, SCHEMA).unwrap();
    let set = ok_json(&on(&s1, &["schema", "set", "app", schema_file.to_str().unwrap(), "-m", "ports"]));
    assert_eq!(set["type"], "committed", "{set}");
    let schema_version = set["version"].as_str().unwrap().to_owned();
    eventually("n2 holds the schema", || async {
        let got = ok_json(&on(&s2, &["schema", "get", "app"]));
        (got["version"] == schema_version.as_str()).then_some(())
    })
    .await;

    // A bad write on n2 is refused there, naming the key, the value and the rule; nothing is
    // written (no version on n2, so nothing can spread).
    let versions_before = ok_json(&on(&s2, &["history", "app"]))["versions"].as_array().unwrap().len();
    let error = refused(&konorctl(&["--socket", &s2, "set", "app", "db.port=70000", "feature.x=true"]));
    assert!(error.contains("db.port") && error.contains("70000") && error.contains("maximum"), "{error}");
    assert!(error.contains("schema get app"), "the refusal says where to look: {error}");
    assert_eq!(ok_json(&on(&s2, &["history", "app"]))["versions"].as_array().unwrap().len(), versions_before);
    assert!(ok_json(&on(&s2, &["get", "app"]))["settings"].get("db.port").is_none());
    let good = ok_json(&on(&s2, &["set", "app", "db.port=5432", "db.host=a", "feature.x=true"]));
    assert_eq!(good["type"], "committed");

    // `schema check` validates a file without writing, against the group's schema or another.
    let bad_file = dir.join("bad.toml");
    std::fs::write(&bad_file, "[db]\nport = 0\n[feature]\nx = \"yes\"\n").unwrap();
    let check = on(&s1, &["schema", "check", "app", bad_file.to_str().unwrap()]);
    let checked: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(check.status.code(), Some(1));
    let keys: Vec<&str> =
        checked["violations"].as_array().unwrap().iter().map(|v| v["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["db.port", "feature.x"], "{checked}");
    let loose = dir.join("loose.json");
    std::fs::write(&loose, r#"{"type": "object"}"#).unwrap();
    let against_other =
        on(&s1, &["schema", "check", "app", bad_file.to_str().unwrap(), "--schema", loose.to_str().unwrap()]);
    assert!(ok_json(&against_other)["violations"].as_array().unwrap().is_empty());
    eventually("n1 holds n2's write", || async {
        (ok_json(&on(&s1, &["get", "app", "db.port"]))["value"] == 5432).then_some(())
    })
    .await;
    let latest = ok_json(&on(&s1, &["history", "app"]))["versions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(ok_json(&on(&s1, &["get", "app"]))["settings"]["db.port"], 5432, "the check wrote nothing");

    // Conditional writes: the latest version holds, a stale one is refused with nothing changed.
    let label = latest["label"].as_str().unwrap();
    let hash = latest["content_hash"].as_str().unwrap();
    let written = ok_json(&on(&s1, &["set", "app", "db.host=b", "--if-version", label, "--if-content", hash]));
    assert_eq!(written["type"], "committed");
    let stale = refused(&konorctl(&["--socket", &s1, "set", "app", "db.host=c", "--if-version", label]));
    assert!(stale.contains("condition failed") && stale.contains(written["version"].as_str().unwrap()), "{stale}");
    let stale_content = refused(&konorctl(&["--socket", &s1, "delete", "app", "db.host", "--if-content", hash]));
    assert!(stale_content.contains("condition failed"), "{stale_content}");
    assert_eq!(ok_json(&on(&s1, &["get", "app", "db.host"]))["value"], "b");

    // Reads and watches by key prefix, and one whole version.
    let under_db = ok_json(&on(&s1, &["get", "app", "--prefix", "db."]));
    assert_eq!(under_db["settings"], json!({"db.host": "b", "db.port": 5432}));
    let mut watch = c1.watch_prefix("app", "db.", None).await.unwrap();
    ok_json(&on(&s1, &["set", "app", "feature.y=false"]));
    ok_json(&on(&s1, &["set", "app", "db.pool=4", "feature.z=true"]));
    let event = tokio::time::timeout(crate::harness::DEADLINE, watch.next()).await.unwrap().unwrap().unwrap();
    let WatchEvent::Change { set, removed, .. } = event else { panic!("{event:?}") };
    assert_eq!(
        serde_json::to_value(&set).unwrap(),
        json!({"db.pool": 4}),
        "only keys under db., and no event for feature.y"
    );
    assert!(removed.is_empty());
    let shown = ok_json(&on(&s1, &["show", &format!("app@{label}")]));
    assert_eq!(shown["settings"], json!({"db.host": "a", "db.port": 5432, "feature.x": true}), "{shown}");
    assert_eq!(shown["version"]["label"], label);

    // The same through the HTTP door: a stale condition answers 412 (exit 1), a schema
    // violation 422 (exit 1), and a schema can be read.
    let ops = dir.join("ops");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "ops-alice", &ops).unwrap();
    let endpoint = nodes[0].http_endpoint();
    let remote = |args: &[&str]| {
        let mut all = vec!["--endpoint", endpoint.as_str(), "--tls-dir", ops.to_str().unwrap(), "--output", "json"];
        all.extend_from_slice(args);
        konorctl(&all)
    };
    assert_eq!(ok_json(&remote(&["schema", "get", "app"]))["version"], schema_version.as_str());
    let over_http = refused(&remote(&["set", "app", "db.port=-1"]));
    assert!(over_http.contains("schema_violation") || over_http.contains("refused by the schema"), "{over_http}");
    let stale_http = refused(&remote(&["set", "app", "db.host=z", "--if-version", label]));
    assert!(stale_http.contains("condition failed"), "{stale_http}");
    assert_eq!(ok_json(&remote(&["get", "app", "--prefix", "db.h"]))["settings"], json!({"db.host": "b"}));
    let removed = ok_json(&remote(&["schema", "remove", "app"]));
    assert_eq!(removed["type"], "committed");
    ok_json(&on(&s1, &["set", "app", "db.port=-1"]));
}

/// In a strong group a conditional write is checked against the state its round commits on:
/// two nodes racing to write on the same version commit exactly once. A schema set there
/// commits through a round and is enforced by every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_conditional_writes_in_a_strong_group_commit_exactly_once() {
    let cluster = Cluster::new();
    let (_nodes, clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "st", "strong").await;

    for round in 0..5 {
        let latest = match clients[0].call(Request::History { group: "st".into() }).await.unwrap() {
            Response::History { versions, .. } => versions.last().unwrap().label.clone(),
            other => panic!("{other:?}"),
        };
        // Each writer retries what is not a final answer (busy, aborted) until it gets one.
        let write = |client: konor_sdk::Client, writer: usize| {
            let latest = latest.clone();
            async move {
                let meta = WriteMeta { if_version: Some(latest), ..WriteMeta::default() };
                let request = Request::Set {
                    group: "st".into(),
                    entries: [("winner".to_owned(), json!(format!("{round}-{writer}")))].into(),
                    meta,
                };
                loop {
                    match client.call(request.clone()).await {
                        Err(SdkError::Daemon { code: ErrorCode::Busy | ErrorCode::Aborted, .. }) => {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await; // a retry's backoff
                        }
                        Err(SdkError::Daemon { code, .. }) => return Err(code),
                        Ok(answer) => return Ok(answer),
                        Err(other) => panic!("{other}"),
                    }
                }
            }
        };
        let (a, b) = tokio::join!(write(clients[1].clone(), 2), write(clients[2].clone(), 3));
        let committed = [&a, &b].iter().filter(|r| matches!(r, Ok(Response::Committed { .. }))).count();
        let failed = [&a, &b].iter().filter(|r| matches!(r, Err(ErrorCode::ConditionFailed))).count();
        assert_eq!((committed, failed), (1, 1), "round {round}: exactly one commits: {a:?} / {b:?}");
    }

    // A schema in a strong group commits through a round like any write, and every member then
    // refuses a bad write itself (its round never starts).
    let schema = serde_json::from_str::<Value>(SCHEMA).unwrap();
    let set = Request::SchemaSet { group: "st".into(), schema: Some(schema.clone()), meta: WriteMeta::default() };
    assert!(matches!(clients[0].call(set).await, Ok(Response::Committed { .. })));
    for client in &clients {
        let bad = Request::Set {
            group: "st".into(),
            entries: [("db.port".to_owned(), json!(0))].into(),
            meta: WriteMeta::default(),
        };
        let refused = eventually("the member refuses a write the schema forbids", || async {
            match client.call(bad.clone()).await {
                Err(SdkError::Daemon { code: ErrorCode::SchemaViolation, message }) => Some(message),
                _ => None,
            }
        })
        .await;
        assert!(refused.contains("db.port"), "{refused}");
        match client.call(Request::SchemaGet { group: "st".into() }).await.unwrap() {
            Response::Schema { schema: Some(held), .. } => assert_eq!(held, schema),
            other => panic!("{other:?}"),
        }
    }
}
