//! The node proxy: per-pod listeners and the TCP relay.
//!
//! Reads top-down in the order a connection flows:
//! - outbound (15001): accept → recover the original destination from the kernel → resolve a
//!   service address to an endpoint → connect *from the pod's netns* → relay;
//! - inbound (15006): accept → the accepted socket's local address is the original destination →
//!   connect to the application over the pod's loopback → relay;
//! - HBONE (15008): mTLS tunnels between nodes arrive here (not yet served; see `serve_hbone`).
//!
//! Which listener accepted a connection says which pod it belongs to; the proxy never infers the
//! pod from a source address.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf, copy_bidirectional},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::{
    bpf::OrigDstTable,
    netns::{Netns, NetnsError},
    state::{NodeState, ObjectKey, Pod, Service},
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
    /// A service address was dialled on a port it does not serve, or it has no endpoints.
    #[error("service {service} has no endpoints for port {port}")]
    NoEndpoints {
        /// The service.
        service: ObjectKey,
        /// The requested port.
        port: u16,
    },
    /// A connection to one of the proxy's own ports that did not come through capture.
    #[error("refusing a direct connection to proxy port {0}")]
    DirectToProxyPort(u16),
    /// Making the upstream socket in the pod's namespace failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Connecting upstream failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The upstream address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// Per-pod userspace counters (the kernel keeps its own; see `bpf::KernelPodStats`).
#[derive(Debug, Default)]
pub struct PodCounters {
    /// Captured outbound connections accepted on 15001.
    pub outbound_accepted: AtomicU64,
    /// Of those, ones that failed before relaying (no destination, connect refused, ...).
    pub outbound_failed: AtomicU64,
    /// Inbound connections accepted on 15006.
    pub inbound_accepted: AtomicU64,
    /// Of those, ones that failed before relaying.
    pub inbound_failed: AtomicU64,
    /// Connections that arrived on 15008 (refused until HBONE is served).
    pub hbone_refused: AtomicU64,
    /// Bytes relayed from this pod's clients to their upstreams.
    pub outbound_bytes_sent: AtomicU64,
    /// Bytes relayed from upstreams back to this pod's clients.
    pub outbound_bytes_received: AtomicU64,
    /// Bytes delivered to this pod's application.
    pub inbound_bytes_delivered: AtomicU64,
}

/// A service's endpoints with its round-robin cursor.
#[derive(Debug)]
struct ServiceRoute {
    svc: Service,
    next: AtomicUsize,
}

/// Routing table built from a [`NodeState`]; replaced whole on every change.
#[derive(Debug, Default)]
pub struct Routes {
    by_vip: HashMap<IpAddr, Arc<ServiceRoute>>,
}

impl Routes {
    /// Builds routes, carrying round-robin cursors over from `old` so a reload does not reset
    /// balancing.
    pub fn build(state: &NodeState, old: &Routes) -> Self {
        let by_vip = state
            .services
            .values()
            .map(|s| {
                let next = old
                    .by_vip
                    .get(&s.ip)
                    .map(|r| r.next.load(Ordering::Relaxed))
                    .unwrap_or(0);
                let route = ServiceRoute {
                    svc: s.clone(),
                    next: AtomicUsize::new(next),
                };
                (s.ip, Arc::new(route))
            })
            .collect();
        Self { by_vip }
    }

    /// Where to connect for a captured connection to `dst`: a service address becomes one of
    /// its endpoints (round-robin); any other address is dialled as is.
    pub fn resolve(&self, dst: SocketAddr) -> Result<SocketAddr, ProxyError> {
        let Some(route) = self.by_vip.get(&dst.ip()) else {
            return Ok(dst);
        };
        let svc = &route.svc;
        let no_endpoints = || ProxyError::NoEndpoints {
            service: svc.key.clone(),
            port: dst.port(),
        };
        let target_port = svc.target_port(dst.port()).ok_or_else(no_endpoints)?;
        if svc.endpoints.is_empty() {
            return Err(no_endpoints());
        }
        let i = route.next.fetch_add(1, Ordering::Relaxed) % svc.endpoints.len();
        Ok(SocketAddr::new(svc.endpoints[i], target_port))
    }
}

/// What every connection task shares.
#[derive(Debug)]
pub struct Shared {
    /// Current routes.
    pub routes: RwLock<Arc<Routes>>,
    /// Original destinations recorded by the kernel.
    pub orig_dst: OrigDstTable,
}

impl Shared {
    fn routes(&self) -> Arc<Routes> {
        match self.routes.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The proxy side of one enrolled pod: its namespace thread, listeners and accept loops.
/// Dropping it stops accepting; connections already relaying run to completion.
#[derive(Debug)]
pub struct PodProxy {
    /// The pod as enrolled.
    pub pod: Pod,
    /// The pod's namespace thread.
    pub netns: Arc<Netns>,
    /// Counters.
    pub counters: Arc<PodCounters>,
    tasks: JoinSet<()>,
}

/// The three listeners, opened inside the pod's netns before capture is enabled.
#[derive(Debug)]
pub struct PodListeners {
    /// 127.0.0.1:15001 (and [::1]:15001 when the pod has IPv6 loopback).
    pub outbound: Vec<std::net::TcpListener>,
    /// 15006, the plaintext inbound listener `sk_lookup` steers to.
    pub inbound: std::net::TcpListener,
    /// 15008, the HBONE listener `sk_lookup` steers to.
    pub hbone: std::net::TcpListener,
}

/// Opens a pod's listeners in its namespace.
pub fn open_listeners(netns: &Netns, pod: &Pod) -> Result<PodListeners, NetnsError> {
    use mesh_common::ports;
    let mut outbound =
        vec![netns.listen(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ports::OUTBOUND))?];
    match netns.listen(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), ports::OUTBOUND)) {
        Ok(l) => outbound.push(l),
        Err(e) => debug!(pod = %pod.key, "no IPv6 outbound listener: {e}"),
    }
    let any: IpAddr = if pod.ip.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let inbound = netns.listen(SocketAddr::new(any, ports::INBOUND))?;
    let hbone = netns.listen(SocketAddr::new(any, ports::HBONE))?;
    Ok(PodListeners {
        outbound,
        inbound,
        hbone,
    })
}

