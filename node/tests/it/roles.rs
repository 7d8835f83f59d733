//! Roles on real konords (issue 17 item 3, SPEC F23): a node whose settings file has a `[roles]`
//! table checks every call on both doors with one rule. Over the socket, callers are told apart
//! by their peer credentials (konorctl run as other users); over HTTP, by their client
//! certificate. Every allowed call works; every other is refused `forbidden`, says why, and
//! changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::{Cluster, group_on_all, konorctl};

/// konorctl on `socket` as user `uid` (and group `uid`), JSON output.
fn as_user(uid: u32, socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_konorctl"))
        .arg("--socket")
        .arg(socket)
        .args(["--output", "json"])
        .args(args)
        .env_remove("KONOR_SOCKET")
        .env_remove("KONOR_ENDPOINT")
        .env_remove("KONOR_TLS_DIR")
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

/// What a call came to: "ok", "forbidden" or the failure itself.
fn outcome(output: &Output) -> String {
    if output.status.success() {
        return "ok".to_owned();
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("forbidden")
        || serde_json::from_slice::<Value>(&output.stdout).is_ok_and(|v| v["code"] == "forbidden")
    {
        return "forbidden".to_owned();
    }
    format!("failed: {stderr} {}", String::from_utf8_lossy(&output.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_may_do_what_it_names_over_the_socket_and_over_http_and_nothing_else() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    let settings = cluster.dir.path().join("n1.toml");
    std::fs::write(
        &settings,
        r#"
[roles]
"uid:1000" = "viewer"
"uid:1001" = "operator:app"
"uid:1002" = "admin"
"cert:ops-viewer" = "viewer"
"cert:ops-operator" = "operator"
"cert:ops-admin" = "admin"
"#,
    )
    .unwrap();
    n1.http = true;
    n1.extra_args = vec!["--config".into(), settings.to_str().unwrap().into(), "--socket-mode".into(), "0666".into()];
    n1.start();
    let client = n1.client().await;
    group_on_all(std::slice::from_ref(&client), "app", "eventual").await;
    group_on_all(std::slice::from_ref(&client), "other", "eventual").await;
    // Other users must reach the socket: the test's directories are 0700.
    for dir in [cluster.dir.path(), n1.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    // The calls of the matrix; each caller creates a group of its own name, its key written
    // where any user may write.
    let keys = cluster.dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o777)).unwrap();
    let calls = |who: &str| -> Vec<(&'static str, Vec<String>)> {
        let group = format!("g-{}", who.replace(' ', "-"));
        let key_out = keys.join(format!("{group}.key")).to_str().unwrap().to_owned();
        let args = |list: &[&str]| list.iter().map(|arg| (*arg).to_owned()).collect::<Vec<String>>();
        vec![
            ("get", args(&["get", "app", "k"])),
            ("set app", args(&["set", "app", "k=1"])),
            ("set other", args(&["set", "other", "k=1"])),
            ("create group", args(&["group", "create", &group, "--mode", "eventual", "--key-out", &key_out])),
            ("revocations", args(&["cert", "revocations"])),
        ]
    };
    client
        .call(konor_sdk::protocol::Request::Set {
            group: "app".into(),
            entries: [("k".to_owned(), serde_json::json!(0))].into(),
            meta: Default::default(),
        })
        .await
        .unwrap();

    // The socket: uid 0 runs konord here, and konord's own user is always admin.
    let socket = n1.socket.clone();
    let mut table = Vec::new();
    for (who, uid) in
        [("uid 1000 viewer", 1000), ("uid 1001 operator:app", 1001), ("uid 1002 admin", 1002), ("uid 1003 none", 1003)]
    {
        let row: Vec<String> = calls(&format!("u{uid}"))
            .iter()
            .map(|(name, args)| {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                format!("{name}={}", outcome(&as_user(uid, &socket, &args)))
            })
            .collect();
        table.push(format!("{who}: {}", row.join(" ")));
    }

    // HTTP: by client certificate.
    let endpoint = n1.http_endpoint();
    for who in ["ops-viewer", "ops-operator", "ops-admin", "ops-none"] {
        let tls = cluster.dir.path().join(who);
        konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, who, &tls).unwrap();
        let row: Vec<String> = calls(who)
            .iter()
            .map(|(name, args)| {
                let mut all =
                    vec!["--endpoint", endpoint.as_str(), "--tls-dir", tls.to_str().unwrap(), "--output", "json"];
                all.extend(args.iter().map(String::as_str));
                format!("{name}={}", outcome(&konorctl(&all)))
            })
            .collect();
        table.push(format!("{who}: {}", row.join(" ")));
    }
    let table = table.join("\n");
    let expected = "\
uid 1000 viewer: get=ok set app=forbidden set other=forbidden create group=forbidden revocations=ok
uid 1001 operator:app: get=ok set app=ok set other=forbidden create group=forbidden revocations=ok
uid 1002 admin: get=ok set app=ok set other=ok create group=ok revocations=ok
uid 1003 none: get=forbidden set app=forbidden set other=forbidden create group=forbidden revocations=forbidden
ops-viewer: get=ok set app=forbidden set other=forbidden create group=forbidden revocations=ok
ops-operator: get=ok set app=ok set other=ok create group=forbidden revocations=ok
ops-admin: get=ok set app=ok set other=ok create group=ok revocations=ok
ops-none: get=forbidden set app=forbidden set other=forbidden create group=forbidden revocations=forbidden";
    assert_eq!(table, expected);

    // A refusal says who and why, and changed nothing: `other` was written only by the admins.
    let refused = as_user(1000, &socket, &["set", "app", "k=2"]);
    let text = String::from_utf8_lossy(&refused.stdout).into_owned() + &String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("uid:1000 is viewer on this node; `set` needs operator"), "{text}");
    assert_eq!(client.get("app", "k").await.unwrap(), Some(serde_json::json!(1)));
}
