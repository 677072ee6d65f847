//! Names and `#[repr(C)]` types shared by the kernel programs (`mesh-ebpf`) and the agent.
//!
//! Both sides must agree on every byte of a map key or value, so each type here carries a
//! compile-time size assertion and explicit padding. The eBPF side cannot reference these name
//! constants from its `#[map]` attributes (those take literals), so a kernel test checks that every
//! constant below names a map or program that really exists in the built object.
#![no_std]
#![deny(missing_docs)]

/// Ports the agent opens inside every enrolled pod's network namespace.
pub mod ports {
    /// Outbound capture: `cgroup/connect{4,6}` rewrites a pod's connects to `127.0.0.1:15001`.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext: `sk_lookup` steers connections to the pod's own ports here.
    pub const INBOUND: u16 = 15006;
    /// Inbound HBONE (HTTP/2 CONNECT over mTLS) from other nodes.
    pub const HBONE: u16 = 15008;
}

/// Program names (the function names in `mesh-ebpf`, which aya uses as program names).
pub mod programs {
    /// `cgroup/connect4`: redirects IPv4 TCP connects of enrolled pods.
    pub const CONNECT4: &str = "mesh_connect4";
    /// `cgroup/connect6`: redirects IPv6 TCP connects of enrolled pods.
    pub const CONNECT6: &str = "mesh_connect6";
    /// `sock_ops`: re-keys the original destination from socket cookie to (netns, port).
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    /// `sk_lookup`: steers inbound connections in a pod's netns to the proxy's listeners.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// `sk_skb/stream_verdict`, attached to [`SPLICE_SOURCES`](crate::maps::SPLICE_SOURCES):
    /// moves a spliced same-node connection's bytes to its peer socket inside the kernel.
    pub const SPLICE_VERDICT: &str = "mesh_splice_verdict";
    /// `sock_ops` attached to the agent's own cgroup: enters the proxy's loopback sockets (its
    /// accepted 15001 connections and its deliveries to applications) in
    /// [`LOOP_SOCKS`](crate::maps::LOOP_SOCKS).
    pub const PROXY_SOCK_OPS: &str = "mesh_proxy_sock_ops";
    /// `sk_msg`, attached to [`LOOP_SOCKS`](crate::maps::LOOP_SOCKS): moves each message sent
    /// between a pod and the proxy over the pod's loopback straight into the receiver's queue.
    pub const LOOP_MSG: &str = "mesh_loop_msg";
    /// `fexit` on the kernel's `sk_msg_recvmsg`: counts what each bypassing socket's reader
    /// took from its bypass queue, which paces the sender ([`LOOP_WINDOW`](crate::LOOP_WINDOW)).
    /// Optional: tracing programs need BTF and a kernel that allows them, so it is not in
    /// [`ALL`]; without it the bypass falls back to a lifetime budget.
    pub const LOOP_READ: &str = "mesh_loop_read";
    /// The same count on `__sk_msg_recvmsg`, which kernels with the `copied_from_self` fix
    /// (6.1.13x and later stable releases, 6.15+) have: TCP's read calls it directly, past
    /// `sk_msg_recvmsg`. It takes one argument more, so the return value sits one slot later.
    pub const LOOP_READ_INNER: &str = "mesh_loop_read_inner";
    /// The kernel functions [`LOOP_READ`] and [`LOOP_READ_INNER`] attach to, in that order:
    /// each returns the bytes a read took from a socket's sockmap queue.
    pub const LOOP_READ_TARGETS: [&str; 2] = ["sk_msg_recvmsg", "__sk_msg_recvmsg"];
    /// Every program in the object, for tests and for pinning.
    pub const ALL: [&str; 7] = [
        CONNECT4,
        CONNECT6,
        SOCK_OPS,
        SK_LOOKUP,
        SPLICE_VERDICT,
        PROXY_SOCK_OPS,
        LOOP_MSG,
    ];
}

