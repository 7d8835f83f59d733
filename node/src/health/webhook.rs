//! Alert webhooks (issue 15): each alert raised or cleared is POSTed as JSON to every URL of the
//! settings file's `alert-webhook` list, with retries and backoff, from a bounded queue per URL.
//!
//! The daemon hands changes to [`Webhooks::notify`], which never waits: a full queue drops the
//! oldest notice (counted and logged), so a dead receiver costs memory for
//! [`WEBHOOK_QUEUE_MAX`] notices at most and never slows the daemon. One task per URL sends its
//! queue in order, one notice at a time; a notice is retried after 1 s, 2 s, 4 s ... up to
//! [`WEBHOOK_BACKOFF_MAX`], at most [`WEBHOOK_ATTEMPTS_MAX`] times, and dropped (logged) after
//! that or on an answer that retrying cannot fix (a redirect, a 4xx other than 408 and 429).
//!
//! Webhook URLs often carry a token (Slack's and most chat services' do): they come from the
//! settings file only, never a flag, and a log line names a URL by scheme, host and port only.
//! `https` receivers are verified against the CA bundle of `alert-webhook-ca` (by default the
//! system's, `/etc/ssl/certs/ca-certificates.crt`).
//!
//! [`Verdict`] and [`backoff`] are the pure decisions; the rest is the I/O around them.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::Full;
use hyper::Uri;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::health::alerts::{Alert, AlertChange};
use crate::wall_clock::WallTime;

/// Notices queued per URL; past it the oldest is dropped. A receiver down for an hour in a mesh
/// with a flapping node sees about one notice a minute: 256 holds hours of them, at about 1 KiB
/// each.
pub const WEBHOOK_QUEUE_MAX: usize = 256;
/// Tries per notice: with the backoff, about four minutes of a receiver's downtime (four more
/// if every try waits out its timeout).
pub const WEBHOOK_ATTEMPTS_MAX: u32 = 10;
/// The longest wait between two tries.
pub const WEBHOOK_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The first wait; each next one doubles.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// One try: connect, TLS, request and the answer's head.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Webhook URLs in a settings file: more is a mistake, and each costs a task and a queue.
pub const WEBHOOKS_MAX: usize = 16;
/// The system's CA bundle on Debian and its derivatives.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What a receiver's answer means for the notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Taken (2xx).
    Delivered,
    /// Try again later: a server error, 408, 429, or no answer.
    Retry,
    /// Trying again cannot help (the URL is wrong, the token was revoked): drop it.
    GiveUp,
}

impl Verdict {
    /// The verdict on an HTTP status, or on no answer (`None`).
    pub fn of(status: Option<u16>) -> Verdict {
        match status {
            Some(200..=299) => Verdict::Delivered,
            Some(408 | 429) | None => Verdict::Retry,
            // A redirect will not heal by itself: the URL must change.
            Some(300..=499) => Verdict::GiveUp,
            Some(_) => Verdict::Retry,
        }
    }
}

/// The wait before try `attempt` + 1 (after `attempt` failed tries), or `None` when no try is
/// left.
pub fn backoff(attempt: u32) -> Option<Duration> {
    if attempt >= WEBHOOK_ATTEMPTS_MAX {
        return None;
    }
    let doubled = BACKOFF_FIRST.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    Some(doubled.min(WEBHOOK_BACKOFF_MAX))
}

/// One receiver, parsed from the settings file.
#[derive(Clone)]
pub struct WebhookUrl {
    uri: Uri,
    https: bool,
    host: String,
    port: u16,
}

impl std::fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebhookUrl({})", self.redacted())
    }
}

