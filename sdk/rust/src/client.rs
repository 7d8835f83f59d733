//! The async client of the local `konord` socket: [`Client`] holds one connection
//! ([`crate::connection`]), reconnects when it drops, and offers calls (`call`, `get`,
//! `get_as`, `snapshot`). Watches ([`crate::watch`]), the reload callback
//! ([`crate::on_change`]) and the local read cache ([`crate::cache`]) add their methods to it
//! from their own modules.
//!
//! A [`Watch`](crate::Watch) owns a connection of its own: events on the wire name only their
//! group, so one subscription per connection keeps each watch's revision stream separate, and
//! resuming is a plain reconnect.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::debug;

use crate::connect::{ConnectOptions, DaemonUid};
use crate::connection::Connection;
pub use crate::error::SdkError;
use crate::error::unexpected;
use crate::protocol::{ErrorCode, Request, Response, SOCKET_ENV};
use crate::settings::Snapshot;

/// A connection to the local `konord`. Cheap to clone; clones share the connection, and many
/// tasks may call through one client at once. When the connection drops, the next call
/// reconnects (a call in flight at that moment fails with [`SdkError::Closed`]).
#[derive(Clone)]
pub struct Client {
    shared: Arc<ClientShared>,
    timeout: Duration,
}

struct ClientShared {
    path: PathBuf,
    /// Whose daemon this client accepts, on every reconnect and every watch's connection.
    daemon_uid: DaemonUid,
    current: Mutex<Arc<Connection>>,
    /// Serializes reconnects so a burst of callers opens one connection, not many.
    reconnect: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Client {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Client")
            .field("path", &self.shared.path)
            .field("node_id", &self.node_id())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Client {
    /// Connects to the daemon's socket at `path` and says Hello, with the default options and
    /// the daemon user named by `KONOR_DAEMON_UID` (see [`ConnectOptions::from_env`]).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, SdkError> {
        Client::connect_with(path, ConnectOptions::from_env()?).await
    }

    /// Connects to the daemon's socket at `path` with `options`, checks that the daemon runs
    /// as a user `options` accepts, and says Hello.
    pub async fn connect_with(path: impl AsRef<Path>, options: ConnectOptions) -> Result<Client, SdkError> {
        let path = path.as_ref().to_owned();
        let connection = Connection::open(&path, options.timeout, options.daemon_uid).await?;
        let shared = ClientShared {
            path,
            daemon_uid: options.daemon_uid,
            current: Mutex::new(Arc::new(connection)),
            reconnect: tokio::sync::Mutex::new(()),
        };
        Ok(Client { shared: Arc::new(shared), timeout: options.timeout })
    }

    /// Connects to the socket named by the `KONOR_SOCKET` environment variable.
    pub async fn connect_default() -> Result<Client, SdkError> {
        match std::env::var_os(SOCKET_ENV) {
            Some(path) if !path.is_empty() => Client::connect(PathBuf::from(path)).await,
            _ => Err(SdkError::SocketUnset),
        }
    }

    /// This handle with another timeout for each exchange (default [`TIMEOUT_DEFAULT`](crate::connect::TIMEOUT_DEFAULT)). Other
    /// clones keep theirs.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The daemon's node id, from its Welcome.
    pub fn node_id(&self) -> String {
        self.current().node_id.clone()
    }

    fn current(&self) -> Arc<Connection> {
        // Nothing panics while holding this lock.
        self.shared.current.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    async fn connection(&self) -> Result<Arc<Connection>, SdkError> {
        let current = self.current();
        if !current.state.is_closed() {
            return Ok(current);
        }
        let _reconnecting = self.shared.reconnect.lock().await;
        let current = self.current();
        if !current.state.is_closed() {
            return Ok(current);
        }
        debug!(path = %self.shared.path.display(), "reconnecting to konord");
        let fresh = Arc::new(Connection::open(&self.shared.path, self.timeout, self.shared.daemon_uid).await?);
        *self.shared.current.lock().unwrap_or_else(PoisonError::into_inner) = fresh.clone();
        Ok(fresh)
    }

    /// Sends any request and returns the daemon's answer; `Response::Error` becomes
    /// [`SdkError::Daemon`]. `Hello`, `Watch` and `Unwatch` belong to the connection and
    /// [`Client::watch`], and are refused here.
    pub async fn call(&self, request: Request) -> Result<Response, SdkError> {
        if matches!(request, Request::Hello { .. } | Request::Watch { .. } | Request::Unwatch { .. }) {
            return Err(SdkError::InvalidCall(format!(
                "`{}` is not sent through call(): the client says hello itself, and watches go through watch()",
                request.kind()
            )));
        }
        let connection = self.connection().await?;
        let answer = match connection.request(&request, self.timeout).await {
            // The daemon closed the connection as idle and handled nothing after its last
            // answer, so this request was not handled: send it again on a new connection.
            Err(SdkError::Daemon { code: ErrorCode::Idle, .. }) => {
                debug!("konord closed an idle connection under a request; sending it again");
                self.connection().await?.request(&request, self.timeout).await?
            }
            answer => answer?,
        };
        match answer {
            Response::Error { code, message } => Err(SdkError::Daemon { code, message }),
            response => Ok(response),
        }
    }

    /// One setting; `None` when the key is not set.
    pub async fn get(&self, group: &str, key: &str) -> Result<Option<Value>, SdkError> {
        match self.call(Request::Get { group: group.to_owned(), key: key.to_owned() }).await? {
            Response::Value { value, .. } => Ok(value),
            other => Err(unexpected("value", &other)),
        }
    }

    /// Reports this process's error rate (failed requests over all, 0 to 1, over a window the
    /// app chooses) while it runs `group`'s current settings (SPEC F15): a release with a
    /// `max_error_rate` guard is rolled back by the members when a process on a node it targets
    /// reports more. It goes on this connection's apply report, so report after
    /// [`Client::on_change`] reported the settings the app runs (its first callback does).
    pub async fn report_error_rate(&self, group: &str, rate: f64) -> Result<(), SdkError> {
        match self.call(Request::ReportErrorRate { group: group.to_owned(), rate }).await? {
            Response::Done => Ok(()),
            other => Err(unexpected("done", &other)),
        }
    }

    /// One setting deserialized into `T`; `None` when the key is not set.
    pub async fn get_as<T: DeserializeOwned>(&self, group: &str, key: &str) -> Result<Option<T>, SdkError> {
        let Some(value) = self.get(group, key).await? else {
            return Ok(None);
        };
        let masked = value.as_str() == Some(crate::protocol::MASKED);
        serde_json::from_value(value).map(Some).map_err(|error| SdkError::Decode {
            what: format!("`{group}/{key}` as {}", std::any::type_name::<T>()),
            detail: if masked {
                "the key is secret and this process may not reveal it (it reads \"<secret>\"): give its user the \
                 app role in konord's [roles]"
                    .to_owned()
            } else {
                error.to_string()
            },
        })
    }

    /// All settings of a group; [`Snapshot::typed`] turns them into a struct.
    pub async fn snapshot(&self, group: &str) -> Result<Snapshot, SdkError> {
        self.snapshot_request(Request::Snapshot { group: group.to_owned(), prefix: None }).await
    }

    /// The settings of a group whose keys start with `prefix` (`db.`). The content hash is the
    /// hash of the keys returned, not of the whole group.
    pub async fn snapshot_prefix(&self, group: &str, prefix: &str) -> Result<Snapshot, SdkError> {
        self.snapshot_request(Request::Snapshot { group: group.to_owned(), prefix: Some(prefix.to_owned()) }).await
    }

    async fn snapshot_request(&self, request: Request) -> Result<Snapshot, SdkError> {
        match self.call(request).await? {
            Response::Snapshot { group, settings, content_hash, freshness } => {
                Ok(Snapshot { group, settings, content_hash, freshness })
            }
            other => Err(unexpected("snapshot", &other)),
        }
    }

    /// Whose daemon this client accepts.
    pub(crate) fn daemon_uid(&self) -> DaemonUid {
        self.shared.daemon_uid
    }

    /// The timeout of each exchange.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::protocol::{
        ClientFrame, FrameError, Freshness, PROTOCOL_VERSION, ServerFrame, decode_payload, encode_frame, frame_length,
    };
    use serde_json::json;
    use tokio::net::UnixListener;

    /// A daemon double at the frame level: `answer` maps each client frame to raw bytes to send
    /// back (so tests can send garbage); Hello is answered with a Welcome unless `answer`
    /// handles it.
    fn fake_daemon<F>(answer: F) -> (tempfile::TempDir, PathBuf)
    where
        F: Fn(&ClientFrame) -> Option<Vec<u8>> + Send + Sync + 'static,
    {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("konord.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let answer = answer.clone();
                tokio::spawn(async move {
                    while let Some(frame) = read_client_frame(&mut stream).await {
                        let bytes = match answer(&frame) {
                            Some(bytes) => bytes,
                            None if matches!(frame.request, Request::Hello { .. }) => respond(frame.id, welcome(1)),
                            None => continue,
                        };
                        if stream.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (directory, path)
    }

    /// The next client frame on a fake daemon's connection; `None` at the end of the stream.
    async fn read_client_frame(stream: &mut tokio::net::UnixStream) -> Option<ClientFrame> {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await.ok()?;
        let mut payload = vec![0u8; frame_length(header).unwrap()];
        stream.read_exact(&mut payload).await.unwrap();
        Some(decode_payload(&payload).unwrap())
    }

    fn welcome(protocol: u32) -> Response {
        Response::Welcome { protocol, node_id: "node-a".into(), daemon_version: "0.1.0".into() }
    }

    fn respond(id: u64, response: Response) -> Vec<u8> {
        encode_frame(&ServerFrame::Response { id, response }).unwrap()
    }

    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    fn value_of(frame: &ClientFrame) -> Option<Vec<u8>> {
        let Request::Get { group, key } = &frame.request else { return None };
        let response = Response::Value {
            group: group.clone(),
            key: key.clone(),
            value: Some(json!(format!("value of {key}"))),
            freshness: Freshness::default(),
        };
        Some(respond(frame.id, response))
    }

    #[tokio::test]
    async fn connect_names_the_path_and_the_fix_when_no_daemon_listens() {
        let directory = tempfile::tempdir().unwrap();
        let error = Client::connect(directory.path().join("absent.sock")).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, SdkError::Connect { .. }), "{error:?}");
        assert!(text.contains("absent.sock") && text.contains("is konord running?"), "{text}");
    }

    #[tokio::test]
    async fn hello_reports_the_node_id() {
        let (_directory, path) = fake_daemon(|_| None);
        let client = Client::connect(&path).await.unwrap();
        assert_eq!(client.node_id(), "node-a");
    }

    #[tokio::test]
    async fn rejects_a_daemon_speaking_another_protocol_version() {
        let (_directory, path) = fake_daemon(|frame| Some(respond(frame.id, welcome(99))));
        let error = Client::connect(&path).await.unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, SdkError::Protocol(_)), "{error:?}");
        assert!(text.contains("99") && text.contains(&format!("version {PROTOCOL_VERSION}")), "{text}");
    }

    #[tokio::test]
    async fn concurrent_calls_get_their_own_answers() {
        let (_directory, path) = fake_daemon(value_of);
        let client = Client::connect(&path).await.unwrap();
        let mut tasks = Vec::new();
        for index in 0..64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("key{index}");
                let value = client.get("app", &key).await.unwrap();
                assert_eq!(value, Some(json!(format!("value of {key}"))));
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn daemon_errors_become_sdk_errors() {
        let (_directory, path) = fake_daemon(|frame| match frame.request {
            Request::Get { .. } => Some(respond(
                frame.id,
                Response::Error { code: ErrorCode::UnknownGroup, message: "no group `nope`".into() },
            )),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("nope", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Daemon { code: ErrorCode::UnknownGroup, .. }), "{error:?}");
        assert_eq!(error.to_string(), "konord refused the request (unknown_group): no group `nope`");
    }

    /// Issue 12: konord closes a connection that idled, with an id-0 `idle` frame, and handles
    /// nothing it sent after that. A request that crossed the close is sent again on a new
    /// connection instead of failing.
    #[tokio::test]
    async fn a_request_that_crosses_an_idle_close_is_sent_again() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("konord.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let first = counted.fetch_add(1, Ordering::Relaxed) == 0;
                tokio::spawn(async move {
                    while let Some(frame) = read_client_frame(&mut stream).await {
                        let answer = match frame.request {
                            Request::Hello { .. } => respond(frame.id, welcome(1)),
                            // The first connection idles out just as the request arrives.
                            _ if first => {
                                let message = "idle for 300 s".to_owned();
                                let idle = respond(0, Response::Error { code: ErrorCode::Idle, message });
                                let _ = stream.write_all(&idle).await;
                                return;
                            }
                            _ => value_of(&frame).unwrap(),
                        };
                        stream.write_all(&answer).await.unwrap();
                    }
                });
            }
        });
        let client = Client::connect(&path).await.unwrap();
        assert_eq!(client.get("app", "a").await.unwrap(), Some(json!("value of a")));
        assert_eq!(connections.load(Ordering::Relaxed), 2, "sent again on a second connection");
    }

