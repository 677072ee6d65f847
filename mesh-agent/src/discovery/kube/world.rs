//! What the agent keeps of the cluster, and how it becomes a node file's model.
//!
//! Each watched kind is kept as the few fields the proxy needs (a remote pod is its name, IP,
//! service account, node, labels and owner), so ten thousand remote pods cost little. From these
//! one pure function, [`World::raw_file`], writes the same [`RawFile`] a node file reads into, and
//! the node file's validation turns it into the `NodeState` the agent reconciles: one code path
//! after discovery.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde_json::Value;

use super::podfs::Found;
use crate::{
    discovery::nodefile::{
        ObjectError, objects,
        raw::{RawFile, RawPod, RawService, RawServicePort, RawWorkload},
    },
    state::Labels,
};

/// Which labels enroll pods.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The namespace label that enrolls every pod in it (`mesh.dev/enabled=true`); the same
    /// label set to `false` on a pod opts that pod out.
    pub label: String,
    /// Also enroll namespaces labelled `istio.io/dataplane-mode=ambient` (pods opt out with
    /// `istio.io/dataplane-mode=none`), for teams moving from Istio ambient.
    pub istio_ambient: bool,
}

/// Our enrollment label.
pub const ENROLL_LABEL: &str = "mesh.dev/enabled";
const AMBIENT_LABEL: &str = "istio.io/dataplane-mode";

impl Default for Enrollment {
    fn default() -> Self {
        Self {
            label: ENROLL_LABEL.to_string(),
            istio_ambient: false,
        }
    }
}

/// A pod, as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Its name.
    pub name: String,
    /// Its namespace. This and the other names replicas have in common are shared (see
    /// [`PodInterner`]).
    pub namespace: Arc<str>,
    /// Its labels, shared with every pod that has the same.
    pub labels: Arc<Labels>,
    /// The workload it belongs to (see [`workload_name`]).
    pub workload_name: Arc<str>,
    /// Its service account (`default` when unset, as Kubernetes defaults it).
    pub service_account: Arc<str>,
    /// The node it is scheduled on, if any yet.
    pub node: Option<Arc<str>>,
    /// Its address, once it has one.
    pub ip: Option<IpAddr>,
    /// Its address in the other family (`podIPs`), when it is dual-stack.
    pub secondary_ip: Option<IpAddr>,
    /// Host-network pods are never enrolled: their netns is the node's.
    pub host_network: bool,
    /// Finished pods (Succeeded, Failed) hold no connections.
    pub finished: bool,
}

impl PodInfo {
    /// The fields kept of a Pod object; `None` for one with no name or UID.
    pub fn from_pod(p: &Pod) -> Option<Self> {
        let spec = p.spec.as_ref();
        let status = p.status.as_ref();
        let name = p.metadata.name.clone()?;
        p.metadata.uid.as_ref()?;
        let ip = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        Some(Self {
            workload_name: workload_name(p).unwrap_or_else(|| name.clone()).into(),
            name,
            namespace: p.metadata.namespace.as_deref().unwrap_or("default").into(),
            labels: Arc::new(p.metadata.labels.clone().unwrap_or_default()),
            service_account: spec
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .into(),
            node: spec.and_then(|s| s.node_name.as_deref()).map(Into::into),
            ip,
            secondary_ip: other_family(
                ip,
                status
                    .and_then(|s| s.pod_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|a| a.ip.as_str()),
            ),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: status
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed"),
        })
    }
}

/// The first of `all` (Kubernetes' `podIPs` or `clusterIPs`) in the other family than
/// `primary`: a dual-stack object's second address.
fn other_family<'a>(
    primary: Option<IpAddr>,
    all: impl IntoIterator<Item = &'a str>,
) -> Option<IpAddr> {
    let primary = primary?;
    all.into_iter()
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .find(|a| a.is_ipv6() != primary.is_ipv6())
}

