//! Kubernetes mode for the harness: the stand-in API server in the fabric namespace (where every
//! node reaches it, as a real cluster's API is reachable from every node), each pod's cgroup laid
//! out as the kubelet and containerd leave it with a sandbox process inside the pod's netns, and
//! the Pod, Service and EndpointSlice objects that describe the cluster, created with kubectl.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{
    apiserver::{ApiServer, Kubectl},
    *,
};

/// Where the stand-in API server listens (in the fabric namespace, beside the CA).
pub const API_ADDR: &str = "198.19.0.254:6443";

/// A mesh-wide STRICT PeerAuthentication as Istio users write it: in the root namespace, with no
/// selector (and the namespace it needs).
pub const MESH_WIDE_STRICT: &str = "apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
";

/// The Kubernetes side of a cluster.
#[derive(Debug)]
pub struct KubeMode {
    /// The stand-in API server.
    pub api: ApiServer,
    /// kubectl against it.
    pub kubectl: Kubectl,
    /// Holds each node's cgroup root for the kubelet, in a directory named after the node.
    pub kubelet_root: PathBuf,
    /// The CA directory every agent embeds (one root for the mesh).
    pub ca_dir: PathBuf,
}

/// The cgroup of pod `k`'s sandbox (container `sandbox`) under node `node`'s kubelet root, as
/// the kubelet and containerd make it. Nodes alternate the kubelet's cgroup drivers (systemd on
/// even nodes, cgroupfs on odd ones) and pods the three QoS classes, so the tests cover every
/// layout the agent looks in.
fn sandbox_cgroup(root: &Path, node: usize, k: usize, uid: &str, sandbox: &str) -> PathBuf {
    let qos = ["besteffort", "burstable", "guaranteed"][k % 3];
    if node.is_multiple_of(2) {
        let mut p = root.join("kubepods.slice");
        let pod = if qos == "guaranteed" {
            format!("kubepods-pod{}.slice", uid.replace('-', "_"))
        } else {
            p = p.join(format!("kubepods-{qos}.slice"));
            format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_"))
        };
        p.join(pod).join(format!("cri-containerd-{sandbox}.scope"))
    } else {
        let mut p = root.join("kubepods");
        if qos != "guaranteed" {
            p = p.join(qos);
        }
        p.join(format!("pod{uid}")).join(sandbox)
    }
}

