//! The credential files: PEM read back with errors that name the file, and new files written all or none, keys with
//! private permissions.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{PkiError, unreadable};

pub(super) fn parse_cert(path: &Path, pem: &[u8]) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem).map_err(|error| unreadable(path, "PEM certificate", error))
}

pub(super) fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| unreadable(path, "PEM private key", error))
}

/// Reads a file, mapping "not found" to `None` so callers can name what is missing.
pub(super) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PkiError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io { action: "read", path: path.to_owned(), source }),
    }
}

/// Fails on the first path that exists, before any key is generated, so the error names the file the user must
/// move; `create_new` in [`write_new_files`] still guards against a file appearing in between.
pub(super) fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    for path in paths {
        if fs::symlink_metadata(path).is_ok() {
            return Err(PkiError::FileExists { path: path.to_path_buf() });
        }
    }
    Ok(())
}

/// Creates a directory that will hold private keys; new directories get mode 0700, existing ones are left alone.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| PkiError::Io { action: "create directory", path: dir.to_owned(), source })
}

pub(super) struct NewFile<'a> {
    pub(super) path: PathBuf,
    pub(super) contents: &'a [u8],
    /// Private files (keys) get mode 0600 so only the node's user can read them.
    pub(super) private: bool,
}

/// Writes all files or none: on failure the files created so far are removed, so the command can simply be rerun.
pub(super) fn write_new_files(files: &[NewFile<'_>]) -> Result<(), PkiError> {
    for (written, file) in files.iter().enumerate() {
        if let Err(error) = write_new_file(file) {
            for earlier in &files[..written] {
                // Best effort: the original error is the one worth reporting.
                let _ = fs::remove_file(&earlier.path);
            }
            return Err(error);
        }
    }
    Ok(())
}

fn write_new_file(file: &NewFile<'_>) -> Result<(), PkiError> {
    let io_error = |action, source| PkiError::Io { action, path: file.path.clone(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if file.private { 0o600 } else { 0o644 });
    let mut handle = options.open(&file.path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => PkiError::FileExists { path: file.path.clone() },
        _ => io_error("create", source),
    })?;
    // Credentials must be durable before the caller reports success and hands the node its certificate.
    if let Err(source) = handle.write_all(file.contents).and_then(|()| handle.sync_all()) {
        drop(handle);
        // Best effort: a half-written key file must not stay behind to block the rerun.
        let _ = fs::remove_file(&file.path);
        return Err(io_error("write", source));
    }
    Ok(())
}
