//! `cargo xtask bench`: the mesh against a direct connection and against a peer proxy chain,
//! measured in one sitting on one topology, so the ratios compare like with like.
//!
//! Paths (client pod → server pod, 1 KB HTTP answers; iperf3 for bulk bytes):
//! - direct, cross-node and same-node (unenrolled pods: no proxy at all);
//! - the mesh same-node at L4 (handed over inside the agent, no TLS);
//! - the mesh cross-node at L4 (HBONE: HTTP/2 CONNECT over mTLS; a port declared `tcp`);
//! - the mesh cross-node at L7 (HTTP parsed and routed by an HTTPRoute, then HBONE);
//! - the peer: a two-hop haproxy chain with mTLS between the hops (TLS 1.3, P-256 certificates
//!   as the mesh uses), one haproxy in each node's namespace, in TCP mode and in HTTP mode.
//!
//! Figures per path, each the median of interleaved rounds (A B C … A B C …, so drift on a noisy
//! machine hits every path alike):
//! - requests/s at 1 and 8 keep-alive connections, and with a new connection per request (wrk);
//! - p50/p99/p99.9 at fixed rates of 1000 and 5000 requests/s over 8 connections
//!   (`mesh-testapp load`, timed from each request's scheduled start: no coordinated omission);
//! - iperf3 with 1 and 8 streams;
//! - proxy CPU (both agents, or both haproxies) per request during the 8-connection run, and
//!   per GB during the single-stream iperf3.
//!
//! Then memory (proxy RSS idle, and with 1k and 10k open keep-alive connections, measured before
//! any other traffic), per-request balancing (P2C peak EWMA against round robin), and what
//! scraping `/metrics` every 100 ms costs the L7 path's p99, beside control runs that fetch
//! nothing (`MESH_BENCH_SCRAPE_RUNS` of each, 3 by default).
//!
//! The soak (`MESH_BENCH_ONLY=soak`, never part of the default run: it takes
//! `MESH_SOAK_SECONDS`, 600 by default): 10,000 idle connections held through the mesh at L4
//! (from two pods, each under the per-pod cap) while 50 checked streams trickle bytes both ways
//! and 100 L7 requests/s run, for the whole time; then the agents' memory per idle connection,
//! after everything closed, and after a second burst of 10,000 opened and closed (what a load
//! leaves must not add up).
//!
//! Output: tables on stdout, `bench.json` and `bench.svg` in `MESH_BENCH_OUT` (default
//! `target/bench`). `MESH_BENCH_ONLY=word,…` runs only the paths whose key contains a word, and
//! the sections named `memory`, `balance`, `scrape` or `soak`. `MESH_BENCH_ROUNDS` (3) and
//! `MESH_BENCH_SECONDS` (3) set the rounds and each measurement's length.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path as FsPath, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_agent::discovery::nodefile::raw::{
    RawFile,
    route::{RawBackendRef, RawLoadBalancer, RawTrafficPolicy},
};
use mesh_tests::{
    Cluster, PodSpec, ServiceSpec, artifact, backend, bin_dir, destination_rule, fd_limit,
    in_netns, monotonic_ns, proc_cpu, proc_rss, raise_fd_limit, route, rules,
};
use serde_json::{Value, json};

const HTTP: u16 = 8080;
const IPERF: u16 = 5201;
/// The haproxy chain's ports: first hop (plaintext from the client) and second hop (mTLS).
const HA_L4: (u16, u16) = (18080, 18443);
const HA_IPERF: (u16, u16) = (15201, 15443);
const HA_L7: (u16, u16) = (28080, 28443);

/// Who carries a path's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No proxy.
    Direct,
    /// Our agents.
    Mesh,
    /// The haproxy chain.
    Peer,
}