impl WebhookUrl {
    /// Parses an `http://` or `https://` URL. The error never repeats the URL (it may hold a
    /// token).
    pub fn parse(text: &str) -> anyhow::Result<WebhookUrl> {
        let uri: Uri = text.parse().map_err(|_| anyhow::anyhow!("an alert webhook is not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("an alert webhook URL must start with http:// or https://"),
        };
        let Some(host) = uri.host().filter(|host| !host.is_empty()) else {
            bail!("an alert webhook URL has no host");
        };
        if uri.authority().is_some_and(|authority| authority.as_str().contains('@')) {
            bail!("an alert webhook URL must not carry a user or password (put a token in its path or query)");
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(WebhookUrl { host: host.trim_matches(['[', ']']).to_owned(), https, port, uri })
    }

    /// True for an `https://` receiver.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// The URL as logs show it: scheme, host and port, never the path or the query.
    pub fn redacted(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}:{}/...", self.host, self.port)
    }
}

/// Reads the CA bundle that `https` receivers are verified against.
pub fn read_ca_bundle(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read the alert webhook CA bundle {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the alert webhook CA bundle {} is not PEM certificates", path.display()))?;
    if certs.is_empty() {
        bail!("the alert webhook CA bundle {} holds no certificate", path.display());
    }
    Ok(certs)
}

/// The JSON a receiver gets.
#[derive(Debug, Serialize)]
struct Notice<'a> {
    /// The node that saw it.
    node: &'a str,
    /// `raised` or `cleared`.
    event: &'static str,
    alert: &'a Alert,
}

/// One URL's queue and counters.
#[derive(Debug, Default)]
struct Queue {
    notices: Mutex<VecDeque<Bytes>>,
    ready: Notify,
    dropped: AtomicU64,
}

/// The daemon's handle on its webhooks.
#[derive(Debug, Clone)]
pub struct Webhooks {
    node_id: String,
    queues: Vec<Arc<Queue>>,
    stats: Arc<WebhookStats>,
}

/// Delivered and dropped notices (`konord_webhook_notices_total`).
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Notices a receiver took.
    pub delivered: AtomicU64,
    /// Notices given up on (out of tries, a 4xx, or pushed out of a full queue).
    pub dropped: AtomicU64,
}

impl Webhooks {
    /// Starts one sender task per URL on the current runtime. `roots` verify `https` receivers.
    pub fn start(
        node_id: &str,
        urls: Vec<WebhookUrl>,
        roots: Vec<CertificateDer<'static>>,
        stats: Arc<WebhookStats>,
    ) -> anyhow::Result<Webhooks> {
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store.add(root).context("a certificate of the alert webhook CA bundle is not usable")?;
        }
        let config = rustls::ClientConfig::builder_with_details(crate::pki::crypto_provider(), Arc::new(WallTime))
            .with_safe_default_protocol_versions()
            .context("cannot set up TLS for alert webhooks")?
            .with_root_certificates(store)
            .with_no_client_auth();
        let tls = TlsConnector::from(Arc::new(config));
        let queues = urls
            .into_iter()
            .map(|url| {
                let queue = Arc::new(Queue::default());
                tokio::spawn(send_loop(url, queue.clone(), tls.clone(), stats.clone()));
                queue
            })
            .collect();
        Ok(Webhooks { node_id: node_id.to_owned(), queues, stats })
    }

    /// Queues one change for every URL; never waits.
    pub fn notify(&self, change: &AlertChange) {
        let (event, alert) = match change {
            AlertChange::Raised(alert) => ("raised", alert),
            AlertChange::Cleared(alert) => ("cleared", alert),
        };
        let Ok(body) = serde_json::to_vec(&Notice { node: &self.node_id, event, alert }) else { return };
        let body = Bytes::from(body);
        for queue in &self.queues {
            let mut notices = queue.notices.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if notices.len() >= WEBHOOK_QUEUE_MAX {
                notices.pop_front();
                queue.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            notices.push_back(body.clone());
            drop(notices);
            queue.ready.notify_one();
        }
    }
}

