//! The routes of `/api/v1` and `/metrics`. Each handler turns its path, query and body into the
//! socket's `Request`, asks the daemon through [`ask`] (the checks and the read view the socket
//! uses, then a `LocalCall`), and answers the socket's `Response` as JSON with an HTTP status
//! (errors: `{"type":"error","code":…,"message":…}` with the socket's stable codes, plus
//! `unauthenticated`, `timeout` and `not_found` of the HTTP door itself).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response as HttpResponse};
use konor_sdk::Secret;
use konor_sdk::protocol::{ErrorCode, Request, Response};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::oneshot;
use tracing::{Instrument, info, info_span};

use super::Door;
use super::answer::{Answer, HttpError, answer, http_error};
use super::context::{Ctx, WriteFields};
use super::extract::{GroupKey, JsonBody, PathSegment, QueryOf};
use crate::api::request_check::check_request;
use crate::api::socket::LocalCall;
use crate::health::{Thresholds, failures};
use crate::limits::HTTP_CALL_TIMEOUT;
use crate::metrics::{Scrape, render};

/// Asks the daemon, as the socket does: the request's checks first, `get` from the read view
/// when it can answer, else a `LocalCall` awaited at most [`HTTP_CALL_TIMEOUT`].
async fn ask(ctx: &Ctx, request: Request) -> HttpResponse {
    if let Err(message) = check_request(&request) {
        return answer(Response::Error { code: ErrorCode::BadRequest, message });
    }
    if let Err(message) = ctx.authorize(&request) {
        let refusal = super::context::forbidden(message);
        ctx.audit(&request, &refusal).await;
        return answer(refusal);
    }
    let client = ctx.client(ctx.door.connection_number());
    if let Request::Get { group, key } = &request
        && let Some(response) = ctx.door.reads.as_ref().and_then(|reads| reads.get(group, key, client.reveal))
    {
        return answer(response);
    }
    let identity = ctx.caller.identity.as_deref().unwrap_or("-");
    let span = info_span!("http_request", identity, remote = %ctx.caller.remote, kind = request.kind());
    if is_write(&request) {
        // Who changed what, from where: the log line an operator looks for (an audit log
        // proper comes with the security issue).
        span.in_scope(|| info!("HTTP write"));
    }
    let audited = crate::audit::audited(&request).then(|| request.clone());
    let (reply, answered) = oneshot::channel();
    let call = LocalCall::Request { client, request, reply };
    let asked = async {
        ctx.door.calls.send(call).await.ok()?;
        answered.await.ok()
    };
    match tokio::time::timeout(HTTP_CALL_TIMEOUT, asked).instrument(span).await {
        Ok(Some(response)) => {
            if let Some(request) = &audited {
                ctx.audit(request, &response).await;
            }
            answer(response)
        }
        Ok(None) => {
            http_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the daemon is stopping").into_response()
        }
        Err(_) => http_error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "no answer from the daemon within {}s; if this was a write, its outcome is unknown: read the group before retrying",
                HTTP_CALL_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
    }
}

/// True for requests that change state (logged as writes). Every request is named: a new one
/// must be sorted here.
fn is_write(request: &Request) -> bool {
    match request {
        Request::Get { .. }
        | Request::Snapshot { .. }
        | Request::History { .. }
        | Request::Show { .. }
        | Request::SchemaGet { .. }
        | Request::SchemaCheck { .. }
        | Request::Diff { .. }
        | Request::Conflicts { .. }
        | Request::Nodes
        | Request::Status { .. }
        | Request::ReleaseReport { .. }
        | Request::GroupList
        | Request::Health
        | Request::Alerts
        | Request::NodeHistory { .. }
        | Request::Revocations
        | Request::Audit { .. }
        | Request::SocketStats
        | Request::Hello { .. }
        | Request::Watch { .. }
        | Request::Unwatch { .. } => false,
        Request::ReportApply { .. }
        | Request::ReportErrorRate { .. }
        | Request::GroupCreate { .. }
        | Request::GroupJoin { .. }
        | Request::GroupLeave { .. }
        | Request::GroupRemove { .. }
        | Request::GroupRotateKey { .. }
        | Request::Set { .. }
        | Request::Delete { .. }
        | Request::Apply { .. }
        | Request::Rollback { .. }
        | Request::Release { .. }
        | Request::Promote { .. }
        | Request::Abort { .. }
        | Request::SchemaSet { .. }
        | Request::Revoke { .. } => true,
    }
}

