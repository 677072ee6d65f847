//! The enrolled pods of this node as connection tasks see them: each pod's namespace handle,
//! SPIFFE identity and counters, and the registry of its connections that were authorized once,
//! at L4, so a policy change can close those it no longer allows. Authorization itself is the
//! handlers' (`proxy::admission`); this module only keeps what a pod is and what it carries.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use parking_lot::Mutex;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::warn;

use crate::{
    authz::Decision, capture::netns::Netns, identity::Identity, state::Pod,
    telemetry::metrics::tcp::TcpConn,
};

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
    /// Connections refused at once because a connection cap was reached (the node's, or this
    /// pod's in that direction).
    pub overload_refused: Counter,
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
    /// The source's address, for policies on it.
    from: Option<IpAddr>,
    port: u16,
    revoke: Arc<Revocation>,
}

/// How a policy change closes a live connection: the decision that refused it, then a wake-up.
#[derive(Debug, Default)]
struct Revocation {
    why: std::sync::OnceLock<Decision>,
    notify: tokio::sync::Notify,
}

/// Registration of a live connection; dropping it removes the registration.
#[derive(Debug)]
pub struct Tracked<'a> {
    pod: &'a LocalPod,
    id: u64,
    revoke: Arc<Revocation>,
}

impl Tracked<'_> {
    /// Runs `relay` until it ends (its output) or policy stops allowing the connection (the
    /// decision that refused it).
    pub async fn run<F: std::future::Future>(&self, relay: F) -> Result<F::Output, Decision> {
        tokio::select! {
            out = relay => Ok(out),
            () = self.revoke.notify.notified() => {
                let why = self.revoke.why.get().cloned().unwrap_or(Decision::NotAllowed(Vec::new()));
                warn!(dst = %self.pod.pod.key, "closed a connection that policy no longer allows: {why}");
                Err(why)
            }
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let mut live = self.pod.live.lock();
        live.remove(&self.id);
        shrink_after_burst(&mut live);
    }
}

/// Gives back the buckets a burst of entries grew `map` to, once most have gone: a hash table
/// never shrinks by itself, so after 10,000 connections to one pod closed, its table kept
/// 1.8 MB (the soak's heap profile). Shrinking when under an eighth full, to twice the entries,
/// leaves room to grow again without a resize, and costs each removal O(1) amortized.
fn shrink_after_burst<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    const SMALL: usize = 256;
    if map.capacity() > SMALL && map.len() * 8 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
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

    /// The pod's SPIFFE identity.
    pub fn identity(&self) -> &Identity {
        &self.id
    }

    /// Registers a connection from `source` to `port` that was authorized at L4.
    pub fn track(&self, source: Option<Identity>, from: Option<IpAddr>, port: u16) -> Tracked<'_> {
        let id = self.next_live.fetch_add(1, Ordering::Relaxed);
        let revoke = Arc::new(Revocation::default());
        self.live.lock().insert(
            id,
            LiveConn {
                source,
                from,
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

    /// Closes every live L4 connection that `decide` (given its source and port) now refuses:
    /// a pooled connection must not keep carrying what policy has since refused. Each closed
    /// connection files its own record, with the decision.
    pub fn revoke_where(
        &self,
        decide: impl Fn(Option<&Identity>, Option<IpAddr>, u16) -> Decision,
    ) {
        let live = self.live.lock();
        for conn in live.values() {
            let decision = decide(conn.source.as_ref(), conn.from, conn.port);
            if decision != Decision::Allow {
                let _ = conn.revoke.why.set(decision);
                conn.revoke.notify.notify_one();
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_grown_by_a_burst_gives_its_buckets_back_once_the_burst_is_gone() {
        let mut map: HashMap<u64, [u8; 100]> = HashMap::new();
        for i in 0..10_000 {
            map.insert(i, [0; 100]);
        }
        let peak = map.capacity();
        assert!(peak >= 10_000);
        // The connections close one by one, each shrinking as `Tracked` does.
        for i in 0..9_990 {
            map.remove(&i);
            shrink_after_burst(&mut map);
        }
        assert_eq!(map.len(), 10);
        assert!(map.capacity() <= 256 * 2, "{} buckets kept", map.capacity());
        // A table that is mostly full is left alone, and a small one is never resized.
        // (`capacity` counts a removal's tombstone against it, so it is read after the removal.)
        let mut full: HashMap<u64, ()> = (0..1000).map(|i| (i, ())).collect();
        full.remove(&0);
        let cap = full.capacity();
        shrink_after_burst(&mut full);
        assert_eq!(full.capacity(), cap);
        let mut small: HashMap<u64, ()> = (0..100).map(|i| (i, ())).collect();
        small.retain(|k, ()| *k == 0);
        let cap = small.capacity();
        shrink_after_burst(&mut small);
        assert_eq!(small.capacity(), cap);
    }
}
