//! What an Automerge change or document from outside may declare, checked before Automerge
//! decodes it.
//!
//! A change stores its operations in columns, run-length encoded: a few bytes can declare a run
//! of 2^40 rows, or an operation with 2^40 predecessors. Automerge 0.12 trusts those counts as it
//! iterates (fuzzing found a 130-byte change that makes `Change::try_from` allocate more than
//! 2 GB, and 156 bytes that take 12 s), and Rust aborts on a failed allocation, so no shield
//! catches it. This module walks the change's header and every column's runs without allocating
//! and refuses a change whose columns declare more than [`CHANGE_ROWS_MAX`] rows, or whose
//! predecessor groups add up to more, before Automerge sees it.
//!
//! The format (Automerge's binary format, "change chunk"): the chunk header (magic, checksum,
//! type, LEB128 length), then dependencies (count, 32-byte hashes), the actor (length-prefixed),
//! `seq`, `start_op`, the time (signed), the message (length-prefixed), other actors (count, each
//! length-prefixed), the column metadata (count, then `(spec, length)` pairs), the column data,
//! and extra bytes. A column's spec carries its type in the low three bits and a deflate flag in
//! the fourth. Run-length columns hold runs: a signed count `n`, then one value repeated `n`
//! times (`n > 0`), `-n` literal values (`n < 0`), or an unsigned count of nulls (`n == 0`).
//! Boolean columns hold alternating run lengths; raw value columns hold bytes.
//!
//! Documents (a snapshot in a group file, a join grant, a whole document in a sync message) are
//! checked the same way by [`check_chunks`]: their columns may be deflated, and Automerge 0.12
//! inflates them without a limit (`raw_column.rs`, `read_to_end`), so 64 MiB of deflate bomb
//! would become tens of GB. Each deflated column is inflated here into a buffer that stops at
//! [`DOCUMENT_INFLATED_BYTES_MAX`] for the whole document, and every column's rows are counted
//! against [`DOCUMENT_ROWS_MAX`].

use crate::error::RemoteError;
use std::io::Read as _;

use crate::limits::{CHANGE_ROWS_MAX, DOCUMENT_INFLATED_BYTES_MAX, DOCUMENT_ROWS_MAX};

/// The Automerge chunk magic bytes.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// Chunk type of a document.
const CHUNK_TYPE_DOCUMENT: u8 = 0;
/// Chunk type of an uncompressed change; compressed changes (type 2) are refused: no honest peer
/// sends one (changes travel as `raw_bytes`), and inflating one is itself unbounded.
const CHUNK_TYPE_CHANGE: u8 = 1;

/// Column types (the low three bits of a column spec).
const GROUP_CARD: u32 = 0;
#[cfg(test)]
const INTEGER_RLE: u32 = 2;
const DELTA_INTEGER: u32 = 3;
const BOOLEAN: u32 = 4;
const STRING_RLE: u32 = 5;
const VALUE_RAW: u32 = 7;
/// The deflate flag of a column spec.
const DEFLATE: u32 = 0b1000;

/// Refuses `chunk` (one change chunk) when its header or columns are malformed or declare more
/// than [`CHANGE_ROWS_MAX`] rows. Passing says nothing about validity otherwise: Automerge still
/// decodes and checks everything.
pub fn check_change(chunk: &[u8]) -> Result<(), RemoteError> {
    let mut reader = Reader { bytes: chunk };
    if reader.take(4)? != MAGIC {
        return Err(refused("no Automerge magic bytes"));
    }
    reader.take(4)?; // checksum: Automerge verifies it
    if reader.byte()? != CHUNK_TYPE_CHANGE {
        return Err(refused("not an uncompressed change chunk"));
    }
    let length = reader.length()?;
    let mut body = Reader { bytes: reader.take(length)? };
    let dependencies = body.length()?;
    body.take(dependencies.checked_mul(32).ok_or_else(|| refused("dependency count overflows"))?)?;
    let actor = body.length()?;
    body.take(actor)?;
    body.unsigned()?; // seq
    body.unsigned()?; // start_op
    body.signed()?; // time
    let message = body.length()?;
    body.take(message)?;
    let other_actors = body.length()?;
    for _ in 0..other_actors {
        let actor = body.length()?;
        body.take(actor)?;
    }
    for (spec, length) in body.columns()? {
        let data = body.take(length)?;
        if spec & DEFLATE != 0 {
            return Err(refused("deflated change column"));
        }
        check_column(spec & 0b111, data, CHANGE_ROWS_MAX)?;
    }
    Ok(())
}

