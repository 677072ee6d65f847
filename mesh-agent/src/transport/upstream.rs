//! Upstream HTTP connection pools of the node proxy.
//!
//! Invariants:
//! - a pool key is (source pod, endpoint address, protocol): a connection carries one source
//!   pod's requests only, because the hop under it (an HBONE stream with that pod's certificate,
//!   or a socket in that pod's netns) proves who sends them;
//! - the protocol upstream is the client's (HTTP/1 stays HTTP/1, HTTP/2 and gRPC stay HTTP/2);
//! - an HTTP/1 connection is lent to one request at a time and returns to the idle list once its
//!   response has been read; HTTP/2 connections are shared by all requests, and requests that
//!   find none wait for the one dial under way for their key rather than each dialling;
//! - a service's `maxConnections` counts live connections across its endpoints; a request that
//!   finds none idle and none allowed waits (at most `http1MaxPendingRequests` of them, for at
//!   most [`PENDING_WAIT`]) and otherwise overflows.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::{
    dial::{Dialer, Hop, UpstreamIo},
    error::TransportError,
    hbone::Payload,
};
use crate::{
    pods::LocalPod,
    protocol::body::{self, Body, BoxError},
    route::limits::{Limits, Slot},
};

/// How long a request waits for a connection when the service is at `maxConnections`.
pub const PENDING_WAIT: Duration = Duration::from_secs(1);

/// How long making an upstream connection may take when the service sets no
/// `connectTimeout` (Istio's default): a silent address fails as a connect failure, which
/// retries and outlier detection see, instead of waiting out the kernel's SYN retries.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1 connections kept per key.
const MAX_IDLE: usize = 64;

/// Opens a new upstream connection, counting it as the L4 path counts its connections.
async fn open(
    dialer: &Dialer,
    src: &LocalPod,
    hop: &Hop,
    target: SocketAddr,
) -> Result<UpstreamIo, UpstreamError> {
    let io = dialer
        .open(src, hop, target, Payload::Http)
        .await
        .map_err(UpstreamError::Connect)?;
    match hop {
        Hop::Local(_) => src.counters.outbound_local.inc(),
        Hop::Hbone(_) => src.counters.outbound_hbone.inc(),
        Hop::Passthrough => {}
    }
    Ok(io)
}

/// Runs an upstream connection until it ends, then releases its slot under the service's
/// connection limit and wakes a request waiting for one.
fn drive<C>(conn: C, target: SocketAddr, slot: Option<Slot>, limits: Option<Arc<Limits>>)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(%target, "upstream connection ended: {e}");
        }
        drop(slot);
        if let Some(l) = limits {
            l.freed.notify_one();
        }
    });
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made.
    #[error("connect: {0}")]
    Connect(TransportError),
    /// The connection failed while the request was in flight (reset, closed).
    #[error("upstream connection failed: {0}")]
    Reset(hyper::Error),
    /// A pooled connection closed before the request was written; it may be resent as is.
    #[error("the pooled connection closed before the request was sent")]
    Unsent(Request<Body>),
    /// The service is at its connection limit and its pending queue is full (or the wait ran
    /// out).
    #[error("connection limit reached")]
    Overflow,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    /// How the source pod reaches the endpoint.
    pub hop: &'a Hop,
    /// The endpoint.
    pub addr: SocketAddr,
    /// HTTP/2 (otherwise HTTP/1).
    pub h2: bool,
    /// The backend service's limits, if it is a service.
    pub limits: Option<&'a Arc<Limits>>,
}

/// One checkout's way to its endpoint: who dials, from which pod, to where, pooled under which
/// key.
struct Via<'a> {
    dialer: &'a Dialer,
    src: &'a LocalPod,
    dest: &'a Dest<'a>,
    key: &'a Key,
}

#[derive(Debug)]
enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// A checked-out connection, good for one request.
#[derive(Debug)]
pub struct Conn {
    pool: Arc<Pool>,
    key: Key,
    sender: Sender,
    limits: Option<Arc<Limits>>,
}

