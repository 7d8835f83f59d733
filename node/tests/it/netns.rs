//! Real network faults on one machine, for the end-to-end fault tests: each node gets its own
//! network namespace, wired to a private Linux bridge by a veth pair, and partitions are
//! nftables drop rules inside the namespaces (FACTS, "Chaos on one machine"; this kernel has no
//! netem, so no delay or loss from `tc`). Without root, `ip` or `nft` a test fails, naming what is
//! missing: these tests are evidence, and a silent skip would hide that they did not run.
//!
//! Every address lives inside the namespaces only (the bridge in the root namespace has none),
//! so no packet ever leaves for anywhere else. Names carry the test process's pid and a counter,
//! so parallel test processes (and several labs in one process) never clash. Everything is
//! removed on drop, also when a test panics: each veth before its namespace (deleting the
//! namespace first can leave the host-side end behind), then the bridge.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The /24 every lab uses inside its namespaces. Labs do not share a bridge, so two labs with
/// the same addresses never see each other.
const SUBNET_PREFIX: [u8; 3] = [10, 213, 0];

/// The nftables table that holds a namespace's partition rules: one table, deleted whole to heal.
const PARTITION_TABLE: &str = "konor_partition";

/// Labs made by this process so far: part of every name, with the pid.
static LABS_MADE: AtomicU32 = AtomicU32::new(0);

/// Labs one process may make: the counter takes the low 6 bits of a name's tag (interface names
/// are at most 15 bytes), so a 65th lab would reuse the first one's names.
const LABS_PER_PROCESS_MAX: u32 = 64;

/// One namespace on the lab's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    /// Network namespace name (`ip netns`).
    pub namespace: String,
    /// The host-side end of its veth pair (on the bridge); the other end is `eth0` inside.
    pub veth: String,
    /// Its address on the bridge.
    pub address: Ipv4Addr,
}

/// A bridge with `count` namespaces on it.
pub struct NetnsLab {
    bridge: String,
    hosts: Vec<Host>,
}

/// The uid this test process runs as.
fn uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// Fails the test, saying why, unless it runs as root (mounts, namespaces and firewall rules
/// need it). These tests are evidence: a silent skip would hide that they did not run.
pub fn require_root() {
    let uid = uid();
    assert!(uid == 0, "this test needs root (it mounts a tmpfs); running as uid {uid}: run the tests as root");
}

/// Fails the test, with what it needs, unless it runs as root with `ip` and `nft` installed.
pub fn require_root_and_tools() {
    let uid = uid();
    let has = |tool: &str, flag: &str| Command::new(tool).arg(flag).output().is_ok_and(|out| out.status.success());
    let mut missing = Vec::new();
    if uid != 0 {
        missing.push(format!("root (running as uid {uid})"));
    }
    if !has("ip", "-V") {
        missing.push("`ip` from iproute2 (apt-get install iproute2)".to_owned());
    }
    if !has("nft", "--version") {
        missing.push("`nft` from nftables (apt-get install nftables)".to_owned());
    }
    assert!(
        missing.is_empty(),
        "this test runs konord in network namespaces and needs: {}; run the tests as root on Linux \
         with iproute2 and nftables installed (.ci/run installs them)",
        missing.join(", ")
    );
}

/// Runs a command and fails the test, naming it, if it does not succeed.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Runs a command during cleanup: failures are ignored (the object may already be gone).
fn run_quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

