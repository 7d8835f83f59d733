//! One connection's conversation: Hello first, then requests by id. The session enforces the
//! envelope rules (id 0 is reserved; an id stays in use until its answer is queued), checks each
//! request before anything is allocated for it, answers what the socket knows itself (`unwatch`,
//! `get` from the read view, `socket_stats`), hands the rest to the daemon in tasks of their own,
//! runs watches, and closes the connection when it idles.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use konor_sdk::protocol::{ClientFrame, ErrorCode, PROTOCOL_VERSION, Request, Response};
use serde::Deserialize;
use tokio::net::unix::UCred;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::admission::Slot;
use super::budget::{Budget, Charge, FrameBytes, OutFrame, WatchSender};
use super::frame_io::{Inbound, encode_answer};
use super::{ClientInfo, LocalCall, Shared};
use crate::api::authorize::{Principal, authorize};
use crate::api::request_check::check_request;
use crate::limits::{HELLO_TIMEOUT, REQUESTS_IN_FLIGHT_MAX, WATCH_QUEUE_EVENTS};

/// How a task of the session ended.
enum TaskEnd {
    Request,
    /// The client unwatched the group (after the watch was answered).
    Unwatched,
    /// The daemon refused the watch; the group may be watched again.
    WatchRefused {
        group: String,
        watch: u64,
    },
    /// The daemon dropped the watch's event sender.
    WatchDropped {
        group: String,
    },
    /// The watch fell behind (its queue or a byte budget was full): its events are dropped.
    WatchFellBehind {
        group: String,
    },
    /// The writer is gone.
    OutboxClosed,
}

/// A client frame, parsed as far as it goes.
#[expect(
    clippy::large_enum_variant,
    reason = "one value per frame, matched at once and never stored: boxing the request would cost an allocation per frame"
)]
enum Parsed {
    Frame(ClientFrame),
    /// An envelope with an id, but a request this daemon does not know or cannot read.
    BadRequest {
        id: u64,
        detail: String,
    },
    Malformed(String),
}

fn parse_client_frame(payload: &[u8]) -> Parsed {
    /// Only the id matters; `request` must be present for the frame to count as a request.
    #[derive(Deserialize)]
    struct Envelope {
        id: u64,
        #[serde(rename = "request")]
        _request: serde_json::Value,
    }
    // Read strictly (issue 12): an integer past 64 bits or a key given twice is refused, not
    // rounded to a double or dropped.
    let strict = std::str::from_utf8(payload)
        .map_err(|error| error.to_string())
        .and_then(|text| konor_crdt::json_strict::parse(text).map_err(|error| error.to_string()));
    match strict.and_then(|value| serde_json::from_value::<ClientFrame>(value).map_err(|error| error.to_string())) {
        Ok(frame) => Parsed::Frame(frame),
        Err(detail) => match serde_json::from_slice::<Envelope>(payload) {
            Ok(envelope) => Parsed::BadRequest { id: envelope.id, detail },
            Err(_) => Parsed::Malformed(format!("malformed frame: {detail}")),
        },
    }
}

/// Request ids waiting for their answer on one connection. An id is freed just before its
/// answer is queued, so a client that reuses an id once it has the answer is never refused.
#[derive(Clone, Default)]
struct IdsInUse(Arc<Mutex<HashSet<u64>>>);

impl IdsInUse {
    /// Takes `id`; false when it is already in use.
    fn take(&self, id: u64) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(id)
    }

    fn free(&self, id: u64) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
    }
}

/// A watch of the connection.
struct ActiveWatch {
    /// Tells this watch from a later one of the same group.
    number: u64,
    /// Ends the watch's task once its own request is answered: every request gets its answer,
    /// a `watch` unwatched at once included.
    stop: Arc<Notify>,
    /// Its place among [`REQUESTS_IN_FLIGHT_MAX`], given back as soon as it is unwatched.
    _place: OwnedSemaphorePermit,
}

/// Whether the session goes on after a frame.
#[derive(PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    Close,
}

