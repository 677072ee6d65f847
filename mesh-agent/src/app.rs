//! Wires every subsystem together; read this file to learn the whole agent.
//!
//! Start-up: preflight (root, bpffs) → load and pin the programs (adopting pinned maps) → read
//! the node file → open the CA (embedded) or point at it (remote) → reconcile → serve admin →
//! watch the node file and reconcile on every change.
//!
//! Reconcile makes the kernel and the proxy match the [`NodeState`]: pods that left are stopped
//! and their links unpinned; the certificate manager is told which identities local pods have;
//! new pods get, in this order, a namespace thread, counters, listeners, `sk_lookup` socket
//! entries, their mTLS mode in the kernel and finally the capture links. Listeners exist before
//! capture, so an enrolled pod is never captured into nothing by our own doing; connections that
//! need a certificate wait for it (see `certs.rs`) and never fall back to plaintext.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use parking_lot::Mutex;

use mesh_common::{ListenerKind, loop_enabled};
use tracing::{error, info, warn};

mod handover;
mod support;

pub(crate) use support::on_thread_park;
pub use support::{PodReport, Stats};
use support::{SharedCollector, kube_settings, shutdown_signal};

use crate::capture::features::{KernelFeatures, Need, PROG_TRACING, TLS_ULP};
use crate::{
    admin,
    capture::bpf::{self, Dataplane},
    capture::netns::Netns,
    config::{CaSource, Config, DiscoverySource},
    discovery::{kube, nodefile},
    identity::Identity,
    identity::ca::{self, CaClient},
    identity::certs::{CertCollector, CertManager},
    proxy::{
        admission,
        drain::{ConnLimits, Drain},
        inputs::ProxyInputs,
        listen::{self, PodProxy},
    },
    state::{MtlsMode, NodeState, ObjectKey, Pod},
    transport::dial::Dialer,
    transport::hbone,
    view::{Snapshot, View},
};

/// `mesh_kernel_feature{feature, need}`: 1 where the kernel has it, 0 where its path is off.
fn kernel_features_gauge(f: &KernelFeatures) -> Result<prometheus::IntGaugeVec, prometheus::Error> {
    let gauge = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "mesh_kernel_feature",
            "Kernel features probed at start: 1 present, 0 missing (its path is off)",
        ),
        &["feature", "need"],
    )?;
    for p in &f.features {
        let need = match p.need {
            Need::Required => "required",
            Need::Optional => "optional",
        };
        gauge
            .with_label_values(&[p.name, need])
            .set(i64::from(p.available));
    }
    Ok(gauge)
}

/// Errors that stop the agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// See [`bpf::BpfError`].
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    /// See [`nodefile::NodeFileError`].
    #[error(transparent)]
    NodeFile(#[from] nodefile::NodeFileError),
    /// See [`kube::KubeError`].
    #[error(transparent)]
    Kube(#[from] kube::KubeError),
    /// See [`admin::AdminError`].
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// See [`ca::CaError`].
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// See [`metrics::MetricsError`].
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::metrics::MetricsError),
    /// The same-node splice could not start its watch (an epoll instance).
    #[error(
        "cannot start the same-node splice: {0} (run with --same-node-splice=false to relay same-node traffic in the proxy)"
    )]
    Splice(std::io::Error),
    /// See [`cgroup::CgroupError`].
    #[error(transparent)]
    Cgroup(#[from] crate::capture::cgroup::CgroupError),
    /// See [`features::FeatureError`].
    #[error(transparent)]
    Kernel(#[from] crate::capture::features::FeatureError),
    /// A listening socket taken over from the running agent could not be used.
    #[error(
        "cannot serve on the {name} socket taken from the running agent: {source} (stop that agent, or move its handover socket away, and start again)"
    )]
    Adopt {
        /// The socket's name.
        name: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Why one pod could not be enrolled; the others are unaffected.
#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error("pod {pod}: {source}")]
    Netns {
        pod: ObjectKey,
        source: crate::capture::netns::NetnsError,
    },
    #[error("pod {pod}: {source}")]
    Bpf {
        pod: ObjectKey,
        source: bpf::BpfError,
    },
    #[error("pod {pod}: starting listeners: {source}")]
    Io {
        pod: ObjectKey,
        source: std::io::Error,
    },
}

