//! `konor-sim`: run one seeded simulation (`run`) or many (`sweep`) and print what they found.
//!
//! Exit codes: 0 all invariants held; 1 an invariant was violated; 2 bad arguments or the
//! simulator itself failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use konor_sim::RunConfig;
use konor_sim::config::{Wire, parse_duration, parse_faults, parse_latency, parse_seeds, parse_workload};

#[derive(Parser, Debug)]
#[command(
    name = "konor-sim",
    about = "Deterministic simulator: real Konorkestra nodes on a simulated clock and network",
    // A later option wins, so options can be appended to a printed replay command.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One run; prints its summary (and the replay command on a violation).
    Run(RunArgs),
    /// Many seeds; prints one line per seed and the failures with their replay commands.
    Sweep(SweepArgs),
    /// One scripted fault (or none) on a labelled mesh; prints the anomaly alerts every node
    /// raised (`konor_node::health::alerts`).
    Alerts(AlertArgs),
    /// A scripted canary release on a labelled mesh (issue 16, SPEC F14): the slice, a
    /// promotion and an abort at once across a partition, a promotion to every node.
    Releases(ReleaseArgs),
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    /// Number of nodes, spread over regions r0, r1, r2.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// The seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a frame is lost.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
}

#[derive(Args, Debug)]
struct AlertArgs {
    /// `flap` (a node crashes and restarts three times), `label-cut` (region r1 is cut off
    /// from the others for 25 s) or `healthy` (no fault).
    #[arg(long)]
    scenario: konor_sim::alerts::Scenario,
    /// Number of nodes, spread over regions r0, r1, r2.
    #[arg(long, default_value_t = 9)]
    nodes: usize,
    /// The seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a frame is lost.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The seed: the same seed and options give the same run, byte for byte.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    options: Options,
    /// Draw the spread of changes and the detection times to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the ordered trace, one event per line, to this file (to diff two runs).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Print the nodes' log lines at this filter (e.g. `warn`, `konor_node=info`).
    #[arg(long)]
    log: Option<String>,
    /// Print progress every 5 simulated seconds.
    #[arg(long)]
    progress: bool,
    /// Print one line (seed, trace hash, wall time, verdict) instead of the summary.
    #[arg(long)]
    brief: bool,
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// Seeds, `A..B` (B excluded).
    #[arg(long, default_value = "1..11")]
    seeds: String,
    /// Runs at once (each in its own process).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    #[command(flatten)]
    options: Options,
}

#[derive(Args, Debug)]
struct Options {
    /// Number of nodes.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Length of the phase with workload and faults.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Probability that a frame is lost.
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// Probability that a frame is delivered twice (datagram wire).
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// One-way latency range, `low..high`.
    #[arg(long, default_value = "1ms..20ms")]
    latency: String,
    /// `datagram` (every frame may be lost, duplicated, reordered) or `stream` (replica frames
    /// in order per link, losses become retransmission delays, as over QUIC).
    #[arg(long, default_value = "datagram")]
    wire: Wire,
    /// Fault rates: `crash:0.01/s,partition:0.005/s,oneway:0.002/s,pause:0.01/s,disk:0.01/s` or
    /// `none`.
    #[arg(long, default_value = "crash:0.01/s,partition:0.005/s")]
    faults: String,
    /// Workload rates: `writes:5/s,reads:2/s` or `none`.
    #[arg(long, default_value = "writes:5/s")]
    workload: String,
    /// chitchat gossip period.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    gossip_interval: Duration,
    /// Membership view refresh period (default: 100 ms, growing with the mesh up to 1 s).
    #[arg(long, value_parser = parse_duration)]
    membership_poll: Option<Duration>,
    /// Members of the strong group (the first nodes).
    #[arg(long, default_value_t = 5)]
    strong_members: usize,
    /// Nodes asked for their membership view (default: all, up to 100).
    #[arg(long)]
    observers: Option<usize>,
    /// Check acks, votes and acceptances against what the disk model holds durably (default:
    /// true; `false` also skips following group files' records).
    #[arg(long)]
    check_disk: Option<bool>,
    /// Longest time after healing until every member holds the same state.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    converge_bound: Duration,
    /// Longest time until every observer marks a crashed node dead.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    detect_bound: Duration,
}

