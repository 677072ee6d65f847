//! HBONE: TCP tunnelled as HTTP/2 CONNECT streams over mTLS, between nodes, on port 15008.
//!
//! Client (outbound, `connect`): a stream is `CONNECT <dest pod IP>:<port>` on a pooled HTTP/2
//! connection. The pool invariants:
//! - one key per (source identity, destination node, destination identity), plus the serial of
//!   the source certificate, so a renewed certificate starts a fresh connection and old ones
//!   drain with their streams;
//! - a key holds as many connections as its open streams need, at most
//!   [`MAX_STREAMS_PER_CONN`] streams each: a stream over the server's limit would wait,
//!   unopened, for another to end, so a node with thousands of connections to one pod would
//!   stall. A stream is counted until its tunnel is dropped;
//! - concurrent callers share a dial in progress: a caller that finds no free stream joins a
//!   dial that has room for it (each promises [`MAX_STREAMS_PER_CONN`] streams) and starts one
//!   only when every dial in progress is spoken for, so N concurrent tunnels open about
//!   N / [`MAX_STREAMS_PER_CONN`] connections, never one each;
//! - a connection with no open stream for the idle timeout is taken out of the pool and closes
//!   (GOAWAY), so connections and descriptors return to zero when traffic stops;
//! - a connection is made from the source pod's netns to `<dest pod IP>:15008`, so the network
//!   sees the pod's address;
//! - the server must prove the destination workload's identity, or the handshake fails.
//!
//! Server (inbound, `serve`): the pod's 15008 listener presents the pod's certificate and
//! requires a client certificate of the trust domain. Each CONNECT is checked, in this order:
//! method → authority names a local pod with this listener's identity → L4 authorization with
//! the client certificate's identity → dial the application over the pod's loopback → 200.
//!
//! A CONNECT whose stream the source node filled with HTTP requests it routed says so
//! ([`PAYLOAD_HEADER`]), so the destination node parses them too and reports them as
//! `reporter="destination"`, as Istio's sidecars do. The hint only asks for parsing: it grants
//! nothing, and a stream that is not HTTP after all is decided at L4 as any other.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{closing::Closing, error::TransportError, ktls};
use crate::{
    identity::{
        self, Identity,
        certs::{CertManager, WorkloadCert},
    },
    pods::LocalPod,
    state::Workload,
};

/// How long a connection waits for its pod's first certificate before giving up.
pub const CERT_WAIT: Duration = Duration::from_secs(10);
/// HTTP/2 windows: large enough that one stream can fill a fast link.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// The largest HTTP/2 frame each end accepts: a relay reads up to 64 KiB at a time, and one
/// frame per read means one TLS write (four records, one `writev`) where 16 KiB frames took
/// four.
const MAX_FRAME: u32 = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a pooled connection may be shared by. The source netns is part of it: connections
/// are made from the source pod's netns, and a pod whose sandbox was recreated (same identity,
/// new netns) must not be handed the old netns's connections, which lead nowhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    src_netns: u64,
    node: Arc<str>,
    dst: Identity,
    src_serial: String,
}

/// Streams one pooled connection carries before the pool opens another; below the server's
/// limit ([`SERVER_MAX_STREAMS`]).
pub const MAX_STREAMS_PER_CONN: usize = 100;
/// Concurrent streams a 15008 listener accepts on one connection.
const SERVER_MAX_STREAMS: u32 = 1024;

/// One pooled connection and how many of its streams are open.
#[derive(Debug, Clone)]
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<Streams>,
}

/// A connection's open streams, and since when it has had none.
#[derive(Debug)]
struct Streams {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// The server stopped taking streams on it (GOAWAY: it drains): claim no more.
    going_away: std::sync::atomic::AtomicBool,
}

impl Streams {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            going_away: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether no stream has been open for `timeout`.
    fn idle_for(&self, timeout: Duration) -> bool {
        self.open.load(Ordering::Acquire) == 0 && self.idle_since.lock().elapsed() >= timeout
    }
}

impl Pooled {
    /// Takes a stream slot if the connection is open and has one free.
    fn claim(&self) -> Option<StreamSlot> {
        if self.sender.is_closed() || self.streams.going_away.load(Ordering::Acquire) {
            return None;
        }
        self.streams
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS_PER_CONN).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.streams.clone()))
    }
}

/// One open stream on a pooled connection; frees its slot when dropped.
#[derive(Debug)]
struct StreamSlot(Arc<Streams>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock() = Instant::now();
        }
    }
}

