//! L7 end-to-end: real agents, real pods, real servers. HTTP from a mesh pod is proxied per
//! request by its node's agent; these tests drive routes, resilience and L7 policy through the
//! node file and count what the servers actually received.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_agent::discovery::nodefile::raw::{RawFile, route::RawRouteRule};
use mesh_tests::{
    Cluster, PodSpec, ServiceSpec, backend, destination_rule, route, rules, traffic_policy,
};

const APP_PORT: u16 = 8080;

/// node-1: client, client2 (mesh), bare (outside); node-2: server, server2, idle (mesh; idle
/// serves nothing). Services (port 80 → 8080): `web` over both servers, `v1` over server, `v2`
/// (which also allows the `mesh-echo` upgrade) and `opaque` (`appProtocol: tcp`) over server2,
/// `half` over server and idle.
fn cluster() -> Result<Cluster> {
    let svc = |name: &str, endpoints: &[&str]| ServiceSpec::new(name, 80, APP_PORT, endpoints);
    let mut c = Cluster::new(
        vec![
            vec![
                PodSpec::mesh("client"),
                PodSpec::mesh("client2"),
                PodSpec::bare("bare"),
            ],
            vec![
                PodSpec::mesh("server"),
                PodSpec::mesh("server2"),
                PodSpec::mesh("idle"),
            ],
        ],
        vec![
            svc("web", &["server", "server2"]),
            svc("v1", &["server"]),
            svc("v2", &["server2"]).allowed_upgrades(&["websocket", "mesh-echo"]),
            svc("opaque", &["server2"]).app_protocol("tcp"),
            svc("half", &["server", "idle"]),
        ],
    )?;
    c.serve("server", APP_PORT)?;
    c.serve("server2", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    Ok(c)
}

/// `n` requests from `pod`, a connection each, in turn or all at once; returns each answer's
/// status and `x-mesh-flags`.
fn hits(c: &Cluster, pod: &str, url: &str, n: usize, parallel: bool) -> Result<Vec<(u16, String)>> {
    let sep = if parallel { "&" } else { ";" };
    let script = format!(
        "for i in $(seq {n}); do curl -s -o /dev/null --max-time 10 -w '%{{http_code}} %header{{x-mesh-flags}}\\n' '{url}' {sep} done; wait"
    );
    let out = c.exec(pod, &["sh", "-c", &script])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<(u16, String)> = text
        .lines()
        .map(|l| {
            let (code, flags) = l.split_once(' ').unwrap_or((l, ""));
            (code.parse().unwrap_or(0), flags.trim().to_string())
        })
        .collect();
    if answers.len() != n {
        bail!("{} answers to {n} requests: {text}", answers.len());
    }
    Ok(answers)
}

/// Sends with `send` until the answer starts with `want` (a node-file change takes a moment).
fn wait_until_answer(send: impl Fn() -> Result<String>, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = send()?;
        if out.starts_with(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("still answered {:?}", out.lines().next().unwrap_or(""));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn count(answers: &[(u16, String)], status: u16) -> usize {
    answers.iter().filter(|(s, _)| *s == status).count()
}

#[test]
fn weighted_split_lands_within_three_points_of_90_10() -> Result<()> {
    let c = cluster()?;
    let vip = c.service_ip("web");
    c.apply(
        0,
        |f| {
            f.http_routes = vec![route(
                "canary",
                "web",
                rules("- backendRefs: [{name: v1, port: 80, weight: 90}, {name: v2, port: 80, weight: 10}]"),
            )]
        },
        "http_routes",
        &["default/canary"],
    )?;
    let out = c.testapp(
        "client",
        &[
            "load",
            "--addr",
            &format!("{vip}:80"),
            "--rate",
            "500",
            "--seconds",
            "2",
            "--connections",
            "4",
        ],
    )?;
    let r: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        (r["requests"].as_u64(), r["errors"].as_u64()),
        (Some(1000), Some(0)),
        "{r}"
    );
    let v1 = c.app_requests("server", APP_PORT)?;
    let v2 = c.app_requests("server2", APP_PORT)?;
    println!("90/10 split over 1000 requests: v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, 1000);
    assert!(
        (70..=130).contains(&v2),
        "v2 got {v2} of 1000, outside 10% ± 3%"
    );
    Ok(())
}

#[test]
fn retries_recover_a_flaky_backend_and_the_budget_caps_them() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    let v1 = c.service_ip("v1");
    c.apply(
        0,
        |f| {
            f.http_routes = vec![route(
                "retries",
                "web",
                rules(
                    "- matches: [{path: {type: PathPrefix, value: /flaky}}]\n  backendRefs: [{name: v1, port: 80}]\n  retry: {attempts: 2, codes: [503]}\n- matches: [{path: {type: PathPrefix, value: /status}}]\n  backendRefs: [{name: v2, port: 80}]\n  retry: {attempts: 3, codes: [503], backoff: 1ms}",
                ),
            )];
            f.destination_rules = vec![
                destination_rule("v1", "v1", traffic_policy("retryBudget: {percent: 100}")),
                destination_rule(
                    "v2",
                    "v2",
                    traffic_policy("retryBudget: {percent: 20, minRetriesPerSecond: 0}"),
                ),
            ];
        },
        "http_routes",
        &["default/retries"],
    )?;
    // Control: straight to v1 (no route, no retries), every other request fails.
    let plain = hits(&c, "client", &format!("http://{v1}/flaky"), 20, false)?;
    assert_eq!(count(&plain, 503), 10, "{plain:?}");
    let before = c.app_requests("server", APP_PORT)?;
    let retried = hits(&c, "client", &format!("http://{web}/flaky"), 40, false)?;
    assert_eq!(count(&retried, 200), 40, "{retried:?}");
    assert_eq!(
        c.app_requests("server", APP_PORT)? - before,
        80,
        "each request: a 503, then a retry that succeeds"
    );

    // Total failure: 3 retries each would be 400 tries; the budget allows 20% more than 100.
    let failing = hits(
        &c,
        "client",
        &format!("http://{web}/status/503"),
        100,
        false,
    )?;
    assert_eq!(count(&failing, 503), 100);
    assert!(failing.iter().all(|(_, f)| f == "URX"), "{failing:?}");
    let tries = c.app_requests("server2", APP_PORT)?;
    println!("total failure: 100 requests made {tries} tries (budget 20%)");
    assert!(
        (101..=125).contains(&tries),
        "{tries} tries: the budget must cap retries at about 20% of requests"
    );
    Ok(())
}

#[test]
fn request_timeout_fires_and_faults_delay_and_abort() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    c.apply(
        0,
        |f| {
            f.http_routes = vec![route(
                "faults",
                "web",
                rules(
                    "- matches: [{path: {type: PathPrefix, value: /delay}}]\n  backendRefs: [{name: v1, port: 80}]\n  timeouts: {request: 300ms}\n- matches: [{path: {type: Exact, value: /status/200}, headers: [{name: x-fault, value: abort}]}]\n  backendRefs: [{name: v1, port: 80}]\n  fault: {abort: {httpStatus: 418, percentage: 100}}\n- matches: [{path: {type: Exact, value: /status/200}, headers: [{name: x-fault, value: half}]}]\n  backendRefs: [{name: v1, port: 80}]\n  fault: {abort: {httpStatus: 503, percentage: 50}}\n- matches: [{path: {type: Exact, value: /status/200}, headers: [{name: x-fault, value: delay}]}]\n  backendRefs: [{name: v1, port: 80}]\n  fault: {delay: {fixedDelay: 400ms, percentage: 100}}",
                ),
            )]
        },
        "http_routes",
        &["default/faults"],
    )?;
    let curl_with = |fault: &str| {
        c.curl(
            "client",
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %header{x-mesh-flags} %{time_total}",
                "-H",
                &format!("x-fault: {fault}"),
                &format!("http://{web}/status/200"),
            ],
        )
    };
    // The abort is checked first, while nothing else is on its way to the app: the timed-out
    // request below can still reach the app after the client's answer, or never reach it if the
    // tunnel is still being set up when the timeout cancels it (both seen in the 6.1 guest).
    let served = c.app_requests("server", APP_PORT)?;
    let (_, abort) = curl_with("abort")?;
    assert!(abort.starts_with("418 FI"), "{abort}");
    assert_eq!(
        c.app_requests("server", APP_PORT)?,
        served,
        "an abort never reaches the app"
    );

    let started = Instant::now();
    let t = hits(&c, "client", &format!("http://{web}/delay/3000"), 1, false)?;
    let took = started.elapsed();
    assert_eq!(t, vec![(504, "UT".to_string())]);
    assert!(
        took < Duration::from_millis(2500),
        "timed out after {took:?}"
    );

    let (_, delayed) = curl_with("delay")?;
    let secs: f64 = delayed.split_whitespace().last().unwrap_or("0").parse()?;
    assert!(delayed.starts_with("200"), "{delayed}");
    assert!(secs >= 0.4, "delay fault took {secs} s");

    let script = format!(
        "for i in $(seq 100); do curl -s -o /dev/null -H 'x-fault: half' -w '%{{http_code}}\\n' http://{web}/status/200; done"
    );
    let out = c.exec("client", &["sh", "-c", &script])?;
    let aborted = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| *l == "503")
        .count();
    println!("50% abort: {aborted} of 100 aborted");
    assert!(
        (25..=75).contains(&aborted),
        "{aborted} of 100 aborted at 50%"
    );
    Ok(())
}

