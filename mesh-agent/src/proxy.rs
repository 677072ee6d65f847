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

pub mod metrics;
pub mod relay;
pub mod splice;

use self::metrics::TcpConn;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tracing::{debug, warn};

use crate::{
    bpf::OrigDstTable,
    certs::{CertError, CertManager},
    flows::{Draft, FlowLog},
    hbone,
    identity::Identity,
    l7,
    metrics::{Flow, Peer, Reporter, Security},
    netns::{Netns, NetnsError},
    policy::{self, Decision, HttpAttributes},
    state::{MtlsMode, NodeState, ObjectKey, Pod, Service, Workload},
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
    /// A policy change closed a connection it had allowed.
    #[error("closed: policy no longer allows the connection")]
    Revoked,
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
    /// Upstream connections opened over HBONE: one per connection at L4, one per pooled
    /// upstream connection at L7.
    pub outbound_hbone: Counter,
    /// Upstream connections handed to a pod on this node, counted the same way.
    pub outbound_local: Counter,
    /// Of those, connections spliced in the kernel (their bytes never reach the proxy).
    pub outbound_spliced: Counter,
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
    /// Bytes this pod's clients sent through the proxy.
    pub outbound_bytes_sent: Counter,
    /// Bytes the proxy sent back to this pod's clients.
    pub outbound_bytes_received: Counter,
    /// Bytes delivered to this pod's application.
    pub inbound_bytes_delivered: Counter,
    /// Outbound connections handled at L7 (HTTP detected).
    pub outbound_http: Counter,
    /// HTTP requests handled at L7: this pod's outbound ones, and inbound ones parsed for L7
    /// policy.
    pub http_requests: Counter,
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
    /// Upgrade tokens allowed to (pod address, target port), from the services that send there.
    inbound_upgrades: HashMap<(IpAddr, u16), Vec<String>>,
    /// The state the routes were built from: workloads, modes and policies.
    pub state: Arc<NodeState>,
    /// HTTP routes, balancers and limits by service.
    pub l7: l7::Table,
}

