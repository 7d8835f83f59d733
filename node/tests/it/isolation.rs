//! CPU isolation (issue 12, item 3): Automerge's heavy steps (a catch-up of a long history, a
//! load, a save) run on the daemon's own thread, so the gossip heartbeats, the QUIC connections
//! and the socket keep going while they run, and peers never judge a busy node dead.
//!
//! `KONOR_CATCHUP_CHANGES=N` sets the history the restarted node catches up (1,000 in CI, where
//! the daemon of a 2-core machine is busy for seconds; 50,000 by hand, docs/testing.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use konor_sdk::protocol::{Request, Response, WriteMeta};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{Cluster, eventually, group_on_all, node_states, start_mesh};

/// Changes written while the node is down, unless `KONOR_CATCHUP_CHANGES` says otherwise.
const CATCHUP_CHANGES_DEFAULT: usize = 1_000;

/// Writers at once: enough to keep the writing daemon's group commits full.
const WRITERS: usize = 16;

/// How long a catch-up may take before the test fails (the whole history, applied on a loaded
/// 2-core machine), at least; longer histories get 20 ms per change.
const CATCHUP_DEADLINE_MIN: Duration = Duration::from_secs(600);

/// How often the peers' views are sampled.
const SAMPLE: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_catching_up_a_long_history_is_never_judged_dead() {
    let changes: usize =
        std::env::var("KONOR_CATCHUP_CHANGES").ok().and_then(|n| n.parse().ok()).unwrap_or(CATCHUP_CHANGES_DEFAULT);
    let catchup_deadline =
        CATCHUP_DEADLINE_MIN.max(Duration::from_millis(20) * u32::try_from(changes).unwrap_or(u32::MAX));
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = start_mesh(&cluster, 3).await;
    group_on_all(&clients, "big", "eventual").await;

    // n3 goes away; n1 writes the history it will have to catch up.
    assert!(nodes[2].stop().success());
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let client = clients[0].clone();
            tokio::spawn(async move {
                for index in (writer..changes).step_by(WRITERS) {
                    let entries = BTreeMap::from([(format!("k{}", index % 1_000), json!(index))]);
                    let request = Request::Set { group: "big".into(), entries, meta: WriteMeta::default() };
                    match client.call(request).await {
                        Ok(Response::Committed { .. }) => {}
                        other => panic!("write {index}: {other:?}"),
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let done = json!(changes);
    let last = Request::Set {
        group: "big".into(),
        entries: BTreeMap::from([("done".to_owned(), done.clone())]),
        meta: WriteMeta::default(),
    };
    assert!(matches!(clients[0].call(last).await, Ok(Response::Committed { .. })));
    eprintln!("wrote {} changes in {:?}", changes + 1, started.elapsed());

    // n3 comes back and catches up; n1 and n2 are sampled the whole time.
    nodes[2].start();
    let restarted = Instant::now();
    clients[2] = nodes[2].client().await;
    let watchers = [clients[0].clone(), clients[1].clone()];
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sampling = stop.clone();
    let sampler = tokio::spawn(async move {
        // Per peer: when n3 was first seen live again, and every state seen after that.
        let mut seen_live: [Option<Duration>; 2] = [None, None];
        let mut after_live: Vec<(usize, u128, String)> = Vec::new();
        loop {
            for (index, client) in watchers.iter().enumerate() {
                let Some(states) = node_states(client).await else { continue };
                let state = states.get("n3").cloned().unwrap_or_default();
                if seen_live[index].is_none() && state == "live" {
                    seen_live[index] = Some(restarted.elapsed());
                }
                if seen_live[index].is_some() {
                    after_live.push((index, restarted.elapsed().as_millis(), state));
                }
            }
            tokio::time::sleep(SAMPLE).await;
            if restarted.elapsed() > catchup_deadline {
                return (seen_live, after_live);
            }
            if stop.load(Ordering::Relaxed) {
                return (seen_live, after_live);
            }
        }
    });
    let deadline = restarted + catchup_deadline;
    let caught_up = loop {
        let answer = clients[2].call(Request::Get { group: "big".into(), key: "done".into() }).await;
        if let Ok(Response::Value { value: Some(value), .. }) = &answer
            && *value == done
        {
            break restarted.elapsed();
        }
        assert!(Instant::now() < deadline, "n3 did not catch up in {catchup_deadline:?}: {answer:?}");
        tokio::time::sleep(SAMPLE).await;
    };
    stop_sampling.store(true, Ordering::Relaxed);
    let (seen_live, after_live) = sampler.await.unwrap();
    eprintln!("n3 caught up {} changes {caught_up:?} after its restart; first seen live at {seen_live:?}", changes + 1);
    for (index, first) in seen_live.iter().enumerate() {
        assert!(first.is_some(), "n{} never saw n3 live again", index + 1);
    }
    let not_live: Vec<_> = after_live.iter().filter(|(_, _, state)| state != "live").collect();
    assert!(
        not_live.is_empty(),
        "after it was seen live, n3 left live while it caught up (peer index, ms after restart, state): {not_live:?}"
    );
    // The catch-up happened after the peers saw n3 live, so the samples cover it.
    let covered = seen_live.iter().flatten().max().copied().unwrap_or_default();
    eprintln!("n3 was live in every sample from {covered:?} to {caught_up:?}");
    let _ = eventually("n3 still live after the catch-up", || async {
        let states = node_states(&clients[0]).await?;
        (states.get("n3").map(String::as_str) == Some("live")).then_some(())
    })
    .await;
}
