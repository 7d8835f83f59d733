//! Time as the core sees it: milliseconds handed in by the caller, never read from a clock.

use std::fmt;

/// Milliseconds since the Unix epoch (for wall-clock stamps) or a duration in milliseconds.
///
/// The core never reads a clock; the shell passes `Millis` into every operation that needs a
/// time, which keeps the core deterministic under the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    /// Whole seconds, as Automerge's advisory change timestamp expects.
    pub fn as_secs(self) -> i64 {
        i64::try_from(self.0 / 1000).unwrap_or(i64::MAX)
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_sub(self, earlier: Millis) -> Millis {
        Millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}
