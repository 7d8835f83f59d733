//! The node's files: group files, keys, members files, sync states, identity, quarantine.
pub mod replace_file;
pub mod store;
