//! What every HTTP path does to a message, whichever way it goes: the proxy's own replies and
//! their response flags, hop-by-hop headers, header edits, the checks before routing
//! (`prepare`), protocol switches, and request bodies held for retries or for their first
//! frame.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::{
    Request, Response,
    body::{Frame, SizeHint},
};
use hyper_util::rt::TokioIo;
use tracing::{debug, warn};

use crate::{
    authz::{Decision, HttpAttributes},
    protocol::{
        body::{Body, BoxError, full},
        guard, path,
    },
    route::{balance::InFlight, limits::Slot},
    state::{HeaderModifier, MeshConfig},
    transport::relay,
};

/// The header carrying the proxy's response flags on replies it made itself.
pub const FLAGS_HEADER: &str = "x-mesh-flags";

/// A reply made by the proxy itself. Its message also goes to the request's flow record.
pub(super) fn reply(status: StatusCode, flags: &str, message: &str) -> Response<Body> {
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
pub(super) struct Why(pub(super) String);

/// 403 for a request authorization refused; the record names the policy.
pub(super) fn forbidden(decision: Decision) -> Response<Body> {
    let mut r = reply(StatusCode::FORBIDDEN, "RBAC", "RBAC: access denied");
    r.extensions_mut().insert(decision);
    r
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

pub(super) fn modify(headers: &mut HeaderMap, m: &HeaderModifier) {
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

/// The request after the checks every path shares: CONNECT refused, path normalized, URI in the
/// form the upstream protocol expects, hop-by-hop headers gone, and only allowed upgrades left.
pub(super) struct Prepared {
    pub(super) parts: http::request::Parts,
    /// The normalized path, without query.
    pub(super) path: String,
    /// The path as DENY rules also see it (`path::deny_form`).
    pub(super) deny_path: String,
    /// Whether `deny_path` is case-folded.
    pub(super) fold_case: bool,
    /// The client's side of an allowed protocol switch that was forwarded.
    pub(super) upgrade: Option<hyper::upgrade::OnUpgrade>,
}

impl Prepared {
    /// Sends the request on with `path` (normalized) in place of its own, query kept; what
    /// authorization sees changes with it, since that is what the backend receives.
    pub(super) fn set_path(&mut self, path: String) -> Result<(), String> {
        let path_and_query = match self.parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut uri = http::uri::Builder::new().path_and_query(path_and_query);
        if let (Some(s), Some(a)) = (self.parts.uri.scheme(), self.parts.uri.authority()) {
            uri = uri.scheme(s.clone()).authority(a.clone());
        }
        self.parts.uri = uri.build().map_err(|e| format!("rewritten path: {e}"))?;
        self.deny_path = path::deny_form(&path, self.fold_case);
        self.path = path;
        Ok(())
    }

    /// Sends the request on for `host`: its `Host` header, and HTTP/2's `:authority`.
    pub(super) fn set_host(&mut self, host: &str) -> Result<(), String> {
        let bad = |e: &dyn std::fmt::Display| format!("rewritten host: {e}");
        if self.parts.uri.authority().is_some() {
            let mut p = self.parts.uri.clone().into_parts();
            p.authority = Some(host.parse().map_err(|e| bad(&e))?);
            self.parts.uri = http::Uri::from_parts(p).map_err(|e| bad(&e))?;
        }
        if self.parts.version != Version::HTTP_2 || self.parts.headers.contains_key(header::HOST) {
            let v = HeaderValue::from_str(host).map_err(|e| bad(&e))?;
            self.parts.headers.insert(header::HOST, v);
        }
        Ok(())
    }

    /// What authorization looks at.
    pub(super) fn attributes(&self) -> HttpAttributes<'_> {
        HttpAttributes {
            method: self.parts.method.as_str(),
            path: &self.path,
            deny_path: &self.deny_path,
            fold_case: self.fold_case,
            host: crate::authz::request_host(&self.parts),
            headers: &self.parts.headers,
        }
    }
}

/// The tokens of an `Upgrade` value that `allowed` names (by protocol name, any version), in the
/// client's order; the rest are dropped so the upstream answers as HTTP/1.1.
pub(super) fn allowed_upgrades(value: &HeaderValue, allowed: &[String]) -> Option<HeaderValue> {
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
pub(super) fn prepare<B>(
    req: Request<B>,
    mesh: &MeshConfig,
    upgrades: &[String],
) -> Result<(Prepared, B), Response<Body>> {
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
    // The common case keeps the URI as it is: already what the upstream should get.
    if path != parts.uri.path() || !right_form {
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
    }
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
pub(super) fn strip_response(status: StatusCode, headers: &mut HeaderMap) {
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
pub(super) fn switch_protocols(
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
                if let Err(e) = relay::copy_both(&mut down, &mut up).await {
                    debug!("upgraded connection ended: {e}");
                }
            }
            Err(e) => debug!("protocol switch failed: {e}"),
        }
    });
    resp
}

pub(super) fn with_close(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A fresh request from `p` with `body`.
pub(super) fn rebuild(p: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req
}

/// A response body that holds the request's slots until it has been read to the end (or
/// dropped), so limits count requests, not just response heads.
pub(super) struct Held<B> {
    pub(super) inner: B,
    pub(super) _hold: (Option<Slot>, Option<InFlight>),
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

/// How a request body goes upstream.
pub(super) enum ReqBody {
    /// Read whole, so every try can resend it.
    Replay(Bytes),
    /// Streamed, once.
    Once(Option<Body>),
}

/// The body to forward. A chunked HTTP/1 body (one without an exact length) is held until its
/// first frame has arrived, so a body broken from its first byte (e.g. a chunk-size overflow) is
/// refused and never forwarded; other bodies, HTTP/2 streams included, go at once.
pub(super) async fn checked_body(version: Version, mut body: Body) -> Result<Body, Response<Body>> {
    let chunked = version != Version::HTTP_2
        && !hyper::body::Body::is_end_stream(&body)
        && hyper::body::Body::size_hint(&body).exact().is_none();
    if !chunked {
        return Ok(body);
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
pub(super) struct Prepend {
    first: Option<Frame<Bytes>>,
    rest: Body,
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
        Pin::new(&mut self.rest).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("test request")
    }

    #[expect(clippy::result_large_err, reason = "the error is the reply itself")]
    fn prepared(req: Request<()>) -> Result<Prepared, Response<Body>> {
        prepare(req, &MeshConfig::default(), &["websocket".to_string()]).map(|(p, ())| p)
    }

    fn refused(req: Request<()>) -> (StatusCode, String) {
        match prepared(req) {
            Ok(_) => panic!("the request was not refused"),
            Err(r) => (r.status(), flags(&r)),
        }
    }

    fn flags(r: &Response<Body>) -> String {
        r.headers()
            .get(FLAGS_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn connect_is_not_proxied() {
        let r = request("CONNECT", "example.com:443", Version::HTTP_11, &[]);
        assert_eq!(refused(r), (StatusCode::METHOD_NOT_ALLOWED, "NR".into()));
    }

    #[test]
    fn too_many_headers_is_431_on_http2_as_on_http1() {
        let names: Vec<String> = (0..=guard::MAX_HEADERS)
            .map(|i| format!("x-h{i}"))
            .collect();
        let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        let r = request("GET", "http://a/", Version::HTTP_2, &headers);
        assert_eq!(
            refused(r),
            (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "DPE".into())
        );
    }

    #[test]
    fn a_header_list_over_the_head_limit_is_431() {
        let big = "v".repeat(guard::MAX_HEAD);
        let r = request("GET", "http://a/", Version::HTTP_2, &[("x-big", &big)]);
        assert_eq!(refused(r).0, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    #[test]
    fn an_upgrade_outside_http11_is_501() {
        let r = request(
            "GET",
            "http://a/",
            Version::HTTP_2,
            &[("upgrade", "websocket")],
        );
        assert_eq!(refused(r).0, StatusCode::NOT_IMPLEMENTED);
    }

    #[test]
    fn a_path_with_a_bad_escape_is_400() {
        let r = request("GET", "/a%zz", Version::HTTP_11, &[("host", "a")]);
        assert_eq!(refused(r), (StatusCode::BAD_REQUEST, "DPE".into()));
    }

    #[test]
    fn the_path_is_normalized_once_and_the_upstream_gets_it_with_the_query() {
        let r = request(
            "GET",
            "/a/./b/../c//d?x=1",
            Version::HTTP_11,
            &[("host", "a")],
        );
        let p = prepared(r).expect("accepted");
        assert_eq!(p.path, "/a/c/d");
        assert_eq!(p.parts.uri.to_string(), "/a/c/d?x=1");
    }

    #[test]
    fn deny_rules_see_the_decoded_case_folded_path() {
        let r = request("GET", "/ADMIN%2e", Version::HTTP_11, &[("host", "a")]);
        let p = prepared(r).expect("accepted");
        assert_eq!(p.deny_path, "/admin");
        assert!(p.fold_case);
    }

    #[test]
    fn http2_keeps_scheme_and_authority_when_the_path_changes() {
        let r = request("GET", "http://web:80/a//b", Version::HTTP_2, &[]);
        let p = prepared(r).expect("accepted");
        assert_eq!(p.parts.uri.to_string(), "http://web:80/a/b");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let r = request(
            "GET",
            "/",
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("connection", "x-private, keep-alive"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "secret"),
                ("te", "gzip"),
                ("x-kept", "1"),
            ],
        );
        let h = prepared(r).expect("accepted").parts.headers;
        for gone in [
            "connection",
            "x-private",
            "keep-alive",
            "proxy-authorization",
            "te",
        ] {
            assert!(h.get(gone).is_none(), "{gone} was forwarded");
        }
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn te_trailers_is_kept_for_grpc() {
        let r = request("POST", "http://a/", Version::HTTP_2, &[("te", "trailers")]);
        let h = prepared(r).expect("accepted").parts.headers;
        assert_eq!(h.get("te").and_then(|v| v.to_str().ok()), Some("trailers"));
    }

    #[test]
    fn an_upgrade_the_service_does_not_allow_is_removed() {
        let r = request(
            "GET",
            "/",
            Version::HTTP_11,
            &[("host", "a"), ("connection", "upgrade"), ("upgrade", "h2c")],
        );
        let h = prepared(r).expect("accepted").parts.headers;
        assert!(h.get("upgrade").is_none());
        assert!(h.get("connection").is_none());
    }

    #[test]
    fn an_allowed_upgrade_is_forwarded_end_to_end() {
        let r = request(
            "GET",
            "/",
            Version::HTTP_11,
            &[
                ("host", "a"),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
            ],
        );
        let h = prepared(r).expect("accepted").parts.headers;
        assert_eq!(
            h.get("upgrade").and_then(|v| v.to_str().ok()),
            Some("websocket")
        );
        assert_eq!(
            h.get("connection").and_then(|v| v.to_str().ok()),
            Some("upgrade")
        );
    }

    #[test]
    fn a_switching_response_keeps_naming_its_protocol() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_response(StatusCode::SWITCHING_PROTOCOLS, &mut h);
        assert_eq!(
            h.get(header::UPGRADE).and_then(|v| v.to_str().ok()),
            Some("websocket")
        );
        assert!(h.get("keep-alive").is_none());
        let mut h2 = HeaderMap::new();
        h2.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_response(StatusCode::OK, &mut h2);
        assert!(
            h2.get(header::UPGRADE).is_none(),
            "only a 101 keeps Upgrade"
        );
    }

    #[test]
    fn the_proxys_own_replies_carry_flags_and_say_why() {
        let r = reply(StatusCode::SERVICE_UNAVAILABLE, "UO", "circuit breaker");
        assert_eq!(flags(&r), "UO");
        assert_eq!(
            r.extensions().get::<Why>().map(|w| w.0.as_str()),
            Some("circuit breaker")
        );
        let d = forbidden(Decision::Denied(crate::state::testing::key(
            "default",
            "deny-admin",
        )));
        assert_eq!(
            (d.status(), flags(&d)),
            (StatusCode::FORBIDDEN, "RBAC".into())
        );
        assert!(
            d.extensions().get::<Decision>().is_some(),
            "the record names the policy"
        );
    }

    #[test]
    fn header_edits_set_add_and_remove() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("old"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let m = HeaderModifier {
            set: vec![(
                HeaderName::from_static("x-a"),
                HeaderValue::from_static("new"),
            )],
            add: vec![(
                HeaderName::from_static("x-b"),
                HeaderValue::from_static("1"),
            )],
            remove: vec![HeaderName::from_static("x-gone")],
        };
        modify(&mut h, &m);
        assert_eq!(h.get("x-a").and_then(|v| v.to_str().ok()), Some("new"));
        assert!(h.get("x-b").is_some());
        assert!(h.get("x-gone").is_none());
    }

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
