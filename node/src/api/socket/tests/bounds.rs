//! Issue 12: what a connection, a user and all connections together may hold of the daemon,
//! and the envelope rules (ids, sizes, names) checked before anything is allocated.

use std::collections::BTreeSet;

use crate::limits::{
    CONNECTION_READ_BYTES_MAX, CONNECTION_WRITE_BYTES_MAX, HELLO_FRAME_BYTES_MAX, IO_TIMEOUT, REQUESTS_IN_FLIGHT_MAX,
};

use super::*;

const MIB: usize = 1024 * 1024;

/// A raw connection that said hello and read its welcome.
async fn greeted(path: &Path) -> UnixStream {
    let mut stream = raw_connect(path).await;
    stream.write_all(&request_frame(1, hello())).await.unwrap();
    assert!(matches!(
        read_raw(&mut stream).await,
        Some(ServerFrame::Response { id: 1, response: Response::Welcome { .. } })
    ));
    stream
}

/// A raw connection that said hello and watches [`GROUP`], and will read nothing more unless
/// the test does.
async fn watcher(path: &Path) -> UnixStream {
    let mut stream = greeted(path).await;
    stream.write_all(&request_frame(2, watch_request(GROUP))).await.unwrap();
    assert!(matches!(read_raw(&mut stream).await, Some(ServerFrame::Response { id: 2, .. })));
    stream
}

fn held_write(bytes: usize) -> Request {
    let entries = BTreeMap::from([("k".to_owned(), json!("x".repeat(bytes)))]);
    Request::Set { group: HELD.into(), entries, meta: Default::default() }
}

fn watch_request(group: &str) -> Request {
    Request::Watch { group: group.into(), from_revision: None, prefix: None }
}

fn count(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// An id-0 error with its message, or a panic.
fn connection_error(frame: Option<ServerFrame>) -> (ErrorCode, String) {
    match frame {
        Some(ServerFrame::Response { id: 0, response: Response::Error { code, message } }) => (code, message),
        other => panic!("expected an id-0 error frame, got {other:?}"),
    }
}

/// Two threads, and a yield after each event, so the socket moves events on to the writer
/// (which blocks on the client) while the daemon pushes, as in konord.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_is_never_read_holds_at_most_its_connections_write_budget() {
    let harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);
    let slow = watcher(&harness.path).await;
    // Events of half a MiB each, until twice the budget was pushed; the client reads none.
    let value = "x".repeat(MIB / 2);
    for index in 0..(2 * CONNECTION_WRITE_BYTES_MAX / (MIB / 2)) {
        push_change(&harness.daemon, &[("big", json!([index, value]))], &[]);
        tokio::task::yield_now().await;
    }
    assert_eq!(count(&harness.stats.watches_dropped), 1, "the watch fell behind and was dropped");
    assert!(harness.daemon.lock().unwrap().watchers.is_empty(), "the daemon let go of it");
    let peak = harness.stats.write.peak();
    assert!(peak <= CONNECTION_WRITE_BYTES_MAX as u64, "queued {peak} bytes for one connection");
    assert!(peak >= CONNECTION_WRITE_BYTES_MAX as u64 / 2, "the watch filled its budget first: {peak}");
    // What was queued goes back at once (the connection closes without flushing it to a client
    // that does not read; it resumes elsewhere), well before the writer would give up.
    let released = tokio::time::timeout(IO_TIMEOUT / 4, async {
        while harness.stats.write.held() > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    assert!(
        released.await.is_ok(),
        "{} bytes still queued for a client that does not read",
        harness.stats.write.held()
    );
    fresh_client_reads(&harness.path).await;
    drop(slow);
}

#[tokio::test]
async fn slow_watchers_together_hold_at_most_the_sockets_write_budget() {
    let pool = 3 * MIB;
    let harness = start(|config| config.stats = Arc::new(LocalApiStats::with_budgets(64 * MIB, pool))).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(watcher(&harness.path).await);
    }
    let value = "x".repeat(MIB / 2);
    for index in 0..32 {
        push_change(&harness.daemon, &[("big", json!([index, value]))], &[]);
    }
    assert_eq!(count(&harness.stats.watches_dropped), 2);
    let peak = harness.stats.write.peak();
    assert!(peak <= pool as u64, "queued {peak} bytes over a pool of {pool}");
    wait_until(|| harness.stats.write.held() == 0).await;
    fresh_client_reads(&harness.path).await;
}

