//! What the durable state of a group asks of the replica: compaction (`compacted_file`, the
//! file a group is rewritten as, with the round records that must survive) and the answer to a
//! failed persist (`handle_persist_failed`): the group is rebuilt from what its file holds, under
//! a fresh actor (`reload_actor`), and every write that depended on the failed persist answers
//! `NotDurable`. Loading at start is `Replica::new` (mod.rs) from a `LoadedState`.

use automerge::ActorId;
use sha2::{Digest, Sha256};

use super::{CommandError, CommandId, GroupState, LoadedState, Output, PersistOp, Replica, round};
use crate::journal::{RoundRecord, needs_compaction, round_record, snapshot_file};
use crate::time::Millis;

impl Replica {
    /// A persist of `group` failed: everything of the group that was not made durable is
    /// dropped from memory (the group is rebuilt from what its file holds), and every write that
    /// depended on it fails with the error. Nothing not on disk is served or acknowledged.
    pub(super) fn handle_persist_failed(&mut self, group: &str, error: &str, reloaded: Option<Box<LoadedState>>) {
        let failed: Vec<CommandId> =
            self.commits.iter().filter(|(_, pending)| pending.group() == group).map(|(id, _)| *id).collect();
        for id in failed {
            self.commits.remove(&id);
            let text = format!("{error}; the write is not committed (it may still reach the peers it was sent to)");
            self.reply(id, Err(CommandError::NotDurable(text)));
        }
        let reloaded_staged = reloaded.as_ref().and_then(|r| r.staged.as_ref().map(|s| s.round.clone()));
        if let Some(round::Round::Coordinating(own)) = self.groups.get(group).and_then(|s| s.round.as_ref()) {
            {
                // Its commit proposal left before its own record (`propose_commit`): once it is
                // deciding, only a majority knows the outcome, whatever the file holds.
                let proposed =
                    matches!(own.phase, round::Phase::Deciding { .. }) || reloaded_staged.as_ref() == Some(&own.id);
                if proposed {
                    self.give_up_deciding(group, format!("{error} while finishing the round"));
                } else {
                    // Still voting: no commit proposal left. Aborting is final.
                    if let Some(state) = self.groups.get_mut(group)
                        && let Some(round::Round::Coordinating(own)) = state.round.as_mut()
                    {
                        own.phase = round::Phase::Voting;
                    }
                    let text = format!("{error}; the strong write is not committed anywhere");
                    self.abort_own_round_with(group, CommandError::NotDurable(text));
                }
            }
        }
        let Some(old) = self.groups.remove(group) else { return };
        self.left_lamports.insert(group.to_owned(), old.round_lamport);
        self.left_revisions.insert(group.to_owned(), old.revision);
        let Some(loaded) = reloaded else {
            // The file cannot be read: the shell repairs the group from peers.
            for write in old.queued {
                self.reply(write.command, Err(CommandError::NotDurable(error.to_owned())));
            }
            self.outputs.push_back(Output::Withdraw { group: group.to_owned() });
            return;
        };
        let LoadedState {
            mut doc,
            keys,
            tail_changes,
            sync_states: _,
            staged,
            decisions,
            damaged: _,
            known_members: _,
            ballots: _,
        } = *loaded;
        // Changes lost with the failed append may have been sent already: write from now on
        // under a fresh actor so their sequence numbers are never reused.
        self.reloads += 1;
        doc.set_actor(reload_actor(&self.actor, self.reloads));
        doc.set_viewer(self.viewer());
        let revision = self.starting_revision(group, &doc);
        // The key file as saved: a key adopted since whose save failed is dropped with the rest
        // (the member asks for it again; a rotation made here was answered not durable).
        let proof = super::membership_proof(keys.key(), group, &self.node_id);
        let mut state = GroupState::new(doc, keys, proof, tail_changes, revision);
        state.round_lamport = old.round_lamport;
        state.decisions = old.decisions;
        state.ballots = old.ballots;
        for (round, commit) in decisions {
            if state.final_outcome(&round).is_none() {
                state.remember_decision(round, commit);
            }
        }
        // In an eventual group watchers may have been told of pushed changes before their
        // persist (issue 14), and the ring cannot tell which of its events were durable: it
        // starts empty above every revision given before, so a watcher resuming from any of
        // them gets a resync (live watchers get one from the shell). A strong group's watchers
        // were told only of durable changes: its revision is back at the durable count.
        if !super::revisions_per_run(&state.doc) {
            let revision = state.revision;
            state.events = old.events.into_iter().filter(|(_, event)| event.revision <= revision).collect();
            state.last_told = state.events.back().map_or(revision, |(_, event)| event.revision);
        }
        state.last_commit = old.last_commit;
        state.queued = old.queued;
        state.strong = old.strong;
        state.announced = old.announced;
        state.announcing = old.announcing;
        state.leaving = old.leaving;
        state.known_members = old.known_members;
        self.groups.insert(group.to_owned(), state);
        self.restore_round(group, staged);
        // Not at once: while the disk keeps failing, every answer would fail to save again
        // (found by the simulator: thousands of queries a second from a node with write errors).
        let retry = Millis(self.now.0 + crate::limits::DECISION_TIMEOUT_MS / 2);
        if let Some(round::Round::Staged(staged)) = self.groups.get_mut(group).and_then(|s| s.round.as_mut()) {
            staged.next_query = staged.next_query.max(retry);
        }
        self.publish(group);
    }

