//! The agent's settings: one name, one default and one validation step each, from flags or
//! environment variables; the effective configuration is logged at start.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::identity::ca::CaAddr;
use clap::Args;

pub use crate::protocol::guard::HttpTimeouts;

/// Environment variable for `--node-file`.
pub const ENV_NODE_FILE: &str = "MESH_NODE_FILE";
/// Environment variable for `--bpffs`.
pub const ENV_BPFFS: &str = "MESH_BPFFS";
/// Environment variable for `--pin-name`.
pub const ENV_PIN_NAME: &str = "MESH_PIN_NAME";
/// Environment variable for `--bpf-object`.
pub const ENV_BPF_OBJECT: &str = "MESH_BPF_OBJECT";
/// Environment variable for `--admin-addr`.
pub const ENV_ADMIN_ADDR: &str = "MESH_ADMIN_ADDR";
/// Env var for `--metrics-addr`.
pub const ENV_METRICS_ADDR: &str = "MESH_METRICS_ADDR";
/// Env var for `--metrics-retention`.
pub const ENV_METRICS_RETENTION: &str = "MESH_METRICS_RETENTION";
/// Env var for `--cluster-id`.
pub const ENV_CLUSTER_ID: &str = "MESH_CLUSTER_ID";
/// Env var for `--access-log`.
pub const ENV_ACCESS_LOG: &str = "MESH_ACCESS_LOG";
/// Env var for `--worker-threads`.
pub const ENV_WORKER_THREADS: &str = "MESH_WORKER_THREADS";
/// Env var for `--same-node-splice`.
pub const ENV_SAME_NODE_SPLICE: &str = "MESH_SAME_NODE_SPLICE";
/// Env var for `--same-node-splice-after-bytes`.
pub const ENV_SAME_NODE_SPLICE_AFTER: &str = "MESH_SAME_NODE_SPLICE_AFTER_BYTES";
/// Env var for `--ktls`.
pub const ENV_KTLS: &str = "MESH_KTLS";
/// Env var for `--loop-bypass`.
pub const ENV_LOOP_BYPASS: &str = "MESH_LOOP_BYPASS";
/// Env var for `--cgroup`.
pub const ENV_CGROUP: &str = "MESH_CGROUP";
/// Env name of `--pod-cgroup-root`.
pub const ENV_POD_CGROUP_ROOT: &str = "MESH_POD_CGROUP_ROOT";
/// Env name of `--hbone-idle-timeout`.
pub const ENV_HBONE_IDLE_TIMEOUT: &str = "MESH_HBONE_IDLE_TIMEOUT";
/// Env name of `--http-head-timeout`.
pub const ENV_HTTP_HEAD_TIMEOUT: &str = "MESH_HTTP_HEAD_TIMEOUT";
/// Env name of `--http-idle-timeout`.
pub const ENV_HTTP_IDLE_TIMEOUT: &str = "MESH_HTTP_IDLE_TIMEOUT";
/// `--max-connections`.
pub const ENV_MAX_CONNECTIONS: &str = "MESH_MAX_CONNECTIONS";
/// `--max-pod-connections`.
pub const ENV_MAX_POD_CONNECTIONS: &str = "MESH_MAX_POD_CONNECTIONS";
/// `--handover-socket`.
pub const ENV_HANDOVER_SOCKET: &str = "MESH_HANDOVER_SOCKET";
/// `--drain-timeout`.
pub const ENV_DRAIN_TIMEOUT: &str = "MESH_DRAIN_TIMEOUT";
/// Environment variable for `--trust-domain`.
pub const ENV_TRUST_DOMAIN: &str = "MESH_TRUST_DOMAIN";
/// Environment variable for `--ca-addr`.
pub const ENV_CA_ADDR: &str = "MESH_CA_ADDR";
/// Environment variable for `--ca-token-file`.
pub const ENV_CA_TOKEN_FILE: &str = "MESH_CA_TOKEN_FILE";
/// Environment variable for `--ca-bundle`.
pub const ENV_CA_BUNDLE: &str = "MESH_CA_BUNDLE";
/// Environment variable for `--ca-dir`.
pub const ENV_CA_DIR: &str = "MESH_CA_DIR";
/// Environment variable for `--cert-ttl`.
pub const ENV_CERT_TTL: &str = "MESH_CERT_TTL";
/// Env var for `--kubernetes`.
pub const ENV_KUBERNETES: &str = "MESH_KUBERNETES";
/// Env var for `--node-name`: the name the downward API gives (`spec.nodeName`).
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// Env var for `--kubeconfig`.
pub const ENV_KUBECONFIG: &str = "MESH_KUBECONFIG";
/// Env var for `--enroll-label`.
pub const ENV_ENROLL_LABEL: &str = "MESH_ENROLL_LABEL";
/// Env var for `--istio-ambient-label`.
pub const ENV_ISTIO_AMBIENT_LABEL: &str = "MESH_ISTIO_AMBIENT_LABEL";
/// Env var for `--kubelet-cgroup-root`.
pub const ENV_KUBELET_CGROUP_ROOT: &str = "MESH_KUBELET_CGROUP_ROOT";
/// Env var for `--root-namespace`.
pub const ENV_ROOT_NAMESPACE: &str = "MESH_ROOT_NAMESPACE";
/// Env var for `--proc-root`.
pub const ENV_PROC_ROOT: &str = "MESH_PROC_ROOT";

