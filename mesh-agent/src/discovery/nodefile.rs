//! The local-mode discovery source: a YAML node file listing this node's pods and the mesh's
//! services.
//!
//! Parsing is two-stage so that errors can name the pod and the field: serde reads every field as
//! optional, then [`validate`] checks each object on its own. A bad object is reported and, on a
//! reload, replaced by its last valid version (or left out if it never had one), so one typo never
//! takes down the pods that were already served. A file that is not valid YAML at all changes
//! nothing.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::state::{Labels, NodeState, ObjectKey, Pod, Service, ServicePort, Workload};

mod fields;
mod filters;
mod fs;
pub mod objects;
mod policies;
pub mod raw;
mod routes;

pub use fields::ObjectError;
use fields::{Clue, Ctx, unroutable, who};
use fs::{Fs, NoFsChecks, RealFs};
use policies::{validate_authorization_policies, validate_peer_authentications};
use raw::{RawFile, RawWorkload};

/// Errors about the node file as a whole; per-object problems are [`ObjectError`]s.
#[derive(Debug, thiserror::Error)]
pub enum NodeFileError {
    /// The file could not be read.
    #[error("cannot read node file {path}: {source}")]
    Read {
        /// The node file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML, or its top level has the wrong shape.
    #[error("node file {path} is not valid: {message}; nothing from this version was applied")]
    Syntax {
        /// The node file.
        path: PathBuf,
        /// serde_yaml_ng's message, with line and column.
        message: String,
    },
    /// The file is larger than [`MAX_NODE_FILE`].
    #[error(
        "node file {path} is {size} bytes, over the limit of {max}; split it or remove unused objects; nothing from this version was applied"
    )]
    TooLarge {
        /// The node file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Flow collections are nested deeper than [`MAX_DEPTH`].
    #[error(
        "node file {path}: collections nested deeper than {max} levels at line {line}; nothing from this version was applied"
    )]
    TooDeep {
        /// The node file.
        path: PathBuf,
        /// Where the limit was passed.
        line: usize,
        /// The limit.
        max: usize,
    },
    /// The top-level `node` field is not a string.
    #[error(
        "node file {path}: top-level field `node` must be a string (this node's name), not {found}"
    )]
    NodeNotString {
        /// The node file.
        path: PathBuf,
        /// What it was.
        found: String,
    },
    /// The top-level `node` field is not a node name.
    #[error("node file {path}: top-level field `node`: {problem}")]
    BadNode {
        /// The file.
        path: PathBuf,
        /// What is wrong with the name.
        problem: String,
    },
    /// The top-level `node` field is missing.
    #[error("node file {path}: missing required top-level field `node` (this node's name)")]
    MissingNode {
        /// The node file.
        path: PathBuf,
    },
}

/// The result of reading a node file: the state to apply and what was wrong with it.
#[derive(Debug)]
pub struct Loaded {
    /// The state to apply.
    pub state: NodeState,
    /// Objects that were rejected (and, on reload, kept at their previous version).
    pub errors: Vec<ObjectError>,
}

/// Reads and validates `path`. `previous` is the state currently served: a rejected object that
/// exists there is kept as it was.
pub fn load(
    path: &Path,
    previous: Option<&NodeState>,
    pod_cgroup_root: Option<&Path>,
) -> Result<Loaded, NodeFileError> {
    parse(path, &read(path)?, previous, &RealFs { pod_cgroup_root })
}

/// [`load`] for the CA, which runs on another machine: it needs each pod's namespace and service
/// account, not its netns and cgroup paths, which exist only on the pod's node.
pub fn load_remote(path: &Path) -> Result<Loaded, NodeFileError> {
    parse(path, &read(path)?, None, &NoFsChecks)
}

/// A node file's text validated as the CA reads it (no filesystem checks): what the fuzz target
/// of the node-file and policy parsers calls.
pub fn parse_remote_text(text: &str) -> Result<Loaded, NodeFileError> {
    parse(Path::new("<input>"), text, None, &NoFsChecks)
}

/// [`load`] on text already read: the agent keeps the text it applied, so its watcher compares
/// the file with what is served, not with a later reading.
pub fn load_text(
    path: &Path,
    text: &str,
    previous: Option<&NodeState>,
    pod_cgroup_root: Option<&Path>,
) -> Result<Loaded, NodeFileError> {
    parse(path, text, previous, &RealFs { pod_cgroup_root })
}

/// The node file's text.
pub fn read(path: &Path) -> Result<String, NodeFileError> {
    use std::io::Read;
    let read_err = |source| NodeFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    // Read one byte past the limit rather than trusting the size, which can change meanwhile.
    let mut text = String::new();
    file.take(MAX_NODE_FILE + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    let size = text.len() as u64;
    if size > MAX_NODE_FILE {
        let size = std::fs::metadata(path).map_or(size, |m| m.len());
        return Err(NodeFileError::TooLarge {
            path: path.to_owned(),
            size,
            max: MAX_NODE_FILE,
        });
    }
    Ok(text)
}

/// Largest node file accepted (bytes). A node file lists one node's pods and the mesh's
/// services and policies: a few thousand objects fit in well under a megabyte.
pub const MAX_NODE_FILE: u64 = 8 * 1024 * 1024;
/// Deepest nesting of flow collections (`[` and `{`). The YAML parser takes time that grows
/// with depth before its own recursion limit (128) stops it: 100,000 levels took 19 s on one
/// core. Block nesting is bounded by that limit at once, since each level needs its indent.
pub const MAX_DEPTH: usize = 64;

/// Refuses flow collections nested deeper than [`MAX_DEPTH`] in one linear pass, before the
/// YAML parser sees the text. Quoted scalars and comments are skipped; in block context a
/// bracket opens a collection only where a value starts (so `a[b` stays a plain scalar).
fn check_depth(path: &Path, text: &str) -> Result<(), NodeFileError> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut value_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                line += 1;
                value_start = true;
                continue;
            }
            '#' if value_start || depth > 0 => {
                while chars.peek().is_some_and(|c| *c != '\n') {
                    chars.next();
                }
                continue;
            }
            '"' | '\'' if value_start || depth > 0 => {
                while let Some(q) = chars.next() {
                    match q {
                        '\\' if c == '"' => {
                            chars.next();
                        }
                        '\n' => line += 1,
                        q if q == c => {
                            if c == '\'' && chars.peek() == Some(&'\'') {
                                chars.next();
                            } else {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                value_start = false;
                continue;
            }
            '[' | '{' if value_start || depth > 0 => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(NodeFileError::TooDeep {
                        path: path.to_owned(),
                        line,
                        max: MAX_DEPTH,
                    });
                }
                value_start = true;
                continue;
            }
            ']' | '}' if depth > 0 => depth -= 1,
            ',' if depth > 0 => {
                value_start = true;
                continue;
            }
            ':' | '-' | '?' => {
                value_start = chars.peek().is_none_or(|c| c.is_whitespace());
                continue;
            }
            c if c.is_whitespace() => continue,
            _ => {}
        }
        value_start = false;
    }
    Ok(())
}

