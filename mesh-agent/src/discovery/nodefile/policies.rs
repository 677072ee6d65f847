//! The security parts of the node file: `peerAuthentications` (mTLS mode per selector) and
//! `authorizationPolicies` (Istio's shape).

use std::collections::BTreeMap;

use super::{
    fields::{Ctx, ObjectError, who},
    raw::policy::{RawAuthorizationPolicy, RawMtls, RawPeerAuthentication},
};
use crate::state::{
    Action, AuthorizationPolicy, Condition, ConditionKey, MtlsMode, NodeState, ObjectKey,
    Operation, PeerAuthentication, Rule, Source,
};

pub(super) fn validate_peer_authentications(
    raw: &[RawPeerAuthentication],
    state: &mut NodeState,
    errors: &mut Vec<ObjectError>,
) {
    for (i, rp) in raw.iter().enumerate() {
        let mut cx = Ctx {
            kind: "peerAuthentication",
            who: who(&rp.namespace, &rp.name),
            position: rp
                .position
                .clone()
                .unwrap_or_else(|| format!("peerAuthentications[{i}]")),
            errors,
        };
        let name = cx.label("name", &rp.name);
        let namespace = cx.label("namespace", &rp.namespace);
        if let Some(why) = &rp.unreadable {
            cx.fail("spec", format!("{why}; applying STRICT until fixed"));
        }
        let written = match (&rp.mode, rp.mtls.as_ref().map(|m| &m.mode)) {
            (Some(_), Some(_)) => {
                cx.fail("mode", "set `mode` or `mtls.mode`, not both");
                &None
            }
            (Some(_), None) => &rp.mode,
            (None, Some(m)) => m,
            (None, None) if rp.unreadable.is_some() => &None,
            // Istio's form, or port modes only: no `mtls` is UNSET.
            (None, None) if rp.position.is_some() || rp.port_level_mtls.is_some() => {
                &Some(String::new())
            }
            (None, None) => {
                cx.fail("mtls.mode", "missing (required)");
                &None
            }
        };
        let mut mode = mtls_mode(&mut cx, "mode", written.as_deref());
        let before = cx.errors.len();
        let mut ports = port_modes(&mut cx, rp);
        if cx.errors.len() != before {
            // Whatever was meant for a port is unknown: every port is STRICT until fixed.
            mode = Some(MtlsMode::Strict);
            ports.clear();
        }
        if let (Some(name), Some(namespace)) = (name, namespace) {
            state.peer_authentications.push(PeerAuthentication {
                key: ObjectKey { namespace, name },
                selector: rp.selector.match_labels.clone(),
                mode,
                ports,
            });
        }
    }
}

/// A written mode. One that cannot be read is taken as STRICT: a typo must not open a workload.
fn mtls_mode(cx: &mut Ctx<'_>, field: &'static str, written: Option<&str>) -> Option<MtlsMode> {
    match written {
        Some("STRICT") => Some(MtlsMode::Strict),
        // Plaintext is accepted either way; HBONE always is.
        Some("PERMISSIVE" | "DISABLE") => Some(MtlsMode::Permissive),
        Some("UNSET" | "") => None,
        other => {
            if let Some(m) = other {
                cx.fail(
                    field,
                    format!(
                        "{m:?} is not STRICT, PERMISSIVE, DISABLE or UNSET; applying STRICT until fixed"
                    ),
                );
            }
            Some(MtlsMode::Strict)
        }
    }
}

/// `portLevelMtls`, UNSET entries left out. Any entry that cannot be read, or the field on a
/// policy without a selector (Istio refuses that), is reported, and the caller then makes the
/// whole policy STRICT: nothing written to open a port may open more.
fn port_modes(cx: &mut Ctx<'_>, rp: &RawPeerAuthentication) -> BTreeMap<u16, MtlsMode> {
    const FIELD: &str = "portLevelMtls";
    let mut out = BTreeMap::new();
    let Some(map) = &rp.port_level_mtls else {
        return out;
    };
    if rp.selector.is_empty() {
        cx.fail(FIELD, "needs a selector (Istio reads port modes only for the pods a policy selects); applying STRICT until fixed");
        return out;
    }
    for (k, v) in map {
        let port = match k {
            serde_yaml_ng::Value::Number(n) => n.as_u64(),
            serde_yaml_ng::Value::String(s) => s.parse().ok(),
            _ => None,
        };
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            cx.fail(
                FIELD,
                format!(
                    "{} is not a port; applying STRICT until fixed",
                    serde_json::to_string(k).unwrap_or_else(|_| format!("{k:?}"))
                ),
            );
            continue;
        };
        let written =
            serde_yaml_ng::from_value::<RawMtls>(v.clone()).map(|m| m.mode.unwrap_or_default());
        let mode = match written {
            Ok(w) => mtls_mode(cx, FIELD, Some(&w)),
            Err(e) => {
                cx.fail(
                    FIELD,
                    format!("port {port}: {e}; applying STRICT until fixed"),
                );
                None
            }
        };
        if let Some(m) = mode {
            out.insert(port, m);
        }
    }
    out
}

