//! Kubernetes mode, end to end, against the stand-in API server (`mesh_tests::apiserver`): no
//! real kube-apiserver can be installed on these machines. Cluster state changes through kubectl
//! wherever it can.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use mesh_tests::apiserver::{ApiServer, Kubectl, TokenInfo};
use mesh_tests::kube::{enrolled, enrolled_cluster, wait_enrolled};
use serde_json::json;

/// A scratch directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A stand-in on a loopback port that stays the same across a stop and restart.
fn loopback_api(dir: &std::path::Path) -> Result<ApiServer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    ApiServer::start(dir, move || {
        let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
        Ok(l)
    })
}

const OBJECTS: &str = "
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
spec:
  nodeName: ip-10-0-0-1.ec2.internal
  serviceAccountName: web
  containers: [{name: web, image: nginx}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web-from-frontend
  namespace: shop
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - from: [{source: {principals: [cluster.local/ns/shop/sa/frontend]}}]
";

#[test]
fn the_stand_in_api_server_serves_kubectl_watches_and_token_reviews() -> Result<()> {
    let dir = Scratch::new("apiserver")?;
    let mut api = loopback_api(&dir.0)?;
    let k = Kubectl::new(&api, None);
    let out = k.create(OBJECTS)?;
    assert!(out.contains("pod/web-1 created"), "{out}");
    assert!(
        out.contains("authorizationpolicy.security.istio.io/web-from-frontend created"),
        "{out}"
    );
    let pods = k.get_json(&["pods", "-n", "shop"])?;
    assert_eq!(pods["items"][0]["metadata"]["name"], "web-1");
    // kubectl rebuilds lists without their resourceVersion: read the server's own.
    let raw: serde_json::Value =
        serde_json::from_str(&k.run(&["get", "--raw", "/api/v1/namespaces/shop/pods"], None)?)?;
    assert_eq!(raw["kind"], "PodList");
    let rv0 = raw["metadata"]["resourceVersion"]
        .as_str()
        .context("list resourceVersion")?
        .to_string();

    // Labels change through kubectl's patch.
    k.run(
        &["label", "namespace", "shop", "mesh.dev/enabled=true"],
        None,
    )?;
    let ns = k.get_json(&["namespace", "shop"])?;
    assert_eq!(ns["metadata"]["labels"]["mesh.dev/enabled"], "true");
    k.run(&["label", "pod", "-n", "shop", "web-1", "app-"], None)?;
    let pod = k.get_json(&["pod", "-n", "shop", "web-1"])?;
    assert!(pod["metadata"]["labels"].get("app").is_none(), "{pod}");

    // Field and label selectors, as the agent's watches use them.
    let on_node = k.run(
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=ip-10-0-0-1.ec2.internal",
            "-o",
            "name",
        ],
        None,
    )?;
    assert_eq!(on_node.trim(), "pod/web-1");
    let elsewhere = k.run(
        &[
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=other",
            "-o",
            "name",
        ],
        None,
    )?;
    assert_eq!(elsewhere.trim(), "");
    let labelled = k.run(
        &["get", "ns", "-l", "mesh.dev/enabled=true", "-o", "name"],
        None,
    )?;
    assert_eq!(labelled.trim(), "namespace/shop");

    // A watch resumes from a resourceVersion and sees what changed since.
    let watch = k.run(
        &[
            "get",
            "--raw",
            &format!("/api/v1/pods?watch=true&resourceVersion={rv0}&timeoutSeconds=1"),
        ],
        None,
    )?;
    let events: Vec<serde_json::Value> = watch
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(events.len(), 1, "{rv0}: {watch}");
    assert_eq!(events[0]["type"], "MODIFIED", "{rv0}: {watch}");

    // After compaction the same resourceVersion is gone: one ERROR event with 410.
    api.compact();
    let gone = k.run(
        &[
            "get",
            "--raw",
            &format!("/api/v1/pods?watch=true&resourceVersion={rv0}&timeoutSeconds=1"),
        ],
        None,
    )?;
    let e: serde_json::Value = serde_json::from_str(gone.trim())?;
    assert_eq!(
        (e["type"].as_str(), e["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410)),
        "{gone}"
    );

    // Replace, then delete.
    let mut pod = k.get_json(&["pod", "-n", "shop", "web-1"])?;
    pod["metadata"]["labels"] = json!({"app": "web", "version": "v2"});
    k.run(
        &["replace", "--validate=false", "-f", "-"],
        Some(&pod.to_string()),
    )?;
    let replaced = k.get_json(&["pod", "-n", "shop", "web-1"])?;
    assert_eq!(replaced["metadata"]["labels"]["version"], "v2");
    assert_ne!(
        replaced["metadata"]["resourceVersion"],
        pod["metadata"]["resourceVersion"]
    );
    k.run(&["delete", "pod", "-n", "shop", "web-1"], None)?;
    let missing = k
        .run(&["get", "pod", "-n", "shop", "web-1"], None)
        .expect_err("the pod is deleted");
    assert!(
        missing.to_string().contains("NotFound") || missing.to_string().contains("not found"),
        "{missing}"
    );

    // TokenReview answers for registered tokens and audiences only.
    api.add_token(
        "agent-token",
        TokenInfo {
            user: json!({"username": "system:serviceaccount:mesh-system:mesh-agent", "extra": {"authentication.kubernetes.io/node-name": ["n1"]}}),
            audiences: vec!["mesh-ca".into()],
            expires: None,
        },
    );
    let review = |token: &str, aud: &str| -> Result<serde_json::Value> {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": [aud]}});
        Ok(serde_json::from_str(&k.run(
            &["create", "--validate=false", "-o", "json", "-f", "-"],
            Some(&body.to_string()),
        )?)?)
    };
    let ok = review("agent-token", "mesh-ca")?;
    assert_eq!(ok["status"]["authenticated"], true, "{ok}");
    assert_eq!(
        ok["status"]["user"]["extra"]["authentication.kubernetes.io/node-name"][0],
        "n1"
    );
    assert_eq!(
        review("agent-token", "other")?["status"]["authenticated"],
        false
    );
    assert_eq!(
        review("stolen", "mesh-ca")?["status"]["authenticated"],
        false
    );

    // Down, then back with the same objects.
    api.stop();
    assert!(k.run(&["get", "ns", "shop"], None).is_err());
    api.restart()?;
    assert_eq!(k.get_json(&["ns", "shop"])?["metadata"]["name"], "shop");
    Ok(())
}

const APP_PORT: u16 = 8080;

#[test]
fn labelling_a_namespace_enrolls_its_pods_and_removing_the_label_releases_them() -> Result<()> {
    use mesh_tests::{Cluster, PodSpec, ServiceSpec};
    let mut c = Cluster::new(
        vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
        vec![ServiceSpec::new("web", 80, APP_PORT, &["server"])],
    )?;
    c.kubernetes()?;
    c.serve("server", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    let server = c.pod("server").ip;
    let direct = format!("http://{server}:{APP_PORT}/");
    let vip = format!("http://{}:80/", c.service_ip("web"));
    // Nothing is enrolled: pods talk plain, and a service address means nothing.
    assert!(enrolled(&c, 0)?.is_empty() && enrolled(&c, 1)?.is_empty());
    assert_eq!(c.http_status("client", &direct)?, Some(200));

    let k = c.kubectl()?;
    k.run(
        &["label", "namespace", "default", "mesh.dev/enabled=true"],
        None,
    )?;
    wait_enrolled(&c, 0, &["client"])?;
    wait_enrolled(&c, 1, &["server"])?;
    let before = c.counter(0, "client", "kernel.captured_v4")?;
    assert_eq!(
        c.http_status("client", &vip)?,
        Some(200),
        "through the service"
    );
    assert_eq!(c.http_status("client", &direct)?, Some(200), "pod to pod");
    assert_eq!(
        c.counter(0, "client", "kernel.captured_v4")? - before,
        2,
        "both captured"
    );
    // Across nodes as mTLS, to the server's identity.
    let flows = c.agent_cli(0, &["flows", "--once", "-o", "json"])?;
    assert!(
        flows.contains("mutual_tls") && flows.contains("sa/server-sa"),
        "{flows}"
    );

    // A pod label opts one pod out; its traffic flows plain again.
    k.run(&["label", "pod", "client", "mesh.dev/enabled=false"], None)?;
    wait_enrolled(&c, 0, &[])?;
    assert_eq!(c.http_status("client", &direct)?, Some(200));

    // Removing the namespace label releases the rest.
    k.run(
        &["label", "namespace", "default", "mesh.dev/enabled-"],
        None,
    )?;
    wait_enrolled(&c, 1, &[])?;
    assert_eq!(c.http_status("client", &direct)?, Some(200));
    Ok(())
}

/// A cluster in Kubernetes mode whose `default` namespace is enrolled before the agents start,
/// so they adopt running pods; `server` serves if there is one.
/// client on node 1, server on node 2, `web` over server, enrolled.
fn enrolled_pair() -> Result<mesh_tests::Cluster> {
    use mesh_tests::{PodSpec, ServiceSpec};
    enrolled_cluster(
        vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
        vec![ServiceSpec::new("web", 80, APP_PORT, &["server"])],
    )
}

#[test]
fn with_the_api_server_away_at_start_capture_stays_closed_until_it_returns() -> Result<()> {
    let mut c = enrolled_pair()?;
    let vip = format!("http://{}:80/", c.service_ip("web"));
    let direct = format!("http://{}:{APP_PORT}/", c.pod("server").ip);
    assert_eq!(c.http_status("client", &vip)?, Some(200));
    let served = c.app_requests("server", APP_PORT)?;

    // The agent crashes and comes back while the API server is away.
    c.kill_agent(0);
    c.api_mut()?.stop();
    c.start_agent_with(0, &[])?;
    mesh_tests::wait_until(
        "the agent to say why it is not ready",
        Duration::from_secs(10),
        || {
            Ok(
                matches!(c.agent_get(0, "/ready"), Ok((code, body)) if code != 200 && body.contains("Kubernetes API")),
            )
        },
    )?;
    // Its pod's capture stayed pinned: the client's connections fail instead of leaving plain.
    assert_eq!(c.http_status("client", &direct)?, None, "must fail closed");
    assert_eq!(
        c.app_requests("server", APP_PORT)?,
        served,
        "nothing reached the server"
    );
    assert!(
        enrolled(&c, 0)?.is_empty(),
        "nothing reconciled without the API"
    );

    c.api_mut()?.restart()?;
    c.wait_ready(0, Duration::from_secs(20))?;
    wait_enrolled(&c, 0, &["client"])?;
    assert_eq!(c.http_status("client", &vip)?, Some(200), "traffic resumes");
    Ok(())
}

#[test]
fn a_cut_watch_and_410_gone_relist_losing_nothing_and_capture_never_drops() -> Result<()> {
    let mut c = enrolled_pair()?;
    let vip = format!("http://{}:80/", c.service_ip("web"));
    assert_eq!(c.http_status("client", &vip)?, Some(200));
    let captured = c.counter(0, "client", "kernel.captured_v4")?;

    // Every watch is cut mid-stream; a service is added as they reconnect.
    c.api_mut()?.cut_watches();
    c.services.push(mesh_tests::ServiceSpec::new(
        "late",
        80,
        APP_PORT,
        &["server"],
    ));
    let objects: Vec<serde_json::Value> = c.service_objects(&c.services[1]).into();
    c.kubectl()?
        .create(&json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string())?;
    let late = format!("http://{}:80/", c.service_ip("late"));
    mesh_tests::wait_until(
        "the new service to be routed",
        Duration::from_secs(15),
        || Ok(c.http_status("client", &late)? == Some(200)),
    )
    .with_context(|| c.agent_log(0))?;

    // The API server goes away; meanwhile a service is added (directly: kubectl cannot reach
    // a stopped server) and the history compacted, so the watches' resourceVersion is gone.
    c.api_mut()?.stop();
    c.services.push(mesh_tests::ServiceSpec::new(
        "later",
        80,
        APP_PORT,
        &["server"],
    ));
    for o in c.service_objects(&c.services[2]) {
        c.api_mut()?.create(o)?;
    }
    c.api_mut()?.compact();
    // Capture stays while the API is away.
    assert_eq!(c.http_status("client", &vip)?, Some(200));
    c.api_mut()?.restart()?;
    let later = format!("http://{}:80/", c.service_ip("later"));
    mesh_tests::wait_until(
        "a relist to bring the service",
        Duration::from_secs(20),
        || Ok(c.http_status("client", &later)? == Some(200)),
    )
    .with_context(|| c.agent_log(0))?;
    assert!(
        c.agent_log(0).contains("too old resource version"),
        "the agent saw 410 Gone and relisted"
    );
    // The pods were never re-enrolled: their counters carried on.
    assert!(c.counter(0, "client", "kernel.captured_v4")? > captured);
    assert_eq!(enrolled(&c, 1)?, ["default/server"]);
    Ok(())
}

/// Requests each server has answered.
fn answered(c: &mesh_tests::Cluster) -> Result<(u64, u64)> {
    Ok((
        c.app_requests("server", APP_PORT)?,
        c.app_requests("server2", APP_PORT)?,
    ))
}

#[test]
fn standard_istio_and_gateway_objects_applied_with_kubectl_take_effect_and_deleting_restores()
-> Result<()> {
    use mesh_tests::{Cluster, PodSpec, ServiceSpec};
    let mut c = Cluster::new(
        vec![
            vec![PodSpec::mesh("client"), PodSpec::bare("bare")],
            vec![PodSpec::mesh("server"), PodSpec::mesh("server2")],
        ],
        vec![
            ServiceSpec::new("web", 80, APP_PORT, &["server"]),
            ServiceSpec::new("v1", 80, APP_PORT, &["server"]),
            ServiceSpec::new("v2", 80, APP_PORT, &["server2"]),
        ],
    )?;
    c.kubernetes()?;
    let k = c.kubectl()?.clone();
    k.run(
        &["label", "namespace", "default", "mesh.dev/enabled=true"],
        None,
    )?;
    k.run(&["label", "pod", "bare", "mesh.dev/enabled=false"], None)?;
    c.serve("server", APP_PORT)?;
    c.serve("server2", APP_PORT)?;
    c.start_agent(0)?;
    c.start_agent(1)?;
    wait_enrolled(&c, 0, &["client"])?;
    wait_enrolled(&c, 1, &["server", "server2"])?;
    let web = c.service_ip("web");
    let load = |n: u32| -> Result<()> {
        let out = c.testapp(
            "client",
            &[
                "load",
                "--addr",
                &format!("{web}:80"),
                "--rate",
                "400",
                "--seconds",
                &format!("{}", n / 400),
                "--connections",
                "4",
            ],
        )?;
        let r: serde_json::Value = serde_json::from_str(out.trim())?;
        anyhow::ensure!(r["errors"] == 0, "{r}");
        Ok(())
    };

    // An EndpointSlice change applies live: web gains server2.
    let mut slice = k.get_json(&["endpointslice", "web-1"])?;
    let ep = json!({"addresses": [c.pod("server2").ip.to_string()], "conditions": {"ready": true}});
    slice["endpoints"]
        .as_array_mut()
        .context("endpoints")?
        .push(ep);
    k.run(
        &["replace", "--validate=false", "-f", "-"],
        Some(&slice.to_string()),
    )?;
    mesh_tests::wait_until(
        "server2 to get web's requests",
        Duration::from_secs(10),
        || {
            let before = answered(&c)?.1;
            c.http_status("client", &format!("http://{web}/"))?;
            c.http_status("client", &format!("http://{web}/"))?;
            Ok(answered(&c)?.1 > before)
        },
    )?;

    // A standard DestinationRule: round robin for web (P2C, the default, may favour one).
    k.create(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
",
    )?;
    mesh_tests::wait_until(
        "the destination rule to be applied",
        Duration::from_secs(10),
        || Ok(c.stats(0)?["destination_rules"].to_string().contains("web")),
    )?;

    // A standard HTTPRoute, as Gateway API users write it: 90/10 across v1 and v2.
    let route = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-split
  namespace: default
spec:
  parentRefs:
    - group: \"\"
      kind: Service
      name: web
      port: 80
  rules:
    - backendRefs:
        - {name: v1, port: 80, weight: 90}
        - {name: v2, port: 80, weight: 10}
";
    k.create(route)?;
    mesh_tests::wait_until("the route to be applied", Duration::from_secs(10), || {
        Ok(c.stats(0)?["http_routes"].to_string().contains("web-split"))
    })?;
    let before = answered(&c)?;
    load(800)?;
    let after = answered(&c)?;
    let (v1, v2) = (after.0 - before.0, after.1 - before.1);
    println!("90/10 over 800 requests: v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, 800);
    assert!((40..=130).contains(&v2), "v2 got {v2} of 800");
    // Deleting it restores web's own endpoints, in turn.
    k.run(&["delete", "httproute", "web-split"], None)?;
    mesh_tests::wait_until("the route to be gone", Duration::from_secs(10), || {
        Ok(!c.stats(0)?["http_routes"].to_string().contains("web-split"))
    })?;
    let before = answered(&c)?;
    load(800)?;
    let after = answered(&c)?;
    let v2 = after.1 - before.1;
    assert!(
        (280..=520).contains(&v2),
        "without the route v2 got {v2} of 800"
    );

    // A standard AuthorizationPolicy: DENY /echo on server, then deleted.
    let admin = format!("http://{}:{APP_PORT}/echo", c.pod("server").ip);
    assert_eq!(c.http_status("client", &admin)?, Some(200));
    k.create(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
    - to: [{operation: {paths: [/echo]}}]
",
    )?;
    mesh_tests::wait_until("the DENY to apply", Duration::from_secs(10), || {
        Ok(c.http_status("client", &admin)? == Some(403))
    })?;
    k.run(&["delete", "authorizationpolicy", "no-admin"], None)?;
    mesh_tests::wait_until("the DENY to go", Duration::from_secs(10), || {
        Ok(c.http_status("client", &admin)? == Some(200))
    })?;

    // A mesh-wide STRICT PeerAuthentication in the root namespace refuses plaintext.
    let plain = format!("http://{}:{APP_PORT}/", c.pod("server").ip);
    assert_eq!(
        c.http_status("bare", &plain)?,
        Some(200),
        "PERMISSIVE by default"
    );
    k.create(mesh_tests::kube::MESH_WIDE_STRICT)?;
    mesh_tests::wait_until("plaintext to be refused", Duration::from_secs(10), || {
        Ok(c.http_status("bare", &plain)?.is_none())
    })?;
    assert_eq!(
        c.http_status("client", &plain)?,
        Some(200),
        "mTLS still passes"
    );
    // portLevelMtls opens one port of server (only that one) under the mesh-wide STRICT.
    const OTHER_PORT: u16 = 9091;
    c.serve("server", OTHER_PORT)?;
    let other = format!("http://{}:{OTHER_PORT}/", c.pod("server").ip);
    assert_eq!(c.http_status("bare", &other)?, None, "STRICT mesh-wide");
    let ports = |pod_mode: &str, port_mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: server-ports, namespace: default}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  mtls: {{mode: {pod_mode}}}
  portLevelMtls:
    {OTHER_PORT}: {{mode: {port_mode}}}
"
        )
    };
    k.create(&ports("UNSET", "DISABLE"))?;
    mesh_tests::wait_until(
        "the port to take plaintext",
        Duration::from_secs(10),
        || Ok(c.http_status("bare", &other)? == Some(200)),
    )?;
    assert_eq!(
        c.http_status("bare", &plain)?,
        None,
        "the pod's other port stays STRICT"
    );
    // The reverse: a PERMISSIVE pod with one STRICT port.
    k.run(&["delete", "peerauthentication", "server-ports"], None)?;
    k.create(&ports("PERMISSIVE", "STRICT"))?;
    mesh_tests::wait_until("the pod to take plaintext", Duration::from_secs(10), || {
        Ok(c.http_status("bare", &plain)? == Some(200))
    })?;
    assert_eq!(
        c.http_status("bare", &other)?,
        None,
        "the STRICT port refuses plaintext"
    );
    assert_eq!(
        c.http_status("client", &other)?,
        Some(200),
        "mTLS to the STRICT port passes"
    );
    k.run(&["delete", "peerauthentication", "server-ports"], None)?;
    k.run(
        &[
            "delete",
            "peerauthentication",
            "-n",
            "istio-system",
            "default",
        ],
        None,
    )?;
    mesh_tests::wait_until(
        "plaintext to be accepted again",
        Duration::from_secs(10),
        || Ok(c.http_status("bare", &plain)? == Some(200)),
    )?;
    Ok(())
}

#[test]
fn a_pod_label_change_keeps_the_pod_enrolled_and_re_decides_its_connections() -> Result<()> {
    use mesh_tests::{PodSpec, ServiceSpec};
    let c = enrolled_cluster(
        vec![vec![PodSpec::mesh("client")], vec![PodSpec::mesh("server")]],
        vec![ServiceSpec::new("opaque", 80, APP_PORT, &["server"]).app_protocol("tcp")],
    )?;
    let k = c.kubectl()?.clone();
    let opaque = c.service_ip("opaque");
    let mut hold = c.hold_connection("client", &format!("{opaque}:80"))?;

    // A DENY for pods labelled tier=db: the server has no such label yet, so nothing closes.
    k.create(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client-to-db, namespace: default}
spec:
  selector: {matchLabels: {tier: db}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/client-sa]}}]}]
