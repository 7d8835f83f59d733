//! The etcd side of the comparison: a local etcd cluster (Debian's `etcd-server`, started by
//! hand as FACTS.md describes) and the same workloads as `konor.rs`, driven through etcd's own
//! gRPC client. The members keep their data on the same filesystem as the konord daemons, since
//! both fsync every write.
//!
//! What maps to what: a Konorkestra group is a key prefix (`/bench/<group>/`); a watcher is an
//! etcd watch on the key, held on the member it watches through; a local read is a
//! serializable get on the local member (served without a Raft round, like our socket get).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{Client, GetOptions, WatchOptions};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::measure::Latency;
use crate::workload::{AbortOnDrop, CONDITION_DEADLINE, Plan, rss_kib};

/// How long a member may take until the cluster has a leader.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Pause between polls while the cluster starts.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The key the propagation workload writes.
const PROBE_KEY: &str = "/bench/bench/probe.seq";

/// One running etcd member.
#[derive(Debug)]
struct Member {
    name: String,
    client_url: String,
    log: PathBuf,
    child: Child,
}

/// A local etcd cluster; dropping it kills every member before the temp dir goes.
pub struct EtcdCluster {
    members: Vec<Member>,
    /// One client per member, connected to that member only.
    clients: Vec<Client>,
    /// Index of the member that led when the cluster was checked.
    leader: usize,
    dir: TempDir,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.child.kill();
            let _ = member.child.wait();
        }
    }
}

/// Finds `etcd` on the PATH (Debian installs it as /usr/bin/etcd).
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .context("no etcd on the PATH: install the Debian package etcd-server (apt-get install etcd-server), or run with --no-etcd")
}

/// Free loopback TCP ports, found by binding port 0. Another process could take one before etcd
/// binds it; etcd then fails to start and the run says so.
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr().context("no local address")?.port())).collect()
}

