//! The command line of `konorctl`: flags, subcommands and their arguments (clap derive).
//!
//! To add a subcommand: a variant in [`Command`] (with its arguments in a struct beside it or in
//! its own module under `ctl/`), and an arm in [`crate::ctl::run`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use konor_crdt::FileFormat;
use konor_sdk::Secret;
use konor_sdk::protocol::WriteMeta;

use crate::ctl::input::{Assignment, parse_assignment};

/// The exit codes, shown after `konorctl --help`; `konorctl.rs` documents the same list.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok; also a write that changed nothing (\"no change: ...\"), so scripts can re-run writes
  1  konord refused the request or could not commit it: bad input, unknown group, key or
     version not found, wrong group key, no peer available, write not committed (busy,
     round aborted, no live quorum acknowledged it, or this node could not save it: disk
     full); also `get GROUP KEY` when KEY is unset
  2  usage error: unknown flag, missing argument, malformed KEY=VALUE
  3  the outcome is unknown: konord cannot be reached (no socket given, connect failed, no
     answer in time, connection lost), or a strong write's commit could not be confirmed
     (after either a write may or may not have been applied: check `konorctl history`)
  4  PKI or file error: CA or certificate files, the file given to `apply`
  5  internal error: konord failed internally (see its log), versions of konorctl and konord
     that do not understand each other, or a bug
  6  `health`: the node fails a threshold given (or is degraded)
  7  `release --wait`, `release status --wait`: the release was aborted (or a newer one
     replaced it)
  8  `--wait`: the release was not complete when `--wait-timeout` ran out (it goes on)

The daemon's socket comes from --socket, else from the KONOR_SOCKET environment variable
(konord listens on <data-dir>/konord.sock unless started with --socket). With --endpoint
https://HOST:PORT (or KONOR_ENDPOINT), every command goes to that node's HTTP API instead,
with the certificate in --tls-dir (or KONOR_TLS_DIR).";

/// Operate a Konorkestra cluster through the local konord: groups, settings, versions, nodes.
#[derive(Debug, Parser)]
#[command(name = "konorctl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// konord's Unix socket [default: $KONOR_SOCKET].
    // Read from the environment by `ctl::run`, not by clap: an empty KONOR_SOCKET then means
    // "not set" (exit 3 with advice) instead of a usage error.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Talk to any node's HTTP API instead of the local socket: https://HOST:PORT (konord
    /// --http-listen) [default: $KONOR_ENDPOINT].
    #[arg(long, global = true, value_name = "URL")]
    pub endpoint: Option<String>,
    /// With --endpoint: the directory with this caller's certificate from the cluster CA
    /// (node.crt, node.key, node.id, ca.crt, as `konorctl cert issue` writes them)
    /// [default: $KONOR_TLS_DIR].
    #[arg(long, global = true, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Output: aligned tables for people, or the daemon's answer as JSON for scripts.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// How long to wait for konord's answer, in milliseconds [default: 10000; group join: 20000].
    #[arg(long, global = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: Option<u64>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns and sentences.
    Table,
    /// The daemon's answer as pretty JSON (`watch`: one compact JSON object per line).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a throw-away 3-node mesh on loopback with an example app, and watch it work.
    Demo,
    /// Create the cluster certificate authority (once per cluster).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue node certificates from the cluster CA.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Make join tokens, with which hosts enroll themselves (`konord --join`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Read a node's audit log (every node's chain, as that node holds it): list, export,
    /// verify. Reads the data dir's files, so it runs on the node's host as its user.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Create, join, leave and list configuration groups on this node.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Set keys: `konorctl set app db.pool=20 name=eu-west` (values are JSON, else strings).
    Set(SetArgs),
    /// Print one setting, or all settings of the group when KEY is left out.
    Get(GetArgs),
    /// Delete keys.
    Delete(DeleteArgs),
    /// Replace a group's settings with a file's (TOML, YAML or JSON; `-` reads stdin).
    Apply(ApplyArgs),
    /// Make a new version whose settings equal those of an older version.
    Rollback(RollbackArgs),
    /// Release a version of a gated group to every member, or to a canary slice grown wave by
    /// wave; `release status GROUP` follows it, `release report GROUP` exports the releases.
    Release(ReleaseArgs),
    /// Move the current canary release of a gated group to its next wave.
    Promote(PromoteArgs),
    /// Abort the current release of a gated group: every member goes back to what it served
    /// before it.
    Abort(AbortArgs),
    /// List a group's versions, oldest first.
    History(GroupArg),
    /// Print the whole settings of one version: `konorctl show app@v12`.
    Show(ShowArgs),
    /// Show what changed between two versions.
    Diff(DiffArgs),
    /// Set, show, remove a group's schema (a JSON Schema its settings must satisfy), or check a
    /// file against it without writing.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// List keys that were written concurrently, with the value that won.
    Conflicts(GroupArg),
    /// Print each change of a group as it happens, until Ctrl-C.
    Watch(WatchArgs),
    /// List the nodes of the mesh as this node sees them.
    Nodes,
    /// Show a group's state on every member node and in local processes.
    Status(GroupArg),
    /// Show this node's health (members, groups, degraded groups, queues, alerts); exit 6 when
    /// it fails a threshold given (a degraded node fails unless --allow-degraded, a mesh at its
    /// node cap unless --allow-at-cap).
    Health(HealthArgs),
    /// List the anomaly alerts that hold (flapping nodes, late heartbeats, a label's nodes
    /// lost at once) and those that cleared.
    Alerts,
    /// Show what this node's failure detector saw over the last hours: every node over the
    /// last hour and the labels now, or one node's state changes and its last hour by minute.
    NodeHistory {
        /// A node id; without it, the whole mesh.
        node: Option<String>,
    },
}

