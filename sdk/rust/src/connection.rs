//! One socket to konord after a successful hello: a reader task that routes answers to the
//! caller waiting on their request id and events to the subscriber of their group, and callers
//! that write whole frames themselves. [`Client`](crate::Client) and each
//! [`Watch`](crate::Watch) hold one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use crate::connect::{DaemonUid, check_daemon};
use crate::error::{SdkError, unexpected};
use crate::protocol::{
    ErrorCode, FrameError, PROTOCOL_VERSION, Request, Response, ServerFrame, WatchEvent, encode_frame, frame_length,
};

/// Events buffered per watch between the reader task and the consumer. When full, the reader
/// stops reading, the socket fills, and the daemon drops the watch and closes the connection;
/// the watch then resumes from its last revision, so a slow consumer loses nothing.
const WATCH_BUFFER_EVENTS: usize = 1024;

/// The reader task's routing table and the connection's fate, under one lock so a caller never
/// registers on a connection that already closed.
#[derive(Default)]
struct Demux {
    waiters: HashMap<u64, oneshot::Sender<Result<Response, SdkError>>>,
    subscribers: HashMap<String, mpsc::Sender<WatchEvent>>,
    closed: Option<SdkError>,
}

#[derive(Default)]
pub(crate) struct ConnectionState {
    demux: Mutex<Demux>,
}

impl ConnectionState {
    fn lock(&self) -> MutexGuard<'_, Demux> {
        // Nothing panics while holding this lock, so a poisoned lock still holds a sound table.
        self.demux.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection closed and fails every waiter with `reason`; subscribers see their
    /// channel end.
    fn close(&self, reason: SdkError) {
        let waiters = {
            let mut demux = self.lock();
            if demux.closed.is_some() {
                return;
            }
            debug!(%reason, "konord connection closed");
            demux.closed = Some(reason.clone());
            demux.subscribers.clear();
            std::mem::take(&mut demux.waiters)
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(reason.clone()));
        }
    }

    fn closed_reason(&self) -> SdkError {
        self.lock().closed.clone().unwrap_or_else(|| SdkError::Closed("the connection closed".to_owned()))
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }
}

/// One socket to the daemon, after a successful Hello.
pub(crate) struct Connection {
    pub(crate) state: Arc<ConnectionState>,
    /// Callers write their own frames, one at a time: no hop through a writer task (a wakeup
    /// of another thread per request). A stuck daemon makes callers wait within their timeout.
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// Request ids start at 1: the daemon reserves id 0 for errors about the connection itself.
    next_id: AtomicU64,
    pub(crate) node_id: String,
    tasks: [AbortHandle; 1],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Connection {
    pub(crate) async fn open(path: &Path, timeout: Duration, daemon_uid: DaemonUid) -> Result<Connection, SdkError> {
        let connect_error = |detail: String| SdkError::Connect { path: path.to_owned(), detail };
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(connect_error(error.to_string())),
            Err(_) => return Err(connect_error(format!("no answer within {} ms", timeout.as_millis()))),
        };
        check_daemon(&stream, path, daemon_uid)?;
        let (read_half, write_half) = stream.into_split();
        let state = Arc::new(ConnectionState::default());
        let reader = tokio::spawn(read_loop(BufReader::new(read_half), state.clone(), timeout));
        let mut connection = Connection {
            state,
            writer: Arc::new(tokio::sync::Mutex::new(write_half)),
            next_id: AtomicU64::new(1),
            node_id: String::new(),
            tasks: [reader.abort_handle()],
        };
        let hello = Request::Hello { protocol: PROTOCOL_VERSION, pid: std::process::id(), process: process_name() };
        connection.node_id = match connection.request(&hello, timeout).await? {
            Response::Welcome { protocol, node_id, .. } if protocol == PROTOCOL_VERSION => node_id,
            Response::Welcome { protocol, .. } => {
                return Err(SdkError::Protocol(format!(
                    "konord at {} speaks protocol version {protocol}, this SDK speaks version {PROTOCOL_VERSION}: \
                     upgrade the older of the two",
                    path.display()
                )));
            }
            Response::Error { code: ErrorCode::Protocol, message } => return Err(SdkError::Protocol(message)),
            other => return Err(unexpected("welcome", &other)),
        };
        Ok(connection)
    }

