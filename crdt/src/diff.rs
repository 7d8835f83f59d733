//! The difference between two sets of settings: added, removed and changed keys.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::settings::Settings;

/// A key whose value differs between the two sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChangedKey {
    /// The key.
    pub key: String,
    /// Its value on the old side.
    pub old: Value,
    /// Its value on the new side.
    pub new: Value,
}

/// What turns the old settings into the new ones, keys in order.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct SettingsDiff {
    /// Keys only on the new side.
    pub added: Vec<(String, Value)>,
    /// Keys only on the old side.
    pub removed: Vec<(String, Value)>,
    /// Keys on both sides with different values.
    pub changed: Vec<ChangedKey>,
}

impl SettingsDiff {
    /// Compares `old` with `new` in one merge pass over both key orders.
    pub fn between(old: &Settings, new: &Settings) -> SettingsDiff {
        let mut diff = SettingsDiff::default();
        let mut old_entries = old.entries().peekable();
        let mut new_entries = new.entries().peekable();
        loop {
            match (old_entries.peek(), new_entries.peek()) {
                (None, None) => break,
                (Some((key, entry)), None) => {
                    diff.removed.push(((*key).to_owned(), entry.value.clone()));
                    old_entries.next();
                }
                (None, Some((key, entry))) => {
                    diff.added.push(((*key).to_owned(), entry.value.clone()));
                    new_entries.next();
                }
                (Some((old_key, old_entry)), Some((new_key, new_entry))) => match old_key.cmp(new_key) {
                    std::cmp::Ordering::Less => {
                        diff.removed.push(((*old_key).to_owned(), old_entry.value.clone()));
                        old_entries.next();
                    }
                    std::cmp::Ordering::Greater => {
                        diff.added.push(((*new_key).to_owned(), new_entry.value.clone()));
                        new_entries.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if old_entry.canonical != new_entry.canonical {
                            diff.changed.push(ChangedKey {
                                key: (*old_key).to_owned(),
                                old: old_entry.value.clone(),
                                new: new_entry.value.clone(),
                            });
                        }
                        old_entries.next();
                        new_entries.next();
                    }
                },
            }
        }
        diff
    }

    /// True when both sides hold the same settings.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// One line per key, sorted by key: `+ key = value`, `- key = value`, `~ key: old -> new`.
impl fmt::Display for SettingsDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines: Vec<(&str, String)> = Vec::new();
        for (key, value) in &self.added {
            lines.push((key, format!("+ {key} = {value}")));
        }
        for (key, value) in &self.removed {
            lines.push((key, format!("- {key} = {value}")));
        }
        for changed in &self.changed {
            lines.push((&changed.key, format!("~ {}: {} -> {}", changed.key, changed.old, changed.new)));
        }
        lines.sort();
        if lines.is_empty() {
            return writeln!(f, "(no differences)");
        }
        for (_, line) in lines {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use serde_json::json;

    fn settings(pairs: &[(&str, Value)]) -> Settings {
        let mut s = Settings::new();
        for (k, v) in pairs {
            s.insert((*k).to_owned(), v.clone());
        }
        s
    }

    #[test]
    fn diff_lists_added_removed_and_changed_keys() {
        let old = settings(&[("a", json!(1)), ("b", json!("x")), ("d", json!({"k": [1]}))]);
        let new = settings(&[("b", json!("y")), ("c", json!(true)), ("d", json!({"k": [1]}))]);
        let diff = SettingsDiff::between(&old, &new);
        expect![[r#"
            - a = 1
            ~ b: "x" -> "y"
            + c = true
        "#]]
        .assert_eq(&diff.to_string());
        assert!(SettingsDiff::between(&new, &new).is_empty());
        let back = SettingsDiff::between(&new, &old);
        assert_eq!(back.added.len(), 1);
        assert_eq!(back.removed.len(), 1);
        assert_eq!(back.changed[0].old, json!("y"));
    }
}
