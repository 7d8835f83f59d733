//! The node's files: group files, keys, members files, sync states, identity, quarantine.
pub mod store;
