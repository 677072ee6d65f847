//! The L7 parts of the node file: `httpRoutes` (Gateway API HTTPRoute attached to a Service, as
//! GAMMA does) and `destinationRules` (Istio's `trafficPolicy` shape, plus a local rate limit and
//! a retry budget).
//!
//! A route or rule that fails validation is reported and, on a reload, kept at its last valid
//! version; one never seen valid is left out, so its service keeps default routing. Routes carry
//! no security decision, so leaving one out cannot open anything.

use std::time::Duration;

use super::{
    fields::{Ctx, ObjectError, who},
    filters::{filters, hostname},
    raw::route::{RawDestinationRule, RawHttpRoute, RawRouteRule, RawValueMatch},
};
use crate::{
    config::parse_duration,
    state::{
        BackendRef, Fault, HttpRoute, LbPolicy, NodeState, ObjectKey, OutlierDetection, PathMatch,
        Pattern, RateLimit, RetryPolicy, RouteMatch, RouteRule, TrafficPolicy, ValueMatch,
    },
};

/// The service a DestinationRule's `host` names, as Istio reads it: a short name is in the rule's
/// namespace; `name.namespace`, `name.namespace.svc` and `name.namespace.svc.<cluster domain>`
/// name their own.
fn service_host(host: &str, rule_namespace: &str) -> Option<ObjectKey> {
    let parts: Vec<&str> = host.split('.').collect();
    let (name, namespace) = match parts.as_slice() {
        [name] => (*name, rule_namespace),
        [name, ns] | [name, ns, "svc"] => (*name, *ns),
        [name, ns, "svc", domain @ ..] if !domain.is_empty() => (*name, *ns),
        _ => return None,
    };
    let ok = |s: &str| super::fields::check_label(s).is_ok();
    (ok(name) && ok(namespace)).then(|| ObjectKey {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Retries may add this share of requests by default (Linkerd's default budget).
const DEFAULT_RETRY_PERCENT: u32 = 20;
const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;

fn duration(cx: &mut Ctx<'_>, field: &'static str, value: &str) -> Option<Duration> {
    match parse_duration(field, value) {
        Ok(d) => Some(d),
        Err(e) => {
            cx.fail(field, e.to_string());
            None
        }
    }
}

/// A Gateway API duration (GEP-2257: one to four `<number><h|m|s|ms>` parts, `1m30s`); zero
/// turns the timeout off, as Gateway API defines it. `None` for off or unreadable (reported).
fn gateway_timeout(cx: &mut Ctx<'_>, field: &'static str, value: &str) -> Option<Duration> {
    match parse_gateway_duration(value) {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => {
            cx.fail(
                field,
                format!("{value:?} is not a Gateway API duration: use parts like 1h, 30m, 10s, 500ms (1m30s; 0s for none)"),
            );
            None
        }
    }
}

fn parse_gateway_duration(value: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = value;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.as_bytes().first()? {
                b'h' => (Duration::from_secs(3600), 1),
                b'm' => (Duration::from_secs(60), 1),
                b's' => (Duration::from_secs(1), 1),
                _ => return None,
            }
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).ok()?;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}

fn pattern(cx: &mut Ctx<'_>, field: &'static str, value: &str) -> Option<Pattern> {
    match Pattern::new(value) {
        Ok(r) => Some(r),
        Err(e) => {
            cx.fail(
                field,
                format!("{value:?} is not a valid regular expression: {e}"),
            );
            None
        }
    }
}

fn percentage(cx: &mut Ctx<'_>, field: &'static str, value: Option<f64>) -> f64 {
    match value {
        None => 100.0,
        Some(p) if (0.0..=100.0).contains(&p) => p,
        Some(p) => {
            cx.fail(field, format!("{p} is not a percentage between 0 and 100"));
            0.0
        }
    }
}

fn value_match(
    cx: &mut Ctx<'_>,
    field: &'static str,
    raw: &RawValueMatch,
) -> Option<(String, ValueMatch)> {
    let name = match &raw.name {
        Some(n) if !n.is_empty() => n.to_ascii_lowercase(),
        _ => {
            cx.fail(field, "every match needs a `name`");
            return None;
        }
    };
    let Some(value) = &raw.value else {
        cx.fail(field, format!("match on {name:?} needs a `value`"));
        return None;
    };
    let m = match raw.kind.as_deref() {
        None | Some("Exact") => ValueMatch::Exact(value.clone()),
        Some("RegularExpression") => ValueMatch::Regex(pattern(cx, field, value)?),
        Some(other) => {
            cx.fail(
                field,
                format!("type {other:?} is not Exact or RegularExpression"),
            );
            return None;
        }
    };
    Some((name, m))
}

fn route_rule(cx: &mut Ctx<'_>, namespace: &str, raw: &RawRouteRule) -> RouteRule {
    let mut rule = RouteRule::default();
    for m in &raw.matches {
        let mut out = RouteMatch::default();
        if let Some(p) = &m.path {
            let value = p.value.clone().unwrap_or_else(|| "/".to_string());
            if !value.starts_with('/') && p.kind.as_deref() != Some("RegularExpression") {
                cx.fail(
                    "rules.matches.path",
                    format!("{value:?} must start with '/'"),
                );
            }
            out.path = match p.kind.as_deref() {
                None | Some("PathPrefix") => {
                    Some(PathMatch::Prefix(value.trim_end_matches('/').to_string()))
                }
                Some("Exact") => Some(PathMatch::Exact(value)),
                Some("RegularExpression") => {
                    pattern(cx, "rules.matches.path", &value).map(PathMatch::Regex)
                }
                Some(other) => {
                    cx.fail(
                        "rules.matches.path",
                        format!("type {other:?} is not Exact, PathPrefix or RegularExpression"),
                    );
                    None
                }
            };
        }
        out.headers = m
            .headers
            .iter()
            .filter_map(|h| value_match(cx, "rules.matches.headers", h))
            .collect();
        out.query = m
            .query_params
            .iter()
            .filter_map(|q| value_match(cx, "rules.matches.queryParams", q))
            .collect();
        if let Some(method) = &m.method {
            if http::Method::from_bytes(method.as_bytes()).is_err() {
                cx.fail(
                    "rules.matches.method",
                    format!("{method:?} is not an HTTP method"),
                );
            }
            out.method = Some(method.clone());
        }
        rule.matches.push(out);
    }
    if let Some(n) = &raw.name {
        match super::fields::check_subdomain(n) {
            Ok(()) => rule.name = Some(n.clone()),
            Err(e) => cx.fail("rules.name", e),
        }
    }
    filters(cx, namespace, raw, &mut rule);
    for b in &raw.backend_refs {
        if b.kind.as_deref().is_some_and(|k| k != "Service") {
            cx.fail("rules.backendRefs", "only Service backends are supported");
        }
        let (Some(name), Some(port)) = (&b.name, b.port) else {
            cx.fail(
                "rules.backendRefs",
                "every backendRef needs a `name` and a `port`",
            );
            continue;
        };
        rule.backends.push(BackendRef {
            service: ObjectKey {
                namespace: namespace.to_string(),
                name: name.clone(),
            },
            port,
            weight: b.weight.unwrap_or(1),
        });
    }
    if !rule.backends.is_empty() && rule.backends.iter().all(|b| b.weight == 0) {
        cx.fail(
            "rules.backendRefs",
            "every weight is 0: no request could be served",
        );
    }
    if let Some(t) = &raw.timeouts {
        rule.request_timeout = t
            .request
            .as_deref()
            .and_then(|v| gateway_timeout(cx, "rules.timeouts.request", v));
        rule.backend_timeout = t
            .backend_request
            .as_deref()
            .and_then(|v| gateway_timeout(cx, "rules.timeouts.backendRequest", v));
    }
    if let Some(r) = &raw.retry {
        let mut retry = RetryPolicy {
            attempts: r.attempts.unwrap_or(1),
            codes: r.codes.clone(),
            on_reset: false,
            on_connect_failure: false,
            backoff: Duration::from_millis(25),
        };
        for on in &r.on {
            match on.as_str() {
                "5xx" => retry.codes.extend(500..600),
                "reset" => retry.on_reset = true,
                "connect-failure" => retry.on_connect_failure = true,
                other => cx.fail(
                    "rules.retry.on",
                    format!("{other:?} is not 5xx, reset or connect-failure"),
                ),
            }
        }
        if let Some(b) = &r.backoff {
            retry.backoff = duration(cx, "rules.retry.backoff", b).unwrap_or_default();
        }
        if retry.codes.iter().any(|c| !(100..600).contains(c)) {
            cx.fail("rules.retry.codes", "codes must be HTTP statuses (100-599)");
        }
        rule.retry = Some(retry);
    }
    if let Some(f) = &raw.fault {
        let mut fault = Fault::default();
        if let Some(d) = &f.delay {
            let p = percentage(cx, "rules.fault.delay.percentage", d.percentage);
            match d.fixed_delay.as_deref() {
                Some(v) => {
                    fault.delay = duration(cx, "rules.fault.delay.fixedDelay", v).map(|d| (d, p));
                }
                None => cx.fail("rules.fault.delay", "needs `fixedDelay`"),
            }
        }
        if let Some(a) = &f.abort {
            let p = percentage(cx, "rules.fault.abort.percentage", a.percentage);
            match a.http_status {
                Some(s) if (200..600).contains(&s) => fault.abort = Some((s, p)),
                _ => cx.fail(
                    "rules.fault.abort",
                    "needs `httpStatus` between 200 and 599",
                ),
            }
        }
        rule.fault = Some(fault);
    }
    rule
}

pub(super) fn validate_http_routes(
    raw: &[RawHttpRoute],
    state: &mut NodeState,
    previous: Option<&NodeState>,
    errors: &mut Vec<ObjectError>,
) {
    for (i, rr) in raw.iter().enumerate() {
        let mut cx = Ctx {
            kind: "httpRoute",
            who: who(&rr.namespace, &rr.name),
            position: rr
                .position
                .clone()
                .unwrap_or_else(|| format!("httpRoutes[{i}]")),
            errors,
        };
        let before = cx.errors.len();
        let name = cx.label("name", &rr.name);
        let namespace = cx.label("namespace", &rr.namespace);
        let (Some(name), Some(namespace)) = (name, namespace) else {
            continue;
        };
        let key = ObjectKey { namespace, name };
        if rr.parent_refs.len() != 1 {
            cx.fail(
                "parentRefs",
                "exactly one parentRef is supported: the Service the route attaches to",
            );
        }
        let mut parent = None;
        for p in &rr.parent_refs {
            let core = matches!(p.group.as_deref(), None | Some("" | "core"));
            if !core || p.kind.as_deref() != Some("Service") {
                cx.fail(
                    "parentRefs",
                    "the parent must be a Service (`kind: Service`): routes attach to services in the mesh (GAMMA)",
                );
            }
            match &p.name {
                Some(n) => {
                    parent = Some((
                        ObjectKey {
                            namespace: key.namespace.clone(),
                            name: n.clone(),
                        },
                        p.port,
                    ));
                }
                None => cx.fail("parentRefs", "the parentRef needs a `name`"),
            }
        }
        let hostnames: Vec<String> = rr
            .hostnames
            .iter()
            .filter_map(|h| hostname(&mut cx, "hostnames", h, true))
            .collect();
        let rules: Vec<RouteRule> = rr
            .rules
            .iter()
            .map(|r| route_rule(&mut cx, &key.namespace, r))
            .collect();
        let mut names: Vec<&str> = rules.iter().filter_map(|r| r.name.as_deref()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            cx.fail(
                "rules.name",
                format!(
                    "{:?} names two rules; rule names are unique in a route",
                    w[0]
                ),
            );
        }
        match parent {
            Some((service, port)) if cx.errors.len() == before => {
                state.http_routes.push(HttpRoute {
                    key,
                    service,
                    port,
                    hostnames,
                    rules,
                });
            }
            _ => {
                let old = previous.and_then(|p| p.http_routes.iter().find(|r| r.key == key));
                let outcome = match old {
                    Some(old) => {
                        state.http_routes.push(old.clone());
                        "its last valid version stays in force"
                    }
                    None => "it is not applied; its service keeps default routing",
                };
                cx.fail("rules", format!("route {key} is invalid; {outcome}"));
            }
        }
    }
}

pub(super) fn validate_destination_rules(
    raw: &[RawDestinationRule],
    state: &mut NodeState,
    previous: Option<&NodeState>,
    errors: &mut Vec<ObjectError>,
) {
    for (i, rd) in raw.iter().enumerate() {
        let mut cx = Ctx {
            kind: "destinationRule",
            who: who(&rd.namespace, &rd.name),
            position: rd
                .position
                .clone()
                .unwrap_or_else(|| format!("destinationRules[{i}]")),
            errors,
        };
        let before = cx.errors.len();
        let name = cx.label("name", &rd.name);
        let namespace = cx.label("namespace", &rd.namespace);
        let host = cx.required("host", &rd.host).cloned();
        let (Some(name), Some(namespace), Some(host)) = (name, namespace, host) else {
            continue;
        };
        let Some(service) = service_host(&host, &namespace) else {
            cx.fail(
                "host",
                format!(
                    "{host:?} is not a service: use its name (in the rule's namespace), name.namespace, or name.namespace.svc.<cluster domain>"
                ),
            );
            continue;
        };
        let rule = ObjectKey { namespace, name };
        let tp = &rd.traffic_policy;
        let mut policy = TrafficPolicy {
            rule: Some(rule),
            retry_budget_percent: DEFAULT_RETRY_PERCENT,
            min_retries_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
            ..TrafficPolicy::default()
        };
        if let Some(lb) = &tp.load_balancer {
            policy.lb = match lb.simple.as_deref() {
                None | Some("P2C_PEAK_EWMA" | "LEAST_REQUEST") => LbPolicy::P2cPeakEwma,
                Some("ROUND_ROBIN") => LbPolicy::RoundRobin,
                Some(other) => {
                    cx.fail(
                        "trafficPolicy.loadBalancer.simple",
                        format!("{other:?} is not P2C_PEAK_EWMA, LEAST_REQUEST or ROUND_ROBIN"),
                    );
                    LbPolicy::default()
                }
            };
        }
        let positive = |cx: &mut Ctx<'_>, field: &'static str, v: Option<u32>| {
            if v == Some(0) {
                cx.fail(
                    field,
                    "0 would refuse every request; leave it out for no limit",
                );
            }
            v
        };
        if let Some(cp) = &tp.connection_pool {
            policy.max_connections = positive(
                &mut cx,
                "trafficPolicy.connectionPool.tcp.maxConnections",
                cp.tcp.as_ref().and_then(|t| t.max_connections),
            );
            policy.max_pending_requests =
                cp.http.as_ref().and_then(|h| h.http1_max_pending_requests);
            if let Some(t) = cp.tcp.as_ref().and_then(|t| t.connect_timeout.as_deref()) {
                const FIELD: &str = "trafficPolicy.connectionPool.tcp.connectTimeout";
                policy.connect_timeout = duration(&mut cx, FIELD, t);
                if policy
                    .connect_timeout
                    .is_some_and(|d| d < Duration::from_millis(1))
                {
                    cx.fail(FIELD, "must be at least 1ms");
                }
            }
            policy.max_requests = positive(
                &mut cx,
                "trafficPolicy.connectionPool.http.http2MaxRequests",
                cp.http.as_ref().and_then(|h| h.http2_max_requests),
            );
        }
        if let Some(o) = &tp.outlier_detection {
            let base = match o.base_ejection_time.as_deref() {
                Some(v) => duration(
                    &mut cx,
                    "trafficPolicy.outlierDetection.baseEjectionTime",
                    v,
                ),
                None => Some(Duration::from_secs(30)),
            };
            let pct = o.max_ejection_percent.unwrap_or(50);
            if pct > 100 {
                cx.fail(
                    "trafficPolicy.outlierDetection.maxEjectionPercent",
                    "must be at most 100",
                );
            }
            const INTERVAL: &str = "trafficPolicy.outlierDetection.interval";
            let interval = match o.interval.as_deref() {
                Some(v) => duration(&mut cx, INTERVAL, v).unwrap_or_default(),
                None => Duration::from_secs(10),
            };
            if o.interval.is_some() && interval < Duration::from_millis(1) {
                cx.fail(INTERVAL, "must be at least 1ms");
            }
            policy.outlier = base.map(|base_ejection_time| OutlierDetection {
                consecutive_errors: o.consecutive_5xx_errors.unwrap_or(5).max(1),
                base_ejection_time,
                max_ejection_percent: pct,
                interval,
            });
        }
        if let Some(r) = &tp.local_rate_limit {
            match r.requests_per_second {
                Some(per_second) if per_second > 0 => {
                    policy.rate_limit = Some(RateLimit {
                        per_second,
                        burst: r.burst.unwrap_or(per_second).max(1),
                        per_source: r.per_source,
                    });
                }
                _ => cx.fail(
                    "trafficPolicy.localRateLimit.requestsPerSecond",
                    "needs a positive rate",
                ),
            }
        }
        if let Some(b) = &tp.retry_budget {
            policy.retry_budget_percent = b.percent.unwrap_or(DEFAULT_RETRY_PERCENT);
            policy.min_retries_per_second = b
                .min_retries_per_second
                .unwrap_or(DEFAULT_MIN_RETRIES_PER_SECOND);
        }
        if state.traffic_policies.contains_key(&service) {
            cx.fail(
                "host",
                format!("service {service} already has a destinationRule; give each service one"),
            );
            continue;
        }
        if cx.errors.len() == before {
            state.traffic_policies.insert(service, policy);
        } else {
            let old = previous.and_then(|p| p.traffic_policies.get(&service));
            let outcome = match old {
                Some(old) => {
                    state.traffic_policies.insert(service.clone(), old.clone());
                    "its last valid version stays in force"
                }
                None => "it is not applied; the service has no limits",
            };
            cx.fail(
                "trafficPolicy",
                format!("the rule for {service} is invalid; {outcome}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_durations_read_as_gep_2257_writes_them() {
        let d = parse_gateway_duration;
        assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1h2m3s4ms"), Some(Duration::from_millis(3_723_004)));
        assert_eq!(d("0s"), Some(Duration::ZERO));
        for bad in [
            "",
            "1",
            "1.5s",
            "1m 30s",
            "-1s",
            "123456s",
            "1s2s3s4s5s",
            "1d",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn destination_rule_hosts_read_as_istio_reads_them() {
        let key = |ns: &str, name: &str| {
            Some(ObjectKey {
                namespace: ns.into(),
                name: name.into(),
            })
        };
        assert_eq!(service_host("web", "shop"), key("shop", "web"));
        assert_eq!(service_host("web.data", "shop"), key("data", "web"));
        assert_eq!(service_host("web.data.svc", "shop"), key("data", "web"));
        assert_eq!(
            service_host("web.data.svc.cluster.local", "shop"),
            key("data", "web")
        );
        assert_eq!(
            service_host("web.data.svc.corp.example", "shop"),
            key("data", "web")
        );
        for bad in [
            "",
            "Web",
            "web.data.cluster",
            "*.data.svc.cluster.local",
            "a.b.c.d",
        ] {
            assert_eq!(service_host(bad, "shop"), None, "{bad:?}");
        }
    }
}
