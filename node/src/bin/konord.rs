//! konord: the Konorkestra peer daemon. Parses flags or a TOML file, then runs the daemon until
//! SIGTERM or SIGINT (graceful leave, flush, exit 0).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use konor_node::enroll::client::{ENROLLMENT_FILE, Enrollment, enroll, read_token_file};
use konor_node::health::webhook::{WEBHOOKS_MAX, WebhookUrl};
use konor_node::settings::{
    CLUSTER_DEFAULT, DaemonSettings, GOSSIP_INTERVAL_DEFAULT, SOCKET_FILE, SettingsFile, parse_addr, parse_label,
    parse_mode,
};
use tracing_subscriber::EnvFilter;

/// konord, the Konorkestra peer daemon: run one per host. It joins the mesh of its peers over
/// QUIC with mutual TLS, holds the configuration groups this node is a member of, and serves
/// applications (the SDKs) and operators (konorctl) on a local Unix socket.
#[derive(Debug, Parser)]
#[command(name = "konord", version)]
struct Args {
    /// Settings file (TOML, same keys as the flags); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (group files, node identity).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node id (must match the certificate in --tls-dir).
    #[arg(long)]
    node_id: Option<String>,
    /// QUIC listen address (UDP) [default: 127.0.0.1:7400].
    #[arg(long)]
    listen: Option<String>,
    /// Address of an existing node to join through (repeatable).
    #[arg(long = "seed")]
    seeds: Vec<String>,
    /// Unix socket for SDKs and konorctl (default: `<data-dir>/konord.sock`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Socket file mode, octal [default: 600: only the daemon's user may connect].
    #[arg(long)]
    socket_mode: Option<String>,
    /// Label key=value (repeatable), e.g. region=eu-west.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Directory holding node.crt, node.key, ca.crt, from `konorctl cert issue` (default:
    /// `<data-dir>/tls`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Enroll through a signer's HTTP API at this address (repeatable: tried in turn) when
    /// --tls-dir holds no certificate yet, with the join token of --token-file or
    /// $KONOR_JOIN_TOKEN (`konorctl token create`). Once enrolled, a restart with the same
    /// flags reads data-dir/enrollment.json and the token is no longer needed.
    #[arg(long = "join", value_name = "HOST:PORT")]
    join: Vec<String>,
    /// File holding the join token (`-`: standard input); never the token itself on the
    /// command line, which every user of the host can read.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Cluster name; nodes of other clusters are refused [default: konorkestra].
    #[arg(long)]
    cluster: Option<String>,
    /// Gossip period in milliseconds; a crash is seen within about 8 periods [default: 250].
    #[arg(long)]
    gossip_interval_ms: Option<u64>,
    /// Serve the HTTP API (HTTPS with the node's certificate; JSON under /api/v1, /metrics) on
    /// this TCP address, e.g. 127.0.0.1:7480 [default: off].
    #[arg(long)]
    http_listen: Option<String>,
    /// Serve the HTTP API's reads (and so the dashboard) to browsers and tools without a client
    /// certificate; writes still need one. Bind --http-listen where only operators reach it.
    #[arg(long)]
    http_open_reads: bool,
}

/// Environment variable holding a join token, when `--token-file` is not given.
const JOIN_TOKEN_ENV: &str = "KONOR_JOIN_TOKEN";

/// What enrollment gives a host (`--join`), or gave it before: `None` without `--join`.
async fn enrollment(
    args: &Args,
    file: &SettingsFile,
    data_dir: &std::path::Path,
    tls_dir: &std::path::Path,
    node_id: Option<&str>,
) -> anyhow::Result<Option<Enrollment>> {
    let join = if args.join.is_empty() { &file.join } else { &args.join };
    if join.is_empty() {
        anyhow::ensure!(
            args.token_file.is_none() && file.token_file.is_none(),
            "a join token is given but no --join address to enroll through"
        );
        return Ok(None);
    }
    if let Some(done) = Enrollment::read(data_dir)? {
        return Ok(Some(done));
    }
    if tls_dir.join(konor_node::pki::NODE_CERT_FILE).exists() {
        anyhow::bail!(
            "--join is given but {} already holds a node certificate and {} has no enrollment record; remove --join to run with that certificate",
            tls_dir.display(),
            data_dir.display()
        );
    }
    let token = match args.token_file.as_ref().or(file.token_file.as_ref()) {
        Some(path) => read_token_file(path)?,
        None => match std::env::var(JOIN_TOKEN_ENV) {
            Ok(text) if !text.trim().is_empty() => konor_sdk::Secret::new(text.trim().to_owned()),
            _ => anyhow::bail!("--join needs a join token: --token-file FILE or ${JOIN_TOKEN_ENV}"),
        },
    };
    let cluster = args.cluster.as_deref().or(file.cluster.as_deref());
    Ok(Some(enroll(join, &token, node_id, cluster, tls_dir, data_dir).await?))
}

