//! The Konorkestra workloads: propagation to watchers on every node, socket and cached reads,
//! sequential and concurrent writes, and daemon memory at idle. Each adds figures to a
//! [`Report`]; none decides anything about the results.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::client::Client;
use konor_sdk::protocol::{Request, Response, WatchEvent, WriteMeta};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cluster::KonorCluster;
use crate::measure::{Figure, Latency, Measured, Report, Target};
use crate::xorshift::XorShift;

/// The system name on every figure of this file.
const SYSTEM: &str = "konorkestra";

/// Group of the propagation, read and cached-read workloads.
const GROUP_PROBE: &str = "bench";

/// Group of the sequential-write workload: its own, so its history does not slow the others.
const GROUP_SEQUENTIAL: &str = "seqwrite";

/// Group of the concurrent-write workload.
const GROUP_CONCURRENT: &str = "concwrite";

/// The key the propagation workload writes; its value is the sample's sequence number.
const PROBE_KEY: &str = "probe.seq";

/// Issue target: a change is seen by watchers on all nodes within 0.5 ms (p50).
const PROPAGATION_TARGET_MICROS: f64 = 500.0;

/// Issue 5's targets on 3 nodes: eventual commit p50 <= 0.5 ms, strong commit p50 <= 1.0 ms.
const EVENTUAL_COMMIT_TARGET_MICROS: f64 = 500.0;
const STRONG_COMMIT_TARGET_MICROS: f64 = 1_000.0;

/// Groups for the commit-latency workloads, one per consistency mode.
const GROUP_COMMIT_EVENTUAL: &str = "commit-eventual";
const GROUP_COMMIT_STRONG: &str = "commit-strong";

/// Issue target: a socket get answers within 20 µs (p50).
const SOCKET_GET_TARGET_MICROS: f64 = 20.0;

/// Issue target: a cached get takes at most 1 µs (p50).
const CACHED_GET_TARGET_MICROS: f64 = 1.0;

/// Issue target: each daemon's resident memory at idle with 10 groups of 1,000 keys, 40 MB.
const RSS_TARGET_BYTES: u64 = 40_000_000;

/// Cached gets timed together: one `Instant` pair costs about as much as a cached get, so a
/// batch of 1,000 makes the timer's share negligible.
const CACHED_GETS_PER_BATCH: u32 = 1_000;

/// Clients of the concurrent-write workload, each with its own connection.
const CONCURRENT_WRITERS: usize = 16;

/// How long the daemons idle before their memory is read: long enough for peers to finish
/// the sync exchanges the last writes started and for allocators to settle.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(2);

/// Longest wait for any one condition of the system (a watcher's event, a group reaching every
/// node). Past it the run fails: the system is stuck, not slow.
const CONDITION_DEADLINE: Duration = Duration::from_secs(60);

/// Longest wait for peers to catch up after a write workload. Catching up is reported, not
/// required: past this the run goes on and says so.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(120);

/// Pause between polls of an observable condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Events buffered between the watcher tasks and the propagation loop.
const SEEN_QUEUE: usize = 1024;

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Timed propagation samples (after the warm-up).
    pub propagation_samples: u64,
    /// Timed commits per consistency mode (after the warm-up).
    pub commit_samples: u64,
    /// Timed socket gets.
    pub socket_gets: u64,
    /// Timed batches of cached gets.
    pub cached_batches: u64,
    /// Samples run but not recorded before each latency workload: connections, caches and the
    /// allocator reach their steady state.
    pub warmup_samples: u64,
    /// How long each write workload runs.
    pub write_duration: Duration,
    /// Groups created for the memory figure.
    pub idle_groups: usize,
    /// Keys per such group.
    pub idle_keys: usize,
    /// Bytes of each value in those groups.
    pub idle_value_bytes: usize,
}

impl Plan {
    /// The full run: about 1.5 minutes on an idle 2-core machine.
    pub fn full() -> Plan {
        Plan {
            propagation_samples: 5_000,
            commit_samples: 2_000,
            socket_gets: 50_000,
            cached_batches: 10_000,
            warmup_samples: 50,
            write_duration: Duration::from_secs(15),
            idle_groups: 10,
            idle_keys: 1_000,
            idle_value_bytes: 32,
        }
    }

    /// Smaller counts for a run under a minute; the memory workload keeps its size, since its
    /// target is defined for 10 groups of 1,000 keys.
    pub fn quick() -> Plan {
        Plan {
            propagation_samples: 300,
            commit_samples: 200,
            socket_gets: 3_000,
            cached_batches: 300,
            warmup_samples: 20,
            write_duration: Duration::from_secs(3),
            ..Plan::full()
        }
    }

