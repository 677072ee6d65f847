//! Admin endpoints, on localhost only: `/healthz`, `/ready` and `/stats`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::app::Agent;

/// Errors starting the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin address is not a loopback address.
    #[error(
        "admin address {0} is not loopback: the admin endpoints expose internals and must stay on localhost"
    )]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error(
        "cannot bind the admin endpoint {addr}: {source} (is another agent using it? pass --admin-addr)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the admin listener (so a bad address fails start-up, not later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(handle(&agent, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                warn!("admin connection: {e}");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn handle(agent: &Agent, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => match agent.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/stats" => {
            let body = serde_json::to_vec_pretty(&agent.stats()).unwrap_or_default();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /ready or /stats\n",
        ),
    }
}
