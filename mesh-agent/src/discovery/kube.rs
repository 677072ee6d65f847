//! Kubernetes discovery: the API server's Pods, Namespaces, Services, EndpointSlices, Istio
//! policies and Gateway API routes, and this node's pods found on disk, become the same node-file
//! model the local mode reads (`World::raw_file`), validated by the same code.
//!
//! - `watch`: a kube-rs watcher per kind, with backoff and relist, into a shared `World`;
//! - `world`: the few fields kept of each object, enrollment, and the model built from them;
//! - `podfs`: a pod's cgroup and netns on this node from its UID, with no CNI plugin.
//!
//! Nothing is published until every kind has been listed once, so an agent that starts while
//! the API server is away keeps the capture it had (pinned in bpffs), failing closed, and
//! reconciles only when it can see the whole cluster again.

pub mod podfs;
pub mod watch;
pub mod world;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tracing::{debug, info};

use super::nodefile::{ObjectError, raw::RawFile};
use podfs::{Found, PodFs};
use watch::Shared;
use world::Enrollment;

/// Errors starting Kubernetes discovery.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No usable kubeconfig or in-cluster service account.
    #[error(
        "cannot configure the Kubernetes client: {0} (set --kubeconfig, or run in a pod with a service account)"
    )]
    Config(String),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// What Kubernetes discovery needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name (the DaemonSet passes `spec.nodeName` as `NODE_NAME`).
    pub node: String,
    /// A kubeconfig file; in-cluster configuration when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// Which labels enroll pods.
    pub enrollment: Enrollment,
    /// Istio's root namespace.
    pub root_namespace: String,
    /// Where the kubelet's pod cgroups and the node's processes are.
    pub podfs: PodFs,
}

/// One complete view of the cluster, ready to validate and reconcile.
#[derive(Debug)]
pub struct Update {
    /// The model, as a node file would hold it.
    pub file: RawFile,
    /// Objects that could not be read.
    pub errors: Vec<ObjectError>,
    /// Enrolled pods of this node not enrolled yet, and why (the sandbox is starting, say).
    pub waiting: Vec<String>,
}

/// The newest view not yet taken: a slow consumer skips the views it had no time for.
#[derive(Debug, Default)]
pub struct Latest {
    slot: Mutex<Option<Update>>,
    ready: Notify,
}

impl Latest {
    fn put(&self, u: Update) {
        *self.slot.lock() = Some(u);
        self.ready.notify_one();
    }

    /// Waits for a view newer than the last one taken.
    pub async fn next(&self) -> Update {
        loop {
            if let Some(u) = self.slot.lock().take() {
                return u;
            }
            self.ready.notified().await;
        }
    }
}

/// A running discovery.
pub struct Discovery {
    /// Complete views of the cluster.
    pub updates: Arc<Latest>,
    /// The API client, for questions beside the watches (is the mesh being uninstalled?).
    pub client: kube::Client,
    /// The watches' state, for readiness and `status`.
    pub shared: Arc<Shared>,
}

/// Connects to the API server and starts watching; returns at once (the API server may be
/// away: the watches keep retrying).
pub async fn start(settings: Settings) -> Result<Discovery, KubeError> {
    let client = client(settings.kubeconfig.as_deref()).await?;
    let shared = Arc::new(Shared::default());
    watch::start(&client, &shared);
    let updates = Arc::new(Latest::default());
    tokio::spawn(build_loop(settings, shared.clone(), updates.clone()));
    Ok(Discovery {
        updates,
        shared,
        client,
    })
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// What stopping the agent means, by the agent's own DaemonSet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The DaemonSet is gone or being deleted: the mesh is being uninstalled.
    Uninstall(String),
    /// Anything else (a rolling update, a node drain, a deleted pod, an unanswered question):
    /// capture stays and enrolled traffic fails closed until an agent is back.
    Restart(String),
}