/// [`load`] on text already read; `path` is used only in messages.
fn parse(
    path: &Path,
    text: &str,
    previous: Option<&NodeState>,
    fs: &dyn Fs,
) -> Result<Loaded, NodeFileError> {
    if text.len() as u64 > MAX_NODE_FILE {
        return Err(NodeFileError::TooLarge {
            path: path.to_owned(),
            size: text.len() as u64,
            max: MAX_NODE_FILE,
        });
    }
    check_depth(path, text)?;
    let (raw, object_errors) =
        objects::documents(text).map_err(|message| NodeFileError::Syntax {
            path: path.to_owned(),
            message,
        })?;
    let node = node_name(path, &raw)?;
    Ok(validate(node, raw, object_errors, previous, fs))
}

/// Validates a model built elsewhere (Kubernetes discovery) exactly as a node file's, with
/// `object_errors` (objects that could not be read) reported beside its own problems.
pub fn load_raw(
    raw: RawFile,
    object_errors: Vec<ObjectError>,
    previous: Option<&NodeState>,
    pod_cgroup_root: Option<&Path>,
) -> Result<Loaded, NodeFileError> {
    let path = Path::new("<kubernetes>");
    let node = node_name(path, &raw)?;
    Ok(validate(
        node,
        raw,
        object_errors,
        previous,
        &RealFs { pod_cgroup_root },
    ))
}

/// The top-level `node`: present, a string, and a DNS subdomain.
fn node_name(path: &Path, raw: &RawFile) -> Result<String, NodeFileError> {
    Ok(match &raw.node {
        None => {
            return Err(NodeFileError::MissingNode {
                path: path.to_owned(),
            });
        }
        Some(serde_yaml_ng::Value::String(s)) => {
            fields::check_subdomain(s).map_err(|problem| NodeFileError::BadNode {
                path: path.to_owned(),
                problem,
            })?;
            s.clone()
        }
        Some(other) => {
            return Err(NodeFileError::NodeNotString {
                path: path.to_owned(),
                found: serde_yaml_ng::to_string(other)
                    .unwrap_or_default()
                    .trim()
                    .chars()
                    .take(40)
                    .collect(),
            });
        }
    })
}