pub(super) struct Session {
    connection: u64,
    credential_pid: Option<u32>,
    credential_uid: Option<u32>,
    /// The client's primary group, from the socket's peer credentials.
    credential_gid: Option<u32>,
    /// Set by Hello.
    client: Option<ClientInfo>,
    shared: Arc<Shared>,
    outbox: mpsc::Sender<OutFrame>,
    write_budget: Budget,
    closing: Arc<Notify>,
    tasks: JoinSet<TaskEnd>,
    /// Group -> the watch on it.
    watches: HashMap<String, ActiveWatch>,
    watch_count: u64,
    /// Places for requests and watches ([`REQUESTS_IN_FLIGHT_MAX`]).
    in_flight: Arc<Semaphore>,
    ids: IdsInUse,
    /// This connection's slot, taken at Hello.
    slot: Option<Slot>,
    /// Closes this connection while it has not said Hello, to make room for a newer one.
    make_room: Arc<Notify>,
    /// When the connection last received a frame or finished a request or watch.
    last_activity: Instant,
    /// The connection closes because its client does not read: what is queued for it is
    /// dropped instead of flushed.
    abandon_outbox: bool,
    /// The daemon keeps an apply report (F16) of this connection: it never idles out.
    reported: Arc<AtomicBool>,
}

impl Session {
    pub(super) fn new(
        connection: u64,
        credentials: Option<UCred>,
        shared: Arc<Shared>,
        outbox: mpsc::Sender<OutFrame>,
        closing: Arc<Notify>,
        write_budget: Budget,
        make_room: Arc<Notify>,
    ) -> Session {
        Session {
            connection,
            credential_pid: credentials
                .and_then(|credentials| credentials.pid())
                .and_then(|pid| u32::try_from(pid).ok()),
            credential_uid: credentials.map(|credentials| credentials.uid()),
            credential_gid: credentials.map(|credentials| credentials.gid()),
            client: None,
            shared,
            outbox,
            write_budget,
            closing,
            tasks: JoinSet::new(),
            watches: HashMap::new(),
            watch_count: 0,
            in_flight: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
            ids: IdsInUse::default(),
            slot: None,
            make_room,
            last_activity: Instant::now(),
            abandon_outbox: false,
            reported: Arc::default(),
        }
    }

    pub(super) fn said_hello(&self) -> bool {
        self.client.is_some()
    }

    /// True when what is queued for the client should be dropped, not flushed.
    pub(super) fn abandons_outbox(&self) -> bool {
        self.abandon_outbox
    }

    /// Stops the session's tasks and lets go of its outbox (and slot), so the writer drains.
    pub(super) async fn end(mut self) {
        self.tasks.shutdown().await;
    }

    fn pid(&self) -> u32 {
        self.client.as_ref().map(|client| client.pid).or(self.credential_pid).unwrap_or(0)
    }

