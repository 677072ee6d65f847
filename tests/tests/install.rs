//! The Kubernetes install, run as its objects run it, against the stand-in API server, with
//! real agents in Kubernetes mode on both nodes (each with only the install's capabilities),
//! real certificates and real bytes:
//! - the CA as its Deployment runs it (`mesh-agent ca --kubernetes`): the root in a Secret, the
//!   bundle in a ConfigMap, agents authenticated by TokenReview of their projected tokens and
//!   authorized by the pods the API schedules on their node;
//! - uninstall against restart: SIGTERM removes capture only when the DaemonSet is gone;
//! - the kubelet's probes, from outside the agent's loopback; versions.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{
    Cluster, PodSpec, ServiceSpec,
    apiserver::TokenInfo,
    artifact,
    kube::{AGENT_SERVICE_ACCOUNT, CA_AUDIENCE, MESH_NAMESPACE, enrolled_cluster_with},
    wait_until,
};
use serde_json::json;

const APP_PORT: u16 = 8080;
/// A second CA replica's address, beside the harness's `CA_ADDR`.
const REPLICA_ADDR: &str = "198.19.0.254:15013";

/// client on node 1, server on node 2, `web` over server, all enrolled, certificates of `ttl`.
fn pair(ttl: &str) -> Result<Cluster> {
    enrolled_cluster_with(
        vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
        vec![ServiceSpec::new("web", 80, APP_PORT, &["server"])],
        ttl,
    )
}

/// `mesh-agent ca request` from node `from`'s network with the token in `token_file`, for
/// `default/<sa>`, at `addr`: (whether it was signed, what it printed).
fn request(c: &Cluster, addr: &str, token_file: &Path, sa: &str) -> Result<(bool, String)> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", c.nodes[0].netns.display()))
        .arg(artifact("mesh-agent")?)
        .args(["ca", "request", "--ca-addr", addr, "--ca-token-file"])
        .arg(token_file)
        .arg("--ca-bundle")
        .arg(c.kube_bundle_file())
        .arg(format!("spiffe://cluster.local/ns/default/sa/{sa}"))
        .env("NO_COLOR", "1")
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

/// A token TokenReview answers for, written to a file.
fn token(
    c: &Cluster,
    name: &str,
    user: serde_json::Value,
    aud: &str,
    expires: Option<SystemTime>,
) -> Result<std::path::PathBuf> {
    c.kube()?.api.add_token(
        name,
        TokenInfo {
            user,
            audiences: vec![aud.into()],
            expires,
        },
    );
    let file = c.dir().join(format!("{name}.token"));
    std::fs::write(&file, name)?;
    Ok(file)
}

