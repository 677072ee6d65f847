//! `explain`: what the proxy would do with a connection (or a request) from a workload to an
//! address, and why, decided by the same code and the same state the proxy uses.
//!
//! The answer walks the path a connection takes: capture → service and target port → protocol
//! (L7 routing or L4) → route rule and backends → endpoints and the hop to each → authorization
//! at each endpoint. Nothing is sent and no balancer state moves.
//!
//! Authorization is decided with this node's copy of the policies and the destination's labels.
//! For an endpoint on another node, that node decides for real; with the same policies (as in
//! Kubernetes, where every node sees them all) the answer is the same.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    authz::{self, Decision, HttpAttributes},
    protocol::path,
    route::{rules::find_rule, table::Routes},
    state::{ObjectKey, Workload},
    telemetry::flows::decision_policies,
    view::Snapshot,
};

/// Why a question cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The source names no workload this node knows.
    #[error(
        "no workload {0} is known to this node: name an enrolled pod or a workload of the node file (namespace/name)"
    )]
    UnknownSource(String),
    /// The destination is not `ip:port`.
    #[error("destination {0:?} is not an ip:port address")]
    BadDestination(String),
    /// A header is not `name: value`, or not a valid header.
    #[error("header {0:?} is not a valid `name: value` header")]
    BadHeader(String),
    /// The method is not a valid HTTP method.
    #[error("method {0:?} is not a valid HTTP method")]
    BadMethod(String),
    /// The path is one the proxy refuses with 400.
    #[error("path {0:?} would be refused with 400: {1}")]
    BadPath(String, crate::protocol::path::PathError),
}

/// The question.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Question {
    /// The source workload, `namespace/name` (`name` alone means the `default` namespace).
    pub src: String,
    /// The destination, `ip:port`.
    pub dst: String,
    /// For an HTTP request: its method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// For an HTTP request: its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// For an HTTP request: `name: value` headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// One endpoint the connection or request may go to, and what authorization says there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointAnswer {
    /// `ip:port` dialled.
    pub addr: SocketAddr,
    /// The workload there (`namespace/name`), if it is one.
    pub workload: Option<String>,
    /// `local` (the source's node, no TLS), `hbone` (another node, mTLS) or `passthrough`
    /// (outside the mesh, plain TCP).
    pub hop: String,
    /// Whether outlier detection has ejected it now.
    pub ejected: bool,
    /// `allow` or `deny`.
    pub decision: String,
    /// The policies behind a denial.
    pub policies: Vec<String>,
    /// The decision in words.
    pub reason: String,
}

/// The answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    /// The source workload.
    pub src: String,
    /// Its SPIFFE identity (what the destination sees).
    pub src_identity: String,
    /// The node the source runs on.
    pub src_node: String,
    /// The destination asked about.
    pub dst: SocketAddr,
    /// Whether the kernel redirects the connect to the proxy, and if not, why.
    pub captured: bool,
    /// Why (not) captured.
    pub capture_reason: String,
    /// The service at the destination address, if it is one.
    pub service: Option<String>,
    /// `l7` (HTTP is routed per request), `l4`, or `l7-if-http` when no request was given.
    pub mode: String,
    /// The HTTPRoute rule that applies (`namespace/name#index`), `default` with no route
    /// attached, or `none` when no rule matched (the request gets 404).
    pub route: Option<String>,
    /// The backends of that rule with their weights.
    pub backends: Vec<(String, u32)>,
    /// Candidate endpoints with their decisions.
    pub endpoints: Vec<EndpointAnswer>,
    /// `allow`, `deny`, `partial` (depends on the endpoint), `redirect` (the proxy answers) or
    /// `error` (no endpoint or route).
    pub verdict: String,
    /// The steps, in order, in words.
    pub steps: Vec<String>,
}

