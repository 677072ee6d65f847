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

use std::{fmt, net::IpAddr};

use crate::{
    identity::Identity,
    state::{
        Action, AuthorizationPolicy, Condition, ConditionKey, Labels, ObjectKey, Operation, Rule,
        Source, selects,
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
    /// Istio's root namespace: its policies apply to every namespace.
    pub root_namespace: &'a str,
    /// Destination pod's labels.
    pub labels: &'a Labels,
    /// Destination port.
    pub port: u16,
    /// The connection's source address, when known: the source pod's own, since the proxy
    /// dials from inside it (`ipBlocks`).
    pub source_ip: Option<IpAddr>,
    /// The services that send this port to the destination pod (`targetRefs`).
    pub services: &'a [ObjectKey],
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
    /// The host the request names (`:authority` or Host), as sent.
    pub host: Option<&'a str>,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
}

/// The host a request names, as sent: HTTP/2's `:authority`, else its Host header.
pub fn request_host(parts: &http::request::Parts) -> Option<&str> {
    parts
        .uri
        .authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })
}

/// Whether `p` applies to the destination of `req`: a policy of its namespace, or of the root
/// namespace (mesh-wide), whose selector matches.
fn applies(p: &AuthorizationPolicy, req: &Request<'_>) -> bool {
    (p.key.namespace == req.namespace || p.key.namespace == req.root_namespace)
        && if p.target_services.is_empty() {
            selects(&p.selector, req.labels)
        } else {
            p.target_services.iter().any(|k| req.services.contains(k))
        }
}

/// The AUDIT policies whose rules match `req`: they change no decision, and are logged.
pub fn audits<'p>(policies: &'p [AuthorizationPolicy], req: &Request<'_>) -> Vec<&'p ObjectKey> {
    policies
        .iter()
        .filter(|p| {
            p.action == Action::Audit
                && applies(p, req)
                && p.rules.iter().any(|r| rule_matches(r, req, false))
        })
        .map(|p| &p.key)
        .collect()
}

/// Decides `req` against `policies`.
pub fn evaluate(policies: &[AuthorizationPolicy], req: &Request<'_>) -> Decision {
    let applies = |p: &&AuthorizationPolicy| applies(p, req);
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
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req)))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|o| operation_matches(o, req, l7_unknown)))
        && rule
            .when
            .iter()
            .all(|c| condition_matches(c, req, l7_unknown))
}

/// Whether `value` passes a `values`/`notValues` pair: in `yes` (when given), not in `no`. No
/// value (plaintext has no principal) is in no list, as in Istio: it fails a `yes` list and
/// passes a `no` list, so "DENY all but these principals" denies plaintext too.
fn listed(yes: &[String], no: &[String], value: Option<&str>) -> bool {
    let any = |list: &[String], v: &str| list.iter().any(|pat| glob(pat, v));
    match value {
        Some(v) => (yes.is_empty() || any(yes, v)) && !any(no, v),
        None => yes.is_empty(),
    }
}

fn source_matches(s: &Source, req: &Request<'_>) -> bool {
    let id = req.source;
    let in_blocks = |blocks: &[ipnet::IpNet]| {
        req.source_ip
            .is_some_and(|ip| blocks.iter().any(|b| b.contains(&ip)))
    };
    // No known address is in no block, as no principal is in no list (see `listed`).
    if (!s.ip_blocks.is_empty() && !in_blocks(&s.ip_blocks)) || in_blocks(&s.not_ip_blocks) {
        return false;
    }
    let principal = id.map(|i| {
        format!(
            "{}/ns/{}/sa/{}",
            i.trust_domain, i.namespace, i.service_account
        )
    });
    listed(&s.principals, &s.not_principals, principal.as_deref())
        && listed(
            &s.namespaces,
            &s.not_namespaces,
            id.map(|i| i.namespace.as_str()),
        )
}

