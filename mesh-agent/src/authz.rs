//! Authorization, in the shape of Istio's AuthorizationPolicy: L4 (source, port) and L7 (method,
//! path, headers).
//!
//! Evaluation for a connection or request to a local pod:
//! 1. every DENY policy that selects the pod: a matching rule denies;
//! 2. no ALLOW policy selects the pod: allowed;
//! 3. otherwise allowed only if some ALLOW rule matches.
//!
//! A rule with HTTP conditions, decided for a connection that is not HTTP, fails closed: as an
//! ALLOW rule it does not match, and as a DENY rule it does (Istio does the same).
//!
//! The source identity is the one the proxy established itself: the peer certificate's SPIFFE ID
//! (HBONE) or the kernel-attributed source pod (same node). Plaintext has no identity, so rules
//! that name principals or namespaces never match it.

use std::fmt;

use crate::{
    identity::Identity,
    state::{
        Action, AuthorizationPolicy, Condition, Labels, ObjectKey, Operation, Rule, Source, selects,
    },
};

/// The outcome, naming the policy responsible for a denial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The connection may proceed.
    Allow,
    /// Refused by this DENY policy.
    Denied(ObjectKey),
    /// ALLOW policies select the pod and none matched; they are listed.
    NotAllowed(Vec<ObjectKey>),
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allow => write!(f, "allowed"),
            Self::Denied(p) => write!(f, "denied by DENY policy {p}"),
            Self::NotAllowed(ps) => {
                let names: Vec<String> = ps.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "denied: no rule of the ALLOW policies {} matched",
                    names.join(", ")
                )
            }
        }
    }
}

/// The connection being decided.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The authenticated source, if any.
    pub source: Option<&'a Identity>,
    /// Destination pod's namespace.
    pub namespace: &'a str,
    /// Destination pod's labels.
    pub labels: &'a Labels,
    /// Destination port.
    pub port: u16,
    /// The HTTP request, when the traffic is HTTP and is decided per request.
    pub http: Option<&'a HttpAttributes<'a>>,
}

/// What L7 rules look at. The path is already normalized (see `l7::path`), without its query.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    /// Method.
    pub method: &'a str,
    /// Normalized path: what ALLOW rules and routes match, and what the backend receives.
    pub path: &'a str,
    /// The path with every spelling a backend may fold into one folded (`l7::path::deny_form`).
    /// DENY rules match it as well as `path`, so `/ADMIN`, `/admin.` or `/admin%20` are denied
    /// with `/admin`.
    pub deny_path: &'a str,
    /// Whether `deny_path` was case-folded, so DENY patterns are folded too.
    pub fold_case: bool,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
}

/// Decides `req` against `policies`.
pub fn evaluate(policies: &[AuthorizationPolicy], req: &Request<'_>) -> Decision {
    let applies = |p: &&AuthorizationPolicy| {
        p.key.namespace == req.namespace && selects(&p.selector, req.labels)
    };
    if let Some(p) = policies
        .iter()
        .filter(applies)
        .filter(|p| p.action == Action::Deny)
        .find(|p| p.rules.iter().any(|r| rule_matches(r, req, true)))
    {
        return Decision::Denied(p.key.clone());
    }
    let allows: Vec<&AuthorizationPolicy> = policies
        .iter()
        .filter(applies)
        .filter(|p| p.action == Action::Allow)
        .collect();
    if allows.is_empty()
        || allows
            .iter()
            .any(|p| p.rules.iter().any(|r| rule_matches(r, req, false)))
    {
        Decision::Allow
    } else {
        Decision::NotAllowed(allows.iter().map(|p| p.key.clone()).collect())
    }
}

/// `l7_unknown`: what an HTTP condition evaluates to when the traffic is not HTTP (fail closed:
/// true for DENY, false for ALLOW). It also says which action is decided: DENY paths match the
/// request's deny form too.
fn rule_matches(rule: &Rule, req: &Request<'_>, l7_unknown: bool) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req.source)))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|o| operation_matches(o, req, l7_unknown)))
        && rule
            .when
            .iter()
            .all(|c| condition_matches(c, req.http, l7_unknown))
}

