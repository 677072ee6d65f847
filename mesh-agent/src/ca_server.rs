//! `mesh-agent ca`: the CA as a TLS server. Nodes authenticate with a bearer token: outside
//! Kubernetes one configured token per node, and a node gets only the identities of the pods its
//! node file lists; in Kubernetes ([`kube`]) a projected service-account token checked with
//! TokenReview, and the identities of the pods the API schedules on the token's node. The
//! signing itself, and every invariant of it, is [`crate::identity::ca::Ca`]'s.

pub mod kube;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    discovery::nodefile,
    identity::{
        self, Identity,
        ca::{Ca, CaError, ErrorBody, MAX_BODY, SIGN_PATH, SignRequest, ca_identity, io_err},
    },
    state::NodeState,
};

/// How the standalone CA knows nodes: a token each, and the node file listing its pods.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCaConfig {
    nodes: Vec<RawCaNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCaNode {
    name: String,
    token_file: PathBuf,
    node_file: PathBuf,
}

/// A node the CA serves.
#[derive(Debug, Clone)]
pub struct CaNode {
    /// Node name.
    pub name: String,
    token_sha256: [u8; 32],
    /// The node file the node's agent reads: the CA's record of which pods run there.
    pub node_file: PathBuf,
}

/// Reads the CA config (`nodes: [{name, tokenFile, nodeFile}]`).
pub fn load_config(path: &Path) -> Result<Vec<CaNode>, CaError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let raw: RawCaConfig = serde_yaml_ng::from_str(&text).map_err(|e| CaError::Config {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    raw.nodes
        .into_iter()
        .map(|n| {
            let token = std::fs::read_to_string(&n.token_file).map_err(io_err(&n.token_file))?;
            let token = token.trim();
            if token.len() < 16 {
                return Err(CaError::Config {
                    path: path.to_owned(),
                    problem: format!(
                        "node {}: token in {} is shorter than 16 characters",
                        n.name,
                        n.token_file.display()
                    ),
                });
            }
            Ok(CaNode {
                name: n.name,
                token_sha256: Sha256::digest(token.as_bytes()).into(),
                node_file: n.node_file,
            })
        })
        .collect()
}

/// Whether `node_file`'s node runs a pod with `id`'s namespace and service account.
pub fn authorize_node(node: &str, node_file: &Path, id: &Identity) -> Result<(), CaError> {
    let forbidden = |why: String| CaError::Forbidden {
        node: node.to_string(),
        identity: id.clone(),
        why,
    };
    let loaded = nodefile::load_remote(node_file).map_err(|e| forbidden(e.to_string()))?;
    authorize_in(&loaded.state, id)
}

/// Whether `state`'s node runs a pod with `id`'s namespace and service account.
pub fn authorize_in(state: &NodeState, id: &Identity) -> Result<(), CaError> {
    let found = state
        .pods
        .values()
        .any(|p| p.key.namespace == id.namespace && p.service_account == id.service_account);
    if found {
        Ok(())
    } else {
        Err(CaError::Forbidden {
            node: state.node.clone(),
            identity: id.clone(),
            why: format!(
                "no pod on this node runs as service account {}/{}",
                id.namespace, id.service_account
            ),
        })
    }
}

/// How the CA knows who asks, and what they may have.
pub enum Nodes {
    /// A token and a node file per node (`--config`).
    Files(Vec<CaNode>),
    /// TokenReview and pods from the Kubernetes API: the client, and whom the CA serves.
    Kubernetes(Box<(::kube::Client, kube::KubeCa)>),
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Files(n) => f.debug_tuple("Files").field(n).finish(),
            Self::Kubernetes(k) => f.debug_tuple("Kubernetes").field(&k.1).finish(),
        }
    }
}

/// Constant-time lookup of the node owning `token`.
fn node_for_token<'a>(nodes: &'a [CaNode], token: &str) -> Option<&'a CaNode> {
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut found = None;
    for n in nodes {
        let diff = n
            .token_sha256
            .iter()
            .zip(digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            found = Some(n);
        }
    }
    found
}

fn server_tls(ca: &Ca) -> Result<Arc<rustls::ServerConfig>, CaError> {
    let (chain, key) = ca.self_issue(&ca_identity(ca.trust_domain()))?;
    let config = rustls::ServerConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&identity::TLS13_ONLY)?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// `mesh-agent ca`: serves CSRs until the process stops. The serving certificate is re-made
