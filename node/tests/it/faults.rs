//! Consistency under real faults: pauses (SIGSTOP), kill -9, damaged group files, joins racing
//! writes.
//!
//! Each test states the contract users are promised (SPEC F10-F12, invariants 2 and 3), never
//! how the protocol keeps it, and collects every violation it sees before failing, so a failure
//! prints the figures (who answered what, acked by whom) rather than only the first symptom.
//! They were written to reproduce known failures of the all-ack barrier, on which every one of
//! them failed; they now check the same promises against strong groups by configuration
//! (eviction after `evict_after`, majority-recorded commit decisions, read leases, `not_durable`).

use std::time::Duration;

use konor_sdk::client::{Client, SdkError};
use konor_sdk::protocol::{ErrorCode, Freshness, Request, Response, WriteMeta};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::harness::{Cluster, DEADLINE, damage_records_from, eventually, group_on_all_with, start_mesh};

/// Eviction policy given to the strong groups of these tests: a member seen dead this long is
/// evicted from the group's configuration (SPEC F11), after which the others commit without it.
/// The shortest the daemon accepts (it must outlast any read lease the evicted node may hold),
/// so evictions happen well within a test.
const EVICT_AFTER_MS: u64 = konor_crdt::limits::EVICT_AFTER_MIN_MS;

/// How long reads are checked at least after a node comes back (and in any case until it serves
/// the latest value as fresh): its first moments, before it has heard from its peers, then its
/// catch-up (a few gossip rounds, one sync, a lease of 2 s, maybe its rejoin).
const READ_WINDOW: Duration = Duration::from_secs(2);

/// Pause between two reads of a read window: a tight loop that still leaves the two cores to
/// the daemons catching up.
const READ_PACING: Duration = Duration::from_millis(2);

fn set(group: &str, entries: &[(&str, Value)]) -> Request {
    Request::Set {
        group: group.into(),
        entries: entries.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        meta: WriteMeta { author: "faults".into(), message: String::new() },
    }
}

/// What a write was answered.
#[derive(Debug, Clone)]
enum Outcome {
    Committed {
        version: String,
        content_hash: String,
        acked_by: Vec<String>,
    },
    /// The daemon refused it with this code (aborted, busy, not committed...).
    Refused {
        code: ErrorCode,
        message: String,
    },
    /// No answer, a closed connection or a protocol error: outcome unknown.
    Unknown(String),
}

impl Outcome {
    fn of(result: Result<Response, SdkError>) -> Outcome {
        match result {
            Ok(Response::Committed { version, content_hash, acked_by, .. }) => {
                Outcome::Committed { version, content_hash, acked_by }
            }
            Ok(other) => Outcome::Unknown(format!("unexpected answer {other:?}")),
            Err(SdkError::Daemon { code, message }) => Outcome::Refused { code, message },
            Err(other) => Outcome::Unknown(other.to_string()),
        }
    }

    fn committed_acks(&self) -> Option<&[String]> {
        match self {
            Outcome::Committed { acked_by, .. } => Some(acked_by),
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Outcome::Committed { version, content_hash, acked_by } => {
                format!("committed {version} ({content_hash}) acked_by {acked_by:?}")
            }
            Outcome::Refused { code, message } => format!("{} ({message})", code.as_str()),
            Outcome::Unknown(detail) => format!("unknown outcome ({detail})"),
        }
    }
}

