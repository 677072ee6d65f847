//! The HTTP/1 framing guard: it sits between a client connection and hyper, follows the
//! message framing on its own, and refuses request smuggling shapes before hyper parses them.
//!
//! hyper copes with ambiguous framing (it drops `Content-Length` when `Transfer-Encoding` is
//! present, and folds duplicate equal lengths), which is safe for hyper itself but forwards a
//! request that another hop could frame differently. The mesh refuses such requests outright. The
//! guard holds each request head back until it is complete and checked:
//! - `Content-Length` together with `Transfer-Encoding`, two `Content-Length`s, a non-numeric
//!   length, a `Transfer-Encoding` other than a single `chunked`, or two `Host`s: 400;
//! - a malformed head (e.g. `Transfer-Encoding : chunked`, with a space before the colon), an
//!   invalid method token (a NUL in it included), a bare LF line ending, a request line without
//!   an HTTP/1.x version (HTTP/0.9), a raw byte outside printable ASCII in the request target, an
//!   HTTP/1.1 request without `Host`, or a `Host` that is not `host[:port]`: 400;
//! - a head that has started but not finished within the head timeout: 408;
//! - more than [`MAX_HEADERS`] headers, or a head over [`MAX_HEAD`] bytes: 431;
//! - in a chunked body, a chunk size that overflows or is not hex, or a chunk not followed by
//!   CRLF: 400.
//!
//! A refused head never reaches hyper: the guard reports end of input instead, hyper finishes
//! what it was doing and shuts the connection down, and the guard writes the refusal just before
//! the shutdown. A refusal inside a body surfaces to the handler as a body error; the handler
//! waits for the first frame of a chunked body before forwarding, so such a request is never sent
//! upstream.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Headers allowed in one request head.
pub const MAX_HEADERS: usize = 100;
/// Bytes allowed in one request head (Envoy's default is 60 KiB).
pub const MAX_HEAD: usize = 60 * 1024;
/// Longest chunk-size line (size plus extensions) and trailer section.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug)]
enum Framing {
    Head,
    /// This many body bytes follow.
    Body(u64),
    ChunkSize(BytesMut),
    ChunkData(u64),
    /// The CRLF after chunk data; how many of its two bytes were seen.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk; bytes of the current line and of all trailers.
    Trailers {
        line: usize,
        total: usize,
    },
    /// After an upgrade the bytes are not HTTP any more.
    Passthrough,
}

/// A refusal: the status line and the reason sent as the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// 400 or 431.
    pub status: u16,
    /// Why, for the client and the log.
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Refusal {
    Refusal {
        status: 400,
        reason,
    }
}

/// Checks one complete head; on success returns how its body is framed.
fn check_head(head: &[u8]) -> Result<Framing, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal {
                status: 431,
                reason: "too many request headers",
            });
        }
        Err(_) => return Err(bad("malformed request head")),
    }
    let (mut te, mut cl, mut hosts) = (Vec::new(), Vec::new(), 0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            cl.push(h.value);
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
    }
    if hosts > 1 {
        return Err(bad("more than one Host header"));
    }
    if let Some(target) = req.path
        && !target.bytes().all(|b| (0x21..0x7f).contains(&b))
    {
        return Err(bad(
            "raw non-ASCII or control byte in the request target; percent-encode it",
        ));
    }
    match req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
    {
        None if req.version == Some(1) => return Err(bad("HTTP/1.1 request without Host")),
        Some(h) if !valid_host(h.value) => return Err(bad("invalid Host header")),
        _ => {}
    }
    if !te.is_empty() && !cl.is_empty() {
        return Err(bad("Content-Length together with Transfer-Encoding"));
    }
    if te.len() > 1 || cl.len() > 1 {
        return Err(bad("repeated Transfer-Encoding or Content-Length header"));
    }
    // After a switch of protocols the bytes are not HTTP, so the guard cannot tell where a body
    // would end and the new protocol begin: such a request may not have a body.
    let switches = req.method == Some("CONNECT")
        || req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("upgrade"));
    let has_body = !te.is_empty() || cl.first().is_some_and(|v| v.trim_ascii() != b"0");
    if switches && has_body {
        return Err(bad(
            "a request asking to switch protocols may not carry a body",
        ));
    }
    if let Some(v) = te.first() {
        if req.version != Some(1) {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !v.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(bad("Transfer-Encoding other than chunked"));
        }
        return Ok(Framing::ChunkSize(BytesMut::new()));
    }
    if let Some(v) = cl.first() {
        let v = v.trim_ascii();
        if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
            return Err(bad("invalid Content-Length"));
        }
        let n = v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        return Ok(if n == 0 {
            Framing::Head
        } else {
            Framing::Body(n)
        });
    }
    Ok(if switches {
        Framing::Passthrough
    } else {
        Framing::Head
    })
}

