//! The Konorkestra side of the comparison: propagation to SDK watchers, commit acks per
//! consistency mode, socket and cached reads, sequential and concurrent writes, and daemon
//! memory. Each workload returns what it measured; `main.rs` interleaves them with etcd's and
//! decides nothing about the results here.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::client::Client;
use konor_sdk::protocol::{Request, Response, WatchEvent, WriteMeta};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::KonorCluster;
use crate::measure::Latency;
use crate::workload::{AbortOnDrop, CACHED_GETS_PER_BATCH, CONDITION_DEADLINE, Plan, idle_value};
use crate::xorshift::XorShift;

/// Group of the propagation, read and cached-read workloads.
const GROUP_PROBE: &str = "bench";

/// Group of the sequential-write workload: its own, so its history does not slow the others.
const GROUP_SEQUENTIAL: &str = "seqwrite";

/// Group of the concurrent-write workload.
const GROUP_CONCURRENT: &str = "concwrite";

/// The key the propagation workload writes; its value is the sample's sequence number.
pub const PROBE_KEY: &str = "probe.seq";

/// Groups for the commit-latency workloads, one per consistency mode.
pub const GROUP_COMMIT_EVENTUAL: &str = "commit-eventual";
/// The strong group of the commit-latency workload.
pub const GROUP_COMMIT_STRONG: &str = "commit-strong";

/// Longest wait for peers to catch up after a write workload. Catching up is reported, not
/// required: past this the run goes on and says so.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(120);

/// Pause between polls of an observable condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Numbers every benchmark write, across writers and rounds.
static WRITE_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Events buffered between the watcher tasks and the propagation loop.
const SEEN_QUEUE: usize = 1024;

/// Creates every group the workloads use (eventual ones, and the strong commit group) on all
/// nodes, and waits until each node sees every other as a member.
pub async fn prepare_groups(clients: &[Client]) -> anyhow::Result<()> {
    for group in [GROUP_PROBE, GROUP_SEQUENTIAL, GROUP_CONCURRENT, GROUP_COMMIT_EVENTUAL] {
        group_on_all_with_mode(clients, group, "eventual").await?;
    }
    group_on_all_with_mode(clients, GROUP_COMMIT_STRONG, "strong").await?;
    // The read workloads need the probe key to exist before the first propagation round.
    let first = clients.first().context("no daemon")?;
    first.call(set_request(GROUP_PROBE, PROBE_KEY, json!(0))).await.context("cannot write the probe key")?;
    Ok(())
}

/// Resident memory of every daemon (id, KiB).
pub fn memory(cluster: &KonorCluster) -> anyhow::Result<Vec<(String, u64)>> {
    cluster.daemons.iter().map(|daemon| Ok((daemon.id.clone(), daemon.rss_kib()?))).collect()
}

fn meta() -> WriteMeta {
    WriteMeta { author: "konor-bench".to_owned(), message: "benchmark".to_owned(), ..WriteMeta::default() }
}

pub fn set_request(group: &str, key: &str, value: Value) -> Request {
    Request::Set { group: group.to_owned(), entries: BTreeMap::from([(key.to_owned(), value)]), meta: meta() }
}

/// Commit latency of `group`: a `Set` from a random node, timed until it answers `Committed`
/// (eventual: a live quorum holds it durably; strong: the barrier round decided).
pub async fn commit(clients: &[Client], group: &str, plan: &Plan, random: &mut XorShift) -> anyhow::Result<Latency> {
    let mut latency = Latency::new()?;
    for sample in 0..plan.warmup_samples + plan.commit_samples {
        let writer = &clients[random.below(clients.len())];
        let started = Instant::now();
        let answer = writer.call(set_request(group, "commit.seq", json!(random.next_u64()))).await;
        let elapsed = started.elapsed();
        match answer {
            Ok(Response::Committed { .. }) => {}
            Ok(other) => bail!("a commit in {group} answered {}", other.kind()),
            Err(error) => bail!("a commit in {group} failed: {error}"),
        }
        if sample >= plan.warmup_samples {
            latency.record(elapsed);
        }
    }
    Ok(latency)
}

