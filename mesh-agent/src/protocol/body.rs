//! The body type every layer of the proxy passes, and the HTTP/2 settings that both its
//! servers and its upstream clients use.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;

/// Errors a body can carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// HTTP/2 flow-control windows of every L7 connection, both directions: what a peer that does
/// not read can make the proxy hold is one window per stream, and at most one connection window
/// per connection (the upstream sends only what the window allows, and a response body is
/// read from it only as fast as the client takes it).
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// See [`H2_STREAM_WINDOW`].
pub const H2_CONN_WINDOW: u32 = 4 * 1024 * 1024;
/// Data hyper may queue per stream beyond what the peer's window lets it send.
pub const H2_SEND_BUF: usize = 64 * 1024;
/// The header list HTTP/2 decodes before the proxy's own 60 KiB check answers 431. It is
/// larger, because h2 must decode a whole header block to keep its HPACK table in step: a block
/// over its limit is 431 only while the encoded block fits, and past that a connection error. So
/// every request a client would send is answered 431 by the proxy, as on HTTP/1, and only an
/// encoded block over 256 KiB ends the connection.
pub const H2_DECODE_LIMIT: u32 = 256 * 1024;

/// A body of `b`, whole.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// An incoming body as the proxy's body type.
pub fn incoming(b: Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}
