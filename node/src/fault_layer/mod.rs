//! A fault layer for tests of real processes (issue 13, the chaos suite): this kernel has no
//! netem, so delay, reordering and duplication of peer traffic, and a slow disk, come from
//! konord itself. It is off unless the environment names a control file
//! ([`FAULT_CONTROL_ENV`]); konord then warns at start that it runs with a fault layer, and
//! every change of the file's settings is logged.
//!
//! - [`control`]: the file's settings and the pure decision per datagram.
//! - [`socket`]: the UDP socket under the QUIC endpoint that applies them to outgoing
//!   datagrams (QUIC sees a real network's delay, reordering and duplicates).
//! - [`disk`]: the store hook that slows writes and fsyncs, and keeps a ledger of what is
//!   durable, from which a test cuts the power (drops every unsynced byte).
//!
//! - a clock jump (`clock_offset`): the layer shifts konord's wall clock
//!   ([`crate::wall_clock`]), which stamps versions and judges certificates.
//!
//! Each accepted file is acknowledged: its text is copied to the same path with `.applied`
//! appended ([`applied_path`]), so a test knows when a fault is in force (or healed) instead of
//! guessing a delay.
//!
//! Loss and partitions stay nftables' job: they act in the kernel, where a node cannot lie
//! about them.

pub mod control;
pub mod disk;
pub mod socket;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use self::control::{CONTROL_BYTES_MAX, FaultSettings};

/// The environment variable that turns the layer on: the path of its control file. A test
/// setting, never for production: whoever can write the file can slow the node down.
pub const FAULT_CONTROL_ENV: &str = "KONOR_FAULT_CONTROL";

/// How often the control file is looked at: well under a fault's shortest hold in the chaos
/// suite (2 s), so a fault starts and ends within a tenth of a second of the runner's record.
pub const CONTROL_POLL: Duration = Duration::from_millis(100);

/// Where the layer acknowledges the control file at `control`: the accepted text, once it is in
/// force.
pub fn applied_path(control: &Path) -> PathBuf {
    let mut name = control.as_os_str().to_owned();
    name.push(".applied");
    PathBuf::from(name)
}

/// The settings in force, shared by the socket and the disk hook, and kept up to date with
/// the control file.
#[derive(Debug)]
pub struct FaultLayer {
    path: PathBuf,
    settings: RwLock<FaultSettings>,
    delayed: AtomicU64,
    duplicated: AtomicU64,
    lost: AtomicU64,
}

