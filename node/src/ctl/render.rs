//! konord's answers turned into what `konorctl` prints: pure functions from a request and its
//! response to stdout text, stderr text and an exit code, so the output is snapshot-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use konor_crdt::value::parse_cli_value;
use konor_sdk::SdkError;
use konor_sdk::protocol::{
    ApplyResult, ConflictRow, ErrorCode, GroupRow, NodeGroupRow, NodeRow, ProcessRow, Request, Response, VersionRow,
    WatchEvent,
};
use serde::Serialize;
use serde_json::Value;

use crate::ctl::cli::OutputFormat;
use crate::ctl::exit::{Exit, exit_for_code};
use crate::ctl::health_text::{alerts_text, health_text, mesh_history_text, node_history_text};
use crate::ctl::table::{Table, cell, format_age, format_utc, plural};

/// Hex digits of a content hash shown to people: as many as the commit line and history carry.
const CONTENT_HASH_SHOWN_CHARS: usize = 12;

/// What one command prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The result, for the user or for a script.
    pub stdout: String,
    /// Errors, warnings and hints.
    pub stderr: String,
    /// The process exit code.
    pub exit: Exit,
}

impl Rendered {
    /// Output that exits 0.
    pub fn ok(stdout: String) -> Rendered {
        Rendered { stdout, stderr: String::new(), exit: Exit::Ok }
    }

    fn failed(stderr: String, exit: Exit) -> Rendered {
        Rendered { stdout: String::new(), stderr, exit }
    }
}

/// Renders konord's `response` to `request`. A refusal (`Response::Error`) is rendered too: a
/// write that changed nothing prints `no change: ...` and exits 0; any other refusal prints
/// `error: ...` with a hint to stderr. In JSON mode stdout always carries the response itself.
pub fn render(request: &Request, response: &Response, output: OutputFormat, now_ms: u64) -> Rendered {
    let table = render_table(request, response, now_ms);
    match output {
        OutputFormat::Table => table,
        OutputFormat::Json => {
            // Warnings are for people; the JSON carries the same facts (`stale`).
            let stderr = if table.exit == Exit::Ok { String::new() } else { table.stderr };
            match json_document(response) {
                Ok(stdout) => Rendered { stdout, stderr, exit: table.exit },
                Err(failure) => failure,
            }
        }
    }
}

/// Renders the result of a command that ran without konord (`ca init`, `cert issue`): `text` for
/// people, `document` for `--output json`.
pub fn render_local(text: String, document: &impl Serialize, output: OutputFormat) -> Rendered {
    match output {
        OutputFormat::Table => Rendered::ok(text),
        OutputFormat::Json => json_document(document).map_or_else(|failure| failure, Rendered::ok),
    }
}

fn json_document(document: &impl Serialize) -> Result<String, Rendered> {
    match serde_json::to_string_pretty(document) {
        Ok(json) => Ok(format!("{json}\n")),
        Err(error) => {
            Err(Rendered::failed(format!("error: cannot encode the answer as JSON: {error}\n"), Exit::Internal))
        }
    }
}

/// One line for one watch event: readable text, or one compact JSON object.
pub fn render_event(event: &WatchEvent, output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        // A WatchEvent holds only strings, numbers and JSON values, which always serialize.
        return serde_json::to_string(event).unwrap_or_default();
    }
    match event {
        WatchEvent::Change { group, revision, version, set, removed } => {
            let mut parts = Vec::new();
            if !set.is_empty() {
                parts.push(format!("set {}", assignments(set)));
            }
            if !removed.is_empty() {
                parts.push(format!("removed {}", removed.join(", ")));
            }
            if parts.is_empty() {
                parts.push("no key changed".to_owned());
            }
            format!("{group}@{version} revision {revision}: {}", parts.join("; "))
        }
        WatchEvent::Resync { group, revision, version, settings } => {
            let keys = plural(settings.len(), "key", "keys");
            if settings.is_empty() {
                format!("{group}@{version} revision {revision}: resync, {keys}")
            } else {
                format!("{group}@{version} revision {revision}: resync, {keys}: {}", assignments(settings))
            }
        }
    }
}

/// Settings as a KEY / VALUE table, or a line that says there are none.
fn settings_table(settings: &BTreeMap<String, Value>) -> String {
    if settings.is_empty() {
        return "no keys set\n".to_owned();
    }
    let mut table = Table::new(&["KEY", "VALUE"]);
    for (key, value) in settings {
        table.row(vec![key.clone(), display_value(value)]);
    }
    table.render()
}

fn assignments(settings: &BTreeMap<String, Value>) -> String {
    settings.iter().map(|(key, value)| format!("{key} = {}", display_value(value))).collect::<Vec<_>>().join(", ")
}

