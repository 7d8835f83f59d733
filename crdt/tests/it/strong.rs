//! Strong groups by configuration (SPEC F11, F12), driven synchronously through the in-test
//! network of `replica.rs`: rounds over the configuration, commit decisions recorded at a
//! majority, recovery of rounds in doubt, configuration changes (join, leave, eviction, forced
//! removal), fencing by read leases, and honest answers when the disk fails.

use std::collections::BTreeSet;

use konor_crdt::configuration::{Fencing, GroupPolicy};
use konor_crdt::limits::{DECISION_TIMEOUT_MS, EVICT_AFTER_MIN_MS, LEASE_MS, LEASE_RENEW_MS, ROUND_TIMEOUT_MS};
use konor_crdt::replica::{CommandError, CommandOutcome};
use konor_crdt::{Command, GroupKey, Input, Millis, Mode, VersionKind};
use serde_json::json;

use crate::replica::{KEY, Net, meta, send_command, set, set_command};

/// A strong group created on the first node and joined by the others, with the shortest
/// eviction delay, and leases granted all around.
pub(crate) fn strong_mesh(nodes: &[&str]) -> Net {
    let mut net = Net::new(nodes);
    let policy = GroupPolicy { evict_after: Millis(EVICT_AFTER_MIN_MS), fencing: Fencing::Stale, ..Default::default() };
    let create = Command::CreateGroup {
        name: "app".into(),
        mode: Mode::Strong,
        key: GroupKey::from_bytes(KEY),
        meta: meta(),
        policy,
    };
    assert!(matches!(net.command(nodes[0], create), Ok(CommandOutcome::Created { .. })));
    for node in &nodes[1..] {
        let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY), repair: false };
        let joined = net.command(node, join);
        assert!(matches!(joined, Ok(CommandOutcome::Joined { .. })), "{node}: {joined:?}");
    }
    net.advance(LEASE_RENEW_MS);
    net
}

fn members(net: &Net, node: &str) -> Vec<String> {
    let configuration = net.replicas[node].group("app").unwrap().configuration().unwrap();
    configuration.members.iter().cloned().collect()
}

fn partition(net: &mut Net, side: &[&str], other: &[&str]) {
    for a in side {
        for b in other {
            net.cut.insert(((*a).into(), (*b).into()));
            net.cut.insert(((*b).into(), (*a).into()));
        }
    }
}

/// Marks every node of `other` dead in the views of `side` (and the reverse): what each side's
/// failure detector concludes during a partition. The in-test network knows one "down" set per
/// node seen from everyone, so a partition is modelled by cutting links and marking views.
fn see_dead(net: &mut Net, side: &[&str], other: &[&str]) {
    for node in side.iter().chain(other) {
        let opposite = if side.contains(node) { other } else { side };
        let mut view = net.view_for(node);
        for peer in opposite {
            if let Some(state) = view.peers.get_mut(*peer) {
                state.liveness = konor_crdt::replica::PeerLiveness::Dead;
            }
        }
        net.input(node, Input::Membership(view));
    }
}

/// Advances time without letting the in-test gossip refresh views (it would undo `see_dead`).
fn tick_partitioned(net: &mut Net, side: &[&str], other: &[&str], millis: u64) {
    let step = 250;
    let mut elapsed = 0;
    while elapsed < millis {
        net.now += step;
        elapsed += step;
        see_dead(net, side, other);
        let nodes: Vec<String> = net.replicas.keys().cloned().collect();
        for node in nodes {
            net.input(&node, Input::Tick);
        }
        net.run_outputs_only();
    }
}

#[test]
fn a_join_returns_only_once_the_new_member_is_in_the_configuration() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(members(&net, node), vec!["n1", "n2", "n3"], "{node}");
    }
    // Right after the joins, a write needs the newest member's staged yes (issue 11, failure 4).
    let CommandOutcome::Committed(receipt) = set(&mut net, "n1", "limit", json!(5)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1", "n2", "n3"]);
    let history: Vec<String> =
        net.replicas["n3"].group("app").unwrap().history().map(|v| v.kind.name().to_owned()).collect();
    assert_eq!(history, vec!["create", "membership", "membership", "set"]);
}

#[test]
fn a_write_commits_after_every_member_staged_it_and_a_majority_recorded_the_decision() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.log.clear();
    let CommandOutcome::Committed(receipt) = set(&mut net, "n2", "limit", json!(5)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1", "n2", "n3"]);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"limit": 5}), "{node}");
    }
    let at = |node: &str, what: &str| net.log.iter().position(|(n, w)| n == node && w.starts_with(what));
    // Members stage durably before voting.
    assert!(at("n1", "persist append") < at("n1", "send vote"));
    // The coordinator proposes the commit only after both votes, and answers only after a
    // member recorded it (2 of 3 is a majority) and after applying it.
    let votes: Vec<usize> =
        net.log.iter().enumerate().filter(|(_, (_, w))| w == "send vote to n2").map(|(i, _)| i).collect();
    let decide = at("n2", "send decide").unwrap();
    assert_eq!(votes.len(), 2);
    assert!(votes.iter().all(|v| *v < decide));
    let accepted = net.log.iter().position(|(n, w)| n != "n2" && w == "send accepted to n2").unwrap();
    let reply = at("n2", "reply").unwrap();
    assert!(decide < accepted && accepted < reply, "{:?}", net.log);
    // The coordinator writes its own record of the decision while the acceptors write theirs
    // (its Decides leave first: one forced write in series fewer, issue 14), and answers only
    // once it is durable; the answer need not wait for the append of the change itself.
    let recorded = at("n2", "persist append").unwrap();
    assert!(decide < recorded && recorded < reply, "{:?}", net.log);
}

