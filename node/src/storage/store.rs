//! The node's files on disk (SPEC F24): node identity, group record files, group keys, sync states and quarantine, written
//! crash-safely (temp file, fsync, rename, directory fsync; appends fsynced before the caller acknowledges).
//!
//! The bytes of group files come from `konor_crdt::journal` (snapshot, change, meta and round records, and the loader
//! that recovers the longest valid prefix); this module only moves those bytes to and from the disk and never
//! interprets them.
//!
//! ```text
//! <data>/node.json               { "node_id": String, "incarnation": u64 }, bumped on every open
//! <data>/LOCK                    flock held for the life of the Store: one konord per data dir
//! <data>/groups/<group>.konor    record file (header, snapshot, change and meta records)
//! <data>/groups/<group>.key      the group's secret key, mode 0600
//! <data>/quarantine/             damaged or left groups, moved aside and never deleted
//! ```
//!
//! **Invariant:** an incarnation number is persisted before `Store::open` returns, so the actor id the daemon
//! derives from (node id, incarnation) is never handed out twice, even after a kill -9.
//!
//! **Invariant:** nothing here deletes user data: damaged and left groups move to `quarantine/`; only temp files of
//! writes that never completed are removed.
//!
//! Unix only: file modes and directory fsync (opening a directory as a `File`) are Unix behaviours.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use konor_crdt::error::KeyError;
use konor_crdt::key::validate_group_name;
use konor_crdt::limits::RECORD_PAYLOAD_BYTES_MAX;
use konor_sdk::Secret;
use serde::{Deserialize, Serialize};

/// Largest group file the store reads or lets grow by appends: a snapshot record of the biggest document allowed
/// plus a change tail of the same size. Compaction keeps real files far below this; a bigger file is damage (a
/// bogus length) or a missed compaction, and reading it would allocate without bound.
pub const GROUP_FILE_BYTES_MAX: usize = RECORD_PAYLOAD_BYTES_MAX * 2;

/// Largest group key file: a keyring (the key, up to 8 it replaced, the members entitled to it) at
/// its caps; anything bigger is not a key file.
pub const GROUP_KEY_BYTES_MAX: usize = konor_crdt::keyring::KEYRING_TEXT_BYTES_MAX;

/// Largest node identity file: two fields of JSON; anything bigger is not ours.
const NODE_FILE_BYTES_MAX: usize = 64 * 1024;

/// Mode of every file the store creates: configuration and keys are readable by the node's user only.
const FILE_MODE: u32 = 0o600;

/// Mode of every directory the store creates, for the same reason.
const DIR_MODE: u32 = 0o700;

const NODE_FILE: &str = "node.json";
const LOCK_FILE: &str = "LOCK";
const GROUPS_DIR: &str = "groups";
const QUARANTINE_DIR: &str = "quarantine";
const GROUP_EXTENSION: &str = "konor";
/// Extension of sync state files (`<group>.<peer>.sync`).
const SYNC_EXTENSION: &str = "sync";

/// Largest sync state read back: an encoded state holds only shared heads, a few hundred bytes.
const SYNC_STATE_BYTES_MAX: usize = 64 * 1024;

const KEY_EXTENSION: &str = "key";

/// Extension of the file listing the members a node knows of a group.
const MEMBERS_EXTENSION: &str = "members";

/// Extension of a group's saved apply reports (`<group>.reports`, SPEC F16).
const REPORTS_EXTENSION: &str = "reports";

/// Largest members file read: node ids are short (at most 64 bytes) and a mesh holds at most
/// `MESH_NODES_MAX` nodes, so 64 KiB is ample.
const MEMBERS_BYTES_MAX: usize = 64 * 1024;
/// Suffix of temp files: a name that never ends in `.konor` or `.key`, so listings skip it.
const TEMP_SUFFIX: &str = ".tmp";

/// A seam around the store's file I/O, for tests and the simulator: it sees every write,
/// fsync, rename and truncation of the data dir, and may fail writes and fsyncs. Production
/// passes none ([`Store::open`]); the cost is then one `Option` check per operation.
///
/// The store calls it synchronously, on the thread that does the I/O, and never while holding
/// anything but the store itself. Paths are the store's own (under the data dir).
pub trait StorageHook: Send + Sync + std::fmt::Debug {
    /// Before `bytes` are written at `offset` of `path`. An error fails the write: its
    /// `prefix_bytes` are written first (a torn write), then the store sees `error` as the
    /// write's error.
    fn before_write(&self, path: &Path, offset: u64, bytes: &[u8]) -> Result<(), WriteFault> {
        let _ = (path, offset, bytes);
        Ok(())
    }

    /// Before an fsync (`sync_data` or `sync_all`) of the file or directory `path`. An error
    /// fails it without syncing.
    fn before_sync(&self, path: &Path) -> io::Result<()> {
        let _ = path;
        Ok(())
    }

    /// After a successful fsync of the file `path`: its first `durable_bytes` are on disk.
    fn after_sync(&self, path: &Path, durable_bytes: u64) {
        let _ = (path, durable_bytes);
    }

    /// After a successful fsync of the directory `dir`: the entries renamed or created in it
    /// are on disk.
    fn after_sync_dir(&self, dir: &Path) {
        let _ = dir;
    }

    /// Before `from` is renamed to `to`.
    fn before_rename(&self, from: &Path, to: &Path) {
        let _ = (from, to);
    }

    /// After `from` was renamed to `to` (an atomic replace, or a move to quarantine). Not
    /// durable until the directories are synced.
    fn after_rename(&self, from: &Path, to: &Path) {
        let _ = (from, to);
    }

    /// After `path` was cut to (or created with) `length` bytes.
    fn after_truncate(&self, path: &Path, length: u64) {
        let _ = (path, length);
    }
}

/// A write a [`StorageHook`] fails: the first `prefix_bytes` are written, then `error` is
/// returned (0 bytes: a plain failure; more: a torn write).
#[derive(Debug)]
pub struct WriteFault {
    /// Bytes written before the failure (clamped to the write's length).
    pub prefix_bytes: usize,
    /// The error the write returns.
    pub error: io::Error,
}

/// The store's file operations, through the hook when there is one.
#[derive(Debug, Clone, Default)]
struct Seam {
    hook: Option<Arc<dyn StorageHook>>,
}

impl Seam {
    fn write(&self, file: &mut File, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if let Some(hook) = &self.hook
            && let Err(fault) = hook.before_write(path, offset, bytes)
        {
            file.write_all(&bytes[..fault.prefix_bytes.min(bytes.len())])?;
            return Err(fault.error);
        }
        file.write_all(bytes)
    }

    /// fdatasync (`data_only`) or fsync of `file`, whose length is then `durable_bytes`.
    fn sync(&self, file: &File, path: &Path, durable_bytes: u64, data_only: bool) -> io::Result<()> {
        if let Some(hook) = &self.hook {
            hook.before_sync(path)?;
        }
        if data_only {
            file.sync_data()?;
        } else {
            file.sync_all()?;
        }
        if let Some(hook) = &self.hook {
            hook.after_sync(path, durable_bytes);
        }
        Ok(())
    }

