//! konor-crdt: the pure core of Konorkestra.
//!
//! Configuration groups as Automerge documents ([`GroupDoc`]): validated keys and JSON values,
//! immutable versions with history, diff and rollback, deterministic conflict resolution that
//! is reported, change exchange with peers (export, bounded apply, the Automerge sync protocol,
//! heads digests), and the on-disk record format as pure functions.
//!
//! **Invariant:** nothing here touches the network, a clock, the disk, threads or hidden
//! randomness; time comes in as [`Millis`], actor ids come from the caller, and every
//! collection iterates in a deterministic order. `clippy.toml` in this crate enforces it.

pub mod change_bounds;
pub mod config_file;
pub mod configuration;
pub mod diff;
pub mod error;
pub mod exchange;
pub mod file_format;
pub mod group;
pub mod join;
pub mod journal;
pub mod json_strict;
pub mod key;
pub mod keyring;
pub mod limits;
pub mod overlay;
pub mod peer_message;
mod recent;
pub mod record;
mod register;
pub mod release;
pub mod replica;
pub mod schema;
pub mod settings;
mod shield;
pub mod time;
pub mod value;
pub mod version;

pub use automerge::{ActorId, ChangeHash};
pub use configuration::{Canary, Guards, ReleasePolicy, ReleaseStrategy};
pub use diff::SettingsDiff;
pub use error::{
    EditError, FileError, KeyError, LoadError, RemoteError, SchemaError, ValueError, VersionError, Violation,
};
pub use exchange::{ApplyFailure, HeadsDigest, RemoteApplied, SyncPeer};
pub use file_format::FileFormat;
pub use group::{CommitMeta, Conflict, ConflictValue, GroupDoc, LocalCommit, Mode};
pub use join::GroupKey;
pub use journal::{LoadedGroup, load_group_file};
pub use key::Key;
pub use keyring::{KeyId, Keyring};
pub use peer_message::PeerMessage;
pub use replica::{
    Command, CommandError, CommandOutcome, Input, MembershipView, Output, PeerState, PersistOp, Replica,
};
pub use schema::Schema;
pub use settings::{ContentHash, Settings};
pub use time::Millis;
pub use version::{VersionId, VersionInfo, VersionKind, VersionRef};
