//! Path normalization: never panics, and is idempotent. A path that normalizes to `n` must
//! normalize to `n` again, or an upstream that normalizes once more would see another path than
//! the one authorization checked.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::{protocol::path::normalize, state::PathNormalization};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for mode in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        if let Ok(n) = normalize(path, mode) {
            assert_eq!(
                normalize(&n, mode).as_deref(),
                Ok(n.as_str()),
                "{mode:?} of {path:?}"
            );
        }
    }
});
