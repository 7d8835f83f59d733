//! The long-history mode (`konor-bench --long-history`, issue 14): one group (eventual, or
//! strong with `--history-mode strong`) written up to 100,000 versions, with propagation, commit latency and daemon memory measured at 1k,
//! 10k and 100k versions, so a cost that grows with a group's age shows as a ratio to the 1k
//! figure. Konorkestra only: etcd's history does not grow its costs (its MVCC store compacts).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::client::Client;
use konor_sdk::protocol::Response;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::cluster::KonorCluster;
use crate::konor::{self, set_request};
use crate::measure::{Latency, format_micros};
use crate::workload::{AbortOnDrop, Plan};
use crate::xorshift::XorShift;

/// The group every write of this mode goes to.
const GROUP: &str = "history";

/// Keys the filling writers spread their writes over: a group of realistic width, so a key's
/// own history grows a hundred times slower than the group's.
const KEYS: u64 = 1_000;

/// Writers that fill the group between measurements, spread over the nodes.
const FILL_WRITERS: usize = 12;

/// Versions at which the figures are taken (those up to `--versions`, and `--versions`).
const CHECKPOINTS: [u64; 3] = [1_000, 10_000, 100_000];

/// Quiet time before reading each daemon's memory, so freed buffers are back.
const SETTLE_BEFORE_RSS: Duration = Duration::from_secs(2);

/// Figures at one checkpoint.
struct Checkpoint {
    versions: u64,
    propagation: Latency,
    commit: Latency,
    rss_max_kib: u64,
}

/// What one run of the mode does.
pub struct Run<'a> {
    /// The group's mode: `eventual` or `strong`.
    pub mode: &'a str,
    /// Versions to write the group up to.
    pub versions: u64,
    /// Seed of the generator that picks writers and keys.
    pub seed: u64,
}

/// Runs the mode on a fresh cluster of `nodes` and prints its table; returns the JSON report.
pub async fn run(
    konord: &std::path::Path,
    nodes: usize,
    run: &Run<'_>,
    work_dir: &std::path::Path,
    plan: &Plan,
) -> anyhow::Result<Value> {
    let mut cluster = KonorCluster::start(konord, nodes, work_dir).await?;
    let result = measure(&mut cluster, run, plan).await;
    if result.is_err() {
        eprintln!("konor-bench: the run failed; the daemons' logs end with:\n{}", cluster.log_tails());
    }
    result
}

async fn measure(cluster: &mut KonorCluster, run: &Run<'_>, plan: &Plan) -> anyhow::Result<Value> {
    let Run { mode, versions, seed } = *run;
    let clients = cluster.connect_all().await?;
    cluster.wait_for_mesh(&clients).await?;
    konor::group_on_all_with_mode(&clients, GROUP, mode).await?;
    tokio::time::sleep(SETTLE_BEFORE_RSS).await;
    let idle_kib = max_rss(cluster)?;
    println!(
        "long history: {} nodes, {mode} group {GROUP:?}, writes spread over {KEYS} keys; idle RSS (largest daemon) {:.1} MB",
        clients.len(),
        mb(idle_kib)
    );

    let written = Arc::new(AtomicU64::new(1));
    let mut random = XorShift::new(seed);
    let mut sequence = 0u64;
    let mut checkpoints = Vec::new();
    let targets: Vec<u64> =
        CHECKPOINTS.iter().copied().filter(|c| *c < versions).chain(std::iter::once(versions)).collect();
    for target in targets {
        let started = Instant::now();
        fill(cluster, target, &written, mode == "strong").await?;
        konor::catch_up(&clients, GROUP).await?;
        let filled = written.load(Ordering::Relaxed);
        println!("  filled to {filled} versions in {:.1} s; measuring", started.elapsed().as_secs_f64());
        let samples = plan.warmup_samples + plan.commit_samples;
        let propagation =
            konor::propagation_in(&clients, GROUP, samples, plan.warmup_samples, &mut random, &mut sequence).await?;
        let commit = konor::commit(&clients, GROUP, plan, &mut random).await?;
        written.fetch_add(samples * 2, Ordering::Relaxed);
        tokio::time::sleep(SETTLE_BEFORE_RSS).await;
        cluster.check_running()?;
        let rss_max_kib = max_rss(cluster)?;
        println!(
            "  at {filled} versions: propagation p50 {}, commit p50 {}, RSS {:.1} MB",
            format_micros(propagation.quantile_micros(0.5)),
            format_micros(commit.quantile_micros(0.5)),
            mb(rss_max_kib)
        );
        checkpoints.push(Checkpoint { versions: filled, propagation, commit, rss_max_kib });
    }
    print_table(&checkpoints, idle_kib);
    Ok(json!({
        "nodes": clients.len(),
        "group_mode": mode,
        "keys": KEYS,
        "idle_rss_kib": idle_kib,
        "checkpoints": checkpoints.iter().map(|c| json!({
            "versions": c.versions,
            "propagation": c.propagation.to_json(),
            "commit": c.commit.to_json(),
            "rss_max_kib": c.rss_max_kib,
        })).collect::<Vec<_>>(),
    }))
}

