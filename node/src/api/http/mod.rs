//! The HTTP API (issue 15): JSON under `/api/v1`, Prometheus `/metrics`, served over HTTPS with
//! the node's certificate. It is a second door onto the daemon: each route builds the same
//! `Request` the socket would and hands it over as a [`LocalCall`], so both doors answer alike
//! (`routes.rs`); the watch stream is Server-Sent Events (`watch.rs`).
//!
//! Off unless `--http-listen` is given. Reads and writes need a client certificate issued by the
//! cluster CA (`tls.rs`); `/api/v1/health` and `/metrics` do not, so a load balancer or a
//! scraper can reach them without one, and neither does `/api/v1/enroll`, where a host with no
//! certificate yet presents a join token (`enroll.rs`). Every door has its bounds (`crate::limits`): connections
//! at once, handshake and header time, body bytes, watch streams, and the wait for the daemon.

mod answer;
mod context;
mod enroll;
mod extract;
mod routes;
mod tls;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::Response as HttpResponse;
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch as signal};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use self::context::{Caller, Ctx};
pub use self::tls::server_config;
use super::read_view::ReadView;
use super::socket::{LocalApiStats, LocalCall};
use crate::limits::{HTTP_BODY_BYTES_MAX, HTTP_CONNECTIONS_MAX, HTTP_IO_TIMEOUT, HTTP_WATCHES_MAX};
use crate::metrics::Metrics;
use crate::peer::transport::TransportStats;

/// File in the data dir holding the HTTP API's bound address, written at start (tools and tests
/// started with `--http-listen 127.0.0.1:0` read it).
pub const HTTP_ADDR_FILE: &str = "http.addr";

/// Connection numbers the HTTP door gives the daemon start here, far above the socket's (which
/// count from 1), so the daemon never takes an HTTP watch for a socket connection's.
const CONNECTION_NUMBERS_START: u64 = 1 << 48;

