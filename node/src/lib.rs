//! konor-node: the I/O shell around konor-crdt (the daemon `konord` and the CLI `konorctl`).
pub mod api;
pub mod ctl;
pub mod daemon;
pub mod limits;
pub mod peer;
pub mod settings;
pub mod storage;
