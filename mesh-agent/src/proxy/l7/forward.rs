//! The tries of one routed request: the backend's circuit breaker and retry budget, the
//! endpoint by P2C over peak EWMA (avoiding the last one on a retry), authorization when the
//! endpoint is on this node, the upstream connection, the per-try timeout, retries on the rule's
//! codes, resets and connect failures, and outlier detection on every try. It reaches upstreams
//! through [`Upstream`]: the node's pools in production, an in-memory one in the tests below.

use std::{future::Future, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use tracing::{debug, warn};

use super::{
    message::{
        FLAGS_HEADER, Held, Prepared, ReqBody, checked_body, forbidden, rebuild, reply,
        strip_response,
    },
    record::Served,
    tries,
};
use crate::{
    identity::Identity,
    pods::LocalPod,
    protocol::body::{Body, full},
    proxy::admission::authorize,
    route::{balance, table::ServiceEntry},
    state::RouteRule,
    telemetry::flows::FlowLog,
    transport::{
        dial::{Dialer, Hop},
        upstream::{self, Dest, UpstreamError},
    },
    view::Snapshot,
};

/// Where tries go: a connection to an endpoint, then the request on it (apart, so latency is
/// timed from the send, not the handshake).
pub trait Upstream: Sync {
    /// A connection good for one request.
    type Conn: Send;
    /// A connection to `dest`; `fresh` passes over idle ones (one just proved stale).
    fn checkout(
        &self,
        dest: Dest<'_>,
        fresh: bool,
    ) -> impl Future<Output = Result<Self::Conn, UpstreamError>> + Send;
    /// Sends `req` on `conn`.
    fn send(
        conn: Self::Conn,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, UpstreamError>> + Send;
}

/// The node's upstream pools, for one source pod.
#[derive(Debug)]
pub struct Pools<'a> {
    /// The HTTP connection pools.
    pub pool: &'a Arc<upstream::Pool>,
    /// How new connections are made.
    pub dialer: &'a Dialer,
    /// The pod the requests come from.
    pub src: &'a LocalPod,
}

impl Upstream for Pools<'_> {
    type Conn = upstream::Conn;

    async fn checkout(&self, dest: Dest<'_>, fresh: bool) -> Result<upstream::Conn, UpstreamError> {
        if fresh {
            self.pool.forget_idle(self.dialer, self.src, dest);
        }
        self.pool.checkout(self.dialer, self.src, dest).await
    }

    async fn send(
        conn: upstream::Conn,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        conn.send(req).await
    }
}

/// What the tries of a request read.
#[derive(Debug)]
pub struct Forward<'a, U> {
    /// The snapshot the request was routed in.
    pub view: &'a Snapshot,
    /// Where a same-node denial is filed.
    pub flows: &'a FlowLog,
    /// The source pod's identity.
    pub src_id: &'a Identity,
    /// The source pod (the proxy dials from inside it): its address toward a same-node
    /// endpoint is what policies' `ipBlocks` match.
    pub src: &'a crate::state::Pod,
    /// Where the client was going (the endpoint when there is no backend service).
    pub dst: SocketAddr,
    /// HTTP/2 upstream (otherwise HTTP/1).
    pub h2: bool,
    /// The upstream.
    pub upstream: &'a U,
}

