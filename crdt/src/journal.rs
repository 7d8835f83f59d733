//! Group files as pure functions: what to write for a snapshot or an appended change, how to
//! rebuild a group from a file's bytes, and when to compact. The file I/O (append, fsync,
//! atomic rename) lives in the node's store; this module never touches a disk.
//!
//! A group file is a header, one snapshot record (an Automerge save: `SnapshotZstd`, or
//! `Snapshot` in files written before issue 14), then `Change` records
//! (one Automerge change each) and `Meta` records (node metadata, opaque here). Compaction
//! writes a new file holding only a fresh snapshot and the last meta record.

use std::borrow::Cow;

use automerge::{ActorId, Automerge};

use crate::configuration::Configuration;
use crate::error::LoadError;
use crate::exchange::decode_change;
use crate::group::GroupDoc;
use crate::limits::{COMPACT_TAIL_CHANGES_MAX, COMPACT_TAIL_FRACTION, DOCUMENT_INFLATED_BYTES_MAX};
use crate::peer_message::{Ballot, RoundId, RoundKind};
use crate::record::{DropReason, Dropped, RecordKind, RecordTooLarge, encode_header, encode_record, scan_records};

/// A whole compacted file: header, a snapshot of `group`, and optionally a meta record.
/// Refused when the snapshot outgrew the record limit (the group then needs an epoch switch).
pub fn snapshot_file(group: &GroupDoc, meta: Option<&[u8]>) -> Result<Vec<u8>, RecordTooLarge> {
    // Automerge's own save deflates every column at the default level: 11-20 ms for 10k
    // versions of a 1,000-key group, most of a compaction, on the daemon's thread. Saved
    // without it (1.6-2.2 ms) and compressed as a whole with zstd level 1 (1.9 ms), the record
    // is also smaller (291 KB against 347 KB; one-off program, issue 14).
    // A save larger than a reader decompresses (DOCUMENT_INFLATED_BYTES_MAX) goes in
    // Automerge's own format, which readers bound by its inflated columns instead.
    let save = group.save_uncompressed();
    let compressed = (save.len() <= DOCUMENT_INFLATED_BYTES_MAX)
        .then(|| zstd::bulk::compress(&save, SNAPSHOT_ZSTD_LEVEL).ok())
        .flatten();
    drop(save);
    let (kind, snapshot) = match compressed {
        Some(compressed) => (RecordKind::SnapshotZstd, compressed),
        None => (RecordKind::Snapshot, group.save()),
    };
    let mut file = encode_header().to_vec();
    encode_record(&mut file, kind, &snapshot)?;
    if let Some(meta) = meta {
        encode_record(&mut file, RecordKind::Meta, meta)?;
    }
    Ok(file)
}

/// zstd level of snapshot records: the fastest, and already smaller than Automerge's deflate.
const SNAPSHOT_ZSTD_LEVEL: i32 = 1;

/// The Automerge save a snapshot record holds: a `SnapshotZstd` payload is decompressed, when
/// its frame declares a size within [`DOCUMENT_INFLATED_BYTES_MAX`] (the bound on a document's
/// inflated columns) and holds exactly that; a `Snapshot` payload is the save itself.
pub fn snapshot_bytes(kind: RecordKind, payload: &[u8]) -> Result<Cow<'_, [u8]>, String> {
    match kind {
        RecordKind::Snapshot => Ok(Cow::Borrowed(payload)),
        RecordKind::SnapshotZstd => {
            let size = zstd::zstd_safe::get_frame_content_size(payload)
                .map_err(|_| "snapshot record: not a zstd frame".to_owned())?
                .ok_or_else(|| "snapshot record: the zstd frame does not declare its size".to_owned())?;
            let size =
                usize::try_from(size).ok().filter(|size| *size <= DOCUMENT_INFLATED_BYTES_MAX).ok_or_else(|| {
                    format!("snapshot record: {size} bytes decompressed, over {DOCUMENT_INFLATED_BYTES_MAX}")
                })?;
            let bytes = zstd::bulk::decompress(payload, size).map_err(|e| format!("snapshot record: {e}"))?;
            if bytes.len() != size {
                return Err(format!("snapshot record: {} bytes decompressed, its frame said {size}", bytes.len()));
            }
            Ok(Cow::Owned(bytes))
        }
        other => Err(format!("not a snapshot record: {other:?}")),
    }
}

