//! The doors through which local applications and operators reach this node: the Unix socket
//! (`socket`, the SDKs' and konorctl's door) and the HTTP API (`http`, operators and tools over
//! the network), both onto the same daemon queries and commands; the read view their `get`s are
//! answered from; the checks every request passes before either door allocates for it; and
//! the one authorization check both doors make (`authorize`, roles from the settings file);
//! and what a caller that may not reveal secret values reads in their place (`secret_mask`).
pub mod authorize;
pub mod http;
pub mod read_view;
pub(crate) mod request_check;
pub mod secret_mask;
pub mod socket;
