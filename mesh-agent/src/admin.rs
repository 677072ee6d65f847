//! Admin endpoints, on localhost only:
//! - `/healthz`: the process answers;
//! - `/ready`: every pod is enrolled and has a certificate;
//! - `/stats`: per-pod counters and certificates;
//! - `/config_dump`: the state the agent works from (pods, workloads, services, routes,
//!   policies), certificates without keys, and the BPF maps summarized;
//! - `/debug/flows?since=N&limit=M`: the most recent flow records, with their decisions;
//! - `/explain?src=ns/name&dst=ip:port[&method=&path=&header=name:value]`: what the proxy
//!   would do with such a connection or request, and why (see `explain.rs`);
//! - `/logging`: the log filter; `POST /logging?level=debug` (or any `RUST_LOG`-style filter)
//!   changes it at run time.
//!
//! - `/version`: the agent's version, for `mesh-agent version`.
//!
//! The `mesh-agent status|flows|explain|config-dump|version` commands are clients of these.
//!
//! The probe listener (`--probe-addr`, default `0.0.0.0:15021`) is the one the kubelet reaches
//! from outside the pod: it answers `/healthz`, `/ready` and `/version` exactly as the admin
//! listener does, and nothing else, so no internals leave localhost.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{telemetry::flows::FlowLog, view::Snapshot};

/// What the admin endpoints read. The agent, which wires everything, hands itself over as one,
/// so this module never imports the wiring above it.
pub trait AdminView: Send + Sync + 'static {
    /// Why the agent is not ready, if it is not (`/ready`).
    fn not_ready_reason(&self) -> Option<String>;
    /// Every counter (`/stats`).
    fn stats(&self) -> serde_json::Value;
    /// What the agent works from (`/config_dump`).
    fn config_dump(&self) -> serde_json::Value;
    /// The flow records, for `/debug/flows`.
    fn flows(&self) -> &FlowLog;
    /// The published view, for `explain`.
    fn snapshot(&self) -> Arc<Snapshot>;
    /// The run-time log filter (`/logging`).
    fn logging(&self) -> &LogControl;
}

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
    /// A log filter could not be parsed.
    #[error("log filter {filter:?}: {problem} (try a level like debug, or mesh_agent=debug,info)")]
    Filter {
        /// What was given.
        filter: String,
        /// Why it was refused.
        problem: String,
    },
}

/// Applies a log filter, or says why it cannot.
type ApplyFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the log filter of the running process.
pub struct LogControl {
    set: ApplyFilter,
    current: parking_lot::Mutex<String>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl LogControl {
    /// A control that applies a filter with `set`; `current` is the filter in force.
    pub fn new(
        current: String,
        set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            set: Box::new(set),
            current: parking_lot::Mutex::new(current),
        }
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().clone()
    }

    /// Applies `filter`; the old one stays if it is refused.
    pub fn set(&self, filter: &str) -> Result<(), AdminError> {
        (self.set)(filter).map_err(|problem| AdminError::Filter {
            filter: filter.into(),
            problem,
        })?;
        *self.current.lock() = filter.into();
        Ok(())
    }
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

/// Binds the probe listener, on any address.
pub async fn bind_probes(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Which requests a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every endpoint (the loopback admin listener).
    All,
    /// `/healthz`, `/ready` and `/version` only (the probe listener).
    Probes,
}

/// Serves admin requests until the task is dropped.
pub async fn serve(listener: TcpListener, agent: Arc<dyn AdminView>, scope: Scope) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let agent = agent.clone();
                async move {
                    let probe = matches!(req.uri().path(), "/healthz" | "/ready" | "/version");
                    Ok::<_, Infallible>(if scope == Scope::All || probe {
                        handle(&*agent, &req)
                    } else {
                        text(
                            StatusCode::NOT_FOUND,
                            "only /healthz, /ready and /version here\n",
                        )
                    })
                }
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

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The query's `name=value` pairs, decoded, in order.
fn query(uri: &hyper::Uri) -> Vec<(String, String)> {
    let q = uri.query().unwrap_or_default();
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

fn handle(agent: &dyn AdminView, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let q = query(req.uri());
    let param = |name: &str| q.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/version" => json(&serde_json::json!({"version": crate::telemetry::metrics::VERSION})),
        "/ready" => match agent.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/stats" => json(&agent.stats()),
        "/config_dump" => json(&agent.config_dump()),
        "/debug/flows" => {
            let since = param("since").and_then(|v| v.parse().ok()).unwrap_or(0);
            let limit = param("limit")
                .and_then(|v| v.parse().ok())
                .unwrap_or(crate::telemetry::flows::HISTORY);
            let flows = agent.flows().since(since, limit);
            json(&flows.iter().map(|f| &**f).collect::<Vec<_>>())
        }
        "/explain" => {
            let question = crate::explain::Question {
                src: param("src").unwrap_or_default(),
                dst: param("dst").unwrap_or_default(),
                method: param("method"),
                path: param("path"),
                headers: q
                    .iter()
                    .filter(|(k, _)| k == "header")
                    .map(|(_, v)| v.clone())
                    .collect(),
            };
            match crate::explain::explain(&agent.snapshot(), &question) {
                Ok(answer) => json(&answer),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            }
        }
        "/logging" => {
            let wanted = param("level").or_else(|| param("filter"));
            match (req.method(), wanted) {
                (&hyper::Method::POST, Some(filter)) => match agent.logging().set(&filter) {
                    Ok(()) => {
                        info!(%filter, "log filter changed");
                        text(StatusCode::OK, format!("log filter: {filter}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                },
                (&hyper::Method::POST, None) => text(
                    StatusCode::BAD_REQUEST,
                    "POST /logging?level=<level or filter>, e.g. level=debug\n",
                ),
                (_, Some(_)) => text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "changing the log filter takes a POST\n",
                ),
                (_, None) => text(
                    StatusCode::OK,
                    format!("log filter: {}\n", agent.logging().current()),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /ready, /stats, /config_dump, /debug/flows, /explain or /logging\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::query;

    #[test]
    fn query_components_decode() {
        let uri: hyper::Uri = "/explain?src=default%2Fclient&header=x-user:+alice&p=100%25&flag"
            .parse()
            .expect("test URI");
        let q = query(&uri);
        let want = [
            ("src", "default/client"),
            ("header", "x-user: alice"),
            ("p", "100%"),
            ("flag", ""),
        ];
        let got: Vec<(&str, &str)> = q.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, want);
    }
}
