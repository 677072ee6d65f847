//! Kernel half of the mesh: captures enrolled pods' sockets and hands them to the node proxy.
//!
//! - `cgroup/connect{4,6}` (attached to each enrolled pod's cgroup) rewrites outbound TCP
//!   connects to the proxy's listener on the pod's own loopback and records where they were going.
//! - `sock_ops` (same cgroups) re-keys that record, at ESTABLISHED, from the socket cookie (which
//!   the proxy cannot see) to (netns cookie, client port), which the proxy can compute on accept.
//! - `sk_lookup` (attached to each enrolled pod's netns) steers connections arriving on the pod's
//!   external interfaces to the proxy's inbound listeners, and refuses them when the proxy is down.
//!
//! - `sk_skb/stream_verdict` (attached to the splice sock hash) moves the bytes of same-node
//!   connections the proxy has authorized from one of its sockets to the other in the kernel.
//!
//! - `sock_ops` on the agent's own cgroup and `sk_msg` (attached to the loopback sock hash) take
//!   TCP out of the hops between pods and the proxy over each pod's loopback.
//!
//! Entry points are thin wrappers; each hook's logic lives in its own module.
#![no_std]
#![no_main]

mod connect;
mod lookup;
mod loopback;
mod maps;
mod sockops;
mod splice;

use aya_ebpf::{
    macros::{cgroup_sock_addr, fexit, sk_lookup, sk_msg, sock_ops, stream_verdict},
    programs::{
        FExitContext, SkBuffContext, SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext,
    },
};

/// Connect hooks must return 1 to let the (possibly rewritten) connect proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    #[cfg(feature = "upgrade-variant")]
    {
        let mut mark = 0u64;
        // SAFETY: a write to a local; volatile so the compiler keeps it.
        unsafe { core::ptr::write_volatile(&raw mut mark, 1) };
    }
    connect::on_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    connect::on_connect6(&ctx);
    ALLOW
}

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    sockops::on_sock_ops(&ctx);
    1
}

#[sock_ops]
pub fn mesh_proxy_sock_ops(ctx: SockOpsContext) -> u32 {
    sockops::on_proxy_sock_ops(&ctx);
    1
}

#[sk_msg]
pub fn mesh_loop_msg(ctx: SkMsgContext) -> u32 {
    loopback::on_msg(&ctx)
}

#[fexit(function = "sk_msg_recvmsg")]
pub fn mesh_loop_read(ctx: FExitContext) -> i32 {
    // sk_msg_recvmsg(sk, psock, msg, len, flags): the return value follows 5 arguments.
    loopback::on_read(&ctx, 5);
    0
}

#[fexit(function = "__sk_msg_recvmsg")]
pub fn mesh_loop_read_inner(ctx: FExitContext) -> i32 {
    // __sk_msg_recvmsg(sk, psock, msg, len, flags, copied_from_self): it follows 6.
    loopback::on_read(&ctx, 6);
    0
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    lookup::on_sk_lookup(&ctx)
}

#[stream_verdict]
pub fn mesh_splice_verdict(ctx: SkBuffContext) -> u32 {
    splice::on_skb(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License section: the kernel only grants GPL helpers (sk_assign, cookies) to GPL programs.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
