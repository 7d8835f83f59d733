//! The simulated disk. Each node's store gets a [`StorageHook`] that reports every write, fsync,
//! rename and truncation here, so the simulator knows, per file, the bytes written, the length
//! an fsync made durable, and whether the file's name is durable (a rename or creation covered by
//! an fsync of its directory). Group files are parsed as they are appended (the record frames of
//! `konor_crdt::record`: snapshots, changes, strong round records), so the protocol checks ask
//! here what a node holds durably instead of reading its files: a change, a round staged with its
//! change, a ballot's decision accepted.
//!
//! The same hook injects disk faults (a full disk, write errors, a failed fsync, torn writes),
//! and [`Disk::crash`] applies a crash as a power cut would: every file cut back to its durable
//! length (or, by a seeded draw, to a torn prefix of the unsynced tail), and a rename no directory
//! fsync covered undone (or kept). What survives a crash is on disk from then on.
//!
//! Choices here (torn lengths, crash outcomes) draw from the run's disk stream, never from the
//! workload's, so the same seed and options give the same run.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use konor_crdt::journal::RoundRecord;
use konor_crdt::limits::RECORD_PAYLOAD_BYTES_MAX;
use konor_crdt::peer_message::{Ballot, RoundId};
use konor_crdt::record::{FILE_MAGIC, FRAME_BYTES, HEADER_BYTES, RecordKind};
use konor_node::storage::store::{StorageHook, WriteFault};

use crate::rng::SimRng;

/// A change hash's bytes.
pub type Hash = [u8; 32];

/// Where a node's disk reports the faults it injects: the run's trace, at the network's clock
/// ([`crate::node`] passes the network's). A function, so that the disk needs nothing of the
/// network, whose frame checks ask the disk what is durable.
pub type FaultTrace = Arc<dyn Fn(&str) + Send + Sync>;

/// The seeded stream of the disk's own choices (the network has 1, the workload and faults 2).
const DISK_STREAM: u64 = 3;

/// Chance that a crash leaves a torn prefix of a file's unsynced tail instead of cutting it
/// whole, and that it keeps a rename no directory fsync covered.
const CRASH_KEEPS_CHANCE: f64 = 0.5;

/// `errno` of a full disk (ENOSPC).
const ENOSPC: i32 = 28;

/// `errno` of an I/O error (EIO).
const EIO: i32 = 5;

/// What a faulty disk does, for a while, to one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// Every write fails with ENOSPC, nothing written.
    Full,
    /// Every write fails with EIO, nothing written.
    WriteError,
    /// The next fsync of a file (or, with `directory`, of a directory: the one that makes a
    /// rename or creation durable) fails with EIO; then the disk is healthy.
    FsyncError {
        /// A directory's fsync fails rather than a file's.
        directory: bool,
    },
    /// Every write puts a random prefix of its bytes in the file, then fails with EIO.
    Torn,
}

impl DiskFault {
    /// Every kind, in the order the fault loop draws from (it then draws whether an fsync
    /// fault hits a file or a directory).
    pub const ALL: [DiskFault; 4] =
        [DiskFault::Full, DiskFault::WriteError, DiskFault::FsyncError { directory: false }, DiskFault::Torn];

    /// How the fault log names it.
    pub fn name(self) -> &'static str {
        match self {
            DiskFault::Full => "full (ENOSPC)",
            DiskFault::WriteError => "write errors (EIO)",
            DiskFault::FsyncError { directory: false } => "one failed fsync of a file",
            DiskFault::FsyncError { directory: true } => "one failed fsync of a directory",
            DiskFault::Torn => "torn writes",
        }
    }
}

/// What the disk did over a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskStats {
    /// Writes failed with nothing written (ENOSPC or EIO).
    pub writes_failed: u64,
    /// Writes torn (a prefix written, then EIO).
    pub writes_torn: u64,
    /// fsyncs failed.
    pub fsyncs_failed: u64,
    /// Crashes applied.
    pub crashes: u64,
    /// Bytes written but not durable that crashes dropped.
    pub crash_bytes_dropped: u64,
    /// Unsynced tails a crash left torn (a prefix kept).
    pub crash_torn_tails: u64,
    /// Renames (or creations) a crash undid because no directory fsync covered them.
    pub crash_renames_undone: u64,
}

/// A snapshot record of a group file; which changes it holds is worked out on first need
/// (loading an Automerge document is the costly part of the model).
#[derive(Debug)]
struct SnapshotRecord {
    kind: RecordKind,
    payload: Range<usize>,
    end: usize,
    hashes: Option<BTreeSet<Hash>>,
}

