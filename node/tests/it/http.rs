//! `konorctl --endpoint` against a real node's HTTP API: the same commands, answers and exit
//! codes as on the socket, a caller's identity from its certificate, and a watch over
//! Server-Sent Events (the API itself is also tested from Python: sdk/python/tests/test_http_api.py).

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use crate::harness::{Cluster, await_whole_mesh, eventually};

fn konorctl(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_konorctl"));
    command.args(args).env_remove("KONOR_SOCKET").env_remove("KONOR_ENDPOINT").env_remove("KONOR_TLS_DIR");
    for (name, value) in envs {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "konorctl failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(output)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn konorctl_with_an_endpoint_runs_every_command_on_a_remote_node() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.http = true;
    n1.start();
    let c1 = n1.client().await;
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.start();
    let c2 = n2.client().await;
    let nodes = vec![n1, n2];
    await_whole_mesh(&nodes, &[c1, c2]).await;
    let ops = cluster.dir.path().join("ops");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "ops-alice", &ops).unwrap();
    let endpoint = nodes[0].http_endpoint();
    let socket = nodes[1].socket.to_str().unwrap().to_owned();
    let remote = |args: &[&str]| {
        let mut all = vec!["--endpoint", endpoint.as_str(), "--tls-dir", ops.to_str().unwrap(), "--output", "json"];
        all.extend_from_slice(args);
        konorctl(&all, &[])
    };
    let local = |args: &[&str]| {
        let mut all = vec!["--socket", socket.as_str(), "--output", "json"];
        all.extend_from_slice(args);
        konorctl(&all, &[])
    };

    // A group made over HTTP on n1, joined from n2's socket with the key HTTP gave.
    let key_file = cluster.dir.path().join("app.key");
    let created = remote(&["group", "create", "app", "--mode", "eventual", "--key-out", key_file.to_str().unwrap()]);
    assert_eq!(json(&created)["created"], "app");
    stdout(&local(&["group", "join", "app", "--key-file", key_file.to_str().unwrap()]));

    // Writes over HTTP land on n2 and carry the certificate's identity as author.
    let set = json(&remote(&["set", "app", "db.pool=20", "name=eu", "-m", "first"]));
    assert_eq!(set["type"], "committed", "{set}");
    eventually("n2 reads the write made over HTTP", || async {
        let got = local(&["get", "app", "db.pool"]);
        (got.status.success() && json(&got)["value"] == 20).then_some(())
    })
    .await;
    let history = json(&remote(&["history", "app"]));
    let last = history["versions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["author"].as_str(), last["message"].as_str()), (Some("ops-alice@n1"), Some("first")));
    let deleted = json(&remote(&["delete", "app", "db.pool", "name"]));
    assert_eq!(deleted["type"], "committed");
    let diff = json(&remote(&["diff", "app", set["version"].as_str().unwrap(), deleted["version"].as_str().unwrap()]));
    assert_eq!(diff["type"], "diff", "{diff}");
    // The same read answers alike through both doors.
    eventually("n2 holds the delete", || async {
        (json(&local(&["get", "app"]))["settings"] == serde_json::json!({})).then_some(())
    })
    .await;
    assert_eq!(json(&remote(&["get", "app"]))["settings"], serde_json::json!({}));
    let nodes_seen = json(&remote(&["nodes"]));
    assert_eq!(nodes_seen["nodes"].as_array().unwrap().len(), 2);

    // Refusals keep their exit codes: an unknown group is 1, a node that is not there is 3,
    // a malformed endpoint is 2, a missing certificate directory is 2.
    assert_eq!(remote(&["get", "nope"]).status.code(), Some(1));
    let gone = konorctl(&["--endpoint", "https://127.0.0.1:1", "--tls-dir", ops.to_str().unwrap(), "nodes"], &[]);
    assert_eq!(gone.status.code(), Some(3), "{}", String::from_utf8_lossy(&gone.stderr));
    let plain = konorctl(&["--endpoint", "http://127.0.0.1:1", "--tls-dir", ops.to_str().unwrap(), "nodes"], &[]);
    assert_eq!(plain.status.code(), Some(2));
    let no_cert = konorctl(&["nodes"], &[("KONOR_ENDPOINT", endpoint.as_str())]);
    assert_eq!(no_cert.status.code(), Some(2), "{}", String::from_utf8_lossy(&no_cert.stderr));
    assert!(String::from_utf8_lossy(&no_cert.stderr).contains("--tls-dir"));

    // A watch over HTTP from a revision gets the change made after it on n2's socket.
    let before = json(&remote(&["get", "app"]))["freshness"]["revision"].as_u64().unwrap();
    stdout(&local(&["set", "app", "color=blue"]));
    eventually("n1 holds the change made on n2", || async {
        (json(&remote(&["get", "app"]))["settings"]["color"] == "blue").then_some(())
    })
    .await;
    let mut watch = Command::new(env!("CARGO_BIN_EXE_konorctl"))
        .args(["--output", "json", "watch", "app", "--from", &before.to_string()])
        .env("KONOR_ENDPOINT", &endpoint)
        .env("KONOR_TLS_DIR", &ops)
        .env_remove("KONOR_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(BufReader::new(out).lines().next().map(|line| line.unwrap()));
    });
    let line = rx.recv_timeout(crate::harness::DEADLINE);
    watch.kill().unwrap();
    watch.wait().unwrap();
    let line = line.expect("the watch over HTTP printed nothing in time").expect("the watch ended without an event");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!((event["type"].as_str(), event["set"]["color"].as_str()), (Some("change"), Some("blue")), "{event}");
}
