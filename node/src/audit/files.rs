//! The audit files in `<data-dir>/audit/`: one chain file per node (`<node>.jsonl`), this
//! node's own (appended and fsynced before the action's answer is logged as audited) and the
//! copies of its peers' chains that gossip brought. A line is a record, or a gap a copy never
//! received. Each file is bounded: past [`AUDIT_FILE_BYTES_MAX`] its oldest half is dropped
//! (retention), which `audit verify` reports as the chain starting later.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
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
    /// Opens (creates) the audit folder of `data_dir` for node `own`. A file cut short by a
    /// crash loses its torn last line; a file that does not read is set aside (`.bad`, logged),
    /// so a damaged copy never stops the node.
    pub fn open(data_dir: &Path, own: &str) -> Result<AuditFiles, String> {
        let dir = data_dir.join(AUDIT_DIR);
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let mut heads = BTreeMap::new();
        let mut recent = VecDeque::new();
        for (node, path) in chain_files(&dir)? {
            cut_torn_tail(&path)?;
            // Only the last records are kept: a chain file can be large, and there can be many.
            let keep = if node == own { AUDIT_RECENT } else { 1 };
            match last_records(&path, keep) {
                Ok(last) => {
                    if let Some(head) = last.back() {
                        heads.insert(node.clone(), (head.seq, head.hash.clone()));
                    }
                    if node == own {
                        recent = last;
                    }
                }
                Err(error) => {
                    let aside = path.with_extension(format!("jsonl.bad-{}", crate::wall_clock::unix_millis()));
                    tracing::error!(%error, aside = %aside.display(), "an audit file does not read: set aside, a new one started");
                    std::fs::rename(&path, &aside)
                        .map_err(|error| format!("cannot set {} aside: {error}", path.display()))?;
                }
            }
        }
        Ok(AuditFiles { dir, own: own.to_owned(), heads, recent })
    }

    /// Seals `record` as this node's next and appends it (fsynced).
    pub fn append_own(&mut self, mut record: AuditRecord) -> Result<AuditRecord, String> {
        record.node = self.own.clone();
        for field in [&mut record.who, &mut record.from, &mut record.action, &mut record.outcome] {
            cut(field);
        }
        for field in [record.detail.as_mut(), record.group.as_mut()].into_iter().flatten() {
            cut(field);
        }
        let sealed = match self.heads.get(&self.own) {
            Some((seq, hash)) => record.seal_at(seq + 1, hash),
            None => record.seal_after(None),
        };
        let line = serde_json::to_string(&sealed).map_err(|error| error.to_string())?;
        self.append_lines(&self.own.clone(), &[line])?;
        self.heads.insert(self.own.clone(), (sealed.seq, sealed.hash.clone()));
        self.recent.push_back(sealed.clone());
        if self.recent.len() > AUDIT_RECENT {
            self.recent.pop_front();
        }
        Ok(sealed)
    }

    /// The audit folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This node's last records, oldest first.
    pub fn recent(&self) -> impl Iterator<Item = &AuditRecord> {
        self.recent.iter()
    }

    /// The last place held of each node's chain.
    pub fn heads(&self) -> BTreeMap<String, u64> {
        self.heads.iter().map(|(node, (seq, _))| (node.clone(), *seq)).collect()
    }

    /// The last place held of `node`'s chain (0: none).
    pub fn head(&self, node: &str) -> u64 {
        self.heads.get(node).map_or(0, |(seq, _)| *seq)
    }

    /// Appends peers' records (sorted by node, then place) to their copies, each the next one
    /// held (a gap line first when records were missed); one fsync per file. A record out of
    /// bounds is not kept. A record that does not link to the head held means the node's chain
    /// was started again (a wiped or replaced host): the old copy is kept aside
    /// (`<node>.jsonl.replaced-<ms>`) and a new one begins. Returns how many were added.
    pub fn append_copies(&mut self, records: &[AuditRecord]) -> Result<usize, String> {
        let mut added = 0;
        let mut index = 0;
        while index < records.len() {
            let node = records[index].node.clone();
            let mut lines = Vec::new();
            while index < records.len() && records[index].node == node {
                let record = &records[index];
                index += 1;
                if record.node == self.own || !in_bounds(record) {
                    continue;
                }
                let held = self.heads.get(&node).cloned();
                match &held {
                    Some((seq, _)) if record.seq <= *seq => continue,
                    None if self.heads.len() >= AUDIT_NODES_MAX => continue,
                    Some((seq, hash)) if record.seq == seq + 1 && record.prev != *hash => {
                        self.append_lines(&node, &lines)?;
                        lines.clear();
                        let path = self.dir.join(format!("{node}.jsonl"));
                        let aside = path.with_extension(format!("jsonl.replaced-{}", crate::wall_clock::unix_millis()));
                        std::fs::rename(&path, &aside)
                            .map_err(|error| format!("cannot set {} aside: {error}", path.display()))?;
                        tracing::warn!(%node, aside = %aside.display(), "a node's audit chain started again (a wiped or replaced host): its old copy is kept aside");
                    }
                    Some((seq, _)) if record.seq > seq + 1 => {
                        let gap = GapLine { gap: GapSpan { from: seq + 1, to: record.seq - 1 } };
                        lines.push(serde_json::to_string(&gap).map_err(|error| error.to_string())?);
                    }
                    _ => {}
                }
                lines.push(serde_json::to_string(record).map_err(|error| error.to_string())?);
                self.heads.insert(node.clone(), (record.seq, record.hash.clone()));
                added += 1;
            }
            self.append_lines(&node, &lines)?;
        }
        Ok(added)
    }

    /// Appends `lines` to `node`'s file with one fsync; drops the oldest half first when full.
    fn append_lines(&self, node: &str, lines: &[String]) -> Result<(), String> {
        if lines.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!("{node}.jsonl"));
        let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
        let size = std::fs::metadata(&path).map(|meta| meta.len()).unwrap_or(0);
        if size + text.len() as u64 > AUDIT_FILE_BYTES_MAX {
            keep_newest_half(&path)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let write = options.open(&path).and_then(|mut file| {
            file.write_all(text.as_bytes())?;
            file.sync_data()
        });
        write.map_err(|error| format!("cannot append to {}: {error}", path.display()))
    }
}