#[test]
fn a_member_seen_dead_blocks_writes_until_it_is_evicted_and_then_the_rest_commit() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    set(&mut net, "n1", "v", json!(1)).unwrap();
    net.down.insert("n3".into());
    net.run();
    // A dead member cannot stage: the write aborts at once, saying why and for how long.
    let error = set(&mut net, "n1", "v", json!(2)).unwrap_err();
    assert!(matches!(error, CommandError::RoundAborted { .. }), "{error}");
    assert!(error.to_string().contains("[n3]") && error.to_string().contains("evict_after"), "{error}");
    // Its leases run out, then after evict_after the others remove it and write again.
    net.advance(EVICT_AFTER_MIN_MS + 1_000);
    for node in ["n1", "n2"] {
        assert_eq!(members(&net, node), vec!["n1", "n2"], "{node}");
    }
    let CommandOutcome::Committed(receipt) = set(&mut net, "n1", "v", json!(3)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1", "n2"]);
    // n3 comes back: it catches up, finds itself evicted, and rejoins on its own.
    net.down.clear();
    net.run();
    net.advance(2_000);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(members(&net, node), vec!["n1", "n2", "n3"], "{node}");
        assert_eq!(net.settings(node, "app"), json!({"v": 3}), "{node}");
    }
}

#[test]
fn the_minority_side_of_a_partition_never_commits_and_the_majority_continues_after_evicting() {
    let nodes = ["n1", "n2", "n3", "n4", "n5"];
    let mut net = strong_mesh(&nodes);
    set(&mut net, "n1", "v", json!("before")).unwrap();
    let (majority, minority) = (["n1", "n2", "n3"], ["n4", "n5"]);
    partition(&mut net, &majority, &minority);
    see_dead(&mut net, &majority, &minority);
    let on_minority = send_command(&mut net, "n4", set_command("v", json!("minority")));
    let on_majority = send_command(&mut net, "n1", set_command("v", json!("majority")));
    net.run_outputs_only();
    tick_partitioned(&mut net, &majority, &minority, 4_000);
    assert!(net.replies.remove(&on_minority).unwrap().is_err(), "the minority must not commit");
    assert!(net.replies.remove(&on_majority).unwrap().is_err(), "a write needs every member");
    // Both sides see the other dead past evict_after: only the majority can evict.
    tick_partitioned(&mut net, &majority, &minority, EVICT_AFTER_MIN_MS + 1_000);
    assert_eq!(members(&net, "n1"), vec!["n1", "n2", "n3"]);
    assert_eq!(members(&net, "n4"), nodes, "the minority cannot change the configuration");
    let majority_write = send_command(&mut net, "n2", set_command("v", json!("majority")));
    let minority_write = send_command(&mut net, "n5", set_command("v", json!("minority")));
    net.run_outputs_only();
    tick_partitioned(&mut net, &majority, &minority, 4_000);
    assert!(net.replies.remove(&majority_write).unwrap().is_ok());
    assert!(net.replies.remove(&minority_write).unwrap().is_err());
    for node in minority {
        assert!(net.replicas[node].is_fenced("app"), "{node} cannot prove it is fresh");
    }
    // Healed: one committed sequence, no merge; the minority rejoins.
    net.cut.clear();
    net.run();
    for _ in 0..10 {
        net.advance(500);
    }
    for node in nodes {
        assert_eq!(net.settings(node, "app"), json!({"v": "majority"}), "{node}");
        assert_eq!(members(&net, node), nodes, "{node}");
        let doc = net.replicas[node].group("app").unwrap();
        assert!(doc.history().all(|v| v.parents.len() <= 1), "{node}: a merge means two commits at one position");
    }
}

#[test]
fn the_old_rule_of_every_live_member_would_split_the_group() {
    // The same partition as above, with every node's view of the other side dead: under the
    // old rule each side would commit with the members it sees. Here neither does before the
    // majority evicts, and the committed history stays a single chain.
    let nodes = ["n1", "n2", "n3"];
    let mut net = strong_mesh(&nodes);
    partition(&mut net, &["n1", "n2"], &["n3"]);
    see_dead(&mut net, &["n1", "n2"], &["n3"]);
    let a = send_command(&mut net, "n3", set_command("side", json!("n3")));
    let b = send_command(&mut net, "n1", set_command("side", json!("n1")));
    net.run_outputs_only();
    let outcomes = [net.replies.remove(&a).unwrap(), net.replies.remove(&b).unwrap()];
    assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
}

#[test]
fn members_in_doubt_recover_an_uncommitted_round_without_its_coordinator() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    // The coordinator n1 dies after its prepares left, before any vote reached it.
    net.cut.insert(("n2".into(), "n1".into()));
    net.cut.insert(("n3".into(), "n1".into()));
    send_command(&mut net, "n1", set_command("k", json!("lost")));
    net.run();
    net.down.insert("n1".into());
    net.run();
    for node in ["n2", "n3"] {
        assert!(net.replicas[node].is_fenced("app"), "{node} holds a staged round: fenced");
    }
    // n2 and n3 are a majority: after asking around they recover the round, as aborted (nobody
    // recorded a commit), and stop being in doubt.
    net.advance(7_000);
    net.advance(4_000);
    for node in ["n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({}), "{node}");
        assert!(net.replicas[node].fencing_reason("app").is_none_or(|why| !why.contains("in doubt")), "{node} settled");
    }
}

