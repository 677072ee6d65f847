//! The loopback bypass: bytes between a pod and the node proxy cross the pod's loopback without
//! TCP. Both ends of each such connection sit in `LOOP_SOCKS`, and `sk_msg` moves every message
//! one of them sends straight into the other's receive queue (`BPF_F_INGRESS`): no segments, no
//! ACKs, no softirq work, one copy.
//!
//! Which sockets enter, at ESTABLISHED (`sock_ops`):
//! - a pod's captured connect to 15001 (pod cgroup, connecting end);
//! - the proxy's delivery to an application over the pod's loopback (agent cgroup, connecting);
//! - the accepted end of either, but only when its connecting peer is already in.
//!
//! Invariants:
//! - A socket's `LOOP_MODES` entry exists from its entry until it leaves ESTABLISHED and
//!   CLOSE_WAIT (it closed, was reset or shut its writing side: `STATE_CB`), and it is what "the
//!   peer is in" means: `sock_ops` may not call `bpf_sk_release`, so it cannot look a socket up
//!   in the sock hash (the lookup takes a reference). Once it is gone, the peer's sends go by
//!   TCP, the safe way round.
//! - Bytes never overtake each other. The receiver reads its bypass queue before its TCP queue,
//!   so a socket may go from bypass to TCP, never the other way once TCP carried a byte. An
//!   accepted end enters before its application can send; a connecting end decides at its
//!   first send (`loop_mode`), and if its peer is not in yet it stays on TCP for good.
//! - A missing mode means TCP, so an LRU eviction can only move a socket the safe way.
//! - FIN, RST and errors still travel by TCP, behind every byte sent before them.
//! - The kernel gives the bypass no flow control: a send lands in the peer's queue whatever the
//!   peer has read. So a socket bypasses only while its peer's reader keeps up:
//!   - paced (`LOOP_ENABLED` = `PACED`, when the agent could attach `fexit` on the kernel's
//!     sockmap read: `__sk_msg_recvmsg` where it exists, as on Debian's 6.1 whose TCP read
//!     calls it directly, else `sk_msg_recvmsg`): `on_read` counts what each entered socket's reader took from its
//!     bypass queue in `LOOP_READ`, and a send that would put more than `LOOP_WINDOW` unread
//!     bytes in the peer's queue goes by TCP, and so does every later one;
//!   - budget (`BUDGET`, no tracing programs): each socket bypasses its first `LOOP_BUDGET`
//!     bytes and then goes on by TCP.
//!
//!   Either way no more than the limit ever waits in a receiver's bypass queue, and a counter
//!   that is missing (evicted, or the reader's `fexit` gone with its agent) counts as a reader
//!   that took nothing: the safe way round.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_STATE_CB_FLAG, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{FExitContext, SkMsgContext, SockOpsContext},
};
use mesh_common::{
    AF_INET, LOOP_BUDGET, LOOP_WINDOW, LoopKey, LoopPace, LoopState, events, loop_enabled,
    loop_mode,
};

use crate::maps::{LOOP_ENABLED, LOOP_MODES, LOOP_PACE, LOOP_READ, LOOP_SOCKS, event};

/// `sock_ops` and `sk_msg` give the remote port as the network-order port shifted into the
/// upper half (the local port is host order); keys hold both in host order.
fn remote_port(raw: u32) -> u32 {
    u32::from(u16::from_be((raw >> 16) as u16))
}

fn is_loopback(ip_be: u32) -> bool {
    u32::from_be(ip_be) >> 24 == 127
}

/// `LOOP_ENABLED`'s value: a `loop_enabled` constant.
fn enabled() -> u32 {
    LOOP_ENABLED.get(0).copied().unwrap_or(loop_enabled::OFF)
}

/// TCP states (include/net/tcp_states.h) in which a socket still receives.
const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE_WAIT: u32 = 8;

/// Whether the socket `key` names is in the bypass and still receiving.
fn present(key: &LoopKey) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { LOOP_MODES.get(key) }.is_some()
}

/// The key of `ctx`'s socket, if it is an IPv4 socket talking to a loopback address.
fn sock_ops_key(ctx: &SockOpsContext) -> Option<LoopKey> {
    if ctx.family() != u32::from(AF_INET) || !is_loopback(ctx.remote_ip4()) {
        return None;
    }
    Some(LoopKey {
        // SAFETY: reads the netns of the context's socket.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_ip4: ctx.local_ip4(),
        remote_ip4: ctx.remote_ip4(),
        local_port: ctx.local_port(),
        remote_port: remote_port(ctx.remote_port()),
    })
}

fn enter(ctx: &SockOpsContext, mut key: LoopKey, mode: u32, how: u32) {
    // SAFETY: the kernel passes a valid `bpf_sock_ops` for the duration of the program.
    let ops = unsafe { &mut *ctx.ops };
    // Paced: the reader's counter and the sender's tally exist before the socket can send or
    // receive a byte through the bypass; without them its sends go by TCP.
    if how == loop_enabled::PACED {
        // SAFETY: reads the cookie of the context's socket.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if LOOP_READ.insert(&cookie, &0, 0).is_err()
            || LOOP_PACE
                .insert(&key, &LoopPace { cookie, sent: 0 }, 0)
                .is_err()
        {
            let _ = LOOP_READ.remove(&cookie);
            event(events::LOOP_ENTER_FAILED);
            return;
        }
    }
    if LOOP_SOCKS
        .update(&mut key, ops, u64::from(BPF_ANY))
        .is_err()
        || ctx
            .set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32)
            .is_err()
        || LOOP_MODES
            .insert(
                &key,
                &LoopState {
                    mode,
                    left: LOOP_BUDGET,
                },
                0,
            )
            .is_err()
    {
        forget_pace(&key);
        event(events::LOOP_ENTER_FAILED);
        aya_log_ebpf::warn!(
            ctx,
            "loopback bypass: the socket map is full; this connection stays on TCP"
        );
        return;
    }
    event(events::LOOP_ENTERED);
}

