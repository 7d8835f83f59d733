//! Group key rotation under faults (issue 17): members rotate the keys of every group while
//! writes, joins and leaves, crashes and partitions run; every member must move to the newest
//! key (or the groups would not converge) and no invariant may break. Seed 1 found eventual
//! writes committing with a quorum of the members that had moved first; seed 3 a member that
//! rotated alone in a partition and then trusted nobody to hand it the winning key.

use std::process::{Child, Command, Stdio};

fn start(seed: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_konor-sim"))
        .args(["run", "--seed", &seed.to_string(), "--nodes", "7", "--duration", "20s", "--loss", "0.02"])
        .args(["--faults", "crash:0.1/s,partition:0.06/s"])
        .args(["--workload", "writes:4/s,reads:2/s,churn:0.1/s,rotate:0.3/s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn keys_rotate_under_faults_and_every_invariant_holds() {
    let runs: Vec<(u64, Child)> = [1, 3].into_iter().map(|seed| (seed, start(seed))).collect();
    for (seed, child) in runs {
        let output = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert_eq!(output.status.code(), Some(0), "seed {seed} violated an invariant:\n{text}");
        let rotated = text
            .lines()
            .find_map(|line| line.strip_prefix("key rotations: "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|count| count.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(rotated >= 3, "seed {seed}: only {rotated} rotations:\n{text}");
    }
}
