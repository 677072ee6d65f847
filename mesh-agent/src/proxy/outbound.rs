//! Outbound (15001): a connection a pod made, captured by the kernel. Accept → recover the
//! original destination from the kernel → HTTP to a mesh destination goes to the L7 handler;
//! anything else is routed at L4 → pick the hop:
//! - a pod on this node: authorize with the source pod's identity (the kernel's word, no
//!   certificate) and hand the bytes to the destination's application directly; bulk
//!   connections are then spliced in the kernel;
//! - a mesh workload on another node: HBONE, mTLS from the source pod's netns;
//! - anything else (outside the mesh): plain TCP from the source pod's netns.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::debug;

use super::{admission, error::ProxyError, inputs::ProxyInputs, l7};
use crate::{
    pods::{Counted, LocalPod, Tracked},
    protocol::detect,
    telemetry::{
        flows::Draft,
        metrics::labels::{Flow, Peer, Reporter, Security, ServiceLabels},
        metrics::tcp::TcpConn,
    },
    transport::{
        dial::{Hop, UpstreamIo},
        error::TransportError,
        hbone::Payload,
        relay,
        splice::{NotSpliced, Splicer},
        upstream::CONNECT_TIMEOUT,
    },
};

/// What an outbound connection's flow record needs, noted as the connection is handled.
#[derive(Debug, Default)]
struct Note {
    /// The original destination.
    dst: Option<SocketAddr>,
    /// The endpoint chosen for it.
    target: Option<SocketAddr>,
    flow: Option<Flow>,
    /// (from the client, to the client).
    bytes: (u64, u64),
    /// Handled at L7: each request files its own record.
    l7: bool,
}

/// Handles a captured outbound connection and files its flow record (a denial was filed where it
/// was decided, with its policy).
pub async fn handle(
    inputs: &Arc<ProxyInputs>,
    src: &Arc<LocalPod>,
    client: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let started = std::time::SystemTime::now();
    let mut note = Note::default();
    let result = relay(inputs, src, client, peer, &mut note).await;
    if note.l7 || matches!(result, Err(ProxyError::Denied(_))) {
        return result;
    }
    let flow = note.flow.take().unwrap_or_else(|| Flow {
        reporter: Reporter::Source,
        src: inputs.view.load().local_peer(src),
        dst: Peer::unknown(),
        service: note.dst.map_or_else(ServiceLabels::unknown, |d| {
            inputs.view.load().routes.service_name_at(d.ip())
        }),
        security: Security::None,
    });
    let mut draft = Draft::new(flow);
    draft.started = started;
    draft.src_addr = Some(SocketAddr::new(src.pod.ip, peer.port()));
    draft.dst_addr = note.target.or(note.dst);
    (draft.bytes_received, draft.bytes_sent) = note.bytes;
    if let Err(e) = &result {
        e.file(&mut draft);
    }
    inputs.flows.record(draft);
    result
}

