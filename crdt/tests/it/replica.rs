//! The replication state machine driven synchronously: a tiny in-test network routes `Send`
//! outputs, gossip is a table of published values, time is a number we advance.

use std::collections::{BTreeMap, BTreeSet};

use konor_crdt::limits::ANTI_ENTROPY_DELAY_MS;
use konor_crdt::replica::{
    CommandError, CommandOutcome, EventsSince, GroupGossip, LoadedState, PeerLiveness, PeerState, actor_for,
};
use konor_crdt::{Command, CommitMeta, GroupKey, Input, MembershipView, Millis, Mode, Output, PersistOp, Replica};
use serde_json::json;

/// The keys one notification set and removed.
pub(crate) type Told = (BTreeSet<String>, BTreeSet<String>);

pub(crate) struct Net {
    pub(crate) replicas: BTreeMap<String, Replica>,
    pub(crate) gossip: BTreeMap<String, BTreeMap<String, GroupGossip>>,
    /// Groups each node retracted in gossip (left).
    left: BTreeMap<String, BTreeSet<String>>,
    pub(crate) down: BTreeSet<String>,
    /// Nodes every other node's detector cannot judge yet (unknown, not dead).
    pub(crate) unknown: BTreeSet<String>,
    /// Drop `Changes` pushes to these nodes (a lost push).
    pub(crate) drop_pushes_to: BTreeSet<String>,
    /// Directed links that drop everything (a partition the failure detector has not seen).
    pub(crate) cut: BTreeSet<(String, String)>,
    /// Drop messages of these kinds (e.g. "decide").
    pub(crate) drop_kinds: BTreeSet<&'static str>,
    /// Drop messages of a kind on one link: (from, to, kind).
    pub(crate) drop_on: BTreeSet<(String, String, &'static str)>,
    pub(crate) now: u64,
    pub(crate) replies: BTreeMap<u64, Result<CommandOutcome, CommandError>>,
    pub(crate) log: Vec<(String, String)>,
    pub(crate) notified: BTreeMap<String, Vec<u64>>,
    /// What each node's watchers were told, per notification.
    pub(crate) told: BTreeMap<String, Vec<Told>>,
    pub(crate) next_id: u64,
    /// Each node's group files, as its persist outputs wrote them (node -> group -> file).
    pub(crate) disk: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Each node's members files: (node, group) -> members.
    pub(crate) members_disk: BTreeMap<(String, String), BTreeSet<String>>,
    /// Every round id prepared, in order: (coordinator, round).
    pub(crate) prepared: Vec<konor_crdt::peer_message::RoundId>,
    /// Nodes whose appends fail (a full disk): the rest of that drain is skipped, as the shell
    /// does, and the replica hears `PersistFailed` with its group reloaded from "disk".
    pub(crate) failing_disk: BTreeSet<String>,
    /// Each node's key files: (node, group) -> keyring.
    pub(crate) keys_disk: BTreeMap<(String, String), konor_crdt::Keyring>,
}

impl Net {
    pub(crate) fn new(nodes: &[&str]) -> Net {
        let mut replicas = BTreeMap::new();
        for (n, node) in nodes.iter().enumerate() {
            let replica = Replica::new((*node).to_owned(), actor_for(node, 1), [n as u8; 32], BTreeMap::new());
            replicas.insert((*node).to_owned(), replica);
        }
        Net {
            replicas,
            gossip: BTreeMap::new(),
            left: BTreeMap::new(),
            down: BTreeSet::new(),
            unknown: BTreeSet::new(),
            drop_pushes_to: BTreeSet::new(),
            cut: BTreeSet::new(),
            drop_kinds: BTreeSet::new(),
            drop_on: BTreeSet::new(),
            now: 1_000,
            replies: BTreeMap::new(),
            log: Vec::new(),
            notified: BTreeMap::new(),
            told: BTreeMap::new(),
            next_id: 0,
            disk: BTreeMap::new(),
            prepared: Vec::new(),
            members_disk: BTreeMap::new(),
            failing_disk: BTreeSet::new(),
            keys_disk: BTreeMap::new(),
        }
    }