#[test]
fn failing_endpoint_is_ejected_and_returns_at_the_sweep_after_the_backoff() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    c.apply(
        0,
        |f| {
            f.destination_rules = vec![
                destination_rule("web", "web", traffic_policy("{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 1s, interval: 3s, maxEjectionPercent: 50}}")),
            ]
        },
        "destination_rules",
        &["default/web"],
    )?;
    let fail = |on: bool| -> Result<()> {
        let method = if on { "POST" } else { "DELETE" };
        let out = c.exec(
            "server2",
            &[
                "curl",
                "-sS",
                "-X",
                method,
                &format!("http://127.0.0.1:{APP_PORT}/control/fail"),
            ],
        )?;
        anyhow::ensure!(out.status.success(), "control request failed");
        Ok(())
    };
    fail(true)?;
    let answers = hits(&c, "client", &format!("http://{web}/"), 20, false)?;
    let to_failing = c.app_requests("server2", APP_PORT)?;
    assert_eq!(
        to_failing, 3,
        "three failures eject; no request after that: {answers:?}"
    );
    assert!(
        answers[10..].iter().all(|(s, _)| *s == 200),
        "after the ejection every request goes to the healthy endpoint: {answers:?}"
    );
    fail(false)?;
    // The ejection time (1 s) is up, but the endpoint returns at the first sweep (3 s).
    std::thread::sleep(Duration::from_millis(1500));
    hits(&c, "client", &format!("http://{web}/"), 6, false)?;
    assert_eq!(
        c.app_requests("server2", APP_PORT)?,
        to_failing,
        "returned before the sweep interval"
    );
    std::thread::sleep(Duration::from_millis(2000));
    let answers = hits(&c, "client", &format!("http://{web}/"), 10, false)?;
    assert_eq!(count(&answers, 200), 10);
    let back = c.app_requests("server2", APP_PORT)? - to_failing;
    assert!(
        back >= 4,
        "the endpoint must get traffic again after the backoff, got {back}"
    );
    Ok(())
}

#[test]
fn connect_timeout_turns_a_silent_endpoint_into_a_connect_failure() -> Result<()> {
    let c = cluster()?;
    let v1 = c.service_ip("v1");
    // client2's application listens and never accepts; with its one-place queue held full,
    // the kernel drops further SYNs, so a connect hangs rather than being refused.
    let script = format!(
        "import socket, time\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0', {APP_PORT})); s.listen(0)\nheld = socket.create_connection(('127.0.0.1', {APP_PORT}), timeout=2)\nprint('ready', flush=True)\ntime.sleep(120)\n"
    );
    let mut silent = c.spawn_piped("client2", &["/usr/bin/python3", "-c", &script])?;
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(silent.stdout.as_mut().context("stdout")?),
        &mut ready,
    )?;
    anyhow::ensure!(ready.trim() == "ready", "the silent listener did not start");
    let client2 = c.pod("client2").ip.to_string();
    c.apply(
        0,
        |f| {
            for s in &mut f.services {
                if s.name.as_deref() == Some("v1") {
                    s.endpoints = vec![client2.clone()];
                }
            }
            f.destination_rules = vec![destination_rule(
                "v1",
                "v1",
                traffic_policy("connectionPool: {tcp: {connectTimeout: 300ms}}"),
            )];
        },
        "destination_rules",
        &["default/v1"],
    )?;
    // The client waits up to 10 s; the proxy gives up after 300 ms and says why.
    let answers = hits(&c, "client", &format!("http://{v1}/"), 1, false)?;
    assert_eq!(answers, vec![(503, "UF".to_string())]);
    let _ = silent.kill();
    Ok(())
}

#[test]
fn circuit_breaker_and_rate_limit_refuse_past_their_limits() -> Result<()> {
    let c = cluster()?;
    let v1 = c.service_ip("v1");
    let v2 = c.service_ip("v2");
    c.apply(
        0,
        |f| {
            f.destination_rules = vec![
                destination_rule(
                    "v1",
                    "v1",
                    traffic_policy("{connectionPool: {http: {http2MaxRequests: 2}}}"),
                ),
                destination_rule(
                    "v2",
                    "v2",
                    traffic_policy("{localRateLimit: {requestsPerSecond: 2, burst: 5}}"),
                ),
            ]
        },
        "destination_rules",
        &["default/v1", "default/v2"],
    )?;
    let answers = hits(&c, "client", &format!("http://{v1}/delay/1500"), 10, true)?;
    println!("circuit breaker (2 in flight): {answers:?}");
    assert_eq!(count(&answers, 200), 2, "{answers:?}");
    assert_eq!(
        answers
            .iter()
            .filter(|(s, f)| *s == 503 && f == "UO")
            .count(),
        8,
        "{answers:?}"
    );
    assert_eq!(
        c.app_requests("server", APP_PORT)?,
        2,
        "overflowed requests never reach the app"
    );

    let answers = hits(&c, "client", &format!("http://{v2}/"), 20, false)?;
    let limited = answers
        .iter()
        .filter(|(s, f)| *s == 429 && f == "RL")
        .count();
    println!(
        "rate limit 2/s, burst 5: {} passed, {limited} limited",
        count(&answers, 200)
    );
    assert!((5..=9).contains(&count(&answers, 200)), "{answers:?}");
    assert_eq!(limited + count(&answers, 200), 20);
    Ok(())
}

#[test]
fn grpc_unary_and_streaming_cross_both_nodes() -> Result<()> {
    let c = cluster()?;
    let vip = c.service_ip("v2");
    let out = c.testapp(
        "client",
        &["grpc", "--addr", &format!("{vip}:80"), "--messages", "50"],
    )?;
    let r: serde_json::Value = serde_json::from_str(out.trim()).context("grpc output")?;
    assert_eq!(r["unary"], "ok");
    assert_eq!(r["stream_messages"], 50);
    assert_eq!(
        c.app_requests("server2", APP_PORT)?,
        2,
        "one unary call, one stream"
    );
    assert!(
        c.counter(0, "client", "outbound_http")? >= 1,
        "handled at L7"
    );
    assert!(
        c.counter(1, "server2", "hbone_streams")? >= 1,
        "crossed over HBONE"
    );
    // Both reporters give the calls' gRPC status (OK is 0), as Istio's dashboards read it.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let ok = mesh_tests::metric_sum(
            &c.scrape(node)?,
            "istio_requests_total",
            &[
                ("reporter", reporter),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "0"),
            ],
        );
        assert!(ok >= 2.0, "{reporter}: {ok} gRPC calls with status 0");
    }
    Ok(())
}

