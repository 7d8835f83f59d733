//! The run's network: one namespace per node on a private Linux bridge, wired by veth pairs,
//! with every fault a set of nftables rules in one table per namespace (FACTS, "Chaos on one
//! machine": this kernel has no netem, so loss comes from `numgen random`, and there is no
//! delay, reordering or duplication).
//!
//! Every address lives inside the namespaces (the bridge in the root namespace has none), so
//! nothing here touches an address outside the lab. Names start with [`NAMESPACE_PREFIX`],
//! [`VETH_PREFIX`] and [`BRIDGE_PREFIX`] and carry the runner's pid, so `konor-chaos cleanup`
//! finds what a killed run left. Dropping the lab removes it: each veth before its namespace
//! (deleting the namespace first can leave the host-side end behind), then the bridge.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// Namespace names: `konor-chaos-<tag>-<n>`.
pub const NAMESPACE_PREFIX: &str = "konor-chaos-";
/// Host-side veth ends: `kcv-<tag>-<n>` (interface names are at most 15 bytes).
pub const VETH_PREFIX: &str = "kcv-";
/// Bridges: `kcb-<tag>`.
pub const BRIDGE_PREFIX: &str = "kcb-";

/// The /24 inside the namespaces; another lab's bridge never sees it.
const SUBNET_PREFIX: [u8; 3] = [10, 214, 0];

/// The one nftables table a fault writes in a namespace; healing deletes it whole.
const FAULT_TABLE: &str = "konor_chaos";

/// Labs this process made (a sweep makes one per seed, one after the other).
static LABS_MADE: AtomicU32 = AtomicU32::new(0);

/// One namespace of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// `ip netns` name.
    pub namespace: String,
    /// Host-side veth end, on the bridge; `eth0` inside.
    pub veth: String,
    /// Its address.
    pub address: Ipv4Addr,
}

/// A bridge with one namespace per node.
pub struct Lab {
    bridge: String,
    hosts: Vec<Host>,
}

/// Runs a command; an error names it and says what it printed.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program).args(args).output().with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Runs a command during cleanup: the object may be gone already, so failures are ignored.
pub fn run_quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Fails, listing everything missing at once, unless the machine has root, `ip` and `nft`.
pub fn require_root_and_tools() -> anyhow::Result<()> {
    let missing = konor_chaos::requirement::missing_requirements();
    if missing.is_empty() {
        return Ok(());
    }
    bail!("konor-chaos runs konord in network namespaces and needs: {}", missing.join(", "))
}

impl Lab {
    /// A bridge and `count` namespaces on it, addresses 10.214.0.1 upwards, every link up.
    /// On an error, what was made so far is removed.
    pub fn new(count: usize) -> anyhow::Result<Lab> {
        require_root_and_tools()?;
        if !(1..=200).contains(&count) {
            bail!("a lab holds 1 to 200 hosts, not {count}");
        }
        let index = LABS_MADE.fetch_add(1, Ordering::Relaxed) & 0xf;
        let tag = format!("{:x}", (std::process::id() << 4) | index);
        let mut lab = Lab { bridge: format!("{BRIDGE_PREFIX}{tag}"), hosts: Vec::new() };
        run("ip", &["link", "add", &lab.bridge, "type", "bridge"])?;
        run("ip", &["link", "set", &lab.bridge, "up"])?;
        for n in 1..=count {
            let host = Host {
                namespace: format!("{NAMESPACE_PREFIX}{tag}-{n}"),
                veth: format!("{VETH_PREFIX}{tag}-{n}"),
                address: Ipv4Addr::new(SUBNET_PREFIX[0], SUBNET_PREFIX[1], SUBNET_PREFIX[2], n as u8),
            };
            // Pushed before it exists: the drop then removes a half-made host too.
            lab.hosts.push(host.clone());
            run("ip", &["netns", "add", &host.namespace])?;
            run("ip", &["link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", &host.namespace])?;
            run("ip", &["link", "set", &host.veth, "master", &lab.bridge])?;
            run("ip", &["link", "set", &host.veth, "up"])?;
            run("ip", &["-n", &host.namespace, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &host.namespace, "addr", "add", &format!("{}/24", host.address), "dev", "eth0"])?;
            run("ip", &["-n", &host.namespace, "link", "set", "eth0", "up"])?;
        }
        Ok(lab)
    }

