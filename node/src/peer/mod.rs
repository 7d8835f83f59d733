//! Everything between this node and its peers: the QUIC transport with mutual TLS (its configs in
//! `tls`, built on the node certificates of `crate::pki`), membership (chitchat gossip over the
//! transport), and the signatures that make each node's gossip its own (`gossip_seal`, checked by
//! `gossip_filter` over `gossip_wire`).
pub mod gossip_filter;
pub mod gossip_seal;
pub mod gossip_wire;
pub mod membership;
pub mod tls;
pub mod transport;
