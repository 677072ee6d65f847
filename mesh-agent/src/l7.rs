//! L7 in the node proxy: HTTP/1.1 and HTTP/2 (gRPC included) on captured connections, with no
//! waypoint hop.
//!
//! Outbound (the client's node), per request, in order:
//! 1. framing guard (HTTP/1, `guard.rs`) and HTTP/2 limits; CONNECT refused;
//! 2. path normalized once (`path.rs`); the backend receives the normalized path;
//! 3. route: the HTTPRoute rule of the addressed service that matches (none: 404 `NR`);
//! 4. local rate limit of the addressed service (429 `RL`);
//! 5. faults: abort (`FI`) or delay (`DI`);
//! 6. request header edits, hop-by-hop headers dropped;
//! 7. weighted backend choice, then the backend's circuit breaker (503 `UO`);
//! 8. tries: endpoint by P2C over peak EWMA (`balance.rs`), authorization when the endpoint is on
//!    this node, the pooled upstream connection (`upstream.rs`), per-try timeout (504 `UT`),
//!    retries on the rule's codes, resets and connect failures while the retry budget allows;
//!    outlier detection sees every try;
//! 9. response header edits; the body streams back, trailers included. An HTTP/1.1 upgrade
//!    the upstream accepts (101) joins the two connections byte for byte.
//!
//! Inbound (the destination's node) parses HTTP only for pods that an L7 authorization policy
//! selects: it normalizes the path the same way, authorizes each request with the identity the
//! connection proved, and forwards over the connection it already opened to the application.
//!
//! Replies the proxy makes itself carry `x-mesh-flags` with Envoy's response flags.

pub mod balance;
pub mod detect;
pub mod guard;
pub mod h2guard;
pub mod limits;
pub mod metrics;
pub mod path;
pub mod trace;
pub mod upstream;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response,
    body::{Frame, Incoming, SizeHint},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use self::metrics::Outcome;
use self::{
    balance::{Balancer, InFlight},
    detect::Protocol,
    limits::{Limits, Slot},
    upstream::UpstreamError,
};
use crate::{
    config::HttpTimeouts,
    flows::{Draft, HttpInfo},
    identity::Identity,
    metrics::{Flow, Peer, Reporter, Security},
    policy::{Decision, HttpAttributes},
    proxy::{Hop, LocalPod, ProxyError, Routes, Shared},
    state::{
        HeaderModifier, HttpRoute, MeshConfig, NodeState, ObjectKey, PathMatch, RouteMatch,
        RouteRule, Service,
    },
};

/// Errors a body can carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Largest request body buffered so that a retry can resend it; larger ones are not retried.
const MAX_RETRY_BODY: u64 = 64 * 1024;
/// HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Streams a client may reset before the server accepted them (rapid reset) before GOAWAY.
const MAX_PENDING_RESETS: usize = 20;
/// HTTP/2 flow-control windows of every L7 connection, both directions: what a peer that does
/// not read can make the proxy hold is one window per stream, and at most one connection window
/// per connection (the upstream sends only what the window allows, and a response body is
/// read from it only as fast as the client takes it).
pub(crate) const H2_STREAM_WINDOW: u32 = 1024 * 1024;
pub(crate) const H2_CONN_WINDOW: u32 = 4 * 1024 * 1024;
/// Data hyper may queue per stream beyond what the peer's window lets it send.
pub(crate) const H2_SEND_BUF: usize = 64 * 1024;
/// The header list HTTP/2 decodes before the proxy's own 60 KiB check answers 431. It is
/// larger, because h2 must decode a whole header block to keep its HPACK table in step: a block
/// over its limit is 431 only while the encoded block fits, and past that a connection error. So
/// every request a client would send is answered 431 by the proxy, as on HTTP/1, and only an
/// encoded block over 256 KiB ends the connection.
pub(crate) const H2_DECODE_LIMIT: u32 = 256 * 1024;

/// The header carrying the proxy's response flags on replies it made itself.
pub const FLAGS_HEADER: &str = "x-mesh-flags";

/// One service as L7 sees it: its routes, balancer and limits. Rebuilt on every state change;
/// endpoint statistics and limit counters carry over.
#[derive(Debug)]
pub struct ServiceEntry {
    /// The service.
    pub svc: Service,
    routes: Vec<HttpRoute>,
    /// Endpoint choice.
    pub balancer: Balancer,
    /// Admission limits.
    pub limits: Arc<Limits>,
}

/// The L7 table by service.
#[derive(Debug, Default)]
pub struct Table {
    services: HashMap<ObjectKey, Arc<ServiceEntry>>,
}