",
    )?;
    mesh_tests::wait_until("the policy to be applied", Duration::from_secs(10), || {
        Ok(c.stats(1)?["authorization_policies"]
            .to_string()
            .contains("no-client-to-db"))
    })?;
    let denials = |c: &mesh_tests::Cluster| -> Result<Vec<serde_json::Value>> {
        Ok(c.agent_cli(1, &["flows", "--once", "-o", "json"])?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|f| f["verdict"] == "deny")
            .collect())
    };
    assert!(denials(&c)?.is_empty());

    // Labelling the server puts it under the DENY: the open connection closes, and its record
    // says why. The pod itself stays enrolled all along.
    k.run(&["label", "pod", "server", "tier=db"], None)?;
    mesh_tests::wait_until(
        "the held connection to be closed",
        Duration::from_secs(10),
        || {
            Ok(denials(&c)?.iter().any(|f| {
                f["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("closed after a policy change"))
            }))
        },
    )?;
    let log = c.agent_log(1);
    assert_eq!(
        log.matches("pod enrolled pod=default/server").count(),
        1,
        "re-enrolled:\n{log}"
    );
    assert!(!log.contains("pod removed from the mesh"), "{log}");
    drop(hold.stdin.take());
    let _ = hold.wait();
    Ok(())
}

