//! The label vocabulary the TCP and HTTP families share (Istio's names, so existing dashboards
//! work), and the errors of making families. It sits below every family: `proxy/metrics.rs` and
//! `l7/metrics.rs` use it, and `metrics.rs`, which holds the registry, gathers them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, LazyLock},
};

use prometheus::core::Collector;

use crate::{
    identity::Identity,
    state::{Labels, ObjectKey, Pod, Workload},
};

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
///
/// The strings are shared: [`crate::view::Snapshot`] makes a workload's `Peer` once and every
/// flow clones it, so a connection copies no label, and the flow records kept after it hold
/// no string of their own (strings made during a burst of connections and kept after it
/// pinned the allocator's pages around them, so the agent's memory stayed above its baseline).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The pod's name (flow records name it; metrics name the workload, so replicas share series).
    pub pod: Arc<str>,
    /// `*_workload`: what owns the pod (its Deployment, StatefulSet...), as Istio names it.
    pub workload: Arc<str>,
    /// Its namespace.
    pub namespace: Arc<str>,
    /// Its SPIFFE ID, when proved.
    pub principal: Arc<str>,
    /// `*_app`: the `app` label (falling back to the canonical service).
    pub app: Arc<str>,
    /// `*_version`: the `version` label (falling back to the canonical revision).
    pub version: Arc<str>,
    /// `*_canonical_service`, by Istio's label precedence.
    pub canonical_service: Arc<str>,
    /// `*_canonical_revision`, by Istio's label precedence.
    pub canonical_revision: Arc<str>,
}

/// [`UNKNOWN`], made once and shared.
fn unknown() -> Arc<str> {
    static UNKNOWN_STR: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(UNKNOWN));
    UNKNOWN_STR.clone()
}

/// The first of `keys` set in `labels`.
fn first<'a>(labels: &'a Labels, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Istio's canonical service: `service.istio.io/canonical-name`, else `app.kubernetes.io/name`,
/// else `app`, else the workload's name.
pub fn canonical_service<'a>(labels: &'a Labels, workload: &'a str) -> &'a str {
    first(
        labels,
        &[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ],
    )
    .unwrap_or(workload)
}