#[test]
fn routes_match_edit_headers_and_send_the_normalized_path() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    c.apply(
        0,
        |f| {
            f.http_routes = vec![route(
                "matches",
                "web",
                rules(
                    "- matches: [{path: {type: RegularExpression, value: \"/ec.o\"}, headers: [{name: x-canary, value: \"1\"}], method: GET, queryParams: [{name: v, value: \"2\"}]}]\n  backendRefs: [{name: v2, port: 80}]\n  filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: canary}], remove: [x-secret]}}\n    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-mesh-route, value: canary}]}}\n- matches: [{path: {type: PathPrefix, value: /echo}}]\n  backendRefs: [{name: v1, port: 80}]",
                ),
            )]
        },
        "http_routes",
        &["default/matches"],
    )?;
    let get = |args: &[&str]| -> Result<String> {
        let mut all = vec!["-i", "--path-as-is"];
        all.extend_from_slice(args);
        let (code, out) = c.curl("client", &all)?;
        anyhow::ensure!(code == 0, "curl failed: {out}");
        Ok(out.replace('\r', ""))
    };
    let canary = get(&[
        "-H",
        "x-canary: 1",
        "-H",
        "x-secret: s3cr3t",
        &format!("http://{web}/x/../echo?v=2"),
    ])?;
    assert!(canary.contains("x-served-by: server2"), "{canary}");
    assert!(canary.contains("x-mesh-route: canary"), "{canary}");
    assert!(
        canary.contains("\nGET /echo?v=2\n"),
        "the backend gets the normalized path: {canary}"
    );
    assert!(canary.contains("x-route: canary"), "{canary}");
    assert!(
        !canary.contains("s3cr3t"),
        "removed header reached the backend: {canary}"
    );
    // Hop-by-hop headers, and the ones `Connection` names, stop at the proxy.
    let hop = get(&[
        "-H",
        "Connection: x-hop",
        "-H",
        "x-hop: leak",
        "-H",
        "Keep-Alive: timeout=5",
        &format!("http://{web}/echo"),
    ])?;
    assert!(hop.contains("x-served-by: server\n"), "{hop}");
    assert!(
        !hop.contains("leak") && !hop.to_lowercase().contains("keep-alive: timeout"),
        "{hop}"
    );
    // Any part of the first match missing: the second rule.
    for args in [
        vec![format!("http://{web}/echo?v=2")],
        vec![
            "-H".into(),
            "x-canary: 1".into(),
            format!("http://{web}/echo?v=3"),
        ],
        vec![
            "-X".into(),
            "POST".into(),
            "-H".into(),
            "x-canary: 1".into(),
            format!("http://{web}/echo?v=2"),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = get(&args)?;
        assert!(out.contains("x-served-by: server\n"), "{args:?}: {out}");
        assert!(!out.contains("x-mesh-route"), "{out}");
    }
    // No rule matches: 404 from the proxy.
    let nr = hits(&c, "client", &format!("http://{web}/other"), 1, false)?;
    assert_eq!(nr, vec![(404, "NR".to_string())]);
    Ok(())
}

#[test]
fn rewrites_redirects_mirrors_and_hostnames_apply_as_gateway_api_says() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    let v1 = c.service_ip("v1");
    c.apply(
        0,
        |f| {
            // A parentRef without a port binds every port; a rule without backends sends to
            // the parent Service itself.
            let mut own = route(
                "own",
                "v1",
                rules("- matches: [{path: {type: Exact, value: /echo}}]\n  filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-mesh-route, value: own}]}}]"),
            );
            own.parent_refs[0].port = None;
            let mut r = route(
                "filters",
                "web",
                rules(
                    "- name: moved
  matches: [{path: {type: PathPrefix, value: /old}}]
  filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: new.shop.test, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]
- name: api
  matches: [{path: {type: PathPrefix, value: /api}}]
  filters:
    - {type: URLRewrite, urlRewrite: {hostname: backend.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /svc}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 80}}}
  backendRefs: [{name: v1, port: 80}]",
                ),
            );
            r.hostnames = vec!["web.shop.test".into(), "*.shop.example".into()];
            f.http_routes = vec![own, r];
        },
        "http_routes",
        &["default/own", "default/filters"],
    )?;
    let (_, own) = c.curl("client", &["-si", &format!("http://{v1}/echo")])?;
    assert!(
        own.contains("x-mesh-route: own") && own.contains("x-served-by: server"),
        "{own}"
    );
    let nr = hits(&c, "client", &format!("http://{v1}/other"), 1, false)?;
    assert_eq!(
        nr,
        vec![(404, "NR".to_string())],
        "the portless route is bound to port 80"
    );
    let get = |host: &str, path: &str| -> Result<String> {
        let url = format!("http://{web}{path}");
        let (code, out) = c.curl("client", &["-si", "-H", &format!("Host: {host}"), &url])?;
        anyhow::ensure!(code == 0, "curl failed: {out}");
        Ok(out.replace('\r', ""))
    };
    // A redirect is answered by the proxy: the matched prefix replaced, the query kept, and
    // https's own port left out.
    let moved = get("web.shop.test:80", "/old/page?q=1")?;
    assert!(moved.starts_with("HTTP/1.1 301"), "{moved}");
    assert!(
        moved.contains("\nlocation: https://new.shop.test/new/page?q=1\n"),
        "{moved}"
    );
    assert!(
        !moved.contains("x-served-by"),
        "a redirect reached a backend: {moved}"
    );
    // A rewrite: the backend gets the new host and path; the mirror gets a copy.
    let before = c.app_requests("server2", APP_PORT)?;
    let api = get("a.shop.example", "/api/echo?z=1")?;
    assert!(api.contains("x-served-by: server\n"), "{api}");
    assert!(api.contains("\nGET /svc/echo?z=1\n"), "{api}");
    assert!(api.contains("\nhost: backend.internal\n"), "{api}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.app_requests("server2", APP_PORT)? < before + 1 {
        anyhow::ensure!(Instant::now() < deadline, "the mirror never got its copy");
        std::thread::sleep(Duration::from_millis(50));
    }
    // explain names the rule and what it does.
    let explain = |path: &str| -> Result<serde_json::Value> {
        let dst = format!("{web}:80");
        let args = ["explain", "client", &dst, "--method", "GET", "--path", path];
        let out = c.agent_cli(
            0,
            &[&args[..], &["-H", "host: web.shop.test", "-o", "json"]].concat(),
        )?;
        Ok(serde_json::from_str(&out)?)
    };
    let e = explain("/old/x")?;
    assert_eq!(e["verdict"], "redirect", "{e}");
    assert!(e["steps"].to_string().contains("rule 0 (moved)"), "{e}");
    let e = explain("/api/echo")?;
    assert!(e["steps"].to_string().contains("rule 1 (api)"), "{e}");
    assert!(
        e["steps"].to_string().contains("copied to default/v2"),
        "{e}"
    );
    // Hosts the route does not name (the wildcard needs a label of its own): no route.
    for host in ["shop.example", "other.test", &web.to_string()] {
        let out = get(host, "/api/echo")?;
        assert!(out.starts_with("HTTP/1.1 404"), "{host}: {out}");
    }
    Ok(())
}

#[test]
fn target_refs_ip_blocks_and_hosts_decide_at_the_destination() -> Result<()> {
    let c = cluster()?;
    let (v1, v2) = (c.service_ip("v1"), c.service_ip("v2"));
    let client = c.pod("client").ip;
    // Attached to Service v1 (server's port 8080): only client's address, only for one host.
    c.apply_yaml(
        1,
        &format!(
            "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: v1-callers, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: \"\", name: v1}}]
  action: ALLOW
  rules:
  - from: [{{source: {{ipBlocks: [{client}/32]}}}}]
    to: [{{operation: {{hosts: [v1.default.svc.cluster.local]}}}}]
"
        ),
        "authorization_policies",
        &["default/v1-callers"],
    )?;
    let status = |pod: &str, ip: std::net::Ipv4Addr, host: &str| -> Result<String> {
        let (_, out) = c.curl(
            pod,
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                &format!("Host: {host}"),
                &format!("http://{ip}/echo"),
            ],
        )?;
        Ok(out)
    };
    let host = "v1.default.svc.cluster.local";
    assert_eq!(status("client", v1, &format!("{host}:80"))?, "200");
    assert_eq!(status("client2", v1, host)?, "403", "another pod's address");
    assert_eq!(
        status("client", v1, "other.example")?,
        "403",
        "another host"
    );
    // The policy targets v1 only: server2 behind v2 is not restricted.
    assert_eq!(status("client2", v2, "anything")?, "200");
    Ok(())
}

