//! The node files the harness writes for each agent.

use std::time::Duration;

use anyhow::{Context, Result};

use mesh_agent::discovery::nodefile::raw::{
    RawFile, RawPod, RawService, RawServicePort, RawWorkload,
};

use crate::*;

/// The `app` label the harness gives every pod and workload: its name.
fn app_label(name: &str) -> std::collections::BTreeMap<String, String> {
    [("app".to_string(), name.to_string())].into()
}

impl Cluster {
    /// One pod as the node file lists it.
    pub fn pod_entry(&self, pod: &Pod) -> RawPod {
        RawPod {
            name: Some(pod.name.clone()),
            namespace: Some("default".into()),
            service_account: Some(pod.service_account.clone()),
            ip: Some(pod.ip.to_string()),
            netns: Some(pod.netns.clone()),
            cgroup: Some(pod.cgroup.clone()),
            labels: app_label(&pod.name),
        }
    }

    /// The node file for node `i` as the harness writes it: its enrolled pods, the enrolled pods
    /// of other nodes as workloads, and all services, in the agent's own node-file model.
    pub fn node_file(&self, i: usize) -> RawFile {
        let mut file = RawFile::default();
        file.node = Some(self.nodes[i].name.clone().into());
        file.pods = self
            .pods
            .iter()
            .filter(|p| p.node == i && p.enrolled)
            .map(|p| self.pod_entry(p))
            .collect();
        file.workloads = self
            .pods
            .iter()
            .filter(|p| p.node != i && p.enrolled)
            .map(|p| RawWorkload {
                name: Some(p.name.clone()),
                namespace: Some("default".into()),
                service_account: Some(p.service_account.clone()),
                ip: Some(p.ip.to_string()),
                node: Some(self.nodes[p.node].name.clone()),
                labels: app_label(&p.name),
            })
            .collect();
        file.services = self
            .services
            .iter()
            .map(|svc| RawService {
                name: Some(svc.name.clone()),
                namespace: Some("default".into()),
                ip: Some(self.service_ip(&svc.name).to_string()),
                ports: Some(vec![RawServicePort {
                    port: svc.port,
                    target_port: Some(svc.target_port),
                    app_protocol: svc.app_protocol.clone(),
                }]),
                endpoints: svc
                    .endpoints
                    .iter()
                    .map(|e| self.pod(e).ip.to_string())
                    .collect(),
                allowed_upgrades: svc.allowed_upgrades.clone(),
            })
            .collect();
        file
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

    /// Replaces node `i`'s node file with the default plus `extra`, and waits until the agent's
    /// `/stats` list `field` holds exactly `expect`. Only names are compared: to wait for a new
    /// version of an object, give it a new name.
    pub fn apply(&self, i: usize, extra: &str, field: &str, expect: &[&str]) -> Result<()> {
        self.set_node_file(i, &format!("{}{extra}", self.node_file_text(i)))?;
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
