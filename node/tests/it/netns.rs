//! Network namespaces on a bridge, for real partitions between real konord processes
//! (FACTS, "Chaos on one machine"): one namespace per node, a veth pair into a bridge that has no
//! address of its own, and nftables rules inside a namespace to cut it off. Names carry the test
//! process's id, so tests running side by side never share one; every address lives only inside
//! the namespaces. Dropping a `Netns` deletes each veth before its namespace, then the bridge.

use std::process::{Command, Stdio};

/// The nftables table that holds a namespace's partition rules.
const CUT_TABLE: &str = "konor_cut";

/// Namespaces `count` long, each with one address on a shared bridge.
pub struct Netns {
    names: Vec<String>,
    veths: Vec<String>,
    bridge: String,
}

/// Why namespaces are not available here.
pub fn unavailable() -> Option<String> {
    let root = Command::new("id").arg("-u").output().ok().is_some_and(|out| out.stdout.starts_with(b"0\n"));
    if !root {
        return Some("not root".to_owned());
    }
    for tool in ["ip", "nft"] {
        let found = Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        if !found {
            return Some(format!("`{tool}` is not installed (Debian: iproute2, nftables)"));
        }
    }
    None
}

fn run(args: &[&str]) -> Result<(), String> {
    let output = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{args:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?}: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn run_with_input(args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{args:?}: {e}"))?;
    child.stdin.take().ok_or("no stdin")?.write_all(input.as_bytes()).map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?}: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

impl Netns {
    /// Creates `count` namespaces on one bridge; node `i` gets [`Netns::ip`]`(i)`.
    pub fn create(count: usize) -> Result<Netns, String> {
        let pid = std::process::id();
        let mut netns = Netns { names: Vec::new(), veths: Vec::new(), bridge: format!("kb{pid}") };
        run(&["ip", "link", "add", &netns.bridge, "type", "bridge"])?;
        run(&["ip", "link", "set", &netns.bridge, "up"])?;
        for index in 0..count {
            let name = format!("konor-{pid}-{index}");
            let veth = format!("kv{pid}x{index}");
            run(&["ip", "netns", "add", &name])?;
            netns.names.push(name.clone());
            run(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name])?;
            netns.veths.push(veth.clone());
            run(&["ip", "link", "set", &veth, "master", &netns.bridge])?;
            run(&["ip", "link", "set", &veth, "up"])?;
            run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &name, "addr", "add", &format!("{}/24", Netns::ip(index)), "dev", "eth0"])?;
            run(&["ip", "-n", &name, "link", "set", "eth0", "up"])?;
        }
        Ok(netns)
    }

    /// Node `index`'s address (inside its namespace only).
    pub fn ip(index: usize) -> String {
        format!("10.231.0.{}", index + 1)
    }

    /// Namespace `index`'s name.
    pub fn name(&self, index: usize) -> &str {
        &self.names[index]
    }

    /// Cuts node `index` off from `peers`, both ways (nftables in its namespace).
    pub fn cut(&self, index: usize, peers: &[usize]) -> Result<(), String> {
        let addresses = peers.iter().map(|&peer| Netns::ip(peer)).collect::<Vec<_>>().join(", ");
        let rules = format!(
            "table inet {CUT_TABLE} {{\n\
             chain in {{ type filter hook input priority 0; policy accept; ip saddr {{ {addresses} }} drop; }}\n\
             chain out {{ type filter hook output priority 0; policy accept; ip daddr {{ {addresses} }} drop; }}\n\
             }}\n"
        );
        run_with_input(&["ip", "netns", "exec", self.name(index), "nft", "-f", "-"], &rules)
    }

    /// Removes node `index`'s cut.
    pub fn heal(&self, index: usize) -> Result<(), String> {
        run(&["ip", "netns", "exec", self.name(index), "nft", "delete", "table", "inet", CUT_TABLE])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Each veth before its namespace: deleting a namespace first can leave the host end.
        for veth in &self.veths {
            let _ = run(&["ip", "link", "del", veth]);
        }
        for name in &self.names {
            let _ = run(&["ip", "netns", "del", name]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
