//! One setting as a register of its own (document format 3): the map object at
//! `settings.<key>` holds the values written to the key, each under the storage key of the
//! version that wrote it, newest first.
//!
//! Why: Automerge 0.12 applies a remote change by walking every op of each object it touches,
//! from the object's first key up to the key it writes (`BatchApply` → `walk_map`), and an
//! overwritten op stays in its object for ever. With one flat `settings` map, every remote
//! write walked the whole history of the keys sorting before it and of its own key, so an
//! apply grew with the group's age (202 µs at 1k versions, 703 µs at 10k, measured with raw
//! Automerge on 1,000 keys). A register keeps each key's history in its own object, and a new
//! value's entry key sorts first (`u64::MAX - counter`), so the walk stops at once: 32 µs at
//! 1k versions and 57 µs at 100k (docs/benchmarks.md, issue 14).
//!
//! The rules, which every node applies the same way:
//! * **Value.** The visible entries of every register object visible at the key (two nodes
//!   that first wrote a key concurrently each made one; both count). No entry: the key is
//!   absent. The winner is the entry whose key sorts first (the highest version counter, then
//!   the lowest actor), so every node serves the same value; more than one entry is a conflict.
//! * **Write.** Deletes every entry the writer sees (in every register of the key) and puts the
//!   new one; a concurrent write it did not see stays visible beside it, as a conflict, exactly
//!   as Automerge's own multi-value register does. A key with no register gets one.
//! * **Delete.** Deletes every entry the writer sees and keeps the register objects, so a
//!   concurrent write survives (add wins, as before).
//! * **Format 2 values** (a string at `settings.<key>`, written before format 3) are read as
//!   before while the key has no register. The first format-3 write of the key puts a register
//!   over them, which supersedes them. A format-2 string written concurrently with that first
//!   write (possible only across an upgrade) loses to the register and is not served.

use automerge::transaction::Transactable;
use automerge::{AutomergeError, ChangeHash, ObjId, ObjType, ReadDoc, Value as AmValue};

/// One value of a key as the document holds it: its text (`None` when it is not a string) and
/// the op that wrote it (which names the change, so the version).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KeyValue {
    pub(crate) text: Option<String>,
    pub(crate) op: ObjId,
}

/// Every visible value of `key`, the winner first; empty when the key is absent. At `heads`
/// when given, else now.
pub(crate) fn values_of<R: ReadDoc>(
    doc: &R,
    settings: &ObjId,
    key: &str,
    heads: Option<&[ChangeHash]>,
) -> Vec<KeyValue> {
    let all = match heads {
        Some(heads) => doc.get_all_at(settings, key, heads),
        None => doc.get_all(settings, key),
    }
    .unwrap_or_default();
    let registers: Vec<&ObjId> =
        all.iter().filter(|(value, _)| matches!(value, AmValue::Object(ObjType::Map))).map(|(_, id)| id).collect();
    if registers.is_empty() {
        return legacy_values(doc, settings, key, heads, all);
    }
    // (entry key, value); entry keys are unique per version, so the sort is total.
    let mut entries: Vec<(String, KeyValue)> = Vec::new();
    for register in registers {
        let items = match heads {
            Some(heads) => doc.map_range_at(register, .., heads),
            None => doc.map_range(register, ..),
        };
        for item in items {
            let op = item.id();
            let text = match &item.value {
                automerge::ValueRef::Scalar(automerge::ScalarValueRef::Str(text)) => Some(text.to_string()),
                _ => None,
            };
            entries.push((item.key.into_owned(), KeyValue { text, op }));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries.into_iter().map(|(_, value)| value).collect()
}

/// A key without a register: the format-2 string values, Automerge's winner first.
fn legacy_values<R: ReadDoc>(
    doc: &R,
    settings: &ObjId,
    key: &str,
    heads: Option<&[ChangeHash]>,
    all: Vec<(AmValue<'_>, ObjId)>,
) -> Vec<KeyValue> {
    let winner = match heads {
        Some(heads) => doc.get_at(settings, key, heads),
        None => doc.get(settings, key),
    }
    .ok()
    .flatten()
    .map(|(_, op)| op);
    let mut values: Vec<KeyValue> = all
        .into_iter()
        .map(|(value, op)| KeyValue {
            text: match value {
                AmValue::Scalar(s) => s.as_str().map(str::to_owned),
                AmValue::Object(_) => None,
            },
            op,
        })
        .collect();
    if let Some(position) = winner.and_then(|w| values.iter().position(|v| v.op == w)) {
        let first = values.remove(position);
        values.insert(0, first);
    }
    values
}

/// Writes `canonical` as the value of `key` in the version stored under `entry_key`. Returns
/// the register it made, when the key had none.
pub(crate) fn put<T: Transactable>(
    tx: &mut T,
    settings: &ObjId,
    key: &str,
    entry_key: &str,
    canonical: &str,
) -> Result<Option<ObjId>, AutomergeError> {
    let registers = registers_of(tx, settings, key)?;
    let Some(target) = registers.last() else {
        let register = tx.put_object(settings, key, ObjType::Map)?;
        tx.put(&register, entry_key, canonical)?;
        return Ok(Some(register));
    };
    delete_entries(tx, &registers)?;
    tx.put(target, entry_key, canonical)?;
    Ok(None)
}

/// Deletes every value of `key` this document sees.
pub(crate) fn delete<T: Transactable>(tx: &mut T, settings: &ObjId, key: &str) -> Result<(), AutomergeError> {
    let registers = registers_of(tx, settings, key)?;
    if registers.is_empty() {
        return tx.delete(settings, key);
    }
    delete_entries(tx, &registers)
}

fn registers_of<T: Transactable>(tx: &T, settings: &ObjId, key: &str) -> Result<Vec<ObjId>, AutomergeError> {
    Ok(tx
        .get_all(settings, key)?
        .into_iter()
        .filter(|(value, _)| matches!(value, AmValue::Object(ObjType::Map)))
        .map(|(_, id)| id)
        .collect())
}

fn delete_entries<T: Transactable>(tx: &mut T, registers: &[ObjId]) -> Result<(), AutomergeError> {
    for register in registers {
        let entries: Vec<String> = tx.map_range(register, ..).map(|item| item.key.into_owned()).collect();
        for entry in entries {
            tx.delete(register, entry.as_str())?;
        }
    }
    Ok(())
}