fn render_table(request: &Request, response: &Response, now_ms: u64) -> Rendered {
    match response {
        Response::Welcome { protocol, node_id, daemon_version } => {
            Rendered::ok(format!("connected to konord {daemon_version} on node {node_id} (protocol {protocol})\n"))
        }
        Response::Value { group, key, value, freshness } => match value {
            Some(value) => Rendered {
                stdout: format!("{}\n", display_value(value)),
                stderr: stale_warning(
                    freshness.stale,
                    freshness.stale_reason.as_deref(),
                    freshness.revision,
                    &freshness.version,
                ),
                exit: Exit::Ok,
            },
            None => Rendered::failed(
                format!("error: `{key}` is not set in group {group}\nhint: `konorctl get {group}` lists its keys\n"),
                Exit::Refused,
            ),
        },
        Response::Snapshot { group, settings, content_hash, freshness } => {
            // A prefix read's hash is of the keys shown, not the group's (`--if-content`).
            let content = match request {
                Request::Snapshot { prefix: Some(prefix), .. } => {
                    format!("keys under {prefix}: content {}", short_hash(content_hash))
                }
                _ => format!("content {}", short_hash(content_hash)),
            };
            let mut text = format!(
                "{group}@{} (revision {}, {content}, last change {} ago)\n",
                freshness.version,
                freshness.revision,
                format_age(freshness.age_ms)
            );
            text.push_str(&settings_table(settings));
            Rendered {
                stdout: text,
                stderr: stale_warning(
                    freshness.stale,
                    freshness.stale_reason.as_deref(),
                    freshness.revision,
                    &freshness.version,
                ),
                exit: Exit::Ok,
            }
        }
        Response::Watching { group, revision } => Rendered::ok(format!("watching {group} from revision {revision}\n")),
        Response::Committed { group, version, revision, content_hash, acked_by } => Rendered::ok(format!(
            "committed {group}@{version} (revision {revision}, content {}) acked by: {}\n",
            short_hash(content_hash),
            acked_by.join(", ")
        )),
        Response::GroupCreated { name, key } => {
            let mode = match request {
                Request::GroupCreate { mode, .. } => format!(" ({mode})"),
                _ => String::new(),
            };
            Rendered::ok(format!(
                "created group {name}{mode}\nkey: {key}\n\
                 share it: put it in a file only you can read, then run konorctl group join {name} \
                 --key-file FILE (or set KONOR_GROUP_KEY) on the nodes that should hold it\n",
                key = key.expose()
            ))
        }
        Response::Joined { name, version } => Rendered::ok(format!("joined group {name} at {version}\n")),
        Response::KeyRotated { group, generation, entitled, key } => Rendered::ok(format!(
            "rotated the key of group {group}: generation {generation}, handed to its {entitled} members as they ask\n\
             key: {key}\nthe old key no longer admits anyone; nodes that join from now on need this one\n",
            key = key.expose()
        )),
        Response::Groups { groups } => Rendered::ok(groups_text(groups)),
        Response::History { group, versions } => Rendered::ok(history_text(group, versions)),
        Response::Show { group, version, settings } => {
            let message = match version.message.is_empty() {
                true => String::new(),
                false => format!(": {}", cell(&version.message)),
            };
            let mut text = format!(
                "{group}@{} ({}, by {}, content {}){message}\n",
                version.label,
                version.kind,
                cell(&version.author),
                version.content_hash,
            );
            text.push_str(&settings_table(settings));
            Rendered::ok(text)
        }
        Response::Schema { group, schema, version, unusable } => {
            let mut text = match (schema, version) {
                (Some(schema), Some(version)) => format!(
                    "schema of {group} (set by {version}):\n{}\n",
                    serde_json::to_string_pretty(schema).unwrap_or_default()
                ),
                (Some(schema), None) => {
                    format!("schema of {group}:\n{}\n", serde_json::to_string_pretty(schema).unwrap_or_default())
                }
                (None, _) if unusable.is_none() => format!("group {group} has no schema\n"),
                (None, _) => String::new(),
            };
            if let Some(reason) = unusable {
                text.push_str(&format!(
                    "group {group} holds a schema this node cannot use: {}\nwrites here are refused until a new \
                     schema is set\n",
                    cell(reason)
                ));
            }
            Rendered::ok(text)
        }
        Response::SchemaCheck { group, keys, violations } => {
            if violations.is_empty() {
                return Rendered::ok(format!("ok: the file's {keys} keys satisfy the schema of {group}\n"));
            }
            let mut table = Table::new(&["KEY", "VALUE", "RULE", "PROBLEM"]);
            for violation in violations {
                table.row(vec![
                    violation.key.clone().unwrap_or_else(|| "-".to_owned()),
                    violation.value.as_deref().map(cell).unwrap_or_else(|| "-".to_owned()),
                    violation.rule.clone(),
                    cell(&violation.message),
                ]);
            }
            Rendered {
                stdout: table.render(),
                stderr: format!("error: the file breaks {} rule(s) of the schema of {group}\n", violations.len()),
                exit: Exit::Refused,
            }
        }
        Response::Diff { group, added, removed, changed } => {
            let (from, to) = match request {
                Request::Diff { from, to, .. } => (from.as_str(), to.as_str()),
                _ => ("?", "?"),
            };
            Rendered::ok(diff_text(group, from, to, added, removed, changed))
        }
        Response::Conflicts { group, conflicts } => Rendered::ok(conflicts_text(group, conflicts)),
        Response::Nodes { nodes } => Rendered::ok(nodes_text(nodes)),
        Response::ReleaseReport { group, releases } => Rendered::ok(if releases.is_empty() {
            format!("group {group}: no release yet (gated: the group's first version is served)\n")
        } else {
            releases
                .iter()
                .map(|report| crate::ctl::release_text::report_text(report, now_ms))
                .collect::<Vec<_>>()
                .join("\n")
        }),
        Response::Status {
            group,
            mode,
            nodes,
            processes,
            members: _,
            live: _,
            quorum,
            last_write,
            fenced,
            fenced_reason,
            configuration,
            unknown: _,
            degraded,
            release,
        } => {
            let view = StatusView {
                group,
                mode,
                nodes,
                processes,
                quorum: *quorum,
                last_write: last_write.as_ref(),
                fenced: *fenced,
                fenced_reason: fenced_reason.as_deref(),
                configuration: configuration.as_deref(),
                degraded: degraded.as_deref(),
                release: release.as_deref(),
            };
            Rendered::ok(status_text(&view, now_ms))
        }
        Response::Reconfigured { group, configuration } => {
            Rendered::ok(format!("group {group} is now in configuration {configuration}\n"))
        }
        Response::Health { health } => Rendered::ok(health_text(health, &[], now_ms)),
        Response::Alerts { alerts } => Rendered::ok(alerts_text(alerts, now_ms)),
        Response::NodeHistory { history } => Rendered::ok(node_history_text(history, now_ms)),
        Response::MeshHistory { history } => Rendered::ok(mesh_history_text(history)),
        Response::Revoked { id, new: true } => {
            Rendered::ok(format!("revoked ({id}); every node refuses it within seconds as the revocation spreads\n"))
        }
        Response::Revoked { id, new: false } => Rendered::ok(format!("this node already held revocation {id}\n")),
        Response::Revocations { revocations } => Rendered::ok(revocations_text(revocations)),
        Response::Audit { records, truncated } => {
            let mut text = super::audit_text::rows_table(records);
            if *truncated {
                text.push_str(&format!(
                    "(only the newest {} shown; older records matched too: `konorctl audit export --data-dir` has them all)\n",
                    records.len()
                ));
            }
            Rendered::ok(text)
        }
        Response::SocketStats { stats } => Rendered::ok(format!(
            "connections {}\nread bytes {} (peak {}, budget {})\nwrite bytes {} (peak {}, budget {})\n\
             bad frames {}\nrefused {}\nsilent closed {}\nidle closed {}\nwatches dropped {}\n",
            stats.connections,
            stats.read_bytes,
            stats.read_bytes_peak,
            stats.read_bytes_max,
            stats.write_bytes,
            stats.write_bytes_peak,
            stats.write_bytes_max,
            stats.bad_frames,
            stats.refused,
            stats.ungreeted_closed,
            stats.idle_closed,
            stats.watches_dropped,
        )),
        Response::Done => Rendered::ok(match request {
            Request::GroupLeave { name, .. } => format!("left group {name}\n"),
            _ => "done\n".to_owned(),
        }),
        Response::Error { code: ErrorCode::Unchanged, message } => {
            // konord's message may already say so.
            let message = message.strip_prefix("no change: ").unwrap_or(message);
            Rendered::ok(format!("no change: {message}\n"))
        }
        Response::Error { code, message } => {
            let what = match code {
                ErrorCode::NotCommitted | ErrorCode::Aborted | ErrorCode::Busy => {
                    format!("konord could not commit the write ({}): {message}", code.as_str())
                }
                _ => SdkError::Daemon { code: *code, message: message.clone() }.to_string(),
            };
            let mut stderr = format!("error: {}\n", cell(&what));
            if let Some(hint) = refusal_hint(request, *code, message) {
                stderr.push_str(&format!("hint: {hint}\n"));
            }
            Rendered::failed(stderr, exit_for_code(*code))
        }
    }
}