/// `konorctl health`
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// Fail when more members than this are dead.
    #[arg(long, value_name = "N")]
    pub max_dead: Option<u64>,
    /// Fail when more groups than this are stale here.
    #[arg(long, value_name = "N")]
    pub max_stale: Option<u64>,
    /// Fail when a group last changed here longer ago than this.
    #[arg(long, value_name = "MS")]
    pub max_since_change_ms: Option<u64>,
    /// Do not fail on a degraded node (a failed write to disk).
    #[arg(long)]
    pub allow_degraded: bool,
    /// Do not fail when the mesh is at its node cap (new nodes are refused; the state of the
    /// whole mesh, not of this node).
    #[arg(long)]
    pub allow_at_cap: bool,
}

/// `konorctl ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create ca.crt and ca.key in DIR; refuses to overwrite an existing CA.
    Init {
        /// Directory for the CA files (created if missing); keep ca.key offline.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `konorctl cert ...`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a node certificate: writes node.crt, node.key, node.id and ca.crt into OUT.
    Issue {
        /// Directory holding the cluster CA (from `konorctl ca init`).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// The node's id: a-z, 0-9 and '-', as konord's --node-id.
        #[arg(long, value_name = "ID")]
        node_id: String,
        /// Directory for the node's files (konord's --tls-dir).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Also copy the CA key into OUT: the node becomes a signer, which enrolls hosts that
        /// present a join token. Every signer holds the whole CA key; keep them few (two or
        /// three, so enrollment survives one down).
        #[arg(long)]
        signer: bool,
    },
    /// Revoke a node's (or an operator's) certificates: signs the revocation with the CA key
    /// and hands it to the daemon, which spreads it; every node then refuses handshakes with
    /// them and closes its connections with them. Without --serial it covers every
    /// certificate of ID issued up to now (a certificate issued later admits it again).
    Revoke {
        /// The identity whose certificates to revoke (a node id, or an operator's name).
        id: String,
        /// Directory holding the cluster CA (from `konorctl ca init`).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Revoke only the certificate with this serial number (hex, as `konorctl cert issue` printed it
        /// and konord logs it at start).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// Why, kept with the revocation.
        #[arg(long, default_value = "")]
        reason: String,
        /// Write the signed revocation to FILE instead of sending it (to hand it to a node from
        /// another host: `konorctl cert revoke --submit FILE`).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Send a signed revocation written by `revoke --out` to the daemon.
    Submit {
        /// The file `revoke --out` wrote.
        file: PathBuf,
    },
    /// List the revocations this node holds.
    Revocations,
}

/// `konorctl audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The audited actions, oldest first: asked of the node (the admin role), or read from
    /// its data dir with --data-dir.
    List {
        /// Read the files of this data dir instead of asking the node.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Only the last DURATION (e.g. 1h).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        since: Option<u64>,
        /// Only actions on this group.
        #[arg(long)]
        group: Option<String>,
        /// Only actions taken on this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Every record, one JSON object per line (`--format jsonl`), for a SIEM or an archive.
    Export {
        /// The node's data dir (konord's --data-dir).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The only format: JSON lines.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
    },
    /// Checks every chain: a changed, removed or reordered record breaks it (exit 4).
    Verify {
        /// The node's data dir (konord's --data-dir).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

/// `konorctl token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a join token: a host starts with `konord --join ADDR --token-file FILE` and gets
    /// its certificate from a signer. The token is a secret until it expires: it goes to
    /// stdout, or to FILE (mode 0600) with --out.
    Create {
        /// Directory holding the CA (the CA directory, or a signer's TLS directory).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// How long it admits hosts (at most 168h).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration_ms)]
        ttl: u64,
        /// How many hosts it may enroll (1 to 100).
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// The node id the host gets (its own --node-id otherwise); such a token also
        /// re-enrolls a replaced host of that id once the old one is down.
        #[arg(long, value_name = "ID")]
        node_id: Option<String>,
        /// A label the host gets, key=value (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Write the token to FILE (created, mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `konorctl group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group on this node and print its secret key.
    Create {
        /// Group name.
        name: String,
        /// eventual: every node accepts writes and converges; strong: a write commits on every
        /// member of the group's configuration or on none.
        #[arg(long, value_enum)]
        mode: ModeArg,
        /// Read the group's secret key from FILE (`-`: standard input) instead of generating
        /// one. A key is never taken on the command line: it would show in `ps` and in shell
        /// history.
        #[arg(long, value_name = "FILE")]
        key_file: Option<std::path::PathBuf>,
        /// Write the group's key to FILE (created with mode 600, never overwritten) instead of
        /// printing it.
        #[arg(long, value_name = "FILE")]
        key_out: Option<std::path::PathBuf>,
        /// Refused: see --key-file.
        #[arg(long, hide = true, value_name = "SECRET")]
        key: Option<Secret>,
        /// Strong groups: remove a member from the configuration once it has been dead this
        /// long (e.g. 30s, 2m; at least 6s; default 30s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
        evict_after: Option<u64>,
        /// Strong groups: what reads do while this node cannot prove it is fresh.
        #[arg(long, value_enum)]
        fencing: Option<FencingArg>,
        /// When new versions reach applications: immediate (at once, the default) or gated
        /// (written as always, served only once `konorctl release` targets them).
        #[arg(long, value_enum)]
        release: Option<ReleasePolicyArg>,
    },
    /// Join an existing group with its secret key; this node then holds a copy.
    Join {
        /// Group name.
        name: String,
        /// A file holding the group's key (`-`: standard input), as `group create --key-out`
        /// writes it; else the KONOR_GROUP_KEY environment variable. Never the command line.
        #[arg(long, value_name = "FILE")]
        key_file: Option<std::path::PathBuf>,
        /// Refused: see --key-file.
        #[arg(long, hide = true, value_name = "SECRET")]
        key: Option<Secret>,
    },
    /// Move a group to a new key: its members are handed the new key (wrapped under the one
    /// they hold); the old key no longer admits anyone, so a node that left cannot join again
    /// with it. Prints the new key (or writes it with --key-out) for nodes that join later.
    RotateKey {
        /// Group name.
        name: String,
        /// Read the new key from FILE (`-`: standard input) instead of generating one.
        #[arg(long, value_name = "FILE")]
        key_file: Option<std::path::PathBuf>,
        /// Write the new key to FILE (created with mode 600, never overwritten) instead of
        /// printing it.
        #[arg(long, value_name = "FILE")]
        key_out: Option<std::path::PathBuf>,
    },
    /// Stop holding a group on this node (a strong group's member first leaves its
    /// configuration, agreed by the others).
    Leave {
        /// Group name.
        name: String,
        /// Drop the group here at once, without leaving the configuration first; the other
        /// members evict this node afterwards.
        #[arg(long)]
        force: bool,
    },
    /// Remove members that are down for good from a strong group's configuration.
    Remove {
        /// Group name.
        name: String,
        /// The members' node ids.
        #[arg(required = true)]
        nodes: Vec<String>,
        /// Without a majority of the configuration: only when the removed members are gone for
        /// good and no majority is left (the other member of a two-member group, two of three).
        /// Running this on both sides of a partition splits the group: make sure the removed
        /// nodes are really gone.
        #[arg(long)]
        force: bool,
    },
    /// List the groups this node holds.
    List,
}

/// A strong group's fencing policy, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FencingArg {
    /// Answer from the last durable state, flagged stale.
    Stale,
    /// Wait until this node is fresh again (up to 5 s), else fail.
    Block,
}

/// A group's release policy, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReleasePolicyArg {
    /// Every version is served as soon as a node holds it.
    Immediate,
    /// Versions are served only once a release targets them.
    Gated,
}

impl ReleasePolicyArg {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleasePolicyArg::Immediate => "immediate",
            ReleasePolicyArg::Gated => "gated",
        }
    }
}

