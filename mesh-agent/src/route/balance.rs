//! Per-request endpoint choice and outlier ejection.
//!
//! P2C over peak EWMA (Linkerd's balancer): pick two endpoints at random and send to the one with
//! the lower cost, where cost = latency estimate × (requests in flight + 1). The latency estimate
//! jumps to any slower observation at once (the peak), moves towards faster ones, and decays
//! towards zero while idle, all with a time constant of [`DECAY`]: a slow endpoint is avoided
//! after one request and retried once its estimate has decayed below the others'.
//!
//! Outlier detection: an endpoint whose consecutive failures (5xx or connect failures) reach the
//! policy's threshold is ejected for `base × n` (n = how often it was ejected, capped), unless
//! that would eject more than the policy's share of the service (at least one endpoint may always
//! be ejected). When every endpoint is ejected the balancer uses them all rather than fail.

use std::{
    net::IpAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::state::{LbPolicy, OutlierDetection};

/// Decay time constant of the latency estimate.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint that has not answered yet.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Longest ejection.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What the balancer knows about one endpoint. Kept across route reloads.
#[derive(Debug)]
pub struct Endpoint {
    /// Its address.
    pub ip: IpAddr,
    ewma: Mutex<(f64, Instant)>,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Ejected until this many ms after [`Endpoint::epoch`]; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    epoch: Instant,
    /// Requests sent to it, for stats.
    pub requests: AtomicU64,
}

impl Endpoint {
    /// A fresh endpoint.
    pub fn new(ip: IpAddr) -> Self {
        let now = Instant::now();
        Self {
            ip,
            ewma: Mutex::new((DEFAULT_RTT.as_nanos() as f64, now)),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            epoch: now,
            requests: AtomicU64::new(0),
        }
    }

    /// The estimate decays towards zero while no sample arrives, so an endpoint that has not
    /// been tried for a while is tried again (and one that was slow is forgiven).
    fn cost(&self) -> f64 {
        let (ewma, stamp) = *self.ewma.lock();
        let idle = stamp.elapsed().as_secs_f64();
        ewma * (-idle / DECAY.as_secs_f64()).exp()
            * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    /// Whether it is ejected now.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && (now.duration_since(self.epoch).as_millis() as u64) < until
    }

    /// Marks a request as started; dropping the guard ends it.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint: self.clone(),
            started: Instant::now(),
        }
    }

    fn observe(&self, rtt: Duration) {
        let mut e = self.ewma.lock();
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        let dt = now.duration_since(e.1).as_secs_f64();
        let w = (-dt / DECAY.as_secs_f64()).exp();
        let decayed = e.0 * w;
        e.0 = if rtt > decayed {
            rtt
        } else {
            decayed + rtt * (1.0 - w)
        };
        e.1 = now;
    }
}

/// A request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    started: Instant,
}

impl InFlight {
    /// Records the time to the response head.
    pub fn answered(&self) {
        self.endpoint.observe(self.started.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of one service as the balancer sees them. Their state is made on the first
/// request to the service: a node knows every service of the cluster, and its pods talk to a
/// few.
#[derive(Debug)]
pub struct Balancer {
    /// Endpoint addresses, in the service's order.
    ips: Box<[IpAddr]>,
    /// Their state, once a request needed it.
    endpoints: OnceLock<Vec<Arc<Endpoint>>>,
    policy: LbPolicy,
    outlier: Option<OutlierDetection>,
    next: AtomicUsize,
}

impl Balancer {
    /// Endpoints for `ips`, reusing the state of those `old` already had.
    pub fn new(
        ips: &[IpAddr],
        policy: LbPolicy,
        outlier: Option<OutlierDetection>,
        old: Option<&Balancer>,
    ) -> Self {
        let endpoints = OnceLock::new();
        if let Some(had) = old.and_then(|o| o.endpoints.get()) {
            let _ = endpoints.set(
                ips.iter()
                    .map(|ip| {
                        had.iter()
                            .find(|e| e.ip == *ip)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(Endpoint::new(*ip)))
                    })
                    .collect(),
            );
        }
        Self {
            ips: ips.into(),
            endpoints,
            policy,
            outlier,
            next: AtomicUsize::new(old.map_or(0, |o| o.next.load(Ordering::Relaxed))),
        }
    }

    /// The endpoint addresses, in the service's order.
    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }

    /// Every endpoint, ejected or not.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        self.endpoints.get_or_init(|| {
            self.ips
                .iter()
                .map(|ip| Arc::new(Endpoint::new(*ip)))
                .collect()
        })
    }

    /// Whether any request has needed the endpoints' state yet (so far, a service no one
    /// called costs only its addresses).
    pub fn in_use(&self) -> bool {
        self.endpoints.get().is_some()
    }

    /// Picks an endpoint, avoiding `avoid` (the endpoint a retry is moving away from) when there
    /// is another choice.
    pub fn pick(&self, avoid: Option<IpAddr>) -> Option<&Arc<Endpoint>> {
        let now = Instant::now();
        let endpoints = self.endpoints();
        let healthy: Vec<&Arc<Endpoint>> =
            endpoints.iter().filter(|e| !e.is_ejected(now)).collect();
        let mut candidates = if healthy.is_empty() {
            endpoints.iter().collect()
        } else {
            healthy
        };
        if candidates.len() > 1 && avoid.is_some() {
            candidates.retain(|e| Some(e.ip) != avoid);
        }
        match (candidates.len(), self.policy) {
            (0, _) => None,
            (1, _) => Some(candidates[0]),
            (n, LbPolicy::RoundRobin) => {
                Some(candidates[self.next.fetch_add(1, Ordering::Relaxed) % n])
            }
            (n, LbPolicy::P2cPeakEwma) => {
                let a = fastrand::usize(..n);
                let b = fastrand::usize(..n - 1);
                let b = if b >= a { b + 1 } else { b };
                let (ea, eb) = (candidates[a], candidates[b]);
                Some(if ea.cost() <= eb.cost() { ea } else { eb })
            }
        }
    }

    /// Records a try's outcome for outlier detection: `failed` is a 5xx or a connect failure.
    /// Returns whether this ejected the endpoint.
    pub fn record(&self, endpoint: &Endpoint, failed: bool) -> bool {
        let Some(o) = &self.outlier else {
            return false;
        };
        if !failed {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            return false;
        }
        let n = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if n < o.consecutive_errors {
            return false;
        }
        let now = Instant::now();
        let endpoints = self.endpoints();
        let ejected = endpoints.iter().filter(|e| e.is_ejected(now)).count();
        let allowed = (endpoints.len() * o.max_ejection_percent as usize / 100).max(1);
        if endpoint.is_ejected(now) || ejected >= allowed {
            return false;
        }
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = sweep_aligned(
            o.base_ejection_time.saturating_mul(times).min(MAX_EJECTION),
            o.interval,
        );
        let until = now.duration_since(endpoint.epoch) + duration;
        endpoint
            .ejected_until_ms
            .store((until.as_millis() as u64).max(1), Ordering::Relaxed);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }
}