/// Checks concatenated chunks (what `Automerge::load` takes): each a document
/// ([`check_document`]) or an uncompressed change ([`check_change`]).
pub fn check_chunks(mut bytes: &[u8]) -> Result<(), RemoteError> {
    while !bytes.is_empty() {
        let mut reader = Reader { bytes };
        reader.take(9)?;
        let length = reader.length()?;
        let end = bytes.len() - reader.bytes.len() + length;
        let (chunk, rest) = bytes.split_at(end);
        if chunk[8] == CHUNK_TYPE_DOCUMENT {
            check_document(chunk)?;
        } else {
            check_change(chunk)?;
        }
        bytes = rest;
    }
    Ok(())
}

/// Refuses a document chunk whose header or columns are malformed, whose deflated columns
/// inflate past [`DOCUMENT_INFLATED_BYTES_MAX`] together, or whose columns declare more than
/// [`DOCUMENT_ROWS_MAX`] rows.
pub fn check_document(chunk: &[u8]) -> Result<(), RemoteError> {
    check_document_within(chunk, DOCUMENT_INFLATED_BYTES_MAX)
}

/// [`check_document`] with `inflated_max` bytes for the deflated columns.
fn check_document_within(chunk: &[u8], inflated_max: usize) -> Result<(), RemoteError> {
    let mut reader = Reader { bytes: chunk };
    if reader.take(4)? != MAGIC {
        return Err(refused("no Automerge magic bytes"));
    }
    reader.take(4)?;
    if reader.byte()? != CHUNK_TYPE_DOCUMENT {
        return Err(refused("not a document chunk"));
    }
    let length = reader.length()?;
    let mut body = Reader { bytes: reader.take(length)? };
    let actors = body.length()?;
    for _ in 0..actors {
        let actor = body.length()?;
        body.take(actor)?;
    }
    let heads = body.length()?;
    body.take(heads.checked_mul(32).ok_or_else(|| refused("head count overflows"))?)?;
    let mut specs = body.columns()?;
    specs.extend(body.columns()?);
    let mut inflated_total = 0usize;
    for (spec, length) in specs {
        let data = body.take(length)?;
        if spec & DEFLATE == 0 {
            check_column(spec & 0b111, data, DOCUMENT_ROWS_MAX)?;
            continue;
        }
        let budget = inflated_max - inflated_total;
        let mut inflated = Vec::new();
        flate2::bufread::DeflateDecoder::new(data)
            .take(budget as u64 + 1)
            .read_to_end(&mut inflated)
            .map_err(|e| refused(&format!("deflated column: {e}")))?;
        if inflated.len() > budget {
            return Err(RemoteError::TooLarge {
                what: "document (inflated columns)",
                bytes: inflated_total + inflated.len(),
                max: inflated_max,
            });
        }
        inflated_total += inflated.len();
        check_column(spec & 0b111, &inflated, DOCUMENT_ROWS_MAX)?;
    }
    Ok(())
}

/// Counts the rows a column declares (and, for a group column, the rows of the group), refusing
/// more than `max`.
fn check_column(column_type: u32, data: &[u8], max: u64) -> Result<(), RemoteError> {
    let mut reader = Reader { bytes: data };
    let mut rows = Rows { count: 0, max };
    match column_type {
        BOOLEAN => {
            while !reader.is_empty() {
                rows.add(reader.unsigned()?)?;
            }
        }
        // Raw values are bytes, sized by the value metadata column and the chunk itself.
        VALUE_RAW => {}
        // GROUP_CARD, ACTOR_ID, INTEGER_RLE, DELTA_INTEGER, STRING_RLE, VALUE_METADATA.
        _ => {
            let mut grouped = Rows { count: 0, max };
            while !reader.is_empty() {
                let count = reader.signed()?;
                if count > 0 {
                    let count = count.unsigned_abs();
                    rows.add(count)?;
                    let value = reader.value(column_type)?;
                    if column_type == GROUP_CARD {
                        grouped.add(count.checked_mul(value).ok_or_else(|| refused("group size overflows"))?)?;
                    }
                } else if count < 0 {
                    let count = count.unsigned_abs();
                    rows.add(count)?;
                    for _ in 0..count {
                        let value = reader.value(column_type)?;
                        if column_type == GROUP_CARD {
                            grouped.add(value)?;
                        }
                    }
                } else {
                    rows.add(reader.unsigned()?)?;
                }
            }
        }
    }
    Ok(())
}