#[test]
fn a_commit_recorded_by_a_majority_survives_its_coordinator_dying_before_telling_anyone() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    // Members record the commit (Accepted reaches n1), but the final outcome never reaches them.
    net.drop_kinds.insert("decision_answer");
    let id = send_command(&mut net, "n1", set_command("k", json!("kept")));
    net.run();
    assert!(net.replies.remove(&id).unwrap().is_ok(), "a majority recorded the commit: final");
    net.down.insert("n1".into());
    net.drop_kinds.clear();
    net.run();
    assert_eq!(net.settings("n2", "app"), json!({}), "n2 is in doubt, shows nothing yet");
    // n2 and n3 recover the round: a majority reports the recorded commit.
    net.advance(7_000);
    net.advance(4_000);
    for node in ["n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"k": "kept"}), "{node}");
    }
    // The coordinator restarts from its files and learns the same.
    net.restart("n1", 2);
    net.down.clear();
    net.run();
    net.advance(1_100);
    assert_eq!(net.settings("n1", "app"), json!({"k": "kept"}));
}

#[test]
fn a_coordinator_that_cannot_reach_a_majority_reports_an_unknown_outcome_never_an_abort() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    // Votes arrive, but no member's record of the commit comes back.
    net.drop_kinds.insert("accepted");
    let id = send_command(&mut net, "n1", set_command("k", json!("maybe")));
    net.run();
    net.advance(3_100);
    let error = net.replies.remove(&id).unwrap().unwrap_err();
    assert!(matches!(error, CommandError::OutcomeUnknown { .. }), "{error}");
    // The members recorded the commit, so whoever recovers finds it: committed everywhere.
    net.drop_kinds.clear();
    net.advance(7_000);
    net.advance(4_000);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"k": "maybe"}), "{node}");
    }
}

#[test]
fn an_eviction_while_a_round_is_in_doubt_settles_the_round_first() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    // n1's round: both members stage it; n2 records the commit (with n1 a majority: final, and
    // n1 answers committed); n3 never hears the proposal; then n1 dies before telling anyone.
    net.drop_on.insert(("n1".into(), "n3".into(), "decide"));
    net.drop_kinds.insert("decision_answer");
    let id = send_command(&mut net, "n1", set_command("k", json!("final")));
    net.run();
    assert!(net.replies.remove(&id).unwrap().is_ok(), "recorded by n1 and n2: final");
    net.down.insert("n1".into());
    net.drop_on.clear();
    net.drop_kinds.clear();
    net.run();
    for node in ["n2", "n3"] {
        assert!(net.replicas[node].fencing_reason("app").unwrap().contains("in doubt"), "{node}");
    }
    // Past evict_after the others evict n1, but only after settling the round: n2's record of
    // the commit decides it (any majority includes a member that recorded it).
    for _ in 0..(EVICT_AFTER_MIN_MS + 8_000) / 500 {
        net.advance(500);
    }
    for node in ["n2", "n3"] {
        assert_eq!(members(&net, node), vec!["n2", "n3"], "{node}");
        assert_eq!(net.settings(node, "app"), json!({"k": "final"}), "{node}: the reported commit holds");
    }
}

#[test]
fn no_round_reported_aborted_ever_becomes_visible() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.cut.insert(("n3".into(), "n1".into()));
    let id = send_command(&mut net, "n1", set_command("k", json!("aborted")));
    net.run();
    net.advance(3_100);
    let error = net.replies.remove(&id).unwrap().unwrap_err();
    assert!(matches!(error, CommandError::RoundAborted { .. }), "{error}");
    net.cut.clear();
    net.advance(7_000);
    net.advance(7_000);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({}), "{node}");
    }
}

#[test]
fn concurrent_rounds_never_commit_two_changes_at_one_position() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    let first = send_command(&mut net, "n1", set_command("who", json!("n1")));
    let second = send_command(&mut net, "n2", set_command("who", json!("n2")));
    net.run();
    for _ in 0..10 {
        net.advance(1_000);
    }
    let outcomes = [net.replies.remove(&first).unwrap(), net.replies.remove(&second).unwrap()];
    assert!(outcomes.iter().filter(|o| o.is_ok()).count() <= 1, "{outcomes:?}");
    let view = net.settings("n1", "app");
    for node in ["n2", "n3"] {
        assert_eq!(net.settings(node, "app"), view, "{node}");
    }
    set(&mut net, "n2", "who", json!("retry")).unwrap();
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"who": "retry"}));
        let doc = net.replicas[node].group("app").unwrap();
        assert!(doc.history().all(|v| v.parents.len() <= 1), "{node}");
    }
}

#[test]
fn local_writes_during_a_round_wait_their_turn_and_commit() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.drop_kinds.insert("decision_answer");
    let first = send_command(&mut net, "n1", set_command("a", json!(1)));
    net.run();
    assert!(net.replies.remove(&first).unwrap().is_ok());
    // n2 is in doubt about round 1 when its own write arrives: the write queues.
    let second = send_command(&mut net, "n2", set_command("b", json!(2)));
    net.run();
    assert!(!net.replies.contains_key(&second), "queued behind the staged round");
    net.drop_kinds.clear();
    for _ in 0..10 {
        net.advance(1_000);
    }
    let outcome = net.replies.remove(&second).unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"a": 1, "b": 2}), "{node}");
    }
}

