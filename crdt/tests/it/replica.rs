//! The replication state machine driven synchronously: a tiny in-test network routes `Send`
//! outputs, gossip is a table of published values, time is a number we advance.

use std::collections::{BTreeMap, BTreeSet};

use konor_crdt::replica::{
    CommandError, CommandOutcome, EventsSince, GroupGossip, LoadedState, PeerLiveness, PeerState, actor_for,
};
use konor_crdt::{Command, CommitMeta, GroupKey, Input, MembershipView, Millis, Mode, Output, PersistOp, Replica};
use serde_json::json;

pub(crate) struct Net {
    replicas: BTreeMap<String, Replica>,
    gossip: BTreeMap<String, BTreeMap<String, GroupGossip>>,
    down: BTreeSet<String>,
    /// Drop `Changes` pushes to these nodes (a lost push).
    drop_pushes_to: BTreeSet<String>,
    /// Directed links that drop everything (a partition the failure detector has not seen).
    cut: BTreeSet<(String, String)>,
    /// Drop messages of these kinds (e.g. "decide").
    drop_kinds: BTreeSet<&'static str>,
    now: u64,
    replies: BTreeMap<u64, Result<CommandOutcome, CommandError>>,
    log: Vec<(String, String)>,
    notified: BTreeMap<String, Vec<u64>>,
    next_id: u64,
}

impl Net {
    fn new(nodes: &[&str]) -> Net {
        let mut replicas = BTreeMap::new();
        for (n, node) in nodes.iter().enumerate() {
            let replica = Replica::new((*node).to_owned(), actor_for(node, 1), [n as u8; 32], BTreeMap::new());
            replicas.insert((*node).to_owned(), replica);
        }
        Net {
            replicas,
            gossip: BTreeMap::new(),
            down: BTreeSet::new(),
            drop_pushes_to: BTreeSet::new(),
            cut: BTreeSet::new(),
            drop_kinds: BTreeSet::new(),
            now: 1_000,
            replies: BTreeMap::new(),
            log: Vec::new(),
            notified: BTreeMap::new(),
            next_id: 0,
        }
    }

    fn command(&mut self, node: &str, command: Command) -> Result<CommandOutcome, CommandError> {
        self.next_id += 1;
        let id = self.next_id;
        self.input(node, Input::Command { id, command });
        self.run();
        self.replies.remove(&id).expect("the command was answered")
    }

    fn input(&mut self, node: &str, input: Input) {
        if let Some(replica) = self.replicas.get_mut(node) {
            replica.handle(Millis(self.now), input);
        }
    }

    fn view_for(&self, node: &str) -> MembershipView {
        let mut view = MembershipView::default();
        for other in self.replicas.keys().filter(|other| *other != node) {
            let groups = self.gossip.get(other).cloned().unwrap_or_default();
            view.peers.insert(
                other.clone(),
                PeerState {
                    liveness: if self.down.contains(other) { PeerLiveness::Dead } else { PeerLiveness::Live },
                    groups,
                },
            );
        }
        view
    }