    pub(crate) fn command(&mut self, node: &str, command: Command) -> Result<CommandOutcome, CommandError> {
        self.next_id += 1;
        let id = self.next_id;
        self.input(node, Input::Command { id, command });
        self.run();
        self.replies.remove(&id).expect("the command was answered")
    }

    pub(crate) fn input(&mut self, node: &str, input: Input) {
        if let Some(replica) = self.replicas.get_mut(node) {
            replica.handle(Millis(self.now), input);
        }
    }

    pub(crate) fn view_for(&self, node: &str) -> MembershipView {
        let mut view = MembershipView::default();
        for other in self.replicas.keys().filter(|other| *other != node) {
            let groups = self.gossip.get(other).cloned().unwrap_or_default();
            view.peers.insert(
                other.clone(),
                PeerState {
                    liveness: if self.down.contains(other) {
                        PeerLiveness::Dead
                    } else if self.unknown.contains(other) {
                        PeerLiveness::Unknown
                    } else {
                        PeerLiveness::Live
                    },
                    groups,
                    left: self.left.get(other).cloned().unwrap_or_default(),
                },
            );
        }
        view
    }

    /// Delivers outputs until the network is quiet, then refreshes membership views.
    pub(crate) fn run(&mut self) {
        self.run_with(true);
    }

    /// Delivers outputs until the network is quiet, leaving membership views as they are (a
    /// test that set them by hand, as for a partition).
    pub(crate) fn run_outputs_only(&mut self) {
        self.run_with(false);
    }

