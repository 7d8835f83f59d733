//! The simulated network: one hub that every node's [`PeerNetwork`] handle sends into, and one
//! pump task that delivers each frame to the destination's inbox after a latency drawn from the
//! run's seeded stream. Links lose, duplicate and reorder frames (by latency jitter); partitions
//! cut links both ways or one way; a paused node's inbox is held until it resumes.
//!
//! Addresses are fake (`10.0.x.y:7400`) and serve only as keys: no packet ever leaves the
//! process. Every delivered frame is folded into the run's trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use konor_node::peer::transport::{Channel, Incoming, PeerNetwork};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::config::{RunConfig, Wire};
use crate::disk::Disk;
use crate::frame_check::{Observed, ProtocolChecker};
use crate::invariant::Violation;
use crate::rng::SimRng;
use crate::trace::Trace;

/// Frames held for a paused node before newer ones are dropped, like a full socket buffer.
const HELD_FRAMES_MAX: usize = 4096;

/// Extra delay of a replica frame lost on the stream wire: about one retransmission timeout
/// on top of the round trip, as QUIC's probe timeout would add.
const RETRANSMIT_DELAY: Duration = Duration::from_millis(200);

/// Latency of frames released from a resumed node's held inbox (they sat in its buffer).
const RELEASE_LATENCY: Duration = Duration::from_micros(100);

/// The fake address of node `index`: `10.0.x.y:7400`, used only as a key.
pub fn node_addr(index: usize) -> SocketAddr {
    let high = u8::try_from(index / 250).unwrap_or(u8::MAX);
    let low = u8::try_from(index % 250 + 1).unwrap_or(u8::MAX);
    SocketAddr::from((Ipv4Addr::new(10, 0, high, low), 7400))
}

/// Whether a node's endpoint takes frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Not running: frames to it are dropped.
    Down,
    /// Running: frames are delivered.
    Up,
    /// Stopped: frames to it are held, frames from it are dropped.
    Paused,
}

/// Per-channel counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChannelStats {
    /// Frames handed to the network by nodes.
    pub sent: u64,
    /// Bytes of those frames.
    pub sent_bytes: u64,
    /// Frames delivered to an inbox.
    pub delivered: u64,
    /// Bytes delivered.
    pub delivered_bytes: u64,
    /// Frames lost by the link model.
    pub lost: u64,
    /// Extra copies made by the link model.
    pub duplicated: u64,
    /// Frames dropped by a partition.
    pub cut: u64,
    /// Frames dropped because the sender or receiver was down or paused, or its inbox full.
    pub unreachable: u64,
}

/// Network counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    /// Gossip channel.
    pub gossip: ChannelStats,
    /// Replica channel.
    pub replica: ChannelStats,
}

impl NetStats {
    fn channel(&mut self, channel: Channel) -> &mut ChannelStats {
        match channel {
            Channel::Gossip => &mut self.gossip,
            Channel::Replica => &mut self.replica,
        }
    }
}

/// An active partition: `side[i]` tells which side node i is on.
#[derive(Debug, Clone)]
struct Partition {
    id: u64,
    side: Vec<bool>,
    /// Only frames from side `true` to side `false` are cut.
    oneway: bool,
}

impl Partition {
    fn cuts(&self, from: usize, to: usize) -> bool {
        let (a, b) = (self.side.get(from).copied().unwrap_or(false), self.side.get(to).copied().unwrap_or(false));
        if a == b {
            return false;
        }
        !self.oneway || a
    }
}

/// A frame in flight.
#[derive(Debug)]
pub(crate) struct Frame {
    from: usize,
    to: usize,
    channel: Channel,
    bytes: Vec<u8>,
    /// What the protocol checker wants to know when this frame is delivered.
    pub(crate) observed: Option<Observed>,
}

#[derive(Debug)]
struct Queued {
    at_us: u64,
    seq: u64,
    frame: Frame,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_us, self.seq).cmp(&(other.at_us, other.seq))
    }
}

/// One node's attachment to the hub.
#[derive(Debug)]
struct Endpoint {
    id: String,
    incarnation: u64,
    reach: Reach,
    gossip: Option<mpsc::Sender<Incoming>>,
    replica: Option<mpsc::Sender<Incoming>>,
    held: VecDeque<Frame>,
}