impl Table {
    /// Builds the table for `state`, carrying state over from `old`.
    pub fn build(state: &NodeState, old: &Table) -> Self {
        let services = state
            .services
            .values()
            .map(|svc| {
                let policy = state
                    .traffic_policies
                    .get(&svc.key)
                    .cloned()
                    .unwrap_or_else(default_policy);
                let prev = old.services.get(&svc.key);
                let limits = match prev {
                    Some(p) if p.limits.policy == policy => p.limits.clone(),
                    _ => Arc::new(Limits::new(&policy)),
                };
                let balancer = Balancer::new(
                    &svc.endpoints,
                    policy.lb,
                    policy.outlier.clone(),
                    prev.map(|p| &p.balancer),
                );
                let routes = state
                    .http_routes
                    .iter()
                    .filter(|r| r.service == svc.key)
                    .cloned()
                    .collect();
                let entry = ServiceEntry {
                    svc: svc.clone(),
                    routes,
                    balancer,
                    limits,
                };
                (svc.key.clone(), Arc::new(entry))
            })
            .collect();
        Self { services }
    }

    /// The entry of service `key`.
    pub fn service(&self, key: &ObjectKey) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }
}

fn default_policy() -> crate::state::TrafficPolicy {
    crate::state::TrafficPolicy {
        retry_budget_percent: 20,
        min_retries_per_second: 10,
        ..Default::default()
    }
}

/// The rule that handles a request to `port` of a service, or `None` when routes exist and none
/// matches. Without routes the default rule sends to the service itself.
fn select_rule<'a>(
    entry: &'a ServiceEntry,
    port: u16,
    parts: &http::request::Parts,
    path: &str,
) -> Option<std::borrow::Cow<'a, RouteRule>> {
    find_rule(entry, port, parts, path).map(|(_, rule)| rule)
}

/// A rule and where it is written: the route and the rule's index (`None`: the default rule).
pub type RuleAt<'a> = (
    Option<(&'a HttpRoute, usize)>,
    std::borrow::Cow<'a, RouteRule>,
);

/// The rule a request takes and where it is written: the route and the rule's index, or `None`
/// for the default rule of a service no route is attached to. `None` overall: no rule matched.
pub fn find_rule<'a>(
    entry: &'a ServiceEntry,
    port: u16,
    parts: &http::request::Parts,
    path: &str,
) -> Option<RuleAt<'a>> {
    let mut attached = entry
        .routes
        .iter()
        .filter(|r| r.port.is_none_or(|p| p == port))
        .peekable();
    if attached.peek().is_none() {
        return Some((None, std::borrow::Cow::Owned(RouteRule::default())));
    }
    attached
        .flat_map(|r| {
            r.rules
                .iter()
                .enumerate()
                .map(move |(i, rule)| (r, i, rule))
        })
        .find(|(_, _, rule)| {
            rule.matches.is_empty() || rule.matches.iter().any(|m| matches(m, parts, path))
        })
        .map(|(r, i, rule)| (Some((r, i)), std::borrow::Cow::Borrowed(rule)))
}

fn matches(m: &RouteMatch, parts: &http::request::Parts, path: &str) -> bool {
    let path_ok = match &m.path {
        None => true,
        Some(PathMatch::Exact(p)) => path == p,
        Some(PathMatch::Prefix(p)) => {
            p.is_empty()
                || (path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
        }
        Some(PathMatch::Regex(r)) => r.full_match(path),
    };
    path_ok
        && m.method
            .as_deref()
            .is_none_or(|want| parts.method.as_str() == want)
        && m.headers.iter().all(|(name, want)| {
            parts
                .headers
                .get_all(name.as_str())
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| want.matches(v)))
        })
        && m.query.iter().all(|(name, want)| {
            parts.uri.query().is_some_and(|q| {
                q.split('&').any(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    k == name && want.matches(v)
                })
            })
        })
}

/// A reply made by the proxy itself. Its message also goes to the request's flow record.
fn reply(status: StatusCode, flags: &str, message: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{message}\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(v) = HeaderValue::from_str(flags) {
        r.headers_mut().insert(FLAGS_HEADER, v);
    }
    r.extensions_mut().insert(Why(message.to_string()));
    r
}

/// Why the proxy answered a request itself, for its flow record.
#[derive(Clone, Debug)]
struct Why(String);

