//! Which HTTP rule a request takes, and which backend a weighted rule sends it to. Pure
//! functions of the request's head and the table, so every case is unit-tested here.

use std::borrow::Cow;

use super::table::ServiceEntry;
use crate::state::{BackendRef, HttpRoute, PathMatch, RouteMatch, RouteRule};

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
        .map(|(r, i, rule)| (Some((r, i)), Cow::Borrowed(rule)))
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
            svc,
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
            rules,
        }
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