fn operation_matches(o: &Operation, req: &Request<'_>, l7_unknown: bool) -> bool {
    if !(o.ports.is_empty() || o.ports.contains(&req.port)) || o.not_ports.contains(&req.port) {
        return false;
    }
    if !o.is_l7() {
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
    // A not-path matches in its plain form only: the deny form widens what DENY refuses, and
    // widening an exclusion would narrow it.
    (o.methods.is_empty() || o.methods.iter().any(|m| m == http.method))
        && !o.not_methods.iter().any(|m| m == http.method)
        && (o.paths.is_empty() || o.paths.iter().any(path_matches))
        && !o.not_paths.iter().any(|p| glob(p, http.path))
        && host_listed(&o.hosts, &o.not_hosts, http.host)
}

/// Istio's `hosts`/`notHosts`: case-insensitive, and an entry without a port matches the host
/// with any port. A request without a host is in no list.
fn host_listed(yes: &[String], no: &[String], host: Option<&str>) -> bool {
    if yes.is_empty() && no.is_empty() {
        return true;
    }
    let Some(host) = host.map(str::to_ascii_lowercase) else {
        return yes.is_empty();
    };
    let bare = match host.rsplit_once(':') {
        Some((h, port)) if !host.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host.as_str(),
    };
    let any = |list: &[String]| {
        list.iter().any(|p| {
            let p = p.to_ascii_lowercase();
            glob(&p, &host) || glob(&p, bare)
        })
    };
    (yes.is_empty() || any(yes)) && !any(no)
}

fn condition_matches(c: &Condition, req: &Request<'_>, l7_unknown: bool) -> bool {
    match &c.key {
        ConditionKey::SourcePrincipal => {
            let principal = req.source.map(|i| {
                format!(
                    "{}/ns/{}/sa/{}",
                    i.trust_domain, i.namespace, i.service_account
                )
            });
            listed(&c.values, &c.not_values, principal.as_deref())
        }
        ConditionKey::SourceNamespace => listed(
            &c.values,
            &c.not_values,
            req.source.map(|i| i.namespace.as_str()),
        ),
        ConditionKey::Header(name) => {
            let Some(http) = req.http else {
                return l7_unknown;
            };
            let values: Vec<&str> = http
                .headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let any = |list: &[String]| values.iter().any(|v| list.iter().any(|p| glob(p, v)));
            (c.values.is_empty() || any(&c.values)) && !any(&c.not_values)
        }
    }
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
            target_services: Vec::new(),
            action,
            rules,
        }
    }

    fn from_principal(p: &str) -> Rule {
        Rule {
            from: vec![Source {
                principals: vec![p.into()],
                ..Source::default()
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
                root_namespace: "istio-system",
                labels: &labels,
                port,
                source_ip: None,
                services: &[],
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
                    namespaces: vec!["oth*".into()],
                    ..Source::default()
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
                    key: ConditionKey::Header("x-team".into()),
                    values: vec!["blue".into()],
                    not_values: vec![],
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
                    host: None,
                    headers: h,
                };
                evaluate(
                    policies,
                    &Request {
                        source: Some(&web),
                        namespace: "default",
                        root_namespace: "istio-system",
                        labels: &labels,
                        port: 80,
                        source_ip: None,
                        services: &[],
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
            host: None,
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
                root_namespace: "istio-system",
                labels: &labels,
                port: 80,
                source_ip: None,
                services: &[],
                http: Some(h),
            },
        )
    }

    fn to_paths(paths: &[&str], methods: &[&str]) -> Rule {
        Rule {
            from: vec![],
            to: vec![Operation {
                methods: methods.iter().map(ToString::to_string).collect(),
                paths: paths.iter().map(ToString::to_string).collect(),
                ..Operation::default()
            }],
            when: vec![],
        }
    }

    #[test]
    fn negative_fields_exclude_and_plaintext_is_in_no_list() {
        let (web, admin) = (
            Identity::new("cluster.local", "default", "web"),
            Identity::new("cluster.local", "ops", "admin"),
        );
        // DENY everyone but admin: web and plaintext are denied, admin passes.
        let all_but_admin = policy(
            "all-but-admin",
            Action::Deny,
            vec![Rule {
                from: vec![Source {
                    not_principals: vec!["cluster.local/ns/ops/sa/admin".into()],
                    ..Source::default()
                }],
                ..Rule::default()
            }],
        );
        let p = std::slice::from_ref(&all_but_admin);
        assert!(matches!(decide(p, Some(&web), 80), Decision::Denied(_)));
        assert!(
            matches!(decide(p, None, 80), Decision::Denied(_)),
            "plaintext too"
        );
        assert_eq!(decide(p, Some(&admin), 80), Decision::Allow);
        // ALLOW from any namespace but `default`, on any port but 9090.
        let allow = policy(
            "not-default",
            Action::Allow,
            vec![Rule {
                from: vec![Source {
                    not_namespaces: vec!["default".into()],
                    ..Source::default()
                }],
                to: vec![Operation {
                    not_ports: vec![9090],
                    ..Operation::default()
                }],
                ..Rule::default()
            }],
        );
        let p = std::slice::from_ref(&allow);
        assert_eq!(decide(p, Some(&admin), 80), Decision::Allow);
        assert!(matches!(
            decide(p, Some(&admin), 9090),
            Decision::NotAllowed(_)
        ));
        assert!(matches!(decide(p, Some(&web), 80), Decision::NotAllowed(_)));
        // Methods and paths: GET anything but /private.
        let h = http::HeaderMap::new();
        let get_public = policy(
            "get-not-private",
            Action::Allow,
            vec![Rule {
                to: vec![Operation {
                    methods: vec!["GET".into()],
                    not_paths: vec!["/private*".into()],
                    not_methods: vec!["POST".into()],
                    ..Operation::default()
                }],
                ..Rule::default()
            }],
        );
        let p = std::slice::from_ref(&get_public);
        assert_eq!(
            decide_http(p, &http_request("GET", "/x", "/x", &h)),
            Decision::Allow
        );
        assert!(matches!(
            decide_http(p, &http_request("GET", "/private/a", "/private/a", &h)),
            Decision::NotAllowed(_)
        ));
        assert!(matches!(
            decide_http(p, &http_request("POST", "/x", "/x", &h)),
            Decision::NotAllowed(_)
        ));
    }

    #[test]
    fn when_conditions_on_the_source_decide_without_http() {
        let (web, db) = (
            Identity::new("cluster.local", "default", "web"),
            Identity::new("cluster.local", "data", "db"),
        );
        let cond = |key: ConditionKey, values: &[&str], not: &[&str]| Condition {
            key,
            values: values.iter().map(ToString::to_string).collect(),
            not_values: not.iter().map(ToString::to_string).collect(),
        };
        let p = policy(
            "when-source",
            Action::Allow,
            vec![Rule {
                when: vec![
                    cond(ConditionKey::SourceNamespace, &["default", "data"], &[]),
                    cond(
                        ConditionKey::SourcePrincipal,
                        &[],
                        &["cluster.local/ns/data/*"],
                    ),
                ],
                ..Rule::default()
            }],
        );
        assert!(!p.rules[0].is_l7(), "decided per connection");
        let p = std::slice::from_ref(&p);
        assert_eq!(decide(p, Some(&web), 80), Decision::Allow);
        assert!(matches!(decide(p, Some(&db), 80), Decision::NotAllowed(_)));
        assert!(matches!(decide(p, None, 80), Decision::NotAllowed(_)));
    }

    #[test]
    fn root_namespace_policies_apply_to_every_namespace() {
        let web = Identity::new("cluster.local", "default", "web");
        let mut mesh_deny = policy(
            "no-web",
            Action::Deny,
            vec![from_principal("cluster.local/ns/default/sa/web")],
        );
        mesh_deny.key.namespace = "istio-system".into();
        let p = std::slice::from_ref(&mesh_deny);
        // `decide` asks for a pod in `default`: the root namespace's policy applies there.
        assert!(matches!(decide(p, Some(&web), 80), Decision::Denied(_)));
        // Another namespace's policy does not.
        let mut other = mesh_deny.clone();
        other.key.namespace = "other".into();
        assert_eq!(decide(&[other], Some(&web), 80), Decision::Allow);
    }

    #[test]
    fn audit_policies_decide_nothing_and_are_reported() {
        let web = Identity::new("cluster.local", "default", "web");
        let audit = policy(
            "audit-web",
            Action::Audit,
            vec![from_principal("cluster.local/ns/default/sa/web")],
        );
        let deny_none = policy(
            "deny-other",
            Action::Deny,
            vec![from_principal("x/ns/y/sa/z")],
        );
        let policies = [audit, deny_none];
        assert_eq!(decide(&policies, Some(&web), 80), Decision::Allow);
        let labels = Labels::new();
        let req = Request {
            source: Some(&web),
            namespace: "default",
            root_namespace: "istio-system",
            labels: &labels,
            port: 80,
            source_ip: None,
            services: &[],
            http: None,
        };
        let audited: Vec<String> = audits(&policies, &req)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(audited, ["default/audit-web"]);
    }

    #[test]
    fn ip_blocks_match_the_source_address_and_no_address_is_in_no_block() {
        let web = Identity::new("cluster.local", "default", "web");
        let block = |s: &str| s.parse::<ipnet::IpNet>().expect("block");
        let rule = |yes: &[&str], no: &[&str]| Rule {
            from: vec![Source {
                ip_blocks: yes.iter().map(|b| block(b)).collect(),
                not_ip_blocks: no.iter().map(|b| block(b)).collect(),
                ..Source::default()
            }],
            ..Rule::default()
        };
        let labels = Labels::new();
        let ask = |p: &AuthorizationPolicy, ip: Option<&str>| {
            evaluate(
                std::slice::from_ref(p),
                &Request {
                    source: Some(&web),
                    namespace: "default",
                    root_namespace: "istio-system",
                    labels: &labels,
                    port: 80,
                    source_ip: ip.map(|i| i.parse().expect("ip")),
                    services: &[],
                    http: None,
                },
            )
        };
        let allow = policy(
            "a",
            Action::Allow,
            vec![rule(&["10.1.0.0/16"], &["10.1.9.0/24"])],
        );
        assert_eq!(ask(&allow, Some("10.1.2.3")), Decision::Allow);
        assert!(matches!(
            ask(&allow, Some("10.1.9.3")),
            Decision::NotAllowed(_)
        ));
        assert!(matches!(
            ask(&allow, Some("10.2.0.1")),
            Decision::NotAllowed(_)
        ));
        assert!(matches!(ask(&allow, None), Decision::NotAllowed(_)));
        let v6 = policy("a", Action::Allow, vec![rule(&["fd00::/8"], &[])]);
        assert_eq!(ask(&v6, Some("fd00::5")), Decision::Allow);
        assert!(matches!(
            ask(&v6, Some("10.1.2.3")),
            Decision::NotAllowed(_)
        ));
        // DENY all but a block: an unknown address is denied too.
        let deny = policy("d", Action::Deny, vec![rule(&[], &["10.1.0.0/16"])]);
        assert!(matches!(ask(&deny, Some("10.2.0.1")), Decision::Denied(_)));
        assert_eq!(ask(&deny, Some("10.1.0.1")), Decision::Allow);
        assert!(matches!(ask(&deny, None), Decision::Denied(_)));
    }

    #[test]
    fn hosts_match_case_insensitively_with_or_without_the_port() {
        let hosts = |yes: &[&str], no: &[&str]| -> Vec<AuthorizationPolicy> {
            vec![policy(
                "h",
                Action::Allow,
                vec![Rule {
                    to: vec![Operation {
                        hosts: yes.iter().map(|h| (*h).to_string()).collect(),
                        not_hosts: no.iter().map(|h| (*h).to_string()).collect(),
                        ..Operation::default()
                    }],
                    ..Rule::default()
                }],
            )]
        };
        let h = http::HeaderMap::new();
        let ask = |p: &[AuthorizationPolicy], host: Option<&str>| {
            let mut a = http_request("GET", "/", "/", &h);
            a.host = host;
            decide_http(p, &a)
        };
        let p = hosts(
            &["web.shop.svc.cluster.local", "*.example.com"],
            &["admin.example.com"],
        );
        for ok in [
            "web.shop.svc.cluster.local",
            "WEB.shop.svc.cluster.local:8080",
            "a.example.com",
        ] {
            assert_eq!(ask(&p, Some(ok)), Decision::Allow, "{ok}");
        }
        for no in [
            "admin.example.com",
            "admin.example.com:80",
            "other",
            "10.0.0.1",
        ] {
            assert!(matches!(ask(&p, Some(no)), Decision::NotAllowed(_)), "{no}");
        }
        assert!(matches!(ask(&p, None), Decision::NotAllowed(_)));
        let port = hosts(&["web:8080"], &[]);
        assert_eq!(ask(&port, Some("web:8080")), Decision::Allow);
        assert!(matches!(
            ask(&port, Some("web:9090")),
            Decision::NotAllowed(_)
        ));
        // Hosts are L7: without HTTP, an ALLOW on them allows nothing and a DENY denies.
        assert!(p[0].rules[0].is_l7());
    }

    #[test]
    fn target_refs_apply_a_policy_to_the_ports_its_services_send_to() {
        let web = Identity::new("cluster.local", "default", "web");
        let mut p = policy("t", Action::Allow, vec![from_principal("x/ns/y/sa/z")]);
        p.target_services = vec![ObjectKey {
            namespace: "default".into(),
            name: "db".into(),
        }];
        let labels = Labels::new();
        let ask = |services: &[ObjectKey]| {
            evaluate(
                std::slice::from_ref(&p),
                &Request {
                    source: Some(&web),
                    namespace: "default",
                    root_namespace: "istio-system",
                    labels: &labels,
                    port: 80,
                    source_ip: None,
                    services,
                    http: None,
                },
            )
        };
        let db = [ObjectKey {
            namespace: "default".into(),
            name: "db".into(),
        }];
        assert!(
            matches!(ask(&db), Decision::NotAllowed(_)),
            "the policy applies"
        );
        assert_eq!(
            ask(&[]),
            Decision::Allow,
            "a port no target sends to: not applied"
        );
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
                key: ConditionKey::Header("x-team".into()),
                values: vec!["blue".into()],
                not_values: vec![],
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
