//! End-to-end tests: real agents, real kernel programs, real bytes through network namespaces.
//! They need root and are never skipped: without root they fail, saying so.

use std::time::Duration;

use anyhow::{Context, Result};
use mesh_agent::discovery::nodefile::raw::RawPod;
use mesh_tests::{
    Cluster, PodSpec, ServiceSpec, artifact, bpf_event, destination_rule, pattern_byte,
    traffic_policy, wait_until,
};
use sha2::{Digest, Sha256};

const APP_PORT: u16 = 8080;

/// node-1: client (mesh), bare (outside the mesh); node-2: server (mesh), server2 (mesh).
/// Service `web` (port 80) balances over both servers.
fn two_nodes() -> Result<Cluster> {
    let mut c = Cluster::new(
        vec![
            vec![PodSpec::mesh("client"), PodSpec::bare("bare")],
            vec![PodSpec::mesh("server"), PodSpec::mesh("server2")],
        ],
        vec![ServiceSpec::new(
            "web",
            80,
            APP_PORT,
            &["server", "server2"],
        )],
    )?;
    c.serve("server", APP_PORT)?;
    c.serve("server2", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    Ok(c)
}

#[test]
fn curl_pod_and_service_across_nodes_bytes_unchanged() -> Result<()> {
    let c = two_nodes()?;
    let server = c.pod("server").ip;
    let vip = c.service_ip("web");

    let before = c.counter(0, "client", "kernel.captured_v4")?;
    assert_eq!(
        c.http_status("client", &format!("http://{server}:{APP_PORT}/"))?,
        Some(200),
        "pod→pod curl"
    );
    assert_eq!(
        c.http_status("client", &format!("http://{vip}:80/"))?,
        Some(200),
        "pod→service curl"
    );
    // Both connections went through the capture hook and the proxy.
    assert_eq!(c.counter(0, "client", "kernel.captured_v4")? - before, 2);
    assert_eq!(c.counter(0, "client", "outbound_accepted")?, 2);
    assert_eq!(c.counter(0, "client", "outbound_failed")?, 0);

    // Upload 16 MiB through the service: the server hashes what it received.
    let size: u64 = 16 << 20;
    let body: Vec<u8> = (0..size).map(|i| pattern_byte(i ^ 0x5a5a)).collect();
    let file = c.dir().join("upload.bin");
    std::fs::write(&file, &body)?;
    let expected = format!("{} {size}", hex::encode(Sha256::digest(&body)));
    let upload = format!("@{}", file.display());
    let (code, out) = c.curl(
        "client",
        &[
            "--data-binary",
            &upload,
            "-H",
            "Content-Type: application/octet-stream",
            &format!("http://{vip}:80/sha256"),
        ],
    )?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out, expected,
        "server must see the uploaded bytes unchanged"
    );

    // Download 16 MiB pod→pod and compare with the pattern.
    let dl = c.dir().join("download.bin");
    let (code, out) = c.curl(
        "client",
        &[
            "-o",
            &dl.to_string_lossy(),
            &format!("http://{server}:{APP_PORT}/bytes/{size}"),
        ],
    )?;
    assert_eq!(code, 0, "{out}");
    let got = std::fs::read(&dl)?;
    let want: Vec<u8> = (0..size).map(pattern_byte).collect();
    assert_eq!(got.len(), want.len());
    assert!(
        Sha256::digest(&got) == Sha256::digest(&want),
        "downloaded bytes differ"
    );

    // The relayed byte counts cover the transfers. Every upstream connection crossed as an
    // HBONE stream, none as plaintext, and the streams shared pooled connections (one per
    // server identity). curl speaks HTTP, so the proxy handled these at L7 and pooled its
    // upstream connections: fewer streams than requests.
    let (sent, received) = (
        c.counter(0, "client", "outbound_bytes_sent")?,
        c.counter(0, "client", "outbound_bytes_received")?,
    );
    assert!(
        sent >= size && received >= size,
        "{sent} sent, {received} received"
    );
    assert_eq!(c.counter(0, "client", "outbound_http")?, 4);
    let opened = c.counter(0, "client", "outbound_hbone")?;
    let sum = |field: &str| -> Result<u64> {
        Ok(c.counter(1, "server", field)? + c.counter(1, "server2", field)?)
    };
    assert!((1..=4).contains(&opened), "{opened} upstream connections");
    assert_eq!(
        sum("hbone_streams")?,
        opened,
        "every upstream connection arrived over HBONE"
    );
    assert_eq!(sum("kernel.steered_inbound")?, 0, "no plaintext arrived");
    let conns = sum("kernel.steered_hbone")?;
    assert!(
        (1..=2).contains(&conns),
        "streams to 2 identities must share pooled connections, got {conns} connections"
    );
    Ok(())
}

#[test]
fn service_balances_over_endpoints() -> Result<()> {
    let c = two_nodes()?;
    let vip = c.service_ip("web");
    // HTTP is balanced per request, by P2C over latency unless told otherwise; round robin
    // makes the split exact.
    c.apply(
        0,
        |f| {
            f.destination_rules = vec![destination_rule(
                "web",
                "web",
                traffic_policy("{loadBalancer: {simple: ROUND_ROBIN}}"),
            )]
        },
        "destination_rules",
        &["default/web"],
    )?;
    for _ in 0..10 {
        let (code, _) = c.curl("client", &["-o", "/dev/null", &format!("http://{vip}:80/")])?;
        assert_eq!(code, 0);
    }
    let a = c.app_requests("server", APP_PORT)?;
    let b = c.app_requests("server2", APP_PORT)?;
    assert_eq!((a, b), (5, 5), "round robin over both endpoints");
    Ok(())
}