    fn run_with(&mut self, refresh_views: bool) {
        for _ in 0..50 {
            let mut moved = false;
            let nodes: Vec<String> = self.replicas.keys().cloned().collect();
            for node in &nodes {
                let mut failed: Option<(String, String)> = None;
                while let Some(output) = self.replicas.get_mut(node).and_then(Replica::poll_output) {
                    moved = true;
                    self.log.push((node.clone(), describe(&output)));
                    if let Some((_, error)) = &failed {
                        // After a failed persist the shell skips what depended on it, except a
                        // pushed change's notification, which it may have sent while the fsync
                        // ran (issue 14).
                        match output {
                            Output::Reply { id, result } => {
                                let result = result.and_then(|_| Err(CommandError::NotDurable(error.clone())));
                                self.replies.insert(id, result);
                            }
                            Output::Notify(notification) if notification.pushed && !notification.quiet => {
                                self.notified.entry(node.clone()).or_default().push(notification.revision);
                            }
                            // The shell resumes a deferred apply while its append runs, failed
                            // or not.
                            Output::Resume => self.input(node, Input::Resume),
                            _ => {}
                        }
                        continue;
                    }
                    if let Output::Persist(op) = &output
                        && let Err((group, error)) = self.persist(node, op)
                    {
                        failed = Some((group, error));
                        continue;
                    }
                    match output {
                        Output::Send { to, message } => {
                            let is_push = matches!(message, konor_crdt::PeerMessage::Changes { .. });
                            if let konor_crdt::PeerMessage::Prepare { round, .. } = &message
                                && self.prepared.last() != Some(round)
                            {
                                self.prepared.push(round.clone());
                            }
                            if self.down.contains(&to)
                                || self.down.contains(node)
                                || (is_push && self.drop_pushes_to.contains(&to))
                                || self.cut.contains(&(node.clone(), to.clone()))
                                || self.drop_kinds.contains(message.kind())
                                || self.drop_on.contains(&(node.clone(), to.clone(), message.kind()))
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
                            let left = self.left.entry(node.clone()).or_default();
                            match gossip {
                                Some(gossip) => {
                                    left.remove(&group);
                                    table.insert(group, gossip);
                                }
                                None => {
                                    table.remove(&group);
                                    left.insert(group);
                                }
                            }
                        }
                        // A quiet notification (a gated group's write not released) is told
                        // to no watcher.
                        Output::Notify(notification) if !notification.quiet => {
                            self.notified.entry(node.clone()).or_default().push(notification.revision);
                            let told = (
                                notification.set.keys().cloned().collect(),
                                notification.removed.iter().cloned().collect(),
                            );
                            self.told.entry(node.clone()).or_default().push(told);
                        }
                        Output::Notify(_) => {}
                        Output::Withdraw { group } => {
                            self.gossip.entry(node.clone()).or_default().remove(&group);
                        }
                        Output::Persist(_) | Output::Dropped { .. } => {}
                        // The harness persists nothing, so the deferred apply resumes at once.
                        Output::Resume => self.input(node, Input::Resume),
                    }
                }
                if let Some((group, error)) = failed {
                    // As the daemon does: reloaded as the node's own actor.
                    let reloaded = self.load(node, &group).map(|mut state| {
                        state.doc = konor_crdt::GroupDoc::load(&state.doc.save(), actor_for(node, 1)).unwrap();
                        Box::new(state)
                    });
                    self.input(node, Input::PersistFailed { group, error, reloaded });
                }
            }
            if !moved && !refresh_views {
                return;
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

    /// Writes a persist output to the node's "disk"; fails appends of a failing disk.
    fn persist(&mut self, node: &str, op: &PersistOp) -> Result<(), (String, String)> {
        let files = self.disk.entry(node.to_owned()).or_default();
        match op {
            PersistOp::CreateGroup { group, file, keys } => {
                files.insert(group.clone(), file.clone());
                self.keys_disk.insert((node.to_owned(), group.clone()), keys.clone());
            }
            PersistOp::Keys { group, keys, .. } => {
                self.keys_disk.insert((node.to_owned(), group.clone()), keys.clone());
            }
            PersistOp::Append { group, records } => {
                if self.failing_disk.contains(node) {
                    return Err((group.clone(), format!("disk full while saving {group}")));
                }
                files.entry(group.clone()).or_default().extend_from_slice(records);
            }
            PersistOp::Compact { group, file } => {
                files.insert(group.clone(), file.clone());
            }
            PersistOp::RemoveGroup { group } => {
                files.remove(group);
            }
            PersistOp::Members { group, members } => {
                self.members_disk.insert((node.to_owned(), group.clone()), members.iter().cloned().collect());
            }
            PersistOp::SyncState { .. } => {}
        }
        Ok(())
    }

    /// A group as `node`'s "disk" holds it, loaded as at a start.
    pub(crate) fn load(&self, node: &str, group: &str) -> Option<LoadedState> {
        let file = self.disk.get(node)?.get(group)?;
        let loaded = konor_crdt::load_group_file(file, actor_for(node, 99)).ok()?;
        Some(LoadedState {
            doc: loaded.group,
            keys: self
                .keys_disk
                .get(&(node.to_owned(), group.to_owned()))
                .cloned()
                .unwrap_or_else(|| konor_crdt::Keyring::first(GroupKey::from_bytes(KEY))),
            tail_changes: loaded.tail_changes,
            sync_states: BTreeMap::new(),
            staged: loaded.staged,
            decisions: loaded.decisions,
            damaged: loaded.dropped.is_some(),
            ballots: loaded.ballots,
            known_members: self.members_disk.get(&(node.to_owned(), group.to_owned())).cloned().unwrap_or_default(),
        })
    }

    /// Restarts `node` from its "disk" (a crash: memory lost, files kept), as incarnation
    /// `incarnation`.
    pub(crate) fn restart(&mut self, node: &str, incarnation: u64) {
        let groups: Vec<String> = self.disk.get(node).map(|f| f.keys().cloned().collect()).unwrap_or_default();
        let mut loaded = BTreeMap::new();
        for group in groups {
            if let Some(mut state) = self.load(node, &group) {
                state.doc = konor_crdt::GroupDoc::load(&state.doc.save(), actor_for(node, incarnation)).unwrap();
                loaded.insert(group, state);
            }
        }
        let seed = [incarnation as u8; 32];
        let mut replica = Replica::new(node.into(), actor_for(node, incarnation), seed, loaded);
        replica.handle(Millis(self.now), Input::Tick);
        self.replicas.insert(node.into(), replica);
    }

    pub(crate) fn advance(&mut self, millis: u64) {
        self.now += millis;
        let nodes: Vec<String> = self.replicas.keys().cloned().collect();
        for node in nodes {
            self.input(&node, Input::Tick);
        }
        self.run();
    }

    /// `node` takes back its "left" marker for `group` (as a node may: the marker is its own).
    pub(crate) fn forget_left(&mut self, node: &str, group: &str) {
        if let Some(left) = self.left.get_mut(node) {
            left.remove(group);
        }
    }

    pub(crate) fn settings(&self, node: &str, group: &str) -> serde_json::Value {
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
            PersistOp::Members { .. } => "persist members".into(),
            PersistOp::Keys { .. } => "persist keys".into(),
        },
        Output::Reply { .. } => "reply".into(),
        Output::Notify(_) => "notify".into(),
        Output::Publish { .. } => "publish".into(),
        Output::Withdraw { .. } => "withdraw".into(),
        Output::Dropped { reason, .. } => format!("dropped: {reason}"),
        Output::Resume => "resume".into(),
    }
}

pub(crate) fn meta() -> CommitMeta {
    CommitMeta::new("ops", "test", Millis(1_700_000_000_000))
}

pub(crate) const KEY: [u8; 32] = [42; 32];

pub(crate) fn mesh_with_group(nodes: &[&str]) -> Net {
    let mut net = Net::new(nodes);
    let create = Command::CreateGroup {
        name: "app".into(),
        mode: Mode::Eventual,
        key: GroupKey::from_bytes(KEY),
        meta: meta(),
        policy: Default::default(),
    };
    assert!(matches!(net.command(nodes[0], create), Ok(CommandOutcome::Created { .. })));
    for node in &nodes[1..] {
        let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY), repair: false };
        let outcome = net.command(node, join).unwrap();
        assert!(matches!(outcome, CommandOutcome::Joined { .. }), "{outcome:?}");
    }
    net
}

pub(crate) fn set(
    net: &mut Net,
    node: &str,
    key: &str,
    value: serde_json::Value,
) -> Result<CommandOutcome, CommandError> {
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
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes([1; 32]), repair: false };
    let error = net.command("n3", join).unwrap_err();
    assert!(error.to_string().contains("wrong group key"), "{error}");
    assert!(net.replicas["n3"].group("app").is_none());
    // A forged membership claim (a proof made with the wrong key) does not attract pushes.
    let fake = GroupGossip {
        digest: Default::default(),
        revision: 0,
        version: "v1".into(),
        proof: [0; 32],
        heads: vec![],
        key: None,
    };
    net.gossip.entry("n3".into()).or_default().insert("app".into(), fake);
    net.run();
    net.log.clear();
    set(&mut net, "n1", "secret", json!("x")).unwrap();
    assert!(!net.log.iter().any(|(_, what)| what == "send changes to n3"), "{:?}", net.log);
}

