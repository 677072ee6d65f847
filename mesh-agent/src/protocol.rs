//! HTTP as the proxy speaks it, below routing and the handlers: protocol detection, the HTTP/1
//! framing guard, the HTTP/2 frame guard, path validation and normalization, trace headers, and
//! the body type and HTTP/2 settings every layer shares. Nothing here knows about pods or
//! services.

pub mod body;
pub mod detect;
pub mod guard;
pub mod h2guard;
pub mod path;
pub mod trace;
