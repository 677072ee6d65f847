//! The HTTP/2 frame guard: it sits between a client connection and hyper's HTTP/2 server, reads
//! the frame headers going both ways, and handles what the `h2` crate does not:
//! - **floods**: SETTINGS, PING and PRIORITY frames, and empty DATA frames that do not end their
//!   stream, cost a token each from a bucket of [`CONTROL_BURST`] refilled at
//!   [`CONTROL_PER_SECOND`]; an empty bucket ends the connection with GOAWAY
//!   `ENHANCE_YOUR_CALM` (h2 answers every PING and SETTINGS, 100,000 of them, and never says
//!   stop);
//! - **stream errors that h2 takes for connection errors** (RFC 9113 §5.4.2 makes them stream
//!   errors, so the connection's other requests must survive): a WINDOW_UPDATE of 0 on a stream
//!   (`PROTOCOL_ERROR`, §6.9) and DATA on a stream the client already ended (`STREAM_CLOSED`,
//!   §5.1). The guard answers the client with RST_STREAM, and hands hyper a RST_STREAM from the
//!   client in the offending frame's place, so hyper drops that stream alone. The dropped DATA's
//!   bytes counted against the connection's window, which the guard gives back with a
//!   WINDOW_UPDATE.
//!
//! Frames the guard writes itself go out only between two of hyper's frames: it follows the
//! outgoing frame boundaries, and a frame of its own waits until hyper's current one is whole.

use std::{
    collections::HashSet,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Control frames allowed at once.
pub const CONTROL_BURST: f64 = 200.0;
/// Control frames allowed per second after the burst.
pub const CONTROL_PER_SECOND: f64 = 20.0;
/// How long a connection ended for a flood may take to get its GOAWAY out.
const GOAWAY_DEADLINE: Duration = Duration::from_secs(1);
/// Streams remembered as half-closed or reset by the guard; h2 allows 100 concurrent streams.
const MAX_TRACKED: usize = 1024;
const PREFACE_LEN: usize = 24;
const READ_SIZE: usize = 16 * 1024;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;

const PROTOCOL_ERROR: u32 = 0x1;
const STREAM_CLOSED: u32 = 0x5;
/// The GOAWAY code for a peer that floods.
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, stream: u32, payload: &[u8]) -> [u8; 9] {
    let len = (payload.len() as u32).to_be_bytes();
    let s = stream.to_be_bytes();
    [len[1], len[2], len[3], kind, 0, s[0], s[1], s[2], s[3]]
}

fn put_frame(out: &mut BytesMut, kind: u8, stream: u32, payload: &[u8]) {
    out.put_slice(&frame(kind, stream, payload));
    out.put_slice(payload);
}

/// A frame header: payload length, type, flags, stream.
fn header(b: &[u8]) -> (usize, u8, u8, u32) {
    let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
    let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
    (len, b[3], b[4], stream)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// At a frame header.
    Header,
    /// This many payload bytes go on to hyper.
    Pass(usize),
    /// This many payload bytes are dropped.
    Drop(usize),
}

/// Where the outgoing byte stream is: header bytes seen of the current frame, payload left.
#[derive(Debug, Default)]
struct Outbound {
    head: [u8; 9],
    have: usize,
    left: usize,
}

