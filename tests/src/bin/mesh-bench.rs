//! `cargo xtask bench`: direct pod→pod vs the same through the mesh, cross-node (HBONE: HTTP/2
//! CONNECT over mTLS) and same-node (handed over inside the agent, no TLS),
//! measured in one run on one topology, so the ratios compare like with like.
//!
//! Per path: requests/s (wrk, HTTP/1.1 keep-alive, 1 KB bodies), p50/p99 latency at a fixed
//! 1000 requests/s (mesh-testapp load; measured from each request's scheduled time), and bulk
//! throughput (iperf3). Every figure is the median of several rounds, and the rounds interleave
//! the paths so drift on a noisy machine hits all of them alike.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use mesh_tests::{Cluster, PodSpec, artifact};

const HTTP: u16 = 8080;
const IPERF: u16 = 5201;

#[derive(Clone, Copy, Debug)]
struct Path {
    name: &'static str,
    client: &'static str,
    server: &'static str,
    baseline: Option<usize>,
}

const PATHS: [Path; 4] = [
    Path {
        name: "direct cross-node",
        client: "bare",
        server: "bareserver",
        baseline: None,
    },
    Path {
        name: "mesh cross-node (HBONE, mTLS)",
        client: "client",
        server: "server",
        baseline: Some(0),
    },
    Path {
        name: "direct same-node",
        client: "bare",
        server: "barelocal",
        baseline: None,
    },
    Path {
        name: "mesh same-node (no TLS)",
        client: "client",
        server: "local",
        baseline: Some(2),
    },
];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn wrk(c: &Cluster, p: &Path, ip: Ipv4Addr, secs: u64) -> Result<f64> {
    let out = c.exec(
        p.client,
        &[
            "wrk",
            "-t1",
            "-c16",
            &format!("-d{secs}s"),
            &format!("http://{ip}:{HTTP}/"),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors on {}: {text}", p.name);
    }
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Requests/sec:")
                .map(|v| v.trim().parse::<f64>())
        })
        .with_context(|| format!("no Requests/sec in wrk output for {}: {text}", p.name))?
        .context("parse Requests/sec")
}

fn fixed_rate(c: &Cluster, p: &Path, ip: Ipv4Addr, secs: u64) -> Result<(f64, f64)> {
    let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
    let out = c.exec(
        p.client,
        &[
            &app,
            "load",
            "--addr",
            &format!("{ip}:{HTTP}"),
            "--rate",
            "1000",
            "--seconds",
            &secs.to_string(),
        ],
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "load output for {}: {}",
            p.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if v["errors"].as_u64() != Some(0) {
        bail!("fixed-rate load saw errors on {}: {v}", p.name);
    }
    Ok((
        v["p50_us"].as_f64().unwrap_or(0.0),
        v["p99_us"].as_f64().unwrap_or(0.0),
    ))
}

fn iperf(c: &Cluster, p: &Path, ip: Ipv4Addr, secs: u64) -> Result<f64> {
    let out = c.exec(
        p.client,
        &[
            "iperf3",
            "-c",
            &ip.to_string(),
            "-p",
            &IPERF.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3 failed on {}: {v}", p.name))
}

fn main() -> Result<()> {
    let rounds = env_u64("MESH_BENCH_ROUNDS", 3) as usize;
    let secs = env_u64("MESH_BENCH_SECONDS", 3);
    let mut c = Cluster::new(
        vec![
            vec![
                PodSpec::mesh("client"),
                PodSpec::bare("bare"),
                PodSpec::mesh("local"),
                PodSpec::bare("barelocal"),
            ],
            vec![PodSpec::mesh("server"), PodSpec::bare("bareserver")],
        ],
        vec![],
    )?;
    for s in ["server", "bareserver", "local", "barelocal"] {
        c.serve(s, HTTP)?;
        c.spawn(s, &["iperf3", "-s", "-p", &IPERF.to_string()])?;
        c.wait_listening(s, IPERF)?;
    }
    c.start_agent(0)?;
    c.start_agent(1)?;
    eprintln!(
        "bench: {rounds} rounds x {} paths, {secs}s per measurement",
        PATHS.len()
    );

    let n = PATHS.len();
    let (mut rps, mut p50, mut p99, mut gbps) = (
        vec![vec![]; n],
        vec![vec![]; n],
        vec![vec![]; n],
        vec![vec![]; n],
    );
    for r in 0..rounds {
        for (i, p) in PATHS.iter().enumerate() {
            let ip = c.pod(p.server).ip;
            eprintln!("round {}/{rounds}: {}", r + 1, p.name);
            rps[i].push(wrk(&c, p, ip, secs)?);
            let (a, b) = fixed_rate(&c, p, ip, secs)?;
            p50[i].push(a);
            p99[i].push(b);
            gbps[i].push(iperf(&c, p, ip, secs)?);
        }
    }
    let m: Vec<[f64; 4]> = (0..n)
        .map(|i| {
            [
                median(&mut rps[i]),
                median(&mut p50[i]),
                median(&mut p99[i]),
                median(&mut gbps[i]),
            ]
        })
        .collect();

    println!(
        "\nmedians of {rounds} rounds ({secs}s each); ratios are mesh / direct on the same locality"
    );
    println!(
        "| path | req/s (1 KB, keep-alive) | p50 µs @1000 rps | p99 µs @1000 rps | iperf3 Gbit/s | req/s ratio | p50 ratio | p99 ratio | Gbit/s ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in PATHS.iter().enumerate() {
        let ratios = match p.baseline {
            Some(b) => (0..4)
                .map(|k| format!("{:.2}", m[i][k] / m[b][k].max(f64::MIN_POSITIVE)))
                .collect::<Vec<_>>(),
            None => vec!["1.00".into(); 4],
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {} |",
            p.name,
            m[i][0],
            m[i][1],
            m[i][2],
            m[i][3],
            ratios.join(" | ")
        );
    }
    let captured = c.counter(0, "client", "kernel.captured_v4")?;
    println!("\n(client pod connects captured by the kernel during the bench: {captured})");
    Ok(())
}
