//! What a chaos run needs from the machine (root, `ip`, `nft`), checked before anything is
//! made, by the runner and by the smoke test alike.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

/// What is missing for a run, each with how to get it; empty when nothing is.
pub fn missing_requirements() -> Vec<String> {
    let uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
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
    missing
}
