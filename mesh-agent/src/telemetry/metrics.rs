//! The node's metrics: one Prometheus registry, rendered on `/metrics` (default `0.0.0.0:15020`).
//!
//! Each subsystem defines its families next to the code that updates them (`proxy/metrics.rs`
//! for TCP, `l7/metrics.rs` for HTTP, `certs.rs` and `bpf.rs` for agent health). This module
//! holds the registry, the label vocabulary the TCP and HTTP families share (Istio's names, so
//! existing dashboards work), and the clean-up that drops the series of workloads that left the
//! mesh, so cardinality follows the pods that exist.
//!
//! Invariants:
//! - a label value comes from the kernel's or the TLS handshake's word about who is talking,
//!   never from a header: `source_principal` is the identity that was proved (or `unknown`);
//! - series naming a workload that is gone are removed once it has been gone for the retention
//!   period (so a scrape in between still sees its last counts).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use prometheus::{Encoder, Registry, TextEncoder, core::Collector};
use tokio::net::TcpListener;
use tracing::warn;

pub mod http;
pub mod labels;
mod process;
pub mod tcp;

pub use labels::{
    FLOW_LABELS, Flow, MetricsError, Peer, RemovableFamily, Reporter, Security, UNKNOWN,
    label_names, service_fqdn,
};

use crate::{
    state::NodeState,
    telemetry::metrics::http::HttpMetrics,
    telemetry::metrics::tcp::{CaptureMetrics, TcpMetrics},
};

/// This build's version: in `mesh_build_info`, on `/version`, and printed by `mesh-agent version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The node's registry and families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// TCP families (L4 connections).
    pub tcp: TcpMetrics,
    /// HTTP families (L7 requests).
    pub http: HttpMetrics,
    /// Capture health (connections accepted, original destinations missing).
    pub capture: CaptureMetrics,
    /// Workloads that left the mesh, and since when.
    gone: Mutex<HashMap<(String, String), Instant>>,
    /// How long their series stay.
    retention: Duration,
}

impl Metrics {
    /// The registry with every family registered; series of departed workloads are kept for
    /// `retention`; mesh workloads are labelled as in `cluster`.
    pub fn new(retention: Duration, cluster: &str) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let tcp = TcpMetrics::new(&registry, cluster)?;
        let http = HttpMetrics::new(&registry, cluster)?;
        let capture = CaptureMetrics::new(&registry)?;
        registry.register(Box::new(process::ProcessCollector::new()?))?;
        let build = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "mesh_build_info",
                "The agent's build: always 1, with the version in a label",
            ),
            &["component", "version"],
        )?;
        build.with_label_values(&["mesh-agent", VERSION]).set(1);
        registry.register(Box::new(build))?;
        Ok(Self {
            registry,
            tcp,
            http,
            capture,
            gone: Mutex::default(),
            retention,
        })
    }

    /// Adds a subsystem's collector (the kernel's counters, the certificates).
    pub fn register(&self, c: Box<dyn Collector>) -> Result<(), MetricsError> {
        Ok(self.registry.register(c)?)
    }

    /// The text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        self.collect_garbage();
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!("rendering metrics: {e}");
        }
        out
    }

    /// Notes which workloads exist in `state`: those that left start their retention period,
    /// and those that came back are kept.
    pub fn observe(&self, state: &NodeState) {
        // Borrowed: at ten thousand workloads, copying their names on each change was most of
        // this.
        let present: std::collections::HashSet<(&str, &str)> = state
            .workloads
            .values()
            .map(|w| (w.key.namespace.as_str(), &*w.workload_name))
            .collect();
        let has = |k: &(String, String)| present.contains(&(k.0.as_str(), k.1.as_str()));
        let mut gone = self.gone.lock();
        gone.retain(|k, _| !has(k));
        for k in self.flow_workloads() {
            if k.1 != UNKNOWN && !has(&k) {
                gone.entry(k).or_insert_with(Instant::now);
            }
        }
        drop(gone);
        self.collect_garbage();
    }

    /// Every (namespace, workload) some series names.
    fn flow_workloads(&self) -> std::collections::HashSet<(String, String)> {
        let mut out = std::collections::HashSet::new();
        for family in self.tcp.families().chain(self.http.families()) {
            for mf in family.collect() {
                for m in mf.get_metric() {
                    let label = |name: &str| {
                        m.get_label()
                            .iter()
                            .find(|l| l.name() == name)
                            .map(|l| l.value().to_string())
                            .unwrap_or_default()
                    };
                    for side in ["source", "destination"] {
                        out.insert((
                            label(&format!("{side}_workload_namespace")),
                            label(&format!("{side}_workload")),
                        ));
                    }
                }
            }
        }
        out
    }

    /// Removes the series of workloads gone for longer than the retention period.
    fn collect_garbage(&self) {
        let expired: Vec<(String, String)> = {
            let mut gone = self.gone.lock();
            let now = Instant::now();
            let expired = gone
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= self.retention)
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>();
            for k in &expired {
                gone.remove(k);
            }
            expired
        };
        if expired.is_empty() {
            return;
        }
        for family in self.tcp.families().chain(self.http.families()) {
            remove_series(family, &expired);
        }
    }
}

