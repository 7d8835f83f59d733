//! Frames on one connection: the reader task turns bytes into frames (charging each against
//! the read budget before it allocates the payload), the writer task writes whole frames with a
//! timeout. Neither decides anything about the frames' contents.

use std::io::ErrorKind;
use std::sync::Arc;

use konor_sdk::protocol::{ErrorCode, Response, ServerFrame, encode_frame, frame_length};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, error, warn};

use super::budget::{Budget, Charge, OutFrame};
use crate::limits::{HELLO_FRAME_BYTES_MAX, IO_TIMEOUT};

/// What the reader task hands to the session.
pub(super) enum Inbound {
    /// A frame's payload, with the bytes it holds against the connection's read budget.
    Payload(Vec<u8>, Charge),
    /// The frame could not be read; the reason is logged and counted by the session.
    Fault(String),
}

/// Reads frames until the end of the stream or a fault. Runs as its own task so the session
/// loop can wait on other things without ever cutting a frame in half. The first frame (the
/// hello) may be at most [`HELLO_FRAME_BYTES_MAX`]; later ones `FRAME_BYTES_MAX`.
/// The reader is buffered: one `read` usually brings a whole frame (length and payload).
pub(super) async fn read_loop(mut read_half: BufReader<OwnedReadHalf>, inbox: mpsc::Sender<Inbound>, budget: Budget) {
    let mut limit = HELLO_FRAME_BYTES_MAX;
    loop {
        let inbound = match read_frame(&mut read_half, limit, &budget).await {
            Ok(Some((payload, charge))) => Inbound::Payload(payload, charge),
            Ok(None) => return,
            Err(fault) => Inbound::Fault(fault),
        };
        let fault = matches!(inbound, Inbound::Fault(_));
        if inbox.send(inbound).await.is_err() || fault {
            return;
        }
        limit = usize::MAX;
    }
}

/// Reads one frame; `Ok(None)` is a clean end of stream between frames. Waiting for the first
/// byte has no timeout (the session closes idle connections); the rest must follow within
/// [`IO_TIMEOUT`] of it, not counting the time the reader waits for room in the read budget
/// (backpressure: the client is not late, the daemon is full).
async fn read_frame(
    read_half: &mut BufReader<OwnedReadHalf>,
    limit: usize,
    budget: &Budget,
) -> Result<Option<(Vec<u8>, Charge)>, String> {
    let mut header = [0u8; 4];
    let first = read_half.read(&mut header).await.map_err(|error| format!("read failed: {error}"))?;
    if first == 0 {
        return Ok(None);
    }
    let mut deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    let rest_of_header = read_half.read_exact(&mut header[first..]);
    match tokio::time::timeout_at(deadline, rest_of_header).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return Err(truncated(error)),
        Err(_) => return Err(too_slow()),
    }
    // Checked before allocating: a bad length never reserves memory.
    let length = frame_length(header).map_err(|error| error.to_string())?;
    if length > limit {
        return Err(format!(
            "the first frame announces {length} bytes, but it must be a hello of at most {HELLO_FRAME_BYTES_MAX} bytes"
        ));
    }
    let waiting = tokio::time::Instant::now();
    let charge = budget.charge(length).await.ok_or_else(|| "the connection is closing".to_owned())?;
    deadline += waiting.elapsed();
    let mut payload = vec![0u8; length];
    match tokio::time::timeout_at(deadline, read_half.read_exact(&mut payload)).await {
        Ok(Ok(_)) => Ok(Some((payload, charge))),
        Ok(Err(error)) => Err(truncated(error)),
        Err(_) => Err(too_slow()),
    }
}

fn too_slow() -> String {
    format!("truncated frame: the rest did not arrive within {} s", IO_TIMEOUT.as_secs())
}

fn truncated(error: std::io::Error) -> String {
    if error.kind() == ErrorKind::UnexpectedEof {
        "truncated frame: the connection ended mid-frame".to_owned()
    } else {
        format!("read failed: {error}")
    }
}

/// Encodes the answer to request `id`. An answer too large for a frame becomes an `internal`
/// error on the same id, so the client's call fails instead of waiting.
pub(super) fn encode_answer(id: u64, response: Response, connection: u64) -> Vec<u8> {
    match encode_frame(&ServerFrame::Response { id, response }) {
        Ok(bytes) => bytes,
        Err(failure) => {
            error!(connection, id, %failure, "an answer does not fit in a frame");
            let message = format!("the answer does not fit in a frame ({failure}); ask for less");
            let refusal =
                ServerFrame::Response { id, response: Response::Error { code: ErrorCode::Internal, message } };
            // A short error always encodes; were it not to, the client's call would time out.
            encode_frame(&refusal).unwrap_or_default()
        }
    }
}

/// Writes frames until the outbox closes; a failed or slow write wakes the session to close.
/// Each frame's charge is given back once it is written.
pub(super) async fn write_loop(
    mut write_half: OwnedWriteHalf,
    mut outbox: mpsc::Receiver<OutFrame>,
    closing: Arc<Notify>,
    connection: u64,
) {
    while let Some(frame) = outbox.recv().await {
        match tokio::time::timeout(IO_TIMEOUT, write_half.write_all(frame.bytes.as_slice())).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                debug!(connection, %error, "writing to a local client failed");
                closing.notify_one();
                return;
            }
            Err(_) => {
                warn!(connection, "a local client did not read for {} s; closing it", IO_TIMEOUT.as_secs());
                closing.notify_one();
                return;
            }
        }
    }
    let _ = write_half.shutdown().await;
}
