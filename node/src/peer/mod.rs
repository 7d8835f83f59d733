//! Everything between this node and its peers: the QUIC transport with mutual TLS, the node
//! certificates, and membership (chitchat gossip over the transport).
pub mod membership;
pub mod tls;
pub mod transport;