/// Map names (the static names in `mesh-ebpf`; the kernel truncates names to 15 bytes).
pub mod maps {
    /// LRU hash: socket cookie → [`OrigDst`](crate::OrigDst), written at connect time.
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_COOKIE";
    /// LRU hash: [`OrigDstKey`](crate::OrigDstKey) → [`OrigDst`](crate::OrigDst), written at
    /// ESTABLISHED, read (and deleted) by the proxy on accept.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// Per-CPU hash: netns cookie → [`PodStats`](crate::PodStats).
    pub const POD_STATS: &str = "POD_STATS";
    /// Sock hash: [`InboundKey`](crate::InboundKey) → listening socket for `sk_lookup`.
    pub const INBOUND_SOCKS: &str = "INBOUND_SOCKS";
    /// Per-CPU hash: pod address ([`IpKey`](crate::IpKey)) → [`InboundStats`](crate::InboundStats).
    /// `sk_lookup` only steers addresses present here, so it doubles as the enrolled-address set.
    pub const INBOUND_STATS: &str = "INBOUND_STATS";
    /// Hash: destination port (host order, `u16`) → `u8`; connects to these ports are not captured.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// Hash: pod address ([`IpKey`](crate::IpKey)) → `u8`; present = the pod is STRICT mTLS, so
    /// `sk_lookup` refuses plaintext to it in the kernel, before any byte is accepted.
    pub const STRICT_ADDRS: &str = "STRICT_ADDRS";
    /// Hash: [`PortKey`](crate::PortKey) → `u8`, a port's own mode where it differs from its
    /// pod's (PeerAuthentication `portLevelMtls`): 1 refuses plaintext to that port, 0 passes
    /// it. Looked up before [`STRICT_ADDRS`].
    pub const MTLS_PORTS: &str = "MTLS_PORTS";
    /// Per-CPU array: [`events`](crate::events) index → `u64` count, node-wide.
    pub const EVENTS: &str = "EVENTS";
    /// Sock hash: socket cookie → a proxy socket being spliced; the redirect targets. No program
    /// is attached to it, so entering it does not change how a socket's data flows.
    pub const SPLICE_TARGETS: &str = "SPLICE_TARGETS";
    /// Sock hash: socket cookie → the same sockets, entered only once both ends of the pair are in
    /// [`SPLICE_TARGETS`]; the verdict program is attached here. Pinned like every map, so an
    /// old agent draining during an upgrade keeps its spliced connections working.
    pub const SPLICE_SOURCES: &str = "SPLICE_SOURCES";
    /// Hash: socket cookie → [`SplicePeer`](crate::SplicePeer), the socket its bytes go to.
    pub const SPLICE_PEERS: &str = "SPLICE_PEERS";
    /// Sock hash: [`LoopKey`](crate::LoopKey) → one end of a pod↔proxy loopback connection.
    /// The `sk_msg` program is attached here, and redirects only between sockets in it.
    pub const LOOP_SOCKS: &str = "LOOP_SOCKS";
    /// LRU hash: [`LoopKey`](crate::LoopKey) → [`LoopState`](crate::LoopState): whether that
    /// socket's sends bypass TCP, and how many more bytes may. A missing entry means TCP, which
    /// is always safe.
    pub const LOOP_MODES: &str = "LOOP_MODES";
    /// Array of one `u32`: 1 while an agent runs the loopback bypass. Pod sockets enter
    /// [`LOOP_SOCKS`] only then, so with the bypass off they never leave plain TCP.
    pub const LOOP_ENABLED: &str = "LOOP_ENABLED";
    /// LRU hash: [`LoopKey`](crate::LoopKey) → [`LoopPace`](crate::LoopPace): a bypassing
    /// socket's own cookie and the bytes it has bypassed, when the bypass is paced.
    pub const LOOP_PACE: &str = "LOOP_PACE";
    /// LRU hash: socket cookie → `u64` bytes its reader took from its bypass queue, counted by
    /// [`programs::LOOP_READ`](crate::programs::LOOP_READ) for sockets entered while paced.
    pub const LOOP_READ: &str = "LOOP_READ";
    /// Every map in the object, for tests and for pinning.
    pub const ALL: [&str; 17] = [
        ORIG_DST_BY_COOKIE,
        ORIG_DST,
        POD_STATS,
        INBOUND_SOCKS,
        INBOUND_STATS,
        EXCLUDED_PORTS,
        STRICT_ADDRS,
        MTLS_PORTS,
        EVENTS,
        SPLICE_TARGETS,
        SPLICE_SOURCES,
        SPLICE_PEERS,
        LOOP_SOCKS,
        LOOP_MODES,
        LOOP_ENABLED,
        LOOP_PACE,
        LOOP_READ,
    ];
}

