//! Loading the capture programs, pinning them, and attaching them per pod.
//!
//! Invariants:
//! - Everything lives under one bpffs directory per agent (`<bpffs>/<pin-name>/`): `maps/`,
//!   `progs/` and `links/`. Maps are pinned by name, so a restarted agent reuses them (and their
//!   contents) instead of creating new ones.
//! - A pod is captured exactly while its links are pinned. A link's pin name carries the pod key,
//!   the program and the inode of the cgroup or netns it is attached to, so a restarted agent can
//!   adopt the links it still wants and unpin (detach) the rest, including links to a pod's old
//!   cgroup or netns after the pod was recreated.
//! - Links outlive the agent process: while no agent runs, capture stays and enrolled traffic
//!   fails closed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuHashMap, PerCpuValues, SockHash},
    programs::{
        CgroupAttachMode, FExit, Program, SkMsg,
        links::{FdLink, PinnedLink},
    },
    util::nr_cpus,
};
use mesh_common::{
    InboundKey, InboundStats, IpKey, ListenerKind, LoopKey, OrigDst, OrigDstKey, PodStats, PortKey,
    maps, programs,
};

use crate::state::Pod;

pub mod collector;
pub mod log;
mod splice;
pub mod sys;

pub use splice::{SplicePair, SpliceTable};
pub use sys::{BpfError, chain};
use sys::{ElemCmd, map_elem, map_err, pin_err, prog_err, take_map, typed_program};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Checks the process can do what the agent needs, with errors that say how to fix it.
pub fn preflight(bpffs: &Path) -> Result<(), BpfError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BpfError::NotRoot);
    }
    if super::cgroup::fs_magic(bpffs) != Ok(BPF_FS_MAGIC) {
        return Err(BpfError::NoBpffs(bpffs.to_owned()));
    }
    Ok(())
}

/// Counters the kernel keeps for one pod, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct KernelPodStats {
    /// IPv4 connects redirected to the proxy.
    pub captured_v4: u64,
    /// IPv6 connects redirected to the proxy.
    pub captured_v6: u64,
    /// Connects left alone (loopback, excluded ports).
    pub bypassed: u64,
    /// Inbound connections steered to 15006.
    pub steered_inbound: u64,
    /// Inbound connections steered to 15008.
    pub steered_hbone: u64,
    /// Inbound connections refused for want of a listener.
    pub refused_no_listener: u64,
    /// Plaintext connections refused in the kernel because the pod is STRICT.
    pub refused_strict: u64,
}

/// Lookup-and-delete of captured connections' original destinations, shareable across tasks.
#[derive(Debug)]
pub struct OrigDstTable {
    fd: OwnedFd,
}

impl OrigDstTable {
    /// Takes the original destination of the captured connection whose client is `port` in the
    /// namespace `netns_cookie`. One syscall, atomic, and it frees the slot.
    pub fn take(&self, netns_cookie: u64, port: u16) -> io::Result<Option<SocketAddr>> {
        let key = OrigDstKey::new(netns_cookie, port);
        let mut value = std::mem::MaybeUninit::<OrigDst>::zeroed();
        // SAFETY: a live key and a value buffer of the map's sizes.
        let found = unsafe {
            map_elem(
                ElemCmd::LookupAndDelete,
                &self.fd,
                (&raw const key).cast(),
                value.as_mut_ptr().cast(),
                0,
            )?
        };
        // SAFETY: the kernel filled the value; every bit pattern of OrigDst is valid.
        Ok(found.then(|| orig_to_addr(&unsafe { value.assume_init() })))
    }
}

fn orig_to_addr(v: &OrigDst) -> SocketAddr {
    let ip = if v.family == mesh_common::AF_INET6 {
        // An IPv6 socket's connect to ::ffff:a.b.c.d goes out as IPv4: route it as that.
        IpAddr::from(v.addr).to_canonical()
    } else {
        IpAddr::from([v.addr[0], v.addr[1], v.addr[2], v.addr[3]])
    };
    SocketAddr::new(ip, v.port)
}

