//! Discovery: where the node's state comes from: a node file (`nodefile`, local mode) or the
//! Kubernetes API (`kube`). Kubernetes discovery writes the node file's own model, and the node
//! file's validation turns either into the same [`crate::state::NodeState`]: everything after
//! discovery is one code path.

pub mod kube;
pub mod nodefile;
