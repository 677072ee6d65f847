//! The proxy's view of the node, published whole: the routing table derived from one
//! [`NodeState`] and the enrolled pods that were running when it was published. Discovery hands
//! the agent a state; [`View::publish`] is the one place that derives the indices from it and
//! swaps them in atomically. Connection tasks read a [`Snapshot`] and keep it for as long as
//! they need a consistent answer; nothing else keeps a copy.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::{
    identity::Identity,
    pods::LocalPod,
    route::table::Routes,
    state::{NodeState, ObjectKey, Workload},
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
    /// Flow labels, made on first use and shared by every flow after (see [`Peer`]).
    peers: Mutex<PeerCache>,
}

/// The [`Peer`]s a snapshot has made. Bounded by its pods and workloads.
#[derive(Debug, Default)]
struct PeerCache {
    /// Local pods, with the identity each was made for.
    local: HashMap<ObjectKey, (Identity, Peer)>,
    /// Mesh workloads under their own identity, by primary address.
    workloads: HashMap<IpAddr, Peer>,
}

impl Snapshot {
    /// The state this snapshot was derived from.
    pub fn state(&self) -> &Arc<NodeState> {
        &self.routes.state
    }

    /// The enrolled pod of this node with address `ip`.
    pub fn local_pod(&self, ip: IpAddr) -> Option<&Arc<LocalPod>> {
        self.local.get(&ip.to_canonical())
    }

    /// The enrolled pods of this node.
    pub fn local_pods(&self) -> impl Iterator<Item = &Arc<LocalPod>> {
        self.local.values()
    }

    /// The identity of workload `w`.
    pub fn identity_of(&self, w: &Workload) -> Identity {
        Identity::new(&self.trust_domain, &w.key.namespace, &w.service_account)
    }

    /// Local pod `p` as metric labels name it, with its labels and owner as this snapshot has
    /// them (a label change keeps the pod enrolled, so `p` may hold older ones).
    pub fn local_peer(&self, p: &LocalPod) -> Peer {
        let mut cache = self.peers.lock();
        if let Some((id, peer)) = cache.local.get(&p.pod.key)
            && id == p.identity()
        {
            return peer.clone();
        }
        let pod = self.state().pods.get(&p.pod.key).unwrap_or(&p.pod);
        let peer = Peer::of_pod(pod, p.identity());
        cache
            .local
            .insert(p.pod.key.clone(), (p.identity().clone(), peer.clone()));
        peer
    }

    /// Workload `w` of this snapshot, under its own identity, as metric labels name it.
    pub fn workload_peer(&self, w: &Workload) -> Peer {
        self.peers
            .lock()
            .workloads
            .entry(w.ip)
            .or_insert_with(|| Peer::of_workload(w, &self.identity_of(w)))
            .clone()
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
                if w.key.namespace == id.namespace && *w.service_account == *id.service_account =>
            {
                if id.trust_domain == self.trust_domain {
                    self.workload_peer(w)
                } else {
                    Peer::of_workload(w, id)
                }
            }
            _ => Peer {
                principal: id.to_string().into(),
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
        let local = local
            .into_iter()
            .flat_map(|p| p.pod.ips().map(move |ip| (ip, p.clone())))
            .collect();
        self.current.store(Arc::new(Snapshot {
            routes,
            local,
            trust_domain: self.trust_domain.clone(),
            peers: Mutex::default(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{ip, state, workload};

    fn view() -> View {
        let v = View::new("cluster.local");
        let st = Arc::new(state(
            vec![],
            vec![workload("db", "10.0.0.9", "db-sa", "node-2")],
        ));
        v.publish(&st, []);
        v
    }

    #[test]
    fn an_address_alone_proves_nothing() {
        let s = view().load();
        assert_eq!(&*s.peer_at(ip("10.0.0.9"), None).workload, UNKNOWN_NAME);
    }

    #[test]
    fn a_proven_identity_that_matches_the_workload_names_it() {
        let s = view().load();
        let id = Identity::new("cluster.local", "default", "db-sa");
        let p = s.peer_at(ip("10.0.0.9"), Some(&id));
        assert_eq!((&*p.workload, &*p.namespace), ("db", "default"));
        assert_eq!(&*p.principal, "spiffe://cluster.local/ns/default/sa/db-sa");
    }

    #[test]
    fn an_identity_that_is_not_the_workloads_keeps_only_its_principal() {
        let s = view().load();
        let other = Identity::new("cluster.local", "default", "impostor");
        let p = s.peer_at(ip("10.0.0.9"), Some(&other));
        assert_eq!(&*p.workload, UNKNOWN_NAME, "the address is not believed");
        assert_eq!(
            &*p.principal,
            "spiffe://cluster.local/ns/default/sa/impostor"
        );
    }

    #[test]
    fn a_workloads_identity_is_made_in_the_trust_domain() {
        let s = view().load();
        let w = s.state().workloads.get(&ip("10.0.0.9")).expect("published");
        assert_eq!(
            s.identity_of(w).to_string(),
            "spiffe://cluster.local/ns/default/sa/db-sa"
        );
    }

    #[test]
    fn publishing_swaps_the_whole_snapshot_and_readers_keep_theirs() {
        let v = view();
        let before = v.load();
        v.publish(&Arc::new(state(vec![], vec![])), []);
        assert_eq!(
            before.state().workloads.len(),
            1,
            "a reader's snapshot does not change"
        );
        assert!(v.load().state().workloads.is_empty());
    }

    /// A snapshot makes a workload's labels once, and every flow shares those strings; the
    /// next snapshot makes its own, so a label change shows.
    #[test]
    fn flows_share_a_workloads_labels_until_the_next_snapshot() {
        let v = view();
        let s = v.load();
        let id = Identity::new("cluster.local", "default", "db-sa");
        let w = s.state().workloads.get(&ip("10.0.0.9")).expect("published");
        let (a, b) = (s.peer_at(ip("10.0.0.9"), Some(&id)), s.workload_peer(w));
        assert_eq!(a, b);
        assert!(Arc::ptr_eq(&a.workload, &b.workload), "one string, shared");
        assert!(Arc::ptr_eq(&a.principal, &b.principal));
        // Another trust domain with the same namespace and account is not the workload's own
        // identity: its principal is its own, and the cache is not consulted.
        let foreign = Identity::new("other.domain", "default", "db-sa");
        let f = s.peer_at(ip("10.0.0.9"), Some(&foreign));
        assert_eq!(&*f.principal, "spiffe://other.domain/ns/default/sa/db-sa");
        assert_eq!(&*s.workload_peer(w).principal, &*a.principal);

        let mut relabelled = workload("db", "10.0.0.9", "db-sa", "node-2");
        relabelled.labels = Arc::new(crate::state::Labels::from([(
            "app".to_string(),
            "db-v2".to_string(),
        )]));
        v.publish(&Arc::new(state(vec![], vec![relabelled])), []);
        let next = v.load();
        assert_eq!(&*next.peer_at(ip("10.0.0.9"), Some(&id)).app, "db-v2");
        assert_eq!(&*a.app, "db", "a flow keeps the labels it was made with");
    }

    const UNKNOWN_NAME: &str = crate::telemetry::metrics::labels::UNKNOWN;
}
