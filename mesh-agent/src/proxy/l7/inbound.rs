//! L7 inbound (the destination's node), for pods an L7 authorization policy selects: the path is
//! normalized as on the outbound side, each request is authorized with the identity the
//! connection proved, and forwarded over one connection to the application, dialled for the
//! first allowed request (so a refused one never reaches it) and again if the application
//! closes it.

use std::{net::SocketAddr, sync::Arc};

use parking_lot::Mutex;

use http::StatusCode;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    message::{
        Prepared, checked_body, forbidden, prepare, rebuild, reply, strip_response,
        switch_protocols,
    },
    record::{Ends, Shape, recorded},
    server::serve,
};
use crate::{
    identity::Identity,
    pods::LocalPod,
    protocol::{
        body::{Body, H2_CONN_WINDOW, H2_DECODE_LIMIT, H2_SEND_BUF, H2_STREAM_WINDOW, incoming},
        detect::Protocol,
    },
    proxy::{admission::authorize, inputs::ProxyInputs},
    telemetry::metrics::labels::{Flow, Peer, Reporter, Security},
    transport::dial::dial_app,
    view::Snapshot,
};

/// What an inbound L7 connection's requests share.
#[derive(Debug)]
struct Inbound {
    inputs: Arc<ProxyInputs>,
    dest: Arc<LocalPod>,
    source: Option<Identity>,
    /// The source as metric labels name it.
    from: Peer,
    /// The source's address.
    peer: SocketAddr,
    port: u16,
    h2: bool,
    h1_app: Mutex<Option<hyper::client::conn::http1::SendRequest<Body>>>,
    h2_app: Mutex<Option<hyper::client::conn::http2::SendRequest<Body>>>,
}

/// Serves a connection to `port` of `dest`'s application at L7: every request is authorized
/// with `source` and forwarded over one connection to the application: `app` when the caller
/// dialled it already, else dialled for the first allowed request (so a refused one never
/// reaches it), and again if the application closes it.
pub async fn serve_inbound<S>(
    inputs: Arc<ProxyInputs>,
    dest: Arc<LocalPod>,
    source: Option<Identity>,
    (from, peer): (Peer, SocketAddr),
    (port, app): (u16, Option<tokio::net::TcpStream>),
    protocol: Protocol,
    io: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h2 = protocol == Protocol::Http2;
    let cx = Arc::new(Inbound {
        inputs,
        dest,
        source,
        from,
        peer,
        port,
        h2,
        h1_app: Mutex::new(None),
        h2_app: Mutex::new(None),
    });
    if let Some(app) = app
        && let Err(e) = cx.attach(app).await
    {
        tracing::debug!(dst = %cx.dest.pod.key, "the application's connection failed at once: {e}");
    }
    let (timeouts, drain) = (cx.inputs.http_timeouts, cx.inputs.drain.clone());
    let svc = service_fn(move |req| {
        let cx = cx.clone();
        async move {
            let mut resp = inbound_request(&cx, req).await?;
            cx.inputs.drain.close_after(cx.h2, &mut resp);
            Ok::<_, Unanswered>(resp)
        }
    });
    serve(io, protocol, (timeouts, &drain), svc).await;
}

impl Inbound {
    async fn attach(&self, app: tokio::net::TcpStream) -> Result<(), hyper::Error> {
        let io = TokioIo::new(app);
        if self.h2 {
            let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONN_WINDOW)
                .max_send_buf_size(H2_SEND_BUF)
                .max_header_list_size(H2_DECODE_LIMIT)
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            *self.h2_app.lock() = Some(s);
        } else {
            let (s, conn) = hyper::client::conn::http1::Builder::new()
                .handshake(io)
                .await?;
            tokio::spawn(conn.with_upgrades());
            *self.h1_app.lock() = Some(s);
        }
        Ok(())
    }

    async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        for _ in 0..2 {
            if self.h2 {
                let s = self.h2_app.lock().clone().filter(|s| !s.is_closed());
                if let Some(mut s) = s {
                    return s.send_request(req).await.map_err(|e| e.to_string());
                }
            } else {
                let s = self.h1_app.lock().take().filter(|s| !s.is_closed());
                if let Some(mut s) = s {
                    s.ready().await.map_err(|e| e.to_string())?;
                    let fut = s.send_request(req);
                    *self.h1_app.lock() = Some(s);
                    return fut.await.map_err(|e| e.to_string());
                }
            }
            let app = dial_app(&self.dest, self.port)
                .await
                .map_err(|e| e.to_string())?;
            self.attach(app).await.map_err(|e| e.to_string())?;
        }
        Err("the application keeps closing its connection".into())
    }
}

/// The application dropped a request unanswered and the client is a peer proxy: the request is
/// dropped the same way, so the source sees (and may retry) a reset, not this node's 503.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("the application dropped the request unanswered")]
pub struct Unanswered;

async fn inbound_request(
    cx: &Inbound,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Unanswered> {
    cx.dest.counters.http_requests.inc();
    let shape = Shape::of(&mut req);
    let view = cx.inputs.view.load();
    let upgrades = view.routes.upgrades_to(cx.dest.pod.ip, cx.port);
    let (resp, downstream) = match prepare(req, &view.state().mesh, upgrades) {
        Ok((mut prepared, body)) => {
            let downstream = prepared.upgrade.take();
            (
                authorize_and_send(cx, &view, prepared, body).await,
                downstream,
            )
        }
        Err(r) => (r, None),
    };
    let resp = switch_protocols(resp, downstream, shape.upgrade);
    let flow = Flow {
        reporter: Reporter::Destination,
        src: cx.from.clone(),
        dst: view.local_peer(&cx.dest),
        service: view.routes.service_to(cx.dest.pod.ip, cx.port),
        security: if cx.source.is_some() {
            Security::MutualTls
        } else {
            Security::None
        },
    };
    let ends = Ends {
        src: Some(cx.peer),
        dst: Some(SocketAddr::new(cx.dest.pod.ip, cx.port)),
    };
    let unanswered = resp.extensions().get::<Unanswered>().is_some();
    let resp = recorded(&cx.inputs, flow, false, shape, ends, resp);
    if unanswered && cx.source.is_some() {
        // Dropping the response files its record (503, UC) here.
        drop(resp);
        return Err(Unanswered);
    }
    Ok(resp)
}

/// Authorizes one prepared request on the inbound side and sends it to the application.
async fn authorize_and_send(
    cx: &Inbound,
    view: &Snapshot,
    prepared: Prepared,
    body: Incoming,
) -> Response<Body> {
    let attrs = prepared.attributes();
    if let Err(d) = authorize(
        view,
        &cx.inputs.flows,
        &cx.dest,
        cx.source.as_ref(),
        Some(cx.peer),
        cx.port,
        Some(&attrs),
    ) {
        return forbidden(d);
    }
    let body = match checked_body(prepared.parts.version, incoming(body)).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match cx.send(rebuild(&prepared.parts, body)).await {
        Ok(mut resp) => {
            strip_response(resp.status(), resp.headers_mut());
            resp.map(incoming)
        }
        Err(e) => {
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "UC",
                &format!("application: {e}"),
            );
            r.extensions_mut().insert(Unanswered);
            r
        }
    }
}
