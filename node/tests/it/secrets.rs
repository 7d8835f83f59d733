//! Values marked secret on real konords (issue 17, item 5): `konorctl set --secret` takes the
//! value from stdin and marks the key; on every node, callers that may not reveal secrets (a
//! `viewer` on the socket or over HTTP, an HTTP caller without a certificate) read each of its
//! values as "<secret>" in every answer and watch event, while `app` and above read it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::harness::{
    Cluster, anonymous_get, as_user, eventually, group_on_all, konorctl, konorctl_for_anyone, konorctl_on,
    start_mesh_with,
};

const SECRET: &str = "hunter2-Zq81";
const NEXT_SECRET: &str = "s3cond-Kp02";

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|arg| (*arg).to_owned()).collect()
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// `konorctl DOOR... set GROUP --secret KEY` as root, the value on stdin.
fn set_secret(door: &[&str], group: &str, key: &str, value: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_konorctl"))
        .args(door)
        .args(["set", group, "--secret", key])
        .env_remove("KONOR_SOCKET")
        .env_remove("KONOR_ENDPOINT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{value}\n").as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_are_masked_for_viewers_on_every_door_and_every_node() {
    crate::netns::require_root();
    let cluster = Cluster::new();
    let settings = cluster.dir.path().join("n1.toml");
    std::fs::write(
        &settings,
        r#"
[roles]
"uid:1000" = "viewer"
"uid:1005" = "app"
"cert:ops-viewer" = "viewer"
"cert:ops-app" = "app"
"anonymous" = "viewer"
"#,
    )
    .unwrap();
    // n2 has no [roles]: certificate holders reveal, callers without one do not.
    let (nodes, clients) = start_mesh_with(&cluster, 2, |node| {
        node.http = true;
        node.extra_args = strings(&["--http-open-reads"]);
        if node.id == "n1" {
            node.extra_args.extend(strings(&["--config", settings.to_str().unwrap(), "--socket-mode", "0666"]));
        }
    })
    .await;
    let (n1, n2) = (&nodes[0], &nodes[1]);
    group_on_all(&clients, "app", "eventual").await;
    for dir in [cluster.dir.path(), n1.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin = konorctl_for_anyone(cluster.dir.path());

    // A secret never goes on the command line: refused before anything is sent.
    let inline = konorctl_on(&n1.socket, &["set", "app", "--secret", &format!("db.password={SECRET}")]);
    assert_eq!(inline.status.code(), Some(2), "{}", text(&inline));
    assert!(text(&inline).contains("never from the command line"), "{}", text(&inline));

    assert!(konorctl_on(&n1.socket, &["set", "app", "db.user=app"]).status.success());
    let socket = ["--socket", n1.socket.to_str().unwrap()];
    let marked = set_secret(&socket, "app", "db.password", SECRET);
    assert!(marked.status.success(), "{}", text(&marked));
    assert_eq!(clients[0].get("app", "db.password").await.unwrap(), Some(json!(SECRET)), "konord's own user reveals");
    // The mark and the value reach n2 (eventual: wait for the value there).
    eventually("the secret reaches n2", || async {
        (clients[1].get("app", "db.password").await.ok()? == Some(json!(SECRET))).then_some(())
    })
    .await;

    // Every read a viewer makes over the socket, through the read view and through the daemon.
    let reads: Vec<Vec<String>> = vec![
        strings(&["get", "app", "db.password"]),
        strings(&["get", "app"]),
        strings(&["show", "app@v3"]),
        strings(&["diff", "app", "v1", "v3"]),
        strings(&["history", "app"]),
        strings(&["conflicts", "app"]),
    ];
    for args in &reads {
        let viewer = as_user(&bin, 1000, 1000, &n1.socket, args);
        assert!(viewer.status.success(), "{args:?}: {}", text(&viewer));
        assert!(!text(&viewer).contains(SECRET), "viewer {args:?} read the secret: {}", text(&viewer));
        if !args.contains(&"history".to_owned()) && !args.contains(&"conflicts".to_owned()) {
            assert!(text(&viewer).contains("<secret>"), "viewer {args:?}: {}", text(&viewer));
            assert!(args.len() != 2 || text(&viewer).contains("db.user"), "other values stay: {}", text(&viewer));
        }
        let app = as_user(&bin, 1005, 1005, &n1.socket, args);
        assert!(app.status.success(), "{args:?}: {}", text(&app));
        if !args.contains(&"history".to_owned()) && !args.contains(&"conflicts".to_owned()) {
            assert!(text(&app).contains(SECRET), "app {args:?} reads the secret: {}", text(&app));
        }
    }
    let history = as_user(&bin, 1000, 1000, &n1.socket, &strings(&["history", "app"]));
    let versions: Value = serde_json::from_slice(&history.stdout).unwrap();
    let rows = versions["versions"].as_array().unwrap();
    assert!(rows.iter().all(|row| row["content_hash"] == ""), "a viewer gets no hash: {versions}");
    assert!(rows.iter().any(|row| row["secret"] == json!(["db.password"])), "history names the mark: {versions}");

    // Over HTTP, by certificate and without one, on n1 (roles) and n2 (none).
    let over_http = |endpoint: &str, who: &str, path_args: &[&str]| {
        let tls = cluster.dir.path().join(who);
        if !tls.exists() {
            konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, who, &tls).unwrap();
        }
        let mut all = vec!["--endpoint", endpoint, "--tls-dir", tls.to_str().unwrap(), "--output", "json"];
        all.extend_from_slice(path_args);
        konorctl(&all)
    };
    let (e1, e2) = (n1.http_endpoint(), n2.http_endpoint());
    for (endpoint, who, reveals) in
        [(&e1, "ops-viewer", false), (&e1, "ops-app", true), (&e2, "ops-viewer", true), (&e2, "ops-app", true)]
    {
        for args in [&["get", "app", "db.password"][..], &["get", "app"], &["show", "app@v3"]] {
            let answer = over_http(endpoint, who, args);
            assert!(answer.status.success(), "{who} {args:?}: {}", text(&answer));
            assert_eq!(text(&answer).contains(SECRET), reveals, "{who} on {endpoint} {args:?}: {}", text(&answer));
        }
    }
    for endpoint in [&e1, &e2] {
        for path in
            ["/api/v1/groups/app/settings/db.password", "/api/v1/groups/app/settings", "/api/v1/groups/app/versions/v3"]
        {
            let (status, body) = anonymous_get(endpoint, &cluster.ca_dir, path).await;
            assert_eq!(status, 200, "{path}: {body}");
            assert!(!body.contains(SECRET) && body.contains("<secret>"), "anonymous {path} on {endpoint}: {body}");
        }
    }

    // Watch events: the backlog (`--from`) and a live change, as a viewer.
    let mut watch = Command::new(&bin)
        .args(["--socket", n1.socket.to_str().unwrap(), "watch", "app", "--from", "1"])
        .env_remove("KONOR_SOCKET")
        .env_remove("KONOR_ENDPOINT")
        .uid(1000)
        .gid(1000)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let mut started = String::new();
    stderr.read_line(&mut started).unwrap();
    assert!(started.starts_with("watching app"), "{started}");
    let mut events = BufReader::new(watch.stdout.take().unwrap()).lines();
    let next_secret = set_secret(&socket, "app", "db.password", NEXT_SECRET);
    assert!(next_secret.status.success(), "{}", text(&next_secret));
    let mut seen = Vec::new();
    while !seen.iter().any(|line: &String| line.contains("v4")) {
        let line = events.next().expect("the watch ended").unwrap();
        assert!(!line.contains(SECRET) && !line.contains(NEXT_SECRET), "a viewer's watch event: {line}");
        seen.push(line);
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(seen.iter().filter(|line| line.contains("<secret>")).count() >= 2, "backlog and live: {seen:?}");
    assert!(seen.iter().any(|line| line.contains("db.user = app")), "other values stay: {seen:?}");

    // Marked over HTTP (konorctl --endpoint, on n2): masked for n1's viewer as well.
    let tls = cluster.dir.path().join("ops-app");
    let http = ["--endpoint", e2.as_str(), "--tls-dir", tls.to_str().unwrap()];
    let token = "tok-Hw55-over-http";
    let over = set_secret(&http, "app", "api.token", token);
    assert!(over.status.success(), "{}", text(&over));
    eventually("the token reaches n1", || async {
        (clients[0].get("app", "api.token").await.ok()? == Some(json!(token))).then_some(())
    })
    .await;
    let viewer = as_user(&bin, 1000, 1000, &n1.socket, &strings(&["get", "app", "api.token"]));
    assert!(!text(&viewer).contains(token) && text(&viewer).contains("<secret>"), "{}", text(&viewer));
}