/// Errors in the settings themselves.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The pin name would escape the bpffs directory or is empty.
    #[error(
        "--pin-name {0:?} must be a single non-empty path component (letters, digits, '-', '_', '.')"
    )]
    PinName(String),
    /// No BPF object given and none next to the executable.
    #[error(
        "no eBPF object found at {0}: pass --bpf-object (or {ENV_BPF_OBJECT}), or build with `cargo xtask build`"
    )]
    NoObject(PathBuf),
    /// The poll interval is zero.
    #[error("--poll-interval-ms must be at least 1")]
    PollInterval,
    /// A connection cap is zero, which would refuse every connection.
    #[error("--max-connections and --max-pod-connections must be at least 1")]
    ConnectionLimits,
    /// The trust domain has characters SPIFFE does not allow.
    #[error(
        "--trust-domain {0:?} is not a SPIFFE trust domain: use lowercase letters, digits, '.', '-' and '_'"
    )]
    TrustDomain(String),
    /// A remote CA needs a token and a bundle.
    #[error(
        "--ca-addr needs --ca-token-file (this node's CA token) and --ca-bundle (the CA's roots)"
    )]
    RemoteCaIncomplete,
    /// Neither a node file nor Kubernetes discovery was chosen, or Kubernetes lacks its node.
    #[error("{0}")]
    Discovery(&'static str),
    /// A duration flag could not be read.
    #[error("{flag} {value:?}: expected a positive duration like 500ms, 30s, 15m, 24h")]
    Duration {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
    },
}

/// Parses a duration as `humantime` writes them (`250ms`, `90s`, `15m`, `24h`, `1h30m`) or plain
/// seconds; zero is refused.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let err = || ConfigError::Duration {
        flag,
        value: value.to_string(),
    };
    let d = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse().map_err(|_| err())?)
    } else {
        humantime::parse_duration(value).map_err(|_| err())?
    };
    if d.is_zero() {
        return Err(err());
    }
    Ok(d)
}

/// Where workload certificates come from.
#[derive(Debug, Args)]
pub struct CaArgs {
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = ENV_TRUST_DOMAIN, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Address of a `mesh-agent ca` server, `host:port` (in Kubernetes its Service's name).
    /// Without it, the agent embeds the CA (local mode).
    #[arg(long, env = ENV_CA_ADDR)]
    pub ca_addr: Option<CaAddr>,
    /// File with this node's bearer token for the CA (remote CA only).
    #[arg(long, env = ENV_CA_TOKEN_FILE)]
    pub ca_token_file: Option<PathBuf>,
    /// PEM file with the roots to trust when connecting to the CA (remote CA only): the CA
    /// directory's `bundle.pem`.
    #[arg(long, env = ENV_CA_BUNDLE)]
    pub ca_bundle: Option<PathBuf>,
    /// Root directory of the embedded CA; created with a new root on first start.
    #[arg(long, env = ENV_CA_DIR, default_value = "/var/lib/mesh-agent/ca")]
    pub ca_dir: PathBuf,
    /// Lifetime of certificates the embedded CA signs (renewed at half-life).
    #[arg(long, env = ENV_CERT_TTL, default_value = "24h")]
    pub cert_ttl: String,
}

/// Where this agent gets certificates, validated.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// The CA runs inside the agent.
    Embedded {
        /// Its root directory.
        dir: PathBuf,
        /// Certificate lifetime.
        ttl: Duration,
    },
    /// A `mesh-agent ca` server.
    Remote {
        /// Address.
        addr: CaAddr,
        /// Token file.
        token_file: PathBuf,
        /// Roots for the CA connection.
        bundle: PathBuf,
    },
}