/// `host[:port]` as RFC 9110 §7.2 allows it: a registered name (unreserved, sub-delims and
/// percent-escapes) or a bracketed IP literal, and digits after one colon. Empty is allowed (a
/// request whose target has no authority).
fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &rest[end + 1..] {
            [] => (&b""[..], None),
            [b':', port @ ..] => (&b""[..], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().position(|b| *b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        }
    };
    let host_ok = host
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b));
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    host_ok && port_ok
}

/// Checks a complete request line (without its line ending) before the rest of the head
/// arrives, so a request that can never be valid is refused at once instead of waiting for a
/// blank line that an HTTP/0.9 or bare-LF client never sends.
fn check_request_line(line: &[u8]) -> Result<(), Refusal> {
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "malformed request line: expected `METHOD target HTTP/1.x` (HTTP/0.9 is not served)",
        ));
    };
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if method.is_empty() || !method.iter().all(token) {
        return Err(bad("invalid method token"));
    }
    if target.is_empty() {
        return Err(bad("empty request target"));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(bad("unsupported HTTP version in the request line"));
    }
    Ok(())
}

/// Parses a chunk-size line (without CRLF): hex digits, then optional `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, Refusal> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() {
        return Err(bad("empty chunk size"));
    }
    // 15 hex digits keep the size below 2^60, far above any real chunk.
    if digits.len() > 15 {
        return Err(bad("chunk size overflow"));
    }
    digits.iter().try_fold(0u64, |n, b| {
        let d = (*b as char)
            .to_digit(16)
            .ok_or(bad("chunk size is not hexadecimal"))?;
        Ok(n * 16 + u64::from(d))
    })
}

