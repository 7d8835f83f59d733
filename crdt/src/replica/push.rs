//! Changes pushed by a member of an eventual group (`PeerMessage::Changes`), and what every
//! remote apply does here, pushed or synced (`after_remote_apply`): persist what is new, advance
//! the revision and notify, compact when due, publish, settle a staged round the change decides,
//! and answer joins a configuration change seats. A push whose changes all apply in order is
//! persisted first and applied while the fsync runs (`Output::Resume`); either way the `Ack`
//! follows the persist.

use super::{NodeId, Output, PersistOp, Replica};
use automerge::{Change, ChangeHash};

use crate::exchange::{RemoteApplied, decode_change};
use crate::group::Mode;
use crate::journal::change_record;
use crate::limits::{PUSH_BYTES_MAX, PUSH_CHANGES_MAX};
use crate::peer_message::PeerMessage;

/// A push queued in this batch that later writes may join ([`Replica::queue_push`]).
#[derive(Debug)]
pub(super) struct OpenPush {
    to: NodeId,
    group: String,
    /// The changes it carries.
    hashes: Vec<ChangeHash>,
}

/// Changes a member persists before it applies them, so that the apply overlaps the fsync.
#[derive(Debug)]
pub(super) struct DeferredApply {
    group: String,
    from: NodeId,
    /// The changes as pushed, and decoded (each is decoded once: a decode checks the change's
    /// hash, and it was done three times per pushed change).
    changes: Vec<Vec<u8>>,
    decoded: Vec<Change>,
}

impl Replica {
    /// Queues `change` (its `hash`, and its `deps`: this node's heads before it, which are its
    /// Automerge dependencies except when a peer's head descends from this actor's previous
    /// change, and then the change starts a push of its own either way) for a push to `to`. It
    /// joins the push of the same group to the same member queued last in this batch when every
    /// one of its dependencies is in that push and there is room, so that the writes one batch
    /// of events makes reach each member in one message (or a few), are saved by the member with
    /// one fsync, applied in one call and acknowledged once (issue 14). The push leaves where
    /// the first of them queued it: before their appends, unless the batch's run of appends
    /// began earlier (a peer's change saved first), and then after that run's fsync. Moving a
    /// change ahead of the persists queued since is safe for the reason a push goes before its
    /// own persist (`local_write`) only when nothing it depends on is among them: a peer's
    /// change that arrived in between (found in review) is saved by an append queued after the
    /// push, so a change built on it starts a new push.
    pub(super) fn queue_push(
        &mut self,
        to: &NodeId,
        group: &str,
        change: &[u8],
        hash: ChangeHash,
        deps: &[ChangeHash],
    ) {
        let open = self.open_pushes.iter().rposition(|open| open.to == *to && open.group == group);
        if let Some(index) = open.filter(|index| deps.iter().all(|dep| self.open_pushes[*index].hashes.contains(dep))) {
            // The push queued last to this member for this group (each one opened is recorded
            // in order, and none has left since: polling an output closes them all).
            let queued = self.outputs.iter_mut().rev().find_map(|output| match output {
                Output::Send { to: peer, message: PeerMessage::Changes { group: pushed, changes } }
                    if peer == to && pushed == group =>
                {
                    Some(changes)
                }
                _ => None,
            });
            if let Some(changes) = queued {
                debug_assert_eq!(changes.len(), self.open_pushes[index].hashes.len(), "an open push and its message");
                let bytes: usize = changes.iter().map(Vec::len).sum();
                if changes.len() < PUSH_CHANGES_MAX && bytes + change.len() <= PUSH_BYTES_MAX {
                    changes.push(change.to_vec());
                    self.open_pushes[index].hashes.push(hash);
                    return;
                }
            }
        }
        let message = PeerMessage::Changes { group: group.to_owned(), changes: vec![change.to_vec()] };
        self.outputs.push_back(Output::Send { to: to.clone(), message });
        self.open_pushes.push(OpenPush { to: to.clone(), group: group.to_owned(), hashes: vec![hash] });
    }

