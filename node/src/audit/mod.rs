//! The audit log (issue 17, item 4; SPEC F17): every admin action and release, every refusal
//! of the roles, and every enrollment, as hash-chained records (`chain.rs`) in append-only
//! files (`files.rs`): who (the authenticated identity), what (the request, its group, the
//! version or id it made), when, from where, and the outcome.
//!
//! Each node writes its own chain from both doors (the socket and the HTTP API) and spreads
//! its last records through gossip (`aud:<slot>`, signed as all its gossip); every node keeps
//! a copy of every other node's chain (`daemon/audit_gossip.rs`), so the record of an action
//! outlives the node it was taken on and `konorctl audit list` on any node shows the mesh's.
//! Configuration writes (`set`, `delete`, `apply`) are not audited here: each is a version of
//! its group, with its authenticated author, in the group's own history.

pub mod chain;
pub mod files;

use std::sync::{Arc, Mutex};

use konor_sdk::protocol::{Request, Response};
use tracing::error;

use self::chain::AuditRecord;
use self::files::AuditFiles;

/// A node's audit files, shared by its doors and its daemon.
#[derive(Debug, Clone)]
pub struct Audit {
    files: Arc<Mutex<AuditFiles>>,
    /// `audit` queries reading now (at most [`AUDIT_QUERIES_MAX`]).
    queries: Arc<std::sync::atomic::AtomicUsize>,
}

impl Audit {
    /// Opens the audit files of `data_dir` for node `node`.
    pub fn open(data_dir: &std::path::Path, node: &str) -> Result<Audit, String> {
        Ok(Audit { files: Arc::new(Mutex::new(AuditFiles::open(data_dir, node)?)), queries: Arc::default() })
    }

    fn files(&self) -> std::sync::MutexGuard<'_, AuditFiles> {
        self.files.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `record` to this node's chain, off the caller's thread (an fsync). A failure is
    /// logged: the action already happened, and an audit log that cannot be written is an
    /// operator's emergency, not a reason to undo it.
    pub async fn record(&self, record: AuditRecord) {
        let audit = self.clone();
        let written = tokio::task::spawn_blocking(move || audit.files().append_own(record)).await;
        match written {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => error!(%error, "cannot write the audit log: this action is not audited"),
            Err(error) => error!(%error, "the audit log writer failed: this action is not audited"),
        }
    }

    /// This node's last records, oldest first (for gossip).
    pub fn recent(&self) -> Vec<AuditRecord> {
        self.files().recent().cloned().collect()
    }

    /// The last place held of `node`'s chain.
    pub fn head(&self, node: &str) -> u64 {
        self.files().head(node)
    }

    /// The last place held of each node's chain.
    pub fn heads(&self) -> std::collections::BTreeMap<String, u64> {
        self.files().heads()
    }

    /// Appends peers' records (sorted by node, then place) to their copies (blocking: fsyncs).
    pub fn append_copies(&self, records: &[AuditRecord]) -> Result<usize, String> {
        self.files().append_copies(records)
    }
}

/// Most records one `audit` answer carries (the newest that match): at the free-text caps a
/// record is a few KiB, so an answer stays within a socket frame (`encode_answer` refuses one
/// that would not).
pub const AUDIT_ANSWER_RECORDS_MAX: usize = 2_000;

/// `audit` queries read at once: each may read every chain (up to 16 MiB a node) and hold an
/// answer's records; more wait for none and are told `busy`.
pub const AUDIT_QUERIES_MAX: usize = 2;

/// What `audit` asks for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only records at or after this time.
    pub since_ms: Option<u64>,
    /// Only records about this group.
    pub group: Option<String>,
    /// Only records of this node.
    pub node: Option<String>,
}

impl Audit {
    /// The newest records that match `query` (at most [`AUDIT_ANSWER_RECORDS_MAX`]), oldest
    /// first, read from the files as streams (blocking). `gone` says the caller stopped
    /// waiting: the read stops. At most [`AUDIT_QUERIES_MAX`] run at once; others are `busy`.
    pub fn query(&self, query: &Query, gone: &dyn Fn() -> bool) -> konor_sdk::protocol::Response {
        use konor_sdk::protocol::{ErrorCode, Response};
        use std::sync::atomic::Ordering;
        if self.queries.fetch_add(1, Ordering::AcqRel) >= AUDIT_QUERIES_MAX {
            self.queries.fetch_sub(1, Ordering::AcqRel);
            return Response::Error {
                code: ErrorCode::Busy,
                message: format!("{AUDIT_QUERIES_MAX} audit queries are reading already; ask again shortly"),
            };
        }
        let dir = self.files().dir().to_owned();
        let answer = files::query(&dir, query, AUDIT_ANSWER_RECORDS_MAX, gone);
        self.queries.fetch_sub(1, Ordering::AcqRel);
        match answer {
            Ok((records, truncated)) => {
                Response::Audit { records: records.into_iter().map(row_of).collect(), truncated }
            }
            Err(error) => {
                Response::Error { code: ErrorCode::Internal, message: format!("cannot read the audit log: {error}") }
            }
        }
    }
}

/// A record as the socket and the HTTP API answer it.
pub fn row_of(record: AuditRecord) -> konor_sdk::protocol::AuditRow {
    let AuditRecord { node, seq, at_ms, who, from, action, group, detail, outcome, hash, .. } = record;
    konor_sdk::protocol::AuditRow { node, seq, at_ms, who, from, action, group, detail, outcome, hash }
}

/// Whether a request is an admin action or a release (audited whatever its outcome; a refused
/// request of any kind is audited too).
pub fn audited(request: &Request) -> bool {
    matches!(
        request,
        Request::GroupCreate { .. }
            | Request::GroupJoin { .. }
            | Request::GroupLeave { .. }
            | Request::GroupRemove { .. }
            | Request::GroupRotateKey { .. }
            | Request::SchemaSet { .. }
            | Request::Release { .. }
            | Request::Promote { .. }
            | Request::Abort { .. }
            | Request::Rollback { .. }
            | Request::Revoke { .. }
    )
}

/// A record (to be sealed) of `request` answered with `response`.
pub fn record_of(who: String, from: String, request: &Request, response: &Response) -> AuditRecord {
    let (outcome, detail) = match response {
        // A refusal's message says who and why; other errors' may quote a group's values (a
        // schema violation names the value), which must not spread to every node: code only.
        Response::Error { code: code @ konor_sdk::protocol::ErrorCode::Forbidden, message } => {
            (code.as_str().to_owned(), Some(message.clone()))
        }
        Response::Error { code, .. } => (code.as_str().to_owned(), None),
        Response::Committed { version, .. } => ("ok".to_owned(), Some(version.clone())),
        Response::Revoked { id, .. } => ("ok".to_owned(), Some(id.clone())),
        // The generation, never the key.
        Response::KeyRotated { generation, entitled, .. } => {
            ("ok".to_owned(), Some(format!("generation {generation}, {entitled} members entitled")))
        }
        _ => ("ok".to_owned(), None),
    };
    unsealed(who, from, request.kind(), request.group().map(str::to_owned), detail, outcome)
}

/// A record with the given fields, not sealed yet.
pub fn unsealed(
    who: String,
    from: String,
    action: &str,
    group: Option<String>,
    detail: Option<String>,
    outcome: String,
) -> AuditRecord {
    AuditRecord {
        node: String::new(),
        seq: 0,
        at_ms: crate::wall_clock::unix_millis(),
        who,
        from,
        action: action.to_owned(),
        group,
        detail,
        outcome,
        prev: String::new(),
        hash: String::new(),
    }
}