/// Wraps a client connection; see the module docs.
#[derive(Debug)]
pub struct H1Guard<S> {
    inner: S,
    framing: Framing,
    /// A head being accumulated.
    head: BytesMut,
    /// Checked bytes for hyper.
    ready: BytesMut,
    /// Raw bytes read but not yet framed.
    pending: BytesMut,
    refusal: Option<Refusal>,
    /// The refusal response, written before shutdown.
    reply: Option<Bytes>,
    /// How long a started head may take to finish.
    head_timeout: Duration,
    /// When the head being read must be complete (set at its first byte).
    head_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> H1Guard<S> {
    /// Guards `inner`; a request head that has started must be complete within `head_timeout`.
    pub fn new(inner: S, head_timeout: Duration) -> Self {
        Self {
            inner,
            framing: Framing::Head,
            head: BytesMut::new(),
            ready: BytesMut::new(),
            pending: BytesMut::new(),
            refusal: None,
            reply: None,
            head_timeout,
            head_deadline: None,
        }
    }

    /// Starts the head timer at a head's first byte, and stops it once the head is whole.
    fn time_head(&mut self) {
        let reading = matches!(self.framing, Framing::Head) && !self.head.is_empty();
        match (reading, self.head_deadline.is_some()) {
            (true, false) => {
                self.head_deadline = Some(Box::pin(tokio::time::sleep(self.head_timeout)));
            }
            (false, true) => self.head_deadline = None,
            _ => {}
        }
    }

    /// Why the connection was refused, if it was.
    #[cfg(test)]
    fn refusal(&self) -> Option<Refusal> {
        self.refusal
    }

    fn refuse(&mut self, r: Refusal) {
        let text = match r.status {
            408 => "Request Timeout",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        };
        let reply = format!(
            "HTTP/1.1 {} {text}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nx-mesh-flags: DPE\r\n\r\n{}\n",
            r.status,
            r.reason.len() + 1,
            r.reason
        );
        tracing::warn!(status = r.status, "refused an HTTP/1 request: {}", r.reason);
        self.refusal = Some(r);
        self.reply = Some(Bytes::from(reply));
        self.pending.clear();
        self.head.clear();
    }

    /// Moves bytes from `pending` to `ready` as far as the framing allows.
    fn frame(&mut self) {
        while !self.pending.is_empty() && self.refusal.is_none() {
            match &mut self.framing {
                Framing::Passthrough => {
                    let all = self.pending.split();
                    take(&mut self.ready, all);
                }
                Framing::Body(n) => {
                    let k = (*n).min(self.pending.len() as u64) as usize;
                    *n -= k as u64;
                    let part = self.pending.split_to(k);
                    take(&mut self.ready, part);
                    if *n == 0 {
                        self.framing = Framing::Head;
                    }
                }
                Framing::ChunkData(n) => {
                    let k = (*n).min(self.pending.len() as u64) as usize;
                    *n -= k as u64;
                    let part = self.pending.split_to(k);
                    take(&mut self.ready, part);
                    if *n == 0 {
                        self.framing = Framing::ChunkEnd(0);
                    }
                }
                Framing::ChunkEnd(seen) => {
                    let want = if *seen == 0 { b'\r' } else { b'\n' };
                    if self.pending[0] != want {
                        self.refuse(bad("chunk data not followed by CRLF"));
                        break;
                    }
                    self.ready.extend_from_slice(&[want]);
                    self.pending.advance(1);
                    if *seen == 1 {
                        self.framing = Framing::ChunkSize(BytesMut::new());
                    } else {
                        *seen = 1;
                    }
                }
                Framing::ChunkSize(line) => {
                    let Some(nl) = self.pending.iter().position(|b| *b == b'\n') else {
                        line.extend_from_slice(&self.pending);
                        self.pending.clear();
                        if line.len() > MAX_CHUNK_LINE {
                            self.refuse(bad("chunk-size line too long"));
                        }
                        break;
                    };
                    line.extend_from_slice(&self.pending[..=nl]);
                    self.pending.advance(nl + 1);
                    let raw = line.split();
                    let Some(text) = raw.strip_suffix(b"\r\n") else {
                        self.refuse(bad("chunk-size line not ended by CRLF"));
                        break;
                    };
                    match chunk_size(text) {
                        Ok(0) => {
                            self.framing = Framing::Trailers { line: 0, total: 0 };
                        }
                        Ok(n) => self.framing = Framing::ChunkData(n),
                        Err(r) => {
                            self.refuse(r);
                            break;
                        }
                    }
                    self.ready.extend_from_slice(&raw);
                }
                Framing::Trailers { line, total } => {
                    let b = self.pending[0];
                    self.pending.advance(1);
                    self.ready.extend_from_slice(&[b]);
                    *total += 1;
                    let too_big = *total > MAX_TRAILERS;
                    // A line holding only CRLF ends the message.
                    let end = b == b'\n' && *line <= 1;
                    if b == b'\n' {
                        *line = 0;
                    } else {
                        *line += 1;
                    }
                    if too_big {
                        self.refuse(Refusal {
                            status: 431,
                            reason: "trailers too large",
                        });
                    } else if end {
                        self.framing = Framing::Head;
                    }
                }
                Framing::Head => {
                    let from = self.head.len().saturating_sub(3);
                    let more = self.pending.split();
                    take(&mut self.head, more);
                    // Every LF must end a CRLF: a bare LF would never make the blank line
                    // this guard waits for, and other parsers read it as a line end.
                    let scan = from.saturating_sub(1);
                    let bare_lf = self.head[scan..].iter().enumerate().any(|(i, b)| {
                        *b == b'\n' && (scan + i == 0 || self.head[scan + i - 1] != b'\r')
                    });
                    if bare_lf {
                        self.refuse(bad("bare LF line ending in the request head"));
                        break;
                    }
                    // The request line, once it is whole (empty lines before it are skipped,
                    // as RFC 9112 §2.2 allows).
                    let start = self.head.iter().position(|b| !matches!(b, b'\r' | b'\n'));
                    if let Some(start) = start
                        && let Some(eol) = self.head[start..].windows(2).position(|w| w == b"\r\n")
                        && let Err(r) = check_request_line(&self.head[start..start + eol])
                    {
                        self.refuse(r);
                        break;
                    }
                    let end = self.head[from..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| from + p + 4);
                    let Some(end) = end else {
                        if self.head.len() > MAX_HEAD {
                            self.refuse(Refusal {
                                status: 431,
                                reason: "request head too large",
                            });
                        }
                        break;
                    };
                    if end > MAX_HEAD {
                        self.refuse(Refusal {
                            status: 431,
                            reason: "request head too large",
                        });
                        break;
                    }
                    let rest = self.head.split_off(end);
                    let head = self.head.split();
                    self.pending = rest;
                    match check_head(&head) {
                        Ok(f) => {
                            self.framing = f;
                            take(&mut self.ready, head);
                        }
                        Err(r) => self.refuse(r),
                    }
                }
            }
        }
    }
}

/// Gives the reader as much of `ready` as it takes, and lets go of the buffer once it is empty,
/// so an idle connection keeps none.
pub(super) fn hand_over(ready: &mut BytesMut, buf: &mut ReadBuf<'_>) {
    let n = ready.len().min(buf.remaining());
    buf.put_slice(&ready[..n]);
    ready.advance(n);
    if ready.is_empty() {
        *ready = BytesMut::new();
    }
}

/// Appends `part` to `to`, without a copy when `to` is empty (the common case).
fn take(to: &mut BytesMut, part: BytesMut) {
    if to.is_empty() {
        *to = part;
    } else {
        to.unsplit(part);
    }
}

/// How much room a body read gets.
const READ_SIZE: usize = 8 * 1024;
/// How much a read between messages takes at once: heads are read through a buffer on the
/// stack, so an idle or stalled connection holds no read buffer of its own.
const HEAD_READ: usize = 2 * 1024;

impl<S: AsyncRead + Unpin> H1Guard<S> {
    /// Reads until checked bytes are ready for hyper, or the connection is refused or ends
    /// (`Ok(false)`: nothing more will come).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if !self.ready.is_empty() {
                return Poll::Ready(Ok(true));
            }
            if self.refusal.is_some() {
                // End of input: hyper finishes and shuts down, and the refusal goes out then.
                return Poll::Ready(Ok(false));
            }
            let read = if matches!(self.framing, Framing::Head) {
                let mut stack = [0u8; HEAD_READ];
                let mut rb = ReadBuf::new(&mut stack);
                match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        self.pending.extend_from_slice(rb.filled());
                        Poll::Ready(Ok(rb.filled().len()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            } else {
                // Straight into `pending`, which `frame` then moves on without copying when it
                // can.
                self.pending.reserve(READ_SIZE);
                tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.pending)
            };
            match read {
                // The client's end of input; a half-read head is simply dropped.
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
                Poll::Ready(Ok(_)) => {
                    self.frame();
                    if self.pending.is_empty() {
                        self.pending = BytesMut::new();
                    }
                    self.time_head();
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if let Some(deadline) = self.head_deadline.as_mut()
                        && deadline.as_mut().poll(cx).is_ready()
                    {
                        self.head_deadline = None;
                        self.refuse(Refusal {
                            status: 408,
                            reason: "the request head was not finished in time",
                        });
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Waits for the first request head to be whole and checked, or refused, or for the
    /// connection to end. The server starts after this, so a client that stalls in its first
    /// head costs the guard's few bytes, not hyper's buffers (16 KiB for each connection).
    pub async fn first_head(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_fill(cx))
            .await
            .map(|_| ())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for H1Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if std::task::ready!(this.poll_fill(cx))? {
            hand_over(&mut this.ready, buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H1Guard<S> {
    super::write_through!(inner);
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while let Some(reply) = this.reply.as_mut() {
            if reply.is_empty() {
                this.reply = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, reply))?;
            if n == 0 {
                this.reply = None;
                break;
            }
            reply.advance(n);
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// How long HTTP/1 clients may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// To finish a request head once its first byte arrived (408 after).
    pub head: Duration,
    /// To start the next request on a connection.
    pub idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            head: Duration::from_secs(10),
            idle: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Feeds `input` through a guard; returns what hyper would read and the refusal written.
    async fn run(input: &[u8]) -> (Vec<u8>, Option<Refusal>, String) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap_or_default();
        client.shutdown().await.unwrap_or_default();
        let mut g = H1Guard::new(server, Duration::from_secs(10));
        let mut passed = Vec::new();
        g.read_to_end(&mut passed).await.unwrap_or_default();
        let refusal = g.refusal();
        g.shutdown().await.unwrap_or_default();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap_or_default();
        (passed, refusal, reply)
    }

    #[tokio::test]
    async fn passes_well_framed_pipelines_whole() {
        let input = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: x\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        let (passed, refusal, reply) = run(input).await;
        assert_eq!(refusal, None);
        assert_eq!(passed, input.to_vec());
        assert!(reply.is_empty());
    }

    #[tokio::test]
    async fn refuses_smuggling_shapes_before_passing_their_head() {
        let first = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let cases: &[(&[u8], u16)] = &[
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        ];
        for (bad_req, status) in cases {
            let mut input = first.clone();
            input.extend_from_slice(bad_req);
            let (passed, refusal, reply) = run(&input).await;
            assert_eq!(passed, first, "{}", String::from_utf8_lossy(bad_req));
            assert_eq!(refusal.map(|r| r.status), Some(*status));
            assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{reply}");
        }
    }

    #[tokio::test]
    async fn refuses_bad_heads_with_400_at_once() {
        let cases: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 request without Host"),
            (
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                "invalid Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x/y\r\n\r\n",
                "invalid Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x:80x\r\n\r\n",
                "invalid Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n",
                "invalid Host header",
            ),
            (
                b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
                "raw non-ASCII or control byte in the request target; percent-encode it",
            ),
            (b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", "invalid method token"),
            (
                b"G\0T / HTTP/1.1\r\nHost: x\r\n\r\n",
                "invalid method token",
            ),
            // No blank line ever comes: these must be refused on their first line, not wait.
            (
                b"GET / HTTP/1.1\nHost: x\n\n",
                "bare LF line ending in the request head",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\n\n",
                "bare LF line ending in the request head",
            ),
            (
                b"GET /\r\n",
                "malformed request line: expected `METHOD target HTTP/1.x` (HTTP/0.9 is not served)",
            ),
            (
                b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
                "unsupported HTTP version in the request line",
            ),
        ];
        for (input, reason) in cases {
            // The client does not close: a refusal must not wait for more input.
            let (mut client, server) = tokio::io::duplex(1 << 16);
            client.write_all(input).await.unwrap_or_default();
            let mut g = H1Guard::new(server, Duration::from_secs(10));
            let mut passed = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(2), g.read_to_end(&mut passed)).await;
            assert!(
                read.is_ok(),
                "waited on {:?}",
                String::from_utf8_lossy(input)
            );
            assert!(passed.is_empty(), "{:?}", String::from_utf8_lossy(input));
            assert_eq!(
                g.refusal(),
                Some(bad(reason)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        // Valid forms still pass: HTTP/1.0 without Host, IPv6 and port hosts, leading CRLF.
        for ok in [
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: svc.ns.svc.cluster.local:80\r\n\r\n",
            b"\r\nGET /a%20b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PROPFIND /dav HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            let (passed, refusal, _) = run(ok).await;
            assert_eq!(refusal, None, "{:?}", String::from_utf8_lossy(ok));
            assert_eq!(passed, ok.to_vec());
        }
    }

    #[tokio::test]
    async fn a_stalled_head_gets_408_and_holds_no_read_buffer() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap_or_default();
        let mut g = H1Guard::new(server, Duration::from_millis(100));
        let mut one = [0u8; 1];
        // Nothing for hyper yet, and no buffer kept beyond the bytes that arrived.
        let early = tokio::time::timeout(Duration::from_millis(30), g.read(&mut one)).await;
        assert!(early.is_err());
        assert_eq!(g.pending.capacity(), 0);
        assert!(g.head.capacity() < 256, "{}", g.head.capacity());
        let started = std::time::Instant::now();
        let mut passed = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), g.read_to_end(&mut passed))
            .await
            .ok();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(passed.is_empty());
        assert_eq!(g.refusal().map(|r| r.status), Some(408));
        g.shutdown().await.unwrap_or_default();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap_or_default();
        assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    }

    #[tokio::test]
    async fn limits_headers_and_chunks() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..10_000 {
            many.extend_from_slice(format!("a{i}: b\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (passed, refusal, _) = run(&many).await;
        assert!(passed.is_empty());
        assert_eq!(refusal.map(|r| r.status), Some(431));

        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        big.extend_from_slice(b"\r\n\r\n");
        let (passed, refusal, _) = run(&big).await;
        assert!(passed.is_empty());
        assert_eq!(refusal.map(|r| r.status), Some(431));

        let head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut overflow = head.to_vec();
        overflow.extend_from_slice(b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n");
        let (passed, refusal, _) = run(&overflow).await;
        assert_eq!(
            passed,
            head.to_vec(),
            "the head passes, the bad chunk does not"
        );
        assert_eq!(refusal, Some(bad("chunk size overflow")));
    }
}