    /// Takes changes pushed by `from`, a member of the group.
    pub(super) fn handle_changes(&mut self, group: String, from: NodeId, changes: Vec<Vec<u8>>) {
        let Some(state) = self.groups.get_mut(&group) else { return };
        if state.doc.mode() == Mode::Strong {
            // Strong groups change only through rounds (and sync of committed rounds).
            return self.drop_message(from, format!("pushed changes for strong group {group:?}"));
        }
        // All are decoded before any is applied: a malformed one refuses the push, with nothing
        // applied or acknowledged.
        let decoded = match changes.iter().map(|bytes| decode_change(bytes)).collect::<Result<Vec<_>, _>>() {
            Ok(decoded) => decoded,
            Err(error) => return self.drop_message(from, error.to_string()),
        };
        if let Some(records) = persist_first_records(&state.doc, &changes, &decoded) {
            // Durable first, applied while the fsync runs (Output::Resume).
            self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.clone(), records }));
            self.outputs.push_back(Output::Resume);
            self.deferred = Some(DeferredApply { group, from, changes, decoded });
            return;
        }
        self.apply_pushed(&group, from, decoded, &[]);
    }

    /// Applies changes pushed by `from` and acks what is now here (durable: the persist
    /// operations run before the ack). `persisted` were already queued for persisting.
    fn apply_pushed(&mut self, group: &str, from: NodeId, changes: Vec<Change>, persisted: &[Vec<u8>]) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let pushed: Vec<automerge::ChangeHash> = changes.iter().map(Change::hash).collect();
        let (applied, failed) = match state.doc.apply_changes_decoded(changes) {
            Ok(applied) => (applied, None),
            // Whatever did apply before the failure is persisted, counted and announced like
            // any apply: a document must never serve a change its file does not hold.
            Err(failure) => (failure.applied, Some(failure.error)),
        };
        let missing_deps = state.doc.has_missing_deps();
        self.after_remote_apply_except(group, applied, persisted);
        // Durable now (the append above executes before this send): ack.
        let hashes = pushed
            .into_iter()
            .filter(|hash| self.groups.get(group).is_some_and(|s| s.doc.has_change(hash)))
            .map(|hash| hash.0)
            .collect::<Vec<_>>();
        if !hashes.is_empty() {
            let ack = PeerMessage::Ack { group: group.to_owned(), changes: hashes.clone() };
            self.outputs.push_back(Output::Send { to: from.clone(), message: ack });
        }
        if let Some(error) = failed {
            if persisted.len() > hashes.len() {
                // Records of changes that did not apply are in the file: rewrite it from the
                // document, which never took them.
                self.compact(group);
            }
            return self.drop_message(from, error.to_string());
        }
        if missing_deps {
            // Nothing new became visible: either duplicates or changes waiting for
            // dependencies; a sync session settles which.
            self.start_sync(group, &from);
        }
    }

    /// Finishes the apply of changes persisted first.
    pub(super) fn finish_deferred_apply(&mut self, deferred: DeferredApply) {
        let DeferredApply { group, from, changes, decoded } = deferred;
        self.apply_pushed(&group, from, decoded, &changes);
    }

    /// Persists and announces what a remote apply added.
    pub(super) fn after_remote_apply(&mut self, group: &str, applied: RemoteApplied) {
        self.after_remote_apply_except(group, applied, &[]);
    }

    /// The same, for an apply some of whose changes (`persisted`, raw bytes) were already
    /// queued for persisting.
    fn after_remote_apply_except(&mut self, group: &str, applied: RemoteApplied, persisted: &[Vec<u8>]) {
        if applied.new_changes.is_empty() {
            return;
        }
        let mut records = Vec::new();
        for change in applied.new_changes.iter().filter(|change| !persisted.contains(change)) {
            match change_record(change) {
                Ok(record) => records.extend(record),
                Err(error) => {
                    return self.drop_message(self.node_id.clone(), format!("cannot persist a change: {error}"));
                }
            }
        }
        if !records.is_empty() {
            self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.to_owned(), records }));
        }
        self.record_changes(group, applied.new_changes.len(), applied.changed_keys, true);
        self.compact_if_due(group);
        self.publish(group);
        // A member's gossiped heads that named these changes count as its acks only now.
        self.count_gossip_acks_in(group);
        // A staged round whose change arrived by sync was committed elsewhere (or lost its
        // position to another change).
        self.settle_round_by_sync(group);
        if let Some(state) = self.groups.get_mut(group) {
            state.strong.settle_amnesia(&state.doc);
        }
        // A change of the configuration may have seated this node.
        self.answer_joins(group);
    }
}

/// The records to persist before applying `changes` pushed to an eventual group, when that is
/// safe: every change decodes, is new here, and depends only on changes here or earlier in the
/// push (so the apply will take all of them, in this order). `None` otherwise: the caller
/// applies first and persists what was applied.
fn persist_first_records(doc: &crate::group::GroupDoc, changes: &[Vec<u8>], decoded: &[Change]) -> Option<Vec<u8>> {
    let mut earlier: Vec<automerge::ChangeHash> = Vec::new();
    let mut records = Vec::new();
    for (bytes, change) in changes.iter().zip(decoded) {
        let hash = change.hash();
        if doc.has_change(&hash) || earlier.contains(&hash) {
            return None;
        }
        if !change.deps().iter().all(|dep| earlier.contains(dep) || doc.has_change(dep)) {
            return None;
        }
        records.extend(change_record(bytes).ok()?);
        earlier.push(hash);
    }
    (!records.is_empty()).then_some(records)
}
