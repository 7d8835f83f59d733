//! Removing what a run left: `konor-chaos cleanup` after a killed run, and a run that reuses
//! a seed's run dir. Everything is found by the suite's names: namespaces, veths and bridges by
//! their prefixes (lab.rs), tmpfs mounts by their source name, and processes by their namespace
//! or by the pid file of a run dir.

use std::path::Path;
use std::process::Command;

/// Removes what killed runs left: kills every process inside a suite namespace, unmounts the
/// suite's tmpfs mounts, deletes veths, then namespaces, then bridges with the suite's
/// prefixes. Returns what it removed, one line each.
pub fn cleanup_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    let namespaces: Vec<String> = command_lines("ip", &["netns", "list"])
        .into_iter()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .filter(|name| name.starts_with(crate::lab::NAMESPACE_PREFIX))
        .collect();
    for namespace in &namespaces {
        for pid in command_lines("ip", &["netns", "pids", namespace]) {
            crate::lab::run_quietly("kill", &["-KILL", pid.trim()]);
            removed.push(format!("process {} in {namespace}", pid.trim()));
        }
    }
    for mount in suite_mounts() {
        crate::lab::run_quietly("umount", &["-l", &mount]);
        removed.push(format!("tmpfs {mount}"));
    }
    let links: Vec<String> = command_lines("ip", &["-o", "link", "show"])
        .into_iter()
        .filter_map(|line| line.split(": ").nth(1).map(|name| name.split('@').next().unwrap_or(name).to_owned()))
        .collect();
    for veth in links.iter().filter(|name| name.starts_with(crate::lab::VETH_PREFIX)) {
        crate::lab::run_quietly("ip", &["link", "del", veth]);
        removed.push(format!("veth {veth}"));
    }
    for namespace in &namespaces {
        crate::lab::run_quietly("ip", &["netns", "del", namespace]);
        removed.push(format!("namespace {namespace}"));
    }
    for bridge in links.iter().filter(|name| name.starts_with(crate::lab::BRIDGE_PREFIX)) {
        crate::lab::run_quietly("ip", &["link", "del", bridge]);
        removed.push(format!("bridge {bridge}"));
    }
    removed
}

/// The lines a command prints (none when it fails).
fn command_lines(program: &str, args: &[&str]) -> Vec<String> {
    match Command::new(program).args(args).output() {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).filter(|l| !l.is_empty()).collect()
        }
        _ => Vec::new(),
    }
}

/// Kills the konord processes a run dir's pid file lists (only processes that still are konord,
/// so a reused pid is left alone); returns the pids killed.
pub fn kill_listed(run_dir: &Path) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(run_dir.join(crate::cluster::PID_FILE)) else { return Vec::new() };
    let mut killed = Vec::new();
    for pid in text.lines().filter_map(|line| line.trim().parse::<u32>().ok()) {
        let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&command_line).contains("konord") {
            crate::lab::run_quietly("kill", &["-KILL", &pid.to_string()]);
            killed.push(pid);
        }
    }
    let _ = std::fs::remove_file(run_dir.join(crate::cluster::PID_FILE));
    killed
}

/// Mount points of the suite's tmpfs mounts still mounted (from /proc/mounts).
pub fn suite_mounts() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let source = fields.next()?;
            let target = fields.next()?;
            (source == crate::cluster::TMPFS_SOURCE).then(|| target.replace("\\040", " "))
        })
        .collect()
}