impl CaArgs {
    /// Validates the trust domain and the CA choice.
    pub fn validate(self) -> Result<(String, CaSource), ConfigError> {
        if !crate::identity::valid_trust_domain(&self.trust_domain) {
            return Err(ConfigError::TrustDomain(self.trust_domain));
        }
        let source = match self.ca_addr {
            Some(addr) => match (self.ca_token_file, self.ca_bundle) {
                (Some(token_file), Some(bundle)) => CaSource::Remote {
                    addr,
                    token_file,
                    bundle,
                },
                _ => return Err(ConfigError::RemoteCaIncomplete),
            },
            None => CaSource::Embedded {
                dir: self.ca_dir,
                ttl: parse_duration("--cert-ttl", &self.cert_ttl)?,
            },
        };
        Ok((self.trust_domain, source))
    }
}

/// Kubernetes discovery, instead of a node file.
#[derive(Debug, Args)]
pub struct KubeArgs {
    /// Discover pods, services and policies through the Kubernetes API instead of a node file.
    #[arg(long, env = ENV_KUBERNETES, default_value_t = false, action = clap::ArgAction::Set)]
    pub kubernetes: bool,
    /// This node's name as the API server knows it (the DaemonSet passes `spec.nodeName`).
    #[arg(long, env = ENV_NODE_NAME)]
    pub node_name: Option<String>,
    /// A kubeconfig file. Without it, the agent uses its pod's service account (in-cluster).
    #[arg(long, env = ENV_KUBECONFIG)]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace label that enrolls every pod in it (`<label>=true`); a pod opts out with
    /// `<label>=false`.
    #[arg(long, env = ENV_ENROLL_LABEL, default_value = "mesh.dev/enabled")]
    pub enroll_label: String,
    /// Also enroll namespaces labelled `istio.io/dataplane-mode=ambient` (pods opt out with
    /// `istio.io/dataplane-mode=none`), for a migration from Istio ambient.
    #[arg(long, env = ENV_ISTIO_AMBIENT_LABEL, default_value_t = false, action = clap::ArgAction::Set)]
    pub istio_ambient_label: bool,
    /// The cgroup v2 directory that holds the kubelet's `kubepods.slice` (systemd driver) or
    /// `kubepods` (cgroupfs driver).
    #[arg(long, env = ENV_KUBELET_CGROUP_ROOT, default_value = "/sys/fs/cgroup")]
    pub kubelet_cgroup_root: PathBuf,
    /// The agent's own pod (the DaemonSet passes `metadata.name`): at SIGTERM its DaemonSet is
    /// looked up, and if that is gone the mesh is being uninstalled and capture is removed.
    /// Without it, capture always stays (fail closed).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The agent's namespace (the DaemonSet passes `metadata.namespace`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    pub pod_namespace: String,
    /// The node's `/proc`: the host's, mounted, if the agent has a PID namespace of its own.
    #[arg(long, env = ENV_PROC_ROOT, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Istio's root namespace: PeerAuthentications in it without a selector apply mesh-wide.
    #[arg(long, env = ENV_ROOT_NAMESPACE, default_value = "istio-system")]
    pub root_namespace: String,
}

/// Where the agent learns its node's state.
#[derive(Debug, Clone)]
pub enum DiscoverySource {
    /// A node file, polled for changes.
    NodeFile(PathBuf),
    /// The Kubernetes API.
    Kubernetes(KubeSettings),
}

/// Kubernetes discovery's settings, validated.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// This node's name.
    pub node: String,
    /// A kubeconfig; in-cluster when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// The enrolling namespace label.
    pub enroll_label: String,
    /// Whether Istio ambient's label enrolls too.
    pub istio_ambient_label: bool,
    /// Where the kubelet's pod cgroups are.
    pub kubelet_cgroup_root: PathBuf,
    /// The node's `/proc`.
    pub proc_root: PathBuf,
    /// Istio's root namespace.
    pub root_namespace: String,
    /// The agent's own pod, `(namespace, name)`, when known.
    pub own_pod: Option<(String, String)>,
}