    #[tokio::test]
    async fn a_silent_daemon_times_out() {
        let (_directory, path) = fake_daemon(|_| None);
        let client = Client::connect(&path).await.unwrap().with_timeout(Duration::from_millis(100));
        let error = client.get("app", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Timeout { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn an_oversized_frame_from_the_daemon_fails_the_call_without_allocating() {
        let (_directory, path) = fake_daemon(|frame| match frame.request {
            Request::Get { .. } => Some(u32::MAX.to_be_bytes().to_vec()),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("app", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Frame(FrameError::TooLarge { .. })), "{error:?}");
    }

    #[tokio::test]
    async fn a_malformed_frame_fails_every_waiter_and_the_next_call_reconnects() {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let (_directory, path) = fake_daemon(move |frame| match frame.request {
            // The first Get gets garbage; later ones a proper answer.
            Request::Get { .. } if counter.fetch_add(1, Ordering::SeqCst) == 0 => Some(raw_frame(b"not json")),
            Request::Get { .. } => value_of(frame),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("app", "x").await.unwrap_err();
        assert!(matches!(error, SdkError::Frame(FrameError::Decode(_))), "{error:?}");
        assert_eq!(client.get("app", "y").await.unwrap(), Some(json!("value of y")));
    }

    #[tokio::test]
    async fn an_unknown_answer_kind_fails_only_that_call() {
        let (_directory, path) = fake_daemon(|frame| match &frame.request {
            Request::Get { key, .. } if key == "new" => {
                let text = format!(r#"{{"response":{{"id":{},"response":{{"type":"from_the_future"}}}}}}"#, frame.id);
                Some(raw_frame(text.as_bytes()))
            }
            Request::Get { .. } => value_of(frame),
            _ => None,
        });
        let client = Client::connect(&path).await.unwrap();
        let error = client.get("app", "new").await.unwrap_err();
        assert!(matches!(error, SdkError::Protocol(_)), "{error:?}");
        assert_eq!(client.get("app", "old").await.unwrap(), Some(json!("value of old")));
    }

    #[tokio::test]
    async fn call_refuses_requests_that_belong_to_the_connection() {
        let (_directory, path) = fake_daemon(|_| None);
        let client = Client::connect(&path).await.unwrap();
        let error =
            client.call(Request::Watch { group: "app".into(), from_revision: None, prefix: None }).await.unwrap_err();
        assert!(matches!(error, SdkError::InvalidCall(_)), "{error:?}");
    }
}
