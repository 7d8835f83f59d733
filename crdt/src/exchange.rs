//! Change exchange between replicas: export changes since given heads, apply remote changes in
//! bounded batches, the Automerge sync protocol per peer, and a compact heads digest for gossip.
//!
//! Remote bytes are decoded completely before anything is applied, so garbage never leaves a
//! document half-changed. Decoded changes go to Automerge [`APPLY_BATCH_CHANGES_MAX`] at a time
//! (FACTS: one large batch exploded memory), and the read view follows the ops of the changes each batch added.

use std::collections::BTreeSet;
use std::fmt;

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash};
use sha2::{Digest, Sha256};

use crate::error::RemoteError;
use crate::group::{GroupDoc, KeyState};
use crate::limits::{APPLY_BATCH_CHANGES_MAX, CHANGE_BYTES_MAX, SYNC_MESSAGE_BYTES_MAX};
use crate::settings::hex;
use crate::shield::shielded;
use crate::version::VersionId;

/// What applying remote changes did to this replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteApplied {
    /// Changes that were new to this document (duplicates are not counted).
    pub changes_applied: usize,
    /// Settings keys whose served value changed (set, replaced or removed).
    pub changed_keys: BTreeSet<String>,
    /// Versions that became known.
    pub new_versions: Vec<VersionId>,
    /// Raw bytes of every change that became part of the document (including queued changes
    /// whose dependencies just arrived): what the node must persist before acknowledging.
    pub new_changes: Vec<Vec<u8>>,
}

impl RemoteApplied {
    /// True when the document gained nothing.
    pub fn is_empty(&self) -> bool {
        self.changes_applied == 0
    }

    fn absorb(&mut self, other: RemoteApplied) {
        self.changes_applied += other.changes_applied;
        self.changed_keys.extend(other.changed_keys);
        self.new_versions.extend(other.new_versions);
        self.new_changes.extend(other.new_changes);
    }
}

/// A remote apply that stopped at an error. Changes applied before it stay applied (Automerge
/// cannot take them back) and are listed in `applied`: the caller persists, counts and
/// announces them like any apply, then drops the rest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct ApplyFailure {
    /// What was applied before the error (often nothing).
    pub applied: RemoteApplied,
    /// What went wrong.
    pub error: RemoteError,
}

impl From<RemoteError> for ApplyFailure {
    fn from(error: RemoteError) -> ApplyFailure {
        ApplyFailure { applied: RemoteApplied::default(), error }
    }
}

impl From<ApplyFailure> for RemoteError {
    fn from(failure: ApplyFailure) -> RemoteError {
        failure.error
    }
}

/// A short digest of a document's heads, carried in gossip so peers can tell cheaply whether
/// they hold the same state: the first 8 bytes of SHA-256 over the sorted heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HeadsDigest(pub [u8; 8]);

impl HeadsDigest {
    /// Digest of `heads` (any order).
    pub fn of(heads: &[ChangeHash]) -> HeadsDigest {
        let mut sorted = heads.to_vec();
        sorted.sort();
        let mut hasher = Sha256::new();
        for head in &sorted {
            hasher.update(head.0);
        }
        let full: [u8; 32] = hasher.finalize().into();
        let mut digest = [0u8; 8];
        digest.copy_from_slice(&full[..8]);
        HeadsDigest(digest)
    }

    /// Parses the 16-hex-digit form.
    pub fn from_hex(text: &str) -> Option<HeadsDigest> {
        let bytes = crate::settings::unhex(text)?;
        Some(HeadsDigest(bytes.try_into().ok()?))
    }
}

impl fmt::Display for HeadsDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// Sync protocol state for one (peer, group) pair. Persist it with [`SyncPeer::encode`]
/// (FACTS: with saved state a one-change sync moved 525 B, with a fresh state 25 KB).
#[derive(Debug, Default)]
pub struct SyncPeer {
    state: sync::State,
}

impl SyncPeer {
    /// A fresh state, for a peer never synced with.
    pub fn new() -> SyncPeer {
        SyncPeer::default()
    }