/// The IpKey for an address.
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(a) => IpKey::v4(a.octets()),
        IpAddr::V6(a) => IpKey { addr: a.octets() },
    }
}

/// Inserts zeroed per-CPU counters under `key` unless an entry exists (an earlier agent's
/// counters are kept, so counts span restarts).
fn zero_if_absent<K: aya::Pod, V: aya::Pod + Default>(
    map: &mut PerCpuHashMap<MapData, K, V>,
    key: K,
    cpus: usize,
    name: &'static str,
    pod: &str,
) -> Result<(), BpfError> {
    if map.get(&key, 0).is_ok() {
        return Ok(());
    }
    let zero = PerCpuValues::try_from(vec![V::default(); cpus]).map_err(|e| BpfError::Map {
        name,
        what: "build per-CPU values".into(),
        source: Box::new(aya::maps::MapError::IoError(e)),
    })?;
    map.insert(key, zero, 0)
        .map_err(map_err(name, format!("insert pod {pod}")))
}

/// Removes a link pin. Dropping the last reference detaches the program; a pin that is not a
/// link (left by something else) is just removed.
fn unpin_link(path: &Path) -> Result<(), BpfError> {
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            drop(link.unpin().map_err(pin_err(path, "unpin link"))?);
            Ok(())
        }
        Err(_) => std::fs::remove_file(path).map_err(pin_err(path, "remove pin")),
    }
}

/// The loaded programs and the maps the control plane writes.
pub struct Dataplane {
    ebpf: Ebpf,
    /// The programs' log ring, until the agent takes it to forward ([`Dataplane::take_kernel_log`]).
    kernel_log: Option<log::KernelLogger>,
    root: PathBuf,
    inbound_socks: SockHash<MapData, InboundKey>,
    pod_stats: PerCpuHashMap<MapData, u64, PodStats>,
    inbound_stats: PerCpuHashMap<MapData, IpKey, InboundStats>,
    excluded: BpfHashMap<MapData, u16, u8>,
    strict: BpfHashMap<MapData, IpKey, u8>,
    mtls_ports: BpfHashMap<MapData, PortKey, u8>,
    loop_enabled: Array<MapData, u32>,
    /// Pin name of the link of `mesh_proxy_sock_ops` to the agent's cgroup, once attached.
    proxy_link: Option<String>,
    /// Pin name of the bypass's reader counter link, once attached or adopted.
    pacing_link: Option<String>,
    adopted_maps: bool,
    link_updates: LinkUpdates,
}

/// Adopted links this agent moved onto its own programs.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct LinkUpdates {
    /// Links updated (each adopted link runs an earlier agent's program until updated).
    pub updated: usize,
    /// Of those, the ones whose program's instructions differ (another build).
    pub changed: usize,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("root", &self.root)
            .field("adopted_maps", &self.adopted_maps)
            .finish_non_exhaustive()
    }
}

/// A map's layout as the kernel keeps it: what adopting a pinned map must agree on.
fn layout(map_type: u32, key: u32, value: u32, entries: u32) -> String {
    format!("type {map_type}, key {key} B, value {value} B, {entries} entries")
}