    /// Makes renames, creations and removals in `dir` durable: on Linux a file's fsync does not
    /// cover its entry.
    fn sync_dir(&self, dir: &Path) -> Result<(), StoreError> {
        let synced = (|| {
            if let Some(hook) = &self.hook {
                hook.before_sync(dir)?;
            }
            File::open(dir)?.sync_all()
        })();
        synced.map_err(io_error("fsync the directory", dir))?;
        if let Some(hook) = &self.hook {
            hook.after_sync_dir(dir);
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if let Some(hook) = &self.hook {
            hook.before_rename(from, to);
        }
        fs::rename(from, to)?;
        if let Some(hook) = &self.hook {
            hook.after_rename(from, to);
        }
        Ok(())
    }

    fn set_len(&self, file: &File, path: &Path, length: u64) -> io::Result<()> {
        file.set_len(length)?;
        self.truncated(path, length);
        Ok(())
    }

    /// `path` now holds `length` bytes (cut, or newly created empty).
    fn truncated(&self, path: &Path, length: u64) {
        if let Some(hook) = &self.hook {
            hook.after_truncate(path, length);
        }
    }
}

/// Why a store operation failed. Each variant's doc says what happened to the files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds `<data>/LOCK`. Nothing was read or written.
    #[error(
        "data dir {} is in use by another konord (LOCK held); stop that konord or give this one its own data dir",
        data_dir.display()
    )]
    Locked {
        /// The data dir.
        data_dir: PathBuf,
    },
    /// `node.json` names another node. Nothing was written.
    #[error(
        "data dir {} belongs to node '{found}', not '{expected}'; start konord with node id '{found}' or give it another data dir",
        data_dir.display()
    )]
    WrongNode {
        /// The data dir.
        data_dir: PathBuf,
        /// The node id in `node.json`.
        found: String,
        /// The node id asked for.
        expected: String,
    },
    /// The node id asked for is empty. Nothing was read or written.
    #[error("node id is empty; give konord a node id")]
    EmptyNodeId,
    /// `node.json` exists but cannot be used. Nothing was written.
    #[error(
        "node identity file {} is damaged: {detail}; restore it from a backup (do not reset the incarnation: \
         actor ids would repeat), or move the data dir aside and join the groups again as a fresh node",
        path.display()
    )]
    BadIdentity {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// `node.json` is missing although the data dir holds groups: starting over at incarnation 1 could reuse an
    /// actor id. Nothing was written.
    #[error(
        "node identity file {} is missing but the data dir holds groups; restore node.json from a backup, or move \
         the data dir aside and join the groups again as a fresh node",
        path.display()
    )]
    MissingIdentity {
        /// Where `node.json` should be.
        path: PathBuf,
    },
    /// The incarnation counter reached `u64::MAX`. Nothing was written.
    #[error("incarnation in {} is at its maximum; move the data dir aside and join as a fresh node", path.display())]
    IncarnationExhausted {
        /// The file.
        path: PathBuf,
    },
    /// A group name that breaks the naming rules (it would name a path outside the data dir, for example). Nothing
    /// was read or written.
    #[error(transparent)]
    BadGroupName(KeyError),
    /// `create_group` for a group that already has a file. Nothing was written.
    #[error("group '{name}' already exists at {}; load it, or remove it first", path.display())]
    GroupExists {
        /// The group.
        name: String,
        /// Its file.
        path: PathBuf,
    },
    /// The group has no file. Nothing was written.
    #[error("group '{name}' has no file at {}; create or join the group first", path.display())]
    GroupNotFound {
        /// The group.
        name: String,
        /// Where its file would be.
        path: PathBuf,
    },
    /// A group file over [`GROUP_FILE_BYTES_MAX`], refused before allocating. Nothing was read.
    #[error(
        "group file {} is {bytes} bytes, over the {max}-byte limit; it is damaged or was never compacted: \
         quarantine it and repair the group from peers",
        path.display()
    )]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: usize,
    },
    /// A write that would make the group file larger than [`GROUP_FILE_BYTES_MAX`]. Nothing was written.
    #[error(
        "writing {adding} bytes would make {} larger than {max} bytes; compact the group (replace_group) first",
        path.display()
    )]
    WouldExceed {
        /// The file.
        path: PathBuf,
        /// Bytes that were to be written.
        adding: usize,
        /// The limit.
        max: usize,
    },
    /// `truncate_group` past the end of the file (it would append zeros). Nothing changed.
    #[error(
        "cannot cut {} to {valid_bytes} bytes: it holds only {file_bytes}; reload the group and use the loader's \
         valid_bytes",
        path.display()
    )]
    TruncateBeyondEnd {
        /// The file.
        path: PathBuf,
        /// The length asked for.
        valid_bytes: usize,
        /// The file's length.
        file_bytes: u64,
    },
    /// An earlier append to this group failed in a way that leaves the file's tail unknown (a failed fsync, or a
    /// partial write that could not be cut back). Nothing was written.
    #[error(
        "an earlier write or fsync of {} failed, so its tail is unknown; rewrite the group from memory \
         (replace_group) before appending again",
        path.display()
    )]
    NeedsRecovery {
        /// The file.
        path: PathBuf,
    },
    /// A key longer than [`GROUP_KEY_BYTES_MAX`]. Nothing was written.
    #[error("group key for '{name}' is {bytes} bytes, at most {max} allowed; a key is a short secret")]
    KeyTooLarge {
        /// The group.
        name: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A key file that is too large or not UTF-8. Nothing was read.
    #[error("group key file {} is damaged: {detail}; write the group's key again (konorctl join)", path.display())]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The operating system refused a file operation. The doc of the operation says what may have changed.
    #[error("could not {action} {}: {error} (check the permissions and free space of the data dir)", path.display())]
    Io {
        /// What was being done, as a verb phrase.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        error: io::Error,
    },
}

impl StoreError {
    /// True when the file system is out of space (or over quota).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { error, .. }
            if error.kind() == io::ErrorKind::StorageFull || matches!(error.raw_os_error(), Some(28 | 122)))
    }
}

/// `node.json`.
#[derive(Debug, Serialize, Deserialize)]
struct NodeIdentity {
    node_id: String,
    incarnation: u64,
    /// Fields written by a newer version are kept when this version rewrites the file.
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

/// An open append handle and where the file ends, so a failed write can be cut back.
#[derive(Debug)]
struct AppendHandle {
    file: File,
    end_bytes: u64,
}

/// A node's data dir, locked for the life of this value.
#[derive(Debug)]
pub struct Store {
    data_dir: PathBuf,
    groups_dir: PathBuf,
    quarantine_dir: PathBuf,
    node_id: String,
    incarnation: u64,
    /// Held only for its lock: the flock is released when the file closes, also on a crash.
    _lock_file: File,
    /// One handle per group written since open, so an append costs a write and an fsync, not an open too.
    append_handles: BTreeMap<String, AppendHandle>,
    /// Groups whose file tail is unknown after a failed write or fsync; appends are refused until a rewrite.
    needs_recovery: BTreeSet<String>,
    /// For groups in `needs_recovery`: the length known durable, so a reload reads only that.
    durable_bytes: BTreeMap<String, u64>,
    /// Every file operation goes through here (and the hook, in tests and the simulator).
    seam: Seam,
}

impl Store {
    /// Opens (creating if needed) the data dir for `node_id`, locks it, and bumps and persists the incarnation.
    ///
    /// On error nothing the caller can use was written; the lock, if taken, is released.
    pub fn open(data_dir: &Path, node_id: &str) -> Result<Store, StoreError> {
        Store::open_seam(data_dir, node_id, Seam::default())
    }

    /// [`Store::open`], with every file operation reported to `hook` (which may fail writes and
    /// fsyncs): for tests and the simulator.
    pub fn open_with_hook(data_dir: &Path, node_id: &str, hook: Arc<dyn StorageHook>) -> Result<Store, StoreError> {
        Store::open_seam(data_dir, node_id, Seam { hook: Some(hook) })
    }

    fn open_seam(data_dir: &Path, node_id: &str, seam: Seam) -> Result<Store, StoreError> {
        if node_id.is_empty() {
            return Err(StoreError::EmptyNodeId);
        }
        let data_dir = data_dir.to_path_buf();
        let created = !data_dir.is_dir();
        create_private_dir(&data_dir)?;
        if created {
            // The new directory's own entry must survive a crash for anything inside it to be found again.
            let parent = match data_dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            seam.sync_dir(parent)?;
        }

        // Lock before reading or writing anything else: two daemons on one data dir would both bump the same
        // incarnation and interleave appends.
        let lock_path = data_dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(io_error("open the lock file", &lock_path))?;
        match lock_file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StoreError::Locked { data_dir }),
            Err(TryLockError::Error(error)) => {
                return Err(StoreError::Io { action: "lock", path: lock_path, error });
            }
        }
        // The pid is for operators looking for the holder; nothing reads it.
        let _ =
            lock_file.set_len(0).and_then(|()| (&lock_file).write_all(format!("{}\n", std::process::id()).as_bytes()));