    /// The persistable part of the state.
    pub fn encode(&self) -> Vec<u8> {
        self.state.encode()
    }

    /// Restores a persisted state.
    pub fn decode(bytes: &[u8]) -> Result<SyncPeer, RemoteError> {
        let state = shielded("sync state", || sync::State::decode(bytes).map_err(|e| e.to_string()))?;
        Ok(SyncPeer { state })
    }

    /// Forgets in-flight bookkeeping after the stream to this peer broke: the next message is
    /// then generated as for a reconnect, which the protocol needs after lost messages
    /// (FACTS: automerge #772, #1284).
    pub fn reset_after_disconnect(&mut self) {
        let persisted = self.state.encode();
        self.state = sync::State::decode(&persisted).unwrap_or_default();
    }
}

/// Automerge storage chunks begin with these bytes.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_TYPE_DOCUMENT: u8 = 0;

/// Splits concatenated Automerge chunks (as a sync message carries them) into single chunks.
fn split_chunks(mut bytes: &[u8]) -> Result<Vec<&[u8]>, RemoteError> {
    let malformed = |detail: &str| RemoteError::Malformed { what: "sync message", detail: detail.to_owned() };
    let mut chunks = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 9 || bytes[..4] != CHUNK_MAGIC {
            return Err(malformed("change chunk without Automerge magic bytes"));
        }
        let mut length: u64 = 0;
        let mut position = 9;
        let mut shift = 0;
        loop {
            let byte = *bytes.get(position).ok_or_else(|| malformed("truncated chunk length"))?;
            position += 1;
            if shift > 63 {
                return Err(malformed("chunk length overflows"));
            }
            length |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let end = usize::try_from(length)
            .ok()
            .and_then(|length| position.checked_add(length))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| malformed("chunk longer than the message"))?;
        chunks.push(&bytes[..end]);
        bytes = &bytes[end..];
    }
    Ok(chunks)
}

/// Decodes raw change bytes, refusing anything over the size limit or not a change.
pub fn decode_change(bytes: &[u8]) -> Result<Change, RemoteError> {
    if bytes.len() > CHANGE_BYTES_MAX {
        return Err(RemoteError::TooLarge { what: "change", bytes: bytes.len(), max: CHANGE_BYTES_MAX });
    }
    // Automerge trusts the row counts a change's columns declare (2 GB from 130 bytes).
    crate::change_bounds::check_change(bytes)?;
    shielded("change", || Change::try_from(bytes).map_err(|e| e.to_string()))
}

impl GroupDoc {
    /// The digest of the current heads, for gossip.
    pub fn heads_digest(&self) -> HeadsDigest {
        HeadsDigest::of(&self.doc.get_heads())
    }

    /// True when this document contains the change `hash` (applied; a change waiting in
    /// Automerge's queue for a dependency is not contained).
    ///
    /// Asked for every dependency of every pushed change and for the heads of every lease grant
    /// at each batch, so it must be cheap: Automerge's `get_change_meta_by_hash` decodes the
    /// change's metadata to answer (5-6% of a daemon's thread under sequential writes, issue 14).
    /// The window of recent changes answers most questions. Otherwise Automerge's missing
    /// dependencies of `[hash]`, which also name those of its queue: none means nothing is
    /// queued and the change is applied (a queued change always leads back to one that is
    /// neither applied nor queued, since Automerge applies what becomes ready); naming `hash`
    /// means it is neither applied nor queued. Only with something queued and `hash` not named
    /// (applied, or queued itself) does the metadata lookup decide (found in review: the
    /// missing dependencies alone read an applied change as absent while anything was queued).
    pub fn has_change(&self, hash: &ChangeHash) -> bool {
        use automerge::ReadDoc as _;
        let held = self.recent.contains(hash) || {
            let missing = self.doc.get_missing_deps(std::slice::from_ref(hash));
            missing.is_empty() || (!missing.contains(hash) && self.doc.get_change_meta_by_hash(hash).is_some())
        };
        // The answer rests on how Automerge 0.12 keeps its queue: checked against the metadata
        // lookup in debug builds, so an upgrade that changes it fails the tests.
        debug_assert_eq!(held, self.doc.get_change_meta_by_hash(hash).is_some(), "has_change({hash})");
        held
    }