/// Compares every map the object pins by name with the map already pinned there, if any. aya
/// adopts a pinned map by name alone; one from another version (a field added to a value, say)
/// would be read with the wrong layout, so a difference stops the load instead.
fn check_pinned_layout(object: &Path, data: &[u8], maps_dir: &Path) -> Result<(), BpfError> {
    let parsed = aya_obj::Object::parse(data).map_err(|e| BpfError::Load {
        path: object.to_owned(),
        source: Box::new(aya::EbpfError::ParseError(e)),
    })?;
    for (name, map) in &parsed.maps {
        if !matches!(map.pinning(), aya_obj::maps::PinningType::ByName) {
            continue;
        }
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| BpfError::Pin {
            path: path.clone(),
            what: "read the pinned map's layout",
            source: io::Error::other(e.to_string()),
        })?;
        let pinned_type = info.map_type().map_or(u32::MAX, |t| t as u32);
        let pinned = layout(
            pinned_type,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let wanted = layout(
            map.map_type(),
            map.key_size(),
            map.value_size(),
            map.max_entries(),
        );
        if pinned != wanted {
            return Err(BpfError::PinnedLayout {
                path,
                layouts: format!("is {pinned}, but this agent's programs need {wanted}").into(),
            });
        }
    }
    Ok(())
}

impl Dataplane {
    /// Loads `object`, reusing maps pinned under `root/maps` by an earlier agent.
    pub fn load(object: &Path, root: &Path) -> Result<(Self, OrigDstTable, SpliceTable), BpfError> {
        let data = std::fs::read(object).map_err(|source| BpfError::Object {
            path: object.to_owned(),
            source,
        })?;
        for sub in ["maps", "progs", "links"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(pin_err(&dir, "create directory"))?;
        }
        let maps_dir = root.join("maps");
        check_pinned_layout(object, &data, &maps_dir)?;
        let adopted_maps = maps_dir.join(maps::ORIG_DST).exists();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(&data)
            .map_err(|e| BpfError::Load {
                path: object.to_owned(),
                source: Box::new(e),
            })?;
        for name in programs::ALL {
            let prog = ebpf.program_mut(name).ok_or(BpfError::Missing {
                kind: "program",
                name,
            })?;
            match prog {
                Program::CgroupSockAddr(p) => p.load().map_err(prog_err("load", name))?,
                Program::SockOps(p) => p.load().map_err(prog_err("load", name))?,
                Program::SkLookup(p) => p.load().map_err(prog_err("load", name))?,
                Program::SkSkb(p) => p.load().map_err(prog_err("load", name))?,
                Program::SkMsg(p) => p.load().map_err(prog_err("load", name))?,
                _ => {
                    return Err(BpfError::Missing {
                        kind: "program",
                        name,
                    });
                }
            }
            // Pin so bpftool and operators can see what is loaded; replace an older agent's pin.
            let pin = root.join("progs").join(name);
            if pin.exists() {
                std::fs::remove_file(&pin).map_err(pin_err(&pin, "remove old program pin"))?;
            }
            let pinned = match prog {
                Program::CgroupSockAddr(p) => p.pin(&pin),
                Program::SockOps(p) => p.pin(&pin),
                Program::SkLookup(p) => p.pin(&pin),
                Program::SkSkb(p) => p.pin(&pin),
                Program::SkMsg(p) => p.pin(&pin),
                _ => Ok(()),
            };
            pinned.map_err(|e| BpfError::Pin {
                path: pin.clone(),
                what: "pin program",
                source: io::Error::other(chain(&e)),
            })?;
        }
        // After every program is loaded: they hold the ring too.
        let kernel_log = aya_log::EbpfLogger::init_with_logger(&mut ebpf, log::KernelLog)
            .inspect_err(|e| {
                tracing::warn!("cannot read the kernel programs' log ring: {e}; their rare events are only counted");
            })
            .ok();
        let orig = match take_map(&mut ebpf, maps::ORIG_DST)? {
            Map::LruHashMap(m) => m,
            _ => {
                return Err(BpfError::Missing {
                    kind: "map",
                    name: maps::ORIG_DST,
                });
            }
        };
        let fd = orig
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(pin_err(&maps_dir, "dup ORIG_DST fd"))?;
        let inbound_socks = SockHash::try_from(take_map(&mut ebpf, maps::INBOUND_SOCKS)?)
            .map_err(map_err(maps::INBOUND_SOCKS, "open"))?;
        let pod_stats = PerCpuHashMap::try_from(take_map(&mut ebpf, maps::POD_STATS)?)
            .map_err(map_err(maps::POD_STATS, "open"))?;
        let inbound_stats = PerCpuHashMap::try_from(take_map(&mut ebpf, maps::INBOUND_STATS)?)
            .map_err(map_err(maps::INBOUND_STATS, "open"))?;
        let excluded = BpfHashMap::try_from(take_map(&mut ebpf, maps::EXCLUDED_PORTS)?)
            .map_err(map_err(maps::EXCLUDED_PORTS, "open"))?;
        let strict = BpfHashMap::try_from(take_map(&mut ebpf, maps::STRICT_ADDRS)?)
            .map_err(map_err(maps::STRICT_ADDRS, "open"))?;
        let mtls_ports = BpfHashMap::try_from(take_map(&mut ebpf, maps::MTLS_PORTS)?)
            .map_err(map_err(maps::MTLS_PORTS, "open"))?;
        let splice = SpliceTable::attach(&mut ebpf)?;
        let loop_socks: SockHash<MapData, LoopKey> =
            SockHash::try_from(take_map(&mut ebpf, maps::LOOP_SOCKS)?)
                .map_err(map_err(maps::LOOP_SOCKS, "open"))?;
        let loop_msg: &mut SkMsg = typed_program(&mut ebpf, programs::LOOP_MSG)?;
        // Replaces an earlier agent's program on the pinned map; sockets already in it keep the
        // program they entered with.
        loop_msg
            .attach(loop_socks.fd())
            .map_err(prog_err("attach", programs::LOOP_MSG))?;
        let loop_enabled = Array::try_from(take_map(&mut ebpf, maps::LOOP_ENABLED)?)
            .map_err(map_err(maps::LOOP_ENABLED, "open"))?;
        Ok((
            Self {
                ebpf,
                kernel_log,
                root: root.to_owned(),
                inbound_socks,
                pod_stats,
                inbound_stats,
                excluded,
                strict,
                mtls_ports,
                loop_enabled,
                proxy_link: None,
                pacing_link: None,
                adopted_maps,
                link_updates: LinkUpdates::default(),
            },
            OrigDstTable { fd },
            splice,
        ))
    }

