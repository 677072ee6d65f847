//! `mesh-agent ca --kubernetes`: the CA as a Deployment.
//!
//! - The root lives in a Secret, made by the first replica that finds none (creation is atomic in
//!   the API server, so racing replicas end with one root). Rotation steps rewrite the Secret
//!   whole, guarded by its resourceVersion; every replica re-reads it every few seconds.
//! - The trust bundle is published in a ConfigMap, which agents mount to check the CA itself.
//! - Agents send a projected service-account token with an audience of ours. TokenReview says
//!   whose it is; only the agents' service account is accepted, and the node is the one the
//!   token is bound to: the node-name extra where the API server sets it, else the bound pod's
//!   `spec.nodeName` (after checking the pod's UID, so a recreated pod's old token does not pass).
//! - An identity is signed only if a pod with its namespace and service account is scheduled on
//!   that node, as the API says at the time of the request.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{ConfigMap, Pod, Secret},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use parking_lot::Mutex;
use tracing::{info, warn};

use crate::identity::{
    Identity,
    ca::{BUNDLE, Ca, CaError, RootSet, RootSource, new_root_set},
};

/// Where the CA keeps its state in the cluster, and whom it serves.
#[derive(Debug, Clone)]
pub struct KubeCa {
    /// The CA's namespace: its Secret and the bundle ConfigMap live here.
    pub namespace: String,
    /// The Secret holding the root.
    pub root_secret: String,
    /// The ConfigMap the trust bundle is published in (key `bundle.pem`).
    pub bundle_configmap: String,
    /// The agents' service account's namespace.
    pub agent_namespace: String,
    /// The agents' service account.
    pub agent_service_account: String,
    /// The audience agents' tokens must carry.
    pub audience: String,
}

/// The extras TokenReview reports for a token bound to a pod.
const EXTRA_NODE: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// How often each replica re-reads the Secret and checks the published bundle.
const SYNC: Duration = Duration::from_secs(2);

fn api_err(what: &str) -> impl FnOnce(kube::Error) -> CaError + '_ {
    move |e| CaError::Kubernetes(format!("{what}: {e}"))
}

/// A root kept in a Secret: the last copy read from the API.
#[derive(Debug)]
pub struct SecretRoot {
    namespace: String,
    name: String,
    latest: Mutex<RootSet>,
}

impl SecretRoot {
    /// `cfg`'s root Secret as read in `secret`.
    fn of(cfg: &KubeCa, secret: &Secret) -> Self {
        Self {
            namespace: cfg.namespace.clone(),
            name: cfg.root_secret.clone(),
            latest: Mutex::new(set_of(secret)),
        }
    }
}

impl RootSource for SecretRoot {
    fn read(&self) -> Result<RootSet, CaError> {
        Ok(self.latest.lock().clone())
    }
    fn place(&self, key: &str) -> String {
        format!("Secret {}/{}, key {key}", self.namespace, self.name)
    }
}

fn set_of(secret: &Secret) -> RootSet {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

fn secret_of(cfg: &KubeCa, set: &RootSet, resource_version: Option<String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(cfg.root_secret.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "mesh".to_string(),
            )])),
            resource_version,
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            set.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// Reads the root Secret, creating it with a new root if there is none. Replicas starting
/// together race to create it; the losers read the winner's.
pub async fn root(
    client: &kube::Client,
    cfg: &KubeCa,
    trust_domain: &str,
) -> Result<Arc<SecretRoot>, CaError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let what = format!("Secret {}/{}", cfg.namespace, cfg.root_secret);
    for _ in 0..3 {
        if let Some(s) = api
            .get_opt(&cfg.root_secret)
            .await
            .map_err(api_err(&what))?
        {
            return Ok(Arc::new(SecretRoot::of(cfg, &s)));
        }
        let set = new_root_set(trust_domain)?;
        match api
            .create(&PostParams::default(), &secret_of(cfg, &set, None))
            .await
        {
            Ok(_) => {
                info!(secret = %what, "created a new CA root");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(api_err(&what)(e)),
        }
    }
    Err(CaError::Kubernetes(format!(
        "{what}: neither found nor created after 3 tries"
    )))
}

/// Keeps `root` current from the API, and the bundle ConfigMap equal to the bundle `ca` signs
/// with, until the process ends. A failed read keeps the last root: the CA goes on signing with
/// it.
pub fn keep_current(client: kube::Client, cfg: KubeCa, root: Arc<SecretRoot>, ca: Arc<Ca>) {
    tokio::spawn(async move {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
        let maps: Api<ConfigMap> = Api::namespaced(client, &cfg.namespace);
        loop {
            match secrets.get_opt(&cfg.root_secret).await {
                Ok(Some(s)) => *root.latest.lock() = set_of(&s),
                Ok(None) => warn!(
                    "Secret {}/{} is gone; signing with the root read before (restore the Secret, or restart the CA to make a new root, which every agent must then renew for)",
                    cfg.namespace, cfg.root_secret
                ),
                Err(e) => warn!(
                    "reading Secret {}/{}: {e}; signing with the root read before",
                    cfg.namespace, cfg.root_secret
                ),
            }
            // The server's own loop reloads the CA from this copy within a second, and re-makes
            // its serving certificate when the root changed; reloading here too would take that
            // change from it.
            if let Err(e) = publish_bundle(&maps, &cfg, &ca.bundle().to_pem()).await {
                warn!("{e}");
            }
            tokio::time::sleep(SYNC).await;
        }
    });
}

