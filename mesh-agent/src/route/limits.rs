//! Admission limits of one service on this node: the local rate limit (token buckets), the
//! circuit breaker (requests in flight, upstream connections, requests waiting for one) and the
//! retry budget. All are per node proxy, like Envoy's local limits.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Instant,
};

use parking_lot::Mutex;

use crate::state::{RateLimit, TrafficPolicy};

/// A token bucket refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    stamp: Instant,
}

impl Bucket {
    fn full(burst: f64) -> Self {
        Self {
            tokens: burst,
            stamp: Instant::now(),
        }
    }

    fn take(&mut self, rate: f64, burst: f64, cost: f64) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.stamp = now;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Buckets beyond this many sources are reset, so a flood of identities cannot grow memory.
const MAX_SOURCE_BUCKETS: usize = 10_000;

/// The local rate limit of a service.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    shared: Mutex<Bucket>,
    per_source: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    fn new(limit: RateLimit) -> Self {
        Self {
            shared: Mutex::new(Bucket::full(f64::from(limit.burst))),
            per_source: Mutex::new(HashMap::new()),
            limit,
        }
    }

    /// Whether a request from `source` may pass now.
    pub fn admit(&self, source: &str) -> bool {
        let (rate, burst) = (
            f64::from(self.limit.per_second),
            f64::from(self.limit.burst),
        );
        if !self.limit.per_source {
            return self.shared.lock().take(rate, burst, 1.0);
        }
        let mut map = self.per_source.lock();
        if map.len() >= MAX_SOURCE_BUCKETS && !map.contains_key(source) {
            map.clear();
        }
        map.entry(source.to_string())
            .or_insert_with(|| Bucket::full(burst))
            .take(rate, burst, 1.0)
    }
}

/// Retries may spend what requests deposit (a share of each) plus a steady minimum rate.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    balance: Mutex<Bucket>,
}

impl RetryBudget {
    fn new(percent: u32, min_per_second: u32) -> Self {
        let min = f64::from(min_per_second);
        Self {
            ratio: f64::from(percent) / 100.0,
            min_per_second: min,
            balance: Mutex::new(Bucket::full(min)),
        }
    }

    fn cap(&self) -> f64 {
        // Enough to absorb a burst, small enough that an outage cannot bank a retry storm.
        (self.min_per_second * 10.0)
            .max(100.0 * self.ratio)
            .max(1.0)
    }

    /// Called once per original request.
    pub fn deposit(&self) {
        let cap = self.cap();
        let mut b = self.balance.lock();
        let _ = b.take(self.min_per_second, cap, 0.0);
        b.tokens = (b.tokens + self.ratio).min(cap);
    }

    /// Whether one retry may be sent now.
    pub fn withdraw(&self) -> bool {
        self.balance
            .lock()
            .take(self.min_per_second, self.cap(), 1.0)
    }
}

/// A counter with a limit; a slot is released when its guard drops, wherever that happens (a
/// response body, a connection task).
#[derive(Debug, Default)]
pub struct Gauge(AtomicU32);

/// A held slot of a [`Gauge`].
#[derive(Debug)]
pub struct Slot(Arc<Gauge>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Gauge {
    /// Takes a slot if fewer than `limit` are held (no limit: always).
    pub fn try_acquire(self: &Arc<Self>, limit: Option<u32>) -> Option<Slot> {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        if limit.is_some_and(|l| n >= l) {
            self.0.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(self.clone()))
    }
}

/// Everything a service's requests are admitted against.
#[derive(Debug)]
pub struct Limits {
    /// The policy these were made from.
    pub policy: TrafficPolicy,
    /// Local rate limit, if configured.
    pub rate: Option<RateLimiter>,
    /// Retry budget.
    pub budget: RetryBudget,
    /// Requests in flight.
    pub requests: Arc<Gauge>,
    /// Upstream connections open.
    pub connections: Arc<Gauge>,
    /// Requests waiting for a connection.
    pub pending: Arc<Gauge>,
    /// Woken when a connection is released or returned idle.
    pub freed: tokio::sync::Notify,
}

impl Limits {
    /// Limits for `policy`.
    pub fn new(policy: &TrafficPolicy) -> Self {
        Self {
            rate: policy.rate_limit.clone().map(RateLimiter::new),
            budget: RetryBudget::new(policy.retry_budget_percent, policy.min_retries_per_second),
            requests: Arc::default(),
            connections: Arc::default(),
            pending: Arc::default(),
            freed: tokio::sync::Notify::new(),
            policy: policy.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_admits_burst_then_refuses() {
        let r = RateLimiter::new(RateLimit {
            per_second: 1,
            burst: 5,
            per_source: true,
        });
        assert_eq!((0..10).filter(|_| r.admit("a")).count(), 5);
        assert_eq!((0..10).filter(|_| r.admit("b")).count(), 5, "per source");
    }

    #[test]
    fn budget_caps_retries_to_a_share_of_requests() {
        let b = RetryBudget::new(20, 0);
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            while b.withdraw() {
                retries += 1;
            }
        }
        assert!((195..=200).contains(&retries), "{retries}");
    }

    #[test]
    fn gauge_limits_and_releases() {
        let g = Arc::new(Gauge::default());
        let a = g.try_acquire(Some(2));
        let b = g.try_acquire(Some(2));
        assert!(a.is_some() && b.is_some());
        assert!(g.try_acquire(Some(2)).is_none());
        drop(a);
        assert!(g.try_acquire(Some(2)).is_some());
        assert!(g.try_acquire(None).is_some());
    }
}
