//! Consistency under real faults: network partitions (namespaces and nftables), a full disk
//! (tmpfs), pauses (SIGSTOP), kill -9, damaged group files, joins and restarts racing writes.
//!
//! Each test states the contract users are promised (SPEC F10-F12, invariants 2 and 3), never
//! how the protocol keeps it, and collects every violation it sees before failing, so a failure
//! prints the figures (who answered what, acked by whom) rather than only the first symptom.
//! They were written to reproduce known failures of the all-ack barrier, on which every one of
//! them failed; they now check the same promises against strong groups by configuration
//! (eviction after `evict_after`, majority-recorded commit decisions, read leases, `not_durable`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use konor_sdk::client::{Client, SdkError};
use konor_sdk::protocol::{ErrorCode, Freshness, Request, Response, WriteMeta};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::harness::{
    Cluster, DEADLINE, NetnsMesh, Tmpfs, await_whole_mesh, damage_records_from, eventually, group_on_all,
    group_on_all_with, live_nodes, start_mesh, start_mesh_with,
};

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
        meta: WriteMeta { author: "faults".into(), message: String::new(), ..WriteMeta::default() },
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
// Split brain in a strong group under a partition.

/// How long the partition lasts (a fault's duration is the point here): long enough for the
/// failure detector to declare the other side dead (1-2 s at the 100 ms gossip interval the
/// harness uses), for the majority to evict the unreachable members ([`EVICT_AFTER_MS`] later)
/// and then commit for a few seconds, and for many strong rounds (3 s round timeout) to run on
/// each side.
const PARTITION: Duration = Duration::from_millis(EVICT_AFTER_MS + 6_000);

/// One write made during the partition.
#[derive(Debug, Clone)]
struct PartitionWrite {
    node: String,
    side: &'static str,
    /// When it was sent, from the start of the partition.
    at_ms: u128,
    key: String,
    value: Value,
    outcome: Outcome,
}