/// IPv6 end to end on dual-stack pods: `connect6` captures a pod's IPv6 connects (to a pod and
/// to a service's IPv6 address), `sk_lookup` steers them into the peer's proxy over HBONE,
/// the service balances over its endpoints' IPv6 addresses, bytes arrive unchanged, and a pod
/// outside the mesh still reaches the server directly over IPv6.
#[test]
fn ipv6_pod_and_service_traffic_is_captured_steered_and_balanced() -> Result<()> {
    let c = two_nodes()?;
    let server = c.pod("server").ip6.context("dual-stack pod")?;
    let vip = c.service_ip6("web");
    let (v4, v6) = (
        c.counter(0, "client", "kernel.captured_v4")?,
        c.counter(0, "client", "kernel.captured_v6")?,
    );
    let steered = c.counter(1, "server", "kernel.steered_hbone")?;
    assert_eq!(
        c.http_status("client", &format!("http://[{server}]:{APP_PORT}/"))?,
        Some(200),
        "pod→pod over IPv6"
    );
    assert_eq!(
        c.http_status("client", &format!("http://[{vip}]:80/"))?,
        Some(200),
        "pod→service over IPv6"
    );
    assert_eq!(c.counter(0, "client", "kernel.captured_v6")? - v6, 2);
    assert_eq!(c.counter(0, "client", "kernel.captured_v4")? - v4, 0);
    assert_eq!(c.counter(0, "client", "outbound_failed")?, 0);
    // The pod→pod request went to the server's IPv6 address over HBONE, steered there by
    // sk_lookup into the server's dual-stack HBONE listener.
    assert!(c.counter(1, "server", "kernel.steered_hbone")? > steered);

    // 4 MiB up through the service's IPv6 address: the server hashes what it received.
    let size: u64 = 4 << 20;
    let body: Vec<u8> = (0..size).map(|i| pattern_byte(i ^ 0x6666)).collect();
    let file = c.dir().join("upload6.bin");
    std::fs::write(&file, &body)?;
    let (code, out) = c.curl(
        "client",
        &[
            "--data-binary",
            &format!("@{}", file.display()),
            "-H",
            "Content-Type: application/octet-stream",
            &format!("http://[{vip}]:80/sha256"),
        ],
    )?;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        format!("{} {size}", hex::encode(Sha256::digest(&body)))
    );

    // Balanced over both endpoints (each once, not once per address family).
    c.apply(
        0,
        |f| {
            f.destination_rules = vec![destination_rule(
                "web",
                "web",
                traffic_policy("{loadBalancer: {simple: ROUND_ROBIN}}"),
            )]
        },
        "destination_rules",
        &["default/web"],
    )?;
    let (a0, b0) = (
        c.app_requests("server", APP_PORT)?,
        c.app_requests("server2", APP_PORT)?,
    );
    for _ in 0..10 {
        let (code, _) = c.curl(
            "client",
            &["-o", "/dev/null", &format!("http://[{vip}]:80/")],
        )?;
        assert_eq!(code, 0);
    }
    let a = c.app_requests("server", APP_PORT)? - a0;
    let b = c.app_requests("server2", APP_PORT)? - b0;
    assert_eq!((a, b), (5, 5), "round robin over both endpoints");

    // Outside the mesh: not captured, and the enrolled server still answers it over IPv6.
    assert_eq!(
        c.http_status("bare", &format!("http://[{server}]:{APP_PORT}/"))?,
        Some(200)
    );
    Ok(())
}

#[test]
fn unenrolled_pod_and_agent_traffic_are_not_captured() -> Result<()> {
    let c = two_nodes()?;
    let server = c.pod("server").ip;
    // A pod outside the mesh reaches the server directly (the server's inbound is still steered
    // through its proxy, as it is enrolled), and nothing on node-1 counts it.
    assert_eq!(
        c.http_status("bare", &format!("http://{server}:{APP_PORT}/"))?,
        Some(200)
    );
    let stats = c.stats(0)?;
    assert!(
        stats["pods"]["default/bare"].is_null(),
        "bare pod must not be enrolled: {stats}"
    );
    assert_eq!(c.counter(0, "client", "kernel.captured_v4")?, 0);

    // The agent's own upstream connections are made in the client's netns but outside its
    // cgroup: were they captured, each client connect would count twice (and loop).
    for _ in 0..5 {
        let (code, _) = c.curl(
            "client",
            &["-o", "/dev/null", &format!("http://{server}:{APP_PORT}/")],
        )?;
        assert_eq!(code, 0);
    }
    assert_eq!(c.counter(0, "client", "kernel.captured_v4")?, 5);
    assert_eq!(c.counter(0, "client", "outbound_accepted")?, 5);
    Ok(())
}

