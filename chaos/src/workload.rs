//! What the clients do during a run, all recorded: writers and readers on a small key set of
//! each group, a watcher per node and group, and a membership sampler per node. Each task talks
//! to one node through the real SDK and stops when the run's stop signal flips.
//!
//! SDK errors map onto outcomes as history.rs says: a daemon refusal is `Refused` with its code,
//! except `outcome_unknown`; a timeout, a closed connection or anything else that may have been
//! sent is `Unknown`. A request that never left the client (the socket could not be reached
//! while the node was down) is `Refused` with code `not_sent`.

use std::collections::BTreeMap;
use std::time::Duration;

use konor_sdk::protocol::{Request, Response, WriteMeta};
use konor_sdk::{Client, ErrorCode, SdkError, WatchEvent};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;

use crate::history::{MembershipSample, Op, OpKind, Outcome, Record, WatchRecord, WatchedEvent};
use crate::record::Recorder;

/// Keys per group: few, so writes overwrite each other and reads meet recent writes.
pub const KEYS_PER_GROUP: usize = 3;

/// Share of operations that are writes, percent.
const WRITE_PERCENT: u32 = 60;

/// Pause between a client's operations, ms (drawn up to this): paces the load so a run of
/// 90 s writes thousands of values, not millions.
const THINK_MAX_MS: u64 = 50;

/// The `Refused` code of a request that never left the client (the socket was unreachable).
pub const NOT_SENT: &str = "not_sent";

/// Pause before the next operation after one could not be sent (the node is down).
const DOWN_RETRY: Duration = Duration::from_millis(200);

/// How often each node's membership view is sampled.
pub const MEMBERSHIP_INTERVAL: Duration = Duration::from_millis(200);

/// A client of the workload: its number, its node and its connection.
pub struct WorkloadClient {
    /// Client number (values are `c<number>-<seq>`).
    pub number: u32,
    /// Node id.
    pub node: String,
    /// Connection to the node.
    pub client: Client,
}

