//! Discovery: where the node's state comes from. Today the node file (`nodefile`); each source
//! produces the same [`crate::state::NodeState`], and everything after discovery is one code
//! path.

pub mod nodefile;
