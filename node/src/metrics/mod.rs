//! What konord measures for Prometheus (issue 15, SPEC F28): latencies the daemon observes as
//! they happen ([`Metrics`], shared with the daemon's thread and the HTTP door), and the gauges
//! and counters read at each scrape from the daemon's [`NodeHealth`] and the doors' counters.
//! [`render`] writes the OpenMetrics text format, which Prometheus scrapes, through the
//! Prometheus project's own client library. docs/operations.md lists every metric.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use konor_sdk::protocol::SocketStats;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::health::{AlertKind, NodeHealth};
use crate::peer::transport::{ChannelCounters, TransportStats};
use konor_crdt::Mode;

/// Every name starts with this.
const PREFIX: &str = "konord";

/// Latency buckets: 50 µs doubling to about 13 s, which spans an fsync on a fast disk to a
/// strong round that waits out its timeout.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 19)
}

/// A consistency mode (`eventual`, `strong`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

/// Latencies observed where they happen. Cheap to clone (every instrument is shared). It holds
/// no hash map (no `Family`): the simulator draws every random number from its seed, and a
/// `HashMap` made here would shift the hash keys of every later one on the node's thread, and so
/// the run a seed gives.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// From a write's arrival at the daemon's thread to its `committed` answer: eventual groups.
    commit_eventual: Histogram,
    /// The same for strong groups.
    commit_strong: Histogram,
    /// One group file's append with its fsync, for a batch of records.
    persist: Histogram,
    /// The replica's handling of one peer message (decoding, Automerge's apply, the protocol).
    apply: Histogram,
    /// A peer's change: from its version's time at the writer to this node telling watchers.
    propagation: Histogram,
    /// HTTP requests answered, and refused at the door (connection cap, TLS handshake).
    pub http: Arc<HttpCounters>,
    /// Alert notices delivered to webhooks, and dropped.
    pub webhooks: Arc<crate::health::webhook::WebhookStats>,
    /// Enrollments answered, by outcome (issue 17).
    pub enrollments: Arc<crate::enroll::EnrollCounters>,
}

/// The HTTP door's own counters.
#[derive(Debug, Default)]
pub struct HttpCounters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests answered with a status of 400 or more.
    pub errors: AtomicU64,
    /// Connections refused: over the cap, or a failed or slow TLS handshake.
    pub refused: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            commit_eventual: Histogram::new(latency_buckets()),
            commit_strong: Histogram::new(latency_buckets()),
            persist: Histogram::new(latency_buckets()),
            apply: Histogram::new(latency_buckets()),
            propagation: Histogram::new(latency_buckets()),
            http: Arc::default(),
            webhooks: Arc::default(),
            enrollments: Arc::default(),
        }
    }
}

impl Metrics {
    /// A write of a group in `mode` committed `elapsed` after it reached the daemon.
    pub fn observe_commit(&self, mode: Mode, elapsed: Duration) {
        let histogram = match mode {
            Mode::Eventual => &self.commit_eventual,
            Mode::Strong => &self.commit_strong,
        };
        histogram.observe(elapsed.as_secs_f64());
    }

    /// A group file's append and fsync took `elapsed`.
    pub fn observe_persist(&self, elapsed: Duration) {
        self.persist.observe(elapsed.as_secs_f64());
    }

    /// A change a peer wrote reached this node's watchers `lag` after its version's time.
    pub fn observe_propagation(&self, lag: Duration) {
        self.propagation.observe(lag.as_secs_f64());
    }

    /// A peer message took `elapsed` on the daemon's thread.
    pub fn observe_apply(&self, elapsed: Duration) {
        self.apply.observe(elapsed.as_secs_f64());
    }
}

/// What a scrape reads besides the live instruments.
#[derive(Debug)]
pub struct Scrape {
    /// The daemon's answer to `LocalCall::Health`.
    pub health: NodeHealth,
    /// The socket's counters.
    pub socket: SocketStats,
    /// The peer transport's counters.
    pub transport: Arc<TransportStats>,
}

