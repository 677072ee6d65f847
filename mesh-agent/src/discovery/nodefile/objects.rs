//! Kubernetes objects as users write them (`apiVersion`, `kind`, `metadata`, `spec`): Istio's
//! AuthorizationPolicy and PeerAuthentication, its DestinationRule, and Gateway API's HTTPRoute.
//! The node file takes them as extra YAML documents, and Kubernetes discovery gets them from the
//! API server; both read them here into the same raw model the node file's lists use, so one
//! validation serves both.
//!
//! An object that cannot be read (an unknown field, a wrong type) is reported with its kind, name
//! and the reason. Security objects then fail closed: an AuthorizationPolicy allows nothing (or,
//! if it was a DENY, denies everything it selects), a PeerAuthentication is STRICT. Routes and
//! destination rules carry no security decision and are left out.

use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{
    fields::ObjectError,
    raw::{
        RawFile,
        policy::{RawAuthorizationPolicy, RawPeerAuthentication, RawSelector},
        route::{RawDestinationRule, RawHttpRoute},
    },
};

/// Which API versions of each kind are read. Istio's v1beta1 and v1alpha3 (DestinationRule) and
/// Gateway API's v1beta1 have the same fields for everything the mesh reads.
const KINDS: &[(&str, &[&str])] = &[
    (
        "AuthorizationPolicy",
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ),
    (
        "PeerAuthentication",
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ),
    (
        "DestinationRule",
        &[
            "networking.istio.io/v1",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        ],
    ),
    (
        "HTTPRoute",
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
    ),
];

/// Splits a node file into its node section (the one document without `apiVersion` and `kind`)
/// and its Kubernetes objects, read into the section's lists. Problems with single objects are
/// returned beside it; only YAML that cannot be parsed, or a second node section, fails the
/// file (the error is the parser's message).
pub(super) fn documents(text: &str) -> Result<(RawFile, Vec<ObjectError>), String> {
    let syntax = |message: String| message;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        docs.push(serde_yaml_ng::Value::deserialize(doc).map_err(|e| syntax(e.to_string()))?);
    }
    let is_object =
        |v: &serde_yaml_ng::Value| v.get("apiVersion").is_some() || v.get("kind").is_some();
    let mut section = None;
    for (i, v) in docs.iter().enumerate() {
        if v.is_null() || is_object(v) {
            continue;
        }
        if let Some(first) = section {
            return Err(syntax(format!(
                "documents {} and {} are both node sections (no apiVersion and kind); keep one, and write the rest as Kubernetes objects",
                first + 1,
                i + 1
            )));
        }
        section = Some(i);
    }
    let mut file = match section {
        // Read again from the text, so that errors carry their line and column.
        Some(i) => serde_yaml_ng::Deserializer::from_str(text)
            .nth(i)
            .map(RawFile::deserialize)
            .transpose()
            .map_err(|e| syntax(e.to_string()))?
            .unwrap_or_default(),
        None => RawFile::default(),
    };
    let mut errors = Vec::new();
    for (i, v) in docs.iter().enumerate() {
        if v.is_null() || !is_object(v) {
            continue;
        }
        let position = format!("document {}", i + 1);
        match serde_json::to_value(v) {
            Ok(obj) => read(&position, &obj, &mut file, &mut errors),
            Err(e) => errors.push(error(
                "object",
                "?".into(),
                &position,
                "metadata",
                format!("cannot be read as an object: {e}"),
            )),
        }
    }
    Ok((file, errors))
}

fn error(
    kind: &'static str,
    who: String,
    position: &str,
    field: &'static str,
    problem: String,
) -> ObjectError {
    ObjectError {
        kind,
        who,
        position: position.to_string(),
        field,
        problem,
    }
}

/// The static kind name, for messages.
fn kind_name(kind: &str) -> &'static str {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or("object", |(k, _)| k)
}

