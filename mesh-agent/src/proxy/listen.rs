//! A pod's listeners and accept loops. Which listener accepted a connection says which pod it
//! belongs to: the proxy never infers the pod from a source address.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::{net::TcpListener, task::JoinSet};
use tracing::{debug, warn};

use super::{drain::Live, error::ProxyError, hbone, inbound, inputs::ProxyInputs, outbound};
use crate::{
    capture::netns::{Netns, NetnsError},
    pods::LocalPod,
    state::Pod,
};

/// The proxy side of one enrolled pod: its listeners and accept loops. Dropping it stops
/// accepting; connections already relaying run to completion.
#[derive(Debug)]
pub struct PodProxy {
    /// The pod, with its namespace and counters.
    pub local: Arc<LocalPod>,
    tasks: JoinSet<()>,
    /// A copy of each listener by role, for a successor agent to take over.
    sockets: Vec<(&'static str, std::net::TcpListener)>,
}
/// The three listeners, opened inside the pod's netns before capture is enabled.
#[derive(Debug)]
pub struct PodListeners {
    /// 127.0.0.1:15001 (and [::1]:15001 when the pod has IPv6 loopback).
    pub outbound: Vec<std::net::TcpListener>,
    /// 15006, the plaintext inbound listener `sk_lookup` steers to.
    pub inbound: std::net::TcpListener,
    /// 15008, the HBONE listener `sk_lookup` steers to.
    pub hbone: std::net::TcpListener,
}

/// Role names of a pod's listeners, as a successor agent asks for them.
const OUTBOUND_V4: &str = "outbound-v4";
const OUTBOUND_V6: &str = "outbound-v6";
const INBOUND: &str = "inbound";
const HBONE: &str = "hbone";

/// Opens a pod's listeners in its namespace, or takes the ones `handed` has under their role
/// names (a predecessor agent's, during an upgrade: the same sockets, so no connect is refused).
pub fn open_listeners(
    netns: &Netns,
    pod: &Pod,
    handed: &mut dyn FnMut(&str) -> Option<std::os::fd::OwnedFd>,
) -> Result<PodListeners, NetnsError> {
    use mesh_common::ports;
    let mut open = |role: &str, addr: SocketAddr| match handed(role) {
        Some(fd) => Ok(std::net::TcpListener::from(fd)),
        None => netns.listen(addr),
    };
    let mut outbound = vec![open(
        OUTBOUND_V4,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ports::OUTBOUND),
    )?];
    match open(
        OUTBOUND_V6,
        SocketAddr::new(Ipv6Addr::LOCALHOST.into(), ports::OUTBOUND),
    ) {
        Ok(l) => outbound.push(l),
        Err(e) => debug!(pod = %pod.key, "no IPv6 outbound listener: {e}"),
    }
    // A pod with an IPv6 address gets one dual-stack socket per port ([::], not IPV6_V6ONLY),
    // which `sk_lookup` may assign connections of either family to.
    let any: IpAddr = if pod.ips().any(|a| a.is_ipv6()) {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let inbound = open(INBOUND, SocketAddr::new(any, ports::INBOUND))?;
    let hbone = open(HBONE, SocketAddr::new(any, ports::HBONE))?;
    Ok(PodListeners {
        outbound,
        inbound,
        hbone,
    })
}

impl PodProxy {
    /// Starts accepting on `listeners`. Must be called inside the tokio runtime.
    pub fn start(
        pod: Pod,
        netns: Arc<Netns>,
        listeners: PodListeners,
        trust_domain: &str,
        inputs: Arc<ProxyInputs>,
    ) -> io::Result<Self> {
        let local = Arc::new(LocalPod::new(pod, netns, trust_domain));
        let mut sockets = Vec::new();
        for (role, l) in listeners
            .outbound
            .iter()
            .zip([OUTBOUND_V4, OUTBOUND_V6])
            .map(|(l, r)| (r, l))
            .chain([(INBOUND, &listeners.inbound), (HBONE, &listeners.hbone)])
        {
            sockets.push((role, l.try_clone()?));
        }
        let mut tasks = JoinSet::new();
        let cx = Arc::new(PodCx {
            local: local.clone(),
            inputs,
            outbound_live: Arc::default(),
            inbound_live: Arc::default(),
            last_shed_log: parking_lot::Mutex::new(None),
        });
        for l in listeners.outbound {
            let l = TcpListener::from_std(l)?;
            tasks.spawn(accept_loop(l, cx.clone(), Kind::Outbound));
        }
        let l = TcpListener::from_std(listeners.inbound)?;
        tasks.spawn(accept_loop(l, cx.clone(), Kind::Inbound));
        let l = TcpListener::from_std(listeners.hbone)?;
        tasks.spawn(accept_loop(l, cx, Kind::Hbone));
        Ok(Self {
            local,
            tasks,
            sockets,
        })
    }

