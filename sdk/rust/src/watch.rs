//! [`Watch`]: a live subscription to one group's changes on a connection of its own, which
//! resumes from its last revision after any disconnect, so a caller sees every change exactly
//! once, in order, or a resync.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use crate::client::Client;
use crate::connect::DaemonUid;
use crate::connection::Connection;
use crate::error::{SdkError, unexpected};
use crate::protocol::{ErrorCode, Request, Response, WatchEvent};

/// First pause before a watch reconnects: long enough not to spin while konord restarts.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// Longest pause between reconnect attempts: a restarted daemon is picked up within 2 s.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Client {
    /// Subscribes to a group's changes after `from_revision` (`None`: from now on). The watch
    /// has a connection of its own and survives daemon restarts (see [`Watch`]).
    pub async fn watch(&self, group: &str, from_revision: Option<u64>) -> Result<Watch, SdkError> {
        self.watch_keys(group, None, from_revision).await
    }

    /// Subscribes to changes of the keys that start with `prefix` (`db.`): events carry only
    /// those keys, a change that touches none of them is not delivered, and a resync holds only
    /// those keys. Otherwise as [`Client::watch`].
    pub async fn watch_prefix(&self, group: &str, prefix: &str, from_revision: Option<u64>) -> Result<Watch, SdkError> {
        self.watch_keys(group, Some(prefix), from_revision).await
    }

    async fn watch_keys(
        &self,
        group: &str,
        prefix: Option<&str>,
        from_revision: Option<u64>,
    ) -> Result<Watch, SdkError> {
        let (path, daemon_uid) = (self.path(), self.daemon_uid());
        let (link, revision) = WatchLink::open(path, self.timeout(), daemon_uid, group, prefix, from_revision).await?;
        Ok(Watch {
            path: path.to_owned(),
            timeout: self.timeout(),
            daemon_uid,
            group: group.to_owned(),
            prefix: prefix.map(str::to_owned),
            last_revision: from_revision.unwrap_or(revision),
            link: Some(link),
            backoff: RECONNECT_BACKOFF_MIN,
            finished: false,
        })
    }
}

/// A live subscription to one group's changes.
///
/// [`Watch::next`] yields every change exactly once, in revision order. When the connection
/// drops, the watch reconnects with backoff (50 ms doubling to 2 s, forever) and resubscribes
/// from the last revision it delivered, so the caller sees neither a gap nor a duplicate. A
/// [`WatchEvent::Resync`] replaces the whole state (the daemon no longer had the history asked
/// for, or its revisions restarted); it may carry a lower revision than before.
pub struct Watch {
    path: PathBuf,
    timeout: Duration,
    daemon_uid: DaemonUid,
    group: String,
    prefix: Option<String>,
    last_revision: u64,
    link: Option<WatchLink>,
    backoff: Duration,
    finished: bool,
}

impl fmt::Debug for Watch {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Watch")
            .field("group", &self.group)
            .field("last_revision", &self.last_revision)
            .field("connected", &self.link.is_some())
            .field("finished", &self.finished)
            .finish()
    }
}

struct WatchLink {
    _connection: Connection,
    events: mpsc::Receiver<WatchEvent>,
}

impl WatchLink {
    /// Opens a connection and subscribes; returns the daemon's revision at subscription time.
    async fn open(
        path: &Path,
        timeout: Duration,
        daemon_uid: DaemonUid,
        group: &str,
        prefix: Option<&str>,
        from_revision: Option<u64>,
    ) -> Result<(WatchLink, u64), SdkError> {
        let connection = Connection::open(path, timeout, daemon_uid).await?;
        let events = connection.subscribe(group)?;
        let request = Request::Watch { group: group.to_owned(), from_revision, prefix: prefix.map(str::to_owned) };
        match connection.request(&request, timeout).await? {
            Response::Watching { revision, .. } => Ok((WatchLink { _connection: connection, events }, revision)),
            other => Err(unexpected("watching", &other)),
        }
    }
}

impl Watch {
    /// The next event; `None` after the watch ended with an error (the daemon refused to
    /// resubscribe, for instance because the group is gone), which the previous call returned.
    ///
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, SdkError>> {
        loop {
            if self.finished {
                return None;
            }
            let Some(link) = &mut self.link else {
                tokio::time::sleep(self.backoff).await;
                let from_revision = Some(self.last_revision);
                match WatchLink::open(
                    &self.path,
                    self.timeout,
                    self.daemon_uid,
                    &self.group,
                    self.prefix.as_deref(),
                    from_revision,
                )
                .await
                {
                    Ok((link, _)) => {
                        debug!(group = %self.group, from_revision = self.last_revision, "watch resubscribed");
                        self.link = Some(link);
                        self.backoff = RECONNECT_BACKOFF_MIN;
                    }
                    Err(error) if is_final(&error) => {
                        self.finished = true;
                        return Some(Err(error));
                    }
                    Err(error) => {
                        debug!(group = %self.group, %error, "watch reconnect failed; retrying");
                        self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
                    }
                }
                continue;
            };
            let Some(event) = link.events.recv().await else {
                debug!(group = %self.group, last_revision = self.last_revision, "watch connection lost; resuming");
                self.link = None;
                continue;
            };
            if let WatchEvent::Change { revision, .. } = &event
                && *revision <= self.last_revision
            {
                debug!(group = %self.group, revision, "skipping an event already delivered");
                continue;
            }
            self.last_revision = event.revision();
            return Some(Ok(event));
        }
    }

    /// The group watched.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The revision of the last event delivered (or the starting revision).
    pub fn last_revision(&self) -> u64 {
        self.last_revision
    }
}

/// True for errors a reconnect cannot cure: the daemon refused the subscription (unknown group,
/// forbidden, ...), speaks another protocol, or runs as a user this client does not trust. "Too
/// many connections" (`Internal`), `Unavailable` and `Idle` pass, so the watch keeps retrying.
fn is_final(error: &SdkError) -> bool {
    match error {
        SdkError::Daemon { code, .. } => {
            !matches!(code, ErrorCode::Internal | ErrorCode::Unavailable | ErrorCode::Idle)
        }
        SdkError::Protocol(_) | SdkError::UntrustedDaemon { .. } | SdkError::InvalidSetting(_) => true,
        _ => false,
    }
}