impl Routes {
    /// The upgrade tokens allowed to `port` of the local pod at `ip`: those of every service
    /// that sends that port to it, or the default when none does.
    pub fn upgrades_to(&self, ip: IpAddr, port: u16) -> &[String] {
        self.inbound_upgrades
            .get(&(ip, port))
            .map_or(&crate::state::DEFAULT_UPGRADES, |u| u)
    }

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
        let mut inbound_upgrades: HashMap<(IpAddr, u16), Vec<String>> = HashMap::new();
        for s in state.services.values() {
            for (ip, p) in s
                .endpoints
                .iter()
                .flat_map(|ip| s.ports.iter().map(move |p| (ip, p)))
            {
                let all = inbound_upgrades.entry((*ip, p.target_port)).or_default();
                all.extend(s.upgrades.iter().cloned());
                all.sort();
                all.dedup();
            }
        }
        Self {
            by_vip,
            inbound_upgrades,
            l7: l7::Table::build(state, &old.l7),
            state: state.clone(),
        }
    }

    /// The L7 entry of the service whose address is `ip`.
    pub fn service_at(&self, ip: IpAddr) -> Option<&Arc<l7::ServiceEntry>> {
        self.by_vip
            .get(&ip)
            .and_then(|r| self.l7.service(&r.svc.key))
    }

    /// `destination_service` for a connection to `ip`: the service's FQDN when `ip` is a
    /// service address.
    pub fn service_name_at(&self, ip: IpAddr) -> String {
        self.by_vip.get(&ip).map_or_else(
            || crate::metrics::UNKNOWN.to_string(),
            |r| crate::metrics::service_fqdn(&r.svc.key),
        )
    }

    /// Whether connections to `dst` get protocol detection: mesh destinations (a service
    /// address or a workload), except service ports declared `appProtocol: tcp`.
    pub fn detects(&self, dst: SocketAddr) -> bool {
        match self.by_vip.get(&dst.ip()) {
            Some(r) => !r.svc.is_opaque(dst.port()),
            None => self.state.workloads.contains_key(&dst.ip()),
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
    /// Splices same-node L4 connections in the kernel; `None` when turned off.
    pub splice: Option<Arc<splice::Splicer>>,
    /// Enrolled pods of this node by address.
    pub local: RwLock<HashMap<IpAddr, Arc<LocalPod>>>,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// Pooled HBONE connections.
    pub pool: hbone::Pool,
    /// Pooled upstream HTTP connections (L7).
    pub http_pool: Arc<l7::upstream::Pool>,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The node's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Flow records: the access log and `/debug/flows`.
    pub flows: Arc<FlowLog>,
    /// HTTP/1 head and idle timeouts.
    pub http_timeouts: crate::config::HttpTimeouts,
}

impl Shared {
    /// Current routes (and the state they came from).
    pub fn routes(&self) -> Arc<Routes> {
        match self.routes.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The workload at `ip` as metric labels name it, when `proven` (the identity a handshake
    /// proved, or the kernel's word for a local pod) is its identity; a proven identity at an
    /// unknown address keeps its principal. An address alone proves nothing: without an
    /// identity the peer is unknown.
    pub fn peer_at(&self, ip: IpAddr, proven: Option<&Identity>) -> Peer {
        let Some(id) = proven else {
            return Peer::unknown();
        };
        let routes = self.routes();
        match routes.state.workloads.get(&ip) {
            Some(w)
                if w.key.namespace == id.namespace && w.service_account == id.service_account =>
            {
                Peer::new(&w.key, id)
            }
            _ => Peer {
                principal: id.to_string(),
                ..Peer::unknown()
            },
        }
    }

    /// The identity of workload `w`.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        Identity::new(&self.trust_domain, &w.key.namespace, &w.service_account)
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

/// How a source pod reaches an address.
#[derive(Debug, Clone)]
pub enum Hop {
    /// A pod on this node: straight to its application (no TLS: the bytes stay in the kernel).
    Local(Arc<LocalPod>),
    /// A mesh workload on another node: HBONE.
    Hbone(Workload),
    /// Outside the mesh: plain TCP from the source pod's netns.
    Passthrough,
}

impl Hop {
    /// The hop to `ip`.
    pub fn to(shared: &Shared, routes: &Routes, ip: IpAddr) -> Self {
        if let Some(dest) = shared.local_pod(ip) {
            Self::Local(dest)
        } else if let Some(w) = routes.state.workloads.get(&ip) {
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
    Tunnel(crate::hbone::Tunnel),
}

/// Opens a connection from `src` to `target` along `hop`. Authorization is the caller's.
pub async fn open(
    shared: &Shared,
    src: &LocalPod,
    hop: &Hop,
    target: SocketAddr,
) -> Result<UpstreamIo, ProxyError> {
    match hop {
        Hop::Local(dest) => dest.dial_app(target.port()).await.map(UpstreamIo::Tcp),
        Hop::Hbone(w) => shared
            .pool
            .connect(shared, src, w, target)
            .await
            .map(UpstreamIo::Tunnel),
        Hop::Passthrough => {
            let sock = src.netns.tcp_socket(target).await?;
            let s = sock
                .connect(target)
                .await
                .map_err(|source| ProxyError::Connect {
                    addr: target,
                    source,
                })?;
            let _ = s.set_nodelay(true);
            Ok(UpstreamIo::Tcp(s))
        }
    }
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

/// One enrolled pod as connection tasks see it.
#[derive(Debug)]
pub struct LocalPod {
    /// The pod as enrolled.
    pub pod: Pod,
    /// Its namespace thread.
    pub netns: Arc<Netns>,
    /// Its counters.
    pub counters: Arc<PodCounters>,
    /// Its SPIFFE identity, made once: requests consult it on every hop.
    id: Identity,
    /// Connections to the application authorized once, at L4: re-checked when policy changes.
    live: Mutex<HashMap<u64, LiveConn>>,
    next_live: AtomicU64,
}

/// A connection authorized at L4 and still open.
#[derive(Debug)]
struct LiveConn {
    source: Option<Identity>,
    port: u16,
    revoke: Arc<tokio::sync::Notify>,
}

/// Registration of a live connection; dropping it removes the registration.
#[derive(Debug)]
pub struct Tracked<'a> {
    pod: &'a LocalPod,
    id: u64,
    revoke: Arc<tokio::sync::Notify>,
}

impl Tracked<'_> {
    /// Runs `relay` until it ends (its output) or policy stops allowing the connection (`None`).
    pub async fn run<F: std::future::Future>(&self, relay: F) -> Option<F::Output> {
        tokio::select! {
            out = relay => Some(out),
            () = self.revoke.notified() => {
                warn!(dst = %self.pod.pod.key, "closed a connection that policy no longer allows");
                None
            }
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        lock(&self.pod.live).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LocalPod {
    /// A pod as connection tasks see it.
    pub fn new(pod: Pod, netns: Arc<Netns>, trust_domain: &str) -> Self {
        Self {
            id: Identity::new(trust_domain, &pod.key.namespace, &pod.service_account),
            pod,
            netns,
            counters: Arc::default(),
            live: Mutex::default(),
            next_live: AtomicU64::new(0),
        }
    }

    /// Registers a connection from `source` to `port` that was authorized at L4.
    pub fn track(&self, source: Option<Identity>, port: u16) -> Tracked<'_> {
        let id = self.next_live.fetch_add(1, Ordering::Relaxed);
        let revoke = Arc::new(tokio::sync::Notify::new());
        lock(&self.live).insert(
            id,
            LiveConn {
                source,
                port,
                revoke: revoke.clone(),
            },
        );
        Tracked {
            pod: self,
            id,
            revoke,
        }
    }

    /// Re-decides every live L4 connection after a policy change, and closes those now denied
    /// (a pooled connection must not keep carrying what policy has since refused).
    pub fn recheck(&self, shared: &Shared) {
        let live = lock(&self.live);
        for conn in live.values() {
            if self
                .authorize(shared, conn.source.as_ref(), None, conn.port, None)
                .is_err()
            {
                conn.revoke.notify_one();
            }
        }
    }

    /// The pod's SPIFFE identity.
    pub fn identity(&self) -> &Identity {
        &self.id
    }

    /// Authorizes a connection (`http: None`) or a request to this pod on `port` from
    /// `source` (at address `from`, when known); logs and counts a denial, and files a
    /// connection's denial as a flow record (a request's denial is filed with the request).
    pub fn authorize(
        &self,
        shared: &Shared,
        source: Option<&Identity>,
        from: Option<SocketAddr>,
        port: u16,
        http: Option<&HttpAttributes<'_>>,
    ) -> Result<(), Decision> {
        let routes = shared.routes();
        let decision = policy::evaluate(
            &routes.state.authorization_policies,
            &policy::Request {
                source,
                namespace: &self.pod.key.namespace,
                labels: &self.pod.labels,
                port,
                http,
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
        match http {
            Some(h) => {
                warn!(%src, dst = %self.pod.key, port, method = h.method, path = h.path, "request {decision}");
            }
            None => {
                warn!(%src, dst = %self.pod.key, port, "connection {decision}");
                let peer = from.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
                let mut draft = Draft::new(self.inbound_flow(shared, source, peer));
                draft.src_addr = from;
                draft.dst_addr = Some(SocketAddr::new(self.pod.ip, port));
                draft.denied(&decision);
                shared.flows.record(draft);
            }
        }
        Err(decision)
    }

    /// A flow to this pod from `source` at `peer`, as this pod's node reports it: mTLS when
    /// HBONE proved the source's identity.
    pub fn inbound_flow(&self, shared: &Shared, source: Option<&Identity>, peer: IpAddr) -> Flow {
        Flow {
            reporter: Reporter::Destination,
            src: shared.peer_at(peer, source),
            dst: Peer::new(&self.pod.key, self.identity()),
            service: crate::metrics::UNKNOWN.into(),
            security: if source.is_some() {
                Security::MutualTls
            } else {
                Security::None
            },
        }
    }

    /// Admits a connection to this pod: `Ok(true)` when L7 policy selects the pod, so the
    /// decision waits for each request (see [`LocalPod::deliver`]).
    pub fn admit(
        &self,
        shared: &Shared,
        source: Option<&Identity>,
        from: SocketAddr,
        port: u16,
    ) -> Result<bool, Decision> {
        if shared.routes().state.has_l7_policy(&self.pod) {
            return Ok(true);
        }
        self.authorize(shared, source, Some(from), port, None)
            .map(|()| false)
    }

    /// Delivers an admitted connection to the application. Without `per_request`, `app` is the
    /// connection to it, dialled once L4 policy allowed. With `per_request` nothing is dialled
    /// yet: HTTP is authorized request by request and the application is dialled for the first
    /// allowed request; anything else gets the connection-level decision, in which HTTP-only
    /// rules fail closed, and is dialled only if allowed. So a refused connection never reaches
    /// the application, not even as an empty accept.
    #[expect(
        clippy::too_many_arguments,
        reason = "one hand-over point for both inbound paths"
    )]
    pub async fn deliver<S>(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        source: Option<Identity>,
        peer: SocketAddr,
        port: u16,
        per_request: bool,
        client: S,
        app: Option<TcpStream>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let flow = || self.inbound_flow(shared, source.as_ref(), peer.ip());
        if !per_request {
            if let Some(app) = app {
                self.relay_recorded(shared, client, app, flow(), source, peer, port)
                    .await;
            }
            return;
        }
        let (protocol, client) = match l7::detect::detect(client).await {
            Ok(x) => x,
            Err(e) => {
                debug!(dst = %self.pod.key, "protocol detection: {e}");
                return;
            }
        };
        if protocol.is_http() {
            let client = Counted::new(client, &self.counters, |c| &c.inbound_bytes_delivered);
            let from = flow().src;
            l7::serve_inbound(
                shared.clone(),
                self.clone(),
                source,
                (from, peer),
                port,
                protocol,
                client,
            )
            .await;
        } else if self
            .authorize(shared, source.as_ref(), Some(peer), port, None)
            .is_ok()
        {
            match self.dial_app(port).await {
                Ok(app) => {
                    self.relay_recorded(shared, client, app, flow(), source, peer, port)
                        .await;
                }
                Err(e) => warn!(dst = %self.pod.key, "{e}"),
            }
        }
    }

    /// Relays a connection authorized at L4 to the application, for as long as policy allows
    /// it, and files its flow record.
    #[expect(
        clippy::too_many_arguments,
        reason = "the hand-over's context, passed on from `deliver`"
    )]
    async fn relay_recorded<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        shared: &Shared,
        client: C,
        app: TcpStream,
        flow: Flow,
        source: Option<Identity>,
        peer: SocketAddr,
        port: u16,
    ) {
        let conn = shared.metrics.tcp.open(&flow);
        let mut draft = Draft::new(flow);
        draft.src_addr = Some(peer);
        draft.dst_addr = Some(SocketAddr::new(self.pod.ip, port));
        let tracked = self.track(source, port);
        match tracked.run(self.relay_to_app(client, app, conn)).await {
            Some(bytes) => (draft.bytes_received, draft.bytes_sent) = bytes,
            None => draft.failed("-", ProxyError::Revoked.to_string()),
        }
        shared.flows.record(draft);
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

    /// Relays between a client and this pod's application, counting delivered bytes live;
    /// returns the bytes (from the client, to the client).
    pub async fn relay_to_app<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut client: S,
        mut app: TcpStream,
        conn: TcpConn,
    ) -> (u64, u64) {
        let mut client = Counted::new(&mut client, &self.counters, |c| &c.inbound_bytes_delivered)
            .metered(&conn);
        let _ = relay::copy_both(&mut client, &mut app).await;
        client.totals()
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
        let local = Arc::new(LocalPod::new(pod, netns, &shared.trust_domain));
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
                // Denials were logged with their policy where they were decided, revocations
                // where they happened.
                Ok(()) | Err(ProxyError::Denied(_) | ProxyError::Revoked) => {}
                Err(e) => warn!(pod = %cx.local.pod.key, ?kind, %peer, "connection failed: {e}"),
            }
        });
    }
}

/// What an outbound connection's flow record needs, noted as the connection is handled.
#[derive(Debug, Default)]
struct Note {
    /// The original destination.
    dst: Option<SocketAddr>,
    /// The endpoint chosen for it.
    target: Option<SocketAddr>,
    flow: Option<Flow>,
    /// (from the client, to the client).
    bytes: (u64, u64),
    /// Handled at L7: each request files its own record.
    l7: bool,
}

/// Handles a captured outbound connection and files its flow record (a denial was filed where it
/// was decided, with its policy).
async fn outbound(cx: &PodCx, client: TcpStream, peer: SocketAddr) -> Result<(), ProxyError> {
    let started = std::time::SystemTime::now();
    let mut note = Note::default();
    let result = outbound_relay(cx, client, peer, &mut note).await;
    if note.l7 || matches!(result, Err(ProxyError::Denied(_))) {
        return result;
    }
    let src = &cx.local;
    let flow = note.flow.take().unwrap_or_else(|| Flow {
        reporter: Reporter::Source,
        src: Peer::new(&src.pod.key, src.identity()),
        dst: Peer::unknown(),
        service: note.dst.map_or_else(
            || crate::metrics::UNKNOWN.into(),
            |d| cx.shared.routes().service_name_at(d.ip()),
        ),
        security: Security::None,
    });
    let mut draft = Draft::new(flow);
    draft.started = started;
    draft.src_addr = Some(SocketAddr::new(src.pod.ip, peer.port()));
    draft.dst_addr = note.target.or(note.dst);
    (draft.bytes_received, draft.bytes_sent) = note.bytes;
    match &result {
        Ok(()) => {}
        Err(
            e @ ProxyError::TunnelRefused {
                status: http::StatusCode::FORBIDDEN,
                ..
            },
        ) => {
            draft.verdict = crate::flows::Verdict::Deny;
            draft.flags = "RBAC".into();
            draft.reason = Some(format!("{e} (the destination's policy)"));
        }
        Err(e @ ProxyError::NoEndpoints { .. }) => draft.failed("UH", e.to_string()),
        Err(
            e @ (ProxyError::Connect { .. }
            | ProxyError::Tunnel { .. }
            | ProxyError::TunnelRefused { .. }
            | ProxyError::Cert(_)
            | ProxyError::Netns(_)),
        ) => draft.failed("UF", e.to_string()),
        Err(e) => draft.failed("-", e.to_string()),
    }
    cx.shared.flows.record(draft);
    result
}

async fn outbound_relay(
    cx: &PodCx,
    client: TcpStream,
    peer: SocketAddr,
    note: &mut Note,
) -> Result<(), ProxyError> {
    let (src, shared) = (&cx.local, &cx.shared);
    let c = &src.counters;
    c.outbound_accepted.inc();
    let fail = |e: ProxyError| {
        c.outbound_failed.inc();
        e
    };
    shared.metrics.capture.captured.inc();
    let dst = shared
        .orig_dst
        .take(src.netns.cookie(), peer.port())
        .map_err(|e| fail(ProxyError::OrigDstMap(e)))?
        .ok_or_else(|| {
            shared.metrics.capture.orig_dst_misses.inc();
            fail(ProxyError::NoOrigDst(peer.port()))
        })?;
    note.dst = Some(dst);
    let routes = shared.routes();
    // Mesh destinations get protocol detection: HTTP is proxied per request.
    let client = if routes.detects(dst) {
        let (protocol, client) = l7::detect::detect(client)
            .await
            .map_err(|source| fail(ProxyError::Connect { addr: dst, source }))?;
        if protocol.is_http() {
            debug!(src = %src.pod.key, %dst, ?protocol, "outbound HTTP");
            let cx = Arc::new(l7::Outbound {
                shared: shared.clone(),
                src: src.clone(),
                dst,
                h2: protocol == l7::detect::Protocol::Http2,
            });
            let client = Counted::new(client, c, |c| &c.outbound_bytes_sent)
                .and_writes(|c| &c.outbound_bytes_received);
            note.l7 = true;
            l7::serve_outbound(cx, client, protocol).await;
            return Ok(());
        }
        client
    } else {
        l7::detect::Rewind::new(client)
    };
    let target = routes.resolve(dst).map_err(fail)?;
    note.target = Some(target);
    let hop = Hop::to(shared, &routes, target.ip());
    let flow = Flow {
        reporter: Reporter::Source,
        src: Peer::new(&src.pod.key, src.identity()),
        dst: match &hop {
            Hop::Local(dest) => Peer::new(&dest.pod.key, dest.identity()),
            Hop::Hbone(w) => Peer::new(&w.key, &shared.identity_of(w)),
            Hop::Passthrough => Peer::unknown(),
        },
        service: routes.service_name_at(dst.ip()),
        security: match &hop {
            Hop::Hbone(_) => Security::MutualTls,
            _ => Security::None,
        },
    };
    note.flow = Some(flow.clone());
    if let Hop::Local(dest) = &hop {
        // Same node: the kernel told us the source pod, so its identity needs no certificate.
        // Detection found no HTTP, so HTTP-only rules fail closed.
        let src_id = src.identity();
        let from = SocketAddr::new(src.pod.ip, peer.port());
        dest.authorize(shared, Some(src_id), Some(from), target.port(), None)
            .map_err(|d| fail(ProxyError::Denied(d)))?;
    }
    let upstream = open(shared, src, &hop, target).await.map_err(fail)?;
    let client = Counted::new(client, c, |c| &c.outbound_bytes_sent);
    let mut upstream = Counted::new(upstream, c, |c| &c.outbound_bytes_received);
    let conn = shared.metrics.tcp.open(&flow);
    let mut client = client.metered(&conn);
    match &hop {
        Hop::Local(dest) => {
            c.outbound_local.inc();
            debug!(src = %src.pod.key, dst = %dest.pod.key, %target, "same-node delivery");
            // One proxy is both ends here, so it reports both.
            let dest_conn = shared
                .metrics
                .tcp
                .open(&flow.reported_by(Reporter::Destination));
            let mut delivered =
                Counted::new(&mut client, &dest.counters, |c| &c.inbound_bytes_delivered)
                    .metered(&dest_conn);
            let tracked = dest.track(Some(src.identity().clone()), target.port());
            let splicer = shared.splice.as_ref();
            let finished = tracked
                .run(relay::copy_both_until(
                    &mut delivered,
                    &mut upstream,
                    splicer.map(|s| s.after_bytes()),
                ))
                .await;
            drop(delivered);
            note.bytes = client.totals();
            let handed = match (finished, splicer) {
                (None, _) => return Err(ProxyError::Revoked),
                (Some(Ok(relay::Relayed::HandOff)), Some(splicer)) => {
                    let conns = [&conn, &dest_conn];
                    hand_off(src, dest, splicer, client, upstream, conns, &tracked).await
                }
                _ => return Ok(()),
            };
            let (up, down) = handed?;
            note.bytes.0 += up;
            note.bytes.1 += down;
            return Ok(());
        }
        Hop::Hbone(w) => {
            c.outbound_hbone.inc();
            debug!(src = %src.pod.key, dst = %w.key, %target, "outbound over HBONE");
            let _ = relay::copy_both(&mut client, &mut upstream).await;
        }
        Hop::Passthrough => {
            debug!(pod = %src.pod.key, %dst, %target, "outbound passthrough");
            let _ = relay::copy_both(&mut client, &mut upstream).await;
        }
    }
    note.bytes = client.totals();
    Ok(())
}

/// Hands a same-node connection that has proven bulk to the kernel, and runs it to its end.
/// Returns the bytes moved from here on (client to application, application to client),
/// counted into the same counters the relay fed live.
async fn hand_off(
    src: &LocalPod,
    dest: &LocalPod,
    splicer: &Arc<splice::Splicer>,
    client: Counted<l7::detect::Rewind<TcpStream>>,
    upstream: Counted<UpstreamIo>,
    conns: [&TcpConn; 2],
    tracked: &Tracked<'_>,
) -> Result<(u64, u64), ProxyError> {
    let UpstreamIo::Tcp(app) = upstream.into_inner() else {
        // Same-node upstreams are always sockets; nothing else is ever handed off.
        return Ok((0, 0));
    };
    let c = &src.counters;
    let count = |up: u64, down: u64| {
        c.outbound_bytes_sent.add(up);
        c.outbound_bytes_received.add(down);
        dest.counters.inbound_bytes_delivered.add(up);
        for conn in conns {
            conn.received.inc_by(up);
            conn.sent.inc_by(down);
        }
    };
    let mut spliced = match splicer.splice(client.into_inner(), app).await {
        Ok(s) => s,
        Err(splice::NotSpliced::Failed(e)) => {
            debug!(src = %src.pod.key, dst = %dest.pod.key, "splice failed, connection lost: {e}");
            return Ok((0, 0));
        }
        Err(splice::NotSpliced::Declined(d)) => {
            // The kernel's maps are full: keep relaying here.
            debug!(src = %src.pod.key, dst = %dest.pod.key, "not spliced: {}", d.why);
            let (mut client, mut app) = (d.client, d.app);
            let copied = tracked.run(relay::copy_both(&mut client, &mut app)).await;
            let (up, down) = match copied {
                None => return Err(ProxyError::Revoked),
                Some(r) => r.unwrap_or((0, 0)),
            };
            count(up, down);
            return Ok((up, down));
        }
    };
    c.outbound_spliced.inc();
    debug!(src = %src.pod.key, dst = %dest.pod.key, "same-node connection spliced");
    let finished = tracked.run(spliced.run()).await;
    let (up, down) = spliced.totals();
    drop(spliced);
    count(up, down);
    match finished {
        None => Err(ProxyError::Revoked),
        Some(r) => {
            if let Err(e) = r {
                debug!(src = %src.pod.key, dst = %dest.pod.key, "spliced connection ended: {e}");
            }
            Ok((up, down))
        }
    }
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
    let peer = client.peer_addr().unwrap_or(local);
    let per_request = pod
        .admit(&cx.shared, None, peer, local.port())
        .map_err(|d| fail(ProxyError::Denied(d)))?;
    // Per-request pods are dialled only once a request (or, for non-HTTP, the connection) is
    // allowed.
    let app = if per_request {
        None
    } else {
        Some(pod.dial_app(local.port()).await.map_err(fail)?)
    };
    pod.deliver(
        &cx.shared,
        None,
        peer,
        local.port(),
        per_request,
        client,
        app,
    )
    .await;
    Ok(())
}

/// Picks one counter out of a pod's counters.
type Pick = fn(&PodCounters) -> &Counter;

/// A stream that adds the bytes read from it (and, optionally, written to it) to a pod's
/// counters as they flow, so counters are right while a connection is still open (long-lived
/// connections would otherwise report nothing). It owns its counters, so it can move into tasks.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    counters: Arc<PodCounters>,
    read: Pick,
    written: Option<Pick>,
    /// A connection's Istio counters: reads are bytes from its client, writes bytes to it.
    metered: Option<(prometheus::IntCounter, prometheus::IntCounter)>,
    /// This stream's own totals (read, written), for its flow record.
    totals: (u64, u64),
}

impl<S> Counted<S> {
    /// Counts reads into `read`.
    pub fn new(inner: S, counters: &Arc<PodCounters>, read: Pick) -> Self {
        Self {
            inner,
            counters: counters.clone(),
            read,
            written: None,
            metered: None,
            totals: (0, 0),
        }
    }

    /// Bytes read from and written to this stream so far.
    pub fn totals(&self) -> (u64, u64) {
        self.totals
    }

    /// The stream, for a hand-over that counts by other means.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Also adds reads to `conn`'s received bytes and writes to its sent bytes: this stream is
    /// the client's end of `conn`.
    pub fn metered(mut self, conn: &TcpConn) -> Self {
        self.metered = Some((conn.received.clone(), conn.sent.clone()));
        self
    }

    /// Also counts writes, into `written`.
    pub fn and_writes(mut self, written: Pick) -> Self {
        self.written = Some(written);
        self
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.totals.0 += n as u64;
        (self.read)(&self.counters).add(n as u64);
        if let Some((received, _)) = &self.metered {
            received.inc_by(n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.totals.1 += *n as u64;
            if let Some(w) = self.written {
                w(&self.counters).add(*n as u64);
            }
            if let Some((_, sent)) = &self.metered {
                sent.inc_by(*n as u64);
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