    /// Delivers outputs until the network is quiet, then refreshes membership views.
    fn run(&mut self) {
        for _ in 0..50 {
            let mut moved = false;
            let nodes: Vec<String> = self.replicas.keys().cloned().collect();
            for node in &nodes {
                while let Some(output) = self.replicas.get_mut(node).and_then(Replica::poll_output) {
                    moved = true;
                    self.log.push((node.clone(), describe(&output)));
                    match output {
                        Output::Send { to, message } => {
                            let is_push = matches!(message, konor_crdt::PeerMessage::Changes { .. });
                            if self.down.contains(&to)
                                || self.down.contains(node)
                                || (is_push && self.drop_pushes_to.contains(&to))
                                || self.cut.contains(&(node.clone(), to.clone()))
                                || self.drop_kinds.contains(message.kind())
                            {
                                continue;
                            }
                            let input = Input::Peer { from: node.clone(), bytes: message.encode() };
                            self.input(&to, input);
                        }
                        Output::Reply { id, result } => {
                            self.replies.insert(id, result);
                        }
                        Output::Publish { group, gossip } => {
                            let table = self.gossip.entry(node.clone()).or_default();
                            match gossip {
                                Some(gossip) => table.insert(group, gossip),
                                None => table.remove(&group),
                            };
                        }
                        Output::Notify(notification) => {
                            self.notified.entry(node.clone()).or_default().push(notification.revision);
                        }
                        Output::Persist(_) | Output::Dropped { .. } => {}
                        // The harness persists nothing, so the deferred apply resumes at once.
                        Output::Resume => self.input(node, Input::Resume),
                    }
                }
            }
            if !moved {
                // Gossip spreads: hand every replica the current view; stop when that is quiet too.
                let nodes: Vec<String> = self.replicas.keys().cloned().collect();
                let mut changed = false;
                for node in &nodes {
                    let view = self.view_for(node);
                    let replica = &self.replicas[node];
                    if replica.membership() != &view {
                        changed = true;
                        self.input(node, Input::Membership(view));
                    }
                }
                if !changed {
                    return;
                }
            }
        }
    }

    fn advance(&mut self, millis: u64) {
        self.now += millis;
        let nodes: Vec<String> = self.replicas.keys().cloned().collect();
        for node in nodes {
            self.input(&node, Input::Tick);
        }
        self.run();
    }

    fn settings(&self, node: &str, group: &str) -> serde_json::Value {
        self.replicas[node].group(group).map(|g| g.settings().to_json()).unwrap_or_default()
    }
}

fn describe(output: &Output) -> String {
    match output {
        Output::Send { to, message } => format!("send {} to {to}", message.kind()),
        Output::Persist(op) => match op {
            PersistOp::CreateGroup { .. } => "persist create".into(),
            PersistOp::Append { .. } => "persist append".into(),
            PersistOp::Compact { .. } => "persist compact".into(),
            PersistOp::RemoveGroup { .. } => "persist remove".into(),
            PersistOp::SyncState { .. } => "persist sync-state".into(),
        },
        Output::Reply { .. } => "reply".into(),
        Output::Notify(_) => "notify".into(),
        Output::Publish { .. } => "publish".into(),
        Output::Dropped { reason, .. } => format!("dropped: {reason}"),
        Output::Resume => "resume".into(),
    }
}

fn meta() -> CommitMeta {
    CommitMeta::new("ops", "test", Millis(1_700_000_000_000))
}

const KEY: [u8; 32] = [42; 32];

fn mesh_with_group(nodes: &[&str]) -> Net {
    let mut net = Net::new(nodes);
    let create =
        Command::CreateGroup { name: "app".into(), mode: Mode::Eventual, key: GroupKey::from_bytes(KEY), meta: meta() };
    assert!(matches!(net.command(nodes[0], create), Ok(CommandOutcome::Created { .. })));
    for node in &nodes[1..] {
        let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY) };
        let outcome = net.command(node, join).unwrap();
        assert!(matches!(outcome, CommandOutcome::Joined { .. }), "{outcome:?}");
    }
    net
}

fn set(net: &mut Net, node: &str, key: &str, value: serde_json::Value) -> Result<CommandOutcome, CommandError> {
    net.command(node, Command::Set { group: "app".into(), entries: vec![(key.into(), value)], meta: meta() })
}

#[test]
fn a_write_on_any_node_reaches_every_member_and_its_watchers() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    let committed = set(&mut net, "n2", "db.pool", json!(10)).unwrap();
    let CommandOutcome::Committed(receipt) = committed else { panic!("{committed:?}") };
    assert!(receipt.acked_by.len() >= 2, "a live quorum of 3 is 2: {:?}", receipt.acked_by);
    assert!(receipt.acked_by.contains(&"n2".to_owned()));
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"db.pool": 10}), "{node}");
        assert_eq!(net.replicas[node].revision("app"), Some(receipt.revision), "{node}: same history, same revision");
    }
    assert_eq!(net.notified["n1"].last(), Some(&receipt.revision));
}

