//! The node proxy: per-pod listeners, the TCP relay, and the choice of path per connection.
//!
//! Reads top-down in the order a connection flows:
//! - outbound (15001): accept → recover the original destination from the kernel → resolve a
//!   service address to an endpoint → pick the path:
//!   - a pod on this node: authorize with the source pod's identity and hand the bytes to the
//!     destination's application directly (no TLS: they never leave the kernel);
//!   - a mesh workload on another node: HBONE (`hbone.rs`), mTLS from the source pod's netns;
//!   - anything else (outside the mesh): plain TCP from the source pod's netns;
//! - inbound plaintext (15006): only PERMISSIVE pods get here (the kernel refuses plaintext to
//!   STRICT ones); authorize with no identity → connect to the application over the pod's
//!   loopback → relay;
//! - HBONE (15008): see `hbone.rs`.
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

use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf, copy_bidirectional},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{
    bpf::OrigDstTable,
    certs::{CertError, CertManager},
    hbone,
    identity::Identity,
    netns::{Netns, NetnsError},
    policy::{self, Decision},
    state::{MtlsMode, NodeState, ObjectKey, Pod, Service},
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
    /// Plaintext reached a STRICT pod's proxy (the kernel normally refuses it first).
    #[error("refused plaintext to {0}: it is STRICT mTLS")]
    StrictPlaintext(ObjectKey),
    /// Authorization refused the connection.
    #[error("connection {0}")]
    Denied(Decision),
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
    /// An incoming HBONE connection failed its handshake.
    #[error("HBONE connection from {peer}: {problem}")]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// What failed.
        problem: String,
    },
}

/// A counter that many tasks bump.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

/// Per-pod userspace counters (the kernel keeps its own; see `bpf::KernelPodStats`).
#[derive(Debug, Default, Serialize)]
pub struct PodCounters {
    /// Captured outbound connections accepted on 15001.
    pub outbound_accepted: Counter,
    /// Of those, ones that failed before relaying (no destination, refused, denied...).
    pub outbound_failed: Counter,
    /// Of those, ones sent over HBONE.
    pub outbound_hbone: Counter,
    /// Of those, ones handed to a pod on this node.
    pub outbound_local: Counter,
    /// Inbound plaintext connections accepted on 15006.
    pub inbound_accepted: Counter,
    /// Of those, ones that failed before relaying.
    pub inbound_failed: Counter,
    /// mTLS connections accepted on 15008 (handshake passed).
    pub hbone_connections: Counter,
    /// CONNECT streams relayed to this pod's application.
    pub hbone_streams: Counter,
    /// HBONE connections or streams refused (handshake failure, bad CONNECT).
    pub hbone_refused: Counter,
    /// Connections to this pod refused by authorization.
    pub denied: Counter,
    /// Bytes relayed from this pod's clients to their upstreams.
    pub outbound_bytes_sent: Counter,
    /// Bytes relayed from upstreams back to this pod's clients.
    pub outbound_bytes_received: Counter,
    /// Bytes delivered to this pod's application.
    pub inbound_bytes_delivered: Counter,
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
    /// The state the routes were built from: workloads, modes and policies.
    pub state: Arc<NodeState>,
}

