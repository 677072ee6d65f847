//! The node proxy's connection handlers, one file per path a connection takes:
//! - `listen`: a pod's listeners (15001 outbound, 15006 plaintext inbound, 15008 HBONE) and
//!   accept loops;
//! - `outbound`: a captured connection, routed at L4 or handed to `l7::outbound`;
//! - `inbound`: plaintext to a PERMISSIVE pod; `hbone`: the HBONE server;
//! - `admission`: authorization at a destination pod; `deliver`: the hand-over to its
//!   application, at L4 or request by request (`l7::inbound`);
//! - `l7`: L7 in the node proxy, both directions;
//! - `drain`: counting connections, and letting them finish when the agent hands over or stops.
//!
//! Handlers read what they need from [`inputs::ProxyInputs`]; routing, policy and transport
//! below them decide and connect, and never call back up.

pub mod admission;
pub mod deliver;
pub mod drain;
pub mod error;
pub mod hbone;
pub mod inbound;
pub mod inputs;
pub mod l7;
pub mod listen;
pub mod outbound;
