//! Plaintext inbound (15006): only PERMISSIVE pods get here (the kernel refuses plaintext to
//! STRICT ones). Authorized with no identity, then delivered over the pod's loopback.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    admission,
    deliver::{Parse, deliver},
    error::ProxyError,
    inputs::ProxyInputs,
};
use crate::{pods::LocalPod, state::MtlsMode, transport::dial::dial_app};

/// Handles one connection accepted on `pod`'s plaintext listener.
pub async fn handle(
    inputs: &Arc<ProxyInputs>,
    pod: &Arc<LocalPod>,
    client: TcpStream,
) -> Result<(), ProxyError> {
    let c = &pod.counters;
    c.inbound_accepted.inc();
    let fail = |e: ProxyError| {
        c.inbound_failed.inc();
        e
    };
    // sk_lookup hands us the connection untouched, so its local address is where the client
    // was going.
    let local = client
        .local_addr()
        .map(crate::capture::netns::canonical)
        .map_err(|source| {
            fail(ProxyError::Transport(
                crate::transport::error::TransportError::Connect {
                    addr: SocketAddr::new(pod.pod.ip, 0),
                    source,
                },
            ))
        })?;
    if local.port() == mesh_common::ports::INBOUND {
        return Err(fail(ProxyError::DirectToProxyPort(local.port())));
    }
    let view = inputs.view.load();
    // The kernel refuses plaintext to STRICT pods and ports; this catches a mode change in
    // flight.
    if view.state().mtls_mode_at(&pod.pod, local.port()) == MtlsMode::Strict {
        return Err(fail(ProxyError::StrictPlaintext(pod.pod.key.clone())));
    }
    let peer = client
        .peer_addr()
        .map(crate::capture::netns::canonical)
        .unwrap_or(local);
    let per_request = admission::admit(&view, &inputs.flows, pod, None, peer, local.port())
        .map_err(|d| fail(ProxyError::Denied(d)))?;
    // Not held across the connection: it must not keep old routes, or removed pods, alive.
    drop(view);
    // Per-request pods are dialled only once a request (or, for non-HTTP, the connection) is
    // allowed.
    let app = if per_request {
        None
    } else {
        Some(
            dial_app(pod, local.port())
                .await
                .map_err(|e| fail(e.into()))?,
        )
    };
    deliver(
        inputs,
        pod,
        None,
        peer,
        local.port(),
        if per_request { Parse::Sniff } else { Parse::No },
        client,
        app,
    )
    .await;
    Ok(())
}
