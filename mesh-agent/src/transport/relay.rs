//! Copying bytes both ways between two connections, with no buffer held by an idle one.
//!
//! `tokio::io::copy_bidirectional` gives every connection two 8 KiB buffers for its whole life,
//! which on a node holding thousands of idle keep-alive connections is most of the proxy's
//! memory, and it reads at most 8 KiB per call. Here each direction reads into a scratch
//! buffer owned by the worker thread, writes what it read straight on, and keeps a heap copy
//! only of what the writer would not take yet. So:
//! - an idle connection (nothing read and unwritten) holds no buffer at all;
//! - a read takes up to [`SCRATCH`] bytes, so bulk transfers make fewer, larger syscalls;
//! - a slow writer holds at most one read's worth per direction, and reading from that side
//!   stops until it drains (back-pressure, as before).
//!
//! The scratch buffer is borrowed only inside one synchronous `poll`, never across an await,
//! so one per thread serves every connection the thread polls.

use std::{
    cell::RefCell,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes a single read may take.
pub const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Runs `f` with the worker thread's [`SCRATCH`]-byte buffer. Callers borrow it only inside
/// one synchronous poll; should a poll ever nest inside another on the same thread, the inner
/// one gets a buffer of its own, so this stays correct.
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut vec![0; SCRATCH]),
    })
}

/// One direction's state.
#[derive(Debug, Default)]
struct Half {
    /// Read but not yet written, and how much of it is written.
    unwritten: Option<(Vec<u8>, usize)>,
    /// Written since the last flush.
    needs_flush: bool,
    /// The reader reached its end.
    eof: bool,
    /// The writer was shut down after `eof`.
    done: bool,
    /// Bytes written in this direction.
    total: u64,
}

impl Half {
    /// Moves bytes from `r` to `w` until one of them is not ready or this direction is done.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.total));
            }
            // Finish what an earlier read left before reading more.
            if let Some((buf, at)) = &mut self.unwritten {
                match Pin::new(&mut *w).poll_write(cx, &buf[*at..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        *at += n;
                        self.total += n as u64;
                        self.needs_flush = true;
                        if *at == buf.len() {
                            self.unwritten = None;
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            match self.read_through(cx, r, w) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read now: push out what was written before waiting.
                    if self.needs_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// One read into the thread's scratch buffer, written on at once; what the writer does not
    /// take is copied to `unwritten`.
    fn read_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        with_scratch(|space| {
            let mut rb = ReadBuf::new(space);
            ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
            let data = rb.filled();
            if data.is_empty() {
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            let written = match Pin::new(&mut *w).poll_write(cx, data) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            };
            self.total += written as u64;
            self.needs_flush |= written > 0;
            if written < data.len() {
                self.unwritten = Some((data[written..].to_vec(), 0));
            }
            Poll::Ready(Ok(()))
        })
    }
}

/// Copies `a`→`b` and `b`→`a` until both directions reach their end (each shuts its writer
/// down when its reader ends), or one fails. Returns the bytes copied `a`→`b` and `b`→`a`.
pub async fn copy_both<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match copy_both_until(a, b, None).await? {
        Relayed::Ended(x, y) => Ok((x, y)),
        Relayed::HandOff => unreachable!("no hand-off without a limit"),
    }
}

/// How [`copy_both_until`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Relayed {
    /// Both directions ended; the bytes copied `a`→`b` and `b`→`a`.
    Ended(u64, u64),
    /// The limit was reached at a quiet point: nothing read is left unwritten, neither side has
    /// ended, and neither has bytes ready. The caller may hand the connection on.
    HandOff,
}

/// [`copy_both`], but stops at the first quiet point once `hand_off_after` bytes (both ways
/// together) have been copied.
pub async fn copy_both_until<A, B>(
    a: &mut A,
    b: &mut B,
    hand_off_after: Option<u64>,
) -> io::Result<Relayed>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    CopyBoth {
        a,
        b,
        a_to_b: Half::default(),
        b_to_a: Half::default(),
        hand_off_after,
    }
    .await
}

struct CopyBoth<'a, A: ?Sized, B: ?Sized> {
    a: &'a mut A,
    b: &'a mut B,
    a_to_b: Half,
    b_to_a: Half,
    hand_off_after: Option<u64>,
}

impl Half {
    /// Open, with nothing read left unwritten.
    fn quiet(&self) -> bool {
        self.unwritten.is_none() && !self.eof && !self.done
    }
}

