//! The syntax of a configuration file (TOML, YAML, JSON): named by [`crate::config_file`] when
//! it reads one and by `FileError` when it refuses one. Its own module, so that
//! the two need not import each other.

use std::fmt;
use std::str::FromStr;

/// A format name that is not one we read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown file format {format:?}: use toml, yaml or json")]
pub struct UnknownFormat {
    /// What was named.
    pub format: String,
}

/// The syntax of a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    /// TOML.
    Toml,
    /// YAML (one document).
    Yaml,
    /// JSON.
    Json,
}

impl FileFormat {
    /// Guesses the format from a file name's extension.
    pub fn from_path(path: &str) -> Option<FileFormat> {
        let extension = path.rsplit_once('.')?.1.to_ascii_lowercase();
        match extension.as_str() {
            "toml" => Some(FileFormat::Toml),
            "yaml" | "yml" => Some(FileFormat::Yaml),
            "json" => Some(FileFormat::Json),
            _ => None,
        }
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileFormat::Toml => "toml",
            FileFormat::Yaml => "yaml",
            FileFormat::Json => "json",
        })
    }
}

impl FromStr for FileFormat {
    type Err = UnknownFormat;
    fn from_str(text: &str) -> Result<Self, UnknownFormat> {
        match text.to_ascii_lowercase().as_str() {
            "toml" => Ok(FileFormat::Toml),
            "yaml" | "yml" => Ok(FileFormat::Yaml),
            "json" => Ok(FileFormat::Json),
            other => Err(UnknownFormat { format: other.to_owned() }),
        }
    }
}
