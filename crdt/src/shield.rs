//! Automerge's decoders, shielded: bytes from outside (a peer, a file) that make a decoder panic
//! are refused like bytes it rejects. Used by the exchange (changes, sync messages, sync states),
//! the group (snapshots) and the journal (snapshot records).

use crate::error::RemoteError;

/// Runs an Automerge decoder on bytes from outside (a peer, a file). Automerge 0.12 can panic on
/// malformed bytes instead of returning an error: fuzzing found `Change::try_from` unwrapping a
/// `None` in its RLE decoder (hexane 1.0.0-alpha.5, `rle/decoder.rs:216`) on 32 bytes. Such a
/// panic becomes the same refusal as an error. The decoders build new values only, so nothing is
/// left half-changed; applying decoded changes to a document is not shielded (a panic there
/// could leave it inconsistent) and is only ever given what decoded cleanly.
pub(crate) fn shielded<T>(what: &'static str, decode: impl FnOnce() -> Result<T, String>) -> Result<T, RemoteError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(result) => result.map_err(|detail| RemoteError::Malformed { what, detail }),
        Err(_) => Err(RemoteError::Malformed { what, detail: "the decoder failed on malformed bytes".to_owned() }),
    }
}
