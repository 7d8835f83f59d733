//! Who gets a connection slot. A connection that has not said Hello holds no slot but counts
//! among the silent ones ([`UNGREETED_CONNECTIONS_MAX`]): past that, the oldest silent connection
//! of the user holding the most of them is closed, so one user's flood makes room from its own
//! connections. At Hello a connection takes a slot (at most `connections_max`) and, for users
//! other than konord's own and root, one of its user's ([`CONNECTIONS_PER_UID_MAX`](crate::limits::CONNECTIONS_PER_UID_MAX) by default).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::LocalApiStats;
use crate::limits::UNGREETED_CONNECTIONS_MAX;

/// A user as the socket's peer credentials name it (`None`: the OS did not say).
pub(super) type Uid = Option<u32>;

/// Slots held per capped user.
type PerUid = Arc<Mutex<HashMap<Uid, usize>>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks, so a poisoned one still holds sound data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connections that have not said Hello yet, oldest first.
#[derive(Debug, Default)]
pub(super) struct Ungreeted {
    waiting: Mutex<VecDeque<Silent>>,
}

#[derive(Debug)]
struct Silent {
    connection: u64,
    uid: Uid,
    /// Wakes the session to close the connection.
    close: Arc<Notify>,
}

impl Ungreeted {
    /// Registers a new connection as not greeted yet, closing silent ones if there are too
    /// many. Returns the signal that closes this one.
    pub(super) fn expect_hello(&self, connection: u64, uid: Uid, stats: &LocalApiStats) -> Arc<Notify> {
        let close = Arc::new(Notify::new());
        let mut waiting = lock(&self.waiting);
        while waiting.len() >= UNGREETED_CONNECTIONS_MAX {
            let Some(victim) = oldest_of_busiest_uid(&waiting) else { break };
            if let Some(silent) = waiting.remove(victim) {
                // A stored permit: the session sees it even if it is not waiting yet.
                silent.close.notify_one();
                stats.ungreeted_closed.fetch_add(1, Ordering::Relaxed);
            }
        }
        waiting.push_back(Silent { connection, uid, close: close.clone() });
        close
    }

    /// The connection said Hello (or ended): it no longer counts as silent.
    pub(super) fn greeted(&self, connection: u64) {
        lock(&self.waiting).retain(|silent| silent.connection != connection);
    }
}

/// The index of the oldest silent connection of the user that holds the most of them (the
/// oldest overall when users tie).
fn oldest_of_busiest_uid(waiting: &VecDeque<Silent>) -> Option<usize> {
    let mut counts: HashMap<Uid, usize> = HashMap::new();
    for silent in waiting {
        *counts.entry(silent.uid).or_default() += 1;
    }
    let most = counts.values().copied().max()?;
    waiting.iter().position(|silent| counts.get(&silent.uid) == Some(&most))
}

/// The connection slots, taken at Hello.
#[derive(Debug)]
pub(super) struct Slots {
    slots: Arc<Semaphore>,
    max: usize,
    per_uid_max: usize,
    uncapped: Vec<u32>,
    per_uid: PerUid,
}

/// A connection's slot, given back when dropped.
#[derive(Debug)]
pub(super) struct Slot {
    _slot: OwnedSemaphorePermit,
    /// The user whose count this slot holds, if it is capped.
    capped: Option<(Uid, PerUid)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((uid, per_uid)) = &self.capped {
            let mut counts = lock(per_uid);
            if let Some(count) = counts.get_mut(uid) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(uid);
                }
            }
        }
    }
}

impl Slots {
    pub(super) fn new(max: usize, per_uid_max: usize, uncapped: Vec<u32>) -> Slots {
        Slots { slots: Arc::new(Semaphore::new(max)), max, per_uid_max, uncapped, per_uid: Arc::default() }
    }

    /// Takes a slot for a connection of `uid`, or says why not.
    pub(super) fn admit(&self, uid: Uid) -> Result<Slot, String> {
        let capped = !uid.is_some_and(|uid| self.uncapped.contains(&uid));
        let mut counts = lock(&self.per_uid);
        if capped && counts.get(&uid).copied().unwrap_or(0) >= self.per_uid_max {
            let user = uid.map_or_else(|| "an unknown user".to_owned(), |uid| format!("uid {uid}"));
            return Err(format!(
                "too many connections from {user}: konord serves at most {} per user other than its own and root; \
                 close idle clients and retry",
                self.per_uid_max
            ));
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Err(format!(
                "too many connections: konord serves {} at most; close idle clients and retry",
                self.max
            ));
        };
        let capped = capped.then(|| {
            *counts.entry(uid).or_default() += 1;
            (uid, self.per_uid.clone())
        });
        Ok(Slot { _slot: slot, capped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_past_its_cap_is_refused_and_its_own_and_root_are_not_capped() {
        let slots = Slots::new(6, 2, vec![0, 1000]);
        let first = slots.admit(Some(7)).unwrap();
        let _second = slots.admit(Some(7)).unwrap();
        let refusal = slots.admit(Some(7)).unwrap_err();
        assert!(refusal.contains("from uid 7") && refusal.contains("at most 2 per user"), "{refusal}");
        assert!(slots.admit(None).is_ok(), "another user is not affected");
        drop(first);
        assert!(slots.admit(Some(7)).is_ok(), "a slot given back is free again");
        let own: Vec<Slot> = (0..4).map(|_| slots.admit(Some(1000)).unwrap()).collect();
        assert_eq!(own.len(), 4);
        let _root = slots.admit(Some(0)).unwrap();
        let full = slots.admit(Some(0)).unwrap_err();
        assert!(full.contains("konord serves 6 at most"), "{full}");
    }

    #[test]
    fn a_flood_of_silent_connections_makes_room_from_its_own_user() {
        let stats = LocalApiStats::default();
        let ungreeted = Ungreeted::default();
        let patient = ungreeted.expect_hello(1, Some(1000), &stats);
        let flood: Vec<Arc<Notify>> = (2..2 + UNGREETED_CONNECTIONS_MAX as u64 * 3)
            .map(|n| ungreeted.expect_hello(n, Some(66), &stats))
            .collect();
        assert_eq!(stats.ungreeted_closed.load(Ordering::Relaxed), UNGREETED_CONNECTIONS_MAX as u64 * 2 + 1);
        // The flooding user's oldest connections were closed, not the other user's.
        let waiting = lock(&ungreeted.waiting);
        assert!(waiting.iter().any(|silent| silent.connection == 1), "the other user's connection stays");
        assert_eq!(waiting.len(), UNGREETED_CONNECTIONS_MAX);
        drop(waiting);
        drop((patient, flood));
    }
}
