//! The agent's own cgroup. The loopback bypass attaches a `sock_ops` program there to see the
//! proxy's sockets; a socket belongs to the cgroup its creator was in when it made it, so the
//! agent joins its cgroup before it opens any socket.

use std::{
    io,
    path::{Path, PathBuf},
};

/// Errors finding or joining the agent's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/cgroup` or `/proc/self/mountinfo` could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// Why.
        source: io::Error,
    },
    /// No cgroup v2 hierarchy is mounted, or the process is in none.
    #[error(
        "no cgroup v2 hierarchy found in /proc/self/mountinfo and /proc/self/cgroup: mount one (mount -t cgroup2 none /sys/fs/cgroup) to use the loopback bypass"
    )]
    NoCgroup2,
    /// Moving the agent into `--cgroup` failed.
    #[error(
        "cannot join cgroup {path}: {source} (it must be an existing cgroup v2 directory the agent may write cgroup.procs of)"
    )]
    Join {
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Moves the whole agent process into `dir`.
pub fn join(dir: &Path) -> Result<(), CgroupError> {
    // "0" names the writing process; cgroup v2 moves all of its threads.
    std::fs::write(dir.join("cgroup.procs"), "0").map_err(|source| CgroupError::Join {
        path: dir.to_owned(),
        source,
    })
}

/// The directory of the cgroup v2 the agent is in.
pub fn own() -> Result<PathBuf, CgroupError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path, source })
    };
    let own = read("/proc/self/cgroup")?;
    let rel = parse_own(&own).ok_or(CgroupError::NoCgroup2)?;
    let mount = parse_mount(&read("/proc/self/mountinfo")?).ok_or(CgroupError::NoCgroup2)?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Whether `dir` is the root of its hierarchy, which holds every process on the machine that
/// is in no other cgroup. The root is the one cgroup without a `cgroup.type` file.
pub fn is_root(dir: &Path) -> bool {
    !dir.join("cgroup.type").exists()
}

/// The v2 entry (`0::<path>`) of a `/proc/<pid>/cgroup` file.
fn parse_own(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The mount point of the first cgroup2 filesystem in a mountinfo file.
fn parse_mount(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (post.split_whitespace().next() == Some("cgroup2"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The filesystem magic of `path` (`statfs`): the cgroup2 and bpffs checks.
pub fn fs_magic(path: &Path) -> Result<i64, String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the kernel writes into `st`.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_entry_and_its_mount_in_a_hybrid_layout() {
        let cgroup = "12:memory:/x\n1:name=systemd:/\n0::/mesh/agent\n";
        assert_eq!(parse_own(cgroup), Some("/mesh/agent"));
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        assert_eq!(
            parse_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_own("1:name=systemd:/\n"), None);
        assert_eq!(parse_mount("36 35 0:31 / /x rw - cgroup cgroup rw\n"), None);
    }
}
