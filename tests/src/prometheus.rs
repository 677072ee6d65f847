//! Scraped Prometheus text, parsed by the reference parser (Python's `prometheus_client`), so
//! the exposition format itself is checked.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// One sample of a scrape.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    /// Sample name (a histogram's have `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// The parser: reads the exposition on stdin, prints the samples as JSON.
pub(crate) const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"name": s.name, "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;

/// Parses Prometheus text with `prometheus_client` (Debian's Python, where the package is).
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>> {
    use std::io::Write;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run /usr/bin/python3 (install python3-prometheus-client: `cargo xtask setup`)")?;
    child
        .stdin
        .take()
        .context("parser stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the Prometheus parser rejected /metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The sum of `name` over the samples whose labels include all of `labels`.
pub fn metric_sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// The count of one kernel event slot (`mesh_bpf_events_total`) in a scrape.
pub fn bpf_event(samples: &[Sample], hook: &str, outcome: &str, reason: &str) -> f64 {
    metric_sum(
        samples,
        "mesh_bpf_events_total",
        &[("hook", hook), ("outcome", outcome), ("reason", reason)],
    )
}
