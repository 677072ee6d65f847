//! `sk_lookup`: steer connections arriving at an enrolled pod to the proxy's listeners.
//!
//! Stages: skip what the proxy itself delivers (arrives on loopback) and non-TCP → pick the
//! listener by destination port → refuse plaintext to a STRICT pod or port → assign the socket, or refuse
//! if the proxy has none (agent down: fail closed rather than let the application see
//! unauthenticated traffic).

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    programs::SkLookupContext,
};
use mesh_common::{InboundKey, IpKey, ListenerKind, PortKey, events, ports};

use crate::maps::{INBOUND_SOCKS, INBOUND_STATS, MTLS_PORTS, STRICT_ADDRS, bump, event};

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const LOOPBACK_IFINDEX: u32 = 1;

/// Whether plaintext to `port` of the pod at `ip` is refused: the port's own mode when
/// PeerAuthentication gives it one, else the pod's.
fn strict(ip: IpKey, port: u32) -> bool {
    let key = PortKey::new(ip, port as u16);
    // SAFETY: plain lookups of `u8` values, copied out at once.
    match unsafe { MTLS_PORTS.get(&key) } {
        Some(mode) => *mode != 0,
        None => unsafe { STRICT_ADDRS.get(&ip) }.is_some(),
    }
}

pub fn on_sk_lookup(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid `bpf_sk_lookup` for the duration of the program.
    let lk = unsafe { &*ctx.lookup };
    if lk.protocol != IPPROTO_TCP {
        event(events::LOOKUP_PASS_NOT_TCP);
        return SK_PASS;
    }
    if lk.ingress_ifindex == LOOPBACK_IFINDEX {
        event(events::LOOKUP_PASS_LOOPBACK);
        return SK_PASS;
    }
    let ip = match lk.family {
        AF_INET => IpKey::v4(lk.local_ip4.to_ne_bytes()),
        AF_INET6 => {
            let mut addr = [0u8; 16];
            let w = lk.local_ip6;
            addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
            addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
            addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
            addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
            IpKey { addr }
        }
        _ => {
            event(events::LOOKUP_PASS_NOT_TCP);
            return SK_PASS;
        }
    };
    let kind = if lk.local_port == u32::from(ports::HBONE) {
        ListenerKind::Hbone
    } else {
        ListenerKind::Inbound
    };
    let stats = INBOUND_STATS.get_ptr_mut(&ip);
    let Some(stats) = stats else {
        // Not one of our pods' addresses (e.g. a secondary address): leave it alone.
        event(events::LOOKUP_PASS_NOT_ENROLLED);
        return SK_PASS;
    };
    if kind == ListenerKind::Inbound && strict(ip, lk.local_port) {
        // STRICT: plaintext is refused here, so the proxy never even accepts it.
        // SAFETY: `stats` is a live map value.
        bump(unsafe { &raw mut (*stats).refused_strict });
        event(events::LOOKUP_DROP_STRICT);
        return SK_DROP;
    }
    match INBOUND_SOCKS.redirect_sk_lookup(ctx, InboundKey::new(ip, kind), 0) {
        Ok(()) => {
            // SAFETY: `stats` is a live map value.
            match kind {
                ListenerKind::Hbone => {
                    bump(unsafe { &raw mut (*stats).steered_hbone });
                    event(events::LOOKUP_STEERED_HBONE);
                }
                ListenerKind::Inbound => {
                    bump(unsafe { &raw mut (*stats).steered_inbound });
                    event(events::LOOKUP_STEERED_INBOUND);
                }
            }
            SK_PASS
        }
        Err(e) => {
            // SAFETY: `stats` is a live map value.
            bump(unsafe { &raw mut (*stats).refused_no_listener });
            event(events::LOOKUP_DROP_NO_LISTENER);
            // Rare (the agent is down or the pod's listener is gone): said, not only counted.
            aya_log_ebpf::warn!(
                ctx,
                "sk_lookup: an enrolled pod has no proxy listener for port {}: connection refused (error {})",
                lk.local_port,
                e
            );
            SK_DROP
        }
    }
}