fn source_matches(s: &Source, id: Option<&Identity>) -> bool {
    let principal = id.map(|i| {
        format!(
            "{}/ns/{}/sa/{}",
            i.trust_domain, i.namespace, i.service_account
        )
    });
    let list_matches = |list: &[String], value: Option<&str>| {
        list.is_empty() || value.is_some_and(|v| list.iter().any(|pat| glob(pat, v)))
    };
    list_matches(&s.principals, principal.as_deref())
        && list_matches(&s.namespaces, id.map(|i| i.namespace.as_str()))
}

fn operation_matches(o: &Operation, req: &Request<'_>, l7_unknown: bool) -> bool {
    if !(o.ports.is_empty() || o.ports.contains(&req.port)) {
        return false;
    }
    if o.methods.is_empty() && o.paths.is_empty() {
        return true;
    }
    let Some(http) = req.http else {
        return l7_unknown;
    };
    let deny = l7_unknown;
    let path_matches = |p: &String| {
        glob(p, http.path)
            || (deny
                && if http.fold_case {
                    glob_lowercased(p, http.deny_path)
                } else {
                    glob(p, http.deny_path)
                })
    };
    (o.methods.is_empty() || o.methods.iter().any(|m| m == http.method))
        && (o.paths.is_empty() || o.paths.iter().any(path_matches))
}

fn condition_matches(c: &Condition, http: Option<&HttpAttributes<'_>>, l7_unknown: bool) -> bool {
    let Some(http) = http else {
        return l7_unknown;
    };
    http.headers
        .get_all(c.header.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| c.values.iter().any(|pat| glob(pat, v)))
}

/// [`glob`] of `pattern` lowercased against a `value` that already is, without allocating: it
/// runs for every DENY path pattern of every request.
fn glob_lowercased(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        let mut v = value.chars();
        prefix
            .chars()
            .flat_map(char::to_lowercase)
            .all(|c| v.next() == Some(c))
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        let mut v = value.chars().rev();
        suffix
            .chars()
            .rev()
            .flat_map(|c| c.to_lowercase().rev())
            .all(|c| v.next() == Some(c))
    } else {
        pattern
            .chars()
            .flat_map(char::to_lowercase)
            .eq(value.chars())
    }
}

