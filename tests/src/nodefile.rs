//! The node files the harness writes for each agent.

use std::time::Duration;

use anyhow::{Context, Result};

use mesh_agent::discovery::nodefile::raw::{
    RawDestinationRule, RawFile, RawHttpRoute, RawPod, RawService, RawServicePort, RawWorkload,
    route::{RawBackendRef, RawParentRef, RawRouteRule, RawTrafficPolicy},
};

use crate::*;

/// The `app` label the harness gives every pod and workload: its name.
fn app_label(name: &str) -> std::collections::BTreeMap<String, String> {
    [("app".to_string(), name.to_string())].into()
}

/// An HTTPRoute in `default` attached to service `parent` on port 80.
pub fn route(name: &str, parent: &str, rules: Vec<RawRouteRule>) -> RawHttpRoute {
    RawHttpRoute {
        name: Some(name.into()),
        namespace: Some("default".into()),
        parent_refs: vec![RawParentRef {
            kind: Some("Service".into()),
            name: Some(parent.into()),
            port: Some(80),
            ..Default::default()
        }],
        rules,
        ..Default::default()
    }
}

/// Route rules written as users write them in an HTTPRoute's `rules`, read into the agent's
/// model: a typo fails here, in the test, instead of as a problem the agent reports.
pub fn rules(yaml: &str) -> Vec<RawRouteRule> {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("bad route rules in a test: {e}"))
}

/// A Service backend on port 80.
pub fn backend(name: &str) -> RawBackendRef {
    RawBackendRef {
        name: Some(name.into()),
        port: Some(80),
        ..Default::default()
    }
}

/// A DestinationRule in `default` for service `host`.
pub fn destination_rule(name: &str, host: &str, policy: RawTrafficPolicy) -> RawDestinationRule {
    RawDestinationRule {
        name: Some(name.into()),
        namespace: Some("default".into()),
        host: Some(host.into()),
        traffic_policy: policy,
        ..Default::default()
    }
}

/// A traffic policy written as users write a DestinationRule's `trafficPolicy`.
pub fn traffic_policy(yaml: &str) -> RawTrafficPolicy {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("bad traffic policy in a test: {e}"))
}

impl Cluster {
    /// One pod as the node file lists it.
    pub fn pod_entry(&self, pod: &Pod) -> RawPod {
        RawPod {
            name: Some(pod.name.clone()),
            namespace: Some("default".into()),
            service_account: Some(pod.service_account.clone()),
            ip: Some(pod.ip.to_string()),
            secondary_ip: pod.ip6.map(|a| a.to_string()),
            netns: Some(pod.netns.clone()),
            cgroup: Some(pod.cgroup.clone()),
            labels: app_label(&pod.name),
            workload_name: None,
        }
    }

    /// The node file for node `i` as the harness writes it: its enrolled pods, the enrolled pods
    /// of other nodes as workloads, and all services, in the agent's own node-file model.
    pub fn node_file(&self, i: usize) -> RawFile {
        let pods = self
            .pods
            .iter()
            .filter(|p| p.node == i && p.enrolled)
            .map(|p| self.pod_entry(p))
            .collect();
        let workloads = self
            .pods
            .iter()
            .filter(|p| p.node != i && p.enrolled)
            .map(|p| RawWorkload {
                name: Some(p.name.clone()),
                namespace: Some("default".into()),
                service_account: Some(p.service_account.clone()),
                ip: Some(p.ip.to_string()),
                secondary_ip: p.ip6.map(|a| a.to_string()),
                node: Some(self.nodes[p.node].name.clone()),
                labels: app_label(&p.name).into(),
                workload_name: None,
            })
            .collect();
        let services = self
            .services
            .iter()
            .map(|svc| RawService {
                name: Some(svc.name.clone()),
                namespace: Some("default".into()),
                ip: Some(self.service_ip(&svc.name).to_string()),
                secondary_ip: Some(self.service_ip6(&svc.name).to_string()),
                ports: Some(vec![RawServicePort {
                    port: svc.port,
                    target_port: Some(svc.target_port),
                    app_protocol: svc.app_protocol.clone(),
                }]),
                // As Kubernetes lists a dual-stack service's endpoints: each family's
                // addresses (an EndpointSlice per family).
                endpoints: svc
                    .endpoints
                    .iter()
                    .map(|e| self.pod(e).ip.to_string())
                    .chain(
                        svc.endpoints
                            .iter()
                            .filter_map(|e| self.pod(e).ip6.map(|a| a.to_string())),
                    )
                    .collect(),
                allowed_upgrades: svc.allowed_upgrades.clone(),
            })
            .collect();
        RawFile {
            node: Some(self.nodes[i].name.clone().into()),
            pods,
            workloads,
            services,
            ..Default::default()
        }
    }

    /// [`Cluster::node_file`] as YAML, to which tests append policies and routes.
    pub fn node_file_text(&self, i: usize) -> String {
        serde_yaml_ng::to_string(&self.node_file(i)).expect("a node file serializes")
    }

    /// Writes node `i`'s default node file.
    pub fn write_node_file(&self, i: usize) -> Result<()> {
        self.set_node_file(i, &self.node_file_text(i))
    }

    /// Replaces node `i`'s node file atomically (write then rename, as ConfigMaps do).
    pub fn set_node_file(&self, i: usize, text: &str) -> Result<()> {
        let path = &self.nodes[i].node_file;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Replaces node `i`'s node file with the default changed by `edit`, and waits until the
    /// agent's `/stats` list `field` holds exactly `expect`. Only names are compared: to wait for
    /// a new version of an object, give it a new name.
    pub fn apply(
        &self,
        i: usize,
        edit: impl FnOnce(&mut RawFile),
        field: &str,
        expect: &[&str],
    ) -> Result<()> {
        let mut file = self.node_file(i);
        edit(&mut file);
        let text = serde_yaml_ng::to_string(&file).context("the node file serializes")?;
        self.set_node_file(i, &text)?;
        self.wait_applied(i, field, expect)
    }

    /// [`Cluster::apply`] with `extra` appended to the default file as text: for tests that state
    /// policies and routes as users write them, and for objects the model cannot hold because they
    /// are wrong on purpose.
    pub fn apply_yaml(&self, i: usize, extra: &str, field: &str, expect: &[&str]) -> Result<()> {
        self.set_node_file(i, &format!("{}{extra}", self.node_file_text(i)))?;
        self.wait_applied(i, field, expect)
    }

    /// Waits until the agent's `/stats` list `field` holds exactly `expect`.
    fn wait_applied(&self, i: usize, field: &str, expect: &[&str]) -> Result<()> {
        wait_until(
            "the agent to apply the node file",
            Duration::from_secs(5),
            || {
                let s = self.stats(i)?;
                let have: Vec<String> = s[field]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(
                    expect.iter().all(|e| have.iter().any(|h| h == e))
                        && have.len() == expect.len(),
                )
            },
        )
        .with_context(|| {
            format!(
                "problems: {}",
                self.stats(i)
                    .map(|s| s["problems"].to_string())
                    .unwrap_or_default()
            )
        })
    }
}
