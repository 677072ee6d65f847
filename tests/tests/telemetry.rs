//! Telemetry end-to-end: known traffic through real agents, then `/metrics` scraped from both
//! nodes, parsed by the Prometheus project's own parser, and checked for exact counts.

use anyhow::Result;
use mesh_tests::{Cluster, PodSpec, ServiceSpec, metric_sum};

const APP_PORT: u16 = 8080;
const TD: &str = "spiffe://cluster.local/ns/default/sa";

/// node-1: client; node-2: server. `opaque` (`appProtocol: tcp`, L4) and `web` (L7) both lead
/// to server.
fn cluster() -> Result<Cluster> {
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
        vec![
            ServiceSpec::new("opaque", 80, APP_PORT, &["server"]).app_protocol("tcp"),
            ServiceSpec::new("web", 80, APP_PORT, &["server"]),
        ],
    )?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    Ok(c)
}

#[test]
fn tcp_metrics_count_connections_and_bytes_exactly_on_both_nodes() -> Result<()> {
    let c = cluster()?;
    let opaque = c.service_ip("opaque");
    // Five connections; curl reports exactly what it wrote and read on each.
    let (mut sent_up, mut answered) = (0u64, 0u64);
    for _ in 0..5 {
        let (_, out) = c.curl(
            "client",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_request} %{size_header} %{size_download}",
                &format!("http://{opaque}/bytes/3000"),
            ],
        )?;
        let f: Vec<u64> = out
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        assert_eq!((f.len(), f.first()), (4, Some(&200)), "{out}");
        sent_up += f[1];
        answered += f[2] + f[3];
    }
    let flow = |reporter: &'static str| {
        vec![
            ("reporter", reporter),
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "default"),
            ("request_protocol", "tcp"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let principals = [
        ("source_principal", format!("{TD}/client-sa")),
        ("destination_principal", format!("{TD}/server-sa")),
    ];
    // Connections close a moment after the client has its answer: wait for both reports.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (src, dst) = (c.scrape(0)?, c.scrape(1)?);
        let closed = |s: &[mesh_tests::Sample], r| {
            metric_sum(s, "istio_tcp_connections_closed_total", &flow(r))
        };
        if (closed(&src, "source") == 5.0 && closed(&dst, "destination") == 5.0)
            || std::time::Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for (i, reporter) in [(0, "source"), (1, "destination")] {
        let samples = c.scrape(i)?;
        let mut labels = flow(reporter);
        for (k, v) in &principals {
            labels.push((k, v));
        }
        if reporter == "source" {
            labels.push(("destination_service", "opaque.default.svc.cluster.local"));
        }
        let get = |name: &str| metric_sum(&samples, name, &labels);
        let figures = [
            get("istio_tcp_connections_opened_total"),
            get("istio_tcp_connections_closed_total"),
            get("istio_tcp_received_bytes_total"),
            get("istio_tcp_sent_bytes_total"),
        ];
        println!(
            "{reporter}: opened {}, closed {}, received {} (client sent {sent_up}), sent {} (client got {answered})",
            figures[0], figures[1], figures[2], figures[3]
        );
        assert_eq!(
            figures,
            [5.0, 5.0, sent_up as f64, answered as f64],
            "{reporter} report"
        );
        // Nothing is reported as plaintext, and no HTTP was parsed on this path.
        assert_eq!(
            metric_sum(
                &samples,
                "istio_tcp_connections_opened_total",
                &[("connection_security_policy", "none")]
            ),
            0.0
        );
        assert_eq!(metric_sum(&samples, "istio_requests_total", &[]), 0.0);
    }
    Ok(())
}

#[test]
fn http_metrics_count_requests_per_response_code() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    for (path, n) in [("/status/200", 3), ("/status/503", 2), ("/status/404", 1)] {
        for _ in 0..n {
            c.curl(
                "client",
                &["-o", "/dev/null", &format!("http://{web}{path}")],
            )?;
        }
    }
    let samples = c.scrape(0)?;
    let base = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let count = |code: &str| {
        let mut l = base.to_vec();
        l.push(("response_code", code));
        metric_sum(&samples, "istio_requests_total", &l)
    };
    println!(
        "requests by code: 200 {}, 503 {}, 404 {}",
        count("200"),
        count("503"),
        count("404")
    );
    assert_eq!([count("200"), count("503"), count("404")], [3.0, 2.0, 1.0]);
    // Every request has a duration and sizes; `/status/N` answers "as asked\n".
    assert_eq!(
        metric_sum(&samples, "istio_request_duration_milliseconds_count", &base),
        6.0
    );
    assert_eq!(
        metric_sum(&samples, "istio_response_bytes_sum", &base),
        6.0 * "as asked\n".len() as f64
    );
    Ok(())
}
