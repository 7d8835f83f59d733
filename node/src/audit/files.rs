//! The audit files in `<data-dir>/audit/`: one chain file per node (`<node>.jsonl`), this
//! node's own (appended and fsynced before the action's answer is logged as audited) and the
//! copies of its peers' chains that gossip brought. A line is a record, or a gap a copy never
//! received. Each file is bounded: past [`AUDIT_FILE_BYTES_MAX`] its oldest half is dropped
//! (retention), which `audit verify` reports as the chain starting later.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::chain::{AuditRecord, Line};

/// The folder in the data dir.
pub const AUDIT_DIR: &str = "audit";

/// Largest chain file, per node: about 40,000 records. Past it the oldest half goes.
pub const AUDIT_FILE_BYTES_MAX: u64 = 16 << 20;

/// Longest line read: a record's free-text fields are cut to [`AUDIT_FIELD_CHARS_MAX`].
pub const AUDIT_LINE_BYTES_MAX: usize = 8 << 10;

/// Longest `who`, `from` or `detail` kept in a record.
pub const AUDIT_FIELD_CHARS_MAX: usize = 256;

/// Most chain files (nodes) a node keeps copies of: twice a mesh's cap, for nodes gone and
/// replaced; a copy of a further node is not kept (logged).
pub const AUDIT_NODES_MAX: usize = 2 * crate::limits::MESH_NODES_MAX;

/// Own records kept in memory for gossip (the last ones).
pub const AUDIT_RECENT: usize = 32;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GapLine {
    gap: GapSpan,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GapSpan {
    from: u64,
    to: u64,
}

/// The audit files of one node.
#[derive(Debug)]
pub struct AuditFiles {
    dir: PathBuf,
    own: String,
    /// The last place held of each node's chain.
    heads: BTreeMap<String, (u64, String)>,
    /// This node's last records, newest last.
    recent: VecDeque<AuditRecord>,
}

impl AuditFiles {
    /// Opens (creates) the audit folder of `data_dir` for node `own`.
    pub fn open(data_dir: &Path, own: &str) -> Result<AuditFiles, String> {
        let dir = data_dir.join(AUDIT_DIR);
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let mut heads = BTreeMap::new();
        let mut recent = VecDeque::new();
        for (node, lines) in read_dir(&dir)? {
            let records: Vec<&AuditRecord> = lines
                .iter()
                .filter_map(|line| match line {
                    Line::Record(record) => Some(record.as_ref()),
                    Line::Gap { .. } => None,
                })
                .collect();
            if let Some(last) = records.last() {
                heads.insert(node.clone(), (last.seq, last.hash.clone()));
            }
            if node == own {
                recent = records.iter().rev().take(AUDIT_RECENT).rev().map(|record| (*record).clone()).collect();
            }
        }
        Ok(AuditFiles { dir, own: own.to_owned(), heads, recent })
    }

    /// Seals `record` as this node's next and appends it (fsynced).
    pub fn append_own(&mut self, mut record: AuditRecord) -> Result<AuditRecord, String> {
        record.node = self.own.clone();
        for field in [&mut record.who, &mut record.from] {
            cut(field);
        }
        if let Some(detail) = record.detail.as_mut() {
            cut(detail);
        }
        let sealed = match self.heads.get(&self.own) {
            Some((seq, hash)) => record.seal_at(seq + 1, hash),
            None => record.seal_after(None),
        };
        self.append_line(&self.own.clone(), &serde_json::to_string(&sealed).map_err(|error| error.to_string())?)?;
        self.heads.insert(self.own.clone(), (sealed.seq, sealed.hash.clone()));
        self.recent.push_back(sealed.clone());
        if self.recent.len() > AUDIT_RECENT {
            self.recent.pop_front();
        }
        Ok(sealed)
    }

    /// This node's last records, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &AuditRecord> {
        self.recent.iter()
    }

    /// The last place held of `node`'s chain (0: none).
    pub fn head(&self, node: &str) -> u64 {
        self.heads.get(node).map_or(0, |(seq, _)| *seq)
    }

    /// Appends a peer's record to its copy if it is the next one held (a gap line first when
    /// records were missed). `Ok(false)`: already held, or not kept.
    pub fn append_copy(&mut self, record: &AuditRecord) -> Result<bool, String> {
        if record.node == self.own || crate::pki::validate_node_id(&record.node).is_err() {
            return Ok(false);
        }
        let held = self.head(&record.node);
        if record.seq <= held {
            return Ok(false);
        }
        if held == 0 && !self.heads.contains_key(&record.node) && self.heads.len() >= AUDIT_NODES_MAX {
            return Ok(false);
        }
        if held > 0 && record.seq > held + 1 {
            let gap = GapLine { gap: GapSpan { from: held + 1, to: record.seq - 1 } };
            self.append_line(&record.node, &serde_json::to_string(&gap).map_err(|error| error.to_string())?)?;
        }
        self.append_line(&record.node, &serde_json::to_string(record).map_err(|error| error.to_string())?)?;
        self.heads.insert(record.node.clone(), (record.seq, record.hash.clone()));
        Ok(true)
    }

    /// Appends `line` to `node`'s file, fsynced; drops the oldest half first when it is full.
    fn append_line(&self, node: &str, line: &str) -> Result<(), String> {
        let path = self.dir.join(format!("{node}.jsonl"));
        let size = std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
        if size + line.len() as u64 + 1 > AUDIT_FILE_BYTES_MAX {
            keep_newest_half(&path)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let write = options.open(&path).and_then(|mut file| {
            file.write_all(format!("{line}\n").as_bytes())?;
            file.sync_data()
        });
        write.map_err(|error| format!("cannot append to {}: {error}", path.display()))
    }
}

/// Retention: rewrites `path` with its newest half of lines.
fn keep_newest_half(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let kept = lines[lines.len() / 2..].join("\n") + "\n";
    crate::storage::replace_file::replace_durably(path, kept.as_bytes())
        .map_err(|error| format!("cannot rewrite {}: {error}", path.display()))
}

/// Cuts a free-text field to [`AUDIT_FIELD_CHARS_MAX`] characters.
fn cut(text: &mut String) {
    if let Some((at, _)) = text.char_indices().nth(AUDIT_FIELD_CHARS_MAX) {
        text.truncate(at);
    }
}

/// Every chain in an audit folder, by node (for `konorctl audit`, and at open).
pub fn read_dir(dir: &Path) -> Result<BTreeMap<String, Vec<Line>>, String> {
    let mut chains = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(chains),
        Err(error) => return Err(format!("cannot read {}: {error}", dir.display())),
    };
    for entry in entries {
        let path = entry.map_err(|error| error.to_string())?.path();
        let Some(node) = path.file_name().and_then(|name| name.to_str()).and_then(|name| name.strip_suffix(".jsonl"))
        else {
            continue;
        };
        chains.insert(node.to_owned(), read_chain(&path)?);
    }
    Ok(chains)
}

