//! Anti-entropy: a sync session (Automerge sync) per group and member. A session starts when a
//! member's gossiped heads digest has differed from ours for `ANTI_ENTROPY_DELAY_MS` (or when a
//! push left changes waiting for their dependencies), runs until the protocol has nothing more
//! to say (its state is then persisted), and is reset after `SYNC_SESSION_TIMEOUT_MS` without an
//! answer or when the member goes down or comes back. What a session applies goes through
//! `after_remote_apply` (push.rs).

use super::{MembershipView, NodeId, Output, PeerState, PersistOp, Replica};
use crate::exchange::SyncPeer;
use crate::limits::{ANTI_ENTROPY_DELAY_MS, SYNC_SESSION_TIMEOUT_MS};
use crate::peer_message::PeerMessage;
use crate::time::Millis;

/// This node's side of the sync protocol with one member for one group.
#[derive(Debug, Default)]
pub(super) struct SyncSession {
    pub(super) peer: SyncPeer,
    /// When we last sent a message and still await an answer.
    pub(super) in_flight_since: Option<Millis>,
    /// Since when the peer's gossiped digest differs from ours.
    pub(super) diverged_since: Option<Millis>,
}

impl Replica {
    /// Takes a sync message from `from` and answers it.
    pub(super) fn handle_sync(&mut self, group: &str, from: NodeId, message: &[u8]) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let session = state.sync.entry(from.clone()).or_default();
        session.in_flight_since = None;
        let result = state.doc.receive_sync_message(&mut session.peer, message);
        match result {
            Ok(applied) => self.after_remote_apply(group, applied),
            Err(failure) => {
                let error = failure.error;
                // What applied before the failure is persisted and announced all the same.
                self.after_remote_apply(group, failure.applied);
                if let Some(session) = self.groups.get_mut(group).and_then(|s| s.sync.get_mut(&from)) {
                    session.peer.reset_after_disconnect();
                }
                return self.drop_message(from, error.to_string());
            }
        }
        self.continue_sync(group, &from);
    }

    /// Sends the next sync message to `peer` if the protocol has one; persists the state when
    /// the session has nothing more to say.
    fn continue_sync(&mut self, group: &str, peer: &NodeId) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        let session = state.sync.entry(peer.clone()).or_default();
        match state.doc.sync_message(&mut session.peer) {
            Some(message) => {
                session.in_flight_since = Some(now);
                self.outputs.push_back(Output::Send {
                    to: peer.clone(),
                    message: PeerMessage::Sync { group: group.to_owned(), message },
                });
            }
            None => {
                let encoded = session.peer.encode();
                self.outputs.push_back(Output::Persist(PersistOp::SyncState {
                    group: group.to_owned(),
                    peer: peer.clone(),
                    state: encoded,
                }));
            }
        }
    }

    /// Starts a session with `peer` unless one is in flight.
    pub(super) fn start_sync(&mut self, group: &str, peer: &NodeId) {
        let Some(state) = self.groups.get_mut(group) else { return };
        let session = state.sync.entry(peer.clone()).or_default();
        if session.in_flight_since.is_some() {
            return;
        }
        session.diverged_since = None;
        self.continue_sync(group, peer);
    }

    /// Notes, per group and live member, since when its gossiped digest differs from ours.
    pub(super) fn mark_divergence(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.groups.keys().cloned().collect();
        for name in names {
            let members = self.members(&name);
            let Some(state) = self.groups.get_mut(&name) else { continue };
            let ours = state.doc.heads_digest();
            for (peer, live, gossip) in members {
                let session = state.sync.entry(peer).or_default();
                if live && gossip.digest != ours {
                    session.diverged_since.get_or_insert(now);
                } else {
                    session.diverged_since = None;
                }
            }
        }
    }

    /// Starts the sessions of members whose digest stayed different, and resets sessions that
    /// stalled.
    pub(super) fn run_anti_entropy(&mut self) {
        let now = self.now;
        let mut to_start = Vec::new();
        for (name, state) in self.groups.iter_mut() {
            for (peer, session) in state.sync.iter_mut() {
                if let Some(since) = session.in_flight_since
                    && now.saturating_sub(since).0 >= SYNC_SESSION_TIMEOUT_MS
                {
                    session.peer.reset_after_disconnect();
                    session.in_flight_since = None;
                }
                if let Some(since) = session.diverged_since
                    && now.saturating_sub(since).0 >= ANTI_ENTROPY_DELAY_MS
                    && session.in_flight_since.is_none()
                {
                    to_start.push((name.clone(), peer.clone()));
                }
            }
        }
        for (group, peer) in to_start {
            self.start_sync(&group, &peer);
        }
    }

    /// A peer that went down or came back starts its sync sessions afresh (FACTS: lost
    /// messages stall the protocol unless the state is reset).
    pub(super) fn reset_sessions_of_changed_peers(&mut self, previous: &MembershipView) {
        for state in self.groups.values_mut() {
            for (peer, session) in state.sync.iter_mut() {
                let was_live = previous.peers.get(peer).is_some_and(PeerState::is_live);
                let is_live = self.membership.peers.get(peer).is_some_and(PeerState::is_live);
                if was_live != is_live {
                    session.peer.reset_after_disconnect();
                    session.in_flight_since = None;
                }
            }
        }
    }
}