/// `STATE_CB` of an entered socket: once it stops receiving, its peer's sends go by TCP (the
/// safe way round), and its entry is freed.
pub fn on_state(ctx: &SockOpsContext) {
    let new = ctx.arg(1);
    if new == TCP_ESTABLISHED || new == TCP_CLOSE_WAIT {
        return;
    }
    if let Some(key) = sock_ops_key(ctx) {
        let _ = LOOP_MODES.remove(&key);
        forget_pace(&key);
    }
}

/// Frees a paced socket's tally and its reader's counter (nothing when it has none).
fn forget_pace(key: &LoopKey) {
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(pace) = unsafe { LOOP_PACE.get(key) }.copied() {
        let _ = LOOP_READ.remove(&pace.cookie);
        let _ = LOOP_PACE.remove(key);
    }
}

/// `fexit` on `[__]sk_msg_recvmsg(sk, psock, msg, len, flags, …)`: what a read took from
/// `sk`'s bypass queue. `ret` is the slot of the return value, which follows the arguments in
/// a tracing program's context. Only sockets entered while paced have a counter; a peek takes
/// nothing.
pub fn on_read(ctx: &FExitContext, ret: usize) {
    const MSG_PEEK: i32 = 2;
    let sk: *mut core::ffi::c_void = ctx.arg(0);
    let flags: i32 = ctx.arg(4);
    let took: i32 = ctx.arg(ret);
    if took <= 0 || flags & MSG_PEEK != 0 {
        return;
    }
    // SAFETY: `sk` is the traced function's socket, a pointer the verifier knows by its type.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if let Some(read) = LOOP_READ.get_ptr_mut(&cookie) {
        // SAFETY: a live map value. Reads of one socket run one at a time under its lock, so
        // this is the only writer; the sender only loads it.
        unsafe { *read += took as u64 };
    }
}

/// A connecting end at ACTIVE_ESTABLISHED: in, undecided until its first send.
pub fn enter_connecting(ctx: &SockOpsContext) {
    let how = enabled();
    if how == loop_enabled::OFF {
        return;
    }
    if let Some(key) = sock_ops_key(ctx) {
        enter(ctx, key, loop_mode::UNDECIDED, how);
    }
}

/// An accepted end at PASSIVE_ESTABLISHED: in, bypassing from its first byte, when its peer is.
/// It cannot have sent anything yet: its application has not accepted it.
pub fn enter_accepted(ctx: &SockOpsContext) {
    let how = enabled();
    if how == loop_enabled::OFF {
        return;
    }
    if let Some(key) = sock_ops_key(ctx)
        && present(&key.peer())
    {
        enter(ctx, key, loop_mode::BYPASS, how);
    }
}

/// Whether `size` more bytes from the socket `key` may go into its peer's bypass queue, and if
/// so, counts them. `Some` when the socket is paced (it has a tally), `None` when it runs on
/// the lifetime budget.
fn paced_admit(key: &LoopKey, peer: &LoopKey, size: u32) -> Option<bool> {
    let own = LOOP_PACE.get_ptr_mut(key)?;
    // SAFETY: a live map value, written only by this socket's sends, one at a time.
    let own = unsafe { &mut *own };
    // SAFETY: the values are copied out.
    let read = unsafe { LOOP_PACE.get(peer) }
        .and_then(|p| unsafe { LOOP_READ.get(&p.cookie) })
        .copied();
    let Some(read) = read else {
        return Some(false);
    };
    let unread = own.sent.saturating_sub(read);
    if unread + u64::from(size) > LOOP_WINDOW {
        return Some(false);
    }
    own.sent += u64::from(size);
    Some(true)
}

/// `sk_msg` on every send of a socket in `LOOP_SOCKS`.
pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the kernel passes a valid `sk_msg_md` for the duration of the program.
    let md = unsafe { &*ctx.msg };
    let key = LoopKey {
        // SAFETY: reads the netns of the sending socket.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_ip4: md.local_ip4,
        remote_ip4: md.remote_ip4,
        local_port: md.local_port,
        remote_port: remote_port(md.remote_port),
    };
    let Some(state) = LOOP_MODES.get_ptr_mut(&key) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: `state` points into a live map value; a socket's sends run one at a time under
    // its lock, and nothing else writes this entry while the socket lives.
    let state = unsafe { &mut *state };
    if state.mode == loop_mode::TCP {
        return sk_action::SK_PASS;
    }
    let mut peer = key.peer();
    let why = if !present(&peer) {
        if state.mode == loop_mode::UNDECIDED {
            events::LOOP_TCP_EARLY_SEND
        } else {
            events::LOOP_TCP_PEER_GONE
        }
    } else if !paced_admit(&key, &peer, md.size).unwrap_or_else(|| md.size <= state.left) {
        events::LOOP_TCP_LIMIT
    } else {
        if state.mode == loop_mode::UNDECIDED {
            state.mode = loop_mode::BYPASS;
            event(events::LOOP_BYPASSED);
        }
        state.left = state.left.saturating_sub(md.size);
        return LOOP_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) as u32;
    };
    state.mode = loop_mode::TCP;
    event(why);
    sk_action::SK_PASS
}
