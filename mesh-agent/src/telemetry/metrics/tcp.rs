//! TCP families (Istio's names) for connections relayed at L4, and the proxy's health counters.

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::telemetry::metrics::labels::{
    FLOW_LABEL_COUNT, Flow, MetricsError, RemovableFamily, label_names,
};

/// The families' own labels, after the flow's.
const OWN_LABELS: &[&str] = &["response_flags"];

/// `istio_tcp_*`.
#[derive(Debug)]
pub struct TcpMetrics {
    opened: IntCounterVec,
    closed: IntCounterVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    /// `*_cluster` of mesh workloads.
    cluster: String,
}

fn family(registry: &Registry, name: &str, help: &str) -> Result<IntCounterVec, MetricsError> {
    let v = IntCounterVec::new(Opts::new(name, help), &label_names(OWN_LABELS))?;
    registry.register(Box::new(v.clone()))?;
    Ok(v)
}

impl TcpMetrics {
    /// Makes and registers the families; mesh workloads are in `cluster`.
    pub fn new(registry: &Registry, cluster: &str) -> Result<Self, MetricsError> {
        Ok(Self {
            cluster: cluster.to_string(),
            opened: family(
                registry,
                "istio_tcp_connections_opened_total",
                "TCP connections opened, relayed at L4",
            )?,
            closed: family(
                registry,
                "istio_tcp_connections_closed_total",
                "TCP connections closed, relayed at L4",
            )?,
            sent: family(
                registry,
                "istio_tcp_sent_bytes_total",
                "Bytes sent towards the client (the response direction)",
            )?,
            received: family(
                registry,
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (the request direction)",
            )?,
        })
    }

    /// Counts a connection of `flow` as opened; the returned handle counts its bytes and, when
    /// dropped, its closing.
    pub fn open(&self, flow: &Flow) -> TcpConn {
        let base = flow.values("tcp", &self.cluster);
        let mut v = [""; FLOW_LABEL_COUNT + 1];
        v[..FLOW_LABEL_COUNT].copy_from_slice(&base);
        v[FLOW_LABEL_COUNT] = "-";
        self.opened.with_label_values(&v).inc();
        TcpConn {
            received: self.received.with_label_values(&v),
            sent: self.sent.with_label_values(&v),
            closed: self.closed.with_label_values(&v),
        }
    }

    /// The families, for listing and removing series.
    pub fn families(&self) -> impl Iterator<Item = &dyn RemovableFamily> {
        [&self.opened, &self.closed, &self.sent, &self.received]
            .into_iter()
            .map(|f| f as &dyn RemovableFamily)
    }
}

/// One open connection's counters. Dropping it counts the connection closed.
#[derive(Debug)]
pub struct TcpConn {
    /// Bytes from the client.
    pub received: IntCounter,
    /// Bytes to the client.
    pub sent: IntCounter,
    closed: IntCounter,
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.closed.inc();
    }
}

/// The proxy's side of capture: what the kernel redirected and whether the proxy could tell where
/// it was going.
#[derive(Debug)]
pub struct CaptureMetrics {
    /// `mesh_captured_connections_total`: connections accepted on the pods' 15001 listeners.
    pub captured: IntCounter,
    /// `mesh_orig_dst_misses_total`: of those, ones the kernel had no original destination for
    /// (refused: the proxy cannot route them).
    pub orig_dst_misses: IntCounter,
}

impl CaptureMetrics {
    /// Makes and registers the counters.
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            captured: counter(
                "mesh_captured_connections_total",
                "Outbound connections the kernel redirected and the proxy accepted",
            )?,
            orig_dst_misses: counter(
                "mesh_orig_dst_misses_total",
                "Captured connections whose original destination the kernel had not recorded",
            )?,
        })
    }
}