/// Removes from `family` every series whose source or destination is one of `workloads`.
fn remove_series(family: &dyn RemovableFamily, workloads: &[(String, String)]) {
    for mf in family.collect() {
        for m in mf.get_metric() {
            let labels: HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let names = |side: &str| {
                (
                    labels
                        .get(format!("{side}_workload_namespace").as_str())
                        .copied()
                        .unwrap_or_default(),
                    labels
                        .get(format!("{side}_workload").as_str())
                        .copied()
                        .unwrap_or_default(),
                )
            };
            let hit = ["source", "destination"].iter().any(|side| {
                let (ns, w) = names(side);
                workloads.iter().any(|(gns, gw)| gns == ns && gw == w)
            });
            if hit {
                family.remove(&labels);
            }
        }
    }
}

/// Binds the metrics listener (so a bad address fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `/metrics` on its own thread, with its own single-threaded runtime, in the idle
/// scheduling class: a scrape (accepting, rendering every series, reading the kernel's maps,
/// writing the text) never takes a proxy worker, and on a busy node a scrape waits for the
/// proxy rather than the proxy for the scrape.
/// `stop` ends the accepting (a successor agent took the listener over).
pub fn start(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), MetricsError> {
    let listener = listener.into_std().map_err(MetricsError::Thread)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            lower_priority();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the metrics runtime: {e}; /metrics is off");
                    return;
                }
            };
            rt.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => {
                        tokio::select! {
                            () = serve(l, metrics) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                    Err(e) => tracing::error!("metrics listener: {e}; /metrics is off"),
                }
            });
        })
        .map_err(MetricsError::Thread)?;
    Ok(())
}

/// Puts the calling thread in `SCHED_IDLE` (best effort: a refusal only costs latency under
/// load). The kernel preempts an idle-class thread as soon as any normal thread wakes on its
/// CPU, while a `SCHED_BATCH` thread, even at nice 19, may finish its protected slice first:
/// with batch, a scrape (about 150 µs here) delayed the requests that met it, and the bench's
/// p99 in scraped seconds rose by a median 10% (5 runs); with idle it moved by 1%, inside the
/// noise of control runs that fetch nothing. The cost: a scrape holds a few short locks
/// (a family's series map while copying it, the certificate table) and, preempted inside one
/// on a saturated node, can make a worker wait until it runs again.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread (pid 0) with a valid param.
    unsafe {
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) != 0 {
            warn!(
                "metrics thread: cannot lower its scheduling class: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Serves `/metrics` until the runtime stops.
async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    use hyper::{Response, StatusCode, header};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let metrics = metrics.clone();
                async move {
                    let mut r = if req.uri().path() == "/metrics" {
                        let body = metrics.render();
                        let mut r =
                            Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    } else {
                        let mut r = Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"not found: try /metrics\n"),
                        ));
                        *r.status_mut() = StatusCode::NOT_FOUND;
                        r
                    };
                    r.headers_mut().insert(
                        header::CACHE_CONTROL,
                        header::HeaderValue::from_static("no-store"),
                    );
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await
            {
                warn!("metrics connection: {e}");
            }
        });
    }
}