/// Istio's string match: exact, `*`, `prefix*` or `*suffix`.
fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercased_glob_is_glob_of_the_lowercased_pattern() {
        let patterns = [
            "*", "/Admin*", "*.JSON", "/ADMIN", "/Ä*", "*İ", "/x", "", "/admin/*",
        ];
        let values = [
            "/admin", "/admin/x", "/a.json", "/äb", "/i̇", "/x", "", "/adm", "x.json",
        ];
        for p in patterns {
            for v in values {
                assert_eq!(
                    glob_lowercased(p, v),
                    glob(&p.to_lowercase(), v),
                    "{p:?} against {v:?}"
                );
            }
        }
    }

    fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            key: ObjectKey {
                namespace: "default".into(),
                name: name.into(),
            },
            selector: Labels::new(),
            action,
            rules,
        }
    }

    fn from_principal(p: &str) -> Rule {
        Rule {
            from: vec![Source {
                principals: vec![p.into()],
                namespaces: vec![],
            }],
            to: vec![],
            when: vec![],
        }
    }

    fn decide(policies: &[AuthorizationPolicy], src: Option<&Identity>, port: u16) -> Decision {
        let labels = Labels::new();
        evaluate(
            policies,
            &Request {
                source: src,
                namespace: "default",
                labels: &labels,
                port,
                http: None,
            },
        )
    }

    #[test]
    fn deny_first_then_allow_then_default() {
        let web = Identity::new("cluster.local", "default", "web");
        let db = Identity::new("cluster.local", "other", "db");
        assert_eq!(decide(&[], Some(&web), 80), Decision::Allow);
        let allow_web = policy(
            "allow-web",
            Action::Allow,
            vec![from_principal("cluster.local/ns/default/sa/web")],
        );
        assert_eq!(
            decide(std::slice::from_ref(&allow_web), Some(&web), 80),
            Decision::Allow
        );
        assert!(matches!(
            decide(std::slice::from_ref(&allow_web), Some(&db), 80),
            Decision::NotAllowed(_)
        ));
        assert!(matches!(
            decide(std::slice::from_ref(&allow_web), None, 80),
            Decision::NotAllowed(_)
        ));
        let deny_80 = policy(
            "deny-80",
            Action::Deny,
            vec![Rule {
                from: vec![],
                to: vec![Operation {
                    ports: vec![80],
                    ..Operation::default()
                }],
                when: vec![],
            }],
        );
        let both = [allow_web, deny_80];
        assert_eq!(
            decide(&both, Some(&web), 80),
            Decision::Denied(both[1].key.clone())
        );
        assert_eq!(decide(&both, Some(&web), 81), Decision::Allow);
    }

    #[test]
    fn namespaces_and_globs() {
        let db = Identity::new("cluster.local", "other", "db");
        let by_ns = policy(
            "ns",
            Action::Allow,
            vec![Rule {
                from: vec![Source {
                    principals: vec![],
                    namespaces: vec!["oth*".into()],
                }],
                to: vec![],
                when: vec![],
            }],
        );
        assert_eq!(
            decide(std::slice::from_ref(&by_ns), Some(&db), 1),
            Decision::Allow
        );
        assert!(matches!(decide(&[by_ns], None, 1), Decision::NotAllowed(_)));
        let any = policy("any", Action::Allow, vec![from_principal("*")]);
        assert_eq!(decide(&[any], Some(&db), 1), Decision::Allow);
        // An ALLOW policy without rules allows nothing.
        let none = policy("none", Action::Allow, vec![]);
        assert!(matches!(
            decide(&[none], Some(&db), 1),
            Decision::NotAllowed(_)
        ));
    }

    #[test]
    fn l7_rules_match_requests_and_fail_closed_without_http() {
        let web = Identity::new("cluster.local", "default", "web");
        let deny_admin = policy(
            "no-admin",
            Action::Deny,
            vec![Rule {
                to: vec![Operation {
                    paths: vec!["/admin*".into()],
                    ..Operation::default()
                }],
                ..Rule::default()
            }],
        );
        let allow_get = policy(
            "get-only",
            Action::Allow,
            vec![Rule {
                to: vec![Operation {
                    methods: vec!["GET".into()],
                    ..Operation::default()
                }],
                when: vec![Condition {
                    header: "x-team".into(),
                    values: vec!["blue".into()],
                }],
                ..Rule::default()
            }],
        );
        let labels = Labels::new();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-team", http::HeaderValue::from_static("blue"));
        let ask =
            |policies: &[AuthorizationPolicy], method: &str, path: &str, h: &http::HeaderMap| {
                let deny_path = crate::protocol::path::deny_form(path, true);
                let attrs = HttpAttributes {
                    method,
                    path,
                    deny_path: &deny_path,
                    fold_case: true,
                    headers: h,
                };
                evaluate(
                    policies,
                    &Request {
                        source: Some(&web),
                        namespace: "default",
                        labels: &labels,
                        port: 80,
                        http: Some(&attrs),
                    },
                )
            };
        let both = [deny_admin.clone(), allow_get.clone()];
        assert_eq!(ask(&both, "GET", "/x", &headers), Decision::Allow);
        // DENY folds case and trailing dots; ALLOW keeps the exact path.
        for p in ["/ADMIN/users", "/Admin./users", "/admin/USERS"] {
            assert_eq!(
                ask(&both, "GET", p, &headers),
                Decision::Denied(deny_admin.key.clone()),
                "{p}"
            );
        }
        assert_eq!(
            ask(&both, "GET", "/admin/users", &headers),
            Decision::Denied(deny_admin.key.clone())
        );
        assert!(matches!(
            ask(&both, "POST", "/x", &headers),
            Decision::NotAllowed(_)
        ));
        assert!(matches!(
            ask(&both, "GET", "/x", &http::HeaderMap::new()),
            Decision::NotAllowed(_)
        ));
        // Not HTTP: the DENY rule on paths matches and the ALLOW rule on methods does not.
        assert_eq!(
            decide(std::slice::from_ref(&deny_admin), Some(&web), 80),
            Decision::Denied(deny_admin.key.clone())
        );
        assert!(matches!(
            decide(&[allow_get], Some(&web), 80),
            Decision::NotAllowed(_)
        ));
    }

    fn http_request<'a>(
        method: &'a str,
        path: &'a str,
        deny_path: &'a str,
        headers: &'a http::HeaderMap,
    ) -> HttpAttributes<'a> {
        HttpAttributes {
            method,
            path,
            deny_path,
            fold_case: true,
            headers,
        }
    }

    fn decide_http(policies: &[AuthorizationPolicy], h: &HttpAttributes<'_>) -> Decision {
        let labels = Labels::new();
        let web = Identity::new("cluster.local", "default", "web");
        evaluate(
            policies,
            &Request {
                source: Some(&web),
                namespace: "default",
                labels: &labels,
                port: 80,
                http: Some(h),
            },
        )
    }

    fn to_paths(paths: &[&str], methods: &[&str]) -> Rule {
        Rule {
            from: vec![],
            to: vec![Operation {
                ports: vec![],
                methods: methods.iter().map(ToString::to_string).collect(),
                paths: paths.iter().map(ToString::to_string).collect(),
            }],
            when: vec![],
        }
    }

    #[test]
    fn a_policy_for_other_labels_or_namespaces_does_not_apply() {
        let web = Identity::new("cluster.local", "default", "web");
        let mut p = policy("allow-none", Action::Allow, vec![]);
        p.selector = Labels::from([("app".to_string(), "db".to_string())]);
        assert_eq!(
            decide(std::slice::from_ref(&p), Some(&web), 80),
            Decision::Allow
        );
        let mut other_ns = policy("allow-none", Action::Allow, vec![]);
        other_ns.key.namespace = "other".into();
        assert_eq!(decide(&[other_ns], Some(&web), 80), Decision::Allow);
    }

    #[test]
    fn a_deny_rule_with_an_empty_match_denies_everything() {
        let p = policy("deny-all", Action::Deny, vec![Rule::default()]);
        assert_eq!(
            decide(std::slice::from_ref(&p), None, 80),
            Decision::Denied(p.key.clone())
        );
    }

    #[test]
    fn principals_never_match_plaintext() {
        let p = policy("allow-any-sa", Action::Allow, vec![from_principal("*")]);
        assert!(matches!(decide(&[p], None, 80), Decision::NotAllowed(_)));
    }

    #[test]
    fn allow_rules_match_method_and_path() {
        let h = http::HeaderMap::new();
        let p = policy(
            "get-api",
            Action::Allow,
            vec![to_paths(&["/api/*"], &["GET"])],
        );
        let ps = std::slice::from_ref(&p);
        assert_eq!(
            decide_http(ps, &http_request("GET", "/api/x", "/api/x", &h)),
            Decision::Allow
        );
        assert!(matches!(
            decide_http(ps, &http_request("POST", "/api/x", "/api/x", &h)),
            Decision::NotAllowed(_)
        ));
        assert!(matches!(
            decide_http(ps, &http_request("GET", "/other", "/other", &h)),
            Decision::NotAllowed(_)
        ));
    }

    #[test]
    fn deny_rules_also_match_the_folded_spelling_of_a_path() {
        let h = http::HeaderMap::new();
        let p = policy("deny-admin", Action::Deny, vec![to_paths(&["/admin"], &[])]);
        let ps = std::slice::from_ref(&p);
        // `/ADMIN.` reaches a backend that folds case and trailing dots as `/admin`.
        assert_eq!(
            decide_http(ps, &http_request("GET", "/ADMIN.", "/admin", &h)),
            Decision::Denied(p.key.clone())
        );
        assert_eq!(
            decide_http(ps, &http_request("GET", "/public", "/public", &h)),
            Decision::Allow
        );
    }

    #[test]
    fn deny_patterns_are_folded_too() {
        let h = http::HeaderMap::new();
        let p = policy(
            "deny-admin",
            Action::Deny,
            vec![to_paths(&["/Admin*"], &[])],
        );
        assert_eq!(
            decide_http(
                std::slice::from_ref(&p),
                &http_request("GET", "/x", "/admin/users", &h)
            ),
            Decision::Denied(p.key.clone())
        );
    }

    #[test]
    fn when_conditions_match_request_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("x-team", http::HeaderValue::from_static("blue"));
        let rule = Rule {
            when: vec![Condition {
                header: "x-team".into(),
                values: vec!["blue".into()],
            }],
            ..Rule::default()
        };
        let p = policy("team", Action::Allow, vec![rule]);
        let ps = std::slice::from_ref(&p);
        assert_eq!(
            decide_http(ps, &http_request("GET", "/", "/", &h)),
            Decision::Allow
        );
        let none = http::HeaderMap::new();
        assert!(matches!(
            decide_http(ps, &http_request("GET", "/", "/", &none)),
            Decision::NotAllowed(_)
        ));
    }
}