#[test]
fn a_pod_recreated_under_its_name_is_enrolled_again_on_its_new_netns() -> Result<()> {
    let mut c = enrolled_pair()?;
    let vip = format!("http://{}:80/", c.service_ip("web"));
    assert_eq!(c.http_status("client", &vip)?, Some(200));
    let old_netns = c.pod("client").netns.clone();
    // Deleted and created again: new UID, new sandbox and netns, same name and address.
    c.recreate_pod("client")?;
    assert_ne!(c.pod("client").netns, old_netns);
    client_enrolled_again(&c, &vip, "")
}

/// Waits until `client` is enrolled a second time, the agent's log holds `also`, and `vip`
/// answers from its new netns; a service address answers only through capture, so the new
/// netns is captured.
fn client_enrolled_again(c: &mesh_tests::Cluster, vip: &str, also: &str) -> Result<()> {
    mesh_tests::wait_until(
        "the new sandbox to be enrolled",
        Duration::from_secs(15),
        || {
            let log = c.agent_log(0);
            Ok(log.contains(also)
                && log.matches("pod enrolled pod=default/client").count() == 2
                && c.http_status("client", vip)? == Some(200))
        },
    )
    .with_context(|| c.agent_log(0))?;
    assert!(c.counter(0, "client", "kernel.captured_v4")? >= 1);
    Ok(())
}

