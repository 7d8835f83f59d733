//! Who may do what (SPEC F23, issue 17 item 3): one check for both doors. A node's settings
//! file may carry a `[roles]` table that grants each caller a role, optionally scoped to some
//! groups; the socket names its callers by their peer credentials (uid, gid) and the HTTP API by
//! the identity in their client certificate. Without a `[roles]` table nothing is checked here
//! (the socket's file mode and the HTTP API's client certificates decide, as before).
//!
//! Roles, each including the one before:
//! * `viewer`: reads, watches, status and history;
//! * `app`: and its own apply and error-rate reports (an application; reports feed the release
//!   guards, which can abort a release);
//! * `operator`: writes and releases (`set`, `delete`, `apply`, `rollback`, `release`,
//!   `promote`, `abort`, `schema_set`);
//! * `admin`: groups (create, join, leave, remove members, rotate keys), certificate revocations and the
//!   audit log (`audit list`).

use std::collections::{BTreeMap, BTreeSet};

use konor_sdk::protocol::Request;

/// A role, in increasing power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads.
    Viewer,
    /// And the caller's own apply and error-rate reports: what an application does. Reports feed
    /// release guards, which abort a release, so a viewer may not send them.
    App,
    /// And writes and releases.
    Operator,
    /// And groups, revocations and the audit log.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::App => "app",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What a caller is granted: a role, in every group or only in some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The role.
    pub role: Role,
    /// The groups it holds in (`None`: every group). Requests that name no group are judged by
    /// the role alone.
    pub groups: Option<BTreeSet<String>>,
}

/// Who is calling, as the door authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A socket caller, by its peer credentials (`None` where the OS gave none).
    Local {
        /// User id.
        uid: Option<u32>,
        /// Primary group id.
        gid: Option<u32>,
    },
    /// An HTTP caller with a client certificate from the cluster CA, by its identity.
    Certificate(String),
    /// An HTTP caller without a certificate (reads only, and only with `--http-open-reads`).
    Anonymous,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Local { uid: Some(uid), .. } => write!(f, "uid:{uid}"),
            Principal::Local { uid: None, .. } => f.write_str("uid:unknown"),
            Principal::Certificate(identity) => write!(f, "cert:{identity}"),
            Principal::Anonymous => f.write_str("anonymous"),
        }
    }
}

/// Refusals so far, process-wide: logged at the 1st, 2nd, 4th, 8th... so a caller without a
/// role cannot flood the log.
static REFUSALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a refusal; `Some(count)` when it should be logged.
pub fn refusal_to_log() -> Option<u64> {
    let count = REFUSALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    count.is_power_of_two().then_some(count)
}

/// Entries of a `[roles]` table at most: one per user, group and operator of a node.
pub const ROLE_ENTRIES_MAX: usize = 1024;

/// Groups one grant may be scoped to at most.
pub const ROLE_GROUPS_MAX: usize = 256;

/// The grants of a node (`[roles]` in its settings file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolePolicy {
    by_uid: BTreeMap<u32, Grant>,
    by_gid: BTreeMap<u32, Grant>,
    by_identity: BTreeMap<String, Grant>,
    anonymous: Option<Grant>,
    /// konord's own user: always `admin` (it owns the data dir and the group keys anyway).
    own_uid: u32,
}