/// The workload a pod belongs to, as Istio's metrics name it: the controller that made it,
/// with a Deployment's ReplicaSet named as the Deployment (the ReplicaSet's name less the
/// `pod-template-hash`) and a CronJob's Job as the CronJob (the Job's name less its numeric
/// schedule suffix). `None` for a pod no controller made: it is its own workload.
pub fn workload_name(p: &Pod) -> Option<String> {
    let owner = p
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))?;
    let name = owner.name.as_str();
    let named = match owner.kind.as_str() {
        "ReplicaSet" => p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
            .filter(|h| !h.is_empty())
            .and_then(|h| name.strip_suffix(h.as_str()))
            .and_then(|n| n.strip_suffix('-')),
        "Job" => name.rsplit_once('-').and_then(|(base, stamp)| {
            let numeric =
                (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
            (numeric && !base.is_empty()).then_some(base)
        }),
        _ => None,
    };
    Some(named.unwrap_or(name).to_string())
}

/// Keeps one copy of equal values: the replicas of a workload have the same labels, and ten
/// thousand copies of a label map were the largest part of what remote pods cost. Values no
/// one else holds any more are dropped as the set grows.
#[derive(Debug)]
pub struct Interner<T: ?Sized + Eq + std::hash::Hash> {
    set: std::collections::HashSet<Arc<T>>,
    /// The set's size after the last sweep.
    swept_at: usize,
}

impl<T: ?Sized + Eq + std::hash::Hash> Default for Interner<T> {
    fn default() -> Self {
        Self {
            set: std::collections::HashSet::new(),
            swept_at: 0,
        }
    }
}

impl<T: ?Sized + Eq + std::hash::Hash> Interner<T> {
    /// The shared copy of `v`.
    pub fn get(&mut self, v: Arc<T>) -> Arc<T> {
        if let Some(x) = self.set.get(&v) {
            return x.clone();
        }
        if self.set.len() >= 2 * self.swept_at.max(64) {
            self.set.retain(|x| Arc::strong_count(x) > 1);
            self.swept_at = self.set.len();
        }
        self.set.insert(v.clone());
        v
    }
}

/// One copy of what replicas have in common: labels, namespace, owner, service account and
/// node. At ten thousand remote pods these copies were most of what a pod cost.
#[derive(Debug, Default)]
pub struct PodInterner {
    labels: Interner<Labels>,
    names: Interner<str>,
}

impl PodInterner {
    /// `p`, sharing what an earlier pod has too.
    pub fn intern(&mut self, mut p: PodInfo) -> PodInfo {
        p.labels = self.labels.get(p.labels);
        p.namespace = self.names.get(p.namespace);
        p.workload_name = self.names.get(p.workload_name);
        p.service_account = self.names.get(p.service_account);
        p.node = p.node.map(|n| self.names.get(n));
        p
    }
}

/// A service's address and ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its cluster IP; headless services have none and are not proxied.
    pub ip: Option<IpAddr>,
    /// Its cluster IP in the other family (`clusterIPs`), when it is dual-stack.
    pub secondary_ip: Option<IpAddr>,
    /// (name, port, target port, appProtocol).
    pub ports: Vec<(String, u16, IntOrString, Option<String>)>,
}

