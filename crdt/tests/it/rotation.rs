//! Group key rotation (issue 17, item 5) through the in-test network of `replica.rs`: the
//! members move to the new key (those down at the time when they return), writes go on, the
//! old key admits nobody, and a node that is not entitled is never handed the new key.

use konor_crdt::keyring::{KeyId, request_proof};
use konor_crdt::replica::{CommandError, CommandOutcome};
use konor_crdt::{Command, GroupKey, Input, PeerMessage};
use serde_json::json;

use crate::replica::{KEY, Net, mesh_with_group, send_command, set};
use crate::strong::strong_mesh;

const NEW: [u8; 32] = [7; 32];

fn rotate(net: &mut Net, node: &str, bytes: [u8; 32]) -> Result<CommandOutcome, CommandError> {
    net.command(node, Command::RotateKey { group: "app".into(), key: GroupKey::from_bytes(bytes) })
}

fn key_id(net: &Net, node: &str) -> KeyId {
    net.replicas[node].keyring("app").unwrap().id("app")
}

#[test]
fn every_member_moves_to_the_new_key_and_writes_go_on() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    let outcome = rotate(&mut net, "n1", NEW).unwrap();
    assert!(matches!(outcome, CommandOutcome::KeyRotated { generation: 1, entitled: 3, .. }), "{outcome:?}");
    net.run();
    for node in ["n2", "n3"] {
        let keys = net.replicas[node].keyring("app").unwrap();
        assert_eq!((keys.generation(), keys.key()), (1, &GroupKey::from_bytes(NEW)), "{node}");
        assert_eq!(key_id(&net, node), key_id(&net, "n1"));
    }
    // The grants were wrapped, never sent as they are.
    assert!(net.log.iter().any(|(node, what)| node == "n1" && what.starts_with("send key_grant")), "{:?}", net.log);
    let CommandOutcome::Committed(receipt) = set(&mut net, "n3", "after", json!(1)).unwrap() else { panic!() };
    assert!(receipt.acked_by.len() >= 2, "{receipt:?}");
    for node in ["n1", "n2"] {
        assert_eq!(net.settings(node, "app"), json!({"after": 1}), "{node}");
    }
    // The keyring is durable: a restart keeps generation 1.
    net.restart("n2", 2);
    assert_eq!(net.replicas["n2"].keyring("app").unwrap().generation(), 1);
}

#[test]
fn a_node_that_left_cannot_join_again_with_the_old_key() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.command("n3", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    let CommandOutcome::KeyRotated { entitled, .. } = rotate(&mut net, "n1", NEW).unwrap() else { panic!() };
    assert_eq!(entitled, 2, "n3 left: not entitled");
    net.run();
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY), repair: false };
    let error = net.command("n3", join).unwrap_err();
    assert!(error.to_string().contains("wrong group key"), "{error}");
    // With the new key it may.
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(NEW), repair: false };
    assert!(matches!(net.command("n3", join), Ok(CommandOutcome::Joined { .. })));
    assert_eq!(net.replicas["n3"].keyring("app").unwrap().generation(), 1, "the generation comes from gossip");
}

#[test]
fn a_node_not_entitled_is_not_handed_the_key_even_proving_the_old_one() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    rotate(&mut net, "n1", NEW).unwrap();
    net.run();
    // n9 holds the old key (it could have been a member long ago) and asks anyway.
    let old = GroupKey::from_bytes(KEY);
    let nonce = [5; 32];
    let proofs = vec![(KeyId::of(&old, "app", 0), request_proof(&old, "app", "n9", &nonce))];
    let request = PeerMessage::KeyRequest { group: "app".into(), nonce, proofs: proofs.clone() };
    net.log.clear();
    net.input("n1", Input::Peer { from: "n9".into(), bytes: request.encode() });
    net.run();
    assert!(!net.log.iter().any(|(_, what)| what.starts_with("send key_grant")), "{:?}", net.log);
    assert!(net.log.iter().any(|(_, what)| what.contains("not entitled")), "{:?}", net.log);
    // The same request from an entitled member is granted: the refusal was about n9.
    let proofs = vec![(KeyId::of(&old, "app", 0), request_proof(&old, "app", "n2", &nonce))];
    let request = PeerMessage::KeyRequest { group: "app".into(), nonce, proofs };
    net.log.clear();
    net.input("n1", Input::Peer { from: "n2".into(), bytes: request.encode() });
    net.run();
    assert!(net.log.iter().any(|(_, what)| what == "send key_grant to n2"), "{:?}", net.log);
}

