//! The on-disk record format (SPEC F24): a file header, then records framed by length and
//! checksum, and a reader that recovers the longest valid prefix of a torn or corrupt file.
//!
//! ```text
//! file   := header record*
//! header := "KONR" format:u16le flags:u16le               (8 bytes)
//! record := length:u32le crc32:u32le kind:u8 payload      (9 + length bytes)
//!           crc32 (IEEE) covers kind and payload; length counts the payload only
//! ```
//! A reader stops at the first record whose frame does not fit the file (a torn append) or
//! whose checksum fails (corruption) and reports what it dropped; everything before is intact.

use std::fmt;

use crate::error::LoadError;
use crate::limits::RECORD_PAYLOAD_BYTES_MAX;

/// Magic bytes at the start of every group file.
pub const FILE_MAGIC: [u8; 4] = *b"KONR";

/// Version of the record format; a reader refuses files from a newer format.
pub const FILE_FORMAT: u16 = 1;

/// Bytes of the file header.
pub const HEADER_BYTES: usize = 8;

/// Bytes of a record frame before the payload.
pub const FRAME_BYTES: usize = 9;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKind {
    /// A whole Automerge document save: the base the following records apply to.
    Snapshot,
    /// One Automerge change (raw change bytes) appended after a local or remote write.
    Change,
    /// Node-side metadata as JSON (revision counters, sync states); opaque to the core.
    Meta,
    /// A strong round's staged change or its decision, with round ids of the first format
    /// (`lamport`, `node`), written before round ids carried the coordinator's start. Still
    /// read; never written.
    Round,
    /// A strong round's staged change or its decision, with round ids carrying the start but
    /// without configurations or ballots. Still read; never written.
    RoundV2,
    /// A strong round's staged change, a ballot promised, a decision accepted, or its final
    /// decision ([`crate::journal::RoundRecord`]).
    RoundV3,
    /// A whole Automerge document save without Automerge's own deflate, compressed as one zstd
    /// frame that declares its size (what compaction writes since issue 14; `Snapshot` is
    /// still read).
    SnapshotZstd,
}

impl RecordKind {
    /// The kind byte.
    pub fn to_byte(self) -> u8 {
        match self {
            RecordKind::Snapshot => 1,
            RecordKind::Change => 2,
            RecordKind::Meta => 3,
            RecordKind::Round => 4,
            RecordKind::RoundV2 => 5,
            RecordKind::RoundV3 => 6,
            RecordKind::SnapshotZstd => 7,
        }
    }

    /// The kind for a byte, if known.
    pub fn from_byte(byte: u8) -> Option<RecordKind> {
        match byte {
            1 => Some(RecordKind::Snapshot),
            2 => Some(RecordKind::Change),
            3 => Some(RecordKind::Meta),
            4 => Some(RecordKind::Round),
            5 => Some(RecordKind::RoundV2),
            6 => Some(RecordKind::RoundV3),
            7 => Some(RecordKind::SnapshotZstd),
            _ => None,
        }
    }
}

/// The file header bytes.
pub fn encode_header() -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[..4].copy_from_slice(&FILE_MAGIC);
    header[4..6].copy_from_slice(&FILE_FORMAT.to_le_bytes());
    header
}

/// A payload too large to frame: a reader would refuse the record, so it is never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("record payload of {bytes} bytes is over the limit of {max}; nothing was written")]
pub struct RecordTooLarge {
    /// The payload size.
    pub bytes: usize,
    /// The limit.
    pub max: usize,
}

/// Appends one framed record to `out`, refusing payloads over [`RECORD_PAYLOAD_BYTES_MAX`]
/// (`out` is unchanged then).
pub fn encode_record(out: &mut Vec<u8>, kind: RecordKind, payload: &[u8]) -> Result<(), RecordTooLarge> {
    if payload.len() > RECORD_PAYLOAD_BYTES_MAX {
        return Err(RecordTooLarge { bytes: payload.len(), max: RECORD_PAYLOAD_BYTES_MAX });
    }
    let length = u32::try_from(payload.len())
        .map_err(|_| RecordTooLarge { bytes: payload.len(), max: RECORD_PAYLOAD_BYTES_MAX })?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind.to_byte()]);
    crc.update(payload);
    out.reserve(FRAME_BYTES + payload.len());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.push(kind.to_byte());
    out.extend_from_slice(payload);
    Ok(())
}

