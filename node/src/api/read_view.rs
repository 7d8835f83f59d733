//! The read view: what the daemon publishes for `get` so socket sessions answer it without a
//! hop to the daemon task. It holds, per group, exactly what watchers have been told: it is
//! updated from the replica's `Notify` outputs, which come after the change's fsync and before
//! any reply that depends on it, so a client that got `Committed` reads its own write, and a
//! get never serves a change that is not durable here. Freshness flags (fencing) are refreshed
//! after every batch of events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError, RwLock};

use konor_crdt::replica::Notification;
use konor_sdk::protocol::{Freshness, Response};
use serde_json::Value;
use tokio::time::Instant;

/// One group as served to readers.
#[derive(Debug, Clone)]
pub struct GroupRead {
    /// Key -> value, as of `revision`.
    pub settings: BTreeMap<String, Value>,
    /// This node's revision of the group.
    pub revision: u64,
    /// Label of the newest version served.
    pub version: String,
    /// When this node last applied a change to the group.
    pub changed: Instant,
    /// The group is fenced (strong, in doubt or behind): reads are flagged stale.
    pub stale: bool,
    /// Why it is stale.
    pub stale_reason: Option<String>,
    /// A strong group served fresh only until its read lease runs out: reads after this
    /// instant are stale even before the daemon settles the view again.
    pub fresh_until: Option<Instant>,
    /// The group's fencing policy is `block`: a stale read goes to the daemon, which waits.
    pub block: bool,
    /// Keys marked secret (issue 17): never fewer than the marks of the values held.
    pub secrets: BTreeSet<String>,
}

/// A group's freshness as the daemon settles it after each batch.
#[derive(Debug, Clone, Default)]
pub struct Fresh {
    /// Why reads are stale, or `None`.
    pub stale_reason: Option<String>,
    /// Until when the freshness proof holds (strong groups).
    pub fresh_until: Option<Instant>,
    /// Stale reads block (fencing policy `block`).
    pub block: bool,
}

impl GroupRead {
    /// Why a read now is stale, if it is.
    fn stale_now(&self) -> Option<String> {
        if self.stale {
            return Some(self.stale_reason.clone().unwrap_or_else(|| "fenced".to_owned()));
        }
        match self.fresh_until {
            Some(until) if Instant::now() >= until => {
                Some("the read lease ran out: no recent contact with a majority of the configuration".to_owned())
            }
            _ => None,
        }
    }
}

/// Shared between the daemon (the only writer) and the socket sessions (readers).
#[derive(Debug, Clone, Default)]
pub struct ReadView(Arc<RwLock<BTreeMap<String, GroupRead>>>);

impl ReadView {
    /// Answers a get from the view, the value masked for a caller that may not `reveal`
    /// secrets; `None` when the group is not (yet) in it, so the caller asks the daemon, which
    /// knows whether the group exists.
    pub fn get(&self, group: &str, key: &str, reveal: bool) -> Option<Response> {
        let groups = self.0.read().unwrap_or_else(PoisonError::into_inner);
        let read = groups.get(group)?;
        let stale_reason = read.stale_now();
        if stale_reason.is_some() && read.block {
            // The daemon holds the read until the node is fresh again (fencing policy block).
            return None;
        }
        let secret = !reveal && crate::api::secret_mask::is_secret(&read.secrets, key);
        Some(Response::Value {
            group: group.to_owned(),
            key: key.to_owned(),
            value: read.settings.get(key).map(|value| {
                if secret { Value::String(konor_sdk::protocol::MASKED.to_owned()) } else { value.clone() }
            }),
            freshness: Freshness {
                revision: read.revision,
                version: read.version.clone(),
                age_ms: read.changed.elapsed().as_millis() as u64,
                stale: stale_reason.is_some(),
                stale_reason,
            },
        })
    }

    /// Applies one notification (a change the watchers are told about), if the group is in the
    /// view and the notification follows what it holds. `marks` are the group's secret keys as
    /// the replica holds them now, which include those of the change.
    pub fn apply(&self, notification: &Notification, marks: &BTreeSet<String>) {
        let mut groups = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let Some(read) = groups.get_mut(&notification.group) else { return };
        if notification.revision <= read.revision {
            return;
        }
        // Marks only grow: the view never unmasks a key it masked (a reload that dropped a
        // change replaces the group whole).
        if !read.secrets.is_superset(marks) {
            read.secrets.extend(marks.iter().cloned());
        }
        for key in &notification.removed {
            read.settings.remove(key);
        }
        for (key, value) in &notification.set {
            read.settings.insert(key.clone(), value.clone());
        }
        read.revision = notification.revision;
        read.version.clone_from(&notification.version);
        read.changed = Instant::now();
    }