    /// The plan as JSON, for the report.
    pub fn to_json(&self) -> Value {
        json!({
            "propagation_samples": self.propagation_samples,
            "commit_samples": self.commit_samples,
            "socket_gets": self.socket_gets,
            "cached_batches": self.cached_batches,
            "cached_gets_per_batch": CACHED_GETS_PER_BATCH,
            "warmup_samples": self.warmup_samples,
            "write_duration_s": self.write_duration.as_secs_f64(),
            "concurrent_writers": CONCURRENT_WRITERS,
            "idle_groups": self.idle_groups,
            "idle_keys": self.idle_keys,
            "idle_value_bytes": self.idle_value_bytes,
        })
    }
}

/// Runs every workload on a started cluster whose mesh is complete; figures go to `report`.
pub async fn run(cluster: &mut KonorCluster, plan: &Plan, seed: u64, report: &mut Report) -> anyhow::Result<()> {
    let clients = cluster.connect_all().await?;
    let node_count = clients.len();
    // Memory first, on daemons that have done nothing else: the write workloads leave long
    // histories behind, which is not what "idle with 10 groups" means. Measured again at the end.
    report.add(memory_figure(
        cluster,
        format!("daemon RSS, mesh formed, before any group ({node_count} nodes)"),
        None,
    )?);
    load_idle_groups(&clients, plan).await?;
    tokio::time::sleep(IDLE_BEFORE_RSS).await;
    cluster.check_running()?;
    report.add(memory_figure(
        cluster,
        format!("daemon RSS at idle, {} groups x {} keys ({node_count} nodes)", plan.idle_groups, plan.idle_keys),
        Some(Target::RssAtMostBytes(RSS_TARGET_BYTES)),
    )?);

    for group in [GROUP_PROBE, GROUP_SEQUENTIAL, GROUP_CONCURRENT] {
        group_on_all(&clients, group).await?;
    }
    propagation(&clients, plan, seed, report).await?;
    commit_latency(&clients, plan, seed, report).await?;
    // `clients` has one entry per daemon, and a cluster has at least one (`--nodes` is 1 or more).
    socket_get(&clients[0], plan, report).await?;
    cached_get(&clients[0], plan, report).await?;
    cluster.check_running()?;

    sequential_writes(&clients[0], plan, report).await?;
    catch_up(&clients, GROUP_SEQUENTIAL, "sequential", report).await?;
    concurrent_writes(cluster, plan, report).await?;
    catch_up(&clients, GROUP_CONCURRENT, "concurrent", report).await?;
    cluster.check_running()?;

    tokio::time::sleep(IDLE_BEFORE_RSS).await;
    report.add(memory_figure(cluster, "daemon RSS after the write workloads (info)".to_owned(), None)?);
    Ok(())
}