/// 403 for a request authorization refused; the record names the policy.
fn forbidden(decision: Decision) -> Response<Body> {
    let mut r = reply(StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied");
    r.extensions_mut().insert(decision);
    r
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// An incoming body as the proxy's body type.
pub(crate) fn incoming(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
    // `TE: trailers` is how gRPC says it understands trailers; anything else is hop-by-hop.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

fn modify(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (n, v) in &m.set {
        headers.insert(n.clone(), v.clone());
    }
    for (n, v) in &m.add {
        headers.append(n.clone(), v.clone());
    }
    for n in &m.remove {
        headers.remove(n);
    }
}

/// Percent chance, with a resolution of 0.01%.
fn chance(percent: f64) -> bool {
    (balance::random() % 10_000) < (percent * 100.0) as u64
}

/// The request after the checks every path shares: CONNECT refused, path normalized, URI in the
/// form the upstream protocol expects, hop-by-hop headers gone, and only allowed upgrades left.
struct Prepared {
    parts: http::request::Parts,
    /// The normalized path, without query.
    path: String,
    /// The path as DENY rules also see it (`path::deny_form`).
    deny_path: String,
    /// Whether `deny_path` is case-folded.
    fold_case: bool,
    /// The client's side of an allowed protocol switch that was forwarded.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl Prepared {
    /// What authorization looks at.
    fn attributes(&self) -> HttpAttributes<'_> {
        HttpAttributes {
            method: self.parts.method.as_str(),
            path: &self.path,
            deny_path: &self.deny_path,
            fold_case: self.fold_case,
            headers: &self.parts.headers,
        }
    }
}

/// The tokens of an `Upgrade` value that `allowed` names (by protocol name, any version), in the
/// client's order; the rest are dropped so the upstream answers as HTTP/1.1.
fn allowed_upgrades(value: &HeaderValue, allowed: &[String]) -> Option<HeaderValue> {
    let kept: Vec<&str> = value
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|t| {
            let name = t.split('/').next().unwrap_or_default();
            allowed
                .iter()
                .any(|a| a.eq_ignore_ascii_case(t) || a.eq_ignore_ascii_case(name))
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

#[expect(clippy::result_large_err, reason = "the error is the reply itself")]
fn prepare(
    req: Request<Incoming>,
    mesh: &MeshConfig,
    upgrades: &[String],
) -> Result<(Prepared, Incoming), Response<Body>> {
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        return Err(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "NR",
            "CONNECT is not proxied",
        ));
    }
    // HTTP/1's guard counts header lines and head bytes; HTTP/2 gets the same limits here,
    // repeated names included, so both protocols answer 431 at the first proxy that decodes the
    // request, and every later hop accepts what passed.
    if parts.headers.len() > guard::MAX_HEADERS {
        return Err(reply(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "DPE",
            "too many request headers",
        ));
    }
    let list: usize = parts
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum();
    if list > guard::MAX_HEAD {
        return Err(reply(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "DPE",
            "request headers too large",
        ));
    }
    let switch_to = parts.headers.get(header::UPGRADE).cloned();
    if switch_to.is_some() && parts.version != Version::HTTP_11 {
        return Err(reply(
            StatusCode::NOT_IMPLEMENTED,
            "NR",
            "protocol upgrades are proxied for HTTP/1.1 only",
        ));
    }
    strip_hop_by_hop(&mut parts.headers);
    // Only the upgrades the service allows go on (WebSocket by default). Any other token (h2c
    // above all) would have the upstream switch protocols, and every request after the switch
    // would then pass unrouted and unauthorized: it is removed, and the upstream answers as
    // HTTP/1.1.
    let forwarded = switch_to
        .as_ref()
        .and_then(|v| allowed_upgrades(v, upgrades));
    let upgrade = match forwarded {
        Some(proto) => {
            // The upgrade itself is end to end: the upstream decides whether to switch.
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, proto);
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        }
        None => {
            if let Some(v) = &switch_to {
                debug!(upgrade = ?v, "upgrade not allowed for this service: removed");
            }
            None
        }
    };
    let path = match path::normalize(parts.uri.path(), mesh.path_normalization) {
        Ok(p) => p,
        Err(e) => {
            warn!(path = ?parts.uri.path(), "refused a request path: {e}");
            return Err(reply(StatusCode::BAD_REQUEST, "DPE", &e.to_string()));
        }
    };
    let deny_path = path::deny_form(&path, mesh.case_insensitive_deny);
    let fold_case = mesh.case_insensitive_deny;
    let h2 = parts.version == Version::HTTP_2;
    // HTTP/1 sends origin-form upstream; HTTP/2 needs scheme and authority.
    let (scheme, authority) = (
        parts.uri.scheme().is_some(),
        parts.uri.authority().is_some(),
    );
    let right_form = if h2 {
        scheme && authority
    } else {
        !scheme && !authority
    };
    if path == parts.uri.path() && right_form {
        // Already what the upstream should get (the common case): keep the URI as it is.
        return Ok((
            Prepared {
                parts,
                path,
                deny_path,
                fold_case,
                upgrade,
            },
            body,
        ));
    }
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let mut uri = http::uri::Builder::new().path_and_query(path_and_query);
    if h2 {
        // HTTP/2 carries scheme and authority as pseudo-headers: keep the client's.
        uri = uri
            .scheme(parts.uri.scheme_str().unwrap_or("http"))
            .authority(
                parts
                    .uri
                    .authority()
                    .map_or("localhost", |a| a.as_str())
                    .to_string(),
            );
    }
    parts.uri = match uri.build() {
        Ok(u) => u,
        Err(e) => return Err(reply(StatusCode::BAD_REQUEST, "DPE", &e.to_string())),
    };
    Ok((
        Prepared {
            parts,
            path,
            deny_path,
            fold_case,
            upgrade,
        },
        body,
    ))
}

/// Removes a response's hop-by-hop headers, except that a switch of protocols keeps saying
/// which protocol it switched to.
fn strip_response(status: StatusCode, headers: &mut HeaderMap) {
    let switched = (status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(headers);
    if let Some(proto) = switched {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
}

/// Finishes a request. An upstream that switched protocols (101) is joined byte for byte with
/// the client only when the client asked for an upgrade the service allows and it was forwarded
/// (`downstream`); a 101 to anything else is answered 502 `UPE` and the connection closes, so no
/// tunnel can form that routing and authorization never see. A request that asked to switch
/// (`asked`) and was not switched closes the client's connection after the answer, because the
/// framing guard stopped checking its bytes at the upgrade request.
fn switch_protocols(
    mut resp: Response<Body>,
    downstream: Option<hyper::upgrade::OnUpgrade>,
    asked: bool,
) -> Response<Body> {
    let upstream = resp.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return if asked { with_close(resp) } else { resp };
    }
    let (Some(down), Some(up)) = (downstream, upstream) else {
        warn!("the upstream switched protocols without an allowed upgrade request: refused");
        return with_close(reply(
            StatusCode::BAD_GATEWAY,
            "UPE",
            "the upstream switched protocols, but no allowed upgrade was requested",
        ));
    };
    tokio::spawn(async move {
        match tokio::try_join!(down, up) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                if let Err(e) = crate::proxy::relay::copy_both(&mut down, &mut up).await {
                    debug!("upgraded connection ended: {e}");
                }
            }
            Err(e) => debug!("protocol switch failed: {e}"),
        }
    });
    resp
}