/// Creates a group of `mode` on the first node and joins it on every other.
pub async fn group_on_all_with_mode(clients: &[Client], group: &str, mode: &str) -> anyhow::Result<()> {
    let Some((first, others)) = clients.split_first() else { bail!("no daemon to create group {group} on") };
    let created = first
        .call(Request::GroupCreate {
            name: group.to_owned(),
            mode: mode.to_owned(),
            key: None,
            evict_after_ms: None,
            fencing: None,
            release: None,
        })
        .await
        .with_context(|| format!("cannot create group {group}"))?;
    let Response::GroupCreated { key, .. } = created else {
        bail!("creating group {group} answered {}", created.kind())
    };
    for (index, client) in others.iter().enumerate() {
        // A fresh group is known to peers once its gossip spread; the join waits for that.
        let joined = client
            .call(Request::GroupJoin { name: group.to_owned(), key: key.clone() })
            .await
            .with_context(|| format!("node n{} cannot join group {group}", index + 2))?;
        if !matches!(joined, Response::Joined { .. }) {
            bail!("joining group {group} on n{} answered {}", index + 2, joined.kind());
        }
    }
    // Steady state before measuring: a node takes pushed changes only from peers whose
    // membership proof it has seen in gossip; until then a change waits for a sync round.
    for (index, client) in clients.iter().enumerate() {
        eventually(&format!("node n{} sees all {} nodes as members of {group}", index + 1, clients.len()), || async {
            let Ok(Response::Groups { groups }) = client.call(Request::GroupList).await else { return None };
            let row = groups.into_iter().find(|row| row.name == group)?;
            (row.members.len() == clients.len()).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// Creates the idle groups, applies one JSON file of `idle_keys` keys to each on the first node,
/// and waits until every node holds every key.
pub async fn load_idle_groups(clients: &[Client], plan: &Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    let groups: Vec<String> = (0..plan.idle_groups).map(|index| format!("idle{index}")).collect();
    for group in &groups {
        group_on_all_with_mode(clients, group, "eventual").await?;
        let file: serde_json::Map<String, Value> = (0..plan.idle_keys)
            .map(|key| (format!("setting.k{key:04}"), Value::String(idle_value(group, key, plan))))
            .collect();
        let text = serde_json::to_string(&file).context("cannot encode the idle group file")?;
        let apply = Request::Apply { group: group.clone(), format: "json".to_owned(), text, meta: meta() };
        clients[0].call(apply).await.with_context(|| format!("cannot apply the file to group {group}"))?;
    }
    for (index, client) in clients.iter().enumerate() {
        for group in &groups {
            eventually(&format!("node n{} holds the {} keys of {group}", index + 1, plan.idle_keys), || async {
                let snapshot = client.snapshot(group).await.ok()?;
                (snapshot.settings.len() == plan.idle_keys).then_some(())
            })
            .await?;
        }
    }
    println!(
        "  loaded {} groups x {} keys on {} nodes in {:.2} s",
        groups.len(),
        plan.idle_keys,
        clients.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One watcher's sighting of a probe value.
struct Seen {
    node: usize,
    sequence: u64,
    at: Instant,
    error: Option<String>,
}

/// A write on a random node, timed until the SDK watchers on every other node have seen it.
/// `next_sequence` numbers the writes across rounds, so a value is never written twice.
pub async fn propagation(
    clients: &[Client],
    plan: &Plan,
    random: &mut XorShift,
    next_sequence: &mut u64,
) -> anyhow::Result<Latency> {
    propagation_in(
        clients,
        GROUP_PROBE,
        plan.warmup_samples + plan.propagation_samples,
        plan.warmup_samples,
        random,
        next_sequence,
    )
    .await
}

/// [`propagation`] in `group` (its probe key is [`PROBE_KEY`]): `samples` writes, the first
/// `warmup` not recorded.
pub async fn propagation_in(
    clients: &[Client],
    group: &str,
    samples: u64,
    warmup: u64,
    random: &mut XorShift,
    next_sequence: &mut u64,
) -> anyhow::Result<Latency> {
    let (seen_sender, mut seen) = mpsc::channel::<Seen>(SEEN_QUEUE);
    let mut watcher_tasks = Vec::new();
    for (node, client) in clients.iter().enumerate() {
        let mut watch = client.watch(group, None).await.with_context(|| format!("cannot watch on n{}", node + 1))?;
        let sender = seen_sender.clone();
        watcher_tasks.push(tokio::spawn(async move {
            while let Some(next) = watch.next().await {
                // Timed first: everything after this line is the benchmark's own work.
                let at = Instant::now();
                let (value, error) = match &next {
                    Ok(WatchEvent::Change { set, .. }) => (set.get(PROBE_KEY).and_then(Value::as_u64), None),
                    Ok(WatchEvent::Resync { settings, .. }) => (settings.get(PROBE_KEY).and_then(Value::as_u64), None),
                    Err(error) => (None, Some(error.to_string())),
                };
                if let Some(sequence) = value
                    && sender.send(Seen { node, sequence, at, error: None }).await.is_err()
                {
                    return;
                }
                if error.is_some() {
                    let _ = sender.send(Seen { node, sequence: 0, at, error }).await;
                    return;
                }
            }
        }));
    }
    drop(seen_sender);
    // Aborts the watcher tasks however this function ends.
    let _watchers = AbortOnDrop(watcher_tasks);

    let mut everywhere = Latency::new()?;
    for sample in 0..samples {
        *next_sequence += 1;
        let sequence = *next_sequence;
        let writer = random.below(clients.len());
        let started = Instant::now();
        let committed = clients[writer]
            .call(set_request(group, PROBE_KEY, json!(sequence)))
            .await
            .with_context(|| format!("write {sequence} on n{} failed", writer + 1))?;
        if !matches!(committed, Response::Committed { .. }) {
            bail!("write {sequence} on n{} answered {}", writer + 1, committed.kind());
        }
        // The writer's own watcher is not waited for: the figure is "seen on all other nodes".
        let mut seen_at: Vec<Option<Instant>> = vec![None; clients.len()];
        seen_at[writer] = Some(started);
        let deadline = started + CONDITION_DEADLINE;
        while seen_at.iter().any(Option::is_none) {
            let sighting = match tokio::time::timeout_at(deadline, seen.recv()).await {
                Ok(Some(sighting)) => sighting,
                Ok(None) => bail!("every watcher ended"),
                Err(_) => {
                    let missing: Vec<String> = seen_at
                        .iter()
                        .enumerate()
                        .filter(|(_, at)| at.is_none())
                        .map(|(node, _)| format!("n{}", node + 1))
                        .collect();
                    bail!("write {sequence}: watchers on {missing:?} did not see it within {CONDITION_DEADLINE:?}")
                }
            };
            if let Some(error) = sighting.error {
                bail!("the watcher on n{} ended: {error}", sighting.node + 1);
            }
            if sighting.sequence == sequence && sighting.node != writer {
                seen_at[sighting.node] = Some(sighting.at);
            } else if sighting.sequence > sequence {
                bail!("n{} reported write {} before write {sequence}", sighting.node + 1, sighting.sequence);
            }
        }
        if sample >= warmup {
            let last = seen_at.iter().flatten().max().copied().unwrap_or(started);
            everywhere.record(last.saturating_duration_since(started));
        }
    }
    Ok(everywhere)
}

/// `Client::get` round trips over the socket, one at a time.
pub async fn socket_get(client: &Client, plan: &Plan) -> anyhow::Result<Latency> {
    let mut latency = Latency::new()?;
    for sample in 0..plan.warmup_samples + plan.local_gets {
        let started = Instant::now();
        let value = client.get(GROUP_PROBE, PROBE_KEY).await.context("socket get failed")?;
        let elapsed = started.elapsed();
        if value.is_none() {
            bail!("socket get found no {PROBE_KEY} in {GROUP_PROBE}");
        }
        if sample >= plan.warmup_samples {
            latency.record(elapsed);
        }
    }
    Ok(latency)
}

/// A get over the HTTP API (HTTPS, one kept-alive connection), as a remote tool or a dashboard
/// reads: the same answer as [`socket_get`], through the HTTP door.
pub async fn https_get(endpoint: &konor_node::ctl::remote::Endpoint, plan: &Plan) -> anyhow::Result<Latency> {
    let mut session = endpoint.session().await?;
    let request = konor_sdk::protocol::Request::Get { group: GROUP_PROBE.to_owned(), key: PROBE_KEY.to_owned() };
    let mut latency = Latency::new()?;
    for sample in 0..plan.warmup_samples + plan.local_gets {
        let started = Instant::now();
        let answer = session.ask(&request).await.context("HTTPS get failed")?;
        let elapsed = started.elapsed();
        match answer {
            konor_sdk::protocol::Response::Value { value: Some(_), .. } => {}
            other => bail!("HTTPS get of {PROBE_KEY} in {GROUP_PROBE} answered {other:?}"),
        }
        if sample >= plan.warmup_samples {
            latency.record(elapsed);
        }
    }
    Ok(latency)
}

/// `CachedGroup::get` in a tight loop on a blocking thread, timed per batch.
pub async fn cached_get(client: &Client, plan: &Plan) -> anyhow::Result<Latency> {
    let cached = client.cached(GROUP_PROBE).await.context("cannot open the read cache")?;
    if cached.get(PROBE_KEY).is_none() {
        bail!("the read cache of {GROUP_PROBE} has no {PROBE_KEY}");
    }
    let batches = plan.warmup_samples + plan.cached_batches;
    let warmup = plan.warmup_samples;
    // A blocking thread: the loop never yields, and must not hold up the runtime's workers.
    tokio::task::spawn_blocking(move || -> anyhow::Result<Latency> {
        let mut latency = Latency::new()?;
        for batch in 0..batches {
            let started = std::time::Instant::now();
            for _ in 0..CACHED_GETS_PER_BATCH {
                std::hint::black_box(cached.get(std::hint::black_box(PROBE_KEY)));
            }
            let nanos = started.elapsed().as_nanos() / u128::from(CACHED_GETS_PER_BATCH);
            if batch >= warmup {
                latency.record_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            }
        }
        Ok(latency)
    })
    .await
    .context("the cached-get loop panicked")?
}

/// Writes from `writers` clients at once, each with its own connection to the first node and
/// its own key, for the plan's duration; then waits for the other nodes to catch up (printed,
/// not measured). Sequential writes are one writer.
pub async fn writes(
    cluster: &mut KonorCluster,
    writers: usize,
    plan: &Plan,
) -> anyhow::Result<(u64, Duration, Latency)> {
    let group = if writers == 1 { GROUP_SEQUENTIAL } else { GROUP_CONCURRENT };
    let mut clients = Vec::with_capacity(writers);
    for _ in 0..writers {
        clients.push(cluster.connect(0).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| tokio::spawn(write_loop(client, group, format!("w{index:02}"), plan.write_duration)))
        .collect();
    let mut tasks = AbortOnDrop(tasks);
    let mut operations = 0;
    let mut latency = Latency::new()?;
    for task in &mut tasks.0 {
        let (count, each) = task.await.context("a writer task panicked")??;
        operations += count;
        latency.merge(&each)?;
    }
    let elapsed = started.elapsed();
    let everyone = cluster.connect_all().await?;
    catch_up(&everyone, group).await?;
    Ok((operations, elapsed, latency))
}

/// Sets `key` to a new value in a loop until `duration` has passed; returns the count and each
/// write's latency.
async fn write_loop(
    client: Client,
    group: &'static str,
    key: String,
    duration: Duration,
) -> anyhow::Result<(u64, Latency)> {
    let mut latency = Latency::new()?;
    let started = Instant::now();
    let mut operations = 0u64;
    while started.elapsed() < duration {
        // A fresh value every time, across rounds too: setting the value a key already holds
        // is refused as unchanged.
        let request = set_request(
            group,
            &key,
            json!(format!("{key}.{}", WRITE_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed))),
        );
        let before = Instant::now();
        let answer = client.call(request).await.with_context(|| format!("write {operations} of {key} failed"))?;
        latency.record(before.elapsed());
        if !matches!(answer, Response::Committed { .. }) {
            bail!("write {operations} of {key} answered {}", answer.kind());
        }
        operations += 1;
    }
    Ok((operations, latency))
}

/// Waits until every node serves the same content for `group`: the peers' backlog of remote
/// changes after a write workload, so the next workload starts on a quiet mesh.
pub async fn catch_up(clients: &[Client], group: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let mut hashes = Vec::with_capacity(clients.len());
        for client in clients {
            hashes.push(client.snapshot(group).await.with_context(|| format!("snapshot of {group}"))?.content_hash);
        }
        if hashes.windows(2).all(|pair| pair[0] == pair[1]) {
            break;
        }
        if started.elapsed() > CATCH_UP_DEADLINE {
            println!("  WARNING: peers had not caught up with the writes to {group} after {CATCH_UP_DEADLINE:?}");
            return Ok(());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    println!(
        "  all nodes serve the same {group} state {:.2} s after the last write ack",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Polls `check` until it returns Some, failing after [`CONDITION_DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + CONDITION_DEADLINE;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {CONDITION_DEADLINE:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