/// What the complete record frames of a group file say, each fact with the end offset of the
/// first record that states it (durable once the synced length reaches it).
#[derive(Debug, Default)]
struct Frames {
    /// Offset up to which frames were parsed; 0 until the header is in.
    parsed: usize,
    /// The bytes stopped looking like a group file (no magic, a length over the limit): nothing
    /// more is parsed until a truncation cuts back before that point.
    stuck: bool,
    /// The end of every parsed record, in file order.
    ends: Vec<usize>,
    changes: BTreeMap<Hash, usize>,
    snapshots: Vec<SnapshotRecord>,
    /// Staged rounds: the hash of the staged change (if it decodes) and the record's end.
    staged: BTreeMap<RoundId, (Option<Hash>, usize)>,
    accepted: BTreeMap<(RoundId, Ballot), usize>,
}

impl Frames {
    /// Parses every complete frame of `bytes` after `parsed`.
    fn parse(&mut self, bytes: &[u8]) {
        if self.stuck {
            return;
        }
        if self.parsed == 0 {
            if bytes.len() < HEADER_BYTES {
                return;
            }
            if bytes[..FILE_MAGIC.len()] != FILE_MAGIC {
                self.stuck = true;
                return;
            }
            self.parsed = HEADER_BYTES;
        }
        while bytes.len() - self.parsed >= FRAME_BYTES {
            let start = self.parsed;
            let mut length = [0u8; 4];
            length.copy_from_slice(&bytes[start..start + 4]);
            let length = u32::from_le_bytes(length) as usize;
            if length > RECORD_PAYLOAD_BYTES_MAX {
                self.stuck = true;
                return;
            }
            let end = start + FRAME_BYTES + length;
            if end > bytes.len() {
                return;
            }
            let payload = start + FRAME_BYTES..end;
            match RecordKind::from_byte(bytes[start + 8]) {
                Some(kind @ (RecordKind::Snapshot | RecordKind::SnapshotZstd)) => {
                    self.snapshots.push(SnapshotRecord { kind, payload, end, hashes: None })
                }
                Some(RecordKind::Change) => {
                    if let Some(hash) = change_hash(&bytes[payload]) {
                        self.changes.entry(hash).or_insert(end);
                    }
                }
                Some(RecordKind::RoundV3) => match postcard::from_bytes::<RoundRecord>(&bytes[payload]) {
                    Ok(RoundRecord::Staged { round, change, .. }) => {
                        self.staged.entry(round).or_insert((change_hash(&change), end));
                    }
                    Ok(RoundRecord::Accepted { round, ballot, .. }) => {
                        self.accepted.entry((round, ballot)).or_insert(end);
                    }
                    _ => {}
                },
                _ => {}
            }
            self.ends.push(end);
            self.parsed = end;
        }
    }

    /// Forgets every record that does not end within the first `length` bytes.
    fn truncate(&mut self, length: usize) {
        if self.parsed <= length {
            // Cut exactly where parsing stopped: whatever stopped it is gone.
            if self.parsed == length {
                self.stuck = false;
            }
            return;
        }
        while self.ends.last().is_some_and(|end| *end > length) {
            self.ends.pop();
        }
        self.parsed = match self.ends.last() {
            Some(end) => *end,
            None if length >= HEADER_BYTES => HEADER_BYTES,
            None => 0,
        };
        self.stuck = false;
        self.changes.retain(|_, end| *end <= length);
        self.snapshots.retain(|s| s.end <= length);
        self.staged.retain(|_, (_, end)| *end <= length);
        self.accepted.retain(|_, end| *end <= length);
    }
}

/// The hash of raw change bytes, if they decode.
fn change_hash(bytes: &[u8]) -> Option<Hash> {
    konor_crdt::exchange::decode_change(bytes).ok().map(|change| change.hash().0)
}

