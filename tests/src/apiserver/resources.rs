//! The kinds the stand-in API server serves, and the discovery documents kubectl and kube-rs read
//! to find them.

use serde_json::{Value, json};

/// One resource type: where it lives in the API and what its objects are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// Version within the group.
    pub version: &'static str,
    /// The plural lower-case name in URLs.
    pub plural: &'static str,
    /// The object kind.
    pub kind: &'static str,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// kubectl's short names.
    pub short: &'static [&'static str],
    /// Whether it is stored (TokenReview is only created and answered).
    pub stored: bool,
}

const fn r(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
) -> Resource {
    Resource {
        group,
        version,
        plural,
        kind,
        namespaced,
        short,
        stored: true,
    }
}

/// Everything the mesh reads, plus the kinds kubectl needs to make and label them.
pub const RESOURCES: &[Resource] = &[
    r("", "v1", "namespaces", "Namespace", false, &["ns"]),
    r("", "v1", "nodes", "Node", false, &["no"]),
    r("", "v1", "pods", "Pod", true, &["po"]),
    r("", "v1", "services", "Service", true, &["svc"]),
    r("", "v1", "serviceaccounts", "ServiceAccount", true, &["sa"]),
    r("", "v1", "configmaps", "ConfigMap", true, &["cm"]),
    r("", "v1", "secrets", "Secret", true, &[]),
    r(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        true,
        &[],
    ),
    r("apps", "v1", "deployments", "Deployment", true, &["deploy"]),
    r("apps", "v1", "replicasets", "ReplicaSet", true, &["rs"]),
    r("apps", "v1", "statefulsets", "StatefulSet", true, &["sts"]),
    r("apps", "v1", "daemonsets", "DaemonSet", true, &["ds"]),
    r(
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "HTTPRoute",
        true,
        &[],
    ),
    r(
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        true,
        &["ap"],
    ),
    r(
        "security.istio.io",
        "v1",
        "peerauthentications",
        "PeerAuthentication",
        true,
        &["pa"],
    ),
    r(
        "networking.istio.io",
        "v1",
        "destinationrules",
        "DestinationRule",
        true,
        &["dr"],
    ),
    Resource {
        stored: false,
        ..r(
            "authentication.k8s.io",
            "v1",
            "tokenreviews",
            "TokenReview",
            false,
            &[],
        )
    },
];

impl Resource {
    /// `apiVersion` as objects carry it.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The list kind (`PodList`).
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    fn discovery_entry(&self) -> Value {
        let verbs: &[&str] = if self.stored {
            &[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ]
        } else {
            &["create"]
        };
        json!({
            "name": self.plural,
            "singularName": self.kind.to_ascii_lowercase(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short,
        })
    }
}

/// The resource at `group`/`version`/`plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource for an object's `apiVersion` and `kind`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
}

/// `GET /api`.
pub fn core_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
}

/// `GET /apis`: every named group.
pub fn groups() -> Value {
    let mut names: Vec<(&str, &str)> = RESOURCES
        .iter()
        .filter(|r| !r.group.is_empty())
        .map(|r| (r.group, r.version))
        .collect();
    names.sort();
    names.dedup();
    let groups: Vec<Value> = names
        .iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /api/v1` or `GET /apis/<group>/<version>`; `None` for a group version not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let list: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(Resource::discovery_entry)
        .collect();
    if list.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_version_has_a_resource_list() {
        for r in RESOURCES {
            let list = resource_list(r.group, r.version).expect("served");
            assert!(
                list["resources"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|e| e["name"] == r.plural))
            );
            assert_eq!(by_kind(&r.api_version(), r.kind), Some(r));
        }
        assert!(resource_list("nope.io", "v1").is_none());
    }
}