#[test]
fn a_local_write_is_pushed_while_persisted_and_answered_only_after_persist() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    net.log.clear();
    set(&mut net, "n1", "a", json!(1)).unwrap();
    let n1: Vec<&str> = net.log.iter().filter(|(node, _)| node == "n1").map(|(_, what)| what.as_str()).collect();
    let persist = n1.iter().position(|w| *w == "persist append").unwrap();
    let notify = n1.iter().position(|w| *w == "notify").unwrap();
    let reply = n1.iter().position(|w| *w == "reply").unwrap();
    assert!(persist < notify && persist < reply, "{n1:?}");
    let n2: Vec<&str> = net.log.iter().filter(|(node, _)| node == "n2").map(|(_, what)| what.as_str()).collect();
    assert_eq!(n2.first(), Some(&"persist append"), "the receiver persists before anything else: {n2:?}");
    let ack = n2.iter().position(|w| w.starts_with("send ack")).unwrap();
    assert!(ack > 0, "the receiver acks only after its persist: {n2:?}");
}

#[test]
fn a_wrong_key_is_refused_and_nothing_is_received() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    net.replicas.insert("n3".into(), Replica::new("n3".into(), actor_for("n3", 1), [3; 32], BTreeMap::new()));
    net.run();
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes([1; 32]) };
    let error = net.command("n3", join).unwrap_err();
    assert!(error.to_string().contains("wrong group key"), "{error}");
    assert!(net.replicas["n3"].group("app").is_none());
    // A forged membership claim (a proof made with the wrong key) does not attract pushes.
    let fake =
        GroupGossip { digest: Default::default(), revision: 0, version: "v1".into(), proof: [0; 32], heads: vec![] };
    net.gossip.entry("n3".into()).or_default().insert("app".into(), fake);
    net.run();
    net.log.clear();
    set(&mut net, "n1", "secret", json!("x")).unwrap();
    assert!(!net.log.iter().any(|(_, what)| what == "send changes to n3"), "{:?}", net.log);
}

#[test]
fn a_join_with_no_member_in_sight_times_out_with_a_clear_error() {
    let mut net = Net::new(&["n1"]);
    let join = Command::JoinGroup { name: "ghost".into(), key: GroupKey::from_bytes(KEY) };
    net.next_id += 1;
    let id = net.next_id;
    net.input("n1", Input::Command { id, command: join });
    net.run();
    assert!(!net.replies.contains_key(&id), "the join waits for a member to appear");
    for _ in 0..20 {
        net.advance(1_000);
    }
    let error = net.replies.remove(&id).unwrap().unwrap_err();
    assert!(matches!(error, CommandError::JoinUnavailable(_)), "{error}");
}

#[test]
fn anti_entropy_repairs_a_lost_push() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.drop_pushes_to.insert("n3".into());
    set(&mut net, "n1", "k", json!("v")).unwrap();
    assert_eq!(net.settings("n3", "app"), json!({}), "the push was lost");
    net.drop_pushes_to.clear();
    net.advance(500);
    assert_eq!(net.settings("n3", "app"), json!({}), "no sync before the anti-entropy delay");
    net.advance(600);
    assert_eq!(net.settings("n3", "app"), json!({"k": "v"}));
    let digests: BTreeSet<String> =
        ["n1", "n2", "n3"].iter().map(|n| net.replicas[*n].group("app").unwrap().heads_digest().to_string()).collect();
    assert_eq!(digests.len(), 1);
}

#[test]
fn a_node_that_was_down_catches_up_when_it_returns() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.down.insert("n3".into());
    net.run();
    for n in 0..5 {
        set(&mut net, "n1", &format!("k{n}"), json!(n)).unwrap();
    }
    set(&mut net, "n2", "from_n2", json!(true)).unwrap();
    assert_eq!(net.settings("n3", "app"), json!({}));
    net.down.clear();
    net.run();
    net.advance(1_100);
    assert_eq!(net.settings("n3", "app"), net.settings("n1", "app"));
    assert_eq!(net.settings("n2", "app"), net.settings("n1", "app"));
}

