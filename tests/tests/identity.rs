//! Identity end to end: mTLS on the wire, STRICT mode, the CA's node authorization, certificate
//! rotation under load, CA outages, readiness before certificates, and L4 authorization. Real
//! agents, a real CA process, real certificates and real bytes through network namespaces.

use std::{
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{
    CA_ADDR, Capture, Cluster, PodSpec, artifact, in_netns, tcp_segments, wait_until,
};

const APP_PORT: u16 = 8080;
const OTHER_PORT: u16 = 8081;

/// node-1: client, client2 (mesh), bare (outside); node-2: server, neighbor (mesh).
fn cluster() -> Result<Cluster> {
    Cluster::new(
        vec![
            vec![
                PodSpec::mesh("client"),
                PodSpec::mesh("client2"),
                PodSpec::bare("bare"),
            ],
            vec![PodSpec::mesh("server"), PodSpec::mesh("neighbor")],
        ],
        vec![],
    )
}

/// Replaces node `i`'s node file with the default plus `extra`, and waits until the agent
/// reports the policies named in `expect`.
fn apply(c: &Cluster, i: usize, extra: &str, expect: &[&str]) -> Result<()> {
    c.apply_yaml(i, extra, "authorization_policies", expect)?;
    // The mode reaches the kernel in the same reconcile pass.
    std::thread::sleep(Duration::from_millis(100));
    Ok(())
}

/// What crossed a link: segments carrying `marker` in clear, payload bytes on the HBONE port
/// (over IPv6 only, with `ipv6`), and segments to or from the app port.
fn wire(frames: &[Vec<u8>], marker: &[u8], ipv6: bool) -> (usize, usize, usize) {
    let segs = tcp_segments(frames);
    let clear = segs
        .iter()
        .filter(|s| s.payload.windows(marker.len()).any(|w| w == marker))
        .count();
    let hbone_bytes = segs
        .iter()
        .filter(|s| (s.ipv6 || !ipv6) && (s.dst_port == 15008 || s.src_port == 15008))
        .map(|s| s.payload.len())
        .sum();
    let app_port_segments = segs
        .iter()
        .filter(|s| s.dst_port == APP_PORT || s.src_port == APP_PORT)
        .count();
    (clear, hbone_bytes, app_port_segments)
}

#[test]
fn cross_node_traffic_is_mtls_on_the_wire() -> Result<()> {
    let mut c = cluster()?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let server = c.pod("server").ip;
    // A body full of a marker that must never be seen in clear on the node link.
    let marker = b"PLAINTEXT-CANARY-7f3a";
    let body: Vec<u8> = marker.iter().copied().cycle().take(1 << 20).collect();
    let file = c.dir().join("canary.bin");
    std::fs::write(&file, &body)?;
    let upload = format!("@{}", file.display());
    let url = format!("http://{server}:{APP_PORT}/sha256");
    let node1 = c.nodes[0].netns.clone();

    let count = |frames: &[Vec<u8>]| wire(frames, marker, false);

    // Through the mesh: only TLS on 15008 crosses the link.
    let cap = Capture::start(&node1, "uplink")?;
    let (code, out) = c.curl("client", &["--data-binary", &upload, &url])?;
    let frames = cap.stop();
    assert_eq!(code, 0, "{out}");
    let (clear, hbone_bytes, app_segs) = count(&frames);
    println!(
        "wire: {} frames, {hbone_bytes} payload bytes on 15008, {clear} segments with the marker, {app_segs} on the app port",
        frames.len()
    );
    assert_eq!(clear, 0, "the marker crossed the node link in clear");
    assert_eq!(
        app_segs, 0,
        "no segment to or from the app port crossed the link"
    );
    assert!(
        hbone_bytes >= body.len(),
        "the upload crossed as HBONE: {hbone_bytes} bytes on 15008"
    );
    // Both agents decided on kTLS at start, as the kernel allows, and the upload's HBONE
    // connection took that path at both ends: the kernel's TLS where it has it (the 6.1 guest
    // of `cargo xtask test --kernel`), rustls where it has not (6.18 without CONFIG_TLS).
    let has_tls = mesh_tests::kernel_has_tls()?;
    for i in 0..2 {
        let log = c.agent_log(i);
        let said = if has_tls {
            "kTLS: on"
        } else {
            "kTLS: off: the kernel has no TLS support"
        };
        assert!(log.contains(said), "agent {i} did not log {said:?}:\n{log}");
        let ktls = &c.stats(i)?["ktls"];
        println!("agent {i}: kTLS {ktls}");
        assert_eq!(ktls["enabled"], has_tls, "agent {i}: {ktls}");
        let (used, unused) = if has_tls {
            ("kernel", "rustls")
        } else {
            ("rustls", "kernel")
        };
        assert!(
            ktls[used].as_u64() > Some(0) && ktls[unused] == 0,
            "agent {i}: HBONE must have gone through {used} only: {ktls}"
        );
    }

    // Control: the same upload from the pod outside the mesh is plaintext, and the capture sees
    // the marker, so the check above can fail.
    let cap = Capture::start(&node1, "uplink")?;
    let (code, out) = c.curl("bare", &["--data-binary", &upload, &url])?;
    let frames = cap.stop();
    assert_eq!(code, 0, "{out}");
    let (clear, _, app_segs) = count(&frames);
    println!("wire control (outside the mesh): {clear} segments with the marker in clear");
    assert!(
        clear > 0 && app_segs > 0,
        "the control upload was not seen in clear"
    );
    Ok(())
}

#[test]
fn strict_refuses_1000_plaintext_attempts_with_zero_bytes_at_the_app() -> Result<()> {
    let mut c = cluster()?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let server: SocketAddr = (c.pod("server").ip, APP_PORT).into();
    let bare = c.pod("bare").netns.clone();
    let attempt = |n: usize| -> Result<(usize, usize)> {
        in_netns(&bare, || {
            let mut refused = 0;
            let mut connected = 0;
            for _ in 0..n {
                match TcpStream::connect_timeout(&server, Duration::from_secs(2)) {
                    Ok(mut s) => {
                        use std::io::Write;
                        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
                        connected += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    Err(e) => panic!("expected a refusal, got {e}"),
                }
            }
            (refused, connected)
        })
    };
    // PERMISSIVE (the default): plaintext gets through, so the STRICT check below can fail.
    let (code, _) = in_netns(&bare, || mesh_tests::http_get(server, "/"))??;
    assert_eq!(code, 200, "plaintext to a PERMISSIVE pod");
    assert_eq!(c.app_requests("server", APP_PORT)?, 1);

    apply(
        &c,
        1,
        "peerAuthentications:\n  - {name: strict-server, namespace: default, selector: {matchLabels: {app: server}}, mode: STRICT}\n",
        &[],
    )?;
    wait_until("STRICT in the stats", Duration::from_secs(5), || {
        Ok(c.stats(1)?["pods"]["default/server"]["mtls_mode"] == "STRICT")
    })?;
    let before = c.app_requests("server", APP_PORT)?;
    let refused_before = c.counter(1, "server", "kernel.refused_strict")?;
    let (refused, connected) = attempt(1000)?;
    println!("STRICT: {refused} of 1000 plaintext attempts refused, {connected} connected");
    assert_eq!(
        (refused, connected),
        (1000, 0),
        "all 1000 plaintext attempts must be refused"
    );
    assert_eq!(
        c.app_requests("server", APP_PORT)?,
        before,
        "0 bytes reached the app"
    );
    assert_eq!(
        c.counter(1, "server", "kernel.refused_strict")? - refused_before,
        1000,
        "refused in the kernel"
    );
    // mTLS from a mesh pod still works, and so does the unaffected neighbor's plaintext.
    assert_eq!(
        c.http_status("client", &format!("http://{server}/"))?,
        Some(200),
        "mTLS to a STRICT pod"
    );
    Ok(())
}

/// IPv6 on dual-stack pods: a mesh pod's upload to the server's IPv6 address crosses the node
/// link only as HBONE over IPv6 (no marker in clear, nothing on the app port), while the same
/// upload from outside the mesh is seen in clear; once the server is STRICT, plaintext to its
/// IPv6 address is refused in the kernel and mTLS from the mesh still gets through.
#[test]
fn ipv6_is_mtls_on_the_wire_and_strict_refuses_its_plaintext() -> Result<()> {
    let mut c = cluster()?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let server6 = c.pod("server").ip6.context("dual-stack pod")?;
    let marker = b"PLAINTEXT-CANARY-v6-91c2";
    let body: Vec<u8> = marker.iter().copied().cycle().take(1 << 20).collect();
    let file = c.dir().join("canary6.bin");
    std::fs::write(&file, &body)?;
    let upload = format!("@{}", file.display());
    let url = format!("http://[{server6}]:{APP_PORT}/sha256");
    let node1 = c.nodes[0].netns.clone();
    let count = |frames: &[Vec<u8>]| wire(frames, marker, true);
    let cap = Capture::start(&node1, "uplink")?;
    let (code, out) = c.curl("client", &["--data-binary", &upload, &url])?;
    let frames = cap.stop();
    assert_eq!(code, 0, "{out}");
    let (clear, hbone_v6, app) = count(&frames);
    println!(
        "IPv6 wire: {hbone_v6} payload bytes on 15008 over IPv6, {clear} in clear, {app} on the app port"
    );
    assert_eq!((clear, app), (0, 0), "plaintext crossed the node link");
    assert!(
        hbone_v6 >= body.len(),
        "the upload crossed as HBONE over IPv6: {hbone_v6} bytes"
    );
    // Control: outside the mesh the same upload is plaintext IPv6 on the wire.
    let cap = Capture::start(&node1, "uplink")?;
    let (code, out) = c.curl("bare", &["--data-binary", &upload, &url])?;
    let frames = cap.stop();
    assert_eq!(code, 0, "{out}");
    let (clear, _, app) = count(&frames);
    assert!(
        clear > 0 && app > 0,
        "the control upload was not seen in clear"
    );

    apply(
        &c,
        1,
        "peerAuthentications:\n  - {name: strict-server, namespace: default, selector: {matchLabels: {app: server}}, mode: STRICT}\n",
        &[],
    )?;
    wait_until("STRICT in the stats", Duration::from_secs(5), || {
        Ok(c.stats(1)?["pods"]["default/server"]["mtls_mode"] == "STRICT")
    })?;
    let before = c.app_requests("server", APP_PORT)?;
    let refused_before = c.counter(1, "server", "kernel.refused_strict")?;
    let target: SocketAddr = (server6, APP_PORT).into();
    let bare = c.pod("bare").netns.clone();
    let refused = in_netns(&bare, || {
        (0..200)
            .filter(|_| {
                matches!(
                    TcpStream::connect_timeout(&target, Duration::from_secs(2)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                )
            })
            .count()
    })?;
    assert_eq!(refused, 200, "plaintext over IPv6 to a STRICT pod");
    assert_eq!(c.app_requests("server", APP_PORT)?, before);
    assert_eq!(
        c.counter(1, "server", "kernel.refused_strict")? - refused_before,
        200,
        "refused in the kernel"
    );
    assert_eq!(
        c.http_status("client", &format!("http://[{server6}]:{APP_PORT}/"))?,
        Some(200),
        "mTLS over IPv6 to a STRICT pod"
    );
    Ok(())
}

#[test]
fn ca_signs_only_identities_of_pods_on_the_asking_node() -> Result<()> {
    let mut c = cluster()?;
    c.start_ca("1h")?;
    let agent = artifact("mesh-agent")?;
    let request = |node: usize, token_node: usize, sa: &str| -> Result<(bool, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", c.nodes[node].netns.display()))
            .arg(&agent)
            .args(["ca", "request", "--ca-addr", CA_ADDR, "--ca-token-file"])
            .arg(c.token_file(token_node))
            .arg("--ca-bundle")
            .arg(c.ca_dir().join("bundle.pem"))
            .arg(format!("spiffe://cluster.local/ns/default/sa/{sa}"))
            .env("NO_COLOR", "1")
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    };
    // node-1 runs client: granted.
    let (ok, out) = request(0, 0, "client-sa")?;
    assert!(ok && out.contains("BEGIN CERTIFICATE"), "{out}");
    // node-1 asking for server's identity (server runs on node-2): refused.
    let (ok, out) = request(0, 0, "server-sa")?;
    assert!(!ok, "{out}");
    assert!(
        out.contains("403")
            && out.contains("node-1 may not obtain")
            && out.contains("no pod on this node"),
        "{out}"
    );
    // node-2 may.
    let (ok, out) = request(1, 1, "server-sa")?;
    assert!(ok, "{out}");
    // An unknown token is refused outright.
    std::fs::write(c.dir().join("forged.token"), "not-a-node-token-at-all\n")?;
    let out = Command::new("nsenter")
        .arg(format!("--net={}", c.nodes[0].netns.display()))
        .arg(&agent)
        .args(["ca", "request", "--ca-addr", CA_ADDR, "--ca-token-file"])
        .arg(c.dir().join("forged.token"))
        .arg("--ca-bundle")
        .arg(c.ca_dir().join("bundle.pem"))
        .arg("spiffe://cluster.local/ns/default/sa/client-sa")
        .output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("401"), "{text}");
    Ok(())
}

#[test]
fn rotation_under_steady_traffic_loses_nothing_and_ca_outage_lasts_until_expiry() -> Result<()> {
    let mut c = cluster()?;
    c.serve("server", APP_PORT)?;
    c.start_ca("4s")?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let target: SocketAddr = (c.pod("server").ip, APP_PORT).into();

    // 14 s at 50 requests/s, a new connection each: 4 s certificates renew every ~2 s. Beside
    // it, two long-lived connections from client2 carry 50 requests/s through every rotation.
    // Mid-run, the root rotates: prepared (trusted everywhere), then activated (signing).
    let (c0, s0) = (c.issued(0, "client-sa")?, c.issued(1, "server-sa")?);
    let issuer = |node: usize, sa: &str| -> Result<String> {
        Ok(
            c.stats(node)?["certificates"][format!("spiffe://cluster.local/ns/default/sa/{sa}")]
                ["issuer"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    };
    let old_issuer = issuer(0, "client-sa")?;
    let out = c.load("client", target, 50, 14, true)?;
    let held = c.load("client2", target, 50, 14, false)?;
    std::thread::sleep(Duration::from_secs(3));
    let ca_cmd = |action: &str| -> Result<()> {
        let out = Command::new(artifact("mesh-agent")?)
            .args(["ca", action, "--dir"])
            .arg(c.ca_dir())
            .output()?;
        if !out.status.success() {
            bail!("ca {action}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    ca_cmd("rotate-root")?;
    wait_until(
        "both agents to trust the new root",
        Duration::from_secs(6),
        || Ok(c.stats(0)?["trust_roots"] == 2 && c.stats(1)?["trust_roots"] == 2),
    )?;
    ca_cmd("activate-root")?;
    wait_until(
        "certificates from the new root",
        Duration::from_secs(6),
        || Ok(issuer(0, "client-sa")? != old_issuer && issuer(1, "server-sa")? != old_issuer),
    )?;
    let result = mesh_tests::load_result(&out, Duration::from_secs(30))?;
    let held = mesh_tests::load_result(&held, Duration::from_secs(30))?;
    let (c1, s1) = (c.issued(0, "client-sa")?, c.issued(1, "server-sa")?);
    assert_eq!(
        (held["errors"].as_u64(), held["requests"].as_u64()),
        (Some(0), Some(700)),
        "long-lived tunnels must survive rotations: {held}"
    );
    assert_eq!(
        result["errors"], 0,
        "failed requests during rotation: {result}"
    );
    assert_eq!(result["requests"], 700, "{result}");
    println!(
        "rotation: {} client and {} server certificates during the run; reconnecting load {result}; held connections {held}",
        c1 - c0,
        s1 - s0
    );
    assert!(
        c1 - c0 >= 5 && s1 - s0 >= 5,
        "expected at least 5 rotations on each side, got client {} and server {}",
        c1 - c0,
        s1 - s0
    );

    // CA down: traffic flows on the valid certificates until they expire, then stops (closed,
    // never plaintext).
    c.stop_ca();
    let stopped = Instant::now();
    let expires = |node: usize, sa: &str| -> Result<i64> {
        c.stats(node)?["certificates"][format!("spiffe://cluster.local/ns/default/sa/{sa}")]
            ["expires_in_secs"]
            .as_i64()
            .context("expiry")
    };
    let left = expires(0, "client-sa")?.min(expires(1, "server-sa")?);
    assert!(
        left >= 1,
        "a certificate is about to expire already ({left} s)"
    );
    let url = format!("http://{target}/");
    let mut ok_while_valid = 0;
    while stopped.elapsed()
        < Duration::from_secs(left as u64).saturating_sub(Duration::from_millis(700))
    {
        assert_eq!(
            c.http_status("client", &url)?,
            Some(200),
            "request failed while certificates were valid"
        );
        ok_while_valid += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok_while_valid > 0);
    println!(
        "CA down: {ok_while_valid} requests succeeded over the {left} s the certificates had left"
    );
    wait_until(
        "the certificates to expire",
        Duration::from_secs(10),
        || Ok(expires(0, "client-sa")? < 0),
    )?;
    let served = c.app_requests("server", APP_PORT)?;
    // curl speaks HTTP: the client's proxy either answers it (503) or holds it while it waits
    // for a certificate, until curl gives up. Either way nothing may reach the server.
    let after = c.http_status("client", &url)?;
    assert!(
        after != Some(200),
        "traffic must stop once the certificate expired, got {after:?}"
    );
    assert_eq!(c.app_requests("server", APP_PORT)?, served);
    assert_eq!(
        c.counter(1, "server", "kernel.steered_inbound")?,
        0,
        "nothing went plaintext"
    );
    let (code, body) = c.agent_get(0, "/ready")?;
    assert!(
        code == 503 && body.contains("certificates missing"),
        "{code} {body}"
    );

    // CA back: renewal (capped backoff) recovers without a restart.
    c.start_ca("4s")?;
    wait_until(
        "recovery after the CA returns",
        Duration::from_secs(10),
        || Ok(c.http_status("client", &url)? == Some(200)),
    )?;
    Ok(())
}

#[test]
fn pod_waits_for_its_certificate_and_ready_follows_certificates() -> Result<()> {
    let mut c = cluster()?;
    c.serve("server", APP_PORT)?;
    c.start_agent(1)?;
    // node-1 starts while the CA is down: programs and listeners are in place, certificates are
    // not, so it is not ready, and the client's traffic waits instead of going out in plaintext.
    c.stop_ca();
    c.start_agent_with(0, &[])?;
    wait_until(
        "node-1 to report missing certificates",
        Duration::from_secs(10),
        || {
            let (code, body) = c.agent_get(0, "/ready").unwrap_or((0, String::new()));
            Ok(code == 503 && body.contains("certificates missing"))
        },
    )?;
    let server = c.pod("server").ip;
    let url = format!("http://{server}:{APP_PORT}/");
    let out = c.dir().join("waiting-curl.txt");
    c.spawn(
        "client",
        &[
            "sh",
            "-c",
            &format!(
                "curl -sS --max-time 20 -o /dev/null -w '%{{http_code}}' {url} > {} 2>&1",
                out.display()
            ),
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        c.app_requests("server", APP_PORT)?,
        0,
        "nothing may pass before the certificate"
    );
    assert_eq!(
        c.counter(1, "server", "kernel.steered_inbound")?,
        0,
        "no plaintext attempt"
    );
    c.start_ca("1h")?;
    c.wait_ready(0, Duration::from_secs(15))?;
    wait_until(
        "the waiting request to complete",
        Duration::from_secs(20),
        || Ok(std::fs::read_to_string(&out).is_ok_and(|s| s.trim() == "200")),
    )?;
    assert_eq!(c.app_requests("server", APP_PORT)?, 1);
    Ok(())
}

#[test]
fn l4_policies_allow_and_deny_both_ways() -> Result<()> {
    let mut c = cluster()?;
    c.serve("server", APP_PORT)?;
    c.serve("server", OTHER_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let server = c.pod("server").ip;
    let main_url = format!("http://{server}:{APP_PORT}/");
    let other_url = format!("http://{server}:{OTHER_PORT}/");
    let status = |pod: &str, url: &str| c.http_status(pod, url);

    // No policy: everyone (mesh, same-node, plaintext) gets in.
    for pod in ["client", "client2", "bare"] {
        assert_eq!(status(pod, &main_url)?, Some(200), "{pod} without policies");
    }
    assert_eq!(status_local(&c, &main_url)?, Some(200));

    // ALLOW by principal: only client's identity.
    apply(
        &c,
        1,
        "authorizationPolicies:\n  - name: only-client\n    namespace: default\n    selector: {matchLabels: {app: server}}\n    action: ALLOW\n    rules:\n      - from: [{source: {principals: [cluster.local/ns/default/sa/client-sa]}}]\n",
        &["default/only-client"],
    )?;
    assert_eq!(status("client", &main_url)?, Some(200), "allowed principal");
    // HTTP clients in the mesh are answered 403 by their own node's proxy (L7); plaintext from
    // outside the mesh is refused at L4 (reset).
    assert_eq!(status("client2", &main_url)?, Some(403), "other principal");
    assert_eq!(
        status("bare", &main_url)?,
        None,
        "plaintext has no principal"
    );
    assert_eq!(
        status_local(&c, &main_url)?,
        Some(403),
        "same-node pod with another identity"
    );
    let log = c.agent_log(1);
    assert!(
        log.contains("client2-sa")
            && log.contains("no rule of the ALLOW policies default/only-client matched"),
        "the denial must be logged with the policy's name"
    );

    // ALLOW by namespace: every mesh identity in `default`, still no plaintext.
    apply(
        &c,
        1,
        "authorizationPolicies:\n  - name: ns-default\n    namespace: default\n    rules:\n      - from: [{source: {namespaces: [default]}}]\n",
        &["default/ns-default"],
    )?;
    assert_eq!(
        status("client2", &main_url)?,
        Some(200),
        "namespace allowed"
    );
    assert_eq!(
        status_local(&c, &main_url)?,
        Some(200),
        "same-node, namespace allowed"
    );
    assert_eq!(
        status("bare", &main_url)?,
        None,
        "plaintext has no namespace"
    );

    // DENY by port, evaluated before ALLOW: client is allowed, but not on 8081.
    apply(
        &c,
        1,
        "authorizationPolicies:\n  - name: allow-client\n    namespace: default\n    rules:\n      - from: [{source: {principals: [\"*/sa/client-sa\"]}}]\n  - name: no-8081\n    namespace: default\n    action: DENY\n    rules:\n      - to: [{operation: {ports: [\"8081\"]}}]\n",
        &["default/allow-client", "default/no-8081"],
    )?;
    assert_eq!(status("client", &main_url)?, Some(200), "allowed port");
    assert_eq!(
        status("client", &other_url)?,
        Some(403),
        "denied port, despite the ALLOW"
    );
    assert!(
        c.agent_log(1)
            .contains("denied by DENY policy default/no-8081"),
        "the DENY must be logged with its name"
    );
    assert!(c.counter(1, "server", "denied")? >= 5);
    Ok(())
}

/// Same-node request from `neighbor` (node-2) to `url`.
fn status_local(c: &Cluster, url: &str) -> Result<Option<u16>> {
    c.http_status("neighbor", url)
}

#[test]
fn hbone_connect_is_refused_unless_it_names_a_pod_behind_the_listener() -> Result<()> {
    let mut c = cluster()?;
    c.serve("server", APP_PORT)?;
    c.serve("neighbor", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    // A real certificate for client-sa, obtained as node-1 would.
    let (chain, key) = c.workload_cert(0, "client-sa")?;

    let server = c.pod("server").ip;
    let neighbor = c.pod("neighbor").ip;
    let ok = format!("{server}:{APP_PORT}");
    let neighbor_target = format!("{neighbor}:{APP_PORT}");
    let client_target = format!("{}:{APP_PORT}", c.pod("client").ip);
    let requests = [
        ("CONNECT", ok.as_str()),              // the listener's own pod
        ("CONNECT", neighbor_target.as_str()), // same node, another identity
        ("CONNECT", client_target.as_str()),   // another node's pod
        ("CONNECT", "198.18.2.99:8080"),       // nobody
        ("CONNECT", "server.default:8080"),    // not an IP
        ("GET", ok.as_str()),                  // not CONNECT
    ];
    let (statuses, server_cert) =
        c.hbone_probe("client", server.into(), (chain, key), &requests)?;
    assert!(
        server_cert
            .windows(b"sa/server-sa".len())
            .any(|w| w == b"sa/server-sa"),
        "the listener presented the server's identity"
    );
    assert_eq!(statuses, vec![200, 400, 400, 400, 400, 405], "{requests:?}");
    assert_eq!(c.app_requests("neighbor", APP_PORT)?, 0);
    Ok(())
}

#[test]
fn embedded_ca_creates_its_root_once_and_serves_a_lone_node() -> Result<()> {
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client"), PodSpec::mesh("server")]],
        vec![],
    )?;
    c.serve("server", APP_PORT)?;
    let dir = c.dir().join("embedded-ca");
    let dir_s = dir.to_string_lossy().into_owned();
    c.start_agent_with(0, &["--ca-dir", &dir_s, "--cert-ttl", "1h"])?;
    c.wait_ready(0, Duration::from_secs(15))?;
    let mode = |f: &str| -> Result<u32> {
        use std::os::unix::fs::PermissionsExt;
        Ok(std::fs::metadata(dir.join(f))?.permissions().mode() & 0o777)
    };
    assert_eq!(mode("root-key.pem")?, 0o600, "the root key is private");
    let root = std::fs::read(dir.join("root-cert.pem"))?;
    let url = format!("http://{}:{APP_PORT}/", c.pod("server").ip);
    assert_eq!(c.http_status("client", &url)?, Some(200));
    assert_eq!(c.issued(0, "client-sa")?, 1);
    assert_eq!(c.issued(0, "server-sa")?, 1);
    // A restart keeps the root.
    c.kill_agent(0);
    c.start_agent_with(0, &["--ca-dir", &dir_s])?;
    c.wait_ready(0, Duration::from_secs(15))?;
    assert_eq!(std::fs::read(dir.join("root-cert.pem"))?, root);
    assert_eq!(c.http_status("client", &url)?, Some(200));
    assert!(c.agent_log(0).contains("created a new CA root"));
    assert_eq!(
        c.agent_log(0).matches("created a new CA root").count(),
        1,
        "the root is created on first start only"
    );
    Ok(())
}
