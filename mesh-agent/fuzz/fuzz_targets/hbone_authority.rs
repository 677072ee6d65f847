//! The HBONE CONNECT target on any URI: never panics, and a target is only ever an IP address and
//! a non-zero port, exactly as the authority spells it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_agent::transport::hbone::connect_target;

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = hyper::Uri::try_from(data) else {
        return;
    };
    if let Some(t) = connect_target(&uri) {
        assert_ne!(t.port(), 0);
        let authority = uri.authority().expect("a target has an authority");
        assert_eq!(
            authority.as_str().parse::<std::net::SocketAddr>().ok(),
            Some(t)
        );
    }
});