    /// Sends one request and waits for its answer, all within `timeout`.
    pub(crate) async fn request(&self, request: &Request, timeout: Duration) -> Result<Response, SdkError> {
        /// `ClientFrame` by reference, so a request can be sent again without a copy.
        #[derive(serde::Serialize)]
        struct ClientFrameRef<'a> {
            id: u64,
            request: &'a Request,
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&ClientFrameRef { id, request })?;
        let (sender, receiver) = oneshot::channel();
        {
            let mut demux = self.state.lock();
            if let Some(reason) = &demux.closed {
                return Err(reason.clone());
            }
            demux.waiters.insert(id, sender);
        }
        let _waiter = WaiterGuard { state: &self.state, id };
        let exchange = async {
            if let Err(error) = self.write_frame(&frame, timeout).await {
                // The daemon closed the socket. Its reason (an idle close, too many connections)
                // comes with the end of the stream, which the reader turns into this waiter's
                // answer; a frame that could not be written was not handled.
                return match error {
                    SdkError::Closed(_) => receiver.await.unwrap_or(Err(error)),
                    other => Err(other),
                };
            }
            receiver.await.unwrap_or_else(|_| Err(self.state.closed_reason()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(SdkError::Timeout { waited: timeout }),
        }
    }

    /// Writes one whole frame. The common case is one non-blocking write in the caller's own
    /// task; when the socket takes only part of it, a task of its own writes the rest, so a
    /// caller that gives up (timeout, dropped future) never leaves half a frame on the socket.
    async fn write_frame(&self, frame: &[u8], timeout: Duration) -> Result<(), SdkError> {
        let mut writer = self.writer.clone().lock_owned().await;
        if let Some(reason) = &self.state.lock().closed {
            return Err(reason.clone());
        }
        let written = match writer.try_write(frame) {
            Ok(written) => written,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => 0,
            // The daemon closed the socket. The reader still gets what it sent last (such as
            // "too many connections") and then the end of the stream, and closes the
            // connection with the most useful reason.
            Err(error) => return Err(SdkError::Closed(format!("write failed: {error}"))),
        };
        if written == frame.len() {
            return Ok(());
        }
        let rest = frame[written..].to_vec();
        let state = self.state.clone();
        let finish = tokio::spawn(async move {
            match tokio::time::timeout(timeout, writer.write_all(&rest)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(SdkError::Closed(format!("write failed: {error}"))),
                Err(_) => {
                    // Half a frame is on the socket: nothing else can follow it.
                    let waited = timeout.as_millis();
                    let reason = SdkError::Closed(format!("konord did not take a frame within {waited} ms"));
                    state.close(reason.clone());
                    Err(reason)
                }
            }
        });
        finish.await.unwrap_or_else(|_| Err(SdkError::Closed("the frame writer task failed".to_owned())))
    }

    /// Routes the events of `group` on this connection to the returned receiver.
    pub(crate) fn subscribe(&self, group: &str) -> Result<mpsc::Receiver<WatchEvent>, SdkError> {
        let (sender, receiver) = mpsc::channel(WATCH_BUFFER_EVENTS);
        let mut demux = self.state.lock();
        if let Some(reason) = &demux.closed {
            return Err(reason.clone());
        }
        demux.subscribers.insert(group.to_owned(), sender);
        Ok(receiver)
    }
}

/// Removes a waiter whose caller gave up (timeout or dropped future), so the table stays small.
struct WaiterGuard<'a> {
    state: &'a ConnectionState,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.state.lock().waiters.remove(&self.id);
    }
}