async fn settings(args: Args) -> anyhow::Result<DaemonSettings> {
    let file = match &args.config {
        Some(path) => SettingsFile::read(path)?,
        None => SettingsFile::default(),
    };
    let data_dir =
        args.data_dir.clone().or(file.data_dir.clone()).context("--data-dir is required (or data-dir in --config)")?;
    let tls_dir = args.tls_dir.clone().or(file.tls_dir.clone()).unwrap_or_else(|| data_dir.join("tls"));
    let asked_node_id = args.node_id.clone().or(file.node_id.clone());
    if let Some(node_id) = &asked_node_id {
        konor_node::pki::validate_node_id(node_id)?;
    }
    let enrolled = enrollment(&args, &file, &data_dir, &tls_dir, asked_node_id.as_deref()).await?;
    let node_id = match (&enrolled, asked_node_id) {
        (Some(enrolled), Some(asked)) if enrolled.node != asked => anyhow::bail!(
            "this host enrolled as node {:?} ({}), not {asked:?}",
            enrolled.node,
            data_dir.join(ENROLLMENT_FILE).display()
        ),
        (Some(enrolled), _) => {
            konor_node::pki::validate_node_id(&enrolled.node)?;
            enrolled.node.clone()
        }
        (None, Some(asked)) => asked,
        (None, None) => anyhow::bail!("--node-id is required (or node-id in --config)"),
    };
    let listen = args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:7400".to_owned());
    let listen: SocketAddr = parse_addr(&listen)?;
    let seeds = if args.seeds.is_empty() { file.seed } else { args.seeds };
    let mut seeds = seeds.iter().map(|s| parse_addr(s)).collect::<anyhow::Result<Vec<_>>>()?;
    if seeds.is_empty()
        && let Some(enrolled) = &enrolled
    {
        seeds = enrolled.seeds.clone();
    }
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in file.label {
        labels.insert(key, value);
    }
    for text in &args.labels {
        let (key, value) = parse_label(text)?;
        labels.insert(key, value);
    }
    // The token's labels are the operator's word: over the host's own.
    for (key, value) in enrolled.iter().flat_map(|enrolled| &enrolled.labels) {
        let (key, value) = parse_label(&format!("{key}={value}")).context("a label the join token gave")?;
        labels.insert(key, value);
    }
    let cluster = match (args.cluster.or(file.cluster), &enrolled) {
        (Some(asked), Some(enrolled)) if asked != enrolled.cluster => {
            anyhow::bail!("--cluster is {asked:?} but this host enrolled in cluster {:?}", enrolled.cluster)
        }
        (Some(asked), _) => asked,
        (None, Some(enrolled)) => enrolled.cluster.clone(),
        (None, None) => CLUSTER_DEFAULT.to_owned(),
    };
    let socket = args.socket.or(file.socket).unwrap_or_else(|| data_dir.join(SOCKET_FILE));
    let socket_mode = match args.socket_mode.or(file.socket_mode) {
        Some(text) => parse_mode(&text)?,
        None => konor_node::api::socket::SOCKET_MODE_DEFAULT,
    };
    let gossip_interval =
        args.gossip_interval_ms.or(file.gossip_interval_ms).map_or(GOSSIP_INTERVAL_DEFAULT, Duration::from_millis);
    anyhow::ensure!(gossip_interval >= Duration::from_millis(10), "gossip interval must be at least 10 ms");
    anyhow::ensure!(
        file.alert_webhook.len() <= WEBHOOKS_MAX,
        "the settings file names {} alert webhooks; at most {WEBHOOKS_MAX} are allowed",
        file.alert_webhook.len()
    );
    let alert_webhooks =
        file.alert_webhook.iter().map(|url| WebhookUrl::parse(url)).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(DaemonSettings {
        data_dir,
        node_id,
        listen,
        seeds,
        socket,
        socket_mode,
        labels,
        tls_dir,
        cluster,
        gossip_interval,
        http_listen: args.http_listen.or(file.http_listen).map(|text| parse_addr(&text)).transpose()?,
        http_open_reads: args.http_open_reads || file.http_open_reads,
        alert_webhooks,
        alert_webhook_ca: file.alert_webhook_ca,
        roles: file
            .roles
            .as_ref()
            .map(|table| konor_node::api::authorize::RolePolicy::parse(table, rustix::process::geteuid().as_raw()))
            .transpose()
            .map_err(anyhow::Error::msg)?,
        fault_control: std::env::var_os(konor_node::fault_layer::FAULT_CONTROL_ENV)
            .filter(|path| !path.is_empty())
            .map(PathBuf::from),
    })
}

/// Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad settings (a refused enrollment too).
fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("KONOR_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("konord: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    // Settings, and enrollment when --join asks for it (which talks to a signer).
    let settings = match runtime.block_on(settings(Args::parse())) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("konord: {error:#}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = shutdown_tx.send(true);
        });
        konor_node::daemon::run(settings, shutdown_rx).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("konord: {error:#}");
            ExitCode::from(1)
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