/// What the kernel programs count, node-wide, in the per-CPU array [`maps::EVENTS`]: one slot
/// per (hook, outcome, reason), so an operator can see why a connection was or was not captured
/// without tracing the kernel. [`events::LABELS`] gives each slot's labels, in index order.
pub mod events {
    /// `connect4` redirected an IPv4 TCP connect to the proxy.
    pub const CONNECT_REDIRECTED_V4: u32 = 0;
    /// `connect6` redirected an IPv6 TCP connect to the proxy.
    pub const CONNECT_REDIRECTED_V6: u32 = 1;
    /// A connect to a loopback address was left alone.
    pub const CONNECT_PASS_LOOPBACK: u32 = 2;
    /// A connect to an excluded port was left alone.
    pub const CONNECT_PASS_EXCLUDED_PORT: u32 = 3;
    /// A non-TCP connect (UDP) was left alone.
    pub const CONNECT_PASS_NOT_TCP: u32 = 4;
    /// A redirected connect whose original destination could not be recorded (the proxy will
    /// refuse it: it cannot know where it was going).
    pub const CONNECT_RECORD_FAILED: u32 = 5;
    /// `sock_ops` re-keyed a captured connection's record at ESTABLISHED.
    pub const SOCKOPS_REKEYED: u32 = 6;
    /// `sock_ops` could not store the re-keyed record.
    pub const SOCKOPS_REKEY_FAILED: u32 = 7;
    /// `sk_lookup` steered a connection to the pod's 15006 listener.
    pub const LOOKUP_STEERED_INBOUND: u32 = 8;
    /// `sk_lookup` steered a connection to the pod's 15008 (HBONE) listener.
    pub const LOOKUP_STEERED_HBONE: u32 = 9;
    /// `sk_lookup` passed a connection that arrived on loopback (the proxy's own delivery).
    pub const LOOKUP_PASS_LOOPBACK: u32 = 10;
    /// `sk_lookup` passed a non-TCP lookup.
    pub const LOOKUP_PASS_NOT_TCP: u32 = 11;
    /// `sk_lookup` passed a connection to an address that is not an enrolled pod's.
    pub const LOOKUP_PASS_NOT_ENROLLED: u32 = 12;
    /// `sk_lookup` dropped plaintext to a STRICT pod.
    pub const LOOKUP_DROP_STRICT: u32 = 13;
    /// `sk_lookup` dropped a connection because the proxy had no listener (agent down).
    pub const LOOKUP_DROP_NO_LISTENER: u32 = 14;
    /// The splice verdict found no peer for a socket in `SPLICE_SOURCES` and let its bytes go to
    /// the proxy instead (only while a pair is being taken apart).
    pub const SPLICE_PASS_UNPAIRED: u32 = 15;
    /// The splice verdict dropped bytes because the peer socket had left `SPLICE_TARGETS` (it
    /// closed; the proxy closes the other end next).
    pub const SPLICE_DROP_NO_PEER: u32 = 16;
    /// A pod↔proxy loopback socket entered [`LOOP_SOCKS`](crate::maps::LOOP_SOCKS).
    pub const LOOP_ENTERED: u32 = 17;
    /// A loopback socket could not enter the map (full): it stays on TCP.
    pub const LOOP_ENTER_FAILED: u32 = 18;
    /// A connecting socket's first send found its peer in the map: its sends bypass TCP.
    pub const LOOP_BYPASSED: u32 = 19;
    /// A connecting socket's first send came before its peer entered the map: it stays on TCP
    /// for good, since later bypassed bytes could overtake the ones TCP still carries.
    pub const LOOP_TCP_EARLY_SEND: u32 = 20;
    /// A bypassing socket's peer had left the map (it closed): the send goes by TCP, which
    /// reports the closed peer as TCP always does.
    pub const LOOP_TCP_PEER_GONE: u32 = 21;
    /// A bypassing socket reached its limit: it used up its
    /// [`LOOP_BUDGET`](crate::LOOP_BUDGET), or, when paced, its peer's reader fell
    /// [`LOOP_WINDOW`](crate::LOOP_WINDOW) behind. It goes on by TCP, whose receive window
    /// bounds what waits for a slow reader. (One slot for both: the events array is pinned, and
    /// a new slot would change its size under an agent being upgraded.)
    pub const LOOP_TCP_LIMIT: u32 = 22;
    /// Number of slots.
    pub const COUNT: u32 = 23;
    /// `(hook, outcome, reason)` of each slot, in index order (`-`: no reason).
    pub const LABELS: [(&str, &str, &str); COUNT as usize] = [
        ("connect4", "redirected", "-"),
        ("connect6", "redirected", "-"),
        ("connect", "passed", "loopback"),
        ("connect", "passed", "excluded_port"),
        ("connect", "passed", "not_tcp"),
        ("connect", "error", "record_failed"),
        ("sock_ops", "rekeyed", "-"),
        ("sock_ops", "error", "rekey_failed"),
        ("sk_lookup", "steered", "inbound"),
        ("sk_lookup", "steered", "hbone"),
        ("sk_lookup", "passed", "loopback"),
        ("sk_lookup", "passed", "not_tcp"),
        ("sk_lookup", "passed", "not_enrolled"),
        ("sk_lookup", "dropped", "strict_plaintext"),
        ("sk_lookup", "dropped", "no_listener"),
        ("splice", "passed", "unpaired"),
        ("splice", "dropped", "no_peer"),
        ("loopback", "entered", "-"),
        ("loopback", "error", "map_full"),
        ("loopback", "bypassed", "-"),
        ("loopback", "tcp", "early_send"),
        ("loopback", "tcp", "peer_gone"),
        ("loopback", "tcp", "limit_reached"),
    ];
}

