//! The stand-in API server's HTTP side: discovery, CRUD, merge patches, watches with bookmarks,
//! 410 Gone, and TokenReview, in the real server's URL scheme and JSON.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

use super::{
    resources::{self, Resource},
    selector::Selector,
    store::{ApiError, Change, Store},
};

pub type Body = BoxBody<Bytes, Infallible>;

/// A token the TokenReview endpoint knows.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    /// `status.user`: username, uid, groups, extra.
    pub user: Value,
    /// Audiences the token is good for; empty means the API server's own.
    pub audiences: Vec<String>,
    /// When it stops being accepted (a projected token's `exp`); `None`: never.
    pub expires: Option<std::time::SystemTime>,
}

impl TokenInfo {
    fn expired(&self) -> bool {
        self.expires
            .is_some_and(|t| std::time::SystemTime::now() >= t)
    }
}

/// What every request reads.
#[derive(Debug)]
pub struct Shared {
    pub store: Mutex<Store>,
    /// The admin token (the kubeconfig's).
    pub admin_token: String,
    /// Tokens that may call the API and that TokenReview answers for.
    pub tokens: Mutex<HashMap<String, TokenInfo>>,
    /// Bumped to end every open watch mid-stream.
    pub cut: watch::Sender<u64>,
    /// How often watches get a BOOKMARK.
    pub bookmark_every: Duration,
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

/// Where a resource request points.
#[derive(Debug)]
struct Target {
    resource: &'static Resource,
    /// Empty for cluster-wide.
    ns: String,
    name: Option<String>,
}

/// Splits `/api/v1/...` and `/apis/<g>/<v>/...` into a target.
fn target(segs: &[&str]) -> Result<Target, ApiError> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let (ns, plural, name) = match rest {
        ["namespaces", ns, plural, name, ..] => (*ns, *plural, Some(*name)),
        ["namespaces", ns, plural] => (*ns, *plural, None),
        [plural, name, ..] => ("", *plural, Some(*name)),
        [plural] => ("", *plural, None),
        [] => return Err(ApiError::new(404, "NotFound", "no resource named")),
    };
    let resource = resources::find(group, version, plural).ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({group}/{version} {plural})"
            ),
        )
    })?;
    Ok(Target {
        resource,
        ns: ns.to_string(),
        name: name.map(String::from),
    })
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    token == shared.admin_token
        || shared
            .tokens
            .lock()
            .get(token)
            .is_some_and(|t| !t.expired())
}

/// Serves one request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["healthz" | "readyz" | "livez"] => {
            return Ok(Response::new(Full::new(Bytes::from_static(b"ok")).boxed()));
        }
        ["version"] => {
            return Ok(json_response(
                200,
                &json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-mesh-standin", "platform": "linux/amd64"}),
            ));
        }
        _ => {}
    }
    if !authorized(&shared, &req) {
        return Ok(error(&ApiError::new(401, "Unauthorized", "Unauthorized")));
    }
    let discovery = match segs.as_slice() {
        ["api"] => Some(resources::core_versions()),
        ["apis"] => Some(resources::groups()),
        ["api", v] => resources::resource_list("", v),
        ["apis", g, v] => resources::resource_list(g, v),
        ["openapi", ..] => {
            return Ok(error(&ApiError::new(
                404,
                "NotFound",
                "no OpenAPI documents are served: use --validate=false",
            )));
        }
        _ => None,
    };
    if let Some(d) = discovery {
        return Ok(json_response(200, &d));
    }
    if matches!(segs.as_slice(), ["api", _] | ["apis", _, _]) {
        return Ok(error(&ApiError::new(
            404,
            "NotFound",
            "group version not served",
        )));
    }
    let t = match target(&segs) {
        Ok(t) => t,
        Err(e) => return Ok(error(&e)),
    };
    Ok(match resource_request(&shared, t, req).await {
        Ok(r) => r,
        Err(e) => error(&e),
    })
}

async fn body_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::new(400, "BadRequest", format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("the body is not JSON: {e}")))
}

async fn resource_request(
    shared: &Arc<Shared>,
    t: Target,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let q = query(&req);
    let r = t.resource;
    let ns = t.ns.as_str();
    match (req.method().clone(), t.name.as_deref()) {
        (Method::POST, None) if r.kind == "TokenReview" => {
            let body = body_json(req).await?;
            Ok(json_response(201, &token_review(shared, body)))
        }
        (Method::GET, None) => {
            let selector = Selector::new(
                q.get("labelSelector").map(String::as_str),
                q.get("fieldSelector").map(String::as_str),
            )?;
            let scope = (r.namespaced && !ns.is_empty()).then_some(ns);
            if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return watch_response(shared, r, scope.map(String::from), selector, &q);
            }
            let store = shared.store.lock();
            let items = store.list(r, scope, &selector);
            Ok(json_response(
                200,
                &json!({
                    "kind": r.list_kind(),
                    "apiVersion": r.api_version(),
                    "metadata": {"resourceVersion": store.rv().to_string()},
                    "items": items,
                }),
            ))
        }
        (Method::GET, Some(name)) => Ok(json_response(200, &shared.store.lock().get(r, ns, name)?)),
        (Method::POST, None) => {
            let body = body_json(req).await?;
            Ok(json_response(
                201,
                &shared.store.lock().create(r, ns, body)?,
            ))
        }
        (Method::PUT, Some(name)) => {
            let body = body_json(req).await?;
            Ok(json_response(
                200,
                &shared.store.lock().update(r, ns, name, body)?,
            ))
        }
        (Method::PATCH, Some(name)) => {
            let kind = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            if !(kind.starts_with("application/merge-patch+json")
                || kind.starts_with("application/strategic-merge-patch+json"))
            {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("patch type {kind:?}: this stand-in takes merge patches only"),
                ));
            }
            let body = body_json(req).await?;
            Ok(json_response(
                200,
                &shared.store.lock().patch(r, ns, name, &body)?,
            ))
        }
        (Method::DELETE, Some(name)) => Ok(json_response(
            200,
            &shared.store.lock().delete(r, ns, name)?,
        )),
        (m, _) => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{m} is not supported here"),
        )),
    }
}

