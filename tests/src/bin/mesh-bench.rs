//! `cargo xtask bench`: direct pod→pod vs the same through the mesh: cross-node at L4 (HBONE:
//! HTTP/2 CONNECT over mTLS, a service port declared `appProtocol: tcp`), cross-node at L7 (HTTP
//! parsed and routed by an HTTPRoute, then HBONE), and same-node at L4 (handed over inside the
//! agent, no TLS), measured in one run on one topology, so the ratios compare like with like.
//! A second table compares per-request balancing (P2C peak EWMA vs round robin) over three
//! endpoints of which one adds 50 ms.
//!
//! Per path: requests/s (wrk, HTTP/1.1 keep-alive, 1 KB bodies), p50/p99 latency at a fixed
//! 1000 requests/s (mesh-testapp load; measured from each request's scheduled time), and bulk
//! throughput (iperf3). Every figure is the median of several rounds, and the rounds interleave
//! the paths so drift on a noisy machine hits all of them alike.
//!
//! A last table measures what scraping costs: the L7 path's p99 at 1000 requests/s with and
//! without a scraper fetching both nodes' `/metrics` every 100 ms, interleaved (A B A B).

use std::net::Ipv4Addr;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Cluster, PodSpec, ServiceSpec, artifact, http_get, in_netns};

const HTTP: u16 = 8080;
const IPERF: u16 = 5201;

/// What a path's client connects to.
#[derive(Clone, Copy, Debug)]
enum Dest {
    /// A pod's own address.
    Pod(&'static str),
    /// A service address.
    Service(&'static str),
}

#[derive(Clone, Copy, Debug)]
struct Path {
    name: &'static str,
    client: &'static str,
    http: Dest,
    /// The pod iperf3 runs against (bulk bytes are L4 on every mesh path).
    iperf: Option<&'static str>,
    baseline: Option<usize>,
}

const PATHS: [Path; 5] = [
    Path {
        name: "direct cross-node",
        client: "bare",
        http: Dest::Pod("bareserver"),
        iperf: Some("bareserver"),
        baseline: None,
    },
    Path {
        name: "mesh cross-node L4 (HBONE, mTLS)",
        client: "client",
        http: Dest::Service("l4"),
        iperf: Some("server"),
        baseline: Some(0),
    },
    Path {
        name: "mesh cross-node L7 (HTTP routing, HBONE)",
        client: "client",
        http: Dest::Service("l7"),
        iperf: None,
        baseline: Some(0),
    },
    Path {
        name: "direct same-node",
        client: "bare",
        http: Dest::Pod("barelocal"),
        iperf: Some("barelocal"),
        baseline: None,
    },
    Path {
        name: "mesh same-node L4 (no TLS)",
        client: "client",
        http: Dest::Service("local-l4"),
        iperf: Some("local"),
        baseline: Some(3),
    },
];

/// Node-1's node file additions: the L7 row's route, and the balancing policy of `trio`.
fn config(lb: &str) -> String {
    format!(
        "httpRoutes:\n  - name: l7\n    namespace: default\n    parentRefs: [{{kind: Service, name: l7, port: {HTTP}}}]\n    rules:\n      - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n        backendRefs: [{{name: l7, port: {HTTP}}}]\ndestinationRules:\n  - {{name: {}, namespace: default, host: trio, trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}}}\n",
        rule_name(lb)
    )
}

/// The destination rule's name for `lb`: each version is named apart, so `apply` can tell when
/// the agent has it.
fn rule_name(lb: &str) -> String {
    format!("trio-{}", lb.to_ascii_lowercase().replace('_', "-"))
}

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

/// Requests/s from wrk, and the agents' CPU µs per request over the run (both nodes; 0 on the
/// direct paths, where no agent works).
fn wrk(c: &Cluster, p: &Path, ip: Ipv4Addr, secs: u64) -> Result<(f64, f64)> {
    let cpu = || {
        (0..c.nodes.len())
            .filter_map(|i| c.agent_cpu(i))
            .sum::<std::time::Duration>()
    };
    let before = cpu();
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
    let used = cpu().saturating_sub(before);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .and_then(|v| v.split_whitespace().next())
                    .map(str::parse::<f64>)
            })
            .with_context(|| format!("no {name} in wrk output for {}: {text}", p.name))?
            .with_context(|| format!("parse {name}"))
    };
    let rps = field("Requests/sec:")?;
    let requests = rps * secs as f64;
    let cpu_us = if p.baseline.is_some() {
        used.as_secs_f64() * 1e6 / requests.max(1.0)
    } else {
        0.0
    };
    Ok((rps, cpu_us))
}