#[test]
fn a_member_down_during_the_rotation_gets_the_key_when_it_returns() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.down.insert("n3".into());
    net.run();
    let CommandOutcome::KeyRotated { entitled, .. } = rotate(&mut net, "n1", NEW).unwrap() else { panic!() };
    assert_eq!(entitled, 3, "a member that is down is still one");
    set(&mut net, "n2", "while_down", json!(1)).unwrap();
    assert_eq!(net.replicas["n3"].keyring("app").unwrap().generation(), 0);
    net.down.remove("n3");
    // Its request while it was cut off went nowhere: it asks again after a step.
    net.advance(konor_crdt::limits::JOIN_STEP_TIMEOUT_MS);
    net.advance(konor_crdt::limits::ANTI_ENTROPY_DELAY_MS);
    assert_eq!(key_id(&net, "n3"), key_id(&net, "n1"));
    assert_eq!(net.settings("n3", "app"), json!({"while_down": 1}));
}

#[test]
fn two_rotations_at_once_end_on_one_key() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    send_command(&mut net, "n1", Command::RotateKey { group: "app".into(), key: GroupKey::from_bytes([1; 32]) });
    send_command(&mut net, "n2", Command::RotateKey { group: "app".into(), key: GroupKey::from_bytes([2; 32]) });
    net.run();
    let id = key_id(&net, "n1");
    let larger =
        KeyId::of(&GroupKey::from_bytes([1; 32]), "app", 1).max(KeyId::of(&GroupKey::from_bytes([2; 32]), "app", 1));
    assert_eq!(id, larger, "the larger id wins");
    for node in ["n2", "n3"] {
        assert_eq!(key_id(&net, node), id, "{node}");
    }
    set(&mut net, "n3", "k", json!(1)).unwrap();
    assert_eq!(net.settings("n1", "app"), json!({"k": 1}));
}

#[test]
fn a_strong_group_commits_after_a_rotation() {
    let mut net = strong_mesh(&["n1", "n2", "n3"]);
    rotate(&mut net, "n2", NEW).unwrap();
    net.run();
    for node in ["n1", "n3"] {
        assert_eq!(key_id(&net, node), key_id(&net, "n2"), "{node}");
    }
    let CommandOutcome::Committed(receipt) = set(&mut net, "n1", "k", json!(1)).unwrap() else { panic!() };
    assert_eq!(receipt.acked_by.len(), 3, "{receipt:?}");
    for node in ["n1", "n2", "n3"] {
        assert_eq!(net.settings(node, "app"), json!({"k": 1}), "{node}");
    }
}