impl Outbound {
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * CONTROL_PER_SECOND;
        self.tokens = (self.tokens + refill).min(CONTROL_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Wraps a client connection to an HTTP/2 server; see the module docs.
#[derive(Debug)]
pub struct H2Guard<S> {
    inner: S,
    /// Read from the client, not yet framed.
    raw: BytesMut,
    /// Framed, for hyper.
    ready: BytesMut,
    preface_left: usize,
    inbound: Inbound,
    outbound: Outbound,
    /// Frames of the guard's own, for the client.
    queue: BytesMut,
    /// Streams the client ended (half-closed remote), until the server ends them too.
    half_closed: HashSet<u32>,
    /// Streams the guard reset.
    reset: HashSet<u32>,
    /// The highest stream the client opened.
    last_stream: u32,
    budget: Bucket,
    /// Set when a flood ends the connection: by then the GOAWAY must be out.
    ending: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> H2Guard<S> {
    /// Guards `inner`, which starts with the client's connection preface.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            preface_left: PREFACE_LEN,
            inbound: Inbound::Header,
            outbound: Outbound::default(),
            queue: BytesMut::new(),
            half_closed: HashSet::new(),
            reset: HashSet::new(),
            last_stream: 0,
            budget: Bucket {
                tokens: CONTROL_BURST,
                at: Instant::now(),
            },
            ending: None,
        }
    }

    fn pass(&mut self, n: usize) {
        let part = self.raw.split_to(n);
        if self.ready.is_empty() {
            self.ready = part;
        } else {
            self.ready.unsplit(part);
        }
    }

    /// Ends `stream` with RST_STREAM `code` both ways: to the client, and to hyper as if the
    /// client had reset it.
    fn reset_stream(&mut self, stream: u32, code: u32) {
        put_frame(&mut self.queue, RST_STREAM, stream, &code.to_be_bytes());
        put_frame(&mut self.ready, RST_STREAM, stream, &code.to_be_bytes());
        self.half_closed.remove(&stream);
        if self.reset.len() >= MAX_TRACKED {
            self.reset.clear();
        }
        self.reset.insert(stream);
    }

    fn flood(&mut self, kind: u8) {
        let mut payload = [0u8; 8];
        payload[..4].copy_from_slice(&self.last_stream.to_be_bytes());
        payload[4..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        put_frame(&mut self.queue, GOAWAY, 0, &payload);
        self.ending = Some(Box::pin(tokio::time::sleep(GOAWAY_DEADLINE)));
        self.raw.clear();
        self.ready.clear();
        tracing::warn!(
            frame_type = kind,
            "HTTP/2 control-frame flood: GOAWAY ENHANCE_YOUR_CALM, connection closed"
        );
    }

    /// Moves what was read from `raw` to `ready`, frame by frame.
    fn frame(&mut self) {
        while !self.raw.is_empty() && self.ending.is_none() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(self.raw.len());
                self.preface_left -= n;
                self.pass(n);
                continue;
            }
            match self.inbound {
                Inbound::Pass(n) => {
                    let k = n.min(self.raw.len());
                    self.pass(k);
                    self.inbound = if k == n {
                        Inbound::Header
                    } else {
                        Inbound::Pass(n - k)
                    };
                }
                Inbound::Drop(n) => {
                    let k = n.min(self.raw.len());
                    self.raw.advance(k);
                    self.inbound = if k == n {
                        Inbound::Header
                    } else {
                        Inbound::Drop(n - k)
                    };
                }
                Inbound::Header => {
                    if self.raw.len() < 9 {
                        break;
                    }
                    let (len, kind, flags, stream) = header(&self.raw[..9]);
                    match kind {
                        WINDOW_UPDATE if stream != 0 && len == 4 => {
                            if self.raw.len() < 13 {
                                break;
                            }
                            let inc = u32::from_be_bytes([
                                self.raw[9],
                                self.raw[10],
                                self.raw[11],
                                self.raw[12],
                            ]) & 0x7fff_ffff;
                            if inc == 0 {
                                self.raw.advance(13);
                                tracing::debug!(stream, "HTTP/2 WINDOW_UPDATE of 0: stream reset");
                                self.reset_stream(stream, PROTOCOL_ERROR);
                                continue;
                            }
                        }
                        DATA if self.half_closed.contains(&stream)
                            || self.reset.contains(&stream) =>
                        {
                            self.raw.advance(9);
                            self.inbound = Inbound::Drop(len);
                            if len > 0 {
                                // The client counted these bytes against the connection's
                                // window; hyper never sees them, so the guard gives them back.
                                let credit = (len as u32).to_be_bytes();
                                put_frame(&mut self.queue, WINDOW_UPDATE, 0, &credit);
                            }
                            if self.half_closed.contains(&stream) {
                                tracing::debug!(
                                    stream,
                                    "HTTP/2 DATA after END_STREAM: stream reset"
                                );
                                self.reset_stream(stream, STREAM_CLOSED);
                            }
                            continue;
                        }
                        HEADERS => {
                            self.last_stream = self.last_stream.max(stream);
                            if flags & END_STREAM != 0 {
                                self.end_stream(stream);
                            }
                        }
                        DATA => {
                            if flags & END_STREAM != 0 {
                                self.end_stream(stream);
                            } else if len == 0 && !self.budget.take() {
                                self.flood(kind);
                                break;
                            }
                        }
                        RST_STREAM => {
                            self.half_closed.remove(&stream);
                        }
                        SETTINGS | PING if flags & ACK != 0 => {}
                        SETTINGS | PING | PRIORITY if !self.budget.take() => {
                            self.flood(kind);
                            break;
                        }
                        _ => {}
                    }
                    self.pass(9);
                    self.inbound = if len == 0 {
                        Inbound::Header
                    } else {
                        Inbound::Pass(len)
                    };
                }
            }
        }
    }

