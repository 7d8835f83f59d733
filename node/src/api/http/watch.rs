//! The watch stream: `GET /api/v1/groups/{group}/watch[?from_revision=N]` answers with
//! Server-Sent Events. The first event is `watching` (the subscription's revision), then one
//! `change` or `resync` event per watch event, each with the event's revision as its SSE id, so
//! a browser's `EventSource` resumes by itself (`Last-Event-ID`) with the socket's resume rules
//! (docs/protocol.md, "Watch semantics"): the changes after that revision, or a `resync`.
//!
//! The daemon feeds the stream through the same bounded queue as a socket watch; a stream too
//! slow to take its events is ended (the client resumes), and a client gone ends the watch.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use konor_sdk::protocol::{ErrorCode, Request, Response, WatchEvent};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch as signal};

use super::answer::{HttpError, answer, http_error};
use super::context::Ctx;
use super::extract::{GroupName, QueryOf};
use crate::api::request_check::check_request;
use crate::api::socket::{LocalCall, WatchReceiver, WatchSender};
use crate::limits::{HTTP_CALL_TIMEOUT, HTTP_WATCHES_MAX};

/// A comment line this often keeps proxies and idle timers from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct WatchQuery {
    #[serde(default)]
    from_revision: Option<u64>,
}

/// Ends the daemon's side of the watch when the stream is dropped (the client went away, or the
/// node stops), and gives back the stream's place.
struct StreamGuard {
    calls: mpsc::Sender<LocalCall>,
    connection: u64,
    _place: OwnedSemaphorePermit,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // A full queue leaves the watcher to the daemon, which drops it at its next event.
        let _ = self.calls.try_send(LocalCall::Disconnected { connection: self.connection });
    }
}

struct StreamState {
    events: WatchReceiver,
    shutdown: signal::Receiver<bool>,
    _guard: StreamGuard,
}

fn sse_event(event: &WatchEvent) -> Event {
    let (kind, revision) = match event {
        WatchEvent::Change { revision, .. } => ("change", *revision),
        WatchEvent::Resync { revision, .. } => ("resync", *revision),
        #[allow(unreachable_patterns)]
        _ => ("event", 0),
    };
    let data = serde_json::to_string(event).unwrap_or_default();
    Event::default().event(kind).id(revision.to_string()).data(data)
}

pub(super) async fn watch(
    State(ctx): State<Ctx>,
    GroupName(group): GroupName,
    QueryOf(query): QueryOf<WatchQuery>,
    headers: HeaderMap,
) -> Result<HttpResponse, HttpError> {
    ctx.identity()?;
    let from_revision = match query.from_revision {
        Some(from) => Some(from),
        None => last_event_id(&headers)?,
    };
    if let Err(message) = check_request(&Request::Watch { group: group.clone(), from_revision }) {
        return Ok(answer(Response::Error { code: ErrorCode::BadRequest, message }));
    }
    let Ok(place) = ctx.door.watches.clone().try_acquire_owned() else {
        return Err(http_error(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!("{HTTP_WATCHES_MAX} watch streams are open on this node; watch from another node or later"),
        ));
    };
    let connection = ctx.door.connection_number();
    let (sender, events) = WatchSender::detached(connection);
    let (reply, answered) = oneshot::channel();
    let guard = StreamGuard { calls: ctx.door.calls.clone(), connection, _place: place };
    let call = LocalCall::Watch { client: ctx.client(connection), group, from_revision, events: sender, reply };
    let asked = async {
        ctx.door.calls.send(call).await.ok()?;
        answered.await.ok()
    };
    let watching = match tokio::time::timeout(HTTP_CALL_TIMEOUT, asked).await {
        Ok(Some(Response::Watching { group, revision })) => Response::Watching { group, revision },
        Ok(Some(error)) => return Ok(answer(error)),
        Ok(None) => return Err(http_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the daemon is stopping")),
        Err(_) => {
            return Err(http_error(StatusCode::GATEWAY_TIMEOUT, "timeout", "the daemon did not answer the watch"));
        }
    };
    let revision = match &watching {
        Response::Watching { revision, .. } => *revision,
        _ => 0,
    };
    let first = Event::default()
        .event("watching")
        .id(revision.to_string())
        .data(serde_json::to_string(&watching).unwrap_or_default());
    let state = StreamState { events, shutdown: ctx.door.shutdown.clone(), _guard: guard };
    let rest = futures_util::stream::unfold(state, |mut state| async move {
        let next = tokio::select! {
            event = state.events.recv() => event,
            _ = state.shutdown.changed() => None,
        };
        next.map(|event| (Ok::<Event, Infallible>(sse_event(&event)), state))
    });
    let stream = futures_util::StreamExt::chain(futures_util::stream::once(async { Ok(first) }), rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// The `Last-Event-ID` a reconnecting event source sends: the revision it saw last.
pub(super) fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, HttpError> {
    let Some(value) = headers.get("last-event-id") else { return Ok(None) };
    value.to_str().ok().and_then(|text| text.trim().parse().ok()).map(Some).ok_or_else(|| {
        http_error(StatusCode::BAD_REQUEST, "bad_request", "Last-Event-ID must be the revision of the last event seen")
    })
}
