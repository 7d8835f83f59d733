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
use super::extract::{PathSegment, QueryOf};
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
    #[serde(default)]
    prefix: Option<String>,
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

/// An event with its id `<node>:<revision>`: revisions are local to a node, so a client that
/// resumes on another node (behind a load balancer) is known and gets a resync.
fn sse_event(node: &str, event: &WatchEvent) -> Event {
    let (kind, revision) = match event {
        WatchEvent::Change { revision, .. } => ("change", *revision),
        WatchEvent::Resync { revision, .. } => ("resync", *revision),
        #[allow(unreachable_patterns)]
        _ => ("event", 0),
    };
    let data = serde_json::to_string(event).unwrap_or_default();
    Event::default().event(kind).id(format!("{node}:{revision}")).data(data)
}

pub(super) async fn watch(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    QueryOf(query): QueryOf<WatchQuery>,
    headers: HeaderMap,
) -> Result<HttpResponse, HttpError> {
    ctx.may_read()?;
    // A reconnecting event source sends the URL it first used, with the id it saw last: the
    // id wins.
    let from_revision = match last_event_id(&headers, &ctx.door.node_id)? {
        Some(from) => Some(from),
        None => query.from_revision,
    };
    let prefix = query.prefix;
    let request = Request::Watch { group: group.clone(), from_revision, prefix: prefix.clone() };
    if let Err(message) = check_request(&request) {
        return Ok(answer(Response::Error { code: ErrorCode::BadRequest, message }));
    }
    if let Err(message) = ctx.authorize(&request) {
        return Ok(answer(super::context::forbidden(message)));
    }
    let Ok(place) = ctx.door.watches.clone().try_acquire_owned() else {
        return Err(http_error(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!("{HTTP_WATCHES_MAX} watch streams are open on this node; watch from another node or later"),
        ));
    };
    let connection = ctx.door.connection_number();
    let (sender, events) = WatchSender::within(connection, ctx.door.socket_stats.clone());
    let (reply, answered) = oneshot::channel();
    let guard = StreamGuard { calls: ctx.door.calls.clone(), connection, _place: place };
    let call = LocalCall::Watch { client: ctx.client(connection), group, from_revision, prefix, events: sender, reply };
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
    // No id: the backlog of a resumed watch follows it with older revisions, and a client that
    // drops before them must resume where it asked to, not after this node's revision.
    let first = Event::default().event("watching").data(serde_json::to_string(&watching).unwrap_or_default());
    let node = ctx.door.node_id.clone();
    let state = StreamState { events, shutdown: ctx.door.shutdown.clone(), _guard: guard };
    let rest = futures_util::stream::unfold(state, move |mut state| {
        let node = node.clone();
        async move {
            let next = tokio::select! {
                event = state.events.recv() => event,
                _ = state.shutdown.changed() => None,
            };
            next.map(|event| (Ok::<Event, Infallible>(sse_event(&node, &event)), state))
        }
    });
    let stream = futures_util::StreamExt::chain(futures_util::stream::once(async { Ok(first) }), rest);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

/// The revision to resume after, from the `Last-Event-ID` a reconnecting event source sends
/// (`<node>:<revision>`, the id of the last event it saw). An id of another node asks for a
/// resync (`u64::MAX` is above every revision, which the daemon answers with one).
pub(super) fn last_event_id(headers: &HeaderMap, this_node: &str) -> Result<Option<u64>, HttpError> {
    let Some(value) = headers.get("last-event-id") else { return Ok(None) };
    let bad = || {
        http_error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Last-Event-ID must be the id of the last event seen (NODE:REVISION)",
        )
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    let (node, revision) = text.rsplit_once(':').ok_or_else(bad)?;
    let revision: u64 = revision.parse().map_err(|_| bad())?;
    Ok(Some(if node == this_node { revision } else { u64::MAX }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(value: &str) -> Result<Option<u64>, String> {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", value.parse().unwrap());
        last_event_id(&headers, "n1").map_err(|error| format!("{error:?}"))
    }

    #[test]
    fn an_event_id_of_this_node_resumes_after_it_and_one_of_another_node_resyncs() {
        assert_eq!(id("n1:42"), Ok(Some(42)));
        assert_eq!(id("n2:42"), Ok(Some(u64::MAX)));
        assert!(id("42").is_err() && id("n1:x").is_err());
        assert_eq!(last_event_id(&HeaderMap::new(), "n1").unwrap(), None);
    }
}
