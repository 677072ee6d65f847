//! The one internal model of what this node should be doing. Every discovery source (today the
//! node file; later Kubernetes) produces a [`NodeState`], and everything downstream (the BPF maps,
//! the listeners, the proxy's routing) is driven from it, so both modes share one code path.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, sync::Arc};

mod http;
mod key;
pub use http::*;
pub use key::ObjectKey;

/// An enrolled pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pod {
    /// namespace/name.
    pub key: ObjectKey,
    /// Service account; with the namespace it forms the pod's SPIFFE identity.
    pub service_account: String,
    /// The pod's address, unique across the mesh.
    pub ip: IpAddr,
    /// Its address in the other family, on a dual-stack pod (Kubernetes' second `podIPs`).
    pub secondary_ip: Option<IpAddr>,
    /// Path of the pod's network namespace (e.g. `/var/run/netns/<name>`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory; the connect hooks attach here.
    pub cgroup: PathBuf,
    /// Labels, which policy selectors match.
    pub labels: Labels,
    /// The workload it belongs to (its Deployment, StatefulSet...; else its own name), which
    /// metrics name so that replicas share series.
    pub workload_name: String,
}

impl Pod {
    /// Whether `other` is the same pod in the same sandbox: only its labels and owner may
    /// differ. They change which policies select a pod and how metrics name it, not its
    /// capture, so they apply without re-enrolling it (which would close its connections).
    pub fn same_sandbox(&self, other: &Pod) -> bool {
        self.key == other.key
            && self.service_account == other.service_account
            && self.ip == other.ip
            && self.secondary_ip == other.secondary_ip
            && self.netns == other.netns
            && self.cgroup == other.cgroup
    }

    /// Its addresses: the primary, then the other family's on a dual-stack pod.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + use<> {
        std::iter::once(self.ip).chain(self.secondary_ip)
    }

    /// The source address its connection to `dst` carries: its address in `dst`'s family (a
    /// dual-stack pod reaching an IPv6 address does so from its IPv6 one), else its primary.
    /// Policies' `ipBlocks` match this, on this node as on the destination's.
    pub fn ip_toward(&self, dst: IpAddr) -> IpAddr {
        toward(self.ip, self.secondary_ip, dst)
    }
}

/// Kubernetes-style labels.
pub type Labels = BTreeMap<String, String>;

/// A pod anywhere in the mesh, as seen from this node: enough to reach it over HBONE and to
/// check that the right workload answers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    /// namespace/name.
    pub key: ObjectKey,
    /// Its address.
    pub ip: IpAddr,
    /// Its address in the other family, when it is dual-stack.
    pub secondary_ip: Option<IpAddr>,
    /// Service account (with the namespace, its identity), shared by its replicas.
    pub service_account: Arc<str>,
    /// The node it runs on, shared by the node's workloads.
    pub node: Arc<str>,
    /// Its labels (which policies select it). Replicas share one map: at ten thousand remote
    /// pods the labels were most of what a workload cost.
    pub labels: Arc<Labels>,
    /// The workload it belongs to (see [`Pod::workload_name`]), shared by its replicas.
    pub workload_name: Arc<str>,
}

impl Workload {
    /// Its addresses: the primary, then the other family's.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + use<> {
        std::iter::once(self.ip).chain(self.secondary_ip)
    }

    /// Its address in the family of `like`, if it has one: a connection to a service's IPv6
    /// address goes to its endpoints' IPv6 addresses, as Kubernetes' per-family endpoints do.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips().find(|a| a.is_ipv6() == like.is_ipv6())
    }

    /// As [`Pod::ip_toward`]: the source address its connection to `dst` carries.
    pub fn ip_toward(&self, dst: IpAddr) -> IpAddr {
        toward(self.ip, self.secondary_ip, dst)
    }
}

/// Of a pod's addresses, the one in `dst`'s family (an IPv4-mapped `dst` is IPv4), else its
/// primary.
fn toward(primary: IpAddr, secondary: Option<IpAddr>, dst: IpAddr) -> IpAddr {
    let v6 = dst.to_canonical().is_ipv6();
    std::iter::once(primary)
        .chain(secondary)
        .find(|a| a.is_ipv6() == v6)
        .unwrap_or(primary)
}

/// Whether a workload accepts plaintext.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// mTLS and plaintext (Istio's default, for migrations).
    #[default]
    Permissive,
    /// mTLS only: the kernel refuses plaintext.
    Strict,
}

