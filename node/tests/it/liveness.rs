//! Liveness on real processes (issue 11): a node that cannot judge its peers yet (just restarted,
//! just resumed from SIGSTOP) shows them `unknown` or `live`, never `dead`; a crash right after a
//! partition heals is still detected within the bound; connections cut by a partition are
//! replaced soon after the heal. Partitions use network namespaces and nftables (`netns.rs`): that
//! test needs root, `ip` and `nft`, and fails naming what is missing.
//!
//! The figures (detection and reconnect times) are printed; `KONOR_LIVENESS_RUNS=N` repeats the
//! partition scenario N times (3 by default) for min/median/max.

use std::collections::BTreeMap;
use std::time::Duration;

use konor_sdk::client::Client;
use konor_sdk::protocol::{Request, WriteMeta};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{Cluster, NetnsMesh, eventually, group_on_all, node_states, start_mesh};

/// The harness's gossip period (`--gossip-interval-ms 100`).
const GOSSIP: Duration = Duration::from_millis(100);

/// The detection bound the docs state for that period: eight gossip intervals (phi threshold
/// 8 x the mean interval), plus one gossip round (chitchat judges after each) and one
/// membership poll (100 ms).
const BOUND: Duration = Duration::from_millis(8 * GOSSIP.as_millis() as u64 + GOSSIP.as_millis() as u64 + 100);

/// What a test polling over the socket adds on a loaded 2-core machine: the poll period (20 ms)
/// and scheduling delays. The regression this guards against took several seconds.
const SLACK: Duration = Duration::from_millis(500);

/// How often the views are sampled.
const SAMPLE: Duration = Duration::from_millis(20);

/// Samples `client`'s view until `window` has passed since `since`; fails on a peer in `healthy`
/// shown `dead`. Returns when every healthy peer was first seen `live`, if it was.
async fn never_dead(client: &Client, healthy: &[&str], since: Instant, window: Duration) -> Option<Duration> {
    let mut all_live = None;
    let mut seen: Vec<(u128, BTreeMap<String, String>)> = Vec::new();
    while since.elapsed() < window {
        if let Some(states) = node_states(client).await {
            for peer in healthy {
                assert_ne!(
                    states.get(*peer).map(String::as_str),
                    Some("dead"),
                    "{peer} shown dead {:?} after the start of the window; views so far: {seen:?}",
                    since.elapsed()
                );
            }
            if all_live.is_none() && healthy.iter().all(|peer| states.get(*peer).is_some_and(|s| s == "live")) {
                all_live = Some(since.elapsed());
            }
            seen.push((since.elapsed().as_millis(), states));
        }
        tokio::time::sleep(SAMPLE).await;
    }
    all_live
}

/// Waits until `client` shows `peer` in `state`; how long it took from `since`.
async fn until_state(client: &Client, peer: &str, state: &str, since: Instant, limit: Duration) -> Duration {
    loop {
        if node_states(client).await.is_some_and(|states| states.get(peer).is_some_and(|s| s == state)) {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "{peer} not {state} after {limit:?}");
        tokio::time::sleep(SAMPLE).await;
    }
}

fn runs() -> usize {
    std::env::var("KONOR_LIVENESS_RUNS").ok().and_then(|text| text.parse().ok()).unwrap_or(3).max(1)
}

/// How long each partition lasts (`KONOR_LIVENESS_CUT_MS`, 4 s by default: shorter than QUIC's
/// 10 s idle timeout, so the old connections stay open through it).
fn cut_length() -> Duration {
    Duration::from_millis(
        std::env::var("KONOR_LIVENESS_CUT_MS").ok().and_then(|text| text.parse().ok()).unwrap_or(4_000),
    )
}

/// min / median / max, in milliseconds.
fn figures(times: &[Duration]) -> String {
    let mut ms: Vec<u128> = times.iter().map(Duration::as_millis).collect();
    ms.sort_unstable();
    match (ms.first(), ms.get(ms.len() / 2), ms.last()) {
        (Some(min), Some(median), Some(max)) => format!("{min}/{median}/{max} ms (min/median/max, n={})", ms.len()),
        _ => "no samples".to_owned(),
    }
}

