//! Workload clients on the Python SDK (`chaos/py_client.py`, package `konorkestra` from
//! `sdk/python/src`): one process each, doing what workload.rs's clients do, printing each
//! operation as a history `op` line timed on the run's clock (CLOCK_MONOTONIC minus the
//! recorder's zero). A thread per process copies the lines into the history. They stop on
//! SIGTERM after the operation in flight, and exit on their own if the runner dies.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::history::Record;
use crate::record::Recorder;

/// The client script, beside this crate's sources.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py_client.py");

/// The Python SDK's sources, put on the clients' PYTHONPATH.
const SDK_SOURCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../sdk/python/src");

/// One client to start: its number (values `c<number>-<seq>`), node id and socket.
pub struct PythonClient {
    /// Client number, after the Rust clients' numbers.
    pub number: u32,
    /// Node id.
    pub node: String,
    /// The node's socket.
    pub socket: PathBuf,
}

/// The running clients. Dropping them kills what is left.
pub struct PythonClients {
    running: Vec<(Child, JoinHandle<()>)>,
}

impl PythonClients {
    /// Starts `clients`, each logging its stderr to `run_dir/pyclient-N.log`.
    pub fn start(
        clients: &[PythonClient],
        groups: &[String],
        seed: u64,
        recorder: &Recorder,
        run_dir: &Path,
    ) -> anyhow::Result<PythonClients> {
        let mut running = Vec::new();
        for client in clients {
            let log = std::fs::File::create(run_dir.join(format!("pyclient-{}.log", client.number)))?;
            let mut child = Command::new("python3")
                .arg(SCRIPT)
                .args(["--node", &client.node, "--client", &client.number.to_string()])
                .args(["--seed", &seed.to_string(), "--groups", &groups.join(",")])
                .arg("--socket")
                .arg(&client.socket)
                .env("PYTHONPATH", SDK_SOURCES)
                .env("KONOR_CHAOS_ZERO_NS", recorder.zero_monotonic_ns().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .context("starting a Python client (python3 on PATH? or --python-clients-per-node 0)")?;
            let stdout = child.stdout.take().context("the Python client's stdout")?;
            let (recorder, number) = (recorder.clone(), client.number);
            let copier = std::thread::spawn(move || copy_records(BufReader::new(stdout), &recorder, number));
            running.push((child, copier));
        }
        Ok(PythonClients { running })
    }

    /// Stops every client (SIGTERM: each ends after its operation in flight) and waits until
    /// their last lines are in the history, at most `patience`; the rest are killed.
    pub async fn stop(mut self, patience: Duration) -> anyhow::Result<()> {
        let pids: Vec<String> = self.running.iter().map(|(child, _)| child.id().to_string()).collect();
        for pid in &pids {
            crate::lab::run_quietly("kill", &["-TERM", pid]);
        }
        let running = std::mem::take(&mut self.running);
        let waited = tokio::time::timeout(
            patience,
            tokio::task::spawn_blocking(move || {
                for (mut child, copier) in running {
                    let _ = child.wait();
                    let _ = copier.join();
                }
            }),
        )
        .await;
        if waited.is_err() {
            // The waiting thread still holds the children: kill them by pid, so they end and it
            // can reap them.
            for pid in &pids {
                crate::lab::run_quietly("kill", &["-KILL", pid]);
            }
            anyhow::bail!("Python clients did not stop within {patience:?}; killed");
        }
        Ok(())
    }
}

impl Drop for PythonClients {
    fn drop(&mut self) {
        for (child, _) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Copies a client's `op` lines into the history. A line that is not an `op` record is a bug in
/// the client: logged, and left out (the checker then misses one operation, never invents one).
fn copy_records(lines: impl BufRead, recorder: &Recorder, number: u32) {
    for line in lines.lines() {
        let Ok(line) = line else { return };
        match serde_json::from_str::<Record>(&line) {
            Ok(record @ Record::Op(_)) => {
                if let Err(error) = recorder.write(&record) {
                    tracing::error!(%error, number, "cannot write the history; Python client's records stop");
                    return;
                }
            }
            Ok(_) | Err(_) => {
                tracing::error!(number, line, "a Python client printed something that is not an op record")
            }
        }
    }
}
