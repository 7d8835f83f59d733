//! konord's settings: command-line flags or a TOML file with the same keys, validated into one
//! [`DaemonSettings`] before anything starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

/// Default gossip period. FACTS: 300 ms gossip detected a crash in 1.8-2.7 s; 250 ms keeps
/// detection near 2 s at ~20 KB/s per node in small meshes.
pub const GOSSIP_INTERVAL_DEFAULT: Duration = Duration::from_millis(250);

/// Default cluster name.
pub const CLUSTER_DEFAULT: &str = "konorkestra";

/// File name of the socket under the data dir when no path is given.
pub const SOCKET_FILE: &str = "konord.sock";

/// The daemon's settings after validation.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Node id (must match the certificate).
    pub node_id: String,
    /// QUIC listen address (UDP); peers reach this node here.
    pub listen: SocketAddr,
    /// Seed addresses of existing nodes.
    pub seeds: Vec<SocketAddr>,
    /// Unix socket path for SDKs and konorctl.
    pub socket: PathBuf,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Labels (`region=eu-west`).
    pub labels: BTreeMap<String, String>,
    /// Directory with node.crt, node.key, ca.crt, node.id.
    pub tls_dir: PathBuf,
    /// Cluster name.
    pub cluster: String,
    /// Gossip period.
    pub gossip_interval: Duration,
    /// Where the HTTP API listens (TCP, HTTPS); `None`: no HTTP API (the default).
    pub http_listen: Option<SocketAddr>,
    /// Serve the HTTP API's reads to callers without a client certificate (the dashboard in a
    /// browser); writes still need one. Off by default.
    pub http_open_reads: bool,
    /// Where alerts are POSTed as JSON (settings file only: such URLs often hold a token).
    pub alert_webhooks: Vec<crate::health::webhook::WebhookUrl>,
    /// The CA bundle that verifies `https` webhook receivers; `None`: the system's.
    pub alert_webhook_ca: Option<PathBuf>,
    /// Who may do what on the socket and the HTTP API (settings file only, `[roles]`); `None`:
    /// no roles, every caller a door lets in may do anything.
    pub roles: Option<crate::api::authorize::RolePolicy>,
    /// The fault layer's control file (tests only; from [`crate::fault_layer::FAULT_CONTROL_ENV`],
    /// never a flag or a settings-file key). `None`: no fault layer.
    pub fault_control: Option<PathBuf>,
}

/// The TOML form of the settings (`konord --config konord.toml`); keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SettingsFile {
    /// See [`DaemonSettings::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`DaemonSettings::node_id`].
    pub node_id: Option<String>,
    /// See [`DaemonSettings::listen`].
    pub listen: Option<String>,
    /// See [`DaemonSettings::seeds`].
    #[serde(default)]
    pub seed: Vec<String>,
    /// See [`DaemonSettings::socket`].
    pub socket: Option<PathBuf>,
    /// Octal text, e.g. "0600".
    pub socket_mode: Option<String>,
    /// `key=value` texts, or a table.
    #[serde(default)]
    pub label: BTreeMap<String, String>,
    /// See [`DaemonSettings::tls_dir`].
    pub tls_dir: Option<PathBuf>,
    /// HTTP API addresses of signers to enroll through (konord's `--join`).
    #[serde(default)]
    pub join: Vec<String>,
    /// File holding the join token (konord's `--token-file`).
    pub token_file: Option<PathBuf>,
    /// See [`DaemonSettings::cluster`].
    pub cluster: Option<String>,
    /// Milliseconds.
    pub gossip_interval_ms: Option<u64>,
    /// See [`DaemonSettings::http_listen`].
    pub http_listen: Option<String>,
    /// See [`DaemonSettings::http_open_reads`].
    #[serde(default)]
    pub http_open_reads: bool,
    /// See [`DaemonSettings::alert_webhooks`]: URLs.
    #[serde(default)]
    pub alert_webhook: Vec<String>,
    /// See [`DaemonSettings::alert_webhook_ca`].
    pub alert_webhook_ca: Option<PathBuf>,
    /// See [`DaemonSettings::roles`]: caller (`uid:N`, `gid:N`, `cert:ID`, `anonymous`) to role
    /// (`viewer`, `operator`, `admin`, optionally `:group,group`).
    pub roles: Option<BTreeMap<String, String>>,
}

impl SettingsFile {
    /// Reads and parses a settings file.
    pub fn read(path: &Path) -> anyhow::Result<SettingsFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).map_err(|error| {
            // toml's own text quotes the offending line, and a settings file may hold a webhook
            // URL with a token: only the place and the message, with quoted values left out.
            let place = error.span().map(|span| {
                let line = text.as_bytes().iter().take(span.start).filter(|byte| **byte == b'\n').count() + 1;
                format!(" at line {line}")
            });
            anyhow::anyhow!(
                "{} is not a valid konord settings file{}: {}",
                path.display(),
                place.unwrap_or_default(),
                without_quoted(error.message())
            )
        })
    }
}

/// `text` with every quoted value (`"..."`, `'...'`) replaced by `"…"`; serde's backticked key
/// names stay (`unknown field `lisen``).
fn without_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut quote = None;
    let mut escaped = false;
    for c in text.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(open) if c == open => quote = None,
            Some(_) => {}
            None if matches!(c, '"' | '\'') => {
                quote = Some(c);
                out.push_str("\"…\"");
            }
            None => out.push(c),
        }
    }
    out
}

/// Parses `key=value` labels.
pub fn parse_label(text: &str) -> anyhow::Result<(String, String)> {
    let (key, value) =
        text.split_once('=').ok_or_else(|| anyhow::anyhow!("label {text:?} is not key=value (e.g. region=eu-west)"))?;
    let valid = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    };
    anyhow::ensure!(valid(key) && valid(value), "label {text:?}: use 1-64 letters, digits, '-', '_', '.', '/'");
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses a socket address, with a message that says what is expected.
pub fn parse_addr(text: &str) -> anyhow::Result<SocketAddr> {
    text.parse().map_err(|_| anyhow::anyhow!("{text:?} is not an address: use IP:PORT, e.g. 127.0.0.1:7400"))
}

/// Parses an octal file mode such as "0600".
pub fn parse_mode(text: &str) -> anyhow::Result<u32> {
    let mode = u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .map_err(|_| anyhow::anyhow!("{text:?} is not an octal file mode (e.g. 0600)"))?;
    anyhow::ensure!(mode <= 0o777, "file mode {text:?} out of range");
    Ok(mode)
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn a_broken_settings_file_is_reported_without_its_values() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "alert-webhook = [\"https://hooks.example.com/T0/SECRET]\n",
            "alert-webhook = \"https://hooks.example.com/T0/SECRET\"\n",
            "listen = 'SECRET'\nnot-a-key = 1\n",
            "alert-webhook = \"https://h/a\\\"SECRET\"\n",
        ] {
            let path = dir.path().join("konord.toml");
            std::fs::write(&path, text).unwrap();
            let error = format!("{:#}", SettingsFile::read(&path).unwrap_err());
            assert!(error.contains("is not a valid konord settings file at line"), "{error}");
            assert!(!error.contains("SECRET"), "{error}");
        }
        let path = dir.path().join("konord.toml");
        std::fs::write(&path, "lisen = '127.0.0.1:7400'\n").unwrap();
        let error = format!("{:#}", SettingsFile::read(&path).unwrap_err());
        assert!(error.contains("`lisen`"), "{error}");
    }
}
