//! Making sockets inside a pod's network namespace.
//!
//! A socket belongs to the netns it was created in, for life, so the proxy can create a socket in
//! the pod's namespace and then drive it from any tokio thread. Entering a namespace is
//! per-thread (`setns`), and doing it on a tokio worker would leak the namespace into unrelated
//! tasks, so each pod gets one dedicated OS thread that enters its netns once and then serves
//! socket-creation requests over a channel.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use socket2::{Domain, Protocol, Socket, Type};

/// Errors from entering a pod's network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `setns` failed.
    #[error(
        "cannot enter network namespace {path}: {source} (is it a netns file, and is the agent root?)"
    )]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The namespace's worker thread is gone (the pod was removed while a request was queued).
    #[error("network namespace worker for {path} has stopped")]
    Stopped {
        /// The namespace file.
        path: PathBuf,
    },
    /// A socket operation inside the namespace failed.
    #[error("in network namespace {path}: {what}: {source}")]
    Socket {
        /// The namespace file.
        path: PathBuf,
        /// The operation.
        what: String,
        /// Why.
        source: io::Error,
    },
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one network namespace. Dropping the handle stops the thread.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
    cookie: u64,
}

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

impl Netns {
    /// Starts a thread in the namespace at `path` and reads the namespace's cookie.
    pub fn enter(path: &Path, label: &str) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        thread::Builder::new()
            .name(format!("netns-{label}"))
            .spawn(move || {
                // SAFETY: `file` is an open namespace fd; setns only affects this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Enter {
                path: path.to_owned(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                return Err(NetnsError::Enter {
                    path: path.to_owned(),
                    source,
                });
            }
            Err(_) => {
                return Err(NetnsError::Stopped {
                    path: path.to_owned(),
                });
            }
        }
        let mut ns = Self {
            path: path.to_owned(),
            jobs,
            cookie: 0,
        };
        ns.cookie = ns.run_blocking(|path| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)
                .or_else(|_| Socket::new(Domain::IPV6, Type::STREAM, None))
                .map_err(|e| sock_err(path, "socket", e))?;
            netns_cookie(&s).map_err(|e| sock_err(path, "getsockopt(SO_NETNS_COOKIE)", e))
        })??;
        Ok(ns)
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie` reports it in the kernel.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the namespace thread and waits for it (for setup paths, not per connection).
    pub fn run_blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> R + Send + 'static,
    ) -> Result<R, NetnsError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let path = self.path.clone();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f(&path));
            }))
            .map_err(|_| self.stopped())?;
        rx.recv().map_err(|_| self.stopped())
    }

    /// Runs `f` on the namespace thread without blocking the async runtime.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> R + Send + 'static,
    ) -> Result<R, NetnsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let path = self.path.clone();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f(&path));
            }))
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())
    }

    /// A non-blocking TCP socket in this namespace, ready to `connect` from tokio.
    pub async fn tcp_socket(
        &self,
        for_addr: SocketAddr,
    ) -> Result<tokio::net::TcpSocket, NetnsError> {
        let sock = self
            .run(move |path| {
                let domain = Domain::for_address(for_addr);
                let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))
                    .map_err(|e| sock_err(path, "socket", e))?;
                s.set_tcp_nodelay(true)
                    .map_err(|e| sock_err(path, "TCP_NODELAY", e))?;
                Ok::<_, NetnsError>(s)
            })
            .await??;
        let std_stream: std::net::TcpStream = sock.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std_stream))
    }

    /// A listening TCP socket bound to `addr` inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<std::net::TcpListener, NetnsError> {
        self.run_blocking(move |path| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .map_err(|e| sock_err(path, "socket", e))?;
            let ctx = |what: &str| format!("{what} {addr}");
            s.set_reuse_address(true)
                .map_err(|e| sock_err(path, &ctx("SO_REUSEADDR"), e))?;
            // Lets a new agent bind beside an old one during an upgrade.
            s.set_reuse_port(true)
                .map_err(|e| sock_err(path, &ctx("SO_REUSEPORT"), e))?;
            // `[::]` takes both families (a dual-stack pod's inbound listeners); any other
            // IPv6 address only its own.
            if addr.is_ipv6() {
                s.set_only_v6(!addr.ip().is_unspecified())
                    .map_err(|e| sock_err(path, &ctx("IPV6_V6ONLY"), e))?;
            }
            s.bind(&addr.into())
                .map_err(|e| sock_err(path, &ctx("bind"), e))?;
            s.listen(1024)
                .map_err(|e| sock_err(path, &ctx("listen"), e))?;
            s.set_nonblocking(true)
                .map_err(|e| sock_err(path, &ctx("O_NONBLOCK"), e))?;
            Ok(s.into())
        })?
    }

    fn stopped(&self) -> NetnsError {
        NetnsError::Stopped {
            path: self.path.clone(),
        }
    }
}

fn sock_err(path: &Path, what: &str, source: io::Error) -> NetnsError {
    NetnsError::Socket {
        path: path.to_owned(),
        what: what.to_string(),
        source,
    }
}

/// Reads `SO_NETNS_COOKIE` from any socket.
pub fn netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    socket_u64(fd, SO_NETNS_COOKIE)
}

/// Reads a 64-bit `SOL_SOCKET` option (the cookies) from any socket.
pub fn socket_u64(fd: &impl AsRawFd, name: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid out-parameters of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `a` with an IPv4-mapped IPv6 address (what a dual-stack socket from [`Netns::listen`]
/// reports for IPv4) as IPv4.
pub fn canonical(a: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
}
