//! The simulated cluster: fabric, nodes and pods as network namespaces, veth and cgroups,
//! built and torn down.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::*;

/// A pod to create.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Name, unique in the cluster.
    pub name: String,
    /// Whether the node file lists it (captured by the mesh).
    pub enrolled: bool,
}

impl PodSpec {
    /// An enrolled pod.
    pub fn mesh(name: &str) -> Self {
        Self {
            name: name.into(),
            enrolled: true,
        }
    }
    /// A pod outside the mesh.
    pub fn bare(name: &str) -> Self {
        Self {
            name: name.into(),
            enrolled: false,
        }
    }
}

/// A service: address 198.19.1.(index+10), balanced over the named pods.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    /// Name.
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Port on the endpoints.
    pub target_port: u16,
    /// Endpoint pod names.
    pub endpoints: Vec<String>,
    /// `appProtocol` of its port (`tcp`: no protocol detection, always L4).
    pub app_protocol: Option<String>,
    /// `allowedUpgrades` (the agent's default, `[websocket]`, when `None`).
    pub allowed_upgrades: Option<Vec<String>>,
}

impl ServiceSpec {
    /// A service on `port`, forwarding to `target_port` on the named pods.
    pub fn new(name: &str, port: u16, target_port: u16, endpoints: &[&str]) -> Self {
        Self {
            name: name.into(),
            port,
            target_port,
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            app_protocol: None,
            allowed_upgrades: None,
        }
    }

    /// Declares the HTTP upgrade tokens forwarded to it.
    pub fn allowed_upgrades(mut self, tokens: &[&str]) -> Self {
        self.allowed_upgrades = Some(tokens.iter().map(ToString::to_string).collect());
        self
    }

    /// Declares the port's `appProtocol`.
    pub fn app_protocol(mut self, p: &str) -> Self {
        self.app_protocol = Some(p.into());
        self
    }
}

/// A created pod.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Name.
    pub name: String,
    /// Index of its node.
    pub node: usize,
    /// Address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address: every pod with an interface is dual-stack, IPv4 first, as in a
    /// dual-stack Kubernetes cluster. `fd18:<node>::<n>`, where the IPv4 one is
    /// `198.18.<node>.<n>`.
    pub ip6: Option<Ipv6Addr>,
    /// Netns file.
    pub netns: PathBuf,
    /// cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Whether the node file lists it.
    pub enrolled: bool,
    /// Its service account (its identity, with the namespace `default`).
    pub service_account: String,
    /// Its UID in Kubernetes mode (names its kubelet cgroup).
    pub uid: String,
    /// Its veth's name on its node's bridge (none for loopback-only pods).
    pub veth: Option<String>,
}

/// A created node.
#[derive(Debug)]
pub struct Node {
    /// Name (`node-1`, ...).
    pub name: String,
    /// Netns file.
    pub netns: PathBuf,
    /// Its node file.
    pub node_file: PathBuf,
    /// bpffs pin directory name.
    pub pin_name: String,
    /// Agent log file.
    pub log: PathBuf,
    pub(crate) agent: Option<Child>,
    /// Agents replaced by a successor (an upgrade), draining, oldest first.
    pub(crate) retiring: Vec<Child>,
}

/// A simulated cluster; torn down on drop.
#[derive(Debug)]
pub struct Cluster {
    pub(crate) prefix: String,
    pub(crate) dir: PathBuf,
    pub(crate) cgroup_dir: PathBuf,
    /// Nodes, in order.
    pub nodes: Vec<Node>,
    /// Every pod.
    pub pods: Vec<Pod>,
    /// Services, in order.
    pub services: Vec<ServiceSpec>,
    pub(crate) procs: Mutex<Vec<Child>>,
    pub(crate) netns_names: Vec<String>,
    pub(crate) fabric: PathBuf,
    pub(crate) ca: Option<Child>,
    /// Kubernetes mode, once [`Cluster::kubernetes`] switched to it.
    pub(crate) kube: Option<crate::kube::KubeMode>,
}

