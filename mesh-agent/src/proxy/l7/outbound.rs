//! L7 outbound (the client's node), per request, in order:
//! 1. framing guard (HTTP/1) and HTTP/2 limits (`server.rs`); CONNECT refused;
//! 2. path normalized once; the backend receives the normalized path (`message::prepare`);
//! 3. route: the HTTPRoute rule of the addressed service that matches (none: 404 `NR`);
//! 4. local rate limit of the addressed service (429 `RL`);
//! 5. faults: abort (`FI`) or delay (`DI`);
//! 6. request header edits, hop-by-hop headers dropped;
//! 7. weighted backend choice, then the backend's circuit breaker (503 `UO`);
//! 8. tries (`forward.rs`): endpoint by P2C over peak EWMA, authorization when the endpoint is
//!    on this node, the pooled upstream connection, per-try timeout (504 `UT`), retries on the
//!    rule's codes, resets and connect failures while the retry budget allows; outlier detection
//!    sees every try;
//! 9. response header edits; the body streams back, trailers included. An HTTP/1.1 upgrade the
//!    upstream accepts (101) joins the two connections byte for byte.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http::StatusCode;
use http_body_util::BodyExt;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{
    forward::{Forward, Pools, forward},
    message::{Prepared, modify, prepare, rebuild, reply, switch_protocols},
    record::{Ends, Served, Shape, recorded},
    server::serve,
};
use crate::{
    pods::LocalPod,
    protocol::{
        body::{Body, full, incoming},
        detect::Protocol,
    },
    proxy::inputs::ProxyInputs,
    route::{
        rules::{
            applies, find_rule, matched_prefix, modified_path, redirect_location, request_host,
            weighted,
        },
        table::{Routes, ServiceEntry},
    },
    state::{Redirect, RouteRule},
    telemetry::metrics::labels::{Flow, Peer, Reporter, Security},
    view::Snapshot,
};

/// What an outbound connection's requests share.
#[derive(Debug)]
pub struct Outbound {
    /// The handlers' inputs.
    pub inputs: Arc<ProxyInputs>,
    /// The pod that made the connection (from the listener that accepted it).
    pub src: Arc<LocalPod>,
    /// Where the client was going.
    pub dst: SocketAddr,
    /// HTTP/2 (otherwise HTTP/1).
    pub h2: bool,
}

impl Outbound {
    /// The pools this pod's requests go through.
    fn pools(&self) -> Pools<'_> {
        Pools {
            pool: &self.inputs.http_pool,
            dialer: &self.inputs.dialer,
            src: &self.src,
        }
    }

    /// What forwarding one of this pod's requests, routed in `view`, reads.
    fn forwarding<'a>(
        &'a self,
        view: &'a Snapshot,
        pools: &'a Pools<'a>,
    ) -> Forward<'a, Pools<'a>> {
        Forward {
            view,
            flows: &self.inputs.flows,
            src_id: self.src.identity(),
            src: &self.src.pod,
            dst: self.dst,
            h2: self.h2,
            upstream: pools,
        }
    }
}

/// Serves a captured client connection at L7 until it closes.
pub async fn serve_outbound<S>(cx: Arc<Outbound>, io: S, protocol: Protocol)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    cx.src.counters.outbound_http.inc();
    let (timeouts, drain) = (cx.inputs.http_timeouts, cx.inputs.drain.clone());
    let svc = service_fn(move |req| {
        let cx = cx.clone();
        async move {
            let mut resp = outbound_request(&cx, req).await;
            cx.inputs.drain.close_after(cx.h2, &mut resp);
            Ok::<_, Infallible>(resp)
        }
    });
    serve(io, protocol, (timeouts, &drain), svc).await;
}

