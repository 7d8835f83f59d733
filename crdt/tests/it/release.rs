//! Releases, first step (SPEC F14, docs/releases.md): in a gated group a version is written as
//! always but served (reads, watches, the SDK) only once a release targets it; a release is a
//! version of kind `release`, so it spreads, commits in strong groups through a round, and
//! concurrent releases resolve the same way on every node.

use konor_crdt::configuration::{Fencing, GroupPolicy};
use konor_crdt::group::{Edit, GATED_FORMAT};
use konor_crdt::limits::{EVICT_AFTER_MIN_MS, LEASE_RENEW_MS};
use konor_crdt::replica::{CommandOutcome, EventsSince};
use konor_crdt::{
    Command, CommitMeta, EditError, GroupDoc, GroupKey, Millis, Mode, ReleasePolicy, ReleaseStrategy, VersionKind,
};
use serde_json::json;

use crate::replica::{KEY, Net, meta as replica_meta, set};
use crate::support::{actor, deliver, exchange_all, meta};

fn gated_policy() -> GroupPolicy {
    GroupPolicy { release: ReleasePolicy::Gated, ..Default::default() }
}

/// `count` replicas of a new gated group.
fn gated(count: u8) -> Vec<GroupDoc> {
    let (first, _) = GroupDoc::create_with("app", Mode::Eventual, actor(1), &meta(0), &gated_policy(), None).unwrap();
    let genesis = first.save();
    let mut all = vec![first];
    for n in 2..=count {
        all.push(GroupDoc::load(&genesis, actor(n)).unwrap());
    }
    all
}

fn release(doc: &mut GroupDoc, to: &str, n: u64) -> Result<konor_crdt::LocalCommit, EditError> {
    doc.edit(Edit::Release { to: to.into(), strategy: ReleaseStrategy::All, guards: Default::default() }, &meta(n))
}

#[test]
fn a_gated_group_serves_only_what_a_release_targets() {
    let mut docs = gated(2);
    assert!(docs[0].is_gated() && docs[1].is_gated());
    assert_eq!(docs[0].format(), GATED_FORMAT, "a konord that does not know releases must refuse the group");
    docs[0].set(vec![("db.port".into(), json!(5432)), ("db.host".into(), json!("a"))], &meta(1)).unwrap();
    assert_eq!(docs[0].refresh_served(), None, "a write is not served before a release");
    assert_eq!(docs[0].settings().len(), 2, "but it is written");
    assert!(docs[0].served_settings().is_empty());
    assert_eq!(docs[0].served_label(), "v1");

    let commit = release(&mut docs[0], "v2", 2).unwrap();
    let VersionKind::Release { to, from, strategy, .. } = &commit.version.kind else { panic!("{commit:?}") };
    assert_eq!((to.counter, from.as_ref().map(|f| f.counter), strategy), (2, Some(1), &ReleaseStrategy::All));
    let change = docs[0].refresh_served().expect("the release moves what is served");
    assert_eq!(change.set.len(), 2);
    assert!(change.removed.is_empty());
    assert_eq!(docs[0].served_settings().to_json(), json!({"db.port": 5432, "db.host": "a"}));
    assert_eq!(docs[0].served_label(), "v2");
    assert_eq!(docs[0].refresh_served(), None, "told once");

    // A later write is held back again; the other replica learns all of it from the changes.
    docs[0].set(vec![("db.port".into(), json!(6000))], &meta(3)).unwrap();
    docs[0].delete(vec!["db.host".into()], &meta(4)).unwrap();
    deliver(&mut docs, 0, 1);
    assert!(docs[1].refresh_served().is_some());
    assert_eq!(docs[1].served_settings().to_json(), json!({"db.port": 5432, "db.host": "a"}));
    assert_eq!(docs[1].settings().to_json(), json!({"db.port": 6000}));

    // Releasing the latest from the other replica: a diff with a set and a removal.
    release(&mut docs[1], "v5", 5).unwrap();
    let change = docs[1].refresh_served().unwrap();
    assert_eq!((change.set.get("db.port"), change.removed.clone()), (Some(&json!(6000)), vec!["db.host".to_owned()]));
    // Back to an older version: a release whose target is older (a rollback of the release).
    release(&mut docs[1], "v2", 7).unwrap();
    docs[1].refresh_served();
    assert_eq!(docs[1].served_settings().to_json(), json!({"db.port": 5432, "db.host": "a"}));
    // A reload serves the same.
    let reloaded = GroupDoc::load(&docs[1].save(), actor(9)).unwrap();
    assert_eq!(reloaded.served_settings(), docs[1].served_settings());
    assert_eq!(reloaded.served_label(), docs[1].served_label());
    assert!(reloaded.derived_state_matches_document() && reloaded.served_matches_document());
}