impl RolePolicy {
    /// Reads a `[roles]` table: keys `uid:N`, `gid:N`, `cert:IDENTITY` or `anonymous`; values
    /// `viewer`, `operator` or `admin`, optionally followed by `:` and a comma-separated list of
    /// groups (`operator:checkout,search`). Every error names the entry.
    pub fn parse(table: &BTreeMap<String, String>, own_uid: u32) -> Result<RolePolicy, String> {
        if table.len() > ROLE_ENTRIES_MAX {
            return Err(format!("[roles] has {} entries, more than {ROLE_ENTRIES_MAX}", table.len()));
        }
        let mut policy = RolePolicy {
            by_uid: BTreeMap::new(),
            by_gid: BTreeMap::new(),
            by_identity: BTreeMap::new(),
            anonymous: None,
            own_uid,
        };
        for (subject, value) in table {
            let grant = parse_grant(value).map_err(|why| format!("[roles] {subject:?} = {value:?}: {why}"))?;
            // Plain digits, no sign or leading zero: two spellings of one id would overwrite
            // each other.
            let id = |text: &str| {
                let plain = !text.is_empty()
                    && text.bytes().all(|b| b.is_ascii_digit())
                    && (text == "0" || !text.starts_with('0'));
                text.parse::<u32>()
                    .ok()
                    .filter(|_| plain)
                    .ok_or_else(|| format!("[roles] {subject:?}: {text:?} is not a numeric id"))
            };
            if let Some(uid) = subject.strip_prefix("uid:") {
                policy.by_uid.insert(id(uid)?, grant);
            } else if let Some(gid) = subject.strip_prefix("gid:") {
                policy.by_gid.insert(id(gid)?, grant);
            } else if let Some(identity) = subject.strip_prefix("cert:") {
                crate::pki::validate_node_id(identity).map_err(|error| format!("[roles] {subject:?}: {error}"))?;
                policy.by_identity.insert(identity.to_owned(), grant);
            } else if subject == "anonymous" {
                if grant.role != Role::Viewer {
                    return Err(format!(
                        "[roles] \"anonymous\" = {value:?}: callers without a certificate can only be viewers"
                    ));
                }
                policy.anonymous = Some(grant);
            } else {
                return Err(format!(
                    "[roles] {subject:?}: name callers as \"uid:N\", \"gid:N\", \"cert:IDENTITY\" or \"anonymous\""
                ));
            }
        }
        Ok(policy)
    }

    /// The grant of a caller, if any.
    fn grant_of(&self, principal: &Principal) -> Option<std::borrow::Cow<'_, Grant>> {
        match principal {
            Principal::Local { uid, gid } => {
                if *uid == Some(self.own_uid) {
                    return Some(std::borrow::Cow::Owned(Grant { role: Role::Admin, groups: None }));
                }
                uid.and_then(|uid| self.by_uid.get(&uid))
                    .or_else(|| gid.and_then(|gid| self.by_gid.get(&gid)))
                    .map(std::borrow::Cow::Borrowed)
            }
            Principal::Certificate(identity) => self.by_identity.get(identity).map(std::borrow::Cow::Borrowed),
            Principal::Anonymous => self.anonymous.as_ref().map(std::borrow::Cow::Borrowed),
        }
    }
}

/// Bytes of `/etc/passwd` read to name a user: far more than any real one.
const PASSWD_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// The name of user `uid` as `/etc/passwd` gives it, else `uid:N`: who a socket caller is, for
/// the versions it authors.
pub fn user_name(uid: u32) -> String {
    use std::io::Read as _;
    let mut text = String::new();
    let read = std::fs::File::open("/etc/passwd")
        .and_then(|file| file.take(PASSWD_BYTES_MAX).read_to_string(&mut text))
        .is_ok();
    let found = read
        .then(|| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id = fields.nth(1)?.parse::<u32>().ok()?;
                let plain = !name.is_empty()
                    && name.len() <= 64
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                (id == uid && plain).then(|| name.to_owned())
            })
        })
        .flatten();
    found.unwrap_or_else(|| format!("uid:{uid}"))
}

fn parse_grant(value: &str) -> Result<Grant, String> {
    let (role, groups) = match value.split_once(':') {
        Some((role, groups)) => (role, Some(groups)),
        None => (value, None),
    };
    let role = match role.trim() {
        "viewer" => Role::Viewer,
        "app" => Role::App,
        "operator" => Role::Operator,
        "admin" => Role::Admin,
        other => return Err(format!("unknown role {other:?}; use viewer, app, operator or admin")),
    };
    let groups = match groups {
        None => None,
        Some(list) => {
            let groups: BTreeSet<String> = list.split(',').map(|group| group.trim().to_owned()).collect();
            if groups.len() > ROLE_GROUPS_MAX {
                return Err(format!("more than {ROLE_GROUPS_MAX} groups"));
            }
            for group in &groups {
                konor_crdt::key::validate_group_name(group).map_err(|error| error.to_string())?;
            }
            Some(groups)
        }
    };
    Ok(Grant { role, groups })
}

/// Whether `principal` reads secret values (issue 17) rather than [`konor_sdk::protocol::MASKED`]:
/// callers of role `app` and above, as Kubernetes' `view` role reads no Secrets while `edit`
/// does (an application needs its own secrets; a dashboard viewer does not). Without `[roles]`,
/// every caller the door let in but one without a certificate (`--http-open-reads`).
pub fn reveals(policy: Option<&RolePolicy>, principal: &Principal) -> bool {
    match policy {
        None => !matches!(principal, Principal::Anonymous),
        Some(policy) => policy.grant_of(principal).is_some_and(|grant| grant.role >= Role::App),
    }
}

