//! Starts real `konord` processes in temp dirs with certificates from a throw-away CA, and
//! waits on observable events (socket answers, gossip views, watch events) with deadlines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use konor_sdk::client::Client;
use konor_sdk::protocol::{Request, Response};
use tempfile::TempDir;

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

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
    /// The network namespace it runs in (`None`: the test's own, on loopback).
    pub netns: Option<String>,
    /// The IP address it listens on.
    pub listen_ip: String,
}

impl Cluster {
    pub fn new() -> Cluster {
        let dir = tempfile::Builder::new().prefix("konor-it").tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        konor_node::tls::init_ca(&ca_dir).unwrap();
        Cluster { dir, ca_dir }
    }

    /// Creates (does not start) a node with a certificate from this cluster's CA.
    pub fn node(&self, id: &str, seeds: &[&Node]) -> Node {
        let base = self.dir.path().join(id);
        let tls_dir = base.join("tls");
        konor_node::tls::issue_node_cert(&self.ca_dir, id, &tls_dir).unwrap();
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
            netns: None,
            listen_ip: "127.0.0.1".to_owned(),
        }
    }

    /// Moves the node into network namespace `netns` at `ip` (before its first start).
    pub fn in_netns(mut self, netns: &str, ip: &str) -> Node {
        self.netns = Some(netns.to_owned());
        self.listen_ip = ip.to_owned();
        self
    }

    pub fn start(&mut self) {
        // A restarted node keeps its address, as a real host does (peers know it there).
        let previous = self.addr();
        let listen = if previous.is_empty() { format!("{}:0", self.listen_ip) } else { previous };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        // `ip netns exec` execs konord in place: the child's pid is konord's, for signals.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_konord")]);
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
            .env("KONOR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for seed in &self.seeds {
            command.args(["--seed", seed]);
        }
        self.child = Some(command.spawn().unwrap());
    }

    /// The bound QUIC address, written by the daemon at start.
    pub fn addr(&self) -> String {
        let path = self.data_dir.join(konor_node::daemon::LISTEN_ADDR_FILE);
        std::fs::read_to_string(path).unwrap_or_default()
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

    /// Sends a signal (STOP, CONT, TERM...).
    pub fn signal(&self, name: &str) {
        signal(self.child.as_ref().expect("running").id(), name);
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        child.wait().unwrap()
    }
}

pub fn signal(pid: u32, name: &str) {
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
    let mut first = cluster.node("n1", &[]);
    first.start();
    let first_client = first.client().await;
    let mut nodes = vec![first];
    let mut clients = vec![first_client];
    for n in 2..=count {
        let mut node = cluster.node(&format!("n{n}"), &[&nodes[0]]);
        node.start();
        clients.push(node.client().await);
        nodes.push(node);
    }
    let expected: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    for client in &clients {
        let expected = expected.clone();
        eventually("every node sees the whole mesh live", || async {
            (live_nodes(client).await == expected).then_some(())
        })
        .await;
    }
    (nodes, clients)
}

/// Creates `group` on the first client and joins it on the others; returns the key.
pub async fn group_on_all(clients: &[Client], group: &str, mode: &str) -> String {
    let created = clients[0]
        .call(Request::GroupCreate {
            name: group.into(),
            mode: mode.into(),
            key: None,
            evict_after_ms: None,
            fencing: None,
        })
        .await
        .unwrap();
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