/// The running agent: what admin handlers and the reconcile loop share.
#[derive(Debug)]
pub struct Agent {
    dataplane: Mutex<Dataplane>,
    inputs: Arc<ProxyInputs>,
    /// The mesh's trust domain.
    trust_domain: String,
    /// The running pod proxies; the published view lists their pods.
    pods: Mutex<BTreeMap<ObjectKey, PodProxy>>,
    problems: Mutex<Vec<String>>,
    /// Kubernetes discovery's watches (for readiness); `None` in local mode.
    kube: Option<Arc<kube::watch::Shared>>,
    /// Pods' cgroups must be below this one.
    pod_cgroup_root: Option<PathBuf>,
    /// The kernel's counters and map fill levels (also on `/metrics`).
    kernel: Arc<bpf::collector::KernelCollector>,
    /// What the kernel offered at start.
    kernel_features: KernelFeatures,
    /// How pod-proxy hops bypass TCP: "off", "budget" or "paced" (see `start_loop_bypass`).
    loop_bypass: &'static str,
    /// Run-time log level.
    pub logging: admin::LogControl,
    /// Sockets taken from the agent this one succeeds, until it serves.
    handed: Mutex<Option<handover::Taken>>,
    /// Copies of the admin, probe and metrics listeners, for a successor.
    own_sockets: Vec<(&'static str, std::net::TcpListener)>,
    /// The inode of the agent's own network namespace, where those listen.
    netns_inode: u64,
    /// Ends the admin, probe and metrics accept loops once a successor serves.
    accepting: tokio_util::sync::CancellationToken,
    /// Whether a discovered state has been reconciled yet. Until then the published state is
    /// the empty one, with no pod missing from it: without this, an agent whose Kubernetes
    /// watches had synced but whose first state was still being applied looked ready, and a
    /// successor told its predecessor it served before it had its pods' listeners.
    applied: std::sync::atomic::AtomicBool,
}

impl admin::AdminView for Agent {
    fn not_ready_reason(&self) -> Option<String> {
        Agent::not_ready_reason(self)
    }
    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(Agent::stats(self)).unwrap_or_default()
    }
    fn config_dump(&self) -> serde_json::Value {
        Agent::config_dump(self)
    }
    fn flows(&self) -> &crate::telemetry::flows::FlowLog {
        &self.inputs.flows
    }
    fn snapshot(&self) -> Arc<Snapshot> {
        self.inputs.view.load()
    }
    fn logging(&self) -> &admin::LogControl {
        &self.logging
    }
}

