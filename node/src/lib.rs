//! konor-node: the I/O shell around konor-crdt (the daemon `konord` and the CLI `konorctl`).
pub mod ctl;
pub mod daemon;
pub mod local_api;
pub mod peer;
pub mod read_view;
pub mod settings;
pub mod store;
