//! konord's fault layer (the chaos suite's delay, reordering, duplication and slow disk, for a
//! kernel without netem): a konord started with a control file slows what the file says, and
//! nothing once the file is emptied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use konor_node::fault_layer::applied_path;
use konor_sdk::Client;
use konor_sdk::protocol::{Request, Response, WatchEvent, WriteMeta};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{Cluster, Node, eventually, group_on_all, live_nodes};

/// Writes `key` on `client`'s node and returns how long the commit took.
async fn timed_write(client: &Client, key: &str) -> Duration {
    let started = Instant::now();
    let request = Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([(key.to_owned(), json!(1))]),
        meta: WriteMeta { author: "it".into(), message: String::new(), ..WriteMeta::default() },
    };
    let answer = client.call(request).await.unwrap();
    assert!(matches!(answer, Response::Committed { .. }), "{answer:?}");
    started.elapsed()
}

/// n1, and n2 seeded at it with a fault layer whose control file holds `faults` from the start;
/// both running. Returns them and n2's control file.
async fn two_nodes_n2_with_a_fault_layer(cluster: &Cluster, faults: &str) -> (Node, Node, PathBuf) {
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    // n2 is seeded at n1's address, known once n1 answers.
    n1.client().await;
    let mut n2 = cluster.node("n2", &[&n1]);
    let control = cluster.dir.path().join("n2-faults");
    std::fs::write(&control, faults).unwrap();
    n2.fault_control = Some(control.clone());
    n2.start();
    (n1, n2, control)
}