    /// The hosts, node 1 first.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Cuts the lab into `sides` (host indexes): a host drops all traffic to and from every host
    /// of the other sides. Hosts in no side keep talking to everyone. Replaces any fault.
    pub fn partition(&self, sides: &[Vec<usize>]) -> anyhow::Result<()> {
        self.heal();
        for (side_index, side) in sides.iter().enumerate() {
            let others: Vec<usize> = sides
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != side_index)
                .flat_map(|(_, hosts)| hosts.iter().copied())
                .collect();
            for host in side {
                self.drop_traffic(*host, &others, true, true)?;
            }
        }
        Ok(())
    }

    /// Two sides that do not see each other, and a third host that sees both.
    pub fn bridge_partition(&self, left: &[usize], right: &[usize]) -> anyhow::Result<()> {
        self.heal();
        for host in left {
            self.drop_traffic(*host, right, true, true)?;
        }
        for host in right {
            self.drop_traffic(*host, left, true, true)?;
        }
        Ok(())
    }

    /// Packets from `from` to `to` are dropped as they leave `from`; the other direction flows.
    pub fn one_way(&self, from: usize, to: usize) -> anyhow::Result<()> {
        self.heal();
        self.drop_traffic(from, &[to], false, true)
    }

    /// `percent` of the packets leaving host `index` on its `eth0` are dropped at random.
    pub fn egress_loss(&self, index: usize, percent: u32) -> anyhow::Result<()> {
        self.heal();
        let rules = format!(
            "table inet {FAULT_TABLE} {{\n\
             \x20 chain out {{ type filter hook output priority 0; policy accept; \
             oifname \"eth0\" numgen random mod 100 < {percent} drop; }}\n}}\n"
        );
        self.nft_script(index, &rules)
    }

    /// Removes every fault rule in every namespace.
    pub fn heal(&self) {
        for host in &self.hosts {
            run_quietly("ip", &["netns", "exec", &host.namespace, "nft", "delete", "table", "inet", FAULT_TABLE]);
        }
    }

    /// In host `index`, drops traffic from (`input`) and to (`output`) the hosts `others`.
    fn drop_traffic(&self, index: usize, others: &[usize], input: bool, output: bool) -> anyhow::Result<()> {
        if others.is_empty() {
            return Ok(());
        }
        let set = others.iter().map(|h| self.hosts[*h].address.to_string()).collect::<Vec<_>>().join(", ");
        let mut rules = format!("table inet {FAULT_TABLE} {{\n");
        if input {
            rules.push_str(&format!(
                "  chain in {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n"
            ));
        }
        if output {
            rules.push_str(&format!(
                "  chain out {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n"
            ));
        }
        rules.push_str("}\n");
        self.nft_script(index, &rules)
    }

    fn nft_script(&self, index: usize, script: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let namespace = &self.hosts[index].namespace;
        let mut child = Command::new("ip")
            .args(["netns", "exec", namespace, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).context("writing to nft")?;
        }
        let output = child.wait_with_output().context("waiting for nft")?;
        if !output.status.success() {
            bail!("nft in {namespace} refused:\n{script}\n{}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The nodes' processes are gone by now (the cluster drops first): a namespace with a
        // process in it outlives `ip netns del`.
        for host in &self.hosts {
            run_quietly("ip", &["link", "del", &host.veth]);
            run_quietly("ip", &["netns", "del", &host.namespace]);
        }
        run_quietly("ip", &["link", "del", &self.bridge]);
    }
}