fn parse_key(s: &str) -> ObjectKey {
    match s.split_once('/') {
        Some((ns, name)) => ObjectKey {
            namespace: ns.into(),
            name: name.into(),
        },
        None => ObjectKey {
            namespace: "default".into(),
            name: s.into(),
        },
    }
}

/// Answers `q` from the proxy's current state.
pub fn explain(view: &Snapshot, q: &Question) -> Result<Explanation, ExplainError> {
    let routes = &view.routes;
    let state = &routes.state;
    let key = parse_key(&q.src);
    let src: &Workload = state
        .workloads
        .values()
        .find(|w| w.key == key)
        .ok_or_else(|| ExplainError::UnknownSource(key.to_string()))?;
    let dst: SocketAddr = q
        .dst
        .parse()
        .map_err(|_| ExplainError::BadDestination(q.dst.clone()))?;
    let id = view.identity_of(src);
    let mut steps = Vec::new();
    let (captured, capture_reason) = if dst.ip().is_loopback() {
        (
            false,
            "loopback destinations are never captured".to_string(),
        )
    } else if state.excluded_ports.contains(&dst.port()) {
        (
            false,
            format!("port {} is excluded from capture", dst.port()),
        )
    } else if *src.node == *state.node {
        (
            true,
            "connect4/connect6 redirect it to the proxy on the pod's loopback".into(),
        )
    } else {
        (
            true,
            format!(
                "captured on the source's node {} (this node is {})",
                src.node, state.node
            ),
        )
    };
    steps.push(format!("capture: {capture_reason}"));
    let mut out = Explanation {
        src: src.key.to_string(),
        src_identity: id.to_string(),
        src_node: src.node.to_string(),
        dst,
        captured,
        capture_reason,
        service: None,
        mode: "l4".into(),
        route: None,
        backends: Vec::new(),
        endpoints: Vec::new(),
        verdict: "allow".into(),
        steps,
    };
    if !captured {
        out.verdict = "bypass".into();
        return Ok(out);
    }
    let http = request_parts(q, &routes.state.mesh)?;
    let detects = routes.detects(dst);
    out.mode = match (detects, &http) {
        (false, _) => "l4",
        (true, Some(_)) => "l7",
        (true, None) => "l7-if-http",
    }
    .into();
    out.steps.push(match out.mode.as_str() {
        "l4" if routes.service_at(dst.ip()).is_some() => {
            "protocol: the service port is appProtocol tcp, relayed at L4".into()
        }
        "l4" if state.workloads.contains_key(&dst.ip()) || routes.service_at(dst.ip()).is_some() => {
            "protocol: relayed at L4".into()
        }
        "l4" => "protocol: outside the mesh, relayed at L4 without detection".into(),
        "l7" => "protocol: HTTP, routed and authorized per request".into(),
        _ => "protocol: HTTP would be routed per request (give --method/--path to see the route); anything else is relayed at L4".into(),
    });
    // Candidate (address, service) pairs.
    // Candidate endpoints, with whether outlier detection has ejected them now.
    let mut targets: Vec<(SocketAddr, bool)> = Vec::new();
    match routes.service_at(dst.ip()) {
        Some(entry) => {
            let svc = &entry.svc;
            out.service = Some(svc.key.to_string());
            let Some(target_port) = svc.target_port(dst.port()) else {
                out.steps.push(format!(
                    "service {} has no port {}: the connection is refused",
                    svc.key,
                    dst.port()
                ));
                out.verdict = "error".into();
                return Ok(out);
            };
            out.steps.push(format!(
                "service {} port {} → target port {target_port}",
                svc.key,
                dst.port()
            ));
            let mut backends = vec![(entry.clone(), target_port)];
            if let (Some((parts, path, _)), true) = (&http, detects) {
                match find_rule(entry, dst.port(), parts, path) {
                    None => {
                        out.route = Some("none".into());
                        out.steps
                            .push("route: no rule matched: the request gets 404 NR".into());
                        out.verdict = "error".into();
                        return Ok(out);
                    }
                    Some((at, rule)) => {
                        out.route = Some(match at {
                            Some((r, i)) => format!("{}#{i}", r.key),
                            None => "default".into(),
                        });
                        out.steps.push(format!(
                            "route: {}",
                            at.map_or_else(
                                || "no HTTPRoute is attached: the service itself".to_string(),
                                |(r, i)| match &rule.name {
                                    Some(n) => format!("HTTPRoute {} rule {i} ({n})", r.key),
                                    None => format!("HTTPRoute {} rule {i}", r.key),
                                }
                            )
                        ));
                        if let Some(r) = &rule.redirect {
                            out.steps.push(format!(
                                "redirect: the proxy answers {} itself; nothing is forwarded",
                                r.status
                            ));
                            out.verdict = "redirect".into();
                            return Ok(out);
                        }
                        if let Some(rw) = &rule.rewrite {
                            out.steps.push(format!(
                                "rewrite: host {}, path {}",
                                rw.hostname.as_deref().unwrap_or("kept"),
                                rw.path
                                    .as_ref()
                                    .map_or_else(|| "kept".to_string(), |p| format!("{p:?}"))
                            ));
                        }
                        for m in &rule.mirrors {
                            out.steps.push(format!(
                                "mirror: {}% of requests copied to {} port {} (answers dropped)",
                                m.percent, m.backend.service, m.backend.port
                            ));
                        }
                        if !rule.backends.is_empty() {
                            backends.clear();
                            for b in &rule.backends {
                                out.backends.push((b.service.to_string(), b.weight));
                                match routes.service(&b.service) {
                                    Some(e) => match e.svc.target_port(b.port) {
                                        Some(p) => backends.push((e.clone(), p)),
                                        None => out.steps.push(format!(
                                            "backend {} has no port {}",
                                            b.service, b.port
                                        )),
                                    },
                                    None => out
                                        .steps
                                        .push(format!("backend {} does not exist", b.service)),
                                }
                            }
                        }
                    }
                }
            }
            for (entry, port) in backends {
                let eps = entry.balancer.endpoints();
                if eps.is_empty() {
                    out.steps
                        .push(format!("service {} has no endpoints", entry.svc.key));
                }
                let now = std::time::Instant::now();
                // Dialled in the destination's family, as the proxy does (`Routes::resolve`).
                targets.extend(eps.iter().map(|e| {
                    (
                        SocketAddr::new(routes.dial_ip(e.ip, dst.ip()), port),
                        e.is_ejected(now),
                    )
                }));
            }
        }
        None => targets.push((dst, false)),
    }
    if targets.is_empty() {
        out.verdict = "error".into();
        return Ok(out);
    }
    for (t, ejected) in targets {
        out.endpoints.push(endpoint(
            routes,
            src,
            &id,
            t,
            http.as_ref(),
            ejected,
            &mut out.steps,
        ));
    }
    let allowed = out
        .endpoints
        .iter()
        .filter(|e| e.decision == "allow")
        .count();
    out.verdict = match allowed {
        0 => "deny",
        n if n == out.endpoints.len() => "allow",
        _ => "partial",
    }
    .into();
    Ok(out)
}