/// What to try after konord refused `request` with `code`, when the message alone may not say.
fn refusal_hint(request: &Request, code: ErrorCode, message: &str) -> Option<String> {
    let group = request.group().unwrap_or("GROUP");
    match code {
        ErrorCode::UnknownGroup if matches!(request, Request::GroupLeave { .. }) => {
            Some("`konorctl group list` shows the groups on this node".to_owned())
        }
        ErrorCode::UnknownGroup => Some(format!(
            "`konorctl group list` shows the groups on this node; \
             `konorctl group join {group} --key-file FILE` makes this node hold {group}"
        )),
        ErrorCode::NotFound => match request {
            Request::Rollback { .. } | Request::Release { .. } | Request::Diff { .. } => {
                Some(format!("`konorctl history {group}` lists the versions"))
            }
            _ => Some(format!("`konorctl get {group}` lists the keys")),
        },
        ErrorCode::AlreadyExists => match request {
            Request::GroupCreate { .. } => Some(format!(
                "to hold an existing group on this node, run `konorctl group join {group} --key-file FILE`"
            )),
            _ => Some("`konorctl group list` shows what this node holds".to_owned()),
        },
        ErrorCode::Forbidden => match request {
            Request::GroupJoin { .. } if !message.contains("on this node") => Some(format!(
                "the key for {group} is wrong; use the key `konorctl group create {group}` printed on the node \
                 that created it"
            )),
            Request::Revoke { .. } => None,
            _ => Some(
                "the node's roles ([roles] in its settings file, docs/operations.md \"Roles\") do not allow this \
                 caller to do this"
                    .to_owned(),
            ),
        },
        ErrorCode::Unavailable => Some(format!(
            "no member of {group} answered in time; check with `konorctl nodes` that one is live, then retry"
        )),
        ErrorCode::NotCommitted => Some(format!(
            "the write is applied on this node but no live quorum acknowledged it in time; it spreads when peers \
             return (`konorctl status {group}` shows who has it)"
        )),
        ErrorCode::Aborted => Some("nothing changed anywhere; retry the write".to_owned()),
        ErrorCode::ConditionFailed => Some(format!(
            "nothing was written; `konorctl history {group}` shows the latest version and its content hash: read \
             the group again, then write with the new --if-version or --if-content"
        )),
        ErrorCode::SchemaViolation => Some(format!(
            "nothing was written; `konorctl schema get {group}` prints the schema, and `konorctl schema check \
             {group} FILE` checks a file against it"
        )),
        ErrorCode::OutcomeUnknown => Some(format!(
            "the write is committed on every member or on none, not yet known here; `konorctl get {group}` or \
             `konorctl history {group}` shows which before you retry"
        )),
        ErrorCode::NotDurable => Some(
            "this node could not save the change (see `konorctl nodes`: degraded); free space in its data dir"
                .to_owned(),
        ),
        ErrorCode::Busy => Some(format!("another write to {group} is in flight; retry in a moment")),
        ErrorCode::Internal => Some("konord's log says more".to_owned()),
        ErrorCode::Protocol => Some("konorctl and konord are different versions; upgrade the older one".to_owned()),
        _ => None,
    }
}

fn stale_warning(stale: bool, reason: Option<&str>, revision: u64, version: &str) -> String {
    if stale {
        let why = reason.map(|why| format!(": {why}")).unwrap_or_default();
        format!("warning: this node may be behind{why}; served {version} at revision {revision}\n")
    } else {
        String::new()
    }
}

fn groups_text(groups: &[GroupRow]) -> String {
    if groups.is_empty() {
        return "no groups on this node; create one with `konorctl group create NAME --mode eventual|strong`\n"
            .to_owned();
    }
    let mut table = Table::new(&["GROUP", "MODE", "VERSION", "REVISION", "KEYS", "MEMBERS"]).right(&[3, 4]);
    for group in groups {
        table.row(vec![
            group.name.clone(),
            group.mode.clone(),
            group.version.clone(),
            group.revision.to_string(),
            group.keys.to_string(),
            group.members.join(", "),
        ]);
    }
    table.render()
}

fn history_text(group: &str, versions: &[VersionRow]) -> String {
    if versions.is_empty() {
        return format!("no versions in group {group}\n");
    }
    // Parents matter only where histories merged; a linear history would repeat the row above.
    let merged = versions.iter().any(|version| version.parents.len() > 1);
    // Which version marked which keys secret (issue 17), where any did.
    let marked = versions.iter().any(|version| !version.secret.is_empty());
    let mut headers = vec!["VERSION", "TIME (UTC)", "AUTHOR", "KIND", "CONTENT"];
    if merged {
        headers.push("PARENTS");
    }
    if marked {
        headers.push("MARKED SECRET");
    }
    headers.push("MESSAGE");
    let mut table = Table::new(&headers);
    for version in versions {
        let mut row = vec![
            version.label.clone(),
            format_utc(version.time_ms),
            cell(&version.author),
            version.kind.clone(),
            // Empty for a caller that may not reveal the group's secrets.
            if version.content_hash.is_empty() { "-".to_owned() } else { short_hash(&version.content_hash).to_owned() },
        ];
        if merged {
            row.push(version.parents.join(", "));
        }
        if marked {
            row.push(cell(&version.secret.join(", ")));
        }
        row.push(cell(&version.message));
        table.row(row);
    }
    table.render()
}

fn diff_text(
    group: &str,
    from: &str,
    to: &str,
    added: &BTreeMap<String, Value>,
    removed: &BTreeMap<String, Value>,
    changed: &BTreeMap<String, (Value, Value)>,
) -> String {
    if added.is_empty() && removed.is_empty() && changed.is_empty() {
        return format!("no difference between {from} and {to} in group {group}\n");
    }
    // One list in key order, so related keys (`db.*`) stay together whatever happened to them.
    let mut lines: BTreeMap<&str, String> = BTreeMap::new();
    for (key, value) in added {
        lines.insert(key, format!("+ {key} = {}", display_value(value)));
    }
    for (key, value) in removed {
        lines.insert(key, format!("- {key} = {}", display_value(value)));
    }
    for (key, (old, new)) in changed {
        lines.insert(key, format!("~ {key} = {} -> {}", display_value(old), display_value(new)));
    }
    let mut text = format!("diff {group} {from} -> {to}\n");
    for line in lines.values() {
        text.push_str(line);
        text.push('\n');
    }
    let _ = writeln!(text, "{} added, {} removed, {} changed", added.len(), removed.len(), changed.len());
    text
}