/// Writes a fresh key per write on `client` until `until`; every write is one slot of the
/// group's history, so what each side was told is kept apart.
async fn write_during(client: Client, side: &'static str, started: Instant, until: Instant) -> Vec<PartitionWrite> {
    let node = client.node_id();
    let mut writes = Vec::new();
    for index in 1u32.. {
        if Instant::now() >= until {
            break;
        }
        let at_ms = started.elapsed().as_millis();
        let key = format!("w.{node}.{index}");
        let value = json!(format!("{side}-{node}-{index}"));
        let outcome = Outcome::of(client.call(set("app", &[(&key, value.clone())])).await);
        let quick_refusal = matches!(outcome, Outcome::Refused { .. });
        writes.push(PartitionWrite { node: node.clone(), side, at_ms, key, value, outcome });
        if quick_refusal {
            // Aborted (a member seen dead) and busy come back at once: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    writes
}

/// Per node: how many writes got which answer, and when the first commit came.
fn partition_figures(writes: &[PartitionWrite]) -> String {
    let mut per_node: BTreeMap<(&str, &str), BTreeMap<String, usize>> = BTreeMap::new();
    let mut first_commit: BTreeMap<&str, u128> = BTreeMap::new();
    for write in writes {
        *per_node.entry((write.side, &write.node)).or_default().entry(outcome_kind(&write.outcome)).or_default() += 1;
        if write.outcome.committed_acks().is_some() {
            first_commit.entry(&write.node).or_insert(write.at_ms);
        }
    }
    per_node
        .iter()
        .map(|((side, node), kinds)| {
            let first = first_commit.get(node).map_or_else(|| "never".to_owned(), |ms| format!("+{ms} ms"));
            format!("{side} {node}: {kinds:?}, first commit {first}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The configuration of `group` each client's node holds (`c4 [n1, n2, n3]`), from `status`.
async fn configurations(clients: &[Client], group: &str) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    for client in clients {
        let configuration = match client.call(Request::Status { group: group.into() }).await {
            Ok(Response::Status { configuration, .. }) => configuration.unwrap_or_else(|| "(none)".to_owned()),
            Ok(other) => format!("unexpected answer {other:?}"),
            Err(error) => format!("error: {error}"),
        };
        seen.insert(client.node_id(), configuration);
    }
    seen
}

/// Waits until every client's node holds a configuration of `group` whose members are exactly
/// `members`; how long it took, or each node's view of the group (see [`group_views`]) at
/// [`DEADLINE`].
async fn await_configuration(clients: &[Client], group: &str, members: &[String]) -> Result<Duration, String> {
    let started = Instant::now();
    let expected = format!("[{}]", members.join(", "));
    loop {
        let seen = configurations(clients, group).await;
        if seen.values().all(|configuration| configuration.ends_with(&expected)) {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= DEADLINE {
            return Err(group_views(clients, group).await);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SPEC F11 and invariant 3: "the minority side of a partition never commits"; "the committed
/// versions of a strong group form one sequence, on every side of every partition"; the
/// majority evicts the members it has seen dead for `evict_after` and commits without them; a
/// write reported committed is never lost (invariant 2) and one reported aborted never becomes
/// visible; after the heal the evicted members rejoin on their own and hold every commit.
///
/// What broke: each side counted only the members it still saw live, so once the failure
/// detector declared the other side dead the minority {n4, n5} committed alone, and both sides
/// committed different versions at the same position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_split_brain_in_a_partitioned_strong_group() {
    let mesh = NetnsMesh::start(5).await;
    let clients = &mesh.clients;
    let everyone: Vec<String> = mesh.nodes.iter().map(|n| n.id.clone()).collect();
    group_on_all_with(clients, "app", "strong", Some(EVICT_AFTER_MS)).await;
    write_until_committed(&clients[0], set("app", &[("before", json!(1))])).await;
    await_value_everywhere(clients, "app", "before", &json!(1)).await;
    let majority: &[usize] = &[0, 1, 2];
    let minority: &[usize] = &[3, 4];
    mesh.lab.partition(&[majority, minority]);
    let started = Instant::now();
    let until = started + PARTITION;
    let majority_writer = tokio::spawn(write_during(clients[0].clone(), "majority", started, until));
    let minority_writer = tokio::spawn(write_during(clients[3].clone(), "minority", started, until));
    let mut writes = majority_writer.await.unwrap();
    writes.extend(minority_writer.await.unwrap());
    // Every write was answered before the partition heals: all outcomes are partition outcomes.
    let configurations_in_partition = configurations(clients, "app").await;
    mesh.lab.heal();
    let healed = Instant::now();
    await_whole_mesh(&mesh.nodes, clients).await;
    let mesh_after = healed.elapsed();
    // The evicted members catch up and propose their own addition (retried every second).
    let rejoined = await_configuration(clients, "app", &everyone).await;

    let mut violations = Violations::default();
    for write in writes.iter().filter(|w| w.side == "minority") {
        if let Outcome::Committed { version, acked_by, .. } = &write.outcome {
            violations.add(
                "the minority side answered committed",
                format!(
                    "+{} ms: {} answered committed {} = {} as {version} acked_by {acked_by:?}",
                    write.at_ms, write.node, write.key, write.value
                ),
            );
        }
    }
    let committed: Vec<&PartitionWrite> = writes.iter().filter(|w| w.outcome.committed_acks().is_some()).collect();
    let sides: BTreeSet<&str> = committed.iter().map(|w| w.side).collect();
    if sides.len() > 1 {
        violations.add("both sides reported commits during the partition", format!("{sides:?}"));
    }
    if !sides.contains("majority") {
        violations.add(
            "the majority never committed, although the minority was unreachable longer than evict_after",
            format!("configurations at the end of the partition: {configurations_in_partition:?}"),
        );
    }
    let mut hashes_by_version: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for write in &committed {
        if let Outcome::Committed { version, content_hash, .. } = &write.outcome {
            hashes_by_version.entry(version.clone()).or_default().insert(format!("{content_hash} on {}", write.node));
        }
    }
    for (version, hashes) in &hashes_by_version {
        if hashes.len() > 1 {
            violations.add("two different versions committed at one position", format!("{version}: {hashes:?}"));
        }
    }
    if let Err(seen) = &rejoined {
        violations.add(
            "the evicted members did not rejoin the configuration after the heal",
            format!("{} s after the heal:{seen}", DEADLINE.as_secs()),
        );
    }
    // Once everyone is back in the configuration, every committed write is on every node.
    let settle_deadline = Instant::now() + DEADLINE;
    for client in clients {
        for write in &committed {
            loop {
                if value_on(client, "app", &write.key).await.as_ref() == Some(&write.value) {
                    break;
                }
                if Instant::now() >= settle_deadline {
                    violations.add(
                        "a committed write is missing on a node after the heal",
                        format!(
                            "{} = {} (committed by {}) not on {} after settling",
                            write.key,
                            write.value,
                            write.node,
                            client.node_id(),
                        ),
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // A write answered aborted is visible nowhere (checked once the committed ones arrived).
    for write in writes.iter().filter(|w| matches!(w.outcome, Outcome::Refused { code: ErrorCode::Aborted, .. })) {
        for client in clients {
            if let Some(value) = value_on(client, "app", &write.key).await {
                violations.add(
                    "a write answered aborted is visible",
                    format!("{} = {value} aborted on {} but visible on {}", write.key, write.node, client.node_id()),
                );
            }
        }
    }
    violations.check(&format!(
        "5 nodes in network namespaces, strong group (evict_after {EVICT_AFTER_MS} ms), partition \
         {{n1,n2,n3}} | {{n4,n5}} for {} s, writers on n1 and n4: {}; configurations at the end of the \
         partition: {configurations_in_partition:?}; whole mesh live {} ms after the heal, everyone back in \
         the configuration after {rejoined:?}",
        PARTITION.as_secs(),
        partition_figures(&writes),
        mesh_after.as_millis()
    ));
}

// ---------------------------------------------------------------------------------------------
// False commits on a full disk.

/// Size of the writer's data dir: room for the node's files and two small groups; a filler file
/// then takes the rest.
const DATA_DIR_BYTES: u64 = 8 * 1024 * 1024;

/// Length of the value written onto the full disk: the record needs fresh pages whatever slack
/// the last page of the group file has (4 KiB pages; hex text deflates by about half), and stays
/// under the 16 KiB value limit.
const FULL_DISK_VALUE_CHARS: usize = 12 * 1024;

/// Text that does not compress much: hex digits of a xorshift stream.
fn incompressible_text(chars: usize, mut seed: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(chars);
    while text.len() < chars {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        text.push(char::from(DIGITS[(seed & 0xf) as usize]));
    }
    text
}

/// How long n1 is read after a write its full disk refused: longer than anti-entropy takes to
/// offer it the change back from the peers it was pushed to (1 s delay, then one sync).
const FULL_DISK_READ_WINDOW: Duration = Duration::from_secs(3);

/// Reads `key` on `client` for [`FULL_DISK_READ_WINDOW`]; the first read serving `refused`, if
/// any, and what the reads served.
async fn served_after_refusal(client: &Client, group: &str, key: &str, refused: &Value) -> (Option<String>, String) {
    let started = Instant::now();
    let mut first_refused = None;
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    while started.elapsed() < FULL_DISK_READ_WINDOW {
        let at = started.elapsed().as_millis();
        let text = match read(client, group, key).await {
            Ok((Some(value), freshness)) if value == *refused => {
                first_refused
                    .get_or_insert_with(|| format!("+{at} ms: the refused value, version {}", freshness.version));
                "the refused value".to_owned()
            }
            Ok((value, _)) => format!("{value:?}"),
            Err(error) => format!("error {error}"),
        };
        *served.entry(text).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (first_refused, format!("{served:?}"))
}

/// Invariant 2: "no commit is acknowledged that the writer itself failed to make durable"; F24:
/// nothing partial is stored or served. A write the writer cannot make durable is never
/// answered committed and nothing of it is served there. In an eventual group it is answered
/// `not_durable`. In a strong group the coordinator sends its Decides before writing its own
/// record (issue 14, docs/protocol.md), so when that record fails the members may already have
/// made the commit final: the honest answer is `outcome_unknown`, and the majority's outcome
/// must then hold on both peers alike (atomicity, invariant 1).
///
/// What broke: on a full disk the writer's append failed, yet the write could still be
/// answered committed (peers' acks counted), and the node served the value it had not made
/// durable from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_false_commit_on_a_full_disk() {
    let cluster = Cluster::new();
    let mut tmpfs = None;
    // Declared after the tmpfs guard: the nodes die before it is unmounted.
    let (_nodes, clients) = start_mesh_with(&cluster, 3, |node| {
        if node.id == "n1" {
            tmpfs = Some(Tmpfs::mount(&node.data_dir, DATA_DIR_BYTES));
        }
    })
    .await;
    group_on_all(&clients, "ev", "eventual").await;
    group_on_all_with(&clients, "st", "strong", Some(EVICT_AFTER_MS)).await;
    for group in ["ev", "st"] {
        write_until_committed(&clients[0], set(group, &[("k", json!("old"))])).await;
        await_value_everywhere(&clients, group, "k", &json!("old")).await;
    }
    // Borrowed, not moved out: the guard must stay declared before the nodes.
    let filled = tmpfs.as_ref().expect("n1's data dir is on a tmpfs").fill();
    // Peers n2 and n3 stay up throughout: their acks must not turn a write the writer could not
    // persist into a commit.
    let mut violations = Violations::default();
    let mut figures = Vec::new();
    for (seed, group) in [(1u64, "ev"), (2, "st")] {
        let value = json!(format!(
            "new-{}",
            incompressible_text(FULL_DISK_VALUE_CHARS, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        ));
        let outcome = Outcome::of(clients[0].call(set(group, &[("k", value.clone())])).await);
        let (first_refused, served) = served_after_refusal(&clients[0], group, "k", &value).await;
        let degraded = match clients[0].call(Request::Status { group: group.into() }).await {
            Ok(Response::Status { degraded, .. }) => format!("{degraded:?}"),
            other => format!("status failed: {other:?}"),
        };
        figures.push(format!(
            "{group}: the write was answered {}; n1 then served k over {} ms: {served}; n1 degraded: {degraded}",
            outcome.text(),
            FULL_DISK_READ_WINDOW.as_millis()
        ));
        match &outcome {
            Outcome::Committed { version, acked_by, .. } => violations.add(
                "a write the full disk refused was answered committed",
                format!("{group}: committed {version} acked_by {acked_by:?}"),
            ),
            Outcome::Refused { code: ErrorCode::NotDurable, .. } if group == "ev" => {}
            Outcome::Refused { code: ErrorCode::OutcomeUnknown, .. } if group == "st" => {
                // n2 and n3, a majority, staged and recorded the commit before n1 found its
                // disk full: the commit is final and both peers serve it.
                await_value_everywhere(&clients[1..], group, "k", &value).await;
            }
            Outcome::Refused { code, message } => violations.add(
                "a write the full disk refused was answered another error than the one its mode promises \
                 (eventual: not_durable; strong: outcome_unknown)",
                format!("{group}: {} ({message})", code.as_str()),
            ),
            Outcome::Unknown(detail) => {
                violations.add("a write the full disk refused got no clear answer", format!("{group}: {detail}"))
            }
        }
        if let Some(first) = first_refused {
            violations.add("the node serves a write it could not persist", format!("{group}: n1 served {first}"));
        }
    }
    violations.check(&format!(
        "n1's data dir on a {} MiB tmpfs filled up ({filled} bytes of filler), n2 and n3 up:\n  {}",
        DATA_DIR_BYTES / (1024 * 1024),
        figures.join("\n  ")
    ));
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
            release: None,
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
            release: None,
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

// ---------------------------------------------------------------------------------------------
// A just-restarted node commits alone.

/// How long the restarted node is written to, from the moment its socket answers: its first
/// seconds, before it has heard from its peers again (about a second at 100 ms gossip).
const RESTART_WRITE_WINDOW: Duration = Duration::from_millis(1_500);

/// SPEC F9-F11 and invariant 5: a node that has just started knows nothing yet about its peers'
/// liveness; it must not treat them as dead, so it can neither commit an eventual write with a
/// quorum of itself nor a strong one without the other members.
///
/// What broke: right after kill -9 and restart, n5 saw its peers as dead (no heartbeat yet) and
/// committed both eventual and strong writes acked only by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_just_restarted_node_commits_alone() {
    let cluster = Cluster::new();
    let (mut nodes, mut clients) = start_mesh(&cluster, 5).await;
    group_on_all(&clients, "ev", "eventual").await;
    group_on_all_with(&clients, "st", "strong", Some(EVICT_AFTER_MS)).await;
    let everyone: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    // Traffic from another node while n5 restarts.
    let background = {
        let client = clients[0].clone();
        tokio::spawn(async move {
            for index in 0u64.. {
                let group = if index % 2 == 0 { "ev" } else { "st" };
                let _ = client.call(set(group, &[(&format!("bg.{index}"), json!(index))])).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    nodes[4].kill9_and_restart();
    clients[4] = nodes[4].client().await;
    let restarted = &clients[4];
    let started = Instant::now();
    let mut violations = Violations::default();
    let mut figures = BTreeMap::<String, usize>::new();
    for index in 0u64.. {
        if started.elapsed() >= RESTART_WRITE_WINDOW {
            break;
        }
        let at = started.elapsed().as_millis();
        let eventual = Outcome::of(restarted.call(set("ev", &[(&format!("r.{index}"), json!(index))])).await);
        *figures.entry(format!("ev {}", outcome_kind(&eventual))).or_default() += 1;
        if let Some(acked_by) = eventual.committed_acks()
            && acked_by.len() < 3
        {
            violations.add(
                "an eventual write committed with fewer acks than a quorum (3) of 5",
                format!("+{at} ms: acked_by {acked_by:?}"),
            );
        }
        let strong = Outcome::of(restarted.call(set("st", &[(&format!("r.{index}"), json!(index))])).await);
        *figures.entry(format!("st {}", outcome_kind(&strong))).or_default() += 1;
        if let Some(acked_by) = strong.committed_acks() {
            let mut acked: Vec<String> = acked_by.to_vec();
            acked.sort();
            if acked != everyone {
                violations
                    .add("a strong write committed without every member", format!("+{at} ms: acked_by {acked_by:?}"));
            }
        }
        if let Ok(Response::Nodes { nodes: rows }) = restarted.call(Request::Nodes).await {
            let dead: Vec<String> =
                rows.into_iter().filter(|r| !r.is_self && r.state == "dead").map(|r| r.id).collect();
            if !dead.is_empty() {
                violations.add("peers that are up listed as dead", format!("+{at} ms: {dead:?}"));
            }
        }
    }
    background.abort();
    let live_at_end = live_nodes(restarted).await;
    violations.check(&format!(
        "5 nodes, n5 killed (-9) and restarted at once, then written for {} ms from its first answer: \
         outcomes {figures:?}; n5 sees live at the end: {live_at_end:?}",
        RESTART_WRITE_WINDOW.as_millis()
    ));
}

fn outcome_kind(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Committed { acked_by, .. } => format!("committed by {}", acked_by.len()),
        Outcome::Refused { code, .. } => code.as_str().to_owned(),
        Outcome::Unknown(_) => "unknown".to_owned(),
    }
}
