//! Fencing with a proof (SPEC F12): a strong-group member serves reads as fresh only while it
//! can show that it holds the latest commit of its configuration.
//!
//! Every member asks the other members of its configuration for a read lease every
//! [`LEASE_RENEW_MS`]. A granter answers with its configuration number, its heads and the round
//! it holds in doubt, and promises not to vote for the requester's removal for [`LEASE_MS`] plus
//! [`LEASE_MARGIN_MS`] on its own clock. The requester is fresh while grants it asked for less
//! than [`LEASE_MS`] ago (on its own clock) come from a majority of its configuration (itself
//! included), each in the same configuration and holding nothing this node lacks, and while it
//! is not in doubt itself. Why that suffices: every later commit needs this node's own staged
//! yes (it is in doubt until it learns the outcome), and removing it from the configuration
//! needs a majority, which includes a granter that refuses while the lease runs; a restart, a
//! pause or a cut-off lets the lease lapse. docs/protocol.md ("Fencing") has the details.

use std::collections::BTreeMap;

use automerge::ChangeHash;

use super::round::Round;
use super::{NodeId, Output, Replica};
use crate::group::{GroupDoc, Mode};
use crate::limits::{LEASE_MARGIN_MS, LEASE_MS, LEASE_RENEW_MS, REJOIN_RETRY_MS};
use crate::peer_message::{PeerMessage, RoundId, RoundOutcome};
use crate::time::Millis;

/// A grant this node received.
#[derive(Debug, Clone)]
pub(super) struct Grant {
    /// When this node asked (its own clock).
    sent: Millis,
    configuration: u64,
    heads: Vec<ChangeHash>,
    staged: Option<(RoundId, ChangeHash)>,
}

/// What a strong group keeps for leases, configuration upkeep and amnesia.
#[derive(Debug, Default)]
pub(super) struct StrongState {
    /// The latest grant from each member.
    grants: BTreeMap<NodeId, Grant>,
    /// Promises this node gave: no vote for the holder's removal before this time.
    pub(super) granted: BTreeMap<NodeId, Millis>,
    /// When to ask for leases next.
    next_lease_request: Millis,
    /// Earliest time for the next configuration change this node starts on its own (eviction,
    /// joining): backs off after a failed attempt.
    pub(super) next_reconfigure: Millis,
    /// A join command waiting until this node is in the configuration, with its deadline.
    pub(super) joining: Option<(super::CommandId, Millis)>,
    /// Set when this node lost records of the group (a damaged file, a repair): the heads it
    /// had then. Until its document moves past them it cannot tell "never staged" from
    /// "forgot", so it answers questions about unknown rounds with `Unknown`.
    pub(super) amnesic_at: Option<Vec<ChangeHash>>,
}

impl StrongState {
    /// A failed upkeep attempt: wait before the next one.
    pub(super) fn backoff(&mut self, now: Millis) {
        self.next_reconfigure = Millis(now.0 + REJOIN_RETRY_MS);
    }

    /// True while this node may have lost records of rounds at its current position.
    pub(super) fn is_amnesic(&self, doc: &GroupDoc) -> bool {
        self.amnesic_at.as_ref().is_some_and(|heads| {
            let mut current = doc.heads();
            current.sort();
            current == *heads
        })
    }

    /// Forgets the amnesia once the document moved past the position where it began (every
    /// round at or before it is decided: a later change is final).
    pub(super) fn settle_amnesia(&mut self, doc: &GroupDoc) {
        if self.amnesic_at.is_some() && !self.is_amnesic(doc) {
            self.amnesic_at = None;
        }
    }
}

impl Replica {
    /// Asks the other members of each strong group this node belongs to for a read lease.
    pub(super) fn renew_leases(&mut self) {
        let now = self.now;
        let node_id = self.node_id.clone();
        let mut sends = Vec::new();
        for (name, state) in self.groups.iter_mut() {
            if state.doc.mode() != Mode::Strong || state.strong.next_lease_request > now {
                continue;
            }
            let Some(configuration) = state.doc.configuration() else { continue };
            if !configuration.contains(&node_id) || configuration.members.len() < 2 {
                continue;
            }
            state.strong.next_lease_request = Millis(now.0 + LEASE_RENEW_MS);
            for member in configuration.members.iter().filter(|m| **m != node_id) {
                sends.push((member.clone(), PeerMessage::LeaseRequest { group: name.clone(), sent: now.0 }));
            }
        }
        for (to, message) in sends {
            self.outputs.push_back(Output::Send { to, message });
        }
    }

    /// When the next lease request is due, for `poll_timeout`.
    pub(super) fn next_lease_request(&self) -> Option<Millis> {
        self.groups
            .values()
            .filter(|state| state.doc.mode() == Mode::Strong)
            .filter(|state| state.doc.configuration().is_some_and(|c| c.contains(&self.node_id) && c.members.len() > 1))
            .map(|state| state.strong.next_lease_request)
            .min()
    }

