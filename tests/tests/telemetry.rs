//! Telemetry end-to-end: known traffic through real agents, then `/metrics` scraped from both
//! nodes, parsed by the Prometheus project's own parser, and checked for exact counts.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::{Cluster, PodSpec, Sample, ServiceSpec, bpf_event, metric_sum, wait_until};

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

#[test]
fn kernel_and_agent_health_families_count_what_happened() -> Result<()> {
    let c = cluster()?;
    let opaque = c.service_ip("opaque");
    let (before1, before2) = (c.scrape(0)?, c.scrape(1)?);
    for _ in 0..5 {
        c.curl(
            "client",
            &["-s", "-o", "/dev/null", &format!("http://{opaque}/")],
        )?;
    }
    // Loopback is never captured: the kernel passes it, with that reason.
    c.curl("client", &["-s", "-o", "/dev/null", "http://127.0.0.1:9/"])?;
    // A connection straight to the proxy's port was not captured, so the kernel recorded no
    // destination for it: the proxy counts the miss and refuses it.
    c.curl(
        "client",
        &["-s", "-o", "/dev/null", "http://127.0.0.1:15001/"],
    )?;
    let (after1, after2) = (c.scrape(0)?, c.scrape(1)?);
    let delta = |a: &[Sample], b: &[Sample], f: &dyn Fn(&[Sample]) -> f64| f(a) - f(b);
    let redirected = delta(&after1, &before1, &|s| {
        bpf_event(s, "connect4", "redirected", "-")
    });
    let loopback = delta(&after1, &before1, &|s| {
        bpf_event(s, "connect", "passed", "loopback")
    });
    let captured = delta(&after1, &before1, &|s| {
        metric_sum(s, "mesh_captured_connections_total", &[])
    });
    let misses = delta(&after1, &before1, &|s| {
        metric_sum(s, "mesh_orig_dst_misses_total", &[])
    });
    let rekeyed = delta(&after1, &before1, &|s| {
        bpf_event(s, "sock_ops", "rekeyed", "-")
    });
    println!(
        "node-1: redirected {redirected}, re-keyed {rekeyed}, passed (loopback) {loopback}, captured by the proxy {captured} ({misses} without a destination)"
    );
    assert_eq!(
        (redirected, rekeyed, loopback, captured, misses),
        (5.0, 5.0, 2.0, 6.0, 1.0)
    );
    // The server's node steered the tunnel; nothing was dropped.
    let hbone = delta(&after2, &before2, &|s| {
        bpf_event(s, "sk_lookup", "steered", "hbone")
    });
    let dropped = metric_sum(&after2, "mesh_bpf_events_total", &[("outcome", "dropped")]);
    println!("node-2: steered to 15008 {hbone}, dropped {dropped}");
    assert!(hbone >= 1.0, "{hbone}");
    assert_eq!(dropped, 0.0);
    for (i, samples) in [(0, &after1), (1, &after2)] {
        // One dual-stack pod per node: its two listeners in the sock hash under each of its
        // two addresses, both addresses in the stats map.
        let entries = |map: &str| metric_sum(samples, "mesh_bpf_map_entries", &[("map", map)]);
        assert_eq!(
            (entries("INBOUND_SOCKS"), entries("INBOUND_STATS")),
            (4.0, 2.0),
            "node {i}"
        );
        assert_eq!(
            metric_sum(samples, "mesh_bpf_map_capacity", &[("map", "ORIG_DST")]),
            65536.0
        );
        let pod = ["client", "server"][i];
        let expiry = metric_sum(
            samples,
            "mesh_certificate_expiry_timestamp_seconds",
            &[("identity", &format!("{TD}/{pod}-sa"))],
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64();
        // The harness's CA issues for an hour.
        assert!(
            expiry > now + 3000.0 && expiry <= now + 3600.0,
            "{expiry} vs {now}"
        );
        assert_eq!(metric_sum(samples, "mesh_ca_errors_total", &[]), 0.0);
        assert!(metric_sum(samples, "mesh_certificates_issued_total", &[]) >= 1.0);
        assert!(metric_sum(samples, "process_resident_memory_bytes", &[]) > 0.0);
        assert!(metric_sum(samples, "process_start_time_seconds", &[]) > 0.0);
    }
    Ok(())
}

/// The flow records of node `i` (`/debug/flows`), as JSON.
fn flows(c: &Cluster, i: usize) -> Result<Vec<serde_json::Value>> {
    let (code, body) = c.agent_get(i, "/debug/flows")?;
    if code != 200 {
        bail!("/debug/flows answered {code}: {body}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// Waits up to 5 s for node `i` to list a flow record that `matches`, and returns it.
fn wait_flow(
    c: &Cluster,
    i: usize,
    what: &str,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let mut found = None;
    wait_until(what, Duration::from_secs(5), || {
        found = flows(c, i)?.into_iter().find(|f| matches(f));
        Ok(found.is_some())
    })?;
    found.context("no such flow record")
}

/// Applies [`DENY_CLIENT`] on both nodes (as every node knows every policy in Kubernetes).
fn deny_client(c: &Cluster) -> Result<()> {
    for i in 0..2 {
        c.apply_yaml(
            i,
            DENY_CLIENT,
            "authorization_policies",
            &["default/no-client"],
        )?;
    }
    Ok(())
}

const DENY_CLIENT: &str = "authorizationPolicies:\n  - name: no-client\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    action: DENY\n    rules:\n      - from: [{source: {principals: [cluster.local/ns/default/sa/client-sa]}}]\n        to: [{operation: {ports: [\"8080\"]}}]\n";

#[test]
fn a_denied_flow_is_logged_listed_and_explained_with_its_policy() -> Result<()> {
    let c = cluster()?;
    let opaque = c.service_ip("opaque");
    // Both nodes know the policy (as every node does in Kubernetes); the server's node enforces.
    deny_client(&c)?;
    // Before sending anything, explain predicts the decision, on either node.
    let dst = format!("{opaque}:80");
    for i in 0..2 {
        let out = c.agent_cli(i, &["explain", "client", &dst, "-o", "json"])?;
        let e: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
        println!("explain on node {}: {}", i + 1, e["verdict"]);
        assert_eq!(e["verdict"], "deny", "{out}");
        assert_eq!(e["service"], "default/opaque");
        assert_eq!(e["mode"], "l4");
        assert_eq!(e["endpoints"][0]["workload"], "default/server");
        assert_eq!(
            e["endpoints"][0]["hop"],
            "hbone", // the source's hop: client and server are on different nodes
        );
        assert_eq!(
            e["endpoints"][0]["policies"],
            serde_json::json!(["default/no-client"])
        );
    }
    // The table names the policy too.
    let table = c.agent_cli(0, &["explain", "default/client", &dst])?;
    println!("{table}");
    assert!(
        table.contains("DENY") && table.contains("default/no-client"),
        "{table}"
    );
    // The connection is refused.
    let (code, _) = c.curl(
        "client",
        &["-s", "-o", "/dev/null", &format!("http://{opaque}/")],
    )?;
    assert_ne!(code, 0, "the denied connection went through");
    // The server's node: a record naming the policy, in /debug/flows and in the access log.
    let denied = wait_flow(&c, 1, "the denial's record", |f| {
        f["verdict"] == "deny" && f["src"]["workload"] == "client"
    })?;
    println!("node-2 record: {denied}");
    assert_eq!(denied["policies"], serde_json::json!(["default/no-client"]));
    assert_eq!(denied["dst"]["workload"], "server");
    assert_eq!(denied["src"]["principal"], format!("{TD}/client-sa"));
    assert_eq!(denied["security"], "mutual_tls");
    let line = c.wait_log_line(1, "the denial's access-log line", |l| {
        l.contains("verdict=deny") && l.contains("src=default/client")
    })?;
    println!("node-2 access log: {line}");
    assert!(line.contains("policy=default/no-client"), "{line}");
    // The client's node saw the tunnel refused and says so.
    let src_side = flows(&c, 0)?
        .into_iter()
        .find(|f| f["verdict"] == "deny")
        .context("no denial recorded on the client's node")?;
    assert_eq!(src_side["flags"], "RBAC");
    // `flows` prints the same records.
    let listed = c.agent_cli(1, &["flows", "--once", "--verdict", "deny"])?;
    println!("{listed}");
    assert!(listed.contains("default/no-client"), "{listed}");
    // After the policy is gone, explain and traffic agree again.
    for i in 0..2 {
        c.apply_yaml(i, "", "authorization_policies", &[])?;
    }
    let out = c.agent_cli(0, &["explain", "client", &dst, "-o", "json"])?;
    let e: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(e["verdict"], "allow", "{out}");
    let (code, _) = c.curl(
        "client",
        &["-s", "-o", "/dev/null", &format!("http://{opaque}/")],
    )?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn a_policy_change_closes_open_connections_and_each_records_who_it_was() -> Result<()> {
    let c = cluster()?;
    let opaque = c.service_ip("opaque");
    // One connection, opened and used while the policy allows it, then held open.
    let mut hold = c.hold_connection("client", &format!("{opaque}:80"))?;
    deny_client(&c)?;
    // The server's node closes it and files one record: a denial that names the policy
    // change, the source workload and the addresses (an address-less `unknown` source before).
    let closed = wait_flow(&c, 1, "the closed connection's record", |f| {
        f["verdict"] == "deny"
    })?;
    println!("node-2 record: {closed}");
    assert_eq!(closed["src"]["workload"], "client", "{closed}");
    assert_eq!(closed["policies"], serde_json::json!(["default/no-client"]));
    assert!(
        closed["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("closed after a policy change")),
        "{closed}"
    );
    assert!(closed["src"]["addr"].is_string(), "{closed}");
    let unknown: Vec<_> = flows(&c, 1)?
        .into_iter()
        .filter(|f| f["verdict"] == "deny" && f["src"]["workload"] == "unknown")
        .collect();
    assert!(unknown.is_empty(), "denials nothing explains: {unknown:?}");
    drop(hold.stdin.take());
    let _ = hold.wait();
    Ok(())
}

const ALLOW_PUBLIC: &str = "authorizationPolicies:\n  - name: public-only\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    rules:\n      - to: [{operation: {methods: [GET], paths: [/public/*]}}]\n";

#[test]
fn requests_carry_one_trace_id_through_both_nodes_and_l7_denials_name_the_policy() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    for i in 0..2 {
        c.apply_yaml(
            i,
            ALLOW_PUBLIC,
            "authorization_policies",
            &["default/public-only"],
        )?;
    }
    let url = |path: &str| format!("http://{web}{path}");
    // explain predicts per request.
    for (path, verdict) in [("/public/echo", "allow"), ("/private", "deny")] {
        let out = c.agent_cli(
            0,
            &[
                "explain",
                "client",
                &format!("{web}:80"),
                "--method",
                "GET",
                "--path",
                path,
                "-o",
                "json",
            ],
        )?;
        let e: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(
            (e["mode"].as_str(), e["verdict"].as_str()),
            (Some("l7"), Some(verdict)),
            "{out}"
        );
    }
    let header = |echo: &str, name: &str| -> String {
        echo.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_default()
            .to_string()
    };
    // A W3C context is kept end to end, and B3 is added beside it.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, echo) = c.curl(
        "client",
        &[
            "-s",
            "-H",
            &format!("traceparent: {tp}"),
            "-H",
            "tracestate: vendor=1",
            &url("/public/echo"),
        ],
    )?;
    assert_eq!(header(&echo, "traceparent"), tp, "{echo}");
    assert_eq!(header(&echo, "tracestate"), "vendor=1");
    assert_eq!(
        header(&echo, "x-b3-traceid"),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(header(&echo, "x-b3-spanid"), "00f067aa0ba902b7");
    assert_eq!(header(&echo, "x-b3-sampled"), "1");
    // B3 alone becomes a traceparent with the same (padded) trace id.
    let (_, echo) = c.curl(
        "client",
        &[
            "-s",
            "-H",
            "x-b3-traceid: 463ac35c9f6413ad",
            "-H",
            "x-b3-spanid: a2fb4a1d1a96d312",
            "-H",
            "x-b3-sampled: 1",
            &url("/public/echo"),
        ],
    )?;
    assert_eq!(
        header(&echo, "traceparent"),
        "00-0000000000000000463ac35c9f6413ad-a2fb4a1d1a96d312-01",
        "{echo}"
    );
    // No context: the client's node starts one; both nodes log its trace id.
    let (_, echo) = c.curl("client", &["-s", &url("/public/echo")])?;
    let made = header(&echo, "traceparent");
    let id = made.split('-').nth(1).unwrap_or_default().to_string();
    println!("created traceparent: {made}");
    assert!(
        made.starts_with("00-") && made.ends_with("-00") && id.len() == 32,
        "{echo}"
    );
    assert_eq!(header(&echo, "x-b3-traceid"), id);
    for i in 0..2 {
        let rec = wait_flow(&c, i, "the request's record", |f| {
            f["http"]["trace_id"] == id.as_str()
        })?;
        println!("node-{} record: {rec}", i + 1);
        assert_eq!(rec["http"]["path"], "/public/echo");
        assert_eq!(rec["http"]["code"], 200);
        assert_eq!(rec["reporter"], ["source", "destination"][i]);
        assert_eq!(rec["src"]["workload"], "client");
        assert_eq!(rec["dst"]["workload"], "server");
        c.wait_log_line(i, "the trace id in the access log", |l| {
            l.contains(&format!("trace_id={id}"))
        })?;
    }
    // A request the policy refuses: 403, and the server's node names the policy.
    let (_, code) = c.curl(
        "client",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url("/private"),
        ],
    )?;
    assert_eq!(code.trim(), "403");
    let rec = wait_flow(&c, 1, "the denial's record", |f| {
        f["http"]["path"] == "/private"
    })?;
    println!("node-2 record: {rec}");
    assert_eq!(rec["verdict"], "deny");
    assert_eq!(rec["http"]["code"], 403);
    assert_eq!(rec["policies"], serde_json::json!(["default/public-only"]));
    let line = c.wait_log_line(1, "the access-log line for /private", |l| {
        l.contains("path=/private")
    })?;
    assert!(
        line.contains("verdict=deny")
            && line.contains("code=403")
            && line.contains("policy=default/public-only"),
        "{line}"
    );
    Ok(())
}

#[test]
fn admin_commands_show_status_config_and_change_the_log_level() -> Result<()> {
    let c = cluster()?;
    let status = c.agent_cli(0, &["status"])?;
    println!("{status}");
    assert!(
        status.contains("default/client") && status.contains(&format!("{TD}/client-sa")),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&c.agent_cli(0, &["status", "-o", "json"])?)?;
    let pod = &json["pods"][0];
    assert_eq!(pod["name"], "default/client");
    assert!(
        pod["certificate"]["expires_in_secs"].as_i64().unwrap_or(0) > 3000,
        "{json}"
    );
    // config-dump: the state, certificates without keys, and the maps.
    let dump = c.agent_cli(0, &["config-dump", "-o", "json"])?;
    assert!(!dump.contains("PRIVATE KEY"), "a key in the dump");
    let d: serde_json::Value = serde_json::from_str(&dump)?;
    assert!(d["state"]["services"]["default/web"].is_object(), "{dump}");
    assert!(d["certificates"][format!("{TD}/client-sa")]["serial"].is_string());
    let maps = d["bpf"]["maps"].as_array().cloned().unwrap_or_default();
    assert!(
        maps.iter()
            // Two listeners under each address of the dual-stack pod.
            .any(|m| m["name"] == "INBOUND_SOCKS" && m["entries"] == 4),
        "{maps:?}"
    );
    let table = c.agent_cli(0, &["config-dump"])?;
    println!("{table}");
    assert!(
        table.contains("default/web") && table.contains("ORIG_DST"),
        "{table}"
    );
    // The log level changes at run time, and a bad filter is refused with the old one kept.
    let level = |c: &Cluster| c.agent_get(0, "/logging").map(|(_, b)| b);
    assert_eq!(level(&c)?.trim(), "log filter: info");
    let post = |filter: &str| c.set_log_filter(0, filter);
    let ok = post("debug")?;
    assert!(ok.ends_with(" 200"), "{ok}");
    assert_eq!(level(&c)?.trim(), "log filter: debug");
    let bad = post("mesh_agent=loud")?;
    assert!(bad.ends_with(" 400"), "{bad}");
    assert_eq!(level(&c)?.trim(), "log filter: debug");
    // Debug lines now appear: a request logs its path decisions at debug.
    c.curl(
        "client",
        &[
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{}/", c.service_ip("opaque")),
        ],
    )?;
    wait_until("a debug line", Duration::from_secs(5), || {
        Ok(c.agent_log(0).contains("DEBUG"))
    })?;
    Ok(())
}

/// Creates 500 pods, sends each one's traffic, deletes them, and checks that the series
/// count returns to where it was: departed workloads' series go after the retention period.
#[test]
fn metric_series_return_to_baseline_after_500_pods_come_and_go() -> Result<()> {
    const PODS: usize = 500;
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client"), PodSpec::mesh("server")]],
        vec![ServiceSpec::new("opaque", 80, APP_PORT, &["server"]).app_protocol("tcp")],
    )?;
    c.serve("server", APP_PORT)?;
    c.start_agent_with(0, &["--metrics-retention", "2s"])?;
    c.wait_ready(0, Duration::from_secs(10))?;
    let opaque = c.service_ip("opaque");
    let series = |c: &Cluster| -> Result<(usize, f64)> {
        let s = c.scrape(0)?;
        let istio = s.iter().filter(|x| x.name.starts_with("istio_")).count();
        let entries = metric_sum(&s, "mesh_bpf_map_entries", &[("map", "INBOUND_STATS")]);
        Ok((istio, entries))
    };
    // Baseline: the existing client's traffic.
    c.curl(
        "client",
        &["-s", "-o", "/dev/null", &format!("http://{opaque}/")],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let baseline = series(&c)?;
    let started = Instant::now();
    let names = c.add_loopback_pods(0, "load", PODS, "load-sa")?;
    c.write_node_file(0)?;
    wait_until("the agent to enroll them", Duration::from_secs(120), || {
        Ok(c.stats(0)?["pods"].as_object().map_or(0, |p| p.len()) == PODS + 2)
    })?;
    c.wait_ready(0, Duration::from_secs(60))?;
    let enrolled = started.elapsed();
    for name in &names {
        let (code, out) = c.curl(
            name,
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{opaque}/"),
            ],
        )?;
        assert_eq!((code, out.trim()), (0, "200"), "{name}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let peak = series(&c)?;
    println!("baseline {baseline:?}; with {PODS} pods (enrolled in {enrolled:?}) {peak:?}");
    // Every pod added its own series (4 TCP families, reported by both ends on one node).
    assert!(peak.0 >= baseline.0 + PODS * 8, "{peak:?}");
    assert_eq!(peak.1, baseline.1 + PODS as f64);
    c.unenroll(&names);
    c.write_node_file(0)?;
    let mut now = peak;
    wait_until(
        "the series to return to the baseline",
        Duration::from_secs(30),
        || {
            now = series(&c)?;
            Ok(now == baseline)
        },
    )
    .with_context(|| format!("still {now:?}, baseline {baseline:?}"))?;
    println!("after deleting them: {now:?}");
    Ok(())
}

/// Every metric the Grafana dashboard in deploy/ queries is one a running agent exports, so the
/// dashboard cannot drift from the code.
#[test]
fn the_dashboard_queries_only_metrics_the_agents_export() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana/mesh-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut wanted = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().context("no panels")? {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            for word in expr.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')) {
                if ["istio_", "mesh_", "process_"]
                    .iter()
                    .any(|p| word.starts_with(p))
                {
                    wanted.insert(word.to_string());
                }
            }
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");
    // Traffic of every kind, so every family has series: L4, L7 with an error, a denial.
    let c = cluster()?;
    c.curl(
        "client",
        &[
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{}/", c.service_ip("opaque")),
        ],
    )?;
    c.curl(
        "client",
        &[
            "-s",
            "-o",
            "/dev/null",
            &format!("http://{}/status/503", c.service_ip("web")),
        ],
    )?;
    let mut have = std::collections::BTreeSet::new();
    for i in 0..2 {
        for s in c.scrape(i)? {
            have.insert(s.name.clone());
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = s.name.strip_suffix(suffix) {
                    have.insert(base.to_string());
                }
            }
        }
    }
    let missing: Vec<&String> = wanted.iter().filter(|m| !have.contains(*m)).collect();
    println!(
        "dashboard queries {} metrics; missing from the agents: {missing:?}",
        wanted.len()
    );
    assert!(missing.is_empty(), "{missing:?}");
    Ok(())
}