    /// The raw bytes of every change not reachable from `heads`. Heads this document does not
    /// know are ignored, so the answer is a superset of what the peer lacks (duplicates are
    /// harmless: applying is idempotent).
    pub fn changes_since(&self, heads: &[ChangeHash]) -> Vec<Vec<u8>> {
        let known: Vec<ChangeHash> = heads.iter().copied().filter(|h| self.has_change(h)).collect();
        self.doc.get_changes(&known).into_iter().map(|change| change.raw_bytes().to_vec()).collect()
    }

    /// Applies remote changes given as raw bytes. All are decoded before any is applied: a
    /// malformed one refuses the whole call with nothing changed. An error from Automerge
    /// during the apply reports what was applied before it ([`ApplyFailure`]).
    pub fn apply_changes<B: AsRef<[u8]>>(&mut self, changes: &[B]) -> Result<RemoteApplied, ApplyFailure> {
        let decoded = changes.iter().map(|bytes| decode_change(bytes.as_ref())).collect::<Result<Vec<_>, _>>()?;
        self.apply_changes_decoded(decoded)
    }

    /// Applies decoded changes in bounded batches, then follows the ops of every change added.
    pub(crate) fn apply_changes_decoded(&mut self, changes: Vec<Change>) -> Result<RemoteApplied, ApplyFailure> {
        let mut total = RemoteApplied::default();
        let fresh: Vec<Change> = changes.into_iter().filter(|c| !self.has_change(&c.hash())).collect();
        for batch in fresh.chunks(APPLY_BATCH_CHANGES_MAX) {
            let before = self.doc.get_heads();
            let exactly_the_batch = !self.has_missing_deps() && self.applies_as_given(batch);
            // No patch log: Automerge's patches cost about 4x the apply itself (make_patches,
            // 130 µs of a 160 µs apply on a 1,000-key group), and the ops of the changes say
            // everything the derived state needs.
            let result = self.doc.apply_changes(batch.iter().cloned());
            if self.doc.get_heads() != before {
                // Not just this batch in general: changes Automerge had queued for missing
                // dependencies may apply now too, and every added change must be persisted and
                // counted. (Taking the batch alone lost a queued change in a simulator sweep
                // with duplicated frames: applied, never written, never re-sent.) With nothing
                // queued and every dependency in place, what was added is the batch, in its
                // order; asking Automerge walks from the heads (5% of a daemon's thread under
                // 16 writers, issue 14).
                let added =
                    if exactly_the_batch && result.is_ok() { batch.to_vec() } else { self.doc.get_changes(&before) };
                for change in &added {
                    self.recent.push(change.hash(), change.deps().to_vec());
                }
                total.absorb(self.follow_changes(&added));
                total.changes_applied += added.len();
                total.new_changes.extend(added.iter().map(|change| change.raw_bytes().to_vec()));
            }
            if let Err(error) = result {
                let error = RemoteError::Rejected { detail: error.to_string() };
                return Err(ApplyFailure { applied: total, error });
            }
        }
        debug_assert!(
            self.settings().len() > 512 || self.derived_state_matches_document(),
            "read view diverged from the document after a remote apply"
        );
        Ok(total)
    }

    /// Whether Automerge applies `changes` one after the other as given: each is new, appears
    /// once, and depends only on changes in the document or earlier in the list.
    fn applies_as_given(&self, changes: &[Change]) -> bool {
        let mut earlier = BTreeSet::new();
        changes.iter().all(|change| {
            let ready = change.deps().iter().all(|dep| earlier.contains(dep) || self.has_change(dep));
            ready && !self.has_change(&change.hash()) && earlier.insert(change.hash())
        })
    }

