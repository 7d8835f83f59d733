//! What of a gossip message may reach chitchat (issue 12: gossip that only its owner can write).
//! Pure decisions over a decoded message and what this node already verified; no I/O.
//!
//! Rules, for every message before chitchat reads it:
//! * A node's state enters only with its certificate: a delta for a node this node holds no
//!   certificate of must start with the node's [`CERT_KEY`] at version 1, issued by the cluster
//!   CA to that node id and signed by its key for this exact node id, generation and address.
//!   So no one can invent a node, take a newer generation of another node's id, or move it to
//!   another address.
//! * Every key-value must carry its owner's signature over the cluster, node, key, version and
//!   value. One bad value refuses the whole node delta (chitchat's deltas must be contiguous).
//! * Nothing may reset a node's state or delete keys (we never delete: `last_gc_version` 0, no
//!   tombstones, no bare max version), and no one may tell this node about itself.
//! * A digest entry survives only for a node whose certificate this node holds (or that the same
//!   message brings): chitchat creates state for every node a digest names. Its heartbeat may be
//!   at most [`HEARTBEAT_AHEAD_MAX`] past the heartbeat in the node's latest signed beat:
//!   heartbeats cannot be signed (they ride in digests), and one forged far ahead would make
//!   chitchat ignore the real ones and hold the node dead.
//! * New node ids past [`super::membership::MESH_NODES_MAX`] are refused (chitchat's digest
//!   must fit one datagram); a node id keeps at most [`GENERATIONS_PER_NODE_MAX`] generations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chitchat::ChitchatId;

use super::gossip_seal::{BEAT_KEY, CERT_KEY, GossipSeal, PeerCert, payload, split_value, verify_value};
use super::gossip_wire::{self, DigestEntry, Message, NodeDelta, WireError};
use crate::limits::FORGOTTEN_NODE_IDS_MAX;

/// How far a relayed heartbeat may run ahead of the heartbeat in the node's latest signed beat.
/// chitchat advances a node's heartbeat once per gossip round and once per message it handles
/// (a few dozen per second in a busy mesh), a beat is signed every second, and it may arrive
/// seconds after the digests that passed it; 4,096 covers that many times over. A forger can
/// push a heartbeat at most this far ahead: the real ones then count again after the node's
/// heartbeat catches up (tens of seconds), and the signed beats keep it live meanwhile.
pub const HEARTBEAT_AHEAD_MAX: u64 = 4096;

/// A verified node that chitchat no longer holds (it forgot a node dead for its grace period) is
/// forgotten here too once this many messages have passed without news of it, so the cap counts
/// the mesh as it is, not every node it ever held. Messages, not time: the filter has no clock,
/// and the margin only has to cover the moment between admitting a node and chitchat applying it.
pub const FORGET_AFTER_MESSAGES: u64 = 10_000;

/// Generations of one node id held at once: the running one and the one before (a restart). An
/// older one is forgotten; its state no longer changes.
pub const GENERATIONS_PER_NODE_MAX: usize = 2;

/// New generations of one node id come at most this often, with a burst of
/// [`GENERATIONS_PER_NODE_MAX`] (a node just started learns the old and the new generation of a
/// peer at once). A generation is a restart: honest nodes restart far less often, and a node with
/// a valid certificate cannot flood chitchat's state with generations of its own id.
pub const NEW_GENERATION_INTERVAL_MS: u64 = 5_000;

/// New generations of node ids already in the mesh (restarts) are let in up to the mesh cap plus
/// this share of it (1/32: 825 at 800), so restarts still get in at the cap; chitchat's digest
/// overflows its datagram somewhere past 850 states with the longest ids.
pub const RESTART_HEADROOM_DIVISOR: usize = 32;

/// Counters of what the filter refused, for logs, status and tests.
#[derive(Debug, Default)]
pub struct GossipSealStats {
    /// Messages that were not chitchat messages, or expanded past the cap.
    pub messages_undecodable: AtomicU64,
    /// Node deltas refused as forged: a bad certificate or signature, a reset, a deletion, or
    /// news about this node itself.
    pub node_deltas_forged: AtomicU64,
    /// Node deltas refused because their node's certificate is unknown here (an old generation
    /// this node forgot, or a delta that does not start at the certificate).
    pub node_deltas_unverifiable: AtomicU64,
    /// New nodes refused past the mesh cap.
    pub nodes_over_cap: AtomicU64,
    /// Relayed heartbeats cut back to [`HEARTBEAT_AHEAD_MAX`] past the signed beat.
    pub heartbeats_capped: AtomicU64,
    /// Node deltas refused because their node's certificate is revoked.
    pub node_deltas_revoked: AtomicU64,
}