        let groups_dir = data_dir.join(GROUPS_DIR);
        let quarantine_dir = data_dir.join(QUARANTINE_DIR);
        create_private_dir(&groups_dir)?;
        create_private_dir(&quarantine_dir)?;
        seam.sync_dir(&data_dir)?;
        // node.json.tmp needs no sweep: the identity write below replaces any stale one.
        remove_temp_files(&seam, &groups_dir)?;

        let identity_path = data_dir.join(NODE_FILE);
        let mut identity = match read_bounded(&identity_path, NODE_FILE_BYTES_MAX) {
            Ok(Some(bytes)) => serde_json::from_slice::<NodeIdentity>(&bytes)
                .map_err(|e| StoreError::BadIdentity { path: identity_path.clone(), detail: e.to_string() })?,
            Ok(None) => {
                if !group_names(&groups_dir, GROUP_EXTENSION)?.is_empty() {
                    return Err(StoreError::MissingIdentity { path: identity_path });
                }
                NodeIdentity { node_id: node_id.to_owned(), incarnation: 0, other: serde_json::Map::new() }
            }
            Err(ReadBoundedError::TooLarge(bytes)) => {
                return Err(StoreError::BadIdentity {
                    path: identity_path,
                    detail: format!("{bytes} bytes, at most {NODE_FILE_BYTES_MAX} expected"),
                });
            }
            Err(ReadBoundedError::Io(error)) => {
                return Err(StoreError::Io { action: "read", path: identity_path, error });
            }
        };
        if identity.node_id != node_id {
            return Err(StoreError::WrongNode { data_dir, found: identity.node_id, expected: node_id.to_owned() });
        }
        identity.incarnation = identity
            .incarnation
            .checked_add(1)
            .ok_or_else(|| StoreError::IncarnationExhausted { path: identity_path.clone() })?;
        let mut bytes = serde_json::to_vec_pretty(&identity)
            .map_err(|e| StoreError::BadIdentity { path: identity_path.clone(), detail: e.to_string() })?;
        bytes.push(b'\n');
        // FACTS: an actor id must never be reused after a crash, so the new incarnation is durable before any
        // actor id derived from it exists.
        write_atomic(&seam, &data_dir, NODE_FILE, &bytes)?;
        tracing::info!(node_id, incarnation = identity.incarnation, data_dir = %data_dir.display(), "store opened");