#[test]
fn a_round_built_on_a_staged_change_settles_it_as_committed() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.drop_kinds.insert("decision_answer");
    let first = send_command(&mut net, "n1", set_command("a", json!(1)));
    net.run();
    assert!(net.replies.remove(&first).unwrap().is_ok());
    assert!(net.replicas["n3"].is_fenced("app"), "n3 is in doubt about round 1");
    net.drop_kinds.clear();
    // n1 writes again: its change depends on round 1's, which is then final.
    let second = send_command(&mut net, "n1", set_command("b", json!(2)));
    net.run();
    let outcome = net.replies.remove(&second).expect("answered without waiting for a timeout");
    assert!(outcome.is_ok(), "{outcome:?}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"a": 1, "b": 2}), "{node}");
    }
}

#[test]
fn a_member_leaves_through_a_configuration_change_and_writes_go_on_without_it() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    let left = net.command("n3", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }), "{left:?}");
    assert!(net.replicas["n3"].group("app").is_none());
    assert_eq!(members(&net, "n1"), vec!["n1", "n2"]);
    let CommandOutcome::Committed(receipt) = set(&mut net, "n2", "k", json!(1)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1", "n2"]);
}

#[test]
fn leaving_in_the_middle_of_an_own_round_aborts_it_for_everyone() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.drop_kinds.insert("vote");
    let write = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    net.drop_kinds.clear();
    let left = net.command("n1", Command::LeaveGroup { name: "app".into(), force: true }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }));
    let error = net.replies.remove(&write).unwrap().unwrap_err();
    assert!(matches!(error, CommandError::RoundAborted { .. }), "{error}");
    // The members were told: they are not left in doubt.
    for node in ["n2", "n3"] {
        assert!(!net.replicas[node].fencing_reason("app").is_some_and(|why| why.contains("in doubt")), "{node}");
    }
    // n1 announced it left: the others evict it without waiting for evict_after.
    net.advance(LEASE_MS + 1_500);
    assert_eq!(members(&net, "n2"), vec!["n2", "n3"]);
}

#[test]
fn a_two_member_group_needs_a_forced_removal_to_write_without_its_dead_member() {
    let mut net = strong_mesh(&["n1", "n2"]);
    net.down.insert("n2".into());
    net.run();
    net.advance(EVICT_AFTER_MIN_MS + 2_000);
    assert_eq!(members(&net, "n1"), vec!["n1", "n2"], "one of two is no majority: never evicted automatically");
    assert!(set(&mut net, "n1", "k", json!(1)).is_err());
    let remove = Command::RemoveMember { group: "app".into(), nodes: vec!["n2".into()], force: false, meta: meta() };
    let error = net.command("n1", remove).unwrap_err();
    assert!(error.to_string().contains("--force"), "without --force a majority is needed: {error}");
    let forced = Command::RemoveMember { group: "app".into(), nodes: vec!["n2".into()], force: true, meta: meta() };
    let outcome = net.command("n1", forced).unwrap();
    assert!(matches!(outcome, CommandOutcome::Reconfigured { .. }), "{outcome:?}");
    assert_eq!(members(&net, "n1"), vec!["n1"]);
    set(&mut net, "n1", "k", json!(1)).unwrap();
    let last = net.replicas["n1"].group("app").unwrap().history().rev().nth(1).unwrap().kind.clone();
    assert!(
        matches!(last, VersionKind::Membership { ref removed, .. } if removed == &vec!["n2".to_owned()]),
        "{last:?}"
    );
}

#[test]
fn reads_are_fresh_only_with_a_lease_from_a_majority() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.replicas[node].fencing_reason("app"), None, "{node}");
    }
    // Cut off from both others (its detector still says live): stale once its lease lapses.
    partition(&mut net, &["n3"], &["n1", "n2"]);
    net.advance(LEASE_MS + 100);
    let why = net.replicas["n3"].fencing_reason("app").unwrap();
    assert!(why.contains("read lease"), "{why}");
    assert_eq!(net.replicas["n1"].fencing_reason("app"), None, "n1 still has n2's grant");
    // A restarted node is stale until the others grant it a lease again.
    net.cut.clear();
    net.advance(LEASE_RENEW_MS);
    assert_eq!(net.replicas["n3"].fencing_reason("app"), None);
    net.restart("n2", 2);
    assert!(net.replicas["n2"].is_fenced("app"), "just restarted");
    net.run();
    net.advance(LEASE_RENEW_MS);
    assert_eq!(net.replicas["n2"].fencing_reason("app"), None);
}

#[test]
fn a_node_that_missed_commits_is_not_fresh_even_with_leases() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    set(&mut net, "n1", "k", json!(1)).unwrap();
    // n3's file lost its last records (a damaged tail): it restarts from an older state.
    let file = net.disk.get_mut("n3").unwrap().get_mut("app").unwrap();
    let cut = file.len() - 40;
    file.truncate(cut);
    net.restart("n3", 2);
    // Neither sync nor the decision it asks for reaches it yet.
    net.drop_kinds.insert("sync");
    net.drop_kinds.insert("decision_answer");
    net.run();
    net.advance(LEASE_RENEW_MS);
    assert_ne!(net.settings("n3", "app"), json!({"k": 1}));
    assert!(net.replicas["n3"].is_fenced("app"), "behind the grants it got: stale");
    net.drop_kinds.clear();
    net.advance(1_100);
    net.advance(LEASE_RENEW_MS);
    assert_eq!(net.settings("n3", "app"), json!({"k": 1}));
    assert!(!net.replicas["n3"].is_fenced("app"));
}

