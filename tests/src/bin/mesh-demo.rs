//! `cargo xtask demo`: a CA and two nodes with two pods each, real agents, traffic pod→pod and
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

    let run = |from: &str, url: String| -> Result<()> {
        let (code, out) = c.curl(
            from,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}B",
                &url,
            ],
        )?;
        println!("  {from:<10} curl {url:<32} -> {out}");
        ensure!(code == 0, "curl from {from} failed: {out}");
        Ok(())
    };
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

    println!("\ncleaning up (namespaces, cgroups, pinned programs and maps)...");
    drop(c);
    println!("done");
    Ok(())
}
