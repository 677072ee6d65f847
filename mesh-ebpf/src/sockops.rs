//! `sock_ops`: at ACTIVE_ESTABLISHED, move a captured socket's original destination from its
//! socket-cookie key to (netns cookie, local port).
//!
//! Why this and not a `cgroup/getsockopt` answer to SO_ORIGINAL_DST: getsockopt hooks run for
//! the cgroup of the *calling* socket, which on the proxy side is the agent's accepted socket, not
//! the pod's; the proxy would still need a key that ties its socket back to the client's. The
//! client's (netns, port) is that key, and the kernel runs this callback before it sends the
//! final ACK of the handshake, so the entry exists before the proxy can accept the connection.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use mesh_common::{OrigDstKey, events};

use crate::maps::{ORIG_DST, ORIG_DST_COOKIE, event};

pub fn on_sock_ops(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return;
    }
    // SAFETY: both helpers only read the context's socket and netns.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(dst) = (unsafe { ORIG_DST_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    // SAFETY: as above.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = OrigDstKey::new(netns, ctx.local_port() as u16);
    if ORIG_DST.insert(&key, &dst, 0).is_ok() {
        event(events::SOCKOPS_REKEYED);
    } else {
        event(events::SOCKOPS_REKEY_FAILED);
    }
    let _ = ORIG_DST_COOKIE.remove(&cookie);
}