/// The bytes to append to a group file for one change.
pub fn change_record(change: &[u8]) -> Result<Vec<u8>, RecordTooLarge> {
    let mut out = Vec::with_capacity(change.len() + crate::record::FRAME_BYTES);
    encode_record(&mut out, RecordKind::Change, change)?;
    Ok(out)
}

/// The bytes to append to a group file for a meta record.
pub fn meta_record(meta: &[u8]) -> Result<Vec<u8>, RecordTooLarge> {
    let mut out = Vec::with_capacity(meta.len() + crate::record::FRAME_BYTES);
    encode_record(&mut out, RecordKind::Meta, meta)?;
    Ok(out)
}

/// What a group file records about strong rounds (docs/protocol.md, "Strong groups").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RoundRecord {
    /// A member staged a round's change (durable, not applied) and voted yes; or a coordinator
    /// staged its own round's change when it decided commit.
    Staged {
        /// The round.
        round: RoundId,
        /// The raw change.
        change: Vec<u8>,
        /// What the round commits.
        kind: RoundKind,
        /// The configuration the round runs in (a majority of it decides).
        configuration: Configuration,
    },
    /// The round's final outcome became known here.
    Decided {
        /// The round.
        round: RoundId,
        /// Commit or abort.
        commit: bool,
    },
    /// This node promised to ignore decisions of the round below `ballot` (a recovery).
    Promised {
        /// The round.
        round: RoundId,
        /// The ballot.
        ballot: Ballot,
    },
    /// This node recorded a proposed decision of the round.
    Accepted {
        /// The round.
        round: RoundId,
        /// The proposal's ballot.
        ballot: Ballot,
        /// Commit or abort.
        commit: bool,
    },
}

impl RoundRecord {
    /// The round the record is about.
    pub fn round(&self) -> &RoundId {
        match self {
            RoundRecord::Staged { round, .. }
            | RoundRecord::Decided { round, .. }
            | RoundRecord::Promised { round, .. }
            | RoundRecord::Accepted { round, .. } => round,
        }
    }
}

/// The bytes to append for a round record.
pub fn round_record(record: &RoundRecord) -> Result<Vec<u8>, RecordTooLarge> {
    // postcard encodes these plain types infallibly into a Vec.
    let payload = postcard::to_stdvec(record).unwrap_or_default();
    let mut out = Vec::with_capacity(payload.len() + crate::record::FRAME_BYTES);
    encode_record(&mut out, RecordKind::RoundV3, &payload)?;
    Ok(out)
}

/// A round record of the first two formats ([`RecordKind::Round`], [`RecordKind::RoundV2`]).
/// Their staged rounds carry no configuration: a node that finds one undecided at start treats
/// it as in doubt with the configuration its document holds.
#[derive(Debug, serde::Deserialize)]
enum LegacyRoundRecord<Id> {
    // `members` is decoded (postcard is positional) but no longer used.
    Staged {
        round: Id,
        change: Vec<u8>,
        #[allow(dead_code)]
        members: Vec<String>,
    },
    Decided {
        round: Id,
        commit: bool,
    },
}

#[derive(Debug, serde::Deserialize)]
struct LegacyRoundId {
    lamport: u64,
    node: String,
}

impl LegacyRoundId {
    /// Start 0: no coordinator draws it (starts come from actors), so an old round never
    /// equals a new one.
    fn upgrade(self) -> RoundId {
        RoundId { lamport: self.lamport, node: self.node, start: 0 }
    }
}

