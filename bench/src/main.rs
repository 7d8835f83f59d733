//! konor-bench: a benchmark, not a test. Starts local konord daemons from the release build,
//! measures propagation, reads, writes and memory with the real SDK over the real socket, and
//! prints each figure next to the target. Missed targets are reported, never failures.
//!
//! Exit codes: 0 every figure measured; 1 the benchmark could not run (the message says why);
//! 2 bad arguments; 130 interrupted (Ctrl-C or SIGTERM). Every daemon and temp dir is removed
//! in all of these cases.

mod cluster;
mod konor;
mod measure;
mod xorshift;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use serde_json::json;

use crate::cluster::KonorCluster;
use crate::measure::{Machine, Report, filesystem_of};

/// Benchmark Konorkestra on local konord daemons (run from a release build).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Smaller counts and shorter write phases: finishes in under a minute.
    #[arg(long)]
    quick: bool,
    /// Number of konord daemons to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    nodes: u16,
    /// Also write every figure to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed of the generator that picks the writing node.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory under which the daemons' temp dir is made (default: the system temp dir). The
    /// filesystem matters: writes are fsynced.
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
        // When a signal wins, `run` is dropped here: the cluster guard inside it kills every
        // daemon and removes the temp dir before the process exits.
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
    let machine = Machine::describe();
    println!("{}", machine.line());
    if cfg!(debug_assertions) {
        println!("WARNING: konor-bench is a debug build; build it with --release for meaningful figures");
    }
    let konord = cluster::konord_next_to_this_executable()?;
    let plan = if args.quick { konor::Plan::quick() } else { konor::Plan::full() };
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let node_count = usize::from(args.nodes);
    println!(
        "konord: {} ({} daemons, data under {} on {}); seed {}; {} run",
        konord.display(),
        node_count,
        work_dir.display(),
        filesystem_of(&work_dir),
        args.seed,
        if args.quick { "quick" } else { "full" }
    );

    let mut cluster = KonorCluster::start(&konord, node_count, &work_dir).await?;
    let result = measure_all(&mut cluster, &plan, &args, &machine).await;
    if result.is_err() {
        eprintln!("konor-bench: the run failed; the daemons' logs end with:\n{}", cluster.log_tails());
    }
    // Dropping the cluster here (also on error) kills the daemons and removes the temp dir.
    drop(cluster);
    result
}

async fn measure_all(
    cluster: &mut KonorCluster,
    plan: &konor::Plan,
    args: &Args,
    machine: &Machine,
) -> anyhow::Result<()> {
    let clients = cluster.connect_all().await?;
    let mesh = cluster.wait_for_mesh(&clients).await?;
    drop(clients);
    println!(
        "mesh: {} nodes see each other live after {:.2} s ({})",
        cluster.daemons.len(),
        mesh.as_secs_f64(),
        cluster.dir().display()
    );

    let mut report = Report::default();
    konor::run(cluster, plan, args.seed, &mut report).await?;

    println!();
    print!("{}", report.table());
    let (met, set) = report.targets_met();
    println!("targets met: {met} of {set}");
    if let Some(path) = &args.json {
        let options = json!({
            "nodes": args.nodes,
            "quick": args.quick,
            "seed": args.seed,
            "plan": plan.to_json(),
            "work_dir_filesystem": filesystem_of(&args.work_dir.clone().unwrap_or_else(std::env::temp_dir)),
        });
        let text =
            serde_json::to_string_pretty(&report.to_json(machine, options)).context("cannot encode the JSON report")?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}