#[test]
fn fail_closed_while_agent_down_then_recovers_with_pinned_maps() -> Result<()> {
    let mut c = two_nodes()?;
    let server = c.pod("server").ip;
    let url = format!("http://{server}:{APP_PORT}/");
    let (code, _) = c.curl("client", &["-o", "/dev/null", &url])?;
    assert_eq!(code, 0);
    let served = |c: &Cluster| c.app_requests("server", APP_PORT);
    let served_before = served(&c)?;

    // Source-side agent dies: the enrolled client's connect is still redirected, to nothing.
    c.kill_agent(0);
    let (code, out) = c.curl("client", &["-o", "/dev/null", "--max-time", "3", &url])?;
    assert_ne!(code, 0, "connect must fail while the agent is down: {out}");
    // Destination-side agent dies: even a pod outside the mesh cannot reach the enrolled server.
    c.kill_agent(1);
    let (code, out) = c.curl("bare", &["-o", "/dev/null", "--max-time", "3", &url])?;
    assert_ne!(
        code, 0,
        "inbound must be refused while the agent is down: {out}"
    );
    assert_eq!(served(&c)?, served_before, "no request reached the server");

    // Restart: pinned maps and links are adopted, and traffic flows with no manual step.
    c.start_agent(0)?;
    c.start_agent(1)?;
    let (code, _) = c.curl("client", &["-o", "/dev/null", &url])?;
    assert_eq!(code, 0);
    assert_eq!(c.stats(0)?["adopted_maps"], true);
    assert_eq!(c.stats(1)?["adopted_maps"], true);
    assert!(
        c.agent_log(0).contains("adopted_links=4"),
        "{}",
        c.agent_log(0)
    );
    // Counters live in the pinned maps, so the kernel's count spans both agent lifetimes:
    // the first connect, the refused one, and the one after restart.
    assert_eq!(c.counter(0, "client", "kernel.captured_v4")?, 3);
    assert!(c.counter(1, "server", "kernel.refused_no_listener")? >= 1);
    Ok(())
}

#[test]
fn node_file_changes_apply_live_and_bad_input_keeps_what_was_valid() -> Result<()> {
    let mut c = Cluster::new(
        vec![vec![
            PodSpec::mesh("client"),
            PodSpec::bare("late"),
            PodSpec::mesh("server"),
        ]],
        vec![],
    )?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    let server = c.pod("server").ip;
    let url = format!("http://{server}:{APP_PORT}/");
    let get =
        |c: &Cluster, pod: &str| -> Result<i32> { Ok(c.curl(pod, &["-o", "/dev/null", &url])?.0) };

    // Adding a pod enrolls it without a restart.
    let base = c.node_file_text(0);
    let with = |edit: &dyn Fn(&mut RawPod)| {
        let mut file = c.node_file(0);
        let mut late = c.pod_entry(c.pod("late"));
        edit(&mut late);
        file.pods.insert(0, late);
        serde_yaml_ng::to_string(&file)
    };
    let with_late = with(&|_| {})?;
    c.set_node_file(0, &with_late)?;
    wait_until("late pod enrolled", Duration::from_secs(10), || {
        Ok(c.stats(0)?["pods"]["default/late"].is_object())
    })?;
    assert_eq!(get(&c, "late")?, 0);
    assert_eq!(c.counter(0, "late", "kernel.captured_v4")?, 1);

    let problems = |c: &Cluster| -> Result<String> { Ok(c.stats(0)?["problems"].to_string()) };
    // Each bad input is reported naming the pod and the field, and the pods that were valid keep
    // being served.
    let client_ip = c.pod("client").ip.to_string();
    let cases = [
        (
            "missing field",
            with(&|p| p.ip = None)?,
            "pod default/late (pods[0]): field `ip`: missing",
        ),
        (
            "missing netns",
            with(&|p| p.netns = Some("/var/run/netns/does-not-exist".into()))?,
            "field `netns`: network namespace /var/run/netns/does-not-exist does not exist",
        ),
        (
            "duplicate ip",
            with(&|p| p.ip = Some(client_ip.clone()))?,
            "already used by pod default/client",
        ),
        (
            "yaml syntax",
            format!("{with_late}\n  - {{name: [unclosed\n"),
            "is not valid",
        ),
    ];
    for (what, text, expect) in cases {
        c.set_node_file(0, &text)?;
        wait_until(what, Duration::from_secs(10), || {
            Ok(problems(&c)?.contains(expect))
        })
        .with_context(|| format!("{what}: problems were {}", problems(&c).unwrap_or_default()))?;
        assert_eq!(get(&c, "client")?, 0, "{what}: client still served");
        assert_eq!(
            get(&c, "late")?,
            0,
            "{what}: late keeps its last valid config"
        );
        assert!(c.stats(0)?["pods"]["default/late"].is_object(), "{what}");
    }

    // Removing the pod takes it out of the mesh: its traffic is no longer captured.
    c.set_node_file(0, &base)?;
    wait_until("late pod removed", Duration::from_secs(10), || {
        Ok(c.stats(0)?["pods"]["default/late"].is_null())
    })?;
    let before = c.counter(0, "client", "kernel.captured_v4")?;
    assert_eq!(get(&c, "late")?, 0);
    assert_eq!(c.counter(0, "client", "kernel.captured_v4")?, before);
    let links = std::fs::read_dir(format!("/sys/fs/bpf/{}/links", c.nodes[0].pin_name))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("default_late_"))
        .count();
    assert_eq!(links, 0, "the removed pod's links are unpinned");
    Ok(())
}