/// `mesh-agent ca <args>` against the stand-in, from the network the CA and the API server are
/// on.
fn ca_cmd(c: &Cluster, args: &[&str]) -> Result<Child> {
    Ok(Command::new("nsenter")
        .arg(format!("--net={}", c.fabric().display()))
        .arg(artifact("mesh-agent")?)
        .arg("ca")
        .args(args)
        .arg("--kubernetes")
        .arg("--kubeconfig")
        .arg(c.kube()?.api.kubeconfig())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

fn ca_step(c: &Cluster, action: &str) -> Result<()> {
    let out = ca_cmd(c, &[action])?.wait_with_output()?;
    if !out.status.success() {
        bail!("ca {action}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The root Secret's `key`.
fn secret_key(c: &Cluster, key: &str) -> Result<String> {
    let s = c
        .kube()?
        .api
        .get("v1", "Secret", MESH_NAMESPACE, "mesh-ca-root")?;
    let b64 = s["data"][key]
        .as_str()
        .with_context(|| format!("no {key} in {s}"))?;
    use base64::Engine;
    Ok(String::from_utf8(
        base64::engine::general_purpose::STANDARD.decode(b64)?,
    )?)
}

#[test]
fn one_ca_deployment_signs_for_both_nodes_and_refuses_other_nodes_audiences_accounts_and_expired_tokens()
-> Result<()> {
    let mut c = pair("1h")?;
    // Both agents got their pods' certificates from the one CA process (asked for once the pods
    // are enrolled, so waited for): cross-node mTLS works.
    wait_until("both pods' certificates", Duration::from_secs(10), || {
        Ok(
            c.issued(0, "client-sa").unwrap_or(0) >= 1
                && c.issued(1, "server-sa").unwrap_or(0) >= 1,
        )
    })?;
    let vip = format!("http://{}:80/", c.service_ip("web"));
    assert_eq!(c.http_status("client", &vip)?, Some(200));
    let log = c.ca_log();
    for node in [&c.nodes[0].name, &c.nodes[1].name] {
        assert!(
            log.contains(&format!("node={node}")) && log.contains("signed"),
            "the CA signed for {node}:\n{log}"
        );
    }
    // The root is the Secret's, and the ConfigMap publishes its bundle.
    assert_eq!(secret_key(&c, "bundle.pem")?, c.sync_kube_bundle()?);

    // A second replica serves beside it with the same root: its answer carries the same bundle.
    let log = std::fs::File::create(c.dir().join("ca-replica.log"))?;
    let replica = Command::new("nsenter")
        .arg(format!("--net={}", c.fabric().display()))
        .arg(artifact("mesh-agent")?)
        .args([
            "ca",
            "--kubernetes",
            "--listen",
            REPLICA_ADDR,
            "--cert-ttl",
            "1h",
            "--kubeconfig",
        ])
        .arg(c.kube()?.api.kubeconfig())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let _replica = scopeguard(replica);
    let mine = c.agent_token_file(0);
    wait_until("the second CA replica", Duration::from_secs(10), || {
        Ok(request(&c, REPLICA_ADDR, &mine, "client-sa")?.0)
    })?;
    let (_, signed) = request(&c, REPLICA_ADDR, &mine, "client-sa")?;
    assert!(signed.contains("BEGIN CERTIFICATE"), "{signed}");

    // Node 1's agent (its token bound to its pod, node-name extra set) may have its own pods'
    // identity, not node 2's.
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &mine, "client-sa")?;
    assert!(ok, "{out}");
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &mine, "server-sa")?;
    assert!(
        !ok && out.contains("403") && out.contains("may not obtain"),
        "{out}"
    );
    // Node 2's token is bound to its pod only: the CA finds the node through the pod.
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &c.agent_token_file(1), "server-sa")?;
    assert!(ok, "{out}");
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &c.agent_token_file(1), "client-sa")?;
    assert!(!ok && out.contains("403"), "{out}");

    let agent = format!("system:serviceaccount:{MESH_NAMESPACE}:{AGENT_SERVICE_ACCOUNT}");
    let bound = json!({"authentication.kubernetes.io/node-name": [c.nodes[0].name]});
    // The agents' account, for another audience.
    let f = token(
        &c,
        "wrong-audience",
        json!({"username": agent, "extra": bound}),
        "https://kubernetes.default.svc",
        None,
    )?;
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &f, "client-sa")?;
    assert!(!ok && out.contains("401"), "{out}");
    // Our audience, another service account (a workload's own token).
    let f = token(
        &c,
        "other-account",
        json!({"username": "system:serviceaccount:default:client-sa", "extra": bound}),
        CA_AUDIENCE,
        None,
    )?;
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &f, "client-sa")?;
    assert!(!ok && out.contains("401") && out.contains("only"), "{out}");
    // The agents' account and audience, expired.
    let past = SystemTime::now() - Duration::from_secs(1);
    let f = token(
        &c,
        "expired",
        json!({"username": agent, "extra": bound}),
        CA_AUDIENCE,
        Some(past),
    )?;
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &f, "client-sa")?;
    assert!(
        !ok && out.contains("401") && out.contains("expired"),
        "{out}"
    );
    // Bound to an agent pod that was recreated since (its UID changed).
    let f = token(
        &c,
        "old-pod",
        json!({"username": agent, "extra": {"authentication.kubernetes.io/pod-name": [format!("mesh-agent-{}", c.nodes[0].name)], "authentication.kubernetes.io/pod-uid": ["a-uid-from-before"]}}),
        CA_AUDIENCE,
        None,
    )?;
    let (ok, out) = request(&c, mesh_tests::CA_ADDR, &f, "client-sa")?;
    assert!(
        !ok && out.contains("401") && out.contains("recreated"),
        "{out}"
    );
    c.stop_ca();
    Ok(())
}

