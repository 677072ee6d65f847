//! Telemetry: what the proxy reports. Istio-compatible Prometheus metrics (`metrics`) and flow
//! records for the access log and `/debug/flows` (`flows`).

pub mod flows;
pub mod metrics;
