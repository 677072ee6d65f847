//! hyper's server for a captured connection, with the hardening settings: HTTP/2 limits and
//! the frame guard, or the HTTP/1 framing guard with its head and idle timeouts.

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::protocol::{
    body::{Body, H2_CONN_WINDOW, H2_DECODE_LIMIT, H2_SEND_BUF, H2_STREAM_WINDOW},
    detect::Protocol,
    guard::{self, HttpTimeouts},
    h2guard,
};
use crate::proxy::drain::{Drain, graceful};

/// HTTP/2 streams per client connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Streams a client may reset before the server accepted them (rapid reset) before GOAWAY.
const MAX_PENDING_RESETS: usize = 20;
/// Runs hyper's server for `protocol` with the hardening settings on `io`.
/// Draining sends GOAWAY on HTTP/2.
pub async fn serve<S, Svc>(
    io: S,
    protocol: Protocol,
    (timeouts, drain): (HttpTimeouts, &Drain),
    svc: Svc,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::HttpService<Incoming, ResBody = Body>,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Svc::Future: Send + 'static,
{
    let result = if protocol == Protocol::Http2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(H2_DECODE_LIMIT)
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .max_send_buf_size(H2_SEND_BUF)
            .serve_connection(TokioIo::new(h2guard::H2Guard::new(io)), svc);
        graceful!(conn, drain)
    } else {
        let mut guarded = guard::H1Guard::new(io, timeouts.head);
        // hyper starts once the first head is whole (or refused): a connection that stalls in
        // its first head holds only the bytes it sent.
        match tokio::time::timeout(timeouts.idle, guarded.first_head()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("HTTP/1 connection ended before its first request: {e}");
                return;
            }
            Err(_) => {
                debug!("HTTP/1 connection sent no request within the idle timeout");
                return;
            }
        }
        // Draining closes HTTP/1 by `Connection: close` on the next answer (the handlers add
        // it), not from here: see `drain.rs`.
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .half_close(true)
            .header_read_timeout(timeouts.idle)
            .max_buf_size(guard::MAX_HEAD + 16 * 1024)
            .serve_connection(TokioIo::new(guarded), svc)
            .with_upgrades()
            .await
    };
    if let Err(e) = result {
        debug!("HTTP connection ended: {e}");
    }
}
