//! How a [`Client`](crate::Client) connects: its timeout, and whose daemon it accepts at the
//! socket path. Before it sends anything on a new connection, the client reads the peer
//! credentials of the connected socket (SO_PEERCRED: the uid of the process that listens) and
//! refuses a daemon that runs as a user it does not trust.
//!
//! On by default: the SDK hands configuration to applications, which act on it, and whoever can
//! create a socket at the path (the daemon is down and its directory is writable by another user,
//! a path under `/tmp`, a wrong `KONOR_SOCKET`) could otherwise serve them any configuration, and
//! would receive every group key a client sends. The common setups pass without a setting: konord
//! running as the application's own user, or as root. A konord with a user of its own is named
//! once, with `KONOR_DAEMON_UID` or [`ConnectOptions::daemon_uid`].

use std::path::Path;
use std::time::Duration;

use tokio::net::UnixStream;

use crate::error::SdkError;
pub use crate::protocol::DAEMON_UID_ENV;

/// How long any one exchange with the daemon may take (connect, a request and its answer, the
/// rest of a frame once its first byte arrived). The daemon answers reads from memory in
/// microseconds and writes after an fsync; 10 s means it is stuck, not slow.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Which users the client accepts as the daemon at the socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DaemonUid {
    /// root, or this process's own (effective) uid. The default.
    #[default]
    RootOrOwn,
    /// root, this process's own uid, or this uid (konord running as a user of its own).
    RootOwnOr(u32),
    /// Any user: no check. Only where the socket's directory is writable by no one else.
    Any,
}

impl DaemonUid {
    /// Reads `KONOR_DAEMON_UID` (absent: [`DaemonUid::RootOrOwn`]).
    pub fn from_env() -> Result<DaemonUid, SdkError> {
        match std::env::var(DAEMON_UID_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(DaemonUid::RootOrOwn),
            Ok(text) => DaemonUid::parse(&text),
            Err(std::env::VarError::NotUnicode(text)) => Err(bad_setting(&text.to_string_lossy())),
        }
    }

    /// `any`, or a uid.
    pub fn parse(text: &str) -> Result<DaemonUid, SdkError> {
        match text.trim() {
            "any" => Ok(DaemonUid::Any),
            number => number.parse().map(DaemonUid::RootOwnOr).map_err(|_| bad_setting(text)),
        }
    }

    fn accepts(self, uid: u32, own: u32) -> bool {
        match self {
            DaemonUid::Any => true,
            DaemonUid::RootOrOwn => uid == 0 || uid == own,
            DaemonUid::RootOwnOr(also) => uid == 0 || uid == own || uid == also,
        }
    }
}

fn bad_setting(text: &str) -> SdkError {
    SdkError::InvalidSetting(format!(
        "{DAEMON_UID_ENV}={text:?} is not a uid: set it to the number of the user konord runs as, or to `any`"
    ))
}

/// How a client connects. Built from [`ConnectOptions::from_env`] or `default()` and the
/// builder methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// How long any one exchange with the daemon may take (default [`TIMEOUT_DEFAULT`]).
    pub timeout: Duration,
    /// Whose daemon is accepted (default [`DaemonUid::RootOrOwn`]).
    pub daemon_uid: DaemonUid,
}

impl Default for ConnectOptions {
    fn default() -> ConnectOptions {
        ConnectOptions { timeout: TIMEOUT_DEFAULT, daemon_uid: DaemonUid::RootOrOwn }
    }
}

impl ConnectOptions {
    /// The defaults, with the accepted daemon user from `KONOR_DAEMON_UID` when it is set.
    pub fn from_env() -> Result<ConnectOptions, SdkError> {
        Ok(ConnectOptions { daemon_uid: DaemonUid::from_env()?, ..ConnectOptions::default() })
    }

    /// These options with another timeout.
    pub fn timeout(self, timeout: Duration) -> ConnectOptions {
        ConnectOptions { timeout, ..self }
    }

    /// These options accepting another set of daemon users.
    pub fn daemon_uid(self, daemon_uid: DaemonUid) -> ConnectOptions {
        ConnectOptions { daemon_uid, ..self }
    }
}