#[test]
fn a_node_that_left_cannot_draw_members_to_a_key_of_its_own() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.command("n3", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    net.run();
    for node in ["n1", "n2"] {
        assert_eq!(net.replicas[node].keyring("app").unwrap().left_at("n3"), Some(0), "{node} recorded the leave");
    }
    let CommandOutcome::KeyRotated { entitled, .. } = rotate(&mut net, "n1", NEW).unwrap() else { panic!() };
    assert_eq!(entitled, 2, "n3 left: not entitled");
    net.run();
    // n3 takes back its "left" marker and claims the group with the old key's proof and a
    // newer key id of the generation (the members moved already): nobody trusts it.
    let old = GroupKey::from_bytes(KEY);
    let mut claim = net.gossip["n2"]["app"].clone();
    claim.proof = konor_crdt::replica::membership_proof(&old, "app", "n3");
    claim.key = Some(KeyId { generation: 1, tag: [0xff; 8] });
    net.forget_left("n3", "app");
    net.gossip.entry("n3".into()).or_default().insert("app".into(), claim);
    net.log.clear();
    net.run();
    assert!(!net.log.iter().any(|(_, what)| what == "send key_request to n3"), "{:?}", net.log);
    assert_eq!(net.replicas["n2"].keyring("app").unwrap().left_at("n3"), Some(0), "still recorded: no proof under K1");
    // A grant it sends unasked is dropped.
    let grant = PeerMessage::KeyGrant {
        group: "app".into(),
        id: KeyId { generation: 1, tag: [0xff; 8] },
        under: KeyId::of(&old, "app", 0),
        nonce: [1; 32],
        wrapped: [2; 32],
        tag: [3; 32],
        entitled: vec!["n2".into(), "n3".into()],
    };
    net.input("n2", Input::Peer { from: "n3".into(), bytes: grant.encode() });
    net.run();
    assert!(net.log.iter().any(|(node, what)| node == "n2" && what.contains("not asked for")), "{:?}", net.log);
    // Its announcement (replayable: no nonce) does not clear n2's record of its leaving.
    let announce =
        PeerMessage::Announce { group: "app".into(), proof: konor_crdt::replica::membership_proof(&old, "app", "n3") };
    net.input("n2", Input::Peer { from: "n3".into(), bytes: announce.encode() });
    net.run();
    assert_eq!(net.replicas["n2"].keyring("app").unwrap().left_at("n3"), Some(0));
    // Gossip forgets n3 altogether: the durable record still keeps it out of the next rotation.
    net.gossip.remove("n3");
    net.run();
    let CommandOutcome::KeyRotated { entitled, .. } = rotate(&mut net, "n2", [8; 32]).unwrap() else { panic!() };
    assert_eq!(entitled, 2);
}

#[test]
fn a_node_that_left_and_joined_again_through_another_member_is_trusted_again() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    net.command("n3", Command::LeaveGroup { name: "app".into(), force: false }).unwrap();
    net.run();
    assert_eq!(net.replicas["n2"].keyring("app").unwrap().left_at("n3"), Some(0));
    // n3 joins again through n1 only (its announcement to n2 is lost).
    net.drop_on.insert(("n3".into(), "n2".into(), "join_request"));
    net.drop_on.insert(("n3".into(), "n2".into(), "announce"));
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY), repair: false };
    let id = send_command(&mut net, "n3", join);
    net.run();
    net.advance(2_000);
    assert!(matches!(net.replies.remove(&id), Some(Ok(CommandOutcome::Joined { .. }))));
    assert_eq!(net.replicas["n2"].keyring("app").unwrap().left_at("n3"), None, "its gossip proves the key again");
    let CommandOutcome::KeyRotated { entitled, .. } = rotate(&mut net, "n2", NEW).unwrap() else { panic!() };
    assert_eq!(entitled, 3);
    net.run();
    assert_eq!(key_id(&net, "n3"), key_id(&net, "n2"));
}

#[test]
fn a_far_fetched_generation_in_gossip_neither_blocks_a_rotation_nor_relabels_a_key() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    rotate(&mut net, "n1", NEW).unwrap();
    net.run();
    // n2 claims the current key under the largest generation, then a made-up key there.
    for claimed in [KeyId::of(&GroupKey::from_bytes(NEW), "app", u64::MAX), KeyId { generation: u64::MAX, tag: [0; 8] }]
    {
        let mut claim = net.gossip["n2"]["app"].clone();
        claim.key = Some(claimed);
        net.gossip.get_mut("n2").unwrap().insert("app".into(), claim);
        net.log.clear();
        net.run();
        assert!(!net.log.iter().any(|(_, what)| what.starts_with("send key_request")), "{:?}", net.log);
        assert_eq!(net.replicas["n3"].keyring("app").unwrap().generation(), 1);
    }
    let CommandOutcome::KeyRotated { generation, .. } = rotate(&mut net, "n3", [9; 32]).unwrap() else { panic!() };
    assert_eq!(generation, 2);
}

