//! What validation checks on the machine: a pod's netns and cgroup paths. Behind a trait, so
//! tests check the messages without creating namespaces, and the CA (on another machine) reads
//! node files without these checks.

use std::path::Path;

/// What validation needs to know about the machine, so tests can check messages without
/// creating namespaces.
pub(super) trait Fs {
    fn is_netns(&self, path: &Path) -> Result<(), String>;
    fn is_cgroup2(&self, path: &Path) -> Result<(), String>;
    /// Whether the cgroup at `path` (a cgroup v2 directory) may be a pod's: the connect hooks
    /// attached there capture every process in it and below it.
    fn is_pod_cgroup(&self, path: &Path) -> Result<(), String>;
}

/// The machine itself; a pod's cgroup must be strictly below `pod_cgroup_root` when it is set.
pub(super) struct RealFs<'a> {
    pub(super) pod_cgroup_root: Option<&'a Path>,
}

/// Accepts every path: for readers on another machine.
pub(super) struct NoFsChecks;

impl Fs for NoFsChecks {
    fn is_netns(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn is_cgroup2(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
    fn is_pod_cgroup(&self, _: &Path) -> Result<(), String> {
        Ok(())
    }
}

pub(super) const NSFS_MAGIC: i64 = 0x6e73_6673;
pub(super) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

impl Fs for RealFs<'_> {
    fn is_pod_cgroup(&self, path: &Path) -> Result<(), String> {
        let canon = path
            .canonicalize()
            .map_err(|e| format!("cannot resolve {}: {e}", path.display()))?;
        let own = crate::capture::cgroup::own()
            .ok()
            .map(|o| o.canonicalize().unwrap_or(o));
        let root = match self.pod_cgroup_root {
            Some(r) => Some(r.canonicalize().map_err(|e| {
                format!(
                    "the pods' cgroup root {} (--pod-cgroup-root): {e}",
                    r.display()
                )
            })?),
            None => None,
        };
        check_pod_cgroup(
            &canon,
            crate::capture::cgroup::is_root(&canon),
            own.as_deref(),
            root.as_deref(),
        )
    }

    fn is_netns(&self, path: &Path) -> Result<(), String> {
        match crate::capture::cgroup::fs_magic(path) {
            Err(e) => Err(format!(
                "network namespace {} does not exist ({e}); create it (ip netns add) or fix the path",
                path.display()
            )),
            Ok(NSFS_MAGIC) => Ok(()),
            Ok(_) => Err(format!(
                "{} is not a network namespace file (expected e.g. /var/run/netns/<name> or /proc/<pid>/ns/net)",
                path.display()
            )),
        }
    }

    fn is_cgroup2(&self, path: &Path) -> Result<(), String> {
        match crate::capture::cgroup::fs_magic(path) {
            Err(e) => Err(format!(
                "cgroup {} does not exist ({e}); create the pod's cgroup v2 directory first",
                path.display()
            )),
            Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
            Ok(_) => Err(format!(
                "{} is not on a cgroup v2 mount; the connect hooks attach only to cgroup v2 (see /proc/self/mountinfo for the cgroup2 mount)",
                path.display()
            )),
        }
    }
}

/// The rules for a pod's cgroup, on resolved paths: not the root cgroup (every process of the
/// machine), not the agent's own cgroup or an ancestor of it (capture would take in the agent),
/// and strictly below the pods' root when one is configured.
pub(super) fn check_pod_cgroup(
    path: &Path,
    is_root: bool,
    agent: Option<&Path>,
    pods_root: Option<&Path>,
) -> Result<(), String> {
    if is_root {
        return Err(format!(
            "{} is the root cgroup, which holds every process on the machine: name the pod's own cgroup",
            path.display()
        ));
    }
    if let Some(agent) = agent
        && agent.starts_with(path)
    {
        return Err(format!(
            "{} is the agent's own cgroup or one of its ancestors ({}): capture there would take in the agent itself and more than the pod",
            path.display(),
            agent.display()
        ));
    }
    if let Some(root) = pods_root
        && (!path.starts_with(root) || path == root)
    {
        return Err(format!(
            "{} is not strictly below the pods' cgroup root {} (--pod-cgroup-root)",
            path.display(),
            root.display()
        ));
    }
    Ok(())
}
