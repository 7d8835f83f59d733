//! Where `konorctl` takes a group's secret key from, and where it puts a new one: a file, standard
//! input or the environment, never the command line (issue 12: a key on argv shows in `ps` and
//! in shell history).

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use konor_sdk::Secret;

use crate::ctl::exit::UsageError;

/// The environment variable `group join` reads the key from when no `--key-file` is given.
pub const KEY_ENV: &str = "KONOR_GROUP_KEY";

/// A key file larger than this is not a key: konord's own key files (`groups/<group>.key`, a
/// keyring whose first line is the current key) are at most this.
pub const KEY_FILE_BYTES_MAX: u64 = konor_crdt::keyring::KEYRING_TEXT_BYTES_MAX as u64;

/// Reads a key from `path` (`-`: standard input): the first line, without surrounding space.
pub fn read(path: &Path) -> anyhow::Result<Secret> {
    let mut text = Secret::new(String::new());
    let what = if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(KEY_FILE_BYTES_MAX + 1)
            .read_to_string(text.expose_mut())
            .context("cannot read the group key from standard input")?;
        "standard input".to_owned()
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open the key file {}", path.display()))?;
        file.take(KEY_FILE_BYTES_MAX + 1)
            .read_to_string(text.expose_mut())
            .with_context(|| format!("cannot read the key file {}", path.display()))?;
        path.display().to_string()
    };
    if text.expose().len() as u64 > KEY_FILE_BYTES_MAX {
        return Err(UsageError(format!("{what} holds more than {KEY_FILE_BYTES_MAX} bytes: not a group key")).into());
    }
    checked(text.expose().lines().next().unwrap_or_default(), &what)
}

/// The key in [`KEY_ENV`].
pub fn from_env() -> anyhow::Result<Secret> {
    match std::env::var(KEY_ENV).map(Secret::new) {
        Ok(key) => checked(key.expose(), KEY_ENV),
        Err(_) => Err(UsageError(format!(
            "group join needs the group's key: --key-file FILE (as group create --key-out wrote it), \
             --key-file - (standard input) or the {KEY_ENV} environment variable"
        ))
        .into()),
    }
}

fn checked(key: &str, what: &str) -> anyhow::Result<Secret> {
    let key = key.trim();
    if key.is_empty() {
        return Err(UsageError(format!("{what} holds no group key")).into());
    }
    Ok(Secret::from(key))
}

/// Writes `key` to a new file at `path`, readable by its owner only; never overwrites.
pub fn write_new(path: &Path, key: &Secret) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(key.expose().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_written_is_read_back_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.key");
        write_new(&path, &"0123abcd".into()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&path).unwrap().expose(), "0123abcd");
        let again = write_new(&path, &"other".into()).unwrap_err();
        assert!(format!("{again:#}").contains("cannot create"), "{again:#}");
        assert_eq!(read(&path).unwrap().expose(), "0123abcd", "never overwritten");
    }

    #[test]
    fn empty_or_huge_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read(&empty).unwrap_err().to_string().contains("holds no group key"));
        let huge = dir.path().join("huge");
        std::fs::write(&huge, "k".repeat(KEY_FILE_BYTES_MAX as usize + 1)).unwrap();
        assert!(read(&huge).unwrap_err().to_string().contains("not a group key"));
        assert!(read(&dir.path().join("missing")).is_err());
    }
}
