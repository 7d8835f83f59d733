//! `konorctl`, the operator CLI: each subcommand becomes one request to the local konord over
//! its Unix socket (through konor-sdk), or a local PKI operation; the answer is printed as a
//! table or as JSON.
//!
//! The parts: [`cli`] (the command line), [`input`] (`KEY=VALUE` and config files, checked
//! before sending), [`mod@render`] (answers to text, pure and snapshot-tested), [`table`] (aligned
//! columns), [`exit`] (exit codes and error text). [`run`] ties them together; the binary only
//! parses, starts a runtime and exits with the code [`run`] chose.

pub mod audit_text;
pub mod cli;
pub mod demo;
pub mod exit;
pub mod group_key;
pub mod health_text;
pub mod input;
pub mod release_text;
pub mod remote;
pub mod render;
pub mod table;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use konor_crdt::limits::JOIN_TIMEOUT_MS;
use konor_sdk::protocol::{Request, Response, SOCKET_ENV};
use konor_sdk::{Client, SdkError, TIMEOUT_DEFAULT};
use serde::Serialize;

use crate::ctl::cli::{
    AuditCommand, CaCommand, CertCommand, Cli, Command, GroupCommand, HealthArgs, OutputFormat, SchemaCommand,
    TokenCommand,
};
use crate::ctl::exit::{Exit, NoSocket, UsageError};
use crate::ctl::input::read_config;
use crate::ctl::render::{Rendered, render, render_event, render_local};
use crate::pki;

/// How long `group join` waits by default: konord gives up on a join after
/// [`JOIN_TIMEOUT_MS`], and its refusal should arrive before konorctl stops waiting.
const JOIN_WAIT: Duration = Duration::from_millis(JOIN_TIMEOUT_MS + 5_000);

/// Where and how to reach konord, from the global flags; connects only when a command needs it.
#[derive(Debug, Clone)]
pub struct DaemonTarget {
    socket: Option<PathBuf>,
    timeout: Option<Duration>,
    /// `--endpoint` (or `KONOR_ENDPOINT`) with `--tls-dir` (or `KONOR_TLS_DIR`): a node's HTTP
    /// API instead of the local socket.
    endpoint: Option<(String, Option<PathBuf>)>,
}

impl DaemonTarget {
    /// From `--socket`, else the value of `KONOR_SOCKET`, and `--timeout-ms`.
    pub fn new(socket: Option<PathBuf>, socket_env: Option<OsString>, timeout: Option<Duration>) -> DaemonTarget {
        // An empty KONOR_SOCKET is as good as none.
        let from_env = socket_env.filter(|path| !path.is_empty()).map(PathBuf::from);
        DaemonTarget { socket: socket.or(from_env), timeout, endpoint: None }
    }

    /// Sends every request to `endpoint`'s HTTP API with the certificate in `tls_dir`.
    pub fn with_endpoint(mut self, endpoint: String, tls_dir: Option<PathBuf>) -> DaemonTarget {
        self.endpoint = Some((endpoint, tls_dir));
        self
    }

    /// The HTTP API to use, if any.
    fn endpoint(&self) -> anyhow::Result<Option<remote::Endpoint>> {
        let Some((url, tls_dir)) = &self.endpoint else { return Ok(None) };
        let tls_dir = tls_dir.as_deref().ok_or_else(|| {
            UsageError(format!(
                "--endpoint needs this caller's certificate: pass --tls-dir DIR or set {} (konorctl cert issue makes one)",
                remote::TLS_DIR_ENV
            ))
        })?;
        Ok(Some(remote::Endpoint::new(url, tls_dir)?))
    }

    /// Connects and says hello; `default_timeout` applies to each exchange unless `--timeout-ms`
    /// was given.
    pub async fn connect(&self, default_timeout: Duration) -> anyhow::Result<Client> {
        let socket = self.socket.as_deref().ok_or(NoSocket)?;
        let client = Client::connect(socket).await?;
        Ok(client.with_timeout(self.timeout.unwrap_or(default_timeout)))
    }
}

/// Runs one parsed command line and returns how the process should exit. Output is written
/// here; an `Err` is a failure for the caller to print with [`exit::render_error`].
pub async fn run(cli: Cli) -> anyhow::Result<Exit> {
    run_with_socket_env(cli, std::env::var_os(SOCKET_ENV)).await
}