    /// The programs' log ring, once: whoever takes it forwards it ([`log::forward`]) for as
    /// long as the programs run.
    pub fn take_kernel_log(&mut self) -> Option<log::KernelLogger> {
        self.kernel_log.take()
    }

    /// Whether the maps were adopted from an earlier agent rather than created.
    pub fn adopted_maps(&self) -> bool {
        self.adopted_maps
    }

    /// Sets how sockets that connect from now on enter the loopback bypass: a
    /// [`mesh_common::loop_enabled`] value. Sockets already in it keep their way until they close.
    pub fn set_loop_bypass(&mut self, how: u32) -> Result<(), BpfError> {
        self.loop_enabled
            .set(0, how, 0)
            .map_err(map_err(maps::LOOP_ENABLED, "set"))
    }

    /// Attaches the bypass's reader counter (`fexit` on `sk_msg_recvmsg`) and pins its link,
    /// so the counting outlives this agent like every other link. An earlier agent's pinned
    /// link is kept, not joined by a second: two counters would count every read twice and
    /// let a sender run ahead of its reader. Returns whether it was adopted.
    pub fn attach_loop_pacing(&mut self) -> Result<bool, BpfError> {
        let program = programs::LOOP_READ;
        let pin = self.root.join("links").join(program);
        // Kept by `detach_others` from now on, adopted or not.
        self.pacing_link = Some(program.to_string());
        if pin.exists() {
            PinnedLink::from_pin(&pin).map_err(|e| BpfError::Pin {
                path: pin.clone(),
                what: "open pinned link",
                source: io::Error::other(chain(&e)),
            })?;
            return Ok(true);
        }
        let btf = aya::Btf::from_sys_fs().map_err(|e| BpfError::Program {
            what: "read the kernel's BTF for",
            name: program.to_string(),
            detail: chain(&e),
        })?;
        // Where TCP's read calls `__sk_msg_recvmsg` directly, only a count there sees it.
        let [outer, inner] = programs::LOOP_READ_TARGETS;
        let (program, target) = if btf
            .id_by_type_name_kind(inner, aya_obj::btf::BtfKind::Func)
            .is_ok()
        {
            (programs::LOOP_READ_INNER, inner)
        } else {
            (program, outer)
        };
        let prog: &mut FExit = typed_program(&mut self.ebpf, program)?;
        prog.load(target, &btf).map_err(prog_err("load", program))?;
        tracing::info!(
            program,
            target,
            "loopback bypass: counting reads on the kernel's sockmap read"
        );
        let id = prog.attach().map_err(prog_err("attach", program))?;
        let link = FdLink::from(prog.take_link(id).map_err(prog_err("take link", program))?);
        link.pin(&pin).map_err(|e| BpfError::Pin {
            path: pin.clone(),
            what: "pin link",
            source: io::Error::other(chain(&e)),
        })?;
        Ok(false)
    }