/// Connects pod netns `pns` to node netns `ns` through veth `veth` (its peer is the pod's
/// `eth0`, at `addr`, routed through node `i`'s bridge).
pub(crate) fn wire_pod(
    ns: &str,
    veth: &str,
    pns: &str,
    (addr, addr6): (Ipv4Addr, Ipv6Addr),
    i: usize,
) -> Result<()> {
    ip(&[
        "-n", ns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pns,
    ])?;
    ip(&["-n", ns, "link", "set", veth, "master", "br0", "up"])?;
    ip(&[
        "-n",
        pns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ])?;
    // No duplicate address detection: the address is usable at once.
    ip(&[
        "-n",
        pns,
        "addr",
        "add",
        &format!("{addr6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ip(&["-n", pns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n",
        pns,
        "route",
        "add",
        "default",
        "via",
        &format!("198.18.{}.1", i + 1),
    ])?;
    ip(&[
        "-n",
        pns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd18:{}::1", i + 1),
    ])?;
    Ok(())
}

/// The IPv6 address of the pod whose IPv4 address is `v4` (`198.18.<node>.<n>` →
/// `fd18:<node>::<n>`).
pub fn pod_ip6(v4: Ipv4Addr) -> Ipv6Addr {
    let [_, _, node, n] = v4.octets();
    Ipv6Addr::new(0xfd18, u16::from(node), 0, 0, 0, 0, 0, u16::from(n))
}

/// A pod UID unique to the cluster and the pod.
fn pod_uid(prefix: &str, index: usize) -> String {
    let h = prefix
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("{h:08x}-0000-4000-8000-{index:012x}")
}

/// Where the harness's CA listens (inside the fabric netns, on its bridge).
pub const CA_ADDR: &str = "198.19.0.254:15012";

pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);
pub(crate) const PREFIX: &str = "mt";

impl Cluster {
    /// Two nodes, a mesh pod `client` on node-1 and a mesh pod `server` on node-2 serving HTTP
    /// on `port`, with `services`; node-1's agent gets `client_flags`. Both agents are ready.
    pub fn client_server(
        services: Vec<ServiceSpec>,
        port: u16,
        client_flags: &[&str],
    ) -> Result<Self> {
        let mut c = Self::new(
            vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
            services,
        )?;
        c.serve("server", port)?;
        c.start_agent_with(0, client_flags)?;
        c.wait_ready(0, Duration::from_secs(15))?;
        c.start_agent(1)?;
        Ok(c)
    }

