//! `konorctl`'s exit codes and how each failure maps to one, with the error text it prints.
//! The list is documented in [`crate::ctl::cli::EXIT_CODES_HELP`] and in `konorctl.rs`.

use konor_sdk::SdkError;
use konor_sdk::protocol::ErrorCode;

use crate::ctl::input::InputError;
use crate::pki::PkiError;

/// How `konorctl` ended. The numbers are a promise to scripts: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; also a write that changed nothing.
    Ok,
    /// konord refused the request (bad input, unknown group, not found, wrong key), or could not
    /// commit a write (busy, aborted, no quorum).
    Refused,
    /// The command line is wrong.
    Usage,
    /// konord could not be reached, or did not answer in time.
    Unreachable,
    /// A PKI or file operation failed.
    File,
    /// konord failed internally, or the two sides do not understand each other.
    Internal,
    /// `health`: the node fails a threshold.
    Unhealthy,
    /// `--wait`: the release was aborted, or a newer one replaced it.
    ReleaseAborted,
    /// `--wait`: the wait ran out before the release was complete.
    WaitTimedOut,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Refused => 1,
            Exit::Usage => 2,
            Exit::Unreachable => 3,
            Exit::File => 4,
            Exit::Internal => 5,
            Exit::Unhealthy => 6,
            Exit::ReleaseAborted => 7,
            Exit::WaitTimedOut => 8,
        }
    }
}

/// No socket path was given; nothing was sent.
#[derive(Debug, thiserror::Error)]
#[error(
    "no konord socket given: pass --socket PATH or set KONOR_SOCKET to konord's socket \
     (<data-dir>/konord.sock unless konord was started with --socket)"
)]
pub struct NoSocket;

/// Arguments that parse but do not make sense together; nothing was sent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an answer of konord's that refuses a request.
pub fn exit_for_code(code: ErrorCode) -> Exit {
    match code {
        ErrorCode::Unchanged => Exit::Ok,
        ErrorCode::Internal | ErrorCode::Protocol => Exit::Internal,
        // Like a timeout: the write may or may not have happened.
        ErrorCode::OutcomeUnknown => Exit::Unreachable,
        _ => Exit::Refused,
    }
}

/// The exit code for a failure, from the first cause in its chain that says what kind it is.
pub fn exit_for_error(error: &anyhow::Error) -> Exit {
    for cause in error.chain() {
        if let Some(sdk) = cause.downcast_ref::<SdkError>() {
            return match sdk {
                SdkError::Daemon { code, .. } => exit_for_code(*code),
                SdkError::Connect { .. } | SdkError::SocketUnset | SdkError::Timeout { .. } | SdkError::Closed(_) => {
                    Exit::Unreachable
                }
                _ => Exit::Internal,
            };
        }
        if let Some(input) = cause.downcast_ref::<InputError>() {
            return match input {
                InputError::UnknownFormat { .. } => Exit::Usage,
                _ => Exit::File,
            };
        }
        if cause.is::<PkiError>() {
            return Exit::File;
        }
        if cause.is::<NoSocket>() || cause.is::<crate::ctl::remote::Unreachable>() {
            return Exit::Unreachable;
        }
        if cause.is::<UsageError>() || cause.is::<crate::ctl::remote::BadEndpoint>() {
            return Exit::Usage;
        }
    }
    Exit::Internal
}

