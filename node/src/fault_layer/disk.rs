//! The fault layer's store hook: a slow disk (every write and fsync waits as the settings say)
//! and a durability ledger, from which a test can cut the power: kill the process, then drop
//! every byte the ledger does not show as fsynced, as a power loss would (a kill -9 alone loses
//! nothing the kernel was handed). The store runs its I/O on blocking threads in konord, so a
//! wait holds up what a slow device would hold up (acks wait for their fsync) and nothing else.
//!
//! The ledger is `<control file>.durable`, started empty at each konord start, one line per
//! store operation, tab-separated with the path last:
//!
//! ```text
//! write   <offset> <path>     bytes are being written at offset (the file had at least offset)
//! sync    <bytes>  <path>     the first bytes of path are durable (fsync returned)
//! cut     <bytes>  <path>     path was cut to (or created with) bytes
//! renaming <to>    <from>     from is about to be renamed to `to`
//! rename  <to>     <from>     from was renamed to `to` (`to` comes first: the path is last)
//! ```
//!
//! Only lines ended by a newline count: a kill may tear the last one. A note that cannot be
//! written ends the ledger (it is removed): a gap in it could make the model harsher than a
//! power loss, and no ledger means a power cut drops nothing.
//!
//! Reading it back ([`DurableModel`]) is lenient where the model cannot know: a file the ledger
//! never names is kept as found, and renames and creations count as durable at once (no
//! directory fsync is asked for). So a power cut applied from it may lose less than a real one,
//! never more.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::FaultLayer;
use crate::storage::store::{StorageHook, WriteFault};

/// The ledger's path for the control file `control`.
pub fn ledger_path(control: &Path) -> PathBuf {
    let mut name = control.as_os_str().to_owned();
    name.push(".durable");
    PathBuf::from(name)
}

/// The hook, over the layer's settings.
#[derive(Debug)]
pub struct FaultDisk {
    layer: Arc<FaultLayer>,
    ledger: Option<Mutex<Ledger>>,
}

#[derive(Debug)]
struct Ledger {
    path: PathBuf,
    /// `None` once a note failed: the ledger was removed and nothing more is noted.
    file: Option<File>,
}

impl FaultDisk {
    /// A hook reading `layer`'s settings at each operation, writing the ledger at `ledger`
    /// (created empty; `None`: no ledger).
    pub fn new(layer: Arc<FaultLayer>, ledger: Option<&Path>) -> io::Result<FaultDisk> {
        let ledger = match ledger {
            Some(path) => Some(Mutex::new(Ledger { path: path.to_owned(), file: Some(File::create(path)?) })),
            None => None,
        };
        Ok(FaultDisk { layer, ledger })
    }

    fn note(&self, line: std::fmt::Arguments<'_>) {
        let Some(ledger) = &self.ledger else { return };
        let mut ledger = ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(file) = ledger.file.as_mut() else { return };
        // One write per line, under the lock (one writer at a time).
        if let Err(error) = file.write_all(format!("{line}\n").as_bytes()) {
            ledger.file = None;
            let removed = std::fs::remove_file(&ledger.path);
            tracing::warn!(
                ledger = %ledger.path.display(),
                %error,
                removed = removed.is_ok(),
                "fault layer: cannot note in the durability ledger; it is removed, and a power cut will drop nothing"
            );
        }
    }
}

impl StorageHook for FaultDisk {
    fn before_write(&self, path: &Path, offset: u64, _bytes: &[u8]) -> Result<(), WriteFault> {
        let wait = self.layer.settings().write_delay;
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        self.note(format_args!("write\t{offset}\t{}", path.display()));
        Ok(())
    }

    fn before_sync(&self, _path: &Path) -> io::Result<()> {
        let wait = self.layer.settings().fsync_delay;
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        Ok(())
    }

    fn after_sync(&self, path: &Path, durable_bytes: u64) {
        self.note(format_args!("sync\t{durable_bytes}\t{}", path.display()));
    }

    fn before_rename(&self, from: &Path, to: &Path) {
        self.note(format_args!("renaming\t{}\t{}", to.display(), from.display()));
    }

    fn after_rename(&self, from: &Path, to: &Path) {
        self.note(format_args!("rename\t{}\t{}", to.display(), from.display()));
    }