/// Hostile or careless node files: each is refused with a message naming the field, the pods
/// keep being served, and the agent's admin endpoint answers within 100 ms throughout, because
/// parsing runs off the proxy's workers and the input is bounded before the YAML parser sees it.
#[test]
fn hostile_node_files_are_refused_while_the_agent_keeps_serving() -> Result<()> {
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client"), PodSpec::mesh("server")]],
        vec![],
    )?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    let server = c.pod("server").ip;
    let url = format!("http://{server}:{APP_PORT}/");
    let base = c.node_file_text(0);
    let problems = |c: &Cluster| -> Result<String> { Ok(c.stats(0)?["problems"].to_string()) };
    let root = mesh_tests::cgroup2_root()?;
    let server_cg = c.pod("server").cgroup.display().to_string();
    let agent_cg = c.pod("server").cgroup.with_file_name("agent-node-1");
    let cases = [
        (
            "100,000-deep flow nesting",
            format!(
                "{base}excludedPorts: {}{}\n",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            "nested deeper than 64 levels".to_string(),
        ),
        (
            "10 MB",
            format!("{base}# {}\n", "x".repeat(10 * 1024 * 1024)),
            "over the limit of 8388608".to_string(),
        ),
        (
            "the root cgroup",
            base.replacen(&server_cg, &root.display().to_string(), 1),
            "is the root cgroup".to_string(),
        ),
        (
            "the agent's own cgroup",
            base.replacen(&server_cg, &agent_cg.display().to_string(), 1),
            "the agent's own cgroup or one of its ancestors".to_string(),
        ),
        (
            "an ancestor of the pods",
            base.replacen(
                &server_cg,
                &c.pod("server")
                    .cgroup
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                1,
            ),
            "field `cgroup`".to_string(),
        ),
        (
            "a loopback pod address",
            base.replacen(&format!("ip: {server}"), "ip: 127.0.0.9", 1),
            "field `ip`: 127.0.0.9 is a loopback address".to_string(),
        ),
        (
            "a node name that is not a string",
            base.replacen("node: node-1", "node: [node-1]", 1),
            "top-level field `node` must be a string".to_string(),
        ),
    ];
    for (what, text, expect) in &cases {
        c.set_node_file(0, text)?;
        // /healthz every 20 ms while the file is read and refused.
        let started = std::time::Instant::now();
        let mut slowest = Duration::ZERO;
        let mut seen = false;
        while started.elapsed() < Duration::from_secs(3) {
            let t = std::time::Instant::now();
            let (code, _) = c.agent_get(0, "/healthz")?;
            slowest = slowest.max(t.elapsed());
            assert_eq!(code, 200, "{what}");
            if !seen {
                seen = problems(&c)?.contains(expect.as_str());
            }
            if seen && started.elapsed() > Duration::from_millis(500) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("{what}: slowest /healthz {slowest:?}");
        assert!(seen, "{what}: problems were {}", problems(&c)?);
        assert!(
            slowest < Duration::from_millis(100),
            "{what}: /healthz took {slowest:?}"
        );
        assert_eq!(
            c.curl("client", &["-o", "/dev/null", &url])?.0,
            0,
            "{what}: still served"
        );
        assert!(c.stats(0)?["pods"]["default/server"].is_object(), "{what}");
        // Its capture links are still on its own cgroup, and on no other.
        let links: Vec<String> =
            std::fs::read_dir(format!("/sys/fs/bpf/{}/links", c.nodes[0].pin_name))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.contains("_cg"))
                .collect();
        let own = format!(
            "_cg{}",
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&server_cg)?)
        );
        let server_links: Vec<&String> = links
            .iter()
            .filter(|n| n.starts_with("default_server_"))
            .collect();
        assert!(
            !server_links.is_empty() && server_links.iter().all(|n| n.ends_with(&own)),
            "{what}: {links:?}"
        );
        assert_eq!(
            links.len(),
            2 * server_links.len(),
            "{what}: only the two pods' cgroups: {links:?}"
        );
    }
    Ok(())
}