#[test]
fn changes_from_a_non_member_are_dropped() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    let stranger = "n9".to_owned();
    let bytes = konor_crdt::PeerMessage::Changes { group: "app".into(), changes: vec![b"junk".to_vec()] }.encode();
    net.input("n1", Input::Peer { from: stranger, bytes });
    let output = net.replicas.get_mut("n1").unwrap().poll_output();
    assert!(matches!(output, Some(Output::Dropped { .. })), "{output:?}");
    net.input("n1", Input::Peer { from: "n2".into(), bytes: b"\x01garbage".to_vec() });
    let output = net.replicas.get_mut("n1").unwrap().poll_output();
    assert!(matches!(output, Some(Output::Dropped { .. })), "{output:?}");
}

#[test]
fn watchers_resume_from_a_revision_or_get_an_explicit_resync() {
    let mut net = mesh_with_group(&["n1"]);
    let start = net.replicas["n1"].revision("app").unwrap();
    for n in 0..3 {
        set(&mut net, "n1", "k", json!(n)).unwrap();
    }
    let replica = &net.replicas["n1"];
    let Some(EventsSince::Events(events)) = replica.events_since("app", start + 1) else { panic!() };
    assert_eq!(events.iter().map(|e| e.revision).collect::<Vec<_>>(), vec![start + 2, start + 3]);
    assert_eq!(events[1].set.get("k"), Some(&json!(2)));
    assert_eq!(replica.events_since("app", start + 3), Some(EventsSince::Events(vec![])));
    assert_eq!(replica.events_since("app", start + 9), Some(EventsSince::Resync), "ahead of this node: resync");
    assert_eq!(replica.events_since("app", start - 1), Some(EventsSince::Resync), "before the first kept event");
    assert_eq!(replica.events_since("nope", 0), None);
}

#[test]
fn a_restarted_replica_keeps_its_revision_and_groups() {
    let mut net = mesh_with_group(&["n1"]);
    set(&mut net, "n1", "k", json!(1)).unwrap();
    let doc = net.replicas["n1"].group("app").unwrap();
    let revision = net.replicas["n1"].revision("app").unwrap();
    let reloaded = konor_crdt::GroupDoc::load(&doc.save(), actor_for("n1", 2)).unwrap();
    let loaded = LoadedState {
        doc: reloaded,
        key: GroupKey::from_bytes(KEY),
        tail_changes: 0,
        sync_states: BTreeMap::new(),
        staged: None,
        decisions: Vec::new(),
    };
    let mut restarted =
        Replica::new("n1".into(), actor_for("n1", 2), [9; 32], BTreeMap::from([("app".to_owned(), loaded)]));
    assert_eq!(restarted.revision("app"), Some(revision));
    assert!(matches!(restarted.poll_output(), Some(Output::Publish { .. })));
    assert_ne!(actor_for("n1", 1), actor_for("n1", 2));
}

#[test]
fn leaving_retracts_the_gossip_and_stops_receiving() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    let left = net.command("n2", Command::LeaveGroup { name: "app".into() }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }));
    assert!(!net.gossip["n2"].contains_key("app"));
    net.log.clear();
    set(&mut net, "n1", "after", json!(1)).unwrap();
    assert!(!net.log.iter().any(|(_, what)| what.starts_with("send changes")), "{:?}", net.log);
    let error = set(&mut net, "n2", "x", json!(1)).unwrap_err();
    assert!(matches!(error, CommandError::UnknownGroup(_)));
}

// ---- consistency: live quorum (eventual) and barrier rounds (strong) ----