/// What does reach the server, and how: raw requests from a pod outside the mesh (the server's
/// node parses them, because an L7 policy selects the server) and from a mesh pod (its own node
/// parses them first), under the mesh-wide normalization options. What must never reach it is
/// the bad-input corpus (`tests/corpus/bad-input.yaml`, run by `tests/corpus.rs`).
#[test]
fn allowed_paths_reach_the_server_as_decided_under_each_normalization_mode() -> Result<()> {
    let c = cluster()?;
    let server = c.pod("server").ip;
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: no-admin\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    action: DENY\n    rules:\n      - to: [{operation: {paths: [/admin, /admin/*]}}]\n",
        "authorization_policies",
        &["default/no-admin"],
    )?;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: s\r\n\r\n");
    // Sends `bytes` raw from `from` to the server; returns the answer.
    let send = |from: &str, bytes: &str| -> Result<String> {
        let file = c.dir().join(format!("corpus-{from}.bin"));
        std::fs::write(&file, bytes)?;
        c.testapp(
            from,
            &[
                "raw",
                "--addr",
                &format!("{server}:{APP_PORT}"),
                "--input",
                &file.to_string_lossy(),
            ],
        )
    };
    for from in ["bare", "client"] {
        // Control: an allowed path does reach it, so the counts above could have moved.
        let before = c.app_requests("server", APP_PORT)?;
        let out = send(from, &get("/public"))?;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        assert_eq!(c.app_requests("server", APP_PORT)?, before + 1);
        // A path parameter is removed, and the server receives the path policy decided on.
        let out = send(from, &get("/x/../echo;jsessionid=0123?q=1"))?;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("\nGET /echo?q=1\n"), "the server saw: {out}");
        // Valid non-ASCII, percent-encoded, passes as sent.
        let out = send(from, &get("/caf%C3%A9/echo"))?;
        assert!(
            out.contains("\nGET /caf%C3%A9/echo\n"),
            "the server saw: {out}"
        );
        // Smuggling behind an upgrade the server declines: the upgrade request itself is
        // forwarded (the server decides), but the connection then closes, so the request hidden
        // behind it never reaches the server.
        let before = c.app_requests("server", APP_PORT)?;
        let out = send(
            from,
            "GET /x HTTP/1.1\r\nHost: s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nPOST /x HTTP/1.1\r\nHost: s\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        )?;
        assert!(
            out.starts_with("HTTP/1.1 404"),
            "upgrade from {from}: {out}"
        );
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "one answer: {out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
        assert_eq!(
            c.app_requests("server", APP_PORT)?,
            before + 1,
            "only the upgrade request from {from} reached the server"
        );
    }
    // The mesh-wide options, through the node file: case-sensitive DENY lets `/ADMIN` through
    // (the server answers 404 for it), and NONE forwards `//echo` as sent, where the default
    // merges the slashes.
    let out = send("bare", &get("//echo"))?;
    assert!(out.contains("\nGET /echo\n"), "merged by default: {out}");
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: no-admin\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    action: DENY\n    rules:\n      - to: [{operation: {paths: [/admin, /admin/*]}}]\nmeshConfig:\n  pathNormalization: {normalization: NONE}\n  caseInsensitiveDeny: false\n",
        "authorization_policies",
        &["default/no-admin"],
    )?;
    wait_until_answer(|| send("bare", &get("/ADMIN")), "HTTP/1.1 404")?;
    let out = send("bare", &get("//echo"))?;
    assert!(out.contains("\nGET //echo\n"), "NONE keeps the path: {out}");
    // Whatever the mode, invalid encodings are refused and the deny form still resolves dots.
    assert!(send("bare", &get("/%2561dmin"))?.starts_with("HTTP/1.1 400"));
    assert!(send("bare", &get("/x/../admin"))?.starts_with("HTTP/1.1 403"));
    let log = c.agent_log(1);
    assert!(log.contains("denied by DENY policy default/no-admin"));
    Ok(())
}

#[test]
fn l7_allow_policy_on_method_and_header() -> Result<()> {
    let c = cluster()?;
    let server = c.pod("server").ip;
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: blue-gets\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    rules:\n      - from: [{source: {principals: [cluster.local/ns/default/sa/client-sa]}}]\n        to: [{operation: {methods: [GET]}}]\n        when: [{key: \"request.headers[x-team]\", values: [blue]}]\n",
        "authorization_policies",
        &["default/blue-gets"],
    )?;
    let url = format!("http://{server}:{APP_PORT}/status/200");
    let status = |pod: &str, args: &[&str]| -> Result<String> {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        all.push(&url);
        Ok(c.curl(pod, &all)?.1)
    };
    assert_eq!(status("client", &["-H", "x-team: blue"])?, "200");
    assert_eq!(status("client", &["-H", "x-team: red"])?, "403");
    assert_eq!(
        status("client", &["-X", "POST", "-H", "x-team: blue"])?,
        "403"
    );
    assert_eq!(
        status("client2", &["-H", "x-team: blue"])?,
        "403",
        "other principal"
    );
    assert_eq!(c.app_requests("server", APP_PORT)?, 1);
    Ok(())
}

/// L7 over IPv6 on dual-stack pods, decided as over IPv4: an ALLOW policy on method, header and
/// principal for requests to the server's IPv6 address; `ipBlocks` that match a client's
/// IPv6 source, and its IPv4 source although the server's listener is dual-stack (which sees
/// IPv4 peers as ::ffff:a.b.c.d); and an HTTPRoute that sends a path on the service's IPv6
/// address to one backend.
#[test]
fn ipv6_requests_get_the_same_policy_and_routes() -> Result<()> {
    let c = cluster()?;
    let server6 = c.pod("server").ip6.context("dual-stack pod")?;
    let bare6 = c.pod("bare").ip6.context("dual-stack pod")?;
    let bare4 = c.pod("bare").ip;
    c.apply_yaml(
        1,
        &format!(
            "authorizationPolicies:\n  - name: blue-gets\n    namespace: default\n    selector: {{matchLabels: {{app: server}}}}\n    rules:\n      - from: [{{source: {{principals: [cluster.local/ns/default/sa/client-sa]}}}}]\n        to: [{{operation: {{methods: [GET]}}}}]\n        when: [{{key: \"request.headers[x-team]\", values: [blue]}}]\n      - from: [{{source: {{ipBlocks: [\"{bare6}/128\", \"{bare4}/32\"]}}}}]\n        to: [{{operation: {{paths: [/status/200]}}}}]\n"
        ),
        "authorization_policies",
        &["default/blue-gets"],
    )?;
    let status = |pod: &str, url: &str, args: &[&str]| -> Result<String> {
        let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend_from_slice(args);
        all.push(url);
        Ok(c.curl(pod, &all)?.1)
    };
    let url = format!("http://[{server6}]:{APP_PORT}/status/201");
    // The first request opens the first IPv6 HBONE connection between the nodes. In the
    // emulated 6.1 guest that answered 503 once (CI, cause not found yet: slow neighbour
    // discovery is a guess): it may be retried, and every later request must pass at once.
    let first = std::cell::RefCell::new(Vec::new());
    mesh_tests::wait_until(
        "the first request over IPv6",
        Duration::from_secs(10),
        || {
            let answer = status("client", &url, &["-H", "x-team: blue"])?;
            let done = answer != "503";
            first.borrow_mut().push(answer);
            Ok(done)
        },
    )?;
    let first = first.into_inner();
    println!("first IPv6 request answers: {first:?}");
    assert_eq!(first.last().map(String::as_str), Some("201"), "{first:?}");
    assert_eq!(status("client", &url, &["-H", "x-team: blue"])?, "201");
    assert_eq!(status("client", &url, &["-H", "x-team: red"])?, "403");
    assert_eq!(status("client2", &url, &["-H", "x-team: blue"])?, "403");
    // The pod outside the mesh is allowed by its addresses, and only on the path they allow.
    for server in [server6.to_string(), format!("{}", c.pod("server").ip)] {
        let host = if server.contains(':') {
            format!("[{server}]")
        } else {
            server
        };
        let ok = format!("http://{host}:{APP_PORT}/status/200");
        let other = format!("http://{host}:{APP_PORT}/status/202");
        assert_eq!(status("bare", &ok, &[])?, "200", "{ok}");
        assert_eq!(status("bare", &other, &[])?, "403", "{other}");
    }

    c.apply(
        0,
        |f| {
            f.http_routes = vec![route(
                "only-v1",
                "web",
                rules("- matches: [{path: {type: Exact, value: /status/204}}]\n  backendRefs: [{name: v1, port: 80}]"),
            )]
        },
        "http_routes",
        &["default/only-v1"],
    )?;
    let before = (
        c.app_requests("server", APP_PORT)?,
        c.app_requests("server2", APP_PORT)?,
    );
    let vip6 = c.service_ip6("web");
    // explain answers for the IPv6 address as the proxy routes it: the rule, and v1's pod
    // dialled at its IPv6 address, where node 2's policy admits the client.
    let dst6 = format!("[{vip6}]:80");
    let explain6 = |node: usize, team: &str| -> Result<serde_json::Value> {
        let header = format!("x-team: {team}");
        let args = [
            "explain",
            "client",
            &dst6,
            "--path",
            "/status/204",
            "-H",
            &header,
        ];
        let out = c.agent_cli(node, &[&args[..], &["-o", "json"]].concat())?;
        serde_json::from_str(&out).with_context(|| out.clone())
    };
    let e = explain6(0, "blue")?;
    println!("explain {dst6}: {e}");
    assert_eq!(
        (
            e["mode"].as_str(),
            e["route"].as_str(),
            e["verdict"].as_str()
        ),
        (Some("l7"), Some("default/only-v1#0"), Some("allow")),
        "{e}"
    );
    assert_eq!(
        e["endpoints"][0]["addr"],
        format!("[{server6}]:{APP_PORT}"),
        "{e}"
    );
    // Node 2 holds the policy (not the route, which only node 1 has): it names the policy for
    // the server's IPv6 address, and lets server2 (which the policy does not select) answer.
    let e = explain6(1, "red")?;
    assert_eq!(e["verdict"], "partial", "{e}");
    let at = |w: &str| {
        e["endpoints"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["workload"] == w))
            .cloned()
            .unwrap_or_default()
    };
    let (refused, other) = (at("default/server"), at("default/server2"));
    assert_eq!(refused["addr"], format!("[{server6}]:{APP_PORT}"), "{e}");
    assert_eq!(refused["decision"], "deny", "{e}");
    assert_eq!(
        refused["policies"],
        serde_json::json!(["default/blue-gets"])
    );
    assert_eq!(other["decision"], "allow", "{e}");
    for _ in 0..6 {
        let url = format!("http://[{vip6}]:80/status/204");
        assert_eq!(
            status("client", &url, &["-H", "x-team: blue"])?,
            "204",
            "{url}"
        );
    }
    assert_eq!(
        (
            c.app_requests("server", APP_PORT)? - before.0,
            c.app_requests("server2", APP_PORT)? - before.1
        ),
        (6, 0),
        "the route sent every request to v1 (server)"
    );
    Ok(())
}

/// Runs the attacker client `attack` from `client` against `v2` while `client2` sends 600
/// requests at 200/s; returns the attacker's report after checking that the load saw no error.
fn attack_under_load(c: &Cluster, attack: &[&str]) -> Result<serde_json::Value> {
    let addr = format!("{}:80", c.service_ip("v2"));
    let (attack, load) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            c.testapp(
                "client2",
                &[
                    "load",
                    "--addr",
                    &addr,
                    "--rate",
                    "200",
                    "--seconds",
                    "3",
                    "--connections",
                    "2",
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        let mut args = attack.to_vec();
        args.extend(["--addr", &addr]);
        (c.testapp("client", &args), load.join())
    });
    let load = load.map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    let load: serde_json::Value = serde_json::from_str(load.trim())?;
    assert_eq!(
        (load["requests"].as_u64(), load["errors"].as_u64()),
        (Some(600), Some(0)),
        "{load}"
    );
    Ok(serde_json::from_str(attack?.trim())?)
}

#[test]
fn http2_rapid_reset_gets_goaway_while_others_keep_working() -> Result<()> {
    let c = cluster()?;
    let attack = attack_under_load(&c, &["rapid-reset", "--streams", "20000"])?;
    println!("rapid reset: {attack}");
    assert_eq!(attack["goaway"], true, "{attack}");
    assert_eq!(attack["error_code"], 11, "ENHANCE_YOUR_CALM: {attack}");
    Ok(())
}

#[test]
fn http2_continuation_flood_is_cut_off_while_others_keep_working() -> Result<()> {
    let c = cluster()?;
    let before = c.app_requests("server2", APP_PORT)?;
    // 10,000 frames of 16 KiB: 160 MiB of a header block that never ends.
    let attack = attack_under_load(&c, &["continuation-flood", "--frames", "10000"])?;
    println!("CONTINUATION flood: {attack}");
    let sent = attack["sent_frames"].as_u64().unwrap_or(u64::MAX);
    assert!(
        sent < 10_000,
        "the proxy kept reading the header block: {attack}"
    );
    assert_eq!(attack["goaway"], true, "{attack}");
    assert_eq!(
        c.app_requests("server2", APP_PORT)?,
        before + 600,
        "only the load's requests reached the server"
    );
    Ok(())
}

#[test]
fn app_protocol_tcp_is_relayed_at_l4_without_detection() -> Result<()> {
    let c = cluster()?;
    let opaque = hits(
        &c,
        "client",
        &format!("http://{}/", c.service_ip("opaque")),
        3,
        false,
    )?;
    assert_eq!(count(&opaque, 200), 3);
    assert_eq!(
        c.counter(0, "client", "outbound_http")?,
        0,
        "no HTTP handling"
    );
    assert_eq!(
        c.counter(1, "server2", "hbone_streams")?,
        3,
        "a stream per connection"
    );
    let http = hits(
        &c,
        "client",
        &format!("http://{}/", c.service_ip("v2")),
        1,
        false,
    )?;
    assert_eq!(count(&http, 200), 1);
    assert_eq!(
        c.counter(0, "client", "outbound_http")?,
        1,
        "detected as HTTP"
    );
    Ok(())
}

#[test]
fn retries_on_reset_and_connect_failure_and_the_per_try_timeout() -> Result<()> {
    let c = cluster()?;
    let (v1, v2, half) = (c.service_ip("v1"), c.service_ip("v2"), c.service_ip("half"));
    // Controls, with no route: `/flaky-reset` drops every other connection unanswered, and
    // round robin over `half` sends every other request to `idle`, where nothing listens.
    c.apply(
        0,
        |f| {
            f.destination_rules = vec![destination_rule(
                "half",
                "half",
                traffic_policy("{loadBalancer: {simple: ROUND_ROBIN}}"),
            )]
        },
        "destination_rules",
        &["default/half"],
    )?;
    let reset = hits(&c, "client", &format!("http://{v1}/flaky-reset"), 10, false)?;
    assert_eq!(count(&reset, 503), 5, "{reset:?}");
    assert!(
        reset.iter().all(|(s, f)| *s == 200 || f == "UC"),
        "{reset:?}"
    );
    let refused = hits(
        &c,
        "client",
        &format!("http://{half}/status/200"),
        10,
        false,
    )?;
    assert_eq!(count(&refused, 503), 5, "{refused:?}");
    assert!(
        refused.iter().all(|(s, f)| *s == 200 || f == "UF"),
        "{refused:?}"
    );
    let served = c.app_requests("server", APP_PORT)?;

    c.apply(
        0,
        |f| {
            f.http_routes = vec![
                route(
                    "on-reset",
                    "v1",
                    rules("- retry: {attempts: 1, on: [reset]}"),
                ),
                route(
                    "on-connect-failure",
                    "half",
                    rules("- retry: {attempts: 1, on: [connect-failure]}"),
                ),
                route(
                    "per-try",
                    "v2",
                    rules("- timeouts: {backendRequest: 200ms}"),
                ),
            ];
            f.destination_rules = vec![
                destination_rule("v1", "v1", traffic_policy("retryBudget: {percent: 100}")),
                destination_rule(
                    "half",
                    "half",
                    traffic_policy(
                        "{retryBudget: {percent: 100}, loadBalancer: {simple: ROUND_ROBIN}}",
                    ),
                ),
            ];
        },
        "http_routes",
        &[
            "default/on-connect-failure",
            "default/on-reset",
            "default/per-try",
        ],
    )?;
    let reset = hits(&c, "client", &format!("http://{v1}/flaky-reset"), 10, false)?;
    assert_eq!(count(&reset, 200), 10, "retried on reset: {reset:?}");
    let refused = hits(
        &c,
        "client",
        &format!("http://{half}/status/200"),
        10,
        false,
    )?;
    assert_eq!(
        count(&refused, 200),
        10,
        "retried on connect failure: {refused:?}"
    );
    // Every reset request was tried twice; every `half` request reached `server` once.
    assert_eq!(c.app_requests("server", APP_PORT)?, served + 20 + 10);

    let t = Instant::now();
    let slow = hits(&c, "client", &format!("http://{v2}/delay/3000"), 1, false)?;
    let took = t.elapsed();
    println!("per-try timeout of 200ms on a 3 s answer: {slow:?} after {took:?}");
    assert_eq!(slow, vec![(504, "UT".to_string())]);
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    Ok(())
}

#[test]
fn connection_limit_queues_pending_requests_then_overflows() -> Result<()> {
    let c = cluster()?;
    let v2 = c.service_ip("v2");
    c.apply(
        0,
        |f| {
            f.destination_rules = vec![
                destination_rule("v2", "v2", traffic_policy("{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}")),
            ]
        },
        "destination_rules",
        &["default/v2"],
    )?;
    // Four parallel 600 ms requests: one on the only connection, one waiting for it (it frees
    // after 600 ms, within the 1 s a request may wait), two overflowing at once.
    let answers = hits(&c, "client", &format!("http://{v2}/delay/600"), 4, true)?;
    println!("maxConnections 1, 1 pending, 4 parallel: {answers:?}");
    assert_eq!(count(&answers, 200), 2, "{answers:?}");
    assert_eq!(
        answers
            .iter()
            .filter(|(s, f)| *s == 503 && f == "UO")
            .count(),
        2,
        "{answers:?}"
    );
    assert_eq!(c.app_requests("server2", APP_PORT)?, 2);
    Ok(())
}

#[test]
fn rate_limit_per_source_keeps_one_client_from_starving_another() -> Result<()> {
    let c = cluster()?;
    let v1 = c.service_ip("v1");
    let url = format!("http://{v1}/status/200");
    // Each version has its own name, so `apply` can tell when the agent has it.
    let limit = |name: &str, per_source: bool| {
        let mut policy = traffic_policy("localRateLimit: {requestsPerSecond: 1, burst: 3}");
        if let Some(l) = policy.local_rate_limit.as_mut() {
            l.per_source = per_source;
        }
        let rule = destination_rule(name, "v1", policy);
        move |f: &mut RawFile| f.destination_rules = vec![rule]
    };
    // Control: one bucket for the service, so client2 finds it drained by client.
    c.apply(
        0,
        limit("shared", false),
        "destination_rules",
        &["default/shared"],
    )?;
    // (The bucket refills one a second; these requests take well under one.)
    let a = hits(&c, "client", &url, 6, false)?;
    let b = hits(&c, "client2", &url, 3, false)?;
    assert!((3..=4).contains(&count(&a, 200)), "{a:?}");
    assert!(count(&b, 429) >= 2, "shared bucket: {b:?}");
    // Per source: each client identity has its own bucket.
    c.apply(
        0,
        limit("per-source", true),
        "destination_rules",
        &["default/per-source"],
    )?;
    let a = hits(&c, "client", &url, 6, false)?;
    let b = hits(&c, "client2", &url, 3, false)?;
    assert!((3..=4).contains(&count(&a, 200)), "{a:?}");
    assert_eq!(count(&b, 200), 3, "own bucket: {b:?}");
    Ok(())
}

#[test]
fn a_route_change_applies_to_a_live_keep_alive_connection() -> Result<()> {
    let c = cluster()?;
    let web = c.service_ip("web");
    // Each version has its own name, so `apply` can tell when the agent has it.
    let to = |to: &str| {
        let rule = RawRouteRule {
            backend_refs: vec![backend(to)],
            ..Default::default()
        };
        let r = route(&format!("to-{to}"), "web", vec![rule]);
        move |f: &mut RawFile| f.http_routes = vec![r]
    };
    c.apply(0, to("v1"), "http_routes", &["default/to-v1"])?;
    let captured = c.counter(0, "client", "kernel.captured_v4")?;
    // 150 requests over one keep-alive connection; the route moves to v2 a second in.
    let load = std::thread::scope(|s| -> Result<String> {
        let load = s.spawn(|| {
            c.testapp(
                "client",
                &[
                    "load",
                    "--addr",
                    &format!("{web}:80"),
                    "--rate",
                    "50",
                    "--seconds",
                    "3",
                    "--connections",
                    "1",
                ],
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        c.apply(0, to("v2"), "http_routes", &["default/to-v2"])?;
        load.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    })?;
    let load: serde_json::Value = serde_json::from_str(load.trim())?;
    let (v1, v2) = (
        c.app_requests("server", APP_PORT)?,
        c.app_requests("server2", APP_PORT)?,
    );
    println!("route change mid-connection: {load}, v1 {v1}, v2 {v2}");
    assert_eq!(
        (load["requests"].as_u64(), load["errors"].as_u64()),
        (Some(150), Some(0)),
        "{load}"
    );
    assert_eq!(v1 + v2, 150);
    assert!(v1 >= 20 && v2 >= 20, "both routes served: v1 {v1}, v2 {v2}");
    assert_eq!(
        c.counter(0, "client", "kernel.captured_v4")? - captured,
        1,
        "one client connection throughout"
    );
    Ok(())
}

#[test]
fn protocol_upgrades_are_forwarded_and_joined() -> Result<()> {
    let c = cluster()?;
    let (v1, v2) = (c.service_ip("v1"), c.service_ip("v2"));
    // An L7 policy on the server makes its node parse HTTP too: the upgrade crosses two L7 hops.
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: upgrades\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    rules:\n      - to: [{operation: {methods: [GET], paths: [/upgrade]}}]\n",
        "authorization_policies",
        &["default/upgrades"],
    )?;
    let run = |pod: &str, addr: std::net::Ipv4Addr, protocol: &str| -> Result<serde_json::Value> {
        let out = c.testapp(
            pod,
            &[
                "upgrade",
                "--addr",
                &format!("{addr}:80"),
                "--messages",
                "50",
                "--protocol",
                protocol,
            ],
        )?;
        Ok(serde_json::from_str(out.trim())?)
    };
    // WebSocket is allowed by default.
    let up = run("client", v1, "websocket")?;
    println!("websocket through L7 on both nodes: {up}");
    assert_eq!(
        (up["status"].as_u64(), up["echoed"].as_u64()),
        (Some(101), Some(50)),
        "{up}"
    );
    assert!(
        up["head"]
            .as_str()
            .is_some_and(|h| h.to_ascii_lowercase().contains("upgrade: websocket")),
        "{up}"
    );
    assert!(
        c.counter(0, "client", "http_requests")? >= 1,
        "the client's node handled it at L7"
    );
    // Another token is removed unless the service allows it: the server never saw the Upgrade
    // (it answers 426 to a plain GET /upgrade), and the connection closed after the answer.
    let other = run("client", v1, "mesh-echo")?;
    assert_eq!(other["status"].as_u64(), Some(426), "{other}");
    let allowed = run("client", v2, "mesh-echo")?;
    assert_eq!(
        (allowed["status"].as_u64(), allowed["echoed"].as_u64()),
        (Some(101), Some(50)),
        "v2 allows mesh-echo: {allowed}"
    );
    // A principal the policy does not know is still refused before any switch.
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: client2-upgrades\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    rules:\n      - from: [{source: {principals: [cluster.local/ns/default/sa/client2-sa]}}]\n        to: [{operation: {methods: [GET], paths: [/upgrade]}}]\n",
        "authorization_policies",
        &["default/client2-upgrades"],
    )?;
    let denied = run("client", v1, "websocket")?;
    assert_eq!(denied["status"].as_u64(), Some(403), "{denied}");
    assert_eq!(
        run("client2", v1, "websocket")?["echoed"].as_u64(),
        Some(50)
    );
    Ok(())
}

/// The h2c smuggling bypass: the server really switches to HTTP/2 on `Upgrade: h2c` (as Go's h2c
/// handler, Jetty and Tomcat do), so a forwarded upgrade would turn the connection into a tunnel
/// where `GET /admin` reaches it past the DENY. The proxy removes the token: the server answers
/// the upgrade request as plain HTTP/1.1, having seen no `Upgrade`, and nothing is tunnelled.
#[test]
fn h2c_upgrade_cannot_open_a_tunnel_past_policy() -> Result<()> {
    let c = cluster()?;
    let server = c.pod("server").ip;
    let v1 = c.service_ip("v1");
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: no-admin\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    action: DENY\n    rules:\n      - to: [{operation: {paths: [/admin, /admin/*]}}]\n",
        "authorization_policies",
        &["default/no-admin"],
    )?;
    // The same policy answers a direct GET /admin with 403.
    let direct = c.exec(
        "client",
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{server}:{APP_PORT}/admin"),
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&direct.stdout), "403");
    // From a mesh pod (its node and the server's both parse HTTP) and from outside the mesh (the
    // server's node parses it), to the pod and to the service.
    for (from, addr) in [
        ("client", format!("{server}:{APP_PORT}")),
        ("client", format!("{v1}:80")),
        ("bare", format!("{server}:{APP_PORT}")),
    ] {
        let before = c.app_requests("server", APP_PORT)?;
        let out = c.testapp(from, &["h2c-upgrade", "--addr", &addr, "--path", "/admin"])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        println!("h2c from {from} to {addr}: {v}");
        assert_eq!(v["status"].as_u64(), Some(200), "no switch: {v}");
        assert!(v["tunnelled"].is_null(), "nothing tunnelled: {v}");
        let seen = v["body"].as_str().unwrap_or_default().to_ascii_lowercase();
        assert!(seen.starts_with("get /echo"), "{v}");
        assert!(
            !seen.contains("upgrade") && !seen.contains("http2-settings"),
            "the server saw no upgrade: {seen}"
        );
        assert!(
            v["head"]
                .as_str()
                .is_some_and(|h| h.to_ascii_lowercase().contains("connection: close")),
            "{v}"
        );
        assert_eq!(
            c.app_requests("server", APP_PORT)?,
            before + 1,
            "only the upgrade request itself reached the server"
        );
    }
    Ok(())
}

/// A connection that policy refuses never reaches the application, not even as an empty
/// accept: a pod decided per request is dialled only once something is allowed. Counted with
/// the kernel's passive opens in the server pod's netns: each accepted connection there is one
/// (the proxy's 15006 listener takes the client's, the application the proxy's own).
#[test]
fn a_refused_connection_never_reaches_the_application() -> Result<()> {
    let c = cluster()?;
    let server = c.pod("server").ip;
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: no-admin\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    action: DENY\n    rules:\n      - to: [{operation: {paths: [/admin]}}]\n",
        "authorization_policies",
        &["default/no-admin"],
    )?;
    let passive_opens = || -> Result<u64> {
        let out = c.exec("server", &["cat", "/proc/net/snmp"])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (
            tcp.next().context("Tcp header")?,
            tcp.next().context("Tcp values")?,
        );
        let at = names
            .split_whitespace()
            .position(|n| n == "PassiveOpens")
            .context("PassiveOpens")?;
        Ok(values
            .split_whitespace()
            .nth(at)
            .context("value")?
            .parse()?)
    };
    let send = |bytes: &[u8]| -> Result<String> {
        let file = c.dir().join("refused.bin");
        std::fs::write(&file, bytes)?;
        c.testapp(
            "bare",
            &[
                "raw",
                "--addr",
                &format!("{server}:{APP_PORT}"),
                "--input",
                &file.to_string_lossy(),
            ],
        )
    };
    // Not HTTP: the DENY's path rule fails closed, and the application is never dialled.
    let before = passive_opens()?;
    let out = send(b"\x00\x01\x02 not http\n")?;
    assert!(out.trim().is_empty(), "{out}");
    assert_eq!(
        passive_opens()? - before,
        1,
        "only the proxy's listener accepted"
    );
    // A denied request: 403, and the application was not dialled for it.
    let before = passive_opens()?;
    let out = send(b"GET /admin HTTP/1.1\r\nHost: s\r\n\r\n")?;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(
        passive_opens()? - before,
        1,
        "only the proxy's listener accepted"
    );
    // Control: an allowed request dials the application (a second accept).
    let before = passive_opens()?;
    let out = send(b"GET /public HTTP/1.1\r\nHost: s\r\n\r\n")?;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert_eq!(
        passive_opens()? - before,
        2,
        "the listener and the application accepted"
    );
    Ok(())
}

/// The agent's resident memory, from /proc.
/// HTTP/2 abuse at the client's node: a client that never opens its window asks for 1,000
/// responses of 1 MiB, and what it costs while it holds and after it leaves.
#[test]
fn http2_slow_reader_is_bounded_while_it_holds_and_after() -> Result<()> {
    let c = cluster()?;
    let addr = format!("{}:{APP_PORT}", c.pod("server").ip);
    // A slow reader: what it costs while it holds, and after it leaves.
    let before = c.agent_rss_kb(0)?;
    let during = std::thread::scope(|s| -> Result<(serde_json::Value, u64)> {
        let attack = s.spawn(|| {
            c.testapp(
                "client",
                &[
                    "zero-window",
                    "--addr",
                    &addr,
                    "--requests",
                    "1000",
                    "--hold-ms",
                    "4000",
                ],
            )
        });
        // The peak while the client holds: sampled until it leaves, so a slow machine that
        // answers late is still measured while the responses are held.
        let mut during = 0;
        while !attack.is_finished() {
            during = during.max(c.agent_rss_kb(0)?);
            std::thread::sleep(Duration::from_millis(250));
        }
        let out = attack
            .join()
            .map_err(|_| anyhow::anyhow!("attack thread"))??;
        Ok((serde_json::from_str(out.trim())?, during))
    })?;
    let (zero, during) = during;
    std::thread::sleep(Duration::from_secs(12));
    let after = c.agent_rss_kb(0)?;
    println!(
        "zero window: {zero}; agent RSS {before} kB before, {during} kB during, {after} kB after"
    );
    assert_eq!(
        zero["answered"].as_u64(),
        Some(100),
        "100 concurrent streams: {zero}"
    );
    assert!(
        during < before + 12 * 1024,
        "{before} → {during} kB while a client does not read"
    );
    assert!(
        after < before + 3 * 1024,
        "{before} → {after} kB after it left"
    );
    // Floods and stream errors: the bad-input corpus (`tests/corpus/bad-input.yaml`).
    Ok(())
}

/// One set of header limits, checked once where the request is first decoded, with the same
/// answer on both protocols: 30 KB of headers cross both nodes' L7 (the server's node parses too,
/// for its policy) and reach the server; 62 KB and 150 repeated headers get 431 at the client's
/// node, on HTTP/1.1 and HTTP/2 alike.
#[test]
fn header_limits_are_one_set_with_431_on_both_protocols() -> Result<()> {
    let c = cluster()?;
    c.apply_yaml(
        1,
        "authorizationPolicies:\n  - name: gets\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    rules:\n      - to: [{operation: {methods: [GET]}}]\n",
        "authorization_policies",
        &["default/gets"],
    )?;
    let url = format!("http://{}:{APP_PORT}/status/200", c.pod("server").ip);
    let status = |proto: &str, headers: &[String]| -> Result<String> {
        let mut args: Vec<&str> = vec![proto, "-o", "/dev/null", "-w", "%{http_code}"];
        for h in headers {
            args.extend(["-H", h.as_str()]);
        }
        args.push(&url);
        Ok(c.curl("client", &args)?.1)
    };
    let big = |n: usize| vec![format!("x-big: {}", "a".repeat(n))];
    let repeated: Vec<String> = (0..150).map(|i| format!("x-dup: {i}")).collect();
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let before = c.app_requests("server", APP_PORT)?;
        assert_eq!(status(proto, &big(30_000))?, "200", "{proto}: 30 KB");
        assert_eq!(c.app_requests("server", APP_PORT)?, before + 1, "{proto}");
        // 62 KB: over the mesh's 60 KiB, and under curl's own 64 KiB for an HTTP/2 header block.
        assert_eq!(status(proto, &big(62_000))?, "431", "{proto}: 62 KB");
        assert_eq!(status(proto, &repeated)?, "431", "{proto}: 150 repeated");
        assert_eq!(c.app_requests("server", APP_PORT)?, before + 1, "{proto}");
    }
    Ok(())
}

/// 2,000 connections each holding half a request head: what each costs the agent while it
/// stalls, and the 408 each gets when the head timeout passes.
#[test]
fn stalled_heads_cost_little_and_get_408() -> Result<()> {
    const HELD: usize = 2000;
    let c = Cluster::client_server(
        vec![ServiceSpec::new("web", 80, APP_PORT, &["server"])],
        APP_PORT,
        &["--http-head-timeout", "3s"],
    )?;
    let vip = c.service_ip("web");
    let before = c.agent_rss_kb(0)?;
    let (mut hold, mut out, line) = c.hold_half_heads("client", &format!("{vip}:80"), HELD)?;
    assert_eq!(line.trim(), format!("ready {HELD}"));
    // Detection and the guard have the half heads now.
    std::thread::sleep(Duration::from_millis(500));
    let during = c.agent_rss_kb(0)?;
    // Past the 3-s head timeout with a margin, stretched in the qemu guest: there the last of the
    // 2,000 answers came more than 4 s after the holder was ready, and 4 were read as missing.
    std::thread::sleep(mesh_tests::scaled(Duration::from_secs(4)));
    drop(hold.stdin.take());
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut out, &mut answer)?;
    let _ = hold.wait();
    let per_conn = (during.saturating_sub(before)) as f64 / HELD as f64;
    println!(
        "{HELD} half heads: agent RSS {before} → {during} kB, {per_conn:.1} kB each; {answer}"
    );
    let v: serde_json::Value = serde_json::from_str(answer.trim())?;
    assert_eq!(
        v["timed_out"].as_u64(),
        Some(HELD as u64),
        "every stalled head got 408"
    );
    assert!(per_conn < 8.0, "{per_conn:.1} kB per stalled head");
    Ok(())
}

/// Overload from one pod: it holds 2,000 half request heads (slowloris) against a cap of 1,500
/// per pod, then floods new connections. What is past the cap is refused at once and counted;
/// another pod on the same node keeps every request answered; the agent's heap and stacks
/// (anonymous memory) grow by less than 16 MiB and stay under 48 MiB, inside the DaemonSet's
/// 64 MiB memory request. (Its total RSS is printed too; in this debug build about 30 MB of it
/// is the binary's own pages, which the attack does not grow.)
#[test]
fn slowloris_and_a_flood_meet_the_pods_cap_while_another_pod_is_served() -> Result<()> {
    const HELD: usize = 2000;
    const POD_CAP: usize = 1500;
    const ANON_CAP_KB: u64 = 48 * 1024;
    const ANON_GROWTH_KB: u64 = 16 * 1024;
    let mut c = Cluster::new(
        vec![
            vec![PodSpec::mesh("attacker"), PodSpec::mesh("client")],
            vec![PodSpec::mesh("server")],
        ],
        vec![ServiceSpec::new("web", 80, APP_PORT, &["server"])],
    )?;
    c.serve("server", APP_PORT)?;
    let cap = POD_CAP.to_string();
    c.start_agent_with(
        0,
        &["--http-head-timeout", "30s", "--max-pod-connections", &cap],
    )?;
    c.wait_ready(0, Duration::from_secs(15))?;
    c.start_agent(1)?;
    let vip = c.service_ip("web");
    let target: std::net::SocketAddr = (vip, 80).into();
    let before = (c.agent_rss_kb(0)?, c.agent_anon_kb(0)?);
    let (mut hold, mut out, line) = c.hold_half_heads("attacker", &target.to_string(), HELD)?;
    // Some writes meet the reset of a refused connection, some land before it: the agent's
    // counter below is the truth.
    assert!(line.starts_with("ready "), "{line}");
    std::thread::sleep(Duration::from_millis(500));
    let refused_held = c.counter(0, "attacker", "overload_refused")?;
    // The flood, and the other pod's requests meanwhile.
    let flood = c.load_on("attacker", target, (500, 4), true, 4)?;
    let served = c.load_on("client", target, (50, 6), true, 2)?;
    let mut peak = (0, 0);
    for _ in 0..20 {
        peak.0 = peak.0.max(c.agent_rss_kb(0)?);
        peak.1 = peak.1.max(c.agent_anon_kb(0)?);
        std::thread::sleep(Duration::from_millis(250));
    }
    let flood = mesh_tests::load_result(&flood, Duration::from_secs(30))?;
    let served = mesh_tests::load_result(&served, Duration::from_secs(30))?;
    let refused = c.counter(0, "attacker", "overload_refused")?;
    drop(hold.stdin.take());
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut out, &mut answer)?;
    let _ = hold.wait();
    println!(
        "{HELD} half heads against a pod cap of {POD_CAP}: {refused_held} refused; flood {flood}; \
         other pod {served}; {refused} refused in all; agent anonymous memory {} → peak {} kB (cap {ANON_CAP_KB}), \
         RSS {} → peak {} kB",
        before.1, peak.1, before.0, peak.0
    );
    assert_eq!(
        refused_held,
        (HELD - POD_CAP) as u64,
        "the half heads past the cap are refused"
    );
    assert!(
        refused > refused_held,
        "the flood's connections are refused too"
    );
    assert_eq!(
        flood["requests"].as_u64(),
        Some(0),
        "no flood request served: {flood}"
    );
    assert_eq!(
        served["errors"].as_u64(),
        Some(0),
        "the other pod: {served}"
    );
    assert_eq!(
        served["requests"].as_u64(),
        Some(300),
        "the other pod: {served}"
    );
    assert!(
        peak.1 < ANON_CAP_KB && peak.1.saturating_sub(before.1) < ANON_GROWTH_KB,
        "agent anonymous memory went {} → {} kB",
        before.1,
        peak.1
    );
    assert_eq!(c.counter(0, "client", "overload_refused")?, 0);
    Ok(())
}