/// The text printed to stderr for a failure: `error: ...`, and a `hint: ...` line where one helps.
pub fn render_error(error: &anyhow::Error) -> String {
    // Errors often repeat their source in their own message; print each piece once.
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    let mut text = format!("error: {message}\n");
    let hint = error.chain().find_map(|cause| cause.downcast_ref::<SdkError>()).and_then(|sdk| match sdk {
        SdkError::Timeout { .. } | SdkError::Closed(_) => {
            Some("konord may be stuck or restarting; `konorctl history GROUP` tells whether a write went through")
        }
        SdkError::Protocol(_) => Some("konorctl and konord are different versions; upgrade the older one"),
        SdkError::Daemon { code: ErrorCode::UnknownGroup, .. } => {
            Some("`konorctl group list` shows the groups on this node")
        }
        _ => None,
    });
    if let Some(hint) = hint {
        text.push_str(&format!("hint: {hint}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use std::path::PathBuf;
    use std::time::Duration;

    fn transcript(error: anyhow::Error) -> String {
        format!("[exit {}]\n{}", exit_for_error(&error).code(), render_error(&error))
    }

    #[test]
    fn unreachable_daemon_exits_3() {
        let error = SdkError::Connect { path: PathBuf::from("/run/konord.sock"), detail: "No such file".into() };
        expect![[r#"
            [exit 3]
            error: cannot connect to konord at /run/konord.sock: No such file; is konord running? set KONOR_SOCKET or --socket
        "#]]
        .assert_eq(&transcript(error.into()));
        expect![[r#"
            [exit 3]
            error: no konord socket given: pass --socket PATH or set KONOR_SOCKET to konord's socket (<data-dir>/konord.sock unless konord was started with --socket)
        "#]]
        .assert_eq(&transcript(NoSocket.into()));
    }

    #[test]
    fn timeout_exits_3_with_a_hint() {
        let error = SdkError::Timeout { waited: Duration::from_secs(10) };
        expect![[r#"
            [exit 3]
            error: no answer from konord within 10000 ms; a write may or may not have been applied
            hint: konord may be stuck or restarting; `konorctl history GROUP` tells whether a write went through
        "#]]
        .assert_eq(&transcript(error.into()));
    }

    #[test]
    fn daemon_refusals_exit_1_and_internal_failures_exit_5() {
        let refused = SdkError::Daemon { code: ErrorCode::UnknownGroup, message: "no group `app`".into() };
        expect![[r#"
            [exit 1]
            error: watching app stopped: konord refused the request (unknown_group): no group `app`
            hint: `konorctl group list` shows the groups on this node
        "#]]
        .assert_eq(&transcript(anyhow::Error::from(refused).context("watching app stopped")));
        let internal = SdkError::Daemon { code: ErrorCode::Internal, message: "disk full".into() };
        assert_eq!(exit_for_error(&internal.into()), Exit::Internal);
        let unchanged = SdkError::Daemon { code: ErrorCode::Unchanged, message: "same".into() };
        assert_eq!(exit_for_error(&unchanged.into()), Exit::Ok);
        expect![[r#"
            [exit 5]
            error: protocol error: konord speaks protocol version 2
            hint: konorctl and konord are different versions; upgrade the older one
        "#]]
        .assert_eq(&transcript(SdkError::Protocol("konord speaks protocol version 2".into()).into()));
    }

    #[test]
    fn file_errors_exit_4_and_name_the_file_once() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let error = anyhow::Error::from(InputError::Read { origin: "app.toml".into(), source })
            .context("cannot apply app.toml to group app");
        expect![[r#"
            [exit 4]
            error: cannot apply app.toml to group app: cannot read app.toml: No such file or directory (os error 2)
        "#]]
        .assert_eq(&transcript(error));
        let error = PkiError::NoCa { dir: PathBuf::from("/ca") };
        expect![[r#"
            [exit 4]
            error: no CA in /ca: run `konorctl ca init --dir /ca` first
        "#]]
        .assert_eq(&transcript(error.into()));
    }

    #[test]
    fn usage_errors_exit_2() {
        let error = UsageError("key `a` is given twice".into());
        assert_eq!(exit_for_error(&error.into()), Exit::Usage);
        assert_eq!(exit_for_error(&InputError::UnknownFormat { origin: "stdin".into() }.into()), Exit::Usage);
    }

    #[test]
    fn anything_else_is_internal() {
        assert_eq!(exit_for_error(&anyhow::anyhow!("surprise")), Exit::Internal);
    }
}
