//! `konorctl --endpoint https://HOST:PORT`: the same requests as on the socket, sent to any
//! node's HTTP API (docs/http-api.md), as `etcdctl --endpoints` does. Each request becomes its
//! route; the answer's JSON is the socket's answer, so rendering and exit codes do not change.
//! The caller presents a certificate from the cluster CA (`--tls-dir`, from `konorctl cert
//! issue`) and checks the node's against the same CA under the name every node answers to.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use konor_sdk::protocol::{ErrorCode, FRAME_BYTES_MAX, Request, Response, WatchEvent};
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::api::request_check::check_request;
use crate::pki::identity::load_identity;
use crate::pki::{SERVER_NAME, crypto_provider};
use crate::wall_clock::WallTime;

/// Environment variable naming the endpoint when `--endpoint` is not given.
pub const ENDPOINT_ENV: &str = "KONOR_ENDPOINT";

/// Environment variable naming the caller's certificate directory when `--tls-dir` is not given.
pub const TLS_DIR_ENV: &str = "KONOR_TLS_DIR";

/// Largest answer read: an answer on the socket is one frame at most.
const ANSWER_BYTES_MAX: usize = FRAME_BYTES_MAX;

/// A watch stream silent this long is given up and opened again: the node sends a comment
/// line every 15 s (`api/http/watch.rs`), so three missed ones mean it is gone.
const WATCH_SILENCE_MAX: Duration = Duration::from_secs(45);

/// The node could not be reached, or did not answer: the outcome of a write is unknown (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach konord at {authority}: {reason}")]
pub struct Unreachable {
    authority: String,
    reason: String,
}

/// The endpoint given is not `https://HOST:PORT` (a usage error, exit 2).
#[derive(Debug, thiserror::Error)]
#[error("the endpoint {url:?} {problem}")]
pub struct BadEndpoint {
    url: String,
    problem: &'static str,
}

/// A node's HTTP API, with the caller's TLS config.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port`.
    authority: String,
    tls: TlsConnector,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("authority", &self.authority).finish_non_exhaustive()
    }
}