impl KubeArgs {
    fn validate(self, node_file: Option<PathBuf>) -> Result<DiscoverySource, ConfigError> {
        match (node_file, self.kubernetes) {
            (Some(_), true) => Err(ConfigError::Discovery(
                "--node-file and --kubernetes exclude each other: choose one source of state",
            )),
            (Some(f), false) => Ok(DiscoverySource::NodeFile(f)),
            (None, false) => Err(ConfigError::Discovery(
                "say where the node's state comes from: --node-file FILE (local mode) or --kubernetes",
            )),
            (None, true) => Ok(DiscoverySource::Kubernetes(KubeSettings {
                node: self.node_name.filter(|n| !n.is_empty()).ok_or(ConfigError::Discovery(
                    "--kubernetes needs --node-name (or NODE_NAME from the downward API's spec.nodeName)",
                ))?,
                kubeconfig: self.kubeconfig,
                enroll_label: self.enroll_label,
                istio_ambient_label: self.istio_ambient_label,
                kubelet_cgroup_root: self.kubelet_cgroup_root,
                proc_root: self.proc_root,
                root_namespace: self.root_namespace,
                own_pod: self
                    .pod_name
                    .filter(|n| !n.is_empty())
                    .map(|n| (self.pod_namespace, n)),
            })),
        }
    }
}

/// Flags of `mesh-agent run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node file (YAML) listing this node's pods and the mesh's services (local mode).
    #[arg(long, env = ENV_NODE_FILE)]
    pub node_file: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub pins: PinArgs,
    /// The compiled eBPF object; defaults to `mesh-ebpf.o` next to this executable.
    #[arg(long, env = ENV_BPF_OBJECT)]
    pub bpf_object: Option<PathBuf>,
    /// Loopback address of the admin endpoints (/healthz, /ready, /stats).
    #[arg(long, env = ENV_ADMIN_ADDR, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Address of the probe endpoint the kubelet reaches (/healthz, /ready, /version only).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub probe_addr: SocketAddr,
    /// How often to check the node file for changes, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// Address of the Prometheus endpoint (`/metrics`), for the node's scraper.
    #[arg(long, env = ENV_METRICS_ADDR, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// How long the series of a workload that left the mesh stay, e.g. `5m` or `1s`.
    #[arg(long, env = ENV_METRICS_RETENTION, default_value = "5m")]
    pub metrics_retention: String,
    /// The cluster's name in `source_cluster` and `destination_cluster` (Istio's default,
    /// `Kubernetes`, unless the mesh spans several clusters).
    #[arg(long, env = ENV_CLUSTER_ID, default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Access log on stdout: one line per connection (L4) and per request (L7).
    #[arg(long, env = ENV_ACCESS_LOG, value_enum, default_value = "text")]
    pub access_log: crate::telemetry::flows::AccessLogFormat,
    /// Proxy worker threads; 0 picks half the CPUs, at least one. The proxy shares the node
    /// with its pods: on 2 cores, one worker served as many requests as two for 15% less CPU
    /// per request (the bench, L4 across nodes), since two spend it waking each other.
    #[arg(long, env = ENV_WORKER_THREADS, default_value_t = 0)]
    pub worker_threads: usize,
    /// Splice same-node L4 connections in the kernel (sockmap) once policy allows them, so their
    /// bytes never pass through the proxy. Off: the proxy relays them like any other.
    #[arg(long, env = ENV_SAME_NODE_SPLICE, default_value_t = true, action = clap::ArgAction::Set)]
    pub same_node_splice: bool,
    /// Bytes (both ways together) a same-node connection moves through the proxy before it is
    /// spliced; 0 splices at once. Splicing costs about a dozen syscalls, and each message
    /// then takes a hop through a kernel worker: it pays off for bulk, not for a short
    /// exchange (the bench: 1.7× the single-stream throughput, but fewer new connections/s
    /// when every connection was spliced).
    #[arg(long, env = ENV_SAME_NODE_SPLICE_AFTER, default_value_t = 1 << 20)]
    pub same_node_splice_after_bytes: u64,
    /// Hand HBONE connections to the kernel's TLS after the handshake, where the kernel has it
    /// (CONFIG_TLS; detected at start, and without it everything stays on rustls).
    #[arg(long, env = ENV_KTLS, default_value_t = true, action = clap::ArgAction::Set)]
    pub ktls: bool,
    /// Report a kernel feature missing without probing it (repeatable; the names are in
    /// `/config_dump`'s `kernel_features`): for testing the refusal of a must-have and the
    /// fallback of a nice-to-have on a kernel that has them.
    #[arg(
        long = "pretend-missing-kernel-feature",
        value_name = "NAME",
        hide = true
    )]
    pub pretend_missing: Vec<String>,
    /// Take TCP out of the hops between pods and the proxy over each pod's loopback: sockmap
    /// `sk_msg` moves each message into the receiving socket (the first 4 MiB each socket
    /// sends; then TCP). Off by default: on Linux 6.18 a socket in a sockmap can fail a
    /// blocking read with EAGAIN, which applications reading blocking sockets do not expect.
    /// Needs the agent in a cgroup of its own (see --cgroup). While it is on, same-node
    /// connections are relayed rather than spliced: their bytes skip the queues the splice reads.
    #[arg(long, env = ENV_LOOP_BYPASS, default_value_t = false, action = clap::ArgAction::Set)]
    pub loop_bypass: bool,
    /// cgroup v2 directory the agent moves itself into at start, before it opens any socket
    /// (the loopback bypass watches the agent's cgroup). Default: the one it was started in.
    #[arg(long, env = ENV_CGROUP)]
    pub cgroup: Option<PathBuf>,
    /// Every pod's cgroup must be strictly below this cgroup v2 directory (on Kubernetes, the
    /// kubelet's `kubepods` cgroup). Unset: any cgroup but the root, the agent's own and its
    /// ancestors.
    #[arg(long, env = ENV_POD_CGROUP_ROOT)]
    pub pod_cgroup_root: Option<PathBuf>,
    /// Time an HTTP/1 client has to finish a request head it has started; past it the proxy
    /// answers 408 and closes. Short, because a stalled head holds memory and a slot.
    #[arg(long, env = ENV_HTTP_HEAD_TIMEOUT, default_value = "10s")]
    pub http_head_timeout: String,
    /// An HBONE connection to another node with no open stream for this long closes.
    #[arg(long, env = ENV_HBONE_IDLE_TIMEOUT, default_value = "30s")]
    pub hbone_idle_timeout: String,
    /// Time an HTTP/1 connection may wait for its next request (including its first).
    #[arg(long, env = ENV_HTTP_IDLE_TIMEOUT, default_value = "30s")]
    pub http_idle_timeout: String,
    /// Open connections the node proxy holds at most; past it new ones are refused at once
    /// (a reset). About 8 KB of agent memory each when idle (the bench), so the default fits
    /// the DaemonSet's 512 MiB limit with room for traffic.
    #[arg(long, env = ENV_MAX_CONNECTIONS, default_value_t = 40_000)]
    pub max_connections: usize,
    /// Open connections per pod and direction (what it opens; what is opened to it): one pod's
    /// flood or slowloris meets this cap while the node's other pods keep being served.
    #[arg(long, env = ENV_MAX_POD_CONNECTIONS, default_value_t = 10_000)]
    pub max_pod_connections: usize,
    /// Unix socket where a successor agent (an upgrade) takes this agent's listening sockets.
    /// Default: `/run/mesh-agent/<pin-name>.sock`.
    #[arg(long, env = ENV_HANDOVER_SOCKET)]
    pub handover_socket: Option<PathBuf>,
    /// After handing over, or at SIGTERM, how long connections already open may take to finish
    /// before the agent exits and ends them. Keep it below the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, env = ENV_DRAIN_TIMEOUT, default_value = "30s")]
    pub drain_timeout: String,
    #[command(flatten)]
    pub ca: CaArgs,
}