impl PodProxy {
    /// Starts accepting on `listeners`. Must be called inside the tokio runtime.
    pub fn start(
        pod: Pod,
        netns: Arc<Netns>,
        listeners: PodListeners,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let counters = Arc::new(PodCounters::default());
        let mut tasks = JoinSet::new();
        let cx = Arc::new(PodCx {
            pod: pod.clone(),
            netns: netns.clone(),
            counters: counters.clone(),
            shared,
        });
        for l in listeners.outbound {
            let l = TcpListener::from_std(l)?;
            tasks.spawn(accept_loop(l, cx.clone(), Kind::Outbound));
        }
        let l = TcpListener::from_std(listeners.inbound)?;
        tasks.spawn(accept_loop(l, cx.clone(), Kind::Inbound));
        let l = TcpListener::from_std(listeners.hbone)?;
        tasks.spawn(accept_loop(l, cx, Kind::Hbone));
        Ok(Self {
            pod,
            netns,
            counters,
            tasks,
        })
    }

    /// Stops accepting.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Outbound,
    Inbound,
    Hbone,
}

#[derive(Debug)]
struct PodCx {
    pod: Pod,
    netns: Arc<Netns>,
    counters: Arc<PodCounters>,
    shared: Arc<Shared>,
}

async fn accept_loop(listener: TcpListener, cx: Arc<PodCx>, kind: Kind) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %cx.pod.key, ?kind, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let cx = cx.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let result = match kind {
                Kind::Outbound => outbound(&cx, stream, peer).await,
                Kind::Inbound => inbound(&cx, stream).await,
                Kind::Hbone => serve_hbone(&cx, stream, peer),
            };
            if let Err(e) = result {
                warn!(pod = %cx.pod.key, ?kind, %peer, "connection failed: {e}");
            }
        });
    }
}

async fn outbound(cx: &PodCx, mut client: TcpStream, peer: SocketAddr) -> Result<(), ProxyError> {
    let c = &cx.counters;
    c.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    let fail = |e: ProxyError| {
        c.outbound_failed.fetch_add(1, Ordering::Relaxed);
        e
    };
    let dst = cx
        .shared
        .orig_dst
        .take(cx.netns.cookie(), peer.port())
        .map_err(|e| fail(ProxyError::OrigDstMap(e)))?
        .ok_or_else(|| fail(ProxyError::NoOrigDst(peer.port())))?;
    let target = cx.shared.routes().resolve(dst).map_err(fail)?;
    let sock = cx
        .netns
        .tcp_socket(target)
        .await
        .map_err(|e| fail(e.into()))?;
    let mut upstream = sock.connect(target).await.map_err(|source| {
        fail(ProxyError::Connect {
            addr: target,
            source,
        })
    })?;
    debug!(pod = %cx.pod.key, %dst, %target, "outbound relay");
    let mut client = Counted::new(&mut client, &c.outbound_bytes_sent);
    let mut upstream = Counted::new(&mut upstream, &c.outbound_bytes_received);
    let _ = copy_bidirectional(&mut client, &mut upstream).await;
    Ok(())
}

async fn inbound(cx: &PodCx, mut client: TcpStream) -> Result<(), ProxyError> {
    let c = &cx.counters;
    c.inbound_accepted.fetch_add(1, Ordering::Relaxed);
    let fail = |e: ProxyError| {
        c.inbound_failed.fetch_add(1, Ordering::Relaxed);
        e
    };
    // sk_lookup hands us the connection untouched, so its local address is where the client
    // was going.
    let local = client.local_addr().map_err(|source| {
        fail(ProxyError::Connect {
            addr: SocketAddr::new(cx.pod.ip, 0),
            source,
        })
    })?;
    if local.port() == mesh_common::ports::INBOUND {
        return Err(fail(ProxyError::DirectToProxyPort(local.port())));
    }
    let loopback: IpAddr = if local.is_ipv6() {
        Ipv6Addr::LOCALHOST.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let target = SocketAddr::new(loopback, local.port());
    let sock = cx
        .netns
        .tcp_socket(target)
        .await
        .map_err(|e| fail(e.into()))?;
    let mut app = sock.connect(target).await.map_err(|source| {
        fail(ProxyError::Connect {
            addr: target,
            source,
        })
    })?;
    let mut client = Counted::new(&mut client, &c.inbound_bytes_delivered);
    let _ = copy_bidirectional(&mut client, &mut app).await;
    Ok(())
}

/// A stream that adds every byte read from it to a counter as it flows, so counters are right
/// while a connection is still open (long-lived connections would otherwise report nothing).
struct Counted<'a, S> {
    inner: &'a mut S,
    read: &'a AtomicU64,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: &'a mut S, read: &'a AtomicU64) -> Self {
        Self { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// HBONE is the identity issue's work; until then a connection here is closed at once, so
/// nothing reaches the application unauthenticated.
fn serve_hbone(cx: &PodCx, stream: TcpStream, peer: SocketAddr) -> Result<(), ProxyError> {
    cx.counters.hbone_refused.fetch_add(1, Ordering::Relaxed);
    info!(pod = %cx.pod.key, %peer, "closing HBONE connection: mTLS tunnels are not served yet");
    drop(stream);
    Ok(())
}