/// One read: the value served and its freshness, or why there was none.
async fn read(client: &Client, group: &str, key: &str) -> Result<(Option<Value>, Freshness), String> {
    match client.call(Request::Get { group: group.into(), key: key.into() }).await {
        Ok(Response::Value { value, freshness, .. }) => Ok((value, freshness)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(error) => Err(error.to_string()),
    }
}

/// Reads `key` from `client` from now on, for [`READ_WINDOW`] and until it serves `latest` (the
/// last committed value) as fresh (at most [`DEADLINE`]), and adds every read that served an
/// older value without flagging it stale (SPEC F12: "no read ever says fresh while serving an
/// older committed version"); returns a summary of all reads.
async fn check_reads_of_old_values(
    client: &Client,
    group: &str,
    key: &str,
    latest: &Value,
    violations: &mut Violations,
) -> String {
    let started = Instant::now();
    let (mut old_stale, mut old_fresh, mut latest_reads, mut errors) = (0, 0, 0, 0);
    let (mut first_read_ms, mut first_latest_ms, mut last_old_fresh_ms) = (None, None, None);
    let mut first_latest_fresh_ms = None;
    while started.elapsed() < READ_WINDOW || (first_latest_fresh_ms.is_none() && started.elapsed() < DEADLINE) {
        let at = started.elapsed().as_millis();
        let result = read(client, group, key).await;
        if result.is_ok() {
            first_read_ms.get_or_insert(at);
        }
        match result {
            Ok((value, freshness)) if value.as_ref() == Some(latest) => {
                latest_reads += 1;
                first_latest_ms.get_or_insert(at);
                if !freshness.stale {
                    first_latest_fresh_ms.get_or_insert(at);
                }
            }
            Ok((_, freshness)) if freshness.stale => old_stale += 1,
            Ok((value, freshness)) => {
                old_fresh += 1;
                last_old_fresh_ms = Some(at);
                violations.add(
                    "an older value than the last committed one served as fresh",
                    format!(
                        "+{at} ms: {key} = {} fresh (revision {}, version {}, age {} ms) while {latest} is committed",
                        value.map_or_else(|| "(unset)".to_owned(), |v| v.to_string()),
                        freshness.revision,
                        freshness.version,
                        freshness.age_ms
                    ),
                );
            }
            Err(_) => errors += 1,
        }
        tokio::time::sleep(READ_PACING).await;
    }
    format!(
        "reads over {} ms: {old_fresh} old value flagged FRESH (last at {last_old_fresh_ms:?} ms), \
         {old_stale} old value flagged stale, {latest_reads} latest value (first at {first_latest_ms:?} ms, \
         first fresh at {first_latest_fresh_ms:?} ms), {errors} errors (first successful read at {first_read_ms:?} ms)",
        started.elapsed().as_millis()
    )
}

/// Retries a write until it is answered committed (a strong group commits once every member of
/// its configuration staged it, so with a member down only once that member, seen dead for
/// [`EVICT_AFTER_MS`], has been evicted: about 8 s); fails the test after [`DEADLINE`] with the
/// last answer.
async fn write_until_committed(client: &Client, request: Request) -> Outcome {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let outcome = Outcome::of(client.call(request.clone()).await);
        if outcome.committed_acks().is_some() {
            return outcome;
        }
        assert!(Instant::now() < deadline, "the write never committed; last answer: {}", outcome.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn value_on(client: &Client, group: &str, key: &str) -> Option<Value> {
    client.get(group, key).await.ok().flatten()
}

async fn await_value_everywhere(clients: &[Client], group: &str, key: &str, value: &Value) {
    for client in clients {
        eventually(&format!("{group}/{key} = {value} on {}", client.node_id()), || async {
            (value_on(client, group, key).await.as_ref() == Some(value)).then_some(())
        })
        .await;
    }
}

/// Each client's node's view of `group`, for a failure report: its configuration, version,
/// revision and heads, whether it serves the group fenced and why, whom it counts live, and the
/// last versions of its history.
async fn group_views(clients: &[Client], group: &str) -> String {
    let mut lines = Vec::new();
    for client in clients {
        let status = match client.call(Request::Status { group: group.into() }).await {
            Ok(Response::Status { nodes, live, unknown, configuration, fenced_reason, degraded, .. }) => {
                let own = nodes.iter().find(|row| row.node == client.node_id());
                format!(
                    "configuration {configuration:?}, version {:?} revision {:?} heads {:?}, fenced {fenced_reason:?}, \
                     live {live:?}, unknown {unknown:?}, degraded {degraded:?}",
                    own.map(|row| &row.version),
                    own.map(|row| row.revision),
                    own.map(|row| &row.heads)
                )
            }
            other => format!("status: {other:?}"),
        };
        let history = match client.call(Request::History { group: group.into() }).await {
            Ok(Response::History { versions, .. }) => versions
                .iter()
                .rev()
                .take(4)
                .map(|row| format!("{} {} {:?} by {}", row.label, row.kind, row.message, row.author))
                .collect::<Vec<_>>()
                .join(" | "),
            other => format!("history: {other:?}"),
        };
        lines.push(format!("\n    {}: {status}; latest versions: {history}", client.node_id()));
    }
    lines.concat()
}

/// Examples printed per kind of violation; the rest are counted.
const EXAMPLES_PER_KIND_MAX: usize = 4;

/// Every breach of the contract a test saw, by kind, with the first few examples of each: a
/// failure shows the whole picture, not only the first symptom.
#[derive(Default)]
struct Violations {
    kinds: Vec<(String, usize, Vec<String>)>,
}

impl Violations {
    fn add(&mut self, kind: &str, example: String) {
        let index = match self.kinds.iter().position(|(k, _, _)| k == kind) {
            Some(index) => index,
            None => {
                self.kinds.push((kind.to_owned(), 0, Vec::new()));
                self.kinds.len() - 1
            }
        };
        let (_, count, examples) = &mut self.kinds[index];
        *count += 1;
        if examples.len() < EXAMPLES_PER_KIND_MAX {
            examples.push(example);
        }
    }

    /// Fails the test when anything was added, with `context` (the figures of the run) first;
    /// prints the figures when nothing was (`--no-capture` shows them).
    fn check(self, context: &str) {
        if self.kinds.is_empty() {
            println!("{context}");
            return;
        }
        let mut text = format!("{context}\nVIOLATED:");
        for (kind, count, examples) in &self.kinds {
            text.push_str(&format!("\n- {kind}: {count} time(s), first:"));
            for example in examples {
                text.push_str(&format!("\n    {example}"));
            }
        }
        panic!("{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Stale reads flagged fresh after a pause, a kill -9 and restart, or a damaged group file.

/// A 3-node mesh with a strong group `app` where `k` = 1 is committed and visible everywhere.
async fn strong_group_of_three(cluster: &Cluster) -> (Vec<crate::harness::Node>, Vec<Client>) {
    let (nodes, clients) = start_mesh(cluster, 3).await;
    group_on_all_with(&clients, "app", "strong", Some(EVICT_AFTER_MS)).await;
    write_until_committed(&clients[0], set("app", &[("k", json!(1))])).await;
    await_value_everywhere(&clients, "app", "k", &json!(1)).await;
    (nodes, clients)
}

/// SPEC F12: "after a pause ... reads say stale until the node has caught up; no read ever says
/// fresh while serving an older committed version".
///
/// What broke: a member paused (SIGSTOP) while the others committed k = 2 served k = 1 as fresh
/// right after SIGCONT: nothing told it that it had been away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_stale_read_flagged_fresh_after_a_pause() {
    let cluster = Cluster::new();
    let (nodes, clients) = strong_group_of_three(&cluster).await;
    nodes[2].pause();
    let committed = write_until_committed(&clients[0], set("app", &[("k", json!(2))])).await;
    nodes[2].resume();
    let mut violations = Violations::default();
    let summary = check_reads_of_old_values(&clients[2], "app", "k", &json!(2), &mut violations).await;
    let view = group_views(&clients[2..], "app").await;
    violations.check(&format!(
        "strong group of 3, n3 paused (SIGSTOP) while n1 wrote k = 2 ({}), then resumed; {summary}; then:{view}",
        committed.text()
    ));
    await_value_everywhere(&clients[2..], "app", "k", &json!(2)).await;
}

/// SPEC F12: "after a start ... reads say stale until the node has caught up".
///
/// What broke: a member killed (kill -9) while the others committed k = 2 served k = 1 as fresh
/// as soon as it restarted: its fence lifted before it had compared with its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_stale_read_flagged_fresh_after_kill_9_and_restart() {
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = strong_group_of_three(&cluster).await;
    nodes[2].kill9();
    let committed = write_until_committed(&clients[0], set("app", &[("k", json!(2))])).await;
    nodes[2].start();
    clients[2] = nodes[2].client().await;
    let mut violations = Violations::default();
    let summary = check_reads_of_old_values(&clients[2], "app", "k", &json!(2), &mut violations).await;
    let view = group_views(&clients[2..], "app").await;
    violations.check(&format!(
        "strong group of 3, n3 killed (-9) while n1 wrote k = 2 ({}), then restarted; {summary}; then:{view}",
        committed.text()
    ));
    await_value_everywhere(&clients[2..], "app", "k", &json!(2)).await;
}

/// SPEC F12 and F24: "after ... a repair, reads say stale until the node has caught up"; a
/// corrupt or torn file is repaired from peers, never silently served.
///
/// What broke: a member whose group file lost its tail (checksum failure) restarted on the
/// intact prefix and served the older k = 2 as fresh although k = 3 was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_stale_read_flagged_fresh_after_a_damaged_group_file() {
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = strong_group_of_three(&cluster).await;
    write_until_committed(&clients[0], set("app", &[("k", json!(2))])).await;
    await_value_everywhere(&clients, "app", "k", &json!(2)).await;
    // Everything n3 writes from here on (k = 3 among it) is what the damage takes away.
    let file = nodes[2].group_file("app");
    let length_at_2 = std::fs::metadata(&file).unwrap().len() as usize;
    let committed = write_until_committed(&clients[0], set("app", &[("k", json!(3))])).await;
    await_value_everywhere(&clients, "app", "k", &json!(3)).await;
    nodes[2].kill9();
    let kept = damage_records_from(&file, length_at_2);
    nodes[2].start();
    clients[2] = nodes[2].client().await;
    let mut violations = Violations::default();
    let summary = check_reads_of_old_values(&clients[2], "app", "k", &json!(3), &mut violations).await;
    violations.check(&format!(
        "strong group of 3, n1 wrote k = 3 ({}); n3 killed (-9), its group file damaged from offset {length_at_2} \
         (valid prefix {kept} bytes, k = 2 at most), restarted; {summary}",
        committed.text()
    ));
    await_value_everywhere(&clients[2..], "app", "k", &json!(3)).await;
}

// ---------------------------------------------------------------------------------------------
// Joins left out of the next write.

/// Writes until the answer is something other than a busy or aborted round (a configuration
/// change may still be settling right after a join): the first real outcome.
async fn first_outcome(client: &Client, request: Request) -> Outcome {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let outcome = Outcome::of(client.call(request.clone()).await);
        let retry = matches!(outcome, Outcome::Refused { code: ErrorCode::Busy | ErrorCode::Aborted, .. });
        if !retry || Instant::now() >= deadline {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SPEC F11: a strong round waits for every member of the group's configuration, and a join is
/// a configuration change ordered with the rounds: once `group join` returns, the joiner is a
/// member every later commit waits for, and it never serves an older value as fresh.
///
/// What broke: the writer counted only members it had seen in gossip, so a write right after a
/// join committed without the joiner (the README told users to wait a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_strong_write_right_after_a_join_leaves_the_joiner_out() {
    let cluster = Cluster::new();
    let (_nodes, clients) = start_mesh(&cluster, 2).await;
    let created = clients[0]
        .call(Request::GroupCreate {
            name: "app".into(),
            mode: "strong".into(),
            key: None,
            evict_after_ms: Some(EVICT_AFTER_MS),
            fencing: None,
        })
        .await
        .unwrap();
    let Response::GroupCreated { key, .. } = created else { panic!("{created:?}") };
    let joined = clients[1].call(Request::GroupJoin { name: "app".into(), key }).await.unwrap();
    assert!(matches!(joined, Response::Joined { .. }), "{joined:?}");
    // No pause between the join and the write: that is the point.
    let outcome = first_outcome(&clients[0], set("app", &[("k", json!(1))])).await;
    let read_on_joiner = read(&clients[1], "app", "k").await;
    let mut violations = Violations::default();
    match outcome.committed_acks() {
        Some(acked_by) if acked_by.contains(&"n2".to_owned()) => {}
        Some(acked_by) => violations.add("committed without the joiner", format!("acked_by {acked_by:?}")),
        None => violations.add("the write did not commit", outcome.text()),
    }
    match &read_on_joiner {
        Ok((Some(value), _)) if *value == json!(1) => {}
        Ok((_, freshness)) if freshness.stale => {}
        Ok((value, freshness)) => violations.add(
            "the joiner served an older value as fresh right after the commit",
            format!("n2: k = {value:?}, version {}, stale false", freshness.version),
        ),
        Err(error) => violations.add("the joiner could not be read", error.clone()),
    }
    violations.check(&format!(
        "strong group created on n1, n2 joined, write on n1 at once: {}; read on n2 right after: {read_on_joiner:?}",
        outcome.text()
    ));
}

/// SPEC F9-F10: an eventual write commits once a quorum of the group's live members holds it;
/// once `group join` returns on n2 and n3, the group has three live members and a quorum of 2.
///
/// What broke: the writer counted only members it had seen in gossip, so a write right after
/// the joins committed with a quorum of 1 (itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_eventual_write_right_after_joins_commits_on_a_quorum_of_one() {
    let cluster = Cluster::new();
    let (_nodes, clients) = start_mesh(&cluster, 3).await;
    let created = clients[0]
        .call(Request::GroupCreate {
            name: "app".into(),
            mode: "eventual".into(),
            key: None,
            evict_after_ms: None,
            fencing: None,
        })
        .await
        .unwrap();
    let Response::GroupCreated { key, .. } = created else { panic!("{created:?}") };
    let join = |client: &Client| {
        let client = client.clone();
        let key = key.clone();
        async move { client.call(Request::GroupJoin { name: "app".into(), key }).await }
    };
    let (joined_2, joined_3) = tokio::join!(join(&clients[1]), join(&clients[2]));
    for joined in [joined_2, joined_3] {
        assert!(matches!(joined, Ok(Response::Joined { .. })), "{joined:?}");
    }
    // No pause between the joins and the write: that is the point.
    let outcome = Outcome::of(clients[0].call(set("app", &[("k", json!(1))])).await);
    let mut violations = Violations::default();
    match outcome.committed_acks() {
        Some(acked_by) if acked_by.len() >= 2 => {}
        Some(acked_by) => violations
            .add("committed with fewer acks than a quorum (2) of the 3 members", format!("acked_by {acked_by:?}")),
        None => violations.add("the write did not commit", outcome.text()),
    }
    violations
        .check(&format!("eventual group created on n1, n2 and n3 joined, write on n1 at once: {}", outcome.text()));
}
