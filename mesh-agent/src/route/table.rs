//! The routing table of one state: services by address, their HTTP routes, balancers and
//! limits, and the upgrade tokens each local port accepts. Built from a [`NodeState`] by
//! [`Routes::build`]; balancer statistics, limit counters and round-robin cursors carry over
//! from the table it replaces, so a reload does not reset them.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::{balance::Balancer, limits::Limits};
use crate::{
    state::{HttpRoute, NodeState, ObjectKey, Service, TrafficPolicy},
    telemetry::metrics::labels::ServiceLabels,
};

/// Why a connection has nowhere to go.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A service address was dialled on a port it does not serve, or it has no endpoints.
    #[error("service {service} has no endpoints for port {port}")]
    NoEndpoints {
        /// The service.
        service: ObjectKey,
        /// The requested port.
        port: u16,
    },
}

/// One service as routing sees it: its HTTP routes, balancer and limits.
#[derive(Debug)]
pub struct ServiceEntry {
    /// The service, shared with the state.
    pub svc: Arc<Service>,
    /// The HTTP routes attached to it, in the state's order.
    pub routes: Vec<HttpRoute>,
    /// Endpoint choice per request.
    pub balancer: Balancer,
    /// Admission limits.
    pub limits: Arc<Limits>,
    /// How flows to it are labelled, made once for all of them.
    pub labels: ServiceLabels,
    /// Round-robin cursor for connections routed at L4.
    next: AtomicUsize,
}

impl ServiceEntry {
    /// An entry for `svc` with its attached `routes`.
    pub fn new(
        svc: Arc<Service>,
        routes: Vec<HttpRoute>,
        balancer: Balancer,
        limits: Arc<Limits>,
    ) -> Self {
        Self {
            labels: ServiceLabels::of(&svc.key),
            svc,
            routes,
            balancer,
            limits,
            next: AtomicUsize::new(0),
        }
    }
}

/// A local pod's port, as the services that send to it describe it.
#[derive(Debug, Default)]
struct InboundPort {
    /// Upgrade tokens allowed, from every such service.
    upgrades: Vec<String>,
    /// The first such service (by namespace/name), which the destination's metrics name.
    service: Option<ServiceLabels>,
    /// Every such service, by namespace/name (policies' `targetRefs`).
    services: Vec<ObjectKey>,
}

/// The labels of service `key`: its entry's, shared, or made for a service not in `services`.
fn labels_in(services: &HashMap<ObjectKey, Arc<ServiceEntry>>, key: &ObjectKey) -> ServiceLabels {
    services
        .get(key)
        .map_or_else(|| ServiceLabels::of(key), |e| e.labels.clone())
}

/// The routing table; replaced whole on every change.
#[derive(Debug, Default)]
pub struct Routes {
    by_vip: HashMap<IpAddr, Arc<ServiceEntry>>,
    services: HashMap<ObjectKey, Arc<ServiceEntry>>,
    /// What the services that send to (local pod address, target port) say about it. Only this
    /// node's pods are indexed: remote endpoints never receive through this node.
    inbound: HashMap<(IpAddr, u16), InboundPort>,
    /// The state the table was built from: workloads, modes and policies.
    pub state: Arc<NodeState>,
}

/// The traffic policy of a service no DestinationRule names.
fn default_policy() -> TrafficPolicy {
    TrafficPolicy {
        retry_budget_percent: 20,
        min_retries_per_second: 10,
        ..Default::default()
    }
}