    /// Stops accepting.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }

    /// Copies of the listeners by role, for a successor agent.
    pub fn sockets(&self) -> io::Result<Vec<(&'static str, std::os::fd::OwnedFd)>> {
        self.sockets
            .iter()
            .map(|(role, l)| Ok((*role, l.try_clone()?.into())))
            .collect()
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Outbound,
    Inbound,
    Hbone,
}

#[derive(Debug)]
struct PodCx {
    local: Arc<LocalPod>,
    inputs: Arc<ProxyInputs>,
    /// Connections this pod opened (15001), and ones opened to it (15006, 15008), for the
    /// per-pod cap.
    outbound_live: Arc<std::sync::atomic::AtomicUsize>,
    inbound_live: Arc<std::sync::atomic::AtomicUsize>,
    /// When a refusal was last logged: at most one line a second per pod under a flood.
    last_shed_log: parking_lot::Mutex<Option<std::time::Instant>>,
}

impl PodCx {
    /// Counts a new connection of `kind`, or refuses it past a cap (counted, and logged at
    /// most once a second).
    fn admit(&self, kind: Kind) -> Option<(Live, Live)> {
        let pod = match kind {
            Kind::Outbound => &self.outbound_live,
            Kind::Inbound | Kind::Hbone => &self.inbound_live,
        };
        let open = pod.load(std::sync::atomic::Ordering::Relaxed);
        if let Err(shed) = self.inputs.limits.check(self.inputs.drain.live(), open) {
            self.local.counters.overload_refused.inc();
            let mut last = self.last_shed_log.lock();
            if last.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(1)) {
                *last = Some(std::time::Instant::now());
                warn!(pod = %self.local.pod.key, ?kind, refused = self.local.counters.overload_refused.get(), "refusing new connections: {shed}");
            }
            return None;
        }
        Some((self.inputs.drain.track(), Live::count(pod)))
    }
}

async fn accept_loop(listener: TcpListener, cx: Arc<PodCx>, kind: Kind) {
    loop {
        let (stream, peer) = match listener.accept().await {
            // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; the rest of the proxy
            // (workloads, policies' ipBlocks, metrics) knows them as IPv4.
            Ok((s, peer)) => (s, crate::capture::netns::canonical(peer)),
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %cx.local.pod.key, ?kind, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(live) = cx.admit(kind) else {
            // A reset: the client sees a refusal at once, and nothing waits in our buffers.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
            drop(stream);
            continue;
        };
        let cx = cx.clone();
        tokio::spawn(async move {
            let _live = live;
            let _ = stream.set_nodelay(true);
            let result = match kind {
                Kind::Outbound => outbound::handle(&cx.inputs, &cx.local, stream, peer).await,
                Kind::Inbound => inbound::handle(&cx.inputs, &cx.local, stream).await,
                Kind::Hbone => {
                    let r = hbone::serve(cx.inputs.clone(), cx.local.clone(), stream, peer).await;
                    if r.is_err() {
                        cx.local.counters.hbone_refused.inc();
                    }
                    r
                }
            };
            match result {
                // Denials were logged with their policy where they were decided, revocations
                // where they happened.
                Ok(()) | Err(ProxyError::Denied(_) | ProxyError::Revoked(_)) => {}
                Err(e) => warn!(pod = %cx.local.pod.key, ?kind, %peer, "connection failed: {e}"),
            }
        });
    }
}