fn process_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|path| path.file_name().map(|name| name.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The reader is buffered: one `read` usually brings a whole frame (length and payload).
async fn read_loop(mut read_half: BufReader<OwnedReadHalf>, state: Arc<ConnectionState>, timeout: Duration) {
    let reason = loop {
        let payload = match read_frame(&mut read_half, timeout).await {
            Ok(Some(payload)) => payload,
            Ok(None) => break SdkError::Closed("konord closed the connection".to_owned()),
            Err(error) => break error,
        };
        match decode_server_frame(&payload) {
            Inbound::Response { id: 0, response: Response::Error { code, message } } => {
                // Id 0 is the daemon speaking about the connection itself (too many
                // connections, a bad frame): it closes the connection after this frame.
                break SdkError::Daemon { code, message };
            }
            Inbound::Response { id, response } => {
                let waiter = state.lock().waiters.remove(&id);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(Ok(response));
                    }
                    None => debug!(id, "answer for a request whose caller gave up"),
                }
            }
            Inbound::UnknownResponse { id, detail } => {
                let waiter = state.lock().waiters.remove(&id);
                if let Some(waiter) = waiter {
                    let message = format!("konord sent an answer this SDK does not understand (upgrade it?): {detail}");
                    let _ = waiter.send(Err(SdkError::Protocol(message)));
                }
            }
            Inbound::Event(event) => {
                let subscriber = state.lock().subscribers.get(event.group()).cloned();
                let Some(subscriber) = subscriber else {
                    debug!(group = event.group(), "event for a group nobody watches here");
                    continue;
                };
                let group = event.group().to_owned();
                // Waiting here is the backpressure: see WATCH_BUFFER_EVENTS.
                if subscriber.send(event).await.is_err() {
                    let mut demux = state.lock();
                    if demux.subscribers.get(&group).is_some_and(|current| current.same_channel(&subscriber)) {
                        demux.subscribers.remove(&group);
                    }
                }
            }
            Inbound::UnknownEvent { detail } => {
                warn!(%detail, "skipping a watch event this SDK does not understand (upgrade it?)");
            }
            Inbound::Malformed(error) => break SdkError::Frame(error),
        }
    };
    state.close(reason);
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames. The wait for a frame's
/// first byte has no timeout (a watch may be quiet for hours; a dead daemon's socket reports
/// end of stream); the rest of the frame must follow within `timeout`.
async fn read_frame(read_half: &mut BufReader<OwnedReadHalf>, timeout: Duration) -> Result<Option<Vec<u8>>, SdkError> {
    let mut header = [0u8; 4];
    let first = read_half.read(&mut header).await.map_err(|error| SdkError::Closed(format!("read failed: {error}")))?;
    if first == 0 {
        return Ok(None);
    }
    let truncated = || SdkError::Frame(FrameError::Decode("truncated frame: konord stopped mid-frame".to_owned()));
    let rest = async {
        read_half.read_exact(&mut header[first..]).await?;
        // Checked before allocating: a bad length never reserves memory.
        let length = frame_length(header).map_err(SdkError::Frame)?;
        let mut payload = vec![0u8; length];
        read_half.read_exact(&mut payload).await?;
        Ok::<_, ReadError>(payload)
    };
    match tokio::time::timeout(timeout, rest).await {
        Ok(Ok(payload)) => Ok(Some(payload)),
        Ok(Err(ReadError::Sdk(error))) => Err(error),
        Ok(Err(ReadError::Io(error))) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(truncated()),
        Ok(Err(ReadError::Io(error))) => Err(SdkError::Closed(format!("read failed: {error}"))),
        Err(_) => Err(truncated()),
    }
}

enum ReadError {
    Io(std::io::Error),
    Sdk(SdkError),
}

impl From<std::io::Error> for ReadError {
    fn from(error: std::io::Error) -> ReadError {
        ReadError::Io(error)
    }
}

impl From<SdkError> for ReadError {
    fn from(error: SdkError) -> ReadError {
        ReadError::Sdk(error)
    }
}

// One value per frame read, handed on at once (see `ServerFrame`).
#[allow(clippy::large_enum_variant)]
enum Inbound {
    Response {
        id: u64,
        response: Response,
    },
    Event(WatchEvent),
    /// A well-formed answer of a kind this SDK does not know (a newer daemon): fails that call.
    UnknownResponse {
        id: u64,
        detail: String,
    },
    /// A well-formed event of a kind this SDK does not know: skipped.
    UnknownEvent {
        detail: String,
    },
    Malformed(FrameError),
}

fn decode_server_frame(payload: &[u8]) -> Inbound {
    let error = match serde_json::from_slice::<ServerFrame>(payload) {
        Ok(ServerFrame::Response { id, response }) => return Inbound::Response { id, response },
        Ok(ServerFrame::Event { event }) => return Inbound::Event(event),
        Err(error) => error.to_string(),
    };
    // Additions to the protocol do not bump its version, so tell an unknown but well-formed
    // answer or event from garbage.
    let Ok(Value::Object(frame)) = serde_json::from_slice::<Value>(payload) else {
        return Inbound::Malformed(FrameError::Decode(error));
    };
    if let Some(id) = frame.get("response").and_then(|response| response.get("id")).and_then(Value::as_u64) {
        return Inbound::UnknownResponse { id, detail: error };
    }
    if frame.get("event").is_some_and(Value::is_object) {
        return Inbound::UnknownEvent { detail: error };
    }
    Inbound::Malformed(FrameError::Decode(error))
}
