//! Finding a pod's network namespace and cgroup on this node from its UID, with no CNI plugin:
//! the kubelet names each pod's cgroup v2 directory after the UID, every container's processes
//! live below it, and any of them leads to the pod's netns through `/proc/<pid>/ns/net`.
//!
//! Layouts, for UID `0a1b-2c3d`:
//! - systemd driver: `kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod0a1b_2c3d.slice`;
//! - cgroupfs driver: `kubepods/[<qos>/]pod0a1b-2c3d`;
//!
//! where `<qos>` is `burstable` or `besteffort`, and Guaranteed pods sit directly below
//! `kubepods`. Before a pod is enrolled its IP must be on an interface of the netns found, so a
//! stale or reused process can never attach capture to the wrong pod.

use std::{
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Why a pod cannot be enrolled yet. Each is retried on the next pass: the kubelet creates the
/// cgroup and sandbox a moment after the API server says the pod is scheduled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodFsError {
    /// No directory for the UID in any layout.
    #[error(
        "no cgroup for pod UID {uid} under {root} (kubelet has not created it yet, or --kubelet-cgroup-root is wrong)"
    )]
    NoCgroup {
        /// The pod's UID.
        uid: String,
        /// Where it was looked for.
        root: PathBuf,
    },
    /// The cgroup has no process yet (the sandbox is starting).
    #[error("pod cgroup {0} has no process yet (sandbox starting)")]
    NoProcess(PathBuf),
    /// The netns found does not hold the pod's IP: a sandbox being replaced, or a mismatch.
    #[error(
        "the network namespace of pid {pid} does not have the pod's address {ip}: not enrolling it"
    )]
    WrongAddress {
        /// The process whose netns was checked.
        pid: u32,
        /// The pod's address.
        ip: IpAddr,
    },
}

/// A pod's place on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// `/proc/<pid>/ns/net` of a process in the pod.
    pub netns: PathBuf,
    /// The pod's cgroup directory.
    pub cgroup: PathBuf,
    /// The netns inode, which names the sandbox: it changes when the sandbox is recreated.
    pub netns_inode: u64,
}

/// Where the kubelet's cgroups and the node's processes are.
#[derive(Debug, Clone)]
pub struct PodFs {
    /// The cgroup v2 directory that holds `kubepods.slice` or `kubepods`.
    pub cgroup_root: PathBuf,
    /// The node's `/proc`.
    pub proc_root: PathBuf,
}

const QOS: [&str; 3] = ["", "burstable", "besteffort"];

impl PodFs {
    /// The cgroup directories a pod with `uid` may have, systemd layouts first.
    fn candidates(&self, uid: &str) -> Vec<PathBuf> {
        let under = uid.replace('-', "_");
        let mut out = Vec::new();
        for qos in QOS {
            let mut p = self.cgroup_root.join("kubepods.slice");
            if qos.is_empty() {
                p.push(format!("kubepods-pod{under}.slice"));
            } else {
                p.push(format!("kubepods-{qos}.slice"));
                p.push(format!("kubepods-{qos}-pod{under}.slice"));
            }
            out.push(p);
        }
        for qos in QOS {
            let mut p = self.cgroup_root.join("kubepods");
            if !qos.is_empty() {
                p.push(qos);
            }
            p.push(format!("pod{uid}"));
            out.push(p);
        }
        out
    }

    /// The pod's cgroup directory.
    pub fn cgroup(&self, uid: &str) -> Result<PathBuf, PodFsError> {
        self.candidates(uid)
            .into_iter()
            .find(|p| p.is_dir())
            .ok_or_else(|| PodFsError::NoCgroup {
                uid: uid.to_string(),
                root: self.cgroup_root.clone(),
            })
    }

    /// Finds the pod with `uid` and address `ip`.
    pub fn find(&self, uid: &str, ip: IpAddr) -> Result<Found, PodFsError> {
        let cgroup = self.cgroup(uid)?;
        let pids = pids_below(&cgroup);
        if pids.is_empty() {
            return Err(PodFsError::NoProcess(cgroup));
        }
        // Every process of the pod shares its netns; the lowest pid is most often the sandbox's
        // own (pause), which lives as long as the sandbox. Take the first whose netns holds the
        // address.
        let mut last = None;
        for pid in pids {
            let netns = self.proc_root.join(pid.to_string()).join("ns/net");
            let Ok(meta) = std::fs::metadata(&netns) else {
                continue;
            };
            if has_address(&self.proc_root.join(pid.to_string()), ip) {
                return Ok(Found {
                    netns,
                    cgroup,
                    netns_inode: meta.ino(),
                });
            }
            last = Some(pid);
        }
        match last {
            Some(pid) => Err(PodFsError::WrongAddress { pid, ip }),
            None => Err(PodFsError::NoProcess(cgroup)),
        }
    }