/// Reads one object into `file`'s lists (each entry remembers `position`, its place in the
/// source, for messages). What cannot be read is added to `errors`.
pub fn read(position: &str, obj: &Value, file: &mut RawFile, errors: &mut Vec<ObjectError>) {
    let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let meta = obj.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    // As kubectl does, an object with no namespace goes to `default`.
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let who = format!("{namespace}/{}", name.unwrap_or("?"));
    let Some((_, versions)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        errors.push(error(
            "object",
            who,
            position,
            "kind",
            format!(
                "{api_version}/{kind} is not a kind the mesh reads: use AuthorizationPolicy, PeerAuthentication (security.istio.io/v1), DestinationRule (networking.istio.io/v1) or HTTPRoute (gateway.networking.k8s.io/v1); ignored"
            ),
        ));
        return;
    };
    let kind_static = kind_name(kind);
    if !versions.contains(&api_version) {
        errors.push(error(
            kind_static,
            who,
            position,
            "apiVersion",
            format!(
                "{api_version:?} is not read for {kind}: use {}; ignored",
                versions.join(" or ")
            ),
        ));
        return;
    }
    let Some(name) = name else {
        errors.push(error(
            kind_static,
            who,
            position,
            "metadata.name",
            "missing (required)".into(),
        ));
        return;
    };
    let spec = obj.get("spec").cloned().unwrap_or_else(|| json!({}));
    let Value::Object(mut flat) = spec else {
        errors.push(error(
            kind_static,
            who,
            position,
            "spec",
            "must be a mapping".into(),
        ));
        return;
    };
    flat.insert("name".into(), json!(name));
    flat.insert("namespace".into(), json!(namespace));
    let flat = Value::Object(flat);
    let position = position.to_string();
    match kind {
        "AuthorizationPolicy" => {
            let p = parse::<RawAuthorizationPolicy>(&flat).unwrap_or_else(|why| {
                // Fail closed with what can be read: its selector and action.
                RawAuthorizationPolicy {
                    name: Some(name.into()),
                    namespace: Some(namespace.into()),
                    selector: lenient_selector(&flat),
                    action: flat.get("action").and_then(Value::as_str).map(String::from),
                    unreadable: Some(why),
                    ..Default::default()
                }
            });
            file.authorization_policies.push(RawAuthorizationPolicy {
                position: Some(position),
                ..p
            });
        }
        "PeerAuthentication" => {
            let p =
                parse::<RawPeerAuthentication>(&flat).unwrap_or_else(|why| RawPeerAuthentication {
                    name: Some(name.into()),
                    namespace: Some(namespace.into()),
                    selector: lenient_selector(&flat),
                    unreadable: Some(why),
                    ..Default::default()
                });
            file.peer_authentications.push(RawPeerAuthentication {
                position: Some(position),
                ..p
            });
        }
        "HTTPRoute" => match parse::<RawHttpRoute>(&flat) {
            Ok(r) => file.http_routes.push(RawHttpRoute {
                position: Some(position),
                ..r
            }),
            Err(why) => errors.push(left_out(kind_static, who, &position, why, "routing")),
        },
        _ => match parse::<RawDestinationRule>(&flat) {
            Ok(r) => file.destination_rules.push(RawDestinationRule {
                position: Some(position),
                ..r
            }),
            Err(why) => errors.push(left_out(kind_static, who, &position, why, "settings")),
        },
    }
}

/// A route or rule that cannot be read: it carries no security decision, so it is left out and
/// its service keeps its defaults.
fn left_out(
    kind: &'static str,
    who: String,
    position: &str,
    why: String,
    what: &str,
) -> ObjectError {
    error(
        kind,
        who,
        position,
        "spec",
        format!("{why}; left out, so its service keeps default {what}"),
    )
}

fn parse<T: DeserializeOwned>(flat: &Value) -> Result<T, String> {
    serde_json::from_value(flat.clone()).map_err(|e| format!("cannot be read: {e}"))
}

