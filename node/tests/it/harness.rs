//! Starts real `konord` processes in temp dirs with certificates from a throw-away CA, and
//! waits on observable events (socket answers, gossip views, watch events) with deadlines.
//! Faults for the fault tests live here too: signals (pause, kill -9), a data dir on a small
//! tmpfs that can be filled up, damaged group files, and meshes in network namespaces
//! (`netns.rs`).

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use konor_sdk::client::Client;
use konor_sdk::protocol::{Request, Response};
use tempfile::TempDir;

use crate::netns::NetnsLab;

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Set to keep every test cluster's directory (data dirs, konord logs) after the test.
pub const KEEP_ENV: &str = "KONOR_IT_KEEP";

/// The konord log filter for test clusters (`KONOR_LOG` syntax, `info` when unset), to read
/// more of a failure in the logs [`KEEP_ENV`] keeps.
pub const LOG_ENV: &str = "KONOR_IT_LOG";

/// A test cluster: one CA, many nodes.
pub struct Cluster {
    pub dir: TempDir,
    pub ca_dir: PathBuf,
}

/// One konord process (or a stopped one, keeping its data dir).
pub struct Node {
    pub id: String,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    pub socket: PathBuf,
    pub seeds: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
    /// Command prefix konord runs under (`ip netns exec <ns>`); empty: run it directly.
    pub launcher: Vec<String>,
    /// A fixed QUIC listen address; `None`: 127.0.0.1 with a port the kernel picks (and the
    /// same address again after a restart).
    pub listen: Option<String>,
    /// The control file of konord's fault layer; `None`: no fault layer.
    pub fault_control: Option<PathBuf>,
    /// Serve the HTTP API on 127.0.0.1 (a port the kernel picks; see [`Node::http_endpoint`]).
    pub http: bool,
    /// More arguments for konord (`--label`, `--config`).
    pub extra_args: Vec<String>,
}

impl Cluster {
    pub fn new() -> Cluster {
        let mut dir = tempfile::Builder::new().prefix("konor-it").tempdir().unwrap();
        // KONOR_IT_KEEP=1 keeps the nodes' files and logs for a post-mortem.
        if std::env::var_os(KEEP_ENV).is_some() {
            dir.disable_cleanup(true);
            eprintln!("{KEEP_ENV}: keeping {}", dir.path().display());
        }
        let ca_dir = dir.path().join("ca");
        konor_node::pki::ca::init_ca(&ca_dir).unwrap();
        Cluster { dir, ca_dir }
    }

    /// Creates (does not start) a node with a certificate from this cluster's CA.
    pub fn node(&self, id: &str, seeds: &[&Node]) -> Node {
        let base = self.dir.path().join(id);
        let tls_dir = base.join("tls");
        konor_node::pki::ca::issue_node_cert(&self.ca_dir, id, &tls_dir).unwrap();
        Node::new(id, &base, tls_dir, seeds)
    }
}

impl Node {
    pub fn new(id: &str, base: &Path, tls_dir: PathBuf, seeds: &[&Node]) -> Node {
        let data_dir = base.join("data");
        // Short socket paths: Unix socket paths are limited to ~108 bytes.
        let socket = base.join("s.sock");
        let seeds = seeds.iter().map(|n| n.addr()).collect();
        Node {
            id: id.to_owned(),
            data_dir,
            tls_dir,
            socket,
            seeds,
            child: None,
            log: base.join("konord.log"),
            launcher: Vec::new(),
            listen: None,
            fault_control: None,
            http: false,
            extra_args: Vec::new(),
        }
    }

