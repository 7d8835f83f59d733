//! The history writer: appends one [`Record`] per line to `history.jsonl` as the run goes, on
//! the run's monotonic clock (ms since the run started), flushed at every line so a killed run
//! keeps everything up to its last complete line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::history::Record;

/// Shared by every task of a run; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

struct RecorderInner {
    started: Instant,
    /// CLOCK_MONOTONIC at `started`, ns: the zero other processes (the Python clients) count from.
    started_monotonic_ns: u128,
    file: Mutex<BufWriter<File>>,
    counts: Mutex<RecordCounts>,
}

/// How many records of each kind were written, for the run's summary.
#[derive(Debug, Clone, Default)]
pub struct RecordCounts {
    /// `Op` records.
    pub ops: u64,
    /// Of them, with outcome `Committed`.
    pub committed: u64,
    /// With outcome `Refused`.
    pub refused: u64,
    /// With outcome `Unknown`.
    pub unknown: u64,
    /// With outcome `Value`.
    pub values: u64,
    /// `Watch` records.
    pub watch_events: u64,
    /// `FaultStart` records.
    pub faults: u64,
    /// `Membership` records.
    pub membership_samples: u64,
    /// `Final` records.
    pub finals: u64,
}

impl Recorder {
    /// Creates (truncates) the history file; the run's clock starts now.
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        let file = File::create(path)?;
        let started = Instant::now();
        let monotonic = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let started_monotonic_ns = u128::try_from(monotonic.tv_sec).unwrap_or(0) * 1_000_000_000
            + u128::try_from(monotonic.tv_nsec).unwrap_or(0);
        Ok(Recorder {
            inner: Arc::new(RecorderInner {
                started,
                started_monotonic_ns,
                file: Mutex::new(BufWriter::new(file)),
                counts: Mutex::new(RecordCounts::default()),
            }),
        })
    }

    /// The run's zero on CLOCK_MONOTONIC (which `Instant` reads on Linux), ns: a process of
    /// its own times its records as `monotonic now - this`.
    pub fn zero_monotonic_ns(&self) -> u128 {
        self.inner.started_monotonic_ns
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Appends one record as a line. A record that cannot be written stops the run: a history
    /// with a hole would be judged wrongly.
    pub fn write(&self, record: &Record) -> std::io::Result<()> {
        self.count(record);
        let mut line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        line.push('\n');
        let mut file = self.inner.file.lock().unwrap_or_else(PoisonError::into_inner);
        file.write_all(line.as_bytes())?;
        file.flush()
    }

    /// The counts so far.
    pub fn counts(&self) -> RecordCounts {
        self.inner.counts.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn count(&self, record: &Record) {
        use crate::history::Outcome;
        let mut counts = self.inner.counts.lock().unwrap_or_else(PoisonError::into_inner);
        match record {
            Record::Op(op) => {
                counts.ops += 1;
                match op.outcome {
                    Outcome::Committed { .. } => counts.committed += 1,
                    Outcome::Refused { .. } => counts.refused += 1,
                    Outcome::Unknown { .. } => counts.unknown += 1,
                    Outcome::Value { .. } => counts.values += 1,
                }
            }
            Record::Watch(_) => counts.watch_events += 1,
            Record::FaultStart(_) => counts.faults += 1,
            Record::Membership(_) => counts.membership_samples += 1,
            Record::Final(_) => counts.finals += 1,
            Record::Run(_) | Record::FaultEnd(_) | Record::NodeExit(_) => {}
        }
    }
}