/// Where a client connects.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// A pod's own address.
    Pod(&'static str, u16),
    /// A service address.
    Service(&'static str, u16),
    /// Node `i`'s address on its pod bridge (where the first haproxy listens).
    Node(usize, u16),
}

#[derive(Clone, Copy, Debug)]
struct Path {
    key: &'static str,
    name: &'static str,
    kind: Kind,
    client: &'static str,
    http: Target,
    iperf: Option<Target>,
    /// The direct path of the same locality.
    direct: usize,
    /// The peer path this one is compared with.
    peer: Option<usize>,
}

const PATHS: [Path; 7] = [
    Path {
        key: "direct_cross",
        name: "direct, cross-node",
        kind: Kind::Direct,
        client: "bare",
        http: Target::Pod("bareserver", HTTP),
        iperf: Some(Target::Pod("bareserver", IPERF)),
        direct: 0,
        peer: None,
    },
    Path {
        key: "direct_same",
        name: "direct, same-node",
        kind: Kind::Direct,
        client: "bare",
        http: Target::Pod("barelocal", HTTP),
        iperf: Some(Target::Pod("barelocal", IPERF)),
        direct: 1,
        peer: None,
    },
    Path {
        key: "mesh_same_l4",
        name: "mesh, same-node L4",
        kind: Kind::Mesh,
        client: "client",
        http: Target::Service("local-l4", HTTP),
        iperf: Some(Target::Pod("local", IPERF)),
        direct: 1,
        peer: None,
    },
    Path {
        key: "mesh_cross_l4",
        name: "mesh, cross-node L4 mTLS",
        kind: Kind::Mesh,
        client: "client",
        http: Target::Service("l4", HTTP),
        iperf: Some(Target::Pod("server", IPERF)),
        direct: 0,
        peer: Some(5),
    },
    Path {
        key: "mesh_cross_l7",
        name: "mesh, cross-node L7 routed",
        kind: Kind::Mesh,
        client: "client",
        http: Target::Service("l7", HTTP),
        iperf: None,
        direct: 0,
        peer: Some(6),
    },
    Path {
        key: "haproxy_tcp",
        name: "haproxy chain, TCP mode",
        kind: Kind::Peer,
        client: "bare",
        http: Target::Node(0, HA_L4.0),
        iperf: Some(Target::Node(0, HA_IPERF.0)),
        direct: 0,
        peer: None,
    },
    Path {
        key: "haproxy_http",
        name: "haproxy chain, HTTP mode",
        kind: Kind::Peer,
        client: "bare",
        http: Target::Node(0, HA_L7.0),
        iperf: None,
        direct: 0,
        peer: None,
    },
];

/// One measured figure.
#[derive(Clone, Copy, Debug)]
struct Figure {
    key: &'static str,
    label: &'static str,
    higher_is_better: bool,
}

const fn fig(key: &'static str, label: &'static str, higher_is_better: bool) -> Figure {
    Figure {
        key,
        label,
        higher_is_better,
    }
}

const FIGURES: [Figure; 13] = [
    fig("rps_c1", "req/s, 1 conn", true),
    fig("rps_c8", "req/s, 8 conns", true),
    fig("rps_new", "req/s, new conn each", true),
    fig("p50_1k", "p50 µs @1k/s", false),
    fig("p99_1k", "p99 µs @1k/s", false),
    fig("p999_1k", "p99.9 µs @1k/s", false),
    fig("p50_5k", "p50 µs @5k/s", false),
    fig("p99_5k", "p99 µs @5k/s", false),
    fig("p999_5k", "p99.9 µs @5k/s", false),
    fig("gbps_1", "Gbit/s, 1 stream", true),
    fig("gbps_8", "Gbit/s, 8 streams", true),
    fig("cpu_us_req", "proxy CPU µs/req", false),
    fig("cpu_ms_gb", "proxy CPU ms/GB", false),
];

fn fig_index(key: &str) -> usize {
    FIGURES.iter().position(|f| f.key == key).unwrap_or(0)
}

/// Node-1's node file additions: the L7 row's route, and the balancing policy of `trio`.
fn config(lb: &str) -> impl FnOnce(&mut RawFile) {
    let mut l7 = route(
        "l7",
        "l7",
        rules("- matches: [{path: {type: PathPrefix, value: /}}]"),
    );
    for p in &mut l7.parent_refs {
        p.port = Some(HTTP);
    }
    for r in &mut l7.rules {
        r.backend_refs = vec![RawBackendRef {
            port: Some(HTTP),
            ..backend("l7")
        }];
    }
    let policy = RawTrafficPolicy {
        load_balancer: Some(RawLoadBalancer {
            simple: Some(lb.to_string()),
        }),
        ..Default::default()
    };
    let trio = destination_rule(&rule_name(lb), "trio", policy);
    move |f| {
        f.http_routes = vec![l7];
        f.destination_rules = vec![trio];
    }
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

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// The bench's topology and the peer's processes.
struct Bench {
    c: Cluster,
    haproxy: Vec<u32>,
    secs: u64,
}

impl Bench {
    fn addr(&self, t: Target) -> SocketAddr {
        match t {
            Target::Pod(p, port) => (self.c.pod(p).ip, port).into(),
            Target::Service(s, port) => (self.c.service_ip(s), port).into(),
            Target::Node(i, port) => (Ipv4Addr::new(198, 18, i as u8 + 1, 1), port).into(),
        }
    }

    /// CPU the proxies of `kind` have used so far.
    fn proxy_cpu(&self, kind: Kind) -> Duration {
        match kind {
            Kind::Direct => Duration::ZERO,
            Kind::Mesh => (0..self.c.nodes.len())
                .filter_map(|i| self.c.agent_cpu(i))
                .sum(),
            Kind::Peer => self.haproxy.iter().filter_map(|&p| proc_cpu(p)).sum(),
        }
    }

    /// wrk against `p` with `conns` connections; returns (requests/s, proxy CPU µs per request).
    fn wrk(&self, p: &Path, conns: u32, new_each: bool) -> Result<(f64, f64)> {
        let url = format!("http://{}/", self.addr(p.http));
        let (c_arg, d_arg) = (format!("-c{conns}"), format!("-d{}s", self.secs));
        let mut args = vec!["wrk", "-t1", &c_arg, &d_arg];
        if new_each {
            args.extend(["-H", "Connection: close"]);
        }
        args.push(&url);
        let before = self.proxy_cpu(p.kind);
        let out = self.c.exec(p.client, &args)?;
        let used = self.proxy_cpu(p.kind).saturating_sub(before);
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("Non-2xx") || text.contains("Socket errors") {
            bail!("wrk {args:?} saw errors on {}: {text}", p.name);
        }
        let rps: f64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk output for {}: {text}", p.name))?;
        let requests = rps * self.secs as f64;
        Ok((rps, used.as_secs_f64() * 1e6 / requests.max(1.0)))
    }

    /// Fixed-rate load; returns (p50, p99, p99.9) in µs.
    fn fixed_rate(&self, p: &Path, rate: u64, conns: u64) -> Result<[f64; 3]> {
        let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
        let out = self.c.exec(
            p.client,
            &[
                &app,
                "load",
                "--addr",
                &self.addr(p.http).to_string(),
                "--rate",
                &rate.to_string(),
                "--seconds",
                &self.secs.to_string(),
                "--connections",
                &conns.to_string(),
            ],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "load output for {}: {}",
                p.name,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if v["errors"].as_u64() != Some(0) {
            bail!("fixed-rate load saw errors on {}: {v}", p.name);
        }
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Ok([f("p50_us"), f("p99_us"), f("p999_us")])
    }

    /// iperf3 with `streams` streams; returns (Gbit/s, proxy CPU ms per GB).
    fn iperf(&self, p: &Path, target: Target, streams: u32) -> Result<(f64, f64)> {
        let addr = self.addr(target);
        let before = self.proxy_cpu(p.kind);
        let out = self.c.exec(
            p.client,
            &[
                "iperf3",
                "-c",
                &addr.ip().to_string(),
                "-p",
                &addr.port().to_string(),
                "-t",
                &self.secs.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ],
        )?;
        let used = self.proxy_cpu(p.kind).saturating_sub(before);
        let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
        let sum = &v["end"]["sum_received"];
        let (Some(bps), Some(bytes)) = (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64())
        else {
            bail!("iperf3 failed on {}: {v}", p.name);
        };
        Ok((
            bps / 1e9,
            used.as_secs_f64() * 1e3 / (bytes / 1e9).max(1e-9),
        ))
    }

    /// One round of every figure for path `p`, appended to `s[figure]`.
    fn round(&self, p: &Path, s: &mut [Vec<f64>]) -> Result<()> {
        let mut put = |k: &str, v: f64| s[fig_index(k)].push(v);
        put("rps_c1", self.wrk(p, 1, false)?.0);
        let (rps, cpu) = self.wrk(p, 8, false)?;
        put("rps_c8", rps);
        if p.kind != Kind::Direct {
            put("cpu_us_req", cpu);
        }
        put("rps_new", self.wrk(p, 8, true)?.0);
        for (rate, keys) in [
            (1000, ["p50_1k", "p99_1k", "p999_1k"]),
            (5000, ["p50_5k", "p99_5k", "p999_5k"]),
        ] {
            for (k, v) in keys.iter().zip(self.fixed_rate(p, rate, 8)?) {
                put(k, v);
            }
        }
        if let Some(t) = p.iperf {
            let (g1, cpu) = self.iperf(p, t, 1)?;
            put("gbps_1", g1);
            if p.kind != Kind::Direct {
                put("cpu_ms_gb", cpu);
            }
            put("gbps_8", self.iperf(p, t, 8)?.0);
        }
        Ok(())
    }
}

/// Writes the chain's certificates and configurations into `dir` and starts one haproxy in
/// each node's namespace. Returns their pids once the chain answers.
fn start_haproxy(c: &Cluster, dir: &FsPath) -> Result<Vec<u32>> {
    std::fs::create_dir_all(dir)?;
    let sh = |script: &str| -> Result<()> {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!(
                "making the haproxy chain's certificates failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    // P-256 keys and TLS 1.3, as the mesh's own certificates and handshakes.
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    sh(&format!(
        "openssl req -x509 {ec} -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null"
    ))?;
    for n in ["node-1", "node-2"] {
        sh(&format!(
            "openssl req {ec} -keyout {n}.key -out {n}.csr -subj /CN={n} 2>/dev/null
             printf 'subjectAltName=URI:spiffe://cluster.local/ns/default/sa/{n}\\n' > {n}.ext
             openssl x509 -req -in {n}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile {n}.ext -out {n}.crt 2>/dev/null
             cat {n}.crt {n}.key > {n}.pem"
        ))?;
    }
    let d = dir.display();
    // haproxy holds two descriptors per connection; keep under the open-file limit.
    let maxconn = fd_limit().saturating_sub(200) / 2;
    let common = format!(
        "global\n    maxconn {maxconn}\n    ssl-default-bind-options ssl-min-ver TLSv1.3\n    ssl-default-server-options ssl-min-ver TLSv1.3\ndefaults\n    maxconn {maxconn}\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n"
    );
    let mut hop1 = common.clone();
    let mut hop2 = common;
    let server = "198.19.0.2";
    let bareserver = c.pod("bareserver").ip;
    for (name, (front, tls), app) in [
        ("l4", HA_L4, HTTP),
        ("iperf", HA_IPERF, IPERF),
        ("l7", HA_L7, HTTP),
    ] {
        let mode = if name == "l7" { "http" } else { "tcp" };
        let route = if name == "l7" {
            format!("    use_backend {name} if {{ path_beg / }}\n")
        } else {
            String::new()
        };
        let reuse = if name == "l7" {
            "    http-reuse always\n"
        } else {
            ""
        };
        write!(
            hop1,
            "frontend {name}\n    mode {mode}\n    bind 198.18.1.1:{front}\n{route}    default_backend {name}\nbackend {name}\n    mode {mode}\n{reuse}    server hop2 {server}:{tls} ssl crt {d}/node-1.pem ca-file {d}/ca.pem verify required\n"
        )?;
        write!(
            hop2,
            "frontend {name}\n    mode {mode}\n    bind {server}:{tls} ssl crt {d}/node-2.pem ca-file {d}/ca.pem verify required\n    default_backend {name}\nbackend {name}\n    mode {mode}\n{reuse}    server app {bareserver}:{app}\n"
        )?;
    }
    let mut pids = Vec::new();
    for (i, cfg) in [hop1, hop2].iter().enumerate() {
        let file = dir.join(format!("hop{}.cfg", i + 1));
        std::fs::write(&file, cfg)?;
        let file = file.to_string_lossy().into_owned();
        let check = c.node_exec(i, &["haproxy", "-c", "-q", "-f", &file]);
        check.with_context(|| {
            format!(
                "haproxy rejects {file} (is haproxy installed? `cargo xtask setup` installs it)"
            )
        })?;
        pids.push(c.spawn_in_node(i, &["haproxy", "-db", "-f", &file])?);
    }
    let url = format!("http://198.18.1.1:{}/", HA_L7.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.http_status("bare", &url)? != Some(200) {
        if Instant::now() > deadline {
            let logs: Vec<String> = std::fs::read_dir(c.dir())?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("haproxy"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect();
            bail!(
                "the haproxy chain does not answer {url}; its logs: {}",
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(pids)
}

/// Scrapes every node's `/metrics` every 100 ms, but only in the odd periods of `period` on
/// the machine's monotonic clock (the load generator's `--split-ms` tells those apart), until
/// `stop`. Returns the number of scrapes, each checked to be a full answer. With `scrape`
/// false (the control arm) the threads keep the same wake-ups but fetch nothing, so the two
/// halves of a run differ only by chance and the ratio shows the measurement's noise floor.
fn scrape_odd_periods(
    c: &Cluster,
    period: Duration,
    stop: &AtomicBool,
    scrape: bool,
) -> Result<u64> {
    let scrapes = AtomicU64::new(0);
    let metrics: SocketAddr = ([127, 0, 0, 1], 15020).into();
    let period_ns = period.as_nanos().max(1) as u64;
    std::thread::scope(|s| {
        let scrapers: Vec<_> = c
            .nodes
            .iter()
            .map(|n| {
                let scrapes = &scrapes;
                s.spawn(move || {
                    in_netns(&n.netns, || -> Result<()> {
                        scrape_priority();
                        let mut conn = None;
                        while !stop.load(Ordering::Relaxed) {
                            let now = monotonic_ns();
                            if (now / period_ns).is_multiple_of(2) {
                                let next = (now / period_ns + 1) * period_ns;
                                std::thread::sleep(Duration::from_nanos(next - now));
                                continue;
                            }
                            let t = Instant::now();
                            if !scrape {
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                            let body = scrape_keepalive(&mut conn, metrics)
                                .with_context(|| format!("scrape of {}", n.name))?;
                            if !body.contains("mesh_bpf_events_total") {
                                bail!("scrape of {} lacks the kernel's families", n.name);
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
        for t in scrapers {
            t.join()
                .map_err(|_| anyhow::anyhow!("scraper panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(scrapes.load(Ordering::Relaxed))
}

/// Runs the calling scraper thread at `SCHED_IDLE`. In production Prometheus scrapes from
/// another machine; here it shares the node's two cores with the load generator and the
/// proxies, and its own reading of the answer would otherwise be counted as the agent's cost.
fn scrape_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread with a valid param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) } != 0 {
        eprintln!(
            "scraper: cannot lower its scheduling class: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One `GET /metrics` over a kept-alive HTTP/1.1 connection, as Prometheus scrapes (it reuses
/// its connection to a target); reconnects when there is none. Returns the body of a 200.
fn scrape_keepalive(conn: &mut Option<BufReader<TcpStream>>, addr: SocketAddr) -> Result<String> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut().context("connected above")?;
    write!(r.get_mut(), "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
    let (mut line, mut length) = (String::new(), None);
    r.read_line(&mut line)?;
    if line.split_whitespace().nth(1) != Some("200") {
        *conn = None;
        bail!("answered {line:?}");
    }
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed in the headers");
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = Some(v.trim().parse::<usize>()?);
        }
    }
    let mut body = vec![0; length.context("no content-length")?];
    r.read_exact(&mut body)?;
    Ok(String::from_utf8(body)?)
}

/// Proxy memory with `n` connections held open from `client` to `target`: RSS of each process
/// in `pids`, sampled once the connections are up.
fn rss_with(b: &Bench, client: &str, target: Target, n: usize, pids: &[u32]) -> Result<Vec<f64>> {
    let sample = || -> Vec<f64> {
        pids.iter()
            .map(|&p| proc_rss(p).map_or(f64::NAN, |r| r as f64))
            .collect()
    };
    if n == 0 {
        return Ok(sample());
    }
    let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
    let mut child = b.c.spawn_piped(
        client,
        &[
            &app,
            "hold",
            "--addr",
            &b.addr(target).to_string(),
            "--count",
            &n.to_string(),
        ],
    )?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("hold's stdout")?;
    BufReader::new(stdout).read_line(&mut line)?;
    let ready = line.trim() == format!("ready {n}");
    // Let the proxies settle (idle timers, pool bookkeeping) before reading memory.
    std::thread::sleep(Duration::from_secs(1));
    let rss = sample();
    drop(child.stdin.take());
    let _ = child.wait();
    if !ready {
        bail!("holding {n} connections to {target:?} failed: {line:?}");
    }
    // Let the closes propagate before the next measurement.
    std::thread::sleep(Duration::from_secs(2));
    Ok(rss)
}

/// Port of the soak's `stream-serve` on the server pod.
const SOAK_STREAMS: u16 = 9000;

/// The soak: 10,000 idle connections held through the mesh for `secs`, while checked streams
/// and a steady request rate run beside them. Reports the agents' memory before, with the
/// connections, at its highest and after they closed, and fails on any lost byte or request.
fn soak(b: &Bench, secs: u64) -> Result<Value> {
    const IDLE: usize = 10_000;
    const STREAMS: usize = 50;
    let c = &b.c;
    let agents: Vec<u32> = (0..2).filter_map(|i| c.agent_pid(i)).collect();
    let rss = || -> Vec<u64> { agents.iter().map(|&p| proc_rss(p).unwrap_or(0)).collect() };
    let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
    c.spawn(
        "server",
        &[&app, "stream-serve", "--port", &SOAK_STREAMS.to_string()],
    )?;
    c.wait_listening("server", SOAK_STREAMS)?;
    // Through the L4 service, from two pods of node 1 (each under the agent's per-pod cap):
    // idle keep-alive connections, one request each. (The memory section measures L7 beside.)
    let idle_to = b.addr(Target::Service("l4", HTTP)).to_string();
    // The baseline is a used agent's: each keeps its last flow records (`/debug/flows`, at most
    // `HISTORY`), which fill on first use and stay full. 3,000 requests on new connections
    // fill them on both nodes, so what the soak leaves behind is not that.
    let warm = c.load_on(
        "client",
        b.addr(Target::Service("l7", HTTP)),
        (500, 6),
        true,
        4,
    )?;
    let warmed = mesh_tests::load_result(&warm, Duration::from_secs(60))?;
    anyhow::ensure!(
        warmed["errors"].as_u64() == Some(0),
        "soak warm-up: {warmed}"
    );
    std::thread::sleep(Duration::from_secs(10));
    let baseline = rss();
    let heap_of = || -> Vec<Value> {
        (0..2)
            .map(|i| c.stats(i).map(|s| s["heap"].clone()).unwrap_or_default())
            .collect()
    };
    let heap_before = heap_of();
    eprintln!("soak: holding {IDLE} idle connections for {secs} s");
    let hold_idle = || -> Result<Vec<std::process::Child>> {
        let mut holds = Vec::new();
        for pod in ["client", "local"] {
            let mut hold = c.spawn_piped(
                pod,
                &[
                    &app,
                    "hold",
                    "--addr",
                    &idle_to,
                    "--count",
                    &(IDLE / 2).to_string(),
                    "--parallel",
                    "16",
                ],
            )?;
            let mut line = String::new();
            BufReader::new(hold.stdout.take().context("hold's stdout")?).read_line(&mut line)?;
            anyhow::ensure!(
                line.trim() == format!("ready {}", IDLE / 2),
                "holding connections from {pod}: {line:?}"
            );
            holds.push(hold);
        }
        Ok(holds)
    };
    let close = |holds: Vec<std::process::Child>| {
        for mut hold in holds {
            drop(hold.stdin.take());
            let _ = hold.wait();
        }
    };
    let holds = hold_idle()?;
    std::thread::sleep(Duration::from_secs(2));
    let held = rss();
    // Each stream sends 4 MiB over the whole soak and gets 64 KiB back, both checked.
    let streams = c.streams(
        "client",
        b.addr(Target::Pod("server", SOAK_STREAMS)),
        STREAMS,
        4 << 20,
        secs,
    )?;
    let load = c.load_on(
        "client",
        b.addr(Target::Service("l7", HTTP)),
        (100, secs),
        true,
        2,
    )?;
    let start = Instant::now();
    let mut peak = held.clone();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(10));
        let now = rss();
        for (p, n) in peak.iter_mut().zip(&now) {
            *p = (*p).max(*n);
        }
        samples.push(json!({"t": start.elapsed().as_secs(), "rss": now}));
    }
    let streamed = mesh_tests::load_result(&streams, Duration::from_secs(120))?;
    let requests = mesh_tests::load_result(&load, Duration::from_secs(120))?;
    close(holds);
    // The closes propagate, idle HBONE connections expire (--hbone-idle-timeout, 30 s) and the
    // agent returns freed heap (every 10 s): sampled for 90 s.
    let settle = || {
        let mut after = rss();
        let mut samples = Vec::new();
        for t in (10..=90).step_by(10) {
            std::thread::sleep(Duration::from_secs(10));
            after = rss();
            samples.push(json!({"t": t, "rss": after}));
        }
        (after, samples)
    };
    let (after, after_samples) = settle();
    // What the allocator says is live against what it holds: resident memory above the sum is
    // pages it cannot hand back (fragmentation), the live part is data the agent still keeps.
    let heap = heap_of();
    // The same burst again: what a load leaves behind must not add up from one to the next.
    close(hold_idle()?);
    let (again, _) = settle();
    let per_idle_kb: Vec<f64> = held
        .iter()
        .zip(&baseline)
        .map(|(h, b)| (*h as f64 - *b as f64) / IDLE as f64 / 1024.0)
        .collect();
    let mb = |v: &[u64]| {
        v.iter()
            .map(|b| format!("{:.1}", *b as f64 / 1048576.0))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "\nsoak: {IDLE} idle connections + {STREAMS} checked streams + 100 requests/s for {secs} s (agents: client side / server side)"
    );
    println!("| | RSS MB |\n|---|---:|");
    println!(
        "| before | {} |\n| with {IDLE} idle | {} |\n| peak | {} |\n| {} s after closing | {} |\n| after {IDLE} more, opened and closed | {} |",
        mb(&baseline),
        mb(&held),
        mb(&peak),
        90,
        mb(&after),
        mb(&again)
    );
    let series: Vec<String> = after_samples
        .iter()
        .map(|s| {
            format!(
                "{} s: {:.1} MB",
                s["t"],
                s["rss"][0].as_f64().unwrap_or(0.0) / 1048576.0
            )
        })
        .collect();
    println!("client side after closing: {}", series.join(", "));
    println!("KB per idle connection: {per_idle_kb:.1?}; streams {streamed}; requests {requests}");
    println!(
        "| allocator's MB, before → after closing | client side | server side |\n|---|---:|---:|"
    );
    for key in ["in_use", "active", "resident", "metadata"] {
        let side = |i: usize| {
            let of =
                |h: &[Value]| h.get(i).and_then(|v| v[key].as_f64()).unwrap_or(0.0) / 1048576.0;
            format!("{:.1} → {:.1}", of(&heap_before), of(&heap))
        };
        println!("| {key} | {} | {} |", side(0), side(1));
    }
    let report = json!({
        "seconds": secs, "idle_connections": IDLE, "streams": STREAMS,
        "rss_before": baseline, "rss_held": held, "rss_peak": peak, "rss_after": after,
        "rss_after_second_burst": again,
        "heap_before": heap_before, "heap_after": heap,
        "kb_per_idle_connection": per_idle_kb, "streams_result": streamed, "requests": requests,
        "samples": samples, "after_closing": after_samples,
    });
    anyhow::ensure!(
        streamed["ok"].as_u64() == Some(STREAMS as u64),
        "soak streams: {streamed}"
    );
    anyhow::ensure!(
        requests["errors"].as_u64() == Some(0),
        "soak requests: {requests}"
    );
    Ok(report)
}

/// Memory rows: (label, [process RSS in bytes] for idle, 1k and 10k connections).
fn memory(b: &Bench) -> Result<Vec<(String, [f64; 3])>> {
    let agents: Vec<u32> = (0..2).filter_map(|i| b.c.agent_pid(i)).collect();
    let mut rows = Vec::new();
    for (label, client, target, pids) in [
        (
            "mesh agent",
            "client",
            Target::Service("l4", HTTP),
            agents.as_slice(),
        ),
        (
            "haproxy",
            "bare",
            Target::Node(0, HA_L4.0),
            b.haproxy.as_slice(),
        ),
    ] {
        let mut per = vec![[f64::NAN; 3]; pids.len()];
        // A haproxy holds two descriptors per connection, the agent one (its side to the other
        // node is a stream on a shared connection): skip what the open-file limit forbids.
        let per_conn = if label == "haproxy" { 2 } else { 1 };
        for (k, n) in [0, 1000, 10_000].into_iter().enumerate() {
            if n * per_conn + 200 > fd_limit() as usize {
                eprintln!("memory: {label} cannot hold {n} connections under the open-file limit");
                continue;
            }
            eprintln!("memory: {label}, {n} open connections");
            for (i, r) in rss_with(b, client, target, n, pids)?
                .into_iter()
                .enumerate()
            {
                per[i][k] = r;
            }
        }
        for (i, r) in per.into_iter().enumerate() {
            let side = if i == 0 {
                "node-1 (client side)"
            } else {
                "node-2 (server side)"
            };
            rows.push((format!("{label}, {side}"), r));
        }
    }
    Ok(rows)
}

/// A plain SVG bar chart: one panel per headline figure, one bar per path that has it.
fn chart(medians: &[Vec<f64>], out: &FsPath) -> Result<()> {
    let panels = ["rps_c8", "rps_c1", "rps_new", "p99_1k", "p99_5k", "gbps_1"];
    let (w, bar, label_w, gap) = (900.0, 16.0, 230.0, 34.0);
    let color = |k: Kind| match k {
        Kind::Direct => "#9e9e9e",
        Kind::Mesh => "#1f6feb",
        Kind::Peer => "#e36209",
    };
    let mut body = String::new();
    let mut y = 30.0;
    for key in panels {
        let f = fig_index(key);
        let rows: Vec<(usize, f64)> = (0..PATHS.len())
            .filter(|&i| medians[i][f].is_finite())
            .map(|i| (i, medians[i][f]))
            .collect();
        let max = rows.iter().map(|r| r.1).fold(f64::MIN_POSITIVE, f64::max);
        let better = if FIGURES[f].higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        writeln!(
            body,
            r#"<text x="10" y="{y}" font-weight="bold">{} ({better})</text>"#,
            FIGURES[f].label
        )?;
        y += 8.0;
        for (i, v) in rows {
            let len = (w - label_w - 90.0) * v / max;
            writeln!(
                body,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{label_w}" y="{y}" width="{len:.1}" height="{}" fill="{}"/><text x="{:.1}" y="{}">{}</text>"#,
                label_w - 6.0,
                y + bar - 4.0,
                PATHS[i].name,
                bar - 2.0,
                color(PATHS[i].kind),
                label_w + len + 4.0,
                y + bar - 4.0,
                if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            )?;
            y += bar;
        }
        y += gap;
    }
    let svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{y}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>{body}</svg>"#
    );
    std::fs::write(out, svg).with_context(|| format!("write {}", out.display()))
}

/// What the issue's targets ask, as (label, path, against, figure, bound, at least?).
const TARGETS: [(&str, usize, usize, &str, f64, bool); 8] = [
    (
        "L4 req/s, 8 conns ≥ 1.5× haproxy",
        3,
        5,
        "rps_c8",
        1.5,
        true,
    ),
    ("L4 p50 @1k/s ≤ 0.7× haproxy", 3, 5, "p50_1k", 0.7, false),
    ("L4 p99 @1k/s ≤ 0.7× haproxy", 3, 5, "p99_1k", 0.7, false),
    (
        "L4 1-stream Gbit/s ≥ 1.3× haproxy",
        3,
        5,
        "gbps_1",
        1.3,
        true,
    ),
    (
        "L7 req/s, 8 conns ≥ 1.2× haproxy HTTP",
        4,
        6,
        "rps_c8",
        1.2,
        true,
    ),
    ("same-node req/s ≥ 0.8× direct", 2, 1, "rps_c8", 0.8, true),
    (
        "same-node p99 @1k/s ≤ 1.25× direct",
        2,
        1,
        "p99_1k",
        1.25,
        false,
    ),
    (
        "L4 proxy CPU/req ≤ 0.6× haproxy",
        3,
        5,
        "cpu_us_req",
        0.6,
        false,
    ),
];

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel.trim(),
    })
}

fn main() -> Result<()> {
    // The agents, haproxy and the clients inherit it.
    let fds = raise_fd_limit();
    let rounds = env_u64("MESH_BENCH_ROUNDS", 3) as usize;
    let secs = env_u64("MESH_BENCH_SECONDS", 3);
    let only = std::env::var("MESH_BENCH_ONLY").unwrap_or_default();
    let words: Vec<&str> = only
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect();
    let wanted = |k: &str| words.is_empty() || words.iter().any(|w| k.contains(w));
    let out_dir = std::env::var_os("MESH_BENCH_OUT").map_or_else(
        || {
            bin_dir()
                .parent()
                .map(|p| p.join("bench"))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    std::fs::create_dir_all(&out_dir)?;
    // Kubernetes discovery at scale has a cluster of its own.
    if words == ["kube_scale"] {
        let report = json!({"machine": machine(), "kube_scale": kube_scale()?});
        std::fs::write(
            out_dir.join("bench-kube.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        return Ok(());
    }

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
    // Clients make thousands of short connections: let them reuse ports in TIME_WAIT.
    for p in ["client", "bare"] {
        c.exec(p, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        c.exec(
            p,
            &["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"],
        )?;
    }
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
    let apply_lb = |c: &Cluster, lb: &str| {
        let e = expect(lb);
        c.apply(0, config(lb), "destination_rules", &[e[0].as_str()])
    };
    apply_lb(&c, "ROUND_ROBIN")?;
    let haproxy = start_haproxy(&c, &c.dir().join("haproxy"))?;
    let b = Bench { c, haproxy, secs };
    let mut report = json!({
        "machine": machine(),
        "rounds": rounds,
        "seconds_per_measurement": secs,
        "open_file_limit": fds,
    });

    // Memory first, before other traffic has grown any heap.
    if words.is_empty() || wanted("memory") {
        let rows = memory(&b)?;
        println!("\nproxy resident memory (RSS) with open keep-alive connections, each used once:");
        println!("| process | idle MB | 1k conns MB | 10k conns MB | KB per conn |");
        println!("|---|---:|---:|---:|---:|");
        let mut j = vec![];
        for (label, [idle, k1, k10]) in &rows {
            // Per connection from the most connections measured.
            let per = if k10.is_finite() {
                (k10 - idle) / 10_000.0 / 1024.0
            } else {
                (k1 - idle) / 1000.0 / 1024.0
            };
            println!(
                "| {label} | {:.1} | {:.1} | {:.1} | {:.1} |",
                idle / 1048576.0,
                k1 / 1048576.0,
                k10 / 1048576.0,
                per
            );
            j.push(json!({"process": label, "idle_bytes": idle, "conns_1k_bytes": k1, "conns_10k_bytes": k10, "kb_per_conn": per}));
        }
        report["memory"] = json!(j);
    }

    let run: Vec<usize> = (0..PATHS.len())
        .filter(|&i| words.is_empty() || wanted(PATHS[i].key))
        .collect();
    let mut samples = vec![vec![Vec::<f64>::new(); FIGURES.len()]; PATHS.len()];
    if !run.is_empty() {
        eprintln!(
            "bench: {rounds} rounds x {} paths, {secs}s per measurement",
            run.len()
        );
    }
    for r in 0..rounds {
        for &i in &run {
            eprintln!("round {}/{rounds}: {}", r + 1, PATHS[i].name);
            b.round(&PATHS[i], &mut samples[i])?;
        }
    }
    let medians: Vec<Vec<f64>> = samples
        .iter()
        .map(|p| p.iter().map(|s| median(s)).collect())
        .collect();
    if !run.is_empty() {
        print_tables(&run, &medians, rounds, secs);
        report["paths"] = json!(
            run.iter()
                .map(|&i| {
                    let figs: BTreeMap<&str, Value> = FIGURES
                        .iter()
                        .enumerate()
                        .filter(|(f, _)| !samples[i][*f].is_empty())
                        .map(|(f, fig)| {
                            (fig.key, json!({"median": medians[i][f], "samples": samples[i][f]}))
                        })
                        .collect();
                    json!({"key": PATHS[i].key, "name": PATHS[i].name, "kind": format!("{:?}", PATHS[i].kind), "figures": figs})
                })
                .collect::<Vec<_>>()
        );
        report["targets"] = json!(
            TARGETS
                .iter()
                .map(|&(label, a, against, key, bound, at_least)| {
                    let f = fig_index(key);
                    let ratio = medians[a][f] / medians[against][f];
                    let met = if at_least { ratio >= bound } else { ratio <= bound };
                    json!({"target": label, "ratio": ratio, "bound": bound, "met": ratio.is_finite() && met})
                })
                .collect::<Vec<_>>()
        );
        print_targets(&medians);
        chart(&medians, &out_dir.join("bench.svg"))?;
    }

    if words.contains(&"soak") {
        report["soak"] = soak(&b, env_u64("MESH_SOAK_SECONDS", 600))?;
    }
    if words.is_empty() || wanted("balance") {
        report["balancing"] = balancing(&b, rounds, &apply_lb)?;
    }
    if words.is_empty() || wanted("scrape") {
        report["scrape"] = scrape_cost(&b)?;
    }
    if words.is_empty() || wanted("kube_scale") {
        drop(b);
        report["kube_scale"] = kube_scale()?;
    }
    let file = out_dir.join("bench.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report)?)?;
    println!(
        "\nwrote {} and {}",
        file.display(),
        out_dir.join("bench.svg").display()
    );
    Ok(())
}

/// P2C vs round robin over `trio`, where `slow` adds 50 ms: p50 and p99 per policy.
fn balancing(
    b: &Bench,
    rounds: usize,
    apply_lb: &dyn Fn(&Cluster, &str) -> Result<()>,
) -> Result<Value> {
    let trio = Path {
        key: "trio",
        name: "trio",
        kind: Kind::Mesh,
        client: "client",
        http: Target::Service("trio", HTTP),
        iperf: None,
        direct: 0,
        peer: None,
    };
    let lbs = [
        ("ROUND_ROBIN", "round robin"),
        ("P2C_PEAK_EWMA", "P2C peak EWMA"),
    ];
    let mut lat = vec![(vec![], vec![]); lbs.len()];
    for r in 0..rounds {
        for (k, (lb, label)) in lbs.iter().enumerate() {
            eprintln!("round {}/{rounds}: trio, {label}", r + 1);
            apply_lb(&b.c, lb)?;
            let [p50, p99, _] = b.fixed_rate(&trio, 200, 16)?;
            lat[k].0.push(p50);
            lat[k].1.push(p99);
        }
    }
    println!(
        "\nper-request balancing over 3 endpoints, one adding 50 ms (200 rps, 16 connections):"
    );
    println!("| policy | p50 µs | p99 µs |");
    println!("|---|---:|---:|");
    let mut j = vec![];
    for (k, (_, label)) in lbs.iter().enumerate() {
        let (p50, p99) = (median(&lat[k].0), median(&lat[k].1));
        println!("| {label} | {p50:.0} | {p99:.0} |");
        j.push(json!({"policy": label, "p50_us": p50, "p99_us": p99}));
    }
    Ok(json!(j))
}

/// What scraping costs: the L7 path at 1000 requests/s for a long run in which a scraper
/// fetches both nodes' `/metrics` every 100 ms during every other second. The load generator
/// reports the requests scheduled in scraped and in quiet seconds apart, so both arms share
/// every disturbance the machine has, second by second, and only the scraping differs. Each
/// scraped run is followed by a control run that fetches nothing: its ratio is the noise floor
/// the scraped ratio is read against.
fn scrape_cost(b: &Bench) -> Result<Value> {
    let runs = env_u64("MESH_BENCH_SCRAPE_RUNS", 3) as usize;
    let secs = env_u64("MESH_BENCH_SCRAPE_SECONDS", 40);
    let period = Duration::from_secs(1);
    let addr = b.addr(PATHS[4].http).to_string();
    let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
    let mut rows = vec![];
    for r in 0..runs {
        for (arm, scrape) in [("scraped", true), ("control", false)] {
            eprintln!(
                "scrape cost: run {}/{runs} ({arm}), {secs}s of L7 load",
                r + 1
            );
            rows.push(scrape_run(b, &app, &addr, period, secs, scrape)?);
            rows.last_mut().context("pushed above")?["arm"] = json!(arm);
        }
    }
    println!(
        "\nscraping /metrics every 100 ms on both nodes in every other second of L7 load (1000 req/s, 8 connections, {secs}s per run); control runs fetch nothing:"
    );
    println!(
        "| run | arm | scrapes | p50 µs quiet / scraped | p99 µs quiet / scraped | p99.9 µs quiet / scraped | p99 ratio |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for (i, r) in rows.iter().enumerate() {
        let f = |arm: &str, k: &str| r[arm][k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.3} |",
            i / 2 + 1,
            r["arm"].as_str().unwrap_or_default(),
            r["scrapes"],
            f("quiet", "p50_us"),
            f("scraped", "p50_us"),
            f("quiet", "p99_us"),
            f("scraped", "p99_us"),
            f("quiet", "p999_us"),
            f("scraped", "p999_us"),
            r["p99_ratio"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let ratios = |arm: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["arm"] == arm)
            .map(|r| r["p99_ratio"].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let pairs = |arm: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r["arm"] == arm)
            .filter_map(|r| r["pair_p99_ratios"].as_array())
            .flatten()
            .filter_map(Value::as_f64)
            .collect()
    };
    let (m, floor) = (median(&ratios("scraped")), median(&ratios("control")));
    let (pm, pfloor) = (median(&pairs("scraped")), median(&pairs("control")));
    println!(
        "\nmedian p99 ratio, scraped / quiet seconds: {m:.3} (control, nothing fetched: {floor:.3})"
    );
    println!(
        "median over second pairs of p99 scraped / p99 of the quiet second before: {pm:.3} ({} pairs; control: {pfloor:.3}, {} pairs)",
        pairs("scraped").len(),
        pairs("control").len()
    );
    Ok(json!({
        "runs": rows,
        "median_p99_ratio": m,
        "control_median_p99_ratio": floor,
        "pair_median_p99_ratio": pm,
        "control_pair_median_p99_ratio": pfloor,
    }))
}

/// p99 of each scraped (odd) period over that of the quiet period just before it, for every
/// such pair in which both periods ran whole (at least `full` / 2 requests each).
fn pair_ratios(periods: &Value, full: u64) -> Vec<f64> {
    let by_index: BTreeMap<u64, (u64, f64)> = periods
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["index"].as_u64()?,
                        (p["requests"].as_u64()?, p["p99_us"].as_f64()?),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    by_index
        .iter()
        .filter(|(i, _)| *i % 2 == 1)
        .filter_map(|(i, &(n, p99))| {
            let &(quiet_n, quiet_p99) = by_index.get(&(i - 1))?;
            (n * 2 >= full && quiet_n * 2 >= full && quiet_p99 > 0.0).then(|| p99 / quiet_p99)
        })
        .collect()
}

/// One run of [`scrape_cost`]: L7 load with the scraper fetching in odd seconds, or only
/// waking (`scrape` false). Returns both halves' percentiles and their p99 ratio.
fn scrape_run(
    b: &Bench,
    app: &str,
    addr: &str,
    period: Duration,
    secs: u64,
    scrape: bool,
) -> Result<Value> {
    let stop = AtomicBool::new(false);
    let (out, scrapes) = std::thread::scope(|s| {
        let scraper = s.spawn(|| scrape_odd_periods(&b.c, period, &stop, scrape));
        let out = b.c.exec(
            "client",
            &[
                app,
                "load",
                "--addr",
                addr,
                "--rate",
                "1000",
                "--seconds",
                &secs.to_string(),
                "--connections",
                "8",
                "--split-ms",
                &period.as_millis().to_string(),
            ],
        );
        stop.store(true, Ordering::Relaxed);
        let scrapes = scraper
            .join()
            .map_err(|_| anyhow::anyhow!("scraper panicked"))?;
        Ok::<_, anyhow::Error>((out?, scrapes?))
    })?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("load output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if v["errors"].as_u64() != Some(0) {
        bail!("the L7 load saw errors while scraping: {v}");
    }
    let arm = |ph: usize, k: &str| v["split"][ph][k].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "scrapes": scrapes,
        // At 1000 requests/s a whole period holds one request per millisecond.
        "pair_p99_ratios": pair_ratios(&v["periods"], period.as_millis() as u64),
        "quiet": {"p50_us": arm(0, "p50_us"), "p99_us": arm(0, "p99_us"), "p999_us": arm(0, "p999_us"), "requests": arm(0, "requests")},
        "scraped": {"p50_us": arm(1, "p50_us"), "p99_us": arm(1, "p99_us"), "p999_us": arm(1, "p999_us"), "requests": arm(1, "requests")},
        "p99_ratio": arm(1, "p99_us") / arm(0, "p99_us"),
        "p50_ratio": arm(1, "p50_us") / arm(0, "p50_us"),
    }))
}

/// The figures per path, then each mesh path's ratios to direct and to the peer.
fn print_tables(run: &[usize], m: &[Vec<f64>], rounds: usize, secs: u64) {
    println!("\nmedians of {rounds} interleaved rounds, {secs}s per measurement");
    for group in [&FIGURES[..3], &FIGURES[3..9], &FIGURES[9..]] {
        let head: Vec<&str> = group.iter().map(|f| f.label).collect();
        println!("\n| path | {} |", head.join(" | "));
        println!("|---|{}", "---:|".repeat(group.len()));
        for &i in run {
            let cells: Vec<String> = group.iter().map(|f| fmt(m[i][fig_index(f.key)])).collect();
            println!("| {} | {} |", PATHS[i].name, cells.join(" | "));
        }
    }
    println!("\nratios (mesh / direct of the same locality, and mesh / the haproxy chain):");
    println!("| path | figure | mesh | direct | ÷ direct | haproxy | ÷ haproxy |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for &i in run.iter().filter(|&&i| PATHS[i].kind == Kind::Mesh) {
        for (f, fig) in FIGURES.iter().enumerate() {
            let v = m[i][f];
            if !v.is_finite() {
                continue;
            }
            let d = m[PATHS[i].direct][f];
            let (peer, ratio) = PATHS[i]
                .peer
                .map_or((f64::NAN, f64::NAN), |p| (m[p][f], v / m[p][f]));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                PATHS[i].name,
                fig.label,
                fmt(v),
                fmt(d),
                fmt(v / d),
                fmt(peer),
                fmt(ratio)
            );
        }
    }
}

fn print_targets(m: &[Vec<f64>]) {
    println!("\nthe performance issue's targets:");
    println!("| target | measured ratio | met |");
    println!("|---|---:|---|");
    for (label, a, against, key, bound, at_least) in TARGETS {
        let f = fig_index(key);
        let r = m[a][f] / m[against][f];
        let met = r.is_finite() && if at_least { r >= bound } else { r <= bound };
        println!(
            "| {label} | {} | {} |",
            fmt(r),
            if !r.is_finite() {
                "not measured"
            } else if met {
                "yes"
            } else {
                "no"
            }
        );
    }
}

/// Remote pods, services and endpoints in the Kubernetes scale figures (the issue's sizes).
const SCALE_PODS: usize = 10_000;
const SCALE_SERVICES: usize = 2_000;
const SCALE_ENDPOINTS_PER_SERVICE: usize = 10;

/// Kubernetes discovery at scale, on the stand-in API server: the agent's RSS and time to take
/// in 10,000 remote pods, 2,000 services and 20,000 endpoints, and the time one EndpointSlice
/// change takes to reach the proxy (a poller in a pod sees the service answer).
fn kube_scale() -> Result<Value> {
    eprintln!(
        "kube_scale: one node, a stand-in API server, then {SCALE_PODS} remote pods, {SCALE_SERVICES} services, {} endpoints",
        SCALE_SERVICES * SCALE_ENDPOINTS_PER_SERVICE
    );
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client"), PodSpec::mesh("server")]],
        vec![ServiceSpec::new("probe", 80, HTTP, &[])],
    )?;
    c.kubernetes()?;
    c.kubectl()?.run(
        &["label", "namespace", "default", "mesh.dev/enabled=true"],
        None,
    )?;
    c.serve("server", HTTP)?;
    c.start_agent(0)?;
    let stat = |c: &Cluster, k: &str| -> Result<u64> { Ok(c.stats(0)?[k].as_u64().unwrap_or(0)) };
    mesh_tests::wait_until(
        "the two pods to be enrolled",
        Duration::from_secs(15),
        || {
            Ok(c.stats(0)?["pods"]
                .as_object()
                .map_or(0, serde_json::Map::len)
                == 2)
        },
    )?;
    let pid = c.agent_pid(0).context("the agent's pid")?;
    std::thread::sleep(Duration::from_secs(1));
    let rss0 = proc_rss(pid).unwrap_or(0) as f64;

    let api = &c.kube()?.api;
    api.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "scale", "labels": {"mesh.dev/enabled": "true"}}}))?;
    let ip = |base: u8, i: usize| format!("10.{base}.{}.{}", i / 250, i % 250 + 1);
    let started = Instant::now();
    for i in 0..SCALE_PODS {
        api.create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": "scale", "uid": format!("00000000-0000-4000-9000-{i:012x}"),
                         "labels": {"app": format!("s{}", i % SCALE_SERVICES), "version": "v1"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("s{}-6d4cf56db6", i % SCALE_SERVICES), "uid": "x", "controller": true}]},
            "spec": {"nodeName": format!("remote-{}", i % 100), "serviceAccountName": format!("sa{}", i % 50), "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": ip(80, i)},
        }))?;
    }
    for j in 0..SCALE_SERVICES {
        api.create(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("s{j}"), "namespace": "scale"},
            "spec": {"clusterIP": ip(96, j), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?;
        let endpoints: Vec<Value> = (0..SCALE_ENDPOINTS_PER_SERVICE)
            .map(|e| json!({"addresses": [ip(80, (j * SCALE_ENDPOINTS_PER_SERVICE + e) % SCALE_PODS)], "conditions": {"ready": true}}))
            .collect();
        api.create(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("s{j}-1"), "namespace": "scale", "labels": {"kubernetes.io/service-name": format!("s{j}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": endpoints,
        }))?;
    }
    mesh_tests::wait_until(
        "the agent to take in the cluster",
        Duration::from_secs(120),
        || {
            Ok(stat(&c, "workloads")? >= (SCALE_PODS + 2) as u64
                && stat(&c, "services")? > SCALE_SERVICES as u64)
        },
    )?;
    let take_in = started.elapsed();
    // Past the agent's 10 s heap trim: the steady state, not the list's transient buffers.
    std::thread::sleep(Duration::from_secs(12));
    let rss1 = proc_rss(pid).unwrap_or(0) as f64;
    let kb_per_workload = (rss1 - rss0) / 1024.0 / SCALE_PODS as f64;

    // One endpoint change: `probe` has no endpoint; its slice gains the server.
    let vip = c.service_ip("probe");
    let slice = |with: bool| {
        let endpoints: Vec<Value> = if with {
            vec![
                json!({"addresses": [c.pod("server").ip.to_string()], "conditions": {"ready": true}}),
            ]
        } else {
            vec![]
        };
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "probe-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "probe"}},
            "addressType": "IPv4", "ports": [{"name": "main", "port": HTTP, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    };
    let mut change_ms = Vec::new();
    for _ in 0..5 {
        api.put(slice(false))?;
        mesh_tests::wait_until(
            "probe to lose its endpoint",
            Duration::from_secs(10),
            || Ok(c.http_status("client", &format!("http://{vip}/"))? != Some(200)),
        )?;
        let poll = format!(
            "until [ \"$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 1 http://{vip}/)\" = 200 ]; do :; done"
        );
        std::thread::scope(|s| -> Result<()> {
            let poller = s.spawn(|| c.exec("client", &["sh", "-c", &poll]));
            // Let the poller run before the change.
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            api.put(slice(true))?;
            let out = poller
                .join()
                .map_err(|_| anyhow::anyhow!("poller panicked"))??;
            anyhow::ensure!(out.status.success(), "the poller failed");
            change_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            Ok(())
        })?;
    }
    let median_change = median(&change_ms);
    println!(
        "\nKubernetes discovery at scale (stand-in API server; {SCALE_PODS} remote pods, {SCALE_SERVICES} services, {} endpoints):",
        SCALE_SERVICES * SCALE_ENDPOINTS_PER_SERVICE
    );
    println!("| figure | measured | target |");
    println!("|---|---:|---:|");
    println!("| agent RSS before, MB | {:.1} | |", rss0 / 1048576.0);
    println!("| agent RSS after, MB | {:.1} | |", rss1 / 1048576.0);
    println!("| KB per remote workload (all growth / pods) | {kb_per_workload:.2} | ≤ 2 |");
    println!(
        "| time to take it all in, s | {:.2} | |",
        take_in.as_secs_f64()
    );
    println!("| one endpoint change to the proxy, ms (median of 5) | {median_change:.0} | ≤ 100 |");
    Ok(json!({
        "rss_before_bytes": rss0, "rss_after_bytes": rss1, "kb_per_workload": kb_per_workload,
        "take_in_seconds": take_in.as_secs_f64(), "endpoint_change_ms": change_ms, "endpoint_change_ms_median": median_change,
    }))
}
