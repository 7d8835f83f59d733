//! konor-app: an example application configured live by Konorkestra. It prints its settings
//! at start, reloads them whenever they change (reporting success or failure to its daemon, so
//! `konorctl status` shows which version it runs), and serves hot reads from the SDK's cache.
//!
//! Usage: `KONOR_SOCKET=/path/to/konord.sock konor-app [GROUP]` (default group `demo`).
//! `KONOR_APP_MAX_WORKERS=N` (default 64) is the most `workers` this instance accepts: a
//! reload asking for more fails, which a gated group's release guard turns into a rollback.

use std::time::Instant;

use konor_sdk::{Client, WatchEvent};
use serde::Deserialize;

/// The shape this app expects; unknown keys are ignored, missing ones take defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AppConfig {
    greeting: String,
    workers: u32,
    feature: Features,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Features {
    new_checkout: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let group = std::env::args().nth(1).unwrap_or_else(|| "demo".to_owned());
    let max_workers: u32 = match std::env::var("KONOR_APP_MAX_WORKERS") {
        Ok(text) => text.parse().map_err(|_| anyhow::anyhow!("KONOR_APP_MAX_WORKERS={text:?} is not a count"))?,
        Err(_) => 64,
    };
    let client = Client::connect_default().await?;
    let node = client.node_id();
    let snapshot = client.snapshot(&group).await?;
    let config: AppConfig = snapshot.typed()?;
    println!("[konor-app on {node}] started with {}: {config:?}", snapshot.freshness.version);
    let cache = client.cached(&group).await?;
    let reloads = client
        .on_change(&group, move |event, settings| {
            let config: AppConfig = konor_sdk::nest_settings(settings)
                .and_then(|nested| {
                    serde_json::from_value(nested).map_err(|e| konor_sdk::SdkError::Protocol(e.to_string()))
                })
                .map_err(|e| format!("config does not fit the app: {e}"))?;
            if config.workers > max_workers {
                // The app refuses settings it cannot run with; the daemon records the refusal.
                return Err(format!("workers = {} is more than this app supports ({max_workers})", config.workers));
            }
            match event {
                WatchEvent::Change { version, revision, .. } => {
                    println!("[konor-app on {node}] reloaded {version} (revision {revision}): {config:?}")
                }
                WatchEvent::Resync { version, .. } => {
                    println!("[konor-app on {node}] resynced to {version}: {config:?}")
                }
            }
            Ok(())
        })
        .await?;
    // Hot reads come from memory: measure a few to show it.
    let started = Instant::now();
    let mut hits = 0u32;
    for _ in 0..100_000 {
        hits += u32::from(cache.get("greeting").is_some());
    }
    let per_read = started.elapsed() / 100_000;
    println!("[konor-app] cached read: {per_read:?} per get ({hits} hits)");
    // Run until stopped; the SDK reconnects and resumes by itself if the daemon restarts.
    tokio::signal::ctrl_c().await?;
    reloads.stop();
    Ok(())
}
