//! The parts of the agent's wiring that need no agent: the `/stats` body, returning freed heap,
//! the Kubernetes settings, the shutdown signal and the kernel collector's registration.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use serde::Serialize;
use tracing::warn;

use crate::{
    capture::bpf::{self, KernelPodStats},
    config::KubeSettings,
    discovery::kube,
    identity::certs::CertReport,
    state::MtlsMode,
};

/// One pod's line in `/stats`.
#[derive(Debug, Serialize)]
pub struct PodReport {
    /// Pod address.
    pub ip: IpAddr,
    /// The pod's SPIFFE identity.
    pub identity: String,
    /// PERMISSIVE or STRICT.
    pub mtls_mode: MtlsMode,
    /// Counters the kernel keeps.
    pub kernel: KernelPodStats,
    /// Counters the proxy keeps (see `proxy::PodCounters`).
    #[serde(flatten)]
    pub proxy: serde_json::Value,
}

/// The body of `/stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Node name.
    pub node: String,
    /// The agent's process id: during an upgrade, which of two agents answered.
    pub pid: u32,
    /// Whether the maps were adopted from an earlier agent.
    pub adopted_maps: bool,
    /// Adopted links moved onto this agent's programs (an upgrade or downgrade).
    pub link_updates: crate::capture::bpf::LinkUpdates,
    /// Connections open now, and whether the agent is draining (handed over, or stopping).
    pub connections: crate::proxy::drain::DrainReport,
    /// Per pod, keyed `namespace/name`.
    pub pods: BTreeMap<String, PodReport>,
    /// Per identity: the certificate in use and its renewals.
    pub certificates: BTreeMap<String, CertReport>,
    /// Roots in the trust bundle (2 while a root rotation overlaps).
    pub trust_roots: usize,
    /// Authorization policies in force, `namespace/name`.
    pub authorization_policies: Vec<String>,
    /// HTTP routes in force, `namespace/name`.
    pub http_routes: Vec<String>,
    /// Destination rules in force, `namespace/name`.
    pub destination_rules: Vec<String>,
    /// Current configuration problems (rejected pods or services).
    pub problems: Vec<String>,
    /// HBONE connections open in the client pool.
    pub hbone_pool_connections: usize,
    /// Workloads of the mesh this node knows (its own pods included).
    pub workloads: usize,
    /// Services this node routes.
    pub services: usize,
}

/// Returns freed heap to the OS: after start-up (loading the programs parses the kernel's BTF,
/// megabytes) and then periodically; glibc would otherwise keep it as free heap, counted in the
/// agent's resident memory for good.
pub(super) fn return_free_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How often freed heap goes back to the OS.
const MEMORY_RETURN_EVERY: Duration = Duration::from_secs(10);

/// Allocations from 128 KiB up get pages of their own, returned as soon as they are freed.
/// glibc would otherwise raise that bound after each large free (up to 32 MiB), and put the
/// next large buffer (a page of a Kubernetes list, the model of ten thousand workloads) in the
/// heap among long-lived objects, where its pages stay resident: with 10,000 remote pods that
/// kept 4 MB more.
pub(super) fn fix_mmap_threshold() {
    const THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only sets a parameter of the allocator.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) } != 1 {
        warn!("cannot fix the allocator's mmap threshold; large buffers may stay resident");
    }
}

/// Returns freed heap to the OS every few seconds, from a thread of its own. glibc keeps what a
/// burst freed (a client that made the proxy buffer megabytes, then left) as free heap in its
/// arenas for good; trimming hands it back, so memory falls again after a connection closes.
pub(super) fn start_memory_return() {
    let started = std::thread::Builder::new()
        .name("memory-return".into())
        .spawn(|| {
            loop {
                std::thread::sleep(MEMORY_RETURN_EVERY);
                return_free_heap();
            }
        });
    if let Err(e) = started {
        warn!("cannot start the memory-return thread: {e}; freed heap stays with the agent");
    }
}

/// Kubernetes discovery's settings from the agent's.
pub(super) fn kube_settings(k: &KubeSettings) -> kube::Settings {
    kube::Settings {
        node: k.node.clone(),
        kubeconfig: k.kubeconfig.clone(),
        enrollment: kube::world::Enrollment {
            label: k.enroll_label.clone(),
            istio_ambient: k.istio_ambient_label,
        },
        root_namespace: k.root_namespace.clone(),
        podfs: kube::podfs::PodFs {
            cgroup_root: k.kubelet_cgroup_root.clone(),
            proc_root: k.proc_root.clone(),
        },
    }
}

/// Waits for SIGTERM or Ctrl-C.
pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        warn!("cannot install SIGTERM handler; stop with Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Registers a collector that the agent also reads directly.
#[derive(Debug)]
pub(super) struct SharedCollector(pub(super) Arc<bpf::collector::KernelCollector>);

impl prometheus::core::Collector for SharedCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        prometheus::core::Collector::desc(&*self.0)
    }
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        prometheus::core::Collector::collect(&*self.0)
    }
}
