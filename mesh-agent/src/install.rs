//! `mesh-agent manifests`: the Kubernetes install, printed as YAML (as `linkerd install` does),
//! so one binary carries the manifests of its own version and an upgrade is the same command
//! piped to `kubectl apply`.
//!
//! What it holds, and why:
//! - a Namespace with the Pod Security level the DaemonSet needs (`privileged`: host paths,
//!   host PID and capabilities are outside `baseline`);
//! - service accounts and least-privilege RBAC: the agent reads what discovery watches; the CA
//!   creates TokenReviews, reads pods, and writes only its own Secret and ConfigMap;
//! - the agent DaemonSet, not privileged, with exactly [`AGENT_CAPABILITIES`];
//! - the CA Deployment and Service; the root Secret and bundle ConfigMap are made by the CA;
//! - with `--istio-crds`, our own CRDs for the three Istio kinds, for clusters without Istio.

use serde_json::{Value, json};

/// The capabilities the agent keeps (all others dropped), each with why the data path needs
/// it. The end-to-end tests run every Kubernetes-mode agent with exactly this bounding set, and
/// without either one the agent enrolls nothing. BPF, PERFMON and NET_ADMIN are not listed:
/// from kernel 5.8 on, SYS_ADMIN (which entering a netns needs anyway) passes every check they
/// would, so adding them would grant nothing; memory for maps is charged to the cgroup from
/// 5.11 on, so SYS_RESOURCE is not needed either.
pub const AGENT_CAPABILITIES: &[(&str, &str)] = &[
    (
        "SYS_ADMIN",
        "enter pods' network namespaces (setns) to listen and dial as the pod; also load the capture programs and attach them to pods' cgroups and netns",
    ),
    (
        "SYS_PTRACE",
        "open /proc/<pid>/ns/net of pods' sandbox processes, which belong to other users (or hold capabilities the agent has not)",
    ),
];

/// The port the kubelet probes (`/ready`, `/healthz`).
pub const PROBE_PORT: u16 = 15021;
/// The metrics port.
pub const METRICS_PORT: u16 = 15020;
/// The CA's port.
pub const CA_PORT: u16 = 15012;
/// The audience of the agents' projected tokens, which the CA requires.
pub const CA_AUDIENCE: &str = "mesh-ca";
/// Where the agent's projected token is mounted.
const TOKEN_DIR: &str = "/var/run/secrets/mesh-ca";
/// Where the bundle ConfigMap is mounted.
const BUNDLE_DIR: &str = "/var/run/mesh-ca-bundle";

/// `manifests` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ManifestArgs {
    /// The image of the agent and the CA (one binary), e.g. `registry.example/mesh-agent:0.1.0`.
    #[arg(long, default_value = concat!("ghcr.io/mesh-dev/mesh-agent:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The namespace the mesh runs in.
    #[arg(long, default_value = "mesh-system")]
    pub namespace: String,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    #[arg(long, default_value = "24h")]
    pub cert_ttl: String,
    /// CA replicas (they share the root Secret).
    #[arg(long, default_value_t = 2)]
    pub ca_replicas: u32,
    /// Also enroll namespaces labelled `istio.io/dataplane-mode=ambient`.
    #[arg(long)]
    pub istio_ambient_label: bool,
    /// Include CRDs for AuthorizationPolicy, PeerAuthentication and DestinationRule, for
    /// clusters without Istio's.
    #[arg(long)]
    pub istio_crds: bool,
}

fn labels(component: &str) -> Value {
    json!({"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": "mesh"})
}

fn meta(name: &str, ns: &str, component: &str) -> Value {
    json!({"name": name, "namespace": ns, "labels": labels(component)})
}

/// Every object of the install, in apply order.
pub fn objects(a: &ManifestArgs) -> Vec<Value> {
    let ns = a.namespace.as_str();
    let mut out = vec![
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {
                "pod-security.kubernetes.io/enforce": "privileged",
                "app.kubernetes.io/part-of": "mesh",
            }},
        }),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("mesh-agent", ns, "mesh-agent")}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("mesh-ca", ns, "mesh-ca")}),
    ];
    out.extend(rbac(ns));
    out.push(daemonset(a));
    out.push(ca_deployment(a));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta("mesh-ca", ns, "mesh-ca"),
        "spec": {
            "selector": {"app.kubernetes.io/name": "mesh-ca"},
            "ports": [{"name": "grpc-ca", "port": CA_PORT, "targetPort": CA_PORT, "protocol": "TCP"}],
        },
    }));
    if a.istio_crds {
        out.extend(istio_crds());
    }
    out
}

