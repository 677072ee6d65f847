//! Routing: from what a client addressed to where its bytes go. A pure lookup over the node's
//! state, rebuilt whole on every change: which service an address is, which HTTP rule a request
//! takes, which backend a weighted rule picks, and which endpoint the balancer chooses. It
//! opens no connection and decides no policy.

pub mod balance;
pub mod limits;
pub mod rules;
pub mod table;