#[test]
fn start_without_root_or_bpffs_says_what_to_do() -> Result<()> {
    let agent = artifact("mesh-agent")?;
    let object = artifact("mesh-ebpf.o")?;
    let dir = std::env::temp_dir().join(format!("mesh-preflight-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let node_file = dir.join("node.yaml");
    std::fs::write(&node_file, "node: n\n")?;
    let run = |bpffs: &str, uid: Option<u32>| -> Result<String> {
        let mut cmd = std::process::Command::new(&agent);
        cmd.args(["run", "--node-file"])
            .arg(&node_file)
            .args(["--bpffs", bpffs, "--bpf-object"])
            .arg(&object);
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid);
        }
        let out = cmd.output()?;
        assert!(!out.status.success());
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let err = run("/sys/fs/bpf", Some(65534))?;
    assert!(err.contains("must run as root"), "{err}");
    let err = run(&dir.to_string_lossy(), None)?;
    assert!(
        err.contains("no bpf filesystem is mounted at") && err.contains("mount -t bpf bpf"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Every kernel feature the agent uses is probed once at start and reported in `/config_dump`
/// and `mesh_kernel_feature`; on the kernel running this suite (the host, or the qemu guest of
/// `cargo xtask test --kernel`) each must-have is present. Pretending one missing refuses the
/// start, before anything is pinned, with the feature's name, the release that brought it and
/// the minimum kernel; pretending the optional kTLS ULP missing starts the agent with kTLS off.
#[test]
fn kernel_features_are_probed_and_a_missing_must_have_refuses_the_start_by_name() -> Result<()> {
    let mut c = Cluster::new(vec![vec![PodSpec::mesh("client")]], vec![])?;
    c.start_agent_with(0, &["--pretend-missing-kernel-feature", "tls_ulp"])?;
    c.wait_ready(0, Duration::from_secs(15))?;
    let (code, body) = c.agent_get(0, "/config_dump")?;
    assert_eq!(code, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    let features = dump["kernel_features"]
        .as_array()
        .context("kernel_features in /config_dump")?
        .clone();
    let samples = c.scrape(0)?;
    let mut required = Vec::new();
    for f in &features {
        let name = f["name"].as_str().context("a feature's name")?;
        println!(
            "{name}: {} ({}, since {})",
            f["available"], f["need"], f["since"]
        );
        let sample = samples
            .iter()
            .find(|s| s.name == "mesh_kernel_feature" && s.labels["feature"] == name)
            .with_context(|| format!("mesh_kernel_feature{{feature={name:?}}}"))?;
        assert_eq!(sample.value == 1.0, f["available"] == true, "{name}");
        if f["need"] == "required" {
            assert_eq!(f["available"], true, "must-have {name} missing: {f}");
            required.push((
                name.to_string(),
                f["since"].as_str().unwrap_or("").to_string(),
            ));
        }
        if name == "tls_ulp" {
            assert_eq!(f["available"], false, "pretended missing: {f}");
        }
    }
    assert!(required.len() >= 10, "the must-haves: {required:?}");
    assert!(c.agent_log(0).contains("kTLS: off"), "{}", c.agent_log(0));
    assert_eq!(c.stats(0)?["ktls"]["enabled"], false);

    // Each must-have, pretended missing: refused at once, by name, with nothing pinned.
    let agent = artifact("mesh-agent")?;
    for (name, since) in &required {
        let pin_name = format!("mesh-features-{}", std::process::id());
        let out = std::process::Command::new(&agent)
            .args(["run", "--node-file", "/nonexistent/node.yaml", "--pin-name"])
            .arg(&pin_name)
            .args(["--pretend-missing-kernel-feature", name])
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: the agent started: {err}");
        assert!(
            err.contains(&format!("lacks {name}"))
                && err.contains(&format!("Linux {since}"))
                && err.contains("the agent needs Linux 5.15 or newer"),
            "{name}: {err}"
        );
        assert!(
            !std::path::Path::new("/sys/fs/bpf").join(&pin_name).exists(),
            "{name}: something was pinned before the refusal"
        );
    }
    Ok(())
}

/// The kernel programs report rare events through aya-log, and the agent forwards them at debug
/// level: with the pod's listeners taken out of `INBOUND_SOCKS` behind the agent's back,
/// `sk_lookup` refuses a plaintext connection from outside the mesh to the enrolled server; at the default level nothing is said,
/// and after `/logging` turns on `mesh_agent::capture=debug` each refusal is in the agent's log.
#[test]
fn kernel_rare_events_reach_the_agent_log_when_logging_turns_them_on() -> Result<()> {
    let mut c = Cluster::new(
        vec![vec![PodSpec::bare("bare"), PodSpec::mesh("server")]],
        vec![],
    )?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    let url = format!("http://{}:{APP_PORT}/", c.pod("server").ip);
    assert_eq!(c.http_status("bare", &url)?, Some(200));
    // Take every listener out of the map, as if the agent had lost them.
    let map = std::path::Path::new("/sys/fs/bpf")
        .join(&c.nodes[0].pin_name)
        .join("maps/INBOUND_SOCKS");
    let dump = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()?;
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout)
        .with_context(|| String::from_utf8_lossy(&dump.stderr).into_owned())?;
    let entries = entries.as_array().context("bpftool's dump")?;
    assert!(!entries.is_empty(), "no listener in {}", map.display());
    for e in entries {
        let key: Vec<String> = e["key"]
            .as_array()
            .context("an entry's key")?
            .iter()
            .map(|b| {
                b.as_str()
                    .unwrap_or("")
                    .trim_start_matches("0x")
                    .to_string()
            })
            .collect();
        let st = std::process::Command::new("bpftool")
            .args(["map", "delete", "pinned"])
            .arg(&map)
            .arg("key")
            .arg("hex")
            .args(&key)
            .status()?;
        assert!(st.success(), "bpftool map delete {key:?}");
    }
    let said = "kernel: sk_lookup: an enrolled pod has no proxy listener for port 8080";
    assert_ne!(c.http_status("bare", &url)?, Some(200));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !c.agent_log(0).contains(said),
        "logged at the default level"
    );
    let set = c.set_log_filter(0, "info,mesh_agent::capture=debug")?;
    assert!(set.ends_with(" 200"), "{set}");
    assert_ne!(c.http_status("bare", &url)?, Some(200));
    wait_until(
        "the kernel's event in the agent's log",
        Duration::from_secs(5),
        || Ok(c.agent_log(0).contains(said)),
    )
    .with_context(|| c.agent_log(0))?;
    Ok(())
}

/// 2,000 tunnels opened at once from one pod to one remote pod: concurrent callers share the
/// dials in progress, so the pool opens about 2000 / 100 HBONE connections (the server allows
/// 1024 streams each, the pool puts at most 100 on one), not one per caller; once the tunnels
/// end, the connections close after the idle timeout and the agent's descriptors return.
#[test]
fn concurrent_tunnels_share_dials_and_idle_connections_close() -> Result<()> {
    const HELD: usize = 2000;
    // A port declared `tcp`: each client connection is its own tunnel (HTTP would be pooled).
    let c = Cluster::client_server(
        vec![ServiceSpec::new("raw", 80, APP_PORT, &["server"]).app_protocol("tcp")],
        APP_PORT,
        &["--hbone-idle-timeout", "1s"],
    )?;
    let vip = c.service_ip("raw");
    let fds = |c: &Cluster| -> Result<usize> {
        let pid = c.agent_pid(0).context("agent pid")?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    };
    // HBONE sockets as the kernel sees them, in the client pod's netns where they are made.
    let sockets = |c: &Cluster| -> Result<usize> {
        let out = c.exec(
            "client",
            &["ss", "-Htn", "state", "established", "( dport = :15008 )"],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    };
    let fds_before = fds(&c)?;
    let mut hold = c.spawn_testapp(
        "client",
        &[
            "hold",
            "--addr",
            &format!("{vip}:80"),
            "--count",
            &HELD.to_string(),
            "--parallel",
            "64",
        ],
    )?;
    let stdout = hold.stdout.take().context("hold's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(120));
    let streams = c.counter(1, "server", "hbone_streams")?;
    let conns = c.counter(1, "server", "hbone_connections")?;
    let pooled = c.stats(0)?["hbone_pool_connections"].as_u64();
    let open = sockets(&c)?;
    drop(hold.stdin.take());
    let _ = hold.kill();
    let _ = hold.wait();
    let line =
        line.context("holding the connections stalled: a CONNECT waited for a stream slot")?;
    println!(
        "{HELD} concurrent tunnels: {conns} HBONE connections accepted, {open} sockets, pool {pooled:?}"
    );
    assert_eq!(line.trim(), format!("ready {HELD}"));
    assert_eq!(
        streams, HELD as u64,
        "every connection is one CONNECT stream"
    );
    let least = HELD.div_ceil(100) as u64;
    assert!(
        (least..=least + 2).contains(&conns),
        "{conns} HBONE connections for {HELD} tunnels (at least {least})"
    );
    assert_eq!(open as u64, conns, "the kernel sees the pool's connections");
    // Idle: every connection closes, and the descriptors go with them.
    wait_until(
        "idle HBONE connections closed",
        Duration::from_secs(15),
        || Ok(sockets(&c)? == 0 && c.stats(0)?["hbone_pool_connections"].as_u64() == Some(0)),
    )?;
    let fds_after = fds(&c)?;
    println!("agent descriptors: {fds_before} before, {fds_after} after idling");
    assert!(fds_after <= fds_before + 8, "{fds_before} → {fds_after}");
    Ok(())
}

/// Runs `mesh-testapp stream` from `pod` to each address; returns the bytes (sent, received).
fn stream_through(
    c: &Cluster,
    pod: &str,
    addrs: &[String],
    send: u64,
    reply: u64,
) -> Result<(u64, u64)> {
    let (mut sent, mut received) = (0, 0);
    for addr in addrs {
        let out = c.testapp(
            pod,
            &[
                "stream",
                "--addr",
                addr,
                "--send",
                &send.to_string(),
                "--reply",
                &reply.to_string(),
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).context("stream output")?;
        sent += v["sent"].as_u64().context("sent")?;
        received += v["received"].as_u64().context("received")?;
    }
    Ok((sent, received))
}

/// The loopback bypass paced by its readers. Where the kernel loads tracing programs (the 6.1
/// guest), `fexit` on `sk_msg_recvmsg` counts what each reader took, and a sender bypasses while
/// its reader is within `LOOP_WINDOW`; elsewhere (or with `prog_tracing` pretended missing) each
/// socket bypasses a lifetime budget. Checked in both modes:
/// - a reader that keeps up (16 MiB sent over 4 s, four budgets) is never moved to TCP when
///   paced, and is once its budget is spent otherwise;
/// - a bulk transfer (1 GiB) through the bypass arrives whole, its sha256 checked by the server,
///   with no ENOMEM, and the pacing maps are empty again once it closed;
/// - iperf3 through the bypass completes.
///
/// A blocking reader's reads that ended with EAGAIN are counted and printed
/// (`MESH_TEST_EXPECT_NO_EAGAIN=1` makes any fail the test).
#[test]
fn the_loopback_bypass_is_paced_by_its_reader_where_the_kernel_allows_it() -> Result<()> {
    const PORT: u16 = 9000;
    const IPERF: u16 = 5201;
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client"), PodSpec::mesh("server")]],
        vec![ServiceSpec::new("raw", PORT, PORT, &["server"]).app_protocol("tcp")],
    )?;
    let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
    c.spawn(
        "server",
        &[&app, "stream-serve", "--port", &PORT.to_string()],
    )?;
    c.spawn("server", &["iperf3", "-s", "-p", &IPERF.to_string()])?;
    c.wait_listening("server", PORT)?;
    c.wait_listening("server", IPERF)?;
    let addr = format!("{}:{PORT}", c.service_ip("raw"));
    let expect_paced = std::env::var("MESH_TEST_EXPECT_PACED").as_deref() == Ok("1");
    let strict_eagain = std::env::var("MESH_TEST_EXPECT_NO_EAGAIN").as_deref() == Ok("1");
    let bulk: u64 = std::env::var("MESH_TEST_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
        << 20;
    let modes: [(&[&str], bool); 2] = [
        (&["--loop-bypass=true"], false),
        (
            &[
                "--loop-bypass=true",
                "--pretend-missing-kernel-feature",
                "prog_tracing",
            ],
            true,
        ),
    ];
    for (flags, pretend) in modes {
        c.kill_agent(0);
        c.start_agent_with(0, flags)?;
        c.wait_ready(0, Duration::from_secs(15))?;
        let dump: serde_json::Value = serde_json::from_str(&c.agent_get(0, "/config_dump")?.1)?;
        let tracing = dump["kernel_features"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == "prog_tracing"))
            .and_then(|f| f["available"].as_bool())
            .context("prog_tracing in kernel_features")?;
        let mode = loop_bypass_mode(&c, 0)?;
        assert_eq!(
            mode,
            if tracing && !pretend {
                "paced"
            } else {
                "budget"
            },
            "{flags:?}: prog_tracing available: {tracing}"
        );
        if expect_paced {
            assert!(
                pretend || mode == "paced",
                "this kernel must pace the bypass"
            );
        }
        let paced = mode == "paced";
        let events =
            |f: &dyn Fn(&[mesh_tests::Sample]) -> f64| -> Result<f64> { Ok(f(&c.scrape(0)?)) };
        #[allow(clippy::type_complexity)]
        let loopback = |outcome: &'static str, reason: &'static str| {
            move |s: &[mesh_tests::Sample]| bpf_event(s, "loopback", outcome, reason)
        };
        let stream = |send: u64, reply: u64, seconds: Option<u64>| -> Result<serde_json::Value> {
            let (send, reply) = (send.to_string(), reply.to_string());
            let secs = seconds.map(|s| s.to_string());
            let mut args = vec![
                "stream", "--addr", &addr, "--send", &send, "--reply", &reply,
            ];
            if let Some(secs) = &secs {
                args.extend(["--seconds", secs]);
            }
            let out = c
                .testapp("client", &args)
                .with_context(|| format!("agent log:\n{}", c.agent_log(0)))?;
            let v: serde_json::Value = serde_json::from_str(out.trim()).context("stream output")?;
            let would_block = v["would_block"].as_u64().context("would_block")?;
            println!(
                "{mode}: stream of {send} bytes: {would_block} blocking reads ended with EAGAIN"
            );
            if strict_eagain {
                assert_eq!(would_block, 0, "{mode}: a blocking read ended with EAGAIN");
            }
            Ok(v)
        };

        // A reader that keeps up: four budgets, sent over 4 s.
        let (bypassed, limited) = (
            events(&loopback("bypassed", "-"))?,
            events(&loopback("tcp", "limit_reached"))?,
        );
        stream(16 << 20, 64 << 10, Some(4))?;
        let bypassed = events(&loopback("bypassed", "-"))? - bypassed;
        let limited = events(&loopback("tcp", "limit_reached"))? - limited;
        // The client's connect to 15001 and the proxy's delivery to the server.
        assert!(
            bypassed >= 2.0,
            "{mode}: only {bypassed} connecting ends bypassed"
        );
        if paced {
            assert_eq!(
                limited, 0.0,
                "a reader that keeps up moved its sender to TCP"
            );
        } else {
            assert!(limited >= 1.0, "16 MiB bypassed past a 4 MiB budget");
        }

        // Bulk: whatever the reader's pace, every byte arrives in order, and nothing is left
        // in the pacing maps once the connections closed.
        // The full size where it is paced. The budget moves to TCP after 4 MiB; where it is
        // a pretence (a kernel that could pace), 64 MiB shows that, and the host checks it at
        // full size.
        let size = if pretend && tracing {
            bulk.min(64 << 20)
        } else {
            bulk
        };
        let started = std::time::Instant::now();
        let v = stream(size, 1 << 20, None)?;
        println!("{mode}: {size} bytes checked in {:.1?}", started.elapsed());
        assert_eq!(
            v["sent"].as_u64(),
            Some(size + format!("{}\n", 1u64 << 20).len() as u64)
        );
        wait_until("the pacing maps to empty", Duration::from_secs(5), || {
            let dump: serde_json::Value = serde_json::from_str(&c.agent_get(0, "/config_dump")?.1)?;
            let entries = |name: &str| {
                dump["bpf"]["maps"]
                    .as_array()
                    .and_then(|m| m.iter().find(|m| m["name"] == name))
                    .and_then(|m| m["entries"].as_u64())
            };
            Ok(entries("LOOP_PACE") == Some(0) && entries("LOOP_READ") == Some(0))
        })?;

        // iperf3 through the bypass, 3 s each way.
        let server = c.pod("server").ip.to_string();
        for reverse in [false, true] {
            let mut args = vec!["iperf3", "-c", &server, "-p", "5201", "-t", "3", "-J"];
            if reverse {
                args.push("-R");
            }
            let out = c.exec("client", &args)?;
            let json: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
            assert!(
                out.status.success() && json.get("error").is_none(),
                "{mode}: iperf3 {args:?}: {}",
                json["error"]
            );
            let got = json["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
            assert!(got > 0.0, "{mode}: iperf3 moved nothing");
            println!(
                "{mode}: iperf3{}: {:.2} Gbit/s",
                if reverse { " -R" } else { "" },
                json["end"]["sum_received"]["bits_per_second"]
                    .as_f64()
                    .unwrap_or(0.0)
                    / 1e9
            );
        }
    }
    Ok(())
}

/// How node `i`'s agent runs the loopback bypass, from its `/config_dump`.
fn loop_bypass_mode(c: &Cluster, i: usize) -> Result<String> {
    let (code, body) = c.agent_get(i, "/config_dump")?;
    anyhow::ensure!(code == 200, "/config_dump answered {code}");
    let dump: serde_json::Value = serde_json::from_str(&body)?;
    dump["loop_bypass"]
        .as_str()
        .map(str::to_string)
        .context("loop_bypass in /config_dump")
}

/// Same node, opaque TCP: once policy allows the connection, the kernel moves its bytes from
/// one proxy socket to the other. Every byte arrives in order both ways, including the server's
/// greeting (queued before the splice was made) and what detection had read; each FIN is passed
/// on only after the bytes before it (the server hashes up to the client's FIN, the client reads
/// up to the server's); and the counts the proxy reports are exact though it never saw a byte.
/// The same holds when the splice takes over a running relay after its first MiB (the
/// default), and with the splice off, when the proxy relays everything.
#[test]
fn same_node_tcp_is_spliced_in_the_kernel_with_every_byte_and_fin_in_order() -> Result<()> {
    const PORT: u16 = 9000;
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client"), PodSpec::mesh("server")]],
        vec![
            ServiceSpec::new("raw", PORT, PORT, &["server"]).app_protocol("tcp"),
            ServiceSpec::new("web", 80, APP_PORT, &["server"]).app_protocol("tcp"),
        ],
    )?;
    c.serve("server", APP_PORT)?;
    let app = artifact("mesh-testapp")?.to_string_lossy().into_owned();
    c.spawn(
        "server",
        &[&app, "stream-serve", "--port", &PORT.to_string()],
    )?;
    c.wait_listening("server", PORT)?;
    // Pod address: detected as opaque (detection read the first line). Service: `tcp`, so
    // never detected.
    let addrs = [
        format!("{}:{PORT}", c.pod("server").ip),
        format!("{}:{PORT}", c.service_ip("raw")),
    ];
    let (send, reply) = (24u64 << 20, 40u64 << 20);

    // With the loopback bypass off (the default): spliced at once, after the default first MiB
    // (the hand-off from a running relay), and not at all. With it on, relayed, every pod-proxy
    // hop skipping TCP for its first bytes.
    let modes: [(&[&str], bool); 4] = [
        (&["--same-node-splice-after-bytes=0"], true),
        (&[], true),
        (&["--same-node-splice=false"], false),
        (&["--loop-bypass=true"], false),
    ];
    for (flags, splice) in modes {
        let bypass = flags == ["--loop-bypass=true"];
        c.kill_agent(0);
        c.start_agent_with(0, flags)?;
        c.wait_ready(0, Duration::from_secs(15))?;
        let before = c.scrape(0)?;
        let (sent, received) = stream_through(&c, "client", &addrs, send, reply)
            .with_context(|| format!("agent log:\n{}", c.agent_log(0)))?;
        let after = c.scrape(0)?;
        let loopback = |outcome: &str, reason: &str| {
            bpf_event(&after, "loopback", outcome, reason)
                - bpf_event(&before, "loopback", outcome, reason)
        };
        // Each connection has two connecting ends on loopback (the client's, and the proxy's
        // delivery), and each decides once, at its first send.
        let took = loopback("bypassed", "-");
        let decided = took + loopback("tcp", "early_send");
        if bypass {
            assert_eq!(decided, 4.0, "two connections, two connecting ends each");
            assert!(took >= 2.0, "only {took} of 4 connecting ends bypassed TCP");
            // Both streams send more than a socket's budget both ways: on the budget, the
            // bypassing ends go on by TCP mid-stream, and the digests above prove no byte
            // overtook another. (Paced, a reader that keeps up keeps its sender bypassing:
            // `the_loopback_bypass_is_paced_by_its_reader_where_the_kernel_allows_it`.)
            if loop_bypass_mode(&c, 0)? == "budget" {
                let spent = loopback("tcp", "limit_reached");
                assert!(
                    spent >= took,
                    "{took} ends bypassed, {spent} spent their budget"
                );
            }
        } else {
            assert_eq!(
                decided, 0.0,
                "{flags:?}: nothing enters the bypass while it is off"
            );
        }
        let spliced = c.counter(0, "client", "outbound_spliced")?;
        assert_eq!(spliced, if splice { 2 } else { 0 }, "{flags:?}");
        assert_eq!(c.counter(0, "client", "outbound_local")?, 2);
        // Counts are filed when a connection ends, a moment after the client is done.
        wait_until("byte counts", Duration::from_secs(5), || {
            Ok(c.counter(0, "client", "outbound_bytes_received")? == received)
        })?;
        assert_eq!(
            c.counter(0, "client", "outbound_bytes_sent")?,
            sent,
            "{flags:?}"
        );
        assert_eq!(
            c.counter(0, "server", "inbound_bytes_delivered")?,
            sent,
            "{flags:?}"
        );
        let samples = c.scrape(0)?;
        let total = |name: &str, reporter: &str| -> f64 {
            samples
                .iter()
                .filter(|s| {
                    s.name == name
                        && s.labels.get("reporter").map(String::as_str) == Some(reporter)
                        && s.labels.get("source_workload").map(String::as_str) == Some("client")
                })
                .map(|s| s.value)
                .sum()
        };
        for reporter in ["source", "destination"] {
            assert_eq!(
                [
                    total("istio_tcp_received_bytes_total", reporter),
                    total("istio_tcp_sent_bytes_total", reporter),
                    total("istio_tcp_connections_closed_total", reporter),
                ],
                [sent as f64, received as f64, 2.0],
                "{flags:?}, {reporter} report"
            );
        }
        // A server that answers and closes at once often has its FIN in before the splice is
        // made: then the kernel will not take its socket, and the proxy copies the answer.
        let url = format!("http://{}/", c.service_ip("web"));
        let script = format!(
            "n=0; for i in $(seq 100); do curl -sS --max-time 5 -o /dev/null -w '%{{http_code}}\\n' -H 'Connection: close' {url} | grep -q 200 && n=$((n+1)); done; echo $n"
        );
        let out = c.exec("client", &["sh", "-c", &script])?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "100",
            "{flags:?}: answered-and-closed requests: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dropped: f64 = samples
            .iter()
            .filter(|s| {
                s.name == "mesh_bpf_events_total"
                    && s.labels.get("hook").map(String::as_str) == Some("splice")
            })
            .map(|s| s.value)
            .sum();
        assert_eq!(dropped, 0.0, "the verdict never missed a peer");
    }
    Ok(())
}
