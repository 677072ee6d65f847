//! The same-node fast path. Once a same-node L4 connection is authorized, the proxy hands its two
//! sockets (the client's, accepted on 15001, and the one it opened to the application) to the
//! kernel, which moves their bytes from then on (`bpf::SpliceTable`, `mesh_splice_verdict`). The
//! proxy only watches for the ends of the two streams and passes each FIN on.
//!
//! Invariants:
//! - Bytes protocol detection already read, and whatever else the client's socket holds, are
//!   written to the application before the pair is activated, so they precede everything the
//!   kernel moves, and no partly read skb is left for the kernel to send again.
//! - After activation the proxy neither reads from nor writes data to either socket. Both leave
//!   tokio's reactor, and a separate epoll instance watches them for end of stream and errors
//!   only (`EPOLLRDHUP`, one-shot): the kernel's per-message wake-ups do not reach it, so an
//!   active spliced connection costs the proxy no wake-ups at all.
//! - A FIN is passed on (the other socket's write side shut) only once that socket has taken in
//!   every byte the kernel moved into it, so nothing in flight is cut off.

use std::{
    collections::HashMap,
    io,
    net::{Shutdown, TcpStream as StdTcpStream},
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;

use tokio::{
    io::{AsyncWriteExt, unix::AsyncFd},
    net::TcpStream,
    sync::oneshot,
};
use tracing::{debug, error};

use crate::{
    capture::bpf::{SplicePair, SpliceTable},
    protocol::detect::Rewind,
};

/// Splices same-node connections; one per agent.
#[derive(Debug)]
pub struct Splicer {
    table: SpliceTable,
    after_bytes: u64,
    epoll: AsyncFd<OwnedFd>,
    /// Who waits for an event on which socket (by cookie).
    waiters: Mutex<HashMap<u64, oneshot::Sender<()>>>,
}

/// A connection the kernel is moving.
#[derive(Debug)]
pub struct Splice {
    splicer: Arc<Splicer>,
    pair: SplicePair,
    /// The client's socket.
    a: StdTcpStream,
    /// The application's socket.
    b: StdTcpStream,
    /// Bytes the proxy itself wrote to the application (what detection had read, and what
    /// was queued before the kernel took over).
    prefix: u64,
    /// Bytes the proxy itself copied from the application to the client (see `taken`).
    copied_down: u64,
    /// [`written_mark`] of (a, b) when the kernel took over.
    marks: (u64, u64),
    /// Whether the kernel took (a, b). A socket it did not take had its peer's FIN already
    /// (say, a server that answers and closes at once); the proxy copies what it holds.
    taken: (bool, bool),
}

/// Why a connection was not spliced: the caller relays it itself. Nothing was moved yet.
#[derive(Debug)]
pub struct Declined {
    /// The client's stream, with whatever detection read still to replay.
    pub client: Rewind<TcpStream>,
    /// The application's stream.
    pub app: TcpStream,
    /// What failed.
    pub why: io::Error,
}

impl Splicer {
    /// Starts the splicer's watch task on the current runtime. Connections are handed to the
    /// kernel once they have moved `after_bytes` (see `--same-node-splice-after-bytes`).
    pub fn start(table: SpliceTable, after_bytes: u64) -> io::Result<Arc<Self>> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let splicer = Arc::new(Self {
            table,
            after_bytes,
            // SAFETY: the AsyncFd owns the only handle to `fd`, which stays open while registered.
            epoll: unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(|e| io::Error::other(e.to_string()))?,
            waiters: Mutex::new(HashMap::new()),
        });
        tokio::spawn(splicer.clone().watch());
        Ok(splicer)
    }

    /// Bytes a same-node connection moves through the proxy before it is spliced.
    pub fn after_bytes(&self) -> u64 {
        self.after_bytes
    }

    /// Hands each socket event to its waiter.
    async fn watch(self: Arc<Self>) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        loop {
            let mut ready = match self.epoll.readable().await {
                Ok(r) => r,
                Err(e) => {
                    error!("splice watch stopped: {e}; spliced connections will not close");
                    return;
                }
            };
            // SAFETY: a valid epoll fd and an event buffer of the length given.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.get_ref().as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    0,
                )
            };
            let n = usize::try_from(n).unwrap_or(0);
            if n < events.len() {
                ready.clear_ready();
            }
            let mut waiters = self.waiters.lock();
            for ev in &events[..n] {
                if let Some(tx) = waiters.remove(&{ ev.u64 }) {
                    let _ = tx.send(());
                }
            }
        }
    }

    /// Arms a one-shot watch of `fd` (socket `cookie`) for `interest` plus errors and hang-ups.
    fn arm(
        &self,
        fd: RawFd,
        cookie: u64,
        interest: u32,
        add: bool,
    ) -> io::Result<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().insert(cookie, tx);
        let mut ev = libc::epoll_event {
            events: interest | libc::EPOLLONESHOT as u32,
            u64: cookie,
        };
        let op = if add {
            libc::EPOLL_CTL_ADD
        } else {
            libc::EPOLL_CTL_MOD
        };
        // SAFETY: valid fds and event.
        let rc = unsafe { libc::epoll_ctl(self.epoll.get_ref().as_raw_fd(), op, fd, &raw mut ev) };
        if rc != 0 {
            self.waiters.lock().remove(&cookie);
            return Err(io::Error::last_os_error());
        }
        Ok(rx)
    }

    /// Splices `client` and `app` if the kernel takes them.
    pub async fn splice(
        self: &Arc<Self>,
        client: Rewind<TcpStream>,
        mut app: TcpStream,
    ) -> Result<Splice, NotSpliced> {
        let (prefix, a) = client.into_parts();
        let pair = match self.table.prepare(a.as_fd(), app.as_fd()) {
            Ok(p) => p,
            Err(why) => {
                return Err(NotSpliced::Declined(Declined {
                    client: Rewind::from_parts(prefix, a),
                    app,
                    why,
                }));
            }
        };
        // From here on the pair is in the maps; `Splice`'s drop takes it out again.
        // Both ways: a relay may have read part of an skb on either side before handing off.
        let mut a = a;
        let mut forwarded = (0, 0);
        let streams = async {
            forwarded.0 = forward_queued(&a, &mut app, &prefix).await?;
            forwarded.1 = forward_queued(&app, &mut a, &[]).await?;
            Ok::<_, io::Error>(())
        }
        .await
        .and_then(|()| Ok((forwarded, a.into_std()?, app.into_std()?)));
        let ((forwarded, copied_down), a, b) = match streams {
            Ok(x) => x,
            Err(e) => {
                self.table.release(pair);
                return Err(NotSpliced::Failed(e));
            }
        };
        let marks = written_mark(&a).and_then(|ma| Ok((ma, written_mark(&b)?)));
        let mut splice = Splice {
            splicer: self.clone(),
            pair,
            a,
            b,
            prefix: forwarded,
            copied_down,
            marks: (0, 0),
            taken: (false, false),
        };
        splice.marks = marks.map_err(NotSpliced::Failed)?;
        splice.taken = self
            .table
            .activate(pair, splice.a.as_fd(), splice.b.as_fd())
            .map_err(NotSpliced::Failed)?;
        Ok(splice)
    }
}

