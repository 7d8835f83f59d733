//! A group's settings as the SDK hands them out: [`Settings`] (dotted key -> JSON value), a
//! [`Snapshot`] with its freshness, typed reads that nest dotted keys into objects, and
//! [`apply_event`] to follow a watch.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::SdkError;
use crate::protocol::{Freshness, WatchEvent};

/// A group's settings: dotted key -> JSON value.
pub type Settings = BTreeMap<String, Value>;

/// A snapshot of a group's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Group.
    pub group: String,
    /// Dotted key -> value.
    pub settings: Settings,
    /// Content hash (full hex).
    pub content_hash: String,
    /// Revision, version and age of the state served.
    pub freshness: Freshness,
}

impl Snapshot {
    /// One setting.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.settings.get(key)
    }

    /// The settings deserialized into `T`, dotted keys nested into objects
    /// (`"db.pool" = 10` becomes `{"db": {"pool": 10}}`).
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, SdkError> {
        typed_settings(&self.group, &self.settings)
    }
}

pub(crate) fn typed_settings<T: DeserializeOwned>(group: &str, settings: &Settings) -> Result<T, SdkError> {
    serde_json::from_value(nest_settings(settings)?).map_err(|error| SdkError::Decode {
        what: format!("the settings of group `{group}` as {}", std::any::type_name::<T>()),
        detail: error.to_string(),
    })
}

/// Nests dotted keys into JSON objects: `{"db.pool": 10, "name": "x"}` becomes
/// `{"db": {"pool": 10}, "name": "x"}`. A key under another key that holds an object is merged
/// into that object; a key under one that holds anything else, or set twice, is an error.
pub fn nest_settings(settings: &Settings) -> Result<Value, SdkError> {
    let mut root = Map::new();
    for (key, value) in settings {
        let conflict = || SdkError::Decode {
            what: format!("key `{key}`"),
            detail: "a shorter key already holds a value at this path, so the keys cannot nest".to_owned(),
        };
        let mut node = &mut root;
        let mut segments = key.split('.').peekable();
        while let Some(segment) = segments.next() {
            if segments.peek().is_none() {
                if node.contains_key(segment) {
                    return Err(conflict());
                }
                node.insert(segment.to_owned(), value.clone());
                break;
            }
            match node.entry(segment.to_owned()).or_insert_with(|| Value::Object(Map::new())) {
                Value::Object(child) => node = child,
                _ => return Err(conflict()),
            }
        }
    }
    Ok(Value::Object(root))
}

/// Applies a watch event to settings: a resync replaces them, a change sets and removes keys.
pub fn apply_event(settings: &mut Settings, event: &WatchEvent) {
    match event {
        WatchEvent::Resync { settings: all, .. } => settings.clone_from(all),
        WatchEvent::Change { set, removed, .. } => {
            for (key, value) in set {
                settings.insert(key.clone(), value.clone());
            }
            for key in removed {
                settings.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[test]
    fn nests_dotted_keys_into_objects() {
        let settings: Settings = [
            ("db.pool".to_owned(), json!(10)),
            ("db.host".to_owned(), json!("h")),
            ("name".to_owned(), json!("x")),
            ("tls".to_owned(), json!({"on": true})),
            ("tls.ca".to_owned(), json!("/ca.pem")),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            nest_settings(&settings).unwrap(),
            json!({"db": {"pool": 10, "host": "h"}, "name": "x", "tls": {"on": true, "ca": "/ca.pem"}})
        );
    }

    #[test]
    fn refuses_keys_that_cannot_nest() {
        let settings: Settings = [("db".to_owned(), json!(1)), ("db.pool".to_owned(), json!(10))].into_iter().collect();
        let error = nest_settings(&settings).unwrap_err();
        assert!(error.to_string().contains("`db.pool`"), "{error}");
        let settings: Settings =
            [("db".to_owned(), json!({"pool": 1})), ("db.pool".to_owned(), json!(10))].into_iter().collect();
        assert!(nest_settings(&settings).is_err());
    }

    #[test]
    fn typed_snapshot_fills_a_struct() {
        #[derive(Debug, Deserialize, PartialEq)]
        struct Config {
            db: Db,
            name: String,
        }
        #[derive(Debug, Deserialize, PartialEq)]
        struct Db {
            pool: u32,
        }
        let snapshot = Snapshot {
            group: "app".into(),
            settings: [("db.pool".to_owned(), json!(10)), ("name".to_owned(), json!("x"))].into_iter().collect(),
            content_hash: String::new(),
            freshness: Freshness::default(),
        };
        assert_eq!(snapshot.typed::<Config>().unwrap(), Config { db: Db { pool: 10 }, name: "x".into() });
        let error = snapshot.typed::<Db>().unwrap_err();
        assert!(matches!(error, SdkError::Decode { .. }), "{error:?}");
    }

    #[test]
    fn events_apply_to_settings() {
        let mut settings = Settings::new();
        let resync = WatchEvent::Resync {
            group: "app".into(),
            revision: 1,
            version: "v1".into(),
            settings: [("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))].into_iter().collect(),
        };
        apply_event(&mut settings, &resync);
        let change = WatchEvent::Change {
            group: "app".into(),
            revision: 2,
            version: "v2".into(),
            set: [("a".to_owned(), json!(3))].into_iter().collect(),
            removed: vec!["b".into()],
        };
        apply_event(&mut settings, &change);
        assert_eq!(settings, [("a".to_owned(), json!(3))].into_iter().collect::<Settings>());
    }
}
