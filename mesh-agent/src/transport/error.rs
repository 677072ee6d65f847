//! Why a connection could not be carried: the one error type of the transport layer.

use std::{io, net::SocketAddr};

use crate::{capture::netns::NetnsError, identity::certs::CertError};

/// Errors opening or accepting a connection between pods or nodes. Each ends that connection
/// only.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Making the upstream socket in the pod's namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// No certificate for the identity that the connection needs.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// Connecting upstream failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The upstream address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// An HBONE tunnel could not be set up.
    #[error("HBONE tunnel to {target}: {problem}")]
    Tunnel {
        /// Where the tunnel was for.
        target: SocketAddr,
        /// What failed.
        problem: String,
    },
    /// The destination's proxy answered the HBONE CONNECT with an error status (403: its
    /// policy denied the source; 400: the destination is not behind it; 503: its application
    /// refused the connection).
    #[error("HBONE tunnel to {target}: the destination refused the tunnel with {status}")]
    TunnelRefused {
        /// Where the tunnel was for.
        target: SocketAddr,
        /// The status of the CONNECT.
        status: http::StatusCode,
    },
    /// An incoming HBONE connection failed its handshake.
    #[error("HBONE connection from {peer}: {problem}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// What failed.
        problem: String,
    },
}
