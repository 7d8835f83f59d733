//! konorctl: the Konorkestra operator CLI. It talks to the local konord over its Unix socket
//! (`--socket PATH`, else `KONOR_SOCKET`), or to any node's HTTP API (`--endpoint URL`, else
//! `KONOR_ENDPOINT`, with `--tls-dir`), and runs PKI commands locally; the work is in
//! `konor_node::ctl`.
//!
//! Exit codes (also shown by `konorctl --help`):
//! - 0: ok; also a write that changed nothing (`no change: ...`), so scripts can re-run writes.
//! - 1: konord refused the request or could not commit it: bad input, unknown group, key or
//!   version not found, wrong group key, no peer available, write not committed (busy, round
//!   aborted, or no live quorum acknowledged it); also `get GROUP KEY` when KEY is unset.
//! - 2: usage error: unknown flag, missing argument, malformed `KEY=VALUE`.
//! - 3: the outcome is unknown: konord cannot be reached (no socket given, connect failed, no
//!   answer in time, connection lost), or a strong write's commit could not be confirmed.
//! - 4: PKI or file error: CA or certificate files, the file given to `apply`.
//! - 5: internal error: konord failed internally, konorctl and konord do not understand each
//!   other, or a bug.

use std::process::ExitCode;

use clap::Parser;
use konor_node::ctl::cli::Cli;
use konor_node::ctl::exit::{Exit, exit_for_error, render_error};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Usage errors exit here with clap's code 2 (and `--help` with 0).
    let cli = Cli::parse();
    // Quiet by default: the output is the answer. KONOR_LOG=debug shows the SDK's view.
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("KONOR_LOG").unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One request at a time: a single-threaded runtime is plenty.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::from(Exit::Internal.code());
        }
    };
    let exit = match runtime.block_on(konor_node::ctl::run(cli)) {
        Ok(exit) => exit,
        Err(error) => {
            eprint!("{}", render_error(&error));
            exit_for_error(&error)
        }
    };
    ExitCode::from(exit.code())
}