/// One record read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Offset of the record's frame in the file.
    pub offset: usize,
    /// Its kind.
    pub kind: RecordKind,
    /// Its payload.
    pub payload: &'a [u8],
}

/// Why the reader stopped before the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The last frame or payload runs past the end of the file: an append cut short by a crash.
    Torn,
    /// A checksum does not match: the bytes were damaged.
    ChecksumMismatch,
    /// A length over the limit: the frame itself is damaged.
    LengthOverLimit,
    /// A record whose checksum holds but whose payload does not decode.
    Undecodable,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::Torn => f.write_str("torn record at the end (a write cut short)"),
            DropReason::ChecksumMismatch => f.write_str("checksum mismatch (damaged bytes)"),
            DropReason::LengthOverLimit => f.write_str("record length over the limit (damaged frame)"),
            DropReason::Undecodable => f.write_str("payload does not decode"),
        }
    }
}

/// What the reader dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Offset of the first byte not accepted.
    pub offset: usize,
    /// How many bytes from there to the end of the file were dropped.
    pub bytes: usize,
    /// Why.
    pub reason: DropReason,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dropped {} bytes at offset {}: {}", self.bytes, self.offset, self.reason)
    }
}

/// The valid prefix of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordScan<'a> {
    /// The intact records, in file order.
    pub records: Vec<Record<'a>>,
    /// Length of the valid prefix; truncating the file here removes exactly the damage.
    pub valid_bytes: usize,
    /// What was dropped after the prefix, if anything.
    pub dropped: Option<Dropped>,
}