impl Endpoint {
    /// `url` is `https://HOST:PORT`; `tls_dir` holds `node.crt`, `node.key`, `node.id` and
    /// `ca.crt` as `konorctl cert issue` writes them.
    pub fn new(url: &str, tls_dir: &std::path::Path) -> anyhow::Result<Endpoint> {
        let bad = |problem| BadEndpoint { url: url.to_owned(), problem };
        let Some(authority) = url.strip_prefix("https://") else {
            return Err(bad("must start with https:// (the HTTP API is served over TLS only)").into());
        };
        let authority = authority.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
            return Err(bad("must be https://HOST:PORT, with no path").into());
        }
        let identity = load_identity(tls_dir).with_context(|| {
            format!(
                "cannot load the caller's certificate from {} (make one with konorctl cert issue)",
                tls_dir.display()
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(identity.ca_cert().clone()).context("the cluster CA's certificate is not usable")?;
        let config = rustls::ClientConfig::builder_with_details(crypto_provider(), Arc::new(WallTime))
            .with_safe_default_protocol_versions()
            .context("cannot build the TLS config")?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![identity.cert().clone()], identity.key().clone_key())
            .context("cannot use the caller's certificate")?;
        Ok(Endpoint { authority: authority.to_owned(), tls: TlsConnector::from(Arc::new(config)) })
    }

    fn unreachable(&self, reason: String) -> Unreachable {
        Unreachable { authority: self.authority.clone(), reason }
    }

    /// Opens a connection (TCP, TLS, HTTP/1.1) for requests one after another.
    pub async fn session(&self) -> anyhow::Result<Session> {
        let tcp = TcpStream::connect(&self.authority).await.map_err(|error| self.unreachable(error.to_string()))?;
        let name = ServerName::try_from(SERVER_NAME).context("the server name")?;
        let tls =
            self.tls.connect(name, tcp).await.map_err(|error| self.unreachable(format!("TLS handshake: {error}")))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|error| self.unreachable(format!("HTTP: {error}")))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Session { endpoint: self.clone(), sender })
    }

    /// Opens a connection and sends one request; the answer's status and headers, and its body
    /// to read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        self.session().await?.send(method, path, body).await
    }

    /// Sends `request` to its route on a new connection and returns the node's answer, as the
    /// socket would have it.
    pub async fn ask(&self, request: &Request) -> anyhow::Result<Response> {
        self.session().await?.ask(request).await
    }

    /// Watches `group` after `from` (or from now) and calls `each` with every event until it
    /// returns false. A stream that ends is resumed from the last revision seen, as the SDK
    /// resumes a watch.
    pub async fn watch(
        &self,
        group: &str,
        prefix: Option<&str>,
        mut from: Option<u64>,
        mut each: impl FnMut(WatchEvent) -> anyhow::Result<bool>,
        mut on_watching: impl FnMut(u64),
    ) -> anyhow::Result<()> {
        let prefix = prefix.map(str::to_owned);
        check_request(&Request::Watch { group: group.to_owned(), from_revision: from, prefix: prefix.clone() })
            .map_err(|message| anyhow::anyhow!(message))?;
        let mut told = false;
        loop {
            let mut query = Vec::new();
            if let Some(revision) = from {
                query.push(format!("from_revision={revision}"));
            }
            if let Some(prefix) = &prefix {
                query.push(format!("prefix={}", percent_encode(prefix)));
            }
            let path = match query.is_empty() {
                true => format!("/api/v1/groups/{group}/watch"),
                false => format!("/api/v1/groups/{group}/watch?{}", query.join("&")),
            };
            let answer = tokio::time::timeout(WATCH_SILENCE_MAX, self.send(Method::GET, &path, None))
                .await
                .map_err(|_| self.unreachable(format!("no answer to the watch within {WATCH_SILENCE_MAX:?}")))??;
            if answer.status() != StatusCode::OK {
                let status = answer.status();
                let bytes = read_body(answer, &self.authority).await?;
                let response = parse_answer(status, &bytes)?;
                bail!("the watch was refused: {}", serde_json::to_string(&response).unwrap_or_default());
            }
            let mut body = answer.into_body();
            // Bytes, split into events before decoding: a character may straddle two frames.
            let mut pending: Vec<u8> = Vec::new();
            loop {
                // The node sends a comment line every 15 s: a longer silence is a dead node.
                let Ok(next) = tokio::time::timeout(WATCH_SILENCE_MAX, body.frame()).await else { break };
                let Some(frame) = next else { break };
                let frame = frame.context("the watch stream broke")?;
                let Some(data) = frame.data_ref() else { continue };
                pending.extend_from_slice(data);
                if pending.len() > ANSWER_BYTES_MAX {
                    bail!("an event of the watch stream is over {ANSWER_BYTES_MAX} bytes");
                }
                while let Some(end) = pending.windows(2).position(|pair| pair == b"\n\n") {
                    let block: Vec<u8> = pending.drain(..end + 2).collect();
                    let block = String::from_utf8(block).context("an event of the watch stream is not UTF-8")?;
                    let (kind, data) = sse_fields(&block);
                    match kind.as_deref() {
                        Some("watching") => {
                            let revision = serde_json::from_str::<Value>(&data)
                                .ok()
                                .and_then(|v| v.get("revision").and_then(Value::as_u64));
                            if let Some(revision) = revision {
                                // A watch from now resumes after the revision it started at.
                                from = from.or(Some(revision));
                                if !told {
                                    on_watching(revision);
                                    told = true;
                                }
                            }
                        }
                        Some(_) => {
                            let event: WatchEvent =
                                serde_json::from_str(&data).context("an event of the watch stream is not readable")?;
                            from = Some(match &event {
                                WatchEvent::Change { revision, .. } | WatchEvent::Resync { revision, .. } => *revision,
                                #[allow(unreachable_patterns)]
                                _ => from.unwrap_or(0),
                            });
                            if !each(event)? {
                                return Ok(());
                            }
                        }
                        None => {}
                    }
                }
            }
            // The node ended the stream (it stops, or the watch fell behind), or went silent:
            // resume after the last revision seen.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// One connection to a node's HTTP API: requests go one after another, each after the last
/// answer was read (HTTP/1.1 keep-alive).
pub struct Session {
    endpoint: Endpoint,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Session {
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.endpoint.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))
            .context("cannot build the request")?;
        self.sender.ready().await.map_err(|error| self.endpoint.unreachable(format!("connection lost: {error}")))?;
        Ok(self
            .sender
            .send_request(request)
            .await
            .map_err(|error| self.endpoint.unreachable(format!("no answer: {error}")))?)
    }

    /// Sends `request` to its route on this connection; the node's answer, as the socket's.
    pub async fn ask(&mut self, request: &Request) -> anyhow::Result<Response> {
        if let Err(message) = check_request(request) {
            return Ok(Response::Error { code: ErrorCode::BadRequest, message });
        }
        let (method, path, body) = route(request)?;
        let answer = self.send(method, &path, body.as_ref()).await?;
        let status = answer.status();
        let bytes = read_body(answer, &self.endpoint.authority).await?;
        parse_answer(status, &bytes)
    }
}

