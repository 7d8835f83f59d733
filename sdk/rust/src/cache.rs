//! [`CachedGroup`] ([`Client::cached`]): a group's settings held in memory and kept current by
//! a background watch, so hot reads never cross the socket (F18).

use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::warn;

use crate::client::Client;
use crate::error::SdkError;
use crate::protocol::{WatchEvent, content_hash};
use crate::settings::{Settings, typed_settings};

impl Client {
    /// A local read cache of `group`: a snapshot kept current by a watch in a background task.
    /// Reads from it never touch the socket. While the daemon is unreachable the cache serves
    /// the last state it saw, and catches up when the watch reconnects.
    pub async fn cached(&self, group: &str) -> Result<CachedGroup, SdkError> {
        let snapshot = self.snapshot(group).await?;
        let mut watch = self.watch(group, Some(snapshot.freshness.revision)).await?;
        let hash = content_hash(&snapshot.settings);
        if hash != snapshot.content_hash {
            warn!(group, daemon = %snapshot.content_hash, local = %hash, "content hash differs from konord's");
        }
        let revision = snapshot.freshness.revision;
        let state = Arc::new(RwLock::new(CacheState {
            settings: snapshot.settings,
            revision,
            version: snapshot.freshness.version,
            hash: OnceLock::from(hash),
        }));
        let (revisions, revision_receiver) = watch::channel(revision);
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            while let Some(next) = watch.next().await {
                match next {
                    Ok(event) => {
                        let revision = event.revision();
                        write_cache(&task_state).apply(&event);
                        revisions.send_replace(revision);
                    }
                    Err(error) => {
                        warn!(group = watch.group(), %error, "the read cache stopped following its group");
                        break;
                    }
                }
            }
        });
        let inner =
            CacheInner { group: group.to_owned(), state, revisions: revision_receiver, task: task.abort_handle() };
        Ok(CachedGroup { inner: Arc::new(inner) })
    }
}

struct CacheState {
    settings: Settings,
    revision: u64,
    version: String,
    /// The content hash of `settings`; empty after a change until asked for.
    hash: OnceLock<String>,
}

impl CacheState {
    fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Resync { settings, revision, version, .. } => {
                self.settings.clone_from(settings);
                self.revision = *revision;
                self.version.clone_from(version);
            }
            WatchEvent::Change { set, removed, revision, version, .. } => {
                for (key, value) in set {
                    self.settings.insert(key.clone(), value.clone());
                }
                for key in removed {
                    self.settings.remove(key);
                }
                self.revision = *revision;
                self.version.clone_from(version);
            }
        }
        self.hash = OnceLock::new();
    }
}

fn read_cache(state: &RwLock<CacheState>) -> std::sync::RwLockReadGuard<'_, CacheState> {
    // The writer applies an event without panicking paths, so a poisoned lock holds sound data.
    state.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_cache(state: &RwLock<CacheState>) -> std::sync::RwLockWriteGuard<'_, CacheState> {
    state.write().unwrap_or_else(PoisonError::into_inner)
}

/// A group's settings held in memory and kept current by a background watch
/// ([`Client::cached`]). Reads take a read lock and clone one value: no socket, no await.
/// Cheap to clone; the background task stops when the last clone is dropped.
#[derive(Clone)]
pub struct CachedGroup {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    group: String,
    state: Arc<RwLock<CacheState>>,
    revisions: watch::Receiver<u64>,
    task: AbortHandle,
}

impl Drop for CacheInner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for CachedGroup {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = read_cache(&self.inner.state);
        formatter
            .debug_struct("CachedGroup")
            .field("group", &self.inner.group)
            .field("revision", &state.revision)
            .field("keys", &state.settings.len())
            .finish()
    }
}

impl CachedGroup {
    /// The group.
    pub fn group(&self) -> &str {
        &self.inner.group
    }

    /// One setting, from memory.
    pub fn get(&self, key: &str) -> Option<Value> {
        read_cache(&self.inner.state).settings.get(key).cloned()
    }

    /// One setting deserialized into `T`; `Ok(None)` when the key is not set.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, SdkError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        serde_json::from_value(value).map(Some).map_err(|error| SdkError::Decode {
            what: format!("`{}/{key}` as {}", self.inner.group, std::any::type_name::<T>()),
            detail: error.to_string(),
        })
    }

    /// A copy of all settings.
    pub fn settings(&self) -> Settings {
        read_cache(&self.inner.state).settings.clone()
    }

    /// All settings deserialized into `T`, dotted keys nested (see [`Snapshot::typed`](crate::Snapshot::typed)).
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, SdkError> {
        typed_settings(&self.inner.group, &read_cache(&self.inner.state).settings)
    }

    /// The daemon's revision of the group that the cache reflects.
    pub fn revision(&self) -> u64 {
        read_cache(&self.inner.state).revision
    }

    /// The latest version label the cache reflects.
    pub fn version(&self) -> String {
        read_cache(&self.inner.state).version.clone()
    }

    /// The content hash of the cached settings (full hex), computed from them once after each
    /// change (see [`content_hash`]).
    pub fn content_hash(&self) -> String {
        let state = read_cache(&self.inner.state);
        state.hash.get_or_init(|| content_hash(&state.settings)).clone()
    }

    /// Waits until the cache reflects `revision` or later. Fails when the cache stopped
    /// following the group (its watch ended with an error); wrap it in a timeout to bound it.
    pub async fn wait_for_revision(&self, revision: u64) -> Result<(), SdkError> {
        let mut revisions = self.inner.revisions.clone();
        match revisions.wait_for(|current| *current >= revision).await {
            Ok(_) => Ok(()),
            Err(_) => Err(SdkError::Closed(format!(
                "the read cache of group `{}` stopped following it (see the log)",
                self.inner.group
            ))),
        }
    }
}