fn token_review(shared: &Shared, body: Value) -> Value {
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = body["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let status = match shared.tokens.lock().get(token) {
        Some(info) if info.expired() => {
            json!({"authenticated": false, "error": "token has expired"})
        }
        Some(info) => {
            let audiences: Vec<&String> = if asked.is_empty() {
                info.audiences.iter().collect()
            } else {
                asked
                    .iter()
                    .filter(|a| info.audiences.contains(a))
                    .collect()
            };
            if !asked.is_empty() && audiences.is_empty() {
                json!({"authenticated": false, "error": "token audiences do not match"})
            } else {
                json!({"authenticated": true, "user": info.user, "audiences": audiences})
            }
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    let mut out = body;
    out["kind"] = json!("TokenReview");
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["status"] = status;
    out
}

fn line(event: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut s = event.to_string();
    s.push('\n');
    Ok(Frame::data(Bytes::from(s)))
}

/// A watch: past changes from `resourceVersion` (or the current objects as ADDED when it is
/// absent or 0), then live ones, with BOOKMARKs, until `timeoutSeconds`, a cut, or the client
/// goes away.
fn watch_response(
    shared: &Arc<Shared>,
    r: &'static Resource,
    ns: Option<String>,
    selector: Selector,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let from: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => Some(v.parse().map_err(|_| {
            ApiError::new(
                400,
                "BadRequest",
                format!("resourceVersion {v:?} is not a number"),
            )
        })?),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let relevant = move |c: &Change| {
        std::ptr::eq(c.resource, r)
            && ns
                .as_deref()
                .is_none_or(|n| c.object["metadata"]["namespace"].as_str() == Some(n))
    };
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    let (mut live, backlog, mut last) = {
        let store = shared.store.lock();
        let live = store.subscribe();
        match from {
            None => {
                let scope = relevant.clone();
                let added: Vec<Value> = store
                    .list(r, None, &selector)
                    .into_iter()
                    .filter(|o| {
                        scope(&Change {
                            rv: 0,
                            resource: r,
                            kind: "ADDED",
                            object: o.clone(),
                        })
                    })
                    .map(|o| json!({"type": "ADDED", "object": o}))
                    .collect();
                (live, Ok(added), store.rv())
            }
            Some(since) => match store.since(since) {
                Ok(changes) => {
                    let events = changes
                        .iter()
                        .filter(|c| relevant(c))
                        .filter_map(|c| event(c, &selector))
                        .collect();
                    (live, Ok(events), store.rv())
                }
                Err(e) => (live, Err(e), since),
            },
        }
    };
    let mut cut = shared.cut.subscribe();
    let every = shared.bookmark_every;
    tokio::spawn(async move {
        let events = match backlog {
            Ok(events) => events,
            Err(e) => {
                // As the real server does: 200, then one ERROR event carrying the Status.
                let _ = tx
                    .send(line(&json!({"type": "ERROR", "object": e.status()})))
                    .await;
                return;
            }
        };
        for e in events {
            if tx.send(line(&e)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = cut.changed() => return,
                () = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"type": "BOOKMARK", "object": {"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(&b)).await.is_err() {
                        return;
                    }
                }
                c = live.recv() => match c {
                    Ok(c) => {
                        if c.rv <= last {
                            continue;
                        }
                        last = c.rv;
                        if !relevant(&c) {
                            continue;
                        }
                        if let Some(e) = event(&c, &selector)
                            && tx.send(line(&e)).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher too slow to keep up is closed, as the real server does.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let mut resp = Response::new(BodyExt::boxed(Channel(rx)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// The event a change makes for a watcher with `selector`: an object modified out of the
/// selector is DELETED for that watcher.
fn event(c: &Change, selector: &Selector) -> Option<Value> {
    let matches = selector.matches(&c.object);
    let kind = match (c.kind, matches) {
        (_, true) => c.kind,
        ("MODIFIED", false) => "DELETED",
        _ => return None,
    };
    Some(json!({"type": kind, "object": c.object}))
}

/// A response body fed by a channel: each message is a frame, and the body ends when the
/// sender is dropped.
struct Channel(mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

impl hyper::body::Body for Channel {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx)
    }
}
