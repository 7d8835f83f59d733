//! `konorctl demo`: the README's main job. With no setup it makes a throw-away CA and three
//! data dirs, starts three real `konord` processes on loopback and the example app, makes
//! changes on different nodes and shows each reaching every node with its measured propagation
//! time, kills a node with SIGKILL and shows it detected, restarts it and shows it catch up,
//! then removes everything it started (also on Ctrl-C).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use konor_sdk::protocol::{Request, Response, WatchEvent, WriteMeta};
use konor_sdk::{Client, Watch};
use serde_json::{Value, json};

/// How long any step of the demo may take before it gives up with an error.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Gossip period of the demo mesh: short, so detection is quick to watch.
const DEMO_GOSSIP_MS: &str = "100";

/// The processes the demo started; dropping it kills them and removes the temp dir.
struct Demo {
    dir: tempfile::TempDir,
    konord: PathBuf,
    app: PathBuf,
    nodes: Vec<DemoNode>,
    /// The example apps the demo started (the first against group `demo`, then one per node
    /// against `rollout`).
    apps: Vec<Child>,
}

struct DemoNode {
    id: String,
    data: PathBuf,
    tls: PathBuf,
    socket: PathBuf,
    seed: Option<String>,
    child: Option<Child>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().filter_map(|n| n.child.as_mut()).chain(self.apps.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds `name` next to this executable, building the workspace binaries first when run from
/// `cargo run` and they are missing.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate konorctl itself")?;
    let path = exe.with_file_name(name);
    if path.exists() {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO")
        .with_context(|| format!("{} is missing: build it with `cargo build --release --workspace`", path.display()))?;
    println!("building konord and the example app (first run only)...");
    let release = exe.components().any(|c| c.as_os_str() == "release");
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "konor-node", "--bin", "konord", "-p", "konor-examples", "--bin", "konor-app"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().context("cannot run cargo build")?;
    anyhow::ensure!(status.success() && path.exists(), "building {name} failed");
    Ok(path)
}

impl DemoNode {
    fn start(&mut self, konord: &Path) -> anyhow::Result<()> {
        let previous = std::fs::read_to_string(self.data.join(crate::daemon::LISTEN_ADDR_FILE)).unwrap_or_default();
        let listen = if previous.is_empty() { "127.0.0.1:0".to_owned() } else { previous };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data.with_extension("log"))?;
        let mut command = Command::new(konord);
        command
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--node-id", &self.id, "--listen", &listen, "--gossip-interval-ms", DEMO_GOSSIP_MS])
            .arg("--socket")
            .arg(&self.socket)
            .arg("--tls-dir")
            .arg(&self.tls)
            .args(["--label", &format!("demo-index={}", &self.id[1..])])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(seed) = &self.seed {
            command.args(["--seed", seed]);
        }
        self.child = Some(command.spawn().with_context(|| format!("cannot start {}", konord.display()))?);
        Ok(())
    }

    async fn client(&mut self) -> anyhow::Result<Client> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("konord {} exited early ({status}); see {}", self.id, self.data.with_extension("log").display());
            }
            if let Ok(client) = Client::connect(&self.socket).await {
                return Ok(client);
            }
            anyhow::ensure!(Instant::now() < deadline, "konord {} did not answer in time", self.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn addr(&self) -> String {
        std::fs::read_to_string(self.data.join(crate::daemon::LISTEN_ADDR_FILE)).unwrap_or_default()
    }
}

async fn until<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn node_states(client: &Client) -> BTreeMap<String, String> {
    match client.call(Request::Nodes).await {
        Ok(Response::Nodes { nodes }) => nodes.into_iter().map(|n| (n.id, n.state)).collect(),
        _ => BTreeMap::new(),
    }
}

/// Waits on every watch until each has delivered an event holding `key = value`.
async fn seen_everywhere(watches: &mut [Watch], key: &str, value: &Value) -> anyhow::Result<()> {
    for watch in watches.iter_mut() {
        loop {
            let event = tokio::time::timeout(STEP_TIMEOUT, watch.next())
                .await
                .context("a watcher saw nothing in time")?
                .context("a watch ended")??;
            let hit = match &event {
                WatchEvent::Change { set, .. } => set.get(key) == Some(value),
                WatchEvent::Resync { settings, .. } => settings.get(key) == Some(value),
            };
            if hit {
                break;
            }
        }
    }
    Ok(())
}

fn set_request(key: &str, value: Value, message: &str) -> Request {
    Request::Set {
        group: "demo".into(),
        entries: BTreeMap::from([(key.to_owned(), value)]),
        meta: WriteMeta { author: "demo".into(), message: message.into(), ..WriteMeta::default() },
    }
}

/// Runs the demo; Ctrl-C stops it early and still cleans up.
pub async fn run() -> anyhow::Result<()> {
    let konord = binary("konord")?;
    let app = binary("konor-app")?;
    let dir = tempfile::Builder::new().prefix("konor-demo").tempdir().context("cannot create a temp dir")?;
    let mut demo = Demo { dir, konord, app, nodes: Vec::new(), apps: Vec::new() };
    tokio::select! {
        result = script(&mut demo) => result,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted: stopping everything the demo started");
            Ok(())
        }
    }
    // `demo` drops here: processes killed, temp dir removed.
}

