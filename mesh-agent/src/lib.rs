//! `mesh-agent`: the node agent of a sidecar-less service mesh, as a library. The binary is
//! [`command::main`]; tests, fuzz targets and benches use the same modules.
//!
//! Start with [`app`], which wires every subsystem; ARCHITECTURE.md maps the modules onto the
//! data path.

pub mod admin;
pub mod app;
pub mod bpf;
pub mod ca;
pub mod certs;
pub mod cgroup;
pub mod cli;
pub mod command;
pub mod config;
pub mod explain;
pub mod flows;
pub mod hbone;
pub mod identity;
pub mod ktls;
pub mod l7;
pub mod metrics;
pub mod netns;
pub mod nodefile;
pub mod policy;
pub mod proxy;
pub mod state;
