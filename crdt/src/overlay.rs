//! Overlays (SPEC F29): overrides of some keys for the nodes whose labels match a selector
//! (`env=dev`), a base plus environment overlays as kustomize users expect. An overlay value is
//! a setting like any other, stored under `<key>@<selector>` (`db.pool@env=dev`,
//! `db.pool@env=dev,region=eu`: the selector's labels sorted, joined by `,`), so it is written,
//! spread, committed, versioned, diffed, shown and released with the rest of the settings: a
//! version holds its base and its overlays, and a release serves both. `@` and `=` never occur
//! in a key, so an overlay key cannot be mistaken for one.
//!
//! Each node resolves its own view ([`resolve`]): the base keys, then, for every overlay whose
//! selector its labels match, in the order of the selectors' text, the overlay's value in place
//! of its key's (the later selector wins a key two matching overlays set). Overlays are written
//! only in gated groups, where the served layer resolves them (docs/releases.md, "Overlays").

use std::collections::{BTreeMap, BTreeSet};

use crate::configuration::parse_selector;
use crate::error::KeyError;
use crate::key::validate_key;
use crate::settings::Settings;

/// What separates a key from its overlay's selector in a stored key.
pub const OVERLAY_MARK: char = '@';

/// The stored key of `key`'s value in the overlay of `selector`.
pub fn overlay_key(key: &str, selector: &BTreeMap<String, String>) -> String {
    format!("{key}{OVERLAY_MARK}{}", selector_text(selector))
}

/// A selector as stored: its labels sorted, `k=v` joined by `,`.
pub fn selector_text(selector: &BTreeMap<String, String>) -> String {
    selector.iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(",")
}

/// The key and the selector text of a stored overlay key; `None` for a base key.
pub fn split(stored: &str) -> Option<(&str, &str)> {
    stored.split_once(OVERLAY_MARK)
}

/// The key an overlay's stored key is of (`db.password` for `db.password@env=dev`); a base key
/// itself.
pub fn base_key(stored: &str) -> &str {
    split(stored).map_or(stored, |(key, _)| key)
}

/// Checks a stored key: a key, or a key with an overlay's selector in its stored form (labels
/// as `konord --label` takes them, at most [`crate::limits::RELEASE_SELECTOR_LABELS_MAX`],
/// sorted, the whole selector at most [`crate::limits::OVERLAY_SELECTOR_BYTES_MAX`] bytes).
pub fn validate_stored_key(stored: &str) -> Result<(), KeyError> {
    let Some((key, selector)) = split(stored) else { return validate_key(stored) };
    validate_key(key)?;
    let bad = |detail: String| KeyError::BadOverlay { key: stored.chars().take(200).collect(), detail };
    if selector.len() > crate::limits::OVERLAY_SELECTOR_BYTES_MAX {
        return Err(bad(format!("a selector is at most {} bytes", crate::limits::OVERLAY_SELECTOR_BYTES_MAX)));
    }
    let parsed = parse_selector(selector).map_err(bad)?;
    if parsed.is_empty() {
        return Err(bad("an overlay names at least one label".to_owned()));
    }
    if parsed.len() > crate::limits::RELEASE_SELECTOR_LABELS_MAX {
        return Err(bad(format!("a selector names at most {} labels", crate::limits::RELEASE_SELECTOR_LABELS_MAX)));
    }
    if selector_text(&parsed) != selector {
        return Err(bad(format!("the selector is stored sorted: {}", selector_text(&parsed))));
    }
    Ok(())
}

