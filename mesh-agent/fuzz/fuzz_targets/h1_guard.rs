//! The HTTP/1 framing guard over any client bytes: never panics, and never passes on more bytes
//! than came in.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::protocol::guard::H1Guard;
use tokio::io::AsyncReadExt;

fuzz_target!(|data: &[u8]| {
    mesh_agent_fuzz::block_on(async {
        let io = tokio::io::join(data, tokio::io::sink());
        let mut guard = H1Guard::new(io, std::time::Duration::from_secs(5));
        let mut out = Vec::new();
        let _ = guard.read_to_end(&mut out).await;
        assert!(out.len() <= data.len(), "the guard invented bytes");
    });
});