async fn script(demo: &mut Demo) -> anyhow::Result<()> {
    let base = demo.dir.path().to_path_buf();
    println!("Konorkestra demo: 3 konord processes on loopback, in {}", base.display());
    let ca = base.join("ca");
    crate::pki::ca::init_ca(&ca)?;
    println!("  created a throw-away cluster CA (konorctl ca init)");
    for n in 1..=3 {
        let id = format!("n{n}");
        let tls = base.join(&id).join("tls");
        crate::pki::ca::issue_node_cert(&ca, &id, &tls)?;
        let node_dir = base.join(&id);
        demo.nodes.push(DemoNode {
            data: node_dir.join("data"),
            socket: node_dir.join("konord.sock"),
            tls,
            id,
            seed: None,
            child: None,
        });
    }
    println!("  issued node certificates for n1, n2, n3 (konorctl cert issue)");
    let konord = demo.konord.clone();
    demo.nodes[0].start(&konord)?;
    let mut clients = vec![demo.nodes[0].client().await?];
    let seed = demo.nodes[0].addr();
    for node in demo.nodes.iter_mut().skip(1) {
        node.seed = Some(seed.clone());
        node.start(&konord)?;
        clients.push(node.client().await?);
    }
    let started = Instant::now();
    for client in &clients {
        until("the mesh to form", || async {
            let states = node_states(client).await;
            (states.len() == 3 && states.values().all(|s| s == "live")).then_some(())
        })
        .await?;
    }
    println!("\n1. mesh: n1, n2, n3 see each other live after {:?} (mutual TLS over QUIC)", started.elapsed());

    let created = clients[0]
        .call(Request::GroupCreate {
            name: "demo".into(),
            mode: "eventual".into(),
            key: None,
            evict_after_ms: None,
            fencing: None,
            release: None,
        })
        .await?;
    let Response::GroupCreated { key, .. } = created else { bail!("unexpected answer: {created:?}") };
    for client in &clients[1..] {
        client.call(Request::GroupJoin { name: "demo".into(), key: key.clone() }).await?;
    }
    for client in &clients {
        until("every node to see every member of the group", || async {
            match client.call(Request::Status { group: "demo".into() }).await {
                Ok(Response::Status { live, .. }) if live.len() == 3 => Some(()),
                _ => None,
            }
        })
        .await?;
    }
    println!("2. group `demo` created on n1 and joined by n2 and n3 with its key (proved by HMAC, never sent)");
    let first = clients[0].call(set_request("greeting", json!("hello"), "first setting")).await?;
    if let Response::Committed { version, .. } = &first {
        println!("   demo@{version}: greeting = \"hello\"");
    }

    let mut app = Command::new(&demo.app)
        .arg("demo")
        .env("KONOR_SOCKET", &demo.nodes[2].socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the example app")?;
    if let Some(stdout) = app.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("   | {line}");
            }
        });
    }
    demo.apps.push(app);
    println!("3. example app (examples/, konor-sdk) started against n3; its output is shown with `|`");
    until("the app to report its first apply", || async {
        match clients[2].call(Request::Status { group: "demo".into() }).await {
            Ok(Response::Status { processes, .. }) if !processes.is_empty() => Some(()),
            _ => None,
        }
    })
    .await
    .ok();

    println!("4. changes on different nodes, each timed until watchers on all three nodes saw it:");
    let changes =
        [(0usize, "workers", json!(8)), (1, "feature.new_checkout", json!(true)), (2, "greeting", json!("hej"))];
    for (writer, key, value) in changes {
        let mut watches = Vec::new();
        for client in &clients {
            watches.push(client.watch("demo", None).await?);
        }
        let started = Instant::now();
        let answer = clients[writer].call(set_request(key, value.clone(), "demo change")).await?;
        let acked = started.elapsed();
        seen_everywhere(&mut watches, key, &value).await?;
        let everywhere = started.elapsed();
        let (version, acked_by) = match answer {
            Response::Committed { version, acked_by, .. } => (version, acked_by.join(",")),
            other => bail!("unexpected answer: {other:?}"),
        };
        println!(
            "   {key} = {value} on n{}: committed demo@{version} (acked by {acked_by}) in {acked:?}, seen on all 3 nodes in {everywhere:?}",
            writer + 1
        );
    }

    println!("5. kill -9 n2 ...");
    let killed = Instant::now();
    if let Some(mut child) = demo.nodes[1].child.take() {
        child.kill()?;
        child.wait()?;
    }
    until("n1 and n3 to mark n2 dead", || async {
        let mut all = true;
        for client in [&clients[0], &clients[2]] {
            all &= node_states(client).await.get("n2").is_some_and(|s| s == "dead");
        }
        all.then_some(())
    })
    .await?;
    println!("   n1 and n3 marked n2 dead after {:?} (phi-accrual failure detector)", killed.elapsed());
    let answer = clients[0].call(set_request("workers", json!(16), "while n2 is down")).await?;
    if let Response::Committed { version, acked_by, .. } = answer {
        println!(
            "   wrote workers = 16 on n1 while n2 is down: demo@{version} committed by the live quorum {acked_by:?}"
        );
    }

    println!("6. restart n2 ...");
    let restarted = Instant::now();
    demo.nodes[1].start(&konord)?;
    clients[1] = demo.nodes[1].client().await?;
    let n2 = clients[1].clone();
    until("n2 to catch up", || async { (n2.get("demo", "workers").await.ok()?? == json!(16)).then_some(()) }).await?;
    println!("   n2 is back and caught up (workers = 16 from its peers) {:?} after restart", restarted.elapsed());

    until("gossip to show every node at the same state", || async {
        match clients[2].call(Request::Status { group: "demo".into() }).await {
            Ok(Response::Status { nodes, .. }) => {
                (nodes.len() == 3 && nodes.iter().all(|n| n.heads == nodes[0].heads)).then_some(())
            }
            _ => None,
        }
    })
    .await?;
    if let Ok(Response::Status { nodes, processes, .. }) =
        clients[2].call(Request::Status { group: "demo".into() }).await
    {
        println!("7. status of group demo as n3 sees it (konorctl status demo):");
        for node in nodes {
            println!(
                "   node {:<4} version {:<6} heads {} revision {} (local to the node)",
                node.node, node.version, node.heads, node.revision
            );
        }
        for process in processes {
            println!(
                "   process {} (pid {}) applied {}: {:?}",
                process.process, process.pid, process.version, process.result
            );
        }
    }
    releases(&clients).await?;
    guards(demo, &clients).await?;
    println!("\ndone: stopping the 3 daemons and the apps, removing {}", base.display());
    Ok(())
}
/// Step 8: a gated group (SPEC F14): a write waits for a release, a release reaches every node,
/// a canary reaches its slice only, and an abort brings every node back.
async fn releases(clients: &[konor_sdk::Client]) -> anyhow::Result<()> {
    let group = "rollout";
    let meta = |message: &str| WriteMeta { author: "demo".into(), message: message.into(), ..WriteMeta::default() };
    let created = clients[0]
        .call(Request::GroupCreate {
            name: group.into(),
            mode: "eventual".into(),
            key: None,
            evict_after_ms: None,
            fencing: None,
            release: Some("gated".into()),
        })
        .await?;
    let Response::GroupCreated { key, .. } = created else { bail!("unexpected answer: {created:?}") };
    for client in &clients[1..] {
        client.call(Request::GroupJoin { name: group.into(), key: key.clone() }).await?;
    }
    let write = |value: Value| Request::Set {
        group: group.into(),
        entries: BTreeMap::from([("limit".to_owned(), value)]),
        meta: meta("demo write"),
    };
    let Response::Committed { version: first, .. } = clients[0].call(write(json!(10))).await? else {
        bail!("the write was not committed")
    };
    until("every node to hold the write", || async {
        let mut all = true;
        for client in clients {
            all &= matches!(client.call(Request::History { group: group.into() }).await,
                Ok(Response::History { versions, .. }) if versions.iter().any(|v| v.label == first));
        }
        all.then_some(())
    })
    .await?;
    for client in clients {
        if client.get(group, "limit").await?.is_some() {
            bail!("a write was served before its release");
        }
    }
    println!("8. gated group `rollout`: limit = 10 written as {group}@{first}, held by every node, served by none");
    let release = |version: &str, strategy: &str, waves: Option<Vec<u8>>| Request::Release {
        group: group.into(),
        version: version.to_owned(),
        strategy: Some(strategy.to_owned()),
        waves,
        selector: None,
        bake_ms: None,
        max_failed: None,
        max_error_rate: None,
        node_health: None,
        meta: meta(&format!("release {version}")),
    };
    let started = Instant::now();
    clients[1].call(release(&first, "all", None)).await?;
    until("every node to serve the release", || served_everywhere(clients, group, json!(10))).await?;
    println!("   release {first} from n2: served on all 3 nodes in {:?}", started.elapsed());
    let Response::Committed { version: next, .. } = clients[0].call(write(json!(20))).await? else {
        bail!("the write was not committed")
    };
    let canary_release = release(&next, "canary", Some(vec![50, 100]));
    let Response::Committed { version: canary, .. } = clients[0].call(canary_release).await? else {
        bail!("the canary was not committed")
    };
    let mut slice = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let here = until("every node to know the canary", || async {
            match client.call(Request::Status { group: group.into() }).await {
                Ok(Response::Status { release: Some(state), .. }) => {
                    let current = state.current.filter(|c| c.label == canary)?;
                    let served = client.get(group, "limit").await.ok()??;
                    (served == json!(if current.here { 20 } else { 10 })).then_some(current.here)
                }
                _ => None,
            }
        })
        .await?;
        if here {
            slice.push(format!("n{}", index + 1));
        }
    }
    println!(
        "   canary {canary}: {next} (limit = 20) to 50% of the nodes; each node works out alone whether it is in: [{}]",
        slice.join(", ")
    );
    clients[2]
        .call(Request::Abort { group: group.into(), reason: Some("demo abort".into()), meta: meta("abort") })
        .await?;
    until("every node to serve limit = 10 again", || served_everywhere(clients, group, json!(10))).await?;
    println!("   abort from n3: every node serves {first} (limit = 10) again");
    Ok(())
}