async fn outbound_request(cx: &Arc<Outbound>, mut req: Request<Incoming>) -> Response<Body> {
    cx.src.counters.http_requests.inc();
    let shape = Shape::of(&mut req);
    let view = cx.inputs.view.load();
    let routes = &view.routes;
    let upgrades: &[String] = routes
        .service_at(cx.dst.ip())
        .map_or(&crate::state::DEFAULT_UPGRADES, |e| &e.svc.upgrades);
    let (resp, downstream) = match prepare(req, &routes.state.mesh, upgrades) {
        Ok((mut prepared, body)) => {
            let downstream = prepared.upgrade.take();
            (route_request(cx, &view, prepared, body).await, downstream)
        }
        Err(r) => (r, None),
    };
    let mut resp = switch_protocols(resp, downstream, shape.upgrade);
    // Reported by the source: the endpoint that answered, or unknown for the proxy's own replies.
    let served = resp.extensions_mut().remove::<Served>();
    let flow = Flow {
        reporter: Reporter::Source,
        src: view.local_peer(&cx.src),
        dst: served.as_ref().map_or_else(Peer::unknown, |s| {
            routes
                .state
                .workloads
                .get(&s.addr.ip())
                .map_or_else(Peer::unknown, |w| view.workload_peer(w))
        }),
        service: match served.as_ref().and_then(|s| s.service.as_ref()) {
            Some(k) => routes.service_labels(k),
            None => routes.service_name_at(cx.dst.ip()),
        },
        security: if served.as_ref().is_some_and(|s| s.hbone) {
            Security::MutualTls
        } else {
            Security::None
        },
    };
    // A same-node answer has no other proxy to report it: this one reports both ends.
    let both = served.as_ref().is_some_and(|s| !s.hbone);
    let ends = Ends {
        src: None,
        dst: served.map(|s| s.addr),
    };
    recorded(&cx.inputs, flow, both, shape, ends, resp)
}

/// Routes and forwards one prepared request from the outbound side.
async fn route_request(
    cx: &Arc<Outbound>,
    view: &Snapshot,
    prepared: Prepared,
    body: Incoming,
) -> Response<Body> {
    let body = incoming(body);
    let pools = cx.pools();
    let fwd = cx.forwarding(view, &pools);
    let entry = view.routes.service_at(cx.dst.ip()).cloned();
    let Some(entry) = entry else {
        // A workload addressed directly: one endpoint, no routes.
        return forward(
            &fwd,
            prepared,
            body,
            None,
            cx.dst.port(),
            &RouteRule::default(),
        )
        .await;
    };
    let Some((_, rule)) = find_rule(&entry, cx.dst.port(), &prepared.parts, &prepared.path) else {
        return reply(StatusCode::NOT_FOUND, "NR", "no route matched");
    };
    let prefix = matched_prefix(&rule, &prepared.parts, &prepared.path).map(str::to_owned);
    if let Some(rate) = &entry.limits.rate
        && !rate.admit(&cx.src.identity().to_string())
    {
        return reply(StatusCode::TOO_MANY_REQUESTS, "RL", "local rate limit");
    }
    let mut prepared = prepared;
    if let Some(f) = &rule.fault {
        if let Some((status, pct)) = f.abort
            && applies(pct, fastrand::u64(..))
        {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return reply(status, "FI", "fault injected");
        }
        if let Some((delay, pct)) = f.delay
            && applies(pct, fastrand::u64(..))
        {
            tokio::time::sleep(delay).await;
        }
    }
    if let Some(r) = &rule.redirect {
        return redirect(r, &prepared, prefix.as_deref(), cx.dst);
    }
    modify(&mut prepared.parts.headers, &rule.request_headers);
    if let Some(rw) = &rule.rewrite {
        if let Some(m) = &rw.path {
            let path = modified_path(m, prefix.as_deref(), &prepared.path);
            if let Err(e) = prepared.set_path(path) {
                return reply(StatusCode::INTERNAL_SERVER_ERROR, "NR", &e);
            }
        }
        if let Some(h) = &rw.hostname
            && let Err(e) = prepared.set_host(h)
        {
            return reply(StatusCode::INTERNAL_SERVER_ERROR, "NR", &e);
        }
    }
    let body = if rule.mirrors.is_empty() {
        body
    } else {
        match mirror(cx, &rule, &prepared, body).await {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    // Weighted backend choice.
    let (backend, port) = match pick_backend(&rule, &entry, &view.routes, cx.dst.port()) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut resp = match rule.request_timeout {
        Some(t) => {
            match tokio::time::timeout(t, forward(&fwd, prepared, body, Some(backend), port, &rule))
                .await
            {
                Ok(r) => r,
                Err(_) => reply(StatusCode::GATEWAY_TIMEOUT, "UT", "request timeout"),
            }
        }
        None => forward(&fwd, prepared, body, Some(backend), port, &rule).await,
    };
    modify(resp.headers_mut(), &rule.response_headers);
    resp
}

/// The proxy's own answer for a `RequestRedirect` rule.
fn redirect(
    r: &Redirect,
    prepared: &Prepared,
    prefix: Option<&str>,
    dst: SocketAddr,
) -> Response<Body> {
    let path = r.path.as_ref().map_or_else(
        || prepared.path.clone(),
        |m| modified_path(m, prefix, &prepared.path),
    );
    let host = request_host(&prepared.parts).unwrap_or_else(|| dst.ip().to_string());
    let location = redirect_location(
        r,
        (
            "http",
            host.trim_start_matches('[').trim_end_matches(']'),
            dst.port(),
        ),
        &path,
        prepared.parts.uri.query(),
    );
    let mut resp = Response::new(crate::protocol::body::full(bytes::Bytes::new()));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    match http::HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(http::header::LOCATION, v);
            resp
        }
        Err(_) => reply(
            StatusCode::BAD_REQUEST,
            "DPE",
            "the redirect's location is not a valid header",
        ),
    }
}

