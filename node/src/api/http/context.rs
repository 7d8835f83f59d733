//! Who is calling on one connection (fixed by its TLS handshake), and what each route's handler
//! shares: the door and the caller, with the rules that follow from the caller's identity.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use konor_sdk::protocol::{ErrorCode, Response, WriteMeta};

/// The answer to a request the roles refused.
pub(super) fn forbidden(message: String) -> Response {
    Response::Error { code: ErrorCode::Forbidden, message }
}
use serde::Deserialize;
use tracing::warn;

use super::Door;
use super::answer::{HttpError, http_error};
use crate::api::authorize::{Principal, authorize};
use crate::api::socket::ClientInfo;

/// The process name the daemon sees for an HTTP caller without a certificate.
const PROCESS: &str = "http";

/// Who is calling on one connection.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The identity in the client certificate (`<id>` of `<id>.node.konor`); `None` without one.
    pub(crate) identity: Option<String>,
    /// The remote address.
    pub(crate) remote: SocketAddr,
}

/// A route's state: the door and the caller of the connection.
#[derive(Debug, Clone)]
pub(super) struct Ctx {
    pub(super) door: Arc<Door>,
    pub(super) caller: Caller,
}

impl Ctx {
    /// The caller's identity, or the answer that refuses a caller without a certificate.
    pub(super) fn identity(&self) -> Result<&str, HttpError> {
        self.caller.identity.as_deref().ok_or_else(|| {
            http_error(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "this route needs a client certificate issued by the cluster CA (konorctl cert issue); health, metrics, the dashboard page and the OpenAPI description are open without one (reads too, on a node started with --http-open-reads)",
            )
        })
    }

    /// The roles check (`api/authorize.rs`, the same as the socket's) for this caller; the
    /// refusal (logged) is the `forbidden` answer's message ([`forbidden`]).
    pub(super) fn authorize(&self, request: &konor_sdk::protocol::Request) -> Result<(), String> {
        let principal = self.principal();
        authorize(self.door.roles.as_deref(), &principal, request).map_err(|message| {
            if let Some(refused_so_far) = crate::api::authorize::refusal_to_log() {
                warn!(%principal, remote = %self.caller.remote, request = request.kind(), %message, refused_so_far, "HTTP request refused: forbidden");
            }
            message
        })
    }

    /// The caller, as the roles check names it.
    fn principal(&self) -> Principal {
        match &self.caller.identity {
            Some(identity) => Principal::Certificate(identity.clone()),
            None => Principal::Anonymous,
        }
    }

    /// Records `request`, answered `response`, in the audit log (if this node keeps one).
    pub(super) async fn audit(&self, request: &konor_sdk::protocol::Request, response: &Response) {
        if let Some(audit) = &self.door.audit {
            audit
                .record(crate::audit::record_of(self.audit_who(), self.caller.remote.to_string(), request, response))
                .await;
        }
    }

    /// Who, as the audit log names this caller.
    pub(super) fn audit_who(&self) -> String {
        self.caller.identity.as_ref().map_or_else(|| "anonymous".to_owned(), |identity| format!("cert:{identity}"))
    }

    /// Refuses a read to a caller without a certificate, unless the node serves reads openly.
    pub(super) fn may_read(&self) -> Result<(), HttpError> {
        if self.door.open_reads {
            return Ok(());
        }
        self.identity().map(|_| ())
    }

    /// The caller as the daemon sees it: its process name is the certificate's identity, so
    /// versions it makes are authored `<identity>@<this node>`.
    pub(super) fn client(&self, connection: u64) -> ClientInfo {
        let process = self.caller.identity.clone().unwrap_or_else(|| PROCESS.to_owned());
        let reveal = crate::api::authorize::reveals(self.door.roles.as_deref(), &self.principal());
        ClientInfo { connection, pid: 0, process, uid: None, user: self.caller.identity.clone(), reveal }
    }

    /// Write metadata for an authenticated caller. The author is left to the daemon, which
    /// takes it from the certificate's identity: an HTTP caller cannot claim another.
    pub(super) fn meta(&self, fields: WriteFields) -> Result<WriteMeta, HttpError> {
        self.identity()?;
        let WriteFields { message, if_version, if_content, secret } = fields;
        Ok(WriteMeta { author: String::new(), message: message.unwrap_or_default(), if_version, if_content, secret })
    }
}

/// A write's message and precondition (SPEC F5), in a body or a query.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct WriteFields {
    #[serde(default)]
    pub(super) message: Option<String>,
    /// Write only if the group's only latest version is this one.
    #[serde(default)]
    pub(super) if_version: Option<String>,
    /// Write only if the group's content hash starts with these hex digits.
    #[serde(default)]
    pub(super) if_content: Option<String>,
    /// Keys to mark secret (issue 17). Only in a body: a query string lands in access logs.
    #[serde(default)]
    pub(super) secret: Vec<String>,
}