#[test]
fn a_join_with_no_member_in_sight_times_out_with_a_clear_error() {
    let mut net = Net::new(&["n1"]);
    let join = Command::JoinGroup { name: "ghost".into(), key: GroupKey::from_bytes(KEY), repair: false };
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
        keys: konor_crdt::Keyring::first(GroupKey::from_bytes(KEY)),
        tail_changes: 0,
        sync_states: BTreeMap::new(),
        staged: None,
        decisions: Vec::new(),
        damaged: false,
        known_members: BTreeSet::new(),
        ballots: Vec::new(),
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
    let left = net.command("n2", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    assert!(matches!(left, CommandOutcome::Left { .. }));
    assert!(!net.gossip["n2"].contains_key("app"));
    net.log.clear();
    set(&mut net, "n1", "after", json!(1)).unwrap();
    assert!(!net.log.iter().any(|(_, what)| what.starts_with("send changes")), "{:?}", net.log);
    let error = set(&mut net, "n2", "x", json!(1)).unwrap_err();
    assert!(matches!(error, CommandError::UnknownGroup(_)));
}

// ---- consistency: live quorum (eventual) and barrier rounds (strong) ----

/// Issues a command and returns its id without waiting for the reply.
pub(crate) fn send_command(net: &mut Net, node: &str, command: Command) -> u64 {
    net.next_id += 1;
    let id = net.next_id;
    net.input(node, Input::Command { id, command });
    id
}

pub(crate) fn set_command(key: &str, value: serde_json::Value) -> Command {
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

#[test]
fn regression_a_change_lost_to_a_failed_write_is_synced_again_without_spinning() {
    // Found by the daemon's in-process tests (issue 12): n1's disk refused a change that n2
    // then offered it by sync. n2 counted it as sent; n1 dropped it with the failed write. Once
    // the disk worked again, the two exchanged sync messages as fast as they could (thousands a
    // second, none carrying the change), and never converged.
    let mut net = mesh_with_group(&["n1", "n2"]);
    set(&mut net, "n1", "k", json!("old")).unwrap();
    net.failing_disk.insert("n1".into());
    // The write reaches n2 (pushed while persisting), n1's own append fails.
    assert!(set(&mut net, "n1", "k", json!("refused")).is_err());
    // Anti-entropy: n2 offers the change by sync, and n1's append fails again.
    net.advance(ANTI_ENTROPY_DELAY_MS + 100);
    net.failing_disk.clear();
    set(&mut net, "n1", "k", json!("after")).unwrap();
    let syncs = |net: &Net| net.log.iter().filter(|(_, what)| what.starts_with("send sync")).count();
    let mut most_per_round = 0;
    for _ in 0..8 {
        net.log.clear();
        net.advance(ANTI_ENTROPY_DELAY_MS);
        most_per_round = most_per_round.max(syncs(&net));
    }
    let digests: BTreeSet<String> =
        ["n1", "n2"].iter().map(|n| net.replicas[*n].group("app").unwrap().heads_digest().to_string()).collect();
    assert_eq!(digests.len(), 1, "the copies converge ({most_per_round} sync messages in one anti-entropy round)");
    assert_eq!(net.settings("n1", "app"), net.settings("n2", "app"));
    assert!(most_per_round <= 8, "{most_per_round} sync messages in one anti-entropy round");
}

/// Found in review (issue 14): a pending write counts gossiped acks when the membership view
/// changes, and a gossiped head this node does not hold yet cannot count (every head must be
/// known). When the member's own later write then arrives by sync, its gossip does not change,
/// so nothing recounted: the write timed out as not committed although a quorum held it. (Before
/// issue 14 every new local write recounted all pending writes, which hid it under load.)
#[test]
fn a_pending_write_counts_a_gossiped_ack_once_the_heads_it_names_arrive() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    // n2's direct ack and its pushes to n1 are lost; sync and gossip still work.
    net.drop_on.insert(("n2".into(), "n1".into(), "ack"));
    net.drop_on.insert(("n2".into(), "n1".into(), "changes"));
    net.input("n1", Input::Command { id: 901, command: set_command("c", json!(1)) });
    net.run_outputs_only();
    // n2 writes on top of it: its gossiped heads name a change n1 lacks.
    net.input("n2", Input::Command { id: 902, command: set_command("x", json!(2)) });
    net.run_outputs_only();
    let view = net.view_for("n1");
    net.input("n1", Input::Membership(view));
    net.run_outputs_only();
    assert!(!net.replies.contains_key(&901), "n1 cannot count n2 yet: {:?}", net.replies.get(&901));
    // Anti-entropy brings n2's write to n1; no view changes.
    for _ in 0..3 {
        net.now += 1_000;
        for node in ["n1", "n2"] {
            net.input(node, Input::Tick);
        }
        net.run_outputs_only();
    }
    assert_eq!(net.settings("n1", "app"), json!({"c": 1, "x": 2}), "sync delivered n2's write");
    let reply = net.replies.remove(&901).expect("n1's write was answered within the commit timeout");
    let Ok(CommandOutcome::Committed(receipt)) = reply else { panic!("{reply:?}") };
    assert!(receipt.acked_by.contains(&"n2".to_owned()), "{:?}", receipt.acked_by);
}

/// Issue 14: a member notifies its watchers of a pushed change before its own fsync, so a
/// revision a watcher saw can be lost with a failed persist. After the reload no revision is
/// given twice, and a watcher resuming at a lost revision gets an explicit resync (SPEC
/// invariant 4), whatever arrives next.
#[test]
fn a_revision_lost_with_a_failed_persist_is_never_given_again() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    net.failing_disk.insert("n2".into());
    send_command(&mut net, "n1", set_command("lost", json!(1)));
    net.run();
    let seen = *net.notified.get("n2").and_then(|n| n.last()).unwrap_or_else(|| panic!("{:?}", net.log));
    assert_eq!(net.replicas["n2"].group("app").unwrap().get("lost"), None, "dropped with the failed persist");
    eprintln!(
        "rev after failure {:?} log {:?}",
        net.replicas["n2"].revision("app"),
        net.log.iter().filter(|(n, _)| n == "n2").collect::<Vec<_>>()
    );
    net.failing_disk.clear();
    net.notified.clear();
    // The next change n2 takes does not build on the lost one.
    net.drop_pushes_to.insert("n2".into());
    set(&mut net, "n2", "other", json!(1)).unwrap_or_else(|e| panic!("{e}"));
    for r in 0..5 {
        eprintln!("ring {r} {:?}", net.replicas["n2"].events_since("app", r));
    }
    let after: Vec<u64> = net.notified.get("n2").cloned().unwrap_or_else(|| panic!("{:?}", net.log));
    assert!(after.iter().all(|revision| *revision > seen), "revision {seen} given again: {after:?}");
    assert_eq!(net.replicas["n2"].events_since("app", seen), Some(EventsSince::Resync), "seen {seen}, after {after:?}");
}