impl EtcdCluster {
    /// Starts `count` members under a temp dir in `work_dir` and waits until they agree on a leader.
    pub async fn start(etcd: &Path, count: usize, work_dir: &Path) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("konor-bench-etcd-")
            .tempdir_in(work_dir)
            .with_context(|| format!("cannot make a temp dir under {}", work_dir.display()))?;
        let ports = free_ports(2 * count)?;
        let names: Vec<String> = (1..=count).map(|index| format!("e{index}")).collect();
        let peer_url = |index: usize| format!("http://127.0.0.1:{}", ports[2 * index + 1]);
        let initial_cluster: Vec<String> =
            names.iter().enumerate().map(|(index, name)| format!("{name}={}", peer_url(index))).collect();
        let mut cluster = EtcdCluster { members: Vec::new(), clients: Vec::new(), leader: 0, dir };
        for (index, name) in names.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{}", ports[2 * index]);
            let data_dir = cluster.dir.path().join(name);
            let log = cluster.dir.path().join(format!("{name}.log"));
            let log_file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
            let child = Command::new(etcd)
                .args(["--name", name])
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url(index), "--initial-advertise-peer-urls", &peer_url(index)])
                .args(["--initial-cluster", &initial_cluster.join(",")])
                .args(["--initial-cluster-token", "konor-bench", "--initial-cluster-state", "new"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .with_context(|| format!("cannot start {}", etcd.display()))?;
            cluster.members.push(Member { name: name.clone(), client_url, log, child });
        }
        cluster.wait_for_leader().await?;
        Ok(cluster)
    }

    async fn wait_for_leader(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        // Connect each member's client (the endpoint answers once etcd listens).
        for index in 0..self.members.len() {
            let client = loop {
                self.check_running()?;
                let url = self.members[index].client_url.clone();
                match Client::connect([url], None).await {
                    Ok(client) => break client,
                    Err(error) if Instant::now() > deadline => {
                        bail!("etcd {} did not answer within {START_DEADLINE:?}: {error}", self.members[index].name)
                    }
                    Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
                }
            };
            self.clients.push(client);
        }
        // Every member must report the same leader.
        loop {
            self.check_running()?;
            let mut leaders = Vec::new();
            let mut ids = Vec::new();
            for client in &mut self.clients {
                match client.status().await {
                    Ok(status) => {
                        leaders.push(status.leader());
                        ids.push(status.header().map_or(0, |header| header.member_id()));
                    }
                    Err(_) => leaders.push(0),
                }
            }
            let agreed = leaders[0] != 0 && leaders.iter().all(|leader| *leader == leaders[0]);
            if agreed && let Some(index) = ids.iter().position(|id| *id == leaders[0]) {
                self.leader = index;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd members did not agree on a leader within {START_DEADLINE:?} (leaders seen: {leaders:?})");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// An error when a member has exited, with the end of its log.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for member in &mut self.members {
            let status = match member.child.try_wait() {
                Ok(None) => continue,
                Ok(Some(status)) => status.to_string(),
                Err(error) => format!("unknown: {error}"),
            };
            let log = std::fs::read_to_string(&member.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            bail!("etcd {} exited ({status}); the end of its log:\n{tail}", member.name);
        }
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The index of the leader and of one follower (the leader itself in a one-member cluster).
    pub fn leader_and_follower(&self) -> (usize, usize) {
        let follower = (0..self.members.len()).find(|index| *index != self.leader).unwrap_or(self.leader);
        (self.leader, follower)
    }

    /// The temp dir holding every member's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Resident memory of every member (name, KiB).
    pub fn memory(&self) -> anyhow::Result<Vec<(String, u64)>> {
        self.members.iter().map(|member| Ok((member.name.clone(), rss_kib(member.child.id())?))).collect()
    }

    /// A new connection to member `index` (a separate HTTP/2 connection: a separate client).
    async fn connect(&self, index: usize) -> anyhow::Result<Client> {
        let url = self.members[index].client_url.clone();
        Client::connect([url], None)
            .await
            .with_context(|| format!("cannot connect to etcd {}", self.members[index].name))
    }

    /// Puts the idle data set: `groups` prefixes of `keys` keys each, in transactions of 100
    /// puts (etcd's default limit is 128 operations per transaction).
    pub async fn load_idle(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let client = &mut self.clients[self.leader];
        for group in 0..plan.idle_groups {
            let puts: Vec<(String, String)> = (0..plan.idle_keys)
                .map(|key| {
                    let name = format!("idle{group}");
                    (format!("/bench/{name}/setting.k{key:04}"), crate::workload::idle_value(&name, key, plan))
                })
                .collect();
            for chunk in puts.chunks(100) {
                let operations: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|(key, value)| etcd_client::TxnOp::put(key.as_str(), value.as_str(), None))
                    .collect();
                client
                    .txn(etcd_client::Txn::new().and_then(operations))
                    .await
                    .context("cannot load the idle keys into etcd")?;
            }
        }
        Ok(())
    }

    /// A put on `writer`, timed until watchers on every other member have seen it.
    pub async fn propagation(&mut self, writer: usize, samples: u64, warmup: u64) -> anyhow::Result<Latency> {
        let (seen_sender, mut seen) = mpsc::channel::<(usize, u64, Instant)>(1024);
        let mut tasks = Vec::new();
        let watchers: Vec<usize> = (0..self.len()).filter(|index| *index != writer).collect();
        for &member in &watchers {
            let mut client = self.connect(member).await?;
            let mut stream = client.watch(PROBE_KEY, Some(WatchOptions::new())).await.context("cannot watch etcd")?;
            let sender = seen_sender.clone();
            tasks.push(tokio::spawn(async move {
                // The client must live as long as its watch.
                let _client = client;
                while let Ok(Some(response)) = stream.message().await {
                    let at = Instant::now();
                    for event in response.events() {
                        let sequence = event.kv().and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok());
                        if let Some(sequence) = sequence
                            && sender.send((member, sequence, at)).await.is_err()
                        {
                            return;
                        }
                    }
                }
            }));
        }
        drop(seen_sender);
        let _watchers = AbortOnDrop(tasks);
        let mut client = self.connect(writer).await?;
        let mut latency = Latency::new()?;
        let base = next_sequence(&mut client).await?;
        for sample in 0..warmup + samples {
            let sequence = base + sample;
            let started = Instant::now();
            client.put(PROBE_KEY, sequence.to_string(), None).await.context("etcd put failed")?;
            let mut waiting: Vec<usize> = watchers.clone();
            let mut last = started;
            while !waiting.is_empty() {
                let Ok(Some((member, seen_sequence, at))) =
                    tokio::time::timeout_at(started + CONDITION_DEADLINE, seen.recv()).await
                else {
                    bail!("etcd watchers {waiting:?} did not see put {sequence} within {CONDITION_DEADLINE:?}");
                };
                if seen_sequence == sequence {
                    waiting.retain(|index| *index != member);
                    last = last.max(at);
                }
            }
            if sample >= warmup {
                latency.record(last.saturating_duration_since(started));
            }
        }
        Ok(latency)
    }

    /// Put round trips on `writer`, one at a time.
    pub async fn put_ack(&mut self, writer: usize, samples: u64, warmup: u64) -> anyhow::Result<Latency> {
        let client = &mut self.clients[writer];
        let mut latency = Latency::new()?;
        for sample in 0..warmup + samples {
            let started = Instant::now();
            client.put("/bench/commit/commit.seq", sample.to_string(), None).await.context("etcd put failed")?;
            if sample >= warmup {
                latency.record(started.elapsed());
            }
        }
        Ok(latency)
    }

    /// Serializable gets on `member`, answered from its own store.
    pub async fn serializable_get(&mut self, member: usize, samples: u64, warmup: u64) -> anyhow::Result<Latency> {
        let client = &mut self.clients[member];
        let mut latency = Latency::new()?;
        for sample in 0..warmup + samples {
            let started = Instant::now();
            let response =
                client.get(PROBE_KEY, Some(GetOptions::new().with_serializable())).await.context("etcd get failed")?;
            let elapsed = started.elapsed();
            if response.kvs().is_empty() {
                bail!("etcd serializable get found no {PROBE_KEY}");
            }
            if sample >= warmup {
                latency.record(elapsed);
            }
        }
        Ok(latency)
    }

    /// Puts from `writers` clients on `member`, each in a loop, for `duration`.
    pub async fn writes(
        &self,
        member: usize,
        writers: usize,
        duration: Duration,
    ) -> anyhow::Result<(u64, Duration, Latency)> {
        let mut clients = Vec::with_capacity(writers);
        for _ in 0..writers {
            clients.push(self.connect(member).await?);
        }
        let started = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(index, mut client)| {
                tokio::spawn(async move {
                    let key = format!("/bench/writes/w{index:02}");
                    let mut latency = Latency::new()?;
                    let mut operations = 0u64;
                    while started.elapsed() < duration {
                        let before = Instant::now();
                        client.put(key.as_str(), operations.to_string(), None).await.context("etcd put failed")?;
                        latency.record(before.elapsed());
                        operations += 1;
                    }
                    anyhow::Ok((operations, latency))
                })
            })
            .collect();
        let mut tasks = AbortOnDrop(tasks);
        let mut operations = 0;
        let mut latency = Latency::new()?;
        for task in &mut tasks.0 {
            let (count, each) = task.await.context("an etcd writer task panicked")??;
            operations += count;
            latency.merge(&each)?;
        }
        Ok((operations, started.elapsed(), latency))
    }
}

/// One more than the probe key's current value, so sequences never repeat across rounds.
async fn next_sequence(client: &mut Client) -> anyhow::Result<u64> {
    let response = client.get(PROBE_KEY, None).await.context("etcd get failed")?;
    let current = response.kvs().first().and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse::<u64>().ok());
    Ok(current.map_or(1, |value| value + 1))
}

/// `etcd --version`'s first line and the path, for the report.
pub fn describe(binary: &Path) -> String {
    let version = Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "version unknown".to_owned());
    format!("{} ({version})", binary.display())
}