impl ServiceInfo {
    /// The fields kept of a Service object.
    pub fn from_service(s: &Service) -> Option<Self> {
        let spec = s.spec.as_ref();
        let ip = spec
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        Some(Self {
            name: s.metadata.name.clone()?,
            namespace: s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            ip,
            secondary_ip: other_family(
                ip,
                spec.and_then(|s| s.cluster_ips.as_ref())
                    .into_iter()
                    .flatten()
                    .map(String::as_str),
            ),
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .map(|ports| {
                    ports
                        .iter()
                        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
                        .filter_map(|p| {
                            let port = u16::try_from(p.port).ok()?;
                            Some((
                                p.name.clone().unwrap_or_default(),
                                port,
                                p.target_port.clone().unwrap_or(IntOrString::Int(p.port)),
                                p.app_protocol.clone(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// The ready endpoints of one EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    /// The service it belongs to (`kubernetes.io/service-name`), in the slice's namespace.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// (port name, port number).
    pub ports: Vec<(String, u16)>,
    /// Addresses of ready endpoints.
    pub addresses: Vec<IpAddr>,
}

impl SliceInfo {
    /// The fields kept of an EndpointSlice.
    pub fn from_slice(s: &EndpointSlice) -> Option<Self> {
        let service = s
            .metadata
            .labels
            .as_ref()?
            .get("kubernetes.io/service-name")?
            .clone();
        Some(Self {
            service,
            namespace: s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            ports: s
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect(),
            addresses: s
                .endpoints
                .iter()
                .flatten()
                // Ready unless the slice says otherwise, as kube-proxy reads it.
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
                .collect(),
        })
    }
}

/// Everything kept of the cluster, by kind.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Namespace labels, by name.
    pub namespaces: BTreeMap<String, Labels>,
    /// Pods cluster-wide, by UID.
    pub pods: BTreeMap<String, Box<PodInfo>>,
    /// Services, by namespace/name.
    pub services: BTreeMap<String, ServiceInfo>,
    /// EndpointSlices, by namespace/name.
    pub slices: BTreeMap<String, SliceInfo>,
    /// Istio and Gateway API objects as the API sent them, by kind/namespace/name.
    pub objects: BTreeMap<String, Value>,
}

/// Namespace labels as the API sent them.
pub fn namespace_labels(n: &Namespace) -> Option<(String, Labels)> {
    Some((
        n.metadata.name.clone()?,
        n.metadata.labels.clone().unwrap_or_default(),
    ))
}

impl World {
    /// Whether `pod` is in the mesh: its namespace enrolls it, it has not opted out, it is not
    /// on the host network, and it is not finished.
    pub fn enrolled(&self, pod: &PodInfo, e: &Enrollment) -> bool {
        if pod.host_network || pod.finished {
            return false;
        }
        let ns = self.namespaces.get(&*pod.namespace);
        let ns_label = |k: &str| ns.and_then(|l| l.get(k)).map(String::as_str);
        let pod_label = |k: &str| pod.labels.get(k).map(String::as_str);
        let ours = ns_label(&e.label) == Some("true") && pod_label(&e.label) != Some("false");
        let ambient = e.istio_ambient
            && ns_label(AMBIENT_LABEL) == Some("ambient")
            && pod_label(AMBIENT_LABEL) != Some("none")
            && pod_label(&e.label) != Some("false");
        ours || ambient
    }

    /// The node-file model of this node's view of the cluster. `local` holds where each of this
    /// node's pods was found (by UID); an enrolled local pod not found yet is left out, so it
    /// stays unenrolled until its sandbox is visible.
    pub fn raw_file(
        &self,
        node: &str,
        e: &Enrollment,
        local: &HashMap<String, Found>,
    ) -> (RawFile, Vec<ObjectError>) {
        let mut file = RawFile {
            node: Some(node.into()),
            ..RawFile::default()
        };
        for (uid, p) in &self.pods {
            let (Some(ip), Some(pod_node)) = (p.ip, p.node.as_deref()) else {
                continue;
            };
            if !self.enrolled(p, e) {
                continue;
            }
            if pod_node == node {
                let Some(found) = local.get(uid) else {
                    continue;
                };
                file.pods.push(RawPod {
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.to_string()),
                    service_account: Some(p.service_account.to_string()),
                    ip: Some(ip.to_string()),
                    secondary_ip: p.secondary_ip.map(|a| a.to_string()),
                    netns: Some(found.netns.clone()),
                    cgroup: Some(found.cgroup.clone()),
                    labels: (*p.labels).clone(),
                    workload_name: Some(p.workload_name.to_string()),
                });
            } else {
                file.workloads.push(RawWorkload {
                    name: Some(p.name.clone()),
                    namespace: Some(p.namespace.to_string()),
                    service_account: Some(p.service_account.to_string()),
                    ip: Some(ip.to_string()),
                    secondary_ip: p.secondary_ip.map(|a| a.to_string()),
                    node: Some(pod_node.to_string()),
                    labels: p.labels.clone(),
                    workload_name: Some(p.workload_name.to_string()),
                });
            }
        }
        // Each service's slices, found once rather than by a scan per service.
        let mut by_service: HashMap<(&str, &str), Vec<&SliceInfo>> = HashMap::new();
        for x in self.slices.values() {
            by_service
                .entry((x.namespace.as_str(), x.service.as_str()))
                .or_default()
                .push(x);
        }
        for s in self.services.values() {
            let Some(ip) = s.ip else {
                continue;
            };
            let slices = by_service
                .get(&(s.namespace.as_str(), s.name.as_str()))
                .map_or(&[][..], Vec::as_slice);
            let ports = s
                .ports
                .iter()
                .filter_map(|(name, port, target, app)| {
                    let target = match target {
                        IntOrString::Int(n) => u16::try_from(*n).ok(),
                        // A named port is resolved by the endpoints' port of the same name.
                        IntOrString::String(_) => slices
                            .iter()
                            .flat_map(|x| &x.ports)
                            .find(|(n, _)| n == name)
                            .map(|(_, p)| *p),
                    }?;
                    Some(RawServicePort {
                        port: *port,
                        target_port: Some(target),
                        app_protocol: app.clone(),
                    })
                })
                .collect();
            let mut endpoints: Vec<String> = slices
                .iter()
                .flat_map(|x| &x.addresses)
                .map(ToString::to_string)
                .collect();
            endpoints.sort();
            endpoints.dedup();
            file.services.push(RawService {
                name: Some(s.name.clone()),
                namespace: Some(s.namespace.clone()),
                ip: Some(ip.to_string()),
                secondary_ip: s.secondary_ip.map(|a| a.to_string()),
                ports: Some(ports),
                endpoints,
                allowed_upgrades: None,
            });
        }
        let mut errors = Vec::new();
        for (key, obj) in &self.objects {
            objects::read(key, obj, &mut file, &mut errors);
        }
        (file, errors)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(v: Value) -> PodInfo {
        PodInfo::from_pod(&serde_json::from_value(v).expect("pod")).expect("kept")
    }

    #[test]
    fn interner_shares_equal_values_and_drops_unheld_ones() {
        let mut i = Interner::default();
        let a = i.get(Arc::new("a".to_string()));
        let a2 = i.get(Arc::new("a".to_string()));
        assert!(Arc::ptr_eq(&a, &a2), "equal values share one copy");
        // Values no one holds are swept once the set doubles; held ones survive.
        for n in 0..200 {
            drop(i.get(Arc::new(n.to_string())));
        }
        assert!(
            i.set.len() < 150,
            "unheld values were swept: {}",
            i.set.len()
        );
        assert!(Arc::ptr_eq(&a, &i.get(Arc::new("a".to_string()))));
    }

    #[test]
    fn replicas_share_their_names_and_labels() {
        let replica = |n: &str| {
            pod(
                json!({"metadata": {"name": n, "namespace": "shop", "uid": n, "labels": {"app": "web"}},
                       "spec": {"nodeName": "n1", "serviceAccountName": "web", "containers": []}}),
            )
        };
        let mut i = PodInterner::default();
        let (a, b) = (i.intern(replica("a")), i.intern(replica("b")));
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert!(Arc::ptr_eq(&a.service_account, &b.service_account));
        assert!(Arc::ptr_eq(
            a.node.as_ref().expect("a node"),
            b.node.as_ref().expect("a node")
        ));
        assert_eq!((&*a.name, &*b.name), ("a", "b"));
    }

    /// The workload name of pod `name` whose controller is `kind/owner`, with `hash` as its
    /// `pod-template-hash`.
    fn owned(name: &str, kind: &str, owner: &str, controller: bool, hash: Option<&str>) -> String {
        let labels = hash.map_or_else(|| json!({}), |h| json!({"pod-template-hash": h}));
        pod(json!({
            "metadata": {"name": name, "uid": "u", "labels": labels, "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "o", "controller": controller}
            ]},
        }))
        .workload_name
        .to_string()
    }

    /// Metrics name what owns a pod, as Istio's heuristics do, so replicas share series.
    #[test]
    fn a_pods_workload_is_its_controller_named_as_istio_names_it() {
        let rs = |name, owner, hash| owned(name, "ReplicaSet", owner, true, hash);
        assert_eq!(
            rs("web-7d9f8-abcde", "web-7d9f8", Some("7d9f8")),
            "web",
            "a Deployment's ReplicaSet"
        );
        assert_eq!(
            rs("web-x1", "web-7d9f8", None),
            "web-7d9f8",
            "a bare ReplicaSet"
        );
        assert_eq!(
            rs("web-x1", "web-7d9f8", Some("zzz")),
            "web-7d9f8",
            "a hash the name does not end with"
        );
        assert_eq!(owned("db-0", "StatefulSet", "db", true, None), "db");
        assert_eq!(owned("log-abcde", "DaemonSet", "log", true, None), "log");
        assert_eq!(
            owned("backup-28930015-x", "Job", "backup-28930015", true, None),
            "backup",
            "a CronJob's Job"
        );
        assert_eq!(
            owned("migrate-x", "Job", "migrate-1", true, None),
            "migrate-1",
            "a Job of its own"
        );
        assert_eq!(
            owned("solo", "ReplicaSet", "rs", false, None),
            "solo",
            "an owner that is not the controller"
        );
        let bare = pod(json!({"metadata": {"name": "solo", "uid": "u"}}));
        assert_eq!(
            &*bare.workload_name, "solo",
            "no owner: the pod is its own workload"
        );
    }

    fn world() -> World {
        let mut w = World::default();
        w.namespaces.insert(
            "shop".into(),
            [(ENROLL_LABEL.to_string(), "true".to_string())].into(),
        );
        w.namespaces.insert("plain".into(), Labels::new());
        w.namespaces.insert(
            "ambient".into(),
            [(AMBIENT_LABEL.to_string(), "ambient".to_string())].into(),
        );
        for (uid, name, ns, node, ip, extra) in [
            ("u1", "web-1", "shop", "n1.example", "10.0.1.5", json!({})),
            ("u2", "web-2", "shop", "n2.example", "10.0.2.5", json!({})),
            (
                "u3",
                "out",
                "shop",
                "n1.example",
                "10.0.1.6",
                json!({"labels": {"mesh.dev/enabled": "false"}}),
            ),
            ("u4", "plain", "plain", "n1.example", "10.0.1.7", json!({})),
            ("u5", "amb", "ambient", "n1.example", "10.0.1.8", json!({})),
        ] {
            let mut meta = json!({"uid": uid, "name": name, "namespace": ns});
            if let Some(l) = extra.get("labels") {
                meta["labels"] = l.clone();
            }
            let p = pod(
                json!({"metadata": meta, "spec": {"nodeName": node, "serviceAccountName": "sa", "containers": []}, "status": {"podIP": ip, "phase": "Running"}}),
            );
            w.pods.insert(uid.into(), Box::new(p));
        }
        w.pods.insert(
            "u6".into(),
            Box::new(pod(json!({"metadata": {"uid": "u6", "name": "host", "namespace": "shop"}, "spec": {"nodeName": "n1.example", "hostNetwork": true, "containers": []}, "status": {"podIP": "198.51.100.1"}}))),
        );
        w
    }

    fn found() -> HashMap<String, Found> {
        ["u1", "u3", "u4", "u5", "u6"]
            .into_iter()
            .map(|u| {
                (
                    u.to_string(),
                    Found {
                        netns: format!("/proc/1/{u}").into(),
                        cgroup: format!("/cg/{u}").into(),
                        netns_inode: 1,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_namespace_label_enrolls_and_a_pod_label_opts_out() {
        let w = world();
        let (f, e) = w.raw_file("n1.example", &Enrollment::default(), &found());
        assert!(e.is_empty(), "{e:?}");
        let local: Vec<_> = f.pods.iter().filter_map(|p| p.name.as_deref()).collect();
        assert_eq!(local, ["web-1"]);
        let remote: Vec<_> = f
            .workloads
            .iter()
            .filter_map(|p| p.name.as_deref())
            .collect();
        assert_eq!(remote, ["web-2"]);
        // Migrating from Istio ambient: its label enrolls too, when asked.
        let ambient = Enrollment {
            istio_ambient: true,
            ..Enrollment::default()
        };
        let (f, _) = w.raw_file("n1.example", &ambient, &found());
        let local: Vec<_> = f.pods.iter().filter_map(|p| p.name.as_deref()).collect();
        assert_eq!(local, ["web-1", "amb"]);
        // A local pod whose sandbox is not found yet stays out.
        let (f, _) = w.raw_file("n1.example", &Enrollment::default(), &HashMap::new());
        assert!(f.pods.is_empty());
    }

    #[test]
    fn services_take_endpoints_and_named_target_ports_from_slices() {
        let mut w = world();
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "targetPort": "web"}, {"name": "dns", "port": 53, "protocol": "UDP"}]}})).expect("svc");
        w.services.insert(
            "shop/web".into(),
            ServiceInfo::from_service(&svc).expect("kept"),
        );
        let slice: EndpointSlice = serde_json::from_value(json!({"metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["10.0.2.5"]}, {"addresses": ["10.0.1.5"], "conditions": {"ready": true}}, {"addresses": ["10.0.1.9"], "conditions": {"ready": false}}]})).expect("slice");
        w.slices.insert(
            "shop/web-abc".into(),
            SliceInfo::from_slice(&slice).expect("kept"),
        );
        let (f, _) = w.raw_file("n1.example", &Enrollment::default(), &found());
        let s = &f.services[0];
        assert_eq!(s.ip.as_deref(), Some("10.96.0.10"));
        let ports = s.ports.as_ref().expect("ports");
        assert_eq!(
            (ports.len(), ports[0].port, ports[0].target_port),
            (1, 80, Some(8080))
        );
        assert_eq!(s.endpoints, ["10.0.1.5", "10.0.2.5"]);
    }

    #[test]
    fn dual_stack_pods_and_services_keep_their_second_family() {
        let p = pod(
            json!({"metadata": {"name": "a", "uid": "u1"}, "status": {"podIP": "10.0.1.5", "podIPs": [{"ip": "10.0.1.5"}, {"ip": "fd00:1::5"}]}}),
        );
        assert_eq!(p.secondary_ip, Some("fd00:1::5".parse().expect("ip")));
        let single = pod(
            json!({"metadata": {"name": "b", "uid": "u2"}, "status": {"podIP": "fd00:1::6", "podIPs": [{"ip": "fd00:1::6"}]}}),
        );
        assert_eq!(single.secondary_ip, None);
        let svc: Service = serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"}, "spec": {"clusterIP": "fd96::10", "clusterIPs": ["fd96::10", "10.96.0.10"], "ports": [{"port": 80}]}})).expect("svc");
        let s = ServiceInfo::from_service(&svc).expect("kept");
        assert_eq!(s.ip, Some("fd96::10".parse().expect("ip")));
        assert_eq!(s.secondary_ip, Some("10.96.0.10".parse().expect("ip")));
    }
}