    fn end_stream(&mut self, stream: u32) {
        if self.half_closed.len() >= MAX_TRACKED {
            self.half_closed.clear();
        }
        self.half_closed.insert(stream);
    }

    /// Follows the outgoing frames through `written`: a stream the server ends or resets is
    /// closed both ways.
    fn track(&mut self, mut written: &[u8]) {
        while !written.is_empty() {
            let o = &mut self.outbound;
            if o.left > 0 {
                let k = o.left.min(written.len());
                o.left -= k;
                written = &written[k..];
                continue;
            }
            let k = (9 - o.have).min(written.len());
            o.head[o.have..o.have + k].copy_from_slice(&written[..k]);
            o.have += k;
            written = &written[k..];
            if o.have == 9 {
                let (len, kind, flags, stream) = header(&o.head);
                o.have = 0;
                o.left = len;
                let ends = matches!(kind, HEADERS | DATA) && flags & END_STREAM != 0;
                if ends || kind == RST_STREAM {
                    self.half_closed.remove(&stream);
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> H2Guard<S> {
    /// Writes the guard's own frames, if the outgoing stream is between two frames.
    fn poll_queue(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            if !self.outbound.at_boundary() {
                return Poll::Pending;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.queue))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queue.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for H2Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ending.is_some() {
                // A flood: once the GOAWAY is out, hyper reads the end of the connection.
                return match this.poll_queue(cx) {
                    Poll::Ready(r) => Poll::Ready(r),
                    Poll::Pending => {
                        let late = this
                            .ending
                            .as_mut()
                            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                        if late {
                            Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()))
                        } else {
                            Poll::Pending
                        }
                    }
                };
            }
            if !this.queue.is_empty() {
                // Best effort: the rest goes out with hyper's next write.
                if let Poll::Ready(Err(e)) = this.poll_queue(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if !this.ready.is_empty() {
                super::guard::hand_over(&mut this.ready, buf);
                return Poll::Ready(Ok(()));
            }
            this.raw.reserve(READ_SIZE);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.raw) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {
                    this.frame();
                    if this.raw.is_empty() {
                        this.raw = BytesMut::new();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Guard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.outbound.at_boundary() {
            std::task::ready!(this.poll_queue(cx))?;
        }
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.track(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.outbound.at_boundary() {
            std::task::ready!(this.poll_queue(cx))?;
        }
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let k = left.min(b.len());
            this.track(&b[..k]);
            left -= k;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.outbound.at_boundary() {
            std::task::ready!(this.poll_queue(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.outbound.at_boundary() {
            std::task::ready!(this.poll_queue(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn f(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = frame(kind, stream, payload).to_vec();
        v[4] = flags;
        v.extend_from_slice(payload);
        v
    }

    /// Feeds `input` (after the preface) through a guard; returns what hyper reads and what
    /// the guard writes to the client.
    async fn run(input: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(1 << 22);
        client.write_all(PREFACE).await.unwrap_or_default();
        client.write_all(input).await.unwrap_or_default();
        client.shutdown().await.unwrap_or_default();
        let mut g = H2Guard::new(server);
        let mut passed = Vec::new();
        g.read_to_end(&mut passed).await.unwrap_or_default();
        g.shutdown().await.unwrap_or_default();
        drop(g);
        let mut written = Vec::new();
        client.read_to_end(&mut written).await.unwrap_or_default();
        (passed, written)
    }

    #[tokio::test]
    async fn passes_well_formed_frames_untouched() {
        let mut input = f(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
        input.extend(f(HEADERS, 0x4, 1, b"hpack"));
        input.extend(f(DATA, 0, 1, &[9; 5000]));
        input.extend(f(DATA, END_STREAM, 1, b"end"));
        input.extend(f(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes()));
        input.extend(f(PING, 0, 0, &[1; 8]));
        let (passed, written) = run(&input).await;
        assert_eq!(&passed[..24], PREFACE);
        assert_eq!(&passed[24..], &input[..]);
        assert!(written.is_empty());
    }

    #[tokio::test]
    async fn a_window_update_of_zero_resets_its_stream_only() {
        let mut input = f(HEADERS, 0x5, 1, b"a");
        input.extend(f(WINDOW_UPDATE, 0, 1, &0u32.to_be_bytes()));
        input.extend(f(HEADERS, 0x5, 3, b"b"));
        let (passed, written) = run(&input).await;
        let mut want = PREFACE.to_vec();
        want.extend(f(HEADERS, 0x5, 1, b"a"));
        want.extend(f(RST_STREAM, 0, 1, &PROTOCOL_ERROR.to_be_bytes()));
        want.extend(f(HEADERS, 0x5, 3, b"b"));
        assert_eq!(passed, want);
        assert_eq!(written, f(RST_STREAM, 0, 1, &PROTOCOL_ERROR.to_be_bytes()));
    }

    #[tokio::test]
    async fn data_after_end_stream_resets_its_stream_and_returns_the_window() {
        let mut input = f(HEADERS, 0x5, 1, b"a");
        input.extend(f(DATA, 0, 1, b"late"));
        input.extend(f(DATA, 0, 1, b"later"));
        input.extend(f(HEADERS, 0x5, 3, b"b"));
        let (passed, written) = run(&input).await;
        let mut want = PREFACE.to_vec();
        want.extend(f(HEADERS, 0x5, 1, b"a"));
        want.extend(f(RST_STREAM, 0, 1, &STREAM_CLOSED.to_be_bytes()));
        want.extend(f(HEADERS, 0x5, 3, b"b"));
        assert_eq!(passed, want);
        let mut out = f(WINDOW_UPDATE, 0, 0, &4u32.to_be_bytes());
        out.extend(f(RST_STREAM, 0, 1, &STREAM_CLOSED.to_be_bytes()));
        out.extend(f(WINDOW_UPDATE, 0, 0, &5u32.to_be_bytes()));
        assert_eq!(written, out);
        // Once the server has ended the stream as well, the guard forgets it.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut g = H2Guard::new(server);
        g.end_stream(7);
        g.write_all(&f(DATA, END_STREAM, 7, b"bye"))
            .await
            .unwrap_or_default();
        assert!(g.half_closed.is_empty());
        drop(client.shutdown().await);
    }

    #[tokio::test]
    async fn floods_get_goaway_enhance_your_calm() {
        for (kind, flags, payload) in [
            (SETTINGS, 0, &[][..]),
            (PING, 0, &[0; 8][..]),
            (PRIORITY, 0, &[0, 0, 0, 0, 16][..]),
            (DATA, 0, &[][..]),
        ] {
            let stream = if kind == PRIORITY || kind == DATA {
                1
            } else {
                0
            };
            let mut input = f(HEADERS, 0x4, 1, b"a");
            for _ in 0..10_000 {
                input.extend(f(kind, flags, stream, payload));
            }
            let (passed, written) = run(&input).await;
            let frames = passed.len().saturating_sub(24 + 10) / (9 + payload.len());
            assert!(
                frames <= CONTROL_BURST as usize + 5,
                "type {kind}: {frames} frames reached hyper"
            );
            let mut goaway = [0u8; 8];
            goaway[..4].copy_from_slice(&1u32.to_be_bytes());
            goaway[4..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
            assert_eq!(written, f(GOAWAY, 0, 0, &goaway), "type {kind}");
        }
        // ACKs are answers, not requests: they cost nothing.
        let acks: Vec<u8> = (0..10_000).flat_map(|_| f(SETTINGS, ACK, 0, &[])).collect();
        let (passed, written) = run(&acks).await;
        assert_eq!(passed.len(), 24 + acks.len());
        assert!(written.is_empty());
    }

    #[tokio::test]
    async fn its_own_frames_wait_for_the_end_of_the_servers_frame() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut g = H2Guard::new(server);
        // The server has written half a DATA frame when the guard queues a frame of its own.
        let data = f(DATA, 0, 1, &[5; 100]);
        g.write_all(&data[..50]).await.unwrap_or_default();
        put_frame(&mut g.queue, RST_STREAM, 3, &PROTOCOL_ERROR.to_be_bytes());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(g.poll_queue(&mut cx).is_pending());
        g.write_all(&data[50..]).await.unwrap_or_default();
        g.write_all(&f(PING, ACK, 0, &[0; 8]))
            .await
            .unwrap_or_default();
        g.shutdown().await.unwrap_or_default();
        drop(g);
        let mut written = Vec::new();
        client.read_to_end(&mut written).await.unwrap_or_default();
        let mut want = data.clone();
        want.extend(f(RST_STREAM, 0, 3, &PROTOCOL_ERROR.to_be_bytes()));
        want.extend(f(PING, ACK, 0, &[0; 8]));
        assert_eq!(written, want);
    }
}