/// The role a request needs.
pub fn needed(request: &Request) -> Role {
    match request {
        Request::Hello { .. }
        | Request::Get { .. }
        | Request::Snapshot { .. }
        | Request::Watch { .. }
        | Request::Unwatch { .. }
        | Request::GroupList
        | Request::Show { .. }
        | Request::SchemaGet { .. }
        | Request::SchemaCheck { .. }
        | Request::History { .. }
        | Request::Diff { .. }
        | Request::Conflicts { .. }
        | Request::Nodes
        | Request::Status { .. }
        | Request::ReleaseReport { .. }
        | Request::SocketStats
        | Request::Health
        | Request::Alerts
        | Request::NodeHistory { .. }
        | Request::Revocations => Role::Viewer,
        // Who did what on every node: for those who run the cluster.
        Request::Audit { .. } => Role::Admin,
        Request::ReportApply { .. } | Request::ReportErrorRate { .. } => Role::App,
        Request::Set { .. }
        | Request::Delete { .. }
        | Request::Apply { .. }
        | Request::Rollback { .. }
        | Request::Release { .. }
        | Request::Promote { .. }
        | Request::Abort { .. }
        | Request::SchemaSet { .. } => Role::Operator,
        Request::GroupCreate { .. }
        | Request::GroupJoin { .. }
        | Request::GroupLeave { .. }
        | Request::GroupRemove { .. }
        | Request::GroupRotateKey { .. }
        | Request::Revoke { .. } => Role::Admin,
    }
}