/// Writes from [`FILL_WRITERS`] clients spread over the nodes until the group holds `target`
/// versions (each write of a new value makes one). A strong group is filled through the first
/// node: its rounds run one at a time there, queued, where rounds from several coordinators
/// would abort each other.
async fn fill(cluster: &mut KonorCluster, target: u64, written: &Arc<AtomicU64>, strong: bool) -> anyhow::Result<()> {
    let nodes = if strong { 1 } else { cluster.daemons.len() };
    let mut tasks = Vec::with_capacity(FILL_WRITERS);
    for writer in 0..FILL_WRITERS {
        let client = cluster.connect(writer % nodes).await?;
        let written = Arc::clone(written);
        tasks.push(tokio::spawn(fill_loop(client, writer as u64, target, written)));
    }
    let mut tasks = AbortOnDrop(tasks);
    for task in &mut tasks.0 {
        task.await.context("a filling writer panicked")??;
    }
    Ok(())
}

async fn fill_loop(client: Client, writer: u64, target: u64, written: Arc<AtomicU64>) -> anyhow::Result<()> {
    let mut random = XorShift::new(writer + 1);
    loop {
        let serial = written.fetch_add(1, Ordering::Relaxed);
        if serial >= target {
            written.fetch_sub(1, Ordering::Relaxed);
            return Ok(());
        }
        let key = format!("fill.k{:04}", random.below(KEYS as usize));
        let answer = client
            .call(set_request(GROUP, &key, json!(format!("w{writer}.{serial}"))))
            .await
            .with_context(|| format!("filling write {serial} failed"))?;
        if !matches!(answer, Response::Committed { .. }) {
            bail!("filling write {serial} answered {}", answer.kind());
        }
    }
}

fn max_rss(cluster: &KonorCluster) -> anyhow::Result<u64> {
    Ok(konor::memory(cluster)?.into_iter().map(|(_, kib)| kib).max().unwrap_or(0))
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn print_table(checkpoints: &[Checkpoint], idle_kib: u64) {
    let Some(first) = checkpoints.first() else { return };
    let base = |l: &Latency| l.quantile_micros(0.5).max(1.0);
    println!();
    println!(
        "{:>9}  {:>26}  {:>8}  {:>26}  {:>8}  {:>10}  {:>8}",
        "versions", "propagation p50 / p99", "vs first", "commit p50 / p99", "vs first", "RSS (MB)", "vs idle"
    );
    for c in checkpoints {
        println!(
            "{:>9}  {:>26}  {:>7.2}x  {:>26}  {:>7.2}x  {:>10.1}  {:>7.2}x",
            c.versions,
            format!(
                "{} / {}",
                format_micros(c.propagation.quantile_micros(0.5)),
                format_micros(c.propagation.quantile_micros(0.99))
            ),
            c.propagation.quantile_micros(0.5) / base(&first.propagation),
            format!(
                "{} / {}",
                format_micros(c.commit.quantile_micros(0.5)),
                format_micros(c.commit.quantile_micros(0.99))
            ),
            c.commit.quantile_micros(0.5) / base(&first.commit),
            mb(c.rss_max_kib),
            c.rss_max_kib as f64 / idle_kib.max(1) as f64
        );
    }
    println!("goals (issue 14): p50 at 100k versions within 1.2x of the 1k figure; RSS at 100k within 2x of idle");
}
