//! Byte budgets of the local socket. Each direction has one: frames read and not yet answered,
//! and frames queued for writing (answers and watch events) and not yet written. A connection
//! draws from its own budget and from the pool all connections share, before it holds the bytes;
//! the [`Charge`] gives them back when it is dropped (the answer went out, the frame was written).
//!
//! A watch event goes to every watcher of its group as one shared frame: it counts once against
//! the pool (that is the memory it takes) and once against each connection's budget (that is
//! how far behind that client is).
//!
//! Waiting for room ([`Budget::charge`]) is the backpressure: a reader stops reading, an answer
//! waits for the client to read. The daemon never waits: it pushes watch events with
//! [`WatchSender::try_send`], which fails when the watch's queue or a budget is full, and the
//! daemon then drops the watch (the client resumes from its last revision).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use konor_sdk::protocol::{ServerFrame, WatchEvent, decode_payload, encode_frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::error;

use super::LocalApiStats;
use crate::limits::{CONNECTION_WRITE_BYTES_MAX, WATCH_QUEUE_EVENTS};

/// One direction's budget over all connections, with the most it has held.
#[derive(Debug)]
pub struct BytePool {
    permits: Arc<Semaphore>,
    max: usize,
    peak: AtomicU64,
}

impl BytePool {
    /// A pool of `max` bytes.
    pub fn new(max: usize) -> BytePool {
        BytePool { permits: Arc::new(Semaphore::new(max)), max, peak: AtomicU64::new(0) }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.max.saturating_sub(self.permits.available_permits()) as u64
    }

    /// The most bytes held at once since the pool was made.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// The pool's size.
    pub fn max(&self) -> u64 {
        self.max as u64
    }

    fn note_peak(&self) {
        self.peak.fetch_max(self.held(), Ordering::Relaxed);
    }
}

/// One direction's budget of one connection, drawn from its pool.
#[derive(Debug, Clone)]
pub(super) struct Budget {
    connection: Arc<Semaphore>,
    connection_max: usize,
    pool: Arc<BytePool>,
}

/// Bytes held against a budget; given back when dropped. A watch event shared by many
/// connections holds the pool once, in its [`SharedFrame`], and each connection's budget apart.
#[derive(Debug)]
pub(super) struct Charge {
    _connection: OwnedSemaphorePermit,
    _pool: Option<OwnedSemaphorePermit>,
}

impl Budget {
    pub(super) fn new(connection_max: usize, pool: Arc<BytePool>) -> Budget {
        Budget { connection: Arc::new(Semaphore::new(connection_max)), connection_max, pool }
    }

    /// A charge can never exceed what its budgets hold, or it would wait for ever. Frames are
    /// at most `FRAME_BYTES_MAX`, which both budgets hold (limits.rs), so this only matters for
    /// a pool made smaller than that in tests.
    fn permits(&self, bytes: usize) -> u32 {
        let most = self.connection_max.min(self.pool.max);
        u32::try_from(bytes.min(most)).unwrap_or(u32::MAX)
    }

    /// Waits until the connection and the pool have room for `bytes`, then holds them. Tokio's
    /// semaphore is fair: a large frame is not starved by small ones behind it. `None` only if
    /// a semaphore was closed, which nothing does; callers close the connection then.
    pub(super) async fn charge(&self, bytes: usize) -> Option<Charge> {
        let permits = self.permits(bytes);
        let connection = self.connection.clone().acquire_many_owned(permits).await.ok()?;
        let pool = self.pool.permits.clone().acquire_many_owned(permits).await.ok()?;
        self.pool.note_peak();
        Some(Charge { _connection: connection, _pool: Some(pool) })
    }

    /// Holds a shared frame's bytes if there is room now, without waiting: the connection's
    /// budget for this connection, and the pool once for the frame (the first connection to
    /// take it charges it).
    fn try_charge_shared(&self, frame: &SharedFrame) -> Option<Charge> {
        let permits = self.permits(frame.bytes.len());
        let connection = self.connection.clone().try_acquire_many_owned(permits).ok()?;
        let pool = frame.pool.get_or_init(|| {
            let held = self.pool.permits.clone().try_acquire_many_owned(permits).ok();
            self.pool.note_peak();
            held
        });
        pool.as_ref()?;
        Some(Charge { _connection: connection, _pool: None })
    }
}

/// A frame's bytes: one connection's own, or a watch event's shared by every watcher.
#[derive(Debug)]
pub(super) enum FrameBytes {
    Own(Vec<u8>),
    Shared(Arc<SharedFrame>),
}

impl FrameBytes {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            FrameBytes::Own(bytes) => bytes,
            FrameBytes::Shared(frame) => &frame.bytes,
        }
    }
}

/// A frame on its way to a connection's writer, with the bytes it holds against the budgets.
#[derive(Debug)]
pub(super) struct OutFrame {
    /// The whole frame, length prefix included.
    pub(super) bytes: FrameBytes,
    pub(super) _charge: Charge,
}

