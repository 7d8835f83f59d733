//! konor-chaos: real `konord` processes, each in its own network namespace, under a seeded
//! schedule of faults, with SDK clients whose every operation is recorded ([`history`]); a
//! checker judges the history afterwards ([`check`]; docs/testing.md, "Chaos").

pub mod check;
pub mod history;
pub mod requirement;

pub use check::{Report, check_file};