        Ok(Store {
            data_dir,
            groups_dir,
            quarantine_dir,
            node_id: identity.node_id,
            incarnation: identity.incarnation,
            _lock_file: lock_file,
            append_handles: BTreeMap::new(),
            needs_recovery: BTreeSet::new(),
            durable_bytes: BTreeMap::new(),
            seam,
        })
    }

    /// The node id this data dir belongs to.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// This process's incarnation: 1 on the first open of a data dir, one more on every later open.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Names of the groups with a record file, sorted. Temp files and names that are not valid group names are
    /// skipped.
    pub fn list_groups(&self) -> Result<Vec<String>, StoreError> {
        group_names(&self.groups_dir, GROUP_EXTENSION)
    }

    /// Names of the groups with a key file, sorted (a group whose record file was quarantined
    /// keeps its key here until it is repaired).
    pub fn list_group_keys(&self) -> Result<Vec<String>, StoreError> {
        group_names(&self.groups_dir, KEY_EXTENSION)
    }

    /// True when appends to the group are refused until its file is rewritten (a failed fsync
    /// left its contents unknown).
    pub fn needs_recovery(&self, name: &str) -> bool {
        self.needs_recovery.contains(name)
    }

    /// Creates a group file holding `bytes` (a `journal::snapshot_file`), durably. Refused if the group exists.
    ///
    /// On error the group file does not exist (a leftover temp file is removed on the next open).
    pub fn create_group(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.group_path(name)?;
        check_file_size(&path, bytes.len())?;
        if path_exists(&path)? {
            return Err(StoreError::GroupExists { name: name.to_owned(), path });
        }
        self.append_handles.remove(name);
        if let Err(error) = write_atomic(&self.seam, &self.groups_dir, &file_name(name, GROUP_EXTENSION), bytes) {
            // The rename may have happened with only the directory fsync failing: the file's
            // name might not survive a crash, so nothing is appended to it until a rewrite
            // succeeds whole (found by the simulator's disk faults: acks after a failed
            // directory fsync).
            self.needs_recovery.insert(name.to_owned());
            return Err(error);
        }
        self.needs_recovery.remove(name);
        self.durable_bytes.remove(name);
        Ok(())
    }

    /// The whole group file, for `journal::load_group_file`. Refused above [`GROUP_FILE_BYTES_MAX`].
    pub fn read_group(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.group_path(name)?;
        match read_bounded(&path, GROUP_FILE_BYTES_MAX) {
            Ok(Some(mut bytes)) => {
                // After a failed fsync the tail is unknown: only the part known durable counts.
                if let Some(durable) = self.durable_bytes.get(name) {
                    bytes.truncate(usize::try_from(*durable).unwrap_or(usize::MAX));
                }
                Ok(bytes)
            }
            Ok(None) => Err(StoreError::GroupNotFound { name: name.to_owned(), path }),
            Err(ReadBoundedError::TooLarge(bytes)) => {
                Err(StoreError::FileTooLarge { path, bytes, max: GROUP_FILE_BYTES_MAX })
            }
            Err(ReadBoundedError::Io(error)) => Err(StoreError::Io { action: "read", path, error }),
        }
    }

    /// Appends `bytes` (one or more records) and fdatasyncs before returning: the caller acknowledges a change only
    /// after this returns `Ok`, which means every byte is on disk.
    ///
    /// On error nothing was acknowledged: a partial write is cut back to the previous end of the file; if that or
    /// the fsync fails, later appends are refused with [`StoreError::NeedsRecovery`] until `replace_group`.
    pub fn append(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.group_path(name)?;
        self.append_durably(name, path, bytes)
    }

    /// Appends several records with one write and one fsync: concurrent writers share the cost of an fsync.
    /// Same guarantees as [`Store::append`] for the whole batch.
    pub fn append_batch(&mut self, name: &str, records: &[&[u8]]) -> Result<(), StoreError> {
        let path = self.group_path(name)?;
        match records {
            [single] => self.append_durably(name, path, single),
            _ => self.append_durably(name, path, &records.concat()),
        }
    }

    /// Replaces the group file with `bytes` (compaction, or a repair from peers): a temp file in the same dir is
    /// written, fsynced and renamed over the old one, then the dir is fsynced.
    ///
    /// On error the old file is intact (the rename is the commit point), except when only the directory fsync after
    /// the rename failed: the new file is then in place but its name may not survive a crash. Either way appends are
    /// refused ([`StoreError::NeedsRecovery`]) until a later replace succeeds whole. On success appends continue on
    /// the new file and an earlier [`StoreError::NeedsRecovery`] is cleared.
    pub fn replace_group(&mut self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.group_path(name)?;
        check_file_size(&path, bytes.len())?;
        if !path_exists(&path)? {
            return Err(StoreError::GroupNotFound { name: name.to_owned(), path });
        }
        // A cached handle points at the old inode: after the rename its writes would land in an unlinked file.
        self.append_handles.remove(name);
        if let Err(error) = write_atomic(&self.seam, &self.groups_dir, &file_name(name, GROUP_EXTENSION), bytes) {
            // The rename may have happened with only the directory fsync failing: the file's
            // name might not survive a crash, so nothing is appended to it until a rewrite
            // succeeds whole (found by the simulator's disk faults: acks after a failed
            // directory fsync).
            self.needs_recovery.insert(name.to_owned());
            return Err(error);
        }
        self.needs_recovery.remove(name);
        self.durable_bytes.remove(name);
        Ok(())
    }

    /// Cuts the group file to `valid_bytes` (the loader's `valid_bytes` after a torn or damaged tail), then fsyncs,
    /// so the next append follows the last intact record instead of garbage the loader would stop at.
    ///
    /// On error the file may or may not be cut; calling again is safe.
    pub fn truncate_group(&mut self, name: &str, valid_bytes: usize) -> Result<(), StoreError> {
        let path = self.group_path(name)?;
        // The cached handle knows the old end of the file.
        self.append_handles.remove(name);
        let file = match OpenOptions::new().write(true).open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::GroupNotFound { name: name.to_owned(), path });
            }
            Err(error) => return Err(StoreError::Io { action: "open", path, error }),
        };
        let file_bytes = file.metadata().map_err(io_error("inspect", &path))?.len();
        let valid = u64::try_from(valid_bytes).unwrap_or(u64::MAX);
        if valid > file_bytes {
            return Err(StoreError::TruncateBeyondEnd { path, valid_bytes, file_bytes });
        }
        if valid == file_bytes {
            return Ok(());
        }
        self.seam.set_len(&file, &path, valid).map_err(io_error("truncate", &path))?;
        // sync_all: the new length is metadata, and the cut must be durable before anything is appended after it.
        self.seam.sync(&file, &path, valid, false).map_err(io_error("fsync", &path))?;
        tracing::warn!(group = name, cut_bytes = file_bytes - valid, path = %path.display(), "cut a damaged tail");
        Ok(())
    }

    /// Moves a damaged group file to `quarantine/<name>.<unix-millis>.konor` and returns its new path. The group
    /// key stays, so the group can be repaired from peers. Nothing is deleted.
    ///
    /// On error the file is in one of the two places, intact.
    pub fn quarantine_group(&mut self, name: &str) -> Result<PathBuf, StoreError> {
        let path = self.group_path(name)?;
        if !path_exists(&path)? {
            return Err(StoreError::GroupNotFound { name: name.to_owned(), path });
        }
        self.append_handles.remove(name);
        let stamp = self.free_quarantine_stamp(name)?;
        let target = self.quarantine_dir.join(format!("{name}.{stamp}.{GROUP_EXTENSION}"));
        self.move_to_quarantine(&path, &target)?;
        self.needs_recovery.remove(name);
        self.durable_bytes.remove(name);
        tracing::warn!(group = name, from = %path.display(), to = %target.display(), "quarantined a group file");
        Ok(target)
    }

    /// Leaves a group: moves its file and key to quarantine (so a mistaken leave can be undone by moving them
    /// back) and returns the group file's new path.
    ///
    /// On error each file is in one of its two places, intact.
    pub fn remove_group(&mut self, name: &str) -> Result<PathBuf, StoreError> {
        let path = self.group_path(name)?;
        if !path_exists(&path)? {
            return Err(StoreError::GroupNotFound { name: name.to_owned(), path });
        }
        self.append_handles.remove(name);
        let stamp = self.free_quarantine_stamp(name)?;
        let target = self.quarantine_dir.join(format!("{name}.{stamp}.{GROUP_EXTENSION}"));
        let key_path = self.groups_dir.join(file_name(name, KEY_EXTENSION));
        if path_exists(&key_path)? {
            let key_target = self.quarantine_dir.join(format!("{name}.{stamp}.{KEY_EXTENSION}"));
            self.move_to_quarantine(&key_path, &key_target)?;
        }
        self.move_to_quarantine(&path, &target)?;
        self.needs_recovery.remove(name);
        self.durable_bytes.remove(name);
        tracing::info!(group = name, to = %target.display(), "left a group; its files are in quarantine");
        Ok(target)
    }

    /// Writes the group's secret key durably with mode 0600 (never readable by others, not even for a moment).
    ///
    /// On error the old key, if any, is intact.
    pub fn write_group_key(&mut self, name: &str, key: &Secret) -> Result<(), StoreError> {
        validate_group_name(name).map_err(StoreError::BadGroupName)?;
        let key = key.expose();
        if key.len() > GROUP_KEY_BYTES_MAX {
            return Err(StoreError::KeyTooLarge { name: name.to_owned(), bytes: key.len(), max: GROUP_KEY_BYTES_MAX });
        }
        write_atomic(&self.seam, &self.groups_dir, &file_name(name, KEY_EXTENSION), key.as_bytes())
    }

    /// Stores the Automerge sync state for (group, peer): small, rewritten when a sync session
    /// goes quiet, so the next session with that peer starts from what both already share.
    pub fn write_sync_state(&mut self, group: &str, peer: &str, state: &[u8]) -> Result<(), StoreError> {
        validate_group_name(group).map_err(StoreError::BadGroupName)?;
        validate_group_name(peer).map_err(StoreError::BadGroupName)?;
        write_atomic(&self.seam, &self.groups_dir, &format!("{group}.{peer}.{SYNC_EXTENSION}"), state)
    }

    /// Stores the members this node knows of `group` (one node id per line), durably: after a
    /// restart, the node counts them before gossip has told it about them (issue 11).
    pub fn write_members(&mut self, group: &str, members: &[String]) -> Result<(), StoreError> {
        validate_group_name(group).map_err(StoreError::BadGroupName)?;
        let text: String = members.iter().map(|member| format!("{member}\n")).collect();
        write_atomic(&self.seam, &self.groups_dir, &format!("{group}.{MEMBERS_EXTENSION}"), text.as_bytes())
    }

    /// Stores the apply reports of `group`'s local processes and their history (SPEC F16), so
    /// the history outlives a restart.
    pub fn write_reports(&mut self, group: &str, bytes: &[u8]) -> Result<(), StoreError> {
        validate_group_name(group).map_err(StoreError::BadGroupName)?;
        write_atomic(&self.seam, &self.groups_dir, &format!("{group}.{REPORTS_EXTENSION}"), bytes)
    }

    /// The saved apply reports of `group`, if any (at most `max` bytes are read; a larger file
    /// is an error).
    pub(crate) fn read_reports(&self, group: &str, max: usize) -> Result<Option<Vec<u8>>, ReadBoundedError> {
        if validate_group_name(group).is_err() {
            return Ok(None);
        }
        read_bounded(&self.groups_dir.join(format!("{group}.{REPORTS_EXTENSION}")), max)
    }

    /// The members stored for `group`; none when the file is missing or unreadable (it only
    /// makes a fresh start more careful).
    pub fn read_members(&self, group: &str) -> Vec<String> {
        if validate_group_name(group).is_err() {
            return Vec::new();
        }
        let path = self.groups_dir.join(format!("{group}.{MEMBERS_EXTENSION}"));
        match read_bounded(&path, MEMBERS_BYTES_MAX) {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::trim)
                .filter(|line| validate_group_name(line).is_ok())
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every stored sync state of `group`, by peer. Unreadable or oversized ones are skipped:
    /// a missing state only costs a larger first sync.
    pub fn read_sync_states(&self, group: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        validate_group_name(group).map_err(StoreError::BadGroupName)?;
        let mut states = BTreeMap::new();
        let entries = fs::read_dir(&self.groups_dir).map_err(|error| StoreError::Io {
            action: "list",
            path: self.groups_dir.clone(),
            error,
        })?;
        let prefix = format!("{group}.");
        let suffix = format!(".{SYNC_EXTENSION}");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(peer) = name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(&suffix)) else { continue };
            if validate_group_name(peer).is_err() {
                continue;
            }
            if let Ok(Some(bytes)) = read_bounded(&entry.path(), SYNC_STATE_BYTES_MAX) {
                states.insert(peer.to_owned(), bytes);
            }
        }
        Ok(states)
    }

    /// The group's secret key, or `None` if none was written.
    pub fn read_group_key(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        validate_group_name(name).map_err(StoreError::BadGroupName)?;
        let path = self.groups_dir.join(file_name(name, KEY_EXTENSION));
        let bytes = match read_bounded(&path, GROUP_KEY_BYTES_MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(ReadBoundedError::TooLarge(bytes)) => {
                return Err(StoreError::BadKeyFile {
                    path,
                    detail: format!("{bytes} bytes, at most {GROUP_KEY_BYTES_MAX} expected"),
                });
            }
            Err(ReadBoundedError::Io(error)) => return Err(StoreError::Io { action: "read", path, error }),
        };
        if let Ok(metadata) = fs::metadata(&path)
            && metadata.permissions().mode() & 0o077 != 0
        {
            // Still usable, but someone loosened the mode: say so rather than refuse a running node its key.
            tracing::warn!(path = %path.display(), mode = format!("{:o}", metadata.permissions().mode() & 0o777),
                "group key file is readable by other users; chmod 600 it");
        }
        String::from_utf8(bytes)
            .map(|text| Some(Secret::new(text)))
            .map_err(|e| StoreError::BadKeyFile { path, detail: format!("not UTF-8 text ({e})") })
    }

    /// The record file of a validated group name.
    fn group_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        // Validation comes first: the name becomes part of a path, and "../x" must never reach the file system.
        validate_group_name(name).map_err(StoreError::BadGroupName)?;
        Ok(self.groups_dir.join(file_name(name, GROUP_EXTENSION)))
    }

    fn append_durably(&mut self, name: &str, path: PathBuf, bytes: &[u8]) -> Result<(), StoreError> {
        if self.needs_recovery.contains(name) {
            return Err(StoreError::NeedsRecovery { path });
        }
        let handle = match self.append_handles.entry(name.to_owned()) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => {
                let file = match OpenOptions::new().append(true).open(&path) {
                    Ok(file) => file,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {
                        return Err(StoreError::GroupNotFound { name: name.to_owned(), path });
                    }
                    Err(error) => return Err(StoreError::Io { action: "open for appending", path, error }),
                };
                let end_bytes = file.metadata().map_err(io_error("inspect", &path))?.len();
                entry.insert(AppendHandle { file, end_bytes })
            }
        };
        let adding = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let max = u64::try_from(GROUP_FILE_BYTES_MAX).unwrap_or(u64::MAX);
        if handle.end_bytes.saturating_add(adding) > max {
            return Err(StoreError::WouldExceed { path, adding: bytes.len(), max: GROUP_FILE_BYTES_MAX });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        if let Err(error) = self.seam.write(&mut handle.file, &path, handle.end_bytes, bytes) {
            // A partial record left in place would end the loader's valid prefix, hiding every record appended
            // after it, acknowledged ones included; so it is cut back before anything else is appended.
            let cut_back = self
                .seam
                .set_len(&handle.file, &path, handle.end_bytes)
                .and_then(|()| self.seam.sync(&handle.file, &path, handle.end_bytes, true));
            let durable = handle.end_bytes;
            self.append_handles.remove(name);
            if cut_back.is_err() {
                self.needs_recovery.insert(name.to_owned());
                self.durable_bytes.insert(name.to_owned(), durable);
            }
            return Err(StoreError::Io { action: "append to", path, error });
        }
        if let Err(error) = self.seam.sync(&handle.file, &path, handle.end_bytes + adding, true) {
            // After a failed fsync the kernel may have dropped the dirty pages and will not report it again
            // (PostgreSQL's "fsyncgate"): what the file holds is unknown until the group is rewritten.
            let durable = handle.end_bytes;
            self.append_handles.remove(name);
            self.needs_recovery.insert(name.to_owned());
            self.durable_bytes.insert(name.to_owned(), durable);
            return Err(StoreError::Io { action: "fsync", path, error });
        }
        handle.end_bytes += adding;
        Ok(())
    }

    /// A millisecond stamp under which neither `<name>.<stamp>.konor` nor `<name>.<stamp>.key` exists in
    /// quarantine, so an earlier quarantined copy is never overwritten (rename replaces silently).
    fn free_quarantine_stamp(&self, name: &str) -> Result<String, StoreError> {
        let millis = crate::wall_clock::unix_millis();
        for attempt in 0u32.. {
            let stamp = if attempt == 0 { millis.to_string() } else { format!("{millis}-{attempt}") };
            let taken = [GROUP_EXTENSION, KEY_EXTENSION]
                .iter()
                .map(|extension| path_exists(&self.quarantine_dir.join(format!("{name}.{stamp}.{extension}"))))
                .collect::<Result<Vec<bool>, StoreError>>()?;
            if !taken.contains(&true) {
                return Ok(stamp);
            }
        }
        // Unreachable in practice: four billion quarantined copies of one group in one millisecond.
        Err(StoreError::Io {
            action: "find a free name in",
            path: self.quarantine_dir.clone(),
            error: io::Error::new(io::ErrorKind::AlreadyExists, "every quarantine name is taken"),
        })
    }

    fn move_to_quarantine(&self, from: &Path, to: &Path) -> Result<(), StoreError> {
        self.seam.rename(from, to).map_err(io_error("move to quarantine", from))?;
        // The new entry first: after a crash between the two fsyncs the file is in quarantine, maybe also still
        // listed in groups/, but never in neither.
        self.seam.sync_dir(&self.quarantine_dir)?;
        self.seam.sync_dir(&self.groups_dir)
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |error| StoreError::Io { action, path, error }
}