impl Conn {
    /// Sends `req`. An HTTP/1 connection returns to the pool once the response body has been
    /// read to its end (a body dropped early takes its connection with it).
    pub async fn send(self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let Conn {
            pool,
            key,
            sender,
            limits,
        } = self;
        let mut sender = match sender {
            Sender::H2(mut s) => {
                return s
                    .send_request(req)
                    .await
                    .map(|r| r.map(body::incoming))
                    .map_err(UpstreamError::Reset);
            }
            Sender::H1(s) => s,
        };
        let resp = match sender.try_send_request(req).await {
            Ok(r) => r,
            Err(mut e) => {
                let Some(req) = e.take_message() else {
                    return Err(UpstreamError::Reset(e.into_error()));
                };
                // An idle connection closed before the request was written (the peer timed it
                // out, or policy revoked it): nothing was sent, so a fresh connection may take
                // it.
                debug!(target = %key.target, "idle connection was closed; resending on a new one");
                return Err(UpstreamError::Unsent(req));
            }
        };
        Ok(resp.map(|body| {
            http_body_util::BodyExt::boxed_unsync(Returning {
                body,
                back: Some((sender, pool, key, limits)),
            })
        }))
    }
}

/// A response body that hands its HTTP/1 connection back to the pool at its end, without a
/// task of its own when the connection is already free (the common case).
struct Returning {
    body: Incoming,
    back: Option<GiveBack>,
}

/// What a [`Returning`] body hands back: the connection, where to, and whom to wake.
type GiveBack = (
    http1::SendRequest<Body>,
    Arc<Pool>,
    Key,
    Option<Arc<Limits>>,
);

impl Returning {
    fn give_back(&mut self, cx: &mut std::task::Context<'_>) {
        let Some((mut sender, pool, key, limits)) = self.back.take() else {
            return;
        };
        let put = |sender: http1::SendRequest<Body>, pool: &Pool, key: Key| {
            let mut idle = pool.h1.lock();
            let list = idle.entry(key).or_default();
            if list.len() < MAX_IDLE {
                list.push(sender);
            }
        };
        match sender.poll_ready(cx) {
            std::task::Poll::Ready(Ok(())) => put(sender, &pool, key),
            std::task::Poll::Ready(Err(_)) => {}
            std::task::Poll::Pending => {
                let limits = limits.clone();
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        put(sender, &pool, key);
                    }
                    if let Some(l) = limits {
                        l.freed.notify_one();
                    }
                });
                return;
            }
        }
        if let Some(l) = limits {
            l.freed.notify_one();
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = bytes::Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, BoxError>>> {
        let r = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(None) => self.give_back(cx),
            std::task::Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => {
                self.give_back(cx);
            }
            _ => {}
        }
        r.map_err(|e| Box::new(e) as BoxError)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    target: SocketAddr,
    /// For HBONE hops, the generation of the source certificate in force: after a renewal,
    /// requests move to connections made with the new certificate, and once it has expired,
    /// with none valid (0), nothing matches.
    cert: Option<u64>,
}

impl Key {
    fn new(dialer: &Dialer, src: &LocalPod, dest: &Dest<'_>) -> Self {
        let cert = match dest.hop {
            Hop::Hbone(_) => Some(dialer.hbone.cert_generation(src.identity())),
            _ => None,
        };
        Self {
            src: src.pod.ip,
            target: dest.addr,
            cert,
        }
    }
}

/// The node's upstream HTTP connections.
#[derive(Debug, Default)]
pub struct Pool {
    h1: Mutex<HashMap<Key, Vec<http1::SendRequest<Body>>>>,
    h2: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
    /// One HTTP/2 dial at a time per key: the requests that arrive while it runs wait for it
    /// and share its connection, instead of each opening one (100 concurrent first requests
    /// opened 100 connections, and a client that did not read then held a window's worth of
    /// buffered response on each).
    h2_dials: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    /// Drops the idle connections from `src` to `dest`, after one of them proved stale.
    pub fn forget_idle(&self, dialer: &Dialer, src: &LocalPod, dest: Dest<'_>) {
        self.h1.lock().remove(&Key::new(dialer, src, &dest));
    }

    /// A connection from `src` to `dest`, idle or new. Connecting is kept apart from sending so
    /// that latency statistics measure the endpoint, not the handshake.
    pub async fn checkout(
        self: &Arc<Self>,
        dialer: &Dialer,
        src: &LocalPod,
        dest: Dest<'_>,
    ) -> Result<Conn, UpstreamError> {
        let key = Key::new(dialer, src, &dest);
        let via = Via {
            dialer,
            src,
            dest: &dest,
            key: &key,
        };
        let sender = if dest.h2 {
            Sender::H2(self.h2_sender(&via).await?)
        } else {
            Sender::H1(self.h1_sender(&via).await?)
        };
        Ok(Conn {
            pool: self.clone(),
            key,
            sender,
            limits: dest.limits.cloned(),
        })
    }

