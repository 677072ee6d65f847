//! Process, file and namespace helpers the harness and the test binaries share.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Byte `i` of the pattern `GET /bytes/N` serves; tests recompute it to check integrity.
pub fn pattern_byte(i: u64) -> u8 {
    (i.wrapping_mul(31).wrapping_add(i >> 13) % 251) as u8
}

/// The directory holding `mesh-agent`, `mesh-ebpf.o` and `mesh-testapp` for this build profile.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a built artifact, with an error that says how to build it.
pub fn artifact(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build everything first with `cargo xtask build` (or run `cargo xtask test`)",
            p.display()
        )
    }
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("cgroup2"))
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .context("no cgroup2 mount found in /proc/self/mountinfo")
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there.
pub fn ensure_bpffs() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf "));
    if !mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Runs `f` on a thread inside the netns at `path` (the caller's own namespace is untouched).
pub fn in_netns<R: Send>(path: &Path, f: impl FnOnce() -> R + Send) -> Result<R> {
    let ns = File::open(path).with_context(|| format!("open netns {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: `ns` is an open netns fd; setns affects only this scoped thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!(
                    "setns {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

/// A minimal HTTP/1.0 GET, returning (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

/// Fields of `/proc/<pid>/stat` after the parenthesised command name (which may hold spaces):
/// index 0 is field 3, `state`.
pub(crate) fn proc_stat(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU time (user + system, all threads) process `pid` has used so far; `None` once it is gone.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let f = proc_stat(pid)?;
    // utime and stime are fields 14 and 15.
    let ticks = f.get(11)? + f.get(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    Some(Duration::from_micros(ticks * 1_000_000 / hz.max(1)))
}

/// Resident memory of process `pid` in bytes (`VmRSS`); `None` once it is gone.
pub fn proc_rss(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmRSS:")
}

/// Anonymous resident memory (heap, stacks) of `pid` in bytes: `RssAnon` from /proc. What a
/// load can grow; `VmRSS` also counts the binary's own pages, which a debug build has tens of
/// megabytes of.
pub fn proc_rss_anon(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "RssAnon:")
}

fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Raises this process's soft open-file limit to its hard one, as far as it may (children
/// inherit it), and returns the limit it has then.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
    fd_limit()
}

/// The open-file limit this process and its children have.
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// Nanoseconds on `CLOCK_MONOTONIC`, which every process on the machine shares (so two
/// processes can agree on periods of time without talking).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Whether this kernel takes the `tls` upper-layer protocol on a TCP socket (CONFIG_TLS, the
/// module loaded on demand): asked of the kernel directly, so the tests do not take the agent's
/// word for what the agent decided. `MESH_TEST_EXPECT_KTLS=1` (the qemu guest sets it, its
/// kernel has TLS) turns a "no" into a failure, so a guest without TLS cannot pass by testing
/// the other path.
pub fn kernel_has_tls() -> Result<bool> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    // SAFETY: setsockopt reads `tls`'s 3 bytes; the fd is the live socket above.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            b"tls".as_ptr().cast(),
            3,
        )
    };
    let has = rc == 0;
    if !has && std::env::var("MESH_TEST_EXPECT_KTLS").as_deref() == Ok("1") {
        bail!(
            "MESH_TEST_EXPECT_KTLS=1 but the kernel refused the tls ULP: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(has)
}

/// How much longer the harness waits than on a real host: `MESH_TEST_TIME_SCALE` (default 1).
/// The qemu guest of `cargo xtask test --kernel` sets it, since emulation (TCG) runs code several
/// times slower. It stretches timeouts only; no test asserts a duration with it.
pub fn time_scale() -> u32 {
    std::env::var("MESH_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// A timeout stretched by [`time_scale`].
pub fn scaled(timeout: Duration) -> Duration {
    timeout * time_scale()
}

/// Polls `f` every 50 ms until it returns true; fails after `timeout` (stretched by
/// [`time_scale`]) naming `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns a long-running harness process (agent or CA) with its output appended to `log`.
pub(crate) fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> Result<Child> {
    let log = OpenOptions::new().create(true).append(true).open(log)?;
    cmd.env(
        "RUST_LOG",
        std::env::var("MESH_TEST_LOG").unwrap_or_else(|_| "info".into()),
    )
    .env("NO_COLOR", "1")
    .stdout(log.try_clone()?)
    .stderr(log)
    .stdin(Stdio::null())
    .spawn()
    .with_context(|| format!("spawn {what}"))
}