    /// Compacts `group` when its tail is due.
    pub(super) fn compact_if_due(&mut self, group: &str) {
        if self.groups.get(group).is_some_and(|state| needs_compaction(state.tail_changes, state.changes)) {
            self.compact(group);
        }
    }

    /// The whole file `group` would be compacted into now: a snapshot of the document and the
    /// round records (for a shell that must rewrite a file a failed fsync left unknown). Round
    /// records survive compaction: the decisions (which keep the round lamport monotonic and
    /// answer in-doubt peers), a round staged here without a decision, and the ballots of
    /// undecided rounds this node is an acceptor of. `None` when the snapshot no longer fits a
    /// record (the file keeps growing by appends instead; epochs will bound it).
    pub fn compacted_file(&self, group: &str) -> Option<Vec<u8>> {
        let state = self.groups.get(group)?;
        let mut file = snapshot_file(&state.doc, None).ok()?;
        let mut records: Vec<RoundRecord> = state
            .decisions
            .iter()
            .map(|(round, commit)| RoundRecord::Decided { round: round.clone(), commit: *commit })
            .collect();
        records.extend(state.round.as_ref().map(round::Round::staged_records).unwrap_or_default());
        for (round, acceptor) in &state.ballots {
            records.push(RoundRecord::Promised { round: round.clone(), ballot: acceptor.promised.clone() });
            if let Some((ballot, commit)) = &acceptor.accepted {
                records.push(RoundRecord::Accepted { round: round.clone(), ballot: ballot.clone(), commit: *commit });
            }
        }
        for record in &records {
            if let Ok(bytes) = round_record(record) {
                file.extend(bytes);
            }
        }
        Some(file)
    }

    /// Queues a new file for `group`: a snapshot of the document and the round records.
    pub(super) fn compact(&mut self, group: &str) {
        let Some(file) = self.compacted_file(group) else { return };
        if let Some(state) = self.groups.get_mut(group) {
            state.tail_changes = 0;
        }
        self.outputs.push_back(Output::Persist(PersistOp::Compact { group: group.to_owned(), file }));
    }
}

/// A fresh actor for the `count`-th reload of a group in this run: derived from the run's actor,
/// so it is unique to this node, this start and this reload.
fn reload_actor(actor: &ActorId, count: u64) -> ActorId {
    let mut hasher = Sha256::new();
    hasher.update(b"konorkestra/reload-actor/v1");
    hasher.update(actor.to_bytes());
    hasher.update(count.to_le_bytes());
    let digest: [u8; 32] = hasher.finalize().into();
    let mut fresh = [0u8; 16];
    fresh.copy_from_slice(&digest[..16]);
    ActorId::from(fresh)
}