impl<A, B> Future for CopyBoth<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    type Output = io::Result<Relayed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let ab = this.a_to_b.poll_copy(cx, &mut *this.a, &mut *this.b)?;
        let ba = this.b_to_a.poll_copy(cx, &mut *this.b, &mut *this.a)?;
        match (ab, ba) {
            (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready(Ok(Relayed::Ended(x, y))),
            (Poll::Pending, Poll::Pending)
                if this.hand_off_after.is_some_and(|limit| {
                    this.a_to_b.total + this.b_to_a.total >= limit
                        && this.a_to_b.quiet()
                        && this.b_to_a.quiet()
                }) =>
            {
                Poll::Ready(Ok(Relayed::HandOff))
            }
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Bytes both ways through the relay arrive whole and in order, including a transfer much
    /// larger than the pipes' capacity (so writes are partial and the leftover path runs), and
    /// each side's end is passed on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_both_ways_through_partial_writes_and_passes_on_the_end() {
        // Small pipes force `poll_write` to take part of a read, or nothing.
        let (client, mut proxy_a) = duplex(1000);
        let (mut proxy_b, server) = duplex(777);
        let relay = tokio::spawn(async move { copy_both(&mut proxy_a, &mut proxy_b).await });
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                w.write_all(&up2).await.expect("test io");
                w.shutdown().await.expect("test io");
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("test io");
            writer.await.expect("test io");
            got
        });
        let (mut r, mut w) = tokio::io::split(server);
        let writer = tokio::spawn(async move {
            w.write_all(&down2).await.expect("test io");
            w.shutdown().await.expect("test io");
        });
        let mut got_up = Vec::new();
        r.read_to_end(&mut got_up).await.expect("test io");
        writer.await.expect("test io");
        let got_down = client_side.await.expect("test io");
        assert!(got_up == up, "client→server bytes differ");
        assert!(got_down == down, "server→client bytes differ");
        let (ab, ba) = relay.await.expect("relay task").expect("relay");
        assert_eq!((ab, ba), (up.len() as u64, down.len() as u64));
    }

    /// Past its limit, the relay hands off only at a quiet point: with a stuck writer holding
    /// a leftover it keeps going, and once that is written it stops with every byte delivered
    /// and none held.
    #[tokio::test]
    async fn hands_off_only_once_nothing_read_is_unwritten() {
        let (mut client, mut a) = duplex(4096);
        let (mut b, mut server) = duplex(16);
        client.write_all(&[9; 64]).await.expect("test io");
        let mut relay = Box::pin(copy_both_until(&mut a, &mut b, Some(10)));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // 16 bytes reach the server's pipe; 48 are left over, so no hand-off yet.
        assert!(relay.as_mut().poll(&mut cx).is_pending());
        let mut got = vec![0; 64];
        server.read_exact(&mut got[..16]).await.expect("test io");
        assert!(relay.as_mut().poll(&mut cx).is_pending(), "32 still held");
        server.read_exact(&mut got[16..32]).await.expect("test io");
        assert!(relay.as_mut().poll(&mut cx).is_pending(), "16 still held");
        server.read_exact(&mut got[32..48]).await.expect("test io");
        match relay.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(Relayed::HandOff)) => {}
            other => panic!("expected a hand-off, got {other:?}"),
        }
        server.read_exact(&mut got[48..]).await.expect("test io");
        assert_eq!(got, vec![9; 64]);
    }

    /// An idle relay holds no copy of anything; one whose writer is stuck holds at most one
    /// read's worth.
    #[tokio::test]
    async fn idle_relay_holds_no_buffer_and_a_stuck_writer_at_most_one_read() {
        let (mut a_far, mut a) = duplex(64);
        let (mut b, _b_far) = duplex(16);
        let mut half = Half::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(half.poll_copy(&mut cx, &mut a, &mut b).is_pending());
        assert!(half.unwritten.is_none(), "idle: nothing held");
        a_far.write_all(&[7; 64]).await.expect("test io");
        assert!(half.poll_copy(&mut cx, &mut a, &mut b).is_pending());
        // 16 bytes fit the far pipe; the other 48 wait in the leftover, and no more is read.
        let held = half.unwritten.as_ref().map(|(v, at)| v.len() - at);
        assert_eq!(held, Some(48));
        assert_eq!(half.total, 16);
    }
}