async fn relay(
    inputs: &Arc<ProxyInputs>,
    src: &Arc<LocalPod>,
    client: TcpStream,
    peer: SocketAddr,
    note: &mut Note,
) -> Result<(), ProxyError> {
    let c = &src.counters;
    c.outbound_accepted.inc();
    let fail = |e: ProxyError| {
        c.outbound_failed.inc();
        e
    };
    inputs.metrics.capture.captured.inc();
    let dst = inputs
        .orig_dst
        .take(src.netns.cookie(), peer.port())
        .map_err(|e| fail(ProxyError::OrigDstMap(e)))?
        .ok_or_else(|| {
            inputs.metrics.capture.orig_dst_misses.inc();
            fail(ProxyError::NoOrigDst(peer.port()))
        })?;
    note.dst = Some(dst);
    // Mesh destinations get protocol detection: HTTP is proxied per request. The snapshot is
    // loaded for each decision and not held across I/O: a long connection must not keep old
    // routes, or removed pods, alive.
    let detects = inputs.view.load().routes.detects(dst);
    let client = if detects {
        let (protocol, client) = detect::detect(client).await.map_err(|source| {
            fail(ProxyError::Transport(TransportError::Connect {
                addr: dst,
                source,
            }))
        })?;
        if protocol.is_http() {
            debug!(src = %src.pod.key, %dst, ?protocol, "outbound HTTP");
            let cx = Arc::new(l7::outbound::Outbound {
                inputs: inputs.clone(),
                src: src.clone(),
                dst,
                h2: protocol == detect::Protocol::Http2,
            });
            let client = Counted::new(client, c, |c| &c.outbound_bytes_sent)
                .and_writes(|c| &c.outbound_bytes_received);
            note.l7 = true;
            l7::outbound::serve_outbound(cx, client, protocol).await;
            return Ok(());
        }
        client
    } else {
        detect::Rewind::new(client)
    };
    let view = inputs.view.load();
    let routes = &view.routes;
    let target = routes.resolve(dst).map_err(|e| fail(e.into()))?;
    note.target = Some(target);
    let hop = Hop::to(&view, target.ip());
    let flow = Flow {
        reporter: Reporter::Source,
        src: view.local_peer(src),
        dst: match &hop {
            Hop::Local(dest) => view.local_peer(dest),
            Hop::Hbone(w) => view.workload_peer(w),
            Hop::Passthrough => Peer::unknown(),
        },
        service: routes.service_name_at(dst.ip()),
        security: match &hop {
            Hop::Hbone(_) => Security::MutualTls,
            _ => Security::None,
        },
    };
    note.flow = Some(flow.clone());
    if let Hop::Local(dest) = &hop {
        // Same node: the kernel told us the source pod, so its identity needs no certificate.
        // Detection found no HTTP, so HTTP-only rules fail closed.
        let src_id = src.identity();
        let from = SocketAddr::new(src.pod.ip_toward(target.ip()), peer.port());
        let flows = &inputs.flows;
        admission::authorize(
            &view,
            flows,
            dest,
            Some(src_id),
            Some(from),
            target.port(),
            None,
        )
        .map_err(|d| fail(ProxyError::Denied(d)))?;
    }
    let within = routes
        .service_at(dst.ip())
        .and_then(|e| e.limits.policy.connect_timeout)
        .unwrap_or(CONNECT_TIMEOUT);
    drop(view);
    let open = inputs.dialer.open(src, &hop, target, Payload::Opaque);
    let upstream = match tokio::time::timeout(within, open).await {
        Ok(r) => r.map_err(|e| fail(e.into()))?,
        Err(_) => {
            let source = std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {within:?} (the service's connectTimeout)"),
            );
            let e = TransportError::Connect {
                addr: target,
                source,
            };
            return Err(fail(e.into()));
        }
    };
    let client = Counted::new(client, c, |c| &c.outbound_bytes_sent);
    let mut upstream = Counted::new(upstream, c, |c| &c.outbound_bytes_received);
    let conn = inputs.metrics.tcp.open(&flow);
    let mut client = client.metered(&conn);
    match &hop {
        Hop::Local(dest) => {
            c.outbound_local.inc();
            debug!(src = %src.pod.key, dst = %dest.pod.key, %target, "same-node delivery");
            // One proxy is both ends here, so it reports both.
            let dest_conn = inputs
                .metrics
                .tcp
                .open(&flow.reported_by(Reporter::Destination));
            let mut delivered =
                Counted::new(&mut client, &dest.counters, |c| &c.inbound_bytes_delivered)
                    .metered(&dest_conn);
            let tracked = dest.track(
                Some(src.identity().clone()),
                Some(src.pod.ip_toward(target.ip())),
                target.port(),
            );
            let splicer = inputs.splice.as_ref();
            let finished = tracked
                .run(relay::copy_both_until(
                    &mut delivered,
                    &mut upstream,
                    splicer.map(|s| s.after_bytes()),
                ))
                .await;
            drop(delivered);
            note.bytes = client.totals();
            let handed = match (finished, splicer) {
                (Err(why), _) => return Err(ProxyError::Revoked(why)),
                (Ok(Ok(relay::Relayed::HandOff)), Some(splicer)) => {
                    let conns = [&conn, &dest_conn];
                    hand_off(src, dest, splicer, client, upstream, conns, &tracked).await
                }
                _ => return Ok(()),
            };
            let (up, down) = handed?;
            note.bytes.0 += up;
            note.bytes.1 += down;
            return Ok(());
        }
        Hop::Hbone(w) => {
            c.outbound_hbone.inc();
            debug!(src = %src.pod.key, dst = %w.key, %target, "outbound over HBONE");
            let _ = relay::copy_both(&mut client, &mut upstream).await;
        }
        Hop::Passthrough => {
            debug!(pod = %src.pod.key, %dst, %target, "outbound passthrough");
            let _ = relay::copy_both(&mut client, &mut upstream).await;
        }
    }
    note.bytes = client.totals();
    Ok(())
}

/// Hands a same-node connection that has proven bulk to the kernel, and runs it to its end.
/// Returns the bytes moved from here on (client to application, application to client),
/// counted into the same counters the relay fed live.
async fn hand_off(
    src: &LocalPod,
    dest: &LocalPod,
    splicer: &Arc<Splicer>,
    client: Counted<detect::Rewind<TcpStream>>,
    upstream: Counted<UpstreamIo>,
    conns: [&TcpConn; 2],
    tracked: &Tracked<'_>,
) -> Result<(u64, u64), ProxyError> {
    let UpstreamIo::Tcp(app) = upstream.into_inner() else {
        // Same-node upstreams are always sockets; nothing else is ever handed off.
        return Ok((0, 0));
    };
    let c = &src.counters;
    let count = |up: u64, down: u64| {
        c.outbound_bytes_sent.add(up);
        c.outbound_bytes_received.add(down);
        dest.counters.inbound_bytes_delivered.add(up);
        for conn in conns {
            conn.received.inc_by(up);
            conn.sent.inc_by(down);
        }
    };
    let mut spliced = match splicer.splice(client.into_inner(), app).await {
        Ok(s) => s,
        Err(NotSpliced::Failed(e)) => {
            debug!(src = %src.pod.key, dst = %dest.pod.key, "splice failed, connection lost: {e}");
            return Ok((0, 0));
        }
        Err(NotSpliced::Declined(d)) => {
            // The kernel's maps are full: keep relaying here.
            debug!(src = %src.pod.key, dst = %dest.pod.key, "not spliced: {}", d.why);
            let (mut client, mut app) = (d.client, d.app);
            let copied = tracked.run(relay::copy_both(&mut client, &mut app)).await;
            let (up, down) = match copied {
                Err(why) => return Err(ProxyError::Revoked(why)),
                Ok(r) => r.unwrap_or((0, 0)),
            };
            count(up, down);
            return Ok((up, down));
        }
    };
    c.outbound_spliced.inc();
    debug!(src = %src.pod.key, dst = %dest.pod.key, "same-node connection spliced");
    let finished = tracked.run(spliced.run()).await;
    let (up, down) = spliced.totals();
    drop(spliced);
    count(up, down);
    match finished {
        Err(why) => Err(ProxyError::Revoked(why)),
        Ok(r) => {
            if let Err(e) = r {
                debug!(src = %src.pod.key, dst = %dest.pod.key, "spliced connection ended: {e}");
            }
            Ok((up, down))
        }
    }
}