/// Sends the request to an endpoint of `backend` (or to `cx.dst` when there is none), with the
/// rule's tries and per-try timeout.
pub(super) async fn forward<U: Upstream>(
    cx: &Forward<'_, U>,
    prepared: Prepared,
    body: Body,
    backend: Option<Arc<ServiceEntry>>,
    port: u16,
    rule: &RouteRule,
) -> Response<Body> {
    let view = cx.view;
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
    let src_id = cx.src_id;
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
                Some(e) => (
                    Some(e.clone()),
                    SocketAddr::new(view.routes.dial_ip(e.ip, cx.dst.ip()), port),
                ),
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
        // The endpoint as the balancer knows it (its primary address), not the family dialled.
        avoid = Some(endpoint.as_ref().map_or(target.ip(), |e| e.ip));
        let hop = Hop::to(view, target.ip());
        if let Hop::Local(dest) = &hop {
            let attrs = prepared.attributes();
            let flows = cx.flows;
            let port = target.port();
            let from = Some(SocketAddr::new(cx.src.ip_toward(target.ip()), 0));
            if let Err(d) = authorize(view, flows, dest, Some(src_id), from, port, Some(&attrs)) {
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
            let conn = cx.upstream.checkout(dest, false).await?;
            // Timed from here: the endpoint's latency, not the connection handshake.
            in_flight = endpoint.as_ref().map(balance::Endpoint::start);
            match U::send(conn, req).await {
                // An idle connection closed under the request before it was written: nothing
                // was sent, so it goes once more on a new connection.
                Err(UpstreamError::Unsent(req)) => {
                    let conn = cx.upstream.checkout(dest, true).await?;
                    U::send(conn, req).await
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

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, time::Duration};

    use parking_lot::Mutex;

    use super::*;
    use crate::{
        state::{
            MeshConfig, NodeState, RetryPolicy, TrafficPolicy,
            testing::{service, state, workload},
        },
        telemetry::{flows::AccessLogFormat, metrics::Metrics},
        transport::error::TransportError,
        view::View,
    };

    /// What the in-memory upstream does with one try.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Status(u16),
        ConnectFails,
        Hangs,
    }

    /// An upstream that answers tries from a script and notes where each went.
    #[derive(Debug, Default)]
    struct Script {
        answers: Mutex<VecDeque<Answer>>,
        tried: Mutex<Vec<SocketAddr>>,
    }

    impl Script {
        fn new(answers: &[Answer]) -> Self {
            Self {
                answers: Mutex::new(answers.iter().copied().collect()),
                tried: Mutex::default(),
            }
        }
        fn tried(&self) -> Vec<SocketAddr> {
            self.tried.lock().clone()
        }
    }

    impl Upstream for Script {
        type Conn = Answer;

        async fn checkout(&self, dest: Dest<'_>, _fresh: bool) -> Result<Answer, UpstreamError> {
            self.tried.lock().push(dest.addr);
            match self
                .answers
                .lock()
                .pop_front()
                .unwrap_or(Answer::Status(200))
            {
                Answer::ConnectFails => Err(UpstreamError::Connect(TransportError::Connect {
                    addr: dest.addr,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                })),
                a => Ok(a),
            }
        }

        async fn send(conn: Answer, _req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
            match conn {
                Answer::Status(code) => {
                    let mut r = Response::new(full(Bytes::new()));
                    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
                    Ok(r)
                }
                Answer::Hangs => std::future::pending().await,
                Answer::ConnectFails => unreachable!("refused at checkout"),
            }
        }
    }

    /// A cluster of one service, `web` (80 → 8080), on two endpoints of another node.
    fn node_state(policy: TrafficPolicy) -> NodeState {
        let web = service(
            "web",
            "10.96.0.10",
            &[(80, 8080)],
            &["10.0.0.1", "10.0.0.2"],
        );
        let mut st = state(
            vec![web.clone()],
            vec![
                workload("web-1", "10.0.0.1", "web", "node-2"),
                workload("web-2", "10.0.0.2", "web", "node-2"),
            ],
        );
        st.traffic_policies.insert(web.key, policy);
        st
    }

    fn budget() -> TrafficPolicy {
        TrafficPolicy {
            retry_budget_percent: 100,
            min_retries_per_second: 100,
            ..TrafficPolicy::default()
        }
    }

    fn retry(attempts: u32, codes: &[u16], on_connect_failure: bool) -> RouteRule {
        RouteRule {
            retry: Some(RetryPolicy {
                attempts,
                codes: codes.to_vec(),
                on_reset: false,
                on_connect_failure,
                backoff: Duration::ZERO,
            }),
            ..RouteRule::default()
        }
    }

    /// Sends one GET with `body` through `forward` to `web`, against `script`.
    async fn run(
        policy: TrafficPolicy,
        rule: &RouteRule,
        script: &Script,
        body: Body,
    ) -> Response<Body> {
        let view = View::new("cluster.local");
        view.publish(&Arc::new(node_state(policy)), []);
        let snap = view.load();
        let metrics = Metrics::new(Duration::from_secs(60), "Kubernetes").expect("metrics");
        let flows = FlowLog::new(AccessLogFormat::Off, &metrics).expect("flow log");
        let src = Identity::new("cluster.local", "default", "client");
        let cx = Forward {
            view: &snap,
            flows: &flows,
            src_id: &src,
            src: &crate::state::testing::pod("client", "127.0.0.1"),
            dst: "10.96.0.10:80".parse().expect("address"),
            h2: false,
            upstream: script,
        };
        let req = Request::get("/")
            .header("host", "web")
            .body(())
            .expect("request");
        let (prepared, ()) = super::super::message::prepare(req, &MeshConfig::default(), &[])
            .expect("a plain GET passes the checks");
        let entry = snap
            .routes
            .service_at("10.96.0.10".parse().expect("address"))
            .cloned();
        forward(&cx, prepared, body, entry, 8080, rule).await
    }

    fn flags(r: &Response<Body>) -> &str {
        r.headers()
            .get(FLAGS_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    }

    fn empty() -> Body {
        full(Bytes::new())
    }

    #[tokio::test]
    async fn a_retried_status_moves_to_another_endpoint_and_its_answer_is_returned() {
        // The balancer picks at random, so the avoidance is checked on many requests.
        for _ in 0..20 {
            let s = Script::new(&[Answer::Status(503), Answer::Status(200)]);
            let r = run(budget(), &retry(2, &[503], false), &s, empty()).await;
            assert_eq!(r.status(), StatusCode::OK);
            let tried = s.tried();
            assert_eq!(tried.len(), 2);
            assert_ne!(
                tried[0], tried[1],
                "a retry avoids the endpoint that failed"
            );
            assert!(tried.iter().all(|a| a.port() == 8080));
        }
    }

    #[tokio::test]
    async fn exhausted_retries_return_the_last_upstream_answer_as_it_is() {
        let s = Script::new(&[Answer::Status(503); 3]);
        let r = run(budget(), &retry(2, &[503], false), &s, empty()).await;
        // The upstream made this answer, so it carries no flag of the proxy's.
        assert_eq!(
            (r.status(), flags(&r)),
            (StatusCode::SERVICE_UNAVAILABLE, "-")
        );
        assert_eq!(s.tried().len(), 3, "the first try and two retries");
    }

    #[tokio::test]
    async fn a_status_the_rule_does_not_retry_is_returned_at_once() {
        let s = Script::new(&[Answer::Status(500)]);
        let r = run(budget(), &retry(2, &[503], false), &s, empty()).await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(s.tried().len(), 1);
    }

    #[tokio::test]
    async fn a_connect_failure_is_retried_only_when_the_rule_says_so() {
        let s = Script::new(&[Answer::ConnectFails, Answer::Status(200)]);
        let r = run(budget(), &retry(1, &[], true), &s, empty()).await;
        assert_eq!(r.status(), StatusCode::OK);
        let s = Script::new(&[Answer::ConnectFails, Answer::Status(200)]);
        let r = run(budget(), &retry(1, &[], false), &s, empty()).await;
        assert_eq!(
            (r.status(), flags(&r)),
            (StatusCode::SERVICE_UNAVAILABLE, "UF")
        );
        assert_eq!(s.tried().len(), 1);
    }

    #[tokio::test]
    async fn a_hung_try_ends_at_the_per_try_timeout_with_504_ut() {
        let s = Script::new(&[Answer::Hangs]);
        let rule = RouteRule {
            backend_timeout: Some(Duration::from_millis(20)),
            ..RouteRule::default()
        };
        let r = run(budget(), &rule, &s, empty()).await;
        assert_eq!((r.status(), flags(&r)), (StatusCode::GATEWAY_TIMEOUT, "UT"));
    }

    #[tokio::test]
    async fn the_circuit_breaker_refuses_before_any_try() {
        let s = Script::new(&[]);
        let policy = TrafficPolicy {
            max_requests: Some(0),
            ..budget()
        };
        let r = run(policy, &retry(2, &[503], false), &s, empty()).await;
        assert_eq!(
            (r.status(), flags(&r)),
            (StatusCode::SERVICE_UNAVAILABLE, "UO")
        );
        assert!(s.tried().is_empty());
    }

    #[tokio::test]
    async fn a_body_too_large_to_hold_goes_once() {
        let s = Script::new(&[Answer::Status(503), Answer::Status(200)]);
        let big = full(vec![b'x'; 100 * 1024]);
        let r = run(budget(), &retry(2, &[503], false), &s, big).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(flags(&r), "-", "no retry was possible, so none is reported");
        assert_eq!(s.tried().len(), 1);
    }

    /// URX: a retry the rule asked for was not made, because the budget was spent.
    /// URX: a retry the rule asked for was not made, because the budget was spent.
    #[tokio::test]
    async fn an_empty_retry_budget_stops_retries() {
        let s = Script::new(&[Answer::Status(503), Answer::Status(200)]);
        let none = TrafficPolicy {
            retry_budget_percent: 0,
            min_retries_per_second: 0,
            ..TrafficPolicy::default()
        };
        let r = run(none, &retry(2, &[503], false), &s, empty()).await;
        assert_eq!(
            (r.status(), flags(&r)),
            (StatusCode::SERVICE_UNAVAILABLE, "URX")
        );
        assert_eq!(s.tried().len(), 1);
    }
}