/// Capacity of the original-destination maps. LRU, so a burst of failed connects can only evict
/// stale entries, never block new ones.
pub const ORIG_DST_CAPACITY: u32 = 65_536;
/// Most enrolled pods one node can hold.
pub const MAX_PODS: u32 = 1024;

/// Sockets the splice maps hold: two per same-node connection spliced in the kernel. A pair that
/// finds them full is relayed by the proxy instead.
pub const SPLICE_CAPACITY: u32 = 65_536;

/// Sockets the loopback bypass can hold: two per pod↔proxy hop (client and proxy on 15001,
/// proxy and application on delivery). A socket that finds it full stays on TCP.
pub const LOOP_CAPACITY: u32 = 65_536;

/// Bytes one socket may send through the loopback bypass in its lifetime; it then goes on by
/// TCP. The bypass has no flow control (the kernel queues whatever the sender sends, until the
/// node's TCP memory runs out), so this is what bounds the bytes waiting for a slow reader: as
/// much as a TCP receive buffer may hold at its default size on these machines, times 32.
pub const LOOP_BUDGET: u32 = 4 << 20;

/// Bytes a paced bypassing socket may have sent that its peer's reader has not taken yet. A
/// reader that keeps up never reaches it, so its connection bypasses TCP for its whole life; one
/// that falls this far behind moves its sender to TCP for good, so no more than this ever waits
/// in a bypass queue.
pub const LOOP_WINDOW: u64 = 1 << 20;

