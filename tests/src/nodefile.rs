//! The node files the harness writes for each agent.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::*;

impl Cluster {
    /// The YAML listing of one pod, as the node file has it.
    pub fn pod_entry(&self, pod: &Pod) -> String {
        format!(
            "  - name: {}\n    namespace: default\n    serviceAccount: {}\n    labels: {{app: {}}}\n    ip: {}\n    netns: {}\n    cgroup: {}\n",
            pod.name,
            pod.service_account,
            pod.name,
            pod.ip,
            pod.netns.display(),
            pod.cgroup.display()
        )
    }

    /// The node file for node `i` as the harness writes it: its enrolled pods, the enrolled pods
    /// of other nodes as workloads, and all services.
    pub fn node_file_text(&self, i: usize) -> String {
        let mut s = format!("node: {}\npods:\n", self.nodes[i].name);
        for p in self.pods.iter().filter(|p| p.node == i && p.enrolled) {
            s.push_str(&self.pod_entry(p));
        }
        s.push_str("workloads:\n");
        for p in self.pods.iter().filter(|p| p.node != i && p.enrolled) {
            s.push_str(&format!(
                "  - {{name: {}, namespace: default, serviceAccount: {}, labels: {{app: {}}}, ip: {}, node: {}}}\n",
                p.name, p.service_account, p.name, p.ip, self.nodes[p.node].name
            ));
        }
        s.push_str("services:\n");
        for svc in &self.services {
            let eps: Vec<String> = svc
                .endpoints
                .iter()
                .map(|e| self.pod(e).ip.to_string())
                .collect();
            s.push_str(&format!(
                "  - name: {}\n    namespace: default\n    ip: {}\n    ports: [{{port: {}, targetPort: {}{}}}]\n    endpoints: [{}]\n{}",
                svc.name,
                self.service_ip(&svc.name),
                svc.port,
                svc.target_port,
                svc.app_protocol
                    .as_ref()
                    .map(|p| format!(", appProtocol: {p}"))
                    .unwrap_or_default(),
                eps.join(", "),
                svc.allowed_upgrades
                    .as_ref()
                    .map(|u| format!("    allowedUpgrades: [{}]\n", u.join(", ")))
                    .unwrap_or_default(),
            ));
        }
        s
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
