//! Masking secret values (issue 17): what a caller that may not reveal them
//! ([`crate::api::authorize::reveals`]) reads in place of each value of a key marked secret. One
//! function per kind of answer, used by both doors through the daemon (answers, watch events)
//! and by the read view (`get` without a hop to the daemon), so no path serves a secret value
//! to such a caller. Pure: the caller hands in the group's marks.
//!
//! A key is secret when it, or the base key of an overlay (`KEY@SELECTOR`), is marked. Every
//! value of it is masked, at every version (older values, conflicts' losers, both sides of a
//! diff). Hashes of whole settings are masked too: a hash would confirm a guessed secret. A
//! snapshot carries the hash of what it holds, so a client checking it agrees with it.

use std::collections::{BTreeMap, BTreeSet};

use konor_sdk::protocol::{MASKED, Response, WatchEvent};
use serde_json::Value;

/// Whether `key` holds a secret value under `marks`.
pub fn is_secret(marks: &BTreeSet<String>, key: &str) -> bool {
    marks.contains(konor_crdt::overlay::base_key(key))
}

fn masked() -> Value {
    Value::String(MASKED.to_owned())
}

/// `settings` with every secret value masked; true when one was.
fn mask_settings(marks: &BTreeSet<String>, settings: &mut BTreeMap<String, Value>) -> bool {
    let mut any = false;
    for (key, value) in settings.iter_mut() {
        if is_secret(marks, key) {
            *value = masked();
            any = true;
        }
    }
    any
}

/// `response` as a caller that may not reveal secrets sees it, for a group marked `marks`.
pub fn mask_response(marks: &BTreeSet<String>, response: Response) -> Response {
    if marks.is_empty() {
        return response;
    }
    match response {
        Response::Value { group, key, value, freshness } => {
            let value = if is_secret(marks, &key) { value.map(|_| masked()) } else { value };
            Response::Value { group, key, value, freshness }
        }
        Response::Snapshot { group, mut settings, content_hash, freshness } => {
            let content_hash = if mask_settings(marks, &mut settings) {
                konor_sdk::protocol::content_hash(&settings)
            } else {
                content_hash
            };
            Response::Snapshot { group, settings, content_hash, freshness }
        }
        Response::Show { group, mut version, mut settings } => {
            mask_settings(marks, &mut settings);
            version.content_hash.clear();
            Response::Show { group, version, settings }
        }
        Response::History { group, mut versions } => {
            for version in &mut versions {
                version.content_hash.clear();
            }
            Response::History { group, versions }
        }
        Response::Diff { group, mut added, mut removed, mut changed } => {
            mask_settings(marks, &mut added);
            mask_settings(marks, &mut removed);
            for (key, (old, new)) in changed.iter_mut() {
                if is_secret(marks, key) {
                    (*old, *new) = (masked(), masked());
                }
            }
            Response::Diff { group, added, removed, changed }
        }
        Response::Conflicts { group, mut conflicts } => {
            for row in conflicts.iter_mut().filter(|row| is_secret(marks, &row.key)) {
                row.winner = masked();
                for (loser, _) in &mut row.losers {
                    *loser = masked();
                }
            }
            Response::Conflicts { group, conflicts }
        }
        other => other,
    }
}

