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
use hyper::{Request, Response, body::Incoming, service::service_fn};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    forward::{Forward, Pools, forward},
    message::{Prepared, modify, prepare, reply, switch_protocols},
    record::{Ends, Served, Shape, recorded},
    server::serve,
};
use crate::{
    pods::LocalPod,
    protocol::{
        body::{Body, incoming},
        detect::Protocol,
    },
    proxy::inputs::ProxyInputs,
    route::{
        rules::{applies, find_rule, weighted},
        table::{Routes, ServiceEntry},
    },
    state::RouteRule,
    telemetry::metrics::labels::{Flow, Peer, Reporter, Security, ServiceLabels},
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
        src: view.local_peer(&cx.src),
        dst: served.as_ref().map_or_else(Peer::unknown, |s| {
            routes
                .state
                .workloads
                .get(&s.addr.ip())
                .map_or_else(Peer::unknown, |w| {
                    Peer::of_workload(w, &view.identity_of(w))
                })
        }),
        service: match served.as_ref().and_then(|s| s.service.as_ref()) {
            Some(k) => ServiceLabels::of(k),
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
    let body = incoming(body);
    let pools = Pools {
        pool: &cx.inputs.http_pool,
        dialer: &cx.inputs.dialer,
        src: &cx.src,
    };
    let fwd = Forward {
        view,
        flows: &cx.inputs.flows,
        src_id: cx.src.identity(),
        dst: cx.dst,
        h2: cx.h2,
        upstream: &pools,
    };
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
