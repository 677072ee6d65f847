//! Handing the listening sockets of a running agent to its successor, so an upgrade refuses no
//! connect: the successor accepts on the very sockets the kernel already steers to.
//!
//! Protocol, over a `SOCK_SEQPACKET` Unix socket at `--handover-socket` (one message per send,
//! so names and descriptors never split):
//! 1. the successor connects and sends `Hello`;
//! 2. the running agent answers with `Sockets` messages (names, with the listeners as
//!    `SCM_RIGHTS`), the last one marked;
//! 3. the successor accepts on them, enrolls its pods and, once ready, sends `Serving`;
//! 4. only then does the running agent stop accepting, and it drains what it had.
//!
//! Invariants:
//! - Until `Serving` the running agent keeps accepting: both processes accept on the same
//!   sockets, and each serves what it accepted, so a successor that fails at start costs nothing.
//! - A name carries the pod and its network namespace's inode, so a pod recreated in between
//!   never gets its predecessor's sockets.
//! - Sockets the successor does not take (pods that left meanwhile) are closed once it serves.
//! - Both ends check the other's user (`SO_PEERCRED`), so only the agent's own user gives or
//!   takes the node's sockets, even where the socket file's mode or its directory is looser.

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut},
    mem::MaybeUninit,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType, sockopt,
};
use serde::{Deserialize, Serialize};

/// Version of the messages below; a successor speaking another is refused, and starts on its
/// own sockets.
const VERSION: u32 = 1;
/// Descriptors per message (the kernel allows 253).
const FDS_PER_MESSAGE: usize = 200;
/// Largest message: the names of [`FDS_PER_MESSAGE`] sockets.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long either side waits for the other during the exchange of sockets.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the handover; each leaves both agents as they were.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The socket could not be created, bound or reached.
    #[error(
        "handover socket {path}: {what}: {source} (the directory must be writable and on a local filesystem; in Kubernetes, the hostPath /run/mesh-agent)"
    )]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The other agent broke the protocol or went away mid-exchange.
    #[error(
        "handover with the agent at {path}: {problem} (the successor starts on its own sockets; connects between the two are refused)"
    )]
    Protocol {
        /// The socket's path.
        path: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

/// One message.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello { version: u32 },
    Sockets { names: Vec<String>, last: bool },
    Serving,
    Refused { why: String },
}

/// The name of one of a pod's listeners: pod, netns inode, role.
pub fn pod_socket(pod: &str, netns_inode: u64, role: &str) -> String {
    format!("pod/{pod}/{netns_inode}/{role}")
}

/// Sends one message with `fds` attached.
fn send(sock: &OwnedFd, msg: &Message, fds: &[OwnedFd]) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(std::io::Error::other(
            "too many descriptors for one message",
        ));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&body)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Receives one message and the descriptors that came with it; `None` at end of stream.
fn recv(sock: &OwnedFd) -> std::io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut body)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if got.bytes == 0 {
        return Ok(None);
    }
    if got.flags.contains(rustix::net::ReturnFlags::TRUNC)
        || got.flags.contains(rustix::net::ReturnFlags::CTRUNC)
    {
        return Err(std::io::Error::other("a handover message was truncated"));
    }
    let msg = serde_json::from_slice(&body[..got.bytes]).map_err(std::io::Error::other)?;
    Ok(Some((msg, fds)))
}

/// Refuses a peer of another user than this process's: whoever holds the node's listening
/// sockets can accept pods' traffic, and whoever hands them over decides where it goes.
fn same_user(conn: &OwnedFd) -> Result<(), String> {
    let peer =
        sockopt::socket_peercred(conn).map_err(|e| format!("reading its credentials: {e}"))?;
    let own = rustix::process::geteuid();
    if peer.uid == own {
        return Ok(());
    }
    Err(format!(
        "its process ({}) runs as uid {}, not as this agent's uid {}: only the agent's own user may hand over or take the node's sockets",
        peer.pid.as_raw_nonzero(),
        peer.uid.as_raw(),
        own.as_raw()
    ))
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(Into::into)
}