fn with_close(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A fresh request from `p` with `body`.
fn rebuild(p: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req
}

/// A response body that holds the request's slots until it has been read to the end (or
/// dropped), so limits count requests, not just response heads.
struct Held<B> {
    inner: B,
    _hold: (Option<Slot>, Option<InFlight>),
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What an outbound connection's requests share.
#[derive(Debug)]
pub struct Outbound {
    /// Node-wide state.
    pub shared: Arc<Shared>,
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
    let timeouts = cx.shared.http_timeouts;
    let svc = service_fn(move |req| {
        let cx = cx.clone();
        async move { Ok::<_, Infallible>(outbound_request(&cx, req).await) }
    });
    serve(io, protocol, timeouts, svc).await;
}

/// Runs hyper's server for `protocol` with the hardening settings on `io`.
async fn serve<S, Svc>(io: S, protocol: Protocol, timeouts: HttpTimeouts, svc: Svc)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = Body, Error = Infallible>,
    Svc::Future: Send + 'static,
{
    let result = if protocol == Protocol::Http2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(H2_DECODE_LIMIT)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .max_send_buf_size(H2_SEND_BUF)
            .serve_connection(TokioIo::new(h2guard::H2Guard::new(io)), svc)
            .await
    } else {
        let mut guarded = guard::H1Guard::new(io, timeouts.head);
        // hyper starts once the first head is whole (or refused): a connection that stalls in
        // its first head holds only the bytes it sent.
        match tokio::time::timeout(timeouts.idle, guarded.first_head()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("HTTP/1 connection ended before its first request: {e}");
                return;
            }
            Err(_) => {
                debug!("HTTP/1 connection sent no request within the idle timeout");
                return;
            }
        }
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .half_close(true)
            .header_read_timeout(timeouts.idle)
            .max_buf_size(guard::MAX_HEAD + 16 * 1024)
            .serve_connection(TokioIo::new(guarded), svc)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        debug!("HTTP connection ended: {e}");
    }
}