/// The value of [`maps::LOOP_ENABLED`]: whether and how sockets enter the bypass.
pub mod loop_enabled {
    /// Off: no socket enters.
    pub const OFF: u32 = 0;
    /// On, each socket bypassing its first [`LOOP_BUDGET`](crate::LOOP_BUDGET) bytes.
    pub const BUDGET: u32 = 1;
    /// On, each socket bypassing while its reader is within
    /// [`LOOP_WINDOW`](crate::LOOP_WINDOW) (needs [`programs::LOOP_READ`](crate::programs::LOOP_READ)).
    pub const PACED: u32 = 2;

    /// The mode's name in `/config_dump` (`loop_bypass`): "off", "budget" or "paced". Any
    /// other value is named as the programs treat it: on, with the budget.
    pub const fn name(how: u32) -> &'static str {
        match how {
            OFF => "off",
            PACED => "paced",
            _ => "budget",
        }
    }
}

/// A paced bypassing socket's own socket cookie (its reader's counter in
/// [`maps::LOOP_READ`]) and the bytes it has sent through the bypass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopPace {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// Bytes it has bypassed into its peer's queue.
    pub sent: u64,
}
const _: () = assert!(core::mem::size_of::<LoopPace>() == 16);

/// [`LoopState::mode`] values. The order of bytes is only at risk when a socket switches
/// from TCP to the bypass (the receiver reads its bypass queue first), so that switch happens
/// at most once, before the socket's first byte, and never later.
pub mod loop_mode {
    /// A connecting socket that has not sent yet: its first send decides.
    pub const UNDECIDED: u32 = 1;
    /// Sends go straight into the peer's receive queue.
    pub const BYPASS: u32 = 2;
    /// Sends go by TCP, for good.
    pub const TCP: u32 = 3;
}

/// One socket's state in [`maps::LOOP_MODES`]. Only that socket's `sk_msg` runs write it after
/// entry, one at a time under the socket's lock.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopState {
    /// A [`loop_mode`] value.
    pub mode: u32,
    /// Bytes it may still bypass; starts at [`LOOP_BUDGET`].
    pub left: u32,
}
const _: () = assert!(core::mem::size_of::<LoopState>() == 8);

/// One end of a pod↔proxy connection over a pod's loopback, as its own socket sees it. The
/// netns cookie is part of the key because every pod has its own 127.0.0.1 and port space; the
/// peer's key is this one with the two sides swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoopKey {
    /// `bpf_get_netns_cookie` of the namespace both ends live in.
    pub netns_cookie: u64,
    /// Local IPv4 address, network byte order, as the kernel stores it.
    pub local_ip4: u32,
    /// Remote IPv4 address, network byte order.
    pub remote_ip4: u32,
    /// Local port, host byte order.
    pub local_port: u32,
    /// Remote port, host byte order.
    pub remote_port: u32,
}
const _: () = assert!(core::mem::size_of::<LoopKey>() == 24);

impl LoopKey {
    /// The key the other end of this connection is stored under.
    pub const fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// `AF_INET`, as stored in [`OrigDst::family`].
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as stored in [`OrigDst::family`].
pub const AF_INET6: u16 = 10;

/// Where a captured connection was going before `cgroup/connect*` rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Destination address in network byte order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Keeps the size a multiple of 8 so both sides agree without relying on implicit padding.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 24);

/// How the proxy finds a captured connection's [`OrigDst`]: the client's network namespace and
/// its local port. The port alone is not enough, because every pod has its own port space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    /// `bpf_get_netns_cookie` of the client's namespace (`SO_NETNS_COOKIE` on the proxy side).
    pub netns_cookie: u64,
    /// The client's local (ephemeral) port, host byte order.
    pub port: u16,
    /// Explicit padding: hash keys are compared bytewise, so it must be zeroed on both sides.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<OrigDstKey>() == 16);

impl OrigDstKey {
    /// A key with zeroed padding.
    pub const fn new(netns_cookie: u64, port: u16) -> Self {
        Self {
            netns_cookie,
            port,
            _pad: [0; 6],
        }
    }
}

/// One end of a spliced connection, in [`maps::SPLICE_PEERS`] under its own socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// Cookie of the socket this one's incoming bytes are sent out of.
    pub peer: u64,
    /// Bytes moved so far. Only this socket's verdict writes it, and a socket's verdicts run one
    /// at a time under its lock, so a plain add is exact.
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<SplicePeer>() == 16);