/// Writes `prefix` and then everything `client` has queued to `app`; returns the bytes written.
///
/// The verdict takes whole skbs (`tcp_read_skb`) regardless of how much of one was already
/// read, so an skb detection read a part of would reach the application twice. Reading until
/// the queue is empty leaves none; what arrives later comes in fresh skbs. The reads go to the
/// socket directly: tokio's cached readiness could say "nothing" while bytes wait.
async fn forward_queued(client: &TcpStream, app: &mut TcpStream, prefix: &[u8]) -> io::Result<u64> {
    app.write_all(prefix).await?;
    let mut total = prefix.len() as u64;
    let mut buf = vec![0u8; 64 << 10];
    while let Some(n) = recv_now(client.as_raw_fd(), &mut buf)? {
        if n == 0 {
            break;
        }
        app.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    Ok(total)
}

/// One non-blocking read from the socket itself; `None` when it has nothing now.
fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: a valid socket and a buffer of the length given.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if let Ok(n) = usize::try_from(n) {
            return Ok(Some(n));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => {}
            _ => return Err(e),
        }
    }
}

/// Why [`Splicer::splice`] returned no splice.
#[derive(Debug)]
pub enum NotSpliced {
    /// The kernel did not take the pair (its maps are full); relay the connection instead.
    Declined(Declined),
    /// The connection broke while being spliced; it is gone.
    Failed(io::Error),
}

