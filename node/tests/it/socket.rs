//! The local socket of a real konord, spoken to frame by frame where the SDK would hide what is
//! tested: a client that never reads, and the watch rules docs/protocol.md states.

use std::time::{Duration, Instant};

use konor_sdk::protocol::{
    ClientFrame, ErrorCode, PROTOCOL_VERSION, Request, Response, ServerFrame, WatchEvent, decode_payload, encode_frame,
    frame_length,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::harness::{Cluster, DEADLINE, Node, eventually, group_on_all};

/// Resident memory of a process and its peak so far, in KiB (`VmRSS`, `VmHWM`).
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|line| line.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn send(stream: &mut UnixStream, id: u64, request: Request) {
    stream.write_all(&encode_frame(&ClientFrame { id, request }).unwrap()).await.unwrap();
}

/// The next frame, or `None` when konord closed the connection.
async fn receive(stream: &mut UnixStream) -> Option<ServerFrame> {
    tokio::time::timeout(DEADLINE, async {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await.ok()?;
        let mut payload = vec![0u8; frame_length(header).unwrap()];
        stream.read_exact(&mut payload).await.ok()?;
        Some(decode_payload(&payload).unwrap())
    })
    .await
    .expect("konord answered in time")
}

/// A raw connection that said hello and asked to watch `group` from `from_revision`; returns it
/// with the answer.
async fn subscribe(socket: &std::path::Path, group: &str, from_revision: Option<u64>) -> (UnixStream, Response) {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    send(&mut stream, 1, Request::Hello { protocol: PROTOCOL_VERSION, pid: std::process::id(), process: "it".into() })
        .await;
    assert!(matches!(receive(&mut stream).await, Some(ServerFrame::Response { id: 1, .. })));
    send(&mut stream, 2, Request::Watch { group: group.into(), from_revision, prefix: None }).await;
    match receive(&mut stream).await {
        Some(ServerFrame::Response { id: 2, response }) => (stream, response),
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// [`subscribe`], which must succeed; returns the `watching` revision.
async fn watching(socket: &std::path::Path, group: &str, from_revision: Option<u64>) -> (UnixStream, u64) {
    match subscribe(socket, group, from_revision).await {
        (stream, Response::Watching { revision, .. }) => (stream, revision),
        (_, other) => panic!("expected watching, got {other:?}"),
    }
}

/// A started node holding the eventual group `app`, and a client of it.
async fn node_with_app(cluster: &Cluster) -> (Node, konor_sdk::client::Client) {
    let mut n1 = cluster.node("n1", &[]);
    n1.start();
    let client = n1.client().await;
    group_on_all(std::slice::from_ref(&client), "app", "eventual").await;
    (n1, client)
}

async fn socket_stats(client: &konor_sdk::client::Client) -> konor_sdk::protocol::SocketStats {
    match client.call(Request::SocketStats).await.unwrap() {
        Response::SocketStats { stats } => stats,
        other => panic!("expected socket stats, got {other:?}"),
    }
}

/// About 1 MiB of settings: 64 keys of 15 KiB, named `k<first>..` and holding `version`.
fn megabyte(first: usize, version: usize) -> Request {
    let entries = (first..first + 64)
        .map(|key| (format!("k{key}"), json!(format!("{version:05}{}", "v".repeat(15_000)))))
        .collect();
    Request::Set { group: "app".into(), entries, meta: Default::default() }
}

/// Watchers in [`watchers_that_never_read_cost_konord_a_bounded_queue`]: their resyncs come near
/// the socket's write budget.
const WATCHERS: usize = 24;

/// Issue 12: clients watch a group and never read while another writes versions of large values:
/// each watcher is first sent a resync of 3.7 MiB, then every version (one frame shared by all).
/// konord holds no more than its write budget for all of them together, serves other clients
/// throughout, and gives every byte back when the watchers go. (A debug build cannot fill the
/// budgets here before the watchers' writes time out: a resync of 3.7 MiB takes a third of a
/// second to build there, a version of 1 MiB most of a second, and a client that reads nothing
/// for 10 s is closed. `api/socket/tests/bounds.rs` fills each budget against the same server.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_never_read_cost_konord_a_bounded_queue() {
    use konor_node::limits::SOCKET_WRITE_BYTES_MAX;

    let cluster = Cluster::new();
    let (n1, writer) = node_with_app(&cluster).await;
    for first in [0, 64, 128, 192] {
        assert!(matches!(writer.call(megabyte(first, 0)).await.unwrap(), Response::Committed { .. }));
    }
    let pid = n1.child.as_ref().unwrap().id();
    let (rss_before, _) = memory_kib(pid);
    let mut slow = Vec::new();
    let mut refused = 0;
    let opening = Instant::now();
    for _ in 0..WATCHERS {
        // Above the node's revision: a resync of the whole group comes first.
        match subscribe(&n1.socket, "app", Some(u64::MAX / 2)).await {
            (stream, Response::Watching { .. }) => slow.push(stream),
            (_, Response::Error { code: ErrorCode::Internal, message }) => {
                assert!(message.contains("queue full"), "{message}");
                refused += 1;
            }
            (_, other) => panic!("expected watching or a full queue, got {other:?}"),
        }
    }
    let opening = opening.elapsed();
    let reader = konor_sdk::client::Client::connect(&n1.socket).await.unwrap();
    let started = Instant::now();
    let mut slowest_read = Duration::ZERO;
    let versions = 8;
    for version in 1..=versions {
        assert!(matches!(writer.call(megabyte(0, version)).await.unwrap(), Response::Committed { .. }));
        let asked = Instant::now();
        reader.get("app", "k0").await.unwrap();
        slowest_read = slowest_read.max(asked.elapsed());
    }
    let stats = socket_stats(&reader).await;
    let (rss_after, rss_peak) = memory_kib(pid);
    println!(
        "{WATCHERS} watchers opened in {opening:?}, {refused} refused; {versions} versions of ~1 MiB in {:?}; slowest \
         get {slowest_read:?}; write bytes peak {} (budget {SOCKET_WRITE_BYTES_MAX}); watches dropped {}; RSS \
         {rss_before} -> {rss_after} KiB, peak {rss_peak} KiB",
        started.elapsed(),
        stats.write_bytes_peak,
        stats.watches_dropped
    );
    assert!(
        stats.write_bytes_peak <= SOCKET_WRITE_BYTES_MAX as u64,
        "konord queued {} bytes, more than its write budget",
        stats.write_bytes_peak
    );
    assert!(slowest_read < Duration::from_secs(2), "other clients were served meanwhile ({slowest_read:?})");
    // Closing the watchers gives back what is still queued for them.
    drop(slow);
    eventually("every queue went back to the budget", || async {
        (socket_stats(&reader).await.write_bytes == 0).then_some(())
    })
    .await;
}

/// Issue 12, docs/protocol.md "Watch semantics": `from_revision` above the node's revision gets
/// one resync, at it nothing but later changes, below it the changes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_revision_above_at_and_below_the_current_revision() {
    let cluster = Cluster::new();
    let (n1, client) = node_with_app(&cluster).await;
    for value in 1..=2 {
        client
            .call(Request::Set {
                group: "app".into(),
                entries: [("a".to_owned(), json!(value))].into(),
                meta: Default::default(),
            })
            .await
            .unwrap();
    }
    let (_, current) = watching(&n1.socket, "app", None).await;

    let (mut above, _) = watching(&n1.socket, "app", Some(current + 10)).await;
    match receive(&mut above).await {
        Some(ServerFrame::Event { event: WatchEvent::Resync { revision, settings, .. } }) => {
            assert_eq!(revision, current);
            assert_eq!(settings["a"], json!(2));
        }
        other => panic!("expected a resync, got {other:?}"),
    }
    let (mut at, _) = watching(&n1.socket, "app", Some(current)).await;
    let (mut below, _) = watching(&n1.socket, "app", Some(current - 1)).await;
    match receive(&mut below).await {
        Some(ServerFrame::Event { event: WatchEvent::Change { revision, set, .. } }) => {
            assert_eq!((revision, &set["a"]), (current, &json!(2)));
        }
        other => panic!("expected the last change, got {other:?}"),
    }
    client
        .call(Request::Set {
            group: "app".into(),
            entries: [("a".to_owned(), json!(3))].into(),
            meta: Default::default(),
        })
        .await
        .unwrap();
    for stream in [&mut at, &mut below, &mut above] {
        match receive(stream).await {
            Some(ServerFrame::Event { event: WatchEvent::Change { revision, .. } }) => assert!(revision > current),
            other => panic!("expected the new change first, got {other:?}"),
        }
    }
}