/// The OpenMetrics text of every metric (ends with `# EOF`).
pub fn render(metrics: &Metrics, scrape: Scrape) -> Result<String, fmt::Error> {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_with_unit(
        "persist_duration",
        "Time to append a batch of records to one group file and fsync it",
        prometheus_client::registry::Unit::Seconds,
        metrics.persist.clone(),
    );
    registry.register_with_unit(
        "peer_message_duration",
        "Time the daemon's thread spent on one peer message (decoding, Automerge apply, protocol)",
        prometheus_client::registry::Unit::Seconds,
        metrics.apply.clone(),
    );
    registry.register_with_unit(
        "propagation_lag",
        "Time from a change's version time at its writer to this node telling its watchers (changes from peers; milliseconds of clock skew between the nodes count in)",
        prometheus_client::registry::Unit::Seconds,
        metrics.propagation.clone(),
    );
    registry.register_collector(Box::new(ScrapeCollector {
        scrape,
        http: metrics.http.clone(),
        webhooks: metrics.webhooks.clone(),
        enrollments: metrics.enrollments.clone(),
        commit: [("eventual", metrics.commit_eventual.clone()), ("strong", metrics.commit_strong.clone())],
    }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The values read at scrape time, encoded as constant gauges and counters.
#[derive(Debug)]
struct ScrapeCollector {
    scrape: Scrape,
    http: Arc<HttpCounters>,
    webhooks: Arc<crate::health::webhook::WebhookStats>,
    enrollments: Arc<crate::enroll::EnrollCounters>,
    /// The commit latency histograms by mode.
    commit: [(&'static str, Histogram); 2],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DoorLabel {
    door: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: &'static str,
    direction: &'static str,
}

/// The four (channel, direction) samples of frames or bytes.
fn per_channel(
    transport: &TransportStats,
    read: impl Fn(&ChannelCounters, &'static str) -> u64,
) -> Vec<(ChannelLabel, u64)> {
    let mut samples = Vec::new();
    for (channel, counters) in [("gossip", &transport.gossip), ("replica", &transport.replica)] {
        for direction in ["in", "out"] {
            samples.push((ChannelLabel { channel, direction }, read(counters, direction)));
        }
    }
    samples
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// One gauge per label set under one name.
fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, f64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter per label set under one name.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for ScrapeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut commits = encoder.encode_descriptor(
            "commit_duration_seconds",
            "Time from a write's arrival at the daemon to its committed answer, by consistency mode",
            None,
            MetricType::Histogram,
        )?;
        for (mode, histogram) in &self.commit {
            histogram.encode(commits.encode_family(&ModeLabel { mode })?)?;
        }
        let health = &self.scrape.health;
        let socket = &self.scrape.socket;
        let members = &health.members;
        gauges(
            &mut encoder,
            "members",
            "Nodes of the mesh by the failure detector's verdict as this node sees them, itself included",
            [
                ("live", members.live),
                ("unknown", members.unknown),
                ("dead", members.dead),
                ("leaving", members.leaving),
            ]
            .map(|(state, count)| (StateLabel { state }, count as f64)),
        )?;
        let active = |kind: AlertKind| health.alerts.iter().filter(|alert| alert.kind == kind).count() as f64;
        gauges(
            &mut encoder,
            "alerts_active",
            "Anomaly alerts that hold now, by rule (docs/operations.md, Alerts)",
            [AlertKind::Flapping, AlertKind::HeartbeatDelay, AlertKind::LabelLost]
                .map(|kind| (KindLabel { kind: kind.as_str() }, active(kind))),
        )?;
        gauge(
            &mut encoder,
            "mesh_at_cap",
            "1 while the mesh is at its node cap and new nodes are refused (docs/operations.md), else 0",
            if health.mesh.at_cap { 1.0 } else { 0.0 },
        )?;
        gauge(&mut encoder, "uptime_seconds", "Seconds since the daemon started", health.uptime_ms as f64 / 1000.0)?;
        gauge(
            &mut encoder,
            "degraded",
            "1 while the last write to disk of some group failed (SPEC F24), else 0",
            if health.degraded.is_empty() { 0.0 } else { 1.0 },
        )?;
        let label =
            |group: &crate::health::GroupHealth| GroupLabel { group: group.name.clone(), mode: group.mode.clone() };
        gauges(
            &mut encoder,
            "group_revision",
            "This node's revision of each group (local to the node: compare heads, not revisions, across nodes)",
            health.groups.iter().map(|g| (label(g), g.revision as f64)),
        )?;
        gauges(
            &mut encoder,
            "group_seconds_since_change",
            "Seconds since this node last applied a change to each group",
            health.groups.iter().map(|g| (label(g), g.since_change_ms as f64 / 1000.0)),
        )?;
        gauges(
            &mut encoder,
            "group_members",
            "Members of each group as gossip shows them, this node included",
            health.groups.iter().map(|g| (label(g), g.members as f64)),
        )?;
        gauges(
            &mut encoder,
            "group_stale",
            "1 while reads of the group here may be behind (a strong group that cannot prove it is fresh)",
            health.groups.iter().map(|g| (label(g), if g.stale { 1.0 } else { 0.0 })),
        )?;
        let releases: Vec<(GroupLabel, &konor_sdk::health::ReleaseHealth)> =
            health.groups.iter().filter_map(|g| Some((label(g), g.release.as_ref()?))).collect();
        gauges(
            &mut encoder,
            "release_wave",
            "The wave in force of each gated group's newest release, counted from 1 (SPEC F14)",
            releases.iter().map(|(group, release)| (group.clone(), f64::from(release.wave))),
        )?;
        gauges(
            &mut encoder,
            "release_aborted",
            "1 when each gated group's newest release was aborted (by an operator or a guard), else 0",
            releases.iter().map(|(group, release)| (group.clone(), f64::from(u8::from(release.outcome == "aborted")))),
        )?;
        gauges(
            &mut encoder,
            "release_targeted_nodes",
            "Members in the slice of the wave in force of each gated group's newest release",
            releases.iter().map(|(group, release)| (group.clone(), release.targeted as f64)),
        )?;
        gauges(
            &mut encoder,
            "release_done_nodes",
            "Targeted members whose processes applied the newest release, none failing (SPEC F28)",
            releases.iter().map(|(group, release)| (group.clone(), release.done as f64)),
        )?;
        gauges(
            &mut encoder,
            "release_apply_success_ratio",
            "Processes that applied each gated group's newest release over those that reported it (absent before a report)",
            releases.iter().filter_map(|(group, release)| {
                let reported = release.processes_ok + release.processes_failed;
                (reported > 0).then(|| (group.clone(), release.processes_ok as f64 / reported as f64))
            }),
        )?;
        gauges(
            &mut encoder,
            "release_time_to_consistency_seconds",
            "From each gated group's newest release to every targeted member applied (absent until reached)",
            releases
                .iter()
                .filter_map(|(group, release)| Some((group.clone(), release.time_to_consistency_ms? as f64 / 1000.0))),
        )?;
        let queues = &health.queues;
        gauges(
            &mut encoder,
            "queue_depth",
            "Work waiting on the daemon's thread, by queue",
            [
                ("calls", queues.calls),
                ("pending_commands", queues.pending_commands),
                ("blocked_reads", queues.blocked_reads),
            ]
            .map(|(queue, depth)| (QueueLabel { queue }, depth as f64)),
        )?;
        gauge(&mut encoder, "watchers", "Watches of all groups held by local clients", queues.watchers as f64)?;
        gauges(
            &mut encoder,
            "connections",
            "Connections open now, by door",
            [("socket", socket.connections), ("http", self.http.connections.load(Ordering::Relaxed))]
                .map(|(door, count)| (DoorLabel { door }, count as f64)),
        )?;
        let transport = &self.scrape.transport;
        counters(
            &mut encoder,
            "peer_frames",
            "Peer frames by channel (gossip, replica) and direction",
            per_channel(transport, |c, direction| match direction {
                "in" => c.frames_in.load(Ordering::Relaxed),
                _ => c.frames_out.load(Ordering::Relaxed),
            }),
        )?;
        counters(
            &mut encoder,
            "peer_bytes",
            "Payload bytes of peer frames by channel and direction (before QUIC and TLS framing)",
            per_channel(transport, |c, direction| match direction {
                "in" => c.bytes_in.load(Ordering::Relaxed),
                _ => c.bytes_out.load(Ordering::Relaxed),
            }),
        )?;
        counters(
            &mut encoder,
            "webhook_notices",
            "Alert notices sent to webhooks: delivered (a 2xx), dropped (out of tries, refused, or pushed out of a full queue)",
            [("delivered", &self.webhooks.delivered), ("dropped", &self.webhooks.dropped)]
                .map(|(outcome, count)| (OutcomeLabel { outcome }, count.load(Ordering::Relaxed))),
        )?;
        counters(
            &mut encoder,
            "enrollments",
            "Hosts that asked this node to enroll them with a join token, by outcome (issued, or why refused)",
            self.enrollments.read().map(|(outcome, count)| (OutcomeLabel { outcome }, count)),
        )?;
        counter(&mut encoder, "http_requests", "HTTP requests answered", self.http.requests.load(Ordering::Relaxed))?;
        counter(
            &mut encoder,
            "http_request_errors",
            "HTTP requests answered with a status of 400 or more",
            self.http.errors.load(Ordering::Relaxed),
        )?;
        counters(
            &mut encoder,
            "refused",
            "Inputs dropped or refused since the start, by cause",
            [
                ("peer_message", health.dropped.peer_messages),
                ("persist_failure", health.dropped.persist_failures),
                ("socket_bad_frame", socket.bad_frames),
                ("socket_connection_cap", socket.refused),
                ("socket_ungreeted", socket.ungreeted_closed),
                ("socket_idle", socket.idle_closed),
                ("socket_watch_behind", socket.watches_dropped),
                ("http_connection", self.http.refused.load(Ordering::Relaxed)),
                ("peer_connection", transport.refused_in.load(Ordering::Relaxed)),
                ("peer_revoked", transport.revoked_closed.load(Ordering::Relaxed)),
                ("peer_send", transport.dropped_out.load(Ordering::Relaxed)),
            ]
            .map(|(cause, count)| (CauseLabel { cause }, count)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gated_groups_release_is_in_the_metrics_and_an_immediate_group_has_none() {
        let scrape = Scrape {
            health: crate::health::tests::health(),
            socket: SocketStats::default(),
            transport: Arc::new(TransportStats::default()),
        };
        let text = render(&Metrics::default(), scrape).unwrap();
        let line = |name: &str| text.lines().find(|line| line.starts_with(name)).map(str::to_owned);
        assert_eq!(
            line("konord_release_wave{").as_deref(),
            Some(r#"konord_release_wave{group="web",mode="eventual"} 2.0"#)
        );
        assert!(line("konord_release_apply_success_ratio{").unwrap().ends_with(" 0.6666666666666666"), "{text}");
        assert!(line("konord_release_done_nodes{").unwrap().ends_with(" 2.0"));
        assert!(line("konord_release_aborted{").unwrap().ends_with(" 0.0"));
        assert_eq!(line("konord_release_time_to_consistency_seconds{"), None, "not reached yet");
        assert!(!text.contains(r#"konord_release_wave{group="app""#), "an immediate group has no release");
    }
}
