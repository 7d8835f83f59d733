//! [`SdkError`]: everything that can go wrong talking to `konord`, for the client and for the
//! connection checks alike.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{DAEMON_UID_ENV, ErrorCode, FrameError, Response};

/// Everything that can go wrong talking to `konord`.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// The socket could not be reached. Nothing was sent.
    #[error(
        "cannot connect to konord at {}: {detail}; is konord running? set KONOR_SOCKET or --socket",
        path.display()
    )]
    Connect {
        /// The socket path tried.
        path: PathBuf,
        /// What the operating system said.
        detail: String,
    },
    /// `KONOR_SOCKET` is not set, so there is no path to connect to. Nothing was sent.
    #[error(
        "KONOR_SOCKET is not set: set it to konord's socket path (<data-dir>/konord.sock) \
         or pass the path to Client::connect"
    )]
    SocketUnset,
    /// The daemon speaks another protocol version, or answered something this SDK does not
    /// understand. The request may have been applied when it was a write.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The daemon refused the request; nothing changed.
    #[error("konord refused the request ({code}): {message}", code = code.as_str())]
    Daemon {
        /// Machine-readable class.
        code: ErrorCode,
        /// What was wrong and what to do.
        message: String,
    },
    /// No answer in time. A write may or may not have been applied; reading it back tells.
    #[error("no answer from konord within {} ms; a write may or may not have been applied", waited.as_millis())]
    Timeout {
        /// How long the call waited.
        waited: Duration,
    },
    /// The connection closed before the answer. A write in flight may or may not have been
    /// applied; the next call reconnects.
    #[error("connection to konord closed: {0}")]
    Closed(String),
    /// A frame could not be encoded, or the daemon sent one that could not be decoded (the
    /// connection was then closed).
    #[error("bad frame on the konord socket: {0}")]
    Frame(#[from] FrameError),
    /// A value or the settings did not deserialize into the requested type. Nothing changed.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// The request cannot go through this method (for instance `Watch` through `call`). Nothing
    /// was sent.
    #[error("invalid call: {0}")]
    InvalidCall(String),
    /// The process listening on the socket runs as a user this client does not trust as konord
    /// (see [`DaemonUid`](crate::connect::DaemonUid)). Nothing was sent.
    #[error("{}", untrusted_daemon(path, *uid, *own, *also))]
    UntrustedDaemon {
        /// The socket path.
        path: PathBuf,
        /// The uid the listening process runs as (its peer credentials).
        uid: u32,
        /// This process's effective uid.
        own: u32,
        /// The uid named as konord's, if one was.
        also: Option<u32>,
    },
    /// A client setting (such as `KONOR_DAEMON_UID`) is invalid. Nothing was sent.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
}

fn untrusted_daemon(path: &Path, uid: u32, own: u32, also: Option<u32>) -> String {
    let named = also.map(|also| format!(", nor as uid {also} named as konord's")).unwrap_or_default();
    format!(
        "the process listening on {} runs as uid {uid}, not as root or as this process's uid {own}{named}, so it may \
         not be konord and nothing was sent to it; if konord does run as uid {uid}, set {DAEMON_UID_ENV}={uid} \
         (or ConnectOptions::daemon_uid)",
        path.display()
    )
}

/// The error for an answer of another kind than `expected`: the daemon's own refusal, or a
/// protocol error.
pub(crate) fn unexpected(expected: &str, response: &Response) -> SdkError {
    match response {
        Response::Error { code, message } => SdkError::Daemon { code: *code, message: message.clone() },
        other => SdkError::Protocol(format!("expected a `{expected}` answer, got `{}`", other.kind())),
    }
}