/// An ejection time rounded up to whole sweep intervals: the endpoint returns at the first sweep
/// after its time is up.
fn sweep_aligned(d: Duration, interval: Duration) -> Duration {
    if interval.is_zero() {
        return d;
    }
    let sweeps = d.as_nanos().div_ceil(interval.as_nanos()).max(1);
    interval.saturating_mul(u32::try_from(sweeps).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 0, i])).collect()
    }

    #[test]
    fn p2c_avoids_the_slow_endpoint_round_robin_does_not() {
        let p2c = Balancer::new(&ips(3), LbPolicy::P2cPeakEwma, None, None);
        let rr = Balancer::new(&ips(3), LbPolicy::RoundRobin, None, None);
        for b in [&p2c, &rr] {
            b.endpoints()[0].observe(Duration::from_millis(50));
            b.endpoints()[1].observe(Duration::from_millis(1));
            b.endpoints()[2].observe(Duration::from_millis(1));
        }
        let slow_share = |b: &Balancer| {
            (0..3000)
                .filter(|_| b.pick(None).is_some_and(|e| e.ip == b.endpoints()[0].ip))
                .count()
        };
        assert_eq!(slow_share(&p2c), 0, "the slow endpoint never wins a pair");
        assert_eq!(slow_share(&rr), 1000);
    }

    #[test]
    fn ejections_end_at_the_first_sweep_after_their_time() {
        let ms = Duration::from_millis;
        assert_eq!(sweep_aligned(ms(30_000), ms(10_000)), ms(30_000));
        assert_eq!(sweep_aligned(ms(50), ms(10_000)), ms(10_000));
        assert_eq!(sweep_aligned(ms(25), ms(10)), ms(30));
        assert_eq!(sweep_aligned(ms(25), Duration::ZERO), ms(25));
        let o = OutlierDetection {
            consecutive_errors: 1,
            base_ejection_time: ms(20),
            max_ejection_percent: 100,
            interval: ms(200),
        };
        let b = Balancer::new(&ips(2), LbPolicy::RoundRobin, Some(o), None);
        assert!(b.record(&b.endpoints()[0], true));
        std::thread::sleep(ms(60));
        assert!(
            b.endpoints()[0].is_ejected(Instant::now()),
            "out until the sweep"
        );
        std::thread::sleep(ms(200));
        assert!(!b.endpoints()[0].is_ejected(Instant::now()));
    }

    #[test]
    fn in_flight_requests_raise_the_cost() {
        let b = Balancer::new(&ips(2), LbPolicy::P2cPeakEwma, None, None);
        let busy: Vec<InFlight> = (0..5).map(|_| b.endpoints()[0].start()).collect();
        assert!((0..100).all(|_| b.pick(None).is_some_and(|e| e.ip == b.endpoints()[1].ip)));
        drop(busy);
    }

    #[test]
    fn outliers_are_ejected_within_the_cap_and_return() {
        let o = OutlierDetection {
            consecutive_errors: 3,
            base_ejection_time: Duration::from_millis(50),
            max_ejection_percent: 50,
            interval: Duration::from_millis(10),
        };
        let b = Balancer::new(&ips(3), LbPolicy::RoundRobin, Some(o), None);
        let (e0, e1) = (&b.endpoints()[0], &b.endpoints()[1]);
        assert!(!b.record(e0, true) && !b.record(e0, true));
        assert!(!b.record(e0, false), "a success resets the count");
        assert!(!b.record(e0, true) && !b.record(e0, true));
        assert!(b.record(e0, true), "third consecutive failure ejects");
        assert!((0..30).all(|_| b.pick(None).is_some_and(|e| e.ip != e0.ip)));
        // 50% of 3 is 1: a second endpoint may not be ejected while the first is out.
        for _ in 0..3 {
            b.record(e1, true);
        }
        assert!(!e1.is_ejected(Instant::now()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            !e0.is_ejected(Instant::now()),
            "back after the ejection time"
        );
    }
}
