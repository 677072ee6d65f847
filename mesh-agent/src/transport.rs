//! Transport: how bytes move between a source pod and its destination once routing and policy
//! have decided. A same-node pod's application over its loopback, HBONE to another node (mTLS,
//! HTTP/2 CONNECT, pooled), or plain TCP out of the mesh; kernel TLS after the handshake; the
//! byte relay and the kernel splice for bulk same-node connections; and the upstream HTTP
//! connection pools. It decides nothing: callers bring the hop and have authorized it.

pub mod closing;
pub mod dial;
pub mod error;
pub mod hbone;
pub mod ktls;
pub mod relay;
pub mod splice;
pub mod upstream;