fn validate(
    node: String,
    raw: RawFile,
    mut errors: Vec<ObjectError>,
    previous: Option<&NodeState>,
    fs: &dyn Fs,
) -> Loaded {
    let mut state = NodeState {
        node,
        excluded_ports: raw.excluded_ports,
        mesh: crate::state::MeshConfig {
            path_normalization: raw
                .mesh_config
                .path_normalization
                .as_ref()
                .map(|p| p.normalization)
                .unwrap_or_default(),
            case_insensitive_deny: raw.mesh_config.case_insensitive_deny.unwrap_or(true),
            root_namespace: raw
                .mesh_config
                .root_namespace
                .clone()
                .unwrap_or_else(|| crate::state::DEFAULT_ROOT_NAMESPACE.to_string()),
        },
        ..NodeState::default()
    };
    // Address → owner, across pods and services, to reject duplicates.
    let mut owners: HashMap<IpAddr, String> = HashMap::new();

    // Pass 1: check each pod on its own.
    let mut candidates: Vec<(usize, Pod)> = Vec::new();
    let mut rejected: Vec<ObjectKey> = Vec::new();
    let mut clues: Vec<Clue> = Vec::new();
    for (i, rp) in raw.pods.iter().enumerate() {
        let mut cx = Ctx {
            kind: "pod",
            who: who(&rp.namespace, &rp.name),
            position: format!("pods[{i}]"),
            errors: &mut errors,
        };
        let before = cx.errors.len();
        let name = cx.label("name", &rp.name);
        let namespace = cx.label("namespace", &rp.namespace);
        let sa = cx.label("serviceAccount", &rp.service_account);
        let ip = cx.ip("ip", &rp.ip);
        let secondary_ip = cx.secondary_ip("secondaryIp", &rp.secondary_ip, ip);
        let netns = cx.required("netns", &rp.netns).cloned();
        let cgroup = cx.required("cgroup", &rp.cgroup).cloned();
        if let Some(p) = &netns
            && let Err(e) = fs.is_netns(p)
        {
            cx.fail("netns", e);
        }
        if let Some(p) = &cgroup
            && let Err(e) = fs.is_cgroup2(p).and_then(|()| fs.is_pod_cgroup(p))
        {
            cx.fail("cgroup", e);
        }
        let key = match (namespace, name) {
            (Some(namespace), Some(name)) => Some(ObjectKey { namespace, name }),
            _ => None,
        };
        if let Some(k) = &key
            && candidates.iter().any(|(_, p)| &p.key == k)
        {
            cx.fail(
                "name",
                format!("pod {k} is listed twice; each pod may appear once"),
            );
        }
        match (cx.errors.len() == before, key, ip, sa, netns, cgroup) {
            (true, Some(key), Some(ip), Some(service_account), Some(netns), Some(cgroup)) => {
                candidates.push((
                    i,
                    Pod {
                        service_account,
                        ip,
                        secondary_ip,
                        netns,
                        cgroup,
                        labels: rp.labels.clone(),
                        workload_name: rp.workload_name.clone().unwrap_or_else(|| key.name.clone()),
                        key,
                    },
                ));
            }
            (_, Some(key), ..) => rejected.push(key),
            _ => clues.push(Clue::of(&rp.name, &rp.namespace, &rp.ip)),
        }
    }
    // Pass 2: one pod per address. The pod already serving an address keeps it, so adding a
    // conflicting pod can never knock out a running one; otherwise the first listed wins.
    let previous_owner = |ip: IpAddr| {
        previous.and_then(|p| p.pods.values().find(|p| p.ip == ip).map(|p| p.key.clone()))
    };
    for (i, pod) in &candidates {
        let winner = candidates
            .iter()
            .filter(|(_, p)| p.ip == pod.ip)
            .find(|(_, p)| Some(&p.key) == previous_owner(pod.ip).as_ref())
            .or_else(|| candidates.iter().find(|(_, p)| p.ip == pod.ip))
            .map(|(_, p)| p.key.clone());
        // Beyond the primaries compared above, an address a pod accepted earlier holds (as its
        // secondary) is taken.
        let taken = pod
            .ips()
            .find_map(|a| owners.get(&a).map(|o| (a, o.clone())));
        if let Some((a, owner)) = &taken
            && winner.as_ref() == Some(&pod.key)
        {
            errors.push(ObjectError {
                kind: "pod",
                who: pod.key.to_string(),
                position: format!("pods[{i}]"),
                field: if *a == pod.ip { "ip" } else { "secondaryIp" },
                problem: format!(
                    "address {a} is already used by {owner}; pod addresses must be unique"
                ),
            });
            rejected.push(pod.key.clone());
        } else if winner.as_ref() == Some(&pod.key) {
            for a in pod.ips() {
                owners.insert(a, format!("pod {}", pod.key));
            }
            state.pods.insert(pod.key.clone(), pod.clone());
        } else {
            let owner = winner.map(|k| format!("pod {k}")).unwrap_or_default();
            errors.push(ObjectError {
                kind: "pod",
                who: pod.key.to_string(),
                position: format!("pods[{i}]"),
                field: "ip",
                problem: format!(
                    "address {} is already used by {owner}; pod addresses must be unique",
                    pod.ip
                ),
            });
            rejected.push(pod.key.clone());
        }
    }
    // Pass 3: a rejected pod keeps its last valid version, unless its address is now taken. So
    // does a previous pod that an entry without a usable key may describe (an empty namespace,
    // a name that is not a DNS label): it cannot be told apart from a removal.
    let listed: Vec<ObjectKey> = candidates
        .iter()
        .map(|(_, p)| p.key.clone())
        .chain(rejected.iter().cloned())
        .collect();
    let shielded = previous
        .into_iter()
        .flat_map(|p| p.pods.values())
        .filter(|old| {
            !listed.contains(&old.key) && clues.iter().any(|c| c.may_be(&old.key, old.ip))
        });
    let shielded: Vec<ObjectKey> = shielded.map(|p| p.key.clone()).collect();
    for key in rejected.into_iter().chain(shielded) {
        if let Some(old) = previous.and_then(|p| p.pods.get(&key))
            && !old.ips().any(|a| owners.contains_key(&a))
            && !state.pods.contains_key(&key)
        {
            for a in old.ips() {
                owners.insert(a, format!("pod {key}"));
            }
            state.pods.insert(key, old.clone());
        }
    }

    let mut service_clues: Vec<Clue> = Vec::new();
    let mut services_listed: Vec<ObjectKey> = Vec::new();
    for (i, rs) in raw.services.iter().enumerate() {
        let mut cx = Ctx {
            kind: "service",
            who: who(&rs.namespace, &rs.name),
            position: format!("services[{i}]"),
            errors: &mut errors,
        };
        let before = cx.errors.len();
        let name = cx.label("name", &rs.name);
        let namespace = cx.label("namespace", &rs.namespace);
        let ip = cx.ip("ip", &rs.ip);
        let secondary_ip = cx.secondary_ip("secondaryIp", &rs.secondary_ip, ip);
        let ports = cx.required("ports", &rs.ports);
        for (field, a) in [("ip", ip), ("secondaryIp", secondary_ip)] {
            if let Some(a) = a
                && let Some(owner) = owners.get(&a)
            {
                cx.fail(field, format!("address {a} is already used by {owner}"));
            }
        }
        let mut sports = Vec::new();
        for p in ports.into_iter().flatten() {
            if p.port == 0 || p.target_port == Some(0) {
                cx.fail("ports", "port 0 is not a valid service or target port");
            }
            sports.push(ServicePort {
                port: p.port,
                target_port: p.target_port.unwrap_or(p.port),
                opaque: p.app_protocol.as_deref() == Some("tcp"),
            });
        }
        if ports.is_some_and(|p| p.is_empty()) {
            cx.fail("ports", "a service needs at least one port");
        }
        let mut endpoints = Vec::new();
        for e in &rs.endpoints {
            match e.parse::<IpAddr>() {
                Ok(a) => match unroutable(a) {
                    None => endpoints.push(a),
                    Some(why) => cx.fail(
                        "endpoints",
                        format!("{a} is {why}, which cannot be a pod's address"),
                    ),
                },
                Err(_) => cx.fail("endpoints", format!("{e:?} is not an IP address")),
            }
        }
        let mut upgrades = Vec::new();
        for u in rs
            .allowed_upgrades
            .clone()
            .unwrap_or_else(crate::state::default_upgrades)
        {
            let token = u.to_ascii_lowercase();
            let valid = !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
            if valid {
                upgrades.push(token);
            } else {
                cx.fail(
                    "allowedUpgrades",
                    format!("{u:?} is not an HTTP upgrade token (e.g. websocket)"),
                );
            }
        }
        if upgrades.iter().any(|u| u == "h2c" || u.starts_with("h2c/")) {
            cx.fail(
                "allowedUpgrades",
                "h2c cannot be allowed: after the switch every request on the connection would skip routing and authorization",
            );
        }
        let key = match (namespace, name) {
            (Some(namespace), Some(name)) => Some(ObjectKey { namespace, name }),
            _ => None,
        };
        if let Some(k) = &key
            && state.services.contains_key(k)
        {
            cx.fail("name", format!("service {k} is listed twice"));
        }
        let valid = cx.errors.len() == before;
        services_listed.extend(key.clone());
        match (valid, key, ip) {
            (true, Some(key), Some(ip)) => {
                for a in std::iter::once(ip).chain(secondary_ip) {
                    owners.insert(a, format!("service {key}"));
                }
                let svc = Service {
                    key: key.clone(),
                    ip,
                    secondary_ip,
                    ports: sports,
                    endpoints,
                    upgrades,
                };
                // Unchanged, the previous state's copy (which the routes share) stays.
                let svc = match previous.and_then(|p| p.services.get(&key)) {
                    Some(old) if **old == svc => old.clone(),
                    _ => Arc::new(svc),
                };
                state.services.insert(key, svc);
            }
            (false, Some(key), _) => {
                if let Some(old) = previous.and_then(|p| p.services.get(&key))
                    && !old.ips().any(|a| owners.contains_key(&a))
                    && !state.services.contains_key(&key)
                {
                    for a in old.ips() {
                        owners.insert(a, format!("service {key}"));
                    }
                    state.services.insert(key, old.clone());
                }
            }
            _ => service_clues.push(Clue::of(&rs.name, &rs.namespace, &rs.ip)),
        }
    }
    // As for pods: a previous service that a keyless bad entry may describe stays.
    for old in previous.into_iter().flat_map(|p| p.services.values()) {
        if !services_listed.contains(&old.key)
            && service_clues.iter().any(|c| c.may_be(&old.key, old.ip))
            && !old.ips().any(|a| owners.contains_key(&a))
        {
            for a in old.ips() {
                owners.insert(a, format!("service {}", old.key));
            }
            state.services.insert(old.key.clone(), old.clone());
        }
    }
    validate_workloads(&raw.workloads, &mut state, previous, &mut errors);
    validate_peer_authentications(&raw.peer_authentications, &mut state, &mut errors);
    validate_authorization_policies(&raw.authorization_policies, &mut state, &mut errors);
    routes::validate_http_routes(&raw.http_routes, &mut state, previous, &mut errors);
    routes::validate_destination_rules(&raw.destination_rules, &mut state, previous, &mut errors);
    Loaded { state, errors }
}

