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
    assert_eq!(id.generation, 1);
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