#[test]
fn unknown_peers_count_in_an_eventual_quorum() {
    let mut net = crate::replica::mesh_with_group(&["n1", "n2", "n3"]);
    // n1 just started: it cannot judge n2 and n3 yet. They still count: quorum 2 of 3.
    net.unknown.insert("n2".into());
    net.unknown.insert("n3".into());
    net.cut.insert(("n1".into(), "n2".into()));
    net.cut.insert(("n1".into(), "n3".into()));
    net.run();
    let id = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    assert!(!net.replies.contains_key(&id), "not committed alone");
    let info = net.replicas["n1"].quorum_info("app").unwrap();
    assert_eq!(info.quorum, 2, "{info:?}");
}

#[test]
fn an_eventual_write_right_after_a_join_counts_the_new_member() {
    let mut net = crate::replica::mesh_with_group(&["n1", "n2"]);
    net.replicas.insert(
        "n3".into(),
        konor_crdt::Replica::new("n3".into(), konor_crdt::replica::actor_for("n3", 1), [3; 32], Default::default()),
    );
    // n3's gossip never reaches anyone: only the join itself tells them.
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY), repair: false };
    net.drop_kinds.insert("changes");
    net.command("n3", join).unwrap();
    net.drop_kinds.clear();
    for writer in ["n1", "n2"] {
        let info = net.replicas[writer].quorum_info("app").unwrap();
        assert_eq!(info.live.len(), 3, "{writer}: {info:?}");
        assert_eq!(info.quorum, 2, "{writer}");
    }
}

#[test]
fn a_full_disk_fails_the_write_and_serves_nothing_of_it() {
    let mut net = crate::replica::mesh_with_group(&["n1", "n2", "n3"]);
    crate::replica::set(&mut net, "n1", "k", json!("old")).unwrap();
    net.failing_disk.insert("n1".into());
    let error = crate::replica::set(&mut net, "n1", "k", json!("new")).unwrap_err();
    assert!(matches!(error, CommandError::NotDurable(_)), "{error}");
    assert!(error.to_string().contains("disk full"), "{error}");
    assert_eq!(net.settings("n1", "app"), json!({"k": "old"}), "nothing undurable is served");
    // Acks from the peers that got the push never make it a commit here.
    net.advance(6_000);
    assert!(net.replicas["n1"].quorum_info("app").unwrap().last_commit.is_none_or(|(label, _)| label != "v4"));
}

/// A strong mesh of three where n1 wrote k = "old", then k = "new" while its own disk refused
/// every write: the write is answered `outcome_unknown` (n2 and n3 may hold a final commit). The
/// disk works again when this returns.
fn new_value_written_by_a_coordinator_with_a_full_disk() -> Net {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    set(&mut net, "n1", "k", json!("old")).unwrap();
    net.failing_disk.insert("n1".into());
    let outcome = set(&mut net, "n1", "k", json!("new"));
    assert!(matches!(outcome, Err(CommandError::OutcomeUnknown { .. })), "{outcome:?}");
    net.failing_disk.clear();
    net
}

/// The coordinator's Decides leave before its own record (issue 14). A coordinator that then
/// restarts without that record must not answer "aborted" for its round, as it did when the
/// record came first: a majority accepted the commit, so the commit was chosen, and recovery
/// must find it. (With the old answer the members dropped a chosen commit.)
#[test]
fn a_coordinator_restarted_without_its_record_never_aborts_a_commit_a_majority_accepted() {
    let mut net = new_value_written_by_a_coordinator_with_a_full_disk();
    // A crash: the next run of n1 holds no record of the round (its append never landed).
    net.restart("n1", 2);
    for _ in 0..3 {
        net.advance(7_000);
    }
    let states: BTreeSet<String> = ["n1", "n2", "n3"].iter().map(|n| net.settings(n, "app").to_string()).collect();
    assert_eq!(states, BTreeSet::from([json!({"k": "new"}).to_string()]));
}

#[test]
fn a_full_disk_on_a_strong_coordinator_answers_an_unknown_outcome_and_the_majority_decides() {
    // The coordinator's Decides leave before its own record (issue 14), so when that record
    // cannot be written the acceptors may still make the commit final: the coordinator answers
    // `outcome_unknown`, never an abort, and every node ends with the one outcome.
    let mut net = new_value_written_by_a_coordinator_with_a_full_disk();
    // Recovery by the members in doubt (after DECISION_TIMEOUT_MS), then n1 syncs.
    for _ in 0..3 {
        net.advance(7_000);
    }
    let states: BTreeSet<String> = ["n1", "n2", "n3"].iter().map(|n| net.settings(n, "app").to_string()).collect();
    // n2 and n3, a majority, recorded the commit before n1 found its disk full: it is final.
    assert_eq!(states, BTreeSet::from([json!({"k": "new"}).to_string()]));
}

#[test]
fn regression_a_group_joined_again_never_reuses_a_round_id() {
    // Found by konor-sim (seed 19 and 9 more of 100): a node that left a strong group and
    // joined it again started its round lamport at 0, so its next round reused the id of a
    // round it had coordinated before, with another change (S2).
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    set(&mut net, "n3", "a", json!(1)).unwrap();
    net.command("n3", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY), repair: false };
    net.command("n3", join).unwrap();
    set(&mut net, "n3", "a", json!(2)).unwrap();
    let ids: Vec<_> = net.prepared.iter().filter(|round| round.node == "n3").collect();
    let distinct: BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
}