    /// A member asks this node for a read lease: promise, and say what this node holds.
    pub(super) fn handle_lease_request(&mut self, group: &str, from: NodeId, sent: u64) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        if state.doc.mode() != Mode::Strong {
            return;
        }
        let until = Millis(now.0 + LEASE_MS + LEASE_MARGIN_MS);
        let promise = state.strong.granted.entry(from.clone()).or_insert(until);
        *promise = (*promise).max(until);
        let staged =
            state.round.as_ref().and_then(|round| round.staged_change().map(|hash| (round.id().clone(), hash.0)));
        let message = PeerMessage::LeaseGrant {
            group: group.to_owned(),
            sent,
            configuration: state.doc.configuration().map_or(0, |c| c.number),
            heads: state.doc.heads().iter().map(|h| h.0).collect(),
            staged,
        };
        self.outputs.push_back(Output::Send { to: from, message });
    }

    /// A member granted this node a read lease.
    pub(super) fn handle_lease_grant(
        &mut self,
        group: &str,
        from: NodeId,
        sent: u64,
        configuration: u64,
        heads: Vec<[u8; 32]>,
        staged: Option<(RoundId, [u8; 32])>,
    ) {
        let now = self.now;
        let Some(state) = self.groups.get_mut(group) else { return };
        if sent > now.0 {
            return;
        }
        let grant = Grant {
            sent: Millis(sent),
            configuration,
            heads: heads.into_iter().map(ChangeHash).collect(),
            staged: staged.map(|(round, hash)| (round, ChangeHash(hash))),
        };
        match state.strong.grants.get(&from) {
            Some(existing) if existing.sent > grant.sent => {}
            _ => {
                state.strong.grants.insert(from, grant);
            }
        }
    }

    /// True when reads of `group` must be flagged stale (SPEC F12).
    pub fn is_fenced(&self, group: &str) -> bool {
        self.fencing_reason(group).is_some()
    }

    /// Why reads of a strong group are stale here, or `None` when this node can show it holds
    /// the latest commit of its configuration. Eventual groups are never fenced.
    pub fn fencing_reason(&self, group: &str) -> Option<String> {
        self.freshness(group).err()
    }

    /// Whether reads of `group` are fresh: `Ok(until)` with the time the proof lapses (`None`:
    /// it does not lapse, as for an eventual group or a configuration of one), or `Err` with why
    /// they are stale.
    pub fn freshness(&self, group: &str) -> Result<Option<Millis>, String> {
        let Some(state) = self.groups.get(group) else { return Ok(None) };
        if state.doc.mode() != Mode::Strong {
            return Ok(None);
        }
        let Some(configuration) = state.doc.configuration() else {
            return Err("the group has no configuration (created by an older konord)".to_owned());
        };
        if !configuration.contains(&self.node_id) {
            return Err(format!(
                "this node is not a member of configuration {configuration}; it catches up and rejoins"
            ));
        }
        if let Some(round) = state.round.as_ref().filter(|round| round.in_doubt()) {
            return Err(format!("in doubt about round {} until its decision arrives", round.id()));
        }
        if configuration.members.len() == 1 {
            return Ok(None);
        }
        let now = self.now;
        // When each current grant lapses; this node's own counts without one.
        let mut lapses: Vec<u64> = configuration
            .members
            .iter()
            .filter(|member| **member != self.node_id)
            .filter_map(|member| {
                let grant = state.strong.grants.get(member)?;
                let valid = grant.sent.0 + LEASE_MS > now.0
                    && grant.configuration == configuration.number
                    && grant.heads.iter().all(|head| state.doc.has_change(head))
                    // The granter's round in doubt: held here, or known aborted. One known
                    // committed whose change is not here shows this node behind (chaos seed
                    // 336: a node that lost a staged commit but remembered its decision).
                    && grant.staged.as_ref().is_none_or(|(round, hash)| {
                        state.doc.has_change(hash) || state.final_outcome(round) == Some(RoundOutcome::Aborted)
                    });
                valid.then_some(grant.sent.0 + LEASE_MS)
            })
            .collect();
        let needed = configuration.majority() - 1;
        if lapses.len() < needed {
            return Err(format!(
                "no current read lease from a majority of configuration {configuration} ({} of {} needed): just started, resumed, cut off from the others, or behind them",
                lapses.len() + 1,
                configuration.majority()
            ));
        }
        // Fresh while `needed` grants hold: until the needed-th latest one lapses.
        lapses.sort_unstable_by(|a, b| b.cmp(a));
        Ok(lapses.get(needed.saturating_sub(1)).map(|at| Millis(*at)).filter(|_| needed > 0))
    }

    /// True when this node's failure detector holds `node` dead (unknown is not dead).
    pub(super) fn peer_is_dead(&self, node: &str) -> bool {
        self.membership.peers.get(node).is_some_and(|peer| peer.liveness == super::PeerLiveness::Dead)
    }

    /// Keeps track of when peers were first seen dead, for evictions.
    pub(super) fn track_dead_peers(&mut self) {
        let now = self.now;
        let dead: Vec<NodeId> = self
            .membership
            .peers
            .iter()
            .filter(|(_, peer)| peer.liveness == super::PeerLiveness::Dead)
            .map(|(node, _)| node.clone())
            .collect();
        self.dead_since.retain(|node, _| dead.contains(node));
        for node in dead {
            self.dead_since.entry(node).or_insert(now);
        }
    }

    /// Whether a member's seat is no longer held: dead longer than `evict_after` here, or it
    /// announced in gossip that it left the group.
    pub(super) fn seat_abandoned(&self, group: &str, node: &str, evict_after: Millis) -> bool {
        let left = self.membership.peers.get(node).is_some_and(|peer| peer.left.contains(group));
        let dead_long = self.dead_since.get(node).is_some_and(|since| since.0 + evict_after.0 <= self.now.0);
        left || dead_long
    }

    /// Rounds that are in doubt or coordinated here, for the shell's view.
    pub(super) fn round_in_doubt(&self, group: &str) -> bool {
        self.groups.get(group).and_then(|s| s.round.as_ref()).is_some_and(Round::in_doubt)
    }
}