/// A change goes to every watcher as one shared frame, so it counts once against the socket's
/// budget: many readers of one group are not dropped by a change larger than budget / readers.
#[tokio::test]
async fn a_change_counts_once_against_the_sockets_budget_however_many_watch_it() {
    let pool = 3 * MIB;
    let harness = start(|config| config.stats = Arc::new(LocalApiStats::with_budgets(64 * MIB, pool))).await;
    let mut watchers = Vec::new();
    for _ in 0..8 {
        watchers.push(watcher(&harness.path).await);
    }
    let revision = push_change(&harness.daemon, &[("big", json!("x".repeat(MIB)))], &[]);
    assert_eq!(count(&harness.stats.watches_dropped), 0, "8 MiB went out with 3 MiB of budget");
    for stream in &mut watchers {
        match read_raw(stream).await {
            Some(ServerFrame::Event { event }) => assert_eq!(event.revision(), revision),
            other => panic!("expected the change, got {other:?}"),
        }
    }
    assert!(harness.stats.write.peak() <= pool as u64);
}

#[tokio::test]
async fn requests_waiting_for_the_daemon_hold_at_most_the_connections_read_budget() {
    let harness = start(|_| {}).await;
    let stream = greeted(&harness.path).await;
    let (mut reader, mut writer) = stream.into_split();
    let frame = request_frame(2, held_write(MIB));
    let fitting = CONNECTION_READ_BYTES_MAX / (frame.len() - 4);
    let sent = fitting + 16;
    assert!(sent < REQUESTS_IN_FLIGHT_MAX, "the byte budget binds before the cap on requests");
    let writing = tokio::spawn(async move {
        for id in 2..2 + sent as u64 {
            writer.write_all(&request_frame(id, held_write(MIB))).await.unwrap();
        }
        writer
    });
    // The daemon gets what fits in the budget, and the reader stops there: the client waits.
    wait_until(|| harness.daemon.lock().unwrap().held.len() == fitting).await;
    assert!(!writing.is_finished(), "the client is held back");
    let peak = harness.stats.read.peak();
    assert!(peak <= CONNECTION_READ_BYTES_MAX as u64, "read ahead {peak} bytes");
    // Answers free the budget; every request is answered.
    release_held(&harness.daemon);
    let mut answered = BTreeSet::new();
    while answered.len() < sent {
        match read_raw(&mut reader).await {
            Some(ServerFrame::Response { id, response: Response::Done }) => assert!(answered.insert(id)),
            other => panic!("expected done, got {other:?}"),
        }
    }
    let _writer = writing.await.unwrap();
    wait_until(|| harness.stats.read.held() == 0).await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_not_one_with_a_watch_a_request_in_flight_or_a_report() {
    let mut harness = start(|config| config.idle_timeout = Duration::from_millis(300)).await;
    let client = Client::connect(&harness.path).await.unwrap();
    let mut watch = client.watch(GROUP, None).await.unwrap();
    assert_eq!(harness.watch_requests.recv().await.unwrap(), None);
    let mut busy = greeted(&harness.path).await;
    busy.write_all(&request_frame(2, held_write(8))).await.unwrap();
    wait_until(|| harness.daemon.lock().unwrap().held.len() == 1).await;
    // A process whose apply report `status` shows stays connected, as its row must.
    let mut reporter = greeted(&harness.path).await;
    let report =
        Request::ReportApply { group: GROUP.into(), version: "v0".into(), revision: 0, result: ApplyResult::Ok };
    reporter.write_all(&request_frame(2, report)).await.unwrap();
    assert!(matches!(read_raw(&mut reporter).await, Some(ServerFrame::Response { id: 2, response: Response::Done })));
    // Opened last, so when it is closed the others have been open longer than the timeout.
    let mut idle = greeted(&harness.path).await;
    let (code, message) = connection_error(read_raw(&mut idle).await);
    assert_eq!(code, ErrorCode::Idle);
    assert!(message.contains("idle"), "{message}");
    assert!(read_raw(&mut idle).await.is_none(), "closed after the idle frame");
    // The client's own idle connection went the same way; its next call reconnects.
    wait_until(|| count(&harness.stats.idle_closed) == 2).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);
    assert_eq!(client.get(GROUP, "a").await.unwrap(), Some(json!(1)));
    // The watch kept its connection (no resubscription) and the held request is answered.
    assert_eq!(next_event(&mut watch).await.revision(), 1);
    assert!(harness.watch_requests.try_recv().is_err(), "the watch never had to resubscribe");
    release_held(&harness.daemon);
    assert!(matches!(read_raw(&mut busy).await, Some(ServerFrame::Response { id: 2, response: Response::Done })));
    reporter.write_all(&request_frame(3, Request::GroupList)).await.unwrap();
    assert!(matches!(read_raw(&mut reporter).await, Some(ServerFrame::Response { id: 3, .. })));
}

