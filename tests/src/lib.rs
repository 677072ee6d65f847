//! Test harness: a cluster of simulated nodes and pods on one machine, running the real agent.
//!
//! Topology (all addresses live only inside namespaces this harness creates):
//! - a fabric netns with a bridge joins the nodes' uplinks on 198.19.0.0/24 (node i is
//!   198.19.0.(i+1));
//! - node i is a netns with a bridge `br0` at 198.18.(i+1).1/24 and routes to the other nodes'
//!   pod ranges via their uplinks; its agent runs in this netns;
//! - pod j of node i is a netns with `eth0` at 198.18.(i+1).(j+10) plus a cgroup v2 directory;
//! - service addresses are 198.19.1.x and exist only in the agents' routing;
//! - the mesh CA (`mesh-agent ca`) runs in the fabric netns at 198.19.0.254:15012, and each node
//!   has a bearer token for it.
//!
//! RFC 2544's benchmarking range (198.18.0.0/15) is used so no address can be mistaken for a real
//! network. Every resource name starts with a per-cluster prefix (`mt<pid>x<n>`), teardown runs on
//! drop (so also when a test panics), and a new cluster first removes leftovers of harness
//! processes that no longer exist.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Byte `i` of the pattern `GET /bytes/N` serves; tests recompute it to check integrity.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(i >> 13) % 251) as u8
}