async fn send_loop(url: WebhookUrl, queue: Arc<Queue>, tls: TlsConnector, stats: Arc<WebhookStats>) {
    let mut reported_drops = 0;
    loop {
        let next = queue.notices.lock().unwrap_or_else(std::sync::PoisonError::into_inner).front().cloned();
        let Some(body) = next else {
            queue.ready.notified().await;
            continue;
        };
        let dropped = queue.dropped.load(Ordering::Relaxed);
        if dropped > reported_drops {
            warn!(webhook = %url.redacted(), dropped = dropped - reported_drops, "alert webhook queue full: oldest notices dropped");
            reported_drops = dropped;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let status = match tokio::time::timeout(WEBHOOK_TIMEOUT, post(&url, &tls, body.clone())).await {
                Ok(Ok(status)) => Some(status),
                Ok(Err(error)) => {
                    info!(webhook = %url.redacted(), attempt, "alert webhook not reached: {error:#}");
                    None
                }
                Err(_) => {
                    info!(webhook = %url.redacted(), attempt, "alert webhook did not answer in {WEBHOOK_TIMEOUT:?}");
                    None
                }
            };
            match Verdict::of(status) {
                Verdict::Delivered => {
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Verdict::GiveUp => {
                    warn!(webhook = %url.redacted(), status, "alert webhook refused a notice; dropped (check the URL and its token; redirects are not followed)");
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Verdict::Retry => match backoff(attempt) {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => {
                        warn!(webhook = %url.redacted(), attempt, "alert webhook unreachable; notice dropped after {attempt} tries");
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                },
            }
        }
        // Sent or given up: it leaves the queue (unless a full queue pushed it out meanwhile).
        let mut notices = queue.notices.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if notices.front().is_some_and(|front| front.as_ptr() == body.as_ptr()) {
            notices.pop_front();
        }
    }
}

/// One POST; answers the status.
async fn post(url: &WebhookUrl, tls: &TlsConnector, body: Bytes) -> anyhow::Result<u16> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await.context("connect")?;
    if url.https {
        let name = ServerName::try_from(url.host.clone()).context("the webhook's host is not a valid TLS name")?;
        let stream = tls.connect(name, tcp).await.context("TLS handshake")?;
        exchange(url, stream, body).await
    } else {
        exchange(url, tcp, body).await
    }
}

async fn exchange<S>(url: &WebhookUrl, stream: S, body: Bytes) -> anyhow::Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends with the exchange; its error, if any, is the request's.
        let _ = connection.await;
    });
    let path = url.uri.path_and_query().map_or("/", |path| path.as_str());
    let authority = url.uri.authority().map_or(url.host.as_str(), |authority| authority.as_str());
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, concat!("konord/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))?;
    let answer = sender.send_request(request).await?;
    // The body is not read: the status says it all, and an endless body costs nothing.
    Ok(answer.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_a_retry_can_fix_are_retried_and_others_are_not() {
        assert_eq!(Verdict::of(Some(200)), Verdict::Delivered);
        assert_eq!(Verdict::of(Some(204)), Verdict::Delivered);
        for retry in [None, Some(500), Some(502), Some(503), Some(408), Some(429)] {
            assert_eq!(Verdict::of(retry), Verdict::Retry, "{retry:?}");
        }
        for give_up in [Some(301), Some(308), Some(400), Some(401), Some(403), Some(404), Some(410)] {
            assert_eq!(Verdict::of(give_up), Verdict::GiveUp, "{give_up:?}");
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute_and_ends() {
        let waits: Vec<u64> = (1..WEBHOOK_ATTEMPTS_MAX).map(|attempt| backoff(attempt).unwrap().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(WEBHOOK_ATTEMPTS_MAX), None);
    }

    #[test]
    fn urls_are_checked_and_logged_without_their_path() {
        let url = WebhookUrl::parse("https://hooks.example.com/services/T0/B0/SECRET?x=1").unwrap();
        assert_eq!(url.redacted(), "https://hooks.example.com:443/...");
        assert!(!format!("{url:?}").contains("SECRET"));
        assert_eq!(WebhookUrl::parse("http://127.0.0.1:9000/hook").unwrap().port, 9000);
        for bad in ["ftp://host/x", "hooks.example.com/x", "https://user:pw@host/x", "not a url"] {
            let error = WebhookUrl::parse(bad).unwrap_err().to_string();
            assert!(!error.contains("pw") && !error.contains("host/x"), "{error}");
        }
    }
}