#[test]
fn a_root_rotation_through_the_secret_under_steady_traffic_fails_no_request() -> Result<()> {
    let c = pair("4s")?;
    let target: SocketAddr = (c.pod("server").ip, APP_PORT).into();
    let issuer = |node: usize, sa: &str| -> Result<String> {
        Ok(c.stats(node)?["certificates"][format!("spiffe://cluster.local/ns/default/sa/{sa}")]
            ["issuer"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let old_issuer = issuer(0, "client-sa")?;
    let old_root = secret_key(&c, "root-cert.pem")?;
    // 20 s at 50 requests/s, a new connection each, while the root is prepared, activated and
    // the old one retired through the Secret.
    let out = c.load("client", target, 50, 20, true)?;
    std::thread::sleep(Duration::from_secs(2));
    ca_step(&c, "rotate-root")?;
    let both = |pem: &str| pem.matches("BEGIN CERTIFICATE").count() == 2;
    wait_until(
        "the bundle ConfigMap to list both roots",
        Duration::from_secs(10),
        || Ok(both(&c.sync_kube_bundle()?)),
    )?;
    wait_until(
        "both agents to trust the new root",
        Duration::from_secs(10),
        || Ok(c.stats(0)?["trust_roots"] == 2 && c.stats(1)?["trust_roots"] == 2),
    )?;
    ca_step(&c, "activate-root")?;
    assert_ne!(secret_key(&c, "root-cert.pem")?, old_root);
    wait_until(
        "certificates from the new root",
        Duration::from_secs(10),
        || Ok(issuer(0, "client-sa")? != old_issuer && issuer(1, "server-sa")? != old_issuer),
    )?;
    // Once no certificate of the old root is left (4 s lifetimes), it is retired.
    std::thread::sleep(Duration::from_secs(5));
    ca_step(&c, "retire-roots")?;
    wait_until(
        "the bundle ConfigMap to list one root",
        Duration::from_secs(10),
        || Ok(c.sync_kube_bundle()?.matches("BEGIN CERTIFICATE").count() == 1),
    )?;
    let result = mesh_tests::load_result(&out, Duration::from_secs(30))?;
    println!("rotation through the Secret: {result}");
    assert_eq!(
        result["errors"], 0,
        "failed requests during rotation: {result}"
    );
    assert_eq!(result["requests"], 1000, "{result}");
    // With no rotation prepared, activating is refused with what to do instead.
    let out = ca_cmd(&c, &["activate-root"])?.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("rotate-root"),
        "{text}"
    );
    Ok(())
}

/// Kills the child when dropped.
fn scopeguard(child: Child) -> impl Drop {
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    Kill(child)
}

/// Objects pinned under node `i`'s pin directory (links, programs, maps).
fn pinned(c: &Cluster, i: usize) -> usize {
    let root = Path::new("/sys/fs/bpf").join(&c.nodes[i].pin_name);
    ["links", "progs", "maps"]
        .iter()
        .filter_map(|d| std::fs::read_dir(root.join(d)).ok())
        .map(|r| r.count())
        .sum()
}

#[test]
fn a_restart_keeps_capture_and_deleting_the_daemonset_then_stopping_removes_it() -> Result<()> {
    let mut c = pair("1h")?;
    let url = format!("http://{}:{APP_PORT}/", c.pod("server").ip);
    assert_eq!(c.http_status("client", &url)?, Some(200));
    let served = |c: &Cluster| c.app_requests("server", APP_PORT);
    let before = pinned(&c, 0);
    assert!(before > 0, "capture is pinned");

    // A restart (the DaemonSet is in place): SIGTERM keeps every pin, and the client's traffic
    // fails closed until the agent is back, never leaving in plain text.
    let st = c.stop_agent(0)?;
    assert!(st.success(), "{st}");
    assert!(
        c.agent_log(0).contains("capture stays in place"),
        "{}",
        c.agent_log(0)
    );
    assert_eq!(pinned(&c, 0), before, "a restart keeps capture");
    let served_before = served(&c)?;
    let (code, out) = c.curl("client", &["-o", "/dev/null", "--max-time", "3", &url])?;
    assert_ne!(code, 0, "no agent, no connection: {out}");
    assert_eq!(served(&c)?, served_before, "nothing reached the server");
    c.start_agent(0)?;
    assert_eq!(c.http_status("client", &url)?, Some(200));

    // Uninstall: the DaemonSet is deleted, then its agents get SIGTERM. Every pin goes, and the
    // formerly enrolled client reaches the server in plain TCP with no agent anywhere.
    c.kubectl()?.run(
        &["delete", "daemonset", "-n", MESH_NAMESPACE, "mesh-agent"],
        None,
    )?;
    for i in 0..2 {
        let st = c.stop_agent(i)?;
        assert!(st.success(), "{st}");
        assert!(
            c.agent_log(i).contains("the mesh is being uninstalled"),
            "{}",
            c.agent_log(i)
        );
        assert_eq!(pinned(&c, i), 0, "node {i} keeps no pinned object");
        assert!(
            !Path::new("/sys/fs/bpf").join(&c.nodes[i].pin_name).exists(),
            "node {i}'s pin directory is gone"
        );
    }
    let served_before = served(&c)?;
    assert_eq!(c.http_status("client", &url)?, Some(200));
    assert_eq!(
        served(&c)?,
        served_before + 1,
        "the request reached the server directly"
    );
    Ok(())
}

/// A rollout as the DaemonSet does it (`maxSurge: 1`): the new agent starts beside the old one
/// and takes over; the old one drains and then waits for the kubelet's SIGTERM instead of
/// exiting (the kubelet would restart it, and it would take the sockets back), and at SIGTERM
/// it leaves capture to its successor.
#[test]
fn a_rollout_hands_over_and_the_old_agent_waits_for_its_sigterm() -> Result<()> {
    let mut c = pair("1h")?;
    let url = format!("http://{}:{APP_PORT}/", c.pod("server").ip);
    let get = |c: &Cluster| -> Result<()> {
        let (code, out) = c.curl("client", &["-o", "/dev/null", "-w", "%{http_code}", &url])?;
        anyhow::ensure!(
            out.trim() == "200",
            "curl exit {code}: {out}\nnode 0:\n{}\nnode 1:\n{}",
            c.agent_log(0),
            c.agent_log(1)
        );
        Ok(())
    };
    get(&c)?;
    let before = pinned(&c, 0);
    c.upgrade_agent(0, &artifact("mesh-ebpf-variant.o")?, &[])?;
    get(&c)?;
    wait_until("the old agent to drain", Duration::from_secs(10), || {
        Ok(c.agent_log(0).contains("handover: drained"))
    })?;
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        c.retired_running(0)?,
        "a drained agent in Kubernetes waits for its SIGTERM:\n{}",
        c.agent_log(0)
    );
    let st = c.stop_retired(0)?;
    assert!(st.success(), "{st}");
    assert!(
        !c.agent_log(0).contains("being uninstalled"),
        "{}",
        c.agent_log(0)
    );
    assert_eq!(pinned(&c, 0), before, "the successor keeps capture");
    assert_eq!(c.http_status("client", &url)?, Some(200));
    Ok(())
}

#[test]
fn the_kubelets_probe_from_outside_answers_as_ready_does_and_versions_are_visible() -> Result<()> {
    let mut c = pair("1h")?;
    // The kubelet's request: GET on the node's address, from outside the agent's loopback.
    let node: SocketAddr = "198.19.0.1:15021".parse()?;
    let probe = |c: &Cluster, path: &str| -> Result<(u16, String)> {
        mesh_tests::in_netns(c.fabric(), || mesh_tests::http_get(node, path))?
    };
    assert_eq!(probe(&c, "/ready")?.0, 200);
    assert_eq!(probe(&c, "/healthz")?.0, 200);
    // Nothing but the probes leaves localhost.
    for internal in ["/stats", "/config_dump", "/debug/flows", "/logging"] {
        assert_eq!(probe(&c, internal)?.0, 404, "{internal}");
    }

    // Not ready: the agent restarts while the CA is away, so its pods have no certificates.
    // The probe says what /ready says, reason and all.
    c.stop_ca();
    c.kill_agent(0);
    c.start_agent_with(0, &[])?;
    // Right after the start the reason is first "not applied yet"; wait for the one this
    // case is about, which lasts while the CA is away.
    wait_until(
        "node 1 to miss its certificates",
        Duration::from_secs(10),
        || {
            Ok(c.agent_get(0, "/ready")
                .is_ok_and(|r| r.0 == 503 && r.1.contains("certificates missing")))
        },
    )?;
    let (admin, outside) = (c.agent_get(0, "/ready")?, probe(&c, "/ready")?);
    assert_eq!(outside, admin);
    assert!(outside.1.contains("certificates missing"), "{}", outside.1);
    assert_eq!(probe(&c, "/healthz")?.0, 200, "alive while not ready");
    c.start_kube_ca("1h")?;
    c.wait_ready(0, Duration::from_secs(15))?;
    assert_eq!(probe(&c, "/ready")?.0, 200);

    // Versions: the agent's on /version and in mesh_build_info; the CLI prints both.
    let version = env!("CARGO_PKG_VERSION");
    let v: serde_json::Value = serde_json::from_str(&probe(&c, "/version")?.1)?;
    assert_eq!(v["version"], version);
    let build = c
        .scrape(0)?
        .into_iter()
        .find(|s| s.name == "mesh_build_info")
        .context("mesh_build_info")?;
    assert_eq!(
        build.labels.get("version").map(String::as_str),
        Some(version)
    );
    let cli = |netns: &Path| -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg(artifact("mesh-agent")?)
            .arg("version")
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let here = cli(&c.nodes[0].netns)?;
    assert!(
        here.contains(&format!("mesh-agent CLI: {version}"))
            && here.contains(&format!("agent at 127.0.0.1:15000: {version}")),
        "{here}"
    );
    let nowhere = cli(c.fabric())?;
    assert!(nowhere.contains("agent: not reachable"), "{nowhere}");
    Ok(())
}