/// An answer's whole body, at most [`ANSWER_BYTES_MAX`].
async fn read_body(answer: hyper::Response<hyper::body::Incoming>, authority: &str) -> anyhow::Result<Bytes> {
    Ok(Limited::new(answer.into_body(), ANSWER_BYTES_MAX)
        .collect()
        .await
        .map_err(|error| anyhow::anyhow!("cannot read the answer from {authority}: {error}"))?
        .to_bytes())
}

/// The `event:` and joined `data:` lines of one SSE block.
fn sse_fields(block: &str) -> (Option<String>, String) {
    let mut kind = None;
    let mut data = Vec::new();
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            kind = Some(value.trim_start().to_owned());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    (kind, data.join("\n"))
}

/// The route of a request: method, path and query, body.
fn route(request: &Request) -> anyhow::Result<(Method, String, Option<Value>)> {
    let groups = "/api/v1/groups";
    Ok(match request {
        Request::Get { group, key } => (Method::GET, format!("{groups}/{group}/settings/{key}"), None),
        Request::Snapshot { group, prefix: None } => (Method::GET, format!("{groups}/{group}/settings"), None),
        Request::Snapshot { group, prefix: Some(prefix) } => {
            (Method::GET, format!("{groups}/{group}/settings?prefix={}", percent_encode(prefix)), None)
        }
        Request::Show { group, version } => {
            (Method::GET, format!("{groups}/{group}/versions/{}", percent_encode(version)), None)
        }
        Request::SchemaGet { group } => (Method::GET, format!("{groups}/{group}/schema"), None),
        Request::SchemaSet { group, schema, meta } => {
            (Method::PUT, format!("{groups}/{group}/schema"), Some(write_body(meta, json!({ "schema": schema }))))
        }
        Request::SchemaCheck { group, format, text, schema } => (
            Method::POST,
            format!("{groups}/{group}/schema/check"),
            Some(json!({ "format": format, "text": text, "schema": schema })),
        ),
        Request::GroupCreate { name, mode, key, evict_after_ms, fencing, release } => {
            let key = key.as_ref().map(|key| key.expose().clone());
            let body = json!({
                "name": name, "mode": mode, "key": key, "evict_after_ms": evict_after_ms, "fencing": fencing,
                "release": release,
            });
            (Method::POST, groups.to_owned(), Some(body))
        }
        Request::GroupJoin { name, key } => {
            (Method::POST, format!("{groups}/{name}/join"), Some(json!({ "key": key.expose() })))
        }
        Request::GroupRotateKey { name, key } => (
            Method::POST,
            format!("{groups}/{name}/rotate-key"),
            Some(match key {
                Some(key) => json!({ "key": key.expose() }),
                None => json!({}),
            }),
        ),
        Request::GroupLeave { name, force } => {
            (Method::POST, format!("{groups}/{name}/leave"), Some(json!({ "force": force })))
        }
        Request::GroupRemove { group, nodes, force } => {
            (Method::POST, format!("{groups}/{group}/remove"), Some(json!({ "nodes": nodes, "force": force })))
        }
        Request::GroupList => (Method::GET, groups.to_owned(), None),
        Request::Set { group, entries, meta } => {
            (Method::POST, format!("{groups}/{group}/settings"), Some(write_body(meta, json!({ "entries": entries }))))
        }
        Request::Delete { group, keys, meta } => {
            (Method::POST, format!("{groups}/{group}/delete"), Some(write_body(meta, json!({ "keys": keys }))))
        }
        Request::Apply { group, format, text, meta } => (
            Method::POST,
            format!("{groups}/{group}/apply"),
            Some(write_body(meta, json!({ "format": format, "text": text }))),
        ),
        Request::Rollback { group, version, meta } => {
            (Method::POST, format!("{groups}/{group}/rollback"), Some(write_body(meta, json!({ "version": version }))))
        }
        Request::Release {
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
        } => (
            Method::POST,
            format!("{groups}/{group}/release"),
            Some(write_body(
                meta,
                json!({
                    "version": version,
                    "strategy": strategy,
                    "waves": waves,
                    "selector": selector,
                    "bake_ms": bake_ms,
                    "max_failed": max_failed,
                    "max_error_rate": max_error_rate,
                    "node_health": node_health,
                }),
            )),
        ),
        Request::Promote { group, wave, meta } => {
            (Method::POST, format!("{groups}/{group}/promote"), Some(write_body(meta, json!({ "wave": wave }))))
        }
        Request::Abort { group, reason, meta } => {
            (Method::POST, format!("{groups}/{group}/abort"), Some(write_body(meta, json!({ "reason": reason }))))
        }
        Request::History { group } => (Method::GET, format!("{groups}/{group}/versions"), None),
        Request::Diff { group, from, to } => (
            Method::GET,
            format!("{groups}/{group}/diff?from={}&to={}", percent_encode(from), percent_encode(to)),
            None,
        ),
        Request::Conflicts { group } => (Method::GET, format!("{groups}/{group}/conflicts"), None),
        Request::Nodes => (Method::GET, "/api/v1/nodes".to_owned(), None),
        Request::Health => (Method::GET, "/api/v1/health".to_owned(), None),
        Request::Alerts => (Method::GET, "/api/v1/alerts".to_owned(), None),
        Request::NodeHistory { node: None } => (Method::GET, "/api/v1/history".to_owned(), None),
        Request::NodeHistory { node: Some(node) } => (Method::GET, format!("/api/v1/history/{node}"), None),
        Request::Revocations => (Method::GET, "/api/v1/revocations".to_owned(), None),
        Request::Audit { since_ms, group, node } => {
            let mut query: Vec<String> = Vec::new();
            if let Some(since_ms) = since_ms {
                query.push(format!("since_ms={since_ms}"));
            }
            if let Some(group) = group {
                query.push(format!("group={}", percent_encode(group)));
            }
            if let Some(node) = node {
                query.push(format!("node={}", percent_encode(node)));
            }
            let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            (Method::GET, format!("/api/v1/audit{query}"), None)
        }
        Request::Revoke { revocation } => {
            // The body is the revocation's own JSON: parsed here so it travels as an object.
            let body = serde_json::from_str::<serde_json::Value>(revocation)
                .map_err(|error| anyhow::anyhow!("the revocation is not JSON: {error}"))?;
            (Method::POST, "/api/v1/revocations".to_owned(), Some(body))
        }
        Request::Status { group } => (Method::GET, format!("{groups}/{group}/status"), None),
        Request::ReleaseReport { group, limit, release } => {
            let mut query: Vec<String> = limit.map(|limit| format!("limit={limit}")).into_iter().collect();
            query.extend(release.as_deref().map(|release| format!("release={}", percent_encode(release))));
            let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            (Method::GET, format!("{groups}/{group}/releases{query}"), None)
        }
        other => bail!("{} is not served over HTTP", other.kind()),
    })
}