/// Step 9: guards (SPEC F15, F28). The example app runs against `rollout` on every node, n3's
/// copy accepting at most 16 workers: a canary with a one-second bake is promoted by the
/// members themselves, and a release n3's app refuses is rolled back by them everywhere.
async fn guards(demo: &mut Demo, clients: &[konor_sdk::Client]) -> anyhow::Result<()> {
    let group = "rollout";
    for (index, node) in demo.nodes.iter().enumerate() {
        let mut app = Command::new(&demo.app);
        app.arg(group).env("KONOR_SOCKET", &node.socket).stdout(Stdio::null()).stderr(Stdio::null());
        if index == 2 {
            app.env("KONOR_APP_MAX_WORKERS", "16");
        }
        demo.apps.push(app.spawn().context("cannot start the example app")?);
    }
    until("the apps to report their start", || async {
        match clients[0].call(Request::Status { group: group.into() }).await {
            Ok(Response::Status { processes, .. }) => {
                (processes.iter().filter(|p| p.gone_ms.is_none() && p.process == "konor-app").count() == 3)
                    .then_some(())
            }
            _ => None,
        }
    })
    .await?;
    println!("9. guards: the example app runs against `rollout` on every node; n3's copy takes at most 16 workers");
    let meta = |message: &str| WriteMeta { author: "demo".into(), message: message.into(), ..WriteMeta::default() };
    let write = |workers: u32| Request::Set {
        group: group.into(),
        entries: BTreeMap::from([("workers".to_owned(), json!(workers))]),
        meta: meta("demo write"),
    };
    let release = |version: &str, waves: Option<Vec<u8>>, bake_ms: Option<u64>| Request::Release {
        group: group.into(),
        version: version.to_owned(),
        strategy: Some(if waves.is_some() { "canary" } else { "all" }.to_owned()),
        waves,
        selector: None,
        bake_ms,
        max_failed: None,
        max_error_rate: None,
        node_health: None,
        meta: meta(&format!("release {version}")),
    };
    let Response::Committed { version: good, .. } = clients[0].call(write(8)).await? else {
        bail!("the write was not committed")
    };
    let started = Instant::now();
    let Response::Committed { version: canary, .. } =
        clients[0].call(release(&good, Some(vec![50, 100]), Some(1_000))).await?
    else {
        bail!("the canary was not committed")
    };
    let report = until("the members to promote the canary and every app to apply it", || async {
        let report = newest_release(&clients[1], group).await?;
        (report.release.label == canary && report.outcome == "complete").then_some(report)
    })
    .await?;
    println!(
        "   canary {canary}: {good} (workers = 8) to 50% with a 1s bake; the members promoted it to every node by \
         themselves after {:?}",
        started.elapsed()
    );
    println!("   release status: {}", crate::ctl::release_text::progress_line(&report));
    let Response::Committed { version: bad, .. } = clients[1].call(write(32)).await? else {
        bail!("the write was not committed")
    };
    let started = Instant::now();
    let Response::Committed { version: refused, .. } = clients[1].call(release(&bad, None, None)).await? else {
        bail!("the release was not committed")
    };
    let report = until("the members to roll the release back", || async {
        let report = newest_release(&clients[0], group).await?;
        (report.release.label == refused && report.outcome == "aborted").then_some(report)
    })
    .await?;
    println!(
        "   release {refused}: {bad} (workers = 32) to all; n3's app refused it and the members rolled it back after {:?}:",
        started.elapsed()
    );
    println!("     {}", report.release.aborted.as_deref().unwrap_or_default());
    until("every node to serve workers = 8 again", || async {
        for client in clients {
            if client.get(group, "workers").await.ok()?? != json!(8) {
                return None;
            }
        }
        Some(())
    })
    .await?;
    // Each node's processes reach the others through gossip, a second or so behind the abort.
    let report = until("n1 to hear of n3's refusal", || async {
        match clients[0]
            .call(Request::ReleaseReport { group: group.into(), limit: None, release: Some(refused.clone()) })
            .await
        {
            Ok(Response::ReleaseReport { releases, .. }) => {
                releases.into_iter().find(|report| report.release.label == refused && report.processes_failed > 0)
            }
            _ => None,
        }
    })
    .await?;
    println!(
        "   every node serves {good} (workers = 8) again; release status of {refused} on n1: {}",
        crate::ctl::release_text::progress_line(&report)
    );
    println!("   (konorctl release report rollout --format csv exports every node's and app's result per release)");
    Ok(())
}

/// The newest release of `group` with every member's and process's state, as `client`'s node
/// sees it.
async fn newest_release(client: &konor_sdk::Client, group: &str) -> Option<konor_sdk::protocol::ReleaseReport> {
    match client.call(Request::ReleaseReport { group: group.into(), limit: None, release: None }).await {
        Ok(Response::ReleaseReport { mut releases, .. }) if !releases.is_empty() => Some(releases.remove(0)),
        _ => None,
    }
}

/// `Some` once every node serves `limit = expected` in `group`.
async fn served_everywhere(clients: &[konor_sdk::Client], group: &str, expected: Value) -> Option<()> {
    for client in clients {
        if client.get(group, "limit").await.ok()?? != expected {
            return None;
        }
    }
    Some(())
}