fn rbac(ns: &str) -> Vec<Value> {
    let binding = |kind: &str, name: &str, namespaced: bool| {
        let mut m = json!({"name": name, "labels": labels(name)});
        if namespaced {
            m["namespace"] = json!(ns);
        }
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": format!("{kind}Binding"),
            "metadata": m,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        })
    };
    let read = json!(["get", "list", "watch"]);
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "mesh-agent", "labels": labels("mesh-agent")},
            "rules": [
                {"apiGroups": [""], "resources": ["pods", "namespaces", "services"], "verbs": read},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes"], "verbs": read},
                {"apiGroups": ["security.istio.io"], "resources": ["authorizationpolicies", "peerauthentications"], "verbs": read},
                {"apiGroups": ["networking.istio.io"], "resources": ["destinationrules"], "verbs": read},
            ],
        }),
        binding("ClusterRole", "mesh-agent", false),
        // Its own pod and DaemonSet, to tell an uninstall from a restart.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta("mesh-agent", ns, "mesh-agent"),
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
                {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["mesh-agent"], "verbs": ["get"]},
            ],
        }),
        binding("Role", "mesh-agent", true),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "mesh-ca", "labels": labels("mesh-ca")},
            "rules": [
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
            ],
        }),
        binding("ClusterRole", "mesh-ca", false),
        // Creation cannot be limited by name in RBAC; reading and updating can.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta("mesh-ca", ns, "mesh-ca"),
            "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mesh-ca-root"], "verbs": ["get", "update"]},
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["mesh-trust-bundle"], "verbs": ["get", "update"]},
            ],
        }),
        binding("Role", "mesh-ca", true),
    ]
}

fn probe(path: &str, period: u32, failures: u32) -> Value {
    json!({
        "httpGet": {"path": path, "port": PROBE_PORT},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    })
}

fn daemonset(a: &ManifestArgs) -> Value {
    let ns = a.namespace.as_str();
    let caps: Vec<&str> = AGENT_CAPABILITIES.iter().map(|(c, _)| *c).collect();
    let host = |name: &str, path: &str, kind: &str| json!({"name": name, "hostPath": {"path": path, "type": kind}});
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": meta("mesh-agent", ns, "mesh-agent"),
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "mesh-agent"}},
            // One node at a time, the new agent beside the old: it takes the old one's listening
            // sockets through the handover socket, so no connect is refused, and only once it
            // is ready is the old pod deleted (it drains, up to --drain-timeout). A bad version
            // stops at the first node, whose old agent keeps serving.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels("mesh-agent"),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": METRICS_PORT.to_string(),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": "mesh-agent",
                    // The sandboxes' processes are found by PID, to open their netns.
                    "hostPID": true,
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    // Every node's pods are captured, whatever its taints.
                    "tolerations": [{"operator": "Exists"}],
                    // Above --drain-timeout (30 s), so the kubelet never kills a draining agent.
                    "terminationGracePeriodSeconds": 45,
                    "containers": [{
                        "name": "agent",
                        "image": a.image,
                        "args": [
                            "run", "--kubernetes", "true",
                            "--bpf-object", "/usr/lib/mesh/mesh-ebpf.o",
                            "--ca-addr", format!("mesh-ca.{ns}.svc:{CA_PORT}"),
                            "--ca-token-file", format!("{TOKEN_DIR}/token"),
                            "--ca-bundle", format!("{BUNDLE_DIR}/bundle.pem"),
                            "--trust-domain", a.trust_domain,
                            "--istio-ambient-label", a.istio_ambient_label.to_string(),
                            "--probe-addr", format!("0.0.0.0:{PROBE_PORT}"),
                        ],
                        "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            // At SIGTERM the agent looks up its DaemonSet through its pod: only
                            // a DaemonSet gone or being deleted removes capture (an uninstall).
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "MESH_LOG_FORMAT", "value": "json"},
                            {"name": "MESH_ACCESS_LOG", "value": "json"},
                        ],
                        "ports": [
                            {"name": "http-metrics", "containerPort": METRICS_PORT},
                            {"name": "http-probes", "containerPort": PROBE_PORT},
                        ],
                        "readinessProbe": probe("/ready", 2, 3),
                        "livenessProbe": probe("/healthz", 10, 3),
                        // Sized from the bench: 18 MB idle, 36 MB with 10,000 remote pods; about
                        // 70 µs of CPU per cross-node request. No CPU limit would be kinder to
                        // latency; this one only stops a runaway from starving the node.
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "64Mi"},
                            "limits": {"cpu": "2", "memory": "512Mi"},
                        },
                        "securityContext": {
                            "privileged": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "runAsUser": 0,
                            "capabilities": {"drop": ["ALL"], "add": caps},
                            // Runtimes' default seccomp profiles refuse bpf(2).
                            "seccompProfile": {"type": "Unconfined"},
                        },
                        "volumeMounts": [
                            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
                            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": true},
                            {"name": "ca-token", "mountPath": TOKEN_DIR, "readOnly": true},
                            {"name": "ca-bundle", "mountPath": BUNDLE_DIR, "readOnly": true},
                            {"name": "handover", "mountPath": "/run/mesh-agent"},
                        ],
                    }],
                    "volumes": [
                        host("bpffs", "/sys/fs/bpf", "DirectoryOrCreate"),
                        host("cgroup", "/sys/fs/cgroup", "Directory"),
                        // Where the running agent offers its sockets to its successor.
                        host("handover", "/run/mesh-agent", "DirectoryOrCreate"),
                        {"name": "ca-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": CA_AUDIENCE, "expirationSeconds": 3600, "path": "token",
                        }}]}},
                        {"name": "ca-bundle", "configMap": {"name": "mesh-trust-bundle", "optional": true}},
                    ],
                },
            },
        },
    })
}

