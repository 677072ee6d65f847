//! The workload the harness runs inside pods: an HTTP/1.1 server whose answers let a test prove
//! bytes arrived unchanged, and a fixed-rate load generator for the bench.
//!
//! Server endpoints:
//! - `GET /` — 1024 bytes (the bench's 1 KB body);
//! - `GET /bytes/N` — N bytes of a fixed pattern (see `mesh_tests::pattern_byte`);
//! - `POST /sha256` — answers `<hex sha256 of the body> <length>`;
//! - `GET /count` — how many requests this server has answered.

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
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1 on 0.0.0.0:PORT.
    Serve {
        #[arg(long)]
        port: u16,
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

async fn handle(
    req: Request<hyper::body::Incoming>,
    count: Arc<AtomicU64>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    // `/count` reports the other requests, so asking does not change the answer.
    if path != "/count" {
        count.fetch_add(1, Ordering::Relaxed);
    }
    let resp = match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => Response::new(full(vec![b'x'; 1024])),
        (Method::GET, "/count") => Response::new(full(count.load(Ordering::Relaxed).to_string())),
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
                    Err(e) => return Ok(bad(&format!("body: {e}"))),
                }
            }
            Response::new(full(format!("{} {n}", hex::encode(h.finalize()))))
        }
        _ => {
            let mut r = Response::new(full("not found"));
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
    };
    Ok(resp)
}

fn bad(msg: &str) -> Response<Body> {
    let mut r = Response::new(full(msg.to_string()));
    *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
    r
}

async fn serve(port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("bind 0.0.0.0:{port}"))?;
    let count = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let count = count.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, count.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
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

/// Fixed-rate load on plain threads: `thread::sleep` wakes within tens of microseconds, where
/// tokio's timer wheel would add up to a millisecond to every measurement.
fn load(
    addr: SocketAddr,
    path: &str,
    rate: u64,
    seconds: u64,
    connections: u64,
    reconnect: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let total = rate * seconds;
    let start = Instant::now() + Duration::from_millis(50);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let results: Vec<anyhow::Result<(Vec<u64>, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..connections)
            .map(|w| {
                let request = request.as_bytes();
                s.spawn(move || -> anyhow::Result<(Vec<u64>, u64)> {
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
                            Ok(true) => lat.push(due.elapsed().as_micros() as u64),
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
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{}",
        serde_json::json!({
            "requests": all.len(),
            "errors": errors,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { port } => tokio::runtime::Runtime::new()?.block_on(serve(port)),
        Cmd::Load {
            addr,
            path,
            rate,
            seconds,
            connections,
            reconnect,
        } => load(addr, &path, rate, seconds, connections, reconnect),
    }
}