#[test]
fn a_sandbox_recreated_under_the_same_pod_is_enrolled_on_its_new_netns() -> Result<()> {
    let mut c = enrolled_pair()?;
    let vip = format!("http://{}:80/", c.service_ip("web"));
    assert_eq!(c.http_status("client", &vip)?, Some(200));
    let (old_netns, uid) = (c.pod("client").netns.clone(), c.pod("client").uid.clone());
    // Same pod, same UID, no change through the API: only the sandbox is new.
    c.recreate_sandbox("client")?;
    assert_ne!(c.pod("client").netns, old_netns);
    assert_eq!(c.pod("client").uid, uid);
    client_enrolled_again(&c, &vip, "sandbox recreated")
}

#[test]
fn a_service_with_endpoints_on_both_nodes_is_reached_on_both() -> Result<()> {
    use mesh_tests::{PodSpec, ServiceSpec};
    let c = enrolled_cluster(
        vec![
            vec![PodSpec::mesh("client"), PodSpec::mesh("local")],
            vec![PodSpec::mesh("server")],
        ],
        vec![ServiceSpec::new("both", 80, APP_PORT, &["local", "server"])],
    )?;
    c.serve("local", APP_PORT)?;
    // Round robin, so both endpoints are sure to be chosen (P2C may prefer the nearer one).
    c.kubectl()?.create(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: both, namespace: default}
spec:
  host: both.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
",
    )?;
    mesh_tests::wait_until(
        "the destination rule to apply",
        Duration::from_secs(10),
        || {
            Ok(c.stats(0)?["destination_rules"]
                .to_string()
                .contains("both"))
        },
    )
    .with_context(|| format!("{:?}", c.stats(0).map(|s| s["problems"].clone())))?;
    let url = format!("http://{}/", c.service_ip("both"));
    for _ in 0..10 {
        assert_eq!(c.http_status("client", &url)?, Some(200));
    }
    let (here, there) = (
        c.app_requests("local", APP_PORT)?,
        c.app_requests("server", APP_PORT)?,
    );
    assert_eq!(
        (here, there),
        (5, 5),
        "same node {here}, other node {there}"
    );
    Ok(())
}