/// Refuses the daemon on `stream` unless `accepted` trusts the user it runs as. Nothing has been
/// sent on the stream yet.
pub(crate) fn check_daemon(stream: &UnixStream, path: &Path, accepted: DaemonUid) -> Result<(), SdkError> {
    if accepted == DaemonUid::Any {
        return Ok(());
    }
    let credentials = stream.peer_cred().map_err(|error| SdkError::Connect {
        path: path.to_owned(),
        detail: format!(
            "cannot read the peer credentials of the socket ({error}), so cannot tell who listens; \
             set {DAEMON_UID_ENV}=any to connect without checking"
        ),
    })?;
    let own = rustix::process::geteuid().as_raw();
    let uid = credentials.uid();
    if accepted.accepts(uid, own) {
        return Ok(());
    }
    let also = match accepted {
        DaemonUid::RootOwnOr(also) => Some(also),
        _ => None,
    };
    Err(SdkError::UntrustedDaemon { path: path.to_owned(), uid, own, also })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    use super::*;
    use crate::Client;
    use crate::protocol::{ClientFrame, Request, Response, ServerFrame, decode_payload, encode_frame, frame_length};

    /// Set by [`a_daemon_of_another_user_is_refused_unless_named`] for the copy of this test
    /// binary that it runs as another user.
    const FAKE_DAEMON_ENV: &str = "KONOR_SDK_TEST_FAKE_DAEMON";

    /// The user the fake daemon runs as (`nobody` on most systems).
    const OTHER_UID: u32 = 65534;

    /// Not a test of its own: a copy of this binary runs it as another user, to listen on the
    /// socket it names and answer hello as konord would. Without the variable it does nothing.
    #[test]
    fn serve_as_a_fake_daemon_when_asked() {
        let Some(path) = std::env::var_os(FAKE_DAEMON_ENV) else { return };
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut header = [0u8; 4];
                while stream.read_exact(&mut header).is_ok() {
                    let mut payload = vec![0u8; frame_length(header).unwrap()];
                    stream.read_exact(&mut payload).unwrap();
                    let frame: ClientFrame = decode_payload(&payload).unwrap();
                    let response = Response::Welcome {
                        protocol: crate::protocol::PROTOCOL_VERSION,
                        node_id: "impostor".into(),
                        daemon_version: "0".into(),
                    };
                    let answer = encode_frame(&ServerFrame::Response { id: frame.id, response }).unwrap();
                    if !matches!(frame.request, Request::Hello { .. }) || stream.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// Issue 12: a process of another user listening where konord should be gets nothing but
    /// a refusal that names its uid and the setting that would trust it. Needs root, to run the
    /// fake daemon as another user; like the namespace tests, it fails rather than skip.
    #[tokio::test]
    async fn a_daemon_of_another_user_is_refused_unless_named() {
        let own = rustix::process::geteuid().as_raw();
        assert_eq!(own, 0, "this test runs a fake daemon as another user, which needs root; run it as root");
        let directory = tempfile::tempdir().unwrap();
        std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = directory.path().join("konord.sock");
        // The other user runs a copy of this test binary from the temp dir: the build dir may
        // sit under a directory only root can enter (a CI clone in a 0700 temp dir).
        let binary = directory.path().join("fake-daemon");
        std::fs::copy(std::env::current_exe().unwrap(), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let daemon = std::process::Command::new(&binary)
            .args(["--exact", "connect::tests::serve_as_a_fake_daemon_when_asked", "--nocapture"])
            .env(FAKE_DAEMON_ENV, &path)
            .uid(OTHER_UID)
            .gid(OTHER_UID)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let _daemon = KillOnDrop(daemon);
        let listening = tokio::time::timeout(Duration::from_secs(10), async {
            while !path.exists() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        assert!(listening.await.is_ok(), "the fake daemon did not listen");

        let error = Client::connect_with(&path, ConnectOptions::default()).await.unwrap_err();
        assert!(matches!(error, SdkError::UntrustedDaemon { uid: OTHER_UID, own: 0, also: None, .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("runs as uid 65534") && message.contains("KONOR_DAEMON_UID=65534"), "{message}");

        let trusting = ConnectOptions::default().daemon_uid(DaemonUid::RootOwnOr(OTHER_UID));
        let client = Client::connect_with(&path, trusting).await.unwrap();
        assert_eq!(client.node_id(), "impostor");
        let anyone = ConnectOptions::default().daemon_uid(DaemonUid::Any);
        assert!(Client::connect_with(&path, anyone).await.is_ok());
    }

    /// Ends the fake daemon however the test ends.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn root_the_own_user_and_a_named_one_are_accepted() {
        assert!(DaemonUid::RootOrOwn.accepts(0, 1000));
        assert!(DaemonUid::RootOrOwn.accepts(1000, 1000));
        assert!(!DaemonUid::RootOrOwn.accepts(998, 1000));
        assert!(DaemonUid::RootOwnOr(998).accepts(998, 1000));
        assert!(!DaemonUid::RootOwnOr(998).accepts(999, 1000));
        assert!(DaemonUid::Any.accepts(999, 1000));
    }

    #[test]
    fn the_setting_reads_a_uid_or_any() {
        assert_eq!(DaemonUid::parse("998").unwrap(), DaemonUid::RootOwnOr(998));
        assert_eq!(DaemonUid::parse(" any ").unwrap(), DaemonUid::Any);
        let error = DaemonUid::parse("konor").unwrap_err().to_string();
        assert!(error.contains("KONOR_DAEMON_UID=\"konor\" is not a uid"), "{error}");
    }
}