impl Routes {
    /// Builds routes, carrying round-robin cursors over from `old` so a reload does not reset
    /// balancing.
    pub fn build(state: &Arc<NodeState>, old: &Routes) -> Self {
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
        Self {
            by_vip,
            state: state.clone(),
        }
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
    /// Enrolled pods of this node by address.
    pub local: RwLock<HashMap<IpAddr, Arc<LocalPod>>>,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// Pooled HBONE connections.
    pub pool: hbone::Pool,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

impl Shared {
    /// Current routes (and the state they came from).
    pub fn routes(&self) -> Arc<Routes> {
        match self.routes.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The enrolled pod of this node with address `ip`.
    pub fn local_pod(&self, ip: IpAddr) -> Option<Arc<LocalPod>> {
        let local = self
            .local
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        local.get(&ip).cloned()
    }

    /// Adds (`Some`) or removes (`None`) the enrolled pod at `ip`.
    pub fn set_local_pod(&self, ip: IpAddr, pod: Option<Arc<LocalPod>>) {
        let mut local = self
            .local
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match pod {
            Some(p) => local.insert(ip, p),
            None => local.remove(&ip),
        };
    }
}

/// One enrolled pod as connection tasks see it.
#[derive(Debug)]
pub struct LocalPod {
    /// The pod as enrolled.
    pub pod: Pod,
    /// Its namespace thread.
    pub netns: Arc<Netns>,
    /// Its counters.
    pub counters: Arc<PodCounters>,
}

impl LocalPod {
    /// The pod's SPIFFE identity.
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(
            trust_domain,
            &self.pod.key.namespace,
            &self.pod.service_account,
        )
    }

    /// Authorizes a connection to this pod on `port` from `source`; logs and counts a denial.
    pub fn authorize(
        &self,
        shared: &Shared,
        source: Option<&Identity>,
        port: u16,
    ) -> Result<(), Decision> {
        let routes = shared.routes();
        let decision = policy::evaluate(
            &routes.state.authorization_policies,
            &policy::Request {
                source,
                namespace: &self.pod.key.namespace,
                labels: &self.pod.labels,
                port,
            },
        );
        if decision == Decision::Allow {
            return Ok(());
        }
        self.counters.denied.inc();
        let src = source.map_or_else(
            || "plaintext (no identity)".to_string(),
            ToString::to_string,
        );
        warn!(%src, dst = %self.pod.key, port, "connection {decision}");
        Err(decision)
    }

    /// Connects to the pod's application on `port`, over the pod's loopback (never steered).
    pub async fn dial_app(&self, port: u16) -> Result<TcpStream, ProxyError> {
        let loopback: IpAddr = if self.pod.ip.is_ipv6() {
            Ipv6Addr::LOCALHOST.into()
        } else {
            Ipv4Addr::LOCALHOST.into()
        };
        let target = SocketAddr::new(loopback, port);
        let sock = self.netns.tcp_socket(target).await?;
        sock.connect(target)
            .await
            .map_err(|source| ProxyError::Connect {
                addr: target,
                source,
            })
    }

    /// Relays between a client and this pod's application, counting delivered bytes live.
    pub async fn relay_to_app<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: S,
        mut app: TcpStream,
    ) {
        let mut client = Counted::new(&mut client, &self.counters.inbound_bytes_delivered);
        let _ = copy_bidirectional(&mut client, &mut app).await;
    }
}

/// The proxy side of one enrolled pod: its listeners and accept loops. Dropping it stops
/// accepting; connections already relaying run to completion.
#[derive(Debug)]
pub struct PodProxy {
    /// The pod, with its namespace and counters.
    pub local: Arc<LocalPod>,
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
        let local = Arc::new(LocalPod {
            pod,
            netns,
            counters: Arc::new(PodCounters::default()),
        });
        let mut tasks = JoinSet::new();
        let cx = Arc::new(PodCx {
            local: local.clone(),
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
        Ok(Self { local, tasks })
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
    local: Arc<LocalPod>,
    shared: Arc<Shared>,
}

async fn accept_loop(listener: TcpListener, cx: Arc<PodCx>, kind: Kind) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %cx.local.pod.key, ?kind, "accept failed: {e}");
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
                Kind::Hbone => {
                    let r = hbone::serve(cx.shared.clone(), cx.local.clone(), stream, peer).await;
                    if r.is_err() {
                        cx.local.counters.hbone_refused.inc();
                    }
                    r
                }
            };
            match result {
                // Denials were logged with their policy where they were decided.
                Ok(()) | Err(ProxyError::Denied(_)) => {}
                Err(e) => warn!(pod = %cx.local.pod.key, ?kind, %peer, "connection failed: {e}"),
            }
        });
    }
}