/// Whether a peer's record is one this node could have written: its fields within the caps
/// `append_own` applies, its hashes hex, its line short enough to read back.
fn in_bounds(record: &AuditRecord) -> bool {
    let short = |text: &str| text.chars().count() <= AUDIT_FIELD_CHARS_MAX;
    let hex64 = |text: &str| text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit());
    crate::pki::validate_node_id(&record.node).is_ok()
        && record.seq > 0
        && [&record.who, &record.from, &record.action, &record.outcome].into_iter().all(|field| short(field))
        && [&record.detail, &record.group].into_iter().flatten().all(|field| short(field))
        && hex64(&record.prev)
        && hex64(&record.hash)
        && serde_json::to_string(record).is_ok_and(|line| line.len() < AUDIT_LINE_BYTES_MAX)
}

/// The chain files of an audit folder, by node.
fn chain_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(error) => return Err(format!("cannot read {}: {error}", dir.display())),
    };
    for entry in entries {
        let path = entry.map_err(|error| error.to_string())?.path();
        let node = path.file_name().and_then(|name| name.to_str()).and_then(|name| name.strip_suffix(".jsonl"));
        if let Some(node) = node.filter(|node| crate::pki::validate_node_id(node).is_ok()) {
            files.push((node.to_owned(), path.clone()));
        }
    }
    files.sort();
    Ok(files)
}

