//! Every map, pinned by name so that a restarted agent adopts them (and the links that use them
//! keep working while no agent runs). Names must match `mesh_common::maps`; a kernel test checks.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use mesh_common::{
    InboundKey, InboundStats, IpKey, LOOP_CAPACITY, LoopKey, LoopPace, LoopState, MAX_PODS,
    ORIG_DST_CAPACITY, OrigDst, OrigDstKey, PodStats, PortKey, SPLICE_CAPACITY, SplicePeer, events,
};

#[map]
pub static ORIG_DST_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_CAPACITY, 0);

#[map]
pub static ORIG_DST: LruHashMap<OrigDstKey, OrigDst> = LruHashMap::pinned(ORIG_DST_CAPACITY, 0);

/// Per-CPU so counting needs no atomics (the BPF target has no 64-bit fetch-add in `core`).
#[map]
pub static POD_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(MAX_PODS, 0);

#[map]
pub static INBOUND_SOCKS: SockHash<InboundKey> = SockHash::pinned(MAX_PODS * 2, 0);

#[map]
pub static INBOUND_STATS: PerCpuHashMap<IpKey, InboundStats> = PerCpuHashMap::pinned(MAX_PODS, 0);

#[map]
pub static STRICT_ADDRS: HashMap<IpKey, u8> = HashMap::pinned(MAX_PODS, 0);

#[map]
pub static MTLS_PORTS: HashMap<PortKey, u8> = HashMap::pinned(MAX_PODS * 4, 0);

#[map]
pub static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);

#[map]
pub static SPLICE_TARGETS: SockHash<u64> = SockHash::pinned(SPLICE_CAPACITY, 0);

#[map]
pub static SPLICE_SOURCES: SockHash<u64> = SockHash::pinned(SPLICE_CAPACITY, 0);

#[map]
pub static SPLICE_PEERS: HashMap<u64, SplicePeer> = HashMap::pinned(SPLICE_CAPACITY, 0);

#[map]
pub static LOOP_SOCKS: SockHash<LoopKey> = SockHash::pinned(LOOP_CAPACITY, 0);

#[map]
pub static LOOP_MODES: LruHashMap<LoopKey, LoopState> = LruHashMap::pinned(LOOP_CAPACITY, 0);

#[map]
pub static LOOP_ENABLED: Array<u32> = Array::pinned(1, 0);

#[map]
pub static LOOP_PACE: LruHashMap<LoopKey, LoopPace> = LruHashMap::pinned(LOOP_CAPACITY, 0);

#[map]
pub static LOOP_READ: LruHashMap<u64, u64> = LruHashMap::pinned(LOOP_CAPACITY, 0);

/// Node-wide event counters, one slot per `mesh_common::events` index.
#[map]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(events::COUNT, 0);

/// Counts one `mesh_common::events` event.
#[inline(always)]
pub fn event(index: u32) {
    if let Some(slot) = EVENTS.get_ptr_mut(index) {
        bump(slot);
    }
}

/// Adds one to a per-CPU counter. Plain read-modify-write is safe: a per-CPU value is only
/// touched by programs on its own CPU, and BPF programs are not preempted mid-run.
#[inline(always)]
pub fn bump(counter: *mut u64) {
    // SAFETY: `counter` points into a live per-CPU map value returned by the kernel for this run.
    unsafe { *counter += 1 };
}
