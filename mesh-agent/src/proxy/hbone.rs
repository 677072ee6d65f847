//! The HBONE server of a pod's 15008 listener: the mTLS handshake proves the client's workload
//! identity, then each CONNECT is checked, in this order: the client certificate still valid →
//! method → authority names a local pod with this listener's identity → L4 authorization with
//! the proven identity → dial the application over the pod's loopback → 200, and the stream is
//! delivered.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{
    admission,
    deliver::{Parse, deliver},
    error::ProxyError,
    inputs::ProxyInputs,
};
use crate::{
    identity::Identity,
    pods::LocalPod,
    transport::{
        dial::dial_app,
        error::TransportError,
        hbone::{self, PAYLOAD_HEADER, PAYLOAD_HTTP},
    },
};

/// The authenticated client of one HBONE connection.
#[derive(Debug)]
struct Client {
    id: Identity,
    /// Its certificate's expiry: TLS checked it once, at the handshake, so each new stream on a
    /// long-lived connection checks it again.
    expiry: SystemTime,
}

/// Serves one TCP connection accepted on `pod`'s 15008 listener.
pub async fn serve(
    inputs: Arc<ProxyInputs>,
    pod: Arc<LocalPod>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let drain = inputs.drain.clone();
    let accepted = hbone::accept(
        &inputs.certs,
        pod.identity(),
        stream,
        peer,
        (inputs.ktls, inputs.drain.closing()),
    )
    .await?;
    pod.counters.hbone_connections.inc();
    let client = Arc::new(Client {
        id: accepted.client,
        expiry: accepted.expiry,
    });
    let svc = service_fn(move |req| {
        let (inputs, pod, client) = (inputs.clone(), pod.clone(), client.clone());
        async move {
            Ok::<_, std::convert::Infallible>(
                connect_stream(&inputs, &pod, &client, peer, req).await,
            )
        }
    });
    let conn = hbone::server().serve_connection(accepted.io, svc);
    // Draining: GOAWAY, so the client opens new streams elsewhere while these finish.
    let conn = async move { super::drain::graceful!(conn, drain) };
    // The client's identity holds only while its certificate does: at expiry the connection
    // and every stream on it end, so pooled streams cannot outlive the proof.
    let left = accepted
        .expiry
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::select! {
        r = conn => r.map_err(|e| ProxyError::Transport(TransportError::Handshake {
            peer,
            problem: format!("HTTP/2: {e}"),
        })),
        () = tokio::time::sleep(left) => {
            info!(%peer, "closed an HBONE connection: the client's certificate expired");
            Ok(())
        }
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

/// Checks one CONNECT and, once the application accepted, answers 200 and relays in the
/// background.
async fn connect_stream(
    inputs: &Arc<ProxyInputs>,
    listener_pod: &Arc<LocalPod>,
    client: &Arc<Client>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Empty<Bytes>> {
    let c = &listener_pod.counters;
    if SystemTime::now() >= client.expiry {
        c.hbone_refused.inc();
        warn!(%peer, src = %client.id, "refused HBONE stream: the client's certificate has expired since the handshake");
        return status(StatusCode::UNAUTHORIZED);
    }
    if req.method() != Method::CONNECT {
        c.hbone_refused.inc();
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(target) = hbone::connect_target(req.uri()) else {
        c.hbone_refused.inc();
        warn!(%peer, uri = %req.uri(), "HBONE CONNECT without an <ip>:<port> authority");
        return status(StatusCode::BAD_REQUEST);
    };
    // Only pods behind this listener: on this node, with the identity this TLS session proved.
    let view = inputs.view.load();
    let my_id = listener_pod.identity();
    let dest = view
        .local_pod(target.ip())
        .filter(|p| p.identity() == my_id)
        .cloned();
    let Some(dest) = dest else {
        c.hbone_refused.inc();
        warn!(%peer, %target, listener = %listener_pod.pod.key, "refused HBONE CONNECT: the authority is not a pod behind this listener");
        return status(StatusCode::BAD_REQUEST);
    };
    let admitted = admission::admit(
        &view,
        &inputs.flows,
        &dest,
        Some(&client.id),
        peer,
        target.port(),
    );
    let Ok(l7_policy) = admitted else {
        return status(StatusCode::FORBIDDEN);
    };
    // A pod decided per request is dialled only once something is allowed; any other is
    // dialled now, so a refusing application is a 503 before any byte flows.
    let app = if l7_policy {
        None
    } else {
        match dial_app(&dest, target.port()).await {
            Ok(a) => Some(a),
            Err(e) => {
                warn!(dst = %dest.pod.key, "{e}");
                return status(StatusCode::SERVICE_UNAVAILABLE);
            }
        }
    };
    // HTTP the source routed is parsed here too, so this node reports it (see `PAYLOAD_HEADER`);
    // when L4 policy already allowed it, its requests go to the connection dialled above.
    let declared = req
        .headers()
        .get(PAYLOAD_HEADER)
        .is_some_and(|v| v.as_bytes() == PAYLOAD_HTTP.as_bytes());
    let parse = match (declared, l7_policy) {
        (true, _) => Parse::Declared,
        (false, true) => Parse::Sniff,
        (false, false) => Parse::No,
    };
    let client = client.id.clone();
    let inputs = inputs.clone();
    tokio::spawn(async move {
        match hyper::upgrade::on(&mut req).await {
            Ok(up) => {
                dest.counters.hbone_streams.inc();
                debug!(src = %client, dst = %dest.pod.key, port = target.port(), "HBONE stream");
                let stream = TokioIo::new(up);
                deliver(
                    &inputs,
                    &dest,
                    Some(client),
                    peer,
                    target.port(),
                    parse,
                    stream,
                    app,
                )
                .await;
            }
            Err(e) => warn!(%peer, "HBONE upgrade: {e}"),
        }
    });
    status(StatusCode::OK)
}
