//! konor-sdk: read live configuration from the local `konord` over its Unix socket, and react
//! to changes. The wire protocol lives in [`protocol`]; docs/protocol.md documents it for other
//! languages. [`Client`] is the way in: `get`, `snapshot`, `watch`, `on_change` and the local
//! read cache `cached`; [`ConnectOptions`] says how it connects and whose daemon it trusts.

pub mod client;
pub mod connect;
pub mod error;
pub mod protocol;
pub mod secret;

pub use client::{CachedGroup, ChangeHandle, Client, Settings, Snapshot, Watch, apply_event, nest_settings};
pub use connect::{ConnectOptions, DAEMON_UID_ENV, DaemonUid, TIMEOUT_DEFAULT};
pub use error::SdkError;
pub use protocol::{ApplyResult, ErrorCode, Freshness, WatchEvent};
pub use secret::Secret;
