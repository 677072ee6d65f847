//! The watches: one kube-rs watcher per kind, each backing off and relisting after errors and
//! 410 Gone, each keeping its kind's few fields in the shared [`World`]. A relist replaces a
//! kind's objects only once the new list is complete, so a watch that fails half-way never
//! shows the proxy half a cluster.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, watcher},
};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::world::{PodInfo, PodInterner, ServiceInfo, SliceInfo, World, namespace_labels};

/// The Istio and Gateway API kinds watched, as (group, version, kind, plural).
pub const OBJECT_KINDS: [(&str, &str, &str, &str); 4] = [
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
];

/// The world, which kinds have completed their first list, and a wake-up for the builder.
#[derive(Debug, Default)]
pub struct Shared {
    /// What is known of the cluster.
    pub world: Mutex<World>,
    /// Kinds whose first list is complete, with when the latest relist completed.
    pub synced: Mutex<BTreeMap<&'static str, Instant>>,
    /// Kinds whose watch is failing, with the error, for `/ready` and `status`.
    pub failing: Mutex<BTreeMap<&'static str, String>>,
    /// Rung on every change.
    pub changed: Notify,
}

impl Shared {
    /// Whether every kind in `kinds` has been listed once: before that, a state built from the
    /// world would be missing pods, and reconciling it would release their capture.
    pub fn synced(&self, kinds: usize) -> bool {
        self.synced.lock().len() >= kinds
    }

    /// Why the agent cannot yet serve from the API: kinds not listed, or watches failing.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.synced(WATCHES) {
            return None;
        }
        Some(match self.failing.lock().iter().next() {
            Some((kind, e)) => format!("waiting for the Kubernetes API ({kind}: {e})"),
            None => "waiting for the first list from the Kubernetes API".to_string(),
        })
    }
}

/// How many watches [`start`] runs.
pub const WATCHES: usize = 4 + OBJECT_KINDS.len();

/// Starts every watch on `client`.
pub fn start(client: &Client, shared: &Arc<Shared>) {
    spawn(
        Api::<Namespace>::all(client.clone()),
        "namespaces",
        shared,
        namespace_labels,
        |w| &mut w.namespaces,
    );
    let interner = parking_lot::Mutex::new(PodInterner::default());
    spawn(
        Api::<Pod>::all(client.clone()),
        "pods",
        shared,
        move |p| {
            let uid = p.metadata.uid.clone()?;
            // Boxed: the map's nodes stay small, at ten thousand pods.
            Some((uid, Box::new(interner.lock().intern(PodInfo::from_pod(p)?))))
        },
        |w| &mut w.pods,
    );
    spawn(
        Api::<Service>::all(client.clone()),
        "services",
        shared,
        |s| ServiceInfo::from_service(s).map(|i| (format!("{}/{}", i.namespace, i.name), i)),
        |w| &mut w.services,
    );
    spawn(
        Api::<EndpointSlice>::all(client.clone()),
        "endpointslices",
        shared,
        |s| {
            let key = format!(
                "{}/{}",
                s.metadata.namespace.as_deref()?,
                s.metadata.name.as_deref()?
            );
            SliceInfo::from_slice(s).map(|i| (key, i))
        },
        |w| &mut w.slices,
    );
    for (group, version, kind, plural) in OBJECT_KINDS {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        spawn_dynamic(api, ar, plural, shared);
    }
}

/// One watch of a typed kind, kept in the world's map `slot` as `keep` extracts it.
fn spawn<K, V>(
    api: Api<K>,
    name: &'static str,
    shared: &Arc<Shared>,
    keep: impl Fn(&K) -> Option<(String, V)> + Send + 'static,
    slot: fn(&mut World) -> &mut BTreeMap<String, V>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    V: Send + 'static,
{
    let shared = shared.clone();
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default().any_semantic()).default_backoff();
        run(stream, name, &shared, keep, slot).await;
    });
}

/// A watch of an Istio or Gateway API kind, kept as the JSON the API sent.
fn spawn_dynamic(
    api: Api<DynamicObject>,
    ar: ApiResource,
    name: &'static str,
    shared: &Arc<Shared>,
) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let api_version = ar.api_version.clone();
        let kind = ar.kind.clone();
        let stream = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .map(move |e| {
                // Dynamic objects carry no type in list items; the node-file reader needs it.
                e.map(|e| {
                    e.modify(|o| {
                        o.types = Some(kube::api::TypeMeta {
                            api_version: api_version.clone(),
                            kind: kind.clone(),
                        });
                    })
                })
            });
        run(
            stream,
            name,
            &shared,
            |o: &DynamicObject| {
                let kind = o.types.as_ref().map_or("", |t| t.kind.as_str());
                let key = format!(
                    "{kind} {}/{}",
                    o.metadata.namespace.as_deref().unwrap_or("default"),
                    o.metadata.name.as_deref()?
                );
                serde_json::to_value(o).ok().map(|v| (key, v))
            },
            |w| &mut w.objects,
        )
        .await;
    });
}

async fn run<K, V, S>(
    stream: S,
    name: &'static str,
    shared: &Shared,
    keep: impl Fn(&K) -> Option<(String, V)>,
    slot: fn(&mut World) -> &mut BTreeMap<String, V>,
) where
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    // The relist in progress: it replaces what is kept only when complete.
    let mut pending: Option<BTreeMap<String, V>> = None;
    // Objects of other kinds share the `objects` map: a relist replaces only this kind's.
    let prefix_owned = slot_prefix(name);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                // The backoff retries; meanwhile the last state keeps serving.
                warn!(
                    watch = name,
                    "watch failed: {e}; retrying with backoff, serving the last state"
                );
                shared.failing.lock().insert(name, e.to_string());
                continue;
            }
        };
        shared.failing.lock().remove(name);
        let mut world = shared.world.lock();
        match event {
            watcher::Event::Init => pending = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                if let (Some(p), Some((k, v))) = (pending.as_mut(), keep(&o)) {
                    p.insert(k, v);
                }
            }
            watcher::Event::InitDone => {
                if let Some(p) = pending.take() {
                    let map = slot(&mut world);
                    match &prefix_owned {
                        Some(prefix) => map.retain(|k, _| !k.starts_with(prefix.as_str())),
                        None => map.clear(),
                    }
                    map.extend(p);
                }
                let first = shared.synced.lock().insert(name, Instant::now()).is_none();
                if first {
                    info!(watch = name, "listed");
                }
            }
            watcher::Event::Apply(o) => {
                if let Some((k, v)) = keep(&o) {
                    slot(&mut world).insert(k, v);
                }
            }
            watcher::Event::Delete(o) => {
                if let Some((k, _)) = keep(&o) {
                    slot(&mut world).remove(&k);
                }
            }
        }
        drop(world);
        shared.changed.notify_one();
    }
}

/// The key prefix of a dynamic kind in the shared `objects` map.
fn slot_prefix(name: &str) -> Option<String> {
    OBJECT_KINDS
        .iter()
        .find(|(_, _, _, plural)| *plural == name)
        .map(|(_, _, kind, _)| format!("{kind} "))
}

/// How long the builder waits after a change for more to arrive.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
