//! Which HTTP rule a request takes, and which backend a weighted rule sends it to. Pure
//! functions of the request's head and the table, so every case is unit-tested here.

use std::borrow::Cow;

use super::table::ServiceEntry;
use crate::state::{
    BackendRef, HttpRoute, PathMatch, PathModifier, Redirect, RouteMatch, RouteRule,
};

/// A rule and where it is written: the route and the rule's index (`None`: the default rule).
pub type RuleAt<'a> = (Option<(&'a HttpRoute, usize)>, Cow<'a, RouteRule>);

/// The rule a request to `port` of a service takes and where it is written: the route and the
/// rule's index, or `None` for the default rule of a service no route is attached to (it sends
/// to the service itself). `None` overall: routes exist and no rule matched (404 `NR`).
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
        return Some((None, Cow::Owned(RouteRule::default())));
    }
    let host = request_host(parts);
    attached
        .filter(|r| host_matches(&r.hostnames, host.as_deref()))
        .flat_map(|r| {
            r.rules
                .iter()
                .enumerate()
                .map(move |(i, rule)| (r, i, rule))
        })
        .find(|(_, _, rule)| {
            rule.matches.is_empty() || rule.matches.iter().any(|m| matches(m, parts, path))
        })
        .map(|(r, i, rule)| (Some((r, i)), Cow::Borrowed(rule)))
}

/// The host a request names (HTTP/2's `:authority`, else `Host`), lowercased, without its port.
pub fn request_host(parts: &http::request::Parts) -> Option<String> {
    let raw = match parts.uri.authority() {
        Some(a) => a.host(),
        None => parts.headers.get(http::header::HOST)?.to_str().ok()?,
    };
    let host = match raw.rsplit_once(':') {
        // A bracketed IPv6 literal keeps its colons.
        Some((h, port)) if !raw.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    };
    Some(host.to_ascii_lowercase())
}

/// Whether a route's `hostnames` take a request for `host`: an empty list takes every request;
/// `*.example.com` takes hosts with one or more labels before `example.com`, not `example.com`.
pub fn host_matches(hostnames: &[String], host: Option<&str>) -> bool {
    if hostnames.is_empty() {
        return true;
    }
    let Some(host) = host else { return false };
    hostnames.iter().any(|h| match h.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => h == host,
    })
}

/// The prefix of the rule's first match that takes the request, for `ReplacePrefixMatch`.
pub fn matched_prefix<'a>(
    rule: &'a RouteRule,
    parts: &http::request::Parts,
    path: &str,
) -> Option<&'a str> {
    rule.matches
        .iter()
        .find(|m| matches(m, parts, path))
        .and_then(|m| match &m.path {
            Some(PathMatch::Prefix(p)) => Some(p.as_str()),
            _ => None,
        })
}

/// The path a modifier makes of `path` (normalized, without query), given the prefix the rule
/// matched (stored without a trailing slash): `/foo` replaced by `/xyz` makes `/foo/bar` into
/// `/xyz/bar` and `/foo` into `/xyz`; replaced by `/`, `/foo/bar` becomes `/bar`.
pub fn modified_path(m: &PathModifier, matched: Option<&str>, path: &str) -> String {
    match m {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(with) => {
            let rest = matched.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
            let joined = format!("{}{rest}", with.trim_end_matches('/'));
            if joined.is_empty() {
                "/".to_string()
            } else {
                joined
            }
        }
    }
}

/// The `Location` of a redirect, from the request's scheme, host, port, path and query. As
/// Gateway API says: with a new scheme and no port, the scheme's own port; the port is left out
/// when it is the scheme's default.
pub fn redirect_location(
    r: &Redirect,
    request: (&str, &str, u16),
    path: &str,
    query: Option<&str>,
) -> String {
    let (scheme_in, host_in, port_in) = request;
    let scheme = r.scheme.as_deref().unwrap_or(scheme_in);
    let well_known = |s: &str| if s == "https" { 443 } else { 80 };
    let port = r.port.unwrap_or_else(|| {
        if r.scheme.is_some() {
            well_known(scheme)
        } else {
            port_in
        }
    });
    let host = r.hostname.as_deref().unwrap_or(host_in);
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let port = if port == well_known(scheme) {
        String::new()
    } else {
        format!(":{port}")
    };
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{path}{query}")
}

/// Whether a request (its head, and its normalized path without query) meets every condition
/// of `m`.
pub fn matches(m: &RouteMatch, parts: &http::request::Parts, path: &str) -> bool {
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

/// The backend a weighted rule sends a request to, for a draw `r` (uniform over `u64`): each
/// backend's share is its weight over the total. `None` when the rule names no backend.
pub fn weighted(backends: &[BackendRef], r: u64) -> Option<&BackendRef> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    let mut r = r % total.max(1);
    backends
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
        .or(backends.first())
}

