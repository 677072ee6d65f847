//! `sock_ops` on pods' cgroups: at ACTIVE_ESTABLISHED, move a captured socket's original
//! destination from its socket-cookie key to (netns cookie, local port), and enter the socket in
//! the loopback bypass; at PASSIVE_ESTABLISHED, enter an application's socket accepted from the
//! proxy's delivery (`loopback`). `on_proxy_sock_ops` does the same for the agent's cgroup.
//!
//! Why this and not a `cgroup/getsockopt` answer to SO_ORIGINAL_DST: getsockopt hooks run for
//! the cgroup of the *calling* socket, which on the proxy side is the agent's accepted socket, not
//! the pod's; the proxy would still need a key that ties its socket back to the client's. The
//! client's (netns, port) is that key, and the kernel runs this callback before it sends the
//! final ACK of the handshake, so the entry exists before the proxy can accept the connection.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use mesh_common::{OrigDstKey, events};

use crate::{
    loopback,
    maps::{ORIG_DST, ORIG_DST_COOKIE, event},
};

pub fn on_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if rekey(ctx) {
                loopback::enter_connecting(ctx);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => loopback::enter_accepted(ctx),
        BPF_SOCK_OPS_STATE_CB => loopback::on_state(ctx),
        _ => {}
    }
}

/// `sock_ops` on the agent's own cgroup: its loopback connections to applications and the
/// connections it accepts on 15001.
pub fn on_proxy_sock_ops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => loopback::enter_connecting(ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => loopback::enter_accepted(ctx),
        BPF_SOCK_OPS_STATE_CB => loopback::on_state(ctx),
        _ => {}
    }
}

/// Re-keys a captured socket's original destination; false if the socket was not captured.
fn rekey(ctx: &SockOpsContext) -> bool {
    // SAFETY: both helpers only read the context's socket and netns.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(dst) = (unsafe { ORIG_DST_COOKIE.get(&cookie) }).copied() else {
        return false;
    };
    // SAFETY: as above.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = OrigDstKey::new(netns, ctx.local_port() as u16);
    if ORIG_DST.insert(&key, &dst, 0).is_ok() {
        event(events::SOCKOPS_REKEYED);
    } else {
        event(events::SOCKOPS_REKEY_FAILED);
        aya_log_ebpf::warn!(
            ctx,
            "sock_ops: a captured connection's original destination could not be re-keyed (map full?): the proxy will refuse it"
        );
    }
    let _ = ORIG_DST_COOKIE.remove(&cookie);
    true
}