#[test]
fn releases_refuse_what_makes_no_sense_and_leave_nothing_behind() {
    let mut docs = gated(1);
    docs[0].set(vec![("a".into(), json!(1))], &meta(1)).unwrap();
    release(&mut docs[0], "v2", 2).unwrap();
    let heads = docs[0].heads();
    assert_eq!(release(&mut docs[0], "v2", 3).unwrap_err(), EditError::Unchanged, "already released");
    assert!(matches!(release(&mut docs[0], "v42", 3), Err(EditError::Version(_))));
    assert_eq!(docs[0].heads(), heads);
    // An immediate group has no releases.
    let (mut plain, _) = GroupDoc::create("plain", Mode::Eventual, actor(1), &meta(0)).unwrap();
    plain.set(vec![("a".into(), json!(1))], &meta(1)).unwrap();
    assert!(matches!(release(&mut plain, "v2", 2), Err(EditError::NotGated { .. })));
    assert_eq!(plain.served_settings(), plain.settings(), "an immediate group serves its latest");
}

#[test]
fn concurrent_releases_resolve_the_same_way_on_every_node() {
    let mut docs = gated(3);
    docs[0].set(vec![("a".into(), json!(1))], &meta(1)).unwrap();
    docs[0].set(vec![("a".into(), json!(2))], &meta(2)).unwrap();
    exchange_all(&mut docs);
    // Two operators release different versions at once, without seeing each other's.
    release(&mut docs[1], "v2", 3).unwrap();
    release(&mut docs[2], "v3", 3).unwrap();
    exchange_all(&mut docs);
    for doc in &mut docs {
        doc.refresh_served();
        assert!(doc.served_matches_document());
    }
    let served: Vec<String> = docs.iter().map(GroupDoc::served_label).collect();
    assert_eq!(served[0], served[1]);
    assert_eq!(served[1], served[2]);
    // The release with the larger id (same counter: the larger actor, replica 3's) wins.
    assert_eq!(served[0], "v3");
    let (id, _) = docs[0].current_release().unwrap();
    assert_eq!(id.actor, konor_crdt::group::actor_hex(&actor(3)));
}

fn gated_mesh(nodes: &[&str], mode: Mode) -> Net {
    let mut net = Net::new(nodes);
    let policy = match mode {
        Mode::Eventual => gated_policy(),
        Mode::Strong => GroupPolicy {
            evict_after: Millis(EVICT_AFTER_MIN_MS),
            fencing: Fencing::Stale,
            release: ReleasePolicy::Gated,
        },
    };
    let create =
        Command::CreateGroup { name: "app".into(), mode, key: GroupKey::from_bytes(KEY), meta: replica_meta(), policy };
    assert!(matches!(net.command(nodes[0], create), Ok(CommandOutcome::Created { .. })));
    for node in &nodes[1..] {
        let join = Command::JoinGroup { name: "app".into(), key: GroupKey::from_bytes(KEY), repair: false };
        assert!(matches!(net.command(node, join), Ok(CommandOutcome::Joined { .. })), "{node}");
    }
    net.advance(LEASE_RENEW_MS);
    net
}