/// An open HBONE stream: the tunnelled bytes, holding its connection's stream slot.
#[derive(Debug)]
pub struct Tunnel {
    /// The tunnel's byte stream.
    pub io: TokioIo<hyper::upgrade::Upgraded>,
    _slot: StreamSlot,
}

/// Pooled HTTP/2 connections to other nodes.
#[derive(Debug)]
pub struct Pool {
    conns: Arc<Mutex<HashMap<PoolKey, Entry>>>,
    next_dial: AtomicUsize,
    /// Workload certificates: each connection presents its source pod's.
    certs: Arc<CertManager>,
    /// The mesh's trust domain, for the destination's identity.
    trust_domain: String,
    /// Whether connections go to kernel TLS after the handshake.
    ktls: bool,
    /// Cancelled at the drain deadline: every connection then closes with close_notify.
    closing: CancellationToken,
}

/// One key's connections, and the dials under way for it.
#[derive(Debug, Default)]
struct Entry {
    conns: Vec<Pooled>,
    dials: Vec<Dial>,
}

/// A dial under way: how many callers count on it, and how it ended (`Some` once it has).
#[derive(Debug)]
struct Dial {
    id: usize,
    promised: usize,
    done: watch::Receiver<Option<Result<(), String>>>,
}

/// Takes a dial off its key's list when dropped, whether it ended or was abandoned; those who
/// joined it then see its sender gone and go round again.
struct Unlist<'a> {
    conns: &'a Mutex<HashMap<PoolKey, Entry>>,
    key: &'a PoolKey,
    id: usize,
}

impl Drop for Unlist<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.conns.lock().get_mut(self.key) {
            entry.dials.retain(|d| d.id != self.id);
        }
    }
}

/// What a caller does next.
enum Next {
    Claimed(SendRequest<Empty<Bytes>>, StreamSlot),
    Join(watch::Receiver<Option<Result<(), String>>>),
    Dial(usize, watch::Sender<Option<Result<(), String>>>),
}

/// What a tunnel carries, as its CONNECT tells the destination node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// Bytes the source relayed at L4.
    Opaque,
    /// HTTP requests the source routed at L7: the destination parses and reports them too.
    Http,
}

/// The target a CONNECT names: its authority must be exactly `<ip>:<port>` (a pod's address; no
/// name, no userinfo, no path). Anything else is refused by the caller.
pub fn connect_target(uri: &hyper::Uri) -> Option<SocketAddr> {
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
        return None;
    }
    let target: SocketAddr = uri.authority()?.as_str().parse().ok()?;
    (target.port() != 0).then_some(target)
}

/// The CONNECT header that names the payload.
pub const PAYLOAD_HEADER: &str = "mesh-payload";
/// Its value for [`Payload::Http`].
pub const PAYLOAD_HTTP: &str = "http";