/// True when every label of the stored selector `selector` is in `labels` (a selector text,
/// `env=dev,region=eu`).
pub fn selector_within(selector: &str, labels: &str) -> bool {
    let (Ok(selector), Ok(labels)) = (parse_selector(selector), parse_selector(labels)) else { return false };
    selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// True when `settings` hold an overlay value.
pub fn has_overlays(settings: &Settings) -> bool {
    settings.iter().any(|(key, _)| key.contains(OVERLAY_MARK))
}

/// The distinct selectors of the overlays in `settings`, in order.
pub fn selectors(settings: &Settings) -> BTreeSet<&str> {
    settings.entries().filter_map(|(key, _)| split(key).map(|(_, selector)| selector)).collect()
}

/// What a node with `labels` serves of `settings`: the base keys with every matching overlay
/// laid over, later selectors (in text order) winning.
pub fn resolve(settings: &Settings, labels: &BTreeMap<String, String>) -> Settings {
    if !has_overlays(settings) {
        return settings.clone();
    }
    let matching: BTreeSet<&str> = selectors(settings)
        .into_iter()
        .filter(|selector| {
            parse_selector(selector)
                .is_ok_and(|selector| selector.iter().all(|(key, value)| labels.get(key) == Some(value)))
        })
        .collect();
    resolve_with(settings, &matching)
}

/// The base of `settings` (no overlay values).
pub fn base(settings: &Settings) -> Settings {
    resolve_with(settings, &BTreeSet::new())
}

/// Every view a node can be served of `settings` besides the base: for each set of labels that
/// matches some overlays together (the union of selectors that do not contradict each other),
/// the base with what those labels match laid over, named by the labels (`env=dev,region=eu`).
/// `None` when there are more than [`crate::limits::OVERLAY_VIEWS_MAX`] such views.
pub fn views(settings: &Settings) -> Option<Vec<(String, Settings)>> {
    let parsed: Vec<BTreeMap<String, String>> =
        selectors(settings).into_iter().filter_map(|selector| parse_selector(selector).ok()).collect();
    let mut unions: BTreeSet<BTreeMap<String, String>> = BTreeSet::new();
    // Depth first over the selectors, each either joined (when it agrees with the labels so
    // far) or not; every non-empty union is a node's possible labels.
    let mut stack: Vec<(usize, BTreeMap<String, String>)> = vec![(0, BTreeMap::new())];
    while let Some((next, labels)) = stack.pop() {
        if next == parsed.len() {
            if !labels.is_empty() {
                unions.insert(labels);
                if unions.len() > crate::limits::OVERLAY_VIEWS_MAX {
                    return None;
                }
            }
            continue;
        }
        stack.push((next + 1, labels.clone()));
        let selector = &parsed[next];
        if selector.iter().all(|(key, value)| labels.get(key).is_none_or(|have| have == value)) {
            let mut joined = labels;
            joined.extend(selector.iter().map(|(k, v)| (k.clone(), v.clone())));
            stack.push((next + 1, joined));
        }
    }
    Some(unions.into_iter().map(|labels| (selector_text(&labels), resolve(settings, &labels))).collect())
}

fn resolve_with(settings: &Settings, matching: &BTreeSet<&str>) -> Settings {
    let mut resolved = Settings::new();
    let mut overrides: Vec<(&str, &str, &crate::settings::Entry)> = Vec::new();
    for (key, entry) in settings.entries() {
        match split(key) {
            None => resolved.insert_canonical(key.to_owned(), entry.value.clone(), entry.canonical.clone()),
            Some((base, selector)) if matching.contains(selector) => overrides.push((selector, base, entry)),
            Some(_) => {}
        }
    }
    // Later selectors win: lay them over in the selectors' order.
    overrides.sort_by(|a, b| a.0.cmp(b.0));
    for (_, key, entry) in overrides {
        resolved.insert_canonical(key.to_owned(), entry.value.clone(), entry.canonical.clone());
    }
    resolved
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn each_node_serves_the_base_with_its_matching_overlays_the_later_selector_winning() {
        let mut settings = Settings::new();
        settings.insert("db.pool".into(), json!(8));
        settings.insert("db.host".into(), json!("a"));
        settings.insert(overlay_key("db.pool", &labels(&[("env", "dev")])), json!(2));
        settings.insert(overlay_key("db.pool", &labels(&[("env", "dev"), ("region", "eu")])), json!(3));
        settings.insert(overlay_key("db.host", &labels(&[("region", "us")])), json!("b"));
        assert_eq!(resolve(&settings, &labels(&[])).to_json(), json!({"db.pool": 8, "db.host": "a"}));
        assert_eq!(resolve(&settings, &labels(&[("env", "dev")])).to_json(), json!({"db.pool": 2, "db.host": "a"}));
        assert_eq!(
            resolve(&settings, &labels(&[("env", "dev"), ("region", "eu"), ("x", "y")])).to_json(),
            json!({"db.pool": 3, "db.host": "a"}),
            "env=dev,region=eu sorts after env=dev and wins"
        );
        assert_eq!(resolve(&settings, &labels(&[("region", "us")])).to_json(), json!({"db.pool": 8, "db.host": "b"}));
        assert_eq!(base(&settings).len(), 2);
        let views = views(&settings).unwrap();
        let names: Vec<&str> = views.iter().map(|(labels, _)| labels.as_str()).collect();
        assert_eq!(
            names,
            ["env=dev", "env=dev,region=eu", "env=dev,region=us", "region=us"],
            "every set of labels that matches overlays together"
        );
        let both = &views[2].1;
        assert_eq!(both.to_json(), json!({"db.pool": 2, "db.host": "b"}), "env=dev and region=us at once");
        // An overlay of a key the base does not set adds it for the matching nodes.
        settings.insert(overlay_key("debug", &labels(&[("env", "dev")])), json!(true));
        assert_eq!(resolve(&settings, &labels(&[("env", "dev")])).get("debug"), Some(&json!(true)));
        assert_eq!(resolve(&settings, &labels(&[])).get("debug"), None);
    }

    #[test]
    fn stored_keys_are_keys_or_keys_with_a_sorted_selector() {
        for good in ["db.pool", "db.pool@env=dev", "a@env=dev,region=eu-west"] {
            assert_eq!(validate_stored_key(good), Ok(()), "{good}");
        }
        for bad in ["db.pool@", "db.pool@env", "db..pool@env=dev", "a@region=eu,env=dev", "a@env=dev@x=y", "a@ env=dev"]
        {
            assert!(validate_stored_key(bad).is_err(), "{bad}");
        }
        let long = format!("a@{}", (0..9).map(|n| format!("k{n}=v")).collect::<Vec<_>>().join(","));
        assert!(validate_stored_key(&long).is_err(), "too many labels");
    }
}
