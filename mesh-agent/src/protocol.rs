//! HTTP as the proxy speaks it, below routing and the handlers: protocol detection, the HTTP/1
//! framing guard, the HTTP/2 frame guard, path validation and normalization, trace headers, and
//! the body type and HTTP/2 settings every layer shares. Nothing here knows about pods or
//! services.

/// The `AsyncWrite` methods of a wrapper that writes straight through to its field `$io`:
/// writes (plain and vectored) and flushes. A wrapper adds `poll_shutdown` itself, forwarded or
/// not; the read side is where wrappers differ.
macro_rules! write_through {
    ($io:ident) => {
        fn poll_write(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$io).poll_write(cx, buf)
        }
        fn poll_write_vectored(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$io).poll_write_vectored(cx, bufs)
        }
        fn is_write_vectored(&self) -> bool {
            self.$io.is_write_vectored()
        }
        fn poll_flush(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.get_mut().$io).poll_flush(cx)
        }
    };
}
pub(crate) use write_through;

pub mod body;
pub mod detect;
pub mod guard;
pub mod h2guard;
pub mod path;
pub mod trace;