/// Reads the records of a whole file. Fails only when the header itself is wrong; any damage
/// after it ends the scan and is reported in [`RecordScan::dropped`].
pub fn scan_records(file: &[u8]) -> Result<RecordScan<'_>, LoadError> {
    if file.len() < HEADER_BYTES {
        return Err(LoadError::BadHeader { detail: format!("file is {} bytes, shorter than the header", file.len()) });
    }
    if file[..4] != FILE_MAGIC {
        return Err(LoadError::BadHeader { detail: "magic bytes are not KONR".into() });
    }
    let format = u16::from_le_bytes([file[4], file[5]]);
    if format != FILE_FORMAT {
        return Err(LoadError::BadHeader {
            detail: format!("format {format}, this version reads format {FILE_FORMAT}; upgrade konord"),
        });
    }
    let mut records = Vec::new();
    let mut offset = HEADER_BYTES;
    let dropped = loop {
        let rest = &file[offset..];
        if rest.is_empty() {
            break None;
        }
        let stop = |reason| Some(Dropped { offset, bytes: rest.len(), reason });
        if rest.len() < FRAME_BYTES {
            break stop(DropReason::Torn);
        }
        let length = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let kind_byte = rest[8];
        if length > RECORD_PAYLOAD_BYTES_MAX {
            break stop(DropReason::LengthOverLimit);
        }
        let Some(payload) = rest.get(FRAME_BYTES..FRAME_BYTES + length) else {
            break stop(DropReason::Torn);
        };
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[kind_byte]);
        hasher.update(payload);
        if hasher.finalize() != crc {
            break stop(DropReason::ChecksumMismatch);
        }
        let Some(kind) = RecordKind::from_byte(kind_byte) else {
            // The checksum covers the kind byte, so this record was written on purpose by a
            // newer version: refuse the file rather than drop (and later compact away) its data.
            return Err(LoadError::UnknownRecord { kind: kind_byte, offset });
        };
        records.push(Record { offset, kind, payload });
        offset += FRAME_BYTES + length;
    };
    Ok(RecordScan { records, valid_bytes: offset, dropped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file_of(payloads: &[(RecordKind, Vec<u8>)]) -> Vec<u8> {
        let mut file = encode_header().to_vec();
        for (kind, payload) in payloads {
            encode_record(&mut file, *kind, payload).unwrap();
        }
        file
    }

    fn kind_strategy() -> impl Strategy<Value = RecordKind> {
        prop_oneof![
            Just(RecordKind::Snapshot),
            Just(RecordKind::SnapshotZstd),
            Just(RecordKind::Change),
            Just(RecordKind::Meta),
            Just(RecordKind::Round)
        ]
    }

    proptest! {
        #[test]
        fn records_round_trip(payloads in prop::collection::vec((kind_strategy(), prop::collection::vec(any::<u8>(), 0..300)), 0..12)) {
            let file = file_of(&payloads);
            let scan = scan_records(&file).unwrap();
            prop_assert_eq!(scan.dropped, None);
            prop_assert_eq!(scan.valid_bytes, file.len());
            let read: Vec<(RecordKind, Vec<u8>)> = scan.records.iter().map(|r| (r.kind, r.payload.to_vec())).collect();
            prop_assert_eq!(read, payloads);
        }

        #[test]
        fn a_flipped_byte_is_never_accepted_silently(
            payloads in prop::collection::vec((kind_strategy(), prop::collection::vec(any::<u8>(), 1..64)), 1..6),
            position in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut file = file_of(&payloads);
            let at = HEADER_BYTES + position.index(file.len() - HEADER_BYTES);
            file[at] ^= flip;
            let scan = scan_records(&file).unwrap();
            // Every record accepted must be one that was written, unchanged, at its place.
            for (record, (kind, payload)) in scan.records.iter().zip(&payloads) {
                prop_assert_eq!(record.kind, *kind);
                prop_assert_eq!(record.payload, payload.as_slice());
            }
            prop_assert!(scan.dropped.is_some(), "damage at {} went unnoticed", at);
            prop_assert!(scan.records.len() < payloads.len());
        }
    }

    #[test]
    fn every_truncation_point_recovers_the_longest_valid_prefix() {
        let payloads: Vec<(RecordKind, Vec<u8>)> =
            (0..6u8).map(|i| (RecordKind::Change, vec![i; usize::from(i) * 7 + 1])).collect();
        let file = file_of(&payloads);
        let mut ends = vec![HEADER_BYTES];
        for (_, payload) in &payloads {
            ends.push(ends[ends.len() - 1] + FRAME_BYTES + payload.len());
        }
        for cut in HEADER_BYTES..=file.len() {
            let scan = scan_records(&file[..cut]).unwrap();
            let complete = ends.iter().filter(|end| **end <= cut).count() - 1;
            assert_eq!(scan.records.len(), complete, "cut at {cut}");
            assert_eq!(scan.valid_bytes, ends[complete], "cut at {cut}");
            match scan.dropped {
                None => assert_eq!(cut, ends[complete]),
                Some(dropped) => {
                    assert_eq!(dropped.reason, DropReason::Torn, "cut at {cut}");
                    assert_eq!(dropped.offset + dropped.bytes, cut);
                }
            }
        }
        for cut in 0..HEADER_BYTES {
            assert!(scan_records(&file[..cut]).is_err());
        }
    }

    #[test]
    fn bad_headers_and_kinds_are_named() {
        let mut file = file_of(&[(RecordKind::Meta, b"{}".to_vec())]);
        file[0] = b'X';
        assert!(scan_records(&file).unwrap_err().to_string().contains("magic"));
        let mut newer = encode_header().to_vec();
        newer[4] = 9;
        assert!(scan_records(&newer).unwrap_err().to_string().contains("upgrade"));
        let mut unknown = encode_header().to_vec();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[77]);
        unknown.extend_from_slice(&0u32.to_le_bytes());
        unknown.extend_from_slice(&crc.finalize().to_le_bytes());
        unknown.push(77);
        let error = scan_records(&unknown).unwrap_err();
        assert_eq!(error, LoadError::UnknownRecord { kind: 77, offset: HEADER_BYTES });
    }
}