/// Where this agent keeps its pins.
#[derive(Debug, Args)]
pub struct PinArgs {
    /// Mount point of the bpf filesystem.
    #[arg(long, env = ENV_BPFFS, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Directory under the bpffs for this agent's maps, programs and links. Agents sharing a
    /// kernel (as simulated nodes do) need distinct names.
    #[arg(long, env = ENV_PIN_NAME, default_value = "mesh")]
    pub pin_name: String,
}

impl PinArgs {
    /// Validates the pin name and returns `<bpffs>/<pin-name>`.
    pub fn root(&self) -> Result<PathBuf, ConfigError> {
        let ok = !self.pin_name.is_empty()
            && self.pin_name != "."
            && self.pin_name != ".."
            && self
                .pin_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Ok(self.bpffs.join(&self.pin_name))
        } else {
            Err(ConfigError::PinName(self.pin_name.clone()))
        }
    }
}

/// The validated configuration of `mesh-agent run`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the node's state comes from.
    pub discovery: DiscoverySource,
    /// The bpffs mount.
    pub bpffs: PathBuf,
    /// `<bpffs>/<pin-name>`.
    pin_root: PathBuf,
    /// The eBPF object.
    pub bpf_object: PathBuf,
    /// The admin address.
    pub admin_addr: SocketAddr,
    /// The probe address.
    pub probe_addr: SocketAddr,
    /// Node-file poll interval.
    pub poll_interval: Duration,
    /// The metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// How long departed workloads' series stay.
    pub metrics_retention: Duration,
    /// `*_cluster` of mesh workloads.
    pub cluster_id: String,
    /// The access log's format.
    pub access_log: crate::telemetry::flows::AccessLogFormat,
    /// Proxy worker threads (resolved: never 0).
    pub worker_threads: usize,
    /// Whether same-node L4 connections are spliced in the kernel.
    pub same_node_splice: bool,
    /// Bytes a same-node connection moves through the proxy before it is spliced.
    pub same_node_splice_after_bytes: u64,
    /// Whether HBONE may use the kernel's TLS.
    pub ktls: bool,
    /// Kernel features to report missing without probing (tests).
    pub pretend_missing: Vec<String>,
    /// Whether pod↔proxy loopback hops may bypass TCP.
    pub loop_bypass: bool,
    /// The cgroup to join at start.
    pub cgroup: Option<PathBuf>,
    /// HTTP timeouts.
    pub http: HttpTimeouts,
    /// Pods' cgroups must be below this one.
    pub pod_cgroup_root: Option<PathBuf>,
    /// Idle HBONE connections close after this.
    pub hbone_idle_timeout: Duration,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// Where certificates come from.
    pub ca: CaSource,
    /// The caps on open connections.
    pub connection_limits: (usize, usize),
    /// The handover socket.
    pub handover_socket: PathBuf,
    /// How long open connections may take to finish at a handover or stop.
    pub drain_timeout: Duration,
}