    async fn h1_sender(&self, via: &Via<'_>) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let (key, limits) = (via.key, via.dest.limits);
        loop {
            {
                let mut idle = self.h1.lock();
                if let Some(list) = idle.get_mut(key) {
                    while let Some(s) = list.pop() {
                        if s.is_ready() {
                            return Ok(s);
                        }
                    }
                }
            }
            let Some((io, slot)) = self.connect(via).await? else {
                continue;
            };
            let (sender, conn) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(UpstreamError::Reset)?;
            // Upgrades (e.g. WebSocket) hand the connection over rather than end it.
            drive(conn.with_upgrades(), key.target, slot, limits.cloned());
            return Ok(sender);
        }
    }

    async fn h2_sender(&self, via: &Via<'_>) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let (key, limits) = (via.key, via.dest.limits);
        loop {
            let existing = self.h2.lock().get(key).filter(|s| !s.is_closed()).cloned();
            if let Some(mut s) = existing {
                if s.ready().await.is_ok() {
                    return Ok(s);
                }
                self.h2.lock().remove(key);
            }
            let dial = self.h2_dials.lock().entry(key.clone()).or_default().clone();
            let _dialing = dial.lock().await;
            // Whoever held the dial before may have made the connection this caller needs.
            if self.h2.lock().get(key).is_some_and(|s| !s.is_closed()) {
                continue;
            }
            let Some((io, slot)) = self.connect(via).await? else {
                continue;
            };
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(body::H2_STREAM_WINDOW)
                .initial_connection_window_size(body::H2_CONN_WINDOW)
                .max_send_buf_size(body::H2_SEND_BUF)
                // The request was checked against this limit where it was decoded; every later
                // hop accepts what that hop accepted, so a large head is 431 there, never a
                // reset here.
                .max_header_list_size(body::H2_DECODE_LIMIT)
                .handshake(io)
                .await
                .map_err(UpstreamError::Reset)?;
            drive(conn, key.target, slot, limits.cloned());
            self.h2.lock().insert(key.clone(), sender.clone());
            // The connection is in the map now, so later callers need no dial lock.
            self.h2_dials.lock().remove(key);
            return Ok(sender);
        }
    }

    /// A new connection for `key`, within the service's connection limit: `Ok(None)` means a
    /// connection was freed while waiting for a slot, so look for an idle one again.
    async fn connect(
        &self,
        via: &Via<'_>,
    ) -> Result<Option<(TokioIo<UpstreamIo>, Option<Slot>)>, UpstreamError> {
        let (key, limits) = (via.key, via.dest.limits);
        let Some(slot) = self.connection_slot(limits).await? else {
            return Ok(None);
        };
        let within = limits
            .and_then(|l| l.policy.connect_timeout)
            .unwrap_or(CONNECT_TIMEOUT);
        let Ok(io) =
            tokio::time::timeout(within, open(via.dialer, via.src, via.dest.hop, key.target)).await
        else {
            return Err(UpstreamError::Connect(TransportError::Connect {
                addr: key.target,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {within:?} (the service's connectTimeout)"),
                ),
            }));
        };
        Ok(Some((TokioIo::new(io?), slot)))
    }

    /// A slot under the service's connection limit: `Ok(None)` means a connection was freed
    /// while waiting, so look for an idle one again.
    async fn connection_slot(
        &self,
        limits: Option<&Arc<Limits>>,
    ) -> Result<Option<Option<Slot>>, UpstreamError> {
        let Some(l) = limits else {
            return Ok(Some(None));
        };
        if let Some(slot) = l.connections.try_acquire(l.policy.max_connections) {
            return Ok(Some(Some(slot)));
        }
        let pending = l
            .pending
            .try_acquire(Some(l.policy.max_pending_requests.unwrap_or(u32::MAX)))
            .ok_or(UpstreamError::Overflow)?;
        let freed = tokio::time::timeout(PENDING_WAIT, l.freed.notified()).await;
        drop(pending);
        match freed {
            Ok(()) => Ok(None),
            Err(_) => Err(UpstreamError::Overflow),
        }
    }
}
