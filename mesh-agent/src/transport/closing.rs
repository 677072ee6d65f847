//! Ending a TLS connection at a deadline the way TLS means: close_notify, then FIN. A draining
//! agent (see `proxy::drain`) gives its connections until `--drain-timeout`; whatever is still
//! open then must not end in a bare reset or a silent exit, which the peer's TLS reports as a
//! truncation.
//!
//! [`Closing`] sits between hyper and the connection's transport. While the token is not
//! cancelled it passes everything through. Once it is, the next poll shuts the transport down
//! (rustls or kernel TLS writes close_notify, then the socket's FIN) and hyper then reads EOF.
//! hyper always has a read pending on a connection, so the cancellation wakes it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use hyper::rt::{Read, ReadBufCursor, Write};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Where a [`Closing`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    ShuttingDown,
    Closed,
}

/// A connection that closes itself cleanly when its token is cancelled.
#[derive(Debug)]
pub struct Closing<IO> {
    io: IO,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    state: State,
}

impl<IO> Closing<IO> {
    /// Wraps `io`; cancelling `token` closes it.
    pub fn new(io: IO, token: &CancellationToken) -> Self {
        Self {
            io,
            cancelled: Box::pin(token.clone().cancelled_owned()),
            state: State::Open,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: Write + Unpin> Closing<IO> {
    /// Advances the close if the token was cancelled; `Ready` once the connection is closed.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.state {
                State::Open => {
                    ready!(self.cancelled.as_mut().poll(cx));
                    self.state = State::ShuttingDown;
                }
                State::ShuttingDown => {
                    // An error here means the peer is gone already: closed either way.
                    let _ = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
                    self.state = State::Closed;
                }
                State::Closed => return Poll::Ready(()),
            }
        }
    }
}

impl<IO: Read + Write + Unpin> Read for Closing<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_close(cx) {
            // Closed: end of stream.
            Poll::Ready(()) => Poll::Ready(Ok(())),
            Poll::Pending if this.state == State::Open => Pin::new(&mut this.io).poll_read(cx, buf),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: Write + Unpin> Write for Closing<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_close(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Poll::Pending if this.state == State::Open => {
                Pin::new(&mut this.io).poll_write(cx, buf)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state == State::Closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state == State::Closed {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Cancelling shuts the wrapped side down: the peer reads its data, then a clean end of
    /// stream; and the wrapped side reads EOF from then on.
    #[tokio::test]
    async fn cancelling_shuts_down_then_reads_eof() -> io::Result<()> {
        let (a, mut b) = tokio::io::duplex(64);
        let token = CancellationToken::new();
        let mut closing = TokioIo::new(Closing::new(TokioIo::new(a), &token));
        closing.write_all(b"before").await?;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.map(|_| got)
        });
        token.cancel();
        let mut buf = [0u8; 8];
        assert_eq!(closing.read(&mut buf).await?, 0, "EOF once closed");
        assert!(closing.write_all(b"after").await.is_err());
        let got = reader.await.map_err(io::Error::other)??;
        assert_eq!(got, b"before", "the peer got the bytes, then a clean end");
        Ok(())
    }
}
