//! The fuzz targets of Konorkestra (issue 12): one function per decoder of outside input, each
//! taking arbitrary bytes and failing only by panicking. cargo-fuzz runs them coverage-guided
//! (`fuzz/libfuzzer`, see docs/testing.md); `tests/corpus.rs` replays every committed corpus
//! file through them in CI.
//!
//! What each target reaches: [`peer_message`] every replica message from a peer; [`gossip`]
//! chitchat's wire format, the gossip filter (with a simulated seal) and chitchat's own decoder
//! on what the filter lets through; [`socket_frame`] the local socket's framing and strict JSON
//! request parsing; [`record_file`] the group file scanner and loader; [`config_file`] TOML, YAML
//! and JSON configuration files; [`sync`] Automerge sync messages and changes as our wrappers
//! decode them; [`gossip_value`] group summaries in gossip values.

use std::sync::Arc;

use chitchat::{ChitchatId, Deserializable};
use konor_crdt::exchange::{SyncPeer, decode_change};
use konor_crdt::{ActorId, FileFormat, PeerMessage};

/// Lets a panic unwind, as it does in konord, instead of aborting at once as libFuzzer's hook
/// does: our code shields Automerge's decoders with `catch_unwind` (they panic on some malformed
/// bytes), and a caught panic is a refusal, not a crash. A panic nothing catches still ends the
/// run: it cannot unwind out of libFuzzer's C entry point, so the process aborts and libFuzzer
/// keeps the input.
pub fn unwinding_panics() {
    let _ = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
}

/// The target names, as cargo-fuzz and the corpus folders know them.
pub const TARGETS: &[&str] =
    &["peer_message", "gossip", "socket_frame", "record_file", "config_file", "sync", "gossip_value"];

/// Runs target `name` on `data`; `false` for an unknown name.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "peer_message" => peer_message(data),
        "gossip" => gossip(data),
        "socket_frame" => socket_frame(data),
        "record_file" => record_file(data),
        "config_file" => config_file(data),
        "sync" => sync(data),
        "gossip_value" => gossip_value(data),
        _ => return false,
    }
    true
}

/// A replica message from a peer.
pub fn peer_message(data: &[u8]) {
    if let Ok(message) = PeerMessage::decode(data) {
        // What decodes re-encodes, and decodes the same.
        let again = message.encode();
        assert_eq!(PeerMessage::decode(&again).ok().as_ref(), Some(&message));
    }
}

/// A gossip message: our decoder, the filter, and chitchat's decoder on what the filter passes.
pub fn gossip(data: &[u8]) {
    use konor_node::peer::gossip_filter::{GossipFilter, Verdict};
    use konor_node::peer::gossip_seal::SimSeal;
    use konor_node::peer::gossip_wire;
    if let Ok(message) = gossip_wire::decode(data) {
        assert_eq!(gossip_wire::decode(&gossip_wire::encode(&message)).ok().as_ref(), Some(&message));
    }
    let me = ChitchatId::new("n1".to_owned(), 1, std::net::SocketAddr::from(([10, 0, 0, 1], 7400)));
    let mut filter = GossipFilter::new(Arc::new(SimSeal::new("n1")), "c", me, 8);
    let passed = match filter.admit(data) {
        Verdict::Keep => data.to_vec(),
        Verdict::Rewritten(bytes) => bytes,
        Verdict::Drop(_) => return,
    };
    let _ = chitchat::ChitchatMessage::deserialize(&mut passed.as_slice());
}

/// A frame on the local socket: its length header, then strict JSON into a request.
pub fn socket_frame(data: &[u8]) {
    use konor_sdk::protocol::{ClientFrame, frame_length};
    if let Some(header) = data.first_chunk::<4>() {
        let _ = frame_length(*header);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(value) = konor_crdt::json_strict::parse(text)
    {
        let _ = serde_json::from_value::<ClientFrame>(value);
    }
}

/// A group file: the record scanner, then the loader.
pub fn record_file(data: &[u8]) {
    if let Ok(scan) = konor_crdt::record::scan_records(data) {
        assert!(scan.valid_bytes <= data.len());
    }
    let _ = konor_crdt::load_group_file(data, ActorId::from([7u8; 16]));
}

/// A configuration file; the first byte picks the format.
pub fn config_file(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let format = match selector % 3 {
        0 => FileFormat::Toml,
        1 => FileFormat::Yaml,
        _ => FileFormat::Json,
    };
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = konor_crdt::config_file::parse_config_file(text, format);
    }
}

/// An Automerge sync state and a change, as our wrappers decode them.
pub fn sync(data: &[u8]) {
    let _ = SyncPeer::decode(data);
    let _ = decode_change(data);
}

/// A group summary in a gossip value.
pub fn gossip_value(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(summary) = konor_crdt::replica::GroupGossip::parse(text)
    {
        assert_eq!(konor_crdt::replica::GroupGossip::parse(&summary.encode()).as_ref(), Some(&summary));
    }
}