/// The daemon's health, or the answer that says it could not be had.
/// The daemon's health, asked at most once per [`HEALTH_FRESH_FOR`]: health and metrics are open
/// to callers without a certificate, and each answer costs the daemon's thread a walk over its
/// groups, so a flood of scrapes costs it one call a second. Concurrent callers wait for one
/// answer.
pub(super) async fn ask_health(door: &Door) -> Result<crate::health::NodeHealth, HttpError> {
    let mut cached = door.health.lock().await;
    if let Some((at, health)) = cached.as_ref()
        && at.elapsed() < HEALTH_FRESH_FOR
    {
        return Ok(health.clone());
    }
    let health = ask_daemon_health(door).await?;
    *cached = Some((tokio::time::Instant::now(), health.clone()));
    Ok(health)
}

/// How long an answer of the daemon's health is served again.
const HEALTH_FRESH_FOR: std::time::Duration = std::time::Duration::from_millis(500);

async fn ask_daemon_health(door: &Door) -> Result<crate::health::NodeHealth, HttpError> {
    let (reply, answered) = oneshot::channel();
    let asked = async {
        door.calls.send(LocalCall::Health { reply }).await.ok()?;
        answered.await.ok()
    };
    match tokio::time::timeout(HTTP_CALL_TIMEOUT, asked).await {
        Ok(Some(health)) => Ok(health),
        Ok(None) => Err(http_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the daemon is stopping")),
        Err(_) => Err(http_error(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the daemon did not answer in time")),
    }
}

/// The API's OpenAPI description, built into the binary (a test keeps it and the router in step).
pub(super) const OPENAPI: &str = include_str!("../../../../docs/openapi.yaml");

pub(super) async fn openapi() -> HttpResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

/// Refuses a caller without a certificate before the route reads anything of the request
/// (reads are let through when the node serves them openly, `--http-open-reads`).
pub(super) async fn require_certificate(
    State(ctx): State<Ctx>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Answer {
    if request.method() == axum::http::Method::GET {
        ctx.may_read()?;
    } else {
        ctx.identity()?;
    }
    Ok(next.run(request).await)
}

/// The dashboard: one page that reads this node's API (no data in it).
pub(super) async fn dashboard() -> HttpResponse {
    let page = include_str!("dashboard.html");
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], page).into_response()
}

pub(super) async fn root() -> axum::response::Redirect {
    axum::response::Redirect::to("/dashboard")
}

pub(super) async fn not_found() -> HttpError {
    http_error(StatusCode::NOT_FOUND, "not_found", "no such route; the API is described in docs/http-api.md")
}

pub(super) async fn method_not_allowed() -> HttpError {
    http_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this route does not take that method")
}

pub(super) async fn metrics(State(ctx): State<Ctx>) -> Answer {
    let health = ask_health(&ctx.door).await?;
    let scrape = Scrape { health, socket: ctx.door.socket_stats.snapshot(), transport: ctx.door.transport.clone() };
    let text = render(&ctx.door.metrics, scrape)
        .map_err(|_| http_error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the metrics could not be encoded"))?;
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

pub(super) async fn health(State(ctx): State<Ctx>, QueryOf(thresholds): QueryOf<Thresholds>) -> Answer {
    let mut health = ask_health(&ctx.door).await?;
    let failed = failures(&health, &thresholds);
    // Health is open (load balancers, probes); its detail is for callers with a certificate
    // that the node's roles let read it.
    if ctx.caller.identity.is_none() || ctx.authorize(&Request::Health).is_err() {
        // The disk's error text names files; callers with a certificate see it.
        for error in health.degraded.values_mut() {
            *error = "a write to disk failed (the error is shown to callers with a certificate)".to_owned();
        }
        // Alerts name nodes and labels, which `/api/v1/nodes` shows only to callers with a
        // certificate: others learn that an alert of a kind holds, and when it was raised.
        for alert in &mut health.alerts {
            alert.subject = "(shown to callers with a certificate)".to_owned();
            alert.message = format!("a {} alert holds", alert.kind.as_str());
        }
    }
    let status = if failed.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({ "healthy": failed.is_empty(), "failures": failed, "health": health });
    Ok((status, axum::Json(body)).into_response())
}

/// Asks the daemon for a caller that may read (see [`Ctx::may_read`]).
async fn read(ctx: &Ctx, request: Request) -> Answer {
    if crate::api::authorize::needed(&request) > crate::api::authorize::Role::Viewer {
        // `--http-open-reads` opens what a viewer may read, never more (the audit log needs
        // the admin role): such a read needs a certificate whatever the door's settings.
        ctx.identity()?;
    } else {
        ctx.may_read()?;
    }
    Ok(ask(ctx, request).await)
}

/// Asks the daemon for a caller with a certificate: a command that changes state.
async fn command(ctx: &Ctx, request: Request) -> Answer {
    ctx.identity()?;
    Ok(ask(ctx, request).await)
}

pub(super) async fn nodes(State(ctx): State<Ctx>) -> Answer {
    read(&ctx, Request::Nodes).await
}

pub(super) async fn alerts(State(ctx): State<Ctx>) -> Answer {
    read(&ctx, Request::Alerts).await
}

pub(super) async fn mesh_history(State(ctx): State<Ctx>) -> Answer {
    read(&ctx, Request::NodeHistory { node: None }).await
}

pub(super) async fn node_history(State(ctx): State<Ctx>, PathSegment(node): PathSegment) -> Answer {
    read(&ctx, Request::NodeHistory { node: Some(node) }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    #[serde(default)]
    since_ms: Option<u64>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    node: Option<String>,
}

pub(super) async fn audit(
    State(ctx): State<Ctx>,
    QueryOf(AuditQuery { since_ms, group, node }): QueryOf<AuditQuery>,
) -> Answer {
    read(&ctx, Request::Audit { since_ms, group, node }).await
}

pub(super) async fn revocations(State(ctx): State<Ctx>) -> Answer {
    read(&ctx, Request::Revocations).await
}

/// `POST /api/v1/revocations`: the body is the signed revocation itself, as `konorctl cert
/// revoke --out` writes it. Its signature is the CA's, so the caller's own certificate only
/// opens the door.
pub(super) async fn revoke(State(ctx): State<Ctx>, JsonBody(revocation): JsonBody<Value>) -> Answer {
    command(&ctx, Request::Revoke { revocation: revocation.to_string() }).await
}

pub(super) async fn groups(State(ctx): State<Ctx>) -> Answer {
    read(&ctx, Request::GroupList).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PrefixQuery {
    #[serde(default)]
    prefix: Option<String>,
}

pub(super) async fn snapshot(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    QueryOf(PrefixQuery { prefix }): QueryOf<PrefixQuery>,
) -> Answer {
    read(&ctx, Request::Snapshot { group, prefix }).await
}

pub(super) async fn get_one(State(ctx): State<Ctx>, GroupKey(group, key): GroupKey) -> Answer {
    read(&ctx, Request::Get { group, key }).await
}

pub(super) async fn versions(State(ctx): State<Ctx>, PathSegment(group): PathSegment) -> Answer {
    read(&ctx, Request::History { group }).await
}

pub(super) async fn show(State(ctx): State<Ctx>, GroupKey(group, version): GroupKey) -> Answer {
    read(&ctx, Request::Show { group, version }).await
}

pub(super) async fn schema_get(State(ctx): State<Ctx>, PathSegment(group): PathSegment) -> Answer {
    read(&ctx, Request::SchemaGet { group }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SchemaBody {
    /// The schema; `null` removes it. Required: an empty body must not remove a schema.
    schema: Value,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
}

pub(super) async fn schema_set(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(SchemaBody { schema, message, if_version, if_content }): JsonBody<SchemaBody>,
) -> Answer {
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret: Vec::new() })?;
    let schema = (!schema.is_null()).then_some(schema);
    Ok(ask(&ctx, Request::SchemaSet { group, schema, meta }).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SchemaCheckBody {
    format: String,
    text: String,
    #[serde(default)]
    schema: Option<Value>,
}

/// Validates a file without writing: a read (a POST only because the file is a body).
pub(super) async fn schema_check(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(SchemaCheckBody { format, text, schema }): JsonBody<SchemaCheckBody>,
) -> Answer {
    read(&ctx, Request::SchemaCheck { group, format, text, schema }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiffQuery {
    from: String,
    to: String,
}

pub(super) async fn diff(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    QueryOf(DiffQuery { from, to }): QueryOf<DiffQuery>,
) -> Answer {
    read(&ctx, Request::Diff { group, from, to }).await
}

pub(super) async fn conflicts(State(ctx): State<Ctx>, PathSegment(group): PathSegment) -> Answer {
    read(&ctx, Request::Conflicts { group }).await
}

pub(super) async fn status(State(ctx): State<Ctx>, PathSegment(group): PathSegment) -> Answer {
    read(&ctx, Request::Status { group }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleasesQuery {
    limit: Option<u32>,
    release: Option<String>,
}

pub(super) async fn releases(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    QueryOf(ReleasesQuery { limit, release }): QueryOf<ReleasesQuery>,
) -> Answer {
    read(&ctx, Request::ReleaseReport { group, limit, release }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupCreateBody {
    name: String,
    mode: String,
    /// The group's key; the node makes one when absent.
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    evict_after_ms: Option<u64>,
    #[serde(default)]
    fencing: Option<String>,
    #[serde(default)]
    release: Option<String>,
}

pub(super) async fn group_create(State(ctx): State<Ctx>, JsonBody(body): JsonBody<GroupCreateBody>) -> Answer {
    let GroupCreateBody { name, mode, key, evict_after_ms, fencing, release } = body;
    let key = key.map(Secret::new);
    command(&ctx, Request::GroupCreate { name, mode, key, evict_after_ms, fencing, release }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GroupJoinBody {
    key: String,
}

pub(super) async fn group_join(
    State(ctx): State<Ctx>,
    PathSegment(name): PathSegment,
    JsonBody(GroupJoinBody { key }): JsonBody<GroupJoinBody>,
) -> Answer {
    command(&ctx, Request::GroupJoin { name, key: Secret::new(key) }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RotateKeyBody {
    #[serde(default)]
    key: Option<Secret>,
}

/// `POST /api/v1/groups/{group}/rotate-key`: `{key?}` or no body; answers the new key.
pub(super) async fn group_rotate_key(
    State(ctx): State<Ctx>,
    PathSegment(name): PathSegment,
    JsonBody(RotateKeyBody { key }): JsonBody<RotateKeyBody>,
) -> Answer {
    command(&ctx, Request::GroupRotateKey { name, key }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ForceBody {
    #[serde(default)]
    force: bool,
}

pub(super) async fn group_leave(
    State(ctx): State<Ctx>,
    PathSegment(name): PathSegment,
    JsonBody(ForceBody { force }): JsonBody<ForceBody>,
) -> Answer {
    command(&ctx, Request::GroupLeave { name, force }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RemoveBody {
    nodes: Vec<String>,
    #[serde(default)]
    force: bool,
}

pub(super) async fn group_remove(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(RemoveBody { nodes, force }): JsonBody<RemoveBody>,
) -> Answer {
    command(&ctx, Request::GroupRemove { group, nodes, force }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetMany {
    entries: BTreeMap<String, Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
    /// Keys to mark secret.
    #[serde(default)]
    secret: Vec<String>,
}

pub(super) async fn set_many(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(SetMany { entries, message, if_version, if_content, secret }): JsonBody<SetMany>,
) -> Answer {
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret })?;
    Ok(ask(&ctx, Request::Set { group, entries, meta }).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SetOne {
    value: Value,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
    /// Mark the key secret.
    #[serde(default)]
    secret: bool,
}

pub(super) async fn set_one(
    State(ctx): State<Ctx>,
    GroupKey(group, key): GroupKey,
    JsonBody(SetOne { value, message, if_version, if_content, secret }): JsonBody<SetOne>,
) -> Answer {
    let secret = if secret { vec![key.clone()] } else { Vec::new() };
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret })?;
    Ok(ask(&ctx, Request::Set { group, entries: BTreeMap::from([(key, value)]), meta }).await)
}

pub(super) async fn delete_one(
    State(ctx): State<Ctx>,
    GroupKey(group, key): GroupKey,
    QueryOf(fields): QueryOf<WriteFields>,
) -> Answer {
    let meta = ctx.meta(fields)?;
    Ok(ask(&ctx, Request::Delete { group, keys: vec![key], meta }).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteMany {
    keys: Vec<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
}

pub(super) async fn delete_many(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(DeleteMany { keys, message, if_version, if_content }): JsonBody<DeleteMany>,
) -> Answer {
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret: Vec::new() })?;
    Ok(ask(&ctx, Request::Delete { group, keys, meta }).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ApplyBody {
    format: String,
    text: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
    /// Keys to mark secret.
    #[serde(default)]
    secret: Vec<String>,
}

pub(super) async fn apply(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(ApplyBody { format, text, message, if_version, if_content, secret }): JsonBody<ApplyBody>,
) -> Answer {
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret })?;
    Ok(ask(&ctx, Request::Apply { group, format, text, meta }).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackBody {
    version: String,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleaseBody {
    version: String,
    #[serde(default)]
    strategy: Option<String>,
    #[serde(default)]
    waves: Option<Vec<u8>>,
    #[serde(default)]
    selector: Option<String>,
    #[serde(default)]
    bake_ms: Option<u64>,
    #[serde(default)]
    max_failed: Option<u32>,
    #[serde(default)]
    max_error_rate: Option<f64>,
    #[serde(default)]
    node_health: Option<bool>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
}

pub(super) async fn release(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(body): JsonBody<ReleaseBody>,
) -> Answer {
    let ReleaseBody {
        version,
        strategy,
        waves,
        selector,
        bake_ms,
        max_failed,
        max_error_rate,
        node_health,
        message,
        if_version,
        if_content,
    } = body;
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret: Vec::new() })?;
    let request = Request::Release {
        group,
        version,
        strategy,
        waves,
        selector,
        bake_ms,
        max_failed,
        max_error_rate,
        node_health,
        meta,
    };
    Ok(ask(&ctx, request).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PromoteBody {
    #[serde(default)]
    wave: Option<u32>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
}

pub(super) async fn promote(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(PromoteBody { wave, message, if_version, if_content }): JsonBody<PromoteBody>,
) -> Answer {
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret: Vec::new() })?;
    Ok(ask(&ctx, Request::Promote { group, wave, meta }).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AbortBody {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_content: Option<String>,
}

pub(super) async fn abort(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(AbortBody { reason, message, if_version, if_content }): JsonBody<AbortBody>,
) -> Answer {
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret: Vec::new() })?;
    Ok(ask(&ctx, Request::Abort { group, reason, meta }).await)
}

pub(super) async fn rollback(
    State(ctx): State<Ctx>,
    PathSegment(group): PathSegment,
    JsonBody(RollbackBody { version, message, if_version, if_content }): JsonBody<RollbackBody>,
) -> Answer {
    let meta = ctx.meta(WriteFields { message, if_version, if_content, secret: Vec::new() })?;
    Ok(ask(&ctx, Request::Rollback { group, version, meta }).await)
}