/// Everything behind the hub's lock.
#[derive(Debug)]
pub struct Hub {
    start: Instant,
    rng: SimRng,
    loss: f64,
    duplicate: f64,
    latency_us: (u64, u64),
    wire: Wire,
    endpoints: Vec<Endpoint>,
    by_addr: BTreeMap<SocketAddr, usize>,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    stream_until: BTreeMap<(usize, usize), u64>,
    partitions: Vec<Partition>,
    next_partition: u64,
    /// Counters.
    pub stats: NetStats,
    /// The run's trace.
    pub trace: Trace,
    /// Protocol-level invariant checks on frames (E1, S1, S2), unless turned off.
    pub checker: Option<ProtocolChecker>,
    /// Invariant violations found so far (the run stops at the first).
    pub violations: Vec<Violation>,
    /// Frames delivered, readable from other threads: the stall watchdog's sign of progress.
    delivered_counter: Arc<AtomicU64>,
}

impl Hub {
    /// Simulated microseconds since the run started.
    pub fn now_us(&self) -> u64 {
        micros(self.start.elapsed())
    }

    /// Records an invariant violation (and puts it in the trace).
    pub fn violation(&mut self, invariant: &'static str, detail: String) {
        let at_us = self.now_us();
        self.trace.event(at_us, &format!("violation {invariant}: {detail}"));
        self.violations.push(Violation { at_us, invariant, detail });
    }

    fn cut(&self, from: usize, to: usize) -> bool {
        self.partitions.iter().any(|p| p.cuts(from, to))
    }

    fn latency_us(&mut self) -> u64 {
        self.rng.between(self.latency_us.0, self.latency_us.1)
    }

    /// Queues a frame; returns true when it became the earliest in flight (the pump must wake).
    fn enqueue(&mut self, at_us: u64, frame: Frame) -> bool {
        let earliest = self.queue.peek().is_none_or(|Reverse(head)| at_us < head.at_us);
        self.seq += 1;
        self.queue.push(Reverse(Queued { at_us, seq: self.seq, frame }));
        earliest
    }

    fn send(
        &mut self,
        from: usize,
        incarnation: u64,
        to_addr: SocketAddr,
        expect: Option<&str>,
        channel: Channel,
        bytes: Vec<u8>,
    ) -> bool {
        let length = bytes.len() as u64;
        {
            let stats = self.stats.channel(channel);
            stats.sent += 1;
            stats.sent_bytes += length;
        }
        let sender_up = self.endpoints.get(from).is_some_and(|e| e.incarnation == incarnation && e.reach == Reach::Up);
        let Some(&to) = self.by_addr.get(&to_addr) else {
            self.stats.channel(channel).unreachable += 1;
            return false;
        };
        let identity_ok = expect.is_none_or(|id| self.endpoints[to].id == id);
        if !sender_up || !identity_ok {
            self.stats.channel(channel).unreachable += 1;
            return false;
        }
        if self.cut(from, to) {
            self.stats.channel(channel).cut += 1;
            return false;
        }
        let observed = match (&mut self.checker, channel) {
            (Some(checker), Channel::Replica) => {
                let (from_id, to_id) = (self.endpoints[from].id.as_str(), self.endpoints[to].id.as_str());
                let (observed, found) = checker.on_send(from, from_id, to_id, &bytes);
                for (invariant, detail) in found {
                    self.violation(invariant, detail);
                }
                observed
            }
            _ => None,
        };
        let now = self.now_us();
        let stream = self.wire == Wire::Stream && channel == Channel::Replica;
        let mut wake = false;
        if stream {
            // In order per link, never duplicated; a loss costs a retransmission.
            let mut at = now + self.latency_us();
            while self.rng.chance(self.loss) {
                self.stats.replica.lost += 1;
                at += micros(RETRANSMIT_DELAY) + self.latency_us.1 * 2;
            }
            let until = self.stream_until.entry((from, to)).or_insert(0);
            at = at.max(*until);
            *until = at;
            wake |= self.enqueue(at, Frame { from, to, channel, bytes, observed });
            return wake;
        }
        if self.rng.chance(self.loss) {
            self.stats.channel(channel).lost += 1;
            return false;
        }
        if self.rng.chance(self.duplicate) {
            self.stats.channel(channel).duplicated += 1;
            let at = now + self.latency_us();
            let copy = Frame { from, to, channel, bytes: bytes.clone(), observed: observed.clone() };
            wake |= self.enqueue(at, copy);
        }
        let at = now + self.latency_us();
        wake |= self.enqueue(at, Frame { from, to, channel, bytes, observed });
        wake
    }

    /// The delivery time of the earliest frame in flight.
    fn next_due(&self) -> Option<u64> {
        self.queue.peek().map(|Reverse(head)| head.at_us)
    }