/// `TCP_INFO`'s connection state after a FIN came in (`include/net/tcp_states.h`):
/// CLOSE_WAIT, LAST_ACK, CLOSING and TIME_WAIT.
const FIN_RECEIVED: [u8; 4] = [8, 9, 11, 6];
/// `TCP_CLOSE`: fully closed, or reset (then the socket has an error).
const TCP_CLOSE: u8 = 7;

fn tcp_info(s: &StdTcpStream) -> io::Result<libc::tcp_info> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialized, then filled by the kernel; all fields are integers.
    Ok(unsafe { info.assume_init() })
}

fn queue_ioctl(s: &StdTcpStream, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: a valid socket and an int out-parameter.
    if unsafe { libc::ioctl(s.as_raw_fd(), request, &raw mut n) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// A mark that grows by one for every byte written into `s`, whether sent or still queued:
/// what the peer acknowledged plus the send queue (`SIOCOUTQ`). Only differences mean anything
/// (`tcpi_bytes_acked` counts the SYN on one side of a connection and not the other).
fn written_mark(s: &StdTcpStream) -> io::Result<u64> {
    let acked = tcp_info(s)?.tcpi_bytes_acked;
    Ok(acked + queue_ioctl(s, libc::TIOCOUTQ)?)
}

/// Received bytes the verdict has not taken yet (`SIOCINQ`, which leaves the FIN out).
fn unread(s: &StdTcpStream) -> io::Result<u64> {
    queue_ioctl(s, libc::FIONREAD)
}

/// What one watched event meant for a socket.
#[derive(Debug)]
enum Event {
    /// The peer sent its FIN.
    Eof,
    /// Reset, or an error.
    Broken(io::Error),
    /// Nothing new (a wake-up the level check did not confirm).
    Nothing,
}

fn classify(s: &StdTcpStream) -> Event {
    if let Ok(Some(e)) = s.take_error() {
        return Event::Broken(e);
    }
    match tcp_info(s) {
        Err(e) => Event::Broken(e),
        // Closed without an error: FIN both ways (a socket leaves TIME_WAIT to a stand-in).
        Ok(i) if FIN_RECEIVED.contains(&i.tcpi_state) || i.tcpi_state == TCP_CLOSE => Event::Eof,
        Ok(_) => Event::Nothing,
    }
}

impl Splice {
    /// Waits until both directions have ended, passing each FIN on. An error means a socket
    /// broke; dropping the splice then closes both.
    pub async fn run(&mut self) -> io::Result<()> {
        let rdhup = libc::EPOLLRDHUP as u32;
        let sp = self.splicer.clone();
        let (a_fd, b_fd) = (self.a.as_raw_fd(), self.b.as_raw_fd());
        // A socket the kernel did not take has its whole input queued: copy it, pass the FIN.
        let (mut a_eof, mut b_eof) = (!self.taken.0, !self.taken.1);
        if b_eof {
            self.copied_down = copy_rest(&self.b, &self.a).await?;
            self.a.shutdown(Shutdown::Write)?;
        }
        if a_eof {
            self.prefix += copy_rest(&self.a, &self.b).await?;
            self.b.shutdown(Shutdown::Write)?;
        }
        if a_eof && b_eof {
            return Ok(());
        }
        let mut rx_a = Some(sp.arm(a_fd, self.pair.a, if a_eof { 0 } else { rdhup }, true)?);
        let mut rx_b = Some(sp.arm(b_fd, self.pair.b, if b_eof { 0 } else { rdhup }, true)?);
        loop {
            let a_side = tokio::select! {
                r = async { rx_a.as_mut().expect("armed").await }, if rx_a.is_some() => {
                    rx_a = None;
                    r.map_err(|_| io::Error::other("splice watch stopped"))?;
                    true
                }
                r = async { rx_b.as_mut().expect("armed").await }, if rx_b.is_some() => {
                    rx_b = None;
                    r.map_err(|_| io::Error::other("splice watch stopped"))?;
                    false
                }
            };
            let (sock, fd, cookie, eof, other_eof) = if a_side {
                (&self.a, a_fd, self.pair.a, &mut a_eof, b_eof)
            } else {
                (&self.b, b_fd, self.pair.b, &mut b_eof, a_eof)
            };
            if *eof {
                // After its FIN, a socket is only watched for hang-up and errors; either, with
                // the other direction still open, means it is gone.
                return if other_eof {
                    Ok(())
                } else {
                    Err(io::Error::from(io::ErrorKind::ConnectionReset))
                };
            }
            let ev = classify(sock);
            debug!(a_side, eof = *eof, event = ?ev, "splice event");
            let interest = match ev {
                Event::Broken(e) => return Err(e),
                Event::Nothing => rdhup,
                Event::Eof => {
                    *eof = true;
                    let (to, cookie, base) = if a_side {
                        (&self.b, self.pair.a, self.marks.1)
                    } else {
                        (&self.a, self.pair.b, self.marks.0)
                    };
                    pass_fin(&self.splicer.table, sock, cookie, to, base).await?;
                    if other_eof {
                        return Ok(());
                    }
                    0
                }
            };
            let rx = sp.arm(fd, cookie, interest, false)?;
            if a_side {
                rx_a = Some(rx);
            } else {
                rx_b = Some(rx);
            }
        }
    }

    /// Bytes moved so far: (client to application, application to client).
    pub fn totals(&self) -> (u64, u64) {
        let moved = |c| self.splicer.table.moved(c).unwrap_or(0);
        (
            self.prefix + moved(self.pair.a),
            self.copied_down + moved(self.pair.b),
        )
    }
}

/// Copies what `from` still holds (its peer has sent its FIN, so all of it is queued) into
/// `to`. Neither socket is in tokio's reactor any more, so waits are short sleeps; this only
/// runs for connections whose one side ended before the splice was made.
async fn copy_rest(from: &StdTcpStream, to: &StdTcpStream) -> io::Result<u64> {
    let retry = || tokio::time::sleep(Duration::from_millis(1));
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match recv_now(from.as_raw_fd(), &mut buf)? {
            Some(0) => return Ok(total),
            Some(n) => n,
            None => {
                retry().await;
                continue;
            }
        };
        let mut at = 0;
        while at < n {
            // SAFETY: a valid socket and the unsent part of the buffer.
            let w = unsafe {
                libc::send(
                    to.as_raw_fd(),
                    buf[at..n].as_ptr().cast(),
                    n - at,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            match usize::try_from(w) {
                Ok(w) => at += w,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock
                        && e.kind() != io::ErrorKind::Interrupted
                    {
                        return Err(e);
                    }
                    retry().await;
                }
            }
        }
        total += n as u64;
    }
}

/// Passes on the FIN `from` (socket `cookie`) received: shuts `to`'s write side once `to` has
/// taken in every byte the kernel moved out of `from`. Two waits, both usually already over:
/// the FIN wakes us possibly before the verdict has run over the last bytes before it (another
/// CPU), and the kernel writes moved bytes into `to` from a work queue.
async fn pass_fin(
    table: &SpliceTable,
    from: &StdTcpStream,
    cookie: u64,
    to: &StdTcpStream,
    to_base: u64,
) -> io::Result<()> {
    let mut pause = Duration::from_micros(20);
    let mut wait = |s: &StdTcpStream| {
        if let Event::Broken(e) = classify(s) {
            return Err(e);
        }
        let p = pause;
        pause = (pause * 2).min(Duration::from_millis(20));
        Ok(tokio::time::sleep(p))
    };
    while unread(from)? > 0 {
        wait(from)?.await;
    }
    let moved = table.moved(cookie)?;
    while written_mark(to)? - to_base < moved {
        wait(to)?.await;
    }
    debug!(moved, "FIN passed on");
    to.shutdown(Shutdown::Write)
}

impl Drop for Splice {
    fn drop(&mut self) {
        self.splicer.table.release(self.pair);
        let mut waiters = self.splicer.waiters.lock();
        waiters.remove(&self.pair.a);
        waiters.remove(&self.pair.b);
        debug!(a = self.pair.a, b = self.pair.b, "splice taken apart");
    }
}
