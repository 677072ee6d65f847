//! The node file as serde reads it: every field optional, so that validation can name the object
//! and the field that is wrong instead of failing the whole file.

use std::path::PathBuf;

use serde::Deserialize;

use super::routes::{RawDestinationRule, RawHttpRoute};
use crate::state::Labels;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawFile {
    /// A `Value`, so a number or a list is reported rather than turned into a name.
    pub(super) node: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    pub(super) pods: Vec<RawPod>,
    #[serde(default)]
    pub(super) services: Vec<RawService>,
    #[serde(default)]
    pub(super) excluded_ports: Vec<u16>,
    #[serde(default)]
    pub(super) workloads: Vec<RawWorkload>,
    #[serde(default)]
    pub(super) peer_authentications: Vec<RawPeerAuthentication>,
    #[serde(default)]
    pub(super) authorization_policies: Vec<RawAuthorizationPolicy>,
    #[serde(default)]
    pub(super) http_routes: Vec<RawHttpRoute>,
    #[serde(default)]
    pub(super) destination_rules: Vec<RawDestinationRule>,
    #[serde(default)]
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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawWorkload {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) service_account: Option<String>,
    pub(super) ip: Option<String>,
    pub(super) node: Option<String>,
    /// Its labels, so this node can tell which policies select it (for `explain`).
    #[serde(default)]
    pub(super) labels: Labels,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawPod {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) service_account: Option<String>,
    pub(super) ip: Option<String>,
    pub(super) netns: Option<PathBuf>,
    pub(super) cgroup: Option<PathBuf>,
    #[serde(default)]
    pub(super) labels: Labels,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawService {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) ip: Option<String>,
    pub(super) ports: Option<Vec<RawServicePort>>,
    #[serde(default)]
    pub(super) endpoints: Vec<String>,
    /// HTTP/1.1 upgrade tokens forwarded to the service (default `[websocket]`).
    pub(super) allowed_upgrades: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawServicePort {
    pub(super) port: u16,
    pub(super) target_port: Option<u16>,
    /// Kubernetes' free-form `appProtocol`; `tcp` turns protocol detection off.
    pub(super) app_protocol: Option<String>,
}
