//! Operator commands that ask a running agent through its admin endpoint: `status`, `flows`,
//! `explain` and `config-dump`. Tables for people by default; `-o json` for scripts.
//!
//! They speak plain HTTP/1.0 to the loopback admin address, so they need no runtime and work
//! from `kubectl exec` into the agent's pod.

use std::{io::Write, net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::{
    explain::Explanation,
    telemetry::flows::{FlowRecord, Verdict},
};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The agent did not answer.
    #[error(
        "cannot reach the agent's admin endpoint at {addr}: {source} (is mesh-agent running on this node? pass --admin-addr if it listens elsewhere)"
    )]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("the agent refused {path}: {status} {body}")]
    Refused {
        /// What was asked.
        path: String,
        /// Its status.
        status: u16,
        /// What it said.
        body: String,
    },
    /// The answer was not what this command understands.
    #[error(
        "unexpected answer to {path}: {problem} (is the agent the same version as this command?)"
    )]
    Answer {
        /// What was asked.
        path: String,
        /// What was wrong.
        problem: String,
    },
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// JSON (one object per line for `flows`).
    Json,
}

/// Where the agent is, and how to print.
#[derive(Debug, Args)]
pub struct Common {
    /// The agent's admin address.
    #[arg(long, env = crate::config::ENV_ADMIN_ADDR, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `flows` flags.
#[derive(Debug, Args)]
pub struct FlowsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Print the recent flows and exit instead of following new ones.
    #[arg(long)]
    pub once: bool,
    /// Only flows with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictFilter>,
}

/// A verdict to filter on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum VerdictFilter {
    /// Allowed.
    Allow,
    /// Denied by policy.
    Deny,
    /// Failed otherwise.
    Error,
}

/// `explain` arguments.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub common: Common,
    /// The source pod, `namespace/name` or `name` (namespace `default`).
    pub src: String,
    /// The destination, `ip:port` (a service address or a pod address).
    pub dst: String,
    /// Explain an HTTP request with this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Explain an HTTP request for this path.
    #[arg(long)]
    pub path: Option<String>,
    /// A request header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
}