/// Per-pod counters kept by the connect hooks; the agent reads them for `/stats`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// IPv4 TCP connects redirected to the proxy.
    pub captured_v4: u64,
    /// IPv6 TCP connects redirected to the proxy.
    pub captured_v6: u64,
    /// Connects left alone: loopback destinations and excluded ports.
    pub bypassed: u64,
}
const _: () = assert!(core::mem::size_of::<PodStats>() == 24);

/// Which of a pod's inbound listeners a steered connection goes to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// The 15006 plaintext listener.
    Inbound = 0,
    /// The 15008 HBONE listener.
    Hbone = 1,
}

/// An address key (v4 in the first 4 bytes, network order), zero-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpKey {
    /// The address bytes.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IpKey>() == 16);

impl IpKey {
    /// Key for an IPv4 address given as its four bytes in network order.
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Self { addr }
    }
}

/// Key of [`maps::INBOUND_SOCKS`]: the pod's address and the listener to steer to. Keyed by the
/// pod address because `sk_lookup` has no netns cookie helper, and pod addresses are unique.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    /// The pod's address.
    pub ip: IpKey,
    /// A [`ListenerKind`] as `u32`.
    pub kind: u32,
    /// Explicit padding, zeroed.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<InboundKey>() == 24);

impl InboundKey {
    /// A key with zeroed padding.
    pub const fn new(ip: IpKey, kind: ListenerKind) -> Self {
        Self {
            ip,
            kind: kind as u32,
            _pad: 0,
        }
    }
}

/// A pod's address and one of its ports (host order, as `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// The pod's address.
    pub ip: IpKey,
    /// The port.
    pub port: u32,
    /// Explicit padding, zeroed.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 24);

impl PortKey {
    /// A key with zeroed padding.
    pub const fn new(ip: IpKey, port: u16) -> Self {
        Self {
            ip,
            port: port as u32,
            _pad: 0,
        }
    }
}

/// Per-pod counters kept by `sk_lookup`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundStats {
    /// Connections steered to the 15006 listener.
    pub steered_inbound: u64,
    /// Connections steered to the 15008 listener.
    pub steered_hbone: u64,
    /// Connections refused because the proxy had no listener (agent down): fail closed.
    pub refused_no_listener: u64,
    /// Plaintext connections refused because the pod is STRICT mTLS.
    pub refused_strict: u64,
}
const _: () = assert!(core::mem::size_of::<InboundStats>() == 32);

/// `aya::Pod` impls. SAFETY (each impl): the type is `#[repr(C)]`, `Copy`, made only of integers
/// and byte arrays, with no implicit padding (sizes asserted above), so every bit pattern is valid.
#[cfg(feature = "user")]
mod user {
    use crate::{
        InboundKey, InboundStats, IpKey, LoopKey, OrigDst, OrigDstKey, PodStats, PortKey,
        SplicePeer,
    };

    // SAFETY: see the module doc.
    unsafe impl aya::Pod for LoopKey {}

    // SAFETY: see the module doc.
    unsafe impl aya::Pod for OrigDst {}
    // SAFETY: see the module doc.
    unsafe impl aya::Pod for OrigDstKey {}
    // SAFETY: see the module doc.
    unsafe impl aya::Pod for SplicePeer {}
    // SAFETY: see the module doc.
    unsafe impl aya::Pod for PodStats {}
    // SAFETY: see the module doc.
    unsafe impl aya::Pod for IpKey {}
    // SAFETY: see the module doc.
    unsafe impl aya::Pod for InboundKey {}
    // SAFETY: see the module doc.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: see the module doc.
    unsafe impl aya::Pod for InboundStats {}
}
