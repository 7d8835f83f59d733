//! Revisions and the ring of recent notifications: every change a group takes here advances
//! its revision and tells local watchers what it set and removed; a watcher resuming at a
//! revision gets every notification since, or `Resync` when that history is no longer kept
//! (never a silent gap).

use std::collections::{BTreeMap, BTreeSet};

use super::{Notification, Output, Replica};
use crate::limits::WATCH_EVENTS_KEPT;

/// Outcome of a read of a group's recent notifications.
#[derive(Debug, Clone, PartialEq)]
pub enum EventsSince {
    /// Every notification after the revision asked for, in order (possibly none).
    Events(Vec<Notification>),
    /// History that old is not kept: the watcher must resync from a snapshot.
    Resync,
}

impl Replica {
    /// The notifications after `revision` for a watcher resuming there, or `Resync` when the
    /// oldest kept notification starts after it (SPEC F13: never a silent gap).
    pub fn events_since(&self, group: &str, revision: u64) -> Option<EventsSince> {
        let state = self.groups.get(group)?;
        if revision == state.revision {
            return Some(EventsSince::Events(Vec::new()));
        }
        if revision > state.revision {
            // This node's revision went down (a damaged tail was cut, the group re-joined):
            // the watcher saw a history this node no longer has, so it must resync.
            return Some(EventsSince::Resync);
        }
        let oldest_from = state.events.front().map_or(state.last_told, |(from, _)| *from);
        if revision < oldest_from {
            return Some(EventsSince::Resync);
        }
        let events = state
            .events
            .iter()
            .filter(|(_, event)| event.revision > revision)
            .map(|(_, event)| event.clone())
            .collect();
        Some(EventsSince::Events(events))
    }

    /// Advances the revision by `changes`, notifies watchers of `keys`, keeps the event ring.
    /// `pushed`: the changes came from a peer. A gated group (SPEC F14) tells its watchers only
    /// what its served settings did: a change that moves the served version is one event with
    /// the served diff; one that does not (a write not released) still advances the revision,
    /// so a strong group's revision stays its change count, but is a quiet notification that
    /// only the read view takes.
    pub(super) fn record_changes(&mut self, group: &str, changes: usize, keys: BTreeSet<String>, pushed: bool) -> u64 {
        let Some(state) = self.groups.get_mut(group) else {
            return 0;
        };
        state.tail_changes += changes;
        state.changes = state.changes.saturating_add(changes as u64);
        state.revision = state.revision.saturating_add(changes as u64);
        let (set, removed) = if state.doc.is_gated() {
            let served = state.doc.refresh_served();
            debug_assert!(state.doc.served_matches_document(), "{group}: served version out of date");
            let Some(served) = served else {
                let quiet = Notification {
                    group: group.to_owned(),
                    revision: state.revision,
                    version: state.doc.served_label(),
                    set: BTreeMap::new(),
                    removed: Vec::new(),
                    pushed,
                    quiet: true,
                };
                self.outputs.push_back(Output::Notify(quiet));
                return state.revision;
            };
            (served.set, served.removed)
        } else {
            let mut set = BTreeMap::new();
            let mut removed = Vec::new();
            for key in keys {
                match state.doc.get(&key) {
                    Some(value) => {
                        set.insert(key, value.clone());
                    }
                    None => removed.push(key),
                }
            }
            (set, removed)
        };
        let notification = Notification {
            group: group.to_owned(),
            revision: state.revision,
            version: state.doc.served_label(),
            set,
            removed,
            pushed,
            quiet: false,
        };
        state.events.push_back((state.last_told, notification.clone()));
        state.last_told = state.revision;
        while state.events.len() > WATCH_EVENTS_KEPT {
            state.events.pop_front();
        }
        self.outputs.push_back(Output::Notify(notification));
        state.revision
    }
}