    fn after_truncate(&self, path: &Path, length: u64) {
        self.note(format_args!("cut\t{length}\t{}", path.display()));
    }
}

/// What a ledger says is durable: for each file it names, the bytes a power loss keeps.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DurableModel {
    /// File -> durable length.
    pub durable: BTreeMap<PathBuf, u64>,
}

impl DurableModel {
    /// Reads a ledger's text. Only newline-ended lines count (the last may be torn by the
    /// kill); lines that do not parse are skipped.
    pub fn from_ledger(text: &str) -> DurableModel {
        let mut durable: BTreeMap<PathBuf, u64> = BTreeMap::new();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.split('\n') {
            let mut fields = line.splitn(3, '\t');
            let (Some(op), Some(value), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let path = PathBuf::from(path);
            if op == "renaming" {
                // The rename may be done without its `rename` note (a kill in between): both
                // files are kept as found from here, never cut to the other's length.
                durable.remove(&path);
                durable.remove(&PathBuf::from(value));
                continue;
            }
            if op == "rename" {
                // value is the new name: the old one's durable bytes go with it.
                let to = PathBuf::from(value);
                match durable.remove(&path) {
                    Some(bytes) => durable.insert(to, bytes),
                    None => durable.remove(&to),
                };
                continue;
            }
            let Ok(value) = value.parse::<u64>() else { continue };
            match op {
                // A file first seen being written at `offset` held at least that much before.
                "write" => {
                    durable.entry(path).or_insert(value);
                }
                "sync" => {
                    durable.insert(path, value);
                }
                "cut" => {
                    let bytes = durable.get(&path).copied().unwrap_or(value).min(value);
                    durable.insert(path, bytes);
                }
                _ => {}
            }
        }
        DurableModel { durable }
    }

    /// Cuts every file the model names to its durable length (files shorter, or gone, are left
    /// alone); returns the bytes dropped.
    pub fn apply(&self) -> io::Result<u64> {
        let mut dropped = 0;
        for (path, &bytes) in &self.durable {
            let file = match std::fs::OpenOptions::new().write(true).open(path) {
                Ok(file) => file,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            let length = file.metadata()?.len();
            if length > bytes {
                file.set_len(bytes)?;
                file.sync_all()?;
                dropped += length - bytes;
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_keeps_synced_bytes_and_drops_the_rest() {
        let ledger = "write\t0\t/d/a\nsync\t100\t/d/a\nwrite\t100\t/d/a\n\
                      write\t500\t/d/b\n\
                      cut\t0\t/d/t\nwrite\t0\t/d/t\nsync\t40\t/d/t\nrename\t/d/c\t/d/t\n\
                      cut\t30\t/d/e\nsync\t30\t/d/e\nwrite\t30\t/d/e\n\
                      rename\t/d/f\t/d/unknown\n\
                      sync\t80\t/d/g\nsync\t90\t/d/h\nrenaming\t/d/g\t/d/h\n\
                      cut\t0\t/d/x\nsync\t7\t/d/torn";
        let model = DurableModel::from_ledger(ledger);
        let expected: BTreeMap<PathBuf, u64> = [("/d/a", 100), ("/d/b", 500), ("/d/c", 40), ("/d/e", 30), ("/d/x", 0)]
            .into_iter()
            .map(|(path, bytes)| (PathBuf::from(path), bytes))
            .collect();
        assert_eq!(model.durable, expected, "a rename begun is kept as found; a torn last line is ignored");
    }

    #[test]
    fn a_power_cut_drops_exactly_the_unsynced_tail() {
        let dir = tempfile::tempdir().unwrap();
        let layer = FaultLayer::fixed(Default::default());
        let ledger = dir.path().join("faults.durable");
        let disk = FaultDisk::new(layer, Some(&ledger)).unwrap();
        let path = dir.path().join("group.konor");
        std::fs::write(&path, vec![7u8; 300]).unwrap();
        disk.before_write(&path, 0, &[0; 100]).unwrap();
        disk.after_sync(&path, 100);
        disk.before_write(&path, 100, &[0; 200]).unwrap();
        let model = DurableModel::from_ledger(&std::fs::read_to_string(&ledger).unwrap());
        assert_eq!(model.apply().unwrap(), 200);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 100);
        assert_eq!(model.apply().unwrap(), 0, "a second cut drops nothing more");
    }
}
