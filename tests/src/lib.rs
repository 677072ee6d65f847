//! Test harness: a cluster of simulated nodes and pods on one machine, running the real agent.
//!
//! Topology (all addresses live only inside namespaces this harness creates):
//! - a fabric netns with a bridge joins the nodes' uplinks on 198.19.0.0/24 (node i is
//!   198.19.0.(i+1));
//! - node i is a netns with a bridge `br0` at 198.18.(i+1).1/24 and routes to the other nodes'
//!   pod ranges via their uplinks; its agent runs in this netns;
//! - pod j of node i is a netns with `eth0` at 198.18.(i+1).(j+10) plus a cgroup v2 directory;
//! - service addresses are 198.19.1.x and exist only in the agents' routing;
//! - the mesh CA (`mesh-agent ca`) runs in the fabric netns at 198.19.0.254:15012, and each node
//!   has a bearer token for it.
//!
//! RFC 2544's benchmarking range (198.18.0.0/15) is used so no address can be mistaken for a real
//! network. Every resource name starts with a per-cluster prefix (`mt<pid>x<n>`), teardown runs on
//! drop (so also when a test panics), and a new cluster first removes leftovers of harness
//! processes that no longer exist.

mod agents;
pub mod apiserver;
mod ca;
mod capture;
mod hbone;
pub mod kube;
mod nodefile;
mod pods;
mod prometheus;
mod sys;
mod topology;

pub use capture::*;
pub use hbone::{AnyServer, WorkloadCert};
pub use nodefile::{backend, destination_rule, route, rules, traffic_policy};
pub use pods::load_result;
pub use prometheus::*;
pub use sys::*;
pub use topology::*;