#[test]
fn a_key_already_held_is_not_a_rotation() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    let error = rotate(&mut net, "n1", KEY).unwrap_err();
    assert!(error.to_string().contains("draw a new one"), "{error}");
    rotate(&mut net, "n1", NEW).unwrap();
    assert!(rotate(&mut net, "n1", KEY).is_err(), "a replaced key is refused too");
}

#[test]
fn a_joiner_that_missed_the_generation_takes_it_from_a_member() {
    let mut net = mesh_with_group(&["n1", "n2"]);
    rotate(&mut net, "n1", NEW).unwrap();
    net.run();
    // The joiner's view of the members predates the rotation's gossip.
    let fresh: Vec<(String, konor_crdt::replica::GroupGossip)> =
        ["n1", "n2"].iter().map(|node| (node.to_string(), net.gossip[*node]["app"].clone())).collect();
    for (node, gossip) in &fresh {
        let mut stale = gossip.clone();
        stale.key = None;
        net.gossip.get_mut(node).unwrap().insert("app".into(), stale);
    }
    net.replicas.insert(
        "n3".into(),
        konor_crdt::Replica::new("n3".into(), konor_crdt::replica::actor_for("n3", 1), [3; 32], Default::default()),
    );
    net.run();
    let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(NEW), repair: false };
    assert!(matches!(net.command("n3", join), Ok(CommandOutcome::Joined { .. })));
    assert_eq!(net.replicas["n3"].keyring("app").unwrap().generation(), 0);
    for (node, gossip) in fresh {
        net.gossip.get_mut(&node).unwrap().insert("app".into(), gossip);
    }
    net.log.clear();
    net.run();
    assert_eq!(key_id(&net, "n3"), key_id(&net, "n1"));
    assert!(!net.log.iter().any(|(_, what)| what.starts_with("send key_request")), "{:?}", net.log);
}

#[test]
fn a_member_left_on_the_losing_key_of_two_rotations_converges_after_the_next_one() {
    let mut net = mesh_with_group(&["n1", "n2", "n3"]);
    let (a, b) = ([1; 32], [2; 32]);
    let id = |bytes: [u8; 32]| KeyId::of(&GroupKey::from_bytes(bytes), "app", 1);
    let (loser, winner) = if id(a) < id(b) { (a, b) } else { (b, a) };
    let isolate = |net: &mut Net, node: &str, from: &[&str]| {
        for other in from {
            net.cut.insert((node.to_owned(), other.to_string()));
            net.cut.insert((other.to_string(), node.to_owned()));
        }
    };
    // n1 and n2 rotate at once; n2 is cut off, so n3 is handed n1's (losing) key.
    isolate(&mut net, "n2", &["n1", "n3"]);
    send_command(&mut net, "n1", Command::RotateKey { group: "app".into(), key: GroupKey::from_bytes(loser) });
    send_command(&mut net, "n2", Command::RotateKey { group: "app".into(), key: GroupKey::from_bytes(winner) });
    net.run();
    assert_eq!(key_id(&net, "n3"), id(loser));
    // n3 is cut off before it hears of the winner; n1 moves to it.
    net.cut.clear();
    isolate(&mut net, "n3", &["n1", "n2"]);
    net.advance(konor_crdt::limits::JOIN_STEP_TIMEOUT_MS);
    assert_eq!(key_id(&net, "n1"), id(winner));
    assert_eq!(key_id(&net, "n3"), id(loser));
    // The winner's side rotates once more; n3 comes back, to n2 only (which never held the
    // losing key), and is handed that key under the key both sides replaced, by a member
    // entitled to the losing key.
    rotate(&mut net, "n2", [3; 32]).unwrap();
    net.cut.clear();
    isolate(&mut net, "n3", &["n1"]);
    net.advance(konor_crdt::limits::JOIN_STEP_TIMEOUT_MS);
    net.advance(konor_crdt::limits::JOIN_STEP_TIMEOUT_MS);
    for node in ["n1", "n3"] {
        assert_eq!(key_id(&net, node), key_id(&net, "n2"), "{node}");
    }
    assert_eq!(key_id(&net, "n2").generation, 2);
}