/// Remote pods, plus this node's own pods (so every lookup by address sees one table).
fn validate_workloads(
    raw: &[RawWorkload],
    state: &mut NodeState,
    previous: Option<&NodeState>,
    errors: &mut Vec<ObjectError>,
) {
    // Replicas have the same labels, owner, service account and node: they share one copy of
    // each (the discovery's own labels, when it shares them already). A workload that has not
    // changed keeps the previous state's copy, so at ten thousand workloads a change to one
    // allocates for one.
    let mut labels: HashMap<&Labels, Arc<Labels>> = HashMap::new();
    let mut names: HashSet<Arc<str>> = HashSet::new();
    let mut name_of = |n: &str| match names.get(n) {
        Some(x) => x.clone(),
        None => {
            let x: Arc<str> = n.into();
            names.insert(x.clone());
            x
        }
    };
    let keep = |w: Workload| -> Arc<Workload> {
        match previous.and_then(|p| p.workloads.get(&w.ip)) {
            Some(old) if **old == w => old.clone(),
            _ => Arc::new(w),
        }
    };
    for pod in state.pods.values() {
        let w = keep(Workload {
            key: pod.key.clone(),
            ip: pod.ip,
            secondary_ip: pod.secondary_ip,
            service_account: name_of(&pod.service_account),
            node: name_of(&state.node),
            labels: Arc::new(pod.labels.clone()),
            workload_name: name_of(&pod.workload_name),
        });
        for a in pod.ips() {
            state.workloads.insert(a, w.clone());
        }
    }
    for (i, rw) in raw.iter().enumerate() {
        let mut cx = Ctx {
            kind: "workload",
            who: who(&rw.namespace, &rw.name),
            position: format!("workloads[{i}]"),
            errors,
        };
        let before = cx.errors.len();
        let name = cx.label("name", &rw.name);
        let namespace = cx.label("namespace", &rw.namespace);
        let sa = cx.label("serviceAccount", &rw.service_account);
        let ip = cx.ip("ip", &rw.ip);
        let secondary_ip = cx.secondary_ip("secondaryIp", &rw.secondary_ip, ip);
        let node = cx.node("node", &rw.node);
        for (field, a) in [("ip", ip), ("secondaryIp", secondary_ip)] {
            if let Some(a) = a
                && let Some(w) = state.workloads.get(&a)
            {
                cx.fail(
                    field,
                    format!("address {a} is already used by workload {}", w.key),
                );
            }
        }
        if let (true, Some(name), Some(namespace), Some(service_account), Some(ip), Some(node)) =
            (cx.errors.len() == before, name, namespace, sa, ip, node)
        {
            let shared = labels
                .entry(&*rw.labels)
                .or_insert_with(|| rw.labels.clone())
                .clone();
            let workload_name = name_of(rw.workload_name.as_deref().unwrap_or(&name));
            let w = keep(Workload {
                key: ObjectKey { namespace, name },
                ip,
                secondary_ip,
                service_account: name_of(&service_account),
                node: name_of(&node),
                labels: shared,
                workload_name,
            });
            for a in w.ips() {
                state.workloads.insert(a, w.clone());
            }
        }
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should stop at the first unexpected error"
)]
mod tests {
    use super::fs::check_pod_cgroup;
    use super::*;
    use crate::state::{Action, MtlsMode, Rule};

