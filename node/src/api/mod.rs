//! The doors through which local applications and operators reach this node: the Unix socket
//! (`socket`, the SDKs' and konorctl's door) and the HTTP API (`http`, operators and tools over
//! the network), both onto the same daemon queries and commands; the read view their `get`s are
//! answered from; and the checks every request passes before either door allocates for it.
pub mod http;
pub mod read_view;
pub(crate) mod request_check;
pub mod socket;
