//! `cgroup/connect{4,6}`: redirect an enrolled pod's outbound TCP connects to the node proxy.
//!
//! Stages: classify (is this ours to capture?) → record the original destination by socket
//! cookie → rewrite the destination to the proxy's outbound listener on the pod's loopback.
//! The hook is attached only to enrolled pods' cgroups, so attachment is enrollment; there is no
//! "proxy ready" check here on purpose: if the proxy is down the rewritten connect is refused,
//! which is the fail-closed behaviour we want.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use mesh_common::{AF_INET, AF_INET6, OrigDst, PodStats, events, ports};

use crate::maps::{EXCLUDED_PORTS, ORIG_DST_COOKIE, POD_STATS, bump, event};

const SOCK_STREAM: u32 = 1;
const LOOPBACK_V4: u32 = u32::from_be_bytes([127, 0, 0, 1]);

/// What to do with a connect. There is deliberately no socket-mark exemption: a privileged pod
/// could set any mark, so the agent stays uncaptured by never being in an enrolled cgroup.
enum Verdict {
    Capture,
    /// Left alone, for the reason this `events` index names.
    Bypass(u32),
    NotTcp,
}

fn classify(ctx: &SockAddrContext, dst_is_loopback: bool, port: u16) -> Verdict {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the duration of the program.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return Verdict::NotTcp;
    }
    if dst_is_loopback {
        return Verdict::Bypass(events::CONNECT_PASS_LOOPBACK);
    }
    // SAFETY: the value is only tested for presence.
    if unsafe { EXCLUDED_PORTS.get(&port) }.is_some() {
        return Verdict::Bypass(events::CONNECT_PASS_EXCLUDED_PORT);
    }
    Verdict::Capture
}

fn stats(ctx: &SockAddrContext) -> Option<*mut PodStats> {
    // SAFETY: the helper only reads the context's netns.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    POD_STATS.get_ptr_mut(&netns)
}

fn record(ctx: &SockAddrContext, dst: OrigDst) -> bool {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_DST_COOKIE.insert(&cookie, &dst, 0).is_ok()
}

/// Counts, and for a capture records the destination and lets `rewrite` point the socket at
/// the proxy. Shared by both families so they cannot drift apart. `redirected` is the family's
/// `events` index.
fn handle(
    ctx: &SockAddrContext,
    loopback: bool,
    dst: OrigDst,
    (counter, redirected): (fn(*mut PodStats) -> *mut u64, u32),
    rewrite: impl FnOnce(),
) {
    let field = match classify(ctx, loopback, dst.port) {
        Verdict::NotTcp => {
            event(events::CONNECT_PASS_NOT_TCP);
            return;
        }
        Verdict::Bypass(reason) => {
            event(reason);
            // SAFETY: only computes a field address inside a live map value.
            (|s: *mut PodStats| unsafe { &raw mut (*s).bypassed }) as fn(_) -> _
        }
        Verdict::Capture => {
            // Without a record the proxy cannot route the connection and will refuse it; not
            // rewriting would bypass the mesh, so rewrite regardless.
            if !record(ctx, dst) {
                event(events::CONNECT_RECORD_FAILED);
                aya_log_ebpf::warn!(
                    ctx,
                    "connect: a captured connect's original destination could not be recorded (map full?): the proxy will refuse it"
                );
            }
            rewrite();
            event(redirected);
            counter
        }
    };
    if let Some(s) = stats(ctx) {
        bump(field(s));
    }
}

pub fn on_connect4(ctx: &SockAddrContext) {
    // SAFETY: see `classify`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip_be = sa.user_ip4;
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&ip_be.to_ne_bytes());
    let dst = OrigDst {
        addr,
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET,
        _pad: 0,
    };
    let loopback = u32::from_be(ip_be) >> 24 == 127;
    // SAFETY: only computes a field address inside a live map value.
    let counter = |s: *mut PodStats| unsafe { &raw mut (*s).captured_v4 };
    handle(
        ctx,
        loopback,
        dst,
        (counter, events::CONNECT_REDIRECTED_V4),
        || {
            sa.user_ip4 = LOOPBACK_V4.to_be();
            sa.user_port = u32::from(ports::OUTBOUND.to_be());
        },
    );
}

pub fn on_connect6(ctx: &SockAddrContext) {
    // SAFETY: see `classify`.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip = sa.user_ip6;
    let mut addr = [0u8; 16];
    for (i, w) in ip.iter().enumerate() {
        addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let dst = OrigDst {
        addr,
        port: u16::from_be(sa.user_port as u16),
        family: AF_INET6,
        _pad: 0,
    };
    // ::1, or an IPv4-mapped 127.0.0.0/8.
    let loopback = (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1u32.to_be())
        || (ip[0] == 0
            && ip[1] == 0
            && ip[2] == 0xffffu32.to_be()
            && u32::from_be(ip[3]) >> 24 == 127);
    // SAFETY: only computes a field address inside a live map value.
    let counter = |s: *mut PodStats| unsafe { &raw mut (*s).captured_v6 };
    handle(
        ctx,
        loopback,
        dst,
        (counter, events::CONNECT_REDIRECTED_V6),
        || {
            sa.user_ip6 = [0, 0, 0, 1u32.to_be()];
            sa.user_port = u32::from(ports::OUTBOUND.to_be());
        },
    );
}
