//! The BPF side's error type and the small helpers every part of it shares: raw element
//! commands on map fds (no lock, for connection tasks) and typed access to a loaded object's
//! maps and programs.

use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{Ebpf, maps::Map, programs::Program};

/// Errors from the BPF side of the agent. Load errors carry the verifier log.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Not running as root (or without CAP_BPF / CAP_NET_ADMIN / CAP_SYS_ADMIN).
    #[error(
        "mesh-agent must run as root: it loads eBPF programs and enters pod network namespaces (try: sudo mesh-agent ...)"
    )]
    NotRoot,
    /// No bpffs at the configured path.
    #[error(
        "no bpf filesystem is mounted at {0}: mount it with `mount -t bpf bpf {0}` (in Kubernetes, mount the host's /sys/fs/bpf into the agent)"
    )]
    NoBpffs(PathBuf),
    /// The BPF object file is missing.
    #[error(
        "cannot read the eBPF object {path}: {source} (build it with `cargo xtask build`, or pass --bpf-object)"
    )]
    Object {
        /// The object path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// aya could not load the object (parse error, map creation, pinned-map mismatch).
    #[error("cannot load the eBPF object {path}: {source}")]
    Load {
        /// The object path.
        path: PathBuf,
        /// aya's error.
        source: Box<aya::EbpfError>,
    },
    /// A map pinned by an earlier agent has a layout this agent's programs do not use: adopting
    /// it would make them misread it.
    #[error(
        "pinned map {path} {layouts}: it was pinned by an agent of another version. Refusing to adopt it rather than misread it: run the agent version that pinned it, or run `mesh-agent uninstall` on this node first (enrolled pods fail closed until the agent is back)"
    )]
    PinnedLayout {
        /// The pin.
        path: PathBuf,
        /// Its layout and the one the object defines, in words.
        layouts: Box<str>,
    },
    /// A program or map the agent needs is not in the object (agent and object out of step).
    #[error(
        "the eBPF object has no {kind} named {name}: rebuild it with `cargo xtask build` so it matches this agent"
    )]
    Missing {
        /// `program` or `map`.
        kind: &'static str,
        /// The name.
        name: &'static str,
    },
    /// The verifier or the kernel refused a program, or attaching failed.
    #[error("{what} {name}: {detail}")]
    Program {
        /// What was being done.
        what: &'static str,
        /// The program.
        name: String,
        /// aya's error with its causes, which include the verifier log for load failures.
        detail: String,
    },
    /// A map operation failed.
    #[error("map {name}: {what}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// What was being done.
        what: String,
        /// aya's error.
        source: Box<aya::maps::MapError>,
    },
    /// Pinning or unpinning under bpffs failed.
    #[error("bpffs {path}: {what}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The pod's cgroup or netns could not be opened for attaching.
    #[error("pod {pod}: cannot open {path} to attach {program}: {source}")]
    Target {
        /// The pod.
        pod: String,
        /// The cgroup or netns path.
        path: PathBuf,
        /// The program.
        program: &'static str,
        /// Why.
        source: io::Error,
    },
}

/// An error and all its causes on one line: aya's top-level messages ("bpf_link_create failed")
/// do not say why, the cause (errno, verifier log) does.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// `bpf(2)` commands on one map element, for maps that connection tasks use concurrently: a raw
/// fd needs no lock, where aya's map types want `&mut`.
#[derive(Clone, Copy, Debug)]
#[repr(i64)]
pub enum ElemCmd {
    /// `BPF_MAP_LOOKUP_ELEM`.
    Lookup = 1,
    /// `BPF_MAP_UPDATE_ELEM`.
    Update = 2,
    /// `BPF_MAP_DELETE_ELEM`.
    Delete = 3,
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`.
    LookupAndDelete = 21,
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Runs `cmd` on the element `key` of the map `fd`; `value` is read (update) or written (lookups)
/// and must be the map's value size. `Ok(false)`: no such element.
///
/// # Safety
/// `key` and `value` must point at live buffers of the map's key and value sizes (`value` may be
/// null for a delete).
pub unsafe fn map_elem(
    cmd: ElemCmd,
    fd: &OwnedFd,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<bool> {
    let attr = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for element commands; the caller vouches for the
    // buffers it points at.
    match unsafe { sys_bpf(cmd as libc::c_long, &attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `bpf(cmd, attr)`: the raw syscall, for the commands aya keeps to itself.
///
/// # Safety
/// `attr` must be the kernel's attribute layout for `cmd`, and every pointer in it must be
/// valid for the call.
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`; the kernel reads at most its size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(attr),
            std::mem::size_of::<A>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The map `name`, taken out of the loaded object.
pub fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, BpfError> {
    ebpf.take_map(name)
        .ok_or(BpfError::Missing { kind: "map", name })
}

/// Wraps a map error with the map and what was being done.
pub fn map_err(
    name: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(aya::maps::MapError) -> BpfError {
    let what = what.into();
    move |e| BpfError::Map {
        name,
        what,
        source: Box::new(e),
    }
}

/// Wraps a program error with the program and what was being done.
pub fn prog_err(
    what: &'static str,
    name: &str,
) -> impl FnOnce(aya::programs::ProgramError) -> BpfError {
    let name = name.to_string();
    move |e| BpfError::Program {
        what,
        name,
        detail: chain(&e),
    }
}

/// The program `name`, as its kind `T` (a verdict that attaches to a map, say).
pub fn typed_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err("open", name))
}

/// Wraps an I/O error on a pin.
pub fn pin_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> BpfError {
    let path = path.to_owned();
    move |source| BpfError::Pin { path, what, source }
}

/// `bpf_attr` for `BPF_LINK_UPDATE` (since Linux 5.7 for cgroup links, 5.8 for netns links).
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `BPF_LINK_UPDATE`: the kernel swaps the program behind the link in one step, so the hook is
/// never empty and never runs two programs (a detach and re-attach would leave a gap in which
/// connects go uncaptured).
pub fn link_update(
    link: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is the kernel's link_update layout; the fds are borrowed, so open for the
    // call.
    unsafe {
        sys_bpf(
            aya_obj::generated::bpf_cmd::BPF_LINK_UPDATE as libc::c_long,
            &attr,
        )
    }
    .map(drop)
}

/// `bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens the object pinned at `pin` (`BPF_OBJ_GET`); aya's link types keep their fd to
/// themselves, and a link update needs it.
pub fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: `attr` is the obj_get layout, pointing at a NUL-terminated path that outlives the
    // call.
    let fd = unsafe {
        sys_bpf(
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET as libc::c_long,
            &attr,
        )
    }?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