/// Whether a fault given as a percentage applies, for a draw `r` (uniform over `u64`), with a
/// resolution of 0.01%.
pub fn applies(percent: f64, r: u64) -> bool {
    (r % 10_000) < (percent * 100.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        route::{balance::Balancer, limits::Limits},
        state::{
            LbPolicy, TrafficPolicy, ValueMatch,
            testing::{key, pattern, service},
        },
    };
    use std::sync::Arc;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("test request").into_parts().0
    }

    fn path_match(p: PathMatch) -> RouteMatch {
        RouteMatch {
            path: Some(p),
            ..RouteMatch::default()
        }
    }

    fn entry(routes: Vec<HttpRoute>) -> ServiceEntry {
        let svc = service("web", "10.96.0.10", &[(80, 8080)], &["10.0.0.1"]);
        ServiceEntry::new(
            Arc::new(svc),
            routes,
            Balancer::new(&[], LbPolicy::RoundRobin, None, None),
            Arc::new(Limits::new(&TrafficPolicy::default())),
        )
    }

    fn route(name: &str, port: Option<u16>, rules: Vec<RouteRule>) -> HttpRoute {
        HttpRoute {
            key: key("default", name),
            service: key("default", "web"),
            port,
            hostnames: Vec::new(),
            rules,
        }
    }

    #[test]
    fn hostnames_take_the_requests_host_without_its_port_and_wildcards_need_a_label() {
        let host = |uri: &str, h: Option<&str>| {
            let headers: Vec<(&str, &str)> = h.map(|h| ("host", h)).into_iter().collect();
            request_host(&parts("GET", uri, &headers))
        };
        assert_eq!(
            host("/", Some("Web.Example.com:8080")).as_deref(),
            Some("web.example.com")
        );
        assert_eq!(host("http://a.b:80/x", None).as_deref(), Some("a.b"));
        assert_eq!(host("/", Some("[fd00::1]")).as_deref(), Some("[fd00::1]"));
        assert_eq!(host("/", None), None);
        let names = ["web.example.com".to_string(), "*.shop.io".to_string()];
        assert!(host_matches(&[], None));
        assert!(host_matches(&names, Some("web.example.com")));
        assert!(host_matches(&names, Some("a.shop.io")));
        assert!(host_matches(&names, Some("a.b.shop.io")));
        assert!(!host_matches(&names, Some("shop.io")));
        assert!(!host_matches(&names, Some("xshop.io")));
        assert!(!host_matches(&names, Some("other.example.com")));
        assert!(!host_matches(&names, None));
        // A route whose hostnames do not take the request is passed over; none left is 404.
        let mut r = route("r", None, vec![rule(vec![], "v1")]);
        r.hostnames = vec!["web.example.com".into()];
        let e = entry(vec![r]);
        let p = parts("GET", "/", &[("host", "web.example.com:80")]);
        assert!(find_rule(&e, 80, &p, "/").is_some());
        let p = parts("GET", "/", &[("host", "web")]);
        assert!(find_rule(&e, 80, &p, "/").is_none());
    }

    #[test]
    fn path_modifiers_replace_the_whole_path_or_the_matched_prefix() {
        let full = PathModifier::Full("/new".into());
        assert_eq!(modified_path(&full, Some("/foo"), "/foo/bar"), "/new");
        let to = |w: &str| PathModifier::Prefix(w.into());
        assert_eq!(
            modified_path(&to("/xyz"), Some("/foo"), "/foo/bar"),
            "/xyz/bar"
        );
        assert_eq!(modified_path(&to("/xyz"), Some("/foo"), "/foo"), "/xyz");
        assert_eq!(modified_path(&to("/xyz"), Some("/foo"), "/foo/"), "/xyz/");
        assert_eq!(
            modified_path(&to("/xyz/"), Some("/foo"), "/foo/bar"),
            "/xyz/bar"
        );
        assert_eq!(modified_path(&to("/"), Some("/foo"), "/foo/bar"), "/bar");
        assert_eq!(modified_path(&to("/"), Some("/foo"), "/foo"), "/");
        // A `/` match is stored as the empty prefix.
        assert_eq!(modified_path(&to("/xyz"), Some(""), "/foo"), "/xyz/foo");
        let r = rule(
            vec![
                path_match(PathMatch::Exact("/x".into())),
                path_match(PathMatch::Prefix("/api".into())),
            ],
            "v1",
        );
        let p = parts("GET", "/api/v1", &[]);
        assert_eq!(matched_prefix(&r, &p, "/api/v1"), Some("/api"));
        assert_eq!(matched_prefix(&r, &p, "/x"), None);
    }

    #[test]
    fn redirects_keep_what_they_do_not_change_and_drop_default_ports() {
        let r = |scheme: Option<&str>, host: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(String::from),
            hostname: host.map(String::from),
            path: None,
            port,
            status: 302,
        };
        let req = ("http", "web.shop", 8080);
        assert_eq!(
            redirect_location(&r(None, None, None), req, "/a", Some("q=1")),
            "http://web.shop:8080/a?q=1"
        );
        assert_eq!(
            redirect_location(&r(Some("https"), None, None), req, "/a", None),
            "https://web.shop/a"
        );
        assert_eq!(
            redirect_location(&r(Some("https"), Some("x.io"), Some(8443)), req, "/", None),
            "https://x.io:8443/"
        );
        assert_eq!(
            redirect_location(&r(None, None, Some(80)), req, "/", None),
            "http://web.shop/"
        );
        assert_eq!(
            redirect_location(&r(None, None, None), ("http", "fd00::1", 80), "/", None),
            "http://[fd00::1]/"
        );
    }

    fn rule(matches: Vec<RouteMatch>, backend: &str) -> RouteRule {
        RouteRule {
            matches,
            backends: vec![BackendRef {
                service: key("default", backend),
                port: 80,
                weight: 1,
            }],
            ..RouteRule::default()
        }
    }

    fn picked(e: &ServiceEntry, port: u16, p: &http::request::Parts) -> Option<String> {
        find_rule(e, port, p, p.uri.path()).map(|(at, rule)| match at {
            None => "default".to_string(),
            Some((r, i)) => format!("{}#{i}->{}", r.key.name, rule.backends[0].service.name),
        })
    }

    #[test]
    fn a_service_without_routes_takes_the_default_rule() {
        let e = entry(vec![]);
        let (at, rule) = find_rule(&e, 80, &parts("GET", "/", &[]), "/").expect("a rule");
        assert!(at.is_none());
        assert!(
            rule.backends.is_empty(),
            "the default rule sends to the service itself"
        );
    }

    #[test]
    fn routes_bound_to_another_port_do_not_apply() {
        let e = entry(vec![route("r", Some(9090), vec![rule(vec![], "v2")])]);
        assert_eq!(
            picked(&e, 80, &parts("GET", "/", &[])).as_deref(),
            Some("default")
        );
        assert_eq!(
            picked(&e, 9090, &parts("GET", "/", &[])).as_deref(),
            Some("r#0->v2")
        );
    }

    #[test]
    fn the_first_matching_rule_wins_in_order() {
        let e = entry(vec![route(
            "r",
            None,
            vec![
                rule(vec![path_match(PathMatch::Prefix("/api".into()))], "api"),
                rule(vec![], "rest"),
            ],
        )]);
        assert_eq!(
            picked(&e, 80, &parts("GET", "/api/x", &[])).as_deref(),
            Some("r#0->api")
        );
        assert_eq!(
            picked(&e, 80, &parts("GET", "/other", &[])).as_deref(),
            Some("r#1->rest")
        );
    }

    #[test]
    fn no_matching_rule_is_none_so_the_request_gets_404() {
        let e = entry(vec![route(
            "r",
            None,
            vec![rule(vec![path_match(PathMatch::Exact("/a".into()))], "a")],
        )]);
        assert!(picked(&e, 80, &parts("GET", "/b", &[])).is_none());
    }

    #[test]
    fn any_match_of_a_rule_selects_it() {
        let m = vec![
            path_match(PathMatch::Exact("/a".into())),
            path_match(PathMatch::Exact("/b".into())),
        ];
        let e = entry(vec![route("r", None, vec![rule(m, "ab")])]);
        assert!(picked(&e, 80, &parts("GET", "/b", &[])).is_some());
        assert!(picked(&e, 80, &parts("GET", "/c", &[])).is_none());
    }

    #[test]
    fn prefix_matches_whole_segments_only() {
        let m = path_match(PathMatch::Prefix("/api".into()));
        let p = parts("GET", "/", &[]);
        assert!(matches(&m, &p, "/api"));
        assert!(matches(&m, &p, "/api/v1"));
        assert!(
            !matches(&m, &p, "/apiv1"),
            "a prefix ends at a segment boundary"
        );
        assert!(!matches(&m, &p, "/ap"));
    }

    #[test]
    fn an_empty_prefix_matches_every_path() {
        let m = path_match(PathMatch::Prefix(String::new()));
        assert!(matches(&m, &parts("GET", "/", &[]), "/anything"));
    }

    #[test]
    fn exact_path_is_exact() {
        let m = path_match(PathMatch::Exact("/a".into()));
        let p = parts("GET", "/", &[]);
        assert!(matches(&m, &p, "/a"));
        assert!(!matches(&m, &p, "/a/"));
        assert!(!matches(&m, &p, "/A"));
    }

    #[test]
    fn regex_paths_match_the_whole_path() {
        let m = path_match(PathMatch::Regex(pattern("/v[0-9]+")));
        let p = parts("GET", "/", &[]);
        assert!(matches(&m, &p, "/v12"));
        assert!(!matches(&m, &p, "/v12/x"), "anchored at the end");
        assert!(!matches(&m, &p, "/x/v12"), "anchored at the start");
    }

    #[test]
    fn a_regex_alternation_matches_on_any_branch_that_covers_the_value() {
        // A search finds the first branch ("/a") and would miss that "/ab" matches whole.
        let m = path_match(PathMatch::Regex(pattern("/a|/ab")));
        assert!(matches(&m, &parts("GET", "/", &[]), "/ab"));
    }

    #[test]
    fn method_must_be_equal() {
        let m = RouteMatch {
            method: Some("POST".into()),
            ..RouteMatch::default()
        };
        assert!(matches(&m, &parts("POST", "/", &[]), "/"));
        assert!(!matches(&m, &parts("GET", "/", &[]), "/"));
    }

    #[test]
    fn headers_match_any_value_of_a_repeated_header() {
        let m = RouteMatch {
            headers: vec![("x-env".into(), ValueMatch::Exact("canary".into()))],
            ..RouteMatch::default()
        };
        let both = parts("GET", "/", &[("x-env", "prod"), ("x-env", "canary")]);
        assert!(matches(&m, &both, "/"));
        assert!(!matches(&m, &parts("GET", "/", &[("x-env", "prod")]), "/"));
        assert!(
            !matches(&m, &parts("GET", "/", &[]), "/"),
            "an absent header fails"
        );
    }

    #[test]
    fn header_regexes_and_every_condition_must_hold() {
        let m = RouteMatch {
            headers: vec![
                ("x-user".into(), ValueMatch::Regex(pattern("u[0-9]+"))),
                ("x-env".into(), ValueMatch::Exact("canary".into())),
            ],
            ..RouteMatch::default()
        };
        let ok = parts("GET", "/", &[("x-user", "u42"), ("x-env", "canary")]);
        let one = parts("GET", "/", &[("x-user", "u42")]);
        assert!(matches(&m, &ok, "/"));
        assert!(!matches(&m, &one, "/"));
    }

    #[test]
    fn query_parameters_match_by_name_and_value() {
        let m = RouteMatch {
            query: vec![("v".into(), ValueMatch::Exact("2".into()))],
            ..RouteMatch::default()
        };
        assert!(matches(&m, &parts("GET", "/?a=1&v=2", &[]), "/"));
        assert!(!matches(&m, &parts("GET", "/?v=3", &[]), "/"));
        assert!(!matches(&m, &parts("GET", "/", &[]), "/"));
        let flag = RouteMatch {
            query: vec![("debug".into(), ValueMatch::Exact(String::new()))],
            ..RouteMatch::default()
        };
        assert!(
            matches(&flag, &parts("GET", "/?debug", &[]), "/"),
            "a bare name is empty"
        );
    }

    fn backends(weights: &[u32]) -> Vec<BackendRef> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendRef {
                service: key("default", &format!("b{i}")),
                port: 80,
                weight,
            })
            .collect()
    }

    fn name(b: Option<&BackendRef>) -> &str {
        b.map_or("-", |b| b.service.name.as_str())
    }

    #[test]
    fn weighted_choice_follows_the_weights() {
        let bs = backends(&[1, 3]);
        // Draws 0..4 cover the total weight once: one to b0, three to b1.
        let got: Vec<&str> = (0..4).map(|r| name(weighted(&bs, r))).collect();
        assert_eq!(got, ["b0", "b1", "b1", "b1"]);
        assert_eq!(name(weighted(&bs, 4)), "b0", "draws wrap around the total");
    }

    #[test]
    fn a_zero_weight_backend_receives_nothing() {
        let bs = backends(&[0, 2]);
        assert!((0..100).all(|r| name(weighted(&bs, r)) == "b1"));
    }

    #[test]
    fn all_zero_weights_fall_back_to_the_first_and_none_is_none() {
        assert_eq!(name(weighted(&backends(&[0, 0]), 7)), "b0");
        assert!(weighted(&[], 7).is_none());
    }

    #[test]
    fn fault_percentages_have_a_resolution_of_a_hundredth() {
        assert!(!applies(0.0, 0));
        assert!(applies(100.0, 9_999));
        assert!(applies(0.01, 0));
        assert!(!applies(0.01, 1));
        assert_eq!((0..10_000).filter(|&r| applies(25.0, r)).count(), 2_500);
    }
}