/// What the HTTP door needs.
#[derive(Debug)]
pub struct HttpConfig {
    /// This node.
    pub node_id: String,
    /// TLS with the node's certificate ([`server_config`]).
    pub tls: Arc<rustls::ServerConfig>,
    /// The daemon's queue of local calls, shared with the socket.
    pub calls: mpsc::Sender<LocalCall>,
    /// The view `get`s are answered from, as on the socket.
    pub reads: Option<ReadView>,
    /// The socket's counters, for `/metrics`.
    pub socket_stats: Arc<LocalApiStats>,
    /// The peer transport's counters, for `/metrics`.
    pub transport: Arc<TransportStats>,
    /// Latencies and the door's counters.
    pub metrics: Metrics,
    /// Serve reads (`GET`s of `/api/v1`) to callers without a certificate (`--http-open-reads`),
    /// for a browser showing the dashboard; writes still need one.
    pub open_reads: bool,
    /// The certificate revocations the node enforces: a connection whose client certificate is
    /// revoked while it is open is closed (with its watch streams).
    pub revocations: crate::pki::revocation::Revocations,
    /// Who may do what (the settings file's `[roles]`); `None`: every caller with a client
    /// certificate may do anything.
    pub roles: Option<Arc<crate::api::authorize::RolePolicy>>,
    /// The CA key on a signer, and the certificate this door presents: a signer proves it
    /// holds the key to an enrolling host (`enroll.rs`).
    pub signer: Option<(Arc<crate::pki::ca::Signer>, rustls_pki_types::CertificateDer<'static>)>,
    /// Where admin actions, refusals and enrollments are recorded.
    pub audit: Option<crate::audit::Audit>,
}

/// What every request's handler shares.
#[derive(Debug)]
struct Door {
    node_id: String,
    calls: mpsc::Sender<LocalCall>,
    reads: Option<ReadView>,
    socket_stats: Arc<LocalApiStats>,
    transport: Arc<TransportStats>,
    metrics: Metrics,
    /// Places for watch streams.
    watches: Arc<Semaphore>,
    /// The next connection number for the daemon (see [`CONNECTION_NUMBERS_START`]).
    next_connection: AtomicU64,
    /// Turns true when the node stops: watch streams end then.
    shutdown: signal::Receiver<bool>,
    /// See [`HttpConfig::open_reads`].
    open_reads: bool,
    /// The daemon's last health answer and when it came (see `routes::ask_health`).
    health: tokio::sync::Mutex<Option<(tokio::time::Instant, crate::health::NodeHealth)>>,
    /// See [`HttpConfig::revocations`].
    revocations: crate::pki::revocation::Revocations,
    /// See [`HttpConfig::roles`].
    roles: Option<Arc<crate::api::authorize::RolePolicy>>,
    /// See [`HttpConfig::signer`].
    signer: Option<(Arc<crate::pki::ca::Signer>, rustls_pki_types::CertificateDer<'static>)>,
    /// See [`HttpConfig::audit`].
    audit: Option<crate::audit::Audit>,
}

impl Door {
    fn connection_number(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }
}

/// Binds the HTTP API's address; fails at start, before the node runs, when it cannot.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen).await.with_context(|| format!("cannot listen for the HTTP API on {listen}"))
}

/// Serves the HTTP API on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, config: HttpConfig, mut shutdown: signal::Receiver<bool>) {
    let door = Arc::new(Door {
        node_id: config.node_id,
        calls: config.calls,
        reads: config.reads,
        socket_stats: config.socket_stats,
        transport: config.transport,
        metrics: config.metrics,
        watches: Arc::new(Semaphore::new(HTTP_WATCHES_MAX)),
        next_connection: AtomicU64::new(CONNECTION_NUMBERS_START),
        shutdown: shutdown.clone(),
        open_reads: config.open_reads,
        health: tokio::sync::Mutex::new(None),
        revocations: config.revocations,
        roles: config.roles,
        signer: config.signer,
        audit: config.audit,
    });
    let acceptor = TlsAcceptor::from(config.tls);
    let places = Arc::new(Semaphore::new(HTTP_CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        info!(node = %door.node_id, %addr, "HTTP API listening");
    }
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "HTTP accept failed");
                        // Out of file descriptors and the like: do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(place) = places.clone().try_acquire_owned() else {
                    door.metrics.http.refused.fetch_add(1, Ordering::Relaxed);
                    debug!(%remote, "HTTP connection refused: {HTTP_CONNECTIONS_MAX} are open");
                    continue;
                };
                let task = serve_connection(stream, remote, acceptor.clone(), door.clone(), shutdown.clone());
                connections.spawn(async move {
                    task.await;
                    drop(place);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Connections finish the request they are in (graceful shutdown), then end.
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(HTTP_IO_TIMEOUT, drain).await.is_err() {
        connections.shutdown().await;
    }
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    door: Arc<Door>,
    mut shutdown: signal::Receiver<bool>,
) {
    let stream = match tokio::time::timeout(HTTP_IO_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            door.metrics.http.refused.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, %error, "HTTP TLS handshake failed");
            return;
        }
        Err(_) => {
            door.metrics.http.refused.fetch_add(1, Ordering::Relaxed);
            debug!(%remote, "HTTP TLS handshake timed out");
            return;
        }
    };
    let identity = tls::caller_identity(stream.get_ref().1.peer_certificates());
    let certificate = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).cloned();
    let caller = Caller { identity, remote };
    let service = TowerToHyperService::new(router(door.clone(), caller));
    let counters = door.metrics.http.clone();
    counters.connections.fetch_add(1, Ordering::Relaxed);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HTTP_IO_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut revoked = door.revocations.subscribe();
    // A revocation between the handshake and here is checked at once.
    revoked.mark_changed();
    loop {
        tokio::select! {
            biased;
            changed = revoked.changed(), if certificate.is_some() => {
                let covering = certificate.as_ref().and_then(|cert| door.revocations.covering(cert));
                if changed.is_ok() && let Some(revocation) = covering {
                    // Dropped, not drained: a revoked caller gets no answer in flight either.
                    warn!(%remote, identity = %revocation.node, "closing an HTTP connection whose client certificate was revoked");
                    break;
                }
            }
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%remote, %error, "HTTP connection ended with an error");
                }
                break;
            }
            _ = shutdown.changed() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(HTTP_IO_TIMEOUT, connection).await;
                break;
            }
        }
    }
    counters.connections.fetch_sub(1, Ordering::Relaxed);
}

