//! `mesh-agent`: the node agent of a sidecar-less service mesh, as a library. The binary is
//! [`command::main`]; tests, fuzz targets and benches use the same modules.
//!
//! Start with [`app`], which wires every subsystem; ARCHITECTURE.md maps the modules onto the
//! data path.

pub mod admin;
pub mod app;
pub mod authz;
pub mod ca_server;
pub mod capture;
pub mod cli;
pub mod command;
pub mod config;
pub mod discovery;
pub mod explain;
pub mod identity;
pub mod install;
pub mod pods;
pub mod protocol;
pub mod proxy;
pub mod route;
pub mod state;
pub mod telemetry;
pub mod transport;
pub mod view;