    pub(super) async fn run(&mut self, mut inbox: mpsc::Receiver<Inbound>, mut shutdown: watch::Receiver<bool>) {
        let make_room = self.make_room.clone();
        let first = tokio::select! {
            first = tokio::time::timeout(HELLO_TIMEOUT, inbox.recv()) => Some(first),
            () = make_room.notified() => None,
        };
        self.shared.ungreeted.greeted(self.connection);
        let Some(first) = first else {
            debug!(connection = self.connection, "closed to make room: it had not said hello");
            return;
        };
        match first {
            Err(_) => {
                debug!(connection = self.connection, "no hello in time; closing");
                return;
            }
            Ok(None) => return,
            Ok(Some(inbound)) => {
                if self.handle_hello(inbound).await == Flow::Close {
                    return;
                }
            }
        }
        self.last_activity = Instant::now();
        loop {
            let free = self.in_flight.available_permits();
            let reading = free > 0;
            // Nothing in flight, no watch and no apply report shown in `status`: the connection
            // may idle out. (A report's row lives as long as its connection, and a process that
            // reported is running; closing it would hide it from operators.)
            let idle = free == REQUESTS_IN_FLIGHT_MAX && !self.reported.load(Ordering::Relaxed);
            let idle_deadline = self.last_activity + self.shared.idle_timeout;
            let flow = tokio::select! {
                () = self.closing.notified() => Flow::Close,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() { Flow::Close } else { Flow::Continue }
                }
                Some(ended) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.last_activity = Instant::now();
                    self.handle_task_end(ended)
                }
                inbound = inbox.recv(), if reading => {
                    self.last_activity = Instant::now();
                    match inbound {
                        None => Flow::Close,
                        Some(Inbound::Fault(fault)) => self.refuse_frame(fault).await,
                        Some(Inbound::Payload(payload, charge)) => self.handle_payload(&payload, charge).await,
                    }
                }
                () = tokio::time::sleep_until(idle_deadline), if idle => self.close_idle().await,
            };
            if flow == Flow::Close {
                return;
            }
        }
    }

    /// Tells a client why it gets no slot, and closes.
    async fn refuse_connection(&self, reason: String) -> Flow {
        self.shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        warn!(connection = self.connection, uid = self.credential_uid, %reason, "refusing a local connection");
        self.respond(0, Response::Error { code: ErrorCode::Internal, message: reason }).await;
        Flow::Close
    }

    /// Closes a connection that idled for the idle timeout. From here on nothing it sent is
    /// handled, which is what lets the SDK resend a request that crossed the close.
    async fn close_idle(&self) -> Flow {
        self.shared.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
        let seconds = self.shared.idle_timeout.as_secs_f64();
        debug!(connection = self.connection, pid = self.pid(), seconds, "closing an idle local connection");
        let message = format!(
            "no request, no watch and no apply report for {seconds} s: konord closed this idle connection and handled nothing \
             after its last answer; reconnect to go on"
        );
        self.respond(0, Response::Error { code: ErrorCode::Idle, message }).await;
        Flow::Close
    }

    /// Queues a frame for the writer, waiting for room in the connection's write budget.
    async fn send(&self, bytes: Vec<u8>) {
        // A closed outbox means the writer is gone; the session notices through `closing`.
        if let Some(charge) = self.write_budget.charge(bytes.len()).await {
            let _ = self.outbox.send(OutFrame { bytes: FrameBytes::Own(bytes), _charge: charge }).await;
        }
    }

    async fn respond(&self, id: u64, response: Response) {
        self.send(encode_answer(id, response, self.connection)).await;
    }

    fn count_bad_frame(&self, detail: &str) {
        self.shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
        warn!(connection = self.connection, pid = self.pid(), %detail, "bad frame on the local socket");
    }

    /// Counts a frame that breaks the envelope rules, says why on id 0 and closes.
    async fn refuse_frame(&self, fault: String) -> Flow {
        self.count_bad_frame(&fault);
        let message = format!("{fault}; closing the connection");
        self.respond(0, Response::Error { code: ErrorCode::BadRequest, message }).await;
        Flow::Close
    }

    async fn handle_hello(&mut self, inbound: Inbound) -> Flow {
        let payload = match inbound {
            Inbound::Fault(fault) => return self.refuse_frame(fault).await,
            Inbound::Payload(payload, _charge) => payload,
        };
        let (id, request) = match parse_client_frame(&payload) {
            Parsed::Frame(ClientFrame { id: 0, .. }) | Parsed::BadRequest { id: 0, .. } => {
                return self.refuse_frame(reserved_id()).await;
            }
            Parsed::Frame(ClientFrame { id, request }) => (id, request),
            Parsed::BadRequest { id, detail } => {
                self.count_bad_frame(&detail);
                let message = format!("the first request must be hello: {detail}");
                self.respond(id, Response::Error { code: ErrorCode::Protocol, message }).await;
                return Flow::Close;
            }
            Parsed::Malformed(detail) => return self.refuse_frame(detail).await,
        };
        let Request::Hello { protocol, pid, .. } = &request else {
            self.count_bad_frame(&format!("`{}` before hello", request.kind()));
            let message = format!("the first request on a connection must be hello, got `{}`", request.kind());
            self.respond(id, Response::Error { code: ErrorCode::Protocol, message }).await;
            return Flow::Close;
        };
        let (protocol, pid) = (*protocol, *pid);
        if protocol != PROTOCOL_VERSION {
            warn!(connection = self.connection, pid, protocol, "client speaks another protocol version");
            let message = format!(
                "konord speaks protocol version {PROTOCOL_VERSION}, the client speaks version {protocol}: \
                 upgrade the older of the two"
            );
            self.respond(id, Response::Error { code: ErrorCode::Protocol, message }).await;
            return Flow::Close;
        }
        if let Err(detail) = check_request(&request) {
            self.count_bad_frame(&detail);
            self.respond(id, Response::Error { code: ErrorCode::BadRequest, message: detail }).await;
            return Flow::Close;
        }
        match self.shared.slots.admit(self.credential_uid) {
            Ok(slot) => self.slot = Some(slot),
            Err(reason) => return self.refuse_connection(reason).await,
        }
        let Request::Hello { process, .. } = request else { return Flow::Close };
        let client = ClientInfo {
            connection: self.connection,
            pid: self.credential_pid.filter(|pid| *pid != 0).unwrap_or(pid),
            process,
            uid: self.credential_uid,
            user: self.credential_uid.map(crate::api::authorize::user_name),
            reveal: crate::api::authorize::reveals(self.shared.roles.as_deref(), &self.principal()),
        };
        tracing::Span::current().record("pid", client.pid);
        debug!(connection = self.connection, pid = client.pid, process = %client.process, uid = client.uid, "hello");
        self.client = Some(client);
        let welcome = Response::Welcome {
            protocol: PROTOCOL_VERSION,
            node_id: self.shared.node_id.clone(),
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        self.respond(id, welcome).await;
        Flow::Continue
    }

    async fn handle_payload(&mut self, payload: &[u8], charge: Charge) -> Flow {
        match parse_client_frame(payload) {
            Parsed::Frame(ClientFrame { id: 0, .. }) | Parsed::BadRequest { id: 0, .. } => {
                self.refuse_frame(reserved_id()).await
            }
            Parsed::Frame(ClientFrame { id, request }) => {
                if !self.ids.take(id) {
                    let fault = format!(
                        "request id {id} is already in use by a request still waiting for its answer \
                         (ids must be unique among a connection's outstanding requests)"
                    );
                    return self.refuse_frame(fault).await;
                }
                if let Err(detail) = check_request(&request) {
                    debug!(connection = self.connection, id, %detail, "request refused by its checks");
                    self.answer_inline(id, Response::Error { code: ErrorCode::BadRequest, message: detail }).await;
                    return Flow::Continue;
                }
                let principal = self.principal();
                if let Err(message) = authorize(self.shared.roles.as_deref(), &principal, &request) {
                    if let Some(refused_so_far) = crate::api::authorize::refusal_to_log() {
                        warn!(connection = self.connection, %principal, request = request.kind(), %message, refused_so_far, "request refused: forbidden");
                    }
                    let refusal = Response::Error { code: ErrorCode::Forbidden, message };
                    if let (Some(audit), Some(client)) = (&self.shared.audit, &self.client) {
                        let record =
                            crate::audit::record_of(client.audit_who(), client.audit_from(), &request, &refusal);
                        audit.record(record).await;
                    }
                    self.answer_inline(id, refusal).await;
                    return Flow::Continue;
                }
                self.dispatch(id, request, charge).await
            }
            Parsed::BadRequest { id, detail } => {
                // A well-formed envelope with a request this daemon does not know (a newer
                // client): refuse that request, keep the connection.
                self.count_bad_frame(&detail);
                let message = format!("unknown or malformed request: {detail}");
                self.respond(id, Response::Error { code: ErrorCode::BadRequest, message }).await;
                Flow::Continue
            }
            Parsed::Malformed(detail) => self.refuse_frame(detail).await,
        }
    }

    /// The caller, as the roles check names it.
    fn principal(&self) -> Principal {
        Principal::Local { uid: self.credential_uid, gid: self.credential_gid }
    }

    /// Answers a request the session handles itself, freeing its id first.
    async fn answer_inline(&self, id: u64, response: Response) {
        self.ids.free(id);
        self.respond(id, response).await;
    }

    async fn dispatch(&mut self, id: u64, request: Request, charge: Charge) -> Flow {
        let Some(client) = self.client.clone() else {
            // `run` handles Hello before dispatching anything.
            return Flow::Close;
        };
        match request {
            Request::Hello { .. } => {
                let message = "hello was already sent on this connection".to_owned();
                self.answer_inline(id, Response::Error { code: ErrorCode::Protocol, message }).await;
            }
            Request::Watch { group, from_revision, prefix } => {
                if self.watches.contains_key(&group) {
                    let message = format!(
                        "group `{group}` is already watched on this connection: \
                         unwatch it first, or watch on another connection"
                    );
                    self.answer_inline(id, Response::Error { code: ErrorCode::BadRequest, message }).await;
                    return Flow::Continue;
                }
                // A watch never takes the last place, so an `unwatch` can always be read.
                let permit = match self.in_flight.available_permits() {
                    0 | 1 => None,
                    _ => self.in_flight.clone().try_acquire_owned().ok(),
                };
                let Some(permit) = permit else {
                    let message = format!(
                        "too many requests and watches on this connection: a watch may not take the last of its \
                         {REQUESTS_IN_FLIGHT_MAX} places; unwatch a group or watch on another connection"
                    );
                    self.answer_inline(id, Response::Error { code: ErrorCode::BadRequest, message }).await;
                    return Flow::Continue;
                };
                self.watch_count += 1;
                let watch = self.watch_count;
                let span =
                    info_span!("local_request", connection = self.connection, pid = client.pid, id, kind = "watch");
                let (queue, events) = mpsc::channel(WATCH_QUEUE_EVENTS);
                let sender =
                    WatchSender::new(queue, self.write_budget.clone(), self.shared.stats.clone(), self.connection);
                let stop = Arc::new(Notify::new());
                let fell_behind = sender.fell_behind();
                let events = WatchEvents { events, fell_behind, stop: stop.clone(), group: group.clone(), watch };
                let (reply, answer) = oneshot::channel();
                let call =
                    LocalCall::Watch { client, group: group.clone(), from_revision, prefix, events: sender, reply };
                let task = run_watch(self.task_context(id, charge, None), call, answer, events);
                self.tasks.spawn(task.instrument(span));
                self.watches.insert(group, ActiveWatch { number: watch, stop, _place: permit });
            }
            Request::Unwatch { group } => {
                if let Some(watch) = self.watches.remove(&group) {
                    watch.stop.notify_one();
                }
                self.answer_inline(id, Response::Done).await;
            }
            Request::SocketStats => {
                let stats = self.shared.stats.snapshot();
                self.answer_inline(id, Response::SocketStats { stats }).await;
            }
            Request::Get { group, key } if self.shared.reads.is_some() => {
                let reveal = client.reveal;
                match self.shared.reads.as_ref().and_then(|reads| reads.get(&group, &key, reveal)) {
                    Some(response) => self.answer_inline(id, response).await,
                    None => return self.forward(id, client, Request::Get { group, key }, charge),
                }
            }
            request => return self.forward(id, client, request, charge),
        }
        Flow::Continue
    }

    fn task_context(&self, id: u64, charge: Charge, place: Option<OwnedSemaphorePermit>) -> TaskContext {
        TaskContext {
            shared: self.shared.clone(),
            outbox: self.outbox.clone(),
            write_budget: self.write_budget.clone(),
            ids: self.ids.clone(),
            id_freed: false,
            connection: self.connection,
            id,
            request_charge: Some(charge),
            _place: place,
            reported: self.reported.clone(),
        }
    }

    /// Hands a request to the daemon in a task of its own, which writes the answer.
    fn forward(&mut self, id: u64, client: ClientInfo, request: Request, charge: Charge) -> Flow {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            // `run` reads only while a place is free, and only it takes places.
            return Flow::Close;
        };
        let span =
            info_span!("local_request", connection = self.connection, pid = client.pid, id, kind = request.kind());
        let task = run_request(self.task_context(id, charge, Some(permit)), client, request);
        self.tasks.spawn(task.instrument(span));
        Flow::Continue
    }

    fn handle_task_end(&mut self, ended: Result<TaskEnd, JoinError>) -> Flow {
        match ended {
            Ok(TaskEnd::Request | TaskEnd::Unwatched) => Flow::Continue,
            Ok(TaskEnd::WatchRefused { group, watch }) => {
                if self.watches.get(&group).is_some_and(|current| current.number == watch) {
                    self.watches.remove(&group);
                }
                Flow::Continue
            }
            Ok(TaskEnd::WatchDropped { group }) => {
                // The client resumes from its last revision on a new connection.
                let (connection, pid) = (self.connection, self.pid());
                info!(connection, pid, %group, "the daemon dropped a watch; closing the connection");
                Flow::Close
            }
            Ok(TaskEnd::WatchFellBehind { group }) => {
                let (connection, pid) = (self.connection, self.pid());
                info!(connection, pid, %group, "a watch fell behind; closing its connection, dropping what was queued");
                self.abandon_outbox = true;
                Flow::Close
            }
            Ok(TaskEnd::OutboxClosed) => Flow::Close,
            Err(failure) if failure.is_panic() => {
                error!(connection = self.connection, %failure, "a local request task panicked");
                Flow::Continue
            }
            Err(_) => Flow::Continue,
        }
    }
}