/// A local write tells its watchers exactly the keys whose value changed, as a remote apply
/// does: found from the write's operations, not by copying and diffing the whole settings
/// (issue 14: the copy was O(keys) per write).
#[test]
fn a_local_write_tells_exactly_the_keys_whose_value_changed() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    let entries = vec![("a".to_owned(), json!(1)), ("b".to_owned(), json!(2)), ("c".to_owned(), json!(3))];
    net.command("n1", Command::Set { group: "app".into(), entries, meta: meta() }).unwrap();
    net.run();
    let keys = |list: &[&str]| list.iter().map(|key| (*key).to_owned()).collect::<BTreeSet<String>>();
    // b keeps its value, a and d change, c is deleted below.
    let entries = vec![("a".to_owned(), json!(10)), ("b".to_owned(), json!(2)), ("d".to_owned(), json!(4))];
    net.command("n1", Command::Set { group: "app".into(), entries, meta: meta() }).unwrap();
    net.run();
    assert_eq!(net.told["n1"].last(), Some(&(keys(&["a", "d"]), keys(&[]))), "a local write");
    assert_eq!(net.told["n2"].last(), Some(&(keys(&["a", "d"]), keys(&[]))), "the same write applied remotely");
    net.command("n1", Command::Delete { group: "app".into(), keys: vec!["c".into()], meta: meta() }).unwrap();
    net.run();
    assert_eq!(net.told["n1"].last(), Some(&(keys(&[]), keys(&["c"]))), "a local delete");
    assert_eq!(net.told["n2"].last(), Some(&(keys(&[]), keys(&["c"]))), "the same delete applied remotely");
}

