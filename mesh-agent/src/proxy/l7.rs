//! L7 in the node proxy: HTTP/1.1 and HTTP/2 (gRPC included) on captured connections, with no
//! waypoint hop. `outbound` routes a client's requests and `forward` makes their tries;
//! `inbound` authorizes requests to a pod an L7 policy selects; `message` holds what both do to
//! a message, `record` what a request leaves behind, and `server` the hardened hyper server.
//!
//! Replies the proxy makes itself carry `x-mesh-flags` with Envoy's response flags.

pub mod forward;
pub mod inbound;
pub mod message;
pub mod outbound;
pub mod record;
pub mod server;
pub mod tries;