fn mesh_with_strong_group(nodes: &[&str]) -> Net {
    let mut net = Net::new(nodes);
    let create =
        Command::CreateGroup { name: "app".into(), mode: Mode::Strong, key: GroupKey::from_bytes(KEY), meta: meta() };
    assert!(matches!(net.command(nodes[0], create), Ok(CommandOutcome::Created { .. })));
    for node in &nodes[1..] {
        let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY) };
        assert!(matches!(net.command(node, join), Ok(CommandOutcome::Joined { .. })));
    }
    net
}

/// Issues a command and returns its id without waiting for the reply.
fn send_command(net: &mut Net, node: &str, command: Command) -> u64 {
    net.next_id += 1;
    let id = net.next_id;
    net.input(node, Input::Command { id, command });
    id
}

fn set_command(key: &str, value: serde_json::Value) -> Command {
    Command::Set { group: "app".into(), entries: vec![(key.into(), value)], meta: meta() }
}

#[test]
fn an_eventual_write_commits_with_two_of_three_when_one_is_down() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.down.insert("n3".into());
    net.run();
    let info = net.replicas["n1"].quorum_info("app").unwrap();
    assert_eq!((info.members.len(), info.live.len(), info.quorum), (3, 2, 2));
    let CommandOutcome::Committed(receipt) = set(&mut net, "n1", "k", json!(1)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1".to_owned(), "n2".to_owned()]);
    let info = net.replicas["n1"].quorum_info("app").unwrap();
    assert_eq!(info.last_commit, Some((receipt.label.clone(), receipt.acked_by.clone())));
}

#[test]
fn an_eventual_write_without_a_quorum_times_out_naming_the_silent_members() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    // n1 is cut off from both peers, but its failure detector still holds them live.
    for peer in ["n2", "n3"] {
        net.cut.insert(("n1".into(), peer.into()));
        net.cut.insert((peer.into(), "n1".into()));
    }
    let id = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    assert!(!net.replies.contains_key(&id), "no quorum yet: no answer");
    for _ in 0..6 {
        net.advance(1_000);
    }
    let error = net.replies.remove(&id).unwrap().unwrap_err();
    let CommandError::NotCommitted { acked_by, missing, needed, .. } = &error else { panic!("{error}") };
    assert_eq!(acked_by, &vec!["n1".to_owned()]);
    assert_eq!(missing, &vec!["n2".to_owned(), "n3".to_owned()]);
    assert_eq!(*needed, 2);
    assert!(error.to_string().contains("stays applied"), "{error}");
    assert_eq!(net.settings("n1", "app"), json!({"k": 1}), "still applied locally");
}

#[test]
fn a_strong_write_becomes_visible_everywhere_only_after_every_member_staged_it() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    net.log.clear();
    let CommandOutcome::Committed(receipt) = set(&mut net, "n2", "limit", json!(5)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by, vec!["n1".to_owned(), "n2".to_owned(), "n3".to_owned()]);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"limit": 5}), "{node}");
    }
    // Members staged durably before voting, and the coordinator decided only after both votes.
    let position = |node: &str, what: &str| {
        net.log.iter().position(|(n, w)| n == node && w.starts_with(what)).unwrap_or(usize::MAX)
    };
    assert!(position("n1", "persist append") < position("n1", "send vote"));
    let decide = net.log.iter().position(|(n, w)| n == "n2" && w.starts_with("send decide")).unwrap();
    let votes: Vec<usize> =
        net.log.iter().enumerate().filter(|(_, (_, w))| w == "send vote to n2").map(|(i, _)| i).collect();
    assert_eq!(votes.len(), 2);
    assert!(votes.iter().all(|v| *v < decide));
}

#[test]
fn a_silent_member_aborts_the_round_and_nothing_is_visible_anywhere() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    set(&mut net, "n1", "v", json!(1)).unwrap();
    // n3 stops answering (paused), but the failure detector still holds it live.
    net.cut.insert(("n1".into(), "n3".into()));
    net.cut.insert(("n3".into(), "n1".into()));
    let id = send_command(&mut net, "n1", set_command("v", json!(2)));
    net.run();
    assert!(!net.replies.contains_key(&id));
    for _ in 0..4 {
        net.advance(1_000);
    }
    let error = net.replies.remove(&id).unwrap().unwrap_err();
    assert!(matches!(error, CommandError::RoundAborted { .. }), "{error}");
    assert!(error.to_string().contains("no vote from [n3]"), "{error}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"v": 1}), "{node} must not show the aborted write");
    }
    // Healed: the retry commits everywhere.
    net.cut.clear();
    net.advance(7_000);
    set(&mut net, "n1", "v", json!(2)).unwrap();
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"v": 2}), "{node}");
    }
}

