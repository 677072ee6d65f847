//! HTTP families (Istio's names) for requests handled at L7.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::telemetry::metrics::labels::{
    FLOW_LABEL_COUNT, Flow, MetricsError, RemovableFamily, label_names,
};

/// The families' own labels, after the flow's.
const OWN_LABELS: &[&str] = &["response_code", "response_flags", "grpc_response_status"];

/// Istio's duration buckets, in milliseconds.
const DURATION_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets, in bytes.
const SIZE_BYTES: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

/// `istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes` and
/// `istio_response_bytes`.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    request_bytes: HistogramVec,
    response_bytes: HistogramVec,
    /// `*_cluster` of mesh workloads.
    cluster: String,
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> Result<HistogramVec, MetricsError> {
    let v = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        &label_names(OWN_LABELS),
    )?;
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

/// What one finished request contributes.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    /// `http` or `grpc`.
    pub protocol: &'a str,
    /// The status the client got.
    pub code: u16,
    /// Envoy's response flags, `-` for none.
    pub flags: &'a str,
    /// From the request's arrival to the response's end.
    pub duration: Duration,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
    /// `grpc_response_status`: a gRPC call's status code, empty for plain HTTP.
    pub grpc_status: &'a str,
}

impl HttpMetrics {
    /// Makes and registers the families.
    /// Mesh workloads are in `cluster`.
    pub fn new(registry: &Registry, cluster: &str) -> Result<Self, MetricsError> {
        let requests = IntCounterVec::new(
            Opts::new("istio_requests_total", "HTTP requests handled at L7"),
            &label_names(OWN_LABELS),
        )?;
        registry.register(Box::new(requests.clone()))?;
        Ok(Self {
            cluster: cluster.to_string(),
            requests,
            duration: histogram(
                registry,
                "istio_request_duration_milliseconds",
                "From a request's arrival to its response's end",
                &DURATION_MS,
            )?,
            request_bytes: histogram(
                registry,
                "istio_request_bytes",
                "Request body sizes",
                &SIZE_BYTES,
            )?,
            response_bytes: histogram(
                registry,
                "istio_response_bytes",
                "Response body sizes",
                &SIZE_BYTES,
            )?,
        })
    }

    /// Records one finished request of `flow`.
    pub fn record(&self, flow: &Flow, o: &Outcome<'_>) {
        let code = o.code.to_string();
        let base = flow.values(o.protocol, &self.cluster);
        let mut v = [""; FLOW_LABEL_COUNT + 3];
        v[..FLOW_LABEL_COUNT].copy_from_slice(&base);
        v[FLOW_LABEL_COUNT] = &code;
        v[FLOW_LABEL_COUNT + 1] = o.flags;
        v[FLOW_LABEL_COUNT + 2] = o.grpc_status;
        self.requests.with_label_values(&v).inc();
        self.duration
            .with_label_values(&v)
            .observe(o.duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .with_label_values(&v)
            .observe(o.request_bytes as f64);
        self.response_bytes
            .with_label_values(&v)
            .observe(o.response_bytes as f64);
    }

    /// The families, for listing and removing series.
    pub fn families(&self) -> impl Iterator<Item = &dyn RemovableFamily> {
        [
            &self.requests as &dyn RemovableFamily,
            &self.duration,
            &self.request_bytes,
            &self.response_bytes,
        ]
        .into_iter()
    }
}
