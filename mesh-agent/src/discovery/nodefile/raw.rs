//! The node file as serde reads it: every field optional, so that validation can name the object
//! and the field that is wrong instead of failing the whole file. The parts a test harness or a
//! tool writes (the node, its pods, the other nodes' workloads, the services) are public and
//! serialize back to the same YAML.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::routes::{RawDestinationRule, RawHttpRoute};
use crate::state::Labels;

/// A whole node file. Policies, routes and mesh settings are read only: a writer appends them
/// as YAML.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawFile {
    /// This node's name. A `Value`, so a number or a list is reported rather than turned into a
    /// name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<serde_yaml_ng::Value>,
    /// This node's pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<RawPod>,
    /// The mesh's services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<RawService>,
    /// Ports never captured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_ports: Vec<u16>,
    /// The other nodes' pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<RawWorkload>,
    #[serde(default, skip_serializing)]
    pub(super) peer_authentications: Vec<RawPeerAuthentication>,
    #[serde(default, skip_serializing)]
    pub(super) authorization_policies: Vec<RawAuthorizationPolicy>,
    #[serde(default, skip_serializing)]
    pub(super) http_routes: Vec<RawHttpRoute>,
    #[serde(default, skip_serializing)]
    pub(super) destination_rules: Vec<RawDestinationRule>,
    #[serde(default, skip_serializing)]
    pub(super) mesh_config: RawMeshConfig,
}

/// Mesh-wide settings, in the shape of Istio's `meshConfig` where Istio has one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawMeshConfig {
    pub(super) path_normalization: Option<RawPathNormalization>,
    /// DENY rules match paths regardless of letter case (default true).
    pub(super) case_insensitive_deny: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPathNormalization {
    pub(super) normalization: crate::state::PathNormalization,
}

/// A pod on another node: what this node needs to reach it over HBONE.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawWorkload {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its labels, so this node can tell which policies select it (for `explain`).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawSelector {
    #[serde(default)]
    pub(super) match_labels: Labels,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPeerAuthentication {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    #[serde(default)]
    pub(super) selector: RawSelector,
    pub(super) mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawAuthorizationPolicy {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    #[serde(default)]
    pub(super) selector: RawSelector,
    pub(super) action: Option<String>,
    #[serde(default)]
    pub(super) rules: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(default)]
    pub(super) from: Vec<RawFrom>,
    #[serde(default)]
    pub(super) to: Vec<RawTo>,
    #[serde(default)]
    pub(super) when: Vec<RawCondition>,
}

/// `key: request.headers[<name>]`, `values: [...]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCondition {
    pub(super) key: String,
    #[serde(default)]
    pub(super) values: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFrom {
    pub(super) source: RawSource,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    #[serde(default)]
    pub(super) principals: Vec<String>,
    #[serde(default)]
    pub(super) namespaces: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTo {
    pub(super) operation: RawOperation,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOperation {
    /// Istio writes ports as strings; numbers are accepted too.
    #[serde(default)]
    pub(super) ports: Vec<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(super) methods: Vec<String>,
    #[serde(default)]
    pub(super) paths: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPod {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawService {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<RawServicePort>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// HTTP/1.1 upgrade tokens forwarded to the service (default `[websocket]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_upgrades: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawServicePort {
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// Kubernetes' free-form `appProtocol`; `tcp` turns protocol detection off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}