    /// Whether `found` still names a live sandbox: the same netns inode behind its path.
    pub fn still_valid(found: &Found) -> bool {
        std::fs::metadata(&found.netns).is_ok_and(|m| m.ino() == found.netns_inode)
    }
}

/// The processes in `dir` and its descendants (containers sit one or two levels below the
/// pod), sorted.
fn pids_below(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth >= 3 {
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether the netns of the process at `proc_pid` has `ip` on an interface. `/proc/<pid>/net`
/// shows the process's own namespace, so no `setns` is needed.
fn has_address(proc_pid: &Path, ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => std::fs::read_to_string(proc_pid.join("net/fib_trie"))
            .is_ok_and(|t| local_v4(&t).contains(&v4)),
        IpAddr::V6(v6) => std::fs::read_to_string(proc_pid.join("net/if_inet6"))
            .is_ok_and(|t| local_v6(&t).contains(&v6)),
    }
}

/// The addresses `fib_trie` lists as `/32 host LOCAL`: those on the namespace's interfaces.
fn local_v4(fib_trie: &str) -> Vec<std::net::Ipv4Addr> {
    let mut out = Vec::new();
    let mut last: Option<std::net::Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("|-- ").or_else(|| t.strip_prefix("+-- ")) {
            last = rest.split(['/', ' ']).next().and_then(|a| a.parse().ok());
        } else if t.starts_with("/32 host LOCAL")
            && let Some(a) = last
            && !out.contains(&a)
        {
            out.push(a);
        }
    }
    out
}

/// The addresses in `if_inet6` (32 hex digits first on each line).
fn local_v6(if_inet6: &str) -> Vec<std::net::Ipv6Addr> {
    if_inet6
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok())
        .map(std::net::Ipv6Addr::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        +-- 10.244.1.0/28 2 0 2
           |-- 10.244.1.0
              /24 link UNICAST
           |-- 10.244.1.7
              /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 10.244.1.7
        /32 host LOCAL
";

    #[test]
    fn local_addresses_are_read_from_proc() {
        let v4 = local_v4(FIB_TRIE);
        assert!(v4.contains(&"10.244.1.7".parse().expect("ip")), "{v4:?}");
        assert!(!v4.contains(&"10.244.1.0".parse().expect("ip")), "{v4:?}");
        let v6 = local_v6(
            "fd000000000000000000000000000007 02 40 00 80     eth0\n00000000000000000000000000000001 01 80 10 80       lo\n",
        );
        assert_eq!(v6[0], "fd00::7".parse::<std::net::Ipv6Addr>().expect("ip"));
    }

    #[test]
    fn every_kubelet_layout_is_found_by_uid() {
        let root = std::env::temp_dir().join(format!("podfs-{}", std::process::id()));
        let fs = PodFs {
            cgroup_root: root.clone(),
            proc_root: PathBuf::from("/proc"),
        };
        let uid = "0a1b-2c3d";
        let layouts = [
            "kubepods.slice/kubepods-pod0a1b_2c3d.slice",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b_2c3d.slice",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b_2c3d.slice",
            "kubepods/pod0a1b-2c3d",
            "kubepods/burstable/pod0a1b-2c3d",
            "kubepods/besteffort/pod0a1b-2c3d",
        ];
        for l in layouts {
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join(l).join("cri-containerd-abc.scope")).expect("mkdir");
            assert_eq!(fs.cgroup(uid), Ok(root.join(l)), "{l}");
            // A directory with no process: the sandbox is starting.
            assert!(matches!(
                fs.find(uid, "10.0.0.1".parse().expect("ip")),
                Err(PodFsError::NoProcess(_))
            ));
            // A process (this test's own) whose netns lacks the address is refused.
            std::fs::write(
                root.join(l).join("cri-containerd-abc.scope/cgroup.procs"),
                format!("{}\n", std::process::id()),
            )
            .expect("write");
            assert!(matches!(
                fs.find(uid, "192.0.2.99".parse().expect("ip")),
                Err(PodFsError::WrongAddress { .. })
            ));
            // Loopback is on an interface of every netns.
            let found = fs
                .find(uid, "127.0.0.1".parse().expect("ip"))
                .expect("found");
            assert!(PodFs::still_valid(&found));
        }
        assert!(matches!(
            fs.cgroup("ffff-0000"),
            Err(PodFsError::NoCgroup { .. })
        ));
        let _ = std::fs::remove_dir_all(&root);
    }
}
