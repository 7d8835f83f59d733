//! Roles on real konords (issue 17 item 3, SPEC F23): a node whose settings file has a `[roles]`
//! table checks every call on both doors with one rule. Over the socket, callers are told apart
//! by their peer credentials (konorctl run as other users and groups); over HTTP, by their
//! client certificate. Every allowed call works; every other is refused `forbidden`, says why,
//! and changes nothing. Versions are authored by who the door authenticated.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use konor_sdk::protocol::{Request, Response};
use serde_json::Value;

use crate::harness::{Cluster, as_user, group_on_all, konorctl, konorctl_for_anyone};

/// What a call came to: "ok", "forbidden" or the failure itself.
fn outcome(output: &Output) -> String {
    if output.status.success() {
        return "ok".to_owned();
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = serde_json::from_slice::<Value>(&output.stdout).ok().map(|answer| answer["code"].clone());
    if stderr.contains("forbidden") || code.is_some_and(|code| code == "forbidden") {
        return "forbidden".to_owned();
    }
    format!("failed: {stderr} {}", String::from_utf8_lossy(&output.stdout))
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|arg| (*arg).to_owned()).collect()
}

/// The authors of a group's versions after its creation, sorted.
async fn authors(client: &konor_sdk::Client, group: &str) -> Vec<String> {
    match client.call(Request::History { group: group.into() }).await.unwrap() {
        Response::History { versions, .. } => {
            let mut authors: Vec<String> = versions.into_iter().skip(1).map(|row| row.author).collect();
            authors.sort();
            authors
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_may_do_what_it_names_over_the_socket_and_over_http_and_nothing_else() {
    crate::netns::require_root();
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
"gid:2000" = "operator"
"cert:ops-viewer" = "viewer"
"cert:ops-operator" = "operator"
"cert:ops-admin" = "admin"
"#,
    )
    .unwrap();
    n1.http = true;
    n1.extra_args = strings(&["--config", settings.to_str().unwrap(), "--socket-mode", "0666"]);
    n1.start();
    let client = n1.client().await;
    group_on_all(std::slice::from_ref(&client), "app", "eventual").await;
    group_on_all(std::slice::from_ref(&client), "other", "eventual").await;
    // Other users must reach the socket: the test's directories are 0700.
    for dir in [cluster.dir.path(), n1.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let keys = cluster.dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o777)).unwrap();
    let user = konor_node::api::authorize::user_name;
    let bin = konorctl_for_anyone(cluster.dir.path());
    // konord runs as root here, and konord's own user is always admin.
    let set_k0 = as_user(&bin, 0, 0, &n1.socket, &strings(&["set", "app", "k=0"]));
    assert_eq!(outcome(&set_k0), "ok");

    // The matrix. Each caller writes a value of its own and creates a group of its own name,
    // so anything let through shows afterwards.
    let mut value = 0;
    let mut calls = |who: &str| -> Vec<(&'static str, Vec<String>)> {
        value += 1;
        let group = format!("g-{who}");
        let key_out = keys.join(format!("{group}.key")).to_str().unwrap().to_owned();
        let set = format!("k={value}");
        vec![
            ("get", strings(&["get", "app", "k"])),
            ("set app", strings(&["set", "app", &set])),
            ("set other", strings(&["set", "other", &set])),
            ("create group", strings(&["group", "create", &group, "--mode", "eventual", "--key-out", &key_out])),
            ("revocations", strings(&["cert", "revocations"])),
        ]
    };
    let mut table = Vec::new();
    let users = [
        ("uid 1000 viewer", 1000, 1000),
        ("uid 1001 operator:app", 1001, 1001),
        ("uid 1002 admin", 1002, 1002),
        ("uid 1003 none", 1003, 1003),
        ("uid 1004 in gid 2000", 1004, 2000),
    ];
    for (who, uid, gid) in users {
        let row: Vec<String> = calls(&format!("u{uid}"))
            .iter()
            .map(|(name, args)| format!("{name}={}", outcome(&as_user(&bin, uid, gid, &n1.socket, args))))
            .collect();
        table.push(format!("{who}: {}", row.join(" ")));
    }
    let endpoint = n1.http_endpoint();
    let over_http = |tls: &Path, args: &[String]| {
        let mut all = vec!["--endpoint", endpoint.as_str(), "--tls-dir", tls.to_str().unwrap(), "--output", "json"];
        all.extend(args.iter().map(String::as_str));
        konorctl(&all)
    };
    for who in ["ops-viewer", "ops-operator", "ops-admin", "ops-none"] {
        let tls = cluster.dir.path().join(who);
        konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, who, &tls).unwrap();
        let row: Vec<String> =
            calls(who).iter().map(|(name, args)| format!("{name}={}", outcome(&over_http(&tls, args)))).collect();
        table.push(format!("{who}: {}", row.join(" ")));
    }
    let expected = "\
uid 1000 viewer: get=ok set app=forbidden set other=forbidden create group=forbidden revocations=ok
uid 1001 operator:app: get=ok set app=ok set other=forbidden create group=forbidden revocations=ok
uid 1002 admin: get=ok set app=ok set other=ok create group=ok revocations=ok
uid 1003 none: get=forbidden set app=forbidden set other=forbidden create group=forbidden revocations=forbidden
uid 1004 in gid 2000: get=ok set app=ok set other=ok create group=forbidden revocations=ok
ops-viewer: get=ok set app=forbidden set other=forbidden create group=forbidden revocations=ok
ops-operator: get=ok set app=ok set other=ok create group=forbidden revocations=ok
ops-admin: get=ok set app=ok set other=ok create group=ok revocations=ok
ops-none: get=forbidden set app=forbidden set other=forbidden create group=forbidden revocations=forbidden";
    assert_eq!(table.join("\n"), expected);

    // Refusals changed nothing: only the callers allowed wrote versions or made groups, and each
    // version is authored by who the door authenticated.
    let mut app = vec![
        format!("{}@n1", user(0)),
        format!("{}@n1", user(1001)),
        format!("{}@n1", user(1002)),
        format!("{}@n1", user(1004)),
        "ops-admin@n1".to_owned(),
        "ops-operator@n1".to_owned(),
    ];
    app.sort();
    assert_eq!(authors(&client, "app").await, app);
    let mut other = vec![format!("{}@n1", user(1002)), format!("{}@n1", user(1004))];
    other.extend(["ops-admin@n1".to_owned(), "ops-operator@n1".to_owned()]);
    other.sort();
    assert_eq!(authors(&client, "other").await, other);
    let groups = match client.call(Request::GroupList).await.unwrap() {
        Response::Groups { groups } => groups.into_iter().map(|group| group.name).collect::<Vec<String>>(),
        other => panic!("{other:?}"),
    };
    assert_eq!(groups, ["app", "g-ops-admin", "g-u1002", "other"]);
    assert_eq!(client.get("app", "k").await.unwrap(), Some(serde_json::json!(8)), "ops-admin's, the last allowed");

    // A refusal says who and why.
    let refused = as_user(&bin, 1000, 1000, &n1.socket, &strings(&["set", "app", "k=2"]));
    let text = String::from_utf8_lossy(&refused.stdout).into_owned() + &String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("uid:1000 is viewer on this node; `set` needs operator"), "{text}");

    // A claimed author is kept, marked as a claim.
    let claimed = as_user(&bin, 1001, 1001, &n1.socket, &strings(&["set", "app", "k=30", "--author", "someone-else"]));
    assert_eq!(outcome(&claimed), "ok");
    let want = format!("{}@n1 (someone-else)", user(1001));
    assert!(authors(&client, "app").await.contains(&want), "{want}");
}
