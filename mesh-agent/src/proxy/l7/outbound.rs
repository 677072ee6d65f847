//! L7 outbound (the client's node), per request, in order:
//! 1. framing guard (HTTP/1) and HTTP/2 limits (`server.rs`); CONNECT refused;
//! 2. path normalized once; the backend receives the normalized path (`message::prepare`);
//! 3. route: the HTTPRoute rule of the addressed service that matches (none: 404 `NR`);
//! 4. local rate limit of the addressed service (429 `RL`);
//! 5. faults: abort (`FI`) or delay (`DI`);
//! 6. request header edits, hop-by-hop headers dropped;
//! 7. weighted backend choice, then the backend's circuit breaker (503 `UO`);
//! 8. tries: endpoint by P2C over peak EWMA, authorization when the endpoint is on this node,
//!    the pooled upstream connection, per-try timeout (504 `UT`), retries on the rule's codes,
//!    resets and connect failures while the retry budget allows; outlier detection sees every
//!    try;
//! 9. response header edits; the body streams back, trailers included. An HTTP/1.1 upgrade the
//!    upstream accepts (101) joins the two connections byte for byte.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::{
    message::{
        FLAGS_HEADER, Held, Prepared, ReqBody, checked_body, forbidden, modify, prepare, rebuild,
        reply, strip_response, switch_protocols,
    },
    record::{Ends, Served, Shape, recorded},
    server::serve,
    tries,
};
use crate::{
    pods::LocalPod,
    protocol::{
        body::{Body, full},
        detect::Protocol,
    },
    proxy::{admission::authorize, inputs::ProxyInputs},
    route::{
        balance,
        rules::{applies, find_rule, weighted},
        table::{Routes, ServiceEntry},
    },
    state::RouteRule,
    telemetry::metrics::labels::{Flow, Peer, Reporter, Security, service_fqdn},
    transport::{
        dial::Hop,
        upstream::{Dest, UpstreamError},
    },
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

/// Serves a captured client connection at L7 until it closes.
pub async fn serve_outbound<S>(cx: Arc<Outbound>, io: S, protocol: Protocol)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    cx.src.counters.outbound_http.inc();
    let timeouts = cx.inputs.http_timeouts;
    let svc = service_fn(move |req| {
        let cx = cx.clone();
        async move { Ok::<_, Infallible>(outbound_request(&cx, req).await) }
    });
    serve(io, protocol, timeouts, svc).await;
}

