//! Local commands that make or change a group here: `create_group`, `adopt_group` (a group
//! created here or received by a join is stored and published) and `local_write`, an edit of an
//! eventual group: applied at once, pushed to the members that may be up, persisted, then
//! answered when a live quorum acknowledged it (quorum.rs). A strong group's edit runs as a
//! round instead (round.rs).

use super::{
    CommandError, CommandId, CommandOutcome, CommitReceipt, GroupState, Output, PersistOp, Replica, membership_proof,
};
use crate::configuration::{Configuration, GroupPolicy};
use crate::group::{CommitMeta, Edit, GroupDoc, Mode};
use crate::join::GroupKey;
use crate::journal::{change_record, snapshot_file};
use crate::keyring::Keyring;

impl Replica {
    pub(super) fn create_group(
        &mut self,
        id: CommandId,
        name: String,
        mode: Mode,
        key: GroupKey,
        meta: CommitMeta,
        policy: GroupPolicy,
    ) {
        if self.groups.contains_key(&name) || self.joins.contains_key(&name) {
            return self.reply(id, Err(CommandError::AlreadyExists(name)));
        }
        let configuration = (mode == Mode::Strong).then(|| Configuration::initial(&self.node_id));
        let created = GroupDoc::create_with(&name, mode, self.actor.clone(), &meta, &policy, configuration.as_ref());
        let (doc, _) = match created {
            Ok(created) => created,
            Err(error) => return self.reply(id, Err(error.into())),
        };
        if let Err(error) = self.adopt_group(name.clone(), doc, Keyring::first(key)) {
            return self.reply(id, Err(error));
        }
        self.reply(id, Ok(CommandOutcome::Created { name }));
    }

    /// Stores a new group (created here or received by a join) and starts publishing it.
    pub(super) fn adopt_group(&mut self, name: String, mut doc: GroupDoc, keys: Keyring) -> Result<(), CommandError> {
        doc.set_viewer(self.viewer());
        let file = snapshot_file(&doc, None).map_err(|e| CommandError::TooLarge(e.to_string()))?;
        self.outputs.push_back(Output::Persist(PersistOp::CreateGroup {
            group: name.clone(),
            file,
            keys: keys.clone(),
        }));
        let proof = membership_proof(keys.key(), &name, &self.node_id);
        let revision = self.starting_revision(&name, &doc);
        let mut state = GroupState::new(doc, keys, proof, 0, revision);
        state.round_lamport = self.left_lamports.get(&name).copied().unwrap_or(0);
        self.departed.retain(|(group, _)| *group != name);
        self.groups.insert(name.clone(), state);
        self.publish(&name);
        // Peers holding the group are now members of ours: compare digests at once.
        self.mark_divergence();
        Ok(())
    }

    /// A local edit: applied at once in eventual groups (the reply waits for a live quorum),
    /// run as a barrier round in strong groups.
    pub(super) fn local_write(&mut self, id: CommandId, group: String, edit: Edit, meta: CommitMeta) {
        let Some(state) = self.groups.get_mut(&group) else {
            return self.reply(id, Err(CommandError::UnknownGroup(group)));
        };
        if state.doc.mode() == Mode::Strong {
            return self.start_round(id, group, edit, meta);
        }
        let deps = state.doc.heads();
        let (commit, keys) = match state.doc.edit_reporting_keys(edit, &meta) {
            Ok(edited) => edited,
            Err(error) => return self.reply(id, Err(error.into())),
        };
        let records = match change_record(&commit.change) {
            Ok(records) => records,
            Err(error) => return self.reply(id, Err(CommandError::TooLarge(error.to_string()))),
        };
        let label = state.doc.label(&commit.version.id);
        // Push first, then fsync: peers apply and persist while this node does. Safe because
        // this node's actor is fresh per process start (a change lost in a crash is never
        // re-issued under the same actor), and this node counts itself toward the quorum only
        // through outputs that run after the persist below.
        let live = self.live_members(&group);
        for member in &live {
            self.queue_push(member, &group, &commit.change, commit.change_hash, &deps);
        }
        self.outputs.push_back(Output::Persist(PersistOp::Append { group: group.clone(), records }));
        let revision = self.record_changes(&group, 1, keys, false);
        self.compact_if_due(&group);
        self.publish(&group);
        let receipt = CommitReceipt {
            group,
            version: commit.version,
            label,
            revision,
            acked_by: vec![self.node_id.clone()],
            final_before_reply: false,
        };
        self.await_quorum(id, receipt, commit.change_hash, live);
    }
}