impl Routes {
    /// Builds the table for `state`, carrying balancer state, limit counters and cursors over
    /// from `old`.
    pub fn build(state: &Arc<NodeState>, old: &Routes) -> Self {
        let services: HashMap<ObjectKey, Arc<ServiceEntry>> = state
            .services
            .values()
            .map(|svc| {
                let policy = state
                    .traffic_policies
                    .get(&svc.key)
                    .cloned()
                    .unwrap_or_else(default_policy);
                let prev = old.services.get(&svc.key);
                let routes: Vec<HttpRoute> = state
                    .http_routes
                    .iter()
                    .filter(|r| r.service == svc.key)
                    .cloned()
                    .collect();
                // Unchanged, it stays as it is: at thousands of services a change to one
                // rebuilds one.
                if let Some(p) = prev
                    && p.svc == *svc
                    && p.limits.policy == policy
                    && p.routes == routes
                {
                    return (svc.key.clone(), p.clone());
                }
                let limits = match prev {
                    Some(p) if p.limits.policy == policy => p.limits.clone(),
                    _ => Arc::new(Limits::new(&policy)),
                };
                let balancer = Balancer::new(
                    &one_per_pod(&svc.endpoints, state),
                    policy.lb,
                    policy.outlier.clone(),
                    prev.map(|p| &p.balancer),
                );
                let entry = ServiceEntry::new(svc.clone(), routes, balancer, limits);
                if let Some(p) = prev {
                    entry
                        .next
                        .store(p.next.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                (svc.key.clone(), Arc::new(entry))
            })
            .collect();
        let by_vip = services
            .values()
            .flat_map(|e| e.svc.ips().map(move |ip| (ip, e.clone())))
            .collect();
        // Each address of a local pod → its primary address, which the inbound index is keyed
        // by: a dual-stack service lists the pod under both.
        let local: HashMap<IpAddr, IpAddr> = state
            .pods
            .values()
            .flat_map(|p| p.ips().map(move |a| (a, p.ip)))
            .collect();
        let mut inbound: HashMap<(IpAddr, u16), InboundPort> = HashMap::new();
        for s in state.services.values() {
            for (ip, p) in s
                .endpoints
                .iter()
                .filter_map(|ip| local.get(ip))
                .flat_map(|ip| s.ports.iter().map(move |p| (ip, p)))
            {
                let port = inbound.entry((*ip, p.target_port)).or_default();
                if port.services.contains(&s.key) {
                    continue;
                }
                port.upgrades.extend(s.upgrades.iter().cloned());
                port.upgrades.sort();
                port.upgrades.dedup();
                port.service
                    .get_or_insert_with(|| labels_in(&services, &s.key));
                port.services.push(s.key.clone());
            }
        }
        Self {
            by_vip,
            services,
            inbound,
            state: state.clone(),
        }
    }

    /// The upgrade tokens allowed to `port` of the local pod at `ip`: those of every service
    /// that sends that port to it, or the default when none does.
    pub fn upgrades_to(&self, ip: IpAddr, port: u16) -> &[String] {
        self.inbound
            .get(&(ip, port))
            .map_or(&crate::state::DEFAULT_UPGRADES, |p| &p.upgrades)
    }

    /// `destination_service` as the destination reports a flow to `port` of its pod at `ip`:
    /// the destination cannot see which address the client dialled, so it names the service
    /// that sends that port to the pod (the first by name, when several do).
    pub fn service_to(&self, ip: IpAddr, port: u16) -> ServiceLabels {
        self.inbound
            .get(&(ip, port))
            .and_then(|p| p.service.clone())
            .unwrap_or_else(ServiceLabels::unknown)
    }

    /// The services that send `port` of the local pod at `ip` traffic, by namespace/name.
    pub fn services_to(&self, ip: IpAddr, port: u16) -> &[ObjectKey] {
        self.inbound.get(&(ip, port)).map_or(&[], |p| &p.services)
    }

    /// The service whose address is `ip`.
    pub fn service_at(&self, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_vip.get(&ip)
    }

    /// The service `key`.
    pub fn service(&self, key: &ObjectKey) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// `destination_service` for a connection to `ip`: the service's FQDN when `ip` is a
    /// service address.
    pub fn service_name_at(&self, ip: IpAddr) -> ServiceLabels {
        self.by_vip
            .get(&ip)
            .map_or_else(ServiceLabels::unknown, |e| e.labels.clone())
    }

    /// The labels of service `key`.
    pub fn service_labels(&self, key: &ObjectKey) -> ServiceLabels {
        labels_in(&self.services, key)
    }

    /// Whether connections to `dst` get protocol detection: mesh destinations (a service
    /// address or a workload), except service ports declared `appProtocol: tcp`.
    pub fn detects(&self, dst: SocketAddr) -> bool {
        match self.by_vip.get(&dst.ip()) {
            Some(e) => !e.svc.is_opaque(dst.port()),
            None => self.state.workloads.contains_key(&dst.ip()),
        }
    }

    /// Where to connect for a connection to `dst` routed at L4: a service address becomes one
    /// of its endpoints (round-robin); any other address is dialled as is.
    pub fn resolve(&self, dst: SocketAddr) -> Result<SocketAddr, RouteError> {
        let Some(entry) = self.by_vip.get(&dst.ip()) else {
            return Ok(dst);
        };
        let svc = &entry.svc;
        let no_endpoints = || RouteError::NoEndpoints {
            service: svc.key.clone(),
            port: dst.port(),
        };
        let target_port = svc.target_port(dst.port()).ok_or_else(no_endpoints)?;
        let endpoints = entry.balancer.ips();
        if endpoints.is_empty() {
            return Err(no_endpoints());
        }
        let i = entry.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        Ok(SocketAddr::new(
            self.dial_ip(endpoints[i], dst.ip()),
            target_port,
        ))
    }

    /// The address to dial for `endpoint` of a service reached at `dst`: the endpoint pod's
    /// address in `dst`'s family when it has one (a client of a service's IPv6 address reaches
    /// its pods over IPv6, as Kubernetes' per-family endpoints do), else `endpoint` itself.
    pub fn dial_ip(&self, endpoint: IpAddr, dst: IpAddr) -> IpAddr {
        let dst = dst.to_canonical();
        self.state
            .workloads
            .get(&endpoint)
            .and_then(|w| w.ip_like(dst))
            .unwrap_or(endpoint)
    }
}

/// A service's endpoints with one address per pod: a dual-stack pod is listed under both its
/// addresses (Kubernetes has an EndpointSlice per family), but it is one endpoint to balance,
/// eject and count; [`Routes::dial_ip`] picks the family per connection.
fn one_per_pod(endpoints: &[IpAddr], state: &NodeState) -> Vec<IpAddr> {
    let mut seen = std::collections::HashSet::new();
    endpoints
        .iter()
        .copied()
        .filter(|ip| match state.workloads.get(ip) {
            Some(w) => seen.insert(w.ip),
            None => seen.insert(*ip),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{self, ip, service, state, workload};

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn routes(services: Vec<Service>) -> Routes {
        let w = workload("db", "10.0.0.9", "db", "node-2");
        Routes::build(&Arc::new(state(services, vec![w])), &Routes::default())
    }

    /// `services`, on a node whose one pod is at 10.0.0.1.
    fn with_local_pod(services: Vec<Service>) -> Routes {
        let mut s = state(services, vec![]);
        let p = testing::pod("web-1", "10.0.0.1");
        s.pods.insert(p.key.clone(), p);
        Routes::build(&Arc::new(s), &Routes::default())
    }

    /// The destination names the service that sends a port to its pod: the first by name when
    /// several do, and none for a port no service sends to or a pod of another node.
    #[test]
    fn the_destination_names_the_service_that_sends_to_a_port() {
        let b = service("b", "10.96.0.2", &[(81, 8080)], &["10.0.0.1", "10.0.0.9"]);
        let a = service("a", "10.96.0.1", &[(80, 8080), (90, 9090)], &["10.0.0.1"]);
        let r = with_local_pod(vec![b, a]);
        let named = r.service_to(ip("10.0.0.1"), 8080);
        assert_eq!(
            (&*named.name, &*named.fqdn),
            ("a", "a.default.svc.cluster.local")
        );
        assert_eq!(&*r.service_to(ip("10.0.0.1"), 9090).name, "a");
        assert_eq!(r.service_to(ip("10.0.0.1"), 7777), ServiceLabels::unknown());
        assert_eq!(
            r.service_to(ip("10.0.0.9"), 8080),
            ServiceLabels::unknown(),
            "a remote endpoint is not indexed here"
        );
    }

    #[test]
    fn a_service_address_resolves_round_robin_over_its_endpoints() {
        let r = routes(vec![service(
            "web",
            "10.96.0.10",
            &[(80, 8080)],
            &["10.0.0.1", "10.0.0.2"],
        )]);
        let got: Vec<SocketAddr> = (0..4)
            .map(|_| r.resolve(addr("10.96.0.10:80")).expect("endpoints"))
            .collect();
        assert_eq!(
            got,
            [
                addr("10.0.0.1:8080"),
                addr("10.0.0.2:8080"),
                addr("10.0.0.1:8080"),
                addr("10.0.0.2:8080")
            ]
        );
    }

    #[test]
    fn any_other_address_is_dialled_as_it_is() {
        let r = routes(vec![]);
        assert_eq!(
            r.resolve(addr("1.2.3.4:443")).ok(),
            Some(addr("1.2.3.4:443"))
        );
    }

    #[test]
    fn a_port_the_service_does_not_serve_has_no_endpoints() {
        let r = routes(vec![service(
            "web",
            "10.96.0.10",
            &[(80, 8080)],
            &["10.0.0.1"],
        )]);
        let e = r
            .resolve(addr("10.96.0.10:81"))
            .expect_err("port 81 is not served");
        assert_eq!(
            e.to_string(),
            "service default/web has no endpoints for port 81"
        );
    }

    #[test]
    fn a_service_without_endpoints_has_none() {
        let r = routes(vec![service("web", "10.96.0.10", &[(80, 8080)], &[])]);
        assert!(r.resolve(addr("10.96.0.10:80")).is_err());
    }

    #[test]
    fn the_round_robin_cursor_survives_a_rebuild() {
        let s = service(
            "web",
            "10.96.0.10",
            &[(80, 8080)],
            &["10.0.0.1", "10.0.0.2"],
        );
        let st = Arc::new(state(vec![s], vec![]));
        let old = Routes::build(&st, &Routes::default());
        assert_eq!(
            old.resolve(addr("10.96.0.10:80")).ok(),
            Some(addr("10.0.0.1:8080"))
        );
        let new = Routes::build(&st, &old);
        assert_eq!(
            new.resolve(addr("10.96.0.10:80")).ok(),
            Some(addr("10.0.0.2:8080")),
            "a reload does not send the next connection back to the first endpoint"
        );
    }

    #[test]
    fn detection_is_for_mesh_destinations_except_opaque_ports() {
        let mut s = service(
            "web",
            "10.96.0.10",
            &[(80, 8080), (5432, 5432)],
            &["10.0.0.1"],
        );
        s.ports[1].opaque = true;
        let r = routes(vec![s]);
        assert!(r.detects(addr("10.96.0.10:80")), "a service port");
        assert!(!r.detects(addr("10.96.0.10:5432")), "appProtocol: tcp");
        assert!(
            r.detects(addr("10.0.0.9:5432")),
            "a workload addressed directly"
        );
        assert!(!r.detects(addr("1.2.3.4:80")), "outside the mesh");
    }

    #[test]
    fn service_names_are_fqdns_and_unknown_elsewhere() {
        let r = routes(vec![service(
            "web",
            "10.96.0.10",
            &[(80, 8080)],
            &["10.0.0.1"],
        )]);
        let named = r.service_name_at(ip("10.96.0.10"));
        assert_eq!(&*named.fqdn, "web.default.svc.cluster.local");
        assert_eq!((&*named.name, &*named.namespace), ("web", "default"));
        assert_eq!(r.service_name_at(ip("10.0.0.1")), ServiceLabels::unknown());
    }

    #[test]
    fn inbound_upgrades_are_the_union_of_the_services_that_send_there() {
        let mut a = service("a", "10.96.0.1", &[(80, 8080)], &["10.0.0.1"]);
        a.upgrades = vec!["websocket".into()];
        let mut b = service("b", "10.96.0.2", &[(81, 8080)], &["10.0.0.1"]);
        b.upgrades = vec!["mesh-echo".into(), "websocket".into()];
        let r = with_local_pod(vec![a, b]);
        assert_eq!(
            r.upgrades_to(ip("10.0.0.1"), 8080),
            ["mesh-echo", "websocket"]
        );
        assert_eq!(
            r.upgrades_to(ip("10.0.0.1"), 9999),
            ["websocket"],
            "a port no service sends to gets the default"
        );
    }

    #[test]
    fn services_are_found_by_address_and_by_name() {
        let r = routes(vec![service(
            "web",
            "10.96.0.10",
            &[(80, 8080)],
            &["10.0.0.1"],
        )]);
        let by_ip = r.service_at(ip("10.96.0.10")).expect("by address");
        let by_key = r.service(&by_ip.svc.key).expect("by name");
        assert!(
            Arc::ptr_eq(by_ip, by_key),
            "one entry, so one balancer and one set of limits"
        );
        assert!(r.service_at(ip("10.0.0.1")).is_none());
    }

    #[test]
    fn a_dual_stack_service_is_one_endpoint_per_pod_dialled_in_the_clients_family() {
        let svc = service(
            "web",
            "10.96.0.10,fd96::10",
            &[(80, 8080)],
            // As Kubernetes lists it: one EndpointSlice per family.
            &["10.0.0.1", "10.0.0.2", "fd00::1", "fd00::2"],
        );
        let ws = vec![
            workload("web-1", "10.0.0.1,fd00::1", "web", "node-2"),
            workload("web-2", "10.0.0.2,fd00::2", "web", "node-2"),
        ];
        let r = Routes::build(&Arc::new(state(vec![svc], ws)), &Routes::default());
        let entry = r.service_at(ip("fd96::10")).expect("the IPv6 address");
        assert!(Arc::ptr_eq(
            entry,
            r.service_at(ip("10.96.0.10")).expect("the IPv4 address")
        ));
        assert_eq!(entry.balancer.ips(), [ip("10.0.0.1"), ip("10.0.0.2")]);
        let mut v6: Vec<SocketAddr> = (0..4)
            .map(|_| r.resolve(addr("[fd96::10]:80")).expect("endpoints"))
            .collect();
        v6.sort();
        v6.dedup();
        assert_eq!(v6, [addr("[fd00::1]:8080"), addr("[fd00::2]:8080")]);
        let v4 = r.resolve(addr("10.96.0.10:80")).expect("endpoints");
        assert!(v4.is_ipv4(), "{v4}");
        // An endpoint that is no known workload is dialled as listed.
        assert_eq!(r.dial_ip(ip("10.9.9.9"), ip("fd96::10")), ip("10.9.9.9"));
    }

    #[test]
    fn a_rebuild_keeps_unchanged_entries_and_endpoint_state() {
        let web = |eps: &[&str]| service("web", "10.96.0.10", &[(80, 8080)], eps);
        let db = service("db", "10.96.0.11", &[(5432, 5432)], &["10.0.0.9"]);
        let first = Routes::build(
            &Arc::new(state(
                vec![web(&["10.0.0.1", "10.0.0.2"]), db.clone()],
                vec![],
            )),
            &Routes::default(),
        );
        let entry = |r: &Routes, n: &str| {
            r.service(&testing::key("default", n))
                .cloned()
                .expect("entry")
        };
        // A request to web makes its endpoints' state; db has none until one reaches it.
        let used = entry(&first, "web")
            .balancer
            .pick(None)
            .expect("an endpoint")
            .clone();
        assert!(!entry(&first, "db").balancer.in_use());
        let second = Routes::build(
            &Arc::new(state(
                vec![web(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), db.clone()],
                vec![],
            )),
            &first,
        );
        assert!(
            Arc::ptr_eq(&entry(&first, "db"), &entry(&second, "db")),
            "db did not change"
        );
        assert!(!Arc::ptr_eq(&entry(&first, "web"), &entry(&second, "web")));
        let kept = entry(&second, "web");
        let kept = kept
            .balancer
            .endpoints()
            .iter()
            .find(|e| e.ip == used.ip)
            .expect("still there");
        assert!(
            Arc::ptr_eq(kept, &used),
            "the endpoint keeps its statistics"
        );
        assert_eq!(entry(&second, "web").balancer.endpoints().len(), 3);
        assert!(!entry(&second, "db").balancer.in_use());
    }
}