/// The writes one batch of events makes share one push per member (issue 14): it leaves before
/// the first write's persist, carries at most `PUSH_CHANGES_MAX` changes, and every write still
/// commits with its own version. The group's summary is published once, after the last persist.
#[test]
fn writes_made_in_one_batch_share_a_push_to_each_member() {
    const WRITES: usize = konor_crdt::limits::PUSH_CHANGES_MAX + 4;
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.log.clear();
    let first_id = net.next_id + 1;
    for n in 0..WRITES {
        net.next_id += 1;
        let command = Command::Set { group: "app".into(), entries: vec![(format!("k{n}"), json!(n))], meta: meta() };
        net.input("n1", Input::Command { id: net.next_id, command });
    }
    net.run();
    let n1: Vec<&str> = net.log.iter().filter(|(node, _)| node == "n1").map(|(_, what)| what.as_str()).collect();
    for member in ["n2", "n3"] {
        let pushes = n1.iter().filter(|what| **what == format!("send changes to {member}")).count();
        assert_eq!(pushes, 2, "{WRITES} writes in one batch: one full push and one more to {member}: {n1:?}");
    }
    assert_eq!(n1.iter().filter(|what| **what == "publish").count(), 1, "the batch publishes once: {n1:?}");
    let first_push = n1.iter().position(|what| what.starts_with("send changes")).unwrap();
    let first_persist = n1.iter().position(|what| *what == "persist append").unwrap();
    assert!(first_push < first_persist, "the shared push leaves before the first persist: {n1:?}");
    let mut versions = BTreeSet::new();
    for id in first_id..first_id + WRITES as u64 {
        let Some(Ok(CommandOutcome::Committed(receipt))) = net.replies.get(&id) else {
            panic!("write {id} did not commit: {:?}", net.replies.get(&id))
        };
        versions.insert(receipt.version.id.clone());
    }
    assert_eq!(versions.len(), WRITES, "each write has its own version");
    for node in ["n2", "n3"] {
        assert_eq!(net.settings(node, "app"), net.settings("n1", "app"), "{node}");
    }
}

