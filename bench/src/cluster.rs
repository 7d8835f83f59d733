//! Local `konord` daemons for one benchmark run: a throw-away CA, one temp dir, one process per
//! node, and a guard whose `Drop` kills every process before the temp dir is removed.
//!
//! `etcd.rs` starts etcd members beside these in the same shape: start, wait until ready, pids
//! for memory, and a guard that cleans up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::client::Client;
use konor_sdk::protocol::{Request, Response};
use tempfile::TempDir;
use tokio::time::Instant;

/// How long a daemon may take to write its listen address and answer on its socket. A release
/// konord starts in milliseconds; 30 s means it is stuck or failing.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// How long the mesh may take until every node sees every other live. FACTS: with 300 ms gossip
/// every node sees every other within 1.2-1.8 s; 60 s leaves room for a loaded machine.
pub const MESH_DEADLINE: Duration = Duration::from_secs(60);

/// Pause between polls of an observable condition (a file, a socket, a gossip view).
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Lines of a daemon's log shown when it fails.
const LOG_TAIL_LINES: usize = 20;

/// The daemons' log filter when konor-bench's own environment sets no `KONOR_LOG`: warnings
/// only, so logging costs nothing on the measured paths.
const DAEMON_LOG_FILTER_DEFAULT: &str = "warn";

/// One running konord.
#[derive(Debug)]
pub struct Daemon {
    /// Node id (`n1`, `n2`, ...).
    pub id: String,
    /// Its Unix socket.
    pub socket: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Daemon {
    /// The process id, for `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        crate::workload::rss_kib(self.pid())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// An error when the process has exited, with the end of its log.
    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                bail!("konord {} exited with {status}; the end of its log:\n{}", self.id, self.log_tail())
            }
            Err(error) => bail!("cannot check on konord {}: {error}", self.id),
        }
    }
}

/// The daemons of one run. Dropping it kills them all, then removes the temp dir.
#[derive(Debug)]
pub struct KonorCluster {
    /// Started daemons, in node order.
    pub daemons: Vec<Daemon>,
    konord: PathBuf,
    ca_dir: PathBuf,
    // Declared after `daemons`, so it is dropped after `Drop::drop` killed them: the files go
    // only once nothing uses them.
    dir: TempDir,
}

impl Drop for KonorCluster {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            // Errors mean the process is already gone; there is nothing else to do.
            let _ = daemon.child.kill();
            let _ = daemon.child.wait();
        }
    }
}

/// The konord binary of the build konor-bench belongs to: the file next to this executable.
pub fn konord_next_to_this_executable() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the path of the konor-bench executable")?;
    let konord = exe.with_file_name("konord");
    if !konord.is_file() {
        bail!(
            "konord is missing at {}: konor-bench runs the konord built next to it; \
             run `cargo build --release -p konor-node` (then target/release/konor-bench again)",
            konord.display()
        );
    }
    Ok(konord)
}

impl KonorCluster {
    /// Starts `count` daemons under a new temp dir inside `parent`: `n1` first, then the others
    /// seeded at `n1`'s address, and waits until each answers on its socket. On error every
    /// daemon started so far is killed (by the guard) and the temp dir removed.
    pub async fn start(konord: &Path, count: usize, parent: &Path) -> anyhow::Result<KonorCluster> {
        let dir = tempfile::Builder::new()
            .prefix("konor-bench")
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a temp dir in {}", parent.display()))?;
        let ca_dir = dir.path().join("ca");
        konor_node::pki::ca::init_ca(&ca_dir).context("cannot create the cluster CA")?;
        let mut cluster = KonorCluster { daemons: Vec::new(), konord: konord.to_owned(), ca_dir, dir };
        cluster.spawn("n1", &[])?;
        let seed = cluster.listen_addr(0).await?;
        for index in 2..=count {
            cluster.spawn(&format!("n{index}"), std::slice::from_ref(&seed))?;
        }
        for index in 0..cluster.daemons.len() {
            cluster.connect(index).await?;
        }
        Ok(cluster)
    }