fn conflicts_text(group: &str, conflicts: &[ConflictRow]) -> String {
    if conflicts.is_empty() {
        return format!("no conflicts in group {group}\n");
    }
    let mut table = Table::new(&["KEY", "VALUE", "FROM", "LOST"]);
    for conflict in conflicts {
        let losers = conflict
            .losers
            .iter()
            .map(|(value, version)| format!("{} ({})", display_value(value), version.as_deref().unwrap_or("unknown")))
            .collect::<Vec<_>>()
            .join("; ");
        table.row(vec![
            conflict.key.clone(),
            display_value(&conflict.winner),
            conflict.winner_version.clone().unwrap_or_else(|| "unknown".to_owned()),
            losers,
        ]);
    }
    let mut text = table.render();
    text.push_str("the VALUE column is served on every node; set the key again to choose another\n");
    text
}

fn nodes_text(nodes: &[NodeRow]) -> String {
    if nodes.is_empty() {
        return "no nodes known\n".to_owned();
    }
    let mut table = Table::new(&["NODE", "ADDRESS", "STATE", "HEARTBEAT", "LABELS"]);
    for node in nodes {
        let name = if node.is_self { format!("{} (self)", node.id) } else { node.id.clone() };
        let heartbeat = match (node.is_self, node.last_heartbeat_ms) {
            (false, Some(age_ms)) => format!("{} ago", format_age(age_ms)),
            _ => "-".to_owned(),
        };
        let labels = node.labels.iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(",");
        let state = if node.degraded.is_some() { format!("{} (degraded)", node.state) } else { node.state.clone() };
        table.row(vec![name, node.address.clone(), state, heartbeat, cell(&labels)]);
    }
    table.render()
}

/// The parts of a `Response::Status` that `status` prints. The node rows already list the
/// members and their liveness, so `members` and `live` are left to `--output json`.
struct StatusView<'a> {
    group: &'a str,
    mode: &'a str,
    nodes: &'a [NodeGroupRow],
    processes: &'a [ProcessRow],
    quorum: usize,
    last_write: Option<&'a (String, Vec<String>)>,
    fenced: bool,
    fenced_reason: Option<&'a str>,
    configuration: Option<&'a str>,
    degraded: Option<&'a str>,
    release: Option<&'a konor_sdk::protocol::ReleaseState>,
}

/// A gated group's release lines in `status` (SPEC F14).
fn release_text(release: &konor_sdk::protocol::ReleaseState, now_ms: u64) -> String {
    let mut text = match &release.current {
        Some(current) => crate::ctl::release_text::release_lines(current, now_ms),
        None => "release: none yet (gated: the group's first version is served)\n".to_owned(),
    };
    let pending = if release.served == release.latest {
        "the newest written version is served here".to_owned()
    } else {
        format!("{} is written, not served here", cell(&release.latest))
    };
    let _ = writeln!(text, "served here: {}; {pending}", cell(&release.served));
    text
}

fn status_text(view: &StatusView<'_>, now_ms: u64) -> String {
    let StatusView {
        group,
        mode,
        nodes,
        processes,
        quorum,
        last_write,
        fenced,
        fenced_reason,
        configuration,
        degraded,
        release,
    } = *view;
    let mut text = format!("group {group} ({mode})\n");
    if let Some(configuration) = configuration {
        let _ = writeln!(text, "configuration: {configuration}");
    }
    if let Some(release) = release {
        text.push_str(&release_text(release, now_ms));
    }
    if fenced {
        let why = fenced_reason.map(|why| format!(" ({why})")).unwrap_or_default();
        let _ = writeln!(text, "fenced: this node serves {group} as possibly stale{why}");
    }
    if let Some(degraded) = degraded {
        let _ = writeln!(text, "degraded: {degraded}");
    }
    // The key's generation shows once a key was rotated (or a node claims another key).
    let keyed = nodes.iter().any(|node| node.key.is_some() || node.other_key);
    let mut headers = vec!["NODE", "VERSION", "REVISION", "HEADS", "LIVE"];
    if keyed {
        headers.push("KEY");
    }
    let mut table = Table::new(&headers).right(&[2]);
    for node in nodes {
        let live = if node.live { "yes" } else { "no" };
        let mut row = vec![
            node.node.clone(),
            node.version.clone(),
            node.revision.to_string(),
            node.heads.clone(),
            live.to_owned(),
        ];
        if keyed {
            let generation =
                node.key.as_deref().and_then(|id| id.split_once('-')).map_or("0", |(generation, _)| generation);
            row.push(if node.other_key { format!("{generation} (another key)") } else { generation.to_owned() });
        }
        table.row(row);
    }
    text.push_str(&table.render());
    let others: Vec<&str> = nodes.iter().filter(|node| node.other_key).map(|node| node.node.as_str()).collect();
    if !others.is_empty() {
        let _ = writeln!(
            text,
            "another key: {} (a key rotation on its way, or one they missed; they exchange nothing of {group} with this node)",
            others.join(", ")
        );
    }
    let all_nodes = nodes;
    let members: Vec<&NodeGroupRow> = nodes.iter().filter(|node| !node.other_key).collect();
    let live: Vec<&NodeGroupRow> = members.iter().copied().filter(|node| node.live).collect();
    let distinct_heads: BTreeSet<&str> = live.iter().map(|node| node.heads.as_str()).collect();
    let verdict = match distinct_heads.len() {
        0 => "no node is live".to_owned(),
        1 => "the live nodes hold identical state".to_owned(),
        count => format!("the live nodes differ ({count} distinct heads): still syncing, or partitioned"),
    };
    // A strong group commits through its configuration, not a live quorum; a daemon older than
    // the quorum fields sends 0.
    let quorum = if configuration.is_some() {
        " (a strong write needs every member of the configuration)".to_owned()
    } else if quorum > 0 {
        format!(" (quorum {quorum})")
    } else {
        String::new()
    };
    let _ = writeln!(text, "{} of {} live{quorum}; {verdict}", live.len(), plural(members.len(), "node", "nodes"));
    if let Some((version, acked_by)) = last_write {
        let _ = writeln!(text, "last write on this node: {version}, acked by {}", acked_by.join(", "));
    }
    text.push('\n');
    let (live, gone): (Vec<&ProcessRow>, Vec<&ProcessRow>) = processes.iter().partition(|p| p.gone_ms.is_none());
    if live.is_empty() {
        text.push_str("no live process has reported using this group\n");
    } else {
        let mut table =
            Table::new(&["NODE", "PID", "PROCESS", "VERSION", "REVISION", "RESULT", "REPORTED"]).right(&[1, 4]);
        for process in &live {
            // A node that is not live keeps gossiping its last rows: what it last said, not now.
            let down = if node_live(all_nodes, process) { "" } else { " (node not live)" };
            table.row(vec![
                process_node(process),
                process.pid.to_string(),
                cell(&process.process),
                cell(&process.version),
                process.revision.to_string(),
                result_text(&process.result),
                format!("{} ago{down}", format_age(now_ms.saturating_sub(process.time_ms))),
            ]);
        }
        text.push_str(&table.render());
        text.push_str(&drift_text(all_nodes, &live));
    }
    if !gone.is_empty() {
        let _ = writeln!(text, "\ngone (history of processes that went away):");
        let mut table = Table::new(&["NODE", "PID", "PROCESS", "VERSION", "RESULT", "GONE"]).right(&[1]);
        for process in &gone {
            let gone_ms = process.gone_ms.unwrap_or(process.time_ms);
            table.row(vec![
                process_node(process),
                process.pid.to_string(),
                cell(&process.process),
                cell(&process.version),
                result_text(&process.result),
                format!("{} ago", format_age(now_ms.saturating_sub(gone_ms))),
            ]);
        }
        text.push_str(&table.render());
    }
    text
}