/// Sets the control file and waits for konord's acknowledgement.
async fn set_faults(control: &Path, text: &str) {
    std::fs::write(control, text).unwrap();
    eventually("konord acknowledges its fault settings", || async {
        std::fs::read_to_string(applied_path(control)).is_ok_and(|applied| applied == text).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_layer_slows_the_disk_and_the_peer_traffic_its_file_names() {
    let cluster = Cluster::new();
    let (mut n1, mut n2, control) = two_nodes_n2_with_a_fault_layer(&cluster, "").await;
    let clients = [n1.client().await, n2.client().await];
    group_on_all(&clients, "app", "eventual").await;
    timed_write(&clients[1], "warm").await;

    // A slow disk: n2's own write waits for its fsync.
    set_faults(&control, "fsync_delay=400ms").await;
    let slow = timed_write(&clients[1], "on-a-slow-disk").await;
    assert!(slow >= Duration::from_millis(400), "n2's write took {slow:?} on a disk with 400 ms fsyncs");

    // A slow link: n1's write waits for n2's ack (a live quorum of two), which leaves n2
    // through its delayed egress.
    set_faults(&control, "delay=300ms").await;
    let delayed = timed_write(&clients[0], "over-a-slow-link").await;
    assert!(delayed >= Duration::from_millis(300), "n1's write took {delayed:?} with n2's egress 300 ms late");

    // Emptied, the file heals both (acknowledged as such), and the mesh stays whole.
    set_faults(&control, "").await;
    timed_write(&clients[0], "healed").await;
    for client in &clients {
        eventually("both nodes hold every write", || async {
            match client.call(Request::Get { group: "app".into(), key: "healed".into() }).await {
                Ok(Response::Value { value: Some(_), .. }) => Some(()),
                _ => None,
            }
        })
        .await;
    }
}

/// The stamp of the version labelled `label` in `client`'s node's history of `app`.
async fn stamp_of(client: &Client, label: &str) -> u64 {
    let Ok(Response::History { versions, .. }) = client.call(Request::History { group: "app".into() }).await else {
        panic!("no history")
    };
    versions.iter().find(|row| row.label == label).map(|row| row.time_ms).unwrap_or_else(|| panic!("no {label}"))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A clock jump (`clock_offset`) moves what konord reads as the time of day: the stamps of the
/// versions it writes, and the clock that judges certificates at a handshake. A node started
/// two hours behind (its clock jumps back past the CA's one-hour skew allowance once its own
/// credentials are loaded) finds every peer certificate not yet
/// valid and stays out of the mesh until its clock comes back; jumps within the allowance, either
/// way, change stamps and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_jump_moves_stamps_and_certificate_checks() {
    const HOUR_MS: u64 = 3_600_000;
    let cluster = Cluster::new();
    let (mut n1, mut n2, control) = two_nodes_n2_with_a_fault_layer(&cluster, "clock_offset=-2h").await;
    let (c1, c2) = (n1.client().await, n2.client().await);
    // n2 says why it cannot reach n1 (and n1 logs each handshake n2 aborted).
    eventually("n2 refuses n1's certificate as not yet valid", || async {
        let log = std::fs::read_to_string(&n2.log).unwrap_or_default();
        log.lines()
            .any(|line| line.contains("TLS handshake with a peer failed") && line.contains("not valid yet"))
            .then_some(())
    })
    .await;
    assert_eq!(live_nodes(&c2).await, vec!["n2".to_owned()], "n2 joined with its clock two hours behind");

    // Back to the system clock, n2 joins.
    set_faults(&control, "").await;
    eventually("n2 joins once its clock is back", || async {
        (live_nodes(&c2).await.len() == 2 && live_nodes(&c1).await.len() == 2).then_some(())
    })
    .await;
    let clients = [c1, c2];
    group_on_all(&clients, "app", "eventual").await;

    // A day ahead, then 50 minutes behind: n2's versions carry its clock, and commit as before.
    set_faults(&control, "clock_offset=+1d").await;
    let ahead = write_label(&clients[1], "ahead").await;
    set_faults(&control, "clock_offset=-50m").await;
    let behind = write_label(&clients[1], "behind").await;
    let now = unix_ms();
    for client in &clients {
        let ahead_ms = stamp_of(client, &ahead).await;
        let behind_ms = stamp_of(client, &behind).await;
        assert!(ahead_ms > now + 23 * HOUR_MS, "the version written a day ahead is stamped {ahead_ms} (now {now})");
        assert!(behind_ms + 45 * 60_000 < now, "the version written 50 min behind is stamped {behind_ms} (now {now})");
    }
}

/// Writes `key` on `client`'s node and returns the label of the version it committed.
async fn write_label(client: &Client, key: &str) -> String {
    let request = Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([(key.to_owned(), json!(1))]),
        meta: WriteMeta { author: "it".into(), message: String::new(), ..WriteMeta::default() },
    };
    match client.call(request).await.unwrap() {
        Response::Committed { version, .. } => version,
        other => panic!("{other:?}"),
    }
}

/// Issue 14: n2 tells its watchers of a change n1 pushed while n2's own fsync of it still runs
/// (its disk takes 3 s per fsync here), and when a power cut then loses the change on n2, the
/// watcher resuming from the revision it was told gets an explicit resync (SPEC invariant 4:
/// revisions of the restarted node start above the lost run's), then the change again from n1,
/// which saved it. That the watcher was told before the fsync shows in the power cut: n2's
/// group file loses the change's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_told_before_its_nodes_fsync_gets_a_resync_after_a_power_cut_loses_the_change() {
    let cluster = Cluster::new();
    let (mut n1, mut n2, control) = two_nodes_n2_with_a_fault_layer(&cluster, "").await;
    let clients = [n1.client().await, n2.client().await];
    group_on_all(&clients, "app", "eventual").await;
    timed_write(&clients[0], "warm").await;
    let mut watch = clients[1].watch("app", None).await.unwrap();
    set_faults(&control, "fsync_delay=3s").await;
    let writer = clients[0].clone();
    let write = tokio::spawn(async move {
        let request = Request::Set {
            group: "app".into(),
            entries: BTreeMap::from([("told".to_owned(), json!(1))]),
            meta: WriteMeta { author: "it".into(), message: String::new(), ..WriteMeta::default() },
        };
        writer.call(request).await
    });
    let told = tokio::time::timeout(Duration::from_secs(20), watch.next()).await;
    let Ok(Some(Ok(WatchEvent::Change { revision: told_at, set, .. }))) = told else {
        panic!("n2's watcher was not told of the change: {told:?}")
    };
    assert_eq!(set.get("told"), Some(&json!(1)));
    // A power cut at once: n2's fsync of the change has not returned.
    n2.kill9();
    let file = n2.group_file("app");
    let before = std::fs::metadata(&file).unwrap().len();
    let ledger = std::fs::read_to_string(konor_node::fault_layer::disk::ledger_path(&control)).unwrap();
    konor_node::fault_layer::disk::DurableModel::from_ledger(&ledger).apply().unwrap();
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(after < before, "the power cut left n2's group file whole ({before} bytes): told after the fsync");
    std::fs::write(&control, "").unwrap();
    n2.start();
    let resumed = tokio::time::timeout(Duration::from_secs(30), watch.next()).await;
    let Ok(Some(Ok(WatchEvent::Resync { revision, settings, .. }))) = resumed else {
        panic!("the watcher resumed without a resync: {resumed:?}")
    };
    assert!(revision > told_at, "the restarted node's revision {revision} is not above {told_at}");
    if !settings.contains_key("told") {
        let again = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match watch.next().await {
                    Some(Ok(WatchEvent::Change { set, .. })) if set.contains_key("told") => return,
                    Some(_) => {}
                    None => panic!("the watch ended"),
                }
            }
        })
        .await;
        assert!(again.is_ok(), "the change did not come back to n2 from n1");
    }
    let _ = write.await;
    drop(n1);
}
