//! The doors through which local applications and operators reach this node: the Unix socket
//! (`socket`, the SDKs' and konorctl's door) and the read view its sessions answer `get` from.
//! The HTTP API will be a second door onto the same daemon queries and commands.
pub mod read_view;
pub mod socket;