fn lenient_selector(flat: &Value) -> RawSelector {
    flat.get("selector")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_yaml(text: &str) -> (RawFile, Vec<ObjectError>) {
        let mut file = RawFile::default();
        let mut errors = Vec::new();
        let v: Value = serde_yaml_ng::from_str(text).expect("yaml");
        read("document 1", &v, &mut file, &mut errors);
        (file, errors)
    }

    #[test]
    fn istio_and_gateway_objects_read_into_the_node_file_model() {
        let (f, e) = read_yaml(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n",
        );
        assert!(e.is_empty(), "{e:?}");
        let p = &f.authorization_policies[0];
        assert_eq!(
            (
                p.name.as_deref(),
                p.namespace.as_deref(),
                p.action.as_deref()
            ),
            (Some("a"), Some("shop"), Some("DENY"))
        );
        assert_eq!(p.position.as_deref(), Some("document 1"));
        let (f, e) = read_yaml(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{kind: Service, name: web, port: 80}]\n  rules: [{backendRefs: [{name: v1, port: 80}]}]\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(f.http_routes[0].namespace.as_deref(), Some("default"));
    }

    #[test]
    fn unreadable_security_objects_fail_closed_and_others_are_reported() {
        let (f, e) = read_yaml(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules: [{from: [{source: {requestPrincipals: [x]}}]}]\n",
        );
        assert!(e.is_empty(), "reported when validated: {e:?}");
        let p = &f.authorization_policies[0];
        assert!(
            p.unreadable
                .as_deref()
                .is_some_and(|w| w.contains("requestPrincipals")),
            "{p:?}"
        );
        assert_eq!(p.action.as_deref(), Some("DENY"));
        assert_eq!(p.selector.match_labels["app"], "web");
        let (f, e) = read_yaml(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [], sessionPersistence: {}}\n",
        );
        assert!(f.http_routes.is_empty());
        assert!(e[0].problem.contains("sessionPersistence"), "{e:?}");
        let (_, e) = read_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n");
        assert!(e[0].problem.contains("not a kind the mesh reads"), "{e:?}");
        let (_, e) = read_yaml(
            "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: c}\n",
        );
        assert_eq!(e[0].field, "apiVersion");
    }

    #[test]
    fn target_refs_ip_blocks_and_hosts_are_read_and_other_targets_fail_closed() {
        use crate::{discovery::nodefile::load_text, state::Action};
        let load = |spec: &str| {
            let text = format!(
                "node: n1\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
            );
            let l = load_text(std::path::Path::new("n.yaml"), &text, None, None).expect("loads");
            let e: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
            (l.state.authorization_policies, e)
        };
        let (p, e) = load(
            "  targetRefs: [{kind: Service, group: \"\", name: db}]
  rules:
  - from: [{source: {ipBlocks: [10.1.0.0/16, 10.9.9.9], notIpBlocks: ['fd00::/8']}}]
    to: [{operation: {hosts: [db.shop.svc.cluster.local], notHosts: ['*.evil']}}]
",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p[0].target_services[0].to_string(), "shop/db");
        let src = &p[0].rules[0].from[0];
        assert_eq!(src.ip_blocks.len(), 2);
        assert_eq!(src.ip_blocks[1].to_string(), "10.9.9.9/32");
        assert_eq!(p[0].rules[0].to[0].hosts, ["db.shop.svc.cluster.local"]);
        for (spec, says) in [
            (
                "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]\n  action: ALLOW\n  rules: [{}]\n",
                "Gateway/g is not supported",
            ),
            (
                "  selector: {matchLabels: {app: db}}\n  targetRef: {kind: Service, name: db}\n  rules: [{}]\n",
                "not both",
            ),
            (
                "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]\n",
                "not an address or CIDR",
            ),
        ] {
            let (p, e) = load(spec);
            assert!(e.iter().any(|m| m.contains(says)), "{spec}: {e:?}");
            assert_eq!(p[0].action, Action::Allow);
            assert!(p[0].rules.is_empty(), "fails closed: allows nothing");
        }
    }

    #[test]
    fn a_node_file_takes_kubernetes_objects_as_further_documents() {
        use crate::{discovery::nodefile::load_text, state::MtlsMode};
        let text = "node: n1
workloads:
  - {name: r, namespace: shop, serviceAccount: sa, ip: 10.0.1.1, node: n2, labels: {app: web}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {requestPrincipals: [x]}}]}]
";
        let path = std::path::Path::new("n.yaml");
        let l = load_text(path, text, None, None).expect("loads");
        assert_eq!(l.state.peer_authentications[0].mode, Some(MtlsMode::Strict));
        // The unreadable DENY denies everything it selects, and says so with its place.
        let p = &l.state.authorization_policies[0];
        assert_eq!(p.rules.len(), 1);
        assert!(p.rules[0].from.is_empty() && p.rules[0].to.is_empty());
        let msg: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        assert!(
            msg.iter()
                .any(|m| m.contains("document 3") && m.contains("requestPrincipals")),
            "{msg:?}"
        );
        let two = format!("{text}---\nnode: n2\n");
        let e = load_text(path, &two, None, None).expect_err("two node sections");
        assert!(e.to_string().contains("both node sections"), "{e}");
    }
}