impl Config {
    /// Validates `args`.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        let pin_root = args.pins.root()?;
        let bpf_object = match args.bpf_object {
            Some(p) => p,
            None => {
                let beside = std::env::current_exe()
                    .ok()
                    .and_then(|e| e.parent().map(|d| d.join("mesh-ebpf.o")))
                    .unwrap_or_else(|| PathBuf::from("mesh-ebpf.o"));
                if !beside.exists() {
                    return Err(ConfigError::NoObject(beside));
                }
                beside
            }
        };
        if args.poll_interval_ms == 0 {
            return Err(ConfigError::PollInterval);
        }
        let (trust_domain, ca) = args.ca.validate()?;
        let discovery = args.kube.validate(args.node_file)?;
        let metrics_retention = parse_duration("--metrics-retention", &args.metrics_retention)?;
        let http = HttpTimeouts {
            head: parse_duration("--http-head-timeout", &args.http_head_timeout)?,
            idle: parse_duration("--http-idle-timeout", &args.http_idle_timeout)?,
        };
        Ok(Self {
            metrics_addr: args.metrics_addr,
            metrics_retention,
            cluster_id: args.cluster_id.clone(),
            access_log: args.access_log,
            worker_threads: match args.worker_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
                n => n,
            },
            same_node_splice: args.same_node_splice,
            same_node_splice_after_bytes: args.same_node_splice_after_bytes,
            ktls: args.ktls,
            pretend_missing: args.pretend_missing,
            loop_bypass: args.loop_bypass,
            cgroup: args.cgroup,
            http,
            pod_cgroup_root: args.pod_cgroup_root,
            hbone_idle_timeout: parse_duration("--hbone-idle-timeout", &args.hbone_idle_timeout)?,
            discovery,
            bpffs: args.pins.bpffs,
            pin_root,
            bpf_object,
            admin_addr: args.admin_addr,
            probe_addr: args.probe_addr,
            poll_interval: Duration::from_millis(args.poll_interval_ms),
            trust_domain,
            ca,
            connection_limits: match (args.max_connections, args.max_pod_connections) {
                (0, _) | (_, 0) => return Err(ConfigError::ConnectionLimits),
                caps => caps,
            },
            handover_socket: args.handover_socket.unwrap_or_else(|| {
                PathBuf::from("/run/mesh-agent").join(format!("{}.sock", args.pins.pin_name))
            }),
            drain_timeout: parse_duration("--drain-timeout", &args.drain_timeout)?,
        })
    }

    /// `<bpffs>/<pin-name>`.
    pub fn pin_root(&self) -> PathBuf {
        self.pin_root.clone()
    }
}
