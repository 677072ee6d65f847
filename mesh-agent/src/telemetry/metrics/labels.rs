//! The label vocabulary the TCP and HTTP families share (Istio's names, so existing dashboards
//! work), and the errors of making families. It sits below every family: `proxy/metrics.rs` and
//! `l7/metrics.rs` use it, and `metrics.rs`, which holds the registry, gathers them.

use std::{collections::HashMap, net::SocketAddr};

use prometheus::core::Collector;

use crate::{identity::Identity, state::ObjectKey};

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A family could not be made or registered (a programming error: names clash).
    #[error("metric family: {0}")]
    Family(#[from] prometheus::Error),
    /// The thread serving `/metrics` could not start.
    #[error("cannot start the metrics thread: {0} (out of threads or memory?)")]
    Thread(std::io::Error),
    /// Binding the endpoint failed.
    #[error(
        "cannot bind the metrics endpoint {addr}: {source} (is another agent using it? pass --metrics-addr)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Label used where a side of a flow is not a mesh workload (Istio's word).
pub const UNKNOWN: &str = "unknown";

/// One side of a flow, as labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// `source_workload` / `destination_workload`: the pod's name.
    pub workload: String,
    /// Its namespace.
    pub namespace: String,
    /// Its SPIFFE ID, when proved.
    pub principal: String,
}

impl Peer {
    /// A side that is not (or not provably) a mesh workload.
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
        }
    }

    /// The workload `key` with identity `id`.
    pub fn new(key: &ObjectKey, id: &Identity) -> Self {
        Self {
            workload: key.name.clone(),
            namespace: key.namespace.clone(),
            principal: id.to_string(),
        }
    }
}

/// Which end of a flow reports it (Istio's `reporter`): the client's node reports `source`,
/// the server's node `destination`; a same-node flow is reported by both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    /// The client's side.
    Source,
    /// The server's side.
    Destination,
}

impl Reporter {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// Whether the flow was mutually authenticated TLS (`connection_security_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// HBONE: mTLS between the nodes.
    MutualTls,
    /// No TLS: same-node hand-over (identity from the kernel) or plaintext from outside.
    None,
}

impl Security {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MutualTls => "mutual_tls",
            Self::None => "none",
        }
    }
}

/// The labels every TCP and HTTP series of one flow shares.
#[derive(Clone, Debug)]
pub struct Flow {
    /// Who reports.
    pub reporter: Reporter,
    /// The client.
    pub src: Peer,
    /// The server.
    pub dst: Peer,
    /// `destination_service`: the service's FQDN when a service address was used.
    pub service: String,
    /// mTLS or not.
    pub security: Security,
}

/// The label names shared by every flow family, in the order [`Flow::values`] gives them.
pub const FLOW_LABELS: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "connection_security_policy",
];

/// [`FLOW_LABELS`] followed by a family's own labels.
pub fn label_names(own: &[&'static str]) -> Vec<&'static str> {
    FLOW_LABELS.iter().chain(own).copied().collect()
}

impl Flow {
    /// The values of [`FLOW_LABELS`] for `protocol` (`tcp`, `http`, `grpc`).
    pub fn values<'a>(&'a self, protocol: &'a str) -> [&'a str; 10] {
        [
            self.reporter.as_str(),
            &self.src.workload,
            &self.src.namespace,
            &self.src.principal,
            &self.dst.workload,
            &self.dst.namespace,
            &self.dst.principal,
            &self.service,
            protocol,
            self.security.as_str(),
        ]
    }

    /// The same flow as the other end reports it.
    pub fn reported_by(&self, reporter: Reporter) -> Self {
        Self {
            reporter,
            ..self.clone()
        }
    }
}

/// The FQDN Istio puts in `destination_service`.
pub fn service_fqdn(key: &ObjectKey) -> String {
    format!("{}.{}.svc.cluster.local", key.name, key.namespace)
}

/// A labelled family whose series can be listed and removed.
pub trait RemovableFamily: Collector {
    /// Removes the series with exactly `labels`.
    fn remove(&self, labels: &HashMap<&str, &str>);
}

impl<T: prometheus::core::MetricVecBuilder> RemovableFamily for prometheus::core::MetricVec<T> {
    fn remove(&self, labels: &HashMap<&str, &str>) {
        let _ = prometheus::core::MetricVec::remove(self, labels);
    }
}