/// Largest request body copied to mirrors: a copy needs the whole body in hand, and a larger
/// or streaming one goes to the backend alone.
const MIRROR_BODY_LIMIT: u64 = 64 * 1024;

/// Sends a copy of the request to each of the rule's mirrors that its share picks, in the
/// background; their answers are dropped. Returns the body for the request itself (or, when
/// it cannot be read, the answer to the client).
async fn mirror(
    cx: &Arc<Outbound>,
    rule: &RouteRule,
    prepared: &Prepared,
    body: Body,
) -> Result<Body, Response<Body>> {
    let picked: Vec<_> = rule
        .mirrors
        .iter()
        .filter(|m| applies(m.percent, fastrand::u64(..)))
        .cloned()
        .collect();
    if picked.is_empty() {
        return Ok(body);
    }
    let hint = hyper::body::Body::size_hint(&body);
    if hint.upper().is_none_or(|n| n > MIRROR_BODY_LIMIT) {
        debug!("request body too large or streaming to mirror: sent to the backend only");
        return Ok(body);
    }
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(reply(
                StatusCode::BAD_REQUEST,
                "DPE",
                &format!("request body: {e}"),
            ));
        }
    };
    for m in picked {
        let req = rebuild(&prepared.parts, full(bytes.clone()));
        let (parts, body) = req.into_parts();
        let copy = Prepared {
            parts,
            path: prepared.path.clone(),
            deny_path: prepared.deny_path.clone(),
            fold_case: prepared.fold_case,
            upgrade: None,
        };
        let cx = cx.clone();
        tokio::spawn(async move {
            let view = cx.inputs.view.load();
            let Some(entry) = view.routes.service(&m.backend.service).cloned() else {
                debug!(service = %m.backend.service, "mirror service does not exist: copy dropped");
                return;
            };
            let Some(port) = entry.svc.target_port(m.backend.port) else {
                debug!(service = %m.backend.service, port = m.backend.port, "mirror service has no such port: copy dropped");
                return;
            };
            let pools = cx.pools();
            let fwd = cx.forwarding(&view, &pools);
            let resp = forward(&fwd, copy, body, Some(entry), port, &RouteRule::default()).await;
            // Read to the end, so the upstream connection goes back to the pool.
            drop(resp.into_body().collect().await);
        });
    }
    Ok(full(bytes))
}

/// The backend service and its target port for this request.
#[expect(clippy::result_large_err, reason = "the error is the reply itself")]
fn pick_backend(
    rule: &RouteRule,
    parent: &Arc<ServiceEntry>,
    routes: &Routes,
    port: u16,
) -> Result<(Arc<ServiceEntry>, u16), Response<Body>> {
    let (entry, svc_port) = if rule.backends.is_empty() {
        (parent.clone(), port)
    } else {
        let Some(b) = weighted(&rule.backends, fastrand::u64(..)) else {
            return Err(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "NR",
                "the rule has no backend",
            ));
        };
        let Some(entry) = routes.service(&b.service) else {
            return Err(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "NC",
                &format!("backend service {} does not exist", b.service),
            ));
        };
        (entry.clone(), b.port)
    };
    match entry.svc.target_port(svc_port) {
        Some(p) => Ok((entry, p)),
        None => Err(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "NR",
            &format!("service {} has no port {svc_port}", entry.svc.key),
        )),
    }
}
