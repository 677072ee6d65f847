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
//! - a connection is made from the source pod's netns to `<dest pod IP>:15008`, so the network
//!   sees the pod's address;
//! - the server must prove the destination workload's identity, or the handshake fails.
//!
//! Server (inbound, `serve`): the pod's 15008 listener presents the pod's certificate and
//! requires a client certificate of the trust domain. Each CONNECT is checked, in this order:
//! method → authority names a local pod with this listener's identity → L4 authorization with
//! the client certificate's identity → dial the application over the pod's loopback → 200.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, client::conn::http2::SendRequest,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::{
    identity::{self, Identity},
    proxy::{LocalPod, ProxyError, Shared},
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Identity,
    node: String,
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
    streams: Arc<AtomicUsize>,
}

impl Pooled {
    /// Takes a stream slot if the connection is open and has one free.
    fn claim(&self) -> Option<StreamSlot> {
        if self.sender.is_closed() {
            return None;
        }
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_STREAMS_PER_CONN).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.streams.clone()))
    }
}

/// One open stream on a pooled connection; frees its slot when dropped.
#[derive(Debug)]
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
#[derive(Debug, Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pool {
    /// Opens a tunnel from `src` to `target` on workload `dst`.
    pub async fn connect(
        &self,
        shared: &Shared,
        src: &LocalPod,
        dst: &Workload,
        target: SocketAddr,
    ) -> Result<Tunnel, ProxyError> {
        let src_id = src.identity();
        let dst_id = Identity::new(
            &shared.trust_domain,
            &dst.key.namespace,
            &dst.service_account,
        );
        let cert = shared.certs.wait(src_id, CERT_WAIT).await?;
        let key = PoolKey {
            src: src_id.clone(),
            node: dst.node.clone(),
            dst: dst_id.clone(),
            src_serial: cert.serial.clone(),
        };
        let pooled = lock(&self.conns).get(&key).and_then(|list| {
            list.iter()
                .find_map(|p| p.claim().map(|slot| (p.sender.clone(), slot)))
        });
        let (mut sender, slot) = match pooled {
            Some(found) => found,
            None => {
                let p = Pooled {
                    sender: self.dial(src, &cert, &dst_id, target.ip()).await?,
                    streams: Arc::new(AtomicUsize::new(0)),
                };
                let slot = p.claim().ok_or_else(|| ProxyError::Tunnel {
                    target,
                    problem: "the new HBONE connection closed at once".into(),
                })?;
                let mut conns = lock(&self.conns);
                // Drop connections made with an older certificate of the same source (they
                // finish their streams and close), and closed ones.
                conns.retain(|k, _| {
                    k == &key || !(k.src == key.src && k.node == key.node && k.dst == key.dst)
                });
                let list = conns.entry(key).or_default();
                list.retain(|p| !p.sender.is_closed());
                list.push(p.clone());
                (p.sender, slot)
            }
        };
        let tunnel = |problem: String| ProxyError::Tunnel { target, problem };
        sender
            .ready()
            .await
            .map_err(|e| tunnel(format!("HBONE connection closed: {e}")))?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| tunnel(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| tunnel(format!("CONNECT: {e}")))?;
        if resp.status() != StatusCode::OK {
            return Err(ProxyError::TunnelRefused {
                target,
                status: resp.status(),
            });
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
        cert: &crate::certs::WorkloadCert,
        dst_id: &Identity,
        ip: std::net::IpAddr,
    ) -> Result<SendRequest<Empty<Bytes>>, ProxyError> {
        let addr = SocketAddr::new(ip, mesh_common::ports::HBONE);
        let tunnel = |problem: String| ProxyError::Tunnel {
            target: addr,
            problem,
        };
        let config = cert.client_config(dst_id)?;
        let sock = src.netns.tcp_socket(addr).await?;
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| tunnel("connect timed out".into()))?
            .map_err(|source| ProxyError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::IpAddress(ip.into());
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config)
                .connect(name, crate::ktls::Corked::new(tcp, crate::ktls::in_use())),
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
            .handshake(TokioIo::new(
                crate::ktls::hand_over(tls.into()).map_err(|e| tunnel(e.to_string()))?,
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

/// Serves one TCP connection accepted on a pod's 15008 listener.
pub async fn serve(
    shared: Arc<Shared>,
    pod: Arc<LocalPod>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let my_id = pod.identity();
    let cert = shared.certs.wait(my_id, CERT_WAIT).await?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(cert.server_config())
            .accept(crate::ktls::Corked::new(stream, crate::ktls::in_use())),
    )
    .await
    .map_err(|_| ProxyError::Handshake {
        peer,
        problem: "timed out".into(),
    })?
    .map_err(|e| ProxyError::Handshake {
        peer,
        problem: e.to_string(),
    })?;
    let handshake_err = |problem: String| ProxyError::Handshake { peer, problem };
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| handshake_err("no client certificate".into()))?;
    let client_id = identity::svid_identity(leaf).map_err(|e| handshake_err(e.to_string()))?;
    let (client_expiry, ..) =
        crate::certs::validity(leaf).map_err(|e| handshake_err(e.to_string()))?;
    pod.counters.hbone_connections.inc();
    let client = Arc::new(Client {
        id: client_id,
        expiry: client_expiry,
    });
    let svc = service_fn(move |req| {
        let (shared, pod, client) = (shared.clone(), pod.clone(), client.clone());
        async move {
            Ok::<_, std::convert::Infallible>(
                connect_stream(&shared, &pod, &client, peer, req).await,
            )
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .serve_connection(
            TokioIo::new(
                crate::ktls::hand_over(tls.into()).map_err(|e| handshake_err(e.to_string()))?,
            ),
            svc,
        );
    // The client's identity holds only while its certificate does: at expiry the connection
    // and every stream on it end, so pooled streams cannot outlive the proof.
    let left = client_expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::select! {
        r = conn => r.map_err(|e| ProxyError::Handshake {
            peer,
            problem: format!("HTTP/2: {e}"),
        }),
        () = tokio::time::sleep(left) => {
            info!(%peer, "closed an HBONE connection: the client's certificate expired");
            Ok(())
        }
    }
}

/// The authenticated client of one HBONE connection.
#[derive(Debug)]
struct Client {
    id: Identity,
    /// Its certificate's expiry: TLS checked it once, at the handshake, so each new stream on a
    /// long-lived connection checks it again.
    expiry: std::time::SystemTime,
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// Checks one CONNECT and, once the application accepted, answers 200 and relays in the
/// background.
async fn connect_stream(
    shared: &Arc<Shared>,
    listener_pod: &Arc<LocalPod>,
    client: &Arc<Client>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let c = &listener_pod.counters;
    if std::time::SystemTime::now() >= client.expiry {
        c.hbone_refused.inc();
        warn!(%peer, src = %client.id, "refused HBONE stream: the client's certificate has expired since the handshake");
        return status(StatusCode::UNAUTHORIZED);
    }
    if req.method() != Method::CONNECT {
        c.hbone_refused.inc();
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        c.hbone_refused.inc();
        warn!(%peer, uri = %req.uri(), "HBONE CONNECT without an <ip>:<port> authority");
        return status(StatusCode::BAD_REQUEST);
    };
    // Only pods behind this listener: on this node, with the identity this TLS session proved.
    let my_id = listener_pod.identity();
    let dest = shared
        .local_pod(target.ip())
        .filter(|p| p.identity() == my_id);
    let Some(dest) = dest else {
        c.hbone_refused.inc();
        warn!(%peer, %target, listener = %listener_pod.pod.key, "refused HBONE CONNECT: the authority is not a pod behind this listener");
        return status(StatusCode::BAD_REQUEST);
    };
    let Ok(per_request) = dest.admit(shared, Some(&client.id), peer, target.port()) else {
        return status(StatusCode::FORBIDDEN);
    };
    let app = match dest.dial_app(target.port()).await {
        Ok(a) => a,
        Err(e) => {
            warn!(dst = %dest.pod.key, "{e}");
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let client = client.id.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        match hyper::upgrade::on(&mut req).await {
            Ok(up) => {
                dest.counters.hbone_streams.inc();
                debug!(src = %client, dst = %dest.pod.key, port = target.port(), "HBONE stream");
                let stream = TokioIo::new(up);
                dest.deliver(
                    &shared,
                    Some(client),
                    peer,
                    target.port(),
                    per_request,
                    stream,
                    app,
                )
                .await;
            }
            Err(e) => warn!(%peer, "HBONE upgrade: {e}"),
        }
    });
    status(StatusCode::OK)
}
