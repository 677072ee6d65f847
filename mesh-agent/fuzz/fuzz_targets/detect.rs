//! Protocol detection on any first bytes: never panics, and whatever it read to decide is
//! handed on, so the stream after detection is exactly the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::protocol::detect;
use tokio::io::AsyncReadExt;

fuzz_target!(|data: &[u8]| {
    mesh_agent_fuzz::block_on(async {
        if let Ok((_protocol, mut stream)) = detect::detect(data).await {
            let mut out = Vec::new();
            stream
                .read_to_end(&mut out)
                .await
                .expect("an in-memory read");
            assert_eq!(out, data, "detection lost or added bytes");
        }
    });
});