/// Every change an Automerge save holds (empty if it does not load).
fn snapshot_hashes(kind: RecordKind, payload: &[u8]) -> BTreeSet<Hash> {
    let Ok(save) = konor_crdt::journal::snapshot_bytes(kind, payload) else { return BTreeSet::new() };
    match automerge::Automerge::load(&save) {
        Ok(doc) => doc.get_changes(&[]).iter().map(|change| change.hash().0).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// One file as the disk holds it.
#[derive(Debug, Default)]
struct FileModel {
    /// Everything written, durable or not (what the running node reads).
    bytes: Vec<u8>,
    /// The length an fsync made durable.
    synced: usize,
    /// The name points here durably: false after a creation or rename until an fsync of the
    /// directory.
    entry_durable: bool,
    /// While the entry is not durable: what the name held durably before (`None`: nothing).
    before: Option<Box<FileModel>>,
    /// While the entry is not durable and came from renaming a file that was not a temp file
    /// (a move to quarantine): where it was.
    renamed_from: Option<PathBuf>,
    /// Record frames, for group files while the checks run.
    frames: Option<Frames>,
}

impl FileModel {
    fn new(path: &Path, parse: bool) -> FileModel {
        FileModel { frames: (parse && is_group_file(path)).then(Frames::default), ..FileModel::default() }
    }

    fn truncate(&mut self, length: usize) {
        self.bytes.resize(length, 0);
        self.synced = self.synced.min(length);
        if let Some(frames) = &mut self.frames {
            frames.truncate(length);
        }
    }

    /// What a crash right now could leave under this name at best: the durable bytes of the
    /// file whose entry is durable.
    fn into_durable(mut self) -> Option<Box<FileModel>> {
        if !self.entry_durable {
            return self.before;
        }
        let synced = self.synced;
        self.truncate(synced);
        self.before = None;
        self.renamed_from = None;
        Some(Box::new(self))
    }

    /// The file a crash would leave under this name, as far as durable facts go.
    fn durable_view(&mut self) -> Option<&mut FileModel> {
        if self.entry_durable {
            return Some(self);
        }
        self.before.as_deref_mut()
    }

    fn has_change(&mut self, hash: &Hash) -> bool {
        let synced = self.synced;
        let Some(frames) = &mut self.frames else { return false };
        if frames.changes.get(hash).is_some_and(|end| *end <= synced) {
            return true;
        }
        let bytes = &self.bytes;
        frames.snapshots.iter_mut().filter(|snapshot| snapshot.end <= synced).any(|snapshot| {
            let (kind, payload) = (snapshot.kind, &bytes[snapshot.payload.clone()]);
            snapshot.hashes.get_or_insert_with(|| snapshot_hashes(kind, payload)).contains(hash)
        })
    }
}

/// `groups/<name>.konor` and its temp file `groups/<name>.konor.tmp`.
fn is_group_file(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".konor") || name.ends_with(".konor.tmp")
}

fn is_temp(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".tmp")
}

/// One node's disk.
#[derive(Debug)]
struct NodeDisk {
    data_dir: PathBuf,
    /// By path relative to the data dir.
    files: BTreeMap<PathBuf, FileModel>,
    /// Files whose entry is not durable yet.
    pending: BTreeSet<PathBuf>,
    /// The fault in force and its generation (so an old fault's end does not end a newer one).
    fault: Option<(DiskFault, u64)>,
}

impl NodeDisk {
    fn file(&mut self, path: &Path, parse: bool) -> &mut FileModel {
        if !self.files.contains_key(path) {
            self.pending.insert(path.to_path_buf());
        }
        self.files.entry(path.to_path_buf()).or_insert_with(|| FileModel::new(path, parse))
    }

    fn group_file(&mut self, group: &str) -> Option<&mut FileModel> {
        self.files.get_mut(Path::new(&format!("groups/{group}.konor")))?.durable_view()
    }
}

/// Every node's disk, the faults in force and the disk's random stream.
#[derive(Debug)]
pub struct DiskState {
    nodes: Vec<NodeDisk>,
    rng: SimRng,
    /// Parse group files (the checks need it; `--check-disk false` turns both off).
    parse: bool,
    next_fault: u64,
    /// What the disk did so far.
    pub stats: DiskStats,
}

impl DiskState {
    /// True when `change` is durable in `node`'s file of `group`.
    pub fn change_durable(&mut self, node: usize, group: &str, change: &Hash) -> bool {
        self.nodes.get_mut(node).and_then(|disk| disk.group_file(group)).is_some_and(|file| file.has_change(change))
    }

    /// True when `node` durably staged `round` of `group` with the change `change`.
    pub fn staged_durable(&mut self, node: usize, group: &str, round: &RoundId, change: &Hash) -> bool {
        let Some(file) = self.nodes.get_mut(node).and_then(|disk| disk.group_file(group)) else { return false };
        let synced = file.synced;
        file.frames
            .as_ref()
            .and_then(|frames| frames.staged.get(round))
            .is_some_and(|(staged, end)| staged.as_ref() == Some(change) && *end <= synced)
    }