    /// The temp dir holding every node's data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, id: &str, seeds: &[String]) -> anyhow::Result<()> {
        let base = self.dir.path().join(id);
        let tls_dir = base.join("tls");
        konor_node::pki::ca::issue_node_cert(&self.ca_dir, id, &tls_dir)
            .with_context(|| format!("cannot issue the certificate of {id}"))?;
        let data_dir = base.join("data");
        // Short: Unix socket paths are limited to about 108 bytes.
        let socket = base.join("s.sock");
        let log = base.join("konord.log");
        let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(&self.konord);
        command
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--node-id", id, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .arg("--socket")
            .arg(&socket)
            .arg("--tls-dir")
            .arg(&tls_dir)
            .env("KONOR_LOG", std::env::var("KONOR_LOG").unwrap_or_else(|_| DAEMON_LOG_FILTER_DEFAULT.to_owned()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for seed in seeds {
            command.args(["--seed", seed]);
        }
        // A process group of their own: Ctrl-C in the terminal reaches konor-bench only, which
        // then stops the daemons itself, after it stopped using them.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().with_context(|| format!("cannot start {}", self.konord.display()))?;
        self.daemons.push(Daemon { id: id.to_owned(), socket, data_dir, log, child });
        Ok(())
    }

    /// Waits for the daemon to write its bound QUIC address (it was started on port 0).
    async fn listen_addr(&mut self, index: usize) -> anyhow::Result<String> {
        let deadline = Instant::now() + START_DEADLINE;
        let daemon = &mut self.daemons[index];
        let path = daemon.data_dir.join(konor_node::daemon::LISTEN_ADDR_FILE);
        loop {
            daemon.check_running()?;
            if let Ok(text) = std::fs::read_to_string(&path)
                && !text.trim().is_empty()
            {
                return Ok(text.trim().to_owned());
            }
            if Instant::now() > deadline {
                bail!("konord {} did not write {} within {START_DEADLINE:?}", daemon.id, path.display());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Connects to daemon `index`, waiting until its socket answers.
    pub async fn connect(&mut self, index: usize) -> anyhow::Result<Client> {
        let deadline = Instant::now() + START_DEADLINE;
        let daemon = &mut self.daemons[index];
        loop {
            daemon.check_running()?;
            match Client::connect(&daemon.socket).await {
                Ok(client) => return Ok(client),
                Err(error) if Instant::now() > deadline => {
                    return Err(error).with_context(|| format!("konord {} never answered on its socket", daemon.id));
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// One client per daemon, in node order.
    pub async fn connect_all(&mut self) -> anyhow::Result<Vec<Client>> {
        let mut clients = Vec::with_capacity(self.daemons.len());
        for index in 0..self.daemons.len() {
            clients.push(self.connect(index).await?);
        }
        Ok(clients)
    }

    /// The HTTP API of daemon `index`, with a client certificate from the cluster's CA.
    pub fn http_endpoint(&self, index: usize) -> anyhow::Result<konor_node::ctl::remote::Endpoint> {
        let client_dir = self.dir.path().join("bench-client");
        if !client_dir.exists() {
            konor_node::pki::ca::issue_node_cert(&self.ca_dir, "bench-client", &client_dir)
                .context("cannot issue the HTTP client's certificate")?;
        }
        let daemon = &self.daemons[index];
        let path = daemon.data_dir.join(konor_node::api::http::HTTP_ADDR_FILE);
        let addr = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        konor_node::ctl::remote::Endpoint::new(&format!("https://{}", addr.trim()), &client_dir)
    }

    /// An error naming the daemon that exited, if one did.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.daemons.iter_mut().try_for_each(Daemon::check_running)
    }

    /// Waits until every daemon's `Nodes` answer lists every node as live; returns how long.
    pub async fn wait_for_mesh(&mut self, clients: &[Client]) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut expected: Vec<String> = self.daemons.iter().map(|daemon| daemon.id.clone()).collect();
        expected.sort();
        for (daemon, client) in self.daemons.iter_mut().zip(clients) {
            loop {
                daemon.check_running()?;
                let live = live_nodes(client).await;
                if live == expected {
                    break;
                }
                if started.elapsed() > MESH_DEADLINE {
                    bail!(
                        "after {MESH_DEADLINE:?} node {} sees {live:?} live, expected {expected:?}; \
                         the end of its log:\n{}",
                        daemon.id,
                        daemon.log_tail()
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(started.elapsed())
    }

    /// The last lines of every daemon's log, for an error report.
    pub fn log_tails(&self) -> String {
        let mut text = String::new();
        for daemon in &self.daemons {
            text.push_str(&format!("--- konord {} ({}) ---\n{}\n", daemon.id, daemon.log.display(), daemon.log_tail()));
        }
        text
    }
}

/// The node ids a daemon sees live, sorted; empty when it does not answer.
async fn live_nodes(client: &Client) -> Vec<String> {
    match client.call(Request::Nodes).await {
        Ok(Response::Nodes { nodes }) => {
            let mut live: Vec<String> =
                nodes.into_iter().filter(|node| node.state == "live").map(|node| node.id).collect();
            live.sort();
            live
        }
        _ => Vec::new(),
    }
}