#[test]
fn a_change_of_live_members_during_a_round_aborts_it() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    net.drop_kinds.insert("vote");
    let id = send_command(&mut net, "n1", set_command("k", json!(1)));
    net.run();
    net.down.insert("n3".into());
    net.run();
    let error = net.replies.remove(&id).unwrap().unwrap_err();
    assert!(error.to_string().contains("live members changed during the round (lost: [n3]"), "{error}");
    for node in ["n1", "n2"] {
        assert_eq!(net.settings(node, "app"), json!({}), "{node}");
    }
}

#[test]
fn concurrent_rounds_never_split_the_group_and_a_retry_commits() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    let first = send_command(&mut net, "n1", set_command("who", json!("n1")));
    let second = send_command(&mut net, "n2", set_command("who", json!("n2")));
    net.run();
    for _ in 0..8 {
        net.advance(1_000);
    }
    let outcomes = [net.replies.remove(&first).unwrap(), net.replies.remove(&second).unwrap()];
    let committed = outcomes.iter().filter(|o| o.is_ok()).count();
    assert!(committed <= 1, "two concurrent rounds cannot both commit: {outcomes:?}");
    for outcome in &outcomes {
        if let Err(error) = outcome {
            assert!(matches!(error, CommandError::RoundAborted { .. }), "{error}");
        }
    }
    let first_view = net.settings("n1", "app");
    for node in ["n2", "n3"] {
        assert_eq!(net.settings(node, "app"), first_view, "{node} differs: split");
    }
    set(&mut net, "n2", "who", json!("retry")).unwrap();
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"who": "retry"}));
    }
}

/// Replaces `node` by a fresh replica (a restart) loaded from its current document.
fn restart(net: &mut Net, node: &str, incarnation: u64) {
    let doc = net.replicas[node].group("app").unwrap();
    let reloaded = konor_crdt::GroupDoc::load(&doc.save(), actor_for(node, incarnation)).unwrap();
    let loaded = LoadedState {
        doc: reloaded,
        key: GroupKey::from_bytes(KEY),
        tail_changes: 0,
        sync_states: BTreeMap::new(),
        staged: None,
        decisions: Vec::new(),
    };
    let replica =
        Replica::new(node.into(), actor_for(node, incarnation), [7; 32], BTreeMap::from([("app".into(), loaded)]));
    net.replicas.insert(node.into(), replica);
}

#[test]
fn members_in_doubt_after_a_coordinator_crash_before_the_decision_abort_once_it_returns() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    // The coordinator n1 crashes after its prepares left and before any vote reached it.
    net.cut.insert(("n2".into(), "n1".into()));
    net.cut.insert(("n3".into(), "n1".into()));
    send_command(&mut net, "n1", set_command("k", json!("lost")));
    net.run();
    net.down.insert("n1".into());
    net.run();
    for node in ["n2", "n3"] {
        assert!(net.replicas[node].is_fenced("app"), "{node} holds a staged round: fenced");
        assert_eq!(net.settings(node, "app"), json!({}));
    }
    // With the coordinator gone nobody knows the outcome: members stay in doubt, never guess.
    net.advance(7_000);
    assert!(net.replicas["n2"].is_fenced("app"));
    restart(&mut net, "n1", 2);
    net.down.clear();
    net.cut.clear();
    net.run();
    net.advance(4_000);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({}), "{node}");
        assert!(!net.replicas[node].is_fenced("app"), "{node} settled");
    }
}