    /// True when `node` durably recorded a decision of `round` of `group` at `ballot`.
    pub fn accepted_durable(&mut self, node: usize, group: &str, round: &RoundId, ballot: &Ballot) -> bool {
        let Some(file) = self.nodes.get_mut(node).and_then(|disk| disk.group_file(group)) else { return false };
        let synced = file.synced;
        file.frames
            .as_ref()
            .and_then(|frames| frames.accepted.get(&(round.clone(), ballot.clone())))
            .is_some_and(|end| *end <= synced)
    }

    /// A write is about to happen: the fault in force decides how much of it reaches the file.
    fn write(
        &mut self,
        node: usize,
        path: &Path,
        offset: u64,
        bytes: &[u8],
    ) -> (Result<(), WriteFault>, Option<String>) {
        let fault = self.nodes[node].fault.map(|(fault, _)| fault);
        let (written, result, note) = match fault {
            Some(DiskFault::Full) => {
                self.stats.writes_failed += 1;
                let error = io::Error::from_raw_os_error(ENOSPC);
                (
                    0,
                    Err(WriteFault { prefix_bytes: 0, error }),
                    Some(format!("write to {} fails: ENOSPC", path.display())),
                )
            }
            Some(DiskFault::WriteError) => {
                self.stats.writes_failed += 1;
                let error = io::Error::from_raw_os_error(EIO);
                (0, Err(WriteFault { prefix_bytes: 0, error }), Some(format!("write to {} fails: EIO", path.display())))
            }
            Some(DiskFault::Torn) => {
                self.stats.writes_torn += 1;
                let prefix = if bytes.len() >= 2 { self.rng.between(1, bytes.len() as u64 - 1) as usize } else { 0 };
                let error = io::Error::from_raw_os_error(EIO);
                let note = format!("write to {} torn after {prefix} of {} bytes", path.display(), bytes.len());
                (prefix, Err(WriteFault { prefix_bytes: prefix, error }), Some(note))
            }
            Some(DiskFault::FsyncError { .. }) | None => (bytes.len(), Ok(()), None),
        };
        let parse = self.parse;
        let file = self.nodes[node].file(path, parse);
        let offset = usize::try_from(offset).unwrap_or(usize::MAX).min(file.bytes.len());
        file.truncate(offset);
        file.bytes.extend_from_slice(&bytes[..written]);
        if let Some(frames) = &mut file.frames {
            frames.parse(&file.bytes);
        }
        (result, note)
    }

    fn before_sync(&mut self, node: usize, path: &Path) -> (io::Result<()>, Option<String>) {
        let disk = &mut self.nodes[node];
        // Files are known from their writes; anything else synced is a directory.
        if let Some((DiskFault::FsyncError { directory }, _)) = disk.fault
            && directory != disk.files.contains_key(path)
        {
            disk.fault = None;
            self.stats.fsyncs_failed += 1;
            return (Err(io::Error::from_raw_os_error(EIO)), Some(format!("fsync of {} fails: EIO", path.display())));
        }
        (Ok(()), None)
    }

    fn synced(&mut self, node: usize, path: &Path, durable_bytes: u64) {
        let parse = self.parse;
        let file = self.nodes[node].file(path, parse);
        file.synced = usize::try_from(durable_bytes).unwrap_or(usize::MAX).min(file.bytes.len());
    }

    fn synced_dir(&mut self, node: usize, dir: &Path) {
        let disk = &mut self.nodes[node];
        let covered: Vec<PathBuf> = disk.pending.iter().filter(|p| p.parent() == Some(dir)).cloned().collect();
        for path in covered {
            disk.pending.remove(&path);
            if let Some(file) = disk.files.get_mut(&path) {
                file.entry_durable = true;
                file.before = None;
                file.renamed_from = None;
            }
        }
    }

    fn renamed(&mut self, node: usize, from: &Path, to: &Path) {
        let parse = self.parse;
        let disk = &mut self.nodes[node];
        disk.pending.remove(from);
        let mut moved = disk.files.remove(from).unwrap_or_else(|| FileModel::new(to, parse));
        let before = disk.files.remove(to).and_then(FileModel::into_durable);
        if moved.frames.is_none() && parse && is_group_file(to) {
            let mut frames = Frames::default();
            frames.parse(&moved.bytes);
            moved.frames = Some(frames);
        }
        moved.entry_durable = false;
        moved.before = before;
        moved.renamed_from = (!is_temp(from)).then(|| from.to_path_buf());
        disk.pending.insert(to.to_path_buf());
        disk.files.insert(to.to_path_buf(), moved);
    }