impl FencingArg {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            FencingArg::Stale => "stale",
            FencingArg::Block => "block",
        }
    }
}

/// Parses `30s`, `2m`, `1500ms` (a bare number is seconds) into milliseconds.
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a duration (try 30s or 2m)"))?;
    let factor = match unit {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s, m or h")),
    };
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a duration (try 30s or 2m)"));
    }
    Ok((value * factor).round() as u64)
}

/// A group's consistency mode, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Every node accepts writes; replicas converge.
    Eventual,
    /// Writes commit atomically on all live members.
    Strong,
}

impl ModeArg {
    /// The wire name (`"eventual"`, `"strong"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModeArg::Eventual => "eventual",
            ModeArg::Strong => "strong",
        }
    }
}

/// A config file's syntax, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// TOML.
    Toml,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

impl From<FormatArg> for FileFormat {
    fn from(format: FormatArg) -> FileFormat {
        match format {
            FormatArg::Toml => FileFormat::Toml,
            FormatArg::Yaml => FileFormat::Yaml,
            FormatArg::Json => FileFormat::Json,
        }
    }
}

/// Who makes a write and why; shown in `history`.
#[derive(Debug, Clone, Args)]
pub struct WriteArgs {
    /// Why: stored with the version and shown in history.
    #[arg(short = 'm', long, value_name = "MESSAGE")]
    pub message: Option<String>,
    /// On whose behalf: konord authors the version as the user it authenticated on the
    /// socket (USER@NODE) and adds this in parentheses, marked as a claim.
    #[arg(long, value_name = "AUTHOR")]
    pub author: Option<String>,
    /// Write only if the group's only latest version is this one (as `history` lists it);
    /// otherwise nothing is written and konorctl exits 1 (`condition_failed`).
    #[arg(long, value_name = "VERSION")]
    pub if_version: Option<String>,
    /// Write only if the group's content hash starts with these hex digits (12 to 64, as
    /// `history` and `get` show it).
    #[arg(long, value_name = "HASH")]
    pub if_content: Option<String>,
}

