//! konor-sdk: read live configuration from the local `konord` over its Unix socket, and react
//! to changes. The wire protocol lives in [`protocol`]; docs/protocol.md documents it for other
//! languages. [`Client`] is the way in: `get`, `snapshot`, `watch`, `on_change` and the local
//! read cache `cached`; [`ConnectOptions`] says how it connects and whose daemon it trusts.

pub mod cache;
pub mod client;
pub mod connect;
pub mod connection;
pub mod error;
pub mod health;
pub mod on_change;
pub mod protocol;
pub mod secret;
pub mod settings;
pub mod watch;

pub use cache::CachedGroup;
pub use client::Client;
pub use connect::{ConnectOptions, DAEMON_UID_ENV, DaemonUid, TIMEOUT_DEFAULT};
pub use error::SdkError;
pub use on_change::ChangeHandle;
pub use protocol::{ApplyResult, ErrorCode, Freshness, WatchEvent};
pub use secret::Secret;
pub use settings::{Settings, Snapshot, apply_event, nest_settings};
pub use watch::Watch;