async fn outbound_request(cx: &Outbound, mut req: Request<Incoming>) -> Response<Body> {
    cx.src.counters.http_requests.inc();
    let started = Instant::now();
    let shape = Shape::of(&mut req);
    let switching = req.headers().contains_key(header::UPGRADE);
    let routes = cx.shared.routes();
    let upgrades: &[String] = routes
        .service_at(cx.dst.ip())
        .map_or(&crate::state::DEFAULT_UPGRADES, |e| &e.svc.upgrades);
    let (resp, downstream) = match prepare(req, &routes.state.mesh, upgrades) {
        Ok((mut prepared, body)) => {
            let downstream = prepared.upgrade.take();
            (route_request(cx, &routes, prepared, body).await, downstream)
        }
        Err(r) => (r, None),
    };
    let mut resp = switch_protocols(resp, downstream, switching);
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
                .map_or_else(Peer::unknown, |w| {
                    Peer::new(&w.key, &cx.shared.identity_of(w))
                })
        }),
        service: match served.as_ref().and_then(|s| s.service.as_ref()) {
            Some(k) => crate::metrics::service_fqdn(k),
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
    recorded(&cx.shared, flow, both, shape, ends, started, resp)
}

/// Where a request was answered, for its metrics.
#[derive(Clone, Debug)]
struct Served {
    addr: SocketAddr,
    service: Option<ObjectKey>,
    hbone: bool,
}

/// What metrics and the flow record need from a request before it is consumed.
#[derive(Clone, Debug)]
struct Shape {
    grpc: bool,
    /// The declared body length (a chunked body counts 0).
    request_bytes: u64,
    method: Method,
    /// Path and query as the client sent them.
    path: String,
    authority: String,
    trace_id: String,
}

impl Shape {
    /// Reads the request and gives it a trace context if it has none (see `trace.rs`).
    fn of<B: hyper::body::Body>(req: &mut Request<B>) -> Self {
        let trace_id = trace::ensure(req.headers_mut());
        let authority = match req.uri().authority() {
            Some(a) => a.as_str().to_string(),
            None => req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        };
        Self {
            grpc: req
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            request_bytes: req.body().size_hint().exact().unwrap_or(0),
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(String::new, |p| p.as_str().to_string()),
            authority,
            trace_id,
        }
    }
}

/// The addresses a request's record names, where known.
#[derive(Clone, Copy, Debug)]
struct Ends {
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
}