/// The successor's side: the sockets it was given, and the connection to tell the running
/// agent when it serves.
#[derive(Debug)]
pub struct Taken {
    path: PathBuf,
    conn: OwnedFd,
    sockets: BTreeMap<String, OwnedFd>,
}

impl Taken {
    /// Takes the socket `name`, if the running agent had it.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.sockets.remove(name)
    }

    /// How many sockets are left untaken.
    pub fn left(&self) -> usize {
        self.sockets.len()
    }

    /// Tells the running agent this one serves: it stops accepting and drains. Untaken
    /// sockets are closed.
    pub fn serving(self) -> Result<(), HandoverError> {
        send(&self.conn, &Message::Serving, &[]).map_err(|e| HandoverError::Protocol {
            path: self.path.clone(),
            problem: format!("telling it this agent serves: {e}"),
        })
    }
}

/// Asks the agent at `path` for its sockets. `Ok(None)`: no agent is there (a first start, or
/// after a crash), so this one opens its own.
pub fn take(path: &Path) -> Result<Option<Taken>, HandoverError> {
    let err = |what, source| HandoverError::Socket {
        path: path.to_owned(),
        what,
        source,
    };
    let proto = |problem: String| HandoverError::Protocol {
        path: path.to_owned(),
        problem,
    };
    let conn = seqpacket().map_err(|e| err("create", e))?;
    let addr = SocketAddrUnix::new(path).map_err(|e| err("name", e.into()))?;
    match rustix::net::connect(&conn, &addr) {
        Ok(()) => {}
        // Nobody listens: a stale socket file, or none at all.
        Err(e) if e == rustix::io::Errno::NOENT || e == rustix::io::Errno::CONNREFUSED => {
            return Ok(None);
        }
        Err(e) => return Err(err("connect", e.into())),
    }
    same_user(&conn).map_err(proto)?;
    sockopt::set_socket_timeout(&conn, sockopt::Timeout::Recv, Some(EXCHANGE_TIMEOUT))
        .map_err(|e| err("set a timeout", e.into()))?;
    send(&conn, &Message::Hello { version: VERSION }, &[])
        .map_err(|e| proto(format!("sending hello: {e}")))?;
    let mut sockets = BTreeMap::new();
    loop {
        match recv(&conn).map_err(|e| proto(format!("receiving sockets: {e}")))? {
            Some((Message::Sockets { names, last }, fds)) => {
                if names.len() != fds.len() {
                    return Err(proto(format!(
                        "{} names came with {} sockets",
                        names.len(),
                        fds.len()
                    )));
                }
                sockets.extend(names.into_iter().zip(fds));
                if last {
                    break;
                }
            }
            Some((Message::Refused { why }, _)) => return Err(proto(format!("refused: {why}"))),
            Some((other, _)) => return Err(proto(format!("unexpected {other:?}"))),
            None => return Err(proto("it closed the connection".into())),
        }
    }
    // Its answer to `Serving` is to stop accepting; no timeout on this side from here on.
    sockopt::set_socket_timeout(&conn, sockopt::Timeout::Recv, None)
        .map_err(|e| err("clear the timeout", e.into()))?;
    Ok(Some(Taken {
        path: path.to_owned(),
        conn,
        sockets,
    }))
}

/// The running agent's side: a bound socket successors connect to.
#[derive(Debug)]
pub struct Offerer {
    path: PathBuf,
    listener: OwnedFd,
}