fn release_command(to: &str) -> Command {
    Command::Release {
        group: "app".into(),
        version: to.into(),
        strategy: ReleaseStrategy::All,
        guards: Default::default(),
        meta: CommitMeta::new("ops", "release", Millis(1_700_000_000_000)),
    }
}

/// Watchers of a gated group hear nothing of a write until a release, then one event per node
/// with exactly what the served settings did, labelled with the released version.
fn watchers_see_only_releases(mode: Mode) {
    let nodes = ["n1", "n2", "n3"];
    let mut net = gated_mesh(&nodes, mode);
    let before: Vec<u64> = nodes.iter().map(|n| net.replicas[*n].revision("app").unwrap()).collect();
    let told: Vec<usize> = nodes.iter().map(|n| net.notified.get(*n).map_or(0, Vec::len)).collect();
    let written = set(&mut net, "n2", "db.pool", json!(10)).unwrap();
    let CommandOutcome::Committed(receipt) = written else { panic!("{written:?}") };
    for (i, node) in nodes.iter().enumerate() {
        // The revision counts the change (a strong group's stays its change count), but no
        // watcher is told and a resuming one gets nothing.
        let revision = net.replicas[*node].revision("app").unwrap();
        assert_eq!(revision, before[i] + 1, "{node}");
        assert_eq!(net.notified.get(*node).map_or(0, Vec::len), told[i], "{node}: no watcher was told");
        let Some(EventsSince::Events(events)) = net.replicas[*node].events_since("app", before[i]) else { panic!() };
        assert!(events.is_empty(), "{node}: {events:?}");
        let doc = net.replicas[*node].group("app").unwrap();
        assert_eq!(doc.get("db.pool"), Some(&json!(10)), "{node}: but the write is held");
        assert_eq!(doc.served_get("db.pool"), None, "{node}");
    }
    let released = net.command("n3", release_command(&receipt.label));
    assert!(matches!(released, Ok(CommandOutcome::Committed(_))), "{released:?}");
    for (i, node) in nodes.iter().enumerate() {
        let replica = &net.replicas[*node];
        assert_eq!(replica.revision("app").unwrap(), before[i] + 2, "{node}: the write and the release");
        if mode == Mode::Strong {
            assert_eq!(replica.revision("app").unwrap(), replica.group("app").unwrap().change_count());
        }
        let Some(EventsSince::Events(events)) = replica.events_since("app", before[i]) else { panic!("{node}") };
        assert_eq!(events.len(), 1, "{node}: {events:?}");
        assert_eq!(events[0].set.get("db.pool"), Some(&json!(10)), "{node}");
        assert_eq!(events[0].version, receipt.label, "{node}: the event names the released version");
        assert_eq!(replica.group("app").unwrap().served_label(), receipt.label);
    }
}

#[test]
fn eventual_watchers_see_only_releases() {
    watchers_see_only_releases(Mode::Eventual);
}

#[test]
fn strong_watchers_see_only_releases_committed_through_a_round() {
    watchers_see_only_releases(Mode::Strong);
}

#[test]
fn a_release_in_an_immediate_group_is_refused() {
    let mut net = crate::replica::mesh_with_group(&["n1"]);
    set(&mut net, "n1", "a", json!(1)).unwrap();
    let refused = net.command("n1", release_command("v2"));
    assert!(matches!(refused, Err(konor_crdt::CommandError::Edit(EditError::NotGated { .. }))), "{refused:?}");
}