fn memory_figure(cluster: &KonorCluster, name: String, target: Option<Target>) -> anyhow::Result<Figure> {
    let nodes = cluster
        .daemons
        .iter()
        .map(|daemon| Ok((daemon.id.clone(), daemon.rss_kib()?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Figure { system: SYSTEM, name, measured: Measured::Memory(nodes), target })
}

fn meta() -> WriteMeta {
    WriteMeta { author: "konor-bench".to_owned(), message: "benchmark".to_owned() }
}

fn set_request(group: &str, key: &str, value: Value) -> Request {
    Request::Set { group: group.to_owned(), entries: BTreeMap::from([(key.to_owned(), value)]), meta: meta() }
}

/// Creates an eventual group on the first node and joins it on every other.
async fn group_on_all(clients: &[Client], group: &str) -> anyhow::Result<()> {
    group_on_all_with_mode(clients, group, "eventual").await
}

/// Commit latency per consistency mode: a `Set` from a random node, timed until it answers
/// `Committed` (eventual: a live quorum holds it durably; strong: the barrier round decided).
async fn commit_latency(clients: &[Client], plan: &Plan, seed: u64, report: &mut Report) -> anyhow::Result<()> {
    let modes = [
        (GROUP_COMMIT_EVENTUAL, "eventual", EVENTUAL_COMMIT_TARGET_MICROS),
        (GROUP_COMMIT_STRONG, "strong", STRONG_COMMIT_TARGET_MICROS),
    ];
    for (group, mode, target) in modes {
        group_on_all_with_mode(clients, group, mode).await?;
        let mut rng = crate::xorshift::XorShift::new(seed ^ 0xc0c0_a5a5);
        let mut latency = Latency::new()?;
        for sample in 0..plan.warmup_samples + plan.commit_samples {
            let writer = &clients[rng.below(clients.len())];
            let started = Instant::now();
            let answer = writer.call(set_request(group, "commit.seq", json!(sample))).await;
            let elapsed = started.elapsed();
            match answer {
                Ok(Response::Committed { .. }) => {}
                Ok(other) => bail!("{mode} commit answered {}", other.kind()),
                Err(error) => bail!("{mode} commit failed: {error}"),
            }
            if sample >= plan.warmup_samples {
                latency.record(elapsed);
            }
        }
        let target = (clients.len() == 3).then_some(Target::P50AtMostMicros(target));
        report.add(Figure {
            system: SYSTEM,
            name: format!("{mode} commit ack ({} nodes, writer on a random node)", clients.len()),
            measured: Measured::Latency(latency),
            target,
        });
    }
    Ok(())
}

/// Creates a group of `mode` on the first node and joins it on every other.
async fn group_on_all_with_mode(clients: &[Client], group: &str, mode: &str) -> anyhow::Result<()> {
    let Some((first, others)) = clients.split_first() else { bail!("no daemon to create group {group} on") };
    let created = first
        .call(Request::GroupCreate { name: group.to_owned(), mode: mode.to_owned(), key: None })
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
async fn load_idle_groups(clients: &[Client], plan: &Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    let groups: Vec<String> = (0..plan.idle_groups).map(|index| format!("idle{index}")).collect();
    for group in &groups {
        group_on_all(clients, group).await?;
        let file: serde_json::Map<String, Value> = (0..plan.idle_keys)
            .map(|key| {
                let value =
                    format!("{group}.{key:04}-").chars().cycle().take(plan.idle_value_bytes).collect::<String>();
                (format!("setting.k{key:04}"), Value::String(value))
            })
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

/// A write on a random node, timed until the watchers on every node have seen it.
async fn propagation(clients: &[Client], plan: &Plan, seed: u64, report: &mut Report) -> anyhow::Result<()> {
    let (seen_sender, mut seen) = mpsc::channel::<Seen>(SEEN_QUEUE);
    let mut watcher_tasks = Vec::new();
    for (node, client) in clients.iter().enumerate() {
        let mut watch =
            client.watch(GROUP_PROBE, None).await.with_context(|| format!("cannot watch on n{}", node + 1))?;
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

    let mut random = XorShift::new(seed);
    let mut everywhere = Latency::new()?;
    let mut ack = Latency::new()?;
    // The group's history grows by one version per sample, and a remote apply costs more as it
    // grows (docs/benchmarks.md, issue 3): the first and last tenth show how much.
    let tenth = (plan.propagation_samples / 10).max(1);
    let mut first_tenth = Latency::new()?;
    let mut last_tenth = Latency::new()?;
    let total = plan.warmup_samples + plan.propagation_samples;
    for sequence in 1..=total {
        let writer = random.below(clients.len());
        let started = Instant::now();
        let committed = clients[writer]
            .call(set_request(GROUP_PROBE, PROBE_KEY, json!(sequence)))
            .await
            .with_context(|| format!("write {sequence} on n{} failed", writer + 1))?;
        let acked = started.elapsed();
        if !matches!(committed, Response::Committed { .. }) {
            bail!("write {sequence} on n{} answered {}", writer + 1, committed.kind());
        }
        let mut seen_at: Vec<Option<Instant>> = vec![None; clients.len()];
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
            if sighting.sequence == sequence {
                seen_at[sighting.node] = Some(sighting.at);
            } else if sighting.sequence > sequence {
                bail!("n{} reported write {} before write {sequence}", sighting.node + 1, sighting.sequence);
            }
        }
        if let Some(sample) = sequence.checked_sub(plan.warmup_samples + 1) {
            let last = seen_at.iter().flatten().max().copied().unwrap_or(started);
            let elapsed = last.saturating_duration_since(started);
            everywhere.record(elapsed);
            ack.record(acked);
            if sample < tenth {
                first_tenth.record(elapsed);
            }
            if sample >= plan.propagation_samples.saturating_sub(tenth) {
                last_tenth.record(elapsed);
            }
        }
    }
    let nodes = clients.len();
    report.add(Figure {
        system: SYSTEM,
        name: format!("propagation: set on a random node -> seen by watchers on all {nodes} nodes"),
        measured: Measured::Latency(everywhere),
        target: Some(Target::P50AtMostMicros(PROPAGATION_TARGET_MICROS)),
    });
    let first_write = plan.warmup_samples + 1;
    let last_write = plan.warmup_samples + plan.propagation_samples;
    report.add(Figure {
        system: SYSTEM,
        name: format!("  same, writes {first_write}-{} to the group (info)", first_write + tenth - 1),
        measured: Measured::Latency(first_tenth),
        target: None,
    });
    report.add(Figure {
        system: SYSTEM,
        name: format!("  same, writes {}-{last_write} to the group (info)", last_write + 1 - tenth),
        measured: Measured::Latency(last_tenth),
        target: None,
    });
    report.add(Figure {
        system: SYSTEM,
        name: "writer's own commit ack (Set round trip, same writes)".to_owned(),
        measured: Measured::Latency(ack),
        target: None,
    });
    Ok(())
}

/// Aborts tasks when dropped, so no task outlives the workload that started it.
struct AbortOnDrop<T>(Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// `Client::get` round trips over the socket, one at a time.
async fn socket_get(client: &Client, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let mut latency = Latency::new()?;
    for sample in 0..plan.warmup_samples + plan.socket_gets {
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
    report.add(Figure {
        system: SYSTEM,
        name: "SDK get over the socket (Client::get round trip, n1)".to_owned(),
        measured: Measured::Latency(latency),
        target: Some(Target::P50AtMostMicros(SOCKET_GET_TARGET_MICROS)),
    });
    Ok(())
}

/// `CachedGroup::get` in a tight loop on a blocking thread, timed per batch.
async fn cached_get(client: &Client, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let cached = client.cached(GROUP_PROBE).await.context("cannot open the read cache")?;
    if cached.get(PROBE_KEY).is_none() {
        bail!("the read cache of {GROUP_PROBE} has no {PROBE_KEY}");
    }
    let batches = plan.warmup_samples + plan.cached_batches;
    let warmup = plan.warmup_samples;
    // A blocking thread: the loop never yields, and must not hold up the runtime's workers.
    let latency = tokio::task::spawn_blocking(move || -> anyhow::Result<Latency> {
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
    .context("the cached-get loop panicked")??;
    report.add(Figure {
        system: SYSTEM,
        name: format!("SDK cached get (CachedGroup::get, per get, batches of {CACHED_GETS_PER_BATCH})"),
        measured: Measured::Latency(latency),
        target: Some(Target::P50AtMostMicros(CACHED_GET_TARGET_MICROS)),
    });
    Ok(())
}

/// Writes one after another from one client for the plan's duration.
async fn sequential_writes(client: &Client, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let (operations, elapsed, latency) =
        write_loop(client.clone(), GROUP_SEQUENTIAL, "w".to_owned(), plan.write_duration).await?;
    report.add(Figure {
        system: SYSTEM,
        name: "sequential writes, 1 client on n1".to_owned(),
        measured: Measured::Throughput { operations, elapsed, latency },
        target: None,
    });
    Ok(())
}

/// Writes from 16 clients at once, each with its own connection to the first node.
async fn concurrent_writes(cluster: &mut KonorCluster, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let mut writers = Vec::with_capacity(CONCURRENT_WRITERS);
    for _ in 0..CONCURRENT_WRITERS {
        writers.push(cluster.connect(0).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            tokio::spawn(write_loop(client, GROUP_CONCURRENT, format!("w{index:02}"), plan.write_duration))
        })
        .collect();
    let mut tasks = AbortOnDrop(tasks);
    let mut results = Vec::with_capacity(CONCURRENT_WRITERS);
    for task in &mut tasks.0 {
        results.push(task.await.context("a writer task panicked")?);
    }
    let elapsed = started.elapsed();
    let mut operations = 0;
    let mut latency = Latency::new()?;
    for result in results {
        let (count, _, each) = result?;
        operations += count;
        latency.merge(&each)?;
    }
    report.add(Figure {
        system: SYSTEM,
        name: format!("concurrent writes, {CONCURRENT_WRITERS} clients on n1"),
        measured: Measured::Throughput { operations, elapsed, latency },
        target: None,
    });
    Ok(())
}

/// Sets `key` to a new value in a loop until `duration` has passed; returns the count, the
/// time taken and each write's latency.
async fn write_loop(
    client: Client,
    group: &'static str,
    key: String,
    duration: Duration,
) -> anyhow::Result<(u64, Duration, Latency)> {
    let mut latency = Latency::new()?;
    let started = Instant::now();
    let mut operations = 0u64;
    while started.elapsed() < duration {
        // A new value every time: setting the value a key already holds is refused as unchanged.
        let request = set_request(group, &key, json!(operations));
        let before = Instant::now();
        let answer = client.call(request).await.with_context(|| format!("write {operations} of {key} failed"))?;
        latency.record(before.elapsed());
        if !matches!(answer, Response::Committed { .. }) {
            bail!("write {operations} of {key} answered {}", answer.kind());
        }
        operations += 1;
    }
    Ok((operations, started.elapsed(), latency))
}

/// Waits until every node serves the same content for `group` and reports how long that took
/// after the writes ended: the peers' backlog of remote changes.
async fn catch_up(clients: &[Client], group: &str, workload: &str, report: &mut Report) -> anyhow::Result<()> {
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
            println!("  WARNING: peers had not caught up with the {workload} writes after {CATCH_UP_DEADLINE:?}");
            return Ok(());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    report.add(Figure {
        system: SYSTEM,
        name: format!("catch-up: all nodes serve the same {workload}-write state, after the last ack (info)"),
        measured: Measured::Once(started.elapsed()),
        target: None,
    });
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