    /// Pretends every path under /ns is a netns and every path under /cg is a cgroup.
    struct FakeFs;
    impl Fs for FakeFs {
        fn is_netns(&self, p: &Path) -> Result<(), String> {
            if p.starts_with("/ns") {
                Ok(())
            } else {
                Err(format!("network namespace {} does not exist", p.display()))
            }
        }
        fn is_cgroup2(&self, p: &Path) -> Result<(), String> {
            if p.starts_with("/cg") {
                Ok(())
            } else {
                Err(format!("cgroup {} does not exist", p.display()))
            }
        }
        /// `/cg` is the root; the agent is in `/cg/system/agent`; no pods' root is set.
        fn is_pod_cgroup(&self, p: &Path) -> Result<(), String> {
            check_pod_cgroup(
                p,
                p == Path::new("/cg"),
                Some(Path::new("/cg/system/agent")),
                None,
            )
        }
    }

    fn run(text: &str, prev: Option<&NodeState>) -> Result<Loaded, NodeFileError> {
        parse(Path::new("t.yaml"), text, prev, &FakeFs)
    }

    /// The first problem reported for `text`, and the pods that were kept.
    fn first_error(text: &str) -> (String, usize) {
        let l = run(text, None).expect("parses");
        let msg = l
            .errors
            .first()
            .map(ToString::to_string)
            .unwrap_or_default();
        (msg, l.state.pods.len())
    }

    const GOOD: &str = "
node: n1
pods:
  - {name: a, namespace: default, serviceAccount: sa, ip: 10.0.0.1, netns: /ns/a, cgroup: /cg/a}
  - {name: b, namespace: default, serviceAccount: sa, ip: 10.0.0.2, netns: /ns/b, cgroup: /cg/b}
services:
  - {name: web, namespace: default, ip: 10.96.0.1, ports: [{port: 80, targetPort: 8080}], endpoints: [10.0.0.1]}
";

    #[test]
    fn good_file_parses() {
        let l = run(GOOD, None).expect("parses");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.state.pods.len(), 2);
        let svc = l.state.services.values().next().expect("service");
        assert_eq!(svc.target_port(80), Some(8080));
        assert_eq!(svc.target_port(81), None);
    }

    const DUAL: &str = "