#[test]
fn a_node_that_just_restarted_counts_the_members_it_knew_before_gossip_tells_it() {
    // Issue 11, failure 5: right after a restart a node's view is empty; it took itself for
    // the only member and committed alone. The members it knew are persisted and count as
    // unknown (not absent) for the start grace.
    let mut net = crate::replica::mesh_with_group(&["n1", "n2", "n3"]);
    crate::replica::set(&mut net, "n1", "k", json!(1)).unwrap();
    net.restart("n1", 2);
    let id = send_command(&mut net, "n1", set_command("k", json!(2)));
    net.run_outputs_only();
    assert!(!net.replies.contains_key(&id), "not committed alone: {:?}", net.replies.get(&id));
    let info = net.replicas["n1"].quorum_info("app").unwrap();
    assert_eq!((info.live.len(), info.quorum), (3, 2), "{info:?}");
    // Once gossip arrives the acks count.
    net.run();
    let CommandOutcome::Committed(receipt) = net.replies.remove(&id).unwrap().unwrap() else { panic!() };
    assert!(receipt.acked_by.len() >= 2, "{:?}", receipt.acked_by);
}

#[test]
fn regression_a_member_left_out_of_a_configuration_change_never_aborts_it_alone() {
    // Found by konor-sim (seed 49): a node that had not staged a configuration change (the one
    // it removed) answered a query about it with "aborted", as if the round needed its yes.
    // A configuration change is decided by a majority: such a node is an acceptor like any
    // other, never an authority. Here n1 evicts n3 with n2's vote; n2 records the commit, so it
    // is final and n1 applies it; the news never reaches n2, and n1 dies. n3 returns, never
    // having staged the change: had it answered "aborted", n2 would drop a final commit and the
    // two could then evict n1 at the very same position.
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.down.insert("n3".into());
    net.run();
    net.drop_kinds.insert("decision_answer");
    net.advance(EVICT_AFTER_MIN_MS + 500);
    assert_eq!(members(&net, "n1"), vec!["n1", "n2"], "n1 evicted n3: final with n2's record");
    net.down.insert("n1".into());
    net.down.remove("n3");
    net.drop_kinds.clear();
    net.run();
    for _ in 0..60 {
        net.advance(500);
    }
    // n1 returns: everyone holds one chain.
    net.down.clear();
    net.run();
    for _ in 0..20 {
        net.advance(500);
    }
    let reference = net.replicas["n1"].group("app").unwrap().heads_digest();
    for node in ["n1", "n2", "n3"] {
        let doc = net.replicas[node].group("app").unwrap();
        assert!(doc.history().all(|v| v.parents.len() <= 1), "{node}: two commits at one position");
        assert_eq!(doc.heads_digest(), reference, "{node} diverged");
    }
}

#[test]
fn regression_a_failed_leave_does_not_stop_the_node_from_taking_part() {
    // Found by konor-sim (seed 51): a leave whose round aborted left the node marked as
    // leaving, so it never rejoined the configuration after being evicted later.
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.drop_on.insert(("n2".into(), "n3".into(), "vote"));
    net.drop_on.insert(("n1".into(), "n3".into(), "vote"));
    let id = send_command(&mut net, "n3", Command::LeaveGroup { name: "app".into(), force: false });
    net.run();
    net.advance(3_100);
    let error = net.replies.remove(&id).unwrap().unwrap_err();
    assert!(matches!(error, CommandError::LeaveFailed { .. }), "{error}");
    net.drop_on.clear();
    // n3 is evicted while away, then comes back: it must rejoin on its own.
    net.down.insert("n3".into());
    net.run();
    for _ in 0..((EVICT_AFTER_MIN_MS + 2_000) / 500) {
        net.advance(500);
    }
    assert_eq!(members(&net, "n1"), vec!["n1", "n2"]);
    net.down.clear();
    net.run();
    for _ in 0..10 {
        net.advance(500);
    }
    assert_eq!(members(&net, "n3"), vec!["n1", "n2", "n3"]);
}

#[test]
fn regression_a_write_after_a_failed_append_never_reuses_a_change_sequence_number() {
    // Found while documenting the full-disk playbook: the writer pushed a change before its
    // append failed, reloaded the group from its file under the same actor, and its next write
    // reused that change's sequence number with other contents; the peers that held the pushed
    // change refused the new one ("duplicate seq") and the copies never converged.
    let mut net = crate::replica::mesh_with_group(&["n1", "n2", "n3"]);
    crate::replica::set(&mut net, "n1", "k", json!("old")).unwrap();
    net.failing_disk.insert("n1".into());
    assert!(crate::replica::set(&mut net, "n1", "k", json!("lost")).is_err());
    net.failing_disk.clear();
    crate::replica::set(&mut net, "n1", "k", json!("new")).unwrap();
    for _ in 0..6 {
        net.advance(1_000);
    }
    let states: BTreeSet<String> =
        ["n1", "n2", "n3"].iter().map(|n| net.replicas[*n].group("app").unwrap().heads_digest().to_string()).collect();
    assert_eq!(states.len(), 1, "the copies converge: {states:?}");
}