/// The router for one connection (its caller is fixed by the TLS handshake).
fn router(door: Arc<Door>, caller: Caller) -> Router {
    let ctx = Ctx { door: door.clone(), caller };
    let counters = door.metrics.http.clone();
    // Anyone who completes the TLS handshake may call these.
    let open = Router::new()
        .route("/api/v1/openapi.yaml", get(routes::openapi))
        .route("/metrics", get(routes::metrics))
        .route("/api/v1/health", get(routes::health))
        .route("/", get(routes::root))
        .route("/dashboard", get(routes::dashboard))
        // A host with no certificate yet: its join token is the credential (`enroll.rs`).
        .route("/api/v1/enroll", post(enroll::enroll))
        .route("/api/v1/enroll/challenge", post(enroll::challenge));
    // Everything else needs a certificate from the cluster CA, checked before anything of the
    // request (its body) is read.
    let guarded = Router::new()
        .route("/api/v1/nodes", get(routes::nodes))
        .route("/api/v1/alerts", get(routes::alerts))
        .route("/api/v1/history", get(routes::mesh_history))
        .route("/api/v1/history/{node}", get(routes::node_history))
        .route("/api/v1/revocations", get(routes::revocations).post(routes::revoke))
        .route("/api/v1/audit", get(routes::audit))
        .route("/api/v1/groups", get(routes::groups).post(routes::group_create))
        .route("/api/v1/groups/{group}/join", post(routes::group_join))
        .route("/api/v1/groups/{group}/leave", post(routes::group_leave))
        .route("/api/v1/groups/{group}/rotate-key", post(routes::group_rotate_key))
        .route("/api/v1/groups/{group}/remove", post(routes::group_remove))
        .route("/api/v1/groups/{group}/settings", get(routes::snapshot).post(routes::set_many))
        .route(
            "/api/v1/groups/{group}/settings/{key}",
            get(routes::get_one).put(routes::set_one).delete(routes::delete_one),
        )
        .route("/api/v1/groups/{group}/delete", post(routes::delete_many))
        .route("/api/v1/groups/{group}/apply", post(routes::apply))
        .route("/api/v1/groups/{group}/rollback", post(routes::rollback))
        .route("/api/v1/groups/{group}/release", post(routes::release))
        .route("/api/v1/groups/{group}/promote", post(routes::promote))
        .route("/api/v1/groups/{group}/abort", post(routes::abort))
        .route("/api/v1/groups/{group}/versions", get(routes::versions))
        .route("/api/v1/groups/{group}/versions/{version}", get(routes::show))
        .route("/api/v1/groups/{group}/schema", get(routes::schema_get).put(routes::schema_set))
        .route("/api/v1/groups/{group}/schema/check", post(routes::schema_check))
        .route("/api/v1/groups/{group}/diff", get(routes::diff))
        .route("/api/v1/groups/{group}/conflicts", get(routes::conflicts))
        .route("/api/v1/groups/{group}/status", get(routes::status))
        .route("/api/v1/groups/{group}/releases", get(routes::releases))
        .route("/api/v1/groups/{group}/watch", get(watch::watch))
        .route_layer(axum::middleware::from_fn_with_state(ctx.clone(), routes::require_certificate));
    open.merge(guarded)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(HTTP_BODY_BYTES_MAX))
        .layer(axum::middleware::map_response(move |response: HttpResponse| {
            let counters = counters.clone();
            async move {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                if response.status().as_u16() >= 400 {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                response
            }
        }))
        .with_state(ctx)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// (method, path) of every route `router` serves, read from this file's source.
    fn routed() -> BTreeSet<(String, String)> {
        let source = include_str!("mod.rs");
        let body = source.split("fn router(").nth(1).unwrap().split(".fallback(").next().unwrap();
        let mut routes = BTreeSet::new();
        for chunk in body.split(".route(").skip(1) {
            let path = chunk.trim_start().trim_start_matches('"').split('"').next().unwrap().to_owned();
            for method in ["get", "post", "put", "delete"] {
                if ["routes", "watch", "enroll"].iter().any(|module| chunk.contains(&format!("{method}({module}::"))) {
                    routes.insert((method.to_owned(), path.clone()));
                }
            }
        }
        routes
    }

    /// (method, path) of every operation in docs/openapi.yaml.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: serde_yaml::Value = serde_yaml::from_str(super::routes::OPENAPI).unwrap();
        let mut operations = BTreeSet::new();
        for (path, item) in doc["paths"].as_mapping().unwrap() {
            for (method, _) in item.as_mapping().unwrap() {
                let method = method.as_str().unwrap();
                if method != "parameters" {
                    operations.insert((method.to_owned(), path.as_str().unwrap().to_owned()));
                }
            }
        }
        operations
    }

    #[test]
    fn the_openapi_description_names_exactly_the_routes_served() {
        let (routed, documented) = (routed(), documented());
        assert!(routed.len() > 20, "the source scan found too few routes: {routed:?}");
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty() && unserved.is_empty(),
            "served but not in docs/openapi.yaml: {undocumented:?}; in it but not served: {unserved:?}"
        );
    }
}
