//! The node file's `peerAuthentications` and `authorizationPolicies` as serde reads and writes
//! them: Istio's specs, with each object's name and namespace beside them. Every field is optional
//! so that validation (`policies.rs`) can name what is wrong.

use serde::{Deserialize, Serialize};

use crate::state::Labels;

/// Which pods a policy applies to, by label; none means the whole namespace.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSelector {
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub match_labels: Labels,
}

impl RawSelector {
    /// No labels: the policy applies to its whole namespace.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty()
    }
}

/// Istio's PeerAuthentication: whether pods accept plaintext.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPeerAuthentication {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "RawSelector::is_empty")]
    pub selector: RawSelector,
    /// The node file's short form of `mtls.mode`.
    pub mode: Option<String>,
    /// Istio's form.
    pub mtls: Option<RawMtls>,
    /// Istio's `portLevelMtls`: port (a number, or its string from the API server) → `mtls`.
    pub port_level_mtls: Option<serde_yaml_ng::Mapping>,
    /// Where the object came from when not the node file's own list (a YAML document, an API
    /// object), for messages.
    #[serde(skip)]
    pub position: Option<String>,
    /// Why the object as written could not be read: it then fails closed.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

/// Istio's `mtls` setting.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMtls {
    /// `STRICT` or `PERMISSIVE`.
    pub mode: Option<String>,
}

/// Istio's AuthorizationPolicy: `ALLOW`, `DENY` or `AUDIT` rules for the selected pods.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAuthorizationPolicy {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "RawSelector::is_empty")]
    pub selector: RawSelector,
    /// Istio's `targetRefs` (and the older single `targetRef`), in place of the selector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<RawTargetRef>,
    pub target_ref: Option<RawTargetRef>,
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RawRule>,
    /// Where the object came from when not the node file's own list (a YAML document, an API
    /// object), for messages.
    #[serde(skip)]
    pub position: Option<String>,
    /// Why the object as written could not be read: it then fails closed.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

/// What a policy attaches to: a Service (group `""`) in the policy's namespace.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTargetRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

/// One rule: it matches when one `from`, one `to` and every `when` match.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RawFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RawTo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<RawCondition>,
}

/// `key: request.headers[<name>]`, `values: [...]`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCondition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// Who a rule matches.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFrom {
    pub source: RawSource,
}

/// Callers by SPIFFE principal, namespace or source address.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

/// What a rule matches.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTo {
    pub operation: RawOperation,
}

/// Ports, methods, paths and hosts.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawOperation {
    /// Istio writes ports as strings; numbers are accepted too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<serde_yaml_ng::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}