    /// Builds the topology: `nodes[i]` lists node i's pods.
    pub fn new(nodes: Vec<Vec<PodSpec>>, services: Vec<ServiceSpec>) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the harness needs root (network namespaces, cgroups, eBPF): run as root, e.g. `sudo cargo xtask test`"
            );
        }
        ensure_bpffs()?;
        sweep_stale();
        let prefix = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("mesh-{prefix}"));
        std::fs::create_dir_all(&dir)?;
        let cgroup_dir = cgroup2_root()?.join("mesh-tests").join(&prefix);
        std::fs::create_dir_all(&cgroup_dir)
            .with_context(|| format!("create {}", cgroup_dir.display()))?;
        let mut c = Self {
            prefix,
            dir,
            cgroup_dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            services,
            procs: Mutex::new(Vec::new()),
            netns_names: Vec::new(),
            fabric: PathBuf::new(),
            ca: None,
            kube: None,
        };
        // If building fails half-way, `c` is dropped and tears down what exists.
        c.build(&nodes)?;
        for i in 0..c.nodes.len() {
            c.write_node_file(i)?;
        }
        Ok(c)
    }

    pub(crate) fn add_netns(&mut self, name: &str) -> Result<PathBuf> {
        ip(&["netns", "add", name])?;
        self.netns_names.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(PathBuf::from("/var/run/netns").join(name))
    }

    pub(crate) fn build(&mut self, nodes: &[Vec<PodSpec>]) -> Result<()> {
        let fabric = format!("{}-fab", self.prefix);
        self.fabric = self.add_netns(&fabric)?;
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            "198.19.0.254/24",
            "dev",
            "br0",
        ])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            "fd19::fe/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        for (i, pods) in nodes.iter().enumerate() {
            let name = format!("node-{}", i + 1);
            let ns = format!("{}-n{}", self.prefix, i + 1);
            let netns = self.add_netns(&ns)?;
            let up = format!("up{i}");
            ip(&[
                "-n", &fabric, "link", "add", &up, "type", "veth", "peer", "name", "uplink",
                "netns", &ns,
            ])?;
            ip(&["-n", &fabric, "link", "set", &up, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.19.0.{}/24", i + 1),
                "dev",
                "uplink",
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("fd19::{}/64", i + 1),
                "dev",
                "uplink",
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", "uplink", "up"])?;
            ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("198.18.{}.1/24", i + 1),
                "dev",
                "br0",
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("fd18:{}::1/64", i + 1),
                "dev",
                "br0",
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", "br0", "up"])?;
            for forward in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
                run(Command::new("ip").args(["netns", "exec", &ns, "sysctl", "-qw", forward]))?;
            }
            for k in 0..nodes.len() {
                if k != i {
                    ip(&[
                        "-n",
                        &ns,
                        "route",
                        "add",
                        &format!("198.18.{}.0/24", k + 1),
                        "via",
                        &format!("198.19.0.{}", k + 1),
                    ])?;
                    ip(&[
                        "-n",
                        &ns,
                        "-6",
                        "route",
                        "add",
                        &format!("fd18:{}::/64", k + 1),
                        "via",
                        &format!("fd19::{}", k + 1),
                    ])?;
                }
            }
            for (j, spec) in pods.iter().enumerate() {
                let pns = format!("{}-{}", self.prefix, spec.name);
                let pnetns = self.add_netns(&pns)?;
                let addr = Ipv4Addr::new(198, 18, (i + 1) as u8, (j + 10) as u8);
                let veth = format!("p{j}");
                wire_pod(&ns, &veth, &pns, (addr, pod_ip6(addr)), i)?;
                let cgroup = self.cgroup_dir.join(&spec.name);
                std::fs::create_dir_all(&cgroup)?;
                self.pods.push(Pod {
                    name: spec.name.clone(),
                    node: i,
                    ip: addr,
                    ip6: Some(pod_ip6(addr)),
                    netns: pnetns,
                    cgroup,
                    enrolled: spec.enrolled,
                    service_account: format!("{}-sa", spec.name),
                    uid: pod_uid(&self.prefix, self.pods.len()),
                    veth: Some(veth),
                });
            }
            self.nodes.push(Node {
                node_file: self.dir.join(format!("{name}.yaml")),
                log: self.dir.join(format!("{name}-agent.log")),
                pin_name: format!("{}-n{}", self.prefix, i + 1),
                name,
                netns,
                agent: None,
                retiring: Vec::new(),
            });
        }
        Ok(())
    }

    /// Adds `n` pods named `<stem>-<k>` to node `i` with only a loopback interface and the
    /// service account `sa`: clients of services on their own node (the proxy hands such
    /// connections over inside the kernel), cheap enough to make hundreds. Their addresses are
    /// 10.77.0.0/16, used only as names in the node file. The node file is not rewritten: call
    /// [`Cluster::write_node_file`].
    pub fn add_loopback_pods(
        &mut self,
        i: usize,
        stem: &str,
        n: usize,
        sa: &str,
    ) -> Result<Vec<String>> {
        let mut names = Vec::with_capacity(n);
        for k in 0..n {
            let name = format!("{stem}-{k}");
            let pnetns = self.add_netns(&format!("{}-{name}", self.prefix))?;
            let cgroup = self.cgroup_dir.join(&name);
            std::fs::create_dir_all(&cgroup)?;
            let ip = Ipv4Addr::new(10, 77, (k / 250) as u8, (k % 250 + 1) as u8);
            self.pods.push(Pod {
                name: name.clone(),
                node: i,
                ip,
                ip6: None,
                netns: pnetns,
                cgroup,
                enrolled: true,
                service_account: sa.into(),
                uid: pod_uid(&self.prefix, self.pods.len()),
                veth: None,
            });
            names.push(name);
        }
        Ok(names)
    }

    /// Takes the pods `names` out of the mesh (they stay out of the node files from now on).
    pub fn unenroll(&mut self, names: &[String]) {
        for p in &mut self.pods {
            if names.contains(&p.name) {
                p.enrolled = false;
            }
        }
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the cluster"))
    }

    /// The address of service `name`.
    pub fn service_ip(&self, name: &str) -> Ipv4Addr {
        let i = self
            .services
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"));
        Ipv4Addr::new(198, 19, 1, (i + 10) as u8)
    }

    /// The IPv6 address of service `name`: `fd96::<n>`, where the IPv4 one is `198.19.1.<n>`.
    pub fn service_ip6(&self, name: &str) -> Ipv6Addr {
        let [.., n] = self.service_ip(name).octets();
        Ipv6Addr::new(0xfd96, 0, 0, 0, 0, 0, 0, u16::from(n))
    }

    /// Requests the application in `pod` has answered so far (its own counter, read over the
    /// pod's loopback, which is never steered).
    pub fn app_requests(&self, pod: &str, port: u16) -> Result<u64> {
        let p = self.pod(pod);
        let (code, body) = in_netns(&p.netns, || {
            http_get(([127, 0, 0, 1], port).into(), "/count")
        })??;
        if code != 200 {
            bail!("/count answered {code}");
        }
        body.trim().parse::<u64>().context("count")
    }

    /// The cluster's scratch directory (node files, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network namespace joining the nodes, where the CA and the API server listen.
    pub fn fabric(&self) -> &Path {
        &self.fabric
    }

    pub(crate) fn teardown(&mut self) {
        for c in self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter_mut()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
        }
        self.stop_ca();
        self.print_log_tails();
        if let Ok(agent) = artifact("mesh-agent") {
            for n in &self.nodes {
                let _ = Command::new(&agent)
                    .args(["uninstall", "--pin-name", &n.pin_name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for n in self.netns_names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        remove_cgroup_tree(&self.cgroup_dir);
        if std::env::var_os("MESH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Cluster {
    /// Prints the end of every agent's log into the test's captured output, which libtest
    /// shows only when the test fails. In the guest the logs die with the VM, so this is the
    /// only record of what the agents saw. `MESH_TEST_LOG_TAIL` sets the line count (0: none).
    fn print_log_tails(&self) {
        let lines = std::env::var("MESH_TEST_LOG_TAIL")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(60);
        if lines == 0 {
            return;
        }
        for n in &self.nodes {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            let all: Vec<&str> = log.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            println!("--- {} agent log, last {} lines ---", n.name, tail.len());
            for l in tail {
                println!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

pub(crate) fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // A killed process can take a moment to leave its cgroup.
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes namespaces, cgroups and pins left by harness processes that no longer exist (e.g. a
/// test binary killed with SIGKILL, where no destructor ran).
pub(crate) fn sweep_stale() {
    let dead = |name: &str| -> bool {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return false;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            return false;
        };
        pid.parse::<u32>()
            .map(|p| !Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(false)
    };
    if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
    if let Ok(agent) = artifact("mesh-agent")
        && let Ok(entries) = std::fs::read_dir("/sys/fs/bpf")
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                let _ = Command::new(&agent)
                    .args(["uninstall", "--pin-name", &name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(root.join("mesh-tests"))
    {
        for e in entries.flatten() {
            if dead(&e.file_name().to_string_lossy()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}