/// whenever the root changes.
pub async fn serve(ca: Arc<Ca>, listener: TcpListener, nodes: Arc<Nodes>) -> Result<(), CaError> {
    let tls = Arc::new(Mutex::new(server_tls(&ca)?));
    {
        let (ca, tls) = (ca.clone(), tls.clone());
        tokio::spawn(async move {
            let mut made = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let changed = match ca.reload() {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("{e}; still signing with the previous root");
                        false
                    }
                };
                // Re-make the serving certificate on rotation and at half its lifetime.
                if changed || made.elapsed() > ca.ttl() / 2 {
                    match server_tls(&ca) {
                        Ok(c) => {
                            *tls.lock() = c;
                            made = std::time::Instant::now();
                        }
                        Err(e) => warn!("re-making the CA serving certificate: {e}"),
                    }
                }
            }
        });
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("CA accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let config = tls.lock().clone();
        let (ca, nodes) = (ca.clone(), nodes.clone());
        tokio::spawn(async move {
            let stream = match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(%peer, "CA TLS handshake failed: {e}");
                    return;
                }
            };
            let svc = service_fn(move |req| {
                let (ca, nodes) = (ca.clone(), nodes.clone());
                async move { Ok::<_, Infallible>(handle(ca, &nodes, peer, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                warn!(%peer, "CA connection: {e}");
            }
        });
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r
}

async fn handle(
    ca: Arc<Ca>,
    nodes: &Nodes,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let refuse = |status: StatusCode, e: &CaError| {
        warn!(%peer, "CA refused a request: {e}");
        json(
            status,
            &ErrorBody {
                error: e.to_string(),
            },
        )
    };
    if req.method() != hyper::Method::POST || req.uri().path() != SIGN_PATH {
        return json(
            StatusCode::NOT_FOUND,
            &ErrorBody {
                error: format!("POST {SIGN_PATH} is the only endpoint"),
            },
        );
    }
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let node = match nodes {
        Nodes::Files(list) => match node_for_token(list, &token) {
            Some(n) => n.name.clone(),
            None => return refuse(StatusCode::UNAUTHORIZED, &CaError::Unauthenticated),
        },
        Nodes::Kubernetes(k) => match kube::authenticate(&k.0, &k.1, &token).await {
            Ok(n) => n,
            Err(e) => return refuse(status_of(&e), &e),
        },
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &CaError::BadCsr(format!("request body: {e}")),
            );
        }
    };
    let sign_req: SignRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &CaError::BadCsr(format!("expected JSON {{\"csr\": PEM}}: {e}")),
            );
        }
    };
    let signed = match nodes {
        // Reading the node file is parsing input: it runs on the blocking pool, never on a
        // worker that serves other requests.
        Nodes::Files(list) => {
            let node_file = list
                .iter()
                .find(|n| n.name == node)
                .map(|n| n.node_file.clone())
                .unwrap_or_default();
            let name = node.clone();
            tokio::task::spawn_blocking(move || {
                ca.sign(&sign_req.csr, |id| authorize_node(&name, &node_file, id))
            })
            .await
        }
        Nodes::Kubernetes(k) => {
            let id = match ca.requested(&sign_req.csr) {
                Ok(id) => id,
                Err(e) => return refuse(status_of(&e), &e),
            };
            if let Err(e) = kube::authorize(&k.0, &node, &id).await {
                return refuse(status_of(&e), &e);
            }
            tokio::task::spawn_blocking(move || ca.sign(&sign_req.csr, |_| Ok(()))).await
        }
    }
    .unwrap_or_else(|e| Err(CaError::BadCsr(format!("signing task failed: {e}"))));
    match signed {
        Ok(issued) => {
            info!(%node, "CA signed a workload certificate");
            json(StatusCode::OK, &issued)
        }
        Err(e) => refuse(status_of(&e), &e),
    }
}

/// The HTTP status a refusal is answered with.
fn status_of(e: &CaError) -> StatusCode {
    match e {
        CaError::Unauthenticated | CaError::TokenRejected(_) => StatusCode::UNAUTHORIZED,
        CaError::Forbidden { .. } => StatusCode::FORBIDDEN,
        CaError::BadCsr(_) | CaError::Identity(_) => StatusCode::BAD_REQUEST,
        CaError::Kubernetes(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