impl Agent {
    /// Why the agent is not ready, if it is not: ready means every pod in the node file is
    /// enrolled with programs, maps and listeners in place, and has a valid certificate.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(why) = self.kube.as_ref().and_then(|k| k.not_ready_reason()) {
            return Some(why);
        }
        if !self.applied.load(std::sync::atomic::Ordering::Acquire) {
            return Some("the discovered state is not applied yet".into());
        }
        let state = self.current_state();
        let pods = self.pods.lock();
        let missing: Vec<String> = state
            .pods
            .keys()
            .filter(|k| !pods.contains_key(k))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            return Some(format!("pods not yet enrolled: {}", missing.join(", ")));
        }
        self.inputs
            .certs
            .not_ready_reason()
            .map(|why| format!("certificates missing: {why}"))
    }

    /// The state of the published view.
    fn current_state(&self) -> Arc<NodeState> {
        self.inputs.view.load().state().clone()
    }

    /// A snapshot of every counter.
    pub fn stats(&self) -> Stats {
        // Before the locks below: it takes the pods' lock itself.
        let not_ready = self.not_ready_reason();
        let dp = self.dataplane.lock();
        let pods = self.pods.lock();
        let state = self.current_state();
        let reports = pods
            .iter()
            .map(|(k, p)| {
                let l = &p.local;
                (
                    k.to_string(),
                    PodReport {
                        ip: l.pod.ip,
                        identity: l.identity().to_string(),
                        mtls_mode: state.mtls_mode(&l.pod),
                        kernel: dp.pod_stats(&l.pod, l.netns.cookie()),
                        proxy: serde_json::to_value(&*l.counters).unwrap_or_default(),
                    },
                )
            })
            .collect();
        Stats {
            node: state.node.clone(),
            pid: std::process::id(),
            not_ready,
            adopted_maps: dp.adopted_maps(),
            link_updates: dp.link_updates(),
            connections: self.inputs.drain.report(),
            pods: reports,
            certificates: self.inputs.certs.report(),
            trust_roots: self.inputs.certs.trust_roots(),
            ktls: support::KtlsReport {
                enabled: self.inputs.ktls,
                connections: crate::transport::ktls::counts(),
            },
            heap: support::HeapReport::now(),
            authorization_policies: state
                .authorization_policies
                .iter()
                .map(|p| p.key.to_string())
                .collect(),
            http_routes: state
                .http_routes
                .iter()
                .map(|r| r.key.to_string())
                .collect(),
            destination_rules: state
                .traffic_policies
                .values()
                .filter_map(|p| p.rule.as_ref().map(ToString::to_string))
                .collect(),
            problems: self.problems.lock().clone(),
            hbone_pool_connections: self.inputs.dialer.hbone.connections(),
            workloads: state.workloads.len(),
            services: state.services.len(),
        }
    }

    /// The connection-handling side, for `explain` and `/debug/flows`.
    pub fn inputs(&self) -> &Arc<ProxyInputs> {
        &self.inputs
    }

    /// Everything the agent is working from, for `/config_dump`: the state (pods, workloads,
    /// services, routes, policies), certificates without their keys, and the BPF maps
    /// summarized.
    pub fn config_dump(&self) -> serde_json::Value {
        let state = self.current_state();
        let enrolled: Vec<String> = self.pods.lock().keys().map(ToString::to_string).collect();
        let (maps, events) = self.kernel.summary();
        serde_json::json!({
            "node": state.node,
            "enrolled": enrolled,
            "state": &*state,
            "certificates": self.inputs.certs.report(),
            "trust_roots": self.inputs.certs.trust_roots(),
            "bpf": { "maps": maps, "events": events },
            "kernel_features": self.kernel_features.features,
            "loop_bypass": self.loop_bypass,
            "problems": self.problems.lock().clone(),
        })
    }

    /// Makes the kernel and the proxy match `state`.
    fn reconcile(&self, state: NodeState, problems: Vec<String>) {
        self.inputs.metrics.observe(&state);
        let mut dp = self.dataplane.lock();
        let mut pods = self.pods.lock();
        let mut problems = problems;

        if let Err(e) = dp.set_excluded_ports(&state.excluded_ports) {
            problems.push(e.to_string());
        }
        // Stop pods that left or moved to another sandbox; a label change keeps the pod.
        let gone: Vec<ObjectKey> = pods
            .iter()
            .filter(|(k, p)| {
                state
                    .pods
                    .get(*k)
                    .is_none_or(|new| !new.same_sandbox(&p.local.pod))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(mut p) = pods.remove(&key) {
                p.stop();
                dp.unregister_pod(&p.local.pod, p.local.netns.cookie());
                info!(pod = %key, "pod removed from the mesh");
            }
        }
        let state = Arc::new(state);
        // Unpin every link that no desired pod owns (also cleans up after an earlier agent).
        let desired: Vec<&Pod> = state.pods.values().collect();
        match dp.detach_others(&desired) {
            Ok(removed) if !removed.is_empty() => info!(?removed, "detached stale links"),
            Ok(_) => {}
            Err(e) => problems.push(e.to_string()),
        }
        // Routes before new pods, so their first connections already see the new services; the
        // pods that left are out of the view from here on.
        let view = &self.inputs.view;
        // Labels select policies too: a label change re-decides live connections as a policy
        // change does.
        let before = view.load();
        let policy_changed = before.state().authorization_policies != state.authorization_policies
            || pods.keys().any(|k| {
                before.state().pods.get(k).map(|p| &p.labels)
                    != state.pods.get(k).map(|p| &p.labels)
            });
        view.publish(&state, pods.values().map(|p| p.local.clone()));
        // Certificates for exactly the identities of this node's pods; after the publish, since
        // the embedded CA (Kubernetes mode) authorizes from the published state.
        let td = &self.trust_domain;
        self.inputs.certs.set_wanted(
            state
                .pods
                .values()
                .map(|p| Identity::new(td, &p.key.namespace, &p.service_account)),
        );
        if policy_changed {
            let now = view.load();
            for proxy in pods.values() {
                admission::recheck(&now, &proxy.local);
            }
        }
        for pod in state.pods.values() {
            // Every pass, so a PeerAuthentication change applies to running pods too.
            let strict = state.mtls_mode(pod) == MtlsMode::Strict;
            let ports: Vec<(u16, bool)> = state
                .mtls_port_overrides(pod)
                .into_iter()
                .map(|(port, mode)| (port, mode == MtlsMode::Strict))
                .collect();
            for ip in pod.ips() {
                if let Err(e) = dp
                    .set_strict(ip, strict)
                    .and_then(|()| dp.set_port_modes(ip, &ports))
                {
                    problems.push(format!("pod {}: {e}", pod.key));
                }
            }
            if pods.contains_key(&pod.key) {
                continue;
            }
            match self.enroll(&mut dp, pod, strict) {
                Ok((proxy, adopted)) => {
                    info!(pod = %pod.key, ip = %pod.ip, adopted_links = adopted, strict, "pod enrolled");
                    pods.insert(pod.key.clone(), proxy);
                    // At once, as its capture is already on: an HBONE stream for it must find
                    // it in the view.
                    view.publish_pods(pods.values().map(|p| p.local.clone()));
                }
                Err(e) => {
                    error!("{e}");
                    problems.push(e.to_string());
                }
            }
        }
        *self.problems.lock() = problems;
    }

    /// Copies of every listening socket, by name, for a successor agent.
    fn handover_offer(&self) -> Vec<(String, std::os::fd::OwnedFd)> {
        let mut out: Vec<(String, std::os::fd::OwnedFd)> = Vec::new();
        for (name, l) in &self.own_sockets {
            match l.try_clone() {
                Ok(c) => out.push((format!("{name}/{}", self.netns_inode), c.into())),
                Err(e) => error!("handover: cannot copy the {name} listener: {e}"),
            }
        }
        for p in self.pods.lock().values() {
            let pod = &p.local.pod;
            match p.sockets() {
                Ok(sockets) => out.extend(sockets.into_iter().map(|(role, fd)| {
                    (
                        handover::pod_socket(&pod.key.to_string(), netns_inode(pod), role),
                        fd,
                    )
                })),
                Err(e) => {
                    error!(pod = %pod.key, "handover: cannot copy the pod's listeners: {e}; the successor opens its own")
                }
            }
        }
        out
    }

    /// Stops accepting anywhere: a successor serves on the same sockets. Reconciling stopped
    /// before (the successor owns the kernel side now).
    fn stop_accepting(&self) {
        self.accepting.cancel();
        for p in self.pods.lock().values_mut() {
            p.stop();
        }
    }

    fn enroll(
        &self,
        dp: &mut Dataplane,
        pod: &Pod,
        strict: bool,
    ) -> Result<(PodProxy, usize), EnrollError> {
        let key = || pod.key.clone();
        let netns = Arc::new(
            Netns::enter(&pod.netns, &pod.key.file_stem())
                .map_err(|source| EnrollError::Netns { pod: key(), source })?,
        );
        dp.register_pod(pod, netns.cookie())
            .and_then(|()| pod.ips().try_for_each(|ip| dp.set_strict(ip, strict)))
            .map_err(|source| EnrollError::Bpf { pod: key(), source })?;
        let listeners = {
            let mut handed = self.handed.lock();
            let name =
                |role: &str| handover::pod_socket(&pod.key.to_string(), netns_inode(pod), role);
            listen::open_listeners(&netns, pod, &mut |role| {
                handed.as_mut().and_then(|h| h.take(&name(role)))
            })
            .map_err(|source| EnrollError::Netns { pod: key(), source })?
        };
        pod.ips()
            .try_for_each(|ip| {
                dp.set_listener(ip, ListenerKind::Inbound, &listeners.inbound)?;
                dp.set_listener(ip, ListenerKind::Hbone, &listeners.hbone)
            })
            .map_err(|source| EnrollError::Bpf { pod: key(), source })?;
        let adopted = dp
            .attach_pod(pod)
            .map_err(|source| EnrollError::Bpf { pod: key(), source })?;
        let proxy = PodProxy::start(
            pod.clone(),
            netns,
            listeners,
            &self.trust_domain,
            self.inputs.clone(),
        )
        .map_err(|source| EnrollError::Io { pod: key(), source })?;
        Ok((proxy, adopted))
    }
}