/// Tells an uninstall from a restart: the pod `ns/name`'s controlling DaemonSet is looked up;
/// only its absence, or its deletion in progress, is an uninstall. An API that does not answer
/// is a restart: removing capture on a guess would open the bypass this mesh must not have.
pub async fn stop_kind(client: &kube::Client, ns: &str, name: &str) -> Stop {
    use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
    let pod = match kube::Api::<Pod>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
    {
        Ok(Some(p)) => p,
        Ok(None) => return Stop::Restart(format!("own pod {ns}/{name} not found")),
        Err(e) => return Stop::Restart(format!("reading own pod {ns}/{name}: {e}")),
    };
    let owner = pod
        .metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|o| o.kind == "DaemonSet" && o.controller == Some(true));
    let Some(owner) = owner else {
        return Stop::Restart(format!("pod {ns}/{name} has no controlling DaemonSet"));
    };
    match kube::Api::<DaemonSet>::namespaced(client.clone(), ns)
        .get_opt(&owner.name)
        .await
    {
        Ok(None) => Stop::Uninstall(format!("DaemonSet {ns}/{} is gone", owner.name)),
        // Deleted and applied again: the new DaemonSet's agent takes the node over.
        Ok(Some(ds)) if ds.metadata.uid.as_deref() != Some(owner.uid.as_str()) => Stop::Restart(
            format!("DaemonSet {ns}/{} was replaced by a new one", owner.name),
        ),
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => {
            Stop::Uninstall(format!("DaemonSet {ns}/{} is being deleted", owner.name))
        }
        Ok(Some(_)) => Stop::Restart(format!("DaemonSet {ns}/{} is in place", owner.name)),
        Err(e) => Stop::Restart(format!("reading DaemonSet {ns}/{}: {e}", owner.name)),
    }
}

/// A client of the API server: from `kubeconfig`, or in a pod from its service account.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| KubeError::Config(e.to_string()))?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// How often pods of this node that were not found yet are looked for again.
const RETRY: Duration = Duration::from_millis(500);
/// How often the sandboxes of this node's enrolled pods are checked, with no change from the
/// API: a sandbox recreated under the same pod (new netns, same UID) shows up here first.
const RECHECK: Duration = Duration::from_secs(2);

/// Builds a view after each change (debounced), once every kind has been listed.
async fn build_loop(settings: Settings, shared: Arc<Shared>, out: Arc<Latest>) {
    let mut found: HashMap<String, Found> = HashMap::new();
    let mut retry = false;
    loop {
        let wait = if retry { RETRY } else { RECHECK };
        let changed = tokio::time::timeout(wait, shared.changed.notified())
            .await
            .is_ok();
        // Nothing new from the API and every sandbox found is still there: nothing to build.
        if !changed && !retry && found.values().all(PodFs::still_valid) {
            continue;
        }
        tokio::time::sleep(watch::DEBOUNCE).await;
        if !shared.synced(watch::WATCHES) {
            continue;
        }
        let started = Instant::now();
        let (update, still_waiting) = {
            let world = shared.world.lock();
            let mut waiting = Vec::new();
            // Find this node's enrolled pods on disk; keep what was found while its sandbox
            // lives, so a pod keeps one netns path for its life.
            let mut seen = Vec::new();
            for (uid, p) in &world.pods {
                if p.node.as_deref() != Some(settings.node.as_str())
                    || !world.enrolled(p, &settings.enrollment)
                {
                    continue;
                }
                let Some(ip) = p.ip else {
                    waiting.push(format!("{}/{}: no address yet", p.namespace, p.name));
                    continue;
                };
                seen.push(uid.clone());
                if found.get(uid).is_some_and(PodFs::still_valid) {
                    continue;
                }
                match settings.podfs.find(uid, ip) {
                    Ok(f) => {
                        if found.insert(uid.clone(), f).is_some() {
                            info!(pod = %format!("{}/{}", p.namespace, p.name), "sandbox recreated; enrolling its new netns");
                        }
                    }
                    Err(e) => {
                        found.remove(uid);
                        waiting.push(format!("{}/{}: {e}", p.namespace, p.name));
                    }
                }
            }
            found.retain(|uid, _| seen.contains(uid));
            let (mut file, errors) = world.raw_file(&settings.node, &settings.enrollment, &found);
            file.mesh_config.root_namespace = Some(settings.root_namespace.clone());
            let retry = !waiting.is_empty();
            (
                Update {
                    file,
                    errors,
                    waiting,
                },
                retry,
            )
        };
        retry = still_waiting;
        debug!(took = ?started.elapsed(), "built the cluster view");
        out.put(update);
    }
}