/// A legacy record: the staged change without its configuration, or a decision.
enum Legacy {
    Staged { round: RoundId, change: Vec<u8> },
    Decided { round: RoundId, commit: bool },
}

fn decode_legacy(kind: RecordKind, payload: &[u8]) -> Option<Legacy> {
    let (staged, decided) = match kind {
        RecordKind::Round => match postcard::from_bytes::<LegacyRoundRecord<LegacyRoundId>>(payload).ok()? {
            LegacyRoundRecord::Staged { round, change, .. } => (Some((round.upgrade(), change)), None),
            LegacyRoundRecord::Decided { round, commit } => (None, Some((round.upgrade(), commit))),
        },
        RecordKind::RoundV2 => match postcard::from_bytes::<LegacyRoundRecord<RoundId>>(payload).ok()? {
            LegacyRoundRecord::Staged { round, change, .. } => (Some((round, change)), None),
            LegacyRoundRecord::Decided { round, commit } => (None, Some((round, commit))),
        },
        _ => return None,
    };
    match (staged, decided) {
        (Some((round, change)), _) => Some(Legacy::Staged { round, change }),
        (_, Some((round, commit))) => Some(Legacy::Decided { round, commit }),
        _ => None,
    }
}

/// A round this node holds staged without a final decision, as its file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedRound {
    /// The round.
    pub round: RoundId,
    /// The raw change.
    pub change: Vec<u8>,
    /// What it commits.
    pub kind: RoundKind,
    /// Its configuration (`None` in files of an older konord).
    pub configuration: Option<Configuration>,
    /// The highest ballot promised for it.
    pub promised: Ballot,
    /// The decision accepted for it, with its ballot.
    pub accepted: Option<(Ballot, bool)>,
}

/// A group rebuilt from a file, with what the reader had to drop.
#[derive(Debug)]
pub struct LoadedGroup {
    /// The group, from the valid prefix.
    pub group: GroupDoc,
    /// The last meta record's payload in the valid prefix.
    pub meta: Option<Vec<u8>>,
    /// Change records after the snapshot (compaction is due past [`COMPACT_TAIL_CHANGES_MAX`]).
    pub tail_changes: usize,
    /// Length of the valid prefix: the node truncates the file here before appending again.
    pub valid_bytes: usize,
    /// What was dropped, if anything: the node reports it and repairs from peers.
    pub dropped: Option<Dropped>,
    /// A staged strong round without a recorded decision (this node is in doubt about it).
    pub staged: Option<StagedRound>,
    /// Decisions recorded in the file, oldest first.
    pub decisions: Vec<(RoundId, bool)>,
    /// Ballots promised and decisions accepted for undecided rounds not staged here (this node
    /// is an acceptor of a configuration change it did not vote for).
    pub ballots: Vec<AcceptorRecord>,
}

/// What a file records of an undecided round this node did not stage: the round, the ballot
/// promised, and the decision accepted with its ballot.
pub type AcceptorRecord = (RoundId, Ballot, Option<(Ballot, bool)>);

impl LoadedGroup {
    /// True when the file should be rewritten as a fresh snapshot.
    pub fn needs_compaction(&self) -> bool {
        needs_compaction(self.tail_changes, self.group.change_count()) || self.dropped.is_some()
    }
}

/// The compaction policy: rewrite once the change tail is long, in proportion to the document
/// (at least [`COMPACT_TAIL_CHANGES_MAX`] changes, at least 1/[`COMPACT_TAIL_FRACTION`] of the
/// document's). A rewrite saves the whole document, which costs O(history) until epochs exist;
/// a tail in proportion keeps the cost per change constant (geometric, as in a log-structured
/// store) and the replay on start at most a fraction of the load.
pub fn needs_compaction(tail_changes: usize, document_changes: u64) -> bool {
    let proportional = usize::try_from(document_changes / COMPACT_TAIL_FRACTION as u64).unwrap_or(usize::MAX);
    tail_changes >= COMPACT_TAIL_CHANGES_MAX.max(proportional)
}