fn file_name(name: &str, extension: &str) -> String {
    format!("{name}.{extension}")
}

fn path_exists(path: &Path) -> Result<bool, StoreError> {
    path.try_exists().map_err(io_error("inspect", path))
}

fn check_file_size(path: &Path, bytes: usize) -> Result<(), StoreError> {
    if bytes > GROUP_FILE_BYTES_MAX {
        return Err(StoreError::WouldExceed { path: path.to_path_buf(), adding: bytes, max: GROUP_FILE_BYTES_MAX });
    }
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), StoreError> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path).map_err(io_error("create the directory", path))
}

/// Writes `bytes` to `dir/name` so that after a crash the file holds either its old content or all of `bytes`:
/// temp file, fsync, rename over, fsync of the directory.
fn write_atomic(seam: &Seam, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let path = dir.join(name);
    let temp_path = dir.join(format!("{name}{TEMP_SUFFIX}"));
    // A temp file left by a crash may have a looser mode; create_new below guarantees ours from the first byte.
    match fs::remove_file(&temp_path) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(StoreError::Io { action: "remove the stale temp file", path: temp_path, error }),
    }
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&temp_path)?;
        seam.truncated(&temp_path, 0);
        seam.write(&mut file, &temp_path, 0, bytes)?;
        seam.sync(&file, &temp_path, u64::try_from(bytes.len()).unwrap_or(u64::MAX), false)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&temp_path);
        return Err(StoreError::Io { action: "write", path: temp_path, error });
    }
    if let Err(error) = seam.rename(&temp_path, &path) {
        let _ = fs::remove_file(&temp_path);
        return Err(StoreError::Io { action: "rename a temp file over", path, error });
    }
    seam.sync_dir(dir)
}

/// Why [`read_bounded`] read nothing.
pub(crate) enum ReadBoundedError {
    /// The file holds more than allowed (its size).
    TooLarge(u64),
    /// Reading failed.
    Io(io::Error),
}

/// Reads a whole file of at most `max` bytes; `None` if it does not exist. The size is checked before
/// allocating, and again while reading in case the file grew in between.
pub(crate) fn read_bounded(path: &Path, max: usize) -> Result<Option<Vec<u8>>, ReadBoundedError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(ReadBoundedError::Io(error)),
    };
    let max_bytes = u64::try_from(max).unwrap_or(u64::MAX);
    let length = file.metadata().map_err(ReadBoundedError::Io)?.len();
    if length > max_bytes {
        return Err(ReadBoundedError::TooLarge(length));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(max));
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(ReadBoundedError::Io)?;
    if bytes.len() > max {
        return Err(ReadBoundedError::TooLarge(u64::try_from(bytes.len()).unwrap_or(u64::MAX)));
    }
    Ok(Some(bytes))
}

