//! Kubernetes mode for the harness: the stand-in API server in the fabric namespace (where every
//! node reaches it, as a real cluster's API is reachable from every node), each pod's cgroup laid
//! out as the kubelet and containerd leave it with a sandbox process inside the pod's netns, and
//! the Pod, Service and EndpointSlice objects that describe the cluster, created with kubectl.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    apiserver::{ApiServer, Kubectl, TokenInfo},
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
}

/// The namespace the mesh is installed in.
pub const MESH_NAMESPACE: &str = "mesh-system";
/// The agents' service account.
pub const AGENT_SERVICE_ACCOUNT: &str = "mesh-agent";
/// The audience of the agents' projected tokens.
pub const CA_AUDIENCE: &str = "mesh-ca";

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
        let pod_ips: Vec<Value> = std::iter::once(p.ip.to_string())
            .chain(p.ip6.map(|a| a.to_string()))
            .map(|a| json!({"ip": a}))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": p.name, "namespace": "default", "uid": p.uid, "labels": {"app": p.name}},
            "spec": {
                "nodeName": self.nodes[p.node].name,
                "serviceAccountName": p.service_account,
                "containers": [{"name": "app", "image": "mesh-testapp"}],
            },
            "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": pod_ips},
        })
    }

    /// A dual-stack service (IPv4 first) and its EndpointSlice of each family.
    pub fn service_objects(&self, s: &ServiceSpec) -> [Value; 3] {
        let mut port = json!({"name": "main", "port": s.port, "targetPort": s.target_port});
        if let Some(a) = &s.app_protocol {
            port["appProtocol"] = json!(a);
        }
        let endpoint = |e: &String, a: String| json!({"addresses": [a], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": e, "namespace": "default"}});
        let endpoints: Vec<Value> = s
            .endpoints
            .iter()
            .map(|e| endpoint(e, self.pod(e).ip.to_string()))
            .collect();
        let endpoints6: Vec<Value> = s
            .endpoints
            .iter()
            .filter_map(|e| Some(endpoint(e, self.pod(e).ip6?.to_string())))
            .collect();
        let (v4, v6) = (
            self.service_ip(&s.name).to_string(),
            self.service_ip6(&s.name).to_string(),
        );
        [
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": s.name, "namespace": "default"},
                "spec": {"clusterIP": v4, "clusterIPs": [v4, v6], "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack", "ports": [port], "selector": {"app": s.name}},
            }),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": format!("{}-1", s.name), "namespace": "default", "labels": {"kubernetes.io/service-name": s.name}},
                "addressType": "IPv4",
                "ports": [{"name": "main", "port": s.target_port, "protocol": "TCP"}],
                "endpoints": endpoints,
            }),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": format!("{}-2", s.name), "namespace": "default", "labels": {"kubernetes.io/service-name": s.name}},
                "addressType": "IPv6",
                "ports": [{"name": "main", "port": s.target_port, "protocol": "TCP"}],
                "endpoints": endpoints6,
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
        let ip6 = p.ip6.context("a wired pod has an IPv6 address")?;
        crate::topology::wire_pod(&node_ns, &veth, &pns, (p.ip, ip6), p.node)?;
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
            "--ca-addr".into(),
            CA_ADDR.into(),
            "--ca-token-file".into(),
            self.agent_token_file(i).into(),
            "--ca-bundle".into(),
            self.kube_bundle_file().into(),
            "--pod-name".into(),
            format!("mesh-agent-{}", self.nodes[i].name).into(),
            "--pod-namespace".into(),
            MESH_NAMESPACE.into(),
        ])
    }

    /// Node `i`'s agent's projected service-account token, as the kubelet mounts it.
    pub fn agent_token_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.kube-token", self.nodes[i].name))
    }

    /// The CA's bundle ConfigMap as the kubelet mounts it into the agents.
    pub fn kube_bundle_file(&self) -> PathBuf {
        self.dir.join("kube-bundle.pem")
    }

    /// Starts the CA as its Deployment runs it (`mesh-agent ca --kubernetes`: root in a Secret,
    /// bundle in a ConfigMap, agents checked with TokenReview) and gives each node's agent a pod
    /// in the mesh namespace and a projected token bound to it. Node 0's token carries the
    /// node-name extra (API servers from 1.32 add it); the others are bound to their pod only,
    /// so the CA looks the node up through the pod. Waits for the bundle ConfigMap and mounts
    /// it. Restarting keeps the root (it lives in the Secret).
    pub fn start_kube_ca(&mut self, ttl: &str) -> Result<()> {
        self.stop_ca();
        for o in [
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MESH_NAMESPACE}}),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "mesh-agent", "namespace": MESH_NAMESPACE},
                "spec": {"selector": {"matchLabels": {"app": "mesh-agent"}}, "template": {"metadata": {"labels": {"app": "mesh-agent"}}, "spec": {"containers": [{"name": "agent", "image": "mesh-agent"}]}}}}),
        ] {
            self.create_once(o)?;
        }
        let ds_uid = self
            .kube()?
            .api
            .get("apps/v1", "DaemonSet", MESH_NAMESPACE, "mesh-agent")?["metadata"]["uid"]
            .clone();
        let owner = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "mesh-agent", "uid": ds_uid, "controller": true}]);
        let objects: Vec<Value> = self.nodes.iter().map(|n| json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("mesh-agent-{}", n.name), "namespace": MESH_NAMESPACE, "labels": {"app": "mesh-agent"}, "ownerReferences": owner},
                "spec": {"nodeName": n.name, "serviceAccountName": AGENT_SERVICE_ACCOUNT, "containers": [{"name": "agent", "image": "mesh-agent"}]},
                "status": {"phase": "Running"},
            }))
            .collect();
        for o in objects {
            self.create_once(o)?;
        }
        for i in 0..self.nodes.len() {
            let name = self.nodes[i].name.clone();
            let pod = format!("mesh-agent-{name}");
            let uid = self.kube()?.api.get("v1", "Pod", MESH_NAMESPACE, &pod)?["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut extra = json!({
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [uid],
            });
            if i == 0 {
                extra["authentication.kubernetes.io/node-name"] = json!([name]);
            }
            let token = format!("projected-{}-{name}", self.prefix);
            self.kube()?.api.add_token(
                &token,
                TokenInfo {
                    user: json!({"username": format!("system:serviceaccount:{MESH_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}"), "extra": extra}),
                    audiences: vec![CA_AUDIENCE.into()],
                    expires: None,
                },
            );
            std::fs::write(self.agent_token_file(i), &token)?;
        }
        let child = spawn_logged(
            Command::new("nsenter")
                .arg(format!("--net={}", self.fabric.display()))
                .arg(artifact("mesh-agent")?)
                .args(["ca", "--kubernetes", "--listen", CA_ADDR, "--cert-ttl", ttl])
                .arg("--kubeconfig")
                .arg(self.kube()?.api.kubeconfig()),
            &self.dir.join("ca.log"),
            "CA",
        )?;
        self.ca = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.sync_kube_bundle().is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.ca.as_mut().map(std::process::Child::try_wait) {
                bail!("CA exited ({st}):\n{}", self.ca_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "no bundle ConfigMap from the CA after 10 s:\n{}",
                    self.ca_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates `obj` unless it exists already (the CA is started again with the same objects).
    fn create_once(&self, obj: Value) -> Result<()> {
        match self.kube()?.api.create(obj) {
            Err(e) if !e.to_string().contains("already exists") => Err(e),
            _ => Ok(()),
        }
    }

    /// Copies the bundle ConfigMap into the agents' mounted file, as the kubelet does for a
    /// ConfigMap volume; returns the bundle.
    pub fn sync_kube_bundle(&self) -> Result<String> {
        let map = self
            .kube()?
            .api
            .get("v1", "ConfigMap", MESH_NAMESPACE, "mesh-trust-bundle")?;
        let pem = map["data"]["bundle.pem"]
            .as_str()
            .context("the bundle ConfigMap has no bundle.pem")?
            .to_string();
        let file = self.kube_bundle_file();
        if std::fs::read_to_string(&file).ok().as_deref() != Some(pem.as_str()) {
            let tmp = file.with_extension("tmp");
            std::fs::write(&tmp, &pem)?;
            std::fs::rename(&tmp, &file)?;
        }
        Ok(pem)
    }
}

/// Pods `default/<name>` node `i`'s agent has enrolled.
pub fn enrolled(c: &Cluster, i: usize) -> Result<Vec<String>> {
    let s = c.stats(i)?;
    Ok(s["pods"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default())
}

/// Waits until node `i`'s agent has enrolled exactly `want` (names in `default`).
pub fn wait_enrolled(c: &Cluster, i: usize, want: &[&str]) -> Result<()> {
    crate::wait_until(
        &format!("node {i} to enroll exactly {want:?}"),
        Duration::from_secs(10),
        || {
            let have = enrolled(c, i)?;
            Ok(have.len() == want.len()
                && want
                    .iter()
                    .all(|w| have.iter().any(|h| h == &format!("default/{w}"))))
        },
    )
    .with_context(|| {
        format!(
            "enrolled now: {:?}; agent log:\n{}",
            enrolled(c, i),
            c.agent_log(i)
        )
    })
}

/// A cluster in Kubernetes mode with `default` enrolled, `server` serving on 8080 if there is
/// one, the CA Deployment signing certificates of lifetime `ca_ttl`, and every agent running
/// with its pods enrolled.
pub fn enrolled_cluster_with(
    nodes: Vec<Vec<crate::PodSpec>>,
    services: Vec<crate::ServiceSpec>,
    ca_ttl: &str,
) -> Result<Cluster> {
    let mut c = Cluster::new(nodes, services)?;
    c.kubernetes()?;
    c.kubectl()?.run(
        &["label", "namespace", "default", "mesh.dev/enabled=true"],
        None,
    )?;
    if c.pods.iter().any(|p| p.name == "server") {
        c.serve("server", 8080)?;
    }
    c.start_kube_ca(ca_ttl)?;
    for i in 0..c.nodes.len() {
        c.start_agent(i)?;
    }
    for i in 0..c.nodes.len() {
        let mesh: Vec<String> = c
            .pods
            .iter()
            .filter(|p| p.node == i && p.enrolled)
            .map(|p| p.name.clone())
            .collect();
        let mesh: Vec<&str> = mesh.iter().map(String::as_str).collect();
        wait_enrolled(&c, i, &mesh)?;
        // Ready again once the enrolled pods' certificates are in, so a test's first request
        // does not race the CA (on a loaded machine it did).
        c.wait_ready(i, Duration::from_secs(30))?;
    }
    Ok(c)
}

/// [`enrolled_cluster_with`] and 1 h certificates.
pub fn enrolled_cluster(
    nodes: Vec<Vec<crate::PodSpec>>,
    services: Vec<crate::ServiceSpec>,
) -> Result<Cluster> {
    enrolled_cluster_with(nodes, services, "1h")
}
