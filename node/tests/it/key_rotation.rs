//! Group key rotation on real konords (issue 17, item 5): `group rotate-key` moves every member
//! to a new key (a member down at the time too, when it comes back), writes go on, and the old
//! key no longer admits a node: the one that left cannot join again with it.

use std::path::Path;

use crate::harness::{Cluster, eventually, konorctl_on, ok_json, start_mesh};

/// The generation of the key `node_dir` holds for `group` (its key file: the first line is the
/// key, a `generation N` line follows once it was rotated).
fn generation(node_dir: &Path, group: &str) -> Option<u64> {
    let text = std::fs::read_to_string(node_dir.join("groups").join(format!("{group}.key"))).ok()?;
    text.lines().find_map(|line| line.strip_prefix("generation ")).map_or(Some(0), |n| n.parse().ok())
}

fn first_line(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().lines().next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_move_to_the_new_key_and_the_old_one_admits_nobody() {
    let cluster = Cluster::new();
    let (mut nodes, _clients) = start_mesh(&cluster, 3).await;
    let old_key = cluster.dir.path().join("old.key");
    let new_key = cluster.dir.path().join("new.key");
    let json = |socket: &Path, args: &[&str]| {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        ok_json(&konorctl_on(socket, &all))
    };
    json(&nodes[0].socket, &["group", "create", "app", "--mode", "eventual", "--key-out", old_key.to_str().unwrap()]);
    for node in &nodes[1..] {
        json(&node.socket, &["group", "join", "app", "--key-file", old_key.to_str().unwrap()]);
    }
    // Whom n1 counts as holding the group (gossip carries each member's proof).
    let n1_socket = nodes[0].socket.clone();
    let holders = |socket: &Path| -> Vec<String> {
        let status = ok_json(&konorctl_on(socket, &["--output", "json", "status", "app"]));
        status["nodes"].as_array().unwrap().iter().map(|row| row["node"].as_str().unwrap().to_owned()).collect()
    };
    eventually("n1 sees n2 and n3 hold the group", || {
        let holders = holders(&n1_socket);
        async move { (holders.contains(&"n2".to_owned()) && holders.contains(&"n3".to_owned())).then_some(()) }
    })
    .await;
    json(&nodes[2].socket, &["group", "leave", "app"]);
    // Rotate once n1 has heard of the leave (a leave spreads by gossip: a node that left a
    // moment before a rotation is still entitled; docs/operations.md "Group keys").
    eventually("n1 sees that n3 left", || {
        let holders = holders(&n1_socket);
        async move { (!holders.contains(&"n3".to_owned())).then_some(()) }
    })
    .await;
    // n2 is down while the key changes.
    nodes[1].kill9();

    let rotated = json(&nodes[0].socket, &["group", "rotate-key", "app", "--key-out", new_key.to_str().unwrap()]);
    assert_eq!((rotated["rotated"].as_str(), rotated["generation"].as_u64()), (Some("app"), Some(1)), "{rotated}");
    assert_ne!(first_line(&old_key), first_line(&new_key));
    assert_eq!(first_line(&nodes[0].data_dir.join("groups/app.key")), first_line(&new_key));
    assert_eq!(generation(&nodes[0].data_dir, "app"), Some(1));
    let key_file = std::fs::read_to_string(nodes[0].data_dir.join("groups/app.key")).unwrap();
    assert!(
        key_file.contains("entitled n2\n") && !key_file.contains("entitled n3"),
        "n2 was down, n3 left: {key_file:?}"
    );

    // status on n1 tells the rotation apart: n2 (down) still claims the group under the old key.
    let row = |socket: &Path, node: &str| -> serde_json::Value {
        let status = ok_json(&konorctl_on(socket, &["--output", "json", "status", "app"]));
        status["nodes"].as_array().unwrap().iter().find(|row| row["node"] == node).cloned().unwrap_or_default()
    };
    let n2_row = row(&n1_socket, "n2");
    assert_eq!((n2_row["other_key"].as_bool(), n2_row["key"].as_str()), (Some(true), None), "{n2_row}");
    assert!(row(&n1_socket, "n1")["key"].as_str().is_some_and(|id| id.starts_with("1-")));

    // n2 comes back holding the old key, asks n1 and is handed the new one.
    nodes[1].start();
    let n2_dir = nodes[1].data_dir.clone();
    eventually("n2 holds the new key", || {
        let generation = generation(&n2_dir, "app");
        async move { (generation == Some(1)).then_some(()) }
    })
    .await;
    assert_eq!(first_line(&n2_dir.join("groups/app.key")), first_line(&new_key));
    eventually("n1's status shows n2 on the new key", || {
        let n2_row = row(&n1_socket, "n2");
        async move {
            (n2_row["other_key"].is_null() && n2_row["key"].as_str().is_some_and(|id| id.starts_with("1-")))
                .then_some(())
        }
    })
    .await;
    let set = json(&nodes[1].socket, &["set", "app", "after=1"]);
    assert_eq!(set["type"], "committed", "{set}");
    eventually("n1 reads n2's write made under the new key", || {
        let got = konorctl_on(&n1_socket, &["--output", "json", "get", "app", "after"]);
        async move { (got.status.success() && ok_json(&got)["value"] == 1).then_some(()) }
    })
    .await;

    // n3 left before the rotation: the old key no longer admits it; the new one does.
    let refused = konorctl_on(&nodes[2].socket, &["group", "join", "app", "--key-file", old_key.to_str().unwrap()]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr).into_owned() + &String::from_utf8_lossy(&refused.stdout);
    assert!(text.contains("wrong group key"), "{text}");
    assert_eq!(generation(&nodes[2].data_dir, "app"), None, "nothing of the group was taken");
    json(&nodes[2].socket, &["group", "join", "app", "--key-file", new_key.to_str().unwrap()]);
    assert_eq!(generation(&nodes[2].data_dir, "app"), Some(1));
}