/// `resp`, with a body that records the request (metrics and flow record) once it has been
/// sent to the end (or dropped): the duration runs to the response's last byte, as Istio's does.
fn recorded(
    shared: &Arc<Shared>,
    flow: Flow,
    both: bool,
    shape: Shape,
    ends: Ends,
    started: Instant,
    mut resp: Response<Body>,
) -> Response<Body> {
    let code = resp.status().as_u16();
    let flags = resp
        .headers()
        .get(FLAGS_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let denial = resp.extensions_mut().remove::<Decision>();
    let why = resp.extensions_mut().remove::<Why>();
    let shared = shared.clone();
    let wall = std::time::SystemTime::now() - started.elapsed();
    resp.map(move |inner| {
        Recorded {
            inner,
            bytes: 0,
            done: Some(Box::new(move |bytes| {
                let protocol = if shape.grpc { "grpc" } else { "http" };
                let outcome = Outcome {
                    protocol,
                    code,
                    flags: &flags,
                    duration: started.elapsed(),
                    request_bytes: shape.request_bytes,
                    response_bytes: bytes,
                };
                let metrics = &shared.metrics;
                metrics.http.record(&flow, &outcome);
                if both {
                    metrics
                        .http
                        .record(&flow.reported_by(Reporter::Destination), &outcome);
                }
                let mut draft = Draft::new(flow);
                draft.started = wall;
                draft.src_addr = ends.src;
                draft.dst_addr = ends.dst;
                draft.bytes_received = shape.request_bytes;
                draft.bytes_sent = bytes;
                match (&denial, why) {
                    (Some(d), _) => draft.denied(d),
                    (None, Some(Why(message))) => draft.failed(&flags, message),
                    (None, None) => draft.flags = flags,
                }
                draft.http = Some(HttpInfo {
                    method: shape.method.to_string(),
                    path: shape.path,
                    authority: shape.authority,
                    protocol: protocol.into(),
                    code,
                    trace_id: shape.trace_id,
                });
                shared.flows.record(draft);
            })),
        }
        .boxed_unsync()
    })
}

/// A response body that counts its bytes and reports them once, at its end or drop.
struct Recorded {
    inner: Body,
    bytes: u64,
    done: Option<Box<dyn FnOnce(u64) + Send>>,
}

impl Recorded {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes);
        }
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Routes and forwards one prepared request from the outbound side.
async fn route_request(
    cx: &Outbound,
    routes: &Routes,
    prepared: Prepared,
    body: Incoming,
) -> Response<Body> {
    let entry = routes.service_at(cx.dst.ip()).cloned();
    let Some(entry) = entry else {
        // A workload addressed directly: one endpoint, no routes.
        return forward(
            cx,
            routes,
            prepared,
            body,
            None,
            cx.dst.port(),
            &RouteRule::default(),
        )
        .await;
    };
    let Some(rule) = select_rule(&entry, cx.dst.port(), &prepared.parts, &prepared.path) else {
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
            && chance(pct)
        {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return reply(status, "FI", "fault injected");
        }
        if let Some((delay, pct)) = f.delay
            && chance(pct)
        {
            tokio::time::sleep(delay).await;
        }
    }
    modify(&mut prepared.parts.headers, &rule.request_headers);
    // Weighted backend choice.
    let (backend, port) = match pick_backend(&rule, &entry, routes, cx.dst.port()) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut resp = match rule.request_timeout {
        Some(t) => match tokio::time::timeout(
            t,
            forward(cx, routes, prepared, body, Some(backend), port, &rule),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => reply(StatusCode::GATEWAY_TIMEOUT, "UT", "request timeout"),
        },
        None => forward(cx, routes, prepared, body, Some(backend), port, &rule).await,
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
        let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
        let mut r = balance::random() % total.max(1);
        let b = rule
            .backends
            .iter()
            .find(|b| {
                let w = u64::from(b.weight);
                if r < w {
                    true
                } else {
                    r -= w;
                    false
                }
            })
            .unwrap_or(&rule.backends[0]);
        let Some(entry) = routes.l7.service(&b.service) else {
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
    routes: &Routes,
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
    let retry = rule.retry.as_ref().filter(|r| r.attempts > 0);
    let small = hyper::body::Body::size_hint(&body)
        .upper()
        .is_some_and(|n| n <= MAX_RETRY_BODY);
    let mut req_body = if retry.is_some() && small {
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
    let attempts = match req_body {
        ReqBody::Replay(_) => retry.map_or(0, |r| r.attempts),
        ReqBody::Once(_) => 0,
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
        let hop = Hop::to(&cx.shared, routes, target.ip());
        if let Hop::Local(dest) = &hop {
            let attrs = prepared.attributes();
            if let Err(d) =
                dest.authorize(&cx.shared, Some(src_id), None, target.port(), Some(&attrs))
            {
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
        let dest = upstream::Dest {
            hop: &hop,
            addr: target,
            h2: cx.h2,
            limits,
        };
        let mut in_flight = None;
        let send = async {
            let conn = cx
                .shared
                .http_pool
                .checkout(&cx.shared, &cx.src, dest)
                .await?;
            // Timed from here: the endpoint's latency, not the connection handshake.
            in_flight = endpoint.as_ref().map(balance::Endpoint::start);
            match conn.send(req).await {
                // An idle connection closed under the request before it was written: nothing
                // was sent, so it goes once more on a new connection.
                Err(UpstreamError::Unsent(req)) => {
                    let pool = &cx.shared.http_pool;
                    pool.forget_idle(&cx.shared, &cx.src, dest);
                    pool.checkout(&cx.shared, &cx.src, dest)
                        .await?
                        .send(req)
                        .await
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
                let retriable = retry.is_some_and(|r| r.codes.contains(&status.as_u16()));
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
            Ok(Err(UpstreamError::Overflow)) => {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UO",
                    "circuit breaker: connection limit reached",
                );
            }
            Ok(Err(UpstreamError::Connect(ProxyError::TunnelRefused {
                status: StatusCode::FORBIDDEN,
                ..
            }))) => {
                // The destination's policy refused this source: not a failure of the endpoint.
                return reply(
                    StatusCode::FORBIDDEN,
                    "RBAC",
                    "RBAC: access denied by the destination's policy",
                );
            }
            Ok(Err(e @ UpstreamError::Connect(_))) => Failed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: "UF",
                message: format!("upstream connect failure: {e}"),
                retriable: retry.is_some_and(|r| r.on_connect_failure),
            },
            Ok(Err(e @ (UpstreamError::Reset(_) | UpstreamError::Unsent(_)))) => Failed {
                status: StatusCode::SERVICE_UNAVAILABLE,
                flags: "UC",
                message: format!("upstream reset: {e}"),
                retriable: retry.is_some_and(|r| r.on_reset),
            },
            // A per-try timeout answers 504, so it is retried when 504 is (as `5xx` says).
            Err(()) => Failed {
                status: StatusCode::GATEWAY_TIMEOUT,
                flags: "UT",
                message: "per-try timeout".into(),
                retriable: retry.is_some_and(|r| r.codes.contains(&504)),
            },
        };
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

/// A try that got no usable answer, and whether the rule retries it.
struct Failed {
    status: StatusCode,
    flags: &'static str,
    message: String,
    retriable: bool,
}

/// How a request body goes upstream.
enum ReqBody {
    /// Read whole, so every try can resend it.
    Replay(Bytes),
    /// Streamed, once.
    Once(Option<Body>),
}

/// The body to forward. A chunked HTTP/1 body (one without an exact length) is held until its
/// first frame has arrived, so a body broken from its first byte (e.g. a chunk-size overflow) is
/// refused and never forwarded; other bodies, HTTP/2 streams included, go at once.
async fn checked_body(version: Version, mut body: Incoming) -> Result<Body, Response<Body>> {
    let chunked = version != Version::HTTP_2
        && !hyper::body::Body::is_end_stream(&body)
        && hyper::body::Body::size_hint(&body).exact().is_none();
    if !chunked {
        return Ok(incoming(body));
    }
    match body.frame().await {
        None => Ok(full(Bytes::new())),
        Some(Err(e)) => Err(reply(
            StatusCode::BAD_REQUEST,
            "DPE",
            &format!("request body: {e}"),
        )),
        Some(Ok(first)) => Ok(Prepend {
            first: Some(first),
            rest: body,
        }
        .boxed_unsync()),
    }
}

/// A body whose first frame was already read.
struct Prepend {
    first: Option<Frame<Bytes>>,
    rest: Incoming,
}

impl hyper::body::Body for Prepend {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }
    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// What an inbound L7 connection's requests share.
#[derive(Debug)]
struct Inbound {
    shared: Arc<Shared>,
    dest: Arc<LocalPod>,
    source: Option<Identity>,
    /// The source as metric labels name it.
    from: Peer,
    /// The source's address.
    peer: SocketAddr,
    port: u16,
    h2: bool,
    h1_app: Mutex<Option<hyper::client::conn::http1::SendRequest<Body>>>,
    h2_app: Mutex<Option<hyper::client::conn::http2::SendRequest<Body>>>,
}

/// Serves a connection to `dest`'s application at L7: every request is authorized with
/// `source` and forwarded over one connection to the application, dialled for the first
/// allowed request (so a refused one never reaches it) and again if the application closes it.
pub async fn serve_inbound<S>(
    shared: Arc<Shared>,
    dest: Arc<LocalPod>,
    source: Option<Identity>,
    (from, peer): (Peer, SocketAddr),
    port: u16,
    protocol: Protocol,
    io: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h2 = protocol == Protocol::Http2;
    let cx = Arc::new(Inbound {
        shared,
        dest,
        source,
        from,
        peer,
        port,
        h2,
        h1_app: Mutex::new(None),
        h2_app: Mutex::new(None),
    });
    let timeouts = cx.shared.http_timeouts;
    let svc = service_fn(move |req| {
        let cx = cx.clone();
        async move { Ok::<_, Infallible>(inbound_request(&cx, req).await) }
    });
    serve(io, protocol, timeouts, svc).await;
}

impl Inbound {
    async fn attach(&self, app: tokio::net::TcpStream) -> Result<(), hyper::Error> {
        let io = TokioIo::new(app);
        if self.h2 {
            let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONN_WINDOW)
                .max_send_buf_size(H2_SEND_BUF)
                .max_header_list_size(H2_DECODE_LIMIT)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            *lock(&self.h2_app) = Some(s);
        } else {
            let (s, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await?;
            tokio::spawn(conn.with_upgrades());
            *lock(&self.h1_app) = Some(s);
        }
        Ok(())
    }

    async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        for _ in 0..2 {
            if self.h2 {
                let s = lock(&self.h2_app).clone().filter(|s| !s.is_closed());
                if let Some(mut s) = s {
                    return s.send_request(req).await.map_err(|e| e.to_string());
                }
            } else {
                let s = lock(&self.h1_app).take().filter(|s| !s.is_closed());
                if let Some(mut s) = s {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let fut = s.send_request(req);
                    *lock(&self.h1_app) = Some(s);
                    return fut.await.map_err(|e| e.to_string());
                }
            }
            let app = self
                .dest
                .dial_app(self.port)
                .await
                .map_err(|e| e.to_string())?;
            self.attach(app).await.map_err(|e| e.to_string())?;
        }
        Err("the application keeps closing its connection".into())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn inbound_request(cx: &Inbound, mut req: Request<Incoming>) -> Response<Body> {
    cx.dest.counters.http_requests.inc();
    let started = Instant::now();
    let shape = Shape::of(&mut req);
    let switching = req.headers().contains_key(header::UPGRADE);
    let routes = cx.shared.routes();
    let upgrades = routes.upgrades_to(cx.dest.pod.ip, cx.port);
    let (resp, downstream) = match prepare(req, &routes.state.mesh, upgrades) {
        Ok((mut prepared, body)) => {
            let downstream = prepared.upgrade.take();
            (authorize_and_send(cx, prepared, body).await, downstream)
        }
        Err(r) => (r, None),
    };
    let resp = switch_protocols(resp, downstream, switching);
    let flow = Flow {
        reporter: Reporter::Destination,
        src: cx.from.clone(),
        dst: Peer::new(&cx.dest.pod.key, cx.dest.identity()),
        service: crate::metrics::UNKNOWN.into(),
        security: if cx.source.is_some() {
            Security::MutualTls
        } else {
            Security::None
        },
    };
    let ends = Ends {
        src: Some(cx.peer),
        dst: Some(SocketAddr::new(cx.dest.pod.ip, cx.port)),
    };
    recorded(&cx.shared, flow, false, shape, ends, started, resp)
}

/// Authorizes one prepared request on the inbound side and sends it to the application.
async fn authorize_and_send(cx: &Inbound, prepared: Prepared, body: Incoming) -> Response<Body> {
    let attrs = prepared.attributes();
    if let Err(d) = cx.dest.authorize(
        &cx.shared,
        cx.source.as_ref(),
        Some(cx.peer),
        cx.port,
        Some(&attrs),
    ) {
        return forbidden(d);
    }
    let body = match checked_body(prepared.parts.version, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match cx.send(rebuild(&prepared.parts, body)).await {
        Ok(mut resp) => {
            strip_response(resp.status(), resp.headers_mut());
            resp.map(incoming)
        }
        Err(e) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "UC",
            &format!("application: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(value: &'static str, list: &[&str]) -> Option<String> {
        let list: Vec<String> = list.iter().map(ToString::to_string).collect();
        allowed_upgrades(&HeaderValue::from_static(value), &list)
            .map(|v| v.to_str().unwrap_or_default().to_string())
    }

    #[test]
    fn only_allowed_upgrade_tokens_are_forwarded() {
        let ws = ["websocket"];
        assert_eq!(allowed("h2c", &ws), None);
        assert_eq!(allowed("websocket", &ws).as_deref(), Some("websocket"));
        assert_eq!(allowed("WebSocket", &ws).as_deref(), Some("WebSocket"));
        assert_eq!(allowed("h2c, websocket", &ws).as_deref(), Some("websocket"));
        assert_eq!(
            allowed("websocket/13, h2c", &ws).as_deref(),
            Some("websocket/13")
        );
        assert_eq!(allowed("h2c", &["websocket", "mesh-echo"]), None);
        assert_eq!(
            allowed("mesh-echo", &["websocket", "mesh-echo"]).as_deref(),
            Some("mesh-echo")
        );
    }

    fn status(code: u16) -> Response<Body> {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        r
    }

    #[tokio::test]
    async fn a_switch_nobody_asked_for_is_refused_and_closes() {
        // An upstream 101 to a request that asked for nothing, or for an upgrade that was
        // removed: 502 UPE, and the client's connection closes.
        for asked in [false, true] {
            let r = switch_protocols(status(101), None, asked);
            assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
            assert_eq!(
                r.headers().get(FLAGS_HEADER).and_then(|v| v.to_str().ok()),
                Some("UPE")
            );
            assert_eq!(
                r.headers()
                    .get(header::CONNECTION)
                    .and_then(|v| v.to_str().ok()),
                Some("close")
            );
        }
        // A request that asked and was declined: the answer passes, then the connection closes.
        let r = switch_protocols(status(200), None, true);
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().get(header::CONNECTION).is_some());
        // An ordinary request: untouched, kept alive.
        let r = switch_protocols(status(200), None, false);
        assert!(r.headers().get(header::CONNECTION).is_none());
    }
}