/// The directory holding `mesh-agent`, `mesh-ebpf.o` and `mesh-testapp` for this build profile.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a built artifact, with an error that says how to build it.
pub fn artifact(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build everything first with `cargo xtask build` (or run `cargo xtask test`)",
            p.display()
        )
    }
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("cgroup2"))
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .context("no cgroup2 mount found in /proc/self/mountinfo")
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf "));
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Runs `f` on a thread inside the netns at `path` (the caller's own namespace is untouched).
pub fn in_netns<R: Send>(path: &Path, f: impl FnOnce() -> R + Send) -> Result<R> {
    let ns = File::open(path).with_context(|| format!("open netns {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open netns fd; setns affects only this scoped thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "setns {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

/// A minimal HTTP/1.0 GET, returning (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

/// Fields of `/proc/<pid>/stat` after the parenthesised command name (which may hold spaces):
/// index 0 is field 3, `state`.
fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU time (user + system, all threads) process `pid` has used so far; `None` once it is gone.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let f = proc_stat(pid)?;
    // utime and stime are fields 14 and 15.
    let ticks = f.get(11)? + f.get(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    Some(Duration::from_micros(ticks * 1_000_000 / hz.max(1)))
}

/// Resident memory of process `pid` in bytes (`VmRSS`); `None` once it is gone.
pub fn proc_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Raises this process's soft open-file limit to its hard one, as far as it may (children
/// inherit it), and returns the limit it has then.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
    fd_limit()
}

/// The open-file limit this process and its children have.
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// Nanoseconds on `CLOCK_MONOTONIC`, which every process on the machine shares (so two
/// processes can agree on periods of time without talking).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Polls `f` every 50 ms until it returns true; fails after `timeout` naming `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns a long-running harness process (agent or CA) with its output appended to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<Child> {
    let log = OpenOptions::new().create(true).append(true).open(log)?;
    cmd.env(
        "RUST_LOG",
        std::env::var("MESH_TEST_LOG").unwrap_or_else(|_| "info".into()),
    )
    .env("NO_COLOR", "1")
    .stdout(log.try_clone()?)
    .stderr(log)
    .stdin(Stdio::null())
    .spawn()
    .with_context(|| format!("spawn {what}"))
}

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
    /// Netns file.
    pub netns: PathBuf,
    /// cgroup v2 directory.
    pub cgroup: PathBuf,
    /// Whether the node file lists it.
    pub enrolled: bool,
    /// Its service account (its identity, with the namespace `default`).
    pub service_account: String,
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
    agent: Option<Child>,
}

/// A simulated cluster; torn down on drop.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    dir: PathBuf,
    cgroup_dir: PathBuf,
    /// Nodes, in order.
    pub nodes: Vec<Node>,
    /// Every pod.
    pub pods: Vec<Pod>,
    /// Services, in order.
    pub services: Vec<ServiceSpec>,
    procs: Mutex<Vec<Child>>,
    netns_names: Vec<String>,
    fabric: PathBuf,
    ca: Option<Child>,
}

/// Where the harness's CA listens (inside the fabric netns, on its bridge).
pub const CA_ADDR: &str = "198.19.0.254:15012";

static COUNTER: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "mt";

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
        };
        // If building fails half-way, `c` is dropped and tears down what exists.
        c.build(&nodes)?;
        for i in 0..c.nodes.len() {
            c.write_node_file(i)?;
        }
        Ok(c)
    }

    fn add_netns(&mut self, name: &str) -> Result<PathBuf> {
        ip(&["netns", "add", name])?;
        self.netns_names.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(PathBuf::from("/var/run/netns").join(name))
    }

    fn build(&mut self, nodes: &[Vec<PodSpec>]) -> Result<()> {
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
            ip(&["-n", &ns, "link", "set", "br0", "up"])?;
            run(Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]))?;
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
                }
            }
            for (j, spec) in pods.iter().enumerate() {
                let pns = format!("{}-{}", self.prefix, spec.name);
                let pnetns = self.add_netns(&pns)?;
                let addr = Ipv4Addr::new(198, 18, (i + 1) as u8, (j + 10) as u8);
                let veth = format!("p{j}");
                ip(&[
                    "-n", &ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                    "netns", &pns,
                ])?;
                ip(&["-n", &ns, "link", "set", &veth, "master", "br0", "up"])?;
                ip(&[
                    "-n",
                    &pns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ])?;
                ip(&["-n", &pns, "link", "set", "eth0", "up"])?;
                ip(&[
                    "-n",
                    &pns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("198.18.{}.1", i + 1),
                ])?;
                let cgroup = self.cgroup_dir.join(&spec.name);
                std::fs::create_dir_all(&cgroup)?;
                self.pods.push(Pod {
                    name: spec.name.clone(),
                    node: i,
                    ip: addr,
                    netns: pnetns,
                    cgroup,
                    enrolled: spec.enrolled,
                    service_account: format!("{}-sa", spec.name),
                });
            }
            self.nodes.push(Node {
                node_file: self.dir.join(format!("{name}.yaml")),
                log: self.dir.join(format!("{name}-agent.log")),
                pin_name: format!("{}-n{}", self.prefix, i + 1),
                name,
                netns,
                agent: None,
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
                netns: pnetns,
                cgroup,
                enrolled: true,
                service_account: sa.into(),
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

    /// Runs `mesh-agent <args>` in node `i`'s namespace (where its admin endpoint listens) and
    /// returns its stdout; fails with its stderr if it fails.
    pub fn agent_cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let agent = artifact("mesh-agent")?;
        let mut all = vec![agent.to_str().context("agent path")?];
        all.extend(args);
        self.node_exec(i, &all)
    }

    /// Runs a command in node `i`'s namespace and returns its stdout; fails with its stderr if
    /// it fails.
    pub fn node_exec(&self, i: usize, args: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.nodes[i].netns.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

    /// The YAML listing of one pod, as the node file has it.
    pub fn pod_entry(&self, pod: &Pod) -> String {
        format!(
            "  - name: {}\n    namespace: default\n    serviceAccount: {}\n    labels: {{app: {}}}\n    ip: {}\n    netns: {}\n    cgroup: {}\n",
            pod.name,
            pod.service_account,
            pod.name,
            pod.ip,
            pod.netns.display(),
            pod.cgroup.display()
        )
    }

    /// The node file for node `i` as the harness writes it: its enrolled pods, the enrolled pods
    /// of other nodes as workloads, and all services.
    pub fn node_file_text(&self, i: usize) -> String {
        let mut s = format!("node: {}\npods:\n", self.nodes[i].name);
        for p in self.pods.iter().filter(|p| p.node == i && p.enrolled) {
            s.push_str(&self.pod_entry(p));
        }
        s.push_str("workloads:\n");
        for p in self.pods.iter().filter(|p| p.node != i && p.enrolled) {
            s.push_str(&format!(
                "  - {{name: {}, namespace: default, serviceAccount: {}, labels: {{app: {}}}, ip: {}, node: {}}}\n",
                p.name, p.service_account, p.name, p.ip, self.nodes[p.node].name
            ));
        }
        s.push_str("services:\n");
        for svc in &self.services {
            let eps: Vec<String> = svc
                .endpoints
                .iter()
                .map(|e| self.pod(e).ip.to_string())
                .collect();
            s.push_str(&format!(
                "  - name: {}\n    namespace: default\n    ip: {}\n    ports: [{{port: {}, targetPort: {}{}}}]\n    endpoints: [{}]\n{}",
                svc.name,
                self.service_ip(&svc.name),
                svc.port,
                svc.target_port,
                svc.app_protocol
                    .as_ref()
                    .map(|p| format!(", appProtocol: {p}"))
                    .unwrap_or_default(),
                eps.join(", "),
                svc.allowed_upgrades
                    .as_ref()
                    .map(|u| format!("    allowedUpgrades: [{}]\n", u.join(", ")))
                    .unwrap_or_default(),
            ));
        }
        s
    }

    /// Writes node `i`'s default node file.
    pub fn write_node_file(&self, i: usize) -> Result<()> {
        self.set_node_file(i, &self.node_file_text(i))
    }

    /// Replaces node `i`'s node file atomically (write then rename, as ConfigMaps do).
    pub fn set_node_file(&self, i: usize, text: &str) -> Result<()> {
        let path = &self.nodes[i].node_file;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Replaces node `i`'s node file with the default plus `extra`, and waits until the agent's
    /// `/stats` list `field` holds exactly `expect`. Only names are compared: to wait for a new
    /// version of an object, give it a new name.
    pub fn apply(&self, i: usize, extra: &str, field: &str, expect: &[&str]) -> Result<()> {
        self.set_node_file(i, &format!("{}{extra}", self.node_file_text(i)))?;
        wait_until(
            "the agent to apply the node file",
            Duration::from_secs(5),
            || {
                let s = self.stats(i)?;
                let have: Vec<String> = s[field]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(
                    expect.iter().all(|e| have.iter().any(|h| h == e))
                        && have.len() == expect.len(),
                )
            },
        )
        .with_context(|| {
            format!(
                "problems: {}",
                self.stats(i)
                    .map(|s| s["problems"].to_string())
                    .unwrap_or_default()
            )
        })
    }

    /// The CA's root directory.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// Node `i`'s CA token file.
    pub fn token_file(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}.token", self.nodes[i].name))
    }

    /// Starts the CA with certificates of lifetime `ttl` (e.g. `1h`, `4s`) and waits until it
    /// has written its root. Restarting keeps the root (it lives on disk).
    pub fn start_ca(&mut self, ttl: &str) -> Result<()> {
        self.stop_ca();
        let mut cfg = String::from("nodes:\n");
        for (i, n) in self.nodes.iter().enumerate() {
            let token = self.token_file(i);
            if !token.exists() {
                std::fs::write(
                    &token,
                    format!("token-{}-{}-0123456789abcdef\n", self.prefix, n.name),
                )?;
            }
            cfg.push_str(&format!(
                "  - {{name: {}, tokenFile: {}, nodeFile: {}}}\n",
                n.name,
                token.display(),
                n.node_file.display()
            ));
        }
        let cfg_path = self.dir.join("ca.yaml");
        std::fs::write(&cfg_path, cfg)?;
        let child = spawn_logged(
            Command::new("nsenter")
                .arg(format!("--net={}", self.fabric.display()))
                .arg(artifact("mesh-agent")?)
                .args(["ca", "--listen", CA_ADDR, "--cert-ttl", ttl, "--dir"])
                .arg(self.ca_dir())
                .arg("--config")
                .arg(&cfg_path),
            &self.dir.join("ca.log"),
            "CA",
        )?;
        self.ca = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: SocketAddr = CA_ADDR.parse()?;
        loop {
            let up = in_netns(&self.fabric, || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })?;
            if up && self.ca_dir().join("bundle.pem").exists() {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.ca.as_mut().map(Child::try_wait) {
                bail!("CA exited ({st}):\n{}", self.ca_log());
            }
            if Instant::now() > deadline {
                bail!("CA not up after 10 s:\n{}", self.ca_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the CA (agents keep their certificates until they expire).
    pub fn stop_ca(&mut self) {
        if let Some(mut c) = self.ca.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The CA's log so far.
    pub fn ca_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ca.log")).unwrap_or_default()
    }

    /// Starts node `i`'s agent and waits until it reports ready.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.start_agent_with(i, &[])?;
        self.wait_ready(i, Duration::from_secs(15))
    }

    /// Starts node `i`'s agent with extra flags, without waiting. Unless `extra` chooses the
    /// embedded CA (`--ca-dir`), the agent uses the harness's CA, which is started (1 h
    /// certificates) if it never was (a test that stopped it keeps it stopped).
    pub fn start_agent_with(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let embedded = extra.contains(&"--ca-dir");
        if !embedded && !self.ca_dir().join("bundle.pem").exists() {
            self.start_ca("1h")?;
        }
        let agent = artifact("mesh-agent")?;
        let object = artifact("mesh-ebpf.o")?;
        let token = self.token_file(i);
        let bundle = self.ca_dir().join("bundle.pem");
        // Its own cgroup, as a DaemonSet pod has: the loopback bypass watches the agent's cgroup.
        let cgroup = self
            .cgroup_dir
            .join(format!("agent-{}", self.nodes[i].name));
        std::fs::create_dir_all(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
        let node = &mut self.nodes[i];
        let mut cmd = Command::new("nsenter");
        let cmd = cmd
            .arg(format!("--net={}", node.netns.display()))
            .arg(&agent)
            .arg("run")
            .arg("--node-file")
            .arg(&node.node_file)
            .arg("--pin-name")
            .arg(&node.pin_name)
            .arg("--bpf-object")
            .arg(&object)
            .arg("--poll-interval-ms")
            .arg("200")
            .arg("--cgroup")
            .arg(&cgroup)
            .arg("--pod-cgroup-root")
            .arg(&self.cgroup_dir)
            .args(if embedded {
                vec![]
            } else {
                vec![
                    "--ca-addr".into(),
                    CA_ADDR.into(),
                    "--ca-token-file".into(),
                    token.into_os_string(),
                    "--ca-bundle".into(),
                    bundle.into_os_string(),
                ]
            })
            .args(extra);
        let child = spawn_logged(cmd, &node.log, "agent")?;
        node.agent = Some(child);
        Ok(())
    }

    /// Polls node `i`'s `/ready` until 200, or fails with the agent's log.
    pub fn wait_ready(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.agent_get(i, "/ready") {
                return Ok(());
            }
            if let Some(c) = self.nodes[i].agent.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "agent on {} exited ({status}):\n{}",
                    self.nodes[i].name,
                    self.agent_log(i)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {} not ready after {timeout:?}:\n{}",
                    self.nodes[i].name,
                    self.agent_log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs node `i`'s agent (a crash: no cleanup runs).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// GET on node `i`'s admin endpoint.
    pub fn agent_get(&self, i: usize, path: &str) -> Result<(u16, String)> {
        let addr: SocketAddr = ([127, 0, 0, 1], 15000).into();
        in_netns(&self.nodes[i].netns, || http_get(addr, path))?
    }

    /// Node `i`'s `/metrics`, parsed by the Prometheus project's own Python parser
    /// (`prometheus_client`, the Debian package `cargo xtask setup` installs), so a format
    /// error fails the test. Returns every sample.
    pub fn scrape(&self, i: usize) -> Result<Vec<Sample>> {
        let addr: SocketAddr = ([127, 0, 0, 1], 15020).into();
        let (code, text) = in_netns(&self.nodes[i].netns, || http_get(addr, "/metrics"))??;
        if code != 200 {
            bail!("/metrics answered {code}: {text}");
        }
        parse_metrics(&text)
    }

    /// Node `i`'s `/stats`, parsed.
    pub fn stats(&self, i: usize) -> Result<serde_json::Value> {
        let (code, body) = self.agent_get(i, "/stats")?;
        if code != 200 {
            bail!("/stats answered {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// CPU time (user + system, all threads) node `i`'s agent has used so far, from
    /// /proc/<pid>/stat; `None` when it is not running.
    pub fn agent_cpu(&self, i: usize) -> Option<Duration> {
        proc_cpu(self.agent_pid(i)?)
    }

    /// One counter of one pod from node `i`'s `/stats`, e.g. `("client", "kernel.captured_v4")`.
    pub fn counter(&self, i: usize, pod: &str, field: &str) -> Result<u64> {
        let s = self.stats(i)?;
        let mut v = &s["pods"][format!("default/{pod}")];
        for part in field.split('.') {
            v = &v[part];
        }
        v.as_u64()
            .with_context(|| format!("no counter {field} for pod {pod} in {s}"))
    }

    /// Node `i`'s agent log so far.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The first line of node `i`'s log that `pred` accepts, waiting up to 5 s for it: the
    /// access log reaches stdout in batches, a few milliseconds after its flow.
    pub fn wait_log_line(
        &self,
        i: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let mut found = None;
        wait_until(what, Duration::from_secs(5), || {
            found = self
                .agent_log(i)
                .lines()
                .find(|l| pred(l))
                .map(str::to_string);
            Ok(found.is_some())
        })
        .with_context(|| format!("node {} log:\n{}", i + 1, self.agent_log(i)))?;
        found.context("found above")
    }

    fn pod_command(&self, pod: &str, args: &[&str]) -> Result<(Command, File, File)> {
        let p = self.pod(pod);
        let ns = File::open(&p.netns)?;
        let cg = OpenOptions::new()
            .write(true)
            .open(p.cgroup.join("cgroup.procs"))?;
        let (ns_fd, cg_fd) = (ns.as_raw_fd(), cg.as_raw_fd());
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        // SAFETY: the closure only makes async-signal-safe syscalls (write, setns) on fds that
        // stay open until spawn returns (they are returned to the caller).
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself into the cgroup.
                if libc::write(cg_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok((cmd, ns, cg))
    }

    /// Runs a command as a process of pod `pod` (its netns and cgroup) and waits for it.
    pub fn exec(&self, pod: &str, args: &[&str]) -> Result<Output> {
        let (mut cmd, _ns, _cg) = self.pod_command(pod, args)?;
        cmd.stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {args:?} in pod {pod}"))
    }

    /// Starts a long-running process in pod `pod`; it is killed at teardown.
    pub fn spawn(&self, pod: &str, args: &[&str]) -> Result<u32> {
        let (cmd, _ns, _cg) = self.pod_command(pod, args)?;
        self.keep_running(cmd, pod, args)
    }

    /// Starts `cmd` (which runs `args`) logging to a file named after `owner` and `args`, and
    /// keeps it to be killed at teardown. Returns its pid.
    fn keep_running(&self, mut cmd: Command, owner: &str, args: &[&str]) -> Result<u32> {
        let tag: String = args.join("_").replace('/', "_").chars().take(40).collect();
        let log = File::create(self.dir.join(format!("{owner}-{tag}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {args:?} in {owner}"))?;
        let pid = child.id();
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(child);
        Ok(pid)
    }

    /// Starts a process of pod `pod` with piped standard input and output, owned by the caller
    /// (for a client whose lifetime the caller ends by closing its input).
    pub fn spawn_piped(&self, pod: &str, args: &[&str]) -> Result<Child> {
        let (mut cmd, _ns, _cg) = self.pod_command(pod, args)?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn {args:?} in pod {pod}"))
    }

    /// Starts a long-running process in node `i`'s namespace, outside every pod's cgroup (a
    /// node-level peer proxy, say); it is killed at teardown. Returns its pid.
    pub fn spawn_in_node(&self, i: usize, args: &[&str]) -> Result<u32> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.nodes[i].netns.display()))
            .args(args);
        self.keep_running(cmd, &format!("node{i}"), args)
    }

    /// Node `i`'s agent's pid, while it runs.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].agent.as_ref().map(Child::id)
    }

    /// Waits until something listens on `port` on pod `pod`'s loopback.
    pub fn wait_listening(&self, pod: &str, port: u16) -> Result<()> {
        let p = self.pod(pod);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = in_netns(&p.netns, || {
                TcpStream::connect_timeout(
                    &([127, 0, 0, 1], port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
            })?;
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on port {port} in pod {pod}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the test HTTP server in pod `pod` on `port` and waits for it.
    pub fn serve(&self, pod: &str, port: u16) -> Result<()> {
        self.serve_with(pod, port, &[])
    }

    /// [`Cluster::serve`] with more `mesh-testapp serve` flags (e.g. `--delay-ms`). The server
    /// names itself after the pod.
    pub fn serve_with(&self, pod: &str, port: u16, extra: &[&str]) -> Result<()> {
        let app = artifact("mesh-testapp")?;
        let app = app.to_string_lossy().into_owned();
        let port_s = port.to_string();
        let mut args = vec![app.as_str(), "serve", "--port", &port_s, "--name", pod];
        args.extend_from_slice(extra);
        self.spawn(pod, &args)?;
        self.wait_listening(pod, port)
    }

    /// Starts `mesh-testapp <args>` in pod `pod` with piped standard streams, without waiting.
    pub fn spawn_testapp(&self, pod: &str, args: &[&str]) -> Result<Child> {
        let app = artifact("mesh-testapp")?;
        let app = app.to_string_lossy().into_owned();
        let mut all = vec![app.as_str()];
        all.extend_from_slice(args);
        self.spawn_piped(pod, &all)
    }

    /// Runs `mesh-testapp <args>` in pod `pod` and returns its stdout; fails if it does.
    pub fn testapp(&self, pod: &str, args: &[&str]) -> Result<String> {
        let app = artifact("mesh-testapp")?;
        let app = app.to_string_lossy().into_owned();
        let mut all = vec![app.as_str()];
        all.extend_from_slice(args);
        let out = self.exec(pod, &all)?;
        if !out.status.success() {
            bail!(
                "mesh-testapp {args:?} in {pod} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `curl` from pod `pod`; returns (exit code, stdout).
    pub fn curl(&self, pod: &str, args: &[&str]) -> Result<(i32, String)> {
        let mut all = vec!["curl", "-sS", "--max-time", "10"];
        all.extend_from_slice(args);
        let out = self.exec(pod, &all)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    }

    /// HTTP status of `GET url` from pod `pod`, or None if the connection failed (5 s limit).
    pub fn http_status(&self, pod: &str, url: &str) -> Result<Option<u16>> {
        let (code, out) = self.curl(
            pod,
            &[
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                url,
            ],
        )?;
        Ok((code == 0).then(|| out.trim().parse().unwrap_or(0)))
    }

    /// The cluster's scratch directory (node files, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn teardown(&mut self) {
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

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn remove_cgroup_tree(dir: &Path) {
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
fn sweep_stale() {
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

/// Raw frames seen on one interface of a netns (an `AF_PACKET` socket), to assert on what
/// crosses the wire. Frames are collected on a thread until [`Capture::stop`].
#[derive(Debug)]
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Vec<u8>>>>,
}

impl Capture {
    /// Starts capturing on `ifname` inside `netns`.
    pub fn start(netns: &Path, ifname: &str) -> Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let ifname = std::ffi::CString::new(ifname)?;
        let fd = in_netns(netns, move || -> std::io::Result<OwnedFd> {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the result is checked.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `raw` is a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: `ifname` is a valid C string.
            let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            if index == 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: zeroed sockaddr_ll is valid; the fields we need are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: `sll` is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            let rcvbuf: libc::c_int = 32 << 20;
            // SAFETY: valid option values of the right sizes.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const rcvbuf).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
            Ok(fd)
        })??;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: `buf` is writable for its length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops and returns every frame seen.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// One TCP segment of a captured IPv4 frame.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// TCP payload.
    pub payload: Vec<u8>,
}

/// The TCP segments among Ethernet frames (IPv4 only; everything else is skipped).
pub fn tcp_segments(frames: &[Vec<u8>]) -> Vec<Segment> {
    frames
        .iter()
        .filter_map(|f| {
            if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
                return None;
            }
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
            let tcp = 14 + ihl;
            if f.len() < tcp + 20 {
                return None;
            }
            let doff = usize::from(f[tcp + 12] >> 4) * 4;
            let end = (14 + total).min(f.len());
            let start = (tcp + doff).min(end);
            Some(Segment {
                src_port: u16::from_be_bytes([f[tcp], f[tcp + 1]]),
                dst_port: u16::from_be_bytes([f[tcp + 2], f[tcp + 3]]),
                payload: f[start..end].to_vec(),
            })
        })
        .collect()
}

/// One sample of a scrape.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    /// Sample name (a histogram's have `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// The parser: reads the exposition on stdin, prints the samples as JSON.
const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;

/// Parses Prometheus text with `prometheus_client` (Debian's Python, where the package is).
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>> {
    use std::io::Write;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run /usr/bin/python3 (install python3-prometheus-client: `cargo xtask setup`)")?;
    child
        .stdin
        .take()
        .context("parser stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the Prometheus parser rejected /metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The sum of `name` over the samples whose labels include all of `labels`.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// The count of one kernel event slot (`mesh_bpf_events_total`) in a scrape.
pub fn bpf_event(samples: &[Sample], hook: &str, outcome: &str, reason: &str) -> f64 {
    metric_sum(
        samples,
        "mesh_bpf_events_total",
        &[("hook", hook), ("outcome", outcome), ("reason", reason)],
    )
}
