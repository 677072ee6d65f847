//! Why a proxied connection ended early: the one error type of the handlers.

use std::io;

use crate::{
    authz::Decision, route::table::RouteError, state::ObjectKey, transport::error::TransportError,
};

/// Errors on one proxied connection. Each ends that connection only.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The kernel had no original destination for a connection on 15001.
    #[error(
        "no original destination recorded for client port {0}: the connection was not made through the capture hook (or its record was evicted)"
    )]
    NoOrigDst(u16),
    /// Reading the original-destination map failed.
    #[error("reading the original destination: {0}")]
    OrigDstMap(io::Error),
    /// Routing found nowhere to send the connection.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A connection to one of the proxy's own ports that did not come through capture.
    #[error("refusing a direct connection to proxy port {0}")]
    DirectToProxyPort(u16),
    /// Plaintext reached a STRICT pod's proxy (the kernel normally refuses it first).
    #[error("refused plaintext to {0}: it is STRICT mTLS")]
    StrictPlaintext(ObjectKey),
    /// Authorization refused the connection.
    #[error("connection {0}")]
    Denied(Decision),
    /// A policy change closed a connection it had allowed.
    #[error("closed: policy no longer allows the connection")]
    Revoked,
    /// The connection could not be carried.
    #[error(transparent)]
    Transport(#[from] TransportError),
}