    /// Attaches `mesh_proxy_sock_ops` to the agent's own cgroup `dir` (adopting an earlier
    /// agent's link to the same cgroup), so the proxy's loopback sockets enter the bypass.
    /// Returns whether the link was adopted.
    pub fn attach_proxy(&mut self, dir: &Path) -> Result<bool, BpfError> {
        let program = programs::PROXY_SOCK_OPS;
        let target = |source| BpfError::Target {
            pod: "(the agent itself)".into(),
            path: dir.to_owned(),
            program,
            source,
        };
        let ino = std::fs::metadata(dir).map_err(target)?.ino();
        let name = format!("agent_{program}_cg{ino}");
        let pin = self.root.join("links").join(&name);
        self.proxy_link = Some(name);
        if pin.exists() {
            self.adopt_link(program, &pin)?;
            return Ok(true);
        }
        let cgroup = File::open(dir).map_err(target)?;
        self.attach_link(program, &cgroup, &pin)?;
        Ok(false)
    }

    /// Makes the kernel's excluded-port set equal `ports`.
    pub fn set_excluded_ports(&mut self, ports: &[u16]) -> Result<(), BpfError> {
        let want: BTreeSet<u16> = ports.iter().copied().collect();
        let have: Vec<u16> = self.excluded.keys().filter_map(Result::ok).collect();
        for p in have.iter().filter(|p| !want.contains(p)) {
            self.excluded
                .remove(p)
                .map_err(map_err(maps::EXCLUDED_PORTS, format!("remove {p}")))?;
        }
        for p in &want {
            self.excluded
                .insert(p, 1, 0)
                .map_err(map_err(maps::EXCLUDED_PORTS, format!("insert {p}")))?;
        }
        Ok(())
    }

    /// Makes the kernel refuse (STRICT) or pass (PERMISSIVE) plaintext to a pod's address.
    pub fn set_strict(&mut self, ip: IpAddr, strict: bool) -> Result<(), BpfError> {
        let key = ip_key(ip);
        if strict {
            self.strict
                .insert(key, 1, 0)
                .map_err(map_err(maps::STRICT_ADDRS, format!("insert {ip}")))
        } else if self.strict.get(&key, 0).is_ok() {
            self.strict
                .remove(&key)
                .map_err(map_err(maps::STRICT_ADDRS, format!("remove {ip}")))
        } else {
            Ok(())
        }
    }