async fn publish_bundle(maps: &Api<ConfigMap>, cfg: &KubeCa, pem: &str) -> Result<(), CaError> {
    let what = format!("ConfigMap {}/{}", cfg.namespace, cfg.bundle_configmap);
    let current = maps
        .get_opt(&cfg.bundle_configmap)
        .await
        .map_err(api_err(&what))?;
    let published = current
        .as_ref()
        .and_then(|m| m.data.as_ref())
        .and_then(|d| d.get(BUNDLE));
    if published.map(String::as_str) == Some(pem) {
        return Ok(());
    }
    let map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(cfg.bundle_configmap.clone()),
            namespace: Some(cfg.namespace.clone()),
            resource_version: current.and_then(|m| m.metadata.resource_version),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(BUNDLE.to_string(), pem.to_string())])),
        ..ConfigMap::default()
    };
    let pp = PostParams::default();
    let r = if map.metadata.resource_version.is_some() {
        maps.replace(&cfg.bundle_configmap, &pp, &map).await
    } else {
        maps.create(&pp, &map).await
    };
    match r {
        Ok(_) => {
            info!(configmap = %what, "published the trust bundle");
            Ok(())
        }
        // Another replica wrote it meanwhile: the next round compares again.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(api_err(&what)(e)),
    }
}

/// Applies one rotation step to the root Secret. The write is conditional on the version read,
/// so two operators (or a replica creating the root) cannot lose each other's step.
pub async fn step(
    client: &kube::Client,
    cfg: &KubeCa,
    step: impl FnOnce(&RootSet, &dyn RootSource) -> Result<RootSet, CaError>,
) -> Result<(), CaError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let what = format!("Secret {}/{}", cfg.namespace, cfg.root_secret);
    let current = api
        .get_opt(&cfg.root_secret)
        .await
        .map_err(api_err(&what))?
        .ok_or_else(|| {
            CaError::Kubernetes(format!(
                "{what} does not exist: start the CA once to create the root"
            ))
        })?;
    let source = SecretRoot::of(cfg, &current);
    let new = step(&set_of(&current), &source)?;
    let secret = secret_of(cfg, &new, current.metadata.resource_version);
    match api
        .replace(&cfg.root_secret, &PostParams::default(), &secret)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(CaError::Kubernetes(format!(
            "{what} changed while this step was made; nothing was written, run the command again"
        ))),
        Err(e) => Err(api_err(&what)(e)),
    }
}

/// Who may ask: checks `token` with TokenReview and returns the node it is bound to.
pub async fn authenticate(
    client: &kube::Client,
    cfg: &KubeCa,
    token: &str,
) -> Result<String, CaError> {
    if token.is_empty() {
        return Err(CaError::TokenRejected("no bearer token".into()));
    }
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: token.to_string(),
            audiences: Some(vec![cfg.audience.clone()]),
        },
        ..TokenReview::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(api_err("TokenReview"))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(CaError::TokenRejected(status.error.unwrap_or_else(|| {
            "the API server did not authenticate it".into()
        })));
    }
    if !status
        .audiences
        .iter()
        .flatten()
        .any(|a| *a == cfg.audience)
    {
        return Err(CaError::TokenRejected(format!(
            "it is not for audience {:?} (mount a projected token with that audience)",
            cfg.audience
        )));
    }
    let user = status.user.unwrap_or_default();
    let want = format!(
        "system:serviceaccount:{}:{}",
        cfg.agent_namespace, cfg.agent_service_account
    );
    let who = user.username.unwrap_or_default();
    if who != want {
        return Err(CaError::TokenRejected(format!(
            "it belongs to {who:?}; only {want} may ask for certificates"
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    if let Some(node) = first(EXTRA_NODE) {
        return Ok(node);
    }
    let (Some(pod), Some(uid)) = (first(EXTRA_POD), first(EXTRA_POD_UID)) else {
        return Err(CaError::TokenRejected(
            "it is not bound to a pod (use a projected service-account token, not a Secret's)"
                .into(),
        ));
    };
    let what = format!("agent pod {}/{pod}", cfg.agent_namespace);
    let found = Api::<Pod>::namespaced(client.clone(), &cfg.agent_namespace)
        .get_opt(&pod)
        .await
        .map_err(api_err(&what))?
        .ok_or_else(|| CaError::TokenRejected(format!("{what}, its token's pod, is gone")))?;
    if found.metadata.uid.as_deref() != Some(uid.as_str()) {
        return Err(CaError::TokenRejected(format!(
            "{what} was recreated since the token was issued"
        )));
    }
    found
        .spec
        .and_then(|s| s.node_name)
        .ok_or_else(|| CaError::TokenRejected(format!("{what} is not scheduled on a node")))
}

/// Whether a pod with `id`'s namespace and service account is scheduled on `node` now.
pub async fn authorize(client: &kube::Client, node: &str, id: &Identity) -> Result<(), CaError> {
    let what = format!("pods of namespace {} on node {node}", id.namespace);
    let pods = Api::<Pod>::namespaced(client.clone(), &id.namespace)
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(api_err(&what))?;
    let runs = pods.items.iter().any(|p| {
        let spec = p.spec.as_ref();
        let sa = spec
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        on_node && sa == id.service_account && !matches!(phase, Some("Succeeded" | "Failed"))
    });
    if runs {
        Ok(())
    } else {
        Err(CaError::Forbidden {
            node: node.to_string(),
            identity: id.clone(),
            why: format!(
                "no running pod on this node runs as service account {}/{}",
                id.namespace, id.service_account
            ),
        })
    }
}
