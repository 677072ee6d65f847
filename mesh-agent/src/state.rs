//! The one internal model of what this node should be doing. Every discovery source (today the
//! node file; later Kubernetes) produces a [`NodeState`], and everything downstream (the BPF maps,
//! the listeners, the proxy's routing) is driven from it, so both modes share one code path.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

/// `namespace/name`, the identity of a pod or service inside the state model.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Object name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ObjectKey {
    /// A name usable in a bpffs file name: `namespace_name`. bpffs forbids `.` in names, and
    /// `_` cannot occur in the DNS labels that namespaces and names are validated to be.
    pub fn file_stem(&self) -> String {
        format!("{}_{}", self.namespace, self.name)
    }
}

/// An enrolled pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// namespace/name.
    pub key: ObjectKey,
    /// Service account; with the namespace it forms the pod's SPIFFE identity.
    pub service_account: String,
    /// The pod's address, unique across the mesh.
    pub ip: IpAddr,
    /// Path of the pod's network namespace (e.g. `/var/run/netns/<name>`).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory; the connect hooks attach here.
    pub cgroup: PathBuf,
    /// Labels, which policy selectors match.
    pub labels: Labels,
}

/// Kubernetes-style labels.
pub type Labels = BTreeMap<String, String>;

/// A pod anywhere in the mesh, as seen from this node: enough to reach it over HBONE and to
/// check that the right workload answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// namespace/name.
    pub key: ObjectKey,
    /// Its address.
    pub ip: IpAddr,
    /// Service account (with the namespace, its identity).
    pub service_account: String,
    /// The node it runs on.
    pub node: String,
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// namespace/name.
    pub key: ObjectKey,
    /// Labels a pod must have; empty means the whole namespace.
    pub selector: Labels,
    /// The mode.
    pub mode: MtlsMode,
}

/// ALLOW or DENY.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Only matching connections are allowed (once any ALLOW policy applies).
    Allow,
    /// Matching connections are refused; evaluated first.
    Deny,
}

/// An AuthorizationPolicy (Istio's shape, L4 subset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// namespace/name; denials name it.
    pub key: ObjectKey,
    /// Labels a pod must have; empty means every pod of the namespace.
    pub selector: Labels,
    /// ALLOW or DENY.
    pub action: Action,
    /// A connection matches the policy if it matches any rule. No rules: ALLOW matches nothing,
    /// DENY matches nothing.
    pub rules: Vec<Rule>,
}

/// One rule: every non-empty part must match.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Rule {
    /// Matches if any source matches; empty matches every source.
    pub from: Vec<Source>,
    /// Matches if any operation matches; empty matches every operation.
    pub to: Vec<Operation>,
}

/// Who connects. Each non-empty list must contain a match.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Source {
    /// `<trust-domain>/ns/<ns>/sa/<sa>` (Istio's form; a `spiffe://` prefix is accepted), with
    /// `*` as a whole value, or as a prefix or suffix.
    pub principals: Vec<String>,
    /// Source namespaces, `*` allowed as above.
    pub namespaces: Vec<String>,
}

/// What is connected to.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Operation {
    /// Destination ports.
    pub ports: Vec<u16>,
}

/// Whether `labels` has every pair of `selector`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One port of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port clients connect to on the service address.
    pub port: u16,
    /// Port on the endpoints.
    pub target_port: u16,
}

/// A service: a virtual address balanced over endpoints that may live on any node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// namespace/name.
    pub key: ObjectKey,
    /// The virtual address.
    pub ip: IpAddr,
    /// Ports it serves.
    pub ports: Vec<ServicePort>,
    /// Endpoint pod addresses.
    pub endpoints: Vec<IpAddr>,
}

impl Service {
    /// The target port for a connect to `port` on the service address, if the service serves it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target_port)
    }
}

/// Everything this node should be doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// This node's name.
    pub node: String,
    /// Enrolled pods, by key.
    pub pods: BTreeMap<ObjectKey, Pod>,
    /// Services, by key.
    pub services: BTreeMap<ObjectKey, Service>,
    /// Destination ports never captured (e.g. a pod's own DNS or a health port outside the mesh).
    pub excluded_ports: Vec<u16>,
    /// Every workload of the mesh by address, this node's pods included.
    pub workloads: BTreeMap<IpAddr, Workload>,
    /// mTLS modes.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Authorization policies.
    pub authorization_policies: Vec<AuthorizationPolicy>,
}

impl NodeState {
    /// The mTLS mode of a local pod: a selector policy beats a namespace-wide one; the default
    /// is PERMISSIVE.
    pub fn mtls_mode(&self, pod: &Pod) -> MtlsMode {
        let applicable = self
            .peer_authentications
            .iter()
            .filter(|p| p.key.namespace == pod.key.namespace && selects(&p.selector, &pod.labels));
        let mut mode = None;
        for p in applicable {
            let specific = !p.selector.is_empty();
            match mode {
                Some((true, _)) if !specific => {}
                _ => mode = Some((specific, p.mode)),
            }
        }
        mode.map(|(_, m)| m).unwrap_or_default()
    }
}
