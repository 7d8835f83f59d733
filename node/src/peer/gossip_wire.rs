//! chitchat 0.11.2's wire format, read and written here so that gossip can be checked before
//! chitchat sees it (chitchat keeps its digest and delta types private). Pure: bytes in, bytes
//! out, no I/O and no decisions; [`super::gossip_filter`] decides what to keep.
//!
//! A message is `magic:u16le version:u8 type:u8` and then, by type: Syn `digest cluster_id`,
//! SynAck `digest delta`, Ack `delta`, BadCluster nothing. A digest is `count:u16le` entries of
//! `chitchat_id heartbeat:u64le last_gc_version:u64le max_version:u64le`. A delta is a stream of
//! blocks (`1 len:u16le zstd-bytes`, `2 len:u16le raw-bytes`, ended by `0`) whose concatenated
//! contents are ops: `0 chitchat_id last_gc_version from_version_excluded` opens a node,
//! `1 key value version:u64le status:u8` is a key-value of the open node, `2 max_version` sets
//! its max version. Strings are `len:u16le utf8`; a `chitchat_id` is `node_id generation:u64le
//! addr` with `addr` = `4 a b c d port:u16le` or `6 <16 bytes> port:u16le`.

use chitchat::{ChitchatId, Deserializable, Serializable};

/// A decoded delta may not expand past this many bytes. chitchat caps each zstd block at 64 KiB
/// but not their number, so a 64 KB message of tiny compressed blocks could ask for gigabytes;
/// an honest delta fits one 65,507-byte datagram and compresses a few times at most.
pub const DELTA_DECODED_BYTES_MAX: usize = 1024 * 1024;

/// Raw blocks written by [`encode`]: well under chitchat's 64 KiB block limit.
const BLOCK_BYTES: usize = 16 * 1024;

/// The first three bytes of every chitchat 0.11 message: magic 45,139 (little-endian) and
/// protocol version 0.
pub const HEADER: [u8; 3] = [0x53, 0xB0, 0x00];

/// Why bytes are not a chitchat message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The message ended early or a field is malformed.
    #[error("malformed gossip message: {0}")]
    Malformed(String),
    /// The delta expands past [`DELTA_DECODED_BYTES_MAX`].
    #[error("gossip delta expands past {DELTA_DECODED_BYTES_MAX} bytes")]
    TooLarge,
}

/// One digest entry: what the sender holds of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestEntry {
    /// The node (id, generation, address).
    pub id: ChitchatId,
    /// Its heartbeat as the sender knows it.
    pub heartbeat: u64,
    /// chitchat's garbage-collection watermark for it.
    pub last_gc_version: u64,
    /// The highest version of its keys the sender holds.
    pub max_version: u64,
}

/// One key-value of a node delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value, as gossiped.
    pub value: String,
    /// Its version in the owner's state.
    pub version: u64,
    /// chitchat's deletion status: 0 set, 1 deleted, 2 delete after a TTL.
    pub status: u8,
}

/// What a delta carries of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDelta {
    /// The node.
    pub id: ChitchatId,
    /// chitchat's garbage-collection watermark (a larger one resets the receiver's state).
    pub last_gc_version: u64,
    /// The delta holds every version after this one, up to its last.
    pub from_version_excluded: u64,
    /// Key-values, in strictly increasing version order.
    pub key_values: Vec<KeyValue>,
    /// A max version set without key-values (op 2), if any.
    pub set_max_version: Option<u64>,
}

/// A chitchat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Scuttlebutt SYN: the sender's digest.
    Syn {
        /// The sender's digest.
        digest: Vec<DigestEntry>,
        /// The sender's cluster name.
        cluster_id: String,
    },
    /// SYN-ACK: the responder's digest and what the initiator lacks.
    SynAck {
        /// The responder's digest.
        digest: Vec<DigestEntry>,
        /// What the initiator lacks.
        delta: Vec<NodeDelta>,
    },
    /// ACK: what the responder lacks.
    Ack {
        /// What the responder lacks.
        delta: Vec<NodeDelta>,
    },
    /// The receiver belongs to another cluster.
    BadCluster,
}

fn malformed(what: impl std::fmt::Display) -> WireError {
    WireError::Malformed(what.to_string())
}

fn take<T: Deserializable>(buf: &mut &[u8], what: &str) -> Result<T, WireError> {
    T::deserialize(buf).map_err(|error| malformed(format!("{what}: {error}")))
}

/// Decodes one chitchat message; trailing bytes are refused.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    let Some((header, mut rest)) = bytes.split_first_chunk::<3>() else {
        return Err(malformed("shorter than its header"));
    };
    if *header != HEADER {
        return Err(malformed("not a chitchat 0.11 header"));
    }
    let buf = &mut rest;
    let kind: u8 = take(buf, "message type")?;
    let message = match kind {
        0 => {
            let digest = decode_digest(buf)?;
            let cluster_id = take(buf, "cluster id")?;
            Message::Syn { digest, cluster_id }
        }
        1 => {
            let digest = decode_digest(buf)?;
            let delta = decode_delta(buf)?;
            Message::SynAck { digest, delta }
        }
        2 => Message::Ack { delta: decode_delta(buf)? },
        3 => Message::BadCluster,
        other => return Err(malformed(format!("unknown message type {other}"))),
    };
    if !buf.is_empty() {
        return Err(malformed(format!("{} trailing bytes", buf.len())));
    }
    Ok(message)
}

