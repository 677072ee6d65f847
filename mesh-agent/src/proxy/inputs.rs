//! What the connection handlers read, in one place: the published view, the kernel's
//! original-destination table, the dialer and pools, and where records go. Built once by the
//! agent; each handler takes the parts it reads from here.

use std::sync::Arc;

use crate::{
    capture::bpf::OrigDstTable,
    identity::certs::CertManager,
    protocol::guard::HttpTimeouts,
    telemetry::{flows::FlowLog, metrics::Metrics},
    transport::{dial::Dialer, splice::Splicer, upstream},
    view::View,
};

/// The handlers' inputs.
#[derive(Debug)]
pub struct ProxyInputs {
    /// The published view: routes, state and local pods.
    pub view: Arc<View>,
    /// Original destinations recorded by the kernel.
    pub orig_dst: OrigDstTable,
    /// Splices same-node L4 connections in the kernel; `None` when turned off.
    pub splice: Option<Arc<Splicer>>,
    /// Opens upstream connections (and owns the HBONE pool).
    pub dialer: Dialer,
    /// Pooled upstream HTTP connections (L7).
    pub http_pool: Arc<upstream::Pool>,
    /// Workload certificates, for the HBONE server side.
    pub certs: Arc<CertManager>,
    /// Whether HBONE connections go to kernel TLS after the handshake.
    pub ktls: bool,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// Flow records: the access log and `/debug/flows`.
    pub flows: Arc<FlowLog>,
    /// HTTP/1 head and idle timeouts.
    pub http_timeouts: HttpTimeouts,
    /// Open connections, and the signal to finish them.
    pub drain: super::drain::Drain,
    /// The caps on open connections.
    pub limits: super::drain::ConnLimits,
}