/// A PeerAuthentication: sets the mTLS mode of a namespace, or of the pods its selector matches.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PeerAuthentication {
    /// namespace/name.
    pub key: ObjectKey,
    /// Labels a pod must have; empty means the whole namespace (the whole mesh, in the root
    /// namespace).
    pub selector: Labels,
    /// The mode; `None` is Istio's UNSET: the next wider policy decides.
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls`: modes of single ports (the pods' own ports), over the policy's mode.
    /// UNSET entries are left out.
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// ALLOW or DENY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    /// Only matching connections are allowed (once any ALLOW policy applies).
    Allow,
    /// Matching connections are refused; evaluated first.
    Deny,
    /// Matching connections are logged; the decision is the other policies'.
    Audit,
}

/// An AuthorizationPolicy (Istio's shape, L4 subset).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    /// namespace/name; denials name it.
    pub key: ObjectKey,
    /// Labels a pod must have; empty means every pod of the namespace.
    pub selector: Labels,
    /// `targetRefs` Services, in place of the selector: the policy applies to the ports of the
    /// local pods those services send traffic to.
    pub target_services: Vec<ObjectKey>,
    /// ALLOW or DENY.
    pub action: Action,
    /// A connection matches the policy if it matches any rule. No rules: ALLOW matches nothing,
    /// DENY matches nothing.
    pub rules: Vec<Rule>,
}

/// One rule: every non-empty part must match.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct Rule {
    /// Matches if any source matches; empty matches every source.
    pub from: Vec<Source>,
    /// Matches if any operation matches; empty matches every operation.
    pub to: Vec<Operation>,
    /// Every condition must hold (L7).
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether the rule looks at HTTP attributes, so it cannot be decided per connection.
    pub fn is_l7(&self) -> bool {
        self.when
            .iter()
            .any(|c| matches!(c.key, ConditionKey::Header(_)))
            || self.to.iter().any(Operation::is_l7)
    }
}

impl Operation {
    /// Whether it looks at HTTP attributes.
    pub fn is_l7(&self) -> bool {
        !(self.methods.is_empty()
            && self.paths.is_empty()
            && self.not_methods.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}

/// Who connects. Each non-empty list must contain a match.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct Source {
    /// `<trust-domain>/ns/<ns>/sa/<sa>` (Istio's form; a `spiffe://` prefix is accepted), with
    /// `*` as a whole value, or as a prefix or suffix.
    pub principals: Vec<String>,
    /// Principals that must not match.
    pub not_principals: Vec<String>,
    /// Source namespaces, `*` allowed as above.
    pub namespaces: Vec<String>,
    /// Namespaces that must not match.
    pub not_namespaces: Vec<String>,
    /// The connection's source address is in one of these (a source pod's own address: the
    /// proxy dials from inside the pod).
    pub ip_blocks: Vec<ipnet::IpNet>,
    /// Source addresses that must not match.
    pub not_ip_blocks: Vec<ipnet::IpNet>,
}

/// What is connected to. Methods and paths are L7: they match only HTTP requests.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct Operation {
    /// Destination ports.
    pub ports: Vec<u16>,
    /// Ports that must not match.
    pub not_ports: Vec<u16>,
    /// HTTP methods, exact.
    pub methods: Vec<String>,
    /// Methods that must not match.
    pub not_methods: Vec<String>,
    /// Normalized request paths (no query), with `*` as a whole value, prefix or suffix.
    pub paths: Vec<String>,
    /// Paths that must not match.
    pub not_paths: Vec<String>,
    /// The request's host (Host or `:authority`, with or without its port), case-insensitive,
    /// `*` globs allowed.
    pub hosts: Vec<String>,
    /// Hosts that must not match.
    pub not_hosts: Vec<String>,
}

/// A `when` condition: the key's value is in `values` (when given) and not in `not_values`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    /// What is looked at.
    pub key: ConditionKey,
    /// Accepted values, `*` globs allowed.
    pub values: Vec<String>,
    /// Refused values.
    pub not_values: Vec<String>,
}

/// The keys a `when` condition may name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ConditionKey {
    /// `request.headers[<name>]` (lowercase name): L7.
    Header(String),
    /// `source.principal`: the authenticated source's principal.
    SourcePrincipal,
    /// `source.namespace`: the authenticated source's namespace.
    SourceNamespace,
}