impl Options {
    fn config(&self, seed: u64) -> anyhow::Result<RunConfig> {
        let mut config = RunConfig::new(self.nodes, seed);
        config.duration = self.duration;
        config.loss = self.loss;
        config.duplicate = self.duplicate;
        config.latency = parse_latency(&self.latency)?;
        config.wire = self.wire;
        config.faults = parse_faults(&self.faults)?;
        config.workload = parse_workload(&self.workload)?;
        config.gossip_interval = self.gossip_interval;
        config.membership_poll = self.membership_poll;
        config.strong_members = self.strong_members;
        config.observers = self.observers;
        config.check_disk = self.check_disk.unwrap_or(true);
        config.converge_bound = self.converge_bound;
        config.detect_bound = self.detect_bound;
        config.validate()?;
        Ok(config)
    }
}

/// Panics inside node tasks are caught by tokio; only the first few are printed in full.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn quiet_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let seen = PANICS.fetch_add(1, Ordering::Relaxed);
        if seen < 3 {
            default(info);
        } else if seen == 3 {
            eprintln!("(further panics not printed)");
        }
    }));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    quiet_panics();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Sweep(args) => sweep(args),
        Command::Alerts(args) => alerts(args),
        Command::Releases(args) => releases(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("konor-sim: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn report_panics() {
    let panics = PANICS.load(Ordering::Relaxed);
    if panics > 0 {
        println!("panics inside node tasks: {panics} (caught by the runtime; see the node exits above)");
    }
}

fn alerts(args: AlertArgs) -> anyhow::Result<bool> {
    let report = konor_sim::alerts::run_scenario(args.scenario, args.nodes, args.seed, args.loss)?;
    print!("{}", report.text());
    if let Some(why) = report.incomplete {
        anyhow::bail!("the scenario could not run as scripted: {why}");
    }
    Ok(true)
}

fn releases(args: ReleaseArgs) -> anyhow::Result<bool> {
    let report = konor_sim::releases::run_releases(args.nodes, args.seed, args.loss)?;
    print!("{}", report.text());
    Ok(report.passed())
}

fn run(args: RunArgs) -> anyhow::Result<bool> {
    let mut config = args.options.config(args.seed)?;
    config.plot = args.plot.clone();
    config.trace = args.trace.clone();
    config.progress = args.progress;
    let report = konor_sim::run(config, args.log)?;
    if args.brief {
        println!("{}", report.one_line());
        return Ok(report.passed());
    }
    print!("{}", report.summary());
    report_panics();
    if let Some(path) = &args.plot {
        konor_sim::plot::draw(&report, path)?;
        println!("plot: {}", path.display());
    }
    Ok(report.passed())
}

/// Runs every seed in a process of its own: tokio seeds each runtime from a process-wide
/// counter, so only the first simulation of a process replays exactly (docs/testing.md).
fn sweep(args: SweepArgs) -> anyhow::Result<bool> {
    let seeds: Vec<u64> = parse_seeds(&args.seeds)?.collect();
    let configs: Vec<RunConfig> = seeds.iter().map(|&seed| args.options.config(seed)).collect::<anyhow::Result<_>>()?;
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find this program to run seeds: {e}"))?;
    let jobs = args.jobs.max(1);
    let mut failures: Vec<(RunConfig, String)> = Vec::new();
    let started = std::time::Instant::now();
    for batch in configs.chunks(jobs) {
        let mut children = Vec::new();
        for config in batch {
            let command_line = config.replay_command();
            let arguments: Vec<&str> = command_line.split_whitespace().skip(1).collect();
            let child = std::process::Command::new(&exe)
                .args(&arguments)
                .arg("--brief")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", exe.display()))?;
            children.push((config.clone(), child));
        }
        for (config, child) in children {
            let output = child.wait_with_output()?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let line = stdout.lines().find(|l| l.starts_with("seed")).unwrap_or("").to_owned();
            match output.status.code() {
                Some(0) => println!("{line}"),
                Some(1) => {
                    println!("{line}");
                    failures.push((config, line));
                }
                _ => {
                    let stderr = String::from_utf8_lossy(&output.stderr);
                    let why = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").to_owned();
                    println!("seed {:>6}  ERROR {why}", config.seed);
                    failures.push((config, format!("the run failed: {why}")));
                }
            }
        }
    }
    println!(
        "sweep: {} seed(s), {} failed, {:.1}s wall",
        configs.len(),
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    for (config, line) in &failures {
        println!("{line}");
        println!("  replay: {}", config.replay_command());
    }
    Ok(failures.is_empty())
}