/// A watch event encoded once, with its one charge against the socket's pool (taken by the
/// first watcher that queues it, given back when the last one has written it).
#[derive(Debug)]
pub struct SharedFrame {
    bytes: Vec<u8>,
    pool: OnceLock<Option<OwnedSemaphorePermit>>,
}

/// A watch event encoded once as a frame, shared by every watcher it goes to: the daemon
/// encodes a change once however many clients watch the group, and it counts once against the
/// socket's write budget.
#[derive(Debug, Clone)]
pub struct EncodedEvent(Result<Arc<SharedFrame>, Arc<str>>);

impl From<WatchEvent> for EncodedEvent {
    fn from(event: WatchEvent) -> EncodedEvent {
        let encoded = encode_frame(&ServerFrame::Event { event });
        EncodedEvent(
            encoded
                .map(|bytes| Arc::new(SharedFrame { bytes, pool: OnceLock::new() }))
                .map_err(|error| error.to_string().into()),
        )
    }
}

/// The daemon pushed an event the watch could not take; the daemon drops the watch, the
/// connection closes, and the client resumes from its last revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchFull;

/// Where the daemon pushes one watch's events: at most `WATCH_QUEUE_EVENTS` of them, and no more
/// bytes than the connection's and the socket's write budgets hold. Dropping it ends the watch
/// and closes its connection.
#[derive(Debug)]
pub struct WatchSender {
    queue: mpsc::Sender<OutFrame>,
    budget: Budget,
    stats: Arc<LocalApiStats>,
    connection: u64,
    /// Set when an event did not fit: the socket then stops forwarding this watch's queue and
    /// closes the connection without flushing it, so the bytes go back to the budgets at once.
    fell_behind: Arc<AtomicBool>,
}

impl WatchSender {
    pub(super) fn new(
        queue: mpsc::Sender<OutFrame>,
        budget: Budget,
        stats: Arc<LocalApiStats>,
        connection: u64,
    ) -> WatchSender {
        WatchSender { queue, budget, stats, connection, fell_behind: Arc::default() }
    }

    /// A watch sender tied to no connection, for callers that subscribe with the daemon directly
    /// (the simulator): the same queue and budgets as a connection's, and a receiver that
    /// decodes each frame back into its event.
    pub fn detached(connection: u64) -> (WatchSender, WatchReceiver) {
        WatchSender::within(connection, Arc::new(LocalApiStats::default()))
    }

    /// [`WatchSender::detached`] within the byte pool and counters of `stats` (the HTTP door's
    /// watch streams share the socket's write pool, so all watches together stay within
    /// `SOCKET_WRITE_BYTES_MAX`, and a stream that falls behind is counted with the others).
    pub fn within(connection: u64, stats: Arc<LocalApiStats>) -> (WatchSender, WatchReceiver) {
        let budget = Budget::new(CONNECTION_WRITE_BYTES_MAX, stats.write.clone());
        let (queue, events) = mpsc::channel(WATCH_QUEUE_EVENTS);
        (WatchSender::new(queue, budget, stats, connection), WatchReceiver(events))
    }

    /// Whether the watch fell behind, as the socket side sees it.
    pub(super) fn fell_behind(&self) -> Arc<AtomicBool> {
        self.fell_behind.clone()
    }

    /// Queues one event without waiting. Fails when the watch is too far behind (its queue or a
    /// byte budget is full), when the event does not fit in a frame, or when the connection is
    /// gone: the caller then drops this sender.
    pub fn try_send(&self, event: impl Into<EncodedEvent>) -> Result<(), WatchFull> {
        let frame = match event.into().0 {
            Ok(frame) => frame,
            Err(failure) => {
                // Skipping an event would leave a gap; ending the watch makes the client resume.
                error!(connection = self.connection, %failure, "a watch event does not fit in a frame; dropping the watch");
                return Err(self.dropped());
            }
        };
        let Some(charge) = self.budget.try_charge_shared(&frame) else {
            return Err(self.dropped());
        };
        match self.queue.try_send(OutFrame { bytes: FrameBytes::Shared(frame), _charge: charge }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(self.dropped()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(WatchFull),
        }
    }

    fn dropped(&self) -> WatchFull {
        if !self.fell_behind.swap(true, Ordering::Relaxed) {
            self.stats.watches_dropped.fetch_add(1, Ordering::Relaxed);
        }
        WatchFull
    }
}

/// The other end of [`WatchSender::detached`].
#[derive(Debug)]
pub struct WatchReceiver(mpsc::Receiver<OutFrame>);

impl WatchReceiver {
    /// The next event; `None` once the daemon dropped the watch and every event was taken.
    pub async fn recv(&mut self) -> Option<WatchEvent> {
        loop {
            let frame = self.0.recv().await?;
            // Frames come from `EncodedEvent`, so they decode; a frame that did not would be
            // skipped, which a watcher sees as a gap in revisions.
            let payload = frame.bytes.as_slice().get(4..).unwrap_or_default();
            if let Ok(ServerFrame::Event { event }) = decode_payload(payload) {
                return Some(event);
            }
        }
    }
}