#[test]
fn regression_a_member_in_doubt_about_a_leave_learns_it_from_the_node_that_left() {
    // Found by konor-sim (seed 391 of the churn sweep): n3 left a two-member group; the
    // decision it sent n2 was lost, and n3, gone from the group, answered nothing more. A
    // configuration of two needs both to decide, so n2 stayed in doubt for good and refused
    // every later round (a rejoin among them). The node that left keeps the outcomes of the
    // group's last rounds and answers the members it left behind.
    let mut net = strong_mesh(&["n1", "n2"]);
    net.drop_on.insert(("n1".into(), "n2".into(), "decision_answer"));
    let left = net.command("n1", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }), "{left:?}");
    assert!(net.replicas["n1"].group("app").is_none());
    assert_eq!(members(&net, "n2"), vec!["n1", "n2"], "the decision never reached n2");
    net.drop_on.clear();
    for _ in 0..20 {
        net.advance(500);
    }
    assert_eq!(members(&net, "n2"), vec!["n2"], "n2 learned that the leave committed");
    set(&mut net, "n2", "k", json!(1)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// A member leaving while a round it takes part in is open (issue 12): the round resolves
// (committed, aborted or outcome_unknown, docs/protocol.md "Rounds"), never hangs, and leaves no
// member in doubt for good.

/// Advances time in half-second steps until `id` is answered; at most `limit_ms`. Returns how
/// long it took.
fn answered_within(net: &mut Net, id: u64, limit_ms: u64) -> Option<u64> {
    let start = net.now;
    while !net.replies.contains_key(&id) {
        if net.now - start >= limit_ms {
            return None;
        }
        net.advance(500);
    }
    Some(net.now - start)
}

/// No member of `nodes` holds a round without its final decision.
fn nobody_in_doubt(net: &Net, nodes: &[&str]) {
    for node in nodes {
        let reason = net.replicas[*node].fencing_reason("app");
        assert!(!reason.as_deref().is_some_and(|why| why.contains("in doubt")), "{node}: {reason:?}");
    }
}

#[test]
fn a_member_going_down_while_its_vote_is_awaited_aborts_the_write_at_once() {
    // The daemon reports a peer that announced a graceful shutdown (leaving) as dead: the
    // coordinator must not wait out the round's timeout for a vote that will not come.
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.drop_on.insert(("n1".into(), "n3".into(), "prepare"));
    let write = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    assert!(!net.replies.contains_key(&write), "the round waits for n3's vote");
    net.down.insert("n3".into());
    net.run();
    let error = net.replies.remove(&write).expect("answered without waiting for a timeout").unwrap_err();
    assert!(matches!(error, CommandError::RoundAborted { .. }), "{error}");
    nobody_in_doubt(&net, &["n1", "n2"]);
    assert_eq!(net.settings("n2", "app"), json!({}), "an aborted write is nowhere");
}

#[test]
fn a_member_that_force_leaves_before_voting_makes_the_write_abort_by_its_timeout() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.drop_on.insert(("n1".into(), "n3".into(), "prepare"));
    let write = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    let left = net.command("n3", Command::LeaveGroup { name: "app".into(), force: true }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }), "{left:?}");
    net.drop_on.clear();
    let waited = answered_within(&mut net, write, ROUND_TIMEOUT_MS + 1_000);
    assert!(waited.is_some(), "the write is answered within the round timeout");
    let error = net.replies.remove(&write).unwrap().unwrap_err();
    assert!(matches!(error, CommandError::RoundAborted { .. }), "{error}");
    nobody_in_doubt(&net, &["n1", "n2"]);
    // n3 announced it left: the others evict it and write without it.
    net.advance(LEASE_MS + 1_500);
    assert_eq!(members(&net, "n1"), vec!["n1", "n2"]);
    let CommandOutcome::Committed(receipt) = set(&mut net, "n2", "k", json!(2)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1", "n2"]);
}

#[test]
fn a_member_that_force_leaves_after_staging_a_write_leaves_nobody_in_doubt() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    // n3 stages the write and votes yes, but its vote never arrives.
    net.drop_on.insert(("n3".into(), "n1".into(), "vote"));
    let write = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    assert!(!net.replies.contains_key(&write));
    let left = net.command("n3", Command::LeaveGroup { name: "app".into(), force: true }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }), "{left:?}");
    assert!(net.replicas["n3"].group("app").is_none());
    net.drop_on.clear();
    let waited = answered_within(&mut net, write, ROUND_TIMEOUT_MS + 1_000);
    assert!(waited.is_some(), "the write is answered within the round timeout");
    let outcome = net.replies.remove(&write).unwrap();
    // Every member's yes is needed and one never arrived: the write did not commit.
    assert!(matches!(outcome, Err(CommandError::RoundAborted { .. })), "{outcome:?}");
    net.advance(DECISION_TIMEOUT_MS);
    nobody_in_doubt(&net, &["n1", "n2"]);
    assert_eq!(net.settings("n2", "app"), json!({}));
    net.advance(LEASE_MS + 1_500);
    let CommandOutcome::Committed(receipt) = set(&mut net, "n1", "k", json!(2)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1", "n2"]);
}