async fn outbound_request(cx: &Outbound, mut req: Request<Incoming>) -> Response<Body> {
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
        src: Peer::new(&cx.src.pod.key, cx.src.identity()),
        dst: served.as_ref().map_or_else(Peer::unknown, |s| {
            routes
                .state
                .workloads
                .get(&s.addr.ip())
                .map_or_else(Peer::unknown, |w| Peer::new(&w.key, &view.identity_of(w)))
        }),
        service: match served.as_ref().and_then(|s| s.service.as_ref()) {
            Some(k) => service_fqdn(k),
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
    cx: &Outbound,
    view: &Snapshot,
    prepared: Prepared,
    body: Incoming,
) -> Response<Body> {
    let entry = view.routes.service_at(cx.dst.ip()).cloned();
    let Some(entry) = entry else {
        // A workload addressed directly: one endpoint, no routes.
        return forward(
            cx,
            view,
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
    modify(&mut prepared.parts.headers, &rule.request_headers);
    // Weighted backend choice.
    let (backend, port) = match pick_backend(&rule, &entry, &view.routes, cx.dst.port()) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut resp = match rule.request_timeout {
        Some(t) => match tokio::time::timeout(
            t,
            forward(cx, view, prepared, body, Some(backend), port, &rule),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => reply(StatusCode::GATEWAY_TIMEOUT, "UT", "request timeout"),
        },
        None => forward(cx, view, prepared, body, Some(backend), port, &rule).await,
    };
    modify(resp.headers_mut(), &rule.response_headers);
    resp
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

/// Sends the request to an endpoint of `backend` (or to `cx.dst` when there is none), with the
/// rule's tries and per-try timeout.
async fn forward(
    cx: &Outbound,
    view: &Snapshot,
    prepared: Prepared,
    body: Incoming,
    backend: Option<Arc<ServiceEntry>>,
    port: u16,
    rule: &RouteRule,
) -> Response<Body> {
    let mut prepared = prepared;
    let request_slot = match &backend {
        Some(b) => match b.limits.requests.try_acquire(b.limits.policy.max_requests) {
            Some(s) => Some(s),
            None => {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UO",
                    &format!(
                        "circuit breaker: {} has too many requests in flight",
                        b.svc.key
                    ),
                );
            }
        },
        None => None,
    };
    if let Some(b) = &backend {
        b.limits.budget.deposit();
    }
    // A body that can be resent makes retries possible; a large or streaming one goes once.
    let retry = rule.retry.as_ref();
    let attempts = tries::retries(retry, hyper::body::Body::size_hint(&body).upper());
    let mut req_body = if attempts > 0 {
        match body.collect().await {
            Ok(c) => ReqBody::Replay(c.to_bytes()),
            Err(e) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "DPE",
                    &format!("request body: {e}"),
                );
            }
        }
    } else {
        match checked_body(prepared.parts.version, body).await {
            Ok(b) => ReqBody::Once(Some(b)),
            Err(r) => return r,
        }
    };
    let src_id = cx.src.identity();
    let mut avoid = None;
    let mut last: Option<Response<Body>> = None;
    for attempt in 0..=attempts {
        if attempt > 0 {
            let Some(b) = &backend else { break };
            if !b.limits.budget.withdraw() {
                break;
            }
            if let Some(r) = retry {
                tokio::time::sleep(r.backoff).await;
            }
        }
        let (endpoint, target) = match &backend {
            Some(b) => match b.balancer.pick(avoid) {
                Some(e) => (Some(e.clone()), SocketAddr::new(e.ip, port)),
                None => {
                    return reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UH",
                        &format!("service {} has no endpoints", b.svc.key),
                    );
                }
            },
            None => (None, cx.dst),
        };
        avoid = Some(target.ip());
        let hop = Hop::to(view, target.ip());
        if let Hop::Local(dest) = &hop {
            let attrs = prepared.attributes();
            let flows = &cx.inputs.flows;
            let port = target.port();
            if let Err(d) = authorize(view, flows, dest, Some(src_id), None, port, Some(&attrs)) {
                return forbidden(d);
            }
        }
        let req_body = match &mut req_body {
            ReqBody::Replay(bytes) => full(bytes.clone()),
            ReqBody::Once(b) => b.take().unwrap_or_else(|| full(Bytes::new())),
        };
        let req = if attempt == attempts {
            // The last try takes the parts themselves, so a request that is not retried copies
            // no headers.
            let mut last_parts =
                std::mem::replace(&mut prepared.parts, Request::new(()).into_parts().0);
            last_parts.extensions.clear();
            Request::from_parts(last_parts, req_body)
        } else {
            rebuild(&prepared.parts, req_body)
        };
        let limits = backend.as_ref().map(|b| &b.limits);
        let dest = Dest {
            hop: &hop,
            addr: target,
            h2: cx.h2,
            limits,
        };
        let mut in_flight = None;
        let send = async {
            let (pool, dialer) = (&cx.inputs.http_pool, &cx.inputs.dialer);
            let conn = pool.checkout(dialer, &cx.src, dest).await?;
            // Timed from here: the endpoint's latency, not the connection handshake.
            in_flight = endpoint.as_ref().map(balance::Endpoint::start);
            match conn.send(req).await {
                // An idle connection closed under the request before it was written: nothing
                // was sent, so it goes once more on a new connection.
                Err(UpstreamError::Unsent(req)) => {
                    pool.forget_idle(dialer, &cx.src, dest);
                    pool.checkout(dialer, &cx.src, dest).await?.send(req).await
                }
                other => other,
            }
        };
        let result = match rule.backend_timeout {
            Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ()),
            None => Ok(send.await),
        };
        let record = |failed: bool| {
            if let (Some(b), Some(e)) = (&backend, &endpoint)
                && b.balancer.record(e, failed)
            {
                warn!(service = %b.svc.key, endpoint = %e.ip, "endpoint ejected after consecutive failures");
            }
        };
        let failed = match result {
            Ok(Ok(mut resp)) => {
                if let Some(f) = &in_flight {
                    f.answered();
                }
                let status = resp.status();
                record(status.is_server_error());
                let retriable = tries::retries_status(retry, status);
                strip_response(status, resp.headers_mut());
                let (rparts, rbody) = resp.into_parts();
                let held = Held {
                    inner: rbody,
                    _hold: (None, in_flight),
                };
                let resp = Response::from_parts(rparts, held.boxed_unsync());
                if retriable && attempt < attempts {
                    last = Some(resp);
                    continue;
                }
                let (mut rparts, rbody) = resp.into_parts();
                rparts.extensions.insert(Served {
                    addr: target,
                    service: backend.as_ref().map(|b| b.svc.key.clone()),
                    hbone: matches!(hop, Hop::Hbone(_)),
                });
                let held = Held {
                    inner: rbody,
                    _hold: (request_slot, None),
                };
                return Response::from_parts(rparts, held.boxed_unsync());
            }
            Ok(Err(e)) => tries::classify(Some(&e), retry),
            Err(()) => tries::classify(None, retry),
        };
        if !failed.endpoint_failed {
            return reply(failed.status, failed.flags, &failed.message);
        }
        // A failed try: it counts against the endpoint, and the next try may follow.
        record(true);
        debug!(%target, "{}", failed.message);
        last = Some(reply(failed.status, failed.flags, &failed.message));
        if !failed.retriable {
            break;
        }
    }
    let mut resp =
        last.unwrap_or_else(|| reply(StatusCode::SERVICE_UNAVAILABLE, "URX", "no try made"));
    if attempts > 0 && resp.headers().get(FLAGS_HEADER).is_none() {
        resp.headers_mut()
            .insert(FLAGS_HEADER, HeaderValue::from_static("URX"));
    }
    resp
}