/// Istio's canonical revision: `service.istio.io/canonical-revision`, else
/// `app.kubernetes.io/version`, else `version`, else `latest`.
pub fn canonical_revision(labels: &Labels) -> &str {
    first(
        labels,
        &[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or("latest")
}

impl Peer {
    /// A side that is not (or not provably) a mesh workload.
    pub fn unknown() -> Self {
        Self {
            pod: unknown(),
            workload: unknown(),
            namespace: unknown(),
            principal: unknown(),
            app: unknown(),
            version: unknown(),
            canonical_service: unknown(),
            canonical_revision: unknown(),
        }
    }

    /// A mesh pod with identity `id`: `pod` in the namespace, owned by `workload`, with `labels`.
    pub fn new(pod: &ObjectKey, workload: &str, labels: &Labels, id: &Identity) -> Self {
        let service = canonical_service(labels, workload);
        let revision = canonical_revision(labels);
        let app = first(labels, &["app", "app.kubernetes.io/name"]).unwrap_or(service);
        let version = first(labels, &["version", "app.kubernetes.io/version"]).unwrap_or(revision);
        Self {
            pod: pod.name.as_str().into(),
            workload: workload.into(),
            namespace: pod.namespace.as_str().into(),
            principal: id.to_string().into(),
            app: app.into(),
            version: version.into(),
            canonical_service: service.into(),
            canonical_revision: revision.into(),
        }
    }

    /// Local pod `pod` with identity `id`.
    pub fn of_pod(pod: &Pod, id: &Identity) -> Self {
        Self::new(&pod.key, &pod.workload_name, &pod.labels, id)
    }

    /// Mesh workload `w` with identity `id`.
    pub fn of_workload(w: &Workload, id: &Identity) -> Self {
        Self::new(&w.key, &w.workload_name, &w.labels, id)
    }

    /// Whether this side is a mesh workload (metrics then name the cluster).
    pub fn is_known(&self) -> bool {
        &*self.workload != UNKNOWN
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

/// The service a flow was addressed to, as labels name it. Shared like [`Peer`]'s: the routing
/// table makes each service's once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabels {
    /// `destination_service`: its FQDN.
    pub fqdn: Arc<str>,
    /// `destination_service_name`.
    pub name: Arc<str>,
    /// `destination_service_namespace`.
    pub namespace: Arc<str>,
}

impl ServiceLabels {
    /// No service (a pod address, or outside the mesh).
    pub fn unknown() -> Self {
        Self {
            fqdn: unknown(),
            name: unknown(),
            namespace: unknown(),
        }
    }

    /// Service `key`.
    pub fn of(key: &ObjectKey) -> Self {
        Self {
            fqdn: service_fqdn(key).into(),
            name: key.name.as_str().into(),
            namespace: key.namespace.as_str().into(),
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
    /// The service the client addressed, when a service address was used (or, on the
    /// destination, the one service that sends that port to the pod).
    pub service: ServiceLabels,
    /// mTLS or not.
    pub security: Security,
}

/// How many labels every flow family shares.
pub const FLOW_LABEL_COUNT: usize = 22;

/// The label names shared by every flow family, in the order [`Flow::values`] gives them. These
/// are Istio's standard labels, which Kiali's graph and Istio's dashboards query.
pub const FLOW_LABELS: [&str; FLOW_LABEL_COUNT] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "connection_security_policy",
];

/// [`FLOW_LABELS`] followed by a family's own labels.
pub fn label_names(own: &[&'static str]) -> Vec<&'static str> {
    FLOW_LABELS.iter().chain(own).copied().collect()
}

impl Flow {
    /// The values of [`FLOW_LABELS`] for `protocol` (`tcp`, `http`, `grpc`); a mesh side is in
    /// `cluster`.
    pub fn values<'a>(
        &'a self,
        protocol: &'a str,
        cluster: &'a str,
    ) -> [&'a str; FLOW_LABEL_COUNT] {
        let cluster_of = |p: &Peer| if p.is_known() { cluster } else { UNKNOWN };
        let (s, d) = (&self.src, &self.dst);
        [
            self.reporter.as_str(),
            &s.workload,
            &s.namespace,
            &s.principal,
            &s.app,
            &s.version,
            &s.canonical_service,
            &s.canonical_revision,
            cluster_of(s),
            &d.workload,
            &d.namespace,
            &d.principal,
            &d.app,
            &d.version,
            &d.canonical_service,
            &d.canonical_revision,
            cluster_of(d),
            &self.service.fqdn,
            &self.service.name,
            &self.service.namespace,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Canonical names follow Istio's label precedence, down to the workload's name and
    /// `latest`.
    #[test]
    fn canonical_names_follow_istios_precedence() {
        let all = labels(&[
            ("service.istio.io/canonical-name", "shop"),
            ("app.kubernetes.io/name", "shop-k8s"),
            ("app", "shop-app"),
            ("service.istio.io/canonical-revision", "r7"),
            ("app.kubernetes.io/version", "2.0"),
            ("version", "v2"),
        ]);
        assert_eq!(canonical_service(&all, "shop-deploy"), "shop");
        assert_eq!(canonical_revision(&all), "r7");
        let k8s = labels(&[
            ("app.kubernetes.io/name", "shop-k8s"),
            ("app", "shop-app"),
            ("app.kubernetes.io/version", "2.0"),
            ("version", "v2"),
        ]);
        assert_eq!(canonical_service(&k8s, "shop-deploy"), "shop-k8s");
        assert_eq!(canonical_revision(&k8s), "2.0");
        let app = labels(&[("app", "shop-app"), ("version", "v2")]);
        assert_eq!(canonical_service(&app, "shop-deploy"), "shop-app");
        assert_eq!(canonical_revision(&app), "v2");
        let none = labels(&[("app", "")]);
        assert_eq!(canonical_service(&none, "shop-deploy"), "shop-deploy");
        assert_eq!(canonical_revision(&none), "latest");
    }

    /// `app` and `version` are the pod's labels, falling back to the canonical names.
    #[test]
    fn app_and_version_fall_back_to_the_canonical_names() {
        let key = ObjectKey {
            namespace: "shop".into(),
            name: "cart-6b7c9-x2x".into(),
        };
        let id = Identity::new("td", "shop", "cart");
        let p = Peer::new(
            &key,
            "cart",
            &labels(&[("app", "cart-app"), ("version", "v3")]),
            &id,
        );
        assert_eq!((&*p.pod, &*p.workload), ("cart-6b7c9-x2x", "cart"));
        assert_eq!((&*p.app, &*p.version), ("cart-app", "v3"));
        assert_eq!(&*p.canonical_service, "cart-app");
        assert_eq!(&*p.principal, "spiffe://td/ns/shop/sa/cart");
        let p = Peer::new(
            &key,
            "cart",
            &labels(&[("service.istio.io/canonical-name", "basket")]),
            &id,
        );
        assert_eq!((&*p.app, &*p.version), ("basket", "latest"));
    }

    /// Every label has a value in its place, and only mesh sides are in the cluster.
    #[test]
    fn flow_values_line_up_with_the_names() {
        let key = ObjectKey {
            namespace: "shop".into(),
            name: "cart-1".into(),
        };
        let flow = Flow {
            reporter: Reporter::Destination,
            src: Peer::unknown(),
            dst: Peer::new(
                &key,
                "cart",
                &labels(&[("app", "cart")]),
                &Identity::new("td", "shop", "cart"),
            ),
            service: ServiceLabels::of(&ObjectKey {
                namespace: "shop".into(),
                name: "cart-svc".into(),
            }),
            security: Security::MutualTls,
        };
        let values = flow.values("http", "east");
        let by_name: HashMap<&str, &str> = FLOW_LABELS.iter().copied().zip(values).collect();
        assert_eq!(by_name["reporter"], "destination");
        assert_eq!(by_name["source_cluster"], UNKNOWN);
        assert_eq!(by_name["source_app"], UNKNOWN);
        assert_eq!(by_name["destination_cluster"], "east");
        assert_eq!(by_name["destination_workload"], "cart");
        assert_eq!(by_name["destination_canonical_revision"], "latest");
        assert_eq!(
            by_name["destination_service"],
            "cart-svc.shop.svc.cluster.local"
        );
        assert_eq!(by_name["destination_service_name"], "cart-svc");
        assert_eq!(by_name["destination_service_namespace"], "shop");
        assert_eq!(by_name["request_protocol"], "http");
        assert_eq!(by_name["connection_security_policy"], "mutual_tls");
    }
}