impl FaultLayer {
    /// A layer with no faults yet, reading `path` now and then every [`CONTROL_POLL`] on the
    /// current runtime. A missing file is no faults; a bad one is logged and leaves the
    /// settings as they were.
    pub fn start(path: &Path) -> Arc<FaultLayer> {
        let layer = FaultLayer::new(path.to_owned(), FaultSettings::default());
        let mut seen = layer.reload(None);
        let watched = Arc::downgrade(&layer);
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(CONTROL_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                poll.tick().await;
                let Some(layer) = watched.upgrade() else { return };
                seen = layer.reload(seen);
            }
        });
        layer
    }

    /// A layer with fixed settings and no file (tests).
    pub fn fixed(settings: FaultSettings) -> Arc<FaultLayer> {
        FaultLayer::new(PathBuf::new(), settings)
    }

    fn new(path: PathBuf, settings: FaultSettings) -> Arc<FaultLayer> {
        Arc::new(FaultLayer {
            path,
            settings: RwLock::new(settings),
            delayed: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        })
    }

    /// Datagrams sent later than asked, and datagrams sent twice, since the start.
    pub fn counts(&self) -> (u64, u64) {
        (self.delayed.load(Ordering::Relaxed), self.duplicated.load(Ordering::Relaxed))
    }

    /// Delayed datagrams the socket could not take when their time came (a full send buffer):
    /// lost, as a full router queue loses them.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    fn count_lost(&self) {
        if self.lost.fetch_add(1, Ordering::Relaxed).is_power_of_two() {
            warn!(lost = self.lost(), "fault layer: delayed datagrams lost to a full send buffer");
        }
    }

    fn count(&self, plan: &control::SendPlan) {
        if !plan.first.is_zero() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        if plan.second.is_some() {
            self.duplicated.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> FaultSettings {
        *self.settings.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, settings: FaultSettings) {
        *self.settings.write().unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
    }

    /// Reads the file again if its stamp (modified time, length) changed since `seen`; returns
    /// the new stamp.
    fn reload(&self, seen: Option<Stamp>) -> Option<Stamp> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(metadata) => Some(Stamp {
                modified: metadata.modified().ok(),
                bytes: metadata.len(),
                inode: std::os::unix::fs::MetadataExt::ino(&metadata),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                warn!(path = %self.path.display(), %error, "fault layer: cannot read the control file");
                return seen;
            }
        };
        if stamp == seen {
            return seen;
        }
        let parsed = match &stamp {
            None => Ok((String::new(), FaultSettings::default())),
            Some(stamp) if stamp.bytes > CONTROL_BYTES_MAX as u64 => {
                Err(format!("{} bytes, more than {CONTROL_BYTES_MAX}", stamp.bytes))
            }
            Some(_) => std::fs::read_to_string(&self.path).map_err(|error| error.to_string()).and_then(|text| {
                let settings = FaultSettings::parse(&text).map_err(|error| error.to_string())?;
                Ok((text, settings))
            }),
        };
        match parsed {
            Ok((text, settings)) => {
                if settings != self.settings() {
                    info!(path = %self.path.display(), ?settings, "fault layer: new settings");
                }
                if settings.clock_offset_ms != crate::wall_clock::offset_ms() {
                    warn!(offset_ms = settings.clock_offset_ms, "fault layer: the wall clock jumps");
                    crate::wall_clock::set_offset(settings.clock_offset_ms);
                }
                self.set(settings);
                if let Err(error) = std::fs::write(applied_path(&self.path), text) {
                    warn!(path = %self.path.display(), %error, "fault layer: cannot acknowledge the control file");
                }
            }
            Err(error) => {
                warn!(path = %self.path.display(), %error, "fault layer: control file refused; settings unchanged")
            }
        }
        stamp
    }
}

/// What identifies a version of the control file: a file replaced by a rename (as the chaos
/// runner writes it) has a new inode even within one tick of the modified time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    bytes: u64,
    inode: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (a few control polls at most) until the layer acknowledges `text`.
    async fn until_applied(control: &Path, text: &str) {
        for _ in 0..100 {
            if std::fs::read_to_string(applied_path(control)).is_ok_and(|applied| applied == text) {
                return;
            }
            tokio::time::sleep(CONTROL_POLL / 2).await;
        }
        panic!("the layer never acknowledged {text:?}");
    }

    #[tokio::test]
    async fn the_layer_follows_its_file_and_keeps_its_settings_on_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults");
        let layer = FaultLayer::start(&path);
        assert_eq!(layer.settings(), FaultSettings::default(), "no file is no faults");
        std::fs::write(&path, "delay=40ms duplicate=5%").unwrap();
        until_applied(&path, "delay=40ms duplicate=5%").await;
        assert_eq!(layer.settings().delay, Duration::from_millis(40));
        // A bad file (another length, so the stamp changes even within one mtime tick) is
        // refused, and not acknowledged.
        std::fs::write(&path, "delay=40ms duplicate=5% latency=3ms").unwrap();
        tokio::time::sleep(CONTROL_POLL * 3).await;
        assert_eq!(layer.settings().duplicate_percent, 5, "a refused file leaves the settings");
        assert_eq!(std::fs::read_to_string(applied_path(&path)).unwrap(), "delay=40ms duplicate=5%");
        std::fs::write(&path, "fsync_delay=1s").unwrap();
        until_applied(&path, "fsync_delay=1s").await;
        let settings = layer.settings();
        assert_eq!(settings.fsync_delay, Duration::from_secs(1));
        assert_eq!(settings.delay, Duration::ZERO, "a new file replaces the settings whole");
        std::fs::remove_file(&path).unwrap();
        until_applied(&path, "").await;
        assert_eq!(layer.settings(), FaultSettings::default(), "no file is no faults again");
    }
}