/// Whether the node a row is from is live (a row of this node, or of a daemon before issue 16,
/// names none it could miss).
fn node_live(nodes: &[NodeGroupRow], process: &ProcessRow) -> bool {
    nodes.iter().find(|node| node.node == process.node).is_none_or(|node| node.live)
}

/// The node a process row is from (a daemon before issue 16 sent none: its own).
fn process_node(process: &ProcessRow) -> String {
    if process.node.is_empty() { "-".to_owned() } else { process.node.clone() }
}

fn result_text(result: &ApplyResult) -> String {
    match result {
        ApplyResult::Ok => "ok".to_owned(),
        ApplyResult::Error { message } => format!("error: {}", cell(message)),
    }
}

/// The live processes that are not on their node's version, or whose last apply failed (SPEC
/// F28's drift, against the version each node holds; releases will make it the desired one).
fn drift_text(nodes: &[NodeGroupRow], live: &[&ProcessRow]) -> String {
    let mut drifting = Vec::new();
    for process in live.iter().filter(|process| node_live(nodes, process)) {
        let node_version = nodes.iter().find(|node| node.node == process.node).map(|node| node.version.as_str());
        let why = match (&process.result, node_version) {
            (ApplyResult::Error { .. }, _) => "its last apply failed".to_owned(),
            (ApplyResult::Ok, Some(version)) if version != process.version => {
                format!("on {}, its node at {version}", cell(&process.version))
            }
            _ => continue,
        };
        drifting.push(format!("{} (pid {}) on {}: {why}", cell(&process.process), process.pid, process_node(process)));
    }
    match drifting.len() {
        0 => "every live process is on its node's version\n".to_owned(),
        count => format!("drift: {count} of {}: {}\n", plural(live.len(), "process", "processes"), drifting.join("; ")),
    }
}

fn short_hash(hash: &str) -> &str {
    hash.get(..CONTENT_HASH_SHOWN_CHARS).unwrap_or(hash)
}

/// A value as a person reads and types it: a string that `konorctl set` would read back as the
/// same string is printed bare (`eu-west`); everything else as compact JSON (`8080`, `"8080"`,
/// `""`, `{"a":1}`). So what `get` prints can be pasted into `set`.
pub fn display_value(value: &Value) -> String {
    match value {
        Value::String(text)
            if !text.is_empty()
                && text.trim() == text
                && !text.chars().any(char::is_control)
                && parse_cli_value(text).as_ref() == Ok(value) =>
        {
            text.clone()
        }
        other => other.to_string(),
    }
}