/// The request as the route and policy code see it: parts and the normalized path.
/// The parts, the normalized path and the path's deny form.
type ExplainRequest = (http::request::Parts, String, String);

fn request_parts(
    q: &Question,
    mesh: &crate::state::MeshConfig,
) -> Result<Option<ExplainRequest>, ExplainError> {
    if q.method.is_none() && q.path.is_none() && q.headers.is_empty() {
        return Ok(None);
    }
    let method = q.method.clone().unwrap_or_else(|| "GET".into());
    let raw_path = q.path.clone().unwrap_or_else(|| "/".into());
    let mut b = http::Request::builder()
        .method(
            http::Method::from_bytes(method.as_bytes())
                .map_err(|_| ExplainError::BadMethod(method.clone()))?,
        )
        .uri(raw_path.as_str());
    for h in &q.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| ExplainError::BadHeader(h.clone()))?;
        let name = http::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| ExplainError::BadHeader(h.clone()))?;
        let value = http::HeaderValue::from_str(v.trim())
            .map_err(|_| ExplainError::BadHeader(h.clone()))?;
        b = b.header(name, value);
    }
    let (parts, ()) = b
        .body(())
        .map_err(|_| ExplainError::BadDestination(raw_path.clone()))?
        .into_parts();
    let path_only = parts.uri.path().to_string();
    let path = path::normalize(&path_only, mesh.path_normalization)
        .map_err(|e| ExplainError::BadPath(path_only, e))?;
    let deny = path::deny_form(&path, mesh.case_insensitive_deny);
    Ok(Some((parts, path, deny)))
}