    /// Delivers every frame due by `now_us`, in (time, sequence) order.
    fn deliver_due(&mut self, now_us: u64) {
        while self.queue.peek().is_some_and(|Reverse(head)| head.at_us <= now_us) {
            let Some(Reverse(queued)) = self.queue.pop() else { break };
            self.deliver(queued.at_us, queued.frame);
        }
    }

    fn deliver(&mut self, at_us: u64, frame: Frame) {
        let (from, to, channel) = (frame.from, frame.to, frame.channel);
        if self.cut(from, to) {
            self.stats.channel(channel).cut += 1;
            return;
        }
        let Some(endpoint) = self.endpoints.get_mut(to) else { return };
        match endpoint.reach {
            Reach::Down => {
                self.stats.channel(channel).unreachable += 1;
                return;
            }
            Reach::Paused => {
                if endpoint.held.len() < HELD_FRAMES_MAX {
                    endpoint.held.push_back(frame);
                } else {
                    self.stats.channel(channel).unreachable += 1;
                }
                return;
            }
            Reach::Up => {}
        }
        let sender = match channel {
            Channel::Gossip => endpoint.gossip.clone(),
            Channel::Replica => endpoint.replica.clone(),
        };
        let Some(sender) = sender else { return };
        let from_id = self.endpoints[from].id.clone();
        let length = frame.bytes.len() as u64;
        // The text copy names replica messages; the hash covers only the bytes.
        let note =
            (self.trace.has_copy() && channel == Channel::Replica).then(|| crate::frame_check::describe(&frame.bytes));
        self.trace.delivery(at_us, from, to, channel_byte(channel), &frame.bytes, note);
        let incoming = Incoming { from: from_id, addr: node_addr(from), bytes: frame.bytes, budget: None };
        match sender.try_send(incoming) {
            Ok(()) => {
                let stats = self.stats.channel(channel);
                stats.delivered += 1;
                stats.delivered_bytes += length;
                self.delivered_counter.fetch_add(1, Ordering::Relaxed);
                if let (Some(checker), Some(observed)) = (&mut self.checker, frame.observed) {
                    checker.on_delivered(observed);
                }
            }
            Err(_) => {
                // A full inbox drops the frame, as a full socket buffer would.
                self.trace.event(at_us, &format!("inbox full {from}->{to}"));
                self.stats.channel(channel).unreachable += 1;
            }
        }
    }
}

fn channel_byte(channel: Channel) -> u8 {
    match channel {
        Channel::Gossip => 1,
        Channel::Replica => 2,
    }
}

/// Microseconds in a duration, saturating.
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The shared hub; clones are cheap handles to the same network.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    hub: Arc<Mutex<Hub>>,
    wake: Arc<Notify>,
}

impl SimNetwork {
    /// A network for `node_ids` (node i at [`node_addr`]`(i)`); the protocol checks, when on,
    /// ask `disk` what nodes hold durably.
    pub fn new(config: &RunConfig, node_ids: &[String], disk: &Disk, trace: Trace) -> SimNetwork {
        let endpoints = node_ids
            .iter()
            .map(|id| Endpoint {
                id: id.clone(),
                incarnation: 0,
                reach: Reach::Down,
                gossip: None,
                replica: None,
                held: VecDeque::new(),
            })
            .collect();
        let by_addr = (0..node_ids.len()).map(|i| (node_addr(i), i)).collect();
        let hub = Hub {
            start: Instant::now(),
            rng: SimRng::new(config.seed, 1),
            loss: config.loss,
            duplicate: config.duplicate,
            latency_us: (micros(config.latency.0), micros(config.latency.1)),
            wire: config.wire,
            endpoints,
            by_addr,
            queue: BinaryHeap::new(),
            seq: 0,
            stream_until: BTreeMap::new(),
            partitions: Vec::new(),
            next_partition: 0,
            stats: NetStats::default(),
            trace,
            checker: config.check_disk.then(|| ProtocolChecker::new(disk.clone())),
            violations: Vec::new(),
            delivered_counter: Arc::new(AtomicU64::new(0)),
        };
        SimNetwork { hub: Arc::new(Mutex::new(hub)), wake: Arc::new(Notify::new()) }
    }

    /// Puts `text` in the run's trace at the hub's clock.
    pub fn trace_event(&self, text: &str) {
        let mut hub = self.lock();
        let now = hub.now_us();
        hub.trace.event(now, text);
    }

