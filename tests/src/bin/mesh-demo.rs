//! `cargo xtask demo [--kubernetes]`: a CA and two nodes with two pods each, real agents, traffic pod→pod and
//! pod→service (across nodes as mTLS HBONE tunnels), then what each agent captured per pod, the
//! identities it holds, an authorization policy denying one caller, `explain` saying why and
//! `flows` listing the denial. Cleans up on exit, also
//! on failure (the harness tears down on drop).

use anyhow::{Result, ensure};
use mesh_agent::discovery::nodefile::raw::policy::{
    RawAuthorizationPolicy, RawFrom, RawRule, RawSelector, RawSource,
};
use mesh_tests::{Cluster, PodSpec, ServiceSpec};

const PORT: u16 = 8080;

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--kubernetes") {
        return kubernetes();
    }
    println!("building a CA and 2 nodes x 2 pods out of network namespaces, veth and cgroup v2...");
    let mut c = Cluster::new(
        vec![
            vec![PodSpec::mesh("frontend"), PodSpec::mesh("worker")],
            vec![PodSpec::mesh("backend-a"), PodSpec::mesh("backend-b")],
        ],
        vec![ServiceSpec::new(
            "backend",
            80,
            PORT,
            &["backend-a", "backend-b"],
        )],
    )?;
    for p in ["frontend", "worker", "backend-a", "backend-b"] {
        c.serve(p, PORT)?;
    }
    c.start_agent(0)?;
    c.start_agent(1)?;
    for p in &c.pods {
        println!("  {:<10} node-{}  {}", p.name, p.node + 1, p.ip);
    }
    println!(
        "  service backend  {}:80 -> backend-a, backend-b :{PORT}",
        c.service_ip("backend")
    );

    let run = |from: &str, url: String| curl(&c, from, &url);
    println!("\ntraffic:");
    let a = c.pod("backend-a").ip;
    let w = c.pod("worker").ip;
    let vip = c.service_ip("backend");
    run("frontend", format!("http://{a}:{PORT}/"))?;
    run("frontend", format!("http://{w}:{PORT}/"))?;
    for _ in 0..4 {
        run("frontend", format!("http://{vip}:80/"))?;
    }
    run("worker", format!("http://{vip}:80/bytes/1048576"))?;

    report(&c)?;

    println!("\npolicy: backend-a accepts only frontend's identity");
    let policy = RawAuthorizationPolicy {
        name: Some("backend-a-from-frontend".into()),
        namespace: Some("default".into()),
        selector: RawSelector {
            match_labels: [("app".into(), "backend-a".into())].into(),
        },
        rules: vec![RawRule {
            from: vec![RawFrom {
                source: RawSource {
                    principals: vec!["cluster.local/ns/default/sa/frontend-sa".into()],
                    ..Default::default()
                },
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    c.apply(
        1,
        |f| f.authorization_policies = vec![policy],
        "authorization_policies",
        &["default/backend-a-from-frontend"],
    )?;
    run("frontend", format!("http://{a}:{PORT}/"))?;
    // curl speaks HTTP, so worker's own node proxy answers the refusal with 403.
    explain_denial(&c, &a.to_string())?;

    println!("\ncleaning up (namespaces, cgroups, pinned programs and maps)...");
    drop(c);
    println!("done");
    Ok(())
}

/// `curl` from pod `from`, printing the status and size.
fn curl(c: &Cluster, from: &str, url: &str) -> Result<()> {
    let (code, out) = c.curl(
        from,
        &[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}B",
            url,
        ],
    )?;
    println!("  {from:<10} curl {url:<32} -> {out}");
    ensure!(code == 0, "curl from {from} failed: {out}");
    Ok(())
}

/// What each agent captured per pod, and the identities it holds.
fn report(c: &Cluster) -> Result<()> {
    println!("\nwhat the agents captured:");
    println!(
        "  captured/steered: kernel counters (connect4 redirects, sk_lookup steers) from the pinned maps"
    );
    println!(
        "  out-conn/in-conn/bytes: the node proxy's relays (bytes-rcvd: upstream -> pod client; delivered: proxy -> app)"
    );
    println!(
        "  {:<8} {:<10} {:>9} {:>9} {:>9} {:>10} {:>12} {:>12}",
        "node", "pod", "captured", "out-conn", "via-hbone", "in-streams", "bytes-rcvd", "delivered"
    );
    for (i, n) in c.nodes.iter().enumerate() {
        let stats = c.stats(i)?;
        let Some(pods) = stats["pods"].as_object() else {
            continue;
        };
        for (name, p) in pods {
            let k = &p["kernel"];
            let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            println!(
                "  {:<8} {:<10} {:>9} {:>9} {:>9} {:>10} {:>12} {:>12}",
                n.name,
                name.trim_start_matches("default/"),
                num(&k["captured_v4"]) + num(&k["captured_v6"]),
                num(&p["outbound_accepted"]),
                num(&p["outbound_hbone"]),
                num(&p["hbone_streams"]),
                num(&p["outbound_bytes_received"]),
                num(&p["inbound_bytes_delivered"]),
            );
        }
    }
    println!("\nidentities (certificates from the CA, renewed at half-life):");
    for i in 0..c.nodes.len() {
        let stats = c.stats(i)?;
        if let Some(certs) = stats["certificates"].as_object() {
            for (id, r) in certs {
                println!(
                    "  {:<8} {id:<48} serial {} expires in {} s",
                    c.nodes[i].name,
                    r["serial"].as_str().unwrap_or("-"),
                    r["expires_in_secs"]
                );
            }
        }
    }

    Ok(())
}

/// Worker's request to `a` is denied; then why: node-2's log line, `explain`, and the flows.
fn explain_denial(c: &Cluster, a: &str) -> Result<()> {
    let status = c.http_status("worker", &format!("http://{a}:{PORT}/"))?;
    ensure!(
        status == Some(403),
        "worker should have been denied, got {status:?}"
    );
    println!("  worker     curl http://{a}:{PORT}/ -> 403 (RBAC: access denied)");
    if let Some(line) = c
        .agent_log(1)
        .lines()
        .find(|l| l.contains("no rule of the ALLOW policies"))
    {
        println!(
            "  node-2 log: {}",
            line.split("WARN").last().unwrap_or(line).trim()
        );
    }

    println!("\nwhy? `mesh-agent explain worker {a}:{PORT}` on node-2:");
    let why = c.agent_cli(1, &["explain", "worker", &format!("{a}:{PORT}")])?;
    for line in why.lines() {
        println!("  {line}");
    }
    println!("\nnode-2's denied flows (`mesh-agent flows --once --verdict deny`):");
    let flows = c.agent_cli(1, &["flows", "--once", "--verdict", "deny"])?;
    for line in flows.lines() {
        println!("  {line}");
    }
    // Each row in words: a refused connection, or one the worker still had open from its
    // earlier request (pooled by its node's proxy) that the policy change closed.
    let json = c.agent_cli(1, &["flows", "--once", "--verdict", "deny", "-o", "json"])?;
    for (i, line) in json.lines().enumerate() {
        let f: serde_json::Value = serde_json::from_str(line)?;
        println!(
            "  row {}: {} -> {}: {}",
            i + 1,
            f["src"]["workload"].as_str().unwrap_or("-"),
            f["dst"]["workload"].as_str().unwrap_or("-"),
            f["reason"].as_str().unwrap_or("-")
        );
    }

    Ok(())
}

/// `cargo xtask demo --kubernetes`: the same story on the stand-in API server, told with kubectl
/// and the YAML Istio and Gateway API users already have.
fn kubernetes() -> Result<()> {
    println!(
        "building 2 nodes x 2 pods, a stand-in Kubernetes API server (no real one can be installed here), and the pods' objects..."
    );
    let mut c = Cluster::new(
        vec![
            vec![
                PodSpec::mesh("frontend"),
                PodSpec::mesh("worker"),
                PodSpec::bare("visitor"),
            ],
            vec![PodSpec::mesh("backend-a"), PodSpec::mesh("backend-b")],
        ],
        vec![
            ServiceSpec::new("backend", 80, PORT, &["backend-a", "backend-b"]),
            ServiceSpec::new("backend-a", 80, PORT, &["backend-a"]),
            ServiceSpec::new("backend-b", 80, PORT, &["backend-b"]),
        ],
    )?;
    c.kubernetes()?;
    let k = c.kubectl()?.clone();
    let kubectl = |args: &[&str], stdin: Option<&str>| -> Result<()> {
        println!("$ kubectl {}", args.join(" "));
        let out = k.run(args, stdin)?;
        for line in out.lines() {
            println!("  {line}");
        }
        Ok(())
    };
    for p in ["frontend", "worker", "backend-a", "backend-b"] {
        c.serve(p, PORT)?;
    }
    kubectl(
        &[
            "get",
            "pods",
            "-o",
            "custom-columns=NAME:.metadata.name,NODE:.spec.nodeName,IP:.status.podIP",
        ],
        None,
    )?;
    println!(
        "\nstarting the CA as its Deployment runs it (mesh-agent ca --kubernetes: its root in the Secret mesh-system/mesh-ca-root, the bundle in the ConfigMap mesh-trust-bundle, agents checked with TokenReview)..."
    );
    c.start_kube_ca("1h")?;
    println!(
        "starting one mesh-agent per node (mesh-agent run --kubernetes --node-name <node>), with only SYS_ADMIN and SYS_PTRACE as the DaemonSet gives it..."
    );
    c.start_agent(0)?;
    c.start_agent(1)?;
    let enrolled = |c: &Cluster| -> Result<usize> {
        let mut n = 0;
        for i in 0..c.nodes.len() {
            n += c.stats(i)?["pods"]
                .as_object()
                .map_or(0, serde_json::Map::len);
        }
        Ok(n)
    };
    println!(
        "  pods in the mesh: {} (the namespace is not enrolled yet)",
        enrolled(&c)?
    );

    println!("\nenrolling the namespace (visitor opts out):");
    kubectl(&["label", "pod", "visitor", "mesh.dev/enabled=false"], None)?;
    kubectl(
        &["label", "namespace", "default", "mesh.dev/enabled=true"],
        None,
    )?;
    mesh_tests::wait_until(
        "every pod to be enrolled",
        std::time::Duration::from_secs(15),
        || Ok(enrolled(&c)? == 4),
    )?;
    println!("  pods in the mesh: 4");

    println!("\ntraffic:");
    let a = c.pod("backend-a").ip;
    let vip = c.service_ip("backend");
    curl(&c, "frontend", &format!("http://{a}:{PORT}/"))?;
    for _ in 0..4 {
        curl(&c, "frontend", &format!("http://{vip}:80/"))?;
    }
    report(&c)?;
    let b = c.pod("backend-b").ip;
    println!(
        "\nvisitor is outside the mesh; backend-b is PERMISSIVE, so plaintext still reaches it:"
    );
    curl(&c, "visitor", &format!("http://{b}:{PORT}/"))?;

    println!("\nstandard Gateway API and Istio YAML, applied with kubectl:");
    let objects = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-canary, namespace: default}
spec:
  parentRefs: [{group: \"\", kind: Service, name: backend, port: 80}]
  rules:
    - matches: [{headers: [{name: x-canary, value: \"1\"}]}]
      backendRefs: [{name: backend-b, port: 80}]
    - backendRefs: [{name: backend-a, port: 80}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend-a-from-frontend, namespace: default}
spec:
  selector: {matchLabels: {app: backend-a}}
  rules:
    - from: [{source: {principals: [cluster.local/ns/default/sa/frontend-sa]}}]
---
";
    let objects = format!("{objects}{}", mesh_tests::kube::MESH_WIDE_STRICT);
    for line in objects.lines() {
        println!("  | {line}");
    }
    kubectl(&["create", "--validate=false", "-f", "-"], Some(&objects))?;
    mesh_tests::wait_until(
        "the policy to be applied",
        std::time::Duration::from_secs(10),
        || {
            Ok(c.stats(1)?["authorization_policies"]
                .to_string()
                .contains("backend-a-from-frontend")
                && c.stats(0)?["http_routes"]
                    .to_string()
                    .contains("backend-canary"))
        },
    )?;
    println!("\nthe route sends x-canary: 1 to backend-b and everything else to backend-a:");
    for canary in [false, true] {
        let mut args = vec!["-s", "-o", "/dev/null", "-D", "-"];
        if canary {
            args.extend(["-H", "x-canary: 1"]);
        }
        let url = format!("http://{vip}/");
        args.push(&url);
        let (_, out) = c.curl("frontend", &args)?;
        let served = out
            .lines()
            .find_map(|l| l.strip_prefix("x-served-by: "))
            .unwrap_or("-")
            .trim();
        println!(
            "  frontend   curl {}{url} -> served by {served}",
            if canary { "-H 'x-canary: 1' " } else { "" },
        );
        let want = if canary { "backend-b" } else { "backend-a" };
        ensure!(
            served == want,
            "the route should have sent this to {want}, not {served}"
        );
    }
    println!("\nbackend-a accepts only frontend's identity:");
    curl(&c, "frontend", &format!("http://{a}:{PORT}/"))?;
    explain_denial(&c, &a.to_string())?;

    println!("\nthe mesh-wide STRICT PeerAuthentication refuses plaintext, and mTLS still passes:");
    let refused = c.http_status("visitor", &format!("http://{b}:{PORT}/"))?;
    ensure!(
        refused.is_none(),
        "plaintext should have been refused, got {refused:?}"
    );
    println!(
        "  visitor    curl http://{b}:{PORT}/ -> refused (STRICT: plaintext never reaches the app)"
    );
    curl(&c, "frontend", &format!("http://{b}:{PORT}/"))?;

    println!("\ncleaning up (namespaces, cgroups, pinned programs and maps, the API server)...");
    drop(c);
    println!("done");
    Ok(())
}