impl WriteArgs {
    /// The write's metadata as the protocol carries it.
    pub fn meta(&self) -> WriteMeta {
        WriteMeta {
            author: self.author.clone().unwrap_or_default(),
            message: self.message.clone().unwrap_or_default(),
            if_version: self.if_version.clone(),
            if_content: self.if_content.clone(),
            secret: Vec::new(),
        }
    }
}

/// Just a group.
#[derive(Debug, Clone, Args)]
pub struct GroupArg {
    /// Group name.
    pub group: String,
}

/// `konorctl set`
#[derive(Debug, Clone, Args)]
pub struct SetArgs {
    /// Group name.
    pub group: String,
    /// KEY=VALUE pairs; VALUE is parsed as JSON when it is JSON (8080, true, a list), else taken as a string.
    #[arg(required_unless_present = "secret", value_name = "KEY=VALUE", value_parser = parse_assignment)]
    pub assignments: Vec<Assignment>,
    /// Also set KEY to a secret value read from stdin (`konorctl set app --secret db.password
    /// < file`), and mark KEY secret: callers that may not reveal secrets (viewers) read its
    /// values, at every version, as `"<secret>"`. The mark is never taken back. A secret never
    /// goes on the command line, where `ps` and shell history show it.
    #[arg(long, value_name = "KEY")]
    pub secret: Option<String>,
    /// Parse the secret value as JSON (without it, stdin's text less one trailing newline is
    /// the value, as a string).
    #[arg(long, requires = "secret")]
    pub json_value: bool,
    /// Write the values into the overlay of the nodes whose labels match (`env=dev`,
    /// `region=eu,tier=web`): in a gated group, those nodes serve them in place of the base's
    /// once released (stored as `KEY@env=dev`).
    #[arg(long, value_name = "K=V,...")]
    pub overlay: Option<String>,
    /// Message and author.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// `konorctl get`
#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    /// Group name.
    pub group: String,
    /// Key; all settings when left out.
    pub key: Option<String>,
    /// Only the keys that start with this text (`db.`).
    #[arg(long, value_name = "PREFIX", conflicts_with = "key")]
    pub prefix: Option<String>,
}