    /// Updates the read view, the conflict set, the register index and the version index from
    /// the ops of changes just added to the document.
    ///
    /// The ops say which keys were touched (an op on `settings`, or on a key's register); the
    /// served value and the conflict state of each touched key are then read back from the
    /// document, so the order of the changes and what else the document holds do not matter.
    fn follow_changes(&mut self, added: &[Change]) -> RemoteApplied {
        let mut applied = RemoteApplied::default();
        let mut touched = BTreeSet::new();
        let (mut configuration, mut format, mut schema) = (false, false, false);
        for change in added {
            let expanded = change.decode();
            let actor = change.actor_id();
            for (index, op) in expanded.operations.iter().enumerate() {
                let automerge::legacy::Key::Map(key) = &op.key else { continue };
                let object = match &op.obj {
                    automerge::legacy::ObjectId::Root => {
                        configuration |= key.as_str() == crate::group::CONFIGURATION_KEY;
                        format |= key.as_str() == "format";
                        schema |= key.as_str() == crate::group::SCHEMA_KEY;
                        continue;
                    }
                    automerge::legacy::ObjectId::Id(id) => (id.0, &id.1),
                };
                if object_is(&self.objects.settings, object) {
                    if matches!(op.action, automerge::legacy::OpType::Make(automerge::ObjType::Map)) {
                        let op_counter = change.start_op().get() + index as u64;
                        self.registers.insert((op_counter, actor.clone()), key.to_string());
                    }
                    touched.insert(key.to_string());
                } else if object_is(&self.objects.versions, object) {
                    if let automerge::legacy::OpType::Put(automerge::ScalarValue::Str(text)) = &op.action {
                        self.index_version_of(key, text, change.hash());
                        if let Some(id) = VersionId::from_storage_key(key).filter(|id| self.has_version(id)) {
                            applied.new_versions.push(id);
                        }
                    }
                } else if let Some(setting) = self.registers.get(&(object.0, object.1.clone())) {
                    touched.insert(setting.clone());
                }
            }
        }
        if configuration {
            self.configuration = crate::group::read_configuration(&self.doc);
        }
        if schema {
            self.schema = crate::group::read_schema(&self.doc);
        }
        if format {
            // Another node converted the document (`write_plan`); never move backwards.
            self.format = self.format.max(crate::group::read_format(&self.doc));
        }
        for key in touched {
            let before = self.view.entry(&key).map(|entry| entry.canonical.clone());
            self.refresh_key(&key);
            if self.view.entry(&key).map(|entry| &entry.canonical) != before.as_ref() {
                applied.changed_keys.insert(key);
            }
        }
        applied
    }

    /// Reads one settings key back from the document into the read view and conflict set.
    fn refresh_key(&mut self, key: &str) {
        let conflict = match crate::group::read_key(&self.doc, &self.objects.settings, key, None) {
            KeyState::Absent => {
                self.view.remove(key);
                self.invalid.remove(key);
                false
            }
            KeyState::Invalid { conflict } => {
                self.view.remove(key);
                self.invalid.insert(key.to_owned());
                conflict
            }
            KeyState::Value { value, conflict } => {
                self.invalid.remove(key);
                self.view.insert(key.to_owned(), value);
                conflict
            }
        };
        if conflict {
            self.conflicted.insert(key.to_owned());
        } else {
            self.conflicted.remove(key);
        }
    }

    fn has_version(&self, id: &VersionId) -> bool {
        self.versions.contains_key(id)
    }

    /// The next sync message for `peer`, or `None` when there is nothing to say yet.
    pub fn sync_message(&self, peer: &mut SyncPeer) -> Option<Vec<u8>> {
        self.doc.generate_sync_message(&mut peer.state).map(sync::Message::encode)
    }