#[test]
fn members_learn_a_commit_decided_by_a_coordinator_that_crashed_before_broadcasting() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    net.drop_kinds.insert("decide");
    let id = send_command(&mut net, "n1", set_command("k", json!("kept")));
    net.run();
    assert!(net.replies.remove(&id).unwrap().is_ok(), "the coordinator decided commit");
    assert_eq!(net.settings("n2", "app"), json!({}), "n2 never got the decision");
    net.down.insert("n1".into());
    net.run();
    restart(&mut net, "n1", 2);
    net.down.clear();
    net.drop_kinds.clear();
    net.run();
    net.advance(7_000);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"k": "kept"}), "{node}");
    }
}

#[test]
fn a_node_that_missed_a_strong_commit_is_fenced_until_it_catches_up() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    net.down.insert("n3".into());
    net.run();
    set(&mut net, "n1", "k", json!(1)).unwrap();
    // n3 returns: until it has synced, gossip shows it is behind.
    net.down.clear();
    let view = net.view_for("n3");
    net.input("n3", Input::Membership(view));
    assert!(net.replicas["n3"].is_fenced("app"));
    net.run();
    net.advance(1_100);
    assert_eq!(net.settings("n3", "app"), json!({"k": 1}));
    assert!(!net.replicas["n3"].is_fenced("app"));
}

#[test]
fn local_writes_during_a_round_wait_their_turn_and_commit() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    // n2 holds a staged round of n1's when its own write arrives: the write queues.
    net.drop_kinds.insert("decide");
    let first = send_command(&mut net, "n1", set_command("a", json!(1)));
    net.run();
    assert!(net.replies.remove(&first).unwrap().is_ok());
    let second = send_command(&mut net, "n2", set_command("b", json!(2)));
    net.run();
    assert!(!net.replies.contains_key(&second), "queued behind the staged round");
    net.drop_kinds.clear();
    for _ in 0..8 {
        net.advance(1_000);
    }
    let outcome = net.replies.remove(&second).unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"a": 1, "b": 2}), "{node}");
    }
}

#[test]
fn a_round_built_on_a_staged_change_settles_it_as_committed_instead_of_refusing() {
    let mut net = mesh_with_strong_group(&["n1", "n2", "n3"]);
    // n2 and n3 never hear n1's decision: they hold round 1 staged.
    net.drop_kinds.insert("decide");
    let first = send_command(&mut net, "n1", set_command("a", json!(1)));
    net.run();
    assert!(net.replies.remove(&first).unwrap().is_ok());
    assert!(net.replicas["n2"].is_fenced("app"), "n2 is in doubt about round 1");
    net.drop_kinds.clear();
    // n1 writes again at once: its change depends on round 1's, which proves round 1 committed.
    let second = send_command(&mut net, "n1", set_command("b", json!(2)));
    net.run();
    let outcome = net.replies.remove(&second).expect("answered without waiting for a timeout");
    assert!(outcome.is_ok(), "{outcome:?}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"a": 1, "b": 2}), "{node}");
        assert!(!net.replicas[node].is_fenced("app"), "{node} settled");
    }
}

#[test]
fn a_member_persists_a_pushed_change_first_applies_it_during_the_fsync_and_acks_after() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.log.clear();
    set(&mut net, "n1", "k", json!(1)).unwrap();
    let n2: Vec<&str> = net.log.iter().filter(|(node, _)| node == "n2").map(|(_, what)| what.as_str()).collect();
    let at =
        |what: &str| n2.iter().position(|line| line.starts_with(what)).unwrap_or_else(|| panic!("no {what}: {n2:?}"));
    assert!(at("persist append") < at("resume"), "{n2:?}");
    assert!(at("resume") < at("notify"), "applied after the shell started the fsync: {n2:?}");
    assert!(at("notify") < at("send ack"), "{n2:?}");
    assert_eq!(n2.iter().filter(|line| **line == "persist append").count(), 1, "written once: {n2:?}");
    assert_eq!(net.settings("n2", "app"), json!({"k": 1}));
}