impl NetnsLab {
    /// Creates a bridge and `count` namespaces on it, addresses 10.213.0.1 upwards, all links up.
    pub fn new(count: usize) -> NetnsLab {
        require_root_and_tools();
        assert!((1..=200).contains(&count), "a lab holds 1 to 200 hosts");
        let lab_index = LABS_MADE.fetch_add(1, Ordering::Relaxed);
        assert!(lab_index < LABS_PER_PROCESS_MAX, "one process made {LABS_PER_PROCESS_MAX} labs: names would repeat");
        let tag = format!("{:x}", (std::process::id() << 6) | lab_index);
        // Interface names are at most 15 bytes: "kob-" + 7 hex digits for the bridge and
        // "kov-" + 7 hex + "-" + up to 3 digits for the veths.
        let mut lab = NetnsLab { bridge: format!("kob-{tag}"), hosts: Vec::new() };
        run("ip", &["link", "add", &lab.bridge, "type", "bridge"]);
        run("ip", &["link", "set", &lab.bridge, "up"]);
        for index in 0..count {
            let host = Host {
                namespace: format!("konor-it-{tag}-{}", index + 1),
                veth: format!("kov-{tag}-{}", index + 1),
                address: Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], SUBNET_PREFIX[2], index as u8 + 1),
            };
            // Pushed before it exists: cleanup then covers a half-made host too.
            lab.hosts.push(host.clone());
            run("ip", &["netns", "add", &host.namespace]);
            run("ip", &["link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", &host.namespace]);
            run("ip", &["link", "set", &host.veth, "master", &lab.bridge]);
            run("ip", &["link", "set", &host.veth, "up"]);
            run("ip", &["-n", &host.namespace, "link", "set", "lo", "up"]);
            run("ip", &["-n", &host.namespace, "addr", "add", &format!("{}/24", host.address), "dev", "eth0"]);
            run("ip", &["-n", &host.namespace, "link", "set", "eth0", "up"]);
        }
        lab
    }

    /// The hosts, in creation order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The command prefix that runs a program inside host `index`'s namespace.
    pub fn launcher(&self, index: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.hosts[index].namespace.clone()]
    }

    /// Cuts the lab into `sides` (host indexes): every host drops all traffic to and from the
    /// hosts of the other sides, both ways. Replaces any earlier partition.
    pub fn partition(&self, sides: &[&[usize]]) {
        self.heal();
        for (side_index, side) in sides.iter().enumerate() {
            let others: Vec<String> = sides
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != side_index)
                .flat_map(|(_, hosts)| hosts.iter().map(|h| self.hosts[*h].address.to_string()))
                .collect();
            if others.is_empty() {
                continue;
            }
            let set = others.join(", ");
            let rules = format!(
                "table inet {PARTITION_TABLE} {{\n\
                 \x20 chain in {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
                 \x20 chain out {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n\
                 }}\n"
            );
            for host in side.iter() {
                self.nft_script(&self.hosts[*host].namespace, &rules);
            }
        }
    }

    /// Removes every partition rule: all hosts reach each other again.
    pub fn heal(&self) {
        for host in &self.hosts {
            run_quietly("ip", &["netns", "exec", &host.namespace, "nft", "delete", "table", "inet", PARTITION_TABLE]);
        }
    }

    /// A hard cut of one host: its `eth0` goes down.
    #[allow(dead_code, reason = "a fault for the chaos suite; the tests here partition with nftables")]
    pub fn link_down(&self, index: usize) {
        run("ip", &["-n", &self.hosts[index].namespace, "link", "set", "eth0", "down"]);
    }

    /// Undoes [`NetnsLab::link_down`].
    #[allow(dead_code, reason = "a fault for the chaos suite; the tests here partition with nftables")]
    pub fn link_up(&self, index: usize) {
        run("ip", &["-n", &self.hosts[index].namespace, "link", "set", "eth0", "up"]);
    }

    fn nft_script(&self, namespace: &str, script: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", namespace, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot run nft");
        child.stdin.take().expect("piped").write_all(script.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "nft in {namespace} refused:\n{script}\n{}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        // Processes started in the namespaces must be gone before this runs (a namespace with
        // a process in it outlives `ip netns del`); the mesh helpers drop their nodes first.
        for host in &self.hosts {
            run_quietly("ip", &["link", "del", &host.veth]);
            run_quietly("ip", &["netns", "del", &host.namespace]);
        }
        run_quietly("ip", &["link", "del", &self.bridge]);
    }
}