/// Whether `labels` has every pair of `selector`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One port of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    /// Port clients connect to on the service address.
    pub port: u16,
    /// Port on the endpoints.
    pub target_port: u16,
    /// `appProtocol: tcp`: relayed as bytes without protocol detection (for protocols where the
    /// server speaks first, which would otherwise wait out the detection timeout).
    pub opaque: bool,
}

/// A service: a virtual address balanced over endpoints that may live on any node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Service {
    /// namespace/name.
    pub key: ObjectKey,
    /// The virtual address.
    pub ip: IpAddr,
    /// Its virtual address in the other family, when it is dual-stack (Kubernetes' second
    /// `clusterIPs`).
    pub secondary_ip: Option<IpAddr>,
    /// Ports it serves.
    pub ports: Vec<ServicePort>,
    /// Endpoint pod addresses.
    pub endpoints: Vec<IpAddr>,
    /// HTTP/1.1 upgrade tokens forwarded to it, lowercase (by default only `websocket`). Any
    /// other token is removed from `Upgrade` and `Connection`, so the upstream answers as
    /// HTTP/1.1 instead of switching to a protocol the proxy cannot check (h2c).
    pub upgrades: Vec<String>,
}

/// The upgrades a service allows when it names none.
pub fn default_upgrades() -> Vec<String> {
    vec!["websocket".to_string()]
}

/// [`default_upgrades`], made once.
pub static DEFAULT_UPGRADES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(default_upgrades);

impl Service {
    /// Its virtual addresses: the primary, then the other family's.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + use<> {
        std::iter::once(self.ip).chain(self.secondary_ip)
    }

    /// Whether `port` is declared opaque TCP.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.ports.iter().any(|p| p.port == port && p.opaque)
    }

    /// The target port for a connect to `port` on the service address, if the service serves it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port)
    }
}

/// How the node proxy picks an endpoint per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub enum LbPolicy {
    /// Power of two choices over peak-EWMA latency, weighted by requests in flight.
    #[default]
    P2cPeakEwma,
    /// In turn.
    RoundRobin,
}

/// Outlier detection: eject an endpoint that keeps failing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses or connect failures that eject.
    pub consecutive_errors: u32,
    /// First ejection time; each further ejection of the same endpoint adds as much again.
    pub base_ejection_time: std::time::Duration,
    /// At most this share (0–100) of a service's endpoints are ejected at once (at least one).
    pub max_ejection_percent: u32,
    /// How often ejections are swept (Envoy's and Istio's `interval`): an ejected endpoint
    /// returns at the first sweep after its ejection time, so the time out is rounded up to it.
    pub interval: std::time::Duration,
}

/// A token bucket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: u32,
    /// Bucket size.
    pub burst: u32,
    /// One bucket per source identity instead of one for the service.
    pub per_source: bool,
}

/// Per-service traffic policy (the shape of Istio's DestinationRule `trafficPolicy`).
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct TrafficPolicy {
    /// The destinationRule it came from (`None`: the defaults).
    pub rule: Option<ObjectKey>,
    /// Endpoint choice.
    pub lb: LbPolicy,
    /// Upstream connections this node keeps to the service at most.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection at most.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight at most.
    pub max_requests: Option<u32>,
    /// Ejection of failing endpoints.
    pub outlier: Option<OutlierDetection>,
    /// How long making an upstream connection may take (`connectionPool.tcp.connectTimeout`;
    /// `None`: the transport's default).
    pub connect_timeout: Option<std::time::Duration>,
    /// Local rate limit.
    pub rate_limit: Option<RateLimit>,
    /// Retries may add at most this share (percent) of requests, plus `min_retries_per_second`.
    pub retry_budget_percent: u32,
    /// Retries always allowed per second, so a quiet service can still retry.
    pub min_retries_per_second: u32,
}

/// Everything this node should be doing.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeState {
    /// This node's name.
    pub node: String,
    /// Enrolled pods, by key.
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// Services, by key; shared with the routes built from them, and with the next state
    /// where unchanged.
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    /// Destination ports never captured (e.g. a pod's own DNS or a health port outside the mesh).
    pub excluded_ports: Vec<u16>,
    /// Every workload of the mesh by address, this node's pods included.
    pub workloads: BTreeMap<IpAddr, Arc<Workload>>,
    /// mTLS modes.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Authorization policies.
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// HTTP routes, attached to services.
    pub http_routes: Vec<HttpRoute>,
    /// Traffic policies by service.
    pub traffic_policies: BTreeMap<ObjectKey, TrafficPolicy>,
    /// Mesh-wide settings.
    pub mesh: MeshConfig,
}

