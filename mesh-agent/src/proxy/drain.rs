//! Draining: how an agent that handed its listeners to a successor, or is stopping, lets the
//! connections it accepted finish.
//!
//! Invariants:
//! - Every accepted connection holds a [`Live`] for as long as its task runs, so the count is
//!   exact and the agent can wait for it to reach zero.
//! - Draining never cuts a connection: HTTP servers answer the request in flight and then close
//!   (`Connection: close` on HTTP/1, GOAWAY on HTTP/2, HBONE included), and L4 relays run to
//!   their end. Only the deadline, owned by the caller, ends what is left.

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
        }
    }
}

impl Drain {
    /// Counts a connection until the returned guard is dropped.
    pub fn track(&self) -> Live {
        self.live.fetch_add(1, Ordering::Relaxed);
        Live(self.live.clone())
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

    /// The count and state, for `/stats`.
    pub fn report(&self) -> DrainReport {
        DrainReport {
            live: self.live(),
            draining: self.is_draining(),
        }
    }
}

/// Runs a hyper server connection; once draining starts, calls its `graceful_shutdown` (GOAWAY
/// on HTTP/2, close after the response in flight on HTTP/1) and lets it finish. A macro, not a
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
