//! Authorization at a destination pod: the decision for a connection or a request, the log line
//! and counter of a denial, and the flow record of a refused connection. Every handler that
//! reaches a pod of this node calls here: plaintext inbound, HBONE streams, same-node delivery
//! and per-request L7.

use std::net::{IpAddr, SocketAddr};

use tracing::{info, warn};

use crate::{
    authz::{self, Decision, HttpAttributes},
    identity::Identity,
    pods::LocalPod,
    telemetry::{
        flows::{Draft, FlowLog},
        metrics::labels::{Flow, Reporter, Security},
    },
    view::Snapshot,
};

/// Authorizes a connection (`http: None`) or a request to `dest` on `port` from `source` (at
/// address `from`, when known); logs and counts a denial, and files a connection's denial as a
/// flow record (a request's denial is filed with the request).
pub fn authorize(
    view: &Snapshot,
    flows: &FlowLog,
    dest: &LocalPod,
    source: Option<&Identity>,
    from: Option<SocketAddr>,
    port: u16,
    http: Option<&HttpAttributes<'_>>,
) -> Result<(), Decision> {
    let ip = from.map(|a| a.ip());
    let decision = decide(view, dest, source, ip, port, http);
    audit(view, dest, (source, ip), port, http, &decision);
    if decision == Decision::Allow {
        return Ok(());
    }
    dest.counters.denied.inc();
    let src = source.map_or_else(
        || "plaintext (no identity)".to_string(),
        ToString::to_string,
    );
    match http {
        Some(h) => {
            warn!(%src, dst = %dest.pod.key, port, method = h.method, path = h.path, "request {decision}");
        }
        None => {
            warn!(%src, dst = %dest.pod.key, port, "connection {decision}");
            let peer = from.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
            let mut draft = Draft::new(inbound_flow(view, dest, source, peer, port));
            draft.src_addr = from;
            draft.dst_addr = Some(SocketAddr::new(dest.pod.ip, port));
            draft.denied(&decision);
            flows.record(draft);
        }
    }
    Err(decision)
}

/// The decision alone: what the policies of `view` say of `source` (at `from`, when known)
/// reaching `dest` on `port`.
pub fn decide(
    view: &Snapshot,
    dest: &LocalPod,
    source: Option<&Identity>,
    from: Option<IpAddr>,
    port: u16,
    http: Option<&HttpAttributes<'_>>,
) -> Decision {
    authz::evaluate(
        &view.state().authorization_policies,
        &request(view, dest, (source, from), port, http),
    )
}

fn request<'a>(
    view: &'a Snapshot,
    dest: &'a LocalPod,
    (source, from): (Option<&'a Identity>, Option<IpAddr>),
    port: u16,
    http: Option<&'a HttpAttributes<'a>>,
) -> authz::Request<'a> {
    // The labels as published now: a label change applies without re-enrolling the pod.
    let labels = view
        .state()
        .pods
        .get(&dest.pod.key)
        .map_or(&dest.pod.labels, |p| &p.labels);
    authz::Request {
        source,
        namespace: &dest.pod.key.namespace,
        root_namespace: &view.state().mesh.root_namespace,
        labels,
        port,
        source_ip: from,
        services: view.routes.services_to(dest.pod.ip, port),
        http,
    }
}

/// Logs each AUDIT policy that matches, with the decision the other policies made.
fn audit(
    view: &Snapshot,
    dest: &LocalPod,
    (source, from): (Option<&Identity>, Option<IpAddr>),
    port: u16,
    http: Option<&HttpAttributes<'_>>,
    decision: &Decision,
) {
    let policies = &view.state().authorization_policies;
    if !policies
        .iter()
        .any(|p| p.action == crate::state::Action::Audit)
    {
        return;
    }
    for policy in authz::audits(policies, &request(view, dest, (source, from), port, http)) {
        let src = source.map_or_else(
            || "plaintext (no identity)".to_string(),
            ToString::to_string,
        );
        match http {
            Some(h) => {
                info!(%policy, %src, dst = %dest.pod.key, port, method = h.method, path = h.path, "AUDIT: request {decision}")
            }
            None => info!(%policy, %src, dst = %dest.pod.key, port, "AUDIT: connection {decision}"),
        }
    }
}

/// A flow to `dest` from `source` at `peer`, as this node reports it: mTLS when HBONE proved the
/// source's identity.
pub fn inbound_flow(
    view: &Snapshot,
    dest: &LocalPod,
    source: Option<&Identity>,
    peer: IpAddr,
    port: u16,
) -> Flow {
    Flow {
        reporter: Reporter::Destination,
        src: view.peer_at(peer, source),
        dst: view.local_peer(dest),
        service: view.routes.service_to(dest.pod.ip, port),
        security: if source.is_some() {
            Security::MutualTls
        } else {
            Security::None
        },
    }
}

/// Admits a connection to `dest`: `Ok(true)` when L7 policy selects the pod, so the decision
/// waits for each request; `Ok(false)` when L4 policy allowed it now.
pub fn admit(
    view: &Snapshot,
    flows: &FlowLog,
    dest: &LocalPod,
    source: Option<&Identity>,
    from: SocketAddr,
    port: u16,
) -> Result<bool, Decision> {
    let current = view.state().pods.get(&dest.pod.key).unwrap_or(&dest.pod);
    if view.state().has_l7_policy(current) {
        return Ok(true);
    }
    authorize(view, flows, dest, source, Some(from), port, None).map(|()| false)
}

/// Re-decides every live L4 connection to `pod` under `view` after a policy change, and closes
/// those now denied; each is counted here and files its own record (with its addresses) as it
/// closes.
pub fn recheck(view: &Snapshot, pod: &LocalPod) {
    pod.revoke_where(|source, from, port| {
        let decision = decide(view, pod, source, from, port, None);
        if decision != Decision::Allow {
            pod.counters.denied.inc();
        }
        decision
    });
}