/// One chain file's lines. A line that does not read is an error naming it: an audit log that
/// does not read is itself a finding.
pub fn read_chain(path: &Path) -> Result<Vec<Line>, String> {
    let file = std::fs::File::open(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let meta = file.metadata().map_err(|error| error.to_string())?;
    if meta.len() > AUDIT_FILE_BYTES_MAX + AUDIT_LINE_BYTES_MAX as u64 {
        return Err(format!("{} is larger than {AUDIT_FILE_BYTES_MAX} bytes", path.display()));
    }
    let mut lines = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|error| format!("{} line {}: {error}", path.display(), index + 1))?;
        if line.len() > AUDIT_LINE_BYTES_MAX {
            return Err(format!("{} line {} is longer than {AUDIT_LINE_BYTES_MAX} bytes", path.display(), index + 1));
        }
        let parsed = if line.starts_with("{\"gap\"") {
            serde_json::from_str::<GapLine>(&line).map(|gap| Line::Gap { from: gap.gap.from, to: gap.gap.to })
        } else {
            serde_json::from_str::<AuditRecord>(&line).map(|record| Line::Record(Box::new(record)))
        };
        lines.push(parsed.map_err(|error| format!("{} line {} does not read: {error}", path.display(), index + 1))?);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::verify;

    fn record(action: &str) -> AuditRecord {
        AuditRecord {
            node: String::new(),
            seq: 0,
            at_ms: 1,
            who: "cert:ops".to_owned(),
            from: "127.0.0.1:1".to_owned(),
            action: action.to_owned(),
            group: None,
            detail: None,
            outcome: "ok".to_owned(),
            prev: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn own_records_chain_across_a_reopen_and_copies_note_their_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = AuditFiles::open(dir.path(), "n1").unwrap();
        files.append_own(record("group_create")).unwrap();
        drop(files);
        let mut files = AuditFiles::open(dir.path(), "n1").unwrap();
        let second = files.append_own(record("revoke")).unwrap();
        assert_eq!(second.seq, 2);

        // n2's records 1, 2, then 5: a gap of 3-4.
        let mut theirs = AuditFiles::open(&dir.path().join("n2"), "n2").unwrap();
        let copies: Vec<AuditRecord> = (0..5).map(|_| theirs.append_own(record("release")).unwrap()).collect();
        for at in [0, 1, 1, 4] {
            files.append_copy(&copies[at]).unwrap();
        }
        let chains = read_dir(&dir.path().join(AUDIT_DIR)).unwrap();
        assert!(verify("n1", &chains["n1"]).is_empty());
        assert_eq!(chains["n2"].len(), 4, "two records, a gap, one record: {:?}", chains["n2"]);
        assert!(verify("n2", &chains["n2"]).is_empty());
    }
}