    /// Gives ports of a pod their own mode where it differs from the pod's (PeerAuthentication
    /// `portLevelMtls`): `true` refuses plaintext to the port, `false` passes it. Ports of the
    /// pod not listed lose any earlier mode of their own.
    pub fn set_port_modes(&mut self, ip: IpAddr, ports: &[(u16, bool)]) -> Result<(), BpfError> {
        let ip_k = ip_key(ip);
        let stale: Vec<PortKey> = self
            .mtls_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ip == ip_k && !ports.iter().any(|(p, _)| u32::from(*p) == k.port))
            .collect();
        for k in stale {
            self.mtls_ports
                .remove(&k)
                .map_err(map_err(maps::MTLS_PORTS, format!("remove {ip}:{}", k.port)))?;
        }
        for (port, strict) in ports {
            let key = PortKey::new(ip_k, *port);
            if self.mtls_ports.get(&key, 0).ok() != Some(u8::from(*strict)) {
                self.mtls_ports
                    .insert(key, u8::from(*strict), 0)
                    .map_err(map_err(maps::MTLS_PORTS, format!("insert {ip}:{port}")))?;
            }
        }
        Ok(())
    }

    /// Registers a pod's counters (keeping existing ones, so counts survive a restart) and its
    /// address, which tells `sk_lookup` the address is ours to steer.
    pub fn register_pod(&mut self, pod: &Pod, netns_cookie: u64) -> Result<(), BpfError> {
        let n = nr_cpus().map_err(|(_, e)| BpfError::Pin {
            path: "/sys/devices/system/cpu/possible".into(),
            what: "count CPUs",
            source: e,
        })?;
        let who = pod.key.to_string();
        zero_if_absent(&mut self.pod_stats, netns_cookie, n, maps::POD_STATS, &who)?;
        for ip in pod.ips() {
            zero_if_absent(
                &mut self.inbound_stats,
                ip_key(ip),
                n,
                maps::INBOUND_STATS,
                &who,
            )?;
        }
        Ok(())
    }

    /// Forgets a pod's counters and addresses (after its links are gone).
    pub fn unregister_pod(&mut self, pod: &Pod, netns_cookie: u64) {
        let _ = self.pod_stats.remove(&netns_cookie);
        for ip in pod.ips() {
            let _ = self.inbound_stats.remove(&ip_key(ip));
            let _ = self.strict.remove(&ip_key(ip));
            let _ = self.set_port_modes(ip, &[]);
            for kind in [ListenerKind::Inbound, ListenerKind::Hbone] {
                let _ = self
                    .inbound_socks
                    .remove(&InboundKey::new(ip_key(ip), kind));
            }
        }
    }

    /// Points `sk_lookup` at the pod's listener of `kind`.
    pub fn set_listener(
        &mut self,
        ip: IpAddr,
        kind: ListenerKind,
        listener: &impl AsRawFd,
    ) -> Result<(), BpfError> {
        self.inbound_socks
            .insert(InboundKey::new(ip_key(ip), kind), listener.as_raw_fd(), 0)
            .map_err(map_err(
                maps::INBOUND_SOCKS,
                format!("insert {ip} {kind:?}"),
            ))
    }

    /// Summed kernel counters for a pod (over its addresses, when it is dual-stack).
    pub fn pod_stats(&self, pod: &Pod, netns_cookie: u64) -> KernelPodStats {
        let mut out = KernelPodStats::default();
        if let Ok(v) = self.pod_stats.get(&netns_cookie, 0) {
            for s in v.iter() {
                out.captured_v4 += s.captured_v4;
                out.captured_v6 += s.captured_v6;
                out.bypassed += s.bypassed;
            }
        }
        for v in pod
            .ips()
            .filter_map(|ip| self.inbound_stats.get(&ip_key(ip), 0).ok())
        {
            for s in v.iter() {
                out.steered_inbound += s.steered_inbound;
                out.steered_hbone += s.steered_hbone;
                out.refused_no_listener += s.refused_no_listener;
                out.refused_strict += s.refused_strict;
            }
        }
        out
    }

    /// The pin names a pod's links should have, given its cgroup and netns inodes.
    fn link_names(pod: &Pod) -> Result<BTreeMap<&'static str, String>, BpfError> {
        let stem = pod.key.file_stem();
        let ino = |path: &Path, program: &'static str| {
            std::fs::metadata(path)
                .map(|m| m.ino())
                .map_err(|source| BpfError::Target {
                    pod: pod.key.to_string(),
                    path: path.to_owned(),
                    program,
                    source,
                })
        };
        let cg = ino(&pod.cgroup, programs::CONNECT4)?;
        let ns = ino(&pod.netns, programs::SK_LOOKUP)?;
        Ok([
            (
                programs::CONNECT4,
                format!("{stem}_{}_cg{cg}", programs::CONNECT4),
            ),
            (
                programs::CONNECT6,
                format!("{stem}_{}_cg{cg}", programs::CONNECT6),
            ),
            (
                programs::SOCK_OPS,
                format!("{stem}_{}_cg{cg}", programs::SOCK_OPS),
            ),
            (
                programs::SK_LOOKUP,
                format!("{stem}_{}_ns{ns}", programs::SK_LOOKUP),
            ),
        ]
        .into_iter()
        .collect())
    }

    /// Attaches every program for `pod`, adopting links an earlier agent pinned. Returns how many
    /// links were adopted rather than created.
    pub fn attach_pod(&mut self, pod: &Pod) -> Result<usize, BpfError> {
        let names = Self::link_names(pod)?;
        let mut adopted = 0;
        for (program, pin_name) in names {
            let pin = self.root.join("links").join(&pin_name);
            if pin.exists() {
                self.adopt_link(program, &pin)?;
                adopted += 1;
                continue;
            }
            let target_path = if program == programs::SK_LOOKUP {
                &pod.netns
            } else {
                &pod.cgroup
            };
            let target = File::open(target_path).map_err(|source| BpfError::Target {
                pod: pod.key.to_string(),
                path: target_path.clone(),
                program,
                source,
            })?;
            self.attach_link(program, &target, &pin)?;
        }
        Ok(adopted)
    }

    /// Takes over a link an earlier agent pinned: when it runs another program than this agent
    /// loaded, points it at ours with one `BPF_LINK_UPDATE`. The link (and so the capture)
    /// stays in place throughout; only the instructions change. Counted in [`LinkUpdates`].
    fn adopt_link(&mut self, program: &'static str, pin: &Path) -> Result<(), BpfError> {
        let prog = self.ebpf.program(program).ok_or(BpfError::Missing {
            kind: "program",
            name: program,
        })?;
        let ours = prog.info().map_err(prog_err("read info of", program))?;
        let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| BpfError::Pin {
            path: pin.to_owned(),
            what: "open pinned link",
            source: io::Error::other(chain(&e)),
        })?);
        let running = link.info().map_err(|e| BpfError::Pin {
            path: pin.to_owned(),
            what: "read link info",
            source: io::Error::other(chain(&e)),
        })?;
        if running.program_id() == ours.id() {
            return Ok(());
        }
        let same = aya::programs::loaded_programs()
            .flatten()
            .find(|p| p.id() == running.program_id())
            .is_some_and(|p| p.tag() == ours.tag());
        let fd = prog.fd().map_err(prog_err("open", program))?;
        let link_fd = sys::obj_get(pin).map_err(pin_err(pin, "open pinned link"))?;
        sys::link_update(link_fd.as_fd(), fd.as_fd()).map_err(|source| BpfError::Pin {
            path: pin.to_owned(),
            what: "update link to this agent's program (BPF_LINK_UPDATE)",
            source,
        })?;
        self.link_updates.updated += 1;
        if !same {
            self.link_updates.changed += 1;
        }
        Ok(())
    }

    /// How many adopted links were moved onto this agent's programs.
    pub fn link_updates(&self) -> LinkUpdates {
        self.link_updates
    }

    /// Attaches `program` to `target` (a cgroup, or a netns for `sk_lookup`) and pins the link
    /// at `pin`, so it outlives this process.
    fn attach_link(
        &mut self,
        program: &'static str,
        target: &File,
        pin: &Path,
    ) -> Result<(), BpfError> {
        let prog = self.ebpf.program_mut(program).ok_or(BpfError::Missing {
            kind: "program",
            name: program,
        })?;
        let convert = |e: aya::programs::links::LinkError| BpfError::Pin {
            path: pin.to_owned(),
            what: "convert link",
            source: io::Error::other(chain(&e)),
        };
        // `Single` is the flags-0 mode: the kernel rejects any other flags on a cgroup
        // bpf_link (EINVAL), and links to one cgroup coexist with other programs anyway.
        let link: FdLink = match prog {
            Program::CgroupSockAddr(p) => {
                let id = p
                    .attach(target, CgroupAttachMode::Single)
                    .map_err(prog_err("attach", program))?;
                let l = p.take_link(id).map_err(prog_err("take link", program))?;
                FdLink::try_from(l).map_err(&convert)?
            }
            Program::SockOps(p) => {
                let id = p
                    .attach(target, CgroupAttachMode::Single)
                    .map_err(prog_err("attach", program))?;
                let l = p.take_link(id).map_err(prog_err("take link", program))?;
                FdLink::try_from(l).map_err(&convert)?
            }
            Program::SkLookup(p) => {
                let id = p.attach(target).map_err(prog_err("attach", program))?;
                p.take_link(id)
                    .map_err(prog_err("take link", program))?
                    .into()
            }
            _ => {
                return Err(BpfError::Missing {
                    kind: "program",
                    name: program,
                });
            }
        };
        link.pin(pin).map_err(|e| BpfError::Pin {
            path: pin.to_owned(),
            what: "pin link",
            source: io::Error::other(chain(&e)),
        })?;
        Ok(())
    }

    /// Unpins (and so detaches) every link not belonging to one of `pods`. Returns the pin names
    /// removed.
    pub fn detach_others(&mut self, pods: &[&Pod]) -> Result<Vec<String>, BpfError> {
        let mut keep: BTreeSet<String> = self
            .proxy_link
            .iter()
            .chain(&self.pacing_link)
            .cloned()
            .collect();
        for pod in pods {
            // A pod whose cgroup or netns vanished keeps nothing: its links are stale.
            if let Ok(names) = Self::link_names(pod) {
                keep.extend(names.into_values());
            }
        }
        let dir = self.root.join("links");
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(pin_err(&dir, "list links"))? {
            let entry = entry.map_err(pin_err(&dir, "list links"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            unpin_link(&entry.path())?;
            removed.push(name);
        }
        Ok(removed)
    }

    /// Removes every pin this agent owns: links (so capture stops), programs and maps. Used by
    /// `mesh-agent uninstall`, the clean removal path.
    pub fn uninstall(root: &Path) -> Result<(), BpfError> {
        let links = root.join("links");
        if links.exists() {
            for entry in std::fs::read_dir(&links).map_err(pin_err(&links, "list links"))? {
                unpin_link(&entry.map_err(pin_err(&links, "list links"))?.path())?;
            }
        }
        for sub in ["links", "progs", "maps"] {
            let dir = root.join(sub);
            if dir.exists() {
                for entry in std::fs::read_dir(&dir).map_err(pin_err(&dir, "list"))? {
                    let path = entry.map_err(pin_err(&dir, "list"))?.path();
                    std::fs::remove_file(&path).map_err(pin_err(&path, "remove pin"))?;
                }
                std::fs::remove_dir(&dir).map_err(pin_err(&dir, "remove directory"))?;
            }
        }
        if root.exists() {
            std::fs::remove_dir(root).map_err(pin_err(root, "remove directory"))?;
        }
        Ok(())
    }
}