/// Valid group names that have a file with `extension` in `groups_dir`, sorted.
fn group_names(groups_dir: &Path, extension: &str) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(groups_dir).map_err(io_error("list", groups_dir))? {
        let entry = entry.map_err(io_error("list", groups_dir))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        let Some(name) = file_name.strip_suffix(&format!(".{extension}")) else { continue };
        if validate_group_name(name).is_ok() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Removes temp files of writes that never reached their rename: the file they were to replace is intact (or
/// was never created and never acknowledged), so they hold nothing anyone relies on.
fn remove_temp_files(seam: &Seam, dir: &Path) -> Result<(), StoreError> {
    let mut removed = false;
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        if entry.file_name().to_str().is_some_and(|name| name.ends_with(TEMP_SUFFIX)) {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_error("remove the stale temp file", &path))?;
            tracing::warn!(path = %path.display(), "removed a temp file left by an interrupted write");
            removed = true;
        }
    }
    if removed {
        seam.sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use konor_crdt::journal::{change_record, load_group_file, snapshot_file};
    use konor_crdt::{ActorId, CommitMeta, GroupDoc, Millis, Mode};
    use serde_json::json;

    fn actor(n: u8) -> ActorId {
        ActorId::from([n; 16])
    }

    fn meta(n: u64) -> CommitMeta {
        CommitMeta::new("tester", format!("change {n}"), Millis(1_000 + n))
    }

    /// A group's snapshot file and the change records of `changes` later writes, with the state after each.
    fn history(changes: u64) -> (Vec<u8>, Vec<Vec<u8>>, Vec<GroupDoc>) {
        let (mut group, _) = GroupDoc::create("app", Mode::Eventual, actor(1), &meta(0)).unwrap();
        let snapshot = snapshot_file(&group, Some(b"{\"revision\":1}")).unwrap();
        let mut records = Vec::new();
        let mut states = vec![GroupDoc::load(&group.save(), actor(9)).unwrap()];
        for n in 1..=changes {
            let commit = group.set(vec![(format!("k{}", n % 3), json!(n))], &meta(n)).unwrap();
            records.push(change_record(&commit.change).unwrap());
            states.push(GroupDoc::load(&group.save(), actor(9)).unwrap());
        }
        (snapshot, records, states)
    }

    /// A temp dir on tmpfs when there is one. The crash sweep checks recovery logic, not the device, and makes
    /// two fsyncs per byte of its file: about 20 s on ext4, well under a second on tmpfs.
    fn scratch_dir_without_fsync_cost() -> tempfile::TempDir {
        tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap()
    }

    fn open(dir: &Path) -> Store {
        Store::open(dir, "node-a").unwrap()
    }

    /// What a [`ScriptedHook`] saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Synced(String, u64),
        SyncedDir(String),
        Renamed(String, String),
        Truncated(String, u64),
    }

    /// A hook that fails the next writes and fsyncs it is told to, and logs the rest.
    #[derive(Debug, Default)]
    struct ScriptedHook {
        /// Each failed write's prefix, oldest first.
        write_faults: std::sync::Mutex<std::collections::VecDeque<usize>>,
        /// fsyncs still to fail.
        sync_faults: std::sync::Mutex<u32>,
        seen: std::sync::Mutex<Vec<Seen>>,
    }

    impl ScriptedHook {
        fn fail_next_write(&self, prefix_bytes: usize) {
            self.write_faults.lock().unwrap().push_back(prefix_bytes);
        }

        fn fail_next_syncs(&self, count: u32) {
            *self.sync_faults.lock().unwrap() = count;
        }

        fn take_seen(&self) -> Vec<Seen> {
            std::mem::take(&mut *self.seen.lock().unwrap())
        }
    }

    /// The last two components of a path (`groups/app.konor`), so logs read the same in any temp dir.
    fn short(path: &Path) -> String {
        let parts: Vec<String> = path.iter().rev().take(2).map(|p| p.to_string_lossy().into_owned()).collect();
        format!("{}/{}", parts[1], parts[0])
    }

    impl StorageHook for ScriptedHook {
        fn before_write(&self, _: &Path, _: u64, _: &[u8]) -> Result<(), WriteFault> {
            match self.write_faults.lock().unwrap().pop_front() {
                Some(prefix_bytes) => Err(WriteFault { prefix_bytes, error: io::Error::from_raw_os_error(28) }),
                None => Ok(()),
            }
        }

        fn before_sync(&self, _: &Path) -> io::Result<()> {
            let mut left = self.sync_faults.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(io::Error::from_raw_os_error(5));
            }
            Ok(())
        }

        fn after_sync(&self, path: &Path, durable_bytes: u64) {
            self.seen.lock().unwrap().push(Seen::Synced(short(path), durable_bytes));
        }

        fn after_sync_dir(&self, dir: &Path) {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            self.seen.lock().unwrap().push(Seen::SyncedDir(name));
        }

        fn after_rename(&self, from: &Path, to: &Path) {
            self.seen.lock().unwrap().push(Seen::Renamed(short(from), short(to)));
        }

        fn after_truncate(&self, path: &Path, length: u64) {
            self.seen.lock().unwrap().push(Seen::Truncated(short(path), length));
        }
    }

    fn open_hooked(dir: &Path) -> (Store, Arc<ScriptedHook>) {
        let hook = Arc::new(ScriptedHook::default());
        let store = Store::open_with_hook(dir, "node-a", hook.clone()).unwrap();
        hook.take_seen();
        (store, hook)
    }

    #[test]
    fn a_failed_write_cuts_the_partial_record_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, hook) = open_hooked(dir.path());
        let (snapshot, records, states) = history(3);
        store.create_group("app", &snapshot).unwrap();
        store.append("app", &records[0]).unwrap();
        // A plain failure and a torn one (half a record reached the file before ENOSPC).
        for prefix in [0, records[1].len() / 2] {
            hook.fail_next_write(prefix);
            let error = store.append("app", &records[1]).unwrap_err();
            assert!(error.is_disk_full(), "{error}");
            assert!(!store.needs_recovery("app"));
            let on_disk = fs::read(dir.path().join("groups/app.konor")).unwrap();
            assert_eq!(on_disk, [&snapshot[..], &records[0]].concat(), "prefix {prefix}: nothing half-written stays");
        }
        store.append("app", &records[1]).unwrap();
        store.append("app", &records[2]).unwrap();
        let loaded = load_group_file(&store.read_group("app").unwrap(), actor(2)).unwrap();
        assert_eq!(loaded.dropped, None);
        assert_eq!(loaded.group.heads(), states[3].heads());
    }

    #[test]
    fn a_torn_write_whose_cut_back_fails_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, hook) = open_hooked(dir.path());
        let (snapshot, records, states) = history(2);
        store.create_group("app", &snapshot).unwrap();
        store.append("app", &records[0]).unwrap();
        // The torn write, then the fsync of its cut-back fails: the tail is unknown.
        hook.fail_next_write(records[1].len() - 3);
        hook.fail_next_syncs(1);
        assert!(store.append("app", &records[1]).is_err());
        assert!(store.needs_recovery("app"));
        assert!(matches!(store.append("app", &records[1]), Err(StoreError::NeedsRecovery { .. })));
        // What the store serves is the durable prefix: it loads whole, without the torn record.
        let loaded = load_group_file(&store.read_group("app").unwrap(), actor(2)).unwrap();
        assert_eq!(loaded.dropped, None);
        assert_eq!(loaded.group.heads(), states[1].heads());
        // The disk as a crash may leave it, with the torn prefix back on the end: the loader
        // stops before it, and the store cuts it before the next append.
        drop(store);
        let path = dir.path().join("groups/app.konor");
        let torn = [&snapshot[..], &records[0], &records[1][..records[1].len() - 3]].concat();
        fs::write(&path, &torn).unwrap();
        let mut store = open(dir.path());
        let loaded = load_group_file(&store.read_group("app").unwrap(), actor(2)).unwrap();
        assert!(loaded.dropped.is_some());
        assert_eq!(loaded.group.heads(), states[1].heads());
        store.truncate_group("app", loaded.valid_bytes).unwrap();
        store.append("app", &records[1]).unwrap();
        let loaded = load_group_file(&store.read_group("app").unwrap(), actor(2)).unwrap();
        assert_eq!((loaded.dropped, loaded.group.heads()), (None, states[2].heads()));
    }

    #[test]
    fn a_failed_fsync_refuses_appends_until_the_group_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, hook) = open_hooked(dir.path());
        let (snapshot, records, states) = history(3);
        store.create_group("app", &snapshot).unwrap();
        store.append("app", &records[0]).unwrap();
        hook.fail_next_syncs(1);
        let error = store.append("app", &records[1]).unwrap_err();
        assert!(matches!(error, StoreError::Io { action: "fsync", .. }), "{error}");
        assert!(store.needs_recovery("app"));
        // The record is in the file, but nothing says it is on disk: it is not served.
        assert_eq!(
            fs::read(dir.path().join("groups/app.konor")).unwrap().len(),
            snapshot.len() + records[0].len() + records[1].len()
        );
        let served = store.read_group("app").unwrap();
        assert_eq!(served, [&snapshot[..], &records[0]].concat());
        assert!(matches!(store.append("app", &records[1]), Err(StoreError::NeedsRecovery { .. })));
        assert!(matches!(
            store.append_batch("app", &[&records[1], &records[2]]),
            Err(StoreError::NeedsRecovery { .. })
        ));
        // The rewrite from memory clears it.
        store.replace_group("app", &snapshot_file(&states[1], None).unwrap()).unwrap();
        assert!(!store.needs_recovery("app"));
        store.append_batch("app", &[&records[1], &records[2]]).unwrap();
        let loaded = load_group_file(&store.read_group("app").unwrap(), actor(2)).unwrap();
        assert_eq!((loaded.dropped, loaded.group.heads()), (None, states[3].heads()));
    }

    #[test]
    fn the_hook_sees_exactly_the_durable_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, hook) = open_hooked(dir.path());
        let (snapshot, records, _) = history(2);
        let group = "groups/app.konor".to_owned();
        let temp = "groups/app.konor.tmp".to_owned();
        let length = |bytes: usize| u64::try_from(bytes).unwrap();
        store.create_group("app", &snapshot).unwrap();
        assert_eq!(
            hook.take_seen(),
            [
                Seen::Truncated(temp.clone(), 0),
                Seen::Synced(temp.clone(), length(snapshot.len())),
                Seen::Renamed(temp.clone(), group.clone()),
                Seen::SyncedDir("groups".to_owned()),
            ]
        );
        store.append("app", &records[0]).unwrap();
        let after_first = snapshot.len() + records[0].len();
        assert_eq!(hook.take_seen(), [Seen::Synced(group.clone(), length(after_first))]);
        // A failed fsync reports nothing durable; the cut-back after a failed write does.
        hook.fail_next_syncs(1);
        assert!(store.append("app", &records[1]).is_err());
        assert_eq!(hook.take_seen(), []);
        store.truncate_group("app", after_first).unwrap();
        assert_eq!(
            hook.take_seen(),
            [Seen::Truncated(group.clone(), length(after_first)), Seen::Synced(group.clone(), length(after_first))]
        );
        store.replace_group("app", &snapshot).unwrap();
        hook.take_seen();
        hook.fail_next_write(4);
        assert!(store.append("app", &records[1]).is_err());
        assert_eq!(
            hook.take_seen(),
            [Seen::Truncated(group.clone(), length(snapshot.len())), Seen::Synced(group, length(snapshot.len()))]
        );
        assert_eq!(fs::read(dir.path().join("groups/app.konor")).unwrap(), snapshot);
    }

    #[test]
    fn identity_is_created_and_the_incarnation_grows_on_every_open() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = open(&data);
        assert_eq!((store.node_id(), store.incarnation()), ("node-a", 1));
        assert_eq!(store.data_dir(), data);
        assert_eq!(fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
        drop(store);
        assert_eq!(open(&data).incarnation(), 2);
        assert_eq!(open(&data).incarnation(), 3);
        let identity: serde_json::Value = serde_json::from_slice(&fs::read(data.join("node.json")).unwrap()).unwrap();
        assert_eq!(identity, json!({ "node_id": "node-a", "incarnation": 3 }));
    }

    #[test]
    fn a_second_open_of_a_data_dir_in_use_fails_with_the_lock_message() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path());
        let error = Store::open(dir.path(), "node-a").unwrap_err();
        let expected = format!("data dir {} is in use by another konord (LOCK held)", dir.path().display());
        assert!(error.to_string().starts_with(&expected), "{error}");
        // The refused open must not have bumped the incarnation under the running daemon's feet.
        assert_eq!(first.incarnation(), 1);
        drop(first);
        assert_eq!(open(dir.path()).incarnation(), 2);
    }

    #[test]
    fn a_data_dir_of_another_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), "a").unwrap());
        let error = Store::open(dir.path(), "b").unwrap_err();
        let expected = format!("data dir {} belongs to node 'a', not 'b'", dir.path().display());
        assert!(error.to_string().starts_with(&expected), "{error}");
        assert!(matches!(Store::open(dir.path(), ""), Err(StoreError::EmptyNodeId)));
        assert_eq!(Store::open(dir.path(), "a").unwrap().incarnation(), 2);
    }

    #[test]
    fn a_damaged_or_missing_identity_is_refused_rather_than_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_group("app", &history(0).0).unwrap();
        drop(store);
        fs::write(dir.path().join("node.json"), b"{ not json").unwrap();
        let error = Store::open(dir.path(), "node-a").unwrap_err();
        assert!(matches!(error, StoreError::BadIdentity { .. }), "{error}");
        fs::remove_file(dir.path().join("node.json")).unwrap();
        let error = Store::open(dir.path(), "node-a").unwrap_err();
        assert!(matches!(error, StoreError::MissingIdentity { .. }), "{error}");
    }

    #[test]
    fn appends_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_group("app", b"head").unwrap();
        store.append("app", b"-one").unwrap();
        store.append("app", b"-two").unwrap();
        store.append("app", b"").unwrap();
        assert_eq!(store.read_group("app").unwrap(), b"head-one-two");
        assert!(matches!(store.create_group("app", b"again"), Err(StoreError::GroupExists { .. })));
        assert!(matches!(store.append("other", b"x"), Err(StoreError::GroupNotFound { .. })));
        assert!(matches!(store.read_group("other"), Err(StoreError::GroupNotFound { .. })));
        drop(store);
        assert_eq!(open(dir.path()).read_group("app").unwrap(), b"head-one-two");
    }

    #[test]
    fn a_batch_is_appended_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let (snapshot, records, states) = history(3);
        store.create_group("app", &snapshot).unwrap();
        let batch: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        store.append_batch("app", &batch).unwrap();
        store.append_batch("app", &[]).unwrap();
        let loaded = load_group_file(&store.read_group("app").unwrap(), actor(2)).unwrap();
        assert_eq!(loaded.dropped, None);
        assert_eq!(loaded.tail_changes, 3);
        assert_eq!(loaded.group.heads(), states[3].heads());
    }

    #[test]
    fn appends_continue_on_the_new_file_after_a_replace() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let (snapshot, records, states) = history(3);
        store.create_group("app", &snapshot).unwrap();
        store.append("app", &records[0]).unwrap();
        store.append("app", &records[1]).unwrap();
        // Compaction: a fresh snapshot holding the first two changes, then the third appended through the store.
        let compacted = snapshot_file(&states[2], None).unwrap();
        store.replace_group("app", &compacted).unwrap();
        store.append("app", &records[2]).unwrap();
        let file = store.read_group("app").unwrap();
        assert_eq!(file.len(), compacted.len() + records[2].len());
        let loaded = load_group_file(&file, actor(2)).unwrap();
        assert_eq!(loaded.dropped, None);
        assert_eq!(loaded.tail_changes, 1);
        assert_eq!(loaded.group.heads(), states[3].heads());
        assert_eq!(loaded.group.settings(), states[3].settings());
        assert!(matches!(store.replace_group("other", &compacted), Err(StoreError::GroupNotFound { .. })));
    }

    /// In the style of redb's crash_consistency test: a crash during an append leaves some prefix of the file on
    /// disk. For every prefix length, the loader must recover exactly the complete records, and after the store
    /// cuts the torn tail the next append must load cleanly.
    #[test]
    fn every_crash_point_recovers_a_prefix_and_accepts_the_next_append() {
        let dir = scratch_dir_without_fsync_cost();
        let mut store = open(dir.path());
        let changes = 3;
        let (snapshot, records, states) = history(changes + 1);
        let snapshot_end = snapshot_file(&states[0], None).unwrap().len();
        // ends[k]: file length with k complete change records.
        let mut ends = vec![snapshot.len()];
        for record in &records[..changes as usize] {
            ends.push(ends[ends.len() - 1] + record.len());
        }
        let file = [&snapshot[..], &records[..changes as usize].concat()].concat();
        assert_eq!(file.len(), ends[changes as usize]);

        for cut in 0..=file.len() {
            let name = format!("crash-{cut}");
            // The disk after the crash: only the first `cut` bytes made it.
            fs::write(dir.path().join("groups").join(format!("{name}.konor")), &file[..cut]).unwrap();
            let bytes = store.read_group(&name).unwrap();
            let result = load_group_file(&bytes, actor(3));
            if cut < snapshot_end {
                assert!(result.is_err(), "cut at {cut}: no complete snapshot, so nothing may load");
                continue;
            }
            let loaded = result.unwrap();
            let complete = ends.iter().filter(|end| **end <= cut).count().saturating_sub(1);
            assert_eq!(loaded.tail_changes, complete, "cut at {cut}");
            assert_eq!(loaded.group.heads(), states[complete].heads(), "cut at {cut}");
            assert_eq!(loaded.group.settings(), states[complete].settings(), "cut at {cut}");
            let expected_valid = if cut >= ends[0] { ends[complete] } else { snapshot_end };
            assert_eq!(loaded.valid_bytes, expected_valid, "cut at {cut}");

            store.truncate_group(&name, loaded.valid_bytes).unwrap();
            store.append(&name, &records[complete]).unwrap();
            let reloaded = load_group_file(&store.read_group(&name).unwrap(), actor(3)).unwrap();
            assert_eq!(reloaded.dropped, None, "cut at {cut}");
            assert_eq!(reloaded.tail_changes, complete + 1, "cut at {cut}");
            assert_eq!(reloaded.group.heads(), states[complete + 1].heads(), "cut at {cut}");
            assert_eq!(reloaded.group.settings(), states[complete + 1].settings(), "cut at {cut}");
        }
    }

    #[test]
    fn truncating_past_the_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_group("app", b"12345").unwrap();
        assert!(matches!(store.truncate_group("app", 6), Err(StoreError::TruncateBeyondEnd { .. })));
        store.truncate_group("app", 3).unwrap();
        store.append("app", b"x").unwrap();
        assert_eq!(store.read_group("app").unwrap(), b"123x");
    }

    #[test]
    fn quarantine_moves_the_file_aside_and_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_group("app", b"damaged").unwrap();
        store.create_group("billing", b"fine").unwrap();
        store.write_group_key("app", &"secret".into()).unwrap();
        store.append("app", b"!").unwrap();
        assert_eq!(store.list_groups().unwrap(), ["app", "billing"]);
        let first = store.quarantine_group("app").unwrap();
        assert_eq!(first.parent().unwrap(), dir.path().join("quarantine"));
        assert_eq!(fs::read(&first).unwrap(), b"damaged!");
        assert_eq!(store.list_groups().unwrap(), ["billing"]);
        assert_eq!(store.read_group_key("app").unwrap().map(Secret::into_exposed).as_deref(), Some("secret"));
        assert!(matches!(store.append("app", b"x"), Err(StoreError::GroupNotFound { .. })));
        // A second quarantine in the same millisecond must not overwrite the first copy.
        store.create_group("app", b"again").unwrap();
        let second = store.quarantine_group("app").unwrap();
        assert_ne!(first, second);
        assert_eq!(fs::read(&first).unwrap(), b"damaged!");
        assert_eq!(fs::read(&second).unwrap(), b"again");
    }

    #[test]
    fn leaving_a_group_moves_its_file_and_key_to_quarantine() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_group("app", b"data").unwrap();
        store.write_group_key("app", &"secret".into()).unwrap();
        let moved = store.remove_group("app").unwrap();
        assert_eq!(fs::read(&moved).unwrap(), b"data");
        assert_eq!(fs::read(moved.with_extension("key")).unwrap(), b"secret");
        assert!(store.list_groups().unwrap().is_empty());
        assert_eq!(store.read_group_key("app").unwrap(), None);
        assert!(matches!(store.remove_group("app"), Err(StoreError::GroupNotFound { .. })));
    }

    #[test]
    fn temp_files_are_never_listed_and_are_cleared_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_group("app", b"data").unwrap();
        // What a crash between write and rename of a compaction leaves behind.
        let temp = dir.path().join("groups").join("app.konor.tmp");
        fs::write(&temp, b"half a snapshot").unwrap();
        fs::write(dir.path().join("groups").join("notes.txt"), b"").unwrap();
        assert_eq!(store.list_groups().unwrap(), ["app"]);
        drop(store);
        let store = open(dir.path());
        assert!(!temp.exists());
        assert_eq!(store.read_group("app").unwrap(), b"data");
    }

    #[test]
    fn invalid_group_names_are_refused_before_touching_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        for name in ["../x", "a/b", "", "..", "/etc/passwd", "a.b"] {
            let bad = |result: Result<(), StoreError>| matches!(result, Err(StoreError::BadGroupName(_)));
            assert!(bad(store.create_group(name, b"x")), "{name:?}");
            assert!(bad(store.read_group(name).map(drop)), "{name:?}");
            assert!(bad(store.append(name, b"x")), "{name:?}");
            assert!(bad(store.append_batch(name, &[b"x"])), "{name:?}");
            assert!(bad(store.replace_group(name, b"x")), "{name:?}");
            assert!(bad(store.truncate_group(name, 0)), "{name:?}");
            assert!(bad(store.quarantine_group(name).map(drop)), "{name:?}");
            assert!(bad(store.remove_group(name).map(drop)), "{name:?}");
            assert!(bad(store.write_group_key(name, &"k".into())), "{name:?}");
            assert!(bad(store.read_group_key(name).map(drop)), "{name:?}");
        }
        assert!(!dir.path().join("x.konor").exists());
        assert!(store.list_groups().unwrap().is_empty());
    }

    #[test]
    fn the_key_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        assert_eq!(store.read_group_key("app").unwrap(), None);
        store.write_group_key("app", &"first".into()).unwrap();
        store.write_group_key("app", &"second".into()).unwrap();
        assert_eq!(store.read_group_key("app").unwrap().map(Secret::into_exposed).as_deref(), Some("second"));
        let mode = fs::metadata(dir.path().join("groups").join("app.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let too_long = "k".repeat(GROUP_KEY_BYTES_MAX + 1);
        assert!(matches!(store.write_group_key("app", &too_long.into()), Err(StoreError::KeyTooLarge { .. })));
    }

    #[test]
    fn an_oversized_group_file_is_refused_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.create_group("big", b"").unwrap();
        // A sparse file: the size says 128 MiB, the disk holds nothing.
        let path = dir.path().join("groups").join("big.konor");
        let max = u64::try_from(GROUP_FILE_BYTES_MAX).unwrap();
        File::options().write(true).open(&path).unwrap().set_len(max - 4).unwrap();
        // An append that would cross the limit is refused whole, so the file stays readable.
        assert!(matches!(store.append("big", b"12345"), Err(StoreError::WouldExceed { .. })));
        assert_eq!(fs::metadata(&path).unwrap().len(), max - 4);
        store.append("big", b"1234").unwrap();
        File::options().write(true).open(&path).unwrap().set_len(max + 1).unwrap();
        let error = store.read_group("big").unwrap_err();
        assert!(matches!(error, StoreError::FileTooLarge { .. }), "{error}");
        assert!(error.to_string().contains("quarantine it"), "{error}");
    }

    #[test]
    fn sync_states_round_trip_per_peer_and_ignore_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), "n1").unwrap();
        store.write_sync_state("app", "n2", b"state-2").unwrap();
        store.write_sync_state("app", "n3", b"state-3").unwrap();
        store.write_sync_state("other", "n2", b"other").unwrap();
        store.write_sync_state("app", "n2", b"state-2b").unwrap();
        let states = store.read_sync_states("app").unwrap();
        assert_eq!(states.len(), 2);
        assert_eq!(states["n2"], b"state-2b".to_vec());
        assert_eq!(states["n3"], b"state-3".to_vec());
        assert!(store.write_sync_state("app", "../x", b"x").is_err());
        assert!(store.list_groups().unwrap().is_empty(), "sync files are not groups");
    }
}
