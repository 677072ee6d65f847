//! Capture: the kernel side of the data path and the handles the proxy needs from it. The eBPF
//! programs and maps (`bpf`), what the kernel offers them (`features`), a pod's network
//! namespace (`netns`) and its cgroup (`cgroup`).
//! The lowest layer above the state model: it imports nothing from the proxy.

pub mod bpf;
pub mod cgroup;
pub mod features;
pub mod netns;