impl Pool {
    /// An empty pool whose connections close after `idle_timeout` without a stream. Must be
    /// made inside the runtime: it starts the task that closes idle connections.
    pub fn new(
        idle_timeout: Duration,
        certs: Arc<CertManager>,
        trust_domain: &str,
        (ktls, closing): (bool, CancellationToken),
    ) -> Self {
        let conns: Arc<Mutex<HashMap<PoolKey, Entry>>> = Arc::default();
        let weak = Arc::downgrade(&conns);
        let every = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(conns) = weak.upgrade() else { return };
                let mut conns = conns.lock();
                let mut closed = 0;
                for entry in conns.values_mut() {
                    let before = entry.conns.len();
                    // Dropping the last sender of an idle connection makes hyper close it.
                    entry
                        .conns
                        .retain(|p| !p.sender.is_closed() && !p.streams.idle_for(idle_timeout));
                    closed += before - entry.conns.len();
                }
                conns.retain(|_, e| !e.conns.is_empty() || !e.dials.is_empty());
                if closed > 0 {
                    debug!(closed, "closed idle HBONE connections");
                }
            }
        });
        Self {
            conns,
            next_dial: AtomicUsize::new(0),
            certs,
            trust_domain: trust_domain.to_string(),
            ktls,
            closing,
        }
    }

    /// The generation of `id`'s certificate in force (0: none valid), so connections made with
    /// an older one are told apart.
    pub fn cert_generation(&self, id: &Identity) -> u64 {
        self.certs.get(id).map_or(0, |c| c.generation)
    }

    /// Open HBONE connections in the pool.
    pub fn connections(&self) -> usize {
        self.conns.lock().values().map(|e| e.conns.len()).sum()
    }

    /// Opens a tunnel from `src` to `target` on workload `dst`, to carry `payload`.
    pub async fn connect(
        &self,
        src: &LocalPod,
        dst: &Workload,
        target: SocketAddr,
        payload: Payload,
    ) -> Result<Tunnel, TransportError> {
        match self.connect_attempt(src, dst, target, payload).await {
            // The stream was never opened: the connection's server is draining (an agent
            // upgrade on that node). Once more, on another connection.
            Err(Attempt::Unopened(e)) => {
                debug!(%target, "{e}; opening the stream on a new connection");
                self.connect_attempt(src, dst, target, payload)
                    .await
                    .map_err(Attempt::into_error)
            }
            other => other.map_err(Attempt::into_error),
        }
    }

    async fn connect_attempt(
        &self,
        src: &LocalPod,
        dst: &Workload,
        target: SocketAddr,
        payload: Payload,
    ) -> Result<Tunnel, Attempt> {
        let src_id = src.identity();
        let dst_id = Identity::new(&self.trust_domain, &dst.key.namespace, &dst.service_account);
        let cert = self.certs.wait(src_id, CERT_WAIT).await?;
        let key = PoolKey {
            src: src_id.clone(),
            src_netns: src.netns.cookie(),
            node: dst.node.clone(),
            dst: dst_id.clone(),
            src_serial: cert.serial.clone(),
        };
        let tunnel = |problem: String| TransportError::Tunnel { target, problem };
        // A caller that joined a dial may find its streams taken by others when it ends; it
        // then goes round again, a bounded number of times.
        let mut rounds = 0;
        let (mut sender, slot) = loop {
            rounds += 1;
            let next = {
                let mut conns = self.conns.lock();
                let entry = conns.entry(key.clone()).or_default();
                entry.conns.retain(|p| !p.sender.is_closed());
                if let Some((sender, slot)) = entry
                    .conns
                    .iter()
                    .find_map(|p| p.claim().map(|slot| (p.sender.clone(), slot)))
                {
                    Next::Claimed(sender, slot)
                } else if let Some(d) = entry
                    .dials
                    .iter_mut()
                    .find(|d| d.promised < MAX_STREAMS_PER_CONN)
                {
                    d.promised += 1;
                    Next::Join(d.done.clone())
                } else {
                    let (tx, rx) = watch::channel(None);
                    let id = self.next_dial.fetch_add(1, Ordering::Relaxed);
                    entry.dials.push(Dial {
                        id,
                        promised: 1,
                        done: rx,
                    });
                    Next::Dial(id, tx)
                }
            };
            match next {
                Next::Claimed(sender, slot) => break (sender, slot),
                Next::Join(mut done) => {
                    // `Err`: the dialling caller went away; go round and dial or join anew.
                    let outcome = done.wait_for(Option::is_some).await.map(|v| v.clone());
                    if let Ok(Some(Err(e))) = outcome {
                        return Err(tunnel(e).into());
                    }
                }
                Next::Dial(id, tx) => {
                    // If this caller goes away mid-dial (its client closed), the dial must not
                    // stay listed: those who joined it would wait on nothing.
                    let _unlist = Unlist {
                        conns: &self.conns,
                        key: &key,
                        id,
                    };
                    let result = self.dial(src, &cert, &dst_id, target.ip()).await;
                    {
                        let mut conns = self.conns.lock();
                        if result.is_ok() {
                            // Connections made with an older certificate of the same source
                            // finish their streams and close.
                            conns.retain(|k, _| {
                                k == &key
                                    || !(k.src == key.src && k.node == key.node && k.dst == key.dst)
                            });
                        }
                        let entry = conns.entry(key.clone()).or_default();
                        entry.dials.retain(|d| d.id != id);
                        if let Ok(sender) = &result {
                            entry.conns.push(Pooled {
                                sender: sender.clone(),
                                streams: Streams::new(),
                            });
                        }
                    }
                    let _ = tx.send(Some(
                        result.as_ref().map(|_| ()).map_err(ToString::to_string),
                    ));
                    result?;
                }
            }
            if rounds > 8 {
                return Err(tunnel(
                    "no HBONE stream became free after several new connections".into(),
                )
                .into());
            }
        };
        let unopened = |e: hyper::Error| {
            slot.0.going_away.store(true, Ordering::Release);
            Attempt::Unopened(tunnel(format!("HBONE connection closed: {e}")))
        };
        sender.ready().await.map_err(unopened)?;
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string());
        if payload == Payload::Http {
            req = req.header(PAYLOAD_HEADER, PAYLOAD_HTTP);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| tunnel(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            if e.is_canceled() {
                unopened(e)
            } else {
                Attempt::Failed(tunnel(format!("CONNECT: {e}")))
            }
        })?;
        if resp.status() != StatusCode::OK {
            return Err(Attempt::Failed(TransportError::TunnelRefused {
                target,
                status: resp.status(),
            }));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| tunnel(format!("upgrade: {e}")))?;
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            _slot: slot,
        })
    }

    async fn dial(
        &self,
        src: &LocalPod,
        cert: &WorkloadCert,
        dst_id: &Identity,
        ip: std::net::IpAddr,
    ) -> Result<SendRequest<Empty<Bytes>>, TransportError> {
        let addr = SocketAddr::new(ip, mesh_common::ports::HBONE);
        let tunnel = |problem: String| TransportError::Tunnel {
            target: addr,
            problem,
        };
        let config = cert.client_config(dst_id)?;
        let sock = src.netns.tcp_socket(addr).await?;
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| tunnel("connect timed out".into()))?
            .map_err(|source| TransportError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::IpAddress(ip.into());
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config)
                .connect(name, ktls::Corked::new(tcp, self.ktls)),
        )
        .await
        .map_err(|_| tunnel("TLS handshake timed out".into()))?
        .map_err(|e| {
            tunnel(format!(
                "mTLS handshake with {dst_id} failed: {e} (is port 15008 reachable, and does the destination have a certificate?)"
            ))
        })?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME)
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(Closing::new(
                TokioIo::new(ktls::hand_over(tls.into()).map_err(|e| tunnel(e.to_string()))?),
                &self.closing,
            ))
            .await
            .map_err(|e| tunnel(format!("HTTP/2 handshake: {e}")))?;
        let peer = dst_id.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, "HBONE connection ended: {e}");
            }
        });
        debug!(src = %src.pod.key, dst = %dst_id, %addr, "new HBONE connection");
        Ok(sender)
    }
}

