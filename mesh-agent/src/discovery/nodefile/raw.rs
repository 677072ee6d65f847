//! The node file as serde reads and writes it: every field optional, so that validation can name
//! the object and the field that is wrong instead of failing the whole file. Every type is public
//! and serializes back to the YAML it was read from, so a harness, a bench or a tool builds node
//! files from this model rather than from text.

use std::{path::PathBuf, sync::Arc};

use serde::{Deserialize, Serialize};

pub mod policy;
pub mod route;

use crate::state::Labels;
pub use policy::{RawAuthorizationPolicy, RawPeerAuthentication};
pub use route::{RawDestinationRule, RawHttpRoute};

/// Whether a shared label map is empty (for `skip_serializing_if`).
fn no_labels(l: &Arc<Labels>) -> bool {
    l.is_empty()
}

/// A whole node file.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawFile {
    /// This node's name. A `Value`, so a number or a list is reported rather than turned into a
    /// name.
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_authentications: Vec<RawPeerAuthentication>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<RawAuthorizationPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_routes: Vec<RawHttpRoute>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_rules: Vec<RawDestinationRule>,
    #[serde(default, skip_serializing_if = "RawMeshConfig::is_empty")]
    pub mesh_config: RawMeshConfig,
}

/// Mesh-wide settings, in the shape of Istio's `meshConfig` where Istio has one.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawMeshConfig {
    pub path_normalization: Option<RawPathNormalization>,
    /// DENY rules match paths regardless of letter case (default true).
    pub case_insensitive_deny: Option<bool>,
    /// Istio's root namespace (default `istio-system`): its PeerAuthentications without
    /// selector apply mesh-wide.
    pub root_namespace: Option<String>,
}

impl RawMeshConfig {
    /// Nothing set: every default holds.
    pub fn is_empty(&self) -> bool {
        self.path_normalization.is_none()
            && self.case_insensitive_deny.is_none()
            && self.root_namespace.is_none()
    }
}

/// `meshConfig.pathNormalization`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPathNormalization {
    pub normalization: crate::state::PathNormalization,
}

/// A pod on another node: what this node needs to reach it over HBONE.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawWorkload {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub ip: Option<String>,
    /// The address of the other family, when it is dual-stack.
    pub secondary_ip: Option<String>,
    pub node: Option<String>,
    /// Its labels, so this node can tell which policies select it (for `explain`) and metrics
    /// can name it. Shared: at scale, replicas' labels are one map.
    #[serde(default, skip_serializing_if = "no_labels")]
    pub labels: Arc<Labels>,
    /// What owns it (its Deployment, StatefulSet...), which metrics name; default its name.
    pub workload_name: Option<String>,
}

/// A pod on this node: what capture needs (its netns and cgroup) and its identity.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPod {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub ip: Option<String>,
    /// The address of the other family, when it is dual-stack.
    pub secondary_ip: Option<String>,
    pub netns: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// What owns it (its Deployment, StatefulSet...), which metrics name; default its name.
    pub workload_name: Option<String>,
}

/// A service: its virtual IP, ports and endpoints.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawService {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub ip: Option<String>,
    /// The address of the other family, when it is dual-stack.
    pub secondary_ip: Option<String>,
    pub ports: Option<Vec<RawServicePort>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// HTTP/1.1 upgrade tokens forwarded to the service (default `[websocket]`).
    pub allowed_upgrades: Option<Vec<String>>,
}

/// One service port and the pod port it maps to.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawServicePort {
    pub port: u16,
    pub target_port: Option<u16>,
    /// Kubernetes' free-form `appProtocol`; `tcp` turns protocol detection off.
    pub app_protocol: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section and most fields, written as a user would: reading then writing it must give
    /// the same document back, so nothing a writer sets is dropped or renamed.
    const FULL: &str = r#"
node: node-a
pods:
  - {name: a, namespace: default, serviceAccount: sa-a, ip: 10.0.0.1, netns: /run/netns/a, cgroup: /sys/fs/cgroup/a, labels: {app: a}}
services:
  - name: web
    namespace: default
    ip: 10.96.0.1
    ports: [{port: 80, targetPort: 8080, appProtocol: http}]
    endpoints: [10.0.0.1]
    allowedUpgrades: [websocket]
excludedPorts: [22]
workloads:
  - {name: b, namespace: default, serviceAccount: sa-b, ip: 10.0.1.1, node: node-b, labels: {app: b}}
peerAuthentications:
  - {name: strict, namespace: default, selector: {matchLabels: {app: a}}, mode: STRICT}
authorizationPolicies:
  - name: allow-b
    namespace: default
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/sa-b], namespaces: [default]}}]
        to: [{operation: {ports: ["8080"], methods: [GET], paths: [/api/*]}}]
        when: [{key: "request.headers[x-team]", values: [blue]}]
httpRoutes:
  - name: web
    namespace: default
    parentRefs: [{group: "", kind: Service, name: web, port: 80}]
    rules:
      - matches:
          - path: {type: PathPrefix, value: /api}
            headers: [{type: Exact, name: x-canary, value: "1"}]
            queryParams: [{name: v, value: "2"}]
            method: GET
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [{name: x-b, value: "2"}], remove: [x-c]}
        backendRefs: [{kind: Service, name: web, port: 80, weight: 90}]
        timeouts: {request: 5s, backendRequest: 1s}
        retry: {attempts: 3, codes: [503], on: [reset], backoff: 25ms}
        fault: {delay: {fixedDelay: 1s, percentage: 10.0}, abort: {httpStatus: 503, percentage: 5.0}}
destinationRules:
  - name: web
    namespace: default
    host: web
    trafficPolicy:
      loadBalancer: {simple: PEAK_EWMA}
      connectionPool: {tcp: {maxConnections: 10}, http: {http1MaxPendingRequests: 5, http2MaxRequests: 20}}
      outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}
      localRateLimit: {requestsPerSecond: 100, burst: 10, perSource: true}
      retryBudget: {percent: 20, minRetriesPerSecond: 10}
meshConfig:
  pathNormalization: {normalization: MERGE_SLASHES}
  caseInsensitiveDeny: false
  rootNamespace: mesh-root
"#;

    #[test]
    fn a_node_file_reads_and_writes_back_unchanged() {
        let raw: RawFile = serde_yaml_ng::from_str(FULL).expect("the example parses");
        let written = serde_yaml_ng::to_value(&raw).expect("it serializes");
        let original: serde_yaml_ng::Value = serde_yaml_ng::from_str(FULL).expect("it is YAML");
        assert_eq!(written, original);
    }

    #[test]
    fn unset_fields_are_left_out_when_written() {
        let text = serde_yaml_ng::to_string(&RawFile::default()).expect("it serializes");
        assert_eq!(text.trim(), "{}");
    }
}
