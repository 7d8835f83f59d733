//! The run's `konord` processes: certificates from a throw-away CA, one data dir, socket and log
//! per node under the run dir, each process started inside its node's namespace through
//! `ip netns exec` (which execs konord in place, so the child's pid is konord's and signals reach
//! it directly). Every pid started is listed in `konord.pids` in the run dir, so
//! `konor-chaos cleanup` can end what a killed run left. One node may keep its data dir on a
//! small tmpfs, to fill it up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use konor_sdk::Client;

/// The QUIC port every node listens on (each on its own address).
pub const NODE_PORT: u16 = 7400;

/// Gossip period of the run's nodes: short, as in the node tests, so a death is detected in
/// about a second and the membership check can hold nodes to a tight bound.
pub const GOSSIP_INTERVAL_MS: u64 = 100;

/// The source name of the suite's tmpfs mounts in /proc/mounts: how cleanup finds them.
pub const TMPFS_SOURCE: &str = "konor-chaos";

/// The file in the run dir listing every konord pid started, one a line.
pub const PID_FILE: &str = "konord.pids";

/// How long konord may take to acknowledge new fault settings (it reads them every 100 ms; a
/// node busy catching up may take a few polls).
const FAULTS_APPLIED_DEADLINE: Duration = Duration::from_secs(5);

/// How long a node may take to answer on its socket after a start.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// One konord, running or not, keeping its data dir.
pub struct Node {
    /// `n1` ...
    pub id: String,
    /// Data dir (a tmpfs for the disk node).
    pub data_dir: PathBuf,
    /// TLS dir with the node's certificate.
    pub tls_dir: PathBuf,
    /// Unix socket path.
    pub socket: PathBuf,
    /// konord's stderr, appended across restarts.
    pub log: PathBuf,
    /// `ip netns` name.
    pub namespace: String,
    /// QUIC listen address.
    pub listen: String,
    /// Seed addresses.
    pub seeds: Vec<String>,
    /// The control file of konord's fault layer (delay, reordering, duplication, slow disk).
    pub fault_control: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// The processes of a run. Dropping it kills them all.
pub struct Cluster {
    /// Nodes, n1 first.
    pub nodes: Vec<Node>,
    konord: PathBuf,
    run_dir: PathBuf,
    log_filter: String,
}

impl Cluster {
    /// Makes a CA and one certificate per node under `run_dir`; starts nothing.
    /// `hosts` gives each node's namespace and address, n1 first.
    pub fn new(run_dir: &Path, konord: &Path, hosts: &[(String, String)], log_filter: &str) -> anyhow::Result<Cluster> {
        let ca_dir = run_dir.join("ca");
        konor_node::pki::ca::init_ca(&ca_dir).context("making the run's CA")?;
        let seed = format!("{}:{NODE_PORT}", hosts[0].1);
        let mut nodes = Vec::new();
        for (index, (namespace, address)) in hosts.iter().enumerate() {
            let id = format!("n{}", index + 1);
            let base = run_dir.join(&id);
            let tls_dir = base.join("tls");
            konor_node::pki::ca::issue_node_cert(&ca_dir, &id, &tls_dir)
                .with_context(|| format!("issuing {id}'s certificate"))?;
            nodes.push(Node {
                data_dir: base.join("data"),
                tls_dir,
                socket: base.join("s.sock"),
                log: base.join("konord.log"),
                fault_control: base.join("faults"),
                namespace: namespace.clone(),
                listen: format!("{address}:{NODE_PORT}"),
                seeds: if index == 0 { Vec::new() } else { vec![seed.clone()] },
                id,
                child: None,
                paused: false,
            });
        }
        Ok(Cluster { nodes, konord: konord.to_owned(), run_dir: run_dir.to_owned(), log_filter: log_filter.to_owned() })
    }