fn endpoint(
    routes: &Routes,
    src: &crate::state::Workload,
    id: &crate::identity::Identity,
    addr: SocketAddr,
    http: Option<&ExplainRequest>,
    ejected: bool,
    steps: &mut Vec<String>,
) -> EndpointAnswer {
    let state = &routes.state;
    let w = state.workloads.get(&addr.ip());
    // The hop is the source node's choice: same node as the source, or HBONE to another.
    let hop = match w {
        Some(w) if w.node == src.node => "local",
        Some(_) => "hbone",
        None => "passthrough",
    };
    let decision = match w {
        None => Decision::Allow,
        Some(w) => {
            let attrs = http.map(|(parts, path, deny_path)| HttpAttributes {
                method: parts.method.as_str(),
                path,
                deny_path,
                fold_case: state.mesh.case_insensitive_deny,
                host: authz::request_host(parts),
                headers: &parts.headers,
            });
            let services = state.services_sending(w.ip, addr.port());
            authz::evaluate(
                &state.authorization_policies,
                &authz::Request {
                    source: Some(id),
                    namespace: &w.key.namespace,
                    root_namespace: &state.mesh.root_namespace,
                    labels: &w.labels,
                    port: addr.port(),
                    source_ip: Some(src.ip_toward(addr.ip())),
                    services: &services,
                    http: attrs.as_ref(),
                },
            )
        }
    };
    let reason = match (w, &decision) {
        (None, _) => "outside the mesh: no policy applies".to_string(),
        (Some(w), Decision::Allow)
            if http.is_none() && state.has_l7_policy_for(&w.key.namespace, &w.labels, w.ip) =>
        {
            "allowed at L4; an L7 policy selects it, so HTTP requests are decided one by one".into()
        }
        (Some(_), d) => d.to_string(),
    };
    steps.push(format!(
        "endpoint {addr}{} via {hop}{}: {reason}",
        w.map(|w| format!(" ({})", w.key)).unwrap_or_default(),
        if ejected { " (ejected now)" } else { "" },
    ));
    EndpointAnswer {
        addr,
        workload: w.map(|w| w.key.to_string()),
        hop: hop.into(),
        ejected,
        decision: if decision == Decision::Allow {
            "allow"
        } else {
            "deny"
        }
        .into(),
        policies: decision_policies(&decision),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        state::{
            Action, AuthorizationPolicy, Labels, Rule, Source,
            testing::{key, service, state, workload},
        },
        view::View,
    };
    use std::{net::IpAddr, sync::Arc};

    /// A dual-stack client on this node, a dual-stack service with one pod on each node, and
    /// an ALLOW policy on the service's pods that admits the client by its IPv6 address only.
    fn dual_stack() -> Arc<Snapshot> {
        let mut s = state(
            vec![service(
                "web",
                "10.96.0.10,fd96::10",
                &[(80, 8080)],
                &["10.0.0.2", "10.0.0.3", "fd00::2", "fd00::3"],
            )],
            vec![
                workload("client", "10.0.0.1,fd00::1", "client", "node-1"),
                workload("web", "10.0.0.2,fd00::2", "web", "node-1"),
                workload("web", "10.0.0.3,fd00::3", "web", "node-2"),
            ],
        );
        // The two replicas share a name in the builder; the second gets its own key.
        let second = s.workloads[&"10.0.0.3".parse::<IpAddr>().expect("ip")].clone();
        let mut renamed = (*second).clone();
        renamed.key = key("default", "web-2");
        let renamed = Arc::new(renamed);
        for a in renamed.ips() {
            s.workloads.insert(a, renamed.clone());
        }
        s.authorization_policies = vec![AuthorizationPolicy {
            key: key("default", "v6-only"),
            selector: Labels::from([("app".to_string(), "web".to_string())]),
            target_services: Vec::new(),
            action: Action::Allow,
            rules: vec![Rule {
                from: vec![Source {
                    ip_blocks: vec!["fd00::1/128".parse().expect("block")],
                    ..Source::default()
                }],
                ..Rule::default()
            }],
        }];
        let view = View::new("cluster.local");
        view.publish(&Arc::new(s), []);
        view.load()
    }

    fn ask(view: &Snapshot, dst: &str) -> Explanation {
        let q = Question {
            src: "client".into(),
            dst: dst.into(),
            ..Question::default()
        };
        explain(view, &q).expect("an explanation")
    }

    #[test]
    fn an_ipv6_service_address_is_explained_in_ipv6_with_the_sources_ipv6_address() {
        let view = dual_stack();
        let e = ask(&view, "[fd96::10]:80");
        assert_eq!(e.service.as_deref(), Some("default/web"));
        assert!(e.captured, "{e:?}");
        let mut dialled: Vec<String> = e.endpoints.iter().map(|p| p.addr.to_string()).collect();
        dialled.sort();
        // The proxy dials each pod in the client's family.
        assert_eq!(dialled, ["[fd00::2]:8080", "[fd00::3]:8080"], "{e:?}");
        let hops: Vec<&str> = e.endpoints.iter().map(|p| p.hop.as_str()).collect();
        assert!(
            hops.contains(&"local") && hops.contains(&"hbone"),
            "{hops:?}"
        );
        // The source's IPv6 address is what the policy sees.
        assert_eq!(e.verdict, "allow", "{e:?}");
    }

    #[test]
    fn the_same_service_over_ipv4_is_denied_by_the_ipv6_only_policy() {
        let view = dual_stack();
        let e = ask(&view, "10.96.0.10:80");
        let mut dialled: Vec<String> = e.endpoints.iter().map(|p| p.addr.to_string()).collect();
        dialled.sort();
        assert_eq!(dialled, ["10.0.0.2:8080", "10.0.0.3:8080"], "{e:?}");
        assert_eq!(e.verdict, "deny", "{e:?}");
        assert_eq!(e.endpoints[0].policies, ["default/v6-only"], "{e:?}");
    }

    #[test]
    fn a_pods_ipv6_address_and_bad_destinations() {
        let view = dual_stack();
        let e = ask(&view, "[fd00::3]:8080");
        assert_eq!(e.service, None);
        assert_eq!(e.endpoints.len(), 1);
        assert_eq!(e.endpoints[0].workload.as_deref(), Some("default/web-2"));
        assert_eq!(e.endpoints[0].hop, "hbone");
        assert_eq!(e.verdict, "allow", "{e:?}");
        let e = ask(&view, "[::1]:80");
        assert_eq!((e.captured, e.verdict.as_str()), (false, "bypass"));
        let q = Question {
            src: "client".into(),
            dst: "fd00::3:8080".into(),
            ..Question::default()
        };
        assert!(matches!(
            explain(&view, &q),
            Err(ExplainError::BadDestination(_))
        ));
    }
}
