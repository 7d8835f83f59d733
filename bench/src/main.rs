//! konor-bench: a benchmark, not a test. Starts local konord daemons (from the release build)
//! and an etcd cluster of the same size side by side, measures both with the same workloads in
//! interleaved rounds, and prints each figure for both systems with the ratio ours/etcd and the
//! issue's goal for it. Missed goals are reported, never failures.
//!
//! Exit codes: 0 every figure measured; 1 the benchmark could not run (the message says why);
//! 2 bad arguments; 130 interrupted (Ctrl-C or SIGTERM). Every daemon, etcd member and temp
//! dir is removed in all of these cases.

mod cluster;
mod compare;
#[cfg_attr(not(feature = "etcd"), path = "etcd_absent.rs")]
mod etcd;
mod history;
mod konor;
mod measure;
mod plot;
mod workload;
mod xorshift;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use crate::cluster::KonorCluster;
use crate::compare::{Comparison, Goal, Measured, RowInfo, System, Unit};
use crate::etcd::EtcdCluster;
use crate::measure::{Machine, filesystem_of};
use crate::workload::{CONCURRENT_WRITERS, Plan};
use crate::xorshift::XorShift;

/// Benchmark Konorkestra against etcd on this machine (run from a release build).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A smoke check: 3 nodes, smaller counts, one-second write phases; under a minute.
    #[arg(long)]
    quick: bool,
    /// Cluster sizes to measure, each for both systems (default: 3,5; with --quick: 3).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=16))]
    nodes: Vec<u16>,
    /// Interleaved rounds per size; each figure is the median over them.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    rounds: u16,
    /// Measure Konorkestra alone (no etcd figures, no ratios).
    #[arg(long)]
    no_etcd: bool,
    /// Also write every figure, round by round, to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the latency CDFs of both systems to this SVG file (one per size: `-3`, `-5` is
    /// added before the extension when several sizes are measured).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Seed of the generator that picks the writing node.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The long-history mode instead of the comparison: one group written up to `--versions`
    /// versions, with propagation, commit latency and memory at 1k, 10k and 100k (Konorkestra
    /// only; `--nodes` defaults to 3; `--quick` takes fewer samples).
    #[arg(long)]
    long_history: bool,
    /// The mode of the long-history mode's group: `eventual`, or `strong` (filled through one
    /// node, whose strong rounds run one at a time).
    #[arg(long, default_value = "eventual", value_parser = ["eventual", "strong"])]
    history_mode: String,
    /// Versions the long-history mode writes the group up to.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1_000..=1_000_000))]
    versions: u64,
    /// Directory under which both systems' temp dirs are made (default: the system temp dir).
    /// The filesystem matters: both fsync every write.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