#[tokio::test]
async fn one_user_cannot_take_every_slot() {
    let harness = start(|config| {
        // The test runs as one user: cap it as if it were not konord's own.
        config.uncapped_uids = Some(Vec::new());
        config.connections_per_uid_max = 2;
    })
    .await;
    let first = Client::connect(&harness.path).await.unwrap();
    let _second = Client::connect(&harness.path).await.unwrap();
    match Client::connect(&harness.path).await.unwrap_err() {
        SdkError::Daemon { code: ErrorCode::Internal, message } => {
            assert!(message.contains("too many connections from uid"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(count(&harness.stats.refused), 1);
    drop(first);
    wait_until(|| count(&harness.stats.connections) == 1).await;
    Client::connect(&harness.path).await.unwrap();
}

#[tokio::test]
async fn id_zero_is_reserved_and_ids_in_use_cannot_be_reused() {
    let harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);

    let mut stream = raw_connect(&harness.path).await;
    stream.write_all(&request_frame(0, hello())).await.unwrap();
    let (code, message) = connection_error(read_raw(&mut stream).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("id 0 is reserved"), "{message}");
    assert!(read_raw(&mut stream).await.is_none());

    let mut stream = greeted(&harness.path).await;
    stream.write_all(&request_frame(0, Request::GroupList)).await.unwrap();
    assert_eq!(connection_error(read_raw(&mut stream).await).0, ErrorCode::BadRequest);
    assert!(read_raw(&mut stream).await.is_none());

    // An id may be used again once its answer came.
    let mut stream = greeted(&harness.path).await;
    for _ in 0..2 {
        stream.write_all(&request_frame(7, Request::Get { group: GROUP.into(), key: "a".into() })).await.unwrap();
        assert!(matches!(read_raw(&mut stream).await, Some(ServerFrame::Response { id: 7, .. })));
    }
    // Not while its request waits.
    stream.write_all(&request_frame(5, held_write(8))).await.unwrap();
    wait_until(|| harness.daemon.lock().unwrap().held.len() == 1).await;
    stream.write_all(&request_frame(5, Request::GroupList)).await.unwrap();
    let (code, message) = connection_error(read_raw(&mut stream).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("id 5 is already in use"), "{message}");
    assert!(read_raw(&mut stream).await.is_none());
    assert_eq!(count(&harness.stats.bad_frames), 3);
}

#[tokio::test]
async fn names_and_sizes_are_checked_before_the_daemon_sees_a_request() {
    let mut harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);
    let mut stream = greeted(&harness.path).await;
    let huge = "g".repeat(MIB);
    stream.write_all(&request_frame(2, watch_request(&huge))).await.unwrap();
    let report = Request::ReportApply { group: GROUP.into(), version: huge, revision: 1, result: ApplyResult::Ok };
    stream.write_all(&request_frame(3, report)).await.unwrap();
    for id in [2, 3] {
        match read_raw(&mut stream).await {
            Some(ServerFrame::Response { id: answered, response: Response::Error { code, message } }) => {
                assert_eq!((answered, code), (id, ErrorCode::BadRequest));
                assert!(message.len() < 300, "the refusal does not echo the field: {} bytes", message.len());
            }
            other => panic!("expected bad_request, got {other:?}"),
        }
    }
    assert!(harness.watch_requests.try_recv().is_err(), "the daemon was not asked to watch");
    assert!(harness.reports.try_recv().is_err(), "the daemon kept no report");
    // The connection goes on.
    stream.write_all(&request_frame(4, Request::Get { group: GROUP.into(), key: "a".into() })).await.unwrap();
    assert!(matches!(
        read_raw(&mut stream).await,
        Some(ServerFrame::Response { id: 4, response: Response::Value { .. } })
    ));
}

#[tokio::test]
async fn a_first_frame_larger_than_a_hello_is_refused_from_its_header() {
    let harness = start(|_| {}).await;
    let mut stream = raw_connect(&harness.path).await;
    let announced = (HELLO_FRAME_BYTES_MAX + 1) as u32;
    stream.write_all(&announced.to_be_bytes()).await.unwrap();
    let (code, message) = connection_error(read_raw(&mut stream).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("must be a hello of at most"), "{message}");
    assert_eq!(harness.stats.read.peak(), 0, "nothing was held for it");
}

#[tokio::test]
async fn watches_take_places_in_flight_but_never_the_last_one() {
    let mut harness = start(|_| {}).await;
    push_change(&harness.daemon, &[("a", json!(1))], &[]);
    let mut stream = greeted(&harness.path).await;
    let watches = REQUESTS_IN_FLIGHT_MAX - 1;
    for index in 0..watches {
        stream.write_all(&request_frame(10 + index as u64, watch_request(&format!("app-{index}")))).await.unwrap();
    }
    for _ in 0..watches {
        assert!(matches!(
            read_raw(&mut stream).await,
            Some(ServerFrame::Response { response: Response::Watching { .. }, .. })
        ));
        harness.watch_requests.recv().await.unwrap();
    }
    stream.write_all(&request_frame(2, watch_request("app-last"))).await.unwrap();
    match read_raw(&mut stream).await {
        Some(ServerFrame::Response { id: 2, response: Response::Error { code: ErrorCode::BadRequest, message } }) => {
            assert!(message.contains("too many requests and watches"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The last place still serves requests, and an unwatch frees a place for a watch.
    stream.write_all(&request_frame(3, Request::Get { group: GROUP.into(), key: "a".into() })).await.unwrap();
    assert!(matches!(
        read_raw(&mut stream).await,
        Some(ServerFrame::Response { id: 3, response: Response::Value { .. } })
    ));
    stream.write_all(&request_frame(4, Request::Unwatch { group: "app-0".into() })).await.unwrap();
    assert!(matches!(read_raw(&mut stream).await, Some(ServerFrame::Response { id: 4, response: Response::Done })));
    stream.write_all(&request_frame(5, watch_request("app-last"))).await.unwrap();
    let answer = read_raw(&mut stream).await;
    assert!(matches!(answer, Some(ServerFrame::Response { id: 5, response: Response::Watching { .. } })), "{answer:?}");
}

/// Every request gets its answer: a watch unwatched before the daemon answered it included.
#[tokio::test]
async fn a_watch_unwatched_at_once_is_still_answered() {
    let harness = start(|_| {}).await;
    let mut stream = greeted(&harness.path).await;
    let mut both = request_frame(2, watch_request(GROUP));
    both.extend(request_frame(3, Request::Unwatch { group: GROUP.into() }));
    stream.write_all(&both).await.unwrap();
    let mut answered = BTreeSet::new();
    for _ in 0..2 {
        let Some(ServerFrame::Response { id, .. }) = read_raw(&mut stream).await else { panic!("no answer") };
        answered.insert(id);
    }
    assert_eq!(answered, BTreeSet::from([2, 3]));
    // The place the watch took is free again: 63 watches fit.
    for index in 0..REQUESTS_IN_FLIGHT_MAX as u64 - 1 {
        stream.write_all(&request_frame(10 + index, watch_request(&format!("app-{index}")))).await.unwrap();
        let answer = read_raw(&mut stream).await;
        assert!(
            matches!(answer, Some(ServerFrame::Response { response: Response::Watching { .. }, .. })),
            "{answer:?}"
        );
    }
}

#[tokio::test]
async fn socket_stats_are_answered_by_the_socket() {
    let harness = start(|_| {}).await;
    let client = Client::connect(&harness.path).await.unwrap();
    let Response::SocketStats { stats } = client.call(Request::SocketStats).await.unwrap() else { panic!() };
    assert_eq!(stats.connections, 1);
    assert_eq!((stats.read_bytes_max, stats.write_bytes_max), (harness.stats.read.max(), harness.stats.write.max()));
    assert!(stats.read_bytes > 0, "the request itself is held while it is answered");
}
