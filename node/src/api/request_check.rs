//! Checks the names and sizes in a request before the socket or the daemon allocates anything
//! for it: a watch task and its queue, maps keyed by group, apply report rows (F16), log lines
//! and error messages that echo a field. A request that fails is refused with `bad_request` on
//! its id, and nothing else happens. The daemon and the core check the rest (values, files,
//! modes) as before; these checks only come first.

use konor_crdt::key::{validate_group_name, validate_key};
use konor_crdt::limits::{
    AUTHOR_BYTES_MAX, CONFIG_FILE_BYTES_MAX, KEY_BYTES_MAX, KEYS_PER_GROUP_MAX, MESSAGE_BYTES_MAX, SECRET_KEYS_MAX,
};
use konor_crdt::overlay::validate_stored_key;
use konor_sdk::protocol::{Request, WriteMeta};

use crate::limits::{MESH_NODES_MAX, PROCESS_NAME_BYTES_MAX, VERSION_LABEL_BYTES_MAX};
use crate::pki::{NODE_ID_CHARS_MAX, validate_node_id};

/// What is wrong with `request`, if anything, in words for the client.
pub(crate) fn check_request(request: &Request) -> Result<(), String> {
    match request {
        Request::Hello { process, .. } => check_length("process", process, PROCESS_NAME_BYTES_MAX),
        Request::Get { group, key } => {
            check_group(group)?;
            if konor_crdt::overlay::split(key).is_some() && validate_stored_key(key).is_ok() {
                return Err(format!(
                    "{key:?} is an overlay value: `get` answers with this node's own view (its overlays \
                     applied); read overlays as written with `show GROUP@VERSION`"
                ));
            }
            validate_key(key).map_err(|error| error.to_string())
        }
        Request::Snapshot { group, prefix } | Request::Watch { group, prefix, .. } => {
            check_group(group)?;
            check_prefix(prefix.as_deref().unwrap_or_default())
        }
        Request::SchemaGet { group }
        | Request::Unwatch { group }
        | Request::History { group }
        | Request::Conflicts { group }
        | Request::Status { group }
        | Request::ReleaseReport { group, .. }
        | Request::ReportErrorRate { group, .. } => check_group(group),
        Request::ReportApply { group, version, .. } => {
            check_group(group)?;
            check_label("version", version)
        }
        Request::GroupCreate { name, .. }
        | Request::GroupJoin { name, .. }
        | Request::GroupLeave { name, .. }
        | Request::GroupRotateKey { name, .. } => check_group(name),
        Request::NodeHistory { node: Some(node) } => {
            check_length("node id", node, NODE_ID_CHARS_MAX)?;
            validate_node_id(node).map_err(|error| error.to_string())
        }
        Request::NodeHistory { node: None } => Ok(()),
        Request::Revoke { revocation } => {
            check_length("revocation", revocation, crate::pki::revocation::REVOCATION_BYTES_MAX)
        }
        Request::Revocations => Ok(()),
        Request::Audit { group, node, .. } => {
            if let Some(group) = group {
                check_group(group)?;
            }
            node.as_deref().map_or(Ok(()), |node| check_length("node", node, crate::pki::NODE_ID_CHARS_MAX))
        }
        Request::GroupRemove { group, nodes, .. } => {
            check_group(group)?;
            check_count("nodes", nodes.len(), MESH_NODES_MAX)?;
            for node in nodes {
                // The length first: a node id error echoes the id.
                check_length("node id", node, NODE_ID_CHARS_MAX)?;
                validate_node_id(node).map_err(|error| error.to_string())?;
            }
            Ok(())
        }
        Request::Set { group, entries, meta } => {
            check_group(group)?;
            check_count("entries", entries.len(), KEYS_PER_GROUP_MAX)?;
            for key in entries.keys() {
                // A key, or an overlay key (`key@selector`, SPEC F29).
                validate_stored_key(key).map_err(|error| error.to_string())?;
            }
            check_meta(meta)
        }
        Request::Delete { group, keys, meta } => {
            check_group(group)?;
            check_count("keys", keys.len(), KEYS_PER_GROUP_MAX)?;
            for key in keys {
                validate_stored_key(key).map_err(|error| error.to_string())?;
            }
            check_meta(meta)
        }
        Request::Apply { group, text, meta, .. } => {
            check_group(group)?;
            check_length("text", text, CONFIG_FILE_BYTES_MAX)?;
            check_meta(meta)
        }
        Request::Rollback { group, version, meta } => {
            check_group(group)?;
            check_label("version", version)?;
            check_meta(meta)
        }
        Request::Release { group, version, strategy, waves, selector, meta, .. } => {
            check_group(group)?;
            check_label("version", version)?;
            if let Some(strategy) = strategy {
                check_label("strategy", strategy)?;
            }
            if let Some(waves) = waves {
                check_count("waves", waves.len(), konor_crdt::limits::RELEASE_WAVES_MAX)?;
            }
            if let Some(selector) = selector {
                // Every label as `key=value,` at the longest allowed.
                let longest =
                    konor_crdt::limits::RELEASE_SELECTOR_LABELS_MAX * (2 * konor_crdt::limits::LABEL_BYTES_MAX + 2);
                check_length("selector", selector, longest)?;
            }
            check_meta(meta)
        }
        Request::Promote { group, meta, .. } => {
            check_group(group)?;
            check_meta(meta)
        }
        Request::Abort { group, reason, meta } => {
            check_group(group)?;
            if let Some(reason) = reason {
                check_length("reason", reason, konor_crdt::limits::MESSAGE_BYTES_MAX)?;
            }
            check_meta(meta)
        }
        Request::Show { group, version } => {
            check_group(group)?;
            check_label("version", version)
        }
        Request::SchemaSet { group, schema, meta } => {
            check_group(group)?;
            check_schema(schema.as_ref())?;
            check_meta(meta)
        }
        Request::SchemaCheck { group, text, schema, .. } => {
            check_group(group)?;
            check_length("text", text, CONFIG_FILE_BYTES_MAX)?;
            check_schema(schema.as_ref())
        }
        Request::Diff { group, from, to } => {
            check_group(group)?;
            check_label("from", from)?;
            check_label("to", to)
        }
        Request::GroupList | Request::Nodes | Request::SocketStats | Request::Health | Request::Alerts => Ok(()),
    }
}