fn decode_digest(buf: &mut &[u8]) -> Result<Vec<DigestEntry>, WireError> {
    let count: u16 = take(buf, "digest length")?;
    let mut entries = Vec::with_capacity(usize::from(count).min(buf.len() / 16));
    for _ in 0..count {
        entries.push(DigestEntry {
            id: take(buf, "digest node")?,
            heartbeat: take(buf, "digest heartbeat")?,
            last_gc_version: take(buf, "digest gc version")?,
            max_version: take(buf, "digest max version")?,
        });
    }
    Ok(entries)
}

/// The concatenated contents of a block stream, at most [`DELTA_DECODED_BYTES_MAX`] bytes.
fn decode_blocks(buf: &mut &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    // A compressed block expands to at most 64 KiB: chitchat's own bound, kept here.
    let mut expanded = Vec::new();
    loop {
        let block: u8 = take(buf, "block type")?;
        if block == 0 {
            return Ok(out);
        }
        let len = usize::from(take::<u16>(buf, "block length")?);
        let Some((bytes, rest)) = buf.split_at_checked(len) else {
            return Err(malformed("block longer than the message"));
        };
        *buf = rest;
        let contents = match block {
            1 => {
                expanded.resize(usize::from(u16::MAX), 0);
                let n = zstd::bulk::decompress_to_buffer(bytes, &mut expanded[..])
                    .map_err(|error| malformed(format!("undecodable compressed block: {error}")))?;
                &expanded[..n]
            }
            2 => bytes,
            other => return Err(malformed(format!("unknown block type {other}"))),
        };
        if out.len() + contents.len() > DELTA_DECODED_BYTES_MAX {
            return Err(WireError::TooLarge);
        }
        out.extend_from_slice(contents);
    }
}

fn decode_delta(buf: &mut &[u8]) -> Result<Vec<NodeDelta>, WireError> {
    let stream = decode_blocks(buf)?;
    let ops = &mut stream.as_slice();
    let mut nodes: Vec<NodeDelta> = Vec::new();
    while !ops.is_empty() {
        let op: u8 = take(ops, "delta op")?;
        match op {
            0 => {
                let id: ChitchatId = take(ops, "delta node")?;
                if nodes.iter().any(|node| node.id == id) {
                    return Err(malformed(format!("node {id:?} twice in one delta")));
                }
                nodes.push(NodeDelta {
                    id,
                    last_gc_version: take(ops, "delta gc version")?,
                    from_version_excluded: take(ops, "delta from version")?,
                    key_values: Vec::new(),
                    set_max_version: None,
                });
            }
            1 => {
                let node = nodes.last_mut().ok_or_else(|| malformed("key-value before any node"))?;
                let key_value = KeyValue {
                    key: take(ops, "key")?,
                    value: take(ops, "value")?,
                    version: take(ops, "version")?,
                    status: take(ops, "deletion status")?,
                };
                if key_value.status > 2 {
                    return Err(malformed(format!("deletion status {}", key_value.status)));
                }
                if node.key_values.last().is_some_and(|last| last.version >= key_value.version) {
                    return Err(malformed("key-value versions not strictly increasing"));
                }
                node.key_values.push(key_value);
            }
            2 => {
                let node = nodes.last_mut().ok_or_else(|| malformed("max version before any node"))?;
                node.set_max_version = Some(take(ops, "max version")?);
            }
            other => return Err(malformed(format!("unknown delta op {other}"))),
        }
    }
    Ok(nodes)
}

/// Encodes a message as chitchat 0.11 reads it (delta blocks stored raw, not compressed).
pub fn encode(message: &Message) -> Vec<u8> {
    let mut buf = HEADER.to_vec();
    match message {
        Message::Syn { digest, cluster_id } => {
            buf.push(0);
            encode_digest(digest, &mut buf);
            cluster_id.serialize(&mut buf);
        }
        Message::SynAck { digest, delta } => {
            buf.push(1);
            encode_digest(digest, &mut buf);
            encode_delta(delta, &mut buf);
        }
        Message::Ack { delta } => {
            buf.push(2);
            encode_delta(delta, &mut buf);
        }
        Message::BadCluster => buf.push(3),
    }
    buf
}