/// `konorctl show`
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// GROUP@VERSION (`app@v12`).
    #[arg(value_name = "GROUP@VERSION", value_parser = parse_group_version)]
    pub target: (String, String),
}

/// Splits `app@v12`.
fn parse_group_version(text: &str) -> Result<(String, String), String> {
    match text.split_once('@') {
        Some((group, version)) if !group.is_empty() && !version.is_empty() => {
            Ok((group.to_owned(), version.to_owned()))
        }
        _ => Err(format!("expected GROUP@VERSION (app@v12), got {text:?}")),
    }
}

/// `konorctl schema ...`
#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Set the group's schema from a JSON Schema file (`-` reads stdin): a new version, refused
    /// when the settings break it (the violations are listed).
    Set {
        /// Group name.
        group: String,
        /// The JSON Schema file.
        file: String,
        /// Message, author and precondition.
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Print the group's schema and the version that set it.
    Get {
        /// Group name.
        group: String,
    },
    /// Remove the group's schema (a new version).
    Remove {
        /// Group name.
        group: String,
        /// Message, author and precondition.
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Check a settings file against the group's schema without writing anything; exit 1 when
    /// it breaks a rule (every broken rule is listed).
    Check {
        /// Group name.
        group: String,
        /// The settings file (TOML, YAML or JSON; `-` reads stdin).
        file: String,
        /// The file's syntax; needed when its name does not end in .toml, .yaml, .yml or .json.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
        /// Check against this JSON Schema file instead of the group's (try a schema before
        /// setting it).
        #[arg(long, value_name = "FILE")]
        schema: Option<String>,
    },
}

/// `konorctl delete`
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// Group name.
    pub group: String,
    /// Keys to delete.
    #[arg(required = true, value_name = "KEY")]
    pub keys: Vec<String>,
    /// Delete the keys from the overlay of this selector (`env=dev`), not from the base.
    #[arg(long, value_name = "K=V,...")]
    pub overlay: Option<String>,
    /// Message and author.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// `konorctl apply`
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// Group name.
    pub group: String,
    /// The file; `-` reads stdin.
    pub file: String,
    /// The file's syntax; needed when its name does not end in .toml, .yaml, .yml or .json.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Mark KEY secret (repeatable): callers that may not reveal secrets read its values as
    /// `"<secret>"`. The mark is never taken back.
    #[arg(long, value_name = "KEY")]
    pub secret: Vec<String>,
    /// Message and author.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// `konorctl rollback`
#[derive(Debug, Clone, Args)]
pub struct RollbackArgs {
    /// Group name.
    pub group: String,
    /// The version to return to (`v12`, as `konorctl history` lists them).
    pub version: String,
    /// Message and author.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// `konorctl release`: `release GROUP --to vN ...` makes a release; `release status` and
/// `release report` read them. (A group named `status` or `report` is released with
/// `konorctl release --to vN -- status`.)
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReleaseArgs {
    /// Read a group's releases instead of making one.
    #[command(subcommand)]
    pub command: Option<ReleaseCommand>,
    /// Group name (a gated group).
    #[arg(required = true)]
    pub group: Option<String>,
    /// The version to serve (`v12`, as `konorctl history` lists them; an older one rolls the
    /// release back).
    #[arg(long, value_name = "VERSION", required = true)]
    pub to: Option<String>,
    /// Then follow it until it completes or is aborted (as `release status --wait`).
    #[command(flatten)]
    pub wait: WaitArgs,
    /// Which nodes: all (every member at once) or canary (a slice, grown by `promote`).
    #[arg(long, value_enum, default_value = "all")]
    pub strategy: ReleaseStrategyArg,
    /// Canary: the first wave's percentage of the matching members; the release then waits for
    /// `promote` (or its bake time) to reach them all (the same as `--waves P,100`).
    #[arg(long, value_name = "PERCENT", conflicts_with = "waves")]
    pub percent: Option<u8>,
    /// Canary: every wave's percentage, strictly increasing (`10,50,100`).
    #[arg(long, value_name = "P1,P2,...", value_delimiter = ',')]
    pub waves: Option<Vec<u8>>,
    /// Canary: only members with these labels (`region=eu-west,tier=web`).
    #[arg(long, value_name = "K=V,...")]
    pub selector: Option<String>,
    /// Canary: how long each wave must hold, with no app failing to apply it, before the members
    /// promote it to the next (e.g. 5m; without it, promotion is left to `konorctl promote`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub bake: Option<u64>,
    /// Guard: the members abort the release once more than N processes failed to apply it
    /// (default 0: the first failure aborts).
    #[arg(long, value_name = "N")]
    pub max_failed: Option<u32>,
    /// Guard: the members abort the release once a process on a node it targets reports an
    /// error rate above this (`2%` or `0.02`; apps report theirs with the SDK's
    /// `report_error_rate`).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_error_rate: Option<f64>,
    /// Guard: the members abort the release once a node it targets is dead.
    #[arg(long)]
    pub node_health: bool,
    /// Message and author.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// A rate as typed: `2%` or `0.02`, from 0 to 1.
fn parse_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let rate = match text.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a rate: write 2% or 0.02"))?;
    if !rate.is_finite() || !(0.0..=1.0).contains(&rate) {
        return Err(format!("{text:?} is not a rate from 0% to 100%"));
    }
    Ok(rate)
}

/// `konorctl release status|report`
#[derive(Debug, Clone, Subcommand)]
pub enum ReleaseCommand {
    /// The newest release of a gated group, desired against actual: every member's wave and
    /// the version it serves, every process's apply result, the success rate and the time to
    /// consistency.
    Status {
        /// Group name (a gated group).
        group: String,
        /// Follow it.
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// A gated group's releases as an audit report: one row per release, node and process,
    /// with the result and when it applied (newest release first).
    Report {
        /// Group name (a gated group).
        group: String,
        /// `table` (as `release status`, per release), `jsonl` or `csv` (one row each).
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
        /// How many releases, newest first (at most 64).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// `--wait`: follow a release until it completes or is aborted.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Follow the release, printing each change of its progress to stderr, until every node
    /// of its last wave applied it (exit 0) or it is aborted (exit 7).
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (exit 8; the release goes on).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms, default_value = "10m", requires = "wait")]
    pub wait_timeout: u64,
}

/// How `release report` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// As `release status`, one block per release.
    Table,
    /// One JSON object per (release, node, process).
    Jsonl,
    /// One CSV row per (release, node, process), with a header.
    Csv,
}

/// Which nodes a release reaches, as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReleaseStrategyArg {
    /// Every member.
    All,
    /// A slice of the members, grown wave by wave.
    Canary,
}