/// Writes and reads until `stop` flips; every operation recorded.
pub async fn run_client(
    worker: WorkloadClient,
    groups: Vec<String>,
    seed: u64,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(worker.number) << 32));
    let mut sequence = 0u64;
    while !*stop.borrow() {
        let group = groups[rng.random_range(0..groups.len())].clone();
        let key = format!("k{}", rng.random_range(0..KEYS_PER_GROUP));
        let invoke_ms = recorder.now_ms();
        let (kind, outcome) = if rng.random_range(0..100) < WRITE_PERCENT {
            sequence += 1;
            let value = format!("c{}-{sequence}", worker.number);
            let outcome = write(&worker.client, &group, &key, &value).await;
            (OpKind::Write { value }, outcome)
        } else {
            (OpKind::Read, read(&worker.client, &group, &key).await)
        };
        // A node that is down refuses connections at once: pace the retries instead of spinning.
        let not_sent = matches!(&outcome, Outcome::Refused { code, .. } if code == NOT_SENT);
        let op = Op {
            client: worker.number,
            node: worker.node.clone(),
            group,
            key,
            kind,
            invoke_ms,
            complete_ms: recorder.now_ms(),
            outcome,
        };
        if let Err(error) = recorder.write(&Record::Op(op)) {
            tracing::error!(%error, "cannot write the history; client stops");
            return;
        }
        let think = if not_sent { DOWN_RETRY } else { Duration::from_millis(rng.random_range(0..=THINK_MAX_MS)) };
        tokio::select! {
            _ = tokio::time::sleep(think) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn write(client: &Client, group: &str, key: &str, value: &str) -> Outcome {
    let entries = BTreeMap::from([(key.to_owned(), Value::String(value.to_owned()))]);
    let request = Request::Set { group: group.to_owned(), entries, meta: WriteMeta::default() };
    match client.call(request).await {
        Ok(Response::Committed { version, revision, acked_by, content_hash, .. }) => {
            Outcome::Committed { version, revision, acked_by, content_hash }
        }
        Ok(other) => Outcome::Unknown { detail: format!("unexpected answer `{}`", other.kind()) },
        Err(error) => outcome_of_error(error),
    }
}

async fn read(client: &Client, group: &str, key: &str) -> Outcome {
    let request = Request::Get { group: group.to_owned(), key: key.to_owned() };
    match client.call(request).await {
        Ok(Response::Value { value, freshness, .. }) => Outcome::Value {
            value: value.map(|v| printed(&v)),
            version: freshness.version,
            revision: freshness.revision,
            stale: freshness.stale,
        },
        Ok(other) => Outcome::Unknown { detail: format!("unexpected answer `{}`", other.kind()) },
        Err(error) => outcome_of_error(error),
    }
}

/// The outcome an SDK error stands for.
pub fn outcome_of_error(error: SdkError) -> Outcome {
    match error {
        SdkError::Daemon { code: ErrorCode::OutcomeUnknown, message } => {
            Outcome::Unknown { detail: format!("outcome_unknown: {message}") }
        }
        SdkError::Daemon { code, message } => Outcome::Refused { code: code.as_str().to_owned(), message },
        SdkError::Connect { detail, .. } => Outcome::Refused { code: NOT_SENT.into(), message: detail },
        other => Outcome::Unknown { detail: other.to_string() },
    }
}

/// A value as the history holds it: a string as it is, anything else as JSON.
fn printed(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn printed_map(settings: &BTreeMap<String, Value>) -> BTreeMap<String, String> {
    settings.iter().map(|(key, value)| (key.clone(), printed(value))).collect()
}

/// Opens a watcher: a snapshot recorded as `Start`, then a watch from the snapshot's revision,
/// so no change falls between the two. Fails if the node does not answer.
pub async fn open_watcher(
    number: u32,
    node: String,
    client: &Client,
    group: &str,
    recorder: &Recorder,
) -> anyhow::Result<konor_sdk::Watch> {
    let snapshot = client.snapshot(group).await?;
    let watch = client.watch(group, Some(snapshot.freshness.revision)).await?;
    recorder.write(&Record::Watch(WatchRecord {
        watcher: number,
        node,
        group: group.to_owned(),
        at_ms: recorder.now_ms(),
        event: WatchedEvent::Start {
            revision: snapshot.freshness.revision,
            version: snapshot.freshness.version.clone(),
            settings: printed_map(&snapshot.settings),
        },
    }))?;
    Ok(watch)
}

/// Records every event of `watch` until `stop` flips or the watch ends.
pub async fn run_watcher(
    number: u32,
    node: String,
    mut watch: konor_sdk::Watch,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let group = watch.group().to_owned();
    loop {
        let next = tokio::select! {
            next = watch.next() => next,
            _ = stop.changed() => return,
        };
        let event = match next {
            Some(Ok(WatchEvent::Change { revision, version, set, removed, .. })) => {
                WatchedEvent::Change { revision, version, set: printed_map(&set), removed }
            }
            Some(Ok(WatchEvent::Resync { revision, version, settings, .. })) => {
                WatchedEvent::Resync { revision, version, settings: printed_map(&settings) }
            }
            Some(Err(error)) => WatchedEvent::Ended { detail: error.to_string() },
            None => return,
        };
        let ended = matches!(event, WatchedEvent::Ended { .. });
        let record =
            WatchRecord { watcher: number, node: node.clone(), group: group.clone(), at_ms: recorder.now_ms(), event };
        if recorder.write(&Record::Watch(record)).is_err() || ended {
            return;
        }
    }
}

/// Samples the node's view of every node's liveness every [`MEMBERSHIP_INTERVAL`] until `stop`
/// flips. A sample the node does not answer (down, paused) is skipped.
pub async fn run_membership(node: String, client: Client, recorder: Recorder, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(MEMBERSHIP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let Ok(Response::Nodes { nodes }) = client.call(Request::Nodes).await else { continue };
        let states = nodes.into_iter().map(|row| (row.id, row.state)).collect();
        let sample = MembershipSample { at_ms: recorder.now_ms(), observer: node.clone(), states };
        if recorder.write(&Record::Membership(sample)).is_err() {
            return;
        }
    }
}