fn encode_digest(digest: &[DigestEntry], buf: &mut Vec<u8>) {
    // A decoded digest held at most u16::MAX entries and filtering only removes some.
    let count = u16::try_from(digest.len()).unwrap_or(u16::MAX);
    count.serialize(buf);
    for entry in digest.iter().take(usize::from(count)) {
        entry.id.serialize(buf);
        entry.heartbeat.serialize(buf);
        entry.last_gc_version.serialize(buf);
        entry.max_version.serialize(buf);
    }
}

fn encode_delta(delta: &[NodeDelta], buf: &mut Vec<u8>) {
    let mut ops = Vec::new();
    for node in delta {
        ops.push(0);
        node.id.serialize(&mut ops);
        node.last_gc_version.serialize(&mut ops);
        node.from_version_excluded.serialize(&mut ops);
        for key_value in &node.key_values {
            ops.push(1);
            key_value.key.serialize(&mut ops);
            key_value.value.serialize(&mut ops);
            key_value.version.serialize(&mut ops);
            ops.push(key_value.status);
        }
        if let Some(max_version) = node.set_max_version {
            ops.push(2);
            max_version.serialize(&mut ops);
        }
    }
    for block in ops.chunks(BLOCK_BYTES) {
        buf.push(2);
        // BLOCK_BYTES fits a u16.
        (block.len() as u16).serialize(buf);
        buf.extend_from_slice(block);
    }
    buf.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn id(name: &str, generation: u64) -> ChitchatId {
        ChitchatId::new(name.to_owned(), generation, SocketAddr::from(([10, 0, 0, 7], 7400)))
    }

    fn sample() -> Message {
        Message::SynAck {
            digest: vec![DigestEntry { id: id("n1", 3), heartbeat: 99, last_gc_version: 0, max_version: 4 }],
            delta: vec![NodeDelta {
                id: id("n2", 1),
                last_gc_version: 0,
                from_version_excluded: 0,
                key_values: (1..=3)
                    .map(|version| KeyValue {
                        key: format!("k{version}"),
                        value: "v".repeat(20_000),
                        version,
                        status: 0,
                    })
                    .collect(),
                set_max_version: None,
            }],
        }
    }

    /// chitchat's reading of `bytes`, without the byte length it remembers of each delta.
    fn chitchat_reads(bytes: &[u8]) -> String {
        let message = chitchat::ChitchatMessage::deserialize(&mut &bytes[..]).unwrap();
        let text = format!("{message:?}");
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("serialized_len: ") {
            out.push_str(&rest[..at]);
            rest = rest[at..].trim_start_matches("serialized_len: ").trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn what_is_encoded_decodes_to_the_same_message_here_and_in_chitchat() {
        let message = sample();
        let bytes = encode(&message);
        assert_eq!(decode(&bytes).unwrap(), message);
        let read = chitchat_reads(&bytes);
        assert!(read.contains("\"k3\"") && read.contains("n1:3:10.0.0.7:7400"), "{read:.300}");
        let syn = Message::Syn { digest: vec![], cluster_id: "c".into() };
        assert_eq!(decode(&encode(&syn)).unwrap(), syn);
        chitchat_reads(&encode(&syn));
    }

    #[test]
    fn compressed_blocks_read_as_chitchat_reads_them() {
        // The same message with its delta in zstd blocks, as chitchat writes it.
        let raw = encode(&sample());
        let delta_at = {
            let mut head = HEADER.to_vec();
            head.push(1);
            let Message::SynAck { digest, .. } = sample() else { unreachable!() };
            encode_digest(&digest, &mut head);
            head.len()
        };
        let mut ops = Vec::new();
        let mut rest = &raw[delta_at..];
        decode_blocks(&mut rest).unwrap().clone_into(&mut ops);
        let mut compressed = raw[..delta_at].to_vec();
        for block in ops.chunks(16_384) {
            let packed = zstd::bulk::compress(block, 0).unwrap();
            compressed.push(1);
            (packed.len() as u16).serialize(&mut compressed);
            compressed.extend_from_slice(&packed);
        }
        compressed.push(0);
        assert!(compressed.len() < raw.len() / 10, "the sample compresses");
        assert_eq!(decode(&compressed).unwrap(), sample());
        assert_eq!(chitchat_reads(&compressed), chitchat_reads(&raw));
    }

    #[test]
    fn malformed_messages_are_refused_not_panicked_on() {
        let bytes = encode(&sample());
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "a message cut at {cut} bytes decodes");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        let mut bad_header = bytes;
        bad_header[0] ^= 1;
        assert!(decode(&bad_header).is_err());
    }

    #[test]
    fn a_delta_that_expands_past_the_cap_is_refused() {
        // Many tiny compressed blocks, each of 60 KB of zeros: a zip bomb in chitchat's framing.
        let block = zstd::bulk::compress(&vec![1u8; 60_000], 3).unwrap();
        let mut bytes = HEADER.to_vec();
        bytes.push(2);
        for _ in 0..40 {
            bytes.push(1);
            (block.len() as u16).serialize(&mut bytes);
            bytes.extend_from_slice(&block);
        }
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(WireError::TooLarge));
    }
}