/// Why a node delta was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It does not verify: forged, replayed under another version, or tampered with.
    Forged(String),
    /// Its node's certificate is revoked (relayed by a peer that has not heard yet).
    Revoked,
    /// Its node's certificate is unknown here.
    Unverifiable,
    /// The mesh is full.
    OverCap,
}

/// What to hand to chitchat.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The message as received.
    Keep,
    /// The message with refused parts removed or heartbeats capped.
    Rewritten(Vec<u8>),
    /// Nothing: the message is not a chitchat message.
    Drop(WireError),
}

/// What the filter remembers of one node id's generations.
#[derive(Debug, Clone, Copy)]
struct Generations {
    /// The highest generation admitted.
    max: u64,
    /// New generations it may still bring at once (refilled one per
    /// [`NEW_GENERATION_INTERVAL_MS`], up to [`GENERATIONS_PER_NODE_MAX`]).
    tokens: u64,
    /// When the tokens were last refilled.
    refilled_ms: u64,
}

/// What this node verified of one node (one generation of one id).
#[derive(Debug, Clone)]
struct Known {
    cert: PeerCert,
    /// The heartbeat in its latest signed beat.
    beat_heartbeat: Option<u64>,
    /// The number of the last message that brought news of it.
    seen: u64,
}

/// The gossip filter of one node.
pub struct GossipFilter {
    seal: Arc<dyn GossipSeal>,
    cluster: String,
    self_id: ChitchatId,
    nodes_max: usize,
    known: BTreeMap<ChitchatId, Known>,
    /// Messages admitted so far (the filter's clock, see [`FORGET_AFTER_MESSAGES`]).
    messages: u64,
    /// Node states chitchat held at the last view, and new nodes admitted since.
    held_states: usize,
    admitted_since_view: usize,
    /// Per node id: the highest generation ever admitted, and the tokens for new ones. Ids with
    /// no generation in `known` are kept up to `forgotten_ids_max`.
    generations: BTreeMap<String, Generations>,
    /// [`FORGOTTEN_NODE_IDS_MAX`], smaller in tests.
    forgotten_ids_max: usize,
    /// Milliseconds on the caller's clock (see [`GossipFilter::set_clock`]).
    now_ms: u64,
    stats: Arc<GossipSealStats>,
    /// The refusals of the last message, with the node each was about (for the log).
    last_refusals: Vec<(ChitchatId, Refusal)>,
    /// The seal's revocation generation when the held certificates were last checked.
    revocation_generation: u64,
}

impl std::fmt::Debug for GossipFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipFilter").field("self_id", &self.self_id).field("known", &self.known.len()).finish()
    }
}