fn set(key: &str, value: serde_json::Value) -> Request {
    Request::Set {
        group: "app".into(),
        entries: BTreeMap::from([(key.to_owned(), value)]),
        meta: WriteMeta { author: "it".into(), message: "liveness".into(), ..WriteMeta::default() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_kill_9_never_shows_its_healthy_peers_dead() {
    let cluster = Cluster::new();
    let (mut nodes, _clients) = start_mesh(&cluster, 3).await;
    // Let the detectors learn the gossip rhythm first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut live_after = Vec::new();
    for _ in 0..2 {
        nodes[2].kill9();
        let started = Instant::now();
        nodes[2].start();
        let client = nodes[2].client().await;
        let live = never_dead(&client, &["n1", "n2"], started, Duration::from_secs(2)).await;
        let live = match live {
            Some(live) => live,
            None => until_state(&client, "n1", "live", started, crate::harness::DEADLINE).await,
        };
        live_after.push(live);
    }
    println!("restart: healthy peers live on the restarted node after {}", figures(&live_after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_resumed_from_sigstop_never_shows_its_healthy_peers_dead() {
    let cluster = Cluster::new();
    let (nodes, clients) = start_mesh(&cluster, 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut live_after = Vec::new();
    for _ in 0..2 {
        nodes[2].pause();
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Its peers rightly saw it dead meanwhile.
        until_state(&clients[0], "n3", "dead", Instant::now(), Duration::from_secs(5)).await;
        nodes[2].resume();
        let resumed = Instant::now();
        let live = never_dead(&clients[2], &["n1", "n2"], resumed, Duration::from_secs(2)).await;
        let live = match live {
            Some(live) => live,
            None => until_state(&clients[2], "n1", "live", resumed, crate::harness::DEADLINE).await,
        };
        live_after.push(live);
        until_state(&clients[0], "n3", "live", resumed, crate::harness::DEADLINE).await;
    }
    println!("pause: healthy peers live on the resumed node after {}", figures(&live_after));
}

/// Three nodes in namespaces; n3 is cut off from n1 and n2 for 4 s at a time (the detectors on
/// both sides see the other side dead, the QUIC connections stay open: idle timeout 10 s).
/// After each heal: how long until both sides see each other live, how long a write made on n1
/// then takes to reach n3, and, in alternate heals, how long n1 and n2 take to see n3 dead when
/// it is killed right away. Plus the same crash without a partition, for comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_right_after_a_partition_heals_is_detected_within_the_bound() {
    let mut mesh = NetnsMesh::start(3).await;
    group_on_all(&mesh.clients, "app", "eventual").await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (mut mutual_live, mut replica, mut detection, mut plain_detection) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs() {
        for crash in [false, true] {
            mesh.lab.partition(&[&[0, 1], &[2]]);
            let cut = Instant::now();
            until_state(&mesh.clients[0], "n3", "dead", cut, Duration::from_secs(5)).await;
            until_state(&mesh.clients[2], "n1", "dead", cut, Duration::from_secs(5)).await;
            tokio::time::sleep(cut_length().saturating_sub(cut.elapsed())).await;
            mesh.lab.heal();
            let healed = Instant::now();
            for (client, peer) in
                [(&mesh.clients[0], "n3"), (&mesh.clients[1], "n3"), (&mesh.clients[2], "n1"), (&mesh.clients[2], "n2")]
            {
                until_state(client, peer, "live", healed, crate::harness::DEADLINE).await;
            }
            mutual_live.push(healed.elapsed());
            if crash {
                mesh.nodes[2].kill9();
                let killed = Instant::now();
                for client in &mesh.clients[..2] {
                    let took = until_state(client, "n3", "dead", killed, crate::harness::DEADLINE).await;
                    detection.push(took);
                    assert!(took <= BOUND + SLACK, "run {run}: crash after the heal seen in {took:?}");
                }
                mesh.nodes[2].start();
                mesh.clients[2] = mesh.nodes[2].client().await;
                for (client, peer) in [(&mesh.clients[0], "n3"), (&mesh.clients[2], "n1"), (&mesh.clients[2], "n2")] {
                    until_state(client, peer, "live", Instant::now(), crate::harness::DEADLINE).await;
                }
            } else {
                let key = format!("after-heal-{run}");
                let written = Instant::now();
                mesh.clients[0].call(set(&key, json!(run))).await.unwrap();
                let client = mesh.clients[2].clone();
                eventually("the write reaches n3", || async { client.get("app", &key).await.ok().flatten() }).await;
                replica.push(written.elapsed());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The same crash with no partition before it.
        mesh.nodes[2].kill9();
        let killed = Instant::now();
        for client in &mesh.clients[..2] {
            plain_detection.push(until_state(client, "n3", "dead", killed, crate::harness::DEADLINE).await);
        }
        mesh.nodes[2].start();
        mesh.clients[2] = mesh.nodes[2].client().await;
        for (client, peer) in [(&mesh.clients[0], "n3"), (&mesh.clients[2], "n1"), (&mesh.clients[2], "n2")] {
            until_state(client, peer, "live", Instant::now(), crate::harness::DEADLINE).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stuck_closed: usize = mesh
        .nodes
        .iter()
        .map(|node| std::fs::read_to_string(&node.log).unwrap_or_default().matches("connection to peer stuck").count())
        .sum();
    println!("partition of {:?}, gossip {GOSSIP:?}, stated bound {BOUND:?}:", cut_length());
    println!("  heal -> both sides see each other live: {}", figures(&mutual_live));
    println!("  write on n1 after the heal -> visible on n3: {}", figures(&replica));
    println!("  crash right after the heal -> dead on n1/n2: {}", figures(&detection));
    println!("  crash without a partition -> dead on n1/n2: {}", figures(&plain_detection));
    println!("  stuck connections closed (konord logs): {stuck_closed}");
}