#[test]
fn a_member_in_doubt_cannot_leave_until_the_round_settles_and_then_leaves() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    // n3 staged the write; the coordinator's decision and answers never reach it: in doubt.
    net.drop_on.insert(("n1".into(), "n3".into(), "decide"));
    net.drop_on.insert(("n1".into(), "n3".into(), "decision_answer"));
    let outcome = set(&mut net, "n1", "k", json!(1));
    assert!(matches!(outcome, Ok(CommandOutcome::Committed(_))), "{outcome:?}");
    let in_doubt = |net: &Net| net.replicas["n3"].fencing_reason("app").is_some_and(|why| why.contains("in doubt"));
    assert!(in_doubt(&net), "n3 holds the round staged");
    // Its leave is refused at once, saying why (a leave is a round, and it holds one).
    let error = net.command("n3", Command::LeaveGroup { name: "app".into(), force: false }).unwrap_err();
    assert!(matches!(error, CommandError::LeaveFailed { .. }) && error.to_string().contains("in doubt"), "{error}");
    // It learns the outcome from the other member that applied it, the coordinator still silent.
    let start = net.now;
    while in_doubt(&net) && net.now - start < 3 * DECISION_TIMEOUT_MS {
        net.advance(500);
    }
    assert!(!in_doubt(&net), "n3 stayed in doubt");
    assert_eq!(net.settings("n3", "app"), json!({"k": 1}), "the committed write is applied on n3");
    // Now the leave goes through, and the others write on without n3.
    let left = net.command("n3", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }), "{left:?}");
    assert_eq!(members(&net, "n1"), vec!["n1", "n2"]);
    nobody_in_doubt(&net, &["n1", "n2"]);
    let CommandOutcome::Committed(receipt) = set(&mut net, "n2", "k", json!(2)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1", "n2"]);
}

#[test]
fn regression_a_failed_append_never_makes_the_replica_append_again_at_once() {
    // Found by the chaos suite (seed 302): a full disk tore a strong coordinator's append after
    // its `Staged` record, before `Accepted`. Every later append of the group failed (the
    // store refuses appends to a file whose tail is unknown until it is rewritten). On each
    // failure the replica reloaded the group, found its own round staged and never proposed,
    // and appended its abort at once; that append failed in turn, and the daemon handled the
    // failures one inside the other until its thread overflowed its stack. Handling a failed
    // persist must not, by itself, ask for another append.
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    set(&mut net, "n1", "k", json!(1)).unwrap();
    net.drop_kinds.insert("accepted");
    let id = send_command(&mut net, "n1", set_command("k", json!(2)));
    net.run();
    assert!(!net.replies.contains_key(&id), "the round is still deciding");
    let mut loaded = net.load("n1", "app").expect("n1's file");
    let staged = loaded.staged.as_mut().expect("n1 staged its own round with its proposal");
    assert_eq!(staged.round.node, "n1");
    assert!(staged.accepted.is_some());
    // The append that carried the proposal was torn after the Staged record.
    staged.accepted = None;
    net.input(
        "n1",
        Input::PersistFailed { group: "app".into(), error: "disk full".into(), reloaded: Some(Box::new(loaded)) },
    );
    let mut appends = Vec::new();
    while let Some(output) = net.replicas.get_mut("n1").unwrap().poll_output() {
        if let konor_crdt::Output::Persist(konor_crdt::PersistOp::Append { records, .. }) = output {
            appends.push(records.len());
        }
    }
    assert!(appends.is_empty(), "a failed persist made the replica append again at once: {appends:?}");
    // The round is aborted all the same (it never proposed), and the group moves on.
    net.drop_kinds.clear();
    for _ in 0..4 {
        net.advance(DECISION_TIMEOUT_MS);
    }
    set(&mut net, "n1", "k", json!(3)).unwrap();
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"k": 3}), "{node}");
    }
}

#[test]
fn a_node_that_knows_a_commit_it_does_not_hold_is_not_fresh_on_grants_that_staged_it() {
    // Found by the chaos suite (seed 336): a member staged a write, learned that it committed,
    // and then lost both its copy of the change and the round in doubt (its disk refused the
    // change's append and a later append of the group left a file without the round staged).
    // It kept the decision in memory. A grant from a member still in doubt about that round
    // (heads without the change, the round staged) said nothing it lacked, as far as the
    // grant's heads go: it must not count, since the round it shows committed.
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    net.drop_kinds.insert("decision_answer");
    net.drop_kinds.insert("sync");
    let id = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    assert!(net.replies.remove(&id).unwrap().is_ok(), "k = 1 committed");
    let round = net.prepared.last().unwrap().clone();
    // n2's file: the round staged, without its decision or its change.
    let mut on_disk = net.load("n2", "app").expect("n2's file");
    assert_eq!(on_disk.staged.as_ref().map(|s| &s.round), Some(&round));
    // n2 learns the commit; saving it fails, and the file it reloads has lost the round.
    let answer = konor_crdt::PeerMessage::DecisionAnswer {
        group: "app".into(),
        round,
        outcome: konor_crdt::peer_message::RoundOutcome::Committed,
    };
    net.input("n2", Input::Peer { from: "n1".into(), bytes: answer.encode() });
    while net.replicas.get_mut("n2").unwrap().poll_output().is_some() {}
    on_disk.staged = None;
    let failed =
        Input::PersistFailed { group: "app".into(), error: "disk full".into(), reloaded: Some(Box::new(on_disk)) };
    net.input("n2", failed);
    net.run();
    assert_eq!(net.settings("n2", "app"), json!({}), "n2 lost k = 1");
    assert!(net.replicas["n3"].is_fenced("app"), "n3 is still in doubt about k = 1");
    // New grants: n1's holds k = 1 (n2 lacks it); n3's shows the round it is in doubt about.
    for _ in 0..3 {
        net.advance(LEASE_RENEW_MS);
        assert!(
            net.replicas["n2"].is_fenced("app"),
            "n2 serves {} as fresh, though k = 1 committed",
            net.settings("n2", "app")
        );
    }
}