/// Runs the agent until SIGINT or SIGTERM. Capture stays in place on exit (fail closed);
/// `mesh-agent uninstall` removes it.
pub async fn run(config: Config, logging: admin::LogControl) -> Result<(), AppError> {
    bpf::preflight(&config.bpffs)?;
    // Before anything is loaded or pinned: a kernel without a must-have is refused by name.
    let mut kernel_features = KernelFeatures::probe(&config.pretend_missing);
    kernel_features.record(
        TLS_ULP,
        crate::transport::ktls::available().map_err(ToString::to_string),
        &config.pretend_missing,
    );
    kernel_features.log();
    kernel_features.require()?;
    if let Some(dir) = &config.cgroup {
        crate::capture::cgroup::join(dir)?;
    }
    let pin_root = config.pin_root();
    // A node file is read now, so a bad one stops the start; Kubernetes starts watching, and
    // nothing is reconciled until the whole cluster has been listed.
    let (source, pod_cgroup_root) = match &config.discovery {
        DiscoverySource::NodeFile(path) => {
            let applied = nodefile::read(path)?;
            let loaded =
                nodefile::load_text(path, &applied, None, config.pod_cgroup_root.as_deref())?;
            let source = Source::File {
                path: path.clone(),
                applied,
                loaded: Box::new(loaded),
            };
            (source, config.pod_cgroup_root.clone())
        }
        DiscoverySource::Kubernetes(k) => {
            let discovery = kube::start(kube_settings(k)).await?;
            let root = config
                .pod_cgroup_root
                .clone()
                .unwrap_or_else(|| k.kubelet_cgroup_root.clone());
            (Source::Kube(discovery), Some(root))
        }
    };
    let (mut dataplane, orig_dst, splice) = Dataplane::load(&config.bpf_object, &pin_root)?;
    if let Some(ring) = dataplane.take_kernel_log() {
        tokio::spawn(bpf::log::forward(ring));
    }
    info!(
        pin_root = %pin_root.display(),
        adopted_maps = dataplane.adopted_maps(),
        "eBPF programs loaded"
    );
    let bypass = start_loop_bypass(
        &mut dataplane,
        config.loop_bypass,
        kernel_features.has(PROG_TRACING),
    )?;
    // An agent already running here (an upgrade): take its listening sockets, so no connect
    // is refused between the two.
    let mut handed = match handover::take(&config.handover_socket) {
        Ok(Some(t)) => {
            info!(
                sockets = t.left(),
                "handover: took the running agent's listening sockets; it keeps serving until this agent is ready"
            );
            Some(t)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    };
    // Only from an agent in this network namespace: a DaemonSet pod without hostNetwork has
    // its own, where the predecessor's admin, probe and metrics sockets would be unreachable.
    // Read here, on the main thread before any pod is entered (a thread that entered a pod's
    // namespace, or one it spawned, would read another).
    let here = own_netns_inode();
    let mut own = |name: &'static str| {
        handed
            .as_mut()
            .and_then(|h| h.take(&format!("{name}/{here}")))
            .map(|fd| (name, fd))
    };
    let admin_listener = match own(ADMIN) {
        Some(fd) => adopt(fd)?,
        None => admin::bind(config.admin_addr).await?,
    };
    let probe_listener = match own(PROBES) {
        Some(fd) => adopt(fd)?,
        None => admin::bind_probes(config.probe_addr).await?,
    };
    let metrics_listener = match own(METRICS) {
        Some(fd) => adopt(fd)?,
        None => crate::telemetry::metrics::bind(config.metrics_addr).await?,
    };
    let own_sockets = [
        (ADMIN, &admin_listener),
        (PROBES, &probe_listener),
        (METRICS, &metrics_listener),
    ]
    .into_iter()
    .map(|(name, l)| {
        use std::os::fd::AsFd;
        let copy = l.as_fd().try_clone_to_owned();
        copy.map(|fd| (name, std::net::TcpListener::from(fd)))
            .map_err(|source| AppError::Adopt { name, source })
    })
    .collect::<Result<Vec<_>, _>>()?;
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new(
        config.metrics_retention,
        &config.cluster_id,
    )?);
    let kernel = Arc::new(bpf::collector::KernelCollector::open(
        &pin_root.join("maps"),
    )?);
    metrics.register(Box::new(SharedCollector(kernel.clone())))?;
    metrics.register(Box::new(
        kernel_features_gauge(&kernel_features)
            .map_err(crate::telemetry::metrics::MetricsError::from)?,
    ))?;
    let view = Arc::new(View::new(&config.trust_domain));
    let ca = match &config.ca {
        CaSource::Embedded { dir, ttl } => {
            let ca = ca::Ca::open(dir, &config.trust_domain, *ttl)?;
            info!(dir = %dir.display(), ttl = ?ttl, "embedded CA ready");
            let authorize = match &source {
                Source::File { path, loaded, .. } => {
                    let (node, node_file) = (loaded.state.node.clone(), path.clone());
                    ca::Authorizer(Arc::new(move |id| {
                        crate::ca_server::authorize_node(&node, &node_file, id)
                    }))
                }
                // The published state lists this node's pods before any is enrolled.
                Source::Kube(_) => {
                    let view = view.clone();
                    ca::Authorizer(Arc::new(move |id| {
                        crate::ca_server::authorize_in(view.load().state(), id)
                    }))
                }
            };
            CaClient::Embedded {
                ca: Arc::new(ca),
                authorize,
            }
        }
        CaSource::Remote {
            addr,
            token_file,
            bundle,
        } => CaClient::Remote {
            addr: addr.clone(),
            token_file: token_file.clone(),
            bundle_file: bundle.clone(),
            trust_domain: config.trust_domain.clone(),
        },
    };

    // Before any TLS config is built: they differ when connections go to the kernel.
    let (wanted, why_off) = crate::transport::ktls::configure(config.ktls);
    let ktls = match (wanted && kernel_features.has(TLS_ULP), why_off) {
        (true, _) => {
            info!("kTLS: on; HBONE connections move to the kernel after the handshake");
            true
        }
        (false, Some(e)) => {
            info!("kTLS: off: {e}");
            false
        }
        (false, None) if config.ktls => {
            info!("kTLS: off: kernel feature {TLS_ULP} reported missing");
            false
        }
        (false, None) => {
            info!("kTLS: off (--ktls=false); HBONE stays on rustls");
            false
        }
    };
    let certs = CertManager::new(ca, ktls);
    let drain = Drain::default();
    metrics.register(Box::new(
        CertCollector::new(certs.clone()).map_err(crate::telemetry::metrics::MetricsError::from)?,
    ))?;
    let agent = Arc::new(Agent {
        dataplane: Mutex::new(dataplane),
        inputs: Arc::new(ProxyInputs {
            view,
            orig_dst,
            splice: if config.same_node_splice && bypass == loop_enabled::OFF {
                Some(
                    crate::transport::splice::Splicer::start(
                        splice,
                        config.same_node_splice_after_bytes,
                    )
                    .map_err(AppError::Splice)?,
                )
            } else {
                None
            },
            certs: certs.clone(),
            ktls,
            dialer: Dialer {
                hbone: hbone::Pool::new(
                    config.hbone_idle_timeout,
                    certs.clone(),
                    &config.trust_domain,
                    (ktls, drain.closing().clone()),
                ),
            },
            http_pool: Arc::default(),
            flows: crate::telemetry::flows::FlowLog::new(config.access_log, &metrics)?,
            metrics: metrics.clone(),
            http_timeouts: config.http,
            drain,
            limits: ConnLimits {
                node: config.connection_limits.0,
                pod: config.connection_limits.1,
            },
        }),
        trust_domain: config.trust_domain.clone(),
        pods: Mutex::new(BTreeMap::new()),
        problems: Mutex::new(Vec::new()),
        kube: match &source {
            Source::Kube(d) => Some(d.shared.clone()),
            Source::File { .. } => None,
        },
        pod_cgroup_root,
        kernel,
        kernel_features: kernel_features.clone(),
        loop_bypass: loop_enabled::name(bypass),
        logging,
        handed: Mutex::new(handed),
        own_sockets,
        netns_inode: here,
        accepting: tokio_util::sync::CancellationToken::new(),
        applied: std::sync::atomic::AtomicBool::new(false),
    });
    // Who to ask, at SIGTERM, whether this is an uninstall.
    let own_pod = match (&source, &config.discovery) {
        (Source::Kube(d), DiscoverySource::Kubernetes(k)) => {
            k.own_pod.clone().map(|p| (d.client.clone(), p))
        }
        _ => None,
    };
    let follow = match source {
        Source::File {
            path,
            applied,
            loaded,
        } => {
            apply(&agent, *loaded, Vec::new());
            tokio::spawn(watch_node_file(
                agent.clone(),
                path,
                config.poll_interval,
                applied,
            ))
        }
        Source::Kube(d) => tokio::spawn(follow_kubernetes(agent.clone(), d.updates)),
    };
    for (listener, scope) in [
        (admin_listener, admin::Scope::All),
        (probe_listener, admin::Scope::Probes),
    ] {
        let (agent, stop) = (agent.clone(), agent.accepting.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = admin::serve(listener, agent, scope) => {}
                () = stop.cancelled() => {}
            }
        });
    }
    crate::telemetry::metrics::start(metrics_listener, metrics, agent.accepting.clone())?;
    info!(admin = %config.admin_addr, probes = %config.probe_addr, metrics = %config.metrics_addr, "agent running");
    let (handed_tx, handed_rx) = tokio::sync::oneshot::channel();
    // Fires when a successor serves; never, if this agent could not offer its sockets.
    let mut handed_over = std::pin::pin!(async move {
        if handed_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    });
    tokio::spawn(serve_then_offer(
        agent.clone(),
        config.handover_socket.clone(),
        config.drain_timeout,
        handed_tx,
    ));

    let mut term = std::pin::pin!(shutdown_signal());
    let mut termed = false;
    let successor = tokio::select! {
        () = term.as_mut() => { termed = true; false }
        () = handed_over.as_mut() => true,
    };
    let drain = agent.inputs().drain.clone();
    if successor {
        // The successor accepts on our sockets and owns the kernel side: stop both here, and
        // let what we accepted finish.
        follow.abort();
        agent.stop_accepting();
        drain.start();
        let left = finish(&drain, config.drain_timeout).await;
        info!(left, "handover: drained");
        if own_pod.is_some() && !termed {
            // Exiting on our own would have the kubelet restart this container, which would
            // then take the sockets back: wait for the rollout to delete this pod.
            term.as_mut().await;
        }
        agent.inputs().flows.close();
        return Ok(());
    }
    follow.abort();
    let stop = match own_pod {
        Some((client, (ns, name))) => {
            let asked = kube::stop_kind(&client, &ns, &name);
            tokio::time::timeout(Duration::from_secs(5), asked)
                .await
                .unwrap_or_else(|_| kube::Stop::Restart("the API did not answer within 5 s".into()))
        }
        None => kube::Stop::Restart("not in Kubernetes, or no --pod-name".into()),
    };
    match &stop {
        kube::Stop::Uninstall(why) => {
            tracing::warn!(
                "{why}: the mesh is being uninstalled; removing capture, pods fall back to plain networking"
            );
            Dataplane::uninstall(&pin_root)?;
            info!(pin_root = %pin_root.display(), "capture removed");
        }
        kube::Stop::Restart(why) => {
            info!(
                "shutting down ({why}); capture stays in place until an agent is back or `mesh-agent uninstall`"
            );
        }
    }
    // Still accepting (a refused connect is all the alternative), and a successor can still
    // take over; open connections get until the drain deadline.
    drain.start();
    let left = tokio::select! {
        left = finish(&drain, config.drain_timeout) => left,
        () = handed_over.as_mut() => {
            agent.stop_accepting();
            finish(&drain, config.drain_timeout).await
        }
    };
    if left > 0 {
        info!(left, "exiting with connections open");
    }
    agent.inputs().flows.close();
    Ok(())
}