    fn truncated(&mut self, node: usize, path: &Path, length: u64) {
        let parse = self.parse;
        let file = self.nodes[node].file(path, parse);
        file.truncate(usize::try_from(length).unwrap_or(usize::MAX));
    }
}

/// The disks of a run; clones are handles to the same disks.
#[derive(Debug, Clone)]
pub struct Disk {
    state: Arc<Mutex<DiskState>>,
}

impl Disk {
    /// Disks for nodes with these data dirs; `parse`: follow the records of group files (the
    /// protocol checks need it).
    pub fn new(seed: u64, data_dirs: &[PathBuf], parse: bool) -> Disk {
        let nodes = data_dirs
            .iter()
            .map(|dir| NodeDisk {
                data_dir: dir.clone(),
                files: BTreeMap::new(),
                pending: BTreeSet::new(),
                fault: None,
            })
            .collect();
        let state =
            DiskState { nodes, rng: SimRng::new(seed, DISK_STREAM), parse, next_fault: 0, stats: DiskStats::default() };
        Disk { state: Arc::new(Mutex::new(state)) }
    }

    /// The disks, locked. The simulation is single-threaded: the lock is never contended. The
    /// network's hub may be locked before this one, never after.
    pub fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The hook node `node`'s store reports to; injected faults go to `trace`.
    pub fn hook(&self, node: usize, trace: FaultTrace) -> Arc<dyn StorageHook> {
        let data_dir = self.lock().nodes[node].data_dir.clone();
        Arc::new(DiskHook { disk: self.clone(), node, data_dir, trace })
    }

    /// Puts `fault` in force on `node`'s disk; returns its generation for [`Disk::end_fault`].
    pub fn start_fault(&self, node: usize, fault: DiskFault) -> u64 {
        let mut state = self.lock();
        state.next_fault += 1;
        let generation = state.next_fault;
        state.nodes[node].fault = Some((fault, generation));
        generation
    }

    /// Ends the fault of that generation if it is still in force; true if it was.
    pub fn end_fault(&self, node: usize, generation: u64) -> bool {
        let mut state = self.lock();
        let disk = &mut state.nodes[node];
        if disk.fault.is_some_and(|(_, g)| g == generation) {
            disk.fault = None;
            return true;
        }
        false
    }

    /// Ends every fault.
    pub fn end_all_faults(&self) {
        for disk in &mut self.lock().nodes {
            disk.fault = None;
        }
    }

    /// What the disk did so far.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    /// A crash of `node` (its task is gone, its files closed): each file keeps its durable
    /// length, or a torn prefix of the unsynced tail; each entry no directory fsync covered is
    /// kept or undone. Returns what changed, for the trace.
    pub fn crash(&self, node: usize) -> Vec<String> {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.stats.crashes += 1;
        let rng = &mut state.rng;
        let stats = &mut state.stats;
        let disk = &mut state.nodes[node];
        let mut notes = Vec::new();
        // Temp files are left as they are: the store removes them at open.
        let pending: Vec<PathBuf> = std::mem::take(&mut disk.pending).into_iter().filter(|p| !is_temp(p)).collect();
        for path in pending {
            let Some(file) = disk.files.get_mut(&path) else { continue };
            if rng.chance(CRASH_KEEPS_CHANCE) {
                file.entry_durable = true;
                file.before = None;
                file.renamed_from = None;
                continue;
            }
            stats.crash_renames_undone += 1;
            let Some(mut file) = disk.files.remove(&path) else { continue };
            let absolute = disk.data_dir.join(&path);
            match file.renamed_from.take() {
                Some(source) if !disk.files.contains_key(&source) => {
                    let _ = std::fs::rename(&absolute, disk.data_dir.join(&source));
                    notes.push(format!("move of {} to {} undone", source.display(), path.display()));
                    file.entry_durable = true;
                    disk.files.insert(source, file);
                }
                _ => match file.before.take() {
                    Some(mut before) => {
                        let _ = std::fs::write(&absolute, &before.bytes);
                        notes.push(format!("replace of {} undone", path.display()));
                        before.entry_durable = true;
                        disk.files.insert(path, *before);
                    }
                    None => {
                        let _ = std::fs::remove_file(&absolute);
                        notes.push(format!("creation of {} undone", path.display()));
                    }
                },
            }
        }
        for (path, file) in &mut disk.files {
            let length = file.bytes.len();
            if length > file.synced {
                let tail = length - file.synced;
                let keep = if tail >= 2 && rng.chance(CRASH_KEEPS_CHANCE) {
                    stats.crash_torn_tails += 1;
                    file.synced + rng.between(1, tail as u64 - 1) as usize
                } else {
                    file.synced
                };
                stats.crash_bytes_dropped += (length - keep) as u64;
                let absolute = disk.data_dir.join(path);
                if let Ok(handle) = std::fs::OpenOptions::new().write(true).open(&absolute) {
                    let _ = handle.set_len(keep as u64);
                }
                notes.push(format!("{}: {} unsynced bytes, {} kept", path.display(), tail, keep - file.synced));
                file.truncate(keep);
            }
            // Whatever survived the crash is on the disk now.
            file.synced = file.bytes.len();
            file.entry_durable = true;
            file.before = None;
            file.renamed_from = None;
        }
        notes
    }
}