    /// Receives a sync message from `peer`. Changes it carries are decoded first and applied in
    /// bounded batches; then the protocol state advances. Malformed bytes change nothing.
    pub fn receive_sync_message(&mut self, peer: &mut SyncPeer, bytes: &[u8]) -> Result<RemoteApplied, ApplyFailure> {
        if bytes.len() > SYNC_MESSAGE_BYTES_MAX {
            return Err(RemoteError::TooLarge {
                what: "sync message",
                bytes: bytes.len(),
                max: SYNC_MESSAGE_BYTES_MAX,
            }
            .into());
        }
        let message = shielded("sync message", || sync::Message::decode(bytes).map_err(|e| e.to_string()))?;
        // A peer that asks for a change this node already sent it did not keep it (a failed
        // write dropped it there): send everything again. Automerge skips what it counts as
        // sent, and the two would trade sync messages without end, none carrying the change
        // (found by the daemon's in-process tests).
        if message.need.iter().any(|hash| peer.state.sent_hashes.contains(hash)) {
            peer.state.sent_hashes.clear();
        }
        let mut decoded = Vec::new();
        for carried in message.changes.iter() {
            for chunk in split_chunks(carried)? {
                if chunk[8] == CHUNK_TYPE_DOCUMENT {
                    // A far-behind peer is sent a whole document: load it aside, take what we lack.
                    crate::change_bounds::check_document(chunk)?;
                    let other = shielded("sync message", || Automerge::load(chunk).map_err(|e| e.to_string()))?;
                    decoded.extend(self.doc.get_changes_added(&other));
                } else {
                    decoded.push(decode_change(chunk)?);
                }
            }
        }
        let applied = self.apply_changes_decoded(decoded)?;
        let rest = sync::Message { changes: sync::ChunkList::empty(), ..message };
        if let Err(error) = self.doc.receive_sync_message(&mut peer.state, rest) {
            return Err(ApplyFailure { applied, error: RemoteError::Rejected { detail: error.to_string() } });
        }
        Ok(applied)
    }
}

/// True when `object` (an op's object as a change names it: counter and actor) is `id`.
fn object_is(id: &automerge::ObjId, object: (u64, &automerge::ActorId)) -> bool {
    matches!(id, automerge::ObjId::Id(counter, actor, _) if *counter == object.0 && actor == object.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing (issue 12): a change that made Automerge allocate over 2 GB is refused
    /// by the one door every outside change takes, before Automerge sees it.
    #[test]
    fn regression_a_change_declaring_billions_of_predecessors_is_refused() {
        let bytes = crate::change_bounds::tests::billions_of_predecessors();
        assert!(matches!(decode_change(&bytes), Err(RemoteError::TooLarge { .. } | RemoteError::Malformed { .. })));
    }

    /// Found by fuzzing (issue 12): 32 bytes on which Automerge 0.12's change decoder panics
    /// (an unwrap in hexane's RLE decoder). Refused as malformed, like any other garbage.
    #[test]
    fn regression_a_change_that_panics_automerges_decoder_is_refused() {
        let bytes = [
            0x85, 0x6f, 0x4a, 0x83, 0xff, 0x00, 0x28, 0x4a, 0x03, 0x0b, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x23, 0x01,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x44, 0x02, 0x00, 0x00, 0x00, 0x00, 0x29, 0x00,
        ];
        assert!(matches!(decode_change(&bytes), Err(RemoteError::Malformed { what: "change", .. })));
    }

    #[test]
    fn heads_digest_ignores_order_and_round_trips() {
        let a = ChangeHash([1; 32]);
        let b = ChangeHash([2; 32]);
        assert_eq!(HeadsDigest::of(&[a, b]), HeadsDigest::of(&[b, a]));
        assert_ne!(HeadsDigest::of(&[a]), HeadsDigest::of(&[b]));
        let digest = HeadsDigest::of(&[a]);
        assert_eq!(HeadsDigest::from_hex(&digest.to_string()), Some(digest));
    }

    #[test]
    fn split_chunks_refuses_garbage() {
        assert!(split_chunks(b"garbage bytes here").is_err());
        let mut truncated = CHUNK_MAGIC.to_vec();
        truncated.extend([0, 0, 0, 0, 1, 0x10, 1, 2]);
        assert!(split_chunks(&truncated).is_err());
        assert_eq!(split_chunks(&[]).unwrap().len(), 0);
    }
}