    /// Starts node `index` (on its data dir and address, as a restarted host would).
    pub fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        std::fs::create_dir_all(&node.data_dir)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.namespace])
            .arg(&self.konord)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--node-id", &node.id, "--listen", &node.listen])
            .args(["--gossip-interval-ms", &GOSSIP_INTERVAL_MS.to_string()])
            .arg("--socket")
            .arg(&node.socket)
            .arg("--tls-dir")
            .arg(&node.tls_dir)
            .env("KONOR_LOG", &self.log_filter)
            .env(konor_node::fault_layer::FAULT_CONTROL_ENV, &node.fault_control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for seed in &node.seeds {
            command.args(["--seed", seed]);
        }
        let child = command.spawn().with_context(|| format!("starting konord {}", node.id))?;
        node.child = Some(child);
        node.paused = false;
        self.write_pid_file();
        Ok(())
    }

    /// Waits until node `index` answers on its socket, and returns a client with `timeout`.
    pub async fn client(&mut self, index: usize, timeout: Duration) -> anyhow::Result<Client> {
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        let mut backoff = Duration::from_millis(10);
        loop {
            let node = &mut self.nodes[index];
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("konord {} exited with {status}; see {}", node.id, node.log.display());
            }
            if let Ok(client) = Client::connect(&node.socket).await {
                return Ok(client.with_timeout(timeout));
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("konord {} never answered on {}", node.id, node.socket.display());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// SIGKILL node `index` and reap it.
    pub fn kill9(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
        self.write_pid_file();
    }

    /// A power cut of nodes `indexes`, all killed (-9) first, then every byte their fault
    /// layers' ledgers do not show as fsynced dropped from their files (a kill -9 alone loses
    /// nothing the kernel was handed). Returns the bytes dropped per node, in order.
    /// [`Cluster::start`] brings them back.
    pub fn power_cut(&mut self, indexes: &[usize]) -> anyhow::Result<Vec<u64>> {
        for &index in indexes {
            self.kill9(index);
        }
        indexes.iter().map(|&index| self.drop_unsynced(index)).collect()
    }

    /// Cuts a stopped node's files to what its ledger shows as durable.
    fn drop_unsynced(&self, index: usize) -> anyhow::Result<u64> {
        let node = &self.nodes[index];
        let ledger = konor_node::fault_layer::disk::ledger_path(&node.fault_control);
        let text = match std::fs::read_to_string(&ledger) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error).with_context(|| format!("reading {}", ledger.display())),
        };
        konor_node::fault_layer::disk::DurableModel::from_ledger(&text)
            .apply()
            .with_context(|| format!("dropping {}'s unsynced bytes", node.id))
    }

    /// SIGSTOP: the process freezes with its sockets open.
    pub fn pause(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if let Some(child) = &node.child {
            signal(child.id(), "STOP");
            node.paused = true;
        }
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if let Some(child) = &node.child {
            signal(child.id(), "CONT");
            node.paused = false;
        }
    }

    /// Sets node `index`'s fault layer to `settings` (the control file's text; empty heals) and
    /// waits until konord acknowledges it. A node not running takes it at its next start.
    pub async fn set_faults(&mut self, index: usize, settings: &str) -> anyhow::Result<()> {
        let node = &mut self.nodes[index];
        let staged = node.fault_control.with_extension("next");
        std::fs::write(&staged, settings)
            .and_then(|()| std::fs::rename(&staged, &node.fault_control))
            .with_context(|| format!("writing {}", node.fault_control.display()))?;
        if node.child.is_none() || node.paused {
            return Ok(());
        }
        let applied = konor_node::fault_layer::applied_path(&node.fault_control);
        let deadline = tokio::time::Instant::now() + FAULTS_APPLIED_DEADLINE;
        loop {
            if std::fs::read_to_string(&applied).is_ok_and(|text| text == settings) {
                return Ok(());
            }
            // A konord that exited on its own (it refused its data dir after a power cut, say)
            // takes nothing: the run goes on, and the node's missing final state fails it.
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                eprintln!("konor-chaos: konord {} exited with {status}; see {}", node.id, node.log.display());
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "konord {} did not take its fault settings {settings:?} within {FAULTS_APPLIED_DEADLINE:?}",
                    node.id
                );
            }
            tokio::time::sleep(konor_node::fault_layer::CONTROL_POLL / 4).await;
        }
    }

    /// The nodes whose konord exited on its own since the last look (the runner kills only
    /// through `kill9` and `power_cut`, which take the process first): each with its exit
    /// status and the last lines of its log. They count as stopped: `revive_all` starts them.
    pub fn exited(&mut self) -> Vec<(usize, String, Vec<String>)> {
        let mut exited = Vec::new();
        for (index, node) in self.nodes.iter_mut().enumerate() {
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                node.child = None;
                exited.push((index, status.to_string(), log_tail(&node.log, EXIT_LOG_LINES)));
            }
        }
        exited
    }

    /// Resumes every paused node and starts every stopped one.
    pub fn revive_all(&mut self) -> anyhow::Result<()> {
        for index in 0..self.nodes.len() {
            if self.nodes[index].paused {
                self.resume(index);
            }
            if self.nodes[index].child.is_none() {
                self.start(index)?;
            }
        }
        Ok(())
    }

    fn write_pid_file(&self) {
        let pids: String =
            self.nodes.iter().filter_map(|n| n.child.as_ref()).map(|child| format!("{}\n", child.id())).collect();
        // Best effort: cleanup also finds processes by their namespace.
        let _ = std::fs::write(self.run_dir.join(PID_FILE), pids);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill9(index);
        }
        let _ = std::fs::remove_file(self.run_dir.join(PID_FILE));
    }
}