/// One node's [`StorageHook`]: reports to the run's [`Disk`].
struct DiskHook {
    disk: Disk,
    node: usize,
    data_dir: PathBuf,
    trace: FaultTrace,
}

impl std::fmt::Debug for DiskHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskHook").field("node", &self.node).field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl DiskHook {
    /// The path under the data dir; `None` for paths outside it (the data dir's parent, synced
    /// when the data dir is created), which the model does not follow.
    fn relative<'a>(&self, path: &'a Path) -> Option<&'a Path> {
        path.strip_prefix(&self.data_dir).ok()
    }

    /// Puts an injected fault in the trace. The disk's lock is released by now: the hub's lock
    /// is never taken while holding it.
    fn trace(&self, note: Option<String>) {
        if let Some(note) = note {
            (self.trace)(&format!("disk n{}: {note}", self.node));
        }
    }
}

impl StorageHook for DiskHook {
    fn before_write(&self, path: &Path, offset: u64, bytes: &[u8]) -> Result<(), WriteFault> {
        let Some(path) = self.relative(path) else { return Ok(()) };
        let (result, note) = self.disk.lock().write(self.node, path, offset, bytes);
        self.trace(note);
        result
    }

    fn before_sync(&self, path: &Path) -> io::Result<()> {
        let relative = self.relative(path).unwrap_or(path);
        let (result, note) = self.disk.lock().before_sync(self.node, relative);
        self.trace(note);
        result
    }

    fn after_sync(&self, path: &Path, durable_bytes: u64) {
        if let Some(path) = self.relative(path) {
            self.disk.lock().synced(self.node, path, durable_bytes);
        }
    }

    fn after_sync_dir(&self, dir: &Path) {
        if let Some(dir) = self.relative(dir) {
            self.disk.lock().synced_dir(self.node, dir);
        }
    }

    fn after_rename(&self, from: &Path, to: &Path) {
        if let (Some(from), Some(to)) = (self.relative(from), self.relative(to)) {
            self.disk.lock().renamed(self.node, from, to);
        }
    }