/// `konorctl cert revocations`: one line per revocation.
fn revocations_text(rows: &[konor_sdk::protocol::RevocationRow]) -> String {
    if rows.is_empty() {
        return "no revocations\n".to_owned();
    }
    let mut out = String::new();
    for row in rows {
        let what = match &row.serial {
            Some(serial) => format!("certificate {serial}"),
            None => "every certificate issued before then".to_owned(),
        };
        let reason = if row.reason.is_empty() { String::new() } else { format!(" ({})", row.reason) };
        out.push_str(&format!(
            "{}  {}  revoked {}: {what}{reason}\n",
            row.id,
            row.node,
            crate::ctl::table::format_utc(row.revoked_at_ms)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};
    use konor_sdk::protocol::{Freshness, WriteMeta};
    use serde_json::json;

    /// 2024-05-01T12:00:03Z.
    const NOW_MS: u64 = 1_714_564_803_000;

    fn check(request: &Request, response: &Response, output: OutputFormat, expected: Expect) {
        let rendered = render(request, response, output, NOW_MS);
        let mut transcript = format!("[exit {}]\n{}", rendered.exit.code(), rendered.stdout);
        if !rendered.stderr.is_empty() {
            transcript.push_str(&format!("[stderr]\n{}", rendered.stderr));
        }
        expected.assert_eq(&transcript);
    }

    fn table(request: &Request, response: &Response, expected: Expect) {
        check(request, response, OutputFormat::Table, expected);
    }

    fn set_request() -> Request {
        Request::Set {
            group: "app".into(),
            entries: [("db.pool".to_owned(), json!(20))].into_iter().collect(),
            meta: WriteMeta::default(),
        }
    }

    fn committed() -> Response {
        Response::Committed {
            group: "app".into(),
            version: "v12".into(),
            revision: 14,
            content_hash: "3fa9c2d1e0aa".into(),
            acked_by: vec!["n1".into()],
        }
    }

    fn versions() -> Vec<VersionRow> {
        let row = |label: &str, minutes: u64, author: &str, kind: &str, hash: &str, parents: &[&str], message: &str| {
            VersionRow {
                label: label.into(),
                author: author.into(),
                time_ms: NOW_MS - minutes * 60_000,
                message: message.into(),
                kind: kind.into(),
                content_hash: hash.into(),
                secret: Vec::new(),
                parents: parents.iter().map(|parent| (*parent).to_owned()).collect(),
            }
        };
        vec![
            row("v1", 90, "alice@konorctl", "create", "000000000000", &[], ""),
            row("v2", 60, "alice@konorctl", "set", "3fa9c2d1e0aa", &["v1"], "pool for the sale"),
            row("v3", 1, "deploy-bot", "apply", "77ab01cd9e21", &["v2"], "release 4.2\nfrom CI"),
        ]
    }

    #[test]
    fn commit_line() {
        table(
            &set_request(),
            &committed(),
            expect![[r#"
                [exit 0]
                committed app@v12 (revision 14, content 3fa9c2d1e0aa) acked by: n1
            "#]],
        );
        let strong = Response::Committed {
            group: "app".into(),
            version: "v12".into(),
            revision: 14,
            content_hash: "3fa9c2d1e0aa77ab01cd9e21".into(),
            acked_by: vec!["n1".into(), "n2".into(), "n3".into()],
        };
        table(
            &set_request(),
            &strong,
            expect![[r#"
                [exit 0]
                committed app@v12 (revision 14, content 3fa9c2d1e0aa) acked by: n1, n2, n3
            "#]],
        );
    }

    #[test]
    fn commit_as_json_is_the_response() {
        check(
            &set_request(),
            &committed(),
            OutputFormat::Json,
            expect![[r#"
                [exit 0]
                {
                  "type": "committed",
                  "group": "app",
                  "version": "v12",
                  "revision": 14,
                  "content_hash": "3fa9c2d1e0aa",
                  "acked_by": [
                    "n1"
                  ]
                }
            "#]],
        );
    }

    #[test]
    fn unchanged_write_exits_0() {
        let response = Response::Error { code: ErrorCode::Unchanged, message: "the settings are already so".into() };
        table(
            &set_request(),
            &response,
            expect![[r#"
                [exit 0]
                no change: the settings are already so
            "#]],
        );
        let response = Response::Error { code: ErrorCode::Unchanged, message: "no change: same values".into() };
        table(
            &set_request(),
            &response,
            expect![[r#"
                [exit 0]
                no change: same values
            "#]],
        );
    }

    #[test]
    fn refusal_prints_error_and_hint_and_exits_1() {
        let request = Request::Rollback { group: "app".into(), version: "v99".into(), meta: WriteMeta::default() };
        let response = Response::Error { code: ErrorCode::NotFound, message: "no version v99 in group app".into() };
        table(
            &request,
            &response,
            expect![[r#"
                [exit 1]
                [stderr]
                error: konord refused the request (not_found): no version v99 in group app
                hint: `konorctl history app` lists the versions
            "#]],
        );
        let response = Response::Error {
            code: ErrorCode::UnknownGroup,
            message: "group \"app\" does not exist on this node".into(),
        };
        check(
            &request,
            &response,
            OutputFormat::Json,
            expect![[r#"
                [exit 1]
                {
                  "type": "error",
                  "code": "unknown_group",
                  "message": "group \"app\" does not exist on this node"
                }
                [stderr]
                error: konord refused the request (unknown_group): group "app" does not exist on this node
                hint: `konorctl group list` shows the groups on this node; `konorctl group join app --key-file FILE` makes this node hold app
            "#]],
        );
    }

    #[test]
    fn uncommitted_write_exits_1_and_says_where_it_is() {
        let response = Response::Error {
            code: ErrorCode::NotCommitted,
            message: "app@v13 is applied here; 1 of 2 needed acknowledgements arrived".into(),
        };
        table(
            &set_request(),
            &response,
            expect![[r#"
                [exit 1]
                [stderr]
                error: konord could not commit the write (not_committed): app@v13 is applied here; 1 of 2 needed acknowledgements arrived
                hint: the write is applied on this node but no live quorum acknowledged it in time; it spreads when peers return (`konorctl status app` shows who has it)
            "#]],
        );
    }

    #[test]
    fn daemon_internal_failure_exits_5() {
        let response = Response::Error { code: ErrorCode::Internal, message: "cannot fsync: disk full".into() };
        table(
            &set_request(),
            &response,
            expect![[r#"
                [exit 5]
                [stderr]
                error: konord refused the request (internal): cannot fsync: disk full
                hint: konord's log says more
            "#]],
        );
    }

    #[test]
    fn group_create_prints_the_key_and_how_to_share_it() {
        let request = Request::GroupCreate {
            name: "app".into(),
            mode: "strong".into(),
            key: None,
            evict_after_ms: None,
            fencing: None,
            release: None,
        };
        let response = Response::GroupCreated { name: "app".into(), key: "k3y-0f-app".into() };
        table(
            &request,
            &response,
            expect![[r#"
                [exit 0]
                created group app (strong)
                key: k3y-0f-app
                share it: put it in a file only you can read, then run konorctl group join app --key-file FILE (or set KONOR_GROUP_KEY) on the nodes that should hold it
            "#]],
        );
    }

    #[test]
    fn group_list_table() {
        let groups = vec![
            GroupRow {
                name: "app".into(),
                mode: "strong".into(),
                version: "v12".into(),
                revision: 14,
                keys: 3,
                members: vec!["n1".into(), "n2".into()],
            },
            GroupRow {
                name: "feature-flags".into(),
                mode: "eventual".into(),
                version: "v2".into(),
                revision: 1203,
                keys: 140,
                members: vec!["n1".into()],
            },
        ];
        table(
            &Request::GroupList,
            &Response::Groups { groups },
            expect![[r#"
                [exit 0]
                GROUP          MODE      VERSION  REVISION  KEYS  MEMBERS
                app            strong    v12            14     3  n1, n2
                feature-flags  eventual  v2           1203   140  n1
            "#]],
        );
        table(
            &Request::GroupList,
            &Response::Groups { groups: vec![] },
            expect![[r#"
                [exit 0]
                no groups on this node; create one with `konorctl group create NAME --mode eventual|strong`
            "#]],
        );
    }

    #[test]
    fn history_table() {
        table(
            &Request::History { group: "app".into() },
            &Response::History { group: "app".into(), versions: versions() },
            expect![[r#"
                [exit 0]
                VERSION  TIME (UTC)            AUTHOR          KIND    CONTENT       MESSAGE
                v1       2024-05-01T10:30:03Z  alice@konorctl  create  000000000000
                v2       2024-05-01T11:00:03Z  alice@konorctl  set     3fa9c2d1e0aa  pool for the sale
                v3       2024-05-01T11:59:03Z  deploy-bot      apply   77ab01cd9e21  release 4.2 from CI
            "#]],
        );
    }

    #[test]
    fn history_shows_which_version_marked_keys_secret_and_no_hash_where_masked() {
        let mut versions = versions();
        versions[2].secret = vec!["db.password".into(), "api.token".into()];
        for version in &mut versions {
            version.content_hash.clear();
        }
        table(
            &Request::History { group: "app".into() },
            &Response::History { group: "app".into(), versions },
            expect![[r#"
                [exit 0]
                VERSION  TIME (UTC)            AUTHOR          KIND    CONTENT  MARKED SECRET           MESSAGE
                v1       2024-05-01T10:30:03Z  alice@konorctl  create  -
                v2       2024-05-01T11:00:03Z  alice@konorctl  set     -                                pool for the sale
                v3       2024-05-01T11:59:03Z  deploy-bot      apply   -        db.password, api.token  release 4.2 from CI
            "#]],
        );
    }

    #[test]
    fn history_shows_parents_where_histories_merged() {
        let mut versions = versions();
        versions[2].label = "v3-7f00aa01".into();
        versions[2].parents = vec!["v2".into(), "v2-9c01bb02".into()];
        versions[2].message = "merge".into();
        table(
            &Request::History { group: "app".into() },
            &Response::History { group: "app".into(), versions },
            expect![[r#"
                [exit 0]
                VERSION      TIME (UTC)            AUTHOR          KIND    CONTENT       PARENTS          MESSAGE
                v1           2024-05-01T10:30:03Z  alice@konorctl  create  000000000000
                v2           2024-05-01T11:00:03Z  alice@konorctl  set     3fa9c2d1e0aa  v1               pool for the sale
                v3-7f00aa01  2024-05-01T11:59:03Z  deploy-bot      apply   77ab01cd9e21  v2, v2-9c01bb02  merge
            "#]],
        );
    }

    #[test]
    fn diff_lists_keys_in_order_with_what_happened() {
        let request = Request::Diff { group: "app".into(), from: "v3".into(), to: "v5".into() };
        let response = Response::Diff {
            group: "app".into(),
            added: [("feature.checkout".to_owned(), json!(true)), ("region".to_owned(), json!("eu-west"))]
                .into_iter()
                .collect(),
            removed: [("db.legacy".to_owned(), json!("8080"))].into_iter().collect(),
            changed: [
                ("db.pool".to_owned(), (json!(10), json!(20))),
                ("name".to_owned(), (json!(""), json!({"a": 1}))),
            ]
            .into_iter()
            .collect(),
        };
        table(
            &request,
            &response,
            expect![[r#"
                [exit 0]
                diff app v3 -> v5
                - db.legacy = "8080"
                ~ db.pool = 10 -> 20
                + feature.checkout = true
                ~ name = "" -> {"a":1}
                + region = eu-west
                2 added, 1 removed, 2 changed
            "#]],
        );
        let empty = Response::Diff {
            group: "app".into(),
            added: BTreeMap::new(),
            removed: BTreeMap::new(),
            changed: BTreeMap::new(),
        };
        table(
            &request,
            &empty,
            expect![[r#"
                [exit 0]
                no difference between v3 and v5 in group app
            "#]],
        );
    }

    #[test]
    fn nodes_table() {
        let nodes = vec![
            NodeRow {
                id: "n1".into(),
                address: "10.0.0.1:7400".into(),
                labels: [("region".to_owned(), "eu-west".to_owned()), ("rack".to_owned(), "r1".to_owned())]
                    .into_iter()
                    .collect(),
                state: "live".into(),
                last_heartbeat_ms: None,
                is_self: true,
                degraded: None,
            },
            NodeRow {
                id: "n2".into(),
                address: "10.0.0.2:7400".into(),
                labels: BTreeMap::new(),
                state: "live".into(),
                last_heartbeat_ms: Some(180),
                is_self: false,
                degraded: None,
            },
            NodeRow {
                id: "n3".into(),
                address: "10.0.0.3:7400".into(),
                labels: [("region".to_owned(), "us-east".to_owned())].into_iter().collect(),
                state: "dead".into(),
                last_heartbeat_ms: Some(754_000),
                is_self: false,
                degraded: None,
            },
            NodeRow {
                id: "n4".into(),
                address: "10.0.0.4:7400".into(),
                labels: BTreeMap::new(),
                state: "unknown".into(),
                last_heartbeat_ms: Some(40),
                is_self: false,
                degraded: None,
            },
        ];
        table(
            &Request::Nodes,
            &Response::Nodes { nodes },
            expect![[r#"
                [exit 0]
                NODE       ADDRESS        STATE    HEARTBEAT   LABELS
                n1 (self)  10.0.0.1:7400  live     -           rack=r1,region=eu-west
                n2         10.0.0.2:7400  live     180ms ago
                n3         10.0.0.3:7400  dead     12m34s ago  region=us-east
                n4         10.0.0.4:7400  unknown  40ms ago
            "#]],
        );
    }

    #[test]
    fn status_table() {
        let nodes = vec![
            NodeGroupRow {
                node: "n1".into(),
                version: "v12".into(),
                revision: 14,
                heads: "0a1b2c3d4e5f6a7b".into(),
                live: true,
                key: None,
                other_key: false,
            },
            NodeGroupRow {
                node: "n2".into(),
                version: "v12".into(),
                revision: 9,
                heads: "0a1b2c3d4e5f6a7b".into(),
                live: true,
                key: None,
                other_key: false,
            },
            NodeGroupRow {
                node: "n3".into(),
                version: "v11".into(),
                revision: 13,
                heads: "77ab01cd9e21ff00".into(),
                live: false,
                key: None,
                other_key: false,
            },
        ];
        let processes = vec![
            ProcessRow {
                node: "n1".into(),
                pid: 4121,
                process: "api".into(),
                version: "v12".into(),
                revision: 14,
                result: ApplyResult::Ok,
                time_ms: NOW_MS - 3_000,
                gone_ms: None,
                release: None,
                superseded: false,
                error_rate: None,
            },
            ProcessRow {
                node: "n2".into(),
                pid: 977,
                process: "worker".into(),
                version: "v11".into(),
                revision: 13,
                result: ApplyResult::Error { message: "pool must be at most 16".into() },
                time_ms: NOW_MS - 7_380_000,
                gone_ms: None,
                release: None,
                superseded: false,
                error_rate: None,
            },
            ProcessRow {
                node: "n1".into(),
                pid: 4000,
                process: "api".into(),
                version: "v10".into(),
                revision: 11,
                result: ApplyResult::Ok,
                time_ms: NOW_MS - 9_000_000,
                gone_ms: Some(NOW_MS - 60_000),
                release: None,
                superseded: false,
                error_rate: None,
            },
        ];
        let request = Request::Status { group: "app".into() };
        table(
            &request,
            &Response::Status {
                group: "app".into(),
                mode: "strong".into(),
                nodes: nodes.clone(),
                processes,
                members: vec!["n1".into(), "n2".into(), "n3".into()],
                live: vec!["n1".into(), "n2".into()],
                quorum: 2,
                last_write: Some(("v12".into(), vec!["n1".into(), "n2".into()])),
                fenced: false,
                fenced_reason: None,
                configuration: Some("c3 [n1, n2]".into()),
                unknown: Vec::new(),
                degraded: None,
                release: None,
            },
            expect![[r#"
                [exit 0]
                group app (strong)
                configuration: c3 [n1, n2]
                NODE  VERSION  REVISION  HEADS             LIVE
                n1    v12            14  0a1b2c3d4e5f6a7b  yes
                n2    v12             9  0a1b2c3d4e5f6a7b  yes
                n3    v11            13  77ab01cd9e21ff00  no
                2 of 3 nodes live (a strong write needs every member of the configuration); the live nodes hold identical state
                last write on this node: v12, acked by n1, n2

                NODE   PID  PROCESS  VERSION  REVISION  RESULT                          REPORTED
                n1    4121  api      v12            14  ok                              3s ago
                n2     977  worker   v11            13  error: pool must be at most 16  2h03m ago
                drift: 1 of 2 processes: worker (pid 977) on n2: its last apply failed

                gone (history of processes that went away):
                NODE   PID  PROCESS  VERSION  RESULT  GONE
                n1    4000  api      v10      ok      1m00s ago
            "#]],
        );
        let mut diverged = nodes;
        diverged[1].heads = "ffffffffffffffff".into();
        table(
            &request,
            &Response::Status {
                group: "app".into(),
                mode: "eventual".into(),
                nodes: diverged,
                processes: vec![],
                members: vec![],
                live: vec![],
                quorum: 0,
                last_write: None,
                fenced: true,
                fenced_reason: None,
                configuration: None,
                unknown: Vec::new(),
                degraded: None,
                release: None,
            },
            expect![[r#"
                [exit 0]
                group app (eventual)
                fenced: this node serves app as possibly stale
                NODE  VERSION  REVISION  HEADS             LIVE
                n1    v12            14  0a1b2c3d4e5f6a7b  yes
                n2    v12             9  ffffffffffffffff  yes
                n3    v11            13  77ab01cd9e21ff00  no
                2 of 3 nodes live; the live nodes differ (2 distinct heads): still syncing, or partitioned

                no live process has reported using this group
            "#]],
        );
        // A rotation on its way: n1 and n2 hold generation 1, n3 still the first key.
        let mut rotating = nodes_with_keys();
        rotating[2].other_key = true;
        table(
            &request,
            &Response::Status {
                group: "app".into(),
                mode: "eventual".into(),
                nodes: rotating,
                processes: vec![],
                members: vec![],
                live: vec![],
                quorum: 2,
                last_write: None,
                fenced: false,
                fenced_reason: None,
                configuration: None,
                unknown: Vec::new(),
                degraded: None,
                release: None,
            },
            expect![[r#"
                [exit 0]
                group app (eventual)
                NODE  VERSION  REVISION  HEADS             LIVE  KEY
                n1    v3              3  0a1b2c3d4e5f6a7b  yes   1
                n2    v3              3  0a1b2c3d4e5f6a7b  yes   1
                n3    v3              3  0a1b2c3d4e5f6a7b  yes   0 (another key)
                another key: n3 (a key rotation on its way, or one they missed; they exchange nothing of app with this node)
                2 of 2 nodes live (quorum 2); the live nodes hold identical state

                no live process has reported using this group
            "#]],
        );
    }

    fn nodes_with_keys() -> Vec<NodeGroupRow> {
        ["n1", "n2", "n3"]
            .into_iter()
            .map(|node| NodeGroupRow {
                node: node.into(),
                version: "v3".into(),
                revision: 3,
                heads: "0a1b2c3d4e5f6a7b".into(),
                live: true,
                key: (node != "n3").then(|| "1-00112233aabbccdd".to_owned()),
                other_key: false,
            })
            .collect()
    }

    #[test]
    fn conflicts_table() {
        let conflicts = vec![ConflictRow {
            key: "db.pool".into(),
            winner: json!(20),
            winner_version: Some("v7-3fa9c2d1".into()),
            losers: vec![(json!(15), Some("v7-77ab01cd".into())), (json!("x, y"), None)],
        }];
        table(
            &Request::Conflicts { group: "app".into() },
            &Response::Conflicts { group: "app".into(), conflicts },
            expect![[r#"
                [exit 0]
                KEY      VALUE  FROM         LOST
                db.pool  20     v7-3fa9c2d1  15 (v7-77ab01cd); x, y (unknown)
                the VALUE column is served on every node; set the key again to choose another
            "#]],
        );
    }

    #[test]
    fn get_prints_the_value_or_fails_when_unset() {
        let request = Request::Get { group: "app".into(), key: "db.pool".into() };
        let freshness =
            Freshness { revision: 14, version: "v12".into(), age_ms: 2_000, stale: false, stale_reason: None };
        let value = |value: Option<Value>, freshness: Freshness| Response::Value {
            group: "app".into(),
            key: "db.pool".into(),
            value,
            freshness,
        };
        table(
            &request,
            &value(Some(json!("eu-west")), freshness.clone()),
            expect![[r#"
            [exit 0]
            eu-west
        "#]],
        );
        table(
            &request,
            &value(None, freshness.clone()),
            expect![[r#"
            [exit 1]
            [stderr]
            error: `db.pool` is not set in group app
            hint: `konorctl get app` lists its keys
        "#]],
        );
        let stale = Freshness { stale: true, ..freshness };
        table(
            &request,
            &value(Some(json!({"max": 16})), stale),
            expect![[r#"
                [exit 0]
                {"max":16}
                [stderr]
                warning: this node may be behind; served v12 at revision 14
            "#]],
        );
    }

    #[test]
    fn snapshot_table() {
        let response = Response::Snapshot {
            group: "app".into(),
            settings: [
                ("db.pool".to_owned(), json!(20)),
                ("name".to_owned(), json!("eu-west")),
                ("port".to_owned(), json!("8080")),
            ]
            .into_iter()
            .collect(),
            content_hash: "3fa9c2d1e0aa77ab01cd9e21".into(),
            freshness: Freshness {
                revision: 14,
                version: "v12".into(),
                age_ms: 65_000,
                stale: false,
                stale_reason: None,
            },
        };
        table(
            &Request::Snapshot { group: "app".into(), prefix: None },
            &response,
            expect![[r#"
            [exit 0]
            app@v12 (revision 14, content 3fa9c2d1e0aa, last change 1m05s ago)
            KEY      VALUE
            db.pool  20
            name     eu-west
            port     "8080"
        "#]],
        );
    }

    #[test]
    fn watch_events_are_one_line_each() {
        let change = WatchEvent::Change {
            group: "app".into(),
            revision: 15,
            version: "v13".into(),
            set: [("db.pool".to_owned(), json!(20)), ("name".to_owned(), json!("eu west"))].into_iter().collect(),
            removed: vec!["old.key".into()],
        };
        let resync = WatchEvent::Resync {
            group: "app".into(),
            revision: 3,
            version: "v2".into(),
            settings: [("a".to_owned(), json!(1))].into_iter().collect(),
        };
        let lines = [change.clone(), resync]
            .iter()
            .map(|event| render_event(event, OutputFormat::Table))
            .chain([render_event(&change, OutputFormat::Json)])
            .collect::<Vec<_>>()
            .join("\n");
        expect![[r#"
            app@v13 revision 15: set db.pool = 20, name = eu west; removed old.key
            app@v2 revision 3: resync, 1 key: a = 1
            {"type":"change","group":"app","revision":15,"version":"v13","set":{"db.pool":20,"name":"eu west"},"removed":["old.key"]}"#]]
        .assert_eq(&lines);
    }

    #[test]
    fn values_print_bare_only_when_set_reads_them_back_the_same() {
        for value in
            [json!("eu-west"), json!("8080"), json!(""), json!(" padded"), json!("two\nlines"), json!(null), json!([1])]
        {
            let shown = display_value(&value);
            if let Value::String(text) = &value
                && shown == *text
            {
                assert_eq!(parse_cli_value(&shown).unwrap(), value);
            } else {
                assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), value, "{shown}");
            }
        }
        assert_eq!(display_value(&json!("8080")), "\"8080\"");
        assert_eq!(display_value(&json!("eu-west")), "eu-west");
    }

    #[test]
    fn utc_times_and_ages() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(NOW_MS + 999), "2024-05-01T12:00:03Z");
        assert_eq!(format_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(4_102_444_799_000), "2099-12-31T23:59:59Z");
        let ages =
            [0, 999, 1_000, 59_999, 60_000, 3_599_999, 3_600_000, 86_400_000 + 3_600_000 * 4].map(format_age).join(" ");
        expect!["0ms 999ms 1s 59s 1m00s 59m59s 1h00m 1d04h"].assert_eq(&ages);
    }
}