/// The labels every HTTP series of the `frontend` → `catalog` request carries, whichever node
/// reports it: names from the pods' labels and owners, not from the pods' own names.
fn kiali_labels(service_account: &str) -> Vec<(&'static str, String)> {
    [
        ("source_workload", "frontend"),
        ("source_workload_namespace", "default"),
        ("source_app", "frontend"),
        ("source_version", "v1"),
        ("source_canonical_service", "frontend"),
        ("source_canonical_revision", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "catalog-db"),
        ("destination_workload_namespace", "default"),
        ("destination_app", "catalog"),
        ("destination_version", "2.1"),
        ("destination_canonical_service", "catalog"),
        ("destination_canonical_revision", "2.1"),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "default"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
        ("grpc_response_status", ""),
        ("connection_security_policy", "mutual_tls"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .chain([(
        "source_principal",
        format!("spiffe://cluster.local/ns/default/sa/{service_account}"),
    )])
    .collect()
}

#[test]
fn metrics_carry_kialis_labels_from_pod_labels_and_owners_on_both_reporters() -> Result<()> {
    let c = enrolled_pair()?;
    let k = c.kubectl()?;
    // A Deployment's pod (its ReplicaSet carries the template hash) with `app` and `version`,
    // and a StatefulSet's pod named only by Istio's canonical labels.
    k.run(
        &[
            "patch", "pod", "client", "--type", "merge", "-p",
            r#"{"metadata": {"labels": {"app": "frontend", "version": "v1", "pod-template-hash": "5d8f7"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "frontend-5d8f7", "uid": "rs-1", "controller": true}]}}"#,
        ],
        None,
    )?;
    k.run(
        &[
            "patch", "pod", "server", "--type", "merge", "-p",
            r#"{"metadata": {"labels": {"app": null, "service.istio.io/canonical-name": "catalog", "app.kubernetes.io/version": "2.1"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "catalog-db", "uid": "sts-1", "controller": true}]}}"#,
        ],
        None,
    )?;
    let url = format!("http://{}/", c.service_ip("web"));
    let requests = |i: usize, reporter: &str| -> Result<Vec<mesh_tests::Sample>> {
        Ok(c.scrape(i)?
            .into_iter()
            .filter(|s| {
                s.name == "istio_requests_total"
                    && s.labels.get("reporter").map(String::as_str) == Some(reporter)
                    && s.labels.get("source_workload").map(String::as_str) == Some("frontend")
            })
            .collect())
    };
    // The agents see the new labels within a watch event; until then a request is named by
    // the old ones.
    mesh_tests::wait_until(
        "a request named by the new labels on the destination",
        Duration::from_secs(10),
        || {
            assert_eq!(c.http_status("client", &url)?, Some(200));
            Ok(requests(1, "destination")?
                .iter()
                .any(|s| s.labels["destination_workload"] == "catalog-db"))
        },
    )?;
    let before = |i, r| -> Result<f64> {
        Ok(requests(i, r)?
            .iter()
            .filter(|s| s.labels["destination_workload"] == "catalog-db")
            .map(|s| s.value)
            .sum())
    };
    let (src0, dst0) = (before(0, "source")?, before(1, "destination")?);
    for _ in 0..3 {
        assert_eq!(c.http_status("client", &url)?, Some(200));
    }
    let sa = &c.pod("client").service_account;
    for (node, reporter, start) in [(0, "source", src0), (1, "destination", dst0)] {
        let series = requests(node, reporter)?;
        let s = series
            .iter()
            .find(|s| s.labels["destination_workload"] == "catalog-db")
            .with_context(|| format!("no {reporter} series on node {node}: {series:?}"))?;
        for (name, want) in kiali_labels(sa) {
            let got = s.labels.get(name).map_or("<absent>", String::as_str);
            // An empty label value and an absent label are one thing to Prometheus.
            let got = if got == "<absent>" && want.is_empty() {
                ""
            } else {
                got
            };
            assert_eq!(got, want, "{name} as {reporter} on node {node}: {s:?}");
        }
        assert_eq!(s.value - start, 3.0, "three requests as {reporter}");
    }
    let build: Vec<_> = c
        .scrape(1)?
        .into_iter()
        .filter(|s| s.name == "mesh_build_info")
        .collect();
    assert!(
        matches!(build.as_slice(), [b] if b.value == 1.0 && !b.labels["version"].is_empty()),
        "{build:?}"
    );
    Ok(())
}