fn reserved_id() -> String {
    "request id 0 is reserved for the daemon's errors about the connection; number requests from 1".to_owned()
}

/// What a request or watch task needs to answer its request.
struct TaskContext {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<OutFrame>,
    write_budget: Budget,
    ids: IdsInUse,
    /// The id was freed with the answer (and may be in use again by a newer request).
    id_freed: bool,
    connection: u64,
    id: u64,
    /// The request's bytes against the read budget: held until its answer is queued.
    request_charge: Option<Charge>,
    /// A request's place among [`REQUESTS_IN_FLIGHT_MAX`], held until it is answered (a
    /// watch's place is in [`ActiveWatch`]).
    _place: Option<OwnedSemaphorePermit>,
    /// Set when the daemon took an apply report of this connection.
    reported: Arc<AtomicBool>,
}

impl Drop for TaskContext {
    /// A task aborted before it answered (the connection closing) frees its id too.
    fn drop(&mut self) {
        if !self.id_freed {
            self.ids.free(self.id);
        }
    }
}

impl TaskContext {
    /// Queues the answer (waiting for room in the write budget), then gives back the request's
    /// read charge. False when the writer is gone.
    async fn answer(&mut self, response: Response) -> bool {
        let bytes = encode_answer(self.id, response, self.connection);
        let Some(charge) = self.write_budget.charge(bytes.len()).await else { return false };
        // Freed before the answer can reach the client, which may reuse the id at once.
        self.ids.free(self.id);
        self.id_freed = true;
        let sent = self.outbox.send(OutFrame { bytes: FrameBytes::Own(bytes), _charge: charge }).await.is_ok();
        self.request_charge = None;
        sent
    }
}

