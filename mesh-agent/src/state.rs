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
}