/// How one attempt to open a stream failed.
#[derive(Debug)]
enum Attempt {
    /// For good.
    Failed(TransportError),
    /// Before the server took the stream: another connection may.
    Unopened(TransportError),
}

impl Attempt {
    fn into_error(self) -> TransportError {
        match self {
            Self::Failed(e) | Self::Unopened(e) => e,
        }
    }
}

impl<E: Into<TransportError>> From<E> for Attempt {
    fn from(e: E) -> Self {
        Self::Failed(e.into())
    }
}

/// An accepted HBONE connection whose client proved a workload identity of the trust domain.
#[derive(Debug)]
pub struct Accepted {
    /// The connection's plaintext stream (in the kernel's TLS once kTLS took it over), closed
    /// cleanly at the drain deadline.
    pub io: Closing<TokioIo<ktls::Transport>>,
    /// The identity the client certificate proved.
    pub client: Identity,
    /// That certificate's expiry: TLS checked it once, at the handshake.
    pub expiry: std::time::SystemTime,
}

/// The server side of HBONE's handshake on a pod's 15008 listener: presents the certificate of
/// `my_id` and requires a client certificate of the trust domain.
pub async fn accept(
    certs: &CertManager,
    my_id: &Identity,
    stream: TcpStream,
    peer: SocketAddr,
    (ktls, closing): (bool, &CancellationToken),
) -> Result<Accepted, TransportError> {
    let cert = certs.wait(my_id, CERT_WAIT).await?;
    let handshake_err = |problem: String| TransportError::Handshake { peer, problem };
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cert.server_config())
            .accept(ktls::Corked::new(stream, ktls)),
    )
    .await
    .map_err(|_| handshake_err("timed out".into()))?
    .map_err(|e| handshake_err(e.to_string()))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| handshake_err("no client certificate".into()))?;
    let client = identity::svid_identity(leaf).map_err(|e| handshake_err(e.to_string()))?;
    let (expiry, ..) = identity::certs::validity(leaf).map_err(|e| handshake_err(e.to_string()))?;
    let io = TokioIo::new(ktls::hand_over(tls.into()).map_err(|e| handshake_err(e.to_string()))?);
    Ok(Accepted {
        io: Closing::new(io, closing),
        client,
        expiry,
    })
}

/// The HTTP/2 server settings of a 15008 listener.
pub fn server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(SERVER_MAX_STREAMS);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_target_is_an_ip_and_port_and_nothing_else() {
        // A string that is no URI never reaches the server as one.
        let t = |s: &str| {
            s.parse::<hyper::Uri>()
                .ok()
                .and_then(|u| connect_target(&u))
        };
        assert_eq!(
            t("10.0.0.1:8080"),
            Some("10.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(
            t("[fd00::1]:443"),
            Some("[fd00::1]:443".parse().expect("addr"))
        );
        for bad in [
            "example.com:80",
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:99999",
            "http://10.0.0.1:80/",
            "10.0.0.1:80/x",
            "user@10.0.0.1:80",
            "/path",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }
}