/// A round record of any format, as the current one (legacy staged rounds without their
/// configuration).
fn read_round_record(kind: RecordKind, payload: &[u8]) -> Option<FoldedRecord> {
    if kind == RecordKind::RoundV3 {
        return postcard::from_bytes::<RoundRecord>(payload).ok().map(FoldedRecord::Current);
    }
    match decode_legacy(kind, payload)? {
        Legacy::Staged { round, change } => Some(FoldedRecord::LegacyStaged { round, change }),
        Legacy::Decided { round, commit } => Some(FoldedRecord::Current(RoundRecord::Decided { round, commit })),
    }
}

enum FoldedRecord {
    Current(RoundRecord),
    LegacyStaged { round: RoundId, change: Vec<u8> },
}

/// Ballots of rounds not staged here, as folded from a file.
type Ballots = std::collections::BTreeMap<RoundId, (Ballot, Option<(Ballot, bool)>)>;

/// Folds one round record into what the file says so far: the staged round (with its
/// promises and acceptances), the ballots of other undecided rounds, and the final decisions.
fn fold_round_record(
    staged: &mut Option<StagedRound>,
    ballots: &mut Ballots,
    decisions: &mut Vec<(RoundId, bool)>,
    record: FoldedRecord,
) {
    let record = match record {
        FoldedRecord::LegacyStaged { round, change } => {
            *staged = Some(StagedRound {
                round,
                change,
                kind: RoundKind::Write,
                configuration: None,
                promised: Ballot::default(),
                accepted: None,
            });
            return;
        }
        FoldedRecord::Current(record) => record,
    };
    let same = |staged: &Option<StagedRound>, round: &RoundId| staged.as_ref().is_some_and(|s| s.round == *round);
    match record {
        RoundRecord::Staged { round, change, kind, configuration } => {
            if same(staged, &round) {
                // Staged again (a coordinator's own round after a member's copy): keep the
                // ballots recorded so far.
                return;
            }
            *staged = Some(StagedRound {
                round,
                change,
                kind,
                configuration: Some(configuration),
                promised: Ballot::default(),
                accepted: None,
            });
        }
        RoundRecord::Decided { round, commit } => {
            if same(staged, &round) {
                *staged = None;
            }
            ballots.remove(&round);
            decisions.push((round, commit));
        }
        RoundRecord::Promised { round, ballot } => match staged.as_mut().filter(|s| s.round == round) {
            Some(staged) => staged.promised = staged.promised.clone().max(ballot),
            None => {
                let entry = ballots.entry(round).or_default();
                entry.0 = entry.0.clone().max(ballot);
            }
        },
        RoundRecord::Accepted { round, ballot, commit } => match staged.as_mut().filter(|s| s.round == round) {
            Some(staged) => {
                staged.promised = staged.promised.clone().max(ballot.clone());
                staged.accepted = Some((ballot, commit));
            }
            None => {
                let entry = ballots.entry(round).or_default();
                entry.0 = entry.0.clone().max(ballot.clone());
                entry.1 = Some((ballot, commit));
            }
        },
    }
}

