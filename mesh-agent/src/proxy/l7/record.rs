//! What a request leaves behind: its Istio metrics and its flow record, filed once its response
//! has been sent to the end (or dropped), so the duration runs to the last byte.

use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{Method, header};
use http_body_util::BodyExt;
use hyper::{
    Request, Response,
    body::{Frame, SizeHint},
};

use super::message::{FLAGS_HEADER, Why};
use crate::proxy::inputs::ProxyInputs;
use crate::{
    authz::Decision,
    protocol::{
        body::{Body, BoxError},
        trace,
    },
    state::ObjectKey,
    telemetry::{
        flows::{Draft, HttpInfo},
        metrics::{
            http::Outcome,
            labels::{Flow, Reporter},
        },
    },
};

/// Where a request was answered, for its metrics.
#[derive(Clone, Debug)]
pub(super) struct Served {
    pub(super) addr: SocketAddr,
    pub(super) service: Option<ObjectKey>,
    pub(super) hbone: bool,
}

/// What metrics and the flow record need from a request before it is consumed.
#[derive(Clone, Debug)]
pub(super) struct Shape {
    /// When the request arrived.
    started: Instant,
    /// Whether it asked to switch protocols.
    pub(super) upgrade: bool,
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
    pub(super) fn of<B: hyper::body::Body>(req: &mut Request<B>) -> Self {
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
            started: Instant::now(),
            upgrade: req.headers().contains_key(header::UPGRADE),
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
pub(super) struct Ends {
    pub(super) src: Option<SocketAddr>,
    pub(super) dst: Option<SocketAddr>,
}

/// `resp`, with a body that records the request (metrics and flow record) once it has been
/// sent to the end (or dropped): the duration runs to the response's last byte, as Istio's does.
pub(super) fn recorded(
    inputs: &ProxyInputs,
    flow: Flow,
    both: bool,
    shape: Shape,
    ends: Ends,
    mut resp: Response<Body>,
) -> Response<Body> {
    let code = resp.status().as_u16();
    let flags: std::borrow::Cow<'static, str> = resp
        .headers()
        .get(FLAGS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map_or("-".into(), |f| f.to_string().into());
    let denial = resp.extensions_mut().remove::<Decision>();
    let why = resp.extensions_mut().remove::<Why>();
    // A trailers-only gRPC answer carries its status in the head.
    let head_status = grpc_status_of(resp.headers());
    let (metrics, flows) = (inputs.metrics.clone(), inputs.flows.clone());
    let started = shape.started;
    let wall = std::time::SystemTime::now() - started.elapsed();
    resp.map(move |inner| {
        Recorded {
            inner,
            bytes: 0,
            grpc_status: head_status,
            done: Some(Box::new(move |bytes, trailer_status| {
                let protocol = if shape.grpc { "grpc" } else { "http" };
                let grpc_status = if shape.grpc {
                    trailer_status.unwrap_or_else(|| grpc_status_for_http(code))
                } else {
                    String::new()
                };
                let outcome = Outcome {
                    protocol,
                    grpc_status: &grpc_status,
                    code,
                    flags: &flags,
                    duration: started.elapsed(),
                    request_bytes: shape.request_bytes,
                    response_bytes: bytes,
                };
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
                    (None, Some(Why(message))) => draft.failed(flags, message),
                    (None, None) => draft.flags = flags,
                }
                draft.http = Some(HttpInfo {
                    method: method_name(&shape.method),
                    path: shape.path,
                    authority: shape.authority,
                    protocol: protocol.into(),
                    code,
                    trace_id: shape.trace_id,
                });
                flows.record(draft);
            })),
        }
        .boxed_unsync()
    })
}

/// `m`'s name, shared for the standard methods: a kept flow record then holds no string for it.
fn method_name(m: &http::Method) -> std::borrow::Cow<'static, str> {
    use http::Method;
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    STANDARD
        .iter()
        .find(|(s, _)| s == m)
        .map_or_else(|| m.as_str().to_owned().into(), |(_, name)| (*name).into())
}

/// The `grpc-status` in `headers` (a head or trailers), if any.
fn grpc_status_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The gRPC status a client library reports for an answer with HTTP status `code` and no
/// `grpc-status` (gRPC's HTTP-to-gRPC status mapping), so the proxy's own refusals of a gRPC
/// call count under the status the caller saw. A 200 without one is a broken stream: unknown.
fn grpc_status_for_http(code: u16) -> String {
    match code {
        400 => "13",
        401 => "16",
        403 => "7",
        404 => "12",
        429 | 502..=504 => "14",
        _ => "2",
    }
    .to_string()
}

/// What a recorded response's end reports: its body bytes, and the `grpc-status` its trailers
/// (or head) carried.
type Done = Box<dyn FnOnce(u64, Option<String>) + Send>;

/// A response body that counts its bytes and reports them once, at its end or drop.
pub(super) struct Recorded {
    inner: Body,
    bytes: u64,
    grpc_status: Option<String>,
    done: Option<Done>,
}

impl Recorded {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes, self.grpc_status.take());
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
                } else if let Some(t) = f.trailers_ref()
                    && let Some(s) = grpc_status_of(t)
                {
                    self.grpc_status = Some(s);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A gRPC call refused by the proxy counts under the status its caller's library reports.
    #[test]
    fn grpc_status_follows_grpcs_http_mapping() {
        let got: Vec<String> = [400, 401, 403, 404, 429, 502, 503, 504, 500, 200]
            .into_iter()
            .map(grpc_status_for_http)
            .collect();
        assert_eq!(
            got,
            ["13", "16", "7", "12", "14", "14", "14", "14", "2", "2"]
        );
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status_of(&h), None);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status_of(&h).as_deref(), Some("5"));
    }
}