/// [`run`] with the value of `KONOR_SOCKET` passed in.
pub async fn run_with_socket_env(cli: Cli, socket_env: Option<OsString>) -> anyhow::Result<Exit> {
    let output = cli.output;
    let mut target = DaemonTarget::new(cli.socket, socket_env, cli.timeout_ms.map(Duration::from_millis));
    let endpoint = cli.endpoint.or_else(|| std::env::var(remote::ENDPOINT_ENV).ok()).filter(|url| !url.is_empty());
    if let Some(endpoint) = endpoint {
        let tls_dir = cli
            .tls_dir
            .or_else(|| std::env::var_os(remote::TLS_DIR_ENV).filter(|dir| !dir.is_empty()).map(PathBuf::from));
        target = target.with_endpoint(endpoint, tls_dir);
    }
    match cli.command {
        Command::Demo => {
            demo::run().await?;
            Ok(Exit::Ok)
        }
        Command::Ca(CaCommand::Init { dir }) => {
            pki::ca::init_ca(&dir).with_context(|| format!("cannot create the cluster CA in {}", dir.display()))?;
            emit(&ca_created(&dir, output))
        }
        Command::Cert(CertCommand::Issue { ca_dir, node_id, out, signer }) => {
            pki::ca::issue_node_cert(&ca_dir, &node_id, &out)
                .with_context(|| format!("cannot issue a certificate for node {node_id}"))?;
            if signer {
                pki::ca::delegate_signing(&ca_dir, &out)
                    .with_context(|| format!("issued the certificate, but cannot make node {node_id} a signer"))?;
            }
            emit(&cert_issued(&node_id, &out, signer, output))
        }
        Command::Audit(AuditCommand::List { data_dir, since, group, node }) => {
            let since_ms = since.map(|since| crate::wall_clock::unix_millis().saturating_sub(since));
            let request = Request::Audit { since_ms, group, node };
            match data_dir {
                None => call(&target, TIMEOUT_DEFAULT, request, output).await,
                // The same query and the same answer, read from the files here.
                Some(data_dir) => {
                    emit(&render(&request, &audit_text::list_local(&data_dir, &request), output, now_ms()))
                }
            }
        }
        Command::Audit(command) => audit_text::run(command, output),
        Command::Token(TokenCommand::Create { ca_dir, ttl, uses, node_id, labels, out }) => {
            token_create(&ca_dir, ttl, uses, node_id, &labels, out.as_deref(), output)
        }
        Command::Cert(CertCommand::Revoke { id, ca_dir, serial, reason, out }) => {
            let revocation = pki::revocation::Revocation {
                node: id.clone(),
                serial: serial.as_deref().map(normal_serial),
                revoked_at_ms: crate::wall_clock::unix_time().as_secs() * 1000,
                reason,
            };
            revocation.validate()?;
            let signed = pki::revocation::sign(&ca_dir, revocation)
                .with_context(|| format!("cannot sign the revocation of {id}"))?;
            match out {
                Some(path) => {
                    std::fs::write(&path, format!("{}\n", signed.encode()))
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!(
                        "wrote the revocation of {id} to {}; send it with `konorctl cert submit`",
                        path.display()
                    );
                    Ok(Exit::Ok)
                }
                None => call(&target, TIMEOUT_DEFAULT, Request::Revoke { revocation: signed.encode() }, output).await,
            }
        }
        Command::Cert(CertCommand::Submit { file }) => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let revocation = text.trim().to_owned();
            call(&target, TIMEOUT_DEFAULT, Request::Revoke { revocation }, output).await
        }
        Command::Cert(CertCommand::Revocations) => call(&target, TIMEOUT_DEFAULT, Request::Revocations, output).await,
        Command::Group(GroupCommand::Create { name, mode, key_file, key_out, key, evict_after, fencing, release }) => {
            refuse_key_on_command_line(key.is_some())?;
            let key = key_file.as_deref().map(group_key::read).transpose()?;
            let request = Request::GroupCreate {
                name,
                mode: mode.as_str().to_owned(),
                key,
                evict_after_ms: evict_after,
                fencing: fencing.map(|f| f.as_str().to_owned()),
                release: release.map(|r| r.as_str().to_owned()),
            };
            match key_out {
                Some(path) => create_with_key_out(&target, request, &path, output).await,
                None => call(&target, TIMEOUT_DEFAULT, request, output).await,
            }
        }
        Command::Group(GroupCommand::Join { name, key_file, key }) => {
            refuse_key_on_command_line(key.is_some())?;
            let key = match key_file {
                Some(path) => group_key::read(&path)?,
                None => group_key::from_env()?,
            };
            call(&target, JOIN_WAIT, Request::GroupJoin { name, key }, output).await
        }
        Command::Group(GroupCommand::RotateKey { name, key_file, key_out }) => {
            let key = key_file.as_deref().map(group_key::read).transpose()?;
            let request = Request::GroupRotateKey { name, key };
            match key_out {
                Some(path) => create_with_key_out(&target, request, &path, output).await,
                None => call(&target, TIMEOUT_DEFAULT, request, output).await,
            }
        }
        Command::Group(GroupCommand::Leave { name, force }) => {
            call(&target, TIMEOUT_DEFAULT, Request::GroupLeave { name, force }, output).await
        }
        Command::Group(GroupCommand::Remove { name, nodes, force }) => {
            call(&target, TIMEOUT_DEFAULT, Request::GroupRemove { group: name, nodes, force }, output).await
        }
        Command::Group(GroupCommand::List) => call(&target, TIMEOUT_DEFAULT, Request::GroupList, output).await,
        Command::Set(args) => {
            let mut entries = BTreeMap::new();
            for assignment in args.assignments {
                if entries.insert(assignment.key.clone(), assignment.value).is_some() {
                    let key = assignment.key;
                    return Err(UsageError(format!("key `{key}` is given twice; give each key once")).into());
                }
            }
            let mut meta = args.write.meta();
            if let Some(key) = args.secret {
                if key.contains('=') {
                    return Err(UsageError(
                        "--secret takes a KEY; its value is read from stdin, never from the command line, where \
                         `ps` and shell history show it (konorctl set GROUP --secret KEY < file)"
                            .to_owned(),
                    )
                    .into());
                }
                if entries.contains_key(&key) {
                    return Err(UsageError(format!("key `{key}` is given twice; give each key once")).into());
                }
                let value = crate::ctl::input::read_secret_value(args.json_value)
                    .with_context(|| format!("cannot read the value of {key} from stdin"))?;
                entries.insert(key.clone(), value);
                meta.secret.push(key);
            }
            let entries = match &args.overlay {
                Some(selector) => {
                    let key_of = overlay_keys(selector)?;
                    entries.into_iter().map(|(key, value)| (key_of(&key), value)).collect()
                }
                None => entries,
            };
            let request = Request::Set { group: args.group, entries, meta };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::Get(args) => {
            let request = match args.key {
                Some(key) => Request::Get { group: args.group, key },
                None => Request::Snapshot { group: args.group, prefix: args.prefix },
            };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::Delete(args) => {
            let keys = match &args.overlay {
                Some(selector) => {
                    let key_of = overlay_keys(selector)?;
                    args.keys.iter().map(|key| key_of(key)).collect()
                }
                None => args.keys,
            };
            let request = Request::Delete { group: args.group, keys, meta: args.write.meta() };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::Apply(args) => {
            let config = read_config(&args.file, args.format.map(Into::into))
                .with_context(|| format!("cannot apply {} to group {}", args.file, args.group))?;
            let mut meta = args.write.meta();
            meta.secret = args.secret;
            let request =
                Request::Apply { group: args.group, format: config.format.to_string(), text: config.text, meta };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::Rollback(args) => {
            let request = Request::Rollback { group: args.group, version: args.version, meta: args.write.meta() };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::Release(args) => release(&target, args, output).await,
        Command::Promote(args) => {
            let mut meta = args.write.meta();
            if meta.message.is_empty() {
                meta.message = match args.wave {
                    Some(wave) => format!("promote to wave {wave}"),
                    None => "promote to the next wave".to_owned(),
                };
            }
            let request = Request::Promote { group: args.group, wave: args.wave, meta };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::Abort(args) => {
            let mut meta = args.write.meta();
            if meta.message.is_empty() {
                meta.message = format!("abort: {}", args.reason.as_deref().unwrap_or("by an operator"));
            }
            let request = Request::Abort { group: args.group, reason: args.reason, meta };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::History(args) => call(&target, TIMEOUT_DEFAULT, Request::History { group: args.group }, output).await,
        Command::Show(args) => {
            let (group, version) = args.target;
            call(&target, TIMEOUT_DEFAULT, Request::Show { group, version }, output).await
        }
        Command::Schema(command) => schema(&target, command, output).await,
        Command::Diff(args) => {
            let request = Request::Diff { group: args.group, from: args.from, to: args.to };
            call(&target, TIMEOUT_DEFAULT, request, output).await
        }
        Command::Conflicts(args) => {
            call(&target, TIMEOUT_DEFAULT, Request::Conflicts { group: args.group }, output).await
        }
        Command::Watch(args) => watch(&target, &args.group, args.prefix, args.from, output).await,
        Command::Nodes => call(&target, TIMEOUT_DEFAULT, Request::Nodes, output).await,
        Command::Status(args) => call(&target, TIMEOUT_DEFAULT, Request::Status { group: args.group }, output).await,
        Command::Health(args) => health(&target, args, output).await,
        Command::Alerts => call(&target, TIMEOUT_DEFAULT, Request::Alerts, output).await,
        Command::NodeHistory { node } => call(&target, TIMEOUT_DEFAULT, Request::NodeHistory { node }, output).await,
    }
}

/// `--overlay SELECTOR`: how each key is stored in that overlay (`db.pool@env=dev`, SPEC F29).
fn overlay_keys(selector: &str) -> anyhow::Result<impl Fn(&str) -> String> {
    let selector = konor_crdt::configuration::parse_selector(selector)
        .map_err(|error| UsageError(format!("--overlay {selector:?}: {error}")))?;
    if selector.is_empty() {
        return Err(UsageError("--overlay names at least one label (env=dev)".to_owned()).into());
    }
    Ok(move |key: &str| konor_crdt::overlay::overlay_key(key, &selector))
}

/// `konorctl release ...`: make a release (and follow it with `--wait`), or read releases.
async fn release(target: &DaemonTarget, args: cli::ReleaseArgs, output: OutputFormat) -> anyhow::Result<Exit> {
    match args.command {
        Some(cli::ReleaseCommand::Status { group, wait }) => {
            if wait.wait {
                return wait_for_release(target, &group, None, wait.wait_timeout, output).await;
            }
            call(target, TIMEOUT_DEFAULT, Request::ReleaseReport { group, limit: None, release: None }, output).await
        }
        Some(cli::ReleaseCommand::Report { group, format, limit }) => {
            let request = Request::ReleaseReport { group, limit: Some(limit), release: None };
            let response = ask(target, TIMEOUT_DEFAULT, &request).await?;
            match (&response, format, output) {
                (Response::ReleaseReport { releases, .. }, cli::ReportFormat::Jsonl, _) => {
                    emit(&Rendered::ok(release_text::jsonl(&release_text::export_rows(releases))))
                }
                (Response::ReleaseReport { releases, .. }, cli::ReportFormat::Csv, _) => {
                    emit(&Rendered::ok(release_text::csv(&release_text::export_rows(releases))))
                }
                _ => emit(&render(&request, &response, output, now_ms())),
            }
        }
        None => {
            let (Some(group), Some(to)) = (args.group, args.to) else {
                return Err(UsageError("release needs a GROUP and --to VERSION".to_owned()).into());
            };
            let mut meta = args.write.meta();
            if meta.message.is_empty() {
                meta.message = format!("release {to}");
            }
            let canary_only =
                args.percent.is_some() || args.waves.is_some() || args.selector.is_some() || args.bake.is_some();
            if args.strategy == cli::ReleaseStrategyArg::All && canary_only {
                anyhow::bail!("--percent, --waves, --selector and --bake need --strategy canary");
            }
            let (strategy, waves) = match args.strategy {
                cli::ReleaseStrategyArg::All => ("all", None),
                cli::ReleaseStrategyArg::Canary => {
                    let waves = match (args.percent, args.waves) {
                        (Some(percent), _) if percent >= 100 => vec![100],
                        (Some(percent), _) => vec![percent, 100],
                        (None, Some(waves)) => waves,
                        (None, None) => anyhow::bail!("a canary release needs --percent P or --waves P1,P2,..."),
                    };
                    ("canary", Some(waves))
                }
            };
            let request = Request::Release {
                group: group.clone(),
                version: to,
                strategy: Some(strategy.to_owned()),
                waves,
                selector: args.selector,
                bake_ms: args.bake,
                max_failed: args.max_failed,
                max_error_rate: args.max_error_rate,
                node_health: args.node_health.then_some(true),
                meta,
            };
            if !args.wait.wait {
                return call(target, TIMEOUT_DEFAULT, request, output).await;
            }
            let response = ask(target, TIMEOUT_DEFAULT, &request).await?;
            let Response::Committed { version, .. } = &response else {
                return emit(&render(&request, &response, output, now_ms()));
            };
            // What was committed goes to stderr: stdout is the release's final state.
            let _ = writeln!(std::io::stderr().lock(), "released as {version}; following it");
            wait_for_release(target, &group, Some(version), args.wait.wait_timeout, output).await
        }
    }
}

/// Follows a release (`label`, else the newest) of `group` until it completes (exit 0), is
/// aborted or replaced by a newer one (exit 7), or `timeout_ms` runs out (exit 8): each change
/// of its progress goes to stderr as one line, and its final state to stdout. After the first
/// answer it asks for that release by id, so a newer release does not take its place. It asks
/// again every half second: a release moves with reports and gossip from the whole mesh, which
/// no one watch of this node's settings would show.
async fn wait_for_release(
    target: &DaemonTarget,
    group: &str,
    label: Option<&str>,
    timeout_ms: u64,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    const POLL: Duration = Duration::from_millis(500);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let mut followed: Option<String> = label.map(str::to_owned);
    let mut last_line = String::new();
    loop {
        let request = Request::ReleaseReport { group: group.to_owned(), limit: None, release: followed.clone() };
        let response = ask(target, TIMEOUT_DEFAULT, &request).await?;
        let Response::ReleaseReport { releases, .. } = &response else {
            // An error: not gated, no such release.
            return emit(&render(&request, &response, output, now_ms()));
        };
        let Some(report) = releases.first() else {
            let mut rendered = render(&request, &response, output, now_ms());
            rendered.exit = Exit::Refused;
            return emit(&rendered);
        };
        followed = Some(report.release.id.clone());
        let line = release_text::progress_line(report);
        if line != last_line {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
            last_line = line;
        }
        let exit = match report.outcome.as_str() {
            "complete" => Some(Exit::Ok),
            "aborted" | "superseded" => Some(Exit::ReleaseAborted),
            _ if tokio::time::Instant::now() >= deadline => Some(Exit::WaitTimedOut),
            _ => None,
        };
        if let Some(exit) = exit {
            let mut rendered = render(&request, &response, output, now_ms());
            rendered.exit = exit;
            return emit(&rendered);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `konorctl schema ...`: the schema's file is read here (bounded), and checked by konord.
async fn schema(target: &DaemonTarget, command: SchemaCommand, output: OutputFormat) -> anyhow::Result<Exit> {
    let request = match command {
        SchemaCommand::Set { group, file, write } => {
            let schema = read_schema_file(&file)?;
            Request::SchemaSet { group, schema: Some(schema), meta: write.meta() }
        }
        SchemaCommand::Get { group } => Request::SchemaGet { group },
        SchemaCommand::Remove { group, write } => Request::SchemaSet { group, schema: None, meta: write.meta() },
        SchemaCommand::Check { group, file, format, schema } => {
            let config = read_config(&file, format.map(Into::into))
                .with_context(|| format!("cannot check {file} against the schema of group {group}"))?;
            let schema = schema.as_deref().map(read_schema_file).transpose()?;
            Request::SchemaCheck { group, format: config.format.to_string(), text: config.text, schema }
        }
    };
    call(target, TIMEOUT_DEFAULT, request, output).await
}

/// A JSON Schema file, read within the schema's size limit and parsed strictly.
fn read_schema_file(path: &str) -> anyhow::Result<serde_json::Value> {
    let config = read_config(path, Some(konor_crdt::FileFormat::Json))
        .with_context(|| format!("cannot read the schema file {path}"))?;
    konor_crdt::json_strict::parse(&config.text).with_context(|| format!("the schema file {path} is not JSON"))
}

/// `konorctl health`: the node's health, judged against the thresholds given; exit 6 when it
/// fails one (as `GET /api/v1/health` answers 503).
async fn health(target: &DaemonTarget, args: HealthArgs, output: OutputFormat) -> anyhow::Result<Exit> {
    let request = Request::Health;
    let response = ask(target, TIMEOUT_DEFAULT, &request).await?;
    let Response::Health { health } = &response else {
        return emit(&render(&request, &response, output, now_ms()));
    };
    let thresholds = crate::health::Thresholds {
        max_dead: args.max_dead,
        max_stale: args.max_stale,
        max_since_change_ms: args.max_since_change_ms,
        allow_degraded: args.allow_degraded,
        allow_at_cap: args.allow_at_cap,
    };
    let failures = crate::health::failures(health, &thresholds);
    let exit = if failures.is_empty() { Exit::Ok } else { Exit::Unhealthy };
    let mut rendered = match output {
        OutputFormat::Table => Rendered::ok(health_text::health_text(health, &failures, now_ms())),
        OutputFormat::Json => {
            let document =
                serde_json::json!({ "healthy": failures.is_empty(), "failures": failures, "health": health });
            render_local(String::new(), &document, OutputFormat::Json)
        }
    };
    rendered.exit = exit;
    emit(&rendered)
}

/// A group key given as `--key SECRET` is refused: it would show in `ps` and shell history.
fn refuse_key_on_command_line(given: bool) -> anyhow::Result<()> {
    if given {
        return Err(UsageError(
            "a group key is never taken on the command line (it would show in ps and in shell history): \
             use --key-file FILE, --key-file - (standard input) or the KONOR_GROUP_KEY environment variable"
                .to_owned(),
        )
        .into());
    }
    Ok(())
}

/// `group create|rotate-key --key-out FILE`: the key goes to a new private file, not to the
/// terminal.
async fn create_with_key_out(
    target: &DaemonTarget,
    request: Request,
    path: &std::path::Path,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    // Refused before the group exists: a key that cannot be written would be lost.
    if path.exists() {
        return Err(UsageError(format!("{} exists; --key-out never overwrites a file", path.display())).into());
    }
    let response = ask(target, TIMEOUT_DEFAULT, &request).await?;
    let (name, key, done) = match &response {
        Response::GroupCreated { name, key } => (name, key, "created"),
        Response::KeyRotated { group, key, .. } => (group, key, "rotated the key of"),
        _ => return emit(&render(&request, &response, output, now_ms())),
    };
    group_key::write_new(path, key)
        .with_context(|| format!("{done} group {name}, but its key could not be written to {}", path.display()))?;
    let stdout = match (output, &response) {
        (OutputFormat::Json, Response::KeyRotated { generation, .. }) => {
            format!("{}\n", serde_json::json!({ "rotated": name, "generation": generation, "key_file": path }))
        }
        (OutputFormat::Json, _) => format!("{}\n", serde_json::json!({ "created": name, "key_file": path })),
        _ => format!(
            "{done} group {name}\nkey written to {path} (mode 600)\n\
             share it: copy the file to the nodes that should hold the group and run \
             konorctl group join {name} --key-file FILE there\n",
            path = path.display()
        ),
    };
    emit(&Rendered { stdout, stderr: String::new(), exit: Exit::Ok })
}

/// Sends one request and prints the answer. A refusal from konord is an answer too: it is
/// rendered (with its exit code), not returned as an error.
async fn call(
    target: &DaemonTarget,
    default_timeout: Duration,
    request: Request,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    let response = ask(target, default_timeout, &request).await?;
    emit(&render(&request, &response, output, now_ms()))
}

/// Sends one request and returns the answer; a refusal from konord is an answer too.
async fn ask(target: &DaemonTarget, timeout: Duration, request: &Request) -> anyhow::Result<Response> {
    if let Some(endpoint) = target.endpoint()? {
        let timeout = target.timeout.unwrap_or(timeout);
        return match tokio::time::timeout(timeout, endpoint.ask(request)).await {
            Ok(answer) => answer,
            Err(_) => Err(SdkError::Timeout { waited: timeout }.into()),
        };
    }
    let client = target.connect(timeout).await?;
    match client.call(request.clone()).await {
        Ok(response) => Ok(response),
        Err(SdkError::Daemon { code, message }) => Ok(Response::Error { code, message }),
        Err(error) => Err(error.into()),
    }
}

/// Prints every change of `group` until Ctrl-C (exit 0) or until the watch fails.
async fn watch(
    target: &DaemonTarget,
    group: &str,
    prefix: Option<String>,
    from: Option<u64>,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    if let Some(endpoint) = target.endpoint()? {
        return watch_remote(&endpoint, group, prefix.as_deref(), from, output).await;
    }
    let client = target.connect(TIMEOUT_DEFAULT).await?;
    let mut watch = match prefix.as_deref() {
        Some(prefix) => client.watch_prefix(group, prefix, from).await?,
        None => client.watch(group, from).await?,
    };
    if output == OutputFormat::Table {
        eprintln!("watching {group} after revision {}; Ctrl-C stops", watch.last_revision());
    }
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            signal = &mut interrupted => {
                signal.context("cannot listen for Ctrl-C")?;
                return Ok(Exit::Ok);
            }
            next = watch.next() => match next {
                Some(Ok(event)) => {
                    let line = render_event(&event, output);
                    if !write_stdout(&format!("{line}\n"))? {
                        return Ok(Exit::Ok);
                    }
                }
                Some(Err(error)) => return Err(anyhow::Error::from(error).context(format!("watching {group} stopped"))),
                None => return Ok(Exit::Ok),
            },
        }
    }
}

/// [`watch`] through a node's HTTP API (Server-Sent Events).
async fn watch_remote(
    endpoint: &remote::Endpoint,
    group: &str,
    prefix: Option<&str>,
    from: Option<u64>,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    let each = |event| write_stdout(&format!("{}\n", render_event(&event, output)));
    let on_watching = |revision| {
        if output == OutputFormat::Table {
            eprintln!("watching {group} after revision {revision}; Ctrl-C stops");
        }
    };
    tokio::select! {
        signal = tokio::signal::ctrl_c() => {
            signal.context("cannot listen for Ctrl-C")?;
            Ok(Exit::Ok)
        }
        watched = endpoint.watch(group, prefix, from, each, on_watching) => {
            watched.with_context(|| format!("watching {group} stopped"))?;
            Ok(Exit::Ok)
        }
    }
}

/// What `--output json` prints for the commands that run without konord, shaped like konord's
/// answers (a `type` tag first).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum LocalOutcome {
    CaCreated { dir: String, files: Vec<String> },
    CertIssued { node_id: String, out_dir: String, files: Vec<String>, serial: String, signer: bool },
    TokenCreated { id: String, expires_ms: u64, uses: u32, node: Option<String>, token: Option<String> },
}

/// `konorctl token create`: mints a join token with the CA key in `ca_dir`.
fn token_create(
    ca_dir: &Path,
    ttl_ms: u64,
    uses: u32,
    node: Option<String>,
    labels: &[String],
    out: Option<&Path>,
    output: OutputFormat,
) -> anyhow::Result<Exit> {
    let signer = pki::ca::Signer::load(ca_dir)?.ok_or_else(|| {
        anyhow::anyhow!("no CA key in {}: give the CA directory or a signer's TLS directory", ca_dir.display())
    })?;
    let mut label_map = std::collections::BTreeMap::new();
    for text in labels {
        let (key, value) = crate::settings::parse_label(text)?;
        label_map.insert(key, value);
    }
    let policy = pki::join_token::TokenPolicy { ttl: Duration::from_millis(ttl_ms), uses, node, labels: label_map };
    let now_ms = crate::wall_clock::unix_time().as_secs() * 1000;
    let (token, text) = pki::join_token::mint(signer.ca_cert(), &signer.token_key(), &policy, now_ms)?;
    let shown = match out {
        Some(path) => {
            write_private_new(path, format!("{}\n", text.expose()).as_bytes())
                .with_context(|| format!("cannot write the token to {}", path.display()))?;
            None
        }
        None => Some(text.expose().clone()),
    };
    let expires = crate::ctl::table::format_utc(token.expires_ms);
    let mut human = match &shown {
        Some(text) => format!("{text}\n"),
        None => String::new(),
    };
    let file_hint = out.map_or_else(|| "FILE".to_owned(), |path| path.display().to_string());
    // Said on stderr, so stdout is the token alone and can be piped.
    let note = format!(
        "join token {} ({} use(s){}), expires {expires}\nnext, on the new host: konord --join SIGNER_HTTP_ADDR --token-file {file_hint} --data-dir DIR{}\n",
        token.id,
        token.uses,
        token.node.as_deref().map(|node| format!(", for node {node}")).unwrap_or_default(),
        if token.node.is_some() { "" } else { " --node-id ID" },
    );
    if out.is_some() {
        human.push_str(&note);
    }
    let outcome = LocalOutcome::TokenCreated {
        id: token.id,
        expires_ms: token.expires_ms,
        uses: token.uses,
        node: token.node,
        token: shown.clone(),
    };
    let mut rendered = render_local(human, &outcome, output);
    if out.is_none() && matches!(output, OutputFormat::Table) {
        rendered.stderr.push_str(&note);
    }
    emit(&rendered)
}

/// Creates `path` (it must not exist) with mode 0600 and writes `bytes`.
fn write_private_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn ca_created(dir: &Path, output: OutputFormat) -> Rendered {
    let files = [pki::CA_CERT_FILE, pki::CA_KEY_FILE].map(|file| dir.join(file).display().to_string());
    let text = format!(
        "created the cluster CA in {dir}: {cert}, {key}\nkeep {key} secret, ideally offline\n\
         next: konorctl cert issue --ca-dir {dir} --node-id NODE --out DIR, for each node\n",
        dir = dir.display(),
        cert = pki::CA_CERT_FILE,
        key = pki::CA_KEY_FILE,
    );
    render_local(text, &LocalOutcome::CaCreated { dir: dir.display().to_string(), files: files.into() }, output)
}

fn cert_issued(node_id: &str, out: &Path, signer: bool, output: OutputFormat) -> Rendered {
    let names = [pki::NODE_CERT_FILE, pki::NODE_KEY_FILE, pki::NODE_ID_FILE, pki::CA_CERT_FILE];
    let files = names.map(|file| out.join(file).display().to_string());
    // The serial, for `konorctl cert revoke --serial` later.
    let serial = std::fs::read(out.join(pki::NODE_CERT_FILE))
        .ok()
        .and_then(|pem| rustls_pki_types::pem::PemObject::from_pem_slice(&pem).ok())
        .and_then(|der: rustls_pki_types::CertificateDer<'static>| pki::cert_facts::cert_facts(&der))
        .map(|facts| facts.serial)
        .unwrap_or_default();
    let signer_line = if signer {
        format!("{} copied too: node {node_id} is a signer (serve its HTTP API to enroll hosts)\n", pki::CA_KEY_FILE)
    } else {
        String::new()
    };
    let text = format!(
        "issued a certificate for node {node_id} into {out}: {} (serial {serial})\n{signer_line}next: start konord with \
         --node-id {node_id} --tls-dir {out}\n",
        names.join(", "),
        out = out.display(),
    );
    let outcome = LocalOutcome::CertIssued {
        node_id: node_id.to_owned(),
        out_dir: out.display().to_string(),
        files: files.into(),
        serial,
        signer,
    };
    render_local(text, &outcome, output)
}

/// Writes a rendered result and returns its exit code. A closed stdout (`konorctl ... | head`)
/// is not an error worth a message.
fn emit(rendered: &Rendered) -> anyhow::Result<Exit> {
    write_stdout(&rendered.stdout)?;
    if !rendered.stderr.is_empty() {
        // Nowhere left to report a failure to write to stderr.
        let _ = std::io::stderr().lock().write_all(rendered.stderr.as_bytes());
    }
    Ok(rendered.exit)
}

/// Writes to stdout; `Ok(false)` when the reader has gone away.
fn write_stdout(text: &str) -> anyhow::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(anyhow::Error::from(error).context("cannot write to stdout")),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A serial as revocations compare it: lowercase hex without `0x`, colons or leading zero
/// octets (as `konorctl cert issue` prints it; `openssl x509 -serial` prints it in capitals).
fn normal_serial(serial: &str) -> String {
    let hex: String = serial.trim().trim_start_matches("0x").chars().filter(|c| *c != ':').collect();
    let mut hex = hex.to_ascii_lowercase();
    while hex.len() > 2 && hex.starts_with("00") {
        hex.drain(..2);
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use expect_test::expect;

    fn run_line(line: &[&str]) -> (Exit, String) {
        run_cli(Cli::try_parse_from(line).unwrap())
    }

    /// Runs as if KONOR_SOCKET were unset, whatever the test's environment holds.
    fn run_cli(cli: Cli) -> (Exit, String) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        match runtime.block_on(run_with_socket_env(cli, None)) {
            Ok(exit) => (exit, String::new()),
            Err(error) => (exit::exit_for_error(&error), exit::render_error(&error)),
        }
    }

    #[test]
    fn ca_and_cert_are_created_locally() {
        let directory = tempfile::tempdir().unwrap();
        let ca = directory.path().join("ca");
        let node = directory.path().join("n1");
        let (exit, _) = run_line(&["konorctl", "ca", "init", "--dir", ca.to_str().unwrap()]);
        assert_eq!(exit, Exit::Ok);
        let (exit, _) = run_line(&[
            "konorctl",
            "cert",
            "issue",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--node-id",
            "n1",
            "--out",
            node.to_str().unwrap(),
        ]);
        assert_eq!(exit, Exit::Ok);
        assert!(node.join(pki::NODE_CERT_FILE).exists());
        let (exit, text) = run_line(&["konorctl", "ca", "init", "--dir", ca.to_str().unwrap()]);
        assert_eq!(exit, Exit::File);
        assert!(text.starts_with("error: cannot create the cluster CA in ") && text.contains("file exists"), "{text}");
    }

    #[test]
    fn an_invalid_node_id_is_a_pki_error() {
        let directory = tempfile::tempdir().unwrap();
        let dir = directory.path().to_str().unwrap();
        let (exit, text) = run_line(&["konorctl", "cert", "issue", "--ca-dir", dir, "--node-id", "N1", "--out", dir]);
        assert_eq!(exit, Exit::File);
        expect![[r#"
            error: cannot issue a certificate for node N1: invalid node id 'N1': character 'N' is not allowed; use 1 to 32 characters of a-z, 0-9 and '-', not starting or ending with '-'
        "#]]
        .assert_eq(&text);
    }

    #[test]
    fn daemon_commands_without_a_socket_say_how_to_name_one() {
        let (exit, text) = run_line(&["konorctl", "nodes"]);
        assert_eq!(exit, Exit::Unreachable);
        assert!(text.contains("pass --socket PATH or set KONOR_SOCKET"), "{text}");
    }

    #[test]
    fn the_socket_flag_wins_over_the_environment_and_an_empty_variable_is_unset() {
        let flag = Some(PathBuf::from("/flag.sock"));
        let env = || Some(OsString::from("/env.sock"));
        assert_eq!(DaemonTarget::new(flag.clone(), env(), None).socket, flag);
        assert_eq!(DaemonTarget::new(None, env(), None).socket, Some(PathBuf::from("/env.sock")));
        assert_eq!(DaemonTarget::new(None, Some(OsString::new()), None).socket, None);
    }

    #[test]
    fn a_socket_nobody_listens_on_exits_3() {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("konord.sock");
        let (exit, text) = run_line(&["konorctl", "status", "app", "--socket", socket.to_str().unwrap()]);
        assert_eq!(exit, Exit::Unreachable);
        assert!(text.contains("is konord running?"), "{text}");
    }

    #[test]
    fn a_key_given_twice_is_a_usage_error() {
        let (exit, text) = run_line(&["konorctl", "set", "app", "a=1", "a=2", "--socket", "/nonexistent.sock"]);
        assert_eq!(exit, Exit::Usage);
        expect![[r#"
            error: key `a` is given twice; give each key once
        "#]]
        .assert_eq(&text);
    }

    #[test]
    fn a_group_key_on_the_command_line_is_refused() {
        for line in [
            &["konorctl", "group", "join", "app", "--key", "s3cret", "--socket", "/x.sock"][..],
            &["konorctl", "group", "create", "app", "--mode", "eventual", "--key", "s3cret", "--socket", "/x.sock"],
        ] {
            let (exit, text) = run_line(line);
            assert_eq!(exit, Exit::Usage, "{text}");
            assert!(text.contains("never taken on the command line") && text.contains("--key-file"), "{text}");
            assert!(!text.contains("s3cret"), "the refusal must not echo the key: {text}");
        }
    }

    #[test]
    fn a_join_without_a_key_says_where_to_put_it() {
        // No test sets KONOR_GROUP_KEY.
        let (exit, text) = run_line(&["konorctl", "group", "join", "app", "--socket", "/x.sock"]);
        assert_eq!(exit, Exit::Usage, "{text}");
        assert!(text.contains("--key-file FILE") && text.contains("KONOR_GROUP_KEY"), "{text}");
    }

    #[test]
    fn apply_checks_the_file_before_connecting() {
        let (exit, text) = run_line(&["konorctl", "apply", "app", "/nonexistent/app.toml", "--socket", "/x.sock"]);
        assert_eq!(exit, Exit::File);
        assert!(text.starts_with("error: cannot apply /nonexistent/app.toml to group app: cannot read"), "{text}");
        let (exit, text) = run_line(&["konorctl", "apply", "app", "app.conf", "--socket", "/x.sock"]);
        assert_eq!(exit, Exit::Usage);
        assert!(text.contains("pass --format toml, yaml or json"), "{text}");
    }

    #[test]
    fn serials_are_compared_without_prefix_colons_case_or_padding() {
        assert_eq!(normal_serial("0x00AB:CD"), "abcd");
        assert_eq!(normal_serial("00ff"), "ff");
        assert_eq!(normal_serial("00"), "00");
        assert_eq!(normal_serial(" 1a2b "), "1a2b");
    }
}