/// Regression (simulator seed 23): a gated group loaded from a file whose release sits in the
/// change records after the snapshot served the snapshot's version until its next change.
#[test]
fn a_release_in_a_files_tail_is_served_after_a_load() {
    let mut docs = gated(1);
    let mut file = konor_crdt::journal::snapshot_file(&docs[0], None).unwrap();
    let set = docs[0].set(vec![("a".into(), json!(1))], &meta(1)).unwrap();
    let released = release(&mut docs[0], "v2", 2).unwrap();
    for change in [&set.change, &released.change] {
        file.extend(konor_crdt::journal::change_record(change).unwrap());
    }
    let loaded = konor_crdt::load_group_file(&file, actor(5)).unwrap();
    assert_eq!(loaded.group.served_label(), "v2");
    assert_eq!(loaded.group.served_settings().to_json(), json!({"a": 1}));
    assert!(loaded.group.served_matches_document());
}

fn canary(waves: &[u8]) -> ReleaseStrategy {
    ReleaseStrategy::Canary(konor_crdt::Canary { waves: waves.to_vec(), ..Default::default() })
}

#[test]
fn promotions_and_aborts_are_versions_that_converge_and_refuse_what_makes_no_sense() {
    let mut docs = gated(2);
    docs[0].set(vec![("a".into(), json!(1))], &meta(1)).unwrap();
    let promote = |doc: &mut GroupDoc, n| doc.edit(Edit::Promote { wave: None }, &meta(n));
    let abort = |doc: &mut GroupDoc, n| doc.edit(Edit::Abort { reason: "errors".into() }, &meta(n));
    assert!(matches!(promote(&mut docs[0], 2), Err(EditError::BadRelease { .. })), "no release yet");
    // A release's own version is not settings to release.
    let all = release(&mut docs[0], "v2", 2).unwrap();
    let all_label = docs[0].label(&all.version.id);
    let refused = release(&mut docs[0], &all_label, 3).unwrap_err();
    assert!(matches!(&refused, EditError::BadRelease { detail } if detail.contains("release version")), "{refused:?}");
    assert!(matches!(promote(&mut docs[0], 3), Err(EditError::BadRelease { .. })), "nothing to promote in `all`");
    docs[0].set(vec![("a".into(), json!(2))], &meta(4)).unwrap();
    let latest = docs[0].latest_label();
    bad_waves(&mut docs[0], &latest);
    docs[0]
        .edit(Edit::Release { to: latest, strategy: canary(&[1, 100]), guards: Default::default() }, &meta(5))
        .unwrap();
    exchange_all(&mut docs);
    // A promotion on one node and an abort on the other, at once: the abort wins everywhere.
    promote(&mut docs[0], 6).unwrap();
    abort(&mut docs[1], 6).unwrap();
    exchange_all(&mut docs);
    for doc in &mut docs {
        doc.refresh_served();
        assert!(doc.served_matches_document());
        assert_eq!(doc.served_settings().to_json(), json!({"a": 1}), "aborted: back to the release before");
        let (id, _) = doc.current_release().unwrap();
        assert_eq!(doc.release_progress(id).aborted.as_deref(), Some("errors"));
    }
    // The release before the aborted one is in force again: an abort acts on it, and then on
    // nothing.
    let (active, _) = docs[0].active_release().unwrap();
    assert_eq!(active, &all.version.id);
    abort(&mut docs[0], 7).unwrap();
    docs[0].refresh_served();
    assert!(docs[0].served_settings().is_empty(), "every release aborted: the first version");
    assert!(matches!(abort(&mut docs[0], 8), Err(EditError::BadRelease { .. })), "no release in force");
}

fn bad_waves(doc: &mut GroupDoc, to: &str) {
    let heads = doc.heads();
    for waves in [&[][..], &[50, 10], &[0], &[101]] {
        let refused = doc
            .edit(Edit::Release { to: to.to_owned(), strategy: canary(waves), guards: Default::default() }, &meta(9));
        assert!(
            matches!(&refused, Err(EditError::BadRelease { detail }) if detail.contains("wave")),
            "{waves:?}: {refused:?}"
        );
    }
    assert_eq!(doc.heads(), heads, "nothing written");
}