/// `event` as a watcher that may not reveal secrets sees it; `None` when it holds no secret
/// value (the event every watcher gets will do).
pub fn mask_event(marks: &BTreeSet<String>, event: &WatchEvent) -> Option<WatchEvent> {
    let touches = |settings: &BTreeMap<String, Value>| settings.keys().any(|key| is_secret(marks, key));
    match event {
        WatchEvent::Change { set, .. } | WatchEvent::Resync { settings: set, .. } if !touches(set) => None,
        WatchEvent::Change { group, revision, version, set, removed } => {
            let mut set = set.clone();
            mask_settings(marks, &mut set);
            Some(WatchEvent::Change {
                group: group.clone(),
                revision: *revision,
                version: version.clone(),
                set,
                removed: removed.clone(),
            })
        }
        WatchEvent::Resync { group, revision, version, settings } => {
            let mut settings = settings.clone();
            mask_settings(marks, &mut settings);
            Some(WatchEvent::Resync { group: group.clone(), revision: *revision, version: version.clone(), settings })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use konor_sdk::protocol::{ConflictRow, Freshness, VersionRow};
    use serde_json::json;

    fn marks() -> BTreeSet<String> {
        BTreeSet::from(["db.password".to_owned()])
    }

    fn settings() -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("db.password".to_owned(), json!("hunter2")),
            ("db.password@env=dev".to_owned(), json!("devpass")),
            ("db.user".to_owned(), json!("app")),
        ])
    }

    fn row() -> VersionRow {
        VersionRow {
            label: "v2".into(),
            author: "ops".into(),
            time_ms: 1,
            message: String::new(),
            kind: "set".into(),
            content_hash: "0123456789ab".into(),
            parents: Vec::new(),
            secret: vec!["db.password".into()],
        }
    }

    /// Every answer that carries values, masked: no secret value is left in its JSON, and the
    /// other values are untouched.
    #[test]
    fn no_answer_that_carries_values_keeps_a_secret_one() {
        let freshness = Freshness::default();
        let answers = [
            Response::Value {
                group: "app".into(),
                key: "db.password".into(),
                value: Some(json!("hunter2")),
                freshness: freshness.clone(),
            },
            Response::Snapshot { group: "app".into(), settings: settings(), content_hash: "x".into(), freshness },
            Response::Show { group: "app".into(), version: row(), settings: settings() },
            Response::Diff {
                group: "app".into(),
                added: settings(),
                removed: settings(),
                changed: BTreeMap::from([("db.password".to_owned(), (json!("hunter2"), json!("devpass")))]),
            },
            Response::Conflicts {
                group: "app".into(),
                conflicts: vec![ConflictRow {
                    key: "db.password".into(),
                    winner: json!("hunter2"),
                    winner_version: None,
                    losers: vec![(json!("devpass"), None)],
                }],
            },
            Response::History { group: "app".into(), versions: vec![row()] },
        ];
        for answer in answers {
            let kind = format!("{answer:?}").split_whitespace().next().unwrap_or_default().to_owned();
            let text = serde_json::to_string(&mask_response(&marks(), answer.clone())).unwrap();
            for secret in ["hunter2", "devpass", "0123456789ab"] {
                assert!(!text.contains(secret), "{kind} keeps {secret}: {text}");
            }
            assert_eq!(
                text.contains("\"app\""),
                serde_json::to_string(&answer).unwrap().contains("\"app\""),
                "{kind}: other values stay"
            );
            let revealed = serde_json::to_string(&mask_response(&BTreeSet::new(), answer.clone())).unwrap();
            assert_eq!(revealed, serde_json::to_string(&answer).unwrap(), "{kind}: no marks, nothing masked");
        }
    }

    #[test]
    fn a_masked_snapshot_carries_the_hash_of_what_it_holds() {
        let answer = Response::Snapshot {
            group: "app".into(),
            settings: settings(),
            content_hash: konor_sdk::protocol::content_hash(&settings()),
            freshness: Freshness::default(),
        };
        let Response::Snapshot { settings, content_hash, .. } = mask_response(&marks(), answer) else { panic!() };
        assert_eq!(settings["db.password"], json!(MASKED));
        assert_eq!(settings["db.user"], json!("app"));
        assert_eq!(content_hash, konor_sdk::protocol::content_hash(&settings));
    }

    #[test]
    fn events_are_masked_only_when_they_carry_a_secret_value() {
        let change = |set: BTreeMap<String, Value>| WatchEvent::Change {
            group: "app".into(),
            revision: 3,
            version: "v3".into(),
            set,
            removed: vec!["db.password".into()],
        };
        let plain = change(BTreeMap::from([("db.user".to_owned(), json!("app"))]));
        assert_eq!(mask_event(&marks(), &plain), None);
        let Some(WatchEvent::Change { set, removed, .. }) = mask_event(&marks(), &change(settings())) else {
            panic!("masked")
        };
        assert_eq!(set["db.password"], json!(MASKED));
        assert_eq!(set["db.password@env=dev"], json!(MASKED));
        assert_eq!(set["db.user"], json!("app"));
        assert_eq!(removed, ["db.password"], "a removal shows no value");
        let resync =
            WatchEvent::Resync { group: "app".into(), revision: 3, version: "v3".into(), settings: settings() };
        let Some(WatchEvent::Resync { settings, .. }) = mask_event(&marks(), &resync) else { panic!("masked") };
        assert_eq!(settings["db.password"], json!(MASKED));
    }
}
