//! The wall clock: the one place konord reads the time of day. Protocol timers (leases,
//! failure detection, timeouts, retries) use the monotonic clock and never come here; the wall
//! clock only stamps things and judges certificates:
//!
//! - version and apply-report stamps (`Daemon::wall_clock`), quarantine file names;
//! - certificate validity, at every TLS handshake (rustls asks [`WallTime`]), when a gossip
//!   value's certificate is accepted, and when the node's own credentials are loaded.
//!
//! A process has one wall clock. The fault layer (chaos tests, [`crate::fault_layer`]) may
//! shift it to play a clock jump (`set_offset`); nothing else does, so in production it is
//! the system clock. Reading the shifted clock everywhere above is what makes the jump real
//! for konord's own code; the kernel's clock (file times, log timestamps) does not move.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::time_provider::TimeProvider;
use rustls_pki_types::UnixTime;

/// Milliseconds added to the system clock (negative: the clock is behind).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// The time of day as konord sees it: the system clock plus the offset (zero unless a fault
/// layer jumped it).
pub fn now() -> SystemTime {
    let offset = OFFSET_MS.load(Ordering::Relaxed);
    let magnitude = Duration::from_millis(offset.unsigned_abs());
    let system = SystemTime::now();
    let shifted = if offset >= 0 { system.checked_add(magnitude) } else { system.checked_sub(magnitude) };
    shifted.unwrap_or(system)
}

/// [`now`] as Unix milliseconds (0 before 1970, which only a broken clock reads).
pub fn unix_millis() -> u64 {
    now().duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// [`now`] for certificate checks.
pub fn unix_time() -> UnixTime {
    UnixTime::since_unix_epoch(now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO))
}

/// The offset in force, ms.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Jumps the clock: from now on it reads the system clock plus `offset_ms`. Only the fault
/// layer calls this.
pub(crate) fn set_offset(offset_ms: i64) {
    OFFSET_MS.store(offset_ms, Ordering::Relaxed);
}

/// The wall clock for rustls: certificate validity at each handshake is judged by [`now`].
#[derive(Debug, Default, Clone, Copy)]
pub struct WallTime;

impl TimeProvider for WallTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(unix_time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test that moves the process's clock; it stays within the CA's skew allowance
    /// (an hour) so a handshake in a test running beside it is not refused.
    #[test]
    fn every_reading_follows_the_offset_and_comes_back() {
        let system = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        set_offset(-30 * 60 * 1000);
        let behind = unix_millis();
        let tls = WallTime.current_time().unwrap().as_secs();
        set_offset(0);
        let back = unix_millis();
        assert!(behind + 29 * 60 * 1000 < system && behind + 31 * 60 * 1000 > system, "{behind} vs {system}");
        assert!(tls * 1000 + 29 * 60 * 1000 < system, "rustls sees the jump too: {tls}");
        assert!(back >= system, "the clock comes back: {back} vs {system}");
        assert_eq!(offset_ms(), 0);
    }
}
