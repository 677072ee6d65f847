//! Accepted connections: counting them, refusing those past the caps, and draining them when
//! the agent hands its listeners to a successor or stops.
//!
//! Invariants:
//! - Every accepted connection holds a [`Live`] for as long as its task runs, so the count is
//!   exact and the agent can wait for it to reach zero.
//! - Draining never cuts a connection: HTTP/2 servers (HBONE included) send GOAWAY and finish
//!   their streams; HTTP/1 answers carry `Connection: close`, so the client closes once it has
//!   its answer (closing an idle keep-alive connection from this side would race a request the
//!   client is writing on it); L4 relays run to their end. Only the deadline, owned by the
//!   caller, ends what is left: HBONE connections with TLS close_notify ([`Drain::close_all`]),
//!   the rest as the process exits.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// The agent's connections and whether it is draining them.
#[derive(Debug, Clone)]
pub struct Drain {
    live: Arc<AtomicUsize>,
    signal: Arc<watch::Sender<bool>>,
    /// Cancelled at the deadline: TLS connections close with close_notify (see
    /// `transport::closing`).
    deadline: tokio_util::sync::CancellationToken,
}

/// What `/stats` shows of the drain.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DrainReport {
    /// Accepted connections still open.
    pub live: usize,
    /// Whether the agent is draining.
    pub draining: bool,
}

/// One accepted connection, counted until dropped.
#[derive(Debug)]
pub struct Live(Arc<AtomicUsize>);

impl Live {
    /// Counts one more in `count` until dropped.
    pub fn count(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

/// The caps on open connections: past them a new connection is refused at once (a reset), so
/// an overload costs the agent nothing but the accept.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// On the whole node.
    pub node: usize,
    /// Per pod and direction (what it opens; what is opened to it): one pod's flood or
    /// slowloris meets its own cap, and the node's other pods keep being served.
    pub pod: usize,
}

/// Which cap a connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Shed {
    /// The node's.
    #[error("the node's {0} open connections are at --max-connections")]
    Node(usize),
    /// The pod's, in this direction.
    #[error("the pod's {0} open connections this way are at --max-pod-connections")]
    Pod(usize),
}

impl ConnLimits {
    /// Whether a connection arriving now must be refused, with `node` and `pod` open.
    pub fn check(&self, node: usize, pod: usize) -> Result<(), Shed> {
        if node >= self.node {
            return Err(Shed::Node(node));
        }
        if pod >= self.pod {
            return Err(Shed::Pod(pod));
        }
        Ok(())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            live: Arc::default(),
            signal: Arc::new(watch::channel(false).0),
            deadline: tokio_util::sync::CancellationToken::new(),
        }
    }
}

impl Drain {
    /// Counts a connection until the returned guard is dropped.
    pub fn track(&self) -> Live {
        Live::count(&self.live)
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Tells every connection to finish (idempotent).
    pub fn start(&self) {
        self.signal.send_replace(true);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining has started (at once if it has).
    pub async fn started(&self) {
        let mut rx = self.signal.subscribe();
        loop {
            if *rx.borrow_and_update() {
                return;
            }
            // An error means the sender is gone, which cannot happen while `self` holds it.
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// What TLS connections watch for the deadline.
    pub fn closing(&self) -> &tokio_util::sync::CancellationToken {
        &self.deadline
    }

    /// The deadline passed: every TLS connection writes close_notify and closes.
    pub fn close_all(&self) {
        self.deadline.cancel();
    }

    /// Waits until no connection is open or `deadline` passes; returns how many are left.
    pub async fn until_idle(&self, deadline: Duration) -> usize {
        let end = Instant::now() + deadline;
        loop {
            let left = self.live();
            if left == 0 || Instant::now() >= end {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// While draining, tells an HTTP/1 client to close after this answer.
    pub fn close_after<B>(&self, h2: bool, resp: &mut hyper::Response<B>) {
        if !h2 && self.is_draining() {
            resp.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
    }

    /// The count and state, for `/stats`.
    pub fn report(&self) -> DrainReport {
        DrainReport {
            live: self.live(),
            draining: self.is_draining(),
        }
    }
}

/// Runs a hyper HTTP/2 server connection; once draining starts, calls its `graceful_shutdown`
/// (GOAWAY: the client opens new streams elsewhere) and lets its streams finish. A macro, not a
/// function: a closure over the connection type makes the handlers' futures lose `Send`.
macro_rules! graceful {
    ($conn:expr, $drain:expr) => {{
        let mut conn = std::pin::pin!($conn);
        tokio::select! {
            out = conn.as_mut() => out,
            () = $drain.started() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}
pub(crate) use graceful;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_cap_then_the_pods_decides() {
        let l = ConnLimits { node: 10, pod: 4 };
        assert_eq!(l.check(0, 0), Ok(()));
        assert_eq!(l.check(9, 3), Ok(()));
        assert_eq!(l.check(9, 4), Err(Shed::Pod(4)));
        assert_eq!(l.check(10, 0), Err(Shed::Node(10)));
        assert!(Shed::Pod(4).to_string().contains("--max-pod-connections"));
    }

    #[tokio::test]
    async fn counts_connections_and_waits_for_the_last() {
        let d = Drain::default();
        let a = d.track();
        let b = d.track();
        assert_eq!(d.live(), 2);
        assert!(!d.is_draining());
        d.start();
        d.started().await;
        assert!(d.is_draining());
        assert_eq!(d.until_idle(Duration::from_millis(60)).await, 2);
        drop(a);
        let waiter = {
            let d = d.clone();
            tokio::spawn(async move { d.until_idle(Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(b);
        assert_eq!(waiter.await.ok(), Some(0));
        assert_eq!(d.report().live, 0);
    }
}