impl Offerer {
    /// Binds `path`, replacing a socket file an earlier agent left (it no longer answers: a
    /// successor took over from it, or it is gone).
    pub fn bind(path: &Path) -> Result<Self, HandoverError> {
        let err = |what, source| HandoverError::Socket {
            path: path.to_owned(),
            what,
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err("create its directory", e))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("remove the old socket", e)),
        }
        let listener = seqpacket().map_err(|e| err("create", e))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| err("name", e.into()))?;
        rustix::net::bind(&listener, &addr).map_err(|e| err("bind", e.into()))?;
        // Only root (the agent) may take the node's sockets.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| err("restrict", e))?;
        rustix::net::listen(&listener, 1).map_err(|e| err("listen", e.into()))?;
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }

    /// Waits for a successor and gives it the sockets `offer` returns; returns once it serves.
    /// A successor that fails before then is dropped and the next one awaited. Blocking: run
    /// it on a thread of its own.
    pub fn hand_over(&self, offer: impl Fn() -> Vec<(String, OwnedFd)>) {
        loop {
            let conn =
                match rustix::net::accept_with(&self.listener, rustix::net::SocketFlags::CLOEXEC) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), "handover: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
            match self.exchange(&conn, &offer) {
                Ok(n) => {
                    tracing::info!(
                        sockets = n,
                        "handover: the successor serves; this agent stops accepting and drains"
                    );
                    return;
                }
                Err(e) => tracing::warn!("{e}; still serving"),
            }
        }
    }

    fn exchange(
        &self,
        conn: &OwnedFd,
        offer: &impl Fn() -> Vec<(String, OwnedFd)>,
    ) -> Result<usize, HandoverError> {
        let proto = |problem: String| HandoverError::Protocol {
            path: self.path.clone(),
            problem,
        };
        sockopt::set_socket_timeout(conn, sockopt::Timeout::Recv, Some(EXCHANGE_TIMEOUT))
            .map_err(|e| proto(format!("set a timeout: {e}")))?;
        // The hello is read before any refusal: closing with it unread would reset the
        // connection, and the successor would get no reason.
        let hello = recv(conn).map_err(|e| proto(format!("reading hello: {e}")))?;
        if let Err(why) = same_user(conn) {
            let _ = send(conn, &Message::Refused { why: why.clone() }, &[]);
            return Err(proto(why));
        }
        match hello {
            Some((Message::Hello { version }, _)) if version == VERSION => {}
            Some((Message::Hello { version }, _)) => {
                let why = format!("this agent speaks handover version {VERSION}, not {version}");
                let _ = send(conn, &Message::Refused { why: why.clone() }, &[]);
                return Err(proto(why));
            }
            other => return Err(proto(format!("expected hello, got {other:?}"))),
        }
        let sockets = offer();
        let total = sockets.len();
        let mut chunks = sockets.into_iter().peekable();
        loop {
            let chunk: Vec<_> = chunks.by_ref().take(FDS_PER_MESSAGE).collect();
            let last = chunks.peek().is_none();
            let (names, fds): (Vec<String>, Vec<OwnedFd>) = chunk.into_iter().unzip();
            send(conn, &Message::Sockets { names, last }, &fds)
                .map_err(|e| proto(format!("sending sockets: {e}")))?;
            if last {
                break;
            }
        }
        // The successor enrolls every pod before it serves: no timeout but its going away.
        sockopt::set_socket_timeout(conn, sockopt::Timeout::Recv, None)
            .map_err(|e| proto(format!("clear the timeout: {e}")))?;
        match recv(conn).map_err(|e| proto(format!("waiting for it to serve: {e}")))? {
            Some((Message::Serving, _)) => Ok(total),
            Some((other, _)) => Err(proto(format!("expected serving, got {other:?}"))),
            None => Err(proto("it went away before serving".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// Two "agents" in one process: the sockets arrive under their names, the same sockets
    /// (one listener accepts what was connected to the other's copy), and `Serving` ends the
    /// running side's wait.
    #[test]
    fn hands_listeners_over_by_name_and_waits_for_serving() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = std::env::temp_dir().join(format!("mesh-handover-{}", std::process::id()));
        let path = dir.join("h.sock");
        assert!(take(&path)?.is_none(), "no agent yet");
        let offerer = Offerer::bind(&path)?;
        // More than one message's worth.
        let listeners = (0..FDS_PER_MESSAGE + 5)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs = listeners
            .iter()
            .map(std::net::TcpListener::local_addr)
            .collect::<Result<Vec<_>, _>>()?;
        let offer = move || {
            listeners
                .iter()
                .enumerate()
                .filter_map(|(i, l)| Some((format!("l{i}"), OwnedFd::from(l.try_clone().ok()?))))
                .collect()
        };
        let running = std::thread::spawn(move || offerer.hand_over(offer));
        let mut taken = take(&path)?.ok_or("no agent answered")?;
        assert_eq!(taken.left(), FDS_PER_MESSAGE + 5);
        let last = format!("l{}", FDS_PER_MESSAGE + 4);
        let fd = taken.take(&last).ok_or("the last socket is missing")?;
        assert!(fd.as_raw_fd() >= 0);
        let l = std::net::TcpListener::from(fd);
        assert_eq!(l.local_addr()?, addrs[FDS_PER_MESSAGE + 4]);
        let _c = std::net::TcpStream::connect(addrs[FDS_PER_MESSAGE + 4])?;
        l.accept()?;
        assert!(!running.is_finished());
        taken.serving()?;
        running.join().map_err(|_| "the offering thread panicked")?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn a_successor_of_another_version_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("mesh-handover-v-{}", std::process::id()));
        let path = dir.join("h.sock");
        let offerer = Offerer::bind(&path)?;
        let conn = seqpacket()?;
        rustix::net::connect(&conn, &SocketAddrUnix::new(&path)?)?;
        send(&conn, &Message::Hello { version: 99 }, &[])?;
        let accepted = rustix::net::accept(&offerer.listener)?;
        let Err(e) = offerer.exchange(&accepted, &Vec::new) else {
            return Err("a successor of another version was served".into());
        };
        assert!(e.to_string().contains("version 1, not 99"), "{e}");
        match recv(&conn)? {
            Some((Message::Refused { why }, _)) => assert!(why.contains("99")),
            other => return Err(format!("expected a refusal, got {other:?}").into()),
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Runs `f` on a thread of its own that has become uid 65534 (Linux keeps credentials per
    /// thread, and rustix changes only the calling thread's), so the test can play another
    /// user against this process. Needs root, as every test here does.
    fn as_nobody<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Box<dyn std::error::Error>> {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test plays another user: run it as root, as CI does"
        );
        let nobody = rustix::process::Uid::from_raw(65534);
        std::thread::spawn(move || {
            rustix::thread::set_thread_res_uid(nobody, nobody, nobody)?;
            Ok::<_, std::io::Error>(f())
        })
        .join()
        .map_err(|_| "the other user's thread panicked")?
        .map_err(Into::into)
    }

    /// A process of another user that reaches the socket (here its file is opened to everyone)
    /// gets no socket, and is told why.
    #[test]
    fn a_successor_of_another_user_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("mesh-handover-u-{}", std::process::id()));
        let path = dir.join("h.sock");
        let offerer = Offerer::bind(&path)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        let p = path.clone();
        let conn = as_nobody(move || -> std::io::Result<OwnedFd> {
            let conn = seqpacket()?;
            rustix::net::connect(&conn, &SocketAddrUnix::new(&p)?)?;
            send(&conn, &Message::Hello { version: VERSION }, &[])?;
            Ok(conn)
        })??;
        let accepted = rustix::net::accept(&offerer.listener)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let offer = move || {
            listener
                .try_clone()
                .map(|l| vec![("l".to_string(), OwnedFd::from(l))])
                .unwrap_or_default()
        };
        // The running side answers on a thread: served, it would wait for `Serving`.
        let running = std::thread::spawn(move || {
            offerer
                .exchange(&accepted, &offer)
                .map_err(|e| e.to_string())
        });
        let answer = recv(&conn)?;
        drop(conn);
        match answer {
            Some((Message::Refused { why }, fds)) => {
                assert!(why.contains("65534"), "{why}");
                assert!(fds.is_empty(), "no socket went with the refusal");
            }
            other => return Err(format!("expected a refusal, got {other:?}").into()),
        }
        let e = running
            .join()
            .map_err(|_| "the offering thread panicked")?
            .err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.contains("uid 65534, not as this agent's uid 0")),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// An agent takes no socket from a socket that another user listens on.
    #[test]
    fn an_offerer_of_another_user_is_not_believed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("mesh-handover-o-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        let path = dir.join("h.sock");
        let p = path.clone();
        // Bound and listening as the other user (the kernel records who called listen).
        let offerer = as_nobody(move || Offerer::bind(&p))??;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        let Err(e) = take(&path) else {
            return Err("an agent took sockets from another user".into());
        };
        assert!(e.to_string().contains("uid 65534"), "{e}");
        drop(offerer);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