fn fixed_rate(
    c: &Cluster,
    p: &Path,
    ip: Ipv4Addr,
    secs: u64,
    (rate, conns): (u64, u64),
) -> Result<(f64, f64)> {
    let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
    let out = c.exec(
        p.client,
        &[
            &app,
            "load",
            "--addr",
            &format!("{ip}:{HTTP}"),
            "--rate",
            &rate.to_string(),
            "--seconds",
            &secs.to_string(),
            "--connections",
            &conns.to_string(),
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

/// Runs `f` while a scraper GETs every node's `/metrics` every 100 ms; returns `f`'s result and
/// the number of scrapes (each one checked to answer 200).
fn while_scraping<R: Send>(c: &Cluster, f: impl FnOnce() -> Result<R> + Send) -> Result<(R, u64)> {
    let stop = AtomicBool::new(false);
    let scrapes = AtomicU64::new(0);
    let metrics: SocketAddr = ([127, 0, 0, 1], 15020).into();
    let out = std::thread::scope(|s| {
        let scrapers: Vec<_> = c
            .nodes
            .iter()
            .map(|n| {
                let (stop, scrapes) = (&stop, &scrapes);
                s.spawn(move || {
                    in_netns(&n.netns, || -> Result<()> {
                        while !stop.load(Ordering::Relaxed) {
                            let t = Instant::now();
                            let (code, body) = http_get(metrics, "/metrics")?;
                            if code != 200 || !body.contains("mesh_bpf_events_total") {
                                bail!("scrape of {} answered {code}", n.name);
                            }
                            scrapes.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(
                                Duration::from_millis(100).saturating_sub(t.elapsed()),
                            );
                        }
                        Ok(())
                    })?
                })
            })
            .collect();
        let r = f();
        stop.store(true, Ordering::Relaxed);
        for t in scrapers {
            t.join()
                .map_err(|_| anyhow::anyhow!("scraper panicked"))??;
        }
        r
    })?;
    Ok((out, scrapes.load(Ordering::Relaxed)))
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
            vec![
                PodSpec::mesh("server"),
                PodSpec::bare("bareserver"),
                PodSpec::mesh("fast2"),
                PodSpec::mesh("slow"),
            ],
        ],
        vec![
            ServiceSpec::new("l4", HTTP, HTTP, &["server"]).app_protocol("tcp"),
            ServiceSpec::new("l7", HTTP, HTTP, &["server"]),
            ServiceSpec::new("local-l4", HTTP, HTTP, &["local"]).app_protocol("tcp"),
            ServiceSpec::new("trio", HTTP, HTTP, &["server", "fast2", "slow"]),
        ],
    )?;
    for s in ["server", "bareserver", "local", "barelocal"] {
        c.serve(s, HTTP)?;
        c.spawn(s, &["iperf3", "-s", "-p", &IPERF.to_string()])?;
        c.wait_listening(s, IPERF)?;
    }
    c.serve("fast2", HTTP)?;
    c.serve_with("slow", HTTP, &["--delay-ms", "50"])?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let expect = |lb: &str| [format!("default/{}", rule_name(lb))];
    let apply_lb = |lb: &str| {
        let e = expect(lb);
        c.apply(0, &config(lb), "destination_rules", &[e[0].as_str()])
    };
    apply_lb("ROUND_ROBIN")?;
    eprintln!(
        "bench: {rounds} rounds x {} paths, {secs}s per measurement",
        PATHS.len()
    );
    let addr = |d: Dest| match d {
        Dest::Pod(p) => c.pod(p).ip,
        Dest::Service(s) => c.service_ip(s),
    };

    let n = PATHS.len();
    let (mut rps, mut cpu, mut p50, mut p99, mut gbps) = (
        vec![vec![]; n],
        vec![vec![]; n],
        vec![vec![]; n],
        vec![vec![]; n],
        vec![vec![]; n],
    );
    // P2C vs round robin over `trio`, where `slow` adds 50 ms: p50 and p99 per policy.
    let lbs = [
        ("ROUND_ROBIN", "round robin"),
        ("P2C_PEAK_EWMA", "P2C peak EWMA"),
    ];
    let mut lb_lat: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); lbs.len()];
    let trio = Path {
        name: "trio",
        client: "client",
        http: Dest::Service("trio"),
        iperf: None,
        baseline: None,
    };
    // `MESH_BENCH_ONLY=L4,L7` measures only the paths whose names contain one of the words.
    let only = std::env::var("MESH_BENCH_ONLY").unwrap_or_default();
    let wanted = |p: &Path| only.is_empty() || only.split(',').any(|w| p.name.contains(w.trim()));
    for r in 0..rounds {
        for (i, p) in PATHS.iter().enumerate() {
            if !wanted(p) {
                continue;
            }
            let ip = addr(p.http);
            eprintln!("round {}/{rounds}: {}", r + 1, p.name);
            let (r, u) = wrk(&c, p, ip, secs)?;
            rps[i].push(r);
            cpu[i].push(u);
            let (a, b) = fixed_rate(&c, p, ip, secs, (1000, 8))?;
            p50[i].push(a);
            p99[i].push(b);
            if let Some(server) = p.iperf {
                gbps[i].push(iperf(&c, p, c.pod(server).ip, secs)?);
            }
        }
        for (k, (lb, label)) in lbs.iter().enumerate() {
            if !only.is_empty() {
                break;
            }
            eprintln!("round {}/{rounds}: trio, {label}", r + 1);
            apply_lb(lb)?;
            let (a, b) = fixed_rate(&c, &trio, c.service_ip("trio"), secs, (200, 16))?;
            lb_lat[k].0.push(a);
            lb_lat[k].1.push(b);
        }
    }
    let m: Vec<[f64; 5]> = (0..n)
        .map(|i| {
            [
                median(&mut rps[i]),
                median(&mut p50[i]),
                median(&mut p99[i]),
                median(&mut gbps[i]),
                median(&mut cpu[i]),
            ]
        })
        .collect();

    let measured = PATHS.iter().any(wanted);
    if measured {
        print_paths(&PATHS, &m, rounds, secs);
    }
    if only.is_empty() {
        println!(
            "\nper-request balancing over 3 endpoints, one adding 50 ms (200 rps, 16 connections):"
        );
        println!("| policy | p50 µs | p99 µs |");
        println!("|---|---:|---:|");
        for (k, (_, label)) in lbs.iter().enumerate() {
            println!(
                "| {label} | {:.0} | {:.0} |",
                median(&mut lb_lat[k].0),
                median(&mut lb_lat[k].1)
            );
        }
    }
    // What scraping costs: L7 p99 at 1000 rps, without and with a 100 ms scraper, interleaved.
    if only.is_empty() || only.contains("scrape") {
        let scrape_rounds = env_u64("MESH_BENCH_SCRAPE_ROUNDS", 5) as usize;
        let l7 = &PATHS[2];
        let ip = addr(l7.http);
        // Two quiet arms around the scraped one: their spread is the noise floor.
        let (mut quiet, mut scraped, mut control, mut total) = (vec![], vec![], vec![], 0);
        for r in 0..scrape_rounds {
            eprintln!(
                "round {}/{scrape_rounds}: L7 p99 without, with, without scraping",
                r + 1
            );
            quiet.push(fixed_rate(&c, l7, ip, secs, (1000, 8))?.1);
            let ((_, p99), n) = while_scraping(&c, || fixed_rate(&c, l7, ip, secs, (1000, 8)))?;
            scraped.push(p99);
            total += n;
            control.push(fixed_rate(&c, l7, ip, secs, (1000, 8))?.1);
        }
        let (q, s, k) = (
            median(&mut quiet),
            median(&mut scraped),
            median(&mut control),
        );
        let base = f64::midpoint(q, k).max(f64::MIN_POSITIVE);
        println!(
            "\nscraping /metrics every 100 ms on both nodes during L7 load (1000 rps, 8 connections; {total} scrapes, medians of {scrape_rounds} interleaved rounds):"
        );
        println!("| | p99 µs | ratio to the quiet arms' mean |");
        println!("|---|---:|---:|");
        println!("| no scraping (before) | {q:.0} | {:.3} |", q / base);
        println!("| scraping every 100 ms | {s:.0} | {:.3} |", s / base);
        println!("| no scraping (after) | {k:.0} | {:.3} |", k / base);
    }
    let captured = c.counter(0, "client", "kernel.captured_v4")?;
    println!("\n(client pod connects captured by the kernel during the bench: {captured})");
    Ok(())
}