async fn outbound(cx: &PodCx, mut client: TcpStream, peer: SocketAddr) -> Result<(), ProxyError> {
    let (src, shared) = (&cx.local, &cx.shared);
    let c = &src.counters;
    c.outbound_accepted.inc();
    let fail = |e: ProxyError| {
        c.outbound_failed.inc();
        e
    };
    let dst = shared
        .orig_dst
        .take(src.netns.cookie(), peer.port())
        .map_err(|e| fail(ProxyError::OrigDstMap(e)))?
        .ok_or_else(|| fail(ProxyError::NoOrigDst(peer.port())))?;
    let routes = shared.routes();
    let target = routes.resolve(dst).map_err(fail)?;
    let mut client = Counted::new(&mut client, &c.outbound_bytes_sent);
    if let Some(dest) = shared.local_pod(target.ip()) {
        // Same node: the kernel told us the source pod, so its identity needs no certificate.
        let src_id = src.identity(&shared.trust_domain);
        dest.authorize(shared, Some(&src_id), target.port())
            .map_err(|d| fail(ProxyError::Denied(d)))?;
        let app = dest.dial_app(target.port()).await.map_err(fail)?;
        c.outbound_local.inc();
        debug!(src = %src.pod.key, dst = %dest.pod.key, %target, "same-node delivery");
        let mut app = Counted::new(app, &c.outbound_bytes_received);
        let mut delivered = Counted::new(&mut client, &dest.counters.inbound_bytes_delivered);
        let _ = copy_bidirectional(&mut delivered, &mut app).await;
    } else if let Some(w) = routes.state.workloads.get(&target.ip()) {
        let tunnel = shared
            .pool
            .connect(shared, src, w, target)
            .await
            .map_err(fail)?;
        c.outbound_hbone.inc();
        debug!(src = %src.pod.key, dst = %w.key, %target, "outbound over HBONE");
        let mut tunnel = Counted::new(tunnel, &c.outbound_bytes_received);
        let _ = copy_bidirectional(&mut client, &mut tunnel).await;
    } else {
        // Outside the mesh: plain TCP, still from the pod's own address.
        let sock = src
            .netns
            .tcp_socket(target)
            .await
            .map_err(|e| fail(e.into()))?;
        let upstream = sock.connect(target).await.map_err(|source| {
            fail(ProxyError::Connect {
                addr: target,
                source,
            })
        })?;
        debug!(pod = %src.pod.key, %dst, %target, "outbound passthrough");
        let mut upstream = Counted::new(upstream, &c.outbound_bytes_received);
        let _ = copy_bidirectional(&mut client, &mut upstream).await;
    }
    Ok(())
}

async fn inbound(cx: &PodCx, client: TcpStream) -> Result<(), ProxyError> {
    let pod = &cx.local;
    let c = &pod.counters;
    c.inbound_accepted.inc();
    let fail = |e: ProxyError| {
        c.inbound_failed.inc();
        e
    };
    // sk_lookup hands us the connection untouched, so its local address is where the client
    // was going.
    let local = client.local_addr().map_err(|source| {
        fail(ProxyError::Connect {
            addr: SocketAddr::new(pod.pod.ip, 0),
            source,
        })
    })?;
    if local.port() == mesh_common::ports::INBOUND {
        return Err(fail(ProxyError::DirectToProxyPort(local.port())));
    }
    // The kernel refuses plaintext to STRICT pods; this catches a mode change in flight.
    if cx.shared.routes().state.mtls_mode(&pod.pod) == MtlsMode::Strict {
        return Err(fail(ProxyError::StrictPlaintext(pod.pod.key.clone())));
    }
    pod.authorize(&cx.shared, None, local.port())
        .map_err(|d| fail(ProxyError::Denied(d)))?;
    let app = pod.dial_app(local.port()).await.map_err(fail)?;
    pod.relay_to_app(client, app).await;
    Ok(())
}

/// A stream that adds every byte read from it to a counter as it flows, so counters are right
/// while a connection is still open (long-lived connections would otherwise report nothing).
struct Counted<'a, S> {
    inner: S,
    read: &'a Counter,
}

impl<'a, S> Counted<'a, S> {
    fn new(inner: S, read: &'a Counter) -> Self {
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
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.add(n as u64);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