fn check_group(group: &str) -> Result<(), String> {
    validate_group_name(group).map_err(|error| error.to_string())
}

/// A key prefix is the start of a key: at most a key's length, of the bytes keys are made of.
fn check_prefix(prefix: &str) -> Result<(), String> {
    check_length("prefix", prefix, KEY_BYTES_MAX)?;
    match prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
        true => Ok(()),
        false => Err(format!(
            "`prefix` {prefix:?} cannot start a key: keys are made of ASCII letters, digits, `_`, `-` and `.`"
        )),
    }
}

fn check_label(field: &str, label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err(format!("`{field}` is empty: name a version such as v12"));
    }
    check_length(field, label, VERSION_LABEL_BYTES_MAX)
}

fn check_meta(meta: &WriteMeta) -> Result<(), String> {
    check_length("meta.author", &meta.author, AUTHOR_BYTES_MAX)?;
    check_length("meta.message", &meta.message, MESSAGE_BYTES_MAX)?;
    check_length("meta.if_version", meta.if_version.as_deref().unwrap_or_default(), VERSION_LABEL_BYTES_MAX)?;
    // A content hash is 64 hex digits at most; the core says what else is wrong with it.
    check_length("meta.if_content", meta.if_content.as_deref().unwrap_or_default(), 64)?;
    check_count("meta.secret", meta.secret.len(), SECRET_KEYS_MAX)?;
    for key in &meta.secret {
        check_length("a key of meta.secret", key, KEY_BYTES_MAX)?;
        validate_key(key).map_err(|error| format!("meta.secret: {error}"))?;
    }
    Ok(())
}

/// Only a schema's shape: the core checks its size (as canonical JSON) and its rules.
fn check_schema(schema: Option<&serde_json::Value>) -> Result<(), String> {
    match schema {
        Some(serde_json::Value::Object(_) | serde_json::Value::Bool(_)) | None => Ok(()),
        Some(_) => Err("`schema` must be a JSON object (a JSON Schema), true or false".to_owned()),
    }
}

fn check_length(field: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("`{field}` is {} bytes, longer than the {max} allowed", text.len()));
    }
    Ok(())
}

fn check_count(field: &str, count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!("`{field}` has {count} items, more than the {max} allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use konor_sdk::protocol::ApplyResult;

    fn refusal(request: Request) -> String {
        check_request(&request).expect_err("refused")
    }

    #[test]
    fn names_and_sizes_are_refused_before_anything_is_allocated() {
        let huge = "x".repeat(1_000_000);
        let watch = refusal(Request::Watch { group: huge.clone(), from_revision: None, prefix: None });
        assert!(watch.len() < 200, "the error does not echo the name: {} bytes", watch.len());
        assert!(watch.contains("group name"), "{watch}");
        let report = refusal(Request::ReportApply {
            group: "app".into(),
            version: huge.clone(),
            revision: 1,
            result: ApplyResult::Ok,
        });
        assert!(report.contains("`version` is 1000000 bytes"), "{report}");
        let get = refusal(Request::Get { group: "app".into(), key: huge.clone() });
        assert!(get.len() < 400, "{} bytes", get.len());
        let remove = refusal(Request::GroupRemove { group: "app".into(), nodes: vec![huge.clone()], force: false });
        assert!(remove.contains("node id"), "{remove}");
        let hello = refusal(Request::Hello { protocol: 1, pid: 1, process: huge });
        assert!(hello.contains("`process`"), "{hello}");
        for bad in ["", "a b", "-x", "ünï"] {
            assert!(check_request(&Request::Snapshot { group: bad.into(), prefix: None }).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ordinary_requests_pass() {
        for request in [
            Request::Get { group: "app".into(), key: "db.pool".into() },
            Request::Watch { group: "app-2_x".into(), from_revision: Some(3), prefix: None },
            Request::ReportApply {
                group: "app".into(),
                version: "v12-3fa9c2d1".into(),
                revision: 1,
                result: ApplyResult::Ok,
            },
            Request::Diff { group: "app".into(), from: "v1".into(), to: "app@v2".into() },
            Request::GroupRemove { group: "app".into(), nodes: vec!["n2".into()], force: true },
            Request::Nodes,
        ] {
            assert_eq!(check_request(&request), Ok(()), "{request:?}");
        }
    }
}
