//! The proxy's view of the node, published whole: the routing table derived from one
//! [`NodeState`] and the enrolled pods that were running when it was published. Discovery hands
//! the agent a state; [`View::publish`] is the one place that derives the indices from it and
//! swaps them in atomically. Connection tasks read a [`Snapshot`] and keep it for as long as
//! they need a consistent answer; nothing else keeps a copy.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;

use crate::{
    identity::Identity,
    pods::LocalPod,
    route::table::Routes,
    state::{NodeState, Workload},
    telemetry::metrics::labels::Peer,
};

/// One consistent view: routes, the state they came from, and the local pods.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The routing table (and, in it, the state it was built from).
    pub routes: Arc<Routes>,
    /// Enrolled pods of this node by address.
    local: HashMap<IpAddr, Arc<LocalPod>>,
    /// The mesh's trust domain.
    trust_domain: String,
}

impl Snapshot {
    /// The state this snapshot was derived from.
    pub fn state(&self) -> &Arc<NodeState> {
        &self.routes.state
    }

    /// The enrolled pod of this node with address `ip`.
    pub fn local_pod(&self, ip: IpAddr) -> Option<&Arc<LocalPod>> {
        self.local.get(&ip)
    }

    /// The enrolled pods of this node.
    pub fn local_pods(&self) -> impl Iterator<Item = &Arc<LocalPod>> {
        self.local.values()
    }

    /// The identity of workload `w`.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        Identity::new(&self.trust_domain, &w.key.namespace, &w.service_account)
    }

    /// The workload at `ip` as metric labels name it, when `proven` (the identity a handshake
    /// proved, or the kernel's word for a local pod) is its identity; a proven identity at an
    /// unknown address keeps its principal. An address alone proves nothing: without an
    /// identity the peer is unknown.
    pub fn peer_at(&self, ip: IpAddr, proven: Option<&Identity>) -> Peer {
        let Some(id) = proven else {
            return Peer::unknown();
        };
        match self.state().workloads.get(&ip) {
            Some(w)
                if w.key.namespace == id.namespace && w.service_account == id.service_account =>
            {
                Peer::new(&w.key, id)
            }
            _ => Peer {
                principal: id.to_string(),
                ..Peer::unknown()
            },
        }
    }
}

/// The published view; readers never wait for a writer.
#[derive(Debug)]
pub struct View {
    current: ArcSwap<Snapshot>,
    trust_domain: String,
}

impl View {
    /// An empty view for the mesh's trust domain.
    pub fn new(trust_domain: &str) -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot {
                trust_domain: trust_domain.to_string(),
                ..Snapshot::default()
            }),
            trust_domain: trust_domain.to_string(),
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Derives routes from `state` (carrying balancer statistics and counters over from the
    /// current ones) and publishes them with `local`, the enrolled pods, in one swap.
    pub fn publish(&self, state: &Arc<NodeState>, local: impl IntoIterator<Item = Arc<LocalPod>>) {
        let routes = Arc::new(Routes::build(state, &self.current.load().routes));
        self.store(routes, local);
    }

    /// Publishes a new set of enrolled pods with the current routes.
    pub fn publish_pods(&self, local: impl IntoIterator<Item = Arc<LocalPod>>) {
        self.store(self.current.load().routes.clone(), local);
    }

    fn store(&self, routes: Arc<Routes>, local: impl IntoIterator<Item = Arc<LocalPod>>) {
        let local = local.into_iter().map(|p| (p.pod.ip, p)).collect();
        self.current.store(Arc::new(Snapshot {
            routes,
            local,
            trust_domain: self.trust_domain.clone(),
        }));
    }
}