impl Cluster {
    /// Switches the cluster to Kubernetes mode: starts the API server, moves every pod into
    /// the kubelet's cgroup layout with a sandbox process (`sleep`) in its netns, and creates
    /// the nodes, the `default` namespace (not enrolled), pods, services and endpoint slices
    /// with kubectl. Agents started from now on discover it all from the API.
    pub fn kubernetes(&mut self) -> Result<()> {
        let fabric = self.fabric.clone();
        let api = ApiServer::start(&self.dir.join("apiserver"), move || {
            in_netns(&fabric, || std::net::TcpListener::bind(API_ADDR))?
                .with_context(|| format!("bind the API server to {API_ADDR}"))
        })?;
        let kubectl = Kubectl::new(&api, Some(self.fabric.clone()));
        let kubelet_root = self.cgroup_dir.join("kubelet");
        let ca_dir = self.dir.join("kube-ca");
        // One root for every agent's embedded CA, made before any agent starts.
        mesh_agent::identity::ca::Ca::open(
            &ca_dir,
            "cluster.local",
            std::time::Duration::from_secs(3600),
        )
        .context("create the mesh's CA root")?;
        for k in 0..self.pods.len() {
            let node = self.pods[k].node;
            let scope = sandbox_cgroup(
                &kubelet_root.join(&self.nodes[node].name),
                node,
                k,
                &self.pods[k].uid,
                &format!("sandbox{k}"),
            );
            std::fs::create_dir_all(&scope)
                .with_context(|| format!("create {}", scope.display()))?;
            self.pods[k].cgroup = scope;
            let name = self.pods[k].name.clone();
            // The sandbox: a process in the pod's netns and cgroup, as pause is.
            self.spawn(&name, &["sleep", "infinity"])?;
        }
        self.kube = Some(KubeMode {
            api,
            kubectl,
            kubelet_root,
            ca_dir,
        });
        let mut objects =
            vec![json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})];
        objects.extend(self.nodes.iter().map(|n| {
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": {"kubernetes.io/os": "linux"}}})
        }));
        objects.extend(self.pods.iter().map(|p| self.pod_object(p)));
        for s in &self.services {
            objects.extend(self.service_objects(s));
        }
        self.kubectl()?
            .create(&json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string())?;
        Ok(())
    }

    /// The Kubernetes side; fails unless [`Cluster::kubernetes`] ran.
    pub fn kube(&self) -> Result<&KubeMode> {
        self.kube
            .as_ref()
            .context("the cluster is not in Kubernetes mode: call kubernetes() first")
    }

    /// The API server, to take it away and back, compact it or cut its watches.
    pub fn api_mut(&mut self) -> Result<&mut ApiServer> {
        Ok(&mut self
            .kube
            .as_mut()
            .context("the cluster is not in Kubernetes mode: call kubernetes() first")?
            .api)
    }

    /// kubectl against the cluster's API server.
    pub fn kubectl(&self) -> Result<&Kubectl> {
        Ok(&self.kube()?.kubectl)
    }

    /// A pod as the API server holds it once scheduled and running.
    pub fn pod_object(&self, p: &Pod) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": p.name, "namespace": "default", "uid": p.uid, "labels": {"app": p.name}},
            "spec": {
                "nodeName": self.nodes[p.node].name,
                "serviceAccountName": p.service_account,
                "containers": [{"name": "app", "image": "mesh-testapp"}],
            },
            "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}]},
        })
    }

    /// A service and its one EndpointSlice.
    pub fn service_objects(&self, s: &ServiceSpec) -> [Value; 2] {
        let mut port = json!({"name": "main", "port": s.port, "targetPort": s.target_port});
        if let Some(a) = &s.app_protocol {
            port["appProtocol"] = json!(a);
        }
        let endpoints: Vec<Value> = s
            .endpoints
            .iter()
            .map(|e| json!({"addresses": [self.pod(e).ip.to_string()], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": e, "namespace": "default"}}))
            .collect();
        [
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": s.name, "namespace": "default"},
                "spec": {"clusterIP": self.service_ip(&s.name).to_string(), "ports": [port], "selector": {"app": s.name}},
            }),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": format!("{}-1", s.name), "namespace": "default", "labels": {"kubernetes.io/service-name": s.name}},
                "addressType": "IPv4",
                "ports": [{"name": "main", "port": s.target_port, "protocol": "TCP"}],
                "endpoints": endpoints,
            }),
        ]
    }

    /// Deletes pod `name` and creates it again under the same name, as a controller or a
    /// kubelet restart does: a new UID, a new netns (same address), a new cgroup and sandbox,
    /// and the Pod object deleted and created again with kubectl.
    pub fn recreate_pod(&mut self, name: &str) -> Result<()> {
        let k = self.pod_index(name)?;
        self.kubectl()?.run(&["delete", "pod", name], None)?;
        let generation = self.pods.len() + 1000 * (k + 1);
        let old = &self.pods[k].uid;
        let uid = format!("{}{:04x}", &old[..old.len() - 4], generation % 0xffff);
        self.new_sandbox(k, uid, &format!("r{generation}"))?;
        let object = self.pod_object(&self.pods[k]);
        self.kubectl()?.create(&object.to_string())?;
        Ok(())
    }

    /// Recreates pod `name`'s sandbox and nothing else, as the kubelet does after the sandbox
    /// died: the old sandbox's processes are killed (its netns goes with them) and its cgroup
    /// removed, and a new sandbox starts in a new netns under the same pod cgroup, with the
    /// same UID and address. The Pod object is not touched.
    pub fn recreate_sandbox(&mut self, name: &str) -> Result<()> {
        let k = self.pod_index(name)?;
        let cgroup = self.pods[k].cgroup.clone();
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"))?;
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::remove_dir(&cgroup).is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the old sandbox of {name} would not go"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let generation = self.pods.len() + 1000 * (k + 1) + 500;
        let uid = self.pods[k].uid.clone();
        self.new_sandbox(k, uid, &format!("s{generation}"))
    }

    fn pod_index(&self, name: &str) -> Result<usize> {
        self.pods
            .iter()
            .position(|p| p.name == name)
            .context("no such pod")
    }

    /// Takes pod `k`'s old sandbox off the network (deleting its veth does it at once) and
    /// starts a new one for `uid`: a new netns named with `tag`, wired to the same address,
    /// and a sandbox process in a new container cgroup.
    fn new_sandbox(&mut self, k: usize, uid: String, tag: &str) -> Result<()> {
        let p = self.pods[k].clone();
        let veth = p
            .veth
            .clone()
            .context("a loopback-only pod has no sandbox of its own")?;
        let node_ns = self.nodes[p.node]
            .netns
            .file_name()
            .and_then(|n| n.to_str())
            .context("node netns name")?
            .to_string();
        crate::sys::ip(&["-n", &node_ns, "link", "del", &veth])?;
        let pns = format!("{}-{}-{tag}", self.prefix, p.name);
        let netns = self.add_netns(&pns)?;
        crate::topology::wire_pod(&node_ns, &veth, &pns, p.ip, p.node)?;
        let root = self.kube()?.kubelet_root.join(&self.nodes[p.node].name);
        let scope = sandbox_cgroup(&root, p.node, k, &uid, &format!("sandbox-{tag}"));
        std::fs::create_dir_all(&scope)?;
        let pod = &mut self.pods[k];
        pod.netns = netns;
        pod.uid = uid;
        pod.cgroup = scope;
        self.spawn(&p.name, &["sleep", "infinity"])?;
        Ok(())
    }

    /// The flags that make node `i`'s agent discover from the API server.
    pub(crate) fn kube_agent_args(&self, i: usize) -> Result<Vec<std::ffi::OsString>> {
        let k = self.kube()?;
        Ok(vec![
            "--kubernetes".into(),
            "true".into(),
            "--node-name".into(),
            self.nodes[i].name.clone().into(),
            "--kubeconfig".into(),
            k.api.kubeconfig().into(),
            "--kubelet-cgroup-root".into(),
            k.kubelet_root.join(&self.nodes[i].name).into(),
            "--ca-dir".into(),
            k.ca_dir.clone().into(),
        ])
    }
}
