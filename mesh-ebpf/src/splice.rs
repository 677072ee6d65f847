//! `sk_skb/stream_verdict` on `SPLICE_SOURCES`: the same-node fast path. Once the proxy has
//! authorized a same-node connection, it puts its two sockets (client side and application side)
//! in the splice maps; from then on every byte one of them receives is sent out of the other by
//! the kernel, and never reaches userspace.
//!
//! Why a verdict on the proxy's own sockets and not `sk_msg` on the pods' sockets: the proxy
//! decides policy after the client has connected and may already have sent bytes, and it holds
//! exactly these two sockets. Both TCP connections stay real, so backpressure, FIN and RST keep
//! working, and no byte can overtake one the proxy already relayed.

use aya_ebpf::{
    EbpfContext, bindings::sk_action, helpers::bpf_get_socket_cookie, programs::SkBuffContext,
};
use mesh_common::events;

use crate::maps::{SPLICE_PEERS, SPLICE_TARGETS, event};

pub fn on_skb(ctx: &SkBuffContext) -> u32 {
    if ctx.len() == 0 {
        // A bare FIN. TCP has already taken note of it (the proxy passes it on); redirected, the
        // kernel's sender would see a zero-byte send and fail the peer socket with EPIPE.
        return sk_action::SK_DROP;
    }
    // SAFETY: reads the cookie of the socket that received this skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(pair) = SPLICE_PEERS.get_ptr_mut(&cookie) else {
        // Only while a pair is being taken apart: let the proxy read what is left.
        event(events::SPLICE_PASS_UNPAIRED);
        return sk_action::SK_PASS;
    };
    // SAFETY: `pair` points into a live map value for the duration of this run.
    let peer = unsafe { (*pair).peer };
    let verdict = SPLICE_TARGETS.redirect_skb(ctx, peer, 0) as u32;
    if verdict == sk_action::SK_PASS {
        // SAFETY: as above; this socket's verdicts are serialized by its lock.
        unsafe { (*pair).bytes += u64::from(ctx.len()) };
    } else {
        event(events::SPLICE_DROP_NO_PEER);
    }
    verdict
}