enum Outcome {
    Done,
    Interrupted,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("konor-bench: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(async {
        // When a signal wins, `run` is dropped here: the cluster guards inside it kill every
        // process and remove the temp dirs before the process exits.
        tokio::select! {
            result = run(args) => result.map(|()| Outcome::Done),
            () = interrupted() => Ok(Outcome::Interrupted),
        }
    });
    match outcome {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => {
            eprintln!("konor-bench: interrupted; daemons stopped and temp files removed");
            ExitCode::from(130)
        }
        Err(error) => {
            eprintln!("konor-bench: {error:#}");
            ExitCode::from(1)
        }
    }
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let machine = Machine::describe();
    println!("{}", machine.line());
    if cfg!(debug_assertions) {
        println!("WARNING: konor-bench is a debug build; build it with --release for meaningful figures");
    }
    let konord = cluster::konord_next_to_this_executable()?;
    if args.long_history {
        return long_history(&args, &konord, started).await;
    }
    let etcd_binary = if args.no_etcd { None } else { Some(etcd::etcd_binary()?) };
    let mut plan = if args.quick { Plan::quick() } else { Plan::full() };
    plan.rounds = usize::from(args.rounds);
    let sizes: Vec<usize> = match (&args.nodes[..], args.quick) {
        ([], true) => vec![3],
        ([], false) => vec![3, 5],
        (sizes, _) => sizes.iter().map(|size| usize::from(*size)).collect(),
    };
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "konord: {}; etcd: {}; sizes {sizes:?}; {} rounds; data under {} on {}; seed {}; {} run",
        konord.display(),
        etcd_binary.as_ref().map_or_else(|| "not measured".to_owned(), |path| etcd::describe(path)),
        plan.rounds,
        work_dir.display(),
        filesystem_of(&work_dir),
        args.seed,
        if args.quick { "quick" } else { "full" }
    );

    let mut comparison = Comparison::default();
    for &nodes in &sizes {
        println!("\n== {nodes} nodes ==");
        measure_size(nodes, &konord, etcd_binary.as_deref(), &work_dir, &plan, args.seed, &mut comparison).await?;
    }

    println!();
    print!("{}", comparison.table());
    let (met, set) = comparison.goals_met();
    println!("goals met: {met} of {set}; ratios are medians over {} interleaved rounds", plan.rounds);
    if let Some(path) = &args.plot {
        for &nodes in &sizes {
            let file = if sizes.len() == 1 { path.clone() } else { with_suffix(path, nodes) };
            let only = Comparison { rows: comparison.rows.iter().filter(|row| row.nodes == nodes).cloned().collect() };
            plot::draw(&only, &file)?;
            println!("latency CDFs for {nodes} nodes drawn to {}", file.display());
        }
    }
    if let Some(path) = &args.json {
        let report = json!({
            "machine": machine.to_json(),
            "options": {
                "sizes": sizes, "quick": args.quick, "seed": args.seed, "plan": plan.to_json(),
                "etcd": etcd_binary.as_ref().map(|path| etcd::describe(path)),
                "work_dir_filesystem": filesystem_of(&work_dir),
            },
            "rows": comparison.to_json(),
            "wall_s": started.elapsed().as_secs_f64(),
        });
        write_report(path, &report)?;
    }
    println!("wall time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The long-history mode: one run per size, Konorkestra only.
async fn long_history(args: &Args, konord: &Path, started: std::time::Instant) -> anyhow::Result<()> {
    let plan = if args.quick { Plan::quick() } else { Plan::full() };
    let sizes: Vec<usize> =
        if args.nodes.is_empty() { vec![3] } else { args.nodes.iter().map(|size| usize::from(*size)).collect() };
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "konord: {}; long history of a {} group up to {} versions; sizes {sizes:?}; data under {} on {}; {} samples per figure",
        konord.display(),
        args.history_mode,
        args.versions,
        work_dir.display(),
        filesystem_of(&work_dir),
        plan.commit_samples
    );
    let mut reports = Vec::new();
    for &nodes in &sizes {
        println!("\n== {nodes} nodes ==");
        let run = history::Run { mode: &args.history_mode, versions: args.versions, seed: args.seed };
        reports.push(history::run(konord, nodes, &run, &work_dir, &plan).await?);
    }
    if let Some(path) = &args.json {
        let report = json!({
            "machine": Machine::describe().to_json(),
            "mode": "long_history",
            "group_mode": args.history_mode,
            "versions": args.versions,
            "plan": plan.to_json(),
            "runs": reports,
            "wall_s": started.elapsed().as_secs_f64(),
        });
        write_report(path, &report)?;
    }
    println!("wall time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Writes a run's figures to `path` as pretty JSON, and says so.
fn write_report(path: &Path, report: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report).context("cannot encode the JSON report")?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    println!("figures written to {}", path.display());
    Ok(())
}

/// `out.svg` -> `out-5.svg`.
fn with_suffix(path: &Path, nodes: usize) -> PathBuf {
    let stem = path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    let extension = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    path.with_file_name(format!("{stem}-{nodes}{extension}"))
}

/// Runs `konor` and `etcd` one after the other, Konorkestra first when `konor_first`: the
/// order alternates between rounds so neither system always runs on a machine still busy
/// with the other's background work.
async fn in_order<K: Future, E: Future>(konor_first: bool, konor: K, etcd: E) -> (K::Output, E::Output) {
    if konor_first {
        let ours = konor.await;
        (ours, etcd.await)
    } else {
        let theirs = etcd.await;
        (konor.await, theirs)
    }
}

/// Both systems of one size: start, load the idle data, then the interleaved rounds.
async fn measure_size(
    nodes: usize,
    konord: &Path,
    etcd_binary: Option<&Path>,
    work_dir: &Path,
    plan: &Plan,
    seed: u64,
    comparison: &mut Comparison,
) -> anyhow::Result<()> {
    let mut konor = KonorCluster::start(konord, nodes, work_dir).await?;
    let result = async {
        let clients = konor.connect_all().await?;
        let mesh = konor.wait_for_mesh(&clients).await?;
        println!(
            "konorkestra: {nodes} nodes see each other live after {:.2} s ({})",
            mesh.as_secs_f64(),
            konor.dir().display()
        );
        let mut etcd = match etcd_binary {
            Some(binary) => {
                let started = std::time::Instant::now();
                let cluster = EtcdCluster::start(binary, nodes, work_dir).await?;
                println!(
                    "etcd: {nodes} members agree on a leader after {:.2} s ({})",
                    started.elapsed().as_secs_f64(),
                    cluster.dir().display()
                );
                Some(cluster)
            }
            None => None,
        };
        rounds(&mut konor, clients, etcd.as_mut(), plan, seed, comparison).await
    }
    .await;
    if result.is_err() {
        eprintln!("konor-bench: the run failed; the daemons' logs end with:\n{}", konor.log_tails());
    }
    result
}

async fn rounds(
    konor: &mut KonorCluster,
    clients: Vec<konor_sdk::client::Client>,
    mut etcd: Option<&mut EtcdCluster>,
    plan: &Plan,
    seed: u64,
    comparison: &mut Comparison,
) -> anyhow::Result<()> {
    let nodes = clients.len();
    let mut table = Recorder { comparison, nodes };
    // Memory first, on daemons that hold the idle data set and have done nothing else: the
    // write workloads leave long histories behind, which is not what "idle" means.
    let loading = std::time::Instant::now();
    konor::load_idle_groups(&clients, plan).await?;
    if let Some(etcd) = etcd.as_deref_mut() {
        etcd.load_idle(plan).await?;
    }
    println!(
        "loaded {} groups x {} keys into each system in {:.2} s",
        plan.idle_groups,
        plan.idle_keys,
        loading.elapsed().as_secs_f64()
    );
    tokio::time::sleep(IDLE_BEFORE_RSS).await;
    konor.check_running()?;
    let etcd_memory = etcd.as_deref().map(EtcdCluster::memory).transpose()?;
    table.record(
        &format!("daemon RSS at idle, {} groups x {} keys", plan.idle_groups, plan.idle_keys),
        row("konord", "etcd member", Unit::Megabytes, Some(Goal::AtMost(1.0))),
        Measured::Memory(konor::memory(konor)?),
        etcd_memory.map(Measured::Memory),
    );
    konor::prepare_groups(&clients).await?;

    let mut random = XorShift::new(seed);
    let mut sequence = 0u64;
    let (leader, follower) = etcd.as_deref().map_or((0, 0), EtcdCluster::leader_and_follower);
    for round in 0..plan.rounds {
        let konor_first = round % 2 == 0;
        println!("round {} of {} ({} first)", round + 1, plan.rounds, if konor_first { "konorkestra" } else { "etcd" });

        let (ours, theirs) = in_order(
            konor_first,
            konor::propagation(&clients, plan, &mut random, &mut sequence),
            optional(etcd.as_deref_mut(), async |etcd: &mut EtcdCluster| {
                let on_leader = etcd.propagation(leader, plan.propagation_samples, plan.warmup_samples).await?;
                let on_follower = etcd.propagation(follower, plan.propagation_samples, plan.warmup_samples).await?;
                Ok((on_leader, on_follower))
            }),
        )
        .await;
        let (ours, theirs) = (Measured::Latency(ours?), theirs?);
        let how = "set on a random node";
        table.record(
            "change -> seen by watchers on all other nodes",
            row(how, "put on the leader", Unit::Micros, Some(Goal::AtMost(0.5))),
            ours.clone(),
            theirs.as_ref().map(|(on_leader, _)| Measured::Latency(on_leader.clone())),
        );
        table.record(
            "change -> seen on all other nodes, etcd writer on a follower",
            row(how, "put on a follower", Unit::Micros, None),
            ours,
            theirs.map(|(_, on_follower)| Measured::Latency(on_follower)),
        );

        let (ours, theirs) = in_order(
            konor_first,
            async {
                let eventual = konor::commit(&clients, konor::GROUP_COMMIT_EVENTUAL, plan, &mut random).await?;
                let strong = konor::commit(&clients, konor::GROUP_COMMIT_STRONG, plan, &mut random).await?;
                anyhow::Ok((eventual, strong))
            },
            optional(etcd.as_deref_mut(), async |etcd: &mut EtcdCluster| {
                let on_leader = etcd.put_ack(leader, plan.commit_samples, plan.warmup_samples).await?;
                let on_follower = etcd.put_ack(follower, plan.commit_samples, plan.warmup_samples).await?;
                Ok((on_leader, on_follower))
            }),
        )
        .await;
        let ((eventual, strong), theirs) = (ours?, theirs?);
        let on_leader = theirs.as_ref().map(|(on_leader, _)| Measured::Latency(on_leader.clone()));
        table.record(
            "write acknowledged: eventual commit / put on the leader",
            row("eventual set, random node", "put on the leader", Unit::Micros, Some(Goal::AtMost(1.0))),
            Measured::Latency(eventual.clone()),
            on_leader.clone(),
        );
        table.record(
            "write acknowledged: strong commit / put on the leader",
            row("strong set, random node", "put on the leader", Unit::Micros, Some(Goal::AtMost(1.2))),
            Measured::Latency(strong),
            on_leader,
        );
        table.record(
            "write acknowledged: eventual commit / put on a follower",
            row("eventual set, random node", "put on a follower", Unit::Micros, None),
            Measured::Latency(eventual),
            theirs.map(|(_, on_follower)| Measured::Latency(on_follower)),
        );

        let (ours, theirs) = in_order(
            konor_first,
            async {
                let socket = konor::socket_get(&clients[0], plan).await?;
                let cached = konor::cached_get(&clients[0], plan).await?;
                let https = konor::https_get(&konor.http_endpoint(0)?, plan).await?;
                anyhow::Ok((socket, cached, https))
            },
            optional(etcd.as_deref_mut(), async |etcd: &mut EtcdCluster| {
                etcd.serializable_get(leader, plan.local_gets, plan.warmup_samples).await
            }),
        )
        .await;
        let ((socket, cached, https), theirs) = (ours?, theirs?.map(Measured::Latency));
        let local = "serializable get on the leader";
        table.record(
            "local read",
            row("SDK get over the socket, n1", local, Unit::Micros, Some(Goal::AtMost(0.15))),
            Measured::Latency(socket),
            theirs.clone(),
        );
        table.record(
            "read over the HTTP API (HTTPS, kept-alive connection)",
            row("HTTPS get on n1's /api/v1", local, Unit::Micros, None),
            Measured::Latency(https),
            theirs.clone(),
        );
        table.record(
            "local read, cached (etcd has no counterpart)",
            row("SDK cached get", local, Unit::Micros, None),
            Measured::Latency(cached),
            theirs,
        );

        for (writers, name, goal) in [
            (1, "sequential writes, 1 client".to_owned(), Some(Goal::AtLeast(2.0))),
            (CONCURRENT_WRITERS, format!("concurrent writes, {CONCURRENT_WRITERS} clients"), None),
        ] {
            let (ours, theirs) = in_order(
                konor_first,
                konor::writes(konor, writers, plan),
                optional(etcd.as_deref_mut(), async |etcd: &mut EtcdCluster| {
                    etcd.writes(leader, writers, plan.write_duration).await
                }),
            )
            .await;
            let throughput = |(operations, elapsed, latency)| Measured::Throughput { operations, elapsed, latency };
            table.record(
                &name,
                row("eventual set on n1", "put on the leader", Unit::PerSecond, goal),
                throughput(ours?),
                theirs?.map(throughput),
            );
        }
        konor.check_running()?;
        if let Some(etcd) = etcd.as_deref_mut() {
            etcd.check_running()?;
        }
    }
    Ok(())
}

/// Records rows of one cluster size, printing each round's figures as they come.
struct Recorder<'a> {
    comparison: &'a mut Comparison,
    nodes: usize,
}

impl Recorder<'_> {
    fn record(&mut self, name: &str, info: RowInfo, ours: Measured, theirs: Option<Measured>) {
        println!(
            "  {name}: konorkestra {}; etcd {}",
            ours.brief(),
            theirs.as_ref().map_or_else(|| "-".to_owned(), Measured::brief)
        );
        self.comparison.record(self.nodes, name, System::Konor, ours, &info);
        if let Some(theirs) = theirs {
            self.comparison.record(self.nodes, name, System::Etcd, theirs, &info);
        }
    }
}

fn row(ours_how: &str, etcd_how: &str, unit: Unit, goal: Option<Goal>) -> RowInfo {
    RowInfo { ours_how: ours_how.to_owned(), etcd_how: etcd_how.to_owned(), unit, goal }
}

/// How long both systems idle before their memory is read: long enough for peers to finish
/// the sync exchanges the last writes started and for allocators to settle.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(2);

/// Runs `work` on etcd when it is measured.
async fn optional<T>(
    etcd: Option<&mut EtcdCluster>,
    work: impl AsyncFnOnce(&mut EtcdCluster) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    match etcd {
        Some(etcd) => Ok(Some(work(etcd).await?)),
        None => Ok(None),
    }
}