    /// The hub, locked. The simulation is single-threaded: the lock is never contended, and a
    /// poisoned lock (a panic while holding it) is taken over, since the run reports panics.
    pub fn lock(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The count of delivered frames, for a watchdog on another thread.
    pub fn delivered_counter(&self) -> Arc<AtomicU64> {
        self.lock().delivered_counter.clone()
    }

    /// Attaches a (re)started node: frames to it go to these inbox senders from now on.
    pub fn attach(&self, index: usize, gossip: mpsc::Sender<Incoming>, replica: mpsc::Sender<Incoming>) -> NodeHandle {
        let mut hub = self.lock();
        let endpoint = &mut hub.endpoints[index];
        endpoint.incarnation += 1;
        endpoint.reach = Reach::Up;
        endpoint.gossip = Some(gossip);
        endpoint.replica = Some(replica);
        endpoint.held.clear();
        NodeHandle { network: self.clone(), index, incarnation: endpoint.incarnation }
    }

    /// Detaches a crashed node: frames to it are dropped and its late sends too.
    pub fn detach(&self, index: usize) {
        let mut hub = self.lock();
        let endpoint = &mut hub.endpoints[index];
        endpoint.reach = Reach::Down;
        endpoint.gossip = None;
        endpoint.replica = None;
        endpoint.held.clear();
    }

    /// Pauses or resumes a node's endpoint; on resume its held inbox is released.
    pub fn set_paused(&self, index: usize, paused: bool) {
        let mut hub = self.lock();
        let now = hub.now_us();
        let endpoint = &mut hub.endpoints[index];
        if endpoint.reach == Reach::Down {
            return;
        }
        endpoint.reach = if paused { Reach::Paused } else { Reach::Up };
        if paused {
            return;
        }
        let held: Vec<Frame> = endpoint.held.drain(..).collect();
        let mut wake = false;
        for frame in held {
            wake |= hub.enqueue(now + micros(RELEASE_LATENCY), frame);
        }
        drop(hub);
        if wake {
            self.wake.notify_one();
        }
    }

    /// Starts a partition: nodes with `side[i] == true` against the rest (one way: only frames
    /// from the `true` side are cut). Returns its id for [`SimNetwork::heal`].
    pub fn partition(&self, side: Vec<bool>, oneway: bool) -> u64 {
        let mut hub = self.lock();
        hub.next_partition += 1;
        let id = hub.next_partition;
        hub.partitions.push(Partition { id, side, oneway });
        id
    }

    /// Ends a partition.
    pub fn heal(&self, id: u64) {
        self.lock().partitions.retain(|p| p.id != id);
    }

    /// True while any partition is active.
    pub fn partitioned(&self) -> bool {
        !self.lock().partitions.is_empty()
    }

    /// Ends every partition.
    pub fn heal_all(&self) {
        self.lock().partitions.clear();
    }

    /// True when a partition now cuts `a` from `b` in either direction.
    pub fn separated(&self, a: usize, b: usize) -> bool {
        let hub = self.lock();
        hub.cut(a, b) || hub.cut(b, a)
    }

    /// Delivers frames as their time comes, forever (the run ends by dropping the runtime).
    pub async fn pump(self) {
        loop {
            let (now_us, next) = {
                let hub = self.lock();
                (hub.now_us(), hub.next_due())
            };
            match next {
                Some(at_us) if at_us <= now_us => self.lock().deliver_due(now_us),
                Some(at_us) => {
                    let start = self.lock().start;
                    let deadline = start + Duration::from_micros(at_us);
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

/// One node's view of the network: what it gets as its [`PeerNetwork`].
#[derive(Debug)]
pub struct NodeHandle {
    network: SimNetwork,
    index: usize,
    incarnation: u64,
}

impl PeerNetwork for NodeHandle {
    fn local_addr(&self) -> SocketAddr {
        node_addr(self.index)
    }

    fn send(&self, addr: SocketAddr, expect: Option<&str>, channel: Channel, bytes: Vec<u8>) {
        let wake = self.network.lock().send(self.index, self.incarnation, addr, expect, channel, bytes);
        if wake {
            self.network.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_map_back() {
        let addrs: std::collections::BTreeSet<SocketAddr> = (0..2000).map(node_addr).collect();
        assert_eq!(addrs.len(), 2000);
        assert_eq!(node_addr(0).to_string(), "10.0.0.1:7400");
        assert_eq!(node_addr(251).to_string(), "10.0.1.2:7400");
    }

    #[test]
    fn a_partition_cuts_across_sides_and_a_oneway_one_direction() {
        let both = Partition { id: 1, side: vec![true, false, false], oneway: false };
        assert!(both.cuts(0, 1) && both.cuts(1, 0) && !both.cuts(1, 2));
        let oneway = Partition { id: 2, side: vec![true, false], oneway: true };
        assert!(oneway.cuts(0, 1) && !oneway.cuts(1, 0));
    }
}
