//! A canary release on 50 simulated nodes running the real node code (issue 16, SPEC F14):
//! `konor-sim releases` releases a version to a 10% canary and checks that exactly the nodes of
//! the release's deterministic slice serve it and that no other node's watcher is served it;
//! then a promotion and an abort made at once on the two sides of a partition converge, after
//! healing, to the abort on every node; then a canary promoted to its last wave reaches every
//! node; then an application that fails to apply a canary on one node makes the members' guards
//! roll the release back on every node within `GUARD_BOUND` (10 s). One simulation per process, as `determinism.rs` explains.

use std::process::Command;

#[test]
fn a_ten_percent_canary_reaches_exactly_its_slice_and_promote_and_abort_at_once_converge() {
    let output = Command::new(env!("CARGO_BIN_EXE_konor-sim"))
        .args(["releases", "--nodes", "50", "--seed", "1"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "konor-sim releases failed:\n{text}");
    for check in ["canary-slice", "promote-and-abort-converge", "promoted-to-all", "guard-rolls-back"] {
        assert!(text.contains(&format!("check {check} ok")), "{check} did not pass:\n{text}");
    }
    let slice: usize = text
        .lines()
        .find_map(|line| line.strip_prefix("slice ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no slice line:\n{text}"));
    // 10% of 50 is 5; the slice is a hash of node ids, so a binomial draw: 1 to 15 holds
    // beyond four standard deviations.
    assert!((1..=15).contains(&slice), "slice of {slice} nodes:\n{text}");
}