/// The main table: medians per path and their ratios to the direct path of the same locality.
fn print_paths(paths: &[Path], m: &[[f64; 5]], rounds: usize, secs: u64) {
    println!(
        "\nmedians of {rounds} rounds ({secs}s each); ratios are mesh / direct on the same locality"
    );
    println!(
        "| path | req/s (1 KB, keep-alive) | p50 µs @1000 rps | p99 µs @1000 rps | iperf3 Gbit/s | agent CPU µs/req | req/s ratio | p50 ratio | p99 ratio | Gbit/s ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in paths.iter().enumerate() {
        let has_iperf = p.iperf.is_some();
        let ratios = match p.baseline {
            Some(b) => (0..4)
                .map(|k| {
                    if k == 3 && !has_iperf {
                        "-".to_string()
                    } else {
                        format!("{:.2}", m[i][k] / m[b][k].max(f64::MIN_POSITIVE))
                    }
                })
                .collect::<Vec<_>>(),
            None => vec!["1.00".into(); 4],
        };
        let gbit = if has_iperf {
            format!("{:.2}", m[i][3])
        } else {
            "-".into()
        };
        let cpu = if p.baseline.is_some() {
            format!("{:.1}", m[i][4])
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {gbit} | {cpu} | {} |",
            p.name,
            m[i][0],
            m[i][1],
            m[i][2],
            ratios.join(" | ")
        );
    }
    println!(
        "\nL7 / L4 requests/s (cross-node, same run): {:.2}; agent CPU per request L7 / L4: {:.2}",
        m[2][0] / m[1][0].max(f64::MIN_POSITIVE),
        m[2][4] / m[1][4].max(f64::MIN_POSITIVE)
    );
}