/// A running row count, refused past `max`.
struct Rows {
    count: u64,
    max: u64,
}

impl Rows {
    fn add(&mut self, count: u64) -> Result<(), RemoteError> {
        self.count = self.count.saturating_add(count);
        if self.count > self.max {
            return Err(RemoteError::TooLarge {
                what: "rows of one column",
                bytes: usize::try_from(self.count).unwrap_or(usize::MAX),
                max: usize::try_from(self.max).unwrap_or(usize::MAX),
            });
        }
        Ok(())
    }
}

fn refused(detail: &str) -> RemoteError {
    RemoteError::Malformed { what: "change", detail: detail.to_owned() }
}

/// Reads LEB128 numbers and byte strings, refusing anything truncated or overlong.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], RemoteError> {
        if count > self.bytes.len() {
            return Err(refused("truncated"));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn byte(&mut self) -> Result<u8, RemoteError> {
        Ok(self.take(1)?[0])
    }

    fn unsigned(&mut self) -> Result<u64, RemoteError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(refused("LEB128 number over 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(refused("LEB128 number over 64 bits"))
    }

    fn signed(&mut self) -> Result<i64, RemoteError> {
        let mut value: i64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= i64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                if shift < 57 && byte & 0x40 != 0 {
                    value |= -1i64 << (shift + 7);
                }
                return Ok(value);
            }
        }
        Err(refused("LEB128 number over 64 bits"))
    }

    /// Column metadata: a count, then `(spec, length)` pairs (lengths checked as the data is
    /// taken).
    fn columns(&mut self) -> Result<Vec<(u32, usize)>, RemoteError> {
        let columns = self.length()?;
        let mut specs = Vec::new();
        for _ in 0..columns {
            let spec = u32::try_from(self.unsigned()?).map_err(|_| refused("column spec over 32 bits"))?;
            let length = usize::try_from(self.unsigned()?).map_err(|_| refused("column length overflows"))?;
            specs.push((spec, length));
        }
        Ok(specs)
    }

    /// A length that must fit what is left.
    fn length(&mut self) -> Result<usize, RemoteError> {
        let length = self.unsigned()?;
        usize::try_from(length).ok().filter(|length| *length <= self.bytes.len()).ok_or_else(|| refused("truncated"))
    }

    /// One value of a run-length column: its number (0 for strings and deltas, which never
    /// size a group).
    fn value(&mut self, column_type: u32) -> Result<u64, RemoteError> {
        match column_type {
            DELTA_INTEGER => self.signed().map(|_| 0),
            STRING_RLE => {
                let length = self.length()?;
                self.take(length).map(|_| 0)
            }
            _ => self.unsigned(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    fn a_change(keys: usize) -> Vec<u8> {
        let mut doc = automerge::AutoCommit::new();
        for index in 0..keys {
            doc.put(automerge::ROOT, format!("k{index}"), index as i64).unwrap();
        }
        doc.put(automerge::ROOT, "k0", "again").unwrap();
        doc.get_last_local_change().unwrap().raw_bytes().to_vec()
    }

    #[test]
    fn honest_changes_pass() {
        for keys in [0, 1, 2, 100, 10_000] {
            let change = a_change(keys);
            check_change(&change).unwrap_or_else(|e| panic!("{keys} keys: {e}"));
        }
    }

    #[test]
    fn honest_documents_pass_and_a_deflate_bomb_does_not() {
        let mut doc = automerge::AutoCommit::new();
        for index in 0..2_000 {
            doc.put(automerge::ROOT, format!("k{}", index % 300), "x".repeat(200)).unwrap();
            doc.commit();
        }
        let saved = doc.save();
        check_chunks(&saved).unwrap();
        // A column inflating past the budget is refused (a 1 MiB budget here: the real one is
        // 256 MiB, slow to deflate in a debug build).
        let mut bomb_column = Vec::new();
        let mut deflater = flate2::write::DeflateEncoder::new(&mut bomb_column, flate2::Compression::best());
        std::io::Write::write_all(&mut deflater, &vec![0u8; 4 << 20]).unwrap();
        deflater.finish().unwrap();
        assert!(bomb_column.len() < 16 * 1024, "{} bytes", bomb_column.len());
        let bomb = document_with_column(7 | DEFLATE, &bomb_column);
        let refused = check_document_within(&bomb, 1 << 20);
        assert!(matches!(refused, Err(RemoteError::TooLarge { .. })), "{refused:?}");
        assert!(check_document_within(&bomb, 8 << 20).is_ok());
        // A column declaring more rows than a document may have (`GroupDoc::load`'s tests show
        // the door snapshots from files and join grants take refusing it too).
        assert!(matches!(check_chunks(&document_with_too_many_rows()), Err(RemoteError::TooLarge { .. })));
    }

    /// A document whose one ops column declares more rows than a document may have.
    pub(crate) fn document_with_too_many_rows() -> Vec<u8> {
        let mut rows = Vec::new();
        leb128_signed(&mut rows, i64::try_from(DOCUMENT_ROWS_MAX).unwrap() + 1);
        leb128_unsigned(&mut rows, 1);
        document_with_column(INTEGER_RLE, &rows)
    }

    /// A document chunk with no actors, heads or change columns and one ops column.
    fn document_with_column(spec: u32, data: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        leb128_unsigned(&mut body, 0); // actors
        leb128_unsigned(&mut body, 0); // heads
        leb128_unsigned(&mut body, 0); // change columns
        leb128_unsigned(&mut body, 1); // ops columns
        leb128_unsigned(&mut body, u64::from((1 << 4) | spec));
        leb128_unsigned(&mut body, data.len() as u64);
        body.extend(data);
        let mut chunk = MAGIC.to_vec();
        chunk.extend([0; 4]);
        chunk.push(CHUNK_TYPE_DOCUMENT);
        leb128_unsigned(&mut chunk, body.len() as u64);
        chunk.extend(&body);
        chunk
    }

    #[test]
    fn truncations_and_garbage_are_refused_without_panicking() {
        let change = a_change(20);
        for end in 0..change.len() {
            assert!(check_change(&change[..end]).is_err(), "cut at {end}");
        }
        let mut compressed = change.clone();
        compressed[8] = 2;
        assert!(check_change(&compressed).is_err());
    }

    /// Found by the `sync` fuzz target: 130 bytes that make Automerge 0.12 allocate over 2 GB
    /// (`decode_change`'s tests show the door every outside change takes refusing it too).
    pub(crate) fn billions_of_predecessors() -> Vec<u8> {
        let hex = concat!(
            "856f4a83ff00ddb503760002000000012334343434343434343434343430303030303030303030303030cbcfcfcfcfcf",
            "cfcf313135366f39393638343735300201004500ffffffffffffffffff000120028460fe000000000000006f01000000",
            "00000053ffffffffffffffdfffffffffffffff0001ffffffff837fb0004a6f852900",
        );
        (0..hex.len()).step_by(2).map(|at| u8::from_str_radix(&hex[at..at + 2], 16).unwrap()).collect()
    }

    #[test]
    fn regression_a_change_declaring_billions_of_predecessors_is_refused() {
        let error = check_change(&billions_of_predecessors()).unwrap_err();
        assert!(matches!(error, RemoteError::TooLarge { .. } | RemoteError::Malformed { .. }), "{error}");
    }

    #[test]
    fn a_run_past_the_row_limit_is_refused() {
        let mut column = Vec::new();
        leb128_signed(&mut column, i64::try_from(CHANGE_ROWS_MAX).unwrap() + 1);
        leb128_unsigned(&mut column, 7);
        assert!(matches!(check_column(INTEGER_RLE, &column, CHANGE_ROWS_MAX), Err(RemoteError::TooLarge { .. })));
        let mut column = Vec::new();
        leb128_signed(&mut column, 1);
        leb128_unsigned(&mut column, CHANGE_ROWS_MAX + 1);
        assert!(matches!(check_column(GROUP_CARD, &column, CHANGE_ROWS_MAX), Err(RemoteError::TooLarge { .. })));
        let mut column = Vec::new();
        leb128_signed(&mut column, i64::try_from(CHANGE_ROWS_MAX).unwrap());
        leb128_unsigned(&mut column, 7);
        assert!(check_column(INTEGER_RLE, &column, CHANGE_ROWS_MAX).is_ok());
    }

    fn leb128_unsigned(out: &mut Vec<u8>, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn leb128_signed(out: &mut Vec<u8>, mut value: i64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0) {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
}