/// Whether `principal` may make `request` under `policy` (`None`: no `[roles]`, everything
/// the door let in may). The error is the `forbidden` message for the caller.
pub fn authorize(policy: Option<&RolePolicy>, principal: &Principal, request: &Request) -> Result<(), String> {
    let Some(policy) = policy else { return Ok(()) };
    let needed = needed(request);
    let Some(grant) = policy.grant_of(principal) else {
        return Err(format!(
            "{principal} has no role on this node; `{}` needs {} (the node's settings file, [roles])",
            request.kind(),
            needed.name()
        ));
    };
    if grant.role < needed {
        return Err(format!(
            "{principal} is {} on this node; `{}` needs {}",
            grant.role.name(),
            request.kind(),
            needed.name()
        ));
    }
    if let Some(groups) = &grant.groups {
        match request.group() {
            Some(group) if !groups.contains(group) => {
                return Err(format!("{principal} is {} only in {}; not in {group}", grant.role.name(), list(groups)));
            }
            // A change that names no group acts beyond any (a revocation holds mesh-wide).
            None if needed > Role::App => {
                return Err(format!(
                    "{principal} is {} only in {}; `{}` needs {} in every group",
                    grant.role.name(),
                    list(groups),
                    request.kind(),
                    needed.name()
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn list(groups: &BTreeSet<String>) -> String {
    groups.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use konor_sdk::protocol::WriteMeta;

    fn policy() -> RolePolicy {
        let table: BTreeMap<String, String> = [
            ("uid:1000", "viewer"),
            ("uid:1001", "operator:checkout"),
            ("gid:2000", "operator"),
            ("cert:ops-alice", "admin"),
            ("cert:ops-bob", "operator:checkout, search"),
            ("anonymous", "viewer"),
            ("uid:1005", "app"),
            ("uid:1006", "admin:checkout"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        RolePolicy::parse(&table, 999).unwrap()
    }

    fn set(group: &str) -> Request {
        Request::Set { group: group.into(), entries: BTreeMap::new(), meta: WriteMeta::default() }
    }

    fn create(group: &str) -> Request {
        Request::GroupCreate {
            name: group.into(),
            mode: "eventual".into(),
            key: None,
            evict_after_ms: None,
            fencing: None,
            release: None,
        }
    }

    #[test]
    fn each_role_may_do_what_it_names_and_nothing_more() {
        let policy = policy();
        let local = |uid, gid| Principal::Local { uid: Some(uid), gid: Some(gid) };
        let get = Request::Get { group: "checkout".into(), key: "k".into() };
        let report = Request::ReportErrorRate { group: "checkout".into(), rate: 0.5 };
        let revoke = Request::Revoke { revocation: String::new() };
        let cases = [
            (local(1000, 1), &get, true),
            (local(1000, 1), &set("checkout"), false),
            (local(1001, 1), &set("checkout"), true),
            (local(1001, 1), &set("search"), false),
            (local(1001, 1), &create("checkout"), false),
            (local(1002, 2000), &set("search"), true),
            (local(1002, 2001), &get, false),
            (local(999, 0), &create("anything"), true),
            (Principal::Certificate("ops-alice".into()), &create("x"), true),
            (Principal::Certificate("ops-bob".into()), &set("search"), true),
            (Principal::Certificate("ops-bob".into()), &Request::Nodes, true),
            (Principal::Certificate("ops-carol".into()), &get, false),
            (Principal::Anonymous, &get, true),
            (Principal::Anonymous, &set("checkout"), false),
            (local(1000, 1), &report, false),
            (local(1005, 1), &report, true),
            (local(1005, 1), &set("checkout"), false),
            (local(1006, 1), &create("checkout"), true),
            (local(1006, 1), &revoke, false),
            (Principal::Certificate("ops-alice".into()), &revoke, true),
        ];
        for (principal, request, allowed) in cases {
            assert_eq!(authorize(Some(&policy), &principal, request).is_ok(), allowed, "{principal} {request:?}");
        }
        assert!(authorize(None, &Principal::Anonymous, &create("x")).is_ok(), "no [roles]: not checked here");
    }

    #[test]
    fn apps_and_above_reveal_secrets_viewers_and_anonymous_callers_do_not() {
        let policy = policy();
        let local = |uid| Principal::Local { uid: Some(uid), gid: None };
        let cases = [
            (local(1000), false),
            (local(1005), true),
            (local(1001), true),
            (local(999), true),
            (local(4242), false),
            (Principal::Certificate("ops-alice".into()), true),
            (Principal::Certificate("ops-carol".into()), false),
            (Principal::Anonymous, false),
        ];
        for (principal, reveal) in cases {
            assert_eq!(reveals(Some(&policy), &principal), reveal, "{principal}");
        }
        assert!(reveals(None, &local(4242)), "no [roles]: the socket's mode decides");
        assert!(reveals(None, &Principal::Certificate("ops-carol".into())));
        assert!(!reveals(None, &Principal::Anonymous), "open reads never reveal");
    }

    #[test]
    fn refusals_say_who_what_and_why() {
        let policy = policy();
        let messages = [
            authorize(Some(&policy), &Principal::Local { uid: Some(1000), gid: None }, &set("checkout")),
            authorize(Some(&policy), &Principal::Local { uid: Some(1001), gid: None }, &set("search")),
            authorize(Some(&policy), &Principal::Certificate("ops-carol".into()), &create("x")),
        ]
        .map(|result| result.unwrap_err())
        .join("\n");
        expect![[r#"
            uid:1000 is viewer on this node; `set` needs operator
            uid:1001 is operator only in checkout; not in search
            cert:ops-carol has no role on this node; `group_create` needs admin (the node's settings file, [roles])"#]]
        .assert_eq(&messages);
    }

    #[test]
    fn users_are_named_from_the_password_file() {
        assert_eq!(user_name(0), "root");
        assert_eq!(user_name(4_000_000_000), "uid:4000000000");
    }

    #[test]
    fn a_bad_table_is_refused_naming_the_entry() {
        let errors: Vec<String> = [
            ("user:1", "viewer"),
            ("uid:x", "viewer"),
            ("uid:1", "root"),
            ("cert:Bad_Name", "viewer"),
            ("anonymous", "operator"),
            ("uid:1", "viewer:bad group!"),
            ("uid:01", "viewer"),
        ]
        .into_iter()
        .map(|(k, v)| {
            let table = BTreeMap::from([(k.to_owned(), v.to_owned())]);
            RolePolicy::parse(&table, 0).unwrap_err()
        })
        .collect();
        assert_eq!(errors.len(), 7);
        assert!(errors[6].contains("not a numeric id"), "{}", errors[6]);
        assert!(errors[0].contains("name callers as"), "{}", errors[0]);
        assert!(errors[1].contains("not a numeric id"), "{}", errors[1]);
        assert!(errors[2].contains("unknown role"), "{}", errors[2]);
        assert!(errors[3].contains("invalid node id"), "{}", errors[3]);
        assert!(errors[4].contains("can only be viewers"), "{}", errors[4]);
        assert!(errors[5].contains("bad group!"), "{}", errors[5]);
    }
}