/// How request paths are normalized before routing, authorization and forwarding (Istio's
/// `meshConfig.pathNormalization`); see `protocol::path`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// Invalid encodings are still refused; nothing is rewritten.
    None,
    /// RFC 3986: unreserved escapes decoded, dot segments resolved, path parameters removed.
    Base,
    /// `Base`, and runs of slashes merged.
    MergeSlashes,
    /// `MergeSlashes` after decoding `%2F` and `%5C`: the default, and the strictest.
    #[default]
    DecodeAndMergeSlashes,
}

/// Istio's default root namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Settings that hold for the whole mesh.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MeshConfig {
    /// Path normalization.
    pub path_normalization: PathNormalization,
    /// DENY rules match paths regardless of letter case (on by default: a backend that folds
    /// case would otherwise serve `/ADMIN` past a DENY on `/admin`).
    pub case_insensitive_deny: bool,
    /// Istio's root namespace: its PeerAuthentications without selector apply mesh-wide.
    pub root_namespace: String,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            path_normalization: PathNormalization::default(),
            case_insensitive_deny: true,
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
        }
    }
}

impl NodeState {
    /// The mTLS mode of `port` of a local pod, as Istio resolves it: the port's own mode in a
    /// policy selecting the pod, else the pod's (see [`NodeState::mtls_mode`]).
    pub fn mtls_mode_at(&self, pod: &Pod, port: u16) -> MtlsMode {
        self.port_mode(pod, port)
            .unwrap_or_else(|| self.mtls_mode(pod))
    }

    /// The mode of `port` of `pod` when the most specific policy that selects it by labels
    /// sets one for the port (Istio reads `portLevelMtls` only with a selector).
    fn port_mode(&self, pod: &Pod, port: u16) -> Option<MtlsMode> {
        self.peer_authentications
            .iter()
            .filter(|p| {
                p.key.namespace == pod.key.namespace
                    && !p.selector.is_empty()
                    && selects(&p.selector, &pod.labels)
            })
            .filter_map(|p| p.ports.get(&port).copied())
            .next_back()
    }