    pub fn start(&mut self) {
        // A restarted node keeps its address, as a real host does (peers know it there).
        let previous = self.addr();
        let listen = match &self.listen {
            Some(fixed) => fixed.clone(),
            None if previous.is_empty() => "127.0.0.1:0".to_owned(),
            None => previous,
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        // `ip netns exec` execs konord in place, so the child's pid is konord's own and signals
        // reach it directly.
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(env!("CARGO_BIN_EXE_konord"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_konord")),
        };
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--node-id", &self.id, "--listen", &listen, "--gossip-interval-ms", "100"])
            .arg("--socket")
            .arg(&self.socket)
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .env("KONOR_LOG", std::env::var(LOG_ENV).unwrap_or_else(|_| "info".to_owned()))
            .stdout(Stdio::null())
            .stderr(log);
        for seed in &self.seeds {
            command.args(["--seed", seed]);
        }
        if let Some(control) = &self.fault_control {
            command.env(konor_node::fault_layer::FAULT_CONTROL_ENV, control);
        }
        if self.http {
            command.args(["--http-listen", "127.0.0.1:0"]);
        }
        command.args(&self.extra_args);
        self.child = Some(command.spawn().unwrap());
    }

    /// The bound QUIC address, written by the daemon at start (the fixed one before that).
    pub fn addr(&self) -> String {
        let path = self.data_dir.join(konor_node::daemon::LISTEN_ADDR_FILE);
        match std::fs::read_to_string(path) {
            Ok(addr) => addr,
            Err(_) => self.listen.clone().unwrap_or_default(),
        }
    }

    /// `https://127.0.0.1:PORT` of the HTTP API (the node must run with [`Node::http`] and have
    /// answered on its socket: it writes the address before it serves).
    pub fn http_endpoint(&self) -> String {
        let addr = std::fs::read_to_string(self.data_dir.join(konor_node::api::http::HTTP_ADDR_FILE)).unwrap();
        format!("https://{}", addr.trim())
    }

    /// The record file of one of this node's groups (the node must have created or joined it).
    pub fn group_file(&self, group: &str) -> PathBuf {
        self.data_dir.join("groups").join(format!("{group}.konor"))
    }

    /// Waits until the daemon answers on its socket, then returns a client.
    pub async fn client(&mut self) -> Client {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut backoff = Duration::from_millis(5);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "konord {} exited with {status}: {}",
                    self.id,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(client) = Client::connect(&self.socket).await {
                return client;
            }
            assert!(tokio::time::Instant::now() < deadline, "konord {} never answered", self.id);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// SIGSTOP: the process freezes with its sockets open (a long GC pause, a VM stall).
    pub fn pause(&self) {
        signal(self.child.as_ref().expect("running").id(), "STOP");
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) {
        signal(self.child.as_ref().expect("running").id(), "CONT");
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// kill -9 and start again at once, on the same data dir and address.
    pub fn kill9_and_restart(&mut self) {
        self.kill9();
        self.start();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        child.wait().unwrap()
    }
}

/// Sends signal `name` (STOP, CONT, TERM) to process `pid`.
fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it returns Some, with a deadline: the condition is an observable event
/// of the system (a gossip view, a value served), not a fixed sleep.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each node's state ("live", "unknown", "dead", "leaving") as `client`'s node sees it.
pub async fn node_states(client: &Client) -> Option<std::collections::BTreeMap<String, String>> {
    match client.call(Request::Nodes).await {
        Ok(Response::Nodes { nodes }) => Some(nodes.into_iter().map(|n| (n.id, n.state)).collect()),
        _ => None,
    }
}

/// The live node ids this node sees.
pub async fn live_nodes(client: &Client) -> Vec<String> {
    match client.call(Request::Nodes).await {
        Ok(Response::Nodes { nodes }) => {
            let mut live: Vec<String> = nodes.into_iter().filter(|n| n.state == "live").map(|n| n.id).collect();
            live.sort();
            live
        }
        _ => Vec::new(),
    }
}

/// Starts `count` nodes seeded at the first and waits until every node sees all of them live.
pub async fn start_mesh(cluster: &Cluster, count: usize) -> (Vec<Node>, Vec<Client>) {
    start_mesh_with(cluster, count, |_| {}).await
}

/// [`start_mesh`], calling `prepare` on each node before it first starts (to put its data dir
/// on a tmpfs, say).
pub async fn start_mesh_with(
    cluster: &Cluster,
    count: usize,
    mut prepare: impl FnMut(&mut Node),
) -> (Vec<Node>, Vec<Client>) {
    let mut first = cluster.node("n1", &[]);
    prepare(&mut first);
    first.start();
    let first_client = first.client().await;
    let mut nodes = vec![first];
    let mut clients = vec![first_client];
    for n in 2..=count {
        let mut node = cluster.node(&format!("n{n}"), &[&nodes[0]]);
        prepare(&mut node);
        node.start();
        clients.push(node.client().await);
        nodes.push(node);
    }
    await_whole_mesh(&nodes, &clients).await;
    (nodes, clients)
}

/// Waits until every client's node sees every node of `nodes` live.
pub async fn await_whole_mesh(nodes: &[Node], clients: &[Client]) {
    let expected: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    for client in clients {
        let expected = expected.clone();
        eventually("every node sees the whole mesh live", || async {
            (live_nodes(client).await == expected).then_some(())
        })
        .await;
    }
}

/// The QUIC port every node of a namespace mesh listens on (each has its own address).
const NETNS_PORT: u16 = 7400;

/// A mesh of konord processes, each in its own network namespace of a [`NetnsLab`]. Fields drop
/// in order: the processes die before their namespaces go, and the cluster's files go last.
pub struct NetnsMesh {
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    pub lab: NetnsLab,
    pub cluster: Cluster,
}

impl NetnsMesh {
    /// Starts `count` nodes (n1, n2...), node i in namespace i, seeded at n1, and waits until
    /// every node sees all of them live. Fails the test when not root or `ip`/`nft` are missing.
    pub async fn start(count: usize) -> NetnsMesh {
        let lab = NetnsLab::new(count);
        let cluster = Cluster::new();
        let seed = format!("{}:{NETNS_PORT}", lab.hosts()[0].address);
        let mut mesh = NetnsMesh { nodes: Vec::new(), clients: Vec::new(), lab, cluster };
        for index in 0..count {
            let mut node = mesh.cluster.node(&format!("n{}", index + 1), &[]);
            node.launcher = mesh.lab.launcher(index);
            node.listen = Some(format!("{}:{NETNS_PORT}", mesh.lab.hosts()[index].address));
            if index > 0 {
                node.seeds = vec![seed.clone()];
            }
            node.start();
            mesh.nodes.push(node);
        }
        for node in &mut mesh.nodes {
            let client = node.client().await;
            mesh.clients.push(client);
        }
        await_whole_mesh(&mesh.nodes, &mesh.clients).await;
        mesh
    }
}

/// A tmpfs mounted over a directory (a node's data dir), to run out of space on purpose.
/// Unmounted on drop; drop it after the process that uses it (declare it first).
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` at `path` (created if missing). Needs root.
    pub fn mount(path: &Path, size_bytes: u64) -> Tmpfs {
        crate::netns::require_root();
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes},mode=0700"), "tmpfs"])
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs at {} failed: {status}", path.display());
        Tmpfs { path: path.to_owned() }
    }

    /// Writes a filler file until the file system answers ENOSPC, and returns its size. Bytes
    /// go in pages: after this, any write that needs a fresh page fails.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path.join("filler")).unwrap();
        let mut written = 0u64;
        for chunk in [64 * 1024, 4096, 1] {
            let bytes = vec![0x5au8; chunk];
            loop {
                match file.write(&bytes) {
                    Ok(0) => break,
                    Ok(count) => written += count as u64,
                    Err(error) if error.raw_os_error() == Some(28) => break,
                    Err(error) => panic!("filling {} failed: {error}", self.path.display()),
                }
            }
        }
        // Not fsynced: tmpfs has no disk behind it, the space is taken once written.
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).output().is_ok_and(|out| out.status.success());
        if !unmounted {
            // Still busy (a process not yet reaped): detach it, the kernel frees it after.
            let _ = Command::new("umount").arg("-l").arg(&self.path).output();
        }
    }
}

/// Damages a record file (a group's `.konor` file) from `from_offset` on: flips bytes in the
/// payload of the first record that starts at or after that offset, so its checksum fails and a
/// reader keeps only the records before it. `from_offset` is typically the file's length at an
/// earlier moment: everything written since then is lost. Returns the length of the valid
/// prefix that is left.
pub fn damage_records_from(path: &Path, from_offset: usize) -> usize {
    use konor_crdt::record::{FRAME_BYTES, scan_records};
    let mut bytes = std::fs::read(path).unwrap();
    let scan = scan_records(&bytes).unwrap();
    assert!(scan.dropped.is_none(), "{} was damaged before: {:?}", path.display(), scan.dropped);
    let target = scan
        .records
        .iter()
        .find(|record| record.offset >= from_offset)
        .map(|record| (record.offset, record.payload.len()))
        .unwrap_or_else(|| panic!("{}: no record at or after offset {from_offset}", path.display()));
    let (offset, payload_bytes) = target;
    assert!(payload_bytes > 0, "an empty record has no payload to damage");
    // The middle and the last byte of the payload: covered by the checksum, not by the frame.
    for at in [offset + FRAME_BYTES + payload_bytes / 2, offset + FRAME_BYTES + payload_bytes - 1] {
        bytes[at] ^= 0xa5;
    }
    std::fs::write(path, &bytes).unwrap();
    let rescan = scan_records(&bytes).unwrap();
    assert_eq!(rescan.valid_bytes, offset, "the damage must cut the file at the record");
    rescan.valid_bytes
}

/// Creates `group` on the first client and joins it on the others; returns the key.
pub async fn group_on_all(clients: &[Client], group: &str, mode: &str) -> konor_sdk::Secret {
    group_on_all_with(clients, group, mode, None).await
}

/// [`group_on_all`] with the group's eviction policy (strong groups).
pub async fn group_on_all_with(
    clients: &[Client],
    group: &str,
    mode: &str,
    evict_after_ms: Option<u64>,
) -> konor_sdk::Secret {
    let request = Request::GroupCreate {
        name: group.into(),
        mode: mode.into(),
        key: None,
        evict_after_ms,
        fencing: None,
        release: None,
    };
    create_and_join(clients, group, request).await
}

/// [`group_on_all`] for a gated group (SPEC F14: versions are served only once released).
pub async fn gated_group_on_all(clients: &[Client], group: &str, mode: &str) -> konor_sdk::Secret {
    let request = Request::GroupCreate {
        name: group.into(),
        mode: mode.into(),
        key: None,
        evict_after_ms: None,
        fencing: None,
        release: Some("gated".into()),
    };
    create_and_join(clients, group, request).await
}

/// Creates a group on the first client's node with `request`, joins it everywhere else, and
/// waits until every node counts every member live.
async fn create_and_join(clients: &[Client], group: &str, request: Request) -> konor_sdk::Secret {
    let created = clients[0].call(request).await.unwrap();
    let Response::GroupCreated { key, .. } = created else { panic!("{created:?}") };
    for client in &clients[1..] {
        // A fresh group is known to peers once its gossip spreads; the join waits for that.
        let joined = client.call(Request::GroupJoin { name: group.into(), key: key.clone() }).await.unwrap();
        assert!(matches!(joined, Response::Joined { .. }), "{joined:?}");
    }
    // Membership of a group spreads by gossip: wait until every node counts every member live.
    for client in clients {
        eventually("every node sees every member of the group", || async {
            match client.call(Request::Status { group: group.into() }).await {
                Ok(Response::Status { live, .. }) if live.len() == clients.len() => Some(()),
                _ => None,
            }
        })
        .await;
    }
    key
}

/// The example app (`examples/`, another package, so cargo gives this test no path to it): built
/// next to konord by `cargo build` (a no-op when up to date), once per test binary.
pub fn example_app() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let konord = PathBuf::from(env!("CARGO_BIN_EXE_konord"));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "-q", "-p", "konor-examples", "--bin", "konor-app"]);
            if konord.components().any(|c| c.as_os_str() == "release") {
                build.arg("--release");
            }
            let status = build.status().expect("cannot run cargo build for the example app");
            let app = konord.with_file_name("konor-app");
            assert!(status.success() && app.exists(), "building the example app failed: {status}");
            app
        })
        .clone()
}

/// A running example app, killed when dropped.
pub struct App(pub Child);

impl App {
    /// Starts the example app on `node`'s socket for `group`, with its environment `env`.
    pub fn start(node: &Node, group: &str, env: &[(&str, &str)]) -> App {
        let mut command = Command::new(example_app());
        command
            .arg(group)
            .env("KONOR_SOCKET", &node.socket)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        App(command.spawn().expect("cannot start the example app"))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs konorctl with none of its environment settings (socket, endpoint, TLS dir) leaking in
/// from the shell that runs the tests.
pub fn konorctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_konorctl"))
        .args(args)
        .env_remove("KONOR_SOCKET")
        .env_remove("KONOR_ENDPOINT")
        .env_remove("KONOR_TLS_DIR")
        .output()
        .unwrap()
}

/// [`konorctl`] against the node listening on `socket`.
pub fn konorctl_on(socket: &Path, args: &[&str]) -> std::process::Output {
    let socket = socket.to_str().unwrap();
    let mut all = vec!["--socket", socket];
    all.extend_from_slice(args);
    konorctl(&all)
}

/// The JSON konorctl printed; the command must have succeeded.
pub fn ok_json(output: &std::process::Output) -> serde_json::Value {
    assert!(output.status.success(), "konorctl failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The HTTP status and body of `GET path` from a caller with no certificate (trusting the
/// cluster CA).
pub async fn anonymous_get(endpoint: &str, ca_dir: &Path, path: &str) -> (u16, String) {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.trim_start_matches("https://");
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(ca_dir.join("ca.crt")).unwrap();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(konor_node::pki::SERVER_NAME).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// The konorctl binary copied where any user may run it (the build's own target dir may sit
/// in a directory only root can enter, as a CI checkout made with `mktemp -d` does).
pub fn konorctl_for_anyone(dir: &Path) -> std::path::PathBuf {
    let copy = dir.join("konorctl");
    std::fs::copy(env!("CARGO_BIN_EXE_konorctl"), &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// konorctl (`binary`) on `socket` as user `uid` in group `gid`, JSON output.
pub fn as_user(binary: &Path, uid: u32, gid: u32, socket: &Path, args: &[String]) -> Output {
    Command::new(binary)
        .arg("--socket")
        .arg(socket)
        .args(["--output", "json"])
        .args(args)
        .env_remove("KONOR_SOCKET")
        .env_remove("KONOR_ENDPOINT")
        .env_remove("KONOR_TLS_DIR")
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap()
}