/// Encodes a query component (`application/x-www-form-urlencoded`, as the admin endpoint
/// decodes it).
fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// GETs `path` from the agent and returns the body of a 200.
fn get(addr: SocketAddr, path: &str) -> Result<String, CliError> {
    use http_body_util::{BodyExt, Empty};
    let unreachable = |source| CliError::Connect { addr, source };
    let bad = |problem: String| CliError::Answer {
        path: path.into(),
        problem,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(unreachable)?;
    rt.block_on(async {
        let tcp =
            tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
                .map_err(unreachable)?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| bad(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| bad(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
            .await
            .map_err(|_| bad("no answer within 30 s".into()))?
            .map_err(|e| bad(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| bad(e.to_string()))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status != 200 {
            return Err(CliError::Refused {
                path: path.into(),
                status,
                body: body.trim().into(),
            });
        }
        Ok(body)
    })
}

fn get_json<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T, CliError> {
    let body = get(addr, path)?;
    serde_json::from_str(&body).map_err(|e| CliError::Answer {
        path: path.into(),
        problem: e.to_string(),
    })
}

/// Aligned columns under a header row.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or("-")
}

fn unix_to_rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

fn human_secs(s: i64) -> String {
    let a = s.unsigned_abs();
    let d = if a >= 3600 {
        format!("{}h{}m", a / 3600, a % 3600 / 60)
    } else if a >= 60 {
        format!("{}m{}s", a / 60, a % 60)
    } else {
        format!("{a}s")
    };
    if s < 0 { format!("expired {d} ago") } else { d }
}

/// `mesh-agent version`: this CLI's version and, when an agent answers, the agent's; versions
/// that differ are said plainly, since a CLI reads the agent's endpoints as its own version
/// knows them. No agent is not an error: the CLI's version is still the answer.
pub fn version(c: &Common) -> Result<(), CliError> {
    let cli = crate::telemetry::metrics::VERSION;
    let agent =
        get_json::<Value>(c.admin_addr, "/version").map(|v| str_at(&v, &["version"]).to_string());
    match c.output {
        Output::Json => {
            let agent = agent.as_ref().ok();
            println!("{}", serde_json::json!({"cli": cli, "agent": agent}));
        }
        Output::Table => {
            println!("mesh-agent CLI: {cli}");
            match &agent {
                Ok(v) if v == cli => println!("agent at {}: {v}", c.admin_addr),
                Ok(v) => println!(
                    "agent at {}: {v} (differs from the CLI's {cli}: use the CLI of the agent's version)",
                    c.admin_addr
                ),
                Err(e) => println!("agent: not reachable ({e})"),
            }
        }
    }
    Ok(())
}

/// `mesh-agent status`: the node's enrolled pods with their certificates.
pub fn status(c: &Common) -> Result<(), CliError> {
    let stats: Value = get_json(c.admin_addr, "/stats")?;
    let certs = &stats["certificates"];
    let pods = stats["pods"].as_object().cloned().unwrap_or_default();
    let rows: Vec<(String, Value)> = pods
        .into_iter()
        .map(|(name, p)| {
            let id = str_at(&p, &["identity"]).to_string();
            let cert = certs[&id].clone();
            (name, serde_json::json!({ "pod": p, "certificate": cert }))
        })
        .collect();
    if c.output == Output::Json {
        let out = serde_json::json!({
            "node": stats["node"],
            "pods": rows.iter().map(|(n, v)| {
                let mut v = v.clone();
                v["name"] = Value::from(n.clone());
                v
            }).collect::<Vec<_>>(),
            "problems": stats["problems"],
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    println!("node {}", str_at(&stats, &["node"]));
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(name, v)| {
            let cert = &v["certificate"];
            vec![
                name.clone(),
                v["pod"]["ip"].as_str().unwrap_or("-").into(),
                str_at(v, &["pod", "identity"]).into(),
                str_at(v, &["pod", "mtls_mode"]).into(),
                cert["serial"]
                    .as_str()
                    .map_or_else(|| "none".into(), |s| s.chars().take(16).collect()),
                cert["not_after_unix"]
                    .as_i64()
                    .map_or_else(|| "-".into(), unix_to_rfc3339),
                cert["expires_in_secs"]
                    .as_i64()
                    .map_or_else(|| "-".into(), human_secs),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "POD",
                "IP",
                "IDENTITY",
                "MTLS",
                "CERT SERIAL",
                "EXPIRES",
                "IN"
            ],
            &table_rows
        )
    );
    if let Some(problems) = stats["problems"].as_array()
        && !problems.is_empty()
    {
        println!("problems:");
        for p in problems {
            println!("  {}", p.as_str().unwrap_or_default());
        }
    }
    Ok(())
}

fn flow_row(f: &FlowRecord) -> Vec<String> {
    let side = |s: &crate::telemetry::flows::Side| {
        if &*s.pod == crate::telemetry::metrics::UNKNOWN || s.pod.is_empty() {
            s.addr.map_or_else(|| "unknown".into(), |a| a.to_string())
        } else {
            format!("{}/{}", s.namespace, s.pod)
        }
    };
    let what = match &f.http {
        Some(h) => format!("{} {} {}", h.method, h.path, h.code),
        None => format!(
            "tcp {}",
            f.dst
                .addr
                .map_or_else(|| "-".into(), |a| a.port().to_string())
        ),
    };
    vec![
        f.start.clock(),
        f.reporter.chars().take(3).collect(),
        side(&f.src),
        side(&f.dst),
        what,
        match f.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "DENY",
            Verdict::Error => "error",
        }
        .into(),
        f.flags.to_string(),
        if f.policies.is_empty() {
            "-".into()
        } else {
            f.policies.join(",")
        },
        format!("{}/{}", f.bytes_received, f.bytes_sent),
        format!("{:.1}", f.duration_ms),
    ]
}

const FLOW_HEADER: [&str; 10] = [
    "TIME", "BY", "SRC", "DST", "WHAT", "VERDICT", "FLAGS", "POLICY", "IN/OUT", "MS",
];

/// `mesh-agent flows`: recent flows, then new ones as they happen (unless `--once`).
pub fn flows(a: &FlowsArgs) -> Result<(), CliError> {
    let keep = |f: &FlowRecord| match a.verdict {
        None => true,
        Some(VerdictFilter::Allow) => f.verdict == Verdict::Allow,
        Some(VerdictFilter::Deny) => f.verdict == Verdict::Deny,
        Some(VerdictFilter::Error) => f.verdict == Verdict::Error,
    };
    let mut since = 0u64;
    let mut first = true;
    loop {
        let batch: Vec<FlowRecord> =
            get_json(a.common.admin_addr, &format!("/debug/flows?since={since}"))?;
        if let Some(last) = batch.last() {
            since = last.seq;
        }
        let shown: Vec<&FlowRecord> = batch.iter().filter(|f| keep(f)).collect();
        match a.common.output {
            Output::Json => {
                for f in &shown {
                    println!("{}", serde_json::to_string(f).unwrap_or_default());
                }
            }
            Output::Table => {
                let rows: Vec<Vec<String>> = shown.iter().map(|f| flow_row(f)).collect();
                let t = table(&FLOW_HEADER, &rows);
                // The header once; later batches print their rows only.
                let body = if first {
                    t.as_str()
                } else {
                    t.split_once('\n').map_or("", |(_, rest)| rest)
                };
                print!("{body}");
            }
        }
        let _ = std::io::stdout().flush();
        first = false;
        if a.once {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `mesh-agent explain`: which route, policy and endpoint would apply, and why.
pub fn explain(a: &ExplainArgs) -> Result<(), CliError> {
    let mut q = format!("/explain?src={}&dst={}", encode(&a.src), encode(&a.dst));
    if let Some(m) = &a.method {
        q.push_str(&format!("&method={}", encode(m)));
    }
    if let Some(p) = &a.path {
        q.push_str(&format!("&path={}", encode(p)));
    }
    for h in &a.headers {
        q.push_str(&format!("&header={}", encode(h)));
    }
    if a.common.output == Output::Json {
        print!("{}", get(a.common.admin_addr, &q)?);
        return Ok(());
    }
    let e: Explanation = get_json(a.common.admin_addr, &q)?;
    let rows = vec![
        vec!["source".into(), format!("{} on {}", e.src, e.src_node)],
        vec!["identity".into(), e.src_identity.clone()],
        vec!["destination".into(), e.dst.to_string()],
        vec![
            "captured".into(),
            format!(
                "{} ({})",
                if e.captured { "yes" } else { "no" },
                e.capture_reason
            ),
        ],
        vec![
            "service".into(),
            e.service.clone().unwrap_or_else(|| "-".into()),
        ],
        vec!["mode".into(), e.mode.clone()],
        vec![
            "route".into(),
            e.route.clone().unwrap_or_else(|| "-".into()),
        ],
        vec![
            "backends".into(),
            if e.backends.is_empty() {
                "-".into()
            } else {
                e.backends
                    .iter()
                    .map(|(s, w)| format!("{s} (weight {w})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ],
        vec!["verdict".into(), e.verdict.to_uppercase()],
    ];
    print!(
        "{}",
        table(&["", ""], &rows).split_once('\n').map_or("", |x| x.1)
    );
    println!();
    let eps: Vec<Vec<String>> = e
        .endpoints
        .iter()
        .map(|p| {
            vec![
                p.addr.to_string(),
                p.workload.clone().unwrap_or_else(|| "-".into()),
                p.hop.clone(),
                if p.ejected { "yes" } else { "no" }.into(),
                p.decision.to_uppercase(),
                if p.policies.is_empty() {
                    "-".into()
                } else {
                    p.policies.join(",")
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "ENDPOINT", "WORKLOAD", "HOP", "EJECTED", "DECISION", "POLICY"
            ],
            &eps
        )
    );
    println!("\nwhy:");
    for (i, s) in e.steps.iter().enumerate() {
        println!("  {}. {s}", i + 1);
    }
    Ok(())
}

/// `mesh-agent config-dump`: what the agent works from.
pub fn config_dump(c: &Common) -> Result<(), CliError> {
    let body = get(c.admin_addr, "/config_dump")?;
    if c.output == Output::Json {
        print!("{body}");
        return Ok(());
    }
    let d: Value = serde_json::from_str(&body).map_err(|e| CliError::Answer {
        path: "/config_dump".into(),
        problem: e.to_string(),
    })?;
    let state = &d["state"];
    let keys = |v: &Value| -> Vec<String> {
        match v {
            Value::Object(m) => m.keys().cloned().collect(),
            Value::Array(a) => a
                .iter()
                .map(|x| x["key"].as_str().unwrap_or("-").to_string())
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut rows = Vec::new();
    let mut add = |kind: &str, names: Vec<String>| {
        rows.push(vec![
            kind.to_string(),
            names.len().to_string(),
            names.join(", "),
        ]);
    };
    add("pods", keys(&state["pods"]));
    add(
        "workloads",
        state["workloads"]
            .as_object()
            .map(|m| {
                m.values()
                    .map(|w| format!("{} ({})", str_at(w, &["key"]), str_at(w, &["node"])))
                    .collect()
            })
            .unwrap_or_default(),
    );
    add("services", keys(&state["services"]));
    add("http routes", keys(&state["http_routes"]));
    add(
        "authorization policies",
        keys(&state["authorization_policies"]),
    );
    add("peer authentications", keys(&state["peer_authentications"]));
    add(
        "destination rules",
        state["traffic_policies"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|p| p["rule"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    );
    add("certificates", keys(&d["certificates"]));
    println!("node {}", str_at(&d, &["node"]));
    print!("{}", table(&["KIND", "COUNT", "NAMES"], &rows));
    let maps: Vec<Vec<String>> = d["bpf"]["maps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    vec![
                        str_at(m, &["name"]).into(),
                        m["entries"].to_string(),
                        m["capacity"].to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    println!();
    print!("{}", table(&["BPF MAP", "ENTRIES", "CAPACITY"], &maps));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     22\n");
    }

    #[test]
    fn query_components_are_encoded() {
        assert_eq!(encode("default/client"), "default%2Fclient");
        assert_eq!(encode("x-user: a b"), "x-user%3A+a+b");
    }

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human_secs(86_399), "23h59m");
        assert_eq!(human_secs(-75), "expired 1m15s ago");
    }
}