/// `konorctl promote`
#[derive(Debug, Clone, Args)]
pub struct PromoteArgs {
    /// Group name (a gated group with a canary release in progress).
    pub group: String,
    /// The wave to move to, counted from 1 (default: the next one).
    #[arg(long)]
    pub wave: Option<u32>,
    /// Message and author.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// `konorctl abort`
#[derive(Debug, Clone, Args)]
pub struct AbortArgs {
    /// Group name (a gated group with a release in force).
    pub group: String,
    /// Why (stored with the abort and shown in status).
    #[arg(long)]
    pub reason: Option<String>,
    /// Message and author.
    #[command(flatten)]
    pub write: WriteArgs,
}

/// `konorctl diff`
#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    /// Group name.
    pub group: String,
    /// The older version.
    pub from: String,
    /// The newer version.
    pub to: String,
}

/// `konorctl watch`
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Group name.
    pub group: String,
    /// Also print every change after this revision (from `konorctl get` or an earlier watch).
    #[arg(long, value_name = "REV")]
    pub from: Option<u64>,
    /// Only changes to keys that start with this text (`db.`).
    #[arg(long, value_name = "PREFIX")]
    pub prefix: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn set_takes_assignments_and_a_message() {
        let cli = Cli::try_parse_from(["konorctl", "set", "app", "a=1", "b=x=y", "-m", "why"]).unwrap();
        let Command::Set(args) = cli.command else { panic!("not set: {:?}", cli.command) };
        assert_eq!(args.assignments.len(), 2);
        assert_eq!(args.assignments[1].key, "b");
        assert_eq!(args.write.meta(), WriteMeta { message: "why".into(), ..WriteMeta::default() });
    }

    #[test]
    fn writes_take_a_precondition_and_show_takes_group_at_version() {
        let cli = Cli::try_parse_from(["konorctl", "delete", "app", "a", "--if-version", "v3", "--if-content", "ab"])
            .unwrap();
        let Command::Delete(args) = cli.command else { panic!("not delete: {:?}", cli.command) };
        assert_eq!(args.write.meta().if_version.as_deref(), Some("v3"));
        assert_eq!(args.write.meta().if_content.as_deref(), Some("ab"));
        let cli = Cli::try_parse_from(["konorctl", "show", "app@v12"]).unwrap();
        let Command::Show(args) = cli.command else { panic!("not show: {:?}", cli.command) };
        assert_eq!(args.target, ("app".to_owned(), "v12".to_owned()));
        let error = Cli::try_parse_from(["konorctl", "show", "app"]).unwrap_err();
        assert!(error.to_string().contains("GROUP@VERSION"), "{error}");
    }

    #[test]
    fn a_malformed_assignment_is_a_usage_error() {
        let error = Cli::try_parse_from(["konorctl", "set", "app", "novalue"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("expected KEY=VALUE"), "{error}");
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = Cli::try_parse_from(["konorctl", "nodes", "--output", "json", "--socket", "/s.sock"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.socket, Some(PathBuf::from("/s.sock")));
    }

    #[test]
    fn help_lists_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:") && help.contains("3  the outcome is unknown"), "{help}");
    }
}