/// Rebuilds a group from a file's bytes, as `actor`. The longest valid prefix is used; a record
/// whose checksum holds but whose payload does not decode ends the prefix like damage does.
pub fn load_group_file(file: &[u8], actor: ActorId) -> Result<LoadedGroup, LoadError> {
    let scan = scan_records(file)?;
    let mut records = scan.records.iter();
    let first = records.next().ok_or(LoadError::NoSnapshot)?;
    if !matches!(first.kind, RecordKind::Snapshot | RecordKind::SnapshotZstd) {
        return Err(LoadError::NoSnapshot);
    }
    let snapshot = snapshot_bytes(first.kind, first.payload).map_err(|detail| LoadError::Snapshot { detail })?;
    let mut group = GroupDoc::load(&snapshot, actor)?;
    let mut meta = None;
    let mut tail_changes = 0;
    let mut valid_bytes = scan.valid_bytes;
    let mut dropped = scan.dropped;
    let mut pending = Vec::new();
    let mut staged = None;
    let mut ballots = Ballots::new();
    let mut decisions = Vec::new();
    for record in records {
        let decoded = match record.kind {
            RecordKind::Change => decode_change(record.payload).map(|change| vec![change]).ok(),
            RecordKind::Snapshot | RecordKind::SnapshotZstd => snapshot_bytes(record.kind, record.payload)
                .ok()
                .and_then(|bytes| {
                    crate::change_bounds::check_chunks(&bytes).ok()?;
                    crate::shield::shielded("snapshot", || Automerge::load(&bytes).map_err(|e| e.to_string())).ok()
                })
                .map(|other| group.doc.get_changes_added(&other)),
            RecordKind::Meta => {
                meta = Some(record.payload.to_vec());
                continue;
            }
            RecordKind::Round | RecordKind::RoundV2 | RecordKind::RoundV3 => {
                match read_round_record(record.kind, record.payload) {
                    Some(round) => {
                        fold_round_record(&mut staged, &mut ballots, &mut decisions, round);
                        continue;
                    }
                    None => None,
                }
            }
        };
        let Some(changes) = decoded else {
            dropped = Some(Dropped {
                offset: record.offset,
                bytes: file.len() - record.offset,
                reason: DropReason::Undecodable,
            });
            valid_bytes = record.offset;
            break;
        };
        tail_changes += changes.len();
        pending.extend(changes);
    }
    group.apply_changes_decoded(pending).map_err(|e| LoadError::Snapshot { detail: e.error.to_string() })?;
    // A release among the tail's changes moves what a gated group serves (nobody to tell yet).
    group.refresh_served();
    // A round staged here keeps its ballots with it.
    if let Some(staged) = &staged {
        ballots.remove(&staged.round);
    }
    let ballots = ballots.into_iter().map(|(round, (promised, accepted))| (round, promised, accepted)).collect();
    Ok(LoadedGroup { group, meta, tail_changes, valid_bytes, dropped, staged, decisions, ballots })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compaction waits for a tail in proportion to the document, so that rewriting the whole
    /// document costs the same per change at any age (issue 14).
    #[test]
    fn compaction_is_due_at_the_floor_or_at_an_eighth_of_the_document() {
        assert!(!needs_compaction(COMPACT_TAIL_CHANGES_MAX - 1, 100));
        assert!(needs_compaction(COMPACT_TAIL_CHANGES_MAX, 100));
        assert!(!needs_compaction(COMPACT_TAIL_CHANGES_MAX, 10_000), "a 10k document waits for 1,250");
        assert!(!needs_compaction(1_249, 10_000));
        assert!(needs_compaction(1_250, 10_000));
        assert!(needs_compaction(12_500, 100_000) && !needs_compaction(12_499, 100_000));
    }
    use crate::group::{CommitMeta, Mode};
    use crate::time::Millis;
    use serde_json::json;

    fn actor(n: u8) -> ActorId {
        ActorId::from([n; 16])
    }

    fn meta(n: u64) -> CommitMeta {
        CommitMeta::new("tester", format!("change {n}"), Millis(1_000 + n))
    }

    /// A file with a snapshot of v1 and one change record per later write.
    fn file_with_writes(writes: u64) -> (Vec<u8>, Vec<GroupDoc>) {
        let (mut group, _) = GroupDoc::create("app", Mode::Eventual, actor(1), &meta(0)).unwrap();
        let mut file = snapshot_file(&group, Some(b"{\"revision\":1}")).unwrap();
        let mut states = vec![GroupDoc::load(&group.save(), actor(9)).unwrap()];
        for n in 1..=writes {
            let commit = group.set(vec![(format!("k{}", n % 3), json!(n))], &meta(n)).unwrap();
            file.extend(change_record(&commit.change).unwrap());
            states.push(GroupDoc::load(&group.save(), actor(9)).unwrap());
        }
        (file, states)
    }

    #[test]
    fn round_records_of_both_formats_load() {
        /// The first format, as it was written before round ids carried a start.
        #[derive(serde::Serialize)]
        enum Old {
            #[allow(dead_code, reason = "the variant index matters, not its use")]
            Staged {
                round: (u64, String),
                change: Vec<u8>,
                members: Vec<String>,
            },
            Decided {
                round: (u64, String),
                commit: bool,
            },
        }
        let (mut file, _) = file_with_writes(1);
        let old = postcard::to_stdvec(&Old::Decided { round: (7, "n2".into()), commit: true }).unwrap();
        encode_record(&mut file, RecordKind::Round, &old).unwrap();
        let new = RoundId { lamport: 8, node: "n3".into(), start: 42 };
        file.extend(round_record(&RoundRecord::Decided { round: new.clone(), commit: false }).unwrap());
        let loaded = load_group_file(&file, actor(2)).unwrap();
        assert!(loaded.dropped.is_none(), "nothing dropped: {:?}", loaded.dropped);
        let old_round = RoundId { lamport: 7, node: "n2".into(), start: 0 };
        assert_eq!(loaded.decisions, vec![(old_round, true), (new, false)]);
    }

    #[test]
    fn a_file_round_trips_to_the_same_group() {
        let (file, states) = file_with_writes(5);
        let loaded = load_group_file(&file, actor(2)).unwrap();
        let last = states.last().unwrap();
        assert_eq!(loaded.dropped, None);
        assert_eq!(loaded.tail_changes, 5);
        assert_eq!(loaded.valid_bytes, file.len());
        assert_eq!(loaded.meta.as_deref(), Some(&b"{\"revision\":1}"[..]));
        assert_eq!(loaded.group.heads(), last.heads());
        assert_eq!(loaded.group.settings(), last.settings());
        assert_eq!(loaded.group.version_count(), 6);
        assert!(loaded.group.derived_state_matches_document());
    }

    #[test]
    fn every_truncation_point_loads_a_prefix_of_the_history() {
        let (file, states) = file_with_writes(4);
        let snapshot_end = {
            let scan = scan_records(&file).unwrap();
            scan.records[1].offset
        };
        for cut in 0..=file.len() {
            let result = load_group_file(&file[..cut], actor(3));
            if cut < snapshot_end {
                assert!(result.is_err(), "cut at {cut} has no complete snapshot");
                continue;
            }
            let loaded = result.unwrap();
            let state = &states[loaded.tail_changes];
            assert_eq!(loaded.group.heads(), state.heads(), "cut at {cut}");
            assert_eq!(loaded.group.settings(), state.settings(), "cut at {cut}");
            assert_eq!(loaded.dropped.is_some(), loaded.valid_bytes < cut, "cut at {cut}");
            assert!(loaded.valid_bytes <= cut);
        }
    }

    #[test]
    fn a_damaged_change_record_is_dropped_with_everything_after_it() {
        let (mut file, states) = file_with_writes(3);
        let scan = scan_records(&file).unwrap();
        let third = scan.records[3].offset;
        file[third + 12] ^= 0x40;
        let loaded = load_group_file(&file, actor(4)).unwrap();
        let dropped = loaded.dropped.unwrap();
        assert_eq!(dropped.offset, third);
        assert_eq!(dropped.reason, DropReason::ChecksumMismatch);
        assert_eq!(loaded.group.heads(), states[1].heads());
        assert!(loaded.needs_compaction());
    }

    #[test]
    fn garbage_is_refused_with_a_named_error() {
        assert!(matches!(load_group_file(b"not a konor file", actor(5)), Err(LoadError::BadHeader { .. })));
        let mut only_header = encode_header().to_vec();
        assert!(matches!(load_group_file(&only_header, actor(5)), Err(LoadError::NoSnapshot)));
        encode_record(&mut only_header, RecordKind::Snapshot, b"garbage").unwrap();
        assert!(matches!(load_group_file(&only_header, actor(5)), Err(LoadError::Snapshot { .. })));
    }

    /// Issue 14: compaction writes `SnapshotZstd` (an uncompressed save, zstd over it); files
    /// written before hold `Snapshot` (Automerge's own deflate) and still load, whole and with
    /// their tail.
    #[test]
    fn snapshots_are_written_as_zstd_and_both_kinds_load() {
        let (file, states) = file_with_writes(3);
        let scan = scan_records(&file).unwrap();
        assert_eq!(scan.records[0].kind, RecordKind::SnapshotZstd);
        let last = states.last().unwrap();
        let mut old = encode_header().to_vec();
        encode_record(&mut old, RecordKind::Snapshot, &states[0].save()).unwrap();
        for record in &scan.records[1..] {
            encode_record(&mut old, record.kind, record.payload).unwrap();
        }
        for (name, bytes) in [("zstd", &file), ("deflate", &old)] {
            let loaded = load_group_file(bytes, actor(6)).unwrap();
            assert_eq!(loaded.dropped, None, "{name}");
            assert_eq!(loaded.group.heads(), last.heads(), "{name}");
            assert_eq!(loaded.group.settings(), last.settings(), "{name}");
            assert!(loaded.group.derived_state_matches_document(), "{name}");
        }
    }

    /// A zstd snapshot is decompressed only within its declared size, and that size within
    /// DOCUMENT_INFLATED_BYTES_MAX: a frame without a size, one that lies about it, one that
    /// claims too much, and garbage are refused with a named error, never a panic or an
    /// unbounded allocation.
    #[test]
    fn a_zstd_snapshot_that_lies_about_its_size_is_refused() {
        let (group, _) = GroupDoc::create("app", Mode::Eventual, actor(1), &meta(0)).unwrap();
        let save = group.save_uncompressed();
        let honest = zstd::bulk::compress(&save, SNAPSHOT_ZSTD_LEVEL).unwrap();
        assert_eq!(snapshot_bytes(RecordKind::SnapshotZstd, &honest).unwrap().as_ref(), &save[..]);
        // No declared size: a streaming frame.
        let mut unsized_frame = Vec::new();
        {
            let mut encoder = zstd::stream::write::Encoder::new(&mut unsized_frame, 1).unwrap();
            encoder.include_contentsize(false).unwrap();
            std::io::Write::write_all(&mut encoder, &save).unwrap();
            encoder.finish().unwrap();
        }
        // A size that lies (the first frame says less than the whole holds): a second frame.
        let mut two_frames = honest.clone();
        two_frames.extend(zstd::bulk::compress(&save, 1).unwrap());
        // A size over the limit: a frame of zeros, compressed to a few kilobytes.
        let zeros = vec![0u8; DOCUMENT_INFLATED_BYTES_MAX + 1];
        let bomb = zstd::bulk::compress(&zeros, 1).unwrap();
        drop(zeros);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        for (name, payload) in
            [("no size", &unsized_frame[..]), ("two frames", &two_frames[..]), ("bomb", &bomb[..]), ("garbage", b"zzz")]
        {
            let error = snapshot_bytes(RecordKind::SnapshotZstd, payload).unwrap_err();
            assert!(error.starts_with("snapshot record: "), "{name}: {error}");
            let mut file = encode_header().to_vec();
            encode_record(&mut file, RecordKind::SnapshotZstd, payload).unwrap();
            assert!(matches!(load_group_file(&file, actor(7)), Err(LoadError::Snapshot { .. })), "{name}");
        }
    }
}