/// A write's body: its own fields plus the message, the precondition and the keys it marks
/// secret (the author is the caller's certificate, never a field). A route that takes no
/// `secret` refuses a body that has one, rather than write without the mark.
fn write_body(meta: &konor_sdk::protocol::WriteMeta, mut body: Value) -> Value {
    if let Value::Object(fields) = &mut body {
        fields.insert("message".to_owned(), json!(meta.message));
        for (name, value) in [("if_version", &meta.if_version), ("if_content", &meta.if_content)] {
            if let Some(value) = value {
                fields.insert(name.to_owned(), json!(value));
            }
        }
        if !meta.secret.is_empty() {
            fields.insert("secret".to_owned(), json!(meta.secret));
        }
    }
    body
}

/// `text` for a query value: unreserved bytes as they are, every other byte as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The node's answer as the socket's: the door's own error codes map to the nearest socket code
/// (the exit code follows it), with the original code in the message.
fn parse_answer(status: StatusCode, bytes: &[u8]) -> anyhow::Result<Response> {
    if let Ok(response) = serde_json::from_slice::<Response>(bytes) {
        return Ok(response);
    }
    let value: Value = serde_json::from_slice(bytes).with_context(|| {
        format!("the node answered {status} with a body that is not JSON: {}", String::from_utf8_lossy(bytes))
    })?;
    // `/api/v1/health` answers its own document, 503 when the node fails the thresholds; the
    // node's health is in it either way (konorctl judges its own thresholds).
    if let (Some(health), Some(_)) = (value.get("health"), value.get("healthy")) {
        let health = serde_json::from_value(health.clone()).context("the node's health document is not readable")?;
        return Ok(Response::Health { health });
    }
    let code = value.get("code").and_then(Value::as_str).unwrap_or("unknown");
    let message = value.get("message").and_then(Value::as_str).unwrap_or_default();
    let mapped = match code {
        "unauthenticated" => ErrorCode::Forbidden,
        "not_found" => ErrorCode::NotFound,
        "timeout" => ErrorCode::OutcomeUnknown,
        "unavailable" | "busy" => ErrorCode::Unavailable,
        "bad_request" | "method_not_allowed" => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    Ok(Response::Error { code: mapped, message: format!("{message} ({code}, HTTP {status})") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn each_request_has_its_route() {
        let set = Request::Set {
            group: "app".into(),
            entries: BTreeMap::from([("a.b".into(), json!(1))]),
            meta: Default::default(),
        };
        let (method, path, body) = route(&set).unwrap();
        assert_eq!((method, path.as_str()), (Method::POST, "/api/v1/groups/app/settings"));
        assert_eq!(body.unwrap()["entries"], json!({ "a.b": 1 }));
        let diff = Request::Diff { group: "app".into(), from: "v1".into(), to: "v2-ab&c".into() };
        assert_eq!(route(&diff).unwrap().1, "/api/v1/groups/app/diff?from=v1&to=v2-ab%26c");
        let delete = Request::Delete {
            group: "app".into(),
            keys: vec!["k".into(), "l".into()],
            meta: konor_sdk::protocol::WriteMeta { author: String::new(), message: "a b".into(), ..Default::default() },
        };
        let (method, path, body) = route(&delete).unwrap();
        assert_eq!((method, path.as_str()), (Method::POST, "/api/v1/groups/app/delete"));
        assert_eq!(body.unwrap(), json!({ "keys": ["k", "l"], "message": "a b" }));
        assert_eq!(percent_encode("a b&c"), "a%20b%26c");
        assert!(route(&Request::SocketStats).is_err());
    }

    #[test]
    fn the_doors_own_errors_become_socket_errors_that_name_them() {
        let body = br#"{"type":"error","code":"unauthenticated","message":"needs a certificate"}"#;
        let answer = parse_answer(StatusCode::UNAUTHORIZED, body).unwrap();
        assert_eq!(
            answer,
            Response::Error {
                code: ErrorCode::Forbidden,
                message: "needs a certificate (unauthenticated, HTTP 401 Unauthorized)".into()
            }
        );
        let body = br#"{"type":"error","code":"unknown_group","message":"no"}"#;
        assert_eq!(
            parse_answer(StatusCode::NOT_FOUND, body).unwrap(),
            Response::Error { code: ErrorCode::UnknownGroup, message: "no".into() }
        );
        assert!(parse_answer(StatusCode::BAD_GATEWAY, b"<html>").is_err());
    }
}
