//! Hands an admitted connection to a pod of this node: relayed at L4 for as long as policy
//! allows it, or parsed as HTTP and authorized request by request when an L7 policy selects the
//! pod. Plaintext inbound and HBONE streams both end here.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{admission, error::ProxyError, inputs::ProxyInputs, l7::inbound::serve_inbound};
use crate::{
    identity::Identity,
    pods::{Counted, LocalPod},
    protocol::detect,
    telemetry::{flows::Draft, metrics::labels::Flow, metrics::tcp::TcpConn},
    transport::{dial::dial_app, relay},
};

/// Whether a delivered connection is parsed as HTTP, and how long its first bytes may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// Relayed at L4, as admitted.
    No,
    /// HTTP if its first bytes say so within detection's timeout.
    Sniff,
    /// The source's node declared HTTP (HBONE's payload hint): its first bytes are waited for as
    /// long as a request head may take. In the 6.1 guest a tunnelled request arrived after
    /// detection's 200 ms, was taken for opaque TCP and denied by an HTTP-only policy. The hint
    /// grants nothing: bytes that are not HTTP are still decided at L4.
    Declared,
}

/// Delivers an admitted connection to `dest`'s application. With [`Parse::No`], `app` is the
/// connection to it, dialled once L4 policy allowed. Parsed, with no `app` (an L7
/// policy selects the pod) nothing is dialled yet: HTTP is authorized request by request and
/// the application is dialled for the first allowed request; anything else gets the
/// connection-level decision, in which HTTP-only rules fail closed, and is dialled only if
/// allowed. So a refused connection never reaches the application, not even as an empty
/// accept. Parsed, with an `app` (HTTP that L4 policy allowed, parsed here so this
/// node reports it) requests go to `app`, and anything else is relayed to it.
#[expect(
    clippy::too_many_arguments,
    reason = "one hand-over point for both inbound paths"
)]
pub async fn deliver<S>(
    inputs: &Arc<ProxyInputs>,
    dest: &Arc<LocalPod>,
    source: Option<Identity>,
    peer: SocketAddr,
    port: u16,
    parse: Parse,
    client: S,
    app: Option<TcpStream>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The snapshot is read here and not held across the relay: a long connection must not keep
    // old routes, or removed pods, alive.
    let flow = admission::inbound_flow(&inputs.view.load(), dest, source.as_ref(), peer.ip(), port);
    let wait = match parse {
        Parse::No => {
            if let Some(app) = app {
                relay_recorded(inputs, dest, client, app, flow, source, peer, port).await;
            }
            return;
        }
        Parse::Sniff => detect::DETECT_TIMEOUT,
        Parse::Declared => inputs.http_timeouts.head,
    };
    let (protocol, client) = match detect::detect_within(client, wait).await {
        Ok(x) => x,
        Err(e) => {
            debug!(dst = %dest.pod.key, "protocol detection: {e}");
            return;
        }
    };
    if protocol.is_http() {
        let client = Counted::new(client, &dest.counters, |c| &c.inbound_bytes_delivered);
        let from = flow.src;
        serve_inbound(
            inputs.clone(),
            dest.clone(),
            source,
            (from, peer),
            (port, app),
            protocol,
            client,
        )
        .await;
    } else if let Some(app) = app {
        relay_recorded(inputs, dest, client, app, flow, source, peer, port).await;
    } else if admission::authorize(
        &inputs.view.load(),
        &inputs.flows,
        dest,
        source.as_ref(),
        Some(peer),
        port,
        None,
    )
    .is_ok()
    {
        match dial_app(dest, port).await {
            Ok(app) => {
                relay_recorded(inputs, dest, client, app, flow, source, peer, port).await;
            }
            Err(e) => warn!(dst = %dest.pod.key, "{e}"),
        }
    }
}

/// Relays a connection authorized at L4 to the application, for as long as policy allows it,
/// and files its flow record.
#[expect(
    clippy::too_many_arguments,
    reason = "the hand-over's context, passed on from `deliver`"
)]
async fn relay_recorded<C: AsyncRead + AsyncWrite + Unpin>(
    inputs: &ProxyInputs,
    dest: &LocalPod,
    client: C,
    app: TcpStream,
    flow: Flow,
    source: Option<Identity>,
    peer: SocketAddr,
    port: u16,
) {
    let conn = inputs.metrics.tcp.open(&flow);
    let mut draft = Draft::new(flow);
    draft.src_addr = Some(peer);
    draft.dst_addr = Some(SocketAddr::new(dest.pod.ip, port));
    let tracked = dest.track(source, Some(peer.ip()), port);
    match tracked.run(relay_to_app(dest, client, app, conn)).await {
        Ok(bytes) => (draft.bytes_received, draft.bytes_sent) = bytes,
        Err(why) => ProxyError::Revoked(why).file(&mut draft),
    }
    inputs.flows.record(draft);
}

/// Relays between a client and `dest`'s application, counting delivered bytes live; returns the
/// bytes (from the client, to the client).
async fn relay_to_app<S: AsyncRead + AsyncWrite + Unpin>(
    dest: &LocalPod,
    mut client: S,
    mut app: TcpStream,
    conn: TcpConn,
) -> (u64, u64) {
    let mut client =
        Counted::new(&mut client, &dest.counters, |c| &c.inbound_bytes_delivered).metered(&conn);
    let _ = relay::copy_both(&mut client, &mut app).await;
    client.totals()
}
