//! L4 authorization, in the shape of Istio's AuthorizationPolicy.
//!
//! Evaluation for a connection to a local pod:
//! 1. every DENY policy that selects the pod: a matching rule denies;
//! 2. no ALLOW policy selects the pod: allowed;
//! 3. otherwise allowed only if some ALLOW rule matches.
//!
//! The source identity is the one the proxy established itself: the peer certificate's SPIFFE ID
//! (HBONE) or the kernel-attributed source pod (same node). Plaintext has no identity, so rules
//! that name principals or namespaces never match it.

use std::fmt;

use crate::{
    identity::Identity,
    state::{Action, AuthorizationPolicy, Labels, ObjectKey, Operation, Rule, Source, selects},
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
        .find(|p| p.rules.iter().any(|r| rule_matches(r, req)))
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
            .any(|p| p.rules.iter().any(|r| rule_matches(r, req)))
    {
        Decision::Allow
    } else {
        Decision::NotAllowed(allows.iter().map(|p| p.key.clone()).collect())
    }
}

fn rule_matches(rule: &Rule, req: &Request<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, req.source)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, req.port)))
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

fn operation_matches(o: &Operation, port: u16) -> bool {
    o.ports.is_empty() || o.ports.contains(&port)
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
                to: vec![Operation { ports: vec![80] }],
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
}
