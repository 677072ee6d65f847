//! `mesh-agent`: parses the command line and hands over to the library; see
//! `mesh_agent::command` and `mesh_agent::app`.

/// jemalloc, not glibc's malloc: after a load ends (10,000 connections closed) glibc kept about
/// 30 MB resident in partly used pages even when trimmed; jemalloc's slabs and decay give it back.
/// (`--features system-allocator` leaves it out, for heap profilers that hook malloc.)
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start. A background thread purges freed pages after
/// `dirty_decay_ms`, so an idle agent returns memory too (without it, purging waits for the
/// next allocations); `muzzy_decay_ms:0` returns them for good (`MADV_DONTNEED`) rather than
/// leaving them counted in RSS until the kernel reclaims them. `thp:never`: on kernels whose
/// transparent huge pages are `always` (Debian 12's), the heap's 2 MB pages held the agent's
/// idle RSS at 80 MB against 35 MB, for small objects that gain nothing from them.
/// `_RJEM_MALLOC_CONF` overrides these.
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8] =
    b"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0,thp:never\0";

fn main() -> std::process::ExitCode {
    mesh_agent::command::main()
}