pub(super) fn validate_authorization_policies(
    raw: &[RawAuthorizationPolicy],
    state: &mut NodeState,
    errors: &mut Vec<ObjectError>,
) {
    for (i, rp) in raw.iter().enumerate() {
        let mut cx = Ctx {
            kind: "authorizationPolicy",
            who: who(&rp.namespace, &rp.name),
            position: rp
                .position
                .clone()
                .unwrap_or_else(|| format!("authorizationPolicies[{i}]")),
            errors,
        };
        let before = cx.errors.len();
        let name = cx.label("name", &rp.name);
        let namespace = cx.label("namespace", &rp.namespace);
        if let Some(why) = &rp.unreadable {
            cx.fail("spec", why.clone());
        }
        let action = match rp.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some("AUDIT") => Action::Audit,
            // An external authorizer the mesh does not call: what it would be asked is denied.
            Some("CUSTOM") => {
                cx.fail(
                    "action",
                    "CUSTOM (an external authorizer) is not supported; until replaced, the policy denies what its rules match",
                );
                Action::Deny
            }
            Some(other) => {
                cx.fail(
                    "action",
                    format!("{other:?} is not ALLOW, DENY or AUDIT; the policy denies everything it selects until fixed"),
                );
                Action::Deny
            }
        };
        let target_services = target_services(&mut cx, rp);
        let principal = |p: &String| p.strip_prefix("spiffe://").unwrap_or(p).to_string();
        let mut rules = Vec::new();
        for r in &rp.rules {
            let mut from = Vec::new();
            for f in &r.from {
                let mut blocks = |list: &[String]| -> Vec<ipnet::IpNet> {
                    list.iter()
                        .filter_map(|b| match ip_block(b) {
                            Some(n) => Some(n),
                            None => {
                                cx.fail(
                                    "rules.from.source.ipBlocks",
                                    format!("{b:?} is not an address or CIDR block (10.0.0.0/16, fd00::/8, 10.1.2.3)"),
                                );
                                None
                            }
                        })
                        .collect()
                };
                let (ip_blocks, not_ip_blocks) =
                    (blocks(&f.source.ip_blocks), blocks(&f.source.not_ip_blocks));
                from.push(Source {
                    principals: f.source.principals.iter().map(principal).collect(),
                    not_principals: f.source.not_principals.iter().map(principal).collect(),
                    namespaces: f.source.namespaces.clone(),
                    not_namespaces: f.source.not_namespaces.clone(),
                    ip_blocks,
                    not_ip_blocks,
                });
            }
            let mut to = Vec::new();
            for t in &r.to {
                let mut ports = |list: &[serde_yaml_ng::Value]| {
                    let mut out = Vec::new();
                    for v in list {
                        let port = match v {
                            serde_yaml_ng::Value::Number(n) => n.as_u64(),
                            serde_yaml_ng::Value::String(s) => s.parse().ok(),
                            _ => None,
                        };
                        match port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) {
                            Some(p) => out.push(p),
                            None => {
                                cx.fail("rules.to.operation.ports", format!("{v:?} is not a port"))
                            }
                        }
                    }
                    out
                };
                let (yes, no) = (ports(&t.operation.ports), ports(&t.operation.not_ports));
                for path in t.operation.paths.iter().chain(&t.operation.not_paths) {
                    if !(path.starts_with('/') || path.starts_with('*')) {
                        cx.fail(
                            "rules.to.operation.paths",
                            format!("{path:?} must start with '/' (or be a '*' suffix match)"),
                        );
                    }
                }
                to.push(Operation {
                    ports: yes,
                    not_ports: no,
                    methods: t.operation.methods.clone(),
                    not_methods: t.operation.not_methods.clone(),
                    paths: t.operation.paths.clone(),
                    not_paths: t.operation.not_paths.clone(),
                    hosts: t.operation.hosts.clone(),
                    not_hosts: t.operation.not_hosts.clone(),
                });
            }
            let mut when = Vec::new();
            for c in &r.when {
                let header = c
                    .key
                    .strip_prefix("request.headers[")
                    .and_then(|k| k.strip_suffix(']'))
                    .filter(|h| http::HeaderName::try_from(*h).is_ok());
                let key = match (c.key.as_str(), header) {
                    (_, Some(h)) => ConditionKey::Header(h.to_ascii_lowercase()),
                    ("source.principal", None) => ConditionKey::SourcePrincipal,
                    ("source.namespace", None) => ConditionKey::SourceNamespace,
                    _ => {
                        cx.fail(
                            "rules.when",
                            format!(
                                "{:?} is not supported: use request.headers[<name>], source.principal or source.namespace",
                                c.key
                            ),
                        );
                        continue;
                    }
                };
                if c.values.is_empty() && c.not_values.is_empty() {
                    cx.fail(
                        "rules.when",
                        format!("{}: needs `values` or `notValues`", c.key),
                    );
                    continue;
                }
                let values = |list: &[String]| match key {
                    ConditionKey::SourcePrincipal => list.iter().map(principal).collect(),
                    _ => list.to_vec(),
                };
                when.push(Condition {
                    values: values(&c.values),
                    not_values: values(&c.not_values),
                    key,
                });
            }
            rules.push(Rule { from, to, when });
        }
        let (Some(name), Some(namespace)) = (name, namespace) else {
            continue;
        };
        let key = ObjectKey { namespace, name };
        if cx.errors.len() != before {
            // Fail closed: a broken ALLOW allows nothing, a broken DENY denies everything.
            rules = match action {
                Action::Allow | Action::Audit => Vec::new(),
                Action::Deny => vec![Rule::default()],
            };
            cx.fail(
                "rules",
                format!(
                    "policy {key} is invalid; until fixed it {}",
                    match action {
                        Action::Allow => "allows nothing",
                        Action::Deny => "denies every connection it selects",
                        Action::Audit => "audits nothing",
                    }
                ),
            );
        }
        state.authorization_policies.push(AuthorizationPolicy {
            key,
            selector: rp.selector.match_labels.clone(),
            target_services,
            action,
            rules,
        });
    }
}