/// Hands one request to the daemon and writes its answer.
async fn run_request(mut context: TaskContext, client: ClientInfo, request: Request) -> TaskEnd {
    let (reply, answer) = oneshot::channel();
    let report = matches!(request, Request::ReportApply { .. });
    let audited = context.shared.audit.clone().filter(|_| crate::audit::audited(&request));
    let who = audited.as_ref().map(|_| (client.audit_who(), client.audit_from(), request.clone()));
    let response = ask_daemon(&context.shared, LocalCall::Request { client, request, reply }, answer).await;
    if let (Some(audit), Some((who, from, request))) = (audited, who) {
        audit.record(crate::audit::record_of(who, from, &request, &response)).await;
    }
    if report && response == Response::Done {
        context.reported.store(true, Ordering::Relaxed);
    }
    if context.answer(response).await { TaskEnd::Request } else { TaskEnd::OutboxClosed }
}

/// Subscribes with the daemon, writes its answer, then forwards events until the daemon drops
/// the watch (or the session aborts this task on Unwatch or close).
/// The socket's end of a watch.
struct WatchEvents {
    events: mpsc::Receiver<OutFrame>,
    fell_behind: Arc<AtomicBool>,
    stop: Arc<Notify>,
    group: String,
    watch: u64,
}

async fn run_watch(
    mut context: TaskContext,
    call: LocalCall,
    answer: oneshot::Receiver<Response>,
    watch: WatchEvents,
) -> TaskEnd {
    let WatchEvents { mut events, fell_behind, stop, group, watch } = watch;
    let response = ask_daemon(&context.shared, call, answer).await;
    let watching = matches!(response, Response::Watching { .. });
    // The answer goes out before any event: events wait in `events` until then.
    if !context.answer(response).await {
        return TaskEnd::OutboxClosed;
    }
    if !watching {
        return TaskEnd::WatchRefused { group, watch };
    }
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = stop.notified() => return TaskEnd::Unwatched,
        };
        let Some(event) = event else { break };
        if fell_behind.load(Ordering::Relaxed) {
            return TaskEnd::WatchFellBehind { group };
        }
        if context.outbox.send(event).await.is_err() {
            return TaskEnd::OutboxClosed;
        }
    }
    if fell_behind.load(Ordering::Relaxed) {
        return TaskEnd::WatchFellBehind { group };
    }
    TaskEnd::WatchDropped { group }
}

async fn ask_daemon(shared: &Shared, call: LocalCall, answer: oneshot::Receiver<Response>) -> Response {
    if shared.calls.send(call).await.is_err() {
        let message = "konord is shutting down; retry in a moment".to_owned();
        return Response::Error { code: ErrorCode::Unavailable, message };
    }
    answer.await.unwrap_or_else(|_| Response::Error {
        code: ErrorCode::Internal,
        message: "konord dropped the request without an answer; see its log".to_owned(),
    })
}
