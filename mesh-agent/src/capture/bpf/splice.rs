//! The splice maps as connection tasks use them: pairing two of the proxy's sockets so that the
//! kernel moves their bytes (`mesh_splice_verdict`), reading how many it moved, and taking the
//! pair apart.
//!
//! Invariants:
//! - A socket enters `SPLICE_SOURCES`, where the verdict runs, only once both sockets of its pair
//!   are in `SPLICE_TARGETS` and `SPLICE_PEERS`, so the verdict never meets half a pair.
//! - Bytes that arrived before a socket entered `SPLICE_SOURCES` wait in its receive queue. The
//!   kick after entry (setting `SO_RCVLOWAT`, which re-runs the socket's data-ready callback,
//!   now the verdict's) sends them first, in order, and the proxy never reads them itself.
//! - Taking a pair apart removes it from `SPLICE_SOURCES` first; the verdict lets anything later
//!   through to the proxy rather than drop it.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use aya::{
    Ebpf,
    maps::{Map, MapData, SockHash},
    programs::SkSkb,
};
use mesh_common::{SplicePeer, maps, programs};

use super::sys::{BpfError, ElemCmd, map_elem, map_err, prog_err, take_map, typed_program};

/// `SO_COOKIE` (asm-generic/socket.h); libc does not export it.
const SO_COOKIE: libc::c_int = 57;

/// The splice maps, shareable across connection tasks (raw fds: no lock).
#[derive(Debug)]
pub struct SpliceTable {
    targets: OwnedFd,
    sources: OwnedFd,
    peers: OwnedFd,
}

/// The two sockets of one splice, by cookie.
#[derive(Clone, Copy, Debug)]
pub struct SplicePair {
    /// The client side's socket.
    pub a: u64,
    /// The application side's socket.
    pub b: u64,
}

fn dup(fd: BorrowedFd<'_>, name: &'static str) -> Result<OwnedFd, BpfError> {
    fd.try_clone_to_owned().map_err(|e| BpfError::Map {
        name,
        what: "duplicate fd".into(),
        source: Box::new(aya::maps::MapError::IoError(e)),
    })
}

/// The cookie the kernel gave `fd`'s socket: what the verdict sees as `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    crate::capture::netns::socket_u64(&fd, SO_COOKIE)
}

/// Re-runs `fd`'s data-ready callback over what its receive queue holds (`tcp_set_rcvlowat`
/// calls it), without changing the low-water mark from its default of one byte.
fn kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid fd and an int option.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl SpliceTable {
    /// Attaches the verdict program to `SPLICE_SOURCES` (replacing an earlier agent's) and keeps
    /// the maps' fds.
    pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        let sources: SockHash<MapData, u64> =
            SockHash::try_from(take_map(ebpf, maps::SPLICE_SOURCES)?)
                .map_err(map_err(maps::SPLICE_SOURCES, "open"))?;
        let targets: SockHash<MapData, u64> =
            SockHash::try_from(take_map(ebpf, maps::SPLICE_TARGETS)?)
                .map_err(map_err(maps::SPLICE_TARGETS, "open"))?;
        let peers = match take_map(ebpf, maps::SPLICE_PEERS)? {
            Map::HashMap(m) => dup(m.fd().as_fd(), maps::SPLICE_PEERS)?,
            _ => {
                return Err(BpfError::Missing {
                    kind: "map",
                    name: maps::SPLICE_PEERS,
                });
            }
        };
        let prog: &mut SkSkb = typed_program(ebpf, programs::SPLICE_VERDICT)?;
        prog.attach(sources.fd())
            .map_err(prog_err("attach", programs::SPLICE_VERDICT))?;
        Ok(Self {
            targets: dup(targets.fd().as_fd(), maps::SPLICE_TARGETS)?,
            sources: dup(sources.fd().as_fd(), maps::SPLICE_SOURCES)?,
            peers,
        })
    }

    fn put_socket(map: &OwnedFd, cookie: u64, sock: BorrowedFd<'_>) -> io::Result<()> {
        let fd = sock.as_raw_fd() as u32;
        // SAFETY: a u64 key and a u32 (socket fd) value, the sock hash's sizes.
        unsafe {
            map_elem(
                ElemCmd::Update,
                map,
                (&raw const cookie).cast(),
                (&raw const fd).cast_mut().cast(),
                0,
            )
        }
        .map(drop)
    }

    fn delete(map: &OwnedFd, cookie: u64) {
        // SAFETY: a u64 key; deletes take no value.
        let _ = unsafe {
            map_elem(
                ElemCmd::Delete,
                map,
                (&raw const cookie).cast(),
                std::ptr::null_mut(),
                0,
            )
        };
    }

    fn put_peer(&self, cookie: u64, peer: u64) -> io::Result<()> {
        let value = SplicePeer { peer, bytes: 0 };
        // SAFETY: a u64 key and a SplicePeer value, the map's sizes.
        unsafe {
            map_elem(
                ElemCmd::Update,
                &self.peers,
                (&raw const cookie).cast(),
                (&raw const value).cast_mut().cast(),
                0,
            )
        }
        .map(drop)
    }

    /// First half of a splice: enters both sockets as redirect targets and as each other's peer.
    /// Nothing about their data changes yet, so on an error (the maps are full) the caller can
    /// still relay the connection itself.
    pub fn prepare(&self, a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> io::Result<SplicePair> {
        let pair = SplicePair {
            a: socket_cookie(a)?,
            b: socket_cookie(b)?,
        };
        let made = Self::put_socket(&self.targets, pair.a, a)
            .and_then(|()| Self::put_socket(&self.targets, pair.b, b))
            .and_then(|()| self.put_peer(pair.a, pair.b))
            .and_then(|()| self.put_peer(pair.b, pair.a));
        if let Err(e) = made {
            self.release(pair);
            return Err(e);
        }
        Ok(pair)
    }

    /// Second half: from here on the kernel moves every byte a socket receives, including what
    /// is already queued. Returns, for (a, b), whether it took the socket: the kernel only takes
    /// established sockets, so one whose peer has already sent its FIN stays out, and the
    /// caller copies what it holds itself (nothing more can come). The application side goes in
    /// first, so a failure there leaves nothing moving.
    pub fn activate(
        &self,
        pair: SplicePair,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
    ) -> io::Result<(bool, bool)> {
        let put = |cookie, fd| match Self::put_socket(&self.sources, cookie, fd) {
            Ok(()) => kick(fd).map(|()| true),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        };
        let b_in = put(pair.b, b)?;
        Ok((put(pair.a, a)?, b_in))
    }

    /// Bytes the kernel has moved out of the socket `cookie` into its peer.
    pub fn moved(&self, cookie: u64) -> io::Result<u64> {
        let mut value = SplicePeer::default();
        // SAFETY: a u64 key and a SplicePeer buffer.
        let found = unsafe {
            map_elem(
                ElemCmd::Lookup,
                &self.peers,
                (&raw const cookie).cast(),
                (&raw mut value).cast(),
                0,
            )?
        };
        Ok(if found { value.bytes } else { 0 })
    }

    /// Takes the pair apart (sources first). Entries that are already gone are fine: closing a
    /// socket removes it from the sock hashes by itself.
    pub fn release(&self, pair: SplicePair) {
        for c in [pair.a, pair.b] {
            Self::delete(&self.sources, c);
        }
        for c in [pair.a, pair.b] {
            Self::delete(&self.peers, c);
            Self::delete(&self.targets, c);
        }
    }
}