/// A shared push never carries a change ahead of the save of a peer's change it depends on
/// (found in review): a write made after a pushed change arrived in the same batch depends on
/// that change, so its push starts after the append that saves it, not in the push queued before.
#[test]
fn a_shared_push_never_leaves_before_a_peers_change_it_depends_on_is_saved() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    let before = net.replicas["n1"].group("app").unwrap().heads();
    net.drop_pushes_to.insert("n1".into());
    set(&mut net, "n2", "remote", json!(1)).unwrap();
    net.drop_pushes_to.clear();
    let remote = net.replicas["n2"].group("app").unwrap().changes_since(&before);
    assert_eq!(remote.len(), 1, "n1 lacks n2's write");
    net.log.clear();
    // One batch on n1: a write, n2's change, a write that depends on both.
    for input in [Some(("a", json!(1))), None, Some(("b", json!(2)))] {
        let input = match input {
            Some((key, value)) => {
                net.next_id += 1;
                let command = Command::Set { group: "app".into(), entries: vec![(key.into(), value)], meta: meta() };
                Input::Command { id: net.next_id, command }
            }
            None => {
                let message = konor_crdt::PeerMessage::Changes { group: "app".into(), changes: remote.clone() };
                Input::Peer { from: "n2".into(), bytes: message.encode() }
            }
        };
        net.input("n1", input);
    }
    net.run();
    let n1: Vec<&str> = net.log.iter().filter(|(node, _)| node == "n1").map(|(_, what)| what.as_str()).collect();
    let pushes: Vec<usize> =
        n1.iter().enumerate().filter(|(_, what)| **what == "send changes to n3").map(|(at, _)| at).collect();
    let appends: Vec<usize> =
        n1.iter().enumerate().filter(|(_, what)| **what == "persist append").map(|(at, _)| at).collect();
    assert_eq!(pushes.len(), 2, "the second write starts a push of its own: {n1:?}");
    assert!(appends.len() >= 2 && pushes[1] > appends[1], "after the append of n2's change: {n1:?}");
    for node in ["n2", "n3"] {
        assert_eq!(net.settings(node, "app"), net.settings("n1", "app"), "{node}");
    }
}
