//! How a source pod reaches an address: the hop (a pod on this node, a mesh workload on another
//! node over HBONE, or outside the mesh), and the connection along it. Authorization is the
//! caller's: this module only connects.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    error::TransportError,
    hbone::{self, Payload, Tunnel},
};
use crate::{pods::LocalPod, state::Workload, view::Snapshot};

/// How a source pod reaches an address.
#[derive(Debug, Clone)]
pub enum Hop {
    /// A pod on this node: straight to its application (no TLS: the bytes stay in the kernel).
    Local(Arc<LocalPod>),
    /// A mesh workload on another node: HBONE.
    Hbone(Arc<Workload>),
    /// Outside the mesh: plain TCP from the source pod's netns.
    Passthrough,
}

impl Hop {
    /// The hop to `ip` in `view`.
    pub fn to(view: &Snapshot, ip: IpAddr) -> Self {
        if let Some(dest) = view.local_pod(ip) {
            Self::Local(dest.clone())
        } else if let Some(w) = view.state().workloads.get(&ip) {
            Self::Hbone(w.clone())
        } else {
            Self::Passthrough
        }
    }
}

/// A connection to an upstream, whichever hop it took.
#[derive(Debug)]
pub enum UpstreamIo {
    /// A socket (same node, or passthrough).
    Tcp(TcpStream),
    /// An HBONE stream.
    Tunnel(Tunnel),
}

/// Opens connections for source pods: owns the HBONE pool.
#[derive(Debug)]
pub struct Dialer {
    /// Pooled HBONE connections to other nodes.
    pub hbone: hbone::Pool,
}

impl Dialer {
    /// Opens a connection from `src` to `target` along `hop`, to carry `payload`.
    pub async fn open(
        &self,
        src: &LocalPod,
        hop: &Hop,
        target: SocketAddr,
        payload: Payload,
    ) -> Result<UpstreamIo, TransportError> {
        match hop {
            Hop::Local(dest) => dial_app(dest, target.port()).await.map(UpstreamIo::Tcp),
            Hop::Hbone(w) => self
                .hbone
                .connect(src, w, target, payload)
                .await
                .map(UpstreamIo::Tunnel),
            Hop::Passthrough => {
                let sock = src.netns.tcp_socket(target).await?;
                let s = sock
                    .connect(target)
                    .await
                    .map_err(|source| TransportError::Connect {
                        addr: target,
                        source,
                    })?;
                let _ = s.set_nodelay(true);
                Ok(UpstreamIo::Tcp(s))
            }
        }
    }
}

/// Connects to `pod`'s application on `port`, over the pod's loopback (never steered).
pub async fn dial_app(pod: &LocalPod, port: u16) -> Result<TcpStream, TransportError> {
    let loopback: IpAddr = if pod.pod.ip.is_ipv6() {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let target = SocketAddr::new(loopback, port);
    let sock = pod.netns.tcp_socket(target).await?;
    sock.connect(target)
        .await
        .map_err(|source| TransportError::Connect {
            addr: target,
            source,
        })
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunnel(s) => Pin::new(&mut s.io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunnel(s) => Pin::new(&mut s.io).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tunnel(s) => Pin::new(&mut s.io).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunnel(s) => Pin::new(&mut s.io).poll_shutdown(cx),
        }
    }
}
