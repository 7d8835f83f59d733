//! The CI smoke of the chaos suite: one short run of the real binary on 3 nodes, as a process,
//! and a look at the history it left. It needs root, `ip` and `nft` (it makes network
//! namespaces) and the `konord` binary in the same target dir; without them it fails, naming
//! what is missing: it is evidence, and a silent skip would hide that it did not run.

use std::path::PathBuf;
use std::process::Command;

use konor_chaos::history::{self, Record};

/// Fails the test, with what it needs, unless it runs as root with `ip` and `nft` installed.
fn require_root_and_tools() {
    let missing = konor_chaos::requirement::missing_requirements();
    assert!(
        missing.is_empty(),
        "the chaos smoke runs konord in network namespaces and needs: {}; run it as root on Linux with \
         iproute2 and nftables installed (.ci/run installs them)",
        missing.join(", ")
    );
}

/// konord, built into the same target dir as konor-chaos.
fn konord() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_konor-chaos")).with_file_name("konord");
    assert!(
        path.is_file(),
        "no konord at {}: build it first into the same target dir (cargo build -p konor-node --bins)",
        path.display()
    );
    path
}

#[test]
fn a_short_run_records_operations_faults_and_final_states_and_leaves_no_namespace() {
    require_root_and_tools();
    let konord = konord();
    let out = tempfile::Builder::new().prefix("konor-chaos-smoke").tempdir().unwrap();
    let run_dir = out.path().join("seed-1");
    let output = Command::new(env!("CARGO_BIN_EXE_konor-chaos"))
        .args(["run", "--seed", "1", "--duration", "20s", "--nodes", "3", "--settle", "10s"])
        .arg("--out")
        .arg(&run_dir)
        .arg("--konord")
        .arg(&konord)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "konor-chaos run failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains(&run_dir.display().to_string()), "the run dir is printed:\n{stdout}");
    // The checker judged the history (a violation would have failed the run above).
    assert!(stdout.contains("violations: 0") && stdout.contains("PASSED"), "the checker's summary:\n{stdout}");

    let text = std::fs::read_to_string(run_dir.join("history.jsonl")).unwrap();
    let records = history::parse(&text).unwrap();
    assert!(matches!(records.first(), Some(Record::Run(info)) if info.seed == 1 && info.nodes.len() == 3));
    let count = |wanted: fn(&Record) -> bool| records.iter().filter(|r| wanted(r)).count();
    assert!(count(|r| matches!(r, Record::Op(_))) > 50, "too few operations:\n{stdout}");
    // Clients 1-6 are the Rust SDK's (two per node), 7-9 the Python SDK's (one per node).
    let python_ops = count(|r| matches!(r, Record::Op(op) if op.client > 6));
    let python_commits = count(
        |r| matches!(r, Record::Op(op) if op.client > 6 && matches!(op.outcome, history::Outcome::Committed { .. })),
    );
    assert!(python_ops > 20 && python_commits > 0, "the Python clients' operations are in the history:\n{stdout}");
    let starts = count(|r| matches!(r, Record::FaultStart(_)));
    assert!(starts >= 1, "no fault ran:\n{stdout}");
    assert_eq!(count(|r| matches!(r, Record::FaultEnd(_))), starts, "every fault ended");
    assert!(count(|r| matches!(r, Record::Watch(_))) >= 6, "every watcher recorded its start");
    assert!(count(|r| matches!(r, Record::Membership(_))) > 0);
    assert_eq!(count(|r| matches!(r, Record::Final(_))), 3 * 2, "a final state per node and group:\n{stdout}");
    for node in 1..=3 {
        assert!(run_dir.join(format!("n{node}/konord.log")).is_file(), "konord logs are kept");
    }

    // Nothing of the run is left: its namespaces carry the runner's pid.
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&namespaces.stdout);
    let tag = bridge_tag(&stdout);
    assert!(
        !listed.lines().any(|line| line.starts_with(&format!("konor-chaos-{tag}-"))),
        "the run left namespaces behind:\n{listed}"
    );
    assert!(!run_dir.join("konord.pids").exists(), "the pid file goes with the processes");
}

/// The bridge tag the run printed (`bridge kcb-<tag>`), which its namespace names share.
fn bridge_tag(stdout: &str) -> String {
    stdout.split("bridge kcb-").nth(1).and_then(|rest| rest.split(',').next()).unwrap_or("none").to_owned()
}