/// Sends signal `name` (STOP, CONT) to `pid`.
fn signal(pid: u32, name: &str) {
    crate::lab::run_quietly("kill", &[&format!("-{name}"), &pid.to_string()]);
}

/// A tmpfs of the suite over a directory (the disk node's data dir). Unmounted on drop; drop it
/// after the process that uses it.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` at `path` (created if missing).
    pub fn mount(path: &Path, size_bytes: u64) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes},mode=0700"), TMPFS_SOURCE])
            .arg(path)
            .status()
            .context("cannot run mount")?;
        if !status.success() {
            bail!("mount -t tmpfs at {} failed: {status}", path.display());
        }
        Ok(Tmpfs { path: path.to_owned() })
    }

    /// Writes a filler file until the file system answers ENOSPC; returns its size.
    pub fn fill(&self) -> anyhow::Result<u64> {
        use std::io::Write;
        let mut file = std::fs::File::create(self.filler()).context("creating the filler")?;
        let mut written = 0u64;
        for chunk in [64 * 1024, 4096, 1] {
            let bytes = vec![0x5au8; chunk];
            loop {
                match file.write(&bytes) {
                    Ok(0) => break,
                    Ok(count) => written += count as u64,
                    Err(error) if error.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => break,
                    Err(error) => bail!("filling {} failed: {error}", self.path.display()),
                }
            }
        }
        Ok(written)
    }

    /// Removes the filler: the space is free again.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
    }

    fn filler(&self) -> PathBuf {
        self.path.join("chaos-filler")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).output().is_ok_and(|out| out.status.success());
        if !unmounted {
            // Still busy (a process not yet reaped): detach it; the kernel frees it after.
            crate::lab::run_quietly("umount", &["-l", &self.path.to_string_lossy()]);
        }
    }
}

/// Lines of a node's log kept with its unexpected exit: enough for a panic message or
/// `fatal runtime error: stack overflow` and what came just before.
const EXIT_LOG_LINES: usize = 6;

/// The last `lines` lines of the file at `path` (nothing if it cannot be read).
fn log_tail(path: &Path, lines: usize) -> Vec<String> {
    let text = std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|line| line.chars().take(400).collect()).collect()
}
