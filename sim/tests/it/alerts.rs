//! The anomaly rules on real node code in the simulator (issue 15): an injected flapping node
//! and a partition of one region each raise their alert on the nodes that see them, and a
//! healthy mesh at 5% frame loss raises none. Each scenario runs in a `konor-sim alerts`
//! process of its own (one simulation per process, as `determinism.rs` explains).

use std::process::Command;

/// (node, kind, subject, cleared) of every alert the scenario's nodes raised.
fn alerts(scenario: &str, loss: &str) -> (Vec<(String, String, String, bool)>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_konor-sim"))
        .args(["alerts", "--scenario", scenario, "--nodes", "9", "--seed", "7", "--loss", loss])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "konor-sim alerts --scenario {scenario} failed:\n{text}");
    let alerts = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.strip_prefix("alert ")?.split(' ');
            let node = fields.next()?.to_owned();
            let kind = fields.next()?.to_owned();
            let subject = fields.next()?.to_owned();
            let _raised = fields.next()?;
            let cleared = fields.next()? != "-";
            Some((node, kind, subject, cleared))
        })
        .collect();
    (alerts, text)
}

#[test]
fn a_node_that_crashes_and_restarts_three_times_is_flapping_to_every_other_node() {
    let (alerts, text) = alerts("flap", "0.01");
    for observer in 0..8 {
        let node = format!("n{observer}");
        assert!(
            alerts.iter().any(|(by, kind, subject, _)| *by == node && kind == "flapping" && subject == "n8"),
            "{node} did not call n8 flapping:\n{text}"
        );
    }
    // One node falling is no region lost, and its crashes are not slow heartbeats.
    assert!(alerts.iter().all(|(_, kind, _, _)| kind == "flapping"), "{text}");
}

#[test]
fn a_region_cut_off_is_a_lost_label_on_both_sides_and_clears_when_healed() {
    let (alerts, text) = alerts("label-cut", "0.01");
    for observer in [0, 2, 3, 5, 6, 8] {
        let node = format!("n{observer}");
        assert!(
            alerts.iter().any(|(by, kind, subject, _)| *by == node && kind == "label_lost" && subject == "region=r1"),
            "{node} did not see region r1 lost:\n{text}"
        );
    }
    for observer in [1, 4, 7] {
        let node = format!("n{observer}");
        assert!(
            alerts.iter().any(|(by, kind, subject, _)| *by == node && kind == "label_lost" && subject == "region=r0"),
            "{node}, cut off in r1, did not see region r0 lost:\n{text}"
        );
    }
    assert!(alerts.iter().all(|(_, kind, _, cleared)| kind == "label_lost" && *cleared), "{text}");
}

#[test]
fn a_healthy_mesh_at_five_percent_loss_raises_no_alert() {
    let (alerts, text) = alerts("healthy", "0.05");
    assert!(alerts.is_empty(), "{text}");
    assert!(text.contains("alerts raised: 0"), "{text}");
}