/// Cuts a last line a crash left without its newline (an append is not atomic).
fn cut_torn_tail(path: &Path) -> Result<(), String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let fail = |error: std::io::Error| format!("cannot repair {}: {error}", path.display());
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(fail)?;
    let size = file.metadata().map_err(fail)?.len();
    if size == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(size - 1)).and_then(|_| file.read_exact(&mut last)).map_err(fail)?;
    if last[0] == b'\n' {
        return Ok(());
    }
    // Find the end of the last whole line, reading backwards in steps.
    let mut end = size;
    let mut buffer = vec![0u8; 64 << 10];
    while end > 0 {
        let step = end.min(buffer.len() as u64);
        file.seek(SeekFrom::Start(end - step))
            .and_then(|_| file.read_exact(&mut buffer[..step as usize]))
            .map_err(fail)?;
        if let Some(at) = buffer[..step as usize].iter().rposition(|byte| *byte == b'\n') {
            end = end - step + at as u64 + 1;
            break;
        }
        end -= step;
    }
    file.set_len(end).and_then(|()| file.sync_data()).map_err(fail)?;
    tracing::warn!(file = %path.display(), cut_bytes = size - end, "an audit file ended in a torn line (a crash during an append): cut");
    Ok(())
}

/// The last `keep` records of a chain file, read as a stream.
fn last_records(path: &Path, keep: usize) -> Result<VecDeque<AuditRecord>, String> {
    let mut last = VecDeque::new();
    for_each_line(path, |line| {
        if let Line::Record(record) = line {
            if last.len() == keep {
                last.pop_front();
            }
            last.push_back(*record);
        }
        Ok(())
    })
    .map_err(ReadError::into_text)?;
    Ok(last)
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

/// The newest `max` records of the folder that match `query`, oldest first, and whether more
/// matched; memory stays bounded by `max` whatever the files hold. It reads while the node
/// appends and renames: a file gone since the listing is skipped, and a last line still being
/// written is not read (`for_each_line`). `gone` is asked every file and every 4,096 lines: the
/// caller went away, stop.
pub fn query(
    dir: &Path,
    query: &super::Query,
    max: usize,
    gone: &dyn Fn() -> bool,
) -> Result<(Vec<AuditRecord>, bool), String> {
    let mut kept: BTreeMap<(u64, String, u64), AuditRecord> = BTreeMap::new();
    let mut truncated = false;
    let mut lines = 0u64;
    for (node, path) in chain_files(dir)? {
        if query.node.as_deref().is_some_and(|wanted| wanted != node) {
            continue;
        }
        if gone() {
            return Err("the caller stopped waiting".to_owned());
        }
        let read = for_each_line(&path, |line| {
            lines += 1;
            if lines.is_multiple_of(4_096) && gone() {
                return Err("the caller stopped waiting".to_owned());
            }
            let Line::Record(record) = line else { return Ok(()) };
            if query.since_ms.is_some_and(|since| record.at_ms < since)
                || query.group.as_ref().is_some_and(|group| record.group.as_ref() != Some(group))
            {
                return Ok(());
            }
            let place = (record.at_ms, record.node.clone(), record.seq);
            if kept.len() == max && kept.first_key_value().is_some_and(|(oldest, _)| place <= *oldest) {
                truncated = true;
                return Ok(());
            }
            kept.insert(place, *record);
            if kept.len() > max {
                truncated = true;
                kept.pop_first();
            }
            Ok(())
        });
        match read {
            Ok(()) => {}
            // Set aside (a restarted chain, an unreadable copy) since the listing.
            Err(ReadError::Missing) => continue,
            Err(ReadError::Other(error)) => return Err(error),
        }
    }
    Ok((kept.into_values().collect(), truncated))
}

/// Every chain in an audit folder, by node (for `konorctl audit`).
pub fn read_dir(dir: &Path) -> Result<BTreeMap<String, Vec<Line>>, String> {
    let mut chains = BTreeMap::new();
    for (node, path) in chain_files(dir)? {
        chains.insert(node, read_chain(&path)?);
    }
    Ok(chains)
}

/// One chain file's lines. A line that does not read is an error naming it: an audit log that
/// does not read is itself a finding.
pub fn read_chain(path: &Path) -> Result<Vec<Line>, String> {
    let mut lines = Vec::new();
    for_each_line(path, |line| {
        lines.push(line);
        Ok(())
    })
    .map_err(ReadError::into_text)?;
    Ok(lines)
}

/// Why a chain file was not read to its end.
enum ReadError {
    /// It is not there (anymore).
    Missing,
    /// Anything else, said for the operator (or the caller's own reason to stop).
    Other(String),
}

impl ReadError {
    fn into_text(self) -> String {
        match self {
            ReadError::Missing => "the file is gone".to_owned(),
            ReadError::Other(error) => error,
        }
    }
}

impl From<String> for ReadError {
    fn from(error: String) -> ReadError {
        ReadError::Other(error)
    }
}

/// Calls `each` with every line of a chain file, in order. A last line without its newline is
/// not read: it is being appended now (or a crash tore it, which the node cuts at start).
fn for_each_line(path: &Path, mut each: impl FnMut(Line) -> Result<(), String>) -> Result<(), ReadError> {
    use std::io::BufRead as _;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(error) => return Err(format!("cannot read {}: {error}", path.display()).into()),
    };
    let meta = file.metadata().map_err(|error| error.to_string())?;
    if meta.len() > AUDIT_FILE_BYTES_MAX + AUDIT_LINE_BYTES_MAX as u64 {
        return Err(format!("{} is larger than {AUDIT_FILE_BYTES_MAX} bytes", path.display()).into());
    }
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    for index in 1.. {
        line.clear();
        let read = std::io::Read::take(&mut reader, AUDIT_LINE_BYTES_MAX as u64 + 2)
            .read_until(b'\n', &mut line)
            .map_err(|error| format!("{} line {index}: {error}", path.display()))?;
        if read == 0 || line.last() != Some(&b'\n') {
            if line.len() > AUDIT_LINE_BYTES_MAX {
                return Err(
                    format!("{} line {index} is longer than {AUDIT_LINE_BYTES_MAX} bytes", path.display()).into()
                );
            }
            return Ok(());
        }
        line.pop();
        if line.len() > AUDIT_LINE_BYTES_MAX {
            return Err(format!("{} line {index} is longer than {AUDIT_LINE_BYTES_MAX} bytes", path.display()).into());
        }
        let parsed = if line.starts_with(b"{\"gap\"") {
            serde_json::from_slice::<GapLine>(&line).map(|gap| Line::Gap { from: gap.gap.from, to: gap.gap.to })
        } else {
            serde_json::from_slice::<AuditRecord>(&line).map(|record| Line::Record(Box::new(record)))
        };
        each(parsed.map_err(|error| format!("{} line {index} does not read: {error}", path.display()))?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::verify;

    #[test]
    fn a_chain_started_again_sets_the_old_copy_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = AuditFiles::open(dir.path(), "n1").unwrap();
        let mut before = AuditFiles::open(&dir.path().join("old"), "n2").unwrap();
        let old: Vec<AuditRecord> = (0..2).map(|_| before.append_own(record("release")).unwrap()).collect();
        assert_eq!(files.append_copies(&old).unwrap(), 2);
        // n2's data dir wiped: its chain starts again at 1.
        let mut after = AuditFiles::open(&dir.path().join("new"), "n2").unwrap();
        let new: Vec<AuditRecord> = (0..3).map(|_| after.append_own(record("abort")).unwrap()).collect();
        assert_eq!(
            files.append_copies(&new).unwrap(),
            1,
            "records 1-2 look held; 3 does not link and starts a new copy"
        );
        let chains = read_dir(&dir.path().join(AUDIT_DIR)).unwrap();
        assert!(verify("n2", &chains["n2"]).is_empty(), "{:?}", verify("n2", &chains["n2"]));
        let aside = std::fs::read_dir(dir.path().join(AUDIT_DIR))
            .unwrap()
            .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().starts_with("n2.jsonl.replaced-"))
            .count();
        assert_eq!(aside, 1);
    }

    #[test]
    fn an_oversized_peer_record_is_not_copied_and_a_torn_or_bad_file_does_not_stop_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = AuditFiles::open(dir.path(), "n1").unwrap();
        let mut theirs = AuditFiles::open(&dir.path().join("n2"), "n2").unwrap();
        let mut big = theirs.append_own(record("release")).unwrap();
        big.detail = Some("x".repeat(AUDIT_FIELD_CHARS_MAX + 1));
        big.hash = big.computed_hash();
        assert_eq!(files.append_copies(&[big]).unwrap(), 0);

        files.append_own(record("group_create")).unwrap();
        let own = dir.path().join(AUDIT_DIR).join("n1.jsonl");
        let mut text = std::fs::read_to_string(&own).unwrap();
        text.push_str("{\"node\":\"n1\",\"se");
        std::fs::write(&own, &text).unwrap();
        std::fs::write(dir.path().join(AUDIT_DIR).join("n3.jsonl"), "not json\n").unwrap();
        let mut files = AuditFiles::open(dir.path(), "n1").unwrap();
        assert_eq!(files.append_own(record("revoke")).unwrap().seq, 2, "the torn line was cut");
        let chains = read_dir(&dir.path().join(AUDIT_DIR)).unwrap();
        assert!(verify("n1", &chains["n1"]).is_empty());
        assert!(!chains.contains_key("n3"), "the unreadable copy was set aside");
    }

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
    fn a_query_keeps_the_newest_that_match_and_skips_a_line_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = AuditFiles::open(dir.path(), "n1").unwrap();
        for at_ms in 1..=10 {
            let group = (at_ms % 2 == 0).then(|| "shop".to_owned());
            files.append_own(AuditRecord { at_ms, group, ..record("release") }).unwrap();
        }
        let never = || false;
        let at = |records: &[AuditRecord]| records.iter().map(|r| r.at_ms).collect::<Vec<_>>();
        let all = super::super::Query::default();
        let (records, truncated) = query(files.dir(), &all, 3, &never).unwrap();
        assert_eq!((at(&records), truncated), (vec![8, 9, 10], true));
        let (records, truncated) = query(files.dir(), &all, 10, &never).unwrap();
        assert_eq!((records.len(), truncated), (10, false));
        let shop_since_5 = super::super::Query { since_ms: Some(5), group: Some("shop".to_owned()), node: None };
        let (records, truncated) = query(files.dir(), &shop_since_5, 10, &never).unwrap();
        assert_eq!((at(&records), truncated), (vec![6, 8, 10], false));
        let other_node = super::super::Query { node: Some("n2".to_owned()), ..Default::default() };
        assert!(query(files.dir(), &other_node, 10, &never).unwrap().0.is_empty());
        // A line still being appended (no newline yet) is not read, not an error.
        let path = files.dir().join("n1.jsonl");
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"node\":\"n1\",\"se").unwrap();
        assert_eq!(query(files.dir(), &all, 100, &never).unwrap().0.len(), 10);
        // A caller that went away stops the read.
        assert!(query(files.dir(), &all, 100, &|| true).is_err());
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
        let picked: Vec<AuditRecord> = [0, 1, 1, 4].into_iter().map(|at| copies[at].clone()).collect();
        assert_eq!(files.append_copies(&picked).unwrap(), 3);
        let chains = read_dir(&dir.path().join(AUDIT_DIR)).unwrap();
        assert!(verify("n1", &chains["n1"]).is_empty());
        assert_eq!(files.heads()["n2"], 5);
        assert_eq!(chains["n2"].len(), 4, "two records, a gap, one record: {:?}", chains["n2"]);
        assert!(verify("n2", &chains["n2"]).is_empty());
    }
}