/// An `ipBlocks` entry: a CIDR block, or one address (a block of one).
fn ip_block(b: &str) -> Option<ipnet::IpNet> {
    b.parse::<ipnet::IpNet>()
        .ok()
        .map(|n| n.trunc())
        .or_else(|| b.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// The Services a policy's `targetRefs` name (in its own namespace). Istio allows no selector
/// beside them, and this mesh attaches policies to nothing else: anything else fails the policy,
/// closed.
fn target_services(cx: &mut Ctx<'_>, rp: &RawAuthorizationPolicy) -> Vec<ObjectKey> {
    let refs: Vec<_> = rp.target_refs.iter().chain(&rp.target_ref).collect();
    if refs.is_empty() {
        return Vec::new();
    }
    if !rp.selector.is_empty() {
        cx.fail(
            "targetRefs",
            "a policy has a selector or targetRefs, not both",
        );
    }
    let mut out = Vec::new();
    for r in refs {
        let core = matches!(r.group.as_deref(), None | Some("" | "core"));
        let own = r.namespace.is_none() || r.namespace == rp.namespace;
        match (&r.name, core && r.kind.as_deref() == Some("Service") && own) {
            (Some(name), true) => out.push(ObjectKey {
                namespace: rp.namespace.clone().unwrap_or_default(),
                name: name.clone(),
            }),
            _ => cx.fail(
                "targetRefs",
                format!(
                    "{}/{} is not supported: target a Service (group \"\", kind Service) by name, in the policy's namespace",
                    r.kind.as_deref().unwrap_or("?"),
                    r.name.as_deref().unwrap_or("?")
                ),
            ),
        }
    }
    out
}
