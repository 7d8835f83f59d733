//! The audit log on real konords (issue 17, item 4): admin actions and refusals taken on one
//! node, over the socket and over HTTP, reach every node's copy; `konorctl audit verify`
//! passes on the intact files and fails after a record is edited, deleted or reordered.

use std::path::Path;

use serde_json::Value;

use crate::harness::{Cluster, anonymous_get, eventually, konorctl, konorctl_on, ok_json, start_mesh_with};

fn audit(data_dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--output", "json", "audit"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--data-dir", data_dir.to_str().unwrap()]);
    konorctl(&all)
}

fn records(data_dir: &Path) -> Vec<Value> {
    let answer = ok_json(&audit(data_dir, &["list"]));
    assert_eq!(answer["type"], "audit", "the same answer as the node's: {answer}");
    answer["records"].as_array().unwrap().clone()
}

/// Verifies a copy of `data_dir`'s audit files after `tamper` changed `node`'s chain.
fn verify_after(data_dir: &Path, node: &str, tamper: impl FnOnce(&mut Vec<String>)) -> (Option<i32>, String) {
    let copy = tempfile::tempdir().unwrap();
    let audit_dir = copy.path().join("audit");
    std::fs::create_dir(&audit_dir).unwrap();
    for entry in std::fs::read_dir(data_dir.join("audit")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, audit_dir.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::copy(data_dir.join("node.json"), copy.path().join("node.json")).unwrap();
    let file = audit_dir.join(format!("{node}.jsonl"));
    let mut lines: Vec<String> = std::fs::read_to_string(&file).unwrap().lines().map(str::to_owned).collect();
    tamper(&mut lines);
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let output = konorctl(&["audit", "verify", "--data-dir", copy.path().to_str().unwrap()]);
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_and_refusals_reach_every_node_and_tampering_is_detected() {
    let cluster = Cluster::new();
    let settings = cluster.dir.path().join("n1.toml");
    std::fs::write(&settings, "[roles]\n\"cert:ops\" = \"viewer\"\n").unwrap();
    let (nodes, _clients) = start_mesh_with(&cluster, 3, |node| {
        if node.id == "n1" {
            node.http = true;
            node.extra_args = vec!["--config".to_owned(), settings.display().to_string()];
        }
        if node.id == "n2" {
            // No [roles], reads open to callers without a certificate.
            node.http = true;
            node.extra_args = vec!["--http-open-reads".to_owned()];
        }
    })
    .await;
    let n1 = &nodes[0];

    // Over the socket, as root: a group and a schema; a revocation.
    ok_json(&konorctl_on(
        &n1.socket,
        &[
            "--output",
            "json",
            "group",
            "create",
            "shop",
            "--mode",
            "eventual",
            "--key-out",
            cluster.dir.path().join("shop.key").to_str().unwrap(),
        ],
    ));
    ok_json(&konorctl_on(
        &n1.socket,
        &[
            "--output",
            "json",
            "cert",
            "revoke",
            "gone",
            "--ca-dir",
            cluster.ca_dir.to_str().unwrap(),
            "--reason",
            "test",
        ],
    ));
    // Over HTTP, a viewer certificate tries to create a group: forbidden, and audited.
    let ops = cluster.dir.path().join("ops");
    konor_node::pki::ca::issue_node_cert(&cluster.ca_dir, "ops", &ops).unwrap();
    let endpoint = n1.http_endpoint();
    let refused = konorctl(&[
        "--endpoint",
        &endpoint,
        "--tls-dir",
        ops.to_str().unwrap(),
        "group",
        "create",
        "other",
        "--mode",
        "eventual",
    ]);
    assert!(!refused.status.success());
    // A plain write is not audited (it is a version of its group, with its author).
    ok_json(&konorctl_on(&n1.socket, &["--output", "json", "set", "shop", "port=80"]));

    let expected = [
        ("group_create", "uid:0 (root)", "ok", Some("shop")),
        ("revoke", "uid:0 (root)", "ok", None),
        ("group_create", "cert:ops", "forbidden", Some("other")),
    ];
    let summary = |records: &[Value]| -> Vec<(String, String, String, Option<String>)> {
        records
            .iter()
            .filter(|record| record["node"] == "n1")
            .map(|record| {
                (
                    record["action"].as_str().unwrap().to_owned(),
                    record["who"].as_str().unwrap().to_owned(),
                    record["outcome"].as_str().unwrap().to_owned(),
                    record["group"].as_str().map(str::to_owned),
                )
            })
            .collect()
    };
    let want: Vec<_> = expected
        .iter()
        .map(|(a, w, o, g)| (a.to_string(), w.to_string(), o.to_string(), g.map(str::to_owned)))
        .collect();
    assert_eq!(summary(&records(&n1.data_dir)), want, "n1's own chain");
    // n3 holds a copy of n1's chain: the record outlives the node it was taken on.
    let n3_dir = nodes[2].data_dir.clone();
    eventually("n3 holds n1's audit records", || {
        let got = summary(&records(&n3_dir));
        let want = want.clone();
        async move { (got == want).then_some(()) }
    })
    .await;
    let remote = records(&n3_dir).into_iter().find(|record| record["outcome"] == "forbidden").unwrap();
    assert!(remote["from"].as_str().unwrap().starts_with("127.0.0.1:"), "{remote}");

    // Asked of a node: n3 answers with n1's records (root is admin); a viewer is refused.
    let asked = ok_json(&konorctl_on(&nodes[2].socket, &["--output", "json", "audit", "list", "--node", "n1"]));
    assert_eq!(asked["type"], "audit");
    assert_eq!(summary(asked["records"].as_array().unwrap()), want);
    assert!(asked["records"].as_array().unwrap().iter().all(|record| record["node"] == "n1"), "{asked}");
    let shop = ok_json(&konorctl_on(&nodes[2].socket, &["--output", "json", "audit", "list", "--group", "shop"]));
    let shop = shop["records"].as_array().unwrap();
    assert!(!shop.is_empty() && shop.iter().all(|record| record["group"] == "shop"), "{shop:?}");
    let viewer = konorctl(&["--endpoint", &endpoint, "--tls-dir", ops.to_str().unwrap(), "audit", "list"]);
    assert!(!viewer.status.success());
    assert!(
        String::from_utf8_lossy(&viewer.stderr).contains("forbidden")
            || String::from_utf8_lossy(&viewer.stdout).contains("forbidden")
    );

    // Open reads open what a viewer may read: the groups, not the audit log.
    let n2_endpoint = nodes[1].http_endpoint();
    assert_eq!(anonymous_get(&n2_endpoint, &cluster.ca_dir, "/api/v1/groups").await.0, 200);
    assert_eq!(anonymous_get(&n2_endpoint, &cluster.ca_dir, "/api/v1/audit").await.0, 401);

    for dir in [&n1.data_dir, &n3_dir] {
        let verified = audit(dir, &["verify"]);
        assert_eq!(verified.status.code(), Some(0), "{}", String::from_utf8_lossy(&verified.stdout));
    }
    // Export: one JSON object per line, every record.
    let export = konorctl(&["audit", "export", "--data-dir", n3_dir.to_str().unwrap()]);
    let lines = String::from_utf8(export.stdout).unwrap();
    assert!(lines.lines().all(|line| serde_json::from_str::<Value>(line).is_ok()));
    assert!(lines.lines().count() >= 3);

    // Tampering with n3's copy of n1's chain, each way.
    let (code, text) = verify_after(&n3_dir, "n1", |lines| {
        lines[1] = lines[1].replace("\"outcome\":\"ok\"", "\"outcome\":\"forbidden\"");
    });
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("record 2 was changed"), "{text}");
    let (code, text) = verify_after(&n3_dir, "n1", |lines| {
        lines.remove(1);
    });
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("removed or reordered"), "{text}");
    let (code, text) = verify_after(&n3_dir, "n1", |lines| lines.swap(0, 1));
    assert_eq!(code, Some(4), "{text}");
    let (code, text) = verify_after(&n3_dir, "n1", |_| {});
    assert_eq!(code, Some(0), "an untouched copy verifies: {text}");
    // A deletion dressed as a gap passes in a copy (reported as never received), never in the
    // node's own chain.
    let as_gap = |lines: &mut Vec<String>| lines[1] = r#"{"gap":{"from":2,"to":2}}"#.to_owned();
    let (code, text) = verify_after(&n3_dir, "n1", as_gap);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("never received here: 2-2"), "{text}");
    let (code, text) = verify_after(&n1.data_dir, "n1", as_gap);
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("own chain claims records it never received"), "{text}");
}