impl GossipFilter {
    /// The filter of node `self_id` in `cluster`, admitting at most `nodes_max` node ids.
    pub fn new(seal: Arc<dyn GossipSeal>, cluster: &str, self_id: ChitchatId, nodes_max: usize) -> GossipFilter {
        GossipFilter {
            seal,
            cluster: cluster.to_owned(),
            self_id,
            nodes_max,
            known: BTreeMap::new(),
            messages: 0,
            held_states: 0,
            admitted_since_view: 0,
            generations: BTreeMap::new(),
            forgotten_ids_max: FORGOTTEN_NODE_IDS_MAX,
            now_ms: 0,
            stats: Arc::default(),
            last_refusals: Vec::new(),
            revocation_generation: 0,
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<GossipSealStats> {
        self.stats.clone()
    }

    /// The refusals of the last [`GossipFilter::admit`].
    pub fn last_refusals(&self) -> &[(ChitchatId, Refusal)] {
        &self.last_refusals
    }

    /// Sets the filter's clock (milliseconds, any origin, never going back).
    pub fn set_clock(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Tells the filter how many node states chitchat holds (every generation counts toward the
    /// cap: chitchat's digest lists them all).
    pub fn observe_held(&mut self, states: usize) {
        self.held_states = states;
        self.admitted_since_view = 0;
    }

    /// Forgets the verified nodes chitchat no longer holds (`held` is false) and no message
    /// mentioned for [`FORGET_AFTER_MESSAGES`] messages.
    pub fn forget_unheld(&mut self, held: impl Fn(&ChitchatId) -> bool) {
        let now = self.messages;
        self.known.retain(|id, known| held(id) || now.saturating_sub(known.seen) < FORGET_AFTER_MESSAGES);
        self.forget_old_ids();
    }

    /// Keeps the generation memory of at most `forgotten_ids_max` node ids that have no
    /// generation in `known`, forgetting first those whose last new generation is oldest
    /// ([`FORGOTTEN_NODE_IDS_MAX`]).
    fn forget_old_ids(&mut self) {
        if self.generations.len() <= self.forgotten_ids_max {
            return;
        }
        let held: std::collections::BTreeSet<&str> = self.known.keys().map(|id| &*id.node_id).collect();
        let mut forgotten: Vec<(u64, String)> = self
            .generations
            .iter()
            .filter(|(node_id, _)| !held.contains(node_id.as_str()))
            .map(|(node_id, seen)| (seen.refilled_ms, node_id.clone()))
            .collect();
        let excess = forgotten.len().saturating_sub(self.forgotten_ids_max);
        forgotten.sort_unstable();
        for (_, node_id) in forgotten.into_iter().take(excess) {
            self.generations.remove(&node_id);
        }
    }

    /// Forgets every node whose certificate was revoked since the last check: its deltas are
    /// then unverifiable (the seal refuses its certificate again) and its digest entries are
    /// dropped, so its heartbeat stops and chitchat holds it dead.
    fn forget_revoked(&mut self) {
        let generation = self.seal.revocation_generation();
        if generation == self.revocation_generation {
            return;
        }
        self.revocation_generation = generation;
        let seal = self.seal.clone();
        self.known.retain(|_, known| !seal.revoked(&known.cert));
    }

    /// Whether this node verified `id`'s certificate.
    pub fn knows(&self, id: &ChitchatId) -> bool {
        self.known.contains_key(id)
    }

    /// The most node ids it admits (the mesh's cap).
    pub fn nodes_max(&self) -> usize {
        self.nodes_max
    }

    /// Checks one received message.
    pub fn admit(&mut self, bytes: &[u8]) -> Verdict {
        self.last_refusals.clear();
        self.messages += 1;
        self.forget_revoked();
        let mut message = match gossip_wire::decode(bytes) {
            Ok(message) => message,
            Err(error) => {
                self.stats.messages_undecodable.fetch_add(1, Ordering::Relaxed);
                return Verdict::Drop(error);
            }
        };
        let mut changed = false;
        match &mut message {
            Message::Syn { digest, .. } => changed |= self.filter_digest(digest),
            Message::SynAck { digest, delta } => {
                // The delta first: it may bring the certificates of nodes the digest names.
                changed |= self.filter_delta(delta);
                changed |= self.filter_digest(digest);
            }
            Message::Ack { delta } => changed |= self.filter_delta(delta),
            Message::BadCluster => {}
        }
        if changed { Verdict::Rewritten(gossip_wire::encode(&message)) } else { Verdict::Keep }
    }

    fn filter_delta(&mut self, delta: &mut Vec<NodeDelta>) -> bool {
        let before = delta.len();
        delta.retain(|node| match self.check_node_delta(node) {
            Ok(()) => true,
            Err(refusal) => {
                let counter = match refusal {
                    Refusal::Forged(_) => &self.stats.node_deltas_forged,
                    Refusal::Unverifiable => &self.stats.node_deltas_unverifiable,
                    Refusal::Revoked => &self.stats.node_deltas_revoked,
                    Refusal::OverCap => &self.stats.nodes_over_cap,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                self.last_refusals.push((node.id.clone(), refusal));
                false
            }
        });
        delta.len() != before
    }

    fn filter_digest(&mut self, digest: &mut Vec<DigestEntry>) -> bool {
        let mut changed = false;
        let now = self.messages;
        let (self_id, stats) = (&self.self_id, &self.stats);
        // One lookup per entry: a digest names every node of the mesh, and this runs for every
        // message (konor-sim's profile at 150 nodes).
        digest.retain_mut(|entry| {
            let Some(known) = self.known.get_mut(&entry.id) else {
                let keep = entry.id == *self_id;
                changed |= !keep;
                return keep;
            };
            known.seen = now;
            // A node whose signed beat has not arrived yet (a delta cut short by the datagram
            // size) is capped from 0: a lower heartbeat is harmless (chitchat keeps the highest),
            // an unbounded one would make chitchat ignore the real ones for good.
            let ceiling = known.beat_heartbeat.unwrap_or(0).saturating_add(HEARTBEAT_AHEAD_MAX);
            if entry.heartbeat > ceiling {
                entry.heartbeat = ceiling;
                changed = true;
                stats.heartbeats_capped.fetch_add(1, Ordering::Relaxed);
            }
            true
        });
        changed
    }

    /// Checks a node delta and, if it passes, records what it proves (certificate, beat).
    fn check_node_delta(&mut self, node: &NodeDelta) -> Result<(), Refusal> {
        let forged = |why: &str| Err(Refusal::Forged(why.to_owned()));
        if node.id == self.self_id {
            return forged("news about this node itself");
        }
        if node.last_gc_version != 0 {
            return forged("a state reset (nodes never delete keys)");
        }
        if node.set_max_version.is_some() {
            return forged("a max version without key-values");
        }
        if node.key_values.iter().any(|key_value| key_value.status != 0) {
            return forged("a deleted key (nodes never delete keys)");
        }
        let known_cert = self.known.get(&node.id).map(|known| known.cert.clone());
        let (cert, new) = match known_cert {
            Some(cert) => (cert, false),
            None => {
                let Some(first) = node.key_values.first().filter(|first| first.key == CERT_KEY) else {
                    return Err(Refusal::Unverifiable);
                };
                if first.version != 1 {
                    return forged("a certificate at a version other than 1");
                }
                let Some((text, _)) = split_value(&first.value) else { return forged("an unsigned certificate") };
                let Some(cert) = self.seal.accept_cert(&node.id.node_id, text) else {
                    return forged("a certificate not issued to this node id by the cluster CA");
                };
                if self.seal.revoked(&cert) {
                    return Err(Refusal::Revoked);
                }
                (cert, true)
            }
        };
        let mut beat_heartbeat = None;
        for key_value in &node.key_values {
            if key_value.key == CERT_KEY && key_value.version != 1 {
                return forged("a second certificate");
            }
            if !verify_value(
                self.seal.as_ref(),
                &cert,
                &self.cluster,
                &node.id,
                &key_value.key,
                key_value.version,
                &key_value.value,
            ) {
                return Err(Refusal::Forged(format!("a bad signature on {:?}", key_value.key)));
            }
            if key_value.key == BEAT_KEY
                && let Ok(heartbeat) = payload(&key_value.value).parse::<u64>()
            {
                beat_heartbeat = Some(heartbeat);
            }
        }
        if new {
            self.make_room(&node.id)?;
            self.known.insert(node.id.clone(), Known { cert, beat_heartbeat: None, seen: self.messages });
        }
        if let Some(known) = self.known.get_mut(&node.id) {
            known.seen = self.messages;
            if let Some(heartbeat) = beat_heartbeat {
                known.beat_heartbeat = Some(known.beat_heartbeat.map_or(heartbeat, |old| old.max(heartbeat)));
            }
        }
        Ok(())
    }

    /// Makes room for a new node state `id`. Refused: a generation not above every one seen of
    /// its node id (an old one, or a replay), one that comes too soon after the last
    /// ([`NEW_GENERATION_INTERVAL_MS`]), a new node id when chitchat holds the mesh cap, a new
    /// generation when it holds the cap plus the restart headroom. Forgets the oldest generations
    /// of the id past [`GENERATIONS_PER_NODE_MAX`].
    fn make_room(&mut self, id: &ChitchatId) -> Result<(), Refusal> {
        let held = self.held_states + self.admitted_since_view;
        let now = self.now_ms;
        match self.generations.get_mut(&*id.node_id) {
            Some(seen) => {
                if id.generation_id <= seen.max {
                    return Err(Refusal::Unverifiable);
                }
                let refills = now.saturating_sub(seen.refilled_ms) / NEW_GENERATION_INTERVAL_MS;
                if refills > 0 {
                    seen.tokens = (seen.tokens + refills).min(GENERATIONS_PER_NODE_MAX as u64);
                    seen.refilled_ms = now;
                }
                if seen.tokens == 0 {
                    return Err(Refusal::Unverifiable);
                }
                if held >= self.nodes_max + (self.nodes_max / RESTART_HEADROOM_DIVISOR).max(1) {
                    return Err(Refusal::OverCap);
                }
                seen.tokens -= 1;
                seen.max = id.generation_id;
            }
            None => {
                if held >= self.nodes_max {
                    return Err(Refusal::OverCap);
                }
                self.generations.insert(
                    id.node_id.to_string(),
                    Generations {
                        max: id.generation_id,
                        tokens: GENERATIONS_PER_NODE_MAX as u64 - 1,
                        refilled_ms: now,
                    },
                );
            }
        }
        self.admitted_since_view += 1;
        let same_node: Vec<ChitchatId> =
            self.known.keys().filter(|other| other.node_id == id.node_id).cloned().collect();
        if same_node.len() >= GENERATIONS_PER_NODE_MAX
            && let Some(oldest) = same_node.iter().min_by_key(|other| other.generation_id)
        {
            self.known.remove(oldest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::gossip_seal::{SimSeal, seal_value};
    use crate::peer::gossip_wire::KeyValue;
    use std::net::SocketAddr;

    const CLUSTER: &str = "c";

    fn id(name: &str, generation: u64) -> ChitchatId {
        ChitchatId::new(name.to_owned(), generation, SocketAddr::from(([10, 0, 0, 2], 7400)))
    }

    fn filter() -> GossipFilter {
        GossipFilter::new(Arc::new(SimSeal::new("n1")), CLUSTER, id("n1", 1), 3)
    }

    /// `owner`'s own delta of `(key, payload)` at versions `from+1..`, signed by `signer`.
    fn delta(owner: &ChitchatId, signer: &str, from: u64, keys: &[(&str, &str)]) -> NodeDelta {
        let seal = SimSeal::new(signer);
        NodeDelta {
            id: owner.clone(),
            last_gc_version: 0,
            from_version_excluded: from,
            key_values: keys
                .iter()
                .zip(from + 1..)
                .map(|((key, payload), version)| KeyValue {
                    key: (*key).to_owned(),
                    value: seal_value(&seal, CLUSTER, owner, key, version, payload),
                    version,
                    status: 0,
                })
                .collect(),
            set_max_version: None,
        }
    }

    fn cert_of(name: &str) -> String {
        format!("sim:{name}")
    }

    fn digest(entries: &[(&ChitchatId, u64)]) -> Vec<DigestEntry> {
        entries
            .iter()
            .map(|(id, heartbeat)| DigestEntry {
                id: (*id).clone(),
                heartbeat: *heartbeat,
                last_gc_version: 0,
                max_version: 3,
            })
            .collect()
    }

    fn kept(filter: &mut GossipFilter, message: &Message) -> Message {
        match filter.admit(&gossip_wire::encode(message)) {
            Verdict::Keep => message.clone(),
            Verdict::Rewritten(bytes) => gossip_wire::decode(&bytes).unwrap(),
            Verdict::Drop(error) => panic!("dropped: {error}"),
        }
    }

    #[test]
    fn a_node_enters_with_its_certificate_and_signed_values() {
        let mut filter = filter();
        let n2 = id("n2", 1);
        let cert = cert_of("n2");
        let message = Message::SynAck {
            digest: digest(&[(&n2, 7)]),
            delta: vec![delta(&n2, "n2", 0, &[(CERT_KEY, &cert), ("leaving", "0"), (BEAT_KEY, "5")])],
        };
        assert_eq!(kept(&mut filter, &message), message);
        assert!(filter.knows(&n2));
        // Later values need no certificate in the same message.
        let later = Message::Ack { delta: vec![delta(&n2, "n2", 3, &[("grp:a", "x")])] };
        assert_eq!(kept(&mut filter, &later), later);
    }

    #[test]
    fn an_impersonator_cannot_take_a_newer_generation_or_forge_values() {
        let mut filter = filter();
        let n2 = id("n2", 1);
        let cert = cert_of("n2");
        kept(&mut filter, &Message::Ack { delta: vec![delta(&n2, "n2", 0, &[(CERT_KEY, &cert), ("leaving", "0")])] });
        // n9 copies n2's certificate into a newer generation of n2, at its own address.
        let taken = ChitchatId::new("n2".to_owned(), 2, SocketAddr::from(([10, 0, 0, 9], 7400)));
        let takeover = Message::SynAck {
            digest: digest(&[(&taken, 1_000)]),
            delta: vec![delta(&taken, "n9", 0, &[(CERT_KEY, &cert), ("grp:a", "forged acks")])],
        };
        assert_eq!(kept(&mut filter, &takeover), Message::SynAck { digest: vec![], delta: vec![] });
        assert!(!filter.knows(&taken));
        // A forged value for the real n2, at a version far ahead (it would freeze n2's state).
        let forged = Message::Ack { delta: vec![delta(&n2, "n9", 2, &[("grp:a", "forged acks")])] };
        assert_eq!(kept(&mut filter, &forged), Message::Ack { delta: vec![] });
        // A real value of n2 replayed under another version.
        let mut replayed = delta(&n2, "n2", 2, &[("grp:a", "old")]);
        replayed.key_values[0].version = 50;
        assert_eq!(kept(&mut filter, &Message::Ack { delta: vec![replayed] }), Message::Ack { delta: vec![] });
        // A certificate of another node, a reset, a deletion, a bare max version, news about us.
        let wrong_cert = delta(&id("n3", 1), "n3", 0, &[(CERT_KEY, &cert)]);
        let mut reset = delta(&n2, "n2", 2, &[("grp:a", "x")]);
        reset.last_gc_version = 100;
        let mut deleted = delta(&n2, "n2", 2, &[("grp:a", "x")]);
        deleted.key_values[0].status = 1;
        let mut bare = delta(&n2, "n2", 2, &[]);
        bare.set_max_version = Some(1_000);
        let about_us = delta(&id("n1", 1), "n1", 5, &[("leaving", "1")]);
        for node in [wrong_cert, reset, deleted, bare, about_us] {
            assert_eq!(kept(&mut filter, &Message::Ack { delta: vec![node] }), Message::Ack { delta: vec![] });
        }
        assert_eq!(filter.stats().node_deltas_forged.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn digests_name_only_verified_nodes_and_heartbeats_stay_near_the_signed_beat() {
        let mut filter = filter();
        let n2 = id("n2", 1);
        let stranger = id("n7", 1);
        let cert = cert_of("n2");
        kept(&mut filter, &Message::Ack { delta: vec![delta(&n2, "n2", 0, &[(CERT_KEY, &cert), (BEAT_KEY, "40")])] });
        let syn = Message::Syn {
            digest: digest(&[(&id("n1", 1), 3), (&n2, u64::MAX / 2), (&stranger, 9)]),
            cluster_id: CLUSTER.into(),
        };
        let Message::Syn { digest: kept_digest, .. } = kept(&mut filter, &syn) else { panic!() };
        let kept_ids: Vec<_> = kept_digest.iter().map(|entry| (&*entry.id.node_id, entry.heartbeat)).collect();
        assert_eq!(kept_ids, [("n1", 3), ("n2", 40 + HEARTBEAT_AHEAD_MAX)]);
        // An honest heartbeat passes untouched.
        let honest = Message::Syn { digest: digest(&[(&n2, 90)]), cluster_id: CLUSTER.into() };
        assert_eq!(filter.admit(&gossip_wire::encode(&honest)), Verdict::Keep);
    }

    #[test]
    fn new_node_ids_stop_at_the_cap_and_old_generations_give_way() {
        let mut filter = filter();
        for name in ["n2", "n3", "n4", "n5"] {
            let node = id(name, 1);
            kept(&mut filter, &Message::Ack { delta: vec![delta(&node, name, 0, &[(CERT_KEY, &cert_of(name))])] });
        }
        assert!(filter.knows(&id("n4", 1)));
        assert!(!filter.knows(&id("n5", 1)), "past the cap of 3 node ids");
        assert_eq!(filter.stats().nodes_over_cap.load(Ordering::Relaxed), 1);
        for generation in 2..=3 {
            filter.set_clock(generation * NEW_GENERATION_INTERVAL_MS);
            filter.observe_held(3);
            let node = id("n2", generation);
            kept(&mut filter, &Message::Ack { delta: vec![delta(&node, "n2", 0, &[(CERT_KEY, &cert_of("n2"))])] });
        }
        assert!(filter.knows(&id("n2", 3)) && filter.knows(&id("n2", 2)) && !filter.knows(&id("n2", 1)));
    }

    #[test]
    fn generations_only_rise_and_not_too_fast() {
        let mut filter = filter();
        let admit = |filter: &mut GossipFilter, generation: u64| {
            let node = id("n2", generation);
            kept(filter, &Message::Ack { delta: vec![delta(&node, "n2", 0, &[(CERT_KEY, &cert_of("n2"))])] });
            filter.knows(&node)
        };
        assert!(admit(&mut filter, 5));
        assert!(!admit(&mut filter, 4), "an older generation (a replay) is refused");
        assert!(admit(&mut filter, 6), "a restart right after: the burst allows it");
        assert!(!admit(&mut filter, 7), "a third generation at once is refused");
        filter.set_clock(NEW_GENERATION_INTERVAL_MS);
        assert!(admit(&mut filter, 7), "and let in once the interval passed");
        // Chitchat at the cap (3 here): a new node id is refused.
        filter.observe_held(3);
        let n9 = id("n9", 1);
        kept(&mut filter, &Message::Ack { delta: vec![delta(&n9, "n9", 0, &[(CERT_KEY, &cert_of("n9"))])] });
        assert!(!filter.knows(&n9));
    }

    #[test]
    fn nodes_chitchat_forgot_leave_room_for_new_ones() {
        let mut filter = filter();
        for name in ["n2", "n3", "n4"] {
            let node = id(name, 1);
            kept(&mut filter, &Message::Ack { delta: vec![delta(&node, name, 0, &[(CERT_KEY, &cert_of(name))])] });
        }
        // Just admitted: kept even if chitchat does not hold them yet.
        filter.forget_unheld(|_| false);
        assert!(filter.knows(&id("n2", 1)));
        // Long after, n2 and n3 are gone from chitchat; n4 is still held.
        let quiet = gossip_wire::encode(&Message::Syn { digest: vec![], cluster_id: CLUSTER.into() });
        for _ in 0..FORGET_AFTER_MESSAGES {
            filter.admit(&quiet);
        }
        filter.forget_unheld(|held| &*held.node_id == "n4");
        filter.observe_held(1);
        assert!(!filter.knows(&id("n2", 1)) && !filter.knows(&id("n3", 1)) && filter.knows(&id("n4", 1)));
        let n5 = id("n5", 1);
        kept(&mut filter, &Message::Ack { delta: vec![delta(&n5, "n5", 0, &[(CERT_KEY, &cert_of("n5"))])] });
        assert!(filter.knows(&n5), "room was made under the cap of 3");
    }

    #[test]
    fn the_generations_of_node_ids_long_gone_are_forgotten_past_a_bound() {
        let mut gossip = filter();
        gossip.forgotten_ids_max = 2;
        let admit = |filter: &mut GossipFilter, name: &str, generation: u64| {
            let node = id(name, generation);
            kept(filter, &Message::Ack { delta: vec![delta(&node, name, 0, &[(CERT_KEY, &cert_of(name))])] });
            filter.knows(&node)
        };
        // Five nodes come and go, one at a time (chitchat holds one at most: the cap of 3 never
        // refuses them); the filter then forgets their certificates.
        let quiet = gossip_wire::encode(&Message::Syn { digest: vec![], cluster_id: CLUSTER.into() });
        for (at, name) in ["n2", "n3", "n4", "n5", "n6"].into_iter().enumerate() {
            gossip.set_clock(at as u64 * 1_000);
            assert!(admit(&mut gossip, name, 7));
            gossip.observe_held(1);
            for _ in 0..FORGET_AFTER_MESSAGES {
                gossip.admit(&quiet);
            }
            gossip.forget_unheld(|_| false);
        }
        // The two gone last are remembered (an old generation of theirs is still refused); the
        // three before are forgotten.
        assert_eq!(gossip.generations.keys().map(String::as_str).collect::<Vec<_>>(), ["n5", "n6"]);
        assert!(!admit(&mut gossip, "n6", 6), "a replayed generation of a recent id is refused");
        // A held node id is never forgotten, whatever its age.
        let mut filter_held = filter();
        filter_held.forgotten_ids_max = 0;
        assert!(admit(&mut filter_held, "n2", 1));
        filter_held.forget_unheld(|_| true);
        assert!(filter_held.generations.contains_key("n2"));
    }

    #[test]
    fn what_is_not_a_chitchat_message_is_dropped() {
        let mut filter = filter();
        assert!(matches!(filter.admit(b"\x53\xb0\x00\x09"), Verdict::Drop(_)));
        assert_eq!(filter.stats().messages_undecodable.load(Ordering::Relaxed), 1);
    }
}
