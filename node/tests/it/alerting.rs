//! Alerts on real processes (issue 15): two of three nodes of a label killed at once raise
//! `label_lost` on the node that sees it, which logs it, lists it in `konorctl alerts`, fails
//! `konorctl health --max-dead 0` (exit 6) and POSTs it to its webhook, retrying a receiver
//! that first answers 503, without the webhook's token ever reaching its log. The health
//! history shows a peer's fall and survives a restart of the node that kept it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;

use crate::harness::{Cluster, await_whole_mesh, eventually, konorctl_on};

/// A webhook receiver on loopback: answers 503 to the first request and 200 after; sends each
/// request's (path, body) on the channel.
fn receiver() -> (u16, mpsc::Receiver<(String, serde_json::Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for (served, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let status = if served == 0 { "503 Service Unavailable" } else { "200 OK" };
            let _ = stream.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes());
            let path = request_line.split(' ').nth(1).unwrap_or_default().to_owned();
            if tx.send((path, serde_json::from_slice(&body).unwrap())).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_losing_most_of_its_nodes_raises_an_alert_in_the_log_konorctl_and_the_webhook() {
    let cluster = Cluster::new();
    let (port, notices) = receiver();
    let settings = cluster.dir.path().join("n1.toml");
    std::fs::write(&settings, format!("alert-webhook = [\"http://127.0.0.1:{port}/hooks/T0?token=SECRET-TOKEN\"]\n"))
        .unwrap();
    let mut n1 = cluster.node("n1", &[]);
    n1.extra_args = vec!["--config".into(), settings.to_str().unwrap().into(), "--label".into(), "zone=a".into()];
    n1.start();
    let mut clients = vec![n1.client().await];
    let mut nodes = vec![n1];
    for id in ["n2", "n3", "n4"] {
        let mut node = cluster.node(id, &[&nodes[0]]);
        node.extra_args = vec!["--label".into(), "zone=b".into()];
        node.start();
        clients.push(node.client().await);
        nodes.push(node);
    }
    await_whole_mesh(&nodes, &clients).await;
    let socket = nodes[0].socket.clone();
    let healthy = konorctl_on(&socket, &["health", "--max-dead", "0"]);
    let text = String::from_utf8_lossy(&healthy.stdout);
    assert_eq!(healthy.status.code(), Some(0), "{text}");
    assert!(text.contains("node n1: healthy") && text.contains("4 live"), "{text}");

    nodes[2].kill9();
    nodes[3].kill9();
    let alerts = eventually("n1 raises label_lost for zone=b", || {
        let socket = socket.clone();
        async move {
            let output = konorctl_on(&socket, &["alerts", "--output", "json"]);
            let answer: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
            let active = answer["alerts"]["active"].as_array()?.clone();
            active.iter().any(|alert| alert["kind"] == "label_lost" && alert["subject"] == "zone=b").then_some(active)
        }
    })
    .await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let message = alerts[0]["message"].as_str().unwrap();
    assert!(message.contains("n3") && message.contains("n4"), "{message}");

    let unhealthy = konorctl_on(&socket, &["health", "--max-dead", "0"]);
    let text = String::from_utf8_lossy(&unhealthy.stdout);
    assert_eq!(unhealthy.status.code(), Some(6), "{text}");
    assert!(text.contains("fails: 2 dead members, more than 0") && text.contains("label_lost"), "{text}");

    // The webhook: the first POST got 503, the retry is taken. Both carry the same notice.
    let wait = std::time::Duration::from_secs(30);
    let (first_path, first) = notices.recv_timeout(wait).expect("no webhook POST");
    let (_, retried) = notices.recv_timeout(wait).expect("the webhook was not retried after a 503");
    assert_eq!(first, retried);
    assert_eq!(first_path, "/hooks/T0?token=SECRET-TOKEN");
    assert_eq!(first["node"], "n1");
    assert_eq!(first["event"], "raised");
    assert_eq!(first["alert"]["kind"], "label_lost");
    assert_eq!(first["alert"]["subject"], "zone=b");

    let log = std::fs::read_to_string(&nodes[0].log).unwrap();
    assert!(log.contains("alert: 2 of 3 nodes with zone=b fell dead"), "{log}");
    assert!(!log.contains("SECRET-TOKEN"), "the webhook's token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_history_shows_a_peers_fall_and_survives_a_restart() {
    let cluster = Cluster::new();
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let mut clients = vec![n1.client().await];
    let mut n2 = cluster.node("n2", &[&n1]);
    n2.extra_args = vec!["--label".into(), "zone=b".into()];
    n2.start();
    clients.push(n2.client().await);
    let mut nodes = vec![n1, n2];
    await_whole_mesh(&nodes, &clients).await;
    let socket = nodes[0].socket.clone();
    let history_of_n2 = |socket: std::path::PathBuf| async move {
        let output = konorctl_on(&socket, &["node-history", "n2", "--output", "json"]);
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
        let states: Vec<String> = answer["history"]["transitions"]
            .as_array()?
            .iter()
            .map(|change| change["state"].as_str().unwrap_or_default().to_owned())
            .collect();
        Some((states, answer))
    };

    nodes[1].kill9();
    let (states, answer) = eventually("n1's history shows n2 dead", || {
        let socket = socket.clone();
        async move { history_of_n2(socket).await.filter(|(states, _)| states.last().is_some_and(|s| s == "dead")) }
    })
    .await;
    // Seen live first (its state, not a change), then one change: dead.
    assert_eq!(states, ["dead"], "{answer}");
    let minutes = answer["history"]["minutes"].as_array().unwrap();
    assert!(minutes.iter().any(|bucket| bucket["live"].as_u64() > Some(0)), "{answer}");
    let mesh = konorctl_on(&socket, &["node-history"]);
    let text = String::from_utf8_lossy(&mesh.stdout);
    assert!(text.contains("n2") && text.contains("dead") && text.contains("zone=b"), "{text}");

    // A restart keeps it: saved at shutdown, read back at start.
    nodes[0].stop();
    assert!(nodes[0].data_dir.join(konor_node::daemon::HISTORY_FILE).exists());
    nodes[0].start();
    let _ = nodes[0].client().await;
    let (after, _) = eventually("n1 answers n2's history after its restart", || {
        let socket = socket.clone();
        async move { history_of_n2(socket).await }
    })
    .await;
    assert_eq!(after[..states.len()], states[..], "the history before the restart was lost: {after:?}");
    let log = std::fs::read_to_string(&nodes[0].log).unwrap();
    assert!(log.contains("health history loaded"), "{log}");
}
