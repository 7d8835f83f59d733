//! `konor-chaos`: runs chaos runs and judges them (`run`, `sweep`), judges a kept history again
//! (`check`) and removes what a killed run left (`cleanup`); docs/testing.md, "Chaos". Exit codes: 0 a run (or every run of a sweep) ended
//! and was judged clean; 1 a run failed or was judged to have violations; 2 bad arguments;
//! 130 interrupted (ctrl-C or SIGTERM), after cleaning up.

mod cleanup;
mod cluster;
mod faults;
mod lab;
mod py_clients;
mod record;
mod run;
mod workload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use konor_chaos::history;
use konor_chaos::history::Record;

use crate::run::{RunOptions, RunSummary};

#[derive(Parser)]
#[command(name = "konor-chaos", about = "Real konord processes in network namespaces under seeded faults")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One bounded run: faults for --duration, then heal, settle, final states, and the checker.
    Run {
        /// Seed of the fault schedule and the workload: the same seed replays the same schedule.
        #[arg(long)]
        seed: u64,
        /// Run dir (default: chaos-runs/seed-N under the current dir).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Runs seeds one after the other (`--seeds 1..20`: 1 to 20, both included), each in
    /// OUT/seed-N.
    Sweep {
        /// Seeds, `A..B` (both included) or one number.
        #[arg(long)]
        seeds: String,
        /// Parent of the run dirs (default: chaos-runs).
        #[arg(long, default_value = "chaos-runs")]
        out: PathBuf,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Prints the fault schedule a seed would run, without running anything (to pick seeds).
    Plan {
        /// Seed.
        #[arg(long)]
        seed: u64,
        /// Length of the fault phase.
        #[arg(long, default_value = "90s", value_parser = parse_duration)]
        duration: Duration,
        /// Nodes, 3 to 7.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
    },
    /// Judges a kept history again (a run dir or its history.jsonl) and prints the summary.
    Check {
        /// A run dir or a history file.
        path: PathBuf,
    },
    /// Removes what killed runs left: processes in the suite's namespaces and in the pid files
    /// under --out, the suite's tmpfs mounts, veths, namespaces and bridges with its prefixes.
    /// Do not run it while a run is going: it removes every run's network.
    Cleanup {
        /// Where run dirs are (their konord.pids files are read).
        #[arg(long, default_value = "chaos-runs")]
        out: PathBuf,
    },
}

#[derive(Args, Clone)]
struct CommonArgs {
    /// Length of the fault phase (`90s`, `2m`, `1500ms`; a bare number is seconds).
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    duration: Duration,
    /// Nodes, 3 to 7.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// The konord binary (default: `konord` beside this binary, as cargo builds it into the
    /// same target dir).
    #[arg(long)]
    konord: Option<PathBuf>,
    /// Longest wait after healing for the nodes to agree, before the final states are read.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    settle: Duration,
    /// Workload clients per node.
    #[arg(long, default_value_t = 2)]
    clients_per_node: u32,
    /// Workload clients per node on the Python SDK (`python3` and sdk/python; 0: none).
    #[arg(long, default_value_t = 1)]
    python_clients_per_node: u32,
    /// konord's log filter (KONOR_LOG syntax).
    #[arg(long, default_value = "info")]
    log: String,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 90s, 2m or 500ms"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(number)),
        "ms" => Ok(Duration::from_millis(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        _ => Err(format!("`{text}`: the unit must be ms, s or m")),
    }
}

fn parse_seeds(text: &str) -> anyhow::Result<Vec<u64>> {
    match text.split_once("..") {
        Some((from, to)) => {
            let from: u64 = from.trim().parse().context("the first seed of --seeds")?;
            let to: u64 = to.trim().trim_start_matches('=').parse().context("the last seed of --seeds")?;
            if from > to {
                bail!("--seeds {text}: the first seed is after the last");
            }
            Ok((from..=to).collect())
        }
        None => Ok(vec![text.trim().parse().context("--seeds takes A..B or one number")?]),
    }
}

impl CommonArgs {
    fn options(&self, seed: u64, out: PathBuf) -> anyhow::Result<RunOptions> {
        Ok(RunOptions {
            seed,
            duration: self.duration,
            nodes: self.nodes,
            out,
            konord: konord_path(self.konord.as_deref())?,
            settle: self.settle,
            clients_per_node: self.clients_per_node,
            python_clients_per_node: self.python_clients_per_node,
            log_filter: self.log.clone(),
        })
    }
}

/// `--konord`, or `konord` beside this binary.
fn konord_path(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe().context("locating konor-chaos")?.with_file_name("konord"),
    };
    if !path.is_file() {
        bail!(
            "no konord at {}: build it into the same target dir (cargo build -p konor-node --bins) or pass --konord PATH",
            path.display()
        );
    }
    std::fs::canonicalize(&path).context("resolving the konord path")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KONOR_CHAOS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("konor-chaos: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = execute(cli.command) => Some(outcome),
            () = interrupted() => None,
        }
    });
    // The run's future was dropped above: its processes, tmpfs and network are gone.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match outcome {
        None => {
            eprintln!("konor-chaos: interrupted; the run's processes, tmpfs and network were removed");
            ExitCode::from(130)
        }
        Some(Ok(true)) => ExitCode::SUCCESS,
        Some(Ok(false)) => ExitCode::FAILURE,
        Some(Err(error)) => {
            eprintln!("konor-chaos: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on ctrl-C or SIGTERM.
async fn interrupted() {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Runs a command; `Ok(false)`: a run failed or its history was judged to have violations.
async fn execute(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Run { seed, out, common } => {
            let out = out.unwrap_or_else(|| PathBuf::from("chaos-runs").join(format!("seed-{seed}")));
            let summary = run::run(&common.options(seed, out)?).await?;
            Ok(report(seed, &summary)?)
        }
        Command::Sweep { seeds, out, common } => {
            let seeds = parse_seeds(&seeds)?;
            let mut failed = Vec::new();
            for seed in &seeds {
                let options = common.options(*seed, out.join(format!("seed-{seed}")))?;
                let clean = match run::run(&options).await {
                    Ok(summary) => report(*seed, &summary)?,
                    Err(error) => {
                        eprintln!("konor-chaos: seed {seed} failed: {error:#}");
                        false
                    }
                };
                if !clean {
                    failed.push(*seed);
                }
            }
            println!("sweep: {} runs, {} failed {:?}", seeds.len(), failed.len(), failed);
            Ok(failed.is_empty())
        }
        Command::Plan { seed, duration, nodes } => {
            if !(3..=7).contains(&nodes) {
                bail!("--nodes must be 3 to 7, not {nodes}");
            }
            let disk_node = run::disk_node(seed, nodes);
            println!("seed {seed} on {nodes} nodes: n{} on a tmpfs", disk_node + 1);
            let mut at_ms = 0;
            for planned in faults::plan(seed, duration.as_millis() as u64, nodes, disk_node) {
                at_ms += planned.gap_ms;
                println!("  {:>6} ms  {:<6} ms  {:?}", at_ms, planned.hold_ms, planned.fault);
                at_ms += planned.hold_ms;
            }
            Ok(true)
        }
        Command::Check { path } => {
            let report = konor_chaos::check_file(&path)?;
            println!("{report}");
            Ok(report.passed())
        }
        Command::Cleanup { out } => {
            let mut removed: Vec<String> = Vec::new();
            if let Ok(entries) = std::fs::read_dir(&out) {
                for entry in entries.flatten() {
                    for pid in cleanup::kill_listed(&entry.path()) {
                        removed.push(format!("konord {pid} listed in {}", entry.path().display()));
                    }
                }
            }
            removed.extend(cleanup::cleanup_leftovers());
            for line in &removed {
                println!("removed {line}");
            }
            println!("cleanup: removed {} objects", removed.len());
            Ok(true)
        }
    }
}

/// Prints a run's figures, reads its history back and judges it; returns whether it is clean.
fn report(seed: u64, summary: &RunSummary) -> anyhow::Result<bool> {
    let counts = &summary.counts;
    println!(
        "seed {seed}: {} operations ({} committed, {} refused, {} unknown, {} reads answered), {} watch events, \
         {} faults, {} membership samples, {} final states; {} after {} ms of settling",
        counts.ops,
        counts.committed,
        counts.refused,
        counts.unknown,
        counts.values,
        counts.watch_events,
        summary.faults_ran,
        counts.membership_samples,
        counts.finals,
        if summary.converged { "heads agreed" } else { "heads still DIFFERED" },
        summary.settled_after_ms,
    );
    let history_path = summary.run_dir.join("history.jsonl");
    let text = std::fs::read_to_string(&history_path).with_context(|| format!("reading {}", history_path.display()))?;
    let records = konor_chaos::history::parse(&text)?;
    let clean = judge(&records);
    println!("history and konord logs: {}", summary.run_dir.display());
    if !clean {
        println!("replay: chaos/run --seed {seed} --duration <same> --nodes <same>");
    }
    Ok(clean)
}

/// Judges a history with the checker (`konor_chaos::check`) and prints its summary; true when
/// it found no violation.
fn judge(records: &[Record]) -> bool {
    let report = konor_chaos::check::check(records);
    println!("{report}");
    report.passed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_seed_ranges_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert!(parse_duration("fast").is_err());
        assert_eq!(parse_seeds("1..3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_seeds("7").unwrap(), vec![7]);
        assert!(parse_seeds("3..1").is_err());
    }
}
