//! The parts of the agent's wiring that need no agent: the `/stats` body, the heap's counters,
//! the Kubernetes settings, the shutdown signal and the kernel collector's registration.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

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
    /// Why this agent is not ready (as `/ready` says); absent when it is. During an upgrade
    /// both agents answer on the shared admin socket, so with `pid` this tells which one
    /// answered and whether it serves yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
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
    /// Whether HBONE goes to the kernel's TLS (`--ktls` and a kernel with it), and how many
    /// connections took each path.
    pub ktls: KtlsReport,
    /// The allocator's view of the heap: what is in use against what it holds.
    pub heap: HeapReport,
    /// HBONE connections open in the client pool.
    pub hbone_pool_connections: usize,
    /// Workloads of the mesh this node knows (its own pods included).
    pub workloads: usize,
    /// Services this node routes.
    pub services: usize,
}

/// kTLS in `/stats`: the decision made at start and the connections of each path since.
#[derive(Debug, Serialize)]
pub struct KtlsReport {
    /// kTLS is in use for new HBONE connections.
    pub enabled: bool,
    /// Connections per path.
    #[serde(flatten)]
    pub connections: crate::transport::ktls::KtlsCounts,
}

/// Heap in use against heap held, from the allocator (jemalloc, see `main.rs`): when the agent's
/// resident memory stays high after a load, this tells live data (`in_use`) from pages the
/// allocator still holds (`resident` above it) and from what it has not yet purged.
#[derive(Debug, Default, Serialize)]
pub struct HeapReport {
    /// Bytes of live allocations.
    pub in_use: usize,
    /// Bytes in the allocator's active pages (live allocations and their slabs' free slots).
    pub active: usize,
    /// Bytes of the allocator's pages that are resident (its metadata and unpurged pages too).
    pub resident: usize,
    /// Bytes of the allocator's own bookkeeping: it grows with the most the heap has held and is
    /// not given back, so part of `resident` stays above its baseline after a load.
    pub metadata: usize,
}

impl HeapReport {
    /// Reads the allocator's counters now (they are refreshed on demand, by advancing its epoch).
    pub fn now() -> Self {
        use tikv_jemalloc_ctl::{epoch, stats};
        let read = || -> Result<Self, tikv_jemalloc_ctl::Error> {
            epoch::advance()?;
            Ok(Self {
                in_use: stats::allocated::read()?,
                active: stats::active::read()?,
                resident: stats::resident::read()?,
                metadata: stats::metadata::read()?,
            })
        };
        read().unwrap_or_else(|e| {
            warn!("cannot read the allocator's counters: {e}");
            Self::default()
        })
    }
}

/// How often a runtime thread may hand its allocation cache back (see [`on_thread_park`]).
const CACHE_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Run by each runtime thread as it goes idle: at most once per [`CACHE_FLUSH_EVERY`], hands
/// the thread's jemalloc cache back to the shared arenas.
///
/// Why: each thread caches freed objects for its next allocations, and a thread only trims
/// that cache as it allocates, so a thread that goes idle after a load keeps what the load's
/// last moments freed, pinning the partly used pages around it. After 10,000 connections
/// closed, that was most of the agent's resident memory above its baseline. Rate-limited
/// because a busy thread parks thousands of times a second and refills the cache after each
/// flush.
pub(crate) fn on_thread_park() {
    #[cfg(not(feature = "system-allocator"))]
    {
        use std::{cell::Cell, time::Instant};
        thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
        let now = Instant::now();
        if LAST
            .get()
            .is_some_and(|t| now.duration_since(t) < CACHE_FLUSH_EVERY)
        {
            return;
        }
        LAST.set(Some(now));
        // SAFETY: `thread.tcache.flush` takes and returns nothing, so every pointer is null
        // and the length 0, as jemalloc's mallctl requires for it; the name is NUL-terminated.
        // It fails only where there is no cache to flush (`tcache:false`), so its code is not read.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                c"thread.tcache.flush".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
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