    fn after_truncate(&self, path: &Path, length: u64) {
        if let Some(path) = self.relative(path) {
            self.disk.lock().truncated(self.node, path, length);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use konor_crdt::journal::{change_record, round_record, snapshot_file};
    use konor_crdt::peer_message::RoundKind;
    use konor_crdt::{ActorId, CommitMeta, GroupDoc, Mode};
    use serde_json::json;

    fn group_with_changes(count: u64) -> (Vec<u8>, Vec<(Hash, Vec<u8>)>) {
        let meta = |n: u64| CommitMeta::new("tester", format!("change {n}"), konor_crdt::Millis(n));
        let (mut group, _) = GroupDoc::create("app", Mode::Eventual, ActorId::from([1; 16]), &meta(0)).unwrap();
        let snapshot = snapshot_file(&group, None).unwrap();
        let changes = (1..=count)
            .map(|n| {
                let commit = group.set(vec![(format!("k{n}"), json!(n))], &meta(n)).unwrap();
                (change_hash(&commit.change).unwrap(), commit.change)
            })
            .collect();
        (snapshot, changes)
    }

    fn state(parse: bool) -> DiskState {
        let nodes = vec![NodeDisk {
            data_dir: PathBuf::from("/nowhere"),
            files: BTreeMap::new(),
            pending: BTreeSet::new(),
            fault: None,
        }];
        DiskState { nodes, rng: SimRng::new(1, DISK_STREAM), parse, next_fault: 0, stats: DiskStats::default() }
    }

    /// The store's atomic replace, as the hook reports it.
    fn write_new(state: &mut DiskState, name: &str, bytes: &[u8]) {
        let temp = PathBuf::from(format!("groups/{name}.tmp"));
        state.truncated(0, &temp, 0);
        let _ = state.write(0, &temp, 0, bytes);
        state.synced(0, &temp, bytes.len() as u64);
        state.renamed(0, &temp, Path::new(&format!("groups/{name}")));
        state.synced_dir(0, Path::new("groups"));
    }

    #[test]
    fn a_change_is_durable_only_once_its_record_is_synced() {
        let mut state = state(true);
        let (snapshot, changes) = group_with_changes(2);
        write_new(&mut state, "app.konor", &snapshot);
        let path = Path::new("groups/app.konor");
        let record = change_record(&changes[0].1).unwrap();
        let _ = state.write(0, path, snapshot.len() as u64, &record);
        assert!(!state.change_durable(0, "app", &changes[0].0), "written, not synced");
        state.synced(0, path, (snapshot.len() + record.len()) as u64);
        assert!(state.change_durable(0, "app", &changes[0].0));
        assert!(!state.change_durable(0, "app", &changes[1].0));
        // A cut-back forgets it.
        state.truncated(0, path, snapshot.len() as u64);
        assert!(!state.change_durable(0, "app", &changes[0].0));
    }

    #[test]
    fn a_replaced_file_counts_only_once_its_directory_is_synced() {
        let mut state = state(true);
        let (snapshot, changes) = group_with_changes(1);
        write_new(&mut state, "app.konor", &snapshot);
        // A new file holding the change, its directory fsync not done yet.
        let mut compacted = snapshot.clone();
        compacted.extend(change_record(&changes[0].1).unwrap());
        let temp = Path::new("groups/app.konor.tmp");
        state.truncated(0, temp, 0);
        let _ = state.write(0, temp, 0, &compacted);
        state.synced(0, temp, compacted.len() as u64);
        state.renamed(0, temp, Path::new("groups/app.konor"));
        assert!(!state.change_durable(0, "app", &changes[0].0), "the old file is what a crash may leave");
        state.synced_dir(0, Path::new("groups"));
        assert!(state.change_durable(0, "app", &changes[0].0));
    }

    #[test]
    fn parsing_resumes_once_damage_is_cut() {
        let mut state = state(true);
        let (snapshot, changes) = group_with_changes(1);
        write_new(&mut state, "app.konor", &snapshot);
        let path = Path::new("groups/app.konor");
        let end = snapshot.len() as u64;
        let _ = state.write(0, path, end, &[0xff; 16]);
        assert!(state.nodes[0].files[path].frames.as_ref().unwrap().stuck, "a length over the limit");
        state.truncated(0, path, end);
        let record = change_record(&changes[0].1).unwrap();
        let _ = state.write(0, path, end, &record);
        state.synced(0, path, end + record.len() as u64);
        assert!(state.change_durable(0, "app", &changes[0].0));
    }

    #[test]
    fn staged_and_accepted_rounds_are_found_by_round_and_ballot() {
        let mut state = state(true);
        let (snapshot, changes) = group_with_changes(1);
        write_new(&mut state, "app.konor", &snapshot);
        let round = RoundId { lamport: 3, node: "n1".to_owned(), start: 9 };
        let ballot = Ballot { number: 0, node: "n1".to_owned() };
        let configuration = konor_crdt::configuration::Configuration::initial("n1");
        let mut records = round_record(&RoundRecord::Staged {
            round: round.clone(),
            change: changes[0].1.clone(),
            kind: RoundKind::Write,
            configuration,
        })
        .unwrap();
        records.extend(
            round_record(&RoundRecord::Accepted { round: round.clone(), ballot: ballot.clone(), commit: true })
                .unwrap(),
        );
        let path = Path::new("groups/app.konor");
        let _ = state.write(0, path, snapshot.len() as u64, &records);
        assert!(!state.staged_durable(0, "app", &round, &changes[0].0));
        state.synced(0, path, (snapshot.len() + records.len()) as u64);
        assert!(state.staged_durable(0, "app", &round, &changes[0].0));
        assert!(!state.staged_durable(0, "app", &round, &[0; 32]), "another change under the same round");
        assert!(state.accepted_durable(0, "app", &round, &ballot));
        assert!(!state.accepted_durable(0, "app", &round, &Ballot { number: 1, node: "n2".to_owned() }));
    }

    #[test]
    fn changes_inside_a_snapshot_are_found() {
        let mut state = state(true);
        let meta = CommitMeta::new("tester", "x", konor_crdt::Millis(1));
        let (mut group, _) = GroupDoc::create("app", Mode::Eventual, ActorId::from([1; 16]), &meta).unwrap();
        let commit = group.set(vec![("k".to_owned(), json!(1))], &meta).unwrap();
        write_new(&mut state, "app.konor", &snapshot_file(&group, None).unwrap());
        assert!(state.change_durable(0, "app", &change_hash(&commit.change).unwrap()));
        assert!(!state.change_durable(0, "app", &[7; 32]));
    }

    #[test]
    fn a_crash_drops_what_was_not_synced_and_may_undo_an_unsynced_replace() {
        let base = std::env::temp_dir().join(format!("konor-sim-disk-test-{}", std::process::id()));
        let groups = base.join("groups");
        std::fs::create_dir_all(&groups).unwrap();
        let disk = Disk::new(5, std::slice::from_ref(&base), true);
        let (snapshot, changes) = group_with_changes(2);
        let path = Path::new("groups/app.konor");
        let mut undone = 0;
        for attempt in 0..16 {
            let mut state = disk.lock();
            write_new(&mut state, "app.konor", &snapshot);
            std::fs::write(groups.join("app.konor"), &snapshot).unwrap();
            // One change durable, one written only; then a replace whose directory fsync failed.
            let first = change_record(&changes[0].1).unwrap();
            let second = change_record(&changes[1].1).unwrap();
            let _ = state.write(0, path, snapshot.len() as u64, &first);
            state.synced(0, path, (snapshot.len() + first.len()) as u64);
            let _ = state.write(0, path, (snapshot.len() + first.len()) as u64, &second);
            let on_disk = [&snapshot[..], &first, &second].concat();
            std::fs::write(groups.join("app.konor"), &on_disk).unwrap();
            let replace = attempt % 2 == 1;
            if replace {
                let temp = Path::new("groups/app.konor.tmp");
                state.truncated(0, temp, 0);
                let _ = state.write(0, temp, 0, &snapshot);
                state.synced(0, temp, snapshot.len() as u64);
                state.renamed(0, temp, path);
                std::fs::write(groups.join("app.konor"), &snapshot).unwrap();
            }
            drop(state);
            let notes = disk.crash(0);
            let after = std::fs::read(groups.join("app.konor")).unwrap();
            let durable = snapshot.len() + first.len();
            if replace && after.len() == durable {
                undone += 1;
                assert!(notes.iter().any(|n| n.contains("replace of groups/app.konor undone")), "{notes:?}");
                assert_eq!(after, on_disk[..durable]);
            } else if replace {
                assert_eq!(after, snapshot);
            } else {
                // Cut to the durable length, or a torn prefix of the unsynced record.
                assert!(after.len() >= durable && after.len() < on_disk.len(), "{} {notes:?}", after.len());
                assert_eq!(after, on_disk[..after.len()]);
            }
            let mut state = disk.lock();
            assert!(state.change_durable(0, "app", &changes[0].0) || (replace && after == snapshot));
            assert!(!state.change_durable(0, "app", &changes[1].0));
            assert_eq!(state.nodes[0].files[path].bytes, after, "the model holds what the disk holds");
        }
        assert!(undone > 0, "some crash undid the replace");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn faults_fail_or_tear_writes_and_fail_one_fsync() {
        let mut state = state(false);
        let path = Path::new("groups/app.konor");
        state.nodes[0].fault = Some((DiskFault::Torn, 1));
        let (result, _) = state.write(0, path, 0, b"0123456789");
        let fault = result.unwrap_err();
        assert!((1..10).contains(&fault.prefix_bytes));
        assert_eq!(state.nodes[0].files[path].bytes, b"0123456789"[..fault.prefix_bytes]);
        state.nodes[0].fault = Some((DiskFault::Full, 2));
        assert_eq!(state.write(0, path, 0, b"x").0.unwrap_err().error.raw_os_error(), Some(ENOSPC));
        state.nodes[0].fault = Some((DiskFault::FsyncError { directory: false }, 3));
        assert!(state.before_sync(0, Path::new("groups")).0.is_ok(), "a directory's fsync is not a file's");
        assert!(state.before_sync(0, path).0.is_err());
        assert!(state.before_sync(0, path).0.is_ok(), "one fsync only");
        state.nodes[0].fault = Some((DiskFault::FsyncError { directory: true }, 4));
        assert!(state.before_sync(0, path).0.is_ok());
        assert!(state.before_sync(0, Path::new("groups")).0.is_err());
        assert_eq!((state.stats.writes_torn, state.stats.writes_failed, state.stats.fsyncs_failed), (1, 1, 2));
    }
}