    /// The revision the view holds for `group`.
    pub fn revision(&self, group: &str) -> Option<u64> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).get(group).map(|read| read.revision)
    }

    /// Puts a whole group in (a group that appeared, or one whose revision moved without a
    /// notification: load, join, repair).
    pub fn replace(&self, group: &str, read: GroupRead) {
        self.0.write().unwrap_or_else(PoisonError::into_inner).insert(group.to_owned(), read);
    }

    /// Takes a group out: gets go to the daemon until the next settle copies it whole (a
    /// failed append, a group removed).
    pub fn remove(&self, group: &str) {
        self.0.write().unwrap_or_else(PoisonError::into_inner).remove(group);
    }

    /// Sets every group's freshness as `fresh` says (no entry: fresh), and drops groups that
    /// are not in `present`.
    pub fn settle(&self, present: &[String], fresh: &BTreeMap<String, Fresh>) {
        let mut groups = self.0.write().unwrap_or_else(PoisonError::into_inner);
        groups.retain(|name, _| present.contains(name));
        for (name, read) in groups.iter_mut() {
            let state = fresh.get(name).cloned().unwrap_or_default();
            read.stale = state.stale_reason.is_some();
            read.stale_reason = state.stale_reason;
            read.fresh_until = state.fresh_until;
            read.block = state.block;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(revision: u64, set: &[(&str, i64)], removed: &[&str]) -> Notification {
        Notification {
            group: "app".into(),
            revision,
            version: format!("v{revision}"),
            set: set.iter().map(|(k, v)| ((*k).to_owned(), Value::from(*v))).collect(),
            removed: removed.iter().map(|k| (*k).to_owned()).collect(),
            pushed: false,
            quiet: false,
        }
    }

    fn empty(revision: u64) -> GroupRead {
        GroupRead {
            settings: BTreeMap::new(),
            revision,
            version: String::new(),
            changed: Instant::now(),
            stale: false,
            stale_reason: None,
            fresh_until: None,
            block: false,
            secrets: BTreeSet::new(),
        }
    }

    #[tokio::test]
    async fn notifications_update_the_view_in_order_and_old_ones_are_ignored() {
        let view = ReadView::default();
        assert!(view.get("app", "a", true).is_none(), "an unknown group is left to the daemon");
        view.replace("app", empty(1));
        let none = BTreeSet::new();
        view.apply(&notification(2, &[("a", 1), ("b", 2)], &[]), &none);
        view.apply(&notification(3, &[("a", 3)], &["b"]), &none);
        view.apply(&notification(3, &[("a", 99)], &[]), &none);
        let Some(Response::Value { value, freshness, .. }) = view.get("app", "a", true) else { panic!("no answer") };
        assert_eq!(value, Some(Value::from(3)));
        assert_eq!((freshness.revision, freshness.version.as_str()), (3, "v3"));
        let Some(Response::Value { value, .. }) = view.get("app", "b", true) else { panic!("no answer") };
        assert_eq!(value, None, "removed");
    }

    #[tokio::test]
    async fn a_secret_value_is_masked_for_a_caller_that_may_not_reveal_it() {
        let view = ReadView::default();
        view.replace("app", empty(1));
        let marks = BTreeSet::from(["a".to_owned()]);
        view.apply(&notification(2, &[("a", 1), ("b", 2)], &[]), &marks);
        let value = |key, reveal| match view.get("app", key, reveal) {
            Some(Response::Value { value, .. }) => value,
            other => panic!("{other:?}"),
        };
        assert_eq!(value("a", false), Some(Value::from(konor_sdk::protocol::MASKED)));
        assert_eq!(value("a", true), Some(Value::from(1)));
        assert_eq!(value("b", false), Some(Value::from(2)));
        assert_eq!(value("c", false), None, "an absent key stays absent");
    }

    #[tokio::test]
    async fn settle_flags_fenced_groups_and_drops_left_ones() {
        let view = ReadView::default();
        view.replace("app", empty(1));
        view.replace("old", empty(1));
        let fenced = Fresh { stale_reason: Some("in doubt".into()), ..Fresh::default() };
        view.settle(&["app".to_owned()], &BTreeMap::from([("app".to_owned(), fenced)]));
        let Some(Response::Value { freshness, .. }) = view.get("app", "a", true) else { panic!("no answer") };
        assert!(freshness.stale);
        assert_eq!(freshness.stale_reason.as_deref(), Some("in doubt"));
        assert!(view.get("old", "a", true).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapsed_lease_makes_reads_stale_without_waiting_for_a_settle() {
        let view = ReadView::default();
        view.replace("app", empty(1));
        let until = Instant::now() + std::time::Duration::from_millis(100);
        let lease = Fresh { fresh_until: Some(until), ..Fresh::default() };
        view.settle(&["app".to_owned()], &BTreeMap::from([("app".to_owned(), lease)]));
        let Some(Response::Value { freshness, .. }) = view.get("app", "a", true) else { panic!("no answer") };
        assert!(!freshness.stale);
        tokio::time::advance(std::time::Duration::from_millis(100)).await;
        let Some(Response::Value { freshness, .. }) = view.get("app", "a", true) else { panic!("no answer") };
        assert!(freshness.stale, "{freshness:?}");
        // With the block policy a stale read is left to the daemon.
        let blocking = Fresh { stale_reason: Some("in doubt".into()), block: true, ..Fresh::default() };
        view.settle(&["app".to_owned()], &BTreeMap::from([("app".to_owned(), blocking)]));
        assert!(view.get("app", "a", true).is_none());
    }
}
