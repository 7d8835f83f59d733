//! The replication state machine driven synchronously: a tiny in-test network routes `Send`
//! outputs, gossip is a table of published values, time is a number we advance.

use std::collections::{BTreeMap, BTreeSet};

use konor_crdt::replica::{CommandError, CommandOutcome, EventsSince, GroupGossip, LoadedState, PeerState, actor_for};
use konor_crdt::{Command, CommitMeta, GroupKey, Input, MembershipView, Millis, Mode, Output, PersistOp, Replica};
use serde_json::json;

struct Net {
    replicas: BTreeMap<String, Replica>,
    gossip: BTreeMap<String, BTreeMap<String, GroupGossip>>,
    down: BTreeSet<String>,
    /// Drop `Changes` pushes to these nodes (a lost push).
    drop_pushes_to: BTreeSet<String>,
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
            view.peers.insert(other.clone(), PeerState { live: !self.down.contains(other), groups });
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
    assert_eq!(receipt.acked_by, vec!["n2".to_owned()]);
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"db.pool": 10}), "{node}");
        assert_eq!(net.replicas[node].revision("app"), Some(receipt.revision), "{node}: same history, same revision");
    }
    assert_eq!(net.notified["n1"].last(), Some(&receipt.revision));
}

#[test]
fn a_local_write_is_persisted_before_it_is_sent_or_answered() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    net.log.clear();
    set(&mut net, "n1", "a", json!(1)).unwrap();
    let n1: Vec<&str> = net.log.iter().filter(|(node, _)| node == "n1").map(|(_, what)| what.as_str()).collect();
    let persist = n1.iter().position(|w| *w == "persist append").unwrap();
    let send = n1.iter().position(|w| w.starts_with("send changes")).unwrap();
    let reply = n1.iter().position(|w| *w == "reply").unwrap();
    assert!(persist < send && send < reply, "{n1:?}");
    let n2: Vec<&str> = net.log.iter().filter(|(node, _)| node == "n2").map(|(_, what)| what.as_str()).collect();
    assert_eq!(n2.first(), Some(&"persist append"), "the receiver persists before anything else: {n2:?}");
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
    let fake = GroupGossip { digest: Default::default(), revision: 0, version: "v1".into(), proof: [0; 32] };
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
    let loaded =
        LoadedState { doc: reloaded, key: GroupKey::from_bytes(KEY), tail_changes: 0, sync_states: BTreeMap::new() };
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