    /// The ports of `pod` whose mode differs from the pod's, with theirs: what the kernel
    /// looks up before the pod's own mode.
    pub fn mtls_port_overrides(&self, pod: &Pod) -> Vec<(u16, MtlsMode)> {
        let own = self.mtls_mode(pod);
        let mut ports: Vec<u16> = self
            .peer_authentications
            .iter()
            .flat_map(|p| p.ports.keys().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
            .into_iter()
            .filter_map(|port| self.port_mode(pod, port).map(|m| (port, m)))
            .filter(|(_, m)| *m != own)
            .collect()
    }

    /// The mTLS mode of a local pod (ports without one of their own), as Istio resolves it: a
    /// policy selecting the pod, else its namespace's, else the mesh's (a policy without
    /// selector in the root namespace), else PERMISSIVE. UNSET passes to the next. Among
    /// policies of one level the last listed wins.
    pub fn mtls_mode(&self, pod: &Pod) -> MtlsMode {
        let level = |namespace: &str, specific: bool| {
            self.peer_authentications
                .iter()
                .filter(|p| {
                    p.key.namespace == namespace
                        && p.selector.is_empty() != specific
                        && selects(&p.selector, &pod.labels)
                })
                .filter_map(|p| p.mode)
                .next_back()
        };
        level(&pod.key.namespace, true)
            .or_else(|| level(&pod.key.namespace, false))
            .or_else(|| level(&self.mesh.root_namespace, false))
            .unwrap_or_default()
    }

    /// The services that send `port` of the workload at `ip` traffic (for `explain`; the proxy
    /// reads the same from its routing table's index).
    pub fn services_sending(&self, ip: IpAddr, port: u16) -> Vec<ObjectKey> {
        self.services
            .values()
            .filter(|s| s.endpoints.contains(&ip) && s.ports.iter().any(|p| p.target_port == port))
            .map(|s| s.key.clone())
            .collect()
    }

    /// Whether an authorization policy with HTTP conditions selects `pod`: its inbound traffic
    /// must then be parsed and decided per request.
    pub fn has_l7_policy(&self, pod: &Pod) -> bool {
        self.has_l7_policy_for(&pod.key.namespace, &pod.labels, pod.ip)
    }

    /// Whether an authorization policy with HTTP conditions selects a workload of `namespace`
    /// with `labels` at `ip` (by its labels, or as an endpoint of a service it targets).
    pub fn has_l7_policy_for(&self, namespace: &str, labels: &Labels, ip: IpAddr) -> bool {
        self.authorization_policies.iter().any(|p| {
            (p.key.namespace == namespace || p.key.namespace == self.mesh.root_namespace)
                && if p.target_services.is_empty() {
                    selects(&p.selector, labels)
                } else {
                    p.target_services.iter().any(|k| {
                        self.services
                            .get(k)
                            .is_some_and(|s| s.endpoints.contains(&ip))
                    })
                }
                && p.rules.iter().any(Rule::is_l7)
        })
    }
}

/// Builders for tests of the layers above: a state without a node file.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// `namespace/name`.
    pub fn key(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// An address from a string known to be one.
    pub fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    /// `"a"` or, dual-stack, `"a,b"`: the primary and the secondary address.
    pub fn ips(s: &str) -> (IpAddr, Option<IpAddr>) {
        let mut parts = s.split(',');
        let first = ip(parts.next().unwrap_or_default());
        (first, parts.next().map(ip))
    }

    /// Service `default/name` at `vip`, serving `(port, target port)` pairs on `endpoints`.
    pub fn service(name: &str, vip: &str, ports: &[(u16, u16)], endpoints: &[&str]) -> Service {
        let (ip, secondary_ip) = ips(vip);
        Service {
            key: key("default", name),
            ip,
            secondary_ip,
            ports: ports
                .iter()
                .map(|&(port, target_port)| ServicePort {
                    port,
                    target_port,
                    opaque: false,
                })
                .collect(),
            endpoints: endpoints.iter().map(|e| self::ip(e)).collect(),
            upgrades: default_upgrades(),
        }
    }

    /// Workload `default/name` at `addr` on `node`, running as service account `sa`.
    pub fn workload(name: &str, addr: &str, sa: &str, node: &str) -> Workload {
        let (ip, secondary_ip) = ips(addr);
        Workload {
            key: key("default", name),
            ip,
            secondary_ip,
            service_account: sa.into(),
            node: node.into(),
            labels: Arc::new(Labels::from([("app".to_string(), name.to_string())])),
            workload_name: name.into(),
        }
    }

    /// Pod `default/name` of this node at `addr`.
    pub fn pod(name: &str, addr: &str) -> Pod {
        let (ip, secondary_ip) = ips(addr);
        Pod {
            key: key("default", name),
            service_account: name.into(),
            ip,
            secondary_ip,
            netns: "/run/netns/test".into(),
            cgroup: "/sys/fs/cgroup/test".into(),
            labels: Labels::from([("app".to_string(), name.to_string())]),
            workload_name: name.into(),
        }
    }

    /// A state holding `services` and `workloads`.
    pub fn state(services: Vec<Service>, workloads: Vec<Workload>) -> NodeState {
        NodeState {
            node: "node-1".into(),
            services: services
                .into_iter()
                .map(|s| (s.key.clone(), Arc::new(s)))
                .collect(),
            workloads: workloads
                .into_iter()
                .map(Arc::new)
                .flat_map(|w| w.ips().map(move |a| (a, w.clone())))
                .collect(),
            ..NodeState::default()
        }
    }

    /// A compiled pattern.
    pub fn pattern(re: &str) -> Pattern {
        Pattern::new(re).expect("test regex")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_address_is_the_pods_own_in_the_destinations_family() {
        let ip = testing::ip;
        let dual = testing::pod("client", "10.0.0.1,fd00::1");
        assert_eq!(dual.ip_toward(ip("fd00::9")), ip("fd00::1"));
        assert_eq!(dual.ip_toward(ip("10.0.0.9")), ip("10.0.0.1"));
        // A dual-stack listener sees an IPv4 peer as ::ffff:a.b.c.d: still IPv4.
        assert_eq!(dual.ip_toward(ip("::ffff:10.0.0.9")), ip("10.0.0.1"));
        // A single-stack pod has one address to give.
        let single = testing::pod("old", "10.0.0.2");
        assert_eq!(single.ip_toward(ip("fd00::9")), ip("10.0.0.2"));
        let w = testing::workload("client", "fd00::1,10.0.0.1", "client", "node-1");
        assert_eq!(w.ip_toward(ip("10.0.0.9")), ip("10.0.0.1"));
        assert_eq!(w.ip_toward(ip("fd00::9")), ip("fd00::1"));
    }

    fn pa(
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        mode: Option<MtlsMode>,
    ) -> PeerAuthentication {
        PeerAuthentication {
            key: ObjectKey {
                namespace: ns.into(),
                name: name.into(),
            },
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mode,
            ports: BTreeMap::new(),
        }
    }

    fn pod(ns: &str, app: &str) -> Pod {
        Pod {
            key: ObjectKey {
                namespace: ns.into(),
                name: app.into(),
            },
            service_account: "sa".into(),
            ip: "10.0.0.1".parse().expect("ip"),
            secondary_ip: None,
            netns: "/n".into(),
            cgroup: "/c".into(),
            labels: [("app".to_string(), app.to_string())].into(),
            workload_name: app.into(),
        }
    }

    #[test]
    fn mtls_mode_resolves_workload_then_namespace_then_mesh() {
        use MtlsMode::{Permissive, Strict};
        let mut s = NodeState::default();
        let (web, db, other) = (pod("shop", "web"), pod("shop", "db"), pod("other", "x"));
        assert_eq!(s.mtls_mode(&web), Permissive, "the default");
        // Mesh-wide STRICT from the root namespace.
        s.peer_authentications
            .push(pa("istio-system", "mesh", &[], Some(Strict)));
        assert_eq!((s.mtls_mode(&web), s.mtls_mode(&other)), (Strict, Strict));
        // A selector policy in the root namespace applies only to root-namespace pods.
        s.peer_authentications.clear();
        s.peer_authentications
            .push(pa("istio-system", "sel", &[("app", "web")], Some(Strict)));
        assert_eq!(s.mtls_mode(&web), Permissive);
        // Namespace beats mesh; workload beats namespace; UNSET inherits.
        s.peer_authentications = vec![
            pa("istio-system", "mesh", &[], Some(Strict)),
            pa("shop", "ns", &[], Some(Permissive)),
            pa("shop", "web", &[("app", "web")], Some(Strict)),
            pa("shop", "db", &[("app", "db")], None),
        ];
        assert_eq!(s.mtls_mode(&web), Strict);
        assert_eq!(s.mtls_mode(&db), Permissive, "UNSET takes the namespace's");
        assert_eq!(s.mtls_mode(&other), Strict, "the mesh's");
        // Another root namespace moves the mesh-wide level.
        s.mesh.root_namespace = "mesh-root".into();
        assert_eq!(s.mtls_mode(&other), Permissive);
    }

    #[test]
    fn port_level_mtls_overrides_the_pods_mode_for_its_port_only() {
        use MtlsMode::{Permissive, Strict};
        let (web, db) = (pod("shop", "web"), pod("shop", "db"));
        let mut open = pa("shop", "web", &[("app", "web")], None);
        open.ports = [(9090, Permissive), (8080, Strict)].into();
        let mut s = NodeState {
            peer_authentications: vec![pa("shop", "ns", &[], Some(Strict)), open],
            ..NodeState::default()
        };
        // The pod's own mode (UNSET here) still comes from the namespace.
        assert_eq!(s.mtls_mode(&web), Strict);
        assert_eq!(s.mtls_mode_at(&web, 9090), Permissive);
        assert_eq!(s.mtls_mode_at(&web, 8080), Strict);
        assert_eq!(
            s.mtls_mode_at(&web, 7070),
            Strict,
            "unlisted ports keep the pod's"
        );
        assert_eq!(
            s.mtls_mode_at(&db, 9090),
            Strict,
            "another pod is not selected"
        );
        // Only ports that differ from the pod's mode reach the kernel.
        assert_eq!(s.mtls_port_overrides(&web), vec![(9090, Permissive)]);
        assert!(s.mtls_port_overrides(&db).is_empty());
        // A namespace-wide policy's ports are not read (Istio needs a selector).
        let mut wide = pa("shop", "ns", &[], Some(Permissive));
        wide.ports = [(9090, Strict)].into();
        s.peer_authentications = vec![wide];
        assert_eq!(s.mtls_mode_at(&db, 9090), Permissive);
        // The more specific of two selecting policies is the last listed.
        let mut a = pa("shop", "a", &[("app", "web")], Some(Strict));
        a.ports = [(9090, Permissive)].into();
        let mut b = pa("shop", "b", &[("app", "web")], None);
        b.ports = [(9090, Strict)].into();
        s.peer_authentications = vec![a, b];
        assert_eq!(s.mtls_mode_at(&web, 9090), Strict);
    }
}