fn ca_deployment(a: &ManifestArgs) -> Value {
    let ns = a.namespace.as_str();
    let tcp = |period: u32| json!({"tcpSocket": {"port": CA_PORT}, "periodSeconds": period, "failureThreshold": 3});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta("mesh-ca", ns, "mesh-ca"),
        "spec": {
            "replicas": a.ca_replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "mesh-ca"}},
            "template": {
                "metadata": {"labels": labels("mesh-ca")},
                "spec": {
                    "serviceAccountName": "mesh-ca",
                    "nodeSelector": {"kubernetes.io/os": "linux"},
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "ca",
                        "image": a.image,
                        "args": [
                            "ca", "--kubernetes",
                            "--listen", format!("0.0.0.0:{CA_PORT}"),
                            "--trust-domain", a.trust_domain,
                            "--cert-ttl", a.cert_ttl,
                            "--agent-service-account", format!("{ns}/mesh-agent"),
                            "--audience", CA_AUDIENCE,
                        ],
                        "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                        "ports": [{"name": "grpc-ca", "containerPort": CA_PORT}],
                        "readinessProbe": tcp(5),
                        "livenessProbe": tcp(10),
                        "resources": {
                            "requests": {"cpu": "50m", "memory": "32Mi"},
                            "limits": {"cpu": "1", "memory": "128Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }],
                },
            },
        },
    })
}

/// Structural CRDs for the Istio kinds discovery reads; the spec is kept as written (the
/// agent validates it and reports problems per object).
fn istio_crds() -> Vec<Value> {
    [
        ("security.istio.io", "AuthorizationPolicy", "authorizationpolicies", "ap"),
        ("security.istio.io", "PeerAuthentication", "peerauthentications", "pa"),
        ("networking.istio.io", "DestinationRule", "destinationrules", "dr"),
    ]
    .into_iter()
    .map(|(group, kind, plural, short)| {
        let version = |name: &str, storage: bool| {
            json!({
                "name": name, "served": true, "storage": storage,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                }},
            })
        };
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.{group}"), "labels": {"app.kubernetes.io/part-of": "mesh"}},
            "spec": {
                "group": group,
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "shortNames": [short], "listKind": format!("{kind}List")},
                "scope": "Namespaced",
                "versions": [version("v1", true), version("v1beta1", false)],
            },
        })
    })
    .collect()
}