/// Waits up to `timeout` for the open connections to end; past it, closes the TLS ones with
/// close_notify and gives them a moment to go. Returns how many are left.
async fn finish(drain: &Drain, timeout: Duration) -> usize {
    let left = drain.until_idle(timeout).await;
    if left == 0 {
        return 0;
    }
    info!(left, deadline = ?timeout, "drain deadline passed; closing the connections left (TLS with close_notify)");
    drain.close_all();
    drain.until_idle(Duration::from_secs(1)).await
}

/// Names of the agent's own listeners in a handover.
const ADMIN: &str = "admin";
const PROBES: &str = "probes";
const METRICS: &str = "metrics";

/// A listening socket taken from the running agent, ready for tokio.
fn adopt(
    (name, fd): (&'static str, std::os::fd::OwnedFd),
) -> Result<tokio::net::TcpListener, AppError> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(l))
        .map_err(|source| AppError::Adopt { name, source })
}

/// The inode of this process's network namespace.
fn own_netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino())
}

/// The inode of a pod's network namespace: part of its sockets' names in a handover, so a
/// recreated pod never gets its predecessor's.
fn netns_inode(pod: &Pod) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(&pod.netns).map_or(0, |m| m.ino())
}

/// Once this agent is ready: tells the agent it took sockets from (if any) that it serves,
/// then offers its own sockets to the next one. `handed_over` fires when a successor serves.
async fn serve_then_offer(
    agent: Arc<Agent>,
    path: PathBuf,
    patience: Duration,
    handed_over: tokio::sync::oneshot::Sender<()>,
) {
    let since = std::time::Instant::now();
    while let Some(why) = agent.not_ready_reason() {
        if since.elapsed() > patience.max(Duration::from_secs(60)) {
            tracing::warn!(
                "handover: not ready after {:?} ({why}); serving anyway",
                since.elapsed()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken = agent.handed.lock().take();
    if let Some(taken) = taken {
        let unused = taken.left();
        match taken.serving() {
            Ok(()) => info!(
                unused,
                "handover: serving; the previous agent stops accepting and drains"
            ),
            Err(e) => tracing::warn!("{e}"),
        }
    }
    let offerer = match handover::Offerer::bind(&path) {
        Ok(o) => o,
        Err(e) => {
            error!("{e}; an upgrade of this agent will refuse connects while it restarts");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            offerer.hand_over(|| agent.handover_offer());
            let _ = handed_over.send(());
        });
}

/// Starts the loopback bypass if it is wanted and the agent has a cgroup of its own to watch;
/// returns how it runs (a `loop_enabled` value). Without it every hop stays on TCP, which is
/// correct, only slower. `tracing`: whether the kernel allows the reader counter that paces it.
fn start_loop_bypass(dp: &mut Dataplane, want: bool, tracing: bool) -> Result<u32, AppError> {
    let off = |dp: &mut Dataplane, why: &str| {
        info!("loopback bypass: off: {why}");
        dp.set_loop_bypass(loop_enabled::OFF)
            .map(|()| loop_enabled::OFF)
    };
    if !want {
        return Ok(off(dp, "--loop-bypass=false")?);
    }
    let dir = match crate::capture::cgroup::own() {
        Ok(dir) => dir,
        Err(e) => return Ok(off(dp, &e.to_string())?),
    };
    if crate::capture::cgroup::is_root(&dir) {
        let why = format!(
            "the agent runs in the root cgroup {}, where its sock_ops program would see every socket of the node; give it a cgroup of its own (--cgroup)",
            dir.display()
        );
        return Ok(off(dp, &why)?);
    }
    let adopted = dp.attach_proxy(&dir)?;
    // Paced where the kernel lets the reader's counter attach; a lifetime budget where not.
    let how = if !tracing {
        info!(
            "loopback bypass: paced by a lifetime budget: this kernel refuses tracing programs (prog_tracing)"
        );
        loop_enabled::BUDGET
    } else {
        match dp.attach_loop_pacing() {
            Ok(adopted) => {
                info!(adopted, "loopback bypass: paced by its readers");
                loop_enabled::PACED
            }
            Err(e) => {
                warn!(
                    "loopback bypass: paced by a lifetime budget: the reader counter did not attach: {e}"
                );
                loop_enabled::BUDGET
            }
        }
    };
    dp.set_loop_bypass(how)?;
    info!(
        cgroup = %dir.display(),
        adopted,
        paced = how == loop_enabled::PACED,
        "loopback bypass: on; pod-proxy hops skip TCP, same-node connections are relayed"
    );
    Ok(how)
}

/// Where the node's state comes from, once started.
enum Source {
    /// A node file, with the text applied at start and what it held.
    File {
        path: PathBuf,
        applied: String,
        loaded: Box<nodefile::Loaded>,
    },
    /// The Kubernetes API.
    Kube(kube::Discovery),
}

/// Reconciles `loaded`; `waiting` lists pods that cannot be enrolled yet, and why.
fn apply(agent: &Agent, loaded: nodefile::Loaded, waiting: Vec<String>) {
    let problems: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
    for p in &problems {
        error!("{p}");
    }
    let mut problems = problems;
    problems.extend(
        waiting
            .into_iter()
            .map(|w| format!("not enrolled yet: {w}")),
    );
    agent.reconcile(loaded.state, problems);
    agent
        .applied
        .store(true, std::sync::atomic::Ordering::Release);
}

/// Applies each complete view Kubernetes discovery builds, validated as a node file is.
async fn follow_kubernetes(agent: Arc<Agent>, updates: Arc<kube::Latest>) {
    loop {
        let update = updates.next().await;
        let task_agent = agent.clone();
        // Validation and reconcile run on the blocking pool, as for the node file.
        let _ = tokio::task::spawn_blocking(move || {
            let agent = task_agent;
            let previous = agent.current_state();
            match nodefile::load_raw(
                update.file,
                update.errors,
                Some(&previous),
                agent.pod_cgroup_root.as_deref(),
            ) {
                Ok(loaded) => apply(&agent, loaded, update.waiting),
                Err(e) => {
                    error!("{e}; still serving the previous state");
                    agent.problems.lock().push(e.to_string());
                }
            }
        })
        .await;
    }
}

/// Polls the node file's contents. Polling (rather than inotify) also sees files replaced by
/// rename, which is how editors and ConfigMap updates write them.
async fn watch_node_file(agent: Arc<Agent>, path: PathBuf, every: Duration, applied: String) {
    // What start-up applied, not a first reading here: a change written between the two (say,
    // right after /ready) would otherwise become the baseline and never be applied.
    // Shared with each poll's task rather than copied into it: the file may be megabytes.
    let mut last = Some(Arc::new(applied));
    loop {
        tokio::time::sleep(every).await;
        // Reading, parsing and reconciling all run on the blocking pool: the file is input, and
        // however large or nested it is, the proxy's workers keep serving.
        let task_agent = agent.clone();
        let seen = last.clone();
        let path = path.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let agent = task_agent;
            let now = nodefile::read(&path);
            if now.as_ref().ok() == seen.as_deref() {
                return None;
            }
            let text = now.as_ref().ok().map(|t| Arc::new(t.clone()));
            let previous = agent.current_state();
            let result = now.and_then(|text| {
                nodefile::load_text(
                    &path,
                    &text,
                    Some(&previous),
                    agent.pod_cgroup_root.as_deref(),
                )
            });
            match result {
                Ok(loaded) => {
                    info!(file = %path.display(), "node file changed; reconciling");
                    apply(&agent, loaded, Vec::new());
                }
                Err(e) => {
                    error!("{e}; still serving the previous configuration");
                    agent.problems.lock().push(e.to_string());
                }
            }
            Some(text)
        })
        .await;
        if let Ok(Some(text)) = outcome {
            last = text;
        }
    }
}