node: n1
pods:
  - {name: a, namespace: default, serviceAccount: sa, ip: 10.0.0.1, secondaryIp: \"fd00::1\", netns: /ns/a, cgroup: /cg/a}
  - {name: b, namespace: default, serviceAccount: sa, ip: 10.0.0.2, netns: /ns/b, cgroup: /cg/b}
services:
  - {name: web, namespace: default, ip: 10.96.0.1, secondaryIp: \"fd96::1\", ports: [{port: 80}], endpoints: [10.0.0.1, \"fd00::1\"]}
workloads:
  - {name: r, namespace: default, serviceAccount: sa, ip: \"fd00::9\", secondaryIp: 10.0.1.9, node: n2}
";

    #[test]
    fn dual_stack_pods_services_and_workloads_are_known_by_both_addresses() {
        let l = run(DUAL, None).expect("parses");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        let a = &l.state.pods[&ObjectKey {
            namespace: "default".into(),
            name: "a".into(),
        }];
        assert_eq!(
            a.ips().map(|i| i.to_string()).collect::<Vec<_>>(),
            ["10.0.0.1", "fd00::1"]
        );
        let svc = l.state.services.values().next().expect("service");
        assert_eq!(svc.secondary_ip, Some("fd96::1".parse().expect("ip")));
        for addr in ["10.0.0.1", "fd00::1"] {
            let w = &l.state.workloads[&addr.parse::<IpAddr>().expect("ip")];
            assert_eq!(w.key.name, "a", "{addr}");
        }
        for addr in ["fd00::9", "10.0.1.9"] {
            let w = &l.state.workloads[&addr.parse::<IpAddr>().expect("ip")];
            assert_eq!(w.key.name, "r", "{addr}");
        }
    }

    #[test]
    fn a_secondary_address_of_the_same_family_or_already_taken_is_refused() {
        for (bad, field, problem) in [
            (
                DUAL.replace("secondaryIp: \"fd00::1\"", "secondaryIp: 10.0.0.7"),
                "secondaryIp",
                "same family as the primary address 10.0.0.1",
            ),
            (
                DUAL.replace("ip: 10.0.0.2,", "ip: 10.0.0.2, secondaryIp: \"fd00::1\","),
                "secondaryIp",
                "address fd00::1 is already used by pod default/a",
            ),
            (
                DUAL.replace("ip: 10.0.0.2,", "ip: \"fd00::1\","),
                "ip",
                "address fd00::1 is already used by pod default/a",
            ),
            (
                DUAL.replace("secondaryIp: \"fd96::1\"", "secondaryIp: \"fd00::1\""),
                "secondaryIp",
                "address fd00::1 is already used by pod default/a",
            ),
            (
                DUAL.replace("secondaryIp: 10.0.1.9", "secondaryIp: 10.0.0.1"),
                "secondaryIp",
                "already used by workload default/a",
            ),
        ] {
            let l = run(&bad, None).expect("parses");
            let msg = l
                .errors
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                msg.contains(&format!("field `{field}`")) && msg.contains(problem),
                "{bad}: {msg}"
            );
        }
    }

    #[test]
    fn missing_field_names_pod_and_field_and_keeps_previous() {
        let prev = run(GOOD, None).expect("parses").state;
        let bad = GOOD.replace("ip: 10.0.0.2, ", "");
        let l = run(&bad, Some(&prev)).expect("parses");
        assert_eq!(l.errors.len(), 1);
        let msg = l.errors[0].to_string();
        assert!(msg.contains("pod default/b (pods[1])"), "{msg}");
        assert!(msg.contains("field `ip`: missing"), "{msg}");
        // The previous version of b is still served.
        assert_eq!(l.state.pods, prev.pods);
        // Without a previous version it is left out.
        let l = run(&bad, None).expect("parses");
        assert_eq!(l.state.pods.len(), 1);
    }

    #[test]
    fn a_bad_entry_never_takes_a_serving_pod_or_service_out() {
        let prev = run(GOOD, None).expect("parses").state;
        let cases = [
            // Pod b's entry with an empty namespace, an empty name, a name that is no DNS label.
            GOOD.replace("name: b, namespace: default", "name: b, namespace: \"\""),
            GOOD.replace(
                "name: b, namespace: default",
                "name: \"\", namespace: default",
            ),
            GOOD.replace(
                "name: b, namespace: default",
                "name: B_1, namespace: default",
            ),
            GOOD.replace("{name: b, namespace: default,", "{"),
            // Pod b moved to an address no pod can have.
            GOOD.replace("ip: 10.0.0.2", "ip: 127.0.0.1"),
            GOOD.replace("ip: 10.0.0.2", "ip: 169.254.1.1"),
            // The service moved to a loopback address, or lost its name.
            GOOD.replace("ip: 10.96.0.1", "ip: \"::1\""),
            GOOD.replace("ip: 10.96.0.1", "ip: 0.0.0.0"),
            GOOD.replace("ip: 10.96.0.1", "ip: 224.0.0.1"),
            GOOD.replace(
                "{name: web, namespace: default,",
                "{name: \"\", namespace: default,",
            ),
            GOOD.replace("{name: web, namespace: default,", "{namespace: \"\","),
        ];
        for bad in &cases {
            let l = run(bad, Some(&prev)).expect("parses");
            assert!(!l.errors.is_empty(), "reported: {bad}");
            assert_eq!(l.state.pods, prev.pods, "{bad}");
            assert_eq!(l.state.services, prev.services, "{bad}");
        }
        // A valid change still applies, and a removal still removes.
        let moved =
            run(&GOOD.replace("ip: 10.96.0.1", "ip: 10.96.0.9"), Some(&prev)).expect("parses");
        assert!(moved.errors.is_empty());
        assert_eq!(
            moved
                .state
                .services
                .values()
                .next()
                .map(|s| s.ip.to_string())
                .as_deref(),
            Some("10.96.0.9")
        );
        let removed = GOOD.replace(
            "  - {name: b, namespace: default, serviceAccount: sa, ip: 10.0.0.2, netns: /ns/b, cgroup: /cg/b}\n",
            "",
        );
        assert_eq!(
            run(&removed, Some(&prev)).expect("parses").state.pods.len(),
            1
        );
    }

    #[test]
    fn addresses_that_cannot_be_a_pods_are_refused_naming_the_field() {
        for (ip, why) in [
            ("0.0.0.0", "the unspecified address"),
            ("\"::\"", "the unspecified address"),
            ("127.0.0.5", "a loopback address"),
            ("\"::1\"", "a loopback address"),
            ("\"::ffff:127.0.0.1\"", "a loopback address"),
            ("239.1.1.1", "a multicast address"),
            ("\"ff02::1\"", "a multicast address"),
            ("169.254.0.9", "a link-local address"),
            ("\"fe80::1\"", "a link-local address"),
            ("255.255.255.255", "the broadcast address"),
        ] {
            for (from, to, field) in [
                (
                    "ip: 10.0.0.2",
                    format!("ip: {ip}"),
                    "pod default/b (pods[1]): field `ip`",
                ),
                (
                    "ip: 10.96.0.1",
                    format!("ip: {ip}"),
                    "service default/web (services[0]): field `ip`",
                ),
                (
                    "endpoints: [10.0.0.1]",
                    format!("endpoints: [{ip}]"),
                    "field `endpoints`",
                ),
            ] {
                let (msg, _) = first_error(&GOOD.replace(from, &to));
                assert!(msg.contains(field) && msg.contains(why), "{ip}: {msg}");
            }
        }
    }

    #[test]
    fn a_pods_cgroup_must_be_a_pods_cgroup() {
        for (cg, why) in [
            ("/cg", "is the root cgroup"),
            (
                "/cg/system",
                "the agent's own cgroup or one of its ancestors",
            ),
            (
                "/cg/system/agent",
                "the agent's own cgroup or one of its ancestors",
            ),
        ] {
            let (msg, pods) = first_error(&GOOD.replace("cgroup: /cg/b", &format!("cgroup: {cg}")));
            assert!(
                msg.contains("pod default/b (pods[1]): field `cgroup`") && msg.contains(why),
                "{cg}: {msg}"
            );
            assert_eq!(pods, 1);
        }
        // Below a configured root only.
        let root = Some(Path::new("/k/kubepods"));
        assert!(check_pod_cgroup(Path::new("/k/kubepods/pod1"), false, None, root).is_ok());
        for p in ["/k/kubepods", "/k/other", "/k"] {
            let e = check_pod_cgroup(Path::new(p), false, None, root).unwrap_err();
            assert!(
                e.contains("not strictly below the pods' cgroup root"),
                "{p}: {e}"
            );
        }
    }

    #[test]
    fn hostile_shapes_are_refused_fast_and_the_node_must_be_a_string() {
        let deep = format!(
            "node: n1\npods: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let started = std::time::Instant::now();
        let e = run(&deep, None).unwrap_err();
        assert!(matches!(e, NodeFileError::TooDeep { line: 2, .. }), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let mapping = format!("node: n1\nx: {}1{}\n", "{a: ".repeat(70), "}".repeat(70));
        assert!(matches!(
            run(&mapping, None),
            Err(NodeFileError::TooDeep { .. })
        ));
        // Brackets inside scalars and comments are not nesting.
        let fine = format!(
            "node: n1 # {}\nexcludedPorts: [22]\npods: []\nservices:\n  - {{name: a, namespace: \"{}\"}}\n",
            "[".repeat(100),
            "[".repeat(100)
        );
        assert!(
            !matches!(run(&fine, None), Err(NodeFileError::TooDeep { .. })),
            "{:?}",
            run(&fine, None).err()
        );
        let big = format!("node: n1\n#{}\n", "x".repeat(MAX_NODE_FILE as usize));
        assert!(matches!(
            run(&big, None),
            Err(NodeFileError::TooLarge { .. })
        ));
        // Node names are DNS subdomains, as Kubernetes names nodes.
        for node in ["ip-10-0-0-1.ec2.internal", "n1", "a.b-c.d"] {
            assert!(
                run(&format!("node: {node}\npods: []\n"), None).is_ok(),
                "{node}"
            );
        }
        for node in ["\"Node-1\"", "\"a..b\"", "\".a\"", "\"a.-b\"", "\"a_b\""] {
            let e = run(&format!("node: {node}\npods: []\n"), None).unwrap_err();
            assert!(matches!(e, NodeFileError::BadNode { .. }), "{node}: {e}");
        }
        for node in ["123", "[a]", "{a: b}", "true"] {
            let e = run(&format!("node: {node}\npods: []\n"), None).unwrap_err();
            assert!(
                matches!(e, NodeFileError::NodeNotString { .. }),
                "{node}: {e}"
            );
        }
    }

    #[test]
    fn duplicate_ip_rejects_the_later_pod() {
        let bad = GOOD.replace("ip: 10.0.0.2", "ip: 10.0.0.1");
        let l = run(&bad, None).expect("parses");
        let msg = l.errors[0].to_string();
        assert!(
            msg.contains("pod default/b") && msg.contains("already used by pod default/a"),
            "{msg}"
        );
        assert_eq!(l.state.pods.len(), 1);
    }

    #[test]
    fn duplicate_ip_never_evicts_the_running_pod() {
        let prev = run(GOOD, None).expect("parses").state;
        // A new pod listed first claims b's address: b keeps it, the newcomer is rejected.
        let bad = GOOD.replace(
            "pods:\n",
            "pods:\n  - {name: c, namespace: default, serviceAccount: sa, ip: 10.0.0.2, netns: /ns/c, cgroup: /cg/c}\n",
        );
        let l = run(&bad, Some(&prev)).expect("parses");
        assert_eq!(l.state.pods, prev.pods);
        let msg = l.errors[0].to_string();
        assert!(
            msg.contains("pod default/c (pods[0]): field `ip`") && msg.contains("default/b"),
            "{msg}"
        );
    }

    #[test]
    fn missing_netns_is_reported() {
        let bad = GOOD.replace("/ns/b", "/nope/b");
        let l = run(&bad, None).expect("parses");
        let msg = l.errors[0].to_string();
        assert!(
            msg.contains("field `netns`") && msg.contains("/nope/b"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse(
            Path::new("x.yaml"),
            "node: n1\npods: [ {name: a",
            None,
            &FakeFs,
        )
        .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("x.yaml") && msg.contains("line"), "{msg}");
    }

    #[test]
    fn unknown_field_is_a_syntax_error() {
        let err =
            parse(Path::new("x.yaml"), "node: n1\npodz: []\n", None, &FakeFs).expect_err("fail");
        assert!(err.to_string().contains("podz"), "{err}");
    }

    #[test]
    fn bad_names_are_rejected() {
        let bad = GOOD.replace("name: a,", "name: A/../x,");
        let l = run(&bad, None).expect("parses");
        assert!(
            l.errors[0].to_string().contains("field `name`"),
            "{:?}",
            l.errors
        );
    }

    #[test]
    fn unchanged_workloads_and_services_keep_the_previous_states_copy() {
        let text = |sa: &str| {
            format!(
                "{GOOD}workloads:
  - {{name: r, namespace: default, serviceAccount: {sa}, ip: 10.0.1.1, node: n2}}
  - {{name: s, namespace: default, serviceAccount: rsa, ip: 10.0.1.2, node: n2}}
"
            )
        };
        let first = run(&text("rsa"), None).expect("parses").state;
        let second = run(&text("other"), Some(&first)).expect("parses").state;
        let at = |s: &NodeState, a: &str| s.workloads[&a.parse::<IpAddr>().unwrap()].clone();
        assert!(Arc::ptr_eq(
            &at(&first, "10.0.1.2"),
            &at(&second, "10.0.1.2")
        ));
        assert!(!Arc::ptr_eq(
            &at(&first, "10.0.1.1"),
            &at(&second, "10.0.1.1")
        ));
        assert_eq!(&*at(&second, "10.0.1.1").service_account, "other");
        // Replicas share their node's and service account's names.
        assert!(Arc::ptr_eq(
            &at(&first, "10.0.1.1").node,
            &at(&first, "10.0.1.2").node
        ));
        // So with services: web did not change, so it is the same copy.
        let web = |s: &NodeState| s.services.values().next().expect("web").clone();
        assert!(Arc::ptr_eq(&web(&first), &web(&second)));
        let moved = run(
            &text("rsa").replace("endpoints: [10.0.0.1]", "endpoints: [10.0.0.2]"),
            Some(&second),
        )
        .expect("parses")
        .state;
        assert!(!Arc::ptr_eq(&web(&second), &web(&moved)));
        assert_eq!(
            web(&moved).endpoints,
            ["10.0.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    const POLICIES: &str = "
workloads:
  - {name: r, namespace: default, serviceAccount: rsa, ip: 10.0.1.1, node: ip-10-0-1-1.ec2.internal}
peerAuthentications:
  - {name: ns-wide, namespace: default, mode: PERMISSIVE}
  - {name: only-a, namespace: default, selector: {matchLabels: {app: a}}, mode: STRICT}
authorizationPolicies:
  - name: allow-web
    namespace: default
    selector: {matchLabels: {app: a}}
    rules:
      - from: [{source: {principals: [\"spiffe://cluster.local/ns/default/sa/web\"], namespaces: [default]}}]
        to: [{operation: {ports: [\"8080\", 9090]}}]
";

    #[test]
    fn workloads_modes_and_policies_parse() {
        let text = GOOD.replace("cgroup: /cg/a}", "cgroup: /cg/a, labels: {app: a}}") + POLICIES;
        let l = run(&text, None).expect("parses");
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        // Local pods are workloads of this node; remote ones name theirs.
        assert_eq!(l.state.workloads.len(), 3);
        assert_eq!(
            &*l.state.workloads[&"10.0.1.1".parse().unwrap()].node,
            "ip-10-0-1-1.ec2.internal"
        );
        assert_eq!(&*l.state.workloads[&"10.0.0.1".parse().unwrap()].node, "n1");
        let pod = |n: &str| l.state.pods.values().find(|p| p.key.name == n).unwrap();
        // The selector beats the namespace-wide setting.
        assert_eq!(l.state.mtls_mode(pod("a")), MtlsMode::Strict);
        assert_eq!(l.state.mtls_mode(pod("b")), MtlsMode::Permissive);
        let p = &l.state.authorization_policies[0];
        assert_eq!(p.action, Action::Allow);
        // `spiffe://` is accepted and stripped to Istio's principal form.
        assert_eq!(
            p.rules[0].from[0].principals,
            vec!["cluster.local/ns/default/sa/web".to_string()]
        );
        assert_eq!(p.rules[0].to[0].ports, vec![8080, 9090]);
    }

    #[test]
    fn port_level_mtls_reads_number_and_string_ports_and_fails_closed_on_errors() {
        let text = GOOD.replace("cgroup: /cg/a}", "cgroup: /cg/a, labels: {app: a}}")
            + "peerAuthentications:
  - name: a
    namespace: default
    selector: {matchLabels: {app: a}}
    mtls: {mode: STRICT}
    portLevelMtls: {9090: {mode: DISABLE}, \"8080\": {mode: PERMISSIVE}, 7070: {mode: UNSET}}
  - name: wide
    namespace: other
    mtls: {mode: PERMISSIVE}
    portLevelMtls: {9090: {mode: PERMISSIVE}}
  - name: bad-port
    namespace: other
    selector: {matchLabels: {app: x}}
    mtls: {mode: PERMISSIVE}
    portLevelMtls: {http: {mode: PERMISSIVE}, 9090: {mode: DISABLE}}
  - name: bad-mode
    namespace: other
    selector: {matchLabels: {app: y}}
    portLevelMtls: {9090: {mode: OFF}}
";
        let l = run(&text, None).expect("parses");
        let by = |n: &str| {
            l.state
                .peer_authentications
                .iter()
                .find(|p| p.key.name == n)
                .unwrap()
        };
        assert_eq!(
            by("a").ports,
            [(8080, MtlsMode::Permissive), (9090, MtlsMode::Permissive)].into()
        );
        let pod = l.state.pods.values().find(|p| p.key.name == "a").unwrap();
        assert_eq!(l.state.mtls_mode_at(pod, 9090), MtlsMode::Permissive);
        assert_eq!(l.state.mtls_mode_at(pod, 7070), MtlsMode::Strict);
        let all: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        let all = all.join("\n");
        for (name, why) in [
            ("wide", "needs a selector"),
            ("bad-port", "\"http\" is not a port"),
            ("bad-mode", "\"OFF\" is not STRICT"),
        ] {
            assert!(
                all.contains(&format!("peerAuthentication other/{name}")) && all.contains(why),
                "{name}: {all}"
            );
            // Whatever was written, nothing opens: the whole policy is STRICT.
            assert_eq!(by(name).mode, Some(MtlsMode::Strict), "{name}");
            assert!(by(name).ports.is_empty(), "{name}");
        }
    }

    #[test]
    fn broken_policies_fail_closed_and_say_so() {
        let text = format!(
            "{GOOD}{}",
            "peerAuthentications:
  - {name: typo, namespace: default, mode: STRIKT}
authorizationPolicies:
  - {name: bad-allow, namespace: default, rules: [{to: [{operation: {ports: [\"http\"]}}]}]}
  - {name: bad-deny, namespace: default, action: DENY, rules: [{to: [{operation: {ports: [0]}}]}]}
  - {name: bad-action, namespace: default, action: BOGUS}
  - {name: custom, namespace: default, action: CUSTOM, rules: [{}]}
"
        );
        let l = run(&text, None).expect("parses");
        let msgs: Vec<String> = l.errors.iter().map(ToString::to_string).collect();
        let all = msgs.join("\n");
        assert!(
            all.contains("peerAuthentication default/typo") && all.contains("applying STRICT"),
            "{all}"
        );
        assert!(
            all.contains("authorizationPolicy default/bad-allow") && all.contains("allows nothing"),
            "{all}"
        );
        assert!(
            all.contains("default/bad-deny") && all.contains("denies every connection"),
            "{all}"
        );
        assert!(
            all.contains("\"BOGUS\" is not ALLOW, DENY or AUDIT"),
            "{all}"
        );
        assert!(
            all.contains("CUSTOM (an external authorizer) is not supported"),
            "{all}"
        );
        let pod = l.state.pods.values().next().unwrap();
        assert_eq!(l.state.mtls_mode(pod), MtlsMode::Strict);
        let by = |n: &str| {
            l.state
                .authorization_policies
                .iter()
                .find(|p| p.key.name == n)
                .unwrap()
        };
        assert!(
            by("bad-allow").rules.is_empty(),
            "an ALLOW with no rules allows nothing"
        );
        assert_eq!(
            by("bad-deny").rules,
            vec![Rule::default()],
            "a DENY matching everything"
        );
        assert_eq!(by("bad-action").action, Action::Deny);
        // CUSTOM fails closed: what it would have asked an external authorizer is denied.
        assert_eq!(by("custom").action, Action::Deny);
        assert_eq!(by("custom").rules, vec![Rule::default()]);
    }
}