/// The install as one YAML stream.
pub fn render(a: &ManifestArgs) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::from("# The mesh's install, from `mesh-agent manifests`.\n");
    for o in objects(a) {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&o)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: ManifestArgs,
    }

    fn defaults() -> ManifestArgs {
        Cli::parse_from(["x"]).a
    }

    fn kind<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
        objs.iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn the_agent_is_not_privileged_and_keeps_exactly_the_listed_capabilities() {
        let objs = objects(&defaults());
        let c =
            &kind(&objs, "DaemonSet", "mesh-agent")["spec"]["template"]["spec"]["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            sc["capabilities"]["add"],
            json!(["SYS_ADMIN", "SYS_PTRACE"])
        );
        for (cap, why) in AGENT_CAPABILITIES {
            assert!(why.len() > 20, "{cap} needs a reason");
        }
    }

    #[test]
    fn probes_are_http_on_the_probe_port_and_the_pod_tolerates_everything_with_requests() {
        let objs = objects(&defaults());
        let spec = &kind(&objs, "DaemonSet", "mesh-agent")["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        assert_eq!(
            c["readinessProbe"]["httpGet"],
            json!({"path": "/ready", "port": PROBE_PORT})
        );
        assert_eq!(
            c["livenessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": PROBE_PORT})
        );
        assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]));
        assert_eq!(spec["priorityClassName"], "system-node-critical");
        assert_eq!(spec["nodeSelector"]["kubernetes.io/os"], "linux");
        assert!(c["resources"]["requests"]["cpu"].is_string());
        assert!(c["resources"]["requests"]["memory"].is_string());
        assert!(c["resources"]["limits"]["memory"].is_string());
        let env = c["env"].as_array().expect("env is a list");
        assert!(env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_array()
            .expect("mounts are a list")
            .iter()
            .map(|m| m["mountPath"].as_str().expect("a mount path"))
            .collect();
        assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/sys/fs/cgroup"));
        assert!(
            mounts.contains(&"/run/mesh-agent"),
            "the handover socket's directory"
        );
        // The successor starts beside the running agent (the hitless upgrade), never after it.
        let ds = &kind(&objs, "DaemonSet", "mesh-agent")["spec"];
        assert_eq!(ds["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
        assert_eq!(ds["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
        assert!(ds["template"]["spec"]["terminationGracePeriodSeconds"].as_u64() > Some(30));
    }

    #[test]
    fn the_image_is_set_in_one_place_and_rbac_reads_only_what_discovery_watches() {
        let mut a = defaults();
        a.image = "registry.example/mesh:1.2.3".into();
        let text = render(&a).expect("renders");
        assert_eq!(text.matches("registry.example/mesh:1.2.3").count(), 2);
        assert!(!text.contains("ghcr.io"));
        let objs = objects(&a);
        let agent = &kind(&objs, "ClusterRole", "mesh-agent")["rules"];
        for r in agent.as_array().expect("rules are a list") {
            assert_eq!(r["verbs"], json!(["get", "list", "watch"]), "{r}");
        }
        let watched: Vec<String> = crate::discovery::kube::watch::OBJECT_KINDS
            .iter()
            .map(|(_, _, _, plural)| (*plural).to_string())
            .collect();
        for p in watched {
            assert!(agent.to_string().contains(&p), "agent cannot read {p}");
        }
        let role = kind(&objs, "Role", "mesh-ca")["rules"].to_string();
        assert!(role.contains("mesh-ca-root") && role.contains("mesh-trust-bundle"));
        assert!(
            !text.contains("\"*\"") && !text.contains("- '*'"),
            "no wildcard grants"
        );
    }

    #[test]
    fn deploy_install_yaml_is_the_default_render() {
        // `cargo run -p mesh-agent -- manifests > deploy/install.yaml` after a change here.
        let shipped = include_str!("../../deploy/install.yaml");
        assert_eq!(shipped, render(&defaults()).expect("renders"));
    }

    #[test]
    fn crds_only_when_asked() {
        let mut a = defaults();
        assert!(
            !render(&a)
                .expect("renders")
                .contains("CustomResourceDefinition")
        );
        a.istio_crds = true;
        assert_eq!(
            render(&a)
                .expect("renders")
                .matches("kind: CustomResourceDefinition")
                .count(),
            3
        );
    }
}
