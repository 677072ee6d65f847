//! Protocol detection on a fresh connection: read the first bytes the client sends, for at most
//! [`DETECT_TIMEOUT`], and decide HTTP/1, HTTP/2 (prior knowledge), TLS or opaque TCP. The bytes
//! read are replayed by [`Rewind`], so whatever handles the connection next sees it whole.
//!
//! A client that sends nothing within the timeout (a server-speaks-first protocol such as SMTP or
//! MySQL) is opaque: it loses the timeout once, then relays as plain TCP. A stream another node
//! declared HTTP waits longer ([`detect_within`]).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long detection waits for the client's first bytes.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(200);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// What the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.0 or 1.1.
    Http1,
    /// HTTP/2 with prior knowledge (gRPC, h2c).
    Http2,
    /// A TLS ClientHello: relayed untouched.
    Tls,
    /// Anything else, or nothing in time.
    Opaque,
}

impl Protocol {
    /// Whether the proxy handles it at L7.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http1 | Self::Http2)
    }
}

/// Decides on the bytes so far; `None` means more bytes could change the answer.
fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return Some(Protocol::Tls);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    let mut undecided = false;
    for m in METHODS {
        let n = buf.len().min(m.len());
        if buf[..n] == m[..n] {
            if n == m.len() {
                return Some(Protocol::Http1);
            }
            undecided = true;
        }
    }
    if undecided {
        return None;
    }
    // Not a method we know: still HTTP/1 if its first line ends in an HTTP version, so a request
    // with an invalid or unusual method (or a NUL in it) reaches the framing guard, which answers
    // 400, instead of being relayed unparsed. Only a text-looking start waits for that line.
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !token(buf[0]) {
        return Some(Protocol::Opaque);
    }
    match buf.iter().position(|b| *b == b'\n') {
        Some(nl) => {
            let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
            let http = line.windows(6).any(|w| w == b" HTTP/");
            Some(if http {
                Protocol::Http1
            } else {
                Protocol::Opaque
            })
        }
        None if buf.len() < MAX_FIRST_LINE => None,
        None => Some(Protocol::Opaque),
    }
}

/// Longest first line detection waits for when the method is not one it knows.
const MAX_FIRST_LINE: usize = 1024;

/// Reads until the protocol is known or [`DETECT_TIMEOUT`] passes. The stream comes back with
/// the bytes read, ready to be replayed.
pub async fn detect<S: AsyncRead + Unpin>(stream: S) -> io::Result<(Protocol, Rewind<S>)> {
    detect_within(stream, DETECT_TIMEOUT).await
}

/// [`detect`] with its own wait, for a stream whose sender said it carries HTTP: there the
/// first bytes are known to be coming, and a slow path must not turn them into opaque TCP.
pub async fn detect_within<S: AsyncRead + Unpin>(
    mut stream: S,
    wait: Duration,
) -> io::Result<(Protocol, Rewind<S>)> {
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + wait;
    let protocol = loop {
        if let Some(p) = classify(&buf) {
            break p;
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => break Protocol::Opaque,
            Ok(Ok(0)) => break Protocol::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    Ok((
        protocol,
        Rewind {
            prefix: buf.freeze(),
            inner: stream,
        },
    ))
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// A stream with nothing to replay.
    pub fn new(inner: S) -> Self {
        Self {
            prefix: Bytes::new(),
            inner,
        }
    }

    /// The bytes still to replay, and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }

    /// Puts back what [`Rewind::into_parts`] took apart.
    pub fn from_parts(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    super::write_through!(inner);
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Protocol::Tls));
        assert_eq!(classify(b"SSH-2.0-x\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Some(Protocol::Opaque)
        );
        // Unknown or invalid methods are HTTP once the line says so, so the guard answers them.
        assert_eq!(classify(b"SSH-2.0"), None);
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"G\0T / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PROPFIND /x HTTP/1.1\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(&[b'A'; 2000]), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn replays_what_it_read_and_times_out_on_silence() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"POST /a HTTP/1.1\r\n")
            .await
            .unwrap_or_default();
        let (p, mut s) = detect(server).await.expect("detect");
        assert_eq!(p, Protocol::Http1);
        let mut got = vec![0; 18];
        s.read_exact(&mut got).await.expect("replay");
        assert_eq!(&got, b"POST /a HTTP/1.1\r\n");

        let (_quiet, server) = tokio::io::duplex(1024);
        let started = std::time::Instant::now();
        let (p, _) = detect(server).await.expect("detect");
        assert_eq!(p, Protocol::Opaque);
        assert!(started.elapsed() >= DETECT_TIMEOUT);
    }

    #[tokio::test]
    async fn a_longer_wait_sees_a_late_request_that_the_default_calls_opaque() {
        let late = DETECT_TIMEOUT * 3;
        for (wait, want) in [
            (DETECT_TIMEOUT, Protocol::Opaque),
            (Duration::from_secs(5), Protocol::Http1),
        ] {
            let (mut client, server) = tokio::io::duplex(1024);
            let writer = tokio::spawn(async move {
                tokio::time::sleep(late).await;
                let _ =
                    tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n").await;
                client
            });
            let (p, _) = detect_within(server, wait).await.expect("detect");
            assert_eq!(p, want, "waiting {wait:?} for bytes sent after {late:?}");
            drop(writer.await);
        }
    }
}
